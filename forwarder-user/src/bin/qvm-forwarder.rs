//! `qvm-forwarder`: exposes a qube to the LAN from dom0 or an admin qube.

use std::process::ExitCode;

use clap::Parser as _;
use forwarder::qubes::{
    admin::Admin,
    check,
    cli::{Cli, Command},
    expose, list, sync,
    transport::Transport,
    unexpose, watch,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let admin = Admin::new(Transport::from_env());
    let result = match &cli.command {
        Command::Expose(args) => expose::run(&admin, args),
        Command::Unexpose(args) => unexpose::run(&admin, args),
        Command::List { json } => list::run(&admin, *json),
        Command::Check { vm, json } => match check::run(&admin, vm, *json) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Sync(args) => sync::run(&admin, args.dry_run),
        Command::Watch(args) => watch::run(&admin, args.dry_run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
