//! Reconnect delays: exponential growth with jitter, capped.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with "equal jitter": attempt `n` waits a random delay
/// in `[base/2, base]` where `base = min(initial_ms * 2^n, max_ms)`. The
/// random half spreads reconnect storms (two nodes restarting together do not
/// dial in lockstep); the fixed half guarantees the delay still grows.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// # Panics
    /// If `initial_ms` is 0 or greater than `max_ms` (a configuration bug the
    /// config layer must reject first).
    pub fn new(initial_ms: u64, max_ms: u64) -> Self {
        assert!(
            initial_ms > 0 && initial_ms <= max_ms,
            "backoff needs 0 < initial_ms ({initial_ms}) <= max_ms ({max_ms})"
        );
        Backoff {
            initial_ms,
            max_ms,
            attempt: 0,
        }
    }

    /// The upper bound of the next delay, before jitter.
    pub fn next_base_ms(&self) -> u64 {
        let factor = 1u64.checked_shl(self.attempt.min(63)).unwrap_or(u64::MAX);
        self.initial_ms.saturating_mul(factor).min(self.max_ms)
    }

    /// The delay to wait before the next attempt; each call counts an attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base_ms = self.next_base_ms();
        // Stop counting once the cap is reached, so the shift never overflows.
        if base_ms < self.max_ms {
            self.attempt += 1;
        }
        let half_ms = base_ms / 2;
        let delay_ms = half_ms + rand::thread_rng().gen_range(0..=base_ms - half_ms);
        Duration::from_millis(delay_ms)
    }

    /// Call after a successful connection: the next failure starts over.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}
