//! Tuning for mimalloc, the allocator the binaries use.

use libmimalloc_sys::{mi_option_set, mi_option_t};

/// `mi_option_purge_delay`: its position in mimalloc's `mi_option_t`
/// (`mimalloc.h`); the Rust bindings do not name it.
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

/// Applies [`PURGE_DELAY_MS`]. Call it first thing in `main`, before any
/// other thread starts: mimalloc's option setters are not thread-safe.
/// Harmless when mimalloc is not the global allocator.
pub fn tune_mimalloc() {
    // SAFETY: sets a plain integer option; `main` calls it before any other
    // thread exists, so nothing reads the option at the same time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}
