//! The validated configuration of `forwarder run`.

use std::{net::Ipv4Addr, path::PathBuf};

use regex::Regex;

use crate::{
    cli::RunArgs,
    rules::{self, Relay, Rule},
    spec::{ForwardSpec, Proto, RelaySpec},
};

/// LocalSend's port and discovery group (protocol v2).
pub const LOCALSEND_PORT: u16 = 53317;
pub const LOCALSEND_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 167);

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub uplink: String,
    pub downstream: Vec<Regex>,
    pub rules: Vec<Rule>,
    pub relays: Vec<Relay>,
    pub pin_dir: PathBuf,
}

impl RunConfig {
    /// Resolves targets and checks the rule set as a whole. Errors name the
    /// flag at fault.
    pub fn from_args(args: RunArgs) -> Result<Self, String> {
        let mut forwards = args.forward.clone();
        let mut relay_specs = args.relay.clone();
        if let Some(target) = args.localsend {
            for proto in [Proto::Tcp, Proto::Udp] {
                forwards.push(ForwardSpec {
                    proto,
                    port: LOCALSEND_PORT,
                    target: Some(target),
                    target_port: None,
                });
            }
            relay_specs.push(RelaySpec {
                group: LOCALSEND_GROUP,
                port: LOCALSEND_PORT,
                targets: vec![target],
            });
        }
        let mut rules = Vec::with_capacity(forwards.len());
        for spec in &forwards {
            let target = spec.target.or(args.target).ok_or_else(|| {
                format!(
                    "--forward {spec}: no target address; write {spec}=TARGET_IP or give --target IP"
                )
            })?;
            rules.push(Rule {
                proto: spec.proto,
                port: spec.port,
                target,
                target_port: spec.target_port.unwrap_or(spec.port),
                allow: args.allow_from.clone(),
            });
        }
        rules::check(&rules).map_err(|e| format!("--forward/--localsend: {e}"))?;
        let relays: Vec<Relay> = relay_specs
            .into_iter()
            .map(|spec| Relay {
                group: spec.group,
                port: spec.port,
                targets: spec.targets,
                ttl: args.relay_ttl,
                rate: args.relay_rate,
            })
            .collect();
        rules::check_relays(&relays).map_err(|e| format!("--relay/--localsend: {e}"))?;
        Ok(RunConfig {
            uplink: args.uplink,
            downstream: args.downstream,
            rules,
            relays,
            pin_dir: args.pin_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(["forwarder", "run", "--uplink", "eth0"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let Command::Run(args) = cli.command;
        RunConfig::from_args(args)
    }

    #[test]
    fn targets_resolve_from_the_spec_or_the_default() {
        let c = config(&[
            "--forward",
            "tcp:80",
            "--forward",
            "udp:53=10.0.0.9:5353",
            "--target",
            "10.0.0.1",
        ])
        .unwrap();
        assert_eq!(c.rules[0].target, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(c.rules[0].target_port, 80);
        assert_eq!(c.rules[1].target, Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(c.rules[1].target_port, 5353);
    }

    #[test]
    fn missing_target_names_the_flag() {
        let err = config(&["--forward", "tcp:80"]).unwrap_err();
        assert!(
            err.contains("--forward tcp:80") && err.contains("--target"),
            "{err}"
        );
    }

    #[test]
    fn localsend_preset_expands_to_two_forwards_and_a_relay() {
        let c = config(&["--localsend", "10.137.0.17", "--relay-ttl", "2"]).unwrap();
        let forwards: Vec<String> = c.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            forwards,
            [
                "tcp:53317 -> 10.137.0.17:53317 (allow-from auto)",
                "udp:53317 -> 10.137.0.17:53317 (allow-from auto)"
            ]
        );
        assert_eq!(c.relays.len(), 1);
        assert_eq!(c.relays[0].group, LOCALSEND_GROUP);
        assert_eq!(c.relays[0].ttl, Some(2));
        assert_eq!(c.relays[0].rate, 25);
        let err = config(&[
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
            "--localsend",
            "10.137.0.17",
            "--relay",
            "224.0.0.167:53317=10.0.0.1",
        ])
        .unwrap_err();
        assert!(err.contains("relayed twice"), "{err}");
    }

    #[test]
    fn conflicting_rules_name_the_flag() {
        let err = config(&[
            "--forward",
            "tcp:80=10.0.0.1",
            "--forward",
            "tcp:80=10.0.0.2",
        ])
        .unwrap_err();
        assert!(err.starts_with("--forward"), "{err}");
    }
}
