//! The flow table: the LAN side creates flows, a target's packet is only
//! translated back as part of one. Entries age by conntrack-like idle
//! timeouts; one lost to LRU eviction is recreated by the peer's next packet
//! (loose pickup), never by a target's. A packet changes its flow only once
//! it has passed every check, so another host's packet that fails one
//! cannot touch a flow it does not belong to.

use forwarder_common::{
    flow::{self, REFRESH_NS, Segment},
    maps::{FlowEntry, FlowKey, FlowRoute, ForwardRule},
    reason::Reason,
};

use crate::{log, maps};

/// Moves a live entry by one checked packet; `seen_ns` is rewritten when
/// the state changes or it is older than REFRESH_NS.
#[inline(always)]
fn touch(entry: &mut FlowEntry, from_peer: bool, segment: &Segment, now: u64) {
    let changed = flow::advance(entry, from_peer, segment);
    if changed || now.saturating_sub(entry.seen_ns) > REFRESH_NS {
        entry.seen_ns = now;
    }
}

/// The table's entry for `key`, live or not, looked up once per packet:
/// before the rule, so that a flow's packets find their rule by its slot.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<&'static mut FlowEntry> {
    let entry = maps::flow(key)?;
    // SAFETY: a map value stays valid until the program returns; a
    // concurrent writer can only make a field stale, as in any racy
    // counter.
    Some(unsafe { &mut *entry })
}

/// The live flow of rule `rule_id` a packet from the LAN peer continues,
/// of the entry `lookup` found; None when the packet starts a new one.
/// Changes nothing.
#[inline(always)]
pub fn of_peer(
    found: Option<&'static mut FlowEntry>,
    key: &FlowKey,
    rule_id: u32,
    segment: &Segment,
    now: u64,
) -> Option<&'static mut FlowEntry> {
    let entry = found?;
    (entry.rule_id == rule_id
        && !flow::expired(entry, key.proto, now)
        && !flow::reopens(entry.state, segment.flags))
    .then_some(entry)
}

/// The live flow of rule `rule_id` a target's packet answers, of the
/// entry `lookup` found for `key`. A live flow is not changed: the packet
/// has not passed its route checks yet. A dead one (timed out, or of a rule
/// that is gone) serves nobody and is removed.
#[inline(always)]
pub fn of_target(
    found: Option<&'static mut FlowEntry>,
    key: &FlowKey,
    rule_id: u32,
    now: u64,
) -> Result<&'static mut FlowEntry, Reason> {
    let entry = found.ok_or(Reason::NoFlow)?;
    if entry.rule_id != rule_id || flow::expired(entry, key.proto, now) {
        maps::remove_flow(key);
        return Err(Reason::NoFlow);
    }
    Ok(entry)
}

/// A reset the flow's other side would not believe is not forwarded.
#[inline(always)]
pub fn believable(
    entry: Option<&FlowEntry>,
    from_peer: bool,
    segment: &Segment,
) -> Result<(), Reason> {
    match entry {
        Some(entry) if !flow::acceptable(entry, from_peer, segment) => Err(Reason::TcpOutOfWindow),
        _ => Ok(()),
    }
}

/// A forwarded packet from the LAN peer of `rule`, past every check:
/// refreshes the live flow `of_peer` found, or creates one. `to_target`,
/// when given, replaces the route the flow remembers.
#[inline(always)]
pub fn from_peer(
    key: &FlowKey,
    live: Option<&mut FlowEntry>,
    rule: &ForwardRule,
    segment: &Segment,
    now: u64,
    to_target: Option<FlowRoute>,
) {
    if let Some(entry) = live {
        touch(entry, true, segment, now);
        if let Some(route) = to_target {
            entry.to_target = route;
        }
        return;
    }
    // Without a scratch entry the flow is not recorded, and the peer's next
    // packet tries again.
    let Some(entry) = maps::new_flow() else {
        return;
    };
    // Below MAX_RULES, which fits (see forwarder-common's maps).
    flow::open(entry, rule.id, rule.slot as u16, segment, now);
    if let Some(route) = to_target {
        entry.to_target = route;
    }
    if let Err(code) = maps::insert_flow(key, entry) {
        log::flow_refused(key.peer_addr, key.peer_port, code);
    }
}

/// A packet from the target, past every check, in the flow `of_target`
/// found. `to_peer`, when given, replaces the route the flow remembers.
#[inline(always)]
pub fn from_target(entry: &mut FlowEntry, segment: &Segment, now: u64, to_peer: Option<FlowRoute>) {
    touch(entry, false, segment, now);
    if let Some(route) = to_peer {
        entry.to_peer = route;
    }
}
