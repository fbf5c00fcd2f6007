//! Where a request/response round trip spends its time, hop by hop: kernel
//! tracepoints (a device's transmit, a device's receive, the application's
//! read) timestamped with the TSC in a trace instance of our own, while
//! `rr_latency` runs. Every hop of a packet is processed on the CPU that
//! sent it, in one softirq, so the gaps between tracepoints are the routers'
//! work, the veth crossings, and the endpoints' stacks and wakeups.

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{env::Env, measure};

/// The tracepoints of one round trip through the Qubes-like topology, in
/// order: the request from the LAN peer through sys-net and sys-firewall
/// to the app, the server's read, the reply back, the client's read.
const PATH: [(Kind, &str); 14] = [
    (Kind::Transmit, "eth0"),
    (Kind::Receive, "wls6f0"),
    (Kind::Transmit, "vif2.0"),
    (Kind::Receive, "eth0"),
    (Kind::Transmit, "vif3.0"),
    (Kind::Receive, "eth0"),
    (Kind::Read, ""),
    (Kind::Transmit, "eth0"),
    (Kind::Receive, "vif3.0"),
    (Kind::Transmit, "eth0"),
    (Kind::Receive, "vif2.0"),
    (Kind::Transmit, "wls6f0"),
    (Kind::Receive, "eth0"),
    (Kind::Read, ""),
];

/// What the time between two consecutive tracepoints of `PATH` is.
pub const SEGMENTS: [&str; 13] = [
    "LAN peer to sys-net (veth)",
    "sys-net, request",
    "sys-net to sys-firewall (veth)",
    "sys-firewall, request",
    "sys-firewall to app (veth)",
    "app: received to the server's read",
    "app: read to reply sent",
    "app to sys-firewall (veth)",
    "sys-firewall, reply",
    "sys-firewall to sys-net (veth)",
    "sys-net, reply",
    "sys-net to LAN peer (veth)",
    "LAN peer: received to the client's read",
];

/// The segments that are the routers' own work (a device's receive to the
/// next device's transmit), as opposed to veth crossings and endpoints.
pub const ROUTER_SEGMENTS: [usize; 4] = [1, 3, 8, 10];
/// The veth crossings: the same kernel code behind every contender, so
/// the yardstick of how fast the host ran that moment.
pub const VETH_SEGMENTS: [usize; 6] = [0, 2, 4, 7, 9, 11];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// net:net_dev_start_xmit
    Transmit,
    /// net:netif_receive_skb
    Receive,
    /// skb:skb_copy_datagram_iovec, a socket read
    Read,
}

/// The events traced and their filters: data segments only (a pure ACK is
/// 52 bytes of IP, a 64-byte request or reply 116), and reads of a whole
/// 64-byte message.
const EVENTS: [(&str, &str); 3] = [
    ("net/net_dev_start_xmit", "len > 100"),
    ("net/netif_receive_skb", "len > 100"),
    ("skb/skb_copy_datagram_iovec", "len == 64"),
];

const TRACEFS: &str = "/sys/kernel/tracing";

/// Median (and 90th percentile) of each segment over the round trips whose
/// fourteen tracepoints were all seen in order.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HopTiming {
    pub setup: String,
    pub round_trips: usize,
    /// Round trips whose server ran on another CPU than the client: each
    /// costs a cross-CPU wakeup.
    pub cross_cpu: usize,
    /// Per segment of `SEGMENTS`: (median, 90th percentile) in us.
    pub segments_us: Vec<(String, f64, f64)>,
    /// The routers' time over the veth crossings' in the same round trips:
    /// the host's speed of the moment, which moves every segment of a run
    /// together, cancels out.
    pub routers_per_veth: Option<f64>,
}

impl HopTiming {
    /// Repeated runs of one contender as one: each segment's median (and
    /// 90th percentile) is the median of the runs' own, the counts are
    /// summed.
    pub fn combine(runs: Vec<HopTiming>) -> HopTiming {
        let Some(first) = runs.first() else {
            return HopTiming::default();
        };
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            quantile(&v, 0.5)
        };
        let segments_us = (0..first.segments_us.len())
            .map(|i| {
                let of = |pick: fn(&(String, f64, f64)) -> f64| {
                    median(
                        runs.iter()
                            .filter_map(|r| r.segments_us.get(i).map(pick))
                            .collect(),
                    )
                };
                (first.segments_us[i].0.clone(), of(|s| s.1), of(|s| s.2))
            })
            .collect();
        let ratios: Vec<f64> = runs.iter().filter_map(|r| r.routers_per_veth).collect();
        HopTiming {
            setup: first.setup.clone(),
            round_trips: runs.iter().map(|r| r.round_trips).sum(),
            cross_cpu: runs.iter().map(|r| r.cross_cpu).sum(),
            segments_us,
            routers_per_veth: (!ratios.is_empty()).then(|| median(ratios)),
        }
    }

    fn sum_of(&self, segments: &[usize]) -> Option<f64> {
        segments
            .iter()
            .map(|&i| self.segments_us.get(i).map(|(_, median, _)| median))
            .sum()
    }

    /// The routers' work in a round trip: the sum of their segments'
    /// medians, in us.
    pub fn router_us(&self) -> Option<f64> {
        self.sum_of(&ROUTER_SEGMENTS)
    }

    /// The veth crossings of a round trip, in us.
    pub fn veth_us(&self) -> Option<f64> {
        self.sum_of(&VETH_SEGMENTS)
    }
}

/// A trace instance of our own (so nobody else's tracing is touched),
/// removed on drop.
struct Instance {
    dir: PathBuf,
}

impl Instance {
    fn create() -> Result<Self> {
        let root = PathBuf::from(TRACEFS);
        if !root.join("instances").is_dir() {
            bail!("{TRACEFS} is not mounted (mount -t tracefs nodev {TRACEFS})");
        }
        let dir = root
            .join("instances")
            .join(format!("forwarder-bench-{}", std::process::id()));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let instance = Instance { dir };
        instance.write("trace_clock", "x86-tsc")?;
        instance.write("buffer_size_kb", "16384")?;
        for (event, filter) in EVENTS {
            instance.write(&format!("events/{event}/filter"), filter)?;
            instance.write(&format!("events/{event}/enable"), "1")?;
        }
        Ok(instance)
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let path = self.dir.join(file);
        fs::write(&path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
    }

    fn text(&self) -> Result<String> {
        fs::read_to_string(self.dir.join("trace")).context("reading the trace")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.write("tracing_on", "0");
        for (event, _) in EVENTS {
            let _ = self.write(&format!("events/{event}/enable"), "0");
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

#[cfg(target_arch = "x86_64")]
fn tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn tsc() -> u64 {
    0
}

/// TSC ticks per microsecond, against the monotonic clock.
fn tsc_per_us() -> Result<f64> {
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(50));
    let (t1, c1) = (Instant::now(), tsc());
    let ticks = c1.saturating_sub(c0) as f64;
    if ticks == 0.0 {
        bail!("per-hop timing reads the TSC, which this architecture has not");
    }
    Ok(ticks / (t1 - t0).as_secs_f64() / 1e6)
}

/// One traced event: its TSC stamp, CPU, kind and device.
#[derive(Clone, Debug, PartialEq)]
struct Event {
    tsc: u64,
    cpu: u32,
    kind: Kind,
    dev: String,
}

/// A line of the trace, as "<task>-<pid> [<cpu>] <flags> <tsc>: <event>: <fields>".
fn parse_line(line: &str) -> Option<Event> {
    let (head, rest) = line.split_once("]")?;
    let cpu = head.rsplit_once('[')?.1.trim().parse().ok()?;
    let mut words = rest.split_whitespace();
    let _flags = words.next()?;
    let tsc = words.next()?.strip_suffix(':')?.parse().ok()?;
    let kind = match words.next()? {
        "net_dev_start_xmit:" => Kind::Transmit,
        "netif_receive_skb:" => Kind::Receive,
        "skb_copy_datagram_iovec:" => Kind::Read,
        _ => return None,
    };
    let dev = words
        .find_map(|w| w.strip_prefix("dev="))
        .unwrap_or_default()
        .to_string();
    Some(Event {
        tsc,
        cpu,
        kind,
        dev,
    })
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The segments of every complete round trip in `events`.
fn timing(setup: &str, events: &[Event], ticks_per_us: f64) -> HopTiming {
    let matches = |window: &[Event]| {
        window
            .iter()
            .zip(PATH)
            .all(|(e, (kind, dev))| e.kind == kind && (dev.is_empty() || e.dev == dev))
    };
    let mut durations = vec![Vec::new(); SEGMENTS.len()];
    let (mut round_trips, mut cross_cpu) = (0, 0);
    let mut i = 0;
    while i + PATH.len() <= events.len() {
        let window = &events[i..i + PATH.len()];
        if !matches(window) {
            i += 1;
            continue;
        }
        for (segment, pair) in durations.iter_mut().zip(window.windows(2)) {
            segment.push(pair[1].tsc.saturating_sub(pair[0].tsc) as f64 / ticks_per_us);
        }
        round_trips += 1;
        // The client sends the request; the server reads it.
        if window[0].cpu != window[6].cpu {
            cross_cpu += 1;
        }
        i += PATH.len();
    }
    let mut timing = HopTiming {
        setup: setup.into(),
        round_trips,
        cross_cpu,
        routers_per_veth: None,
        segments_us: SEGMENTS
            .iter()
            .zip(durations)
            .filter(|(_, d)| !d.is_empty())
            .map(|(name, mut d)| {
                d.sort_by(f64::total_cmp);
                (name.to_string(), quantile(&d, 0.5), quantile(&d, 0.9))
            })
            .collect(),
    };
    timing.routers_per_veth = timing
        .router_us()
        .zip(timing.veth_us())
        .map(|(routers, veth)| routers / veth);
    timing
}

/// `rounds` request/response round trips through `env`, traced.
pub fn per_hop(env: &Env, rounds: usize) -> Result<HopTiming> {
    let ticks_per_us = tsc_per_us()?;
    // Warm: neighbours resolved, flows open, code paths cached.
    measure::rr_latency(env, 200)?;
    let instance = Instance::create()?;
    instance.write("tracing_on", "1")?;
    let run = measure::rr_latency(env, rounds);
    instance.write("tracing_on", "0")?;
    run?;
    let events: Vec<Event> = instance.text()?.lines().filter_map(parse_line).collect();
    let timing = timing(&env.setup.label(), &events, ticks_per_us);
    if timing.round_trips < rounds / 2 {
        bail!(
            "{}: only {} of {rounds} round trips traced whole ({} events)",
            env.setup.label(),
            timing.round_trips,
            events.len()
        );
    }
    Ok(timing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_parse() {
        let e = parse_line(
            "     probe-24433   [001] b.s1. 56084134020303: net_dev_start_xmit: dev=vif2.0 queue_mapping=0 skbaddr=000000006aac5f2f len=130",
        )
        .unwrap();
        assert_eq!(
            e,
            Event {
                tsc: 56084134020303,
                cpu: 1,
                kind: Kind::Transmit,
                dev: "vif2.0".into()
            }
        );
        let read = parse_line(
            "     probe-24432   [000] ..... 56084134029999: skb_copy_datagram_iovec: skbaddr=000000006aac5f2f len=64",
        )
        .unwrap();
        assert_eq!((read.kind, read.dev.as_str()), (Kind::Read, ""));
        assert_eq!(parse_line("# tracer: nop"), None);
    }

    #[test]
    fn only_whole_round_trips_count() {
        let event = |tsc, cpu, (kind, dev): (Kind, &str)| Event {
            tsc,
            cpu,
            kind,
            dev: dev.into(),
        };
        // A stray event, then two round trips 10 ticks per step; the
        // second's server on the other CPU.
        let mut events = vec![event(0, 0, (Kind::Receive, "lo"))];
        for (trip, server_cpu) in [(0u64, 0u32), (1, 1)] {
            for (step, hop) in PATH.into_iter().enumerate() {
                let cpu = if (6..13).contains(&step) {
                    server_cpu
                } else {
                    0
                };
                events.push(event(1000 * trip + 10 * step as u64 + 5, cpu, hop));
            }
        }
        let t = timing("x", &events, 10.0);
        assert_eq!((t.round_trips, t.cross_cpu), (2, 1));
        assert_eq!(t.segments_us.len(), SEGMENTS.len());
        assert!(t.segments_us.iter().all(|(_, median, _)| *median == 1.0));
        assert_eq!(t.router_us(), Some(4.0));
        assert_eq!(t.routers_per_veth, Some(4.0 / 6.0));
        let mut slow = t.clone();
        slow.segments_us[1].1 = 3.0;
        let both = HopTiming::combine(vec![t.clone(), slow.clone(), slow]);
        assert_eq!((both.round_trips, both.cross_cpu), (6, 3));
        assert_eq!(both.segments_us[1].1, 3.0, "the median of 1, 3 and 3");
        assert_eq!(both.segments_us[0].1, 1.0);
        for i in ROUTER_SEGMENTS {
            assert!(SEGMENTS[i].starts_with("sys-") && !SEGMENTS[i].contains("veth"));
        }
    }
}
