//! rtnetlink: the links and IPv4 addresses of this network namespace, as a
//! dump and as a stream of changes, and every other change that can change
//! a FIB lookup's answer (routes, neighbours, policy rules, nexthop objects,
//! netconf such as forwarding). A stream that overflowed (the kernel
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
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType},
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};

/// The rtnetlink groups (RTNLGRP_*) followed.
const GROUPS: &[u32] = &[
    1,  // RTNLGRP_LINK
    3,  // RTNLGRP_NEIGH
    5,  // RTNLGRP_IPV4_IFADDR
    7,  // RTNLGRP_IPV4_ROUTE
    8,  // RTNLGRP_IPV4_RULE
    24, // RTNLGRP_IPV4_NETCONF
    32, // RTNLGRP_NEXTHOP
];

/// Message types (RTM_*) whose only meaning here is "FIB answers may have
/// changed": neighbours, rules, netconf, nexthops.
const ROUTING_TYPES: &[u16] = &[28, 29, 32, 33, 80, 81, 104, 105];
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_DELLINK: u16 = 17;
const NLMSG_OVERRUN: u16 = 4;
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
    /// A neighbour, policy rule, nexthop or netconf setting changed: cached
    /// FIB results may be stale.
    RoutingChanged,
    /// A route changed: cached FIB results and route MTUs may be stale.
    RoutesChanged,
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

/// The events of one datagram of the change stream. Messages are told
/// apart by their header's type first: only links and addresses are
/// decoded, so a message the decoder does not know (a nexthop, a netconf
/// change) cannot break the stream. One that should decode and does not is
/// reported as an overflow, which makes the caller dump afresh.
pub fn events(datagram: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut offset = 0;
    while offset + 16 <= datagram.len() {
        let header = &datagram[offset..];
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        if len < 16 || offset + len > datagram.len() {
            events.push(Event::Overflow);
            break;
        }
        let message = &datagram[offset..offset + len];
        match kind {
            RTM_NEWLINK | RTM_DELLINK | RTM_NEWADDR | RTM_DELADDR => {
                match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
                    Ok(NetlinkMessage {
                        payload: NetlinkPayload::InnerMessage(inner),
                        ..
                    }) => events.extend(parse_event(&inner)),
                    _ => events.push(Event::Overflow),
                }
            }
            NLMSG_OVERRUN => events.push(Event::Overflow),
            RTM_NEWROUTE | RTM_DELROUTE => events.push(Event::RoutesChanged),
            kind if ROUTING_TYPES.contains(&kind) => events.push(Event::RoutingChanged),
            _ => {}
        }
        offset += (len + 3) & !3;
    }
    events
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

/// Changes to links, IPv4 addresses and everything else FIB lookups
/// depend on, as the kernel announces them.
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
        socket.socket_mut().bind(&SocketAddr::new(0, 0))?;
        for group in GROUPS {
            socket.socket_mut().add_membership(*group)?;
        }
        set_receive_buffer(socket.as_raw_fd(), bytes)?;
        Ok(Monitor { socket })
    }

    /// The events of the next datagram. An overflow is an event, not an
    /// error: the caller resyncs and carries on.
    pub async fn next(&mut self) -> io::Result<Vec<Event>> {
        match self.socket.recv_from_full().await {
            Ok((datagram, _)) => Ok(events(&datagram)),
            Err(err) if is_overflow(&err) => Ok(vec![Event::Overflow]),
            Err(err) => Err(err),
        }
    }
}

/// An IPv4 unicast route, of any table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    /// The interface it leaves by, when it names one.
    pub oif: Option<u32>,
    /// The MTU it sets, when it sets one.
    pub mtu: Option<u32>,
}

/// An IPv4 route that sets its own MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteMtu {
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: u32,
}

impl Route {
    pub fn mtu(&self) -> Option<RouteMtu> {
        Some(RouteMtu {
            dst: self.dst,
            prefix_len: self.prefix_len,
            mtu: self.mtu?,
        })
    }
}

fn parse_route(msg: &RouteMessage) -> Option<Route> {
    if msg.header.address_family != AddressFamily::Inet || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut route = Route {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix_len: msg.header.destination_prefix_length,
        oif: None,
        mtu: None,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => route.dst = *a,
            RouteAttribute::Oif(index) => route.oif = Some(*index),
            RouteAttribute::Metrics(metrics) => {
                route.mtu = metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(mtu) if *mtu > 0 => Some(*mtu),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Some(route)
}

/// Every IPv4 unicast route, of any table.
pub async fn routes() -> io::Result<Vec<Route>> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
    socket.socket_mut().bind_auto()?;
    socket.socket_mut().connect(&SocketAddr::new(0, 0))?;
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    let mut routes = Vec::new();
    request_dump_with(
        &socket,
        RouteNetlinkMessage::GetRoute(request),
        3,
        |inner| {
            if let RouteNetlinkMessage::NewRoute(route) = inner {
                routes.extend(parse_route(route));
            }
        },
    )
    .await?;
    Ok(routes)
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
    let mut events = Vec::new();
    request_dump_with(socket, request, sequence, |inner| {
        events.extend(parse_event(inner))
    })
    .await?;
    Ok(events)
}

/// Sends a dump request and hands every message of the answer to `each`.
async fn request_dump_with(
    socket: &TokioSocket,
    request: RouteNetlinkMessage,
    sequence: u32,
    mut each: impl FnMut(&RouteNetlinkMessage),
) -> io::Result<()> {
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(request));
    msg.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    msg.header.sequence_number = sequence;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf).await?;
    loop {
        let (datagram, _) = socket.recv_from_full().await?;
        for reply in split(&datagram)? {
            if reply.header.sequence_number != sequence {
                continue;
            }
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(err) => {
                    return Err(io::Error::other(format!("netlink dump failed: {err:?}")));
                }
                NetlinkPayload::InnerMessage(inner) => each(&inner),
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
        events(&datagram)
    }

    /// A message of `kind` with a body this module never decodes.
    fn raw(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = 16 + body.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(body);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn rules_nexthops_and_netconf_invalidate_routes_without_being_decoded() {
        let mut datagram = Vec::new();
        for kind in [32, 33, 104, 105, 80, 28] {
            datagram.extend(raw(kind, &[0xff; 7]));
        }
        datagram.extend(raw(24, &[0xff; 7]));
        datagram.extend(raw(3, &[]));
        let mut expected = vec![Event::RoutingChanged; 6];
        expected.push(Event::RoutesChanged);
        assert_eq!(events(&datagram), expected, "NLMSG_DONE is ignored");
        let mut truncated = raw(104, &[0; 8]);
        truncated.truncate(20);
        assert_eq!(super::events(&truncated), vec![Event::Overflow]);
        let mut garbage_link = raw(16, &[0xff; 3]);
        garbage_link.truncate(19);
        garbage_link[0] = 19;
        assert_eq!(super::events(&garbage_link), vec![Event::Overflow]);
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
