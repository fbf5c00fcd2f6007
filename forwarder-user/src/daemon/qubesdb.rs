//! dom0's share in QubesDB, followed live. A thread of its own reads and
//! watches `/vm-config/` (`qubesdb::Follower`, which blocks) and hands each
//! tree to the event loop. Each tree is hostile input: parsed and checked
//! as a whole against what the router holds from elsewhere (see
//! `router_share`), refused with what was wrong while the last good share
//! stays, or resolved against the routes and applied: its rules through the
//! rule book, the path `rules add` takes (unchanged rules keep their
//! flows), its relays here. Route and link changes and the share's
//! deadlines resolve the last good share again.

use std::time::{Duration, SystemTime};

use anyhow::{Result, anyhow};
use log::{debug, info, warn};
use tokio::sync::{mpsc, oneshot};

use super::{Daemon, rule_changes::Update};
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
    good: Option<RouterShare>,
    /// What of it runs.
    applied: Resolved,
    /// The feed's last error, logged once.
    feed_error: Option<String>,
    /// Why the last share was refused, logged once.
    refused: Option<String>,
}

/// The sysctl's limit on the groups one socket joins, when readable.
fn max_groups() -> Option<u32> {
    multicast::max_memberships().ok()
}

/// What `share` runs now on this router.
fn resolve(config: &RunConfig, share: &RouterShare, now: SystemTime) -> Resolved {
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

    /// The tree of a read, or `None` after logging (once) why there is none.
    fn tree(&mut self, read: Result<Tree, String>) -> Option<Tree> {
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

    fn refuse(&mut self, why: String) {
        if self.refused.as_ref() != Some(&why) {
            warn!(
                "QubesDB: refused dom0's share: {why}; keeping the last good one ({} rules, {} relays)",
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
fn log_changes(before: &Resolved, after: &Resolved) {
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

/// The next tree, or never without QubesDB (or once its thread stopped).
pub(super) async fn next_tree(qubesdb: Option<&mut Qubesdb>) -> Result<Tree, String> {
    match qubesdb {
        Some(q) => match q.feed.recv().await {
            Some(read) => read,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// Every relay: the config's and the share's.
    pub(super) fn relays(&self) -> Vec<Relay> {
        let mut relays = self.config.relays.clone();
        if let Some(q) = &self.qubesdb {
            relays.extend(q.relays().iter().cloned());
        }
        relays
    }

    /// A tree the QubesDB thread read: a new share is checked, then
    /// applied or refused.
    pub(super) async fn take_tree(&mut self, read: Result<Tree, String>) -> Result<()> {
        let Some(q) = self.qubesdb.as_mut() else {
            return Ok(());
        };
        let Some(tree) = q.tree(read) else {
            return Ok(());
        };
        let now = SystemTime::now();
        let checked = router_share(&tree).and_then(|s| {
            share::check_relays(&s, &self.config.relays, max_groups(), now)?;
            Ok(s)
        });
        let candidate = match checked {
            Ok(candidate) => candidate,
            Err(why) => {
                q.refuse(why);
                return Ok(());
            }
        };
        if q.good.as_ref() == Some(&candidate) {
            return Ok(());
        }
        match self.install(&candidate, now).await? {
            Ok(()) => {
                let q = self.qubesdb.as_mut().expect("checked above");
                q.good = Some(candidate);
                if q.refused.take().is_some() {
                    info!("QubesDB: dom0's share is good again");
                }
            }
            Err(why) => self.qubesdb.as_mut().expect("checked above").refuse(why),
        }
        Ok(())
    }

    /// Resolves the last good share again (routes changed, or one of its
    /// deadlines passed) and applies what changed.
    pub(super) async fn reresolve_qubesdb(&mut self) -> Result<()> {
        let Some(good) = self.qubesdb.as_ref().and_then(|q| q.good.clone()) else {
            return Ok(());
        };
        if let Err(why) = self.install(&good, SystemTime::now()).await? {
            warn!("QubesDB: cannot apply dom0's share as the routes now stand: {why}");
        }
        Ok(())
    }

    /// Resolves `share` and applies what changed: rules through the rule
    /// book (which refuses a clash with its other rules), then relays.
    /// The outer error is the daemon's own failure; the inner one a share
    /// refused.
    async fn install(
        &mut self,
        share: &RouterShare,
        now: SystemTime,
    ) -> Result<Result<(), String>> {
        let resolved = resolve(&self.config, share, now);
        let applied = &self.qubesdb.as_ref().expect("QubesDB is followed").applied;
        if resolved == *applied {
            return Ok(Ok(()));
        }
        let (reply, answer) = oneshot::channel();
        let update = Update::Qubesdb {
            all: share::all_rules(share, now),
            apply: resolved.rules.clone(),
            reply,
        };
        self.updates
            .send(update)
            .await
            .map_err(|_| anyhow!("the rule book stopped"))?;
        if let Err(why) = answer
            .await
            .map_err(|_| anyhow!("the rule book stopped before answering"))?
        {
            return Ok(Err(why));
        }
        let q = self.qubesdb.as_mut().expect("QubesDB is followed");
        log_changes(&q.applied, &resolved);
        let relays_changed = q.applied.relays != resolved.relays;
        q.applied = resolved;
        if relays_changed {
            let relays = self.relays();
            self.datapath.tables.sync_relays(&relays)?;
            if self
                .memberships
                .set_groups(relays.iter().map(|r| r.group).collect())
            {
                self.follow_uplink()?;
            }
        }
        Ok(Ok(()))
    }
}
