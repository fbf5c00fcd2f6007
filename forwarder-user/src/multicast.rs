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
    /// Joins the multicast groups among `groups` (a broadcast relay needs
    /// no membership).
    pub fn new(mut groups: Vec<Ipv4Addr>) -> Self {
        groups.retain(Ipv4Addr::is_multicast);
        groups.sort();
        groups.dedup();
        Memberships {
            groups,
            joined: None,
        }
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
