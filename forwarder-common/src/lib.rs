//! Types and pure logic shared by the eBPF datapath and userspace.
//!
//! Everything here is `no_std` so the eBPF crate can use it; the `user`
//! feature adds the `aya::Pod` impls userspace needs to read and write maps.
#![cfg_attr(not(test), no_std)]

pub mod csum;
pub mod cut;
pub mod flow;
pub mod layout;
pub mod maps;
pub mod reason;
pub mod scan;
