//! Rule management: the running set of forward rules, changed by `rules
//! add/del` and by expiry, and the config file changed on `--save` (only
//! the one rule's table, see `config_file`). It runs as a task of its own:
//! a rule change waits for the flow table thread (which removes the flows
//! of the rules gone) and for nft, never the event loop.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use log::info;
use tokio::sync::{mpsc, oneshot};

use super::flow_worker::Jobs;

/// What the event loop changes in the rule book, besides control requests.
pub(super) enum Update {
    /// dom0's share changed: its rules are now `apply`, and `all` (the
    /// routed ones and those waiting for a route) must not clash with any
    /// other rule. The answer says whether it was taken.
    Qubesdb {
        all: Vec<Rule>,
        apply: Vec<Rule>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The uplink followed the default route to another interface.
    Uplink(String),
}
use crate::{
    config::RunConfig,
    config_file,
    control::{Request, Response},
    nft,
    rules::{self, Origin, Rule},
    spec::{AllowFrom, ForwardSpec, RuleRef},
    timers::sleep_until,
};

/// A request from a control-socket client, and where its answer goes.
pub(super) type Call = (Request, oneshot::Sender<Response>);

pub(super) struct RuleBook {
    pub(super) rules: Vec<Rule>,
    target: Option<Ipv4Addr>,
    allow_from: AllowFrom,
    config_file: Option<PathBuf>,
    uplink: String,
    pub(super) jobs: Jobs,
    updates: Option<mpsc::Receiver<Update>>,
}

impl RuleBook {
    pub(super) fn new(config: &RunConfig, jobs: Jobs) -> Self {
        RuleBook {
            rules: config.rules.clone(),
            target: config.target,
            allow_from: config.allow_from.clone(),
            config_file: config.config_file.clone(),
            uplink: config.uplink.clone(),
            jobs,
            updates: None,
        }
    }

    /// Takes the event loop's updates from `updates` too.
    pub(super) fn with_updates(mut self, updates: mpsc::Receiver<Update>) -> Self {
        self.updates = Some(updates);
        self
    }

    /// Answers requests and removes rules whose time is up, until `stop`
    /// fires (or is dropped); a change under way is finished first, so the
    /// nftables table it installs cannot outlive the clean stop's removal.
    pub(super) async fn serve(
        mut self,
        mut calls: mpsc::Receiver<Call>,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<()> {
        let mut updates = self.updates.take();
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                call = calls.recv() => match call {
                    Some((request, reply)) => drop(reply.send(self.handle(request).await)),
                    None => return Ok(()),
                },
                Some(update) = next_update(updates.as_mut()) => self.update(update).await?,
                () = sleep_until(self.next_expiry()) => self.expire_rules().await?,
            }
        }
    }

    async fn update(&mut self, update: Update) -> Result<()> {
        match update {
            Update::Qubesdb { all, apply, reply } => {
                drop(reply.send(self.replace_qubesdb(all, apply).await));
                Ok(())
            }
            Update::Uplink(uplink) => {
                self.uplink = uplink;
                nft::install_off_thread(&self.uplink, &self.rules).await
            }
        }
    }

    /// Replaces the rules from QubesDB, as `rules add` and `rules del`
    /// change the others: checked as a whole first, unchanged rules keep
    /// their flows, and a failure puts the previous rules back.
    async fn replace_qubesdb(&mut self, all: Vec<Rule>, apply: Vec<Rule>) -> Result<(), String> {
        let others: Vec<Rule> = self
            .rules
            .iter()
            .filter(|r| r.origin != Origin::Qubesdb)
            .cloned()
            .collect();
        rules::check(&[others.clone(), all].concat())?;
        let candidate = [others, apply].concat();
        if candidate == self.rules {
            return Ok(());
        }
        let previous = std::mem::replace(&mut self.rules, candidate);
        if let Err(err) = self.apply_rules().await {
            self.rules = previous;
            let _ = self.apply_rules().await;
            return Err(format!("{err:#}"));
        }
        Ok(())
    }

    /// Makes the datapath and the nftables guard hold the current rules.
    async fn apply_rules(&mut self) -> Result<()> {
        self.jobs.apply(self.rules.clone()).await?;
        nft::install_off_thread(&self.uplink, &self.rules).await
    }

    /// Removes rules whose time is up. The datapath stopped applying them
    /// at their deadline already, daemon or not.
    async fn expire_rules(&mut self) -> Result<()> {
        let now = SystemTime::now();
        let (expired, kept): (Vec<Rule>, Vec<Rule>) =
            self.rules.drain(..).partition(|r| r.expired(now));
        self.rules = kept;
        if !expired.is_empty() {
            self.apply_rules().await?;
            for rule in expired {
                info!("rule {rule} expired and was removed");
            }
        }
        Ok(())
    }

    /// When the next rule expires, on the runtime's clock.
    fn next_expiry(&self) -> Option<tokio::time::Instant> {
        let next = self.rules.iter().filter_map(|r| r.expires).min()?;
        let wait = next
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(tokio::time::Instant::now() + wait)
    }

    /// The file `--save` edits; asked before anything changes, so a
    /// refused save changes nothing.
    fn config_file(&self) -> Result<PathBuf, String> {
        self.config_file.clone().ok_or_else(|| {
            "this instance was started without --config: there is no file to save to".into()
        })
    }

    pub(super) async fn add_rule(
        &mut self,
        spec: &str,
        allow_from: Option<&str>,
        expire_secs: Option<u64>,
        comment: Option<String>,
        save: bool,
    ) -> Result<String, String> {
        let file = save.then(|| self.config_file()).transpose()?;
        let spec: ForwardSpec = spec.parse()?;
        let target = spec.target.or(self.target).ok_or_else(|| {
            format!("{spec}: no target address and the instance has no default target")
        })?;
        let allow = match allow_from {
            Some(a) => a.parse::<AllowFrom>()?,
            None => self.allow_from.clone(),
        };
        let mut rule = Rule::from_spec(&spec, target, allow, Origin::Live);
        rule.comment = comment;
        rule.expires = expire_secs
            .map(|s| rules::expiry_after(Duration::from_secs(s)))
            .transpose()?;
        let mut candidate = self.rules.clone();
        candidate.push(rule.clone());
        rules::check(&candidate)?;
        let previous = std::mem::replace(&mut self.rules, candidate);
        if let Err(err) = self.apply_rules().await {
            self.rules = previous;
            let _ = self.apply_rules().await;
            return Err(format!("{err:#}"));
        }
        info!("added rule {rule} over the control socket");
        let Some(file) = file else {
            return Ok(format!("added {rule}"));
        };
        config_file::save_rule(&file, &rule)
            .map_err(|e| format!("added {rule}, but not saved: {e}"))?;
        if let Some(saved) = self.rules.last_mut() {
            saved.origin = Origin::File;
        }
        info!("saved rule {rule} to {}", file.display());
        Ok(format!("added {rule} and saved it to {}", file.display()))
    }

    pub(super) async fn del_rule(&mut self, rule: &str, save: bool) -> Result<String, String> {
        let file = save.then(|| self.config_file()).transpose()?;
        let target: RuleRef = rule.parse()?;
        let Some(index) = self
            .rules
            .iter()
            .position(|r| r.proto == target.proto && r.ports == target.ports)
        else {
            let within = self
                .rules
                .iter()
                .find(|r| r.proto == target.proto && r.ports.overlaps(&target.ports));
            return Err(match within {
                Some(range) => format!(
                    "no rule {target}: {target} is part of {}, deleted only as a whole",
                    range.name()
                ),
                None => format!("no rule {target}"),
            });
        };
        let origin = self.rules[index].origin;
        if origin == Origin::Qubesdb {
            return Err(format!(
                "{target} comes from dom0's share in QubesDB; `qvm-forwarder unexpose` in dom0 \
                 removes it (deleted here, it would come back at the next read of QubesDB)"
            ));
        }
        if save {
            match origin {
                Origin::Preset => {
                    return Err(format!(
                        "{target} comes from {}; remove the preset from the config file or the command line to drop it for good, or delete it without --save",
                        self.rules[index].source()
                    ));
                }
                Origin::Flag => {
                    return Err(format!(
                        "{target} comes from a --forward flag on the daemon's command line, not from the file; delete it without --save, and drop the flag to drop it for good"
                    ));
                }
                Origin::File | Origin::Live | Origin::Qubesdb => {}
            }
        }
        let removed = self.rules.remove(index);
        self.apply_rules().await.map_err(|e| format!("{e:#}"))?;
        info!("deleted rule {removed} over the control socket");
        let Some(file) = file else {
            return Ok(match origin {
                Origin::File => format!(
                    "deleted {removed}; the config file still holds it, so it returns at the next start (--save removes it there)"
                ),
                Origin::Flag | Origin::Preset => format!(
                    "deleted {removed}; {} gives it again at the next start",
                    removed.source()
                ),
                Origin::Live | Origin::Qubesdb => format!("deleted {removed}"),
            });
        };
        let was_there = config_file::remove_rule(&file, removed.proto, removed.ports)
            .map_err(|e| format!("deleted {removed}, but not from the file: {e}"))?;
        Ok(if was_there {
            info!("removed rule {removed} from {}", file.display());
            format!("deleted {removed} and removed it from {}", file.display())
        } else {
            format!("deleted {removed}; {} held no rule for it", file.display())
        })
    }
}

/// The next update, or never without a channel (or once it is closed).
async fn next_update(updates: Option<&mut mpsc::Receiver<Update>>) -> Option<Update> {
    match updates {
        Some(updates) => updates.recv().await,
        None => std::future::pending().await,
    }
}
