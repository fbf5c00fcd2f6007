//! Checking one program run against the model: the run's return value,
//! the packet it left, the reason it counted, the copies that came out of
//! the veths and the table entries it left must all be one outcome the
//! model allows; that outcome's changes then become the model's.

use std::{collections::HashMap, fmt::Write as _};

use anyhow::{Result, bail, ensure};
use forwarder_common::{
    maps::{FlowEntry, FlowKey, FragmentKey, FragmentTrain},
    reason::Reason,
};

use super::{
    case::Case,
    clock::{Clock, Times},
    model::{FlowChange, Model, Outcome, TrainChange, Verdict},
    observe::{Copies, Maps, Taps},
    setup::INTERNAL_NETS,
    tally::Tally,
};
use crate::testrun::Harness;

/// The model, what it is checked against, and what it has checked.
pub struct Oracle<'h> {
    h: &'h Harness,
    pub model: Model,
    taps: Taps,
    maps: Maps,
    generation: u32,
    /// Every reason counter as last read.
    counts: HashMap<Reason, u64>,
    /// Datagrams whose packets all went up so far, by generator id.
    all_up: HashMap<u64, bool>,
}

/// The first byte two frames differ at, for failure messages.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("byte {i}: {:#04x} expected, {:#04x} seen", a[i], b[i]),
        None => format!("{} bytes expected, {} seen", a.len(), b.len()),
    }
}

fn add_once<T: PartialEq>(list: &mut Vec<T>, item: Option<T>) {
    if let Some(item) = item
        && !list.contains(&item)
    {
        list.push(item);
    }
}

/// A flow entry with the times of `like`, to compare everything else.
fn without_times(entry: FlowEntry, like: &FlowEntry) -> FlowEntry {
    FlowEntry {
        created_ns: like.created_ns,
        seen_ns: like.seen_ns,
        ..entry
    }
}

impl<'h> Oracle<'h> {
    pub fn new(h: &'h Harness) -> Result<Self> {
        let counts = h.datapath.tables.reason_counters()?.into_iter().collect();
        Ok(Oracle {
            h,
            model: Model::new(h, &INTERNAL_NETS)?,
            taps: Taps::open(h)?,
            maps: Maps::open(h)?,
            generation: h.datapath.tables.fib_generation()?,
            counts,
            all_up: HashMap::new(),
        })
    }

    /// The reasons counted since the last call, with how often.
    fn counted(&mut self) -> Result<Vec<(Reason, u64)>> {
        let mut moved = Vec::new();
        for (reason, count) in self.h.datapath.tables.reason_counters()? {
            let last = self.counts.insert(reason, count).unwrap_or(0);
            if count != last {
                moved.push((reason, count - last));
            }
        }
        Ok(moved)
    }

    /// Every outcome the clock allows: the certain one, or one per branch
    /// of each decision whose deadline fell inside the run.
    fn outcomes(&self, case: &Case, times: &Times) -> Vec<Outcome> {
        let cached = |key: &_| self.maps.cached(key, self.generation);
        let mut outcomes = Vec::new();
        let mut scripts: Vec<Vec<bool>> = vec![Vec::new()];
        while let Some(script) = scripts.pop() {
            let mut clock = Clock::new(times, &script);
            outcomes.push(self.model.predict(case, &mut clock, &cached));
            for i in script.len()..clock.uncertain.len() {
                let mut other = clock.uncertain[..i].to_vec();
                other.push(true);
                scripts.push(other);
            }
        }
        outcomes
    }

    /// A program run that BPF_PROG_TEST_RUN refused changed nothing.
    pub fn nothing_happened(&mut self) -> Result<()> {
        let counted = self.counted()?;
        ensure!(counted.is_empty(), "a refused run counted {counted:?}");
        let mut copies = Copies::default();
        self.taps.drain(&mut copies);
        ensure!(
            copies.up.is_empty() && copies.down.is_empty(),
            "a refused run made copies: {copies:?}"
        );
        Ok(())
    }

    /// Checks one run against the outcomes the model allows; applies the
    /// one it matched.
    /// Returns the outcome matched, whether the clock left it a choice,
    /// and whether it completed a datagram whose claim held.
    pub fn check(
        &mut self,
        case: &Case,
        times: &Times,
        action: i32,
        output: &[u8],
    ) -> Result<(Outcome, bool, bool)> {
        let counted = self.counted()?;
        let mut copies = Copies::default();
        self.taps.drain(&mut copies);
        let outcomes = self.outcomes(case, times);
        let names = self.model.names(case);
        let mut flow_keys: Vec<FlowKey> = names.flow.into_iter().collect();
        let mut train_keys: Vec<FragmentKey> = names.train.into_iter().collect();
        let mut buckets: Vec<u32> = names.bucket.into_iter().collect();
        for o in &outcomes {
            add_once(&mut flow_keys, o.flow.map(|(k, _)| k));
            add_once(&mut train_keys, o.train.map(|(k, _)| k));
            add_once(&mut buckets, o.bucket.map(|(b, _)| b));
        }
        let flows: Vec<(FlowKey, Option<FlowEntry>)> =
            flow_keys.iter().map(|k| (*k, self.maps.flow(k))).collect();
        let trains: Vec<(FragmentKey, Option<FragmentTrain>)> = train_keys
            .iter()
            .map(|k| (*k, self.maps.train(k)))
            .collect();
        let bucket_values: Vec<(u32, u64)> = buckets
            .iter()
            .map(|b| Ok((*b, self.maps.bucket(*b)?)))
            .collect::<Result<_>>()?;

        let mut mismatches = String::new();
        let mut chosen = None;
        for (i, outcome) in outcomes.iter().enumerate() {
            match self.matches(
                outcome,
                times,
                action,
                output,
                &counted,
                &flows,
                &trains,
                &bucket_values,
            ) {
                Ok(()) => {
                    chosen = Some(outcome.clone());
                    break;
                }
                Err(why) => {
                    let _ = writeln!(
                        mismatches,
                        "  prediction {i} ({:?}): {why}",
                        outcome.verdict
                    );
                }
            }
        }
        let Some(outcome) = chosen else {
            bail!(
                "no prediction matches the run (action {action}, reasons counted {counted:?}):\n{mismatches}"
            );
        };
        self.taps
            .wait_for(&mut copies, outcome.up.len(), outcome.down.len());
        ensure!(
            copies.up == outcome.up,
            "copies out of the uplink: {} expected, {} seen{}",
            outcome.up.len(),
            copies.up.len(),
            outcome
                .up
                .iter()
                .zip(&copies.up)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("; {}", first_difference(a, b)))
                .unwrap_or_default()
        );
        for vif in [self.h.vif1.index, self.h.vif2.index] {
            let expected: Vec<&Vec<u8>> = outcome
                .down
                .iter()
                .filter(|(i, _)| *i == vif)
                .map(|(_, f)| f)
                .collect();
            let seen: Vec<&Vec<u8>> = copies
                .down
                .iter()
                .filter(|(i, _)| *i == vif)
                .map(|(_, f)| f)
                .collect();
            ensure!(
                expected == seen,
                "copies toward the VMs on ifindex {vif}: {} expected, {} seen{}",
                expected.len(),
                seen.len(),
                expected
                    .iter()
                    .zip(&seen)
                    .find(|(a, b)| a != b)
                    .map(|(a, b)| format!("; {}", first_difference(a, b)))
                    .unwrap_or_default()
            );
        }
        for (key, entry) in flows {
            self.model.apply_flow(key, entry);
        }
        for (key, train) in trains {
            self.model.apply_train(key, train);
        }
        for (bucket, value) in bucket_values {
            self.model.buckets.insert(bucket, value);
        }
        let mut withheld = false;
        if let Some(claim) = case.claim {
            let up = self.all_up.entry(claim.datagram).or_insert(true);
            *up &= outcome.verdict == Verdict::RelayedUp;
            ensure!(
                !(claim.last && *up),
                "a VM's datagram naming an internal address went to the LAN whole"
            );
            if claim.last {
                self.all_up.remove(&claim.datagram);
                withheld = true;
            }
        }
        Ok((outcome, outcomes.len() > 1, withheld))
    }

    /// Whether the run matches `outcome`; why not otherwise.
    #[allow(clippy::too_many_arguments)]
    fn matches(
        &self,
        outcome: &Outcome,
        times: &Times,
        action: i32,
        output: &[u8],
        counted: &[(Reason, u64)],
        flows: &[(FlowKey, Option<FlowEntry>)],
        trains: &[(FragmentKey, Option<FragmentTrain>)],
        buckets: &[(u32, u64)],
    ) -> std::result::Result<(), String> {
        if action != outcome.action {
            return Err(format!("action {} expected, {action} seen", outcome.action));
        }
        if output != outcome.output {
            return Err(format!(
                "packet left behind: {}",
                first_difference(&outcome.output, output)
            ));
        }
        let expected: Vec<(Reason, u64)> = outcome.reason.map(|r| (r, 1)).into_iter().collect();
        if counted != expected {
            return Err(format!(
                "reasons {expected:?} expected, {counted:?} counted"
            ));
        }
        for (key, seen) in flows {
            let change = outcome.flow.filter(|(k, _)| k == key).map(|(_, c)| c);
            let ok = match (change, seen) {
                (
                    Some(FlowChange::Set {
                        entry,
                        created,
                        seen: when,
                    }),
                    Some(e),
                ) => {
                    without_times(entry, e) == *e
                        && created.admits(times, e.created_ns)
                        && when.admits(times, e.seen_ns)
                }
                (Some(FlowChange::Remove), None) => true,
                (None, seen) => self.model.flows.get(key) == seen.as_ref(),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "flow {key:?}: {change:?} expected over {:?}, {seen:?} read",
                    self.model.flows.get(key)
                ));
            }
        }
        for (key, seen) in trains {
            let change = outcome.train.filter(|(k, _)| k == key).map(|(_, c)| c);
            let ok = match (change, seen) {
                (Some(TrainChange::Set { value, until }), Some(t)) => {
                    FragmentTrain {
                        until_ns: t.until_ns,
                        ..value
                    } == *t
                        && until.admits(times, t.until_ns)
                }
                (Some(TrainChange::Remove), None) => true,
                (None, seen) => self.model.trains.get(key) == seen.as_ref(),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "fragment train {key:?}: {change:?} expected over {:?}, {seen:?} read",
                    self.model.trains.get(key)
                ));
            }
        }
        for (bucket, value) in buckets {
            let ok = match outcome.bucket.filter(|(b, _)| b == bucket) {
                Some((_, expected)) => expected.admits(times, *value),
                None => self.model.buckets.get(bucket).copied().unwrap_or(0) == *value,
            };
            if !ok {
                return Err(format!(
                    "relay bucket {bucket}: {:?} expected, {value} read",
                    outcome.bucket
                ));
            }
        }
        Ok(())
    }

    /// The whole flow and fragment tables against the model's.
    pub fn compare_tables(&self) -> Result<()> {
        let mut flows = self.maps.all_flows()?;
        flows.sort_by_key(|(k, _)| (k.peer_addr, k.peer_port, k.listen_port, k.proto));
        let mut mirrored: Vec<(FlowKey, FlowEntry)> =
            self.model.flows.iter().map(|(k, v)| (*k, *v)).collect();
        mirrored.sort_by_key(|(k, _)| (k.peer_addr, k.peer_port, k.listen_port, k.proto));
        ensure!(
            flows == mirrored,
            "the flow table ({} entries) differs from the model's ({}): first {:?}",
            flows.len(),
            mirrored.len(),
            flows.iter().zip(&mirrored).find(|(a, b)| a != b)
        );
        let mut trains = self.maps.all_trains()?;
        trains.sort_by_key(|(k, _)| (k.ifindex, k.saddr, k.daddr, k.id));
        let mut mirrored: Vec<(FragmentKey, FragmentTrain)> =
            self.model.trains.iter().map(|(k, v)| (*k, *v)).collect();
        mirrored.sort_by_key(|(k, _)| (k.ifindex, k.saddr, k.daddr, k.id));
        ensure!(
            trains == mirrored,
            "the fragment table ({} entries) differs from the model's ({})",
            trains.len(),
            mirrored.len()
        );
        Ok(())
    }

    /// The relays' own counters against the copies the runs made.
    pub fn compare_relay_counters(&self, tally: &Tally) -> Result<()> {
        let tables = &self.h.datapath.tables;
        let (mut up, mut down) = (0, 0);
        for relay in tables.installed_relays()?.values() {
            let counters = tables.relay_counters(relay.slot)?;
            up += counters.packets_up;
            down += counters.packets_down;
        }
        ensure!(
            (up, down) == (tally.uplink_copies, tally.vm_copies),
            "the relays counted {up} copies up and {down} down; {} and {} were seen",
            tally.uplink_copies,
            tally.vm_copies
        );
        Ok(())
    }
}
