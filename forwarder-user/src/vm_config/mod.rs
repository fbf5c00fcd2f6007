//! The values of the `vm-config.forwarder…` features: written by
//! `qvm-forwarder` in dom0, read by the forwarder in a router (and by the
//! app VM's input side) from QubesDB, where Qubes 4.2 exports every
//! `vm-config.NAME` feature as `/vm-config/NAME` (qubes-core-admin
//! `qubes/ext/vm_config.py`).
//!
//! One feature value reads, as `qvm-features sys-net` shows it:
//!
//! ```text
//! vm-config.forwarder.1  v1 part=1/1 sum=5b151373f11f8fe7 | forward=tcp:53317=10.137.0.6 | forward=udp:53317=10.137.0.6 | relay=224.0.0.167:53317=10.137.0.6
//! ```
//!
//! - a header: the format's version, which part of how many this is, and a
//!   checksum of all parts' entries together, so a reader never mixes parts
//!   of two writes;
//! - entries separated by ` | `, each `KIND=VALUE` in the syntax of the
//!   matching `forwarder run` flag, then optional attributes (`allow=`,
//!   `until=`, `note="…"`, see [`entry`]).
//!
//! The limits are QubesDB's: a path of at most 63 bytes, of which
//! `/vm-config/` takes 11, leaves 52 for the name; a value holds at most
//! 3072 bytes. Entries that do not fit one value go on in `forwarder.2`,
//! `forwarder.3`…, never splitting an entry. The Admin API accepts only
//! printable ASCII in a value and `[A-Za-z0-9_.-]` in a name, and
//! vm_config.py wants the name to start with a letter.
//!
//! Everything read back is hostile input: every value is bounded, every
//! field parsed by the same parsers as the flags, and anything unknown,
//! repeated or missing makes the whole set invalid (the reader keeps its
//! last good configuration).

pub mod entry;
pub mod input;
pub mod parts;
pub mod router;

/// The feature prefix Qubes exports to QubesDB.
pub const FEATURE_PREFIX: &str = "vm-config.";
/// Where those features appear in the VM's QubesDB.
pub const QUBESDB_DIR: &str = "/vm-config/";
/// QubesDB's longest path (63 bytes and a NUL) less `/vm-config/`.
pub const MAX_NAME_LEN: usize = 52;
/// QubesDB's largest value.
pub const MAX_VALUE_LEN: usize = 3072;
