//! `qvm-forwarder list [--json]`: every exposed qube, its chain, and each
//! item's state: applied, refused (and why) or expired; then what `sync`
//! would still change.

use std::{io::Write, time::SystemTime};

use anyhow::Result;
use serde::Serialize;

use super::{admin::Admin, chain::Hop, graph::Graph, intent::Item, plan::Report, sync};

#[derive(Debug, Serialize)]
pub struct ItemView {
    pub item: String,
    pub allow_from: String,
    /// RFC 3339, UTC.
    pub until: Option<String>,
    pub comment: Option<String>,
    /// `applied`, `refused` or `expired`.
    pub state: &'static str,
    pub reason: Option<String>,
}

impl ItemView {
    fn new(item: &Item, state: &'static str, reason: Option<&str>) -> Self {
        ItemView {
            item: item.what.to_string(),
            allow_from: item.attrs.allow.to_string(),
            until: item
                .attrs
                .until
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            comment: item.attrs.note.as_ref().map(ToString::to_string),
            state,
            reason: reason.map(String::from),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ExposureView {
    pub vm: String,
    /// From the qube's netvm up; empty when the chain is refused.
    pub chain: Vec<Hop>,
    pub refusal: Option<String>,
    pub items: Vec<ItemView>,
}

impl ExposureView {
    pub fn new(report: &Report) -> Self {
        let (chain, refusal) = match &report.chain {
            Ok(chain) => (chain.hops.clone(), None),
            Err(refusal) => (Vec::new(), Some(refusal.to_string())),
        };
        let applied = report
            .applied
            .iter()
            .map(|i| ItemView::new(i, "applied", None));
        let refused = report
            .refused
            .iter()
            .map(|(i, why)| ItemView::new(i, "refused", Some(why)));
        let expired = report
            .expired
            .iter()
            .map(|i| ItemView::new(i, "expired", None));
        ExposureView {
            vm: report.vm.clone(),
            chain,
            refusal,
            items: applied.chain(refused).chain(expired).collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ListView {
    pub exposures: Vec<ExposureView>,
    pub problems: Vec<String>,
    /// The writes `sync` would make.
    pub pending: Vec<String>,
}

pub fn run(admin: &Admin, json: bool, out: &mut dyn Write) -> Result<()> {
    let mut graph = Graph::load(admin)?;
    let outcome = sync::compute(&mut graph, None, SystemTime::now())?;
    let view = ListView {
        exposures: outcome.plan.reports.iter().map(ExposureView::new).collect(),
        problems: outcome.problems.clone(),
        pending: outcome.changes.iter().map(|c| c.describe(true)).collect(),
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
    } else {
        write!(out, "{}", text(&view))?;
    }
    Ok(())
}

fn text(view: &ListView) -> String {
    let mut out = String::new();
    if view.exposures.is_empty() {
        out.push_str("no qube is exposed\n");
    }
    for e in &view.exposures {
        let mut path = e.vm.clone();
        for hop in &e.chain {
            path.push_str(&format!(" <- {} (to {})", hop.router, hop.target));
        }
        out.push_str(&path);
        out.push('\n');
        if let Some(refusal) = &e.refusal {
            out.push_str(&format!("  not applied: {refusal}\n"));
        }
        for item in &e.items {
            let mut line = format!("  {:<12} {}", item.item, item.state);
            if let Some(reason) = &item.reason {
                line.push_str(&format!(": {reason}"));
            }
            if item.allow_from != "auto" {
                line.push_str(&format!(", allow-from {}", item.allow_from));
            }
            if let Some(until) = &item.until {
                line.push_str(&format!(", until {until}"));
            }
            if let Some(comment) = &item.comment {
                line.push_str(&format!(", \"{comment}\""));
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    for problem in &view.problems {
        out.push_str(&format!("problem: {problem}\n"));
    }
    if !view.pending.is_empty() {
        out.push_str(&format!(
            "{} write(s) pending; `qvm-forwarder sync` makes them:\n",
            view.pending.len()
        ));
        for change in &view.pending {
            out.push_str(&format!("  {change}\n"));
        }
    }
    out
}
