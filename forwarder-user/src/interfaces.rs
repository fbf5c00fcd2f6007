//! The namespace's links and IPv4 addresses as rtnetlink reported them, and
//! what the datapath needs from them: the uplink's state and the set of
//! downstream interfaces.

use std::{collections::BTreeMap, net::Ipv4Addr};

use forwarder_common::maps::{UPLINK_HAS_ADDR, UPLINK_UP, UplinkState};
use regex::Regex;

use crate::netlink::{Address, Event, Link};

#[derive(Clone, Debug, Default)]
pub struct Interfaces {
    links: BTreeMap<u32, Link>,
    /// In the order the kernel announced them, which is the order the
    /// kernel keeps them in: the first primary is the preferred source.
    addresses: Vec<Address>,
}

impl Interfaces {
    pub fn new(links: Vec<Link>, addresses: Vec<Address>) -> Self {
        Interfaces {
            links: links.into_iter().map(|l| (l.index, l)).collect(),
            addresses,
        }
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::NewLink(link) => {
                self.links.insert(link.index, link.clone());
            }
            Event::DelLink(index) => {
                self.links.remove(index);
                self.addresses.retain(|a| a.index != *index);
            }
            Event::NewAddress(addr) => {
                match self
                    .addresses
                    .iter_mut()
                    .find(|a| a.index == addr.index && a.addr == addr.addr)
                {
                    Some(existing) => *existing = *addr,
                    None => self.addresses.push(*addr),
                }
            }
            Event::DelAddress(addr) => self
                .addresses
                .retain(|a| !(a.index == addr.index && a.addr == addr.addr)),
            Event::RoutingChanged | Event::RoutesChanged | Event::Overflow => {}
        }
    }

    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.values().find(|l| l.name == name)
    }

    pub fn link(&self, index: u32) -> Option<&Link> {
        self.links.get(&index)
    }

    /// Every IPv4 address of the interface.
    pub fn addresses_of(&self, index: u32) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.addresses
            .iter()
            .filter(move |a| a.index == index)
            .map(|a| a.addr)
    }

    /// The interface's primary IPv4 address: the first that is not secondary.
    pub fn primary_address(&self, index: u32) -> Option<Address> {
        self.addresses
            .iter()
            .find(|a| a.index == index && !a.secondary)
            .copied()
    }

    /// The uplink as the datapath sees it; all-zero flags when it is absent.
    pub fn uplink_state(&self, name: &str) -> UplinkState {
        let Some(link) = self.link_by_name(name) else {
            return UplinkState::default();
        };
        let mut state = UplinkState {
            ifindex: link.index,
            mac: link.mac.unwrap_or_default(),
            ..Default::default()
        };
        if link.running {
            state.flags |= UPLINK_UP;
        }
        if let Some(addr) = self.primary_address(link.index) {
            state.addr = u32::from_ne_bytes(addr.addr.octets());
            state.prefix_len = addr.prefix_len;
            state.flags |= UPLINK_HAS_ADDR;
        }
        state
    }

    /// Downstream interfaces: names matching any pattern, the uplink excluded.
    pub fn downstream<'a>(
        &'a self,
        patterns: &'a [Regex],
        uplink: &'a str,
    ) -> impl Iterator<Item = &'a Link> + 'a {
        self.links
            .values()
            .filter(move |l| l.name != uplink && patterns.iter().any(|p| p.is_match(&l.name)))
    }
}

/// The name of interface `ifindex` in this network namespace, if it exists.
pub fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let ret = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if ret.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The uplink address for log messages.
pub fn describe(state: &UplinkState) -> String {
    if state.ifindex == 0 {
        return "absent".into();
    }
    let addr = address_text(state).unwrap_or_else(|| "no IPv4 address".into());
    let link = if state.flags & UPLINK_UP != 0 {
        "up"
    } else {
        "down"
    };
    format!(
        "ifindex {} {link}, {addr}, MAC {}",
        state.ifindex,
        mac_text(state.mac)
    )
}

/// The uplink's address as ADDR/PREFIX, if it has one.
pub fn address_text(state: &UplinkState) -> Option<String> {
    (state.flags & UPLINK_HAS_ADDR != 0).then(|| {
        format!(
            "{}/{}",
            Ipv4Addr::from(state.addr.to_ne_bytes()),
            state.prefix_len
        )
    })
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, running: bool) -> Link {
        Link {
            index,
            name: name.into(),
            mac: Some([2, 0, 0, 0, 0, index as u8]),
            running,
        }
    }

    fn addr(index: u32, a: [u8; 4], prefix_len: u8, secondary: bool) -> Address {
        Address {
            index,
            addr: Ipv4Addr::from(a),
            prefix_len,
            secondary,
        }
    }

    #[test]
    fn uplink_state_follows_address_changes() {
        let mut ifs = Interfaces::new(vec![link(2, "wls6f0", true)], vec![]);
        let state = ifs.uplink_state("wls6f0");
        assert_eq!(state.ifindex, 2);
        assert!(!state.usable(), "no address yet");

        ifs.apply(&Event::NewAddress(addr(2, [192, 168, 1, 2], 24, false)));
        ifs.apply(&Event::NewAddress(addr(2, [192, 168, 1, 3], 24, true)));
        let state = ifs.uplink_state("wls6f0");
        assert!(state.usable());
        assert_eq!(state.addr.to_ne_bytes(), [192, 168, 1, 2]);
        assert_eq!(state.prefix_len, 24);
        assert_eq!(state.mac, [2, 0, 0, 0, 0, 2]);

        // A DHCP renumbering: old address gone, new one added.
        ifs.apply(&Event::DelAddress(addr(2, [192, 168, 1, 2], 24, false)));
        ifs.apply(&Event::DelAddress(addr(2, [192, 168, 1, 3], 24, true)));
        ifs.apply(&Event::NewAddress(addr(2, [10, 1, 2, 3], 16, false)));
        let state = ifs.uplink_state("wls6f0");
        assert_eq!(state.addr.to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(state.prefix_len, 16);

        ifs.apply(&Event::NewLink(link(2, "wls6f0", false)));
        assert!(!ifs.uplink_state("wls6f0").usable(), "link down");
        ifs.apply(&Event::DelLink(2));
        assert_eq!(ifs.uplink_state("wls6f0"), UplinkState::default());
    }

    #[test]
    fn downstream_matching_excludes_the_uplink() {
        let ifs = Interfaces::new(
            vec![
                link(1, "lo", true),
                link(2, "eth0", true),
                link(3, "vif3.0", true),
                link(4, "vif3.0-emu", true),
            ],
            vec![],
        );
        let patterns = [
            Regex::new(r"^vif[0-9]+\.[0-9]+$").unwrap(),
            Regex::new("^eth").unwrap(),
        ];
        let names: Vec<_> = ifs
            .downstream(&patterns, "eth0")
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["vif3.0"]);
    }

    #[test]
    fn a_readded_address_is_updated_in_place() {
        let mut ifs = Interfaces::new(vec![link(2, "eth0", true)], vec![]);
        ifs.apply(&Event::NewAddress(addr(2, [10, 0, 0, 1], 24, false)));
        ifs.apply(&Event::NewAddress(addr(2, [10, 0, 0, 1], 25, false)));
        assert_eq!(ifs.primary_address(2).unwrap().prefix_len, 25);
    }
}
