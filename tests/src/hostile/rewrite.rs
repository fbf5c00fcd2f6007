//! The exact bytes of what the programs write: a translated packet, and a
//! relay's copies. Each edit is done as the programs do it and in their
//! order, the IP header checksum with forwarder_common::csum (as the
//! programs update it) and the transport checksum as the kernel helper
//! does (see kernel_csum), since an incremental update can leave either
//! one's-complement zero and the order of updates decides which.

use std::net::Ipv4Addr;

use forwarder_common::csum;

use super::{
    kernel_csum::l4_replace,
    parse::{ETH_HLEN, Ip, L4, L4_OFF},
};
use crate::packet::{Mac, UDP};

/// Which end of a packet a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

fn ip_check(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[ETH_HLEN + 10], frame[ETH_HLEN + 11]])
}

fn set_ip_check(frame: &mut [u8], check: u16) {
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&check.to_be_bytes());
}

/// `nat::set_addr`: the address, the IP checksum and, when the packet has
/// a transport header, its checksum over the pseudo header.
pub fn set_addr(frame: &mut [u8], ip: &Ip, l4: Option<&L4>, end: End, new: Ipv4Addr) {
    let at = ETH_HLEN
        + match end {
            End::Source => 12,
            End::Destination => 16,
        };
    let old: [u8; 4] = frame[at..at + 4].try_into().expect("4 bytes");
    set_ip_check(frame, csum::update_addr(ip_check(frame), old, new.octets()));
    frame[at..at + 4].copy_from_slice(&new.octets());
    if let Some(l4) = l4 {
        let check = [frame[l4.check_off], frame[l4.check_off + 1]];
        let new_check = l4_replace(check, &old, &new.octets(), ip.proto == UDP);
        frame[l4.check_off..l4.check_off + 2].copy_from_slice(&new_check);
    }
}

/// `nat::set_port`: nothing at all when the port stays.
pub fn set_port(frame: &mut [u8], ip: &Ip, l4: &L4, end: End, new: u16) {
    let at = L4_OFF
        + match end {
            End::Source => 0,
            End::Destination => 2,
        };
    let old = [frame[at], frame[at + 1]];
    if old == new.to_be_bytes() {
        return;
    }
    frame[at..at + 2].copy_from_slice(&new.to_be_bytes());
    let check = [frame[l4.check_off], frame[l4.check_off + 1]];
    let new_check = l4_replace(check, &old, &new.to_be_bytes(), ip.proto == UDP);
    frame[l4.check_off..l4.check_off + 2].copy_from_slice(&new_check);
}

/// `nat::set_ttl`.
pub fn set_ttl(frame: &mut [u8], ttl: u8) {
    let (old_ttl, proto) = (frame[ETH_HLEN + 8], frame[ETH_HLEN + 9]);
    let check = csum::update_word(
        ip_check(frame),
        u16::from_be_bytes([old_ttl, proto]),
        u16::from_be_bytes([ttl, proto]),
    );
    set_ip_check(frame, check);
    frame[ETH_HLEN + 8] = ttl;
}

pub fn set_macs(frame: &mut [u8], dst: Mac, src: Mac) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
}

/// `nat::translate` and the redirect's MACs: the packet as a forward
/// rule's rewrite leaves it. `macs` is None when the neighbour is
/// unresolved (`bpf_redirect_neigh` writes them later).
pub fn translated(
    frame: &[u8],
    ip: &Ip,
    l4: &L4,
    end: End,
    addr: Ipv4Addr,
    port: u16,
    macs: Option<(Mac, Mac)>,
) -> Vec<u8> {
    let mut out = frame.to_vec();
    set_ttl(&mut out, ip.ttl - 1);
    set_port(&mut out, ip, l4, end, port);
    set_addr(&mut out, ip, Some(l4), end, addr);
    if let Some((dst, src)) = macs {
        set_macs(&mut out, dst, src);
    }
    out
}

/// A copy toward the LAN: the uplink's address as source, `ttl`, the
/// group's MAC from the uplink's.
pub fn copy_up(
    frame: &[u8],
    ip: &Ip,
    l4: Option<&L4>,
    uplink: Ipv4Addr,
    ttl: u8,
    macs: (Mac, Mac),
) -> Vec<u8> {
    let mut out = frame.to_vec();
    set_addr(&mut out, ip, l4, End::Source, uplink);
    set_ttl(&mut out, ttl);
    set_macs(&mut out, macs.0, macs.1);
    out
}

/// The packet as a LAN datagram's copies toward the VMs start from: its
/// destination rewritten to the relay's group (to itself, for a group),
/// before each copy gets its MACs.
pub fn toward_vms(frame: &[u8], ip: &Ip, l4: Option<&L4>, group: Ipv4Addr) -> Vec<u8> {
    let mut out = frame.to_vec();
    set_addr(&mut out, ip, l4, End::Destination, group);
    out
}
