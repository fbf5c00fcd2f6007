//! `qvm-forwarder check VM [--json]`: the qube's netvm chain hop by hop
//! (name, class, ip, provides_network, running, forwarder service on,
//! package announced), and every reason forwarding to it would not work.

use std::{io::Write, time::SystemTime};

use anyhow::Result;
use serde::Serialize;

use super::{
    admin::Admin,
    chain::{self, Domains as _, MAX_HOPS, SUPPORTED_INPUT_SERVICE, SUPPORTED_SERVICE},
    graph::Graph,
    list::ExposureView,
    list::ItemView,
    sync::{self, Change, INPUT_SERVICE, SERVICE},
};

#[derive(Debug, Serialize)]
pub struct HopView {
    pub name: String,
    pub class: Option<String>,
    pub ip: Option<String>,
    pub provides_network: bool,
    pub running: bool,
    /// `service.forwarder` on a router, `service.forwarder-input` on the
    /// qube itself.
    pub service: Option<bool>,
    /// The template announced the forwarder package (the router's or the
    /// input side's supported-service).
    pub package: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct CheckView {
    pub vm: String,
    /// The qube first, then its netvm, and up.
    pub hops: Vec<HopView>,
    pub items: Vec<ItemView>,
    /// What stops forwarding, or will.
    pub problems: Vec<String>,
    /// What is fine but worth knowing.
    pub notes: Vec<String>,
}

pub fn run(admin: &Admin, vm: &str, json: bool, out: &mut dyn Write) -> Result<bool> {
    let mut graph = Graph::load(admin)?;
    let view = check(&mut graph, vm)?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
    } else {
        write!(out, "{}", text(&view))?;
    }
    Ok(view.problems.is_empty())
}

fn check(graph: &mut Graph, vm: &str) -> Result<CheckView> {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut hops = Vec::new();
    let mut input_package = true;
    for (i, name) in walk(graph, vm)?.into_iter().enumerate() {
        let Some(info) = graph.info(&name).cloned() else {
            hops.push(HopView {
                name,
                class: None,
                ip: None,
                provides_network: false,
                running: false,
                service: None,
                package: None,
            });
            continue;
        };
        let router = i > 0;
        let ip = if info.is_dom0() {
            None
        } else {
            graph.ip(&name)?.map(|ip| ip.to_string())
        };
        let provides_network = !info.is_dom0() && graph.provides_network(&name)?;
        let (service, package) = if router && !info.is_dom0() {
            let service = graph.feature(&name, SERVICE)?.as_deref() == Some("1");
            let package = graph
                .feature_with_template(&name, SUPPORTED_SERVICE)?
                .as_deref()
                == Some("1");
            if !package {
                problems.push(format!(
                    "{name}: its template has not announced the forwarder package \
                     ({SUPPORTED_SERVICE}); install it in the template and restart {name}"
                ));
            }
            (Some(service), Some(package))
        } else if !router && !info.is_dom0() {
            let service = graph.feature(&name, INPUT_SERVICE)?.as_deref() == Some("1");
            let package = graph
                .feature_with_template(&name, SUPPORTED_INPUT_SERVICE)?
                .as_deref()
                == Some("1");
            input_package = package;
            (Some(service), Some(package))
        } else {
            (None, None)
        };
        if !info.is_running() {
            notes.push(if router {
                format!("{name} is not running; it applies its share when it starts")
            } else {
                format!("{name} is not running")
            });
        }
        hops.push(HopView {
            name,
            class: Some(info.class.clone()),
            ip,
            provides_network,
            running: info.is_running(),
            service,
            package,
        });
    }
    if let Err(refusal) = chain::resolve(graph, vm)? {
        problems.push(refusal.to_string());
    }

    let outcome = sync::compute(graph, None, SystemTime::now())?;
    let names: Vec<&str> = hops.iter().map(|h| h.name.as_str()).collect();
    let prefix = format!("{vm}: ");
    problems.extend(
        outcome
            .problems
            .iter()
            .filter(|p| p.starts_with(&prefix))
            .cloned(),
    );
    let report = outcome.plan.reports.iter().find(|r| r.vm == vm);
    let items = report
        .map(|r| ExposureView::new(r).items)
        .unwrap_or_default();
    match report {
        None if !problems.iter().any(|p| p.starts_with(&prefix)) => {
            notes.push(format!(
                "{vm} exposes nothing (qvm-forwarder expose {vm} …)"
            ));
        }
        _ => {}
    }
    if report.is_some() && !input_package {
        problems.push(format!(
            "{vm}: its template has not announced the forwarder package \
             ({SUPPORTED_INPUT_SERVICE}): its own firewall does not admit what is exposed; \
             install the package in its template and restart {vm}"
        ));
    }
    for item in items.iter().filter(|i| i.state == "refused") {
        problems.push(format!(
            "{} is not applied: {}",
            item.item,
            item.reason.as_deref().unwrap_or_default()
        ));
    }
    let pending: Vec<&Change> = outcome
        .changes
        .iter()
        .filter(|c| match c {
            Change::Set { vm, .. } | Change::Remove { vm, .. } => names.contains(&vm.as_str()),
        })
        .collect();
    if !pending.is_empty() {
        problems.push(format!(
            "{} feature write(s) on this chain are pending (netvm or ip changed?); `qvm-forwarder sync` makes them",
            pending.len()
        ));
    }
    Ok(CheckView {
        vm: vm.into(),
        hops,
        items,
        problems,
        notes,
    })
}

/// The qube and its netvms up to one with none, or to the first repeat
/// (a loop) or unknown name.
fn walk(graph: &mut Graph, vm: &str) -> Result<Vec<String>> {
    let mut names = vec![vm.to_string()];
    let mut at = vm.to_string();
    while names.len() <= MAX_HOPS {
        let known = graph.info(&at).is_some_and(|i| !i.is_dom0());
        if !known {
            break;
        }
        let Some(next) = graph.netvm(&at)? else { break };
        let repeat = names.contains(&next);
        names.push(next.clone());
        if repeat {
            break;
        }
        at = next;
    }
    Ok(names)
}

fn text(view: &CheckView) -> String {
    let mut out = format!(
        "{:<20} {:<12} {:<15} {:<8} {:<8} {:<8} {}\n",
        "QUBE", "CLASS", "IP", "NETWORK", "RUNNING", "SERVICE", "PACKAGE"
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    let maybe = |b: Option<bool>| b.map_or("-", yes);
    for hop in &view.hops {
        out.push_str(&format!(
            "{:<20} {:<12} {:<15} {:<8} {:<8} {:<8} {}\n",
            hop.name,
            hop.class.as_deref().unwrap_or("(missing)"),
            hop.ip.as_deref().unwrap_or("-"),
            yes(hop.provides_network),
            yes(hop.running),
            maybe(hop.service),
            maybe(hop.package)
        ));
    }
    for item in &view.items {
        out.push_str(&format!("item {}: {}\n", item.item, item.state));
    }
    for note in &view.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    for problem in &view.problems {
        out.push_str(&format!("problem: {problem}\n"));
    }
    if view.problems.is_empty() {
        out.push_str("no problem found\n");
    }
    out
}
