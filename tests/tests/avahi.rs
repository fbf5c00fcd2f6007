//! A real Avahi in the app VM: Debian's avahi-daemon (no D-Bus) publishes
//! the app's address, the workstation service, a static service whose TXT
//! record names the address as text, and, once running, a static host for
//! the app's second address, through the `--mdns` relay of both routers.
//! Its probes are queries (the relay lets queries up) that carry every
//! form of the addresses: A records (4 bytes), in-addr.arpa PTR records
//! (DNS labels) and the TXT text. The capture on the LAN is searched for
//! every form of every internal address: none may appear. In the same run
//! the app resolves a LAN service by mDNS, which only works if its queries
//! go up and the answers come down.

use std::{net::Ipv4Addr, time::Duration};

use forwarder_common::reason::Reason;
use forwarder_tests::{
    avahi::{self, Avahi},
    capture::Capture,
    daemon::Forwarder,
    leak::{self, Form},
    mdns,
    topology::*,
    wait::wait_until,
};

/// The app's second address, in another /24 than its first: the routers
/// know it only by the routes they hold to it.
const SECOND: Ipv4Addr = Ipv4Addr::new(10, 137, 1, 17);
const INTERNAL: [Ipv4Addr; 5] = [APP, SECOND, APP2, SYSFW, SYSNET_INTERNAL];
const PRINTER_TYPE: &str = "_ipp._tcp.local.";
const LAN_PRINTER: &str = "LAN printer";
const APP_SHARE: &str = "App share";

/// Whether any of `frames` carries `addr` in `form`.
fn seen(frames: &[Vec<u8>], addr: Ipv4Addr, form: Form) -> bool {
    frames
        .iter()
        .any(|f| leak::forms(f, addr).iter().any(|(found, _)| *found == form))
}

#[test]
fn avahi_in_the_app_leaks_no_form_of_any_internal_address_and_its_lookups_resolve() {
    let t = Topology::build(Offload::On).expect("topology");
    mdns::admit(&t).unwrap();
    // The second address sits on the app's loopback (a service address);
    // sys-firewall routes it through the app's vif, sys-net through
    // sys-firewall.
    t.app.ip(&format!("addr add {SECOND}/32 dev lo")).unwrap();
    t.sysfw
        .ip(&format!("route add {SECOND}/32 dev vif3.0"))
        .unwrap();
    t.sysnet
        .ip(&format!(
            "route add {SECOND}/32 via {SYSFW} dev vif2.0 onlink"
        ))
        .unwrap();
    let (sysfw_ip, app_ip) = (SYSFW.to_string(), APP.to_string());
    let (sysnet, sysfw) =
        Forwarder::start_routers(&t, &["--mdns", &sysfw_ip], &["--mdns", &app_ip]).unwrap();
    let lan_capture = Capture::start(&t.lan, "eth0").unwrap();
    let app_side = Capture::start(&t.sysfw, "vif3.0").unwrap();
    let _printer =
        mdns::Advertiser::start(&t.lan, PRINTER_TYPE, LAN_PRINTER, LAN_PEER, 631).unwrap();

    let txt = format!("addr={APP}");
    let mut avahi = Avahi::start(
        &t.app,
        &avahi::Config {
            host_name: "app-vm",
            interface: "eth0",
            services: &[avahi::Service {
                name: APP_SHARE,
                kind: "_http._tcp",
                port: 8080,
                txt: &["path=/", &txt],
            }],
            hosts: &[],
        },
    )
    .unwrap();
    // Published alone, so its probe carries no other internal address:
    // only knowing SECOND's own network can stop it.
    let refused_before = sysfw.reason(Reason::RelayCarriesAddress).unwrap();
    avahi.set_hosts(&[("app-second.local", SECOND)]).unwrap();
    let second_refused = wait_until(Duration::from_secs(2), || {
        sysfw.reason(Reason::RelayCarriesAddress).unwrap() > refused_before
    });

    // The positive control: an mDNS lookup from the app, beside Avahi.
    let found = mdns::find(&t.app, PRINTER_TYPE, LAN_PRINTER, Duration::from_secs(15))
        .unwrap()
        .expect("the app did not find the LAN printer");
    assert_eq!(
        (found.addresses.as_slice(), found.port),
        (&[LAN_PEER][..], 631),
        "resolved {found:?}"
    );
    let lan_sees = mdns::lookup(&t.lan, "_http._tcp.local.", Duration::from_secs(3)).unwrap();
    assert!(
        !lan_sees.iter().any(|s| s.name.starts_with(APP_SHARE)),
        "the app's service was found from the LAN: {lan_sees:?}"
    );
    avahi.stop().unwrap();

    let frames = lan_capture.finish();
    let inside = app_side.finish();
    // Avahi did put every form on the app's own link.
    for (addr, form) in [
        (APP, Form::Binary),
        (APP, Form::Text),
        (APP, Form::ReversedText),
        (SECOND, Form::Binary),
        (SECOND, Form::ReversedText),
    ] {
        assert!(
            seen(&inside, addr, form),
            "Avahi sent no {form:?} of {addr} to keep inside\n{}",
            avahi.log()
        );
    }
    leak::ensure_none(&frames, &INTERNAL).unwrap();
    let queries_up = frames.iter().filter(|f| mdns::is_query(f)).count();
    let (relayed_sysfw, relayed_sysnet) =
        (sysfw.relayed_up().unwrap(), sysnet.relayed_up().unwrap());
    assert!(
        relayed_sysfw > 0 && relayed_sysnet > 0 && queries_up > 0,
        "the app's queries did not go up: sys-firewall relayed {relayed_sysfw}, sys-net {relayed_sysnet}, {queries_up} on the LAN"
    );
    assert!(
        second_refused,
        "sys-firewall counted no refused datagram when Avahi published {SECOND}"
    );
    for router in [&sysnet, &sysfw] {
        assert_eq!(router.failures().unwrap(), 0, "refused rewrites or clones");
    }
    t.ensure_no_checksum_errors().unwrap();
    println!(
        "avahi: the app resolved {} at {:?}:{}; sys-firewall relayed {relayed_sysfw} datagrams up, refused {} carrying an address and {} answers; \
         sys-net relayed {relayed_sysnet}; {} frames on the app's link, {} on the LAN ({queries_up} mDNS queries), no form of {INTERNAL:?} among them",
        found.name,
        found.addresses,
        found.port,
        sysfw.reason(Reason::RelayCarriesAddress).unwrap(),
        sysfw.reason(Reason::RelayAnswerBlocked).unwrap(),
        inside.len(),
        frames.len(),
    );
}
