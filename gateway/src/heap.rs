//! glibc heap tuning for a long-running server: few arenas, and memory a
//! burst freed given back once traffic pauses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Requests seen so far; the trimmer only reads it, to tell a pause.
static REQUESTS_SEEN: AtomicU64 = AtomicU64::new(0);

/// How long no request may arrive before a pause counts as one.
const QUIET_FOR: Duration = Duration::from_secs(1);

/// Counts a request toward the traffic the trimmer watches.
pub fn note_request() {
    REQUESTS_SEEN.fetch_add(1, Ordering::Relaxed);
}

/// glibc gives each thread that allocates its own malloc arena (up to 8
/// per core), and the engine's scheduler, rayon and tokio threads each
/// keep freed tensor buffers in theirs: tens of MiB of resident memory
/// that no other thread can reuse. Two arenas keep allocation contention
/// low and that memory shared. Call before any thread exists; an explicit
/// `MALLOC_ARENA_MAX` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; no other thread
        // is allocating yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// glibc keeps what a burst freed for reuse: after a saturated minute that
/// is ~30 MiB resident that a steady load never needs again. Giving it back
/// (`malloc_trim`) takes milliseconds with the arenas locked, so a thread
/// does it once per pause in traffic, never under load.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_after_bursts() {
    let spawned = std::thread::Builder::new().name("heap-trim".into()).spawn(|| {
        let (mut seen, mut trimmed_at) = (0, 0);
        loop {
            std::thread::sleep(QUIET_FOR);
            let now = REQUESTS_SEEN.load(Ordering::Relaxed);
            if now == seen && now != trimmed_at {
                // SAFETY: malloc_trim only returns free pages to the system;
                // it is thread-safe and leaves live allocations alone.
                #[allow(unsafe_code)]
                unsafe {
                    libc::malloc_trim(0);
                }
                trimmed_at = now;
            }
            seen = now;
        }
    });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "no heap-trim thread; memory freed after bursts stays resident");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas() {}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_after_bursts() {}
