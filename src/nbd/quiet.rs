//! Rate-limited logging of refusals: the first event of a kind is logged at
//! once, later ones of the same kind are only counted and summarised (count and
//! the last one's detail) once per period. A flood of junk connections or bad
//! requests therefore costs a few log lines a minute, not one per event
//! (issue 14: 136 MB of log in 65 s before this).
//!
//! Owns: the per-kind counters and the decision to log. Does not own the
//! figures exported as metrics ([`super::server::NbdStats`] counts every event).

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest detail kept for a summary line.
const DETAIL_MAX_BYTES: usize = 300;

#[derive(Debug)]
struct Entry {
    /// Events since the last line logged for this kind.
    suppressed: u64,
    total: u64,
    last_line: Instant,
    last_detail: String,
}

/// A rate limiter for warnings, keyed by a static kind.
#[derive(Debug)]
pub struct QuietLog {
    period: Duration,
    kinds: Mutex<HashMap<&'static str, Entry>>,
}

impl QuietLog {
    pub fn new(period: Duration) -> QuietLog {
        QuietLog {
            period,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Entry>> {
        // Nothing panics while holding the lock; a poisoned map still holds counters.
        self.kinds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One event of `kind`. Logged (at WARN) if it is the first of its kind in a
    /// period; otherwise counted for the next summary. Returns whether it was logged.
    pub fn event(&self, kind: &'static str, detail: impl Display) -> bool {
        let now = Instant::now();
        let mut kinds = self.lock();
        let entry = kinds.entry(kind).or_insert_with(|| Entry {
            suppressed: 0,
            total: 0,
            last_line: now - self.period - Duration::from_secs(1),
            last_detail: String::new(),
        });
        entry.total += 1;
        let quiet_for = now.saturating_duration_since(entry.last_line);
        if entry.suppressed == 0 && quiet_for >= self.period {
            entry.last_line = now;
            let total = entry.total;
            drop(kinds);
            tracing::warn!(
                kind,
                total,
                period_s = self.period.as_secs(),
                "{detail} (more of this kind are counted and summarised once per period)"
            );
            return true;
        }
        entry.suppressed += 1;
        entry.last_detail = detail.to_string();
        if entry.last_detail.len() > DETAIL_MAX_BYTES {
            let cut = super::proto::truncate_utf8(&entry.last_detail, DETAIL_MAX_BYTES).len();
            entry.last_detail.truncate(cut);
        }
        false
    }

    /// Log a summary line for every kind with suppressed events whose period has
    /// passed (all of them with `force`). Call it periodically and at shutdown.
    pub fn flush(&self, force: bool) {
        let now = Instant::now();
        let mut lines = Vec::new();
        for (kind, e) in self.lock().iter_mut() {
            if e.suppressed > 0
                && (force || now.saturating_duration_since(e.last_line) >= self.period)
            {
                lines.push((
                    *kind,
                    e.suppressed,
                    e.total,
                    std::mem::take(&mut e.last_detail),
                ));
                e.suppressed = 0;
                e.last_line = now;
            }
        }
        for (kind, suppressed, total, last) in lines {
            tracing::warn!(
                kind,
                suppressed,
                total,
                "{suppressed} more {kind} since the last report ({total} in all); the last: {last}"
            );
        }
    }

    /// Events of `kind` so far (logged or not).
    #[cfg(test)]
    pub fn total(&self, kind: &'static str) -> u64 {
        self.lock().get(kind).map_or(0, |e| e.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_is_logged_then_counted_until_the_period_passes() {
        let q = QuietLog::new(Duration::from_millis(200));
        assert!(q.event("bad request", "one"));
        for i in 0..1000 {
            assert!(!q.event("bad request", i));
        }
        // Another kind has its own budget.
        assert!(q.event("bad handshake", "x"));
        assert_eq!(q.total("bad request"), 1001);
        // Suppressed events are summarised, not logged one by one, even later.
        std::thread::sleep(Duration::from_millis(250));
        assert!(!q.event("bad request", "late"));
        q.flush(false);
        // After the summary the next period starts quiet: the next event is counted
        // until it passes, then logged again.
        assert!(!q.event("bad request", "after summary"));
        q.flush(true);
        std::thread::sleep(Duration::from_millis(250));
        assert!(q.event("bad request", "a new episode"));
    }
}
