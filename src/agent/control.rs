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
//! The socket file is created with mode 0600: the control socket can change
//! roles, so only root (the agent's user) may talk to it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentError;
use crate::config::NodeConfig;
use crate::engine::primary::Mode;
use crate::metrics::{LatencySummary, Metrics};
use crate::types::{BlockCount, DiskState, Generation, Role, VolumeId};

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
                applied_writes: Metrics::get(&m.applied_writes),
                sessions: Metrics::get(&m.sessions),
                frames_rejected: Metrics::get(&m.frames_rejected),
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
        }
    }

    /// The one-screen human form, like `drbdadm status`.
    pub fn human(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "{} role:{} mode:{} volume:{}\n",
            self.resource, self.role, self.mode, self.volume
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
            "  written: {} writes, {} bytes  replicated: {} bytes ({} on the wire, ratio {:.2})  resync: {} bytes\n",
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
        if let Some(r) = &self.rpo {
            s += &format!(
                "  rpo: target {} s, {} ({} violations)\n",
                r.target_s,
                if r.exceeded { "EXCEEDED" } else { "met" },
                r.violations
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
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_one(stream, resource.clone(), handler.clone()));
                    }
                    Err(e) => tracing::warn!("control socket accept: {e}"),
                },
                _ = stop.cancelled() => break,
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn serve_one(stream: UnixStream, resource: Arc<str>, handler: Arc<dyn ControlHandler>) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.len() > 64 << 10 {
            break;
        }
        let reply = match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlReply::error(format!("malformed control request: {e}")),
            Ok(req) if req.resource.as_deref().is_some_and(|r| r != &*resource) => {
                ControlReply::error(format!(
                    "this control socket belongs to resource '{resource}', not '{}'; check --control",
                    req.resource.as_deref().unwrap_or_default()
                ))
            }
            Ok(req) if req.cmd == "status" => match handler.status().await {
                Some(status) => ControlReply {
                    ok: true,
                    error: None,
                    status: Some(status),
                    result: None,
                },
                None => ControlReply::error("agent is shutting down".into()),
            },
            Ok(req) if req.cmd == "events" => match handler.metrics() {
                Some(m) => ControlReply::success(
                    serde_json::to_value(m.events.since(req.number("since").unwrap_or(0)))
                        .expect("events serialize"),
                ),
                None => ControlReply::error("this agent keeps no events".into()),
            },
            Ok(req) => handler.other(req).await,
        };
        let mut text = serde_json::to_string(&reply).expect("reply serializes");
        text.push('\n');
        if wr.write_all(text.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// Client side: send one request and read one reply.
pub async fn request(path: &Path, req: &ControlRequest) -> Result<ControlReply, String> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("cannot reach the agent's control socket {}: {e}; is the agent running (see --control)?", path.display()))?;
    let (rd, mut wr) = stream.into_split();
    let mut text = serde_json::to_string(req).expect("request serializes");
    text.push('\n');
    wr.write_all(text.as_bytes())
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let mut lines = BufReader::new(rd).lines();
    let line = lines
        .next_line()
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?
        .ok_or_else(|| format!("control socket {}: closed without a reply", path.display()))?;
    serde_json::from_str(&line)
        .map_err(|e| format!("control socket {}: malformed reply: {e}", path.display()))
}
