//! The transport checksum arithmetic of `bpf_l4_csum_replace` as the
//! datapath calls it, on the skbs BPF_PROG_TEST_RUN builds (no checksum
//! offload: the kernel's `csum_replace4` on the field), done as the kernel
//! does it on this little-endian host: values as they sit in memory, the
//! one's-complement zero it happens to produce included. The oracle needs
//! the exact bytes of every rewrite, not only a checksum that verifies.
//! (The IP header checksum the programs update themselves, with
//! forwarder_common::csum, which the oracle calls as they do.)

/// `csum_add`: 32-bit one's-complement addition.
fn add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u32::from(carry)
}

/// `csum_fold`: the complement of the sum folded to 16 bits.
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum field (as stored) after a value the checksum covers
/// changed from `from` to `to`, each the native `u32` of its bytes in
/// memory (a 2-byte value zero-extended, as `inet_proto_csum_replace2`
/// passes it on).
fn replace4(check: [u8; 2], from: u32, to: u32) -> [u8; 2] {
    let sum = u32::from(u16::from_ne_bytes(check));
    fold(add(add(!sum, !from), to)).to_ne_bytes()
}

/// What `bpf_l4_csum_replace` leaves in a TCP or UDP checksum field when
/// an address (4 bytes, `pseudo` or not) or a port (2 bytes) changes from
/// `from` to `to`, given as their bytes on the wire. With `udp` set
/// (BPF_F_MARK_MANGLED_0), a zero checksum means "none" and stays zero,
/// and a result of zero is written as 0xffff.
pub fn l4_replace(check: [u8; 2], from: &[u8], to: &[u8], udp: bool) -> [u8; 2] {
    if udp && check == [0, 0] {
        return check;
    }
    let native = |bytes: &[u8]| match *bytes {
        [a, b] => u32::from(u16::from_ne_bytes([a, b])),
        [a, b, c, d] => u32::from_ne_bytes([a, b, c, d]),
        _ => unreachable!("checksum replacements are of 2 or 4 bytes"),
    };
    let new = replace4(check, native(from), native(to));
    if udp && new == [0, 0] {
        [0xff, 0xff]
    } else {
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_common::csum;

    /// A UDP segment over a pseudo header, and whether its checksum holds.
    fn verifies(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> bool {
        let pseudo = csum::pseudo_header_sum(src, dst, 17, segment.len() as u16);
        csum::verifies(pseudo, segment)
    }

    #[test]
    fn an_address_change_keeps_the_checksum_valid() {
        let (src, dst, new) = ([10, 137, 0, 5], [224, 0, 0, 167], [192, 168, 1, 2]);
        let mut segment = vec![0xd0, 0x45, 0xd0, 0x45, 0, 12, 0, 0, 1, 2, 3, 4];
        let pseudo = csum::pseudo_header_sum(src, dst, 17, 12);
        let check = !csum::fold(csum::add_bytes(pseudo, &segment));
        segment[6..8].copy_from_slice(&check.to_be_bytes());
        let replaced = l4_replace([segment[6], segment[7]], &src, &new, true);
        segment[6..8].copy_from_slice(&replaced);
        assert!(verifies(new, dst, &segment));
        let port = l4_replace(replaced, &[0xd0, 0x45], &[0x00, 0x50], true);
        segment[6..8].copy_from_slice(&port);
        segment[0..2].copy_from_slice(&[0x00, 0x50]);
        assert!(verifies(new, dst, &segment));
    }

    #[test]
    fn no_udp_checksum_stays_none() {
        assert_eq!(
            l4_replace([0, 0], &[1, 2, 3, 4], &[5, 6, 7, 8], true),
            [0, 0]
        );
        assert_ne!(
            l4_replace([0, 0], &[1, 2, 3, 4], &[5, 6, 7, 8], false),
            [0, 0]
        );
    }
}
