//! `qvm-forwarder`, the dom0 side: exposes a qube through every router of
//! its netvm chain by writing Qubes features through the Admin API. The
//! routers read their share from QubesDB (`crate::qubesdb`), in the format
//! of `crate::vm_config`.

pub mod admin;
pub mod admin_api;
pub mod chain;
pub mod check;
pub mod cli;
pub mod dispatch;
pub mod expose;
pub mod graph;
pub mod intent;
pub mod list;
pub mod plan;
pub mod sync;
pub mod transport;
pub mod unexpose;
pub mod watch;
