//! Project tasks: `cargo xtask <setup|build|test|vm-test|...>`.

mod bench;
mod build;
mod demo;
mod guarded;
mod mirror;
mod package;
mod process;
mod setup;
mod systemd_vm;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "forwarder's build, test and setup tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent): rust-src for
    /// the nightly, bpf-linker for its LLVM, and the Debian packages.
    Setup,
    /// Set up, then build the self-contained `forwarder` binary (release).
    Build,
    /// Set up, build, and show the forwarder at work: the Qubes-like
    /// topology in namespaces, a LocalSend exchange through both routers,
    /// and `forwarder inspect` of each (needs root).
    Demo,
    /// Build the release binary and run it here: `forwarder run <ARGS>`
    /// (for a router VM; e.g. -- --config /rw/config/forwarder.toml).
    BuildAndLoad {
        /// Arguments for `forwarder run`.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Measure the forwarder against the seed's nftables recipe, plain
    /// routing and a bare veth; results in target/bench (needs root).
    Bench {
        /// A short run (under a minute): fewer repetitions and rule counts.
        #[arg(long)]
        quick: bool,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
        /// Copy the results to docs/benchmarks.md and docs/benchmarks.svg.
        #[arg(long)]
        update_docs: bool,
    },
    /// Run the hostile-input generator and oracle of the test suite for a
    /// long time (needs root).
    Fuzz {
        /// How long to run.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Mixed load (TCP streams checked by hash, short flows, UDP, relayed
    /// announcements, a rule change every second) through the Qubes-like
    /// topology, with the daemons' memory, files, map entries and error
    /// counters sampled; report in target/soak (needs root).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Build a .deb, an .rpm and a tarball (with install and uninstall
    /// scripts) in target/package: the binary, the systemd units, example
    /// configs, docs and the changelog; and the dom0 .rpm, forwarder-dom0:
    /// `qvm-forwarder` and its optional watch unit.
    Package,
    /// Install the .deb in a Debian 12 VM (QEMU, TCG) with systemd as PID 1
    /// and check forwarder.service there: the qvm-service gate, forwarding
    /// and relaying, the watchdog, a clean stop, `apt remove` and `apt purge`
    /// (needs root).
    SystemdTest,
    /// Set up, then run every test tier: host unit tests, BPF_PROG_TEST_RUN
    /// tests, the network-namespace integration tests and, where QEMU runs,
    /// the VM tier (vm-test, systemd-test) (needs root).
    Test {
        /// Arguments passed to the privileged test binaries (e.g. a filter).
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Boot Debian's kernels of the versions users run under QEMU and run
    /// the forwarder's checks in each (forwarding, relaying, inspect,
    /// restart, clean stop, a virtio-net uplink); a table in
    /// target/vm/report.md (needs root). Uses $FORWARDER_BIN if set,
    /// else builds target/release/forwarder.
    VmTest {
        /// Only this kernel (repeatable); all when none is given.
        #[arg(long = "kernel", value_enum)]
        kernels: Vec<vm::Kernel>,
    },
}

/// Builds one of the test crate's drivers and runs it.
fn driver(name: &str, args: &[&str]) -> anyhow::Result<()> {
    build::build_driver(name)?;
    process::run_cmd(process::command(&format!("target/release/{name}")).args(args))
}

/// Every task but `setup` needs what setup installs; it runs first, and is
/// quick when everything is present.
fn run(task: Task) -> anyhow::Result<()> {
    setup::run()?;
    match task {
        Task::Setup => Ok(()),
        Task::Build => build::build_release(),
        Task::Demo => demo::run(),
        Task::BuildAndLoad { args } => {
            build::build_release()?;
            process::step(&format!("forwarder run {}", args.join(" ")));
            process::run_cmd(
                process::command("target/release/forwarder")
                    .arg("run")
                    .args(&args),
            )
        }
        Task::Package => package::run().map(drop),
        Task::Fuzz { seconds } => driver("fuzz", &["--seconds", &seconds.to_string()]),
        Task::Soak { minutes } => {
            build::build_release()?;
            driver("soak", &["--minutes", &minutes.to_string()])
        }
        Task::Bench {
            quick,
            json,
            update_docs,
        } => bench::run(quick, json, update_docs),
        Task::Test { filter } => test::run(&filter),
        Task::SystemdTest => systemd_vm::run(&package::run()?).map(drop),
        Task::VmTest { kernels } => vm::run(&kernels).map(drop),
    }
}

fn main() -> ExitCode {
    let result = run(Cli::parse().task);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}
