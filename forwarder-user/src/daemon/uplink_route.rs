//! The uplink of a Qubes router started without one: the interface of the
//! default route, followed as it moves (sys-net's NetworkManager switching
//! from Wi-Fi to Ethernet). Without a default route the last uplink stays,
//! and before the first one there is none: nothing is forwarded.

use anyhow::{Result, anyhow};
use log::{info, warn};

use super::{Daemon, rule_changes::Update};
use crate::default_route;

impl Daemon {
    /// Moves the uplink to the default route's interface when that changed.
    pub(super) async fn follow_default_route(&mut self) -> Result<()> {
        if !self.config.follow_default_route {
            return Ok(());
        }
        let uplink = match default_route::interface() {
            Ok(Some(uplink)) => uplink,
            Ok(None) => return Ok(()),
            Err(err) => {
                warn!("reading the default route: {err}");
                return Ok(());
            }
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
