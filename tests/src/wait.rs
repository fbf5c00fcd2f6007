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

/// Polls `value` until it has stayed the same for `quiet`, or `timeout`
/// passes; returns the last value and whether it settled.
pub fn until_stable<T: PartialEq>(
    timeout: Duration,
    quiet: Duration,
    mut value: impl FnMut() -> T,
) -> (T, bool) {
    let deadline = Instant::now() + timeout;
    let mut last = value();
    let mut stable_since = Instant::now();
    while Instant::now() < deadline {
        if stable_since.elapsed() >= quiet {
            return (last, true);
        }
        std::thread::sleep(Duration::from_millis(20));
        let now = value();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    (last, false)
}

/// A duration as the tests print it: whole milliseconds.
pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}
