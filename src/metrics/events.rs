//! The agent's events: state changes (role, disk state, connection, resync) and
//! things that happened (split brain, refused handshakes, I/O errors, verify
//! results, RPO crossings), kept in a bounded ring for `tandem events` and pushed
//! live to followers (`tandem events --follow`, like `drbdsetup events2`).
//!
//! Owns: numbering (ids start at 1 and never repeat within one agent run), the
//! bound, the typed kinds and their JSON form, and the broadcast to followers.
//! Does not own logging or hooks: whoever records an event also logs it. The
//! control socket ([`crate::agent::control`]) adds `resource` and `node` and
//! writes the initial state dump of a follower.
//!
//! ## JSON form (stable: fields keep their names, types and meaning; new kinds
//! and fields may be added)
//!
//! Every event is one object with these fields, then the fields of its kind:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `type` | string | `exists` (a follower's initial state dump), `dump-done` (end of the dump), `change` (a state changed), `event` (something happened) |
//! | `id` | integer | 1, 2, 3, ... in the order recorded; 0 for `exists`/`dump-done` lines (not in the ring) |
//! | `time` | string | UTC, `2026-01-31T12:34:56.789Z` |
//! | `unix_ms` | integer | the same, milliseconds since the Unix epoch |
//! | `resource`, `node` | string | who reports it |
//! | `kind` | string | see [`EventKind`] |
//! | `message` | string | one line for humans |

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How many events are kept: at one event per crossing this is hours of flapping,
/// and a poller that falls further behind is told how many it missed.
pub const EVENTS_KEPT_MAX: usize = 256;

/// Events a follower may fall behind by before it is told it missed some
/// (a follower reads from a unix socket as fast as its terminal prints).
pub const FOLLOW_BACKLOG_MAX: usize = 1024;

/// One event. Field names are part of the control-socket contract.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `exists`, `dump-done`, `change` or `event`.
    #[serde(rename = "type", default = "default_type")]
    pub event_type: String,
    /// 1, 2, 3, ... in the order recorded (0 for dump lines).
    pub id: u64,
    /// Wall-clock time, UTC, RFC 3339 with milliseconds.
    #[serde(default)]
    pub time: String,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Filled in by the control socket when the event is sent.
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub node: String,
    /// See [`EventKind::name`]; older names (`peer-connected`, `promoted`, ...) stay.
    pub kind: String,
    pub message: String,
    /// The typed fields of the kind (see [`EventKind`]).
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

fn default_type() -> String {
    "event".into()
}

/// The kinds an agent records, with their typed fields. The JSON field names are
/// the variant's field names; `kind` is [`EventKind::name`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventKind {
    /// `promoted` (change): this node became primary.
    Promoted { role: String, generation: String },
    /// `demoted` (change): this node became secondary.
    Demoted { role: String, detail: String },
    /// `disk-state` (change): this node's disk state changed (UpToDate,
    /// Inconsistent, Outdated).
    DiskState {
        disk_state: String,
        previous: String,
    },
    /// `peer-connected` (change): a replication session with the peer is up.
    PeerConnected { connection: String, peer: String },
    /// `peer-disconnected` (change): the session ended.
    PeerDisconnected { connection: String, reason: String },
    /// `resync-started` (change).
    ResyncStarted { total_blocks: u64 },
    /// `resync-done` (change): the secondary holds every block durably.
    ResyncDone { shipped_blocks: u64 },
    /// `resync-interrupted` (change): the peer went away mid-resync.
    ResyncInterrupted {
        shipped_blocks: u64,
        total_blocks: u64,
    },
    /// `split-brain` (event): both nodes wrote while apart; refused or resolved
    /// by policy (`resolution`, null when refused).
    SplitBrain {
        peer: String,
        local_generation: String,
        peer_generation: String,
        resolution: Option<String>,
        detail: String,
    },
    /// `handshake-refused` (event): a connection or Hello was refused.
    /// `stage` is `tls` (certificates, names, plaintext) or `hello` (identity,
    /// sizes, generations: G6).
    HandshakeRefused {
        peer_addr: String,
        stage: String,
        reason: String,
    },
    /// `io-error` (event): a read, write or flush of this node's volume or
    /// metadata failed. `op`: `read`, `write`, `flush`, `metadata`; offset and
    /// length when known.
    IoError {
        op: String,
        error: String,
        offset: Option<u64>,
        len: Option<u64>,
    },
    /// `verify-done` (event): an online verify ended. `outcome`: `identical`,
    /// `differences`, `repaired` or `failed`.
    VerifyDone {
        verify_id: u64,
        outcome: String,
        mismatched_blocks: u64,
        compared_bytes: u64,
        error: Option<String>,
    },
    /// `rpo-exceeded` / `rpo-recovered` (event).
    Rpo {
        exceeded: bool,
        lag_s: f64,
        target_s: f64,
    },
}

impl EventKind {
    /// The `kind` string.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Promoted { .. } => "promoted",
            EventKind::Demoted { .. } => "demoted",
            EventKind::DiskState { .. } => "disk-state",
            EventKind::PeerConnected { .. } => "peer-connected",
            EventKind::PeerDisconnected { .. } => "peer-disconnected",
            EventKind::ResyncStarted { .. } => "resync-started",
            EventKind::ResyncDone { .. } => "resync-done",
            EventKind::ResyncInterrupted { .. } => "resync-interrupted",
            EventKind::SplitBrain { .. } => "split-brain",
            EventKind::HandshakeRefused { .. } => "handshake-refused",
            EventKind::IoError { .. } => "io-error",
            EventKind::VerifyDone { .. } => "verify-done",
            EventKind::Rpo { exceeded: true, .. } => "rpo-exceeded",
            EventKind::Rpo {
                exceeded: false, ..
            } => "rpo-recovered",
        }
    }

    /// `change` for state changes, `event` for things that happened.
    pub fn event_type(&self) -> &'static str {
        match self {
            EventKind::Promoted { .. }
            | EventKind::Demoted { .. }
            | EventKind::DiskState { .. }
            | EventKind::PeerConnected { .. }
            | EventKind::PeerDisconnected { .. }
            | EventKind::ResyncStarted { .. }
            | EventKind::ResyncDone { .. }
            | EventKind::ResyncInterrupted { .. } => "change",
            _ => "event",
        }
    }

    /// One line for humans.
    pub fn message(&self) -> String {
        match self {
            EventKind::Promoted { generation, .. } => {
                format!("now primary, generation {generation}")
            }
            EventKind::Demoted { detail, .. } => format!("demoted: {detail}"),
            EventKind::DiskState {
                disk_state,
                previous,
            } => format!("disk state {previous} -> {disk_state}"),
            EventKind::PeerConnected { peer, .. } => format!("peer connected: {peer}"),
            EventKind::PeerDisconnected { reason, .. } => format!("peer disconnected: {reason}"),
            EventKind::ResyncStarted { total_blocks } => {
                format!("resync started: {total_blocks} blocks to send or compare")
            }
            EventKind::ResyncDone { shipped_blocks } => {
                format!("resync done: {shipped_blocks} blocks sent or compared")
            }
            EventKind::ResyncInterrupted { .. } => "resync interrupted: the peer went away".into(),
            EventKind::SplitBrain {
                resolution, detail, ..
            } => match resolution {
                Some(r) => format!("split brain resolved by policy ({r}): {detail}"),
                None => format!("split brain, connection refused: {detail}"),
            },
            EventKind::HandshakeRefused {
                peer_addr,
                stage,
                reason,
            } => format!("refused {peer_addr} at the {stage} handshake: {reason}"),
            EventKind::IoError {
                op,
                error,
                offset,
                len,
            } => match (offset, len) {
                (Some(o), Some(l)) => format!("{op} of {l} bytes at {o} failed: {error}"),
                _ => format!("{op} failed: {error}"),
            },
            EventKind::VerifyDone {
                verify_id,
                outcome,
                mismatched_blocks,
                error,
                ..
            } => match error {
                Some(e) => format!("verify {verify_id} failed: {e}"),
                None => {
                    format!("verify {verify_id}: {outcome}, {mismatched_blocks} blocks differed")
                }
            },
            EventKind::Rpo {
                exceeded: true,
                lag_s,
                target_s,
            } => format!("rpo exceeded: lag {lag_s:.1} s > target {target_s} s"),
            EventKind::Rpo {
                lag_s, target_s, ..
            } => format!("rpo recovered: lag {lag_s:.1} s <= target {target_s} s"),
        }
    }

    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => {
                // `Rpo`'s flag is in the kind's name.
                m.remove("exceeded");
                m
            }
            _ => serde_json::Map::new(),
        }
    }
}

/// The `type` of an event recorded by its old string kind ([`EventLog::push`]).
fn type_of_kind(kind: &str) -> &'static str {
    match kind {
        "promoted" | "demoted" | "disk-state" | "peer-connected" | "peer-disconnected"
        | "resync-started" | "resync-done" | "resync-interrupted" => "change",
        _ => "event",
    }
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

/// A bounded, thread-safe event ring with live followers.
pub struct EventLog {
    ring: Mutex<Ring>,
    live: tokio::sync::broadcast::Sender<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            ring: Mutex::new(Ring::default()),
            live: tokio::sync::broadcast::channel(FOLLOW_BACKLOG_MAX).0,
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `2025-01-31T12:34:56.789Z` from milliseconds since the Unix epoch (UTC).
pub fn format_unix_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

impl Event {
    /// An event not in the ring (id 0): a line of a follower's state dump.
    pub fn unrecorded(
        event_type: &str,
        kind: &str,
        message: String,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Event {
        let unix_ms = now_unix_ms();
        Event {
            event_type: event_type.into(),
            id: 0,
            time: format_unix_ms(unix_ms),
            unix_ms,
            resource: String::new(),
            node: String::new(),
            kind: kind.into(),
            message,
            fields,
        }
    }
}

impl EventLog {
    /// Record a typed event now; returns its id.
    pub fn emit(&self, kind: EventKind) -> u64 {
        self.record(
            kind.event_type(),
            kind.name(),
            kind.message(),
            kind.fields(),
        )
    }

    /// Record an event by its kind string and message, without typed fields
    /// (the form before typed kinds; prefer [`EventLog::emit`]).
    pub fn push(&self, kind: &str, message: String) -> u64 {
        self.record(type_of_kind(kind), kind, message, serde_json::Map::new())
    }

    fn record(
        &self,
        event_type: &str,
        kind: &str,
        message: String,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> u64 {
        let mut event = Event::unrecorded(event_type, kind, message, fields);
        let mut ring = self.ring.lock().expect("event ring lock");
        ring.last_id += 1;
        let id = ring.last_id;
        event.id = id;
        if ring.events.len() == EVENTS_KEPT_MAX {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        // Sent under the lock, so followers see ids in order. No follower: Err, fine.
        let _ = self.live.send(event);
        id
    }

    /// Events recorded after id `since` (0 = all still kept).
    pub fn since(&self, since: u64) -> EventsSince {
        since_in(&self.ring.lock().expect("event ring lock"), since)
    }

    /// Follow: the events after `since` still in the ring and a receiver of
    /// every event recorded from then on, taken under one lock: nothing is lost
    /// or repeated between the two.
    pub fn follow(&self, since: u64) -> (EventsSince, tokio::sync::broadcast::Receiver<Event>) {
        let ring = self.ring.lock().expect("event ring lock");
        (since_in(&ring, since), self.live.subscribe())
    }
}

fn since_in(ring: &Ring, since: u64) -> EventsSince {
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

    #[test]
    fn typed_events_carry_their_fields_and_a_stable_json_form() {
        let log = EventLog::default();
        log.emit(EventKind::IoError {
            op: "write".into(),
            error: "Input/output error (os error 5)".into(),
            offset: Some(4096),
            len: Some(512),
        });
        log.emit(EventKind::Rpo {
            exceeded: true,
            lag_s: 12.5,
            target_s: 10.0,
        });
        log.emit(EventKind::DiskState {
            disk_state: "Inconsistent".into(),
            previous: "UpToDate".into(),
        });
        let events = log.since(0).events;
        let json: Vec<serde_json::Value> = events
            .iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect();
        assert_eq!(json[0]["type"], "event");
        assert_eq!(json[0]["kind"], "io-error");
        assert_eq!(json[0]["op"], "write");
        assert_eq!(json[0]["offset"], 4096);
        assert_eq!(json[0]["len"], 512);
        assert_eq!(
            json[0]["message"],
            "write of 512 bytes at 4096 failed: Input/output error (os error 5)"
        );
        assert!(json[0]["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(json[1]["kind"], "rpo-exceeded");
        assert_eq!(json[1]["lag_s"], 12.5);
        assert!(json[1].get("exceeded").is_none());
        assert_eq!(json[2]["type"], "change");
        assert_eq!(json[2]["disk_state"], "Inconsistent");
        assert_eq!(json[2]["previous"], "UpToDate");
        // And back: a client parses what the agent sends.
        let back: Event = serde_json::from_value(json[0].clone()).unwrap();
        assert_eq!(back, events[0]);
        // The old string form still works and gets its type from the kind.
        log.push("demoted", "demoted: x".into());
        assert_eq!(log.since(3).events[0].event_type, "change");
    }

    #[tokio::test]
    async fn followers_get_every_event_once_in_order() {
        let log = EventLog::default();
        log.push("peer-connected", "before".into());
        let (backlog, mut rx) = log.follow(0);
        assert_eq!(backlog.events.len(), 1);
        for i in 0..10 {
            log.push("peer-disconnected", format!("{i}"));
        }
        for id in 2..=11 {
            let e = rx.recv().await.unwrap();
            assert_eq!(e.id, id);
        }
    }

    #[test]
    fn time_is_rfc3339_utc() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_unix_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
