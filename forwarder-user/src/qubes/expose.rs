//! `qvm-forwarder expose VM SPEC... [--localsend…]`: adds to what the VM
//! exposes, then writes every router's share. Refuses, writing nothing,
//! when the VM's chain is broken or a router already gives a port to
//! another qube.

use std::{io::Write, time::SystemTime};

use anyhow::{Result, bail};

use super::{
    admin::Admin,
    chain::{self, Chain},
    cli::ExposeArgs,
    graph::Graph,
    intent::{self, Intent, Item},
    sync::{self, Edit},
};
use crate::{spec::AllowFrom, vm_config::entry::Attrs};

pub fn run(admin: &Admin, args: &ExposeArgs, out: &mut dyn Write) -> Result<()> {
    let wanted = args.items();
    if wanted.is_empty() {
        bail!(
            "nothing to expose on {}: give PROTO:PORT specs, or --localsend, --kdeconnect, --syncthing or --mdns",
            args.vm
        );
    }
    let now = SystemTime::now();
    let attrs = Attrs {
        allow: args.allow_from.clone().unwrap_or(AllowFrom::Auto),
        until: args.expire.map(|d| now + d),
        note: args.comment.clone(),
    };

    let mut graph = Graph::load(admin)?;
    let chain = match chain::resolve(&mut graph, &args.vm)? {
        Ok(chain) => chain,
        Err(refusal) => bail!("cannot expose {}: {refusal}", args.vm),
    };
    if sync::is_disposable_template(&mut graph, &args.vm)? {
        bail!(
            "cannot expose {}: it is a disposable template, and each of its disposables would start \
             with a copy of what it exposes; expose a named disposable instead",
            args.vm
        );
    }
    let mut intent = held_intent(&mut graph, &args.vm)?;
    for what in &wanted {
        intent
            .add(Item {
                what: *what,
                attrs: attrs.clone(),
            })
            .map_err(anyhow::Error::msg)?;
    }

    let edit = Edit {
        vm: &args.vm,
        intent: Some(intent),
    };
    let outcome = sync::compute(&mut graph, Some(&edit), now)?;
    let refused: Vec<String> = outcome
        .plan
        .reports
        .iter()
        .filter(|r| r.vm == args.vm)
        .flat_map(|r| &r.refused)
        .filter(|(item, _)| wanted.contains(&item.what))
        .map(|(item, why)| format!("{}: {why}", item.what))
        .collect();
    if !refused.is_empty() {
        bail!("cannot expose on {}:\n  {}", args.vm, refused.join("\n  "));
    }
    sync::apply(admin, &outcome, args.write.dry_run, out)?;
    summarize(&chain, &wanted, args.write.dry_run, out)?;
    Ok(())
}

/// What `vm` exposes already: its own intent, or a copy it holds (which
/// this command makes its own), or nothing.
fn held_intent(graph: &mut Graph, vm: &str) -> Result<Intent> {
    let has = graph.features(vm)?.iter().any(|f| f == intent::FEATURE);
    let value = if has {
        graph.feature(vm, intent::FEATURE)?
    } else {
        None
    };
    match value {
        None => Ok(Intent::new(vm)),
        Some(value) => match Intent::parse(&value) {
            Ok(mut intent) => {
                intent.vm = vm.into();
                Ok(intent)
            }
            Err(e) => bail!("{vm}: {e}; `qvm-forwarder unexpose {vm}` clears it"),
        },
    }
}

fn summarize(
    chain: &Chain,
    wanted: &[intent::What],
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let items: Vec<String> = wanted.iter().map(ToString::to_string).collect();
    let verb = if dry_run { "would expose" } else { "exposed" };
    writeln!(out, "{verb} {} on {}", items.join(", "), chain.path())?;
    for hop in chain.hops.iter().filter(|h| !h.advertised) {
        eprintln!(
            "note: {}'s template has not announced the forwarder package ({}): \
             install it there; the router applies its share once it runs the forwarder",
            hop.router,
            chain::SUPPORTED_SERVICE
        );
    }
    Ok(())
}
