//! An exposed VM's input share as nftables rules. They live in a chain the
//! forwarder owns, `forwarder-input`, inside Qubes' own `table ip qubes` of
//! the VM: an accept in a table of our own would not stop Qubes' input
//! chain from dropping the packet, so the one edit of Qubes' rules is a
//! `jump forwarder-input` appended to `custom-input`, the chain Qubes keeps
//! for such additions. Each change replaces the chain's rules in one
//! transaction.
//!
//! - `admit=tcp:P` → `tcp dport P ct state new accept` (Qubes' own chain
//!   accepts the rest of the connection);
//! - `admit=udp:P` → `udp dport P accept`;
//! - `group=G:P` → `ip daddr G udp dport P accept`;
//! - `allow=CIDR,…` → `ip saddr { CIDR, … }` first (peers' addresses reach
//!   the VM unchanged); `auto` and `any` admit every source, the routers
//!   having filtered already;
//! - an entry whose `until` has passed is left out.

use std::time::SystemTime;

use anyhow::{Context as _, Result};

use crate::{
    nft,
    spec::{AllowFrom, Proto},
    vm_config::{entry::Attrs, input::InputShare},
};

/// Qubes' table in the VM.
pub const TABLE: &str = "qubes";
/// Qubes' chain for a VM's own input additions.
pub const CUSTOM_INPUT: &str = "custom-input";
/// The chain the forwarder owns.
pub const CHAIN: &str = "forwarder-input";

fn source(attrs: &Attrs) -> String {
    match &attrs.allow {
        AllowFrom::List(cidrs) => {
            let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            format!("ip saddr {{ {} }} ", cidrs.join(", "))
        }
        AllowFrom::Auto | AllowFrom::Any => String::new(),
    }
}

/// The chain's rules for `share` at `now`, one a line.
pub fn rules(share: &InputShare, now: SystemTime) -> Vec<String> {
    let mut out = Vec::new();
    for admit in share.admits.iter().filter(|a| !a.attrs.expired(now)) {
        let from = source(&admit.attrs);
        let ports = admit.rule.ports;
        out.push(match admit.rule.proto {
            Proto::Tcp => format!("{from}tcp dport {ports} ct state new counter accept"),
            Proto::Udp => format!("{from}udp dport {ports} counter accept"),
        });
    }
    for group in share.groups.iter().filter(|g| !g.attrs.expired(now)) {
        let from = source(&group.attrs);
        out.push(format!(
            "{from}ip daddr {} udp dport {} counter accept",
            group.group.group, group.group.port
        ));
    }
    out
}

/// The transaction that makes the chain hold exactly `rules`, and adds the
/// jump to it when `jump` says it is missing.
pub fn script(rules: &[String], jump: bool) -> String {
    let mut out = format!("add chain ip {TABLE} {CHAIN}\nflush chain ip {TABLE} {CHAIN}\n");
    for rule in rules {
        out += &format!("add rule ip {TABLE} {CHAIN} {rule}\n");
    }
    if jump {
        out += &format!("add rule ip {TABLE} {CUSTOM_INPUT} jump {CHAIN}\n");
    }
    out
}

/// `custom-input` with rule handles; an error naming what a Qubes VM has
/// when it is missing.
fn custom_input() -> Result<String> {
    nft::run(&["-a", "list", "chain", "ip", TABLE, CUSTOM_INPUT], None).with_context(|| {
        format!(
            "this VM has no chain {CUSTOM_INPUT} in table ip {TABLE}, which a Qubes VM's own \
             firewall has"
        )
    })
}

/// The handles of the jumps to our chain in `listing` (`nft -a list chain`).
pub fn jump_handles(listing: &str) -> Vec<u64> {
    listing
        .lines()
        .filter(|l| l.trim_start().starts_with(&format!("jump {CHAIN} ")))
        .filter_map(|l| l.rsplit_once("# handle ")?.1.trim().parse().ok())
        .collect()
}

/// Makes the chain hold exactly `rules`, and `custom-input` jump to it.
pub fn install(rules: &[String]) -> Result<()> {
    let jump = jump_handles(&custom_input()?).is_empty();
    nft::run(&["-f", "-"], Some(&script(rules, jump))).map(drop)
}

/// Whether `custom-input` still jumps to the chain (a reload of Qubes'
/// table takes both away).
pub fn in_place() -> Result<bool> {
    Ok(!jump_handles(&custom_input()?).is_empty())
}

/// Removes the jump and the chain; returns whether there was anything.
pub fn remove() -> Result<bool> {
    let Ok(listing) = custom_input() else {
        return Ok(false);
    };
    let mut script = String::new();
    for handle in jump_handles(&listing) {
        script += &format!("delete rule ip {TABLE} {CUSTOM_INPUT} handle {handle}\n");
    }
    let chain = nft::run(&["list", "chain", "ip", TABLE, CHAIN], None).is_ok();
    if chain {
        script += &format!("delete chain ip {TABLE} {CHAIN}\n");
    }
    if script.is_empty() {
        return Ok(false);
    }
    nft::run(&["-f", "-"], Some(&script))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_config::input::{Admit, Group};

    fn share() -> InputShare {
        InputShare {
            admits: vec![
                Admit {
                    rule: "tcp:53317".parse().unwrap(),
                    attrs: Attrs::default(),
                },
                Admit {
                    rule: "udp:1714-1764".parse().unwrap(),
                    attrs: Attrs {
                        allow: "192.168.1.0/24,10.0.0.7".parse().unwrap(),
                        ..Attrs::default()
                    },
                },
                Admit {
                    rule: "tcp:22".parse().unwrap(),
                    attrs: Attrs {
                        until: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(100)),
                        ..Attrs::default()
                    },
                },
            ],
            groups: vec![Group {
                group: "224.0.0.167:53317".parse().unwrap(),
                attrs: Attrs::default(),
            }],
        }
    }

    #[test]
    fn each_entry_becomes_one_accept_and_expired_ones_none() {
        assert_eq!(
            rules(&share(), SystemTime::now()),
            [
                "tcp dport 53317 ct state new counter accept",
                "ip saddr { 192.168.1.0/24, 10.0.0.7/32 } udp dport 1714-1764 counter accept",
                "ip daddr 224.0.0.167 udp dport 53317 counter accept",
            ]
        );
        let before = rules(&share(), SystemTime::UNIX_EPOCH);
        assert_eq!(before[2], "tcp dport 22 ct state new counter accept");
    }

    #[test]
    fn the_script_replaces_the_chain_and_adds_the_jump_once() {
        let rules = vec!["udp dport 1 counter accept".to_string()];
        assert_eq!(
            script(&rules, true),
            "add chain ip qubes forwarder-input\nflush chain ip qubes forwarder-input\n\
             add rule ip qubes forwarder-input udp dport 1 counter accept\n\
             add rule ip qubes custom-input jump forwarder-input\n"
        );
        assert!(!script(&[], false).contains("jump"));
    }

    #[test]
    fn jumps_are_found_by_handle() {
        let listing = "table ip qubes {\n\tchain custom-input { # handle 2\n\
                       \t\ttcp dport 22 accept # handle 7\n\
                       \t\tjump forwarder-input # handle 9\n\
                       \t\tjump forwarder-input-other # handle 10\n\t}\n}\n";
        assert_eq!(jump_handles(listing), [9]);
    }
}
