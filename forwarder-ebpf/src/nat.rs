//! Packet rewriting: addresses, ports, TTL and MACs, each with its checksum
//! fix, and the redirect itself.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT, bpf_redir_neigh},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use forwarder_common::{csum, reason::Reason};
use network_types::{
    eth::EthHdr,
    ip::{IpProto, Ipv4Hdr},
};

use crate::{
    fib::Route,
    log,
    parse::{Aligned, DPORT_OFF, Ipv4, L3_OFF, L4, L4_OFF, SPORT_OFF, TCP_CHECK_OFF, ptr_at},
};

const AF_INET: u32 = 2;
/// Covers the offset of every transport checksum: TCP's is the farthest.
const CHECK_OFF_MASK: usize = 63;
const _: () = assert!(L4_OFF + TCP_CHECK_OFF < CHECK_OFF_MASK);

/// Which end of the flow a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// A rewrite could not complete; the packet may be half-written and must not
/// be delivered.
pub struct RewriteFailed;

impl From<RewriteFailed> for Reason {
    fn from(_: RewriteFailed) -> Self {
        Reason::RewriteFailed
    }
}

/// Flags for `bpf_l4_csum_replace`: a UDP checksum of zero means "none" and
/// must stay zero.
#[inline(always)]
fn l4_flags(ip: &Ipv4) -> u64 {
    if ip.carries(IpProto::Udp) {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Replaces the address at `end` and fixes the IP checksum (never
/// offloaded, so updated here) and the transport checksum through
/// `bpf_l4_csum_replace`, which knows whether the skb is CHECKSUM_PARTIAL
/// (only the pseudo-header part may change then) or complete. A later
/// fragment (`l4` None) has no transport header: the first fragment's
/// checksum covers the whole datagram.
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: Option<&L4>,
    end: End,
    new: u32,
) -> Result<(), RewriteFailed> {
    let hdr: *mut Aligned<Ipv4Hdr> = ptr_at(ctx, L3_OFF).ok_or(RewriteFailed)?;
    // SAFETY: bounds checked by ptr_at; no helper ran since.
    let Aligned(hdr) = unsafe { &mut *hdr };
    let old = match end {
        End::Source => hdr.src_addr,
        End::Destination => hdr.dst_addr,
    };
    let check = csum::update_addr(u16::from_be_bytes(hdr.check), old, new.to_ne_bytes());
    hdr.check = check.to_be_bytes();
    match end {
        End::Source => hdr.src_addr = new.to_ne_bytes(),
        End::Destination => hdr.dst_addr = new.to_ne_bytes(),
    }
    let old = u32::from_ne_bytes(old);
    let Some(l4) = l4 else {
        return Ok(());
    };
    ctx.l4_csum_replace(
        l4.check_off,
        u64::from(old),
        u64::from(new),
        l4_flags(ip) | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )
    .map_err(|code| checksum_failed(ip, l4, code))
}

/// A transport checksum fix the kernel refused, noted for the kernel log.
#[inline(always)]
fn checksum_failed(ip: &Ipv4, l4: &L4, code: i64) -> RewriteFailed {
    log::checksum_failed(l4.check_off, ip.saddr, ip.daddr, code);
    RewriteFailed
}

/// Replaces the port at `end` and fixes the transport checksum.
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    end: End,
    new: u16,
) -> Result<(), RewriteFailed> {
    let off = match end {
        End::Source => SPORT_OFF,
        End::Destination => DPORT_OFF,
    };
    let port: *mut u16 = ptr_at(ctx, L4_OFF + off).ok_or(RewriteFailed)?;
    // SAFETY: bounds checked by ptr_at; no helper ran since.
    let port = unsafe { &mut *port };
    let old = *port;
    if old == new {
        return Ok(());
    }
    *port = new;
    ctx.l4_csum_replace(
        l4.check_off,
        u64::from(old),
        u64::from(new),
        l4_flags(ip) | 2,
    )
    .map_err(|code| checksum_failed(ip, l4, code))
}

/// Sets the TTL and fixes the IP checksum.
#[inline(always)]
pub fn set_ttl(ctx: &TcContext, ttl: u8) -> Result<(), RewriteFailed> {
    let hdr: *mut Aligned<Ipv4Hdr> = ptr_at(ctx, L3_OFF).ok_or(RewriteFailed)?;
    // SAFETY: bounds checked by ptr_at.
    let Aligned(hdr) = unsafe { &mut *hdr };
    let old = u16::from_be_bytes([hdr.ttl, hdr.proto]);
    let new = u16::from_be_bytes([ttl, hdr.proto]);
    hdr.check = csum::update_word(u16::from_be_bytes(hdr.check), old, new).to_be_bytes();
    hdr.ttl = ttl;
    Ok(())
}

/// NAT of one end: address, port and a TTL decrement, as a router does.
#[inline(always)]
pub fn translate(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    end: End,
    addr: u32,
    port: u16,
) -> Result<(), RewriteFailed> {
    set_ttl(ctx, ip.ttl - 1)?;
    set_port(ctx, ip, l4, end, port)?;
    set_addr(ctx, ip, Some(l4), end, addr)
}

/// Writes both MACs of the Ethernet header.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: [u8; 6], src: [u8; 6]) -> Result<(), RewriteFailed> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(RewriteFailed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
    }
    Ok(())
}

/// Both MACs as the packet carries them now.
#[inline(always)]
pub fn macs(ctx: &TcContext) -> Option<([u8; 6], [u8; 6])> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { Some(((*eth).dst_addr, (*eth).src_addr)) }
}

/// The IP and (when there is a transport header) transport checksum
/// fields as the packet carries them now.
#[derive(Clone, Copy)]
pub struct Checksums {
    ip: [u8; 2],
    l4: Option<(usize, [u8; 2])>,
}

#[inline(always)]
pub fn checksums(ctx: &TcContext, l4: Option<&L4>) -> Option<Checksums> {
    let hdr: *const Aligned<Ipv4Hdr> = ptr_at(ctx, L3_OFF)?;
    let l4 = match l4 {
        Some(l4) => {
            // The mask changes nothing (the field sits in the first 64
            // bytes) but keeps the bound in sight of the verifier where the
            // compiler spilled the offset as a wider number.
            let off = l4.check_off & CHECK_OFF_MASK;
            let check: *const [u8; 2] = ptr_at(ctx, off)?;
            // SAFETY: bounds checked by ptr_at.
            Some((off, unsafe { *check }))
        }
        None => None,
    };
    // SAFETY: bounds checked by ptr_at.
    Some(Checksums {
        ip: unsafe { (*hdr).0.check },
        l4,
    })
}

/// Puts back checksum fields saved by `checksums`. After an edit and its
/// arithmetic inverse a checksum can come back as the other one's-complement
/// zero (0x0000 for 0xffff, or the reverse): equal for every sum, skb->csum
/// included, but not the same bytes, and an undone edit must leave the
/// very bytes it found.
#[inline(always)]
pub fn restore_checksums(ctx: &TcContext, saved: Checksums) -> Result<(), RewriteFailed> {
    let hdr: *mut Aligned<Ipv4Hdr> = ptr_at(ctx, L3_OFF).ok_or(RewriteFailed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { (*hdr).0.check = saved.ip };
    if let Some((off, check)) = saved.l4 {
        let l4_check: *mut [u8; 2] = ptr_at(ctx, off & CHECK_OFF_MASK).ok_or(RewriteFailed)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *l4_check = check };
    }
    Ok(())
}

/// Sends the rewritten packet out of the route's interface. Returns the TC
/// action the redirect helper chose.
#[inline(always)]
pub fn redirect(ctx: &TcContext, route: Route) -> Result<i32, RewriteFailed> {
    let (ifindex, nexthop, action) = match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => {
            set_macs(ctx, dmac, smac)?;
            // SAFETY: plain helper call.
            (ifindex, None, unsafe { bpf_redirect(ifindex, 0) })
        }
        Route::Unresolved { ifindex, nexthop } => {
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET,
                __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                    ipv4_nh: nexthop,
                },
            };
            // SAFETY: nh is a valid bpf_redir_neigh for IPv4.
            let action = unsafe {
                bpf_redirect_neigh(ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0)
            };
            (ifindex, Some(nexthop), action)
        }
    };
    if action != i64::from(TC_ACT_REDIRECT) {
        let (saddr, daddr) = addrs(ctx);
        log::redirect_refused(ifindex, nexthop, saddr, daddr, action);
    }
    Ok(action as i32)
}

/// The packet's addresses as it carries them now, for a log record.
#[inline(always)]
fn addrs(ctx: &TcContext) -> (u32, u32) {
    match ptr_at::<Aligned<Ipv4Hdr>>(ctx, L3_OFF) {
        // SAFETY: bounds checked by ptr_at.
        Some(hdr) => unsafe {
            (
                u32::from_ne_bytes((*hdr).0.src_addr),
                u32::from_ne_bytes((*hdr).0.dst_addr),
            )
        },
        None => (0, 0),
    }
}
