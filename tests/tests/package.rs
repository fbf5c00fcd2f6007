//! The packages `cargo xtask package` builds. The .deb and the .rpm are
//! read with their own tools (dpkg-deb, rpm): files, metadata, maintainer
//! scripts and scriptlets, and the binary's glibc floor. The tarball is
//! installed into a scratch root with its own install.sh, its binary and
//! example configs run in the Qubes-like topology, and uninstall.sh removes
//! every file it installed. (The .deb under a real systemd: `cargo xtask
//! systemd-test`.)

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use forwarder_tests::{
    checks::Checks,
    daemon::Forwarder,
    netns::{run, sh},
    sockets::{EchoServer, tcp_echo},
    topology::*,
};

/// The oldest glibc of a template in use: Debian 12's.
const GLIBC_FLOOR: (u32, u32) = (2, 36);

/// `$var` (set by `cargo xtask test`), or the newest file of `name`'s
/// package ending in `suffix` that `cargo xtask package` left in
/// target/package.
fn package(var: &str, name: &str, suffix: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/package");
    // forwarder_0.1.0-1_amd64.deb, forwarder-0.1.0-1.x86_64.rpm,
    // forwarder-dom0-0.1.0-1.x86_64.rpm: the name, then the version.
    let of_package = |file: &str| {
        file.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(['-', '_']))
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let file = p.file_name().unwrap_or_default().to_string_lossy();
                    of_package(&file) && file.ends_with(suffix)
                })
                .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        })
        .unwrap_or_else(|| {
            panic!(
                "no {name} *{suffix} in {}: run `cargo xtask package` or set {var}",
                dir.display()
            )
        })
}

/// A directory of this test process, removed when dropped (also on panic).
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("forwarder-package-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// One member of the .deb's data (`./usr/...`) or control (`./postinst`)
/// archive.
fn deb_member(deb: &Path, archive: &str, member: &str) -> Result<String> {
    sh(&format!(
        "dpkg-deb {archive} '{}' | tar -xO '{member}'",
        deb.display()
    ))
}

/// The glibc symbol versions (GLIBC_2.34 -> (2, 34)) named in `text`, the
/// output of objdump -T or of rpm --requires.
fn glibc_versions(text: &str) -> BTreeSet<(u32, u32)> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(str::parse::<u32>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        })
        .collect()
}

fn highest_within_floor(versions: &BTreeSet<(u32, u32)>) -> Result<String> {
    let &(major, minor) = versions.last().context("no GLIBC_ symbol versions found")?;
    ensure!(
        (major, minor) <= GLIBC_FLOOR,
        "needs GLIBC_{major}.{minor}, above Debian 12's {}.{}",
        GLIBC_FLOOR.0,
        GLIBC_FLOOR.1
    );
    Ok(format!(
        "highest GLIBC_{major}.{minor} <= {}.{}",
        GLIBC_FLOOR.0, GLIBC_FLOOR.1
    ))
}

fn sha256(path: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn contains_all(text: &str, wanted: &[&str]) -> Result<()> {
    let missing: Vec<&&str> = wanted.iter().filter(|w| !text.contains(**w)).collect();
    if !missing.is_empty() {
        bail!("missing {missing:?} in:\n{text}");
    }
    Ok(())
}

/// A shell script without its comment lines.
fn code(script: &str) -> String {
    script
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `rpm -qp --scripts` output split by its "NAME scriptlet (using ...):"
/// headers: scriptlet name -> body.
fn scriptlets(output: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in output.lines() {
        match line.split_once(" scriptlet") {
            Some((name, rest)) if !name.contains(' ') && rest.ends_with(':') => {
                current = Some(name.to_string());
                out.insert(name.to_string(), String::new());
            }
            _ => {
                if let Some(body) = current.as_ref().and_then(|n| out.get_mut(n)) {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    out
}

/// The unit as the repository has it: both packages must carry exactly it.
fn repo_unit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/forwarder.service")
}

/// A file's sha256 in `rpm -qp --dump` output (path size mtime sha256 ...).
fn dump_digest(dump: &str, path: &str) -> Result<String> {
    dump.lines()
        .find(|l| l.starts_with(&format!("{path} ")))
        .and_then(|l| l.split(' ').nth(3))
        .map(str::to_string)
        .with_context(|| format!("{path} not in the dump"))
}

#[test]
fn the_deb_carries_the_binary_unit_docs_and_systemd_scripts() {
    let deb = package("FORWARDER_DEB", "forwarder", ".deb");
    let mut checks = Checks::default();
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb)).unwrap();
    checks.add(
        "files",
        (|| {
            contains_all(
                &contents,
                &[
                    "./usr/lib/systemd/system/forwarder.service",
                    "./usr/lib/systemd/system/forwarder-input.service",
                    "./usr/share/doc/forwarder/examples/sys-net.toml",
                    "./usr/share/doc/forwarder/examples/sys-firewall.toml",
                    "./usr/share/doc/forwarder/examples/app-vm-rc.local",
                    "./usr/share/doc/forwarder/qubes.md",
                    "./usr/share/doc/forwarder/changelog.Debian.gz",
                    "./usr/share/doc/forwarder/copyright",
                ],
            )?;
            let binary = contents
                .lines()
                .find(|l| l.ends_with(" ./usr/bin/forwarder"))
                .context("no ./usr/bin/forwarder")?;
            ensure!(binary.starts_with("-rwxr-xr-x 0/0"), "{binary}");
            // Under /etc only the post-install script Qubes runs, executable;
            // the postrm removes it on `remove` (below).
            let etc: Vec<&str> = contents
                .lines()
                .filter(|l| l.contains(" ./etc/") && !l.ends_with('/'))
                .collect();
            ensure!(
                etc.len() == 1
                    && etc[0].starts_with("-rwxr-xr-x 0/0")
                    && etc[0].ends_with(" ./etc/qubes/post-install.d/50-forwarder.sh"),
                "files under /etc: {etc:?}"
            );
            Ok(format!("{} entries", contents.lines().count()))
        })(),
    );
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb)).unwrap();
    checks.add(
        "control",
        contains_all(
            &info,
            &[
                "Package: forwarder",
                "Architecture: amd64",
                "libc6 (>= 2.",
                "nftables",
            ],
        )
        .map(|()| {
            info.lines()
                .find(|l| l.trim_start().starts_with("Depends:"))
                .unwrap_or_default()
                .trim()
                .to_string()
        }),
    );
    checks.add_ok(
        "unit is the repository's",
        deb_member(
            &deb,
            "--fsys-tarfile",
            "./usr/lib/systemd/system/forwarder.service",
        )
        .and_then(|unit| {
            ensure!(
                unit == std::fs::read_to_string(repo_unit())?,
                "differs:\n{unit}"
            );
            Ok(())
        }),
    );
    // deb-systemd-helper's conventions: enabled and started on install,
    // restarted (not stopped) on upgrade, stopped on remove, and on remove
    // the enablement is purged too, so nothing but the user's config stays.
    checks.add_ok(
        "postinst enables and starts both units",
        deb_member(&deb, "--ctrl-tarfile", "./postinst").and_then(|s| {
            contains_all(
                &s,
                &[
                    "deb-systemd-helper enable forwarder.service",
                    "deb-systemd-helper enable forwarder-input.service",
                    "_dh_action=restart",
                    "deb-systemd-invoke $_dh_action forwarder-input.service forwarder.service",
                ],
            )
        }),
    );
    checks.add_ok(
        "the post-install script is the repository's",
        deb_member(
            &deb,
            "--fsys-tarfile",
            "./etc/qubes/post-install.d/50-forwarder.sh",
        )
        .and_then(|script| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            ensure!(
                script == std::fs::read_to_string(root.join("packaging/qubes/50-forwarder.sh"))?,
                "differs:\n{script}"
            );
            contains_all(
                &script,
                &[
                    "qvm-features-request supported-service.forwarder=1",
                    "qvm-features-request supported-service.forwarder-input=1",
                ],
            )
        }),
    );
    checks.add_ok(
        "prerm stops on remove",
        deb_member(&deb, "--ctrl-tarfile", "./prerm").and_then(|s| {
            contains_all(
                &s,
                &[
                    "[ \"$1\" = remove ]",
                    "deb-systemd-invoke stop forwarder-input.service forwarder.service",
                    "/usr/bin/forwarder input --remove",
                ],
            )
        }),
    );
    checks.add_ok(
        "postrm forgets the unit on remove",
        deb_member(&deb, "--ctrl-tarfile", "./postrm").and_then(|s| {
            let after_debhelper = s
                .split("# End automatically added section")
                .last()
                .unwrap_or_default();
            contains_all(
                after_debhelper,
                &[
                    "[ \"$1\" = \"remove\" ]",
                    "for unit in forwarder.service forwarder-input.service",
                    "deb-systemd-helper purge \"$unit\"",
                    "deb-systemd-helper unmask \"$unit\"",
                    "rm -f /etc/qubes/post-install.d/50-forwarder.sh",
                ],
            )?;
            ensure!(
                !code(&s).contains("/rw/"),
                "postrm touches the user's config"
            );
            Ok(())
        }),
    );
    checks.assert_all_pass("the .deb");
}

#[test]
fn the_rpm_carries_the_binary_unit_docs_and_systemd_scriptlets() {
    let rpm = package("FORWARDER_RPM", "forwarder", ".rpm");
    let query = |args: &[&str]| run(Command::new("rpm").arg("-qp").args(args).arg(&rpm));
    let mut checks = Checks::default();
    checks.add(
        "files",
        query(&["-l"]).and_then(|list| {
            let files: BTreeSet<&str> = list.lines().collect();
            let expected: BTreeSet<&str> = [
                "/etc/qubes/post-install.d/50-forwarder.sh",
                "/usr/bin/forwarder",
                "/usr/lib/systemd/system/forwarder-input.service",
                "/usr/lib/systemd/system/forwarder.service",
                "/usr/lib/systemd/system-preset/50-forwarder.preset",
                "/usr/share/doc/forwarder/README.md",
                "/usr/share/doc/forwarder/changelog",
                "/usr/share/doc/forwarder/examples/app-vm-rc.local",
                "/usr/share/doc/forwarder/examples/sys-firewall.toml",
                "/usr/share/doc/forwarder/examples/sys-net.toml",
                "/usr/share/doc/forwarder/qubes.md",
            ]
            .into();
            ensure!(files == expected, "files {files:?}, expected {expected:?}");
            Ok(format!("{} files", files.len()))
        }),
    );
    // rpm --dump: path size mtime sha256 mode ...; the units, the preset
    // and the post-install script are the repository's, byte for byte.
    checks.add_ok(
        "units, preset and post-install script are the repository's",
        query(&["--dump"]).and_then(|dump| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            for (path, source) in [
                (
                    "/usr/lib/systemd/system/forwarder.service",
                    "forwarder.service",
                ),
                (
                    "/usr/lib/systemd/system/forwarder-input.service",
                    "forwarder-input.service",
                ),
                (
                    "/usr/lib/systemd/system-preset/50-forwarder.preset",
                    "rpm/50-forwarder.preset",
                ),
                (
                    "/etc/qubes/post-install.d/50-forwarder.sh",
                    "qubes/50-forwarder.sh",
                ),
            ] {
                ensure!(
                    dump_digest(&dump, path)? == sha256(&root.join("packaging").join(source))?,
                    "{path} differs from packaging/{source}"
                );
            }
            let script = dump
                .lines()
                .find(|l| l.starts_with("/etc/qubes/post-install.d/50-forwarder.sh "))
                .context("no post-install script")?;
            ensure!(script.split(' ').nth(4) == Some("0100755"), "{script}");
            let preset = std::fs::read_to_string(root.join("packaging/rpm/50-forwarder.preset"))?;
            for unit in ["forwarder.service", "forwarder-input.service"] {
                ensure!(
                    preset.lines().any(|l| l == format!("enable {unit}")),
                    "{preset}"
                );
            }
            Ok(())
        }),
    );
    // What Fedora's %systemd_post, %systemd_preun and
    // %systemd_postun_with_restart expand to, each in its own scriptlet.
    checks.add_ok(
        "scriptlets",
        query(&["--scripts"]).and_then(|scripts| {
            let section = |name: &str| -> Result<String> {
                scriptlets(&scripts)
                    .remove(name)
                    .with_context(|| format!("no {name} scriptlet in:\n{scripts}"))
            };
            contains_all(
                &section("postinstall")?,
                &[
                    "[ $1 -eq 1 ]",
                    "systemd-update-helper install-system-units forwarder.service forwarder-input.service",
                ],
            )?;
            contains_all(
                &section("preuninstall")?,
                &[
                    "[ $1 -eq 0 ]",
                    "systemd-update-helper remove-system-units forwarder.service forwarder-input.service",
                ],
            )?;
            contains_all(
                &section("postuninstall")?,
                &[
                    "[ $1 -ge 1 ]",
                    "systemd-update-helper mark-restart-system-units forwarder.service forwarder-input.service",
                ],
            )?;
            ensure!(
                !code(&scripts).contains("/rw/"),
                "a scriptlet touches the user's config"
            );
            Ok(())
        }),
    );
    checks.add(
        "requires",
        query(&["--requires"]).and_then(|requires| {
            contains_all(&requires, &["nftables", "/bin/sh", "libc.so.6(GLIBC_"])?;
            highest_within_floor(&glibc_versions(&requires))
        }),
    );
    checks.assert_all_pass("the .rpm");
}

/// forwarder-dom0: only `qvm-forwarder`, its watch unit (left disabled:
/// no preset enables it) and its docs; no nftables; dom0's glibc (Qubes
/// 4.2's dom0 is Fedora 37, glibc 2.36) is enough.
#[test]
fn the_dom0_rpm_carries_only_qvm_forwarder_and_its_disabled_watch_unit() {
    let rpm = package("FORWARDER_DOM0_RPM", "forwarder-dom0", ".rpm");
    let query = |args: &[&str]| run(Command::new("rpm").arg("-qp").args(args).arg(&rpm));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checks = Checks::default();
    checks.add(
        "name",
        query(&["--queryformat", "%{NAME} %{VERSION}-%{RELEASE}"]).and_then(|name| {
            ensure!(name.starts_with("forwarder-dom0 "), "{name}");
            Ok(name)
        }),
    );
    checks.add(
        "files",
        query(&["-l"]).and_then(|list| {
            let files: BTreeSet<&str> = list.lines().collect();
            let expected: BTreeSet<&str> = [
                "/usr/bin/qvm-forwarder",
                "/usr/lib/systemd/system/qvm-forwarder-watch.service",
                "/usr/share/doc/forwarder-dom0/changelog",
                "/usr/share/doc/forwarder-dom0/qubes.md",
            ]
            .into();
            ensure!(files == expected, "files {files:?}, expected {expected:?}");
            Ok(format!("{} files", files.len()))
        }),
    );
    checks.add_ok(
        "the watch unit is the repository's, and runs qvm-forwarder watch",
        query(&["--dump"]).and_then(|dump| {
            let source = root.join("packaging/dom0/qvm-forwarder-watch.service");
            ensure!(
                dump_digest(&dump, "/usr/lib/systemd/system/qvm-forwarder-watch.service")?
                    == sha256(&source)?
            );
            let binary = dump
                .lines()
                .find(|l| l.starts_with("/usr/bin/qvm-forwarder "))
                .context("no qvm-forwarder")?;
            ensure!(binary.split(' ').nth(4) == Some("0100755"), "{binary}");
            contains_all(
                &std::fs::read_to_string(&source)?,
                &[
                    "ExecStart=/usr/bin/qvm-forwarder watch",
                    "WantedBy=multi-user.target",
                ],
            )
        }),
    );
    checks.add_ok(
        "scriptlets apply the preset (which enables nothing) and stop on removal",
        query(&["--scripts"]).and_then(|scripts| {
            let section = |name: &str| -> Result<String> {
                scriptlets(&scripts)
                    .remove(name)
                    .with_context(|| format!("no {name} scriptlet in:\n{scripts}"))
            };
            contains_all(
                &section("postinstall")?,
                &["systemd-update-helper install-system-units qvm-forwarder-watch.service"],
            )?;
            contains_all(
                &section("preuninstall")?,
                &["systemd-update-helper remove-system-units qvm-forwarder-watch.service"],
            )?;
            contains_all(
                &section("postuninstall")?,
                &["systemd-update-helper mark-restart-system-units qvm-forwarder-watch.service"],
            )?;
            ensure!(
                !scripts.contains("forwarder.service") && !scripts.contains("teardown"),
                "a router's scriptlet in the dom0 package:\n{scripts}"
            );
            Ok(())
        }),
    );
    checks.add(
        "requires",
        query(&["--requires"]).and_then(|requires| {
            ensure!(!requires.contains("nftables"), "{requires}");
            contains_all(&requires, &["libc.so.6(GLIBC_"])?;
            highest_within_floor(&glibc_versions(&requires))
        }),
    );
    checks.assert_all_pass("the dom0 .rpm");
}

/// The binary both packages carry needs no glibc newer than Debian 12's:
/// the highest GLIBC_x.y version among its dynamic symbols, from objdump.
#[test]
fn the_packaged_binary_runs_on_the_oldest_template_glibc() {
    let deb = package("FORWARDER_DEB", "forwarder", ".deb");
    let rpm = package("FORWARDER_RPM", "forwarder", ".rpm");
    let scratch = Scratch::new("glibc");
    let binary = scratch.0.join("forwarder");
    sh(&format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -xO ./usr/bin/forwarder > '{}'",
        deb.display(),
        binary.display()
    ))
    .unwrap();
    let mut checks = Checks::default();
    checks.add(
        "glibc floor",
        run(Command::new("objdump").arg("-T").arg(&binary))
            .and_then(|symbols| highest_within_floor(&glibc_versions(&symbols))),
    );
    checks.add_ok(
        "the .rpm carries the same binary",
        run(Command::new("rpm").args(["-qp", "--dump"]).arg(&rpm)).and_then(|dump| {
            let line = dump
                .lines()
                .find(|l| l.starts_with("/usr/bin/forwarder "))
                .context("no /usr/bin/forwarder in the .rpm")?;
            let digest = sha256(&binary)?;
            ensure!(
                line.split(' ').nth(3) == Some(digest.as_str()),
                "{line} vs {digest}"
            );
            Ok(())
        }),
    );
    checks.assert_all_pass("the packaged binary");
}

#[test]
fn the_tarball_installs_runs_and_uninstalls() {
    let scratch = Scratch::new("tarball");
    let scratch = &scratch.0;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(package("FORWARDER_PACKAGE", "forwarder", ".tar.gz"))
        .arg("-C")
        .arg(scratch))
    .unwrap();
    let unpacked = std::fs::read_dir(scratch)
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
        unit.contains("ExecStart=/usr/bin/forwarder run\n"),
        "{unit}"
    );
    assert!(
        unit.contains("ConditionPathExists=/run/qubes-service/forwarder\n"),
        "{unit}"
    );
    let input =
        std::fs::read_to_string(root.join("etc/systemd/system/forwarder-input.service")).unwrap();
    assert!(
        input.contains("ExecStart=/usr/bin/forwarder input\n")
            && input.contains("ConditionPathExists=/run/qubes-service/forwarder-input\n"),
        "{input}"
    );
    assert!(
        root.join("etc/qubes/post-install.d/50-forwarder.sh")
            .metadata()
            .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0),
        "the post-install script is installed executable"
    );
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
}
