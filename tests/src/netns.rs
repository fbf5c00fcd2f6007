//! Network namespaces owned by a test: unique names, removed on drop (also
//! when the test panics), and leftovers of crashed runs swept at start.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{Context as _, Result, bail};

use crate::packet::Mac;

const PREFIX: &str = "fwt-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Children that must not outlive the test process: a killed test run
/// would otherwise leave daemons running in namespaces nobody deletes.
pub trait DieWithParent {
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    fn die_with_parent(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe and touches only this process.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

pub struct Link {
    pub index: u32,
    pub mac: Mac,
}

pub fn parse_mac(s: &str) -> Result<Mac> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {s:?}"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("MAC {s:?}"))
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out: Output = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `sh -c script` in the root namespace.
pub fn sh(script: &str) -> Result<String> {
    run(Command::new("sh").args(["-c", script]))
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces that tests of a process no longer running left behind.
pub fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(|pid| !pid_alive(pid)) {
            let _ = run(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}

pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(label: &str) -> Result<Self> {
        let name = format!(
            "{PREFIX}{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) -> Result<String> {
        run(Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace()))
    }

    /// An interface's index and MAC, as `ip -o link show` reports them.
    pub fn link(&self, dev: &str) -> Result<Link> {
        let line = self.ip(&format!("-o link show dev {dev}"))?;
        let index = line
            .split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .with_context(|| format!("no ifindex in {line:?}"))?;
        let mac = line
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no MAC in {line:?}"))?;
        Ok(Link {
            index,
            mac: parse_mac(mac)?,
        })
    }

    /// Loads an nftables ruleset (`nft -f`) inside the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft")?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "loading nftables in {}: {}\n{ruleset}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `sh -c script` inside the namespace.
    pub fn sh(&self, script: &str) -> Result<String> {
        run(self.command("sh").args(["-c", script]))
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that lives in this namespace: sockets it opens
    /// belong to the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|s| {
            s.spawn(|| {
                let _guard = self.enter().expect("entering the namespace");
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// Starts a thread that lives in this namespace for good and runs `f`.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<thread::JoinHandle<T>> {
        let target = File::open(format!("/run/netns/{}", self.name))?;
        Ok(thread::spawn(move || {
            setns(&target).expect("entering the namespace");
            f()
        }))
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Result<NetnsGuard> {
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(format!("/run/netns/{}", self.name))?;
        setns(&target)?;
        Ok(NetnsGuard { original })
    }

    /// A sysctl of this namespace, e.g. `net.ipv4.ip_forward=1`.
    pub fn sysctl(&self, setting: &str) -> Result<()> {
        run(self.command("sysctl").args(["-qw", setting])).map(drop)
    }

    /// A counter of /proc/net/snmp, e.g. ("Udp", "InCsumErrors").
    pub fn snmp(&self, group: &str, field: &str) -> Result<u64> {
        let text = self.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))?;
        parse_snmp(&text, group, field)
            .with_context(|| format!("{group}:{field} not in /proc/net/snmp"))
    }
}

/// Fails naming every namespace whose TCP, UDP or ICMP counted a receive
/// checksum error.
pub fn ensure_no_checksum_errors<'a>(
    namespaces: impl IntoIterator<Item = (&'a str, &'a Netns)>,
) -> Result<()> {
    let mut errors = Vec::new();
    for (name, ns) in namespaces {
        let mut total = 0;
        for group in ["Tcp", "Udp", "Icmp"] {
            total += ns.snmp(group, "InCsumErrors")?;
        }
        if total > 0 {
            errors.push(format!("{name}: {total}"));
        }
    }
    if !errors.is_empty() {
        bail!("checksum errors: {}", errors.join(", "));
    }
    Ok(())
}

fn setns(file: &File) -> Result<()> {
    // SAFETY: a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

pub struct NetnsGuard {
    original: File,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        setns(&self.original).expect("returning to the original namespace");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("cleanup: {err:#}");
        }
    }
}

/// /proc/net/snmp pairs a header line with a value line per group.
fn parse_snmp(text: &str, group: &str, field: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let header = lines.next()?;
    let values = lines.next()?;
    let index = header.split_whitespace().position(|f| f == field)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn snmp_parsing() {
        let text = "Udp: InDatagrams NoPorts InErrors InCsumErrors\nUdp: 5 1 0 3\n";
        assert_eq!(super::parse_snmp(text, "Udp", "InCsumErrors"), Some(3));
        assert_eq!(super::parse_snmp(text, "Tcp", "InCsumErrors"), None);
    }
}
