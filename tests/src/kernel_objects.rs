//! The kernel's own count of BPF programs, maps and links, read with
//! bpftool: leak checks must not trust the daemon's view of itself.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{
    netns::run,
    wait::{until_stable, wait_until},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Objects {
    pub programs: usize,
    pub maps: usize,
    pub links: usize,
}

fn list(args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let out = run(Command::new("bpftool").arg("--json").args(args))
        .context("bpftool (Debian package bpftool)")?;
    serde_json::from_str(&out).with_context(|| format!("bpftool {args:?} printed no JSON list"))
}

fn count(kind: &str) -> Result<usize> {
    let objects = list(&[kind, "show"])?;
    if kind != "map" {
        return Ok(objects.len());
    }
    let mut maps = 0;
    for map in &objects {
        if map["type"] == "prog_array" && is_empty(map["id"].as_u64().unwrap_or(0))? {
            continue;
        }
        maps += 1;
    }
    Ok(maps)
}

/// Whether the map `id` holds no entry. An empty program array is not
/// counted: the kernel here (6.18) keeps some alive after their last fd,
/// pin and program are gone (one or two per run of the uplink-flap test,
/// from the daemons' first load, with no process holding them), and one
/// that held a program would keep that program alive, which is counted.
fn is_empty(id: u64) -> Result<bool> {
    match list(&["map", "dump", "id", &id.to_string()]) {
        Ok(entries) => Ok(entries.is_empty()),
        // Gone meanwhile.
        Err(_) => Ok(true),
    }
}

/// Every program, map and link in the kernel, in all namespaces.
pub fn objects() -> Result<Objects> {
    Ok(Objects {
        programs: count("prog")?,
        maps: count("map")?,
        links: count("link")?,
    })
}

impl Objects {
    fn within(&self, limit: &Objects) -> bool {
        self.programs <= limit.programs && self.maps <= limit.maps && self.links <= limit.links
    }
}

/// Waits until the kernel holds no more than `limit`: it releases programs
/// and maps after an RCU grace period, not at the last close. (Fewer is
/// fine: a baseline can include objects of a test still being released.)
pub fn wait_released(limit: Objects, timeout: Duration) -> Result<()> {
    let mut last = objects()?;
    if wait_until(timeout, || {
        objects().map(|now| last = now).is_ok() && last.within(&limit)
    }) {
        return Ok(());
    }
    bail!("the kernel still holds {last:?}, more than {limit:?}")
}

/// The counts once they stop changing (for up to 5 s): a baseline taken
/// while an earlier test's objects are still being released would be high.
pub fn settled() -> Result<Objects> {
    objects()?;
    let (last, _) = until_stable(Duration::from_secs(5), Duration::from_millis(300), || {
        objects().ok()
    });
    last.context("bpftool stopped answering")
}

/// Waits until the kernel holds `links` links (a daemon attaches its
/// downstream interfaces after it reports ready) and returns the counts.
pub fn wait_links(links: usize, timeout: Duration) -> Result<Objects> {
    let mut last = objects()?;
    if wait_until(timeout, || {
        objects().map(|now| last = now).is_ok() && last.links == links
    }) {
        return Ok(last);
    }
    bail!("expected {links} links, the kernel holds {last:?}")
}
