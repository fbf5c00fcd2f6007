//! The start-up self-test. Before anything is attached, both programs are
//! loaded (the verifier checks every helper they call exists) and run once
//! through BPF_PROG_TEST_RUN, in a throwaway instance of the maps, on a
//! packet that takes them to their FIB lookups. A lookup flag the kernel
//! refuses selects the fallback compiled in for it; a kernel that cannot
//! run the datapath at all stops the start, named with what it lacks.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use forwarder_common::{
    maps::{UPLINK_HAS_ADDR, UPLINK_UP, UplinkState, programs},
    reason::Reason,
};

use crate::{
    datapath::{self, LoadOptions},
    kernel::{FLOOR, Kernel, MTU_RESULT_SINCE, Support},
    kernel_log, pin,
    rules::{Origin, Rule},
    spec::{AllowFrom, Ports, Proto},
    tables::{RuleIds, Tables},
};

const PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const TARGET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const PORT: u16 = 9;
const PEER_PORT: u16 = 40000;
const LOOPBACK: u32 = 1;

/// Finds what this kernel supports, or fails naming the kernel and what it
/// lacks. `scratch` is a directory on a bpffs for the throwaway maps. With
/// `kernel_log`, what the kernel answered each attempt's lookups goes to
/// the log too (see kernel_log).
pub fn run(scratch: &Path, flow_table_size: u32, kernel_log: bool) -> Result<Support> {
    let kernel = Kernel::running();
    above_floor(&kernel)?;
    let fib_mtu_result = kernel.version >= MTU_RESULT_SINCE;
    let mut last = None;
    for fib_skip_neigh in [true, false] {
        let support = Support {
            fib_skip_neigh,
            fib_mtu_result,
        };
        let rejected = attempt(scratch, support, flow_table_size, kernel_log)
            .map_err(|err| anyhow!("{kernel} cannot run the forwarder's datapath: {err:#}"))?;
        if rejected == 0 {
            return Ok(support);
        }
        last = Some(rejected);
    }
    bail!(
        "{kernel}: bpf_fib_lookup refused the datapath's lookups {} times even without \
         BPF_FIB_LOOKUP_SKIP_NEIGH; the forwarder needs Linux {}.{} or later",
        last.unwrap_or(0),
        FLOOR.0,
        FLOOR.1
    )
}

/// Refuses a kernel older than the floor, naming it and what it lacks; no
/// self-test could make up for a missing helper.
fn above_floor(kernel: &Kernel) -> Result<()> {
    if kernel.version < FLOOR {
        bail!(
            "{kernel} is older than the forwarder's floor, Linux {}.{}: its datapath needs \
             bpf_redirect_neigh with a next hop (5.10)",
            FLOOR.0,
            FLOOR.1
        );
    }
    Ok(())
}

/// Loads an instance with `support`'s fallbacks into `scratch`, runs both
/// programs, and returns how often a FIB lookup was refused.
fn attempt(
    scratch: &Path,
    support: Support,
    flow_table_size: u32,
    kernel_log: bool,
) -> Result<u64> {
    pin::remove_tree(scratch).with_context(|| format!("clearing {}", scratch.display()))?;
    std::fs::create_dir_all(scratch)?;
    let result = (|| {
        let mut ebpf = datapath::load_object(
            scratch,
            &LoadOptions {
                support,
                flow_table_size,
                kernel_log,
                cut: None,
            },
        )?;
        let mut tables = Tables::from_ebpf(&mut ebpf, RuleIds::unpinned()?)?;
        prepare(&mut tables)?;
        // Neither packet can pass the reverse-path check on the loopback
        // device, so each ends at its first FIB lookup: refused, answered
        // with some route, or (in a namespace not forwarding yet) told
        // forwarding is off, which the kernel says only of lookups whose
        // flags it accepted.
        let lookups = |tables: &Tables| -> Result<u64> {
            [
                Reason::ReversePathFailed,
                Reason::FibLookupRejected,
                Reason::FibFwdDisabled,
            ]
            .into_iter()
            .map(|r| tables.reason_count(r))
            .sum()
        };
        for (name, frame) in [
            (programs::UPLINK_INGRESS, from_peer()),
            (programs::DOWNSTREAM_INGRESS, from_target()),
        ] {
            let before = lookups(&tables)?;
            exercise(&ebpf, name, &frame)?;
            if lookups(&tables)? == before {
                let counted: Vec<&str> = tables
                    .reason_counters()?
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(r, _)| r.name())
                    .collect();
                bail!(
                    "the self-test packet never reached {name}'s FIB lookup (counted: {})",
                    counted.join(", ")
                );
            }
        }
        if kernel_log {
            let prefix = if support.fib_skip_neigh {
                "self-test, lookups with BPF_FIB_LOOKUP_SKIP_NEIGH: "
            } else {
                "self-test, lookups without BPF_FIB_LOOKUP_SKIP_NEIGH: "
            };
            kernel_log::drain(&mut ebpf, prefix)?;
        }
        tables.reason_count(Reason::FibLookupRejected)
    })();
    pin::remove_tree(scratch).with_context(|| format!("removing {}", scratch.display()))?;
    result
}

/// A rule, a flow of it and a usable uplink on the loopback device, where
/// BPF_PROG_TEST_RUN delivers its packets.
fn prepare(tables: &mut Tables) -> Result<()> {
    tables.set_uplink(UplinkState {
        ifindex: LOOPBACK,
        addr: u32::from_ne_bytes(UPLINK_ADDR.octets()),
        prefix_len: 24,
        flags: UPLINK_UP | UPLINK_HAS_ADDR,
        mac: [2, 0, 0, 0, 0, 1],
    })?;
    let rule = Rule::new(
        Proto::Tcp,
        Ports::one(PORT),
        TARGET,
        PORT,
        AllowFrom::Any,
        Origin::Flag,
    );
    tables.sync_rules(std::slice::from_ref(&rule))?;
    tables.open_flow(Proto::Tcp, PEER, PEER_PORT, PORT)
}

fn exercise(ebpf: &Ebpf, name: &str, frame: &[u8]) -> Result<()> {
    let program: &SchedClassifier = ebpf
        .program(name)
        .ok_or_else(|| anyhow!("no program {name}"))?
        .try_into()?;
    let mut out = vec![0u8; frame.len() + 256];
    program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
    Ok(())
}

/// Ethernet, IPv4 and a TCP SYN, checksums left zero: the programs only
/// parse it, and every rewrite path fixes checksums incrementally.
fn tcp_frame(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 20 + 20];
    frame[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&saddr.octets());
    ip[16..20].copy_from_slice(&daddr.octets());
    let tcp = &mut frame[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    frame
}

fn from_peer() -> Vec<u8> {
    tcp_frame(PEER, PEER_PORT, UPLINK_ADDR, PORT)
}

fn from_target() -> Vec<u8> {
    tcp_frame(TARGET, PORT, PEER, PEER_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::parse_version;

    #[test]
    fn a_kernel_below_the_floor_is_refused_by_name() {
        let kernel = |release: &str| Kernel {
            release: release.into(),
            version: parse_version(release).unwrap(),
        };
        let err = above_floor(&kernel("4.19.0-27-amd64"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Linux 4.19.0-27-amd64") && err.contains("bpf_redirect_neigh"),
            "{err}"
        );
        assert!(above_floor(&kernel("5.10.0-32-amd64")).is_ok());
    }
}
