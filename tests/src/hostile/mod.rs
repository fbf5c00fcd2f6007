//! Hostile input for the datapath: frames generated from templates of every
//! kind the programs handle, then bent (header fields, lengths, flags,
//! options, fragments, VLAN tags, IPv6, zero and all-ones checksums, TTL 0
//! and 1, ICMP errors quoting forwarded flows) or replaced by noise, and an
//! oracle for what the programs may do with each one:
//!
//! - the verdict is pass (`TC_ACT_UNSPEC`), redirect, or drop, and a drop
//!   only ever hits an ICMP error quoting a forwarded flow;
//! - a passed packet comes back byte for byte (a relay's copies are edits
//!   that must be undone);
//! - a redirected packet matched a rule, and differs from its input only in
//!   the fields the translation owns: one address, one port, the TTL (one
//!   less), the two checksums (valid exactly when they were valid before)
//!   and the MACs;
//! - a target's packet is translated back only as part of a flow an earlier
//!   LAN packet opened (the oracle keeps the flows it saw redirected);
//! - nothing sent toward the uplink carries an internal address.

use std::net::Ipv4Addr;

use anyhow::{Result, bail, ensure};
use forwarder::{
    datapath::Role,
    rules::{Origin, Relay, Rule},
    spec::{AllowFrom, Ports, Proto},
};
use forwarder_common::{csum, maps::group_mac};

use crate::{
    packet::{Frame, ICMP, TCP, UDP, icmp_error},
    testrun::*,
};

/// xorshift64*: deterministic from a seed, so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 167);

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
    vec![Relay {
        group: GROUP,
        port: 53317,
        targets: vec![TARGET, OTHER_VM],
        ttl: None,
        rate: 1_000_000,
        rate_down: 1_000_000,
        allow: forwarder::spec::AllowFrom::Auto,
    }]
}

/// The flows redirected LAN packets opened: peer address and port,
/// protocol, listen port.
pub type Flows = std::collections::HashSet<(Ipv4Addr, u16, u8, u16)>;

/// A frame and where it is fed in.
pub struct Case {
    pub role: Role,
    pub ifindex: u32,
    pub frame: Vec<u8>,
}

fn addr(rng: &mut Rng) -> Ipv4Addr {
    let pool = [
        LAN_PEER,
        Ipv4Addr::new(192, 168, 1, 200),
        Ipv4Addr::new(192, 168, 7, 7),
        Ipv4Addr::new(8, 8, 8, 8),
        UPLINK_ADDR,
        TARGET,
        OTHER_VM,
        UNRESOLVED,
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(0, 0, 0, 0),
        Ipv4Addr::new(255, 255, 255, 255),
        GROUP,
        Ipv4Addr::new(10, 138, 0, 1),
    ];
    if rng.chance(10) {
        Ipv4Addr::from(rng.next_u64() as u32)
    } else {
        rng.pick(&pool)
    }
}

fn port(rng: &mut Rng) -> u16 {
    if rng.chance(15) {
        rng.next_u64() as u16
    } else {
        rng.pick(&[53317, 53317, 8080, 80, 5000, 22, 0, 65535])
    }
}

/// One generated case: a template, then bent. Half the targets' packets
/// answer a flow in `flows`.
pub fn generate(h: &Harness, rng: &mut Rng, flows: &[(Ipv4Addr, u16, u8, u16)]) -> Case {
    let payload: Vec<u8> = (0..rng.below(300)).map(|_| rng.next_u64() as u8).collect();
    let (role, ifindex, mut frame) = match rng.below(6) {
        // From the LAN toward the uplink's address.
        0 | 1 => {
            let src = if rng.chance(50) { LAN_PEER } else { addr(rng) };
            let mut f = if rng.chance(50) {
                Frame::tcp(src, port(rng), UPLINK_ADDR, port(rng))
            } else {
                Frame::udp(src, port(rng), UPLINK_ADDR, port(rng))
            };
            f.src_mac = if rng.chance(5) {
                h.uplink.mac
            } else {
                LAN_PEER_MAC
            };
            (Role::Uplink, h.uplink.index, f)
        }
        // A target's reply, or something posing as one.
        2 if !flows.is_empty() && rng.chance(50) => {
            let (peer, peer_port, proto, listen) = flows[rng.below(flows.len() as u64) as usize];
            let rule = rules()
                .into_iter()
                .find(|r| r.proto.number() == proto && r.ports.contains(listen))
                .expect("flows are of installed rules");
            let target_port = rule.target_port + (listen - rule.ports.first);
            let f = if proto == TCP {
                Frame::tcp(rule.target, target_port, peer, peer_port)
            } else {
                Frame::udp(rule.target, target_port, peer, peer_port)
            };
            (
                Role::Downstream,
                rng.pick(&[h.vif1.index, h.vif1.index, h.vif2.index]),
                f,
            )
        }
        2 => {
            let src = rng.pick(&[TARGET, TARGET, OTHER_VM, UNRESOLVED, LAN_PEER]);
            let dst = if rng.chance(50) { LAN_PEER } else { addr(rng) };
            let f = if rng.chance(50) {
                Frame::tcp(src, port(rng), dst, port(rng))
            } else {
                Frame::udp(src, port(rng), dst, port(rng))
            };
            (Role::Downstream, rng.pick(&[h.vif1.index, h.vif2.index]), f)
        }
        // A discovery announcement, from either side.
        3 => {
            let from_lan = rng.chance(50);
            let src = if from_lan {
                rng.pick(&[LAN_PEER, UPLINK_ADDR, Ipv4Addr::new(192, 168, 7, 7)])
            } else {
                rng.pick(&[TARGET, OTHER_VM, UNRESOLVED])
            };
            let mut f = Frame::udp(src, port(rng), GROUP, rng.pick(&[53317, 53317, 5353]));
            f.dst_mac = group_mac(u32::from_ne_bytes(GROUP.octets()));
            f.ttl = rng.pick(&[1, 2, 64]);
            if from_lan {
                f.src_mac = if rng.chance(10) {
                    h.uplink.mac
                } else {
                    LAN_PEER_MAC
                };
                (Role::Uplink, h.uplink.index, f)
            } else {
                (Role::Downstream, rng.pick(&[h.vif1.index, h.vif2.index]), f)
            }
        }
        // An ICMP error quoting a flow, forwarded or not.
        4 => {
            let quoted = if rng.chance(50) {
                Frame::udp(addr(rng), port(rng), TARGET, 53317)
            } else {
                Frame::tcp(addr(rng), port(rng), addr(rng), port(rng))
            }
            .build();
            let bytes = icmp_error(
                rng.pick(&[TARGET, OTHER_VM]),
                addr(rng),
                rng.pick(&[3, 11, 12, 0, 5]),
                rng.below(16) as u8,
                &quoted,
            );
            let ifindex = rng.pick(&[h.vif1.index, h.vif2.index, h.uplink.index]);
            let role = if ifindex == h.uplink.index {
                Role::Uplink
            } else {
                Role::Downstream
            };
            return Case {
                role,
                ifindex,
                frame: bend(rng, bytes),
            };
        }
        // Noise behind an IPv4 EtherType.
        _ => {
            let len = 34 + rng.below(200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            bytes[12] = 0x08;
            bytes[13] = 0x00;
            bytes[14] = 0x40 | (bytes[14] & 0x0f);
            let (role, ifindex) = if rng.chance(50) {
                (Role::Uplink, h.uplink.index)
            } else {
                (Role::Downstream, h.vif1.index)
            };
            return Case {
                role,
                ifindex,
                frame: bytes,
            };
        }
    };
    frame.payload = payload;
    // A share of frames stay as built, so the rewriting paths (and their
    // checksums) are exercised as much as the refusals.
    if rng.chance(30) {
        return Case {
            role,
            ifindex,
            frame: frame.build(),
        };
    }
    if rng.chance(20) {
        frame.ttl = rng.pick(&[0, 1, 2, 255]);
    }
    if rng.chance(10) {
        frame.frag = rng.pick(&[0x2000, 0x0001, 0x3fff, 0x8000]);
    }
    if rng.chance(5) {
        frame.ip_options = vec![1; 4 * (1 + rng.below(10) as usize)];
    }
    if rng.chance(5) {
        frame.vlan = Some(rng.next_u64() as u16);
    }
    if rng.chance(5) {
        let random = rng.next_u64() as u16;
        frame.ether_type = rng.pick(&[0x86dd, 0x0806, 0x88a8, random]);
    }
    if rng.chance(5) {
        frame.udp_no_checksum = true;
    }
    if rng.chance(5) {
        frame.tot_len = Some(rng.next_u64() as u16);
    }
    Case {
        role,
        ifindex,
        frame: bend(rng, frame.build()),
    }
}

/// Byte-level damage after the frame was built: checksums forced to 0 or
/// 0xffff, bits flipped, the tail cut off.
fn bend(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    if rng.chance(5) && bytes.len() >= 26 {
        let v = rng.pick(&[0x0000u16, 0xffff]);
        bytes[24..26].copy_from_slice(&v.to_be_bytes());
    }
    if rng.chance(5) && bytes.len() >= 42 {
        let at = if bytes[23] == TCP { 50 } else { 40 };
        if bytes.len() >= at + 2 {
            let v = rng.pick(&[0x0000u16, 0xffff]);
            bytes[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
    }
    if rng.chance(10) {
        for _ in 0..=rng.below(4) {
            let i = rng.below(bytes.len() as u64) as usize;
            bytes[i] ^= 1 << rng.below(8);
        }
    }
    if rng.chance(10) && bytes.len() > 34 {
        let keep = 34 + rng.below((bytes.len() - 34) as u64) as usize;
        bytes.truncate(keep);
    }
    bytes
}

/// The parts of a frame the oracle reasons about, read defensively.
#[derive(Clone, Copy, Debug)]
struct View {
    proto: u8,
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    ttl: u8,
    sport: u16,
    dport: u16,
    ip_ok: bool,
    l4_ok: bool,
}

fn view(frame: &[u8]) -> Option<View> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 {
        return None;
    }
    let ip = &frame[14..];
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if tot_len < 28 || tot_len > ip.len() {
        return None;
    }
    let l4 = &ip[20..tot_len];
    let saddr = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let daddr = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let pseudo = csum::pseudo_header_sum(saddr.octets(), daddr.octets(), ip[9], l4.len() as u16);
    let udp_none = ip[9] == UDP && l4[6] == 0 && l4[7] == 0;
    Some(View {
        proto: ip[9],
        saddr,
        daddr,
        ttl: ip[8],
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        ip_ok: csum::verifies(0, &ip[..20]),
        l4_ok: udp_none || csum::verifies(pseudo, l4),
    })
}

/// Addresses that live behind the harness's downstream interfaces or on
/// the router itself: none may be claimed as a LAN source, and none may
/// travel toward the uplink. (Other 10/8 addresses route out of the uplink
/// in the harness and are ordinary LAN-side addresses there.)
fn internal(addr: Ipv4Addr) -> bool {
    [TARGET, OTHER_VM, UNRESOLVED, Ipv4Addr::new(10, 138, 0, 1)].contains(&addr)
}

/// Byte offsets a translation may change: MACs, TTL, IP checksum, the
/// address and port at one end, and the transport checksum.
fn owned(proto: u8, source_end: bool) -> Vec<std::ops::Range<usize>> {
    let (addr, port) = if source_end {
        (26..30, 34..36)
    } else {
        (30..34, 36..38)
    };
    let check = if proto == TCP { 50..52 } else { 40..42 };
    vec![0..12, 22..23, 24..26, addr, port, check]
}

fn only_owned_changed(input: &[u8], output: &[u8], owned: &[std::ops::Range<usize>]) -> Result<()> {
    ensure!(
        input.len() == output.len(),
        "length changed: {} -> {}",
        input.len(),
        output.len()
    );
    for (i, (a, b)) in input.iter().zip(output).enumerate() {
        if a != b && !owned.iter().any(|r| r.contains(&i)) {
            bail!("byte {i} changed ({a:#04x} -> {b:#04x}) outside the translated fields");
        }
    }
    Ok(())
}

/// What the oracle concluded about one case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Passed,
    Redirected,
    Dropped,
}

/// Checks one program run against the properties above, and records the
/// flow a redirected LAN packet opens.
pub fn check(
    rules: &[Rule],
    flows: &mut Flows,
    case: &Case,
    action: i32,
    output: &[u8],
) -> Result<Outcome> {
    match action {
        TC_ACT_UNSPEC => {
            ensure!(output == case.frame, "passed but changed");
            Ok(Outcome::Passed)
        }
        TC_ACT_SHOT => {
            ensure!(
                case.role == Role::Downstream,
                "the uplink program dropped a packet"
            );
            let ip = &case.frame[14..];
            ensure!(
                case.frame[12..14] == [0x08, 0x00]
                    && ip[9] == ICMP
                    && matches!(ip[20], 3 | 11 | 12),
                "dropped a packet that is not an ICMP error"
            );
            let quoted = &ip[28..];
            let (daddr, proto) = (
                Ipv4Addr::new(quoted[16], quoted[17], quoted[18], quoted[19]),
                quoted[9],
            );
            let dport = u16::from_be_bytes([quoted[22], quoted[23]]);
            ensure!(
                rules.iter().any(|r| r.target == daddr
                    && r.target_ports().is_some_and(|t| t.contains(dport))
                    && r.proto.number() == proto),
                "dropped an ICMP error quoting {daddr}:{dport}, which is no forwarded flow"
            );
            Ok(Outcome::Dropped)
        }
        TC_ACT_REDIRECT => {
            let (inp, out) = match (view(&case.frame), view(output)) {
                (Some(i), Some(o)) => (i, o),
                _ => bail!("redirected a frame that is not plain IPv4 TCP/UDP"),
            };
            ensure!(
                matches!(inp.proto, TCP | UDP),
                "redirected protocol {}",
                inp.proto
            );
            let frag = u16::from_be_bytes([case.frame[20], case.frame[21]]) & 0x3fff;
            ensure!(frag == 0, "redirected a fragment");
            ensure!(
                inp.ttl >= 2 && out.ttl == inp.ttl - 1,
                "TTL {} -> {}",
                inp.ttl,
                out.ttl
            );
            ensure!(
                out.ip_ok == inp.ip_ok,
                "IP checksum validity changed ({} -> {})",
                inp.ip_ok,
                out.ip_ok
            );
            ensure!(
                out.l4_ok == inp.l4_ok,
                "L4 checksum validity changed ({} -> {})",
                inp.l4_ok,
                out.l4_ok
            );
            match case.role {
                Role::Uplink => {
                    let rule = rules
                        .iter()
                        .find(|r| r.proto.number() == inp.proto && r.ports.contains(inp.dport))
                        .ok_or_else(|| {
                            anyhow::anyhow!("redirected {}:{} with no rule", inp.proto, inp.dport)
                        })?;
                    ensure!(
                        inp.daddr == UPLINK_ADDR,
                        "redirected a packet to {}",
                        inp.daddr
                    );
                    ensure!(
                        !internal(inp.saddr)
                            && !inp.saddr.is_loopback()
                            && inp.saddr != UPLINK_ADDR,
                        "claimed source {}",
                        inp.saddr
                    );
                    ensure!(
                        (out.daddr, out.dport)
                            == (
                                rule.target,
                                rule.target_port + (inp.dport - rule.ports.first)
                            ),
                        "translated to {}:{}",
                        out.daddr,
                        out.dport
                    );
                    flows.insert((inp.saddr, inp.sport, inp.proto, inp.dport));
                    only_owned_changed(&case.frame, output, &owned(inp.proto, false))
                }
                Role::Downstream => {
                    let rule = rules
                        .iter()
                        .find(|r| {
                            r.proto.number() == inp.proto
                                && r.target == inp.saddr
                                && r.target_ports().is_some_and(|t| t.contains(inp.sport))
                        })
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "translated a reply from {}:{} with no rule",
                                inp.saddr,
                                inp.sport
                            )
                        })?;
                    ensure!(
                        (out.saddr, out.sport)
                            == (
                                UPLINK_ADDR,
                                rule.ports.first + (inp.sport - rule.target_port)
                            ),
                        "reply sent as {}:{}",
                        out.saddr,
                        out.sport
                    );
                    ensure!(
                        !internal(out.daddr),
                        "reply to an internal address {}",
                        out.daddr
                    );
                    ensure!(
                        flows.contains(&(out.daddr, out.dport, inp.proto, out.sport)),
                        "translated a target's packet to {}:{}, which opened no flow",
                        out.daddr,
                        out.dport
                    );
                    only_owned_changed(&case.frame, output, &owned(inp.proto, true))
                }
            }?;
            Ok(Outcome::Redirected)
        }
        other => bail!("unexpected TC action {other}"),
    }
}

/// A hostile run's tally.
#[derive(Debug, Default)]
pub struct Tally {
    pub tried: u64,
    pub passed: u64,
    pub redirected: u64,
    pub dropped: u64,
    /// Frames BPF_PROG_TEST_RUN itself refused (EINVAL: it will not build
    /// an skb from an IPv4 frame whose IP header it cannot read), so no
    /// program saw them.
    pub refused: u64,
    /// Frames the relay copied out of the uplink, all checked.
    pub uplink_copies: u64,
}

fn refused(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<aya::programs::ProgramError>()
            .map(|e| e.to_string())
            .or_else(|| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .map(|e| e.to_string())
            })
            .is_some_and(|text| text.contains("Invalid argument"))
    })
}

/// Runs `count` generated cases from `seed` through the programs, checking
/// each, and every frame that reaches the uplink's far end.
pub fn run(count: u64, seed: u64, mut keep_going: impl FnMut(&Tally) -> bool) -> Result<Tally> {
    let rules = rules();
    let h = Harness::with_relays(&rules, &relays())?;
    let lan = crate::capture::Capture::start(&h.ns, "lan0")?;
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let mut flows = Flows::new();
    let mut open: Vec<(Ipv4Addr, u16, u8, u16)> = Vec::new();
    while tally.tried < count && keep_going(&tally) {
        let case = generate(&h, &mut rng, &open);
        tally.tried += 1;
        let (action, output) = match h.run(case.role, case.ifindex, &case.frame) {
            Ok(result) => result,
            Err(err) if refused(&err) => {
                tally.refused += 1;
                continue;
            }
            Err(err) => return Err(err),
        };
        let known = flows.len();
        let outcome = check(&rules, &mut flows, &case, action, &output);
        if flows.len() > known {
            open = flows.iter().copied().collect();
        }
        match outcome {
            Ok(Outcome::Passed) => tally.passed += 1,
            Ok(Outcome::Redirected) => tally.redirected += 1,
            Ok(Outcome::Dropped) => tally.dropped += 1,
            Err(err) => bail!(
                "case {} of seed {seed:#x} ({:?} on ifindex {}): {err:#}\nframe: {:02x?}",
                tally.tried - 1,
                case.role,
                case.ifindex,
                case.frame
            ),
        }
    }
    for frame in lan.finish() {
        let addresses = crate::capture::addresses(&frame);
        if frame[12..14] == [0x08, 0x00] {
            tally.uplink_copies += 1;
        }
        ensure!(
            !addresses.iter().any(|a| internal(*a)),
            "a frame toward the uplink carries an internal address: {}",
            crate::capture::describe(&frame)
        );
    }
    Ok(tally)
}
