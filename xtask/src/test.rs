//! The test tiers, run in order, with a summary of what ran.

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    package::Packages,
    process::{command, is_root, run_cmd, step},
};

/// Runs cargo with its stdout echoed, returning how many tests passed.
fn cargo_test(args: &[String], after: &[String], packages: Option<&Packages>) -> Result<u64> {
    let mut cmd = command("cargo");
    cmd.arg("test")
        .args(args)
        .arg("--")
        .args(after)
        .env("LOCALSENDD_DIR", crate::setup::localsend_dir())
        .env("ZEROCONF_DIR", crate::setup::zeroconf_dir())
        .stdout(Stdio::piped());
    if let Some(packages) = packages {
        cmd.env("FORWARDER_PACKAGE", &packages.tarball)
            .env("FORWARDER_DEB", &packages.deb)
            .env("FORWARDER_RPM", &packages.rpm)
            .env("FORWARDER_DOM0_RPM", &packages.dom0_rpm);
    }
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut passed = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ok. ") {
            passed += rest
                .split(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(passed)
}

/// `cargo test` arguments selecting the given test targets of forwarder-tests.
fn targets(names: &[&str]) -> Vec<String> {
    let mut args = vec!["-p".to_string(), "forwarder-tests".to_string()];
    for name in names {
        args.push("--test".into());
        args.push((*name).into());
    }
    args
}

pub fn run(filter: &[String]) -> Result<()> {
    let mut summary = Vec::new();

    step("tier 1: host unit tests (parsing, checksums, rule encoding, config)");
    let unit = [
        "-p",
        "forwarder-common",
        "-p",
        "forwarder-user",
        "-p",
        "forwarder-tests",
        "--lib",
    ];
    summary.push((
        "host unit tests",
        cargo_test(&unit.map(String::from), &[], None)?,
    ));

    if !is_root() {
        bail!(
            "the BPF_PROG_TEST_RUN and integration tiers load programs and create namespaces: run as root"
        );
    }
    step("building the forwarder binary the integration tests run");
    run_cmd(command("cargo").args(["build", "-p", "forwarder-user"]))?;
    step("building the packages the package tests inspect and install");
    let packages = crate::package::run()?;

    let mut privileged: Vec<String> = vec!["--test-threads=1".into()];
    privileged.extend(filter.iter().cloned());

    step("tier 2: packet-in/packet-out tests through BPF_PROG_TEST_RUN");
    let n = cargo_test(
        &targets(&[
            "test_run",
            "flow_test_run",
            "relay_test_run",
            "hostile",
            "verifier_budget",
        ]),
        &privileged,
        None,
    )?;
    summary.push(("BPF_PROG_TEST_RUN tests", n));

    step(
        "tier 3: integration tests in namespaces (Qubes-like topology, forwarder and the seed's nftables recipe)",
    );
    let mut verbose = privileged.clone();
    verbose.push("--nocapture".into());
    let integration = [
        "integration",
        "firewall",
        "failsafe",
        "fib_cache",
        "relay",
        "state",
        "operator",
        "package",
        "libvirt",
        "localsend",
        "apps",
        "discovery",
        "security",
        "faults",
        "hostile_config",
        "daemon_robustness",
        "qubes_admin",
        "qubes_integration",
        "stats",
        "kernel_log",
        "avahi",
        "soak",
    ];
    let n = cargo_test(&targets(&integration), &verbose, Some(&packages))?;
    summary.push(("integration tests", n));

    step(
        "tier 4: the kernels users run, and the .deb under systemd, each booted under QEMU \
         (cargo xtask vm-test, cargo xtask systemd-test)",
    );
    match crate::vm::unavailable() {
        Some(reason) => println!("    skipped: {reason}"),
        None => {
            summary.push(("VM kernel checks", crate::vm::run(&[])?));
            summary.push(("systemd VM checks", crate::systemd_vm::run(&packages)?));
        }
    }

    step("summary");
    for (tier, n) in &summary {
        println!("    {n:>4} passed  {tier}");
    }
    Ok(())
}
