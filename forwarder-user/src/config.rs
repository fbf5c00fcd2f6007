//! The validated configuration of `forwarder run`.

use std::path::PathBuf;

use regex::Regex;

use crate::{
    cli::RunArgs,
    rules::{self, Rule},
};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub uplink: String,
    pub downstream: Vec<Regex>,
    pub rules: Vec<Rule>,
    pub pin_dir: PathBuf,
}

impl RunConfig {
    /// Resolves targets and checks the rule set as a whole. Errors name the
    /// flag at fault.
    pub fn from_args(args: RunArgs) -> Result<Self, String> {
        let mut rules = Vec::with_capacity(args.forward.len());
        for spec in &args.forward {
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
        rules::check(&rules).map_err(|e| format!("--forward: {e}"))?;
        Ok(RunConfig {
            uplink: args.uplink,
            downstream: args.downstream,
            rules,
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
