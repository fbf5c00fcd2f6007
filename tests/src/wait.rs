//! Waiting on a condition with a deadline, never on a fixed sleep.

use std::time::{Duration, Instant};

/// Polls `condition` until it holds or `timeout` passes; returns whether it
/// held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
