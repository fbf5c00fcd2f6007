//! Command-line interface. Values are parsed by the types in `spec`, so a bad
//! value is rejected by clap with a message naming the flag and the form.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use regex::Regex;

use crate::{
    datapath::HookKind,
    rules::MAX_EXPIRE,
    spec::{AllowFrom, ForwardSpec, RelaySpec, RuleRef, parse_rate, parse_ttl},
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/forwarder";
/// Qubes' own naming of the backend side of a VM's network interface; the
/// anchors keep the `-emu` devices of HVM stub domains out.
pub const DEFAULT_DOWNSTREAM: &str = r"^vif[0-9]+\.[0-9]+$";
/// Copies per second one relay may send to the LAN: far above what
/// discovery protocols announce, far below what would eat a WLAN's airtime
/// at the basic rate multicast goes out at.
pub const DEFAULT_RELAY_RATE: u32 = 25;
/// Copies per second one relay may send toward the VMs: room for a busy
/// LAN's discovery traffic, far below line rate.
pub const DEFAULT_RELAY_RATE_DOWN: u32 = 100;

#[derive(Debug, Parser)]
#[command(
    name = "forwarder",
    version,
    about = "eBPF port forwarding and multicast relay for VMs behind NATing router VMs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the datapath and keep it current until SIGINT or SIGTERM,
    /// then remove everything it created.
    Run(RunArgs),
    /// Show what a running instance does, read from its pinned maps.
    Inspect(InspectArgs),
    /// Change or list the forward rules of a running instance.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// List the forwarded flows the datapath tracks, like `conntrack -L`,
    /// read from the pinned maps.
    Flows(FlowsArgs),
    /// Validate a configuration file as `run` would, against this host's
    /// limits, without loading anything.
    CheckConfig {
        /// The TOML file `run --config` would read.
        file: PathBuf,
    },
    /// Remove everything a dead instance left: clsact filters, TCX links,
    /// pins, records and the nftables table. Refuses while its daemon runs.
    Teardown(TeardownArgs),
    /// In an exposed Qubes VM: admit in its own firewall (qubes
    /// custom-input) what dom0 exposes it for (/vm-config/forwarder-input.N),
    /// live, until SIGINT or SIGTERM, then remove it.
    Input(InputArgs),
}

#[derive(Debug, Args)]
pub struct InputArgs {
    /// Remove what an earlier run added (its chain and the jump to it),
    /// and exit.
    #[arg(long)]
    pub remove: bool,
}

#[derive(Debug, Args)]
pub struct TeardownArgs {
    /// Pin directory of the instance.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// For ExecStopPost=: remove nothing when $SERVICE_RESULT says the
    /// daemon failed rather than stopped; systemd starts it again, and the
    /// new daemon adopts what is pinned.
    #[arg(long)]
    pub unless_failed: bool,
}

#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// TOML file with any of the settings below; flags override it, and a
    /// repeatable flag given on the command line replaces the file's list.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface facing the LAN (or the next router up the chain).
    #[arg(long, value_name = "IFACE", value_parser = parse_ifname)]
    pub uplink: Option<String>,

    /// Regular expression selecting downstream interfaces (repeatable)
    /// [default: ^vif[0-9]+\.[0-9]+$].
    #[arg(long = "downstream", value_name = "REGEX", value_parser = parse_regex)]
    pub downstream: Vec<Regex>,

    /// Forward a port of the uplink's address to a target (repeatable).
    #[arg(long = "forward", value_name = "PROTO:PORT[=TARGET_IP[:TARGET_PORT]]")]
    pub forward: Vec<ForwardSpec>,

    /// Target for forward specs that name none.
    #[arg(long, value_name = "IP")]
    pub target: Option<Ipv4Addr>,

    /// Peers allowed to use forward rules: auto, any, or CIDR[,CIDR...].
    /// auto is the uplink's subnet when its prefix is shorter than /32,
    /// otherwise any [default: auto].
    #[arg(long, value_name = "auto|any|CIDR[,CIDR...]")]
    pub allow_from: Option<AllowFrom>,

    /// Copy UDP datagrams to a multicast group between the LAN and the
    /// targets, both ways (repeatable).
    #[arg(long = "relay", value_name = "GROUP:PORT=TARGET_IP[,TARGET_IP...]")]
    pub relay: Vec<RelaySpec>,

    /// TTL of relay copies sent to the LAN [default: the sender's].
    #[arg(long, value_name = "N", value_parser = parse_ttl)]
    pub relay_ttl: Option<u8>,

    /// Per-relay limit of copies sent to the LAN, in packets per second
    /// [default: 25].
    #[arg(long, value_name = "PKTS/S", value_parser = parse_rate)]
    pub relay_rate: Option<u32>,

    /// LocalSend preset: forward tcp:53317 and udp:53317 to TARGET_IP and
    /// relay 224.0.0.167:53317 to and from it.
    #[arg(long, value_name = "TARGET_IP")]
    pub localsend: Option<Ipv4Addr>,

    /// KDE Connect preset: forward tcp and udp 1714-1764 to TARGET_IP and
    /// relay broadcasts to 255.255.255.255:1716 to and from it.
    #[arg(long, value_name = "TARGET_IP")]
    pub kdeconnect: Option<Ipv4Addr>,

    /// Syncthing preset: forward tcp:22000 and udp:22000 to TARGET_IP and
    /// relay local discovery broadcasts to 255.255.255.255:21027.
    #[arg(long, value_name = "TARGET_IP")]
    pub syncthing: Option<Ipv4Addr>,

    /// mDNS lookups from TARGET_IP: relay 224.0.0.251:5353 both ways, its
    /// queries only going up (never its answers).
    #[arg(long, value_name = "TARGET_IP")]
    pub mdns: Option<Ipv4Addr>,

    /// Per-relay limit of copies sent toward the VMs, in packets per second
    /// [default: 100].
    #[arg(long, value_name = "PKTS/S", value_parser = parse_rate)]
    pub relay_rate_down: Option<u32>,

    /// How programs attach: tcx (kernel 6.6+), clsact (any kernel; the
    /// filters sit in a fixed slot a restart replaces), or auto: tcx where
    /// the kernel has it [default: auto].
    #[arg(long, value_name = "auto|tcx|clsact", value_parser = parse_tc_hook)]
    pub tc_hook: Option<TcHook>,

    /// Forwarded flows the datapath tracks at once; the least recently used
    /// is forgotten when full (its peer's next packet brings it back)
    /// [default: 65536].
    #[arg(long, value_name = "N", value_parser = parse_flow_table_size)]
    pub flow_table_size: Option<u32>,

    /// bpffs directory for this instance's pinned maps and links; one off a
    /// bpffs must not exist yet or be empty, and gets a bpffs mounted
    /// [default: /sys/fs/bpf/forwarder].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// Log what only the kernel sees (a helper's unexpected code, a refused
    /// redirect, copy or map update) as warnings under forwarder::ebpf, at
    /// most one of a kind a second. Set when the programs load: takes effect
    /// at start.
    #[arg(long)]
    pub kernel_log: bool,
}

impl RunArgs {
    /// Whether the command line gives forward rules or relays itself: such
    /// an instance never follows QubesDB.
    pub fn names_rules(&self) -> bool {
        !self.forward.is_empty()
            || !self.relay.is_empty()
            || self.localsend.is_some()
            || self.kdeconnect.is_some()
            || self.syncthing.is_some()
            || self.mdns.is_some()
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Pin directory of the instance to inspect.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// Machine-readable output (one object; with --watch, one per line).
    #[arg(long)]
    pub json: bool,

    /// Refresh until interrupted, with packet and byte rates.
    #[arg(long)]
    pub watch: bool,

    /// Refresh interval for --watch.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,

    /// Also each attached program's cost per packet and packets, from the
    /// kernel's run-time statistics while they are on
    /// (kernel.bpf_stats_enabled; they add two clock reads to every run of
    /// every BPF program on the host); with --watch, per interval too.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Pin directory of the instance.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Add a forward rule to the running instance.
    Add {
        /// The rule, as --forward takes it.
        #[arg(value_name = "PROTO:PORT[=TARGET_IP[:TARGET_PORT]]")]
        spec: ForwardSpec,
        /// Peers allowed to use it [default: the instance's --allow-from].
        #[arg(long, value_name = "auto|any|CIDR[,CIDR...]")]
        allow_from: Option<AllowFrom>,
        /// Remove the rule after this long (e.g. 90s, 30m, 2h; at most
        /// 100y).
        #[arg(long, value_name = "DURATION", value_parser = parse_expire)]
        expire: Option<Duration>,
        /// Free text shown by `rules list`.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
        /// Also write the rule to the instance's --config file.
        #[arg(long)]
        save: bool,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Remove a forward rule from the running instance.
    Del {
        /// The rule's protocol and listen port.
        #[arg(value_name = "PROTO:PORT")]
        rule: RuleRef,
        /// Also remove it from the instance's --config file.
        #[arg(long)]
        save: bool,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// List the running instance's forward rules.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

pub fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| format!("not a valid regular expression: {e}"))
}

/// `--tc-hook`: a hook kind, or auto.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    Auto,
    Fixed(HookKind),
}

pub fn parse_tc_hook(s: &str) -> Result<TcHook, String> {
    match s {
        "auto" => Ok(TcHook::Auto),
        other => other.parse().map(TcHook::Fixed),
    }
}

/// `--flow-table-size`: 1,024 to 16,777,216 entries.
pub fn parse_flow_table_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ 1024..=16_777_216) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a flow table size: expected 1024 to 16777216 entries"
        )),
    }
}

/// Durations as humans write them: 90s, 30m, 2h, 1h30m.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "{s:?} is not a duration: expected e.g. 90s, 30m, 2h or 1h30m"
        )),
    }
}

/// `--expire`: a duration of at most `MAX_EXPIRE`. Parsing never
/// overflows: humantime refuses a number too large for a duration.
pub fn parse_expire(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Ok(d) if d <= MAX_EXPIRE => Ok(d),
        _ => Err(format!(
            "{s:?} is not a duration of at most 100 years: expected e.g. 90s, 30m, 2h, 1h30m or 100y"
        )),
    }
}

/// Linux interface names: 1-15 bytes, no '/', ':' or whitespace.
pub fn parse_ifname(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not an interface name: 1-15 characters without '/', ':' or spaces"
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("forwarder").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let mut full = vec!["run"];
        full.extend(args);
        match parse(&full).unwrap().command {
            Command::Run(args) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn repeated_flags_accumulate() {
        let args = run_args(&[
            "--uplink",
            "eth0",
            "--forward",
            "tcp:1=10.0.0.1",
            "--forward",
            "udp:2=10.0.0.1",
            "--downstream",
            "^a",
            "--downstream",
            "^b",
        ]);
        assert_eq!(args.forward.len(), 2);
        assert_eq!(args.downstream.len(), 2);
    }

    #[test]
    fn bad_values_name_the_flag_and_the_form() {
        for (args, flag, form) in [
            (
                vec!["run", "--forward", "tcp:x"],
                "--forward",
                "PROTO:PORT[=TARGET_IP[:TARGET_PORT]]",
            ),
            (
                vec!["run", "--allow-from", "lan"],
                "--allow-from",
                "auto, any",
            ),
            (
                vec!["run", "--downstream", "("],
                "--downstream",
                "regular expression",
            ),
            (vec!["run", "--target", "10.0.0"], "--target", "IP"),
            (
                vec!["run", "--relay", "10.0.0.1:1=10.0.0.2"],
                "--relay",
                "GROUP:PORT=TARGET_IP",
            ),
            (vec!["run", "--relay-rate", "0"], "--relay-rate", "PKTS/s"),
            (
                vec!["run", "--relay-rate-down", "x"],
                "--relay-rate-down",
                "PKTS/s",
            ),
            (
                vec!["run", "--flow-table-size", "12"],
                "--flow-table-size",
                "1024 to 16777216",
            ),
            (
                vec!["run", "--tc-hook", "xdp"],
                "--tc-hook",
                "auto, tcx or clsact",
            ),
            (vec!["run", "--relay-ttl", "300"], "--relay-ttl", "1 to 255"),
            (
                vec!["run", "--localsend", "sys-firewall"],
                "--localsend",
                "TARGET_IP",
            ),
            (
                vec!["run", "--uplink", "a/b"],
                "--uplink",
                "1-15 characters",
            ),
            (
                vec!["rules", "add", "tcp:80", "--expire", "soon"],
                "--expire",
                "90s, 30m",
            ),
            (vec!["rules", "del", "tcp"], "PROTO:PORT", "tcp:8080"),
            (
                vec!["inspect", "--interval", "0s"],
                "--interval",
                "duration",
            ),
        ] {
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
            assert!(err.contains(form), "{args:?}: {err}");
        }
    }

    #[test]
    fn expiries_up_to_100_years_parse_and_nothing_longer_panics() {
        for (text, secs) in [("1s", 1), ("2h", 7200), ("100y", MAX_EXPIRE.as_secs())] {
            assert_eq!(parse_expire(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        for text in [
            "0s",
            "100y1s",
            "101y",
            "8000y",
            "300000000000y",
            "18446744073709551615s",
            "18446744073709551616s",
            "99999999999999999999999999y",
            "584942417355y",
            "",
            "y",
        ] {
            let err = parse_expire(text).unwrap_err();
            assert!(err.contains("at most 100 years"), "{text}: {err}");
        }
        let err = parse(&["rules", "add", "tcp:80", "--expire", "8000y"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--expire") && err.contains("at most 100 years"),
            "{err}"
        );
    }

    #[test]
    fn rules_subcommands() {
        let cli = parse(&[
            "rules",
            "add",
            "tcp:8080=10.0.0.1:80",
            "--expire",
            "2h",
            "--comment",
            "web",
            "--save",
        ])
        .unwrap();
        let Command::Rules(RulesCommand::Add {
            spec,
            expire,
            comment,
            save,
            pin_dir,
            ..
        }) = cli.command
        else {
            panic!("not rules add");
        };
        assert_eq!(spec.to_string(), "tcp:8080=10.0.0.1:80");
        assert_eq!(expire, Some(Duration::from_secs(7200)));
        assert_eq!(comment.as_deref(), Some("web"));
        assert!(save);
        assert_eq!(pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        let cli = parse(&["rules", "del", "udp:53317"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Rules(RulesCommand::Del { .. })
        ));
        assert!(matches!(
            parse(&["check-config", "x.toml"]).unwrap().command,
            Command::CheckConfig { .. }
        ));
    }
}
