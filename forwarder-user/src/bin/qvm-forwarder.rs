//! `qvm-forwarder`: exposes a qube to the LAN from dom0 or an admin qube.

use std::process::ExitCode;

use clap::Parser as _;
use forwarder::qubes::{admin::Admin, cli::Cli, dispatch, transport::Transport};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let admin = Admin::new(Transport::from_env());
    match dispatch::run(&cli.command, &admin, &mut std::io::stdout()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
