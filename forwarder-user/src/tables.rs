//! Typed access to the datapath's maps, either from the loaded object (the
//! daemon) or from their pins (inspect, tests).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::Key,
    },
    util::nr_cpus,
};
use forwarder_common::{
    maps::{
        FlowEntry, FlowKey, ForwardRule, MAX_RELAYS, MAX_RULES, Relay as RelayValue, RelayCounters,
        RelayKey, ReverseKey, RuleCounters, RuleKey, UplinkState, names,
    },
    reason::Reason,
};

use crate::{
    clock::Now,
    flow_table::FlowTable,
    internal_nets::{self, InternalNets},
    rules::{Relay, Rule},
};

pub struct Tables {
    uplink: Array<MapData, UplinkState>,
    forward: HashMap<MapData, RuleKey, ForwardRule>,
    rule_slots: Array<MapData, ForwardRule>,
    reverse: HashMap<MapData, ReverseKey, RuleKey>,
    rule_counters: PerCpuArray<MapData, RuleCounters>,
    reasons: PerCpuArray<MapData, u64>,
    relays: HashMap<MapData, RelayKey, RelayValue>,
    relay_counters: PerCpuArray<MapData, RelayCounters>,
    relay_buckets: Array<MapData, u64>,
    downstream_macs: HashMap<MapData, u32, [u8; 6]>,
    fib_generation: Array<MapData, u32>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    route_mtus: LpmTrie<MapData, u32, u32>,
    internal_nets: Array<MapData, internal_nets::Bitmap>,
    /// Where new rule ids come from; `None` for maps opened from their
    /// pins, which only read rules.
    rule_ids: Option<RuleIds>,
}

/// The highest rule id these maps ever handed out, in a record of its own
/// (`<pin-dir>/meta/RULE_IDS` for an instance) that lives and dies with
/// the pins. Ids only grow while it lives, so a flow that outlived its
/// rule (recreated by a packet in flight while the rule went, or kept in a
/// flow table while the rules map was replaced) never meets another rule
/// under its id.
pub struct RuleIds(Array<MapData, u32>);

impl RuleIds {
    /// The record in `map`: an array of one id, zero when new.
    pub fn from_map(map: Map) -> Result<Self> {
        Ok(RuleIds(Array::try_from(map)?))
    }

    /// A record nobody else sees, for a throwaway instance (the self-test).
    pub fn unpinned() -> Result<Self> {
        Ok(RuleIds(Array::create(1, 0)?))
    }

    fn high_water(&self) -> Result<u32> {
        Ok(self.0.get(&0, 0)?)
    }

    fn set_high_water(&mut self, id: u32) -> Result<()> {
        self.0.set(0, id, 0).context("recording the rule ids")
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
}

impl Tables {
    /// Takes the maps out of a freshly loaded object, with the record new
    /// rule ids come from.
    pub fn from_ebpf(ebpf: &mut Ebpf, rule_ids: RuleIds) -> Result<Self> {
        Self::from_maps(|name| take(ebpf, name), Some(rule_ids))
    }

    /// Opens the maps a running instance pinned in `dir`, to read them.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        Self::from_maps(|name| open(dir, name), None)
    }

    /// Opens the maps pinned in `dir` to change their rules too, with the
    /// instance's record of rule ids.
    pub fn open_pinned_with_ids(dir: &Path, rule_ids: RuleIds) -> Result<Self> {
        Self::from_maps(|name| open(dir, name), Some(rule_ids))
    }

    fn from_maps(
        mut get: impl FnMut(&str) -> Result<Map>,
        rule_ids: Option<RuleIds>,
    ) -> Result<Self> {
        Ok(Tables {
            rule_ids,
            uplink: get(names::UPLINK)?.try_into()?,
            forward: get(names::FORWARD_RULES)?.try_into()?,
            rule_slots: get(names::RULE_SLOTS)?.try_into()?,
            reverse: get(names::REVERSE_RULES)?.try_into()?,
            rule_counters: get(names::RULE_COUNTERS)?.try_into()?,
            reasons: get(names::REASON_COUNTERS)?.try_into()?,
            relays: get(names::RELAYS)?.try_into()?,
            relay_counters: get(names::RELAY_COUNTERS)?.try_into()?,
            relay_buckets: get(names::RELAY_BUCKETS)?.try_into()?,
            downstream_macs: get(names::DOWNSTREAM_MACS)?.try_into()?,
            fib_generation: get(names::FIB_GENERATION)?.try_into()?,
            flows: get(names::FLOWS)?.try_into()?,
            route_mtus: get(names::ROUTE_MTUS)?.try_into()?,
            internal_nets: get(names::INTERNAL_NETS)?.try_into()?,
        })
    }

    pub fn uplink(&self) -> Result<UplinkState> {
        Ok(self.uplink.get(&0, 0)?)
    }

    pub fn set_uplink(&mut self, state: UplinkState) -> Result<()> {
        self.uplink
            .set(0, state, 0)
            .context("updating the uplink state map")
    }

    /// Makes INTERNAL_NETS the bitmap of exactly `nets`. Networks in both
    /// the old and the new bitmap stay set throughout the write.
    pub fn sync_internal_nets(&mut self, nets: &InternalNets) -> Result<()> {
        // By reference: the 2 MiB value must not pass through the stack.
        let bits = nets.bitmap();
        self.internal_nets
            .set(0, bits.as_ref(), 0)
            .context("writing the internal networks")
    }

    /// Makes ROUTE_MTUS hold exactly these routes' MTUs (the smallest, when
    /// two tables route one prefix).
    pub fn sync_route_mtus(&mut self, routes: &[crate::netlink::RouteMtu]) -> Result<()> {
        let mut wanted: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        for r in routes
            .iter()
            .take(forwarder_common::maps::MAX_ROUTE_MTUS as usize)
        {
            let key = (u32::from(r.prefix_len), u32::from_ne_bytes(r.dst.octets()));
            let mtu = wanted.entry(key).or_insert(r.mtu);
            *mtu = (*mtu).min(r.mtu);
        }
        let stale: Vec<Key<u32>> = self
            .route_mtus
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(&(k.prefix_len(), k.data())))
            .collect();
        for key in stale {
            self.route_mtus
                .remove(&key)
                .context("removing a route MTU")?;
        }
        for ((prefix_len, dst), mtu) in wanted {
            self.route_mtus
                .insert(&Key::new(prefix_len, dst), mtu, 0)
                .context("recording a route MTU")?;
        }
        Ok(())
    }

    /// The generation cached FIB results are valid under.
    pub fn fib_generation(&self) -> Result<u32> {
        Ok(self.fib_generation.get(&0, 0)?)
    }

    /// Invalidates every FIB result the datapath cached.
    pub fn bump_fib_generation(&mut self) -> Result<()> {
        let next = self.fib_generation.get(&0, 0)?.wrapping_add(1);
        self.fib_generation
            .set(0, next, 0)
            .context("bumping the FIB generation")
    }

    /// The rules the datapath holds now, by key.
    pub fn installed(&self) -> Result<BTreeMap<(u8, u16), (RuleKey, ForwardRule)>> {
        let mut out = BTreeMap::new();
        for entry in self.forward.iter() {
            let (key, value) = entry?;
            out.insert((key.proto, u16::from_be(key.port)), (key, value));
        }
        Ok(out)
    }

    /// Makes the rule maps hold exactly `rules`. A rule already installed
    /// over the same ports keeps its counter slot, so counters survive a restart or a reload,
    /// and, while its target stays the same, its id and so its flows; a new
    /// rule gets a free slot with its counters zeroed and a new id. Flows of
    /// rules that are gone or retargeted are removed. Returns the rules
    /// removed, as `proto:port`.
    pub fn sync_rules(&mut self, rules: &[Rule]) -> Result<Vec<String>> {
        let installed = self.installed()?;
        // A rule is the one installed only over the very same ports: a
        // range split or shrunk is a new rule, with its own slot and id.
        let ranges: BTreeMap<(u8, crate::spec::Ports), ForwardRule> = rule_ranges(&installed)
            .into_iter()
            .map(|(proto, ports, value)| ((proto, ports), value))
            .collect();
        let same_ports = |rule: &Rule| ranges.get(&(rule.proto.number(), rule.ports));
        let kept: Vec<Option<u32>> = rules
            .iter()
            .map(|rule| same_ports(rule).map(|value| value.slot))
            .collect();
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        let slots = assign_slots(kept, MAX_RULES, |fresh| {
            let zero = PerCpuValues::try_from(vec![RuleCounters::default(); cpus])?;
            self.rule_counters
                .set(fresh, zero, 0)
                .context("zeroing rule counters")
        })?;
        // The same rule as installed (same ports, same target) keeps its id.
        let unchanged: Vec<Option<u32>> = rules
            .iter()
            .map(|rule| {
                same_ports(rule)
                    .filter(|v| {
                        v.target_addr == u32::from_ne_bytes(rule.target.octets())
                            && u16::from_be(v.target_port) == rule.target_port
                    })
                    .map(|v| v.id)
            })
            .collect();
        let ids = self.new_rule_ids(&installed, &unchanged)?;
        let now = Now::read();
        let mut live_ids = BTreeSet::new();
        let mut wanted_forward = BTreeSet::new();
        let mut wanted_reverse = BTreeSet::new();
        let mut used_slots = BTreeSet::new();
        for ((rule, slot), id) in rules.iter().zip(slots).zip(ids) {
            live_ids.insert(id);
            used_slots.insert(slot);
            // The rule's one entry its flows find it by: its target port
            // is the first port's, the same shift serves them all.
            self.rule_slots
                .set(slot, rule.encode(rule.target_port, slot, id, &now), 0)
                .with_context(|| format!("installing {rule} in its slot"))?;
            for (key, reverse, target_port) in rule.entries() {
                // Reverse first: a reply can only follow a forwarded packet.
                self.reverse
                    .insert(reverse, key, 0)
                    .with_context(|| format!("installing the reply entry of {rule}"))?;
                self.forward
                    .insert(key, rule.encode(target_port, slot, id, &now), 0)
                    .with_context(|| format!("installing {rule}"))?;
                wanted_forward.insert((key.proto, u16::from_be(key.port)));
                wanted_reverse.insert(reverse_tuple(&reverse));
            }
        }

        let mut removed = BTreeMap::new();
        for ((proto, port), (key, value)) in &installed {
            if !wanted_forward.contains(&(*proto, *port)) {
                self.forward
                    .remove(key)
                    .context("removing a stale forward rule")?;
                removed.insert((*proto, *port), (*key, *value));
            }
        }
        for (_, value) in removed.values() {
            if !used_slots.contains(&value.slot) {
                self.rule_slots
                    .set(value.slot, ForwardRule::default(), 0)
                    .context("clearing a removed rule's slot")?;
            }
        }
        let removed: Vec<String> = rule_ranges(&removed)
            .into_iter()
            .map(|(proto, ports, _)| {
                let name = crate::spec::Proto::from_number(proto).map_or("?", |p| p.name());
                format!("{name}:{ports}")
            })
            .collect();
        let stale: Vec<ReverseKey> = self
            .reverse
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted_reverse.contains(&reverse_tuple(k)))
            .collect();
        for key in stale {
            self.reverse
                .remove(&key)
                .context("removing a stale reply entry")?;
        }
        self.remove_flows(|_, entry| !live_ids.contains(&entry.rule_id))?;
        Ok(removed)
    }

    /// The ids of rules about to be installed: an unchanged rule's own, the
    /// others above every id these maps ever held, recorded before any is
    /// used. Without a record yet (a new instance, or pins of a build that
    /// kept none), the highest id the rules and flows hold is the start.
    fn new_rule_ids(
        &mut self,
        installed: &BTreeMap<(u8, u16), (RuleKey, ForwardRule)>,
        unchanged: &[Option<u32>],
    ) -> Result<Vec<u32>> {
        let read_only =
            || anyhow!("maps opened from their pins are read-only for rules: no ids to hand out");
        let mut high_water = self.rule_ids.as_ref().ok_or_else(read_only)?.high_water()?;
        if high_water == 0 {
            high_water = self
                .flows()?
                .iter()
                .map(|(_, e)| e.rule_id)
                .max()
                .unwrap_or(0);
        }
        let installed_max = installed.values().map(|(_, v)| v.id).max().unwrap_or(0);
        let (ids, high_water) = assign_ids(unchanged, high_water.max(installed_max))?;
        self.rule_ids
            .as_mut()
            .ok_or_else(read_only)?
            .set_high_water(high_water)?;
        Ok(ids)
    }

    /// Every flow the datapath holds, expired ones included.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowEntry)>> {
        FlowTable::of(self.flows.map()).entries()
    }

    /// Records a flow of the installed rule `proto:listen_port` with `peer`,
    /// as the uplink program would on the peer's first packet, answered.
    pub fn open_flow(
        &mut self,
        proto: crate::spec::Proto,
        peer: std::net::Ipv4Addr,
        peer_port: u16,
        listen_port: u16,
    ) -> Result<()> {
        let (_, rule) = self
            .installed()?
            .remove(&(proto.number(), listen_port))
            .ok_or_else(|| anyhow!("no rule {proto}:{listen_port}"))?;
        let now = crate::clock::boot_ns();
        let key = FlowKey::new(
            u32::from_ne_bytes(peer.octets()),
            peer_port.to_be(),
            proto.number(),
            listen_port.to_be(),
        );
        let entry = FlowEntry {
            rule_id: rule.id,
            rule_slot: rule.slot as u16,
            state: forwarder_common::flow::FLOW_REPLIED,
            created_ns: now,
            seen_ns: now,
            ..Default::default()
        };
        self.set_flow(&key, &entry)
    }

    /// Writes one flow entry as given.
    pub fn set_flow(&mut self, key: &FlowKey, entry: &FlowEntry) -> Result<()> {
        self.flows
            .insert(key, entry, 0)
            .context("writing the flow table")
    }

    /// Removes the flows `doomed` picks (each as it is just before its
    /// removal); returns how many went.
    pub fn remove_flows(&mut self, doomed: impl Fn(&FlowKey, &FlowEntry) -> bool) -> Result<usize> {
        let swept = FlowTable::of(self.flows.map()).remove_if(doomed, || true)?;
        Ok(swept.removed as usize)
    }

    /// Every installed rule as people see it, with its counters and the
    /// number of its flows that have not timed out.
    pub fn rule_views(&self) -> Result<Vec<crate::rule_view::RuleView>> {
        let now = crate::clock::boot_ns();
        let live = FlowTable::of(self.flows.map()).live_per_rule(now)?;
        rule_ranges(&self.installed()?)
            .into_iter()
            .map(|(proto, ports, rule)| {
                let counters = self.rule_counters(rule.slot)?;
                let flows = live.get(&rule.id).copied().unwrap_or(0);
                Ok(crate::rule_view::RuleView::new(
                    proto, ports, &rule, &counters, flows, now,
                ))
            })
            .collect()
    }

    /// The capacity of the flow table.
    pub fn flow_capacity(&self) -> Result<u32> {
        Ok(self.flows.map().info()?.max_entries())
    }

    /// The relays the datapath holds now, by group and port.
    pub fn installed_relays(&self) -> Result<BTreeMap<(u32, u16), RelayValue>> {
        let mut out = BTreeMap::new();
        for entry in self.relays.iter() {
            let (key, value) = entry?;
            out.insert((key.group, key.port), value);
        }
        Ok(out)
    }

    /// Makes the relay map hold exactly `relays`, keeping the slots (and
    /// so the counters) of relays already installed.
    pub fn sync_relays(&mut self, relays: &[Relay]) -> Result<()> {
        let installed = self.installed_relays()?;
        let kept: Vec<Option<u32>> = relays
            .iter()
            .map(|r| {
                installed
                    .get(&(r.key().group, r.key().port))
                    .map(|v| v.slot)
            })
            .collect();
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        let slots = assign_slots(kept, MAX_RELAYS, |fresh| {
            let zero = PerCpuValues::try_from(vec![RelayCounters::default(); cpus])?;
            self.relay_counters
                .set(fresh, zero, 0)
                .context("zeroing relay counters")?;
            for bucket in [2 * fresh, 2 * fresh + 1] {
                self.relay_buckets
                    .set(bucket, 0, 0)
                    .context("resetting a relay bucket")?;
            }
            Ok(())
        })?;
        for (relay, slot) in relays.iter().zip(slots) {
            self.relays
                .insert(relay.key(), relay.encode(slot), 0)
                .with_context(|| format!("installing relay {relay}"))?;
        }
        let wanted: BTreeSet<(u32, u16)> = relays
            .iter()
            .map(|r| (r.key().group, r.key().port))
            .collect();
        for (group, port) in installed.keys() {
            if !wanted.contains(&(*group, *port)) {
                self.relays
                    .remove(&RelayKey {
                        group: *group,
                        port: *port,
                        pad: 0,
                    })
                    .context("removing a stale relay")?;
            }
        }
        Ok(())
    }

    /// A relay's counters summed over CPUs.
    pub fn relay_counters(&self, slot: u32) -> Result<RelayCounters> {
        let per_cpu = self.relay_counters.get(&slot, 0)?;
        Ok(per_cpu
            .iter()
            .fold(RelayCounters::default(), |acc, c| RelayCounters {
                packets_up: acc.packets_up + c.packets_up,
                bytes_up: acc.bytes_up + c.bytes_up,
                packets_down: acc.packets_down + c.packets_down,
                bytes_down: acc.bytes_down + c.bytes_down,
                rate_limited: acc.rate_limited + c.rate_limited,
                rate_limited_down: acc.rate_limited_down + c.rate_limited_down,
            }))
    }

    /// Records the MAC of a downstream interface, for relay copies.
    pub fn set_downstream_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        self.downstream_macs
            .insert(ifindex, mac, 0)
            .context("updating the downstream MAC map")
    }

    pub fn remove_downstream_mac(&mut self, ifindex: u32) -> Result<()> {
        match self.downstream_macs.remove(&ifindex) {
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(err) => Err(err).context("updating the downstream MAC map"),
        }
    }

    /// Interfaces the datapath holds a downstream MAC for.
    pub fn downstream_macs(&self) -> Result<BTreeMap<u32, [u8; 6]>> {
        let mut out = BTreeMap::new();
        for entry in self.downstream_macs.iter() {
            let (ifindex, mac) = entry?;
            out.insert(ifindex, mac);
        }
        Ok(out)
    }

    /// A rule's counters summed over CPUs.
    pub fn rule_counters(&self, slot: u32) -> Result<RuleCounters> {
        let per_cpu = self.rule_counters.get(&slot, 0)?;
        Ok(per_cpu
            .iter()
            .fold(RuleCounters::default(), |acc, c| RuleCounters {
                packets_in: acc.packets_in + c.packets_in,
                bytes_in: acc.bytes_in + c.bytes_in,
                packets_out: acc.packets_out + c.packets_out,
                bytes_out: acc.bytes_out + c.bytes_out,
            }))
    }

    /// One skip/drop reason's count summed over CPUs.
    pub fn reason_count(&self, reason: Reason) -> Result<u64> {
        Ok(self.reasons.get(&(reason as u32), 0)?.iter().sum())
    }

    /// Every skip/drop reason with its count summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|reason| Ok((*reason, self.reason_count(*reason)?)))
            .collect()
    }
}

/// Counter slots for a list of entries: an entry already installed keeps
/// its slot (`kept`), so its counters survive restarts and reloads; the
/// others get the lowest free slots below `max`, each passed to `fresh` to
/// reset before use.
fn assign_slots(
    kept: Vec<Option<u32>>,
    max: u32,
    mut fresh: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let kept: Vec<Option<u32>> = kept.into_iter().map(|s| s.filter(|s| *s < max)).collect();
    let mut used: BTreeSet<u32> = kept.iter().flatten().copied().collect();
    let mut next_free = 0;
    kept.into_iter()
        .map(|slot| match slot {
            Some(slot) => Ok(slot),
            None => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                if next_free >= max {
                    return Err(anyhow!("all {max} slots are taken"));
                }
                used.insert(next_free);
                fresh(next_free)?;
                Ok(next_free)
            }
        })
        .collect()
}

/// Rule ids for a list of rules: one that is unchanged keeps its id
/// (`kept`), the others get the next ids above `high_water`. Returns them
/// with the new high-water mark, which never goes down.
fn assign_ids(kept: &[Option<u32>], mut high_water: u32) -> Result<(Vec<u32>, u32)> {
    let ids = kept
        .iter()
        .map(|id| match id {
            Some(id) => Ok(*id),
            None => {
                high_water = high_water.checked_add(1).ok_or_else(|| {
                    anyhow!("every rule id has been handed out; restart the daemon with fresh pins")
                })?;
                Ok(high_water)
            }
        })
        .collect::<Result<_>>()?;
    Ok((ids, high_water))
}

/// Installed entries gathered into the rules they came from: a range is
/// the consecutive ports of one protocol that carry one rule id. Each comes
/// with its protocol, its ports and the value of its first entry.
pub fn rule_ranges(
    entries: &BTreeMap<(u8, u16), (RuleKey, ForwardRule)>,
) -> Vec<(u8, crate::spec::Ports, ForwardRule)> {
    let mut out: Vec<(u8, crate::spec::Ports, ForwardRule)> = Vec::new();
    for ((proto, port), (_, value)) in entries {
        match out.last_mut() {
            Some((p, ports, first))
                if *p == *proto
                    && first.id == value.id
                    && u32::from(ports.last) + 1 == u32::from(*port) =>
            {
                ports.last = *port;
            }
            _ => out.push((*proto, crate::spec::Ports::one(*port), *value)),
        }
    }
    out
}

fn reverse_tuple(key: &ReverseKey) -> (u32, u16, u8) {
    (key.addr, key.port, key.proto)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_deleted_and_added_again_gets_an_id_never_used() {
        // tcp:1000 and tcp:2000 are added.
        let (ids, high) = assign_ids(&[None, None], 0).unwrap();
        assert_eq!((ids, high), (vec![1, 2], 2));
        // tcp:2000 is deleted: tcp:1000 keeps its id, the mark stays.
        let (ids, high) = assign_ids(&[Some(1)], high).unwrap();
        assert_eq!((ids, high), (vec![1], 2));
        // tcp:2000 is added again: not 2, whose flows may still be about.
        let (ids, high) = assign_ids(&[Some(1), None], high).unwrap();
        assert_eq!((ids, high), (vec![1, 3], 3));
        let err = assign_ids(&[None], u32::MAX).unwrap_err().to_string();
        assert!(err.contains("every rule id"), "{err}");
        assert_eq!(assign_ids(&[Some(7)], u32::MAX).unwrap().0, [7]);
    }

    #[test]
    fn slots_are_kept_or_the_lowest_free_and_fresh_ones_reset() {
        let mut reset = Vec::new();
        let slots = assign_slots(vec![Some(1), None, Some(3), None, Some(99)], 5, |s| {
            reset.push(s);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            slots,
            [1, 0, 3, 2, 4],
            "99 is out of range and gets a fresh slot"
        );
        assert_eq!(reset, [0, 2, 4]);
        assert!(
            assign_slots(vec![None; 3], 2, |_| Ok(()))
                .unwrap_err()
                .to_string()
                .contains("all 2 slots")
        );
    }
}
