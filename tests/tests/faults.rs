//! Faults: the daemon killed outright and restarted, the uplink flapping,
//! VMs restarting over and over, and two routers relaying one group on one
//! LAN with a path for a loop. The kernel's own object counts (bpftool)
//! show what leaked.

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    path::PathBuf,
    time::{Duration, Instant},
};

use forwarder::datapath::Role;
use forwarder_common::maps::PROTO_TCP;
use forwarder_tests::{
    daemon::{Forwarder, Router},
    kernel_objects::{self, Objects},
    netns::Netns,
    sockets::{EchoServer, TcpTicker},
    topology::*,
    wait::{until_stable, wait_until},
};

const OUTAGE: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(100);
const MAX_STALL: Duration = Duration::from_millis(500);
/// sys-net: uplink and vif2.0; sys-firewall: uplink, vif3.0 and vif4.0.
const QUBES_LINKS: usize = 5;

/// Packets the forward rule on `port`/tcp has translated in, from the pins.
fn tcp_packets_in(fwd: &Forwarder, port: u16) -> u64 {
    let tables = fwd.tables().expect("pinned maps");
    let installed = tables.installed().expect("rules");
    let (_, rule) = installed
        .get(&(PROTO_TCP, port))
        .expect("the localsend rule");
    tables
        .rule_counters(rule.slot)
        .expect("counters")
        .packets_in
}

fn no_forwarder_table(ns: &Netns) -> bool {
    !ns.sh("nft list tables").unwrap().contains("forwarder")
}

#[test]
fn a_killed_daemon_keeps_forwarding_and_its_successor_adopts_the_pins() {
    let idle: Objects = kernel_objects::settled().unwrap();
    let t = Topology::build(Offload::On).unwrap();
    let (mut sysnet, mut sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
    let running =
        kernel_objects::wait_links(idle.links + QUBES_LINKS, Duration::from_secs(5)).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let ticker =
        TcpTicker::start(&t.lan, SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT), TICK).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || ticker.echoed() >= 5),
        "the flow never got going"
    );

    let counted_before = tcp_packets_in(&sysnet, LOCALSEND_PORT);
    sysnet.kill_hard().unwrap();
    sysfw.kill_hard().unwrap();
    let killed = Instant::now();
    assert!(
        !sysnet.pins.contents().is_empty(),
        "sys-net's pins went with the process"
    );
    std::thread::sleep(OUTAGE);
    let outage_end = Instant::now();
    let counted_in_outage = tcp_packets_in(&sysnet, LOCALSEND_PORT);

    sysnet.respawn(&t.sysnet).unwrap();
    sysfw.respawn(&t.sysfw).unwrap();
    for fwd in [&sysnet, &sysfw] {
        fwd.wait_log(
            "adopted the uplink program's attachment",
            Duration::from_secs(20),
        )
        .unwrap();
    }
    let restarted = Instant::now();
    // The successors replaced the programs in the pinned links: the old
    // programs and the old process's unpinned maps are gone.
    kernel_objects::wait_released(running, Duration::from_secs(5)).unwrap();
    assert!(
        tcp_packets_in(&sysnet, LOCALSEND_PORT) >= counted_in_outage,
        "the restart reset the rule's counters"
    );
    let before_finish = ticker.echoed();
    assert!(
        wait_until(Duration::from_secs(3), || ticker.echoed()
            >= before_finish + 10),
        "the flow stopped after the restart"
    );
    let ticks = ticker.finish().unwrap();
    let in_outage = ticks.echoed_between(killed, outage_end);
    println!(
        "kill -9 of both daemons: {} messages, {in_outage} echoed during the {OUTAGE:?} outage, \
         restart took {:?}, longest gap {:?}, rule counter {counted_before} -> {counted_in_outage} during the outage",
        ticks.sent,
        restarted - outage_end,
        ticks.longest_gap()
    );
    assert!(
        ticks.missing().is_empty(),
        "messages lost or reordered: {:?}",
        ticks.missing()
    );
    assert!(
        ticks.longest_gap() < MAX_STALL,
        "the flow stalled for {:?}",
        ticks.longest_gap()
    );
    assert!(in_outage >= 20, "only {in_outage} echoes during the outage");
    assert!(
        counted_in_outage > counted_before,
        "the pinned programs did not count during the outage"
    );

    sysnet.stop().unwrap();
    sysfw.stop().unwrap();
    for ns in [&t.sysnet, &t.sysfw] {
        assert!(
            no_forwarder_table(ns),
            "the nftables table survived a clean stop in {}",
            ns.name()
        );
    }
    drop(t);
    kernel_objects::wait_released(idle, Duration::from_secs(5)).unwrap();
}

/// Where `fwd` pins its link for `role` on `dev` of `ns`.
fn link_pin(fwd: &Forwarder, role: Role, ns: &Netns, dev: &str) -> PathBuf {
    fwd.link_pin(role, ns.link(dev).unwrap().index)
}

/// Forwarding and relaying both ways work end to end.
fn everything_works(t: &Topology, tag: &str) {
    use forwarder_tests::sockets::{MulticastListener, tcp_echo, udp_echo};
    let to_app = SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT);
    {
        let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
        udp_echo(&t.lan, to_app, Duration::from_secs(3)).unwrap();
        tcp_echo(&t.lan, to_app, None, Duration::from_secs(3)).unwrap();
    }
    let at_lan = MulticastListener::start(&t.lan, LOCALSEND_GROUP, LOCALSEND_PORT).unwrap();
    let at_app = MulticastListener::start(&t.app, LOCALSEND_GROUP, LOCALSEND_PORT).unwrap();
    let interval = Duration::from_millis(50);
    let _from_app = forwarder_tests::topology::localsend_announcer(&t.app, tag, interval).unwrap();
    let _from_lan = forwarder_tests::topology::localsend_announcer(&t.lan, tag, interval).unwrap();
    assert!(
        at_lan
            .wait_from(SYSNET_LAN, tag, Duration::from_secs(3))
            .is_some(),
        "{tag}: app -> LAN relay"
    );
    assert!(
        at_app
            .wait_from(LAN_PEER, tag, Duration::from_secs(3))
            .is_some(),
        "{tag}: LAN -> app relay"
    );
}

#[test]
fn uplink_flaps_and_vm_restarts_leave_the_datapath_consistent_and_leak_nothing() {
    use forwarder_common::maps::UPLINK_UP;
    const FLAPS: usize = 50;
    const VM_RESTARTS: usize = 100;

    let idle = kernel_objects::settled().unwrap();
    let t = Topology::build(Offload::On).unwrap();
    let (mut sysnet, mut sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
    kernel_objects::wait_links(idle.links + QUBES_LINKS, Duration::from_secs(5)).unwrap();
    // Settled: the self-tests' programs and maps (a program array among
    // them) are released a while after the daemons attach.
    let running = kernel_objects::settled().unwrap();
    everything_works(&t, "before");
    let sysnet_pins = sysnet.link_pins();

    // Half the flaps are paced, each waited for both ways; the rest come
    // back to back, faster than the kernel reports carrier changes (its
    // linkwatch holds them for up to a second).
    let mut reactions = Vec::new();
    for flap in 0..FLAPS {
        for (state, up) in [("down", false), ("up", true)] {
            let at = Instant::now();
            t.sysnet
                .ip(&format!("link set {SYSNET_UPLINK} {state}"))
                .unwrap();
            if flap < FLAPS / 2 {
                assert!(
                    wait_until(Duration::from_secs(3), || (sysnet.uplink().flags
                        & UPLINK_UP
                        != 0)
                        == up),
                    "flap {flap}: the state map never showed the uplink {state}"
                );
                reactions.push((state, at.elapsed()));
            }
        }
    }
    assert!(
        wait_until(Duration::from_secs(3), || sysnet.uplink().flags & UPLINK_UP
            != 0),
        "the uplink never came back after the rapid flaps"
    );
    let slowest = |which: &str| {
        reactions
            .iter()
            .filter(|(s, _)| *s == which)
            .map(|(_, d)| *d)
            .max()
            .unwrap()
    };
    // Taking a link down removes its routes; DHCP would restore the default.
    t.sysnet
        .ip(&format!("route replace default via {LAN_GATEWAY}"))
        .unwrap();
    println!(
        "{FLAPS} uplink flaps: the state map showed down within {:?} and up within {:?} (carrier, via linkwatch)",
        slowest("down"),
        slowest("up")
    );
    assert_eq!(
        sysnet.link_pins(),
        sysnet_pins,
        "the flaps changed sys-net's attachments"
    );
    assert_eq!(
        kernel_objects::settled().unwrap(),
        running,
        "the flaps changed the kernel's objects"
    );
    everything_works(&t, "after-flaps");

    let counted = tcp_packets_in(&sysfw, LOCALSEND_PORT);
    let mut vif = "vif3.0".to_string();
    let mut slowest = Duration::ZERO;
    for restart in 0..VM_RESTARTS {
        let at = Instant::now();
        vif = t.restart_app_vif(&vif).unwrap();
        // Half are paced, each waited for; the rest come as fast as they can.
        if restart < VM_RESTARTS / 2 {
            let pin = link_pin(&sysfw, Role::Downstream, &t.sysfw, &vif);
            assert!(
                wait_until(Duration::from_secs(2), || sysfw.link_pins().contains(&pin)),
                "restart {restart}: {vif} was not attached"
            );
            slowest = slowest.max(at.elapsed());
        }
    }
    let expected_pins = {
        let mut pins = vec![
            link_pin(&sysfw, Role::Downstream, &t.sysfw, "vif4.0"),
            link_pin(&sysfw, Role::Downstream, &t.sysfw, &vif),
            link_pin(&sysfw, Role::Uplink, &t.sysfw, SYSFW_UPLINK),
        ];
        pins.sort();
        pins
    };
    assert!(
        wait_until(Duration::from_secs(5), || sysfw.link_pins()
            == expected_pins),
        "sys-firewall's link pins {:?}, expected {expected_pins:?}",
        sysfw.link_pins()
    );
    let held: BTreeSet<u32> = sysfw
        .tables()
        .unwrap()
        .downstream_macs()
        .unwrap()
        .into_keys()
        .collect();
    let live: BTreeSet<u32> = ["vif4.0", vif.as_str()]
        .iter()
        .map(|dev| t.sysfw.link(dev).unwrap().index)
        .collect();
    assert_eq!(held, live, "DOWNSTREAM_MACS holds interfaces that are gone");
    kernel_objects::wait_released(running, Duration::from_secs(5)).unwrap();
    println!(
        "{VM_RESTARTS} VM restarts: each paced one attached within {slowest:?}; kernel objects {running:?} before and after"
    );
    everything_works(&t, "after-restarts");
    assert!(
        tcp_packets_in(&sysfw, LOCALSEND_PORT) > counted,
        "the rule's counters went backwards or stopped"
    );
    for fwd in [&sysnet, &sysfw] {
        assert_eq!(
            fwd.failures().unwrap(),
            0,
            "rewrite or clone failures counted"
        );
    }

    sysnet.stop().unwrap();
    sysfw.stop().unwrap();
    drop(t);
    kernel_objects::wait_released(idle, Duration::from_secs(5)).unwrap();
}

/// How many copies of each announcement (by payload) a capture holds.
fn copies(frames: &[Vec<u8>], tag: &str) -> std::collections::BTreeMap<Vec<u8>, usize> {
    let mut out = std::collections::BTreeMap::new();
    for p in frames
        .iter()
        .filter_map(|f| forwarder_tests::packet::parse(f))
    {
        if p.daddr == LOCALSEND_GROUP && p.payload.starts_with(format!("{tag} ").as_bytes()) {
            *out.entry(p.payload).or_insert(0) += 1;
        }
    }
    out
}

#[test]
fn two_routers_relaying_one_group_on_one_lan_neither_loop_nor_amplify() {
    use std::net::Ipv4Addr;

    use forwarder_common::reason::Reason;
    use forwarder_tests::capture::Capture;

    /// Each sender's announcements, 2 s at one every 50 ms.
    const ANNOUNCEMENTS: u64 = 40;
    const VM: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 17);
    const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
    forwarder_tests::netns::sweep_leftovers();
    let idle = kernel_objects::settled().unwrap();
    // One LAN bridge and one VM-side bridge, both routers on both: a LAN
    // copy one router relays down reaches the other router's downstream
    // side, and hairpin ports hand every router its own frames back.
    let lan = Netns::new("lan").unwrap();
    let seg = Netns::new("seg").unwrap();
    let vm = Netns::new("vm").unwrap();
    let routers = [Netns::new("ra").unwrap(), Netns::new("rb").unwrap()];
    for (ns, bridge) in [(&lan, "br0"), (&seg, "br1")] {
        ns.ip(&format!("link add {bridge} type bridge mcast_snooping 0"))
            .unwrap();
        ns.ip(&format!("link set {bridge} up")).unwrap();
    }
    lan.ip(&format!("addr add {PEER}/24 dev br0")).unwrap();
    lan.ip("route add default via 192.168.50.1").unwrap();
    for (i, router) in routers.iter().enumerate() {
        for (side, ns, bridge) in [("up0", &lan, "br0"), ("down0", &seg, "br1")] {
            let port = format!("{side}r{i}");
            ns.ip(&format!(
                "link add {port} type veth peer name {side} netns {}",
                router.name()
            ))
            .unwrap();
            ns.ip(&format!("link set {port} master {bridge} up"))
                .unwrap();
            ns.sh(&format!("bridge link set dev {port} hairpin on"))
                .unwrap();
            router.ip(&format!("link set {side} up")).unwrap();
        }
        router
            .ip(&format!("addr add 192.168.50.{}/24 dev up0", i + 2))
            .unwrap();
        router
            .ip(&format!("addr add 10.50.0.{}/24 dev down0", i + 1))
            .unwrap();
        router.sysctl("net.ipv4.ip_forward=1").unwrap();
    }
    seg.ip(&format!(
        "link add port-vm type veth peer name eth0 netns {}",
        vm.name()
    ))
    .unwrap();
    seg.ip("link set port-vm master br1 up").unwrap();
    vm.ip("link set eth0 up").unwrap();
    vm.ip(&format!("addr add {VM}/24 dev eth0")).unwrap();
    vm.ip("route add default via 10.50.0.1").unwrap();

    let fwds: Vec<Forwarder> = routers
        .iter()
        .map(|r| {
            Forwarder::start(
                r,
                r.name(),
                &[
                    "--uplink",
                    "up0",
                    "--downstream",
                    "^down0$",
                    "--localsend",
                    &VM.to_string(),
                ],
            )
            .unwrap()
        })
        .collect();
    let at_lan = Capture::start(&lan, "br0").unwrap();
    let at_vm = Capture::start(&vm, "eth0").unwrap();
    let interval = Duration::from_millis(50);
    let from_vm = forwarder_tests::topology::localsend_announcer(&vm, "vm", interval).unwrap();
    let from_lan = forwarder_tests::topology::localsend_announcer(&lan, "lan", interval).unwrap();
    // (reflected, relay_not_target) per router: the guards against a loop.
    let guards = || {
        fwds.iter()
            .map(|f| {
                (
                    f.reason(Reason::Reflected).unwrap(),
                    f.reason(Reason::RelayNotTarget).unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(5), || guards()
            .iter()
            .all(|(reflected, not_target)| *reflected > 0 && *not_target > 0)),
        "the loop path was never exercised: (reflected, relay_not_target) {:?}",
        guards()
    );
    let sent = || {
        (
            from_vm.sent.load(std::sync::atomic::Ordering::Relaxed),
            from_lan.sent.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (vm, lan) = sent();
            vm >= ANNOUNCEMENTS && lan >= ANNOUNCEMENTS
        }),
        "the senders stalled at {:?}",
        sent()
    );
    let sent = sent();
    drop((from_vm, from_lan));
    // Once the senders stop, nothing may still be circulating.
    let settled = |capture: &Capture| {
        until_stable(Duration::from_secs(3), Duration::from_millis(300), || {
            capture.snapshot().len()
        })
        .1
    };
    assert!(
        settled(&at_lan) && settled(&at_vm),
        "frames kept coming after the senders stopped"
    );
    let (lan_frames, vm_frames) = (at_lan.finish(), at_vm.finish());

    let worst =
        |frames: &[Vec<u8>], tag: &str| copies(frames, tag).values().copied().max().unwrap_or(0);
    let relayed_twice = copies(&lan_frames, "vm")
        .values()
        .filter(|n| **n == 2)
        .count();
    println!(
        "two routers, one group, hairpin ports: {} + {} announcements sent; most copies of one announcement: \
         LAN {} of the VM's and {} of the LAN's, VM side {} of the VM's and {} of the LAN's; \
         {relayed_twice} VM announcements reached the LAN once per router; loop guards hit \
         (reflected, relay_not_target): {:?}",
        sent.0,
        sent.1,
        worst(&lan_frames, "vm"),
        worst(&lan_frames, "lan"),
        worst(&vm_frames, "vm"),
        worst(&vm_frames, "lan"),
        guards(),
    );
    // LAN: the peer's own datagram, and each router's copy of the VM's.
    assert_eq!(
        worst(&lan_frames, "lan"),
        1,
        "a LAN announcement came back to the LAN"
    );
    assert_eq!(
        worst(&lan_frames, "vm"),
        2,
        "the VM's announcements reached the LAN more than once per router"
    );
    // VM side: its own datagram plus each router's copy of the other's LAN
    // copy; each LAN announcement once per router.
    assert!(
        worst(&vm_frames, "vm") <= 3,
        "the VM's announcements were amplified on its segment"
    );
    assert_eq!(
        worst(&vm_frames, "lan"),
        2,
        "LAN announcements reached the VM more than once per router"
    );
    assert!(sent.1 > 0, "the LAN peer sent nothing");
    assert!(
        relayed_twice as u64 >= sent.0 / 2,
        "only {relayed_twice} of {} VM announcements were relayed by both",
        sent.0
    );

    for mut fwd in fwds {
        fwd.stop().unwrap();
    }
    drop((lan, seg, vm, routers));
    kernel_objects::wait_released(idle, Duration::from_secs(5)).unwrap();
}

/// The BPF ingress filters on `dev` in `ns`, as `tc` lists them.
fn tc_filters(ns: &Netns, dev: &str) -> Vec<String> {
    forwarder_tests::tc::ingress_filters(ns.name(), dev)
        .unwrap()
        .into_iter()
        .filter(|l| l.contains(" bpf "))
        .collect()
}

#[test]
fn clsact_filters_are_replaced_in_place_by_a_restart_not_doubled() {
    let t = Topology::build(Offload::On).unwrap();
    let mut sysnet =
        Forwarder::start_localsend(&t, Router::SysNet, &["--tc-hook", "clsact"]).unwrap();
    let _sysfw = Forwarder::start_localsend(&t, Router::SysFirewall, &[]).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    let filters = tc_filters(&t.sysnet, SYSNET_UPLINK);
    assert_eq!(filters.len(), 1, "{filters:?}");
    assert!(filters[0].contains("uplink_ingress"), "{filters:?}");
    let inspect = forwarder_tests::daemon::cli(
        &t.sysnet,
        &["inspect", "--json", "--pin-dir", &sysnet.pin_arg()],
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let ifaces = json["interfaces"].as_array().unwrap();
    assert!(
        ifaces
            .iter()
            .any(|i| i["name"] == SYSNET_UPLINK && i["hook"] == "clsact"),
        "inspect shows the clsact attachment: {ifaces:?}"
    );

    let ticker =
        TcpTicker::start(&t.lan, SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT), TICK).unwrap();
    assert!(wait_until(Duration::from_secs(5), || ticker.echoed() >= 3));
    sysnet.kill_hard().unwrap();
    let echoed = ticker.echoed();
    assert!(
        wait_until(Duration::from_secs(3), || ticker.echoed() > echoed + 3),
        "the filters forward with the daemon dead"
    );
    sysnet.respawn(&t.sysnet).unwrap();
    sysnet
        .wait_log(
            "adopted the uplink program's attachment",
            Duration::from_secs(20),
        )
        .unwrap();
    let filters = tc_filters(&t.sysnet, SYSNET_UPLINK);
    assert_eq!(
        filters.len(),
        1,
        "a second set after the restart: {filters:?}"
    );
    let echoed = ticker.echoed();
    assert!(wait_until(Duration::from_secs(3), || ticker.echoed() > echoed + 3));
    let ticks = ticker.finish().unwrap();
    assert!(ticks.missing().is_empty(), "{:?}", ticks.missing());
    assert!(
        ticks.longest_gap() <= MAX_STALL,
        "stalled {:?}",
        ticks.longest_gap()
    );
    sysnet.stop().unwrap();
    assert!(
        tc_filters(&t.sysnet, SYSNET_UPLINK).is_empty(),
        "a clean stop leaves no filter"
    );
    assert!(tc_filters(&t.sysnet, "vif2.0").is_empty());
}
