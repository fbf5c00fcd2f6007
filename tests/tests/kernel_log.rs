//! What only the kernel sees reaches the daemon's log with `--kernel-log`:
//! a FIB answer the datapath takes as "no route" (a blackhole route to the
//! forward target in sys-firewall) and a relay copy the kernel refused (a
//! queue on the target's vif that takes nothing), each as one warning under
//! `forwarder::ebpf` naming the interface, the addresses and the code, at
//! most one of a kind a second however many packets meet it. Without the
//! flag, the same packets leave no record.

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use forwarder_common::reason::Reason;
use forwarder_tests::{
    daemon::{Forwarder, Router},
    sockets::{EchoServer, udp_echo},
    topology::*,
    wait::wait_until,
};

const WAIT: Duration = Duration::from_secs(5);
/// The target the kernel's records are shown under, as env_logger prints it.
const TARGET: &str = " forwarder::ebpf]";

fn uplink_port() -> SocketAddrV4 {
    SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT)
}

/// Sends `n` datagrams from the LAN to the forwarded port.
fn send(t: &Topology, n: usize) -> Result<()> {
    t.lan.run(|| -> Result<()> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..n {
            sock.send_to(b"to a blackhole", uplink_port())?;
        }
        Ok(())
    })
}

/// The kernel's records in `log` that contain `needle`.
fn records(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(TARGET) && l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Sends datagrams until sys-firewall counts `n` more FIB answers of no
/// route than it had.
fn meet_blackhole(t: &Topology, sysfw: &Forwarder, n: u64) -> Result<()> {
    let before = sysfw.reason(Reason::FibNoRoute)?;
    send(t, n as usize)?;
    ensure!(
        wait_until(WAIT, || sysfw.reason(Reason::FibNoRoute).unwrap_or(0)
            >= before + n),
        "sys-firewall never counted {n} packets without a route"
    );
    Ok(())
}

#[test]
fn what_only_the_kernel_sees_reaches_the_log_with_kernel_log() {
    let t = Topology::build(Offload::On).unwrap();
    let _sysnet = Forwarder::start_localsend(&t, Router::SysNet, &[]).unwrap();
    let mut sysfw = Forwarder::start_localsend(&t, Router::SysFirewall, &[]).unwrap();
    let _server = EchoServer::start(&t.app, LOCALSEND_PORT).unwrap();
    udp_echo(&t.lan, uplink_port(), WAIT).expect("forwarded before the blackhole");
    let fib_record = format!("for {LAN_PEER} -> {APP} answered blackhole (1)");

    // Without --kernel-log: the packets are counted, nothing is written.
    t.sysfw
        .sh(&format!("ip route replace blackhole {APP}/32 metric 32752"))
        .unwrap();
    meet_blackhole(&t, &sysfw, 1).unwrap();
    let silent = !wait_until(Duration::from_secs(2), || {
        !records(&sysfw.log_text(), "bpf_fib_lookup").is_empty()
    });
    let log_off = sysfw.log_text();

    // With it (a restart: the flag takes effect at start), the same packet
    // is written once, with its interface, addresses and code.
    sysfw.kill_hard().unwrap();
    sysfw
        .respawn_with(
            &t.sysfw,
            &[
                "--uplink",
                SYSFW_UPLINK,
                "--localsend",
                &APP.to_string(),
                "--kernel-log",
            ],
        )
        .unwrap();
    sysfw.wait_ready(Duration::from_secs(20)).unwrap();
    let started = Instant::now();
    meet_blackhole(&t, &sysfw, 1).unwrap();
    ensure_logged(&sysfw, &fib_record).unwrap();
    let latency = started.elapsed();
    assert!(
        silent,
        "records without --kernel-log (one arrives in {latency:?} with it): {:?}",
        records(&log_off, "")
    );
    let record = records(&sysfw.log_text(), &fib_record).remove(0);
    println!("as the daemon prints it:\n{record}");
    assert!(
        record.contains(&format!(
            "from ifindex {} ({SYSFW_UPLINK})",
            sysfw.uplink().ifindex
        )),
        "the record names the interface: {record}"
    );
    assert!(record.contains(" WARN "), "a warning: {record}");

    // Many more packets, one record a second at most.
    let flood = Instant::now();
    meet_blackhole(&t, &sysfw, 200).unwrap();
    let seconds = flood.elapsed().as_secs() + 2;
    let written = records(&sysfw.log_text(), &fib_record).len() as u64;
    assert!(
        written <= 1 + seconds,
        "{written} records for 201 packets in {seconds} s"
    );
    t.sysfw
        .sh(&format!(
            "ip route replace {APP}/32 dev vif3.0 metric 32752"
        ))
        .unwrap();

    // A relay copy toward the app that its vif's queue refuses.
    t.sysfw
        .sh("tc qdisc replace dev vif3.0 root pfifo limit 0")
        .unwrap();
    let before = sysfw.reason(Reason::RelayCloneFailed).unwrap();
    let _announcer = localsend_announcer(&t.lan, "kernel-log", Duration::from_millis(50)).unwrap();
    assert!(
        wait_until(WAIT, || sysfw.reason(Reason::RelayCloneFailed).unwrap_or(0)
            > before),
        "no refused copy counted; log:\n{}",
        sysfw.log_text()
    );
    let clone_record =
        format!("bpf_clone_redirect of a relay copy from {LAN_PEER} for {APP} to ifindex");
    ensure_logged(&sysfw, &clone_record).unwrap();
    let record = records(&sysfw.log_text(), &clone_record).remove(0);
    println!("{record}");
    assert!(record.contains("(vif3.0) failed: "), "{record}");
    t.sysfw.sh("tc qdisc del dev vif3.0 root").unwrap();
}

/// Waits until the daemon's log holds a kernel record containing `needle`.
fn ensure_logged(fwd: &Forwarder, needle: &str) -> Result<()> {
    ensure!(
        wait_until(WAIT, || !records(&fwd.log_text(), needle).is_empty()),
        "no kernel record with {needle:?}; log:\n{}",
        fwd.log_text()
    );
    Ok(())
}
