//! The NIC scenario: sys-net's uplink is the VM's virtio-net device, whose
//! other end is a tap on the host with the LAN peer behind it (see
//! lan_peer); the app sits behind a veth pair, a vif as in the namespace
//! topology, and sys-net forwards and relays to it directly (one router is
//! enough to put a NIC under the uplink, and each forwarder started under
//! TCG costs seconds). A real NIC (here QEMU's virtio-net, which filters
//! multicast by the address list the driver gives it) delivers a group's
//! frames only when someone joined the group on it, and merges a TCP
//! stream's segments (GRO) before the uplink's TC hook sees them.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use forwarder::multicast::Memberships;

use super::{
    Results, SLOW, Status, WAIT,
    lan_peer::{self, Control},
    routers::{self, Started},
};
use crate::{
    daemon::Forwarder,
    netns::{Netns, sh},
    sockets::MulticastListener,
    topology::*,
    wait::wait_until,
};

pub const CHECKS: &[&str] = &["nic-bulk", "nic-join"];
/// Several MB, so GRO has whole windows of segments to merge.
const BULK_BYTES: usize = 8 << 20;
const ANNOUNCEMENTS: u32 = 20;
const ANNOUNCE_EVERY: Duration = Duration::from_millis(50);
/// An IP packet larger than this was merged from several frames.
const MTU: u64 = 1500;

struct NicTopology {
    sysnet: Netns,
    app: Netns,
}

/// The VM's NIC, found by the MAC the host gave it.
fn nic(mac: &str) -> Result<Option<String>> {
    for line in sh("ip -o link show")?.lines() {
        if line.contains(&format!("link/ether {mac} ")) {
            let name = line.split(':').nth(1).map(|n| n.trim().to_string());
            return Ok(name);
        }
    }
    Ok(None)
}

impl NicTopology {
    fn build(mac: &str) -> Result<Self> {
        // Nothing runs udev in the VM to load the driver for the device.
        if nic(mac)?.is_none() {
            sh("modprobe virtio_net")?;
        }
        let mut dev = None;
        wait_until(SLOW, || {
            dev = nic(mac).ok().flatten();
            dev.is_some()
        });
        let dev = dev.with_context(|| format!("no network device with MAC {mac} in the VM"))?;
        let t = NicTopology {
            sysnet: Netns::new("sysnet")?,
            app: Netns::new("app")?,
        };
        sh(&format!("ip link set {dev} down"))?;
        sh(&format!("ip link set {dev} name {SYSNET_UPLINK}"))?;
        sh(&format!(
            "ip link set {SYSNET_UPLINK} netns {}",
            t.sysnet.name()
        ))?;
        t.sysnet
            .ip(&format!("addr add {SYSNET_LAN}/24 dev {SYSNET_UPLINK}"))?;
        t.sysnet.ip(&format!("link set {SYSNET_UPLINK} up"))?;
        t.sysnet
            .ip(&format!("route add default via {LAN_GATEWAY}"))?;
        vif(&t.sysnet, &t.app, "vif2.0", SYSNET_INTERNAL, APP)?;
        t.sysnet.sysctl("net.ipv4.ip_forward=1")?;
        t.sysnet.nft(&qubes_netvm_tables(&[("vif2.0", APP)]))?;
        t.app.nft(&vm_input_table(APP, &[LOCALSEND_PORT]))?;
        Ok(t)
    }

    /// Whether the kernel holds a membership of the relay group on the
    /// uplink (and so has put its MAC in the NIC's filter).
    fn member(&self) -> bool {
        let group = LOCALSEND_GROUP.to_string();
        self.sysnet
            .ip(&format!("maddr show dev {SYSNET_UPLINK}"))
            .is_ok_and(|out| {
                out.lines()
                    .any(|l| l.split_whitespace().eq(["inet", group.as_str()]))
            })
    }
}

pub fn skip(results: &mut Results, why: &str) {
    results.record_all(CHECKS, Status::Skip, why);
}

/// The NIC scenario on the VM's network device with MAC `mac`.
pub fn run(results: &mut Results, mac: &str) {
    let t = match NicTopology::build(mac) {
        Ok(t) => t,
        Err(err) => {
            let err = format!("{:#}", err.context("building the NIC topology"));
            results.record_all(CHECKS, Status::Fail, &err);
            return;
        }
    };
    let mut sysnet = match routers::start_one(&t.sysnet, "sys-net", SYSNET_UPLINK, APP) {
        Ok(Started::Running(fwd)) => fwd,
        Ok(Started::Refused(_)) => return skip(results, super::REFUSED),
        Err(err) => {
            let err = format!("{err:#}");
            results.record_all(CHECKS, Status::Fail, &err);
            return;
        }
    };
    let mut control = match Control::connect(&t.sysnet, SLOW) {
        Ok(control) => control,
        Err(err) => {
            let err = format!("{err:#}");
            results.record_all(CHECKS, Status::Fail, &err);
            return;
        }
    };
    results.check("nic-bulk", bulk(&t, &sysnet, &mut control));
    results.check("nic-join", join(&t, &mut sysnet, &mut control));
}

/// Several MB from the LAN peer to the app through sys-net: what the app
/// received hashes as what the peer sent, and the uplink's hook saw
/// packets larger than the MTU, merged by GRO in the VM (the host's QEMU
/// hands the guest MTU-sized frames: its guest TSO offloads are off).
fn bulk(t: &NicTopology, sysnet: &Forwarder, control: &mut Control) -> Result<String> {
    let tables = sysnet.tables()?;
    let (_, rule) = *tables
        .installed()?
        .get(&(6, LOCALSEND_PORT))
        .context("no tcp rule in sys-net")?;
    let before = tables.rule_counters(rule.slot)?;
    let sink = lan_peer::sink(&t.app, LOCALSEND_PORT)?;
    let bulk = control.bulk(BULK_BYTES)?;
    match sink.join() {
        Ok(result) => result.context("the app's end")?,
        Err(_) => bail!("the app's end panicked"),
    }
    ensure!(
        bulk.received_bytes == bulk.bytes && bulk.received_sha256 == bulk.sent_sha256,
        "sent {} bytes (sha256 {}), the app got {} bytes (sha256 {})",
        bulk.bytes,
        bulk.sent_sha256,
        bulk.received_bytes,
        bulk.received_sha256
    );
    let after = tables.rule_counters(rule.slot)?;
    let packets = after.packets_in - before.packets_in;
    let bytes = after.bytes_in - before.bytes_in;
    ensure!(packets > 0, "sys-net's datapath counted nothing");
    let average = bytes / packets;
    ensure!(
        average > MTU,
        "the uplink's hook saw {packets} packets of {average} bytes on average: nothing merged"
    );
    Ok(format!(
        "{} MiB in {} ms, sha256 {}... on both ends; the uplink hook saw {packets} packets of {average} bytes on average (GRO)",
        bulk.bytes >> 20,
        bulk.millis,
        &bulk.sent_sha256[..16]
    ))
}

/// Distinct announcements tagged `tag` the app received.
fn arrived(listener: &MulticastListener, tag: &str) -> usize {
    let prefix = format!("{tag} ");
    listener
        .received()
        .iter()
        .filter(|r| r.from.ip() == LAN_PEER && r.payload.starts_with(prefix.as_bytes()))
        .map(|r| r.payload.clone())
        .collect::<BTreeSet<_>>()
        .len()
}

/// LAN announcements reach the app because the uplink is a member of the
/// group, and for no other reason: with the daemon's membership gone
/// (SIGKILL closes its socket; the datapath stays attached and keeps
/// relaying) nothing arrives and the uplink's hook sees nothing; a
/// membership held by an unrelated socket brings them back with the daemon
/// still dead; the restarted daemon's own membership does too.
fn join(t: &NicTopology, sysnet: &mut Forwarder, control: &mut Control) -> Result<String> {
    let listener = MulticastListener::start(&t.app, LOCALSEND_GROUP, LOCALSEND_PORT)?;
    let relayed_down = |sysnet: &Forwarder| -> Result<u64> {
        let tables = sysnet.tables()?;
        let relays = tables.installed_relays()?;
        let relay = relays.values().next().context("no relay in sys-net")?;
        Ok(tables.relay_counters(relay.slot)?.packets_down)
    };
    // Announces and waits for the first arrival; the rest trail it.
    let mut phase = |tag: &str| -> Result<usize> {
        control.announce(tag, ANNOUNCEMENTS, ANNOUNCE_EVERY)?;
        wait_until(WAIT, || arrived(&listener, tag) > 0);
        Ok(arrived(&listener, tag))
    };

    ensure!(
        t.member(),
        "the daemon holds no membership of {LOCALSEND_GROUP} on {SYSNET_UPLINK}"
    );
    let joined = phase("joined")?;
    ensure!(
        joined > 0,
        "no announcement reached the app with the daemon's membership"
    );

    let counted_before = relayed_down(sysnet)?;
    sysnet.kill_hard()?;
    ensure!(
        wait_until(WAIT, || !t.member()),
        "the membership outlived the daemon"
    );
    let left = phase("left")?;
    let counted_without = relayed_down(sysnet)? - counted_before;

    let uplink = sysnet.uplink().ifindex;
    let test_socket = t.sysnet.run(|| -> Result<Memberships> {
        let mut memberships = Memberships::new(vec![LOCALSEND_GROUP]);
        memberships.follow(uplink)?;
        Ok(memberships)
    })?;
    ensure!(
        t.member(),
        "the test socket's membership is not on {SYSNET_UPLINK}"
    );
    let test_joined = phase("test-joined")?;
    // In order: whatever of "left" was coming came before these.
    let left = left.max(arrived(&listener, "left"));
    drop(test_socket);
    ensure!(
        test_joined > 0,
        "no announcement reached the app with a test socket's membership and the daemon dead: the positive control failed"
    );
    ensure!(
        left == 0 && counted_without == 0,
        "without a membership {left} announcements reached the app and the uplink's hook relayed {counted_without}"
    );

    sysnet.respawn(&t.sysnet)?;
    routers::wait_restarted(sysnet)?;
    ensure!(
        wait_until(WAIT, || t.member()),
        "the restarted daemon did not join {LOCALSEND_GROUP}"
    );
    let rejoined = phase("rejoined")?;
    ensure!(
        rejoined > 0,
        "no announcement reached the app after the daemon rejoined"
    );
    let n = ANNOUNCEMENTS;
    Ok(format!(
        "of {n} LAN announcements each, the app got: {joined} with the daemon's membership; {left} with the daemon killed and no membership (its hook relayed {counted_without}); {test_joined} with a test socket's membership, daemon still dead; {rejoined} after the daemon restarted and joined again"
    ))
}
