//! `forwarder flows`: the flows the datapath tracks, like `conntrack -L`,
//! read from the pinned maps, so it works (and disturbs nothing) even when
//! the daemon is stuck.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Result;
use forwarder_common::{
    flow,
    maps::{FlowEntry, FlowKey, names},
};
use serde::Serialize;

use crate::{adopt, cli::FlowsArgs, clock, pin::PinLayout, spec::Proto, tables::Tables};

#[derive(Clone, Debug, Serialize)]
pub struct FlowView {
    pub proto: String,
    pub peer: Ipv4Addr,
    pub peer_port: u16,
    pub listen_port: u16,
    /// The rule's target; absent when the rule is gone (the flow is then
    /// dead and about to be swept).
    pub target: Option<Ipv4Addr>,
    pub target_port: Option<u16>,
    pub state: &'static str,
    pub age_secs: u64,
    pub idle_secs: u64,
    /// Seconds of idleness left before the flow times out.
    pub timeout_secs: u64,
}

/// The live flows of the instance at `pin_dir`, oldest first.
pub fn collect(pin_dir: &Path) -> Result<Vec<FlowView>> {
    let layout = PinLayout::new(pin_dir);
    adopt::check_readable(&layout, &[names::FLOWS, names::FORWARD_RULES])?;
    let tables = Tables::open_pinned(&layout.maps)?;
    // By protocol and listen port: a range has one target port per port.
    let rules: BTreeMap<(u8, u16), (u32, Ipv4Addr, u16)> = tables
        .installed()?
        .into_iter()
        .map(|(at, (_, r))| {
            let target = Ipv4Addr::from(r.target_addr.to_ne_bytes());
            (at, (r.id, target, u16::from_be(r.target_port)))
        })
        .collect();
    let now = clock::boot_ns();
    let mut flows: Vec<FlowView> = tables
        .flows()?
        .into_iter()
        .filter(|(key, entry)| !flow::expired(entry, key.proto, now))
        .map(|(key, entry)| {
            let target = rules
                .get(&(key.proto, u16::from_be(key.listen_port)))
                .filter(|(id, _, _)| *id == entry.rule_id)
                .map(|(_, addr, port)| (*addr, *port));
            view(&key, &entry, target.as_ref(), now)
        })
        .collect();
    flows.sort_by_key(|f| std::cmp::Reverse(f.age_secs));
    Ok(flows)
}

fn view(key: &FlowKey, entry: &FlowEntry, target: Option<&(Ipv4Addr, u16)>, now: u64) -> FlowView {
    let idle = clock::since(entry.seen_ns, now);
    let timeout = flow::idle_timeout_ns(key.proto, entry.state);
    FlowView {
        proto: Proto::from_number(key.proto)
            .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
        peer: Ipv4Addr::from(key.peer_addr.to_ne_bytes()),
        peer_port: u16::from_be(key.peer_port),
        listen_port: u16::from_be(key.listen_port),
        target: target.map(|t| t.0),
        target_port: target.map(|t| t.1),
        state: flow::state_name(key.proto, entry.state),
        age_secs: clock::since(entry.created_ns, now).as_secs(),
        idle_secs: idle.as_secs(),
        timeout_secs: (timeout.saturating_sub(idle.as_nanos() as u64)) / 1_000_000_000,
    }
}

pub fn render(flows: &[FlowView]) -> String {
    if flows.is_empty() {
        return "no flows\n".into();
    }
    let mut out = format!(
        "{:<5} {:<22} {:>6} {:<22} {:<12} {:>8} {:>8} {:>9}\n",
        "PROTO", "PEER", "LISTEN", "TARGET", "STATE", "AGE", "IDLE", "EXPIRES"
    );
    for f in flows {
        let target = match (f.target, f.target_port) {
            (Some(addr), Some(port)) => format!("{addr}:{port}"),
            _ => "(rule gone)".into(),
        };
        out += &format!(
            "{:<5} {:<22} {:>6} {:<22} {:<12} {:>7}s {:>7}s {:>8}s\n",
            f.proto,
            format!("{}:{}", f.peer, f.peer_port),
            f.listen_port,
            target,
            f.state,
            f.age_secs,
            f.idle_secs,
            f.timeout_secs
        );
    }
    out += &format!("{} flows\n", flows.len());
    out
}

pub fn run(args: &FlowsArgs) -> Result<()> {
    let flows = collect(&args.pin_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&flows)?);
    } else {
        print!("{}", render(&flows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use forwarder_common::{
        flow::{FLOW_ESTABLISHED, FLOW_REPLIED, TCP_ESTABLISHED_NS},
        maps::PROTO_TCP,
    };

    use super::*;

    #[test]
    fn views_show_ages_and_time_left() {
        let key = FlowKey {
            peer_addr: u32::from_ne_bytes([192, 168, 1, 10]),
            peer_port: 40000u16.to_be(),
            listen_port: 53317u16.to_be(),
            proto: PROTO_TCP,
            ..Default::default()
        };
        let second = 1_000_000_000;
        let entry = FlowEntry {
            state: FLOW_REPLIED | FLOW_ESTABLISHED,
            created_ns: 10 * second,
            seen_ns: 70 * second,
            ..Default::default()
        };
        let v = view(
            &key,
            &entry,
            Some(&(Ipv4Addr::new(10, 137, 0, 5), 53317)),
            100 * second,
        );
        assert_eq!((v.age_secs, v.idle_secs, v.state), (90, 30, "established"));
        assert_eq!(v.timeout_secs, TCP_ESTABLISHED_NS / second - 30);
        let text = render(&[v]);
        assert!(
            text.contains("192.168.1.10:40000") && text.contains("10.137.0.5:53317"),
            "{text}"
        );
        let orphan = view(&key, &entry, None, 100 * second);
        assert!(render(&[orphan]).contains("(rule gone)"));
    }
}
