//! The hostile run: generated cases through both programs, each checked by
//! the oracle.

use anyhow::{Context as _, Result};
use forwarder_common::maps::FlowKey;

use super::{
    clock::Times,
    generate::Generator,
    oracle::Oracle,
    setup::{relays, rules},
    tally::Tally,
};
use crate::testrun::Harness;

fn refused(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<aya::programs::ProgramError>()
            .map(|e| e.to_string())
            .or_else(|| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .map(|e| e.to_string())
            })
            .is_some_and(|text| text.contains("Invalid argument"))
    })
}

/// Runs `count` generated cases from `seed` through the programs, each
/// checked by the oracle.
pub fn run(count: u64, seed: u64, mut keep_going: impl FnMut(&Tally) -> bool) -> Result<Tally> {
    let h = Harness::with_relays(&rules(), &relays())?;
    let mut oracle = Oracle::new(&h)?;
    let mut generator = Generator::new(seed);
    let mut tally = Tally::default();
    let mut flows: Vec<FlowKey> = Vec::new();
    while tally.tried < count && keep_going(&tally) {
        if tally.tried % 256 == 0 {
            flows = oracle.model.flows.keys().copied().collect();
            flows.sort_by_key(|k| (k.peer_addr, k.peer_port, k.listen_port, k.proto));
        }
        let case = generator.next(&h, &flows);
        tally.tried += 1;
        let mut times = Times::now();
        let result = h.run(case.role, case.ifindex, &case.frame);
        times.widen();
        let (action, output) = match result {
            Ok(result) => result,
            Err(err) if refused(&err) => {
                tally.refused += 1;
                oracle.nothing_happened()?;
                continue;
            }
            Err(err) => return Err(err),
        };
        let (outcome, uncertain, withheld) = oracle
            .check(&case, &times, action, &output)
            .with_context(|| {
                format!(
                    "case {} of seed {seed:#x} ({}, {:?} on ifindex {}): {:02x?}",
                    tally.tried - 1,
                    case.label,
                    case.role,
                    case.ifindex,
                    case.frame
                )
            })?;
        tally.count(&case, &outcome, uncertain);
        tally.withheld += u64::from(withheld);
        if tally.tried % 20_000 == 0 {
            oracle.compare_tables()?;
        }
    }
    oracle.compare_tables()?;
    oracle.compare_relay_counters(&tally)?;
    Ok(tally)
}
