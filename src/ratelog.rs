//! Rate-limited logging for conditions a hostile or broken client can repeat at
//! will (junk connections, failed handshakes, malformed requests).
//!
//! One key per condition (`"transport.handshake-timeout"`). The first occurrence
//! of a key is logged in full. Further occurrences inside the summary interval
//! are only counted; when the interval ends, one summary line gives the count and
//! the last detail, and a new interval starts. A key quiet for a whole interval
//! goes back to logging its next occurrence in full. So a flood of one condition
//! costs at most one line per interval (default [`SUMMARY_INTERVAL`], 30 s),
//! whatever its rate: 136 MB of warnings in 65 s became a few hundred bytes
//! (issue 14).
//!
//! Owns: the per-key windows, the summary thread of the process-wide instance.
//! Does not own counting for status and metrics: see
//! [`crate::metrics::rejections`], which counts and then logs through here.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often a repeated condition is summarised: a flood costs one line per key
/// per interval, i.e. two per minute.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(30);

/// How often the summary thread of [`global`] looks for intervals that ended.
const SUMMARY_POLL: Duration = Duration::from_secs(1);

/// The level of a rate-limited line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

struct KeyState {
    level: Level,
    /// When the current interval began (at a full line or a summary).
    window_started: Instant,
    /// Occurrences in the current interval not yet logged.
    suppressed: u64,
    /// The detail of the last suppressed occurrence.
    last_detail: String,
}

/// A line to write, decided under the lock and written after it.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The first occurrence of a key after a quiet interval.
    First {
        key: &'static str,
        level: Level,
        detail: String,
    },
    /// `count` occurrences suppressed during the last `window`.
    Summary {
        key: &'static str,
        level: Level,
        count: u64,
        window: Duration,
        last_detail: String,
    },
}

/// Rate-limited log lines, one window per key.
pub struct RateLog {
    interval: Duration,
    keys: Mutex<BTreeMap<&'static str, KeyState>>,
}

impl RateLog {
    pub const fn new(interval: Duration) -> RateLog {
        RateLog {
            interval,
            keys: Mutex::new(BTreeMap::new()),
        }
    }

    /// Record one occurrence of `key` at `now`; returns the line to write, if any.
    /// `detail` is only built when it may be logged or kept as the last detail.
    pub fn record_at(
        &self,
        key: &'static str,
        level: Level,
        detail: impl FnOnce() -> String,
        now: Instant,
    ) -> Option<Line> {
        let mut keys = self.keys.lock().expect("ratelog lock");
        match keys.get_mut(key) {
            None => {
                let detail = detail();
                keys.insert(
                    key,
                    KeyState {
                        level,
                        window_started: now,
                        suppressed: 0,
                        last_detail: String::new(),
                    },
                );
                Some(Line::First { key, level, detail })
            }
            Some(state) => {
                state.suppressed += 1;
                state.last_detail = detail();
                state.level = level;
                if now.duration_since(state.window_started) >= self.interval {
                    Some(Self::summarise(key, state, now))
                } else {
                    None
                }
            }
        }
    }

    fn summarise(key: &'static str, state: &mut KeyState, now: Instant) -> Line {
        let line = Line::Summary {
            key,
            level: state.level,
            count: state.suppressed,
            window: now.duration_since(state.window_started),
            last_detail: std::mem::take(&mut state.last_detail),
        };
        state.suppressed = 0;
        state.window_started = now;
        line
    }

    /// Lines for every interval that ended by `now`: a summary where occurrences
    /// were suppressed; a key with none is forgotten (its next occurrence is
    /// logged in full).
    pub fn due_at(&self, now: Instant) -> Vec<Line> {
        let mut keys = self.keys.lock().expect("ratelog lock");
        let mut lines = Vec::new();
        keys.retain(|key, state| {
            if now.duration_since(state.window_started) < self.interval {
                return true;
            }
            if state.suppressed == 0 {
                return false;
            }
            lines.push(Self::summarise(key, state, now));
            true
        });
        lines
    }

    /// Record one occurrence now and write its line, if any, through `tracing`.
    /// Returns whether a line was written.
    pub fn record(&self, key: &'static str, level: Level, detail: impl FnOnce() -> String) -> bool {
        match self.record_at(key, level, detail, Instant::now()) {
            Some(line) => {
                emit(&line, self.interval);
                true
            }
            None => false,
        }
    }

    /// Write the summaries that are due now.
    pub fn flush(&self) {
        for line in self.due_at(Instant::now()) {
            emit(&line, self.interval);
        }
    }
}

/// Write one line through `tracing` (target `tandem::ratelog`, field `key`).
pub fn emit(line: &Line, interval: Duration) {
    match line {
        Line::First { key, level, detail } => {
            let interval_s = interval.as_secs();
            match level {
                Level::Info => tracing::info!(
                    key,
                    "{detail} (repeats are counted and summarised every {interval_s} s)"
                ),
                Level::Warn => tracing::warn!(
                    key,
                    "{detail} (repeats are counted and summarised every {interval_s} s)"
                ),
                Level::Error => tracing::error!(
                    key,
                    "{detail} (repeats are counted and summarised every {interval_s} s)"
                ),
            }
        }
        Line::Summary {
            key,
            level,
            count,
            window,
            last_detail,
        } => {
            let window_s = window.as_secs();
            match level {
                Level::Info => tracing::info!(
                    key,
                    count,
                    window_s,
                    "{count} more in the last {window_s} s: {key}; the last one: {last_detail}"
                ),
                Level::Warn => tracing::warn!(
                    key,
                    count,
                    window_s,
                    "{count} more in the last {window_s} s: {key}; the last one: {last_detail}"
                ),
                Level::Error => tracing::error!(
                    key,
                    count,
                    window_s,
                    "{count} more in the last {window_s} s: {key}; the last one: {last_detail}"
                ),
            }
        }
    }
}

static GLOBAL: RateLog = RateLog::new(SUMMARY_INTERVAL);

/// The process-wide instance. The first call starts a small thread that writes
/// the summaries that are due once a second, so a flood that stops is still
/// summarised (not only when the next occurrence comes).
pub fn global() -> &'static RateLog {
    static SUMMARIES: OnceLock<()> = OnceLock::new();
    SUMMARIES.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("tandem-ratelog".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(SUMMARY_POLL);
                    GLOBAL.flush();
                }
            });
        if let Err(e) = spawned {
            // Summaries then come with the next occurrence of each key only.
            tracing::warn!("cannot start the log summary thread: {e}");
        }
    });
    &GLOBAL
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_occurrence_is_logged_then_repeats_are_summarised_once_per_interval() {
        let log = RateLog::new(10 * S);
        let t0 = Instant::now();
        let first = log.record_at("k", Level::Warn, || "one".into(), t0);
        assert_eq!(
            first,
            Some(Line::First {
                key: "k",
                level: Level::Warn,
                detail: "one".into()
            })
        );
        // 1000 repeats within the interval: no line.
        for i in 0..1000u64 {
            let t = t0 + Duration::from_millis(i * 5);
            assert_eq!(log.record_at("k", Level::Warn, || format!("#{i}"), t), None);
        }
        assert!(log.due_at(t0 + 9 * S).is_empty());
        // The interval ends: one summary with the count and the last detail.
        assert_eq!(
            log.due_at(t0 + 10 * S),
            vec![Line::Summary {
                key: "k",
                level: Level::Warn,
                count: 1000,
                window: 10 * S,
                last_detail: "#999".into()
            }]
        );
        // Still flooding: the next summary comes one interval later, with the
        // occurrence that arrived after it due.
        assert_eq!(
            log.record_at("k", Level::Warn, || "x".into(), t0 + 15 * S),
            None
        );
        let line = log.record_at("k", Level::Warn, || "y".into(), t0 + 20 * S);
        assert!(
            matches!(line, Some(Line::Summary { count: 2, .. })),
            "{line:?}"
        );
        // A quiet interval: the key is forgotten, the next occurrence is logged in full.
        assert!(log.due_at(t0 + 30 * S).is_empty());
        assert!(matches!(
            log.record_at("k", Level::Warn, || "again".into(), t0 + 31 * S),
            Some(Line::First { .. })
        ));
    }

    #[test]
    fn keys_are_independent() {
        let log = RateLog::new(10 * S);
        let t0 = Instant::now();
        assert!(log.record_at("a", Level::Warn, String::new, t0).is_some());
        assert!(log.record_at("b", Level::Info, String::new, t0).is_some());
        assert!(log.record_at("a", Level::Warn, String::new, t0).is_none());
        assert!(log.record_at("b", Level::Info, String::new, t0).is_none());
        let due = log.due_at(t0 + 10 * S);
        assert_eq!(due.len(), 2);
    }

    #[test]
    fn a_flood_costs_one_line_per_interval() {
        let log = RateLog::new(30 * S);
        let t0 = Instant::now();
        let mut lines = 0;
        // 60 s at 10 000 occurrences per second, with the summary poll every second.
        for ms in 0..60_000u64 {
            for _ in 0..10 {
                lines += usize::from(
                    log.record_at(
                        "flood",
                        Level::Warn,
                        String::new,
                        t0 + Duration::from_millis(ms),
                    )
                    .is_some(),
                );
            }
            if ms % 1000 == 0 {
                lines += log.due_at(t0 + Duration::from_millis(ms)).len();
            }
        }
        assert!(lines <= 3, "{lines} lines");
    }
}
