//! Membership of the relay groups on the uplink. A real NIC filters
//! multicast it was not asked for, so the frames the relay copies toward
//! the VMs would never reach the uplink's TC hook without it. Joined by
//! interface index, so the uplink needs no address; a recreated link gets a
//! new index and a fresh membership.

use std::{
    io,
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
};

use anyhow::{Context as _, Result};

/// Where the kernel keeps how many groups one socket may join (per
/// network namespace; 20 by default).
const MAX_MEMBERSHIPS: &str = "/proc/sys/net/ipv4/igmp_max_memberships";

/// The sysctl's current value.
pub fn max_memberships() -> io::Result<u32> {
    std::fs::read_to_string(MAX_MEMBERSHIPS)?
        .trim()
        .parse()
        .map_err(io::Error::other)
}

/// The groups to join among the relays' groups: the multicast ones (a
/// broadcast relay needs no membership), each once.
pub fn groups(relay_groups: impl IntoIterator<Item = Ipv4Addr>) -> Vec<Ipv4Addr> {
    let mut groups: Vec<Ipv4Addr> = relay_groups
        .into_iter()
        .filter(Ipv4Addr::is_multicast)
        .collect();
    groups.sort();
    groups.dedup();
    groups
}

/// Whether one socket may join `groups` under the sysctl's value `max`:
/// past it, every join fails and the daemon could never start.
pub fn check_groups(groups: &[Ipv4Addr], max: u32) -> Result<(), String> {
    if groups.len() <= max as usize {
        return Ok(());
    }
    Err(format!(
        "the relays need {} multicast groups joined on the uplink, but \
         net.ipv4.igmp_max_memberships is {max} here: relay at most {max} multicast groups \
         ([[relay]], --relay and the presets together), or raise the sysctl to {} or more",
        groups.len(),
        groups.len()
    ))
}

pub struct Memberships {
    groups: Vec<Ipv4Addr>,
    /// The socket holding the memberships, and the interface they are on.
    joined: Option<(u32, UdpSocket)>,
}

fn join(socket: &UdpSocket, group: Ipv4Addr, ifindex: u32) -> io::Result<()> {
    let mreq = libc::ip_mreqn {
        imr_multiaddr: libc::in_addr {
            s_addr: u32::from_ne_bytes(group.octets()),
        },
        imr_address: libc::in_addr { s_addr: 0 },
        imr_ifindex: ifindex as i32,
    };
    // SAFETY: a valid socket and a fully initialised ip_mreqn.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_ADD_MEMBERSHIP,
            (&raw const mreq).cast(),
            size_of::<libc::ip_mreqn>() as u32,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Memberships {
    /// Joins the multicast groups among `relay_groups`.
    pub fn new(relay_groups: Vec<Ipv4Addr>) -> Self {
        Memberships {
            groups: groups(relay_groups),
            joined: None,
        }
    }

    /// Changes the groups to those among `relay_groups`; the next
    /// [`Memberships::follow`] joins them afresh. Returns whether they
    /// changed.
    pub fn set_groups(&mut self, relay_groups: Vec<Ipv4Addr>) -> bool {
        let groups = groups(relay_groups);
        if groups == self.groups {
            return false;
        }
        self.groups = groups;
        // Closing the socket leaves the old groups.
        self.joined = None;
        true
    }

    pub fn ifindex(&self) -> Option<u32> {
        self.joined.as_ref().map(|(ifindex, _)| *ifindex)
    }

    /// Holds the memberships on `ifindex` (0: no uplink, hold none).
    /// Returns the groups newly joined.
    pub fn follow(&mut self, ifindex: u32) -> Result<Vec<Ipv4Addr>> {
        if self.groups.is_empty() || self.ifindex() == Some(ifindex) {
            return Ok(Vec::new());
        }
        // Closing the socket leaves the groups of the old interface.
        self.joined = None;
        if ifindex == 0 {
            return Ok(Vec::new());
        }
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("multicast socket")?;
        for group in &self.groups {
            join(&socket, *group, ifindex)
                .with_context(|| format!("joining {group} on ifindex {ifindex}"))?;
        }
        self.joined = Some((ifindex, socket));
        Ok(self.groups.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_past_the_sysctl_are_refused_naming_it() {
        let relay_groups = |n: u8| {
            (0..n)
                .map(|i| Ipv4Addr::new(239, 1, 1, i))
                .chain([Ipv4Addr::BROADCAST, Ipv4Addr::new(239, 1, 1, 0)])
        };
        let twenty = groups(relay_groups(20));
        assert_eq!(twenty.len(), 20, "broadcast and a repeat join nothing");
        assert!(check_groups(&twenty, 20).is_ok());
        let err = check_groups(&groups(relay_groups(21)), 20).unwrap_err();
        assert!(
            err.contains("21 multicast groups")
                && err.contains("net.ipv4.igmp_max_memberships is 20")
                && err.contains("at most 20"),
            "{err}"
        );
        assert!(max_memberships().is_ok_and(|n| n > 0), "read on Linux");
    }
}
