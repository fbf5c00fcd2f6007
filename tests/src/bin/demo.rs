//! `cargo xtask demo`: the Qubes-like topology in network namespaces, with
//! dom0 played by a stand-in qubesd. Both routers run `forwarder run` as
//! `forwarder.service` starts it in a Qubes router (no flags: everything
//! comes from QubesDB) and the app VM `forwarder input`; then one command
//! in dom0, `qvm-forwarder expose app --localsend`, and a real LocalSend
//! exchange between the app VM and a LAN peer that starts later, then
//! `forwarder inspect` of both routers. Everything it creates is removed
//! when it ends, also on failure.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use forwarder_tests::{
    daemon::{Forwarder, cli},
    localsend::Peer,
    netns,
    qubes_vm::{self, InputSide, QubeEnv, qvm_forwarder},
    qubesd::Qubesd,
    topology::*,
    wait::wait_until,
};

const APP_ALIAS: &str = "qubes-app";
const LAN_ALIAS: &str = "phone-on-the-lan";

fn step(started: Instant, text: &str) {
    println!("[{:>5.1}s] {text}", started.elapsed().as_secs_f64());
}

/// Whatever `text` printed, indented under its step.
fn indented(text: &str) {
    for line in text.lines() {
        println!("         {line}");
    }
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

/// How many forward rules a router's maps hold.
fn rules(fwd: &Forwarder) -> usize {
    fwd.tables()
        .and_then(|t| t.installed())
        .map(|r| r.len())
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
    // A fresh qube admits nothing in custom-input: `forwarder input` will.
    t.app.nft("flush chain ip qubes custom-input\n")?;
    println!(
        "         LAN peer {LAN_PEER}, sys-net {SYSNET_LAN} on {SYSNET_UPLINK}, sys-firewall {SYSFW}, app {APP}"
    );
    let q = Qubesd::graph("demo", qubes_vm::graph())?;
    step(
        started,
        "dom0 is a stand-in qubesd; each qube reads its QubesDB through stand-in qubesdb-* tools",
    );
    let sysnet_env = QubeEnv::router(&q, "sys-net")?;
    let sysfw_env = QubeEnv::router(&q, "sys-firewall")?;
    step(
        started,
        "sys-net, sys-firewall: forwarder run (as forwarder.service starts it: qvm-service forwarder on, no flags)",
    );
    let sysnet = sysnet_env.start_router(&t.sysnet, "sys-net")?;
    let sysfw = sysfw_env.start_router(&t.sysfw, "sys-firewall")?;
    step(
        started,
        "app: forwarder input (as forwarder-input.service starts it); nothing exposed, nothing forwarded yet",
    );
    let input = InputSide::start(&QubeEnv::exposed(&q, "app")?, &t.app, "app")?;

    step(started, "dom0: qvm-forwarder expose app --localsend");
    let exposed = Instant::now();
    indented(&qvm_forwarder(&q, &["expose", "app", "--localsend"])?);
    if !wait_until(Duration::from_secs(5), || {
        rules(&sysnet) == 2 && rules(&sysfw) == 2
    }) {
        bail!(
            "the routers did not apply dom0's share\nsys-net:\n{}\nsys-firewall:\n{}",
            sysnet.log_text(),
            sysfw.log_text()
        );
    }
    step(
        started,
        &format!(
            "both routers forward LocalSend, {} ms after the command; the app admits:",
            exposed.elapsed().as_millis()
        ),
    );
    indented(&input.chain(&t.app)?);

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

    step(started, "dom0: qvm-forwarder check app");
    indented(&qvm_forwarder(&q, &["check", "app"])?);
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
