//! The primary agent: NBD export → engine → local volume ∥ peer link.
//!
//! Tasks:
//! - the **owner** task holds the [`PrimaryEngine`]; it carries out the engine's
//!   actions and decides nothing itself (every decision is the engine's,
//!   engine/primary);
//! - the NBD server's request tasks hand requests to the owner (a bounded
//!   channel) and wait for the answer;
//! - local I/O runs inline (buffered writes, a page-cache copy) or in spawned
//!   tasks that report back to the owner;
//! - the metadata thread makes activity-log, bitmap and superblock writes durable
//!   off the owner's path (agent/metawork.rs);
//! - the **connector** dials the secondary with backoff (or takes the
//!   secondary's own dial from the listener), runs the handshake (G6, G7), then
//!   an encoder (compression, in parallel), a batching writer and a reader for
//!   the session (agent/link.rs).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::BufReader;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::control::{self, ControlHandler, ControlReply, ControlRequest, StatusDoc};
use crate::agent::link::{self, FrameReader, LinkError};
use crate::agent::metawork::{MetaDone, MetaJob, MetaWorker};
use crate::agent::spill::{SpillDone, SpillJob, SpillWorker}; // wan
use crate::agent::{AgentError, RETRY_LOG_INTERVAL, RoleContext, errno_of, security_for};
use crate::config::NodeConfig;
use crate::engine::primary::{
    self, Action, Errno, LocalFlushId, Mode, Note, OpKind, Outgoing, PrimaryEngine, ReadResult,
};
use crate::engine::recovery;
use crate::frontend::{ExportBackend, IoFuture, NbdAddress, NbdExport, NbdServer};
use crate::metrics::Metrics;
use crate::transport::{self, Backoff, PeerReadHalf, PeerWriteHalf, Security};
use crate::types::{BlockCount, BlockIndex, ByteRange, Generation, Role, Seq, VolumeId};
use crate::volume::Volume;
use crate::wire::{self, Frame, Hello, Message, PROTOCOL_VERSION, Payload, Welcome, caps};

mod verify;
// ha (issue 12): online grow.
mod grow;

/// Reply channel of one client request.
type Reply = oneshot::Sender<Result<(), Errno>>;

/// The engine as this agent runs it: tokens are reply channels, data is bytes
/// (write payloads, read data, concatenated 32-byte block hashes).
type Engine = PrimaryEngine<Reply, Bytes>;
type Actions = Vec<Action<Reply, Bytes>>;

/// What the agent tells its caller once it serves.
#[derive(Clone)]
pub struct PrimaryReady {
    pub nbd: NbdAddress,
    pub metrics: Arc<Metrics>,
}

/// How the primary role ended.
#[derive(Debug)]
pub enum Stopped {
    /// Stopped (shutdown or demotion); the text says what the stop did.
    Done(String),
    /// A demotion without force could not drain to the peer: the role stays
    /// primary (the node restarts it).
    DemotionRefused(String),
}

/// Compression that gets out of the way of data that does not compress (random,
/// encrypted, already compressed): zstd costs ~9 µs per 4 KiB of random data and
/// saved nothing on such workloads (bench: 42% of the primary's CPU on fio's
/// data). After `STREAK` payloads in a row that shrink by less than 1/8, the next
/// `SKIP` go out raw, then compression is tried again. Every payload still
/// carries the crc32 of its bytes (G5).
pub(crate) struct AdaptiveCompression {
    level: i32,
    streak: AtomicU32,
    skip: AtomicU32,
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

/// ha: a failed fencing command before writing alone is retried this often
/// (writes stay frozen meanwhile).
const FENCE_RETRY: Duration = Duration::from_secs(5);

enum Cmd {
    Submit {
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        data: Option<Bytes>,
        reply: Reply,
    },
    Flush {
        reply: Reply,
    },
    /// The Hello this node sends, and, when `suspected` asks for it (a walk of
    /// the bitmaps: only for the two-primaries message, not every dial), how many
    /// of its changed blocks are only suspected (active extents at a crash).
    HelloInfo {
        suspected: bool,
        reply: oneshot::Sender<(Hello, u64)>,
    },
    Status {
        reply: oneshot::Sender<StatusDoc>,
    },
    /// Drain to the peer, persist, stop; the reply says how the drain went.
    Shutdown {
        demote: bool,
        force: bool,
        reply: oneshot::Sender<Stopped>,
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
    /// ha (issue 12 item 2): the fencing command run before the first write
    /// without the peer ended.
    FenceDone {
        result: Result<(), String>,
    },
    /// ha: `tandem disconnect` (true) / `tandem connect` (false).
    HoldLink {
        down: bool,
        reply: oneshot::Sender<ControlReply>,
    },
    /// ha (issue 12): `tandem resize --size` (online grow).
    Resize {
        size_bytes: u64,
        reply: oneshot::Sender<ControlReply>,
    },
    /// ha: change the resync rate and/or pause or resume the resync, live.
    SetResync {
        rate_bytes_per_s: Option<u64>,
        paused: Option<bool>,
        reply: oneshot::Sender<ControlReply>,
    },
}

enum IoDone {
    Local {
        seq: Seq,
        result: Result<(), Errno>,
    },
    Read {
        seq: Seq,
        result: Result<ReadResult<Bytes>, Errno>,
    },
    Flush {
        id: LocalFlushId,
        result: Result<(), Errno>,
    },
}

enum PeerEvent {
    Up {
        id: u64,
        tx: mpsc::Sender<ToPeer>,
        peer: Box<Welcome>,
    },
    Applied {
        id: u64,
        seq: Seq,
    },
    Durable {
        id: u64,
        through: Seq,
    },
    SectionDone {
        id: u64,
        through: Seq,
    },
    HashReply {
        id: u64,
        seq: Seq,
        mismatched: Vec<u32>,
    },
    Consistent {
        id: u64,
        seq: Seq,
        at_ms: u64,
    },
    /// ha (issue 12): the answer to `Grow`.
    Grown {
        id: u64,
        size_bytes: u64,
        error: String,
    },
    Down {
        id: u64,
        reason: String,
    },
}

/// What the owner hands a session's encoder.
enum ToPeer {
    Frame(Outgoing<Bytes>),
    /// The last frame: `outdated` when the peer does not hold every write.
    Goodbye {
        outdated: bool,
    },
    /// ha (issue 12): online grow, in frame order.
    Grow {
        size_bytes: u64,
    },
}

struct Session {
    id: u64,
    tx: mpsc::Sender<ToPeer>,
    peer: Welcome,
    /// The secondary's consistent point as it last reported it: (seq, at_ms).
    consistent: Option<(Seq, u64)>,
}

struct Shared {
    cmd_tx: mpsc::Sender<Cmd>,
    /// The size the export serves; grows (ha, issue 12: `tandem resize`) once
    /// both nodes recorded the new size.
    size_bytes: std::sync::atomic::AtomicU64,
    compress: Arc<AdaptiveCompression>,
    metrics: Arc<Metrics>,
    volume: Volume,
    /// The last handshake decision or refusal, for status.
    handshake: std::sync::Mutex<Option<String>>,
    /// ha: `tandem disconnect` holds the link down until `tandem connect`.
    held_down: tokio::sync::watch::Sender<bool>,
    /// ha (issue 12): the NBD checkpoints, grown with the volume (set once
    /// opened).
    checkpoints: std::sync::OnceLock<Arc<crate::checkpoint::CheckpointStore>>,
}

impl Shared {
    fn set_handshake(&self, text: String) {
        *self.handshake.lock().expect("handshake lock") = Some(text);
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

/// The engine's settings from the resource's.
fn engine_config(cfg: &NodeConfig, size_bytes: u64) -> primary::Config {
    let mut c = primary::Config::new(cfg.mode, size_bytes, cfg.block_size);
    c.peer_loss = match cfg.on_disconnect {
        crate::config::OnDisconnect::Block => primary::PeerLoss::Block,
        crate::config::OnDisconnect::Degrade => primary::PeerLoss::Degrade,
    };
    c.window_bytes_max = cfg.queue_bytes_max;
    c.window_writes_max = cfg.queue_writes_max as u64;
    c.resync_chunk_bytes = (1u64 << 20)
        .min(cfg.queue_bytes_max / 4)
        .max(cfg.block_size as u64);
    c.resync_rate_bytes_per_s = cfg.resync_rate_bytes_per_s;
    c
}

/// Serve the primary role until `ctx.stop` is cancelled; then drain and persist.
pub async fn serve(
    cfg: Arc<NodeConfig>,
    ctx: RoleContext,
    ready: Option<oneshot::Sender<PrimaryReady>>,
) -> Result<Stopped, AgentError> {
    let shutdown = ctx.stop.clone();
    let (volume, opened, _) = crate::agent::open_node(&cfg, Role::Primary)?;
    let size_bytes = volume.size_bytes();
    // A kill -9 leaves the previous run's writes in the page cache: make them
    // durable before anything relies on the metadata (engine/recovery.rs).
    volume
        .flush()
        .await
        .map_err(|e| AgentError::Refused(format!("flushing the volume at start failed: {e}")))?;
    if opened.superblock.poisoned {
        // Issue 9 item 5: what a failed writeback left in the page cache is not
        // on the disk; read the disk itself from here on.
        crate::agent::drop_cached_pages(&cfg.volume).map_err(|e| {
            AgentError::Refused(format!(
                "dropping the cached pages of {} (a disk that failed before) failed: {e}",
                cfg.volume.display()
            ))
        })?;
    }
    let mut meta = opened.store;
    if opened.created {
        tracing::info!(meta = %cfg.meta.display(), volume_id = %opened.superblock.volume_id, generation = %opened.superblock.gen_current, "created metadata for a new primary volume");
    }
    // nbd (issue 13): a node that was a secondary had its volume written by
    // replication, which no checkpoint marked.
    let (was_secondary, volume_id) = (
        opened.superblock.role == Role::Secondary,
        opened.superblock.volume_id,
    );
    // wan (issue 11 item 5): writes still in the spill log may not be on the
    // secondary: their blocks join the bitmap before anything else; the log is
    // emptied once the bitmap below is durable.
    let (mut spill_log, spilled) = crate::agent::spill::open(
        &cfg.spill_log,
        volume_id,
        cfg.block_size,
        if cfg.mode == Mode::Async {
            cfg.spill_bytes
        } else {
            0
        },
        cfg.queue_bytes_max,
    )
    .map_err(|e| AgentError::Refused(e.to_string()))?;
    let mut start_bitmap = opened.bitmap.clone();
    if !spilled.is_empty() {
        let bytes: u64 = spilled.iter().map(|r| r.len).sum();
        tracing::warn!(
            records = spilled.len(),
            bytes,
            "the spill log holds writes of the previous run: their blocks are resynced"
        );
        for r in &spilled {
            let (a, b) = r.blocks(cfg.block_size);
            start_bitmap.mark(a, b);
        }
    }
    let mut start = recovery::primary_start(
        &opened.superblock,
        &start_bitmap,
        &opened.activity,
        ctx.force,
        crate::agent::unix_now_s(),
    )
    .map_err(|e| AgentError::Refused(e.to_string()))?;
    // scale (issue 11): every copy of the bitmap is 32 MiB of RSS per TiB; the
    // recovered one is in `start` now.
    drop(opened.bitmap);
    if let Some(old) = start.promoted_from {
        tracing::warn!(old = %old, new = %start.sb.gen_current, base = %start.sb.gen_bitmap_base, "node was secondary; promoting with a new generation");
    }
    let bs = cfg.block_size as u64;
    match &start.recovery {
        recovery::Recovery::Clean { out_of_sync_blocks } => {
            tracing::info!(out_of_sync_blocks, "clean start")
        }
        recovery::Recovery::Crash {
            active_extents,
            compare_blocks,
            send_blocks,
        } => tracing::warn!(
            active_extents,
            compare_bytes = compare_blocks * bs,
            send_bytes = send_blocks * bs,
            "previous run stopped uncleanly: resyncing the bitmap, and comparing the activity log's extents by hash"
        ),
        recovery::Recovery::Poisoned { compare_blocks } => tracing::warn!(
            compare_bytes = compare_blocks * bs,
            "this disk failed a write or fdatasync before (poisoned); started with --force: every block will be compared with the peer by hash"
        ),
        recovery::Recovery::Unknown {
            bitmap_valid,
            activity_log_intact,
        } => tracing::warn!(
            bitmap_valid,
            activity_log_intact,
            "previous run stopped uncleanly and its metadata cannot say what changed: every block will be compared by hash"
        ),
    }
    // Record the recovered set before serving: the bitmap now covers everything the
    // old activity log did, so the log starts empty.
    let mut sb = start.sb.clone();
    meta.persist_bitmap(&mut sb, &start.covered())?;
    meta.write_activity(cfg.al_extent_bytes, &[])?;
    // wan: the bitmap now covers the spill log's records.
    let spill_engine_bytes = if cfg.mode == Mode::Async {
        cfg.spill_bytes
    } else {
        0
    };
    spill_log
        .reset_after_persist(spill_engine_bytes)
        .map_err(|e| AgentError::Refused(e.to_string()))?;

    let generation = sb.gen_current;
    let metrics = ctx.metrics.clone().unwrap_or_default();
    metrics.reset_role_state();
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let shared = Arc::new(Shared {
        cmd_tx: cmd_tx.clone(),
        size_bytes: size_bytes.into(),
        compress: Arc::new(AdaptiveCompression::new(cfg.compress_level)),
        metrics: metrics.clone(),
        volume: volume.clone(),
        handshake: std::sync::Mutex::new(None),
        held_down: tokio::sync::watch::Sender::new(false),
        checkpoints: std::sync::OnceLock::new(), // ha (issue 12)
    });
    // scale: moved, not copied (see above).
    let dirty = std::mem::replace(
        &mut start.dirty,
        crate::bitmap::DirtyBitmap::new(BlockCount(0)),
    );
    let mut engine_cfg = engine_config(&cfg, size_bytes);
    engine_cfg.spill_bytes_max = if spill_log.is_open() {
        spill_engine_bytes
    } else {
        0
    }; // wan
    let mut engine = Engine::new(engine_cfg, dirty, Seq(1));
    engine.enable_activity(crate::engine::activity::ActiveSet::new(
        cfg.al_extent_bytes,
        cfg.al_extents_max,
    ));
    engine.set_generation_shared_with_peer(sb.gen_bitmap_base == Generation::NONE);
    // scale (issue 11): image files say where their holes are; resyncs send those
    // as zero chunks without reading them.
    if !volume.is_block_device() {
        engine.enable_hole_probes();
    }
    let mut cursor = BlockIndex(0);
    while let Some((first, n)) = start.verify.next_dirty_run(cursor, BlockCount(u64::MAX)) {
        engine.mark_verify(first, BlockIndex(first.0 + n.0));
        cursor = BlockIndex(first.0 + n.0);
    }
    drop(start); // scale: its bitmaps are in the engine
    let (meta_tx, meta_rx) = mpsc::unbounded_channel();
    let worker = MetaWorker::start(meta, sb.clone(), cfg.al_extent_bytes, meta_tx);
    let (peer_tx, peer_rx) = mpsc::channel(4096);
    let (io_tx, io_rx) = mpsc::unbounded_channel();
    let (spill_tx, spill_rx) = mpsc::unbounded_channel(); // wan
    let spill = spill_log.start(spill_tx);
    let owner = Owner {
        spill,
        cfg: cfg.clone(),
        engine,
        volume,
        meta: Some(worker),
        sb,
        session: None,
        io_tx,
        shared: shared.clone(),
        draining: None,
        resync_log: Instant::now(),
        resync_started: None,
        shipped_at: VecDeque::new(),
        verify: verify::VerifyDriver::new(),
        started: Instant::now(),
        ahead_since: None,
        pending_generation: false,
        peer_consistent: None, // dr (issue 10)
        grow: None,            // ha (issue 12)
    };
    let owner_task = tokio::spawn(owner.run(cmd_rx, io_rx, peer_rx, meta_rx, spill_rx));

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
    let _ = shared.checkpoints.set(checkpoints.clone()); // ha (issue 12)
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
    if let Some(d) = demote {
        // A demotion lets attached clients finish (unmount, disconnect) for a bounded time.
        let clients = server.connections();
        let deadline = tokio::time::Instant::now() + d.wait;
        if clients > 0 {
            tracing::info!(
                clients,
                wait_s = d.wait.as_secs(),
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
                d.wait.as_secs()
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
    let stopped = if cmd_tx
        .send(Cmd::Shutdown {
            demote: demote.is_some(),
            force: demote.is_some_and(|d| d.force),
            reply: tx,
        })
        .await
        .is_ok()
    {
        rx.await.ok()
    } else {
        None
    };
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
    Ok(match stopped {
        Some(Stopped::Done(s)) => {
            summary.push(s);
            Stopped::Done(summary.join("; "))
        }
        Some(Stopped::DemotionRefused(s)) => Stopped::DemotionRefused(s),
        None => Stopped::Done(summary.join("; ")),
    })
}

/// The export the NBD server sees: reads go straight to the volume, writes and
/// flushes through the owner (the engine decides when they complete).
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
            let (reply, rx) = oneshot::channel();
            let cmd = Cmd::Submit {
                kind,
                range: ByteRange::new(offset, len),
                fua,
                data,
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
        self.shared
            .size_bytes
            .load(std::sync::atomic::Ordering::Acquire)
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
    demote: bool,
    force: bool,
    reply: oneshot::Sender<Stopped>,
}

struct Owner {
    cfg: Arc<NodeConfig>,
    engine: Engine,
    volume: Volume,
    meta: Option<MetaWorker>,
    /// The superblock as this node means it (the metadata thread writes it).
    sb: crate::meta::Superblock,
    session: Option<Session>,
    io_tx: mpsc::UnboundedSender<IoDone>,
    shared: Arc<Shared>,
    draining: Option<Draining>,
    resync_log: Instant,
    resync_started: Option<Instant>,
    /// Client writes shipped in this session and when, until a Durable covers them
    /// (replication latency). Bounded by the replication window.
    shipped_at: VecDeque<(Seq, Instant)>,
    /// Bookkeeping of the online verify for status (primary/verify.rs).
    verify: verify::VerifyDriver,
    started: Instant,
    ahead_since: Option<Instant>,
    /// A new generation is being written; writes wait for it.
    pending_generation: bool,
    /// wan (issue 11 item 5): the spill log's thread (async mode with a spill log).
    spill: Option<SpillWorker>,
    /// dr (issue 10): the DR copy's consistent point as the secondary last
    /// reported it (kept after the session ends: what a promotion there serves).
    peer_consistent: Option<(Seq, u64)>,
    /// ha (issue 12): a resize under way.
    grow: Option<grow::Pending>,
}

impl Owner {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::Receiver<Cmd>,
        mut io_rx: mpsc::UnboundedReceiver<IoDone>,
        mut peer_rx: mpsc::Receiver<PeerEvent>,
        mut meta_rx: mpsc::UnboundedReceiver<MetaDone>,
        mut spill_rx: mpsc::UnboundedReceiver<SpillDone>,
    ) -> Result<(), AgentError> {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                biased;
                Some(done) = io_rx.recv() => self.on_io(done, &mut out),
                Some(done) = meta_rx.recv() => self.on_meta(done, &mut out),
                Some(done) = spill_rx.recv() => self.on_spill(done, &mut out), // wan
                Some(ev) = peer_rx.recv() => self.on_peer(ev, &mut out),
                cmd = cmd_rx.recv(), if self.draining.is_none() => match cmd {
                    Some(cmd) => self.on_cmd(cmd, &mut out),
                    None => break,
                },
                _ = tick.tick() => {
                    let now = self.now_ms();
                    self.engine.tick(now, &mut out);
                    self.act(&mut out);
                }
            }
            self.publish_gauges();
            self.pump_verify();
            if self.draining.is_some() && self.drain_over() {
                break;
            }
        }
        self.finish(&mut meta_rx).await
    }

    fn now_ms(&self) -> u64 {
        crate::agent::unix_now_ms()
    }

    /// Carry out engine actions (more may follow from the ones carried out).
    fn act(&mut self, out: &mut Actions) {
        while !out.is_empty() {
            let batch = std::mem::take(out);
            for action in batch {
                self.act_one(action, out);
            }
        }
    }

    fn act_one(&mut self, action: Action<Reply, Bytes>, out: &mut Actions) {
        match action {
            Action::StartLocal {
                seq,
                kind,
                range,
                fua,
                data,
                hash_unit_bytes,
            } => self.start_local(seq, kind, range, fua, data, hash_unit_bytes),
            Action::Ship(frame) => self.ship(frame, out),
            Action::Complete { token, result } => {
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
            Action::WriteActivityLog {
                active,
                bitmap,
                pages_with_record,
            } => self.meta().send(MetaJob::Activity {
                active,
                bitmap,
                pages_with_record,
            }),
            Action::PersistBitmap { bitmap } => self.meta().send(MetaJob::Bitmap { bitmap }),
            Action::ProbeHoles { offset, len } => self.probe_holes(offset, len, out),
            Action::Poisoned { reason } => {
                tracing::error!(
                    "volume poisoned: {reason}; every further request fails until the agent is restarted after checking the disk"
                );
                self.shared
                    .metrics
                    .set_error(format!("volume poisoned: {reason}"));
                self.shared.metrics.events.push("io-error", reason);
                // Issue 9 item 5: remembered across restarts (recovery refuses to
                // serve this disk again without --force).
                if !self.sb.poisoned {
                    self.sb.poisoned = true;
                    let sb = self.sb.clone();
                    self.meta().send(MetaJob::Superblock { sb });
                }
            }
            Action::StartGenerationAlone => {
                // ha (issue 12 item 2): with a fencing command, the peer is fenced
                // (outdated) first; the writes wait (the engine parks them).
                if self.cfg.fence_peer.is_some() {
                    self.fence_before_writing_alone();
                } else {
                    self.start_generation_alone();
                }
            }
            Action::PeerReachedGeneration => {
                if self.sb.gen_bitmap_base != Generation::NONE {
                    self.sb = recovery::peer_reached_generation(&self.sb);
                    tracing::info!(generation = %self.sb.gen_current, "the peer holds this generation");
                    let sb = self.sb.clone();
                    self.meta().send(MetaJob::Superblock { sb });
                }
            }
            Action::DropSession { fault } => self.drop_session(&fault.to_string(), out),
            Action::Note(note) => self.note(note),
            // wan (issue 11 item 5): the spill log's I/O, in order, on its thread.
            Action::SpillAppend {
                seq,
                kind,
                range,
                fua,
                at_ms,
                data,
            } => {
                Metrics::add(&self.shared.metrics.spilled_bytes, range.len);
                self.spill_job(SpillJob::Append {
                    seq,
                    kind,
                    range,
                    fua,
                    at_ms,
                    data,
                })
            }
            Action::SyncSpill => self.spill_job(SpillJob::Sync),
            Action::ReadSpill { seq } => self.spill_job(SpillJob::Read { seq }),
            Action::ReleaseSpill { through } => self.spill_job(SpillJob::Release { through }),
            Action::ResetSpill => self.spill_job(SpillJob::Reset),
        }
    }

    /// wan: hand a job to the spill thread (the engine only spills when it runs).
    fn spill_job(&self, job: SpillJob) {
        self.spill
            .as_ref()
            .expect("the engine spills only with a spill log")
            .send(job);
    }

    /// wan: a spill-log job finished.
    fn on_spill(&mut self, done: SpillDone, out: &mut Actions) {
        match done {
            SpillDone::Synced(r) => self.engine.spill_synced(r, out),
            SpillDone::Read { seq, result } => self.engine.spill_read_done(seq, result, out),
            SpillDone::Released(r) => self.engine.spill_released(r, out),
        }
        self.act(out);
    }

    fn meta(&self) -> &MetaWorker {
        self.meta
            .as_ref()
            .expect("metadata worker runs until finish")
    }

    fn note(&mut self, note: Note) {
        let bs = self.cfg.block_size as u64;
        let m = &self.shared.metrics;
        match note {
            Note::EnteredAhead {
                lag_writes,
                lag_bytes,
                spill_bytes,
            } => {
                tracing::warn!(
                    lag_writes,
                    lag_bytes,
                    spill_bytes,
                    "replication window (and spill log) full: going ahead, new writes are tracked in the bitmap until the secondary catches up"
                );
                Metrics::add(&m.ahead_episodes, 1);
                self.ahead_since = Some(Instant::now());
                m.events.push(
                    "ahead",
                    format!("window full ({lag_bytes} bytes in flight): going ahead"),
                );
            }
            Note::LeftAhead {
                out_of_sync_blocks,
                ahead_ms,
            } => {
                tracing::info!(
                    out_of_sync_bytes = out_of_sync_blocks * bs,
                    ahead_ms,
                    "secondary caught up: leaving ahead; resyncing what changed meanwhile"
                );
                self.ahead_since = None;
            }
            Note::SectionFull {
                section_bytes,
                peer_stage_bytes,
            } => {
                tracing::info!(
                    section_bytes,
                    peer_stage_bytes,
                    "a resync is running and the writes joining it would take it past what the secondary's journal stages: writes wait for it to end (a larger journal-size there allows more)"
                );
                m.events.push(
                    "section-full",
                    format!("resync section {section_bytes} bytes of {peer_stage_bytes} staged: writes wait for it to end"),
                );
            }
            Note::AheadBudgetFull {
                dirty_bytes,
                budget_bytes,
                peer_stage_bytes,
            } => {
                tracing::info!(
                    dirty_bytes,
                    budget_bytes,
                    peer_stage_bytes,
                    volume_bytes = self.engine.config().size_bytes,
                    "ahead: the out-of-sync blocks reached half of what the secondary's journal stages; writes to other blocks wait for the resync pass (a larger journal-size there allows more)"
                );
                m.events.push(
                    "ahead-budget",
                    format!("{dirty_bytes} bytes out of sync (budget {budget_bytes}): writes to other blocks wait for the resync pass"),
                );
            }
            // wan (issue 11 item 5): once per episode, with figures.
            Note::EnteredSpill {
                lag_writes,
                lag_bytes,
                capacity_bytes,
            } => {
                tracing::info!(
                    lag_writes,
                    lag_bytes,
                    capacity_bytes,
                    "replication window full: spilling writes to the spill log, shipped from there in order (the secondary stays consistent)"
                );
                Metrics::add(&m.spill_episodes, 1);
                m.events.push(
                    "spill",
                    format!("window full ({lag_bytes} bytes in flight): spilling to the spill log"),
                );
            }
            Note::LeftSpill {
                spilled_writes,
                spilled_bytes,
                peak_bytes,
                spill_ms,
            } => tracing::info!(
                spilled_writes,
                spilled_bytes,
                peak_bytes,
                spill_ms,
                "spill log drained: every spilled write is durable on the secondary"
            ),
            Note::SpillFailed { reason } => {
                tracing::error!(
                    "spill log failed: {reason}; spilling is off until the agent restarts (a full window goes ahead)"
                );
                m.events.push("spill-failed", reason);
            }
            Note::Throttling {
                lag_bytes,
                peer_stage_bytes: None,
            } => tracing::info!(
                lag_bytes,
                "replication window full during a resync: writes wait for room so that the secondary reaches a consistent point"
            ),
            Note::Throttling {
                lag_bytes,
                peer_stage_bytes: Some(stage),
            } => tracing::info!(
                lag_bytes,
                peer_stage_bytes = stage,
                volume_bytes = self.engine.config().size_bytes,
                "replication window and spill log full: writes wait for room instead of going ahead (the out-of-sync blocks would exceed half of what the secondary's journal stages; a larger journal-size there allows more)"
            ),
            Note::ResyncStarted { blocks, full } => {
                tracing::info!(
                    blocks = blocks.0,
                    bytes = blocks.0 * bs,
                    full,
                    "resync starts"
                );
                m.resync_total_blocks.store(blocks.0, Ordering::Relaxed);
                m.resync_shipped_blocks.store(0, Ordering::Relaxed);
                if self.resync_started.is_none() {
                    self.resync_started = Some(Instant::now());
                }
            }
            Note::InSync {
                through,
                resynced_blocks,
            } => {
                let took = self
                    .resync_started
                    .take()
                    .map_or(0.0, |t| t.elapsed().as_secs_f64());
                tracing::info!(
                    through = through.0,
                    resynced_blocks,
                    resynced_bytes = resynced_blocks * bs,
                    seconds = format!("{took:.1}"),
                    "secondary in sync: a consistent copy of this node"
                );
                // The event is the typed `resync-done` (Metrics::set_resync, with
                // its block count): one event per fact.
            }
            Note::LocalWriteFailed { seq, range, errno } => tracing::error!(
                seq = seq.0,
                offset = range.offset,
                len = range.len,
                errno,
                "local write failed; range marked for resync"
            ),
        }
    }

    /// Answer a hole probe of the resync (scale, issue 11) at once: the data
    /// ranges of `[offset, offset + len)`, at most `PROBE_RANGES_MAX` of them (the
    /// answer then covers less). A failed lseek answers "all data".
    fn probe_holes(&mut self, offset: u64, len: u64, out: &mut Actions) {
        const PROBE_RANGES_MAX: usize = 4096;
        let bs = u64::from(self.cfg.block_size);
        let mut data = Vec::new();
        let mut covered = len;
        for r in self.volume.allocated_ranges(offset, len, bs) {
            match r {
                Ok(r) if data.len() == PROBE_RANGES_MAX => {
                    covered = r.start - offset;
                    break;
                }
                Ok(r) => data.push(r),
                Err(e) => {
                    tracing::warn!(
                        offset,
                        len,
                        "cannot tell the volume's holes ({e}): reading them"
                    );
                    data = std::iter::once(offset..offset + len).collect();
                    covered = len;
                    break;
                }
            }
        }
        self.engine.holes_probed(offset, covered, &data, out);
    }

    /// Start the local I/O the engine asked for.
    fn start_local(
        &mut self,
        seq: Seq,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        data: Option<Bytes>,
        hash_unit_bytes: u32,
    ) {
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
        let zero_chunk = kind == OpKind::ResyncRead && self.engine.is_zero_chunk(seq);
        let volume = self.volume.clone();
        let tx = self.io_tx.clone();
        let metrics = self.shared.metrics.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let done = match kind {
                OpKind::Write => IoDone::Local {
                    seq,
                    result: volume
                        .write(range.offset, data.expect("write has data"), fua)
                        .await
                        .map_err(|e| errno_of(&e)),
                },
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
                    let result = hash_read(&volume, range, hash_unit_bytes)
                        .await
                        .map(ReadResult::Hashes)
                        .map_err(|e| errno_of(&e));
                    IoDone::Read { seq, result }
                }
                OpKind::ResyncRead => {
                    let result = resync_read(&volume, range, zero_chunk)
                        .await
                        .map_err(|e| errno_of(&e));
                    IoDone::Read { seq, result }
                }
            };
            if matches!(kind, OpKind::Write | OpKind::WriteZeroes | OpKind::Trim) {
                metrics.local_write_latency.record(started.elapsed());
            }
            let _ = tx.send(done);
        });
    }

    /// Hand a frame to the session's encoder.
    fn ship(&mut self, frame: Outgoing<Bytes>, out: &mut Actions) {
        let m = &self.shared.metrics;
        match &frame {
            Outgoing::Write { seq, data, .. } => {
                Metrics::add(&m.replicated_bytes, data.len() as u64);
                self.shipped_at.push_back((*seq, Instant::now()));
            }
            Outgoing::Zeroes { seq, .. } | Outgoing::Trim { seq, .. } => {
                self.shipped_at.push_back((*seq, Instant::now()));
            }
            Outgoing::HashCheck {
                hashes,
                unit_bytes,
                offset,
                ..
            } => {
                // Each 32-byte hash stands for one unit of the volume compared (the
                // last one may end at the volume's end).
                let span = (hashes.len() / 32) as u64 * u64::from(*unit_bytes);
                let compared = span.min(self.volume.size_bytes().saturating_sub(*offset));
                Metrics::add(&m.verified_bytes, compared);
                Metrics::add(
                    &m.verify_wire_bytes,
                    (wire::HEADER_LEN + hashes.len()) as u64,
                );
            }
            _ => {}
        }
        let Some(s) = &self.session else {
            return;
        };
        if let Err(e) = s.tx.try_send(ToPeer::Frame(frame)) {
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => {
                    "the session's send queue is full (the peer does not read)"
                }
                mpsc::error::TrySendError::Closed(_) => "the session's writer stopped",
            };
            self.drop_session(reason, out);
        }
    }

    fn drop_session(&mut self, reason: &str, out: &mut Actions) {
        self.shipped_at.clear();
        self.grow_session_ended(); // ha (issue 12)
        if let Some(s) = self.session.take() {
            let consequence = (self.cfg.mode == Mode::Sync).then(|| {
                if self.cfg.on_disconnect == crate::config::OnDisconnect::Block {
                    "sync mode without a secondary: writes wait until it is back and holds them (on-disconnect = block)"
                } else {
                    "sync mode DEGRADED: without a secondary, writes complete on this node alone and are tracked for resync (on-disconnect = degrade)"
                }
            });
            if reason.starts_with(PEER_REFUSED) {
                // The secondary meets this node's next dial (every few seconds)
                // with the same refusal until an operator acts (journal-size,
                // resync-overflow): the first in full, then a summary per interval.
                crate::ratelog::global().record(
                    "primary.session-refused",
                    crate::ratelog::Level::Warn,
                    || match consequence {
                        Some(c) => format!("session {}: {reason}; {c}", s.id),
                        None => format!("session {}: {reason}", s.id),
                    },
                );
            } else {
                tracing::warn!(session = s.id, "dropping the session: {reason}");
                if let Some(c) = consequence {
                    tracing::warn!("{c}");
                }
            }
            self.shared.metrics.set_error(reason.to_string());
            self.engine.session_ended(out);
            self.shared.metrics.set_connected(false, reason);
        }
    }

    fn on_cmd(&mut self, cmd: Cmd, out: &mut Actions) {
        match cmd {
            Cmd::Submit {
                kind,
                range,
                fua,
                data,
                reply,
            } => {
                let now = self.now_ms();
                self.engine.submit(kind, range, fua, data, reply, now, out);
            }
            Cmd::Flush { reply } => {
                let now = self.now_ms();
                self.engine.flush(reply, now, out);
            }
            Cmd::HelloInfo { suspected, reply } => {
                let suspected = if suspected {
                    self.engine.suspected_blocks().0
                } else {
                    0
                };
                let _ = reply.send((self.hello(), suspected));
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
            // ha (issue 12): online grow.
            Cmd::Resize { size_bytes, reply } => self.start_resize(size_bytes, reply),
            // ha (issue 12 item 4): tandem disconnect / connect.
            Cmd::HoldLink { down, reply } => {
                let was = self.shared.held_down.send_replace(down);
                let message = match (was, down) {
                    (false, true) => {
                        tracing::warn!(
                            "disconnected by an administrator (tandem disconnect): the link stays down until tandem connect"
                        );
                        self.drop_session(
                            "disconnected by an administrator (tandem disconnect)",
                            out,
                        );
                        self.shared.metrics.events.push(
                            "disconnected",
                            "tandem disconnect: the link stays down until tandem connect".into(),
                        );
                        "disconnected: the link stays down until tandem connect; writes are tracked for the resync".to_string()
                    }
                    (true, false) => {
                        tracing::info!("tandem connect: dialing the peer again");
                        self.shared
                            .metrics
                            .events
                            .push("connect", "tandem connect".into());
                        "connecting: the peer is dialed again and resynced".to_string()
                    }
                    (true, true) => "already disconnected".to_string(),
                    (false, false) => {
                        "not disconnected: the link is up or being dialed".to_string()
                    }
                };
                let _ = reply.send(ControlReply::success(
                    serde_json::json!({ "message": message }),
                ));
            }
            // ha (issue 12 item 2): fencing before the first write alone.
            Cmd::FenceDone { result } => match result {
                Ok(()) => {
                    tracing::warn!(peer = %self.cfg.peer_name, "fencing command succeeded: the peer is outdated; writes proceed on this node alone");
                    self.shared.metrics.events.push(
                        "fenced",
                        format!("{} fenced before the first write alone", self.cfg.peer_name),
                    );
                    self.start_generation_alone();
                }
                Err(e) if self.session.is_some() => {
                    tracing::warn!(
                        "fencing before writing alone failed ({e}), but the peer is back: the writes go to it"
                    );
                    self.start_generation_alone();
                }
                Err(e) => {
                    tracing::error!(
                        "fencing before writing alone failed: {e}; writes stay frozen until the fencing command succeeds (retried every {} s) or the peer is back",
                        FENCE_RETRY.as_secs()
                    );
                    self.shared
                        .metrics
                        .set_error(format!("fencing failed, writes frozen: {e}"));
                    self.shared.metrics.events.push("fence-failed", e);
                    let tx = self.shared.cmd_tx.clone();
                    let cfg = self.cfg.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(FENCE_RETRY).await;
                        let cmd = cfg.fence_peer.clone().unwrap_or_default();
                        let result =
                            crate::agent::node::fence_peer(&cfg, &cmd, "write-alone").await;
                        let _ = tx.send(Cmd::FenceDone { result }).await;
                    });
                }
            },
            // ha: runtime resync control (tandem set-resync-rate / pause-sync / resume-sync / adjust).
            Cmd::SetResync {
                rate_bytes_per_s,
                paused,
                reply,
            } => {
                if let Some(rate) = rate_bytes_per_s {
                    self.engine.set_resync_rate(rate);
                }
                if let Some(p) = paused {
                    self.engine.set_resync_paused(p);
                }
                let cfg = self.engine.config();
                let (rate, paused) = (cfg.resync_rate_bytes_per_s, cfg.resync_paused);
                tracing::info!(rate_bytes_per_s = rate, paused, "resync settings changed");
                let out_of_sync_bytes =
                    self.engine.dirty().dirty_count().0 * self.cfg.block_size as u64;
                let message = format!(
                    "resync {} at {}; {out_of_sync_bytes} bytes out of sync",
                    if paused { "paused" } else { "running" },
                    if rate == 0 {
                        "an unlimited rate".to_string()
                    } else {
                        format!("{rate} bytes/s")
                    }
                );
                let _ = reply.send(ControlReply::success(serde_json::json!({
                    "message": message,
                    "resync_rate_bytes_per_s": rate,
                    "resync_paused": paused,
                    "out_of_sync_bytes": out_of_sync_bytes,
                })));
            }
            Cmd::Shutdown {
                demote,
                force,
                reply,
            } => {
                let deadline =
                    tokio::time::Instant::now() + Duration::from_millis(self.cfg.drain_timeout_ms);
                let lag = self.engine.lag();
                tracing::info!(
                    lag_writes = lag.writes,
                    lag_bytes = lag.bytes,
                    out_of_sync_bytes =
                        self.engine.dirty().dirty_count().0 * self.cfg.block_size as u64,
                    "draining to the secondary: every write and every out-of-sync block"
                );
                self.draining = Some(Draining {
                    deadline,
                    demote,
                    force,
                    reply,
                });
            }
        }
        self.act(out);
    }

    /// The drain is over once the secondary holds everything (or the deadline
    /// passed, or there is no session to drain to).
    fn drain_over(&self) -> bool {
        let settled = self.engine.ops_in_flight() == 0 && self.engine.parked() == 0;
        let d = self.draining.as_ref().expect("draining");
        self.engine.ready_to_hand_over()
            || (settled && self.session.is_none())
            || tokio::time::Instant::now() >= d.deadline
    }

    fn on_io(&mut self, done: IoDone, out: &mut Actions) {
        match done {
            IoDone::Local { seq, result } => self.engine.local_done(seq, result, out),
            IoDone::Read { seq, result } => {
                if let Ok(ReadResult::Data(d)) = &result {
                    Metrics::add(&self.shared.metrics.resync_bytes, d.len() as u64);
                }
                if let Ok(ReadResult::Hashes(_)) = &result {
                    // Bytes compared, for the counters (the engine knows the range).
                }
                self.engine.read_done(seq, result, out)
            }
            IoDone::Flush { id, result } => self.engine.local_flush_done(id, result, out),
        }
        self.act(out);
    }

    fn on_meta(&mut self, done: MetaDone, out: &mut Actions) {
        match done {
            MetaDone::Activity(r) => {
                if let Err(e) = &r {
                    tracing::error!("activity log write failed: {e}; refusing further writes");
                    self.shared
                        .metrics
                        .set_error(format!("activity log write failed: {e}"));
                }
                self.engine.activity_written(r, out);
            }
            MetaDone::Bitmap(r) => {
                if let Err(e) = &r {
                    tracing::error!("persisting the bitmap failed: {e}; refusing further writes");
                }
                self.engine.bitmap_persisted(r, out);
            }
            // ha (issue 12): online grow.
            MetaDone::Grow(r) => self.grow_recorded(r, out),
            MetaDone::Superblock(r) => {
                if let Err(e) = r {
                    tracing::error!("writing the superblock failed: {e}; refusing further writes");
                    self.engine
                        .poison(format!("writing the superblock failed: {e}"), out);
                }
                if std::mem::take(&mut self.pending_generation) {
                    self.engine.generation_started(out);
                }
            }
        }
        self.act(out);
    }

    fn on_peer(&mut self, ev: PeerEvent, out: &mut Actions) {
        let current = self.session.as_ref().map(|s| s.id);
        match ev {
            PeerEvent::Up { id, tx, peer } => {
                if self.session.is_some() {
                    self.drop_session("a new session replaced it", out);
                    self.act(out);
                }
                if self.draining.is_some() {
                    return;
                }
                let own_dirty: u64 = peer.own_dirty.iter().map(|r| r.1).sum();
                let own_verify: u64 = peer.own_verify.iter().map(|r| r.1).sum();
                tracing::info!(session = id, peer = %peer.node_name, plan = ?peer.needs, decision = %peer.decision,
                    out_of_sync_blocks = self.engine.dirty().dirty_count().0, peer_changed_blocks = own_dirty,
                    peer_compare_blocks = own_verify, "connected to secondary");
                self.shared.set_handshake(peer.decision.clone());
                self.shared.metrics.set_connected(true, &peer.node_name);
                self.shared.metrics.clear_error();
                Metrics::add(&self.shared.metrics.sessions, 1);
                let (needs, own_dirty, own_verify, stage_bytes) = (
                    peer.needs,
                    peer.own_dirty.clone(),
                    peer.own_verify.clone(),
                    peer.stage_bytes,
                );
                self.session = Some(Session {
                    id,
                    tx,
                    peer: *peer,
                    consistent: None,
                });
                self.engine.set_peer_stage_bytes(stage_bytes);
                self.engine
                    .peer_connected(needs, &own_dirty, &own_verify, out);
            }
            PeerEvent::Applied { id, seq } if Some(id) == current => {
                self.engine.peer_applied(seq, out)
            }
            PeerEvent::SectionDone { id, through } if Some(id) == current => {
                self.engine.peer_section_done(through, out)
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
            PeerEvent::Consistent { id, seq, at_ms } if Some(id) == current => {
                if let Some(s) = self.session.as_mut() {
                    s.consistent = Some((seq, at_ms));
                }
                // dr (issue 10): a rollback there can move it back; take it as said.
                self.peer_consistent = Some((seq, at_ms));
            }
            // ha (issue 12): online grow.
            PeerEvent::Grown {
                id,
                size_bytes,
                error,
            } if Some(id) == current => self.peer_grown(id, size_bytes, error, out),
            PeerEvent::Down { id, reason } if Some(id) == current => {
                self.drop_session(&reason, out)
            }
            _ => {}
        }
        self.act(out);
    }

    fn publish_gauges(&mut self) {
        let m = &self.shared.metrics;
        m.ahead.store(self.engine.is_ahead(), Ordering::Relaxed);
        let progress = self.engine.resync_progress();
        m.set_resync_active(progress.is_some());
        if let Some(p) = progress {
            m.resync_shipped_blocks
                .store(p.shipped_blocks.0, Ordering::Relaxed);
            if self.resync_log.elapsed() >= Duration::from_secs(2) {
                self.resync_log = Instant::now();
                let bs = self.cfg.block_size as u64;
                let done = p.shipped_blocks.0 * bs;
                let total = p.total_blocks.0 * bs;
                let rate = self.cfg.resync_rate_bytes_per_s;
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
        let lag = self.engine.lag();
        m.lag_writes.store(lag.writes, Ordering::Relaxed);
        m.spill_live_bytes
            .store(self.engine.spill_usage().0, Ordering::Relaxed); // wan
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
            size_bytes: self
                .shared
                .size_bytes
                .load(std::sync::atomic::Ordering::Acquire),
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
            // wan: stream compression when compressing at all.
            capabilities: if self.cfg.compress_level > 0 {
                caps::ZSTD | caps::ZSTD_STREAM
            } else {
                caps::ZSTD
            },
            first_seq: self.engine.next_seq().0,
            changed_blocks: self.engine.dirty().dirty_count().0,
            promoted_at_s: self.sb.promoted_at_s,
        }
    }

    fn status(&self) -> StatusDoc {
        let m = &self.shared.metrics;
        let lag = self.engine.lag();
        let mut doc = StatusDoc::build(
            &self.cfg,
            Role::Primary,
            m,
            self.session.as_ref().map(|s| {
                // The peer's disk as this node knows it: mixed while a resync runs,
                // UpToDate when in sync, else what it said at the handshake.
                let disk = if self.engine.is_in_sync() {
                    "UpToDate".to_string()
                } else if self.engine.resync_progress().is_some() || self.engine.is_ahead() {
                    "Syncing".to_string()
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
        doc.poisoned = self.sb.poisoned || self.engine.is_poisoned();
        // ha (issue 12): what new NBD clients see.
        doc.size_bytes = self
            .shared
            .size_bytes
            .load(std::sync::atomic::Ordering::Acquire);
        doc.generations = Some(control::GenerationsStatus::of(&self.sb));
        doc.handshake = self
            .shared
            .handshake
            .lock()
            .expect("handshake lock")
            .clone();
        doc.verify = self.verify_status();
        doc.consistent_point = self.dr_consistent_status(&lag); // dr (issue 10)
        let _ = self.started;
        doc
    }

    /// The first write without the peer: a new generation, durable before the
    /// write is (G8); `on_meta` then calls `generation_started`.
    fn start_generation_alone(&mut self) {
        self.sb = recovery::start_generation_alone(&self.sb);
        tracing::warn!(generation = %self.sb.gen_current, base = %self.sb.gen_bitmap_base, "writing without the peer: new generation");
        let sb = self.sb.clone();
        self.meta().send(MetaJob::Superblock { sb });
        // Writes wait for the superblock: on_meta calls generation_started.
        self.pending_generation = true;
    }

    /// ha (issue 12 item 2, like DRBD's fence-peer with `fencing resource-only`):
    /// run the fencing command before the first write without the peer; writes
    /// freeze until it answers (Cmd::FenceDone).
    fn fence_before_writing_alone(&mut self) {
        tracing::warn!(peer = %self.cfg.peer_name, "the peer is gone: fencing it before the first write alone; writes wait");
        let tx = self.shared.cmd_tx.clone();
        let cfg = self.cfg.clone();
        tokio::spawn(async move {
            let cmd = cfg.fence_peer.clone().unwrap_or_default();
            let result = crate::agent::node::fence_peer(&cfg, &cmd, "write-alone").await;
            let _ = tx.send(Cmd::FenceDone { result }).await;
        });
    }

    /// dr (issue 10): where the DR copy stands, for status and /metrics: its
    /// consistent point as last reported, its age, and how long ago this node
    /// accepted the oldest write the copy lacks (the loss window of a disaster now).
    fn dr_consistent_status(
        &self,
        lag: &crate::engine::primary::Lag,
    ) -> Option<control::ConsistentStatus> {
        let (seq, at_ms) = self.peer_consistent?;
        let now = crate::agent::unix_now_ms();
        Some(control::ConsistentStatus {
            seq: seq.0,
            at_unix_ms: at_ms,
            age_s: if at_ms > 0 {
                now.saturating_sub(at_ms) as f64 / 1000.0
            } else {
                0.0
            },
            behind_s: lag
                .oldest_accepted_at_ms
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0),
            journal_lsn: 0,
            resync_open: self.engine.resync_progress().is_some(),
        })
    }

    /// Final local flush; tell the peer whether it is left Outdated; persist what
    /// may differ and mark a clean shutdown.
    async fn finish(
        mut self,
        meta_rx: &mut mpsc::UnboundedReceiver<MetaDone>,
    ) -> Result<(), AgentError> {
        let draining = self.draining.take();
        let in_sync = self.engine.ready_to_hand_over();
        let out_of_sync = self.engine.out_of_sync();
        let out_of_sync_bytes = out_of_sync.dirty_count().0 * self.cfg.block_size as u64;
        let (demote, force) = draining
            .as_ref()
            .map_or((false, false), |d| (d.demote, d.force));
        // ha: a peer that lacks nothing (no block out of sync, no write unacked)
        // loses nothing by a demotion, connected or not: a lone primary that wrote
        // nothing since it last saw its peer demotes (Pacemaker's demote on a lone
        // node, ocf-tester); one with writes its peer lacks still needs --force.
        // Connected, the engine's hand-over rule decides alone.
        let peer_lacks_nothing =
            self.session.is_none() && out_of_sync_bytes == 0 && self.engine.lag().writes == 0;
        if demote && !in_sync && !peer_lacks_nothing && !force {
            // Refused: the role stays primary (the node restarts it). Nothing is
            // said to the peer; the bitmap keeps what it lacks.
            let reason = format!(
                "demotion refused: the secondary does not hold every write yet ({out_of_sync_bytes} bytes out of sync, {}); \
                 this node stays primary. Retry once `tandem status` shows the peer UpToDate, or demote with --force \
                 (the peer is then Outdated and its promotion needs --force)",
                if self.session.is_some() {
                    "a resync is running"
                } else {
                    "the peer is not connected"
                }
            );
            self.close_clean(meta_rx, &out_of_sync, false).await?;
            if let Some(d) = draining {
                let _ = d.reply.send(Stopped::DemotionRefused(reason));
            }
            return Ok(());
        }
        let outdated = !in_sync;
        let summary = if in_sync {
            "replication drained: the peer holds every write".to_string()
        } else if self.session.is_some() {
            format!(
                "drain timed out after {} ms: {out_of_sync_bytes} bytes stay marked out of sync; the peer is told it is Outdated",
                self.cfg.drain_timeout_ms
            )
        } else {
            format!(
                "peer not connected: {out_of_sync_bytes} bytes stay marked out of sync for the next resync"
            )
        };
        if !in_sync {
            tracing::warn!("{summary}");
        }
        self.close_clean(meta_rx, &out_of_sync, outdated).await?;
        if let Some(d) = draining {
            let _ = d.reply.send(Stopped::Done(summary));
        }
        Ok(())
    }

    async fn close_clean(
        &mut self,
        meta_rx: &mut mpsc::UnboundedReceiver<MetaDone>,
        out_of_sync: &crate::bitmap::DirtyBitmap,
        outdated: bool,
    ) -> Result<(), AgentError> {
        if let Err(e) = self.volume.flush().await {
            tracing::error!(
                "final flush of the volume failed: {e}; the next start compares everything"
            );
            return Err(AgentError::Refused(format!("final flush failed: {e}")));
        }
        if let Some(s) = self.session.take() {
            let _ = s.tx.send(ToPeer::Goodbye { outdated }).await;
        }
        let worker = self.meta.take().expect("finish once");
        // Jobs still queued complete first (their completions are dropped).
        let (mut store, mut sb) = tokio::task::spawn_blocking(move || worker.finish())
            .await
            .map_err(|e| AgentError::Refused(format!("metadata thread: {e}")))?;
        while meta_rx.try_recv().is_ok() {}
        sb.gen_current = self.sb.gen_current;
        sb.gen_bitmap_base = self.sb.gen_bitmap_base;
        sb.gen_history = self.sb.gen_history;
        sb.clean_shutdown = true;
        store.persist_bitmap(&mut sb, out_of_sync)?;
        // wan: the bitmap covers every spilled write now: empty the spill log.
        if let Some(w) = self.spill.take() {
            w.send(SpillJob::Reset);
            let _ = tokio::task::spawn_blocking(move || w.finish()).await;
        }
        tracing::info!(
            out_of_sync_blocks = out_of_sync.dirty_count().0,
            "metadata persisted; clean shutdown"
        );
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

/// A resync read (scale, issue 11): a range in a hole of the image is not read;
/// read data that is all zeros goes as a zero frame too. A zero chunk (built by the
/// engine from a hole probe, possibly longer than any read) must still be a hole
/// (or zeros); finding data there is an error (something else wrote the image),
/// which ends the session and leaves the blocks dirty.
async fn resync_read(
    volume: &Volume,
    range: ByteRange,
    zero_chunk: bool,
) -> std::io::Result<ReadResult<Bytes>> {
    const PIECE: u64 = 8 << 20;
    if volume.knows_holes() && volume.next_data(range.offset, range.end()).await?.is_none() {
        return Ok(ReadResult::Zero);
    }
    if zero_chunk {
        let mut at = range.offset;
        while at < range.end() {
            let n = (range.end() - at).min(PIECE);
            if !is_all_zero(&volume.read(at, n as u32).await?) {
                return Err(std::io::Error::other(format!(
                    "a resync zero chunk ({} bytes at {}) found data at {at}: the image changed behind this agent",
                    range.len, range.offset
                )));
            }
            at += n;
        }
        return Ok(ReadResult::Zero);
    }
    let data = volume.read(range.offset, range.len as u32).await?;
    Ok(if is_all_zero(&data) {
        ReadResult::Zero
    } else {
        ReadResult::Data(data)
    })
}

/// Block hashes of a comparison or verify read; a range in a hole of the image is
/// hashed as zeros without reading it (scale, issue 11).
async fn hash_read(volume: &Volume, range: ByteRange, unit_bytes: u32) -> std::io::Result<Bytes> {
    let hole = volume.knows_holes() && volume.next_data(range.offset, range.end()).await?.is_none();
    let mut buf = BytesMut::with_capacity(32 * range.len.div_ceil(u64::from(unit_bytes)) as usize);
    if hole {
        let unit = u64::from(unit_bytes);
        let zeros = vec![0u8; unit_bytes as usize];
        let full = *blake3::hash(&zeros).as_bytes();
        for _ in 0..range.len / unit {
            buf.extend_from_slice(&full);
        }
        let rest = (range.len % unit) as usize;
        if rest > 0 {
            buf.extend_from_slice(blake3::hash(&zeros[..rest]).as_bytes());
        }
    } else {
        let data = volume.read(range.offset, range.len as u32).await?;
        for h in crate::resync::hash_blocks(&data, unit_bytes) {
            buf.extend_from_slice(&h);
        }
    }
    Ok(buf.freeze())
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
                // ha (issue 12): online grow.
                "resize" => match request.number("size_bytes") {
                    Some(size_bytes) => Cmd::Resize { size_bytes, reply },
                    None => {
                        return ControlReply::error(
                            "resize needs size_bytes (tandem resize --size SIZE)".into(),
                        );
                    }
                },
                // ha: tandem disconnect / connect.
                "disconnect" | "connect" => Cmd::HoldLink {
                    down: request.cmd == "disconnect",
                    reply,
                },
                // ha: runtime resync control.
                "set-resync-rate" => match request.number("rate_bytes_per_s") {
                    Some(rate) => Cmd::SetResync {
                        rate_bytes_per_s: Some(rate),
                        paused: None,
                        reply,
                    },
                    None => {
                        return ControlReply::error(
                            "set-resync-rate needs rate_bytes_per_s (tandem set resync-rate RATE)"
                                .into(),
                        );
                    }
                },
                "pause-sync" | "resume-sync" => Cmd::SetResync {
                    rate_bytes_per_s: None,
                    paused: Some(request.cmd == "pause-sync"),
                    reply,
                },
                // dr (issue 10): the rollback window is the secondary's.
                "points" | "rollback" | "inspect" => {
                    return ControlReply::error(format!(
                        "this node is the primary: its volume is the live copy and has no rollback window; run `tandem {}` on the secondary's control socket (a rollback there needs it disconnected: stop or demote this primary first)",
                        request.cmd
                    ));
                }
                _ => {
                    return request.unknown(&[
                        "promote",
                        "demote",
                        "verify",
                        "verify-result",
                        "resize",
                        "set-resync-rate",
                        "disconnect",
                        "connect",
                        "pause-sync",
                        "resume-sync",
                        "adjust",
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

/// Payloads up to this size are compressed on the encoder task itself: a 16 KiB
/// zstd pass takes tens of microseconds, less than the hand-off to a blocking
/// thread and back, which a QD1 write pays in full (issue 11 item 3).
const INLINE_COMPRESS_MAX_BYTES: usize = 16 << 10;

/// A frame of the encoder's queue: ready, or still being compressed.
enum Encoding {
    Ready(Box<Frame>),
    Compressing(tokio::task::JoinHandle<Frame>),
}

/// Turn engine frames into wire frames compressed one by one (a peer without
/// the stream capability), large payloads in parallel on blocking threads (up
/// to `PARALLEL` frames queued, order kept), and hand them to the writer. A
/// frame that needs no compression thread goes out at once when nothing is
/// queued before it: no task, no wakeup.
async fn encoder(
    mut rx: mpsc::Receiver<ToPeer>,
    tx: mpsc::Sender<Frame>,
    compress: Arc<AdaptiveCompression>,
    metrics: Arc<Metrics>,
) {
    const PARALLEL: usize = 8;
    let mut pending: VecDeque<Encoding> = VecDeque::new();
    loop {
        while matches!(pending.front(), Some(Encoding::Ready(_))) {
            let Some(Encoding::Ready(frame)) = pending.pop_front() else {
                unreachable!("the front was ready");
            };
            if tx.send(*frame).await.is_err() {
                return;
            }
        }
        // The front, if any, is being compressed.
        let next = if pending.len() < PARALLEL {
            tokio::select! {
                biased;
                f = rx.recv() => f.map(Ok),
                Some(done) = async {
                    match pending.front_mut() {
                        Some(Encoding::Compressing(h)) => Some(h.await),
                        _ => None,
                    }
                } => {
                    pending.pop_front();
                    Some(Err(done))
                }
            }
        } else {
            match pending.pop_front() {
                Some(Encoding::Compressing(h)) => Some(Err(h.await)),
                _ => unreachable!("a full queue starts with a frame being compressed"),
            }
        };
        match next {
            None => break,
            Some(Err(Ok(frame))) => {
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            Some(Err(Err(_))) => return,
            Some(Ok(out)) => pending.push_back(compress_for_peer(out, &compress, &metrics)),
        }
    }
    // Everything queued goes out before the writer's channel closes.
    while let Some(e) = pending.pop_front() {
        let frame = match e {
            Encoding::Ready(frame) => *frame,
            Encoding::Compressing(h) => match h.await {
                Ok(frame) => frame,
                Err(_) => return,
            },
        };
        if tx.send(frame).await.is_err() {
            return;
        }
    }
}

/// One engine frame as a wire frame with its payload compressed on its own,
/// or the task compressing it.
fn compress_for_peer(
    out: ToPeer,
    compress: &Arc<AdaptiveCompression>,
    metrics: &Arc<Metrics>,
) -> Encoding {
    let ToPeer::Frame(Outgoing::Write {
        seq,
        offset,
        fua,
        at_ms,
        data,
    }) = out
    else {
        return Encoding::Ready(Box::new(raw_frame_for_peer(out)));
    };
    let compress = compress.clone();
    let metrics = metrics.clone();
    let small = data.len() <= INLINE_COMPRESS_MAX_BYTES;
    let encode = move || {
        let payload = compress.prepare(data);
        Metrics::add(&metrics.replicated_wire_bytes, payload.wire_len() as u64);
        Frame {
            seq: seq.0,
            msg: Message::Write { offset, fua, at_ms },
            payload,
        }
    };
    if small {
        Encoding::Ready(Box::new(encode()))
    } else {
        Encoding::Compressing(tokio::task::spawn_blocking(encode))
    }
}

/// One engine frame as a wire frame, its payload as it is (the crc32 over it
/// only, G5).
fn raw_frame_for_peer(out: ToPeer) -> Frame {
    match out {
        ToPeer::Goodbye { outdated } => link::control_frame(Message::Goodbye { outdated }),
        // ha (issue 12): online grow, after every frame before it.
        ToPeer::Grow { size_bytes } => link::control_frame(Message::Grow { size_bytes }),
        ToPeer::Frame(Outgoing::Write {
            seq,
            offset,
            fua,
            at_ms,
            data,
        }) => Frame {
            seq: seq.0,
            msg: Message::Write { offset, fua, at_ms },
            payload: Payload::prepare(data, 0),
        },
        ToPeer::Frame(other) => plain_frame(other),
    }
}

/// A payload-free engine frame as a wire frame.
fn plain_frame(out: Outgoing<Bytes>) -> Frame {
    let (seq, msg) = match out {
        Outgoing::ResyncStart { next, blocks, full } => (
            next.0,
            Message::ResyncStart {
                blocks: blocks.0,
                full,
            },
        ),
        Outgoing::Zeroes {
            seq,
            offset,
            len,
            fua,
            at_ms,
        } => (
            seq.0,
            Message::WriteZeroes {
                offset,
                len,
                fua,
                at_ms,
            },
        ),
        Outgoing::Trim {
            seq,
            offset,
            len,
            at_ms,
        } => (seq.0, Message::Trim { offset, len, at_ms }),
        Outgoing::HashCheck {
            seq,
            offset,
            unit_bytes,
            hashes,
        } => (
            seq.0,
            Message::HashCheck {
                offset,
                block_size: unit_bytes,
                hashes: hashes
                    .chunks_exact(32)
                    .map(|c| c.try_into().expect("32-byte hash"))
                    .collect(),
            },
        ),
        Outgoing::Flush { through } => (through.0, Message::Flush),
        Outgoing::ResyncDone { through } => (
            through.0,
            Message::ResyncDone {
                through_seq: through.0,
            },
        ),
        Outgoing::Write { .. } => unreachable!("writes are encoded with their payload"),
    };
    Frame {
        seq,
        msg,
        payload: Payload::empty(),
    }
}

/// Dial the secondary, handshake, and run sessions until `stop`.
async fn connector(
    cfg: Arc<NodeConfig>,
    security: Security,
    cmd_tx: mpsc::Sender<Cmd>,
    peer_tx: mpsc::Sender<PeerEvent>,
    shared: Arc<Shared>,
    mut inbound_rx: mpsc::Receiver<Inbound>,
    stop: CancellationToken,
) {
    let metrics = shared.metrics.clone();
    // ha: a primary promoted with no peer address configured (a lone DR node) dials
    // nobody; a secondary that dials it (its `listen`) is answered as usual.
    let peer_addr: Option<SocketAddr> = cfg.peer;
    let mut backoff = Backoff::new(100, 5_000);
    let mut id = 0u64;
    let mut last_log: Option<Instant> = None;
    // A secondary that dialed this node while it waited between attempts.
    let mut waiting: Option<Inbound> = None;
    while !stop.is_cancelled() {
        // ha: `tandem disconnect` holds the link down: no dialing, and a
        // secondary that dials is refused, until `tandem connect`.
        if *shared.held_down.borrow() {
            let mut held = shared.held_down.subscribe();
            let refuse = |mut i: Inbound| {
                tokio::spawn(async move {
                    link::send_refusal(
                        &mut i.wr,
                        "the primary was disconnected by an administrator (tandem disconnect); tandem connect on it resumes replication",
                    )
                    .await;
                });
            };
            if let Some(i) = waiting.take() {
                refuse(i);
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = held.wait_for(|down| !*down) => { if r.is_err() { return } break }
                    Some(i) = inbound_rx.recv() => refuse(i),
                }
            }
            backoff.reset();
            continue;
        }
        let attempt = async {
            let (rd, wr) = match waiting.take() {
                Some(i) => (i.rd, i.wr),
                None => tokio::select! {
                    s = connect_peer(peer_addr, &security, cfg.connect_timeout_ms) => {
                        let (rd, wr) = s.map_err(|e| e.to_string())?.into_split();
                        (BufReader::with_capacity(256 << 10, rd), wr)
                    }
                    Some(i) = inbound_rx.recv() => (i.rd, i.wr),
                },
            };
            let (reply, rx) = oneshot::channel();
            cmd_tx
                .send(Cmd::HelloInfo {
                    suspected: false,
                    reply,
                })
                .await
                .map_err(|_| "agent stopping".to_string())?;
            let (hello, _) = rx.await.map_err(|_| "agent stopping".to_string())?;
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
                tracing::debug!(peer = ?peer_addr, "{reason}");
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
                    tracing::warn!(peer = ?peer_addr, "cannot connect to secondary: {reason}; retrying with backoff");
                    last_log = Some(Instant::now());
                } else {
                    tracing::debug!(peer = ?peer_addr, "cannot connect to secondary: {reason}");
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
        let (out_tx, out_rx) = mpsc::channel(link::WRITER_QUEUE_FRAMES_MAX);
        let (hb_tx, hb_rx) = mpsc::channel(8);
        // wan (issue 11 item 4): one zstd stream per connection when both ends can.
        let stream_compress =
            cfg.compress_level > 0 && welcome.capabilities & caps::ZSTD_STREAM != 0;
        tracing::debug!(
            session = id,
            stream_compress,
            "replication link compression: {}",
            if stream_compress {
                "one zstd stream per connection"
            } else {
                "per frame"
            }
        );
        if peer_tx
            .send(PeerEvent::Up {
                id,
                tx: out_tx,
                peer: Box::new(welcome),
            })
            .await
            .is_err()
        {
            break;
        }
        // Frames compressed one by one (a peer without the stream capability)
        // go through the encoder, which compresses large payloads on blocking
        // threads; otherwise the writer makes the frames itself (a crc32 each).
        let per_frame = !stream_compress && cfg.compress_level > 0;
        let (enc, mut writer) = if per_frame {
            let (frame_tx, frame_rx) = mpsc::channel(256);
            let enc = tokio::spawn(encoder(
                out_rx,
                frame_tx,
                shared.compress.clone(),
                metrics.clone(),
            ));
            let writer = tokio::spawn(link::run_writer_compressed(
                wr,
                frame_rx,
                hb_rx,
                cfg.heartbeat_interval_ms,
                None,
            ));
            (Some(enc), writer)
        } else {
            // Uncompressed (`--compress-level 0`): the payloads are the wire
            // bytes; a compressed stream counts its own.
            let count = (!stream_compress).then(|| metrics.clone());
            let to_frame = move |out| {
                let frame = raw_frame_for_peer(out);
                if let Some(m) = &count {
                    Metrics::add(&m.replicated_wire_bytes, frame.payload.wire_len() as u64);
                }
                frame
            };
            let writer = tokio::spawn(link::run_writer_converting(
                wr,
                out_rx,
                to_frame,
                hb_rx,
                cfg.heartbeat_interval_ms,
                stream_compress.then(|| {
                    link::StreamCompressor::new(cfg.compress_level, Some(metrics.clone()))
                        .latency_first(cfg.mode == Mode::Sync)
                }),
            ));
            (None, writer)
        };
        let mut reader = tokio::spawn(session_reader(
            FrameReader::new(rd, cfg.peer_timeout_ms, Some(hb_tx)),
            id,
            peer_tx.clone(),
        ));
        let reason = loop {
            tokio::select! {
                r = &mut reader => { writer.abort(); break r.unwrap_or_else(|e| format!("reader task: {e}")) }
                r = &mut writer => {
                    // The writer ends when the owner drops the session or the link breaks;
                    // give the reader a moment to see the peer's Goodbye/EOF.
                    let r = r.map_or_else(|e| format!("writer task: {e}"), |e| e.to_string());
                    let _ = tokio::time::timeout(Duration::from_millis(500), &mut reader).await;
                    reader.abort();
                    break r;
                }
                // Both nodes dial: the secondary's own attempt while a session runs.
                Some(mut i) = inbound_rx.recv() => {
                    tokio::spawn(async move {
                        link::send_refusal(&mut i.wr, crate::agent::ALREADY_CONNECTED).await;
                    });
                }
            }
        };
        if let Some(enc) = enc {
            enc.abort();
        }
        if stop.is_cancelled() {
            tracing::info!(session = id, "session with secondary ended: {reason}");
        } else if reason.starts_with(PEER_REFUSED) {
            // Logged (rate-limited) by the owner as it drops the session.
            tracing::debug!(session = id, "session with secondary ended: {reason}");
        } else {
            tracing::warn!(session = id, "session with secondary ended: {reason}");
        }
        let _ = peer_tx.send(PeerEvent::Down { id, reason }).await;
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

/// ha: dial the secondary at `peer`, or (no peer address: a lone primary) wait
/// forever, leaving only the secondary's own dial to this node's listener.
async fn connect_peer(
    peer: Option<SocketAddr>,
    security: &Security,
    timeout_ms: u64,
) -> Result<crate::transport::PeerStream, crate::transport::TransportError> {
    match peer {
        Some(addr) => transport::connect(addr, security, timeout_ms).await,
        None => std::future::pending().await,
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
                    link::send_refusal(&mut wr, &reason).await;
                    return;
                }
                tracing::debug!(peer = %peer_addr, "the secondary dialed this node");
                if let Err(
                    mpsc::error::TrySendError::Full(mut i)
                    | mpsc::error::TrySendError::Closed(mut i),
                ) = inbound_tx.try_send(Inbound { rd, wr })
                {
                    link::send_refusal(&mut i.wr, crate::agent::ALREADY_CONNECTED).await;
                }
                return;
            }
            if let Ok(Ok(Frame {
                msg: Message::Refuse { reason },
                ..
            })) = &first
                && reason.contains(crate::agent::ALREADY_CONNECTED)
            {
                // The secondary dialed while this node's own connection to it was
                // being set up: nothing to answer.
                tracing::debug!(peer = %peer_addr, "the secondary is already attached");
                return;
            }
            let (reply, rx) = oneshot::channel();
            let info = Cmd::HelloInfo {
                suspected: true,
                reply,
            };
            if cmd_tx.send(info).await.is_err() {
                return;
            }
            let Ok((mine, suspected)) = rx.await else {
                return;
            };
            let reason = match first {
                Ok(Ok(Frame {
                    msg: Message::Hello(h),
                    ..
                })) => {
                    let theirs = crate::engine::handshake::gen_info_of(&h);
                    let ours = crate::engine::handshake::gen_info_of(&mine);
                    let split = crate::engine::generations::decide(&ours, &theirs)
                        == crate::engine::generations::Decision::SplitBrain;
                    if split {
                        shared.metrics.events.push(
                            "split-brain",
                            format!(
                                "both nodes are primary and both wrote: {} {} / {} {}",
                                cfg.name, ours.current, h.node_name, theirs.current
                            ),
                        );
                    }
                    two_primaries_message(
                        split,
                        (&cfg.name, &ours, suspected),
                        (&h.node_name, &theirs),
                    )
                }
                Ok(Ok(_)) => "expected Hello".to_string(),
                Ok(Err(e)) => format!("reading Hello: {e}"),
                Err(_) => "no Hello in time".to_string(),
            };
            // ha (issue 15.7): keyed by the dialer's IP; its port is new at every
            // redial, which logged every refusal.
            crate::agent::log_repeated(
                &format!("two-primaries:{}", peer_addr.ip()),
                || tracing::error!(peer = %peer_addr, "refusing a connection: {reason}"),
            );
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
            link::send_refusal(&mut wr, &reason).await;
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
    link::send_message(&mut wr, Message::Hello(hello.clone()))
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
    } else if welcome.size_bytes < hello.size_bytes {
        // ha (issue 12): a larger secondary is one an interrupted resize grew
        // first (engine/handshake.rs); a smaller one cannot hold this volume.
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
        link::send_refusal(&mut wr, &reason).await;
        return Err(reason);
    }
    Ok((rd, wr, welcome))
}

/// Read acknowledgements until the link ends.
async fn session_reader(
    mut rd: FrameReader<BufReader<PeerReadHalf>>,
    id: u64,
    peer_tx: mpsc::Sender<PeerEvent>,
) -> String {
    loop {
        let frame = match rd.next().await {
            Ok(f) => f,
            Err(LinkError::Closed) => return "secondary closed the connection".into(),
            Err(e) => return e.to_string(),
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
            Message::SectionDone { through_seq } => PeerEvent::SectionDone {
                id,
                through: Seq(through_seq),
            },
            Message::Consistent { seq, at_ms } => PeerEvent::Consistent {
                id,
                seq: Seq(seq),
                at_ms,
            },
            // ha (issue 12): online grow.
            Message::Grown { size_bytes, error } => PeerEvent::Grown {
                id,
                size_bytes,
                error,
            },
            Message::Goodbye { .. } => return "secondary said Goodbye".into(),
            Message::Refuse { reason } => {
                return format!("{PEER_REFUSED}{reason}");
            }
            other => return format!("unexpected message kind {} from secondary", other.kind()),
        };
        if peer_tx.send(ev).await.is_err() {
            return "agent stopping".into();
        }
    }
}

/// How a session end the secondary asked for (its `Refuse`) begins.
const PEER_REFUSED: &str = "secondary stopped the session: ";

/// The refusal two primaries log (issue 15.6): blocks changed on each, and on
/// this node how many of them are only suspected (its active extents at a crash,
/// compared by hash at the next resync), which used to read as written.
fn two_primaries_message(
    split: bool,
    (ours_name, ours, suspected): (&str, &crate::engine::generations::GenInfo, u64),
    (theirs_name, theirs): (&str, &crate::engine::generations::GenInfo),
) -> String {
    let ours_changed = if suspected > 0 {
        format!(
            "{} blocks changed, {} of them only suspected: its active extents at a crash",
            ours.changed_blocks, suspected
        )
    } else {
        format!("{} blocks changed", ours.changed_blocks)
    };
    format!(
        "{}both nodes are primary: {} has generation {} ({ours_changed}), {} has generation {} ({} blocks changed). \
         Two primaries are never paired: demote one (tandem demote); if both wrote, resolve the split brain on the one whose changes are discarded (tandem resolve --discard-local)",
        if split { "split brain: " } else { "" },
        ours_name,
        ours.current,
        theirs_name,
        theirs.current,
        theirs.changed_blocks
    )
}

#[cfg(test)]
mod tests {
    use super::is_all_zero;

    /// Issue 15.6: a restarted primary that wrote one small file reported its
    /// active extents as "4096 blocks changed"; the message now says how many
    /// are only suspected.
    #[test]
    fn two_primaries_say_which_changed_blocks_are_only_suspected() {
        use crate::engine::generations::GenInfo;
        use crate::types::Generation;
        let info = |current, changed_blocks| GenInfo {
            current: Generation(current),
            bitmap_base: Generation(1),
            history: [Generation::NONE; 2],
            changed_blocks,
            promoted_at_s: 0,
            inconsistent: false,
        };
        let m = super::two_primaries_message(
            true,
            ("alpha", &info(2, 4098), 4096),
            ("beta", &info(3, 10)),
        );
        assert!(
            m.contains("alpha has generation")
                && m.contains("(4098 blocks changed, 4096 of them only suspected: its active extents at a crash)")
                && m.contains("beta has generation")
                && m.contains("(10 blocks changed)")
                && m.starts_with("split brain: "),
            "{m}"
        );
        let m =
            super::two_primaries_message(false, ("alpha", &info(2, 2), 0), ("beta", &info(3, 0)));
        assert!(
            m.contains("(2 blocks changed)") && !m.contains("suspected"),
            "{m}"
        );
    }

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
