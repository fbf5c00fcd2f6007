//! The checks of `cargo xtask vm-test`. `vmcheck kernel` runs inside a VM
//! booted on the kernel under test; `vmcheck lan-peer` runs on the host, in
//! the namespace of the tap behind the VM's NIC. Result lines are described
//! in forwarder_tests::vm.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use forwarder_tests::{netns, vm};

#[derive(Parser)]
#[command(about = "forwarder checks for a VM of cargo xtask vm-test")]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Inside the VM: every check for the running kernel.
    Kernel {
        /// Also write the result lines here (a directory shared with the
        /// host).
        #[arg(long)]
        results: Option<PathBuf>,
        /// Also run the NIC scenario on the VM's virtio-net device with this
        /// MAC, which has the LAN peer behind it.
        #[arg(long)]
        nic_mac: Option<String>,
    },
    /// On the host, in the LAN namespace: the LAN peer, until stdin closes.
    LanPeer {
        /// The tap device QEMU backs the VM's NIC with.
        #[arg(long)]
        tap: String,
    },
}

fn main() -> ExitCode {
    match Cli::parse().role {
        Role::Kernel { results, nic_mac } => {
            let mut results = match vm::Results::new(results.as_deref()) {
                Ok(results) => results,
                Err(err) => {
                    eprintln!("vmcheck: {err:#}");
                    return ExitCode::FAILURE;
                }
            };
            netns::sweep_leftovers();
            let refused = vm::matrix::run(&mut results);
            match nic_mac {
                // Each start costs minutes under TCG where the verifier
                // gives up: one refusal says it.
                Some(_) if refused => vm::nic::skip(&mut results, vm::REFUSED),
                Some(mac) => vm::nic::run(&mut results, &mac),
                None => {}
            }
            results.end();
            ExitCode::SUCCESS
        }
        Role::LanPeer { tap } => match vm::lan_peer::serve(&tap) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("lan-peer: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}
