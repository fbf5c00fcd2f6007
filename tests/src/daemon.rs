//! A `forwarder run` process inside a router namespace, stopped on drop.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use forwarder::{datapath::Role, pin::PinLayout, tables::Tables};
use forwarder_common::{maps::UplinkState, reason::Reason};

use crate::{
    bpffs::PinDir,
    netns::{DieWithParent as _, Netns},
    wait::wait_until,
};

/// The `forwarder` binary under test: $FORWARDER_BIN, or the one cargo
/// built in the same profile as this executable (a test binary lives one
/// directory deeper, in deps/, than a driver such as the soak).
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FORWARDER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("forwarder"))
        .collect();
    match candidates.iter().find(|c| c.is_file()) {
        Some(found) => Ok(found.clone()),
        None => bail!(
            "no forwarder binary at {candidates:?}: build it first (cargo build -p forwarder-user) or set FORWARDER_BIN"
        ),
    }
}

/// The routers of the Qubes-like topology.
#[derive(Clone, Copy, Debug)]
pub enum Router {
    SysNet,
    SysFirewall,
}

impl Router {
    /// Where the router forwards toward the app: sys-net to sys-firewall,
    /// sys-firewall to the app.
    pub fn next_hop(self) -> std::net::Ipv4Addr {
        match self {
            Router::SysNet => crate::topology::SYSFW,
            Router::SysFirewall => crate::topology::APP,
        }
    }
}

pub struct Forwarder {
    child: Option<Child>,
    pub pins: PinDir,
    log: PathBuf,
    label: String,
    binary: PathBuf,
    args: Vec<String>,
    /// Where the daemon sends its sd_notify messages, as systemd's socket.
    notify: Notify,
    /// Variables set for its launches from now on, over the harness's own.
    env: Vec<(String, String)>,
}

/// The harness's stand-in for systemd's notification socket: the daemon
/// says READY=1 once its first reconcile is done (every interface there is
/// attached), which is what "started" means to a test.
struct Notify {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    ready: std::sync::atomic::AtomicBool,
}

impl Notify {
    fn new(label: &str) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "fwd-notify-{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path)?;
        socket.set_nonblocking(true)?;
        Ok(Notify {
            socket,
            path,
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads every message waiting; returns whether one said READY=1.
    fn drain(&self) -> bool {
        let mut buf = [0u8; 512];
        let mut ready = false;
        while let Ok(n) = self.socket.recv(&mut buf) {
            ready |= buf[..n]
                .split(|b| *b == b'\n')
                .any(|line| line == b"READY=1");
        }
        ready
    }

    /// Before a launch: what a previous instance said and nobody read yet
    /// (a killed daemon's READY=1) must not pass for the new one's.
    fn forget(&self) {
        self.drain();
        self.ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether READY=1 has arrived (since the last launch).
    fn ready(&self) -> bool {
        if self.drain() {
            self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Forwarder {
    /// Starts `forwarder run <args> --pin-dir <own dir>` in `ns` and waits
    /// until the uplink program is attached and the uplink has an address.
    pub fn start(ns: &Netns, label: &str, args: &[&str]) -> Result<Self> {
        Self::start_binary(&binary()?, ns, label, args)
    }

    /// The forwarder in both routers of the Qubes-like topology, each
    /// pointing LocalSend at the next hop: sys-net to sys-firewall,
    /// sys-firewall to the app.
    pub fn start_localsend_routers(t: &crate::topology::Topology) -> Result<(Self, Self)> {
        Ok((
            Self::start_localsend(t, Router::SysNet, &[])?,
            Self::start_localsend(t, Router::SysFirewall, &[])?,
        ))
    }

    /// The forwarder in one router of the Qubes-like topology, pointing
    /// LocalSend at the next hop, with `extra` arguments.
    pub fn start_localsend(
        t: &crate::topology::Topology,
        router: Router,
        extra: &[&str],
    ) -> Result<Self> {
        let target = router.next_hop().to_string();
        let mut args = vec!["--localsend", &target];
        args.extend_from_slice(extra);
        Self::start_router(t, router, &args)
    }

    /// The forwarder in one router of the Qubes-like topology, on that
    /// router's uplink, with `args`.
    pub fn start_router(
        t: &crate::topology::Topology,
        router: Router,
        args: &[&str],
    ) -> Result<Self> {
        use crate::topology::{SYSFW_UPLINK, SYSNET_UPLINK};
        let (ns, label, uplink) = match router {
            Router::SysNet => (&t.sysnet, "sys-net", SYSNET_UPLINK),
            Router::SysFirewall => (&t.sysfw, "sys-firewall", SYSFW_UPLINK),
        };
        let mut full = vec!["--uplink", uplink];
        full.extend_from_slice(args);
        Self::start(ns, label, &full).with_context(|| format!("forwarder in {label}"))
    }

    /// The forwarder in both routers of the Qubes-like topology, sys-net's
    /// with `sysnet` arguments and sys-firewall's with `sysfw`.
    pub fn start_routers(
        t: &crate::topology::Topology,
        sysnet: &[&str],
        sysfw: &[&str],
    ) -> Result<(Self, Self)> {
        Ok((
            Self::start_router(t, Router::SysNet, sysnet)?,
            Self::start_router(t, Router::SysFirewall, sysfw)?,
        ))
    }

    /// Waits until the daemon launched last says READY=1, its uplink
    /// program is attached and the uplink usable.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        // A daemon that exited (refusing the kernel, say) will not become
        // ready: no need to wait out the timeout.
        let mut ready = false;
        wait_until(timeout, || {
            ready = self.ready();
            ready || !self.running()
        });
        if ready {
            return Ok(());
        }
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        let why = match status {
            Some(status) => format!("it exited ({status})"),
            None if !self.notify.ready() => format!("no READY=1 within {timeout:?}"),
            None => format!(
                "READY=1, but no uplink program attached to a usable uplink within {timeout:?}"
            ),
        };
        bail!(
            "{} did not become ready: {why}; log:\n{}",
            self.label,
            self.log_text()
        )
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// Starts the process without waiting for it to get anywhere.
    pub fn spawn(ns: &Netns, label: &str, args: &[&str]) -> Result<Self> {
        Self::spawn_binary(&binary()?, ns, label, args)
    }

    /// As `start`, with a given `forwarder` binary (an installed one).
    pub fn start_binary(binary: &Path, ns: &Netns, label: &str, args: &[&str]) -> Result<Self> {
        let mut fwd = Self::spawn_binary(binary, ns, label, args)?;
        fwd.wait_ready(Duration::from_secs(20))?;
        Ok(fwd)
    }

    /// As `start`, after `prepare` has put something in the pin directory
    /// (what another build or a crashed predecessor would have left).
    pub fn start_over(
        ns: &Netns,
        label: &str,
        args: &[&str],
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
        let mut fwd = Self::unstarted(&binary()?, ns, label, args)?;
        std::fs::create_dir_all(fwd.pins.path())?;
        prepare(fwd.pins.path())?;
        fwd.child = Some(fwd.launch(ns)?);
        fwd.wait_ready(Duration::from_secs(20))?;
        Ok(fwd)
    }

    fn unstarted(binary: &Path, ns: &Netns, label: &str, args: &[&str]) -> Result<Self> {
        Ok(Forwarder {
            child: None,
            pins: PinDir::new(label)?,
            log: std::env::temp_dir().join(format!("{}-{label}.log", ns.name())),
            label: label.into(),
            binary: binary.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            notify: Notify::new(label)?,
            env: Vec::new(),
        })
    }

    fn spawn_binary(binary: &Path, ns: &Netns, label: &str, args: &[&str]) -> Result<Self> {
        let mut fwd = Self::unstarted(binary, ns, label, args)?;
        fwd.child = Some(fwd.launch(ns)?);
        Ok(fwd)
    }

    fn launch(&self, ns: &Netns) -> Result<Child> {
        let stderr = File::create(&self.log)?;
        self.notify.forget();
        ns.command(self.binary.to_str().context("binary path")?)
            .arg("run")
            .args(&self.args)
            .arg("--pin-dir")
            .arg(self.pins.path())
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", &self.notify.path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .die_with_parent()
            .spawn()
            .context("spawning forwarder")
    }

    /// SIGKILL, as a crash or the OOM killer would: nothing is cleaned up,
    /// the pinned programs keep forwarding.
    pub fn kill_hard(&mut self) -> Result<()> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("{} is not running", self.label))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts the daemon again on the same pin directory and with the same
    /// arguments, after `kill_hard`; the new log replaces the old one.
    pub fn respawn(&mut self, ns: &Netns) -> Result<()> {
        if self.child.is_some() {
            bail!("{} is still running", self.label);
        }
        self.child = Some(self.launch(ns)?);
        Ok(())
    }

    /// Sets `key` in the environment of the next launches (a NOTIFY_SOCKET
    /// set here takes readiness out of the harness's hands).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.into(), value.into()));
    }

    /// As `respawn`, with other arguments from now on.
    pub fn respawn_with(&mut self, ns: &Netns, args: &[&str]) -> Result<()> {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self.respawn(ns)
    }

    /// The pin directory, as the CLI takes it.
    pub fn pin_arg(&self) -> String {
        self.pins.path().display().to_string()
    }

    /// Waits until the log holds `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        if wait_until(timeout, || self.log_text().contains(needle)) {
            return Ok(());
        }
        bail!(
            "{} never logged {needle:?}; log:\n{}",
            self.label,
            self.log_text()
        )
    }

    fn layout(&self) -> PinLayout {
        PinLayout::new(self.pins.path())
    }

    /// The daemon said it is ready, the uplink is usable and the uplink
    /// program attached to it (by TCX or clsact, as the instance recorded).
    fn ready(&self) -> bool {
        let uplink = self.uplink();
        self.notify.ready()
            && uplink.usable()
            && forwarder::datapath::recorded_attachments(&self.layout()).is_ok_and(|a| {
                a.get(&uplink.ifindex)
                    .is_some_and(|(role, _)| *role == Role::Uplink)
            })
    }

    /// The uplink as the state map holds it; the default (no uplink) when
    /// the maps cannot be read.
    pub fn uplink(&self) -> UplinkState {
        self.tables().and_then(|t| t.uplink()).unwrap_or_default()
    }

    /// Where the instance pins its `role` link on interface `ifindex`.
    pub fn link_pin(&self, role: Role, ifindex: u32) -> PathBuf {
        self.layout().link_pin(role.name(), ifindex)
    }

    /// Every link pin the instance holds, sorted.
    pub fn link_pins(&self) -> Vec<PathBuf> {
        let mut pins: Vec<PathBuf> = std::fs::read_dir(self.layout().links)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        pins.sort();
        pins
    }

    /// Relay copies sent out of the uplink, over every relay.
    pub fn relayed_up(&self) -> Result<u64> {
        let tables = self.tables()?;
        tables
            .installed_relays()?
            .values()
            .map(|r| Ok(tables.relay_counters(r.slot)?.packets_up))
            .sum()
    }

    /// The instance's maps, opened from their pins.
    pub fn tables(&self) -> Result<Tables> {
        Tables::open_pinned(&self.layout().maps)
    }

    /// How often the datapath counted `reason`.
    pub fn reason(&self, reason: Reason) -> Result<u64> {
        self.reasons(&[reason])
    }

    /// How often the datapath counted any of `reasons`.
    pub fn reasons(&self, reasons: &[Reason]) -> Result<u64> {
        let tables = self.tables()?;
        reasons.iter().map(|r| tables.reason_count(*r)).sum()
    }

    /// Rewrites and clones the kernel refused: never expected.
    pub fn failures(&self) -> Result<u64> {
        self.reasons(&[Reason::RewriteFailed, Reason::RelayCloneFailed])
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit, and check that the instance
    /// left nothing behind: no pin, no control socket.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let status = self.terminate()?;
        let pins = self.pins.contents();
        let socket = forwarder::control::socket_path(self.pins.path());
        if !pins.is_empty() || socket.exists() {
            bail!(
                "{} exited ({status}) but left pins {pins:?}{}; log:\n{}",
                self.label,
                if socket.exists() {
                    format!(" and its control socket {}", socket.display())
                } else {
                    String::new()
                },
                self.log_text()
            );
        }
        Ok(status)
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("{} already stopped", self.label))?;
        crate::child::terminate(&mut child, Duration::from_secs(10)).ok_or_else(|| {
            anyhow!(
                "{} ignored SIGTERM for 10 s; log:\n{}",
                self.label,
                self.log_text()
            )
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let stopped = if self.child.is_some() {
            self.stop().map(drop)
        } else {
            Ok(())
        };
        // A failed stop's error already quotes the log.
        let _ = std::fs::remove_file(&self.log);
        // A daemon killed by the test, or that failed its stop, leaves its
        // control socket; the pins go with the PinDir.
        let _ = std::fs::remove_file(forwarder::control::socket_path(self.pins.path()));
        if let Err(err) = stopped {
            // Every test checks the daemon cleans up; a test already failing
            // must not abort on a second panic.
            if std::thread::panicking() {
                eprintln!("cleanup: {err:#}");
            } else {
                panic!("cleanup: {err:#}");
            }
        }
    }
}

/// Runs `forwarder <args>` to completion inside `ns` (the CLI commands:
/// inspect, rules, check-config) and returns its output.
pub fn cli(ns: &Netns, args: &[&str]) -> Result<std::process::Output> {
    ns.command(binary()?.to_str().context("binary path")?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running forwarder")
}
