//! The release tarball: installed into a scratch root with its own
//! install.sh, its binary and example configs run in the Qubes-like
//! topology, and uninstall.sh removes every file it installed.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use forwarder_tests::{
    daemon::Forwarder,
    netns::run,
    sockets::{EchoServer, tcp_echo},
    topology::*,
};

/// $FORWARDER_PACKAGE (set by `cargo xtask test`), or the newest tarball
/// `cargo xtask package` left in target/package.
fn tarball() -> PathBuf {
    if let Some(path) = std::env::var_os("FORWARDER_PACKAGE") {
        return PathBuf::from(path);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/package");
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(".tar.gz"))
                .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        })
        .unwrap_or_else(|| {
            panic!(
                "no package in {}: run `cargo xtask package` or set FORWARDER_PACKAGE",
                dir.display()
            )
        })
}

fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(files_below(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn the_package_installs_runs_and_uninstalls() {
    let scratch =
        std::env::temp_dir().join(format!("forwarder-package-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(tarball())
        .arg("-C")
        .arg(&scratch))
    .unwrap();
    let unpacked = std::fs::read_dir(&scratch)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let root = scratch.join("root");

    let out = run(Command::new("sh")
        .arg(unpacked.join("install.sh"))
        .arg("--root")
        .arg(&root))
    .unwrap();
    assert!(out.contains("installed"), "{out}");
    let binary = root.join("usr/bin/forwarder");
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/forwarder.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/forwarder run --config /rw/config/forwarder.toml"),
        "{unit}"
    );
    assert!(
        unit.contains("ConditionPathExists=/run/qubes-service/forwarder"),
        "{unit}"
    );
    assert!(!unit.contains("@BINDIR@"));
    let examples = root.join("usr/share/doc/forwarder/examples");
    assert!(root.join("usr/share/doc/forwarder/qubes.md").exists());
    for example in ["sys-net.toml", "sys-firewall.toml"] {
        let path = examples.join(example);
        let out = run(Command::new(&binary).arg("check-config").arg(&path)).unwrap();
        assert!(out.contains("valid"), "{example}: {out}");
    }
    let bad = run(Command::new("sh")
        .arg(unpacked.join("install.sh"))
        .arg("--bogus"));
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("unknown option --bogus")
    );

    // The installed binary with the shipped examples, unchanged, on the
    // topology they describe (sys-net's wls6f0, sys-firewall 10.137.0.5,
    // the app at 10.137.0.17).
    {
        let t = Topology::build(Offload::On).unwrap();
        let sysnet_config = examples.join("sys-net.toml").display().to_string();
        let sysfw_config = examples.join("sys-firewall.toml").display().to_string();
        let _sysnet =
            Forwarder::start_binary(&binary, &t.sysnet, "sys-net", &["--config", &sysnet_config])
                .unwrap();
        let _sysfw = Forwarder::start_binary(
            &binary,
            &t.sysfw,
            "sys-firewall",
            &["--config", &sysfw_config],
        )
        .unwrap();
        let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
        let echo = tcp_echo(
            &t.lan,
            SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT),
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(echo.seen_as.ip(), LAN_PEER);
    }

    let out = run(Command::new("sh")
        .arg(unpacked.join("uninstall.sh"))
        .arg("--root")
        .arg(&root))
    .unwrap();
    assert!(out.contains("removed"), "{out}");
    let left = files_below(&root);
    assert!(left.is_empty(), "uninstall left {left:?}");
    std::fs::remove_dir_all(&scratch).unwrap();
}
