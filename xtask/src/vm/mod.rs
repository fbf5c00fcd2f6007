//! `cargo xtask vm-test`: the forwarder on the kernels users run. Each is
//! Debian's kernel package (debian), booted under QEMU by virtme-ng on the
//! host's read-only root file system (qemu), where `vmcheck kernel` runs
//! the checks on the Qubes-like topology and, with sys-net's uplink on the
//! VM's virtio-net NIC, the NIC scenario, whose LAN peer sits on the host
//! behind a tap (lan). The results make one table (report).

mod debian;
mod lan;
mod qemu;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;

use crate::{
    build::{build_driver, build_release},
    process::{is_root, step, workspace_root},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kernel {
    /// Debian 11 (bullseye): older hosts.
    #[value(name = "5.10")]
    V5_10,
    /// Debian 12 (bookworm).
    #[value(name = "6.1")]
    V6_1,
    /// Debian 13 (trixie).
    #[value(name = "6.12")]
    V6_12,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::V5_10, Kernel::V6_1, Kernel::V6_12];

    pub fn version(self) -> &'static str {
        match self {
            Kernel::V5_10 => "5.10",
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
        }
    }

    fn suite(self) -> &'static str {
        match self {
            Kernel::V5_10 => "bullseye",
            Kernel::V6_1 => "bookworm",
            Kernel::V6_12 => "trixie",
        }
    }
}

/// Why the VM tier cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("it creates namespaces and a tap: run as root".into());
    }
    qemu::unavailable()
}

/// How long one VM may take: a boot, the checks, the power-off.
fn timeout(accel: qemu::Accel) -> Duration {
    match accel {
        qemu::Accel::Kvm => Duration::from_secs(180),
        qemu::Accel::Tcg => Duration::from_secs(480),
    }
}

/// Boots `kernel` once and reads what its checks reported.
fn run_kernel(
    vm_dir: &Path,
    vng: &Path,
    kernel: Kernel,
    image: &debian::KernelImage,
    accel: qemu::Accel,
) -> Result<report::Row> {
    let root = workspace_root();
    let out = vm_dir.join("out").join(kernel.version());
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let results = out.join("results");
    let vmcheck = root.join("target/release/vmcheck");
    let forwarder = std::env::var_os("FORWARDER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/forwarder"));
    let console = out.join("console.log");
    let lan = lan::Lan::start(&vmcheck, kernel.version())?;
    let outcome = qemu::Boot {
        vng,
        image,
        accel,
        netns: lan.netns(),
        qemu_opts: lan.qemu_opts(),
        rwdir: &out,
        exec: format!(
            "FORWARDER_BIN={} {} kernel --results {} --nic-mac {}",
            forwarder.display(),
            vmcheck.display(),
            results.display(),
            lan::NIC_MAC
        ),
        console: console.clone(),
        timeout: timeout(accel),
    }
    .run()?;
    drop(lan);
    let text = fs::read_to_string(&results).unwrap_or_default();
    let (mut checks, complete) = report::parse(&text);
    // The guest's exit status does not reach the host when nothing in
    // the guest sets up virtme-ng's script ports (no udev): the end line
    // is what says the checks all ran.
    let vm = match (outcome.status, complete) {
        (Some(_), true) => report::Check {
            id: report::VM_CHECK.into(),
            status: "pass".into(),
            detail: format!("{} boot, every check ran", accel.name()),
        },
        (status, _) => report::Check {
            id: report::VM_CHECK.into(),
            status: "FAIL".into(),
            detail: format!(
                "the VM ended before the checks did ({}); console in {}",
                status.map_or("out of time".to_string(), |s| format!("virtme-ng: {s}")),
                console.display()
            ),
        },
    };
    checks.insert(0, vm);
    Ok(report::Row {
        kernel: kernel.version().into(),
        release: image.release.clone(),
        checks,
        wall: outcome.elapsed,
    })
}

/// Runs the checks on `kernels` (all when empty), prints the table, and
/// fails if any check failed. Returns how many checks passed.
pub fn run(kernels: &[Kernel]) -> Result<u64> {
    if let Some(reason) = unavailable() {
        bail!("the VM tier cannot run here: {reason}");
    }
    let kernels = if kernels.is_empty() {
        &Kernel::ALL[..]
    } else {
        kernels
    };
    let vm_dir = workspace_root().join("target/vm");
    if std::env::var_os("FORWARDER_BIN").is_none() {
        build_release()?;
    }
    build_driver("vmcheck")?;
    let vng = crate::setup::virtme_ng_dir();

    step("Debian's kernel packages");
    let mut images = Vec::new();
    for kernel in kernels {
        images.push(debian::fetch(&vm_dir, kernel.version(), kernel.suite())?);
    }
    let accel = qemu::probe_accel(&images[0]);
    println!("    QEMU acceleration: {}", accel.name());

    let started = Instant::now();
    let mut rows = Vec::new();
    for (kernel, image) in kernels.iter().zip(&images) {
        step(&format!(
            "kernel {} ({}) under QEMU ({})",
            kernel.version(),
            image.release,
            accel.name()
        ));
        let row = run_kernel(&vm_dir, &vng, *kernel, image, accel)
            .with_context(|| format!("kernel {}", kernel.version()))?;
        for check in &row.checks {
            println!("    {:<4} {:<10} {}", check.status, check.id, check.detail);
        }
        rows.push(row);
    }
    step("the forwarder on each kernel");
    let table = report::render(&rows, started.elapsed());
    print!("{table}");
    fs::write(vm_dir.join("report.md"), &table)?;
    println!("written to {}", vm_dir.join("report.md").display());
    let failed: usize = rows.iter().map(report::Row::failed).sum();
    if failed > 0 {
        bail!("{failed} VM checks failed");
    }
    Ok(rows.iter().map(report::Row::passed).sum::<usize>() as u64)
}
