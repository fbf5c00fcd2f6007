//! `cargo xtask fuzz`: the hostile-input generator and oracle of the test
//! suite, run for as long as asked, one seed after another.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use forwarder_tests::{hostile, netns};

fn run() -> Result<()> {
    let mut seconds = 60u64;
    let mut seed = 1u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = args.next().context("--seconds needs a number")?.parse()?,
            "--seed" => seed = args.next().context("--seed needs a number")?.parse()?,
            other => anyhow::bail!("unknown argument {other:?}: expected --seconds N or --seed N"),
        }
    }
    netns::sweep_leftovers();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut total = hostile::Tally::default();
    while Instant::now() < deadline {
        let tally = hostile::run(1_000_000, seed, |_| Instant::now() < deadline)?;
        println!("seed {seed}: {tally:?}");
        total.tried += tally.tried;
        total.passed += tally.passed;
        total.redirected += tally.redirected;
        total.dropped += tally.dropped;
        total.refused += tally.refused;
        total.uplink_copies += tally.uplink_copies;
        seed += 1;
    }
    println!(
        "fuzz: {} frames in {seconds} s, none with an unexpected verdict: {} passed untouched, {} redirected with valid rewrites, {} ICMP errors dropped, {} refused by BPF_PROG_TEST_RUN itself; {} relay copies toward the uplink checked",
        total.tried,
        total.passed,
        total.redirected,
        total.dropped,
        total.refused,
        total.uplink_copies
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fuzz failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
