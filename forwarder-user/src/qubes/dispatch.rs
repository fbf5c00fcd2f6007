//! Runs one `qvm-forwarder` command.

use std::io::Write;

use anyhow::Result;

use super::{admin::Admin, check, cli::Command, expose, list, sync, unexpose, watch};

/// Runs `command`, writing its report to `out`; `Ok(false)` when `check`
/// found a problem.
pub fn run(command: &Command, admin: &Admin, out: &mut dyn Write) -> Result<bool> {
    match command {
        Command::Expose(args) => expose::run(admin, args, out)?,
        Command::Unexpose(args) => unexpose::run(admin, args, out)?,
        Command::List { json } => list::run(admin, *json, out)?,
        Command::Check { vm, json } => return check::run(admin, vm, *json, out),
        Command::Sync(args) => sync::run(admin, args.dry_run, out)?,
        Command::Watch(args) => watch::run(admin, args.dry_run, out)?,
    }
    Ok(true)
}
