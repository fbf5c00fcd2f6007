//! Keys and values of the maps the eBPF programs and userspace share.
//!
//! Conventions: every IPv4 address is a `u32` holding the four octets in wire
//! order (`u32::from_ne_bytes(octets)`), every port a `u16` holding the two
//! bytes in wire order (`port.to_be()`). The programs then compare packet
//! fields with map fields without byte swapping. Structs are `repr(C)` with
//! explicit padding fields so the kernel and userspace agree on every byte.

use bytemuck::{Pod, Zeroable};

use crate::{layout::map_layout, map_type};

/// Capacity of the forward-rule maps and of the per-rule counter array.
pub const MAX_RULES: u32 = 16_384;
const _: () = assert!(
    MAX_RULES <= 1 << 16,
    "a flow keeps its rule's slot in a u16"
);
/// Allow-from CIDRs a single forward rule or relay can carry.
pub const MAX_ALLOW_CIDRS: usize = 8;
/// Capacity of the relay map and its counter array.
pub const MAX_RELAYS: u32 = 64;
/// Targets a single relay can copy to.
pub const MAX_RELAY_TARGETS: usize = 8;
/// Downstream interfaces the datapath knows the MAC of.
pub const MAX_IFACES: u32 = 4096;
/// FIB results the datapath keeps (LRU).
pub const MAX_CACHED_ROUTES: u32 = 65_536;
/// Routes with an MTU of their own the datapath knows (LPM trie).
pub const MAX_ROUTE_MTUS: u32 = 1024;
/// Fragmented datagrams being relayed at once (LRU).
pub const MAX_RELAYED_FRAGMENTS: u32 = 1024;
/// Forwarded flows the datapath tracks unless told otherwise (LRU).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65_536;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Map names as the eBPF object defines them.
pub mod names {
    pub const UPLINK: &str = "UPLINK";
    pub const FORWARD_RULES: &str = "FORWARD_RULES";
    pub const REVERSE_RULES: &str = "REVERSE_RULES";
    pub const RULE_SLOTS: &str = "RULE_SLOTS";
    pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
    pub const REASON_COUNTERS: &str = "REASON_COUNTERS";
    pub const RELAYS: &str = "RELAYS";
    pub const RELAY_COUNTERS: &str = "RELAY_COUNTERS";
    pub const RELAY_BUCKETS: &str = "RELAY_BUCKETS";
    pub const DOWNSTREAM_MACS: &str = "DOWNSTREAM_MACS";
    pub const ROUTE_CACHE: &str = "ROUTE_CACHE";
    pub const FIB_GENERATION: &str = "FIB_GENERATION";
    pub const FLOWS: &str = "FLOWS";
    pub const ROUTE_MTUS: &str = "ROUTE_MTUS";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const INTERNAL_NETS: &str = "INTERNAL_NETS";
    pub const RELAY_UP_STAGES: &str = "RELAY_UP_STAGES";
    pub const KERNEL_LOG_STAGE: &str = "KERNEL_LOG_STAGE";
}

/// The key and value fingerprint of every map the programs define, by
/// name. Part of the layout identity: a pinned map is adopted only when its
/// fingerprint, recorded when it was created, equals this build's.
pub const MAP_LAYOUTS: &[(&str, u64)] = &[
    (names::UPLINK, map_layout::<u32, UplinkState>()),
    (names::FORWARD_RULES, map_layout::<RuleKey, ForwardRule>()),
    (names::REVERSE_RULES, map_layout::<ReverseKey, RuleKey>()),
    (names::RULE_SLOTS, map_layout::<u32, ForwardRule>()),
    (names::RULE_COUNTERS, map_layout::<u32, RuleCounters>()),
    (names::REASON_COUNTERS, map_layout::<u32, u64>()),
    (names::RELAYS, map_layout::<RelayKey, Relay>()),
    (names::RELAY_COUNTERS, map_layout::<u32, RelayCounters>()),
    (names::RELAY_BUCKETS, map_layout::<u32, u64>()),
    (names::DOWNSTREAM_MACS, map_layout::<u32, [u8; 6]>()),
    (names::ROUTE_CACHE, map_layout::<RouteKey, RouteEntry>()),
    (names::FIB_GENERATION, map_layout::<u32, u32>()),
    (names::FLOWS, map_layout::<FlowKey, FlowEntry>()),
    // An LPM key: prefix length, then the address.
    (names::ROUTE_MTUS, map_layout::<[u32; 2], u32>()),
    (names::FRAGMENTS, map_layout::<FragmentKey, FragmentTrain>()),
    (
        names::INTERNAL_NETS,
        map_layout::<u32, [u64; PREFIX24_WORDS]>(),
    ),
    // Program file descriptors.
    (names::RELAY_UP_STAGES, map_layout::<u32, u32>()),
];

/// The fingerprint MAP_LAYOUTS records for the map `name`.
pub fn layout_named(name: &str) -> Option<u64> {
    MAP_LAYOUTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, l)| *l)
}

/// Program names as the eBPF object defines them.
pub mod programs {
    pub const UPLINK_INGRESS: &str = "uplink_ingress";
    pub const DOWNSTREAM_INGRESS: &str = "downstream_ingress";
    /// The stages of a relay copy toward the LAN that `downstream_ingress`
    /// tail-calls, each its own program so the verifier walks the address
    /// scan's loop with a fresh budget and one state, and in this order in
    /// RELAY_UP_STAGES.
    pub const RELAY_UP_STAGES: [&str; 2] = ["relay_up_scan", "relay_up_copy"];
    /// Writes the kernel log record a program noted; every program
    /// tail-calls it through KERNEL_LOG_STAGE on the way out.
    pub const KERNEL_LOG: &str = "kernel_log";
}

/// RELAY_UP_STAGES' slot of the address scan.
pub const STAGE_SCAN: u32 = 0;
/// RELAY_UP_STAGES' slot of the copy.
pub const STAGE_COPY: u32 = 1;

/// Names of the read-only globals userspace sets when it loads the object,
/// after the start-up self-test has found what the kernel supports.
pub mod globals {
    /// Non-zero: the kernel accepts `BPF_FIB_LOOKUP_SKIP_NEIGH` (6.3+).
    pub const FIB_SKIP_NEIGH: &str = "FIB_SKIP_NEIGH";
    /// Non-zero: `bpf_fib_lookup` reports the route's MTU (5.12+), so a
    /// cached route can check a packet's length without a new lookup.
    pub const FIB_MTU_RESULT: &str = "FIB_MTU_RESULT";
    /// A `cut::Cut` the forwarding paths stop at (the bench's breakdown),
    /// or `cut::NONE`.
    pub const BENCH_CUT: &str = "BENCH_CUT";
}

/// `UplinkState::flags`: the link is administratively and operationally up.
pub const UPLINK_UP: u8 = 1;
/// `UplinkState::flags`: `addr` and `prefix_len` hold the primary address.
pub const UPLINK_HAS_ADDR: u8 = 2;

map_type! {
    /// The uplink as userspace last saw it on rtnetlink (single-entry array).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct UplinkState {
        pub ifindex: u32,
        pub addr: u32,
        pub prefix_len: u8,
        pub flags: u8,
        pub mac: [u8; 6],
    }
}

impl UplinkState {
    /// Forwarding needs both: an address to match and a link to send on.
    pub const fn usable(&self) -> bool {
        self.flags & (UPLINK_UP | UPLINK_HAS_ADDR) == (UPLINK_UP | UPLINK_HAS_ADDR)
    }

    /// The uplink's netmask in wire order; zero for a /0.
    pub const fn netmask(&self) -> u32 {
        prefix_to_mask(self.prefix_len)
    }

    /// Whether `peer` counts as a host of the uplink's LAN: inside its
    /// connected subnet, or any peer when the uplink is a /32, which leaves
    /// no subnet to compare with.
    pub const fn on_lan(&self, peer: u32) -> bool {
        self.prefix_len >= 32 || (peer ^ self.addr) & self.netmask() == 0
    }
}

/// The netmask of a prefix length, in wire order.
pub const fn prefix_to_mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else if prefix_len >= 32 {
        u32::MAX
    } else {
        (u32::MAX << (32 - prefix_len as u32)).to_be()
    }
}

map_type! {
    /// A forward rule is found by protocol and the uplink port it listens on.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
    pub struct RuleKey {
        pub port: u16,
        pub proto: u8,
        pub pad: u8,
    }
}

map_type! {
    /// An IPv4 network, address and mask in wire order.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct Cidr {
        pub addr: u32,
        pub mask: u32,
    }
}

impl Cidr {
    pub const fn contains(&self, addr: u32) -> bool {
        (addr ^ self.addr) & self.mask == 0
    }
}

/// `Allow::kind`: any peer.
pub const ALLOW_ANY: u8 = 0;
/// `Allow::kind`: the uplink's connected subnet when its prefix is
/// shorter than /32, otherwise any peer. Evaluated per packet against the
/// live uplink state, so it follows address changes with no userspace work.
pub const ALLOW_AUTO: u8 = 1;
/// `Allow::kind`: only peers in `cidrs[..n_cidrs]`.
pub const ALLOW_LIST: u8 = 2;

map_type! {
    /// Which LAN peers may use a rule or feed a relay.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct Allow {
        pub kind: u8,
        pub n_cidrs: u8,
        pub pad: u16,
        pub cidrs: [Cidr; MAX_ALLOW_CIDRS],
    }
}

impl Allow {
    /// Whether `peer` is allowed, given the uplink it arrived on.
    pub fn allows(&self, peer: u32, uplink: &UplinkState) -> bool {
        match self.kind {
            ALLOW_ANY => true,
            ALLOW_AUTO => uplink.on_lan(peer),
            _ => {
                let mut i = 0;
                while i < MAX_ALLOW_CIDRS {
                    if i >= self.n_cidrs as usize {
                        return false;
                    }
                    if self.cidrs[i].contains(peer) {
                        return true;
                    }
                    i += 1;
                }
                false
            }
        }
    }
}

map_type! {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct ForwardRule {
        pub target_addr: u32,
        pub target_port: u16,
        /// The target port minus the listen port, host order, wrapping:
        /// the same for every port of a range, so the rule's one entry in
        /// RULE_SLOTS serves each of them (see `target_port_for`).
        pub port_shift: u16,
        /// Index into `RULE_COUNTERS` and `RULE_SLOTS`, assigned by
        /// userspace; below MAX_RULES, so it fits a flow's `rule_slot`.
        pub slot: u32,
        /// Identity of this rule among all rules ever installed in these
        /// maps; a flow belongs to the rule whose id it carries, so a rule
        /// replaced on the same port never inherits the old one's flows.
        pub id: u32,
        /// CLOCK_BOOTTIME nanoseconds from which the programs no longer
        /// apply the rule, daemon or not; 0 for never.
        pub deadline_ns: u64,
        pub allow: Allow,
        pub pad2: u32,
    }
}

impl ForwardRule {
    /// The target port (wire order) of the listen port `port` (wire order).
    pub const fn target_port_for(&self, port: u16) -> u16 {
        u16::from_be(port).wrapping_add(self.port_shift).to_be()
    }

    /// Whether the rule's deadline has passed at `now` (CLOCK_BOOTTIME).
    pub const fn expired(&self, now: u64) -> bool {
        self.deadline_ns != 0 && now >= self.deadline_ns
    }
}

map_type! {
    /// Replies are found by the target's address, port and protocol.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
    pub struct ReverseKey {
        pub addr: u32,
        pub port: u16,
        pub proto: u8,
        pub pad: u8,
    }
}

map_type! {
    /// Per-rule traffic, one copy per CPU. "in" is LAN to target, "out" the
    /// replies; bytes are IP datagram lengths.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct RuleCounters {
        pub packets_in: u64,
        pub bytes_in: u64,
        pub packets_out: u64,
        pub bytes_out: u64,
    }
}

map_type! {
    /// A forwarded flow as the LAN side started it: the peer, its port, and
    /// the rule's protocol and listen port.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
    pub struct FlowKey {
        pub peer_addr: u32,
        pub peer_port: u16,
        pub listen_port: u16,
        pub proto: u8,
        pub pad: u8,
        pub pad2: u16,
    }
}

impl FlowKey {
    /// The key of a peer's flow on a rule's listen port (all wire order).
    pub const fn new(peer_addr: u32, peer_port: u16, proto: u8, listen_port: u16) -> Self {
        FlowKey {
            peer_addr,
            peer_port,
            listen_port,
            proto,
            pad: 0,
            pad2: 0,
        }
    }
}

map_type! {
    /// What the datapath knows of a flow: whose it is, how far TCP got,
    /// and when it was created and last seen (CLOCK_BOOTTIME nanoseconds).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct FlowEntry {
        /// `ForwardRule::id` of the rule that created it.
        pub rule_id: u32,
        /// `FLOW_*` bits.
        pub state: u8,
        pub pad: u8,
        /// `ForwardRule::slot` of that rule: a packet of the flow finds its
        /// rule in RULE_SLOTS by index, not by a hash lookup.
        pub rule_slot: u16,
        pub created_ns: u64,
        pub seen_ns: u64,
        /// The route checks of the peer's packets, passed on the uplink.
        pub to_target: FlowRoute,
        /// The route checks of the target's packets, passed on a downstream
        /// interface.
        pub to_peer: FlowRoute,
        /// What each side of a TCP flow has shown, to judge the other
        /// side's resets by.
        pub peer: TcpSide,
        pub target: TcpSide,
    }
}

map_type! {
    /// One side of a TCP flow: the sequence number and window scale of its
    /// SYN, and the acknowledgement and window of its latest segment, all
    /// in host order. `flags` says which of them it has sent (`SIDE_*`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct TcpSide {
        pub isn: u32,
        pub ack: u32,
        pub window: u16,
        pub wscale: u8,
        pub flags: u8,
    }
}

map_type! {
    /// A flow's route, remembered once a packet passed the reverse-path
    /// check and the forward lookup, so that its later packets skip both
    /// while the FIB generation holds. It serves only packets that arrive
    /// on `ingress`: the reverse-path verdict is about that interface.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct FlowRoute {
        /// 0: nothing remembered.
        pub ingress: u32,
        pub route: RouteEntry,
    }
}

map_type! {
    /// A relay is found by its group (or broadcast address) and UDP port.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
    pub struct RelayKey {
        pub group: u32,
        pub port: u16,
        pub pad: u16,
    }
}

map_type! {
    /// Copies datagrams to `group:port` between the uplink and the VMs in
    /// `targets`. Each direction is rate limited by a GCRA bucket: each copy
    /// costs `interval_ns`, and up to `burst_ns` of debt is allowed.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct Relay {
        pub targets: [u32; MAX_RELAY_TARGETS],
        pub n_targets: u8,
        /// TTL of copies sent to the LAN; 0 keeps the sender's.
        pub ttl: u8,
        /// `RELAY_*` bits.
        pub flags: u8,
        pub pad: u8,
        /// Index into `RELAY_COUNTERS`; buckets are `2 * slot` (to the LAN)
        /// and `2 * slot + 1` (to the VMs) of `RELAY_BUCKETS`.
        pub slot: u32,
        pub up: RateLimit,
        pub down: RateLimit,
        /// LAN peers whose datagrams are copied to the VMs.
        pub allow: Allow,
        pub pad2: u32,
    }
}

map_type! {
    /// A GCRA limit; an interval of 0 means unlimited.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct RateLimit {
        pub interval_ns: u64,
        pub burst_ns: u64,
    }
}

impl RateLimit {
    /// `rate` copies per second, with a burst of one second's worth.
    pub const fn per_second(rate: u32) -> Self {
        let rate = if rate == 0 { 1 } else { rate as u64 };
        let interval_ns = 1_000_000_000 / rate;
        RateLimit {
            interval_ns,
            burst_ns: interval_ns * (rate - 1),
        }
    }

    /// Copies per second this limit lets through in the long run.
    pub const fn rate(&self) -> u64 {
        match 1_000_000_000u64.checked_div(self.interval_ns) {
            Some(rate) => rate,
            None => 0,
        }
    }
}

/// `Relay::flags`: DNS (mDNS) traffic. Only queries go to the LAN: a VM's
/// answers carry records with its internal address.
pub const RELAY_DNS_QUERIES_UP: u8 = 1;

/// The limited broadcast address, the group of broadcast relays.
pub const BROADCAST: u32 = u32::MAX;

map_type! {
    /// A fragmented datagram in flight: the interface it arrived on, its
    /// source, destination and IP id. Another host, or the same address on
    /// another interface, cannot name this train.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
    pub struct FragmentKey {
        pub ifindex: u32,
        pub saddr: u32,
        pub daddr: u32,
        pub id: u16,
        pub pad: u16,
    }
}

map_type! {
    /// The relay whose first fragment was copied, so the rest of the
    /// datagram follows it, in order, until `until_ns` (ktime).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct FragmentTrain {
        pub relay: RelayKey,
        pub until_ns: u64,
        /// The fragment offset (in 8-byte units) the next fragment must
        /// have: fragments are relayed in order, without gaps or overlaps.
        pub next_offset: u16,
        pub pad: u16,
        pub pad2: u32,
        /// Where the address scan of a datagram going up stands.
        pub scan: AddressScan,
    }
}

/// `Train::step`: the packet is a whole datagram.
pub const TRAIN_NONE: u8 = 0;
/// `Train::step`: a first fragment starts a train.
pub const TRAIN_START: u8 = 1;
/// `Train::step`: a later fragment moves the train on.
pub const TRAIN_NEXT: u8 = 2;
/// `Train::step`: the last fragment ends the train.
pub const TRAIN_END: u8 = 3;

map_type! {
    /// What relaying one packet does to its datagram's fragment train: the
    /// step, and the train as it will stand once the packet is copied.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct Train {
        pub key: FragmentKey,
        pub value: FragmentTrain,
        /// `TRAIN_*`.
        pub step: u8,
        pub pad: u8,
        pub pad2: u16,
        pub pad3: u32,
    }
}

map_type! {
    /// A relay copy toward the LAN that has passed its checks and paid its
    /// token, handed from `downstream_ingress` to its stages (one per CPU,
    /// a scratch map).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct PendingUp {
        /// The packet this was written for: a stage reads the rest only
        /// for the very packet it runs on (while an upgrade swaps
        /// programs, an old program's stages are a new load's, reading
        /// another map).
        pub ticket: Ticket,
        pub relay: RelayKey,
        pub train: Train,
        /// The payload to scan, as packet offsets.
        pub from: u32,
        pub to: u32,
        /// Candidates the scan found in internal /24s.
        pub hits: u64,
    }
}

map_type! {
    /// A packet, as a relay copy's stages recognise it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct Ticket {
        /// ktime when the first part wrote it.
        pub written_ns: u64,
        pub ifindex: u32,
        pub saddr: u32,
        pub id: u16,
        pub tot_len: u16,
        pub pad: u32,
    }
}

/// How old a ticket may be when a stage reads it. Tail calls follow at
/// once, but BPF_PROG_TEST_RUN runs preemptibly, and a loaded machine has
/// been seen to take over a millisecond between two stages there.
pub const TICKET_NS: u64 = 100_000_000;

map_type! {
    /// The state of `scan`'s address scanner between two bytes.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct AddressScan {
        /// The last four bytes, the oldest in the high byte.
        pub window: u32,
        /// The last four numbers of the current run, the oldest high.
        pub run: u32,
        /// The number being read.
        pub acc: u32,
        /// Its digits so far, and the numbers in the run (each up to 4).
        pub ndigits: u8,
        pub octets: u8,
        /// The previous byte was a non-digit.
        pub gap: u8,
        pub pad: u8,
    }
}

/// Words of INTERNAL_NETS, a bitmap with one bit per /24: set where the
/// /24 holds an address of an internal network, the VMs and routers behind
/// the downstream interfaces, which no relayed datagram may name. A /24,
/// not the exact network: the scanner tests three candidates per byte
/// without a branch, and an address beside an internal one is never a LAN
/// host's (2 MiB, one value).
pub const PREFIX24_WORDS: usize = (1 << 24) / 64;

/// The bit of INTERNAL_NETS for an address: its /24, the first three
/// octets as one number.
pub const fn net24(octets: [u8; 4]) -> u32 {
    (octets[0] as u32) << 16 | (octets[1] as u32) << 8 | octets[2] as u32
}

/// The largest IPv4 datagram: a fragment train never reaches past it.
pub const MAX_DATAGRAM: u32 = 65_535;

impl FragmentTrain {
    /// The offset (in 8-byte units) after a fragment at `offset` carrying
    /// `len` bytes of IP payload, `more` to follow; None unless it is the
    /// fragment this train waits for: at `next_offset` exactly, a multiple
    /// of 8 bytes when more follow, and within the 64 KiB of a datagram.
    /// A first fragment is judged against a fresh train.
    pub const fn follows(&self, offset: u16, len: u16, more: bool) -> Option<u16> {
        let end = offset as u32 * 8 + len as u32;
        if offset != self.next_offset || end > MAX_DATAGRAM || (more && !len.is_multiple_of(8)) {
            return None;
        }
        Some((end / 8) as u16)
    }
}

/// The destination MAC of a copy to `daddr`: the group's multicast MAC, or
/// the broadcast MAC.
pub const fn relay_dst_mac(daddr: u32) -> [u8; 6] {
    if daddr == BROADCAST {
        [0xff; 6]
    } else {
        group_mac(daddr)
    }
}

impl Relay {
    pub fn has_target(&self, addr: u32) -> bool {
        among_first(&self.targets, self.n_targets as usize, addr)
    }
}

/// Whether `value` is one of the first `count` entries of `list`. Written
/// without slicing: a dynamic slice bound is a panic path the verifier
/// rejects.
#[inline(always)]
pub fn among_first(list: &[u32; MAX_RELAY_TARGETS], count: usize, value: u32) -> bool {
    let mut i = 0;
    while i < MAX_RELAY_TARGETS {
        if i >= count {
            return false;
        }
        if list[i] == value {
            return true;
        }
        i += 1;
    }
    false
}

map_type! {
    /// Per-relay traffic, one copy per CPU. "up" counts copies sent out of
    /// the uplink, "down" copies sent toward VMs (one per target interface).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct RelayCounters {
        pub packets_up: u64,
        pub bytes_up: u64,
        pub packets_down: u64,
        pub bytes_down: u64,
        pub rate_limited: u64,
        pub rate_limited_down: u64,
    }
}

map_type! {
    /// What a FIB lookup was asked: the key of a cached result.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
    pub struct RouteKey {
        pub daddr: u32,
        pub saddr: u32,
        pub ifindex: u32,
        /// The L4 protocol, or'ed with ROUTE_KIND_REVERSE_PATH for the
        /// neighbour-less lookups of the reverse-path check. A whole word, not
        /// a byte and padding: the BPF backend zeroes byte arrays through a
        /// memset call.
        pub kind: u32,
    }
}

/// `RouteKey::kind` flag of reverse-path lookups, whose cached answers carry
/// no MACs and must never serve as a route.
pub const ROUTE_KIND_REVERSE_PATH: u32 = 1 << 16;

map_type! {
    /// A successful FIB lookup with a resolved neighbour, valid while
    /// `generation` equals `FIB_GENERATION`: userspace bumps that on every
    /// rtnetlink change that can change a lookup's answer, which invalidates
    /// every cached result at once.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct RouteEntry {
        pub generation: u32,
        pub ifindex: u32,
        /// The route's MTU, for the length check the lookup would have done.
        pub mtu: u16,
        pub smac: [u8; 6],
        pub dmac: [u8; 6],
        pub pad: u16,
    }
}

/// The multicast MAC of an IPv4 group: 01:00:5e and the low 23 bits.
pub const fn group_mac(group: u32) -> [u8; 6] {
    let b = group.to_ne_bytes();
    [0x01, 0x00, 0x5e, b[1] & 0x7f, b[2], b[3]]
}

/// Whether a wire-order address is IPv4 multicast (224.0.0.0/4).
pub const fn is_multicast(addr: u32) -> bool {
    addr.to_ne_bytes()[0] & 0xf0 == 0xe0
}

const _: () = {
    assert!(size_of::<RelayKey>() == 8);
    assert!(size_of::<Allow>() == 4 + 8 * MAX_ALLOW_CIDRS);
    assert!(size_of::<RateLimit>() == 16);
    assert!(size_of::<Relay>() == 4 * MAX_RELAY_TARGETS + 8 + 32 + size_of::<Allow>() + 4);
    assert!(size_of::<RelayCounters>() == 48);
    assert!(size_of::<RouteKey>() == 16);
    assert!(size_of::<RouteEntry>() == 24);
    assert!(size_of::<FlowRoute>() == 28);
    assert!(size_of::<UplinkState>() == 16);
    assert!(size_of::<RuleKey>() == 4);
    assert!(size_of::<Cidr>() == 8);
    assert!(size_of::<ForwardRule>() == 24 + size_of::<Allow>() + 4);
    assert!(size_of::<ReverseKey>() == 8);
    assert!(size_of::<RuleCounters>() == 32);
    assert!(size_of::<FlowKey>() == 12);
    assert!(size_of::<TcpSide>() == 12);
    assert!(size_of::<FlowEntry>() == 80 + 2 * size_of::<TcpSide>());
    assert!(size_of::<FragmentKey>() == 16);
    assert!(size_of::<AddressScan>() == 16);
    assert!(size_of::<FragmentTrain>() == 40);
    assert!(size_of::<Train>() == 64);
    assert!(size_of::<Ticket>() == 24);
    assert!(size_of::<PendingUp>() == 112);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are repr(C), Pod, without implicit padding.
    unsafe impl aya::Pod for UplinkState {}
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for ForwardRule {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for RuleCounters {}
    unsafe impl aya::Pod for RelayKey {}
    unsafe impl aya::Pod for Relay {}
    unsafe impl aya::Pod for RelayCounters {}
    unsafe impl aya::Pod for RouteKey {}
    unsafe impl aya::Pod for RouteEntry {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentTrain {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(octets: [u8; 4]) -> u32 {
        u32::from_ne_bytes(octets)
    }

    #[test]
    fn group_macs_keep_the_low_23_bits() {
        assert_eq!(
            group_mac(wire([224, 0, 0, 167])),
            [0x01, 0x00, 0x5e, 0, 0, 167]
        );
        assert_eq!(
            group_mac(wire([239, 255, 130, 9])),
            [0x01, 0x00, 0x5e, 0x7f, 130, 9]
        );
        assert_eq!(
            group_mac(wire([225, 128, 1, 2])),
            [0x01, 0x00, 0x5e, 0, 1, 2]
        );
        assert!(is_multicast(wire([224, 0, 0, 167])));
        assert!(is_multicast(wire([239, 1, 1, 1])));
        assert!(!is_multicast(wire([240, 0, 0, 1])));
        assert!(!is_multicast(wire([192, 168, 1, 1])));
    }

    #[test]
    fn relay_targets_respect_the_count() {
        let mut relay = Relay {
            n_targets: 1,
            ..Default::default()
        };
        relay.targets[0] = wire([10, 137, 0, 17]);
        relay.targets[1] = wire([10, 137, 0, 18]);
        assert!(relay.has_target(wire([10, 137, 0, 17])));
        assert!(!relay.has_target(wire([10, 137, 0, 18])));
        assert!(!relay.has_target(0));
    }

    #[test]
    fn masks_are_in_wire_order() {
        assert_eq!(prefix_to_mask(24).to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(prefix_to_mask(17).to_ne_bytes(), [255, 255, 128, 0]);
        assert_eq!(prefix_to_mask(0), 0);
        assert_eq!(prefix_to_mask(32), u32::MAX);
    }

    #[test]
    fn auto_allows_the_uplink_subnet_only_below_slash_32() {
        let allow = Allow {
            kind: ALLOW_AUTO,
            ..Default::default()
        };
        let mut uplink = UplinkState {
            addr: wire([192, 168, 1, 2]),
            prefix_len: 24,
            ..Default::default()
        };
        assert!(allow.allows(wire([192, 168, 1, 77]), &uplink));
        assert!(!allow.allows(wire([192, 168, 2, 77]), &uplink));
        uplink.prefix_len = 32;
        assert!(allow.allows(wire([8, 8, 8, 8]), &uplink));
    }

    #[test]
    fn list_checks_only_the_configured_cidrs() {
        let mut allow = Allow {
            kind: ALLOW_LIST,
            n_cidrs: 2,
            ..Default::default()
        };
        allow.cidrs[0] = Cidr {
            addr: wire([10, 0, 0, 0]),
            mask: prefix_to_mask(8),
        };
        allow.cidrs[1] = Cidr {
            addr: wire([192, 168, 5, 9]),
            mask: prefix_to_mask(32),
        };
        // A stale third entry must not count once n_cidrs says two.
        allow.cidrs[2] = Cidr { addr: 0, mask: 0 };
        let uplink = UplinkState::default();
        assert!(allow.allows(wire([10, 200, 1, 1]), &uplink));
        assert!(allow.allows(wire([192, 168, 5, 9]), &uplink));
        assert!(!allow.allows(wire([192, 168, 5, 10]), &uplink));
        allow.n_cidrs = 0;
        assert!(!allow.allows(wire([10, 200, 1, 1]), &uplink));
    }

    #[test]
    fn deadlines_of_zero_never_pass() {
        let mut rule = ForwardRule::default();
        assert!(!rule.expired(u64::MAX));
        rule.deadline_ns = 100;
        assert!(!rule.expired(99));
        assert!(rule.expired(100));
    }

    #[test]
    fn rate_limits_allow_a_burst_of_one_second() {
        let limit = RateLimit::per_second(4);
        assert_eq!(limit.interval_ns, 250_000_000);
        assert_eq!(limit.burst_ns, 750_000_000);
        assert_eq!(limit.rate(), 4);
        assert_eq!(RateLimit::default().rate(), 0);
    }

    #[test]
    fn fragments_follow_in_order_without_gaps_within_64_kib() {
        let fresh = FragmentTrain::default();
        assert_eq!(fresh.follows(0, 1480, true), Some(185));
        assert_eq!(fresh.follows(0, 1481, true), None, "not a multiple of 8");
        assert_eq!(fresh.follows(185, 720, false), None, "not the first");
        let train = FragmentTrain {
            next_offset: 185,
            ..fresh
        };
        assert_eq!(train.follows(185, 723, false), Some(275));
        assert_eq!(train.follows(184, 8, true), None, "an overlap");
        assert_eq!(train.follows(186, 8, true), None, "a gap");
        let far = FragmentTrain {
            next_offset: 8100,
            ..fresh
        };
        assert_eq!(far.follows(8100, 1480, true), None, "past 64 KiB");
        assert_eq!(far.follows(8100, 735, false), Some(8191));
    }

    #[test]
    fn every_map_has_one_distinct_layout() {
        let mut names: Vec<&str> = MAP_LAYOUTS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), MAP_LAYOUTS.len());
    }
}
