//! Presets: the forward rules and relays one discovery app needs, pointed
//! at one target, behind a single flag or config key.

use std::net::Ipv4Addr;

use crate::spec::Proto;

/// What an app needs from each router between it and the LAN.
pub struct Preset {
    /// The flag (`--NAME`) and config key (`NAME = "..."`).
    pub name: &'static str,
    /// Ports peers connect back to, forwarded to the same port.
    pub forwards: &'static [(Proto, u16)],
    /// Groups (or broadcast) and ports whose datagrams are relayed.
    pub relays: &'static [(Ipv4Addr, u16)],
}

pub const LOCALSEND: Preset = Preset {
    name: "localsend",
    forwards: &[(Proto::Tcp, 53317), (Proto::Udp, 53317)],
    relays: &[(Ipv4Addr::new(224, 0, 0, 167), 53317)],
};

/// Every preset, in the order their rules are installed.
pub const ALL: &[&Preset] = &[&LOCALSEND];
