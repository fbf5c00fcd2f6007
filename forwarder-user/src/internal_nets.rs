//! The internal networks: the addresses behind the downstream interfaces,
//! which no datagram a relay copies to the LAN may name (the datapath's
//! `leak` scan). Gathered from what the router knows of its downstream
//! side: the routes out of its downstream interfaces and those interfaces'
//! own addresses, every forward and relay target, and the networks the
//! operator adds (`internal`, say a VM's `net.fake-ip`).

use std::{collections::BTreeSet, net::Ipv4Addr};

use forwarder_common::maps::{PREFIX24_WORDS, net24, prefix_to_mask};

use crate::rules::{Relay, Rule};

/// The datapath's INTERNAL_NETS: one bit per /24.
pub type Bitmap = [u64; PREFIX24_WORDS];

/// Networks as (wire-order address, prefix length), the address masked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InternalNets {
    nets: BTreeSet<(u32, u8)>,
}

impl InternalNets {
    /// Everything the router knows to be internal. `routes` and
    /// `addresses` are the prefixes routed through, and assigned to, the
    /// downstream interfaces. A default route is never internal (it would
    /// make every datagram's bytes suspect), nor is 0.0.0.0/8, whose /24
    /// the scanner's "no candidate" falls in.
    pub fn gather(
        rules: &[Rule],
        relays: &[Relay],
        routes: &[(Ipv4Addr, u8)],
        addresses: &[Ipv4Addr],
        extra: &[(Ipv4Addr, u8)],
    ) -> Self {
        let mut nets = InternalNets::default();
        let hosts = rules
            .iter()
            .map(|r| r.target)
            .chain(relays.iter().flat_map(|r| r.targets.iter().copied()))
            .chain(addresses.iter().copied())
            .map(|addr| (addr, 32));
        for (addr, prefix_len) in hosts
            .chain(routes.iter().copied())
            .chain(extra.iter().copied())
        {
            if prefix_len >= 8 && addr.octets()[0] != 0 {
                nets.insert(addr, prefix_len);
            }
        }
        nets
    }

    fn insert(&mut self, addr: Ipv4Addr, prefix_len: u8) {
        let prefix_len = prefix_len.min(32);
        let masked = u32::from_ne_bytes(addr.octets()) & prefix_to_mask(prefix_len);
        self.nets.insert((masked, prefix_len));
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u8)> + '_ {
        self.nets.iter().copied()
    }

    pub fn contains(&self, addr: u32, prefix_len: u8) -> bool {
        self.nets.contains(&(addr, prefix_len))
    }

    /// One bit for every /24 that holds an address of these networks, on
    /// the heap (2 MiB).
    pub fn bitmap(&self) -> Box<Bitmap> {
        let mut bits: Box<Bitmap> = vec![0u64; PREFIX24_WORDS]
            .into_boxed_slice()
            .try_into()
            .expect("PREFIX24_WORDS words");
        for &(addr, prefix_len) in &self.nets {
            let first = net24(addr.to_ne_bytes());
            let count = 1u32 << 24u8.saturating_sub(prefix_len);
            for net in first..first + count {
                bits[(net >> 6) as usize] |= 1 << (net & 63);
            }
        }
        bits
    }
}

impl std::fmt::Display for InternalNets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.nets.is_empty() {
            return f.write_str("none");
        }
        for (i, (addr, prefix_len)) in self.nets.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}{}/{prefix_len}",
                Ipv4Addr::from(addr.to_ne_bytes())
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bit_set(bits: &Bitmap, octets: [u8; 4]) -> bool {
        let net = net24(octets);
        bits[(net >> 6) as usize] >> (net & 63) & 1 != 0
    }

    #[test]
    fn gathers_targets_routes_addresses_and_extras_but_no_default_route() {
        let nets = InternalNets::gather(
            &[],
            &[],
            &[
                (Ipv4Addr::new(10, 137, 0, 17), 32),
                (Ipv4Addr::new(192, 168, 122, 9), 24),
                (Ipv4Addr::UNSPECIFIED, 0),
                (Ipv4Addr::new(0, 0, 0, 0), 8),
            ],
            &[Ipv4Addr::new(10, 138, 0, 1)],
            &[(Ipv4Addr::new(172, 16, 1, 1), 12)],
        );
        let wire = |o: [u8; 4]| u32::from_ne_bytes(o);
        assert!(nets.contains(wire([10, 137, 0, 17]), 32));
        assert!(nets.contains(wire([192, 168, 122, 0]), 24), "masked");
        assert!(nets.contains(wire([10, 138, 0, 1]), 32));
        assert!(nets.contains(wire([172, 16, 0, 0]), 12));
        assert!(!nets.contains(0, 0));
        assert_eq!(
            nets.iter().count(),
            4,
            "no default route, nothing in 0.0.0.0/8"
        );
    }

    #[test]
    fn the_bitmap_covers_every_slash_24_a_network_touches() {
        let nets = InternalNets::gather(
            &[],
            &[],
            &[
                (Ipv4Addr::new(10, 137, 0, 17), 32),
                (Ipv4Addr::new(172, 16, 0, 0), 12),
            ],
            &[],
            &[],
        );
        let bits = nets.bitmap();
        assert!(bit_set(&bits, [10, 137, 0, 99]));
        assert!(!bit_set(&bits, [10, 137, 1, 17]));
        assert!(bit_set(&bits, [172, 16, 0, 0]) && bit_set(&bits, [172, 31, 255, 1]));
        assert!(!bit_set(&bits, [172, 32, 0, 0]) && !bit_set(&bits, [172, 15, 255, 0]));
        assert!(!bit_set(&bits, [0, 0, 0, 0]));
        let ones: u32 = bits.iter().map(|w| w.count_ones()).sum();
        assert_eq!(ones, 1 + 16 * 256);
    }
}
