//! Building and checking Ethernet/IPv4/TCP/UDP frames for packet-in,
//! packet-out tests. Checksums come from forwarder-common's reference
//! implementation, never from the code under test.

use std::net::Ipv4Addr;

use forwarder_common::csum;

pub const ETH_P_IP: u16 = 0x0800;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub type Mac = [u8; 6];

/// Every header field a test may want to bend.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    /// 802.1Q tag inserted before the EtherType.
    pub vlan: Option<u16>,
    pub ether_type: u16,
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub ttl: u8,
    pub proto: u8,
    pub ip_id: u16,
    /// Flags and fragment offset as on the wire (0x4000 = DF).
    pub frag: u16,
    pub ip_options: Vec<u8>,
    /// Overrides the computed IP total length.
    pub tot_len: Option<u16>,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    pub tcp_window: u16,
    /// TCP options, padded by the caller to a multiple of four bytes.
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Send UDP with checksum 0 ("none").
    pub udp_no_checksum: bool,
}

impl Frame {
    pub fn tcp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Self {
        Frame {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            ether_type: ETH_P_IP,
            saddr,
            daddr,
            ttl: 64,
            proto: TCP,
            ip_id: 0x1234,
            frag: 0x4000,
            ip_options: Vec::new(),
            tot_len: None,
            sport,
            dport,
            tcp_flags: 0x02,
            tcp_seq: 0x0101_0101,
            tcp_ack: 0,
            tcp_window: 64240,
            tcp_options: Vec::new(),
            payload: Vec::new(),
            udp_no_checksum: false,
        }
    }

    pub fn udp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Self {
        Frame {
            proto: UDP,
            tcp_flags: 0,
            ..Frame::tcp(saddr, sport, daddr, dport)
        }
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    fn l4(&self) -> Vec<u8> {
        match self.proto {
            TCP => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..8].copy_from_slice(&self.tcp_seq.to_be_bytes());
                h[8..12].copy_from_slice(&self.tcp_ack.to_be_bytes());
                h[12] = (((20 + self.tcp_options.len()) / 4) << 4) as u8;
                h[13] = self.tcp_flags;
                h[14..16].copy_from_slice(&self.tcp_window.to_be_bytes());
                h.extend_from_slice(&self.tcp_options);
                h.extend_from_slice(&self.payload);
                h
            }
            UDP => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&self.payload);
                h
            }
            _ => self.payload.clone(),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = self.l4();
        let check_at = match self.proto {
            TCP => Some(16),
            UDP if !self.udp_no_checksum => Some(6),
            _ => None,
        };
        if let Some(at) = check_at {
            let pseudo = csum::pseudo_header_sum(
                self.saddr.octets(),
                self.daddr.octets(),
                self.proto,
                l4.len() as u16,
            );
            let mut c = !csum::fold(csum::add_bytes(pseudo, &l4));
            if self.proto == UDP && c == 0 {
                c = 0xffff;
            }
            l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        let ihl = 5 + self.ip_options.len() / 4;
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | ihl as u8;
        let tot_len = self.tot_len.unwrap_or((ihl * 4 + l4.len()) as u16);
        ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
        ip[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.saddr.octets());
        ip[16..20].copy_from_slice(&self.daddr.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = csum::checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut frame = Vec::with_capacity(18 + ip.len() + l4.len());
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        if let Some(tci) = self.vlan {
            frame.extend_from_slice(&0x8100u16.to_be_bytes());
            frame.extend_from_slice(&tci.to_be_bytes());
        }
        frame.extend_from_slice(&self.ether_type.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// Splits an untagged IPv4 frame (no IP options) into fragments carrying at
/// most `size` bytes of IP payload each (a multiple of 8), as a sender's
/// stack does: each a frame with the same Ethernet header, the IP header
/// adjusted (length, offset, more-fragments) and its checksum recomputed.
pub fn fragments(frame: &[u8], size: usize) -> Vec<Vec<u8>> {
    let (eth, ip) = frame.split_at(14);
    let (header, payload) = ip.split_at(20);
    payload
        .chunks(size)
        .enumerate()
        .map(|(i, chunk)| {
            let mut h = header.to_vec();
            h[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            let more = (i + 1) * size < payload.len();
            let offset = (i * size / 8) as u16 | if more { 0x2000 } else { 0 };
            h[6..8].copy_from_slice(&offset.to_be_bytes());
            h[10..12].copy_from_slice(&[0, 0]);
            let c = csum::checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            [eth, &h, chunk].concat()
        })
        .collect()
}

/// The frame fragments came from: the first's Ethernet header and the
/// payloads in offset order, the IP header made whole again. Checksums are
/// recomputed only for the IP header, so a rewritten transport checksum is
/// checked by `parse`.
pub fn reassemble(fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut sorted: Vec<&Vec<u8>> = fragments.iter().collect();
    sorted.sort_by_key(|f| u16::from_be_bytes([f[20], f[21]]) & 0x1fff);
    let first = sorted[0];
    let mut payload = Vec::new();
    for f in &sorted {
        payload.extend_from_slice(&f[34..]);
    }
    let mut h = first[14..34].to_vec();
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&[0, 0]);
    h[10..12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    [&first[..14], &h, &payload].concat()
}

/// An untagged IPv4 TCP/UDP frame as read back, with its checksums checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub ttl: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ip_checksum_ok: bool,
    pub l4_checksum_ok: bool,
    pub udp_checksum_zero: bool,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

pub fn parse(frame: &[u8]) -> Option<Parsed> {
    if frame.len() < 34 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || tot_len > ip.len() || tot_len < ihl {
        return None;
    }
    let saddr = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let daddr = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..tot_len];
    let pseudo = csum::pseudo_header_sum(saddr.octets(), daddr.octets(), ip[9], l4.len() as u16);
    let (hlen, udp_zero) = match ip[9] {
        TCP if l4.len() >= 20 => (usize::from(l4[12] >> 4) * 4, false),
        UDP if l4.len() >= 8 => (8, l4[6] == 0 && l4[7] == 0),
        _ => return None,
    };
    Some(Parsed {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        saddr,
        daddr,
        ttl: ip[8],
        proto: ip[9],
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        ip_checksum_ok: csum::verifies(0, &ip[..ihl]),
        l4_checksum_ok: udp_zero || csum::verifies(pseudo, l4),
        udp_checksum_zero: udp_zero,
        tcp_flags: if ip[9] == TCP { l4[13] } else { 0 },
        payload: l4.get(hlen..)?.to_vec(),
    })
}

/// An ICMP error from `saddr` to `daddr` quoting the first 28 bytes of the IP
/// packet inside `quoted` (a frame as built above).
pub fn icmp_error(saddr: Ipv4Addr, daddr: Ipv4Addr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let inner = &quoted[14..14 + 28];
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(inner);
    let c = csum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Frame {
        proto: ICMP,
        payload: icmp,
        ..Frame::udp(saddr, 0, daddr, 0)
    }
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let a = Ipv4Addr::new(192, 168, 1, 10);
        let b = Ipv4Addr::new(192, 168, 1, 2);
        for frame in [
            Frame::tcp(a, 40000, b, 53317).with_payload(b"hello"),
            Frame::udp(a, 40000, b, 53317).with_payload(b"odd"),
        ] {
            let parsed = parse(&frame.build()).unwrap();
            assert!(parsed.ip_checksum_ok && parsed.l4_checksum_ok);
            assert_eq!((parsed.saddr, parsed.dport), (a, 53317));
        }
        let mut bytes = Frame::udp(a, 1, b, 2).with_payload(b"xyz").build();
        bytes[14 + 20 + 8] ^= 1;
        assert!(
            !parse(&bytes).unwrap().l4_checksum_ok,
            "a corrupted payload must fail"
        );
    }
}
