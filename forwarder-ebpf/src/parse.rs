//! One bounds-checked parse function per header. Each reads through direct
//! packet access and returns the fields the programs need, or the reason the
//! packet is not ours to touch. Fields stay in wire order.

use core::mem::offset_of;

use aya_ebpf::programs::TcContext;
use forwarder_common::{
    flow::{Segment, TCP_SYN},
    reason::Reason,
};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::{Icmpv4Hdr, Icmpv4Type},
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::log;

pub const ETH_HLEN: usize = EthHdr::LEN;
pub const IPV4_HLEN: usize = Ipv4Hdr::LEN;
/// Offset of the IPv4 header: only untagged Ethernet frames are handled.
pub const L3_OFF: usize = ETH_HLEN;
/// Offset of the transport header: packets with IP options are not handled.
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
const TCP_HLEN: usize = TcpHdr::LEN;
pub const UDP_HLEN: usize = UdpHdr::LEN;

/// Where TCP and UDP keep their ports: at the same offsets in both, so the
/// programs read and rewrite them without asking which one they hold.
pub const SPORT_OFF: usize = offset_of!(UdpHdr, src);
pub const DPORT_OFF: usize = offset_of!(UdpHdr, dst);
const _: () =
    assert!(offset_of!(TcpHdr, source) == SPORT_OFF && offset_of!(TcpHdr, dest) == DPORT_OFF);
/// Offsets of the transport checksums.
pub const TCP_CHECK_OFF: usize = offset_of!(TcpHdr, check);
const UDP_CHECK_OFF: usize = offset_of!(UdpHdr, check);

/// EtherTypes as the frame carries them (network-types keeps them in wire
/// order, as the field reads).
const ETHER_IPV4: u16 = EtherType::Ipv4 as u16;
const ETHER_IPV6: u16 = EtherType::Ipv6 as u16;
const ETHER_VLAN: u16 = EtherType::Ieee8021q as u16;
const ETHER_QINQ: u16 = EtherType::Ieee8021ad as u16;

/// IPv4's More Fragments flag and fragment offset, in the 16 bits
/// `Ipv4Hdr::frags` holds (network-types' `frag_flags` and `frag_offset`).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// The bit where the flags (FIN first) start in TCP's data-offset-and-flags
/// bitfield, as network-types numbers it.
const TCP_FLAGS_BIT: usize = 8;

const ICMP_DEST_UNREACHABLE: u8 = Icmpv4Type::DestinationUnreachable as u8;
const ICMP_PARAMETER_PROBLEM: u8 = Icmpv4Type::ParameterProblem as u8;
/// network-types' `Icmpv4Type` has no Time Exceeded.
const ICMP_TIME_EXCEEDED: u8 = 11;

/// A network-types header the programs read in words. Its multi-byte fields
/// are byte arrays (alignment 1), which LLVM's BPF backend loads one byte
/// at a time, each spilled to the stack on its own; wrapped, a field at a
/// 4-byte offset is one load. The kernels the forwarder runs on do not ask
/// BPF loads from packets to be aligned. Its fields are read directly:
/// network-types' accessors of multi-byte fields read unaligned again.
#[repr(C, align(4))]
pub struct Aligned<T>(pub T);

const _: () = assert!(
    size_of::<Aligned<Ipv4Hdr>>() == Ipv4Hdr::LEN
        && size_of::<Aligned<TcpHdr>>() == TcpHdr::LEN
        && size_of::<Aligned<UdpHdr>>() == UdpHdr::LEN
        && size_of::<Aligned<Icmpv4Hdr>>() == Icmpv4Hdr::LEN
);

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
    let want = (ctx.len() as usize).min(len) as u32;
    // A failed pull leaves the packet as it was; the parsers then report it
    // as truncated and it is passed untouched.
    if let Err(code) = ctx.pull_data(want) {
        // SAFETY: reading a field of the context the program was given.
        log::pull_failed(unsafe { (*ctx.skb.skb).ifindex }, want, code);
    }
}

/// Only untagged IPv4 goes further.
#[inline(always)]
pub fn parse_eth(ctx: &TcContext) -> Result<(), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    match unsafe { (*eth).ether_type } {
        ETHER_IPV4 => Ok(()),
        ETHER_IPV6 => Err(Reason::Ipv6),
        ETHER_VLAN | ETHER_QINQ => Err(Reason::Vlan),
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
    /// Whether the payload is `proto`'s.
    #[inline(always)]
    pub fn carries(&self, proto: IpProto) -> bool {
        self.proto == proto as u8
    }

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
    let ip: *const Aligned<Ipv4Hdr> = ptr_at(ctx, L3_OFF).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let Aligned(ip) = unsafe { &*ip };
    if ip.version() != 4 || usize::from(ip.ihl()) < IPV4_HLEN {
        return Err(Reason::BadIpHeader);
    }
    if usize::from(ip.ihl()) != IPV4_HLEN {
        return Err(Reason::IpOptions);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    if (tot_len as usize) < IPV4_HLEN
        || tot_len as usize > (ctx.len() as usize).saturating_sub(L3_OFF)
    {
        return Err(Reason::BadLength);
    }
    let frags = u16::from_be_bytes(ip.frags);
    let frag_offset = frags & IP_OFFSET;
    let more = frags & IP_MF != 0;
    let fragment = match (frag_offset, more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        (_, more) => Fragment::Later { last: !more },
    };
    Ok(Ipv4 {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        proto: ip.proto,
        ttl: ip.ttl,
        tot_len,
        id: u16::from_be_bytes(ip.id),
        fragment,
        frag_offset,
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

/// TCP or UDP, each by its own header.
#[inline(always)]
pub fn parse_l4(ctx: &TcContext, ip: &Ipv4) -> Result<L4, Reason> {
    if ip.carries(IpProto::Tcp) {
        parse_tcp(ctx, ip)
    } else if ip.carries(IpProto::Udp) {
        parse_udp(ctx, ip)
    } else {
        Err(Reason::OtherProtocol)
    }
}

#[inline(always)]
fn parse_udp(ctx: &TcContext, ip: &Ipv4) -> Result<L4, Reason> {
    if (ip.tot_len as usize) < IPV4_HLEN + UDP_HLEN {
        return Err(Reason::BadLength);
    }
    let udp: *const Aligned<UdpHdr> = ptr_at(ctx, L4_OFF).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let Aligned(udp) = unsafe { &*udp };
    Ok(L4 {
        sport: u16::from_ne_bytes(udp.src),
        dport: u16::from_ne_bytes(udp.dst),
        check_off: L4_OFF + UDP_CHECK_OFF,
        hlen: UDP_HLEN as u16,
        segment: Segment::default(),
    })
}

/// TCP's ports, header length and the fields that move a flow; a SYN's
/// options are read for its window scale.
#[inline(always)]
fn parse_tcp(ctx: &TcContext, ip: &Ipv4) -> Result<L4, Reason> {
    if (ip.tot_len as usize) < IPV4_HLEN + TCP_HLEN {
        return Err(Reason::BadLength);
    }
    let tcp: *const Aligned<TcpHdr> = ptr_at(ctx, L4_OFF).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at. Every field is read before the
    // window-scale walk pulls data, which can move the packet.
    let Aligned(tcp) = unsafe { &*tcp };
    let hlen = tcp.doff() * 4;
    if usize::from(hlen) < TCP_HLEN || (ip.tot_len as usize) < IPV4_HLEN + usize::from(hlen) {
        return Err(Reason::BadLength);
    }
    let mut l4 = L4 {
        sport: u16::from_ne_bytes(tcp.source),
        dport: u16::from_ne_bytes(tcp.dest),
        check_off: L4_OFF + TCP_CHECK_OFF,
        hlen,
        segment: Segment {
            flags: tcp._bitfield_1.get(TCP_FLAGS_BIT, 8) as u8,
            seq: u32::from_be_bytes(tcp.seq),
            ack: u32::from_be_bytes(tcp.ack_seq),
            window: u16::from_be_bytes(tcp.window),
            wscale: None,
        },
    };
    if l4.segment.flags & TCP_SYN != 0 && usize::from(hlen) > TCP_HLEN {
        l4.segment.wscale = window_scale(ctx, usize::from(hlen));
    }
    Ok(l4)
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
    let icmp: *const Aligned<Icmpv4Hdr> = ptr_at(ctx, L4_OFF).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp).0.type_ };
    if !matches!(
        kind,
        ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return Ok(None);
    }
    let inner_off = L4_OFF + Icmpv4Hdr::LEN;
    let inner: *const Aligned<Ipv4Hdr> = ptr_at(ctx, inner_off).ok_or(Reason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let Aligned(inner) = unsafe { &*inner };
    if inner.vihl != 0x45 {
        return Err(Reason::IpOptions);
    }
    // Of the quoted transport header, only the ports are read.
    if (ip.tot_len as usize) < IPV4_HLEN + Icmpv4Hdr::LEN + IPV4_HLEN + DPORT_OFF + 2 {
        return Err(Reason::BadLength);
    }
    let dport: *const u16 =
        ptr_at(ctx, inner_off + IPV4_HLEN + DPORT_OFF).ok_or(Reason::Truncated)?;
    Ok(Some(QuotedFlow {
        daddr: u32::from_ne_bytes(inner.dst_addr),
        proto: inner.proto,
        // SAFETY: bounds checked by ptr_at.
        dport: unsafe { *dport },
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
