//! Fragment trains, up (a VM's datagram to a relay group, on its vif) and
//! down (a LAN host's, on the uplink): fragmented as a sender's stack does,
//! then bent: fragments swapped, dropped, repeated, moved back over their
//! predecessor, cut off the 8-byte grid, pushed past 64 KiB, sent from
//! another address, with another IP id or on another interface, and
//! oversized; a last fragment held back past the train's lifetime. The
//! generator interleaves the trains with each other and everything else.

use std::net::Ipv4Addr;

use forwarder::datapath::Role;
use forwarder_common::{csum, maps::group_mac};

use super::{
    case::{Case, Claim},
    payloads,
    rng::Rng,
    setup::relay_groups,
};
use crate::{
    packet::{self, Frame},
    testrun::{Harness, LAN_PEER, LAN_PEER_MAC, OTHER_VM, TARGET, UNRESOLVED},
};

/// IP ids of generated trains: few, so trains collide with each other and
/// the fragment table's keys stay far below its capacity (an LRU map that
/// evicted entries would make the oracle guess).
const IDS: [u16; 8] = [1, 2, 3, 0x1234, 0x8000, 0xfffe, 0xffff, 77];

/// LAN senders of trains going down.
const LAN_SENDERS: [Ipv4Addr; 4] = [
    LAN_PEER,
    Ipv4Addr::new(192, 168, 1, 77),
    Ipv4Addr::new(192, 168, 7, 7),
    Ipv4Addr::new(10, 137, 0, 5),
];

/// A fragment's IP header fields after bending.
fn set_ip(frag: &mut [u8], edit: impl FnOnce(&mut [u8])) {
    edit(&mut frag[14..34]);
    frag[24..26].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&frag[14..34]);
    frag[24..26].copy_from_slice(&c.to_be_bytes());
}

fn offset_of(frag: &[u8]) -> u16 {
    u16::from_be_bytes([frag[20], frag[21]]) & 0x1fff
}

fn set_offset(frag: &mut [u8], offset: u16) {
    let more = frag[20] & 0x20;
    set_ip(frag, |ip| {
        ip[6..8].copy_from_slice(&(offset & 0x1fff).to_be_bytes());
        ip[6] |= more;
    });
}

/// Splits an IP payload at the given byte lengths (the last takes the
/// rest) into fragments of `whole`, which must be an untagged IPv4 frame.
fn split_at(whole: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let (eth, rest) = whole.split_at(14);
    let (header, payload) = rest.split_at(20);
    let mut out = Vec::new();
    let mut at = 0;
    for (i, &size) in sizes.iter().enumerate() {
        if at >= payload.len() {
            break;
        }
        let last = i + 1 == sizes.len() || at + size >= payload.len();
        let end = if last { payload.len() } else { at + size };
        let chunk = &payload[at..end];
        let mut h = header.to_vec();
        h[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
        let field = (at / 8) as u16 | if last { 0 } else { 0x2000 };
        h[6..8].copy_from_slice(&field.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = csum::checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        out.push([eth, &h, chunk].concat());
        if last {
            break;
        }
        at = end;
    }
    out
}

/// One train, as the cases to feed in order, and a case to hold back
/// past the train's lifetime, if any.
pub fn generate(h: &Harness, rng: &mut Rng, datagram: u64) -> (Vec<Case>, Option<Case>) {
    let up = rng.chance(55);
    let (group, port) = rng.pick(&relay_groups());
    let payload = payloads::generate(rng);
    let (role, ifindex, saddr) = if up {
        let (saddr, ifindex) = rng.pick(&[
            (TARGET, h.vif1.index),
            (TARGET, h.vif1.index),
            (OTHER_VM, h.vif2.index),
            (UNRESOLVED, h.vif1.index),
            (OTHER_VM, h.vif1.index),
        ]);
        (Role::Downstream, ifindex, saddr)
    } else {
        (Role::Uplink, h.uplink.index, rng.pick(&LAN_SENDERS))
    };
    let daddr = if !up && group == Ipv4Addr::BROADCAST && rng.chance(50) {
        Ipv4Addr::new(192, 168, 1, 255)
    } else {
        group
    };
    let mut frame =
        Frame::udp(saddr, 40000 + rng.below(64) as u16, daddr, port).with_payload(&payload.bytes);
    frame.ip_id = rng.pick(&IDS);
    frame.ttl = rng.pick(&[1, 2, 64]);
    frame.dst_mac = if daddr == group && group != Ipv4Addr::BROADCAST {
        group_mac(u32::from_ne_bytes(group.octets()))
    } else {
        [0xff; 6]
    };
    if !up {
        frame.src_mac = if rng.chance(5) {
            h.uplink.mac
        } else {
            LAN_PEER_MAC
        };
    }
    frame.udp_no_checksum = rng.chance(10);
    let whole = frame.build();
    let payload_len = whole.len() - 34;
    let mut frags = match rng.below(5) {
        // As a stack cuts it, for some MTU.
        0..=2 => {
            let size = rng.pick(&[8, 16, 64, 256, 552, 1176, 1480, 1480, 1488]);
            packet::fragments(&whole, size)
        }
        // Cut anywhere, off the 8-byte grid too.
        3 => {
            let mut sizes = Vec::new();
            let mut left = payload_len;
            while left > 0 && sizes.len() < 12 {
                let size = (1 + rng.below(1480) as usize).min(left);
                let size = if rng.chance(70) {
                    size.div_ceil(8) * 8
                } else {
                    size
                };
                sizes.push(size);
                left = left.saturating_sub(size);
            }
            split_at(&whole, &sizes)
        }
        // Two pieces cut right where the payload's last addresses could
        // be, the first on the grid.
        _ => {
            let cut = (payload_len.saturating_sub(8 + rng.below(24) as usize) / 8) * 8;
            split_at(&whole, &[cut.max(8), payload_len])
        }
    };
    if frags.len() < 2 {
        // Too short to split: a lone first fragment, or a lone last one.
        let mut only = whole.clone();
        set_ip(&mut only, |ip| {
            let field: u16 = if rng.chance(50) { 0x2000 } else { 0x0010 };
            ip[6..8].copy_from_slice(&field.to_be_bytes());
        });
        frags = vec![only];
    }
    let other_vif = if ifindex == h.vif1.index {
        h.vif2.index
    } else {
        h.vif1.index
    };
    let mut frags: Vec<(u32, Vec<u8>)> = frags.into_iter().map(|f| (ifindex, f)).collect();
    bend(rng, &mut frags, up.then_some(other_vif));
    let held = if frags.len() > 1 && rng.chance(4) {
        frags.pop()
    } else {
        None
    };
    let case = |(ifindex, frame): (u32, Vec<u8>), claim: Option<Claim>| Case {
        role,
        ifindex,
        frame,
        label: if up { "train up" } else { "train down" },
        claim,
    };
    let n = frags.len();
    // A VM's whole datagram naming an internal address must not reach the
    // LAN: claimed only for an unbent train, whose fragments are all its
    // datagram's, in order.
    let intact = n == packet_count(payload_len, &frags) && held.is_none();
    let claims = up && intact && payload.names_internal;
    let cases = frags
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let claim = claims.then_some(Claim {
                datagram,
                last: i + 1 == n,
            });
            case(f, claim)
        })
        .collect();
    (cases, held.map(|f| case(f, None)))
}

/// How many fragments a train has if each follows the one before: the
/// claim that the last completes the datagram holds only then.
fn packet_count(payload_len: usize, frags: &[(u32, Vec<u8>)]) -> usize {
    let mut next = 0;
    for (i, (_, f)) in frags.iter().enumerate() {
        let len = f.len() - 34;
        if usize::from(offset_of(f)) * 8 != next {
            return usize::MAX;
        }
        next += len;
        if f[20] & 0x20 == 0 {
            return if next == payload_len {
                i + 1
            } else {
                usize::MAX
            };
        }
    }
    usize::MAX
}

/// Bends a train: the changes a hostile sender, or a lossy network, makes.
/// `other_vif` is where a VM's fragment may be moved to.
fn bend(rng: &mut Rng, frags: &mut Vec<(u32, Vec<u8>)>, other_vif: Option<u32>) {
    let n = frags.len();
    if n < 2 || rng.chance(40) {
        return;
    }
    let i = 1 + rng.below(n as u64 - 1) as usize;
    match rng.below(9) {
        0 => frags.swap(i - 1, i),
        1 => {
            frags.remove(i);
        }
        2 => {
            let again = frags[i - 1].clone();
            frags.insert(i, again);
        }
        // Back over the fragment before: an overlap.
        3 => {
            let offset = offset_of(&frags[i].1);
            set_offset(&mut frags[i].1, offset.saturating_sub(1));
        }
        // Past the end of any datagram.
        4 => set_offset(&mut frags[i].1, 8190),
        // From another host, with another id, or on another interface.
        5 => {
            let spoofed = rng.pick(&[TARGET, OTHER_VM, LAN_PEER, Ipv4Addr::new(192, 168, 1, 66)]);
            set_ip(&mut frags[i].1, |ip| {
                ip[12..16].copy_from_slice(&spoofed.octets())
            });
        }
        6 => {
            let id = rng.pick(&IDS);
            set_ip(&mut frags[i].1, |ip| {
                ip[4..6].copy_from_slice(&id.to_be_bytes())
            });
        }
        7 => {
            if let Some(vif) = other_vif {
                frags[i].0 = vif;
            }
        }
        // The whole train again, as a retransmission would.
        _ => {
            let again = frags.clone();
            frags.extend(again);
        }
    }
}
