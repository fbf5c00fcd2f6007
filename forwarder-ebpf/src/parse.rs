//! One bounds-checked parse function per header. Each reads through direct
//! packet access and returns the fields the programs need, or the reason the
//! packet is not ours to touch. Fields stay in wire order.

use aya_ebpf::programs::TcContext;
use forwarder_common::{
    flow::{Segment, TCP_SYN},
    maps::{PROTO_TCP, PROTO_UDP},
    reason::Reason,
};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
/// Offset of the IPv4 header: only untagged Ethernet frames are handled.
pub const L3_OFF: usize = ETH_HLEN;
/// Offset of the transport header: packets with IP options are not handled.
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: u32,
    pub daddr: u32,
}

/// The first four bytes of TCP and UDP: ports at the same place in both.
#[repr(C)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
}

/// TCP's fixed header after the ports.
#[repr(C)]
pub struct TcpFields {
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub offset: u8,
    pub flags: u8,
    pub window: [u8; 2],
}

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// A pointer to a `T` at `off`, if the linear data holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Makes the first `len` bytes (or the whole packet, if shorter) directly
/// accessible. A non-linear skb keeps headers in fragments otherwise.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext, len: usize) {
    if ctx.data() + len <= ctx.data_end() {
        return;
    }
    let want = (ctx.len() as usize).min(len);
    // A failed pull leaves the packet as it was; the parsers then report it
    // as truncated and it is passed untouched.
    let _ = ctx.pull_data(want as u32);
}

/// Only untagged IPv4 goes further.
#[inline(always)]
pub fn parse_eth(ctx: &TcContext) -> Result<(), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    match u16::from_be_bytes(unsafe { (*eth).ether_type }) {
        ETH_P_IP => Ok(()),
        ETH_P_IPV6 => Err(Reason::Ipv6),
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::Vlan),
        _ => Err(Reason::NotIpv4),
    }
}

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: it holds the transport header.
    First,
    /// A later fragment, the datagram's last one or not: no transport
    /// header.
    Later { last: bool },
}

/// The IPv4 fields the programs decide on.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    pub ttl: u8,
    pub tot_len: u16,
    pub id: u16,
    pub fragment: Fragment,
    /// Where the fragment's data starts in its datagram, in 8-byte units.
    pub frag_offset: u16,
}

impl Ipv4 {
    /// Bytes after the IP header: what a fragment carries of its datagram.
    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        self.tot_len - IPV4_HLEN as u16
    }

    /// Only whole datagrams are forwarded: which flow a fragment belongs
    /// to, only the reassembling stack can tell.
    #[inline(always)]
    pub fn whole(&self) -> Result<(), Reason> {
        match self.fragment {
            Fragment::Whole => Ok(()),
            _ => Err(Reason::Fragment),
        }
    }
}

#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Result<Ipv4, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, L3_OFF).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let version = ip.version_ihl >> 4;
    let ihl = ip.version_ihl & 0x0f;
    if version != 4 || ihl < 5 {
        return Err(Reason::BadIpHeader);
    }
    if ihl != 5 {
        return Err(Reason::IpOptions);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    if (tot_len as usize) < IPV4_HLEN
        || tot_len as usize > (ctx.len() as usize).saturating_sub(L3_OFF)
    {
        return Err(Reason::BadLength);
    }
    let frag_off = u16::from_be_bytes(ip.frag_off);
    let more = frag_off & 0x2000 != 0;
    let fragment = match (frag_off & 0x1fff, more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        (_, more) => Fragment::Later { last: !more },
    };
    Ok(Ipv4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto: ip.proto,
        ttl: ip.ttl,
        tot_len,
        id: u16::from_be_bytes(ip.id),
        fragment,
        frag_offset: frag_off & 0x1fff,
    })
}

/// Ports of a TCP or UDP segment, with its checksum's offset in the packet,
/// its header length and (TCP only) what moves a flow.
#[derive(Clone, Copy)]
pub struct L4 {
    pub sport: u16,
    pub dport: u16,
    pub check_off: usize,
    pub hlen: u16,
    pub segment: Segment,
}

#[inline(always)]
pub fn parse_l4(ctx: &TcContext, ip: &Ipv4) -> Result<L4, Reason> {
    let (hlen, check_off) = match ip.proto {
        PROTO_TCP => (TCP_HLEN, L4_OFF + 16),
        PROTO_UDP => (UDP_HLEN, L4_OFF + 6),
        _ => return Err(Reason::OtherProtocol),
    };
    if (ip.tot_len as usize) < IPV4_HLEN + hlen {
        return Err(Reason::BadLength);
    }
    let ports: *const Ports = ptr_at(ctx, L4_OFF).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    let (sport, dport) = (ports.sport, ports.dport);
    let (hlen, segment) = if ip.proto == PROTO_TCP {
        let (hlen, segment) = parse_tcp(ctx, ip)?;
        (u16::from(hlen), segment)
    } else {
        (hlen as u16, Segment::default())
    };
    Ok(L4 {
        sport,
        dport,
        check_off,
        hlen,
        segment,
    })
}

/// TCP's header length and the fields that move a flow; a SYN's options
/// are read for its window scale.
#[inline(always)]
fn parse_tcp(ctx: &TcContext, ip: &Ipv4) -> Result<(u8, Segment), Reason> {
    let tcp: *const TcpFields = ptr_at(ctx, L4_OFF + 4).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let tcp = unsafe { &*tcp };
    let data_offset = tcp.offset >> 4;
    if data_offset < 5 || (ip.tot_len as usize) < IPV4_HLEN + usize::from(data_offset) * 4 {
        return Err(Reason::BadLength);
    }
    let hlen = data_offset * 4;
    let mut segment = Segment {
        flags: tcp.flags,
        seq: u32::from_be_bytes(tcp.seq),
        ack: u32::from_be_bytes(tcp.ack),
        window: u16::from_be_bytes(tcp.window),
        wscale: None,
    };
    if segment.flags & TCP_SYN != 0 && hlen > TCP_HLEN as u8 {
        segment.wscale = window_scale(ctx, usize::from(hlen));
    }
    Ok((hlen, segment))
}

/// The longest TCP options area.
const TCP_OPTIONS_MAX: usize = 40;
/// How many options are looked at for the window scale: each is a loop
/// iteration the verifier walks on every path to here. Stacks send four or
/// five in a SYN; a SYN whose scale comes later is judged unscaled, which
/// only makes its resets' window narrower.
const WSCALE_SEARCH: usize = 8;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_WINDOW: u8 = 3;

/// The window-scale option among a SYN's options, if it is there and well
/// formed. Pulls the options into the linear area first.
#[inline(always)]
fn window_scale(ctx: &TcContext, hlen: usize) -> Option<u8> {
    pull_headers(ctx, L4_OFF + TCP_HLEN + TCP_OPTIONS_MAX);
    let end = L4_OFF + hlen.min(TCP_HLEN + TCP_OPTIONS_MAX);
    let mut off = L4_OFF + TCP_HLEN;
    for _ in 0..WSCALE_SEARCH {
        if off >= end {
            return None;
        }
        // Kind and length read as one: LLVM turns a one-byte bounds check
        // at a variable offset into a form the verifier cannot use. A NOP
        // that is the packet's very last byte ends the walk early, and
        // nothing could follow it anyway.
        // SAFETY: bounds checked by ptr_at.
        let [kind, len] = unsafe { *ptr_at::<[u8; 2]>(ctx, off)? };
        match kind {
            TCPOPT_EOL => return None,
            TCPOPT_NOP => {
                off += 1;
                continue;
            }
            _ => {}
        }
        let len = usize::from(len);
        if kind == TCPOPT_WINDOW && len == 3 && off + 3 <= end {
            // SAFETY: as above.
            let [_, _, shift] = unsafe { *ptr_at::<[u8; 3]>(ctx, off)? };
            return Some(shift);
        }
        if len < 2 {
            return None;
        }
        off += len;
    }
    None
}

/// What an ICMP error quotes of the offending packet: where it was going.
#[derive(Clone, Copy)]
pub struct QuotedFlow {
    pub daddr: u32,
    pub proto: u8,
    pub dport: u16,
}

/// For an ICMP destination-unreachable, time-exceeded or parameter-problem
/// message, the flow it quotes; `None` for every other ICMP message.
#[inline(always)]
pub fn parse_icmp_error(ctx: &TcContext, ip: &Ipv4) -> Result<Option<QuotedFlow>, Reason> {
    let icmp: *const IcmpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp).kind };
    if !matches!(kind, 3 | 11 | 12) {
        return Ok(None);
    }
    let inner_off = L4_OFF + ICMP_HLEN;
    let inner: *const Ipv4Hdr = ptr_at(ctx, inner_off).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner };
    if inner.version_ihl != 0x45 {
        return Err(Reason::IpOptions);
    }
    if (ip.tot_len as usize) < IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + 4 {
        return Err(Reason::BadLength);
    }
    let ports: *const Ports = ptr_at(ctx, inner_off + IPV4_HLEN).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    Ok(Some(QuotedFlow {
        daddr: inner.daddr,
        proto: inner.proto,
        dport: ports.dport,
    }))
}

/// The DNS header's QR bit (a response) of a UDP datagram's payload.
#[inline(always)]
pub fn is_dns_response(ctx: &TcContext) -> bool {
    ptr_at::<u8>(ctx, L4_OFF + UDP_HLEN + 2)
        // SAFETY: bounds checked by ptr_at.
        .is_some_and(|flags| unsafe { *flags } & 0x80 != 0)
}

/// The largest IP packet this skb will put on the wire: a GSO packet is cut
/// into segments of `gso_size` payload at the egress, so its own length says
/// nothing about the MTU it needs.
#[inline(always)]
pub fn wire_len(ctx: &TcContext, ip: &Ipv4, l4: &L4) -> u16 {
    // SAFETY: reading a field of the context the program was given.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        ip.tot_len
    } else {
        (IPV4_HLEN as u32 + u32::from(l4.hlen) + gso_size).min(u32::from(u16::MAX)) as u16
    }
}
