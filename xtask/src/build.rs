//! The release builds the tasks share: the forwarder binary (eBPF object
//! embedded) and the test crate's drivers.

use anyhow::Result;

use crate::process::{command, run_cmd, step};

pub fn build_release() -> Result<()> {
    step("building the forwarder (release)");
    run_cmd(command("cargo").args(["build", "--release", "-p", "forwarder-user"]))?;
    println!("    target/release/forwarder (eBPF object embedded)");
    Ok(())
}

/// Builds one of the test crate's drivers (demo, bench, fuzz, soak,
/// vmcheck) into target/release.
pub fn build_driver(name: &str) -> Result<()> {
    step(&format!("building the {name} driver"));
    run_cmd(command("cargo").args(["build", "--release", "-p", "forwarder-tests", "--bin", name]))
}
