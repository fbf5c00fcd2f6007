//! Real Syncthing instances (Debian's package) in a namespace, each with its
//! own home under a temp dir, sharing one folder with one other device whose
//! address is "dynamic": it is found by local discovery only. Global
//! discovery, relays and NAT traversal are off, so the only way two
//! instances meet is the LAN beacon (UDP 21027) and a dial to TCP/QUIC 22000.
//! Driven through the REST API on 127.0.0.1 of the instance's namespace.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    child,
    netns::{DieWithParent as _, Netns, run},
    wait::wait_until,
};

/// Where Syncthing listens for peers (TCP and QUIC).
pub const SYNC_PORT: u16 = 22000;
/// Where its local discovery beacons go (to the subnet's broadcast address).
pub const DISCOVERY_PORT: u16 = 21027;
/// The one folder the instances share.
pub const FOLDER_ID: &str = "shared";
const GUI: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8384);

pub struct Syncthing<'a> {
    ns: &'a Netns,
    pub name: String,
    /// The device ID, from the generated certificate.
    pub id: String,
    dir: PathBuf,
    api_key: String,
    child: Option<Child>,
}

impl<'a> Syncthing<'a> {
    /// Generates a key, certificate and device ID under a fresh directory;
    /// the instance is not running yet.
    pub fn generate(ns: &'a Netns, name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-syncthing-{name}", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("folder"))?;
        let mut st = Syncthing {
            ns,
            name: name.into(),
            id: String::new(),
            api_key: format!("forwarder-test-{name}"),
            dir,
            child: None,
        };
        run(Command::new("syncthing")
            .args(["generate", "--no-default-folder", "--skip-port-probing"])
            .arg(format!("--home={}", st.home().display()))
            .env("HOME", &st.dir))
        .context("syncthing generate (is Debian's syncthing installed? cargo xtask setup)")?;
        st.id = run(Command::new("syncthing")
            .args(["serve", "--device-id"])
            .arg(format!("--home={}", st.home().display())))?
        .trim()
        .to_string();
        if st.id.len() != 63 {
            bail!("unexpected device ID {:?}", st.id);
        }
        Ok(st)
    }

    fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    /// The shared folder's directory.
    pub fn folder(&self) -> PathBuf {
        self.dir.join("folder")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("syncthing.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The whole configuration: generated anew (not an edit of the default
    /// one) so every setting the tests rely on is stated here. The folder is
    /// scanned on request, not watched, so a sync starts when a test says.
    fn config(&self, peer_id: &str, peer_name: &str) -> String {
        let (me, name, folder, key) = (&self.id, &self.name, self.folder(), &self.api_key);
        format!(
            r#"<configuration version="36">
    <folder id="{FOLDER_ID}" label="{FOLDER_ID}" path="{folder}" type="sendreceive" rescanIntervalS="3600" fsWatcherEnabled="false">
        <device id="{me}"></device>
        <device id="{peer_id}"></device>
    </folder>
    <device id="{me}" name="{name}"><address>dynamic</address></device>
    <device id="{peer_id}" name="{peer_name}"><address>dynamic</address></device>
    <gui enabled="true" tls="false"><address>{GUI}</address><apikey>{key}</apikey></gui>
    <options>
        <listenAddress>tcp://0.0.0.0:{SYNC_PORT}</listenAddress>
        <listenAddress>quic://0.0.0.0:{SYNC_PORT}</listenAddress>
        <localAnnounceEnabled>true</localAnnounceEnabled>
        <localAnnouncePort>{DISCOVERY_PORT}</localAnnouncePort>
        <globalAnnounceEnabled>false</globalAnnounceEnabled>
        <relaysEnabled>false</relaysEnabled>
        <natEnabled>false</natEnabled>
        <startBrowser>false</startBrowser>
        <urAccepted>-1</urAccepted>
        <autoUpgradeIntervalH>0</autoUpgradeIntervalH>
        <crashReportingEnabled>false</crashReportingEnabled>
    </options>
</configuration>
"#,
            folder = folder.display(),
        )
    }

    /// Writes the configuration (one shared folder, `peer` as the other
    /// device, address dynamic) and starts `syncthing serve` in the
    /// namespace; returns once the REST API answers.
    pub fn start(&mut self, peer: &Syncthing) -> Result<()> {
        if self.child.is_some() {
            bail!("syncthing {} is already running", self.name);
        }
        std::fs::write(
            self.home().join("config.xml"),
            self.config(&peer.id, &peer.name),
        )?;
        let log = std::fs::File::create(self.log_path())?;
        let child = self
            .ns
            .command("syncthing")
            .args(["serve", "--no-browser", "--no-restart", "--no-upgrade"])
            .arg(format!("--home={}", self.home().display()))
            .env("HOME", &self.dir)
            // Debian's 1.19 forks a monitor process even with --no-restart;
            // this tells it that it already is the monitored child, so the
            // process we hold is Syncthing itself and nothing else runs.
            .env("STMONITORED", "yes")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .die_with_parent()
            .spawn()
            .context("starting syncthing")?;
        self.child = Some(child);
        if !wait_until(Duration::from_secs(20), || {
            self.get("/rest/system/ping").is_ok()
        }) {
            bail!(
                "syncthing {} never answered on {GUI}; log:\n{}",
                self.name,
                self.log()
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 10 s; the instance's files stay.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child::terminate(&mut child, Duration::from_secs(10)).is_none() {
            bail!("syncthing {} ignored SIGTERM for 10 s", self.name);
        }
        Ok(())
    }

    fn request(&self, method: &str, path: &str) -> Result<serde_json::Value> {
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: {GUI}\r\nX-API-Key: {}\r\nContent-Length: 0\r\n\r\n",
            self.api_key
        );
        let response = self.ns.run(|| -> Result<Vec<u8>> {
            let mut conn = TcpStream::connect_timeout(&GUI.into(), Duration::from_secs(1))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(request.as_bytes())?;
            let mut out = Vec::new();
            conn.read_to_end(&mut out)?;
            Ok(out)
        })?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!(
                "{method} {path}: {}",
                head.lines().next().unwrap_or_default()
            );
        }
        if body.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(body).with_context(|| format!("{method} {path}: {body:?}"))
    }

    fn get(&self, path: &str) -> Result<serde_json::Value> {
        self.request("GET", path)
    }

    /// The address `peer` is connected from or to, if connected.
    pub fn connection(&self, peer: &Syncthing) -> Result<Option<String>> {
        let all = self.get("/rest/system/connections")?;
        let conn = &all["connections"][&peer.id];
        Ok(conn["connected"]
            .as_bool()
            .unwrap_or(false)
            .then(|| conn["address"].as_str().unwrap_or_default().to_string()))
    }

    /// Waits until connected to `peer`; returns the peer's address as this
    /// instance sees it.
    pub fn wait_connected(&self, peer: &Syncthing, timeout: Duration) -> Result<String> {
        let mut address = None;
        wait_until(timeout, || {
            address = self.connection(peer).ok().flatten();
            address.is_some()
        });
        address.with_context(|| {
            format!(
                "{} not connected to {} within {timeout:?}; log:\n{}",
                self.name,
                peer.name,
                self.log()
            )
        })
    }

    /// Writes `name` into the shared folder and has the folder scanned now.
    pub fn put(&self, name: &str, content: &[u8]) -> Result<()> {
        std::fs::write(self.folder().join(name), content)?;
        self.request("POST", &format!("/rest/db/scan?folder={FOLDER_ID}"))
            .map(drop)
    }

    /// Waits until `name` is in the shared folder with `content` (Syncthing
    /// writes a temporary file and renames it, so a complete name is a
    /// complete file); returns how long that took.
    pub fn wait_synced(&self, name: &str, content: &[u8], timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let path = self.folder().join(name);
        if wait_until(timeout, || {
            std::fs::read(&path).is_ok_and(|got| got == content)
        }) {
            return Ok(started.elapsed());
        }
        bail!(
            "{name} did not reach {} within {timeout:?} (present: {}); log:\n{}",
            self.name,
            path.exists(),
            self.log()
        )
    }
}

impl Drop for Syncthing<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("cleanup: {err:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// File content that differs with `seed`, so a file from the wrong peer
/// or a truncated one fails the comparison.
fn content(seed: u32, len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(seed) >> 3) as u8)
        .collect()
}

/// How long one file took to sync each way over one connection, from its
/// scan at the sender to its last byte at the receiver.
pub struct BothWays {
    pub there: Duration,
    pub back: Duration,
}

/// Between two connected instances: `sizes.0` bytes from `first` to
/// `second`, then `sizes.1` bytes back.
pub fn sync_both_ways(
    first: &Syncthing,
    second: &Syncthing,
    sizes: (u32, u32),
    timeout: Duration,
) -> Result<BothWays> {
    let one_way = |from: &Syncthing, to: &Syncthing, seed, len| {
        let name = format!("from-{}.bin", from.name);
        let bytes = content(seed, len);
        from.put(&name, &bytes)?;
        to.wait_synced(&name, &bytes, timeout)
    };
    Ok(BothWays {
        there: one_way(first, second, 5, sizes.0)?,
        back: one_way(second, first, 11, sizes.1)?,
    })
}

/// Opens the app VM of the Qubes-like topology to Syncthing, as its user
/// would: its own input firewall admits beacons (to the broadcast address,
/// which the topology's rules for its own address do not cover) and
/// connections to 22000 over TCP and QUIC; its qvm-firewall allow-list in
/// sys-firewall lets it dial the LAN peer's 22000 (inserted before the
/// chain's final drop).
pub fn admit(t: &crate::topology::Topology) -> Result<()> {
    use crate::topology::{APP, LAN_PEER};
    t.app.nft(&format!(
        "add rule ip qubes custom-input udp dport {DISCOVERY_PORT} counter accept\n\
         add rule ip qubes custom-input tcp dport {SYNC_PORT} counter accept\n\
         add rule ip qubes custom-input udp dport {SYNC_PORT} counter accept\n"
    ))?;
    let chain = crate::topology::qbs_chain(APP);
    t.sysfw.nft(&format!(
        "insert rule ip qubes-firewall {chain} ip daddr {LAN_PEER} tcp dport {SYNC_PORT} accept\n\
         insert rule ip qubes-firewall {chain} ip daddr {LAN_PEER} udp dport {SYNC_PORT} accept\n"
    ))
}
