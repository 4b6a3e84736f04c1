//! Per-key admission counters. Each key has a one-minute window that opens
//! at its first request; requests and (estimated, then corrected) tokens are
//! counted in it. A refusal consumes nothing and says exactly when the
//! window resets, so `Retry-After` is truthful.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// 0 means unlimited.
    pub requests_per_minute: u32,
    /// 0 means unlimited.
    pub tokens_per_minute: u32,
}

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
    Refused { retry_after: Duration, state: State },
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    requests: u32,
    tokens: u64,
    /// Estimates of admitted requests not yet committed, by request id.
    pending: HashMap<String, u32>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self { opened: now, requests: 0, tokens: 0, pending: HashMap::new() }
    }

    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.opened) >= WINDOW {
            *self = Window::new(now);
        }
    }

    fn state(&self, limits: Limits, now: Instant) -> State {
        let remaining = |limit: u32, used: u64| u32::try_from(u64::from(limit).saturating_sub(used)).unwrap_or(0);
        State {
            limit_requests: limits.requests_per_minute,
            remaining_requests: remaining(limits.requests_per_minute, u64::from(self.requests)),
            limit_tokens: limits.tokens_per_minute,
            remaining_tokens: remaining(limits.tokens_per_minute, self.tokens),
            reset: WINDOW.saturating_sub(now.duration_since(self.opened)),
        }
    }
}

pub struct Limiter {
    shards: Vec<Mutex<HashMap<String, Window>>>,
    hasher: RandomState,
}

impl Default for Limiter {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), hasher: RandomState::new() }
    }
}

impl Limiter {
    fn with_window<T>(&self, key_id: &str, f: impl FnOnce(&mut Window, Instant) -> T) -> T {
        let shard = (self.hasher.hash_one(key_id) as usize) % self.shards.len();
        // A poisoned shard only means another call panicked mid-update of a
        // counter; the counters are still usable.
        let mut map = self.shards[shard].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let window = map.entry(key_id.to_owned()).or_insert_with(|| Window::new(now));
        window.roll(now);
        f(window, now)
    }

    pub fn acquire(&self, key_id: &str, request_id: &str, estimated_tokens: u32, limits: Limits) -> Decision {
        self.with_window(key_id, |window, now| {
            let requests_full = limits.requests_per_minute != 0 && window.requests >= limits.requests_per_minute;
            // A single request larger than the whole budget is admitted
            // against an empty window rather than refused forever.
            let estimate = if limits.tokens_per_minute == 0 {
                estimated_tokens
            } else {
                estimated_tokens.min(limits.tokens_per_minute)
            };
            let tokens_full = limits.tokens_per_minute != 0
                && window.tokens + u64::from(estimate) > u64::from(limits.tokens_per_minute);
            let state = window.state(limits, now);
            if requests_full || tokens_full {
                return Decision::Refused { retry_after: state.reset, state };
            }
            window.requests += 1;
            window.tokens += u64::from(estimate);
            window.pending.insert(request_id.to_owned(), estimate);
            Decision::Allowed(window.state(limits, now))
        })
    }

    /// Replaces the admission estimate with the tokens actually used.
    pub fn commit(&self, key_id: &str, request_id: &str, actual_tokens: u32) {
        self.with_window(key_id, |window, _| {
            let estimate = window.pending.remove(request_id).unwrap_or(0);
            window.tokens = window.tokens.saturating_sub(u64::from(estimate)) + u64::from(actual_tokens);
        });
    }

    /// Undoes an admission whose work never ran.
    pub fn release(&self, key_id: &str, request_id: &str) {
        self.with_window(key_id, |window, _| {
            if let Some(estimate) = window.pending.remove(request_id) {
                window.requests = window.requests.saturating_sub(1);
                window.tokens = window.tokens.saturating_sub(u64::from(estimate));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const RPM_50: Limits = Limits { requests_per_minute: 50, tokens_per_minute: 0 };

    #[test]
    fn exactly_the_limit_passes_under_concurrency() {
        let limiter = Arc::new(Limiter::default());
        let threads: Vec<_> = (0..200)
            .map(|i| {
                let limiter = limiter.clone();
                std::thread::spawn(move || {
                    matches!(limiter.acquire("k", &format!("r{i}"), 1, RPM_50), Decision::Allowed(_))
                })
            })
            .collect();
        let admitted = threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count();
        assert_eq!(admitted, 50);
    }

    #[test]
    fn refusal_says_when_to_retry_and_consumes_nothing() {
        let limiter = Limiter::default();
        let limits = Limits { requests_per_minute: 1, tokens_per_minute: 0 };
        assert!(matches!(limiter.acquire("k", "a", 0, limits), Decision::Allowed(s) if s.remaining_requests == 0));
        let Decision::Refused { retry_after, state } = limiter.acquire("k", "b", 0, limits) else {
            panic!("second request admitted");
        };
        assert!(retry_after > Duration::from_secs(59) && retry_after <= WINDOW);
        assert_eq!(state.remaining_requests, 0);
        limiter.release("k", "a");
        assert!(matches!(limiter.acquire("k", "c", 0, limits), Decision::Allowed(_)));
    }

    #[test]
    fn tokens_are_corrected_at_commit() {
        let limiter = Limiter::default();
        let limits = Limits { requests_per_minute: 0, tokens_per_minute: 100 };
        assert!(matches!(limiter.acquire("k", "a", 90, limits), Decision::Allowed(s) if s.remaining_tokens == 10));
        assert!(matches!(limiter.acquire("k", "b", 20, limits), Decision::Refused { .. }));
        limiter.commit("k", "a", 30);
        assert!(matches!(limiter.acquire("k", "b", 20, limits), Decision::Allowed(s) if s.remaining_tokens == 50));
    }

    #[test]
    fn keys_are_independent() {
        let limiter = Limiter::default();
        let limits = Limits { requests_per_minute: 1, tokens_per_minute: 0 };
        assert!(matches!(limiter.acquire("a", "1", 0, limits), Decision::Allowed(_)));
        assert!(matches!(limiter.acquire("b", "1", 0, limits), Decision::Allowed(_)));
    }
}
