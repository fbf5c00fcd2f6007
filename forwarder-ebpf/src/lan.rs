//! What the uplink side may claim as the LAN's: a plausible LAN source, and
//! the destinations a relay answers for there. Both the forward rules and
//! the relays judge LAN packets by these.

use forwarder_common::{
    maps::{BROADCAST, UplinkState, is_multicast},
    reason::Reason,
};

use crate::parse::Ipv4;

/// Sources no LAN host may legitimately use: this network, loopback,
/// multicast, reserved and limited broadcast.
#[inline(always)]
pub fn is_martian(addr: u32) -> bool {
    let first = addr.to_ne_bytes()[0];
    first == 0 || first == 127 || first >= 224
}

/// No LAN host may use a martian source or the router's own address.
#[inline(always)]
pub fn plausible_source(ip: &Ipv4, uplink: &UplinkState) -> Result<(), Reason> {
    if is_martian(ip.saddr) || ip.saddr == uplink.addr {
        return Err(Reason::MartianSource);
    }
    Ok(())
}

/// Whether `daddr` is a relay's business on the uplink: the group itself,
/// or the broadcast group for a limited or directed broadcast.
#[inline(always)]
pub fn relay_group(daddr: u32, uplink: &UplinkState) -> Option<u32> {
    if is_multicast(daddr) || daddr == BROADCAST {
        return Some(daddr);
    }
    let mask = uplink.netmask();
    (uplink.prefix_len < 31 && daddr == uplink.addr | !mask).then_some(BROADCAST)
}
