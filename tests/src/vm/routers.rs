//! The forwarder in sys-net and sys-firewall on whatever hook the kernel
//! offers, or the record of its refusal to run on this kernel.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use forwarder::{
    datapath::{HookKind, recorded_attachments},
    pin::PinLayout,
};
use forwarder_common::reason::Reason;

use super::{SLOW, kernel_release};
use crate::{
    daemon::Forwarder,
    netns::Netns,
    topology::{APP, SYSFW, SYSFW_UPLINK, SYSNET_UPLINK},
};

pub struct Routers {
    pub sysnet: Forwarder,
    pub sysfw: Forwarder,
    /// How the kernel let them attach.
    pub hook: HookKind,
}

/// What starting the forwarder came to.
pub enum Started<T> {
    Running(T),
    /// It exited non-zero at start, naming the kernel: what it said.
    Refused(String),
}

/// Whether `text` names the running kernel: its release, or its
/// major.minor version as a whole number (so 5.10 is not found in 5.100).
fn names_kernel(text: &str, release: &str) -> bool {
    if text.contains(release) {
        return true;
    }
    let version: String = release.split('.').take(2).collect::<Vec<_>>().join(".");
    text.match_indices(&version).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + version.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit() || c == '.')
            && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

fn spawn(ns: &Netns, label: &str, uplink: &str, target: Ipv4Addr) -> Result<Forwarder> {
    Forwarder::spawn(
        ns,
        label,
        &["--uplink", uplink, "--localsend", &target.to_string()],
    )
    .context(label.to_string())
}

/// Waits until `fwd` has its uplink attached, or says how it refused the
/// kernel when it exited naming it.
fn wait_started(mut fwd: Forwarder, label: &str) -> Result<Started<Forwarder>> {
    match fwd.wait_ready(SLOW) {
        Ok(()) => Ok(Started::Running(fwd)),
        Err(not_ready) if !fwd.running() => {
            let log = fwd.log_text();
            let status = fwd.stop().context("after a failed start")?;
            let release = kernel_release()?;
            if status.success() || !names_kernel(&log, &release) {
                return Err(not_ready);
            }
            let said = log
                .lines()
                .find(|l| names_kernel(l, &release))
                .unwrap_or_default();
            Ok(Started::Refused(format!(
                "{label} exited ({status}): {said}"
            )))
        }
        Err(not_ready) => Err(not_ready),
    }
}

/// Starts the forwarder with the LocalSend preset pointing at `target`,
/// and waits until it has its uplink attached.
pub fn start_one(
    ns: &Netns,
    label: &str,
    uplink: &str,
    target: Ipv4Addr,
) -> Result<Started<Forwarder>> {
    wait_started(spawn(ns, label, uplink, target)?, label)
}

/// Starts the forwarder in both routers with the LocalSend preset, each
/// pointing at the next hop, and waits until each has its uplink attached.
/// Both processes start before either is waited for: under TCG a start
/// (mostly the verifier) takes seconds. (From this thread: a child dies
/// with the thread that spawned it.)
pub fn start(sysnet: &Netns, sysfw: &Netns) -> Result<Started<Box<Routers>>> {
    let net = spawn(sysnet, "sys-net", SYSNET_UPLINK, SYSFW)?;
    let fw = spawn(sysfw, "sys-firewall", SYSFW_UPLINK, APP)?;
    let net = wait_started(net, "sys-net").context("sys-net")?;
    let fw = wait_started(fw, "sys-firewall").context("sys-firewall")?;
    match (net, fw) {
        (Started::Running(sysnet), Started::Running(sysfw)) => {
            let hook = hook(&sysnet)?;
            Ok(Started::Running(Box::new(Routers {
                sysnet,
                sysfw,
                hook,
            })))
        }
        (Started::Refused(a), Started::Refused(b)) => Ok(Started::Refused(format!("{a}; {b}"))),
        (Started::Refused(said), Started::Running(_))
        | (Started::Running(_), Started::Refused(said)) => {
            bail!("only one router refused the kernel: {said}")
        }
    }
}

/// The fallbacks a running forwarder's self-test chose for this kernel,
/// from its log; empty when the kernel runs the datapath as compiled.
pub fn fallbacks(fwd: &Forwarder) -> Vec<String> {
    fwd.log_text()
        .lines()
        .filter_map(|l| l.split_once("fallback for this kernel: "))
        .map(|(_, what)| what.to_string())
        .collect()
}

/// The hook a running forwarder's uplink program sits on, as the instance
/// recorded it.
fn hook(fwd: &Forwarder) -> Result<HookKind> {
    let recorded = recorded_attachments(&PinLayout::new(fwd.pins.path()))?;
    recorded
        .get(&fwd.uplink().ifindex)
        .map(|(_, kind)| *kind)
        .context("no attachment recorded for the uplink")
}

/// Waits until a daemon started again after `kill -9` says READY=1, which
/// it says once its first reconcile has put a program on every interface
/// (the predecessor's attachment adopted, or a new one made). The
/// predecessor's attachments are still there, so the hooks alone say
/// nothing; `respawn` forgot the predecessor's READY=1.
pub fn wait_restarted(fwd: &mut Forwarder) -> Result<()> {
    fwd.wait_ready(SLOW).context("after the restart")
}

/// The datapath's own account, for failure messages: relayed copies and
/// every reason counted at least once.
pub fn counters(fwd: &Forwarder) -> String {
    let Ok(tables) = fwd.tables() else {
        return "maps unreadable".into();
    };
    let mut out = Vec::new();
    if let Ok(relays) = tables.installed_relays() {
        for relay in relays.values() {
            if let Ok(c) = tables.relay_counters(relay.slot) {
                out.push(format!(
                    "relayed up {} down {} rate-limited {}",
                    c.packets_up, c.packets_down, c.rate_limited
                ));
            }
        }
    }
    for reason in Reason::ALL {
        if let Ok(n) = tables.reason_count(*reason)
            && n > 0
        {
            out.push(format!("{} {n}", reason.name()));
        }
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::names_kernel;

    #[test]
    fn a_refusal_names_the_kernel() {
        let release = "5.10.0-32-amd64";
        assert!(names_kernel("kernel 5.10.223 is too old", release));
        assert!(names_kernel("running on 5.10.0-32-amd64", release));
        assert!(names_kernel("kernel 5.10: no TCX", release));
        assert!(!names_kernel("kernel 5.100 is fine", release));
        assert!(!names_kernel("address 10.5.10.2", release));
        assert!(!names_kernel("permission denied", release));
    }
}
