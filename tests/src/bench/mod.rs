//! `cargo xtask bench`: the forwarder against the seed's nftables recipe,
//! plain routing and a bare veth, measured in one run with the contenders
//! alternating and every measurement repeated.

pub mod env;
pub mod hops;
pub mod measure;
pub mod report;
