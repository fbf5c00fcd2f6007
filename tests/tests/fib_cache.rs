//! The datapath's FIB cache follows every change that can change a lookup's
//! answer. For each kind of change in sys-firewall (a route, a neighbour,
//! a policy rule, a nexthop object, forwarding switched off by sysctl, a
//! route's MTU): warm the cache with a forwarded packet, make the change,
//! wait until the daemon has seen it (the FIB generation moves), and check
//! that the next packet follows the kernel's new answer; then undo it and
//! check forwarding is back.

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use forwarder_common::reason::Reason;
use forwarder_tests::{
    capture::Capture,
    daemon::Forwarder,
    packet::{self, Mac},
    sockets::{EchoServer, udp_echo},
    topology::*,
    wait::wait_until,
};

const WAIT: Duration = Duration::from_secs(5);

fn uplink_port() -> SocketAddrV4 {
    SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT)
}

fn forwarded(t: &Topology) -> bool {
    udp_echo(&t.lan, uplink_port(), Duration::from_millis(800)).is_ok()
}

/// Runs `change` in sys-firewall and waits until the daemon has bumped the
/// FIB generation for it.
fn apply(t: &Topology, sysfw: &Forwarder, change: &str) -> Result<()> {
    let before = sysfw.tables()?.fib_generation()?;
    t.sysfw.sh(change)?;
    if !wait_until(WAIT, || {
        sysfw
            .tables()
            .and_then(|t| t.fib_generation())
            .is_ok_and(|g| g != before)
    }) {
        bail!("the daemon never saw `{change}`");
    }
    Ok(())
}

/// A datagram of `len` bytes from the LAN to the forwarded port.
fn send(t: &Topology, len: usize) -> Result<()> {
    t.lan.run(|| -> Result<()> {
        UdpSocket::bind("0.0.0.0:0")?.send_to(&vec![b'x'; len], uplink_port())?;
        Ok(())
    })
}

/// What the next packet after a change must show.
#[derive(Clone, Copy)]
enum Expect {
    /// It is left to the stack, and sys-firewall counts why.
    Reason(Reason),
    /// It is forwarded to the app's link with this destination MAC.
    DstMac(Mac),
}

/// One case: with `change` applied, the next `len`-byte datagram shows
/// `expect`; with `undo`, forwarding is back.
fn case(
    t: &Topology,
    sysfw: &Forwarder,
    change: &str,
    undo: &str,
    len: usize,
    expect: Expect,
) -> Result<()> {
    ensure!(forwarded(t), "not forwarded before `{change}`");
    let app_capture = Capture::start(&t.app, "eth0")?;
    apply(t, sysfw, change)?;
    let followed = next_packet_follows(t, sysfw, change, len, expect, &app_capture);
    apply(t, sysfw, undo)?;
    followed?;
    ensure!(
        wait_until(WAIT, || forwarded(t)),
        "not forwarded again after `{undo}`"
    );
    Ok(())
}

fn next_packet_follows(
    t: &Topology,
    sysfw: &Forwarder,
    change: &str,
    len: usize,
    expect: Expect,
    app_capture: &Capture,
) -> Result<()> {
    match expect {
        Expect::Reason(reason) => {
            let before = sysfw.reason(reason)?;
            send(t, len)?;
            ensure!(
                wait_until(WAIT, || sysfw.reason(reason).unwrap_or(0) > before),
                "after `{change}`, the next packet did not meet {}",
                reason.name()
            );
        }
        Expect::DstMac(mac) => {
            send(t, len)?;
            ensure!(
                wait_until(WAIT, || app_capture
                    .snapshot()
                    .iter()
                    .filter_map(|f| packet::parse(f))
                    .any(|p| p.dport == LOCALSEND_PORT && p.dst_mac == mac)),
                "after `{change}`, the next packet was not sent to the new neighbour"
            );
        }
    }
    Ok(())
}

#[test]
fn every_change_that_can_change_a_lookup_reaches_the_next_packet() {
    let t = Topology::build(Offload::On).unwrap();
    let (_sysnet, sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let route = format!("{APP}/32 dev vif3.0 metric 32752");
    let app_mac = t.app.link("eth0").unwrap().mac;
    let app_mac = forwarder::interfaces::mac_text(app_mac);
    // Set-up the changes below switch between; each set-up step is itself
    // an event, so the cache starts over before the first case.
    t.sysfw
        .sh(&format!(
            "ip route add unreachable {APP}/32 table 100 && ip nexthop add id 17 dev vif3.0 && ip neigh replace {APP} lladdr {app_mac} dev vif3.0 nud permanent"
        ))
        .unwrap();
    let moved: Mac = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];
    let cases: [(&str, String, String, usize, Expect); 6] = [
        (
            "a route",
            format!("ip route replace blackhole {APP}/32 metric 32752"),
            format!("ip route replace {route}"),
            64,
            Expect::Reason(Reason::FibNoRoute),
        ),
        (
            "a neighbour",
            format!(
                "ip neigh replace {APP} lladdr {} dev vif3.0 nud permanent",
                forwarder::interfaces::mac_text(moved)
            ),
            format!("ip neigh replace {APP} lladdr {app_mac} dev vif3.0 nud permanent"),
            64,
            Expect::DstMac(moved),
        ),
        (
            "a policy rule",
            format!("ip rule add to {APP} lookup 100 pref 100"),
            "ip rule del pref 100".into(),
            64,
            Expect::Reason(Reason::FibNoRoute),
        ),
        (
            "a nexthop object",
            format!(
                "ip route replace {APP}/32 nhid 17 metric 32752; ip nexthop replace id 17 blackhole"
            ),
            format!("ip nexthop replace id 17 dev vif3.0; ip route replace {route}"),
            64,
            Expect::Reason(Reason::FibNoRoute),
        ),
        (
            "forwarding switched off",
            "sysctl -qw net.ipv4.conf.all.forwarding=0".into(),
            "sysctl -qw net.ipv4.conf.all.forwarding=1".into(),
            64,
            Expect::Reason(Reason::FibFwdDisabled),
        ),
        (
            "a route's MTU",
            format!("ip route replace {route} mtu 1000"),
            format!("ip route replace {route}"),
            1200,
            Expect::Reason(Reason::FibFragNeeded),
        ),
    ];
    let mut failed = Vec::new();
    for (what, change, undo, len, expect) in &cases {
        match case(&t, &sysfw, change, undo, *len, *expect) {
            Ok(()) => println!("  pass  {what}: the next packet followed it"),
            Err(err) => {
                println!("  FAIL  {what}: {err:#}");
                failed.push(*what);
            }
        }
    }
    assert!(failed.is_empty(), "the cache outlived: {failed:?}");
}
