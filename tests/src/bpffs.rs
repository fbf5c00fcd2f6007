//! One bpffs for every test of a run, mounted in the root mount namespace
//! outside /sys: `ip netns exec` remounts /sys privately for each command,
//! so a bpffs below it would be invisible to the next command.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};
use forwarder::pin;

use crate::netns::run;

pub const ROOT: &str = "/run/forwarder-tests/bpffs";
static NEXT: AtomicU32 = AtomicU32::new(0);

fn ensure_mounted() -> Result<()> {
    let root = Path::new(ROOT);
    if pin::is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root)?;
    run(std::process::Command::new("mount").args(["-t", "bpf", "bpf", ROOT]))
        .context("mounting the test bpffs")?;
    Ok(())
}

/// A pin directory of its own for one instance; removed on drop.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(label: &str) -> Result<Self> {
        ensure_mounted()?;
        let path = Path::new(ROOT).join(format!(
            "{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(PinDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything pinned below the directory, for leak checks.
    pub fn contents(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    walk(&path, out);
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.path, &mut out);
        out
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // bpffs has no recursive removal; remove files, then directories.
        let mut entries = self.contents();
        entries.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for entry in entries {
            let _ = std::fs::remove_file(&entry).or_else(|_| std::fs::remove_dir(&entry));
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
