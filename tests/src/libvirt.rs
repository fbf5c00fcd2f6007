//! libvirt's default NAT network (seeds/004) in namespaces:
//!
//!     lan (peer) -- eth0 [host] virbr0 (bridge) -- vnet0 ~ eth0 [vm]
//!
//! The host carries libvirt's `table ip libvirt_network` (guest_output,
//! guest_input, guest_cross, guest_nat that masquerades the VM except to
//! 224.0.0.0/24 and broadcast); the VM sits on 192.168.122.0/24 behind
//! the bridge.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};

use crate::{netns::Netns, topology::Offload};

pub const LAN_PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
pub const HOST_LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
pub const BRIDGE: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
pub const VM: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 50);

const LIBVIRT_TABLE: &str = r#"table ip libvirt_network {
    chain forward {
        type filter hook forward priority filter; policy accept;
        counter jump guest_cross
        counter jump guest_input
        counter jump guest_output
    }
    chain guest_output {
        ip saddr 192.168.122.0/24 iif "virbr0" counter accept
        iif "virbr0" counter reject
    }
    chain guest_input {
        oif "virbr0" ip daddr 192.168.122.0/24 ct state established,related counter accept
        oif "virbr0" counter reject
    }
    chain guest_cross {
        iif "virbr0" oif "virbr0" counter accept
    }
    chain guest_nat {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 192.168.122.0/24 ip daddr 224.0.0.0/24 counter return
        ip saddr 192.168.122.0/24 ip daddr 255.255.255.255 counter return
        meta l4proto tcp ip saddr 192.168.122.0/24 ip daddr != 192.168.122.0/24 counter masquerade to :1024-65535
        meta l4proto udp ip saddr 192.168.122.0/24 ip daddr != 192.168.122.0/24 counter masquerade to :1024-65535
        ip saddr 192.168.122.0/24 ip daddr != 192.168.122.0/24 counter masquerade
    }
}
"#;

pub struct Libvirt {
    pub lan: Netns,
    pub host: Netns,
    pub vm: Netns,
}

impl Libvirt {
    pub fn build(offload: Offload) -> Result<Self> {
        crate::netns::sweep_leftovers();
        let t = Libvirt {
            lan: Netns::new("lv-lan")?,
            host: Netns::new("lv-host")?,
            vm: Netns::new("lv-vm")?,
        };
        t.lan.ip(&format!(
            "link add eth0 type veth peer name eth0 netns {}",
            t.host.name()
        ))?;
        t.lan.ip("link set eth0 up")?;
        t.lan.ip(&format!("addr add {LAN_PEER}/24 dev eth0"))?;
        t.lan.ip("route add default via 192.168.1.1")?;
        t.host.ip("link set eth0 up")?;
        t.host.ip(&format!("addr add {HOST_LAN}/24 dev eth0"))?;
        t.host.ip("route add default via 192.168.1.1")?;
        t.host.sysctl("net.ipv4.ip_forward=1")?;

        t.host.ip("link add virbr0 type bridge")?;
        t.host.ip(&format!("addr add {BRIDGE}/24 dev virbr0"))?;
        t.host.ip("link set virbr0 up")?;
        t.host.ip(&format!(
            "link add vnet0 type veth peer name eth0 netns {}",
            t.vm.name()
        ))?;
        t.host.ip("link set vnet0 master virbr0 up")?;
        t.vm.ip("link set eth0 up")?;
        t.vm.ip(&format!("addr add {VM}/24 dev eth0"))?;
        t.vm.ip(&format!("route add default via {BRIDGE}"))?;

        t.host
            .nft(LIBVIRT_TABLE)
            .context("loading libvirt's table")?;

        let state = match offload {
            Offload::On => "on",
            Offload::Off => "off",
        };
        for ns in [&t.lan, &t.host, &t.vm] {
            ns.sh(&format!(
                "for dev in $(ls /sys/class/net); do [ \"$dev\" = lo ] || ethtool -K \"$dev\" tx {state} >/dev/null 2>&1 || true; done"
            ))?;
        }
        Ok(t)
    }

    /// Fails naming every namespace whose TCP, UDP or ICMP counted a
    /// receive checksum error.
    pub fn ensure_no_checksum_errors(&self) -> Result<()> {
        crate::netns::ensure_no_checksum_errors([
            ("lan", &self.lan),
            ("host", &self.host),
            ("vm", &self.vm),
        ])
    }
}
