//! dom0's share in QubesDB, followed live: a thread of its own reads and
//! watches `/vm-config/` (`qubesdb::feed`) and the event loop takes each
//! read. This is the share's state (the last good one, what of it runs,
//! what was refused) and its first read at start; `share_apply` checks and
//! applies the later ones.

use std::time::{Duration, SystemTime};

use anyhow::{Result, anyhow};
use log::{debug, info, warn};
use tokio::sync::mpsc;

use crate::{
    config::RunConfig,
    multicast,
    qubesdb::{self, RETRY, Tools, Tree, router_share},
    route_lookup,
    router_share::{self as share, Resolved},
    rules::{self, Relay},
    vm_config::router::RouterShare,
};

/// How long a start waits for the first read, so a restart installs the
/// share's rules with the others and never drops their flows.
const FIRST_READ: Duration = Duration::from_secs(3);

/// The share as the daemon follows it.
pub(super) struct Qubesdb {
    feed: mpsc::Receiver<Result<Tree, String>>,
    /// The last share taken.
    pub(super) good: Option<RouterShare>,
    /// What of it runs.
    pub(super) applied: Resolved,
    /// The feed's last error, logged once.
    feed_error: Option<String>,
    /// Why the last share was refused, logged once.
    pub(super) refused: Option<String>,
}

/// The sysctl's limit on the groups one socket joins, when readable.
pub(super) fn max_groups() -> Option<u32> {
    multicast::max_memberships().ok()
}

/// What `share` runs now on this router.
pub(super) fn resolve(config: &RunConfig, share: &RouterShare, now: SystemTime) -> Resolved {
    share::resolve(
        share,
        &config.relay_defaults,
        now,
        |target| route_lookup::lookup(target).unwrap_or(route_lookup::Egress::Unroutable),
        &config.downstream,
        &config.uplink,
    )
}

impl Qubesdb {
    /// Starts following QubesDB with `tools`, and takes the first share
    /// into `config` (its rules join the config's; its relays are held
    /// here), or starts without one, logging why.
    pub(super) async fn start(tools: Tools, config: &mut RunConfig) -> Result<Self> {
        let feed = qubesdb::feed(tools).map_err(|e| anyhow!("starting the QubesDB thread: {e}"))?;
        let mut qubesdb = Qubesdb {
            feed,
            good: None,
            applied: Resolved::default(),
            feed_error: None,
            refused: None,
        };
        let first = match tokio::time::timeout(FIRST_READ, qubesdb.feed.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => Err("the QubesDB thread stopped".into()),
            Err(_) => Err(format!(
                "nothing read within {FIRST_READ:?}; starting without dom0's share"
            )),
        };
        let Some(tree) = qubesdb.tree(first) else {
            return Ok(qubesdb);
        };
        let now = SystemTime::now();
        let checked = router_share(&tree).and_then(|s| {
            share::check_relays(&s, &config.relays, max_groups(), now)?;
            let all = [config.rules.clone(), share::all_rules(&s, now)].concat();
            rules::check(&all)?;
            Ok(s)
        });
        match checked {
            Ok(good) => {
                let resolved = resolve(config, &good, now);
                log_changes(&Resolved::default(), &resolved);
                config.rules.extend(resolved.rules.iter().cloned());
                qubesdb.good = Some(good);
                qubesdb.applied = resolved;
            }
            Err(why) => qubesdb.refuse(why),
        }
        Ok(qubesdb)
    }

    /// The next read of the QubesDB thread; never, once it stopped.
    pub(super) async fn next_read(&mut self) -> Result<Tree, String> {
        match self.feed.recv().await {
            Some(read) => read,
            None => std::future::pending().await,
        }
    }

    /// The tree of a read, or `None` after logging (once) why there is none.
    pub(super) fn tree(&mut self, read: Result<Tree, String>) -> Option<Tree> {
        match read {
            Ok(tree) => {
                if self.feed_error.take().is_some() {
                    info!("QubesDB: reading /vm-config/ again");
                }
                Some(tree)
            }
            Err(err) => {
                if self.feed_error.as_ref() == Some(&err) {
                    debug!("QubesDB: {err}");
                } else {
                    warn!(
                        "QubesDB: {err}; the last good share stays, trying again every {} s",
                        RETRY.as_secs()
                    );
                    self.feed_error = Some(err);
                }
                None
            }
        }
    }

    pub(super) fn refuse(&mut self, why: String) {
        if self.refused.as_ref() != Some(&why) {
            warn!(
                "QubesDB: refused dom0's share: {why}; keeping the last good one (rules: {}, relays: {})",
                self.applied.rules.len(),
                self.applied.relays.len()
            );
            self.refused = Some(why);
        }
    }

    /// The relays of the share that run.
    pub(super) fn relays(&self) -> &[Relay] {
        &self.applied.relays
    }

    /// When the share must be resolved again for a deadline.
    pub(super) fn wakeup(&self) -> Option<tokio::time::Instant> {
        let next = self.applied.next_deadline?;
        let wait = next
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(tokio::time::Instant::now() + wait)
    }
}

/// Logs what changed between two resolutions of a share.
pub(super) fn log_changes(before: &Resolved, after: &Resolved) {
    for rule in after.rules.iter().filter(|r| !before.rules.contains(r)) {
        info!("QubesDB: forwarding {rule}");
    }
    for rule in before.rules.iter().filter(|r| !after.rules.contains(r)) {
        info!("QubesDB: no longer forwarding {}", rule.name());
    }
    for relay in after.relays.iter().filter(|r| !before.relays.contains(r)) {
        info!("QubesDB: relaying {relay}");
    }
    for relay in before.relays.iter().filter(|r| !after.relays.contains(r)) {
        info!("QubesDB: no longer relaying {}:{}", relay.group, relay.port);
    }
    for held in after.held.iter().filter(|h| !before.held.contains(h)) {
        warn!("QubesDB: not applied while {held}");
    }
}
