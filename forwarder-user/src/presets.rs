//! Presets: the forward rules and relays one discovery app needs, pointed
//! at one target, behind a single flag or config key.

use std::net::Ipv4Addr;

use crate::spec::{Ports, Proto};

/// What an app needs from each router between it and the LAN.
#[derive(Debug)]
pub struct Preset {
    /// The flag (`--NAME`) and config key (`NAME = "..."`).
    pub name: &'static str,
    /// Ports peers connect back to, forwarded to the same ports.
    pub forwards: &'static [(Proto, Ports)],
    /// Groups (or broadcast) and ports whose datagrams are relayed.
    pub relays: &'static [(Ipv4Addr, u16)],
    /// What the app VM's own input firewall must admit, for the docs.
    pub vm_admits: &'static str,
}

impl Preset {
    /// What `target` must admit, as check-config prints it and the daemon
    /// logs it.
    pub fn advice(&self, target: Ipv4Addr) -> String {
        format!(
            "{} preset: {target} must admit in its own firewall {}",
            self.name, self.vm_admits
        )
    }
}

pub const LOCALSEND: Preset = Preset {
    name: "localsend",
    forwards: &[
        (Proto::Tcp, Ports::one(53317)),
        (Proto::Udp, Ports::one(53317)),
    ],
    relays: &[(Ipv4Addr::new(224, 0, 0, 167), 53317)],
    vm_admits: "tcp and udp 53317 (the discovery group 224.0.0.167 included)",
};

/// KDE Connect: identity broadcasts to 1716, peers connect back on a port
/// in 1714-1764 (TCP for the link, and transfers; UDP for identities sent
/// back directly).
pub const KDECONNECT: Preset = Preset {
    name: "kdeconnect",
    forwards: &[
        (
            Proto::Tcp,
            Ports {
                first: 1714,
                last: 1764,
            },
        ),
        (
            Proto::Udp,
            Ports {
                first: 1714,
                last: 1764,
            },
        ),
    ],
    relays: &[(Ipv4Addr::BROADCAST, 1716)],
    vm_admits: "tcp and udp 1714-1764 (broadcasts to 1716 included)",
};

/// Syncthing: local discovery broadcasts to 21027; sync on 22000 (TCP, or
/// QUIC over UDP).
pub const SYNCTHING: Preset = Preset {
    name: "syncthing",
    forwards: &[
        (Proto::Tcp, Ports::one(22000)),
        (Proto::Udp, Ports::one(22000)),
    ],
    relays: &[(Ipv4Addr::BROADCAST, 21027)],
    vm_admits: "tcp and udp 22000, and udp 21027 (broadcasts)",
};

/// mDNS lookups from the VM: its queries go up with the router's address,
/// LAN answers come down; its own answers never go up.
pub const MDNS: Preset = Preset {
    name: "mdns",
    forwards: &[],
    relays: &[(Ipv4Addr::new(224, 0, 0, 251), 5353)],
    vm_admits: "udp 5353 from the group 224.0.0.251",
};
