//! How a forwarded flow ages: its state after each packet, how long it may
//! stay idle, and which TCP resets it believes, in the spirit of
//! conntrack. The datapath applies these to every packet; userspace uses
//! them to list and sweep.

use crate::maps::{FlowEntry, PROTO_TCP, TcpSide};

/// `FlowEntry::state`: the target has answered.
pub const FLOW_REPLIED: u8 = 1;
/// `FlowEntry::state`: the LAN peer sent a FIN.
pub const FLOW_FIN_PEER: u8 = 2;
/// `FlowEntry::state`: the target sent a FIN.
pub const FLOW_FIN_TARGET: u8 = 4;
/// `FlowEntry::state`: either side sent a RST the other side's window
/// admits.
pub const FLOW_RST: u8 = 8;
/// `FlowEntry::state`: TCP only. The peer acknowledged the target's SYN-ACK
/// (conntrack's ESTABLISHED), or, for a flow picked up mid-connection, the
/// target answered the peer.
pub const FLOW_ESTABLISHED: u8 = 16;

/// `TcpSide::flags`: `isn` holds the sequence number of its SYN.
pub const SIDE_SYN: u8 = 1;
/// `TcpSide::flags`: `ack` and `window` hold its latest acknowledgement.
pub const SIDE_ACK: u8 = 2;
/// `TcpSide::flags`: its SYN offered window scaling, by `wscale`.
pub const SIDE_WSCALE: u8 = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// RFC 7323's largest window shift.
const MAX_WSCALE: u8 = 14;

const SECOND: u64 = 1_000_000_000;

/// A UDP flow the target has not answered (conntrack: 30 s).
pub const UDP_UNREPLIED_NS: u64 = 30 * SECOND;
/// A UDP flow both sides use (conntrack's stream timeout: 120 s).
pub const UDP_REPLIED_NS: u64 = 120 * SECOND;
/// A TCP flow not established yet: the SYN unanswered, or the SYN-ACK not
/// acknowledged (conntrack's SYN_SENT is 120 s and SYN_RECV 60 s; a LAN
/// peer's unanswered SYNs should not hold entries longer).
pub const TCP_OPENING_NS: u64 = 60 * SECOND;
/// An established TCP flow. conntrack keeps 5 days; 6 hours (Cilium's
/// choice) is well above RFC 5382's floor of 2 h 4 min and keeps the port
/// of a vanished peer open for less time.
pub const TCP_ESTABLISHED_NS: u64 = 6 * 3600 * SECOND;
/// One side has sent a FIN (conntrack's FIN_WAIT/CLOSE_WAIT: 60-120 s).
pub const TCP_HALF_CLOSED_NS: u64 = 120 * SECOND;
/// FIN seen both ways, or a RST (conntrack's CLOSE: 10 s).
pub const TCP_CLOSED_NS: u64 = 10 * SECOND;

/// How stale `seen_ns` may get on a busy flow before a packet rewrites it:
/// writing it on every packet would bounce its cache line between the CPUs
/// handling the two directions. Timeouts are therefore honoured to within
/// this much.
pub const REFRESH_NS: u64 = SECOND;

/// The TCP fields of one segment that move a flow (all zero for UDP), in
/// host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    /// The window-scale option of a SYN, if it carried one.
    pub wscale: Option<u8>,
}

/// How long a flow in `state` may stay idle.
pub const fn idle_timeout_ns(proto: u8, state: u8) -> u64 {
    if proto != PROTO_TCP {
        return if state & FLOW_REPLIED != 0 {
            UDP_REPLIED_NS
        } else {
            UDP_UNREPLIED_NS
        };
    }
    let both_fins = FLOW_FIN_PEER | FLOW_FIN_TARGET;
    if state & FLOW_RST != 0 || state & both_fins == both_fins {
        TCP_CLOSED_NS
    } else if state & both_fins != 0 {
        TCP_HALF_CLOSED_NS
    } else if state & FLOW_ESTABLISHED != 0 {
        TCP_ESTABLISHED_NS
    } else {
        TCP_OPENING_NS
    }
}

/// Whether the flow has been idle past its timeout at `now`.
pub const fn expired(entry: &FlowEntry, proto: u8, now: u64) -> bool {
    now > entry.seen_ns && now - entry.seen_ns > idle_timeout_ns(proto, entry.state)
}

/// A new flow of the rule `rule_id` in `rule_slot`, opened by the peer's
/// `segment`.
pub fn opened(rule_id: u32, rule_slot: u16, segment: &Segment, now: u64) -> FlowEntry {
    let mut entry = FlowEntry::default();
    open(&mut entry, rule_id, rule_slot, segment, now);
    entry
}

/// Makes the all-zero `entry` a new flow, opened by the peer's `segment`.
/// (The datapath zeroes its entry itself: a struct literal compiles to a
/// call of a memset subprogram, which kernels before 5.13 count against
/// the caller's stack.)
#[inline(always)]
pub fn open(entry: &mut FlowEntry, rule_id: u32, rule_slot: u16, segment: &Segment, now: u64) {
    entry.rule_id = rule_id;
    entry.rule_slot = rule_slot;
    entry.created_ns = now;
    entry.seen_ns = now;
    advance(entry, true, segment);
}

/// Whether the segment is one a tracking firewall would let change the
/// flow: a RST must fall inside the window the other side advertised (or,
/// before that side has acknowledged anything, answer its SYN exactly).
/// A flow picked up mid-connection knows no windows and is judged
/// liberally, as conntrack judges such flows.
#[inline(always)]
pub fn acceptable(entry: &FlowEntry, from_peer: bool, segment: &Segment) -> bool {
    if segment.flags & TCP_RST == 0 || entry.peer.flags & SIDE_SYN == 0 {
        return true;
    }
    let (sender, receiver) = if from_peer {
        (&entry.peer, &entry.target)
    } else {
        (&entry.target, &entry.peer)
    };
    if receiver.flags & SIDE_ACK != 0 {
        return segment.seq.wrapping_sub(receiver.ack) <= window_bytes(receiver, sender);
    }
    if receiver.flags & SIDE_SYN != 0 {
        return segment.flags & TCP_ACK != 0 && segment.ack == receiver.isn.wrapping_add(1);
    }
    sender.flags & SIDE_SYN != 0 && segment.seq == sender.isn.wrapping_add(1)
}

/// The window `receiver` last advertised, in bytes: scaled only when both
/// SYNs offered scaling (RFC 7323).
#[inline(always)]
fn window_bytes(receiver: &TcpSide, sender: &TcpSide) -> u32 {
    let scaled = receiver.flags & sender.flags & SIDE_WSCALE != 0;
    let shift = if scaled {
        if receiver.wscale < MAX_WSCALE {
            receiver.wscale
        } else {
            MAX_WSCALE
        }
    } else {
        0
    };
    u32::from(receiver.window) << shift
}

/// Moves the flow by one packet from the peer or the target, which has
/// passed every check (`acceptable` included). Returns whether `state`
/// changed. Fields are written only when their value changes: a write
/// moves the entry's cache line to this CPU.
#[inline(always)]
pub fn advance(entry: &mut FlowEntry, from_peer: bool, segment: &Segment) -> bool {
    let old = entry.state;
    let mut state = old;
    let flags = segment.flags;
    if !from_peer {
        state |= FLOW_REPLIED;
    }
    if flags & TCP_RST != 0 {
        state |= FLOW_RST;
    }
    if flags & TCP_FIN != 0 {
        state |= if from_peer {
            FLOW_FIN_PEER
        } else {
            FLOW_FIN_TARGET
        };
    }
    let side = if from_peer {
        &mut entry.peer
    } else {
        &mut entry.target
    };
    if flags & TCP_SYN != 0 && side.flags & SIDE_SYN == 0 {
        side.isn = segment.seq;
        side.flags |= SIDE_SYN;
        if let Some(wscale) = segment.wscale {
            side.wscale = wscale;
            side.flags |= SIDE_WSCALE;
        }
    }
    if flags & TCP_ACK != 0
        && (side.flags & SIDE_ACK == 0 || side.ack != segment.ack || side.window != segment.window)
    {
        side.ack = segment.ack;
        side.window = segment.window;
        side.flags |= SIDE_ACK;
    }
    if establishes(entry, from_peer, segment) {
        state |= FLOW_ESTABLISHED;
    }
    if state != old {
        entry.state = state;
    }
    state != old
}

/// Whether this segment establishes a TCP flow: the peer's acknowledgement
/// of the target's SYN-ACK, or, for a flow picked up without the peer's
/// SYN, any answer of the target but a reset.
#[inline(always)]
fn establishes(entry: &FlowEntry, from_peer: bool, segment: &Segment) -> bool {
    if entry.state & FLOW_ESTABLISHED != 0 || segment.flags & TCP_RST != 0 {
        return false;
    }
    if entry.peer.flags & SIDE_SYN == 0 {
        return !from_peer && segment.flags & TCP_ACK != 0;
    }
    from_peer
        && segment.flags & (TCP_SYN | TCP_ACK) == TCP_ACK
        && entry.target.flags & SIDE_SYN != 0
        && segment.ack == entry.target.isn.wrapping_add(1)
}

/// Whether a peer's packet opens a new connection over a finished one (a
/// bare SYN after a RST or FINs both ways: the peer reused its port).
pub const fn reopens(state: u8, tcp_flags: u8) -> bool {
    let both_fins = FLOW_FIN_PEER | FLOW_FIN_TARGET;
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && (state & FLOW_RST != 0 || state & both_fins == both_fins)
}

/// The state's name, as `forwarder flows` shows it.
pub const fn state_name(proto: u8, state: u8) -> &'static str {
    if proto != PROTO_TCP {
        return if state & FLOW_REPLIED != 0 {
            "replied"
        } else {
            "unreplied"
        };
    }
    let both_fins = FLOW_FIN_PEER | FLOW_FIN_TARGET;
    if state & FLOW_RST != 0 {
        "reset"
    } else if state & both_fins == both_fins {
        "closed"
    } else if state & both_fins != 0 {
        "closing"
    } else if state & FLOW_ESTABLISHED != 0 {
        "established"
    } else if state & FLOW_REPLIED != 0 {
        "syn_recv"
    } else {
        "opening"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::PROTO_UDP;

    const PEER_ISN: u32 = 1_000;
    const TARGET_ISN: u32 = 0xffff_fff0;

    fn entry(state: u8, seen_ns: u64) -> FlowEntry {
        FlowEntry {
            state,
            seen_ns,
            ..Default::default()
        }
    }

    fn segment(flags: u8, seq: u32, ack: u32) -> Segment {
        Segment {
            flags,
            seq,
            ack,
            window: 1000,
            wscale: None,
        }
    }

    /// A flow through SYN, SYN-ACK and the peer's ACK.
    fn handshake() -> FlowEntry {
        let mut e = opened(1, 0, &segment(TCP_SYN, PEER_ISN, 0), 0);
        advance(
            &mut e,
            false,
            &segment(TCP_SYN | TCP_ACK, TARGET_ISN, PEER_ISN + 1),
        );
        advance(
            &mut e,
            true,
            &segment(TCP_ACK, PEER_ISN + 1, TARGET_ISN.wrapping_add(1)),
        );
        e
    }

    #[test]
    fn udp_gets_longer_once_answered() {
        let mut e = opened(1, 0, &Segment::default(), 0);
        assert_eq!(idle_timeout_ns(PROTO_UDP, e.state), UDP_UNREPLIED_NS);
        assert!(advance(&mut e, false, &Segment::default()));
        assert_eq!(idle_timeout_ns(PROTO_UDP, e.state), UDP_REPLIED_NS);
        assert_eq!(state_name(PROTO_UDP, e.state), "replied");
        assert!(!advance(&mut e, true, &Segment::default()));
    }

    #[test]
    fn tcp_is_established_only_by_the_peers_ack_of_the_syn_ack() {
        let mut e = opened(1, 0, &segment(TCP_SYN, PEER_ISN, 0), 0);
        assert_eq!(state_name(PROTO_TCP, e.state), "opening");
        advance(
            &mut e,
            false,
            &segment(TCP_SYN | TCP_ACK, TARGET_ISN, PEER_ISN + 1),
        );
        assert_eq!(state_name(PROTO_TCP, e.state), "syn_recv");
        assert_eq!(idle_timeout_ns(PROTO_TCP, e.state), TCP_OPENING_NS);
        // A spoofed peer never saw the SYN-ACK: any other number keeps it
        // opening.
        advance(&mut e, true, &segment(TCP_ACK, PEER_ISN + 1, TARGET_ISN));
        advance(&mut e, true, &segment(TCP_ACK, PEER_ISN + 1, 12345));
        assert_eq!(state_name(PROTO_TCP, e.state), "syn_recv");
        assert!(advance(
            &mut e,
            true,
            &segment(TCP_ACK, PEER_ISN + 1, TARGET_ISN.wrapping_add(1))
        ));
        assert_eq!(state_name(PROTO_TCP, e.state), "established");
        assert_eq!(idle_timeout_ns(PROTO_TCP, e.state), TCP_ESTABLISHED_NS);
    }

    #[test]
    fn tcp_walks_established_closing_closed() {
        let mut e = handshake();
        advance(&mut e, true, &segment(TCP_FIN | TCP_ACK, PEER_ISN + 1, 0));
        assert_eq!(idle_timeout_ns(PROTO_TCP, e.state), TCP_HALF_CLOSED_NS);
        assert_eq!(state_name(PROTO_TCP, e.state), "closing");
        advance(&mut e, false, &segment(TCP_FIN | TCP_ACK, 0, PEER_ISN + 2));
        assert_eq!(idle_timeout_ns(PROTO_TCP, e.state), TCP_CLOSED_NS);
        assert_eq!(state_name(PROTO_TCP, e.state), "closed");
    }

    #[test]
    fn a_picked_up_flow_is_established_by_the_targets_answer() {
        let mut e = opened(1, 0, &segment(TCP_ACK, 5, 7), 0);
        assert_eq!(state_name(PROTO_TCP, e.state), "opening");
        advance(&mut e, false, &segment(TCP_ACK, 7, 5));
        assert_eq!(state_name(PROTO_TCP, e.state), "established");
        let mut refused = opened(1, 0, &segment(TCP_ACK, 5, 7), 0);
        advance(&mut refused, false, &segment(TCP_RST, 7, 0));
        assert_eq!(state_name(PROTO_TCP, refused.state), "reset");
    }

    #[test]
    fn resets_must_fall_in_the_receivers_window() {
        let e = handshake();
        let target_next = TARGET_ISN.wrapping_add(1);
        // The target's reset is judged by what the peer acknowledged.
        for (seq, ok) in [
            (target_next, true),
            (target_next.wrapping_add(1000), true),
            (target_next.wrapping_add(1001), false),
            (target_next.wrapping_sub(1), false),
            (0x8000_0000, false),
        ] {
            assert_eq!(
                acceptable(&e, false, &segment(TCP_RST, seq, 0)),
                ok,
                "target RST seq {seq:#x}"
            );
        }
        // The peer's by what the target acknowledged.
        assert!(acceptable(&e, true, &segment(TCP_RST, PEER_ISN + 1, 0)));
        assert!(!acceptable(&e, true, &segment(TCP_RST, PEER_ISN + 5000, 0)));
        // Anything but a reset is not judged here.
        assert!(acceptable(&e, true, &segment(TCP_ACK, 0, 0)));
    }

    #[test]
    fn windows_scale_only_when_both_syns_offered_it() {
        let syn = |flags, seq, ack, wscale| Segment {
            wscale,
            ..segment(flags, seq, ack)
        };
        let mut e = opened(1, 0, &syn(TCP_SYN, PEER_ISN, 0, Some(7)), 0);
        advance(
            &mut e,
            false,
            &syn(TCP_SYN | TCP_ACK, TARGET_ISN, PEER_ISN + 1, Some(2)),
        );
        let target_next = TARGET_ISN.wrapping_add(1);
        advance(&mut e, true, &segment(TCP_ACK, PEER_ISN + 1, target_next));
        // The peer's window of 1000 counts 128 bytes a unit.
        assert!(acceptable(
            &e,
            false,
            &segment(TCP_RST, target_next.wrapping_add(128_000), 0)
        ));
        assert!(!acceptable(
            &e,
            false,
            &segment(TCP_RST, target_next.wrapping_add(128_001), 0)
        ));
        let mut unscaled = opened(1, 0, &syn(TCP_SYN, PEER_ISN, 0, Some(7)), 0);
        advance(
            &mut unscaled,
            false,
            &syn(TCP_SYN | TCP_ACK, TARGET_ISN, PEER_ISN + 1, None),
        );
        advance(
            &mut unscaled,
            true,
            &segment(TCP_ACK, PEER_ISN + 1, target_next),
        );
        assert!(!acceptable(
            &unscaled,
            false,
            &segment(TCP_RST, target_next.wrapping_add(1001), 0)
        ));
    }

    #[test]
    fn before_any_ack_a_reset_must_answer_the_syn() {
        let e = opened(1, 0, &segment(TCP_SYN, PEER_ISN, 0), 0);
        assert!(acceptable(
            &e,
            false,
            &segment(TCP_RST | TCP_ACK, 0, PEER_ISN + 1)
        ));
        assert!(!acceptable(
            &e,
            false,
            &segment(TCP_RST | TCP_ACK, 0, PEER_ISN + 2)
        ));
        assert!(!acceptable(&e, false, &segment(TCP_RST, 0, PEER_ISN + 1)));
        // The peer abandoning its own SYN.
        assert!(acceptable(&e, true, &segment(TCP_RST, PEER_ISN + 1, 0)));
        assert!(!acceptable(&e, true, &segment(TCP_RST, PEER_ISN + 9, 0)));
    }

    #[test]
    fn a_picked_up_flow_believes_any_reset() {
        let e = opened(1, 0, &segment(TCP_ACK, 5, 7), 0);
        assert!(acceptable(&e, false, &segment(TCP_RST, 0xdead, 0)));
        assert!(acceptable(&e, true, &segment(TCP_RST, 0xbeef, 0)));
    }

    #[test]
    fn expiry_is_strictly_past_the_timeout() {
        let e = entry(0, 1_000);
        assert!(!expired(&e, PROTO_UDP, 1_000 + UDP_UNREPLIED_NS));
        assert!(expired(&e, PROTO_UDP, 1_001 + UDP_UNREPLIED_NS));
        assert!(
            !expired(&e, PROTO_UDP, 0),
            "a clock behind seen is not expiry"
        );
    }

    #[test]
    fn only_a_bare_syn_reopens_a_finished_flow() {
        let closed = FLOW_REPLIED | FLOW_FIN_PEER | FLOW_FIN_TARGET;
        assert!(reopens(closed, TCP_SYN));
        assert!(reopens(FLOW_RST, TCP_SYN));
        assert!(!reopens(closed, TCP_SYN | TCP_ACK));
        assert!(!reopens(closed, TCP_ACK));
        assert!(
            !reopens(FLOW_REPLIED, TCP_SYN),
            "a live flow is not reopened"
        );
    }
}
