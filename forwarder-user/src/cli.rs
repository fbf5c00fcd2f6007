//! Command-line interface. Values are parsed by the types in `spec`, so a bad
//! value is rejected by clap with a message naming the flag and the form.

use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use regex::Regex;

use crate::spec::{AllowFrom, ForwardSpec, RelaySpec, parse_rate, parse_ttl};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/forwarder";
/// Qubes' own naming of the backend side of a VM's network interface; the
/// anchors keep the `-emu` devices of HVM stub domains out.
pub const DEFAULT_DOWNSTREAM: &str = r"^vif[0-9]+\.[0-9]+$";
/// Copies per second one relay may send to the LAN: far above what
/// discovery protocols announce, far below what would eat a WLAN's airtime
/// at the basic rate multicast goes out at.
pub const DEFAULT_RELAY_RATE: &str = "25";

#[derive(Debug, Parser)]
#[command(
    name = "forwarder",
    version,
    about = "eBPF port forwarding for VMs behind NATing router VMs"
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
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface facing the LAN (or the next router up the chain).
    #[arg(long, value_name = "IFACE", value_parser = parse_ifname)]
    pub uplink: String,

    /// Regular expression selecting downstream interfaces (repeatable).
    #[arg(long = "downstream", value_name = "REGEX", value_parser = parse_regex,
          default_value = DEFAULT_DOWNSTREAM)]
    pub downstream: Vec<Regex>,

    /// Forward a port of the uplink's address to a target (repeatable).
    #[arg(long = "forward", value_name = "PROTO:PORT[=TARGET_IP[:TARGET_PORT]]")]
    pub forward: Vec<ForwardSpec>,

    /// Target for --forward specs that name none.
    #[arg(long, value_name = "IP")]
    pub target: Option<Ipv4Addr>,

    /// Peers allowed to use forward rules: auto, any, or CIDR[,CIDR...].
    /// auto is the uplink's subnet when its prefix is shorter than /32,
    /// otherwise any.
    #[arg(long, value_name = "auto|any|CIDR[,CIDR...]", default_value = "auto")]
    pub allow_from: AllowFrom,

    /// Copy UDP datagrams to a multicast group between the LAN and the
    /// targets, both ways (repeatable).
    #[arg(long = "relay", value_name = "GROUP:PORT=TARGET_IP[,TARGET_IP...]")]
    pub relay: Vec<RelaySpec>,

    /// TTL of relay copies sent to the LAN [default: the sender's].
    #[arg(long, value_name = "N", value_parser = parse_ttl)]
    pub relay_ttl: Option<u8>,

    /// Per-relay limit of copies sent to the LAN, in packets per second.
    #[arg(long, value_name = "PKTS/S", value_parser = parse_rate, default_value = DEFAULT_RELAY_RATE)]
    pub relay_rate: u32,

    /// LocalSend preset: forward tcp:53317 and udp:53317 to TARGET_IP and
    /// relay 224.0.0.167:53317 to and from it.
    #[arg(long, value_name = "TARGET_IP")]
    pub localsend: Option<Ipv4Addr>,

    /// bpffs directory for this instance's pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| format!("not a valid regular expression: {e}"))
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

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli = parse(&["run", "--uplink", "eth0"]).unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.uplink, "eth0");
        assert_eq!(args.allow_from, AllowFrom::Auto);
        assert_eq!(args.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(args.downstream.len(), 1);
        assert!(args.downstream[0].is_match("vif12.0"));
        assert!(!args.downstream[0].is_match("vif12.0-emu"));
    }

    #[test]
    fn repeated_flags_accumulate() {
        let cli = parse(&[
            "run",
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
        ])
        .unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.forward.len(), 2);
        assert_eq!(
            args.downstream.len(),
            2,
            "explicit patterns replace the default"
        );
    }

    #[test]
    fn bad_values_name_the_flag_and_the_form() {
        for (args, flag, form) in [
            (
                vec!["--forward", "tcp:x"],
                "--forward",
                "PROTO:PORT[=TARGET_IP[:TARGET_PORT]]",
            ),
            (vec!["--allow-from", "lan"], "--allow-from", "auto, any"),
            (
                vec!["--downstream", "("],
                "--downstream",
                "regular expression",
            ),
            (vec!["--target", "10.0.0"], "--target", "IP"),
            (
                vec!["--relay", "10.0.0.1:1=10.0.0.2"],
                "--relay",
                "GROUP:PORT=TARGET_IP",
            ),
            (vec!["--relay-rate", "0"], "--relay-rate", "PKTS/s"),
            (vec!["--relay-ttl", "300"], "--relay-ttl", "1 to 255"),
            (
                vec!["--localsend", "sys-firewall"],
                "--localsend",
                "TARGET_IP",
            ),
        ] {
            let mut full = vec!["run", "--uplink", "eth0"];
            full.extend(args);
            let err = parse(&full).unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
            assert!(err.contains(form), "{err}");
        }
        let err = parse(&["run", "--uplink", "a/b"]).unwrap_err().to_string();
        assert!(
            err.contains("--uplink") && err.contains("1-15 characters"),
            "{err}"
        );
        assert!(
            parse(&["run"])
                .unwrap_err()
                .to_string()
                .contains("--uplink")
        );
    }
}
