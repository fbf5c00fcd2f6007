//! Issue 16 end to end on the Qubes-like topology, without Qubes: dom0's
//! `qvm-forwarder` writes features to the stand-in qubesd, and every
//! router and the app VM run what the package installs (`forwarder run`
//! with no flags, `forwarder input`) seeing only what Qubes gives a qube:
//! its qvm-services, its QubesDB through the stand-in `qubesdb-*` tools on
//! PATH, nothing under /rw. Qubes' own `custom-input` of the app is empty,
//! as in a fresh VM: only `forwarder input` admits anything there. A
//! capture on the LAN fails each test if any frame carries an internal
//! address, and sys-firewall keeps its restrictive qvm-firewall chains.
//!
//! Measured and printed: the time from `expose` to the first forwarded
//! packet reaching the app, and from a netvm change to forwarding on the
//! new chain.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use forwarder::{qubes::admin::Admin, qubes::transport::Transport, qubes_vm::CONFIG_FILE};
use forwarder_tests::{
    capture::Capture,
    daemon::{Forwarder, cli},
    leak,
    localsend::Peer,
    qubes_vm::{self, InputSide, QubeEnv, SYSVPN, Watch, qvm_forwarder},
    qubesd::Qubesd,
    sockets::{Background, UdpRecorder, tcp_echo},
    topology::*,
    wait::{ms, wait_until},
};

/// Every internal address: none may reach the LAN.
const INTERNAL: [Ipv4Addr; 5] = [APP, APP2, SYSFW, SYSNET_INTERNAL, SYSVPN];
const LOCALSEND: SocketAddrV4 = SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT);

/// The topology with dom0's stand-in qubesd, the forwarder in both
/// routers and `forwarder input` in the app, as Qubes would start them;
/// a capture on the LAN. Fields drop in order: the processes before the
/// namespaces.
struct Qubes {
    sysnet: Forwarder,
    sysfw: Forwarder,
    input: InputSide,
    capture: Option<Capture>,
    q: Qubesd,
    t: Topology,
}

impl Qubes {
    fn start(label: &str) -> Result<Self> {
        Self::start_with(label, &[])
    }

    /// As `start`, sys-firewall's forwarder with `sysfw_args` too.
    fn start_with(label: &str, sysfw_args: &[&str]) -> Result<Self> {
        ensure!(
            !Path::new(CONFIG_FILE).exists(),
            "{CONFIG_FILE} exists on this host: the routers must start with nothing under /rw"
        );
        let t = Topology::build(Offload::On)?;
        // A fresh qube's custom-input is empty; the topology's own accept
        // rules for the app would hide what `forwarder input` does.
        t.app.nft("flush chain ip qubes custom-input\n")?;
        let q = Qubesd::graph(label, qubes_vm::graph())?;
        let capture = Some(Capture::start(&t.lan, "eth0")?);
        let sysnet = QubeEnv::router(&q, "sys-net")?.start_router(&t.sysnet, "sys-net")?;
        let sysfw = Forwarder::start_binary(
            QubeEnv::router(&q, "sys-firewall")?.program(),
            &t.sysfw,
            "sys-firewall",
            sysfw_args,
        )?;
        let input = InputSide::start(&QubeEnv::exposed(&q, "app")?, &t.app, "app")?;
        Ok(Qubes {
            sysnet,
            sysfw,
            input,
            capture,
            q,
            t,
        })
    }

    /// dom0's command.
    fn dom0(&self, args: &[&str]) -> String {
        qvm_forwarder(&self.q, args).unwrap()
    }

    /// The end of every test: no internal address on the LAN, no refused
    /// rewrite, no checksum error, and the input side stops cleanly.
    fn finish(mut self) {
        let frames = self.capture.take().expect("capturing").finish();
        leak::ensure_none(&frames, &INTERNAL).unwrap();
        for router in [&self.sysnet, &self.sysfw] {
            assert_eq!(router.failures().unwrap(), 0, "refused rewrites or clones");
        }
        self.t.ensure_no_checksum_errors().unwrap();
        self.input.stop(&self.t.app).unwrap();
    }
}

/// The forward rules a router's maps hold: (protocol, port, target).
fn rules(fwd: &Forwarder) -> Vec<(u8, u16, Ipv4Addr)> {
    fwd.tables()
        .and_then(|t| t.installed())
        .map(|rules| {
            rules
                .iter()
                .map(|((proto, port), (_, value))| {
                    (
                        *proto,
                        *port,
                        Ipv4Addr::from(value.target_addr.to_ne_bytes()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// LocalSend's two rules toward `target`.
fn localsend_rules(target: Ipv4Addr) -> Vec<(u8, u16, Ipv4Addr)> {
    vec![(6, LOCALSEND_PORT, target), (17, LOCALSEND_PORT, target)]
}

/// One TCP exchange from the LAN peer through sys-net's LocalSend port,
/// seen by the app's echo server as coming from the peer.
fn tcp_forwarded(t: &Topology) -> Result<()> {
    let echo = tcp_echo(&t.lan, LOCALSEND, None, Duration::from_secs(1))?;
    ensure!(echo.seen_as.ip() == LAN_PEER, "seen as {}", echo.seen_as);
    Ok(())
}

/// Datagrams from the LAN peer to sys-net's LocalSend port every 2 ms,
/// each `MARKER N`, until dropped.
fn udp_prober(t: &Topology, marker: &'static str) -> Result<Background> {
    let socket = t.lan.run(|| UdpSocket::bind((LAN_PEER, 0)))?;
    let mut n = 0u64;
    Ok(Background::spawn(move || {
        n += 1;
        let _ = socket.send_to(format!("{marker} {n}").as_bytes(), LOCALSEND);
        std::thread::sleep(Duration::from_millis(2));
    }))
}

/// `expose app --localsend` from dom0, timed to the first datagram of a
/// steady stream from the LAN reaching the app; then real LocalSend peers
/// in the app and on the LAN (started later, like a phone) discover each
/// other and send a file each way.
#[test]
fn expose_localsend_lets_real_peers_discover_each_other_and_exchange_files() {
    let qubes = Qubes::start("expose").unwrap();
    let t = &qubes.t;
    assert!(rules(&qubes.sysnet).is_empty() && rules(&qubes.sysfw).is_empty());
    {
        let arrivals = UdpRecorder::start(&t.app, LOCALSEND_PORT).unwrap();
        let _prober = udp_prober(t, "before-expose").unwrap();
        // Nothing arrives before the expose: the positive control follows.
        assert!(
            arrivals
                .wait_for("before-expose", Duration::from_millis(300))
                .is_none(),
            "the app got LocalSend datagrams before anything was exposed"
        );
        let exposed = Instant::now();
        let out = qubes.dom0(&["expose", "app", "--localsend"]);
        let dom0_took = exposed.elapsed();
        assert!(
            out.contains("exposed localsend on app <- sys-firewall <- sys-net"),
            "{out}"
        );
        let first = arrivals
            .first_after("before-expose", exposed, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!(
                    "nothing forwarded within 5 s of expose\nsys-net:\n{}\nsys-firewall:\n{}\napp input:\n{}",
                    qubes.sysnet.log_text(),
                    qubes.sysfw.log_text(),
                    qubes.input.log()
                )
            });
        println!(
            "expose -> first forwarded packet at the app: {} (qvm-forwarder itself: {})",
            ms(first - exposed),
            ms(dom0_took)
        );
    }
    assert_eq!(rules(&qubes.sysnet), localsend_rules(SYSFW));
    assert_eq!(rules(&qubes.sysfw), localsend_rules(APP));
    let admitted = qubes.input.chain(&t.app).unwrap();
    assert!(
        admitted.contains("tcp dport 53317 ct state new")
            && admitted.contains("ip daddr 224.0.0.167 udp dport 53317"),
        "{admitted}"
    );

    let app = Peer::start(&t.app, "qubes-app").expect("localsendd in the app");
    assert!(
        wait_until(Duration::from_secs(10), || qubes
            .sysnet
            .relayed_up()
            .unwrap()
            >= 3),
        "the app's start-up announcements were not relayed"
    );
    let lan = Peer::start(&t.lan, "lan-phone").expect("localsendd on the LAN");
    let started = Instant::now();
    let found = wait_until(Duration::from_secs(15), || {
        app.knows("lan-phone").is_some() && lan.knows("qubes-app").is_some()
    });
    assert!(
        found,
        "discovery failed: app knows {:?}, LAN knows {:?}\napp log:\n{}\nLAN log:\n{}",
        app.devices().ok(),
        lan.devices().ok(),
        app.log(),
        lan.log()
    );
    println!(
        "mutual discovery {} after the LAN peer started",
        ms(started.elapsed())
    );
    let seen = lan.knows("qubes-app").unwrap();
    assert!(seen.ip.ends_with(&SYSNET_LAN.to_string()), "{}", seen.ip);

    let dir = std::env::temp_dir().join(format!("{}-files", t.lan.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let to_lan: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let to_app: Vec<u8> = (0..150_000u32).map(|i| (i * 13 + 5) as u8).collect();
    std::fs::write(dir.join("from-app.bin"), &to_lan).unwrap();
    std::fs::write(dir.join("from-lan.bin"), &to_app).unwrap();
    app.send(&dir.join("from-app.bin"), "lan-phone").unwrap();
    assert_eq!(
        lan.downloaded("from-app.bin").as_deref(),
        Some(to_lan.as_slice())
    );
    lan.send(&dir.join("from-lan.bin"), "qubes-app").unwrap();
    assert_eq!(
        app.downloaded("from-lan.bin").as_deref(),
        Some(to_app.as_slice())
    );
    let _ = std::fs::remove_dir_all(&dir);
    drop((app, lan));
    qubes.finish();
}

/// Both routers stopped cleanly (every pin gone) and started again, with
/// nothing under /rw: their rules come back from QubesDB.
#[test]
fn routers_restarted_with_nothing_under_rw_get_their_rules_back() {
    let mut qubes = Qubes::start("restart").unwrap();
    let _server =
        forwarder_tests::sockets::EchoServer::start(&qubes.t.app, LOCALSEND_PORT).unwrap();
    qubes.dom0(&["expose", "app", "--localsend"]);
    assert!(wait_until(Duration::from_secs(5), || tcp_forwarded(
        &qubes.t
    )
    .is_ok()));
    for (router, ns) in [
        (&mut qubes.sysnet, &qubes.t.sysnet),
        (&mut qubes.sysfw, &qubes.t.sysfw),
    ] {
        router.stop().unwrap();
        assert!(router.pins.contents().is_empty());
        let restarted = Instant::now();
        router.respawn(ns).unwrap();
        router.wait_ready(Duration::from_secs(20)).unwrap();
        router
            .wait_log("QubesDB: forwarding tcp:53317", Duration::from_secs(1))
            .unwrap();
        println!("restarted and ready in {}", ms(restarted.elapsed()));
    }
    assert_eq!(rules(&qubes.sysnet), localsend_rules(SYSFW));
    assert_eq!(rules(&qubes.sysfw), localsend_rules(APP));
    tcp_forwarded(&qubes.t).unwrap();
    assert!(!Path::new("/rw").exists(), "nothing under /rw");
    qubes.finish();
}

/// The app moved behind a VPN-like router (app -> sys-vpn -> sys-net) with
/// `qvm-forwarder watch` running: forwarding follows within 2 s, and
/// sys-firewall, off the new chain, holds no rule or relay any more.
#[test]
fn moving_the_app_behind_a_vpn_qube_moves_forwarding_within_two_seconds() {
    let qubes = Qubes::start("vpn").unwrap();
    let t = &qubes.t;
    let vpn = qubes_vm::add_vpn(t).unwrap();
    let sysvpn = QubeEnv::router(&qubes.q, "sys-vpn")
        .unwrap()
        .start_router(&vpn, "sys-vpn")
        .unwrap();
    qubes.dom0(&["expose", "app", "--localsend"]);
    let watch = Watch::start(&qubes.q).unwrap();
    let arrivals = UdpRecorder::start(&t.app, LOCALSEND_PORT).unwrap();
    {
        let _prober = udp_prober(t, "before-move").unwrap();
        assert!(
            arrivals
                .wait_for("before-move", Duration::from_secs(5))
                .is_some(),
            "positive control: nothing forwarded through sys-firewall"
        );
    }
    assert!(rules(&sysvpn).is_empty());

    let moved = Instant::now();
    qubes_vm::move_app_behind_vpn(t, &vpn).unwrap();
    // Sent once the app's link to sys-firewall is gone: only the new chain
    // can bring these.
    let _prober = udp_prober(t, "after-move").unwrap();
    qubes.q.set_property("app", "netvm", Some("sys-vpn"));
    let Some(first) = arrivals.first_after("after-move", moved, Duration::from_secs(2)) else {
        panic!(
            "not forwarded on the new chain within 2 s\nwatch:\n{}\nsys-vpn:\n{}\nsys-net:\n{}",
            watch.log(),
            sysvpn.log_text(),
            qubes.sysnet.log_text()
        );
    };
    println!(
        "netvm change -> forwarding on the new chain: {}",
        ms(first - moved)
    );
    assert_eq!(rules(&qubes.sysnet), localsend_rules(SYSVPN));
    assert_eq!(rules(&sysvpn), localsend_rules(APP));
    assert!(
        wait_until(Duration::from_secs(1), || rules(&qubes.sysfw).is_empty()),
        "the old chain still holds {:?}",
        rules(&qubes.sysfw)
    );
    assert!(
        qubes
            .sysfw
            .tables()
            .unwrap()
            .installed_relays()
            .unwrap()
            .is_empty()
    );
    qubes
        .sysfw
        .wait_log(
            "QubesDB: no longer forwarding tcp:53317",
            Duration::from_secs(1),
        )
        .unwrap();
    drop((watch, arrivals));
    drop(sysvpn);
    qubes.finish();
}

/// `unexpose`: after a positive control, nothing is forwarded any more,
/// and the app admits nothing.
#[test]
fn unexpose_stops_all_forwarding() {
    let qubes = Qubes::start("unexpose").unwrap();
    let t = &qubes.t;
    qubes.dom0(&["expose", "app", "--localsend"]);
    let arrivals = UdpRecorder::start(&t.app, LOCALSEND_PORT).unwrap();
    {
        let _prober = udp_prober(t, "exposed").unwrap();
        assert!(
            arrivals
                .wait_for("exposed", Duration::from_secs(5))
                .is_some(),
            "positive control: nothing forwarded while exposed"
        );
    }
    let out = qubes.dom0(&["unexpose", "app"]);
    assert!(
        out.contains("sys-net: remove vm-config.forwarder.1"),
        "{out}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || rules(&qubes.sysnet).is_empty()
            && rules(&qubes.sysfw).is_empty()),
        "rules left: {:?} {:?}",
        rules(&qubes.sysnet),
        rules(&qubes.sysfw)
    );
    assert!(wait_until(Duration::from_secs(2), || {
        qubes
            .input
            .chain(&t.app)
            .is_ok_and(|c| !c.contains("accept"))
    }));
    let _prober = udp_prober(t, "unexposed").unwrap();
    assert!(
        arrivals
            .wait_for("unexposed", Duration::from_secs(1))
            .is_none(),
        "forwarded after unexpose"
    );
    assert!(tcp_forwarded(t).is_err(), "TCP forwarded after unexpose");
    drop(arrivals);
    qubes.finish();
}

/// A feature value dom0 should never write: each is refused, logged with
/// what was wrong, and the router keeps forwarding what it had. A target
/// that does not route out of a downstream interface is never forwarded
/// to. `qvm-forwarder sync` puts dom0's value back.
#[test]
fn a_bad_feature_value_keeps_the_last_good_configuration_and_says_why() {
    let qubes = Qubes::start("malformed").unwrap();
    let t = &qubes.t;
    let _server = forwarder_tests::sockets::EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    qubes.dom0(&["expose", "app", "--localsend"]);
    assert!(wait_until(Duration::from_secs(5), || tcp_forwarded(t).is_ok()));
    let admin = Admin::new(Transport::Socket(qubes.q.socket().into()));
    let good = qubes.q.features("sys-net", "vm-config.forwarder.")["vm-config.forwarder.1"].clone();
    let body = good.split_once(" | ").unwrap().1.to_string();
    let value = |entries: &[&str]| {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        forwarder::vm_config::parts::ROUTER
            .split(&entries)
            .unwrap()
            .remove(0)
    };

    for (bad, why) in [
        (
            value(&["forward=tcp:53317"]),
            "a forward must name its target",
        ),
        (
            good.replacen("part=1/1", "part=1/2", 1),
            "its header says 2 parts, 1 are present",
        ),
        (
            format!("{good} | forward=tcp:9=10.137.0.6"),
            "the entries do not match their sum",
        ),
        (
            value(&["forward=tcp:53317=10.137.0.5 colour=red"]),
            "unknown attribute",
        ),
    ] {
        admin
            .set_feature("sys-net", "vm-config.forwarder.1", &bad)
            .unwrap();
        qubes
            .sysnet
            .wait_log("QubesDB: refused dom0's share: ", Duration::from_secs(2))
            .unwrap();
        qubes
            .sysnet
            .wait_log(why, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{bad}: {e:#}"));
        assert_eq!(rules(&qubes.sysnet), localsend_rules(SYSFW), "{bad}");
        tcp_forwarded(t).unwrap();
    }

    // Valid, but one entry aims at the LAN: that entry is never applied.
    let mut entries: Vec<&str> = body.split(" | ").collect();
    entries.push("forward=tcp:9000=192.168.1.10");
    admin
        .set_feature("sys-net", "vm-config.forwarder.1", &value(&entries))
        .unwrap();
    qubes
        .sysnet
        .wait_log(
            "not applied while forward=tcp:9000=192.168.1.10: target 192.168.1.10 routes out of the uplink wls6f0",
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(rules(&qubes.sysnet), localsend_rules(SYSFW));
    tcp_forwarded(t).unwrap();

    let out = qubes.dom0(&["sync"]);
    assert!(out.contains("sys-net: set vm-config.forwarder.1"), "{out}");
    qubes
        .sysnet
        .wait_log(
            "QubesDB: dom0's share is good again",
            Duration::from_secs(2),
        )
        .unwrap();
    tcp_forwarded(t).unwrap();
    qubes.finish();
}

/// The precedence with /rw/config/forwarder.toml (here given as --config,
/// which a Qubes router without rule flags still combines with QubesDB):
/// the file's rules and QubesDB's add up; a share that would forward a
/// port the file forwards is refused naming both, and the last good share
/// stays. A QubesDB rule cannot be deleted by hand.
#[test]
fn the_config_file_and_qubesdb_add_up_and_a_clash_is_refused_naming_both() {
    let file = std::env::temp_dir().join(format!(
        "fwd-qubes-{}-sys-firewall.toml",
        std::process::id()
    ));
    std::fs::write(&file, "[[forward]]\nspec = \"tcp:9100=10.137.0.17\"\n").unwrap();
    let qubes = Qubes::start_with("precedence", &["--config", file.to_str().unwrap()]).unwrap();
    let t = &qubes.t;
    let sysfw = &qubes.sysfw;
    qubes.dom0(&["expose", "app", "--localsend"]);
    assert!(wait_until(Duration::from_secs(3), || rules(sysfw).len() == 3));
    let pin_dir = sysfw.pin_arg();
    let list = cli(
        &t.sysfw,
        &["rules", "list", "--json", "--pin-dir", &pin_dir],
    )
    .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let origins: Vec<(String, String)> = list
        .as_array()
        .context("rules")
        .unwrap()
        .iter()
        .map(|r| {
            (
                format!("{}:{}", r["proto"].as_str().unwrap(), r["port"]),
                r["origin"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for expected in [
        ("tcp:9100", "file"),
        ("tcp:53317", "qubesdb"),
        ("udp:53317", "qubesdb"),
    ] {
        assert!(
            origins.contains(&(expected.0.into(), expected.1.into())),
            "{origins:?}"
        );
    }
    let out = cli(
        &t.sysfw,
        &["rules", "del", "tcp:53317", "--pin-dir", &pin_dir],
    )
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("qvm-forwarder unexpose"),
        "{out:?}"
    );

    qubes.dom0(&["expose", "app", "tcp:9100"]);
    sysfw
        .wait_log("QubesDB: refused dom0's share: ", Duration::from_secs(2))
        .unwrap();
    let log = sysfw.log_text();
    assert!(
        log.contains("tcp:9100 (from the config file) and tcp:9100 (from dom0's share in QubesDB"),
        "{log}"
    );
    assert_eq!(rules(sysfw).len(), 3, "the last good share stays");
    let _ = std::fs::remove_file(&file);
    qubes.finish();
}

/// `--expire`: at the deadline the routers' rules go (the datapath stops
/// them itself), their relays go (the daemon enforces a relay's `until`),
/// and the app stops admitting the ports (`forwarder input` honours it).
#[test]
fn an_expiring_exposure_ends_everywhere_on_time() {
    let qubes = Qubes::start("expire").unwrap();
    let t = &qubes.t;
    let exposed = Instant::now();
    qubes.dom0(&["expose", "app", "--localsend", "--expire", "4s"]);
    let relays = |fwd: &Forwarder| fwd.tables().unwrap().installed_relays().unwrap().len();
    assert!(
        wait_until(Duration::from_secs(3), || rules(&qubes.sysnet).len() == 2
            && relays(&qubes.sysnet) == 1
            && relays(&qubes.sysfw) == 1),
        "positive control: the exposure was not applied"
    );
    assert!(qubes.input.chain(&t.app).unwrap().contains("accept"));
    let gone = wait_until(Duration::from_secs(8), || {
        [&qubes.sysnet, &qubes.sysfw]
            .iter()
            .all(|r| rules(r).is_empty() && relays(r) == 0)
            && qubes
                .input
                .chain(&t.app)
                .is_ok_and(|c| !c.contains("accept"))
    });
    assert!(
        gone,
        "still there {} after expose: rules {:?} {:?}, relays {} {}, app:\n{}",
        ms(exposed.elapsed()),
        rules(&qubes.sysnet),
        rules(&qubes.sysfw),
        relays(&qubes.sysnet),
        relays(&qubes.sysfw),
        qubes.input.chain(&t.app).unwrap_or_default()
    );
    let took = exposed.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "gone before its time: {took:?}"
    );
    println!(
        "a 4 s exposure was gone everywhere {} after expose",
        ms(took)
    );
    qubes
        .sysnet
        .wait_log(
            "QubesDB: no longer relaying 224.0.0.167:53317",
            Duration::from_secs(1),
        )
        .unwrap();
    qubes.finish();
}
