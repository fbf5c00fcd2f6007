//! The textual forms operators type: forward specs, allow-from lists, CIDRs.
//! Every error names the accepted form, so a bad flag or config value can be
//! fixed from the message alone.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use forwarder_common::maps::{
    Cidr, MAX_ALLOW_CIDRS, MAX_RELAY_TARGETS, PROTO_TCP, PROTO_UDP, prefix_to_mask,
};

pub const FORWARD_FORM: &str = "PROTO:PORT[=TARGET_IP[:TARGET_PORT]], PROTO tcp or udp, PORT a port 1-65535 or a range FIRST-LAST, TARGET_PORT where the port or range starts at the target (e.g. tcp:53317=10.137.0.17, udp:5000=10.137.0.17:6000 or tcp:1714-1764=10.137.0.17)";
pub const RELAY_FORM: &str = "GROUP:PORT=TARGET_IP[,TARGET_IP...], GROUP an IPv4 multicast address or 255.255.255.255 (broadcast), up to 8 unicast targets (e.g. 224.0.0.167:53317=10.137.0.17)";
pub const ALLOW_FROM_FORM: &str =
    "auto, any, or a comma-separated list of up to 8 IPv4 CIDRs (e.g. 192.168.1.0/24,10.0.0.7)";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    pub fn from_number(number: u8) -> Option<Proto> {
        match number {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!("unknown protocol {s:?}: expected tcp or udp")),
        }
    }
}

fn parse_port(s: &str, what: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{what} {s:?} is not a port number 1-65535")),
        Ok(port) => Ok(port),
    }
}

/// A port or an inclusive range of ports, as `80` or `1714-1764`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    pub const fn one(port: u16) -> Self {
        Ports {
            first: port,
            last: port,
        }
    }

    /// How many ports (never none).
    pub const fn count(&self) -> u32 {
        (self.last - self.first) as u32 + 1
    }

    pub const fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    pub const fn overlaps(&self, other: &Ports) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// The range of the same length starting at `first`, if it fits.
    pub fn starting_at(&self, first: u16) -> Option<Ports> {
        let last = u32::from(first) + self.count() - 1;
        (last <= u32::from(u16::MAX)).then_some(Ports {
            first,
            last: last as u16,
        })
    }

    fn parse(s: &str, what: &str) -> Result<Ports, String> {
        match s.split_once('-') {
            None => parse_port(s, what).map(Ports::one),
            Some((first, last)) => {
                let first = parse_port(first, what)?;
                let last = parse_port(last, what)?;
                if last < first {
                    return Err(format!("{what} range {s:?} ends before it starts"));
                }
                Ok(Ports { first, last })
            }
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// An IPv4 address; `what` names it in the error ("target", "group").
pub fn parse_ipv4(s: &str, what: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| format!("{what} {s:?} is not an IPv4 address"))
}

/// `PROTO:PORT[=TARGET_IP[:TARGET_PORT]]`, PORT a port or a range. A
/// missing target address means "the default target"; a missing target
/// port means "the same ports"; a target port shifts the range to start
/// there (given as a range, it must be as long).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardSpec {
    pub proto: Proto,
    pub ports: Ports,
    pub target: Option<Ipv4Addr>,
    /// Where the ports start at the target.
    pub target_port: Option<u16>,
}

impl FromStr for ForwardSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let fail = |why: String| format!("{why}; expected {FORWARD_FORM}");
        let (listen, target) = match s.split_once('=') {
            Some((listen, target)) => (listen, Some(target)),
            None => (s, None),
        };
        let (proto, port) = listen
            .split_once(':')
            .ok_or_else(|| fail(format!("{s:?} has no PROTO:PORT")))?;
        let proto = proto.parse::<Proto>().map_err(fail)?;
        let ports = Ports::parse(port, "listen port").map_err(fail)?;
        let (target, target_port) = match target {
            None => (None, None),
            Some(target) => {
                let (addr, tport) = match target.split_once(':') {
                    Some((addr, tport)) => (addr, Some(tport)),
                    None => (target, None),
                };
                let addr = parse_ipv4(addr, "target").map_err(fail)?;
                let tport = match tport {
                    None => None,
                    Some(p) => {
                        let shifted = Ports::parse(p, "target port").map_err(fail)?;
                        if shifted.first != shifted.last && shifted.count() != ports.count() {
                            return Err(fail(format!(
                                "target ports {shifted} are not as many as listen ports {ports}"
                            )));
                        }
                        if ports.starting_at(shifted.first).is_none() {
                            return Err(fail(format!(
                                "{} ports from {} run past 65535",
                                ports.count(),
                                shifted.first
                            )));
                        }
                        Some(shifted.first)
                    }
                };
                (Some(addr), tport)
            }
        };
        Ok(ForwardSpec {
            proto,
            ports,
            target,
            target_port,
        })
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.proto, self.ports)?;
        if let Some(target) = self.target {
            write!(f, "={target}")?;
            if let Some(port) = self.target_port {
                write!(f, ":{port}")?;
            }
        }
        Ok(())
    }
}

/// `PROTO:PORT`: names a forward rule by what it listens on (a range by
/// the whole range).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub proto: Proto,
    pub ports: Ports,
}

impl FromStr for RuleRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let fail =
            |why: String| format!("{why}; expected PROTO:PORT or PROTO:FIRST-LAST, e.g. tcp:8080");
        let (proto, ports) = s
            .split_once(':')
            .ok_or_else(|| fail(format!("{s:?} has no ':'")))?;
        Ok(RuleRef {
            proto: proto.parse().map_err(fail)?,
            ports: Ports::parse(ports, "port").map_err(fail)?,
        })
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.proto, self.ports)
    }
}

/// `GROUP:PORT=TARGET_IP[,TARGET_IP...]`: UDP datagrams to the group and
/// port are copied between the LAN and the targets, in both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySpec {
    pub group: Ipv4Addr,
    pub port: u16,
    pub targets: Vec<Ipv4Addr>,
}

impl FromStr for RelaySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let fail = |why: String| format!("{why}; expected {RELAY_FORM}");
        let (listen, targets) = s
            .split_once('=')
            .ok_or_else(|| fail(format!("{s:?} has no =TARGET_IP")))?;
        let (group, port) = listen
            .split_once(':')
            .ok_or_else(|| fail(format!("{listen:?} has no GROUP:PORT")))?;
        let group = parse_ipv4(group, "group").map_err(fail)?;
        if !group.is_multicast() && !group.is_broadcast() {
            return Err(fail(format!(
                "group {group} is neither a multicast address nor 255.255.255.255"
            )));
        }
        let port = parse_port(port, "port").map_err(fail)?;
        let targets = targets
            .split(',')
            .map(|t| parse_ipv4(t.trim(), "target"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        if targets.len() > MAX_RELAY_TARGETS {
            return Err(fail(format!("{} targets given", targets.len())));
        }
        if let Some(bad) = targets.iter().find(|t| !is_unicast(**t)) {
            return Err(fail(format!("target {bad} is not a unicast host")));
        }
        Ok(RelaySpec {
            group,
            port,
            targets,
        })
    }
}

impl fmt::Display for RelaySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let targets: Vec<String> = self.targets.iter().map(ToString::to_string).collect();
        write!(f, "{}:{}={}", self.group, self.port, targets.join(","))
    }
}

/// A host address a rule or relay may target.
pub fn is_unicast(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast())
}

/// `--relay-rate`: copies per second toward the LAN, 1 to 1,000,000.
pub fn parse_rate(s: &str) -> Result<u32, String> {
    let digits = s.strip_suffix("/s").unwrap_or(s);
    match digits.parse::<u32>() {
        Ok(rate @ 1..=1_000_000) => Ok(rate),
        _ => Err(format!(
            "{s:?} is not a rate: expected PKTS or PKTS/s, 1 to 1000000 (e.g. 25/s)"
        )),
    }
}

/// `--relay-ttl`: 1 to 255.
pub fn parse_ttl(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(ttl @ 1..=255) => Ok(ttl),
        _ => Err(format!("{s:?} is not a TTL: expected 1 to 255")),
    }
}

/// An IPv4 network. Host bits must be zero: `192.168.1.5/24` is almost
/// certainly a typo for one of two different things.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// The datapath's form, address and mask in wire order.
    pub fn wire(&self) -> Cidr {
        Cidr {
            addr: u32::from_ne_bytes(self.addr.octets()),
            mask: prefix_to_mask(self.prefix_len),
        }
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.wire().contains(u32::from_ne_bytes(addr.octets()))
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix_len) = match s.split_once('/') {
            Some((addr, len)) => {
                let len = len
                    .parse::<u8>()
                    .ok()
                    .filter(|len| *len <= 32)
                    .ok_or_else(|| format!("{s:?}: prefix length must be 0-32"))?;
                (addr, len)
            }
            None => (s, 32),
        };
        let addr = parse_ipv4(addr, "network")?;
        let cidr = Ipv4Cidr { addr, prefix_len };
        let wire = cidr.wire();
        let network = Ipv4Addr::from((wire.addr & wire.mask).to_ne_bytes());
        if network != addr {
            return Err(format!(
                "{s:?} has host bits set; the network is {network}/{prefix_len}"
            ));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Which peers may use a forward rule (and receive its replies).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AllowFrom {
    /// The uplink's connected subnet when its prefix is shorter than /32
    /// (a router on a LAN), otherwise any (an internal hop whose upstream
    /// router already filtered).
    #[default]
    Auto,
    Any,
    List(Vec<Ipv4Cidr>),
}

impl FromStr for AllowFrom {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let fail = |why: String| format!("{why}; expected {ALLOW_FROM_FORM}");
        match s.trim() {
            "auto" => Ok(AllowFrom::Auto),
            "any" => Ok(AllowFrom::Any),
            "" => Err(fail("empty allow-from".into())),
            list => {
                let cidrs = list
                    .split(',')
                    .map(|c| c.trim().parse::<Ipv4Cidr>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(fail)?;
                if cidrs.len() > MAX_ALLOW_CIDRS {
                    return Err(fail(format!("{} CIDRs given", cidrs.len())));
                }
                Ok(AllowFrom::List(cidrs))
            }
        }
    }
}

impl fmt::Display for AllowFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowFrom::Auto => f.write_str("auto"),
            AllowFrom::Any => f.write_str("any"),
            AllowFrom::List(cidrs) => {
                let parts: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_full_form() {
        let spec: ForwardSpec = "udp:5000=10.137.0.17:6000".parse().unwrap();
        assert_eq!(
            spec,
            ForwardSpec {
                proto: Proto::Udp,
                ports: Ports::one(5000),
                target: Some(Ipv4Addr::new(10, 137, 0, 17)),
                target_port: Some(6000),
            }
        );
        assert_eq!(spec.to_string(), "udp:5000=10.137.0.17:6000");
    }

    #[test]
    fn forward_short_forms() {
        let spec: ForwardSpec = "TCP:53317".parse().unwrap();
        assert_eq!(
            (spec.proto, spec.ports, spec.target),
            (Proto::Tcp, Ports::one(53317), None)
        );
        let spec: ForwardSpec = "tcp:80=10.0.0.1".parse().unwrap();
        assert_eq!(spec.target_port, None);
        assert_eq!(spec.target, Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn forward_ranges_keep_or_shift_their_ports() {
        let spec: ForwardSpec = "tcp:1714-1764=10.137.0.17".parse().unwrap();
        assert_eq!(
            spec.ports,
            Ports {
                first: 1714,
                last: 1764
            }
        );
        assert_eq!((spec.ports.count(), spec.target_port), (51, None));
        assert_eq!(spec.to_string(), "tcp:1714-1764=10.137.0.17");
        let shifted: ForwardSpec = "udp:1714-1764=10.137.0.17:2714-2764".parse().unwrap();
        assert_eq!(shifted.target_port, Some(2714));
        let by_start: ForwardSpec = "udp:1714-1764=10.137.0.17:2714".parse().unwrap();
        assert_eq!(by_start.target_port, Some(2714));
        for (input, needle) in [
            ("tcp:1764-1714=10.0.0.1", "ends before it starts"),
            ("tcp:1714-1764=10.0.0.1:2714-2715", "not as many"),
            ("tcp:1000-2000=10.0.0.1:65000", "run past 65535"),
            ("tcp:1-x", "not a port number"),
        ] {
            let err = input.parse::<ForwardSpec>().unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
        }
        let r: RuleRef = "tcp:1714-1764".parse().unwrap();
        assert_eq!(r.to_string(), "tcp:1714-1764");
        assert!(
            Ports {
                first: 10,
                last: 20
            }
            .overlaps(&Ports::one(20))
        );
        assert!(
            !Ports {
                first: 10,
                last: 20
            }
            .overlaps(&Ports::one(21))
        );
    }

    #[test]
    fn forward_errors_name_the_problem_and_the_form() {
        for (input, needle) in [
            ("sctp:80", "unknown protocol"),
            ("tcp", "has no PROTO:PORT"),
            ("tcp:0", "not a port number"),
            ("tcp:65536", "not a port number"),
            ("tcp:80=10.0.0", "not an IPv4 address"),
            ("tcp:80=10.0.0.1:x", "target port"),
            ("tcp:80=", "not an IPv4 address"),
        ] {
            let err = input.parse::<ForwardSpec>().unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
            assert!(
                err.contains("PROTO:PORT[=TARGET_IP[:TARGET_PORT]]"),
                "{input}: {err}"
            );
        }
    }

    #[test]
    fn relay_forms() {
        let relay: RelaySpec = "224.0.0.167:53317=10.137.0.17,10.137.0.18".parse().unwrap();
        assert_eq!(relay.group, Ipv4Addr::new(224, 0, 0, 167));
        assert_eq!(relay.targets.len(), 2);
        assert_eq!(
            relay.to_string(),
            "224.0.0.167:53317=10.137.0.17,10.137.0.18"
        );
        for (input, needle) in [
            ("224.0.0.167:53317", "has no =TARGET_IP"),
            ("10.0.0.1:53317=10.0.0.2", "neither a multicast"),
            ("224.0.0.167:0=10.0.0.2", "not a port number"),
            ("224.0.0.167:1=224.0.0.1", "not a unicast host"),
            ("224.0.0.167:1=10.0.0.300", "not an IPv4 address"),
        ] {
            let err = input.parse::<RelaySpec>().unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
            assert!(err.contains("GROUP:PORT=TARGET_IP"), "{input}: {err}");
        }
        let nine = ["10.0.0.1"; 9].join(",");
        assert!(
            format!("224.0.0.1:1={nine}")
                .parse::<RelaySpec>()
                .unwrap_err()
                .contains("9 targets")
        );
    }

    #[test]
    fn rate_and_ttl() {
        assert_eq!(parse_rate("25"), Ok(25));
        assert_eq!(parse_rate("25/s"), Ok(25));
        assert!(parse_rate("0").unwrap_err().contains("PKTS/s"));
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_ttl("2"), Ok(2));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("256").is_err());
    }

    #[test]
    fn cidr_parsing() {
        let c: Ipv4Cidr = "192.168.1.0/24".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(192, 168, 1, 200)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 2, 1)));
        let host: Ipv4Cidr = "10.0.0.7".parse().unwrap();
        assert_eq!(host.prefix_len, 32);
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        let err = "192.168.1.5/24".parse::<Ipv4Cidr>().unwrap_err();
        assert!(err.contains("192.168.1.0/24"), "{err}");
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn allow_from_forms() {
        assert_eq!("auto".parse::<AllowFrom>().unwrap(), AllowFrom::Auto);
        assert_eq!("any".parse::<AllowFrom>().unwrap(), AllowFrom::Any);
        let list: AllowFrom = "192.168.1.0/24, 10.0.0.7".parse().unwrap();
        assert_eq!(list.to_string(), "192.168.1.0/24,10.0.0.7/32");
        let nine = ["10.0.0.1"; 9].join(",");
        assert!(nine.parse::<AllowFrom>().unwrap_err().contains("up to 8"));
        assert!("".parse::<AllowFrom>().is_err());
        assert!(
            "lan"
                .parse::<AllowFrom>()
                .unwrap_err()
                .contains("auto, any")
        );
    }
}
