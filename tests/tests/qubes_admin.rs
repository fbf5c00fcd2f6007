//! `qvm-forwarder` against a stand-in qubesd (no Qubes, no root): the exact
//! calls of `expose` from a table of expected calls and replies, as
//! qubesadmin's own tests do; then the commands over a graph of domains,
//! with netvm moves, clones, conflicts, `watch`; and the stand-in
//! `qubesdb-*` tools feeding the router side's reader.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Parser as _;
use forwarder::{
    qubes::{admin::Admin, cli::Cli, dispatch, transport::Transport},
    qubesdb::{Follower, Tools, router_share},
};
use forwarder_tests::{
    qubesd::{Call, Domain, Property, Qubesd, exception, reply, standard_graph},
    qubesdb_store::install_tools,
    wait::{until_stable, wait_until},
};

const ROUTER_PREFIX: &str = "vm-config.forwarder.";
const INPUT_PREFIX: &str = "vm-config.forwarder-input.";

fn admin(q: &Qubesd) -> Admin {
    Admin::new(Transport::Socket(q.socket().into()))
}

/// Runs one command; its result and what it printed.
fn run(q: &Qubesd, args: &[&str]) -> (anyhow::Result<bool>, String) {
    let cli = Cli::try_parse_from(std::iter::once("qvm-forwarder").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let mut out = Vec::new();
    let result = dispatch::run(&cli.command, &admin(q), &mut out);
    (result, String::from_utf8(out).unwrap())
}

/// Runs one command that must succeed; what it printed.
fn ok(q: &Qubesd, args: &[&str]) -> String {
    let (result, out) = run(q, args);
    match result {
        Ok(true) => out,
        other => panic!("{args:?}: {other:?}\n{out}"),
    }
}

fn writes(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.method.starts_with("admin.vm.feature.Set") || c.method.ends_with("Remove"))
        .map(|c| format!("{} {}+{}", c.dest, c.method, c.arg))
        .collect()
}

/// Calls per method, as the report lists them.
fn counts(calls: &[Call]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for call in calls {
        *counts.entry(call.method.clone()).or_default() += 1;
    }
    counts
}

/// The entries of a router's share as its features hold them.
fn router_entries(q: &Qubesd, vm: &str) -> Vec<String> {
    let features = q.features(vm, ROUTER_PREFIX);
    let pairs: Vec<(String, String)> = features
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("vm-config.").to_string(), v))
        .collect();
    router_share(&pairs)
        .unwrap_or_else(|e| panic!("{vm}: {e}"))
        .entries()
}

fn standard_with(extra: &[(&str, Domain)]) -> BTreeMap<String, Domain> {
    let mut graph = standard_graph();
    for (name, domain) in extra {
        graph.insert(name.to_string(), domain.clone());
    }
    graph
}

/// The calls `expose app --localsend` makes on the standard graph, with
/// qubesd's replies: the whole conversation, nothing else allowed.
#[test]
fn expose_localsend_on_the_standard_graph_makes_exactly_these_calls() {
    let ls_input = "v1 part=1/1 sum=ef9ab8267f5b604c | admit=tcp:53317 | admit=udp:53317 | group=224.0.0.167:53317";
    let ls_fw = "v1 part=1/1 sum=1ca4d36ed699bec6 | forward=tcp:53317=10.137.0.12 | forward=udp:53317=10.137.0.12 | relay=224.0.0.167:53317=10.137.0.12";
    let ls_net = "v1 part=1/1 sum=5b151373f11f8fe7 | forward=tcp:53317=10.137.0.6 | forward=udp:53317=10.137.0.6 | relay=224.0.0.167:53317=10.137.0.6";
    let get = |vm: &str, arg: &str| Call::new(vm, "admin.vm.property.Get", arg, b"");
    let set = |vm: &str, arg: &str, value: &str| {
        (
            Call::new(vm, "admin.vm.feature.Set", arg, value.as_bytes()),
            reply(""),
        )
    };
    let expected = vec![
        (
            Call::new("dom0", "admin.vm.List", "", b""),
            reply(
                "app class=AppVM state=Running\n\
                 debian-12 class=TemplateVM state=Halted\n\
                 dom0 class=AdminVM state=Running\n\
                 sys-firewall class=AppVM state=Running\n\
                 sys-net class=DispVM state=Running\n",
            ),
        ),
        (
            get("app", "netvm"),
            reply("default=True type=vm sys-firewall"),
        ),
        (get("app", "ip"), reply("default=True type=str 10.137.0.12")),
        (
            get("app", "template_for_dispvms"),
            reply("default=True type=bool False"),
        ),
        (
            get("sys-firewall", "netvm"),
            reply("default=True type=vm sys-net"),
        ),
        (
            get("sys-firewall", "ip"),
            reply("default=True type=str 10.137.0.6"),
        ),
        (
            get("sys-firewall", "provides_network"),
            reply("default=False type=bool True"),
        ),
        (get("sys-net", "netvm"), reply("default=False type=vm ")),
        (
            get("sys-net", "provides_network"),
            reply("default=False type=bool True"),
        ),
        (
            Call::new(
                "sys-firewall",
                "admin.vm.feature.CheckWithTemplate",
                "supported-service.forwarder",
                b"",
            ),
            reply("1"),
        ),
        (
            Call::new(
                "sys-net",
                "admin.vm.feature.CheckWithTemplate",
                "supported-service.forwarder",
                b"",
            ),
            reply("1"),
        ),
        (
            Call::new("app", "admin.vm.feature.List", "", b""),
            reply(""),
        ),
        (
            Call::new("debian-12", "admin.vm.feature.List", "", b""),
            reply("os\nsupported-service.forwarder\n"),
        ),
        (
            Call::new("sys-firewall", "admin.vm.feature.List", "", b""),
            reply("service.qubes-firewall\n"),
        ),
        (
            Call::new("sys-net", "admin.vm.feature.List", "", b""),
            reply(""),
        ),
        set("app", "forwarder-expose", "v1 vm=app | localsend"),
        set("app", "service.forwarder-input", "1"),
        set("app", "vm-config.forwarder-input.1", ls_input),
        set("sys-firewall", "service.forwarder", "1"),
        set("sys-firewall", "vm-config.forwarder.1", ls_fw),
        set("sys-net", "service.forwarder", "1"),
        set("sys-net", "vm-config.forwarder.1", ls_net),
    ];
    let n = expected.len();
    let q = Qubesd::table("expose-table", expected).unwrap();
    let out = ok(&q, &["expose", "app", "--localsend"]);
    assert_eq!(q.unexpected(), [], "unexpected calls");
    assert_eq!(q.uncalled(), [], "expected calls not made");
    let calls = q.calls();
    assert_eq!(calls.len(), n, "each call made once");
    assert!(
        out.ends_with("exposed localsend on app <- sys-firewall <- sys-net\n"),
        "{out}"
    );
    for vm in ["app", "sys-firewall", "sys-net"] {
        assert!(
            out.contains(&format!(
                "note: {vm} is running, and Qubes turns a qvm-service on at boot"
            )),
            "{out}"
        );
    }
    eprintln!("Admin API calls of `expose app --localsend` (standard graph):");
    for (method, count) in counts(&calls) {
        eprintln!("  {count:>2}  {method}");
    }
    eprintln!("  {n:>2}  in all");
}

/// A qubesd refusal surfaces with its exception and message, naming the
/// call; nothing is written after it.
#[test]
fn a_qubesd_exception_stops_the_command_with_its_message() {
    let expected = vec![(
        Call::new("dom0", "admin.vm.List", "", b""),
        exception("PermissionDenied", ""),
    )];
    let q = Qubesd::table("refused", expected).unwrap();
    let (result, _) = run(&q, &["expose", "app", "--localsend"]);
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("qubesd refused: PermissionDenied"), "{err}");
    assert_eq!(q.unexpected(), []);
    assert_eq!(q.calls().len(), 1);
}

#[test]
fn expose_writes_every_hop_and_a_second_sync_writes_nothing() {
    let q = Qubesd::graph("idempotent", standard_graph()).unwrap();
    ok(
        &q,
        &[
            "expose",
            "app",
            "--localsend",
            "tcp:8080",
            "--comment",
            "web and phone",
        ],
    );
    assert_eq!(
        router_entries(&q, "sys-firewall"),
        [
            "forward=tcp:8080=10.137.0.12 note=\"web and phone\"",
            "forward=tcp:53317=10.137.0.12 note=\"web and phone\"",
            "forward=udp:53317=10.137.0.12 note=\"web and phone\"",
            "relay=224.0.0.167:53317=10.137.0.12 note=\"web and phone\""
        ]
    );
    assert_eq!(
        router_entries(&q, "sys-net")[0],
        "forward=tcp:8080=10.137.0.6 note=\"web and phone\""
    );
    for router in ["sys-net", "sys-firewall"] {
        assert_eq!(q.features(router, "service.")["service.forwarder"], "1");
    }
    assert_eq!(q.features("app", INPUT_PREFIX).len(), 1);
    q.clear_calls();
    let out = ok(&q, &["sync"]);
    assert_eq!(out, "in sync: nothing to change\n");
    assert_eq!(writes(&q.calls()), Vec::<String>::new());
}

#[test]
fn dry_run_prints_each_feature_and_writes_nothing() {
    let q = Qubesd::graph("dry-run", standard_graph()).unwrap();
    let out = ok(&q, &["expose", "app", "--syncthing", "--dry-run"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&"app: would set forwarder-expose = v1 vm=app | syncthing"),
        "{out}"
    );
    for prefix in [
        "app: would set service.forwarder-input = 1",
        "app: would set vm-config.forwarder-input.1 = v1 part=1/1",
        "sys-firewall: would set service.forwarder = 1",
        "sys-firewall: would set vm-config.forwarder.1 = v1 part=1/1",
        "sys-net: would set vm-config.forwarder.1 = v1 part=1/1",
        "would expose syncthing on app <- sys-firewall <- sys-net",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(prefix)),
            "{prefix}: {out}"
        );
    }
    assert_eq!(writes(&q.calls()), Vec::<String>::new());
    ok(&q, &["expose", "app", "--syncthing"]);
    q.clear_calls();
    let out = ok(&q, &["unexpose", "app", "--dry-run"]);
    assert!(
        out.contains("sys-net: would remove vm-config.forwarder.1"),
        "{out}"
    );
    assert!(out.contains("app: would remove forwarder-expose"), "{out}");
    assert_eq!(writes(&q.calls()), Vec::<String>::new());
}

#[test]
fn unexpose_removes_what_it_names_then_everything() {
    let q = Qubesd::graph("unexpose", standard_graph()).unwrap();
    ok(&q, &["expose", "app", "--localsend", "tcp:8080"]);
    ok(&q, &["unexpose", "app", "tcp:8080"]);
    assert_eq!(router_entries(&q, "sys-net").len(), 3);
    assert!(
        !router_entries(&q, "sys-net")
            .iter()
            .any(|e| e.contains("8080"))
    );
    let (result, _) = run(&q, &["unexpose", "app", "tcp:9999"]);
    let err = result.unwrap_err().to_string();
    assert_eq!(err, "app does not expose tcp:9999; it exposes localsend");
    ok(&q, &["unexpose", "app"]);
    for vm in ["app", "sys-firewall", "sys-net"] {
        assert_eq!(q.features(vm, "vm-config."), BTreeMap::new(), "{vm}");
        assert_eq!(q.features(vm, "forwarder-expose"), BTreeMap::new(), "{vm}");
    }
    // The service stays on: a router with no share has nothing to do.
    assert_eq!(q.features("sys-net", "service.")["service.forwarder"], "1");
}

#[test]
fn moving_the_vm_behind_a_vpn_moves_its_rules_and_clears_the_old_chain() {
    let vpn = Domain::router("debian-12", Some("sys-net"), "10.137.0.30").running();
    let q = Qubesd::graph("vpn", standard_with(&[("sys-vpn", vpn)])).unwrap();
    ok(&q, &["expose", "app", "--localsend"]);
    assert_eq!(router_entries(&q, "sys-firewall").len(), 3);
    q.set_property("app", "netvm", Some("sys-vpn"));
    ok(&q, &["sync"]);
    assert_eq!(q.features("sys-firewall", ROUTER_PREFIX), BTreeMap::new());
    assert_eq!(
        router_entries(&q, "sys-vpn")[0],
        "forward=tcp:53317=10.137.0.12"
    );
    assert_eq!(
        router_entries(&q, "sys-net")[0],
        "forward=tcp:53317=10.137.0.30"
    );
}

#[test]
fn a_port_another_qube_has_is_refused_naming_the_router_and_the_owner() {
    let work = Domain::app("debian-12", Some("sys-firewall"), Some("10.137.0.13")).running();
    let q = Qubesd::graph("conflict", standard_with(&[("work", work)])).unwrap();
    ok(&q, &["expose", "app", "tcp:8080"]);
    q.clear_calls();
    let (result, out) = run(&q, &["expose", "work", "tcp:8080", "--localsend"]);
    let err = result.unwrap_err().to_string();
    assert_eq!(
        err,
        "cannot expose on work:\n  tcp:8080: sys-firewall already forwards tcp:8080 to 10.137.0.12 for app"
    );
    assert_eq!(out, "");
    assert_eq!(writes(&q.calls()), Vec::<String>::new());
    ok(&q, &["expose", "work", "tcp:8081"]);
    assert_eq!(
        router_entries(&q, "sys-firewall"),
        [
            "forward=tcp:8080=10.137.0.12",
            "forward=tcp:8081=10.137.0.13"
        ]
    );
}

#[test]
fn broken_chains_are_refused_naming_the_hop() {
    let offline = Domain::app("debian-12", None, None);
    let plain = Domain::app("debian-12", Some("sys-net"), Some("10.137.0.40"));
    let behind_plain = Domain::app("debian-12", Some("plain"), Some("10.137.0.41"));
    let graph = standard_with(&[
        ("offline", offline),
        ("plain", plain),
        ("behind-plain", behind_plain),
    ]);
    let q = Qubesd::graph("broken", graph).unwrap();
    for (args, message) in [
        (
            vec!["expose", "offline", "tcp:1"],
            "cannot expose offline: offline: no netvm, so nothing can reach it (qvm-prefs offline netvm sys-firewall)",
        ),
        (
            vec!["expose", "behind-plain", "tcp:1"],
            "cannot expose behind-plain: plain cannot run the forwarder: its provides_network property is False",
        ),
        (
            vec!["expose", "dom0", "tcp:1"],
            "cannot expose dom0: dom0 has no network and cannot be exposed",
        ),
        (
            vec!["expose", "nope", "tcp:1"],
            "cannot expose nope: nope: no such qube",
        ),
        (
            vec!["expose", "app"],
            "nothing to expose on app: give PROTO:PORT specs, or --localsend, --kdeconnect, --syncthing or --mdns",
        ),
    ] {
        let (result, _) = run(&q, &args);
        assert_eq!(result.unwrap_err().to_string(), message, "{args:?}");
    }
    q.set_property("sys-net", "netvm", Some("sys-firewall"));
    let (result, _) = run(&q, &["expose", "app", "tcp:1"]);
    assert_eq!(
        result.unwrap_err().to_string(),
        "cannot expose app: a netvm loop: sys-firewall -> sys-net -> sys-firewall"
    );
    assert_eq!(writes(&q.calls()), Vec::<String>::new());
}

#[test]
fn a_clone_is_left_alone_until_it_replaces_the_original() {
    let q = Qubesd::graph("clone", standard_graph()).unwrap();
    ok(&q, &["expose", "app", "--localsend"]);
    q.clone_domain("app", "app2", "10.137.0.13");
    assert_eq!(
        q.features("app2", INPUT_PREFIX).len(),
        1,
        "qvm-clone copies features"
    );
    ok(&q, &["sync"]);
    assert_eq!(q.features("app2", INPUT_PREFIX), BTreeMap::new());
    assert_eq!(
        router_entries(&q, "sys-firewall")[0],
        "forward=tcp:53317=10.137.0.12"
    );
    let list = ok(&q, &["list"]);
    assert!(
        list.contains("problem: app2: holds a copy of app's exposure"),
        "{list}"
    );

    q.remove_domain("app");
    ok(&q, &["sync"]);
    assert_eq!(
        router_entries(&q, "sys-firewall")[0],
        "forward=tcp:53317=10.137.0.13"
    );
    assert_eq!(
        router_entries(&q, "sys-net")[0],
        "forward=tcp:53317=10.137.0.6"
    );
    assert_eq!(
        q.features("app2", "forwarder-expose")["forwarder-expose"],
        "v1 vm=app2 | localsend"
    );
    assert_eq!(q.features("app2", INPUT_PREFIX).len(), 1);
}

#[test]
fn a_disposable_router_and_a_disposable_template() {
    let mut graph = standard_graph();
    let dvm = Domain::app("debian-12", Some("sys-firewall"), Some("10.137.0.20"))
        .with_property("template_for_dispvms", Property::bool(true));
    graph.insert("default-dvm".into(), dvm);
    let mut net = graph["sys-net"].clone();
    net.class = "DispVM".into();
    net.properties
        .insert("template".into(), Property::vm(Some("default-dvm")));
    net.properties
        .insert("ip".into(), Property::string(Some("10.138.7.9")));
    graph.insert("sys-net".into(), net);
    let q = Qubesd::graph("disposable", graph).unwrap();
    ok(&q, &["expose", "app", "tcp:8080"]);
    assert_eq!(
        router_entries(&q, "sys-net"),
        ["forward=tcp:8080=10.137.0.6"]
    );
    let (result, _) = run(&q, &["expose", "default-dvm", "tcp:9000"]);
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("it is a disposable template"),
        "a disposable template is refused"
    );
}

#[test]
fn check_shows_each_hop_and_what_is_wrong() {
    let mut graph = standard_graph();
    graph.insert(
        "fedora-41".into(),
        Domain::template().with_feature("supported-service.forwarder", "0"),
    );
    let fw = graph["sys-firewall"]
        .clone()
        .with_property("template", Property::vm(Some("fedora-41")));
    graph.insert(
        "sys-firewall".into(),
        Domain {
            running: false,
            ..fw
        },
    );
    let q = Qubesd::graph("check", graph).unwrap();
    ok(&q, &["expose", "app", "--mdns"]);
    let (result, out) = run(&q, &["check", "app"]);
    assert!(
        !result.unwrap(),
        "a problem is reported by the exit status\n{out}"
    );
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].starts_with("QUBE "), "{out}");
    assert!(
        rows[1].starts_with("app ") && rows[1].contains("10.137.0.12"),
        "{out}"
    );
    assert!(
        rows[2].starts_with("sys-firewall") && rows[2].contains(" no "),
        "{out}"
    );
    assert!(
        out.contains("note: sys-firewall is not running; it applies its share when it starts"),
        "{out}"
    );
    assert!(
        out.contains("problem: sys-firewall: its template has not announced the forwarder package"),
        "{out}"
    );

    let (result, out) = run(&q, &["check", "sys-firewall", "--json"]);
    assert!(result.unwrap(), "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["hops"][0]["name"], "sys-firewall");
    assert_eq!(json["hops"][1]["service"], true);
    assert_eq!(json["problems"], serde_json::json!([]));
    let notes = json["notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("exposes nothing")),
        "{out}"
    );

    let (result, out) = run(&q, &["check", "sys-net"]);
    assert!(!result.unwrap());
    assert!(out.contains("problem: sys-net: no netvm"), "{out}");
}

#[test]
fn check_names_an_exposed_qube_whose_template_lacks_the_input_side() {
    let mut bare = Domain::template();
    bare.features.remove("supported-service.forwarder-input");
    let q = Qubesd::graph(
        "check-input",
        standard_with(&[
            ("bare-template", bare),
            (
                "work",
                Domain::app("bare-template", Some("sys-firewall"), Some("10.137.0.40")).running(),
            ),
        ]),
    )
    .unwrap();
    let (result, out) = run(&q, &["check", "work"]);
    assert!(result.unwrap(), "nothing exposed, nothing wrong\n{out}");
    ok(&q, &["expose", "work", "tcp:8080"]);
    let (result, out) = run(&q, &["check", "work"]);
    assert!(!result.unwrap(), "{out}");
    assert!(
        out.contains(
            "problem: work: its template has not announced the forwarder package \
             (supported-service.forwarder-input)"
        ),
        "{out}"
    );
    let rows: Vec<&str> = out.lines().collect();
    assert!(
        rows[1].starts_with("work ") && rows[1].ends_with(" yes      no"),
        "{out}"
    );
}

#[test]
fn list_shows_each_exposure_in_text_and_json() {
    let q = Qubesd::graph("list", standard_graph()).unwrap();
    assert_eq!(ok(&q, &["list"]), "no qube is exposed\n");
    ok(
        &q,
        &[
            "expose",
            "app",
            "--kdeconnect",
            "--allow-from",
            "192.168.1.0/24",
            "--expire",
            "1h",
        ],
    );
    let text = ok(&q, &["list"]);
    assert!(
        text.starts_with("app <- sys-firewall (to 10.137.0.12) <- sys-net (to 10.137.0.6)\n"),
        "{text}"
    );
    assert!(
        text.contains("kdeconnect   applied, allow-from 192.168.1.0/24, until 20"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&q, &["list", "--json"])).unwrap();
    let exposure = &json["exposures"][0];
    assert_eq!(exposure["vm"], "app");
    assert_eq!(exposure["chain"][1]["router"], "sys-net");
    assert_eq!(exposure["chain"][1]["target"], "10.137.0.6");
    assert_eq!(exposure["items"][0]["state"], "applied");
    assert_eq!(exposure["items"][0]["allow_from"], "192.168.1.0/24");
    assert_eq!(json["pending"], serde_json::json!([]));
}

/// A `Write` the watch thread and the test share.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn watch_follows_a_netvm_change_within_a_second() {
    let vpn = Domain::router("debian-12", Some("sys-net"), "10.137.0.30").running();
    let q = Qubesd::graph("watch", standard_with(&[("sys-vpn", vpn)])).unwrap();
    ok(&q, &["expose", "app", "--localsend"]);
    let socket = q.socket().to_path_buf();
    let log = Shared::default();
    {
        let mut log = log.clone();
        // Runs until the test process ends: watch never returns.
        std::thread::spawn(move || {
            let cli = Cli::try_parse_from(["qvm-forwarder", "watch"]).unwrap();
            let admin = Admin::new(Transport::Socket(socket));
            let _ = dispatch::run(&cli.command, &admin, &mut log);
        });
    }
    // The watch's first sync, after qubesd's connection-established event,
    // finds nothing to do: its Admin API reads show it ran.
    assert!(wait_until(Duration::from_secs(5), || {
        q.calls()
            .iter()
            .filter(|c| c.method == "admin.vm.List")
            .count()
            >= 2
    }));
    let (_, settled) = until_stable(Duration::from_secs(5), Duration::from_millis(200), || {
        q.calls().len()
    });
    assert!(settled, "the watch's first sync never ended");
    let moved = Instant::now();
    q.set_property("app", "netvm", Some("sys-vpn"));
    let followed = wait_until(Duration::from_secs(1), || {
        q.features("sys-firewall", ROUTER_PREFIX).is_empty()
            && q.features("sys-vpn", ROUTER_PREFIX).len() == 1
            && q.features("sys-net", ROUTER_PREFIX)
                .values()
                .all(|v| v.contains("=10.137.0.30"))
    });
    let took = moved.elapsed();
    let out = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(followed, "not followed within 1 s; watch printed:\n{out}");
    eprintln!("watch: netvm change to features rewritten in {took:?}");
    assert!(
        out.contains("sys-firewall: remove vm-config.forwarder.1"),
        "{out}"
    );
}

/// The tools of one VM, in a fresh directory.
fn tools(q: &Qubesd, vm: &str) -> PathBuf {
    let at = q.qubesdb_dir().join(format!("tools-{vm}"));
    install_tools(
        Path::new(env!("CARGO_BIN_EXE_qubesdb-standin")),
        &at,
        &q.qubesdb_dir(),
        vm,
    )
    .unwrap();
    at
}

fn tool(dir: &Path, name: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(dir.join(name)).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn the_stand_in_tools_print_what_qubesdb_cmd_prints() {
    let q = Qubesd::graph("tools", standard_graph()).unwrap();
    ok(&q, &["expose", "app", "--localsend"]);
    let net = tools(&q, "sys-net");
    let value = q.features("sys-net", ROUTER_PREFIX)["vm-config.forwarder.1"].clone();

    let (code, out, _) = tool(&net, "qubesdb-multiread", &["/vm-config/"]);
    assert_eq!(
        (code, out.as_str()),
        (0, format!("forwarder.1 = {value}\n").as_str())
    );
    let (_, out, _) = tool(&net, "qubesdb-multiread", &["-f", "/vm-config/forwarder"]);
    assert_eq!(out, format!("/vm-config/forwarder.1 = {value}\n"));
    let (code, out, _) = tool(&net, "qubesdb-multiread", &["/nothing/"]);
    assert_eq!((code, out.as_str()), (0, ""));

    let (code, out, _) = tool(&net, "qubesdb-read", &["/vm-config/forwarder.1"]);
    assert_eq!((code, out), (0, format!("{value}\n")));
    let (_, out, _) = tool(&net, "qubesdb-read", &["-f", "/vm-config/forwarder.1"]);
    assert_eq!(out, format!("/vm-config/forwarder.1 = {value}\n"));
    let (code, out, err) = tool(&net, "qubesdb-read", &["/vm-config/forwarder.2"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (2, "", "Failed to read /vm-config/forwarder.2\n")
    );
    let (code, out, _) = tool(
        &net,
        "qubesdb-read",
        &["-e", "none", "/vm-config/forwarder.2"],
    );
    assert_eq!((code, out.as_str()), (0, "none\n"));
    let (code, _, err) = tool(&net, "qubesdb-read", &["-q", "/vm-config/forwarder.2"]);
    assert_eq!((code, err.as_str()), (2, ""));

    q.shutdown_domain("sys-net");
    let (code, _, err) = tool(&net, "qubesdb-read", &["/vm-config/forwarder.1"]);
    assert_eq!(
        (code, err.as_str()),
        (1, "Failed connect to local daemon\n")
    );
    q.start_domain("sys-net");
    let (code, _, _) = tool(&net, "qubesdb-read", &["/vm-config/forwarder.1"]);
    assert_eq!(code, 0, "a router started later gets its share at start");

    // A watch on the tree reports the path dom0's write changed. It
    // misses writes made before it registered, as the real one does, so
    // dom0 writes until it reports one.
    let mut watch = Command::new(net.join("qubesdb-watch"))
        .arg("/vm-config/")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = 8000;
    let fired = wait_until(Duration::from_secs(5), || {
        port += 1;
        ok(&q, &["expose", "app", &format!("tcp:{port}")]);
        matches!(watch.try_wait(), Ok(Some(_)))
    });
    if !fired {
        let _ = watch.kill();
    }
    let out = watch.wait_with_output().unwrap();
    assert!(fired, "qubesdb-watch never fired");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "/vm-config/forwarder.1\n"
    );

    // A byte outside printable ASCII is escaped as the real tool does.
    let store = forwarder_tests::qubesdb_store::read(&q.qubesdb_dir(), "sys-net")
        .unwrap()
        .unwrap();
    let mut odd = store.clone();
    odd.insert("/vm-config/odd".into(), b"a\nb\x7f\xe9".to_vec());
    forwarder_tests::qubesdb_store::write(&q.qubesdb_dir(), "sys-net", &odd).unwrap();
    let (_, out, _) = tool(&net, "qubesdb-read", &["/vm-config/odd"]);
    assert_eq!(out, "a\\x0ab\x7f\\xe9\n");
    let raw = Command::new(net.join("qubesdb-read"))
        .args(["-r", "/vm-config/odd"])
        .output()
        .unwrap();
    assert_eq!(raw.stdout, b"a\nb\x7f\xe9\n");
}

#[test]
fn the_router_reader_follows_what_dom0_writes() {
    let q = Qubesd::graph("follow", standard_graph()).unwrap();
    let fw = Tools::in_dir(&tools(&q, "sys-firewall"));
    let (mut follower, tree) = Follower::start(fw).unwrap();
    assert!(tree.is_empty(), "{tree:?}");
    ok(&q, &["expose", "app", "--localsend"]);
    let tree = follower.changed().unwrap();
    assert_eq!(
        router_share(&tree).unwrap().entries(),
        [
            "forward=tcp:53317=10.137.0.12",
            "forward=udp:53317=10.137.0.12",
            "relay=224.0.0.167:53317=10.137.0.12"
        ]
    );
    // A hostile value (as if dom0 were misled) is refused as a whole.
    let admin = admin(&q);
    admin
        .set_feature(
            "sys-firewall",
            "vm-config.forwarder.2",
            "v1 part=2/2 sum=0000000000000000 | forward=tcp:1=10.0.0.1",
        )
        .unwrap();
    let tree = follower.changed().unwrap();
    let err = router_share(&tree).unwrap_err();
    assert!(
        err.contains("/vm-config/forwarder.1: its header says 1 parts, 2 are present"),
        "{err}"
    );
}
