//! `qvm-forwarder`'s command line. Values are parsed by the types the
//! router side uses, so a bad one is refused here, naming the flag and the
//! accepted form, before anything is written.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use super::intent::{What, parse_what};
use crate::{
    cli::parse_duration,
    spec::{AllowFrom, RuleRef},
    vm_config::entry::Note,
};

#[derive(Debug, Parser)]
#[command(
    name = "qvm-forwarder",
    version,
    about = "Expose a qube to the LAN through every router of its netvm chain",
    long_about = "Expose a qube to the LAN through every router of its netvm chain.\n\n\
        Runs in dom0 (qubesd's socket) or in an admin qube (qrexec to dom0). \
        What is exposed is kept in dom0 as the qube's forwarder-expose feature; \
        each router gets its share as vm-config.forwarder.N features, which Qubes \
        exports to its QubesDB, and the exposed qube what to admit as \
        vm-config.forwarder-input.N. Nothing is written inside any qube."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forward ports of the LAN-facing router's address to a qube, through
    /// every router between them.
    Expose(ExposeArgs),
    /// Stop forwarding some ports or presets to a qube, or all of them.
    Unexpose(UnexposeArgs),
    /// Every exposed qube, its chain, its items and their state.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// A qube's chain hop by hop, and what is wrong with it.
    Check {
        /// The qube to check.
        vm: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Recompute every router's share from the current netvm and ip
    /// properties, and remove what is stale.
    Sync(WriteArgs),
    /// Sync, then follow qubesd's events and sync again within a second of
    /// a netvm, ip or domain change, until interrupted.
    Watch(WriteArgs),
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Print each feature that would be set or removed, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct ExposeArgs {
    /// The qube to expose.
    pub vm: String,

    /// Ports to forward, to the same ports of the qube (tcp:8080,
    /// udp:5000-5010).
    #[arg(value_name = "PROTO:PORT[-LAST]")]
    pub specs: Vec<RuleRef>,

    /// LocalSend: tcp and udp 53317, and its discovery group 224.0.0.167.
    #[arg(long)]
    pub localsend: bool,

    /// KDE Connect: tcp and udp 1714-1764, and its broadcasts to 1716.
    #[arg(long)]
    pub kdeconnect: bool,

    /// Syncthing: tcp and udp 22000, and its broadcasts to 21027.
    #[arg(long)]
    pub syncthing: bool,

    /// mDNS lookups from the qube: 224.0.0.251:5353, its queries only going
    /// up.
    #[arg(long)]
    pub mdns: bool,

    /// LAN peers allowed, at every router and in the qube: auto, any, or
    /// CIDR[,CIDR...] [default: auto: the LAN router's subnet].
    #[arg(long, value_name = "auto|any|CIDR[,CIDR...]")]
    pub allow_from: Option<AllowFrom>,

    /// Stop forwarding after this long (e.g. 90s, 30m, 2h); kept as a
    /// deadline in UTC.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub expire: Option<Duration>,

    /// A note shown by list and carried to the routers.
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<Note>,

    #[command(flatten)]
    pub write: WriteArgs,
}

impl ExposeArgs {
    /// The ports and presets asked for, in the order given.
    pub fn items(&self) -> Vec<What> {
        let presets = [
            (self.localsend, "localsend"),
            (self.kdeconnect, "kdeconnect"),
            (self.syncthing, "syncthing"),
            (self.mdns, "mdns"),
        ];
        let presets = presets
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| parse_what(name).expect("a preset's own name"));
        self.specs
            .iter()
            .map(|rule| What::Forward(*rule))
            .chain(presets)
            .collect()
    }
}

#[derive(Debug, Args)]
pub struct UnexposeArgs {
    /// The qube.
    pub vm: String,

    /// What to stop forwarding: PROTO:PORT[-LAST] as exposed, or a preset's
    /// name (localsend, kdeconnect, syncthing, mdns) [default: everything].
    #[arg(value_name = "SPEC", value_parser = parse_what)]
    pub specs: Vec<What>,

    #[command(flatten)]
    pub write: WriteArgs,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("qvm-forwarder").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// docs/qubes.md's table of commands says what `--help` says: a row
    /// per command, with its description and every one of its flags.
    #[test]
    fn the_guide_lists_every_command_as_help_does() {
        let guide = include_str!("../../../docs/qubes.md");
        let cli = Cli::command();
        for command in cli.get_subcommands() {
            let name = command.get_name();
            let row = guide
                .lines()
                .find(|l| l.starts_with(&format!("| `qvm-forwarder {name}")))
                .unwrap_or_else(|| panic!("docs/qubes.md has no row for {name}"));
            let about = command
                .get_about()
                .expect("every command says what it does");
            assert!(
                row.ends_with(&format!("| {about} |")),
                "{name}: --help says {about:?}; the guide's row is {row}"
            );
            for arg in command.get_arguments() {
                let shown = match arg.get_long() {
                    Some(long) => format!("--{long}"),
                    None => arg
                        .get_value_names()
                        .and_then(|v| v.first())
                        .map(ToString::to_string)
                        .unwrap_or_else(|| arg.get_id().to_string().to_uppercase()),
                };
                assert!(row.contains(&shown), "{name}: {shown} is missing in {row}");
            }
        }
    }

    #[test]
    fn expose_takes_specs_presets_and_attributes() {
        let cli = parse(&[
            "expose",
            "app",
            "tcp:8080",
            "--localsend",
            "--allow-from",
            "192.168.1.0/24",
            "--expire",
            "2h",
            "--comment",
            "phone",
            "--dry-run",
        ])
        .unwrap();
        let Command::Expose(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(args.vm, "app");
        let items: Vec<String> = args.items().iter().map(ToString::to_string).collect();
        assert_eq!(items, ["tcp:8080", "localsend"]);
        assert_eq!(args.expire, Some(Duration::from_secs(7200)));
        assert!(args.write.dry_run);
    }

    #[test]
    fn bad_values_name_the_flag_and_the_form() {
        for (args, needles) in [
            (
                vec!["expose", "app", "tcp:0"],
                vec!["PROTO:PORT", "not a port number"],
            ),
            (
                vec!["expose", "app", "--allow-from", "lan"],
                vec!["--allow-from", "auto, any"],
            ),
            (
                vec!["expose", "app", "--expire", "soon"],
                vec!["--expire", "duration"],
            ),
            (
                vec!["expose", "app", "--comment", "a|b"],
                vec!["--comment", "printable ASCII"],
            ),
            (
                vec!["unexpose", "app", "ftp"],
                vec!["SPEC", "localsend, kdeconnect"],
            ),
        ] {
            let err = parse(&args).unwrap_err().to_string();
            for needle in needles {
                assert!(err.contains(needle), "{args:?}: {err}");
            }
        }
    }
}
