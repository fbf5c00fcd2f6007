//! What the operator asked for one VM, kept in dom0 as the VM's
//! `forwarder-expose` feature (not exported to any VM: no `vm-config.`
//! prefix), so `sync` can recompute every router's share from it and the
//! graph of the day:
//!
//! ```text
//! forwarder-expose  v1 vm=app | localsend | forward=tcp:8080 allow=192.168.1.0/24 until=2026-11-22T18:00:00Z note="web"
//! ```
//!
//! `vm=` names the VM it was written for. `qvm-clone` copies features, and
//! a disposable starts with its template's, so a value whose `vm=` is
//! another qube's is a copy: applied only once that qube is gone (a clone
//! that replaced it), and then rewritten with the new name.

use std::{fmt, time::SystemTime};

use crate::{
    presets::{self, Preset},
    spec::RuleRef,
    vm_config::entry::{Attrs, Entry, SEPARATOR},
};

use super::admin::is_vm_name;

pub const FEATURE: &str = "forwarder-expose";
const VERSION: &str = "v1";
/// An exposure asks for at most this many ports and presets.
pub const MAX_ITEMS: usize = 256;
/// The longest value: qubesd drops a request over 64 KiB, header included.
pub const MAX_VALUE_LEN: usize = 60_000;

/// The presets `expose` offers, in the order their flags are listed.
pub const PRESETS: [&Preset; 4] = [
    &presets::LOCALSEND,
    &presets::KDECONNECT,
    &presets::SYNCTHING,
    &presets::MDNS,
];

/// A preset by its name.
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.into_iter().find(|p| p.name == name)
}

/// What one item exposes.
#[derive(Clone, Copy, Debug)]
pub enum What {
    /// A port or range, forwarded to the same ports.
    Forward(RuleRef),
    Preset(&'static Preset),
}

impl PartialEq for What {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (What::Forward(a), What::Forward(b)) => a == b,
            (What::Preset(a), What::Preset(b)) => a.name == b.name,
            _ => false,
        }
    }
}

impl Eq for What {}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            What::Forward(rule) => write!(f, "{rule}"),
            What::Preset(preset) => f.write_str(preset.name),
        }
    }
}

impl What {
    /// The forward rules it needs at each router: `(proto, ports)`.
    pub fn forwards(&self) -> Vec<RuleRef> {
        match self {
            What::Forward(rule) => vec![*rule],
            What::Preset(preset) => preset
                .forwards
                .iter()
                .map(|(proto, ports)| RuleRef {
                    proto: *proto,
                    ports: *ports,
                })
                .collect(),
        }
    }

    /// The groups and ports it relays.
    pub fn relays(&self) -> &'static [(std::net::Ipv4Addr, u16)] {
        match self {
            What::Forward(_) => &[],
            What::Preset(preset) => preset.relays,
        }
    }

    /// Whether two items would claim a port in common.
    pub fn overlaps(&self, other: &What) -> bool {
        self.forwards().iter().any(|a| {
            other
                .forwards()
                .iter()
                .any(|b| a.proto == b.proto && a.ports.overlaps(&b.ports))
        }) || self.relays().iter().any(|r| other.relays().contains(r))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub what: What,
    pub attrs: Attrs,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.what {
            What::Forward(rule) => write!(f, "forward={rule}{}", self.attrs),
            What::Preset(preset) => write!(f, "{}{}", preset.name, self.attrs),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    /// The VM it was written for.
    pub vm: String,
    pub items: Vec<Item>,
}

impl Intent {
    pub fn new(vm: &str) -> Self {
        Intent {
            vm: vm.into(),
            items: Vec::new(),
        }
    }

    /// The feature's value; `None` when nothing is left to expose.
    pub fn value(&self) -> Option<String> {
        if self.items.is_empty() {
            return None;
        }
        let mut value = format!("{VERSION} vm={}", self.vm);
        for item in &self.items {
            value.push_str(SEPARATOR);
            value.push_str(&item.to_string());
        }
        Some(value)
    }

    pub fn parse(value: &str) -> Result<Intent, String> {
        let mut pieces = value.split(SEPARATOR);
        let head = pieces.next().unwrap_or_default();
        let vm = head
            .strip_prefix(VERSION)
            .and_then(|rest| rest.strip_prefix(" vm="))
            .filter(|vm| is_vm_name(vm))
            .ok_or_else(|| format!("{FEATURE}: header {head:?} is not \"{VERSION} vm=NAME\""))?;
        let mut intent = Intent::new(vm);
        for text in pieces {
            let fail = |e: String| format!("{FEATURE}: {text:?}: {e}");
            let entry = Entry::parse(text).map_err(&fail)?;
            let attrs = Attrs::parse(&entry).map_err(&fail)?;
            let what = match (entry.kind, entry.value) {
                ("forward", Some(rule)) => What::Forward(rule.parse().map_err(&fail)?),
                (name, None) => What::Preset(
                    preset(name).ok_or_else(|| fail(format!("unknown preset {name:?}")))?,
                ),
                (kind, Some(_)) => return Err(fail(format!("unknown entry {kind:?}"))),
            };
            if intent.items.iter().any(|i| i.what == what) {
                return Err(fail(format!("{what} is given twice")));
            }
            intent.add(Item { what, attrs }).map_err(fail)?;
        }
        if intent.items.is_empty() {
            return Err(format!("{FEATURE}: no entries"));
        }
        Ok(intent)
    }

    /// Adds an item, replacing one for the same port or preset (a new
    /// allow-from, deadline or note); refuses one that overlaps another.
    pub fn add(&mut self, item: Item) -> Result<(), String> {
        if let Some(same) = self.items.iter_mut().find(|i| i.what == item.what) {
            *same = item;
            return Ok(());
        }
        if let Some(other) = self.items.iter().find(|i| i.what.overlaps(&item.what)) {
            return Err(format!(
                "{} overlaps {} already exposed on {}; unexpose it first",
                item.what, other.what, self.vm
            ));
        }
        if self.items.len() == MAX_ITEMS {
            return Err(format!("{} already exposes {MAX_ITEMS} items", self.vm));
        }
        self.items.push(item);
        if self.value().is_some_and(|v| v.len() > MAX_VALUE_LEN) {
            self.items.pop();
            return Err(format!(
                "{}'s exposure would exceed {MAX_VALUE_LEN} bytes; unexpose something first",
                self.vm
            ));
        }
        Ok(())
    }

    /// Removes the items `what` names; returns those not found.
    pub fn remove(&mut self, what: &[What]) -> Vec<What> {
        let missing = what
            .iter()
            .filter(|w| !self.items.iter().any(|i| i.what == **w))
            .copied()
            .collect();
        self.items.retain(|i| !what.contains(&i.what));
        missing
    }

    /// Drops the items whose deadline passed; whether any did.
    pub fn drop_expired(&mut self, now: SystemTime) -> bool {
        let before = self.items.len();
        self.items.retain(|i| !i.attrs.expired(now));
        self.items.len() != before
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        self.items.iter().filter_map(|i| i.attrs.until).min()
    }
}

/// An item of `unexpose`: `PROTO:PORT` or a preset's name.
pub fn parse_what(s: &str) -> Result<What, String> {
    if let Some(preset) = preset(s) {
        return Ok(What::Preset(preset));
    }
    s.parse::<RuleRef>().map(What::Forward).map_err(|e| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        format!("{e}; or a preset: {}", names.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::vm_config::entry::Note;

    fn item(text: &str) -> Item {
        Item {
            what: parse_what(text).unwrap(),
            attrs: Attrs::default(),
        }
    }

    #[test]
    fn an_intent_round_trips() {
        let mut intent = Intent::new("app");
        intent.add(item("localsend")).unwrap();
        intent
            .add(Item {
                attrs: Attrs {
                    allow: "192.168.1.0/24".parse().unwrap(),
                    until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
                    note: Some("web".parse().unwrap()),
                },
                ..item("tcp:8080")
            })
            .unwrap();
        let value = intent.value().unwrap();
        assert_eq!(
            value,
            "v1 vm=app | localsend | forward=tcp:8080 allow=192.168.1.0/24 until=2030-03-17T17:46:40Z note=\"web\""
        );
        assert_eq!(Intent::parse(&value).unwrap(), intent);
        assert_eq!(Intent::new("app").value(), None);
    }

    #[test]
    fn adding_replaces_the_same_item_and_refuses_overlaps() {
        let mut intent = Intent::new("app");
        intent.add(item("tcp:1714")).unwrap();
        let err = intent.add(item("kdeconnect")).unwrap_err();
        assert!(err.contains("kdeconnect overlaps tcp:1714"), "{err}");
        intent.add(item("tcp:8080")).unwrap();
        let mut again = item("tcp:8080");
        again.attrs.note = Some("new".parse().unwrap());
        intent.add(again.clone()).unwrap();
        assert_eq!(intent.items.len(), 2);
        assert_eq!(intent.items[1], again);
        assert!(
            intent
                .add(item("tcp:8000-8100"))
                .unwrap_err()
                .contains("overlaps")
        );
        intent.add(item("udp:8080")).unwrap();
    }

    #[test]
    fn an_intent_stays_within_one_request() {
        let mut intent = Intent::new("app");
        let note: Note = "n".repeat(64).parse().unwrap();
        let mut refused = None;
        for port in 1..=MAX_ITEMS as u16 {
            let mut item = item(&format!("tcp:{port}"));
            item.attrs.until = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000));
            item.attrs.allow = (1..=8)
                .map(|i| format!("192.168.200.{i}/32"))
                .collect::<Vec<_>>()
                .join(",")
                .parse()
                .unwrap();
            item.attrs.note = Some(note.clone());
            if let Err(e) = intent.add(item) {
                refused = Some(e);
                break;
            }
        }
        assert!(refused.unwrap().contains("would exceed 60000 bytes"));
        assert!(intent.value().unwrap().len() <= MAX_VALUE_LEN);
    }

    #[test]
    fn removing_reports_what_was_not_there() {
        let mut intent = Intent::new("app");
        intent.add(item("localsend")).unwrap();
        intent.add(item("tcp:8080")).unwrap();
        let missing =
            intent.remove(&[parse_what("tcp:8080").unwrap(), parse_what("mdns").unwrap()]);
        assert_eq!(missing, [parse_what("mdns").unwrap()]);
        assert_eq!(intent.items, [item("localsend")]);
    }

    #[test]
    fn expired_items_are_dropped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut intent = Intent::new("app");
        let mut old = item("tcp:1");
        old.attrs.until = Some(now);
        let mut later = item("tcp:2");
        later.attrs.until = Some(now + Duration::from_secs(60));
        intent.add(old).unwrap();
        intent.add(later.clone()).unwrap();
        intent.add(item("tcp:3")).unwrap();
        assert_eq!(intent.next_deadline(), Some(now));
        assert!(intent.drop_expired(now));
        assert_eq!(intent.next_deadline(), later.attrs.until);
        assert!(!intent.drop_expired(now));
    }

    #[test]
    fn malformed_intents_are_refused() {
        for (value, needle) in [
            ("", "header"),
            ("v1 vm=app", "no entries"),
            ("v2 vm=app | localsend", "header"),
            ("v1 vm=-app | localsend", "header"),
            ("v1 vm=app | teleport", "unknown preset"),
            ("v1 vm=app | relay=224.0.0.1:5", "unknown entry"),
            ("v1 vm=app | forward=tcp:0", "not a port"),
            ("v1 vm=app | localsend | localsend allow=any", "given twice"),
            ("v1 vm=app | tcp:80 | kdeconnect", "not an entry kind"),
            ("v1 vm=app | forward=tcp:1714 | kdeconnect", "overlaps"),
        ] {
            let err = Intent::parse(value).unwrap_err();
            assert!(err.contains(needle), "{value}: {err}");
        }
        assert!(
            parse_what("sctp:1")
                .unwrap_err()
                .contains("localsend, kdeconnect")
        );
    }
}
