//! Stopping the helper processes a test started: politely first, so they
//! can leave their own state clean, and for certain in the end.

use std::{
    process::{Child, ExitStatus},
    time::Duration,
};

use crate::wait::wait_until;

/// SIGTERM, then SIGKILL once `grace` has passed; returns the exit status
/// when the child exited on its own.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    // SAFETY: signalling our own child, which has not been reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    if wait_until(grace, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    }) {
        return status;
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
