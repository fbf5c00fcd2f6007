//! What the benchmark found: statistics, the targets' verdicts, and the
//! table, JSON, SVG chart and Markdown page it is written as.

use std::fmt::Write as _;

use serde::Serialize;

use super::{hops::HopTiming, measure::StageCost};

/// Median and range of repeated measurements.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Spread {
    pub fn of(mut samples: Vec<f64>) -> Spread {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        if n == 0 {
            return Spread::default();
        }
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Spread {
            median,
            min: samples[0],
            max: samples[n - 1],
            samples,
        }
    }

    fn show(&self, scale: f64, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}-{:.d$})",
            self.median / scale,
            self.min / scale,
            self.max / scale,
            d = digits
        )
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .into(),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: kib / 1024.0 / 1024.0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RateRow {
    pub setup: String,
    pub received_pps: Spread,
    pub sent_pps: Spread,
    pub loss: Spread,
    pub softnet_drops: u64,
    pub interface_drops: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct HopRow {
    pub setup: String,
    /// (1/rate - 1/rate_bare) / 2, microseconds per packet per hop.
    pub per_hop_us: f64,
    /// End-to-end rate relative to the nftables recipe's.
    pub rate_vs_nftables: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TcpRow {
    pub setup: String,
    pub lan_to_app_bps: Spread,
    pub app_to_lan_bps: Spread,
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencyRow {
    pub setup: String,
    pub p50_us: Spread,
    pub p99_us: Spread,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleRow {
    pub variant: String,
    pub rules: usize,
    pub pps: Spread,
}

/// Packet rate of the forwarder with this many live flows in its table.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRow {
    pub live_flows: usize,
    pub pps: Spread,
}

/// TCP SYNs from ever new peer ports that reach the app, per second.
#[derive(Clone, Debug, Serialize)]
pub struct NewFlowRow {
    pub setup: String,
    pub new_flows_per_sec: Spread,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReactionRow {
    pub setup: String,
    pub event_to_map_us: Option<Spread>,
    pub command_to_packet_ms: Spread,
    pub event_to_packet_ms: Spread,
}

/// A goal and how this run did: `met` is None when a stage it needs failed
/// (or was not run), and `measured` then says which.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// A stage that failed on its retry too: its figures are missing, the
/// others stand.
#[derive(Clone, Debug, Serialize)]
pub struct FailedStage {
    pub stage: String,
    pub error: String,
}

/// The stages, by the names the driver runs them under; a section of the
/// report shows the failures of the stages whose names start with its own.
pub mod stage {
    pub const PACKET_RATE: &str = "packet rate";
    pub const TCP: &str = "TCP throughput";
    pub const LATENCY: &str = "latency";
    pub const LATENCY_HOPS: &str = "latency per hop";
    pub const REACTION: &str = "reaction to renumbering";
    pub const RULE_SCALING: &str = "rule scaling";
    pub const FLOW_TABLE: &str = "flow table";
    pub const NEW_FLOWS: &str = "new flows";
    pub const PROGRAM_COST: &str = "program cost";
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub command: String,
    pub quick: bool,
    pub repetitions: usize,
    pub packet_rate: Vec<RateRow>,
    pub per_hop: Vec<HopRow>,
    pub tcp: Vec<TcpRow>,
    pub latency: Vec<LatencyRow>,
    pub latency_hops: Vec<HopTiming>,
    pub rule_scaling: Vec<ScaleRow>,
    pub flow_scaling: Vec<FlowRow>,
    pub new_flows: Vec<NewFlowRow>,
    pub program_cost_ns: Vec<(String, f64)>,
    pub program_stages: Vec<StageCost>,
    pub reaction: Vec<ReactionRow>,
    pub targets: Vec<Target>,
    pub failed: Vec<FailedStage>,
    /// Every stage has run; a report written while the run goes on (or one
    /// it left when it was stopped) says it is partial.
    pub finished: bool,
}

/// A contender as a sentence names it.
fn the(setup: &str) -> String {
    if setup == "nftables recipe" {
        format!("the {setup}")
    } else {
        setup.into()
    }
}

fn find<'a, T>(rows: &'a [T], setup: &str, name: impl Fn(&T) -> &str) -> Option<&'a T> {
    rows.iter().find(|r| name(r) == setup)
}

/// How each figure is taken and what bounds it, for docs/benchmarks.md.
const METHOD: &str = "
## How the figures are taken

- **Packet rate**: trafgen (netsniff-ng) sends the same 64-byte UDP frame from the LAN peer's veth
  as fast as one CPU can; a netdev-ingress nftables chain on the app's eth0 counts and drops it, so
  the receiver is never the bottleneck. Loss is sent minus received, with the softnet backlog and
  interface drop counters beside it. The router cost per hop is `(1/rate - 1/rate_bare) / 2`: the
  bare veth is sender and receiver with nothing between them.
- **TCP**: iperf3 through the forwarded port (for plain routing and the bare veth, straight to the
  app), one stream, both directions. Veth pairs on a 2-CPU guest: sender, both routers and the
  receiver share the CPUs, so these are relative figures.
- **Latency**: the project's own client and server, one 64-byte request and reply at a time over
  one TCP connection; behind every Qubes contender the app keeps its own firewall (conntrack and
  an input chain). A round trip crosses four router hops. **Per hop**: the same round trips again
  with kernel tracepoints (every device's transmit and receive and the socket reads, stamped with
  the TSC in a trace instance of the bench's own), split into the routers' work, the veth
  crossings and the endpoints' stacks and wakeups. The endpoints dominate on a 2-vCPU guest: a
  round trip whose server or client is woken on the other, idle vCPU pays about 25-30 us per
  such wakeup (the guest halts without polling), and how many do changes from run to run, so p50
  and p99 move between runs by more than the routers' whole share (a few us per round trip). The
  host's speed also drifts from moment to moment and moves every segment of a traced run
  together, so the routers' time is compared as a multiple of the same round trips' veth
  crossings (code every contender shares): that is the latency comparison the datapath decides.
- **Rule scaling**: the packets go to the last of N rules; the forwarder's rules are one hash
  lookup (its configurations also hold KDE Connect's 51-port range, 51 map entries), the seed
  writes one nftables rule per port (a linear walk), and a verdict map is nftables' own answer to
  that.
- **Flow table**: the forwarder with a table of 131,072 entries, with one live flow (the
  measured one) and with 100,000 more planted in both routers (answered UDP flows of other peers),
  the same 64-byte UDP stream through both. **New flows** are trafgen's TCP SYNs to the forwarded
  port, each from a new peer port and address, counted where they reach the app: every one is a
  flow-table insert in both routers for the forwarder, and a conntrack entry in both routers for the
  recipe (which DNATs with conntrack).
- **Program cost**: `BPF_PROG_TEST_RUN` in a router namespace with routes and neighbours, so the
  FIB lookup is real. A rewriting program changes its test packet, so each path is timed one run
  at a time and the timer's share of a run is subtracted. The relay path costs most because it
  clones the whole packet (`bpf_clone_redirect`) and then undoes its rewrite on the original; it
  runs per announcement, a few a second, not per forwarded packet. **Stages**: the same
  established DNAT and reply packets through the programs loaded again over the same maps with a
  read-only global (`BENCH_CUT`, see `forwarder-common/src/cut.rs`) that makes them return after
  one stage, passing the packet on uncounted (rewritten only at the last cut, `translate`); at its default the verifier removes every check of it. The
  first cut returns at once: that is an empty program, the baseline of the two cost targets. These
  are single runs with the timer's share left in, as it is in the empty program's.
- **Reaction**: sys-net's LAN address is changed back and forth with one `ip -batch` while the app
  announces every 200 us. *Event to map* runs from the rtnetlink event, as an independent
  listener at a real-time priority sees it (woken when the kernel delivers it, before the daemon
  can act on it), to the state map holding the new address (a busy poller); *event to packet*
  from that event to the first relayed announcement with the new source; *ip addr to packet* from
  just before `ip` is started in the namespace, so it includes starting the process. The seed's
  recipe has no map: its dispatcher script (run from `ip monitor address`) rewrites an nftables
  rule. Maxima come from scheduling on two shared CPUs.
- **Stages**: the report is written after every stage, so a run that stops keeps what it
  measured. A stage that fails is retried once on contenders built afresh; if it fails again, its
  section says why and its targets are listed as not measured, while the other figures stand.
";

impl Report {
    /// Per-hop costs and the targets, from the measurements. A target whose
    /// figures are missing is listed as not measured, with the reason.
    pub fn evaluate(&mut self) {
        let rate = |setup: &str| {
            find(&self.packet_rate, setup, |r| &r.setup).map(|r| r.received_pps.median)
        };
        self.per_hop = match rate("bare veth") {
            Some(bare) => self
                .packet_rate
                .iter()
                .filter(|r| r.setup != "bare veth")
                .map(|r| HopRow {
                    setup: r.setup.clone(),
                    per_hop_us: (1.0 / r.received_pps.median - 1.0 / bare) / 2.0 * 1e6,
                    rate_vs_nftables: rate("nftables recipe")
                        .map(|nft| r.received_pps.median / nft),
                })
                .collect(),
            None => vec![],
        };
        let hop = |setup: &str| find(&self.per_hop, setup, |r| &r.setup).map(|r| r.per_hop_us);
        let mut targets = Vec::new();
        let mut add = |name: String, goal: &str, needs: &str, found: Option<(String, bool)>| {
            targets.push(self.target(name, goal, needs, found));
        };

        let (f, n, p) = (
            hop("forwarder"),
            hop("nftables recipe"),
            hop("plain routing"),
        );
        add(
            "router cost per packet per hop vs the nftables recipe".into(),
            "at most 1/3 (0.333)",
            stage::PACKET_RATE,
            f.zip(n).map(|(f, n)| {
                (
                    format!("{:.3} ({f:.2} us vs {n:.2} us)", f / n),
                    f / n <= 1.0 / 3.0,
                )
            }),
        );
        add(
            "router cost per packet per hop vs plain routing".into(),
            "at most 0.8",
            stage::PACKET_RATE,
            f.zip(p).map(|(f, p)| {
                (
                    format!("{:.3} ({f:.2} us vs {p:.2} us)", f / p),
                    f / p <= 0.8,
                )
            }),
        );

        let tcp = |setup: &str| find(&self.tcp, setup, |r| &r.setup);
        for other in ["plain routing", "nftables recipe"] {
            for (dir, pick) in [
                (
                    "LAN to app",
                    (|r: &TcpRow| r.lan_to_app_bps.median) as fn(&TcpRow) -> f64,
                ),
                ("app to LAN", |r: &TcpRow| r.app_to_lan_bps.median),
            ] {
                add(
                    format!("TCP throughput {dir} vs {}", the(other)),
                    "at least 1",
                    stage::TCP,
                    tcp("forwarder").zip(tcp(other)).map(|(f, o)| {
                        let ratio = pick(f) / pick(o);
                        (
                            format!(
                                "{ratio:.3} ({:.2} vs {:.2} Gbit/s)",
                                pick(f) / 1e9,
                                pick(o) / 1e9
                            ),
                            ratio >= 1.0,
                        )
                    }),
                );
            }
        }

        let latency = |setup: &str| find(&self.latency, setup, |r| &r.setup);
        for (other, quantiles) in [
            ("plain routing", &["p50", "p99"][..]),
            ("nftables recipe", &["p99"][..]),
        ] {
            for quantile in quantiles {
                let pick = |r: &LatencyRow| {
                    if *quantile == "p50" {
                        r.p50_us.median
                    } else {
                        r.p99_us.median
                    }
                };
                add(
                    format!("{quantile} request/response latency vs {}", the(other)),
                    "at most 1",
                    stage::LATENCY,
                    latency("forwarder").zip(latency(other)).map(|(f, o)| {
                        let ratio = pick(f) / pick(o);
                        (
                            format!("{ratio:.3} ({:.1} us vs {:.1} us)", pick(f), pick(o)),
                            ratio <= 1.0,
                        )
                    }),
                );
            }
        }

        let routers = |setup: &str| {
            find(&self.latency_hops, setup, |r| &r.setup).and_then(|h| h.routers_per_veth)
        };
        add(
            "routers' time per round trip (traced, per veth crossing time) vs plain routing".into(),
            "at most 1",
            stage::LATENCY_HOPS,
            routers("forwarder")
                .zip(routers("plain routing"))
                .map(|(f, p)| {
                    (
                        format!("{:.3} ({f:.2} vs {p:.2} of the veth crossings)", f / p),
                        f <= p,
                    )
                }),
        );

        let scale = |rules: usize| {
            self.rule_scaling
                .iter()
                .find(|r| r.variant == "forwarder" && r.rules == rules)
                .map(|r| r.pps.median)
        };
        add(
            "packet rate with 10,000 rules vs 1 rule".into(),
            "within 10% (at least 0.9)",
            stage::RULE_SCALING,
            scale(1)
                .zip(scale(10_000))
                .map(|(one, many)| (format!("{:.3}", many / one), many / one >= 0.9)),
        );
        let flows = |n: usize| {
            self.flow_scaling
                .iter()
                .find(|r| r.live_flows == n)
                .map(|r| r.pps.median)
        };
        add(
            "packet rate with 100,000 live flows vs 1 flow".into(),
            "within 10% (at least 0.9)",
            stage::FLOW_TABLE,
            flows(1)
                .zip(flows(100_000))
                .map(|(one, many)| (format!("{:.3}", many / one), many / one >= 0.9)),
        );
        let empty = self.program_stages.first();
        let whole = self.program_stages.last();
        for (path, pick) in [
            ("DNAT", (|s: &StageCost| s.dnat_ns) as fn(&StageCost) -> f64),
            ("reply", |s: &StageCost| s.reply_ns),
        ] {
            add(
                format!("{path} program cost vs an empty program's (single runs)"),
                "at most 2",
                stage::PROGRAM_COST,
                empty.zip(whole).map(|(empty, whole)| {
                    let ratio = pick(whole) / pick(empty);
                    (
                        format!(
                            "{ratio:.2} ({:.0} ns vs {:.0} ns)",
                            pick(whole),
                            pick(empty)
                        ),
                        ratio <= 2.0,
                    )
                }),
            );
        }
        let fwd = find(&self.reaction, "forwarder", |r| &r.setup);
        add(
            "rtnetlink event to state map update".into(),
            "under 1 ms",
            stage::REACTION,
            fwd.and_then(|r| r.event_to_map_us.as_ref()).map(|map| {
                (
                    format!(
                        "{:.3} ms median (max {:.3})",
                        map.median / 1e3,
                        map.max / 1e3
                    ),
                    map.median < 1000.0,
                )
            }),
        );
        add(
            "address change to first correct relayed packet".into(),
            "under 10 ms",
            stage::REACTION,
            fwd.map(|r| {
                (
                    format!(
                        "{:.2} ms median (max {:.2})",
                        r.command_to_packet_ms.median, r.command_to_packet_ms.max
                    ),
                    r.command_to_packet_ms.median < 10.0,
                )
            }),
        );
        self.targets = targets;
    }

    /// A target from its figures, or one not measured, naming the failed
    /// stages it needed.
    fn target(
        &self,
        name: String,
        goal: &str,
        needs: &str,
        found: Option<(String, bool)>,
    ) -> Target {
        let (measured, met) = match found {
            Some((measured, met)) => (measured, Some(met)),
            None => {
                let failed: Vec<&str> = self.failures(needs).map(|f| f.stage.as_str()).collect();
                let why = if failed.is_empty() {
                    "not measured".into()
                } else {
                    format!("not measured: {} failed", failed.join(", "))
                };
                (why, None)
            }
        };
        Target {
            name,
            target: goal.into(),
            measured,
            met,
        }
    }

    /// The failed stages of a section.
    fn failures<'a>(&'a self, section: &'a str) -> impl Iterator<Item = &'a FailedStage> {
        self.failed
            .iter()
            .filter(move |f| f.stage.starts_with(section))
    }

    /// The per-hop breakdown of the round trips, one column per contender.
    fn hops_table(&self) -> String {
        let mut s = String::new();
        if self.latency_hops.is_empty() {
            return s;
        }
        let _ = writeln!(
            s,
            "\nround trips hop by hop: kernel tracepoints, median (90th percentile) of each segment, median of the rounds, us"
        );
        let _ = write!(s, "  {:<42}", "");
        for h in &self.latency_hops {
            let _ = write!(s, " {:>18}", h.setup);
        }
        s.push('\n');
        for (i, segment) in super::hops::SEGMENTS.iter().enumerate() {
            let _ = write!(s, "  {segment:<42}");
            for h in &self.latency_hops {
                let cell = h.segments_us.get(i).map_or("-".into(), |(_, median, p90)| {
                    format!("{median:.2} ({p90:.2})")
                });
                let _ = write!(s, " {cell:>18}");
            }
            s.push('\n');
        }
        let _ = write!(s, "  {:<42}", "sum of the medians");
        for h in &self.latency_hops {
            let sum: f64 = h.segments_us.iter().map(|(_, median, _)| median).sum();
            let _ = write!(s, " {sum:>18.2}");
        }
        s.push('\n');
        let _ = write!(s, "  {:<42}", "the routers' segments");
        for h in &self.latency_hops {
            let cell = h.router_us().map_or("-".into(), |us| format!("{us:.2}"));
            let _ = write!(s, " {cell:>18}");
        }
        s.push('\n');
        let _ = write!(s, "  {:<42}", "the veth crossings");
        for h in &self.latency_hops {
            let cell = h.veth_us().map_or("-".into(), |us| format!("{us:.2}"));
            let _ = write!(s, " {cell:>18}");
        }
        s.push('\n');
        let _ = write!(s, "  {:<42}", "routers / veth crossings (median of rounds)");
        for h in &self.latency_hops {
            let cell = h.routers_per_veth.map_or("-".into(), |r| format!("{r:.3}"));
            let _ = write!(s, " {cell:>18}");
        }
        s.push('\n');
        let _ = write!(s, "  {:<42}", "server on another CPU than the client");
        for h in &self.latency_hops {
            let _ = write!(s, " {:>18}", format!("{}/{}", h.cross_cpu, h.round_trips));
        }
        s.push('\n');
        s
    }

    /// The lines that stand in a section for its failed stages.
    fn failure_lines(&self, section: &str) -> String {
        self.failures(section)
            .map(|f| format!("  FAILED {}: {}\n", f.stage, f.error))
            .collect()
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "machine: {} ({} CPUs, {:.0} GiB), Linux {}",
            m.cpu, m.cpus, m.memory_gib, m.kernel
        );
        let _ = writeln!(
            s,
            "command: {}   repetitions: {}   (median, range)\n",
            self.command, self.repetitions
        );
        if !self.finished {
            let _ = writeln!(
                s,
                "PARTIAL: written as the stages completed; the run has not finished (or was stopped)\n"
            );
        }
        let _ = writeln!(s, "64-byte UDP, LAN peer to app through both routers");
        let _ = writeln!(
            s,
            "  {:<18} {:>26} {:>26} {:>8} {:>9} {:>9}",
            "contender", "received kpps", "sent kpps", "loss", "softnet", "if drops"
        );
        for r in &self.packet_rate {
            let _ = writeln!(
                s,
                "  {:<18} {:>26} {:>26} {:>7.1}% {:>9} {:>9}",
                r.setup,
                r.received_pps.show(1e3, 1),
                r.sent_pps.show(1e3, 1),
                r.loss.median * 100.0,
                r.softnet_drops,
                r.interface_drops
            );
        }
        s += &self.failure_lines(stage::PACKET_RATE);
        let _ = writeln!(
            s,
            "\nrouter cost per packet per hop, (1/rate - 1/rate_bare) / 2"
        );
        for h in &self.per_hop {
            let _ = write!(s, "  {:<18} {:>7.2} us/hop", h.setup, h.per_hop_us);
            if let Some(ratio) = h.rate_vs_nftables {
                let _ = write!(s, "   end-to-end rate {ratio:.2}x the nftables recipe's");
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\nTCP bulk throughput through the forwarded port (iperf3), Gbit/s"
        );
        for r in &self.tcp {
            let _ = writeln!(
                s,
                "  {:<18} LAN to app {:>22}   app to LAN {:>22}",
                r.setup,
                r.lan_to_app_bps.show(1e9, 2),
                r.app_to_lan_bps.show(1e9, 2)
            );
        }
        s += &self.failure_lines(stage::TCP);
        let _ = writeln!(s, "\nrequest/response latency, 64-byte TCP round trips, us");
        for r in &self.latency {
            let _ = writeln!(
                s,
                "  {:<18} p50 {:>20}   p99 {:>20}",
                r.setup,
                r.p50_us.show(1.0, 1),
                r.p99_us.show(1.0, 1)
            );
        }
        s += &self.failure_lines(stage::LATENCY);
        s += &self.hops_table();
        let _ = writeln!(
            s,
            "\nrule scaling: packet rate to the last of N rules, kpps"
        );
        for r in &self.rule_scaling {
            let _ = writeln!(
                s,
                "  {:<26} {:>6} rules {:>22}",
                r.variant,
                r.rules,
                r.pps.show(1e3, 1)
            );
        }
        s += &self.failure_lines(stage::RULE_SCALING);
        let _ = writeln!(
            s,
            "\nflow table: forwarder packet rate with N live flows (table of 131,072), kpps"
        );
        for r in &self.flow_scaling {
            let _ = writeln!(
                s,
                "  {:>7} live flows {:>22}",
                r.live_flows,
                r.pps.show(1e3, 1)
            );
        }
        s += &self.failure_lines(stage::FLOW_TABLE);
        let _ = writeln!(
            s,
            "\nnew flows per second: TCP SYNs from new peer ports reaching the app, thousands"
        );
        for r in &self.new_flows {
            let _ = writeln!(
                s,
                "  {:<18} {:>22}",
                r.setup,
                r.new_flows_per_sec.show(1e3, 1)
            );
        }
        s += &self.failure_lines(stage::NEW_FLOWS);
        let _ = writeln!(
            s,
            "\nprogram cost per packet (BPF_PROG_TEST_RUN, routes and neighbours present)"
        );
        for (name, ns) in &self.program_cost_ns {
            let _ = writeln!(s, "  {name:<45} {ns:>6.0} ns");
        }
        if !self.program_stages.is_empty() {
            let _ = writeln!(
                s,
                "\nDNAT and reply of an established flow, stopped after each stage (single runs, the timer's share included)\n  {:<12} {:>14} {:>14}  what the stage adds",
                "stopped at", "DNAT ns (+)", "reply ns (+)"
            );
            let mut before: Option<&StageCost> = None;
            for stage in &self.program_stages {
                let delta = |pick: fn(&StageCost) -> f64| {
                    before.map_or(String::new(), |b| {
                        format!("(+{:.0})", pick(stage) - pick(b))
                    })
                };
                let _ = writeln!(
                    s,
                    "  {:<12} {:>6.0} {:>7} {:>6.0} {:>7}  {}",
                    stage.stage,
                    stage.dnat_ns,
                    delta(|c| c.dnat_ns),
                    stage.reply_ns,
                    delta(|c| c.reply_ns),
                    stage.help
                );
                before = Some(stage);
            }
        }
        s += &self.failure_lines(stage::PROGRAM_COST);
        let _ = writeln!(s, "\nreaction to renumbering sys-net's LAN address");
        for r in &self.reaction {
            let map = r
                .event_to_map_us
                .as_ref()
                .map_or("n/a".into(), |m| m.show(1.0, 0) + " us");
            let _ = writeln!(
                s,
                "  {:<18} event to map {:<24} ip addr to first new-source packet {} ms   event to packet {} ms",
                r.setup,
                map,
                r.command_to_packet_ms.show(1.0, 2),
                r.event_to_packet_ms.show(1.0, 2)
            );
        }
        s += &self.failure_lines(stage::REACTION);
        let _ = writeln!(s, "\ntargets");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "  [{}] {}: {} (target {})",
                match t.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "not measured",
                },
                t.name,
                t.measured,
                t.target
            );
        }
        s
    }

    /// A bar chart of the per-hop costs and a line chart of rule scaling.
    pub fn svg(&self) -> String {
        let mut s = String::from(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"380\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"900\" height=\"380\" fill=\"white\"/>\n\
             <text x=\"20\" y=\"24\" font-size=\"15\">Router cost per packet per hop (us, lower is better)</text>\n",
        );
        let max = self
            .per_hop
            .iter()
            .map(|h| h.per_hop_us)
            .fold(0.1, f64::max);
        for (i, h) in self.per_hop.iter().enumerate() {
            let y = 50 + i as i32 * 50;
            let w = (h.per_hop_us.max(0.0) / max * 260.0) as i32;
            let color = if h.setup == "forwarder" {
                "#2a7"
            } else {
                "#888"
            };
            let _ = writeln!(s, "<text x=\"20\" y=\"{}\">{}</text>", y + 18, h.setup);
            let _ = writeln!(
                s,
                "<rect x=\"130\" y=\"{y}\" width=\"{w}\" height=\"26\" fill=\"{color}\"/>"
            );
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\">{:.2}</text>",
                136 + w,
                y + 18,
                h.per_hop_us
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"470\" y=\"24\" font-size=\"15\">Packet rate vs forward rules (kpps)</text>"
        );
        let (x0, y0, width, height) = (510.0, 320.0, 360.0, 260.0);
        let top = self
            .rule_scaling
            .iter()
            .map(|r| r.pps.median)
            .fold(1.0, f64::max)
            * 1.1;
        let rules: Vec<usize> = {
            let mut r: Vec<usize> = self.rule_scaling.iter().map(|r| r.rules).collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        let xpos = |n: usize| {
            let span = (*rules.last().unwrap_or(&1) as f64).log10().max(1.0);
            x0 + (n as f64).log10() / span * width
        };
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{}\" y2=\"{y0}\" stroke=\"black\"/>",
            x0 + width
        );
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{}\" stroke=\"black\"/>",
            y0 - height
        );
        for n in &rules {
            let _ = writeln!(
                s,
                "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
                xpos(*n),
                y0 + 16.0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>",
            x0 - 4.0,
            y0 - height + 4.0,
            top / 1e3
        );
        let mut variants: Vec<&str> = self
            .rule_scaling
            .iter()
            .map(|r| r.variant.as_str())
            .collect();
        variants.dedup();
        for (i, variant) in variants.iter().enumerate() {
            let color = ["#2a7", "#c44", "#47c"][i % 3];
            let points: Vec<String> = self
                .rule_scaling
                .iter()
                .filter(|r| r.variant == *variant)
                .map(|r| {
                    format!(
                        "{:.0},{:.0}",
                        xpos(r.rules),
                        y0 - r.pps.median / top * height
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                points.join(" ")
            );
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{variant}</text>",
                x0 + 10.0,
                y0 - height + 16.0 + i as f64 * 16.0
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// The page committed as docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "# Benchmarks\n\nThe forwarder against the seed's nftables recipe (`../shared/seeds/000`), plain kernel routing with\nno netfilter rules in the routers, and a bare veth (sender and receiver alone), measured in one run by\n`cargo xtask bench`, contenders alternating, every measurement repeated. This page is the\nlatest full run; `target/bench/` holds its table, JSON and chart.\n\n",
        );
        let m = &self.machine;
        let _ = writeln!(
            s,
            "- machine: {}, {} CPUs, {:.0} GiB, Linux {}",
            m.cpu, m.cpus, m.memory_gib, m.kernel
        );
        let _ = writeln!(s, "- command: `{}`", self.command);
        let _ = writeln!(
            s,
            "- repetitions: {}; figures are medians with the range in brackets\n",
            self.repetitions
        );
        s.push_str("![per-hop cost and rule scaling](benchmarks.svg)\n\n## Targets\n\n| target | goal | measured | |\n|---|---|---|---|\n");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                t.name,
                t.target,
                t.measured,
                match t.met {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "**not measured**",
                }
            );
        }
        s.push_str("\n## Results\n\n```\n");
        s.push_str(&self.text());
        s.push_str("```\n");
        s.push_str(METHOD);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_take_the_median_of_odd_and_even_counts() {
        assert_eq!(Spread::of(vec![3.0, 1.0, 2.0]).median, 2.0);
        let even = Spread::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of(vec![]).median, 0.0);
    }

    #[test]
    fn per_hop_cost_subtracts_the_bare_veth_and_halves() {
        let row = |setup: &str, pps: f64| RateRow {
            setup: setup.into(),
            received_pps: Spread::of(vec![pps]),
            sent_pps: Spread::of(vec![pps]),
            loss: Spread::of(vec![0.0]),
            softnet_drops: 0,
            interface_drops: 0,
        };
        let mut report = Report {
            quick: true,
            repetitions: 1,
            // The issue's rough figures: 207k bare, 146k routing, 100k nftables.
            packet_rate: vec![
                row("bare veth", 207e3),
                row("plain routing", 146e3),
                row("nftables recipe", 100e3),
                row("forwarder", 180e3),
            ],
            ..Default::default()
        };
        report.evaluate();
        let hop = |s: &str| {
            report
                .per_hop
                .iter()
                .find(|h| h.setup == s)
                .unwrap()
                .per_hop_us
        };
        assert!((hop("nftables recipe") - 2.585).abs() < 0.01);
        assert!((hop("plain routing") - 1.008).abs() < 0.01);
        assert!(
            report
                .targets
                .iter()
                .any(|t| t.name.contains("1/3") || t.target.contains("1/3"))
        );
        assert!(report.text().contains("us/hop"));
        assert!(report.svg().starts_with("<svg"));
    }

    #[test]
    fn a_failed_stage_is_reported_and_its_targets_are_not_measured() {
        let mut report = Report {
            latency: vec![
                LatencyRow {
                    setup: "forwarder".into(),
                    p50_us: Spread::of(vec![30.0]),
                    p99_us: Spread::of(vec![60.0]),
                },
                LatencyRow {
                    setup: "plain routing".into(),
                    p50_us: Spread::of(vec![40.0]),
                    p99_us: Spread::of(vec![50.0]),
                },
            ],
            failed: vec![FailedStage {
                stage: format!("{}, forwarder", stage::REACTION),
                error: "no announcement within 10 s".into(),
            }],
            ..Default::default()
        };
        report.evaluate();
        let target = |name: &str| report.targets.iter().find(|t| t.name == name).unwrap();
        let p50 = target("p50 request/response latency vs plain routing");
        assert_eq!(p50.met, Some(true), "{p50:?}");
        let p99 = target("p99 request/response latency vs plain routing");
        assert_eq!(p99.met, Some(false), "{p99:?}");
        let reaction = target("address change to first correct relayed packet");
        assert_eq!(reaction.met, None);
        assert_eq!(
            reaction.measured,
            "not measured: reaction to renumbering, forwarder failed"
        );
        let text = report.text();
        assert!(
            text.contains("FAILED reaction to renumbering, forwarder: no announcement within 10 s"),
            "{text}"
        );
        assert!(text.contains("PARTIAL"), "{text}");
        assert!(report.markdown().contains("**not measured**"));
    }
}
