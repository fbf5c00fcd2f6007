//! What a hostile run counted.

use std::collections::BTreeMap;

use super::{
    case::Case,
    model::{Outcome, Verdict},
};
use crate::testrun::TC_ACT_SHOT;

/// A hostile run's tally.
#[derive(Debug, Default)]
pub struct Tally {
    pub tried: u64,
    /// Frames BPF_PROG_TEST_RUN itself refused (EINVAL: it will not build
    /// an skb from an IPv4 frame whose IP header it cannot read), so no
    /// program saw them.
    pub refused: u64,
    pub redirected: u64,
    pub dropped: u64,
    pub passed: u64,
    /// Relay copies out of the uplink and toward the VMs, each checked.
    pub uplink_copies: u64,
    pub vm_copies: u64,
    /// VMs' datagrams naming an internal address whole that were sent
    /// complete: none reached the LAN whole.
    pub withheld: u64,
    /// Runs where the clock left two branches open (a timeout or a token
    /// falling due during the run), each matched against both.
    pub uncertain: u64,
    /// Runs by verdict: "redirected", "relayed up", "relayed down", or
    /// the reason counted.
    pub verdicts: BTreeMap<String, u64>,
    /// Runs by the generator that made the frame.
    pub generators: BTreeMap<&'static str, u64>,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.tried += other.tried;
        self.refused += other.refused;
        self.redirected += other.redirected;
        self.dropped += other.dropped;
        self.passed += other.passed;
        self.uplink_copies += other.uplink_copies;
        self.vm_copies += other.vm_copies;
        self.uncertain += other.uncertain;
        self.withheld += other.withheld;
        for (k, v) in &other.verdicts {
            *self.verdicts.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.generators {
            *self.generators.entry(k).or_default() += v;
        }
    }

    pub fn count(&mut self, case: &Case, outcome: &Outcome, uncertain: bool) {
        let name = match outcome.verdict {
            Verdict::Redirected => {
                self.redirected += 1;
                "redirected"
            }
            Verdict::RelayedUp => {
                self.passed += 1;
                "relayed up"
            }
            Verdict::RelayedDown => {
                self.passed += 1;
                "relayed down"
            }
            Verdict::Skipped(reason) => {
                if outcome.action == TC_ACT_SHOT {
                    self.dropped += 1;
                } else {
                    self.passed += 1;
                }
                reason
            }
        };
        *self.verdicts.entry(name.to_string()).or_default() += 1;
        *self.generators.entry(case.label).or_default() += 1;
        self.uplink_copies += outcome.up.len() as u64;
        self.vm_copies += outcome.down.len() as u64;
        self.uncertain += u64::from(uncertain);
    }
}
