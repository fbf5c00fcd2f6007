//! The configuration of `forwarder run`: flags, a TOML file, or both (flags
//! win). Everything is validated before anything is loaded; an error names
//! the flag, or the file and key, and the accepted form.

use std::{
    fmt::Display,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
    time::SystemTime,
};

use regex::Regex;
use serde::Deserialize;

use crate::{
    cli::{
        DEFAULT_DOWNSTREAM, DEFAULT_PIN_DIR, DEFAULT_RELAY_RATE, RunArgs, parse_ifname, parse_regex,
    },
    rules::{self, Origin, Relay, Rule},
    spec::{AllowFrom, ForwardSpec, Proto, RelaySpec, parse_rate, parse_ttl},
};

/// LocalSend's port and discovery group (protocol v2).
pub const LOCALSEND_PORT: u16 = 53317;
pub const LOCALSEND_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 167);

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub uplink: String,
    pub downstream: Vec<Regex>,
    /// Default allow-from of rules that name none (also `rules add`'s).
    pub allow_from: AllowFrom,
    /// Default target of rules that name none (also `rules add`'s).
    pub target: Option<Ipv4Addr>,
    pub rules: Vec<Rule>,
    pub relays: Vec<Relay>,
    pub pin_dir: PathBuf,
    /// The file `rules add/del --save` writes to.
    pub config_file: Option<PathBuf>,
}

/// The file's keys. Values stay strings or numbers here and are parsed
/// below, so an error can name the key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    uplink: Option<String>,
    downstream: Option<Vec<String>>,
    target: Option<String>,
    allow_from: Option<String>,
    localsend: Option<String>,
    relay_ttl: Option<i64>,
    relay_rate: Option<i64>,
    pin_dir: Option<PathBuf>,
    #[serde(default)]
    forward: Vec<ForwardTable>,
    #[serde(default)]
    relay: Vec<RelayTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardTable {
    spec: String,
    allow_from: Option<String>,
    comment: Option<String>,
    /// RFC 3339; written by `rules add --expire --save`.
    expires: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayTable {
    spec: String,
    ttl: Option<i64>,
    rate: Option<i64>,
}

pub fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where a value came from, for error messages.
struct Source<'a> {
    file: Option<&'a Path>,
}

impl Source<'_> {
    fn key<T, E: Display>(
        &self,
        key: &str,
        value: &str,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<T, String> {
        parse(value).map_err(|e| match self.file {
            Some(file) => format!("{}: key `{key}`: {e}", file.display()),
            None => format!("`{key}`: {e}"),
        })
    }

    fn number<T>(
        &self,
        key: &str,
        value: i64,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        self.key(key, &value.to_string(), parse)
    }
}

fn parse_str<T: FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))
}

fn parse_expiry(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(s)
        .map_err(|_| format!("{s:?} is not an RFC 3339 time, e.g. 2026-11-22T18:00:00Z"))
}

impl RunConfig {
    /// Flags over file over defaults, every value validated.
    pub fn from_args(args: RunArgs) -> Result<Self, String> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let src = Source {
            file: args.config.as_deref(),
        };
        let required = "--uplink is required (or `uplink` in the --config file)";
        let uplink = match (args.uplink, &file.uplink) {
            (Some(uplink), _) => uplink,
            (None, Some(uplink)) => src.key("uplink", uplink, parse_ifname)?,
            (None, None) => return Err(required.into()),
        };
        let downstream = if !args.downstream.is_empty() {
            args.downstream
        } else if let Some(list) = &file.downstream {
            list.iter()
                .enumerate()
                .map(|(i, re)| src.key(&format!("downstream[{i}]"), re, parse_regex))
                .collect::<Result<_, _>>()?
        } else {
            vec![Regex::new(DEFAULT_DOWNSTREAM).expect("the default pattern is valid")]
        };
        let allow_from = match (args.allow_from, &file.allow_from) {
            (Some(a), _) => a,
            (None, Some(a)) => src.key("allow_from", a, parse_str::<AllowFrom>)?,
            (None, None) => AllowFrom::Auto,
        };
        let target = match (args.target, &file.target) {
            (Some(t), _) => Some(t),
            (None, Some(t)) => Some(src.key("target", t, parse_ipv4)?),
            (None, None) => None,
        };
        let localsend = match (args.localsend, &file.localsend) {
            (Some(t), _) => Some(t),
            (None, Some(t)) => Some(src.key("localsend", t, parse_ipv4)?),
            (None, None) => None,
        };
        let relay_ttl = match (args.relay_ttl, file.relay_ttl) {
            (Some(t), _) => Some(t),
            (None, Some(t)) => Some(src.number("relay_ttl", t, parse_ttl)?),
            (None, None) => None,
        };
        let relay_rate = match (args.relay_rate, file.relay_rate) {
            (Some(r), _) => r,
            (None, Some(r)) => src.number("relay_rate", r, parse_rate)?,
            (None, None) => DEFAULT_RELAY_RATE,
        };
        let pin_dir = args
            .pin_dir
            .or(file.pin_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));

        let resolve = |spec: &ForwardSpec| {
            spec.target.or(target).ok_or_else(|| {
                format!(
                    "{spec}: no target address; write {spec}=TARGET_IP or give a default target"
                )
            })
        };
        let mut rules = Vec::new();
        if !args.forward.is_empty() {
            for spec in &args.forward {
                let target = resolve(spec).map_err(|e| format!("--forward {e}"))?;
                rules.push(Rule::from_spec(
                    spec,
                    target,
                    allow_from.clone(),
                    Origin::Flag,
                ));
            }
        } else {
            for (i, table) in file.forward.iter().enumerate() {
                let key = |k: &str| format!("forward[{i}].{k}");
                let spec: ForwardSpec = src.key(&key("spec"), &table.spec, parse_str)?;
                let target = src.key(&key("spec"), &table.spec, |_| resolve(&spec))?;
                let mut rule = Rule::from_spec(&spec, target, allow_from.clone(), Origin::File);
                if let Some(a) = &table.allow_from {
                    rule.allow = src.key(&key("allow_from"), a, parse_str::<AllowFrom>)?;
                }
                rule.comment = table.comment.clone();
                if let Some(e) = &table.expires {
                    rule.expires = Some(src.key(&key("expires"), e, parse_expiry)?);
                }
                rules.push(rule);
            }
        }

        let mut relays = Vec::new();
        if !args.relay.is_empty() {
            for spec in args.relay {
                relays.push(relay_from(spec, relay_ttl, relay_rate));
            }
        } else {
            for (i, table) in file.relay.iter().enumerate() {
                let key = |k: &str| format!("relay[{i}].{k}");
                let spec: RelaySpec = src.key(&key("spec"), &table.spec, parse_str)?;
                let ttl = match table.ttl {
                    Some(t) => Some(src.number(&key("ttl"), t, parse_ttl)?),
                    None => relay_ttl,
                };
                let rate = match table.rate {
                    Some(r) => src.number(&key("rate"), r, parse_rate)?,
                    None => relay_rate,
                };
                relays.push(relay_from(spec, ttl, rate));
            }
        }

        if let Some(target) = localsend {
            for proto in [Proto::Tcp, Proto::Udp] {
                rules.push(Rule::new(
                    proto,
                    LOCALSEND_PORT,
                    target,
                    LOCALSEND_PORT,
                    allow_from.clone(),
                    Origin::Preset,
                ));
            }
            relays.push(relay_from(
                RelaySpec {
                    group: LOCALSEND_GROUP,
                    port: LOCALSEND_PORT,
                    targets: vec![target],
                },
                relay_ttl,
                relay_rate,
            ));
        }
        let origin = if args.config.is_some() {
            format!("{}: ", src_name(&src))
        } else {
            String::new()
        };
        rules::check(&rules).map_err(|e| {
            format!("{origin}forward rules (--forward, `forward`, --localsend): {e}")
        })?;
        rules::check_relays(&relays)
            .map_err(|e| format!("{origin}relays (--relay, `relay`, --localsend): {e}"))?;
        Ok(RunConfig {
            uplink,
            downstream,
            allow_from,
            target,
            rules,
            relays,
            pin_dir,
            config_file: args.config,
        })
    }

    /// What `check-config` reports: the file alone, as `run --config` would
    /// see it with no other flags.
    pub fn check_file(path: &Path) -> Result<Self, String> {
        Self::from_args(RunArgs {
            config: Some(path.to_path_buf()),
            ..RunArgs::default()
        })
    }
}

fn src_name(src: &Source<'_>) -> String {
    src.file
        .map(|f| f.display().to_string())
        .unwrap_or_default()
}

fn relay_from(spec: RelaySpec, ttl: Option<u8>, rate: u32) -> Relay {
    Relay {
        group: spec.group,
        port: spec.port,
        targets: spec.targets,
        ttl,
        rate,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(["forwarder", "run"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let Command::Run(args) = cli.command else {
            unreachable!()
        };
        RunConfig::from_args(args)
    }

    fn file(text: &str) -> (tempfile_path::TempPath, String) {
        let path = tempfile_path::TempPath::new(text);
        let p = path.0.display().to_string();
        (path, p)
    }

    /// A file removed on drop, for config tests.
    mod tempfile_path {
        use std::path::PathBuf;
        pub struct TempPath(pub PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "forwarder-config-test-{}-{}.toml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, text).unwrap();
                TempPath(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults() {
        let c = config(&["--uplink", "eth0"]).unwrap();
        assert_eq!(c.allow_from, AllowFrom::Auto);
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert!(c.downstream[0].is_match("vif12.0") && !c.downstream[0].is_match("vif12.0-emu"));
        assert!(c.rules.is_empty() && c.relays.is_empty());
        assert_eq!(
            config(&[]).unwrap_err(),
            "--uplink is required (or `uplink` in the --config file)"
        );
    }

    #[test]
    fn targets_resolve_from_the_spec_or_the_default() {
        let c = config(&[
            "--uplink",
            "eth0",
            "--forward",
            "tcp:80",
            "--forward",
            "udp:53=10.0.0.9:5353",
            "--target",
            "10.0.0.1",
        ])
        .unwrap();
        assert_eq!(
            (c.rules[0].target, c.rules[0].target_port),
            (Ipv4Addr::new(10, 0, 0, 1), 80)
        );
        assert_eq!(
            (c.rules[1].target, c.rules[1].target_port),
            (Ipv4Addr::new(10, 0, 0, 9), 5353)
        );
        let err = config(&["--uplink", "eth0", "--forward", "tcp:80"]).unwrap_err();
        assert!(
            err.contains("--forward tcp:80") && err.contains("default target"),
            "{err}"
        );
    }

    #[test]
    fn localsend_preset_expands_to_two_forwards_and_a_relay() {
        let c = config(&[
            "--uplink",
            "eth0",
            "--localsend",
            "10.137.0.17",
            "--relay-ttl",
            "2",
        ])
        .unwrap();
        let forwards: Vec<String> = c.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            forwards,
            [
                "tcp:53317 -> 10.137.0.17:53317 (allow-from auto)",
                "udp:53317 -> 10.137.0.17:53317 (allow-from auto)"
            ]
        );
        assert!(c.rules.iter().all(|r| r.origin == Origin::Preset));
        assert_eq!(
            (c.relays[0].group, c.relays[0].ttl, c.relays[0].rate),
            (LOCALSEND_GROUP, Some(2), 25)
        );
        let err = config(&[
            "--uplink",
            "eth0",
            "--localsend",
            "10.137.0.17",
            "--forward",
            "tcp:53317=10.0.0.1",
        ])
        .unwrap_err();
        assert!(
            err.contains("--localsend") && err.contains("forwarded twice"),
            "{err}"
        );
        let err = config(&[
            "--uplink",
            "eth0",
            "--localsend",
            "10.137.0.17",
            "--relay",
            "224.0.0.167:53317=10.0.0.1",
        ])
        .unwrap_err();
        assert!(err.contains("relayed twice"), "{err}");
    }

    const FULL: &str = r#"
uplink = "wls6f0"
downstream = ['^vif[0-9]+\.[0-9]+$', "^virbr0$"]
allow_from = "192.168.1.0/24"
target = "10.137.0.5"
relay_ttl = 2
relay_rate = 10
pin_dir = "/sys/fs/bpf/fw-test"

[[forward]]
spec = "tcp:8080=10.137.0.5:80"
comment = "web"

[[forward]]
spec = "udp:5000"
allow_from = "any"
expires = "2030-01-01T00:00:00Z"

[[relay]]
spec = "239.255.255.250:1900=10.137.0.5"
rate = 5
"#;

    #[test]
    fn a_file_holds_everything_the_flags_hold() {
        let (_f, path) = file(FULL);
        let c = config(&["--config", &path]).unwrap();
        assert_eq!(c.uplink, "wls6f0");
        assert_eq!(c.downstream.len(), 2);
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/fw-test"));
        assert_eq!(
            c.rules[0].to_string(),
            "tcp:8080 -> 10.137.0.5:80 (allow-from 192.168.1.0/24)"
        );
        assert_eq!(c.rules[0].comment.as_deref(), Some("web"));
        assert_eq!(
            c.rules[1].to_string(),
            "udp:5000 -> 10.137.0.5:5000 (allow-from any)"
        );
        assert!(c.rules[1].expires.is_some());
        assert!(c.rules.iter().all(|r| r.origin == Origin::File));
        assert_eq!((c.relays[0].ttl, c.relays[0].rate), (Some(2), 5));
        assert_eq!(c.config_file.as_deref(), Some(Path::new(&path)));
    }

    #[test]
    fn flags_override_the_file() {
        let (_f, path) = file(FULL);
        let c = config(&[
            "--config",
            &path,
            "--uplink",
            "eth1",
            "--forward",
            "tcp:1=10.0.0.1",
            "--relay-rate",
            "7",
        ])
        .unwrap();
        assert_eq!(c.uplink, "eth1");
        assert_eq!(c.rules.len(), 1, "flags replace the file's list");
        assert_eq!(c.rules[0].origin, Origin::Flag);
        assert_eq!(
            c.relays[0].rate, 5,
            "a relay's own rate beats the global one"
        );
        assert_eq!(c.allow_from.to_string(), "192.168.1.0/24");
    }

    #[test]
    fn file_errors_name_the_file_the_key_and_the_form() {
        for (text, needles) in [
            (
                "uplink = \"eth0\"\nuplnk = 1\n",
                vec!["unknown field `uplnk`", "expected one of"],
            ),
            (
                "uplink = \"a/b\"\n",
                vec!["key `uplink`", "1-15 characters"],
            ),
            (
                "uplink = \"eth0\"\nallow_from = \"lan\"\n",
                vec!["key `allow_from`", "auto, any"],
            ),
            (
                "uplink = \"eth0\"\ntarget = \"x\"\n",
                vec!["key `target`", "not an IPv4 address"],
            ),
            (
                "uplink = \"eth0\"\nrelay_ttl = 0\n",
                vec!["key `relay_ttl`", "1 to 255"],
            ),
            (
                "uplink = \"eth0\"\nrelay_rate = \"fast\"\n",
                vec!["relay_rate", "invalid type"],
            ),
            (
                "uplink = \"eth0\"\ndownstream = [\"(\"]\n",
                vec!["key `downstream[0]`", "regular expression"],
            ),
            (
                "uplink = \"eth0\"\n[[forward]]\nspec = \"tcp:0=10.0.0.1\"\n",
                vec!["key `forward[0].spec`", "PROTO:PORT"],
            ),
            (
                "uplink = \"eth0\"\n[[forward]]\nspec = \"tcp:80\"\n",
                vec!["key `forward[0].spec`", "no target"],
            ),
            (
                "uplink = \"eth0\"\n[[forward]]\nspec = \"tcp:80=10.0.0.1\"\nexpires = \"soon\"\n",
                vec!["forward[0].expires", "RFC 3339"],
            ),
            (
                "uplink = \"eth0\"\n[[forward]]\nspec = \"tcp:80=10.0.0.1\"\nport = 3\n",
                vec!["unknown field `port`"],
            ),
            (
                "uplink = \"eth0\"\n[[relay]]\nspec = \"10.0.0.1:1=10.0.0.2\"\n",
                vec!["key `relay[0].spec`", "multicast"],
            ),
            (
                "uplink = \"eth0\"\n[[forward]]\nspec = \"tcp:80=10.0.0.1\"\n[[forward]]\nspec = \"tcp:80=10.0.0.2\"\n",
                vec!["forwarded twice"],
            ),
            ("uplink = [\n", vec!["TOML parse error"]),
        ] {
            let (_f, path) = file(text);
            let err = RunConfig::check_file(Path::new(&path)).unwrap_err();
            assert!(err.contains(&path), "{text}: {err}");
            for needle in needles {
                assert!(err.contains(needle), "{text}: missing {needle:?} in {err}");
            }
        }
        let err = RunConfig::check_file(Path::new("/nonexistent/forwarder.toml")).unwrap_err();
        assert!(
            err.contains("/nonexistent/forwarder.toml") && err.contains("No such file"),
            "{err}"
        );
    }
}

/// Rewrites the `[[forward]]` tables of the config file to hold `rules`,
/// keeping every other key, comment and the layout (toml_edit), through a
/// temporary file and a rename so a crash never leaves half a file. Rules
/// implied by the localsend preset are not written: the preset key implies
/// them.
pub fn save_rules(path: &Path, rules: &[Rule]) -> Result<(), String> {
    let fail = |e: &dyn Display| format!("saving to {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| fail(&e))?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| fail(&e))?;
    let mut tables = toml_edit::ArrayOfTables::new();
    for rule in rules.iter().filter(|r| r.origin != Origin::Preset) {
        let mut table = toml_edit::Table::new();
        let spec = ForwardSpec {
            proto: rule.proto,
            port: rule.port,
            target: Some(rule.target),
            target_port: (rule.target_port != rule.port).then_some(rule.target_port),
        };
        table["spec"] = toml_edit::value(spec.to_string());
        table["allow_from"] = toml_edit::value(rule.allow.to_string());
        if let Some(comment) = &rule.comment {
            table["comment"] = toml_edit::value(comment.as_str());
        }
        if let Some(expires) = rule.expires {
            table["expires"] =
                toml_edit::value(humantime::format_rfc3339_seconds(expires).to_string());
        }
        tables.push(table);
    }
    doc.remove("forward");
    if !tables.is_empty() {
        doc.insert("forward", toml_edit::Item::ArrayOfTables(tables));
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, doc.to_string()).map_err(|e| fail(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| fail(&e))
}

#[cfg(test)]
mod save_tests {
    use super::*;

    #[test]
    fn saving_keeps_the_rest_of_the_file_and_round_trips() {
        let path =
            std::env::temp_dir().join(format!("forwarder-save-test-{}.toml", std::process::id()));
        let original = "# sys-net\nuplink = \"wls6f0\" # the Wi-Fi\nlocalsend = \"10.137.0.5\"\n\n[[forward]]\nspec = \"tcp:22=10.137.0.5\"\n";
        std::fs::write(&path, original).unwrap();
        let config = RunConfig::check_file(&path).unwrap();
        let mut rules = config.rules.clone();
        let mut web = Rule::new(
            Proto::Tcp,
            8080,
            Ipv4Addr::new(10, 137, 0, 5),
            80,
            AllowFrom::Any,
            Origin::Live,
        );
        web.comment = Some("web server".into());
        web.expires = Some(humantime::parse_rfc3339("2031-05-06T07:08:09Z").unwrap());
        rules.push(web);
        rules.retain(|r| r.port != 22);
        save_rules(&path, &rules).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# sys-net\nuplink = \"wls6f0\" # the Wi-Fi\n"),
            "{text}"
        );
        assert!(!text.contains("tcp:22"), "{text}");
        assert!(
            !text.contains("tcp:53317"),
            "preset rules stay implied: {text}"
        );
        let reloaded = RunConfig::check_file(&path).unwrap();
        let web = reloaded.rules.iter().find(|r| r.port == 8080).unwrap();
        assert_eq!(
            web.to_string(),
            "tcp:8080 -> 10.137.0.5:80 (allow-from any)"
        );
        assert_eq!(web.comment.as_deref(), Some("web server"));
        assert_eq!(
            humantime::format_rfc3339_seconds(web.expires.unwrap()).to_string(),
            "2031-05-06T07:08:09Z"
        );
        assert_eq!(
            reloaded.rules.len(),
            3,
            "two preset rules and the saved one"
        );
        let _ = std::fs::remove_file(&path);
    }
}
