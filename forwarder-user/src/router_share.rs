//! dom0's share for this router (`/vm-config/forwarder.N`, see `vm_config`)
//! as the daemon's rules and relays.
//!
//! A share is checked as a whole against what the router holds from
//! elsewhere (the config file's relays here, every other rule in the rule
//! book): a conflict refuses the share, naming both sides, and the last
//! good one stays. A share that passes is then resolved entry by entry
//! against the routes: an entry runs only while its target routes out of
//! a downstream interface. A target that routes out of the uplink, to the
//! router itself or nowhere is never forwarded to; it waits, logged, until
//! its VM's interface comes (an exposed VM that is not running, or one
//! just moved behind this router), and is re-checked at every route change.
//! Entries whose `until` has passed are dropped: the datapath enforces a
//! rule's deadline itself, the daemon a relay's.

use std::{net::Ipv4Addr, time::SystemTime};

use forwarder_common::maps::MAX_RELAYS;
use regex::Regex;

use crate::{
    config::RelayDefaults,
    multicast,
    route_lookup::Egress,
    rules::{Origin, Relay, Rule},
    vm_config::router::{Forward, Relay as ShareRelay, RouterShare},
};

/// What of a share runs now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub rules: Vec<Rule>,
    pub relays: Vec<Relay>,
    /// Entries (or relay targets) that wait for their target's route, each
    /// with why.
    pub held: Vec<String>,
    /// The earliest `until` of an entry still in the share.
    pub next_deadline: Option<SystemTime>,
}

/// The rule a forward entry becomes.
fn rule(forward: &Forward) -> Option<Rule> {
    let target = forward.spec.target?;
    let mut rule = Rule::from_spec(
        &forward.spec,
        target,
        forward.attrs.allow.clone(),
        Origin::Qubesdb,
    );
    rule.comment = forward.attrs.note.as_ref().map(ToString::to_string);
    rule.expires = forward.attrs.until;
    Some(rule)
}

/// The relay a relay entry becomes, toward `targets`.
fn relay(entry: &ShareRelay, targets: Vec<Ipv4Addr>, defaults: &RelayDefaults) -> Relay {
    Relay {
        group: entry.spec.group,
        port: entry.spec.port,
        targets,
        ttl: defaults.ttl,
        rate: defaults.rate,
        rate_down: defaults.rate_down,
        allow: entry.attrs.allow.clone(),
    }
}

/// Every rule of the share whose time is not up, routed or not: what the
/// rule book checks against its other rules.
pub fn all_rules(share: &RouterShare, now: SystemTime) -> Vec<Rule> {
    share
        .forwards
        .iter()
        .filter(|f| !f.attrs.expired(now))
        .filter_map(rule)
        .collect()
}

/// Refuses a share whose relays clash with `others` (the config file's
/// and flags') or would need more groups than this host lets one socket
/// join (`max_groups`, from `net.ipv4.igmp_max_memberships`).
pub fn check_relays(
    share: &RouterShare,
    others: &[Relay],
    max_groups: Option<u32>,
    now: SystemTime,
) -> Result<(), String> {
    let live: Vec<&ShareRelay> = share
        .relays
        .iter()
        .filter(|r| !r.attrs.expired(now))
        .collect();
    for entry in &live {
        if let Some(other) = others
            .iter()
            .find(|o| o.group == entry.spec.group && o.port == entry.spec.port)
        {
            return Err(format!(
                "relay={} (from dom0's share in QubesDB) and the config file's relay {} both \
                 relay {}:{}; remove one of them",
                entry.spec, other, entry.spec.group, entry.spec.port
            ));
        }
    }
    let groups = multicast::groups(
        others
            .iter()
            .map(|r| r.group)
            .chain(live.iter().map(|r| r.spec.group)),
    );
    if let Some(max) = max_groups {
        multicast::check_groups(&groups, max)?;
    }
    let total = others.len() + live.len();
    if total > MAX_RELAYS as usize {
        return Err(format!(
            "{total} relays with the config file's; at most {MAX_RELAYS} are supported"
        ));
    }
    Ok(())
}

/// Where a target stands: `None` when it routes out of a downstream
/// interface, else why it waits.
fn unreachable_why(
    target: Ipv4Addr,
    route: &mut impl FnMut(Ipv4Addr) -> Egress,
    downstream: &[Regex],
    uplink: &str,
) -> Option<String> {
    match route(target) {
        Egress::Interface(name)
            if name != uplink && downstream.iter().any(|d| d.is_match(&name)) =>
        {
            None
        }
        Egress::Interface(name) if name == uplink => Some(format!(
            "target {target} routes out of the uplink {name}, not a downstream interface"
        )),
        Egress::Interface(name) => Some(format!(
            "target {target} routes out of {name}, which is not a downstream interface"
        )),
        Egress::Local => Some(format!("target {target} is this router's own address")),
        Egress::Unroutable => Some(format!("target {target} has no route")),
    }
}

/// What of `share` runs at `now`, given where each target routes.
pub fn resolve(
    share: &RouterShare,
    defaults: &RelayDefaults,
    now: SystemTime,
    mut route: impl FnMut(Ipv4Addr) -> Egress,
    downstream: &[Regex],
    uplink: &str,
) -> Resolved {
    let mut resolved = Resolved::default();
    for forward in share.forwards.iter().filter(|f| !f.attrs.expired(now)) {
        let Some(rule) = rule(forward) else { continue };
        match unreachable_why(rule.target, &mut route, downstream, uplink) {
            None => resolved.rules.push(rule),
            Some(why) => resolved
                .held
                .push(format!("forward={}: {why}", forward.spec)),
        }
    }
    for entry in share.relays.iter().filter(|r| !r.attrs.expired(now)) {
        let mut targets = Vec::new();
        for target in &entry.spec.targets {
            match unreachable_why(*target, &mut route, downstream, uplink) {
                None => targets.push(*target),
                Some(why) => resolved.held.push(format!("relay={}: {why}", entry.spec)),
            }
        }
        if !targets.is_empty() {
            resolved.relays.push(relay(entry, targets, defaults));
        }
    }
    let forwards = share.forwards.iter().map(|f| f.attrs.until);
    let relays = share.relays.iter().map(|r| r.attrs.until);
    resolved.next_deadline = forwards.chain(relays).flatten().filter(|t| *t > now).min();
    resolved
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const APP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 17);
    const OFF: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 40);
    const LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const SELF: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 5);

    fn defaults() -> RelayDefaults {
        RelayDefaults {
            ttl: Some(2),
            rate: 25,
            rate_down: 100,
            allow: crate::spec::AllowFrom::Any,
        }
    }

    fn downstream() -> Vec<Regex> {
        vec![Regex::new(crate::cli::DEFAULT_DOWNSTREAM).unwrap()]
    }

    /// sys-firewall's routes: the app behind vif3.0, the LAN out of eth0,
    /// a halted VM nowhere but the default route.
    fn routes(target: Ipv4Addr) -> Egress {
        match target {
            APP => Egress::Interface("vif3.0".into()),
            SELF => Egress::Local,
            _ => Egress::Interface("eth0".into()),
        }
    }

    fn share(text: &[&str]) -> RouterShare {
        let entries: Vec<String> = text.iter().map(|s| s.to_string()).collect();
        let values = crate::vm_config::parts::ROUTER.split(&entries).unwrap();
        let pairs: Vec<(String, String)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (crate::vm_config::parts::ROUTER.name(i + 1), v.clone()))
            .collect();
        RouterShare::from_qubesdb(&pairs).unwrap()
    }

    #[test]
    fn routed_entries_run_and_the_others_wait_saying_why() {
        let s = share(&[
            "forward=tcp:53317=10.137.0.17 note=\"phone\" until=2100-01-01T00:00:00Z",
            "forward=udp:53317=10.137.0.40",
            "forward=tcp:22=192.168.1.10",
            "forward=tcp:23=10.137.0.5",
            "relay=224.0.0.167:53317=10.137.0.17,10.137.0.40 allow=any",
        ]);
        let now = SystemTime::now();
        let r = resolve(&s, &defaults(), now, routes, &downstream(), "eth0");
        let rules: Vec<String> = r.rules.iter().map(ToString::to_string).collect();
        assert_eq!(rules, ["tcp:53317 -> 10.137.0.17:53317 (allow-from auto)"]);
        assert_eq!(r.rules[0].origin, Origin::Qubesdb);
        assert_eq!(r.rules[0].comment.as_deref(), Some("phone"));
        assert!(r.rules[0].expires.is_some());
        assert_eq!(r.relays.len(), 1);
        assert_eq!(
            (r.relays[0].targets.clone(), r.relays[0].rate),
            (vec![APP], 25)
        );
        assert_eq!(r.relays[0].allow, crate::spec::AllowFrom::Any);
        assert_eq!(r.held.len(), 4, "{:?}", r.held);
        assert!(r.held[0].contains(&format!("target {OFF} routes out of the uplink eth0")));
        assert!(r.held[1].contains(&format!("target {LAN} routes out of the uplink eth0")));
        assert!(r.held[2].contains("this router's own address"));
        assert!(r.held[3].starts_with("relay=224.0.0.167:53317="));
        assert!(r.next_deadline.is_some());
    }

    #[test]
    fn the_next_deadline_is_the_first_still_ahead() {
        let s = share(&[
            "forward=tcp:80=10.137.0.17 until=2001-01-01T00:00:00Z",
            "forward=tcp:81=10.137.0.17 until=2100-01-01T00:00:00Z",
            "relay=224.0.0.167:53317=10.137.0.17 until=2090-01-01T00:00:00Z",
        ]);
        let r = resolve(
            &s,
            &defaults(),
            SystemTime::now(),
            routes,
            &downstream(),
            "eth0",
        );
        assert_eq!(
            r.next_deadline,
            Some(crate::vm_config::entry::parse_until("2090-01-01T00:00:00Z").unwrap())
        );
    }

    #[test]
    fn expired_entries_are_dropped_everywhere() {
        let s = share(&[
            "forward=tcp:80=10.137.0.17 until=2001-01-01T00:00:00Z",
            "relay=224.0.0.167:53317=10.137.0.17 until=2001-01-01T00:00:00Z",
        ]);
        let now = SystemTime::now();
        let r = resolve(&s, &defaults(), now, routes, &downstream(), "eth0");
        assert_eq!(r, Resolved::default());
        assert!(all_rules(&s, now).is_empty());
        let before = SystemTime::UNIX_EPOCH + Duration::from_secs(900_000_000);
        assert_eq!(all_rules(&s, before).len(), 1);
    }

    #[test]
    fn relays_clashing_with_the_file_or_the_sysctl_refuse_the_share() {
        let s = share(&["relay=224.0.0.167:53317=10.137.0.17"]);
        let now = SystemTime::now();
        assert!(check_relays(&s, &[], Some(20), now).is_ok());
        let file_relay = defaults().relay("224.0.0.167:53317=10.137.0.99".parse().unwrap());
        let err = check_relays(&s, &[file_relay], Some(20), now).unwrap_err();
        assert!(
            err.contains("from dom0's share in QubesDB") && err.contains("config file's relay"),
            "{err}"
        );
        let other = defaults().relay("224.0.0.251:5353=10.137.0.99".parse().unwrap());
        let err = check_relays(&s, &[other], Some(1), now).unwrap_err();
        assert!(err.contains("igmp_max_memberships is 1"), "{err}");
    }
}
