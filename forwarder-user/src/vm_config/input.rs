//! An exposed VM's input share: `vm-config.forwarder-input.N`, what its own
//! firewall (`qubes custom-input`) must admit for the forwards and relays
//! its routers run toward it.
//!
//! ```text
//! admit=PROTO:PORT[-LAST]  [allow=…] [until=…] [note="…"]
//! group=GROUP:PORT         [allow=…] [until=…] [note="…"]
//! ```
//!
//! `admit` is a port (or range) peers connect to; `group` a multicast
//! group, or 255.255.255.255, whose datagrams to PORT the routers relay
//! down. Peers' addresses reach the VM unchanged (the routers only rewrite
//! destinations), so `allow=` can be enforced here as well.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr, str::FromStr};

use forwarder_common::maps::{MAX_RELAYS, MAX_RULES};

use super::{
    entry::{Attrs, Entry},
    parts::INPUT,
};
use crate::spec::{RuleRef, parse_ipv4};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admit {
    pub rule: RuleRef,
    pub attrs: Attrs,
}

/// A group and port the VM receives relayed datagrams on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupPort {
    pub group: Ipv4Addr,
    pub port: u16,
}

impl FromStr for GroupPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let form = "expected GROUP:PORT, GROUP a multicast address or 255.255.255.255 (e.g. 224.0.0.167:53317)";
        let (group, port) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} has no ':'; {form}"))?;
        let group = parse_ipv4(group, "group").map_err(|e| format!("{e}; {form}"))?;
        if !group.is_multicast() && !group.is_broadcast() {
            return Err(format!(
                "group {group} is not multicast or broadcast; {form}"
            ));
        }
        match port.parse::<u16>() {
            Ok(port @ 1..) => Ok(GroupPort { group, port }),
            _ => Err(format!(
                "port {port:?} is not a port number 1-65535; {form}"
            )),
        }
    }
}

impl fmt::Display for GroupPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.group, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub group: GroupPort,
    pub attrs: Attrs,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InputShare {
    pub admits: Vec<Admit>,
    pub groups: Vec<Group>,
}

impl InputShare {
    pub fn is_empty(&self) -> bool {
        self.admits.is_empty() && self.groups.is_empty()
    }

    pub fn entries(&self) -> Vec<String> {
        let admits = self
            .admits
            .iter()
            .map(|a| format!("admit={}{}", a.rule, a.attrs));
        let groups = self
            .groups
            .iter()
            .map(|g| format!("group={}{}", g.group, g.attrs));
        admits.chain(groups).collect()
    }

    /// The feature values, `forwarder-input.1` first.
    pub fn values(&self) -> Result<Vec<String>, String> {
        INPUT.split(&self.entries())
    }

    /// The share held by `/vm-config/forwarder-input.N` pairs (names
    /// relative to `/vm-config/`).
    pub fn from_qubesdb(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut share = InputShare::default();
        for text in INPUT.join(pairs)? {
            let fail = |e: String| format!("{}: {text:?}: {e}", INPUT.qubesdb_prefix());
            let entry = Entry::parse(text).map_err(&fail)?;
            let attrs = Attrs::parse(&entry).map_err(&fail)?;
            let value = entry
                .value
                .ok_or_else(|| fail(format!("{} has no value", entry.kind)))?;
            match entry.kind {
                "admit" => share.admits.push(Admit {
                    rule: value.parse().map_err(&fail)?,
                    attrs,
                }),
                "group" => share.groups.push(Group {
                    group: value.parse().map_err(&fail)?,
                    attrs,
                }),
                other => {
                    return Err(fail(format!(
                        "unknown entry {other:?}: expected admit= or group="
                    )));
                }
            }
        }
        share.check()?;
        Ok(share)
    }

    fn check(&self) -> Result<(), String> {
        if self.admits.len() > MAX_RULES as usize || self.groups.len() > MAX_RELAYS as usize {
            return Err(format!(
                "{} admits and {} groups; at most {MAX_RULES} and {MAX_RELAYS}",
                self.admits.len(),
                self.groups.len()
            ));
        }
        for (i, a) in self.admits.iter().enumerate() {
            if let Some(other) = self.admits[..i]
                .iter()
                .find(|o| o.rule.proto == a.rule.proto && o.rule.ports.overlaps(&a.rule.ports))
            {
                return Err(format!("admit={} and admit={} overlap", other.rule, a.rule));
            }
        }
        let mut seen = BTreeSet::new();
        for g in &self.groups {
            if !seen.insert(g.group) {
                return Err(format!("group={} is given twice", g.group));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(values: &[String]) -> Vec<(String, String)> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (INPUT.name(i + 1), v.clone()))
            .collect()
    }

    #[test]
    fn an_input_share_round_trips() {
        let share = InputShare {
            admits: vec![
                Admit {
                    rule: "tcp:53317".parse().unwrap(),
                    attrs: Attrs::default(),
                },
                Admit {
                    rule: "udp:1714-1764".parse().unwrap(),
                    attrs: Attrs {
                        allow: "192.168.1.0/24".parse().unwrap(),
                        ..Attrs::default()
                    },
                },
            ],
            groups: vec![Group {
                group: "224.0.0.167:53317".parse().unwrap(),
                attrs: Attrs::default(),
            }],
        };
        let values = share.values().unwrap();
        assert!(values[0].ends_with(
            " | admit=tcp:53317 | admit=udp:1714-1764 allow=192.168.1.0/24 | group=224.0.0.167:53317"
        ));
        assert_eq!(InputShare::from_qubesdb(&pairs(&values)).unwrap(), share);
    }

    #[test]
    fn hostile_input_entries_are_refused() {
        for (entries, needle) in [
            (vec!["admit=tcp:0"], "not a port number"),
            (vec!["admit=sctp:1"], "unknown protocol"),
            (vec!["group=10.0.0.1:5"], "not multicast"),
            (vec!["group=224.0.0.1:0"], "not a port number"),
            (vec!["group=224.0.0.1"], "has no ':'"),
            (vec!["forward=tcp:1=10.0.0.1"], "unknown entry"),
            (vec!["admit=tcp:1-100", "admit=tcp:50"], "overlap"),
            (vec!["group=224.0.0.1:5", "group=224.0.0.1:5"], "twice"),
        ] {
            let entries: Vec<String> = entries.into_iter().map(String::from).collect();
            let values = INPUT.split(&entries).unwrap();
            let err = InputShare::from_qubesdb(&pairs(&values)).unwrap_err();
            assert!(err.contains(needle), "{entries:?}: {err}");
        }
    }
}
