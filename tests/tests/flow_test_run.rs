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
        self, FLOW_FIN_PEER, FLOW_FIN_TARGET, FLOW_REPLIED, FLOW_RST, TCP_ACK, TCP_FIN, TCP_RST,
        TCP_SYN,
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
        "established"
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

    send_target(&h, TCP, TCP_RST);
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
        (TCP, FLOW_REPLIED, flow::TCP_ESTABLISHED_NS),
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
