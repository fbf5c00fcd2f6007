//! dom0's share in QubesDB, applied live. Each tree the QubesDB thread
//! reads is hostile input: parsed and checked as a whole against what the
//! router holds from elsewhere (see `router_share`), refused with what was
//! wrong while the last good share stays, or resolved against the routes
//! and applied: its rules through the rule book, the path `rules add` takes
//! (unchanged rules keep their flows), its relays here. Route and link
//! changes and the share's deadlines resolve the last good share again.

use std::time::SystemTime;

use anyhow::{Result, anyhow};
use log::{info, warn};
use tokio::sync::oneshot;

use super::{
    Daemon,
    qubesdb::{log_changes, max_groups, resolve},
    rule_changes::Update,
};
use crate::{
    qubesdb::{Tree, router_share},
    router_share as share,
    rules::{Relay, Rule},
    vm_config::router::RouterShare,
};

impl Daemon {
    /// The config's rules and the share's that run (not `rules add`'s,
    /// which the rule book alone holds): what the internal networks count.
    pub(super) fn rules_for_internal_nets(&self) -> Vec<Rule> {
        let mut rules = self.config.rules.clone();
        if let Some(q) = &self.qubesdb {
            rules.extend(q.applied.rules.iter().cloned());
        }
        rules
    }

    /// Every relay: the config's and the share's.
    pub(super) fn relays(&self) -> Vec<Relay> {
        let mut relays = self.config.relays.clone();
        if let Some(q) = &self.qubesdb {
            relays.extend(q.relays().iter().cloned());
        }
        relays
    }

    /// The next read of the QubesDB thread, or never without QubesDB.
    pub(super) async fn next_qubesdb_read(&mut self) -> Result<Tree, String> {
        match self.qubesdb.as_mut() {
            Some(q) => q.next_read().await,
            None => std::future::pending().await,
        }
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
        self.refresh_internal_nets()?;
        Ok(Ok(()))
    }
}
