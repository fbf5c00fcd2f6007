//! The discovery apps' harness proven without the forwarder: real Syncthing,
//! KDE Connect and python-zeroconf peers on one LAN segment (two namespaces
//! on one veth), where their own discovery works, and Syncthing on the
//! Qubes-like topology with plain routing, where it does not until a LAN
//! beacon reaches the app as the datapath's broadcast relay will deliver it
//! (copied here by hand). What the discovery tests assume about the apps is
//! checked here, so a failure there is the datapath's.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Result;
use forwarder_tests::{
    capture::{self, Capture},
    kdeconnect::{self, ConnectBack, Daemon, IdentityListener},
    leak, mdns,
    netns::{Netns, sweep_leftovers},
    packet::{self, Frame},
    syncthing::{self, Syncthing, sync_both_ways},
    topology::*,
    wait::{ms, wait_until},
};

const A: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const B: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);
const SEGMENT_BROADCAST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 255);

/// Two hosts on one /24 behind one veth, each with a default route (as LAN
/// hosts have; an unbound socket cannot send to 255.255.255.255 without a
/// route), IPv4 only: the apps would otherwise meet over IPv6 link-local
/// addresses, which no router in the topology relays.
fn segment() -> Result<(Netns, Netns)> {
    sweep_leftovers();
    let a = Netns::new("seg-a")?;
    let b = Netns::new("seg-b")?;
    for ns in [&a, &b] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
    }
    a.ip(&format!(
        "link add eth0 type veth peer name eth0 netns {}",
        b.name()
    ))?;
    for (ns, addr) in [(&a, A), (&b, B)] {
        ns.ip("link set eth0 up")?;
        ns.ip(&format!("addr add {addr}/24 dev eth0"))?;
        ns.ip("route add default via 192.168.1.1")?;
    }
    Ok((a, b))
}

fn udp_to(frames: &[Vec<u8>], port: u16) -> Vec<packet::Parsed> {
    frames
        .iter()
        .filter_map(|f| packet::parse(f))
        .filter(|p| p.proto == packet::UDP && p.dport == port)
        .collect()
}

#[test]
fn syncthing_peers_on_one_segment_find_each_other_and_sync_both_ways() {
    let (a, b) = segment().unwrap();
    let capture = Capture::start(&b, "eth0").unwrap();
    let mut sa = Syncthing::generate(&a, "st-a").unwrap();
    let mut sb = Syncthing::generate(&b, "st-b").unwrap();
    sa.start(&sb).unwrap();
    let started = Instant::now();
    sb.start(&sa).unwrap();
    let seen_as = sb.wait_connected(&sa, Duration::from_secs(30)).unwrap();
    let connected = started.elapsed();
    assert!(
        seen_as.starts_with(&format!("{A}:")),
        "b sees a at {seen_as}"
    );
    let synced = sync_both_ways(&sa, &sb, (100_000, 80_000), Duration::from_secs(20)).unwrap();
    let beacons: Vec<_> = udp_to(&capture.finish(), syncthing::DISCOVERY_PORT)
        .into_iter()
        .filter(|p| p.saddr == A || p.saddr == B)
        .collect();
    // Both send to the segment's broadcast address, never 255.255.255.255.
    assert!(
        beacons.iter().all(|p| p.daddr == SEGMENT_BROADCAST),
        "beacons to {:?}",
        beacons.iter().map(|p| p.daddr).collect::<Vec<_>>()
    );
    assert!(beacons.iter().any(|p| p.saddr == B), "no beacon from b");
    println!(
        "syncthing on one segment: connected {} after the second started (b sees a at {seen_as}); \
         100 kB a->b in {}, 80 kB b->a in {}; beacons seen: {} ({} bytes of payload, to {SEGMENT_BROADCAST})",
        ms(connected),
        ms(synced.there),
        ms(synced.back),
        beacons.len(),
        beacons[0].payload.len()
    );
    sa.stop().unwrap();
    sb.stop().unwrap();
}

/// A VM's Syncthing (on a /32) never sends an IPv4 beacon out of eth0: its
/// "broadcast address" is its own. A LAN beacon copied into the app as
/// 255.255.255.255 with the LAN peer's source, as the broadcast relay will
/// deliver it, is enough: the app dials the LAN peer through both NATs and
/// sync works both ways on that one connection.
#[test]
fn syncthing_in_the_app_dials_a_lan_peer_whose_beacon_reaches_it() {
    let t = Topology::build(Offload::On).unwrap();
    syncthing::admit(&t).unwrap();
    let uplink = Capture::start(&t.sysnet, SYSNET_UPLINK).unwrap();
    let app_side = Capture::start(&t.sysfw, "vif3.0").unwrap();
    let mut app = Syncthing::generate(&t.app, "app").unwrap();
    let mut lan = Syncthing::generate(&t.lan, "lan").unwrap();
    app.start(&lan).unwrap();
    let started = Instant::now();
    lan.start(&app).unwrap();

    let mut beacon = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            beacon = udp_to(&uplink.snapshot(), syncthing::DISCOVERY_PORT)
                .into_iter()
                .find(|p| p.saddr == LAN_PEER);
            beacon.is_some()
        }),
        "no beacon from the LAN peer reached sys-net"
    );
    let beacon_after = started.elapsed();
    let beacon = beacon.unwrap();
    assert_eq!(beacon.daddr, Ipv4Addr::new(192, 168, 1, 255));
    // Without the relay nothing reaches the app: it cannot connect.
    assert!(
        !wait_until(Duration::from_secs(2), || app
            .connection(&lan)
            .is_ok_and(|c| c.is_some())),
        "connected without a relayed beacon"
    );

    let vif = t.sysfw.link("vif3.0").unwrap();
    let relayed = Frame {
        dst_mac: [0xff; 6],
        src_mac: vif.mac,
        ..Frame::udp(
            beacon.saddr,
            beacon.sport,
            Ipv4Addr::BROADCAST,
            syncthing::DISCOVERY_PORT,
        )
        .with_payload(&beacon.payload)
    };
    let copied = Instant::now();
    capture::inject(&t.sysfw, "vif3.0", &relayed.build()).unwrap();
    let seen_as = lan.wait_connected(&app, Duration::from_secs(20)).unwrap();
    let connected = copied.elapsed();
    assert!(
        seen_as.starts_with(&format!("{SYSNET_LAN}:")),
        "the LAN peer sees the app at {seen_as}, not at sys-net's address"
    );
    let synced = sync_both_ways(&lan, &app, (60_000, 40_000), Duration::from_secs(20)).unwrap();

    let app_beacons = udp_to(&app_side.finish(), syncthing::DISCOVERY_PORT)
        .into_iter()
        .filter(|p| p.saddr == APP)
        .count();
    assert_eq!(app_beacons, 0, "the app sent IPv4 beacons out of eth0");
    let frames = uplink.finish();
    leak::ensure_none(&frames, &[APP, APP2, SYSFW, SYSNET_INTERNAL]).unwrap();
    println!(
        "syncthing app<->LAN over plain routing: the LAN beacon ({} bytes to {}) reached sys-net {} after the LAN peer \
         started; the app connected {} after one copy reached it, the LAN sees it at {seen_as}; 60 kB LAN->app {}, \
         40 kB app->LAN {}; IPv4 beacons out of the app: 0",
        beacon.payload.len(),
        beacon.daddr,
        ms(beacon_after),
        ms(connected),
        ms(synced.there),
        ms(synced.back)
    );
}

#[test]
fn mdns_lookup_resolves_an_advertised_service_and_the_answers_carry_its_address() {
    let (a, b) = segment().unwrap();
    let capture = Capture::start(&a, "eth0").unwrap();
    let _printer = mdns::Advertiser::start(&b, "_ipp._tcp.local.", "Printer B", B, 631).unwrap();
    let started = Instant::now();
    let found = mdns::find(&a, "_ipp._tcp.local.", "Printer B", Duration::from_secs(10))
        .unwrap()
        .expect("the service was not found");
    let took = started.elapsed();
    assert_eq!((found.addresses.as_slice(), found.port), (&[B][..], 631));
    let none = mdns::find(
        &a,
        "_nothing._tcp.local.",
        "Printer B",
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(none, None);
    let frames = capture.finish();
    // The positive control of the discovery tests' leak check: the
    // advertiser's answers carry its address in their records, and the
    // whole-frame search finds it there.
    let answers: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| mdns::is_answer(f) && packet::parse(f).is_some_and(|p| p.saddr == B))
        .collect();
    assert!(!answers.is_empty(), "no mDNS answer from b was captured");
    let in_payload = answers
        .iter()
        .filter(|f| {
            let p = packet::parse(f).unwrap();
            leak::carries(&p.payload, B).is_some()
        })
        .count();
    assert!(
        in_payload > 0,
        "no answer carries b's address in its records"
    );
    let queries = frames.iter().filter(|f| mdns::is_query(f)).count();
    println!(
        "mDNS on one segment: resolved {} at {:?}:{} in {}; {queries} queries, {} answers ({in_payload} with b's address in the records)",
        found.name,
        found.addresses,
        found.port,
        ms(took),
        answers.len()
    );
}

/// The daemon's identity (fragmented), the emulation's identity accepted by
/// a real daemon (it connects back), the emulation's connect-back answered
/// with TLS, and two real daemons linking.
#[test]
fn kdeconnect_daemons_link_on_one_segment_and_the_emulation_speaks_their_protocol() {
    let (a, b) = segment().unwrap();
    let capture = Capture::start(&b, "eth0").unwrap();
    let listener = IdentityListener::start(&b).unwrap();
    let emulated_id = "_forwarder_test_emulated_device_b_";
    let connect_back = ConnectBack::listen(&b, kdeconnect::UDP_PORT).unwrap();

    let started = Instant::now();
    let daemon_a = Daemon::start(&a, "desk-a").unwrap();
    let from = listener
        .wait_for(&daemon_a.id, Duration::from_secs(10))
        .expect("no identity from the daemon");
    let identity_after = started.elapsed();
    assert_eq!(from.ip(), std::net::IpAddr::V4(A));
    assert_eq!(from.port(), kdeconnect::UDP_PORT, "22.12 sends from 1716");

    // Its identity travels as IP fragments: the first carries the UDP header.
    let frames = capture.snapshot();
    let fragments: Vec<(u16, usize)> = frames
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == [8, 0] && f[14 + 12..14 + 16] == A.octets())
        .filter(|f| f[14 + 16..14 + 20] == [255; 4])
        .map(|f| (u16::from_be_bytes([f[20], f[21]]), f.len()))
        .collect();
    assert!(
        fragments.iter().any(|(frag, _)| frag & 0x2000 != 0),
        "the identity was not fragmented: {fragments:?}"
    );

    // The emulation's identity, broadcast from b, makes the daemon connect
    // back to b's port and introduce itself.
    kdeconnect::broadcast(
        &b,
        &kdeconnect::identity_packet(emulated_id, "emulated b", kdeconnect::UDP_PORT),
    )
    .unwrap();
    let back = connect_back
        .wait_for(&daemon_a.id, Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "the daemon did not connect back: {:?}\n{}",
                connect_back.accepted(),
                daemon_a.log()
            )
        });
    assert_eq!(back.ip(), std::net::IpAddr::V4(A));

    // The emulation connecting to the daemon, as a peer that heard it.
    kdeconnect::connect_back(
        &b,
        SocketAddrV4::new(A, kdeconnect::UDP_PORT),
        &kdeconnect::identity_packet(emulated_id, "emulated b", kdeconnect::UDP_PORT),
        Duration::from_secs(5),
    )
    .unwrap();
    drop(connect_back);
    drop(listener);

    // Two real daemons: the later one's identity makes the earlier connect.
    let started = Instant::now();
    let daemon_b = Daemon::start(&b, "desk-b").unwrap();
    let b_sees = daemon_b
        .wait_sees("desk-a", Duration::from_secs(20))
        .unwrap();
    let a_sees = daemon_a
        .wait_sees("desk-b", Duration::from_secs(5))
        .unwrap();
    let linked = started.elapsed();
    let sizes: Vec<usize> = fragments.iter().map(|(_, len)| *len).collect();
    println!(
        "kdeconnect on one segment: the daemon's identity arrived {} after its start as fragments of {sizes:?} bytes; \
         it accepted the emulated identity and connected back; two daemons linked {} after the second started \
         (b saw a after {}, a saw b {} later)",
        ms(identity_after),
        ms(linked),
        ms(b_sees),
        ms(a_sees)
    );
}

/// A VM's mDNS on its /32 link, over plain routing: the app's responder
/// answers (its address in the records) and its browser queries; none of
/// it is routed to the LAN. This is what the discovery test's leak check
/// must keep inside once the relay runs: its positive control.
#[test]
fn mdns_in_the_app_answers_and_queries_on_its_own_link_only() {
    let t = Topology::build(Offload::On).unwrap();
    mdns::admit(&t).unwrap();
    let lan = Capture::start(&t.lan, "eth0").unwrap();
    let app_side = Capture::start(&t.sysfw, "vif3.0").unwrap();
    let _printer =
        mdns::Advertiser::start(&t.app, "_ipp._tcp.local.", "App printer", APP, 631).unwrap();
    let started = Instant::now();
    let found = mdns::find(
        &t.app,
        "_ipp._tcp.local.",
        "App printer",
        Duration::from_secs(10),
    )
    .unwrap()
    .expect("the app did not find its own printer");
    let took = started.elapsed();
    assert_eq!(found.addresses, vec![APP]);
    let inside = app_side.finish();
    let from_app = |f: &&Vec<u8>| {
        packet::parse(f).is_some_and(|p| p.saddr == APP && leak::carries(&p.payload, APP).is_some())
    };
    let answers = inside
        .iter()
        .filter(|f| mdns::is_answer(f))
        .filter(from_app)
        .count();
    let queries = inside.iter().filter(|f| mdns::is_query(f)).count();
    let queries_with_address = inside
        .iter()
        .filter(|f| mdns::is_query(f))
        .filter(from_app)
        .count();
    assert!(answers > 0, "no answer with the app's address on its link");
    let frames = lan.finish();
    leak::ensure_none(&frames, &[APP, APP2, SYSFW, SYSNET_INTERNAL]).unwrap();
    println!(
        "mDNS in the app: found its own printer in {}; on its link {answers} answers carrying {APP}, {queries} queries \
         ({queries_with_address} carrying {APP}); {} frames on the LAN, none with an internal address",
        ms(took),
        frames.len()
    );
}

/// The real daemon in the app VM, over plain routing: a LAN identity
/// (fragmented, from an off-subnet source) copied into the app as the relay
/// will copy it makes it dial the LAN peer through qvm-firewall and both
/// NATs; and a LAN peer that heard the app (here: told its address) reaches
/// it through the seed's DNAT of 1716 and gets TLS back.
#[test]
fn kdeconnect_in_the_app_dials_out_and_is_reached_through_the_routers() {
    let t = Topology::build(Offload::On).unwrap();
    kdeconnect::admit(&t).unwrap();
    t.install_seed_forwarding(kdeconnect::UDP_PORT).unwrap();
    let lan_id = "_forwarder_test_lan_emulated_peer_";
    let connect_back = ConnectBack::listen(&t.lan, kdeconnect::UDP_PORT).unwrap();
    let app = Daemon::start(&t.app, "qubes-app").unwrap();

    let vif = t.sysfw.link("vif3.0").unwrap();
    let identity = kdeconnect::identity_packet(lan_id, "lan emulated", kdeconnect::UDP_PORT);
    let datagram = Frame {
        dst_mac: [0xff; 6],
        src_mac: vif.mac,
        frag: 0,
        ..Frame::udp(
            LAN_PEER,
            kdeconnect::UDP_PORT,
            Ipv4Addr::BROADCAST,
            kdeconnect::UDP_PORT,
        )
        .with_payload(&identity)
    }
    .build();
    // What a 1500-byte MTU leaves for IP payload, in eighths.
    let pieces = packet::fragments(&datagram, 1480);
    assert_eq!(pieces.len(), 2);
    let copied = Instant::now();
    capture::inject_all(&t.sysfw, "vif3.0", pieces.into_iter()).unwrap();
    let from = connect_back
        .wait_for(&app.id, Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "the app's daemon did not dial the LAN peer: {:?}\n{}",
                connect_back.accepted(),
                app.log()
            )
        });
    let dialled = copied.elapsed();
    assert_eq!(from.ip(), std::net::IpAddr::V4(SYSNET_LAN));

    let reached = Instant::now();
    kdeconnect::connect_back(
        &t.lan,
        SocketAddrV4::new(SYSNET_LAN, kdeconnect::UDP_PORT),
        &identity,
        Duration::from_secs(5),
    )
    .unwrap();
    println!(
        "kdeconnect in the app: dialled the LAN peer {} after its fragmented identity was copied in (seen from {from}); \
         reached through the DNAT of 1716 with TLS back in {}",
        ms(dialled),
        ms(reached.elapsed())
    );
}
