//! Multicast relay: copies of datagrams to a relay group, with
//! bpf_clone_redirect, between the uplink and the relay's target VMs. The
//! original always continues as it came; edits made for a copy are undone.
//! (bpf_clone_redirect unclones the original, so undoing them cannot reach a
//! copy already sent.)

use aya_ebpf::programs::TcContext;
use forwarder_common::{
    maps::{MAX_RELAY_TARGETS, PROTO_UDP, RelayKey, UplinkState, among_first, group_mac},
    reason::Reason,
};

use crate::{
    Verdict, fib,
    forward::plausible_lan_source,
    maps::{self, RelayDirection, RelayEvent},
    mem,
    nat::{self, End},
    parse::{self, Ipv4},
};

#[inline(always)]
fn lookup(
    ctx: &TcContext,
    ip: &Ipv4,
) -> Result<(&'static forwarder_common::maps::Relay, parse::L4), Reason> {
    if ip.proto != PROTO_UDP {
        return Err(Reason::OtherProtocol);
    }
    let l4 = parse::parse_l4(ctx, ip)?;
    let key = RelayKey {
        group: ip.daddr,
        port: l4.dport,
        pad: 0,
    };
    let relay = maps::relay(&key).ok_or(Reason::OtherDestination)?;
    Ok((relay, l4))
}

/// LAN to VMs: a LAN peer's datagram to a relay group is copied, unchanged
/// at L3 (still multicast, the peer's source kept), out of each interface
/// that routes to a relay target, with that interface's MAC as source and
/// the group MAC as destination. The next router's forwarder repeats it.
#[inline(always)]
pub fn from_lan(ctx: &TcContext, ip: &Ipv4, uplink: &UplinkState) -> Result<Verdict, Reason> {
    let (relay, _) = lookup(ctx, ip)?;
    let (dst_mac, src_mac) = nat::macs(ctx).ok_or(Reason::Truncated)?;
    // An access point may hand our own copies back to us.
    if src_mac == uplink.mac || ip.saddr == uplink.addr {
        return Err(Reason::Reflected);
    }
    plausible_lan_source(ip, uplink)?;
    if !relay.allow.allows(ip.saddr, uplink) {
        return Err(Reason::SourceNotAllowed);
    }
    fib::reverse_path(ctx, uplink.ifindex, ip.saddr, ip.daddr, ip.proto)?;
    if !maps::take_relay_token(relay, RelayDirection::Down) {
        maps::count_relay(relay.slot, RelayEvent::RateLimited(RelayDirection::Down));
        return Err(Reason::RelayDownRateLimited);
    }

    let mac = group_mac(ip.daddr);
    let mut sent_to = core::mem::MaybeUninit::<[u32; MAX_RELAY_TARGETS]>::uninit();
    let sent_to = mem::zeroed(&mut sent_to);
    let mut copies = 0;
    let mut failed = false;
    for i in 0..MAX_RELAY_TARGETS {
        if i >= relay.n_targets as usize {
            break;
        }
        let Some(&target) = relay.targets.get(i) else {
            break;
        };
        let Some(ifindex) = fib::egress(ctx, uplink.ifindex, ip.saddr, target) else {
            continue;
        };
        if ifindex == uplink.ifindex || among_first(sent_to, copies, ifindex) {
            continue;
        }
        let Some(egress_mac) = maps::downstream_mac(ifindex) else {
            continue;
        };
        nat::set_macs(ctx, mac, egress_mac)?;
        if ctx.clone_redirect(ifindex, 0).is_ok() {
            maps::count_relay(relay.slot, RelayEvent::Down(ip.tot_len));
        } else {
            failed = true;
        }
        if let Some(slot) = sent_to.get_mut(copies) {
            *slot = ifindex;
        }
        copies += 1;
    }
    if copies > 0 {
        nat::set_macs(ctx, dst_mac, src_mac)?;
    }
    match (copies, failed) {
        (0, _) => Err(Reason::RelayNoRoute),
        (_, true) => Err(Reason::RelayCloneFailed),
        _ => Ok(Verdict::Relayed),
    }
}

/// VM to LAN: a relay target's datagram to its group, on the interface that
/// routes to it, is copied out of the uplink with the uplink's address as
/// source (so LAN peers answer the uplink, where forward rules wait), the
/// sender's TTL or the configured one, and valid checksums.
#[inline(always)]
pub fn to_lan(ctx: &TcContext, ip: &Ipv4) -> Result<Verdict, Reason> {
    let (relay, l4) = lookup(ctx, ip)?;
    if !relay.has_target(ip.saddr) {
        return Err(Reason::RelayNotTarget);
    }
    // SAFETY: reading a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib::reverse_path(ctx, ifindex, ip.saddr, ip.daddr, ip.proto)?;
    let uplink = maps::usable_uplink()?;
    if !maps::take_relay_token(relay, RelayDirection::Up) {
        maps::count_relay(relay.slot, RelayEvent::RateLimited(RelayDirection::Up));
        return Err(Reason::RelayRateLimited);
    }

    let (dst_mac, src_mac) = nat::macs(ctx).ok_or(Reason::Truncated)?;
    let saved = nat::checksums(ctx, &l4).ok_or(Reason::Truncated)?;
    let ttl = if relay.ttl != 0 { relay.ttl } else { ip.ttl };
    let copied = nat::set_addr(ctx, ip, &l4, End::Source, uplink.addr)
        .and_then(|()| nat::set_ttl(ctx, ttl))
        .and_then(|()| nat::set_macs(ctx, group_mac(ip.daddr), uplink.mac))
        .map(|()| ctx.clone_redirect(uplink.ifindex, 0).is_ok());
    let restored = nat::set_addr(ctx, ip, &l4, End::Source, ip.saddr)
        .and_then(|()| nat::set_ttl(ctx, ip.ttl))
        .and_then(|()| nat::set_macs(ctx, dst_mac, src_mac))
        .and_then(|()| nat::restore_checksums(ctx, &l4, saved));
    restored?;
    if !copied? {
        return Err(Reason::RelayCloneFailed);
    }
    maps::count_relay(relay.slot, RelayEvent::Up(ip.tot_len));
    Ok(Verdict::Relayed)
}
