//! The uplink state the daemon keeps from rtnetlink: waiting for a missing
//! uplink, following address, MAC and link changes and a recreated link,
//! rejoining the relay groups, and resyncing after the kernel dropped
//! events.

use forwarder::datapath::Role;
use std::{net::Ipv4Addr, process::Command, time::Duration};

use forwarder::netlink::{Event, Monitor};
use forwarder_common::maps::{UPLINK_HAS_ADDR, UPLINK_UP, UplinkState};
use forwarder_tests::{
    daemon::Forwarder,
    netns::{self, Netns},
    wait::wait_until,
};

const WAIT: Duration = Duration::from_secs(5);

fn router() -> Netns {
    netns::sweep_leftovers();
    let ns = Netns::new("state").unwrap();
    ns.sysctl("net.ipv4.ip_forward=1").unwrap();
    ns
}

fn add_uplink(ns: &Netns) {
    ns.ip("link add eth0 type veth peer name peer0").unwrap();
    ns.ip("link set peer0 up").unwrap();
    ns.ip("link set eth0 up").unwrap();
}

fn wait_state(fwd: &Forwarder, what: &str, pred: impl Fn(&UplinkState) -> bool) {
    assert!(
        wait_until(WAIT, || pred(&fwd.uplink())),
        "{what}: state is {:?}",
        fwd.uplink()
    );
}

fn wire(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// Groups the namespace's IPv4 stack has joined on `dev` (/proc/net/igmp).
fn igmp_groups(ns: &Netns, dev: &str) -> Vec<Ipv4Addr> {
    let text = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/igmp"))
        .unwrap();
    let mut groups = Vec::new();
    let mut in_dev = false;
    for line in text.lines().skip(1) {
        if !line.starts_with('\t') {
            in_dev = line.split_whitespace().nth(1) == Some(dev);
        } else if in_dev
            && let Some(hex) = line.split_whitespace().next()
            && let Ok(v) = u32::from_str_radix(hex, 16)
        {
            // The kernel prints the address as a host-order word.
            groups.push(Ipv4Addr::from(v.to_le_bytes()));
        }
    }
    groups
}

#[test]
fn a_missing_uplink_and_address_are_waited_for() {
    let ns = router();
    let mut fwd = Forwarder::spawn(
        &ns,
        "waiting",
        &["--uplink", "eth0", "--forward", "tcp:80=10.0.0.9"],
    )
    .unwrap();
    fwd.wait_log("waiting for it to appear", WAIT).unwrap();
    assert!(fwd.running(), "the daemon must wait, not exit");
    add_uplink(&ns);
    wait_state(&fwd, "uplink appeared without an address", |s| {
        s.ifindex != 0 && s.flags & UPLINK_UP != 0 && s.flags & UPLINK_HAS_ADDR == 0
    });
    assert!(fwd.running());
    ns.ip("addr add 192.168.5.2/24 dev eth0").unwrap();
    fwd.wait_ready(WAIT).unwrap();
    assert_eq!(fwd.uplink().addr, wire([192, 168, 5, 2]));
}

#[test]
fn the_state_map_follows_address_mac_and_link_changes() {
    let ns = router();
    add_uplink(&ns);
    ns.ip("addr add 192.168.5.2/24 dev eth0").unwrap();
    let fwd = Forwarder::start(
        &ns,
        "follow",
        &["--uplink", "eth0", "--localsend", "10.137.0.5"],
    )
    .unwrap();
    assert!(
        igmp_groups(&ns, "eth0").contains(&Ipv4Addr::new(224, 0, 0, 167)),
        "relay group joined"
    );

    ns.ip("link set eth0 address 02:aa:bb:cc:dd:01").unwrap();
    wait_state(&fwd, "MAC change", |s| {
        s.mac == [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01]
    });

    ns.ip("link set eth0 down").unwrap();
    wait_state(&fwd, "link down", |s| {
        s.flags & UPLINK_UP == 0 && !s.usable()
    });
    ns.ip("link set eth0 up").unwrap();
    wait_state(&fwd, "link up", |s| s.usable());

    ns.ip("addr add 192.168.5.3/24 dev eth0").unwrap();
    ns.ip("addr del 192.168.5.2/24 dev eth0").unwrap();
    // Without promote_secondaries the kernel removes the secondary with the
    // primary; either way the state must end up with no stale address.
    wait_state(&fwd, "primary deleted", |s| {
        s.addr != wire([192, 168, 5, 2])
    });
    ns.ip("addr flush dev eth0").unwrap();
    wait_state(&fwd, "no address", |s| s.flags & UPLINK_HAS_ADDR == 0);
    ns.ip("addr add 10.20.30.40/16 dev eth0").unwrap();
    wait_state(&fwd, "new DHCP address", |s| {
        s.addr == wire([10, 20, 30, 40]) && s.prefix_len == 16
    });

    let old = fwd.uplink().ifindex;
    ns.ip("link del eth0").unwrap();
    wait_state(&fwd, "uplink gone", |s| s.ifindex == 0);
    add_uplink(&ns);
    ns.ip("addr add 10.20.30.40/16 dev eth0").unwrap();
    wait_state(&fwd, "uplink recreated", |s| s.ifindex != old && s.usable());
    assert!(
        wait_until(WAIT, || igmp_groups(&ns, "eth0")
            .contains(&Ipv4Addr::new(224, 0, 0, 167))),
        "relay group rejoined on the recreated uplink"
    );
    let pin = fwd.link_pin(Role::Uplink, fwd.uplink().ifindex);
    assert!(
        wait_until(WAIT, || pin.exists()),
        "uplink program attached to the new link"
    );
}

#[test]
fn an_overflowing_event_stream_is_reported() {
    let ns = router();
    ns.ip("link add dummy0 type veth peer name dummy1").unwrap();
    let overflowed = ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut monitor = Monitor::with_buffer(4096).unwrap();
            let batch: String = (0..500)
                .map(|i| format!("addr add 10.9.{}.{}/32 dev dummy0\n", i / 250, i % 250 + 1))
                .collect();
            let path = std::env::temp_dir().join(format!("{}-batch", std::process::id()));
            std::fs::write(&path, batch).unwrap();
            let status = Command::new("ip")
                .args(["-batch"])
                .arg(&path)
                .status()
                .unwrap();
            let _ = std::fs::remove_file(&path);
            assert!(status.success());
            for _ in 0..1000 {
                match tokio::time::timeout(Duration::from_secs(1), monitor.next()).await {
                    Ok(Ok(events)) if events.contains(&Event::Overflow) => return true,
                    Ok(Ok(_)) => continue,
                    _ => return false,
                }
            }
            false
        })
    });
    assert!(
        overflowed,
        "500 events into a 4 KiB buffer must overflow and be reported"
    );
}

#[test]
fn the_daemon_resyncs_after_an_overflow() {
    let ns = router();
    add_uplink(&ns);
    ns.ip("addr add 192.168.5.2/24 dev eth0").unwrap();
    ns.ip("link add dummy0 type veth peer name dummy1").unwrap();
    let fwd = Forwarder::start(
        &ns,
        "resync",
        &["--uplink", "eth0", "--forward", "tcp:80=10.0.0.9"],
    )
    .unwrap();
    let pid = fwd.pid().unwrap();
    // Freeze the daemon, bury the uplink's renumbering in an event flood far
    // larger than its socket buffer, then let it run.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let mut batch =
        String::from("addr del 192.168.5.2/24 dev eth0\naddr add 192.168.6.2/24 dev eth0\n");
    for i in 0..12_000u32 {
        batch += &format!(
            "addr add 10.{}.{}.{}/32 dev dummy0\n",
            100 + i / 62_500,
            (i / 250) % 250,
            i % 250 + 1
        );
    }
    let path = std::env::temp_dir().join(format!("{}-flood", std::process::id()));
    std::fs::write(&path, batch).unwrap();
    let flooded = ns.command("ip").args(["-batch"]).arg(&path).status();
    let _ = std::fs::remove_file(&path);
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    assert!(flooded.unwrap().success());
    fwd.wait_log("overflowed; resyncing", Duration::from_secs(20))
        .unwrap();
    wait_state(&fwd, "renumbered during the flood", |s| {
        s.addr == wire([192, 168, 6, 2])
    });
}
