//! The kernel's own count of BPF programs, maps and links, read with
//! bpftool: leak checks must not trust the daemon's view of itself.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::wait::wait_until;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Objects {
    pub programs: usize,
    pub maps: usize,
    pub links: usize,
}

fn count(kind: &str) -> Result<usize> {
    let out = Command::new("bpftool")
        .args(["--json", kind, "show"])
        .output()
        .context("running bpftool (Debian package bpftool)")?;
    if !out.status.success() {
        bail!(
            "bpftool {kind} show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool {kind} show printed no JSON list"))?;
    Ok(list.len())
}

/// Every program, map and link in the kernel, in all namespaces.
pub fn objects() -> Result<Objects> {
    Ok(Objects {
        programs: count("prog")?,
        maps: count("map")?,
        links: count("link")?,
    })
}

/// Waits for the counts to return to `expected`: the kernel releases
/// programs and maps after an RCU grace period, not at the last close.
pub fn wait_for(expected: Objects, timeout: Duration) -> Result<()> {
    let mut last = objects()?;
    if wait_until(timeout, || {
        objects().map(|now| last = now).is_ok() && last == expected
    }) {
        return Ok(());
    }
    bail!("the kernel holds {last:?}, expected {expected:?}")
}
