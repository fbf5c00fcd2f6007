//! Idempotent installation of everything the build and the tests need.
//! Each step says what it checks and only acts when something is missing.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    mirror::{KEYRING, MIRROR},
    process::{cargo_bin, command, is_root, output, run_cmd, step, workspace_root},
};

/// Debian packages the tests drive: nftables (the baseline recipe and the
/// forwarder's own table), iproute2 (namespaces), ethtool (checksum
/// offload), iputils-ping, bpftool (the fault tests' leak checks).
const TEST_PACKAGES: &[&str] = &["nftables", "iproute2", "ethtool", "iputils-ping", "bpftool"];
/// And the benchmark's: trafgen (netsniff-ng) and iperf3.
const BENCH_PACKAGES: &[&str] = &["netsniff-ng", "iperf3"];
/// And the packaging's: dpkg-shlibdeps (dpkg-dev) computes the .deb's
/// library dependencies; the package test reads the .rpm with rpm and the
/// binary's symbol versions with objdump (binutils).
const PACKAGING_PACKAGES: &[&str] = &["dpkg-dev", "rpm", "binutils"];

/// The package builders `cargo xtask package` runs, pinned to versions that
/// build with the workspace's rust-version (1.95).
const CARGO_TOOLS: &[(&str, &str)] = &[("cargo-deb", "3.8.0"), ("cargo-generate-rpm", "0.21.1")];

/// The discovery apps the end-to-end tests run as they are: Syncthing, and
/// KDE Connect's daemon (about 180 MB without recommends) with a session
/// bus of its own (dbus-daemon) that dbus-send queries (dbus-bin), and
/// avahi-daemon, run without D-Bus in the app VM.
const APP_PACKAGES: &[&str] = &[
    "syncthing",
    "kdeconnect",
    "dbus-daemon",
    "dbus-bin",
    "avahi-daemon",
];
/// And the VM tier's (QEMU aside, see `install_qemu`): the busybox
/// virtme-ng builds its initramfs with, kmod (depmod for the unpacked
/// kernels on the host, modprobe for the kernel's module requests in the
/// guest, which shares the host's root file system), and mmdebstrap, which
/// builds the systemd VM's root file system.
const VM_PACKAGES: &[&str] = &["busybox-static", "kmod", "mmdebstrap"];

/// The LLVM major version of the installed nightly: bpf-linker must link
/// against the same one, or the bitcode it reads is not its own.
fn nightly_llvm_major() -> Result<u32> {
    let info = output(command("rustc").args(["+nightly", "-vV"]))
        .context("the nightly toolchain is required (rustup toolchain install nightly)")?;
    info.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .context("no LLVM version in `rustc +nightly -vV`")
}

/// The installed version of a Debian package, if it is installed.
fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Version}", package])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let out = String::from_utf8_lossy(&out.stdout);
    let (status, version) = out.split_once('\t')?;
    status
        .contains("install ok installed")
        .then(|| version.to_string())
}

fn missing_packages(packages: &[String]) -> Vec<String> {
    packages
        .iter()
        .filter(|p| installed_version(p).is_none())
        .cloned()
        .collect()
}

fn apt_install(packages: &[String]) -> Result<()> {
    let missing = missing_packages(packages);
    if missing.is_empty() {
        println!("    all present: {}", packages.join(" "));
        return Ok(());
    }
    println!("    installing: {}", missing.join(" "));
    if !is_root() {
        bail!(
            "installing packages needs root; install them by hand: apt-get install {}",
            missing.join(" ")
        );
    }
    run_cmd(command("apt-get").args(["update", "-q", APT_LOCK_WAIT]))?;
    apt_get_install(&[], &missing)
}

/// Waits for another apt (a concurrent setup) instead of failing.
const APT_LOCK_WAIT: &str = "-oDPkg::Lock::Timeout=600";

/// `apt-get install` of `packages` without recommends or questions, with
/// apt `options` (a sources list, a target release).
fn apt_get_install(options: &[&str], packages: &[impl AsRef<std::ffi::OsStr>]) -> Result<()> {
    run_cmd(
        command("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                APT_LOCK_WAIT,
            ])
            .args(options)
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpf_linker_ok() -> bool {
    command("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo install`s `tool` unless that exact version answers `--version`
/// (a different one is replaced).
fn install_cargo_tool(tool: &str, version: &str) -> Result<()> {
    let installed = command(tool)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim() == format!("{tool} {version}")
        });
    if installed {
        println!("    present in {}", cargo_bin().display());
        return Ok(());
    }
    run_cmd(command("cargo").args([
        "install",
        "--locked",
        "--force",
        &format!("{tool}@{version}"),
    ]))
}

/// LocalSend implementation the end-to-end test runs as real peers: nobody
/// on this project wrote it. Pinned, installed under target/.
const LOCALSENDD: &str = "localsendd==0.1.1";

/// Where the test set-up installs localsendd (a `pip --target` directory).
pub fn localsend_dir() -> PathBuf {
    workspace_root().join("target").join("localsend")
}

/// python-zeroconf, the mDNS responder and browser of the discovery tests
/// (nobody on this project wrote it either). Pinned, installed under target/.
const ZEROCONF: &str = "zeroconf==0.154.0";

/// Where the test set-up installs python-zeroconf (a `pip --target` directory).
pub fn zeroconf_dir() -> PathBuf {
    workspace_root().join("target").join("zeroconf")
}

/// virtme-ng, which boots the VM tier's kernels under QEMU. Pinned,
/// installed under target/.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// Where the set-up installs virtme-ng (a `pip --target` directory).
pub fn virtme_ng_dir() -> PathBuf {
    workspace_root().join("target").join("vm").join("virtme-ng")
}

/// `pip install --target dir spec` unless `dir` already holds the pinned
/// version (its dist-info directory, whose name has `_` for `-`).
fn pip_install(dir: &std::path::Path, spec: &str) -> Result<()> {
    let marker = dir.join(format!(
        "{}.dist-info",
        spec.replace('-', "_").replace("==", "-")
    ));
    if marker.exists() {
        println!("    present in {}", dir.display());
        return Ok(());
    }
    run_cmd(
        command("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--target",
            ])
            .arg(dir)
            .arg(spec),
    )
    .with_context(|| format!("installing {spec} from PyPI (needs python3 with pip)"))
}

pub fn run() -> Result<()> {
    step("nightly toolchain and rust-src");
    let llvm = nightly_llvm_major()?;
    let installed = output(command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("    rust-src present; nightly uses LLVM {llvm}");
    } else {
        run_cmd(command("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    step(&format!(
        "Debian packages for building bpf-linker against LLVM {llvm} and for the tests"
    ));
    let mut packages: Vec<String> = vec![
        format!("llvm-{llvm}-dev"),
        format!("libpolly-{llvm}-dev"),
        "zlib1g-dev".into(),
        "libzstd-dev".into(),
    ];
    packages.extend(
        TEST_PACKAGES
            .iter()
            .chain(BENCH_PACKAGES)
            .chain(PACKAGING_PACKAGES)
            .chain(VM_PACKAGES)
            .map(|p| p.to_string()),
    );
    packages.extend(APP_PACKAGES.iter().map(|p| p.to_string()));
    apt_install(&packages)?;
    install_qemu()?;

    step("bpf-linker");
    if bpf_linker_ok() {
        println!("    present in {}", cargo_bin().display());
    } else {
        run_cmd(
            command("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--no-default-features",
                    "--features",
                ])
                .arg(format!("llvm-{llvm}"))
                .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")),
        )?;
    }

    for (tool, version) in CARGO_TOOLS {
        step(&format!("{tool} {version}"));
        install_cargo_tool(tool, version)?;
    }

    step(&format!(
        "{LOCALSENDD} from PyPI, the real LocalSend peer of the end-to-end test"
    ));
    pip_install(&localsend_dir(), LOCALSENDD)?;

    step(&format!(
        "{ZEROCONF} from PyPI, the mDNS responder and browser of the discovery tests"
    ));
    pip_install(&zeroconf_dir(), ZEROCONF)?;

    step(&format!(
        "{VIRTME_NG} from PyPI, which boots the VM tier's kernels"
    ));
    pip_install(&virtme_ng_dir(), VIRTME_NG)?;
    Ok(())
}

/// QEMU for the VM tier, from the suite of the installed qemu-utils: this
/// machine ships backports' qemu-utils, which bookworm's own
/// qemu-system-x86 would remove.
fn install_qemu() -> Result<()> {
    if installed_version("qemu-system-x86").is_some() {
        println!("    qemu-system-x86 present");
        return Ok(());
    }
    let utils = installed_version("qemu-utils").unwrap_or_default();
    if !utils.contains("~bpo") {
        return apt_install(&["qemu-system-x86".into()]);
    }
    let codename = std::fs::read_to_string("/etc/os-release")?
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
        .context("no VERSION_CODENAME in /etc/os-release")?;
    // A private sources list: the system's own stays as it is.
    let list = workspace_root().join("target/apt/backports.list");
    std::fs::create_dir_all(list.parent().unwrap())?;
    std::fs::write(
        &list,
        format!("deb [signed-by={KEYRING}] {MIRROR} {codename}-backports main\n"),
    )?;
    let source = format!("Dir::Etc::SourceList={}", list.display());
    println!("    qemu-system-x86 from {codename}-backports, like qemu-utils {utils}");
    run_cmd(command("apt-get").args(["-q", "-o", &source, "update"]))?;
    let release = format!("{codename}-backports");
    apt_get_install(&["-o", &source, "-t", &release], &["qemu-system-x86"])
}
