//! Counters, gauges and latency histograms shared by an agent's tasks, and the
//! status document built from them. Counters are relaxed atomics: they are
//! figures for humans and monitoring, never inputs to replication decisions.

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
    /// Primary: a resync pass is running.
    pub resync_active: AtomicBool,
    pub sessions: AtomicU64,
    /// Frames refused for a bad checksum or malformed content (G5).
    pub frames_rejected: AtomicU64,
    /// Secondary: writes applied.
    pub applied_writes: AtomicU64,
    pub applied_bytes: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Client write latency (µs), from request to reply.
    pub write_latency_us: Mutex<Histogram<u64>>,
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
    }

    pub fn set_error(&self, message: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(message);
        }
    }

    /// Seconds since the oldest write not yet durable on the secondary was accepted.
    pub fn lag_seconds(&self) -> f64 {
        let at = Metrics::get(&self.lag_oldest_at_ms);
        if at == 0 {
            return 0.0;
        }
        self.now_ms().saturating_sub(at) as f64 / 1000.0
    }

    pub fn latency_summary(&self) -> LatencySummary {
        let h = self.write_latency_us.lock().expect("histogram lock");
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
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

#[derive(Clone, Debug, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}
