//! Tuning for mimalloc, the allocator the binaries use.

use libmimalloc_sys::{mi_option_set, mi_option_t};

/// mimalloc's `mi_option_purge_delay`: its value in the `mi_option_t` enum
/// of the `mimalloc.h` that libmimalloc-sys builds (v2, the default: the
/// 16th option). The Rust bindings do not name it.
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// How long memory freed by the program stays with the process before
/// mimalloc returns it to the operating system (mimalloc's default: 10 ms).
///
/// A bulk import frees and reallocates its buffers (batches, decoded rows)
/// all the time. With a 10 ms delay, memory handed back to the OS is soon
/// asked for again, and every page of it is zeroed by the kernel once more:
/// page clearing was a fifth of the server's CPU time in a bulk import
/// profile, and keeping freed memory for a second made imports about 8%
/// faster (see BENCHMARKS.md). Memory freed for good is still returned, a
/// second later.
pub const PURGE_DELAY_MS: i64 = 1000;

/// Applies [`PURGE_DELAY_MS`]. Harmless when mimalloc is not the global
/// allocator.
///
/// # Safety
///
/// mimalloc's option setters are not thread-safe: call this before any
/// other thread exists (first thing in `main`), so that nothing reads the
/// option while it is set.
pub unsafe fn tune_mimalloc() {
    // SAFETY: sets a plain integer option; the caller guarantees no other
    // thread exists yet.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}
