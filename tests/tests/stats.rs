//! `forwarder inspect --stats`: each program's cost per packet and packets
//! from the kernel's run-time statistics, under real traffic through the
//! Qubes-like topology.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddrV4,
    process::Stdio,
    time::Duration,
};

use aya::sys::{Stats, enable_stats};
use forwarder_tests::{
    daemon::{Forwarder, binary, cli},
    netns::Netns,
    sockets::{EchoServer, udp_echo},
    topology::*,
};
use serde_json::Value;

/// UDP exchanges through sys-net: each is one packet through its uplink
/// program and one reply through its downstream program.
const EXCHANGES: u64 = 100;

fn inspect(ns: &Netns, fwd: &Forwarder, extra: &[&str]) -> std::process::Output {
    let pin = fwd.pins.path().display().to_string();
    let mut args = vec!["inspect", "--pin-dir", &pin, "--stats"];
    args.extend_from_slice(extra);
    let out = cli(ns, &args).unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn program<'a>(v: &'a Value, role: &str) -> &'a Value {
    v["program_stats"]["programs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == role)
        .unwrap_or_else(|| panic!("no {role} program in {v}"))
}

fn counters(v: &Value, role: &str) -> (u64, u64) {
    let p = program(v, role);
    (
        p["packets"].as_u64().unwrap(),
        p["run_time_ns"].as_u64().unwrap(),
    )
}

fn sysctl_on() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() != "0")
}

#[test]
fn inspect_stats_shows_each_programs_cost_under_traffic() {
    let t = Topology::build(Offload::On).unwrap();
    let (sysnet, _sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let to = SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT);

    // With the setting off, the table says how to turn it on.
    if !sysctl_on() {
        let out = inspect(&t.sysnet, &sysnet, &[]);
        let table = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "kernel.bpf_stats_enabled = 0",
            "The kernel is not counting",
            "sysctl -w kernel.bpf_stats_enabled=1",
            "BPF_ENABLE_STATS",
        ] {
            assert!(table.contains(needle), "missing {needle:?} in\n{table}");
        }
    }

    // On for as long as this descriptor is open, whatever the setting.
    let stats = enable_stats(Stats::RunTime).unwrap();
    let before: Value =
        serde_json::from_slice(&inspect(&t.sysnet, &sysnet, &["--json"]).stdout).unwrap();
    for _ in 0..EXCHANGES {
        udp_echo(&t.lan, to, Duration::from_secs(5)).unwrap();
    }
    let after: Value =
        serde_json::from_slice(&inspect(&t.sysnet, &sysnet, &["--json"]).stdout).unwrap();
    for role in ["uplink", "downstream"] {
        let (runs0, time0) = counters(&before, role);
        let (runs1, time1) = counters(&after, role);
        assert!(
            runs1 - runs0 >= EXCHANGES,
            "{role}: {} runs counted for {EXCHANGES} packets",
            runs1 - runs0
        );
        let ns = (time1 - time0) as f64 / (runs1 - runs0) as f64;
        // Anything from a few ns (an early return) to well under the
        // exchange's own round trip is a cost; 0 or more is a wrong sum.
        assert!(ns > 1.0 && ns < 100_000.0, "{role}: {ns} ns per packet");
        let p = program(&after, role);
        assert!(p["ns_per_packet"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["id"].as_u64().unwrap() > 0, "{p}");
    }
    assert_ne!(
        program(&after, "uplink")["id"],
        program(&after, "downstream")["id"]
    );

    let table = String::from_utf8_lossy(&inspect(&t.sysnet, &sysnet, &[]).stdout).into_owned();
    assert!(table.contains("program cost"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("uplink") && l.contains(SYSNET_UPLINK)),
        "the uplink program's row names its interface:\n{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("downstream") && l.contains("vif2.0")),
        "{table}"
    );

    // --watch: the cost between two samples, from the second on.
    let mut watch = t
        .sysnet
        .command(binary().unwrap().to_str().unwrap())
        .args([
            "inspect",
            "--pin-dir",
            &sysnet.pins.path().display().to_string(),
            "--stats",
            "--json",
            "--watch",
            "--interval",
            "300ms",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let traffic = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            for _ in 0..20 {
                udp_echo(&t.lan, to, Duration::from_secs(5)).unwrap();
            }
        });
        let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
        let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        sender.join().unwrap();
        first
    });
    let _ = watch.kill();
    let _ = watch.wait();
    let rates = &program(&traffic, "uplink")["rates"];
    assert!(rates["packets_per_sec"].is_number(), "{traffic}");
    drop(stats);
}
