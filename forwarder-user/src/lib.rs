//! The forwarder's userspace: configuration, loading and attaching the
//! datapath, keeping its maps current from rtnetlink, and the operator CLI.

pub mod adopt;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod config_file;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod default_route;
pub mod flow_table;
pub mod flows;
pub mod input;
pub mod input_rules;
pub mod inspect;
pub mod interfaces;
pub mod internal_nets;
pub mod kernel;
pub mod kernel_log;
pub mod multicast;
pub mod netlink;
pub mod nft;
pub mod notify;
#[cfg(test)]
mod object_check;
pub mod pin;
pub mod presets;
pub mod prog_stats;
pub mod qubes;
pub mod qubes_vm;
pub mod qubesdb;
pub mod raw_map;
pub mod replace_file;
pub mod route_lookup;
pub mod router_share;
pub mod rule_view;
pub mod rules;
pub mod selftest;
pub mod spec;
pub mod tables;
pub mod teardown;
pub mod timers;
pub mod vm_config;

/// The compiled eBPF object, embedded so the binary is self-contained.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder-ebpf"));
