//! The oracle: a model of the datapath that predicts, for any frame, what
//! the program run on it does: its TC action, the packet it leaves, the
//! reason it counts, every relay copy (byte for byte) and the change to
//! each table entry the packet names (flow, fragment train, token bucket).
//! It reads frames as the programs do (see parse), routes as the harness's
//! namespace does (see net), and decides with the datapath's own pure
//! logic from forwarder-common: `flow::acceptable`/`advance`/`opened` for
//! TCP and UDP flows, `FragmentTrain::follows` for fragment trains and
//! `AddressScan` for the address filter. Its tables mirror the
//! datapath's; the caller keeps them in step with what was observed.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use anyhow::Result;
use forwarder::datapath::Role;
use forwarder_common::{
    flow::{self, REFRESH_NS},
    maps::{
        self, FlowEntry, FlowKey, FlowRoute, ForwardRule, FragmentKey, FragmentTrain,
        RELAY_DNS_QUERIES_UP, ROUTE_KIND_REVERSE_PATH, RateLimit, RelayKey, RouteEntry, RouteKey,
        TICKET_NS, UplinkState, is_multicast, net24, relay_dst_mac,
    },
    reason::{Disposition, Reason},
    scan::Candidates,
};

use super::{
    case::Case,
    clock::{Clock, Expected, Kind},
    net::{MAX_FORWARDABLE_FRAME, MTU, Net},
    parse::{self, Fragment, Ip, L4, L4_OFF, UDP_HLEN},
    rewrite::{self, End},
};
use crate::{
    packet::{ICMP, Mac, UDP},
    testrun::{Harness, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
};

/// How long the later fragments of a relayed datagram may trail its first
/// (forwarder-ebpf's relay.rs).
pub const FRAGMENT_TRAIN_NS: u64 = 2_000_000_000;
/// The longest IP packet the address filter scans.
pub const SCAN_MAX: usize = 1500;

/// What a program run did with a packet, as the tally counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Redirected,
    /// Copies went out of the uplink; the packet continued.
    RelayedUp,
    /// Copies went toward the VMs; the packet continued.
    RelayedDown,
    /// Not claimed, or dropped, for this reason.
    Skipped(&'static str),
}

/// A change to a flow entry. Times are what the entry's `created_ns` and
/// `seen_ns` must hold; the other fields are exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowChange {
    Set {
        entry: FlowEntry,
        created: Expected,
        seen: Expected,
    },
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainChange {
    Set {
        value: FragmentTrain,
        until: Expected,
    },
    Remove,
}

/// Everything one program run is predicted to do.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub action: i32,
    pub output: Vec<u8>,
    pub reason: Option<Reason>,
    pub verdict: Verdict,
    /// Copies out of the uplink, in order.
    pub up: Vec<Vec<u8>>,
    /// Copies toward the VMs: the interface each leaves by, in order.
    pub down: Vec<(u32, Vec<u8>)>,
    pub flow: Option<(FlowKey, FlowChange)>,
    pub train: Option<(FragmentKey, TrainChange)>,
    /// A relay token taken: the bucket and what its theoretical arrival
    /// time becomes.
    pub bucket: Option<(u32, Expected)>,
}

/// The table entries a packet names, whatever happens to them: read back
/// after every run, so a change nobody predicted is caught at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct Names {
    pub flow: Option<FlowKey>,
    pub train: Option<FragmentKey>,
    pub bucket: Option<u32>,
}

fn wire(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn addr(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(wire.to_ne_bytes())
}

/// No LAN host may use these (fib::is_martian).
fn martian(addr: Ipv4Addr) -> bool {
    let first = addr.octets()[0];
    first == 0 || first == 127 || first >= 224
}

pub struct Model {
    pub net: Net,
    uplink: UplinkState,
    generation: u32,
    /// By protocol and listen port (host order).
    rules: HashMap<(u8, u16), ForwardRule>,
    /// The listen port of the rule a target's address, port (host order)
    /// and protocol answer for.
    reverse: HashMap<(Ipv4Addr, u16, u8), u16>,
    relays: HashMap<RelayKey, maps::Relay>,
    /// The internal /24s (`maps::net24`) the address filter refuses.
    internal: HashSet<u32>,
    pub flows: HashMap<FlowKey, FlowEntry>,
    pub trains: HashMap<FragmentKey, FragmentTrain>,
    /// RELAY_BUCKETS: each bucket's theoretical arrival time.
    pub buckets: HashMap<u32, u64>,
}

impl Model {
    /// The model of `h`'s datapath as installed, with empty tables;
    /// `internal` lists the networks the harness declared internal.
    pub fn new(h: &Harness, internal: &[(Ipv4Addr, u8)]) -> Result<Self> {
        let tables = &h.datapath.tables;
        let mut rules = HashMap::new();
        let mut reverse = HashMap::new();
        for ((proto, port), (_, rule)) in tables.installed()? {
            reverse.insert(
                (
                    addr(rule.target_addr),
                    u16::from_be(rule.target_port),
                    proto,
                ),
                port,
            );
            rules.insert((proto, port), rule);
        }
        let relays = tables
            .installed_relays()?
            .into_iter()
            .map(|((group, port), relay)| {
                (
                    RelayKey {
                        group,
                        port,
                        pad: 0,
                    },
                    relay,
                )
            })
            .collect();
        let mut nets = HashSet::new();
        for &(net, prefix_len) in internal {
            let first = net24(net.octets());
            for n in first..first + (1u32 << 24u8.saturating_sub(prefix_len)) {
                nets.insert(n);
            }
        }
        Ok(Model {
            net: Net::of(h),
            uplink: tables.uplink()?,
            generation: tables.fib_generation()?,
            rules,
            reverse,
            relays,
            internal: nets,
            flows: HashMap::new(),
            trains: HashMap::new(),
            buckets: HashMap::new(),
        })
    }

    pub fn uplink_addr(&self) -> Ipv4Addr {
        addr(self.uplink.addr)
    }

    /// Whether the address filter refuses the /24 `net`.
    pub fn is_internal(&self, net: u32) -> bool {
        net != 0 && self.internal.contains(&net)
    }

    /// The prediction for `case`, deciding time-dependent branches with
    /// `clock`; `cached` says whether ROUTE_CACHE holds a current answer
    /// for a key (asked only where the answer changes the verdict).
    pub fn predict(
        &self,
        case: &Case,
        clock: &mut Clock<'_>,
        cached: &dyn Fn(&RouteKey) -> bool,
    ) -> Outcome {
        let mut run = Run {
            model: self,
            frame: &case.frame,
            ifindex: case.ifindex,
            clock,
            cached,
            outcome: Outcome {
                action: TC_ACT_UNSPEC,
                output: case.frame.clone(),
                reason: None,
                verdict: Verdict::Skipped(""),
                up: Vec::new(),
                down: Vec::new(),
                flow: None,
                train: None,
                bucket: None,
            },
        };
        let result = match case.role {
            Role::Uplink => run.uplink(),
            Role::Downstream => run.downstream(),
        };
        let mut outcome = run.outcome;
        match result {
            Ok(Done::Redirected(bytes)) => {
                outcome.action = TC_ACT_REDIRECT;
                outcome.output = bytes;
                outcome.verdict = Verdict::Redirected;
            }
            Ok(Done::Relayed(verdict)) => outcome.verdict = verdict,
            Err(reason) => {
                outcome.reason = Some(reason);
                outcome.verdict = Verdict::Skipped(reason.name());
                if reason.disposition() == Disposition::Dropped {
                    outcome.action = TC_ACT_SHOT;
                }
            }
        }
        outcome
    }

    /// The entries `case`'s packet names, as far as its headers can be
    /// read.
    pub fn names(&self, case: &Case) -> Names {
        let mut names = Names::default();
        let frame = &case.frame;
        let Ok(ip) = parse::eth(frame).and_then(|()| parse::ipv4(frame)) else {
            return names;
        };
        let group = match case.role {
            Role::Uplink => self.relay_group(ip.daddr),
            Role::Downstream => (is_multicast(wire(ip.daddr)) || ip.daddr == Ipv4Addr::BROADCAST)
                .then_some(ip.daddr),
        };
        if let Some(group) = group {
            if ip.proto == UDP {
                let key = train_key(case.ifindex, &ip);
                names.train = Some(key);
                let relay_key = match ip.fragment {
                    Fragment::Later { .. } => self.trains.get(&key).map(|t| t.relay),
                    _ => parse::l4(frame, &ip).ok().map(|l4| RelayKey {
                        group: wire(group),
                        port: l4.dport.to_be(),
                        pad: 0,
                    }),
                };
                if let Some(relay) = relay_key.and_then(|k| self.relays.get(&k)) {
                    names.bucket = Some(2 * relay.slot + u32::from(case.role == Role::Uplink));
                }
            }
            return names;
        }
        if ip.fragment != Fragment::Whole {
            return names;
        }
        let Ok(l4) = parse::l4(frame, &ip) else {
            return names;
        };
        names.flow = match case.role {
            Role::Uplink => Some(FlowKey::new(
                wire(ip.saddr),
                l4.sport.to_be(),
                ip.proto,
                l4.dport.to_be(),
            )),
            Role::Downstream => self
                .reverse
                .get(&(ip.saddr, l4.sport, ip.proto))
                .map(|&listen| {
                    FlowKey::new(wire(ip.daddr), l4.dport.to_be(), ip.proto, listen.to_be())
                }),
        };
        names
    }

    /// `lan::relay_group`: the group a LAN datagram to `daddr` is for.
    fn relay_group(&self, daddr: Ipv4Addr) -> Option<Ipv4Addr> {
        if is_multicast(wire(daddr)) || daddr == Ipv4Addr::BROADCAST {
            return Some(daddr);
        }
        let mask = maps::prefix_to_mask(self.uplink.prefix_len);
        (self.uplink.prefix_len < 31 && wire(daddr) == self.uplink.addr | !mask)
            .then_some(Ipv4Addr::BROADCAST)
    }

    /// Applies an observed outcome's changes, with the times the tables
    /// were read to hold.
    pub fn apply_flow(&mut self, key: FlowKey, entry: Option<FlowEntry>) {
        match entry {
            Some(entry) => self.flows.insert(key, entry),
            None => self.flows.remove(&key),
        };
    }

    pub fn apply_train(&mut self, key: FragmentKey, train: Option<FragmentTrain>) {
        match train {
            Some(train) => self.trains.insert(key, train),
            None => self.trains.remove(&key),
        };
    }
}

fn train_key(ifindex: u32, ip: &Ip) -> FragmentKey {
    FragmentKey {
        ifindex,
        saddr: wire(ip.saddr),
        daddr: wire(ip.daddr),
        id: ip.id,
        pad: 0,
    }
}

/// How a program run that did not stop at a reason ended.
enum Done {
    Redirected(Vec<u8>),
    Relayed(Verdict),
}

/// Where a route lookup sends a packet (fib::Route).
#[derive(Clone, Copy)]
enum Route {
    Resolved { ifindex: u32, smac: Mac, dmac: Mac },
    Unresolved { ifindex: u32 },
}

impl Route {
    fn ifindex(&self) -> u32 {
        match *self {
            Route::Resolved { ifindex, .. } | Route::Unresolved { ifindex } => ifindex,
        }
    }

    fn macs(&self) -> Option<(Mac, Mac)> {
        match *self {
            Route::Resolved { smac, dmac, .. } => Some((dmac, smac)),
            Route::Unresolved { .. } => None,
        }
    }
}

/// What a relay lookup found (relay.rs's `Relayed`).
struct Relayed {
    relay: maps::Relay,
    l4: Option<L4>,
    train: Step,
    key: FragmentKey,
}

/// What copying a packet does to its fragment train.
#[derive(Clone, Copy)]
enum Step {
    Whole,
    Start(FragmentTrain),
    Next(FragmentTrain),
    End(FragmentTrain),
}

/// One prediction in progress: the programs' code paths over the model.
struct Run<'a, 'c> {
    model: &'a Model,
    frame: &'a [u8],
    ifindex: u32,
    clock: &'a mut Clock<'c>,
    cached: &'a dyn Fn(&RouteKey) -> bool,
    outcome: Outcome,
}

impl Run<'_, '_> {
    fn uplink(&mut self) -> Result<Done, Reason> {
        parse::eth(self.frame)?;
        let ip = parse::ipv4(self.frame)?;
        if self.ifindex != self.model.uplink.ifindex {
            return Err(Reason::NotUplink);
        }
        if let Some(group) = self.model.relay_group(ip.daddr) {
            return self.relay_down(&ip, group);
        }
        if ip.daddr != self.model.uplink_addr() {
            return Err(Reason::OtherDestination);
        }
        if ip.fragment != Fragment::Whole {
            return Err(Reason::Fragment);
        }
        self.forward(&ip)
    }

    fn downstream(&mut self) -> Result<Done, Reason> {
        parse::eth(self.frame)?;
        let ip = parse::ipv4(self.frame)?;
        if is_multicast(wire(ip.daddr)) || ip.daddr == Ipv4Addr::BROADCAST {
            return self.relay_up(&ip);
        }
        if ip.fragment != Fragment::Whole {
            return Err(Reason::Fragment);
        }
        if ip.proto == ICMP {
            return Err(self.icmp_error(&ip));
        }
        self.reply(&ip)
    }

    fn plausible_source(&self, ip: &Ip) -> Result<(), Reason> {
        if martian(ip.saddr) || ip.saddr == self.model.uplink_addr() {
            return Err(Reason::MartianSource);
        }
        Ok(())
    }

    /// fib::reverse_path: `saddr` must route back out of `ifindex`. A frame
    /// too long for the lookup's own MTU check fails unless the answer is
    /// cached (lookups of cached keys skip the helper).
    fn reverse_path(&self, ifindex: u32, ip: &Ip) -> Result<(), Reason> {
        let hop = self
            .model
            .net
            .route(ip.saddr)
            .ok_or(Reason::ReversePathFailed)?;
        if self.frame.len() > MAX_FORWARDABLE_FRAME {
            let key = RouteKey {
                daddr: wire(ip.saddr),
                saddr: wire(ip.daddr),
                ifindex,
                kind: ROUTE_KIND_REVERSE_PATH | u32::from(ip.proto),
            };
            if !(self.cached)(&key) {
                return Err(Reason::ReversePathFailed);
            }
        }
        if hop.ifindex == ifindex {
            Ok(())
        } else {
            Err(Reason::ReversePathFailed)
        }
    }

    /// fib::lookup: a forward lookup, resolving the neighbour, with the
    /// answer a flow may remember.
    fn lookup(&self, daddr: Ipv4Addr, tot_len: u16) -> Result<(Route, Option<RouteEntry>), Reason> {
        let hop = self.model.net.route(daddr).ok_or(Reason::FibNoRoute)?;
        let Some(dmac) = hop.dmac else {
            return Ok((
                Route::Unresolved {
                    ifindex: hop.ifindex,
                },
                None,
            ));
        };
        if self.frame.len() > MAX_FORWARDABLE_FRAME {
            return Err(Reason::FibFragNeeded);
        }
        let entry = RouteEntry {
            generation: self.model.generation,
            ifindex: hop.ifindex,
            mtu: MTU,
            smac: hop.smac,
            dmac,
            pad: 0,
        };
        Ok((resolved(&entry, tot_len)?, Some(entry)))
    }

    /// fib::flow_route: the route a flow remembered for packets arriving on
    /// this interface, or else what `check` finds.
    fn flow_route(
        &self,
        remembered: Option<&FlowRoute>,
        tot_len: u16,
        check: impl FnOnce(&Self) -> Result<(Route, Option<RouteEntry>), Reason>,
    ) -> Result<(Route, Option<FlowRoute>), Reason> {
        if let Some(flow) = remembered
            && flow.ingress == self.ifindex
            && flow.route.ifindex != 0
            && flow.route.generation == self.model.generation
        {
            return Ok((resolved(&flow.route, tot_len)?, None));
        }
        let (route, lasting) = check(self)?;
        Ok((
            route,
            lasting.map(|route| FlowRoute {
                ingress: self.ifindex,
                route,
            }),
        ))
    }

    /// flow::of_peer's and of_target's timeout test.
    fn expired(&mut self, entry: &FlowEntry, proto: u8) -> bool {
        let deadline = entry
            .seen_ns
            .saturating_add(flow::idle_timeout_ns(proto, entry.state));
        self.clock.past(Kind::Boot, deadline)
    }

    /// flow.rs's `touch`: the entry after one checked packet, and what its
    /// `seen_ns` becomes.
    fn touch(&mut self, entry: &FlowEntry, from_peer: bool, l4: &L4) -> (FlowEntry, Expected) {
        let mut next = *entry;
        let changed = flow::advance(&mut next, from_peer, &l4.segment);
        let seen = if changed
            || self
                .clock
                .past(Kind::Boot, entry.seen_ns.saturating_add(REFRESH_NS))
        {
            Expected::NowPlus(Kind::Boot, 0)
        } else {
            Expected::Exactly(entry.seen_ns)
        };
        (next, seen)
    }

    fn forward(&mut self, ip: &Ip) -> Result<Done, Reason> {
        let l4 = parse::l4(self.frame, ip)?;
        let rule = *self
            .model
            .rules
            .get(&(ip.proto, l4.dport))
            .ok_or(Reason::NoRule)?;
        self.plausible_source(ip)?;
        if !rule.allow.allows(wire(ip.saddr), &self.model.uplink) {
            return Err(Reason::SourceNotAllowed);
        }
        if ip.ttl <= 1 {
            return Err(Reason::TtlExpired);
        }
        let key = FlowKey::new(wire(ip.saddr), l4.sport.to_be(), ip.proto, l4.dport.to_be());
        let live = match self.model.flows.get(&key) {
            Some(entry)
                if entry.rule_id == rule.id
                    && !self.expired(entry, ip.proto)
                    && !flow::reopens(entry.state, l4.segment.flags) =>
            {
                Some(*entry)
            }
            _ => None,
        };
        let target = addr(rule.target_addr);
        let (route, remember) =
            self.flow_route(live.as_ref().map(|e| &e.to_target), ip.tot_len, |run| {
                run.reverse_path(run.ifindex, ip)?;
                run.lookup(target, ip.tot_len)
            })?;
        if route.ifindex() == self.ifindex {
            return Err(Reason::TargetViaUplink);
        }
        if let Some(entry) = &live
            && !flow::acceptable(entry, true, &l4.segment)
        {
            return Err(Reason::TcpOutOfWindow);
        }
        let change = match &live {
            Some(entry) => {
                let (mut next, seen) = self.touch(entry, true, &l4);
                if let Some(route) = remember {
                    next.to_target = route;
                }
                FlowChange::Set {
                    entry: next,
                    created: Expected::Exactly(entry.created_ns),
                    seen,
                }
            }
            None => {
                let mut entry = flow::opened(rule.id, rule.slot as u16, &l4.segment, 0);
                entry.to_target = remember.unwrap_or_default();
                FlowChange::Set {
                    entry,
                    created: Expected::NowPlus(Kind::Boot, 0),
                    seen: Expected::NowPlus(Kind::Boot, 0),
                }
            }
        };
        self.outcome.flow = Some((key, change));
        Ok(Done::Redirected(rewrite::translated(
            self.frame,
            ip,
            &l4,
            End::Destination,
            target,
            u16::from_be(rule.target_port),
            route.macs(),
        )))
    }

    fn reply(&mut self, ip: &Ip) -> Result<Done, Reason> {
        let l4 = parse::l4(self.frame, ip)?;
        let listen = *self
            .model
            .reverse
            .get(&(ip.saddr, l4.sport, ip.proto))
            .ok_or(Reason::NoRule)?;
        let rule = *self
            .model
            .rules
            .get(&(ip.proto, listen))
            .ok_or(Reason::NoRule)?;
        if martian(ip.daddr) || !rule.allow.allows(wire(ip.daddr), &self.model.uplink) {
            return Err(Reason::PeerNotAllowed);
        }
        let key = FlowKey::new(wire(ip.daddr), l4.dport.to_be(), ip.proto, listen.to_be());
        let entry = *self.model.flows.get(&key).ok_or(Reason::NoFlow)?;
        if entry.rule_id != rule.id || self.expired(&entry, ip.proto) {
            self.outcome.flow = Some((key, FlowChange::Remove));
            return Err(Reason::NoFlow);
        }
        if ip.ttl <= 1 {
            return Err(Reason::TtlExpired);
        }
        let peer = ip.daddr;
        let (route, remember) = self.flow_route(Some(&entry.to_peer), ip.tot_len, |run| {
            run.reverse_path(run.ifindex, ip)?;
            run.lookup(peer, ip.tot_len)
        })?;
        if route.ifindex() != self.model.uplink.ifindex {
            return Err(Reason::ReplyNotViaUplink);
        }
        if !flow::acceptable(&entry, false, &l4.segment) {
            return Err(Reason::TcpOutOfWindow);
        }
        let (mut next, seen) = self.touch(&entry, false, &l4);
        if let Some(route) = remember {
            next.to_peer = route;
        }
        self.outcome.flow = Some((
            key,
            FlowChange::Set {
                entry: next,
                created: Expected::Exactly(entry.created_ns),
                seen,
            },
        ));
        Ok(Done::Redirected(rewrite::translated(
            self.frame,
            ip,
            &l4,
            End::Source,
            self.model.uplink_addr(),
            listen,
            route.macs(),
        )))
    }

    fn icmp_error(&self, ip: &Ip) -> Reason {
        match parse::icmp_error(self.frame, ip) {
            Ok(Some(quoted))
                if self
                    .model
                    .reverse
                    .contains_key(&(quoted.daddr, quoted.dport, quoted.proto)) =>
            {
                Reason::IcmpErrorDropped
            }
            Ok(_) => Reason::OtherProtocol,
            Err(reason) => reason,
        }
    }

    /// relay.rs's `lookup`: the relay of a datagram (or fragment) to
    /// `group` arriving here, and what copying it does to its train.
    fn relay_lookup(&mut self, ip: &Ip, group: Ipv4Addr) -> Result<Relayed, Reason> {
        let model = self.model;
        if ip.proto != UDP {
            return Err(Reason::OtherProtocol);
        }
        let key = train_key(self.ifindex, ip);
        match ip.fragment {
            Fragment::Whole | Fragment::First => {
                let l4 = parse::l4(self.frame, ip)?;
                let relay_key = RelayKey {
                    group: wire(group),
                    port: l4.dport.to_be(),
                    pad: 0,
                };
                let relay = *model
                    .relays
                    .get(&relay_key)
                    .ok_or(Reason::OtherDestination)?;
                let train = if ip.fragment == Fragment::First {
                    let fresh = FragmentTrain {
                        relay: relay_key,
                        ..FragmentTrain::default()
                    };
                    let next_offset = fresh
                        .follows(0, ip.payload_len(), true)
                        .ok_or(Reason::FragmentOutOfOrder)?;
                    Step::Start(FragmentTrain {
                        next_offset,
                        ..fresh
                    })
                } else {
                    Step::Whole
                };
                Ok(Relayed {
                    relay,
                    l4: Some(l4),
                    train,
                    key,
                })
            }
            Fragment::Later { last } => {
                let train = *model.trains.get(&key).ok_or(Reason::Fragment)?;
                if self.clock.past(Kind::Mono, train.until_ns) {
                    return Err(Reason::Fragment);
                }
                let next_offset = train
                    .follows(ip.frag_offset, ip.payload_len(), !last)
                    .ok_or(Reason::FragmentOutOfOrder)?;
                let relay = *model
                    .relays
                    .get(&train.relay)
                    .ok_or(Reason::OtherDestination)?;
                let next = FragmentTrain {
                    next_offset,
                    ..train
                };
                Ok(Relayed {
                    relay,
                    l4: None,
                    train: if last {
                        Step::End(next)
                    } else {
                        Step::Next(next)
                    },
                    key,
                })
            }
        }
    }

    /// relay.rs's `take_token`: the GCRA of one direction of a relay.
    fn take_token(&mut self, relay: &maps::Relay, up: bool, limited: Reason) -> Result<(), Reason> {
        let (limit, bucket): (&RateLimit, u32) = if up {
            (&relay.up, 2 * relay.slot)
        } else {
            (&relay.down, 2 * relay.slot + 1)
        };
        if limit.interval_ns == 0 {
            return Ok(());
        }
        let tat = self.model.buckets.get(&bucket).copied().unwrap_or(0);
        let tat_ahead = tat > 0 && !self.clock.past(Kind::Mono, tat - 1);
        let next = if tat_ahead {
            // base = tat: allowed when tat - now <= burst.
            let allowed =
                tat <= limit.burst_ns || self.clock.past(Kind::Mono, tat - limit.burst_ns - 1);
            if !allowed {
                return Err(limited);
            }
            Expected::Exactly(tat + limit.interval_ns)
        } else {
            Expected::NowPlus(Kind::Mono, limit.interval_ns)
        };
        self.outcome.bucket = Some((bucket, next));
        Ok(())
    }

    /// relay.rs's `record`: the train as the copied packet leaves it.
    fn record(&mut self, key: FragmentKey, step: Step) {
        self.outcome.train = match step {
            Step::Whole => None,
            Step::Start(value) => Some((
                key,
                TrainChange::Set {
                    value,
                    until: Expected::NowPlus(Kind::Mono, FRAGMENT_TRAIN_NS),
                },
            )),
            Step::Next(value) => Some((
                key,
                TrainChange::Set {
                    value,
                    until: Expected::Exactly(value.until_ns),
                },
            )),
            Step::End(_) => Some((key, TrainChange::Remove)),
        };
    }

    /// relay.rs's `from_lan`.
    fn relay_down(&mut self, ip: &Ip, group: Ipv4Addr) -> Result<Done, Reason> {
        let Relayed {
            relay,
            l4,
            train,
            key,
        } = self.relay_lookup(ip, group)?;
        let src_mac: Mac = self.frame[6..12].try_into().expect("6 bytes");
        if src_mac == self.model.uplink.mac || ip.saddr == self.model.uplink_addr() {
            return Err(Reason::Reflected);
        }
        self.plausible_source(ip)?;
        if !relay.allow.allows(wire(ip.saddr), &self.model.uplink) {
            return Err(Reason::SourceNotAllowed);
        }
        self.reverse_path(self.model.uplink.ifindex, ip)?;
        self.take_token(&relay, false, Reason::RelayDownRateLimited)?;
        self.record(key, train);
        let base = rewrite::toward_vms(self.frame, ip, l4.as_ref(), group);
        let mut sent: Vec<u32> = Vec::new();
        for &target in relay.targets.iter().take(usize::from(relay.n_targets)) {
            let Some(hop) = self.model.net.route(addr(target)) else {
                continue;
            };
            if self.frame.len() > MAX_FORWARDABLE_FRAME {
                continue;
            }
            if hop.ifindex == self.model.uplink.ifindex || sent.contains(&hop.ifindex) {
                continue;
            }
            let Some(egress_mac) = self.model.net.downstream_mac(hop.ifindex) else {
                continue;
            };
            let mut copy = base.clone();
            rewrite::set_macs(&mut copy, relay_dst_mac(wire(group)), egress_mac);
            self.outcome.down.push((hop.ifindex, copy));
            sent.push(hop.ifindex);
        }
        if sent.is_empty() {
            return Err(Reason::RelayNoRoute);
        }
        Ok(Done::Relayed(Verdict::RelayedDown))
    }

    /// relay.rs's `to_lan`, `scan_up` and `copy_up`.
    fn relay_up(&mut self, ip: &Ip) -> Result<Done, Reason> {
        let Relayed {
            relay,
            l4,
            train,
            key,
        } = self.relay_lookup(ip, ip.daddr)?;
        if !relay.has_target(wire(ip.saddr)) {
            return Err(Reason::RelayNotTarget);
        }
        self.reverse_path(self.ifindex, ip)?;
        if relay.flags & RELAY_DNS_QUERIES_UP != 0
            && l4.is_some()
            && parse::is_dns_response(self.frame)
        {
            return Err(Reason::RelayAnswerBlocked);
        }
        self.take_token(&relay, true, Reason::RelayRateLimited)?;
        let from = if l4.is_some() {
            L4_OFF + UDP_HLEN
        } else {
            L4_OFF
        };
        if ip.end() > parse::ETH_HLEN + SCAN_MAX {
            return Err(Reason::RelayUnscannable);
        }
        let (mut scan, finish) = match train {
            Step::Whole => (Default::default(), true),
            Step::Start(value) => (value.scan, false),
            Step::Next(value) => (value.scan, false),
            Step::End(value) => (value.scan, true),
        };
        let model = self.model;
        let mut hits = 0;
        let mut count = |c: Candidates| {
            hits += [c.raw, c.written, c.reversed]
                .into_iter()
                .filter(|&net| model.is_internal(net))
                .count();
        };
        for &byte in &self.frame[from..ip.end()] {
            count(scan.feed(byte));
        }
        if finish {
            count(scan.finish());
        }
        // The copy stage refuses a ticket the check wrote more than
        // TICKET_NS before: another packet's, or this one's after a
        // preemption between the stages.
        if self.clock.apart(Kind::Mono, TICKET_NS) {
            return Err(Reason::RelayUnscannable);
        }
        if hits != 0 {
            return Err(Reason::RelayCarriesAddress);
        }
        let scanned = |value: FragmentTrain| FragmentTrain { scan, ..value };
        let train = match train {
            Step::Whole => Step::Whole,
            Step::Start(value) => Step::Start(scanned(value)),
            Step::Next(value) => Step::Next(scanned(value)),
            Step::End(value) => Step::End(scanned(value)),
        };
        self.record(key, train);
        let ttl = if relay.ttl != 0 { relay.ttl } else { ip.ttl };
        let copy = rewrite::copy_up(
            self.frame,
            ip,
            l4.as_ref(),
            self.model.uplink_addr(),
            ttl,
            (relay_dst_mac(wire(ip.daddr)), self.model.uplink.mac),
        );
        self.outcome.up.push(copy);
        Ok(Done::Relayed(Verdict::RelayedUp))
    }
}

/// fib.rs's `resolved`: a complete answer, for a packet of `tot_len`
/// bytes.
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
