//! `qvm-forwarder unexpose VM [SPEC...]`: removes some or all of what the
//! VM exposes, then rewrites every router's share without it.

use std::{io::Write, time::SystemTime};

use anyhow::{Result, bail};

use super::{
    admin::Admin,
    cli::UnexposeArgs,
    graph::Graph,
    intent::{self, Intent},
    sync::{self, Edit},
};

pub fn run(admin: &Admin, args: &UnexposeArgs, out: &mut dyn Write) -> Result<()> {
    let mut graph = Graph::load(admin)?;
    if graph.info(&args.vm).is_none() {
        bail!("{}: no such qube", args.vm);
    }
    let has = graph
        .features(&args.vm)?
        .iter()
        .any(|f| f == intent::FEATURE);
    let held = if has {
        graph.feature(&args.vm, intent::FEATURE)?
    } else {
        None
    };
    let intent = match (held, args.specs.is_empty()) {
        (None, _) => {
            writeln!(out, "{} exposes nothing", args.vm)?;
            None
        }
        // Everything goes, even a value that no longer parses.
        (Some(_), true) => None,
        (Some(value), false) => {
            let mut intent = Intent::parse(&value).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}; `qvm-forwarder unexpose {}` clears it all",
                    args.vm,
                    args.vm
                )
            })?;
            let exposed: Vec<String> = intent.items.iter().map(|i| i.what.to_string()).collect();
            let missing = intent.remove(&args.specs);
            if !missing.is_empty() {
                let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
                bail!(
                    "{} does not expose {}; it exposes {}",
                    args.vm,
                    missing.join(", "),
                    exposed.join(", ")
                );
            }
            Some(intent).filter(|i| !i.items.is_empty())
        }
    };
    let edit = Edit {
        vm: &args.vm,
        intent,
    };
    let outcome = sync::compute(&mut graph, Some(&edit).filter(|_| has), SystemTime::now())?;
    sync::apply(admin, &outcome, args.write.dry_run, out)?;
    Ok(())
}
