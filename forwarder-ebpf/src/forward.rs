//! Uplink ingress: a packet to the uplink's address on a forwarded port, from
//! a peer the rule allows, is DNATed to the rule's target and redirected to
//! the interface that routes there.

use aya_ebpf::programs::TcContext;
use forwarder_common::{maps::RuleKey, reason::Reason};

use crate::{
    Verdict, fib,
    maps::{self, Direction},
    nat::{self, End},
    parse::{self, L4_OFF},
};

/// Enough for Ethernet, IPv4 without options and a TCP header.
const HEADERS: usize = L4_OFF + 20;

#[inline(always)]
pub fn uplink_ingress(ctx: &TcContext) -> Verdict {
    match try_forward(ctx) {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::Skipped(reason),
    }
}

#[inline(always)]
fn try_forward(ctx: &TcContext) -> Result<Verdict, Reason> {
    parse::pull_headers(ctx, HEADERS);
    parse::parse_eth(ctx)?;
    let ip = parse::parse_ipv4(ctx)?;

    let uplink = maps::uplink().ok_or(Reason::NoUplinkAddress)?;
    // SAFETY: reading a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex != uplink.ifindex {
        return Err(Reason::NotUplink);
    }
    if !uplink.usable() {
        return Err(Reason::NoUplinkAddress);
    }
    if ip.daddr != uplink.addr {
        return Err(Reason::OtherDestination);
    }
    let l4 = parse::parse_l4(ctx, &ip)?;
    let key = RuleKey {
        port: l4.dport,
        proto: ip.proto,
        pad: 0,
    };
    let rule = maps::forward_rule(&key).ok_or(Reason::NoRule)?;

    if fib::is_martian(ip.saddr) || ip.saddr == uplink.addr {
        return Err(Reason::MartianSource);
    }
    if !rule.allows(ip.saddr, &uplink) {
        return Err(Reason::SourceNotAllowed);
    }
    if ip.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    if !fib::reverse_path_ok(ctx, ifindex, ip.saddr, ip.daddr, ip.proto) {
        return Err(Reason::ReversePathFailed);
    }
    let route = fib::lookup(
        ctx,
        ifindex,
        ip.saddr,
        rule.target_addr,
        ip.proto,
        parse::wire_len(ctx, &ip, &l4),
    )?;
    if route.ifindex() == ifindex {
        return Err(Reason::TargetViaUplink);
    }

    if nat::rewrite(
        ctx,
        &ip,
        &l4,
        End::Destination,
        rule.target_addr,
        rule.target_port,
    )
    .is_err()
    {
        return Err(Reason::RewriteFailed);
    }
    maps::count_rule(rule.slot, Direction::In, ip.tot_len);
    Ok(Verdict::Redirected(nat::redirect(ctx, route)))
}
