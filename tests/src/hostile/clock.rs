//! Time as the oracle knows it: only the window a program run fell in,
//! read from both clocks the datapath uses just before and after the run.
//! A decision that depends on where "now" falls (a flow's or a fragment
//! train's timeout, a token bucket) is certain unless its deadline falls
//! inside the window; then the oracle follows both branches, and the run
//! must match one of them.

/// Which kernel clock a deadline is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// CLOCK_MONOTONIC: `bpf_ktime_get_ns` (fragment trains, token buckets).
    Mono,
    /// CLOCK_BOOTTIME: `bpf_ktime_get_boot_ns` (flows).
    Boot,
}

/// The window `[first, last]` of one clock, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub first: u64,
    pub last: u64,
}

impl Window {
    pub fn contains(&self, t: u64) -> bool {
        (self.first..=self.last).contains(&t)
    }

    fn widen(&mut self, t: u64) {
        self.first = self.first.min(t);
        self.last = self.last.max(t);
    }
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Both clocks' windows around one program run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Times {
    pub mono: Window,
    pub boot: Window,
}

impl Times {
    /// Both clocks now; `widen` with a second reading after the run.
    pub fn now() -> Self {
        let (mono, boot) = (read(libc::CLOCK_MONOTONIC), read(libc::CLOCK_BOOTTIME));
        Times {
            mono: Window {
                first: mono,
                last: mono,
            },
            boot: Window {
                first: boot,
                last: boot,
            },
        }
    }

    pub fn widen(&mut self) {
        let later = Times::now();
        self.mono.widen(later.mono.last);
        self.boot.widen(later.boot.last);
    }

    pub fn window(&self, kind: Kind) -> Window {
        match kind {
            Kind::Mono => self.mono,
            Kind::Boot => self.boot,
        }
    }
}

/// The decisions of one prediction: certain ones answered from the
/// window, uncertain ones from `script` in order (false when it runs out),
/// each recorded so the caller can try the other branch.
pub struct Clock<'a> {
    times: &'a Times,
    script: &'a [bool],
    /// The answers given to uncertain decisions, in order.
    pub uncertain: Vec<bool>,
}

impl<'a> Clock<'a> {
    pub fn new(times: &'a Times, script: &'a [bool]) -> Self {
        Clock {
            times,
            script,
            uncertain: Vec::new(),
        }
    }

    /// Whether now, on `kind`, is past `deadline` (strictly later).
    pub fn past(&mut self, kind: Kind, deadline: u64) -> bool {
        let window = self.times.window(kind);
        if window.first > deadline {
            return true;
        }
        if window.last <= deadline {
            return false;
        }
        self.choose()
    }

    /// Whether two readings of `kind` during the run can have been more
    /// than `span` apart (the program preempted between them): never when
    /// the whole window is shorter.
    pub fn apart(&mut self, kind: Kind, span: u64) -> bool {
        let window = self.times.window(kind);
        window.last - window.first > span && self.choose()
    }

    fn choose(&mut self) -> bool {
        let answer = self
            .script
            .get(self.uncertain.len())
            .copied()
            .unwrap_or(false);
        self.uncertain.push(answer);
        answer
    }
}

/// A time a prediction expects a field to hold: an exact value, or "now"
/// (plus an offset), which is anywhere in the run's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    Exactly(u64),
    NowPlus(Kind, u64),
}

impl Expected {
    pub fn admits(&self, times: &Times, value: u64) -> bool {
        match *self {
            Expected::Exactly(v) => v == value,
            Expected::NowPlus(kind, offset) => value
                .checked_sub(offset)
                .is_some_and(|now| times.window(kind).contains(now)),
        }
    }
}
