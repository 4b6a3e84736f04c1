//! Per-key admission counters. Each key has a one-minute window (requests
//! and tokens) and a one-day window (tokens), each opening at the key's
//! first request after the previous one closed, and a count of requests in
//! flight. Tokens are counted at admission from the caller's estimate and
//! corrected to the actual count at commit. A refusal consumes nothing and
//! says when every exceeded limit has reset, so `Retry-After` is truthful.
//!
//! Windows are fixed rather than sliding: "exactly N per minute" holds
//! under any concurrency, and the reset time is exact.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// An admission neither committed nor released after this long is taken as
/// lost (its gateway died mid-request) and stops holding a concurrency slot.
const PENDING_TTL: Duration = Duration::from_secs(30 * 60);
/// Only a hint: a slot frees when some request of the key finishes.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);
const SHARDS: usize = 16;
/// Idle keys are swept from a shard every this many operations on it.
const SWEEP_EVERY: u32 = 4096;

/// A key's limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub tokens_per_day: u32,
    pub max_concurrent: u32,
}

/// The minute window as the `X-RateLimit-*` headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub limit_requests: u32,
    pub remaining_requests: u32,
    pub limit_tokens: u32,
    pub remaining_tokens: u32,
    pub reset: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed(State),
    Refused { retry_after: Duration, refused_by: &'static str, state: State },
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    length: Duration,
    requests: u32,
    tokens: u64,
}

impl Window {
    fn new(now: Instant, length: Duration) -> Window {
        Window { opened: now, length, requests: 0, tokens: 0 }
    }

    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.opened) >= self.length {
            *self = Window::new(now, self.length);
        }
    }

    fn reset_in(&self, now: Instant) -> Duration {
        self.length.saturating_sub(now.duration_since(self.opened))
    }

    /// Replaces an estimate held since `held.1` (if this window is still
    /// that one) with the actual tokens.
    fn settle(&mut self, held: Option<(u32, Instant)>, actual: u64) {
        if let Some((estimate, opened)) = held
            && opened == self.opened
        {
            self.tokens = self.tokens.saturating_sub(u64::from(estimate));
        }
        self.tokens += actual;
    }

    fn closed(&self, now: Instant) -> bool {
        now.duration_since(self.opened) >= self.length
    }
}

/// What an admitted request holds until it commits or is released.
#[derive(Debug)]
struct Pending {
    admitted: Instant,
    minute_estimate: u32,
    day_estimate: u32,
    minute_opened: Instant,
    day_opened: Instant,
}

#[derive(Debug)]
struct KeyState {
    minute: Window,
    day: Window,
    pending: HashMap<String, Pending>,
}

impl KeyState {
    fn new(now: Instant) -> KeyState {
        KeyState { minute: Window::new(now, MINUTE), day: Window::new(now, DAY), pending: HashMap::new() }
    }

    fn refresh(&mut self, now: Instant) {
        self.minute.roll(now);
        self.day.roll(now);
        self.pending.retain(|_, p| now.duration_since(p.admitted) < PENDING_TTL);
    }

    fn state(&self, limits: Limits, now: Instant) -> State {
        let remaining = |limit: u32, used: u64| u32::try_from(u64::from(limit).saturating_sub(used)).unwrap_or(0);
        State {
            limit_requests: limits.requests_per_minute,
            remaining_requests: remaining(limits.requests_per_minute, u64::from(self.minute.requests)),
            limit_tokens: limits.tokens_per_minute,
            remaining_tokens: remaining(limits.tokens_per_minute, self.minute.tokens),
            reset: self.minute.reset_in(now),
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.pending.is_empty() && self.minute.closed(now) && self.day.closed(now)
    }
}

#[derive(Default)]
struct Shard {
    keys: HashMap<String, KeyState>,
    operations: u32,
}

pub struct Limiter {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
}

impl Default for Limiter {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(), hasher: RandomState::new() }
    }
}

/// A request larger than a whole budget is counted as the whole budget, so
/// it is admitted against an empty window rather than refused forever.
fn capped(estimate: u32, limit: u32) -> u32 {
    if limit == 0 { estimate } else { estimate.min(limit) }
}

impl Limiter {
    fn with_key<T>(&self, key_id: &str, f: impl FnOnce(&mut KeyState, Instant) -> T) -> T {
        let shard = (self.hasher.hash_one(key_id) as usize) % self.shards.len();
        // A poisoned shard only means another call panicked mid-update of a
        // counter; the counters are still usable.
        let mut shard = self.shards[shard].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        shard.operations = shard.operations.wrapping_add(1);
        if shard.operations.is_multiple_of(SWEEP_EVERY) {
            shard.keys.retain(|_, state| !state.idle(now));
        }
        let state = shard.keys.entry(key_id.to_owned()).or_insert_with(|| KeyState::new(now));
        state.refresh(now);
        f(state, now)
    }

    pub fn acquire(&self, key_id: &str, request_id: &str, estimated_tokens: u32, limits: Limits) -> Decision {
        self.with_key(key_id, |key, now| {
            // A repeated Acquire for an admitted request (a client retry of
            // the RPC) is not counted twice.
            if key.pending.contains_key(request_id) {
                return Decision::Allowed(key.state(limits, now));
            }
            let minute_estimate = capped(estimated_tokens, limits.tokens_per_minute);
            let day_estimate = capped(estimated_tokens, limits.tokens_per_day);
            let exceeded = [
                (
                    limits.max_concurrent != 0 && key.pending.len() >= limits.max_concurrent as usize,
                    "concurrent requests",
                    CONCURRENCY_RETRY,
                ),
                (
                    limits.requests_per_minute != 0 && key.minute.requests >= limits.requests_per_minute,
                    "requests per minute",
                    key.minute.reset_in(now),
                ),
                (
                    limits.tokens_per_minute != 0
                        && key.minute.tokens + u64::from(minute_estimate) > u64::from(limits.tokens_per_minute),
                    "tokens per minute",
                    key.minute.reset_in(now),
                ),
                (
                    limits.tokens_per_day != 0
                        && key.day.tokens + u64::from(day_estimate) > u64::from(limits.tokens_per_day),
                    "tokens per day",
                    key.day.reset_in(now),
                ),
            ];
            // A retry succeeds only once every exceeded limit has reset.
            if let Some((_, refused_by, retry_after)) =
                exceeded.into_iter().filter(|(over, _, _)| *over).max_by_key(|(_, _, wait)| *wait)
            {
                return Decision::Refused { retry_after, refused_by, state: key.state(limits, now) };
            }
            key.minute.requests += 1;
            key.minute.tokens += u64::from(minute_estimate);
            key.day.requests += 1;
            key.day.tokens += u64::from(day_estimate);
            key.pending.insert(
                request_id.to_owned(),
                Pending {
                    admitted: now,
                    minute_estimate,
                    day_estimate,
                    minute_opened: key.minute.opened,
                    day_opened: key.day.opened,
                },
            );
            Decision::Allowed(key.state(limits, now))
        })
    }

    /// Replaces the admission estimate with the tokens actually used. Where
    /// a window closed since admission the estimate went with it, and the
    /// tokens count in the window now open, where they were produced.
    pub fn commit(&self, key_id: &str, request_id: &str, actual_tokens: u32) {
        self.with_key(key_id, |key, _| {
            let pending = key.pending.remove(request_id);
            let actual = u64::from(actual_tokens);
            key.minute.settle(pending.as_ref().map(|p| (p.minute_estimate, p.minute_opened)), actual);
            key.day.settle(pending.as_ref().map(|p| (p.day_estimate, p.day_opened)), actual);
        });
    }

    /// Undoes an admission whose work never ran.
    pub fn release(&self, key_id: &str, request_id: &str) {
        self.with_key(key_id, |key, _| {
            let Some(pending) = key.pending.remove(request_id) else { return };
            for (window, estimate, opened) in [
                (&mut key.minute, pending.minute_estimate, pending.minute_opened),
                (&mut key.day, pending.day_estimate, pending.day_opened),
            ] {
                if window.opened == opened {
                    window.requests = window.requests.saturating_sub(1);
                    window.tokens = window.tokens.saturating_sub(u64::from(estimate));
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const RPM_50: Limits =
        Limits { requests_per_minute: 50, tokens_per_minute: 0, tokens_per_day: 0, max_concurrent: 0 };

    fn allowed(decision: Decision) -> bool {
        matches!(decision, Decision::Allowed(_))
    }

    #[test]
    fn exactly_the_limit_passes_under_concurrency() {
        let limiter = Arc::new(Limiter::default());
        let threads: Vec<_> = (0..200)
            .map(|i| {
                let limiter = limiter.clone();
                std::thread::spawn(move || allowed(limiter.acquire("k", &format!("r{i}"), 1, RPM_50)))
            })
            .collect();
        let admitted = threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count();
        assert_eq!(admitted, 50);
    }

    #[test]
    fn refusal_says_when_to_retry_and_consumes_nothing() {
        let limiter = Limiter::default();
        let limits = Limits { requests_per_minute: 1, ..Limits::default() };
        assert!(matches!(limiter.acquire("k", "a", 0, limits), Decision::Allowed(s) if s.remaining_requests == 0));
        let Decision::Refused { retry_after, refused_by, state } = limiter.acquire("k", "b", 0, limits) else {
            panic!("second request admitted");
        };
        assert!(retry_after > Duration::from_secs(59) && retry_after <= MINUTE);
        assert_eq!((refused_by, state.remaining_requests), ("requests per minute", 0));
        limiter.release("k", "a");
        assert!(allowed(limiter.acquire("k", "c", 0, limits)));
    }

    #[test]
    fn tokens_are_corrected_at_commit() {
        let limiter = Limiter::default();
        let limits = Limits { tokens_per_minute: 100, ..Limits::default() };
        assert!(matches!(limiter.acquire("k", "a", 90, limits), Decision::Allowed(s) if s.remaining_tokens == 10));
        assert!(matches!(
            limiter.acquire("k", "b", 20, limits),
            Decision::Refused { refused_by: "tokens per minute", .. }
        ));
        limiter.commit("k", "a", 30);
        assert!(matches!(limiter.acquire("k", "b", 20, limits), Decision::Allowed(s) if s.remaining_tokens == 50));
        // A completion larger than its estimate leaves the window over budget.
        limiter.commit("k", "b", 200);
        assert!(matches!(limiter.acquire("k", "c", 1, limits), Decision::Refused { .. }));
    }

    #[test]
    fn the_day_budget_outlasts_the_minute() {
        let limiter = Limiter::default();
        let limits = Limits { tokens_per_minute: 1000, tokens_per_day: 150, ..Limits::default() };
        assert!(allowed(limiter.acquire("k", "a", 100, limits)));
        let Decision::Refused { retry_after, refused_by, .. } = limiter.acquire("k", "b", 100, limits) else {
            panic!("over the day budget");
        };
        assert_eq!(refused_by, "tokens per day");
        assert!(retry_after > Duration::from_secs(23 * 3600), "the day window resets, not the minute: {retry_after:?}");
    }

    #[test]
    fn in_flight_requests_are_bounded_and_freed_by_commit_or_release() {
        let limiter = Limiter::default();
        let limits = Limits { max_concurrent: 2, ..Limits::default() };
        assert!(allowed(limiter.acquire("k", "a", 0, limits)));
        assert!(allowed(limiter.acquire("k", "b", 0, limits)));
        assert!(matches!(
            limiter.acquire("k", "c", 0, limits),
            Decision::Refused { refused_by: "concurrent requests", .. }
        ));
        // The same request asking again is not a third.
        assert!(allowed(limiter.acquire("k", "b", 0, limits)));
        limiter.commit("k", "a", 5);
        assert!(allowed(limiter.acquire("k", "c", 0, limits)));
        limiter.release("k", "b");
        assert!(allowed(limiter.acquire("k", "d", 0, limits)));
    }

    #[test]
    fn the_longest_wait_wins_when_several_limits_are_exceeded() {
        let limiter = Limiter::default();
        let limits = Limits { requests_per_minute: 1, tokens_per_day: 10, ..Limits::default() };
        assert!(allowed(limiter.acquire("k", "a", 10, limits)));
        let Decision::Refused { refused_by, .. } = limiter.acquire("k", "b", 10, limits) else { panic!() };
        assert_eq!(refused_by, "tokens per day");
    }

    #[test]
    fn keys_are_independent() {
        let limiter = Limiter::default();
        let limits = Limits { requests_per_minute: 1, ..Limits::default() };
        assert!(allowed(limiter.acquire("a", "1", 0, limits)));
        assert!(allowed(limiter.acquire("b", "1", 0, limits)));
    }
}
