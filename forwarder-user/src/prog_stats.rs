//! What each of an instance's programs costs, from the kernel's run-time
//! statistics: with them on, every run of every BPF program adds its
//! duration and a count to the program's info (`run_time_ns`, `run_cnt`).
//! They are off by default because they cost every program on the host two
//! clock reads and a counter update per run.

use std::{collections::BTreeSet, fs, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use aya::{maps::MapData, programs::loaded_programs};
use forwarder_common::maps::programs;
use serde::Serialize;

use crate::datapath::Role;

/// The switch of the statistics; `BPF_ENABLE_STATS` turns them on too,
/// without changing what it reads.
pub const SYSCTL: &str = "kernel.bpf_stats_enabled";
const SYSCTL_PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// How to turn the statistics on and what they cost, for people.
pub const HOW_TO_ENABLE: &[&str] = &[
    "Turn them on with `sysctl -w kernel.bpf_stats_enabled=1` (for every BPF program on this",
    "host, until set back to 0), or from a program with bpf(BPF_ENABLE_STATS), which holds them",
    "on until it closes the descriptor it returns. They cost every program run two clock reads",
    "and a counter update (about 85 ns on the 2-CPU VM of docs/benchmarks.md, more than an empty",
    "program), part of which the figures include: turn them off when done.",
];

/// The longest name the kernel keeps for a program (BPF_OBJ_NAME_LEN less
/// its terminating zero).
const KERNEL_NAME_LEN: usize = 15;

/// One loaded program of the instance and its counters.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    /// "uplink" or "downstream"; the program's name if it is neither.
    pub role: String,
    pub id: u32,
    pub name: String,
    /// Runs counted while the statistics were on: packets.
    pub packets: u64,
    pub run_time_ns: u64,
    /// Mean cost of a run since the statistics were first on.
    pub ns_per_packet: Option<f64>,
    /// Since the previous sample (`--watch` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<CostRates>,
}

/// Packets per second and their mean cost, between two samples.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CostRates {
    pub packets_per_sec: f64,
    /// None when no packet ran meanwhile.
    pub ns_per_packet: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramStats {
    /// What kernel.bpf_stats_enabled says; None where the kernel has no
    /// such setting (before 5.8).
    pub sysctl_enabled: Option<bool>,
    pub programs: Vec<ProgramCost>,
}

fn mean_ns(time_ns: u64, runs: u64) -> Option<f64> {
    (runs > 0).then(|| time_ns as f64 / runs as f64)
}

fn role_of(name: &str) -> Option<Role> {
    let kernel_name = |full: &str| full[..full.len().min(KERNEL_NAME_LEN)].to_string();
    [
        (programs::UPLINK_INGRESS, Role::Uplink),
        (programs::DOWNSTREAM_INGRESS, Role::Downstream),
    ]
    .into_iter()
    .find(|(full, _)| kernel_name(full) == name)
    .map(|(_, role)| role)
}

/// The ids of the maps pinned in `maps_dir`: a program that uses one of
/// them is this instance's (or its predecessor's, during a takeover).
fn map_ids(maps_dir: &Path) -> Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    for entry in
        fs::read_dir(maps_dir).with_context(|| format!("reading {}", maps_dir.display()))?
    {
        let path = entry?.path();
        if let Ok(info) = MapData::from_pin(&path).and_then(|m| m.info()) {
            ids.insert(info.id());
        }
    }
    Ok(ids)
}

/// The counters of every loaded program that uses the maps pinned in
/// `maps_dir`, uplink first.
pub fn read(maps_dir: &Path) -> Result<ProgramStats> {
    let ours = map_ids(maps_dir)?;
    let mut found = Vec::new();
    let mut error = None;
    for info in loaded_programs() {
        // A program unloaded while the list is walked is an error here.
        let info = match info {
            Ok(info) => info,
            Err(err) => {
                error.get_or_insert(err);
                continue;
            }
        };
        let Ok(Some(uses)) = info.map_ids() else {
            continue;
        };
        if !uses.iter().any(|id| ours.contains(id)) {
            continue;
        }
        let name = info.name_as_str().unwrap_or_default().to_string();
        let role = role_of(&name);
        let run_time_ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        found.push((
            role,
            ProgramCost {
                role: role.map_or_else(|| name.clone(), |r| r.name().into()),
                id: info.id(),
                name,
                packets: info.run_count(),
                run_time_ns,
                ns_per_packet: mean_ns(run_time_ns, info.run_count()),
                rates: None,
            },
        ));
    }
    if let (true, Some(err)) = (found.is_empty(), error) {
        return Err(err).context("listing the loaded BPF programs");
    }
    found.sort_by_key(|(role, p)| (role.is_none(), *role, p.id));
    Ok(ProgramStats {
        sysctl_enabled: fs::read_to_string(SYSCTL_PATH)
            .ok()
            .map(|v| v.trim() != "0"),
        programs: found.into_iter().map(|(_, p)| p).collect(),
    })
}

/// Fills in each program's rates from the previous sample.
pub fn add_rates(current: &mut ProgramStats, previous: &ProgramStats, elapsed: Duration) {
    for program in &mut current.programs {
        if let Some(before) = previous.programs.iter().find(|p| p.id == program.id) {
            let runs = program.packets.saturating_sub(before.packets);
            program.rates = Some(CostRates {
                packets_per_sec: runs as f64 / elapsed.as_secs_f64().max(1e-9),
                ns_per_packet: mean_ns(
                    program.run_time_ns.saturating_sub(before.run_time_ns),
                    runs,
                ),
            });
        }
    }
}

impl ProgramStats {
    /// Whether the kernel counts: its setting says so, or a program's
    /// counters moved between two samples (someone holds BPF_ENABLE_STATS).
    pub fn counting(&self) -> bool {
        self.sysctl_enabled == Some(true)
            || self
                .programs
                .iter()
                .any(|p| p.rates.is_some_and(|r| r.packets_per_sec > 0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(id: u32, packets: u64, run_time_ns: u64) -> ProgramCost {
        ProgramCost {
            role: "uplink".into(),
            id,
            name: "uplink_ingress".into(),
            packets,
            run_time_ns,
            ns_per_packet: mean_ns(run_time_ns, packets),
            rates: None,
        }
    }

    #[test]
    fn kernel_names_are_cut_to_fifteen_bytes() {
        assert_eq!(role_of("uplink_ingress"), Some(Role::Uplink));
        assert_eq!(role_of("downstream_ingr"), Some(Role::Downstream));
        assert_eq!(role_of("downstream_ingress"), None);
        assert_eq!(role_of("something_else"), None);
    }

    #[test]
    fn rates_are_the_cost_of_the_runs_in_between() {
        let before = ProgramStats {
            sysctl_enabled: Some(false),
            programs: vec![program(7, 1000, 300_000)],
        };
        let mut after = ProgramStats {
            sysctl_enabled: Some(false),
            programs: vec![program(7, 3000, 1_100_000), program(8, 5, 500)],
        };
        assert!(!after.counting());
        add_rates(&mut after, &before, Duration::from_secs(2));
        let rates = after.programs[0].rates.unwrap();
        assert_eq!(rates.packets_per_sec, 1000.0);
        assert_eq!(rates.ns_per_packet, Some(400.0));
        assert_eq!(after.programs[0].ns_per_packet, Some(1_100_000.0 / 3000.0));
        assert!(after.programs[1].rates.is_none(), "no previous sample");
        assert!(after.counting(), "the counters moved");
        assert_eq!(mean_ns(0, 0), None);
    }
}
