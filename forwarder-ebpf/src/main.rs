//! TC programs of the forwarder. `uplink_ingress` runs on the uplink and
//! DNATs forwarded ports to their targets, recording each flow;
//! `downstream_ingress` runs on every downstream interface and translates
//! the targets' packets of those flows back. Anything a
//! program does not claim goes on untouched with `TC_ACT_UNSPEC`, so other
//! programs on the same hook still run, and the reason is counted.
//! `relay_up_scan` and `relay_up_copy` are the stages of a relay copy
//! toward the LAN, tail-called by `downstream_ingress`; `kernel_log` writes
//! a noted aya-log record, tail-called by every program on its way out.
#![no_std]
#![no_main]

mod fib;
mod flow;
mod forward;
mod kernel;
mod lan;
mod leak;
mod log;
mod maps;
mod mem;
mod nat;
mod parse;
mod relay;
mod reply;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use forwarder_common::reason::Disposition;
use verdict::Verdict;

#[inline(always)]
fn finish(ctx: &TcContext, verdict: Verdict) -> i32 {
    let action = match verdict {
        Verdict::Cut => return TC_ACT_UNSPEC,
        Verdict::Redirected(action) => action,
        Verdict::Relayed => TC_ACT_UNSPEC,
        Verdict::Skipped(reason) => {
            maps::count_reason(reason);
            match reason.disposition() {
                Disposition::Passed => TC_ACT_UNSPEC,
                Disposition::Dropped => TC_ACT_SHOT,
            }
        }
    };
    log::flush(ctx, action)
}

// Each program's body is inlined into the function the macro wraps it in:
// the kernel log's branches (dead unless the log is on, which LLVM cannot
// know) make it look big enough to LLVM to be left a BPF-to-BPF call, which
// every packet would pay for.

#[classifier]
#[inline(always)]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    finish(&ctx, forward::uplink_ingress(&ctx))
}

#[classifier]
#[inline(always)]
pub fn downstream_ingress(ctx: TcContext) -> i32 {
    finish(&ctx, reply::downstream_ingress(&ctx))
}

/// Tail-called by `downstream_ingress` (see relay::to_lan).
#[classifier]
#[inline(always)]
pub fn relay_up_scan(ctx: TcContext) -> i32 {
    finish(&ctx, relay::scan_up(&ctx).into())
}

/// Tail-called by `relay_up_scan`.
#[classifier]
#[inline(always)]
pub fn relay_up_copy(ctx: TcContext) -> i32 {
    finish(&ctx, relay::copy_up(&ctx).into())
}

/// Tail-called on the way out by any program that noted a kernel log
/// record (see log).
#[classifier]
#[inline(always)]
pub fn kernel_log(ctx: TcContext) -> i32 {
    log::write(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
