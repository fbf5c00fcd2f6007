//! Relays: copies of datagrams to a relay group (multicast, or broadcast)
//! with bpf_clone_redirect, between the uplink and the relay's target VMs.
//! The original always continues as it came; edits made for a copy are
//! undone. (bpf_clone_redirect unclones the original, so undoing them
//! cannot reach a copy already sent.) A fragmented datagram is relayed
//! fragment by fragment: the first finds the relay by its UDP header and
//! the rest follow it, in order, as a train keyed by the interface they
//! arrive on, their source and IP id. Every fragment meets the same checks
//! and pays the same token as a whole datagram, and the train changes only
//! once a fragment has passed them all.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use forwarder_common::{
    maps::{
        FragmentKey, FragmentTrain, MAX_RELAY_TARGETS, RELAY_DNS_QUERIES_UP, Relay, RelayKey,
        STAGE_COPY, STAGE_SCAN, TICKET_NS, TRAIN_END, TRAIN_NEXT, TRAIN_START, Ticket, Train,
        UplinkState, among_first, relay_dst_mac,
    },
    reason::Reason,
};
use network_types::ip::IpProto;

use crate::{
    fib, lan, leak, log,
    maps::{self, RelayDirection, RelayEvent},
    mem,
    nat::{self, End},
    parse::{self, Fragment, Ipv4, L3_OFF, L4, L4_OFF, UDP_HLEN},
    verdict::Verdict,
};

/// How long the later fragments of a relayed datagram may trail its first.
const FRAGMENT_TRAIN_NS: u64 = 2_000_000_000;

/// A datagram, or one of its fragments, that a relay may copy: the relay,
/// its key, the UDP header when this packet has one, and what copying it
/// does to the fragment train.
struct Relayed {
    relay: &'static Relay,
    key: RelayKey,
    l4: Option<L4>,
    train: Train,
}

/// Records the train once its packet passed every check.
#[inline(always)]
fn record(train: &Train) {
    match train.step {
        TRAIN_START | TRAIN_NEXT => {
            if let Err(code) = maps::set_fragment_train(&train.key, &train.value) {
                let key = &train.key;
                log::fragment_refused(key.ifindex, key.saddr, key.daddr, key.id, code);
            }
        }
        TRAIN_END => maps::end_fragment_train(&train.key),
        _ => {}
    }
}

/// The relay a datagram (or one of its fragments) sent to `group` and
/// arriving on `ifindex` belongs to. Reads the fragment train, changes
/// nothing.
#[inline(always)]
fn lookup(ctx: &TcContext, ip: &Ipv4, group: u32, ifindex: u32) -> Result<Relayed, Reason> {
    if !ip.carries(IpProto::Udp) {
        return Err(Reason::OtherProtocol);
    }
    let key = FragmentKey {
        ifindex,
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        pad: 0,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    match ip.fragment {
        Fragment::Whole | Fragment::First => {
            let l4 = parse::parse_l4(ctx, ip)?;
            let relay_key = RelayKey {
                group,
                port: l4.dport,
                pad: 0,
            };
            let relay = maps::relay(&relay_key).ok_or(Reason::OtherDestination)?;
            let mut train = Train {
                key,
                ..Train::default()
            };
            if ip.fragment == Fragment::First {
                let fresh = FragmentTrain {
                    relay: relay_key,
                    until_ns: now + FRAGMENT_TRAIN_NS,
                    ..FragmentTrain::default()
                };
                let next_offset = fresh
                    .follows(0, ip.payload_len(), true)
                    .ok_or(Reason::FragmentOutOfOrder)?;
                train.value = FragmentTrain {
                    next_offset,
                    ..fresh
                };
                train.step = TRAIN_START;
            }
            Ok(Relayed {
                relay,
                key: relay_key,
                l4: Some(l4),
                train,
            })
        }
        Fragment::Later { last } => {
            let train = maps::fragment_train(&key).ok_or(Reason::Fragment)?;
            if now > train.until_ns {
                return Err(Reason::Fragment);
            }
            let next_offset = train
                .follows(ip.frag_offset, ip.payload_len(), !last)
                .ok_or(Reason::FragmentOutOfOrder)?;
            let relay = maps::relay(&train.relay).ok_or(Reason::OtherDestination)?;
            Ok(Relayed {
                relay,
                key: train.relay,
                l4: None,
                train: Train {
                    key,
                    value: FragmentTrain {
                        next_offset,
                        ..train
                    },
                    step: if last { TRAIN_END } else { TRAIN_NEXT },
                    ..Train::default()
                },
            })
        }
    }
}

/// Every packet of a datagram, fragments included, pays one token.
#[inline(always)]
fn take_token(relay: &Relay, direction: RelayDirection, limited: Reason) -> Result<(), Reason> {
    if maps::take_relay_token(relay, direction) {
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
    let Relayed {
        relay, l4, train, ..
    } = lookup(ctx, ip, group, uplink.ifindex)?;
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
    take_token(relay, RelayDirection::Down, Reason::RelayDownRateLimited)?;
    record(&train);

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
    match ctx.clone_redirect(ifindex, 0) {
        Ok(()) => maps::count_relay(relay.slot, RelayEvent::Down(ip.tot_len)),
        Err(code) => {
            log::clone_failed(ifindex, ip.saddr, target, code);
            copies.failed = true;
        }
    }
    if let Some(slot) = copies.sent_to.get_mut(copies.count) {
        *slot = ifindex;
    }
    copies.count += 1;
    Ok(true)
}

/// VM to LAN: a relay target's datagram to its group (or to the limited
/// broadcast address, for a broadcast relay), on the interface that routes
/// to it, is copied out of the uplink with the uplink's address as source
/// (so LAN peers answer the uplink, where forward rules wait), the sender's
/// TTL or the configured one, and valid checksums. Never copied: a DNS
/// relay's answers (their records carry the VM's internal address), and any
/// datagram whose payload names an internal address (see `leak`).
///
/// This part checks the packet and pays its token, then hands on to the
/// stages `scan_up` and `copy_up`, programs of their own, through
/// PENDING_UP.
#[inline(always)]
pub fn to_lan(ctx: &TcContext, ip: &Ipv4) -> Result<Verdict, Reason> {
    // SAFETY: reading a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Relayed {
        relay,
        key,
        l4,
        train,
    } = lookup(ctx, ip, ip.daddr, ifindex)?;
    if !relay.has_target(ip.saddr) {
        return Err(Reason::RelayNotTarget);
    }
    fib::reverse_path(ctx, ifindex, ip.saddr, ip.daddr, ip.proto)?;
    maps::usable_uplink()?;
    if relay.flags & RELAY_DNS_QUERIES_UP != 0 && l4.is_some() && parse::is_dns_response(ctx) {
        return Err(Reason::RelayAnswerBlocked);
    }
    take_token(relay, RelayDirection::Up, Reason::RelayRateLimited)?;
    let from = if l4.is_some() {
        L4_OFF + UDP_HLEN
    } else {
        L4_OFF
    };
    let pending = maps::pending_up()?;
    // SAFETY (each field): a pointer into the map value.
    unsafe {
        maps::write(&raw mut (*pending).ticket, ticket(ifindex, ip));
        maps::write(&raw mut (*pending).relay, key);
        maps::write(&raw mut (*pending).train, train);
        maps::write(&raw mut (*pending).from, from as u32);
        maps::write(&raw mut (*pending).hits, 0);
        maps::write(
            &raw mut (*pending).to,
            (L3_OFF + usize::from(ip.tot_len)) as u32,
        );
    }
    Err(next_stage(ctx, STAGE_SCAN))
}

/// The first stage: the address scan, a pass at a time, whose count of
/// hits goes to the copy.
#[inline(always)]
pub fn scan_up(ctx: &TcContext) -> Result<Verdict, Reason> {
    match leak::scan_pending(ctx)? {
        leak::Scanned::More => Err(next_stage(ctx, STAGE_SCAN)),
        leak::Scanned::Done => Err(next_stage(ctx, STAGE_COPY)),
    }
}

/// Goes on with the next stage; returns only if it is missing.
#[inline(always)]
fn next_stage(ctx: &TcContext, stage: u32) -> Reason {
    let reason = maps::next_stage(ctx, stage);
    log::stage_missing(stage);
    reason
}

/// The pending copy's ticket for the packet `ip`, arriving on `ifindex`.
#[inline(always)]
fn ticket(ifindex: u32, ip: &Ipv4) -> Ticket {
    Ticket {
        // SAFETY: plain helper call.
        written_ns: unsafe { bpf_ktime_get_ns() },
        ifindex,
        saddr: ip.saddr,
        id: ip.id,
        tot_len: ip.tot_len,
        pad: 0,
    }
}

/// The second stage: the copy, unless the scan found an internal address,
/// and only for the packet the first part checked. Everything else comes
/// from the packet again.
#[inline(always)]
pub fn copy_up(ctx: &TcContext) -> Result<Verdict, Reason> {
    parse::parse_eth(ctx)?;
    let ip = parse::parse_ipv4(ctx)?;
    let pending = maps::pending_up()?;
    // SAFETY (each field): a pointer into the map value.
    let (written, train, relay_key) = unsafe {
        (
            maps::read(&raw const (*pending).ticket),
            maps::read(&raw const (*pending).train),
            maps::read(&raw const (*pending).relay),
        )
    };
    // SAFETY: reading a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut expected = ticket(ifindex, &ip);
    if expected.written_ns.wrapping_sub(written.written_ns) > TICKET_NS {
        return Err(Reason::RelayUnscannable);
    }
    expected.written_ns = written.written_ns;
    if expected != written {
        return Err(Reason::RelayUnscannable);
    }
    if leak::pending_names_internal()? {
        return Err(Reason::RelayCarriesAddress);
    }
    record(&train);
    let l4 = match ip.fragment {
        Fragment::Later { .. } => None,
        Fragment::Whole | Fragment::First => Some(parse::parse_l4(ctx, &ip)?),
    };
    let relay = maps::relay(&relay_key).ok_or(Reason::OtherDestination)?;
    let uplink = maps::usable_uplink()?;

    let (dst_mac, src_mac) = nat::macs(ctx).ok_or(Reason::Truncated)?;
    let saved = nat::checksums(ctx, l4.as_ref()).ok_or(Reason::Truncated)?;
    let ttl = if relay.ttl != 0 { relay.ttl } else { ip.ttl };
    let copied = nat::set_addr(ctx, &ip, l4.as_ref(), End::Source, uplink.addr)
        .and_then(|()| nat::set_ttl(ctx, ttl))
        .and_then(|()| nat::set_macs(ctx, relay_dst_mac(ip.daddr), uplink.mac))
        .map(|()| {
            ctx.clone_redirect(uplink.ifindex, 0)
                .inspect_err(|&code| log::clone_failed(uplink.ifindex, uplink.addr, ip.daddr, code))
                .is_ok()
        });
    let restored = nat::set_addr(ctx, &ip, l4.as_ref(), End::Source, ip.saddr)
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
