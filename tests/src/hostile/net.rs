//! What the test-run harness's namespace (see `testrun::Harness`) answers
//! to the datapath's FIB lookups: its routes, local and broadcast
//! addresses, neighbours and MTU, written down from how the harness builds
//! it, so the oracle can say where each lookup goes without asking the
//! kernel.

use std::net::Ipv4Addr;

use crate::{
    packet::Mac,
    testrun::{
        GATEWAY, GATEWAY_MAC, Harness, LAN_PEER, LAN_PEER_MAC, OTHER_VM, OTHER_VM_MAC, TARGET,
        TARGET_MAC, UNRESOLVED, UPLINK_ADDR, VIF_ADDR,
    },
};

/// Every veth's MTU.
pub const MTU: u16 = 1500;
/// The longest frame a device forwards (`is_skb_forwardable`: the MTU,
/// the Ethernet header and a VLAN tag's worth). A FIB lookup without a
/// length of its own checks the packet against it.
pub const MAX_FORWARDABLE_FRAME: usize = MTU as usize + 14 + 4;

/// Where a routed destination goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    /// The egress device's MAC.
    pub smac: Mac,
    /// The next hop's MAC; None when the namespace has no neighbour entry.
    pub dmac: Option<Mac>,
}

/// The harness's interfaces, as the FIB names them.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    pub uplink: u32,
    pub uplink_mac: Mac,
    pub vif1: u32,
    pub vif1_mac: Mac,
    pub vif2: u32,
    pub vif2_mac: Mac,
}

impl Net {
    pub fn of(h: &Harness) -> Self {
        Net {
            uplink: h.uplink.index,
            uplink_mac: h.uplink.mac,
            vif1: h.vif1.index,
            vif1_mac: h.vif1.mac,
            vif2: h.vif2.index,
            vif2_mac: h.vif2.mac,
        }
    }

    /// The route to `daddr`: None where the kernel would not forward
    /// (a local or broadcast destination).
    pub fn route(&self, daddr: Ipv4Addr) -> Option<Hop> {
        let lan = |dmac| Hop {
            ifindex: self.uplink,
            smac: self.uplink_mac,
            dmac,
        };
        if daddr == UPLINK_ADDR || daddr == VIF_ADDR || daddr.is_loopback() {
            return None;
        }
        if daddr == Ipv4Addr::new(192, 168, 1, 255) {
            return None;
        }
        let (vif1, vif2) = (
            |dmac| Hop {
                ifindex: self.vif1,
                smac: self.vif1_mac,
                dmac,
            },
            |dmac| Hop {
                ifindex: self.vif2,
                smac: self.vif2_mac,
                dmac,
            },
        );
        Some(match daddr {
            TARGET => vif1(Some(TARGET_MAC)),
            UNRESOLVED => vif1(None),
            OTHER_VM => vif2(Some(OTHER_VM_MAC)),
            GATEWAY => lan(Some(GATEWAY_MAC)),
            LAN_PEER => lan(Some(LAN_PEER_MAC)),
            _ if daddr.octets()[..3] == [192, 168, 1] => lan(None),
            // The default route, through the gateway.
            _ => lan(Some(GATEWAY_MAC)),
        })
    }

    /// The MAC of the downstream interface `ifindex`, as the daemon
    /// records it in DOWNSTREAM_MACS.
    pub fn downstream_mac(&self, ifindex: u32) -> Option<Mac> {
        if ifindex == self.vif1 {
            Some(self.vif1_mac)
        } else if ifindex == self.vif2 {
            Some(self.vif2_mac)
        } else {
            None
        }
    }
}
