//! LocalSend discovery across both routers: the multicast relay on the
//! Qubes-like topology, for the forwarder and for the seed's nftables recipe
//! (dup plus the dispatcher-maintained SNAT), checksum offload on and off.

use forwarder::datapath::Role;
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use forwarder_common::reason::Reason;
use forwarder_tests::{
    capture::{self, Capture},
    checks::Checks,
    daemon::Forwarder,
    netlink_watch::AddressWatch,
    netns::Netns,
    sockets::{Announcer, MulticastListener},
    topology::*,
    wait::wait_until,
};

const NEW_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 3);
const WAIT: Duration = Duration::from_secs(3);
const VIF_RESTARTS: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Forwarder,
    SeedRecipe,
}

fn announce(ns: &Netns, tag: &str) -> Result<Announcer> {
    forwarder_tests::topology::localsend_announcer(ns, tag, Duration::from_millis(20))
}

/// A VM announcement must reach the LAN from sys-net's current address.
fn vm_to_lan(t: &Topology, tag: &str, expected_source: Ipv4Addr) -> Result<()> {
    let listener = MulticastListener::start(&t.lan, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let _announcer = announce(&t.app, tag)?;
    listener
        .wait_from(expected_source, tag, WAIT)
        .ok_or_else(|| {
            anyhow!("no announcement tagged {tag:?} from {expected_source} on the LAN")
        })?;
    let foreign = listener.senders_other_than(expected_source);
    ensure!(
        foreign.is_empty(),
        "announcements from other sources: {foreign:?}"
    );
    Ok(())
}

/// A LAN announcement must reach the app with the LAN peer's source.
fn lan_to_vm(t: &Topology, tag: &str) -> Result<()> {
    let listener = MulticastListener::start(&t.app, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let _announcer = announce(&t.lan, tag)?;
    listener
        .wait_from(LAN_PEER, tag, WAIT)
        .map(drop)
        .ok_or_else(|| anyhow!("no LAN announcement tagged {tag:?} reached the app"))
}

fn set_lan_address(t: &Topology, old: Ipv4Addr, new: Ipv4Addr) -> Result<()> {
    t.sysnet
        .ip(&format!("addr del {old}/24 dev {SYSNET_UPLINK}"))?;
    t.sysnet
        .ip(&format!("addr add {new}/24 dev {SYSNET_UPLINK}"))?;
    t.sysnet
        .ip(&format!("route replace default via {LAN_GATEWAY}"))?;
    Ok(())
}

/// Deletes sys-net's LAN address, adds another, and measures from the
/// rtnetlink event to the first announcement relayed with the new source
/// while the app announces every millisecond.
fn address_change(t: &Topology) -> Result<String> {
    let listener = MulticastListener::start(&t.lan, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let _announcer = Announcer::start(
        &t.app,
        "renumber",
        LOCALSEND_GROUP,
        LOCALSEND_PORT,
        1,
        Duration::from_millis(1),
    )?;
    listener
        .wait_from(SYSNET_LAN, "renumber", WAIT)
        .context("no announcement before the change")?;
    let watch = AddressWatch::start(&t.sysnet)?;
    set_lan_address(t, SYSNET_LAN, NEW_LAN_ADDR)?;
    let first = listener.wait_from(NEW_LAN_ADDR, "renumber", Duration::from_secs(10));
    let event = watch
        .added_at(NEW_LAN_ADDR)
        .context("no rtnetlink event for the new address")?;
    let result = match first {
        Some(first) => {
            let delay = first.at.saturating_duration_since(event);
            let stale = listener
                .received()
                .iter()
                .filter(|r| r.from.ip() == SYSNET_LAN && r.at > first.at)
                .count();
            ensure!(
                stale == 0,
                "{stale} announcements with the old source after the first new one"
            );
            Ok(format!(
                "address change to first relayed announcement: {:.3} ms",
                delay.as_secs_f64() * 1e3
            ))
        }
        None => Err(anyhow!(
            "no announcement with the new source {NEW_LAN_ADDR} within 10 s"
        )),
    };
    set_lan_address(t, NEW_LAN_ADDR, SYSNET_LAN)?;
    result
}

/// While the uplink is down nothing may be relayed, and nothing sent then
/// may surface once it is back.
fn uplink_down(t: &Topology, sysnet: Option<&Forwarder>) -> Result<String> {
    let listener = MulticastListener::start(&t.lan, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let relayed_before = match sysnet {
        Some(fwd) => Some(fwd.relayed_up()?),
        None => None,
    };
    let no_addr_before = sysnet
        .map(|f| f.reason(Reason::NoUplinkAddress))
        .transpose()?;
    t.sysnet.ip(&format!("link set {SYSNET_UPLINK} down"))?;
    {
        let announcer = announce(&t.app, "while-down")?;
        let sent = || announcer.sent.load(std::sync::atomic::Ordering::Relaxed);
        ensure!(
            wait_until(WAIT, || sent() >= 20),
            "the app could not announce"
        );
    }
    if let (Some(fwd), Some(before)) = (sysnet, relayed_before) {
        let after = fwd.relayed_up()?;
        ensure!(
            after == before,
            "{} copies relayed toward a down uplink",
            after - before
        );
        let no_addr = fwd.reason(Reason::NoUplinkAddress)?;
        ensure!(
            no_addr > no_addr_before.unwrap_or(0),
            "no_uplink_address not counted"
        );
    }
    t.sysnet.ip(&format!("link set {SYSNET_UPLINK} up"))?;
    if let Some(fwd) = sysnet {
        ensure!(
            wait_until(WAIT, || fwd.uplink().usable()),
            "the forwarder did not see the uplink come back"
        );
    }
    // Announcements are delivered in order: once a fresh one arrives, any
    // copy held back while the link was down would have arrived before it.
    let _fresh = announce(&t.app, "after-up")?;
    listener
        .wait_from(SYSNET_LAN, "after-up", Duration::from_secs(5))
        .context("no announcement after the uplink came back")?;
    let leaked = listener
        .received()
        .iter()
        .filter(|r| r.payload.starts_with(b"while-down"))
        .count();
    ensure!(
        leaked == 0,
        "{leaked} announcements from while the uplink was down reached the LAN"
    );
    Ok(String::new())
}

/// Qubes restarts a VM behind a new vif name and ifindex; both directions
/// must keep working every time.
fn vif_restarts(t: &Topology, sysfw: Option<&Forwarder>) -> Result<String> {
    let mut vif = "vif3.0".to_string();
    let mut slowest = Duration::ZERO;
    for cycle in 0..VIF_RESTARTS {
        vif = t.restart_app_vif(&vif)?;
        let created = Instant::now();
        if let Some(fwd) = sysfw {
            let index = t.sysfw.link(&vif)?.index;
            let pin = fwd.link_pin(Role::Downstream, index);
            ensure!(
                wait_until(Duration::from_millis(100), || pin.exists()),
                "cycle {cycle}: {vif} not attached within 100 ms"
            );
            slowest = slowest.max(created.elapsed());
        }
        vm_to_lan(t, &format!("cycle-{cycle}-up"), SYSNET_LAN)
            .with_context(|| format!("cycle {cycle}, VM to LAN"))?;
        lan_to_vm(t, &format!("cycle-{cycle}-down"))
            .with_context(|| format!("cycle {cycle}, LAN to VM"))?;
    }
    Ok(match sysfw {
        Some(_) => format!(
            "slowest attach {:.1} ms after the vif appeared",
            slowest.as_secs_f64() * 1e3
        ),
        None => String::new(),
    })
}

fn scenario(contender: Contender, offload: Offload) -> Checks {
    let t = Topology::build(offload).expect("topology");
    let mut checks = Checks::default();
    let (forwarders, _recipe) = match contender {
        Contender::Forwarder => {
            let (sysnet, sysfw) = Forwarder::start_localsend_routers(&t).unwrap();
            (Some((sysnet, sysfw)), None)
        }
        Contender::SeedRecipe => (None, Some(t.install_seed_recipe().expect("seed recipe"))),
    };
    let (sysnet, sysfw) = match &forwarders {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    let capture = Capture::start(&t.lan, "eth0").expect("capture");
    checks.add_ok(
        "a VM announcement (TTL 1) reaches the LAN from sys-net's address",
        vm_to_lan(&t, "hello", SYSNET_LAN),
    );
    checks.add_ok(
        "a LAN announcement reaches the app with the peer's source",
        lan_to_vm(&t, "hello"),
    );
    checks.add(
        "after sys-net is renumbered, relayed announcements carry the new address",
        address_change(&t),
    );
    checks.add(
        "with the uplink down nothing is relayed or leaks later",
        uplink_down(&t, sysnet),
    );
    checks.add(
        "20 restarts of the app's vif under new names keep both directions working",
        vif_restarts(&t, sysfw),
    );

    let frames = capture.finish();
    checks.add_ok(
        "no internal address leaves the uplink",
        capture::ensure_no_internal(&frames, |a| a.octets()[0] == 10),
    );
    checks.add(
        "receivers counted no checksum errors",
        t.ensure_no_checksum_errors().map(|()| String::new()),
    );
    checks
}

#[test]
fn forwarder_relays_with_checksum_offload() {
    scenario(Contender::Forwarder, Offload::On).assert_all_pass("forwarder, checksum offload on");
}

#[test]
fn forwarder_relays_without_checksum_offload() {
    scenario(Contender::Forwarder, Offload::Off).assert_all_pass("forwarder, checksum offload off");
}

/// The baseline, reported check by check. The brief's claims about it are
/// asserted: it relays VM announcements (with the dispatcher's address) but
/// cannot deliver a LAN announcement to the VM at all.
#[test]
fn seed_recipe_relay_baseline() {
    for offload in [Offload::On, Offload::Off] {
        let checks = scenario(Contender::SeedRecipe, offload);
        let failed = checks.report(&format!("seed recipe, checksum offload {offload:?}"));
        assert!(
            !failed.contains(&"a VM announcement (TTL 1) reaches the LAN from sys-net's address"),
            "the baseline must relay VM announcements, or the comparison means nothing"
        );
        assert!(
            failed.contains(&"a LAN announcement reaches the app with the peer's source"),
            "the seed recipe was expected not to deliver LAN announcements"
        );
    }
}
