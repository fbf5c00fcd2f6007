//! A frame read the way the programs read it (forwarder-ebpf's parse.rs):
//! the same fields, the same order of checks, the same reason for each
//! refusal. BPF_PROG_TEST_RUN hands the programs a linear skb, so every
//! byte of the frame is in reach, Ethernet padding past the IP total length
//! included.

use std::net::Ipv4Addr;

use forwarder_common::{
    flow::{Segment, TCP_SYN},
    reason::Reason,
};

use crate::packet::{TCP, UDP};

pub const ETH_HLEN: usize = 14;
pub const L4_OFF: usize = ETH_HLEN + 20;
pub const UDP_HLEN: usize = 8;

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    Whole,
    First,
    Later { last: bool },
}

#[derive(Clone, Copy, Debug)]
pub struct Ip {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub tot_len: u16,
    pub id: u16,
    pub fragment: Fragment,
    /// In 8-byte units.
    pub frag_offset: u16,
}

impl Ip {
    pub fn payload_len(&self) -> u16 {
        self.tot_len - 20
    }

    /// Where the IP datagram ends in the frame (Ethernet padding after).
    pub fn end(&self) -> usize {
        ETH_HLEN + usize::from(self.tot_len)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct L4 {
    pub sport: u16,
    pub dport: u16,
    /// The transport checksum's offset in the frame.
    pub check_off: usize,
    pub segment: Segment,
}

pub fn eth(frame: &[u8]) -> Result<(), Reason> {
    let ether_type = frame.get(12..14).ok_or(Reason::Truncated)?;
    match u16::from_be_bytes([ether_type[0], ether_type[1]]) {
        0x0800 => Ok(()),
        0x86dd => Err(Reason::Ipv6),
        0x8100 | 0x88a8 => Err(Reason::Vlan),
        _ => Err(Reason::NotIpv4),
    }
}

pub fn ipv4(frame: &[u8]) -> Result<Ip, Reason> {
    let ip = frame
        .get(ETH_HLEN..ETH_HLEN + 20)
        .ok_or(Reason::Truncated)?;
    let (version, ihl) = (ip[0] >> 4, ip[0] & 0x0f);
    if version != 4 || ihl < 5 {
        return Err(Reason::BadIpHeader);
    }
    if ihl != 5 {
        return Err(Reason::IpOptions);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    if tot_len < 20 || usize::from(tot_len) > frame.len() - ETH_HLEN {
        return Err(Reason::BadLength);
    }
    let frag_off = u16::from_be_bytes([ip[6], ip[7]]);
    let more = frag_off & 0x2000 != 0;
    let fragment = match (frag_off & 0x1fff, more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        (_, more) => Fragment::Later { last: !more },
    };
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    Ok(Ip {
        saddr: addr(12),
        daddr: addr(16),
        proto: ip[9],
        ttl: ip[8],
        tot_len,
        id: u16::from_be_bytes([ip[4], ip[5]]),
        fragment,
        frag_offset: frag_off & 0x1fff,
    })
}

pub fn l4(frame: &[u8], ip: &Ip) -> Result<L4, Reason> {
    let (hlen, check_off) = match ip.proto {
        TCP => (20, L4_OFF + 16),
        UDP => (UDP_HLEN, L4_OFF + 6),
        _ => return Err(Reason::OtherProtocol),
    };
    if usize::from(ip.tot_len) < 20 + hlen {
        return Err(Reason::BadLength);
    }
    let ports = frame.get(L4_OFF..L4_OFF + 4).ok_or(Reason::Truncated)?;
    let (sport, dport) = (
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    );
    let segment = if ip.proto == TCP {
        tcp(frame, ip)?
    } else {
        Segment::default()
    };
    Ok(L4 {
        sport,
        dport,
        check_off,
        segment,
    })
}

fn tcp(frame: &[u8], ip: &Ip) -> Result<Segment, Reason> {
    let t = frame
        .get(L4_OFF + 4..L4_OFF + 16)
        .ok_or(Reason::Truncated)?;
    let data_offset = t[8] >> 4;
    if data_offset < 5 || usize::from(ip.tot_len) < 20 + usize::from(data_offset) * 4 {
        return Err(Reason::BadLength);
    }
    let hlen = usize::from(data_offset) * 4;
    let mut segment = Segment {
        flags: t[9],
        seq: u32::from_be_bytes([t[0], t[1], t[2], t[3]]),
        ack: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        window: u16::from_be_bytes([t[10], t[11]]),
        wscale: None,
    };
    if segment.flags & TCP_SYN != 0 && hlen > 20 {
        segment.wscale = window_scale(frame, hlen);
    }
    Ok(segment)
}

/// The window-scale option as the programs find it: among the first eight
/// options of at most 40 bytes, each read as a kind and length pair that
/// must lie within the packet.
fn window_scale(frame: &[u8], hlen: usize) -> Option<u8> {
    let end = L4_OFF + hlen.min(60);
    let mut off = L4_OFF + 20;
    for _ in 0..8 {
        if off >= end {
            return None;
        }
        let pair = frame.get(off..off + 2)?;
        let (kind, len) = (pair[0], usize::from(pair[1]));
        match kind {
            0 => return None,
            1 => {
                off += 1;
                continue;
            }
            _ => {}
        }
        if kind == 3 && len == 3 && off + 3 <= end {
            return Some(*frame.get(off + 2)?);
        }
        if len < 2 {
            return None;
        }
        off += len;
    }
    None
}

/// What an ICMP error quotes of the offending packet, or None for any
/// other ICMP message.
pub struct Quoted {
    pub daddr: Ipv4Addr,
    pub proto: u8,
    pub dport: u16,
}

pub fn icmp_error(frame: &[u8], ip: &Ip) -> Result<Option<Quoted>, Reason> {
    let kind = frame.get(L4_OFF..L4_OFF + 8).ok_or(Reason::Truncated)?[0];
    if !matches!(kind, 3 | 11 | 12) {
        return Ok(None);
    }
    let inner_off = L4_OFF + 8;
    let inner = frame
        .get(inner_off..inner_off + 20)
        .ok_or(Reason::Truncated)?;
    if inner[0] != 0x45 {
        return Err(Reason::IpOptions);
    }
    if usize::from(ip.tot_len) < 20 + 8 + 20 + 4 {
        return Err(Reason::BadLength);
    }
    let ports = frame
        .get(inner_off + 20..inner_off + 24)
        .ok_or(Reason::Truncated)?;
    Ok(Some(Quoted {
        daddr: Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
        proto: inner[9],
        dport: u16::from_be_bytes([ports[2], ports[3]]),
    }))
}

/// The DNS header's QR bit of a UDP datagram's payload, if the frame
/// reaches that far.
pub fn is_dns_response(frame: &[u8]) -> bool {
    frame
        .get(L4_OFF + UDP_HLEN + 2)
        .is_some_and(|flags| flags & 0x80 != 0)
}
