//! What every hostile run installs: the rules and relays, and the networks
//! the harness declares internal.

use std::net::Ipv4Addr;

use forwarder::{
    rules::{Origin, Relay, Rule},
    spec::{AllowFrom, Ports, Proto},
};

use crate::testrun::{OTHER_VM, TARGET, UNRESOLVED, localsend_rule};

/// LocalSend's discovery group.
pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 167);
const MDNS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
const SSDP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
/// A relay slow enough that its buckets run dry.
const SLOW: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 99);

/// What the harness declares internal (testrun.rs: the vif routes and
/// addresses, every target): the address filter refuses these /24s.
pub const INTERNAL_NETS: [(Ipv4Addr, u8); 2] = [
    (Ipv4Addr::new(10, 137, 0, 0), 24),
    (Ipv4Addr::new(10, 138, 0, 0), 24),
];

/// The rules and relays every hostile run installs.
pub fn rules() -> Vec<Rule> {
    vec![
        localsend_rule(Proto::Tcp),
        localsend_rule(Proto::Udp),
        Rule::new(
            Proto::Tcp,
            Ports::one(8080),
            TARGET,
            80,
            AllowFrom::Any,
            Origin::Flag,
        ),
        Rule::new(
            Proto::Udp,
            Ports::one(5000),
            UNRESOLVED,
            5000,
            "192.168.1.0/25".parse().unwrap(),
            Origin::Flag,
        ),
    ]
}

pub fn relays() -> Vec<Relay> {
    let relay = |group, port, targets: &[Ipv4Addr], ttl, rate| Relay {
        group,
        port,
        targets: targets.to_vec(),
        ttl,
        rate,
        rate_down: rate,
        allow: AllowFrom::Auto,
    };
    vec![
        relay(GROUP, 53317, &[TARGET, OTHER_VM], None, 1_000_000),
        // Port 5353: the VMs' answers never go up.
        relay(MDNS, 5353, &[TARGET], None, 1_000_000),
        // Two targets behind one vif: one copy down.
        relay(SSDP, 1900, &[TARGET, UNRESOLVED], Some(2), 1_000_000),
        relay(Ipv4Addr::BROADCAST, 1716, &[OTHER_VM], None, 1_000_000),
        relay(SLOW, 9999, &[TARGET, OTHER_VM], None, 3),
    ]
}

/// Every relay's group and port.
pub fn relay_groups() -> Vec<(Ipv4Addr, u16)> {
    relays().iter().map(|r| (r.group, r.port)).collect()
}
