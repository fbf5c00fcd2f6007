//! mDNS with python-zeroconf (installed by `cargo xtask setup` under
//! target/zeroconf): an advertiser that answers for one service in a
//! namespace until dropped, a one-shot browse-and-resolve, and recognising
//! mDNS answers among captured frames.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    child,
    netns::{DieWithParent as _, Netns},
};

pub const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
pub const MDNS_PORT: u16 = 5353;

/// Registers one service bound to one interface address and answers for
/// it until killed; "registered" on stdout once probing and the first
/// announcement are done.
const ADVERTISE: &str = r#"
import socket, sys, threading
from zeroconf import IPVersion, ServiceInfo, Zeroconf
service_type, instance, address, port, host = sys.argv[1:6]
zc = Zeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
zc.register_service(ServiceInfo(service_type, f"{instance}.{service_type}",
    addresses=[socket.inet_aton(address)], port=int(port), server=host))
print("registered", flush=True)
threading.Event().wait()
"#;

/// Browses for a service type and resolves every instance it sees, until
/// the timeout or until the wanted instance (if any) is resolved; prints
/// what it resolved as JSON.
const LOOKUP: &str = r#"
import json, sys, time
from zeroconf import IPVersion, ServiceBrowser, Zeroconf
service_type, timeout, wanted = sys.argv[1], float(sys.argv[2]), sys.argv[3] or None
zc = Zeroconf(ip_version=IPVersion.V4Only)
seen = []
class Listener:
    def add_service(self, zc, type_, name): seen.append(name)
    def update_service(self, zc, type_, name): pass
    def remove_service(self, zc, type_, name): pass
browser = ServiceBrowser(zc, service_type, Listener())
found = {}
deadline = time.monotonic() + timeout
while time.monotonic() < deadline and not (wanted and wanted in found):
    for name in [n for n in seen if n not in found]:
        left = min(deadline - time.monotonic(), 1.0)
        info = zc.get_service_info(service_type, name, timeout=max(1, int(left * 1000)))
        if info:
            found[name] = {"name": name, "port": info.port,
                           "addresses": info.parsed_addresses(IPVersion.V4Only)}
    time.sleep(0.02)
print(json.dumps(list(found.values())), flush=True)
browser.cancel()
zc.close()
"#;

/// The `pip --target` directory holding python-zeroconf.
pub fn install_dir() -> Result<PathBuf> {
    crate::pip::install_dir("ZEROCONF_DIR", "zeroconf", "zeroconf")
}

/// A service as a lookup resolved it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Service {
    /// The full instance name, e.g. `LAN printer._ipp._tcp.local.`.
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    pub port: u16,
}

/// The full instance name of `instance` of `service_type`.
pub fn instance_name(instance: &str, service_type: &str) -> String {
    format!("{instance}.{service_type}")
}

/// A python-zeroconf responder for one service, killed on drop.
pub struct Advertiser {
    child: Child,
    log: PathBuf,
}

impl Advertiser {
    /// Registers `instance` of `service_type` (e.g. `_ipp._tcp.local.`) at
    /// `address`:`port` from `ns`, answering on the interface holding
    /// `address`; returns once it is registered and has announced itself.
    pub fn start(
        ns: &Netns,
        service_type: &str,
        instance: &str,
        address: Ipv4Addr,
        port: u16,
    ) -> Result<Self> {
        let host = format!("{}.local.", instance.replace(' ', "-").to_lowercase());
        let log = std::env::temp_dir().join(format!(
            "{}-mdns-{}.log",
            ns.name(),
            instance.replace(' ', "-")
        ));
        let mut child = ns
            .command("python3")
            .args(["-c", ADVERTISE, service_type, instance])
            .arg(address.to_string())
            .arg(port.to_string())
            .arg(host)
            .env("PYTHONPATH", install_dir()?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .die_with_parent()
            .spawn()
            .context("starting the mDNS advertiser")?;
        let stdout = child.stdout.take().context("advertiser stdout")?;
        // Guarded before the first read, so no error path leaves it running.
        let advertiser = Advertiser { child, log };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "registered" {
            bail!(
                "the mDNS advertiser for {instance} did not register: {}",
                std::fs::read_to_string(&advertiser.log).unwrap_or_default()
            );
        }
        Ok(advertiser)
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        child::terminate(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.log);
    }
}

fn browse(ns: &Netns, service_type: &str, wanted: &str, timeout: Duration) -> Result<Vec<Service>> {
    let out = ns
        .command("python3")
        .args(["-c", LOOKUP, service_type])
        .arg(timeout.as_secs_f64().to_string())
        .arg(wanted)
        .env("PYTHONPATH", install_dir()?)
        .stdin(Stdio::null())
        .output()
        .context("running the mDNS lookup")?;
    if !out.status.success() {
        bail!(
            "mDNS lookup of {service_type} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "mDNS lookup output {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every instance of `service_type` that `ns` can browse and resolve
/// within `timeout` (the whole timeout is spent).
pub fn lookup(ns: &Netns, service_type: &str, timeout: Duration) -> Result<Vec<Service>> {
    browse(ns, service_type, "", timeout)
}

/// `instance` of `service_type` as `ns` resolves it, returning as soon as
/// it is resolved; None when it is not within `timeout`.
pub fn find(
    ns: &Netns,
    service_type: &str,
    instance: &str,
    timeout: Duration,
) -> Result<Option<Service>> {
    let name = instance_name(instance, service_type);
    Ok(browse(ns, service_type, &name, timeout)?
        .into_iter()
        .find(|s| s.name == name))
}

/// Whether a frame is an mDNS response (QR bit set): UDP from port 5353
/// with at least a DNS header.
pub fn is_answer(frame: &[u8]) -> bool {
    crate::packet::parse(frame).is_some_and(|p| {
        p.proto == crate::packet::UDP
            && p.sport == MDNS_PORT
            && p.payload.len() >= 12
            && p.payload[2] & 0x80 != 0
    })
}

/// Whether a frame is an mDNS query (QR bit clear) to the mDNS group.
pub fn is_query(frame: &[u8]) -> bool {
    crate::packet::parse(frame).is_some_and(|p| {
        p.proto == crate::packet::UDP
            && p.daddr == MDNS_GROUP
            && p.dport == MDNS_PORT
            && p.payload.len() >= 12
            && p.payload[2] & 0x80 == 0
    })
}

/// Opens the app VM of the Qubes-like topology to mDNS: its own input
/// firewall admits datagrams to 5353 (answers come to the group, which the
/// topology's rules for its own address do not cover). Nothing in
/// sys-firewall: multicast is never routed, only relayed.
pub fn admit(t: &crate::topology::Topology) -> Result<()> {
    t.app.nft(&format!(
        "add rule ip qubes custom-input udp dport {MDNS_PORT} counter accept\n"
    ))
}
