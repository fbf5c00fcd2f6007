//! Forward rules on the Qubes-like topology, end to end, for the forwarder
//! and for the seed's nftables recipe, with checksum offload on and off.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Result, anyhow, bail, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use forwarder_tests::{
    capture::{self, Capture},
    checks::Checks,
    daemon::Forwarder,
    netns::Netns,
    sockets::{EchoServer, tcp_echo, udp_echo},
    topology::*,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Forwarder,
    SeedRecipe,
}

fn lan_socket(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(SYSNET_LAN, port)
}

fn is_internal(addr: &Ipv4Addr) -> bool {
    addr.octets()[0] == 10
}

fn ping(ns: &Netns, to: Ipv4Addr) -> Result<()> {
    // Up to three tries: the first may be spent resolving neighbours.
    let mut last = anyhow!("not tried");
    for _ in 0..3 {
        match ns.sh(&format!("ping -c 1 -W 2 {to}")) {
            Ok(_) => return Ok(()),
            Err(err) => last = err,
        }
    }
    bail!("no ping reply from {to}: {last:#}")
}

fn start_forwarders(t: &Topology) -> Result<(Forwarder, Forwarder)> {
    let port = LOCALSEND_PORT;
    let (tcp_sysnet, udp_sysnet) = (format!("tcp:{port}={SYSFW}"), format!("udp:{port}={SYSFW}"));
    let (tcp_sysfw, udp_sysfw) = (format!("tcp:{port}={APP}"), format!("udp:{port}={APP}"));
    Forwarder::start_routers(
        t,
        &["--forward", &tcp_sysnet, "--forward", &udp_sysnet],
        &["--forward", &tcp_sysfw, "--forward", &udp_sysfw],
    )
}

/// Forwarded flows from the LAN peer that conntrack tracks in a router.
fn conntrack_entries(ns: &Netns) -> Result<usize> {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/nf_conntrack"))?;
    Ok(text
        .lines()
        .filter(|l| {
            l.contains(&format!("src={LAN_PEER} "))
                && l.contains(&format!("dport={LOCALSEND_PORT} "))
        })
        .count())
}

fn datapath_counted(fwd: &Forwarder) -> Result<()> {
    let tables = fwd.tables()?;
    for ((proto, port), (_, rule)) in tables.installed()? {
        let c = tables.rule_counters(rule.slot)?;
        ensure!(
            c.packets_in > 0 && c.packets_out > 0,
            "rule {proto}/{port}: {} in, {} out",
            c.packets_in,
            c.packets_out
        );
    }
    Ok(())
}

fn scenario(contender: Contender, offload: Offload) -> Checks {
    let mut checks = Checks::default();
    let t = Topology::build(offload).expect("building the topology");
    let (mut forwarders, _recipe) = match contender {
        Contender::Forwarder => (
            Some(start_forwarders(&t).expect("starting the forwarders")),
            None,
        ),
        Contender::SeedRecipe => (
            None,
            Some(t.install_seed_recipe().expect("installing the seed recipe")),
        ),
    };
    let capture = Capture::start(&t.lan, "eth0").expect("capturing on the LAN");
    let _app_server = EchoServer::start(&t.app, LOCALSEND_PORT).expect("app server");
    let _app_unforwarded = EchoServer::start(&t.app, UNFORWARDED_PORT).expect("app server");
    let _lan_server = EchoServer::start(&t.lan, LAN_SERVICE_PORT).expect("LAN server");
    let timeout = Duration::from_secs(5);

    let mut check = |name, result: Result<()>| checks.add_ok(name, result);
    check(
        "tcp from the LAN reaches the app and echoes back",
        (|| {
            let echo = tcp_echo(&t.lan, lan_socket(LOCALSEND_PORT), None, timeout)?;
            ensure!(echo.seen_as.ip() == LAN_PEER, "app saw {}", echo.seen_as);
            Ok(())
        })(),
    );
    check(
        "udp from the LAN reaches the app; reply comes from sys-net:53317",
        (|| {
            let echo = udp_echo(&t.lan, lan_socket(LOCALSEND_PORT), timeout)?;
            ensure!(echo.seen_as.ip() == LAN_PEER, "app saw {}", echo.seen_as);
            let from = echo.reply_from.ok_or_else(|| anyhow!("no source"))?;
            ensure!(
                from == lan_socket(LOCALSEND_PORT).into(),
                "reply came from {from}"
            );
            Ok(())
        })(),
    );
    check(
        "a port not forwarded stays unreachable",
        (|| {
            let short = Duration::from_secs(1);
            ensure!(
                tcp_echo(&t.lan, lan_socket(UNFORWARDED_PORT), None, short).is_err(),
                "tcp got through"
            );
            ensure!(
                udp_echo(&t.lan, lan_socket(UNFORWARDED_PORT), short).is_err(),
                "udp got through"
            );
            Ok(())
        })(),
    );
    check(
        "the app's outbound tcp works through masquerade",
        (|| {
            let echo = tcp_echo(
                &t.app,
                SocketAddrV4::new(LAN_PEER, LAN_SERVICE_PORT),
                None,
                timeout,
            )?;
            ensure!(echo.seen_as.ip() == SYSNET_LAN, "LAN saw {}", echo.seen_as);
            Ok(())
        })(),
    );
    check("the app can ping the LAN", ping(&t.app, LAN_PEER));
    check(
        "sys-firewall's own connection from the port sys-net forwards to it is left to masquerade",
        (|| {
            let echo = tcp_echo(
                &t.sysfw,
                SocketAddrV4::new(LAN_PEER, LAN_SERVICE_PORT),
                Some(LOCALSEND_PORT),
                timeout,
            )?;
            ensure!(echo.seen_as.ip() == SYSNET_LAN, "LAN saw {}", echo.seen_as);
            if contender == Contender::Forwarder {
                ensure!(
                    echo.seen_as.port() != LOCALSEND_PORT,
                    "masquerade kept the listen port"
                );
            }
            Ok(())
        })(),
    );
    check(
        "forwarding follows the app's restart behind a new vif",
        (|| {
            t.restart_app_vif("vif3.0")?;
            let mut last = anyhow!("never tried");
            let ok = forwarder_tests::wait::wait_until(Duration::from_secs(5), || {
                match tcp_echo(
                    &t.lan,
                    lan_socket(LOCALSEND_PORT),
                    None,
                    Duration::from_millis(500),
                ) {
                    Ok(echo) if echo.seen_as.ip() == LAN_PEER => true,
                    Ok(echo) => {
                        last = anyhow!("app saw {}", echo.seen_as);
                        false
                    }
                    Err(err) => {
                        last = err;
                        false
                    }
                }
            });
            ensure!(ok, "no echo after the restart: {last:#}");
            Ok(())
        })(),
    );
    if let Some((sysnet, sysfw)) = &forwarders {
        check(
            "both routers forwarded in the datapath",
            datapath_counted(sysnet).and(datapath_counted(sysfw)),
        );
        check(
            "conntrack never saw the forwarded flows",
            (|| {
                for (name, ns) in [("sys-net", &t.sysnet), ("sys-firewall", &t.sysfw)] {
                    let n = conntrack_entries(ns)?;
                    ensure!(n == 0, "{name} tracks {n} forwarded flows");
                }
                Ok(())
            })(),
        );
    }

    let frames = capture.finish();
    check(
        "no internal address leaves the uplink",
        (|| {
            ensure!(!frames.is_empty(), "the capture saw nothing at all");
            capture::ensure_no_internal(&frames, is_internal)
        })(),
    );
    check(
        "receivers counted no checksum errors",
        t.ensure_no_checksum_errors(),
    );

    if let Some((mut sysnet, mut sysfw)) = forwarders.take() {
        check(
            "a clean stop removes programs, links, pins and the nftables table",
            (|| {
                for (fwd, ns, ifaces) in [
                    (&mut sysnet, &t.sysnet, [SYSNET_UPLINK, "vif2.0"].as_slice()),
                    (&mut sysfw, &t.sysfw, [SYSFW_UPLINK, "vif4.0"].as_slice()),
                ] {
                    let status = fwd.stop()?;
                    ensure!(
                        status.success(),
                        "exit status {status}; log:\n{}",
                        fwd.log_text()
                    );
                    ensure!(
                        !ns.sh("nft list tables")?.contains("forwarder"),
                        "nftables table left"
                    );
                    for iface in ifaces {
                        let (_, progs) =
                            ns.run(|| SchedClassifier::query_tcx(iface, TcAttachType::Ingress))?;
                        ensure!(progs.is_empty(), "{} programs left on {iface}", progs.len());
                    }
                }
                Ok(())
            })(),
        );
    }
    checks
}

fn assert_all_pass(contender: Contender, offload: Offload) {
    scenario(contender, offload)
        .assert_all_pass(&format!("{contender:?}, checksum offload {offload:?}"));
}

#[test]
fn forwarder_with_checksum_offload() {
    assert_all_pass(Contender::Forwarder, Offload::On);
}

#[test]
fn forwarder_without_checksum_offload() {
    assert_all_pass(Contender::Forwarder, Offload::Off);
}

#[test]
fn seed_recipe_with_checksum_offload() {
    assert_all_pass(Contender::SeedRecipe, Offload::On);
}

#[test]
fn seed_recipe_without_checksum_offload() {
    assert_all_pass(Contender::SeedRecipe, Offload::Off);
}

/// The checksum assertion above is only worth something if receivers do
/// count bad checksums: a corrupted datagram must show up in the counter.
#[test]
fn receivers_count_corrupt_checksums() {
    let t = Topology::build(Offload::Off).expect("topology");
    let mac = |ns: &Netns, dev: &str| ns.link(dev).unwrap().mac;
    let mut frame = forwarder_tests::packet::Frame::udp(SYSNET_LAN, 40000, LAN_PEER, 9)
        .with_payload(b"corrupt");
    frame.src_mac = mac(&t.sysnet, SYSNET_UPLINK);
    frame.dst_mac = mac(&t.lan, "eth0");
    let mut bytes = frame.build();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let before = t.lan.snmp("Udp", "InCsumErrors").unwrap();
    capture::inject(&t.sysnet, SYSNET_UPLINK, &bytes).unwrap();
    let counted = forwarder_tests::wait::wait_until(Duration::from_secs(2), || {
        t.lan.snmp("Udp", "InCsumErrors").unwrap() > before
    });
    assert!(
        counted,
        "the LAN peer did not count a corrupted UDP checksum"
    );
}
