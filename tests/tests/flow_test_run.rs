//! The flow table through BPF_PROG_TEST_RUN: a target's packet is
//! translated only as part of a flow the LAN side started; only the uplink
//! side creates flows (loose pickup included); flows age by their state's
//! idle timeout; a rule's deadline and its removal end its flows; and the
//! fallbacks for older kernels forward the same way.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

use forwarder::{
    clock,
    datapath::Role,
    kernel::Support,
    rules::{Origin, Rule},
    spec::{AllowFrom, Proto},
};
use forwarder_common::{
    flow::{
        self, FLOW_ESTABLISHED, FLOW_FIN_PEER, FLOW_FIN_TARGET, FLOW_REPLIED, FLOW_RST, TCP_ACK,
        TCP_FIN, TCP_RST, TCP_SYN,
    },
    maps::FlowEntry,
    reason::Reason,
};
use forwarder_tests::{
    netns,
    packet::{self, Frame, TCP, UDP},
    testrun::*,
};

const PEER_PORT: u16 = 40000;

fn rules() -> Vec<Rule> {
    vec![localsend_rule(Proto::Tcp), localsend_rule(Proto::Udp)]
}

fn harness() -> Harness {
    netns::sweep_leftovers();
    Harness::new(&rules()).expect("test_run harness")
}

fn frame(proto: u8, saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, flags: u8) -> Frame {
    let mut f = if proto == TCP {
        Frame::tcp(saddr, sport, daddr, dport)
    } else {
        Frame::udp(saddr, sport, daddr, dport)
    };
    if proto == TCP {
        f.tcp_flags = flags;
    }
    f
}

/// The LAN peer's packet to the listen port, as it arrives on the uplink.
fn from_peer(proto: u8, flags: u8) -> Vec<u8> {
    let mut f = frame(proto, LAN_PEER, PEER_PORT, UPLINK_ADDR, 53317, flags);
    f.src_mac = LAN_PEER_MAC;
    f.build()
}

/// The target's packet back to the peer, as it arrives on its vif.
fn from_target(proto: u8, flags: u8) -> Vec<u8> {
    frame(proto, TARGET, 53317, LAN_PEER, PEER_PORT, flags).build()
}

fn send_peer(h: &Harness, proto: u8, flags: u8) -> i32 {
    h.run(Role::Uplink, h.uplink.index, &from_peer(proto, flags))
        .unwrap()
        .0
}

/// The target's packet run through the downstream program: the action and
/// the packet as it leaves.
fn run_target(h: &Harness, proto: u8, flags: u8) -> (i32, Vec<u8>) {
    h.run(Role::Downstream, h.vif1.index, &from_target(proto, flags))
        .unwrap()
}

fn send_target(h: &Harness, proto: u8, flags: u8) -> i32 {
    run_target(h, proto, flags).0
}

fn entry(h: &Harness, proto: u8) -> Option<FlowEntry> {
    h.flow(proto, LAN_PEER, PEER_PORT, 53317)
}

const PEER_ISN: u32 = 1_000;
const TARGET_ISN: u32 = 5_000;
/// The window both sides advertise in these tests, unscaled.
const WINDOW: u32 = 64_240;
/// TCP options of a SYN: MSS 1460, a NOP and a window scale of 7.
const SYN_OPTIONS_WSCALE_7: [u8; 8] = [2, 4, 0x05, 0xb4, 1, 3, 3, 7];

/// A segment of the peer's connection, from the peer.
fn peer_segment(flags: u8, seq: u32, ack: u32) -> Frame {
    let mut f = frame(TCP, LAN_PEER, PEER_PORT, UPLINK_ADDR, 53317, flags);
    f.src_mac = LAN_PEER_MAC;
    (f.tcp_seq, f.tcp_ack) = (seq, ack);
    f
}

/// A segment of the peer's connection, from the target.
fn target_segment(flags: u8, seq: u32, ack: u32) -> Frame {
    let mut f = frame(TCP, TARGET, 53317, LAN_PEER, PEER_PORT, flags);
    (f.tcp_seq, f.tcp_ack) = (seq, ack);
    f
}

fn action(h: &Harness, role: Role, ifindex: u32, frame: &Frame) -> i32 {
    h.run(role, ifindex, &frame.build()).unwrap().0
}

/// SYN, SYN-ACK and the peer's ACK, each forwarded; `syn_options` go into
/// both SYNs.
fn handshake(h: &Harness, syn_options: &[u8]) {
    let mut syn = peer_segment(TCP_SYN, PEER_ISN, 0);
    syn.tcp_options = syn_options.to_vec();
    let mut syn_ack = target_segment(TCP_SYN | TCP_ACK, TARGET_ISN, PEER_ISN + 1);
    syn_ack.tcp_options = syn_options.to_vec();
    let ack = peer_segment(TCP_ACK, PEER_ISN + 1, TARGET_ISN + 1);
    for (role, ifindex, frame) in [
        (Role::Uplink, h.uplink.index, syn),
        (Role::Downstream, h.vif1.index, syn_ack),
        (Role::Uplink, h.uplink.index, ack),
    ] {
        assert_eq!(action(h, role, ifindex, &frame), TC_ACT_REDIRECT);
    }
    assert_eq!(
        flow::state_name(TCP, entry(h, TCP).unwrap().state),
        "established"
    );
}

#[test]
fn a_target_packet_without_a_flow_is_left_to_the_stack() {
    let h = harness();
    for proto in [TCP, UDP] {
        // A connection the VM opens itself from its forwarded port.
        h.assert_untouched(
            Role::Downstream,
            h.vif1.index,
            &from_target(proto, TCP_SYN),
            Reason::NoFlow,
        );
        assert!(entry(&h, proto).is_none(), "a target never creates a flow");
    }
}

#[test]
fn flows_start_on_the_uplink_side_and_replies_follow_them() {
    let h = harness();
    assert_eq!(send_peer(&h, TCP, TCP_SYN), TC_ACT_REDIRECT);
    let opening = entry(&h, TCP).expect("the SYN opened a flow");
    assert_eq!(flow::state_name(TCP, opening.state), "opening");
    assert_eq!(opening.rule_id, h.rule_id(TCP, 53317));

    let (action, out) = run_target(&h, TCP, TCP_SYN | TCP_ACK);
    assert_eq!(action, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!(
        (p.saddr, p.sport, p.daddr, p.dport),
        (UPLINK_ADDR, 53317, LAN_PEER, PEER_PORT)
    );
    assert_eq!(
        flow::state_name(TCP, entry(&h, TCP).unwrap().state),
        "syn_recv"
    );

    // Another peer port of the same peer has no flow.
    let other = frame(TCP, TARGET, 53317, LAN_PEER, PEER_PORT + 1, TCP_ACK).build();
    h.assert_untouched(Role::Downstream, h.vif1.index, &other, Reason::NoFlow);
}

#[test]
fn a_lost_entry_is_picked_up_again_from_the_peer_side() {
    let mut h = harness();
    assert_eq!(send_peer(&h, TCP, TCP_SYN), TC_ACT_REDIRECT);
    assert_eq!(send_target(&h, TCP, TCP_SYN | TCP_ACK), TC_ACT_REDIRECT);
    // Eviction (or a map swap) forgets the flow mid-connection.
    h.datapath.tables.remove_flows(|_, _| true).unwrap();
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &from_target(TCP, TCP_ACK),
        Reason::NoFlow,
    );
    // The peer's next packet, a plain ACK, brings it back.
    assert_eq!(send_peer(&h, TCP, TCP_ACK), TC_ACT_REDIRECT);
    assert_eq!(send_target(&h, TCP, TCP_ACK), TC_ACT_REDIRECT);
}

#[test]
fn tcp_states_follow_fins_and_resets_and_a_syn_reopens() {
    let h = harness();
    send_peer(&h, TCP, TCP_SYN);
    send_target(&h, TCP, TCP_SYN | TCP_ACK);
    assert_eq!(send_peer(&h, TCP, TCP_FIN | TCP_ACK), TC_ACT_REDIRECT);
    let half = entry(&h, TCP).unwrap();
    assert_eq!(half.state & FLOW_FIN_PEER, FLOW_FIN_PEER);
    assert_eq!(send_target(&h, TCP, TCP_FIN | TCP_ACK), TC_ACT_REDIRECT);
    let closed = entry(&h, TCP).unwrap();
    assert_eq!(
        closed.state & (FLOW_FIN_PEER | FLOW_FIN_TARGET),
        FLOW_FIN_PEER | FLOW_FIN_TARGET
    );
    assert_eq!(
        flow::idle_timeout_ns(TCP, closed.state),
        flow::TCP_CLOSED_NS
    );

    // The peer reuses its port: a new connection, a new flow.
    std::thread::sleep(Duration::from_millis(2));
    send_peer(&h, TCP, TCP_SYN);
    let reopened = entry(&h, TCP).unwrap();
    assert_eq!(flow::state_name(TCP, reopened.state), "opening");
    assert!(reopened.created_ns > closed.created_ns);

    // The VM refuses it, acknowledging the SYN as a refusal must.
    let refusal = target_segment(TCP_RST | TCP_ACK, 0, 0x0101_0102);
    assert_eq!(
        action(&h, Role::Downstream, h.vif1.index, &refusal),
        TC_ACT_REDIRECT
    );
    assert!(entry(&h, TCP).unwrap().state & FLOW_RST != 0);
}

#[test]
fn every_state_times_out_after_its_idle_timeout() {
    let mut h = harness();
    let second = 1_000_000_000u64;
    for (proto, state, timeout) in [
        (UDP, 0, flow::UDP_UNREPLIED_NS),
        (UDP, FLOW_REPLIED, flow::UDP_REPLIED_NS),
        (TCP, 0, flow::TCP_OPENING_NS),
        (TCP, FLOW_REPLIED, flow::TCP_OPENING_NS),
        (
            TCP,
            FLOW_REPLIED | FLOW_ESTABLISHED,
            flow::TCP_ESTABLISHED_NS,
        ),
        (TCP, FLOW_REPLIED | FLOW_FIN_PEER, flow::TCP_HALF_CLOSED_NS),
        (
            TCP,
            FLOW_REPLIED | FLOW_FIN_PEER | FLOW_FIN_TARGET,
            flow::TCP_CLOSED_NS,
        ),
        (TCP, FLOW_REPLIED | FLOW_RST, flow::TCP_CLOSED_NS),
    ] {
        let rule_id = h.rule_id(proto, 53317);
        let now = clock::boot_ns();
        if now < timeout + 2 * second {
            // An entry cannot have been idle longer than the machine is up;
            // the pure logic of this state is in forwarder-common's tests.
            eprintln!(
                "{proto}/{state:#x}: skipped, the machine is up {} s, less than the {} s timeout",
                now / second,
                timeout / second
            );
            continue;
        }
        let idle_for = |idle: u64| FlowEntry {
            rule_id,
            state,
            created_ns: now - idle,
            seen_ns: now - idle,
            ..Default::default()
        };
        h.set_flow(
            proto,
            LAN_PEER,
            PEER_PORT,
            53317,
            &idle_for(timeout - 2 * second),
        );
        // The ACK flag keeps the TCP states as planted.
        assert_eq!(
            send_target(&h, proto, TCP_ACK),
            TC_ACT_REDIRECT,
            "{proto}/{state:#x}: still alive 2 s before its timeout"
        );
        h.set_flow(
            proto,
            LAN_PEER,
            PEER_PORT,
            53317,
            &idle_for(timeout + 2 * second),
        );
        h.assert_untouched(
            Role::Downstream,
            h.vif1.index,
            &from_target(proto, TCP_ACK),
            Reason::NoFlow,
        );
        assert!(
            entry(&h, proto).is_none(),
            "{proto}/{state:#x}: the timed-out entry is removed"
        );
    }
}

#[test]
fn a_rule_past_its_deadline_is_not_applied_either_way() {
    netns::sweep_leftovers();
    let mut gone = localsend_rule(Proto::Tcp);
    gone.expires = Some(SystemTime::now() - Duration::from_secs(1));
    let mut later = localsend_rule(Proto::Udp);
    later.expires = Some(SystemTime::now() + Duration::from_secs(3600));
    let mut h = Harness::new(&[gone, later]).unwrap();
    h.assert_untouched(
        Role::Uplink,
        h.uplink.index,
        &from_peer(TCP, TCP_SYN),
        Reason::RuleExpired,
    );
    let id = h.rule_id(TCP, 53317);
    let now = clock::boot_ns();
    h.set_flow(
        TCP,
        LAN_PEER,
        PEER_PORT,
        53317,
        &FlowEntry {
            rule_id: id,
            state: FLOW_REPLIED,
            created_ns: now,
            seen_ns: now,
            ..Default::default()
        },
    );
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &from_target(TCP, TCP_ACK),
        Reason::RuleExpired,
    );
    assert_eq!(send_peer(&h, UDP, 0), TC_ACT_REDIRECT, "an hour left");
}

#[test]
fn removing_or_retargeting_a_rule_ends_its_flows() {
    let mut h = harness();
    send_peer(&h, TCP, TCP_SYN);
    send_peer(&h, UDP, 0);
    assert!(entry(&h, TCP).is_some() && entry(&h, UDP).is_some());
    // tcp:53317 now points elsewhere; udp:53317 is gone.
    let retargeted = Rule {
        target: OTHER_VM,
        ..localsend_rule(Proto::Tcp)
    };
    h.datapath.tables.sync_rules(&[retargeted]).unwrap();
    assert!(entry(&h, TCP).is_none() && entry(&h, UDP).is_none());
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &from_target(TCP, TCP_ACK),
        Reason::NoRule,
    );
}

#[test]
fn an_unchanged_rule_keeps_its_flows_across_a_resync() {
    let mut h = harness();
    send_peer(&h, TCP, TCP_SYN);
    h.datapath.tables.sync_rules(&rules()).unwrap();
    assert!(entry(&h, TCP).is_some());
    assert_eq!(send_target(&h, TCP, TCP_SYN | TCP_ACK), TC_ACT_REDIRECT);
}

#[test]
fn the_fallbacks_for_older_kernels_forward_the_same_way() {
    netns::sweep_leftovers();
    let old_kernel = Support {
        fib_skip_neigh: false,
        fib_mtu_result: false,
    };
    let h = Harness::with_support(&rules(), &[], old_kernel).unwrap();
    assert_eq!(send_peer(&h, TCP, TCP_SYN), TC_ACT_REDIRECT);
    let (action, out) = run_target(&h, TCP, TCP_SYN | TCP_ACK);
    assert_eq!(action, TC_ACT_REDIRECT);
    assert!(packet::parse(&out).unwrap().l4_checksum_ok);
    // Without a route MTU in the answer, the lookup itself checks lengths.
    h.ns.ip("link set vif1.0 mtu 1000").unwrap();
    let mut big =
        frame(TCP, LAN_PEER, PEER_PORT, UPLINK_ADDR, 53317, TCP_ACK).with_payload(&[7u8; 1400]);
    big.src_mac = LAN_PEER_MAC;
    h.assert_untouched(
        Role::Uplink,
        h.uplink.index,
        &big.build(),
        Reason::FibFragNeeded,
    );
    assert_eq!(h.reason(Reason::FibLookupRejected), 0);
}

#[test]
fn a_port_range_maps_each_port_to_its_own_target_port_and_back() {
    netns::sweep_leftovers();
    let spec: forwarder::spec::ForwardSpec = "tcp:1714-1764=10.137.0.5:2714".parse().unwrap();
    let range = Rule::from_spec(&spec, TARGET, AllowFrom::Auto, Origin::Flag);
    let h = Harness::new(&[range]).unwrap();
    for port in [1714u16, 1740, 1764] {
        let mut f = frame(TCP, LAN_PEER, PEER_PORT, UPLINK_ADDR, port, TCP_SYN);
        f.src_mac = LAN_PEER_MAC;
        let (action, out) = h.run(Role::Uplink, h.uplink.index, &f.build()).unwrap();
        assert_eq!(action, TC_ACT_REDIRECT, "{port}");
        let p = packet::parse(&out).unwrap();
        assert_eq!((p.daddr, p.dport), (TARGET, port + 1000));
        let reply = frame(
            TCP,
            TARGET,
            port + 1000,
            LAN_PEER,
            PEER_PORT,
            TCP_SYN | TCP_ACK,
        )
        .build();
        let (action, out) = h.run(Role::Downstream, h.vif1.index, &reply).unwrap();
        assert_eq!(action, TC_ACT_REDIRECT, "{port}");
        let p = packet::parse(&out).unwrap();
        assert_eq!(
            (p.saddr, p.sport),
            (UPLINK_ADDR, port),
            "{port}: back from its own listen port"
        );
        assert!(p.l4_checksum_ok);
    }
    let outside = {
        let mut f = frame(TCP, LAN_PEER, PEER_PORT, UPLINK_ADDR, 1765, TCP_SYN);
        f.src_mac = LAN_PEER_MAC;
        f.build()
    };
    h.assert_untouched(Role::Uplink, h.uplink.index, &outside, Reason::NoRule);
    let views = h.datapath.tables.rule_views().unwrap();
    assert_eq!(views.len(), 1, "a range is one rule: {views:?}");
    assert_eq!(
        (views[0].name(), views[0].target_text()),
        ("tcp:1714-1764".into(), "10.137.0.5:2714-2764".into())
    );
    assert_eq!(views[0].flows, 3);
}

#[test]
fn a_flows_remembered_routes_hold_for_one_interface_and_one_fib_generation() {
    let mut h = harness();
    assert_eq!(send_peer(&h, TCP, TCP_SYN), TC_ACT_REDIRECT);
    assert_eq!(send_target(&h, TCP, TCP_SYN | TCP_ACK), TC_ACT_REDIRECT);
    let remembered = entry(&h, TCP).unwrap();
    assert_eq!(remembered.to_target.ingress, h.uplink.index);
    assert_eq!(remembered.to_target.route.ifindex, h.vif1.index);
    assert_eq!(remembered.to_peer.ingress, h.vif1.index);
    assert_eq!(remembered.to_peer.route.ifindex, h.uplink.index);

    // Another VM sending as the target: the reverse-path verdict the flow
    // remembers is about vif1.0, so vif2.0 is checked afresh and fails.
    h.assert_untouched(
        Role::Downstream,
        h.vif2.index,
        &from_target(TCP, TCP_ACK),
        Reason::ReversePathFailed,
    );

    // The peer's MAC changes: the remembered route stands until the daemon
    // bumps the generation, then the FIB is asked again.
    h.ns.ip(&format!(
        "neigh replace {LAN_PEER} lladdr 02:00:00:00:00:66 dev up0 nud permanent"
    ))
    .unwrap();
    let dst_mac = |h: &Harness| {
        packet::parse(&run_target(h, TCP, TCP_ACK).1)
            .unwrap()
            .dst_mac
    };
    assert_eq!(dst_mac(&h), LAN_PEER_MAC, "served from the flow");
    h.datapath.tables.bump_fib_generation().unwrap();
    assert_eq!(dst_mac(&h), [0x02, 0, 0, 0, 0, 0x66]);
}

#[test]
fn a_range_split_or_shrunk_is_a_new_rule_and_ends_the_flows_of_the_old_one() {
    netns::sweep_leftovers();
    let range = |text: &str| {
        let spec: forwarder::spec::ForwardSpec = text.parse().unwrap();
        Rule::from_spec(&spec, TARGET, AllowFrom::Auto, Origin::Flag)
    };
    let whole = range("tcp:1714-1764=10.137.0.5:2714");
    let mut h = Harness::new(std::slice::from_ref(&whole)).unwrap();
    let open = |h: &Harness, port: u16| {
        let mut f = frame(TCP, LAN_PEER, PEER_PORT, UPLINK_ADDR, port, TCP_SYN);
        f.src_mac = LAN_PEER_MAC;
        let (action, _) = h.run(Role::Uplink, h.uplink.index, &f.build()).unwrap();
        assert_eq!(action, TC_ACT_REDIRECT, "{port}");
    };
    let flow_on = |h: &Harness, port: u16| h.flow(TCP, LAN_PEER, PEER_PORT, port);

    // Shrunk: the ports it lost must not keep flows under the old id.
    open(&h, 1750);
    let shrunk = range("tcp:1714-1740=10.137.0.5:2714");
    h.datapath.tables.sync_rules(&[shrunk]).unwrap();
    assert!(
        flow_on(&h, 1750).is_none(),
        "a flow on a port the rule lost"
    );

    // Split, same target and shift: two rules with their own ids.
    h.datapath.tables.sync_rules(&[whole]).unwrap();
    open(&h, 1720);
    open(&h, 1750);
    let halves = [
        range("tcp:1714-1740=10.137.0.5:2714"),
        range("tcp:1741-1764=10.137.0.5:2741"),
    ];
    h.datapath.tables.sync_rules(&halves).unwrap();
    let views = h.datapath.tables.rule_views().unwrap();
    let names: Vec<String> = views.iter().map(|v| v.name()).collect();
    assert_eq!(names, ["tcp:1714-1740", "tcp:1741-1764"]);
    assert_ne!(h.rule_id(TCP, 1714), h.rule_id(TCP, 1741));
    assert!(flow_on(&h, 1720).is_none() && flow_on(&h, 1750).is_none());

    // Unchanged: the same two rules again keep their ids and flows.
    open(&h, 1720);
    let id = h.rule_id(TCP, 1714);
    h.datapath.tables.sync_rules(&halves).unwrap();
    assert_eq!(h.rule_id(TCP, 1714), id);
    assert!(flow_on(&h, 1720).is_some());
}

#[test]
fn another_vm_cannot_reset_refresh_or_answer_a_vms_flow() {
    let mut h = harness();
    handshake(&h, &[]);
    // Idle for 5 s, so that any refresh would show in seen_ns.
    let mut idle = entry(&h, TCP).unwrap();
    idle.seen_ns -= 5_000_000_000;
    h.set_flow(TCP, LAN_PEER, PEER_PORT, 53317, &idle);
    // VM B, behind vif2.0, sends as VM A: an in-window reset, a FIN and a
    // plain ACK. Each fails the reverse-path check and changes nothing.
    for flags in [TCP_RST, TCP_FIN | TCP_ACK, TCP_ACK] {
        let spoofed = target_segment(flags, TARGET_ISN + 1, PEER_ISN + 1).build();
        h.assert_untouched(
            Role::Downstream,
            h.vif2.index,
            &spoofed,
            Reason::ReversePathFailed,
        );
        assert_eq!(
            entry(&h, TCP).unwrap(),
            idle,
            "flags {flags:#x} from vif2.0"
        );
    }
    // A UDP flow the target has not answered stays unanswered.
    assert_eq!(send_peer(&h, UDP, 0), TC_ACT_REDIRECT);
    let unanswered = entry(&h, UDP).unwrap();
    h.assert_untouched(
        Role::Downstream,
        h.vif2.index,
        &from_target(UDP, 0),
        Reason::ReversePathFailed,
    );
    assert_eq!(entry(&h, UDP).unwrap(), unanswered);
    assert_eq!(flow::state_name(UDP, unanswered.state), "unreplied");

    // Positive control: the same reset from VM A itself is believed.
    let reset = target_segment(TCP_RST, TARGET_ISN + 1, PEER_ISN + 1);
    assert_eq!(
        action(&h, Role::Downstream, h.vif1.index, &reset),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        flow::state_name(TCP, entry(&h, TCP).unwrap().state),
        "reset"
    );
}

#[test]
fn a_syn_the_vm_answers_is_established_only_by_the_peers_ack() {
    let h = harness();
    // A spoofed SYN the VM answers: the spoofer never sees the SYN-ACK.
    assert_eq!(
        action(
            &h,
            Role::Uplink,
            h.uplink.index,
            &peer_segment(TCP_SYN, PEER_ISN, 0)
        ),
        TC_ACT_REDIRECT
    );
    let syn_ack = target_segment(TCP_SYN | TCP_ACK, TARGET_ISN, PEER_ISN + 1);
    assert_eq!(
        action(&h, Role::Downstream, h.vif1.index, &syn_ack),
        TC_ACT_REDIRECT
    );
    let answered = entry(&h, TCP).unwrap();
    assert_eq!(flow::state_name(TCP, answered.state), "syn_recv");
    assert_eq!(
        flow::idle_timeout_ns(TCP, answered.state),
        flow::TCP_OPENING_NS,
        "not the 6 h of an established flow"
    );
    // ACKs that do not acknowledge the SYN-ACK are forwarded (the VM
    // judges them) but establish nothing.
    for ack in [TARGET_ISN, TARGET_ISN + 2, 0] {
        let guess = peer_segment(TCP_ACK, PEER_ISN + 1, ack);
        assert_eq!(
            action(&h, Role::Uplink, h.uplink.index, &guess),
            TC_ACT_REDIRECT
        );
        assert_eq!(
            flow::state_name(TCP, entry(&h, TCP).unwrap().state),
            "syn_recv",
            "ack {ack}"
        );
    }
    let ack = peer_segment(TCP_ACK, PEER_ISN + 1, TARGET_ISN + 1);
    assert_eq!(
        action(&h, Role::Uplink, h.uplink.index, &ack),
        TC_ACT_REDIRECT
    );
    let established = entry(&h, TCP).unwrap();
    assert_eq!(flow::state_name(TCP, established.state), "established");
    assert_eq!(
        flow::idle_timeout_ns(TCP, established.state),
        flow::TCP_ESTABLISHED_NS
    );
}

#[test]
fn resets_outside_the_window_are_neither_believed_nor_forwarded() {
    let h = harness();
    handshake(&h, &[]);
    let established = entry(&h, TCP).unwrap();
    for (role, ifindex, reset) in [
        (
            Role::Uplink,
            h.uplink.index,
            peer_segment(TCP_RST, PEER_ISN + 1 + WINDOW + 1, 0),
        ),
        (
            Role::Uplink,
            h.uplink.index,
            peer_segment(TCP_RST, PEER_ISN, 0),
        ),
        (
            Role::Downstream,
            h.vif1.index,
            target_segment(TCP_RST | TCP_ACK, TARGET_ISN + 1 + WINDOW + 1, PEER_ISN + 1),
        ),
        (
            Role::Downstream,
            h.vif1.index,
            target_segment(TCP_RST, 0x8000_0000, 0),
        ),
    ] {
        h.assert_untouched(role, ifindex, &reset.build(), Reason::TcpOutOfWindow);
        assert_eq!(entry(&h, TCP).unwrap().state, established.state);
    }
    // Inside the window, at its far edge: believed and forwarded.
    let reset = peer_segment(TCP_RST, PEER_ISN + 1 + WINDOW, 0);
    assert_eq!(
        action(&h, Role::Uplink, h.uplink.index, &reset),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        flow::state_name(TCP, entry(&h, TCP).unwrap().state),
        "reset"
    );
}

#[test]
fn window_scale_options_are_read_from_both_syns() {
    let scaled_edge = TARGET_ISN + 1 + WINDOW * 128;
    let h = harness();
    handshake(&h, &SYN_OPTIONS_WSCALE_7);
    let beyond = target_segment(TCP_RST, scaled_edge + 1, PEER_ISN + 1);
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &beyond.build(),
        Reason::TcpOutOfWindow,
    );
    let edge = target_segment(TCP_RST, scaled_edge, PEER_ISN + 1);
    assert_eq!(
        action(&h, Role::Downstream, h.vif1.index, &edge),
        TC_ACT_REDIRECT
    );
    // Without the option the same reset is far outside the window.
    drop(h);
    let h = harness();
    handshake(&h, &[]);
    let edge = target_segment(TCP_RST, scaled_edge, PEER_ISN + 1);
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &edge.build(),
        Reason::TcpOutOfWindow,
    );
}
