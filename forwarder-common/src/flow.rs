//! How a forwarded flow ages: its state after each packet and how long it
//! may stay idle, in the spirit of conntrack's defaults. The datapath
//! applies these to every packet; userspace uses them to list and sweep.

use crate::maps::{FlowEntry, PROTO_TCP};

/// `FlowEntry::state`: the target has answered.
pub const FLOW_REPLIED: u8 = 1;
/// `FlowEntry::state`: the LAN peer sent a FIN.
pub const FLOW_FIN_PEER: u8 = 2;
/// `FlowEntry::state`: the target sent a FIN.
pub const FLOW_FIN_TARGET: u8 = 4;
/// `FlowEntry::state`: either side sent a RST.
pub const FLOW_RST: u8 = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SECOND: u64 = 1_000_000_000;

/// A UDP flow the target has not answered (conntrack: 30 s).
pub const UDP_UNREPLIED_NS: u64 = 30 * SECOND;
/// A UDP flow both sides use (conntrack's stream timeout: 120 s).
pub const UDP_REPLIED_NS: u64 = 120 * SECOND;
/// A TCP flow whose SYN the target has not answered (conntrack's SYN_RECV
/// is 60 s; a LAN peer's unanswered SYNs should not hold entries longer).
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
    } else if state & FLOW_REPLIED != 0 {
        TCP_ESTABLISHED_NS
    } else {
        TCP_OPENING_NS
    }
}

/// Whether the flow has been idle past its timeout at `now`.
pub const fn expired(entry: &FlowEntry, proto: u8, now: u64) -> bool {
    now > entry.seen_ns && now - entry.seen_ns > idle_timeout_ns(proto, entry.state)
}

/// The state after one more packet, from the peer or from the target, with
/// its TCP flags (0 for UDP).
pub const fn next_state(state: u8, from_peer: bool, tcp_flags: u8) -> u8 {
    let mut state = state;
    if !from_peer {
        state |= FLOW_REPLIED;
    }
    if tcp_flags & TCP_RST != 0 {
        state |= FLOW_RST;
    }
    if tcp_flags & TCP_FIN != 0 {
        state |= if from_peer {
            FLOW_FIN_PEER
        } else {
            FLOW_FIN_TARGET
        };
    }
    state
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
    } else if state & FLOW_REPLIED != 0 {
        "established"
    } else {
        "opening"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::PROTO_UDP;

    fn entry(state: u8, seen_ns: u64) -> FlowEntry {
        FlowEntry {
            state,
            seen_ns,
            ..Default::default()
        }
    }

    #[test]
    fn udp_gets_longer_once_answered() {
        let fresh = next_state(0, true, 0);
        assert_eq!(idle_timeout_ns(PROTO_UDP, fresh), UDP_UNREPLIED_NS);
        let answered = next_state(fresh, false, 0);
        assert_eq!(idle_timeout_ns(PROTO_UDP, answered), UDP_REPLIED_NS);
        assert_eq!(state_name(PROTO_UDP, answered), "replied");
    }

    #[test]
    fn tcp_walks_opening_established_closing_closed() {
        let syn = next_state(0, true, TCP_SYN);
        assert_eq!(idle_timeout_ns(PROTO_TCP, syn), TCP_OPENING_NS);
        assert_eq!(state_name(PROTO_TCP, syn), "opening");
        let established = next_state(syn, false, TCP_SYN | TCP_ACK);
        assert_eq!(idle_timeout_ns(PROTO_TCP, established), TCP_ESTABLISHED_NS);
        let fin = next_state(established, true, TCP_FIN | TCP_ACK);
        assert_eq!(idle_timeout_ns(PROTO_TCP, fin), TCP_HALF_CLOSED_NS);
        assert_eq!(state_name(PROTO_TCP, fin), "closing");
        let closed = next_state(fin, false, TCP_FIN | TCP_ACK);
        assert_eq!(idle_timeout_ns(PROTO_TCP, closed), TCP_CLOSED_NS);
        assert_eq!(state_name(PROTO_TCP, closed), "closed");
        let reset = next_state(established, false, TCP_RST);
        assert_eq!(idle_timeout_ns(PROTO_TCP, reset), TCP_CLOSED_NS);
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
