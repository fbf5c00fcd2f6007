//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! Checksums and 16-bit words are handled as the numeric value of the
//! big-endian word on the wire (`u16::from_be_bytes`), so callers never have
//! to think about host byte order.

/// One's-complement sum of `data` as big-endian 16-bit words, added to `sum`.
/// An odd trailing byte is padded with zero, as RFC 1071 requires.
pub fn add_bytes(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds a wide one's-complement sum to 16 bits with end-around carry.
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum to store for `data` whose checksum field is zero.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(add_bytes(0, data))
}

/// Sum of the IPv4 pseudo-header that TCP and UDP checksums cover.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u64 {
    let sum = add_bytes(0, &src);
    let sum = add_bytes(sum, &dst);
    sum + u64::from(proto) + u64::from(l4_len)
}

/// True when a header or segment including its own checksum field sums to
/// all ones, i.e. the stored checksum is right.
pub fn verifies(initial: u64, data: &[u8]) -> bool {
    fold(add_bytes(initial, data)) == 0xffff
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changed from `old`
/// to `new`, without touching the rest of the data.
pub fn update_word(check: u16, old: u16, new: u16) -> u16 {
    let sum = u64::from(!check) + u64::from(!old) + u64::from(new);
    !fold(sum)
}

/// The checksum after a 4-byte field (an IPv4 address) changed.
pub fn update_addr(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let hi = update_word(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    update_word(
        hi,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic and dependency-free, plenty for test data.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            core::array::from_fn(|_| self.next() as u8)
        }
    }

    fn random_ipv4_header(rng: &mut Rng) -> [u8; 20] {
        let mut hdr: [u8; 20] = rng.bytes();
        hdr[0] = 0x45;
        hdr[8] = hdr[8].max(2);
        hdr[10] = 0;
        hdr[11] = 0;
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        hdr
    }

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 section 3: sum 0xddf2, checksum !0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add_bytes(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_is_zero_padded() {
        assert_eq!(checksum(&[0xab]), checksum(&[0xab, 0x00]));
    }

    #[test]
    fn known_ipv4_header() {
        // A captured header whose checksum is 0xb861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
        hdr[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verifies(0, &hdr));
    }

    #[test]
    fn incremental_address_update_matches_full_recomputation() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..100_000 {
            let mut hdr = random_ipv4_header(&mut rng);
            let check = u16::from_be_bytes([hdr[10], hdr[11]]);
            let field = if rng.next() & 1 == 0 { 12 } else { 16 };
            let old: [u8; 4] = hdr[field..field + 4].try_into().unwrap();
            let new: [u8; 4] = rng.bytes();
            hdr[field..field + 4].copy_from_slice(&new);
            let incremental = update_addr(check, old, new);
            hdr[10] = 0;
            hdr[11] = 0;
            assert_eq!(incremental, checksum(&hdr), "header {hdr:02x?}");
        }
    }

    #[test]
    fn incremental_ttl_decrement_matches_full_recomputation() {
        let mut rng = Rng(42);
        for _ in 0..100_000 {
            let mut hdr = random_ipv4_header(&mut rng);
            let check = u16::from_be_bytes([hdr[10], hdr[11]]);
            let old = u16::from_be_bytes([hdr[8], hdr[9]]);
            hdr[8] -= 1;
            let new = u16::from_be_bytes([hdr[8], hdr[9]]);
            let incremental = update_word(check, old, new);
            hdr[10] = 0;
            hdr[11] = 0;
            assert_eq!(incremental, checksum(&hdr));
        }
    }

    #[test]
    fn incremental_updates_compose() {
        // DNAT changes the address and the TTL; the forwarder applies both
        // updates in sequence, which must equal one full recomputation.
        let mut rng = Rng(7);
        for _ in 0..100_000 {
            let mut hdr = random_ipv4_header(&mut rng);
            let hdr_check = u16::from_be_bytes([hdr[10], hdr[11]]);
            let old_ttl = u16::from_be_bytes([hdr[8], hdr[9]]);
            let old_dst: [u8; 4] = hdr[16..20].try_into().unwrap();
            let new_dst: [u8; 4] = rng.bytes();
            hdr[8] -= 1;
            hdr[16..20].copy_from_slice(&new_dst);
            let new_ttl = u16::from_be_bytes([hdr[8], hdr[9]]);
            let check = update_word(update_addr(hdr_check, old_dst, new_dst), old_ttl, new_ttl);
            hdr[10..12].copy_from_slice(&check.to_be_bytes());
            assert!(verifies(0, &hdr));
        }
    }

    #[test]
    fn transport_checksum_over_pseudo_header() {
        let mut rng = Rng(99);
        for _ in 0..10_000 {
            let src: [u8; 4] = rng.bytes();
            let dst: [u8; 4] = rng.bytes();
            let mut seg: [u8; 37] = rng.bytes();
            seg[6] = 0;
            seg[7] = 0;
            let len = seg.len() as u16;
            let c = !fold(add_bytes(pseudo_header_sum(src, dst, 17, len), &seg));
            seg[6..8].copy_from_slice(&c.to_be_bytes());
            assert!(verifies(pseudo_header_sum(src, dst, 17, len), &seg));
            seg[20] ^= 0x10;
            assert!(!verifies(pseudo_header_sum(src, dst, 17, len), &seg));
        }
    }
}
