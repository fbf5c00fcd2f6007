//! Zeroing that stays zeroing: the BPF backend turns any zeroing it
//! recognises (mem::zeroed, array or struct literals, byte loops) into a call
//! to a byte-wise memset subprogram, which showed up in profiles.

use core::mem::MaybeUninit;

/// Zeroes `buf` in place, one volatile store per element, and returns it.
#[inline(always)]
pub fn zeroed<W: Copy + Default, const N: usize>(buf: &mut MaybeUninit<[W; N]>) -> &mut [W; N] {
    let first = buf.as_mut_ptr().cast::<W>();
    for i in 0..N {
        // SAFETY: i stays inside the array.
        unsafe { core::ptr::write_volatile(first.add(i), W::default()) };
    }
    // SAFETY: every element was written.
    unsafe { buf.assume_init_mut() }
}
