//! Packet in, packet out for the multicast relay. Copies leave through
//! bpf_clone_redirect for real and are captured on the far end of the veth
//! they were sent out of; the original must come back unchanged.

use std::{net::Ipv4Addr, time::Duration};

use forwarder::{datapath::Role, rules::Relay};
use forwarder_common::{
    maps::{RelayCounters, group_mac},
    reason::Reason,
};
use forwarder_tests::{
    capture::Capture,
    netns,
    packet::{self, Frame},
    testrun::*,
    wait::wait_until,
};

const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 167);
const PORT: u16 = 53317;

fn relay(targets: &[Ipv4Addr], ttl: Option<u8>, rate: u32) -> Relay {
    Relay {
        group: GROUP,
        port: PORT,
        targets: targets.to_vec(),
        ttl,
        rate,
        rate_down: 1_000_000,
        allow: forwarder::spec::AllowFrom::Auto,
    }
}

fn harness(relays: &[Relay]) -> Harness {
    netns::sweep_leftovers();
    Harness::with_relays(&[], relays).expect("test_run harness")
}

/// A VM's announcement as it arrives on its vif: TTL 1, ephemeral port.
fn announcement(from: Ipv4Addr) -> Frame {
    let mut frame =
        Frame::udp(from, 41234, GROUP, PORT).with_payload(br#"{"alias":"app","announce":true}"#);
    frame.dst_mac = group_mac(u32::from_ne_bytes(GROUP.octets()));
    frame.ttl = 1;
    frame
}

fn lan_announcement(from: Ipv4Addr) -> Frame {
    let mut frame = announcement(from);
    frame.src_mac = LAN_PEER_MAC;
    frame.ttl = 2;
    frame
}

/// The frames a capture receives that `wanted` picks: waits until
/// `expected` arrived, then gives extra ones a deadline to show up (there
/// must be none).
fn frames_matching(capture: Capture, expected: usize, wanted: fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    let count = || capture.snapshot().iter().filter(|f| wanted(f)).count();
    wait_until(Duration::from_secs(2), || count() >= expected);
    wait_until(Duration::from_millis(200), || count() > expected);
    capture.finish().into_iter().filter(|f| wanted(f)).collect()
}

/// The relay frames a capture receives, as [`frames_matching`] waits.
fn collect(capture: Capture, expected: usize) -> Vec<packet::Parsed> {
    frames_matching(capture, expected, is_relay_frame)
        .iter()
        .filter_map(|f| packet::parse(f))
        .collect()
}

fn is_relay_frame(frame: &[u8]) -> bool {
    packet::parse(frame).is_some_and(|p| p.daddr == GROUP && p.dport == PORT)
}

/// The counters of the harness's one relay.
fn only_relay_counters(h: &Harness) -> RelayCounters {
    let relays = h.datapath.tables.installed_relays().unwrap();
    let slot = relays.values().next().expect("one relay installed").slot;
    h.datapath.tables.relay_counters(slot).unwrap()
}

#[test]
fn a_vm_announcement_is_copied_to_the_uplink_with_the_uplink_source() {
    let h = harness(&[relay(&[TARGET], None, 25)]);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    let frame = announcement(TARGET).build();
    let (action, out) = h.run(Role::Downstream, h.vif1.index, &frame).unwrap();
    assert_eq!(action, TC_ACT_UNSPEC, "the original continues");
    assert_eq!(out, frame, "the original is unchanged");
    let copies = collect(lan, 1);
    assert_eq!(copies.len(), 1, "{copies:?}");
    let copy = &copies[0];
    assert_eq!((copy.saddr, copy.sport), (UPLINK_ADDR, 41234));
    assert_eq!(copy.ttl, 1, "the sender's TTL is kept");
    assert_eq!(copy.dst_mac, group_mac(u32::from_ne_bytes(GROUP.octets())));
    assert_eq!(copy.src_mac, h.uplink.mac);
    assert!(copy.ip_checksum_ok && copy.l4_checksum_ok);
    assert_eq!(copy.payload, br#"{"alias":"app","announce":true}"#);
    assert_eq!(only_relay_counters(&h).packets_up, 1);
}

#[test]
fn a_configured_ttl_replaces_the_senders() {
    let h = harness(&[relay(&[TARGET], Some(2), 25)]);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    let mut frame = announcement(TARGET);
    frame.udp_no_checksum = true;
    let bytes = frame.build();
    let (_, out) = h.run(Role::Downstream, h.vif1.index, &bytes).unwrap();
    assert_eq!(out, bytes);
    let copies = collect(lan, 1);
    assert_eq!(copies[0].ttl, 2);
    assert!(copies[0].udp_checksum_zero, "no UDP checksum stays none");
    assert!(copies[0].ip_checksum_ok);
}

#[test]
fn spoofed_and_non_target_senders_are_not_relayed() {
    let h = harness(&[relay(&[TARGET], None, 25)]);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    for (frame, ifindex, reason) in [
        (announcement(OTHER_VM), h.vif2.index, Reason::RelayNotTarget),
        (
            announcement(TARGET),
            h.vif2.index,
            Reason::ReversePathFailed,
        ),
    ] {
        h.assert_untouched(Role::Downstream, ifindex, &frame.build(), reason);
    }
    let mut other_port = announcement(TARGET);
    other_port.dport = 5353;
    let before = h.reason(Reason::OtherDestination);
    h.run(Role::Downstream, h.vif1.index, &other_port.build())
        .unwrap();
    assert_eq!(h.reason(Reason::OtherDestination), before + 1);
    assert!(collect(lan, 1).is_empty(), "nothing may reach the LAN");
}

#[test]
fn a_lan_announcement_is_copied_toward_the_targets_with_the_peer_source() {
    let h = harness(&[relay(&[TARGET, UNRESOLVED, OTHER_VM], None, 25)]);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    let vm1 = Capture::start(&h.ns, "vm1").unwrap();
    let vm2 = Capture::start(&h.ns, "vm2").unwrap();
    let frame = lan_announcement(LAN_PEER).build();
    let (action, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
    assert_eq!(action, TC_ACT_UNSPEC);
    assert_eq!(out, frame, "the original is unchanged");
    let to_vm1 = collect(vm1, 1);
    let to_vm2 = collect(vm2, 1);
    // TARGET and UNRESOLVED both sit behind vif1.0: one copy there.
    assert_eq!(
        (to_vm1.len(), to_vm2.len()),
        (1, 1),
        "{to_vm1:?} {to_vm2:?}"
    );
    for (copy, vif) in [(&to_vm1[0], &h.vif1), (&to_vm2[0], &h.vif2)] {
        assert_eq!(copy.saddr, LAN_PEER, "the peer's source is kept");
        assert_eq!(copy.daddr, GROUP, "still multicast");
        assert_eq!(copy.ttl, 2);
        assert_eq!(copy.src_mac, vif.mac);
        assert_eq!(copy.dst_mac, group_mac(u32::from_ne_bytes(GROUP.octets())));
        assert!(copy.ip_checksum_ok && copy.l4_checksum_ok);
    }
    assert!(
        collect(lan, 1).is_empty(),
        "never sent back out of the uplink"
    );
}

#[test]
fn reflected_and_foreign_lan_frames_are_ignored() {
    let h = harness(&[relay(&[TARGET], None, 25)]);
    let vm1 = Capture::start(&h.ns, "vm1").unwrap();
    let mut own_mac = lan_announcement(LAN_PEER);
    own_mac.src_mac = h.uplink.mac;
    let own_addr = lan_announcement(UPLINK_ADDR);
    let off_subnet = lan_announcement(Ipv4Addr::new(192, 168, 9, 9));
    for (frame, reason) in [
        (own_mac, Reason::Reflected),
        (own_addr, Reason::Reflected),
        (off_subnet, Reason::SourceNotAllowed),
        (
            lan_announcement(Ipv4Addr::new(127, 0, 0, 1)),
            Reason::MartianSource,
        ),
    ] {
        h.assert_untouched(Role::Uplink, h.uplink.index, &frame.build(), reason);
    }
    assert!(collect(vm1, 1).is_empty());
}

#[test]
fn the_token_bucket_limits_copies_to_the_lan() {
    let h = harness(&[relay(&[TARGET], None, 3)]);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    let frame = announcement(TARGET).build();
    let before = h.reason(Reason::RelayRateLimited);
    for _ in 0..8 {
        let (action, out) = h.run(Role::Downstream, h.vif1.index, &frame).unwrap();
        assert_eq!((action, &out), (TC_ACT_UNSPEC, &frame));
    }
    let copies = collect(lan, 3);
    assert_eq!(copies.len(), 3, "a burst of one second's worth at 3/s");
    assert_eq!(h.reason(Reason::RelayRateLimited), before + 5);
    let counters = only_relay_counters(&h);
    assert_eq!((counters.packets_up, counters.rate_limited), (3, 5));
}

#[test]
fn the_token_bucket_limits_copies_toward_the_vms() {
    let mut limited = relay(&[TARGET, OTHER_VM], None, 25);
    limited.rate_down = 3;
    let h = harness(&[limited]);
    let vm1 = Capture::start(&h.ns, "vm1").unwrap();
    let vm2 = Capture::start(&h.ns, "vm2").unwrap();
    let frame = lan_announcement(LAN_PEER).build();
    let before = h.reason(Reason::RelayDownRateLimited);
    for _ in 0..8 {
        let (action, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
        assert_eq!(
            (action, &out),
            (TC_ACT_UNSPEC, &frame),
            "the original continues"
        );
    }
    // One token per datagram, however many targets it is copied to.
    assert_eq!(
        collect(vm1, 3).len(),
        3,
        "a burst of one second's worth at 3/s"
    );
    assert_eq!(collect(vm2, 3).len(), 3);
    assert_eq!(h.reason(Reason::RelayDownRateLimited), before + 5);
    let counters = only_relay_counters(&h);
    assert_eq!((counters.packets_down, counters.rate_limited_down), (6, 5));
}

#[test]
fn only_allowed_lan_peers_are_copied_toward_the_vms() {
    let mut allow_one = relay(&[TARGET], None, 25);
    allow_one.allow = format!("{LAN_PEER}/32").parse().unwrap();
    let h = harness(&[allow_one]);
    let vm1 = Capture::start(&h.ns, "vm1").unwrap();
    let other = Ipv4Addr::new(192, 168, 1, 77);
    h.ns.ip(&format!(
        "neigh replace {other} lladdr 02:00:00:00:01:4d dev up0 nud permanent"
    ))
    .unwrap();
    h.assert_untouched(
        Role::Uplink,
        h.uplink.index,
        &lan_announcement(other).build(),
        Reason::SourceNotAllowed,
    );
    let (action, _) = h
        .run(
            Role::Uplink,
            h.uplink.index,
            &lan_announcement(LAN_PEER).build(),
        )
        .unwrap();
    assert_eq!(action, TC_ACT_UNSPEC);
    let copies = collect(vm1, 1);
    assert_eq!(copies.len(), 1, "the allowed peer's copy, and only it");
    assert_eq!(copies[0].saddr, LAN_PEER);
}

const BROADCAST: Ipv4Addr = Ipv4Addr::BROADCAST;
const KDE_PORT: u16 = 1716;

fn broadcast_relay(targets: &[Ipv4Addr]) -> Relay {
    Relay {
        group: BROADCAST,
        port: KDE_PORT,
        ..relay(targets, None, 1_000_000)
    }
}

/// A VM's broadcast as it arrives on its vif.
fn vm_broadcast(payload: &[u8]) -> Frame {
    let mut frame = Frame::udp(TARGET, 41716, BROADCAST, KDE_PORT).with_payload(payload);
    frame.dst_mac = [0xff; 6];
    frame
}

/// A LAN peer's broadcast to `daddr` as it arrives on the uplink.
fn lan_broadcast(daddr: Ipv4Addr, payload: &[u8]) -> Frame {
    let mut frame = Frame::udp(LAN_PEER, 1716, daddr, KDE_PORT).with_payload(payload);
    frame.src_mac = LAN_PEER_MAC;
    frame.dst_mac = [0xff; 6];
    frame
}

fn is_broadcast_frame(frame: &[u8]) -> bool {
    frame.len() > 34 && frame[30..34] == [255, 255, 255, 255]
}

/// Frames a capture saw to the broadcast address, as [`frames_matching`]
/// waits.
fn broadcasts(capture: Capture, expected: usize) -> Vec<Vec<u8>> {
    frames_matching(capture, expected, is_broadcast_frame)
}

#[test]
fn a_vm_broadcast_goes_to_the_lan_as_a_broadcast_from_the_uplink() {
    let h = harness(&[broadcast_relay(&[TARGET])]);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    let frame = vm_broadcast(br#"{"deviceId":"app"}"#).build();
    let (action, out) = h.run(Role::Downstream, h.vif1.index, &frame).unwrap();
    assert_eq!(
        (action, &out),
        (TC_ACT_UNSPEC, &frame),
        "the original continues"
    );
    let copies = broadcasts(lan, 1);
    assert_eq!(copies.len(), 1);
    let copy = packet::parse(&copies[0]).unwrap();
    assert_eq!(
        (copy.saddr, copy.daddr, copy.dport),
        (UPLINK_ADDR, BROADCAST, KDE_PORT)
    );
    assert_eq!((copy.dst_mac, copy.src_mac), ([0xff; 6], h.uplink.mac));
    assert!(copy.ip_checksum_ok && copy.l4_checksum_ok);
}

#[test]
fn lan_broadcasts_limited_or_directed_reach_the_vms_as_limited_broadcasts() {
    let h = harness(&[broadcast_relay(&[TARGET])]);
    for daddr in [BROADCAST, Ipv4Addr::new(192, 168, 1, 255)] {
        let vm1 = Capture::start(&h.ns, "vm1").unwrap();
        let frame = lan_broadcast(daddr, b"identity").build();
        let (action, out) = h.run(Role::Uplink, h.uplink.index, &frame).unwrap();
        assert_eq!(
            (action, &out),
            (TC_ACT_UNSPEC, &frame),
            "{daddr}: the original is unchanged"
        );
        let copies = broadcasts(vm1, 1);
        assert_eq!(copies.len(), 1, "{daddr}");
        let copy = packet::parse(&copies[0]).unwrap();
        assert_eq!(
            (copy.saddr, copy.daddr),
            (LAN_PEER, BROADCAST),
            "{daddr}: the peer's source kept"
        );
        assert_eq!((copy.dst_mac, copy.src_mac), ([0xff; 6], h.vif1.mac));
        assert!(
            copy.ip_checksum_ok && copy.l4_checksum_ok,
            "{daddr}: {copy:?}"
        );
    }
    // Another subnet's directed broadcast is no broadcast of this LAN.
    h.assert_untouched(
        Role::Uplink,
        h.uplink.index,
        &lan_broadcast(Ipv4Addr::new(192, 168, 2, 255), b"x").build(),
        Reason::OtherDestination,
    );
}

#[test]
fn fragmented_datagrams_are_relayed_fragment_by_fragment_both_ways() {
    let h = harness(&[broadcast_relay(&[TARGET])]);
    let payload: Vec<u8> = (0..2200u32).map(|i| (i % 251) as u8).collect();
    let mut up = vm_broadcast(&payload);
    up.ip_id = 0x4242;
    let pieces = packet::fragments(&up.build(), 1480);
    assert_eq!(pieces.len(), 2);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    for piece in &pieces {
        let (action, out) = h.run(Role::Downstream, h.vif1.index, piece).unwrap();
        assert_eq!((action, &out), (TC_ACT_UNSPEC, piece));
    }
    let copies = broadcasts(lan, 2);
    assert_eq!(copies.len(), 2, "both fragments go up");
    let whole = packet::parse(&packet::reassemble(&copies)).unwrap();
    assert_eq!(whole.saddr, UPLINK_ADDR);
    assert!(
        whole.l4_checksum_ok,
        "the first fragment's UDP checksum covers the rewrite"
    );
    assert_eq!(whole.payload, payload);

    let mut down = lan_broadcast(Ipv4Addr::new(192, 168, 1, 255), &payload);
    down.ip_id = 0x4343;
    let pieces = packet::fragments(&down.build(), 1480);
    let vm1 = Capture::start(&h.ns, "vm1").unwrap();
    for piece in &pieces {
        let (action, _) = h.run(Role::Uplink, h.uplink.index, piece).unwrap();
        assert_eq!(action, TC_ACT_UNSPEC);
    }
    let copies = broadcasts(vm1, 2);
    assert_eq!(copies.len(), 2, "both fragments go down");
    let whole = packet::parse(&packet::reassemble(&copies)).unwrap();
    assert_eq!((whole.saddr, whole.daddr), (LAN_PEER, BROADCAST));
    assert!(whole.l4_checksum_ok && whole.ip_checksum_ok);

    // A later fragment whose first was never relayed stays with the stack.
    let mut stray = vm_broadcast(&payload);
    stray.ip_id = 0x9999;
    let stray = packet::fragments(&stray.build(), 1480).pop().unwrap();
    h.assert_untouched(Role::Downstream, h.vif1.index, &stray, Reason::Fragment);
}

#[test]
fn a_vms_mdns_answers_and_its_own_address_never_go_up() {
    let mdns_group = Ipv4Addr::new(224, 0, 0, 251);
    let h = harness(&[
        Relay {
            group: mdns_group,
            port: 5353,
            ..relay(&[TARGET], None, 1_000_000)
        },
        broadcast_relay(&[TARGET]),
    ]);
    let mdns = |flags: [u8; 2], body: &[u8]| {
        let mut payload = vec![0, 0, flags[0], flags[1], 0, 1, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(body);
        let mut f = Frame::udp(TARGET, 5353, mdns_group, 5353).with_payload(&payload);
        f.dst_mac = group_mac(u32::from_ne_bytes(mdns_group.octets()));
        f.ttl = 255;
        f.build()
    };
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    let query = mdns(
        [0x00, 0x00],
        b"\x04_ipp\x04_tcp\x05local\x00\x00\x0c\x00\x01",
    );
    let (action, _) = h.run(Role::Downstream, h.vif1.index, &query).unwrap();
    assert_eq!(action, TC_ACT_UNSPEC);
    let answer = mdns(
        [0x84, 0x00],
        b"\x03app\x05local\x00\x00\x01\x80\x01\x00\x00\x00\x78\x00\x04",
    );
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &answer,
        Reason::RelayAnswerBlocked,
    );
    // A query with a record of the VM's address (a probe, a known answer).
    let mut known = b"\x03app\x05local\x00\x00\x01\x80\x01\x00\x00\x00\x78\x00\x04".to_vec();
    known.extend_from_slice(&TARGET.octets());
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &mdns([0x00, 0x00], &known),
        Reason::RelayCarriesAddress,
    );
    let frames = lan.finish();
    let up: Vec<packet::Parsed> = frames
        .iter()
        .filter_map(|f| packet::parse(f))
        .filter(|p| p.dport == 5353 || p.dport == KDE_PORT)
        .collect();
    assert_eq!(up.len(), 1, "only the question went up: {up:?}");
    assert_eq!(up[0].saddr, UPLINK_ADDR);
    assert!(
        !frames
            .iter()
            .any(|f| f.windows(4).any(|w| w == TARGET.octets())),
        "the VM's address left the uplink"
    );
}

/// A broadcast relay toward TARGET with `rate` copies a second both ways.
fn limited_broadcast_relay(rate: u32) -> Relay {
    Relay {
        rate_down: rate,
        ..relay(&[TARGET], None, rate)
    }
    .with_group(BROADCAST, KDE_PORT)
}

trait WithGroup {
    fn with_group(self, group: Ipv4Addr, port: u16) -> Self;
}

impl WithGroup for Relay {
    fn with_group(self, group: Ipv4Addr, port: u16) -> Self {
        Relay {
            group,
            port,
            ..self
        }
    }
}

/// `payload` as the fragments of one datagram of IP id `id`, 1480 bytes of
/// IP payload each.
fn fragmented(frame: &mut Frame, id: u16) -> Vec<Vec<u8>> {
    frame.ip_id = id;
    packet::fragments(&frame.build(), 1480)
}

#[test]
fn every_fragment_pays_a_token_of_the_same_bucket() {
    let h = harness(&[limited_broadcast_relay(5)]);
    let payload: Vec<u8> = (0..20 * 1480u32).map(|i| b'a' + (i % 26) as u8).collect();
    let pieces = fragmented(&mut vm_broadcast(&payload), 0x5151);
    assert_eq!(pieces.len(), 21);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    let out_of_order = h.reason(Reason::FragmentOutOfOrder);
    for piece in &pieces {
        h.run(Role::Downstream, h.vif1.index, piece).unwrap();
    }
    assert_eq!(
        broadcasts(lan, 5).len(),
        5,
        "a burst of 5 copies, whatever the fragments"
    );
    // The sixth finds the bucket empty; the train stops there, so the rest
    // no longer follow it.
    let counters = only_relay_counters(&h);
    assert_eq!((counters.packets_up, counters.rate_limited), (5, 1));
    assert_eq!(h.reason(Reason::FragmentOutOfOrder), out_of_order + 15);

    let pieces = fragmented(
        &mut lan_broadcast(Ipv4Addr::new(192, 168, 1, 255), &payload),
        0x5252,
    );
    let vm1 = Capture::start(&h.ns, "vm1").unwrap();
    for piece in &pieces {
        h.run(Role::Uplink, h.uplink.index, piece).unwrap();
    }
    assert_eq!(broadcasts(vm1, 5).len(), 5, "the same toward the VMs");
    assert_eq!(only_relay_counters(&h).rate_limited_down, 1);
}

#[test]
fn a_train_takes_its_fragments_in_order_only() {
    let h = harness(&[broadcast_relay(&[TARGET])]);
    let payload: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let pieces = fragmented(&mut vm_broadcast(&payload), 0x6161);
    assert_eq!(pieces.len(), 3);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    assert_eq!(
        h.run(Role::Downstream, h.vif1.index, &pieces[0]).unwrap().0,
        TC_ACT_UNSPEC
    );
    // The last before the middle, then the first again: neither follows.
    for out_of_order in [&pieces[2], &pieces[0]] {
        let first = out_of_order == &pieces[0];
        let reason = if first {
            // A first fragment again starts a train again: it is copied.
            None
        } else {
            Some(Reason::FragmentOutOfOrder)
        };
        match reason {
            Some(reason) => {
                h.assert_untouched(Role::Downstream, h.vif1.index, out_of_order, reason)
            }
            None => {
                h.run(Role::Downstream, h.vif1.index, out_of_order).unwrap();
            }
        }
    }
    for piece in &pieces[1..] {
        h.run(Role::Downstream, h.vif1.index, piece).unwrap();
    }
    let copies = broadcasts(lan, 4);
    assert_eq!(copies.len(), 4, "first, first again, middle, last");
    let whole = packet::parse(&packet::reassemble(&copies[1..])).unwrap();
    assert_eq!(whole.payload, payload);
}

#[test]
fn no_other_host_can_end_or_feed_a_fragment_train() {
    let h = harness(&[broadcast_relay(&[TARGET])]);
    let payload: Vec<u8> = (0..2200u32).map(|i| b'a' + (i % 26) as u8).collect();

    // Up: the VM's train, and a LAN host spoofing its last fragment (the
    // VM's source, the same id) on the uplink.
    let up = fragmented(&mut vm_broadcast(&payload), 0x7171);
    let mut spoof = vm_broadcast(&payload);
    spoof.src_mac = LAN_PEER_MAC;
    let spoofed_last = fragmented(&mut spoof, 0x7171).pop().unwrap();
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    h.run(Role::Downstream, h.vif1.index, &up[0]).unwrap();
    let (action, _) = h.run(Role::Uplink, h.uplink.index, &spoofed_last).unwrap();
    assert_eq!(action, TC_ACT_UNSPEC);
    h.run(Role::Downstream, h.vif1.index, &up[1]).unwrap();
    let copies = broadcasts(lan, 2);
    assert_eq!(copies.len(), 2, "the VM's train survived the spoof");
    assert_eq!(
        packet::parse(&packet::reassemble(&copies)).unwrap().payload,
        payload
    );

    // Down: a LAN peer's train, and another VM spoofing the peer's last
    // fragment from vif2.0.
    let down = fragmented(
        &mut lan_broadcast(Ipv4Addr::new(192, 168, 1, 255), &payload),
        0x7272,
    );
    let mut spoof = lan_broadcast(Ipv4Addr::new(192, 168, 1, 255), &payload);
    spoof.src_mac = [0x02, 0, 0, 0, 0, 0x06];
    let spoofed_last = fragmented(&mut spoof, 0x7272).pop().unwrap();
    let vm1 = Capture::start(&h.ns, "vm1").unwrap();
    h.run(Role::Uplink, h.uplink.index, &down[0]).unwrap();
    h.assert_untouched(
        Role::Downstream,
        h.vif2.index,
        &spoofed_last,
        Reason::Fragment,
    );
    h.run(Role::Uplink, h.uplink.index, &down[1]).unwrap();
    let copies = broadcasts(vm1, 2);
    assert_eq!(copies.len(), 2, "the peer's train survived the spoof");
}

/// The forms of an internal address a payload may carry, each embedded in
/// otherwise harmless text.
fn forms_of(addr: Ipv4Addr) -> Vec<(&'static str, Vec<u8>)> {
    let [a, b, c, d] = addr.octets();
    let label = |n: u8| {
        let digits = n.to_string();
        let mut l = vec![digits.len() as u8];
        l.extend_from_slice(digits.as_bytes());
        l
    };
    let mut reverse_labels = [d, c, b, a]
        .into_iter()
        .flat_map(label)
        .collect::<Vec<u8>>();
    reverse_labels.extend_from_slice(b"\x07in-addr\x04arpa\x00");
    vec![
        ("raw", [b"x=".as_slice(), &addr.octets(), b";"].concat()),
        (
            "dotted",
            format!("LOCATION: http://{a}.{b}.{c}.{d}:8080/d.xml\r\n").into_bytes(),
        ),
        (
            "reversed text",
            format!("{d}.{c}.{b}.{a}.in-addr.arpa").into_bytes(),
        ),
        (
            "in-addr.arpa labels",
            [
                b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00".as_slice(),
                &reverse_labels,
                b"\x00\x0c\x00\x01",
            ]
            .concat(),
        ),
        ("dashed", format!("host ip-{a}-{b}-{c}-{d}").into_bytes()),
    ]
}

#[test]
fn no_relay_carries_an_internal_address_in_any_form() {
    let mdns_group = Ipv4Addr::new(224, 0, 0, 251);
    let h = harness(&[
        Relay {
            group: mdns_group,
            port: 5353,
            ..relay(&[TARGET], None, 1_000_000)
        },
        broadcast_relay(&[TARGET]),
    ]);
    let lan = Capture::start(&h.ns, "lan0").unwrap();
    // The VM's own address, another VM's, and the router's own vif
    // address: every one of them internal.
    for internal in [TARGET, OTHER_VM, VIF_ADDR] {
        for (form, payload) in forms_of(internal) {
            let mut mdns = Frame::udp(TARGET, 5353, mdns_group, 5353).with_payload(&payload);
            mdns.dst_mac = group_mac(u32::from_ne_bytes(mdns_group.octets()));
            for frame in [mdns.build(), vm_broadcast(&payload).build()] {
                let before = h.reason(Reason::RelayCarriesAddress);
                let (action, out) = h.run(Role::Downstream, h.vif1.index, &frame).unwrap();
                assert_eq!((action, &out), (TC_ACT_UNSPEC, &frame));
                assert_eq!(
                    h.reason(Reason::RelayCarriesAddress),
                    before + 1,
                    "{internal} as {form} was not refused"
                );
            }
        }
    }
    // Positive control: a LAN address in every form goes up.
    for (form, payload) in forms_of(LAN_PEER) {
        let (action, _) = h
            .run(
                Role::Downstream,
                h.vif1.index,
                &vm_broadcast(&payload).build(),
            )
            .unwrap();
        assert_eq!(action, TC_ACT_UNSPEC, "{form}");
    }
    let copies = broadcasts(lan, 5);
    assert_eq!(copies.len(), 5, "only the LAN address's five forms went up");
}

#[test]
fn an_address_split_across_fragments_is_caught_and_a_long_datagram_is_not_scanned_blind() {
    let h = harness(&[broadcast_relay(&[TARGET])]);
    let text = TARGET.to_string();
    // The address straddles the boundary between the two fragments: the
    // first fragment carries 1472 bytes of UDP payload.
    let split_at = 1472 - text.len() / 2;
    let mut payload = vec![b' '; split_at];
    payload.extend_from_slice(text.as_bytes());
    payload.resize(2000, b' ');
    let pieces = fragmented(&mut vm_broadcast(&payload), 0x8181);
    assert_eq!(pieces.len(), 2);
    h.run(Role::Downstream, h.vif1.index, &pieces[0]).unwrap();
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &pieces[1],
        Reason::RelayCarriesAddress,
    );

    // One 1600-byte datagram, not fragmented: too long to scan, so not
    // copied, whatever it holds.
    let long = vm_broadcast(&vec![b'a'; 1600 - 28]).build();
    h.assert_untouched(
        Role::Downstream,
        h.vif1.index,
        &long,
        Reason::RelayUnscannable,
    );
}
