//! What one program run observably did beyond its return value: the relay
//! copies that came out of the harness's veths (read on their far ends:
//! lan0 behind the uplink, vm1 and vm2 behind the vifs) and the table
//! entries it left, read straight from the program's own maps. A clone is
//! delivered to the far end's packet sockets before BPF_PROG_TEST_RUN
//! returns (the veth transmit runs the receive softirq as it leaves its
//! bottom-half section), so what a run copied is there to read right after
//! it.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use forwarder::datapath::Role;
use forwarder_common::maps::{
    FlowEntry, FlowKey, FragmentKey, FragmentTrain, RouteEntry, RouteKey, names,
};

use crate::{capture, packet::UDP, testrun::Harness};

/// A packet socket on one far end.
struct Tap {
    fd: OwnedFd,
}

impl Tap {
    fn open(h: &Harness, ifname: &str) -> Result<Self> {
        let fd = h.ns.run(|| capture::open(ifname))?;
        // SAFETY: a socket this process just opened and owns alone.
        Ok(Tap {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The next relay copy queued, if any: IPv4 UDP only (the veths' own
    /// IPv6 chatter is not the datapath's).
    fn next(&self, wait: bool) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd as _;
        let mut buf = vec![0u8; 65536];
        loop {
            let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
            // SAFETY: buf is valid for its length; the socket is ours.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                )
            };
            if n <= 0 {
                return None;
            }
            let frame = &buf[..n as usize];
            if frame.len() >= 34 && frame[12..14] == [0x08, 0x00] && frame[23] == UDP {
                return Some(frame.to_vec());
            }
        }
    }
}

/// Relay copies seen on the far ends.
#[derive(Debug, Default)]
pub struct Copies {
    pub up: Vec<Vec<u8>>,
    /// By the interface they left: vif1 or vif2.
    pub down: Vec<(u32, Vec<u8>)>,
}

pub struct Taps {
    lan: Tap,
    vms: [(u32, Tap); 2],
}

impl Taps {
    pub fn open(h: &Harness) -> Result<Self> {
        Ok(Taps {
            lan: Tap::open(h, "lan0")?,
            vms: [
                (h.vif1.index, Tap::open(h, "vm1")?),
                (h.vif2.index, Tap::open(h, "vm2")?),
            ],
        })
    }

    /// Every copy queued now.
    pub fn drain(&self, into: &mut Copies) {
        while let Some(frame) = self.lan.next(false) {
            into.up.push(frame);
        }
        for (ifindex, tap) in &self.vms {
            while let Some(frame) = tap.next(false) {
                into.down.push((*ifindex, frame));
            }
        }
    }

    /// Waits (up to a second) until `into` holds at least `up` copies out
    /// of the uplink and `down` toward the VMs.
    pub fn wait_for(&self, into: &mut Copies, up: usize, down: usize) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while (into.up.len() < up || into.down.len() < down) && Instant::now() < deadline {
            if into.up.len() < up
                && let Some(frame) = self.lan.next(true)
            {
                into.up.push(frame);
            }
            if into.down.len() < down {
                for (ifindex, tap) in &self.vms {
                    if let Some(frame) = tap.next(true) {
                        into.down.push((*ifindex, frame));
                    }
                }
            }
        }
    }
}

/// The tables the oracle mirrors, opened from the programs' own maps.
pub struct Maps {
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    fragments: HashMap<MapData, FragmentKey, FragmentTrain>,
    buckets: Array<MapData, u64>,
    routes: HashMap<MapData, RouteKey, RouteEntry>,
}

impl Maps {
    pub fn open(h: &Harness) -> Result<Self> {
        let ids = h
            .datapath
            .program(Role::Downstream)?
            .info()?
            .map_ids()?
            .context("the kernel lists no maps of the program")?;
        let mut found = std::collections::HashMap::new();
        for id in ids {
            let data = MapData::from_id(id)?;
            let name = data.info()?.name_as_str().unwrap_or_default().to_string();
            found.insert(name, data);
        }
        let mut take = |name: &str| -> Result<Map> {
            let data = found
                .remove(name)
                .with_context(|| format!("the downstream program uses no map {name}"))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Maps {
            flows: take(names::FLOWS)?.try_into()?,
            fragments: take(names::FRAGMENTS)?.try_into()?,
            buckets: take(names::RELAY_BUCKETS)?.try_into()?,
            routes: take(names::ROUTE_CACHE)?.try_into()?,
        })
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.get(key, 0).ok()
    }

    pub fn train(&self, key: &FragmentKey) -> Option<FragmentTrain> {
        self.fragments.get(key, 0).ok()
    }

    pub fn bucket(&self, index: u32) -> Result<u64> {
        Ok(self.buckets.get(&index, 0)?)
    }

    /// Whether ROUTE_CACHE answers `key` for FIB generation `generation`.
    pub fn cached(&self, key: &RouteKey, generation: u32) -> bool {
        self.routes
            .get(key, 0)
            .is_ok_and(|entry| entry.generation == generation)
    }

    pub fn all_flows(&self) -> Result<Vec<(FlowKey, FlowEntry)>> {
        self.flows.iter().map(|e| e.map_err(Into::into)).collect()
    }

    pub fn all_trains(&self) -> Result<Vec<(FragmentKey, FragmentTrain)>> {
        self.fragments
            .iter()
            .map(|e| e.map_err(Into::into))
            .collect()
    }
}
