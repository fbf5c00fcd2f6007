//! CLOCK_BOOTTIME, the clock the datapath keeps rule deadlines and flow
//! times on (`bpf_ktime_get_boot_ns`), and conversions from the wall-clock
//! times operators give.

use std::time::{Duration, SystemTime};

/// CLOCK_BOOTTIME now, in nanoseconds.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The boot clock and the wall clock, read together.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub boot_ns: u64,
    pub wall: SystemTime,
}

impl Now {
    pub fn read() -> Self {
        Now {
            boot_ns: boot_ns(),
            wall: SystemTime::now(),
        }
    }

    /// The CLOCK_BOOTTIME instant of a wall-clock deadline. One already
    /// past maps to now, and 0 is avoided: it means "no deadline" to the
    /// datapath.
    pub fn deadline_ns(&self, deadline: SystemTime) -> u64 {
        let left = deadline.duration_since(self.wall).unwrap_or(Duration::ZERO);
        self.boot_ns
            .saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
            .max(1)
    }
}

/// How long ago a CLOCK_BOOTTIME instant was.
pub fn since(ns: u64, now_ns: u64) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_keep_the_time_left() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let now = Now {
            boot_ns: 5_000,
            wall,
        };
        assert_eq!(
            now.deadline_ns(wall + Duration::from_secs(6)),
            5_000 + 6_000_000_000
        );
        assert_eq!(now.deadline_ns(wall - Duration::from_secs(1)), 5_000);
        let at_boot = Now { boot_ns: 0, wall };
        assert_eq!(at_boot.deadline_ns(wall), 1, "0 would mean never");
    }

    #[test]
    fn the_boot_clock_moves_forward() {
        let a = boot_ns();
        let b = boot_ns();
        assert!(b >= a && a > 0);
        assert_eq!(since(a, b + 5), Duration::from_nanos(b - a + 5));
    }
}
