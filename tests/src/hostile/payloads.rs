//! Datagram payloads of the discovery protocols the relays carry (mDNS
//! queries, probes and answers, SSDP, LocalSend and KDE Connect
//! announcements, and plain binary), with addresses embedded in every form
//! software writes one in: 4 bytes, dotted text, the reverse name as text
//! or as DNS labels, a hyphenated host name, and the reverse name
//! compressed across a DNS pointer (which the filter does not promise to
//! see). Padded to any length, up to and past what the filter scans.

use std::net::Ipv4Addr;

use super::rng::Rng;
use crate::testrun::{LAN_PEER, OTHER_VM, TARGET, UNRESOLVED, UPLINK_ADDR, VIF_ADDR};

/// How an address is written into a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Raw,
    Dotted,
    Reversed,
    /// "d.c.b.a.in-addr.arpa" as text.
    ReverseName,
    /// The reverse name as DNS labels.
    Labels,
    /// "ip-a-b-c-d".
    Hyphenated,
    /// The reverse name's first two labels, then a pointer to the rest of
    /// an earlier name: the address is never written whole.
    Compressed,
}

const FORMS: [Form; 7] = [
    Form::Raw,
    Form::Dotted,
    Form::Reversed,
    Form::ReverseName,
    Form::Labels,
    Form::Hyphenated,
    Form::Compressed,
];

/// Addresses in the harness's internal /24s (see `super::INTERNAL_NETS`).
const INTERNAL: [Ipv4Addr; 6] = [
    TARGET,
    OTHER_VM,
    UNRESOLVED,
    VIF_ADDR,
    Ipv4Addr::new(10, 137, 0, 200),
    Ipv4Addr::new(10, 138, 0, 99),
];

/// Addresses a datagram may name freely: LAN hosts, the router's LAN
/// address, the Internet, and 10/8 networks that are not internal here.
const EXTERNAL: [Ipv4Addr; 6] = [
    LAN_PEER,
    UPLINK_ADDR,
    Ipv4Addr::new(8, 8, 8, 8),
    Ipv4Addr::new(10, 137, 1, 5),
    Ipv4Addr::new(10, 139, 0, 17),
    Ipv4Addr::new(192, 168, 1, 200),
];

/// A generated payload, and whether it names an internal address whole in
/// a form the filter promises to catch.
pub struct Payload {
    pub bytes: Vec<u8>,
    pub names_internal: bool,
}

/// One address, written in `form`. A compressed reverse name needs the
/// earlier name it points into: that comes first, at offset `at` of the
/// payload (for the pointer's value).
fn written(addr: Ipv4Addr, form: Form, at: usize) -> Vec<u8> {
    let [a, b, c, d] = addr.octets();
    match form {
        Form::Raw => addr.octets().to_vec(),
        Form::Dotted => format!("{a}.{b}.{c}.{d}").into_bytes(),
        Form::Reversed => format!("{d}.{c}.{b}.{a}").into_bytes(),
        Form::ReverseName => format!("{d}.{c}.{b}.{a}.in-addr.arpa").into_bytes(),
        Form::Labels => labels(&[
            &d.to_string(),
            &c.to_string(),
            &b.to_string(),
            &a.to_string(),
            "in-addr",
            "arpa",
        ]),
        Form::Compressed => {
            // An earlier name for another host of the /16, whose tail
            // "b.a.in-addr.arpa" the address's name points into.
            let other = labels(&["5", "5", &b.to_string(), &a.to_string(), "in-addr", "arpa"]);
            let tail = at + 4;
            let mut out = other;
            out.extend(
                labels(&[&d.to_string(), &c.to_string()])
                    .split_last()
                    .expect("labels")
                    .1,
            );
            out.extend_from_slice(&[0xc0 | (tail >> 8) as u8 & 0x3f, tail as u8]);
            out
        }
        Form::Hyphenated => format!("ip-{a}-{b}-{c}-{d}").into_bytes(),
    }
}

/// DNS labels, ending with the root.
fn labels(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.push(part.len() as u8);
        out.extend_from_slice(part.as_bytes());
    }
    out.push(0);
    out
}

/// A DNS header: id 0, `flags`, and the section counts.
fn dns_header(flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut out = vec![0, 0];
    out.extend_from_slice(&flags.to_be_bytes());
    for count in counts {
        out.extend_from_slice(&count.to_be_bytes());
    }
    out
}

/// Bytes that can never complete an address, so filler changes nothing
/// the filter sees.
fn filler(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| b'a' + rng.below(26) as u8).collect()
}

/// A payload of `kind`'s shape naming `addresses`.
fn shaped(rng: &mut Rng, kind: u64, addresses: &[(Ipv4Addr, Form)]) -> Vec<u8> {
    let mut out = Vec::new();
    let add = |out: &mut Vec<u8>, before: &[u8], addr: Ipv4Addr, form: Form, after: &[u8]| {
        out.extend_from_slice(before);
        let at = out.len();
        out.extend(written(addr, form, at));
        out.extend_from_slice(after);
    };
    match kind {
        // An mDNS query or probe (QR clear): questions, then records.
        0 => {
            out = dns_header(0, [1, 0, addresses.len() as u16, 0]);
            out.extend(labels(&["app-vm", "local"]));
            out.extend_from_slice(&[0, 0xff, 0, 1]);
            for &(addr, form) in addresses {
                add(
                    &mut out,
                    &[],
                    addr,
                    form,
                    &[0, 0x0c, 0, 1, 0, 0, 0, 120, 0, 2, 0xc0, 12],
                );
            }
        }
        // An mDNS answer (QR set), which the mDNS relay never lets up.
        1 => {
            out = dns_header(0x8400, [0, addresses.len() as u16, 0, 0]);
            for &(addr, form) in addresses {
                add(
                    &mut out,
                    &[0xc0, 12, 0, 1, 0x80, 1, 0, 0, 0, 120, 0, 4],
                    addr,
                    form,
                    &[],
                );
            }
        }
        // SSDP.
        2 => {
            out.extend_from_slice(b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n");
            for &(addr, form) in addresses {
                add(
                    &mut out,
                    b"LOCATION: http://",
                    addr,
                    form,
                    b":8080/desc.xml\r\n",
                );
            }
            out.extend_from_slice(b"NT: upnp:rootdevice\r\n\r\n");
        }
        // LocalSend's announcement, with the addresses some clients add.
        3 => {
            out.extend_from_slice(br#"{"alias":"App","version":"2.1","deviceModel":"Linux","fingerprint":"f00d","port":53317,"protocol":"https","announce":true"#);
            for &(addr, form) in addresses {
                add(&mut out, br#","ip":""#, addr, form, br#"""#);
            }
            out.push(b'}');
        }
        // KDE Connect's identity.
        4 => {
            out.extend_from_slice(
                br#"{"id":1,"type":"kdeconnect.identity","body":{"deviceId":"app""#,
            );
            for &(addr, form) in addresses {
                add(&mut out, br#","deviceName":""#, addr, form, br#"""#);
            }
            out.extend_from_slice(b"}}\n");
        }
        // Binary, each address behind a random gap.
        _ => {
            for &(addr, form) in addresses {
                let len = rng.below(40) as usize;
                let gap = filler(rng, len);
                add(&mut out, &gap, addr, form, b"!");
            }
        }
    }
    out
}

/// A payload of a random shape, naming up to three addresses (internal or
/// not, in any form) or none, padded with filler at the front to a random
/// length: short, anywhere up to a full frame, exactly where the filter's
/// 1500-byte limit falls (for a datagram carried whole), or longer for
/// fragment trains.
pub fn generate(rng: &mut Rng) -> Payload {
    let mut addresses = Vec::new();
    for _ in 0..rng.below(4) {
        let addr = if rng.chance(50) {
            rng.pick(&INTERNAL)
        } else if rng.chance(80) {
            rng.pick(&EXTERNAL)
        } else {
            Ipv4Addr::from(rng.next_u64() as u32)
        };
        addresses.push((addr, rng.pick(&FORMS)));
    }
    let kind = rng.below(6);
    let body = shaped(rng, kind, &addresses);
    let names_internal = addresses.iter().any(|&(addr, form)| {
        form != Form::Compressed
            && INTERNAL
                .iter()
                .any(|i| i.octets()[..3] == addr.octets()[..3])
    });
    let udp_payload_for = |tot_len: usize| tot_len.saturating_sub(28);
    let target = match rng.below(6) {
        0 => body.len(),
        1 => body.len() + rng.below(1400) as usize,
        2 => udp_payload_for(1500 - rng.below(3) as usize),
        3 => udp_payload_for(1501 + rng.below(4) as usize),
        4 => body.len() + rng.below(4000) as usize,
        _ => body.len() + rng.below(64) as usize,
    };
    // Filler goes in front (a DNS message's counts then no longer match,
    // which the filter does not look at), so the body's addresses sit
    // anywhere, across any fragment boundary.
    let mut bytes = filler(rng, target.saturating_sub(body.len()));
    if kind <= 1 && rng.chance(50) {
        // A DNS message stays one: the filler goes behind it instead.
        bytes = [body, bytes].concat();
    } else {
        bytes.extend(body);
    }
    Payload {
        bytes,
        names_internal,
    }
}
