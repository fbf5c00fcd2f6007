//! `qvm-forwarder watch`: syncs, then follows `admin.Events` and syncs
//! again after any change that can move a chain or a target: a netvm, ip
//! or provides_network property (of a qube, or the default netvm), a qube
//! added, removed or started, or an exposure written by another
//! `qvm-forwarder`. Events are gathered for a short quiet spell first, so a
//! burst (a qube cloned: added, then its properties set) costs one sync;
//! the sync starts well within a second of the first event. It also syncs
//! when an item's deadline passes, and starts over when qubesd restarts.

use std::{
    io::Write,
    sync::mpsc::RecvTimeoutError,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;

use super::{admin::Admin, admin_api::Event, graph::Graph, intent, sync};

/// How long a burst must be quiet before the sync.
const QUIET: Duration = Duration::from_millis(100);
/// The longest wait after the first event of a burst.
const MAX_DELAY: Duration = Duration::from_millis(400);
/// qubesadmin's `QUBESD_RECONNECT_DELAY`.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Whether `event` can change what `sync` computes.
pub fn relevant(event: &Event) -> bool {
    let name = event.name.as_str();
    let property = name
        .strip_prefix("property-set:")
        .or_else(|| name.strip_prefix("property-reset:"));
    if let Some(property) = property {
        return matches!(
            property,
            "netvm" | "ip" | "provides_network" | "template_for_dispvms" | "default_netvm"
        );
    }
    let feature = name
        .strip_prefix("domain-feature-set:")
        .or_else(|| name.strip_prefix("domain-feature-delete:"));
    if let Some(feature) = feature {
        return feature == intent::FEATURE;
    }
    matches!(
        name,
        "connection-established" | "domain-add" | "domain-delete" | "domain-start"
    )
}

pub fn run(admin: &Admin, dry_run: bool, out: &mut dyn Write) -> Result<()> {
    loop {
        let stream = match admin.transport().events() {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("watch: {e}; again in {}s", RECONNECT_DELAY.as_secs());
                thread::sleep(RECONNECT_DELAY);
                continue;
            }
        };
        let mut deadline = None;
        let mut due = false;
        loop {
            let wait = deadline
                .and_then(|d: SystemTime| d.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(3600));
            match stream
                .events
                .recv_timeout(if due { Duration::ZERO } else { wait })
            {
                Ok(Ok(event)) if relevant(&event) => {
                    let first = Instant::now();
                    let mut last = first;
                    while first.elapsed() < MAX_DELAY {
                        let left = QUIET.saturating_sub(last.elapsed());
                        match stream.events.recv_timeout(left) {
                            Ok(Ok(_)) => last = Instant::now(),
                            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => break,
                            Err(RecvTimeoutError::Timeout) => break,
                        }
                    }
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    eprintln!("watch: {e}; reconnecting");
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            match pass(admin, dry_run, out) {
                Ok(next) => {
                    deadline = next;
                    due = false;
                }
                Err(e) => {
                    eprintln!("watch: sync failed: {e:#}");
                    due = true;
                    thread::sleep(RECONNECT_DELAY);
                }
            }
        }
        thread::sleep(RECONNECT_DELAY);
    }
}

/// One sync; the next deadline to wake up for.
fn pass(admin: &Admin, dry_run: bool, out: &mut dyn Write) -> Result<Option<SystemTime>> {
    let mut graph = Graph::load(admin)?;
    let outcome = sync::compute(&mut graph, None, SystemTime::now())?;
    sync::apply(admin, &outcome, dry_run, out)?;
    out.flush()?;
    Ok(outcome.next_deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(subject: Option<&str>, name: &str) -> Event {
        Event {
            subject: subject.map(String::from),
            name: name.into(),
            kwargs: Vec::new(),
        }
    }

    #[test]
    fn chain_changes_are_relevant_and_our_own_writes_are_not() {
        for name in [
            "property-set:netvm",
            "property-reset:netvm",
            "property-set:ip",
            "domain-add",
            "domain-delete",
            "domain-start",
            "domain-feature-set:forwarder-expose",
            "domain-feature-delete:forwarder-expose",
            "connection-established",
        ] {
            assert!(relevant(&event(Some("app"), name)), "{name}");
        }
        assert!(relevant(&event(None, "property-set:default_netvm")));
        for name in [
            "domain-feature-set:vm-config.forwarder.1",
            "domain-feature-set:service.forwarder",
            "domain-feature-delete:vm-config.forwarder-input.1",
            "property-set:label",
            "property-pre-set:netvm",
            "domain-shutdown",
        ] {
            assert!(!relevant(&event(Some("app"), name)), "{name}");
        }
    }
}
