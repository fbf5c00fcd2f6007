//! Hostile input for the datapath, checked by an oracle that predicts
//! every verdict exactly. The generator (see generate) sends bent and noisy
//! frames of every kind, discovery datagrams naming addresses in every
//! form, fragment trains bent every way, and TCP conversations with forged
//! numbers, all interleaved. For each program run the oracle (see model)
//! names the TC action, the packet left behind, the one reason counted,
//! every relay copy byte for byte, and the change to each table entry the
//! packet names; the run must match. The tables are read back after each
//! run, and whole every 20,000 runs and at the end, so a change nobody
//! predicted is caught; the relays' counters must add up to the copies
//! seen. A VM's datagram naming an internal address in a form the filter
//! promises to catch must never reach the LAN whole, whatever the oracle
//! says.

mod case;
mod clock;
mod generate;
mod kernel_csum;
mod model;
mod net;
mod observe;
mod oracle;
mod parse;
mod payloads;
mod rewrite;
mod rng;
mod run;
mod setup;
mod tally;
mod tcp;
mod trains;

pub use self::{run::run, tally::Tally};
