use std::process::ExitCode;

use clap::Parser as _;
use forwarder::{
    cli::{Cli, Command},
    client,
    config::RunConfig,
    daemon, flows, input, inspect, teardown,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match cli.command {
        Command::Run(args) => match RunConfig::from_args(args) {
            Ok(config) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(daemon::run(config))),
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(2);
            }
        },
        Command::CheckConfig { file } => match RunConfig::check_file(&file) {
            Ok(config) => {
                println!("{}: valid", file.display());
                if config.follow_default_route {
                    println!("  uplink: the interface of the default route");
                } else {
                    println!("  uplink {}", config.uplink);
                }
                for rule in &config.rules {
                    println!("  forward {rule}");
                }
                for relay in &config.relays {
                    println!("  relay {relay}");
                }
                for (preset, target) in &config.presets {
                    println!("  {}", preset.advice(*target));
                }
                if config.qubesdb {
                    println!("  and dom0's share in QubesDB (/vm-config/forwarder.N)");
                }
                return ExitCode::SUCCESS;
            }
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(2);
            }
        },
        Command::Inspect(args) => inspect::run(&args),
        Command::Flows(args) => flows::run(&args),
        Command::Rules(command) => client::run(command),
        Command::Teardown(args) => teardown::run(&args),
        Command::Input(args) => input::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
