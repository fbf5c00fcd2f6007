//! A list of entries as numbered values within QubesDB's limits, and back.
//!
//! A family of values (`forwarder`, `forwarder-input`) is written as
//! `FAMILY.1`, `FAMILY.2`, … each `v1 part=N/M sum=HEX | ENTRY | ENTRY…`.
//! The sum (FNV-1a, 64 bits) covers every part's entries, joined in order,
//! so a reader that catches dom0 between two writes sees parts that do not
//! agree and refuses the set instead of mixing two configurations.

use super::{FEATURE_PREFIX, MAX_NAME_LEN, MAX_VALUE_LEN, QUBESDB_DIR, entry::SEPARATOR};

/// The format's version, first in every value.
pub const VERSION: &str = "v1";
/// At most this many values in one family (about 190 KiB of entries).
pub const MAX_PARTS: usize = 64;
/// The header's longest form, which every part reserves room for.
const MAX_HEADER_LEN: usize = "v1 part=64/64 sum=0123456789abcdef".len();

/// The values whose names start with one stem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    pub stem: &'static str,
}

/// A router's forwards and relays.
pub const ROUTER: Family = Family { stem: "forwarder" };
/// What an exposed VM admits in its own firewall.
pub const INPUT: Family = Family {
    stem: "forwarder-input",
};

impl Family {
    /// `forwarder.3`: the name under `/vm-config/`.
    pub fn name(&self, part: usize) -> String {
        let name = format!("{}.{part}", self.stem);
        debug_assert!(name.len() <= MAX_NAME_LEN);
        name
    }

    /// `vm-config.forwarder.3`: the dom0 feature.
    pub fn feature(&self, part: usize) -> String {
        format!("{FEATURE_PREFIX}{}", self.name(part))
    }

    /// `/vm-config/forwarder.`: what `qubesdb-multiread` is given to read
    /// every part and nothing of another family.
    pub fn qubesdb_prefix(&self) -> String {
        format!("{QUBESDB_DIR}{}.", self.stem)
    }

    /// Whether a name under `/vm-config/` belongs to this family (well
    /// formed or not: the reader refuses a malformed one, dom0 removes it).
    pub fn owns(&self, name: &str) -> bool {
        name.strip_prefix(self.stem)
            .is_some_and(|rest| rest.starts_with('.'))
    }

    /// The same for a dom0 feature name.
    pub fn owns_feature(&self, feature: &str) -> bool {
        feature
            .strip_prefix(FEATURE_PREFIX)
            .is_some_and(|name| self.owns(name))
    }

    /// The part number of `name` (relative to `/vm-config/`): 1 to
    /// [`MAX_PARTS`], in decimal without leading zeros.
    fn part_number(&self, name: &str) -> Result<usize, String> {
        let digits = name
            .strip_prefix(self.stem)
            .and_then(|rest| rest.strip_prefix('.'))
            .ok_or_else(|| format!("{name:?} is not a {}.N name", self.stem))?;
        match digits.parse::<usize>() {
            Ok(n @ 1..=MAX_PARTS) if !digits.starts_with('0') && digits.len() <= 2 => Ok(n),
            _ => Err(format!(
                "{name:?}: the part number must be 1 to {MAX_PARTS}, without leading zeros"
            )),
        }
    }

    /// The values of `entries`, first part first: as many as needed, each
    /// at most [`MAX_VALUE_LEN`] bytes. No entries, no values.
    pub fn split(&self, entries: &[String]) -> Result<Vec<String>, String> {
        let room = MAX_VALUE_LEN - MAX_HEADER_LEN;
        let mut bodies: Vec<String> = Vec::new();
        for entry in entries {
            if entry.len() + SEPARATOR.len() > room {
                return Err(format!(
                    "entry of {} bytes does not fit a value",
                    entry.len()
                ));
            }
            match bodies.last_mut() {
                Some(body) if body.len() + SEPARATOR.len() * 2 + entry.len() <= room => {
                    body.push_str(SEPARATOR);
                    body.push_str(entry);
                }
                _ => bodies.push(entry.clone()),
            }
        }
        if bodies.len() > MAX_PARTS {
            return Err(format!(
                "{} parts needed for {} entries; at most {MAX_PARTS}",
                bodies.len(),
                entries.len()
            ));
        }
        let sum = checksum(&bodies);
        let total = bodies.len();
        Ok(bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let mut value = format!("{VERSION} part={}/{total} sum={sum:016x}", i + 1);
                value.push_str(SEPARATOR);
                value.push_str(body);
                value
            })
            .collect())
    }

    /// The entries of a set of `(name, value)` pairs, names relative to
    /// `/vm-config/`, every one of this family. Refuses the whole set when
    /// a part is missing, repeated, malformed, too long, or from another
    /// write than the rest. No pairs, no entries.
    pub fn join<'a>(&self, pairs: &'a [(String, String)]) -> Result<Vec<&'a str>, String> {
        if pairs.len() > MAX_PARTS {
            return Err(format!("{} parts; at most {MAX_PARTS}", pairs.len()));
        }
        let mut parts: Vec<Option<(Header, &str)>> = vec![None; pairs.len()];
        let mut first: Option<Header> = None;
        for (name, value) in pairs {
            let at = |e: String| format!("{QUBESDB_DIR}{name}: {e}");
            let number = self.part_number(name).map_err(at)?;
            let (header, body) = Header::parse(value).map_err(at)?;
            if header.part != number {
                return Err(at(format!("its header says part {}", header.part)));
            }
            if header.total != pairs.len() {
                return Err(at(format!(
                    "its header says {} parts, {} are present",
                    header.total,
                    pairs.len()
                )));
            }
            match first {
                Some(first) if first.sum != header.sum => {
                    return Err(at(
                        "its sum differs from the other parts': they are from two writes".into(),
                    ));
                }
                _ => first = Some(header),
            }
            let slot = &mut parts[number - 1];
            if slot.is_some() {
                return Err(at("the part is given twice".into()));
            }
            *slot = Some((header, body));
        }
        let bodies: Vec<&str> = parts
            .iter()
            .map(|part| {
                part.expect("every slot filled: numbers are distinct and at most the count")
                    .1
            })
            .collect();
        if let Some(first) = first
            && checksum(&bodies) != first.sum
        {
            return Err(format!(
                "{}: the entries do not match their sum",
                self.qubesdb_prefix()
            ));
        }
        Ok(bodies.iter().flat_map(|b| b.split(SEPARATOR)).collect())
    }
}

#[derive(Clone, Copy, Debug)]
struct Header {
    part: usize,
    total: usize,
    sum: u64,
}

impl Header {
    /// `v1 part=N/M sum=HEX | …`: the header, and the entries after it.
    fn parse(value: &str) -> Result<(Header, &str), String> {
        if value.len() > MAX_VALUE_LEN {
            return Err(format!(
                "a value of {} bytes; QubesDB holds at most {MAX_VALUE_LEN}",
                value.len()
            ));
        }
        let (head, body) = value
            .split_once(SEPARATOR)
            .ok_or("no entries after the header")?;
        let form = "expected \"v1 part=N/M sum=16 hex digits\"";
        let mut words = head.split(' ');
        let (Some(version), Some(part), Some(sum), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(format!("header {head:?}: {form}"));
        };
        if version != VERSION {
            return Err(format!(
                "format {version:?}; this forwarder reads {VERSION} (update it, or dom0's qvm-forwarder)"
            ));
        }
        let number = |s: &str| match s.parse::<usize>() {
            Ok(n @ 1..=MAX_PARTS) if !s.starts_with('0') => Some(n),
            _ => None,
        };
        let (part, total) = part
            .strip_prefix("part=")
            .and_then(|p| p.split_once('/'))
            .and_then(|(n, m)| Some((number(n)?, number(m)?)))
            .filter(|(n, m)| n <= m)
            .ok_or_else(|| format!("header {head:?}: {form}"))?;
        let sum = sum
            .strip_prefix("sum=")
            .filter(|hex| {
                hex.len() == 16
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            })
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| format!("header {head:?}: {form}"))?;
        Ok((Header { part, total, sum }, body))
    }
}

/// FNV-1a over the bodies joined by the separator: what one write put in
/// all its parts.
fn checksum(bodies: &[impl AsRef<str>]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (i, body) in bodies.iter().enumerate() {
        if i > 0 {
            feed(SEPARATOR.as_bytes());
        }
        feed(body.as_ref().as_bytes());
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(family: Family, values: &[String]) -> Vec<(String, String)> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (family.name(i + 1), v.clone()))
            .collect()
    }

    fn entries(n: usize, len: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("e{i:0>width$}", width = len - 1))
            .collect()
    }

    #[test]
    fn names_fit_qubesdb_and_the_admin_api() {
        for family in [ROUTER, INPUT] {
            let name = family.name(MAX_PARTS);
            assert!(name.len() <= MAX_NAME_LEN, "{name}");
            assert!(name.as_bytes()[0].is_ascii_alphabetic());
            assert!(
                family
                    .feature(MAX_PARTS)
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            );
            assert!(family.owns_feature(&family.feature(1)));
        }
        assert!(!ROUTER.owns_feature("vm-config.forwarder-input.1"));
        assert!(!INPUT.owns_feature("vm-config.forwarder.1"));
        assert!(ROUTER.owns_feature("vm-config.forwarder.007"));
        assert_eq!(ROUTER.qubesdb_prefix(), "/vm-config/forwarder.");
    }

    #[test]
    fn one_small_value_is_one_part() {
        let values = ROUTER.split(&["a=1".into(), "b=2".into()]).unwrap();
        assert_eq!(values.len(), 1);
        assert!(values[0].starts_with("v1 part=1/1 sum="), "{}", values[0]);
        assert!(values[0].ends_with(" | a=1 | b=2"), "{}", values[0]);
        assert_eq!(
            ROUTER.join(&pairs(ROUTER, &values)).unwrap(),
            ["a=1", "b=2"]
        );
        assert!(ROUTER.split(&[]).unwrap().is_empty());
        assert!(ROUTER.join(&[]).unwrap().is_empty());
    }

    #[test]
    fn many_entries_split_within_3072_bytes_and_join_back() {
        let list = entries(200, 100);
        let values = ROUTER.split(&list).unwrap();
        assert!(values.len() >= 7, "{}", values.len());
        for v in &values {
            assert!(v.len() <= MAX_VALUE_LEN, "{}", v.len());
            assert!(v.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        }
        // Packed: each part but the last is too full for one more entry.
        for v in &values[..values.len() - 1] {
            assert!(
                v.len() + SEPARATOR.len() + 100 > MAX_VALUE_LEN - 2,
                "{}",
                v.len()
            );
        }
        let mut shuffled = pairs(ROUTER, &values);
        shuffled.reverse();
        let joined = ROUTER.join(&shuffled).unwrap();
        assert_eq!(joined, list.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn too_much_is_refused_when_writing() {
        let too_many = entries(MAX_PARTS * 30, 100);
        assert!(ROUTER.split(&too_many).unwrap_err().contains("at most 64"));
        let huge = vec!["x".repeat(MAX_VALUE_LEN)];
        assert!(ROUTER.split(&huge).unwrap_err().contains("does not fit"));
    }

    #[test]
    fn gaps_duplicates_mixes_and_malformed_sets_are_refused() {
        let list = entries(100, 100);
        let values = ROUTER.split(&list).unwrap();
        assert!(values.len() >= 4);
        let good = pairs(ROUTER, &values);

        let mut gap = good.clone();
        gap.remove(1);
        assert!(ROUTER.join(&gap).unwrap_err().contains("parts, "));

        let mut duplicate = good.clone();
        duplicate[1] = duplicate[0].clone();
        assert!(ROUTER.join(&duplicate).unwrap_err().contains("twice"));

        let mut renumbered = good.clone();
        renumbered[1].0 = ROUTER.name(9);
        assert!(
            ROUTER
                .join(&renumbered)
                .unwrap_err()
                .contains("header says part 2")
        );

        let mut leading_zero = good.clone();
        leading_zero[0].0 = "forwarder.01".into();
        assert!(
            ROUTER
                .join(&leading_zero)
                .unwrap_err()
                .contains("leading zeros")
        );

        let other = ROUTER.split(&entries(100, 99)).unwrap();
        let mut mixed = good.clone();
        mixed[2] = pairs(ROUTER, &other)[2].clone();
        assert!(ROUTER.join(&mixed).unwrap_err().contains("two writes"));

        let mut tampered = good.clone();
        tampered[0].1 = tampered[0].1.replacen("e0", "e9", 1);
        assert!(
            ROUTER
                .join(&tampered)
                .unwrap_err()
                .contains("do not match their sum")
        );

        let mut oversized = good.clone();
        oversized[0].1.push_str(&" | x".repeat(MAX_VALUE_LEN));
        assert!(
            ROUTER
                .join(&oversized)
                .unwrap_err()
                .contains("at most 3072")
        );

        let foreign = vec![("forwarder-input.1".to_string(), values[0].clone())];
        assert!(ROUTER.join(&foreign).unwrap_err().contains("forwarder.N"));

        for (value, needle) in [
            ("v1 part=1/1 sum=0123456789abcdef", "no entries"),
            (
                "v2 part=1/1 sum=0123456789abcdef | a",
                "this forwarder reads v1",
            ),
            ("v1 part=2/1 sum=0123456789abcdef | a", "expected"),
            ("v1 part=0/1 sum=0123456789abcdef | a", "expected"),
            ("v1 part=1/1 sum=0123456789ABCDEF | a", "expected"),
            ("v1 part=1/1 sum=0123 | a", "expected"),
            ("v1 part=1/1 | a", "expected"),
            ("v1 part=1/1 sum=0123456789abcdef extra | a", "expected"),
        ] {
            let set = vec![(ROUTER.name(1), value.to_string())];
            let err = ROUTER.join(&set).unwrap_err();
            assert!(err.contains(needle), "{value}: {err}");
        }
        let too_many: Vec<(String, String)> = (1..=MAX_PARTS + 1)
            .map(|i| (ROUTER.name(i), String::new()))
            .collect();
        assert!(ROUTER.join(&too_many).unwrap_err().contains("at most 64"));
    }
}
