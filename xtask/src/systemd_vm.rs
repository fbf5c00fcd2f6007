//! `cargo xtask systemd-test`: the .deb under a real systemd. A Debian 12
//! root filesystem (mmdebstrap, cached under target/systemd-vm) boots with
//! its own bookworm kernel and systemd as PID 1 in QEMU with TCG (nested KVM
//! hangs on these machines). A oneshot unit baked into the image runs
//! systemd_vm.sh from a 9p share: it installs the package with apt, drives
//! forwarder.service with systemctl and writes its checks back to the share;
//! then the VM powers off and this prints the table.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash as _, Hasher as _},
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    guarded::Guarded,
    mirror::MIRROR,
    process::{command, run_cmd, step, workspace_root},
};

const SUITE: &str = "bookworm";
/// Beyond mmdebstrap's minbase: the kernel and systemd as init, and what the
/// checks use. nftables is the package's dependency (the VM has no network,
/// so apt must find it installed); socat plays the LAN peer and the app.
const VM_PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "nftables",
    "socat",
    "bpftool",
    "procps",
];
/// Units a test VM only waits for: gettys, and timers that would start apt
/// or fstrim in the middle of a check.
const MASKED: &[&str] = &[
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
];
const SHARE_TAG: &str = "share";
const FSTAB: &str = "share /mnt/share 9p trans=virtio,version=9p2000.L,msize=262144 0 0\n";
/// The check runner: after the boot, with the share mounted; its end, pass
/// or fail, powers the VM off.
const TEST_UNIT: &str = "\
[Unit]
Description=cargo xtask systemd-test: forwarder.service under systemd
After=multi-user.target
RequiresMountsFor=/mnt/share
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/bash /mnt/share/check.sh
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=30min

[Install]
WantedBy=multi-user.target
";
const CHECK_SCRIPT: &str = include_str!("systemd_vm.sh");
/// Lines of the console that are the script's progress.
const PROGRESS: &str = "forwarder-vm-test: ";
/// Boot (about a minute under TCG) plus the checks (a few minutes), with
/// room for a loaded machine.
const VM_DEADLINE: Duration = Duration::from_secs(20 * 60);

fn dir() -> PathBuf {
    workspace_root().join("target/systemd-vm")
}

/// The cached boot files: a raw ext4 root filesystem and its kernel.
struct Image {
    root: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Identifies what the image is made of: a change rebuilds it.
fn recipe_key() -> String {
    let mut hasher = DefaultHasher::new();
    (SUITE, MIRROR, VM_PACKAGES, MASKED, FSTAB, TEST_UNIT).hash(&mut hasher);
    format!("{:016x}\n", hasher.finish())
}

/// The image, built once per recipe (mmdebstrap takes minutes, mostly
/// downloading; mkfs.ext4 -d makes the disk from the directory without
/// mounting anything).
fn image() -> Result<Image> {
    let dir = dir();
    let image = Image {
        root: dir.join("root.ext4"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    let key_file = dir.join("image.key");
    let key = recipe_key();
    if fs::read_to_string(&key_file).ok().as_deref() == Some(&key)
        && [&image.root, &image.kernel, &image.initrd]
            .iter()
            .all(|p| p.exists())
    {
        println!("    cached in {}", dir.display());
        return Ok(image);
    }
    let rootfs = dir.join("rootfs");
    remove_dir(&rootfs)?;
    let _ = fs::remove_file(&key_file);
    fs::create_dir_all(&dir)?;
    // In a private mount namespace: mmdebstrap mounts /proc, /sys and /dev
    // into the chroot, and one it fails to unmount (busy) dies with the
    // namespace instead of staying on the host.
    run_cmd(
        command("unshare")
            .args(["--mount", "--propagation", "private", "mmdebstrap"])
            .args(["--mode=root", "--variant=minbase", "--quiet"])
            .arg(format!("--include={}", VM_PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&rootfs)
            .arg(MIRROR),
    )
    .context("mmdebstrap")?;
    customize(&rootfs)?;
    let boot = rootfs.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        fs::read_dir(&boot)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .with_context(|| format!("no {prefix}* in {}", boot.display()))
    };
    fs::copy(find("vmlinuz-")?, &image.kernel)?;
    fs::copy(find("initrd.img-")?, &image.initrd)?;
    let tmp = dir.join("root.ext4.tmp");
    run_cmd(
        command("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&rootfs)
            .arg(&tmp)
            .arg("2G"),
    )?;
    fs::rename(&tmp, &image.root)?;
    remove_dir(&rootfs)?;
    fs::write(&key_file, key)?;
    Ok(image)
}

fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The test unit (enabled), the share's mount, masked units, a hostname.
fn customize(rootfs: &Path) -> Result<()> {
    let system = rootfs.join("etc/systemd/system");
    fs::write(system.join("forwarder-vm-test.service"), TEST_UNIT)?;
    let wants = system.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    symlink(
        "/etc/systemd/system/forwarder-vm-test.service",
        wants.join("forwarder-vm-test.service"),
    )?;
    for unit in MASKED {
        let path = system.join(unit);
        let _ = fs::remove_file(&path);
        symlink("/dev/null", path)?;
    }
    fs::create_dir_all(rootfs.join("mnt/share"))?;
    fs::write(rootfs.join("etc/fstab"), FSTAB)?;
    fs::write(rootfs.join("etc/hostname"), "forwarder-vm\n")?;
    Ok(())
}

/// QEMU, guarded: no VM outlives the task.
fn boot(image: &Image, share: &Path, console: &Path) -> Result<Guarded> {
    let mut cmd = command("qemu-system-x86_64");
    cmd.args(["-machine", "pc", "-accel", "tcg", "-smp", "2", "-m", "1024"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        // quiet: every console byte costs an emulated I/O exit.
        .args(["-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet"])
        // -snapshot: the cached image is never written; QEMU's overlay is
        // an unlinked temporary file.
        .arg("-snapshot")
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw",
            image.root.display()
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag={SHARE_TAG},security_model=none,id={SHARE_TAG}",
            share.display()
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null());
    Guarded::spawn(&mut cmd).context("starting qemu-system-x86_64")
}

/// Echoes the script's progress lines from the console until QEMU exits or
/// the deadline passes.
fn follow(vm: &mut Guarded, console: &Path) -> Result<()> {
    let deadline = Instant::now() + VM_DEADLINE;
    let mut offset = 0;
    let mut partial = String::new();
    loop {
        let exited = vm.try_wait()?;
        if let Ok(mut file) = fs::File::open(console) {
            file.seek(SeekFrom::Start(offset))?;
            let mut bytes = Vec::new();
            offset += file.read_to_end(&mut bytes)? as u64;
            partial.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                if let Some(at) = line.find(PROGRESS) {
                    println!("    {}", line[at + PROGRESS.len()..].trim_end());
                }
            }
        }
        if let Some(status) = exited {
            if !status.success() {
                bail!("qemu exited with {status}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the VM was still running after {} s; console in {}",
                VM_DEADLINE.as_secs(),
                console.display()
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// One line of results.tsv.
struct Check {
    name: String,
    passed: bool,
    measured: String,
}

/// The checks the script recorded, and whether it got to its end.
fn results(share: &Path) -> Result<(Vec<Check>, bool)> {
    let text = fs::read_to_string(share.join("results.tsv")).unwrap_or_default();
    let mut checks = Vec::new();
    let mut finished = false;
    for line in text.lines() {
        if line == "END" {
            finished = true;
            continue;
        }
        let mut fields = line.splitn(3, '\t');
        let (Some(name), Some(status), Some(measured)) =
            (fields.next(), fields.next(), fields.next())
        else {
            bail!("malformed result line {line:?}");
        };
        checks.push(Check {
            name: name.to_string(),
            passed: status == "PASS",
            measured: measured.to_string(),
        });
    }
    Ok((checks, finished))
}

/// Boots the VM with `packages`' .deb; returns how many checks passed.
pub fn run(packages: &crate::package::Packages) -> Result<u64> {
    let started = Instant::now();
    step(&format!(
        "Debian {SUITE} image with systemd and linux-image-amd64"
    ));
    let image = image()?;
    let dir = dir();
    let share = dir.join("share");
    remove_dir(&share)?;
    fs::create_dir_all(&share)?;
    let deb_name = packages.deb.file_name().context("deb file name")?;
    fs::copy(&packages.deb, share.join(deb_name))?;
    fs::write(share.join("check.sh"), CHECK_SCRIPT)?;
    let console = dir.join("console.log");
    let _ = fs::remove_file(&console);

    step("booting the VM (QEMU, TCG): the checks run inside");
    let vm_started = Instant::now();
    let mut vm = boot(&image, &share, &console)?;
    let followed = follow(&mut vm, &console);
    drop(vm);
    let vm_time = vm_started.elapsed();
    let (checks, finished) = results(&share)?;

    step("forwarder.service under systemd (Debian 12 VM)");
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for check in &checks {
        let verdict = if check.passed { "pass" } else { "FAIL" };
        println!("    {:<width$}  {verdict}  {}", check.name, check.measured);
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    println!(
        "    {} passed, {failed} failed; wall time {:.0} s (VM {:.0} s); console {}, journal {}",
        checks.len() - failed,
        started.elapsed().as_secs_f64(),
        vm_time.as_secs_f64(),
        console.display(),
        share.join("journal.txt").display()
    );
    followed?;
    if !finished {
        bail!("the check script did not finish; see {}", console.display());
    }
    if failed > 0 {
        bail!("{failed} of {} checks failed", checks.len());
    }
    Ok(checks.len() as u64)
}
