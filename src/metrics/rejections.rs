//! Counted, quietly logged rejections of hostile or broken input: connections,
//! handshakes, frames, NBD requests and control lines (issue 14).
//!
//! Every rejection site calls [`reject`] with its class, one key per condition
//! (`"transport.handshake-timeout"`) and the detail. The class counter and the
//! key's counter go up; the line goes through the rate-limited log
//! ([`crate::ratelog`]): the first occurrence in full, then a summary per
//! interval. The counters appear in the status document (`rejected`) and in
//! `/metrics` (`tandem_rejected_total{kind}`, `tandem_rejected_reasons_total{kind,reason}`).
//!
//! The counters are process-wide: one process runs one node, and the sites that
//! reject (the replication listener, the NBD server, the control socket) live
//! outside any one role's metrics, the control socket even across role changes.
//! Tests that need an isolated set use their own [`Rejections`] value.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::ratelog::{self, Level};

/// What was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RejectClass {
    /// A TCP connection dropped before its handshake could finish (evicted to make
    /// room, too many from one address, accept failures).
    Connection,
    /// A TLS (or plaintext first-frame) handshake that failed or timed out.
    Handshake,
    /// A replication frame refused (bad checksum, malformed, out of range; G5).
    Frame,
    /// An NBD request refused (bad magic, out of range, unsupported).
    NbdRequest,
    /// A control-socket line refused (too long, not UTF-8, not a JSON request).
    ControlLine,
}

impl RejectClass {
    pub const ALL: [RejectClass; 5] = [
        RejectClass::Connection,
        RejectClass::Handshake,
        RejectClass::Frame,
        RejectClass::NbdRequest,
        RejectClass::ControlLine,
    ];

    /// The `kind` label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            RejectClass::Connection => "connection",
            RejectClass::Handshake => "handshake",
            RejectClass::Frame => "frame",
            RejectClass::NbdRequest => "nbd_request",
            RejectClass::ControlLine => "control_line",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Rejection counters by class and by key.
pub struct Rejections {
    by_class: [AtomicU64; 5],
    by_key: Mutex<BTreeMap<&'static str, (RejectClass, u64)>>,
    log: &'static ratelog::RateLog,
}

/// The counts, as the status document carries them (`rejected`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionCounts {
    pub connections: u64,
    pub handshakes: u64,
    pub frames: u64,
    pub nbd_requests: u64,
    pub control_lines: u64,
    /// Per condition (the rate-limited log's key, e.g. `transport.handshake-timeout`).
    #[serde(default)]
    pub reasons: BTreeMap<String, u64>,
}

impl RejectionCounts {
    pub fn of_class(&self, class: RejectClass) -> u64 {
        match class {
            RejectClass::Connection => self.connections,
            RejectClass::Handshake => self.handshakes,
            RejectClass::Frame => self.frames,
            RejectClass::NbdRequest => self.nbd_requests,
            RejectClass::ControlLine => self.control_lines,
        }
    }

    /// Rejections of every class.
    pub fn total(&self) -> u64 {
        RejectClass::ALL.iter().map(|c| self.of_class(*c)).sum()
    }
}

impl Rejections {
    pub fn new(log: &'static ratelog::RateLog) -> Rejections {
        Rejections {
            by_class: Default::default(),
            by_key: Mutex::new(BTreeMap::new()),
            log,
        }
    }

    /// Count one rejection of `class` under `key` and log it, rate-limited.
    /// Returns whether a line was written (the first of its interval, or a
    /// summary): a caller may record an event then, rate-limited the same way.
    pub fn reject(
        &self,
        class: RejectClass,
        key: &'static str,
        detail: impl FnOnce() -> String,
    ) -> bool {
        self.count(class, key);
        self.log.record(key, Level::Warn, detail)
    }

    /// Count one rejection without logging (the caller logs it some other way).
    pub fn count(&self, class: RejectClass, key: &'static str) {
        self.by_class[class.index()].fetch_add(1, Ordering::Relaxed);
        let mut by_key = self.by_key.lock().expect("rejections lock");
        by_key.entry(key).or_insert((class, 0)).1 += 1;
    }

    pub fn get(&self, class: RejectClass) -> u64 {
        self.by_class[class.index()].load(Ordering::Relaxed)
    }

    /// Everything counted so far.
    pub fn counts(&self) -> RejectionCounts {
        let reasons = self
            .by_key
            .lock()
            .expect("rejections lock")
            .iter()
            .map(|(k, (_, n))| (k.to_string(), *n))
            .collect();
        RejectionCounts {
            connections: self.get(RejectClass::Connection),
            handshakes: self.get(RejectClass::Handshake),
            frames: self.get(RejectClass::Frame),
            nbd_requests: self.get(RejectClass::NbdRequest),
            control_lines: self.get(RejectClass::ControlLine),
            reasons,
        }
    }

    /// Each key with its class and count, for `/metrics`.
    pub fn reasons(&self) -> Vec<(RejectClass, &'static str, u64)> {
        self.by_key
            .lock()
            .expect("rejections lock")
            .iter()
            .map(|(k, (c, n))| (*c, *k, *n))
            .collect()
    }
}

/// The process-wide counters (see the module docs).
pub fn global() -> &'static Rejections {
    static GLOBAL: std::sync::OnceLock<Rejections> = std::sync::OnceLock::new();
    GLOBAL.get_or_init(|| Rejections::new(ratelog::global()))
}

/// Count one rejection in the process-wide counters and log it, rate-limited.
/// `key` names the condition (`site.condition`, e.g. `nbd.bad-magic`); `detail`
/// is the full message (who, what, what to do), built only when it is logged.
pub fn reject(class: RejectClass, key: &'static str, detail: impl FnOnce() -> String) -> bool {
    global().reject(class, key, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_keys_are_counted_separately() {
        static LOG: ratelog::RateLog = ratelog::RateLog::new(std::time::Duration::from_secs(30));
        let r = Rejections::new(&LOG);
        for _ in 0..3 {
            r.reject(RejectClass::Handshake, "t.timeout", || "late".into());
        }
        r.reject(RejectClass::Handshake, "t.plaintext", || "plain".into());
        r.reject(RejectClass::ControlLine, "c.utf8", || "bytes".into());
        let c = r.counts();
        assert_eq!(c.handshakes, 4);
        assert_eq!(c.control_lines, 1);
        assert_eq!(c.connections + c.frames + c.nbd_requests, 0);
        assert_eq!(c.reasons["t.timeout"], 3);
        assert_eq!(c.reasons["t.plaintext"], 1);
        assert_eq!(c.total(), 5);
        assert_eq!(
            r.reasons(),
            vec![
                (RejectClass::ControlLine, "c.utf8", 1),
                (RejectClass::Handshake, "t.plaintext", 1),
                (RejectClass::Handshake, "t.timeout", 3),
            ]
        );
    }
}
