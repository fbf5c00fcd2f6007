//! Downstream ingress. A forward target's packet, from the target port, on
//! the interface that routes to the target, belonging to a flow the LAN
//! started, is SNATed to the uplink's address and listen port and
//! redirected out of the uplink, so both directions bypass conntrack, which
//! never sees half a flow. Anything else from that port (a connection the
//! VM opens itself) is the stack's, and so meets the VM's firewall.
//! A relay target's datagram to its relay group is copied out of the uplink
//! and continues.

use aya_ebpf::programs::TcContext;
use forwarder_common::{
    cut::Cut,
    maps::{BROADCAST, FlowKey, ReverseKey, is_multicast},
    reason::Reason,
};
use network_types::ip::IpProto;

use crate::{
    fib, flow, kernel, lan,
    maps::{self, Direction},
    nat::{self, End},
    parse::{self, Ipv4, L4_OFF},
    relay,
    verdict::{Verdict, stop_if_cut},
};

/// Ethernet, IPv4, and either TCP or an ICMP error quoting IPv4 and ports.
const HEADERS: usize = L4_OFF + 36;

#[inline(always)]
pub fn downstream_ingress(ctx: &TcContext) -> Verdict {
    try_downstream(ctx).into()
}

#[inline(always)]
fn try_downstream(ctx: &TcContext) -> Result<Verdict, Reason> {
    stop_if_cut!(Cut::Entry);
    parse::pull_headers(ctx, HEADERS);
    parse::parse_eth(ctx)?;
    let ip = parse::parse_ipv4(ctx)?;
    if is_multicast(ip.daddr) || ip.daddr == BROADCAST {
        return relay::to_lan(ctx, &ip);
    }
    ip.whole()?;
    if ip.carries(IpProto::Icmp) {
        return Err(icmp_error_reason(ctx, &ip));
    }
    stop_if_cut!(Cut::Headers);
    reply(ctx, &ip)
}

#[inline(always)]
fn reply(ctx: &TcContext, ip: &Ipv4) -> Result<Verdict, Reason> {
    let l4 = parse::parse_l4(ctx, ip)?;
    let reverse = ReverseKey {
        addr: ip.saddr,
        port: l4.sport,
        proto: ip.proto,
        pad: 0,
    };
    let key = maps::reverse_rule(&reverse).ok_or(Reason::NoRule)?;
    let flow_key = FlowKey::new(ip.daddr, l4.dport, ip.proto, key.port);
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

    let uplink = maps::usable_uplink()?;
    if lan::is_martian(ip.daddr) || !rule.allow.allows(ip.daddr, &uplink) {
        return Err(Reason::PeerNotAllowed);
    }
    let flow = flow::of_target(found, &flow_key, rule.id, now)?;
    if ip.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    stop_if_cut!(Cut::Rule);
    // SAFETY: reading a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let tot_len = parse::wire_len(ctx, ip, &l4);
    let (route, remember) = fib::flow_route(Some(&flow.to_peer), ifindex, tot_len, || {
        fib::reverse_path(ctx, ifindex, ip.saddr, ip.daddr, ip.proto)?;
        fib::lookup(ctx, ifindex, uplink.addr, ip.daddr, ip.proto, tot_len)
    })?;
    if route.ifindex() != uplink.ifindex {
        return Err(Reason::ReplyNotViaUplink);
    }
    stop_if_cut!(Cut::Route);
    flow::believable(Some(flow), false, &l4.segment)?;
    flow::from_target(flow, &l4.segment, now, remember);
    stop_if_cut!(Cut::FlowUpdate);

    nat::translate(ctx, ip, &l4, End::Source, uplink.addr, key.port)?;
    stop_if_cut!(Cut::Translate);
    let action = nat::redirect(ctx, route)?;
    maps::count_rule(rule.slot, Direction::Out, ip.tot_len);
    Ok(Verdict::Redirected(action))
}

/// An ICMP error about a forwarded flow quotes the target's internal address;
/// it must never be routed toward the uplink. It is dropped here; anything
/// else ICMP is the stack's.
#[inline(always)]
fn icmp_error_reason(ctx: &TcContext, ip: &Ipv4) -> Reason {
    match parse::parse_icmp_error(ctx, ip) {
        Ok(Some(quoted)) => {
            let key = ReverseKey {
                addr: quoted.daddr,
                port: quoted.dport,
                proto: quoted.proto,
                pad: 0,
            };
            if maps::reverse_rule(&key).is_some() {
                Reason::IcmpErrorDropped
            } else {
                Reason::OtherProtocol
            }
        }
        Ok(None) => Reason::OtherProtocol,
        Err(reason) => reason,
    }
}
