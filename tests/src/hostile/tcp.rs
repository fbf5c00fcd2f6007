//! TCP conversations through a forward rule, packet by packet from both
//! sides, with what a hostile host adds: SYN-ACKs and ACKs with the wrong
//! numbers, resets in and out of the window (scaled or not), resets before
//! anything was acknowledged, a target's packets sent by another VM from
//! its vif, flows picked up mid-connection, FINs, and a port reused by a
//! bare SYN once the flow is over.

use std::net::Ipv4Addr;

use forwarder::datapath::Role;
use forwarder_common::flow::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use super::{case::Case, rng::Rng};
use crate::{
    packet::Frame,
    testrun::{Harness, LAN_PEER, LAN_PEER_MAC, TARGET, UPLINK_ADDR},
};

/// One side's numbers as the conversation goes on.
#[derive(Clone, Copy)]
struct Side {
    /// The next sequence number it sends.
    next: u32,
    /// What it acknowledged last, and the window it advertised.
    ack: u32,
    window: u16,
    wscale: Option<u8>,
}

struct Conversation<'h> {
    h: &'h Harness,
    peer: Ipv4Addr,
    peer_port: u16,
    listen: u16,
    target_port: u16,
    p: Side,
    t: Side,
    cases: Vec<Case>,
}

impl Conversation<'_> {
    fn options(rng: &mut Rng, wscale: Option<u8>) -> Vec<u8> {
        let mut options = Vec::new();
        if rng.chance(50) {
            options.extend_from_slice(&[2, 4, 0x05, 0xb4]);
        }
        if let Some(shift) = wscale {
            options.extend_from_slice(&[1, 3, 3, shift]);
        }
        if rng.chance(10) {
            // Junk the walk must survive: a zero-length option.
            options.extend_from_slice(&[8, 0, 1, 1]);
        }
        options
    }

    fn peer_sends(&mut self, flags: u8, seq: u32, ack: u32, options: Vec<u8>, data: usize) {
        let mut f = Frame::tcp(self.peer, self.peer_port, UPLINK_ADDR, self.listen);
        f.src_mac = LAN_PEER_MAC;
        f.dst_mac = self.h.uplink.mac;
        (f.tcp_flags, f.tcp_seq, f.tcp_ack, f.tcp_window) = (flags, seq, ack, self.p.window);
        f.tcp_options = options;
        f.payload = vec![b'p'; data];
        self.cases.push(Case {
            role: Role::Uplink,
            ifindex: self.h.uplink.index,
            frame: f.build(),
            label: "tcp",
            claim: None,
        });
    }

    /// The target's packet, from its own vif or (`spoofed`) another VM's.
    fn target_sends(&mut self, flags: u8, seq: u32, ack: u32, options: Vec<u8>, spoofed: bool) {
        let mut f = Frame::tcp(TARGET, self.target_port, self.peer, self.peer_port);
        (f.tcp_flags, f.tcp_seq, f.tcp_ack, f.tcp_window) = (flags, seq, ack, self.t.window);
        f.tcp_options = options;
        let vif = if spoofed { &self.h.vif2 } else { &self.h.vif1 };
        f.dst_mac = vif.mac;
        self.cases.push(Case {
            role: Role::Downstream,
            ifindex: vif.index,
            frame: f.build(),
            label: "tcp",
            claim: None,
        });
    }

    /// A reset's sequence number against what the receiver acknowledged
    /// (`ack`) and advertised: at either edge of its window, just past it,
    /// or anywhere.
    fn reset_seq(rng: &mut Rng, receiver: &Side, sender: &Side) -> u32 {
        let shift = match (receiver.wscale, sender.wscale) {
            (Some(r), Some(_)) => u32::from(r.min(14)),
            _ => 0,
        };
        let window = u32::from(receiver.window) << shift;
        let offset = match rng.below(6) {
            0 => 0,
            1 => window,
            2 => window.wrapping_add(1),
            3 => rng.below(u64::from(window) + 1) as u32,
            4 => 0u32.wrapping_sub(1 + rng.below(100) as u32),
            _ => rng.next_u64() as u32,
        };
        receiver.ack.wrapping_add(offset)
    }
}

/// A conversation's packets in order.
pub fn generate(h: &Harness, rng: &mut Rng) -> Vec<Case> {
    let (listen, target_port) = rng.pick(&[(53317, 53317), (8080, 80)]);
    let peers: &[Ipv4Addr] = if listen == 8080 {
        &[
            LAN_PEER,
            Ipv4Addr::new(192, 168, 1, 77),
            Ipv4Addr::new(8, 8, 8, 8),
        ]
    } else {
        &[LAN_PEER, LAN_PEER, Ipv4Addr::new(192, 168, 1, 77)]
    };
    let window = |rng: &mut Rng| rng.pick(&[0, 1, 512, 29200, 64240, 65535]);
    let wscale = |rng: &mut Rng| rng.chance(60).then(|| rng.pick(&[0, 2, 7, 14, 15]));
    let (isn_p, isn_t) = if rng.chance(20) {
        (0xffff_fff0, 0xffff_ffff)
    } else {
        (rng.next_u64() as u32, rng.next_u64() as u32)
    };
    let mut c = Conversation {
        h,
        peer: rng.pick(peers),
        peer_port: 40000 + rng.below(48) as u16,
        listen,
        target_port,
        p: Side {
            next: isn_p,
            ack: 0,
            window: window(rng),
            wscale: wscale(rng),
        },
        t: Side {
            next: isn_t,
            ack: 0,
            window: window(rng),
            wscale: wscale(rng),
        },
        cases: Vec::new(),
    };
    if rng.chance(85) {
        let options = Conversation::options(rng, c.p.wscale);
        c.peer_sends(TCP_SYN, isn_p, 0, options.clone(), 0);
        if rng.chance(10) {
            c.peer_sends(TCP_SYN, isn_p, 0, options, 0);
        }
        c.p.next = isn_p.wrapping_add(1);
        if rng.chance(15) {
            // The target refuses: a reset answering the SYN, or not quite.
            let ack = if rng.chance(70) {
                c.p.next
            } else {
                c.p.next.wrapping_add(1)
            };
            c.target_sends(TCP_RST | TCP_ACK, 0, ack, Vec::new(), rng.chance(20));
        } else {
            let ack = if rng.chance(90) {
                c.p.next
            } else {
                rng.next_u64() as u32
            };
            let options = Conversation::options(rng, c.t.wscale);
            c.target_sends(TCP_SYN | TCP_ACK, isn_t, ack, options, rng.chance(10));
            c.t.next = isn_t.wrapping_add(1);
            c.t.ack = c.p.next;
            let ack = match rng.below(10) {
                0 => isn_t,
                1 => rng.next_u64() as u32,
                _ => c.t.next,
            };
            c.peer_sends(TCP_ACK, c.p.next, ack, Vec::new(), 0);
            c.p.ack = ack;
        }
    } else {
        // Picked up mid-connection: the first packet the peer's ACK.
        c.p.ack = isn_t;
        c.t.next = isn_t;
        c.peer_sends(TCP_ACK, isn_p, isn_t, Vec::new(), rng.below(100) as usize);
    }
    for _ in 0..rng.below(4) {
        if rng.chance(50) {
            let data = rng.below(200) as usize;
            c.peer_sends(TCP_ACK, c.p.next, c.p.ack, Vec::new(), data);
            c.p.next = c.p.next.wrapping_add(data as u32);
        } else {
            c.target_sends(TCP_ACK, c.t.next, c.p.next, Vec::new(), false);
            c.t.ack = c.p.next;
        }
    }
    match rng.below(8) {
        0 | 1 => {
            let seq = Conversation::reset_seq(rng, &c.p, &c.t);
            c.target_sends(TCP_RST, seq, 0, Vec::new(), rng.chance(25));
        }
        2 | 3 => {
            let seq = Conversation::reset_seq(rng, &c.t, &c.p);
            c.peer_sends(TCP_RST, seq, 0, Vec::new(), 0);
        }
        4 => {
            c.peer_sends(TCP_FIN | TCP_ACK, c.p.next, c.p.ack, Vec::new(), 0);
            c.target_sends(
                TCP_FIN | TCP_ACK,
                c.t.next,
                c.p.next.wrapping_add(1),
                Vec::new(),
                false,
            );
        }
        _ => {}
    }
    if rng.chance(30) {
        // The port used again: a bare SYN, then the target's answer.
        let isn = rng.next_u64() as u32;
        c.peer_sends(TCP_SYN, isn, 0, Vec::new(), 0);
        c.target_sends(
            TCP_SYN | TCP_ACK,
            rng.next_u64() as u32,
            isn.wrapping_add(1),
            Vec::new(),
            false,
        );
    }
    c.cases
}
