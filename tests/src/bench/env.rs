//! The contenders' networks. Each is built fresh and removed on drop.

use std::{fmt::Write as _, net::SocketAddrV4};

use anyhow::Result;

use crate::{
    daemon::{Forwarder, Router},
    netns::Netns,
    topology::*,
};

/// First listen port of the rule-scaling configurations; the benchmark's
/// packets go to the last rule's port, the worst case for a linear scan.
pub const SCALE_BASE_PORT: u16 = 20000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// The seed's recipe: nftables DNAT in both routers (plus its dup and
    /// dispatcher emulation), Qubes' tables.
    SeedRecipe,
    /// The forwarder in both routers with `--localsend`, Qubes' tables.
    Forwarder,
    /// Both routers, no netfilter rules at all, packets addressed straight
    /// to the app: the kernel's own forwarding cost. The app keeps its own
    /// firewall, as it does behind the other contenders.
    PlainRouting,
    /// The LAN peer's veth straight into the app: sender and receiver cost.
    BareVeth,
    /// The forwarder with this many UDP forward rules in each router.
    ForwarderRules(usize),
    /// nftables with one DNAT and one accept rule per port, as the seed
    /// writes them, this many ports in each router.
    NftPerPort(usize),
    /// nftables with a DNAT map and an accept verdict map, this many ports.
    NftMaps(usize),
    /// The forwarder with a flow table of 131,072 entries, this many of
    /// them live flows (of other peers) besides the measured one.
    ForwarderFlows(usize),
}

impl Setup {
    pub fn label(&self) -> String {
        match self {
            Setup::SeedRecipe => "nftables recipe".into(),
            Setup::Forwarder => "forwarder".into(),
            Setup::PlainRouting => "plain routing".into(),
            Setup::BareVeth => "bare veth".into(),
            Setup::ForwarderRules(n) => format!("forwarder, {n} rules"),
            Setup::NftPerPort(n) => format!("nftables per-port rules, {n}"),
            Setup::NftMaps(n) => format!("nftables maps, {n}"),
            Setup::ForwarderFlows(n) => format!("forwarder, {n} live flows"),
        }
    }
}

enum Net {
    Qubes(Topology),
    Bare { lan: Netns, app: Netns },
}

/// A contender ready for traffic: where the LAN peer sends and with which
/// MACs, and the processes and tables that make it work.
pub struct Env {
    pub setup: Setup,
    /// What the LAN peer addresses.
    pub dst: SocketAddrV4,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub forwarders: Vec<Forwarder>,
    _recipe: Option<SeedRecipe>,
    net: Net,
}

fn mac(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    Ok(ns.link(dev)?.mac)
}

/// Per-router (name, uplink, next target) of the Qubes topology.
fn routers(t: &Topology) -> [(&Netns, &'static str, std::net::Ipv4Addr); 2] {
    [
        (&t.sysnet, SYSNET_UPLINK, SYSFW),
        (&t.sysfw, SYSFW_UPLINK, APP),
    ]
}

/// `rules` one-port rules, plus KDE Connect's 51-port range: ranges are
/// map entries like any port, and must not slow the lookup.
fn forwarder_config(uplink: &str, target: std::net::Ipv4Addr, rules: usize) -> String {
    let mut text =
        format!("uplink = \"{uplink}\"\n[[forward]]\nspec = \"udp:1714-1764={target}\"\n");
    for i in 0..rules {
        let port = SCALE_BASE_PORT as usize + i;
        let _ = write!(text, "[[forward]]\nspec = \"udp:{port}={target}\"\n");
    }
    text
}

/// `n` live UDP flows of the LocalSend rule, from peers in 198.18.0.0/15
/// (never the benchmark's own), as if they had just been answered.
fn plant_flows(fwd: &Forwarder, n: usize) -> Result<()> {
    use forwarder_common::{
        flow::FLOW_REPLIED,
        maps::{FlowEntry, FlowKey, PROTO_UDP},
    };
    let mut tables = fwd.tables()?;
    let rule_id = tables.installed()?[&(PROTO_UDP, LOCALSEND_PORT)].1.id;
    let now = forwarder::clock::boot_ns();
    for i in 0..n as u32 {
        let key = FlowKey {
            peer_addr: u32::from_ne_bytes([
                198,
                18 + (i >> 24) as u8,
                (i >> 16) as u8,
                (i >> 8) as u8,
            ]),
            peer_port: (1024 + (i & 0xff) as u16).to_be(),
            listen_port: LOCALSEND_PORT.to_be(),
            proto: PROTO_UDP,
            ..Default::default()
        };
        let entry = FlowEntry {
            rule_id,
            state: FLOW_REPLIED,
            created_ns: now,
            seen_ns: now,
            ..Default::default()
        };
        tables.set_flow(&key, &entry)?;
    }
    Ok(())
}

impl Env {
    pub fn build(setup: Setup) -> Result<Env> {
        let mut forwarders = Vec::new();
        let mut recipe = None;
        let net = match setup {
            Setup::BareVeth => {
                let lan = Netns::new("bench-lan")?;
                let app = Netns::new("bench-app")?;
                lan.ip(&format!(
                    "link add eth0 type veth peer name eth0 netns {}",
                    app.name()
                ))?;
                lan.ip("link set eth0 up")?;
                app.ip("link set eth0 up")?;
                lan.ip(&format!("addr add {LAN_PEER}/24 dev eth0"))?;
                app.ip("addr add 192.168.1.20/24 dev eth0")?;
                Net::Bare { lan, app }
            }
            _ => Net::Qubes(Topology::build(Offload::On)?),
        };
        let (dst, dst_mac) = match (&net, setup) {
            (Net::Bare { app, .. }, _) => (
                SocketAddrV4::new("192.168.1.20".parse()?, LOCALSEND_PORT),
                mac(app, "eth0")?,
            ),
            (Net::Qubes(t), _) => {
                let dst_mac = mac(&t.sysnet, SYSNET_UPLINK)?;
                match setup {
                    Setup::SeedRecipe => {
                        recipe = Some(t.install_seed_recipe()?);
                        (SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT), dst_mac)
                    }
                    Setup::ForwarderFlows(n) => {
                        for router in [Router::SysNet, Router::SysFirewall] {
                            let fwd = Forwarder::start_localsend(
                                t,
                                router,
                                &["--flow-table-size", "131072"],
                            )?;
                            plant_flows(&fwd, n)?;
                            forwarders.push(fwd);
                        }
                        (SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT), dst_mac)
                    }
                    Setup::Forwarder => {
                        for router in [Router::SysNet, Router::SysFirewall] {
                            // No relay rate limit: the reaction measurement
                            // announces every 200 us and must see every copy.
                            forwarders.push(Forwarder::start_localsend(
                                t,
                                router,
                                &["--relay-rate", "1000000"],
                            )?);
                        }
                        (SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT), dst_mac)
                    }
                    Setup::PlainRouting => {
                        // The app's own input table stays: its conntrack
                        // and rules cost every contender's round trip the
                        // same (about 1.8 us here).
                        for ns in [&t.sysnet, &t.sysfw] {
                            ns.sh("nft flush ruleset")?;
                        }
                        t.lan
                            .ip(&format!("route add 10.137.0.0/16 via {SYSNET_LAN}"))?;
                        t.sysnet
                            .ip(&format!("route add {APP}/32 via {SYSFW} dev vif2.0"))?;
                        (SocketAddrV4::new(APP, LOCALSEND_PORT), dst_mac)
                    }
                    Setup::ForwarderRules(n) => {
                        for (ns, uplink, target) in routers(t) {
                            let path =
                                std::env::temp_dir().join(format!("{}-bench.toml", ns.name()));
                            std::fs::write(&path, forwarder_config(uplink, target, n))?;
                            let path = path.display().to_string();
                            forwarders.push(Forwarder::start(ns, uplink, &["--config", &path])?);
                        }
                        (
                            SocketAddrV4::new(SYSNET_LAN, SCALE_BASE_PORT + n as u16 - 1),
                            dst_mac,
                        )
                    }
                    Setup::NftPerPort(n) | Setup::NftMaps(n) => {
                        for (ns, uplink, target) in routers(t) {
                            ns.nft(&nft_rules(setup, uplink, target, n))?;
                        }
                        (
                            SocketAddrV4::new(SYSNET_LAN, SCALE_BASE_PORT + n as u16 - 1),
                            dst_mac,
                        )
                    }
                    Setup::BareVeth => unreachable!("built above"),
                }
            }
        };
        let src_mac = match &net {
            Net::Bare { lan, .. } => mac(lan, "eth0")?,
            Net::Qubes(t) => mac(&t.lan, "eth0")?,
        };
        Ok(Env {
            setup,
            dst,
            dst_mac,
            src_mac,
            forwarders,
            _recipe: recipe,
            net,
        })
    }

    pub fn lan(&self) -> &Netns {
        match &self.net {
            Net::Qubes(t) => &t.lan,
            Net::Bare { lan, .. } => lan,
        }
    }

    pub fn app(&self) -> &Netns {
        match &self.net {
            Net::Qubes(t) => &t.app,
            Net::Bare { app, .. } => app,
        }
    }

    pub fn topology(&self) -> Option<&Topology> {
        match &self.net {
            Net::Qubes(t) => Some(t),
            Net::Bare { .. } => None,
        }
    }

    pub fn namespaces(&self) -> Vec<&Netns> {
        match &self.net {
            Net::Qubes(t) => t.namespaces().into_iter().map(|(_, ns)| ns).collect(),
            Net::Bare { lan, app } => vec![lan, app],
        }
    }
}

/// The scaling contenders' nftables: per-port rules exactly as the seed
/// writes them, or one map lookup each for DNAT and the forward accept.
fn nft_rules(setup: Setup, uplink: &str, target: std::net::Ipv4Addr, n: usize) -> String {
    let ports = (0..n).map(|i| SCALE_BASE_PORT as usize + i);
    let mut s = String::from(
        "add chain ip qubes custom-dnat-bench { type nat hook prerouting priority filter + 1; policy accept; }\n",
    );
    match setup {
        Setup::NftPerPort(_) => {
            for port in ports {
                let _ = writeln!(
                    s,
                    "add rule ip qubes custom-dnat-bench iif {uplink} udp dport {port} ct state new,established,related counter dnat {target}"
                );
                let _ = writeln!(
                    s,
                    "add rule ip qubes custom-forward iif {uplink} ip daddr {target} udp dport {port} ct state new,established,related counter accept"
                );
            }
        }
        _ => {
            let elements: Vec<String> = ports.clone().map(|p| format!("{p} : {target}")).collect();
            let verdicts: Vec<String> = ports.map(|p| format!("{p} : accept")).collect();
            let _ = writeln!(
                s,
                "add map ip qubes bench-dnat {{ type inet_service : ipv4_addr; elements = {{ {} }} }}",
                elements.join(", ")
            );
            let _ = writeln!(
                s,
                "add map ip qubes bench-accept {{ type inet_service : verdict; elements = {{ {} }} }}",
                verdicts.join(", ")
            );
            let _ = writeln!(
                s,
                "add rule ip qubes custom-dnat-bench iif {uplink} dnat to udp dport map @bench-dnat"
            );
            let _ = writeln!(
                s,
                "add rule ip qubes custom-forward iif {uplink} ip daddr {target} udp dport vmap @bench-accept"
            );
        }
    }
    s
}
