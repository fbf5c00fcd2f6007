//! Safe without the daemon, across upgrades, with the user's config: each
//! observation of the fail-safe issue, tried as a user would.
//! - An expiring rule stops at its deadline while the daemon is dead.
//! - `--save` never removes a rule the file held, never writes a flag's
//!   rule, and keeps the file's mode, comments and layout.
//! - A pinned map of another definition is migrated, not adopted, and one
//!   that only changed size keeps its entries.

use std::{
    net::SocketAddrV4,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use forwarder_tests::{
    daemon::{Forwarder, Router, cli},
    netns::Netns,
    sockets::{EchoServer, TcpTicker},
    topology::*,
    wait::wait_until,
};

/// `forwarder <args>` in `ns`: its exit status and output.
fn run(ns: &Netns, args: &[&str]) -> (bool, String) {
    let out = cli(ns, args).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn an_expiring_rule_stops_at_its_deadline_with_the_daemon_dead() {
    let t = Topology::build(Offload::On).unwrap();
    let (mut sysnet, mut sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
    let _web = EchoServer::start(&t.app, UNFORWARDED_PORT).unwrap();
    let _localsend = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let port = UNFORWARDED_PORT;
    for (ns, fwd, target) in [(&t.sysnet, &sysnet, SYSFW), (&t.sysfw, &sysfw, APP)] {
        let (ok, text) = run(
            ns,
            &[
                "rules",
                "add",
                &format!("tcp:{port}={target}"),
                "--expire",
                "4s",
                "--pin-dir",
                &fwd.pin_arg(),
            ],
        );
        assert!(ok, "{text}");
    }
    let added = Instant::now();
    assert!(t.reachable(port), "the rule forwards before its deadline");
    sysnet.kill_hard().unwrap();
    sysfw.kill_hard().unwrap();
    assert!(
        t.reachable(port),
        "the pinned datapath forwards with the daemons dead"
    );
    std::thread::sleep(Duration::from_secs(4).saturating_sub(added.elapsed()));
    assert!(
        wait_until(Duration::from_secs(2), || !t.reachable(port)),
        "the rule forwarded past its deadline with no daemon to remove it"
    );
    println!(
        "tcp:{port} stopped {:?} after it was added with --expire 4s, both daemons dead",
        added.elapsed()
    );
    assert!(
        t.reachable(LOCALSEND_PORT),
        "the rules without a deadline still forward"
    );
    for (fwd, ns) in [(&mut sysnet, &t.sysnet), (&mut sysfw, &t.sysfw)] {
        fwd.respawn(ns).unwrap();
        fwd.wait_log(&format!("removed rule tcp:{port}"), Duration::from_secs(20))
            .unwrap();
    }
}

#[test]
fn save_never_loses_what_the_file_holds_and_never_writes_flags() {
    let t = Topology::build(Offload::On).unwrap();
    let config = std::env::temp_dir().join(format!("{}-sysnet.toml", t.sysnet.name()));
    let original = format!(
        "# sys-net, by hand\nuplink = \"{SYSNET_UPLINK}\"\n\n# ssh to sys-firewall\n[[forward]]\nspec = \"tcp:2222={SYSFW}\"\ncomment = \"mine\"\n"
    );
    std::fs::write(&config, &original).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
    let config_arg = config.display().to_string();
    let flag_rule = format!("tcp:8081={SYSFW}");
    let args = [
        "--config",
        config_arg.as_str(),
        "--forward",
        flag_rule.as_str(),
    ];
    let mut sysnet = Forwarder::start(&t.sysnet, "sys-net", &args).unwrap();
    let pin = sysnet.pin_arg();
    let rules = |sysnet: &Forwarder| -> Vec<(u64, String)> {
        let out = cli(
            &t.sysnet,
            &["rules", "list", "--json", "--pin-dir", &sysnet.pin_arg()],
        )
        .unwrap();
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut rules: Vec<(u64, String)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["port"].as_u64().unwrap(),
                    r["origin"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        rules.sort();
        rules
    };
    assert_eq!(
        rules(&sysnet),
        [(2222, "file".into()), (8081, "flag".into())],
        "the file's rule and the flag's rule both apply"
    );

    // The reported loss: a saved rule used to replace the file's rules
    // with the flags'.
    let (ok, text) = run(
        &t.sysnet,
        &[
            "rules",
            "add",
            &format!("tcp:9090={SYSFW}"),
            "--save",
            "--pin-dir",
            &pin,
        ],
    );
    assert!(ok, "{text}");
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(
        saved.starts_with(&original),
        "the user's text is intact:\n{saved}"
    );
    assert!(
        saved.contains(&format!("spec = \"tcp:9090={SYSFW}\"")),
        "{saved}"
    );
    assert!(
        !saved.contains("8081"),
        "a flag's rule was written: {saved}"
    );
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o640,
        "the file's mode changed"
    );

    // Deleting: a flag's rule cannot be deleted from the file; a file rule
    // deleted live only says it comes back.
    let (ok, text) = run(
        &t.sysnet,
        &["rules", "del", "tcp:8081", "--save", "--pin-dir", &pin],
    );
    assert!(!ok && text.contains("--forward flag"), "{text}");
    let (ok, text) = run(&t.sysnet, &["rules", "del", "tcp:2222", "--pin-dir", &pin]);
    assert!(ok && text.contains("returns at the next start"), "{text}");
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("tcp:2222")
    );
    let (ok, text) = run(
        &t.sysnet,
        &[
            "rules",
            "add",
            &format!("tcp:7070={SYSFW}"),
            "--expire",
            "1h",
            "--save",
            "--pin-dir",
            &pin,
        ],
    );
    assert!(ok, "{text}");
    let (ok, text) = run(
        &t.sysnet,
        &["rules", "del", "tcp:9090", "--save", "--pin-dir", &pin],
    );
    assert!(ok && text.contains("removed it from"), "{text}");
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(
        saved.contains("tcp:2222") && saved.contains("mine"),
        "{saved}"
    );
    assert!(
        saved.contains("tcp:7070") && saved.contains("expires = "),
        "{saved}"
    );
    assert!(!saved.contains("tcp:9090"), "{saved}");

    // What the file and the flags say is what the next start runs.
    sysnet.stop().unwrap();
    sysnet.respawn(&t.sysnet).unwrap();
    sysnet.wait_ready(Duration::from_secs(20)).unwrap();
    assert_eq!(
        rules(&sysnet),
        [
            (2222, "file".into()),
            (7070, "file".into()),
            (8081, "flag".into())
        ]
    );
    let _ = std::fs::remove_file(&config);
}

#[test]
fn a_pin_of_another_definition_is_migrated_not_adopted() {
    let t = Topology::build(Offload::On).unwrap();
    // What another build left: a per-CPU counter array of 3 entries where
    // this one defines one per reason.
    let sysnet = Forwarder::start_over(
        &t.sysnet,
        "sys-net",
        &["--uplink", SYSNET_UPLINK, "--localsend", &SYSFW.to_string()],
        |pins| {
            let maps = pins.join("maps");
            std::fs::create_dir_all(&maps)?;
            PerCpuArray::<MapData, u64>::create(3, 0)?.pin(maps.join("REASON_COUNTERS"))?;
            Ok(())
        },
    )
    .unwrap();
    sysnet
        .wait_log(
            "replaced the pinned map REASON_COUNTERS",
            Duration::from_secs(5),
        )
        .unwrap();
    // A reason past the third is counted.
    let before = sysnet
        .reason(forwarder_common::reason::Reason::NoRule)
        .unwrap();
    assert!(!t.reachable(UNFORWARDED_PORT));
    assert!(
        wait_until(Duration::from_secs(2), || {
            sysnet
                .reason(forwarder_common::reason::Reason::NoRule)
                .unwrap()
                > before
        }),
        "no_rule (reason {}) was not counted",
        forwarder_common::reason::Reason::NoRule as u32
    );
    assert!(
        !sysnet.pins.path().join("stale").exists(),
        "the old map's pin was removed"
    );
}

#[test]
fn a_resized_flow_table_keeps_its_flows_across_a_crash() {
    let t = Topology::build(Offload::On).unwrap();
    let mut sysnet =
        Forwarder::start_localsend(&t, Router::SysNet, &["--flow-table-size", "4096"]).unwrap();
    let _sysfw = Forwarder::start_localsend(&t, Router::SysFirewall, &[]).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let ticker = TcpTicker::start(
        &t.lan,
        SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT),
        Duration::from_millis(50),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || ticker.echoed() >= 3));
    sysnet.kill_hard().unwrap();
    sysnet
        .respawn_with(
            &t.sysnet,
            &["--uplink", SYSNET_UPLINK, "--localsend", &SYSFW.to_string()],
        )
        .unwrap();
    sysnet.wait_ready(Duration::from_secs(20)).unwrap();
    sysnet
        .wait_log("replaced the pinned map FLOWS", Duration::from_secs(5))
        .unwrap();
    let log = sysnet.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("replaced the pinned map FLOWS"))
        .unwrap();
    assert!(
        line.contains("4096 entries") && !line.contains("entries carried over: 0"),
        "{line}"
    );
    let echoed = ticker.echoed();
    assert!(wait_until(Duration::from_secs(3), || ticker.echoed() > echoed + 5));
    let ticks = ticker.finish().unwrap();
    assert!(ticks.missing().is_empty(), "{:?}", ticks.missing());
    assert!(
        ticks.longest_gap() < Duration::from_secs(1),
        "the flow stalled {:?} across the migration",
        ticks.longest_gap()
    );
    println!("{line}; longest gap {:?}", ticks.longest_gap());
    let out = cli(
        &t.sysnet,
        &["inspect", "--json", "--pin-dir", &sysnet.pin_arg()],
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["flows"]["capacity"], 65_536);
}
