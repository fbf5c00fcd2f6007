//! A router's share: `vm-config.forwarder.N`, the forwards and relays one
//! router runs for the VMs exposed behind it, each aimed at the address of
//! the VM one step down its chain.
//!
//! ```text
//! forward=PROTO:PORT[-LAST]=TARGET_IP[:TARGET_PORT] [allow=…] [until=…] [note="…"]
//! relay=GROUP:PORT=TARGET_IP[,TARGET_IP...]         [allow=…] [until=…] [note="…"]
//! ```
//!
//! The values are `--forward` and `--relay` flags' (the target always
//! given), parsed by the same code. A relay's `until=` has no datapath
//! deadline behind it: the daemon removes the relay when it passes.

use std::{collections::BTreeSet, time::SystemTime};

use forwarder_common::maps::{MAX_RELAYS, MAX_RULES};

use super::{
    entry::{Attrs, Entry},
    parts::ROUTER,
};
use crate::spec::{ForwardSpec, RelaySpec, is_unicast};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// Its target is always set.
    pub spec: ForwardSpec,
    pub attrs: Attrs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    pub spec: RelaySpec,
    pub attrs: Attrs,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterShare {
    pub forwards: Vec<Forward>,
    pub relays: Vec<Relay>,
}

impl RouterShare {
    pub fn is_empty(&self) -> bool {
        self.forwards.is_empty() && self.relays.is_empty()
    }

    /// The entries in writing order: forwards, then relays.
    pub fn entries(&self) -> Vec<String> {
        let forwards = self
            .forwards
            .iter()
            .map(|f| format!("forward={}{}", f.spec, f.attrs));
        let relays = self
            .relays
            .iter()
            .map(|r| format!("relay={}{}", r.spec, r.attrs));
        forwards.chain(relays).collect()
    }

    /// The feature values, `forwarder.1` first.
    pub fn values(&self) -> Result<Vec<String>, String> {
        ROUTER.split(&self.entries())
    }

    /// The share held by `/vm-config/forwarder.N` pairs (names relative to
    /// `/vm-config/`), validated as strictly as a config file.
    pub fn from_qubesdb(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut share = RouterShare::default();
        for text in ROUTER.join(pairs)? {
            let fail = |e: String| format!("{}: {text:?}: {e}", ROUTER.qubesdb_prefix());
            let entry = Entry::parse(text).map_err(&fail)?;
            let attrs = Attrs::parse(&entry).map_err(&fail)?;
            let value = entry
                .value
                .ok_or_else(|| fail(format!("{} has no value", entry.kind)))?;
            match entry.kind {
                "forward" => {
                    let spec: ForwardSpec = value.parse().map_err(&fail)?;
                    match spec.target {
                        None => return Err(fail("a forward must name its target".into())),
                        Some(t) if !is_unicast(t) => {
                            return Err(fail(format!("target {t} is not a unicast host")));
                        }
                        Some(_) => {}
                    }
                    share.forwards.push(Forward { spec, attrs });
                }
                "relay" => {
                    let spec: RelaySpec = value.parse().map_err(&fail)?;
                    share.relays.push(Relay { spec, attrs });
                }
                other => {
                    return Err(fail(format!(
                        "unknown entry {other:?}: expected forward= or relay="
                    )));
                }
            }
        }
        share.check()?;
        Ok(share)
    }

    /// What the datapath could not hold, or would hold ambiguously: a port
    /// forwarded twice, a group relayed twice, more than the maps take.
    fn check(&self) -> Result<(), String> {
        let ports: u32 = self.forwards.iter().map(|f| f.spec.ports.count()).sum();
        if ports > MAX_RULES {
            return Err(format!(
                "the share forwards {ports} ports; at most {MAX_RULES}"
            ));
        }
        if self.relays.len() > MAX_RELAYS as usize {
            return Err(format!(
                "the share has {} relays; at most {MAX_RELAYS}",
                self.relays.len()
            ));
        }
        for (i, f) in self.forwards.iter().enumerate() {
            if let Some(other) = self.forwards[..i]
                .iter()
                .find(|o| o.spec.proto == f.spec.proto && o.spec.ports.overlaps(&f.spec.ports))
            {
                return Err(format!(
                    "forward={} and forward={} overlap",
                    other.spec, f.spec
                ));
            }
        }
        let mut groups = BTreeSet::new();
        for r in &self.relays {
            if !groups.insert((r.spec.group, r.spec.port)) {
                return Err(format!("{}:{} is relayed twice", r.spec.group, r.spec.port));
            }
        }
        Ok(())
    }

    /// The earliest deadline of any entry.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        let forwards = self.forwards.iter().filter_map(|f| f.attrs.until);
        let relays = self.relays.iter().filter_map(|r| r.attrs.until);
        forwards.chain(relays).min()
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::*;

    fn pairs(values: &[String]) -> Vec<(String, String)> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (ROUTER.name(i + 1), v.clone()))
            .collect()
    }

    fn one(text: &str) -> Result<RouterShare, String> {
        RouterShare::from_qubesdb(&pairs(&ROUTER.split(&[text.to_string()]).unwrap()))
    }

    fn localsend() -> RouterShare {
        let target = Some(Ipv4Addr::new(10, 137, 0, 6));
        RouterShare {
            forwards: vec![
                Forward {
                    spec: ForwardSpec {
                        target,
                        ..("tcp:53317".parse().unwrap())
                    },
                    attrs: Attrs {
                        allow: "192.168.1.0/24".parse().unwrap(),
                        until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
                        note: Some("phone".parse().unwrap()),
                    },
                },
                Forward {
                    spec: "udp:1714-1764=10.137.0.6".parse().unwrap(),
                    attrs: Attrs::default(),
                },
            ],
            relays: vec![Relay {
                spec: "224.0.0.167:53317=10.137.0.6,10.137.0.7".parse().unwrap(),
                attrs: Attrs::default(),
            }],
        }
    }

    #[test]
    fn a_share_round_trips_through_its_values() {
        let share = localsend();
        let values = share.values().unwrap();
        assert_eq!(values.len(), 1);
        let body = values[0].split_once(" | ").unwrap().1;
        assert_eq!(
            body,
            "forward=tcp:53317=10.137.0.6 allow=192.168.1.0/24 until=2030-03-17T17:46:40Z note=\"phone\" \
             | forward=udp:1714-1764=10.137.0.6 \
             | relay=224.0.0.167:53317=10.137.0.6,10.137.0.7"
        );
        assert_eq!(RouterShare::from_qubesdb(&pairs(&values)).unwrap(), share);
        assert_eq!(
            share.next_deadline(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000))
        );
        assert_eq!(
            RouterShare::from_qubesdb(&[]).unwrap(),
            RouterShare::default()
        );
    }

    #[test]
    fn a_large_share_splits_and_reads_back() {
        let forwards = (1..=300)
            .map(|port| Forward {
                spec: format!("tcp:{port}=10.137.0.6").parse().unwrap(),
                attrs: Attrs {
                    note: Some("a note of some length, for size".parse().unwrap()),
                    ..Attrs::default()
                },
            })
            .collect();
        let share = RouterShare {
            forwards,
            relays: Vec::new(),
        };
        let values = share.values().unwrap();
        assert!(values.len() > 3, "{}", values.len());
        assert_eq!(RouterShare::from_qubesdb(&pairs(&values)).unwrap(), share);
    }

    #[test]
    fn hostile_entries_are_refused_with_what_was_wrong() {
        for (text, needle) in [
            ("forward=tcp:80", "must name its target"),
            ("forward=tcp:0=10.0.0.1", "not a port number"),
            ("forward=tcp:80=224.0.0.1", "not a unicast host"),
            ("relay=10.0.0.1:5=10.0.0.2", "neither a multicast"),
            (
                "relay=224.0.0.1:5=10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8,10.0.0.9,10.0.0.10",
                "9 targets",
            ),
            ("forward", "has no value"),
            ("localsend=10.0.0.1", "unknown entry"),
            ("forward=tcp:80=10.0.0.1 ttl=3", "unknown attribute"),
            ("forward=tcp:80=10.0.0.1 allow=0.0.0.0/33", "prefix length"),
        ] {
            let err = one(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains("/vm-config/forwarder."), "{text}: {err}");
        }
    }

    #[test]
    fn overlapping_or_repeated_entries_are_refused() {
        for (entries, needle) in [
            (
                vec![
                    "forward=tcp:1700-1800=10.0.0.1",
                    "forward=tcp:1714=10.0.0.2",
                ],
                "overlap",
            ),
            (
                vec!["relay=224.0.0.1:5=10.0.0.1", "relay=224.0.0.1:5=10.0.0.2"],
                "relayed twice",
            ),
        ] {
            let entries: Vec<String> = entries.into_iter().map(String::from).collect();
            let values = ROUTER.split(&entries).unwrap();
            let err = RouterShare::from_qubesdb(&pairs(&values)).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        let udp_and_tcp: Vec<String> = vec![
            "forward=tcp:80=10.0.0.1".into(),
            "forward=udp:80=10.0.0.1".into(),
        ];
        let values = ROUTER.split(&udp_and_tcp).unwrap();
        assert_eq!(
            RouterShare::from_qubesdb(&pairs(&values))
                .unwrap()
                .forwards
                .len(),
            2
        );
    }
}
