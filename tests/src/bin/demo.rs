//! `cargo xtask demo`: the Qubes-like topology in network namespaces, the
//! forwarder in both router VMs, and a real LocalSend exchange between the
//! app VM and a LAN peer that starts later, then `forwarder inspect` of both
//! routers. Everything it creates is removed when it ends, also on failure.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use forwarder_tests::{
    daemon::{Forwarder, cli},
    localsend::Peer,
    netns,
    topology::*,
    wait::wait_until,
};

const APP_ALIAS: &str = "qubes-app";
const LAN_ALIAS: &str = "phone-on-the-lan";

fn step(started: Instant, text: &str) {
    println!("[{:>5.1}s] {text}", started.elapsed().as_secs_f64());
}

fn relayed_up(fwd: &Forwarder) -> u64 {
    fwd.tables()
        .and_then(|t| {
            let relays = t.installed_relays()?;
            Ok(relays
                .values()
                .filter_map(|r| t.relay_counters(r.slot).ok())
                .map(|c| c.packets_up)
                .sum())
        })
        .unwrap_or(0)
}

fn demo() -> Result<()> {
    let started = Instant::now();
    netns::sweep_leftovers();
    step(
        started,
        "building the topology: lan -- sys-net -- sys-firewall -- app (Qubes 4.2 netvm tables in both routers)",
    );
    let t = Topology::build(Offload::On)?;
    println!(
        "         LAN peer {LAN_PEER}, sys-net {SYSNET_LAN} on {SYSNET_UPLINK}, sys-firewall {SYSFW}, app {APP}"
    );

    let sysnet_args =
        ["--uplink", SYSNET_UPLINK, "--localsend", &SYSFW.to_string()].map(String::from);
    let sysfw_args = ["--uplink", SYSFW_UPLINK, "--localsend", &APP.to_string()].map(String::from);
    step(
        started,
        &format!("sys-net:      forwarder run {}", sysnet_args.join(" ")),
    );
    let sysnet = Forwarder::start(
        &t.sysnet,
        "sys-net",
        &sysnet_args.each_ref().map(String::as_str),
    )?;
    step(
        started,
        &format!("sys-firewall: forwarder run {}", sysfw_args.join(" ")),
    );
    let sysfw = Forwarder::start(
        &t.sysfw,
        "sys-firewall",
        &sysfw_args.each_ref().map(String::as_str),
    )?;

    step(
        started,
        &format!("starting LocalSend (localsendd from PyPI) in the app VM as {APP_ALIAS:?}"),
    );
    let app = Peer::start(&t.app, APP_ALIAS)?;
    if !wait_until(Duration::from_secs(10), || relayed_up(&sysnet) >= 3) {
        bail!("the app's start-up announcements did not reach the LAN");
    }
    step(
        started,
        "its three start-up announcements went out to the LAN from sys-net's address; now the phone opens LocalSend",
    );
    let lan = Peer::start(&t.lan, LAN_ALIAS)?;
    let lan_started = Instant::now();
    if !wait_until(Duration::from_secs(20), || {
        app.knows(LAN_ALIAS).is_some() && lan.knows(APP_ALIAS).is_some()
    }) {
        bail!(
            "discovery failed: the app knows {:?}, the phone knows {:?}",
            app.devices().ok(),
            lan.devices().ok()
        );
    }
    let seen = lan.knows(APP_ALIAS).context("app vanished")?;
    step(
        started,
        &format!(
            "discovered both ways in {} ms; the phone sees {APP_ALIAS} at {}",
            lan_started.elapsed().as_millis(),
            seen.ip.trim_start_matches("::ffff:")
        ),
    );

    let dir = std::env::temp_dir().join(format!("{}-demo-files", t.lan.name()));
    std::fs::create_dir_all(&dir)?;
    let photo: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let notes = b"Sent from a VM behind two NATs.\n".repeat(1000);
    std::fs::write(dir.join("photo.jpg"), &photo)?;
    std::fs::write(dir.join("notes.txt"), &notes)?;
    lan.send(&dir.join("photo.jpg"), APP_ALIAS)?;
    if app.downloaded("photo.jpg").as_deref() != Some(photo.as_slice()) {
        bail!("photo.jpg arrived damaged or not at all");
    }
    step(
        started,
        &format!(
            "the phone sent photo.jpg ({} bytes) to the app: arrived intact",
            photo.len()
        ),
    );
    app.send(&dir.join("notes.txt"), LAN_ALIAS)?;
    if lan.downloaded("notes.txt").as_deref() != Some(notes.as_slice()) {
        bail!("notes.txt arrived damaged or not at all");
    }
    step(
        started,
        &format!(
            "the app sent notes.txt ({} bytes) to the phone: arrived intact",
            notes.len()
        ),
    );
    let _ = std::fs::remove_dir_all(&dir);

    for (name, ns, fwd) in [
        ("sys-net", &t.sysnet, &sysnet),
        ("sys-firewall", &t.sysfw, &sysfw),
    ] {
        let pin_dir = fwd.pins.path().display().to_string();
        let out = cli(ns, &["inspect", "--pin-dir", &pin_dir])?;
        println!(
            "\n==> {name}: forwarder inspect\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    step(
        started,
        "stopping everything; namespaces, programs, pins and nftables tables are removed",
    );
    Ok(())
}

fn main() -> ExitCode {
    let result = demo();
    // Every pin of the demo is gone by now; the test bpffs itself goes too.
    let _ = forwarder::pin::unmount_if_empty(std::path::Path::new(forwarder_tests::bpffs::ROOT));
    match result {
        Ok(()) => {
            println!("demo finished");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
