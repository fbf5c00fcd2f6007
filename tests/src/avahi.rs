//! Debian's avahi-daemon in a namespace, as a VM runs it, without D-Bus:
//! its own configuration, static services and static hosts under a temp
//! dir, bind-mounted over /etc/avahi/services and /etc/avahi/hosts (the
//! daemon has no option for either) in a private mount namespace whose /run
//! is its own, so its pid file and socket meet no other instance. It runs
//! as root, unchrooted, and logs to a file the tests wait on.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    child,
    netns::{DieWithParent as _, Netns},
    wait::wait_until,
};

/// How long avahi may take to probe and announce a name (RFC 6762: three
/// probes 250 ms apart, after a random delay of up to 250 ms; more when a
/// name must be probed again).
const ESTABLISH: Duration = Duration::from_secs(10);

/// A static service (a services/*.service file).
pub struct Service<'a> {
    pub name: &'a str,
    /// E.g. `_http._tcp`.
    pub kind: &'a str,
    pub port: u16,
    pub txt: &'a [&'a str],
}

/// What the daemon publishes on `interface`: the interface's addresses under
/// `host_name`.local, the workstation service, `services`, and `hosts`
/// (name and address pairs of /etc/avahi/hosts, published on every
/// interface).
pub struct Config<'a> {
    pub host_name: &'a str,
    pub interface: &'a str,
    pub services: &'a [Service<'a>],
    pub hosts: &'a [(&'a str, Ipv4Addr)],
}

pub struct Avahi {
    child: Child,
    dir: PathBuf,
}

impl Avahi {
    /// Starts avahi-daemon in `ns` and waits until it has established its
    /// host name, every service and every static host.
    pub fn start(ns: &Netns, config: &Config<'_>) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-avahi", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("services"))?;
        std::fs::write(dir.join("avahi-daemon.conf"), daemon_conf(config))?;
        for (i, service) in config.services.iter().enumerate() {
            std::fs::write(
                dir.join("services").join(format!("{i}.service")),
                service_file(service),
            )?;
        }
        std::fs::write(dir.join("hosts"), hosts_file(config.hosts))?;
        let script = format!(
            "mount -t tmpfs none /run && mkdir /run/avahi-daemon \
             && mount --bind {dir}/services /etc/avahi/services \
             && mount --bind {dir}/hosts /etc/avahi/hosts \
             && exec avahi-daemon -f {dir}/avahi-daemon.conf --no-drop-root --no-chroot --no-rlimits --no-proc-title",
            dir = dir.display()
        );
        if !std::path::Path::new("/usr/sbin/avahi-daemon").exists() {
            bail!("avahi-daemon is not installed: run `cargo xtask setup`");
        }
        // `ip netns exec`, unshare and sh each exec the next: the child's
        // PID is the daemon's.
        let child = ns
            .command("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log"))?)
            .die_with_parent()
            .spawn()
            .context("starting avahi-daemon")?;
        let mut avahi = Avahi { child, dir };
        avahi.wait_log("Server startup complete.", 1)?;
        for (i, service) in config.services.iter().enumerate() {
            avahi.wait_log(
                &format!(
                    "Service \"{}\" (/etc/avahi/services/{i}.service) successfully established",
                    service.name
                ),
                1,
            )?;
        }
        for (name, _) in config.hosts {
            avahi.wait_log(
                &format!("Static host name \"{name}\" successfully established"),
                1,
            )?;
        }
        Ok(avahi)
    }

    /// Replaces the static hosts and makes the daemon reload them (SIGHUP,
    /// as `avahi-daemon -r` sends); returns once each new one is
    /// established.
    pub fn set_hosts(&mut self, hosts: &[(&str, Ipv4Addr)]) -> Result<()> {
        let established =
            |name: &str| format!("Static host name \"{name}\" successfully established");
        let before: Vec<usize> = hosts
            .iter()
            .map(|(name, _)| self.log().matches(&established(name)).count())
            .collect();
        // Written in place: the bind mount holds this very file.
        std::fs::write(self.dir.join("hosts"), hosts_file(hosts))?;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        for ((name, _), seen) in hosts.iter().zip(before) {
            self.wait_log(&established(name), seen + 1)?;
        }
        Ok(())
    }

    /// Waits until the log holds `needle` `count` times; fails early if
    /// the daemon exits.
    fn wait_log(&mut self, needle: &str, count: usize) -> Result<()> {
        let mut exited = None;
        let found = wait_until(ESTABLISH, || {
            exited = self.child.try_wait().ok().flatten();
            exited.is_some() || self.log().matches(needle).count() >= count
        });
        if let Some(status) = exited {
            bail!("avahi-daemon exited ({status}):\n{}", self.log());
        }
        if !found {
            bail!(
                "avahi-daemon did not log {needle:?} within {ESTABLISH:?}:\n{}",
                self.log()
            );
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// SIGTERM, which makes the daemon send its goodbyes (answers with TTL
    /// 0) before it exits; waits for the exit.
    pub fn stop(&mut self) -> Result<()> {
        match child::terminate(&mut self.child, Duration::from_secs(5)) {
            Some(_) => Ok(()),
            None => bail!("avahi-daemon ignored SIGTERM:\n{}", self.log()),
        }
    }
}

impl Drop for Avahi {
    fn drop(&mut self) {
        child::terminate(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// IPv4 only, no D-Bus, no wide-area DNS-SD, one interface; the VM's
/// addresses and the workstation service published.
fn daemon_conf(config: &Config<'_>) -> String {
    format!(
        "[server]
host-name={host}
domain-name=local
use-ipv4=yes
use-ipv6=no
enable-dbus=no
allow-interfaces={interface}
[wide-area]
enable-wide-area=no
[publish]
publish-addresses=yes
publish-workstation=yes
publish-hinfo=no
publish-domain=no
publish-aaaa-on-ipv4=no
publish-a-on-ipv6=no
[reflector]
enable-reflector=no
[rlimits]
",
        host = config.host_name,
        interface = config.interface,
    )
}

fn service_file(service: &Service<'_>) -> String {
    let mut txt = String::new();
    for record in service.txt {
        let _ = writeln!(txt, "    <txt-record>{record}</txt-record>");
    }
    format!(
        "<?xml version=\"1.0\" standalone='no'?>
<!DOCTYPE service-group SYSTEM \"avahi-service.dtd\">
<service-group>
  <name>{name}</name>
  <service>
    <type>{kind}</type>
    <port>{port}</port>
{txt}  </service>
</service-group>
",
        name = service.name,
        kind = service.kind,
        port = service.port,
    )
}

fn hosts_file(hosts: &[(&str, Ipv4Addr)]) -> String {
    hosts
        .iter()
        .map(|(name, addr)| format!("{addr} {name}\n"))
        .collect()
}
