//! The daemon under load, under attack on its control socket, and when it
//! fails: what issue 17 found, each tried with real processes.
//! - A million flows: sweeps, `rules list` and rule changes walk the table
//!   off the event loop, so the watchdog is fed throughout; a flow the
//!   datapath refreshes while a sweep runs is kept.
//! - A control request line without end is cut off at 64 KiB, and neither
//!   it nor an idle client holds up anyone else's request.
//! - `forwarder teardown` removes what a killed daemon left; a restart
//!   removes what it no longer attaches.
//! - A restart that fails leaves the killed daemon's datapath forwarding;
//!   flows opened while the flow table migrates survive the migration.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use forwarder::{clock, flow_table::FlowTable};
use forwarder_common::{
    flow::FLOW_REPLIED,
    maps::{FlowEntry, FlowKey, PROTO_UDP},
};
use forwarder_tests::{
    daemon::{Forwarder, Router, binary, cli},
    flood, kernel_objects,
    netns::Netns,
    notify::NotifyRecorder,
    sockets::{EchoServer, TcpTicker},
    topology::*,
    wait::{ms, until_stable, wait_until},
};

/// `forwarder <args>` in `ns` with `env`: whether it succeeded, and its
/// output.
fn run_with(ns: &Netns, env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let out = ns
        .command(binary().unwrap().to_str().unwrap())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn run(ns: &Netns, args: &[&str]) -> (bool, String) {
    run_with(ns, &[], args)
}

/// The BPF filters on `dev`'s ingress hook.
fn bpf_filters(ns: &Netns, dev: &str) -> Vec<String> {
    forwarder_tests::tc::ingress_filters(ns.name(), dev)
        .unwrap()
        .into_iter()
        .filter(|l| l.contains(" bpf "))
        .collect()
}

fn has_forwarder_table(ns: &Netns) -> bool {
    ns.sh("nft list tables").unwrap().contains("forwarder")
}

/// The rule id of udp:53317, where LocalSend's flows are.
fn localsend_udp_rule(fwd: &Forwarder) -> u32 {
    fwd.tables().unwrap().installed().unwrap()[&(PROTO_UDP, LOCALSEND_PORT)]
        .1
        .id
}

/// A UDP flow of rule `rule_id` last seen at `seen_ns`, answered.
fn udp_flow(rule_id: u32, seen_ns: u64) -> FlowEntry {
    FlowEntry {
        rule_id,
        state: FLOW_REPLIED,
        created_ns: seen_ns,
        seen_ns,
        ..Default::default()
    }
}

/// Seen at boot: long expired.
const LONG_AGO: u64 = 1;

const MILLION: u32 = 1_000_000;
/// Room for a million flows and the tests' extra ones with LRU's slack.
const BIG_TABLE: &str = "1200000";

/// The flows `rules list` counts for udp:53317, and how long it took.
fn listed_udp_flows(ns: &Netns, fwd: &Forwarder) -> (u64, Duration) {
    let started = Instant::now();
    let out = cli(
        ns,
        &["rules", "list", "--json", "--pin-dir", &fwd.pin_arg()],
    )
    .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = rules
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["proto"] == "udp" && r["port"] == LOCALSEND_PORT)
        .and_then(|r| r["flows"].as_u64())
        .unwrap();
    (flows, took)
}

/// How many expired flows each sweep in a daemon's debug log removed.
fn swept_counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|line| line.split_once("swept ")?.1.split_once(' '))
        .filter_map(|(n, _)| n.parse().ok())
        .collect()
}

#[test]
fn a_million_flows_never_keep_the_daemon_from_feeding_the_watchdog() {
    let t = Topology::build(Offload::On).unwrap();
    let mut sysnet =
        Forwarder::start_localsend(&t, Router::SysNet, &["--flow-table-size", BIG_TABLE]).unwrap();
    let rule = localsend_udp_rule(&sysnet);
    let pins = sysnet.pins.path().to_path_buf();
    let live = flood::flows(
        0,
        MILLION,
        PROTO_UDP,
        LOCALSEND_PORT,
        udp_flow(rule, clock::boot_ns()),
    );
    let filled = Instant::now();
    assert_eq!(flood::fill(&pins, &live).unwrap(), MILLION as usize);
    println!(
        "filled the flow table with {MILLION} flows in {}",
        ms(filled.elapsed())
    );

    // The same instance again, under a watchdog of 1 s as systemd runs it
    // (pings every 500 ms), adopting the full table.
    sysnet.kill_hard().unwrap();
    let systemd = NotifyRecorder::bind("million").unwrap();
    sysnet.set_env("NOTIFY_SOCKET", systemd.path().to_str().unwrap());
    sysnet.set_env("WATCHDOG_USEC", "1000000");
    sysnet.set_env("RUST_LOG", "info,forwarder::daemon=debug");
    sysnet.respawn(&t.sysnet).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || systemd.ready_at().is_some()),
        "no READY=1; log:\n{}",
        sysnet.log_text()
    );
    let ready = systemd.ready_at().unwrap();

    for _ in 0..3 {
        let (flows, took) = listed_udp_flows(&t.sysnet, &sysnet);
        assert_eq!(flows, u64::from(MILLION), "live flows of udp:53317");
        println!("rules list counted {flows} flows in {}", ms(took));
    }
    // All expire at once, written just after a sweep (every 10 s), so the
    // next one finds the million. A fill slower than the interval (a loaded
    // host) leaves some for the sweep after: the total is what counts.
    let sweeps = |log: &str| swept_counts(log).len();
    let before = sweeps(&sysnet.log_text());
    assert!(
        wait_until(Duration::from_secs(15), || sweeps(&sysnet.log_text())
            > before),
        "no sweep within 15 s; log:\n{}",
        sysnet.log_text()
    );
    let after = sweeps(&sysnet.log_text());
    let expired = flood::flows(
        0,
        MILLION,
        PROTO_UDP,
        LOCALSEND_PORT,
        udp_flow(rule, LONG_AGO),
    );
    flood::fill(&pins, &expired).unwrap();
    let swept_since = || -> u64 { swept_counts(&sysnet.log_text())[after..].iter().sum() };
    assert!(
        wait_until(Duration::from_secs(40), || swept_since()
            >= u64::from(MILLION)),
        "{} of {MILLION} flows swept in 40 s; log:\n{}",
        swept_since(),
        sysnet.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    let silence = systemd.longest_silence(ready);
    let log = sysnet.log_text();
    for line in log.lines().filter(|l| l.contains("swept")) {
        println!("{line}");
    }
    println!(
        "{} watchdog pings over {}; longest silence {}",
        systemd.pings().iter().filter(|at| **at >= ready).count(),
        ms(ready.elapsed()),
        ms(silence)
    );
    assert!(
        silence < Duration::from_secs(1),
        "no watchdog ping for {}: systemd would have killed the daemon",
        ms(silence)
    );
    let left = FlowTable::of(&flood::flow_map(&pins).unwrap())
        .count()
        .unwrap();
    assert_eq!(left, 0, "expired flows left after the sweep");
    sysnet.stop().unwrap();
}

#[test]
fn a_flow_refreshed_while_a_sweep_runs_is_kept() {
    let t = Topology::build(Offload::On).unwrap();
    let sysnet =
        Forwarder::start_localsend(&t, Router::SysNet, &["--flow-table-size", BIG_TABLE]).unwrap();
    let rule = localsend_udp_rule(&sysnet);
    let pins = sysnet.pins.path().to_path_buf();
    let expired = flood::flows(
        0,
        MILLION,
        PROTO_UDP,
        LOCALSEND_PORT,
        udp_flow(rule, LONG_AGO),
    );
    let victims = flood::flows(
        MILLION,
        1000,
        PROTO_UDP,
        LOCALSEND_PORT,
        udp_flow(rule, LONG_AGO),
    );
    flood::fill(&pins, &expired).unwrap();
    flood::fill(&pins, &victims).unwrap();
    let sentinels: Vec<FlowKey> = expired.iter().step_by(15_625).map(|(k, _)| *k).collect();

    // The moment a sweep removes its first flow, the victims' peers send
    // again, as the datapath would record it.
    let map = flood::flow_map(&pins).unwrap();
    let table = FlowTable::of(&map);
    let deadline = Instant::now() + Duration::from_secs(15);
    while sentinels.iter().all(|k| table.get(k).unwrap().is_some()) {
        assert!(Instant::now() < deadline, "no sweep within 15 s");
    }
    let refreshed: Vec<(FlowKey, FlowEntry)> = victims
        .iter()
        .map(|(k, _)| (*k, udp_flow(rule, clock::boot_ns())))
        .collect();
    flood::fill(&pins, &refreshed).unwrap();
    let refreshed_at = Instant::now();

    let (left, settled) = until_stable(Duration::from_secs(30), Duration::from_secs(2), || {
        table.count().unwrap()
    });
    assert!(settled, "the table never settled ({left} flows)");
    let lost: Vec<&FlowKey> = refreshed
        .iter()
        .filter(|(k, e)| table.get(k).unwrap() != Some(*e))
        .map(|(k, _)| k)
        .collect();
    println!(
        "{} of {} refreshed flows lost, {left} flows left, settled {} after the refresh",
        lost.len(),
        refreshed.len(),
        ms(refreshed_at.elapsed())
    );
    assert!(
        lost.is_empty(),
        "the sweep removed refreshed flows: {:?}",
        &lost[..lost.len().min(5)]
    );
    assert_eq!(left, refreshed.len() as u64, "expired flows left");
}

/// A client that sends a request line that never ends: how much the
/// daemon took before it answered and hung up, and what it answered.
fn endless_request(socket: &Path, cap: usize) -> (usize, bool, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let answer = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = reader.read_to_string(&mut text);
        text
    });
    stream.write_all(br#"{"op":"list","comment":""#).unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0;
    let cut_off = loop {
        if sent >= cap {
            break false;
        }
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break true,
        }
    };
    drop(stream);
    (sent, cut_off, answer.join().unwrap())
}

#[test]
fn an_endless_control_request_is_cut_off_and_holds_up_no_one() {
    let t = Topology::build(Offload::On).unwrap();
    let sysnet = Forwarder::start_localsend(&t, Router::SysNet, &[]).unwrap();
    let socket = forwarder::control::socket_path(sysnet.pins.path());
    let mut idle = UnixStream::connect(&socket).unwrap();
    let idle_since = Instant::now();

    let cap = 256 << 20;
    let started = Instant::now();
    let (sent, cut_off, answer) = endless_request(&socket, cap);
    println!(
        "endless request: {} KiB sent in {} before the daemon {}; it answered {answer:?}",
        sent >> 10,
        ms(started.elapsed()),
        if cut_off {
            "hung up"
        } else {
            "was still reading (the client gave up)"
        }
    );
    assert!(
        cut_off && sent < 4 << 20,
        "the daemon read {} KiB of one request",
        sent >> 10
    );
    assert!(answer.contains("64 KiB"), "{answer}");

    // The idle client still holds its connection: others are answered.
    let (ok, text) = run(
        &t.sysnet,
        &["rules", "list", "--pin-dir", &sysnet.pin_arg()],
    );
    assert!(ok && text.contains("udp:53317"), "{text}");
    let mut answer = String::new();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.read_to_string(&mut answer).unwrap();
    println!(
        "the idle client was answered after {}: {answer:?}",
        ms(idle_since.elapsed())
    );
    assert!(answer.contains("no request within"), "{answer}");
}

/// Every pin under `dir` with its inode: the same objects at the same
/// places, or not.
fn pin_inodes(dir: &Path) -> BTreeMap<PathBuf, u64> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, u64>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.insert(path.clone(), std::fs::metadata(&path).unwrap().ino());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

#[test]
fn teardown_removes_everything_a_killed_daemon_left() {
    let idle = kernel_objects::settled().unwrap();
    let t = Topology::build(Offload::On).unwrap();
    // sys-net with clsact filters, which no process holds; sys-firewall
    // with pinned TCX links.
    let mut sysnet =
        Forwarder::start_localsend(&t, Router::SysNet, &["--tc-hook", "clsact"]).unwrap();
    let mut sysfw = Forwarder::start_localsend(&t, Router::SysFirewall, &[]).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    assert!(t.reachable(LOCALSEND_PORT));
    sysnet.kill_hard().unwrap();
    sysfw.kill_hard().unwrap();
    assert!(
        t.reachable(LOCALSEND_PORT),
        "the killed daemons' datapath forwards"
    );
    assert_eq!(bpf_filters(&t.sysnet, SYSNET_UPLINK).len(), 1);
    assert_eq!(bpf_filters(&t.sysnet, "vif2.0").len(), 1);

    // As ExecStopPost= after a crash: systemd restarts the daemon, which
    // adopts what is there, so nothing goes.
    let (ok, text) = run_with(
        &t.sysnet,
        &[("SERVICE_RESULT", "signal")],
        &[
            "teardown",
            "--unless-failed",
            "--pin-dir",
            &sysnet.pin_arg(),
        ],
    );
    assert!(ok && text.contains("nothing removed"), "{text}");
    assert!(t.reachable(LOCALSEND_PORT), "removed after a crash");

    // After a stop request that ended in SIGKILL, and by hand.
    for (ns, fwd, env) in [
        (&t.sysnet, &sysnet, vec![("SERVICE_RESULT", "timeout")]),
        (&t.sysfw, &sysfw, vec![]),
    ] {
        let (ok, text) = run_with(
            ns,
            &env,
            &["teardown", "--unless-failed", "--pin-dir", &fwd.pin_arg()],
        );
        println!("teardown in {}:\n{text}", ns.name());
        assert!(ok, "{text}");
        assert!(
            fwd.pins.contents().is_empty(),
            "pins left: {:?}",
            fwd.pins.contents()
        );
        assert!(
            !has_forwarder_table(ns),
            "the nftables table is left in {}",
            ns.name()
        );
    }
    for dev in [SYSNET_UPLINK, "vif2.0"] {
        assert!(
            bpf_filters(&t.sysnet, dev).is_empty(),
            "a filter left on {dev}"
        );
    }
    kernel_objects::wait_released(idle, Duration::from_secs(5)).unwrap();
    assert!(!t.reachable(LOCALSEND_PORT), "still forwarding");
    let (ok, text) = run(&t.sysnet, &["teardown", "--pin-dir", &sysnet.pin_arg()]);
    assert!(
        ok && text.contains("nothing of a forwarder instance"),
        "{text}"
    );

    // A running daemon is not torn down under its feet.
    let running = Forwarder::start_localsend(&t, Router::SysNet, &[]).unwrap();
    let _running_fw = Forwarder::start_localsend(&t, Router::SysFirewall, &[]).unwrap();
    let (ok, text) = run(&t.sysnet, &["teardown", "--pin-dir", &running.pin_arg()]);
    assert!(
        !ok && text.contains("is running") && text.contains("stop it"),
        "{text}"
    );
    assert!(
        t.reachable(LOCALSEND_PORT),
        "the running daemon stopped forwarding"
    );
}

#[test]
fn a_restart_removes_what_it_no_longer_attaches() {
    let t = Topology::build(Offload::On).unwrap();
    let _sysnet = Forwarder::start_localsend(&t, Router::SysNet, &[]).unwrap();
    let mut sysfw =
        Forwarder::start_localsend(&t, Router::SysFirewall, &["--tc-hook", "clsact"]).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let vif3 = t.sysfw.link("vif3.0").unwrap().index;
    let vif4 = t.sysfw.link("vif4.0").unwrap().index;
    let macs = |fwd: &Forwarder| -> Vec<u32> {
        fwd.tables()
            .unwrap()
            .downstream_macs()
            .unwrap()
            .into_keys()
            .collect()
    };
    assert_eq!(macs(&sysfw), [vif3, vif4]);
    assert_eq!(bpf_filters(&t.sysfw, "vif4.0").len(), 1);

    // While the daemon is dead the app VM restarts (its vif comes back
    // under another name and index), and the next start is told to leave
    // app2's vif4.0 alone and to attach with TCX links instead.
    sysfw.kill_hard().unwrap();
    let new_vif = t.restart_app_vif("vif3.0").unwrap();
    let new_index = t.sysfw.link(&new_vif).unwrap().index;
    sysfw
        .respawn_with(
            &t.sysfw,
            &[
                "--uplink",
                SYSFW_UPLINK,
                "--localsend",
                &APP.to_string(),
                "--tc-hook",
                "tcx",
                "--downstream",
                r"^vif[0-9]{2,}\.0$",
            ],
        )
        .unwrap();
    sysfw.wait_ready(Duration::from_secs(20)).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || macs(&sysfw) == [new_index]),
        "DOWNSTREAM_MACS holds {:?}; only {new_vif} ({new_index}) is attached (vif3.0 was {vif3}, vif4.0 is {vif4}); log:\n{}",
        macs(&sysfw),
        sysfw.log_text()
    );
    for (dev, why) in [
        ("vif4.0", "no longer matched"),
        (SYSFW_UPLINK, "now attached with a TCX link"),
    ] {
        assert_eq!(
            bpf_filters(&t.sysfw, dev),
            Vec::<String>::new(),
            "the clsact filter of {dev}, {why}, is left"
        );
    }
    assert!(
        t.reachable(LOCALSEND_PORT),
        "forwarding to the app's new vif"
    );
}

/// A PATH holding only `ip` (the harness enters namespaces with it): a
/// daemon started with it finds no `nft`. Removed on drop.
struct PathWithoutNft(PathBuf);

impl PathWithoutNft {
    fn new() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("fwt-no-nft-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ip = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("ip"))
            .find(|p| p.is_file())
            .ok_or_else(|| std::io::Error::other("no `ip` on PATH"))?;
        let link = dir.join("ip");
        if !link.exists() {
            std::os::unix::fs::symlink(ip, link)?;
        }
        Ok(PathWithoutNft(dir))
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("temp dir is UTF-8")
    }
}

impl Drop for PathWithoutNft {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_failed_restart_leaves_the_killed_daemon_s_datapath_forwarding() {
    let t = Topology::build(Offload::On).unwrap();
    let _sysfw = Forwarder::start_localsend(&t, Router::SysFirewall, &[]).unwrap();
    let args = ["--uplink", SYSNET_UPLINK, "--localsend", &SYSFW.to_string()];
    let mut sysnet = Forwarder::start(&t.sysnet, "sys-net", &args).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let ticker = TcpTicker::start(
        &t.lan,
        SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT),
        Duration::from_millis(50),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || ticker.echoed() >= 3));
    sysnet.kill_hard().unwrap();
    let before = pin_inodes(sysnet.pins.path());

    // The restart (with another flow table size, so the table migrates)
    // fails after its maps load: it finds no `nft` to install its table
    // with. (A relay group over the host's limit no longer gets this far:
    // the configuration check refuses it before anything loads.)
    let mut failing = args.to_vec();
    failing.extend(["--flow-table-size", "4096"]);
    let without_nft = PathWithoutNft::new().unwrap();
    sysnet.set_env("PATH", without_nft.path());
    sysnet.respawn_with(&t.sysnet, &failing).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || !sysnet.running()),
        "the restart did not fail; log:\n{}",
        sysnet.log_text()
    );
    let log = sysnet.log_text();
    println!("the failed restart:\n{log}");
    assert!(log.contains("running nft"), "{log}");
    assert!(log.contains("replaced the pinned map FLOWS"), "{log}");
    assert_eq!(
        pin_inodes(sysnet.pins.path()),
        before,
        "the failed start changed the pins"
    );
    let echoed = ticker.echoed();
    assert!(
        wait_until(Duration::from_secs(3), || ticker.echoed() > echoed + 10),
        "the flow stopped after the failed restart"
    );
    assert!(
        t.reachable(LOCALSEND_PORT),
        "a new connection is not forwarded"
    );

    // Fixed, the next start adopts it all.
    sysnet.set_env("PATH", &std::env::var("PATH").unwrap());
    let _ = sysnet.kill_hard();
    sysnet.respawn_with(&t.sysnet, &args).unwrap();
    sysnet.wait_ready(Duration::from_secs(20)).unwrap();
    sysnet
        .wait_log(
            "adopted the uplink program's attachment",
            Duration::from_secs(5),
        )
        .unwrap();
    let echoed = ticker.echoed();
    assert!(wait_until(Duration::from_secs(3), || ticker.echoed() > echoed + 10));
    let ticks = ticker.finish().unwrap();
    assert!(ticks.missing().is_empty(), "{:?}", ticks.missing());
    println!("longest gap of the flow: {}", ms(ticks.longest_gap()));
    assert!(ticks.longest_gap() < Duration::from_secs(1));
}

/// A UDP socket in `ns` on `port`.
fn udp(ns: &Netns, port: u16) -> UdpSocket {
    ns.run(|| {
        let socket = UdpSocket::bind(("0.0.0.0", port)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        socket
    })
}

/// The next datagram carrying `text`, with its source, within `timeout`.
fn receive(socket: &UdpSocket, text: &str, timeout: Duration) -> Option<SocketAddr> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        if let Ok((n, from)) = socket.recv_from(&mut buf)
            && &buf[..n] == text.as_bytes()
        {
            return Some(from);
        }
    }
    None
}

/// An `nft` that, the first time, waits for `release` to appear after
/// creating `reached`: a start held between loading its maps and
/// attaching its programs.
fn held_nft(dir: &Path) -> (PathBuf, PathBuf) {
    let real = forwarder_tests::netns::sh("command -v nft").unwrap();
    let (reached, release) = (dir.join("reached"), dir.join("release"));
    let script = format!(
        "#!/bin/sh\ntouch '{}'\nwhile [ ! -e '{}' ]; do sleep 0.05; done\nexec '{}' \"$@\"\n",
        reached.display(),
        release.display(),
        real.trim()
    );
    let nft = dir.join("nft");
    std::fs::write(&nft, script).unwrap();
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (reached, release)
}

#[test]
fn flows_opened_while_the_flow_table_migrates_survive() {
    let t = Topology::build(Offload::On).unwrap();
    let _sysfw = Forwarder::start_localsend(&t, Router::SysFirewall, &[]).unwrap();
    let mut sysnet =
        Forwarder::start_localsend(&t, Router::SysNet, &["--flow-table-size", "4096"]).unwrap();
    let app = udp(&t.app, LOCALSEND_PORT);
    let (lan_before, lan_gap) = (udp(&t.lan, 40001), udp(&t.lan, 40002));
    let to_lan = |port| SocketAddr::from((LAN_PEER, port));
    let listen = SocketAddr::from((SYSNET_LAN, LOCALSEND_PORT));
    lan_before.send_to(b"before", listen).unwrap();
    assert_eq!(
        receive(&app, "before", Duration::from_secs(3)),
        Some(to_lan(40001))
    );
    sysnet.kill_hard().unwrap();

    // The restart with the default size migrates the table and is held in
    // nft, after the first copy and before any program is swapped.
    let dir = std::env::temp_dir().join(format!("fwd-held-nft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (reached, release) = held_nft(&dir);
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
    sysnet.set_env("PATH", &path);
    sysnet
        .respawn_with(
            &t.sysnet,
            &["--uplink", SYSNET_UPLINK, "--localsend", &SYSFW.to_string()],
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || reached.exists()),
        "the restart never ran nft; log:\n{}",
        sysnet.log_text()
    );
    let copied = sysnet.log_text();
    let line = copied
        .lines()
        .find(|l| l.contains("replaced the pinned map FLOWS"))
        .unwrap_or_else(|| panic!("the flow table was not migrated; log:\n{copied}"));
    println!("held after: {line}");

    // A LAN peer opens a flow now, through the killed daemon's programs.
    lan_gap.send_to(b"gap", listen).unwrap();
    assert_eq!(
        receive(&app, "gap", Duration::from_secs(3)),
        Some(to_lan(40002))
    );
    std::fs::write(&release, b"").unwrap();
    sysnet.wait_ready(Duration::from_secs(20)).unwrap();
    for line in sysnet
        .log_text()
        .lines()
        .filter(|l| l.contains("carried over"))
    {
        println!("{line}");
    }

    // The app answers both flows; each answer must leave from the
    // forwarded port, which only a flow in the new table gives it.
    for (port, text, lan) in [
        (40001, "before-reply", &lan_before),
        (40002, "gap-reply", &lan_gap),
    ] {
        app.send_to(text.as_bytes(), to_lan(port)).unwrap();
        assert_eq!(
            receive(lan, text, Duration::from_secs(3)),
            Some(listen),
            "{text}: the flow of LAN port {port} was lost in the migration; log:\n{}",
            sysnet.log_text()
        );
    }
    sysnet.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
