//! Packet rewriting: one address and one port, TTL, checksums, MACs, and the
//! redirect itself.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, bpf_redir_neigh},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use forwarder_common::{csum, maps::PROTO_UDP};

use crate::{
    fib::Route,
    parse::{EthHdr, Ipv4, Ipv4Hdr, L3_OFF, L4, L4_OFF, Ports, ptr_at},
};

const AF_INET: u32 = 2;

/// Which end of the flow a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// The rewrite could not complete; the packet may be half-written and must
/// not be delivered.
pub struct RewriteFailed;

/// Replaces the address and port at `end`, decrements the TTL and fixes both
/// checksums. The IP header checksum is never offloaded, so it is updated
/// here; the transport checksum goes through `bpf_l4_csum_replace`, which
/// knows whether the skb is CHECKSUM_PARTIAL (only the pseudo-header part may
/// change then) or carries a complete checksum.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    end: End,
    new_addr: u32,
    new_port: u16,
) -> Result<(), RewriteFailed> {
    let hdr: *mut Ipv4Hdr = ptr_at(ctx, L3_OFF).ok_or(RewriteFailed)?;
    let ports: *mut Ports = ptr_at(ctx, L4_OFF).ok_or(RewriteFailed)?;
    // SAFETY: both pointers were bounds checked and no helper ran since.
    let (hdr, ports) = unsafe { (&mut *hdr, &mut *ports) };

    let (old_addr, old_port) = match end {
        End::Source => (hdr.saddr, ports.sport),
        End::Destination => (hdr.daddr, ports.dport),
    };
    let old_ttl = u16::from_be_bytes([hdr.ttl, hdr.proto]);
    let new_ttl = u16::from_be_bytes([hdr.ttl - 1, hdr.proto]);
    let check = csum::update_word(u16::from_be_bytes(hdr.check), old_ttl, new_ttl);
    let check = csum::update_addr(check, old_addr.to_ne_bytes(), new_addr.to_ne_bytes());
    hdr.ttl -= 1;
    hdr.check = check.to_be_bytes();
    match end {
        End::Source => {
            hdr.saddr = new_addr;
            ports.sport = new_port;
        }
        End::Destination => {
            hdr.daddr = new_addr;
            ports.dport = new_port;
        }
    }

    // A UDP checksum of zero means "none" and must stay zero.
    let mangled = if ip.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    let flags = u64::from(mangled);
    ctx.l4_csum_replace(
        l4.check_off,
        u64::from(old_addr),
        u64::from(new_addr),
        flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )
    .map_err(|_| RewriteFailed)?;
    if old_port != new_port {
        ctx.l4_csum_replace(
            l4.check_off,
            u64::from(old_port),
            u64::from(new_port),
            flags | 2,
        )
        .map_err(|_| RewriteFailed)?;
    }
    Ok(())
}

/// Sends the rewritten packet out of the route's interface. Returns the TC
/// action the redirect helper chose.
#[inline(always)]
pub fn redirect(ctx: &TcContext, route: Route) -> i32 {
    match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => {
            // The checksum helpers invalidated earlier packet pointers.
            if let Some(eth) = ptr_at::<EthHdr>(ctx, 0) {
                // SAFETY: bounds checked by ptr_at.
                unsafe {
                    (*eth).dst = dmac;
                    (*eth).src = smac;
                }
            }
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        Route::Unresolved { ifindex, nexthop } => {
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET,
                __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                    ipv4_nh: nexthop,
                },
            };
            // SAFETY: nh is a valid bpf_redir_neigh for IPv4.
            unsafe {
                bpf_redirect_neigh(ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) as i32
            }
        }
    }
}
