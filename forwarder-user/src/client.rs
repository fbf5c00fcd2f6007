//! `forwarder rules`: requests to the daemon over its control socket, and
//! the answers rendered for people or as JSON.

use anyhow::{Result, bail};

use crate::{
    cli::RulesCommand,
    control::{self, Request, Response},
    inspect::human_bytes,
    rule_view::{RuleView, expires_text},
};

pub fn render(rules: &[RuleView]) -> String {
    if rules.is_empty() {
        return "no forward rules\n".into();
    }
    let mut out = format!(
        "{:<12} {:<22} {:<20} {:<10} {:<8} {:>6} {:>9} {:>10} {:>9} {:>10}  {}\n",
        "RULE",
        "TARGET",
        "ALLOW FROM",
        "EXPIRES IN",
        "FROM",
        "FLOWS",
        "IN PKTS",
        "IN BYTES",
        "OUT PKTS",
        "OUT BYTES",
        "COMMENT"
    );
    for r in rules {
        out += &format!(
            "{:<12} {:<22} {:<20} {:<10} {:<8} {:>6} {:>9} {:>10} {:>9} {:>10}  {}\n",
            r.name(),
            r.target_text(),
            r.allow_from,
            expires_text(r.expires_in_secs),
            r.origin.map_or("?", |o| o.name()),
            r.flows,
            r.packets_in,
            human_bytes(r.bytes_in as f64),
            r.packets_out,
            human_bytes(r.bytes_out as f64),
            r.comment.as_deref().unwrap_or(""),
        );
    }
    out
}

pub fn run(command: RulesCommand) -> Result<()> {
    let (pin_dir, request, json) = match command {
        RulesCommand::Add {
            spec,
            allow_from,
            expire,
            comment,
            save,
            pin_dir,
        } => (
            pin_dir,
            Request::Add {
                spec: spec.to_string(),
                allow_from: allow_from.map(|a| a.to_string()),
                expire_secs: expire.map(|d| d.as_secs().max(1)),
                comment,
                save,
            },
            false,
        ),
        RulesCommand::Del {
            rule,
            save,
            pin_dir,
        } => (
            pin_dir,
            Request::Del {
                rule: rule.to_string(),
                save,
            },
            false,
        ),
        RulesCommand::List { json, pin_dir } => (pin_dir, Request::List, json),
    };
    let response: Response = control::request(&pin_dir, &request)?;
    if !response.ok {
        bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the daemon refused without saying why".into())
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&response.rules)?);
        return Ok(());
    }
    if let Some(message) = &response.message {
        println!("{message}");
    }
    if matches!(request, Request::List) {
        print!("{}", render(&response.rules));
    }
    Ok(())
}
