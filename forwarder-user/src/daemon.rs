//! `forwarder run`: attach, then follow rtnetlink until told to stop, then
//! remove everything this instance created.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use forwarder_common::maps::{UPLINK_UP, UplinkState};
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::RunConfig,
    datapath::{Datapath, Role},
    interfaces::{self, Interfaces},
    multicast::Memberships,
    netlink::{self, Event, Monitor},
    nft,
    pin::{self, Bpffs, PinLayout},
};

struct Daemon {
    config: RunConfig,
    datapath: Datapath,
    interfaces: Interfaces,
    uplink: UplinkState,
    memberships: Memberships,
    /// What DOWNSTREAM_MACS holds, as last written.
    downstream_macs: BTreeMap<u32, [u8; 6]>,
    /// Link pins a predecessor left are adopted at the first reconcile and
    /// only then may the rest be removed.
    first_reconcile: bool,
}

impl Daemon {
    /// Brings the datapath in line with the interfaces: the uplink state map,
    /// and one attachment per uplink/downstream interface.
    fn reconcile(&mut self) -> Result<()> {
        let state = self.interfaces.uplink_state(&self.config.uplink);
        if state != self.uplink || self.first_reconcile {
            self.datapath.tables.set_uplink(state)?;
            if state.ifindex == 0 {
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
            self.uplink = state;
        }
        let uplink_ifindex = if state.flags & UPLINK_UP != 0 {
            state.ifindex
        } else {
            0
        };
        for group in self.memberships.follow(uplink_ifindex)? {
            info!("joined {group} on {}", self.config.uplink);
        }

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
                    "adopted the pinned {} link on {name} (ifindex {ifindex})",
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
        if self.first_reconcile {
            self.first_reconcile = false;
            for path in self.datapath.remove_stale_link_pins()? {
                info!("removed stale pinned link {}", path.display());
            }
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

    async fn resync(&mut self) -> Result<()> {
        let (links, addresses) = netlink::dump()
            .await
            .context("dumping links and addresses")?;
        self.interfaces = Interfaces::new(links, addresses);
        self.reconcile()
    }

    async fn follow(&mut self, monitor: &mut Monitor) -> Result<()> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        loop {
            tokio::select! {
                events = monitor.next() => {
                    let events = events.context("reading rtnetlink")?;
                    if events.contains(&Event::Overflow) {
                        warn!("rtnetlink overflowed; resyncing");
                        self.resync().await?;
                        continue;
                    }
                    for event in &events {
                        self.interfaces.apply(event);
                    }
                    self.reconcile()?;
                }
                _ = sigint.recv() => { info!("SIGINT: stopping"); return Ok(()) }
                _ = sigterm.recv() => { info!("SIGTERM: stopping"); return Ok(()) }
            }
        }
    }
}

pub async fn run(config: RunConfig) -> Result<()> {
    let layout = PinLayout::new(&config.pin_dir);
    let bpffs = pin::prepare(&layout)?;
    if let Bpffs::Mounted(at) = &bpffs {
        warn!(
            "no bpffs covered {}; mounted one at {}. That mount is private to this mount \
             namespace: `forwarder inspect` run elsewhere (e.g. via another `ip netns exec`) \
             will not see it",
            layout.root.display(),
            at.display()
        );
    }
    let result = serve(config, &layout).await;
    if let Bpffs::Mounted(at) = &bpffs {
        match pin::unmount_if_empty(at) {
            Ok(true) => info!("unmounted the bpffs at {}", at.display()),
            Ok(false) => info!(
                "left the bpffs at {} mounted: it holds other pins",
                at.display()
            ),
            Err(err) => warn!("{err:#}"),
        }
    }
    result
}

async fn serve(config: RunConfig, layout: &PinLayout) -> Result<()> {
    let mut datapath = match Datapath::load(layout) {
        Ok(datapath) => datapath,
        Err(err) => {
            // Nothing is attached yet; leave no empty pin directories behind.
            let _ = layout.remove();
            return Err(err);
        }
    };
    let setup = (|| -> Result<()> {
        datapath.tables.sync_rules(&config.rules)?;
        for rule in &config.rules {
            info!("forwarding {rule}");
        }
        datapath.tables.sync_relays(&config.relays)?;
        for relay in &config.relays {
            info!("relaying {relay}");
        }
        nft::install(&config.uplink, &config.rules)?;
        info!(
            "nftables table ip {} keeps masquerade off the listen ports",
            nft::TABLE
        );
        Ok(())
    })();
    if let Err(err) = setup {
        if let Err(cleanup) = stop(datapath) {
            warn!("cleaning up after a failed start: {cleanup:#}");
        }
        return Err(err);
    }
    let memberships = Memberships::new(config.relays.iter().map(|r| r.group).collect());
    let mut daemon = Daemon {
        config,
        datapath,
        interfaces: Interfaces::default(),
        uplink: UplinkState::default(),
        memberships,
        downstream_macs: BTreeMap::new(),
        first_reconcile: true,
    };
    // Subscribe before the dump, so no change falls between the two.
    let served = async {
        let mut monitor = Monitor::subscribe().context("subscribing to rtnetlink")?;
        daemon.resync().await?;
        daemon.follow(&mut monitor).await
    }
    .await;
    let stopped = stop(daemon.datapath);
    served.and(stopped)
}

/// Removes every program, link, pin and nftables object of this instance.
fn stop(datapath: Datapath) -> Result<()> {
    let nft_result = nft::remove();
    let datapath_result = datapath.shutdown();
    nft_result.and(datapath_result)?;
    info!("removed all programs, links, pins and the nftables table");
    Ok(())
}
