//! KDE Connect: the real daemon (Debian's kdeconnectd, headless) in a
//! namespace, and an emulation of its discovery protocol for exact,
//! one-directional checks.
//!
//! Discovery: a device broadcasts one identity packet (a line of JSON, about
//! 2.2 KB with its capability lists, so IP-fragmented on a 1500-byte MTU) to
//! 255.255.255.255:1716 when it starts. A device that receives one connects
//! by TCP to the datagram's source address, on the `tcpPort` the identity
//! names (1714-1764), sends its own identity line, and the two then speak
//! TLS, the connecting side as the TLS server.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    ops::RangeInclusive,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    child,
    netns::{DieWithParent as _, Netns, run},
    sockets::{Recorder, UdpRecorder},
    wait::wait_until,
};

/// Where identities are broadcast, and the first TCP port a daemon tries.
pub const UDP_PORT: u16 = 1716;
/// TCP (and UDP) ports a device may listen on: 1716-1764 for links, 1739
/// and up for file payloads; 1714 and 1715 are reserved for it too.
pub const PORTS: RangeInclusive<u16> = 1714..=1764;

/// The packet types a desktop device lists (both ways) in its identity:
/// what makes the identity as big as a real one.
const CAPABILITIES: &[&str] = &[
    "kdeconnect.battery",
    "kdeconnect.battery.request",
    "kdeconnect.bigscreen.stt",
    "kdeconnect.clipboard",
    "kdeconnect.clipboard.connect",
    "kdeconnect.connectivity_report",
    "kdeconnect.contacts.response_uids_timestamps",
    "kdeconnect.contacts.response_vcards",
    "kdeconnect.findmyphone.request",
    "kdeconnect.lock",
    "kdeconnect.lock.request",
    "kdeconnect.mousepad.echo",
    "kdeconnect.mousepad.keyboardstate",
    "kdeconnect.mousepad.request",
    "kdeconnect.mpris",
    "kdeconnect.mpris.request",
    "kdeconnect.notification",
    "kdeconnect.notification.request",
    "kdeconnect.photo",
    "kdeconnect.ping",
    "kdeconnect.presenter",
    "kdeconnect.runcommand",
    "kdeconnect.runcommand.request",
    "kdeconnect.sftp",
    "kdeconnect.share.request",
    "kdeconnect.sms.attachment_file",
    "kdeconnect.sms.messages",
    "kdeconnect.systemvolume",
    "kdeconnect.systemvolume.request",
    "kdeconnect.telephony",
    "kdeconnect.virtualmonitor",
    "kdeconnect.virtualmonitor.request",
];

/// An identity packet as a desktop KDE Connect (protocol 7, as Debian 12's
/// 22.12) broadcasts it: one line of JSON with sorted keys, so it starts
/// with the device ID (see `identity_prefix`). `device_id` must be 32 to 38
/// characters of `[A-Za-z0-9_-]`, or receivers ignore the packet.
pub fn identity_packet(device_id: &str, name: &str, tcp_port: u16) -> Vec<u8> {
    let packet = serde_json::json!({
        "id": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
        "type": "kdeconnect.identity",
        "body": {
            "deviceId": device_id,
            "deviceName": name,
            "deviceType": "desktop",
            "protocolVersion": 7,
            "tcpPort": tcp_port,
            "incomingCapabilities": CAPABILITIES,
            "outgoingCapabilities": CAPABILITIES,
        },
    });
    let mut bytes = serde_json::to_vec(&packet).expect("a JSON value serialises");
    bytes.push(b'\n');
    bytes
}

/// How every identity of `device_id` starts, from this emulation and from
/// the real daemon alike (both write their keys sorted).
pub fn identity_prefix(device_id: &str) -> String {
    format!("{{\"body\":{{\"deviceId\":\"{device_id}\"")
}

/// Broadcasts `packet` once from `ns` to 255.255.255.255:1716, from an
/// ephemeral port as Android and newer desktops do.
pub fn broadcast(ns: &Netns, packet: &[u8]) -> Result<()> {
    ns.run(|| -> Result<()> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_broadcast(true)?;
        let sent = socket.send_to(packet, (Ipv4Addr::BROADCAST, UDP_PORT))?;
        if sent != packet.len() {
            bail!("sent {sent} of {} bytes", packet.len());
        }
        Ok(())
    })
}

/// Records the identity datagrams that reach UDP 1716 of a namespace (as a
/// daemon's socket would, bound to 0.0.0.0).
pub struct IdentityListener {
    recorder: UdpRecorder,
}

impl IdentityListener {
    pub fn start(ns: &Netns) -> Result<Self> {
        Ok(IdentityListener {
            recorder: UdpRecorder::start(ns, UDP_PORT)?,
        })
    }

    /// The source of the first identity of `device_id` received, waiting up
    /// to `timeout` for one.
    pub fn wait_for(&self, device_id: &str, timeout: Duration) -> Option<SocketAddr> {
        self.recorder.wait_for(&identity_prefix(device_id), timeout)
    }
}

/// A TCP listener on a KDE Connect port, standing for the device that
/// broadcast an identity naming that port: records who connects back and
/// the identity line they send first.
pub struct ConnectBack {
    accepted: Recorder<(SocketAddr, String)>,
}

impl ConnectBack {
    pub fn listen(ns: &Netns, port: u16) -> Result<Self> {
        let listener = ns.run(|| -> Result<TcpListener> {
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .with_context(|| format!("binding TCP {port}"))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?;
        let accepted = Recorder::start(move || {
            let Ok((conn, peer)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                return None;
            };
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let _ = BufReader::new(conn).read_line(&mut line);
            Some((peer, line))
        });
        Ok(ConnectBack { accepted })
    }

    /// The first connection whose identity line names `device_id`: the
    /// peer address it came from.
    pub fn wait_for(&self, device_id: &str, timeout: Duration) -> Option<SocketAddr> {
        let prefix = identity_prefix(device_id);
        self.accepted.wait_for(timeout, |(peer, line)| {
            line.starts_with(&prefix).then_some(*peer)
        })
    }

    /// Everyone who connected so far, with the start of what they sent.
    pub fn accepted(&self) -> Vec<(SocketAddr, String)> {
        self.accepted.all()
    }
}

/// Connects from `ns` to a device at `to` as a device that heard its
/// identity would: sends `identity`, then expects the device to start TLS
/// (a handshake record, first byte 0x16) as the TLS client.
pub fn connect_back(
    ns: &Netns,
    to: SocketAddrV4,
    identity: &[u8],
    timeout: Duration,
) -> Result<()> {
    ns.run(|| {
        let mut conn = TcpStream::connect_timeout(&to.into(), timeout)
            .with_context(|| format!("connecting to {to}"))?;
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(identity)?;
        let mut first = [0u8; 1];
        conn.read_exact(&mut first)
            .with_context(|| format!("nothing back from {to}"))?;
        if first[0] != 0x16 {
            bail!("{to} answered {:#04x}, not a TLS handshake", first[0]);
        }
        Ok(())
    })
}

/// The daemon binary, under the multiarch libexec directory.
fn daemon_binary() -> Result<PathBuf> {
    std::fs::read_dir("/usr/lib")?
        .flatten()
        .map(|e| e.path().join("libexec/kdeconnectd"))
        .find(|p| p.is_file())
        .context(
            "no /usr/lib/*/libexec/kdeconnectd: install Debian's kdeconnect (cargo xtask setup)",
        )
}

/// A real kdeconnectd in a namespace, headless (Qt's offscreen platform),
/// on a session bus of its own, with its own home, keys and device name.
pub struct Daemon {
    pub name: String,
    /// Its device ID (generated on first start, with its key).
    pub id: String,
    dir: PathBuf,
    bus: Option<Child>,
    daemon: Option<Child>,
}

impl Daemon {
    /// Starts a bus and the daemon in `ns`, named `name`; returns once the
    /// daemon answers on the bus (its identity broadcast goes out then).
    pub fn start(ns: &Netns, name: &str) -> Result<Self> {
        let binary = daemon_binary()?;
        let dir = std::env::temp_dir().join(format!("{}-kdeconnect-{name}", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = dir.join("config/kdeconnect");
        std::fs::create_dir_all(&config)?;
        std::fs::write(config.join("config"), format!("[General]\nname={name}\n"))?;
        let runtime = dir.join("run");
        std::fs::create_dir_all(&runtime)?;
        // Qt refuses an XDG_RUNTIME_DIR others may read.
        std::fs::set_permissions(
            &runtime,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let mut d = Daemon {
            name: name.into(),
            id: String::new(),
            dir,
            bus: None,
            daemon: None,
        };
        // A bus socket on a path (not dbus-run-session's abstract one, which
        // belongs to a network namespace) so dbus-send reaches it from here.
        d.bus = Some(
            ns.command("dbus-daemon")
                .args(["--session", "--nofork", "--nopidfile"])
                .arg(format!("--address=unix:path={}", d.bus_path().display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.dir.join("dbus.log"))?)
                .die_with_parent()
                .spawn()
                .context("starting dbus-daemon (cargo xtask setup installs it)")?,
        );
        if !wait_until(Duration::from_secs(5), || d.bus_path().exists()) {
            bail!("dbus-daemon made no socket at {}", d.bus_path().display());
        }
        let log = std::fs::File::create(d.log_path())?;
        d.daemon = Some(
            ns.command(binary.to_str().context("daemon path")?)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("HOME", &d.dir)
                .env("XDG_CONFIG_HOME", d.dir.join("config"))
                .env("XDG_DATA_HOME", d.dir.join("data"))
                .env("XDG_CACHE_HOME", d.dir.join("cache"))
                .env("XDG_RUNTIME_DIR", &runtime)
                .env("QT_QPA_PLATFORM", "offscreen")
                .env("QT_LOGGING_RULES", "kdeconnect.*=true")
                .env("DBUS_SESSION_BUS_ADDRESS", d.bus_address())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .die_with_parent()
                .spawn()
                .context("starting kdeconnectd")?,
        );
        let mut id = None;
        wait_until(Duration::from_secs(20), || {
            id = d
                .call("selfId", &[])
                .ok()
                .and_then(|out| strings(&out).into_iter().next());
            id.is_some()
        });
        d.id =
            id.with_context(|| format!("kdeconnectd {name} never answered; log:\n{}", d.log()))?;
        Ok(d)
    }

    fn bus_path(&self) -> PathBuf {
        self.dir.join("bus")
    }

    fn bus_address(&self) -> String {
        format!("unix:path={}", self.bus_path().display())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("kdeconnectd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A method of the daemon's D-Bus interface, through dbus-send.
    fn call(&self, method: &str, args: &[&str]) -> Result<String> {
        run(Command::new("dbus-send")
            .arg(format!("--bus={}", self.bus_address()))
            .args([
                "--print-reply",
                "--reply-timeout=2000",
                "--dest=org.kde.kdeconnect",
                "/modules/kdeconnect",
            ])
            .arg(format!("org.kde.kdeconnect.daemon.{method}"))
            .args(args))
    }

    /// The devices it can reach now (linked over TLS, paired or not), as
    /// (device ID, name).
    pub fn reachable(&self) -> Result<Vec<(String, String)>> {
        let out = self.call("deviceNames", &["boolean:true", "boolean:false"])?;
        let strings = strings(&out);
        Ok(strings
            .chunks(2)
            .filter_map(|pair| match pair {
                [id, name] => Some((id.clone(), name.clone())),
                _ => None,
            })
            .collect())
    }

    /// Waits until a device called `name` is reachable; returns how long
    /// that took.
    pub fn wait_sees(&self, name: &str, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        if wait_until(timeout, || {
            self.reachable()
                .is_ok_and(|devices| devices.iter().any(|(_, n)| n == name))
        }) {
            return Ok(started.elapsed());
        }
        bail!(
            "{} did not see {name} within {timeout:?} (sees {:?}); log:\n{}",
            self.name,
            self.reachable().ok(),
            self.log()
        )
    }
}

/// The quoted strings of dbus-send's reply, in order.
fn strings(reply: &str) -> Vec<String> {
    reply
        .lines()
        .filter_map(|l| l.trim().strip_prefix("string \""))
        .map(|s| s.trim_end_matches('"').to_string())
        .collect()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The daemon first: it talks to the bus while it shuts down.
        for child in [self.daemon.as_mut(), self.bus.as_mut()]
            .into_iter()
            .flatten()
        {
            child::terminate(child, Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens the app VM of the Qubes-like topology to KDE Connect, as its user
/// would: its own input firewall admits identities (to the broadcast
/// address) and the whole port range over TCP and UDP; its qvm-firewall
/// allow-list in sys-firewall lets it dial the LAN peer's range (inserted
/// before the chain's final drop).
pub fn admit(t: &crate::topology::Topology) -> Result<()> {
    use crate::topology::{APP, LAN_PEER};
    let (first, last) = (PORTS.start(), PORTS.end());
    t.app.nft(&format!(
        "add rule ip qubes custom-input udp dport {first}-{last} counter accept\n\
         add rule ip qubes custom-input tcp dport {first}-{last} counter accept\n"
    ))?;
    let chain = crate::topology::qbs_chain(APP);
    t.sysfw.nft(&format!(
        "insert rule ip qubes-firewall {chain} ip daddr {LAN_PEER} tcp dport {first}-{last} accept\n\
         insert rule ip qubes-firewall {chain} ip daddr {LAN_PEER} udp dport {first}-{last} accept\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_one_json_line_as_large_as_a_real_one() {
        let id = "_forwarder_test_0123456789abcdef_";
        let packet = identity_packet(id, "lan phone", 1716);
        assert!(packet.starts_with(identity_prefix(id).as_bytes()));
        assert_eq!(packet.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(packet.ends_with(b"\n"));
        // Over 1472 bytes of UDP payload: two fragments on a 1500-byte MTU.
        assert!(packet.len() > 1472, "{} bytes", packet.len());
        let json: serde_json::Value = serde_json::from_slice(&packet).unwrap();
        assert_eq!(json["body"]["tcpPort"], 1716);
        assert_eq!(json["type"], "kdeconnect.identity");
    }

    #[test]
    fn dbus_send_strings() {
        let reply = "method return time=1 sender=:1.0\n   array [\n      dict entry(\n         string \"_abc_\"\n         string \"lan phone\"\n      )\n   ]\n";
        assert_eq!(strings(reply), vec!["_abc_", "lan phone"]);
    }
}
