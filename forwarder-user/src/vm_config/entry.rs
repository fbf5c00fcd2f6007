//! One entry of a `vm-config.forwarder…` value: `KIND[=VALUE]`, then
//! attributes `KEY=VALUE` separated by single spaces. A value has no space,
//! quote or `|`, except a note's, which is quoted: `note="phone sync"`.
//!
//! The attributes every kind of entry may carry:
//! - `allow=auto|any|CIDR[,CIDR...]`: LAN peers allowed (omitted: auto);
//! - `until=2026-11-22T18:00:00Z`: an absolute deadline in UTC. dom0 and
//!   the VMs keep separate clocks (Qubes sets the VMs' from the clock VM),
//!   so a deadline, not a duration, is stored: a duration would start over
//!   at every restart of a router, and a disposable router restarts at
//!   every boot;
//! - `note="TEXT"`: the operator's comment, at most 64 printable ASCII
//!   characters without `"`, `|` or `\`.

use std::{fmt, str::FromStr, time::SystemTime};

use crate::spec::AllowFrom;

/// The separator between entries, which no entry contains.
pub const SEPARATOR: &str = " | ";
/// The longest note.
pub const MAX_NOTE_LEN: usize = 64;
/// The longest entry: far more than the longest valid one (a forward with
/// 8 CIDRs, a deadline and a full note is under 300 bytes).
pub const MAX_ENTRY_LEN: usize = 512;

/// An entry split into its parts, borrowing from the text.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub kind: &'a str,
    pub value: Option<&'a str>,
    /// In the order written; each key at most once.
    pub attrs: Vec<(&'a str, &'a str)>,
}

impl<'a> Entry<'a> {
    /// Splits `text`; refuses empty tokens, repeated keys, stray quotes
    /// and characters outside printable ASCII.
    pub fn parse(text: &'a str) -> Result<Self, String> {
        if text.len() > MAX_ENTRY_LEN {
            return Err(format!(
                "an entry of {} bytes (at most {MAX_ENTRY_LEN})",
                text.len()
            ));
        }
        if let Some(bad) = text.bytes().find(|b| !(0x20..=0x7e).contains(b)) {
            return Err(format!("byte {bad:#04x}: only printable ASCII"));
        }
        let mut rest = text;
        let mut tokens = Vec::new();
        while !rest.is_empty() {
            let (token, after) = next_token(rest)?;
            tokens.push(token);
            rest = after;
        }
        let Some(((kind, value), attr_tokens)) = tokens.split_first() else {
            return Err("an empty entry".into());
        };
        if !is_word(kind) {
            return Err(format!("{kind:?} is not an entry kind"));
        }
        let mut attrs: Vec<(&str, &str)> = Vec::new();
        for (key, value) in attr_tokens {
            let value = value.ok_or_else(|| format!("{key:?} is not KEY=VALUE"))?;
            if !is_word(key) {
                return Err(format!("{key:?} is not an attribute name"));
            }
            if attrs.iter().any(|(k, _)| k == key) {
                return Err(format!("{key} given twice"));
            }
            attrs.push((key, value));
        }
        Ok(Entry {
            kind,
            value: *value,
            attrs,
        })
    }
}

/// A token: `KEY`, `KEY=VALUE` or `KEY="VALUE"`.
type Token<'a> = (&'a str, Option<&'a str>);

/// The next token of `s` and what follows its separating space.
fn next_token(s: &str) -> Result<(Token<'_>, &str), String> {
    let word_end = s.find(' ').unwrap_or(s.len());
    let (token, after) = match s.find("=\"") {
        Some(eq) if eq < word_end => {
            let open = eq + 2;
            let close = open + s[open..].find('"').ok_or("a quote is not closed")?;
            if close == open {
                return Err("an empty quoted value".into());
            }
            let after = &s[close + 1..];
            if !(after.is_empty() || after.starts_with(' ')) {
                return Err("a quoted value must be followed by one space or the end".into());
            }
            ((&s[..eq], Some(&s[open..close])), after)
        }
        _ => {
            let word = &s[..word_end];
            if word.is_empty() || word.contains('"') {
                return Err(
                    "tokens are separated by single spaces, and only note=\"…\" is quoted".into(),
                );
            }
            let token = match word.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (word, None),
            };
            (token, &s[word_end..])
        }
    };
    match after.strip_prefix(' ') {
        Some("") => Err("a trailing space".into()),
        Some(rest) => Ok((token, rest)),
        None => Ok((token, after)),
    }
}

fn is_word(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
}

/// An operator's comment carried by an entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Note(String);

pub const NOTE_FORM: &str =
    "1 to 64 printable ASCII characters, without '\"', '|' or '\\' (e.g. \"phone sync\")";

impl Note {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Note {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let valid = !s.is_empty()
            && s.len() <= MAX_NOTE_LEN
            && s.bytes()
                .all(|b| (0x20..=0x7e).contains(&b) && !matches!(b, b'"' | b'|' | b'\\'));
        if valid {
            Ok(Note(s.to_string()))
        } else {
            Err(format!("comment {s:?} is not {NOTE_FORM}"))
        }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The attributes common to every entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attrs {
    pub allow: AllowFrom,
    pub until: Option<SystemTime>,
    pub note: Option<Note>,
}

impl Attrs {
    /// Reads the attributes of `entry`; any other key is an error.
    pub fn parse(entry: &Entry) -> Result<Self, String> {
        let mut attrs = Attrs::default();
        for (key, value) in &entry.attrs {
            match *key {
                "allow" => attrs.allow = value.parse().map_err(|e| format!("allow: {e}"))?,
                "until" => attrs.until = Some(parse_until(value)?),
                "note" => attrs.note = Some(value.parse()?),
                other => {
                    return Err(format!(
                        "unknown attribute {other:?}: expected allow=, until= or note="
                    ));
                }
            }
        }
        Ok(attrs)
    }

    /// Whether the deadline has passed at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.until.is_some_and(|t| t <= now)
    }
}

impl fmt::Display for Attrs {
    /// The attributes as written after an entry's head, each with its
    /// leading space; nothing for the defaults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allow != AllowFrom::Auto {
            write!(f, " allow={}", self.allow)?;
        }
        if let Some(until) = self.until {
            write!(f, " until={}", humantime::format_rfc3339_seconds(until))?;
        }
        if let Some(note) = &self.note {
            write!(f, " note=\"{note}\"")?;
        }
        Ok(())
    }
}

/// `until=`: RFC 3339 in UTC, to the second.
pub fn parse_until(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(s)
        .map_err(|_| format!("until {s:?} is not a UTC time like 2026-11-22T18:00:00Z"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn entries_split_into_kind_value_and_attributes() {
        let e = Entry::parse(r#"forward=tcp:80=10.0.0.1 allow=any note="a b=c""#).unwrap();
        assert_eq!(e.kind, "forward");
        assert_eq!(e.value, Some("tcp:80=10.0.0.1"));
        assert_eq!(e.attrs, [("allow", "any"), ("note", "a b=c")]);
        let e = Entry::parse("localsend").unwrap();
        assert_eq!((e.kind, e.value, e.attrs.len()), ("localsend", None, 0));
    }

    #[test]
    fn malformed_entries_are_refused() {
        for (text, needle) in [
            ("", "empty"),
            ("forward=x  allow=any", "single spaces"),
            ("forward=x ", "trailing space"),
            (" forward=x", "single spaces"),
            ("forward=x allow", "KEY=VALUE"),
            ("forward=x allow=any allow=auto", "twice"),
            ("forward=x note=\"open", "not closed"),
            ("forward=x note=\"\"", "empty quoted"),
            ("forward=x note=\"a\"b", "followed by one space"),
            ("forward=x note=a\"b", "only note"),
            ("Forward=x", "not an entry kind"),
            ("forward=x Allow=any", "not an attribute name"),
            ("forward=x\tallow=any", "printable ASCII"),
            ("forward=\u{e9}", "printable ASCII"),
        ] {
            let err = Entry::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let long = format!("forward={}", "x".repeat(MAX_ENTRY_LEN));
        assert!(Entry::parse(&long).unwrap_err().contains("at most 512"));
    }

    #[test]
    fn attributes_round_trip_and_refuse_the_unknown() {
        let attrs = Attrs {
            allow: "192.168.1.0/24,10.0.0.7".parse().unwrap(),
            until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
            note: Some("phone sync".parse().unwrap()),
        };
        let text = format!("forward=tcp:80=10.0.0.1{attrs}");
        assert_eq!(
            text,
            r#"forward=tcp:80=10.0.0.1 allow=192.168.1.0/24,10.0.0.7/32 until=2030-03-17T17:46:40Z note="phone sync""#
        );
        assert_eq!(Attrs::parse(&Entry::parse(&text).unwrap()).unwrap(), attrs);
        assert_eq!(Attrs::default().to_string(), "");
        for (text, needle) in [
            ("forward=x colour=red", "unknown attribute"),
            ("forward=x until=tomorrow", "UTC time"),
            ("forward=x until=2030-03-17T17:46:40+01:00", "UTC time"),
            ("forward=x allow=lan", "allow:"),
        ] {
            let err = Attrs::parse(&Entry::parse(text).unwrap()).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn notes_are_bounded_printable_and_unambiguous() {
        assert!("phone sync (work)".parse::<Note>().is_ok());
        for bad in ["", "a\"b", "a|b", "a\\b", "tab\there", "\u{e9}"] {
            assert!(bad.parse::<Note>().unwrap_err().contains("printable ASCII"));
        }
        assert!("x".repeat(64).parse::<Note>().is_ok());
        assert!("x".repeat(65).parse::<Note>().is_err());
    }
}
