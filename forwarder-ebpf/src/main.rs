//! TC programs of the forwarder. `uplink_ingress` runs on the uplink and
//! DNATs forwarded ports to their targets, recording each flow;
//! `downstream_ingress` runs on every downstream interface and translates
//! the targets' packets of those flows back. Anything a
//! program does not claim goes on untouched with `TC_ACT_UNSPEC`, so other
//! programs on the same hook still run, and the reason is counted.
#![no_std]
#![no_main]

mod fib;
mod flow;
mod forward;
mod kernel;
mod lan;
mod leak;
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

fn finish(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Redirected(action) => action,
        Verdict::Relayed => TC_ACT_UNSPEC,
        Verdict::Skipped(reason) => {
            maps::count_reason(reason);
            match reason.disposition() {
                Disposition::Passed => TC_ACT_UNSPEC,
                Disposition::Dropped => TC_ACT_SHOT,
            }
        }
    }
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    finish(forward::uplink_ingress(&ctx))
}

#[classifier]
pub fn downstream_ingress(ctx: TcContext) -> i32 {
    finish(reply::downstream_ingress(&ctx))
}

/// Tail-called by `downstream_ingress` (see relay::to_lan).
#[classifier]
pub fn relay_up_scan(ctx: TcContext) -> i32 {
    finish(relay::scan_up(&ctx).into())
}

/// Tail-called by `relay_up_scan`.
#[classifier]
pub fn relay_up_copy(ctx: TcContext) -> i32 {
    finish(relay::copy_up(&ctx).into())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
