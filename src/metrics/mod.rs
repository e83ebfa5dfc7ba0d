//! Counters, gauges and latency histograms shared by an agent's tasks, and the
//! status document built from them. Counters are relaxed atomics: they are
//! figures for humans and monitoring, never inputs to replication decisions.
//!
//! Submodules: [`events`] (the bounded event ring behind the control socket's
//! `events` command), [`rpo`] (the RPO crossing decision), [`prometheus`] (the
//! text exposition rendered from the status document, so `/metrics` and
//! `tandem status --json` never disagree) and [`http`] (the small HTTP/1.1
//! server that serves it).

pub mod events;
pub mod http;
pub mod prometheus;
// Counted, rate-limited rejections of hostile input (hardening).
pub mod rejections;
pub mod rpo;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Live figures of one agent.
pub struct Metrics {
    pub started: Instant,
    /// Client write/zero/trim requests accepted and their bytes.
    pub client_writes: AtomicU64,
    pub client_write_bytes: AtomicU64,
    pub client_reads: AtomicU64,
    pub client_read_bytes: AtomicU64,
    pub client_flushes: AtomicU64,
    /// Uncompressed payload bytes shipped (writes and resync), and their size on the wire.
    pub replicated_bytes: AtomicU64,
    pub replicated_wire_bytes: AtomicU64,
    /// Bytes of resync traffic (raw) and blocks resynced.
    pub resync_bytes: AtomicU64,
    /// Bytes compared by hash instead of sent, and blocks found different.
    pub verified_bytes: AtomicU64,
    pub verify_mismatched_blocks: AtomicU64,
    /// Bytes of hash-comparison frames sent (headers and hashes).
    pub verify_wire_bytes: AtomicU64,
    /// Replication window (G4): writes and bytes not yet durable on the secondary.
    pub lag_writes: AtomicU64,
    pub lag_bytes: AtomicU64,
    /// Milliseconds since `started` at which the oldest not-yet-durable write was accepted; 0 = none.
    pub lag_oldest_at_ms: AtomicU64,
    pub out_of_sync_bytes: AtomicU64,
    pub resync_total_blocks: AtomicU64,
    pub resync_shipped_blocks: AtomicU64,
    pub connected: AtomicBool,
    /// Primary: connected but ahead (window was full; tracking writes in the bitmap).
    pub ahead: AtomicBool,
    pub ahead_episodes: AtomicU64,
    /// wan (issue 11 item 5): primary: spill episodes, bytes of writes spilled, and
    /// record bytes in the spill log now.
    pub spill_episodes: AtomicU64,
    pub spilled_bytes: AtomicU64,
    pub spill_live_bytes: AtomicU64,
    /// Primary: a resync pass is running.
    pub resync_active: AtomicBool,
    pub sessions: AtomicU64,
    /// Frames refused for a bad checksum or malformed content (G5).
    pub frames_rejected: AtomicU64,
    /// Secondary: writes applied.
    pub applied_writes: AtomicU64,
    pub applied_bytes: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Client write latency (µs), from request to reply, and the exact sum of
    /// every recorded latency (the Prometheus summary's `_sum`).
    pub write_latency_us: Mutex<Histogram<u64>>,
    pub write_latency_sum_us: AtomicU64,
    /// Local volume write latency (primary: the write on this node's volume alone).
    pub local_write_latency: LatencyRecorder,
    /// Replication latency (primary): from a write's shipping to the secondary's
    /// Durable covering it (network, remote apply, remote flush batch).
    pub replication_latency: LatencyRecorder,
    /// Throughput over the last sampling interval, bytes per second (f64 bits).
    pub write_rate_bits: AtomicU64,
    pub replicated_rate_bits: AtomicU64,
    pub resync_rate_bits: AtomicU64,
    /// Recent events (peer connects, resyncs, RPO crossings).
    pub events: events::EventLog,
    /// Primary with an RPO target: the lag is above it now, since when (ms since
    /// the Unix epoch, 0 = not exceeded), and how many times it crossed above.
    pub rpo_exceeded: AtomicBool,
    pub rpo_exceeded_since_unix_ms: AtomicU64,
    pub rpo_violations: AtomicU64,
    /// nbd (issue 13/14): the NBD export's counters (refused connections and
    /// requests, dropped stalled clients, TLS failures, sessions by feature),
    /// kept across role changes like the other counters.
    pub nbd: std::sync::Arc<crate::nbd::NbdStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            client_writes: AtomicU64::new(0),
            client_write_bytes: AtomicU64::new(0),
            client_reads: AtomicU64::new(0),
            client_read_bytes: AtomicU64::new(0),
            client_flushes: AtomicU64::new(0),
            replicated_bytes: AtomicU64::new(0),
            replicated_wire_bytes: AtomicU64::new(0),
            resync_bytes: AtomicU64::new(0),
            verified_bytes: AtomicU64::new(0),
            verify_wire_bytes: AtomicU64::new(0),
            verify_mismatched_blocks: AtomicU64::new(0),
            lag_writes: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            lag_oldest_at_ms: AtomicU64::new(0),
            out_of_sync_bytes: AtomicU64::new(0),
            resync_total_blocks: AtomicU64::new(0),
            resync_shipped_blocks: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            ahead: AtomicBool::new(false),
            ahead_episodes: AtomicU64::new(0),
            spill_episodes: AtomicU64::new(0), // wan
            spilled_bytes: AtomicU64::new(0),
            spill_live_bytes: AtomicU64::new(0),
            resync_active: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            frames_rejected: AtomicU64::new(0),
            applied_writes: AtomicU64::new(0),
            applied_bytes: AtomicU64::new(0),
            last_error: Mutex::new(None),
            // 1 µs .. 60 s at 3 significant digits: ~100 KiB, fixed.
            write_latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            ),
            write_latency_sum_us: AtomicU64::new(0),
            local_write_latency: LatencyRecorder::default(),
            replication_latency: LatencyRecorder::default(),
            write_rate_bits: AtomicU64::new(0),
            replicated_rate_bits: AtomicU64::new(0),
            resync_rate_bits: AtomicU64::new(0),
            events: events::EventLog::default(),
            rpo_exceeded: AtomicBool::new(false),
            rpo_exceeded_since_unix_ms: AtomicU64::new(0),
            rpo_violations: AtomicU64::new(0),
            nbd: Default::default(),
        }
    }
}

impl Metrics {
    /// Primary: connected, nothing out of sync, nothing waiting for the secondary.
    pub fn in_sync(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
            && !self.ahead.load(Ordering::Relaxed)
            && !self.resync_active.load(Ordering::Relaxed)
            && Metrics::get(&self.out_of_sync_bytes) == 0
            && Metrics::get(&self.lag_writes) == 0
    }

    /// A node changes role: the figures that describe the role's state start from
    /// zero; counters, latencies and events carry on (they describe the node).
    pub fn reset_role_state(&self) {
        for g in [
            &self.lag_writes,
            &self.lag_bytes,
            &self.lag_oldest_at_ms,
            &self.out_of_sync_bytes,
            &self.resync_total_blocks,
            &self.resync_shipped_blocks,
            &self.rpo_exceeded_since_unix_ms,
        ] {
            g.store(0, Ordering::Relaxed);
        }
        for f in [
            &self.connected,
            &self.ahead,
            &self.resync_active,
            &self.rpo_exceeded,
        ] {
            f.store(false, Ordering::Relaxed);
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn record_write_latency(&self, elapsed: std::time::Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, 60_000_000);
        if let Ok(mut h) = self.write_latency_us.lock() {
            h.saturating_record(us);
        }
        Metrics::add(&self.write_latency_sum_us, us);
    }

    /// Record the peer link going up or down: the gauge, plus an event (and a log
    /// line) on a change. `detail` names the peer or the reason.
    pub fn set_connected(&self, up: bool, detail: &str) {
        if self.connected.swap(up, Ordering::Relaxed) == up {
            return;
        }
        // Typed events (hardening: `tandem events --follow`).
        self.events.emit(if up {
            events::EventKind::PeerConnected {
                connection: "connected".into(),
                peer: detail.into(),
            }
        } else {
            events::EventKind::PeerDisconnected {
                connection: "connecting".into(),
                reason: detail.into(),
            }
        });
    }

    /// Primary: record a resync pass starting or ending, with an event on a change.
    pub fn set_resync_active(&self, active: bool) {
        if self.resync_active.swap(active, Ordering::Relaxed) == active {
            return;
        }
        let total = Metrics::get(&self.resync_total_blocks);
        let shipped = Metrics::get(&self.resync_shipped_blocks);
        if active {
            // "resync starts" is logged where the pass is planned, with its size.
            self.events.emit(events::EventKind::ResyncStarted {
                total_blocks: total,
            });
        } else if self.connected.load(Ordering::Relaxed) {
            tracing::info!(
                event = "resync-done",
                shipped_blocks = shipped,
                "resync done: the secondary holds every block durably"
            );
            self.events.emit(events::EventKind::ResyncDone {
                shipped_blocks: shipped,
            });
        } else {
            tracing::warn!(
                event = "resync-interrupted",
                shipped_blocks = shipped,
                total_blocks = total,
                "resync interrupted: the peer went away; it resumes on reconnect"
            );
            self.events.emit(events::EventKind::ResyncInterrupted {
                shipped_blocks: shipped,
                total_blocks: total,
            });
        }
    }

    /// The condition behind the last error is over (connected again, in sync):
    /// status no longer shows it.
    pub fn clear_error(&self) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }

    pub fn set_error(&self, message: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(message);
        }
    }

    /// Seconds since the oldest write not yet durable on the secondary was accepted
    /// (`lag_oldest_at_ms` is wall-clock unix ms: the engine's time, which also
    /// stamps the frames the secondary's consistent point is reported in).
    pub fn lag_seconds(&self) -> f64 {
        let at = Metrics::get(&self.lag_oldest_at_ms);
        if at == 0 {
            return 0.0;
        }
        unix_now_ms().saturating_sub(at) as f64 / 1000.0
    }

    pub fn latency_summary(&self) -> LatencySummary {
        let h = self.write_latency_us.lock().expect("histogram lock");
        LatencySummary::of(&h, Metrics::get(&self.write_latency_sum_us))
    }

    /// Throughput in bytes per second over the last sampling interval: client
    /// writes, replicated payload (uncompressed), resync.
    pub fn rates(&self) -> (f64, f64, f64) {
        let get = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        (
            get(&self.write_rate_bits),
            get(&self.replicated_rate_bits),
            get(&self.resync_rate_bits),
        )
    }

    /// Sample the byte counters; call every `interval` (see `agent::monitor`).
    pub fn sample_rates(&self, last: &mut [u64; 3], interval: std::time::Duration) {
        let now = [
            Metrics::get(&self.client_write_bytes),
            Metrics::get(&self.replicated_bytes),
            Metrics::get(&self.resync_bytes),
        ];
        let secs = interval.as_secs_f64().max(1e-3);
        for (i, target) in [
            &self.write_rate_bits,
            &self.replicated_rate_bits,
            &self.resync_rate_bits,
        ]
        .into_iter()
        .enumerate()
        {
            let rate = now[i].saturating_sub(last[i]) as f64 / secs;
            target.store(rate.to_bits(), Ordering::Relaxed);
        }
        *last = now;
    }

    /// Compression ratio of shipped payloads (raw / wire); 1.0 before any traffic.
    pub fn compression_ratio(&self) -> f64 {
        let raw = Metrics::get(&self.replicated_bytes);
        let wire = Metrics::get(&self.replicated_wire_bytes);
        if wire == 0 {
            1.0
        } else {
            raw as f64 / wire as f64
        }
    }
}

/// A latency histogram in microseconds with its sum (hdrhistogram, 3 significant
/// digits, 1 µs to 60 s).
pub struct LatencyRecorder {
    hist: Mutex<Histogram<u64>>,
    sum_us: AtomicU64,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            hist: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            ),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl LatencyRecorder {
    pub fn record(&self, elapsed: std::time::Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, 60_000_000);
        if let Ok(mut h) = self.hist.lock() {
            h.saturating_record(us);
        }
        Metrics::add(&self.sum_us, us);
    }

    pub fn summary(&self) -> LatencySummary {
        let h = self.hist.lock().expect("histogram lock");
        LatencySummary::of(&h, Metrics::get(&self.sum_us))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub sum_us: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    /// Quantiles of `h`, all 0 while it is empty: a quantile of an empty
    /// histogram walks every bucket (~40,000 for 1 µs..60 s at 3 digits) without
    /// reaching a count, and a secondary (which serves no client writes) built
    /// three such summaries for its status on every 5 ms tick: 2% of the
    /// machine's CPU in an async 1 MiB write run, 5% of a CPU idle (session 20).
    fn of(h: &Histogram<u64>, sum_us: u64) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary {
                count: 0,
                sum_us,
                p50_us: 0,
                p99_us: 0,
                p999_us: 0,
                max_us: 0,
            };
        }
        LatencySummary {
            count: h.len(),
            sum_us,
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Wall-clock time in unix milliseconds.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by e2e_rpo: the engine stamps writes with unix ms, and the lag was
    /// computed against the process's uptime clock (always 0 s: no RPO alert).
    #[test]
    fn lag_seconds_is_the_age_of_a_unix_ms_stamp() {
        let m = Metrics::default();
        m.lag_oldest_at_ms
            .store(unix_now_ms() - 5_000, Ordering::Relaxed);
        let lag = m.lag_seconds();
        assert!((4.9..60.0).contains(&lag), "{lag}");
    }

    #[test]
    fn an_empty_recorder_summarises_as_zeros_and_a_used_one_has_quantiles() {
        let r = LatencyRecorder::default();
        let s = r.summary();
        assert_eq!((s.count, s.p50_us, s.p99_us, s.max_us), (0, 0, 0, 0));
        for us in [100, 200, 300, 400, 50_000] {
            r.record(std::time::Duration::from_micros(us));
        }
        let s = r.summary();
        assert_eq!(s.count, 5);
        assert_eq!(s.sum_us, 51_000);
        assert!((299..=301).contains(&s.p50_us), "{s:?}");
        assert!((49_900..=50_100).contains(&s.p99_us), "{s:?}");
        assert!((49_900..=50_100).contains(&s.max_us), "{s:?}");
    }
}
