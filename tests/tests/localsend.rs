//! End to end with a LocalSend implementation nobody on this project wrote:
//! localsendd in the app VM and on the LAN, the LAN one started after the
//! app's startup announcements are over (the phone opened later). Each must
//! discover the other by alias, and a file must go each way.

use std::time::{Duration, Instant};

use forwarder_tests::{daemon::Forwarder, localsend::Peer, topology::*, wait::wait_until};

const APP_ALIAS: &str = "qubes-app";
const LAN_ALIAS: &str = "lan-phone";

#[test]
fn localsend_peers_discover_each_other_and_exchange_files_through_the_forwarder() {
    let t = Topology::build(Offload::On).expect("topology");
    let (sysnet, _sysfw) = Forwarder::start_localsend_routers(&t).unwrap();

    let app = Peer::start(&t.app, APP_ALIAS).expect("localsendd in the app");
    // localsendd announces three times at start-up (0, 1 and 3 s): once all
    // three went out to the LAN, a peer starting now can only find the app
    // through the relay of its own announcement.
    assert!(
        wait_until(Duration::from_secs(10), || sysnet.relayed_up().unwrap()
            >= 3),
        "the app's start-up announcements were not relayed ({} seen)",
        sysnet.relayed_up().unwrap()
    );
    let started = Instant::now();
    let lan = Peer::start(&t.lan, LAN_ALIAS).expect("localsendd on the LAN");

    let found = wait_until(Duration::from_secs(15), || {
        app.knows(LAN_ALIAS).is_some() && lan.knows(APP_ALIAS).is_some()
    });
    assert!(
        found,
        "discovery failed: app knows {:?}, LAN knows {:?}\napp log:\n{}\nLAN log:\n{}",
        app.devices().ok(),
        lan.devices().ok(),
        app.log(),
        lan.log()
    );
    println!(
        "mutual discovery {:.0} ms after the LAN peer started",
        started.elapsed().as_secs_f64() * 1e3
    );
    let seen = lan.knows(APP_ALIAS).unwrap();
    assert!(
        seen.ip.ends_with(&SYSNET_LAN.to_string()),
        "the LAN sees the app at {}, not sys-net's address",
        seen.ip
    );

    let dir = std::env::temp_dir().join(format!("{}-files", t.lan.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let to_lan: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let to_app: Vec<u8> = (0..150_000u32).map(|i| (i * 13 + 5) as u8).collect();
    std::fs::write(dir.join("from-app.bin"), &to_lan).unwrap();
    std::fs::write(dir.join("from-lan.bin"), &to_app).unwrap();

    app.send(&dir.join("from-app.bin"), LAN_ALIAS)
        .expect("app to LAN");
    assert_eq!(
        lan.downloaded("from-app.bin").as_deref(),
        Some(to_lan.as_slice()),
        "app to LAN content"
    );
    lan.send(&dir.join("from-lan.bin"), APP_ALIAS)
        .expect("LAN to app");
    assert_eq!(
        app.downloaded("from-lan.bin").as_deref(),
        Some(to_app.as_slice()),
        "LAN to app content"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The baseline: with the seed's nftables recipe, a LAN peer started after
/// the app's start-up announcements cannot discover the app (the recipe
/// never delivers the LAN peer's announcement to the VM, so the app never
/// answers), as the brief says. Reported with the time waited.
#[test]
fn with_the_seed_recipe_a_late_lan_peer_does_not_find_the_app() {
    use forwarder_tests::capture::Capture;

    let t = Topology::build(Offload::On).expect("topology");
    let _recipe = t.install_seed_recipe().expect("seed recipe");
    let capture = Capture::start(&t.lan, "eth0").expect("capture");
    let app = Peer::start(&t.app, APP_ALIAS).expect("localsendd in the app");
    let announcements = || {
        capture
            .snapshot()
            .iter()
            .filter_map(|f| forwarder_tests::packet::parse(f))
            .filter(|p| p.daddr == LOCALSEND_GROUP && p.saddr == SYSNET_LAN)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || announcements() >= 3),
        "the recipe did not relay the app's start-up announcements ({} seen)",
        announcements()
    );
    let lan = Peer::start(&t.lan, LAN_ALIAS).expect("localsendd on the LAN");
    let window = Duration::from_secs(15);
    let found = wait_until(window, || {
        lan.knows(APP_ALIAS).is_some() || app.knows(LAN_ALIAS).is_some()
    });
    println!(
        "seed recipe: within {} s the LAN peer knew {:?}, the app knew {:?}",
        window.as_secs(),
        lan.devices()
            .ok()
            .map(|d| d.into_iter().map(|d| d.alias).collect::<Vec<_>>()),
        app.devices()
            .ok()
            .map(|d| d.into_iter().map(|d| d.alias).collect::<Vec<_>>()),
    );
    assert!(
        !found,
        "the seed recipe was expected not to let a late LAN peer discover the app"
    );
}
