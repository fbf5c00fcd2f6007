#![no_std]
// Exists so forwarder-user can name this crate as a build dependency (for
// rebuild tracking); the programs are the binary target.
