//! Route lookups through the kernel FIB, with every return code mapped to a
//! decision on purpose.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup as FibParams,
    },
    helpers::bpf_fib_lookup,
    programs::TcContext,
};
use forwarder_common::{
    maps::{FlowRoute, ROUTE_KIND_REVERSE_PATH, RouteEntry, RouteKey},
    reason::Reason,
};

use crate::{kernel, log, maps, mem};

const AF_INET: u8 = 2;

/// Where a lookup says a packet goes.
pub enum Route {
    /// Neighbour known: rewrite the MACs and redirect.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Neighbour unresolved: let `bpf_redirect_neigh` resolve `nexthop`.
    Unresolved { ifindex: u32, nexthop: u32 },
}

impl Route {
    pub fn ifindex(&self) -> u32 {
        match self {
            Route::Resolved { ifindex, .. } | Route::Unresolved { ifindex, .. } => *ifindex,
        }
    }
}

/// One `bpf_fib_lookup` for IPv4. `tot_len` 0 asks for no length check (so
/// the answer holds for packets of any size; callers check the MTU it
/// reports). Returns the helper's code (negative: it refused the
/// arguments) and the filled parameters.
#[inline(always)]
fn fib(ctx: &TcContext, key: &RouteKey, tot_len: u16, flags: u32) -> (i64, FibParams) {
    let mut words = core::mem::MaybeUninit::<[u64; size_of::<FibParams>() / 8]>::uninit();
    let words = mem::zeroed(&mut words);
    // SAFETY: FibParams is plain old data of this size, with an alignment a
    // u64 array satisfies, and every byte is zero.
    let params = unsafe { &mut *words.as_mut_ptr().cast::<FibParams>() };
    params.family = AF_INET;
    params.l4_protocol = key.kind as u8;
    params.ifindex = key.ifindex;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_3.ipv4_src = key.saddr;
    params.__bindgen_anon_4.ipv4_dst = key.daddr;
    // SAFETY: params is a valid, fully initialised bpf_fib_lookup.
    let ret = unsafe { bpf_fib_lookup(ctx.as_ptr(), params, size_of::<FibParams>() as i32, flags) };
    (ret, *params)
}

/// Flags of a lookup that needs no neighbour: skipping it where the kernel
/// can (6.3+); older kernels answer NO_NEIGH with the egress filled in,
/// which serves as well.
#[inline(always)]
fn no_neigh_flags() -> u32 {
    if kernel::fib_skip_neigh() {
        BPF_FIB_LOOKUP_SKIP_NEIGH
    } else {
        0
    }
}

/// The interface a packet from `saddr` to `daddr` arriving on `ifindex`
/// would leave by, without resolving a neighbour: relay copies are
/// multicast and need no neighbour.
#[inline(always)]
pub fn egress(ctx: &TcContext, ifindex: u32, saddr: u32, daddr: u32) -> Option<u32> {
    let key = RouteKey {
        daddr,
        saddr,
        ifindex,
        kind: 0,
    };
    let (ret, params) = fib(ctx, &key, 0, no_neigh_flags());
    if ret == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || ret == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Some(params.ifindex);
    }
    log::relay_route(ifindex, saddr, daddr, ret);
    None
}

/// What the stack would do with a packet from `saddr` to `daddr` arriving on
/// `ifindex`. A non-zero `tot_len` is checked against the route's MTU. The
/// entry, when there is one, is a complete answer that holds for later
/// packets until the FIB generation changes.
#[inline(always)]
pub fn lookup(
    ctx: &TcContext,
    ifindex: u32,
    saddr: u32,
    daddr: u32,
    proto: u8,
    tot_len: u16,
) -> Result<(Route, Option<RouteEntry>), Reason> {
    let key = RouteKey {
        daddr,
        saddr,
        ifindex,
        kind: u32::from(proto),
    };
    cached_fib(ctx, &key, tot_len)
}

/// The route of a packet of a flow that arrived on `ifindex`: the one the
/// flow remembered while the FIB generation holds, or else what `check`
/// finds, with the answer the flow should remember from now on.
#[inline(always)]
pub fn flow_route(
    remembered: Option<&FlowRoute>,
    ifindex: u32,
    tot_len: u16,
    check: impl FnOnce() -> Result<(Route, Option<RouteEntry>), Reason>,
) -> Result<(Route, Option<FlowRoute>), Reason> {
    if let Some(flow) = remembered
        && flow.ingress == ifindex
        && flow.route.ifindex != 0
        && flow.route.generation == maps::fib_generation()
    {
        return Ok((resolved(&flow.route, tot_len)?, None));
    }
    let (route, lasting) = check()?;
    Ok((
        route,
        lasting.map(|route| FlowRoute {
            ingress: ifindex,
            route,
        }),
    ))
}

/// Strict reverse-path check: `saddr` must route back out of `ifindex`, the
/// interface the packet came in on. A local, broadcast or unroutable source
/// fails, as does a downstream address arriving on the uplink. No neighbour
/// is needed (a LAN peer that only sends may have none), so none is looked
/// up, and the answer can be cached either way.
#[inline(always)]
pub fn reverse_path(
    ctx: &TcContext,
    ifindex: u32,
    saddr: u32,
    daddr: u32,
    proto: u8,
) -> Result<(), Reason> {
    let key = RouteKey {
        daddr: saddr,
        saddr: daddr,
        ifindex,
        kind: ROUTE_KIND_REVERSE_PATH | u32::from(proto),
    };
    match cached_fib(ctx, &key, 0) {
        Ok((route, _)) if route.ifindex() == ifindex => Ok(()),
        // Not about the source: the kernel would not forward at all.
        Err(reason @ (Reason::FibLookupRejected | Reason::FibFwdDisabled)) => Err(reason),
        _ => Err(Reason::ReversePathFailed),
    }
}

/// One FIB lookup, answered from ROUTE_CACHE when the cache holds it under
/// the current FIB generation. Userspace bumps the generation on every
/// rtnetlink change that can change an answer, so a cached result lives at
/// most until the daemon has seen the change (well under a millisecond).
///
/// The MTU of a forwarded route is the smaller of the lookup's and the one
/// the route itself sets (ROUTE_MTUS), which the kernel's forwarding honours
/// and the lookup reports only when locked. Only complete answers are
/// cached, and only with the route's MTU: for a GSO packet the kernel
/// reports the device's MTU instead, and a kernel older than 5.12 reports
/// none, so those lookups check the length themselves and are not kept.
/// Reverse-path keys carry no length and are looked up without resolving a
/// neighbour.
#[inline(always)]
fn cached_fib(
    ctx: &TcContext,
    key: &RouteKey,
    tot_len: u16,
) -> Result<(Route, Option<RouteEntry>), Reason> {
    let generation = maps::fib_generation();
    if let Some(entry) = maps::cached_route(key)
        && entry.generation == generation
    {
        return Ok((resolved(&entry, tot_len)?, Some(entry)));
    }
    let reverse_path = key.kind & ROUTE_KIND_REVERSE_PATH != 0;
    let flags = if reverse_path { no_neigh_flags() } else { 0 };
    let mtu_result = kernel::fib_mtu_result();
    // SAFETY: reading a field of the context the program was given.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let lookup_len = if mtu_result { 0 } else { tot_len };
    let (ret, params) = fib(ctx, key, lookup_len, flags);
    if ret < 0 {
        log::fib_refused(key.ifindex, key.saddr, key.daddr, flags, ret);
        return Err(Reason::FibLookupRejected);
    }
    // SAFETY: the kernel filled the union members for IPv4.
    let (nexthop, mtu) = unsafe {
        (
            params.__bindgen_anon_4.ipv4_dst,
            params.__bindgen_anon_1.mtu_result,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let reported = if mtu_result { mtu } else { 0 };
            let entry = RouteEntry {
                generation,
                ifindex: params.ifindex,
                mtu: if reverse_path {
                    0
                } else {
                    tighter_mtu(reported, maps::route_mtu(key.daddr))
                },
                smac: params.smac,
                dmac: params.dmac,
                pad: 0,
            };
            let lasting = (reverse_path || (mtu_result && !gso)).then_some(entry);
            if let Some(entry) = &lasting
                && let Err(code) = maps::cache_route(key, entry)
            {
                log::route_refused(key.ifindex, key.saddr, key.daddr, code);
            }
            Ok((resolved(&entry, tot_len)?, lasting))
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok((
            Route::Unresolved {
                ifindex: params.ifindex,
                nexthop,
            },
            None,
        )),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Reason::FibFragNeeded),
        BPF_FIB_LKUP_RET_FWD_DISABLED => Err(Reason::FibFwdDisabled),
        // Blackhole, unreachable, prohibit, not forwarded (local or
        // broadcast destination), unsupported LWT and no source address:
        // none of them is a route to use.
        _ => {
            log::fib_answer(key.ifindex, key.saddr, key.daddr, ret);
            Err(Reason::FibNoRoute)
        }
    }
}

/// The smaller of two MTUs, where 0 means "none known".
#[inline(always)]
fn tighter_mtu(reported: u16, route: u32) -> u16 {
    let route = route.min(u32::from(u16::MAX)) as u16;
    match (reported, route) {
        (0, r) => r,
        (m, 0) => m,
        (m, r) => m.min(r),
    }
}

/// A complete answer, for a packet of `tot_len` bytes (0: any size).
#[inline(always)]
fn resolved(entry: &RouteEntry, tot_len: u16) -> Result<Route, Reason> {
    if entry.mtu != 0 && tot_len > entry.mtu {
        return Err(Reason::FibFragNeeded);
    }
    Ok(Route::Resolved {
        ifindex: entry.ifindex,
        smac: entry.smac,
        dmac: entry.dmac,
    })
}
