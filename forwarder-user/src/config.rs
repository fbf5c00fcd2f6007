//! The configuration of `forwarder run`: flags, a TOML file, or both.
//! Everything is validated before anything is loaded, by the one function
//! `run` and `check-config` share, against this host's limits too (the
//! multicast groups one socket may join, a pin directory a bpffs can be
//! mounted on without hiding anything); an error names the flag, or the
//! file and key, and what would be valid.
//!
//! How the two combine:
//! - a setting (uplink, defaults, rates, sizes) comes from its flag if
//!   given, else from the file's key, else from its default;
//! - forward rules and relays add up: the file's, the flags' and the
//!   presets' all apply, and a port or group given twice is an error naming
//!   both places. Nothing given as a flag is ever written to the file.
//!
//! In a Qubes router (the `forwarder` qvm-service on) started without rule
//! flags, the file is `--config` or else `/rw/config/forwarder.toml` when it
//! exists, and dom0's share in QubesDB adds its rules and relays to the
//! file's (see `router_share`); with no uplink given, the uplink is the
//! interface of the default route, followed as it changes.

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
        DEFAULT_DOWNSTREAM, DEFAULT_PIN_DIR, DEFAULT_RELAY_RATE, DEFAULT_RELAY_RATE_DOWN, RunArgs,
        TcHook, parse_flow_table_size, parse_ifname, parse_regex, parse_tc_hook,
    },
    multicast, pin,
    presets::{self, Preset},
    qubes_vm::RouterVm,
    rules::{self, Origin, Relay, Rule},
    spec::{AllowFrom, ForwardSpec, RelaySpec, parse_ipv4, parse_rate, parse_ttl},
};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub uplink: String,
    pub downstream: Vec<Regex>,
    /// Default allow-from of rules and relays that name none (also
    /// `rules add`'s).
    pub allow_from: AllowFrom,
    /// Default target of rules that name none (also `rules add`'s).
    pub target: Option<Ipv4Addr>,
    pub rules: Vec<Rule>,
    pub relays: Vec<Relay>,
    /// The presets in use, with their targets.
    pub presets: Vec<(&'static Preset, Ipv4Addr)>,
    pub flow_table_size: u32,
    pub tc_hook: TcHook,
    pub pin_dir: PathBuf,
    /// `--kernel-log`, or the key `kernel_log = true`.
    pub kernel_log: bool,
    /// The file `rules add/del --save` writes to.
    pub config_file: Option<PathBuf>,
    /// Options of relays that set none themselves (QubesDB's relays).
    pub relay_defaults: RelayDefaults,
    /// Follow dom0's share in QubesDB (`/vm-config/forwarder.N`).
    pub qubesdb: bool,
    /// No uplink was given: it is the default route's interface (`uplink`
    /// is empty until there is one).
    pub follow_default_route: bool,
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
    kdeconnect: Option<String>,
    syncthing: Option<String>,
    mdns: Option<String>,
    relay_ttl: Option<i64>,
    relay_rate: Option<i64>,
    relay_rate_down: Option<i64>,
    flow_table_size: Option<i64>,
    tc_hook: Option<String>,
    pin_dir: Option<PathBuf>,
    kernel_log: Option<bool>,
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
    rate_down: Option<i64>,
    allow_from: Option<String>,
}

pub fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where values come from, for error messages.
struct Source<'a> {
    file: Option<&'a Path>,
}

impl Source<'_> {
    /// Parses the file's `key`, naming the file and key on error.
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

    /// A setting: its flag if given (already parsed by clap), else the
    /// file's `key` parsed, else nothing (the caller's default).
    fn layer<T, V: ToString>(
        &self,
        key: &str,
        flag: Option<T>,
        file: Option<&V>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match flag {
            Some(value) => Ok(Some(value)),
            None => file
                .map(|value| self.key(key, &value.to_string(), &parse))
                .transpose(),
        }
    }

    /// "FILE: " or nothing, to start a message about the whole config.
    fn prefix(&self) -> String {
        self.file
            .map(|f| format!("{}: ", f.display()))
            .unwrap_or_default()
    }
}

fn parse_str<T: FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

fn parse_address(s: &str) -> Result<Ipv4Addr, String> {
    parse_ipv4(s, "address")
}

fn parse_expiry(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(s)
        .map_err(|_| format!("{s:?} is not an RFC 3339 time, e.g. 2026-11-22T18:00:00Z"))
}

/// Relay options every relay gets unless its own table says otherwise.
#[derive(Clone, Debug)]
pub struct RelayDefaults {
    pub ttl: Option<u8>,
    pub rate: u32,
    pub rate_down: u32,
    pub allow: AllowFrom,
}

impl RelayDefaults {
    pub fn relay(&self, spec: RelaySpec) -> Relay {
        Relay {
            group: spec.group,
            port: spec.port,
            targets: spec.targets,
            ttl: self.ttl,
            rate: self.rate,
            rate_down: self.rate_down,
            allow: self.allow.clone(),
        }
    }
}

impl RunConfig {
    /// Flags and file layered (see the module's documentation), every value
    /// validated, in this VM as it is.
    pub fn from_args(args: RunArgs) -> Result<Self, String> {
        Self::from_args_in(args, &RouterVm::detect())
    }

    /// As `from_args`, in the VM `vm` describes.
    pub fn from_args_in(mut args: RunArgs, vm: &RouterVm) -> Result<Self, String> {
        let qubesdb = vm.service && !args.names_rules();
        if qubesdb && args.config.is_none() {
            args.config.clone_from(&vm.config_file);
        }
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let src = Source {
            file: args.config.as_deref(),
        };
        let uplink = src.layer("uplink", args.uplink, file.uplink.as_ref(), parse_ifname)?;
        let follow_default_route = uplink.is_none() && qubesdb;
        let uplink = match uplink {
            Some(uplink) => uplink,
            None if follow_default_route => String::new(),
            None => {
                return Err(
                    "--uplink is required (or `uplink` in the --config file; in a Qubes router \
                     with the forwarder qvm-service on and no rule flags, the default route's \
                     interface)"
                        .into(),
                );
            }
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
        let allow_from = src
            .layer(
                "allow_from",
                args.allow_from,
                file.allow_from.as_ref(),
                parse_str,
            )?
            .unwrap_or_default();
        let target = src.layer("target", args.target, file.target.as_ref(), parse_address)?;
        let relay_defaults = RelayDefaults {
            ttl: src.layer(
                "relay_ttl",
                args.relay_ttl,
                file.relay_ttl.as_ref(),
                parse_ttl,
            )?,
            rate: src
                .layer(
                    "relay_rate",
                    args.relay_rate,
                    file.relay_rate.as_ref(),
                    parse_rate,
                )?
                .unwrap_or(DEFAULT_RELAY_RATE),
            rate_down: src
                .layer(
                    "relay_rate_down",
                    args.relay_rate_down,
                    file.relay_rate_down.as_ref(),
                    parse_rate,
                )?
                .unwrap_or(DEFAULT_RELAY_RATE_DOWN),
            allow: allow_from.clone(),
        };
        let flow_table_size = src
            .layer(
                "flow_table_size",
                args.flow_table_size,
                file.flow_table_size.as_ref(),
                parse_flow_table_size,
            )?
            .unwrap_or(forwarder_common::maps::DEFAULT_FLOW_TABLE_SIZE);
        let tc_hook = src
            .layer(
                "tc_hook",
                args.tc_hook,
                file.tc_hook.as_ref(),
                parse_tc_hook,
            )?
            .unwrap_or(TcHook::Auto);
        let (pin_dir, pin_dir_source) = match (args.pin_dir, &file.pin_dir) {
            (Some(dir), _) => (dir, "--pin-dir".to_string()),
            (None, Some(dir)) => (dir.clone(), format!("{}key `pin_dir`", src.prefix())),
            (None, None) => (
                PathBuf::from(DEFAULT_PIN_DIR),
                "the default pin directory".to_string(),
            ),
        };

        let resolve = |spec: &ForwardSpec| {
            spec.target.or(target).ok_or_else(|| {
                format!(
                    "{spec}: no target address; write {spec}=TARGET_IP or give a default target"
                )
            })
        };
        let mut rules = Vec::new();
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
        for spec in &args.forward {
            let target = resolve(spec).map_err(|e| format!("--forward {e}"))?;
            rules.push(Rule::from_spec(
                spec,
                target,
                allow_from.clone(),
                Origin::Flag,
            ));
        }

        let mut relays = Vec::new();
        for (i, table) in file.relay.iter().enumerate() {
            let key = |k: &str| format!("relay[{i}].{k}");
            let spec: RelaySpec = src.key(&key("spec"), &table.spec, parse_str)?;
            let mut relay = relay_defaults.relay(spec);
            if let Some(t) = table.ttl {
                relay.ttl = Some(src.key(&key("ttl"), &t.to_string(), parse_ttl)?);
            }
            if let Some(r) = table.rate {
                relay.rate = src.key(&key("rate"), &r.to_string(), parse_rate)?;
            }
            if let Some(r) = table.rate_down {
                relay.rate_down = src.key(&key("rate_down"), &r.to_string(), parse_rate)?;
            }
            if let Some(a) = &table.allow_from {
                relay.allow = src.key(&key("allow_from"), a, parse_str::<AllowFrom>)?;
            }
            relays.push(relay);
        }
        for spec in args.relay {
            relays.push(relay_defaults.relay(spec));
        }

        let preset_targets = [
            (&presets::LOCALSEND, args.localsend, file.localsend.as_ref()),
            (
                &presets::KDECONNECT,
                args.kdeconnect,
                file.kdeconnect.as_ref(),
            ),
            (&presets::SYNCTHING, args.syncthing, file.syncthing.as_ref()),
            (&presets::MDNS, args.mdns, file.mdns.as_ref()),
        ];
        let mut presets = Vec::new();
        for (preset, flag, key) in preset_targets {
            let target = src.layer(preset.name, flag, key, parse_address)?;
            if let Some(target) = target {
                presets.push((preset, target));
                expand(
                    preset,
                    target,
                    &allow_from,
                    &relay_defaults,
                    &mut rules,
                    &mut relays,
                );
            }
        }

        rules::check(&rules).map_err(|e| format!("{}forward rules: {e}", src.prefix()))?;
        rules::check_relays(&relays).map_err(|e| format!("{}relays: {e}", src.prefix()))?;
        // What this host allows, checked here too so that `check-config`
        // (the unit's ExecStartPre) refuses what would stop the daemon. A
        // sysctl that cannot be read leaves it to the joins to tell.
        if let Ok(max) = multicast::max_memberships() {
            multicast::check_groups(&multicast::groups(relays.iter().map(|r| r.group)), max)
                .map_err(|e| format!("{}relays: {e}", src.prefix()))?;
        }
        check_pin_dir(&pin_dir).map_err(|e| format!("{pin_dir_source}: {e}"))?;
        Ok(RunConfig {
            uplink,
            downstream,
            allow_from,
            target,
            rules,
            relays,
            presets,
            flow_table_size,
            tc_hook,
            pin_dir,
            kernel_log: args.kernel_log || file.kernel_log == Some(true),
            config_file: args.config,
            relay_defaults,
            qubesdb,
            follow_default_route,
        })
    }

    /// What `check-config` reports: the file alone, as `run --config` would
    /// see it with no other flags (in a Qubes router, with QubesDB's share
    /// still to come).
    pub fn check_file(path: &Path) -> Result<Self, String> {
        Self::from_args(RunArgs {
            config: Some(path.to_path_buf()),
            ..RunArgs::default()
        })
    }
}

/// A pin directory `run` can use without hiding anything: one on a bpffs,
/// or one where a bpffs can be mounted over nothing, that is a directory
/// that does not exist yet or is empty. Never an ordinary directory with
/// files in it, such as /run, which the mount would hide.
fn check_pin_dir(dir: &Path) -> Result<(), String> {
    if dir
        .ancestors()
        .find(|p| p.exists())
        .is_some_and(pin::is_bpffs)
    {
        return Ok(());
    }
    let has_entries = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => return Err(format!("{}: {err}", dir.display())),
    };
    if has_entries {
        return Err(format!(
            "{} is a directory with files in it and not on a bpffs, which a bpffs mounted \
             there would hide: give a directory on a bpffs (e.g. {DEFAULT_PIN_DIR}), or one \
             that does not exist yet or is empty",
            dir.display()
        ));
    }
    Ok(())
}

/// The rules and relays of `preset` pointed at `target`.
fn expand(
    preset: &Preset,
    target: Ipv4Addr,
    allow_from: &AllowFrom,
    relay_defaults: &RelayDefaults,
    rules: &mut Vec<Rule>,
    relays: &mut Vec<Relay>,
) {
    for (proto, ports) in preset.forwards {
        let mut rule = Rule::new(
            *proto,
            *ports,
            target,
            ports.first,
            allow_from.clone(),
            Origin::Preset,
        );
        rule.comment = Some(format!("{} preset", preset.name));
        rules.push(rule);
    }
    for (group, port) in preset.relays {
        relays.push(relay_defaults.relay(RelaySpec {
            group: *group,
            port: *port,
            targets: vec![target],
        }));
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
        RunConfig::from_args_in(args, &RouterVm::default())
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
        let err = config(&[]).unwrap_err();
        assert!(err.starts_with("--uplink is required"), "{err}");
        assert!(!c.qubesdb && !c.follow_default_route);
    }

    #[test]
    fn the_kernel_log_comes_from_its_flag_or_its_key() {
        assert!(!config(&["--uplink", "eth0"]).unwrap().kernel_log);
        assert!(
            config(&["--uplink", "eth0", "--kernel-log"])
                .unwrap()
                .kernel_log
        );
        let (_on, on) = file("uplink = \"eth0\"\nkernel_log = true\n");
        assert!(config(&["--config", &on]).unwrap().kernel_log);
        let (_bad, bad) = file("uplink = \"eth0\"\nkernel_log = \"yes\"\n");
        let err = config(&["--config", &bad]).unwrap_err();
        assert!(err.contains("kernel_log"), "{err}");
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
            (Ipv4Addr::new(224, 0, 0, 167), Some(2), 25)
        );
        assert_eq!(c.rules[0].comment.as_deref(), Some("localsend preset"));
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
            err.contains("localsend preset") && err.contains("--forward"),
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

    #[test]
    fn app_presets_expand_to_ranges_broadcast_relays_and_mdns() {
        let c = config(&[
            "--uplink",
            "eth0",
            "--kdeconnect",
            "10.137.0.17",
            "--syncthing",
            "10.137.0.17",
            "--mdns",
            "10.137.0.17",
        ])
        .unwrap();
        let rules: Vec<String> = c.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            rules,
            [
                "tcp:1714-1764 -> 10.137.0.17:1714-1764 (allow-from auto)",
                "udp:1714-1764 -> 10.137.0.17:1714-1764 (allow-from auto)",
                "tcp:22000 -> 10.137.0.17:22000 (allow-from auto)",
                "udp:22000 -> 10.137.0.17:22000 (allow-from auto)",
            ]
        );
        let relays: Vec<(Ipv4Addr, u16)> = c.relays.iter().map(|r| (r.group, r.port)).collect();
        assert_eq!(
            relays,
            [
                (Ipv4Addr::BROADCAST, 1716),
                (Ipv4Addr::BROADCAST, 21027),
                (Ipv4Addr::new(224, 0, 0, 251), 5353)
            ]
        );
        assert_eq!(
            c.relays[2].encode(0).flags,
            forwarder_common::maps::RELAY_DNS_QUERIES_UP,
            "mDNS relays only queries up"
        );
        assert_eq!(c.relays[0].encode(0).flags, 0);
        let names: Vec<&str> = c.presets.iter().map(|(p, _)| p.name).collect();
        assert_eq!(names, ["kdeconnect", "syncthing", "mdns"]);
        let err = config(&[
            "--uplink",
            "eth0",
            "--kdeconnect",
            "10.137.0.17",
            "--forward",
            "tcp:1740=10.137.0.18",
        ])
        .unwrap_err();
        assert!(
            err.contains("tcp:1714-1764")
                && err.contains("kdeconnect preset")
                && err.contains("tcp:1740"),
            "{err}"
        );
    }

    fn qubes_config(args: &[&str], file: Option<&str>) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(["forwarder", "run"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let Command::Run(args) = cli.command else {
            unreachable!()
        };
        let held = file.map(tempfile_path::TempPath::new);
        let vm = RouterVm {
            service: true,
            config_file: held.as_ref().map(|f| f.0.clone()),
        };
        RunConfig::from_args_in(args, &vm)
    }

    #[test]
    fn a_qubes_router_follows_qubesdb_with_the_file_and_the_default_route() {
        let c = qubes_config(&[], None).unwrap();
        assert!(c.qubesdb && c.follow_default_route, "{c:?}");
        assert_eq!((c.uplink.as_str(), c.config_file.as_deref()), ("", None));
        assert!(c.rules.is_empty() && c.relays.is_empty());

        let c = qubes_config(
            &[],
            Some("relay_rate = 7\n[[forward]]\nspec = \"tcp:8080=10.137.0.9\"\n"),
        )
        .unwrap();
        assert!(c.qubesdb && c.follow_default_route);
        assert!(c.config_file.is_some(), "/rw/config/forwarder.toml is read");
        assert_eq!(c.rules[0].origin, Origin::File);
        assert_eq!(
            c.relay_defaults.rate, 7,
            "QubesDB's relays take the file's rates"
        );

        let c = qubes_config(&["--uplink", "eth1"], Some("uplink = \"eth0\"\n")).unwrap();
        assert!(c.qubesdb && !c.follow_default_route);
        assert_eq!(c.uplink, "eth1");

        for flags in [
            &["--uplink", "eth0", "--localsend", "10.137.0.17"][..],
            &["--uplink", "eth0", "--forward", "tcp:80=10.137.0.17"],
            &[
                "--uplink",
                "eth0",
                "--relay",
                "224.0.0.167:53317=10.137.0.17",
            ],
        ] {
            let c = qubes_config(flags, Some("")).unwrap();
            assert!(
                !c.qubesdb && c.config_file.is_none(),
                "{flags:?}: rule flags, no QubesDB"
            );
        }
        let err = qubes_config(&["--localsend", "10.137.0.17"], None).unwrap_err();
        assert!(err.starts_with("--uplink is required"), "{err}");
    }

    #[test]
    fn a_pin_dir_with_files_off_a_bpffs_is_refused_naming_its_key() {
        let base = std::env::temp_dir().join(format!("forwarder-pin-dir-{}", std::process::id()));
        let busy = base.join("busy");
        let empty = base.join("empty");
        std::fs::create_dir_all(&busy).unwrap();
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::write(busy.join("keep"), "mine").unwrap();
        let (_f, path) = file(&format!(
            "uplink = \"eth0\"\npin_dir = \"{}\"\n",
            busy.display()
        ));
        let err = RunConfig::check_file(Path::new(&path)).unwrap_err();
        assert!(
            err.contains(&format!("{path}: key `pin_dir`"))
                && err.contains("with files in it")
                && err.contains("does not exist yet or is empty"),
            "{err}"
        );
        let busy_arg = busy.display().to_string();
        let err = config(&["--uplink", "eth0", "--pin-dir", &busy_arg]).unwrap_err();
        assert!(
            err.starts_with("--pin-dir: ") && err.contains(&busy_arg),
            "{err}"
        );
        for usable in [empty.clone(), base.join("new/deeper")] {
            let arg = usable.display().to_string();
            assert!(
                config(&["--uplink", "eth0", "--pin-dir", &arg]).is_ok(),
                "{arg}"
            );
        }
        let arg = busy.join("keep").display().to_string();
        assert!(
            config(&["--uplink", "eth0", "--pin-dir", &arg]).is_err(),
            "a file"
        );
        let _ = std::fs::remove_dir_all(&base);
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
    fn flags_override_settings_and_add_to_lists() {
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
        let rules: Vec<(u16, Origin)> = c.rules.iter().map(|r| (r.ports.first, r.origin)).collect();
        assert_eq!(
            rules,
            [
                (8080, Origin::File),
                (5000, Origin::File),
                (1, Origin::Flag)
            ],
            "the file's rules and the flags' rules both apply"
        );
        assert_eq!(
            c.relays[0].rate, 5,
            "a relay's own rate beats the global one"
        );
        assert_eq!(c.allow_from.to_string(), "192.168.1.0/24");
        let err = config(&["--config", &path, "--forward", "tcp:8080=10.0.0.1"]).unwrap_err();
        assert!(
            err.contains("tcp:8080") && err.contains("--forward") && err.contains("file"),
            "a port in both is an error naming both: {err}"
        );
    }

    #[test]
    fn relays_take_their_own_allow_from_and_rates() {
        let (_f, path) = file(
            "uplink = \"eth0\"\nrelay_rate_down = 40\n[[relay]]\nspec = \"239.1.1.1:9=10.0.0.2\"\nallow_from = \"192.168.1.7\"\nrate_down = 3\n[[relay]]\nspec = \"239.1.1.2:9=10.0.0.2\"\n",
        );
        let c = config(&["--config", &path]).unwrap();
        assert_eq!(c.relays[0].allow.to_string(), "192.168.1.7/32");
        assert_eq!((c.relays[0].rate_down, c.relays[1].rate_down), (3, 40));
        assert_eq!(c.relays[1].allow, AllowFrom::Auto);
        assert_eq!(c.flow_table_size, 65_536);
        let c = config(&["--config", &path, "--flow-table-size", "4096"]).unwrap();
        assert_eq!(c.flow_table_size, 4096);
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
                "uplink = \"eth0\"\nflow_table_size = 10\n",
                vec!["key `flow_table_size`", "1024"],
            ),
            (
                "uplink = \"eth0\"\n[[relay]]\nspec = \"239.1.1.1:9=10.0.0.2\"\nallow_from = \"x\"\n",
                vec!["key `relay[0].allow_from`", "auto, any"],
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
                vec!["both forward tcp:80"],
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
