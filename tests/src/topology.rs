//! The Qubes-like test topology of DESIGN.md:
//!
//!     lan (peer) -- sys-net --vif2.0/eth0-- sys-firewall --vif3.0/eth0-- app
//!                                                        --vif4.0/eth0-- app2
//!
//! Routers carry Qubes 4.2's netvm tables (antispoofing, input policy drop,
//! forward rules, masquerade) and sys-firewall also the qubes-firewall
//! table with real qvm-firewall rules: the app may reach one LAN host on a
//! few ports, app2 may reach nothing. VMs have /32 addresses, vifs are in
//! link group 2 with /32 routes and proxy ARP; the app runs a VM's own
//! input table with the seed's accept rule. Every namespace is removed on
//! drop.

use std::net::Ipv4Addr;

use std::{
    os::unix::process::CommandExt as _,
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

use crate::netns::{DieWithParent as _, Netns};

pub const LAN_PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
pub const LAN_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
pub const SYSNET_LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
pub const SYSNET_INTERNAL: Ipv4Addr = Ipv4Addr::new(10, 138, 0, 1);
pub const SYSFW: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 5);
pub const APP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 17);
pub const APP2: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 18);
pub const SYSNET_UPLINK: &str = "wls6f0";
pub const SYSFW_UPLINK: &str = "eth0";
pub const LOCALSEND_PORT: u16 = 53317;
/// A port the app serves and accepts in its own firewall but that no router
/// forwards: reaching it from the LAN would be a leak.
pub const UNFORWARDED_PORT: u16 = 8080;
pub const LOCALSEND_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 167);

/// LocalSend's announcement as a VM or a LAN peer sends it: to its group
/// and port with TTL 1.
pub fn localsend_announcer(
    ns: &Netns,
    tag: &str,
    interval: std::time::Duration,
) -> Result<crate::sockets::Announcer> {
    crate::sockets::Announcer::start(ns, tag, LOCALSEND_GROUP, LOCALSEND_PORT, 1, interval)
}
/// A second LAN host, which no VM's firewall admits.
pub const OTHER_LAN_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 11);
/// The LAN service the app's firewall admits (on LAN_PEER only).
pub const LAN_SERVICE_PORT: u16 = 8000;
/// The port app2 serves and its own firewall accepts.
pub const APP2_PORT: u16 = 7000;

/// Whether senders leave transport checksums to "hardware" (veth passes
/// them on as CHECKSUM_PARTIAL, as Xen guests send) or compute them fully.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    On,
    Off,
}

pub struct Topology {
    pub lan: Netns,
    pub sysnet: Netns,
    pub sysfw: Netns,
    pub app: Netns,
    pub app2: Netns,
}

pub(crate) fn qubes_netvm_tables(downstream: &[(&str, Ipv4Addr)]) -> String {
    let addrs: Vec<String> = downstream.iter().map(|(_, a)| a.to_string()).collect();
    let allowed: Vec<String> = downstream
        .iter()
        .map(|(vif, a)| format!("\"{vif}\" . {a}"))
        .collect();
    format!(
        r#"table ip qubes {{
    set downstream {{ type ipv4_addr; elements = {{ {addrs} }} }}
    set allowed {{ type ifname . ipv4_addr; elements = {{ {allowed} }} }}
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip saddr @downstream counter drop
    }}
    chain antispoof {{
        iifname . ip saddr @allowed accept
        counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifgroup 2 accept
        oif lo accept
        masquerade
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        iifgroup 2 udp dport 68 counter drop
        ct state established,related accept
        iifgroup 2 meta l4proto icmp accept
        iif lo accept
        iifgroup 2 counter reject with icmp host-prohibited
        counter
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state established,related accept
        oifgroup 2 counter drop
    }}
    chain custom-input {{ }}
    chain custom-forward {{ }}
}}
"#,
        addrs = addrs.join(", "),
        allowed = allowed.join(", "),
    )
}

/// The `qubes-firewall` chain holding `vm`'s qvm-firewall rules.
pub fn qbs_chain(vm: Ipv4Addr) -> String {
    format!("qbs-{}", vm.to_string().replace('.', "-"))
}

/// sys-firewall's `qubes-firewall` table, with each VM's qvm-firewall
/// rules (ending in drop) in its `qbs-*` chain.
fn qubes_firewall_table(vms: &[(Ipv4Addr, String)]) -> String {
    let mut out = String::from(
        "table ip qubes-firewall {\n    chain forward {\n        type filter hook forward priority filter; policy drop;\n        ct state established,related accept\n        iifname != \"vif*\" accept\n",
    );
    for (vm, _) in vms {
        out += &format!("        ip saddr {vm} jump {}\n", qbs_chain(*vm));
    }
    out += "    }\n    chain prerouting {\n        type filter hook prerouting priority raw; policy accept;\n";
    for (vm, _) in vms {
        out += &format!("        iifname != \"vif*\" ip saddr {vm} drop\n");
    }
    out += "    }\n    chain postrouting {\n        type filter hook postrouting priority raw; policy accept;\n";
    for (vm, _) in vms {
        out += &format!("        oifname != \"vif*\" ip daddr {vm} drop\n");
    }
    out += "    }\n";
    for (vm, rules) in vms {
        out += &format!(
            "    chain {} {{\n{rules}        counter drop\n    }}\n",
            qbs_chain(*vm)
        );
    }
    out += "}\n";
    out
}

/// What qvm-firewall writes for the app: an allow-list of one LAN host (the
/// LAN service, LocalSend's port, ping) and nothing else.
fn app_allow_list() -> String {
    format!(
        "        ip daddr {LAN_PEER} tcp dport {{ {LAN_SERVICE_PORT}, {LOCALSEND_PORT} }} accept\n        ip daddr {LAN_PEER} udp dport {{ {LAN_SERVICE_PORT}, {LOCALSEND_PORT} }} accept\n        ip daddr {LAN_PEER} meta l4proto icmp accept\n"
    )
}

/// A VM's own input table: policy drop, plus the seed's accept rules for
/// `ports` (rc.local in the seed), plus LocalSend's discovery group, which
/// the seed's rule (matching the VM's own address) does not admit.
pub(crate) fn vm_input_table(me: Ipv4Addr, ports: &[u16]) -> String {
    let mut accept = format!(
        "        iifname \"eth0\" udp dport {LOCALSEND_PORT} ip daddr {LOCALSEND_GROUP} counter accept\n"
    );
    for port in ports {
        for proto in ["tcp", "udp"] {
            accept += &format!(
                "        iifname \"eth0\" {proto} dport {port} ip daddr {me} ct state new,established,related counter accept\n"
            );
        }
    }
    format!(
        r#"table ip qubes {{
    chain custom-input {{
{accept}    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        ct state established,related accept
        iif lo accept
        meta l4proto icmp accept
        counter reject with icmp host-prohibited
    }}
}}
"#
    )
}

/// A Qubes backend vif: the VM's /32 route, the gateway address on the vif,
/// link group 2 and proxy ARP.
pub(crate) fn vif(
    router: &Netns,
    vm: &Netns,
    vif: &str,
    gateway: Ipv4Addr,
    vm_addr: Ipv4Addr,
) -> Result<()> {
    router.ip(&format!(
        "link add {vif} type veth peer name eth0 netns {}",
        vm.name()
    ))?;
    router.ip(&format!("link set {vif} group 2 up"))?;
    router.ip(&format!("addr add {gateway}/32 dev {vif}"))?;
    router.ip(&format!("route add {vm_addr}/32 dev {vif} metric 32752"))?;
    router.sh(&format!("echo 1 > /proc/sys/net/ipv4/conf/{vif}/proxy_arp"))?;
    vm.ip("link set eth0 up")?;
    vm.ip(&format!("addr add {vm_addr}/32 dev eth0"))?;
    vm.ip(&format!("route add {gateway}/32 dev eth0 scope link"))?;
    vm.ip(&format!("route add default via {gateway} dev eth0"))?;
    Ok(())
}

impl Topology {
    pub fn build(offload: Offload) -> Result<Self> {
        crate::netns::sweep_leftovers();
        let t = Topology {
            lan: Netns::new("lan")?,
            sysnet: Netns::new("sysnet")?,
            sysfw: Netns::new("sysfw")?,
            app: Netns::new("app")?,
            app2: Netns::new("app2")?,
        };
        t.lan.ip(&format!(
            "link add eth0 type veth peer name {SYSNET_UPLINK} netns {}",
            t.sysnet.name()
        ))?;
        t.lan.ip("link set eth0 up")?;
        t.lan.ip(&format!("addr add {LAN_PEER}/24 dev eth0"))?;
        t.lan.ip(&format!("route add default via {LAN_GATEWAY}"))?;
        t.sysnet.ip(&format!("link set {SYSNET_UPLINK} up"))?;
        t.sysnet
            .ip(&format!("addr add {SYSNET_LAN}/24 dev {SYSNET_UPLINK}"))?;
        t.sysnet
            .ip(&format!("route add default via {LAN_GATEWAY}"))?;

        vif(&t.sysnet, &t.sysfw, "vif2.0", SYSNET_INTERNAL, SYSFW)?;
        vif(&t.sysfw, &t.app, "vif3.0", SYSFW, APP)?;
        vif(&t.sysfw, &t.app2, "vif4.0", SYSFW, APP2)?;
        for router in [&t.sysnet, &t.sysfw] {
            router.sysctl("net.ipv4.ip_forward=1")?;
        }

        t.sysnet.nft(&qubes_netvm_tables(&[("vif2.0", SYSFW)]))?;
        t.sysfw
            .nft(&qubes_netvm_tables(&[("vif3.0", APP), ("vif4.0", APP2)]))?;
        // The app may reach one LAN host on a few ports; app2 nothing.
        t.sysfw.nft(&qubes_firewall_table(&[
            (APP, app_allow_list()),
            (APP2, String::new()),
        ]))?;
        t.app
            .nft(&vm_input_table(APP, &[LOCALSEND_PORT, UNFORWARDED_PORT]))?;
        t.app2
            .nft(&vm_input_table(APP2, &[LOCALSEND_PORT, APP2_PORT]))?;

        t.set_offload(offload)?;
        Ok(t)
    }

    pub fn namespaces(&self) -> [(&'static str, &Netns); 5] {
        [
            ("lan", &self.lan),
            ("sys-net", &self.sysnet),
            ("sys-firewall", &self.sysfw),
            ("app", &self.app),
            ("app2", &self.app2),
        ]
    }

    /// Transmit checksum offload (and with it TSO) on every veth end.
    pub fn set_offload(&self, offload: Offload) -> Result<()> {
        let state = match offload {
            Offload::On => "on",
            Offload::Off => "off",
        };
        for (_, ns) in self.namespaces() {
            ns.sh(&format!(
                "for dev in $(ls /sys/class/net); do [ \"$dev\" = lo ] || ethtool -K \"$dev\" tx {state} >/dev/null; done"
            ))?;
        }
        Ok(())
    }

    /// Fails naming every namespace whose TCP, UDP or ICMP counted a
    /// receive checksum error.
    pub fn ensure_no_checksum_errors(&self) -> Result<()> {
        crate::netns::ensure_no_checksum_errors(self.namespaces())
    }

    /// The seed's complete recipe: DNAT hop by hop, `dup` of the VM's
    /// announcements with `ip ttl set 2`, and in sys-net the SNAT chain its
    /// NetworkManager dispatcher script rewrites, emulated by a script run
    /// from `ip monitor address`.
    pub fn install_seed_recipe(&self) -> Result<SeedRecipe> {
        self.install_seed_forwarding(LOCALSEND_PORT)?;
        let port = LOCALSEND_PORT;
        let group = LOCALSEND_GROUP;
        let mut sysnet = format!(
            "add chain ip qubes custom-prerouting\n\
             insert rule ip qubes prerouting jump custom-prerouting\n\
             add chain ip qubes custom-snat-localsend\n\
             add rule ip qubes custom-snat-localsend drop\n\
             add rule ip qubes custom-prerouting iif != {SYSNET_UPLINK} udp dport {port} ip daddr {group} jump custom-snat-localsend\n"
        );
        sysnet += &format!(
            "add rule ip qubes custom-prerouting iif != {SYSNET_UPLINK} udp dport {port} ip daddr {group} ip ttl set 2 dup to {group} device {SYSNET_UPLINK} notrack\n"
        );
        self.sysnet.nft(&sysnet)?;
        self.sysfw.nft(&format!(
                "add chain ip qubes custom-prerouting\n\
                 insert rule ip qubes prerouting jump custom-prerouting\n\
                 add rule ip qubes custom-prerouting iif != {SYSFW_UPLINK} udp dport {port} ip daddr {group} ip ttl set 2 dup to {group} device {SYSFW_UPLINK} notrack\n"
            ),
        )?;
        let script = format!(
            r#"update() {{
    ip=$(ip -o -4 addr list {SYSNET_UPLINK} | awk '{{print $4}}' | cut -d/ -f1 | head -n1)
    if [ -n "$ip" ]; then
        nft flush chain ip qubes custom-snat-localsend
        nft add rule ip qubes custom-snat-localsend ip saddr set $ip
    else
        nft flush chain ip qubes custom-snat-localsend
        nft add rule ip qubes custom-snat-localsend drop
    fi
}}
update
echo ready
ip monitor address dev {SYSNET_UPLINK} | while read -r _; do update; done"#
        );
        let mut child = self
            .sysnet
            .command("sh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .die_with_parent()
            .spawn()
            .context("starting the dispatcher emulation")?;
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().context("dispatcher stdout")?),
            &mut ready,
        )?;
        Ok(SeedRecipe { dispatcher: child })
    }

    /// Whether a TCP exchange from the LAN peer through sys-net's `port`
    /// completes within a second.
    pub fn reachable(&self, port: u16) -> bool {
        crate::sockets::tcp_echo(
            &self.lan,
            std::net::SocketAddrV4::new(SYSNET_LAN, port),
            None,
            std::time::Duration::from_secs(1),
        )
        .is_ok()
    }

    /// Deletes the app's vif and creates it anew under another name, as Qubes
    /// does when the VM restarts: same address, new interface and ifindex.
    /// Qubes' own antispoofing set learns the new name too.
    pub fn restart_app_vif(&self, old: &str) -> Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(10);
        let name = format!("vif{}.0", NEXT.fetch_add(1, Ordering::Relaxed));
        self.sysfw.ip(&format!("link del {old}"))?;
        vif(&self.sysfw, &self.app, &name, SYSFW, APP)?;
        self.sysfw.nft(&format!(
            "add element ip qubes allowed {{ \"{name}\" . {APP} }}\n"
        ))?;
        Ok(name)
    }

    /// The seed's "Incoming TCP and UDP" recipe in both routers: nftables
    /// DNAT hop by hop plus the forward accepts, to the app.
    pub fn install_seed_forwarding(&self, port: u16) -> Result<()> {
        self.install_seed_forwarding_to(port, APP)
    }

    /// As `install_seed_forwarding`, with sys-firewall forwarding to `vm`.
    pub fn install_seed_forwarding_to(&self, port: u16, vm: Ipv4Addr) -> Result<()> {
        for (router, iface, target) in [
            (&self.sysnet, SYSNET_UPLINK, SYSFW),
            (&self.sysfw, SYSFW_UPLINK, vm),
        ] {
            let mut script = String::from(
                "add chain ip qubes custom-dnat-localsend { type nat hook prerouting priority filter + 1; policy accept; }\n",
            );
            for proto in ["tcp", "udp"] {
                script += &format!(
                    "add rule ip qubes custom-dnat-localsend iif {iface} {proto} dport {port} ct state new,established,related counter dnat {target}\n"
                );
                script += &format!(
                    "add rule ip qubes custom-forward iif {iface} ip daddr {target} {proto} dport {port} ct state new,established,related counter accept\n"
                );
            }
            router.nft(&script)?;
        }
        Ok(())
    }
}

/// The seed recipe's moving part: its dispatcher emulation, stopped on drop.
pub struct SeedRecipe {
    dispatcher: Child,
}

impl Drop for SeedRecipe {
    fn drop(&mut self) {
        // The script and its `ip monitor` share a process group.
        // SAFETY: signalling a process group we created.
        unsafe { libc::kill(-(self.dispatcher.id() as i32), libc::SIGTERM) };
        let _ = self.dispatcher.wait();
    }
}
