//! The uplink of a Qubes router started without one: the interface of the
//! default route, followed as it moves (sys-net's NetworkManager switching
//! from Wi-Fi to Ethernet). Without a default route the last uplink stays,
//! and before the first one there is none: nothing is forwarded.

use anyhow::{Result, anyhow};
use log::{info, warn};

use super::{Daemon, rule_changes::Update};
use crate::{config::RunConfig, default_route};

/// The default route's interface now, logging a failure to read it.
fn current() -> Option<String> {
    default_route::interface().unwrap_or_else(|err| {
        warn!("reading the default route: {err}");
        None
    })
}

/// At start: the uplink is the default route's interface, if there is one.
pub(super) fn pick(config: &mut RunConfig) {
    if !config.follow_default_route {
        return;
    }
    match current() {
        Some(uplink) => {
            info!("uplink {uplink}: the interface of the default route");
            config.uplink = uplink;
        }
        None => info!("no default route yet: the uplink will be the interface of the first one"),
    }
}

impl Daemon {
    /// Moves the uplink to the default route's interface when that changed.
    pub(super) async fn follow_default_route(&mut self) -> Result<()> {
        if !self.config.follow_default_route {
            return Ok(());
        }
        let Some(uplink) = current() else {
            return Ok(());
        };
        if uplink == self.config.uplink {
            return Ok(());
        }
        info!(
            "the default route now leaves through {uplink}: it is the uplink{}",
            if self.config.uplink.is_empty() {
                String::new()
            } else {
                format!(" instead of {}", self.config.uplink)
            }
        );
        self.config.uplink.clone_from(&uplink);
        self.updates
            .send(Update::Uplink(uplink))
            .await
            .map_err(|_| anyhow!("the rule book stopped"))?;
        self.reconcile()
    }
}
