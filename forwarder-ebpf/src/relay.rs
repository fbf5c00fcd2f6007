//! Relays: copies of datagrams to a relay group (multicast, or broadcast)
//! with bpf_clone_redirect, between the uplink and the relay's target VMs.
//! The original always continues as it came; edits made for a copy are
//! undone. (bpf_clone_redirect unclones the original, so undoing them
//! cannot reach a copy already sent.) A fragmented datagram is relayed
//! fragment by fragment: the first finds the relay by its UDP header and
//! the rest follow it by IP id.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use forwarder_common::{
    maps::{
        FragmentKey, FragmentTrain, MAX_RELAY_TARGETS, PROTO_UDP, RELAY_DNS_QUERIES_UP, Relay,
        RelayKey, UplinkState, among_first, relay_dst_mac,
    },
    reason::Reason,
};

use crate::{
    Verdict, fib, lan,
    maps::{self, RelayDirection, RelayEvent},
    mem,
    nat::{self, End},
    parse::{self, Fragment, Ipv4, L4, L4_OFF},
};

/// How long the later fragments of a relayed datagram may trail its first.
const FRAGMENT_TRAIN_NS: u64 = 2_000_000_000;

/// The relay a datagram (or one of its fragments) sent to `group` belongs
/// to, and its UDP header when this packet has one.
#[inline(always)]
fn lookup(
    ctx: &TcContext,
    ip: &Ipv4,
    group: u32,
) -> Result<(&'static Relay, RelayKey, Option<L4>), Reason> {
    if ip.proto != PROTO_UDP {
        return Err(Reason::OtherProtocol);
    }
    match ip.fragment {
        Fragment::Whole | Fragment::First => {
            let l4 = parse::parse_l4(ctx, ip)?;
            let key = RelayKey {
                group,
                port: l4.dport,
                pad: 0,
            };
            let relay = maps::relay(&key).ok_or(Reason::OtherDestination)?;
            Ok((relay, key, Some(l4)))
        }
        Fragment::Later { last } => {
            let train_key = train_key(ip);
            let train = maps::fragment_train(&train_key).ok_or(Reason::Fragment)?;
            // SAFETY: plain helper call.
            if unsafe { bpf_ktime_get_ns() } > train.until_ns {
                maps::end_fragment_train(&train_key);
                return Err(Reason::Fragment);
            }
            if last {
                maps::end_fragment_train(&train_key);
            }
            let relay = maps::relay(&train.relay).ok_or(Reason::OtherDestination)?;
            Ok((relay, train.relay, None))
        }
    }
}

#[inline(always)]
fn train_key(ip: &Ipv4) -> FragmentKey {
    FragmentKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        pad: 0,
    }
}

/// The first fragment was relayed: the rest of the datagram follows it.
#[inline(always)]
fn follow_fragments(ip: &Ipv4, relay: RelayKey) {
    if ip.fragment == Fragment::First {
        maps::start_fragment_train(
            &train_key(ip),
            &FragmentTrain {
                relay,
                // SAFETY: plain helper call.
                until_ns: unsafe { bpf_ktime_get_ns() } + FRAGMENT_TRAIN_NS,
            },
        );
    }
}

/// The first of a datagram's packets decides; the later fragments follow
/// that decision, rate limits included.
#[inline(always)]
fn take_token(
    ip: &Ipv4,
    relay: &Relay,
    direction: RelayDirection,
    limited: Reason,
) -> Result<(), Reason> {
    if matches!(ip.fragment, Fragment::Later { .. }) || maps::take_relay_token(relay, direction) {
        return Ok(());
    }
    maps::count_relay(relay.slot, RelayEvent::RateLimited(direction));
    Err(limited)
}

/// LAN to VMs: a LAN peer's datagram to a relay group, or a broadcast
/// (limited, or directed to the LAN subnet) to a broadcast relay's port, is
/// copied out of each interface that routes to a relay target, with that
/// interface's MAC as source and the group's (or the broadcast) MAC as
/// destination, the peer's source address kept. A directed broadcast is
/// copied as a limited one: a VM on a /32 accepts nothing else. The next
/// router's forwarder repeats it.
#[inline(always)]
pub fn from_lan(
    ctx: &TcContext,
    ip: &Ipv4,
    uplink: &UplinkState,
    group: u32,
) -> Result<Verdict, Reason> {
    let (relay, key, l4) = lookup(ctx, ip, group)?;
    let (dst_mac, src_mac) = nat::macs(ctx).ok_or(Reason::Truncated)?;
    // An access point may hand our own copies back to us.
    if src_mac == uplink.mac || ip.saddr == uplink.addr {
        return Err(Reason::Reflected);
    }
    lan::plausible_source(ip, uplink)?;
    if !relay.allow.allows(ip.saddr, uplink) {
        return Err(Reason::SourceNotAllowed);
    }
    fib::reverse_path(ctx, uplink.ifindex, ip.saddr, ip.daddr, ip.proto)?;
    take_token(
        ip,
        relay,
        RelayDirection::Down,
        Reason::RelayDownRateLimited,
    )?;
    follow_fragments(ip, key);

    // Always written, so the verifier walks one path, not two: a limited
    // broadcast or a group is rewritten to itself, which changes nothing.
    let saved = nat::checksums(ctx, l4.as_ref()).ok_or(Reason::Truncated)?;
    nat::set_addr(ctx, ip, l4.as_ref(), End::Destination, group)?;
    let mut sent_to = core::mem::MaybeUninit::<[u32; MAX_RELAY_TARGETS]>::uninit();
    let mut copies = Copies {
        sent_to: mem::zeroed(&mut sent_to),
        count: 0,
        failed: false,
    };
    let mut next = |i: usize| {
        copy_down(
            ctx,
            relay,
            i,
            uplink.ifindex,
            ip,
            relay_dst_mac(group),
            &mut copies,
        )
    };
    // Unrolled: LLVM may lay a loop here out so that a fall-through closes
    // it, which kernels before 6.4 refuse to load.
    let _ = next(0)?
        && next(1)?
        && next(2)?
        && next(3)?
        && next(4)?
        && next(5)?
        && next(6)?
        && next(7)?;
    let (count, failed) = (copies.count, copies.failed);
    nat::set_addr(ctx, ip, l4.as_ref(), End::Destination, ip.daddr)?;
    nat::set_macs(ctx, dst_mac, src_mac)?;
    nat::restore_checksums(ctx, saved)?;
    match (count, failed) {
        (0, _) => Err(Reason::RelayNoRoute),
        (_, true) => Err(Reason::RelayCloneFailed),
        _ => Ok(Verdict::Relayed),
    }
}

/// The copies toward the VMs made so far, one per egress interface.
struct Copies<'a> {
    sent_to: &'a mut [u32; MAX_RELAY_TARGETS],
    count: usize,
    failed: bool,
}

const _: () = assert!(MAX_RELAY_TARGETS == 8, "from_lan unrolls eight targets");

/// Copies the packet toward the relay's `i`th target, unless an earlier
/// target already got it on the same interface. Returns whether there may
/// be more targets.
#[inline(always)]
fn copy_down(
    ctx: &TcContext,
    relay: &Relay,
    i: usize,
    uplink_ifindex: u32,
    ip: &Ipv4,
    mac: [u8; 6],
    copies: &mut Copies<'_>,
) -> Result<bool, Reason> {
    if i >= relay.n_targets as usize {
        return Ok(false);
    }
    let Some(&target) = relay.targets.get(i) else {
        return Ok(false);
    };
    let Some(ifindex) = fib::egress(ctx, uplink_ifindex, ip.saddr, target) else {
        return Ok(true);
    };
    if ifindex == uplink_ifindex || among_first(copies.sent_to, copies.count, ifindex) {
        return Ok(true);
    }
    let Some(egress_mac) = maps::downstream_mac(ifindex) else {
        return Ok(true);
    };
    nat::set_macs(ctx, mac, egress_mac)?;
    if ctx.clone_redirect(ifindex, 0).is_ok() {
        maps::count_relay(relay.slot, RelayEvent::Down(ip.tot_len));
    } else {
        copies.failed = true;
    }
    if let Some(slot) = copies.sent_to.get_mut(copies.count) {
        *slot = ifindex;
    }
    copies.count += 1;
    Ok(true)
}

/// What a VM may not relay to the LAN through a DNS (mDNS) relay: an
/// answer (its records carry the VM's internal address), or a query that
/// carries the VM's own address anywhere in it (a probe's proposed record,
/// a known answer about itself).
#[inline(always)]
fn refuse_internal(
    ctx: &TcContext,
    ip: &Ipv4,
    relay: &Relay,
    l4: Option<&L4>,
) -> Result<(), Reason> {
    if relay.flags & RELAY_DNS_QUERIES_UP == 0 {
        return Ok(());
    }
    if l4.is_some() && parse::is_dns_response(ctx) {
        return Err(Reason::RelayAnswerBlocked);
    }
    parse::pull_headers(ctx, ctx.len() as usize);
    let payload = if l4.is_some() { L4_OFF + 8 } else { L4_OFF };
    if parse::carries(ctx, payload, ip.saddr) {
        return Err(Reason::RelayCarriesAddress);
    }
    Ok(())
}

/// VM to LAN: a relay target's datagram to its group (or to the limited
/// broadcast address, for a broadcast relay), on the interface that routes
/// to it, is copied out of the uplink with the uplink's address as source
/// (so LAN peers answer the uplink, where forward rules wait), the sender's
/// TTL or the configured one, and valid checksums.
#[inline(always)]
pub fn to_lan(ctx: &TcContext, ip: &Ipv4) -> Result<Verdict, Reason> {
    let (relay, key, l4) = lookup(ctx, ip, ip.daddr)?;
    if !relay.has_target(ip.saddr) {
        return Err(Reason::RelayNotTarget);
    }
    // SAFETY: reading a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib::reverse_path(ctx, ifindex, ip.saddr, ip.daddr, ip.proto)?;
    let uplink = maps::usable_uplink()?;
    refuse_internal(ctx, ip, relay, l4.as_ref())?;
    take_token(ip, relay, RelayDirection::Up, Reason::RelayRateLimited)?;
    follow_fragments(ip, key);

    let (dst_mac, src_mac) = nat::macs(ctx).ok_or(Reason::Truncated)?;
    let saved = nat::checksums(ctx, l4.as_ref()).ok_or(Reason::Truncated)?;
    let ttl = if relay.ttl != 0 { relay.ttl } else { ip.ttl };
    let copied = nat::set_addr(ctx, ip, l4.as_ref(), End::Source, uplink.addr)
        .and_then(|()| nat::set_ttl(ctx, ttl))
        .and_then(|()| nat::set_macs(ctx, relay_dst_mac(ip.daddr), uplink.mac))
        .map(|()| ctx.clone_redirect(uplink.ifindex, 0).is_ok());
    let restored = nat::set_addr(ctx, ip, l4.as_ref(), End::Source, ip.saddr)
        .and_then(|()| nat::set_ttl(ctx, ip.ttl))
        .and_then(|()| nat::set_macs(ctx, dst_mac, src_mac))
        .and_then(|()| nat::restore_checksums(ctx, saved));
    restored?;
    if !copied? {
        return Err(Reason::RelayCloneFailed);
    }
    maps::count_relay(relay.slot, RelayEvent::Up(ip.tot_len));
    Ok(Verdict::Relayed)
}
