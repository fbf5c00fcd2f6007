//! What the running kernel offers. Userspace's start-up self-test finds out
//! which FIB lookup features work and sets these read-only globals when it
//! loads the object, so the verifier drops the branches this kernel cannot
//! take. The defaults are the newest kernels'.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use forwarder_common::cut::{self, Cut};

#[unsafe(no_mangle)]
static FIB_SKIP_NEIGH: u8 = 1;

#[unsafe(no_mangle)]
static FIB_MTU_RESULT: u8 = 1;

#[unsafe(no_mangle)]
static BENCH_CUT: u8 = cut::NONE;

/// `BPF_FIB_LOOKUP_SKIP_NEIGH` is accepted (6.3 and later).
#[inline(always)]
pub fn fib_skip_neigh() -> bool {
    // SAFETY: reading a global; volatile so the compiler does not fold the
    // default in before userspace has set it.
    unsafe { core::ptr::read_volatile(&FIB_SKIP_NEIGH) != 0 }
}

/// `bpf_fib_lookup` writes the route's MTU back (5.12 and later).
#[inline(always)]
pub fn fib_mtu_result() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&FIB_MTU_RESULT) != 0 }
}

/// The bench loaded this object to stop after `at` (see
/// forwarder-common's cut). Otherwise the verifier, knowing the global,
/// removes the check and what it guards.
#[inline(always)]
pub fn cut(at: Cut) -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&BENCH_CUT) == at as u8 }
}

/// CLOCK_BOOTTIME, the clock of rule deadlines and flow times: it keeps
/// counting through a suspend, as the wall clock an expiry was given in
/// does.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_boot_ns() }
}
