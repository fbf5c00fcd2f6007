//! `cargo xtask package`: what a qube without a Rust toolchain installs. A
//! .deb (Debian and Whonix templates) and an .rpm (Fedora templates, Qubes'
//! default), built by cargo-deb and cargo-generate-rpm from the metadata in
//! forwarder-user/Cargo.toml; and a tarball with install and uninstall
//! scripts for every other distribution. Each carries the binary (eBPF
//! embedded), the systemd units gated on the `forwarder` and
//! `forwarder-input` qvm-services, the post-install script that announces
//! them to dom0, example configs, the Qubes guide and the changelog. And
//! forwarder-dom0, an .rpm for dom0 with only `qvm-forwarder` and its
//! optional watch unit.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    build::build_release,
    process::{command, run_cmd, step, workspace_root},
};

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The packages `run` built.
pub struct Packages {
    pub tarball: PathBuf,
    pub deb: PathBuf,
    pub rpm: PathBuf,
    /// forwarder-dom0: `qvm-forwarder` and its optional watch unit.
    pub dom0_rpm: PathBuf,
}

/// Builds the release binary and every package from it.
pub fn run() -> Result<Packages> {
    build_release()?;
    let tarball = tarball()?;
    let out = workspace_root().join("target/package");
    step("building the .deb (cargo-deb)");
    // Qubes runs on x86_64 only; Debian calls it amd64.
    let deb = out.join(format!("forwarder_{VERSION}-1_amd64.deb"));
    // --no-build: the binary was just built; --no-strip: its symbol table
    // names the functions in a panic's backtrace.
    run_cmd(
        command("cargo")
            .args([
                "deb",
                "-p",
                "forwarder-user",
                "--no-build",
                "--no-strip",
                "-o",
            ])
            .arg(&deb),
    )?;
    step("building the .rpm (cargo-generate-rpm)");
    let rpm = out.join(format!("forwarder-{VERSION}-1.x86_64.rpm"));
    run_cmd(
        command("cargo")
            .args(["generate-rpm", "-p", "forwarder-user", "-o"])
            .arg(&rpm)
            // Asset paths in its metadata are relative to the workspace root.
            .current_dir(workspace_root()),
    )?;
    println!("    {}", rpm.display());
    step("building the dom0 .rpm (cargo-generate-rpm, variant dom0: forwarder-dom0)");
    let dom0_rpm = out.join(format!("forwarder-dom0-{VERSION}-1.x86_64.rpm"));
    run_cmd(
        command("cargo")
            .args([
                "generate-rpm",
                "-p",
                "forwarder-user",
                "--variant",
                "dom0",
                "-o",
            ])
            .arg(&dom0_rpm)
            .current_dir(workspace_root()),
    )?;
    println!("    {}", dom0_rpm.display());
    Ok(Packages {
        tarball,
        deb,
        rpm,
        dom0_rpm,
    })
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Assembles the tarball from the release binary and returns its path.
fn tarball() -> Result<PathBuf> {
    let root = workspace_root();
    let name = format!("forwarder-{VERSION}-{}", std::env::consts::ARCH);
    let out = root.join("target/package");
    let dir = out.join(&name);
    step(&format!("assembling {}", dir.display()));
    let _ = fs::remove_dir_all(&dir);
    copy(
        &root.join("target/release/forwarder"),
        &dir.join("bin/forwarder"),
    )?;
    for unit in ["forwarder.service", "forwarder-input.service"] {
        copy(
            &root.join("packaging").join(unit),
            &dir.join("systemd").join(unit),
        )?;
    }
    copy(
        &root.join("packaging/qubes/50-forwarder.sh"),
        &dir.join("qubes/50-forwarder.sh"),
    )?;
    for script in ["install.sh", "uninstall.sh"] {
        copy(&root.join("packaging").join(script), &dir.join(script))?;
    }
    for entry in fs::read_dir(root.join("packaging/examples"))? {
        let entry = entry?;
        copy(&entry.path(), &dir.join("examples").join(entry.file_name()))?;
    }
    copy(&root.join("docs/qubes.md"), &dir.join("doc/qubes.md"))?;
    copy(
        &root.join("packaging/changelog"),
        &dir.join("doc/changelog"),
    )?;
    let tarball = out.join(format!("{name}.tar.gz"));
    run_cmd(
        command("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&out)
            .arg(&name),
    )?;
    println!("    {}", tarball.display());
    Ok(tarball)
}
