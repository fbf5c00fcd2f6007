//! Packet in, packet out: the programs run through BPF_PROG_TEST_RUN in a
//! namespace with real routes and neighbours. Every rewritten packet's
//! checksums are verified by an independent implementation; every packet
//! the programs must not claim comes back byte for byte and is counted.

use std::net::Ipv4Addr;

use forwarder::{
    datapath::Role,
    rules::Origin,
    rules::Rule,
    spec::{AllowFrom, Ports, Proto},
};
use forwarder_common::{maps::UPLINK_UP, reason::Reason};
use forwarder_tests::{
    netns,
    packet::{self, Frame, ICMP, TCP, UDP},
    testrun::*,
};

fn rule(proto: Proto, port: u16, target: Ipv4Addr, target_port: u16, allow: AllowFrom) -> Rule {
    Rule::new(
        proto,
        Ports::one(port),
        target,
        target_port,
        allow,
        Origin::Flag,
    )
}

fn rules() -> Vec<Rule> {
    vec![
        rule(Proto::Tcp, 53317, TARGET, 53317, AllowFrom::Auto),
        rule(Proto::Udp, 53317, TARGET, 53317, AllowFrom::Auto),
        rule(Proto::Tcp, 8080, TARGET, 80, AllowFrom::Auto),
        rule(Proto::Udp, 5000, UNRESOLVED, 5000, AllowFrom::Any),
        rule(
            Proto::Tcp,
            2222,
            TARGET,
            22,
            "192.168.1.64/26".parse().unwrap(),
        ),
    ]
}

fn harness() -> Harness {
    netns::sweep_leftovers();
    Harness::new(&rules()).expect("test_run harness")
}

/// From the LAN peer, as it arrives on the uplink.
fn from_lan(mut frame: Frame) -> Frame {
    frame.src_mac = LAN_PEER_MAC;
    frame
}

#[test]
fn tcp_syn_to_the_listen_port_is_dnatted_to_the_target() {
    let h = harness();
    let frame = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317)).build();
    let (action, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
    assert_eq!(action, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!((p.saddr, p.sport), (LAN_PEER, 40000), "source kept");
    assert_eq!((p.daddr, p.dport), (TARGET, 53317));
    assert_eq!(p.ttl, 63);
    assert_eq!(p.dst_mac, TARGET_MAC);
    assert_eq!(p.src_mac, h.vif1.mac);
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
    let installed = h.datapath.tables.installed().unwrap();
    let slot = installed[&(TCP, 53317)].1.slot;
    let counters = h.datapath.tables.rule_counters(slot).unwrap();
    assert_eq!(
        (counters.packets_in, counters.bytes_in),
        (1, (frame.len() - 14) as u64)
    );
}

#[test]
fn udp_is_dnatted_and_ports_are_remapped() {
    let h = harness();
    let frame =
        from_lan(Frame::udp(LAN_PEER, 41000, UPLINK_ADDR, 53317).with_payload(b"announce")).build();
    let (action, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
    assert_eq!(action, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!((p.daddr, p.dport, p.proto), (TARGET, 53317, UDP));
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
    assert_eq!(p.payload, b"announce");

    let frame =
        from_lan(Frame::tcp(LAN_PEER, 41000, UPLINK_ADDR, 8080).with_payload(b"GET /")).build();
    let (action, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
    assert_eq!(action, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!((p.daddr, p.dport), (TARGET, 80));
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
}

#[test]
fn udp_without_checksum_keeps_it_zero() {
    let h = harness();
    let mut frame = from_lan(Frame::udp(LAN_PEER, 41000, UPLINK_ADDR, 53317).with_payload(b"x"));
    frame.udp_no_checksum = true;
    let (action, out) = h.run(Role::Uplink, h.uplink.index, &frame.build()).unwrap();
    assert_eq!(action, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert!(
        p.udp_checksum_zero,
        "a zero UDP checksum means none and must stay zero"
    );
    assert!(p.ip_checksum_ok);
}

/// The LAN peer's first packet on a listen port: opens the flow.
fn open(h: &Harness, proto: u8, peer: Ipv4Addr, listen_port: u16) {
    let frame = if proto == TCP {
        Frame::tcp(peer, 40000, UPLINK_ADDR, listen_port)
    } else {
        Frame::udp(peer, 40000, UPLINK_ADDR, listen_port)
    };
    let (action, _) = h
        .run(Role::Uplink, h.uplink.index, &from_lan(frame).build())
        .unwrap();
    assert_eq!(action, TC_ACT_REDIRECT, "opening {proto}:{listen_port}");
}

#[test]
fn replies_are_translated_back_to_the_uplink() {
    let h = harness();
    open(&h, TCP, LAN_PEER, 53317);
    open(&h, TCP, LAN_PEER, 8080);
    let frame = Frame::tcp(TARGET, 53317, LAN_PEER, 40000)
        .with_payload(b"pong")
        .build();
    let (action, out) = h.run(Role::Downstream, h.vif1.index, &frame).unwrap();
    assert_eq!(action, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!((p.saddr, p.sport), (UPLINK_ADDR, 53317));
    assert_eq!((p.daddr, p.dport), (LAN_PEER, 40000));
    assert_eq!((p.dst_mac, p.src_mac), (LAN_PEER_MAC, h.uplink.mac));
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);

    let frame = Frame::tcp(TARGET, 80, LAN_PEER, 40000).build();
    let (action, out) = h.run(Role::Downstream, h.vif1.index, &frame).unwrap();
    assert_eq!(action, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!(
        (p.saddr, p.sport),
        (UPLINK_ADDR, 8080),
        "remapped port restored"
    );
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
}

#[test]
fn unresolved_neighbour_is_redirected_through_the_neighbour_subsystem() {
    let h = harness();
    let frame = from_lan(Frame::udp(LAN_PEER, 41000, UPLINK_ADDR, 5000)).build();
    let (action, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
    assert_eq!(action, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!(p.daddr, UNRESOLVED);
    assert_eq!(p.dst_mac, frame[..6], "L2 is left to bpf_redirect_neigh");
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
}

#[test]
fn traffic_outside_the_rules_is_untouched_and_counted() {
    let h = harness();
    let up = h.uplink.index;
    let other_port = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 22)).build();
    h.assert_untouched(Role::Uplink, up, &other_port, Reason::NoRule);
    let other_dst = from_lan(Frame::tcp(
        LAN_PEER,
        40000,
        Ipv4Addr::new(192, 168, 1, 3),
        53317,
    ))
    .build();
    h.assert_untouched(Role::Uplink, up, &other_dst, Reason::OtherDestination);
    let wrong_proto = from_lan(Frame::udp(LAN_PEER, 40000, UPLINK_ADDR, 8080)).build();
    h.assert_untouched(Role::Uplink, up, &wrong_proto, Reason::NoRule);
    let on_wrong_iface = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317)).build();
    h.assert_untouched(
        Role::Uplink,
        h.vif1.index,
        &on_wrong_iface,
        Reason::NotUplink,
    );
    let vm_outbound = Frame::tcp(TARGET, 43000, LAN_PEER, 80).build();
    h.assert_untouched(Role::Downstream, h.vif1.index, &vm_outbound, Reason::NoRule);
}

#[test]
fn sources_outside_allow_from_are_untouched() {
    let h = harness();
    let up = h.uplink.index;
    let off_subnet = from_lan(Frame::tcp(
        Ipv4Addr::new(192, 168, 7, 1),
        40000,
        UPLINK_ADDR,
        53317,
    ))
    .build();
    h.assert_untouched(Role::Uplink, up, &off_subnet, Reason::SourceNotAllowed);
    let outside_list = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 2222)).build();
    h.assert_untouched(Role::Uplink, up, &outside_list, Reason::SourceNotAllowed);
    let inside_list = from_lan(Frame::tcp(
        Ipv4Addr::new(192, 168, 1, 70),
        40000,
        UPLINK_ADDR,
        2222,
    ))
    .build();
    let (action, _) = h.run(Role::Uplink, up, &inside_list).unwrap();
    assert_eq!(
        action, TC_ACT_REDIRECT,
        "192.168.1.70 is in 192.168.1.64/26"
    );
}

#[test]
fn spoofed_and_martian_sources_are_untouched() {
    let h = harness();
    let up = h.uplink.index;
    for (src, reason) in [
        (Ipv4Addr::new(127, 0, 0, 1), Reason::MartianSource),
        (Ipv4Addr::new(0, 0, 0, 0), Reason::MartianSource),
        (Ipv4Addr::new(224, 0, 0, 167), Reason::MartianSource),
        (Ipv4Addr::new(255, 255, 255, 255), Reason::MartianSource),
        (UPLINK_ADDR, Reason::MartianSource),
        // A downstream VM's address arriving on the uplink: its route points
        // at a vif, so the strict reverse-path check fails.
        (TARGET, Reason::ReversePathFailed),
    ] {
        let mut frame = from_lan(Frame::tcp(src, 40000, UPLINK_ADDR, 53317));
        if reason == Reason::ReversePathFailed {
            frame = from_lan(Frame::udp(src, 40000, UPLINK_ADDR, 5000));
        }
        h.assert_untouched(Role::Uplink, up, &frame.build(), reason);
    }
}

#[test]
fn spoofed_replies_are_untouched() {
    let h = harness();
    open(&h, TCP, LAN_PEER, 53317);
    // Wrong address: another VM pretending to be the target's service.
    let wrong_addr = Frame::tcp(OTHER_VM, 53317, LAN_PEER, 40000).build();
    h.assert_untouched(Role::Downstream, h.vif2.index, &wrong_addr, Reason::NoRule);
    // Right address, wrong interface: the target lives behind vif1.0.
    let wrong_iface = Frame::tcp(TARGET, 53317, LAN_PEER, 40000).build();
    h.assert_untouched(
        Role::Downstream,
        h.vif2.index,
        &wrong_iface,
        Reason::ReversePathFailed,
    );
    // Toward a peer auto does not allow (off the uplink's subnet).
    let far_peer = Frame::tcp(TARGET, 53317, Ipv4Addr::new(8, 8, 8, 8), 40000).build();
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &far_peer,
        Reason::PeerNotAllowed,
    );
    // Toward another VM: not out of the uplink, so the stack decides. The
    // flow is planted: no LAN packet could have opened it.
    let mut h = h;
    let id = h.rule_id(UDP, 5000);
    h.set_flow(
        UDP,
        OTHER_VM,
        40000,
        5000,
        &forwarder_common::maps::FlowEntry {
            rule_id: id,
            created_ns: forwarder::clock::boot_ns(),
            seen_ns: forwarder::clock::boot_ns(),
            ..Default::default()
        },
    );
    let to_vm = Frame::udp(UNRESOLVED, 5000, OTHER_VM, 40000).build();
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &to_vm,
        Reason::ReplyNotViaUplink,
    );
}

#[test]
fn ttl_that_would_expire_goes_to_the_stack() {
    let h = harness();
    let mut frame = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317));
    frame.ttl = 1;
    h.assert_untouched(
        Role::Uplink,
        h.uplink.index,
        &frame.build(),
        Reason::TtlExpired,
    );
    open(&h, TCP, LAN_PEER, 53317);
    let mut reply = Frame::tcp(TARGET, 53317, LAN_PEER, 40000);
    reply.ttl = 1;
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &reply.build(),
        Reason::TtlExpired,
    );
}

#[test]
fn over_mtu_packets_go_to_the_stack_but_gso_packets_are_judged_by_segment() {
    let h = harness();
    h.ns.ip("link set vif1.0 mtu 1000").unwrap();
    let big = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317).with_payload(&[7u8; 1400]))
        .build();
    h.assert_untouched(Role::Uplink, h.uplink.index, &big, Reason::FibFragNeeded);
    let (action, out) = h.run_gso(Role::Uplink, h.uplink.index, &big, 900).unwrap();
    assert_eq!(action, TC_ACT_REDIRECT, "900-byte segments fit a 1000 MTU");
    assert!(packet::parse(&out).unwrap().l4_checksum_ok);
}

#[test]
fn no_uplink_address_means_nothing_is_forwarded() {
    let mut h = harness();
    let mut state = h.uplink_state();
    state.flags = UPLINK_UP;
    h.datapath.tables.set_uplink(state).unwrap();
    let frame = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317)).build();
    h.assert_untouched(
        Role::Uplink,
        h.uplink.index,
        &frame,
        Reason::NoUplinkAddress,
    );
    let reply = Frame::tcp(TARGET, 53317, LAN_PEER, 40000).build();
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &reply,
        Reason::NoUplinkAddress,
    );
}

#[test]
fn icmp_errors_about_forwarded_flows_are_dropped() {
    let h = harness();
    let forwarded = Frame::udp(LAN_PEER, 41000, TARGET, 53317).build();
    let error = packet::icmp_error(TARGET, LAN_PEER, 3, 3, &forwarded);
    let before = h.reason(Reason::IcmpErrorDropped);
    let (action, _) = h.run(Role::Downstream, h.vif1.index, &error).unwrap();
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(h.reason(Reason::IcmpErrorDropped), before + 1);

    let unrelated = Frame::udp(TARGET, 41000, Ipv4Addr::new(9, 9, 9, 9), 53).build();
    let error = packet::icmp_error(TARGET, LAN_PEER, 3, 3, &unrelated);
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &error,
        Reason::OtherProtocol,
    );
    let mut ping = Frame::udp(TARGET, 0, LAN_PEER, 0);
    ping.proto = ICMP;
    ping.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &ping.build(),
        Reason::OtherProtocol,
    );
}

#[test]
fn malformed_input_passes_with_identical_bytes_and_is_counted() {
    let h = harness();
    let up = h.uplink.index;
    let good = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317).with_payload(b"data"));
    let bytes = good.build();

    // Cut anywhere after the IP header: the IP length promises more than
    // the packet holds. (BPF_PROG_TEST_RUN itself refuses an IPv4 frame
    // shorter than an IP header, so shorter cuts cannot be fed in.)
    for len in 14 + 20..bytes.len() {
        h.assert_untouched(Role::Uplink, up, &bytes[..len], Reason::BadLength);
    }
    // Cut inside the transport header with a consistent IP length.
    for (frame, keep) in [
        (good.clone(), 19),
        (from_lan(Frame::udp(LAN_PEER, 1, UPLINK_ADDR, 53317)), 7),
    ] {
        let mut cut = frame.clone();
        cut.tot_len = Some(20 + keep);
        let bytes = cut.build();
        h.assert_untouched(
            Role::Uplink,
            up,
            &bytes[..14 + 20 + keep as usize],
            Reason::BadLength,
        );
    }

    let mut f = bytes.clone();
    f[14] = 0x44;
    h.assert_untouched(Role::Uplink, up, &f, Reason::BadIpHeader);
    let mut f = bytes.clone();
    f[14] = 0x65;
    h.assert_untouched(Role::Uplink, up, &f, Reason::BadIpHeader);

    let mut options = good.clone();
    options.ip_options = vec![1, 1, 1, 0];
    h.assert_untouched(Role::Uplink, up, &options.build(), Reason::IpOptions);

    for frag in [0x2000, 0x0001, 0x2010] {
        let mut fragment = good.clone();
        fragment.frag = frag;
        h.assert_untouched(Role::Uplink, up, &fragment.build(), Reason::Fragment);
    }

    let mut arp = good.clone();
    arp.ether_type = 0x0806;
    h.assert_untouched(Role::Uplink, up, &arp.build(), Reason::NotIpv4);
    let mut ipv6 = good.clone();
    ipv6.ether_type = 0x86dd;
    h.assert_untouched(Role::Uplink, up, &ipv6.build(), Reason::Ipv6);
    let mut vlan = good.clone();
    vlan.vlan = Some(5);
    h.assert_untouched(Role::Uplink, up, &vlan.build(), Reason::Vlan);

    let mut too_long = good.clone();
    too_long.tot_len = Some(2000);
    h.assert_untouched(Role::Uplink, up, &too_long.build(), Reason::BadLength);
    let mut too_short = good.clone();
    too_short.tot_len = Some(30);
    h.assert_untouched(Role::Uplink, up, &too_short.build(), Reason::BadLength);

    let mut bad_doff = bytes.clone();
    bad_doff[14 + 20 + 12] = 0x40;
    h.assert_untouched(Role::Uplink, up, &bad_doff, Reason::BadLength);

    // The same shapes on the downstream program.
    let reply = Frame::tcp(TARGET, 53317, LAN_PEER, 40000).build();
    for len in 14 + 20..reply.len() {
        h.assert_untouched(
            Role::Downstream,
            h.vif1.index,
            &reply[..len],
            Reason::BadLength,
        );
    }
    let forwarded = Frame::udp(LAN_PEER, 41000, TARGET, 53317).build();
    let error = packet::icmp_error(TARGET, LAN_PEER, 3, 3, &forwarded);
    // An ICMP error cut short: first inside the quoted IP header, then
    // (with an IP length that admits it) short of the quoted ports.
    let quote_ports = 14 + 20 + 8 + 20;
    for len in 14 + 20..quote_ports + 4 {
        let mut cut = error[..len].to_vec();
        cut[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        let reason = if len < quote_ports {
            Reason::Truncated
        } else {
            Reason::BadLength
        };
        h.assert_untouched(Role::Downstream, h.vif1.index, &cut, reason);
    }
    let mut frag = Frame::tcp(TARGET, 53317, LAN_PEER, 40000);
    frag.frag = 0x2000;
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &frag.build(),
        Reason::Fragment,
    );
}

#[test]
fn random_packets_are_either_rewritten_correctly_or_untouched() {
    let h = harness();
    let mut seed = 0x243f_6a88_85a3_08d3u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let ports = [53317u16, 8080, 5000, 2222, 22, 53318];
    let mut rewritten = 0;
    for i in 0..400 {
        let r = next();
        let proto = if r & 1 == 0 { TCP } else { UDP };
        let dport = ports[(r >> 8) as usize % ports.len()];
        let payload: Vec<u8> = (0..(r >> 16) % 1200).map(|_| next() as u8).collect();
        let src = Ipv4Addr::new(192, 168, 1, (r >> 32) as u8 % 250 + 3);
        let frame = if proto == TCP {
            Frame::tcp(src, 1024 + (r >> 40) as u16 % 60000, UPLINK_ADDR, dport)
        } else {
            Frame::udp(src, 1024 + (r >> 40) as u16 % 60000, UPLINK_ADDR, dport)
        };
        let mut frame = from_lan(frame.with_payload(&payload));
        frame.ttl = 2 + (r >> 48) as u8 % 200;
        let bytes = frame.build();
        let (action, out) = h.run(Role::Uplink, h.uplink.index, &bytes).unwrap();
        let expected = rules().into_iter().find(|rule| {
            rule.proto.number() == proto && rule.ports.contains(dport) && {
                forwarder::rules::encode_allow(&rule.allow)
                    .allows(u32::from_ne_bytes(src.octets()), &h.uplink_state())
            }
        });
        match expected {
            Some(rule) => {
                assert_eq!(action, TC_ACT_REDIRECT, "packet {i}");
                let p = packet::parse(&out).unwrap();
                assert_eq!(
                    (p.daddr, p.dport),
                    (rule.target, rule.target_port),
                    "packet {i}"
                );
                assert_eq!(p.ttl, frame.ttl - 1);
                assert!(p.ip_checksum_ok && p.l4_checksum_ok, "packet {i}: {p:?}");
                assert_eq!(p.payload, payload);
                rewritten += 1;
            }
            None => {
                assert_eq!(action, TC_ACT_UNSPEC, "packet {i}");
                assert_eq!(out, bytes, "packet {i}");
            }
        }
    }
    assert!(
        rewritten > 100,
        "only {rewritten} of 400 exercised the rewrite"
    );
}

#[test]
fn cached_routes_are_used_until_the_fib_generation_changes() {
    let mut h = harness();
    let frame = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317)).build();
    let (_, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
    assert_eq!(packet::parse(&out).unwrap().dst_mac, TARGET_MAC);

    // The target's MAC changes; the daemon would see it on rtnetlink and
    // bump the generation. Until then the cached result stands...
    let moved = [0x02, 0, 0, 0, 0, 0x55];
    h.ns.ip(&format!(
        "neigh replace {TARGET} lladdr 02:00:00:00:00:55 dev vif1.0 nud permanent"
    ))
    .unwrap();
    let (_, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
    assert_eq!(
        packet::parse(&out).unwrap().dst_mac,
        TARGET_MAC,
        "served from the cache"
    );
    // ...and after the bump the FIB is asked again.
    h.datapath.tables.bump_fib_generation().unwrap();
    let (_, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
    assert_eq!(packet::parse(&out).unwrap().dst_mac, moved);
}

/// The bench's breakdown (forwarder-common's cut) stops both forwarding
/// paths of an established flow after each stage: the packet is passed on
/// and nothing is counted, the packet untouched before the last cut and
/// translated at it; loaded whole again, the paths redirect.
#[test]
fn programs_cut_by_the_bench_leave_the_packet_alone_and_count_nothing() {
    let mut h = harness();
    open(&h, TCP, LAN_PEER, 53317);
    let dnat = from_lan(Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317)).build();
    let reply = Frame::tcp(TARGET, 53317, LAN_PEER, 40000).build();
    for cut in forwarder_common::cut::Cut::ALL {
        h.cut_at(Some(*cut)).unwrap();
        let counts = h.datapath.tables.reason_counters().unwrap();
        for (role, ifindex, frame) in [
            (Role::Uplink, h.uplink.index, &dnat),
            (Role::Downstream, h.vif1.index, &reply),
        ] {
            let (action, out) = h.run(role, ifindex, frame).unwrap();
            assert_eq!(action, TC_ACT_UNSPEC, "{cut:?}, {}", role.name());
            let translated = *cut == forwarder_common::cut::Cut::Translate;
            assert_eq!(
                &out != frame,
                translated,
                "{cut:?}, {}: translated is {translated}",
                role.name()
            );
        }
        assert_eq!(
            h.datapath.tables.reason_counters().unwrap(),
            counts,
            "{cut:?} counted a reason"
        );
    }
    h.cut_at(None).unwrap();
    for (role, ifindex, frame) in [
        (Role::Uplink, h.uplink.index, &dnat),
        (Role::Downstream, h.vif1.index, &reply),
    ] {
        let (action, out) = h.run(role, ifindex, frame).unwrap();
        assert_eq!(action, TC_ACT_REDIRECT, "{} whole", role.name());
        assert_ne!(&out, frame);
    }
}
