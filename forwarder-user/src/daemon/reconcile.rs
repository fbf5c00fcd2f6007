//! The reconcile loop: the datapath brought in line with the interfaces
//! rtnetlink reports (uplink state, group memberships, one attachment per
//! uplink or downstream interface, downstream MACs), and at the first one
//! the takeover of what a predecessor left finished.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use forwarder_common::maps::UPLINK_UP;
use log::{info, warn};

use super::{Daemon, Takeover};
use crate::{
    adopt,
    datapath::{HookKind, Role},
    interfaces::{self, Interfaces},
    internal_nets::InternalNets,
    netlink::{self, Route, RouteMtu},
    teardown,
};

impl Daemon {
    /// Brings the uplink state map and the group memberships in line with
    /// the uplink.
    pub(super) fn follow_uplink(&mut self) -> Result<()> {
        let state = self.interfaces.uplink_state(&self.config.uplink);
        if self.uplink != Some(state) {
            self.datapath.tables.set_uplink(state)?;
            if self.config.uplink.is_empty() {
                warn!("no uplink until there is a default route; nothing is forwarded");
            } else if state.ifindex == 0 {
                warn!(
                    "uplink {} is absent; waiting for it to appear",
                    self.config.uplink
                );
            } else {
                info!(
                    "uplink {}: {}",
                    self.config.uplink,
                    interfaces::describe(&state)
                );
            }
            self.uplink = Some(state);
        }
        let uplink_ifindex = if state.flags & UPLINK_UP != 0 {
            state.ifindex
        } else {
            0
        };
        for group in self.memberships.follow(uplink_ifindex)? {
            info!("joined {group} on {}", self.config.uplink);
        }
        Ok(())
    }

    /// Brings the datapath in line with the interfaces: the uplink state map,
    /// and one attachment per uplink/downstream interface.
    pub(super) fn reconcile(&mut self) -> Result<()> {
        self.follow_uplink()?;

        let mut wanted: BTreeMap<u32, (Role, String)> = BTreeMap::new();
        if let Some(link) = self.interfaces.link_by_name(&self.config.uplink) {
            wanted.insert(link.index, (Role::Uplink, link.name.clone()));
        }
        for link in self
            .interfaces
            .downstream(&self.config.downstream, &self.config.uplink)
        {
            wanted.insert(link.index, (Role::Downstream, link.name.clone()));
        }

        let stale: Vec<u32> = self
            .datapath
            .attached()
            .iter()
            .filter(|(ifindex, a)| wanted.get(ifindex).is_none_or(|(role, _)| *role != a.role))
            .map(|(ifindex, _)| *ifindex)
            .collect();
        for ifindex in stale {
            let name = self.datapath.attached()[&ifindex].ifname.clone();
            self.datapath.detach(ifindex)?;
            info!("detached from {name} (ifindex {ifindex})");
        }
        for (ifindex, (role, name)) in wanted {
            if self.datapath.attached().contains_key(&ifindex) {
                continue;
            }
            match self.datapath.attach(ifindex, &name, role) {
                Ok(true) => info!(
                    "adopted the {} program's attachment on {name} (ifindex {ifindex})",
                    role.name()
                ),
                Ok(false) => info!(
                    "attached {} program to {name} (ifindex {ifindex})",
                    role.name()
                ),
                // The interface can vanish between the event and the attach;
                // its removal event follows and settles the state.
                Err(err) => warn!("cannot attach to {name} (ifindex {ifindex}): {err:#}"),
            }
        }
        self.sync_downstream_macs()?;
        self.refresh_internal_nets()?;
        if let Some(takeover) = self.takeover.take() {
            self.finish_takeover(&takeover)?;
        }
        Ok(())
    }

    /// Once every link runs this instance's programs: the flows the
    /// predecessor's programs opened meanwhile are carried over, and what
    /// it attached that this instance does not is removed (clsact filters
    /// no process holds, pinned links, records), with the maps set aside.
    fn finish_takeover(&mut self, takeover: &Takeover) -> Result<()> {
        if let Some(carried) =
            adopt::carry_over_again(&self.layout, &takeover.replaced, takeover.copied_from_ns)?
        {
            info!(
                "carried over {carried} flows opened or changed while the flow table was migrated"
            );
        }
        // Also where this instance attaches the other way (--tc-hook
        // changed): both would run.
        for (ifindex, (role, hook)) in &takeover.attachments {
            let ours = self.datapath.attached().get(ifindex).map(|a| a.kind());
            if ours == Some(*hook) {
                continue;
            }
            let removed = match hook {
                HookKind::Clsact => teardown::detach_clsact(*ifindex)?.is_some(),
                // Unpinning drops its last reference.
                HookKind::Tcx => {
                    let pin = self.layout.link_pin(role.name(), *ifindex);
                    pin.exists()
                        && std::fs::remove_file(&pin)
                            .with_context(|| format!("removing {}", pin.display()))
                            .map(|()| true)?
                }
            };
            if removed {
                info!(
                    "removed the {} program's {} attachment to ifindex {ifindex}, which a \
                     previous instance made and this one does not",
                    role.name(),
                    hook.name()
                );
            }
        }
        for path in self.datapath.remove_stale()? {
            info!("removed stale pinned link {}", path.display());
        }
        Ok(())
    }

    /// Keeps DOWNSTREAM_MACS equal to the MACs of the attached downstream
    /// interfaces, which relay copies toward VMs use as source.
    fn sync_downstream_macs(&mut self) -> Result<()> {
        let wanted: BTreeMap<u32, [u8; 6]> = self
            .datapath
            .attached()
            .iter()
            .filter(|(_, a)| a.role == Role::Downstream)
            .filter_map(|(ifindex, _)| Some((*ifindex, self.interfaces.link(*ifindex)?.mac?)))
            .collect();
        for ifindex in self.downstream_macs.keys() {
            if !wanted.contains_key(ifindex) {
                self.datapath.tables.remove_downstream_mac(*ifindex)?;
            }
        }
        for (ifindex, mac) in &wanted {
            if self.downstream_macs.get(ifindex) != Some(mac) {
                self.datapath.tables.set_downstream_mac(*ifindex, *mac)?;
            }
        }
        self.downstream_macs = wanted;
        Ok(())
    }

    /// Dumps links and addresses afresh (at start, and after the event
    /// stream overflowed).
    pub(super) async fn dump(&mut self) -> Result<()> {
        let (links, addresses) = netlink::dump()
            .await
            .context("dumping links and addresses")?;
        self.interfaces = Interfaces::new(links, addresses);
        Ok(())
    }

    /// Reconciles with what the interfaces are now (after the event stream
    /// overflowed) and forgets every FIB result the datapath cached.
    pub(super) async fn resync(&mut self) -> Result<()> {
        self.dump().await?;
        self.reconcile()?;
        self.refresh_route_mtus().await?;
        self.datapath.tables.bump_fib_generation()
    }

    /// Copies the MTUs routes set into the datapath, and the internal
    /// networks the routes out of the downstream interfaces make; the
    /// caller then bumps the FIB generation, so no cached route keeps an
    /// old MTU.
    pub(super) async fn refresh_route_mtus(&mut self) -> Result<()> {
        let routes = netlink::routes().await.context("dumping routes")?;
        let mtus: Vec<RouteMtu> = routes.iter().filter_map(Route::mtu).collect();
        self.datapath.tables.sync_route_mtus(&mtus)?;
        self.routes = routes;
        self.refresh_internal_nets()
    }

    /// Keeps INTERNAL_NETS equal to what the router knows of its
    /// downstream side (see `internal_nets`): the relays toward the LAN
    /// refuse any datagram that names one of these addresses.
    pub(super) fn refresh_internal_nets(&mut self) -> Result<()> {
        let downstream: Vec<u32> = self
            .datapath
            .attached()
            .iter()
            .filter(|(_, a)| a.role == Role::Downstream)
            .map(|(ifindex, _)| *ifindex)
            .collect();
        let routes: Vec<(Ipv4Addr, u8)> = self
            .routes
            .iter()
            .filter(|r| r.oif.is_some_and(|oif| downstream.contains(&oif)))
            .map(|r| (r.dst, r.prefix_len))
            .collect();
        let addresses: Vec<Ipv4Addr> = downstream
            .iter()
            .flat_map(|ifindex| self.interfaces.addresses_of(*ifindex))
            .collect();
        let nets = InternalNets::gather(
            &self.rules_for_internal_nets(),
            &self.relays(),
            &routes,
            &addresses,
            &[],
        );
        if self.internal_nets.as_ref() != Some(&nets) {
            self.datapath.tables.sync_internal_nets(&nets)?;
            info!("internal networks, never named in a relayed datagram: {nets}");
            self.internal_nets = Some(nets);
        }
        Ok(())
    }
}
