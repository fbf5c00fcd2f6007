//! Every map of the datapath, and the helpers that read and count through
//! them. Maps are pinned by name so a restarted daemon adopts them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use forwarder_common::{
    maps::{ForwardRule, MAX_RULES, ReverseKey, RuleCounters, RuleKey, UplinkState},
    reason::Reason,
};

#[map]
static UPLINK: Array<UplinkState> = Array::pinned(1, 0);

#[map]
static FORWARD_RULES: HashMap<RuleKey, ForwardRule> = HashMap::pinned(MAX_RULES, 0);

/// Target (address, port, protocol) to the key of the rule that owns it.
#[map]
static REVERSE_RULES: HashMap<ReverseKey, RuleKey> = HashMap::pinned(MAX_RULES, 0);

#[map]
static RULE_COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::pinned(MAX_RULES, 0);

#[map]
static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

#[inline(always)]
pub fn uplink() -> Option<UplinkState> {
    UPLINK.get(0).copied()
}

#[inline(always)]
pub fn forward_rule(key: &RuleKey) -> Option<ForwardRule> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { FORWARD_RULES.get(key).copied() }
}

#[inline(always)]
pub fn reverse_rule(key: &ReverseKey) -> Option<RuleKey> {
    // SAFETY: as above.
    unsafe { REVERSE_RULES.get(key).copied() }
}

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(counter) = REASON_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; no other writer while this program runs here.
        unsafe { *counter += 1 };
    }
}

#[derive(Clone, Copy)]
pub enum Direction {
    /// Peer to target.
    In,
    /// Target back to the peer.
    Out,
}

#[inline(always)]
pub fn count_rule(slot: u32, direction: Direction, bytes: u16) {
    if let Some(counters) = RULE_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, as above.
        let counters = unsafe { &mut *counters };
        match direction {
            Direction::In => {
                counters.packets_in += 1;
                counters.bytes_in += u64::from(bytes);
            }
            Direction::Out => {
                counters.packets_out += 1;
                counters.bytes_out += u64::from(bytes);
            }
        }
    }
}
