//! Asking the processor for memory a little before it is read.
//!
//! The live renderer writes one change to thousands of sockets in a row,
//! and each write first follows a chain of pointers (the member, its
//! outlet, the connection's outbox, the socket) that the previous change
//! left far out of cache. Every write's system call waits for whatever
//! loads come before it, so those misses add up one after another; asked
//! for a few members ahead, they arrive while the kernel sends
//! (`docs/adr/0012-one-unsafe-call-the-prefetch-hint.md`).
//!
//! This is the crate's only `unsafe` code: the workspace denies it, and a
//! test checks that no other file allows it.

/// Asks the processor to start loading every cache line of `value`,
/// without waiting for them. Only a hint: nothing is read, and what later
/// loads return is unchanged.
#[inline(always)]
pub fn prefetch<T: ?Sized>(value: &T) {
    let start = std::ptr::from_ref(value).cast::<u8>();
    // `start` plus k lines lies in the k-th line `value` touches.
    for line in 0..lines(start.addr(), std::mem::size_of_val(value)) {
        fetch(start.wrapping_add(line * CACHE_LINE));
    }
}

/// How many cache lines `size` bytes from `address` touch (one for an
/// empty value: its address is still asked for).
const fn lines(address: usize, size: usize) -> usize {
    let first = address % CACHE_LINE;
    let last = first + if size == 0 { 0 } else { size - 1 };
    last / CACHE_LINE + 1
}

/// The cache line size of the processors this runs on.
const CACHE_LINE: usize = 64;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(unsafe_code)]
fn fetch(address: *const u8) {
    // SAFETY: `prefetcht0` reads nothing into the program and never
    // faults, whatever the address; the `sse` feature it belongs to is
    // part of every x86_64 processor. The call is `unsafe` only because
    // the intrinsic is declared with `#[target_feature(enable = "sse")]`.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn fetch(_address: *const u8) {}

#[cfg(test)]
mod tests {
    use super::lines;

    #[test]
    fn a_value_is_asked_for_by_every_line_it_touches() {
        assert_eq!(lines(0, 0), 1);
        assert_eq!(lines(0, 1), 1);
        assert_eq!(lines(0, 64), 1);
        assert_eq!(lines(0, 65), 2);
        assert_eq!(lines(63, 1), 1);
        assert_eq!(lines(63, 2), 2);
        assert_eq!(lines(32, 64), 2);
        assert_eq!(lines(64 * 7 + 8, 200), 4);
    }
}
