//! Uplink ingress. A packet to the uplink's address on a forwarded port,
//! from a peer the rule allows, is DNATed to the rule's target and redirected
//! to the interface that routes there. A LAN peer's datagram to a relay
//! group is copied toward the relay's targets and continues.

use aya_ebpf::programs::TcContext;
use forwarder_common::{
    cut::Cut,
    maps::{FlowKey, RuleKey, UplinkState},
    reason::Reason,
};

use crate::{
    fib, flow, kernel, lan,
    maps::{self, Direction},
    nat::{self, End},
    parse::{self, Ipv4, L4_OFF},
    relay,
    verdict::{Verdict, stop_if_cut},
};

/// Enough for Ethernet, IPv4 without options and a TCP header.
const HEADERS: usize = L4_OFF + 20;

#[inline(always)]
pub fn uplink_ingress(ctx: &TcContext) -> Verdict {
    try_uplink(ctx).into()
}

#[inline(always)]
fn try_uplink(ctx: &TcContext) -> Result<Verdict, Reason> {
    stop_if_cut!(Cut::Entry);
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
    if let Some(group) = lan::relay_group(ip.daddr, &uplink) {
        return relay::from_lan(ctx, &ip, &uplink, group);
    }
    if ip.daddr != uplink.addr {
        return Err(Reason::OtherDestination);
    }
    ip.whole()?;
    stop_if_cut!(Cut::Headers);
    forward(ctx, &ip, &uplink, ifindex)
}

#[inline(always)]
fn forward(
    ctx: &TcContext,
    ip: &Ipv4,
    uplink: &UplinkState,
    ifindex: u32,
) -> Result<Verdict, Reason> {
    let l4 = parse::parse_l4(ctx, ip)?;
    let key = RuleKey {
        port: l4.dport,
        proto: ip.proto,
        pad: 0,
    };
    let flow_key = FlowKey::new(ip.saddr, l4.sport, ip.proto, l4.dport);
    let found = flow::lookup(&flow_key);
    stop_if_cut!(Cut::Flow);
    let rule = match found.as_deref().and_then(maps::rule_of_flow) {
        Some(rule) => rule,
        None => maps::forward_rule(&key).ok_or(Reason::NoRule)?,
    };
    let now = kernel::now();
    if rule.expired(now) {
        return Err(Reason::RuleExpired);
    }
    lan::plausible_source(ip, uplink)?;
    if !rule.allow.allows(ip.saddr, uplink) {
        return Err(Reason::SourceNotAllowed);
    }
    if ip.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    let live = flow::of_peer(found, &flow_key, rule.id, &l4.segment, now);
    stop_if_cut!(Cut::Rule);
    let tot_len = parse::wire_len(ctx, ip, &l4);
    let (route, remember) = fib::flow_route(
        live.as_deref().map(|entry| &entry.to_target),
        ifindex,
        tot_len,
        || {
            fib::reverse_path(ctx, ifindex, ip.saddr, ip.daddr, ip.proto)?;
            fib::lookup(ctx, ifindex, ip.saddr, rule.target_addr, ip.proto, tot_len)
        },
    )?;
    if route.ifindex() == ifindex {
        return Err(Reason::TargetViaUplink);
    }
    stop_if_cut!(Cut::Route);
    flow::believable(live.as_deref(), true, &l4.segment)?;
    flow::from_peer(&flow_key, live, rule, &l4.segment, now, remember);
    stop_if_cut!(Cut::FlowUpdate);

    nat::translate(
        ctx,
        ip,
        &l4,
        End::Destination,
        rule.target_addr,
        rule.target_port_for(l4.dport),
    )?;
    stop_if_cut!(Cut::Translate);
    let action = nat::redirect(ctx, route)?;
    maps::count_rule(rule.slot, Direction::In, ip.tot_len);
    Ok(Verdict::Redirected(action))
}
