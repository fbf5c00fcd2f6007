//! `forwarder teardown`: removes everything an instance recorded, for when
//! its daemon cannot (killed, crashed, or failing to start): the clsact
//! filters in the forwarder's slot (which no process holds), the TCX links
//! (their pins are their last reference), the maps, the records and the
//! nftables table. A daemon that is still running is left alone: its own
//! clean stop removes the same things.

use std::path::Path;

use anyhow::{Result, bail};
use aya::programs::{
    TcAttachType,
    tc::{self, TcError},
};
use forwarder_common::maps::programs;

use crate::{
    cli::TeardownArgs,
    control,
    datapath::{self, HookKind},
    interfaces, nft,
    pin::PinLayout,
};

/// systemd's account of how a service ended, given to `ExecStopPost=`.
const SERVICE_RESULT: &str = "SERVICE_RESULT";

/// Results meaning the daemon was asked to stop: it exited on its own
/// (`success`), or was killed for not stopping in time (`timeout`). Any
/// other is a failure, after which systemd starts the daemon again.
const STOPPED: &[&str] = &["success", "timeout"];

/// Removes the forwarder's clsact filters from the ingress of interface
/// `ifindex`. Returns its name when it had any.
pub fn detach_clsact(ifindex: u32) -> Result<Option<String>> {
    let Some(name) = interfaces::name_of(ifindex) else {
        // Gone, and its filters with it.
        return Ok(None);
    };
    let mut removed = false;
    for program in [programs::UPLINK_INGRESS, programs::DOWNSTREAM_INGRESS] {
        match tc::qdisc_detach_program(&name, TcAttachType::Ingress, program) {
            Ok(()) => removed = true,
            Err(TcError::IoError(err)) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(anyhow::Error::new(err)
                    .context(format!("removing the {program} filter from {name}")));
            }
        }
    }
    Ok(removed.then_some(name))
}

/// Removes everything the instance at `layout` recorded; says what went.
pub fn remove_everything(layout: &PinLayout) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let attachments = datapath::recorded_attachments(layout).unwrap_or_default();
    for (ifindex, (role, hook)) in attachments {
        let name = match hook {
            HookKind::Clsact => detach_clsact(ifindex)?,
            // Removing its pin below drops its last reference.
            HookKind::Tcx => layout
                .link_pin(role.name(), ifindex)
                .exists()
                .then(|| interfaces::name_of(ifindex))
                .flatten(),
        };
        if let Some(name) = name {
            removed.push(format!(
                "the {} program's {} attachment to {name} (ifindex {ifindex})",
                role.name(),
                hook.name()
            ));
        }
    }
    let pins = count_files(&layout.root);
    layout.remove()?;
    if pins > 0 {
        removed.push(format!(
            "{pins} pins (links, maps and records) under {}",
            layout.root.display()
        ));
    }
    if nft::remove()? {
        removed.push(format!("the nftables table ip {}", nft::TABLE));
    }
    let socket = control::socket_path(&layout.root);
    if std::fs::remove_file(&socket).is_ok() {
        removed.push(format!("the control socket {}", socket.display()));
    }
    Ok(removed)
}

/// Files below `dir`, which on a bpffs are pins.
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|entry| match entry.file_type() {
                Ok(t) if t.is_dir() => count_files(&entry.path()),
                _ => 1,
            })
            .sum()
    })
}

pub fn run(args: &TeardownArgs) -> Result<()> {
    if args.unless_failed
        && let Ok(result) = std::env::var(SERVICE_RESULT)
        && !STOPPED.contains(&result.as_str())
    {
        println!(
            "the daemon failed ({SERVICE_RESULT}={result}); systemd starts it again and it adopts \
             what is pinned at {}: nothing removed",
            args.pin_dir.display()
        );
        return Ok(());
    }
    if let Some(pid) = control::serving_pid(&args.pin_dir) {
        bail!(
            "the forwarder daemon (pid {pid}) serving {} is running: stop it instead \
             (`systemctl stop forwarder`, or `kill {pid}`); its clean stop removes everything",
            args.pin_dir.display()
        );
    }
    let removed = remove_everything(&PinLayout::new(&args.pin_dir))?;
    if removed.is_empty() {
        println!(
            "nothing of a forwarder instance at {}",
            args.pin_dir.display()
        );
    }
    for what in removed {
        println!("removed {what}");
    }
    Ok(())
}
