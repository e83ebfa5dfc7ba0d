//! The control socket: a unix socket per agent speaking JSON lines.
//!
//! Request: one JSON object per line, `{"cmd":"status"}`, optionally with
//! `"resource":"r0"` (an agent of another resource refuses) and `"args":{...}`
//! (command arguments, e.g. `{"force":true}`). Reply: one JSON object per line,
//! `{"ok":true,"status":{...}}`, `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":"..."}`.
//!
//! Every agent answers `status` and `events` (`{"cmd":"events","args":{"since":N}}`
//! returns `{"events":[{"id","unix_ms","kind","message"}...],"missed","last_id"}`,
//! the events after id N from a ring of the last 256); other commands are the
//! agent's own ([`ControlHandler::other`]).
//!
//! `{"cmd":"events","args":{"follow":true,"since":N}}` turns the connection
//! into an event stream (`tandem events --follow`): one reply line
//! `{"ok":true,"result":{"following":true,"last_id":L}}`, then one event object
//! per line ([`crate::metrics::events`] documents the form): the events after N
//! still in the ring, the initial state dump (`exists` lines, then
//! `dump-done`), then every event as it is recorded, pushed, until either side
//! closes. A follower that falls more than
//! [`crate::metrics::events::FOLLOW_BACKLOG_MAX`] events behind gets a `missed`
//! line with the count.
//!
//! Bad input: a line longer than [`CONTROL_LINE_MAX_BYTES`] is refused as soon
//! as it passes the limit (never buffered whole: memory per connection is
//! bounded by the limit) and the rest of it is discarded; a line that is not
//! UTF-8 or not a JSON request gets an error reply. The connection stays usable
//! after each. At most [`CONTROL_CONNECTIONS_MAX`] connections are served at
//! once; one idle for [`CONTROL_IDLE_TIMEOUT`] between requests is closed. Each
//! refusal is counted (`rejected.control_lines`) and logged rate-limited.
//!
//! The socket file is created with mode 0600: the control socket can change
//! roles, so only root (the agent's user) may talk to it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentError;
use crate::config::NodeConfig;
use crate::engine::primary::Mode;
use crate::metrics::events::Event;
use crate::metrics::rejections::{self, RejectClass, RejectionCounts};
use crate::metrics::{LatencySummary, Metrics};
use crate::types::{BlockCount, DiskState, Generation, Role, VolumeId};

/// The longest control request line. Requests are a few hundred bytes; the
/// limit only bounds what a broken or hostile client can make the agent hold.
pub const CONTROL_LINE_MAX_BYTES: usize = 64 << 10;
/// Control connections served at once (each holds at most one line).
pub const CONTROL_CONNECTIONS_MAX: usize = 64;
/// A connection that sends no request for this long is closed.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `events --follow` waits for the agent's first reply (the stream
/// after it may be quiet for as long as nothing happens).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What an agent answers on its control socket.
pub trait ControlHandler: Send + Sync + 'static {
    fn status(&self) -> BoxFuture<Option<StatusDoc>>;
    /// Any command other than `status` and `events`.
    fn other(&self, request: ControlRequest) -> BoxFuture<ControlReply>;
    /// The agent's live figures, for the commands every agent answers (`events`).
    fn metrics(&self) -> Option<Arc<Metrics>> {
        None
    }
}

/// Commands answered here for every agent, whatever its role.
pub const COMMON_COMMANDS: [&str; 2] = ["status", "events"];

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlRequest {
    pub cmd: String,
    /// The resource the caller means; an agent serving another resource refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Command arguments, e.g. `{"force":true}`.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub args: serde_json::Value,
}

impl ControlRequest {
    pub fn new(cmd: &str) -> ControlRequest {
        ControlRequest {
            cmd: cmd.to_string(),
            ..ControlRequest::default()
        }
    }

    /// A boolean argument (absent = false).
    pub fn flag(&self, name: &str) -> bool {
        self.args
            .get(name)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    }

    /// An unsigned integer argument.
    pub fn number(&self, name: &str) -> Option<u64> {
        self.args.get(name).and_then(serde_json::Value::as_u64)
    }

    /// A string argument.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.args.get(name).and_then(serde_json::Value::as_str)
    }

    /// The reply for a command this agent does not know, listing those it does
    /// (`known`, plus the [`COMMON_COMMANDS`] every agent answers).
    pub fn unknown(&self, known: &[&str]) -> ControlReply {
        let mut all: Vec<&str> = COMMON_COMMANDS.to_vec();
        all.extend(known.iter().filter(|k| !COMMON_COMMANDS.contains(k)));
        ControlReply::error(format!(
            "unknown control command '{}'; this agent knows: {}",
            self.cmd,
            all.join(", ")
        ))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusDoc>,
    /// What a command other than `status` returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl ControlReply {
    pub fn error(message: String) -> ControlReply {
        ControlReply {
            ok: false,
            error: Some(message),
            status: None,
            result: None,
        }
    }

    pub fn success(result: serde_json::Value) -> ControlReply {
        ControlReply {
            ok: true,
            error: None,
            status: None,
            result: Some(result),
        }
    }
}

/// The status document (`tandem status --json`). Field names are stable.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusDoc {
    pub resource: String,
    pub node: String,
    pub role: String,
    pub mode: String,
    pub volume: String,
    /// ha (issue 12): the volume's size as served, in bytes (grows with
    /// `tandem resize`); 0 from an agent that does not say.
    #[serde(default)]
    pub size_bytes: u64,
    pub volume_id: String,
    pub generation: String,
    pub disk_state: String,
    pub peer: PeerStatus,
    pub lag: LagStatus,
    pub out_of_sync_bytes: u64,
    pub resync: Option<ProgressStatus>,
    pub counters: Counters,
    pub write_latency_us: Option<LatencyStatus>,
    /// The primary's own volume writes, microseconds (null before the first).
    #[serde(default)]
    pub local_write_latency_us: Option<LatencyStatus>,
    /// From shipping a write to the secondary's Durable covering it, microseconds
    /// (primary; null before the first).
    #[serde(default)]
    pub replication_latency_us: Option<LatencyStatus>,
    /// Bytes per second over the last second.
    #[serde(default)]
    pub throughput: Option<ThroughputStatus>,
    pub compression_ratio: f64,
    pub last_error: Option<String>,
    pub uptime_s: u64,
    /// Generation identifiers (G8): current, bitmap base, history (newest first).
    #[serde(default)]
    pub generations: Option<GenerationsStatus>,
    /// The last handshake decision with the peer (e.g. "bitmap resync: same
    /// generation", "refused: split brain ..."), null before the first one.
    #[serde(default)]
    pub handshake: Option<String>,
    /// The recovery point objective, when one is set (`--rpo-seconds`).
    #[serde(default)]
    pub rpo: Option<RpoStatus>,
    /// The online verify running on a primary (`tandem verify`); null when none runs.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
    /// The secondary's last consistent image (the DR copy a promotion serves); on a
    /// primary, as its secondary last reported it. Null while none exists.
    #[serde(default)]
    pub consistent_point: Option<ConsistentStatus>,
    /// The secondary's redo journal.
    #[serde(default)]
    pub journal: Option<JournalStatus>,
    /// A write or fdatasync of this node's disk failed (issue 9 item 5): not
    /// promoted or served as primary without --force until every block has been
    /// compared with the peer's.
    #[serde(default)]
    pub poisoned: bool,
    /// Refused input, counted since the process started (hardening, issue 14):
    /// connections, handshakes, frames, NBD requests, control lines, and per reason.
    #[serde(default)]
    pub rejected: RejectionCounts,
}

/// Where the consistent image stands (issue 10).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConsistentStatus {
    /// The primary's seq of the newest write the image holds.
    pub seq: u64,
    /// When the primary accepted that write (unix ms; 0 = unknown).
    pub at_unix_ms: u64,
    /// How old that is now, seconds.
    pub age_s: f64,
    /// The journal record it ends at (secondary).
    pub journal_lsn: u64,
    /// A resync is running: the image being received is mixed until it ends, the
    /// consistent point stays where it was.
    pub resync_open: bool,
    /// dr (issue 10): how far behind the consistent image is, seconds: on a
    /// primary, how long ago it accepted the oldest write the DR copy's consistent
    /// image lacks (0 = it holds every write; what a disaster now would lose); on a
    /// secondary, how much older it is than the newest write received.
    #[serde(default)]
    pub behind_s: f64,
}

/// The secondary's redo journal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JournalStatus {
    pub path: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub records: u64,
    /// Consistent points a rollback can go back to.
    pub points: u64,
}

/// Progress of a running online verify, in `tandem status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// `scanning` (comparing blocks) or `repairing` (resyncing the mismatches).
    pub state: String,
    /// Bytes of the volume compared so far, of `total_bytes`.
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    /// Seconds left at the rate observed since the verify began (null at the start).
    pub eta_s: Option<f64>,
    /// Blocks found different so far.
    pub mismatched_blocks: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RpoStatus {
    /// The target: the most seconds of writes the secondary may be missing.
    pub target_s: f64,
    /// The lag is above the target now (primary only; a secondary says false).
    pub exceeded: bool,
    /// When the current excess began, milliseconds since the Unix epoch; null when not exceeded.
    pub since: Option<u64>,
    /// Times the lag crossed above the target since the agent started.
    pub violations: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationsStatus {
    pub current: String,
    pub bitmap_base: String,
    pub history: Vec<String>,
    /// When this node last became primary (unix seconds), null if never.
    pub promoted_at_s: Option<u64>,
}

impl GenerationsStatus {
    pub fn of(sb: &crate::meta::Superblock) -> GenerationsStatus {
        GenerationsStatus {
            current: sb.gen_current.to_string(),
            bitmap_base: sb.gen_bitmap_base.to_string(),
            history: sb
                .gen_history
                .iter()
                .filter(|g| **g != Generation::NONE)
                .map(Generation::to_string)
                .collect(),
            promoted_at_s: (sb.promoted_at_s != 0).then_some(sb.promoted_at_s),
        }
    }
}

/// The control handler of whichever role a node runs now: the node's control
/// socket stays up while the role changes underneath it.
#[derive(Clone, Default)]
pub struct HandlerSlot(Arc<std::sync::RwLock<Option<Arc<dyn ControlHandler>>>>);

impl HandlerSlot {
    pub fn set(&self, handler: Option<Arc<dyn ControlHandler>>) {
        *self.0.write().expect("handler slot lock") = handler;
    }

    pub fn get(&self) -> Option<Arc<dyn ControlHandler>> {
        self.0.read().expect("handler slot lock").clone()
    }
}

impl ControlHandler for HandlerSlot {
    fn status(&self) -> BoxFuture<Option<StatusDoc>> {
        match self.get() {
            Some(h) => h.status(),
            None => Box::pin(async { None }),
        }
    }
    fn other(&self, request: ControlRequest) -> BoxFuture<ControlReply> {
        match self.get() {
            Some(h) => h.other(request),
            None => Box::pin(async {
                ControlReply::error("the agent is changing roles; try again in a moment".into())
            }),
        }
    }
    fn metrics(&self) -> Option<Arc<Metrics>> {
        self.get().and_then(|h| h.metrics())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub connection: String,
    pub disk_state: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LagStatus {
    pub bytes: u64,
    pub writes: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgressStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    /// Seconds left at the rate observed since the resync began (null at the start).
    pub eta_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Counters {
    pub client_writes: u64,
    pub client_write_bytes: u64,
    pub client_reads: u64,
    pub replicated_bytes: u64,
    pub replicated_wire_bytes: u64,
    pub resync_bytes: u64,
    /// Bytes compared by blake3 hash instead of sent, and blocks found different.
    pub verified_bytes: u64,
    pub verify_mismatched_blocks: u64,
    /// Bytes of hash-comparison frames sent (headers and hashes).
    #[serde(default)]
    pub verify_wire_bytes: u64,
    /// Times the primary went ahead (async window full).
    pub ahead_episodes: u64,
    /// wan (issue 11 item 5): spill episodes, bytes spilled, record bytes in the
    /// spill log now.
    #[serde(default)]
    pub spill_episodes: u64,
    #[serde(default)]
    pub spilled_bytes: u64,
    #[serde(default)]
    pub spill_live_bytes: u64,
    pub applied_writes: u64,
    pub sessions: u64,
    pub frames_rejected: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThroughputStatus {
    /// Client writes accepted.
    pub write_bytes_per_s: f64,
    /// Payload shipped to the secondary (uncompressed: writes and resync).
    pub replicated_bytes_per_s: f64,
    /// Resync data handed to the link.
    pub resync_bytes_per_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyStatus {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// Writes measured and the sum of their latencies (µs).
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub sum: u64,
}

impl LatencyStatus {
    /// The status form of a histogram summary; None before the first sample.
    pub fn of(l: &crate::metrics::LatencySummary) -> Option<LatencyStatus> {
        (l.count > 0).then_some(LatencyStatus {
            p50: l.p50_us,
            p99: l.p99_us,
            p999: l.p999_us,
            max: l.max_us,
            count: l.count,
            sum: l.sum_us,
        })
    }
}

impl StatusDoc {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        cfg: &NodeConfig,
        role: Role,
        m: &Metrics,
        peer: Option<(String, String)>,
        disk_state: DiskState,
        lag_writes: u64,
        lag_bytes: u64,
        out_of_sync: BlockCount,
        resync: Option<(BlockCount, BlockCount, f64)>,
        volume_id: VolumeId,
        generation: Generation,
    ) -> StatusDoc {
        let bs = cfg.block_size as u64;
        let lat: LatencySummary = m.latency_summary();
        StatusDoc {
            resource: cfg.resource.clone(),
            node: cfg.name.clone(),
            role: role.to_string(),
            mode: if cfg.mode == Mode::Sync {
                "sync"
            } else {
                "async"
            }
            .into(),
            volume: cfg.volume.display().to_string(),
            size_bytes: 0, // the role's status sets it (ha)
            volume_id: volume_id.to_string(),
            generation: generation.to_string(),
            disk_state: disk_state.to_string(),
            peer: PeerStatus {
                name: cfg.peer_name.clone(),
                connection: match (
                    peer.is_some(),
                    m.ahead.load(std::sync::atomic::Ordering::Relaxed),
                ) {
                    (true, true) => "ahead",
                    (true, false) => "connected",
                    (false, _) => "connecting",
                }
                .into(),
                disk_state: peer.map(|p| p.1),
            },
            lag: LagStatus {
                bytes: lag_bytes,
                writes: lag_writes,
                seconds: m.lag_seconds(),
            },
            out_of_sync_bytes: out_of_sync.0 * bs,
            resync: resync.map(|(done, total, elapsed_s)| ProgressStatus {
                done_bytes: done.0 * bs,
                total_bytes: total.0 * bs,
                percent: 100.0 * done.0 as f64 / total.0.max(1) as f64,
                eta_s: (done.0 > 0 && elapsed_s > 0.0)
                    .then(|| elapsed_s * total.0.saturating_sub(done.0) as f64 / done.0 as f64),
            }),
            counters: Counters {
                client_writes: Metrics::get(&m.client_writes),
                client_write_bytes: Metrics::get(&m.client_write_bytes),
                client_reads: Metrics::get(&m.client_reads),
                replicated_bytes: Metrics::get(&m.replicated_bytes),
                replicated_wire_bytes: Metrics::get(&m.replicated_wire_bytes),
                resync_bytes: Metrics::get(&m.resync_bytes),
                verified_bytes: Metrics::get(&m.verified_bytes),
                verify_wire_bytes: Metrics::get(&m.verify_wire_bytes),
                verify_mismatched_blocks: Metrics::get(&m.verify_mismatched_blocks),
                ahead_episodes: Metrics::get(&m.ahead_episodes),
                spill_episodes: Metrics::get(&m.spill_episodes), // wan
                spilled_bytes: Metrics::get(&m.spilled_bytes),
                spill_live_bytes: Metrics::get(&m.spill_live_bytes),
                applied_writes: Metrics::get(&m.applied_writes),
                sessions: Metrics::get(&m.sessions),
                frames_rejected: Metrics::get(&m.frames_rejected)
                    + rejections::global().get(RejectClass::Frame),
            },
            write_latency_us: LatencyStatus::of(&lat),
            local_write_latency_us: LatencyStatus::of(&m.local_write_latency.summary()),
            replication_latency_us: LatencyStatus::of(&m.replication_latency.summary()),
            throughput: {
                let (w, r, s) = m.rates();
                Some(ThroughputStatus {
                    write_bytes_per_s: w,
                    replicated_bytes_per_s: r,
                    resync_bytes_per_s: s,
                })
            },
            compression_ratio: m.compression_ratio(),
            last_error: m.last_error.lock().ok().and_then(|e| e.clone()),
            uptime_s: m.started.elapsed().as_secs(),
            generations: None,
            handshake: None,
            rpo: cfg.rpo_seconds.map(|target_s| {
                let exceeded = m.rpo_exceeded.load(std::sync::atomic::Ordering::Relaxed);
                RpoStatus {
                    target_s,
                    exceeded,
                    since: exceeded
                        .then(|| Metrics::get(&m.rpo_exceeded_since_unix_ms))
                        .filter(|t| *t > 0),
                    violations: Metrics::get(&m.rpo_violations),
                }
            }),
            verify: None,
            consistent_point: None,
            journal: None,
            poisoned: false,
            rejected: {
                // Frames refused by the secondary are counted in the node's metrics;
                // rejections counted process-wide are added (see metrics::rejections).
                let mut r = rejections::global().counts();
                r.frames += Metrics::get(&m.frames_rejected);
                // The NBD server counts its refused requests in its own stats.
                r.nbd_requests += Metrics::get(&m.nbd.requests_rejected);
                r
            },
        }
    }

    /// The one-screen human form, like `drbdadm status`.
    pub fn human(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "{} role:{} mode:{} volume:{} size:{}\n",
            self.resource, self.role, self.mode, self.volume, self.size_bytes
        );
        s += &format!(
            "  disk:{}  id:{}  generation:{}\n",
            self.disk_state, self.volume_id, self.generation
        );
        s += &format!(
            "  {} connection:{} peer-disk:{}\n",
            self.peer.name,
            self.peer.connection,
            self.peer.disk_state.as_deref().unwrap_or("unknown")
        );
        s += &format!(
            "  lag: {} writes, {} bytes, {:.3} s   out-of-sync: {} bytes\n",
            self.lag.writes, self.lag.bytes, self.lag.seconds, self.out_of_sync_bytes
        );
        if let Some(r) = &self.resync {
            s += &format!(
                "  resync: {:.1}% ({} of {} bytes){}\n",
                r.percent,
                r.done_bytes,
                r.total_bytes,
                r.eta_s
                    .map(|e| format!(", about {e:.0} s left"))
                    .unwrap_or_default()
            );
        }
        if let Some(v) = &self.verify {
            s += &format!(
                "  verify: {} {:.1}% ({} of {} bytes), {} blocks mismatched{}\n",
                v.state,
                v.percent,
                v.done_bytes,
                v.total_bytes,
                v.mismatched_blocks,
                v.eta_s
                    .map(|e| format!(", about {e:.0} s left"))
                    .unwrap_or_default()
            );
        }
        let c = &self.counters;
        s += &format!(
            // ha (issue 15.6): counters since the agent started, not the last resync's.
            "  since start: written {} writes, {} bytes  replicated: {} bytes ({} on the wire, ratio {:.2})  resync data: {} bytes\n",
            c.client_writes,
            c.client_write_bytes,
            c.replicated_bytes,
            c.replicated_wire_bytes,
            self.compression_ratio,
            c.resync_bytes
        );
        if let Some(t) = &self.throughput {
            s += &format!(
                "  throughput: writes {:.1} MiB/s, replicated {:.1} MiB/s, resync {:.1} MiB/s\n",
                t.write_bytes_per_s / 1048576.0,
                t.replicated_bytes_per_s / 1048576.0,
                t.resync_bytes_per_s / 1048576.0
            );
        }
        for (what, lat) in [
            ("write latency", &self.write_latency_us),
            ("local write", &self.local_write_latency_us),
            ("replication", &self.replication_latency_us),
        ] {
            if let Some(l) = lat {
                s += &format!(
                    "  {what} µs: p50 {} p99 {} p99.9 {} max {}\n",
                    l.p50, l.p99, l.p999, l.max
                );
            }
        }
        if let Some(g) = &self.generations {
            s += &format!(
                "  generations: current {} base {} history [{}]\n",
                g.current,
                g.bitmap_base,
                g.history.join(", ")
            );
        }
        if let Some(h) = &self.handshake {
            s += &format!("  last handshake: {h}\n");
        }
        // dr (issue 10): the DR copy's consistent point.
        if let Some(c) = &self.consistent_point {
            let when = if c.at_unix_ms == 0 {
                "an unknown time".to_string()
            } else {
                crate::dr::format_utc_ms(c.at_unix_ms)
            };
            let whose = if self.role == "primary" {
                "DR copy (peer): consistent as of"
            } else {
                "consistent image as of"
            };
            s += &format!(
                "  {whose} {when} (write {}), {:.1} s behind, age {:.1} s{}\n",
                c.seq,
                c.behind_s,
                c.age_s,
                if c.resync_open {
                    "; a resync is running, the consistent image is kept until it completes"
                } else {
                    ""
                }
            );
        }
        if let Some(r) = &self.rpo {
            s += &format!(
                "  rpo: target {} s, {} ({} violations)\n",
                r.target_s,
                if r.exceeded { "EXCEEDED" } else { "met" },
                r.violations
            );
        }
        let r = &self.rejected;
        if r.total() > 0 {
            s += &format!(
                "  rejected: {} connections, {} handshakes, {} frames, {} NBD requests, {} control lines\n",
                r.connections, r.handshakes, r.frames, r.nbd_requests, r.control_lines
            );
        }
        if let Some(e) = &self.last_error {
            s += &format!("  last error: {e}\n");
        }
        s
    }
}

/// Bind the control socket and serve it until `stop`.
pub async fn serve(
    path: &Path,
    resource: &str,
    handler: Arc<dyn ControlHandler>,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, AgentError> {
    let err = |source| AgentError::Control {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        // A live agent answers; a stale socket file from a crash is removed.
        if UnixStream::connect(path).await.is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent is listening on this control socket; stop it or pick another --control path",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let path: PathBuf = path.to_owned();
    let resource: Arc<str> = resource.into();
    let slots = Arc::new(tokio::sync::Semaphore::new(CONTROL_CONNECTIONS_MAX));
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            let conn = serve_one(stream, resource.clone(), handler.clone(), stop.clone());
                            tokio::spawn(async move {
                                conn.await;
                                drop(slot);
                            });
                        }
                        Err(_) => {
                            rejections::reject(RejectClass::ControlLine, "control.too-many-connections", || {
                                format!("control socket: refused a connection, {CONTROL_CONNECTIONS_MAX} are open already")
                            });
                            tokio::spawn(refuse_busy(stream));
                        }
                    },
                    Err(e) => {
                        rejections::reject(RejectClass::ControlLine, "control.accept-failed", || {
                            format!("control socket accept: {e}")
                        });
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = stop.cancelled() => break,
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn refuse_busy(mut stream: UnixStream) {
    let reply = ControlReply::error(format!(
        "the agent already serves {CONTROL_CONNECTIONS_MAX} control connections; close some (tandem events --follow?) and retry"
    ));
    let _ = tokio::time::timeout(Duration::from_secs(1), write_json(&mut stream, &reply)).await;
}

async fn write_json<W: tokio::io::AsyncWrite + Unpin, T: Serialize>(
    wr: &mut W,
    value: &T,
) -> std::io::Result<()> {
    let mut text = serde_json::to_string(value).expect("control messages serialize");
    text.push('\n');
    wr.write_all(text.as_bytes()).await
}

/// One piece of a control connection's input, as cut by [`LineSplitter`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete line (without its `\n`), at most the limit long.
    Line(Vec<u8>),
    /// The current line passed the limit: it is refused now and its remaining
    /// bytes, up to the next `\n`, are discarded without being kept.
    TooLong,
}

/// Cuts a byte stream into lines of at most `max_bytes`, holding at most
/// `max_bytes` at any time whatever the input (sans-IO, so it can be fuzzed).
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max_bytes: usize,
    discarding: bool,
}

impl LineSplitter {
    pub fn new(max_bytes: usize) -> LineSplitter {
        LineSplitter {
            buf: Vec::new(),
            max_bytes,
            discarding: false,
        }
    }

    /// Bytes of an unfinished line held now (never above the limit).
    pub fn held_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Feed bytes; complete lines and refusals are appended to `out` in order.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<LineEvent>) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|b| *b == b'\n');
            let (part, rest) = match newline {
                Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
                None => (bytes, None),
            };
            if !self.discarding {
                if self.buf.len() + part.len() > self.max_bytes {
                    self.buf = Vec::new();
                    self.discarding = true;
                    out.push(LineEvent::TooLong);
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            match rest {
                Some(rest) => {
                    if self.discarding {
                        self.discarding = false;
                    } else {
                        out.push(LineEvent::Line(std::mem::take(&mut self.buf)));
                    }
                    bytes = rest;
                }
                None => break,
            }
        }
    }

    /// The input ended: a last line without `\n` still counts.
    pub fn finish(&mut self, out: &mut Vec<LineEvent>) {
        if !self.discarding && !self.buf.is_empty() {
            out.push(LineEvent::Line(std::mem::take(&mut self.buf)));
        }
        self.discarding = false;
    }
}

/// Why a control line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlLineError {
    #[error(
        "control request longer than {CONTROL_LINE_MAX_BYTES} bytes, refused; requests are one JSON object per line"
    )]
    TooLong,
    #[error(
        "control request is not UTF-8 (invalid byte at offset {offset}); send one JSON object per line, e.g. {{\"cmd\":\"status\"}}"
    )]
    NotUtf8 { offset: usize },
    #[error(
        "malformed control request: {0}; send one JSON object per line, e.g. {{\"cmd\":\"status\"}}"
    )]
    Json(#[from] serde_json::Error),
}

impl ControlLineError {
    fn key(&self) -> &'static str {
        match self {
            ControlLineError::TooLong => "control.line-too-long",
            ControlLineError::NotUtf8 { .. } => "control.not-utf8",
            ControlLineError::Json(_) => "control.malformed-json",
        }
    }
}

/// Decode one request line (without its `\n`).
pub fn decode_request(line: &[u8]) -> Result<ControlRequest, ControlLineError> {
    if line.len() > CONTROL_LINE_MAX_BYTES {
        return Err(ControlLineError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|e| ControlLineError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    // A trailing '\r' (a client using CRLF) is whitespace to JSON.
    Ok(serde_json::from_str(text)?)
}

/// Count and log a refused line; the reply to send.
fn refuse_line(e: &ControlLineError) -> ControlReply {
    rejections::reject(RejectClass::ControlLine, e.key(), || {
        format!("control socket: {e}")
    });
    ControlReply::error(e.to_string())
}

async fn serve_one(
    stream: UnixStream,
    resource: Arc<str>,
    handler: Arc<dyn ControlHandler>,
    stop: CancellationToken,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut splitter = LineSplitter::new(CONTROL_LINE_MAX_BYTES);
    let mut chunk = vec![0u8; 16 << 10];
    let mut pieces = Vec::new();
    loop {
        let n = tokio::select! {
            r = tokio::time::timeout(CONTROL_IDLE_TIMEOUT, rd.read(&mut chunk)) => match r {
                Ok(Ok(n)) => n,
                // Idle, or the client went away.
                Ok(Err(_)) | Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        if n == 0 {
            splitter.finish(&mut pieces);
        } else {
            splitter.push(&chunk[..n], &mut pieces);
        }
        for piece in pieces.drain(..) {
            let request = match piece {
                LineEvent::TooLong => Err(ControlLineError::TooLong),
                LineEvent::Line(line) if line.iter().all(u8::is_ascii_whitespace) => continue,
                LineEvent::Line(line) => decode_request(&line),
            };
            let reply = match request {
                Err(e) => refuse_line(&e),
                Ok(req) if req.resource.as_deref().is_some_and(|r| r != &*resource) => {
                    ControlReply::error(format!(
                        "this control socket belongs to resource '{resource}', not '{}'; check --control",
                        req.resource.as_deref().unwrap_or_default()
                    ))
                }
                Ok(req) if req.cmd == "events" && req.flag("follow") => {
                    follow(&mut rd, &mut wr, &resource, &handler, &req, &stop).await;
                    return;
                }
                Ok(req) => answer(&resource, &handler, req).await,
            };
            if write_json(&mut wr, &reply).await.is_err() {
                return;
            }
        }
        if n == 0 {
            return;
        }
    }
}

/// The reply to one request (every command but `events --follow`).
async fn answer(
    resource: &str,
    handler: &Arc<dyn ControlHandler>,
    req: ControlRequest,
) -> ControlReply {
    match req.cmd.as_str() {
        "status" => match handler.status().await {
            Some(status) => ControlReply {
                ok: true,
                error: None,
                status: Some(status),
                result: None,
            },
            None => ControlReply::error("agent is shutting down".into()),
        },
        "events" => match handler.metrics() {
            Some(m) => {
                let mut got = m.events.since(req.number("since").unwrap_or(0));
                let node = node_name(handler).await;
                for e in &mut got.events {
                    e.resource = resource.to_string();
                    e.node.clone_from(&node);
                }
                ControlReply::success(serde_json::to_value(got).expect("events serialize"))
            }
            None => ControlReply::error("this agent keeps no events".into()),
        },
        _ => handler.other(req).await,
    }
}

async fn node_name(handler: &Arc<dyn ControlHandler>) -> String {
    handler.status().await.map(|s| s.node).unwrap_or_default()
}

/// The state dump at the start of a follow (`exists` lines), from the status.
fn state_dump(status: &StatusDoc) -> Vec<Event> {
    let obj = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let mut dump = vec![
        Event::unrecorded(
            "exists",
            "role",
            format!("role {}, generation {}", status.role, status.generation),
            obj(serde_json::json!({ "role": status.role, "generation": status.generation })),
        ),
        Event::unrecorded(
            "exists",
            "disk-state",
            format!("disk state {}", status.disk_state),
            obj(serde_json::json!({ "disk_state": status.disk_state })),
        ),
        Event::unrecorded(
            "exists",
            "connection",
            format!(
                "peer {} {}, peer disk {}",
                status.peer.name,
                status.peer.connection,
                status.peer.disk_state.as_deref().unwrap_or("unknown")
            ),
            obj(serde_json::json!({
                "peer": status.peer.name,
                "connection": status.peer.connection,
                "peer_disk_state": status.peer.disk_state,
            })),
        ),
    ];
    if let Some(r) = &status.resync {
        dump.push(Event::unrecorded(
            "exists",
            "resync",
            format!(
                "resync {:.1}% ({} of {} bytes)",
                r.percent, r.done_bytes, r.total_bytes
            ),
            obj(serde_json::json!({
                "done_bytes": r.done_bytes,
                "total_bytes": r.total_bytes,
                "percent": r.percent,
            })),
        ));
    }
    if let Some(v) = &status.verify {
        dump.push(Event::unrecorded(
            "exists",
            "verify",
            format!("verify {} {:.1}%", v.state, v.percent),
            obj(serde_json::json!({
                "state": v.state,
                "done_bytes": v.done_bytes,
                "total_bytes": v.total_bytes,
                "mismatched_blocks": v.mismatched_blocks,
            })),
        ));
    }
    dump.push(Event::unrecorded(
        "dump-done",
        "dump-done",
        "end of the initial state".into(),
        serde_json::Map::new(),
    ));
    dump
}

/// Serve `events --follow`: history after `since`, the state dump, then every
/// event as it is recorded, until the client closes or the agent stops.
async fn follow(
    rd: &mut tokio::net::unix::OwnedReadHalf,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    resource: &str,
    handler: &Arc<dyn ControlHandler>,
    req: &ControlRequest,
    stop: &CancellationToken,
) {
    let Some(metrics) = handler.metrics() else {
        let _ = write_json(
            wr,
            &ControlReply::error("this agent keeps no events".into()),
        )
        .await;
        return;
    };
    // Subscribe before reading the state: a change racing with the dump is
    // sent after it, never lost.
    let (backlog, mut live) = metrics.events.follow(req.number("since").unwrap_or(0));
    let status = handler.status().await;
    let node = status.as_ref().map(|s| s.node.clone()).unwrap_or_default();
    let head = ControlReply::success(serde_json::json!({
        "following": true,
        "last_id": backlog.last_id,
        "missed": backlog.missed,
    }));
    if write_json(wr, &head).await.is_err() {
        return;
    }
    let stamp = |mut e: Event| {
        e.resource = resource.to_string();
        e.node.clone_from(&node);
        e
    };
    let dump = status.as_ref().map(state_dump).unwrap_or_default();
    for e in backlog.events.into_iter().chain(dump) {
        if write_json(wr, &stamp(e)).await.is_err() {
            return;
        }
    }
    let mut probe = [0u8; 1];
    loop {
        let e = tokio::select! {
            r = live.recv() => match r {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let mut fields = serde_json::Map::new();
                    fields.insert("count".into(), n.into());
                    Event::unrecorded(
                        "event",
                        "missed",
                        format!("{n} events were recorded faster than this follower read them and are not shown"),
                        fields,
                    )
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            // Anything from the client (or its close) ends the stream.
            _ = rd.read(&mut probe) => return,
            _ = stop.cancelled() => return,
        };
        if write_json(wr, &stamp(e)).await.is_err() {
            return;
        }
    }
}

/// Client side: send one request and read one reply. Not bounded in time by
/// itself: callers bound it ([`crate::ops::ask`] with `--control-timeout`, or
/// [`request_within`]).
pub async fn request(path: &Path, req: &ControlRequest) -> Result<ControlReply, String> {
    let (mut lines, _wr) = send_request(path, req).await?;
    read_reply(path, &mut lines).await
}

/// [`request`] with an explicit timeout.
pub async fn request_within(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, String> {
    tokio::time::timeout(timeout, request(path, req))
        .await
    .map_err(|_| {
        format!(
            "the agent at {} did not answer '{}' within {} s; it may be hung or overloaded: check its log (and whether the process is alive)",
            path.display(),
            req.cmd,
            timeout.as_secs()
        )
    })?
}

type ReplyLines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

async fn send_request(
    path: &Path,
    req: &ControlRequest,
) -> Result<(ReplyLines, tokio::net::unix::OwnedWriteHalf), String> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("cannot reach the agent's control socket {}: {e}; is the agent running (see --control)?", path.display()))?;
    let (rd, mut wr) = stream.into_split();
    write_json(&mut wr, req)
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    Ok((BufReader::new(rd).lines(), wr))
}

async fn read_reply(path: &Path, lines: &mut ReplyLines) -> Result<ControlReply, String> {
    let line = lines
        .next_line()
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?
        .ok_or_else(|| format!("control socket {}: closed without a reply", path.display()))?;
    serde_json::from_str(&line)
        .map_err(|e| format!("control socket {}: malformed reply: {e}", path.display()))
}

/// Client side of `events --follow`: calls `on_event` for each event the agent
/// pushes (the events after `since`, the state dump, then live ones) until the
/// agent closes the stream. The first reply must come within
/// [`REQUEST_TIMEOUT_DEFAULT`]; after that the stream may be quiet for as long
/// as nothing happens.
pub async fn follow_events(
    path: &Path,
    resource: Option<String>,
    since: u64,
    mut on_event: impl FnMut(Event),
) -> Result<(), String> {
    let mut req = ControlRequest::new("events");
    req.resource = resource;
    req.args = serde_json::json!({ "follow": true, "since": since });
    let (mut lines, _wr) = tokio::time::timeout(REQUEST_TIMEOUT_DEFAULT, async {
        let (mut lines, wr) = send_request(path, &req).await?;
        let head = read_reply(path, &mut lines).await?;
        if !head.ok {
            return Err(head
                .error
                .unwrap_or_else(|| "agent refused the events request".into()));
        }
        Ok((lines, wr))
    })
    .await
    .map_err(|_| {
        format!(
            "the agent at {} did not answer 'events' within {} s; it may be hung or overloaded: check its log",
            path.display(),
            REQUEST_TIMEOUT_DEFAULT.as_secs()
        )
    })??;
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?
    {
        let event: Event = serde_json::from_str(&line)
            .map_err(|e| format!("control socket {}: malformed event: {e}", path.display()))?;
        on_event(event);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<LineEvent> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
            assert!(s.held_bytes() <= max);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn lines_are_cut_at_newlines_whatever_the_chunks() {
        let line = |s: &str| LineEvent::Line(s.as_bytes().to_vec());
        assert_eq!(
            split(10, &[b"ab\ncd", b"e\n", b"\n", b"tail"]),
            vec![line("ab"), line("cde"), line(""), line("tail")]
        );
        // Exactly at the limit is accepted.
        assert_eq!(split(3, &[b"abc\n"]), vec![line("abc")]);
    }

    #[test]
    fn a_line_past_the_limit_is_refused_at_once_and_the_rest_discarded() {
        let line = |s: &str| LineEvent::Line(s.as_bytes().to_vec());
        let mut s = LineSplitter::new(4);
        let mut out = Vec::new();
        s.push(b"abc", &mut out);
        assert!(out.is_empty());
        s.push(b"de", &mut out);
        // Refused as soon as the 5th byte arrives, before any newline.
        assert_eq!(out, vec![LineEvent::TooLong]);
        assert_eq!(s.held_bytes(), 0);
        for _ in 0..1000 {
            s.push(&[b'x'; 1000], &mut out);
            assert_eq!(s.held_bytes(), 0);
        }
        s.push(b"zz\nok\n", &mut out);
        assert_eq!(out, vec![LineEvent::TooLong, line("ok")]);
        // A too-long last line without newline is refused, not delivered.
        assert_eq!(split(2, &[b"abc"]), vec![LineEvent::TooLong]);
    }

    #[test]
    fn undecodable_lines_get_errors_that_say_what_to_send() {
        let e = decode_request(b"{\"cmd\":\"st\xffatus\"}").unwrap_err();
        assert!(matches!(e, ControlLineError::NotUtf8 { offset: 10 }), "{e}");
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        let e = decode_request(b"{\"cmd\":").unwrap_err();
        assert!(
            e.to_string().starts_with("malformed control request"),
            "{e}"
        );
        let r = decode_request(b"{\"cmd\":\"status\"}\r").unwrap();
        assert_eq!(r.cmd, "status");
    }
}
