//! Where this router sends a packet to an address: the kernel's own answer
//! to RTM_GETROUTE, as `ip route get` asks it, policy routing included.
//! The router-side check of QubesDB's targets rests on it.

use std::{io, net::Ipv4Addr};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The route to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Out of this interface.
    Interface(String),
    /// To this router itself.
    Local,
    /// Nowhere: no route, or one that drops it.
    Unroutable,
}

/// How the kernel routes a packet from this router to `dst`.
pub fn lookup(dst: Ipv4Addr) -> io::Result<Egress> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    request.header.destination_prefix_length = 32;
    request
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
    let mut msg = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetRoute(request)),
    );
    msg.header.flags = NLM_F_REQUEST;
    msg.header.sequence_number = 1;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => Ok(egress(&route)),
        // ENETUNREACH, EHOSTUNREACH: no route at all.
        NetlinkPayload::Error(err) if err.code.is_some() => Ok(Egress::Unroutable),
        other => Err(io::Error::other(format!(
            "unexpected answer to RTM_GETROUTE: {other:?}"
        ))),
    }
}

fn egress(route: &RouteMessage) -> Egress {
    match route.header.kind {
        RouteType::Local | RouteType::Broadcast => return Egress::Local,
        RouteType::Unicast => {}
        _ => return Egress::Unroutable,
    }
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    });
    match oif.and_then(crate::interfaces::name_of) {
        Some(name) => Egress::Interface(name),
        None => Egress::Unroutable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local_and_others_route_somewhere_or_nowhere() {
        assert_eq!(lookup(Ipv4Addr::LOCALHOST).unwrap(), Egress::Local);
        // Whatever this host's routes, the answer is one of the three.
        let _ = lookup(Ipv4Addr::new(192, 0, 2, 1)).unwrap();
    }
}
