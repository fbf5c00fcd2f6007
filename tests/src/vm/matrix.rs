//! The checks every kernel gets, on the Qubes-like topology inside the VM:
//! forwarding and relaying through both routers, `inspect`, a `kill -9`
//! and restart, and a clean stop that leaves nothing in the kernel.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};

use super::{
    Results, SLOW, Status, WAIT,
    routers::{self, Routers, Started},
};
use crate::{
    daemon::cli,
    kernel_objects::{self, Objects},
    netns::Netns,
    sockets::{Announcer, EchoServer, MulticastListener, tcp_echo, udp_echo},
    tc,
    topology::*,
};

/// The checks after `start`, in order; skipped together when the
/// forwarder refuses the kernel or cannot start.
const AFTER_START: &[&str] = &[
    "relay-down",
    "relay-up",
    "tcp",
    "udp",
    "inspect",
    "restart",
    "stop",
];

/// The interfaces each router attaches to.
fn hooked(t: &Topology) -> [(&'static str, &Netns, &'static [&'static str]); 2] {
    [
        ("sys-net", &t.sysnet, &[SYSNET_UPLINK, "vif2.0"]),
        (
            "sys-firewall",
            &t.sysfw,
            &[SYSFW_UPLINK, "vif3.0", "vif4.0"],
        ),
    ]
}

/// Runs every check; returns true when the forwarder refused this kernel
/// (the checks after the start are skipped, and so is anything else that
/// would start it).
pub fn run(results: &mut Results) -> bool {
    let skip_rest = |results: &mut Results, why: &str| {
        results.record_all(AFTER_START, Status::Skip, why);
    };
    let building = Instant::now();
    let t = match Topology::build(Offload::On) {
        Ok(t) => t,
        Err(err) => {
            results.check("start", Err(err.context("building the topology")));
            skip_rest(results, "no topology");
            return false;
        }
    };
    let built = building.elapsed();
    let baseline = kernel_objects::settled();
    let starting = Instant::now();
    let mut routers = match routers::start(&t.sysnet, &t.sysfw) {
        Ok(Started::Running(routers)) => {
            results.record(
                "start",
                Status::Pass,
                &format!(
                    "attached as {} in both routers in {:.0} s (the topology took {:.0} s); fallbacks: {}",
                    routers.hook.name(),
                    starting.elapsed().as_secs_f64(),
                    built.as_secs_f64(),
                    match routers::fallbacks(&routers.sysnet) {
                        f if f.is_empty() => "none".to_string(),
                        f => f.join("; "),
                    }
                ),
            );
            *routers
        }
        Ok(Started::Refused(said)) => {
            results.record("start", Status::Refused, &said);
            skip_rest(results, super::REFUSED);
            return true;
        }
        Err(err) => {
            results.check("start", Err(err));
            skip_rest(results, "the forwarder did not start");
            return false;
        }
    };
    // The relay listeners bind the port the echo server serves: first.
    results.check("relay-down", relay_down(&t, &routers));
    results.check("relay-up", relay_up(&t, &routers));
    let _server = match EchoServer::start(&t.app, LOCALSEND_PORT) {
        Ok(server) => server,
        Err(err) => {
            let err = format!("{:#}", err.context("the app's echo server"));
            results.record_all(&AFTER_START[2..], Status::Fail, &err);
            return false;
        }
    };
    results.check("tcp", tcp(&t));
    results.check("udp", udp(&t));
    results.check("inspect", inspect(&t, &routers));
    results.check("restart", restart(&t, &mut routers));
    results.check(
        "stop",
        baseline.and_then(|baseline| stop(&t, routers, baseline)),
    );
    false
}

fn lan_socket() -> SocketAddrV4 {
    SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT)
}

fn tcp(t: &Topology) -> Result<String> {
    let echo = tcp_echo(&t.lan, lan_socket(), None, WAIT)?;
    ensure!(
        echo.seen_as.ip() == LAN_PEER,
        "the app saw {}",
        echo.seen_as
    );
    Ok(format!("LAN -> app and back, the app saw {}", echo.seen_as))
}

fn udp(t: &Topology) -> Result<String> {
    let echo = udp_echo(&t.lan, lan_socket(), WAIT)?;
    ensure!(
        echo.seen_as.ip() == LAN_PEER,
        "the app saw {}",
        echo.seen_as
    );
    let from = echo.reply_from.context("no reply source")?;
    ensure!(from == lan_socket().into(), "the reply came from {from}");
    Ok(format!(
        "the app saw {}, the reply came from {from}",
        echo.seen_as
    ))
}

fn announce(ns: &Netns, tag: &str) -> Result<Announcer> {
    localsend_announcer(ns, tag, Duration::from_millis(50))
}

fn relay_down(t: &Topology, routers: &Routers) -> Result<String> {
    let listener = MulticastListener::start(&t.app, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let _announcer = announce(&t.lan, "down")?;
    let got = listener.wait_from(LAN_PEER, "down", WAIT).ok_or_else(|| {
        anyhow!(
            "no LAN announcement reached the app; sys-net: {}; sys-firewall: {}",
            routers::counters(&routers.sysnet),
            routers::counters(&routers.sysfw)
        )
    })?;
    Ok(format!(
        "the app got {:?} from {}",
        String::from_utf8_lossy(&got.payload),
        got.from
    ))
}

fn relay_up(t: &Topology, routers: &Routers) -> Result<String> {
    let listener = MulticastListener::start(&t.lan, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let _announcer = announce(&t.app, "up")?;
    let got = listener.wait_from(SYSNET_LAN, "up", WAIT).ok_or_else(|| {
        anyhow!(
            "no announcement from {SYSNET_LAN} reached the LAN (it got {} datagrams); sys-firewall: {}; sys-net: {}",
            listener.received().len(),
            routers::counters(&routers.sysfw),
            routers::counters(&routers.sysnet)
        )
    })?;
    let foreign = listener.senders_other_than(SYSNET_LAN);
    ensure!(
        foreign.is_empty(),
        "announcements from other sources: {foreign:?}"
    );
    Ok(format!(
        "the LAN got {:?} from {}",
        String::from_utf8_lossy(&got.payload),
        got.from
    ))
}

/// `forwarder inspect --json` must list the uplink and every downstream
/// interface each router attached to.
fn inspect(t: &Topology, routers: &Routers) -> Result<String> {
    let mut seen = Vec::new();
    for ((name, ns, ifaces), fwd) in hooked(t).into_iter().zip([&routers.sysnet, &routers.sysfw]) {
        let pin_dir = fwd.pins.path().display().to_string();
        let out = cli(ns, &["inspect", "--json", "--pin-dir", &pin_dir])?;
        ensure!(
            out.status.success(),
            "{name}: inspect failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{name}: inspect --json"))?;
        let listed: Vec<(String, String)> = json["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                (
                    i["name"].as_str().unwrap_or("?").to_string(),
                    i["role"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = ifaces
            .iter()
            .enumerate()
            .map(|(i, dev)| {
                let role = if i == 0 { "uplink" } else { "downstream" };
                (dev.to_string(), role.to_string())
            })
            .collect();
        ensure!(
            listed == expected,
            "{name}: inspect lists {listed:?}, attached are {expected:?}"
        );
        ensure!(
            json["uplink"]["usable"] == serde_json::Value::Bool(true),
            "{name}: uplink not usable: {}",
            json["uplink"]
        );
        seen.push(format!("{name}: {listed:?}"));
    }
    Ok(seen.join("; "))
}

/// Filters on every hooked interface, by router and interface.
fn filters(t: &Topology) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for (name, ns, ifaces) in hooked(t) {
        for dev in ifaces {
            out.insert(
                format!("{name}/{dev}"),
                tc::ingress_filters(ns.name(), dev)?.len(),
            );
        }
    }
    Ok(out)
}

/// Both daemons killed with SIGKILL: the datapath forwards on without
/// them, and the restarted daemons take over the hooks without adding a
/// second set of programs (clsact filters outlive the process, so a
/// restart must replace them).
fn restart(t: &Topology, routers: &mut Routers) -> Result<String> {
    let filters_before = filters(t)?;
    let objects_before = kernel_objects::settled()?;
    routers.sysnet.kill_hard()?;
    routers.sysfw.kill_hard()?;
    let echo =
        tcp_echo(&t.lan, lan_socket(), None, WAIT).context("forwarding with both daemons dead")?;
    ensure!(
        echo.seen_as.ip() == LAN_PEER,
        "the app saw {}",
        echo.seen_as
    );
    routers.sysnet.respawn(&t.sysnet)?;
    routers.sysfw.respawn(&t.sysfw)?;
    routers::wait_restarted(&mut routers.sysnet)?;
    routers::wait_restarted(&mut routers.sysfw)?;
    let filters_after = filters(t)?;
    let echo =
        tcp_echo(&t.lan, lan_socket(), None, WAIT).context("forwarding after the restart")?;
    ensure!(
        echo.seen_as.ip() == LAN_PEER,
        "the app saw {}",
        echo.seen_as
    );
    udp_echo(&t.lan, lan_socket(), WAIT).context("udp after the restart")?;
    ensure!(
        filters_after == filters_before,
        "tc ingress filters before the kill {filters_before:?}, after the restart {filters_after:?}"
    );
    kernel_objects::wait_released(objects_before, SLOW).context("after the restart")?;
    let total: usize = filters_after.values().sum();
    Ok(format!(
        "forwarded while dead and after; {total} tc filters before and after; kernel objects {objects_before:?}"
    ))
}

/// SIGTERM: no pin or control socket (Forwarder::stop checks), no tc
/// filter, no program, link or map beyond what was there before the start,
/// no nftables table.
fn stop(t: &Topology, mut routers: Routers, baseline: Objects) -> Result<String> {
    for fwd in [&mut routers.sysnet, &mut routers.sysfw] {
        let status = fwd.stop()?;
        ensure!(status.success(), "exited with {status}");
    }
    let left: Vec<String> = filters(t)?
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(at, n)| format!("{at}: {n}"))
        .collect();
    ensure!(left.is_empty(), "tc filters left: {left:?}");
    for (name, ns, _) in hooked(t) {
        let tables = ns.sh("nft list tables")?;
        ensure!(
            !tables.contains("forwarder"),
            "{name} still has an nftables table of the forwarder: {tables}"
        );
    }
    kernel_objects::wait_released(baseline, SLOW)?;
    let now = kernel_objects::objects()?;
    Ok(format!(
        "no pin, no tc filter, no nftables table; kernel objects {now:?} (before the start {baseline:?})"
    ))
}
