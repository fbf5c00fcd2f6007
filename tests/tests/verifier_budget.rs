//! How much of the verifier's budget each program takes, for every
//! combination of fallbacks the self-test can pick, with the kernel log
//! off and on (`--kernel-log`). Kernels before 6.x
//! prune states less well than the one this runs on, so a program must
//! leave most of the budget (1,000,000 processed instructions) unused here
//! to load there too; the VM tier then proves it on those kernels.

use forwarder::kernel::Support;
use forwarder_tests::{netns, testrun::Harness};

/// Half the verifier's limit: what the old kernels' weaker pruning may need
/// on top of this kernel's count.
const BUDGET: u32 = 500_000;

#[test]
fn every_program_leaves_half_the_verifiers_budget_for_older_kernels() {
    netns::sweep_leftovers();
    let mut over = Vec::new();
    for (fib_skip_neigh, fib_mtu_result, kernel_log) in combinations() {
        let support = Support {
            fib_skip_neigh,
            fib_mtu_result,
        };
        let h = Harness::with_kernel_log(&[], &[], support, kernel_log).expect("load");
        let mut names = Vec::new();
        for (name, program) in h.datapath.programs() {
            names.push(name.to_string());
            let info = program.info().unwrap();
            let Some(count) = info.verified_instruction_count() else {
                eprintln!("this kernel does not report verified instructions (before 5.16)");
                return;
            };
            println!("{support:?} kernel_log {kernel_log} {name}: {count} instructions verified");
            if count > BUDGET {
                over.push(format!(
                    "{support:?} kernel_log {kernel_log} {name}: {count}"
                ));
            }
        }
        names.sort();
        assert_eq!(
            names,
            [
                "downstream_ingress",
                "kernel_log",
                "relay_up_copy",
                "relay_up_scan",
                "uplink_ingress"
            ]
        );
    }
    assert!(over.is_empty(), "over {BUDGET}: {over:?}");
}

/// Every combination of the two fallbacks and the kernel log.
fn combinations() -> impl Iterator<Item = (bool, bool, bool)> {
    [true, false].into_iter().flat_map(|skip_neigh| {
        [true, false].into_iter().flat_map(move |mtu_result| {
            [false, true]
                .into_iter()
                .map(move |kernel_log| (skip_neigh, mtu_result, kernel_log))
        })
    })
}
