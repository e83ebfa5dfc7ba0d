//! The agent's recent events (RPO crossings, peer connects and disconnects,
//! resync start and end), kept in a bounded ring so tools can poll them over
//! the control socket (`{"cmd":"events","args":{"since":N}}`).
//!
//! Owns: numbering (ids start at 1 and never repeat within one agent run) and
//! the bound. Does not own logging or hooks: whoever records an event also logs it.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How many events are kept: at one event per crossing this is hours of flapping,
/// and a poller that falls further behind is told how many it missed.
pub const EVENTS_KEPT_MAX: usize = 256;

/// One event. Field names are part of the control-socket contract.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// 1, 2, 3, ... in the order recorded.
    pub id: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// `rpo-exceeded`, `rpo-recovered`, `peer-connected`, `peer-disconnected`,
    /// `resync-started`, `resync-done`, `resync-interrupted`, `promoted`, `demoted`.
    pub kind: String,
    pub message: String,
}

/// What `events since N` returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventsSince {
    /// Events with an id above N, oldest first.
    pub events: Vec<Event>,
    /// Events after N that fell out of the ring before this call.
    pub missed: u64,
    /// The highest id recorded so far (pass it as `since` next time).
    pub last_id: u64,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<Event>,
    last_id: u64,
}

/// A bounded, thread-safe event ring.
#[derive(Default)]
pub struct EventLog {
    ring: Mutex<Ring>,
}

impl EventLog {
    /// Record an event now; returns its id.
    pub fn push(&self, kind: &str, message: String) -> u64 {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut ring = self.ring.lock().expect("event ring lock");
        ring.last_id += 1;
        let id = ring.last_id;
        if ring.events.len() == EVENTS_KEPT_MAX {
            ring.events.pop_front();
        }
        ring.events.push_back(Event {
            id,
            unix_ms,
            kind: kind.to_string(),
            message,
        });
        id
    }

    /// Events recorded after id `since` (0 = all still kept).
    pub fn since(&self, since: u64) -> EventsSince {
        let ring = self.ring.lock().expect("event ring lock");
        let first_kept = ring.events.front().map_or(ring.last_id + 1, |e| e.id);
        EventsSince {
            events: ring
                .events
                .iter()
                .filter(|e| e.id > since)
                .cloned()
                .collect(),
            missed: first_kept.saturating_sub(since + 1),
            last_id: ring.last_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_grow_and_since_returns_only_newer_events() {
        let log = EventLog::default();
        assert_eq!(log.since(0).events, vec![]);
        assert_eq!(log.since(0).last_id, 0);
        let a = log.push("peer-connected", "a".into());
        let b = log.push("rpo-exceeded", "b".into());
        assert_eq!((a, b), (1, 2));
        let all = log.since(0);
        assert_eq!(all.events.len(), 2);
        assert_eq!(all.missed, 0);
        let newer = log.since(1);
        assert_eq!(newer.events.len(), 1);
        assert_eq!(newer.events[0].kind, "rpo-exceeded");
        assert_eq!(newer.last_id, 2);
        assert!(log.since(2).events.is_empty());
        assert!(newer.events[0].unix_ms > 1_600_000_000_000);
    }

    #[test]
    fn the_ring_is_bounded_and_says_how_many_a_slow_poller_missed() {
        let log = EventLog::default();
        for i in 0..(EVENTS_KEPT_MAX as u64 + 10) {
            log.push("peer-connected", format!("{i}"));
        }
        let all = log.since(0);
        assert_eq!(all.events.len(), EVENTS_KEPT_MAX);
        assert_eq!(all.events[0].id, 11);
        assert_eq!(all.missed, 10);
        assert_eq!(log.since(5).missed, 5);
        assert_eq!(log.since(10).missed, 0);
        assert_eq!(log.since(all.last_id).missed, 0);
    }
}
