//! A VM behind libvirt's default NAT (virbr0, a bridge as the downstream)
//! made reachable from the LAN, its discovery multicast relayed both ways,
//! with checksum offload on and off.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Result, anyhow, ensure};
use forwarder_tests::{
    capture::{self, Capture},
    checks::Checks,
    daemon::Forwarder,
    libvirt::*,
    sockets::{Announcer, EchoServer, MulticastListener, tcp_echo, udp_echo},
    topology::{LOCALSEND_GROUP, LOCALSEND_PORT, Offload},
};

const WAIT: Duration = Duration::from_secs(5);

fn scenario(offload: Offload) -> Checks {
    let t = Libvirt::build(offload).expect("libvirt topology");
    let mut checks = Checks::default();
    let host_port = SocketAddrV4::new(HOST_LAN, LOCALSEND_PORT);
    let server = EchoServer::start(&t.vm, LOCALSEND_PORT).expect("VM server");
    checks.add(
        "without the forwarder the LAN cannot reach the VM (the problem)",
        (|| {
            ensure!(
                tcp_echo(&t.lan, host_port, None, Duration::from_secs(1)).is_err(),
                "reachable already"
            );
            Ok(String::new())
        })(),
    );
    drop(server);

    let _fwd = Forwarder::start(
        &t.host,
        "host",
        &[
            "--uplink",
            "eth0",
            "--downstream",
            "^virbr0$",
            "--localsend",
            &VM.to_string(),
        ],
    )
    .expect("forwarder on the host");
    let capture = Capture::start(&t.lan, "eth0").expect("capture");
    let empty = |r: Result<()>| r.map(|()| String::new());
    {
        let _server = EchoServer::start(&t.vm, LOCALSEND_PORT).expect("VM server");
        checks.add(
            "tcp from the LAN reaches the VM behind the bridge",
            empty((|| {
                let echo = tcp_echo(&t.lan, host_port, None, WAIT)?;
                ensure!(echo.seen_as.ip() == LAN_PEER, "VM saw {}", echo.seen_as);
                Ok(())
            })()),
        );
        checks.add(
            "udp from the LAN reaches the VM; the reply comes from the host's address",
            empty((|| {
                let echo = udp_echo(&t.lan, host_port, WAIT)?;
                ensure!(
                    echo.reply_from == Some(host_port.into()),
                    "reply from {:?}",
                    echo.reply_from
                );
                Ok(())
            })()),
        );
    }
    checks.add(
        "a VM announcement reaches the LAN from the host's address",
        empty((|| {
            let listener = MulticastListener::start(&t.lan, LOCALSEND_GROUP, LOCALSEND_PORT)?;
            let _a = Announcer::start(
                &t.vm,
                "vm",
                LOCALSEND_GROUP,
                LOCALSEND_PORT,
                1,
                Duration::from_millis(20),
            )?;
            listener
                .wait_from(HOST_LAN, "vm", WAIT)
                .map(drop)
                .ok_or_else(|| anyhow!("nothing from {HOST_LAN}"))
        })()),
    );
    checks.add(
        "a LAN announcement reaches the VM with the peer's source",
        empty((|| {
            let listener = MulticastListener::start(&t.vm, LOCALSEND_GROUP, LOCALSEND_PORT)?;
            let _a = Announcer::start(
                &t.lan,
                "lan",
                LOCALSEND_GROUP,
                LOCALSEND_PORT,
                1,
                Duration::from_millis(20),
            )?;
            listener
                .wait_from(LAN_PEER, "lan", WAIT)
                .map(drop)
                .ok_or_else(|| anyhow!("nothing from {LAN_PEER}"))
        })()),
    );
    checks.add(
        "the VM's own outbound tcp still works through libvirt's masquerade",
        empty((|| {
            let _lan_server = EchoServer::start(&t.lan, 8000)?;
            let echo = tcp_echo(&t.vm, SocketAddrV4::new(LAN_PEER, 8000), None, WAIT)?;
            ensure!(echo.seen_as.ip() == HOST_LAN, "LAN saw {}", echo.seen_as);
            Ok(())
        })()),
    );
    let frames = capture.finish();
    checks.add(
        "no address of the NAT network leaves the uplink",
        empty((|| {
            let leaks: Vec<_> = frames
                .iter()
                .filter(|f| {
                    capture::addresses(f)
                        .iter()
                        .any(|a| a.octets()[..3] == [192, 168, 122])
                })
                .collect();
            ensure!(
                leaks.is_empty(),
                "{} frames, e.g. {}",
                leaks.len(),
                capture::describe(leaks[0])
            );
            Ok(())
        })()),
    );
    checks.add(
        "receivers counted no checksum errors",
        empty((|| {
            let errors = t.checksum_errors()?;
            ensure!(errors.iter().all(|(_, n)| *n == 0), "{errors:?}");
            Ok(())
        })()),
    );
    checks
}

#[test]
fn a_vm_behind_libvirt_nat_with_checksum_offload() {
    let failed = scenario(Offload::On).report("libvirt, checksum offload on");
    assert!(failed.is_empty(), "failed: {failed:?}");
}

#[test]
fn a_vm_behind_libvirt_nat_without_checksum_offload() {
    let failed = scenario(Offload::Off).report("libvirt, checksum offload off");
    assert!(failed.is_empty(), "failed: {failed:?}");
}
