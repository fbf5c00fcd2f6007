//! Whole-frame leak search for captures on the LAN: an internal address may
//! hide anywhere in a frame, not only in its IP header: an mDNS record, a
//! discovery beacon listing the sender's addresses as text, a quoted header.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};

use crate::capture::{addresses, describe};

/// Where `frame` carries an internal address: any 10.0.0.0/8 address in its
/// IP header (or the header an ICMP error quotes), or one of `internal`
/// anywhere in its bytes. None if nowhere.
pub fn find(frame: &[u8], internal: &[Ipv4Addr]) -> Option<String> {
    if let Some(a) = addresses(frame).into_iter().find(|a| a.octets()[0] == 10) {
        return Some(format!("{a} in an IP header"));
    }
    internal.iter().find_map(|a| carries(frame, *a))
}

/// Where `bytes` hold `addr`, in binary (as in an A record) or as dotted
/// text (as in a URL). None if nowhere.
pub fn carries(bytes: &[u8], addr: Ipv4Addr) -> Option<String> {
    if let Some(at) = position(bytes, &addr.octets()) {
        return Some(format!("{addr} in binary at byte {at}"));
    }
    position(bytes, addr.to_string().as_bytes()).map(|at| format!("{addr} as text at byte {at}"))
}

fn position(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Fails when any frame carries an internal address, saying how many did
/// and where the first one carries it.
pub fn ensure_none(frames: &[Vec<u8>], internal: &[Ipv4Addr]) -> Result<()> {
    let leaks: Vec<(String, &Vec<u8>)> = frames
        .iter()
        .filter_map(|f| find(f, internal).map(|why| (why, f)))
        .collect();
    ensure!(
        leaks.is_empty(),
        "{} of {} frames carry internal addresses, e.g. {} ({})",
        leaks.len(),
        frames.len(),
        leaks[0].0,
        describe(leaks[0].1)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Frame;

    #[test]
    fn finds_addresses_in_headers_payloads_and_text() {
        let lan = Ipv4Addr::new(192, 168, 1, 2);
        let peer = Ipv4Addr::new(192, 168, 1, 10);
        let app = Ipv4Addr::new(10, 137, 0, 17);
        let clean = Frame::udp(lan, 5353, peer, 5353).with_payload(b"nothing here");
        assert_eq!(find(&clean.build(), &[app]), None);
        let header = Frame::udp(app, 5353, peer, 5353).build();
        assert!(find(&header, &[]).unwrap().contains("header"));
        let record = Frame::udp(lan, 5353, peer, 5353).with_payload(&[0, 1, 10, 137, 0, 17, 2]);
        assert!(find(&record.build(), &[app]).unwrap().contains("binary"));
        let text = Frame::udp(lan, 1, peer, 2).with_payload(b"tcp://10.137.0.17:22000");
        assert!(find(&text.build(), &[app]).unwrap().contains("text"));
    }
}
