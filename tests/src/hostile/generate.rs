//! The generator: single frames built from templates of every kind the
//! programs handle and then bent (header fields, lengths, flags, options,
//! fragments, VLAN tags, IPv6, zero and all-ones checksums, TTL 0 and 1,
//! ICMP errors quoting forwarded flows) or replaced by noise; discovery
//! datagrams with addresses embedded (see payloads); fragment trains (see
//! trains) and TCP conversations (see tcp), whose packets are interleaved
//! with each other and with everything else.
//!
//! Addresses and ports come from fixed pools, so the tables the oracle
//! mirrors never fill: their LRU evictions would be guesswork.

use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use forwarder::datapath::Role;
use forwarder_common::maps::{FlowKey, group_mac};

use super::{
    case::{Case, Claim},
    payloads,
    rng::Rng,
    setup::{GROUP, relay_groups, rules},
    tcp, trains,
};
use crate::{
    packet::{Frame, TCP, icmp_error},
    testrun::{Harness, LAN_PEER, LAN_PEER_MAC, OTHER_VM, TARGET, UNRESOLVED, UPLINK_ADDR},
};

/// How long a held-back fragment waits: past the train's two seconds.
const HOLD: Duration = Duration::from_millis(2100);

pub struct Generator {
    rng: Rng,
    /// Random addresses and ports, drawn once.
    addrs: Vec<Ipv4Addr>,
    ports: Vec<u16>,
    /// Scenarios under way: the rest of their packets, in order.
    pending: Vec<VecDeque<Case>>,
    held: Vec<(Instant, Case)>,
    datagrams: u64,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let addrs = (0..64)
            .map(|_| Ipv4Addr::from(rng.next_u64() as u32))
            .collect();
        let ports = (0..64).map(|_| rng.next_u64() as u16).collect();
        Generator {
            rng,
            addrs,
            ports,
            pending: Vec::new(),
            held: Vec::new(),
            datagrams: 0,
        }
    }

    /// The next case: a held-back fragment whose time has come, the next
    /// packet of a scenario under way, or something new. `flows` are the
    /// flows the oracle knows, which targets' packets may answer.
    pub fn next(&mut self, h: &Harness, flows: &[FlowKey]) -> Case {
        if let Some(i) = self.held.iter().position(|(due, _)| *due <= Instant::now()) {
            return self.held.swap_remove(i).1;
        }
        if !self.pending.is_empty() && self.rng.chance(45) {
            let i = self.rng.below(self.pending.len() as u64) as usize;
            let case = self.pending[i]
                .pop_front()
                .expect("scenarios are never empty");
            if self.pending[i].is_empty() {
                self.pending.swap_remove(i);
            }
            return case;
        }
        self.datagrams += 1;
        let scenario: Vec<Case> = match self.rng.below(20) {
            0..=3 => {
                let (cases, held) = trains::generate(h, &mut self.rng, self.datagrams);
                if let Some(case) = held {
                    let case = Case {
                        label: "train held back",
                        ..case
                    };
                    self.held.push((Instant::now() + HOLD, case));
                }
                cases
            }
            4..=6 => vec![self.announcement(h)],
            7..=8 => tcp::generate(h, &mut self.rng),
            _ => vec![self.single(h, flows)],
        };
        let mut scenario: VecDeque<Case> = scenario.into();
        let first = scenario.pop_front().expect("every scenario has a packet");
        if !scenario.is_empty() {
            self.pending.push(scenario);
        }
        first
    }

    /// A discovery datagram carried whole, with a generated payload: a
    /// VM's to a relay group, or a LAN host's.
    fn announcement(&mut self, h: &Harness) -> Case {
        let rng = &mut self.rng;
        let payload = payloads::generate(rng);
        let (group, port) = rng.pick(&relay_groups());
        let up = rng.chance(65);
        let (saddr, ifindex) = if up {
            rng.pick(&[
                (TARGET, h.vif1.index),
                (TARGET, h.vif1.index),
                (OTHER_VM, h.vif2.index),
                (UNRESOLVED, h.vif1.index),
            ])
        } else {
            (
                rng.pick(&[LAN_PEER, Ipv4Addr::new(192, 168, 1, 77)]),
                h.uplink.index,
            )
        };
        let mut f =
            Frame::udp(saddr, 5353 + rng.below(4) as u16, group, port).with_payload(&payload.bytes);
        f.ttl = rng.pick(&[1, 2, 255]);
        f.ip_id = rng.next_u64() as u16;
        f.frag = 0;
        f.dst_mac = if group == Ipv4Addr::BROADCAST {
            [0xff; 6]
        } else {
            group_mac(u32::from_ne_bytes(group.octets()))
        };
        if !up {
            f.src_mac = LAN_PEER_MAC;
        }
        f.udp_no_checksum = rng.chance(10);
        let claim = (up && payload.names_internal).then_some(Claim {
            datagram: self.datagrams,
            last: true,
        });
        Case {
            role: if up { Role::Downstream } else { Role::Uplink },
            ifindex,
            frame: f.build(),
            label: if up {
                "announcement up"
            } else {
                "announcement down"
            },
            claim,
        }
    }

    fn addr(&mut self) -> Ipv4Addr {
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
        if self.rng.chance(10) {
            self.rng.pick(&self.addrs)
        } else {
            self.rng.pick(&pool)
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.chance(15) {
            self.rng.pick(&self.ports)
        } else {
            self.rng.pick(&[53317, 53317, 8080, 80, 5000, 22, 0, 65535])
        }
    }

    /// One frame from a template, then bent. Half the targets' packets
    /// answer a flow in `flows`.
    fn single(&mut self, h: &Harness, flows: &[FlowKey]) -> Case {
        let payload: Vec<u8> = (0..self.rng.below(300))
            .map(|_| self.rng.next_u64() as u8)
            .collect();
        let (role, ifindex, mut frame) = match self.rng.below(6) {
            // From the LAN toward the uplink's address.
            0 | 1 => {
                let src = if self.rng.chance(50) {
                    LAN_PEER
                } else {
                    self.addr()
                };
                let (sport, dport) = (self.port(), self.port());
                let mut f = if self.rng.chance(50) {
                    Frame::tcp(src, sport, UPLINK_ADDR, dport)
                } else {
                    Frame::udp(src, sport, UPLINK_ADDR, dport)
                };
                f.src_mac = if self.rng.chance(5) {
                    h.uplink.mac
                } else {
                    LAN_PEER_MAC
                };
                (Role::Uplink, h.uplink.index, f)
            }
            // A target's reply, or something posing as one.
            2 if !flows.is_empty() && self.rng.chance(50) => {
                let key = flows[self.rng.below(flows.len() as u64) as usize];
                let (peer, peer_port, proto, listen) = (
                    Ipv4Addr::from(key.peer_addr.to_ne_bytes()),
                    u16::from_be(key.peer_port),
                    key.proto,
                    u16::from_be(key.listen_port),
                );
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
                let vif = self.rng.pick(&[h.vif1.index, h.vif1.index, h.vif2.index]);
                (Role::Downstream, vif, f)
            }
            2 => {
                let src = self
                    .rng
                    .pick(&[TARGET, TARGET, OTHER_VM, UNRESOLVED, LAN_PEER]);
                let dst = if self.rng.chance(50) {
                    LAN_PEER
                } else {
                    self.addr()
                };
                let (sport, dport) = (self.port(), self.port());
                let f = if self.rng.chance(50) {
                    Frame::tcp(src, sport, dst, dport)
                } else {
                    Frame::udp(src, sport, dst, dport)
                };
                let vif = self.rng.pick(&[h.vif1.index, h.vif2.index]);
                (Role::Downstream, vif, f)
            }
            // A discovery announcement, from either side.
            3 => {
                let from_lan = self.rng.chance(50);
                let src = if from_lan {
                    self.rng
                        .pick(&[LAN_PEER, UPLINK_ADDR, Ipv4Addr::new(192, 168, 7, 7)])
                } else {
                    self.rng.pick(&[TARGET, OTHER_VM, UNRESOLVED])
                };
                let sport = self.port();
                let dport = self.rng.pick(&[53317, 53317, 5353]);
                let mut f = Frame::udp(src, sport, GROUP, dport);
                f.dst_mac = group_mac(u32::from_ne_bytes(GROUP.octets()));
                f.ttl = self.rng.pick(&[1, 2, 64]);
                if from_lan {
                    f.src_mac = if self.rng.chance(10) {
                        h.uplink.mac
                    } else {
                        LAN_PEER_MAC
                    };
                    (Role::Uplink, h.uplink.index, f)
                } else {
                    let vif = self.rng.pick(&[h.vif1.index, h.vif2.index]);
                    (Role::Downstream, vif, f)
                }
            }
            // An ICMP error quoting a flow, forwarded or not.
            4 => {
                let quoted = if self.rng.chance(50) {
                    let (src, sport) = (self.addr(), self.port());
                    Frame::udp(src, sport, TARGET, 53317)
                } else {
                    let (src, sport, dst, dport) =
                        (self.addr(), self.port(), self.addr(), self.port());
                    Frame::tcp(src, sport, dst, dport)
                }
                .build();
                let (from, to) = (self.rng.pick(&[TARGET, OTHER_VM]), self.addr());
                let bytes = icmp_error(
                    from,
                    to,
                    self.rng.pick(&[3, 11, 12, 0, 5]),
                    self.rng.below(16) as u8,
                    &quoted,
                );
                let ifindex = self.rng.pick(&[h.vif1.index, h.vif2.index, h.uplink.index]);
                let role = if ifindex == h.uplink.index {
                    Role::Uplink
                } else {
                    Role::Downstream
                };
                let bytes = self.bend_bytes(bytes);
                return single(role, ifindex, bytes);
            }
            // Noise behind an IPv4 EtherType.
            _ => {
                let len = 34 + self.rng.below(200) as usize;
                let mut bytes: Vec<u8> = (0..len).map(|_| self.rng.next_u64() as u8).collect();
                bytes[12] = 0x08;
                bytes[13] = 0x00;
                bytes[14] = 0x40 | (bytes[14] & 0x0f);
                let (role, ifindex) = if self.rng.chance(50) {
                    (Role::Uplink, h.uplink.index)
                } else {
                    (Role::Downstream, h.vif1.index)
                };
                return single(role, ifindex, bytes);
            }
        };
        frame.payload = payload;
        // A share of frames stay as built, so the rewriting paths (and
        // their checksums) are exercised as much as the refusals.
        if self.rng.chance(30) {
            return single(role, ifindex, frame.build());
        }
        let rng = &mut self.rng;
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
        let bytes = self.bend_bytes(frame.build());
        single(role, ifindex, bytes)
    }

    /// Byte-level damage after the frame was built: checksums forced to 0
    /// or 0xffff, bits flipped, the tail cut off.
    fn bend_bytes(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        let rng = &mut self.rng;
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
}

fn single(role: Role, ifindex: u32, frame: Vec<u8>) -> Case {
    Case {
        role,
        ifindex,
        frame,
        label: "single",
        claim: None,
    }
}
