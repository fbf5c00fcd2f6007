//! The flow table: the LAN side creates flows, a target's packet is only
//! translated back as part of one. Entries age by conntrack-like idle
//! timeouts; one lost to LRU eviction is recreated by the peer's next packet
//! (loose pickup), never by a target's.

use forwarder_common::{
    flow::{self, REFRESH_NS},
    maps::{FlowEntry, FlowKey, FlowRoute},
    reason::Reason,
};

use crate::maps;

/// Moves a live entry to its next state; `seen_ns` is rewritten when the
/// state changes or it is older than REFRESH_NS.
#[inline(always)]
fn touch(entry: &mut FlowEntry, from_peer: bool, tcp_flags: u8, now: u64) {
    let state = flow::next_state(entry.state, from_peer, tcp_flags);
    if state != entry.state || now.saturating_sub(entry.seen_ns) > REFRESH_NS {
        entry.state = state;
        entry.seen_ns = now;
    }
}

/// The live flow of rule `rule_id` a packet from the LAN peer continues;
/// None when the packet starts a new one.
#[inline(always)]
pub fn of_peer(
    key: &FlowKey,
    rule_id: u32,
    tcp_flags: u8,
    now: u64,
) -> Option<&'static mut FlowEntry> {
    let entry = maps::flow(key)?;
    // SAFETY: a map value stays valid until the program returns; a
    // concurrent writer can only make a field stale, as in any racy
    // counter.
    let entry = unsafe { &mut *entry };
    (entry.rule_id == rule_id
        && !flow::expired(entry, key.proto, now)
        && !flow::reopens(entry.state, tcp_flags))
    .then_some(entry)
}

/// A forwarded packet from the LAN peer of rule `rule_id`: refreshes the
/// live flow `of_peer` found, or creates one. `to_target`, when given,
/// replaces the route the flow remembers.
#[inline(always)]
pub fn from_peer(
    key: &FlowKey,
    live: Option<&mut FlowEntry>,
    rule_id: u32,
    tcp_flags: u8,
    now: u64,
    to_target: Option<FlowRoute>,
) {
    if let Some(entry) = live {
        touch(entry, true, tcp_flags, now);
        if let Some(route) = to_target {
            entry.to_target = route;
        }
        return;
    }
    maps::insert_flow(
        key,
        &FlowEntry {
            rule_id,
            state: flow::next_state(0, true, tcp_flags),
            created_ns: now,
            seen_ns: now,
            to_target: to_target.unwrap_or_default(),
            ..FlowEntry::default()
        },
    );
}

/// A packet from the target of rule `rule_id`: allowed only as part of a
/// live flow of that rule, which it refreshes and returns. A stale entry is
/// removed.
#[inline(always)]
pub fn from_target(
    key: &FlowKey,
    rule_id: u32,
    tcp_flags: u8,
    now: u64,
) -> Result<&'static mut FlowEntry, Reason> {
    let entry = maps::flow(key).ok_or(Reason::NoFlow)?;
    // SAFETY: as in of_peer.
    let entry = unsafe { &mut *entry };
    if entry.rule_id != rule_id || flow::expired(entry, key.proto, now) {
        maps::remove_flow(key);
        return Err(Reason::NoFlow);
    }
    touch(entry, false, tcp_flags, now);
    Ok(entry)
}
