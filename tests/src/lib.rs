//! Harness for the privileged tests: namespaces, a test bpffs, packets, the
//! Qubes-like topology and the processes running in it.

pub mod avahi;
pub mod bench;
pub mod bpffs;
pub mod capture;
pub mod checks;
pub mod child;
pub mod daemon;
pub mod flood;
pub mod hostile;
pub mod kdeconnect;
pub mod kernel_objects;
pub mod leak;
pub mod libvirt;
pub mod localsend;
pub mod mdns;
pub mod netlink_watch;
pub mod netns;
pub mod notify;
pub mod packet;
pub mod pip;
pub mod qubes_vm;
pub mod qubesd;
pub mod qubesdb_store;
pub mod soak;
pub mod sockets;
pub mod syncthing;
pub mod tc;
pub mod testrun;
pub mod topology;
pub mod vm;
pub mod wait;
