//! No internal address leaves in a relayed datagram: the payload of every
//! datagram a relay copies toward the LAN is scanned, in one pass, for an
//! address in an internal /24 (see forwarder_common::maps::PREFIX24_WORDS)
//! in every form `scan` knows, fragments continuing where the one before
//! stopped. A datagram that cannot be scanned whole is not copied.

use aya_ebpf::programs::TcContext;
use forwarder_common::{
    maps::{PREFIX24_WORDS, TRAIN_END, TRAIN_NONE},
    reason::Reason,
};

use crate::{
    maps,
    parse::{self, L3_OFF, L4_OFF, UDP_HLEN, ptr_at},
};

/// The longest IP datagram (or fragment) scanned: a full Ethernet frame's.
/// Each byte is a loop iteration the verifier walks.
const SCAN_MAX: usize = 1500;
/// Covers every offset a scan reaches.
const OFFSET_MASK: usize = 2047;
const _: () = assert!(L3_OFF + SCAN_MAX <= OFFSET_MASK);

/// Scans the pending copy's payload (see `maps::pending_up`: from `from`
/// to `to`, the IP datagram's end before any Ethernet padding), continuing
/// the scan its train carries, and records where the scan stands and how
/// many candidates fell in internal /24s. A datagram over SCAN_MAX bytes,
/// or bytes that cannot all be pulled into the linear area, are refused.
///
/// The loop decides nothing per byte but its own bound and the packet's:
/// the candidates' bits are summed and looked at once, in the next stage.
/// Each undecided branch is a state the verifier keeps for later, and it
/// keeps at most 8,192.
#[inline(always)]
pub fn scan_pending(ctx: &TcContext) -> Result<(), Reason> {
    let pending = maps::pending_up()?;
    // SAFETY (each field): a pointer into the map value.
    let (from, to, mut scan) = unsafe {
        (
            maps::read(&raw const (*pending).from) as usize,
            maps::read(&raw const (*pending).to) as usize,
            maps::read(&raw const (*pending).train.value.scan),
        )
    };
    // Each bound on its own, against a constant: the verifier learns
    // nothing about `to` from a comparison with `from + SCAN_MAX`.
    if !(L4_OFF..=L4_OFF + UDP_HLEN).contains(&from) || to > L3_OFF + SCAN_MAX {
        return Err(Reason::RelayUnscannable);
    }
    parse::pull_headers(ctx, to);
    if ctx.data() + to > ctx.data_end() {
        return Err(Reason::RelayUnscannable);
    }
    let nets = maps::internal_nets().ok_or(Reason::RelayUnscannable)?;
    let mut hits = 0;
    let mut off = from;
    while off < to {
        // Read as the second of two bytes: LLVM turns a one-byte bounds
        // check at a variable offset into a form the verifier cannot use.
        // `from` is past the headers, so off - 1 is in the packet. The mask
        // changes nothing but tells the verifier the offset's bound, which
        // the loop's shape hides from it.
        let Some(pair) = ptr_at::<[u8; 2]>(ctx, (off - 1) & OFFSET_MASK) else {
            return Err(Reason::RelayUnscannable);
        };
        // SAFETY: bounds checked by ptr_at.
        let found = scan.feed(unsafe { (*pair)[1] });
        // Added, not or'ed: the compiler would leave the loop at the first
        // hit, one more undecided branch per byte.
        hits += bit(nets, found.raw) + bit(nets, found.written) + bit(nets, found.reversed);
        off += 1;
    }
    // SAFETY (each field): a pointer into the map value.
    unsafe {
        maps::write(&raw mut (*pending).train.value.scan, scan);
        maps::write(&raw mut (*pending).hits, hits);
    }
    Ok(())
}

/// Whether the pending copy's scan found an internal address, the end of
/// the datagram included when it ends here.
#[inline(always)]
pub fn pending_names_internal() -> Result<bool, Reason> {
    let pending = maps::pending_up()?;
    let nets = maps::internal_nets().ok_or(Reason::RelayUnscannable)?;
    // SAFETY (each field): a pointer into the map value.
    let (mut hits, step, mut scan) = unsafe {
        (
            maps::read(&raw const (*pending).hits),
            maps::read(&raw const (*pending).train.step),
            maps::read(&raw const (*pending).train.value.scan),
        )
    };
    if matches!(step, TRAIN_NONE | TRAIN_END) {
        let found = scan.finish();
        hits += bit(nets, found.written) + bit(nets, found.reversed);
    }
    Ok(hits != 0)
}

/// 1 when the /24 `net` is internal. No internal network holds
/// 0.0.0.0/24, the candidate that names nothing.
#[inline(always)]
fn bit(nets: &[u64; PREFIX24_WORDS], net: u32) -> u64 {
    // SAFETY: the index is masked into the array.
    let word = unsafe {
        *nets
            .as_ptr()
            .add((net >> 6) as usize & (PREFIX24_WORDS - 1))
    };
    (word >> (net & 63)) & 1
}
