//! Records of what only the kernel sees, through aya-log: a helper
//! answering a code the programs do not expect, a redirect or copy the
//! kernel refused, a map update refused. The counters say how often; a
//! record says where (interface, addresses) and with which code.
//!
//! They are rare by nature and never written per forwarded packet: each
//! kind at most once a second, and only when userspace loaded the object
//! with logging on (`AYA_LOG_LEVEL`, a read-only global); with it off the
//! verifier knows every branch that raises or writes one is never taken
//! and removes it.
//!
//! Where something goes wrong, the program only notes it in LOG_EVENT, a
//! few stores to a map value. The record itself is written by `kernel_log`,
//! a program of its own that `finish` tail-calls on the way out: a record
//! takes a couple of hundred bytes of stack, which the programs, near the
//! 512-byte limit, do not have.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use aya_log_ebpf::{
    macro_support::{Level, level_enabled},
    warn,
};

use crate::maps;

/// What userspace shows the records under.
const TARGET: &str = "forwarder::ebpf";

/// A kind of record, limited to one a second on its own.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Kind {
    Pull,
    FibRefused,
    FibAnswer,
    RelayRoute,
    Redirect,
    RedirectNeigh,
    Clone,
    Checksum,
    FlowRefused,
    RouteRefused,
    FragmentRefused,
    Stage,
}

const _: () = assert!((Kind::Stage as u32) < maps::LOG_KINDS);

impl Kind {
    const ALL: [Kind; 12] = [
        Kind::Pull,
        Kind::FibRefused,
        Kind::FibAnswer,
        Kind::RelayRoute,
        Kind::Redirect,
        Kind::RedirectNeigh,
        Kind::Clone,
        Kind::Checksum,
        Kind::FlowRefused,
        Kind::RouteRefused,
        Kind::FragmentRefused,
        Kind::Stage,
    ];
}

/// Whether records are written at all: fixed at load.
#[inline(always)]
fn enabled() -> bool {
    level_enabled(Level::Warn)
}

/// What a record says besides its kind; `extra` is a length, an offset,
/// flags, a port, an id or a next hop, as the kind has it.
struct Fields {
    ifindex: u32,
    saddr: u32,
    daddr: u32,
    code: i64,
    extra: u32,
}

/// Notes a record of `kind` for `kernel_log` to write, unless one of its
/// kind was written less than a second ago.
#[inline(always)]
fn raise(kind: Kind, fields: Fields) {
    if !enabled() || !maps::log_allowed(kind as u32) {
        return;
    }
    let Some(event) = maps::log_event() else {
        return;
    };
    // SAFETY (each field): a pointer into this CPU's map value.
    unsafe {
        maps::write(&raw mut (*event).kind, kind as u32);
        maps::write(&raw mut (*event).ifindex, fields.ifindex);
        maps::write(&raw mut (*event).saddr, fields.saddr);
        maps::write(&raw mut (*event).daddr, fields.daddr);
        maps::write(&raw mut (*event).code, fields.code);
        maps::write(&raw mut (*event).extra, fields.extra);
        maps::write(&raw mut (*event).pending, 1);
    }
}

/// `bpf_skb_pull_data` failed: the headers stay where they were and the
/// packet is parsed as truncated.
#[inline(always)]
pub fn pull_failed(ifindex: u32, len: u32, code: i64) {
    raise(
        Kind::Pull,
        Fields {
            ifindex,
            saddr: 0,
            daddr: 0,
            code,
            extra: len,
        },
    );
}

/// `bpf_fib_lookup` refused its arguments (a negative code).
#[inline(always)]
pub fn fib_refused(ifindex: u32, saddr: u32, daddr: u32, flags: u32, code: i64) {
    raise(
        Kind::FibRefused,
        Fields {
            ifindex,
            saddr,
            daddr,
            code,
            extra: flags,
        },
    );
}

/// `bpf_fib_lookup` answered a code the programs take as "no route".
#[inline(always)]
pub fn fib_answer(ifindex: u32, saddr: u32, daddr: u32, code: i64) {
    raise(
        Kind::FibAnswer,
        Fields {
            ifindex,
            saddr,
            daddr,
            code,
            extra: 0,
        },
    );
}

/// A relay copy's egress lookup answered neither a route nor an unresolved
/// neighbour: that target gets no copy.
#[inline(always)]
pub fn relay_route(ifindex: u32, saddr: u32, target: u32, code: i64) {
    raise(
        Kind::RelayRoute,
        Fields {
            ifindex,
            saddr,
            daddr: target,
            code,
            extra: 0,
        },
    );
}

/// `bpf_redirect` (no next hop) or `bpf_redirect_neigh` (`nexthop`)
/// returned another action than TC_ACT_REDIRECT: the rewritten packet goes
/// nowhere.
#[inline(always)]
pub fn redirect_refused(ifindex: u32, nexthop: Option<u32>, saddr: u32, daddr: u32, code: i64) {
    let (kind, extra) = match nexthop {
        Some(nexthop) => (Kind::RedirectNeigh, nexthop),
        None => (Kind::Redirect, 0),
    };
    raise(
        kind,
        Fields {
            ifindex,
            saddr,
            daddr,
            code,
            extra,
        },
    );
}

/// `bpf_clone_redirect` failed: the relay copy from `saddr` for `dest` (a
/// relay target toward the VMs, the group toward the LAN) was not sent.
#[inline(always)]
pub fn clone_failed(ifindex: u32, saddr: u32, dest: u32, code: i64) {
    raise(
        Kind::Clone,
        Fields {
            ifindex,
            saddr,
            daddr: dest,
            code,
            extra: 0,
        },
    );
}

/// `bpf_l4_csum_replace` failed: the packet is half rewritten and dropped.
#[inline(always)]
pub fn checksum_failed(offset: usize, saddr: u32, daddr: u32, code: i64) {
    raise(
        Kind::Checksum,
        Fields {
            ifindex: 0,
            saddr,
            daddr,
            code,
            extra: offset as u32,
        },
    );
}

/// FLOWS refused a new flow: the peer's next packet tries again.
#[inline(always)]
pub fn flow_refused(peer: u32, peer_port: u16, code: i32) {
    raise(
        Kind::FlowRefused,
        Fields {
            ifindex: 0,
            saddr: peer,
            daddr: 0,
            code: i64::from(code),
            extra: u32::from(u16::from_be(peer_port)),
        },
    );
}

/// ROUTE_CACHE refused a complete answer: the next packet looks it up
/// again.
#[inline(always)]
pub fn route_refused(ifindex: u32, saddr: u32, daddr: u32, code: i32) {
    raise(
        Kind::RouteRefused,
        Fields {
            ifindex,
            saddr,
            daddr,
            code: i64::from(code),
            extra: 0,
        },
    );
}

/// FRAGMENTS refused a relayed datagram's train: its later fragments are
/// left to the stack.
#[inline(always)]
pub fn fragment_refused(ifindex: u32, saddr: u32, daddr: u32, id: u16, code: i32) {
    raise(
        Kind::FragmentRefused,
        Fields {
            ifindex,
            saddr,
            daddr,
            code: i64::from(code),
            extra: u32::from(id),
        },
    );
}

/// The tail call to a relay stage returned: the stage is missing from
/// RELAY_UP_STAGES and the copy is not made.
#[inline(always)]
pub fn stage_missing(stage: u32) {
    raise(
        Kind::Stage,
        Fields {
            ifindex: 0,
            saddr: 0,
            daddr: 0,
            code: 0,
            extra: stage,
        },
    );
}

/// On the way out with `action`: hands a noted record to `kernel_log`,
/// which writes it and returns `action`. Returns only when there is none,
/// or `kernel_log` is missing.
#[inline(always)]
pub fn flush<C: aya_ebpf::EbpfContext>(ctx: &C, action: i32) -> i32 {
    if !enabled() {
        return action;
    }
    let Some(event) = maps::log_event() else {
        return action;
    };
    // SAFETY (each field): a pointer into this CPU's map value.
    unsafe {
        if maps::read(&raw const (*event).pending) == 0 {
            return action;
        }
        maps::write(&raw mut (*event).action, action);
    }
    maps::write_log(ctx);
    // SAFETY: as above.
    unsafe { maps::write(&raw mut (*event).pending, 0) };
    action
}

/// `kernel_log`: writes the record noted in LOG_EVENT and returns the
/// action of the program that noted it.
#[inline(always)]
pub fn write(ctx: &TcContext) -> i32 {
    let Some(event) = maps::log_event() else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY (each field): a pointer into this CPU's map value.
    let (kind, ifindex, saddr, daddr, code, extra, action) = unsafe {
        maps::write(&raw mut (*event).pending, 0);
        (
            maps::read(&raw const (*event).kind),
            maps::read(&raw const (*event).ifindex),
            maps::read(&raw const (*event).saddr).to_ne_bytes(),
            maps::read(&raw const (*event).daddr).to_ne_bytes(),
            maps::read(&raw const (*event).code),
            maps::read(&raw const (*event).extra),
            maps::read(&raw const (*event).action),
        )
    };
    if !enabled() {
        return action;
    }
    let Some(kind) = Kind::ALL.get(kind as usize) else {
        return action;
    };
    match kind {
        Kind::Pull => warn!(
            ctx,
            target: TARGET,
            "bpf_skb_pull_data({} bytes) on ifindex {} failed: {}",
            extra,
            ifindex,
            code
        ),
        Kind::FibRefused => warn!(
            ctx,
            target: TARGET,
            "bpf_fib_lookup from ifindex {} for {:i} -> {:i} with flags {:x} refused: {}",
            ifindex,
            saddr,
            daddr,
            extra,
            code
        ),
        Kind::FibAnswer => warn!(
            ctx,
            target: TARGET,
            "bpf_fib_lookup from ifindex {} for {:i} -> {:i} answered {} ({}), taken as no route",
            ifindex,
            saddr,
            daddr,
            fib_code_name(code),
            code
        ),
        Kind::RelayRoute => warn!(
            ctx,
            target: TARGET,
            "bpf_fib_lookup from ifindex {} for relay target {:i} (from {:i}) answered {} ({}): no copy",
            ifindex,
            daddr,
            saddr,
            fib_code_name(code),
            code
        ),
        Kind::Redirect => warn!(
            ctx,
            target: TARGET,
            "bpf_redirect to ifindex {} of {:i} -> {:i} refused: {}",
            ifindex,
            saddr,
            daddr,
            code
        ),
        Kind::RedirectNeigh => warn!(
            ctx,
            target: TARGET,
            "bpf_redirect_neigh to ifindex {} via {:i} of {:i} -> {:i} refused: {}",
            ifindex,
            extra.to_ne_bytes(),
            saddr,
            daddr,
            code
        ),
        Kind::Clone => warn!(
            ctx,
            target: TARGET,
            "bpf_clone_redirect of a relay copy from {:i} for {:i} to ifindex {} failed: {}",
            saddr,
            daddr,
            ifindex,
            code
        ),
        Kind::Checksum => warn!(
            ctx,
            target: TARGET,
            "bpf_l4_csum_replace at offset {} of {:i} -> {:i} failed: {}",
            extra,
            saddr,
            daddr,
            code
        ),
        Kind::FlowRefused => warn!(
            ctx,
            target: TARGET,
            "FLOWS refused the flow of {:i}:{}: {}",
            saddr,
            extra,
            code
        ),
        Kind::RouteRefused => warn!(
            ctx,
            target: TARGET,
            "ROUTE_CACHE refused the route from ifindex {} for {:i} -> {:i}: {}",
            ifindex,
            saddr,
            daddr,
            code
        ),
        Kind::FragmentRefused => warn!(
            ctx,
            target: TARGET,
            "FRAGMENTS refused the train of {:i} -> {:i} id {} on ifindex {}: {}",
            saddr,
            daddr,
            extra,
            ifindex,
            code
        ),
        Kind::Stage => warn!(
            ctx,
            target: TARGET,
            "relay stage {} is missing from RELAY_UP_STAGES: no copy",
            extra
        ),
    }
    action
}

/// The names of `bpf_fib_lookup`'s answers (BPF_FIB_LKUP_RET_*).
#[inline(always)]
fn fib_code_name(code: i64) -> &'static str {
    match code {
        1 => "blackhole",
        2 => "unreachable",
        3 => "prohibit",
        4 => "not forwarded",
        5 => "forwarding disabled",
        6 => "unsupported lwt",
        9 => "no source address",
        _ => "an unexpected code",
    }
}
