//! The Qubes-like topology's qubes as the forwarder meets real ones: dom0's
//! `qvm-forwarder` talks to the stand-in qubesd (`QUBESD_SOCKET`), and each
//! router and the app VM runs the installed-package commands with nothing
//! but what Qubes gives a VM:
//! - its qvm-services on: `/run/qubes-service/NAME`, on a tmpfs mounted in
//!   the process's own mount namespace (`ip netns exec` gives every command
//!   one), so nothing of it is seen outside;
//! - its QubesDB, read through the stand-in `qubesdb-*` tools first on
//!   PATH, which serve what the stand-in qubesd holds for that VM;
//! - nothing under /rw.
//!
//! Also a VPN-like router to move the app behind: app -> sys-vpn -> sys-net.

use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use forwarder::qubes_vm::{INPUT_SERVICE, ROUTER_SERVICE, SERVICE_DIR};

use crate::{
    daemon::{self, Forwarder},
    netns::{DieWithParent as _, Netns},
    qubesd::{Domain, Qubesd},
    qubesdb_store,
    topology::{APP, APP2, SYSFW, SYSNET_INTERNAL, Topology, qubes_netvm_tables, vif},
    wait::wait_until,
};

/// The VPN-like router's address.
pub const SYSVPN: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 30);
/// sys-net's vif toward sys-vpn, and sys-vpn's toward the app.
const NET_TO_VPN: &str = "vif5.0";
const VPN_TO_APP: &str = "vif6.0";
/// The template every qube of the graph is based on.
const TEMPLATE: &str = "debian-12";

/// The stand-in qubesd's graph of the topology: dom0, a template that
/// announces the package, sys-net, sys-firewall behind it, the app and
/// app2 behind sys-firewall, and sys-vpn behind sys-net; all running.
pub fn graph() -> BTreeMap<String, Domain> {
    let ip = |a: Ipv4Addr| a.to_string();
    let mut g = BTreeMap::new();
    g.insert("dom0".into(), Domain::new("AdminVM").running());
    g.insert(TEMPLATE.into(), Domain::template());
    let routers = [
        ("sys-net", None, SYSNET_INTERNAL),
        ("sys-firewall", Some("sys-net"), SYSFW),
        ("sys-vpn", Some("sys-net"), SYSVPN),
    ];
    for (name, netvm, addr) in routers {
        g.insert(
            name.into(),
            Domain::router(TEMPLATE, netvm, &ip(addr)).running(),
        );
    }
    for (name, addr) in [("app", APP), ("app2", APP2)] {
        g.insert(
            name.into(),
            Domain::app(TEMPLATE, Some("sys-firewall"), Some(&ip(addr))).running(),
        );
    }
    g
}

/// `qvm-forwarder` beside the `forwarder` under test.
pub fn qvm_forwarder_binary() -> Result<PathBuf> {
    let path = daemon::binary()?.with_file_name("qvm-forwarder");
    ensure!(
        path.is_file(),
        "no {}: build it (cargo build -p forwarder-user)",
        path.display()
    );
    Ok(path)
}

/// `qvm-forwarder ARGS` as in dom0, against `q`; its output, or why it
/// failed.
pub fn qvm_forwarder(q: &Qubesd, args: &[&str]) -> Result<String> {
    let out = Command::new(qvm_forwarder_binary()?)
        .args(args)
        .env("QUBESD_SOCKET", q.socket())
        .stdin(Stdio::null())
        .output()
        .context("running qvm-forwarder")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "qvm-forwarder {args:?}: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// `qvm-forwarder watch` as in dom0, stopped on drop.
pub struct Watch {
    child: Child,
    log: PathBuf,
}

impl Watch {
    pub fn start(q: &Qubesd) -> Result<Self> {
        let log = q.qubesdb_dir().join("watch.log");
        let child = Command::new(qvm_forwarder_binary()?)
            .arg("watch")
            .env("QUBESD_SOCKET", q.socket())
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(Stdio::inherit())
            .die_with_parent()
            .spawn()
            .context("starting qvm-forwarder watch")?;
        Ok(Watch { child, log })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        crate::child::terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// One qube's view of Qubes: its services and its QubesDB tools, and a
/// program that runs `forwarder` inside that view.
pub struct QubeEnv {
    program: PathBuf,
}

impl QubeEnv {
    /// `vm` of `q`, with the qvm-services `services` on.
    pub fn new(q: &Qubesd, vm: &str, services: &[&str]) -> Result<Self> {
        let dir = q.qubesdb_dir().join(format!("qube-{vm}"));
        qubesdb_store::install_tools(&standin_binary()?, &dir, &q.qubesdb_dir(), vm)?;
        // The mount point; empty, and in /run, which does not outlive a boot.
        std::fs::create_dir_all(SERVICE_DIR)?;
        let mut script = format!(
            "#!/bin/sh\n# forwarder as in the qube {vm}\n\
             mount -t tmpfs -o size=64k,mode=0755 qubes-service {SERVICE_DIR} || exit 1\n"
        );
        for service in services {
            script += &format!(": > {SERVICE_DIR}/{service}\n");
        }
        script += &format!(
            "PATH='{}':\"$PATH\"\nexport PATH\nexec '{}' \"$@\"\n",
            dir.display(),
            std::fs::canonicalize(daemon::binary()?)?.display()
        );
        let program = dir.join("forwarder-in-qube");
        std::fs::write(&program, script)?;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))?;
        Ok(QubeEnv { program })
    }

    /// A router: the `forwarder` qvm-service on.
    pub fn router(q: &Qubesd, vm: &str) -> Result<Self> {
        Self::new(q, vm, &[ROUTER_SERVICE])
    }

    /// An exposed qube: the `forwarder-input` qvm-service on.
    pub fn exposed(q: &Qubesd, vm: &str) -> Result<Self> {
        Self::new(q, vm, &[INPUT_SERVICE])
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// `forwarder run` as the unit starts it (the harness adds only its
    /// pin directory), ready.
    pub fn start_router(&self, ns: &Netns, label: &str) -> Result<Forwarder> {
        Forwarder::start_binary(&self.program, ns, label, &[])
    }
}

/// The stand-in tools' binary: beside a test executable's deps/ directory,
/// or beside a driver such as the demo.
pub fn standin_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("qubesdb-standin"))
        .find(|c| c.is_file());
    found.context("no qubesdb-standin binary: build it (cargo build -p forwarder-tests)")
}

/// `forwarder input` in an exposed qube, stopped on drop.
pub struct InputSide {
    child: Option<Child>,
    log: PathBuf,
}

impl InputSide {
    /// Starts it in `ns` as the qube `env` describes, and waits until it
    /// has its chain in place.
    pub fn start(env: &QubeEnv, ns: &Netns, label: &str) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("{}-{label}-input.log", ns.name()));
        let child = ns
            .command(env.program().to_str().context("path")?)
            .arg("input")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .die_with_parent()
            .spawn()
            .context("starting forwarder input")?;
        let input = InputSide {
            child: Some(child),
            log,
        };
        if !wait_until(Duration::from_secs(10), || input.chain(ns).is_ok()) {
            bail!(
                "forwarder input never made its chain; log:\n{}",
                input.log()
            );
        }
        Ok(input)
    }

    /// Its chain as nft lists it.
    pub fn chain(&self, ns: &Netns) -> Result<String> {
        ns.sh("nft list chain ip qubes forwarder-input")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; it must exit cleanly and leave neither its chain nor the
    /// jump to it.
    pub fn stop(&mut self, ns: &Netns) -> Result<()> {
        let mut child = self.child.take().context("already stopped")?;
        let status = crate::child::terminate(&mut child, Duration::from_secs(10))
            .with_context(|| format!("forwarder input ignored SIGTERM; log:\n{}", self.log()))?;
        ensure!(status.success(), "{status}; log:\n{}", self.log());
        let custom = ns.sh("nft list chain ip qubes custom-input")?;
        ensure!(
            !custom.contains("forwarder-input") && self.chain(ns).is_err(),
            "left behind:\n{custom}"
        );
        Ok(())
    }
}

impl Drop for InputSide {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::child::terminate(&mut child, Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// sys-vpn: a router behind sys-net (vif5.0 there, eth0 here) with Qubes'
/// netvm tables, ready to take the app.
pub fn add_vpn(t: &Topology) -> Result<Netns> {
    let vpn = Netns::new("sysvpn")?;
    vif(&t.sysnet, &vpn, NET_TO_VPN, SYSNET_INTERNAL, SYSVPN)?;
    t.sysnet.nft(&format!(
        "add element ip qubes downstream {{ {SYSVPN} }}\n\
         add element ip qubes allowed {{ \"{NET_TO_VPN}\" . {SYSVPN} }}\n"
    ))?;
    vpn.sysctl("net.ipv4.ip_forward=1")?;
    vpn.nft(&qubes_netvm_tables(&[(VPN_TO_APP, APP)]))?;
    Ok(vpn)
}

/// What Qubes does to a running qube whose netvm changes: its vif goes
/// from sys-firewall, and a new one comes in sys-vpn, same address.
pub fn move_app_behind_vpn(t: &Topology, vpn: &Netns) -> Result<()> {
    t.sysfw.ip("link del vif3.0")?;
    vif(vpn, &t.app, VPN_TO_APP, SYSVPN, APP)
}
