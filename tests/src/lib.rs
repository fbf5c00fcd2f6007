//! Harness for the privileged tests: namespaces, a test bpffs, packets, the
//! Qubes-like topology and the processes running in it.

pub mod bpffs;
pub mod netns;
pub mod packet;
pub mod testrun;
