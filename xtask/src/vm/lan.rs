//! The LAN outside the VM: a network namespace on the host holding the tap
//! QEMU backs the VM's virtio-net NIC with, and the LAN peer
//! (`vmcheck lan-peer`) in it. Removed on drop, also when a run fails.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    guarded::Guarded,
    process::{command, output},
};

const PREFIX: &str = "fwvm-";
pub const TAP: &str = "fwtap0";
/// The VM's NIC, so the checks inside can find it.
pub const NIC_MAC: &str = "52:54:00:f0:00:01";

fn ip(args: &[&str]) -> Result<()> {
    output(command("ip").args(args)).map(drop)
}

/// Namespaces a run that no longer exists left behind (named after its
/// process id).
fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

pub struct Lan {
    netns: String,
    peer: Guarded,
    /// Held open for as long as the peer should serve; closing it ends the
    /// peer.
    stdin: Option<ChildStdin>,
}

impl Lan {
    pub fn start(vmcheck: &Path, label: &str) -> Result<Self> {
        sweep_leftovers();
        let netns = format!("{PREFIX}{}-{label}", std::process::id());
        ip(&["netns", "add", &netns])?;
        let lan = (|| -> Result<Lan> {
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &netns, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &netns])
                .arg(vmcheck)
                .args(["lan-peer", "--tap", TAP])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let mut peer = Guarded::spawn(&mut cmd).context("starting the LAN peer")?;
            let stdin = peer.stdin.take();
            let stdout = peer.stdout.take().context("the LAN peer's stdout")?;
            let lan = Lan {
                netns: netns.clone(),
                peer,
                stdin,
            };
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("the LAN peer did not start: {line:?}");
            }
            Ok(lan)
        })();
        if lan.is_err() {
            let _ = ip(&["netns", "del", &netns]);
        }
        lan
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// QEMU's options for the VM's NIC: virtio-net on the tap. The guest is
    /// offered no TSO receive offload, so the host's stack segments what
    /// it sends to MTU-sized frames and every merge of them happens in the
    /// guest, by GRO.
    pub fn qemu_opts(&self) -> String {
        format!(
            "-netdev tap,id=lan,ifname={TAP},script=no,downscript=no -device virtio-net-pci,netdev=lan,mac={NIC_MAC},guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off"
        )
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // End of input asks the peer to exit; it gets a moment before the
        // kill.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        let _ = self.peer.wait_until(deadline);
        // Stopped before its namespace goes.
        let _ = self.peer.kill();
        let _ = self.peer.wait();
        if let Err(err) = ip(&["netns", "del", &self.netns]) {
            eprintln!("cleanup: {err:#}");
        }
    }
}
