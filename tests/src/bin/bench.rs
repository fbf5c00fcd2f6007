//! The benchmark driver behind `cargo xtask bench`. Writes
//! target/bench/{results.txt,results.json,chart.svg,benchmarks.md} after
//! every stage, so a run that stops keeps what it measured. A stage that
//! fails is retried once, on contenders built afresh, and then reported as
//! failed while the others carry on.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};
use forwarder_tests::{
    bench::{
        env::{Env, Setup},
        hops, measure,
        report::*,
    },
    netns,
};

struct Options {
    quick: bool,
    json: bool,
    out: PathBuf,
    /// Run only the stages whose names start with this.
    only: Option<String>,
}

fn options() -> Result<Options> {
    let mut o = Options {
        quick: false,
        json: false,
        out: PathBuf::from("target/bench"),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--json" => o.json = true,
            "--out" => o.out = args.next().context("--out needs a directory")?.into(),
            "--only" => o.only = Some(args.next().context("--only needs a stage name")?),
            other => anyhow::bail!(
                "unknown argument {other:?}: expected --quick, --json, --out DIR or --only STAGE"
            ),
        }
    }
    Ok(o)
}

fn progress(text: &str) {
    eprintln!("bench: {text}");
}

/// The four contenders most stages compare.
const MAIN: [Setup; 4] = [
    Setup::SeedRecipe,
    Setup::Forwarder,
    Setup::PlainRouting,
    Setup::BareVeth,
];

fn build_all(setups: &[Setup]) -> Result<Vec<Env>> {
    setups.iter().map(|s| Env::build(*s)).collect()
}

/// The run so far, written out after every stage.
struct Run<'a> {
    o: &'a Options,
    report: Report,
}

impl Run<'_> {
    fn wanted(&self, stage: &str) -> bool {
        self.o
            .only
            .as_ref()
            .is_none_or(|only| stage.starts_with(only.as_str()))
    }

    /// Runs a stage on `contenders` (built by `build` when there are none),
    /// stores what it measured and writes the report. A failure drops the
    /// contenders, so the retry builds them afresh; a second failure is
    /// recorded in the report instead of its figures.
    fn stage<S, T>(
        &mut self,
        name: &str,
        contenders: &mut Option<S>,
        build: impl Fn() -> Result<S>,
        mut measure: impl FnMut(&S) -> Result<T>,
        store: impl FnOnce(&mut Report, T),
    ) {
        if !self.wanted(name) {
            return;
        }
        let mut error = None;
        for attempt in 1..=2 {
            progress(&if attempt == 1 {
                name.to_string()
            } else {
                format!("{name}: retrying once")
            });
            let result = (|| {
                if contenders.is_none() {
                    *contenders = Some(build()?);
                }
                measure(contenders.as_ref().expect("built above"))
            })();
            match result {
                Ok(found) => {
                    store(&mut self.report, found);
                    self.save();
                    return;
                }
                Err(err) => {
                    progress(&format!("{name} failed: {err:#}"));
                    *contenders = None;
                    error = Some(err);
                }
            }
        }
        self.report.failed.push(FailedStage {
            stage: name.into(),
            error: format!("{:#}", error.expect("two attempts failed")),
        });
        self.save();
    }

    /// A stage that builds and drops its own contenders.
    fn stage_alone<T>(
        &mut self,
        name: &str,
        measure: impl FnMut(&()) -> Result<T>,
        store: impl FnOnce(&mut Report, T),
    ) {
        self.stage(name, &mut None, || Ok(()), measure, store);
    }

    fn save(&mut self) {
        self.report.evaluate();
        if let Err(err) = write_files(&self.report, &self.o.out) {
            progress(&format!(
                "could not write {}: {err:#}",
                self.o.out.display()
            ));
        }
    }
}

/// Replaces each output file whole (a new file renamed over the old), so a
/// run stopped while writing leaves the previous stage's report.
fn write_files(report: &Report, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    for (name, text) in [
        ("results.txt", report.text()),
        ("results.json", serde_json::to_string_pretty(report)?),
        ("chart.svg", report.svg()),
        ("benchmarks.md", report.markdown()),
    ] {
        let path = out.join(name);
        let partial = out.join(format!(".{name}.new"));
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("replacing {}", path.display()))?;
    }
    Ok(())
}

fn run(o: &Options) -> Report {
    netns::sweep_leftovers();
    let reps = if o.quick { 1 } else { 5 };
    let duration = Duration::from_secs(if o.quick { 1 } else { 3 });
    let mut run = Run {
        o,
        report: Report {
            machine: Machine::read(),
            command: format!("cargo xtask bench{}", if o.quick { " --quick" } else { "" }),
            quick: o.quick,
            repetitions: reps,
            ..Default::default()
        },
    };
    let labels: Vec<String> = MAIN.iter().map(Setup::label).collect();
    let mut main = None;

    run.stage(
        stage::PACKET_RATE,
        &mut main,
        || build_all(&MAIN),
        |envs| {
            let mut rates = vec![Vec::new(); envs.len()];
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
            Ok(rates)
        },
        |report, rates| {
            report.packet_rate = labels
                .iter()
                .zip(rates)
                .map(|(setup, samples)| RateRow {
                    setup: setup.clone(),
                    received_pps: Spread::of(samples.iter().map(|s| s.received_pps).collect()),
                    sent_pps: Spread::of(samples.iter().map(|s| s.sent_pps).collect()),
                    loss: Spread::of(samples.iter().map(|s| s.loss).collect()),
                    softnet_drops: samples.iter().map(|s| s.softnet_drops).sum(),
                    interface_drops: samples.iter().map(|s| s.interface_drops).sum(),
                })
                .collect();
        },
    );

    run.stage(
        stage::TCP,
        &mut main,
        || build_all(&MAIN),
        |envs| {
            let mut samples = vec![(Vec::new(), Vec::new()); envs.len()];
            for rep in 0..reps {
                for (i, env) in envs.iter().enumerate() {
                    progress(&format!(
                        "TCP throughput, {}, round {}",
                        env.setup.label(),
                        rep + 1
                    ));
                    samples[i]
                        .0
                        .push(measure::tcp_throughput(env, duration, false)?);
                    samples[i]
                        .1
                        .push(measure::tcp_throughput(env, duration, true)?);
                }
            }
            Ok(samples)
        },
        |report, samples| {
            report.tcp = labels
                .iter()
                .zip(samples)
                .map(|(setup, (up, down))| TcpRow {
                    setup: setup.clone(),
                    lan_to_app_bps: Spread::of(up),
                    app_to_lan_bps: Spread::of(down),
                })
                .collect();
        },
    );

    let rounds = if o.quick { 1000 } else { 20_000 };
    run.stage(
        stage::LATENCY,
        &mut main,
        || build_all(&MAIN),
        |envs| {
            let mut samples = vec![(Vec::new(), Vec::new()); envs.len()];
            for rep in 0..reps {
                for (i, env) in envs.iter().enumerate() {
                    progress(&format!(
                        "latency, {}, round {}",
                        env.setup.label(),
                        rep + 1
                    ));
                    let latency = measure::rr_latency(env, rounds)?;
                    samples[i].0.push(latency.p50_us);
                    samples[i].1.push(latency.p99_us);
                }
            }
            Ok(samples)
        },
        |report, samples| {
            report.latency = labels
                .iter()
                .zip(samples)
                .map(|(setup, (p50, p99))| LatencyRow {
                    setup: setup.clone(),
                    p50_us: Spread::of(p50),
                    p99_us: Spread::of(p99),
                })
                .collect();
        },
    );
    run.stage(
        stage::LATENCY_HOPS,
        &mut main,
        || build_all(&MAIN),
        |envs| {
            // Like every other measurement, alternated and repeated: one
            // traced run moves with the host's load by as much as the
            // routers' differences.
            let traced: Vec<&Env> = envs
                .iter()
                .filter(|env| env.setup != Setup::BareVeth)
                .collect();
            let mut runs = vec![Vec::new(); traced.len()];
            for rep in 0..reps {
                for (i, env) in traced.iter().enumerate() {
                    progress(&format!(
                        "latency per hop, {}, round {}",
                        env.setup.label(),
                        rep + 1
                    ));
                    runs[i].push(hops::per_hop(env, 1000)?);
                }
            }
            Ok(runs)
        },
        |report, runs| {
            report.latency_hops = runs.into_iter().map(hops::HopTiming::combine).collect();
        },
    );
    drop(main);

    let trials = if o.quick { 4 } else { 20 };
    for setup in [Setup::SeedRecipe, Setup::Forwarder] {
        run.stage(
            &format!("{}, {}", stage::REACTION, setup.label()),
            &mut None,
            || Env::build(setup),
            |env| measure::reaction(env, trials),
            |report, r| {
                report.reaction.push(ReactionRow {
                    setup: setup.label(),
                    event_to_map_us: (!r.event_to_map_us.is_empty())
                        .then(|| Spread::of(r.event_to_map_us.clone())),
                    command_to_packet_ms: Spread::of(r.command_to_packet_ms),
                    event_to_packet_ms: Spread::of(r.event_to_packet_ms),
                });
            },
        );
    }

    let sizes: &[usize] = if o.quick {
        &[1, 10_000]
    } else {
        &[1, 100, 1_000, 10_000]
    };
    let scale_reps = if o.quick { 1 } else { 3 };
    for &n in sizes {
        let variants = [
            ("forwarder", Setup::ForwarderRules(n)),
            ("nftables per-port rules", Setup::NftPerPort(n)),
            ("nftables maps", Setup::NftMaps(n)),
        ];
        run.stage(
            &format!("{}, {n} rules", stage::RULE_SCALING),
            &mut None,
            || {
                variants
                    .iter()
                    .map(|(_, setup)| Env::build(*setup))
                    .collect::<Result<Vec<_>>>()
            },
            |envs| {
                let mut samples = vec![Vec::new(); envs.len()];
                for _ in 0..scale_reps {
                    for (i, env) in envs.iter().enumerate() {
                        samples[i].push(measure::packet_rate(env, duration)?.received_pps);
                    }
                }
                Ok(samples)
            },
            |report, samples| {
                for ((name, _), samples) in variants.iter().zip(samples) {
                    report.rule_scaling.push(ScaleRow {
                        variant: (*name).into(),
                        rules: n,
                        pps: Spread::of(samples),
                    });
                }
                report
                    .rule_scaling
                    .sort_by(|a, b| a.variant.cmp(&b.variant).then(a.rules.cmp(&b.rules)));
            },
        );
    }

    let live = [1usize, 100_000];
    run.stage(
        stage::FLOW_TABLE,
        &mut None,
        || {
            live.iter()
                .map(|&n| {
                    progress(&format!("flow table, planting {n} live flows"));
                    Env::build(Setup::ForwarderFlows(n))
                })
                .collect::<Result<Vec<_>>>()
        },
        |envs| {
            let mut samples = vec![Vec::new(); envs.len()];
            for rep in 0..reps {
                for (i, (n, env)) in live.iter().zip(envs).enumerate() {
                    progress(&format!(
                        "packet rate with {n} live flows, round {}",
                        rep + 1
                    ));
                    samples[i].push(measure::packet_rate(env, duration)?.received_pps);
                }
            }
            Ok(samples)
        },
        |report, samples| {
            report.flow_scaling = live
                .iter()
                .zip(samples)
                .map(|(n, samples)| FlowRow {
                    live_flows: *n,
                    pps: Spread::of(samples),
                })
                .collect();
        },
    );

    let syn_setups = [Setup::Forwarder, Setup::SeedRecipe];
    run.stage(
        stage::NEW_FLOWS,
        &mut None,
        || build_all(&syn_setups),
        |envs| {
            let mut samples = vec![Vec::new(); envs.len()];
            for rep in 0..reps {
                for (i, env) in envs.iter().enumerate() {
                    progress(&format!(
                        "new flows, {}, round {}",
                        env.setup.label(),
                        rep + 1
                    ));
                    samples[i].push(measure::new_flow_rate(env, duration)?.received_pps);
                }
            }
            Ok(samples)
        },
        |report, samples| {
            report.new_flows = syn_setups
                .iter()
                .zip(samples)
                .map(|(setup, samples)| NewFlowRow {
                    setup: setup.label(),
                    new_flows_per_sec: Spread::of(samples),
                })
                .collect();
        },
    );

    run.stage_alone(
        stage::PROGRAM_COST,
        |()| measure::program_cost(if o.quick { 3_000 } else { 20_000 }),
        |report, costs| {
            report.program_cost_ns = costs
                .paths
                .into_iter()
                .map(|(name, ns)| (name.to_string(), ns))
                .collect();
            report.program_stages = costs.stages;
        },
    );

    run.report.finished = true;
    run.save();
    run.report
}

fn main() -> ExitCode {
    let result = options().and_then(|o| {
        let report = run(&o);
        if o.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.text());
        }
        eprintln!(
            "bench: wrote {}/{{results.txt,results.json,chart.svg,benchmarks.md}}",
            o.out.display()
        );
        Ok(report.failed.len())
    });
    let _ = forwarder::pin::unmount_if_empty(std::path::Path::new(forwarder_tests::bpffs::ROOT));
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("bench: {failed} stage(s) failed twice; their figures are missing");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("bench failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
