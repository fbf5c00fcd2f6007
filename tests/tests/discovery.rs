//! Syncthing, mDNS and KDE Connect end to end on the Qubes-like topology:
//! real apps in the app VM and on the LAN, both routers running the
//! forwarder with the app's preset (`--syncthing`, `--mdns`, `--kdeconnect`,
//! each pointing at the next hop), checksum offload on and off, and a
//! capture on the LAN that fails the test if any frame carries an internal
//! address anywhere in its bytes. The seed's nftables recipe (extended by
//! DNAT of the apps' ports, as its user would) is the baseline: it relays
//! no broadcast, so none of the apps finds its peer through it.
//!
//! What the apps do is proven without the forwarder in tests/apps.rs.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use forwarder_tests::{
    capture::Capture,
    daemon::Forwarder,
    kdeconnect::{self, Daemon, IdentityListener},
    leak, mdns,
    packet::{self, Parsed},
    sockets::{EchoServer, tcp_echo},
    syncthing::{self, Syncthing, sync_both_ways},
    topology::*,
    wait::{ms, wait_until},
};

/// Every internal address of the topology: none may reach the LAN.
const INTERNAL: [Ipv4Addr; 4] = [APP, APP2, SYSFW, SYSNET_INTERNAL];
/// How long the baseline is given to find each app's peer.
const BASELINE_WINDOW: Duration = Duration::from_secs(12);
const PRINTER_TYPE: &str = "_ipp._tcp.local.";
const LAN_PRINTER: &str = "LAN printer";
const APP_PRINTER: &str = "App printer";

/// The forwarder in both routers with one app preset, each pointing at the
/// next hop: sys-net at sys-firewall, sys-firewall at the app.
fn start_routers(t: &Topology, preset: &str) -> Result<(Forwarder, Forwarder)> {
    let (sysfw, app) = (SYSFW.to_string(), APP.to_string());
    Forwarder::start_routers(t, &[preset, &sysfw], &[preset, &app])
}

/// What every forwarder run must end with: no internal address in any
/// frame the LAN saw, no rewrite or clone the kernel refused, no checksum
/// error at any receiver. Returns the LAN's frames.
fn finish(t: &Topology, routers: &[&Forwarder], lan: Capture) -> Result<Vec<Vec<u8>>> {
    let frames = lan.finish();
    leak::ensure_none(&frames, &INTERNAL)?;
    for router in routers {
        ensure!(router.failures()? == 0, "refused rewrites or clones");
    }
    t.ensure_no_checksum_errors()?;
    Ok(frames)
}

fn parsed(frames: &[Vec<u8>]) -> Vec<Parsed> {
    frames.iter().filter_map(|f| packet::parse(f)).collect()
}

/// The app's Syncthing never beacons out of its /32 eth0; the LAN peer's
/// beacon (to 192.168.1.255) copied down as 255.255.255.255 with the peer's
/// source lets it dial the peer, and sync goes both ways on that connection.
fn syncthing(offload: Offload) {
    let t = Topology::build(offload).expect("topology");
    syncthing::admit(&t).unwrap();
    let (sysnet, sysfw) = start_routers(&t, "--syncthing").unwrap();
    let lan_capture = Capture::start(&t.lan, "eth0").unwrap();

    let mut app = Syncthing::generate(&t.app, "app").unwrap();
    let mut lan = Syncthing::generate(&t.lan, "lan").unwrap();
    app.start(&lan).unwrap();
    // The LAN peer starts last, as a laptop joining: its start-up beacon is
    // the one the app must hear (the next comes 30 s later).
    let started = Instant::now();
    lan.start(&app).unwrap();
    let seen_as = lan
        .wait_connected(&app, Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("{e:#}\napp log:\n{}", app.log()));
    let discovered = started.elapsed();
    assert!(
        seen_as.starts_with(&format!("{SYSNET_LAN}:")),
        "the LAN peer sees the app at {seen_as}, not at sys-net's address"
    );
    let synced = sync_both_ways(&lan, &app, (200_000, 150_000), Duration::from_secs(20)).unwrap();
    app.stop().unwrap();
    lan.stop().unwrap();

    let frames = finish(&t, &[&sysnet, &sysfw], lan_capture).unwrap();
    let beacons = parsed(&frames)
        .into_iter()
        .filter(|p| p.proto == packet::UDP && p.dport == syncthing::DISCOVERY_PORT)
        .count();
    println!(
        "forwarder, offload {offload:?}: Syncthing connected {} after the LAN peer started (seen at {seen_as}); \
         200 kB LAN->app in {}, 150 kB app->LAN in {}; {beacons} beacons on the LAN, {} frames, no internal address",
        ms(discovered),
        ms(synced.there),
        ms(synced.back),
        frames.len()
    );
}

#[test]
fn syncthing_discovers_and_syncs_both_ways_through_the_forwarder_offload_on() {
    syncthing(Offload::On);
}

#[test]
fn syncthing_discovers_and_syncs_both_ways_through_the_forwarder_offload_off() {
    syncthing(Offload::Off);
}

/// A lookup in the app finds the LAN's printer at its LAN address; the app
/// answers mDNS too (its own printer, and its own queries), and none of
/// those answers, nor any frame with its address, reaches the LAN.
fn mdns(offload: Offload) {
    let t = Topology::build(offload).expect("topology");
    mdns::admit(&t).unwrap();
    let (sysnet, sysfw) = start_routers(&t, "--mdns").unwrap();
    let lan_capture = Capture::start(&t.lan, "eth0").unwrap();
    let app_side = Capture::start(&t.sysfw, "vif3.0").unwrap();

    let _lan_printer =
        mdns::Advertiser::start(&t.lan, PRINTER_TYPE, LAN_PRINTER, LAN_PEER, 631).unwrap();
    let _app_printer =
        mdns::Advertiser::start(&t.app, PRINTER_TYPE, APP_PRINTER, APP, 631).unwrap();
    let started = Instant::now();
    let found = mdns::find(&t.app, PRINTER_TYPE, LAN_PRINTER, Duration::from_secs(15))
        .unwrap()
        .expect("the app did not find the LAN printer");
    let took = started.elapsed();
    assert_eq!(
        (found.addresses.as_slice(), found.port),
        (&[LAN_PEER][..], 631),
        "resolved {found:?}"
    );
    // The LAN browses the same type: it finds its own printer (the lookup
    // works) and never the app's.
    let lan_sees = mdns::lookup(&t.lan, PRINTER_TYPE, Duration::from_secs(3)).unwrap();
    let names: Vec<&str> = lan_sees.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&mdns::instance_name(LAN_PRINTER, PRINTER_TYPE).as_str()),
        "the LAN's own lookup found {names:?}"
    );
    assert!(
        !names.contains(&mdns::instance_name(APP_PRINTER, PRINTER_TYPE).as_str()),
        "the app's printer was found from the LAN: {lan_sees:?}"
    );

    // The positive control of the leak check: the app did answer, with its
    // address in the records, on its own link.
    let inside = app_side.finish();
    let carrying_app = |f: &&Vec<u8>| {
        packet::parse(f).is_some_and(|p| p.saddr == APP && leak::carries(&p.payload, APP).is_some())
    };
    let app_answers = inside
        .iter()
        .filter(|f| mdns::is_answer(f))
        .filter(carrying_app)
        .count();
    assert!(app_answers > 0, "the app sent no answer to keep inside");
    let app_queries_with_address = inside
        .iter()
        .filter(|f| mdns::is_query(f))
        .filter(carrying_app)
        .count();
    let frames = finish(&t, &[&sysnet, &sysfw], lan_capture).unwrap();
    let from_uplink: Vec<Parsed> = parsed(&frames)
        .into_iter()
        .filter(|p| p.saddr == SYSNET_LAN)
        .collect();
    let answers_up = frames
        .iter()
        .filter(|f| mdns::is_answer(f) && packet::parse(f).is_some_and(|p| p.saddr == SYSNET_LAN))
        .count();
    let queries_up = from_uplink
        .iter()
        .filter(|p| p.daddr == mdns::MDNS_GROUP && p.dport == mdns::MDNS_PORT)
        .count();
    assert_eq!(answers_up, 0, "mDNS answers left sys-net's uplink");
    assert!(queries_up > 0, "none of the app's queries reached the LAN");
    println!(
        "forwarder, offload {offload:?}: mDNS lookup from the app resolved {} at {:?}:{} in {}; \
         {queries_up} queries relayed up, 0 answers up (the app sent {app_answers} answers with its address on its link, \
         and {app_queries_with_address} queries carrying it as a known answer); no internal address in {} LAN frames",
        found.name,
        found.addresses,
        found.port,
        ms(took),
        frames.len()
    );
}

#[test]
fn mdns_lookup_from_the_app_finds_a_lan_service_and_no_app_answer_leaks_offload_on() {
    mdns(Offload::On);
}

#[test]
fn mdns_lookup_from_the_app_finds_a_lan_service_and_no_app_answer_leaks_offload_off() {
    mdns(Offload::Off);
}

/// Identities each way (the emulation, so each direction is checked alone),
/// a connection into the forwarded range, then the real daemons: the app's
/// identity going up makes a LAN daemon connect back through the range, and
/// a LAN daemon's identity coming down makes the app's daemon dial out.
fn kdeconnect(offload: Offload) {
    let t = Topology::build(offload).expect("topology");
    kdeconnect::admit(&t).unwrap();
    let (sysnet, sysfw) = start_routers(&t, "--kdeconnect").unwrap();
    let lan_capture = Capture::start(&t.lan, "eth0").unwrap();

    let lan_emulated = "_forwarder_test_lan_emulated_peer_";
    let app_emulated = "_forwarder_test_app_emulated_peer_";
    let (down, up) = {
        let app_listener = IdentityListener::start(&t.app).unwrap();
        let lan_listener = IdentityListener::start(&t.lan).unwrap();
        let sent = Instant::now();
        kdeconnect::broadcast(
            &t.lan,
            &kdeconnect::identity_packet(lan_emulated, "lan emulated", kdeconnect::UDP_PORT),
        )
        .unwrap();
        let from = app_listener
            .wait_for(lan_emulated, Duration::from_secs(5))
            .expect("the LAN's identity did not reach the app");
        let down = sent.elapsed();
        assert_eq!(from.ip(), IpAddr::V4(LAN_PEER), "source not kept");
        let sent = Instant::now();
        kdeconnect::broadcast(
            &t.app,
            &kdeconnect::identity_packet(app_emulated, "app emulated", kdeconnect::UDP_PORT),
        )
        .unwrap();
        let from = lan_listener
            .wait_for(app_emulated, Duration::from_secs(5))
            .expect("the app's identity did not reach the LAN");
        let up = sent.elapsed();
        assert_eq!(from.ip(), IpAddr::V4(SYSNET_LAN), "not from sys-net");
        (down, up)
    };
    // A file-transfer port, in the middle of the forwarded range.
    let payload_port = 1739;
    let echo = {
        let _server = EchoServer::start(&t.app, payload_port).unwrap();
        tcp_echo(
            &t.lan,
            SocketAddrV4::new(SYSNET_LAN, payload_port),
            None,
            Duration::from_secs(3),
        )
        .expect("no connection into the forwarded range")
    };
    assert_eq!(echo.seen_as.ip(), IpAddr::V4(LAN_PEER));

    // The app's daemon starts after the LAN's: its identity goes up.
    let lan_desktop = Daemon::start(&t.lan, "lan-desktop").unwrap();
    let started = Instant::now();
    let app = Daemon::start(&t.app, "qubes-app").unwrap();
    let up_linked = lan_desktop
        .wait_sees("qubes-app", Duration::from_secs(15))
        .unwrap();
    app.wait_sees("lan-desktop", Duration::from_secs(5))
        .unwrap();
    let up_total = started.elapsed();
    drop(lan_desktop);
    // A LAN daemon started after the app's: its identity comes down.
    let started = Instant::now();
    let lan_phone = Daemon::start(&t.lan, "lan-phone").unwrap();
    let down_linked = app.wait_sees("lan-phone", Duration::from_secs(15)).unwrap();
    lan_phone
        .wait_sees("qubes-app", Duration::from_secs(5))
        .unwrap();
    let down_total = started.elapsed();
    drop(lan_phone);
    drop(app);

    let frames = finish(&t, &[&sysnet, &sysfw], lan_capture).unwrap();
    let seen = parsed(&frames);
    // Which way each link went, from the LAN's side: the forwarded range
    // answered a LAN daemon's SYN (the app's identity came up), and the app
    // dialled the LAN daemon's 1716 through the NAT (the LAN's came down).
    let syn_ack = |p: &&Parsed| p.proto == packet::TCP && p.tcp_flags & 0x12 == 0x12;
    let connected_back = seen
        .iter()
        .filter(syn_ack)
        .filter(|p| p.saddr == SYSNET_LAN && kdeconnect::PORTS.contains(&p.sport))
        .filter(|p| p.sport != payload_port)
        .count();
    let dialled_out = seen
        .iter()
        .filter(syn_ack)
        .filter(|p| p.saddr == LAN_PEER && p.sport == kdeconnect::UDP_PORT && p.daddr == SYSNET_LAN)
        .count();
    assert!(
        connected_back > 0,
        "no LAN daemon connected back into the range"
    );
    assert!(
        dialled_out > 0,
        "the app's daemon never dialled the LAN daemon"
    );
    // The real identity is over 1472 bytes: it came up as fragments.
    let fragments = frames
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == [8, 0] && f[26..30] == SYSNET_LAN.octets())
        .filter(|f| f[30..34] == [255; 4] && u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0)
        .count();
    println!(
        "forwarder, offload {offload:?}: KDE Connect emulated identity LAN->app in {}, app->LAN in {}; \
         TCP into the range (port {payload_port}) ok; real daemons: the app's identity up, the LAN daemon \
         linked {} after the app's daemon answered ({} for both sides); a LAN daemon's identity down, the app \
         linked {} after it answered ({} for both); {fragments} identity fragments from sys-net on the LAN; \
         no internal address in {} frames",
        ms(down),
        ms(up),
        ms(up_linked),
        ms(up_total),
        ms(down_linked),
        ms(down_total),
        frames.len()
    );
}

#[test]
fn kdeconnect_identities_go_both_ways_and_peers_connect_back_through_the_range_offload_on() {
    kdeconnect(Offload::On);
}

#[test]
fn kdeconnect_identities_go_both_ways_and_peers_connect_back_through_the_range_offload_off() {
    kdeconnect(Offload::Off);
}

/// The seed's recipe, with DNAT of each app's main port added hop by hop as
/// its user would: the apps' discovery is broadcast (and mDNS answers come
/// to a group it does not relay down), so none of them finds its peer. Each
/// negative has its positive control in the same run: what the app sent
/// was seen where the recipe should have picked it up.
#[test]
fn with_the_seed_recipe_none_of_the_apps_discovers_its_peer() {
    let t = Topology::build(Offload::On).expect("topology");
    let _recipe = t.install_seed_recipe().unwrap();
    t.install_seed_forwarding(syncthing::SYNC_PORT).unwrap();
    t.install_seed_forwarding(kdeconnect::UDP_PORT).unwrap();
    syncthing::admit(&t).unwrap();
    kdeconnect::admit(&t).unwrap();
    mdns::admit(&t).unwrap();
    let uplink = Capture::start(&t.sysnet, SYSNET_UPLINK).unwrap();
    let app_side = Capture::start(&t.sysfw, "vif3.0").unwrap();

    let mut st_app = Syncthing::generate(&t.app, "app").unwrap();
    let mut st_lan = Syncthing::generate(&t.lan, "lan").unwrap();
    st_app.start(&st_lan).unwrap();
    let kde_lan = Daemon::start(&t.lan, "lan-desktop").unwrap();
    let kde_app = Daemon::start(&t.app, "qubes-app").unwrap();
    let _printer =
        mdns::Advertiser::start(&t.lan, PRINTER_TYPE, LAN_PRINTER, LAN_PEER, 631).unwrap();
    st_lan.start(&st_app).unwrap();

    // The lookup gives up after the window; then the others get what is
    // left of it, ending early should they link after all.
    let started = Instant::now();
    let printer = mdns::find(&t.app, PRINTER_TYPE, LAN_PRINTER, BASELINE_WINDOW).unwrap();
    let linked = || {
        st_lan.connection(&st_app).is_ok_and(|c| c.is_some())
            || kde_app.reachable().is_ok_and(|d| !d.is_empty())
            || kde_lan.reachable().is_ok_and(|d| !d.is_empty())
    };
    wait_until(BASELINE_WINDOW.saturating_sub(started.elapsed()), linked);
    let syncthing_connected = st_lan.connection(&st_app).unwrap();
    let kde_seen = (kde_app.reachable().unwrap(), kde_lan.reachable().unwrap());
    let window = started.elapsed();

    let up = parsed(&uplink.finish());
    let inside = parsed(&app_side.finish());
    // Positive controls: the LAN's beacon, identity and answers reached
    // sys-net; the app's identity and queries reached sys-firewall.
    assert!(
        up.iter()
            .any(|p| p.saddr == LAN_PEER && p.dport == syncthing::DISCOVERY_PORT),
        "no Syncthing beacon from the LAN reached sys-net"
    );
    assert!(
        up.iter()
            .any(|p| p.saddr == LAN_PEER && p.dport == kdeconnect::UDP_PORT),
        "no identity from the LAN reached sys-net"
    );
    assert!(
        inside
            .iter()
            .any(|p| p.saddr == APP && p.dport == kdeconnect::UDP_PORT),
        "no identity from the app reached sys-firewall"
    );
    assert!(
        inside
            .iter()
            .any(|p| p.saddr == APP && p.daddr == mdns::MDNS_GROUP),
        "no mDNS query from the app reached sys-firewall"
    );
    let secs = window.as_secs();
    println!(
        "seed recipe: Syncthing {}; mDNS lookup from the app {}; KDE Connect {}",
        match &syncthing_connected {
            Some(at) => format!("connected (at {at})"),
            None => format!("not connected within {secs} s"),
        },
        match &printer {
            Some(found) => format!("found {found:?}"),
            None => format!("found nothing within {} s", BASELINE_WINDOW.as_secs()),
        },
        if kde_seen.0.is_empty() && kde_seen.1.is_empty() {
            format!("daemons not linked within {secs} s")
        } else {
            format!("linked: {kde_seen:?}")
        },
    );
    assert_eq!(
        syncthing_connected, None,
        "Syncthing connected through the recipe"
    );
    assert_eq!(
        printer, None,
        "the app found the LAN printer through the recipe"
    );
    assert!(
        kde_seen.0.is_empty() && kde_seen.1.is_empty(),
        "KDE Connect linked through the recipe: {kde_seen:?}"
    );
}
