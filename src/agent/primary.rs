//! The primary agent: NBD export → engine → local volume ∥ peer link.
//!
//! Tasks:
//! - the **owner** task holds the [`PrimaryEngine`], the metadata store and the
//!   per-seq data; it is the only one that decides anything;
//! - the NBD server's request tasks prepare payloads (crc32 + zstd, in
//!   parallel across requests), take replication-window permits (async
//!   backpressure, G4) and submit to the owner;
//! - spawned local I/O tasks report back to the owner;
//! - the **connector** dials the secondary with backoff (or takes the secondary's
//!   own dial from the listener), runs the handshake (G6, G7), then a reader and
//!   a batching writer for the session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::control::{self, ControlHandler, ControlReply, ControlRequest, StatusDoc};
use crate::agent::{AgentError, RETRY_LOG_INTERVAL, RoleContext, errno_of, security_for};
use crate::bitmap::DirtyBitmap;
use crate::config::NodeConfig;
use crate::engine::primary::{Action, Errno, FlushId, Mode, OpKind, PrimaryEngine};
use crate::frontend::{ExportBackend, IoFuture, NbdAddress, NbdExport, NbdServer};
use crate::meta::{MetaStore, Superblock};
use crate::metrics::Metrics;
use crate::transport::{self, Backoff, PeerReadHalf, PeerWriteHalf, Security};
use crate::types::{BlockCount, BlockIndex, ByteRange, DiskState, Generation, Role, Seq, VolumeId};
use crate::volume::Volume;
use crate::wire::{
    self, Frame, Hello, Message, PROTOCOL_VERSION, Payload, SyncPlan, Welcome, caps,
};

mod verify;

/// Reply channel of one client request.
type Reply = oneshot::Sender<Result<(), Errno>>;

/// What the agent tells its caller once it serves.
#[derive(Clone)]
pub struct PrimaryReady {
    pub nbd: NbdAddress,
    pub metrics: Arc<Metrics>,
}

/// Compression that gets out of the way of data that does not compress (random,
/// encrypted, already compressed): zstd costs ~9 µs per 4 KiB of random data and
/// saved nothing on such workloads (bench: 42% of the primary's CPU on fio's
/// data). After `STREAK` payloads in a row that shrink by less than 1/8, the next
/// `SKIP` go out raw, then compression is tried again. Every payload still
/// carries the crc32 of its bytes (G5).
pub(crate) struct AdaptiveCompression {
    level: i32,
    streak: std::sync::atomic::AtomicU32,
    skip: std::sync::atomic::AtomicU32,
}

impl AdaptiveCompression {
    const STREAK: u32 = 8;
    const SKIP: u32 = 256;

    pub(crate) fn new(level: i32) -> AdaptiveCompression {
        AdaptiveCompression {
            level,
            streak: 0.into(),
            skip: 0.into(),
        }
    }

    pub(crate) fn prepare(&self, data: Bytes) -> Payload {
        if self.level == 0 {
            return Payload::prepare(data, 0);
        }
        let raw_run = self
            .skip
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if raw_run {
            return Payload::prepare(data, 0);
        }
        let p = Payload::prepare(data, self.level);
        let worth_it = (p.wire_len() as u64) * 8 < (p.raw_len() as u64) * 7;
        if worth_it {
            self.streak.store(0, Ordering::Relaxed);
        } else if self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= Self::STREAK {
            self.streak.store(0, Ordering::Relaxed);
            self.skip.store(Self::SKIP, Ordering::Relaxed);
        }
        p
    }
}

/// Shortest time the primary stays ahead before it tries to stream again.
const AHEAD_MIN: Duration = Duration::from_millis(500);

/// Both window permits a shipped write holds until the secondary made it durable.
struct Permits {
    _bytes: OwnedSemaphorePermit,
    _writes: OwnedSemaphorePermit,
}

/// The replication window (G4): bytes and writes shipped and not yet durable.
struct Window {
    bytes: Arc<Semaphore>,
    writes: Arc<Semaphore>,
    bytes_max: u32,
}

impl Window {
    fn new(bytes_max: u64, writes_max: u32) -> Window {
        let bytes_max = bytes_max.min(u32::MAX as u64) as u32;
        Window {
            bytes: Arc::new(Semaphore::new(bytes_max as usize)),
            writes: Arc::new(Semaphore::new(writes_max as usize)),
            bytes_max,
        }
    }

    async fn acquire(&self, len_bytes: u64) -> Option<Permits> {
        // A request larger than the window takes the whole window rather than waiting forever.
        let n = (len_bytes.min(self.bytes_max as u64) as u32).max(1);
        let writes = self.writes.clone().acquire_owned().await.ok()?;
        let bytes = self.bytes.clone().acquire_many_owned(n).await.ok()?;
        Some(Permits {
            _bytes: bytes,
            _writes: writes,
        })
    }

    fn try_acquire(&self, len_bytes: u64) -> Option<Permits> {
        let n = (len_bytes.min(self.bytes_max as u64) as u32).max(1);
        let writes = self.writes.clone().try_acquire_owned().ok()?;
        let bytes = self.bytes.clone().try_acquire_many_owned(n).ok()?;
        Some(Permits {
            _bytes: bytes,
            _writes: writes,
        })
    }
}

enum Cmd {
    Submit {
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        data: Option<Bytes>,
        payload: Option<Payload>,
        permits: Option<Permits>,
        /// Async mode found the replication window full: go ahead (G4).
        congested: bool,
        reply: Reply,
    },
    Flush {
        reply: Reply,
    },
    HelloInfo {
        reply: oneshot::Sender<Hello>,
    },
    Status {
        reply: oneshot::Sender<StatusDoc>,
    },
    /// Drain to the peer, persist, stop; the reply says how the drain went.
    Shutdown {
        reply: oneshot::Sender<String>,
    },
    /// Start an online verify (`tandem verify`); answers at once.
    Verify {
        repair: bool,
        rate_bytes_per_s: Option<u64>,
        reply: oneshot::Sender<ControlReply>,
    },
    /// The running or last verify's progress and result.
    VerifyResult {
        reply: oneshot::Sender<ControlReply>,
    },
}

enum IoDone {
    HashRead {
        seq: Seq,
        result: Result<Vec<[u8; 32]>, Errno>,
    },
    Local {
        seq: Seq,
        result: Result<(), Errno>,
    },
    ResyncRead {
        seq: Seq,
        result: Result<Option<Payload>, Errno>,
    },
    Flush {
        id: FlushId,
        result: Result<(), Errno>,
    },
}

enum PeerEvent {
    Up {
        id: u64,
        tx: mpsc::UnboundedSender<Frame>,
        plan: SyncPlan,
        peer: Welcome,
    },
    Applied {
        id: u64,
        seq: Seq,
    },
    Durable {
        id: u64,
        through: Seq,
    },
    HashReply {
        id: u64,
        seq: Seq,
        mismatched: Vec<u32>,
    },
    Down {
        id: u64,
        reason: String,
    },
}

/// Per-seq data the engine refers to by seq.
struct Held {
    kind: OpKind,
    range: ByteRange,
    fua: bool,
    /// Data for the local write, until it starts.
    data: Option<Bytes>,
    /// Prepared payload for the frame (None: not prepared yet, or an all-zero resync range).
    payload: Option<Payload>,
    zero: bool,
    /// Block hashes of a hash chunk, once read.
    hashes: Option<Vec<[u8; 32]>>,
    local_started: bool,
    ship_settled: bool,
}

struct Session {
    id: u64,
    tx: mpsc::UnboundedSender<Frame>,
    peer: Welcome,
    /// No resync is pending in this session: the peer's disk is UpToDate.
    synced: bool,
}

struct Shared {
    cmd_tx: mpsc::Sender<Cmd>,
    /// The engine ships new writes (connected and not ahead): prepare payloads and take permits.
    streaming: AtomicBool,
    /// Woken whenever `streaming` becomes true (on-disconnect = block waits on it).
    link_up: tokio::sync::Notify,
    /// Sync mode with on-disconnect = block: requests wait for the link.
    block_without_peer: bool,
    /// Cancelled when the agent stops, so requests waiting for the link give up.
    stopping: CancellationToken,
    mode: Mode,
    window: Window,
    size_bytes: u64,
    compress: Arc<AdaptiveCompression>,
    metrics: Arc<Metrics>,
    volume: Volume,
    /// The last handshake decision or refusal, for status.
    handshake: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn set_handshake(&self, text: String) {
        *self.handshake.lock().expect("handshake lock") = Some(text);
    }
}

impl Shared {
    /// With on-disconnect = block, a request waits here until the secondary is
    /// connected and streaming (or the agent stops: ESHUTDOWN).
    async fn wait_for_link(&self) -> std::io::Result<()> {
        if !self.block_without_peer {
            return Ok(());
        }
        loop {
            let notified = self.link_up.notified();
            if self.streaming.load(Ordering::Relaxed) {
                return Ok(());
            }
            tokio::select! {
                _ = notified => {}
                _ = self.stopping.cancelled() => return Err(std::io::Error::from_raw_os_error(libc::ESHUTDOWN)),
            }
        }
    }
}

/// Run a primary until `shutdown` is cancelled, with its own control socket; then
/// drain and persist.
pub async fn run(
    cfg: NodeConfig,
    shutdown: CancellationToken,
    ready: Option<oneshot::Sender<PrimaryReady>>,
) -> Result<(), AgentError> {
    crate::agent::run_alone(cfg, shutdown, |cfg, ctx| serve(cfg, ctx, ready))
        .await
        .map(|_| ())
}

/// Serve the primary role until `ctx.stop` is cancelled; then drain and persist.
/// Returns what the stop did (for a demotion's reply).
pub async fn serve(
    cfg: Arc<NodeConfig>,
    ctx: RoleContext,
    ready: Option<oneshot::Sender<PrimaryReady>>,
) -> Result<String, AgentError> {
    let shutdown = ctx.stop.clone();
    let (volume, opened, _) = crate::agent::open_node(&cfg, Role::Primary)?;
    let size_bytes = volume.size_bytes();
    let mut meta = opened.store;
    let mut sb = opened.superblock;
    if opened.created {
        tracing::info!(meta = %cfg.meta.display(), volume_id = %sb.volume_id, generation = %sb.gen_current, "created metadata for a new primary volume");
    }
    // nbd (issue 13): a node that was a secondary had its volume written by
    // replication, which no checkpoint marked.
    let (was_secondary, volume_id) = (sb.role == Role::Secondary, sb.volume_id);
    if sb.role == Role::Secondary || sb.is_new {
        // G8: taking the primary role starts a new generation.
        if sb.is_new || (sb.disk_state != DiskState::UpToDate && !ctx.force) {
            return Err(AgentError::Refused(format!(
                "{} was a secondary whose disk is {} (it never completed a sync); refusing to serve it as primary. \
                 Resync it from its peer first, or remove its metadata {} to start it as a new primary",
                cfg.volume.display(),
                if sb.is_new {
                    "new".to_string()
                } else {
                    sb.disk_state.to_string()
                },
                cfg.meta.display()
            )));
        }
        let forced = sb.disk_state != DiskState::UpToDate;
        if forced {
            tracing::error!(disk = %sb.disk_state, "FORCED promotion of a disk that is not UpToDate: its data may mix two generations; it is declared UpToDate now");
            sb.disk_state = DiskState::UpToDate;
            // No bitmap describes how this disk differs from any generation: the peer
            // gets a full resync (the generation it was syncing from goes to history,
            // so the peer is recognised as related, not as unrelated data).
            if sb.gen_bitmap_base != Generation::NONE {
                sb.gen_current = sb.gen_bitmap_base;
            }
            sb.gen_bitmap_base = Generation::NONE;
        }
        let new_gen = Generation::random();
        // The peer is known to hold (at most) the old generation, plus what this node
        // writes from now on: the bitmap is relative to it.
        let base = if forced {
            Generation::NONE
        } else if sb.gen_bitmap_base != Generation::NONE {
            // An UpToDate secondary never has a base unless it was primary and diverged
            // before; keep the older one, its bitmap covers both.
            sb.gen_bitmap_base
        } else {
            sb.gen_current
        };
        tracing::warn!(old = %sb.gen_current, new = %new_gen, base = %base, "node was secondary; promoting with a new generation");
        sb.gen_history = [sb.gen_current, sb.gen_history[0]];
        sb.gen_current = new_gen;
        sb.gen_bitmap_base = base;
        sb.promoted_at_s = crate::agent::unix_now_s();
        sb.role = Role::Primary;
    }
    // G3 after a crash: what may differ is the persisted bitmap plus every extent the
    // activity log names; those extents are probably identical, so they are compared by
    // hash. Without trustworthy metadata everything is compared by hash: never assumed
    // in sync, never a blind full copy.
    let activity = opened.activity;
    let mut verify = DirtyBitmap::for_volume(size_bytes, cfg.block_size);
    let mut dirty = opened.bitmap;
    if sb.clean_shutdown && sb.bitmap_valid {
        tracing::info!(out_of_sync_blocks = dirty.dirty_count().0, "clean start");
    } else if sb.bitmap_valid && activity.intact {
        let bs = cfg.block_size as u64;
        for &e in &activity.extents {
            let start = e as u64 * activity.extent_bytes;
            let range = ByteRange::new(
                start,
                activity.extent_bytes.min(size_bytes.saturating_sub(start)),
            );
            let (a, b) = range.blocks(cfg.block_size);
            verify.mark(a, b);
        }
        // Blocks already in the bitmap are sent as data, not compared.
        let mut only_verify = verify.clone();
        for b in 0..dirty.block_count().0 {
            if dirty.is_dirty(BlockIndex(b)) {
                only_verify.clear(BlockIndex(b), BlockIndex(b + 1));
            }
        }
        verify = only_verify;
        tracing::warn!(
            active_extents = activity.extents.len(),
            compare_bytes = verify.dirty_count().0 * bs,
            send_bytes = dirty.dirty_count().0 * bs,
            "previous run stopped uncleanly: resyncing the bitmap, and comparing the activity log's extents by hash"
        );
    } else {
        tracing::warn!(
            bitmap_valid = sb.bitmap_valid,
            activity_log_intact = activity.intact,
            "previous run stopped uncleanly and its metadata cannot say what changed: every block will be compared by hash"
        );
        dirty.clear_all();
        verify.mark_all();
    }
    // Record the recovered set before serving: the bitmap now covers everything the
    // old activity log did, so the log starts empty. While running, bitmap + log
    // cover every block that may differ (bitmap_valid), until a clean shutdown.
    {
        let mut covered = dirty.clone();
        covered.union_with(&verify);
        sb.clean_shutdown = false;
        meta.persist_bitmap(&mut sb, &covered)?;
        meta.write_activity(cfg.al_extent_bytes, &[])?;
    }

    let generation = sb.gen_current;
    let metrics = ctx.metrics.clone().unwrap_or_default();
    metrics.reset_role_state();
    let window = Window::new(cfg.queue_bytes_max, cfg.queue_writes_max);
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let shared = Arc::new(Shared {
        cmd_tx: cmd_tx.clone(),
        streaming: AtomicBool::new(false),
        link_up: tokio::sync::Notify::new(),
        block_without_peer: cfg.mode == Mode::Sync
            && cfg.on_disconnect == crate::config::OnDisconnect::Block,
        stopping: shutdown.child_token(),
        mode: cfg.mode,
        window,
        size_bytes,
        compress: Arc::new(AdaptiveCompression::new(cfg.compress_level)),
        metrics: metrics.clone(),
        volume: volume.clone(),
        handshake: std::sync::Mutex::new(None),
    });
    let mut engine = PrimaryEngine::new(cfg.mode, size_bytes, cfg.block_size, dirty, Seq(1));
    engine.enable_activity(crate::engine::activity::ActiveSet::new(
        cfg.al_extent_bytes,
        cfg.al_extents_max,
    ));
    let mut cursor = BlockIndex(0);
    while let Some((first, n)) = verify.next_dirty_run(cursor, BlockCount(u64::MAX)) {
        engine.mark_verify(first, BlockIndex(first.0 + n.0));
        cursor = BlockIndex(first.0 + n.0);
    }
    engine.set_resync_chunk_bytes(
        (1u64 << 20)
            .min(cfg.queue_bytes_max / 4)
            .max(cfg.block_size as u64),
    );
    let (peer_tx, peer_rx) = mpsc::unbounded_channel();
    let (io_tx, io_rx) = mpsc::unbounded_channel();
    let owner = Owner {
        cfg: cfg.clone(),
        engine,
        volume,
        meta,
        sb,
        held: HashMap::new(),
        permits: HashMap::new(),
        session: None,
        io_tx,
        shared: shared.clone(),
        resync_budget_bytes: 0,
        last_refill: Instant::now(),
        draining: None,
        last_resync_log: Instant::now(),
        last_progress_persist: Instant::now(),
        was_resyncing: false,
        ahead_since: Instant::now(),
        resync_started: None,
        shipped_at: std::collections::VecDeque::new(),
        verify: verify::VerifyDriver::new(),
    };
    let owner_task = tokio::spawn(owner.run(cmd_rx, io_rx, peer_rx));

    let conn_stop = CancellationToken::new();
    let (inbound_tx, inbound_rx) = mpsc::channel(1);
    let connector_task = tokio::spawn(connector(
        cfg.clone(),
        security_for(&cfg),
        cmd_tx.clone(),
        peer_tx,
        shared.clone(),
        inbound_rx,
        conn_stop.clone(),
    ));
    // Both nodes listen and dial: the secondary's dial joins the connector; another
    // primary's is refused with both generations named.
    let listener_task = match cfg.listen {
        Some(addr) => {
            // Refusals of misconfigured peers become events (hardening).
            let listener = transport::PeerListener::bind(addr, &security_for(&cfg))
                .await?
                .with_events(metrics.clone());
            Some(tokio::spawn(answer_dialers(
                listener,
                cfg.clone(),
                cmd_tx.clone(),
                shared.clone(),
                inbound_tx,
                conn_stop.clone(),
            )))
        }
        None => None,
    };

    let nbd_addr: NbdAddress = cfg
        .nbd
        .as_deref()
        .expect("validated")
        .parse()
        .map_err(|e| AgentError::Nbd(format!("{e}")))?;
    let listener = NbdServer::bind(&nbd_addr)
        .await
        .map_err(|e| AgentError::Nbd(format!("{e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| AgentError::Nbd(format!("{e}")))?;
    let export = NbdExport {
        name: cfg.nbd_name.clone(),
        description: format!(
            "tandem resource {} ({} mode)",
            cfg.resource,
            if cfg.mode == Mode::Sync {
                "sync"
            } else {
                "async"
            }
        ),
        block_size_preferred: cfg.block_size.max(512),
        ..NbdExport::default()
    };
    // nbd (issue 13): checkpoints (qemu:dirty-bitmap:NAME, marked on every client
    // write), base:allocation, TLS on the export; the logic lives in crate::nbd and
    // crate::checkpoint.
    let checkpoints = crate::checkpoint::CheckpointStore::open(
        &cfg.meta,
        size_bytes,
        cfg.block_size,
        volume_id,
        was_secondary,
    )
    .await
    .map_err(|e| AgentError::Nbd(e.to_string()))?;
    let server = NbdServer::with_options(
        Arc::new(
            crate::nbd::tracked::TrackedExport::new(
                Arc::new(ReplicatedExport {
                    shared: shared.clone(),
                }),
                &shared.volume,
                checkpoints.clone(),
            )
            .map_err(|e| AgentError::Nbd(format!("{e}")))?,
        ),
        export,
        crate::nbd::tls::server_options(&cfg, &nbd_addr, &metrics)
            .map_err(|e| AgentError::Nbd(format!("{e}")))?,
    );
    let checkpoint_stop = CancellationToken::new();
    let checkpoint_task = checkpoints.spawn_periodic(checkpoint_stop.clone());
    let nbd_stop = CancellationToken::new();
    let accept_stop = CancellationToken::new();
    let nbd_task = tokio::spawn(server.clone().serve_until(
        listener,
        accept_stop.clone(),
        nbd_stop.clone(),
    ));
    tracing::info!(nbd = %bound, peer = ?cfg.peer, mode = ?cfg.mode, generation = %generation, "primary serving");

    let handler: Arc<dyn ControlHandler> = Arc::new(PrimaryControl {
        cmd_tx: cmd_tx.clone(),
        metrics: metrics.clone(),
        checkpoints: checkpoints.clone(), // nbd (issue 13)
    });
    ctx.control.set(Some(handler.clone()));
    let observers = crate::agent::monitor::start(&cfg, handler, metrics.clone()).await?;
    if let Some(ready) = ready {
        let _ = ready.send(PrimaryReady {
            nbd: bound,
            metrics: metrics.clone(),
        });
    }

    shutdown.cancelled().await;
    observers.stop().await;
    let mut summary = Vec::new();
    accept_stop.cancel();
    let demote = *ctx.demote.lock().expect("demote lock");
    if let Some(wait) = demote {
        // A demotion lets attached clients finish (unmount, disconnect) for a bounded time.
        let clients = server.connections();
        let deadline = tokio::time::Instant::now() + wait;
        if clients > 0 {
            tracing::info!(
                clients,
                wait_s = wait.as_secs(),
                "demoting: no new NBD clients; waiting for the attached ones to disconnect"
            );
        }
        while server.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = server.connections();
        summary.push(match (clients, left) {
            (0, _) => "no NBD clients were attached".to_string(),
            (n, 0) => format!("{n} NBD client(s) disconnected by themselves"),
            (n, left) => format!(
                "{n} NBD client(s) attached; {left} still attached after {} s were closed after their requests in flight completed",
                wait.as_secs()
            ),
        });
    }
    tracing::info!("stopping: no new NBD requests; completing those in flight");
    nbd_stop.cancel();
    match nbd_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("NBD server: {e}"),
        Err(e) => tracing::error!("NBD server task: {e}"),
    }
    // nbd (issue 13): no client write is left; the checkpoint maps are exact.
    checkpoint_stop.cancel();
    let _ = checkpoint_task.await;
    if let Err(e) = checkpoints.close().await {
        tracing::error!(
            "checkpoints not saved cleanly (they will over-approximate at the next start): {e}"
        );
    }
    let (tx, rx) = oneshot::channel();
    if cmd_tx.send(Cmd::Shutdown { reply: tx }).await.is_ok()
        && let Ok(drained) = rx.await
    {
        summary.push(drained);
    }
    conn_stop.cancel();
    let _ = connector_task.await;
    if let Some(t) = listener_task {
        let _ = t.await;
    }
    ctx.control.set(None);
    drop(cmd_tx);

    owner_task
        .await
        .map_err(|e| AgentError::Refused(format!("owner task failed: {e}")))??;
    Ok(summary.join("; "))
}

/// The export the NBD server sees: reads go straight to the volume, writes
/// through the owner.
struct ReplicatedExport {
    shared: Arc<Shared>,
}

impl ReplicatedExport {
    fn submit(
        &self,
        kind: OpKind,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
        fua: bool,
    ) -> IoFuture<()> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let start = Instant::now();
            if offset
                .checked_add(len)
                .is_none_or(|end| end > shared.size_bytes)
            {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            if len == 0 {
                return Ok(());
            }
            shared.wait_for_link().await?;
            let streaming = shared.streaming.load(Ordering::Relaxed);
            let payload = match (&data, streaming) {
                (Some(d), true) => Some(shared.compress.prepare(d.clone())),
                _ => None,
            };
            let wire_len = if kind == OpKind::Write { len } else { 0 };
            // Sync mode waits for room in the window (backpressure); async mode never
            // blocks a client on the peer: a full window sends the primary ahead (G4).
            let (permits, congested) = match (streaming, shared.mode) {
                (false, _) => (None, false),
                (true, Mode::Sync) => (shared.window.acquire(wire_len).await, false),
                (true, Mode::Async) => match shared.window.try_acquire(wire_len) {
                    Some(p) => (Some(p), false),
                    None => (None, true),
                },
            };
            let (reply, rx) = oneshot::channel();
            let range = ByteRange::new(offset, len);
            let cmd = Cmd::Submit {
                kind,
                range,
                fua,
                data,
                payload,
                permits,
                congested,
                reply,
            };
            shared
                .cmd_tx
                .send(cmd)
                .await
                .map_err(|_| std::io::Error::from_raw_os_error(libc::ESHUTDOWN))?;
            let result = rx
                .await
                .map_err(|_| std::io::Error::from_raw_os_error(libc::ESHUTDOWN))?;
            Metrics::add(&shared.metrics.client_writes, 1);
            Metrics::add(&shared.metrics.client_write_bytes, len);
            shared.metrics.record_write_latency(start.elapsed());
            result.map_err(std::io::Error::from_raw_os_error)
        })
    }
}

impl ExportBackend for ReplicatedExport {
    fn size_bytes(&self) -> u64 {
        self.shared.size_bytes
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<Bytes> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let data = shared.volume.read(offset, len).await?;
            Metrics::add(&shared.metrics.client_reads, 1);
            Metrics::add(&shared.metrics.client_read_bytes, len as u64);
            Ok(data)
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        let len = data.len() as u64;
        self.submit(OpKind::Write, offset, len, Some(data), fua)
    }

    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> IoFuture<()> {
        self.submit(OpKind::WriteZeroes, offset, len as u64, None, fua)
    }

    fn trim(&self, offset: u64, len: u32) -> IoFuture<()> {
        self.submit(OpKind::Trim, offset, len as u64, None, false)
    }

    fn flush(&self) -> IoFuture<()> {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared.wait_for_link().await?;
            let (reply, rx) = oneshot::channel();
            shared
                .cmd_tx
                .send(Cmd::Flush { reply })
                .await
                .map_err(|_| std::io::Error::from_raw_os_error(libc::ESHUTDOWN))?;
            let result = rx
                .await
                .map_err(|_| std::io::Error::from_raw_os_error(libc::ESHUTDOWN))?;
            Metrics::add(&shared.metrics.client_flushes, 1);
            result.map_err(std::io::Error::from_raw_os_error)
        })
    }
}

struct Draining {
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<String>,
    /// How the drain ended, for the reply.
    outcome: Option<String>,
}

struct Owner {
    cfg: Arc<NodeConfig>,
    engine: PrimaryEngine<Reply>,
    volume: Volume,
    meta: MetaStore,
    sb: Superblock,
    held: HashMap<Seq, Held>,
    permits: HashMap<Seq, Permits>,
    session: Option<Session>,
    io_tx: mpsc::UnboundedSender<IoDone>,
    shared: Arc<Shared>,
    /// Resync rate limit: a token bucket in bytes, refilled at resync-rate.
    resync_budget_bytes: i64,
    last_refill: Instant,
    draining: Option<Draining>,
    last_resync_log: Instant,
    last_progress_persist: Instant,
    was_resyncing: bool,
    ahead_since: Instant,
    resync_started: Option<Instant>,
    /// Client writes shipped in this session and when, until a Durable covers them
    /// (replication latency). Bounded by the replication window.
    shipped_at: std::collections::VecDeque<(Seq, Instant)>,
    /// Rate limit and bookkeeping of the online verify (primary/verify.rs).
    verify: verify::VerifyDriver,
}

impl Owner {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::Receiver<Cmd>,
        mut io_rx: mpsc::UnboundedReceiver<IoDone>,
        mut peer_rx: mpsc::UnboundedReceiver<PeerEvent>,
    ) -> Result<(), AgentError> {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                biased;
                Some(done) = io_rx.recv() => self.on_io(done, &mut out),
                Some(ev) = peer_rx.recv() => self.on_peer(ev, &mut out),
                cmd = cmd_rx.recv(), if self.draining.is_none() => match cmd {
                    Some(cmd) => self.on_cmd(cmd, &mut out),
                    None => break,
                },
                _ = tick.tick() => {}
            }
            self.maybe_leave_ahead(&mut out);
            // Resync progress survives a restart: persisted every 10 s and when a pass ends.
            let resyncing = self.engine.resync_progress().is_some();
            if (resyncing && self.last_progress_persist.elapsed() >= Duration::from_secs(10))
                || (self.was_resyncing && !resyncing)
            {
                self.persist_progress();
            }
            if resyncing && !self.was_resyncing {
                self.resync_started = Some(Instant::now());
            } else if !resyncing {
                self.resync_started = None;
            }
            self.was_resyncing = resyncing;
            self.pump_resync(&mut out);
            self.pump_verify(&mut out);
            self.publish_gauges();
            if let Some(d) = &self.draining {
                let drained = self.engine.ops_in_flight() == 0
                    && (!self.engine.is_streaming() || self.engine.lag().writes == 0);
                if drained || tokio::time::Instant::now() >= d.deadline {
                    let out_of_sync =
                        self.engine.dirty().dirty_count().0 * self.cfg.block_size as u64;
                    let outcome = if !drained {
                        tracing::warn!(
                            lag_writes = self.engine.lag().writes,
                            "drain timed out; the writes not yet durable on the secondary stay marked for resync"
                        );
                        format!(
                            "drain timed out after {} ms with {} writes not durable on the peer; {out_of_sync} bytes stay marked out of sync",
                            self.cfg.drain_timeout_ms,
                            self.engine.lag().writes
                        )
                    } else if self.session.is_some() && out_of_sync == 0 {
                        "replication queue drained: the peer holds every write".to_string()
                    } else if self.session.is_some() {
                        format!(
                            "replication queue drained; a resync of {out_of_sync} bytes was still pending"
                        )
                    } else {
                        format!(
                            "peer not connected: {out_of_sync} bytes stay marked out of sync for the next resync"
                        )
                    };
                    if let Some(d) = self.draining.as_mut() {
                        d.outcome = Some(outcome);
                    }
                    break;
                }
            }
        }
        self.finish().await
    }

    /// Carry out engine actions.
    fn act(&mut self, out: &mut Vec<Action<Reply>>) {
        while !out.is_empty() {
            let batch = std::mem::take(out);
            for action in batch {
                self.act_one(action, out);
            }
        }
    }

    fn act_one(&mut self, action: Action<Reply>, out: &mut Vec<Action<Reply>>) {
        {
            match action {
                Action::StartLocal {
                    seq,
                    kind,
                    range,
                    fua,
                } => self.start_local(seq, kind, range, fua),
                Action::Ship { seq } => self.ship(seq),
                Action::ShipResyncStart { next, blocks, full } => {
                    let bs = self.cfg.block_size as u64;
                    tracing::info!(
                        blocks = blocks.0,
                        bytes = blocks.0 * bs,
                        full,
                        "resync starts"
                    );
                    self.shared
                        .metrics
                        .resync_total_blocks
                        .store(blocks.0, Ordering::Relaxed);
                    self.shared
                        .metrics
                        .resync_shipped_blocks
                        .store(0, Ordering::Relaxed);
                    self.send(Frame {
                        seq: next.0,
                        msg: Message::ResyncStart {
                            blocks: blocks.0,
                            full,
                        },
                        payload: Payload::empty(),
                    });
                }
                Action::ShipFlush { through } => self.send(Frame {
                    seq: through.0,
                    msg: Message::Flush,
                    payload: Payload::empty(),
                }),
                Action::ShipResyncDone { through } => {
                    tracing::info!(
                        through = through.0,
                        "resync pass shipped; waiting for the secondary to make it durable"
                    );
                    self.send(Frame {
                        seq: through.0,
                        msg: Message::ResyncDone {
                            through_seq: through.0,
                        },
                        payload: Payload::empty(),
                    });
                }
                Action::Complete { token, result, .. } => {
                    let _ = token.send(result);
                }
                Action::StartLocalFlush { id } => {
                    let volume = self.volume.clone();
                    let tx = self.io_tx.clone();
                    tokio::spawn(async move {
                        let result = volume.flush().await.map_err(|e| errno_of(&e));
                        let _ = tx.send(IoDone::Flush { id, result });
                    });
                }
                Action::CompleteFlush { token, result, .. } => {
                    let _ = token.send(result);
                }
                Action::Release { seq } => {
                    self.permits.remove(&seq);
                }
                Action::Forget { seq } => {
                    if let Some(h) = self.held.get_mut(&seq) {
                        h.payload = None;
                        h.ship_settled = true;
                        if h.local_started {
                            self.held.remove(&seq);
                        }
                    }
                }
                Action::DropSession { reason } => self.drop_session(&reason, out),
                Action::WriteActivityLog { active, retired } => {
                    self.write_activity(active, retired, out)
                }
            }
        }
    }

    /// Record the active extents durably (write-intent, ARCHITECTURE §4). When extents
    /// retired, the bitmap is persisted first so their dirty bits stay covered. Runs
    /// inline: it is one small durable write, and only when the set changes.
    fn write_activity(&mut self, active: Vec<u32>, retired: bool, out: &mut Vec<Action<Reply>>) {
        let extent_bytes = self.cfg.al_extent_bytes;
        let result = tokio::task::block_in_place(|| {
            if retired {
                let bm = self.engine.out_of_sync();
                self.meta.persist_bitmap(&mut self.sb, &bm)?;
            }
            self.meta.write_activity(extent_bytes, &active)
        });
        if let Err(e) = result {
            // Crash coverage can no longer be recorded: refuse further writes (like a
            // failed flush) rather than risk an unrecorded divergence (G3).
            tracing::error!("activity log write failed: {e}; refusing further writes");
            self.shared
                .metrics
                .set_error(format!("activity log write failed: {e}"));
            // Event (hardening): metadata I/O failed.
            self.shared
                .metrics
                .events
                .emit(crate::metrics::events::EventKind::IoError {
                    op: "metadata".into(),
                    error: e.to_string(),
                    offset: None,
                    len: None,
                });
            self.engine.poison();
        }
        self.engine.activity_written(out);
    }

    fn send(&mut self, frame: Frame) {
        if let Some(s) = &self.session {
            // A closed channel means the session is going down; Down follows.
            let _ = s.tx.send(frame);
        }
    }

    fn drop_session(&mut self, reason: &str, out: &mut Vec<Action<Reply>>) {
        self.shipped_at.clear();
        if let Some(s) = self.session.take() {
            tracing::warn!(session = s.id, "dropping the session: {reason}");
            if self.cfg.mode == Mode::Sync {
                if self.shared.block_without_peer {
                    tracing::warn!(
                        "sync mode without a secondary: new writes wait until it is back (on-disconnect = block)"
                    );
                } else {
                    tracing::warn!(
                        "sync mode DEGRADED: without a secondary, writes complete on this node alone and are tracked for resync (on-disconnect = degrade)"
                    );
                }
            }
            self.shared.metrics.set_error(reason.to_string());
            let mut more = Vec::new();
            self.engine.session_ended(&mut more);
            self.shared.streaming.store(false, Ordering::Relaxed);
            self.shared.metrics.set_connected(false, reason);
            out.extend(more);
        }
    }

    fn start_local(&mut self, seq: Seq, kind: OpKind, range: ByteRange, fua: bool) {
        let held = self.held.get_mut(&seq).expect("local op has held data");
        held.local_started = true;
        // A write accepted just before the link came up has no payload yet; the
        // shipper prepares it from the same (shared, not copied) bytes later.
        let data = if held.payload.is_none() && !held.ship_settled && held.kind == OpKind::Write {
            held.data.clone()
        } else {
            held.data.take()
        };
        if held.ship_settled {
            self.held.remove(&seq);
        }
        // A buffered write without FUA is a page-cache copy: do it here, without a
        // task, a channel and two wake-ups per write.
        if kind == OpKind::Write && !fua && self.volume.writes_inline() {
            let data = data.expect("write has data");
            let started = Instant::now();
            let result = self
                .volume
                .write_inline(range.offset, &data)
                .map_err(|e| errno_of(&e));
            self.shared
                .metrics
                .local_write_latency
                .record(started.elapsed());
            let _ = self.io_tx.send(IoDone::Local { seq, result });
            return;
        }
        let volume = self.volume.clone();
        let tx = self.io_tx.clone();
        let compress = self.shared.compress.clone();
        let metrics = self.shared.metrics.clone();
        let block_size = self.cfg.block_size;
        let hash_unit = self.engine.hash_unit_blocks(kind).unwrap_or(1);
        tokio::spawn(async move {
            let started = Instant::now();
            let done = match kind {
                OpKind::Write => {
                    let data = data.expect("write has data");
                    IoDone::Local {
                        seq,
                        result: volume
                            .write(range.offset, data, fua)
                            .await
                            .map_err(|e| errno_of(&e)),
                    }
                }
                OpKind::WriteZeroes => IoDone::Local {
                    seq,
                    result: volume
                        .write_zeroes(range.offset, range.len, fua)
                        .await
                        .map_err(|e| errno_of(&e)),
                },
                OpKind::Trim => IoDone::Local {
                    seq,
                    result: volume
                        .trim(range.offset, range.len)
                        .await
                        .map_err(|e| errno_of(&e)),
                },
                OpKind::HashRead | OpKind::VerifyRead | OpKind::RangeHashRead => {
                    let unit = block_size * hash_unit as u32;
                    let result = match volume.read(range.offset, range.len as u32).await {
                        Ok(data) => Ok(crate::resync::hash_blocks(&data, unit)),
                        Err(e) => Err(errno_of(&e)),
                    };
                    IoDone::HashRead { seq, result }
                }
                OpKind::ResyncRead => {
                    let result = match volume.read(range.offset, range.len as u32).await {
                        Ok(data) if is_all_zero(&data) => Ok(None),
                        Ok(data) => Ok(Some(compress.prepare(data))),
                        Err(e) => Err(errno_of(&e)),
                    };
                    IoDone::ResyncRead { seq, result }
                }
            };
            if matches!(kind, OpKind::Write | OpKind::WriteZeroes | OpKind::Trim) {
                metrics.local_write_latency.record(started.elapsed());
            }
            let _ = tx.send(done);
        });
    }

    fn ship(&mut self, seq: Seq) {
        let held = self.held.get_mut(&seq).expect("shipped op has held data");
        let range = held.range;
        let metrics = &self.shared.metrics;
        let frame = match held.kind {
            OpKind::HashRead | OpKind::VerifyRead | OpKind::RangeHashRead => {
                Metrics::add(&metrics.verified_bytes, range.len);
                let hashes = held
                    .hashes
                    .take()
                    .expect("hash chunk was read before shipping");
                Metrics::add(
                    &metrics.verify_wire_bytes,
                    (crate::wire::HEADER_LEN + 32 * hashes.len()) as u64,
                );
                Frame {
                    seq: seq.0,
                    msg: Message::HashCheck {
                        offset: range.offset,
                        block_size: self.cfg.block_size
                            * self
                                .engine
                                .hash_unit_blocks(held.kind)
                                .expect("a comparison") as u32,
                        hashes,
                    },
                    payload: Payload::empty(),
                }
            }
            OpKind::Write | OpKind::ResyncRead if !held.zero => {
                let payload = match held.payload.take() {
                    Some(p) => p,
                    // Accepted just before the link came up: prepare it now.
                    None => self.shared.compress.prepare(
                        held.data
                            .clone()
                            .expect("unprepared write still holds its data"),
                    ),
                };
                Metrics::add(&metrics.replicated_bytes, payload.raw_len() as u64);
                Metrics::add(&metrics.replicated_wire_bytes, payload.wire_len() as u64);
                Frame {
                    seq: seq.0,
                    msg: Message::Write {
                        offset: range.offset,
                        fua: held.fua,
                    },
                    payload,
                }
            }
            OpKind::Write | OpKind::ResyncRead | OpKind::WriteZeroes => Frame {
                seq: seq.0,
                msg: Message::WriteZeroes {
                    offset: range.offset,
                    len: range.len as u32,
                    fua: held.fua,
                },
                payload: Payload::empty(),
            },
            OpKind::Trim => Frame {
                seq: seq.0,
                msg: Message::Trim {
                    offset: range.offset,
                    len: range.len as u32,
                },
                payload: Payload::empty(),
            },
        };
        if held.kind == OpKind::ResyncRead {
            Metrics::add(&metrics.resync_bytes, range.len);
        }
        if matches!(
            held.kind,
            OpKind::Write | OpKind::WriteZeroes | OpKind::Trim
        ) {
            self.shipped_at.push_back((seq, Instant::now()));
        }
        self.send(frame);
    }

    fn on_cmd(&mut self, cmd: Cmd, out: &mut Vec<Action<Reply>>) {
        match cmd {
            Cmd::Submit {
                kind,
                range,
                fua,
                data,
                payload,
                permits,
                congested,
                reply,
            } => {
                if congested && self.engine.is_shipping() {
                    let lag = self.engine.lag();
                    tracing::warn!(
                        lag_writes = lag.writes,
                        lag_bytes = lag.bytes,
                        "replication window full: going ahead, new writes are tracked in the bitmap until the secondary catches up"
                    );
                    self.engine.enter_ahead();
                    self.ahead_since = Instant::now();
                    Metrics::add(&self.shared.metrics.ahead_episodes, 1);
                }
                if self.session.is_none() && self.sb.gen_bitmap_base == Generation::NONE {
                    self.start_generation_alone();
                }
                let seq = self.engine.next_seq();
                self.held.insert(
                    seq,
                    Held {
                        kind,
                        range,
                        fua,
                        data,
                        payload,
                        zero: false,
                        hashes: None,
                        local_started: false,
                        ship_settled: false,
                    },
                );
                if let Some(p) = permits {
                    self.permits.insert(seq, p);
                }
                let now_ms = self.shared.metrics.now_ms();
                let got = self.engine.submit(kind, range, fua, reply, now_ms, out);
                assert_eq!(got, seq);
                if !self.engine.is_shipping() {
                    self.permits.remove(&seq);
                }
            }
            Cmd::Flush { reply } => {
                self.engine.flush(reply, out);
            }
            Cmd::HelloInfo { reply } => {
                let _ = reply.send(self.hello());
            }
            Cmd::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Cmd::Verify {
                repair,
                rate_bytes_per_s,
                reply,
            } => {
                let _ = reply.send(self.start_verify(repair, rate_bytes_per_s));
            }
            Cmd::VerifyResult { reply } => {
                let _ = reply.send(ControlReply::success(self.verify_result_json()));
            }
            Cmd::Shutdown { reply } => {
                let deadline =
                    tokio::time::Instant::now() + Duration::from_millis(self.cfg.drain_timeout_ms);
                tracing::info!(
                    lag_writes = self.engine.lag().writes,
                    lag_bytes = self.engine.lag().bytes,
                    "draining the replication queue to the secondary"
                );
                self.draining = Some(Draining {
                    deadline,
                    reply,
                    outcome: None,
                });
            }
        }
        self.act(out);
    }

    fn on_io(&mut self, done: IoDone, out: &mut Vec<Action<Reply>>) {
        match done {
            IoDone::Local { seq, result } => self.engine.local_done(seq, result, out),
            IoDone::ResyncRead { seq, result } => {
                let result = match result {
                    Ok(payload) => {
                        // The rate limit counts bytes on the wire: an all-zero range
                        // costs a header, so an empty volume syncs at disk speed.
                        let wire = payload
                            .as_ref()
                            .map_or(crate::wire::HEADER_LEN as i64, |p| p.wire_len() as i64);
                        self.resync_budget_bytes -= wire;
                        if let Some(h) = self.held.get_mut(&seq) {
                            h.zero = payload.is_none();
                            h.payload = payload;
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                self.engine.local_done(seq, result, out);
            }
            IoDone::HashRead { seq, result } => {
                let result = match result {
                    Ok(hashes) => {
                        // A verify chunk was charged to the verify's budget when issued.
                        if self
                            .held
                            .get(&seq)
                            .is_none_or(|h| h.kind != OpKind::VerifyRead)
                        {
                            self.resync_budget_bytes -=
                                (crate::wire::HEADER_LEN + 32 * hashes.len()) as i64;
                        }
                        if let Some(h) = self.held.get_mut(&seq) {
                            h.hashes = Some(hashes);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                self.engine.local_done(seq, result, out);
            }
            IoDone::Flush { id, result } => self.engine.local_flush_done(id, result, out),
        }
        self.act(out);
    }

    fn on_peer(&mut self, ev: PeerEvent, out: &mut Vec<Action<Reply>>) {
        let current = self.session.as_ref().map(|s| s.id);
        match ev {
            PeerEvent::Up { id, tx, plan, peer } => {
                if self.session.is_some() {
                    self.drop_session("a new session replaced it", out);
                    self.act(out);
                }
                if self.draining.is_some() {
                    return;
                }
                // What the secondary changed on its own (it was primary before) is resent
                // with our dirty blocks, or compared by hash (G8: a rejoining node is
                // rolled back to this node's data).
                let own_dirty: u64 = peer.own_dirty.iter().map(|r| r.1).sum();
                let own_verify: u64 = peer.own_verify.iter().map(|r| r.1).sum();
                if plan == SyncPlan::Bitmap {
                    let blocks = self.engine.dirty().block_count().0;
                    let clamp = |(f, n): (u64, u64)| {
                        (
                            BlockIndex(f.min(blocks)),
                            BlockIndex(f.saturating_add(n).min(blocks)),
                        )
                    };
                    for &r in &peer.own_dirty {
                        let (a, b) = clamp(r);
                        self.engine.mark_out_of_sync(a, b);
                    }
                    for &r in &peer.own_verify {
                        let (a, b) = clamp(r);
                        self.engine.mark_verify(a, b);
                    }
                }
                tracing::info!(session = id, peer = %peer.node_name, plan = ?plan, decision = %peer.decision,
                    out_of_sync_blocks = self.engine.dirty().dirty_count().0, peer_changed_blocks = own_dirty,
                    peer_compare_blocks = own_verify, "connected to secondary");
                self.shared.set_handshake(peer.decision.clone());
                self.shared.metrics.set_connected(true, &peer.node_name);
                self.session = Some(Session {
                    id,
                    tx,
                    peer,
                    synced: false,
                });
                Metrics::add(&self.shared.metrics.sessions, 1);
                let full = plan != SyncPlan::Bitmap;
                if plan == SyncPlan::Verify {
                    // A pre-seeded secondary (or one whose metadata was rebuilt): every
                    // block is compared by hash, only those that differ are sent.
                    let blocks = self.engine.dirty().block_count();
                    self.engine.mark_verify(BlockIndex(0), BlockIndex(blocks.0));
                }
                self.engine.session_started(full, out);
                if full || own_dirty > 0 || own_verify > 0 {
                    // Persist "everything dirty" before ResyncStart goes out: the
                    // secondary may resume this sync from our bitmap later, even
                    // across a crash of this node.
                    self.persist_progress();
                }
                self.shared.streaming.store(true, Ordering::Relaxed);
            }
            PeerEvent::Applied { id, seq } if Some(id) == current => {
                self.engine.peer_applied(seq, out)
            }
            PeerEvent::Durable { id, through } if Some(id) == current => {
                while let Some(&(seq, at)) = self.shipped_at.front()
                    && seq <= through
                {
                    self.shipped_at.pop_front();
                    self.shared.metrics.replication_latency.record(at.elapsed());
                }
                self.engine.peer_durable(through, out)
            }
            PeerEvent::HashReply {
                id,
                seq,
                mismatched,
            } if Some(id) == current => {
                Metrics::add(
                    &self.shared.metrics.verify_mismatched_blocks,
                    mismatched.len() as u64,
                );
                self.engine.peer_hash_reply(seq, &mismatched, out)
            }
            PeerEvent::Down { id, reason } if Some(id) == current => {
                self.drop_session(&reason, out)
            }
            _ => {}
        }
        self.act(out);
    }

    fn pump_resync(&mut self, out: &mut Vec<Action<Reply>>) {
        if self.draining.is_some() || !self.engine.wants_resync_chunk() {
            self.last_refill = Instant::now();
            return;
        }
        let rate = self.cfg.resync_rate_bytes_per_s;
        let now = Instant::now();
        let refill = (now - self.last_refill).as_secs_f64() * rate as f64;
        self.last_refill = now;
        // At most 100 ms of budget accumulates, so a pause does not turn into a burst.
        self.resync_budget_bytes =
            (self.resync_budget_bytes + refill as i64).min((rate / 10).max(1 << 20) as i64);
        while self.engine.wants_resync_chunk() && (rate == 0 || self.resync_budget_bytes > 0) {
            let Some(permits) = self.shared.window.try_acquire(1 << 20) else {
                break;
            };
            let seq = self.engine.next_seq();
            let now_ms = self.shared.metrics.now_ms();
            let chunk = {
                // Held must exist before StartLocal is acted on.
                self.held.insert(
                    seq,
                    Held {
                        kind: OpKind::ResyncRead,
                        range: ByteRange::new(0, 0),
                        fua: false,
                        data: None,
                        payload: None,
                        zero: false,
                        hashes: None,
                        local_started: false,
                        ship_settled: false,
                    },
                );
                self.engine.next_resync_chunk(now_ms, out)
            };
            match chunk {
                Some((s, range, kind)) => {
                    assert_eq!(s, seq);
                    let held = self.held.get_mut(&seq).expect("inserted");
                    held.range = range;
                    held.kind = kind;
                    self.permits.insert(seq, permits);
                }
                None => {
                    self.held.remove(&seq);
                }
            }
            self.act(out);
        }
        if let Some(p) = self.engine.resync_progress() {
            self.shared
                .metrics
                .resync_shipped_blocks
                .store(p.shipped_blocks.0, Ordering::Relaxed);
            if self.last_resync_log.elapsed() >= Duration::from_secs(2) {
                self.last_resync_log = Instant::now();
                let bs = self.cfg.block_size as u64;
                let done = p.shipped_blocks.0 * bs;
                let total = p.total_blocks.0 * bs;
                let secs = if rate > 0 {
                    total.saturating_sub(done) as f64 / rate as f64
                } else {
                    0.0
                };
                tracing::info!(
                    done_bytes = done,
                    total_bytes = total,
                    percent = format!("{:.1}", 100.0 * done as f64 / total.max(1) as f64),
                    eta_s = format!("{secs:.0}"),
                    "resync progress"
                );
            }
        }
    }

    /// Leave the ahead state once the window has drained to half (hysteresis, so the
    /// primary does not flap between the two states on every ack).
    fn maybe_leave_ahead(&mut self, out: &mut Vec<Action<Reply>>) {
        if !self.engine.is_ahead() || self.draining.is_some() {
            return;
        }
        // Stay ahead at least AHEAD_MIN: each return costs a resync pass, and a link
        // slower than the writers would otherwise flap several times a second.
        if self.ahead_since.elapsed() < AHEAD_MIN {
            return;
        }
        let lag = self.engine.lag();
        if lag.bytes <= self.cfg.queue_bytes_max / 2
            && lag.writes <= self.cfg.queue_writes_max as u64 / 2
            && self.engine.leave_ahead(out)
        {
            tracing::info!(
                out_of_sync_blocks = self.engine.dirty().dirty_count().0,
                "secondary caught up: leaving ahead; resyncing what changed meanwhile"
            );
            self.act(out);
        }
    }

    /// The first write accepted while the peer is away starts a new generation, made
    /// durable before the write is: if the peer is promoted meanwhile, both sides then
    /// hold new generations from one common one, and the reconnect sees a split brain
    /// instead of silently rolling these writes back (G8).
    fn start_generation_alone(&mut self) {
        let old = self.sb.gen_current;
        let new = Generation::random();
        self.sb.gen_history = [old, self.sb.gen_history[0]];
        self.sb.gen_current = new;
        self.sb.gen_bitmap_base = old;
        let result = tokio::task::block_in_place(|| self.meta.write_superblock(&self.sb));
        match result {
            Ok(()) => {
                tracing::warn!(generation = %new, base = %old, "writing without the peer: new generation")
            }
            Err(e) => {
                tracing::error!("recording a new generation failed: {e}; refusing further writes");
                self.shared
                    .metrics
                    .set_error(format!("recording a new generation failed: {e}"));
                self.engine.poison();
            }
        }
    }

    /// The peer holds this node's current generation (a resync completed, or nothing
    /// needed sending): the bitmap is relative to it from now on.
    fn peer_reached_generation(&mut self) {
        if self.sb.gen_bitmap_base == Generation::NONE {
            return;
        }
        let base = self.sb.gen_bitmap_base;
        self.sb.gen_bitmap_base = Generation::NONE;
        let result = tokio::task::block_in_place(|| self.meta.write_superblock(&self.sb));
        if let Err(e) = result {
            tracing::error!("recording that the peer is in sync failed: {e}");
            self.sb.gen_bitmap_base = base;
        } else {
            tracing::info!(generation = %self.sb.gen_current, "the peer holds this generation");
        }
    }

    /// Persist the out-of-sync bitmap (a superset of what may differ): makes resync
    /// progress survive a restart. Called at a full sync's start and every 10 s of a
    /// running resync.
    fn persist_progress(&mut self) {
        let bm = self.engine.out_of_sync();
        let result = tokio::task::block_in_place(|| self.meta.persist_bitmap(&mut self.sb, &bm));
        self.last_progress_persist = Instant::now();
        if let Err(e) = result {
            tracing::error!("persisting the bitmap failed: {e}; refusing further writes");
            self.shared
                .metrics
                .set_error(format!("persisting the bitmap failed: {e}"));
            self.engine.poison();
        }
    }

    fn publish_gauges(&mut self) {
        let shipping = self.engine.is_shipping();
        if shipping && !self.shared.streaming.swap(true, Ordering::Relaxed) {
            self.shared.link_up.notify_waiters();
        }
        self.shared.streaming.store(shipping, Ordering::Relaxed);
        self.shared
            .metrics
            .ahead
            .store(self.engine.is_ahead(), Ordering::Relaxed);
        let resync_pending = self.engine.resync_progress().is_some();
        self.shared.metrics.set_resync_active(resync_pending);
        if let Some(s) = self.session.as_mut()
            && !s.synced
            && !resync_pending
            && self.engine.is_streaming()
        {
            s.synced = true;
            self.peer_reached_generation();
        }
        self.engine.observe_dirty(self.shared.metrics.now_ms());
        let m = &self.shared.metrics;
        let lag = self.engine.lag();
        m.lag_writes.store(lag.writes, Ordering::Relaxed);
        m.lag_bytes.store(lag.bytes, Ordering::Relaxed);
        m.lag_oldest_at_ms.store(
            lag.oldest_accepted_at_ms.map(|t| t.max(1)).unwrap_or(0),
            Ordering::Relaxed,
        );
        m.out_of_sync_bytes.store(
            self.engine.dirty().dirty_count().0 * self.cfg.block_size as u64,
            Ordering::Relaxed,
        );
    }

    fn hello(&self) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            volume_id: self.sb.volume_id.0,
            size_bytes: self.engine_size(),
            block_size: self.cfg.block_size,
            node_name: self.cfg.name.clone(),
            peer_name: self.cfg.peer_name.clone(),
            role: wire::ROLE_PRIMARY,
            disk_state: wire::DISK_UP_TO_DATE,
            generations: wire::Generations {
                current: self.sb.gen_current.0,
                bitmap_base: self.sb.gen_bitmap_base.0,
                history: [self.sb.gen_history[0].0, self.sb.gen_history[1].0],
            },
            capabilities: caps::ZSTD,
            first_seq: self.engine.next_seq().0,
            changed_blocks: self.engine.dirty().dirty_count().0,
            promoted_at_s: self.sb.promoted_at_s,
        }
    }

    fn engine_size(&self) -> u64 {
        self.shared.size_bytes
    }

    fn status(&self) -> StatusDoc {
        let m = &self.shared.metrics;
        let lag = self.engine.lag();
        let mut doc = StatusDoc::build(
            &self.cfg,
            Role::Primary,
            m,
            self.session.as_ref().map(|s| {
                // The peer's disk as this node knows it now: Inconsistent while a resync
                // runs, UpToDate once streaming without one, else what it said at the handshake.
                let disk = if self.engine.resync_progress().is_some() {
                    "Inconsistent".to_string()
                } else if s.synced {
                    "UpToDate".to_string()
                } else {
                    disk_state_name(s.peer.disk_state)
                };
                (s.peer.node_name.clone(), disk)
            }),
            self.sb.disk_state,
            lag.writes,
            lag.bytes,
            self.engine.dirty().dirty_count(),
            self.engine.resync_progress().map(|p| {
                let elapsed_s = self
                    .resync_started
                    .map_or(0.0, |t| t.elapsed().as_secs_f64());
                (p.shipped_blocks, p.total_blocks, elapsed_s)
            }),
            self.sb.volume_id,
            self.sb.gen_current,
        );
        doc.generations = Some(control::GenerationsStatus::of(&self.sb));
        doc.handshake = self
            .shared
            .handshake
            .lock()
            .expect("handshake lock")
            .clone();
        doc.verify = self.verify_status();
        doc
    }

    /// Final local flush, Goodbye, then persist what may differ and mark a clean shutdown.
    async fn finish(mut self) -> Result<(), AgentError> {
        if let Err(e) = self.volume.flush().await {
            tracing::error!(
                "final flush of the volume failed: {e}; the next start resyncs everything"
            );
            return Err(AgentError::Refused(format!("final flush failed: {e}")));
        }
        if let Some(s) = self.session.take() {
            let _ = s.tx.send(Frame {
                seq: 0,
                msg: Message::Goodbye,
                payload: Payload::empty(),
            });
        }
        let bm = self.engine.out_of_sync();
        let dirty = bm.dirty_count();
        self.sb.clean_shutdown = true;
        self.meta.persist_bitmap(&mut self.sb, &bm)?;
        tracing::info!(
            out_of_sync_blocks = dirty.0,
            "metadata persisted; clean shutdown"
        );
        if let Some(d) = self.draining.take() {
            let _ = d.reply.send(d.outcome.unwrap_or_default());
        }
        Ok(())
    }
}

fn disk_state_name(code: u8) -> String {
    match code {
        wire::DISK_UP_TO_DATE => "UpToDate",
        wire::DISK_INCONSISTENT => "Inconsistent",
        wire::DISK_OUTDATED => "Outdated",
        wire::DISK_NEW => "New",
        _ => "Unknown",
    }
    .to_string()
}

pub(crate) fn is_all_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(8);
    let tail_zero = words.remainder().iter().all(|&b| b == 0);
    tail_zero && words.all(|w| u64::from_ne_bytes(w.try_into().expect("8-byte chunk")) == 0)
}

struct PrimaryControl {
    cmd_tx: mpsc::Sender<Cmd>,
    metrics: Arc<Metrics>,
    /// nbd (issue 13): `checkpoint-create/list/remove`.
    checkpoints: Arc<crate::checkpoint::CheckpointStore>,
}

impl ControlHandler for PrimaryControl {
    fn status(&self) -> control::BoxFuture<Option<StatusDoc>> {
        let tx = self.cmd_tx.clone();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            tx.send(Cmd::Status { reply }).await.ok()?;
            rx.await.ok()
        })
    }
    fn other(&self, request: ControlRequest) -> control::BoxFuture<ControlReply> {
        // nbd (issue 13): checkpoint commands are answered by the checkpoint store.
        if crate::checkpoint::CONTROL_COMMANDS.contains(&request.cmd.as_str()) {
            let checkpoints = self.checkpoints.clone();
            return Box::pin(
                async move { crate::checkpoint::control(&checkpoints, &request).await },
            );
        }
        let tx = self.cmd_tx.clone();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let cmd = match request.cmd.as_str() {
                "verify" => Cmd::Verify {
                    repair: request.flag("repair"),
                    rate_bytes_per_s: request.number("rate"),
                    reply,
                },
                "verify-result" => Cmd::VerifyResult { reply },
                _ => {
                    return request.unknown(&[
                        "promote",
                        "demote",
                        "verify",
                        "verify-result",
                        // nbd (issue 13)
                        "checkpoint-create",
                        "checkpoint-list",
                        "checkpoint-remove",
                    ]);
                }
            };
            if tx.send(cmd).await.is_err() {
                return ControlReply::error("agent is shutting down".into());
            }
            rx.await
                .unwrap_or_else(|_| ControlReply::error("agent is shutting down".into()))
        })
    }
    fn metrics(&self) -> Option<Arc<Metrics>> {
        Some(self.metrics.clone())
    }
}

/// Dial the secondary, handshake, and run sessions until `stop`.
async fn connector(
    cfg: Arc<NodeConfig>,
    security: Security,
    cmd_tx: mpsc::Sender<Cmd>,
    peer_tx: mpsc::UnboundedSender<PeerEvent>,
    shared: Arc<Shared>,
    mut inbound_rx: mpsc::Receiver<Inbound>,
    stop: CancellationToken,
) {
    let metrics = shared.metrics.clone();
    let peer_addr: SocketAddr = cfg.peer.expect("validated");
    let mut backoff = Backoff::new(100, 5_000);
    let mut id = 0u64;
    let mut last_log: Option<Instant> = None;
    // A secondary that dialed this node while it waited between attempts.
    let mut waiting: Option<Inbound> = None;
    while !stop.is_cancelled() {
        let attempt = async {
            let (rd, wr) = match waiting.take() {
                Some(i) => (i.rd, i.wr),
                None => tokio::select! {
                    s = transport::connect(peer_addr, &security, cfg.connect_timeout_ms) => {
                        let (rd, wr) = s.map_err(|e| e.to_string())?.into_split();
                        (BufReader::with_capacity(256 << 10, rd), wr)
                    }
                    Some(i) = inbound_rx.recv() => (i.rd, i.wr),
                },
            };
            let (reply, rx) = oneshot::channel();
            cmd_tx
                .send(Cmd::HelloInfo { reply })
                .await
                .map_err(|_| "agent stopping".to_string())?;
            let hello = rx.await.map_err(|_| "agent stopping".to_string())?;
            handshake(rd, wr, hello, &cfg).await
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = stop.cancelled() => break,
        };
        let (rd, wr, welcome) = match result {
            Ok(x) => x,
            Err(reason) if reason.contains(crate::agent::ALREADY_CONNECTED) => {
                // The secondary is dialing this node at the same moment; its
                // connection arrives on the listener.
                tracing::debug!(peer = %peer_addr, "{reason}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    Some(i) = inbound_rx.recv() => { waiting = Some(i); continue }
                    _ = stop.cancelled() => break,
                }
            }
            Err(reason) => {
                metrics.set_error(reason.clone());
                if reason.contains("refused the connection") {
                    shared.set_handshake(format!("refused: {reason}"));
                }
                if last_log.is_none_or(|t| t.elapsed() >= RETRY_LOG_INTERVAL) {
                    tracing::warn!(peer = %peer_addr, "cannot connect to secondary: {reason}; retrying with backoff");
                    last_log = Some(Instant::now());
                } else {
                    tracing::debug!(peer = %peer_addr, "cannot connect to secondary: {reason}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    Some(i) = inbound_rx.recv() => { waiting = Some(i); continue }
                    _ = stop.cancelled() => break,
                }
            }
        };
        last_log = None;
        id += 1;
        let started = Instant::now();
        let plan = welcome.needs;
        let (tx, rx) = mpsc::unbounded_channel();
        let (hb_tx, hb_rx) = mpsc::channel(8);
        if peer_tx
            .send(PeerEvent::Up {
                plan,
                id,
                tx,

                peer: welcome,
            })
            .is_err()
        {
            break;
        }
        let mut writer = tokio::spawn(session_writer(wr, rx, hb_rx, cfg.heartbeat_interval_ms));
        let mut reader = tokio::spawn(session_reader(
            rd,
            id,
            peer_tx.clone(),
            hb_tx,
            cfg.peer_timeout_ms,
        ));
        let reason = loop {
            tokio::select! {
                r = &mut reader => { writer.abort(); break r.unwrap_or_else(|e| format!("reader task: {e}")) }
                r = &mut writer => {
                    // The writer ends when the owner drops the session or the link breaks;
                    // give the reader a moment to see the peer's Goodbye/EOF.
                    let r = r.unwrap_or_else(|e| format!("writer task: {e}"));
                    let _ = tokio::time::timeout(Duration::from_millis(500), &mut reader).await;
                    reader.abort();
                    break r;
                }
                // Both nodes dial: the secondary's own attempt while a session runs.
                Some(mut i) = inbound_rx.recv() => {
                    tokio::spawn(async move {
                        crate::agent::send_refusal(&mut i.wr, crate::agent::ALREADY_CONNECTED).await;
                    });
                }
            }
        };
        if stop.is_cancelled() {
            tracing::info!(session = id, "session with secondary ended: {reason}");
        } else {
            tracing::warn!(session = id, "session with secondary ended: {reason}");
        }
        let _ = peer_tx.send(PeerEvent::Down { id, reason });
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            Some(i) = inbound_rx.recv() => waiting = Some(i),
            _ = stop.cancelled() => break,
        }
    }
}

/// A connection the secondary dialed to this node, its Hello already read.
struct Inbound {
    rd: BufReader<PeerReadHalf>,
    wr: PeerWriteHalf,
}

/// Accept connections on this primary's replication address (both nodes listen and
/// dial). The dialer's Hello says its role: this node's secondary is handed to the
/// connector, which runs the handshake as if it had dialed; another primary is
/// refused with both generations named (a split brain in the making, or two nodes
/// promoted by mistake). Both sides log the reason.
async fn answer_dialers(
    listener: transport::PeerListener,
    cfg: Arc<NodeConfig>,
    cmd_tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    inbound_tx: mpsc::Sender<Inbound>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        let Ok(stream) = stream else { continue };
        let cfg = cfg.clone();
        let cmd_tx = cmd_tx.clone();
        let shared = shared.clone();
        let inbound_tx = inbound_tx.clone();
        tokio::spawn(async move {
            let peer_addr = stream.peer_addr();
            let (rd, mut wr) = stream.into_split();
            let mut rd = BufReader::with_capacity(256 << 10, rd);
            let mut scratch = BytesMut::new();
            let first = tokio::time::timeout(
                Duration::from_millis(cfg.connect_timeout_ms),
                wire::read_frame(&mut rd, &mut scratch),
            )
            .await;
            if let Ok(Ok(Frame {
                msg: Message::Hello(h),
                ..
            })) = &first
                && h.role == wire::ROLE_SECONDARY
            {
                if h.node_name != cfg.peer_name {
                    let reason = format!(
                        "peer calls itself '{}' but '{}' was expected (--peer-name)",
                        h.node_name, cfg.peer_name
                    );
                    tracing::warn!(peer = %peer_addr, "refusing a connection: {reason}");
                    crate::agent::send_refusal(&mut wr, &reason).await;
                    return;
                }
                tracing::debug!(peer = %peer_addr, "the secondary dialed this node");
                if let Err(
                    mpsc::error::TrySendError::Full(mut i)
                    | mpsc::error::TrySendError::Closed(mut i),
                ) = inbound_tx.try_send(Inbound { rd, wr })
                {
                    crate::agent::send_refusal(&mut i.wr, crate::agent::ALREADY_CONNECTED).await;
                }
                return;
            }
            let (reply, rx) = oneshot::channel();
            if cmd_tx.send(Cmd::HelloInfo { reply }).await.is_err() {
                return;
            }
            let Ok(mine) = rx.await else { return };
            let reason = match first {
                Ok(Ok(Frame {
                    msg: Message::Hello(h),
                    ..
                })) => {
                    let theirs = crate::agent::gen_info_of(&h);
                    let ours = crate::agent::gen_info_of(&mine);
                    let split = crate::engine::generations::decide(&ours, &theirs)
                        == crate::engine::generations::Decision::SplitBrain;
                    format!(
                        "{}both nodes are primary: {} has generation {} ({} blocks changed), {} has generation {} ({} blocks changed). \
                         Two primaries are never paired: demote one (tandem demote); if both wrote, resolve the split brain on the one whose changes are discarded (tandem resolve --discard-local)",
                        if split { "split brain: " } else { "" },
                        cfg.name,
                        ours.current,
                        ours.changed_blocks,
                        h.node_name,
                        theirs.current,
                        theirs.changed_blocks
                    )
                }
                Ok(Ok(_)) => "expected Hello".to_string(),
                Ok(Err(e)) => format!("reading Hello: {e}"),
                Err(_) => "no Hello in time".to_string(),
            };
            tracing::error!(peer = %peer_addr, "refusing a connection: {reason}");
            shared.metrics.set_error(reason.clone());
            // Event (hardening): a dialer's Hello refused (two primaries, split brain).
            shared
                .metrics
                .events
                .emit(crate::metrics::events::EventKind::HandshakeRefused {
                    peer_addr: peer_addr.to_string(),
                    stage: "hello".into(),
                    reason: reason.clone(),
                });
            shared.set_handshake(format!("refused: {reason}"));
            crate::agent::send_refusal(&mut wr, &reason).await;
        });
    }
}

/// Send Hello, read Welcome (G6): any mismatch is refused with both values named.
async fn handshake(
    mut rd: BufReader<PeerReadHalf>,
    mut wr: PeerWriteHalf,
    hello: Hello,
    cfg: &NodeConfig,
) -> Result<(BufReader<PeerReadHalf>, PeerWriteHalf, Welcome), String> {
    crate::agent::send_message(&mut wr, Message::Hello(hello.clone()))
        .await
        .map_err(|e| format!("sending Hello: {e}"))?;
    let mut scratch = BytesMut::new();
    let frame = tokio::time::timeout(
        Duration::from_millis(cfg.connect_timeout_ms),
        wire::read_frame(&mut rd, &mut scratch),
    )
    .await
    .map_err(|_| format!("no answer to Hello within {} ms", cfg.connect_timeout_ms))?
    .map_err(|e| format!("reading Welcome: {e}"))?;
    let welcome = match frame.msg {
        Message::Welcome(w) => w,
        Message::Refuse { reason } => {
            return Err(format!("secondary refused the connection: {reason}"));
        }
        other => {
            return Err(format!(
                "expected Welcome, got message kind {}",
                other.kind()
            ));
        }
    };
    let problem = if welcome.protocol_version != PROTOCOL_VERSION {
        Some(format!(
            "protocol version mismatch: local {PROTOCOL_VERSION}, peer {}; run the same tandem version on both nodes",
            welcome.protocol_version
        ))
    } else if welcome.size_bytes != hello.size_bytes {
        Some(format!(
            "volume size mismatch: local {} bytes, peer {} bytes; resize one side or recreate metadata",
            hello.size_bytes, welcome.size_bytes
        ))
    } else if welcome.block_size != hello.block_size {
        Some(format!(
            "block size mismatch: local {} bytes, peer {} bytes; use the same --block-size on both nodes",
            hello.block_size, welcome.block_size
        ))
    } else if welcome.volume_id != hello.volume_id {
        Some(format!(
            "volume UUID mismatch: local {}, peer {}; these volumes hold unrelated data",
            VolumeId(hello.volume_id),
            VolumeId(welcome.volume_id)
        ))
    } else if welcome.node_name != cfg.peer_name {
        Some(format!(
            "peer calls itself '{}' but '{}' was expected (--peer-name)",
            welcome.node_name, cfg.peer_name
        ))
    } else if welcome.role != wire::ROLE_SECONDARY {
        Some("the peer is not in the secondary role; two primaries cannot be paired (demote one first)".to_string())
    } else {
        None
    };
    if let Some(reason) = problem {
        crate::agent::send_refusal(&mut wr, &reason).await;
        return Err(reason);
    }
    Ok((rd, wr, welcome))
}

/// Write frames in batches: everything queued goes out in one write and one flush.
async fn session_writer(
    mut wr: PeerWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    mut hb_rx: mpsc::Receiver<u64>,
    heartbeat_interval_ms: u64,
) -> String {
    let mut buf = BytesMut::with_capacity(1 << 20);
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_interval_ms));
    let mut nonce = 0u64;
    let mut last_send = Instant::now();
    loop {
        tokio::select! {
            f = rx.recv() => match f {
                None => {
                    let _ = wr.shutdown().await;
                    return "session closed by the agent".into();
                }
                Some(f) => {
                    let mut batch = Batch::default();
                    batch.push(&f, &mut buf);
                    let mut goodbye = matches!(f.msg, Message::Goodbye);
                    while batch.len_bytes < (4 << 20) {
                        match rx.try_recv() {
                            Ok(f) => {
                                goodbye |= matches!(f.msg, Message::Goodbye);
                                batch.push(&f, &mut buf);
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = batch.write(&mut wr, &mut buf).await {
                        return format!("sending to secondary: {e}");
                    }
                    if let Err(e) = wr.flush().await {
                        return format!("sending to secondary: {e}");
                    }
                    last_send = Instant::now();
                    if goodbye {
                        let _ = wr.shutdown().await;
                        return "sent Goodbye".into();
                    }
                }
            },
            Some(n) = hb_rx.recv() => {
                wire::encode_frame(&Frame { seq: 0, msg: Message::HeartbeatReply { nonce: n }, payload: Payload::empty() }, &mut buf);
            }
            _ = heartbeat.tick() => {
                if last_send.elapsed() >= Duration::from_millis(heartbeat_interval_ms) || !buf.is_empty() {
                    nonce += 1;
                    wire::encode_frame(&Frame { seq: 0, msg: Message::Heartbeat { nonce }, payload: Payload::empty() }, &mut buf);
                    if let Err(e) = wr.write_all(&buf).await {
                        return format!("sending heartbeat: {e}");
                    }
                    buf.clear();
                    if let Err(e) = wr.flush().await {
                        return format!("sending heartbeat: {e}");
                    }
                    last_send = Instant::now();
                }
            }
        }
    }
}

/// Frames queued for one write. Small frames are encoded together into one buffer
/// (one TLS record for many acks-sized frames); a payload of 64 KiB or more is not
/// copied but sent as its own slice of a vectored write.
#[derive(Default)]
struct Batch {
    chunks: std::collections::VecDeque<Bytes>,
    len_bytes: usize,
}

impl Batch {
    const SPLIT_PAYLOAD_BYTES: usize = 64 << 10;

    fn push(&mut self, frame: &Frame, buf: &mut BytesMut) {
        let before = buf.len();
        if frame.payload.wire_len() as usize >= Self::SPLIT_PAYLOAD_BYTES {
            let payload = wire::encode_frame_split(frame, buf);
            self.len_bytes += buf.len() - before + payload.len();
            self.chunks.push_back(buf.split().freeze());
            self.chunks.push_back(payload);
        } else {
            wire::encode_frame(frame, buf);
            self.len_bytes += buf.len() - before;
        }
    }

    /// Write everything (what is still in `buf` goes last).
    async fn write(mut self, wr: &mut PeerWriteHalf, buf: &mut BytesMut) -> std::io::Result<()> {
        if !buf.is_empty() {
            self.chunks.push_back(buf.split().freeze());
        }
        while !self.chunks.is_empty() {
            let slices: Vec<std::io::IoSlice<'_>> = self
                .chunks
                .iter()
                .take(64)
                .map(|c| std::io::IoSlice::new(c))
                .collect();
            let mut n = wr.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let front = self
                    .chunks
                    .front_mut()
                    .expect("bytes written come from queued chunks");
                if n >= front.len() {
                    n -= front.len();
                    self.chunks.pop_front();
                } else {
                    bytes::Buf::advance(front, n);
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// Read acknowledgements; a silent peer (no frame within the timeout) is dead.
async fn session_reader(
    mut rd: BufReader<PeerReadHalf>,
    id: u64,
    peer_tx: mpsc::UnboundedSender<PeerEvent>,
    hb_tx: mpsc::Sender<u64>,
    peer_timeout_ms: u64,
) -> String {
    let mut scratch = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(
            Duration::from_millis(peer_timeout_ms),
            wire::read_frame(&mut rd, &mut scratch),
        )
        .await
        {
            Err(_) => {
                return format!("secondary silent for {peer_timeout_ms} ms (heartbeat timeout)");
            }
            Ok(Err(wire::WireError::Closed)) => return "secondary closed the connection".into(),
            Ok(Err(e)) => return format!("receiving from secondary: {e}"),
            Ok(Ok(f)) => f,
        };
        let ev = match frame.msg {
            Message::Applied { seq } => PeerEvent::Applied { id, seq: Seq(seq) },
            Message::HashReply { seq, mismatched } => PeerEvent::HashReply {
                id,
                seq: Seq(seq),
                mismatched,
            },
            Message::Durable { through_seq } => PeerEvent::Durable {
                id,
                through: Seq(through_seq),
            },
            Message::Heartbeat { nonce } => {
                let _ = hb_tx.try_send(nonce);
                continue;
            }
            Message::HeartbeatReply { .. } => continue,
            Message::Goodbye => return "secondary said Goodbye".into(),
            Message::Refuse { reason } => {
                return format!("secondary stopped the session: {reason}");
            }
            other => return format!("unexpected message kind {} from secondary", other.kind()),
        };
        if peer_tx.send(ev).is_err() {
            return "agent stopping".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_all_zero;

    #[test]
    fn compression_steps_aside_for_incompressible_data_and_comes_back() {
        use super::AdaptiveCompression;
        use bytes::Bytes;
        let c = AdaptiveCompression::new(1);
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let random: Vec<u8> = (0..4096).map(|_| rng.r#gen()).collect();
        let text = Bytes::from(b"tandem ".repeat(600));
        for _ in 0..AdaptiveCompression::STREAK {
            assert!(!c.prepare(Bytes::from(random.clone())).is_compressed());
        }
        // Now in a raw run: even compressible data goes raw until the run ends.
        assert!(!c.prepare(text.clone()).is_compressed());
        for _ in 1..AdaptiveCompression::SKIP {
            c.prepare(text.clone());
        }
        assert!(c.prepare(text.clone()).is_compressed());
        for _ in 0..100 {
            assert!(
                c.prepare(text.clone()).is_compressed(),
                "compressible data keeps compressing"
            );
        }
    }

    #[test]
    fn zero_detection_checks_every_byte() {
        assert!(is_all_zero(&[0u8; 4099]));
        for i in [0usize, 7, 8, 4095, 4098] {
            let mut v = vec![0u8; 4099];
            v[i] = 1;
            assert!(!is_all_zero(&v), "byte {i}");
        }
    }
}
