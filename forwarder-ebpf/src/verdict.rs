//! What a program decides for one packet, as every part of the datapath
//! reports it.

use forwarder_common::reason::Reason;

/// What a program decided for one packet.
pub enum Verdict {
    /// The packet was rewritten and redirected; the value is the TC action
    /// the redirect helper returned.
    Redirected(i32),
    /// Relayed: copies went out, the original continues untouched.
    Relayed,
    /// Not claimed (or dropped, per the reason's disposition).
    Skipped(Reason),
    /// Stopped where the bench asked (kernel::cut): passed on, uncounted.
    Cut,
}

impl From<Result<Verdict, Reason>> for Verdict {
    fn from(result: Result<Verdict, Reason>) -> Self {
        result.unwrap_or_else(Verdict::Skipped)
    }
}

/// Returns `Ok(Verdict::Cut)` from the enclosing path when the bench loaded
/// the object to stop at `$at` (see kernel::cut).
macro_rules! stop_if_cut {
    ($at:expr) => {
        if crate::kernel::cut($at) {
            return Ok(crate::verdict::Verdict::Cut);
        }
    };
}
pub(crate) use stop_if_cut;
