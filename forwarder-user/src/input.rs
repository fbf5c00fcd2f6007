//! `forwarder input`: in an exposed Qubes VM, admits in its own firewall
//! what dom0 exposes it for (`/vm-config/forwarder-input.N`, written by
//! `qvm-forwarder`), follows every change live, honours each entry's
//! `until`, and removes everything on SIGINT or SIGTERM. A bad value is
//! logged with what was wrong, and the last good one stays applied.

use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::InputArgs,
    input_rules,
    qubesdb::{self, Tools, Tree, input_share},
    timers::sleep_until,
    vm_config::input::InputShare,
};

pub fn run(args: &InputArgs) -> Result<()> {
    if args.remove {
        if input_rules::remove()? {
            println!(
                "removed chain {} and its jump from {}",
                input_rules::CHAIN,
                input_rules::CUSTOM_INPUT
            );
        }
        return Ok(());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(follow(Tools::on_path()))
}

/// What is admitted, and from which share.
#[derive(Default)]
struct Admitted {
    good: InputShare,
    rules: Vec<String>,
    /// The chain was made at least once.
    installed: bool,
    /// Why the last value was refused, or reading failed; logged once.
    complaint: Option<String>,
}

impl Admitted {
    fn complain(&mut self, why: String) {
        if self.complaint.as_ref() != Some(&why) {
            warn!(
                "QubesDB: {why}; the last good input share stays (rules: {})",
                self.rules.len()
            );
            self.complaint = Some(why);
        }
    }

    fn take(&mut self, read: Result<Tree, String>) {
        match read.and_then(|tree| input_share(&tree)) {
            Ok(share) => {
                if self.complaint.take().is_some() {
                    info!("QubesDB: the input share is good again");
                }
                self.good = share;
            }
            Err(why) => self.complain(why),
        }
    }

    /// Makes the firewall hold the good share as of now; unchanged rules
    /// keep their counters, unless Qubes' table was reloaded meanwhile.
    fn apply(&mut self) -> Result<()> {
        let rules = input_rules::rules(&self.good, SystemTime::now());
        if self.installed && rules == self.rules && input_rules::in_place()? {
            return Ok(());
        }
        for rule in rules.iter().filter(|r| !self.rules.contains(r)) {
            info!("admitting {rule}");
        }
        for rule in self.rules.iter().filter(|r| !rules.contains(r)) {
            info!("no longer admitting {rule}");
        }
        input_rules::install(&rules)?;
        self.rules = rules;
        self.installed = true;
        Ok(())
    }

    /// When an entry of the good share expires.
    fn wakeup(&self) -> Option<tokio::time::Instant> {
        let now = SystemTime::now();
        let next = self
            .good
            .admits
            .iter()
            .map(|a| a.attrs.until)
            .chain(self.good.groups.iter().map(|g| g.attrs.until))
            .flatten()
            .filter(|t| *t > now)
            .min()?;
        let wait = next.duration_since(now).unwrap_or(Duration::ZERO);
        Some(tokio::time::Instant::now() + wait)
    }
}

async fn follow(tools: Tools) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut trees = qubesdb::feed(tools).context("starting the QubesDB thread")?;
    let mut admitted = Admitted::default();
    info!(
        "admitting what dom0 exposes this VM for (/vm-config/forwarder-input.N) in chain {} of table ip {}",
        input_rules::CHAIN,
        input_rules::TABLE
    );
    let result = loop {
        let wakeup = admitted.wakeup();
        tokio::select! {
            read = trees.recv() => {
                let Some(read) = read else { break Ok(()) };
                admitted.take(read);
                if let Err(err) = admitted.apply() {
                    break Err(err);
                }
            }
            () = sleep_until(wakeup) => {
                if let Err(err) = admitted.apply() {
                    break Err(err);
                }
            }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break Ok(()) }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break Ok(()) }
        }
    };
    let removed = input_rules::remove();
    result?;
    if removed? {
        info!("removed every rule it added");
    }
    Ok(())
}
