//! `cargo xtask soak`: mixed load through the Qubes-like topology for as
//! long as asked, with the daemons' footprint sampled throughout. Writes
//! target/soak/report.txt.

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use forwarder_tests::{netns, soak};

fn run() -> Result<()> {
    let mut minutes = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--minutes" => minutes = args.next().context("--minutes needs a number")?.parse()?,
            other => bail!("unknown argument {other:?}: expected --minutes N"),
        }
    }
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    netns::sweep_leftovers();
    let duration = Duration::from_secs(minutes * 60);
    // About forty samples whatever the length.
    let sample_every = (duration / 40).max(Duration::from_secs(2));
    let report = soak::run(duration, sample_every)?;
    let text = report.render();
    print!("{text}");
    std::fs::create_dir_all("target/soak")?;
    std::fs::write("target/soak/report.txt", &text)?;
    println!("written to target/soak/report.txt");
    let problems = report.problems();
    if !problems.is_empty() {
        bail!("the soak found problems:\n  {}", problems.join("\n  "));
    }
    println!("soak: footprint flat, every TCP byte echoed intact");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("soak failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
