//! The operator's side on a live topology: `inspect` (table, JSON, watch),
//! `rules add/del/list` through the control socket with expiry and --save,
//! and the errors people will hit.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddrV4,
    process::Stdio,
    time::Duration,
};

use forwarder_tests::{
    daemon::{Forwarder, binary, cli},
    netns::Netns,
    sockets::{EchoServer, tcp_echo},
    topology::*,
    wait::wait_until,
};
use serde_json::Value;

fn pin(fwd: &Forwarder) -> String {
    fwd.pins.path().display().to_string()
}

fn json(ns: &Netns, args: &[&str]) -> Value {
    let out = cli(ns, args).unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn stderr_of(ns: &Netns, args: &[&str]) -> (i32, String) {
    let out = cli(ns, args).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_reports_a_live_instance() {
    let t = Topology::build(Offload::On).unwrap();
    let (sysnet, _sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    tcp_echo(
        &t.lan,
        SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT),
        None,
        Duration::from_secs(5),
    )
    .unwrap();

    let v = json(
        &t.sysnet,
        &["inspect", "--pin-dir", &pin(&sysnet), "--json"],
    );
    assert_eq!(v["version"], 2);
    assert_eq!(v["uplink"]["name"], SYSNET_UPLINK);
    assert_eq!(v["uplink"]["address"], format!("{SYSNET_LAN}/24"));
    assert_eq!(v["uplink"]["usable"], true);
    let rules = v["rules"].as_array().unwrap();
    let tcp = rules
        .iter()
        .find(|r| r["proto"] == "tcp" && r["port"] == LOCALSEND_PORT)
        .expect("tcp rule");
    assert_eq!(tcp["target"], SYSFW.to_string());
    assert_eq!(tcp["allow_from"], "auto");
    assert!(
        tcp["packets_in"].as_u64().unwrap() > 0 && tcp["packets_out"].as_u64().unwrap() > 0,
        "{tcp}"
    );
    assert!(tcp["bytes_in"].as_u64().unwrap() > 0);
    assert!(
        tcp["flows"].as_u64().unwrap() >= 1,
        "the echo's flow: {tcp}"
    );
    assert!(v["flows"]["capacity"].as_u64().unwrap() >= 65_536);
    let relay = &v["relays"][0];
    assert_eq!(relay["group"], LOCALSEND_GROUP.to_string());
    assert_eq!(relay["targets"][0], SYSFW.to_string());
    assert_eq!(relay["rate_limit"], 25);
    let reasons = v["reasons"].as_array().unwrap();
    assert_eq!(
        reasons.len(),
        forwarder_common::reason::Reason::COUNT as usize
    );
    assert!(
        reasons
            .iter()
            .any(|r| r["name"] == "no_rule" && r["disposition"] == "passed")
    );
    let ifaces = v["interfaces"].as_array().unwrap();
    assert!(
        ifaces
            .iter()
            .any(|i| i["role"] == "uplink" && i["name"] == SYSNET_UPLINK && i["hook"] == "tcx"),
        "{ifaces:?}"
    );
    assert!(
        ifaces
            .iter()
            .any(|i| i["role"] == "downstream" && i["name"] == "vif2.0"),
        "{ifaces:?}"
    );

    let table = cli(&t.sysnet, &["inspect", "--pin-dir", &pin(&sysnet)]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    for needle in [
        "uplink      wls6f0",
        "tcp:53317",
        "10.137.0.5:53317",
        "224.0.0.167:53317",
        "skip and drop reasons",
    ] {
        assert!(table.contains(needle), "missing {needle:?} in\n{table}");
    }

    // --watch --json: one object per interval, with rates from the second on.
    let mut watch = t
        .sysnet
        .command(binary().unwrap().to_str().unwrap())
        .args([
            "inspect",
            "--pin-dir",
            &pin(&sysnet),
            "--json",
            "--watch",
            "--interval",
            "200ms",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        first["rules"][0]["rates"]["packets_in"].is_number(),
        "{first}"
    );
}

#[test]
fn inspect_without_an_instance_says_so() {
    let ns = Netns::new("noinstance").unwrap();
    let (code, err) = stderr_of(&ns, &["inspect", "--pin-dir", "/run/forwarder-tests/none"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no forwarder instance at /run/forwarder-tests/none"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (code, err) = stderr_of(
        &ns,
        &["rules", "list", "--pin-dir", "/run/forwarder-tests/none"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("no forwarder instance answers"), "{err}");
}

#[test]
fn rules_are_added_listed_expired_and_deleted_live() {
    let t = Topology::build(Offload::On).unwrap();
    let (sysnet, sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
    let _server = EchoServer::start(&t.app, UNFORWARDED_PORT).unwrap();
    let port = UNFORWARDED_PORT.to_string();
    assert!(!t.reachable(UNFORWARDED_PORT));

    for (ns, fwd, target) in [(&t.sysnet, &sysnet, SYSFW), (&t.sysfw, &sysfw, APP)] {
        let out = cli(
            ns,
            &[
                "rules",
                "add",
                &format!("tcp:{port}={target}"),
                "--comment",
                "web",
                "--pin-dir",
                &pin(fwd),
            ],
        )
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("added tcp:8080"));
    }
    assert!(t.reachable(UNFORWARDED_PORT), "the live rule forwards");

    let list = json(
        &t.sysfw,
        &["rules", "list", "--json", "--pin-dir", &pin(&sysfw)],
    );
    let web = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["port"] == UNFORWARDED_PORT)
        .unwrap()
        .clone();
    assert_eq!(
        (web["origin"].as_str(), web["comment"].as_str()),
        (Some("live"), Some("web"))
    );
    assert!(web["packets_in"].as_u64().unwrap() > 0);
    assert!(web["expires_in_secs"].is_null());
    let table = cli(&t.sysfw, &["rules", "list", "--pin-dir", &pin(&sysfw)]).unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("tcp:8080"));

    // Errors name the problem.
    let (code, err) = stderr_of(
        &t.sysfw,
        &[
            "rules",
            "add",
            &format!("tcp:{port}=10.137.0.99"),
            "--pin-dir",
            &pin(&sysfw),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("both forward tcp:8080"), "{err}");
    let (_, err) = stderr_of(
        &t.sysfw,
        &["rules", "del", "udp:9999", "--pin-dir", &pin(&sysfw)],
    );
    assert!(err.contains("no rule udp:9999"), "{err}");
    let (_, err) = stderr_of(
        &t.sysfw,
        &[
            "rules",
            "del",
            "tcp:8080",
            "--save",
            "--pin-dir",
            &pin(&sysfw),
        ],
    );
    assert!(err.contains("without --config"), "{err}");
    let still = json(
        &t.sysfw,
        &["rules", "list", "--json", "--pin-dir", &pin(&sysfw)],
    );
    assert!(
        still
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["port"] == UNFORWARDED_PORT),
        "a refused save changes nothing"
    );

    let out = cli(
        &t.sysnet,
        &[
            "rules",
            "del",
            &format!("tcp:{port}"),
            "--pin-dir",
            &pin(&sysnet),
        ],
    )
    .unwrap();
    assert!(out.status.success());
    assert!(
        !t.reachable(UNFORWARDED_PORT),
        "deleted rules stop forwarding at once"
    );

    // An expiring rule forwards until its time is up, then disappears.
    let out = cli(
        &t.sysnet,
        &[
            "rules",
            "add",
            &format!("tcp:{port}={SYSFW}"),
            "--expire",
            "2s",
            "--pin-dir",
            &pin(&sysnet),
        ],
    )
    .unwrap();
    assert!(out.status.success());
    let listed = json(
        &t.sysnet,
        &["rules", "list", "--json", "--pin-dir", &pin(&sysnet)],
    );
    let expiring = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["port"] == UNFORWARDED_PORT)
        .unwrap()
        .clone();
    assert!(
        expiring["expires_in_secs"].as_u64().unwrap() <= 2,
        "{expiring}"
    );
    assert!(t.reachable(UNFORWARDED_PORT));
    assert!(
        wait_until(Duration::from_secs(6), || {
            let listed = json(
                &t.sysnet,
                &["rules", "list", "--json", "--pin-dir", &pin(&sysnet)],
            );
            !listed
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["port"] == UNFORWARDED_PORT)
        }),
        "the rule did not expire"
    );
    assert!(
        !t.reachable(UNFORWARDED_PORT),
        "an expired rule no longer forwards"
    );
    assert!(sysnet.log_text().contains("expired and was removed"));
}

#[test]
fn rules_saved_with_save_survive_in_the_config_file() {
    let t = Topology::build(Offload::On).unwrap();
    let config = std::env::temp_dir().join(format!("{}-sysnet.toml", t.sysnet.name()));
    std::fs::write(
        &config,
        format!("# sys-net\nuplink = \"{SYSNET_UPLINK}\"\nlocalsend = \"{SYSFW}\"\n"),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let sysnet = Forwarder::start(&t.sysnet, "sys-net", &["--config", &config_arg]).unwrap();

    let out = cli(
        &t.sysnet,
        &[
            "rules",
            "add",
            "udp:5000=10.137.0.5:6000",
            "--allow-from",
            "any",
            "--save",
            "--pin-dir",
            &pin(&sysnet),
        ],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.starts_with("# sys-net\n"), "{text}");
    assert!(
        text.contains("spec = \"udp:5000=10.137.0.5:6000\""),
        "{text}"
    );
    let check = cli(&t.sysnet, &["check-config", &config_arg]).unwrap();
    assert!(check.status.success());
    assert!(
        String::from_utf8_lossy(&check.stdout)
            .contains("forward udp:5000 -> 10.137.0.5:6000 (allow-from any)")
    );

    let (_, err) = stderr_of(
        &t.sysnet,
        &[
            "rules",
            "del",
            "tcp:53317",
            "--save",
            "--pin-dir",
            &pin(&sysnet),
        ],
    );
    assert!(err.contains("localsend preset"), "{err}");
    let out = cli(
        &t.sysnet,
        &[
            "rules",
            "del",
            "udp:5000",
            "--save",
            "--pin-dir",
            &pin(&sysnet),
        ],
    )
    .unwrap();
    assert!(out.status.success());
    assert!(
        !std::fs::read_to_string(&config)
            .unwrap()
            .contains("udp:5000")
    );
    let _ = std::fs::remove_file(&config);
}

#[test]
fn only_root_may_use_the_control_socket() {
    let t = Topology::build(Offload::On).unwrap();
    let (sysnet, _sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
    let out = t
        .sysnet
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary().unwrap())
        .args(["rules", "list", "--pin-dir", &pin(&sysnet)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Permission denied") || err.contains("root only"),
        "{err}"
    );
}

#[test]
fn bad_flags_and_config_files_are_rejected_before_anything_loads() {
    let ns = Netns::new("badflags").unwrap();
    let (code, err) = stderr_of(
        &ns,
        &["run", "--uplink", "eth0", "--forward", "tcp:99999=10.0.0.1"],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("--forward") && err.contains("PROTO:PORT"),
        "{err}"
    );
    let config = std::env::temp_dir().join(format!("{}-bad.toml", ns.name()));
    std::fs::write(
        &config,
        "uplink = \"eth0\"\n[[forward]]\nspec = \"tcp:80=10.0.0.1\"\nallow_from = \"lan\"\n",
    )
    .unwrap();
    let config_arg = config.display().to_string();
    for args in [
        vec!["check-config", config_arg.as_str()],
        vec!["run", "--config", config_arg.as_str()],
    ] {
        let (code, err) = stderr_of(&ns, &args);
        assert_eq!(code, 2, "{args:?}");
        assert!(
            err.contains(&config_arg)
                && err.contains("forward[0].allow_from")
                && err.contains("auto, any"),
            "{err}"
        );
    }
    assert!(
        ns.sh("nft list tables").unwrap().trim().is_empty(),
        "nothing was installed"
    );
    let _ = std::fs::remove_file(&config);
}
