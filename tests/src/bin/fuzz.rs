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
        println!(
            "seed {seed}: {} frames, {} refused by BPF_PROG_TEST_RUN",
            tally.tried, tally.refused
        );
        total.add(&tally);
        seed += 1;
    }
    println!(
        "fuzz: {} frames in {seconds} s, each verdict as the oracle predicted it ({} with a timeout or token falling due during the run, matched against both branches); {} refused by BPF_PROG_TEST_RUN itself",
        total.tried, total.uncertain, total.refused
    );
    println!(
        "  {} redirected, {} dropped, {} passed; {} relay copies out of the uplink and {} toward the VMs, byte for byte",
        total.redirected, total.dropped, total.passed, total.uplink_copies, total.vm_copies
    );
    println!(
        "  {} VM datagrams naming an internal address sent whole: none reached the LAN whole",
        total.withheld
    );
    println!("  by verdict:");
    for (verdict, count) in &total.verdicts {
        println!("    {verdict:<26} {count}");
    }
    println!("  by generator:");
    for (generator, count) in &total.generators {
        println!("    {generator:<26} {count}");
    }
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
