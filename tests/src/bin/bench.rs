//! The benchmark driver behind `cargo xtask bench`. Writes
//! target/bench/{results.txt,results.json,chart.svg,benchmarks.md}.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use forwarder_tests::{
    bench::{
        env::{Env, Setup},
        measure,
        report::*,
    },
    netns,
};

struct Options {
    quick: bool,
    json: bool,
    out: PathBuf,
}

fn options() -> Result<Options> {
    let mut o = Options {
        quick: false,
        json: false,
        out: PathBuf::from("target/bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--json" => o.json = true,
            "--out" => o.out = args.next().context("--out needs a directory")?.into(),
            other => {
                anyhow::bail!("unknown argument {other:?}: expected --quick, --json or --out DIR")
            }
        }
    }
    Ok(o)
}

fn progress(text: &str) {
    eprintln!("bench: {text}");
}

fn run(o: &Options) -> Result<Report> {
    netns::sweep_leftovers();
    let reps = if o.quick { 1 } else { 5 };
    let duration = Duration::from_secs(if o.quick { 1 } else { 3 });
    let main = [
        Setup::SeedRecipe,
        Setup::Forwarder,
        Setup::PlainRouting,
        Setup::BareVeth,
    ];
    progress("building the four contenders");
    let envs: Vec<Env> = main.iter().map(|s| Env::build(*s)).collect::<Result<_>>()?;

    let mut rates: Vec<Vec<measure::RateSample>> = vec![Vec::new(); envs.len()];
    for rep in 0..reps {
        for (i, env) in envs.iter().enumerate() {
            progress(&format!(
                "packet rate, {}, round {}",
                env.setup.label(),
                rep + 1
            ));
            rates[i].push(measure::packet_rate(env, duration)?);
        }
    }
    let packet_rate = envs
        .iter()
        .zip(&rates)
        .map(|(env, samples)| RateRow {
            setup: env.setup.label(),
            received_pps: Spread::of(samples.iter().map(|s| s.received_pps).collect()),
            sent_pps: Spread::of(samples.iter().map(|s| s.sent_pps).collect()),
            loss: Spread::of(samples.iter().map(|s| s.loss).collect()),
            softnet_drops: samples.iter().map(|s| s.softnet_drops).sum(),
            interface_drops: samples.iter().map(|s| s.interface_drops).sum(),
        })
        .collect();

    let mut tcp_samples = vec![(Vec::new(), Vec::new()); envs.len()];
    let mut rr_samples = vec![(Vec::new(), Vec::new()); envs.len()];
    let rounds = if o.quick { 1000 } else { 20_000 };
    for rep in 0..reps {
        for (i, env) in envs.iter().enumerate() {
            progress(&format!(
                "TCP throughput and latency, {}, round {}",
                env.setup.label(),
                rep + 1
            ));
            tcp_samples[i]
                .0
                .push(measure::tcp_throughput(env, duration, false)?);
            tcp_samples[i]
                .1
                .push(measure::tcp_throughput(env, duration, true)?);
            let latency = measure::rr_latency(env, rounds)?;
            rr_samples[i].0.push(latency.p50_us);
            rr_samples[i].1.push(latency.p99_us);
        }
    }
    let tcp = envs
        .iter()
        .zip(tcp_samples)
        .map(|(env, (up, down))| TcpRow {
            setup: env.setup.label(),
            lan_to_app_bps: Spread::of(up),
            app_to_lan_bps: Spread::of(down),
        })
        .collect();
    let latency = envs
        .iter()
        .zip(rr_samples)
        .map(|(env, (p50, p99))| LatencyRow {
            setup: env.setup.label(),
            p50_us: Spread::of(p50),
            p99_us: Spread::of(p99),
        })
        .collect();

    progress("reaction to renumbering");
    let trials = if o.quick { 4 } else { 20 };
    let mut reaction = Vec::new();
    for env in envs
        .iter()
        .filter(|e| matches!(e.setup, Setup::Forwarder | Setup::SeedRecipe))
    {
        let r = measure::reaction(env, trials)?;
        reaction.push(ReactionRow {
            setup: env.setup.label(),
            event_to_map_us: (!r.event_to_map_us.is_empty())
                .then(|| Spread::of(r.event_to_map_us.clone())),
            command_to_packet_ms: Spread::of(r.command_to_packet_ms),
            event_to_packet_ms: Spread::of(r.event_to_packet_ms),
        });
    }
    drop(envs);

    let sizes: &[usize] = if o.quick {
        &[1, 10_000]
    } else {
        &[1, 100, 1_000, 10_000]
    };
    let scale_reps = if o.quick { 1 } else { 3 };
    let mut rule_scaling = Vec::new();
    for &n in sizes {
        progress(&format!("rule scaling, {n} rules"));
        let variants = [
            ("forwarder", Setup::ForwarderRules(n)),
            ("nftables per-port rules", Setup::NftPerPort(n)),
            ("nftables maps", Setup::NftMaps(n)),
        ];
        let scale_envs: Vec<(&str, Env)> = variants
            .iter()
            .map(|(name, setup)| Ok((*name, Env::build(*setup)?)))
            .collect::<Result<_>>()?;
        let mut samples = vec![Vec::new(); scale_envs.len()];
        for _ in 0..scale_reps {
            for (i, (_, env)) in scale_envs.iter().enumerate() {
                samples[i].push(measure::packet_rate(env, duration)?.received_pps);
            }
        }
        for ((name, _), samples) in scale_envs.iter().zip(samples) {
            rule_scaling.push(ScaleRow {
                variant: (*name).into(),
                rules: n,
                pps: Spread::of(samples),
            });
        }
    }
    rule_scaling.sort_by(|a, b| a.variant.cmp(&b.variant).then(a.rules.cmp(&b.rules)));

    let mut flow_scaling = Vec::new();
    let flow_envs: Vec<(usize, Env)> = [1usize, 100_000]
        .iter()
        .map(|&n| {
            progress(&format!("flow table, planting {n} live flows"));
            Ok((n, Env::build(Setup::ForwarderFlows(n))?))
        })
        .collect::<Result<_>>()?;
    let mut flow_samples = vec![Vec::new(); flow_envs.len()];
    for rep in 0..reps {
        for (i, (n, env)) in flow_envs.iter().enumerate() {
            progress(&format!(
                "packet rate with {n} live flows, round {}",
                rep + 1
            ));
            flow_samples[i].push(measure::packet_rate(env, duration)?.received_pps);
        }
    }
    for ((n, _), samples) in flow_envs.iter().zip(flow_samples) {
        flow_scaling.push(FlowRow {
            live_flows: *n,
            pps: Spread::of(samples),
        });
    }
    drop(flow_envs);

    let syn_envs: Vec<Env> = [Setup::Forwarder, Setup::SeedRecipe]
        .iter()
        .map(|s| Env::build(*s))
        .collect::<Result<_>>()?;
    let mut syn_samples = vec![Vec::new(); syn_envs.len()];
    for rep in 0..reps {
        for (i, env) in syn_envs.iter().enumerate() {
            progress(&format!(
                "new flows, {}, round {}",
                env.setup.label(),
                rep + 1
            ));
            syn_samples[i].push(measure::new_flow_rate(env, duration)?.received_pps);
        }
    }
    let new_flows = syn_envs
        .iter()
        .zip(syn_samples)
        .map(|(env, samples)| NewFlowRow {
            setup: env.setup.label(),
            new_flows_per_sec: Spread::of(samples),
        })
        .collect();
    drop(syn_envs);

    progress("program cost through BPF_PROG_TEST_RUN");
    let program_cost_ns = measure::program_cost(if o.quick { 3_000 } else { 20_000 })?
        .into_iter()
        .map(|(name, ns)| (name.to_string(), ns))
        .collect();

    let mut report = Report {
        machine: Machine::read(),
        command: format!("cargo xtask bench{}", if o.quick { " --quick" } else { "" }),
        quick: o.quick,
        repetitions: reps,
        packet_rate,
        per_hop: vec![],
        tcp,
        latency,
        rule_scaling,
        flow_scaling,
        new_flows,
        program_cost_ns,
        reaction,
        targets: vec![],
    };
    report.evaluate();
    Ok(report)
}

fn main() -> ExitCode {
    let result = options().and_then(|o| {
        let report = run(&o)?;
        std::fs::create_dir_all(&o.out)?;
        std::fs::write(o.out.join("results.txt"), report.text())?;
        std::fs::write(
            o.out.join("results.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        std::fs::write(o.out.join("chart.svg"), report.svg())?;
        std::fs::write(o.out.join("benchmarks.md"), report.markdown())?;
        if o.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.text());
        }
        eprintln!(
            "bench: wrote {}/{{results.txt,results.json,chart.svg,benchmarks.md}}",
            o.out.display()
        );
        Ok(())
    });
    let _ = forwarder::pin::unmount_if_empty(std::path::Path::new(forwarder_tests::bpffs::ROOT));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
