//! `sync`, and the second half of every writing command: read every
//! exposure and every forwarder feature, plan the shares from the graph as
//! it is now, and write only the differences.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    time::SystemTime,
};

use anyhow::{Context as _, Result};

use super::{
    admin::Admin,
    chain::{self, Domains as _},
    graph::Graph,
    intent::{self, Intent},
    plan::{self, Exposure, Plan},
};
use crate::{
    qubes_vm,
    vm_config::parts::{Family, INPUT, ROUTER},
};

/// The qvm-service that starts the forwarder in a router.
pub const SERVICE: &str = qubes_vm::ROUTER_SERVICE_FEATURE;
/// The qvm-service that starts `forwarder input` in an exposed VM.
pub const INPUT_SERVICE: &str = qubes_vm::INPUT_SERVICE_FEATURE;

/// What one of the services starts (the qvm-service and its unit), for the
/// note about a running VM.
fn started_by(service: &str) -> Option<(&'static str, &'static str)> {
    match service {
        SERVICE => Some((qubes_vm::ROUTER_SERVICE, "forwarder")),
        INPUT_SERVICE => Some((qubes_vm::INPUT_SERVICE, "forwarder-input")),
        _ => None,
    }
}

/// One write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Set {
        vm: String,
        feature: String,
        value: String,
    },
    Remove {
        vm: String,
        feature: String,
    },
}

impl Change {
    /// `sys-net: set vm-config.forwarder.1 = …`, or with `would` first.
    pub fn describe(&self, dry_run: bool) -> String {
        let would = if dry_run { "would " } else { "" };
        match self {
            Change::Set { vm, feature, value } => format!("{vm}: {would}set {feature} = {value}"),
            Change::Remove { vm, feature } => format!("{vm}: {would}remove {feature}"),
        }
    }

    pub fn apply(&self, admin: &Admin) -> Result<()> {
        match self {
            Change::Set { vm, feature, value } => admin.set_feature(vm, feature, value),
            Change::Remove { vm, feature } => admin.remove_feature(vm, feature),
        }
    }
}

/// What one pass over the graph found and wants.
pub struct Outcome {
    pub plan: Plan,
    pub changes: Vec<Change>,
    /// Exposures that could not be read or are set aside, one line each.
    pub problems: Vec<String>,
    /// When the next item expires, for `watch`.
    pub next_deadline: Option<SystemTime>,
    /// Services turned on in running qubes, which start at their next boot.
    pub notes: Vec<String>,
}

impl Outcome {
    /// The problems, then every chain refused and item not applied.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.problems.clone();
        for report in &self.plan.reports {
            if let Err(refusal) = &report.chain {
                warnings.push(format!("{}: not applied: {refusal}", report.vm));
            }
            for (item, why) in &report.refused {
                warnings.push(format!("{}: {} not applied: {why}", report.vm, item.what));
            }
        }
        warnings
    }
}

/// A command's own edit of one VM's intent, which replaces what dom0 holds
/// (`None`: the VM exposes nothing any more).
pub struct Edit<'a> {
    pub vm: &'a str,
    pub intent: Option<Intent>,
}

/// Reads everything, plans, and lists the changes (nothing written).
pub fn compute(graph: &mut Graph, edit: Option<&Edit>, now: SystemTime) -> Result<Outcome> {
    let qubes: Vec<String> = graph.qubes().map(|vm| vm.name.clone()).collect();
    let mut held: BTreeMap<String, Intent> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut current: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for vm in &qubes {
        let names = graph.features(vm)?.to_vec();
        for name in &names {
            let ours = ROUTER.owns_feature(name)
                || INPUT.owns_feature(name)
                || name == SERVICE
                || name == INPUT_SERVICE;
            if ours && let Some(value) = graph.feature(vm, name)? {
                current
                    .entry(vm.clone())
                    .or_default()
                    .insert(name.clone(), value);
            }
        }
        if edit.is_some_and(|e| e.vm == vm) || !names.iter().any(|n| n == intent::FEATURE) {
            continue;
        }
        let Some(value) = graph.feature(vm, intent::FEATURE)? else {
            continue;
        };
        match Intent::parse(&value) {
            Ok(intent) => {
                held.insert(vm.clone(), intent);
            }
            Err(e) => problems.push(format!(
                "{vm}: {e}; nothing is applied for it until `qvm-forwarder unexpose {vm}` or a new expose"
            )),
        }
    }
    if let Some(Edit {
        vm,
        intent: Some(intent),
    }) = edit
    {
        held.insert(vm.to_string(), intent.clone());
    }

    let mut rewrites: Vec<(String, Option<Intent>)> = Vec::new();
    if let Some(edit) = edit {
        rewrites.push((edit.vm.to_string(), edit.intent.clone()));
    }
    let mut exposures = Vec::new();
    for (vm, mut intent) in held {
        if intent.vm != vm {
            if graph.info(&intent.vm).is_some() {
                problems.push(format!(
                    "{vm}: holds a copy of {}'s exposure (made by qvm-clone, or inherited by a disposable); \
                     `qvm-forwarder expose {vm} …` to expose it too, `qvm-forwarder unexpose {vm}` to drop it",
                    intent.vm
                ));
                continue;
            }
            intent.vm = vm.clone();
            rewrite(&mut rewrites, &vm, Some(intent.clone()));
        }
        if is_disposable_template(graph, &vm)? {
            problems.push(format!(
                "{vm}: a disposable template, whose disposables each start with a copy of its \
                 features; expose a named disposable instead, and `qvm-forwarder unexpose {vm}`"
            ));
            continue;
        }
        if intent.drop_expired(now) {
            rewrite(
                &mut rewrites,
                &vm,
                Some(intent.clone()).filter(|i| !i.items.is_empty()),
            );
        }
        if intent.items.is_empty() {
            continue;
        }
        let chain = chain::resolve(graph, &vm)?;
        exposures.push(Exposure { vm, intent, chain });
    }

    let next_deadline = exposures
        .iter()
        .filter_map(|e| e.intent.next_deadline())
        .min();
    let plan = plan::plan(&exposures, now);
    let changes = changes(&plan, &current, &rewrites)?;
    let notes = changes
        .iter()
        .filter_map(|change| match change {
            Change::Set { vm, feature, .. } => {
                let (service, unit) = started_by(feature)?;
                graph
                    .info(vm)
                    .is_some_and(|i| i.is_running())
                    .then(|| running_note(vm, service, unit))
            }
            Change::Remove { .. } => None,
        })
        .collect();
    Ok(Outcome {
        plan,
        changes,
        problems,
        next_deadline,
        notes,
    })
}

/// Qubes creates `/run/qubes-service/NAME` at a qube's start only
/// (qubes-sysinit), so a unit gated on it does not start in a qube that is
/// running already.
fn running_note(vm: &str, service: &str, unit: &str) -> String {
    format!(
        "{vm} is running, and Qubes turns a qvm-service on at boot: restart {vm}, or in {vm} run \
         `sudo touch /run/qubes-service/{service} && sudo systemctl start {unit}`"
    )
}

/// Records that `vm`'s intent must be written as `intent`, replacing an
/// earlier rewrite of the same pass.
fn rewrite(rewrites: &mut Vec<(String, Option<Intent>)>, vm: &str, intent: Option<Intent>) {
    rewrites.retain(|(v, _)| v != vm);
    rewrites.push((vm.to_string(), intent));
}

/// Whether `vm` is a template for disposables (only AppVMs and
/// StandaloneVMs can be).
pub fn is_disposable_template(graph: &mut Graph, vm: &str) -> Result<bool> {
    match graph.class(vm)?.as_deref() {
        Some("AppVM" | "StandaloneVM") => {
            let property = graph.property(vm, "template_for_dispvms")?;
            property
                .bool()
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("template_for_dispvms of {vm}"))
        }
        _ => Ok(false),
    }
}

/// The writes that turn `current` into `plan`: intents first, then the
/// services and shares to set, then what to remove (a reader in between
/// sees a set that does not agree, refuses it and keeps its last good one).
fn changes(
    plan: &Plan,
    current: &BTreeMap<String, BTreeMap<String, String>>,
    rewrites: &[(String, Option<Intent>)],
) -> Result<Vec<Change>> {
    let mut sets = Vec::new();
    let mut removes = Vec::new();
    for (vm, intent) in rewrites {
        match intent.as_ref().and_then(Intent::value) {
            Some(value) => sets.push(Change::Set {
                vm: vm.clone(),
                feature: intent::FEATURE.into(),
                value,
            }),
            None => removes.push(Change::Remove {
                vm: vm.clone(),
                feature: intent::FEATURE.into(),
            }),
        }
    }
    let empty = BTreeMap::new();
    let vms: BTreeSet<&String> = current
        .keys()
        .chain(plan.routers.keys())
        .chain(plan.inputs.keys())
        .collect();
    for vm in vms {
        let now = current.get(vm).unwrap_or(&empty);
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        if let Some(share) = plan.routers.get(vm) {
            if now.get(SERVICE).map(String::as_str) != Some("1") {
                sets.push(Change::Set {
                    vm: vm.clone(),
                    feature: SERVICE.into(),
                    value: "1".into(),
                });
            }
            add_values(&mut wanted, ROUTER, share.values(), vm)?;
        }
        if let Some(share) = plan.inputs.get(vm) {
            if now.get(INPUT_SERVICE).map(String::as_str) != Some("1") {
                sets.push(Change::Set {
                    vm: vm.clone(),
                    feature: INPUT_SERVICE.into(),
                    value: "1".into(),
                });
            }
            add_values(&mut wanted, INPUT, share.values(), vm)?;
        }
        for (feature, value) in &wanted {
            if now.get(feature) != Some(value) {
                sets.push(Change::Set {
                    vm: vm.clone(),
                    feature: feature.clone(),
                    value: value.clone(),
                });
            }
        }
        for feature in now.keys() {
            if feature != SERVICE && feature != INPUT_SERVICE && !wanted.contains_key(feature) {
                removes.push(Change::Remove {
                    vm: vm.clone(),
                    feature: feature.clone(),
                });
            }
        }
    }
    sets.extend(removes);
    Ok(sets)
}

fn add_values(
    wanted: &mut BTreeMap<String, String>,
    family: Family,
    values: Result<Vec<String>, String>,
    vm: &str,
) -> Result<()> {
    let values = values
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{vm}'s {} features", family.stem))?;
    for (i, value) in values.into_iter().enumerate() {
        wanted.insert(family.feature(i + 1), value);
    }
    Ok(())
}

/// Prints the changes and problems, then writes the changes unless
/// `dry_run`.
pub fn apply(admin: &Admin, outcome: &Outcome, dry_run: bool, out: &mut dyn Write) -> Result<()> {
    for warning in outcome.warnings() {
        eprintln!("warning: {warning}");
    }
    for change in &outcome.changes {
        writeln!(out, "{}", change.describe(dry_run))?;
        if !dry_run {
            change.apply(admin)?;
        }
    }
    for note in &outcome.notes {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

/// `qvm-forwarder sync`.
pub fn run(admin: &Admin, dry_run: bool, out: &mut dyn Write) -> Result<()> {
    let mut graph = Graph::load(admin)?;
    let outcome = compute(&mut graph, None, SystemTime::now())?;
    apply(admin, &outcome, dry_run, out)?;
    if outcome.changes.is_empty() {
        writeln!(out, "in sync: nothing to change")?;
    }
    Ok(())
}
