//! Stopping the helper processes a test started: politely first, so they
//! can leave their own state clean, and for certain in the end.

use std::{process::Child, time::Duration};

use crate::wait::wait_until;

/// SIGTERM, then SIGKILL once `grace` has passed; returns whether the
/// child exited on its own.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    // SAFETY: signalling our own child, which has not been reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if wait_until(grace, || child.try_wait().is_ok_and(|s| s.is_some())) {
        return true;
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
