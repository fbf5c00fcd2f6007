//! The Debian archive xtask fetches from itself: the mirror the systemd
//! VM's root file system and setup's backports QEMU come from, and the
//! keyring the archive is checked with.

pub const MIRROR: &str = "http://deb.debian.org/debian";
/// From debian-archive-keyring, which every Debian system has.
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
