//! `forwarder inspect`: what a running instance does, read from its pinned
//! maps and links only, so it works (and disturbs nothing) even when the
//! daemon is stuck.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;
use forwarder_common::{
    maps::{UPLINK_UP, names},
    reason::Disposition,
};
use serde::Serialize;

use crate::{
    adopt,
    cli::InspectArgs,
    datapath,
    flow_table::FlowTable,
    interfaces::{self, address_text, mac_text},
    pin::{LEGACY_DIRS, PinLayout},
    prog_stats::{self, ProgramStats},
    rule_view::{RuleView, allow_text, expires_text},
    tables::Tables,
};

/// Schema version of the JSON output; bumped on incompatible changes.
pub const JSON_VERSION: u32 = 2;

#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub version: u32,
    pub pin_dir: PathBuf,
    /// The map layout identity the pins were written with.
    pub layout: String,
    pub uplink: UplinkView,
    pub interfaces: Vec<InterfaceView>,
    pub flows: FlowTableView,
    pub rules: Vec<RuleStats>,
    pub relays: Vec<RelayStats>,
    pub reasons: Vec<ReasonView>,
    /// The programs' run-time statistics (`--stats` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program_stats: Option<ProgramStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct UplinkView {
    pub ifindex: u32,
    pub name: Option<String>,
    pub address: Option<String>,
    pub mac: String,
    pub link_up: bool,
    pub usable: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct InterfaceView {
    pub ifindex: u32,
    pub name: Option<String>,
    pub role: String,
    /// "tcx" or "clsact".
    pub hook: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowTableView {
    /// Entries, timed-out ones included until the daemon sweeps them.
    pub entries: u64,
    pub capacity: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct RuleStats {
    #[serde(flatten)]
    pub rule: RuleView,
    /// Per second since the previous sample (`--watch` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RelayStats {
    pub group: Ipv4Addr,
    pub port: u16,
    pub targets: Vec<Ipv4Addr>,
    pub ttl: Option<u8>,
    pub rate_limit: u64,
    pub rate_limit_down: u64,
    pub allow_from: String,
    pub packets_up: u64,
    pub bytes_up: u64,
    pub packets_down: u64,
    pub bytes_down: u64,
    pub rate_limited: u64,
    pub rate_limited_down: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
}

/// Packets and bytes per second, in (or up) and out (or down).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rates {
    pub packets_in: f64,
    pub bytes_in: f64,
    pub packets_out: f64,
    pub bytes_out: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReasonView {
    pub name: &'static str,
    pub disposition: &'static str,
    pub count: u64,
    pub help: &'static str,
}

/// The maps `inspect` reads; their layouts must be this build's.
const READ_MAPS: &[&str] = &[
    names::UPLINK,
    names::FORWARD_RULES,
    names::RULE_COUNTERS,
    names::REASON_COUNTERS,
    names::RELAYS,
    names::RELAY_COUNTERS,
    names::FLOWS,
];

/// Reads everything the instance at `pin_dir` pinned.
pub fn collect(pin_dir: &Path) -> Result<Snapshot> {
    let layout = PinLayout::new(pin_dir);
    if !layout.maps.is_dir() {
        let legacy: Vec<&str> = LEGACY_DIRS
            .iter()
            .copied()
            .filter(|d| pin_dir.join(d).is_dir())
            .collect();
        let hint = if legacy.is_empty() {
            String::new()
        } else {
            format!(
                " (found {} of an older release: start this release's daemon to take it over)",
                legacy.join(", ")
            )
        };
        bail!(
            "no forwarder instance at {}: {} does not exist{hint}. Is `forwarder run --pin-dir {}` running? \
             If it mounted its own bpffs, inspect from the same mount namespace.",
            pin_dir.display(),
            layout.maps.display(),
            pin_dir.display()
        );
    }
    adopt::check_readable(&layout, READ_MAPS)?;
    let tables = Tables::open_pinned(&layout.maps)?;
    let state = tables.uplink()?;
    let uplink = UplinkView {
        ifindex: state.ifindex,
        name: (state.ifindex != 0)
            .then(|| interfaces::name_of(state.ifindex))
            .flatten(),
        address: address_text(&state),
        mac: mac_text(state.mac),
        link_up: state.flags & UPLINK_UP != 0,
        usable: state.usable(),
    };

    let mut interfaces: Vec<InterfaceView> = datapath::recorded_attachments(&layout)
        .unwrap_or_default()
        .into_iter()
        .map(|(ifindex, (role, hook))| InterfaceView {
            ifindex,
            name: interfaces::name_of(ifindex),
            role: role.name().into(),
            hook: hook.name().into(),
        })
        .collect();
    interfaces.sort_by_key(|i| (i.role != "uplink", i.ifindex));

    let rules = tables
        .rule_views()?
        .into_iter()
        .map(|rule| RuleStats { rule, rates: None })
        .collect();
    let flows_map = MapData::from_pin(layout.maps.join(names::FLOWS))
        .with_context(|| format!("opening the flow table in {}", layout.maps.display()))?;
    let flows = FlowTableView {
        entries: FlowTable::of(&flows_map).count()?,
        capacity: tables.flow_capacity()?,
    };

    let mut relays = Vec::new();
    for ((group, port), value) in tables.installed_relays()? {
        let c = tables.relay_counters(value.slot)?;
        relays.push(RelayStats {
            group: Ipv4Addr::from(group.to_ne_bytes()),
            port: u16::from_be(port),
            targets: value
                .targets
                .iter()
                .take(usize::from(value.n_targets))
                .map(|t| Ipv4Addr::from(t.to_ne_bytes()))
                .collect(),
            ttl: (value.ttl != 0).then_some(value.ttl),
            rate_limit: value.up.rate(),
            rate_limit_down: value.down.rate(),
            allow_from: allow_text(&value.allow),
            packets_up: c.packets_up,
            bytes_up: c.bytes_up,
            packets_down: c.packets_down,
            bytes_down: c.bytes_down,
            rate_limited: c.rate_limited,
            rate_limited_down: c.rate_limited_down,
            rates: None,
        });
    }

    let reasons = tables
        .reason_counters()?
        .into_iter()
        .map(|(reason, count)| ReasonView {
            name: reason.name(),
            disposition: match reason.disposition() {
                Disposition::Passed => "passed",
                Disposition::Dropped => "dropped",
            },
            count,
            help: reason.help(),
        })
        .collect();

    Ok(Snapshot {
        version: JSON_VERSION,
        pin_dir: pin_dir.to_path_buf(),
        layout: format!("{:016x}", adopt::LAYOUT_ID),
        uplink,
        interfaces,
        flows,
        rules,
        relays,
        reasons,
        program_stats: None,
    })
}

/// `collect`, with the programs' run-time statistics when `stats`.
fn sample(pin_dir: &Path, stats: bool) -> Result<Snapshot> {
    let mut snapshot = collect(pin_dir)?;
    if stats {
        snapshot.program_stats = Some(prog_stats::read(&PinLayout::new(pin_dir).maps)?);
    }
    Ok(snapshot)
}

fn per_second(now: u64, before: u64, elapsed: Duration) -> f64 {
    now.saturating_sub(before) as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Fills in rates from the previous sample.
pub fn add_rates(current: &mut Snapshot, previous: &Snapshot, elapsed: Duration) {
    let before: BTreeMap<String, &RuleView> = previous
        .rules
        .iter()
        .map(|r| (r.rule.name(), &r.rule))
        .collect();
    for stats in &mut current.rules {
        let rule = &stats.rule;
        if let Some(b) = before.get(&rule.name()) {
            stats.rates = Some(Rates {
                packets_in: per_second(rule.packets_in, b.packets_in, elapsed),
                bytes_in: per_second(rule.bytes_in, b.bytes_in, elapsed),
                packets_out: per_second(rule.packets_out, b.packets_out, elapsed),
                bytes_out: per_second(rule.bytes_out, b.bytes_out, elapsed),
            });
        }
    }
    let before: BTreeMap<(Ipv4Addr, u16), &RelayStats> = previous
        .relays
        .iter()
        .map(|r| ((r.group, r.port), r))
        .collect();
    for relay in &mut current.relays {
        if let Some(b) = before.get(&(relay.group, relay.port)) {
            relay.rates = Some(Rates {
                packets_in: per_second(relay.packets_up, b.packets_up, elapsed),
                bytes_in: per_second(relay.bytes_up, b.bytes_up, elapsed),
                packets_out: per_second(relay.packets_down, b.packets_down, elapsed),
                bytes_out: per_second(relay.bytes_down, b.bytes_down, elapsed),
            });
        }
    }
    if let (Some(now), Some(before)) = (&mut current.program_stats, &previous.program_stats) {
        prog_stats::add_rates(now, before, elapsed);
    }
}

/// Bytes for people: 1536 -> "1.5 KiB".
pub fn human_bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut n = n;
    let mut unit = 0;
    while n >= 1024.0 && unit + 1 < units.len() {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0} B")
    } else {
        format!("{n:.1} {}", units[unit])
    }
}

/// "packets/s bytes/s" in then out; empty without rates (no --watch).
fn rate_column(rates: Option<Rates>) -> String {
    let cell = |packets: f64, bytes: f64| format!("{packets:.1}/s {}/s", human_bytes(bytes));
    rates.map_or_else(String::new, |r| {
        format!(
            "{} / {}",
            cell(r.packets_in, r.bytes_in),
            cell(r.packets_out, r.bytes_out)
        )
    })
}

/// The table people read.
pub fn render(s: &Snapshot) -> String {
    let mut out = format!("forwarder at {}\n", s.pin_dir.display());
    let u = &s.uplink;
    out += &format!(
        "uplink      {} (ifindex {})  {}  MAC {}  link {}{}\n",
        u.name.as_deref().unwrap_or("?"),
        u.ifindex,
        u.address.as_deref().unwrap_or("no IPv4 address"),
        u.mac,
        if u.link_up { "up" } else { "down" },
        if u.usable {
            ""
        } else {
            "  (nothing is forwarded or relayed)"
        },
    );
    let ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| {
            format!(
                "{} {} ({}, {})",
                i.role,
                i.name.as_deref().unwrap_or("?"),
                i.ifindex,
                i.hook
            )
        })
        .collect();
    out += &format!(
        "attached    {}\n",
        if ifaces.is_empty() {
            "nothing".into()
        } else {
            ifaces.join(", ")
        }
    );

    out += &format!(
        "flows       {} of {} entries (see `forwarder flows`)\n",
        s.flows.entries, s.flows.capacity
    );

    out += "\nforward rules\n";
    if s.rules.is_empty() {
        out += "  none\n";
    } else {
        out += &format!(
            "  {:<12} {:<22} {:<20} {:<10} {:>6} {:>10} {:>11} {:>10} {:>11}  {}\n",
            "RULE",
            "TARGET",
            "ALLOW FROM",
            "EXPIRES IN",
            "FLOWS",
            "IN PKTS",
            "IN BYTES",
            "OUT PKTS",
            "OUT BYTES",
            "RATE IN / OUT"
        );
        for stats in &s.rules {
            let r = &stats.rule;
            out += &format!(
                "  {:<12} {:<22} {:<20} {:<10} {:>6} {:>10} {:>11} {:>10} {:>11}  {}\n",
                r.name(),
                r.target_text(),
                r.allow_from,
                expires_text(r.expires_in_secs),
                r.flows,
                r.packets_in,
                human_bytes(r.bytes_in as f64),
                r.packets_out,
                human_bytes(r.bytes_out as f64),
                rate_column(stats.rates)
            );
        }
    }

    out += "\nrelays\n";
    if s.relays.is_empty() {
        out += "  none\n";
    } else {
        out += &format!(
            "  {:<22} {:<18} {:>5} {:>13} {:<16} {:>9} {:>11} {:>9} {:>11} {:>9}  {}\n",
            "GROUP",
            "TARGETS",
            "TTL",
            "LIMIT UP/DOWN",
            "DOWN FROM",
            "UP PKTS",
            "UP BYTES",
            "DOWN PKTS",
            "DOWN BYTES",
            "LIMITED",
            "RATE UP / DOWN"
        );
        for r in &s.relays {
            let targets: Vec<String> = r.targets.iter().map(ToString::to_string).collect();
            let rate = rate_column(r.rates);
            out += &format!(
                "  {:<22} {:<18} {:>5} {:>13} {:<16} {:>9} {:>11} {:>9} {:>11} {:>9}  {}\n",
                format!("{}:{}", r.group, r.port),
                targets.join(","),
                r.ttl.map_or("kept".into(), |t| t.to_string()),
                format!("{}/{}/s", r.rate_limit, r.rate_limit_down),
                r.allow_from,
                r.packets_up,
                human_bytes(r.bytes_up as f64),
                r.packets_down,
                human_bytes(r.bytes_down as f64),
                format!("{}/{}", r.rate_limited, r.rate_limited_down),
                rate
            );
        }
    }

    if let Some(stats) = &s.program_stats {
        out += &render_program_stats(stats, &s.interfaces);
    }

    out += "\nskip and drop reasons (packets not forwarded, and why)\n";
    let counted: Vec<&ReasonView> = s.reasons.iter().filter(|r| r.count > 0).collect();
    if counted.is_empty() {
        out += "  none counted yet\n";
    }
    for r in counted {
        out += &format!(
            "  {:<24} {:>12}  {:<7}  {}\n",
            r.name, r.count, r.disposition, r.help
        );
    }
    out
}

/// The programs' cost, with the interfaces each runs on, and how to turn
/// the statistics on while they are off.
fn render_program_stats(stats: &ProgramStats, interfaces: &[InterfaceView]) -> String {
    let setting = match stats.sysctl_enabled {
        Some(true) => format!("{} = 1", prog_stats::SYSCTL),
        Some(false) => format!("{} = 0", prog_stats::SYSCTL),
        None => format!("no {} on this kernel", prog_stats::SYSCTL),
    };
    let mut out = format!("\nprogram cost (the kernel's run-time statistics, {setting})\n");
    if !stats.counting() {
        out += "  The kernel is not counting";
        if stats.programs.iter().any(|p| p.packets > 0) {
            out += " (unless a program holds BPF_ENABLE_STATS: --watch tells)";
        }
        out += ": the figures below are from while it was.\n";
        for line in prog_stats::HOW_TO_ENABLE {
            out += &format!("  {line}\n");
        }
    }
    if stats.programs.is_empty() {
        out += "  no loaded program uses this instance's maps\n";
        return out;
    }
    let watching = stats.programs.iter().any(|p| p.rates.is_some());
    out += &format!(
        "  {:<12} {:>7}  {:<24} {:>14} {:>10}",
        "PROGRAM", "ID", "INTERFACES", "PACKETS", "NS/PACKET"
    );
    if watching {
        out += &format!(" {:>12} {:>14}", "PACKETS/S", "NS/PACKET NOW");
    }
    out += "\n";
    let ns = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
    for p in &stats.programs {
        let on: Vec<&str> = interfaces
            .iter()
            .filter(|i| i.role == p.role)
            .map(|i| i.name.as_deref().unwrap_or("?"))
            .collect();
        out += &format!(
            "  {:<12} {:>7}  {:<24} {:>14} {:>10}",
            p.role,
            p.id,
            if on.is_empty() {
                "-".into()
            } else {
                on.join(",")
            },
            p.packets,
            ns(p.ns_per_packet)
        );
        if let Some(r) = p.rates {
            out += &format!(" {:>12.1} {:>14}", r.packets_per_sec, ns(r.ns_per_packet));
        }
        out += "\n";
    }
    out
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let mut previous = sample(&args.pin_dir, args.stats)?;
    let mut taken = Instant::now();
    if !args.watch {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&previous)?);
        } else {
            print!("{}", render(&previous));
        }
        return Ok(());
    }
    loop {
        std::thread::sleep(args.interval);
        let mut current = sample(&args.pin_dir, args.stats)?;
        let now = Instant::now();
        add_rates(&mut current, &previous, now - taken);
        if args.json {
            println!("{}", serde_json::to_string(&current)?);
        } else {
            // Clear the screen and home the cursor, as watch(1) does.
            print!("\x1b[2J\x1b[H{}", render(&current));
        }
        previous = current;
        taken = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }

    #[test]
    fn rates_are_deltas_per_second() {
        let rule = |packets: u64, bytes: u64| RuleStats {
            rule: RuleView {
                proto: "tcp".into(),
                port: 1,
                port_end: 1,
                target: Ipv4Addr::LOCALHOST,
                target_port: 1,
                allow_from: "any".into(),
                expires_in_secs: None,
                packets_in: packets,
                bytes_in: bytes,
                packets_out: 0,
                bytes_out: 0,
                flows: 3,
                comment: None,
                origin: None,
            },
            rates: None,
        };
        let snapshot = |r| Snapshot {
            version: JSON_VERSION,
            pin_dir: PathBuf::new(),
            layout: String::new(),
            uplink: UplinkView {
                ifindex: 0,
                name: None,
                address: None,
                mac: String::new(),
                link_up: false,
                usable: false,
            },
            interfaces: vec![],
            flows: FlowTableView {
                entries: 3,
                capacity: 65_536,
            },
            rules: vec![r],
            relays: vec![],
            reasons: vec![],
            program_stats: None,
        };
        let before = snapshot(rule(10, 1000));
        let mut after = snapshot(rule(30, 5000));
        add_rates(&mut after, &before, Duration::from_secs(2));
        let rates = after.rules[0].rates.unwrap();
        assert_eq!((rates.packets_in, rates.bytes_in), (10.0, 2000.0));
        assert!(render(&after).contains("10.0/s 2.0 KiB/s"));
    }

    #[test]
    fn a_missing_instance_is_a_clear_error() {
        let err = collect(Path::new("/nonexistent/forwarder"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no forwarder instance at /nonexistent/forwarder"),
            "{err}"
        );
        assert!(err.contains("--pin-dir /nonexistent/forwarder"), "{err}");
    }
}
