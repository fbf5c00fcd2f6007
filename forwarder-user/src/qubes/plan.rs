//! From every exposure (a VM, what it asks, its chain) to what each router
//! and each exposed VM must hold. Pure: the same inputs give the same
//! shares, entry for entry, so a `sync` with nothing changed writes nothing.
//!
//! Exposures are taken in name order. An item is applied on every hop of
//! its chain or on none: when a router already forwards one of its ports
//! elsewhere, or relays its group with another allow-from, or to its most
//! targets, the item is refused and the report says where and for whom.
//! Relays of one group toward several VMs merge into one relay with
//! several targets.

use std::{collections::BTreeMap, net::Ipv4Addr, time::SystemTime};

use forwarder_common::maps::MAX_RELAY_TARGETS;

use super::{
    chain::{Chain, Hop, Refusal},
    intent::{Intent, Item},
};
use crate::{
    spec::{ForwardSpec, Proto, RelaySpec, RuleRef},
    vm_config::{
        entry::Attrs,
        input::{Admit, Group, GroupPort, InputShare},
        router::{Forward, Relay, RouterShare},
    },
};

/// One exposed VM as `sync` found it.
#[derive(Clone, Debug)]
pub struct Exposure {
    pub vm: String,
    pub intent: Intent,
    pub chain: Result<Chain, Refusal>,
}

/// What happened to one exposure.
#[derive(Clone, Debug)]
pub struct Report {
    pub vm: String,
    pub chain: Result<Chain, Refusal>,
    pub applied: Vec<Item>,
    /// Items no router got, and why.
    pub refused: Vec<(Item, String)>,
    /// Items whose deadline passed.
    pub expired: Vec<Item>,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub routers: BTreeMap<String, RouterShare>,
    pub inputs: BTreeMap<String, InputShare>,
    pub reports: Vec<Report>,
}

struct ForwardClaim {
    rule: RuleRef,
    target: Ipv4Addr,
    attrs: Attrs,
    owner: String,
}

struct RelayClaim {
    targets: Vec<Ipv4Addr>,
    attrs: Attrs,
    owners: Vec<String>,
}

#[derive(Default)]
struct Claims {
    forwards: BTreeMap<(Proto, u16), ForwardClaim>,
    relays: BTreeMap<(Ipv4Addr, u16), RelayClaim>,
}

impl Claims {
    /// Why `item` cannot go on this router toward `hop.target`, if so.
    fn conflict(&self, hop: &Hop, item: &Item, vm: &str) -> Option<String> {
        for rule in item.what.forwards() {
            let clash = self
                .forwards
                .values()
                .find(|c| c.rule.proto == rule.proto && c.rule.ports.overlaps(&rule.ports));
            if let Some(c) = clash
                && !(c.rule == rule
                    && c.target == hop.target
                    && c.attrs == item.attrs
                    && c.owner == vm)
            {
                return Some(format!(
                    "{} already forwards {} to {} for {}",
                    hop.router, c.rule, c.target, c.owner
                ));
            }
        }
        for (group, port) in item.what.relays() {
            let Some(c) = self.relays.get(&(*group, *port)) else {
                continue;
            };
            let owners = c.owners.join(", ");
            if c.attrs.allow != item.attrs.allow {
                return Some(format!(
                    "{} relays {group}:{port} for {owners} from allow-from {}, not {}",
                    hop.router, c.attrs.allow, item.attrs.allow
                ));
            }
            if !c.targets.contains(&hop.target) && c.targets.len() == MAX_RELAY_TARGETS {
                return Some(format!(
                    "{} relays {group}:{port} to {MAX_RELAY_TARGETS} targets already, for {owners}",
                    hop.router
                ));
            }
        }
        None
    }

    fn claim(&mut self, hop: &Hop, item: &Item, vm: &str) {
        for rule in item.what.forwards() {
            self.forwards.insert(
                (rule.proto, rule.ports.first),
                ForwardClaim {
                    rule,
                    target: hop.target,
                    attrs: item.attrs.clone(),
                    owner: vm.into(),
                },
            );
        }
        for (group, port) in item.what.relays() {
            let claim = self
                .relays
                .entry((*group, *port))
                .or_insert_with(|| RelayClaim {
                    targets: Vec::new(),
                    attrs: item.attrs.clone(),
                    owners: Vec::new(),
                });
            if !claim.targets.contains(&hop.target) {
                claim.targets.push(hop.target);
                claim.targets.sort();
            }
            if !claim.owners.iter().any(|o| o == vm) {
                claim.owners.push(vm.into());
            }
            // A merged relay lasts as long as its longest-lived owner.
            claim.attrs.until = match (claim.attrs.until, item.attrs.until) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
    }

    fn share(self) -> RouterShare {
        RouterShare {
            forwards: self
                .forwards
                .into_values()
                .map(|c| Forward {
                    spec: ForwardSpec {
                        proto: c.rule.proto,
                        ports: c.rule.ports,
                        target: Some(c.target),
                        target_port: None,
                    },
                    attrs: c.attrs,
                })
                .collect(),
            relays: self
                .relays
                .into_iter()
                .map(|((group, port), c)| Relay {
                    spec: RelaySpec {
                        group,
                        port,
                        targets: c.targets,
                    },
                    attrs: c.attrs,
                })
                .collect(),
        }
    }
}

/// The shares every router and exposed VM must hold, and a report per
/// exposure. `exposures` must be sorted by VM name.
pub fn plan(exposures: &[Exposure], now: SystemTime) -> Plan {
    let mut claims: BTreeMap<String, Claims> = BTreeMap::new();
    let mut plan = Plan::default();
    for exposure in exposures {
        let mut report = Report {
            vm: exposure.vm.clone(),
            chain: exposure.chain.clone(),
            applied: Vec::new(),
            refused: Vec::new(),
            expired: Vec::new(),
        };
        let Ok(chain) = &exposure.chain else {
            plan.reports.push(report);
            continue;
        };
        let mut input = InputShare::default();
        for item in &exposure.intent.items {
            if item.attrs.expired(now) {
                report.expired.push(item.clone());
                continue;
            }
            let conflict = chain.hops.iter().find_map(|hop| {
                claims
                    .get(&hop.router)
                    .and_then(|c| c.conflict(hop, item, &exposure.vm))
            });
            if let Some(why) = conflict {
                report.refused.push((item.clone(), why));
                continue;
            }
            for hop in &chain.hops {
                claims
                    .entry(hop.router.clone())
                    .or_default()
                    .claim(hop, item, &exposure.vm);
            }
            add_input(&mut input, item);
            report.applied.push(item.clone());
        }
        if !input.is_empty() {
            plan.inputs.insert(exposure.vm.clone(), input);
        }
        plan.reports.push(report);
    }
    plan.routers = claims
        .into_iter()
        .map(|(router, c)| (router, c.share()))
        .collect();
    plan
}

/// What the VM admits for `item`: its ports and groups, from the item's
/// peers, until its deadline.
fn add_input(input: &mut InputShare, item: &Item) {
    let attrs = Attrs {
        note: None,
        ..item.attrs.clone()
    };
    for rule in item.what.forwards() {
        input.admits.push(Admit {
            rule,
            attrs: attrs.clone(),
        });
    }
    for (group, port) in item.what.relays() {
        input.groups.push(Group {
            group: GroupPort {
                group: *group,
                port: *port,
            },
            attrs: attrs.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::qubes::intent::parse_what;

    fn hop(router: &str, below: &str, target: [u8; 4]) -> Hop {
        Hop {
            router: router.into(),
            below: below.into(),
            target: target.into(),
            advertised: true,
        }
    }

    fn exposure(vm: &str, ip: [u8; 4], routers: &[(&str, [u8; 4])], items: &[&str]) -> Exposure {
        let mut hops = vec![hop(routers[0].0, vm, ip)];
        for pair in routers.windows(2) {
            hops.push(hop(pair[1].0, pair[0].0, pair[0].1));
        }
        let mut intent = Intent::new(vm);
        for item in items {
            intent
                .add(Item {
                    what: parse_what(item).unwrap(),
                    attrs: Attrs::default(),
                })
                .unwrap();
        }
        Exposure {
            vm: vm.into(),
            intent,
            chain: Ok(Chain {
                vm: vm.into(),
                hops,
            }),
        }
    }

    const FW: (&str, [u8; 4]) = ("sys-firewall", [10, 137, 0, 6]);
    const NET: (&str, [u8; 4]) = ("sys-net", [10, 137, 0, 5]);

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn localsend_on_the_standard_chain() {
        let plan = plan(
            &[exposure(
                "app",
                [10, 137, 0, 12],
                &[FW, NET],
                &["localsend"],
            )],
            now(),
        );
        let entries = |router: &str| plan.routers[router].entries();
        assert_eq!(
            entries("sys-firewall"),
            [
                "forward=tcp:53317=10.137.0.12",
                "forward=udp:53317=10.137.0.12",
                "relay=224.0.0.167:53317=10.137.0.12"
            ]
        );
        assert_eq!(
            entries("sys-net"),
            [
                "forward=tcp:53317=10.137.0.6",
                "forward=udp:53317=10.137.0.6",
                "relay=224.0.0.167:53317=10.137.0.6"
            ]
        );
        assert_eq!(
            plan.inputs["app"].entries(),
            [
                "admit=tcp:53317",
                "admit=udp:53317",
                "group=224.0.0.167:53317"
            ]
        );
        assert_eq!(plan.reports[0].applied.len(), 1);
    }

    #[test]
    fn a_port_claimed_twice_is_refused_for_the_later_vm_on_every_hop() {
        let plan = plan(
            &[
                exposure(
                    "app",
                    [10, 137, 0, 12],
                    &[FW, NET],
                    &["tcp:8080", "tcp:9000"],
                ),
                exposure(
                    "work",
                    [10, 137, 0, 13],
                    &[FW, NET],
                    &["tcp:8080", "tcp:9001"],
                ),
            ],
            now(),
        );
        let work = &plan.reports[1];
        assert_eq!(work.applied.len(), 1);
        assert_eq!(work.refused.len(), 1);
        assert_eq!(
            work.refused[0].1,
            "sys-firewall already forwards tcp:8080 to 10.137.0.12 for app"
        );
        assert_eq!(
            plan.routers["sys-net"].entries(),
            [
                "forward=tcp:8080=10.137.0.6",
                "forward=tcp:9000=10.137.0.6",
                "forward=tcp:9001=10.137.0.6"
            ]
        );
        assert_eq!(plan.inputs["work"].entries(), ["admit=tcp:9001"]);
    }

    #[test]
    fn relays_toward_two_vms_merge_and_allow_from_must_agree() {
        let mut exposures = vec![
            exposure("app", [10, 137, 0, 12], &[FW, NET], &["mdns"]),
            exposure("work", [10, 137, 0, 13], &[FW, NET], &["mdns"]),
        ];
        let merged = plan(&exposures, now());
        assert_eq!(
            merged.routers["sys-firewall"].entries(),
            ["relay=224.0.0.251:5353=10.137.0.12,10.137.0.13"]
        );
        assert_eq!(
            merged.routers["sys-net"].entries(),
            ["relay=224.0.0.251:5353=10.137.0.6"]
        );
        exposures[1].intent.items[0].attrs.allow = "192.168.1.0/24".parse().unwrap();
        let refused = plan(&exposures, now());
        assert!(
            refused.reports[1].refused[0]
                .1
                .contains("sys-firewall relays 224.0.0.251:5353 for app from allow-from auto"),
            "{:?}",
            refused.reports[1].refused
        );
        assert!(!refused.inputs.contains_key("work"));
    }

    #[test]
    fn expired_items_and_broken_chains_reach_no_router() {
        let mut timed = exposure("app", [10, 137, 0, 12], &[FW, NET], &["tcp:1", "tcp:2"]);
        timed.intent.items[0].attrs.until = Some(now());
        let mut broken = exposure("work", [10, 137, 0, 13], &[FW, NET], &["tcp:3"]);
        broken.chain = Err(Refusal::NoNetvm("work".into()));
        let plan = plan(&[timed, broken], now());
        assert_eq!(
            plan.routers["sys-net"].entries(),
            ["forward=tcp:2=10.137.0.6"]
        );
        assert_eq!(plan.reports[0].expired.len(), 1);
        assert!(plan.reports[1].applied.is_empty());
        assert!(!plan.inputs.contains_key("work"));
    }

    #[test]
    fn attributes_reach_every_hop_and_the_vm_without_the_note() {
        let mut e = exposure("app", [10, 137, 0, 12], &[FW, NET], &["tcp:8080"]);
        e.intent.items[0].attrs = Attrs {
            allow: "192.168.1.0/24".parse().unwrap(),
            until: Some(now() + Duration::from_secs(3600)),
            note: Some("web".parse().unwrap()),
        };
        let plan = plan(&[e], now());
        for router in ["sys-net", "sys-firewall"] {
            let entry = &plan.routers[router].entries()[0];
            assert!(
                entry.ends_with(" allow=192.168.1.0/24 until=2027-01-15T09:00:00Z note=\"web\""),
                "{entry}"
            );
        }
        assert_eq!(
            plan.inputs["app"].entries(),
            ["admit=tcp:8080 allow=192.168.1.0/24 until=2027-01-15T09:00:00Z"]
        );
    }

    #[test]
    fn the_same_input_gives_the_same_values() {
        let exposures = [
            exposure("app", [10, 137, 0, 12], &[FW, NET], &["kdeconnect", "mdns"]),
            exposure(
                "work",
                [10, 137, 0, 13],
                &[("sys-net", [0; 4])],
                &["syncthing"],
            ),
        ];
        let a = plan(&exposures, now());
        let b = plan(&exposures, now());
        for (router, share) in &a.routers {
            assert_eq!(share.values().unwrap(), b.routers[router].values().unwrap());
        }
    }
}
