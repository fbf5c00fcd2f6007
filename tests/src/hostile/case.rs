//! A generated case: a frame, where it is fed in, and what the generator
//! knows of it.

use forwarder::datapath::Role;

/// A frame and where it is fed in.
pub struct Case {
    pub role: Role,
    pub ifindex: u32,
    pub frame: Vec<u8>,
    /// Which generator made it.
    pub label: &'static str,
    /// Set on each packet of a VM's datagram that names an internal
    /// address whole, in a form the filter promises to catch.
    pub claim: Option<Claim>,
}

#[derive(Clone, Copy)]
pub struct Claim {
    pub datagram: u64,
    /// The datagram's last packet.
    pub last: bool,
}
