//! What a user, a config file or a CLI value could do to the daemon, tried
//! with real processes:
//! - `--save` in a directory another user can write follows nothing that
//!   user planted;
//! - a rule deleted and added again gets a new id, across restarts too,
//!   and never one a kept flow table holds;
//! - a config the host cannot run is refused by `check-config` and `run`
//!   alike, before anything loads;
//! - no `--expire` value, from the CLI or straight over the control socket,
//!   makes anything panic.

use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _, lchown, symlink},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use forwarder::{
    control::{self, Request},
    pin::PinLayout,
};
use forwarder_common::{
    flow::FLOW_REPLIED,
    maps::{FlowEntry, FlowKey},
};
use forwarder_tests::{
    bpffs::PinDir,
    daemon::{Forwarder, binary, cli},
    netns::Netns,
    wait::wait_until,
};

const UPLINK: &str = "up0";
const TARGET: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

/// A router namespace with an uplink that has an address, enough for the
/// daemon to become ready.
fn router(label: &str) -> Netns {
    let ns = Netns::new(label).unwrap();
    ns.ip(&format!("link add {UPLINK} type veth peer name lan0"))
        .unwrap();
    ns.ip(&format!("addr add 192.0.2.1/24 dev {UPLINK}"))
        .unwrap();
    ns.ip(&format!("link set {UPLINK} up")).unwrap();
    ns.ip("link set lan0 up").unwrap();
    ns
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(ns: &Netns) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-hostile-config", ns.name()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The user who may write the config's directory: nobody.
const OTHER_UID: u32 = 65534;

/// A file's bytes, owner and mode, to see that nothing touched it.
fn snapshot(path: &Path) -> (String, u32, u32, u32) {
    let meta = fs::metadata(path).unwrap();
    let text = fs::read_to_string(path).unwrap();
    (text, meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

/// A symlink at `link` to `to`, made by the other user.
fn plant(link: &Path, to: &Path) {
    symlink(to, link).unwrap();
    lchown(link, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
}

#[test]
fn save_follows_nothing_another_user_planted() {
    let ns = router("save");
    let scratch = Scratch::new(&ns);
    let victim = scratch.file("victim", "root's secret\n", 0o600);
    let victim_toml = scratch.file("victim.toml", "# root's own TOML\n", 0o600);
    let conf = scratch.0.join("conf");
    fs::create_dir(&conf).unwrap();
    std::os::unix::fs::chown(&conf, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    let config = conf.join("forwarder.toml");
    fs::write(&config, format!("uplink = \"{UPLINK}\"\n")).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o640)).unwrap();
    // Where releases before this one put their temporary file.
    let old_tmp = conf.join(".forwarder.toml.forwarder-save");
    plant(&old_tmp, &victim);
    let before = (snapshot(&victim), snapshot(&victim_toml));

    let config_arg = config.display().to_string();
    let fwd = Forwarder::start(&ns, "save", &["--config", &config_arg]).unwrap();
    let save = |spec: &str| {
        cli(
            &ns,
            &["rules", "add", spec, "--save", "--pin-dir", &fwd.pin_arg()],
        )
        .unwrap()
    };
    let out = save(&format!("tcp:8080={TARGET}"));
    assert!(out.status.success(), "{}", text_of(&out));
    assert_eq!(
        snapshot(&victim),
        before.0,
        "the file a planted symlink points at was written"
    );
    let saved = fs::read_to_string(&config).unwrap();
    assert!(saved.contains(&format!("tcp:8080={TARGET}")), "{saved}");
    let meta = fs::metadata(&config).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o640));
    assert_eq!(fs::read_link(&old_tmp).unwrap(), victim, "left as planted");
    let mut left: Vec<String> = fs::read_dir(&conf)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [".forwarder.toml.forwarder-save", "forwarder.toml"]);

    // The other user swaps the config itself for a symlink to root's file.
    fs::remove_file(&config).unwrap();
    plant(&config, &victim_toml);
    let out = save(&format!("tcp:8081={TARGET}"));
    let text = text_of(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("not saved")
            && text.contains(&format!("made by uid {OTHER_UID}"))
            && text.contains("victim.toml"),
        "{text}"
    );
    assert_eq!(
        (snapshot(&victim), snapshot(&victim_toml)),
        before,
        "root's files are untouched, content, owner and mode"
    );
    println!("planted symlinks left alone; save through a foreign symlink refused: {text}");
}

#[test]
fn no_expiry_makes_anything_panic() {
    let ns = router("expire");
    let scratch = Scratch::new(&ns);
    let config = scratch.file("forwarder.toml", &format!("uplink = \"{UPLINK}\"\n"), 0o600);
    let config_arg = config.display().to_string();
    let mut fwd = Forwarder::start(&ns, "expire", &["--config", &config_arg]).unwrap();
    let pin = fwd.pin_arg();
    for expire in [
        "8000y",
        "300000000000y",
        "101y",
        "99999999999999999999999999s",
    ] {
        let out = cli(
            &ns,
            &[
                "rules",
                "add",
                &format!("tcp:8080={TARGET}"),
                "--expire",
                expire,
                "--save",
                "--pin-dir",
                &pin,
            ],
        )
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--expire {expire}: {err}");
        assert!(
            err.contains("--expire") && err.contains("at most 100 years"),
            "--expire {expire}: {err}"
        );
    }
    // Straight over the control socket, past what the CLI lets through.
    for secs in [u64::MAX, 8000 * 31_557_600, 100 * 31_557_600 + 1] {
        let response = control::request(
            fwd.pins.path(),
            &Request::Add {
                spec: format!("tcp:8080={TARGET}"),
                allow_from: None,
                expire_secs: Some(secs),
                comment: None,
                save: true,
            },
        )
        .unwrap_or_else(|e| panic!("{secs} s: no answer: {e:#}\n{}", fwd.log_text()));
        let error = response.error.unwrap_or_default();
        assert!(!response.ok && error.contains("100y"), "{secs} s: {error}");
        assert!(
            fwd.running(),
            "{secs} s: the daemon died:\n{}",
            fwd.log_text()
        );
    }
    let out = cli(
        &ns,
        &[
            "rules",
            "add",
            &format!("tcp:8080={TARGET}"),
            "--expire",
            "100y",
            "--save",
            "--pin-dir",
            &pin,
        ],
    )
    .unwrap();
    assert!(out.status.success(), "the longest: {}", text_of(&out));
    let saved = fs::read_to_string(&config).unwrap();
    assert!(saved.contains("expires = \"21"), "{saved}");
    assert!(!fwd.log_text().contains("panicked"), "{}", fwd.log_text());
}
/// `forwarder run <args>` in `ns`, which must exit within `timeout`
/// (killed, by its own PID, if it does not): its exit code and stderr.
fn run_to_exit(ns: &Netns, args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut child = ns
        .command(binary().unwrap().to_str().unwrap())
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    let exited = wait_until(timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        forwarder_tests::child::terminate(&mut child, Duration::from_secs(10));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.and_then(|s| s.code()), err)
}

fn relays(n: u8) -> String {
    (1..=n)
        .map(|i| format!("[[relay]]\nspec = \"239.1.1.{i}:9={TARGET}\"\n"))
        .collect()
}

#[test]
fn check_config_and_run_refuse_what_this_host_cannot_run() {
    let ns = router("limits");
    let scratch = Scratch::new(&ns);
    let max: u32 = ns
        .sh("cat /proc/sys/net/ipv4/igmp_max_memberships")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(max, 20, "a new namespace has the kernel's default");
    let uplink = format!("uplink = \"{UPLINK}\"\n");
    let fits = scratch.file("twenty.toml", &(uplink.clone() + &relays(20)), 0o600);
    let out = cli(&ns, &["check-config", fits.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "20 groups fit: {}", text_of(&out));

    let too_many = scratch.file("many.toml", &(uplink.clone() + &relays(21)), 0o600);
    let too_many_arg = too_many.display().to_string();
    let pins = PinDir::new("limits").unwrap();
    let pin_arg = pins.path().display().to_string();
    let check = cli(&ns, &["check-config", &too_many_arg]).unwrap();
    let (code, run_err) = run_to_exit(
        &ns,
        &["--config", &too_many_arg, "--pin-dir", &pin_arg],
        Duration::from_secs(10),
    );
    for (what, code, err) in [
        ("check-config", check.status.code(), text_of(&check)),
        ("run", code, run_err),
    ] {
        assert_eq!(code, Some(2), "{what}: {err}");
        assert!(
            err.contains(&format!("{too_many_arg}: relays"))
                && err.contains("21 multicast groups")
                && err.contains("net.ipv4.igmp_max_memberships is 20")
                && err.contains("at most 20"),
            "{what}: {err}"
        );
    }
    assert!(!pins.path().exists(), "run loaded nothing");
    assert!(ns.sh("nft list tables").unwrap().trim().is_empty());

    // An ordinary directory with files in it never gets a bpffs over it.
    let busy = scratch.0.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("keep"), "mine").unwrap();
    let busy_arg = busy.display().to_string();
    let in_file = scratch.file(
        "pin-dir.toml",
        &format!("{uplink}pin_dir = \"{busy_arg}\"\n"),
        0o600,
    );
    let in_file_arg = in_file.display().to_string();
    let check = cli(&ns, &["check-config", &in_file_arg]).unwrap();
    let (code, run_err) = run_to_exit(
        &ns,
        &["--uplink", UPLINK, "--pin-dir", &busy_arg],
        Duration::from_secs(10),
    );
    for (what, code, err, key) in [
        (
            "check-config",
            check.status.code(),
            text_of(&check),
            format!("{in_file_arg}: key `pin_dir`"),
        ),
        ("run", code, run_err, "--pin-dir".to_string()),
    ] {
        assert_eq!(code, Some(2), "{what}: {err}");
        assert!(
            err.contains(&key)
                && err.contains(&busy_arg)
                && err.contains("not on a bpffs")
                && err.contains("does not exist yet or is empty"),
            "{what}: {err}"
        );
    }
    assert_eq!(fs::read_to_string(busy.join("keep")).unwrap(), "mine");
    let empty = scratch.0.join("empty");
    fs::create_dir(&empty).unwrap();
    let usable = scratch.file(
        "empty.toml",
        &format!("{uplink}pin_dir = \"{}\"\n", empty.display()),
        0o600,
    );
    let out = cli(&ns, &["check-config", usable.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "an empty directory: {}",
        text_of(&out)
    );
}

/// The id of the installed rule forwarding `tcp:port`.
fn rule_id(fwd: &Forwarder, port: u16) -> u32 {
    let installed = fwd.tables().unwrap().installed().unwrap();
    installed
        .get(&(6, port))
        .unwrap_or_else(|| panic!("no rule tcp:{port}"))
        .1
        .id
}

fn rules(ns: &Netns, fwd: &Forwarder, args: &[&str]) {
    let mut full = vec!["rules"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--pin-dir", fwd.pins.path().to_str().unwrap()]);
    let out = cli(ns, &full).unwrap();
    assert!(out.status.success(), "{args:?}: {}", text_of(&out));
}

/// Checks that `tcp:port` got an id above every one `seen` before.
fn fresh(seen: &mut BTreeSet<u32>, fwd: &Forwarder, port: u16, when: &str) {
    let id = rule_id(fwd, port);
    assert!(
        seen.iter().all(|old| id > *old),
        "{when}: tcp:{port} got id {id}, not above every earlier one {seen:?}"
    );
    seen.insert(id);
}

#[test]
fn rule_ids_never_come_back() {
    let ns = router("ids");
    let first = format!("tcp:1000={TARGET}");
    let args = ["--uplink", UPLINK, "--forward", first.as_str()];
    let mut fwd = Forwarder::start(&ns, "ids", &args).unwrap();
    let mut seen = BTreeSet::from([rule_id(&fwd, 1000)]);
    rules(&ns, &fwd, &["add", &format!("tcp:2000={TARGET}")]);
    fresh(&mut seen, &fwd, 2000, "added");
    rules(&ns, &fwd, &["del", "tcp:2000"]);
    rules(&ns, &fwd, &["add", &format!("tcp:3000={TARGET}")]);
    fresh(&mut seen, &fwd, 3000, "added after a delete");

    // The highest id is deleted, then the daemon crashes and restarts.
    rules(&ns, &fwd, &["del", "tcp:3000"]);
    fwd.kill_hard().unwrap();
    fwd.respawn(&ns).unwrap();
    fwd.wait_ready(Duration::from_secs(20)).unwrap();
    assert!(seen.contains(&rule_id(&fwd, 1000)), "tcp:1000 kept its id");
    rules(&ns, &fwd, &["add", &format!("tcp:4000={TARGET}")]);
    fresh(&mut seen, &fwd, 4000, "added after a restart");

    // A flow table kept where the rules map is new (an upgrade that
    // replaced the rules map, or pins of a build that kept no id record):
    // a flow of id 1000 waits in it.
    fwd.kill_hard().unwrap();
    let layout = PinLayout::new(fwd.pins.path());
    let kept_flow_id = 1000;
    let mut tables = fwd.tables().unwrap();
    let key = FlowKey::new(
        u32::from_ne_bytes([192, 0, 2, 7]),
        40000u16.to_be(),
        6,
        1000u16.to_be(),
    );
    let entry = FlowEntry {
        rule_id: kept_flow_id,
        state: FLOW_REPLIED,
        created_ns: forwarder::clock::boot_ns(),
        seen_ns: forwarder::clock::boot_ns(),
        ..Default::default()
    };
    tables.set_flow(&key, &entry).unwrap();
    drop(tables);
    for pin in [
        layout.maps.join("FORWARD_RULES"),
        layout.maps.join("REVERSE_RULES"),
    ] {
        fs::remove_file(&pin).unwrap();
    }
    let _ = fs::remove_file(layout.meta.join("RULE_IDS"));
    fwd.respawn(&ns).unwrap();
    fwd.wait_ready(Duration::from_secs(20)).unwrap();
    let id = rule_id(&fwd, 1000);
    assert!(
        id > kept_flow_id,
        "tcp:1000 got id {id} in a new rules map beside a kept flow of id {kept_flow_id}"
    );
    println!("ids handed out: {seen:?}, then {id} beside a kept flow of id {kept_flow_id}");
}
