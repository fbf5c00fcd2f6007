//! Firewall parity: nothing gets past a VM's qvm-firewall through a
//! forwarded port. sys-firewall carries real qvm-firewall chains: the app
//! may reach one LAN host on a few ports, app2 nothing. Both VMs are
//! forward targets. Flows the LAN starts must work both ways for both; the
//! VMs' own packets from their target ports must meet their firewall. The
//! seed's nftables recipe runs the same assertions as the baseline, and a
//! capture on the LAN runs throughout.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use forwarder_common::reason::Reason;
use forwarder_tests::{
    capture::{self, Capture},
    checks::Checks,
    daemon::{Forwarder, Router, cli},
    netns::Netns,
    packet::{self, Frame, TCP, UDP},
    sockets::{EchoServer, TcpTicker, UdpRecorder, tcp_echo, udp_echo},
    topology::*,
    wait::wait_until,
};

const WAIT: Duration = Duration::from_secs(5);
/// How long a packet that is not coming is given to arrive anyway.
const QUIET: Duration = Duration::from_millis(800);
const DENIED_PORT: u16 = 9999;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Forwarder,
    SeedRecipe,
}

/// LocalSend to the app and APP2_PORT to app2 through both routers.
fn start_forwarders(t: &Topology) -> Result<(Forwarder, Forwarder)> {
    let app2_port = |to: Ipv4Addr| {
        [
            format!("tcp:{APP2_PORT}={to}"),
            format!("udp:{APP2_PORT}={to}"),
        ]
    };
    let [tcp_sysnet, udp_sysnet] = app2_port(SYSFW);
    let [tcp_sysfw, udp_sysfw] = app2_port(APP2);
    Ok((
        Forwarder::start_localsend(
            t,
            Router::SysNet,
            &["--forward", &tcp_sysnet, "--forward", &udp_sysnet],
        )?,
        Forwarder::start_localsend(
            t,
            Router::SysFirewall,
            &["--forward", &tcp_sysfw, "--forward", &udp_sysfw],
        )?,
    ))
}

/// A VM's own packet, as the VM's raw socket would put it on its eth0:
/// from its target port, to a destination of its choice.
struct VmSender<'a> {
    ns: &'a Netns,
    addr: Ipv4Addr,
    next_hop: [u8; 6],
}

impl<'a> VmSender<'a> {
    fn new(t: &'a Topology, ns: &'a Netns, addr: Ipv4Addr, vif: &str) -> Result<Self> {
        Ok(VmSender {
            ns,
            addr,
            next_hop: t.sysfw.link(vif)?.mac,
        })
    }

    fn send(&self, proto: u8, sport: u16, to: SocketAddrV4, marker: &str) -> Result<()> {
        let mut frame = if proto == TCP {
            Frame::tcp(self.addr, sport, *to.ip(), to.port())
        } else {
            Frame::udp(self.addr, sport, *to.ip(), to.port()).with_payload(marker.as_bytes())
        };
        frame.src_mac = self.ns.link("eth0")?.mac;
        frame.dst_mac = self.next_hop;
        capture::inject(self.ns, "eth0", &frame.build())
    }
}

/// TCP SYNs (without ACK) to `to` among captured frames.
fn syns_to(frames: &[Vec<u8>], to: SocketAddrV4) -> usize {
    frames
        .iter()
        .filter_map(|f| packet::parse(f))
        .filter(|p| {
            p.proto == TCP
                && p.daddr == *to.ip()
                && p.dport == to.port()
                && p.tcp_flags & 0x12 == 0x02
        })
        .count()
}

/// Frames whose UDP payload starts with `marker`.
fn carrying(frames: &[Vec<u8>], marker: &str) -> usize {
    frames
        .iter()
        .filter_map(|f| packet::parse(f))
        .filter(|p| p.proto == UDP && p.payload.starts_with(marker.as_bytes()))
        .count()
}

/// Waits for at least one more SYN to `to` in the capture than `before`.
fn syn_arrives(capture: &Capture, to: SocketAddrV4, before: usize) -> bool {
    wait_until(WAIT, || syns_to(&capture.snapshot(), to) > before)
}

/// Neither a SYN to `to` nor a datagram marked `marker` shows up.
fn nothing_arrives(
    capture: &Capture,
    recorder: &UdpRecorder,
    to: SocketAddrV4,
    before: usize,
    marker: &str,
) -> Result<()> {
    ensure!(
        recorder.wait_for(marker, QUIET).is_none(),
        "the datagram {marker:?} reached {to}"
    );
    let frames = capture.snapshot();
    ensure!(
        syns_to(&frames, to) == before,
        "{} SYNs to {to} left the uplink",
        syns_to(&frames, to) - before
    );
    ensure!(carrying(&frames, marker) == 0, "{marker:?} left the uplink");
    Ok(())
}

fn lan_flows_work(t: &Topology, port: u16) -> Result<()> {
    let to = SocketAddrV4::new(SYSNET_LAN, port);
    let echo = tcp_echo(&t.lan, to, None, WAIT)?;
    ensure!(
        echo.seen_as.ip() == LAN_PEER,
        "the VM saw TCP from {}",
        echo.seen_as
    );
    let echo = udp_echo(&t.lan, to, WAIT)?;
    ensure!(
        echo.seen_as.ip() == LAN_PEER,
        "the VM saw UDP from {}",
        echo.seen_as
    );
    ensure!(
        echo.reply_from == Some(SocketAddr::V4(to)),
        "the UDP answer came from {:?}, not the uplink's {to}",
        echo.reply_from
    );
    Ok(())
}

fn scenario(contender: Contender, offload: Offload) -> Checks {
    let t = Topology::build(offload).expect("topology");
    t.lan
        .ip(&format!("addr add {OTHER_LAN_HOST}/24 dev eth0"))
        .unwrap();
    let mut forwarders = None;
    let mut _recipe = None;
    match contender {
        Contender::Forwarder => forwarders = Some(start_forwarders(&t).expect("forwarders")),
        Contender::SeedRecipe => {
            _recipe = Some(t.install_seed_recipe().expect("seed recipe"));
            t.install_seed_forwarding_to(APP2_PORT, APP2)
                .expect("seed forwarding to app2");
        }
    }
    let lan_capture = Capture::start(&t.lan, "eth0").unwrap();
    let _app_server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let _app2_server = EchoServer::start(&t.app2, APP2_PORT).unwrap();
    let service = UdpRecorder::start(&t.lan, LAN_SERVICE_PORT).unwrap();
    let denied = UdpRecorder::start(&t.lan, DENIED_PORT).unwrap();
    let app = VmSender::new(&t, &t.app, APP, "vif3.0").unwrap();
    let app2 = VmSender::new(&t, &t.app2, APP2, "vif4.0").unwrap();
    let service_at = SocketAddrV4::new(LAN_PEER, LAN_SERVICE_PORT);
    let mut checks = Checks::default();

    checks.add_ok(
        "LAN flows to the allow-list VM work both ways; UDP is answered from the uplink's address and listen port",
        lan_flows_work(&t, LOCALSEND_PORT),
    );
    checks.add_ok(
        "LAN flows to the deny-all VM work both ways; UDP is answered from the uplink's address and listen port",
        lan_flows_work(&t, APP2_PORT),
    );
    checks.add_ok(
        "the allow-list VM's own packets from its target port reach what its firewall allows",
        (|| {
            let before = syns_to(&lan_capture.snapshot(), service_at);
            app.send(TCP, LOCALSEND_PORT, service_at, "")?;
            ensure!(
                syn_arrives(&lan_capture, service_at, before),
                "no SYN reached {service_at}"
            );
            app.send(UDP, LOCALSEND_PORT, service_at, "allowed-app")?;
            let from = service
                .wait_for("allowed-app", WAIT)
                .context("the allowed datagram never arrived")?;
            ensure!(from.ip() == SYSNET_LAN, "it arrived from {from}");
            Ok(())
        })(),
    );
    checks.add_ok(
        "the allow-list VM's own packets from its target port to a destination its firewall denies never leave",
        (|| {
            // The control: the receiver gets what is allowed to reach it.
            let other = SocketAddrV4::new(OTHER_LAN_HOST, DENIED_PORT);
            t.sysnet.run(|| -> Result<()> {
                std::net::UdpSocket::bind("0.0.0.0:0")?.send_to(b"control", other)?;
                Ok(())
            })?;
            denied
                .wait_for("control", WAIT)
                .context("the control datagram never arrived")?;
            for to in [other, SocketAddrV4::new(LAN_PEER, DENIED_PORT)] {
                let before = syns_to(&lan_capture.snapshot(), to);
                app.send(TCP, LOCALSEND_PORT, to, "")?;
                app.send(UDP, LOCALSEND_PORT, to, "denied-app")?;
                nothing_arrives(&lan_capture, &denied, to, before, "denied-app")?;
            }
            Ok(())
        })(),
    );
    checks.add_ok(
        "the deny-all VM's own packets from its target port never leave, to the LAN or another VM",
        (|| {
            let before = syns_to(&lan_capture.snapshot(), service_at);
            app2.send(TCP, APP2_PORT, service_at, "")?;
            app2.send(UDP, APP2_PORT, service_at, "denied-app2")?;
            // The same receiver saw the allow-list VM's datagram above.
            nothing_arrives(&lan_capture, &service, service_at, before, "denied-app2")?;
            let app_capture = Capture::start(&t.app, "eth0")?;
            app2.send(TCP, APP2_PORT, SocketAddrV4::new(APP, LOCALSEND_PORT), "")?;
            app2.send(
                UDP,
                APP2_PORT,
                SocketAddrV4::new(APP, LOCALSEND_PORT),
                "denied-vm",
            )?;
            // The control: a LAN flow reaches the app while the capture runs.
            tcp_echo(
                &t.lan,
                SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT),
                None,
                WAIT,
            )?;
            std::thread::sleep(QUIET);
            let frames = app_capture.finish();
            ensure!(
                frames
                    .iter()
                    .filter_map(|f| packet::parse(f))
                    .any(|p| p.saddr == LAN_PEER),
                "the control flow never reached the app"
            );
            let from_app2 = frames
                .iter()
                .filter_map(|f| packet::parse(f))
                .filter(|p| p.saddr == APP2)
                .count();
            ensure!(
                from_app2 == 0,
                "{from_app2} of app2's packets reached the app"
            );
            Ok(())
        })(),
    );
    if let Some((sysnet, sysfw)) = &forwarders {
        checks.add_ok(
            "the VMs' own packets were counted as belonging to no flow",
            (|| {
                ensure!(
                    sysfw.reason(Reason::NoFlow)? >= 4,
                    "sys-firewall: {}",
                    sysfw.reason(Reason::NoFlow)?
                );
                ensure!(
                    sysnet.failures()? == 0 && sysfw.failures()? == 0,
                    "rewrite or clone failures"
                );
                Ok(())
            })(),
        );
    }
    let frames = lan_capture.finish();
    checks.add_ok(
        "no internal address left the uplink",
        capture::ensure_no_internal(&frames, |a| a.octets()[0] == 10),
    );
    checks.add_ok(
        "receivers counted no checksum errors",
        t.ensure_no_checksum_errors(),
    );
    if let Some((mut sysnet, mut sysfw)) = forwarders {
        checks.add_ok(
            "a clean stop removes everything",
            sysfw.stop().and(sysnet.stop()).map(drop),
        );
    }
    checks
}

#[test]
fn forwarder_keeps_qvm_firewall_with_checksum_offload() {
    scenario(Contender::Forwarder, Offload::On).assert_all_pass("forwarder, offload on");
}

#[test]
fn forwarder_keeps_qvm_firewall_without_checksum_offload() {
    scenario(Contender::Forwarder, Offload::Off).assert_all_pass("forwarder, offload off");
}

#[test]
fn seed_recipe_keeps_qvm_firewall_as_the_baseline() {
    scenario(Contender::SeedRecipe, Offload::On).assert_all_pass("seed recipe, offload on");
}

/// The flows `forwarder flows --json` lists in `fwd`'s namespace.
fn listed_flows(ns: &Netns, fwd: &Forwarder) -> Result<Vec<serde_json::Value>> {
    let pin_dir = fwd.pins.path().to_str().context("pin dir")?.to_string();
    let out = cli(ns, &["flows", "--json", "--pin-dir", &pin_dir])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Entries and capacity of `fwd`'s flow table, from `inspect --json`.
fn table_fill(ns: &Netns, fwd: &Forwarder) -> Result<(u64, u64)> {
    let pin_dir = fwd.pins.path().to_str().context("pin dir")?.to_string();
    let out = cli(ns, &["inspect", "--json", "--pin-dir", &pin_dir])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let entries = json["flows"]["entries"].as_u64().context("entries")?;
    let capacity = json["flows"]["capacity"].as_u64().context("capacity")?;
    Ok((entries, capacity))
}

#[test]
fn a_syn_flood_neither_stalls_a_flow_nor_blocks_new_ones() {
    const SYNS: u32 = 200_000;
    let t = Topology::build(Offload::On).expect("topology");
    let (sysnet, sysfw) = start_forwarders(&t).expect("forwarders");
    let _app_server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let ticker = TcpTicker::start(
        &t.lan,
        SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT),
        Duration::from_millis(50),
    )
    .unwrap();
    assert!(
        wait_until(WAIT, || ticker.echoed() >= 5),
        "the established flow never echoed"
    );
    let lan_mac = t.lan.link("eth0").unwrap().mac;
    let uplink_mac = t.sysnet.link(SYSNET_UPLINK).unwrap().mac;
    let started = Instant::now();
    let syns = (0..SYNS).map(move |i| {
        let mut f = Frame::tcp(
            LAN_PEER,
            1024 + (i % 64000) as u16,
            SYSNET_LAN,
            LOCALSEND_PORT,
        );
        // Spread over the whole table: a new peer address every 64000 ports.
        f.saddr = Ipv4Addr::new(192, 168, 1, 100 + (i / 64000) as u8);
        f.src_mac = lan_mac;
        f.dst_mac = uplink_mac;
        f.build()
    });
    t.lan
        .ip("addr add 192.168.1.100/24 dev eth0")
        .and_then(|_| t.lan.ip("addr add 192.168.1.101/24 dev eth0"))
        .and_then(|_| t.lan.ip("addr add 192.168.1.102/24 dev eth0"))
        .and_then(|_| t.lan.ip("addr add 192.168.1.103/24 dev eth0"))
        .unwrap();
    capture::inject_all(&t.lan, "eth0", syns).unwrap();
    let flood = started.elapsed();
    // The flow must also carry on after the flood, not only through it.
    let after_flood = ticker.echoed();
    wait_until(WAIT, || ticker.echoed() >= after_flood + 10);
    let ticks = ticker.finish().unwrap();
    let mut fresh = None;
    let new_ok = wait_until(WAIT, || {
        fresh = tcp_echo(
            &t.lan,
            SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT),
            None,
            Duration::from_secs(1),
        )
        .ok();
        fresh.is_some()
    });
    let fills = [
        ("sys-net", table_fill(&t.sysnet, &sysnet).unwrap()),
        ("sys-firewall", table_fill(&t.sysfw, &sysfw).unwrap()),
    ];
    println!(
        "{SYNS} SYNs in {:.2} s ({:.0}/s); established flow: longest gap {:?}, {} of {} echoed; tables: {fills:?}",
        flood.as_secs_f64(),
        f64::from(SYNS) / flood.as_secs_f64(),
        ticks.longest_gap(),
        ticks.echoes.len(),
        ticks.sent
    );
    assert!(
        ticks.longest_gap() <= Duration::from_secs(1),
        "the established flow stalled {:?}",
        ticks.longest_gap()
    );
    assert!(
        ticks.missing().is_empty(),
        "messages lost: {:?}",
        ticks.missing()
    );
    assert!(new_ok, "no new connection after the flood");
    for (router, (entries, capacity)) in fills {
        assert!(
            entries <= capacity,
            "{router}: {entries} entries in a table of {capacity}"
        );
        assert!(
            entries > 1000,
            "{router}: the flood made only {entries} entries"
        );
    }
    assert_eq!(sysnet.failures().unwrap() + sysfw.failures().unwrap(), 0);
}

#[test]
fn a_deleted_rule_and_a_timed_out_flow_let_nothing_through() {
    let t = Topology::build(Offload::On).expect("topology");
    let (_sysnet, sysfw) = start_forwarders(&t).expect("forwarders");
    let _app_server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let lan_capture = Capture::start(&t.lan, "eth0").unwrap();
    let app = VmSender::new(&t, &t.app, APP, "vif3.0").unwrap();
    let to_uplink = SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT);

    // A TCP exchange that closes both ways: its flow times out in 10 s.
    let echo = tcp_echo(&t.lan, to_uplink, None, WAIT).unwrap();
    let peer_port = echo.seen_as.port();
    let listed = |state: &str| {
        listed_flows(&t.sysfw, &sysfw).unwrap().iter().any(|f| {
            f["peer_port"] == peer_port && f["listen_port"] == LOCALSEND_PORT && f["state"] == state
        })
    };
    assert!(
        wait_until(WAIT, || listed("closed")),
        "the closed flow is listed"
    );
    let closed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || !listed("closed")),
        "the flow outlived its 10 s timeout"
    );
    println!("the closed flow was gone after {:?}", closed_at.elapsed());
    let before = sysfw.reason(Reason::NoFlow).unwrap();
    let peer = SocketAddrV4::new(LAN_PEER, peer_port);
    app.send(UDP, LOCALSEND_PORT, peer, "after-timeout")
        .unwrap();
    app.send(TCP, LOCALSEND_PORT, peer, "").unwrap();
    assert!(wait_until(WAIT, || sysfw.reason(Reason::NoFlow).unwrap() >= before + 2));

    // A rule deleted mid-flow ends the flow, and nothing of it leaves
    // the uplink after.
    let ticker = TcpTicker::start(&t.lan, to_uplink, Duration::from_millis(50)).unwrap();
    assert!(wait_until(WAIT, || ticker.echoed() >= 3), "the flow runs");
    let pin_dir = sysfw.pins.path().to_str().unwrap().to_string();
    let out = cli(
        &t.sysfw,
        &[
            "rules",
            "del",
            &format!("tcp:{LOCALSEND_PORT}"),
            "--pin-dir",
            &pin_dir,
        ],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echoed = ticker.echoed();
    let seen_before = lan_capture.snapshot().len();
    let flows = listed_flows(&t.sysfw, &sysfw).unwrap();
    assert!(
        flows
            .iter()
            .all(|f| f["proto"] != "tcp" || f["listen_port"] != LOCALSEND_PORT),
        "flows of the deleted rule remain: {flows:?}"
    );
    std::thread::sleep(QUIET);
    let ticks = ticker.finish().unwrap();
    assert!(
        ticks.echoes.len() as u64 <= echoed + 1,
        "the flow went on after the rule was deleted: {} echoes, {echoed} before",
        ticks.echoes.len()
    );
    let after: Vec<String> = lan_capture.finish()[seen_before..]
        .iter()
        .filter(|f| {
            packet::parse(f).is_some_and(|p| {
                p.saddr == SYSNET_LAN && p.sport == LOCALSEND_PORT && !p.payload.is_empty()
            })
        })
        .map(|f| capture::describe(f))
        .collect();
    assert!(
        after.len() <= 1,
        "data left the uplink after the deletion: {after:?}"
    );
}
