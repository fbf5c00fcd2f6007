//! `cargo xtask package`: a tarball a router VM without a Rust toolchain can
//! install: the binary (eBPF embedded), the systemd unit gated on the
//! `forwarder` qvm-service, example configs, install and uninstall scripts
//! and the Qubes guide.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    setup::{command, run_cmd, step},
    test::build_release,
};

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Builds the tarball and returns its path.
pub fn run() -> Result<PathBuf> {
    build_release()?;
    let root = crate::setup::workspace_root();
    let name = format!(
        "forwarder-{}-{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    );
    let out = root.join("target/package");
    let dir = out.join(&name);
    step(&format!("assembling {}", dir.display()));
    let _ = fs::remove_dir_all(&dir);
    copy(
        &root.join("target/release/forwarder"),
        &dir.join("bin/forwarder"),
    )?;
    copy(
        &root.join("packaging/forwarder.service"),
        &dir.join("systemd/forwarder.service"),
    )?;
    for script in ["install.sh", "uninstall.sh"] {
        copy(&root.join("packaging").join(script), &dir.join(script))?;
    }
    for entry in fs::read_dir(root.join("packaging/examples"))? {
        let entry = entry?;
        copy(&entry.path(), &dir.join("examples").join(entry.file_name()))?;
    }
    copy(&root.join("docs/qubes.md"), &dir.join("doc/qubes.md"))?;
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
