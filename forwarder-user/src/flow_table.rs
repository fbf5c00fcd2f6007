//! The flow table as userspace walks it: in batches (see `raw_map`), never
//! held whole in memory, and with every entry looked up again right before
//! it is removed, since the datapath may have refreshed it after its batch
//! was read. Sweeps, rule changes, counts and migrations all go through
//! here; none of them may run on the daemon's event loop (see
//! `daemon::flow_worker`).

use std::{collections::BTreeMap, io, ops::ControlFlow, os::fd::AsFd as _};

use anyhow::{Context as _, Result};
use aya::maps::MapData;
use forwarder_common::{
    flow,
    maps::{FlowEntry, FlowKey},
};

use crate::raw_map::RawMap;

/// What a sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Entries walked.
    pub seen: u64,
    /// Entries removed.
    pub removed: u64,
    /// Whether the walk was stopped before the end.
    pub stopped: bool,
}

pub struct FlowTable<'a> {
    raw: RawMap<'a>,
}

fn decode(key: &[u8], value: &[u8]) -> (FlowKey, FlowEntry) {
    (
        bytemuck::pod_read_unaligned(key),
        bytemuck::pod_read_unaligned(value),
    )
}

impl<'a> FlowTable<'a> {
    /// The FLOWS map behind `map` (the daemon's, or one opened from a pin).
    pub fn of(map: &'a MapData) -> Self {
        FlowTable {
            raw: RawMap::new(
                map.fd().as_fd(),
                size_of::<FlowKey>() as u32,
                size_of::<FlowEntry>() as u32,
                false,
            ),
        }
    }

    /// Hands every entry to `each` until it breaks.
    fn for_each(
        &self,
        mut each: impl FnMut(&FlowKey, &FlowEntry) -> io::Result<ControlFlow<()>>,
    ) -> Result<()> {
        self.raw
            .for_each_chunk(|chunk| {
                for i in 0..chunk.len() {
                    let (key, entry) = decode(chunk.key(i), chunk.value(i));
                    if each(&key, &entry)?.is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
                Ok(ControlFlow::Continue(()))
            })
            .context("reading the flow table")
    }

    /// Every entry, expired ones included.
    pub fn entries(&self) -> Result<Vec<(FlowKey, FlowEntry)>> {
        let mut out = Vec::new();
        self.for_each(|key, entry| {
            out.push((*key, *entry));
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(out)
    }

    /// How many entries the table holds, expired ones included.
    pub fn count(&self) -> Result<u64> {
        let mut n = 0;
        self.for_each(|_, _| {
            n += 1;
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(n)
    }

    /// The flows that have not timed out at `now`, by rule id.
    pub fn live_per_rule(&self, now: u64) -> Result<BTreeMap<u32, u64>> {
        let mut live = BTreeMap::new();
        self.for_each(|key, entry| {
            if !flow::expired(entry, key.proto, now) {
                *live.entry(entry.rule_id).or_default() += 1;
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(live)
    }

    /// The entry under `key` now.
    pub fn get(&self, key: &FlowKey) -> Result<Option<FlowEntry>> {
        let value = self
            .raw
            .get(bytemuck::bytes_of(key))
            .context("reading a flow")?;
        Ok(value.map(|v| bytemuck::pod_read_unaligned(&v)))
    }

    /// Writes entries as given (BPF_ANY), in batches.
    pub fn set_many(&self, entries: &[(FlowKey, FlowEntry)]) -> Result<usize> {
        let keys: Vec<u8> = entries
            .iter()
            .flat_map(|(k, _)| bytemuck::bytes_of(k).to_vec())
            .collect();
        let values: Vec<u8> = entries
            .iter()
            .flat_map(|(_, e)| bytemuck::bytes_of(e).to_vec())
            .collect();
        self.raw
            .set_many(&keys, &values, 0)
            .context("writing the flow table")
    }

    /// Removes the entries `doomed` picks, each only if it still does
    /// when looked up again just before its removal: a flow the datapath
    /// refreshed or recreated since its batch was read stays. `go_on` is
    /// asked between batches; false stops the walk there.
    pub fn remove_if(
        &self,
        doomed: impl Fn(&FlowKey, &FlowEntry) -> bool,
        go_on: impl Fn() -> bool,
    ) -> Result<Swept> {
        let mut swept = Swept::default();
        self.for_each(|key, entry| {
            swept.seen += 1;
            if doomed(key, entry) {
                let bytes = bytemuck::bytes_of(key);
                if let Some(now) = self.raw.get(bytes)?
                    && doomed(key, &bytemuck::pod_read_unaligned(&now))
                    && self.raw.delete(bytes)?
                {
                    swept.removed += 1;
                }
            }
            if swept.seen % crate::raw_map::CHUNK as u64 == 0 && !go_on() {
                swept.stopped = true;
                return Ok(ControlFlow::Break(()));
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(swept)
    }

    /// Carries into `self` the entries of `from` seen at or after
    /// `since_ns` (the datapath rewrites `seen_ns` on every change it
    /// makes), unless `self` holds a fresher one: the flows a predecessor's
    /// programs opened or changed after the table was first copied.
    /// Returns how many were carried.
    pub fn merge_newer(&self, from: &FlowTable<'_>, since_ns: u64) -> Result<usize> {
        let mut carried = 0;
        from.for_each(|key, entry| {
            if entry.seen_ns < since_ns {
                return Ok(ControlFlow::Continue(()));
            }
            let bytes = bytemuck::bytes_of(key);
            let fresher = self.raw.get(bytes)?.is_some_and(|v| {
                bytemuck::pod_read_unaligned::<FlowEntry>(&v).seen_ns >= entry.seen_ns
            });
            if !fresher {
                self.raw.set(bytes, bytemuck::bytes_of(entry))?;
                carried += 1;
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(carried)
    }
}

#[cfg(test)]
mod tests {
    use aya::maps::{HashMap, IterableMap as _, MapData};
    use forwarder_common::{
        flow::{FLOW_ESTABLISHED, FLOW_REPLIED},
        maps::{PROTO_TCP, PROTO_UDP},
    };

    use super::*;

    fn root() -> bool {
        // SAFETY: plain libc call.
        unsafe { libc::geteuid() == 0 }
    }

    fn table(capacity: u32) -> HashMap<MapData, FlowKey, FlowEntry> {
        HashMap::create(capacity, 0).unwrap()
    }

    fn flow(peer: u32, proto: u8, rule_id: u32, seen_ns: u64) -> (FlowKey, FlowEntry) {
        (
            FlowKey::new(peer, 1234u16.to_be(), proto, 53317u16.to_be()),
            FlowEntry {
                rule_id,
                // Answered; for TCP, established too.
                state: FLOW_REPLIED | FLOW_ESTABLISHED,
                created_ns: seen_ns,
                seen_ns,
                ..Default::default()
            },
        )
    }

    const SECOND: u64 = 1_000_000_000;
    const NOW: u64 = 10_000 * SECOND;

    #[test]
    fn sweeps_remove_only_what_is_still_doomed_when_its_turn_comes() {
        if !root() {
            eprintln!("skipped: creating maps needs root");
            return;
        }
        let map = table(20_000);
        let t = FlowTable::of(map.map());
        let old = NOW - 3600 * SECOND;
        let mut flows: Vec<_> = (0..10_000).map(|p| flow(p, PROTO_UDP, 1, old)).collect();
        flows.push(flow(99_999, PROTO_TCP, 1, old));
        assert_eq!(t.set_many(&flows).unwrap(), flows.len());
        // Flow 7 is refreshed by "the datapath" once the sweep has read its
        // first batch, which still holds it expired.
        let (refreshed, _) = flow(7, PROTO_UDP, 1, 0);
        let started = std::cell::Cell::new(false);
        let swept = t
            .remove_if(
                |key, entry| {
                    if !started.replace(true) {
                        t.set_many(&[flow(7, PROTO_UDP, 1, NOW)]).unwrap();
                    }
                    flow::expired(entry, key.proto, NOW)
                },
                || true,
            )
            .unwrap();
        assert_eq!(swept.seen, 10_001);
        assert_eq!(
            swept.removed, 9_999,
            "every expired UDP flow but the refreshed one"
        );
        assert!(t.get(&refreshed).unwrap().is_some(), "refreshed mid-sweep");
        assert_eq!(t.count().unwrap(), 2, "the refreshed one and the TCP flow");
        assert_eq!(t.live_per_rule(NOW).unwrap(), BTreeMap::from([(1, 2)]));
    }

    #[test]
    fn a_sweep_stops_between_batches_when_told() {
        if !root() {
            eprintln!("skipped: creating maps needs root");
            return;
        }
        let map = table(20_000);
        let t = FlowTable::of(map.map());
        let flows: Vec<_> = (0..10_000).map(|p| flow(p, PROTO_UDP, 1, 0)).collect();
        t.set_many(&flows).unwrap();
        let swept = t.remove_if(|_, _| true, || false).unwrap();
        assert!(swept.stopped);
        assert_eq!(swept.seen, crate::raw_map::CHUNK as u64);
        assert_eq!(t.count().unwrap(), 10_000 - crate::raw_map::CHUNK as u64);
    }

    #[test]
    fn a_merge_carries_what_changed_since_the_copy_unless_fresher_here() {
        if !root() {
            eprintln!("skipped: creating maps needs root");
            return;
        }
        let (old_map, new_map) = (table(64), table(64));
        let (old, new) = (FlowTable::of(old_map.map()), FlowTable::of(new_map.map()));
        let copied_at = NOW;
        let untouched = flow(1, PROTO_TCP, 1, NOW - SECOND);
        let opened_in_the_gap = flow(2, PROTO_TCP, 1, NOW + SECOND);
        let changed_in_the_gap = flow(3, PROTO_TCP, 1, NOW + 2 * SECOND);
        let newer_here = flow(4, PROTO_TCP, 1, NOW + 3 * SECOND);
        old.set_many(&[
            untouched,
            opened_in_the_gap,
            changed_in_the_gap,
            flow(4, PROTO_TCP, 1, NOW + SECOND),
        ])
        .unwrap();
        new.set_many(&[untouched, flow(3, PROTO_TCP, 1, NOW - SECOND), newer_here])
            .unwrap();
        assert_eq!(new.merge_newer(&old, copied_at).unwrap(), 2);
        for (key, entry) in [untouched, opened_in_the_gap, changed_in_the_gap, newer_here] {
            assert_eq!(new.get(&key).unwrap(), Some(entry), "{key:?}");
        }
    }
}
