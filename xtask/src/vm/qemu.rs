//! Booting a kernel under QEMU with virtme-ng: the host's root file system,
//! read-only, is the guest's, so the guest runs the binaries built here and
//! the host's ip, tc, nft and bpftool, and loads the kernel's own modules
//! from the unpacked package.

use std::{
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::debian::KernelImage;
use crate::{
    guarded::Guarded,
    process::{command, path_env},
};

/// QEMU's x86 system emulator, from Debian's qemu-system-x86.
const QEMU: &str = "qemu-system-x86_64";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// Every instruction emulated: slow, and the only choice where nested
    /// KVM hangs or aborts, as it does on these machines.
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    }
}

/// Why QEMU cannot run the VM tier here, if it cannot.
pub fn unavailable() -> Option<String> {
    let version = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !version.is_ok_and(|s| s.success()) {
        return Some(format!(
            "{QEMU} does not run (Debian package qemu-system-x86)"
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun for the tap behind the VM's NIC".into());
    }
    None
}

/// KVM if a short boot of `image` with it gets as far as the kernel's
/// panic over the missing root file system, TCG otherwise.
pub fn probe_accel(image: &KernelImage) -> Accel {
    if !Path::new("/dev/kvm").exists() {
        return Accel::Tcg;
    }
    let probe = || -> Result<bool> {
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-no-reboot"])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(&image.vmlinuz)
            .args(["-append", "console=ttyS0 panic=-1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut qemu = Guarded::spawn(&mut cmd).with_context(|| format!("spawning {cmd:?}"))?;
        // Drained while QEMU runs: a full pipe would stall it.
        let mut out = qemu.stdout.take().context("QEMU's stdout")?;
        let reader = std::thread::spawn(move || {
            let mut console = String::new();
            let _ = out.read_to_string(&mut console);
            console
        });
        let exited = qemu.wait_until(Instant::now() + Duration::from_secs(30))?;
        drop(qemu);
        let console = reader.join().unwrap_or_default();
        Ok(exited.is_some() && console.contains("Kernel panic"))
    };
    match probe() {
        Ok(true) => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

/// One boot: the kernel, what the guest runs, and where its console goes.
pub struct Boot<'a> {
    pub vng: &'a Path,
    pub image: &'a KernelImage,
    pub accel: Accel,
    /// The network namespace QEMU runs in (where its tap is).
    pub netns: &'a str,
    pub qemu_opts: String,
    /// A host directory the guest may write to, at the same path.
    pub rwdir: &'a Path,
    /// A shell command line the guest runs, then powers off.
    pub exec: String,
    pub console: PathBuf,
    pub timeout: Duration,
}

pub struct Outcome {
    pub elapsed: Duration,
    /// virtme-ng's exit status; `None` when it ran out of time.
    pub status: Option<ExitStatus>,
}

impl Boot<'_> {
    pub fn run(&self) -> Result<Outcome> {
        let vng_dir = self.vng;
        // virtme-ng runs QEMU as a grandchild. In a PID namespace of its
        // own, whose first process unshare kills when unshare dies, no QEMU
        // outlives a run, whatever ends it.
        let mut cmd = command("ip");
        cmd.args(["netns", "exec", self.netns, "unshare"]).args([
            "--pid",
            "--fork",
            "--kill-child",
            "python3",
        ]);
        // virtme-ng runs its own helpers (virtme-run) from PATH, and the
        // guest's console is only shown with --verbose when nothing in the
        // guest creates the virtio ports of a quiet run (udev).
        let path = std::env::join_paths(
            std::iter::once(vng_dir.join("bin")).chain(std::env::split_paths(&path_env())),
        )?;
        cmd.arg(vng_dir.join("bin/vng"))
            .env("PYTHONPATH", vng_dir)
            .env("PATH", path)
            .arg("--verbose")
            .arg("--run")
            .arg(&self.image.vmlinuz)
            .args(["--memory", "1G", "--cpus", "2"])
            .arg("--rwdir")
            .arg(self.rwdir)
            .arg(format!("--qemu-opts={}", self.qemu_opts))
            .arg("--exec")
            .arg(&self.exec)
            .stdin(Stdio::null());
        if self.accel == Accel::Tcg {
            cmd.arg("--disable-kvm");
        }
        let console = File::create(&self.console)
            .with_context(|| format!("creating {}", self.console.display()))?;
        cmd.stdout(console.try_clone()?).stderr(console);
        let started = Instant::now();
        let mut vng = Guarded::spawn(&mut cmd).with_context(|| format!("spawning {cmd:?}"))?;
        let status = vng.wait_until(started + self.timeout)?;
        let elapsed = started.elapsed();
        drop(vng);
        Ok(Outcome { elapsed, status })
    }
}
