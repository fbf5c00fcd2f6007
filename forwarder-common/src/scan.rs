//! The address scanner of relays toward the LAN: fed a datagram's payload
//! byte by byte, it names every IPv4 address the bytes could spell in the
//! forms software writes one in: four raw bytes, dotted text ("10.137.0.17"),
//! and the reverse name ("17.0.137.10", as text or as DNS labels, whose
//! length bytes separate the numbers as dots do). Any single non-digit
//! byte separates the numbers, so "ip-10-137-0-17" counts too. Its state
//! is small and plain, so a fragmented datagram is scanned across its
//! fragments. Which of the named addresses are internal, the caller's map
//! decides.
//!
//! The BPF verifier walks the scan once per byte, and gives up after 8,192
//! undecided branches: a byte therefore costs no branch at all. Every
//! decision is a table lookup multiplied in, and the tables are read
//! volatile, so the compiler cannot turn the arithmetic back into branches.

use crate::maps::AddressScan;

/// What one byte names: the /24 (see `maps::net24`) of the four bytes
/// ending with it, and of a run of four numbers ending before it, read
/// both ways; 0 for none (no internal network holds 0.0.0.0/24).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Candidates {
    pub raw: u32,
    pub written: u32,
    pub reversed: u32,
}

/// Per byte: a digit's value in the low four bits, and 0x10 for a digit.
static BYTE_CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut d = 0;
    while d < 10 {
        table[b'0' as usize + d] = 0x10 | d as u8;
        d += 1;
    }
    table
};
/// The class `finish` gives the end of the payload: a non-digit.
const SEPARATOR: u32 = 0;
// Per count of digits read so far (0 to 4), and per count of numbers in
// the run (0 to 4). Each table holds one fact as 0 or 1, never packed: the
// compiler turns a product with a masked bit into a branch.
/// 1 for a number of one to three digits.
static OCTET_LENGTH: [u8; 8] = [0, 1, 1, 1, 0, 0, 0, 0];
/// 1 for any digits at all.
static SOME_DIGITS: [u8; 8] = [0, 1, 1, 1, 1, 1, 1, 1];
/// The count after one more (saturating at 4).
static SATURATED_NEXT: [u8; 8] = [1, 2, 3, 4, 4, 4, 4, 4];
/// 1 when one more number makes the run's fourth.
static FOURTH_NEXT: [u8; 8] = [0, 0, 0, 1, 1, 1, 1, 1];
/// 1 for a value an octet can take; read only for numbers of at most three
/// digits (at most 999).
static OCTET_VALUE: [u8; 1024] = {
    let mut table = [0u8; 1024];
    let mut v = 0;
    while v < 256 {
        table[v] = 1;
        v += 1;
    }
    table
};

/// `table[index]`, the index wrapped to the table's power-of-two size, read
/// so that the compiler knows nothing of the value.
#[inline(always)]
fn at<const N: usize>(table: &'static [u8; N], index: u32) -> u32 {
    // SAFETY: the index is masked into the table.
    u32::from(unsafe { core::ptr::read_volatile(table.as_ptr().add(index as usize & (N - 1))) })
}

impl AddressScan {
    /// One more byte of the payload.
    #[inline(always)]
    pub fn feed(&mut self, byte: u8) -> Candidates {
        self.window = (self.window << 8) | u32::from(byte);
        let mut found = self.step(at(&BYTE_CLASS, u32::from(byte)));
        found.raw = (self.window >> 8) & 0x00ff_ffff;
        found
    }

    /// The payload ended: a number running up to its last byte is complete.
    #[inline(always)]
    pub fn finish(&mut self) -> Candidates {
        self.step(SEPARATOR)
    }

    /// One byte of `class` for the text forms. A digit extends the number
    /// being read. A non-digit ends it: a number of one to three digits and
    /// at most 255 joins the run of numbers, any other number breaks the
    /// run, and so does a second non-digit in a row. The run's last four
    /// numbers are named when a non-digit completes the fourth.
    #[inline(always)]
    fn step(&mut self, class: u32) -> Candidates {
        let digit = class >> 4;
        let separator = digit ^ 1;
        let (run, acc) = (self.run, self.acc);
        let octets = u32::from(self.octets);
        let gap = u32::from(self.gap);
        let ndigits = u32::from(self.ndigits);

        let valid = at(&OCTET_LENGTH, ndigits) * at(&OCTET_VALUE, acc);
        let pushed = (run << 8) | (acc & 0xff);
        let run_ended = run.wrapping_add(valid.wrapping_mul(pushed.wrapping_sub(run)));
        let octets_ended = valid * at(&SATURATED_NEXT, octets)
            + (1 - at(&SOME_DIGITS, ndigits)) * (1 - gap) * octets;
        let emit = separator * valid * at(&FOURTH_NEXT, octets);

        let run = run.wrapping_add(separator.wrapping_mul(run_ended.wrapping_sub(run)));
        self.run = run;
        self.octets = (digit * octets + separator * octets_ended) as u8;
        self.acc = digit.wrapping_mul(acc.wrapping_mul(10).wrapping_add(class & 0xf));
        self.ndigits = (digit * at(&SATURATED_NEXT, ndigits)) as u8;
        self.gap = separator as u8;
        Candidates {
            raw: 0,
            written: emit * (run >> 8),
            reversed: emit * (((run & 0xff) << 16) | (run & 0xff00) | ((run >> 16) & 0xff)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::net24;

    /// What the scanner names of an address: its /24.
    fn wire(octets: [u8; 4]) -> u32 {
        net24(octets)
    }

    fn take(out: &mut Vec<u32>, c: Candidates) {
        out.extend(
            [c.raw, c.written, c.reversed]
                .into_iter()
                .filter(|&a| a != 0),
        );
    }

    /// Every address the scanner names in `bytes`, as a complete datagram.
    fn named(bytes: &[u8]) -> Vec<u32> {
        let mut scan = AddressScan::default();
        let mut out = Vec::new();
        for &b in bytes {
            take(&mut out, scan.feed(b));
        }
        take(&mut out, scan.finish());
        out
    }

    const VM: [u8; 4] = [10, 137, 0, 17];

    #[test]
    fn raw_bytes_anywhere() {
        let mut payload = b"\x00\x01xyz".to_vec();
        payload.extend_from_slice(&VM);
        payload.extend_from_slice(b"tail");
        assert!(named(&payload).contains(&wire(VM)));
        assert!(named(&VM).contains(&wire(VM)));
        assert!(!named(&VM[..3]).contains(&wire(VM)));
    }

    #[test]
    fn dotted_text_and_reverse_names() {
        for text in [
            &b"LOCATION: http://10.137.0.17:8080/desc.xml"[..],
            b"10.137.0.17",
            b"addr=10.137.0.17;",
            b"17.0.137.10.in-addr.arpa",
            b"\x0217\x010\x03137\x0210\x07in-addr\x04arpa\x00",
            b"ip-10-137-0-17",
        ] {
            assert!(
                named(text).contains(&wire(VM)),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn numbers_must_be_octets_separated_by_one_byte() {
        for text in [
            &b"110.137.0.17"[..],
            b"10.137.0.1700",
            b"10..137.0.17",
            b"10.137.0",
            b"10.137.0.256",
            b"0010.137.0.17",
        ] {
            assert!(
                !named(text).contains(&wire(VM)),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
        // A longer run names each four in a row.
        assert!(named(b"1.10.137.0.17").contains(&wire(VM)));
        assert!(named(b"10.137.0.17.5").contains(&wire(VM)));
    }

    #[test]
    fn a_datagram_split_anywhere_scans_as_one() {
        let payload = b"txt=\x0210\x03137\x010\x0217 and 10.137.0.17 and \x0a\x89\x00\x11";
        let whole = named(payload);
        for cut in 0..payload.len() {
            let mut scan = AddressScan::default();
            let mut out = Vec::new();
            for &b in &payload[..cut] {
                take(&mut out, scan.feed(b));
            }
            // The state is all a fragment train keeps between fragments.
            let mut resumed = scan;
            for &b in &payload[cut..] {
                take(&mut out, resumed.feed(b));
            }
            take(&mut out, resumed.finish());
            assert_eq!(out, whole, "cut at {cut}");
        }
        assert_eq!(whole.iter().filter(|&&a| a == wire(VM)).count(), 3);
    }

    #[test]
    fn every_dotted_quad_reads_back() {
        for quad in [
            [1, 0, 0, 1],
            [255, 255, 255, 255],
            [192, 168, 1, 2],
            [1, 22, 233, 4],
        ] {
            let text = format!("{}.{}.{}.{}", quad[0], quad[1], quad[2], quad[3]);
            let found = named(text.as_bytes());
            assert!(found.contains(&wire(quad)), "{text}");
            assert!(
                found.contains(&wire([quad[3], quad[2], quad[1], quad[0]])),
                "{text}"
            );
        }
    }
}
