//! Every map of the datapath, and the helpers that read and count through
//! them. Maps are pinned by name so a restarted daemon adopts them.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, lpm_trie::Key},
};
use core::mem::MaybeUninit;

use forwarder_common::{
    maps::{
        DEFAULT_FLOW_TABLE_SIZE, FlowEntry, FlowKey, ForwardRule, FragmentKey, FragmentTrain,
        MAX_CACHED_ROUTES, MAX_IFACES, MAX_RELAYED_FRAGMENTS, MAX_RELAYS, MAX_ROUTE_MTUS,
        MAX_RULES, PREFIX24_WORDS, PendingUp, RateLimit, Relay, RelayCounters, RelayKey,
        ReverseKey, RouteEntry, RouteKey, RuleCounters, RuleKey, UplinkState,
    },
    reason::Reason,
};

use crate::mem;

#[map]
static UPLINK: Array<UplinkState> = Array::pinned(1, 0);

#[map]
static FORWARD_RULES: HashMap<RuleKey, ForwardRule> = HashMap::pinned(MAX_RULES, 0);

/// Target (address, port, protocol) to the key of the rule that owns it.
#[map]
static REVERSE_RULES: HashMap<ReverseKey, RuleKey> = HashMap::pinned(MAX_RULES, 0);

/// Each rule once, at its slot: a flow's packets find their rule here by
/// index (an array lookup the verifier inlines), the hash FORWARD_RULES
/// only when they start a flow. An unused slot has id 0.
#[map]
static RULE_SLOTS: Array<ForwardRule> = Array::pinned(MAX_RULES, 0);

#[map]
static RULE_COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::pinned(MAX_RULES, 0);

#[map]
static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

#[map]
static RELAYS: HashMap<RelayKey, Relay> = HashMap::pinned(MAX_RELAYS, 0);

#[map]
static RELAY_COUNTERS: PerCpuArray<RelayCounters> = PerCpuArray::pinned(MAX_RELAYS, 0);

/// Per relay and direction, the GCRA "theoretical arrival time" in ktime
/// nanoseconds: `2 * slot` toward the LAN, `2 * slot + 1` toward the VMs.
/// Shared by all CPUs: concurrent updates can let a copy or two more
/// through, which a rate limit for Wi-Fi airtime can afford.
#[map]
static RELAY_BUCKETS: Array<u64> = Array::pinned(2 * MAX_RELAYS, 0);

/// MAC of every interface the downstream program is attached to, written by
/// userspace: relay copies toward a VM need the egress MAC, which a FIB
/// lookup only yields together with a resolved neighbour.
#[map]
static DOWNSTREAM_MACS: HashMap<u32, [u8; 6]> = HashMap::pinned(MAX_IFACES, 0);

/// FIB results, so a packet of a known flow costs a hash lookup instead of
/// two FIB lookups (the reverse-path check and the route).
#[map]
static ROUTE_CACHE: LruHashMap<RouteKey, RouteEntry> = LruHashMap::pinned(MAX_CACHED_ROUTES, 0);

/// Bumped by userspace on every rtnetlink change that can change a FIB
/// result; an entry of ROUTE_CACHE is only used while its generation
/// matches.
#[map]
static FIB_GENERATION: Array<u32> = Array::pinned(1, 0);

/// Flows the LAN started, so a target's packet is only translated back as
/// the answer to one (LRU: a full table forgets the least recently used,
/// which its peer's next packet recreates). Userspace sets the size.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::pinned(DEFAULT_FLOW_TABLE_SIZE, 0);

#[inline(always)]
pub fn flow(key: &FlowKey) -> Option<*mut FlowEntry> {
    FLOWS.get_ptr_mut(key)
}

/// An LRU insert only fails without memory; the flow is then recreated by
/// the peer's next packet.
/// Where a new flow's entry is built (one per CPU, a scratch map): a
/// FlowEntry on the stack would not fit beside the rest of the uplink
/// program's.
#[map]
static NEW_FLOW: PerCpuArray<FlowEntry> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch entry, zeroed.
#[inline(always)]
pub fn new_flow() -> Option<&'static mut FlowEntry> {
    let slot = NEW_FLOW.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value, this program's alone while it runs;
    // FlowEntry is plain old data of a whole number of u64 words.
    unsafe {
        mem::zeroed(&mut *slot.cast::<MaybeUninit<[u64; size_of::<FlowEntry>() / 8]>>());
        Some(&mut *slot)
    }
}

#[inline(always)]
pub fn insert_flow(key: &FlowKey, entry: &FlowEntry) -> Result<(), i32> {
    FLOWS.insert(key, entry, u64::from(BPF_ANY))
}

#[inline(always)]
pub fn remove_flow(key: &FlowKey) {
    let _ = FLOWS.remove(key);
}

/// Fragmented datagrams whose first fragment was relayed: the later
/// fragments carry no UDP header to find their relay by.
#[map]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentTrain> =
    LruHashMap::pinned(MAX_RELAYED_FRAGMENTS, 0);

#[inline(always)]
pub fn fragment_train(key: &FragmentKey) -> Option<FragmentTrain> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { FRAGMENTS.get(key).copied() }
}

/// Failure only means the later fragments are left to the stack.
#[inline(always)]
pub fn set_fragment_train(key: &FragmentKey, train: &FragmentTrain) -> Result<(), i32> {
    FRAGMENTS.insert(key, train, u64::from(BPF_ANY))
}

#[inline(always)]
pub fn end_fragment_train(key: &FragmentKey) {
    let _ = FRAGMENTS.remove(key);
}

/// The internal /24s (see forwarder_common::maps::PREFIX24_WORDS), written
/// by userspace.
#[map]
static INTERNAL_NETS: Array<[u64; PREFIX24_WORDS]> = Array::pinned(1, 0);

#[inline(always)]
pub fn internal_nets() -> Option<&'static [u64; PREFIX24_WORDS]> {
    INTERNAL_NETS.get(0)
}

/// A relay copy toward the LAN between its stages (per CPU).
#[map]
static PENDING_UP: PerCpuArray<PendingUp> = PerCpuArray::with_max_entries(1, 0);

/// The stages of a relay copy toward the LAN, filled by userspace with
/// each load's programs (see forwarder_common::maps::programs). Pinned: a
/// program array forgets its programs when no file refers to it, and the
/// relays must work while the daemon is dead.
#[map]
static RELAY_UP_STAGES: ProgramArray = ProgramArray::pinned(2, 0);

/// Goes on with a relay copy's next stage; returns only if the stage is
/// missing, and then the copy is not made.
#[inline(always)]
pub fn next_stage<C: EbpfContext>(ctx: &C, stage: u32) -> Reason {
    // SAFETY: the stages are programs of this object, of the same type,
    // reading what the caller left in PENDING_UP.
    unsafe { RELAY_UP_STAGES.tail_call(ctx, stage) };
    Reason::RelayUnscannable
}

/// The pending copy's slot. Every access goes through `read`/`write`,
/// field by field and volatile: what the scan and the copy read back must
/// come from the map, not from what the compiler remembers, and a whole
/// PendingUp on the stack would not fit beside the rest.
#[inline(always)]
pub fn pending_up() -> Result<*mut PendingUp, Reason> {
    PENDING_UP.get_ptr_mut(0).ok_or(Reason::RelayUnscannable)
}

/// Reads a field of a map value the program holds a pointer to.
#[inline(always)]
pub fn read<T: Copy>(field: *const T) -> T {
    // SAFETY: callers pass fields of a map value, valid while the program
    // runs; a per-CPU value is this program's alone.
    unsafe { core::ptr::read_volatile(field) }
}

/// Writes a field of a map value the program holds a pointer to.
#[inline(always)]
pub fn write<T: Copy>(field: *mut T, value: T) {
    // SAFETY: as for `read`.
    unsafe { core::ptr::write_volatile(field, value) }
}

/// The MTU of every route that has one of its own, by destination prefix.
/// The kernel's forwarding honours it; `bpf_fib_lookup` reports it only
/// when it is locked, so userspace copies them here from rtnetlink.
#[map]
static ROUTE_MTUS: LpmTrie<u32, u32> = LpmTrie::pinned(MAX_ROUTE_MTUS, BPF_F_NO_PREALLOC);

/// The MTU of the most specific route to `daddr` that has one, or 0.
#[inline(always)]
pub fn route_mtu(daddr: u32) -> u32 {
    ROUTE_MTUS.get(Key::new(32, daddr)).copied().unwrap_or(0)
}

/// A kernel log record noted for `kernel_log` to write (see log), with the
/// action of the program that noted it.
pub struct LogEvent {
    pub pending: u32,
    pub kind: u32,
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub extra: u32,
    pub code: i64,
    pub action: i32,
}

/// The record the program running on this CPU noted, if any.
#[map]
static LOG_EVENT: PerCpuArray<LogEvent> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn log_event() -> Option<*mut LogEvent> {
    LOG_EVENT.get_ptr_mut(0)
}

/// `kernel_log`, filled by userspace with each load's program. Not pinned:
/// with no daemon to read the records, none need be written.
#[map]
static KERNEL_LOG_STAGE: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Goes on with `kernel_log`; returns only if it is missing.
#[inline(always)]
pub fn write_log<C: EbpfContext>(ctx: &C) {
    // SAFETY: `kernel_log` is a program of this object, of the same type,
    // reading what the caller left in LOG_EVENT.
    unsafe { KERNEL_LOG_STAGE.tail_call(ctx, 0) };
}

/// Kinds of kernel log records (see log::Kind) LOG_TIMES has room for.
pub const LOG_KINDS: u32 = 16;
/// The least time between two kernel log records of one kind.
const LOG_INTERVAL_NS: u64 = 1_000_000_000;

/// When each kind of kernel log record was last written (ktime). Shared by
/// all CPUs: two records may slip through together, which a limit against
/// flooding the daemon's log can afford.
#[map]
static LOG_TIMES: Array<u64> = Array::with_max_entries(LOG_KINDS, 0);

/// Whether a kernel log record of `kind` may be written now; if so, it is
/// taken as written.
#[inline(always)]
pub fn log_allowed(kind: u32) -> bool {
    let Some(last) = LOG_TIMES.get_ptr_mut(kind) else {
        return false;
    };
    // SAFETY: plain helper call; last points into the map value.
    unsafe {
        let now = bpf_ktime_get_ns();
        if *last != 0 && now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

#[inline(always)]
pub fn fib_generation() -> u32 {
    FIB_GENERATION.get(0).copied().unwrap_or(0)
}

#[inline(always)]
pub fn cached_route(key: &RouteKey) -> Option<RouteEntry> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { ROUTE_CACHE.get(key).copied() }
}

/// A full cache evicts the least recently used entry; failure only costs a
/// FIB lookup next time.
#[inline(always)]
pub fn cache_route(key: &RouteKey, entry: &RouteEntry) -> Result<(), i32> {
    ROUTE_CACHE.insert(key, entry, 0)
}

#[inline(always)]
pub fn uplink() -> Option<UplinkState> {
    UPLINK.get(0).copied()
}

/// The uplink, if it is up and has an address to translate to.
#[inline(always)]
pub fn usable_uplink() -> Result<UplinkState, Reason> {
    uplink()
        .filter(UplinkState::usable)
        .ok_or(Reason::NoUplinkAddress)
}

/// A rule, in place: copying its 80 bytes out cost time on every packet.
#[inline(always)]
pub fn forward_rule(key: &RuleKey) -> Option<&'static ForwardRule> {
    // SAFETY: the kernel keeps a map value alive until the program returns;
    // a concurrent update can only change it as it could change a copy.
    unsafe { FORWARD_RULES.get(key) }
}

/// The rule that opened `flow`, while it is installed: the rule in the
/// flow's slot, if it carries the flow's rule id (ids are never reused).
#[inline(always)]
pub fn rule_of_flow(flow: &FlowEntry) -> Option<&'static ForwardRule> {
    let rule = RULE_SLOTS.get(u32::from(flow.rule_slot))?;
    (rule.id != 0 && rule.id == flow.rule_id).then_some(rule)
}

#[inline(always)]
pub fn reverse_rule(key: &ReverseKey) -> Option<RuleKey> {
    // SAFETY: as above.
    unsafe { REVERSE_RULES.get(key).copied() }
}

#[inline(always)]
pub fn relay(key: &RelayKey) -> Option<&'static Relay> {
    // SAFETY: as for forward_rule.
    unsafe { RELAYS.get(key) }
}

#[inline(always)]
pub fn downstream_mac(ifindex: u32) -> Option<[u8; 6]> {
    // SAFETY: as above.
    unsafe { DOWNSTREAM_MACS.get(ifindex).copied() }
}

/// Which way a relay copies.
#[derive(Clone, Copy)]
pub enum RelayDirection {
    /// From a VM out of the uplink.
    Up,
    /// From the LAN toward the VMs.
    Down,
}

/// GCRA: a copy is allowed unless the bucket is more than `burst_ns` ahead
/// of now; each allowed copy moves it `interval_ns` further.
#[inline(always)]
pub fn take_relay_token(relay: &Relay, direction: RelayDirection) -> bool {
    let (limit, bucket): (&RateLimit, u32) = match direction {
        RelayDirection::Up => (&relay.up, 2 * relay.slot),
        RelayDirection::Down => (&relay.down, 2 * relay.slot + 1),
    };
    if limit.interval_ns == 0 {
        return true;
    }
    let Some(tat) = RELAY_BUCKETS.get_ptr_mut(bucket) else {
        return false;
    };
    // SAFETY: plain helper call; tat points into the map value.
    unsafe {
        let now = bpf_ktime_get_ns();
        let base = if *tat > now { *tat } else { now };
        if base - now > limit.burst_ns {
            return false;
        }
        *tat = base + limit.interval_ns;
    }
    true
}

#[derive(Clone, Copy)]
pub enum RelayEvent {
    /// A copy went out of the uplink.
    Up(u16),
    /// A copy went toward a VM.
    Down(u16),
    RateLimited(RelayDirection),
}

#[inline(always)]
pub fn count_relay(slot: u32, event: RelayEvent) {
    if let Some(counters) = RELAY_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        let counters = unsafe { &mut *counters };
        match event {
            RelayEvent::Up(bytes) => {
                counters.packets_up += 1;
                counters.bytes_up += u64::from(bytes);
            }
            RelayEvent::Down(bytes) => {
                counters.packets_down += 1;
                counters.bytes_down += u64::from(bytes);
            }
            RelayEvent::RateLimited(RelayDirection::Up) => counters.rate_limited += 1,
            RelayEvent::RateLimited(RelayDirection::Down) => counters.rate_limited_down += 1,
        }
    }
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
