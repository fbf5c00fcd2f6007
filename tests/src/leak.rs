//! Whole-frame leak search for captures on the LAN: an internal address may
//! hide anywhere in a frame, not only in its IP header: an mDNS record, a
//! discovery beacon listing the sender's addresses as text, a reverse name,
//! a quoted header. Written plainly, apart from the datapath's own scanner,
//! so that the two can be checked against each other.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};

use crate::capture::{addresses, describe};

/// How a payload can carry an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// Four bytes, as in an A record.
    Binary,
    /// The four numbers in order, one non-digit byte between each two:
    /// dotted text ("10.137.0.17"), a host name ("ip-10-137-0-17").
    Text,
    /// The numbers reversed: a reverse name as text ("17.0.137.10"), or as
    /// DNS labels, whose length bytes separate the numbers.
    ReversedText,
    /// A DNS name that spells the address either way once its compression
    /// pointers are followed: an in-addr.arpa name whose tail is shared
    /// with an earlier name.
    CompressedName,
}

/// Where `frame` carries an internal address: any 10.0.0.0/8 address in its
/// IP header (or the header an ICMP error quotes), or one of `internal`
/// anywhere in its bytes, in any form. None if nowhere.
pub fn find(frame: &[u8], internal: &[Ipv4Addr]) -> Option<String> {
    if let Some(a) = addresses(frame).into_iter().find(|a| a.octets()[0] == 10) {
        return Some(format!("{a} in an IP header"));
    }
    // DNS compression pointers count from the start of the UDP payload.
    let payload = crate::packet::parse(frame).map(|p| p.payload);
    internal
        .iter()
        .find_map(|&a| carries(frame, a).or_else(|| payload.as_deref().and_then(|p| carries(p, a))))
}

/// Where `bytes` hold `addr`, in the first form found. None if nowhere.
pub fn carries(bytes: &[u8], addr: Ipv4Addr) -> Option<String> {
    forms(bytes, addr)
        .first()
        .map(|(form, at)| format!("{addr} as {form:?} at byte {at}"))
}

/// Every form in which `bytes` hold `addr`, with the offset where each
/// occurrence starts (for a compressed name, where the name starts).
pub fn forms(bytes: &[u8], addr: Ipv4Addr) -> Vec<(Form, usize)> {
    let octets = addr.octets();
    let mut reversed = octets;
    reversed.reverse();
    let mut found = Vec::new();
    for at in 0..bytes.len() {
        if bytes[at..].starts_with(&octets) {
            found.push((Form::Binary, at));
        }
        if spells(bytes, at, octets).is_some() {
            found.push((Form::Text, at));
        }
        if spells(bytes, at, reversed).is_some() {
            found.push((Form::ReversedText, at));
        }
        // Only a name spelling the address across a pointer: what comes
        // before the pointer is found as text where it stands.
        if let Some((name, direct)) = dns_name(bytes, at)
            && (0..direct).any(|i| {
                [octets, reversed]
                    .into_iter()
                    .any(|numbers| spells(&name, i, numbers).is_some_and(|end| end > direct))
            })
        {
            found.push((Form::CompressedName, at));
        }
    }
    found
}

/// Where the four numbers end if they start at `at`: each in decimal
/// without leading zeros, one non-digit byte between each two, and no
/// digit right before or after them.
fn spells(bytes: &[u8], at: usize, numbers: [u8; 4]) -> Option<usize> {
    if at > 0 && bytes[at - 1].is_ascii_digit() {
        return None;
    }
    let mut i = at;
    for (n, number) in numbers.iter().enumerate() {
        if n > 0 {
            if bytes.get(i)?.is_ascii_digit() {
                return None;
            }
            i += 1;
        }
        let digits = number.to_string();
        if !bytes.get(i..)?.starts_with(digits.as_bytes()) {
            return None;
        }
        i += digits.len();
    }
    (!bytes.get(i).is_some_and(u8::is_ascii_digit)).then_some(i)
}

/// The DNS name starting at `at` as it would be written uncompressed (each
/// label's bytes after its length byte), and how many of its bytes stand
/// where it starts, before a compression pointer. None unless a
/// well-formed name of some label starts there.
fn dns_name(bytes: &[u8], at: usize) -> Option<(Vec<u8>, usize)> {
    let mut name = Vec::new();
    let mut direct = None;
    let mut i = at;
    let mut jumps = 0;
    loop {
        let len = *bytes.get(i)?;
        match len {
            0 => {
                return (!name.is_empty()).then(|| {
                    let direct = direct.unwrap_or(name.len());
                    (name, direct)
                });
            }
            1..=63 => {
                name.push(len);
                name.extend_from_slice(bytes.get(i + 1..i + 1 + usize::from(len))?);
                i += 1 + usize::from(len);
            }
            0xc0..=0xff => {
                jumps += 1;
                if jumps > 16 || name.is_empty() {
                    return None;
                }
                direct.get_or_insert(name.len());
                i = usize::from(len & 0x3f) << 8 | usize::from(*bytes.get(i + 1)?);
            }
            _ => return None,
        }
        if name.len() > 255 {
            return None;
        }
    }
}

/// Fails when any frame carries an internal address, saying how many did
/// and where the first one carries it.
pub fn ensure_none(frames: &[Vec<u8>], internal: &[Ipv4Addr]) -> Result<()> {
    let leaks: Vec<(String, &Vec<u8>)> = frames
        .iter()
        .filter_map(|f| find(f, internal).map(|why| (why, f)))
        .collect();
    let mut examples: Vec<String> = Vec::new();
    for (why, frame) in &leaks {
        let example = format!("{why} ({})", describe(frame));
        if examples.len() < 8 && !examples.contains(&example) {
            examples.push(example);
        }
    }
    ensure!(
        leaks.is_empty(),
        "{} of {} frames carry internal addresses, e.g.\n  {}",
        leaks.len(),
        frames.len(),
        examples.join("\n  ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Frame;

    const APP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 17);

    fn kinds(bytes: &[u8]) -> Vec<Form> {
        forms(bytes, APP).into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn finds_addresses_in_headers_payloads_and_text() {
        let lan = Ipv4Addr::new(192, 168, 1, 2);
        let peer = Ipv4Addr::new(192, 168, 1, 10);
        let clean = Frame::udp(lan, 5353, peer, 5353).with_payload(b"nothing here");
        assert_eq!(find(&clean.build(), &[APP]), None);
        let header = Frame::udp(APP, 5353, peer, 5353).build();
        assert!(find(&header, &[]).unwrap().contains("header"));
        let record = Frame::udp(lan, 5353, peer, 5353).with_payload(&[0, 1, 10, 137, 0, 17, 2]);
        assert!(find(&record.build(), &[APP]).unwrap().contains("Binary"));
        let text = Frame::udp(lan, 1, peer, 2).with_payload(b"tcp://10.137.0.17:22000");
        assert!(find(&text.build(), &[APP]).unwrap().contains("Text"));
    }

    #[test]
    fn every_form_of_an_address() {
        assert_eq!(kinds(b"LOCATION: http://10.137.0.17:80/"), [Form::Text]);
        assert_eq!(kinds(b"host ip-10-137-0-17.local"), [Form::Text]);
        assert_eq!(kinds(b"17.0.137.10.in-addr.arpa"), [Form::ReversedText]);
        assert_eq!(
            kinds(b"\x0217\x010\x03137\x0210\x07in-addr\x04arpa\x00"),
            [Form::ReversedText]
        );
        // Only "17" and "0" are labels of the second name; the rest is the
        // tail of the first, which names another address.
        let mut shared = b"\x0217\x011\x03137\x0210\x07in-addr\x04arpa\x00".to_vec();
        let second = shared.len();
        shared.extend_from_slice(b"\x0217\x010\xc0\x05");
        assert_eq!(forms(&shared, APP), [(Form::CompressedName, second)]);
    }

    #[test]
    fn other_numbers_are_not_the_address() {
        for text in [
            &b"110.137.0.17"[..],
            b"10.137.0.170",
            b"10.137.0.1",
            b"10..137.0.17",
            b"10.137.00.17",
            b"\x0a\x89\x00",
        ] {
            assert!(
                kinds(text).is_empty(),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }
}
