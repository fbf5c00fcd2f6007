//! A VM behind libvirt's default NAT (virbr0, a bridge as the downstream)
//! made reachable from the LAN, its discovery multicast relayed both ways,
//! with checksum offload on and off.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{anyhow, ensure};
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
    {
        let _server = EchoServer::start(&t.vm, LOCALSEND_PORT).expect("VM server");
        checks.add_ok(
            "tcp from the LAN reaches the VM behind the bridge",
            (|| {
                let echo = tcp_echo(&t.lan, host_port, None, WAIT)?;
                ensure!(echo.seen_as.ip() == LAN_PEER, "VM saw {}", echo.seen_as);
                Ok(())
            })(),
        );
        checks.add_ok(
            "udp from the LAN reaches the VM; the reply comes from the host's address",
            (|| {
                let echo = udp_echo(&t.lan, host_port, WAIT)?;
                ensure!(
                    echo.reply_from == Some(host_port.into()),
                    "reply from {:?}",
                    echo.reply_from
                );
                Ok(())
            })(),
        );
    }
    checks.add_ok(
        "a VM announcement reaches the LAN from the host's address",
        (|| {
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
        })(),
    );
    checks.add_ok(
        "a LAN announcement reaches the VM with the peer's source",
        (|| {
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
        })(),
    );
    checks.add_ok(
        "the VM's own outbound tcp still works through libvirt's masquerade",
        (|| {
            let _lan_server = EchoServer::start(&t.lan, 8000)?;
            let echo = tcp_echo(&t.vm, SocketAddrV4::new(LAN_PEER, 8000), None, WAIT)?;
            ensure!(echo.seen_as.ip() == HOST_LAN, "LAN saw {}", echo.seen_as);
            Ok(())
        })(),
    );
    let frames = capture.finish();
    checks.add_ok(
        "no address of the NAT network leaves the uplink",
        capture::ensure_no_internal(&frames, |a| a.octets()[..3] == [192, 168, 122]),
    );
    checks.add_ok(
        "receivers counted no checksum errors",
        t.ensure_no_checksum_errors(),
    );
    checks
}

#[test]
fn a_vm_behind_libvirt_nat_with_checksum_offload() {
    scenario(Offload::On).assert_all_pass("libvirt, checksum offload on");
}

#[test]
fn a_vm_behind_libvirt_nat_without_checksum_offload() {
    scenario(Offload::Off).assert_all_pass("libvirt, checksum offload off");
}
