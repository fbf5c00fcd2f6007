//! Forward rules as the daemon holds them, their checks, and their encoding
//! into the datapath's map entries.

use std::{
    collections::BTreeSet,
    fmt,
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

use forwarder_common::maps::{
    ALLOW_ANY, ALLOW_AUTO, ALLOW_LIST, Allow, ForwardRule, MAX_RELAYS, MAX_RULES,
    RELAY_DNS_QUERIES_UP, RateLimit, Relay as RelayValue, RelayKey, ReverseKey, RuleKey,
};

use crate::{
    clock::Now,
    spec::{AllowFrom, ForwardSpec, Ports, Proto, is_unicast},
};

/// Where a rule came from, which decides whether `--save` writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `--forward` on the command line.
    Flag,
    /// A `[[forward]]` table of the config file.
    File,
    /// Implied by `--localsend` / `localsend =`.
    Preset,
    /// Added at runtime with `rules add` and not saved.
    Live,
    /// A router's share from dom0, read from QubesDB (`/vm-config/forwarder.N`).
    Qubesdb,
}

impl Origin {
    /// The name `rules list` shows, the same as in its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Origin::Flag => "flag",
            Origin::File => "file",
            Origin::Preset => "preset",
            Origin::Live => "live",
            Origin::Qubesdb => "qubesdb",
        }
    }
}

/// The longest `--expire`: 100 years of 365.25 days, humantime's `100y`.
/// Longer is as good as never, and would not fit the file's RFC 3339
/// times for long.
pub const MAX_EXPIRE: Duration = Duration::from_secs(100 * 31_557_600);

/// The wall-clock time `wait` from now, for a rule's expiry; refused past
/// `MAX_EXPIRE` (the control socket takes any number).
pub fn expiry_after(wait: Duration) -> Result<SystemTime, String> {
    if wait > MAX_EXPIRE {
        return Err(format!(
            "an expiry {} s away is past the longest, 100y ({} s)",
            wait.as_secs(),
            MAX_EXPIRE.as_secs()
        ));
    }
    SystemTime::now()
        .checked_add(wait)
        .ok_or_else(|| "the clock is too close to its end for this expiry".into())
}

/// A forward rule with its target resolved: one port, or a range of ports
/// forwarded to a range of the same length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub proto: Proto,
    pub ports: Ports,
    pub target: Ipv4Addr,
    /// Where the ports start at the target.
    pub target_port: u16,
    pub allow: AllowFrom,
    pub comment: Option<String>,
    /// When the daemon removes the rule; `None` keeps it.
    pub expires: Option<SystemTime>,
    pub origin: Origin,
}

impl Rule {
    /// A rule forwarding `ports` to as many ports of `target` from
    /// `target_port` on, with no metadata.
    pub fn new(
        proto: Proto,
        ports: Ports,
        target: Ipv4Addr,
        target_port: u16,
        allow: AllowFrom,
        origin: Origin,
    ) -> Self {
        Rule {
            proto,
            ports,
            target,
            target_port,
            allow,
            comment: None,
            expires: None,
            origin,
        }
    }

    /// A rule from a spec whose target is resolved: the target port
    /// defaults to the listen port.
    pub fn from_spec(
        spec: &ForwardSpec,
        target: Ipv4Addr,
        allow: AllowFrom,
        origin: Origin,
    ) -> Self {
        Rule::new(
            spec.proto,
            spec.ports,
            target,
            spec.target_port.unwrap_or(spec.ports.first),
            allow,
            origin,
        )
    }

    /// The ports of the target, as many as the listen ports; `None` when
    /// they would run past 65535 (which `check` refuses).
    pub fn target_ports(&self) -> Option<Ports> {
        self.ports.starting_at(self.target_port)
    }

    /// The rule as operators name it: `tcp:8080` or `tcp:1714-1764`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.proto, self.ports)
    }

    /// Where the rule was given, for messages: "a --forward flag", "the
    /// config file", "the localsend preset", "`rules add`".
    pub fn source(&self) -> String {
        match self.origin {
            Origin::Flag => "a --forward flag".into(),
            Origin::File => "the config file".into(),
            Origin::Preset => match &self.comment {
                Some(preset) => format!("the {preset}"),
                None => "a preset".into(),
            },
            Origin::Live => "`rules add`".into(),
            Origin::Qubesdb => "dom0's share in QubesDB (/vm-config/forwarder.N)".into(),
        }
    }

    /// Whether the rule's time is up at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|t| t <= now)
    }

    /// One map entry per listen port: the listen key, the target's reply
    /// key, and the target port. A range's entries share one counter slot
    /// and one id, so the datapath's lookup stays one hash lookup.
    /// A rule whose target ports do not fit has none (`check` refuses it).
    pub fn entries(&self) -> impl Iterator<Item = (RuleKey, ReverseKey, u16)> + '_ {
        let target_ports = self
            .target_ports()
            .into_iter()
            .flat_map(|t| t.first..=t.last);
        (self.ports.first..=self.ports.last)
            .zip(target_ports)
            .map(move |(port, target_port)| {
                let key = RuleKey {
                    port: port.to_be(),
                    proto: self.proto.number(),
                    pad: 0,
                };
                let reverse = ReverseKey {
                    addr: u32::from_ne_bytes(self.target.octets()),
                    port: target_port.to_be(),
                    proto: self.proto.number(),
                    pad: 0,
                };
                (key, reverse, target_port)
            })
    }

    /// The map value of the entry for `target_port`, counting into `slot`,
    /// owning the flows marked `id`, with its expiry as a deadline on the
    /// datapath's clock.
    pub fn encode(&self, target_port: u16, slot: u32, id: u32, now: &Now) -> ForwardRule {
        ForwardRule {
            target_addr: u32::from_ne_bytes(self.target.octets()),
            target_port: target_port.to_be(),
            port_shift: self.target_port.wrapping_sub(self.ports.first),
            slot,
            id,
            deadline_ns: self.expires.map_or(0, |t| now.deadline_ns(t)),
            allow: encode_allow(&self.allow),
            ..Default::default()
        }
    }
}

/// The datapath's form of an allow-from setting.
pub fn encode_allow(allow: &AllowFrom) -> Allow {
    let mut value = Allow::default();
    match allow {
        AllowFrom::Any => value.kind = ALLOW_ANY,
        AllowFrom::Auto => value.kind = ALLOW_AUTO,
        AllowFrom::List(cidrs) => {
            value.kind = ALLOW_LIST;
            value.n_cidrs = cidrs.len() as u8;
            for (slot, cidr) in value.cidrs.iter_mut().zip(cidrs) {
                *slot = cidr.wire();
            }
        }
    }
    value
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}:", self.name(), self.target)?;
        match self.target_ports() {
            Some(ports) => write!(f, "{ports}")?,
            None => write!(f, "{}-(past 65535)", self.target_port)?,
        }
        write!(f, " (allow-from {})", self.allow)
    }
}

/// A set of rules the datapath can hold: no listen port in two rules, and
/// no target port in two rules, since replies are matched by the target.
pub fn check(rules: &[Rule]) -> Result<(), String> {
    let entries: u32 = rules.iter().map(|r| r.ports.count()).sum();
    if entries > MAX_RULES {
        return Err(format!(
            "the rules forward {entries} ports; at most {MAX_RULES} are supported"
        ));
    }
    let mut targets = Vec::with_capacity(rules.len());
    for rule in rules {
        if !is_unicast(rule.target) {
            return Err(format!(
                "{}: target {} is not a unicast host",
                rule.name(),
                rule.target
            ));
        }
        let Some(target_ports) = rule.target_ports() else {
            return Err(format!(
                "{}: {} ports from target port {} run past 65535",
                rule.name(),
                rule.ports.count(),
                rule.target_port
            ));
        };
        targets.push(target_ports);
    }
    for (i, (rule, rule_targets)) in rules.iter().zip(&targets).enumerate() {
        for (first, first_targets) in rules[..i].iter().zip(&targets) {
            if first.proto != rule.proto {
                continue;
            }
            if first.ports.overlaps(&rule.ports) {
                return Err(format!(
                    "{} (from {}) and {} (from {}) both forward {}:{}",
                    first.name(),
                    first.source(),
                    rule.name(),
                    rule.source(),
                    rule.proto,
                    overlap(&first.ports, &rule.ports)
                ));
            }
            if first.target == rule.target && first_targets.overlaps(rule_targets) {
                return Err(format!(
                    "{} target {}:{} is used by two rules ({} from {}, {} from {}); replies could not be told apart",
                    rule.proto,
                    rule.target,
                    overlap(first_targets, rule_targets),
                    first.name(),
                    first.source(),
                    rule.name(),
                    rule.source()
                ));
            }
        }
    }
    Ok(())
}

/// The ports two overlapping ranges share.
fn overlap(a: &Ports, b: &Ports) -> Ports {
    Ports {
        first: a.first.max(b.first),
        last: a.last.min(b.last),
    }
}

/// mDNS: a relay on this port copies only queries to the LAN, never a
/// VM's answers, whose records carry its internal address.
pub const MDNS_PORT: u16 = 5353;

/// A multicast (or broadcast) relay with its options resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    pub group: Ipv4Addr,
    pub port: u16,
    pub targets: Vec<Ipv4Addr>,
    /// TTL of copies sent to the LAN; `None` keeps the sender's.
    pub ttl: Option<u8>,
    /// Copies per second toward the LAN; a burst of one second's worth.
    pub rate: u32,
    /// Copies per second toward the VMs (all targets of one datagram count
    /// once); a burst of one second's worth.
    pub rate_down: u32,
    /// LAN peers whose datagrams are copied toward the VMs.
    pub allow: AllowFrom,
}

impl Relay {
    pub fn key(&self) -> RelayKey {
        RelayKey {
            group: u32::from_ne_bytes(self.group.octets()),
            port: self.port.to_be(),
            pad: 0,
        }
    }

    pub fn encode(&self, slot: u32) -> RelayValue {
        let mut value = RelayValue {
            n_targets: self.targets.len() as u8,
            ttl: self.ttl.unwrap_or(0),
            slot,
            up: RateLimit::per_second(self.rate),
            down: RateLimit::per_second(self.rate_down),
            allow: encode_allow(&self.allow),
            flags: if self.port == MDNS_PORT {
                RELAY_DNS_QUERIES_UP
            } else {
                0
            },
            ..Default::default()
        };
        for (slot, target) in value.targets.iter_mut().zip(&self.targets) {
            *slot = u32::from_ne_bytes(target.octets());
        }
        value
    }
}

impl fmt::Display for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let targets: Vec<String> = self.targets.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{}:{} <-> {} (",
            self.group,
            self.port,
            targets.join(",")
        )?;
        match self.ttl {
            Some(ttl) => write!(f, "TTL {ttl}, ")?,
            None => write!(f, "TTL kept, ")?,
        }
        write!(
            f,
            "{}/s to the LAN, {}/s to the VMs from allow-from {})",
            self.rate, self.rate_down, self.allow
        )
    }
}

/// At most one relay per group and port.
pub fn check_relays(relays: &[Relay]) -> Result<(), String> {
    if relays.len() > MAX_RELAYS as usize {
        return Err(format!(
            "{} relays; at most {MAX_RELAYS} are supported",
            relays.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for relay in relays {
        if !seen.insert((relay.group, relay.port)) {
            return Err(format!("{}:{} is relayed twice", relay.group, relay.port));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use forwarder_common::maps::{UplinkState, prefix_to_mask};

    use super::*;

    /// Every entry of a rule, and its one entry in RULE_SLOTS (the first
    /// port's), give each listen port its own target port through the
    /// shift, a range moved up or down and a port wrapping past 65535.
    #[test]
    fn every_entry_and_the_slot_entry_give_each_port_its_target_port() {
        let now = crate::clock::Now::read();
        for (ports, target_port) in [
            (Ports::one(8080), 80),
            (Ports::one(22), 2222),
            (
                Ports {
                    first: 1714,
                    last: 1764,
                },
                1714,
            ),
            (
                Ports {
                    first: 1714,
                    last: 1764,
                },
                41714,
            ),
            (
                Ports {
                    first: 60000,
                    last: 60010,
                },
                100,
            ),
        ] {
            let rule = Rule::new(
                Proto::Tcp,
                ports,
                Ipv4Addr::new(10, 137, 0, 5),
                target_port,
                AllowFrom::Auto,
                Origin::Flag,
            );
            let slot_entry = rule.encode(rule.target_port, 3, 9, &now);
            for (key, reverse, target) in rule.entries() {
                let entry = rule.encode(target, 3, 9, &now);
                for value in [entry, slot_entry] {
                    assert_eq!(
                        value.target_port_for(key.port),
                        reverse.port,
                        "{rule}: port {}",
                        u16::from_be(key.port)
                    );
                }
            }
        }
    }

    #[test]
    fn origin_names_are_their_json() {
        for origin in [
            Origin::Flag,
            Origin::File,
            Origin::Preset,
            Origin::Live,
            Origin::Qubesdb,
        ] {
            assert_eq!(serde_json::to_value(origin).unwrap(), origin.name());
        }
    }

    fn rule(proto: Proto, port: u16, target: [u8; 4], target_port: u16) -> Rule {
        Rule::new(
            proto,
            Ports::one(port),
            Ipv4Addr::from(target),
            target_port,
            AllowFrom::Auto,
            Origin::Flag,
        )
    }

    #[test]
    fn encoding_is_in_wire_order() {
        let mut r = rule(Proto::Tcp, 53317, [10, 137, 0, 17], 8080);
        r.allow = "192.168.1.0/24".parse().unwrap();
        let (key, rev, target_port) = r.entries().next().unwrap();
        assert_eq!(key.port.to_ne_bytes(), 53317u16.to_be_bytes());
        assert_eq!((key.proto, target_port), (6, 8080));
        let now = Now::read();
        let value = r.encode(target_port, 9, 4, &now);
        assert_eq!(value.target_addr.to_ne_bytes(), [10, 137, 0, 17]);
        assert_eq!(value.target_port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!((value.slot, value.id, value.deadline_ns), (9, 4, 0));
        assert_eq!((value.allow.kind, value.allow.n_cidrs), (ALLOW_LIST, 1));
        assert_eq!(value.allow.cidrs[0].mask, prefix_to_mask(24));
        let uplink = UplinkState::default();
        assert!(
            value
                .allow
                .allows(u32::from_ne_bytes([192, 168, 1, 9]), &uplink)
        );
        assert!(
            !value
                .allow
                .allows(u32::from_ne_bytes([192, 168, 9, 9]), &uplink)
        );
        r.expires = Some(now.wall + std::time::Duration::from_secs(6));
        assert_eq!(
            r.encode(8080, 9, 4, &now).deadline_ns,
            now.boot_ns + 6_000_000_000,
            "the expiry becomes a deadline on the datapath's clock"
        );
        assert_eq!(rev.addr, value.target_addr);
        assert_eq!(rev.port, value.target_port);
    }

    #[test]
    fn duplicates_are_rejected() {
        let a = rule(Proto::Tcp, 80, [10, 0, 0, 1], 80);
        let same_port = rule(Proto::Tcp, 80, [10, 0, 0, 2], 80);
        let same_target = rule(Proto::Tcp, 8080, [10, 0, 0, 1], 80);
        let other_proto = rule(Proto::Udp, 80, [10, 0, 0, 1], 80);
        assert!(check(&[a.clone(), other_proto]).is_ok());
        assert!(
            check(&[a.clone(), same_port])
                .unwrap_err()
                .contains("both forward tcp:80")
        );
        assert!(check(&[a, same_target]).unwrap_err().contains("told apart"));
    }

    #[test]
    fn ranges_are_one_rule_of_many_entries_and_may_not_overlap() {
        let spec: ForwardSpec = "tcp:1714-1764=10.137.0.17:2714".parse().unwrap();
        let range = Rule::from_spec(
            &spec,
            Ipv4Addr::new(10, 137, 0, 17),
            AllowFrom::Auto,
            Origin::Flag,
        );
        assert_eq!(
            range.to_string(),
            "tcp:1714-1764 -> 10.137.0.17:2714-2764 (allow-from auto)"
        );
        let entries: Vec<(u16, u16)> = range
            .entries()
            .map(|(k, r, _)| (u16::from_be(k.port), u16::from_be(r.port)))
            .collect();
        assert_eq!(entries.len(), 51);
        assert_eq!((entries[0], entries[50]), ((1714, 2714), (1764, 2764)));
        let inside = rule(Proto::Tcp, 1740, [10, 0, 0, 9], 80);
        let err = check(&[range.clone(), inside]).unwrap_err();
        assert!(
            err.contains("tcp:1714-1764")
                && err.contains("tcp:1740")
                && err.contains("both forward tcp:1740"),
            "{err}"
        );
        let target_clash = rule(Proto::Tcp, 9000, [10, 137, 0, 17], 2720);
        assert!(
            check(&[range.clone(), target_clash])
                .unwrap_err()
                .contains("told apart")
        );
        let udp = Rule {
            proto: Proto::Udp,
            ..range.clone()
        };
        assert!(check(&[range, udp]).is_ok(), "tcp and udp ranges coexist");
    }

    #[test]
    fn target_ports_that_run_past_65535_are_refused_with_no_entries() {
        let range = |first, last, target_port| {
            Rule::new(
                Proto::Udp,
                Ports { first, last },
                Ipv4Addr::new(10, 0, 0, 1),
                target_port,
                AllowFrom::Auto,
                Origin::Flag,
            )
        };
        let fits = range(1714, 1764, 65485);
        assert_eq!(
            fits.target_ports(),
            Some(Ports {
                first: 65485,
                last: 65535
            })
        );
        assert_eq!(fits.entries().count(), 51);
        let past = range(1714, 1764, 65486);
        assert_eq!(past.target_ports(), None);
        assert_eq!(past.entries().count(), 0, "no wrapped target port");
        let err = check(&[past]).unwrap_err();
        assert!(
            err.contains("udp:1714-1764") && err.contains("run past 65535"),
            "{err}"
        );
    }

    #[test]
    fn expiries_are_checked_not_overflowed() {
        let now = SystemTime::now();
        let max = expiry_after(MAX_EXPIRE).unwrap();
        assert!(max >= now + MAX_EXPIRE);
        for wait in [
            MAX_EXPIRE + Duration::from_secs(1),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            let err = expiry_after(wait).unwrap_err();
            assert!(err.contains("100y"), "{err}");
        }
        assert!(expiry_after(Duration::ZERO).unwrap() >= now);
    }

    #[test]
    fn relay_encoding() {
        let relay = Relay {
            group: Ipv4Addr::new(224, 0, 0, 167),
            port: 53317,
            targets: vec![Ipv4Addr::new(10, 137, 0, 17), Ipv4Addr::new(10, 137, 0, 18)],
            ttl: Some(2),
            rate: 4,
            rate_down: 10,
            allow: "192.168.1.0/24".parse().unwrap(),
        };
        let value = relay.encode(3);
        assert_eq!(value.n_targets, 2);
        assert_eq!(value.targets[1].to_ne_bytes(), [10, 137, 0, 18]);
        assert_eq!((value.ttl, value.slot), (2, 3));
        assert_eq!(value.up, RateLimit::per_second(4));
        assert_eq!(value.down, RateLimit::per_second(10));
        assert_eq!((value.allow.kind, value.allow.n_cidrs), (ALLOW_LIST, 1));
        assert_eq!(relay.key().port.to_ne_bytes(), 53317u16.to_be_bytes());
        assert!(
            check_relays(&[relay.clone(), relay])
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn non_unicast_targets_are_rejected() {
        for target in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [224, 0, 0, 167],
            [255, 255, 255, 255],
        ] {
            assert!(
                check(&[rule(Proto::Udp, 1, target, 1)]).is_err(),
                "{target:?}"
            );
        }
    }
}
