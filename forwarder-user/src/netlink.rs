//! rtnetlink: the links and IPv4 addresses of this network namespace, as a
//! dump and as a stream of changes. A stream that overflowed (the kernel
//! dropped messages) is reported so the caller can dump again.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, RawFd},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage},
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};

const RTMGRP_LINK: u32 = 1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
/// Large enough that a burst of VM starts does not overflow it; overflow is
/// still handled by a resync.
const RECV_BUFFER: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// Administratively up and operationally running.
    pub running: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The kernel's primary/secondary distinction: the primary address of a
    /// subnet is the preferred source of its routes.
    pub secondary: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    NewLink(Link),
    DelLink(u32),
    NewAddress(Address),
    DelAddress(Address),
    /// A route or neighbour changed: cached FIB results may be stale.
    RoutingChanged,
    /// Messages were lost; the caller's view is stale until it dumps again.
    Overflow,
}

fn parse_link(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => {}
        }
    }
    let flags = msg.header.flags;
    Some(Link {
        index: msg.header.index,
        name: name?,
        mac,
        running: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::Running),
    })
}

fn parse_address(msg: &AddressMessage) -> Option<Address> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's
    // on point-to-point links and equal to IFA_LOCAL elsewhere.
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => local = Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
            _ => {}
        }
    }
    Some(Address {
        index: msg.header.index,
        addr: local.or(address)?,
        prefix_len: msg.header.prefix_len,
        secondary: msg.header.flags.contains(AddressHeaderFlags::Secondary),
    })
}

/// The event a route message carries, if it is one this module tracks.
pub fn parse_event(msg: &RouteNetlinkMessage) -> Option<Event> {
    match msg {
        RouteNetlinkMessage::NewLink(m) => parse_link(m).map(Event::NewLink),
        RouteNetlinkMessage::DelLink(m) => Some(Event::DelLink(m.header.index)),
        RouteNetlinkMessage::NewAddress(m) => parse_address(m).map(Event::NewAddress),
        RouteNetlinkMessage::DelAddress(m) => parse_address(m).map(Event::DelAddress),
        RouteNetlinkMessage::NewRoute(_)
        | RouteNetlinkMessage::DelRoute(_)
        | RouteNetlinkMessage::NewNeighbour(_)
        | RouteNetlinkMessage::DelNeighbour(_) => Some(Event::RoutingChanged),
        _ => None,
    }
}

/// Every netlink message in one datagram.
fn split(datagram: &[u8]) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let len = msg.header.length as usize;
        if len == 0 {
            break;
        }
        // Messages are 4-byte aligned within a datagram.
        offset += (len + 3) & !3;
        messages.push(msg);
    }
    Ok(messages)
}

/// SO_RCVBUFFORCE (root) can exceed net.core.rmem_max, which is far too
/// small for a burst of VM starts; SO_RCVBUF is the fallback.
fn set_receive_buffer(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = i32::try_from(bytes).unwrap_or(i32::MAX);
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid socket and a pointer to an int of the right size.
        let ret = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                size_of::<i32>() as u32,
            )
        };
        if ret == 0 {
            return Ok(());
        }
    }
    Err(io::Error::last_os_error())
}

fn is_overflow(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ENOBUFS)
}

/// Changes to links, IPv4 addresses, routes and neighbours, as the kernel
/// announces them.
pub struct Monitor {
    socket: TokioSocket,
}

impl Monitor {
    pub fn subscribe() -> io::Result<Self> {
        Self::with_buffer(RECV_BUFFER)
    }

    /// Subscribes with a receive buffer of `bytes`: the kernel drops
    /// messages (and the next read reports an overflow) once it is full.
    pub fn with_buffer(bytes: usize) -> io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        socket.socket_mut().bind(&SocketAddr::new(
            0,
            RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_NEIGH,
        ))?;
        set_receive_buffer(socket.as_raw_fd(), bytes)?;
        Ok(Monitor { socket })
    }

    /// The events of the next datagram. An overflow is an event, not an
    /// error: the caller resyncs and carries on.
    pub async fn next(&mut self) -> io::Result<Vec<Event>> {
        match self.socket.recv_from_full().await {
            Ok((datagram, _)) => Ok(split(&datagram)?
                .iter()
                .filter_map(|m| match &m.payload {
                    NetlinkPayload::InnerMessage(inner) => parse_event(inner),
                    NetlinkPayload::Overrun(_) => Some(Event::Overflow),
                    _ => None,
                })
                .collect()),
            Err(err) if is_overflow(&err) => Ok(vec![Event::Overflow]),
            Err(err) => Err(err),
        }
    }
}

/// Every link and IPv4 address, from a fresh dump.
pub async fn dump() -> io::Result<(Vec<Link>, Vec<Address>)> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
    socket.socket_mut().bind_auto()?;
    socket.socket_mut().connect(&SocketAddr::new(0, 0))?;
    let mut links = Vec::new();
    let mut addresses = Vec::new();
    let link_request = RouteNetlinkMessage::GetLink(LinkMessage::default());
    for event in request_dump(&socket, link_request, 1).await? {
        if let Event::NewLink(link) = event {
            links.push(link);
        }
    }
    let mut addr_request = AddressMessage::default();
    addr_request.header.family = AddressFamily::Inet;
    let addr_request = RouteNetlinkMessage::GetAddress(addr_request);
    for event in request_dump(&socket, addr_request, 2).await? {
        if let Event::NewAddress(addr) = event {
            addresses.push(addr);
        }
    }
    Ok((links, addresses))
}

async fn request_dump(
    socket: &TokioSocket,
    request: RouteNetlinkMessage,
    sequence: u32,
) -> io::Result<Vec<Event>> {
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(request));
    msg.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    msg.header.sequence_number = sequence;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf).await?;
    let mut events = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().await?;
        for reply in split(&datagram)? {
            if reply.header.sequence_number != sequence {
                continue;
            }
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(events),
                NetlinkPayload::Error(err) => {
                    return Err(io::Error::other(format!("netlink dump failed: {err:?}")));
                }
                NetlinkPayload::InnerMessage(inner) => events.extend(parse_event(&inner)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::address::AddressHeaderFlags;

    use super::*;

    fn roundtrip(msg: RouteNetlinkMessage) -> Vec<Event> {
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        // Two messages in one datagram, as the kernel batches them.
        let mut datagram = buf.clone();
        datagram.extend_from_slice(&buf);
        split(&datagram)
            .unwrap()
            .iter()
            .filter_map(|m| match &m.payload {
                NetlinkPayload::InnerMessage(inner) => parse_event(inner),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn link_messages() {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.header.flags = LinkFlags::Up | LinkFlags::Running;
        msg.attributes.push(LinkAttribute::IfName("vif3.0".into()));
        msg.attributes.push(LinkAttribute::Address(vec![
            0xfe, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]));
        let events = roundtrip(RouteNetlinkMessage::NewLink(msg.clone()));
        let expected = Event::NewLink(Link {
            index: 7,
            name: "vif3.0".into(),
            mac: Some([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]),
            running: true,
        });
        assert_eq!(events, vec![expected.clone(), expected]);

        msg.header.flags = LinkFlags::Up;
        let Event::NewLink(link) = &roundtrip(RouteNetlinkMessage::NewLink(msg.clone()))[0] else {
            panic!("not a link");
        };
        assert!(!link.running, "up without carrier is not running");
        assert_eq!(
            roundtrip(RouteNetlinkMessage::DelLink(msg))[0],
            Event::DelLink(7)
        );
    }

    #[test]
    fn address_messages() {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.index = 3;
        msg.header.prefix_len = 24;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(
                192, 168, 1, 2,
            ))));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(
                192, 168, 1, 2,
            ))));
        let events = roundtrip(RouteNetlinkMessage::NewAddress(msg.clone()));
        assert_eq!(
            events[0],
            Event::NewAddress(Address {
                index: 3,
                addr: Ipv4Addr::new(192, 168, 1, 2),
                prefix_len: 24,
                secondary: false,
            })
        );
        msg.header.flags = AddressHeaderFlags::Secondary;
        let Event::DelAddress(addr) = roundtrip(RouteNetlinkMessage::DelAddress(msg))[0] else {
            panic!("not an address");
        };
        assert!(addr.secondary);
    }

    #[test]
    fn point_to_point_uses_the_local_address() {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = 32;
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(
                10, 0, 0, 2,
            ))));
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(
                10, 0, 0, 1,
            ))));
        let Event::NewAddress(addr) = roundtrip(RouteNetlinkMessage::NewAddress(msg))[0] else {
            panic!("not an address");
        };
        assert_eq!(addr.addr, Ipv4Addr::new(10, 0, 0, 1));
    }

    #[test]
    fn ipv6_addresses_are_ignored() {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet6;
        msg.attributes
            .push(AddressAttribute::Local("fe80::1".parse().unwrap()));
        assert!(roundtrip(RouteNetlinkMessage::NewAddress(msg)).is_empty());
    }
}
