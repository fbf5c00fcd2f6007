//! The soak: mixed load through both routers of the Qubes-like topology for
//! a long time, with the daemons' footprint sampled throughout. Load: TCP
//! streams whose echoed bytes are hashed, a new short TCP flow every
//! second, UDP pings, announcements both ways every 100 ms, and a rule
//! added and another removed in each router every second.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use forwarder::pin::PinLayout;
use forwarder_common::maps::{RouteEntry, RouteKey, names};

use crate::{
    daemon::{Forwarder, cli},
    kernel_objects::{self, Objects},
    netns::Netns,
    sockets::{Announcer, MulticastListener},
    topology::*,
};

const STREAMS: u64 = 2;
/// Per stream: enough to keep both routers busy without starving the
/// daemons of the machine's two cores.
const STREAM_RATE: u64 = 2 << 20;
const CHUNK: usize = 16 << 10;
const SHORT_FLOW_BYTES: usize = 64 << 10;
const PING_INTERVAL: Duration = Duration::from_millis(20);
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(100);
const RULE_CHANGE_INTERVAL: Duration = Duration::from_secs(1);
/// Ports the rule churn cycles through, away from everything else.
const CHURN_PORTS: u16 = 50;
const CHURN_BASE: u16 = 42_000;
/// What resident memory may grow by between the first and second half of
/// the run before it counts as a leak.
const RSS_SLACK_KIB: u64 = 1024;

/// FNV-1a over a byte stream: the hash is the same however the bytes are
/// split into reads, which a `Hasher` does not promise.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    const fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic stream contents, so corruption cannot cancel out.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// The app's side: a raw TCP echo and one UDP socket on the LocalSend port
/// that answers pings and counts the LAN's relayed announcements.
struct AppSide {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    lan_announcements: Arc<AtomicU64>,
}

impl AppSide {
    fn start(ns: &Netns) -> Result<Self> {
        let (tcp, udp) = ns.run(|| -> Result<_> {
            let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, LOCALSEND_PORT))?;
            tcp.set_nonblocking(true)?;
            let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, LOCALSEND_PORT))?;
            udp.join_multicast_v4(&LOCALSEND_GROUP, &Ipv4Addr::UNSPECIFIED)?;
            udp.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok((tcp, udp))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let lan_announcements = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let flag = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, _)) => {
                        std::thread::spawn(move || echo_raw(conn));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
        let flag = stop.clone();
        let counted = lan_announcements.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                if buf[..n].starts_with(b"ping ") {
                    let _ = udp.send_to(&buf[..n], from);
                } else if buf[..n].starts_with(b"lan ")
                    && from.ip() == std::net::IpAddr::V4(LAN_PEER)
                {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        Ok(AppSide {
            stop,
            threads,
            lan_announcements,
        })
    }
}

impl Drop for AppSide {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn echo_raw(mut conn: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// What one TCP connection sent and got back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub bytes: u64,
    pub hash: u64,
}

/// A long TCP stream from the LAN to the app through both routers, paced
/// at `STREAM_RATE`, hashing what it sends and what comes back.
struct Stream {
    stop: Arc<AtomicBool>,
    echoed_bytes: Arc<AtomicU64>,
    writer: JoinHandle<Result<Transfer>>,
    reader: JoinHandle<Result<Transfer>>,
}

fn connect(lan: &Netns) -> Result<TcpStream> {
    let to = SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT);
    let conn = lan.run(|| TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(conn)
}

impl Stream {
    fn start(lan: &Netns, seed: u64) -> Result<Self> {
        let conn = connect(lan)?;
        let stop = Arc::new(AtomicBool::new(false));
        let echoed_bytes = Arc::new(AtomicU64::new(0));
        let writer = {
            let mut conn = conn.try_clone()?;
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<Transfer> {
                let mut pattern = Pattern(seed);
                let mut hash = Fnv::new();
                let mut buf = vec![0u8; CHUNK];
                let mut sent = 0u64;
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    pattern.fill(&mut buf);
                    conn.write_all(&buf).context("stream write")?;
                    hash.update(&buf);
                    sent += CHUNK as u64;
                    let due = start + Duration::from_secs_f64(sent as f64 / STREAM_RATE as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                conn.shutdown(Shutdown::Write)?;
                Ok(Transfer {
                    bytes: sent,
                    hash: hash.0,
                })
            })
        };
        let reader = {
            let mut conn = conn;
            let echoed = echoed_bytes.clone();
            std::thread::spawn(move || -> Result<Transfer> {
                let mut hash = Fnv::new();
                let mut buf = vec![0u8; 64 << 10];
                let mut got = 0u64;
                loop {
                    let n = conn.read(&mut buf).context("stream read")?;
                    if n == 0 {
                        return Ok(Transfer {
                            bytes: got,
                            hash: hash.0,
                        });
                    }
                    hash.update(&buf[..n]);
                    got += n as u64;
                    echoed.store(got, Ordering::Relaxed);
                }
            })
        };
        Ok(Stream {
            stop,
            echoed_bytes,
            writer,
            reader,
        })
    }

    fn finish(self) -> Result<(Transfer, Transfer)> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .writer
            .join()
            .map_err(|_| anyhow!("stream writer panicked"))??;
        let echoed = self
            .reader
            .join()
            .map_err(|_| anyhow!("stream reader panicked"))??;
        Ok((sent, echoed))
    }
}

/// One short TCP flow on a fresh connection: send, read it all back,
/// compare.
fn short_flow(mut conn: TcpStream, seed: u64) -> Result<()> {
    let mut data = vec![0u8; SHORT_FLOW_BYTES];
    Pattern(seed).fill(&mut data);
    let mut writer = conn.try_clone()?;
    let sending = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(SHORT_FLOW_BYTES);
    conn.read_to_end(&mut back)?;
    sending
        .join()
        .map_err(|_| anyhow!("short flow writer panicked"))??;
    let mut expected = vec![0u8; SHORT_FLOW_BYTES];
    Pattern(seed).fill(&mut expected);
    ensure!(
        back == expected,
        "short flow {seed}: {} bytes back, contents differ",
        back.len()
    );
    Ok(())
}

/// UDP pings from the LAN to the app every `PING_INTERVAL`.
struct Pinger {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Pinger {
    fn start(lan: &Netns) -> Result<Self> {
        let sock = lan.run(|| UdpSocket::bind((LAN_PEER, 0)))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        {
            let sock = sock.try_clone()?;
            let (stop, sent) = (stop.clone(), sent.clone());
            threads.push(std::thread::spawn(move || {
                let start = Instant::now();
                let mut seq = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let to = SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT);
                    if sock.send_to(format!("ping {seq}").as_bytes(), to).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    seq += 1;
                    let due = start + PING_INTERVAL * seq;
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
            }));
        }
        {
            let (stop, answered) = (stop.clone(), answered.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                let mut quiet_since = None::<Instant>;
                loop {
                    match sock.recv_from(&mut buf) {
                        Ok((n, _)) if buf[..n].starts_with(b"ping ") => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            quiet_since = None;
                        }
                        _ if stop.load(Ordering::Relaxed) => {
                            let since = *quiet_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_millis(500) {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
            }));
        }
        Ok(Pinger {
            stop,
            sent,
            answered,
            threads,
        })
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
        )
    }
}

/// One router's footprint at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Footprint {
    pub rss_kib: u64,
    pub fds: u64,
    pub rules: u64,
    pub routes_cached: u64,
    pub errors: u64,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub routers: [Footprint; 2],
    pub kernel: Objects,
    pub echoed_mib: f64,
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn footprint(fwd: &Forwarder) -> Result<Footprint> {
    let pid = fwd.pid().context("the daemon is not running")?;
    let tables = fwd.tables()?;
    let cache_pin = PinLayout::new(fwd.pins.path())
        .maps
        .join(names::ROUTE_CACHE);
    let cache: aya::maps::HashMap<_, RouteKey, RouteEntry> =
        aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&cache_pin)?)?.try_into()?;
    Ok(Footprint {
        rss_kib: proc_status_kib(pid, "VmRSS:")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64,
        rules: tables.installed()?.len() as u64,
        routes_cached: cache.keys().count() as u64,
        errors: fwd.failures()?,
    })
}

/// Adds a rule on the next churn port and removes the one before it, in
/// both routers; returns how many changes were made.
fn change_rules(routers: [(&Netns, &Forwarder, Ipv4Addr); 2], tick: u16) -> Result<u64> {
    let mut changes = 0;
    let (proto, previous_proto) = if tick.is_multiple_of(2) {
        ("udp", "tcp")
    } else {
        ("tcp", "udp")
    };
    let port = CHURN_BASE + tick % CHURN_PORTS;
    let previous = CHURN_BASE + (tick + CHURN_PORTS - 1) % CHURN_PORTS;
    for (ns, fwd, target) in routers {
        let pin_dir = fwd.pins.path().display().to_string();
        let spec = format!("{proto}:{port}={target}");
        let mut calls = vec![vec![
            "rules",
            "add",
            &spec,
            "--comment",
            "soak",
            "--pin-dir",
            &pin_dir,
        ]];
        let old = format!("{previous_proto}:{previous}");
        if tick > 0 {
            calls.push(vec!["rules", "del", &old, "--pin-dir", &pin_dir]);
        }
        for args in calls {
            let out = cli(ns, &args)?;
            if !out.status.success() {
                bail!(
                    "forwarder {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            changes += 1;
        }
    }
    Ok(changes)
}

#[derive(Debug)]
pub struct Report {
    pub duration: Duration,
    pub samples: Vec<Sample>,
    pub streams: Vec<(Transfer, Transfer)>,
    pub short_flows: u64,
    pub short_flow_failures: Vec<String>,
    pub pings: (u64, u64),
    pub app_announcements: (u64, u64),
    pub lan_announcements: (u64, u64),
    pub rule_changes: u64,
}

fn halves<T: Copy + Ord>(samples: &[Sample], f: impl Fn(&Sample) -> T) -> (T, T) {
    let mid = samples.len() / 2;
    let max = |s: &[Sample]| s.iter().map(&f).max().expect("samples");
    (max(&samples[..mid]), max(&samples[mid..]))
}

impl Report {
    /// Every property the soak promises; empty when all hold.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.samples.len() < 4 {
            out.push(format!("only {} samples", self.samples.len()));
            return out;
        }
        for (i, (sent, echoed)) in self.streams.iter().enumerate() {
            if sent != echoed {
                out.push(format!("stream {i}: sent {sent:?}, echoed {echoed:?}"));
            }
        }
        out.extend(self.short_flow_failures.iter().cloned());
        for (r, name) in ["sys-net", "sys-firewall"].iter().enumerate() {
            let (first, second) = halves(&self.samples, |s| s.routers[r].rss_kib);
            if second > first + RSS_SLACK_KIB {
                out.push(format!(
                    "{name}: resident memory grew from {first} KiB to {second} KiB"
                ));
            }
            let (first, second) = halves(&self.samples, |s| s.routers[r].fds);
            if second > first {
                out.push(format!("{name}: open files grew from {first} to {second}"));
            }
            let (first, second) = halves(&self.samples, |s| s.routers[r].routes_cached);
            if second > first {
                out.push(format!(
                    "{name}: cached routes grew from {first} to {second}"
                ));
            }
            let rules: Vec<u64> = self.samples.iter().map(|s| s.routers[r].rules).collect();
            if rules.iter().max() > rules.first().map(|n| n + 1).as_ref() {
                out.push(format!("{name}: rules piled up: {rules:?}"));
            }
            let errors =
                self.samples.last().unwrap().routers[r].errors - self.samples[0].routers[r].errors;
            if errors > 0 {
                out.push(format!("{name}: {errors} rewrite or clone failures"));
            }
        }
        let kernel = self.samples[0].kernel;
        if let Some(s) = self.samples.iter().find(|s| s.kernel != kernel) {
            out.push(format!(
                "kernel objects changed: {kernel:?} then {:?} at {:?}",
                s.kernel, s.at
            ));
        }
        let (sent, answered) = self.pings;
        if answered * 100 < sent * 99 {
            out.push(format!("UDP: {answered} of {sent} pings answered"));
        }
        for (what, (sent, relayed)) in [
            ("app -> LAN", self.app_announcements),
            ("LAN -> app", self.lan_announcements),
        ] {
            if relayed * 100 < sent * 95 {
                out.push(format!("announcements {what}: {relayed} of {sent} relayed"));
            }
        }
        out
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "soak: {:?} of mixed load through sys-net and sys-firewall",
            self.duration
        );
        let _ = writeln!(
            s,
            "{:>7}  {:>10} {:>4} {:>5} {:>6} {:>4}  {:>10} {:>4} {:>5} {:>6} {:>4}  {:>18}  {:>8}",
            "t",
            "net RSS",
            "fds",
            "rules",
            "routes",
            "errs",
            "fw RSS",
            "fds",
            "rules",
            "routes",
            "errs",
            "kernel p/m/l",
            "TCP MiB"
        );
        for x in &self.samples {
            let [a, b] = &x.routers;
            let _ = writeln!(
                s,
                "{:>6.0}s  {:>7} KiB {:>4} {:>5} {:>6} {:>4}  {:>7} KiB {:>4} {:>5} {:>6} {:>4}  {:>18}  {:>8.1}",
                x.at.as_secs_f64(),
                a.rss_kib,
                a.fds,
                a.rules,
                a.routes_cached,
                a.errors,
                b.rss_kib,
                b.fds,
                b.rules,
                b.routes_cached,
                b.errors,
                format!("{}/{}/{}", x.kernel.programs, x.kernel.maps, x.kernel.links),
                x.echoed_mib
            );
        }
        for (i, (sent, echoed)) in self.streams.iter().enumerate() {
            let _ = writeln!(
                s,
                "TCP stream {i}: sent {} bytes (FNV-1a {:016x}), echoed {} bytes ({:016x})",
                sent.bytes, sent.hash, echoed.bytes, echoed.hash
            );
        }
        let _ = writeln!(
            s,
            "short TCP flows: {} of {} byte each, {} failed",
            self.short_flows,
            SHORT_FLOW_BYTES,
            self.short_flow_failures.len()
        );
        let _ = writeln!(
            s,
            "UDP pings: {} answered of {}",
            self.pings.1, self.pings.0
        );
        let _ = writeln!(
            s,
            "announcements relayed: app -> LAN {} of {}, LAN -> app {} of {}",
            self.app_announcements.1,
            self.app_announcements.0,
            self.lan_announcements.1,
            self.lan_announcements.0
        );
        let _ = writeln!(
            s,
            "rule changes: {} (an add and a delete in each router per second)",
            self.rule_changes
        );
        s
    }
}

/// Runs the soak for `duration`, sampling every `sample_every`.
pub fn run(duration: Duration, sample_every: Duration) -> Result<Report> {
    let t = Topology::build(Offload::On)?;
    let (mut sysnet, mut sysfw) = Forwarder::start_localsend_routers(&t)?;
    let app = AppSide::start(&t.app)?;
    let at_lan = MulticastListener::start(&t.lan, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let streams: Vec<Stream> = (0..STREAMS)
        .map(|i| Stream::start(&t.lan, 0x5eed + i))
        .collect::<Result<_>>()?;
    let pinger = Pinger::start(&t.lan)?;
    let from_app = Announcer::start(
        &t.app,
        "app",
        LOCALSEND_GROUP,
        LOCALSEND_PORT,
        1,
        ANNOUNCE_INTERVAL,
    )?;
    let from_lan = Announcer::start(
        &t.lan,
        "lan",
        LOCALSEND_GROUP,
        LOCALSEND_PORT,
        1,
        ANNOUNCE_INTERVAL,
    )?;

    let start = Instant::now();
    let sample = |echoed_bytes: u64| -> Result<Sample> {
        Ok(Sample {
            at: start.elapsed(),
            routers: [footprint(&sysnet)?, footprint(&sysfw)?],
            kernel: kernel_objects::objects()?,
            echoed_mib: echoed_bytes as f64 / f64::from(1 << 20),
        })
    };
    let mut samples = Vec::new();
    let mut next_sample = start;
    let mut tick = 0u16;
    let mut short_flows = 0;
    let mut rule_changes = 0;
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut flows: Vec<JoinHandle<()>> = Vec::new();
    while start.elapsed() < duration {
        if Instant::now() >= next_sample {
            let sample = sample(
                streams
                    .iter()
                    .map(|s| s.echoed_bytes.load(Ordering::Relaxed))
                    .sum(),
            )?;
            eprintln!(
                "soak: {:.0} s, RSS {} / {} KiB, {:.1} MiB echoed",
                sample.at.as_secs_f64(),
                sample.routers[0].rss_kib,
                sample.routers[1].rss_kib,
                sample.echoed_mib
            );
            samples.push(sample);
            next_sample += sample_every;
        }
        rule_changes += change_rules([(&t.sysnet, &sysnet, SYSFW), (&t.sysfw, &sysfw, APP)], tick)?;
        let seed = u64::from(tick) + 1;
        match connect(&t.lan) {
            Ok(conn) => {
                let failures = failures.clone();
                flows.retain(|f| !f.is_finished());
                flows.push(std::thread::spawn(move || {
                    if let Err(err) = short_flow(conn, seed) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("short flow {seed}: {err:#}"));
                    }
                }));
            }
            Err(err) => failures
                .lock()
                .unwrap()
                .push(format!("short flow {seed}: connect: {err:#}")),
        }
        short_flows += 1;
        tick += 1;
        let due = start + RULE_CHANGE_INTERVAL * u32::from(tick);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    for flow in flows {
        flow.join().map_err(|_| anyhow!("short flow panicked"))?;
    }
    let (app_sent, lan_sent) = (from_app.sent.clone(), from_lan.sent.clone());
    drop((from_app, from_lan));
    let (app_sent, lan_sent) = (
        app_sent.load(Ordering::Relaxed),
        lan_sent.load(Ordering::Relaxed),
    );
    let pings = pinger.finish();
    let streams = streams
        .into_iter()
        .map(Stream::finish)
        .collect::<Result<Vec<_>>>()?;
    samples.push(sample(streams.iter().map(|(_, e)| e.bytes).sum())?);
    let relayed_up = at_lan
        .received()
        .iter()
        .filter(|r| {
            r.from.ip() == std::net::IpAddr::V4(SYSNET_LAN) && r.payload.starts_with(b"app ")
        })
        .count() as u64;
    let report = Report {
        duration: start.elapsed(),
        samples,
        streams,
        short_flows,
        short_flow_failures: failures.lock().unwrap().clone(),
        pings,
        app_announcements: (app_sent, relayed_up),
        lan_announcements: (lan_sent, app.lan_announcements.load(Ordering::Relaxed)),
        rule_changes,
    };
    drop(app);
    sysnet.stop()?;
    sysfw.stop()?;
    Ok(report)
}
