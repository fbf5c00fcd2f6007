//! The measurements. Each runs against one contender at a time.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::env::Env;
use crate::{
    netns::{DieWithParent as _, Netns},
    packet::Frame,
    topology::LAN_PEER,
    wait::wait_until,
};

/// 64-byte frames: Ethernet, IPv4, UDP and 22 bytes of payload.
const FRAME_LEN: usize = 64;

/// A netdev-ingress nftables chain on the app's eth0 that counts and drops
/// the benchmark's packets (those `matching`): the receiver costs next to
/// nothing and cannot be the bottleneck. Everything else (ARP, above all)
/// passes. Removed on drop.
struct Sink<'a> {
    ns: &'a Netns,
}

impl<'a> Sink<'a> {
    fn install(ns: &'a Netns, matching: &str) -> Result<Self> {
        ns.nft(&format!(
            "table netdev bench_sink {{\n chain in {{\n  type filter hook ingress device \"eth0\" priority -500; policy accept;\n  meta protocol ip {matching} counter drop\n }}\n}}\n"
        ))?;
        Ok(Sink { ns })
    }

    fn packets(&self) -> Result<u64> {
        let out = self.ns.sh("nft -j list chain netdev bench_sink in")?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["rule"]["expr"].as_array())
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .context("no counter in the sink chain")
    }
}

impl Drop for Sink<'_> {
    fn drop(&mut self) {
        let _ = self.ns.sh("nft delete table netdev bench_sink");
    }
}

fn tx_packets(ns: &Netns, dev: &str) -> Result<u64> {
    let out = ns.sh(&format!("cat /sys/class/net/{dev}/statistics/tx_packets"))?;
    Ok(out.trim().parse()?)
}

/// Drops the kernel counts: the backlog (softnet, global) and every
/// interface of the contender (rx and tx).
fn drops(env: &Env) -> Result<(u64, u64)> {
    let softnet: u64 = std::fs::read_to_string("/proc/net/softnet_stat")?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .sum();
    let mut iface = 0;
    for ns in env.namespaces() {
        let v: serde_json::Value = serde_json::from_str(&ns.sh("ip -s -j link")?)?;
        for link in v.as_array().into_iter().flatten() {
            for dir in ["rx", "tx"] {
                iface += link["stats64"][dir]["dropped"].as_u64().unwrap_or(0);
            }
        }
    }
    Ok((softnet, iface))
}

/// trafgen in the LAN namespace, sending the same frame as fast as one CPU
/// can until dropped.
struct Trafgen {
    child: Child,
    config: std::path::PathBuf,
}

impl Trafgen {
    /// The same 64-byte UDP frame, over and over.
    fn udp(env: &Env) -> Result<Self> {
        let mut frame = Frame::udp(LAN_PEER, 40000, *env.dst.ip(), env.dst.port());
        frame.src_mac = env.src_mac;
        frame.dst_mac = env.dst_mac;
        frame.payload = vec![0x5a; FRAME_LEN - 42];
        let bytes = frame.build();
        let body: Vec<String> = bytes.iter().map(|b| format!("0x{b:02x}")).collect();
        Self::start(env, &format!("{{ {} }}\n", body.join(", ")))
    }

    /// TCP SYNs, each from a new peer port (and, every time the ports wrap,
    /// LAN address): every one opens a flow.
    fn syns(env: &Env) -> Result<Self> {
        let mac = forwarder::interfaces::mac_text;
        Self::start(
            env,
            &format!(
                "{{ eth(da={}, sa={}), ipv4(sa={LAN_PEER}, sa[3]=dinc(10, 250), da={}, ttl=64), tcp(sp=dinc(1024, 65535), dp={}, syn) }}\n",
                mac(env.dst_mac),
                mac(env.src_mac),
                env.dst.ip(),
                env.dst.port()
            ),
        )
    }

    fn start(env: &Env, packet: &str) -> Result<Self> {
        let config = std::env::temp_dir().join(format!("{}-trafgen.cfg", env.lan().name()));
        std::fs::write(&config, packet)?;
        let child = env
            .lan()
            .command("trafgen")
            .args([
                "--dev",
                "eth0",
                "--cpus",
                "1",
                "--num",
                "0",
                "--no-cpu-stats",
                "--notouch-irq",
                "--no-sock-mem",
                "--conf",
            ])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .die_with_parent()
            .spawn()
            .context("starting trafgen (Debian package netsniff-ng)")?;
        Ok(Trafgen { child, config })
    }
}

impl Drop for Trafgen {
    fn drop(&mut self) {
        // SAFETY: signalling the process group we created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGINT) };
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RateSample {
    /// Packets per second counted at the app.
    pub received_pps: f64,
    /// Packets per second trafgen got onto the LAN wire.
    pub sent_pps: f64,
    /// Share of sent packets that never reached the app.
    pub loss: f64,
    pub softnet_drops: u64,
    pub interface_drops: u64,
}

/// 64-byte UDP from the LAN peer toward the app through the contender, over
/// `secs` of steady state.
pub fn packet_rate(env: &Env, duration: Duration) -> Result<RateSample> {
    let sink = Sink::install(env.app(), &format!("udp dport {}", env.dst.port()))?;
    let trafgen = Trafgen::udp(env)?;
    rate(env, &sink, trafgen, duration)
}

/// TCP SYNs from ever new peer ports toward the app through the contender:
/// new flows per second, each one a flow-table (or conntrack) insert in
/// both routers.
pub fn new_flow_rate(env: &Env, duration: Duration) -> Result<RateSample> {
    let sink = Sink::install(
        env.app(),
        &format!("tcp dport {} tcp flags syn", env.dst.port()),
    )?;
    let trafgen = Trafgen::syns(env)?;
    rate(env, &sink, trafgen, duration)
}

/// What reaches `sink` per second while `trafgen` runs, after it started
/// arriving.
fn rate(env: &Env, sink: &Sink<'_>, trafgen: Trafgen, duration: Duration) -> Result<RateSample> {
    let _trafgen = trafgen;
    if !wait_until(Duration::from_secs(5), || {
        sink.packets().is_ok_and(|n| n > 1000)
    }) {
        bail!("{}: no traffic reached the app", env.setup.label());
    }
    let (rx0, tx0, (soft0, if0), t0) = (
        sink.packets()?,
        tx_packets(env.lan(), "eth0")?,
        drops(env)?,
        Instant::now(),
    );
    std::thread::sleep(duration);
    let (rx1, tx1, (soft1, if1), t1) = (
        sink.packets()?,
        tx_packets(env.lan(), "eth0")?,
        drops(env)?,
        Instant::now(),
    );
    let secs = (t1 - t0).as_secs_f64();
    let received = rx1.saturating_sub(rx0);
    let sent = tx1.saturating_sub(tx0);
    Ok(RateSample {
        received_pps: received as f64 / secs,
        sent_pps: sent as f64 / secs,
        loss: if sent == 0 {
            0.0
        } else {
            1.0 - (received as f64 / sent as f64).min(1.0)
        },
        softnet_drops: soft1.saturating_sub(soft0),
        interface_drops: if1.saturating_sub(if0),
    })
}

/// TCP bulk throughput through the contender (iperf3), in bits per second.
/// `reverse`: the app sends to the LAN peer (over the forwarded connection).
pub fn tcp_throughput(env: &Env, duration: Duration, reverse: bool) -> Result<f64> {
    let port = env.dst.port().to_string();
    let mut server = env
        .app()
        .command("iperf3")
        .args(["-s", "-1", "--forceflush", "-p", &port])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .die_with_parent()
        .spawn()
        .context("starting iperf3")?;
    let mut listening = String::new();
    let mut stdout = server.stdout.take().context("iperf3 stdout")?;
    let mut buf = [0u8; 256];
    while !listening.contains("listening") {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            bail!("iperf3 server exited: {listening}");
        }
        listening.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let secs = duration.as_secs().max(1).to_string();
    let mut client = env.lan().command("iperf3");
    client.args([
        "-c",
        &env.dst.ip().to_string(),
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
    ]);
    if reverse {
        client.arg("-R");
    }
    let out = client.output().context("running iperf3")?;
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 reported no throughput: {}", v["error"]))
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// TCP request/response round trips of 64 bytes through the contender.
pub fn rr_latency(env: &Env, rounds: usize) -> Result<Latency> {
    const MSG: usize = 64;
    let listener = env
        .app()
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, env.dst.port())))?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut buf = [0u8; MSG];
        loop {
            if conn.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            conn.write_all(&buf)?;
        }
    });
    let mut samples = env.lan().run(|| -> Result<Vec<f64>> {
        let mut stream = TcpStream::connect_timeout(&env.dst.into(), Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; MSG];
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..rounds + 100 {
            let start = Instant::now();
            stream.write_all(&buf)?;
            stream.read_exact(&mut buf)?;
            // The first hundred warm caches and resolve neighbours.
            if i >= 100 {
                samples.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })?;
    let _ = server.join();
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        p50_us: at(0.50),
        p99_us: at(0.99),
    })
}

/// What one run of the programs costs, through BPF_PROG_TEST_RUN.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramCost {
    /// Each path's cost, the timer's own share of a single run subtracted.
    pub paths: Vec<(&'static str, f64)>,
    /// The DNAT and reply paths of an established flow stopped after each
    /// stage in turn, in the order a packet meets them, then whole.
    pub stages: Vec<StageCost>,
}

/// The forwarding paths' single-run cost when stopped after one stage,
/// nanoseconds, the timer's share included (as in an empty program's,
/// the first stage, which the targets compare with).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageCost {
    pub stage: &'static str,
    pub help: &'static str,
    pub dnat_ns: f64,
    pub reply_ns: f64,
}

/// Per-packet cost of each program path, through BPF_PROG_TEST_RUN in a
/// router namespace with real routes and neighbours. A rewriting program
/// changes the test packet, so a `repeat` run would time the rewritten
/// packet from the second round on: each path is timed one run at a time
/// (the median of `runs`), and the timer's own share of a single run (the
/// pass-through path timed both ways) is subtracted. Then the DNAT and
/// reply paths once per cut (see forwarder-common's cut), over the same
/// maps, so every variant meets the same established flow.
pub fn program_cost(runs: usize) -> Result<ProgramCost> {
    use forwarder::{datapath::Role, rules::Relay, spec::Proto};
    use forwarder_common::{cut::Cut, maps::group_mac};

    use crate::testrun::*;

    let rules = [localsend_rule(Proto::Tcp)];
    let group = Ipv4Addr::new(224, 0, 0, 167);
    let relays = [Relay {
        group,
        port: 53317,
        targets: vec![TARGET],
        ttl: None,
        rate: 1_000_000,
        rate_down: 1_000_000,
        allow: forwarder::spec::AllowFrom::Auto,
    }];
    let h = Harness::with_relays(&rules, &relays)?;
    let mut dnat = Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 53317);
    dnat.src_mac = LAN_PEER_MAC;
    let dnat = dnat.build();
    // The reply's flow exists from here on.
    h.run(Role::Uplink, h.uplink.index, &dnat)?;
    let reply = Frame::tcp(TARGET, 53317, LAN_PEER, 40000).build();
    let unclaimed = Frame::tcp(TARGET, 53317, LAN_PEER, 40001);
    let mut announce = Frame::udp(TARGET, 41000, group, 53317).with_payload(&[0x7b; 200]);
    announce.dst_mac = group_mac(u32::from_ne_bytes(group.octets()));
    let mut pass = Frame::tcp(LAN_PEER, 40000, UPLINK_ADDR, 22);
    pass.src_mac = LAN_PEER_MAC;
    let pass = pass.build();

    let single = |h: &Harness, role: Role, frame: &[u8]| -> Result<f64> {
        let ifindex = match role {
            Role::Uplink => h.uplink.index,
            Role::Downstream => h.vif1.index,
        };
        let mut samples = (0..runs)
            .map(|_| Ok(h.cost(role, ifindex, frame, 1)?.as_nanos() as f64))
            .collect::<Result<Vec<f64>>>()?;
        samples.sort_by(f64::total_cmp);
        Ok(samples[samples.len() / 2])
    };
    let pass_repeated = h
        .cost(Role::Uplink, h.uplink.index, &pass, (runs * 20) as u32)?
        .as_nanos() as f64;
    let overhead = (single(&h, Role::Uplink, &pass)? - pass_repeated).max(0.0);
    let cases = [
        ("DNAT (LAN to target)", Role::Uplink, dnat.clone()),
        (
            "reverse (target reply to LAN)",
            Role::Downstream,
            reply.clone(),
        ),
        (
            "target packet of no flow (left to the stack)",
            Role::Downstream,
            unclaimed.build(),
        ),
        (
            "relay (VM announcement copied to the LAN)",
            Role::Downstream,
            announce.build(),
        ),
        ("pass-through (no rule)", Role::Uplink, pass),
    ];
    let mut paths: Vec<(&'static str, f64)> = cases
        .into_iter()
        .map(|(name, role, frame)| Ok((name, (single(&h, role, &frame)? - overhead).max(0.0))))
        .collect::<Result<_>>()?;
    // Every run from a new peer port: the flow table inserts each time.
    let mut new_flow = (0..runs)
        .map(|i| {
            let mut f = Frame::tcp(LAN_PEER, 1024 + (i % 64000) as u16, UPLINK_ADDR, 53317);
            f.src_mac = LAN_PEER_MAC;
            Ok(h.cost(Role::Uplink, h.uplink.index, &f.build(), 1)?
                .as_nanos() as f64)
        })
        .collect::<Result<Vec<f64>>>()?;
    new_flow.sort_by(f64::total_cmp);
    paths.insert(
        1,
        (
            "DNAT opening a new flow",
            (new_flow[new_flow.len() / 2] - overhead).max(0.0),
        ),
    );

    // Every variant is loaded at once and timed in turn, round after
    // round: the host's speed drifts, and each stage is a difference.
    let cuts: Vec<Option<Cut>> = Cut::ALL.iter().map(|c| Some(*c)).chain([None]).collect();
    let variants = cuts
        .iter()
        .map(|cut| h.variant(*cut))
        .collect::<Result<Vec<_>>>()?;
    const ROUNDS: usize = 10;
    let per_round = (runs / ROUNDS).max(1);
    let mut dnat_rounds = vec![Vec::new(); cuts.len()];
    let mut reply_rounds = vec![Vec::new(); cuts.len()];
    let median = |mut samples: Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2]
    };
    for _ in 0..ROUNDS {
        for (i, variant) in variants.iter().enumerate() {
            for (rounds, role, ifindex, frame) in [
                (&mut dnat_rounds, Role::Uplink, h.uplink.index, &dnat),
                (&mut reply_rounds, Role::Downstream, h.vif1.index, &reply),
            ] {
                let samples = (0..per_round)
                    .map(|_| Ok(h.cost_on(variant, role, ifindex, frame, 1)?.as_nanos() as f64))
                    .collect::<Result<Vec<f64>>>()?;
                rounds[i].push(median(samples));
            }
        }
    }
    let stages = cuts
        .iter()
        .zip(dnat_rounds.into_iter().zip(reply_rounds))
        .map(|(cut, (dnat, reply))| StageCost {
            stage: cut.map_or("whole", Cut::name),
            help: cut.map_or("the redirect, the rule's counters", Cut::help),
            dnat_ns: median(dnat),
            reply_ns: median(reply),
        })
        .collect();
    Ok(ProgramCost { paths, stages })
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Reaction {
    /// rtnetlink event to the uplink state map holding the new address
    /// (forwarder only), per trial, microseconds.
    pub event_to_map_us: Vec<f64>,
    /// From running `ip addr` to the first relayed announcement with the new
    /// source on the LAN, per trial, milliseconds.
    pub command_to_packet_ms: Vec<f64>,
    /// From the rtnetlink event to that packet, milliseconds.
    pub event_to_packet_ms: Vec<f64>,
}

/// sys-net is renumbered back and forth while the app announces every
/// 200 us; each trial measures how long the relay kept using the old source.
pub fn reaction(env: &Env, trials: usize) -> Result<Reaction> {
    use crate::{
        netlink_watch::AddressWatch,
        sockets::{Announcer, MulticastListener},
        topology::{LAN_GATEWAY, LOCALSEND_GROUP, LOCALSEND_PORT, SYSNET_LAN, SYSNET_UPLINK},
    };

    let t = env
        .topology()
        .context("reaction needs the Qubes topology")?;
    let listener = MulticastListener::start(&t.lan, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let _announcer = Announcer::start(
        &t.app,
        "r",
        LOCALSEND_GROUP,
        LOCALSEND_PORT,
        1,
        Duration::from_micros(200),
    )?;
    listener
        .wait_from(SYSNET_LAN, "r", Duration::from_secs(5))
        .context("no relayed announcement before renumbering")?;
    let watch = AddressWatch::start(&t.sysnet)?;
    let tables = env.forwarders.first().map(|f| f.tables()).transpose()?;
    let other = Ipv4Addr::new(192, 168, 1, 3);
    let mut result = Reaction::default();
    for trial in 0..trials {
        let (old, new) = if trial % 2 == 0 {
            (SYSNET_LAN, other)
        } else {
            (other, SYSNET_LAN)
        };
        let batch = std::env::temp_dir().join(format!("{}-renumber", t.sysnet.name()));
        std::fs::write(
            &batch,
            format!(
                "addr del {old}/24 dev {SYSNET_UPLINK}\naddr add {new}/24 dev {SYSNET_UPLINK}\nroute replace default via {LAN_GATEWAY}\n"
            ),
        )?;
        let wire = u32::from_ne_bytes(new.octets());
        // A busy poller on the map, started before the change, so the time
        // it reports is the map's, not a polling interval's.
        let map_seen = std::thread::scope(|scope| -> Result<(Instant, Option<Instant>)> {
            let poller = tables.as_ref().map(|tables| {
                scope.spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < deadline {
                        if tables.uplink().is_ok_and(|u| u.addr == wire && u.usable()) {
                            return Some(Instant::now());
                        }
                    }
                    None
                })
            });
            let start = Instant::now();
            t.sysnet.sh(&format!("ip -batch {}", batch.display()))?;
            let seen = match poller {
                Some(p) => Some(
                    p.join()
                        .expect("poller")
                        .context("the state map never took the new address")?,
                ),
                None => None,
            };
            Ok((start, seen))
        })?;
        let _ = std::fs::remove_file(&batch);
        let (start, map_seen) = map_seen;
        let mut first = None;
        wait_until(Duration::from_secs(10), || {
            first = listener
                .received()
                .into_iter()
                .find(|r| r.from.ip() == new && r.at > start);
            first.is_some()
        });
        let first = first.with_context(|| format!("no announcement from {new} within 10 s"))?;
        let event = watch
            .added_after(new, Some(start))
            .with_context(|| format!("no rtnetlink event adding {new}"))?;
        if let Some(seen) = map_seen {
            result
                .event_to_map_us
                .push(seen.saturating_duration_since(event).as_secs_f64() * 1e6);
        }
        result
            .command_to_packet_ms
            .push(first.at.saturating_duration_since(start).as_secs_f64() * 1e3);
        result
            .event_to_packet_ms
            .push(first.at.saturating_duration_since(event).as_secs_f64() * 1e3);
    }
    Ok(result)
}
