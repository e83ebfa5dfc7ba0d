//! The secondary agent: listen (and dial), authenticate, decide the handshake
//! (engine/handshake.rs: G6, G8), then stage every frame in the redo journal in
//! order and acknowledge it (engine/secondary.rs: G2, G5); a checkpointer copies
//! staged records into the volume; a comparison reads the image through the
//! journal.
//!
//! One **node task** owns the engine, the superblock and at most one session; the
//! journal thread, the metadata thread, checkpoints and comparisons report back
//! to it. Both nodes listen and dial: this node accepts its primary on
//! `--listen`, and dials the primary's address (`--peer`) while none is attached,
//! announcing itself with a Hello in the secondary role. A second connection while
//! one is attached is refused quietly. Nothing is written to the volume before a
//! handshake is accepted, and nothing but replication ever writes it (G8).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::BufReader;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::control::{
    self, ControlHandler, ControlReply, ControlRequest, GenerationsStatus, StatusDoc,
};
use crate::agent::journal::{self, JournalDone, JournalHandle, JournalThread};
use crate::agent::link::{self, FrameReader, LinkError};
use crate::agent::metawork::{MetaDone, MetaJob, MetaWorker};
use crate::agent::{AgentError, RoleContext, security_for};
use crate::bitmap::DirtyBitmap;
use crate::config::NodeConfig;
use crate::engine::generations::GenInfo;
use crate::engine::handshake::{self, Local, Plan};
use crate::engine::recovery;
use crate::engine::secondary::{
    self, Incoming, Lsn, Record, Room, SecondaryAction, SecondaryEngine, Source,
};
use crate::metrics::Metrics;
use crate::metrics::events::EventKind;
use crate::transport::{PeerListener, PeerReadHalf, PeerStream};
use crate::types::{ByteRange, DiskState, Generation, Role, Seq, VolumeId};
use crate::volume::Volume;
use crate::wire::{self, Frame, Hello, Message, PROTOCOL_VERSION, SyncPlan, Welcome, caps};

/// What the agent tells its caller once it listens.
#[derive(Clone)]
pub struct SecondaryReady {
    pub listen: SocketAddr,
    pub metrics: Arc<Metrics>,
}

// ha (issue 12): online grow.
mod grow;
// ha (issue 12): `tandem invalidate`.
mod invalidate;

type Engine = SecondaryEngine<Bytes>;
type Actions = Vec<SecondaryAction<Bytes>>;

/// What the node task hears.
enum Event {
    /// An authenticated connection from (or to) the peer; `announce`: this node
    /// dialed and sends its Hello first.
    Conn {
        stream: PeerStream,
        announce: bool,
    },
    SessionEnd {
        session: u64,
        reason: String,
    },
    Checkpointed(Result<(), String>),
    Hashed {
        seq: Seq,
        result: Result<Vec<u32>, String>,
    },
    Control(ControlCmd),
}

/// Control commands that need the node's state.
enum ControlCmd {
    /// A read-only export reads its image (the last consistent one, or an
    /// inspection's point): where from.
    ImageRead {
        view: ImageView,
        range: ByteRange,
        /// The sources, and the journal to read their records from (the node's
        /// current one: a new node's journal is recreated when it takes the
        /// primary's identity, and an export started before that held the old
        /// one: every read failed with "the journal thread stopped").
        reply: oneshot::Sender<Result<ExportSources, String>>,
    },
    ExportReadDone,
    Points(oneshot::Sender<ControlReply>),
    /// dr (issue 10): `tandem rollback --to`.
    Rollback {
        to: crate::dr::PointSpec,
        reply: oneshot::Sender<ControlReply>,
    },
    /// dr (issue 10): `tandem inspect --at --nbd` (start) or `--stop`.
    Inspect {
        start: Option<(crate::dr::PointSpec, String)>,
        reply: oneshot::Sender<ControlReply>,
    },
    /// `tandem resolve --discard-local`.
    DiscardLocal(oneshot::Sender<ControlReply>),
    /// ha: `tandem outdate` (the primary's fencing handler, before it writes alone).
    Outdate(oneshot::Sender<ControlReply>),
    /// ha: `tandem invalidate` (this node's data is discarded, fully resynced).
    Invalidate(oneshot::Sender<ControlReply>),
}

/// The part of the status that the node publishes for the control socket.
#[derive(Clone)]
struct Snapshot {
    doc: Option<StatusDoc>,
}

/// The state of the session with the primary.
struct Session {
    id: u64,
    peer: String,
    primary_gen: Generation,
    acks: mpsc::Sender<Frame>,
    /// Frames the engine could not take yet (journal space): read no further.
    held: Option<(Box<Frame>, Option<Bytes>)>,
    last_consistent_sent: Option<(Seq, u64)>,
    last_consistent_at: Instant,
    /// The reader saw the session end (Goodbye, a closed link): it ends once
    /// every frame read before is fed to the engine. The primary counted on
    /// them: a ResyncDone still queued when a demoted primary said Goodbye
    /// left the section open, and the promotion then rolled its writes back
    /// (found by the dr helper's e2e_dr_rollback).
    ending: Option<String>,
}

/// Where an export's read comes from, and the journal to read records from.
type ExportSources = (Vec<(ByteRange, Source)>, JournalHandle);

/// A checkpoint being copied into the volume: its last record, whether the volume
/// is a consistent image after it, and the newest write that image holds.
type Copying = (Lsn, bool, Option<(Seq, u64)>);

/// The node: engine, superblock, and what runs for it.
struct Node {
    cfg: Arc<NodeConfig>,
    volume: Volume,
    engine: Engine,
    sb: crate::meta::Superblock,
    meta: Option<MetaWorker>,
    journal: Option<JournalThread>,
    jh: JournalHandle,
    jdone_tx: mpsc::UnboundedSender<JournalDone>,
    metrics: Arc<Metrics>,
    /// Until a first sync completes, compare the volume's data by hash (--seeded or
    /// rebuilt metadata) instead of receiving every block.
    compare_by_hash: bool,
    /// Blocks this node changed itself (as primary), or dropped from its journal
    /// (a resync section, a rollback), that its peer may not know: every Welcome
    /// lists them until a resync from the peer completes. Persisted (bitmap).
    own_dirty: DirtyBitmap,
    /// Blocks it may have changed (active extents of a crash while primary):
    /// compared by hash.
    own_verify: DirtyBitmap,
    /// `tandem resolve --discard-local`: the next split brain (or newer-data refusal)
    /// with the peer is resolved by discarding this node's changes.
    discard_local: bool,
    session: Option<Session>,
    next_session: u64,
    events_tx: mpsc::Sender<Event>,
    /// The frames of a session that just started (the node loop takes it).
    new_frames: Option<mpsc::Receiver<(Box<Frame>, Option<Bytes>)>>,
    /// A checkpoint waits for the superblock to say the volume is mixed.
    checkpoint_waiting: Option<(Lsn, Lsn, bool, u64)>,
    /// A copied checkpoint waits for this metadata job (the superblock saying the
    /// volume is consistent) before its records are released.
    release_waiting: Option<(Lsn, u64)>,
    /// A `SectionDone` for the session `.0`, sent once the metadata job `.2` (the
    /// superblock of the `MarkConsistent` before it) is durable.
    section_done_waiting: Option<(u64, Seq, u64)>,
    /// The checkpoint being copied.
    copying: Option<Copying>,
    /// The disk state last written (a change is an event).
    recorded_disk_state: DiskState,
    /// Metadata jobs handed to the thread and finished (they finish in order).
    meta_sent: u64,
    meta_done: u64,
    /// ha: `tandem outdate` answers once the superblock saying Outdated is
    /// durable (job number, reply, message).
    outdate_waiting: Option<(u64, oneshot::Sender<ControlReply>, String)>,
    handshake_text: Option<String>,
    snapshot: Arc<std::sync::Mutex<Snapshot>>,
    /// The status document's journal counts (records, consistent points) and when
    /// they were counted: counting walks every record in the journal, so it is
    /// done at most once per [`JOURNAL_COUNTS_MAX_AGE`], not on every tick.
    journal_counts: Option<(Instant, u64, u64)>,
    /// dr (issue 10): a rollback under way.
    rollback: Option<PendingRollback>,
    /// dr (issue 10): the inspection export being served.
    inspection: Option<Inspection>,
    next_inspection: u64,
    /// ha (issue 12): an invalidation under way.
    invalidation: Option<invalidate::Pending>,
    /// ha (issue 12): a grow being recorded: (from, to) bytes, and whether the
    /// primary waits for `Grown`.
    growing: Option<(u64, u64, bool)>,
}

/// dr (issue 10): a rollback waits for the engine to be idle, then for the
/// bitmap and superblock, then for the journal's truncation.
struct PendingRollback {
    point: crate::dr::PointDoc,
    reply: oneshot::Sender<ControlReply>,
    stage: RollbackStage,
    /// Blocks the dropped records touched.
    dropped_bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RollbackStage {
    /// Waiting for syncs, checkpoints and reads in flight to end.
    Quiesce,
    /// The bitmap naming the dropped blocks and the superblock are being written
    /// (this metadata job): only then is the journal cut.
    Metadata(u64),
    /// The journal is being truncated durably.
    Truncate,
}

/// dr (issue 10): a read-only NBD export of the image as of a consistent point.
/// The engine's pin keeps the checkpointer from copying anything after the point
/// into the volume while it runs; when replication needs the room the pin
/// yields and the inspection ends (it never stops replication).
struct Inspection {
    id: u64,
    point: crate::dr::PointDoc,
    lsn: Lsn,
    view: crate::engine::rangeset::RangeMap<Lsn>,
    nbd: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Run a secondary until `shutdown` is cancelled, with its own control socket.
pub async fn run(
    cfg: NodeConfig,
    shutdown: CancellationToken,
    ready: Option<oneshot::Sender<SecondaryReady>>,
) -> Result<(), AgentError> {
    crate::agent::run_alone(cfg, shutdown, |cfg, ctx| async move {
        serve(cfg, ctx, ready).await.map(|_| ())
    })
    .await
}

fn engine_config(cfg: &NodeConfig, size_bytes: u64, capacity_bytes: u64) -> secondary::Config {
    let mut c = secondary::Config::new(size_bytes, cfg.block_size, capacity_bytes);
    c.record_overhead_bytes = journal::record_bytes(0);
    // Room for wrap padding and one largest frame beyond the engine's count.
    c.journal_capacity_bytes = capacity_bytes.saturating_sub(2 * (wire::PAYLOAD_MAX_BYTES as u64));
    c.rollback_window_bytes = capacity_bytes / 2;
    c.rollback_window_ms = cfg.rollback_window_ms;
    c.sync_threshold_bytes = cfg.flush_bytes_max.min(16 << 20);
    c.sync_interval_ms = cfg.flush_interval_ms;
    c.allow_inconsistent = cfg.resync_overflow_inconsistent;
    c
}

/// Serve the secondary role until `ctx.stop` is cancelled.
pub async fn serve(
    cfg: Arc<NodeConfig>,
    ctx: RoleContext,
    ready: Option<oneshot::Sender<SecondaryReady>>,
) -> Result<String, AgentError> {
    let shutdown = ctx.stop.clone();
    let (volume, opened, rebuilt) = crate::agent::open_node(&cfg, Role::Secondary)?;
    // A kill -9 leaves writes in the page cache: durable before anything counts on
    // them (engine/recovery.rs).
    volume
        .flush()
        .await
        .map_err(|e| AgentError::Refused(format!("flushing the volume at start failed: {e}")))?;
    if opened.superblock.poisoned {
        // Issue 9 item 5: pages whose writeback failed may still be cached (as
        // clean); the volume and the journal are read from the disk from here on.
        for path in [&cfg.volume, &cfg.journal] {
            if path.exists() {
                crate::agent::drop_cached_pages(path).map_err(|e| {
                    AgentError::Refused(format!(
                        "dropping the cached pages of {} (a disk that failed before) failed: {e}",
                        path.display()
                    ))
                })?;
            }
        }
    }
    let start = recovery::secondary_start(&opened.superblock, &opened.bitmap, &opened.activity);
    let mut sb = start.sb.clone();
    if start.demoted {
        tracing::warn!(generation = %sb.gen_current, "node was primary; starting as secondary (demoted)");
    }
    let mut store = opened.store;
    if start.own_dirty.dirty_count().0 > 0 || start.own_verify.dirty_count().0 > 0 {
        tracing::warn!(
            changed_blocks = start.own_dirty.dirty_count().0,
            compare_blocks = start.own_verify.dirty_count().0,
            generation = %sb.gen_current,
            "this node changed blocks as primary that its peer may not have; the next primary resends them (or a split brain is reported)"
        );
    }
    // Own changes are in the bitmap now; the activity log (a primary's) starts empty.
    let mut covered = start.own_dirty.clone();
    covered.union_with(&start.own_verify);
    store.persist_bitmap(&mut sb, &covered)?;
    store.write_activity(cfg.al_extent_bytes, &[])?;

    let (events_tx, mut events_rx) = mpsc::channel::<Event>(1024);
    let (jdone_tx, mut jdone_rx) = mpsc::unbounded_channel();
    // A node that never had a consistent image may have no journal yet; one that
    // had must find its journal (its staged writes are part of its image).
    let was = &opened.superblock;
    let mut may_create = was.is_new
        || was.disk_state == DiskState::Inconsistent
        || (was.clean_shutdown && !cfg.journal.exists());
    if rebuilt && cfg.journal.exists() {
        // The metadata was rebuilt (both superblock slots lost): every block is
        // compared with the primary's, so whatever the old journal staged is not
        // needed; it belongs to the lost identity and is kept aside, not reused.
        let aside = crate::agent::aside_path(&cfg.journal);
        tracing::warn!(journal = %cfg.journal.display(), aside = %aside.display(), "metadata rebuilt: the old redo journal is kept aside and a new one is made");
        std::fs::rename(&cfg.journal, &aside).map_err(|e| {
            AgentError::Refused(format!(
                "cannot move the old redo journal {} aside: {e}",
                cfg.journal.display()
            ))
        })?;
    }
    if start.demoted {
        // A primary's volume holds all of its data: records left in its journal
        // from an earlier time as secondary were copied into the volume before it
        // was promoted, and replaying them now would roll its own writes back.
        let dropped = remove_journal(&cfg, sb.volume_id, jdone_tx.clone())?;
        if dropped > 0 {
            tracing::info!(journal = %cfg.journal.display(), records = dropped, "demoted primary: dropping journal records from before its promotion (already in the volume)");
        }
        may_create = true;
    }
    may_create |= rebuilt;
    if recovery::full_sync_owed(&sb) {
        // ha (issue 12): invalidated; a crash may have come before its journal
        // was truncated.
        let dropped = remove_journal(&cfg, sb.volume_id, jdone_tx.clone())?;
        tracing::warn!(
            journal = %cfg.journal.display(),
            records = dropped,
            "this node was invalidated (tandem invalidate) and owes a full resync: its redo journal's records are dropped"
        );
        may_create = true;
    }
    let create = match (may_create, sb.is_new) {
        (false, _) => journal::Create::No,
        // Replaced when the node adopts its primary's identity.
        (true, true) => journal::Create::Fallocated,
        (true, false) => journal::Create::Written,
    };
    let jopened = journal::open(
        &cfg.journal,
        sb.volume_id,
        cfg.block_size,
        cfg.journal_bytes,
        create,
        true,
        jdone_tx.clone(),
    )
    .map_err(|e| AgentError::Refused(format!("{e}")))?;
    tracing::info!(
        journal = %cfg.journal.display(),
        records = jopened.records.len(),
        capacity_bytes = jopened.capacity_bytes,
        "redo journal open"
    );
    let size_bytes = volume.size_bytes();
    let volume_consistent = recovery::volume_consistent_at_start(&sb);
    let engine = Engine::new(
        engine_config(&cfg, size_bytes, jopened.capacity_bytes),
        jopened.applied,
        jopened.records,
        volume_consistent,
        Lsn(sb.mixed_through),
        (Seq(sb.consistent_seq), sb.consistent_at_ms),
    );
    if let Some(adopted) = recovery::recovered_sync_end(
        &sb,
        engine.is_section_open(),
        engine.consistent_point().is_some(),
    ) {
        tracing::warn!(generation = %adopted.gen_current, "the journal holds the end of a resync the superblock did not record (a crash in between): recording the copy as the sync target's generation");
        sb = adopted;
        store.write_superblock(&sb)?;
    }
    if let Some(noted) = recovery::recovered_consistent_write(
        &sb,
        engine
            .consistent_point()
            .map(|(_, seq, at_ms)| (seq.0, at_ms)),
    ) {
        sb = noted;
        store.write_superblock(&sb)?;
    }
    if let Some((lsn, seq, at_ms)) = engine.consistent_point() {
        tracing::info!(
            lsn = lsn.0,
            seq = seq.0,
            at_ms,
            section_open = engine.is_section_open(),
            "consistent image recovered"
        );
    }
    let metrics = ctx.metrics.clone().unwrap_or_default();
    metrics.reset_role_state();
    if sb.poisoned {
        tracing::warn!(
            compare_blocks = start.own_verify.dirty_count().0,
            "this disk failed a write or fdatasync before (poisoned): every block is compared with the primary's at the next resync; promotion needs --force until then"
        );
        metrics.set_error("poisoned: a write or fdatasync of this disk failed; every block is compared with the primary's at the next resync".into());
    }
    let (meta_tx, mut meta_rx) = mpsc::unbounded_channel();
    let worker = MetaWorker::start(store, sb.clone(), cfg.al_extent_bytes, meta_tx);
    let jh = jopened.thread.handle();
    let snapshot = Arc::new(std::sync::Mutex::new(Snapshot { doc: None }));
    let recorded_disk_state = sb.disk_state;
    let mut node = Node {
        cfg: cfg.clone(),
        volume,
        engine,
        sb,
        meta: Some(worker),
        journal: Some(jopened.thread),
        jh,
        jdone_tx: jdone_tx.clone(),
        metrics: metrics.clone(),
        compare_by_hash: cfg.seeded || rebuilt,
        own_dirty: start.own_dirty,
        own_verify: start.own_verify,
        discard_local: false,
        session: None,
        next_session: 1,
        events_tx: events_tx.clone(),
        new_frames: None,
        checkpoint_waiting: None,
        release_waiting: None,
        section_done_waiting: None,
        copying: None,
        recorded_disk_state,
        meta_sent: 0,
        meta_done: 0,
        outdate_waiting: None,
        handshake_text: None,
        snapshot: snapshot.clone(),
        journal_counts: None,
        rollback: None,
        inspection: None,
        next_inspection: 1,
        invalidation: None, // ha
        growing: None,      // ha
    };
    node.publish();

    let security = security_for(&cfg);
    let listen = cfg.listen.expect("validated");
    // Refusals of misconfigured peers become events (hardening).
    let listener = PeerListener::bind(listen, &security)
        .await?
        .with_events(metrics.clone());
    let bound = listener.local_addr();
    tracing::info!(listen = %bound, expecting = %cfg.peer_name, "secondary listening");
    // `--export-readonly ADDR`: the last consistent image, read through the
    // journal, served while replication continues (issues 10 and 13).
    let readonly_stop = CancellationToken::new();
    let readonly_export = match &cfg.export_readonly {
        Some(addr) => Some(
            crate::nbd::readonly::serve_backend_readonly(
                &cfg,
                addr,
                Arc::new(ImageExport {
                    view: ImageView::Consistent,
                    events_tx: events_tx.clone(),
                    volume: node.volume.clone(),
                    size_bytes,
                }),
                &metrics,
                readonly_stop.clone(),
            )
            .await
            .map_err(|e| AgentError::Nbd(e.to_string()))?,
        ),
        None => None,
    };
    let handler: Arc<dyn ControlHandler> = Arc::new(SecondaryControl {
        resource: cfg.resource.clone(),
        events_tx: events_tx.clone(),
        metrics: metrics.clone(),
        snapshot,
    });
    ctx.control.set(Some(handler.clone()));
    let observers = crate::agent::monitor::start(&cfg, handler, metrics.clone()).await?;
    if let Some(ready) = ready {
        let _ = ready.send(SecondaryReady {
            listen: bound,
            metrics: metrics.clone(),
        });
    }
    let stop_conns = CancellationToken::new();
    let accept_task = tokio::spawn(accept_loop(
        listener,
        events_tx.clone(),
        metrics.clone(),
        stop_conns.clone(),
    ));
    let dial_task = cfg.peer.map(|peer| {
        tokio::spawn(dial_loop(
            peer,
            security.clone(),
            cfg.connect_timeout_ms,
            metrics.clone(),
            events_tx.clone(),
            stop_conns.clone(),
        ))
    });

    let mut tick = tokio::time::interval(Duration::from_millis(cfg.flush_interval_ms.clamp(1, 5)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A record waits at most flush-interval-ms for its journal sync, timed on
    // the monotonic clock from when the engine first has one waiting (engine
    // `has_unsynced`): the engine's wall-clock ticks alone would wait out a
    // clock stepped back.
    let sync_interval = Duration::from_millis(cfg.flush_interval_ms);
    let sync_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sync_timer);
    let mut sync_armed = false;
    let mut out: Actions = Vec::new();
    // The current session's frames; read only while the engine takes them
    // (journal space is backpressure on the TCP stream).
    let mut frames: Option<mpsc::Receiver<(Box<Frame>, Option<Bytes>)>> = None;
    loop {
        if let Some(f) = node.new_frames.take() {
            frames = Some(f);
        }
        if node.session.is_none() {
            frames = None;
        }
        let can_read = frames.is_some() && node.session.as_ref().is_some_and(|s| s.held.is_none());
        let waiting = node.engine.has_unsynced();
        if waiting && !sync_armed {
            sync_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + sync_interval);
        }
        sync_armed = waiting;
        tokio::select! {
            biased;
            Some(done) = jdone_rx.recv() => node.on_journal(done, &mut out),
            Some((frame, data)) = async { frames.as_mut().expect("can_read").recv().await }, if can_read => {
                node.feed(frame, data, &mut out);
                node.act(&mut out);
            }
            Some(done) = meta_rx.recv() => node.on_meta(done, &mut out),
            Some(ev) = events_rx.recv() => node.on_event(ev, &mut out).await,
            _ = &mut sync_timer, if sync_armed => {
                sync_armed = false;
                node.engine.sync_unsynced(&mut out);
                node.act(&mut out);
            }
            _ = tick.tick() => {
                node.engine.tick(crate::agent::unix_now_ms(), &mut out);
                node.act(&mut out);
                node.retry_held(&mut out);
                node.step_rollback(); // dr (issue 10)
                node.check_inspection(); // dr (issue 10)
                node.step_invalidation(None); // ha
                node.report_consistent();
                node.publish();
            }
            _ = shutdown.cancelled() => break,
        }
        let drained = frames
            .as_ref()
            .is_none_or(|f| f.is_closed() && f.is_empty());
        if drained
            && node
                .session
                .as_ref()
                .is_some_and(|s| s.ending.is_some() && s.held.is_none())
        {
            node.end_session(&mut out);
        }
    }
    tracing::info!("stopping: ending the session, making the journal durable");
    stop_conns.cancel();
    let _ = accept_task.await;
    if let Some(t) = dial_task {
        let _ = t.await;
    }
    observers.stop().await;
    ctx.control.set(None);
    readonly_stop.cancel();
    if let Some((_, task)) = readonly_export {
        // Readers finish first; their reads need the node loop, which runs in settle().
        task.abort();
    }
    let promoting = *ctx.promoting.lock().expect("promoting lock");
    node.finish(promoting, &mut jdone_rx, &mut meta_rx, &mut events_rx)
        .await
}

impl Node {
    fn meta(&self) -> &MetaWorker {
        self.meta
            .as_ref()
            .expect("metadata worker runs until finish")
    }

    /// Hand a job to the metadata thread; returns its number (jobs finish in order).
    fn send_meta(&mut self, job: MetaJob) -> u64 {
        self.meta().send(job);
        self.meta_sent += 1;
        self.meta_sent
    }

    /// The consistent point's newest write goes into the next superblock written:
    /// what status reports after a restart that left no newer record.
    fn note_consistent_write(&mut self) {
        if let Some((_, seq, at_ms)) = self.engine.consistent_point()
            && at_ms >= self.sb.consistent_at_ms
        {
            self.sb.consistent_seq = seq.0;
            self.sb.consistent_at_ms = at_ms;
        }
    }

    fn write_superblock(&mut self) -> u64 {
        if self.sb.disk_state != self.recorded_disk_state {
            // Event (hardening): the node's disk state changed.
            self.metrics.events.emit(EventKind::DiskState {
                disk_state: self.sb.disk_state.to_string(),
                previous: self.recorded_disk_state.to_string(),
            });
            self.recorded_disk_state = self.sb.disk_state;
        }
        let sb = self.sb.clone();
        self.send_meta(MetaJob::Superblock { sb })
    }

    /// Carry out engine actions.
    fn act(&mut self, out: &mut Actions) {
        while !out.is_empty() {
            let batch = std::mem::take(out);
            for a in batch {
                self.act_one(a, out);
            }
        }
        if self.engine.is_poisoned() && !self.sb.poisoned {
            // Issue 9 item 5: a failed journal or volume write is remembered
            // across restarts: the next start compares every block with the
            // primary, and the node is not promoted without --force.
            self.sb.poisoned = true;
            self.metrics
                .set_error("a journal or volume write failed: the node is poisoned".into());
            self.write_superblock();
        }
    }

    fn act_one(&mut self, action: SecondaryAction<Bytes>, _out: &mut Actions) {
        match action {
            SecondaryAction::Append { record, data } => {
                if record.kind.changes_data() {
                    Metrics::add(&self.metrics.applied_writes, 1);
                    Metrics::add(&self.metrics.applied_bytes, record.range.len);
                }
                self.jh.append(&record, data);
            }
            SecondaryAction::SyncJournal { .. } => self.jh.sync(),
            SecondaryAction::Checkpoint {
                from,
                through,
                volume_consistent_after,
            } => {
                // A copy that ends inside a resync section leaves the volume alone
                // mixed: recorded durably before the copy. If it also goes past the
                // consistent point (resync-overflow = inconsistent), the node has
                // no consistent image left until the section ends.
                let past_consistent = self
                    .engine
                    .consistent_point()
                    .is_none_or(|(lsn, _, _)| through > lsn);
                // The superblock also says how far the copy may reach (a cut copy
                // leaves pieces of any record up to `through` in the volume).
                let mixes = !volume_consistent_after
                    && (!self.sb.volume_mixed || through.0 > self.sb.mixed_through);
                // A poisoned node has no consistent image to lose: its state
                // stays what it held before the failure, whose generations the
                // handshake compares (recovery::handshake_image).
                let loses = !volume_consistent_after
                    && past_consistent
                    && self.sb.disk_state != DiskState::Inconsistent
                    && !self.sb.poisoned;
                if mixes || loses {
                    self.sb.volume_mixed = true;
                    self.sb.mixed_through = self.sb.mixed_through.max(through.0);
                    if loses {
                        tracing::warn!(
                            "copying an unfinished resync into the volume (resync-overflow = inconsistent): the node is Inconsistent until it completes"
                        );
                        self.sb.disk_state = DiskState::Inconsistent;
                    }
                    let job = self.write_superblock();
                    self.checkpoint_waiting = Some((from, through, volume_consistent_after, job));
                } else {
                    self.start_checkpoint(from, through, volume_consistent_after);
                }
            }
            SecondaryAction::StartHash {
                seq,
                range,
                unit_bytes,
                hashes,
                sources,
            } => {
                let volume = self.volume.clone();
                let jh = self.jh.clone();
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    let result =
                        hash_image(&volume, &jh, range, unit_bytes, &hashes, &sources).await;
                    let _ = tx.send(Event::Hashed { seq, result }).await;
                });
            }
            SecondaryAction::SendApplied { seq } => self.ack(Message::Applied { seq: seq.0 }),
            SecondaryAction::SendDurable { through } => self.ack(Message::Durable {
                through_seq: through.0,
            }),
            SecondaryAction::SendSectionDone { through } => {
                // Only once the superblock naming the primary's generation is
                // durable: the primary then records that this node holds it.
                if let Some(s) = &self.session {
                    self.section_done_waiting = Some((s.id, through, self.meta_sent));
                    self.send_section_done();
                }
            }
            SecondaryAction::SendHashReply { seq, mismatched } => {
                Metrics::add(
                    &self.metrics.verify_mismatched_blocks,
                    mismatched.len() as u64,
                );
                self.ack(Message::HashReply {
                    seq: seq.0,
                    mismatched,
                })
            }
            SecondaryAction::MarkConsistent { through, at_ms } => {
                let primary = self.session.as_ref().map(|s| s.primary_gen);
                let was = (self.sb.gen_current, self.sb.disk_state);
                if let Some(g) = primary {
                    self.sb = recovery::adopt_generation(&self.sb, g);
                }
                // The node's image (volume and journal through this point) is
                // consistent; the volume alone may not be yet (a first copy whose
                // records are not all copied): the checkpointer clears that.
                self.sb.disk_state = DiskState::UpToDate;
                self.full_sync_done(); // ha: the resync owed since an invalidate
                self.sb.volume_mixed = !self.engine.is_volume_consistent();
                if !self.sb.volume_mixed {
                    self.sb.mixed_through = 0;
                }
                self.note_consistent_write();
                if self.own_dirty.dirty_count().0 > 0 || self.own_verify.dirty_count().0 > 0 {
                    self.own_dirty.clear_all();
                    self.own_verify.clear_all();
                    let bitmap = self.own_dirty.clone();
                    self.send_meta(MetaJob::Bitmap { bitmap });
                    if self.sb.poisoned && !self.engine.is_poisoned() {
                        // The primary compared every block since the failed write
                        // (recovery::secondary_start): the image is whole again.
                        tracing::info!(
                            "every block compared with the primary since the failed write: no longer poisoned"
                        );
                        self.sb.poisoned = false;
                    }
                }
                self.write_superblock();
                if was != (self.sb.gen_current, self.sb.disk_state) {
                    tracing::info!(generation = %self.sb.gen_current, journal_lsn = through.0, newest_write_at_ms = at_ms, "in sync with the primary: a consistent image");
                    self.metrics.events.push(
                        "consistent",
                        format!("consistent through the primary's write of {at_ms} ms"),
                    );
                }
            }
            SecondaryAction::MarkSectionOpen => {
                if let Some(s) = &self.session {
                    self.sb = recovery::sync_target(&self.sb, s.primary_gen);
                    self.write_superblock();
                }
                tracing::info!(
                    "resync section open: the last consistent image is kept in the journal until it ends"
                );
            }
            SecondaryAction::Fail { fault } => {
                if fault.repeats_at_each_reconnect() {
                    // The primary dials again every few seconds and meets the same
                    // refusal until an operator acts: the first in full, then a
                    // summary per interval.
                    crate::ratelog::global().record(
                        "secondary.resync-refused",
                        crate::ratelog::Level::Error,
                        || format!("stopping the session: {fault}"),
                    );
                } else {
                    tracing::error!("stopping the session: {fault}");
                }
                self.metrics.set_error(fault.to_string());
                self.metrics
                    .events
                    .push("session-refused", fault.to_string());
                self.ack(Message::Refuse {
                    reason: fault.to_string(),
                });
                if let Some(s) = self.session.take() {
                    tracing::info!(session = s.id, "session ended by this node");
                }
            }
        }
    }

    /// Send the `SectionDone` waiting for its metadata, if that is durable and
    /// the session it belongs to is still the current one.
    fn send_section_done(&mut self) {
        let Some((session, through, job)) = self.section_done_waiting else {
            return;
        };
        if self.meta_done < job {
            return;
        }
        self.section_done_waiting = None;
        if self.session.as_ref().is_some_and(|s| s.id == session) {
            self.ack(Message::SectionDone {
                through_seq: through.0,
            });
        }
    }

    fn ack(&self, msg: Message) {
        if let Some(s) = &self.session {
            // Full: the primary does not read its acks; the session dies of that.
            let _ = s.acks.try_send(link::control_frame(msg));
        }
    }

    fn start_checkpoint(&mut self, from: Lsn, through: Lsn, volume_consistent_after: bool) {
        let records: Vec<Record> = self
            .engine
            .records_between(from, through)
            .copied()
            .collect();
        // simfix: the image's newest write through `through`, not only this
        // batch's (a batch of markers only, its writes copied earlier while the
        // volume was mixed, recorded none: simulator seed 303364 async).
        let newest = Some(self.engine.newest_write_through(through));
        self.copying = Some((through, volume_consistent_after, newest));
        let volume = self.volume.clone();
        let jh = self.jh.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let result = copy_records(&volume, &jh, &records).await;
            let _ = tx.send(Event::Checkpointed(result)).await;
        });
    }

    /// The records of a checkpoint are in the volume, durably. Before they are
    /// released, a volume that now holds a consistent image on its own must be
    /// recorded as such (a node whose journal is empty and whose superblock says
    /// its volume is mixed has no consistent image to recover).
    fn on_copied(&mut self, result: Result<(), String>, out: &mut Actions) {
        let (through, volume_consistent_after, newest) =
            self.copying.take().expect("a checkpoint was copying");
        if result.is_err() {
            self.engine.checkpointed(result, out);
            return;
        }
        // The volume's newest write is recorded too (the consistent point a
        // restart reports when the journal then holds nothing newer).
        let newer = newest
            .filter(|&(_, at_ms)| volume_consistent_after && at_ms > self.sb.consistent_at_ms);
        if volume_consistent_after && (self.sb.volume_mixed || newer.is_some()) {
            self.sb.volume_mixed = false;
            self.sb.mixed_through = 0;
            if let Some((seq, at_ms)) = newer {
                self.sb.consistent_seq = seq.0;
                self.sb.consistent_at_ms = at_ms;
            }
            let job = self.write_superblock();
            self.release_waiting = Some((through, job));
            return;
        }
        self.jh.release(through);
        self.engine.checkpointed(Ok(()), out);
    }

    fn on_journal(&mut self, done: JournalDone, out: &mut Actions) {
        match done {
            JournalDone::Synced(r) => self.engine.journal_synced(r, out),
            JournalDone::Released(r) => {
                if let Err(e) = r {
                    tracing::error!("releasing journal records failed: {e}");
                    self.metrics.set_error(format!("journal: {e}"));
                }
            }
            JournalDone::Truncated(r) => {
                if let Err(e) = &r {
                    tracing::error!("truncating the journal failed: {e}");
                }
                if !self.invalidation_truncated(&r) {
                    // ha
                    self.rollback_truncated(r); // dr (issue 10)
                }
            }
        }
        self.act(out);
        self.retry_held(out);
    }

    fn on_meta(&mut self, done: MetaDone, out: &mut Actions) {
        let r = match done {
            MetaDone::Activity(r) | MetaDone::Bitmap(r) | MetaDone::Superblock(r) => r,
            // ha (issue 12): online grow.
            MetaDone::Grow(r) => {
                self.grow_recorded(&r);
                r.map(|_| ())
            }
        };
        let failed = r.as_ref().err().cloned();
        if let Err(e) = r {
            tracing::error!(
                "metadata write failed: {e}; the node is poisoned, restart it after checking the disk"
            );
            self.metrics
                .set_error(format!("metadata write failed: {e}"));
            self.metrics.events.emit(EventKind::IoError {
                op: "metadata".into(),
                error: e,
                offset: None,
                len: None,
            });
        }
        self.meta_done += 1;
        // ha: `tandem outdate` is answered once its superblock is durable.
        if self
            .outdate_waiting
            .as_ref()
            .is_some_and(|(job, _, _)| self.meta_done >= *job)
        {
            let (_, reply, message) = self.outdate_waiting.take().expect("checked");
            let _ = reply.send(match &failed {
                None => ControlReply::success(serde_json::json!({ "message": message })),
                Some(e) => ControlReply::error(format!(
                    "writing the Outdated state failed: {e}; the node is poisoned"
                )),
            });
        }
        if failed.is_none() {
            self.send_section_done();
        }
        self.step_rollback(); // dr (issue 10)
        self.step_invalidation(failed.as_deref()); // ha
        if let Some((from, through, after, job)) = self.checkpoint_waiting
            && self.meta_done >= job
        {
            self.checkpoint_waiting = None;
            self.start_checkpoint(from, through, after);
        }
        if let Some((through, job)) = self.release_waiting
            && self.meta_done >= job
        {
            self.release_waiting = None;
            self.jh.release(through);
            self.engine.checkpointed(Ok(()), out);
        }
        self.act(out);
    }

    async fn on_event(&mut self, ev: Event, out: &mut Actions) {
        match ev {
            Event::Conn { stream, announce } => {
                if self.session.is_some() {
                    let (_rd, mut wr) = stream.into_split();
                    link::send_refusal(&mut wr, crate::agent::ALREADY_CONNECTED).await;
                    return;
                }
                if self.invalidating() {
                    // ha: no session starts before the invalidation is durable.
                    let (_rd, mut wr) = stream.into_split();
                    link::send_refusal(
                        &mut wr,
                        "the secondary is being invalidated (tandem invalidate); retry shortly",
                    )
                    .await;
                    return;
                }
                if self.rollback.is_some() {
                    // dr (issue 10): no session starts while the image is cut back.
                    let (_rd, mut wr) = stream.into_split();
                    link::send_refusal(&mut wr, "the secondary is rolling back; retry shortly")
                        .await;
                    return;
                }
                let peer = stream.peer_addr();
                if self.engine.is_poisoned() {
                    // Issue 9 item 5: a session would attach and never progress
                    // (the engine takes nothing after a failed write). Say why.
                    let reason = "this secondary's disk failed a write (poisoned): restart it after checking the disk";
                    let (_rd, mut wr) = stream.into_split();
                    link::send_refusal(&mut wr, reason).await;
                    crate::agent::log_repeated(
                        "handshake:poisoned",
                        || tracing::warn!(%peer, "session refused: {reason}"),
                    );
                    return;
                }
                if let Err(reason) = self.handshake(stream, announce).await {
                    if reason.is_empty() {
                        return;
                    }
                    crate::agent::log_repeated(
                        &format!("handshake:{reason}"),
                        || tracing::warn!(%peer, "session refused: {reason}"),
                    );
                }
            }
            Event::SessionEnd { session, reason } => {
                if let Some(s) = self.session.as_mut()
                    && s.id == session
                {
                    // Ended by the node loop once the frames before it are in.
                    s.ending = Some(reason);
                }
            }
            Event::Checkpointed(r) => self.on_copied(r, out),
            Event::Hashed { seq, result } => self.engine.hash_done(seq, result, out),
            Event::Control(cmd) => self.on_control(cmd).await,
        }
        self.act(out);
    }

    /// The session whose reader ended: every frame it read is in the engine now.
    fn end_session(&mut self, out: &mut Actions) {
        if let Some(reason) = self.session.as_mut().and_then(|s| s.ending.take()) {
            let s = self.session.take().expect("checked");
            tracing::info!(session = s.id, primary = %s.peer, disk = %self.disk_state_shown(), "primary detached: {reason}");
            self.metrics.set_connected(false, &reason);
            if reason.contains("Goodbye (outdated)") {
                self.sb = recovery::outdate(&self.sb);
                self.write_superblock();
                tracing::warn!(
                    "the primary stopped without draining: this node is Outdated (consistent, but it lacks writes); promoting it needs --force"
                );
                self.metrics
                    .events
                    .push("outdated", "the primary stopped without draining".into());
            }
            self.engine.session_ended(out);
        }
        self.act(out);
    }

    /// Feed one frame to the engine, or hold it while the journal has no room.
    fn feed(&mut self, frame: Box<Frame>, data: Option<Bytes>, out: &mut Actions) {
        if let Some(s) = &mut self.session
            && s.held.is_some()
        {
            // Cannot happen: the reader waits while one is held.
            s.held = Some((frame, data));
            return;
        }
        match self.engine.room(out) {
            Room::Free => {}
            Room::Wait => {
                if let Some(s) = &mut self.session {
                    s.held = Some((frame, data));
                }
                return;
            }
            Room::Stuck => return,
        }
        let now = crate::agent::unix_now_ms();
        let seq = Seq(frame.seq);
        let incoming = match frame.msg {
            Message::ResyncStart { blocks, full } => {
                if blocks > 0 {
                    tracing::info!(
                        blocks,
                        bytes = blocks.saturating_mul(self.cfg.block_size as u64),
                        full,
                        "primary announces a resync"
                    );
                }
                Incoming::ResyncStart {
                    next: seq,
                    blocks,
                    full,
                }
            }
            Message::Write { offset, fua, at_ms } => {
                let data = data.expect("the reader opens payloads of writes");
                Incoming::Write {
                    seq,
                    offset,
                    fua,
                    at_ms,
                    len: data.len() as u64,
                    data,
                }
            }
            Message::WriteZeroes {
                offset,
                len,
                fua,
                at_ms,
            } => Incoming::Zeroes {
                seq,
                offset,
                len,
                fua,
                at_ms,
            },
            Message::Trim { offset, len, at_ms } => Incoming::Trim {
                seq,
                offset,
                len,
                at_ms,
            },
            Message::Flush => Incoming::Flush { through: seq },
            // ha (issue 12): online grow, in frame order.
            Message::Grow { size_bytes } => {
                self.start_grow(size_bytes);
                return;
            }
            Message::ResyncDone { through_seq } => Incoming::ResyncDone {
                through: Seq(through_seq),
            },
            Message::HashCheck {
                offset,
                block_size,
                hashes,
            } => {
                let mut buf = BytesMut::with_capacity(hashes.len() * 32);
                for h in &hashes {
                    buf.extend_from_slice(h);
                }
                Incoming::HashCheck {
                    seq,
                    offset,
                    unit_bytes: block_size,
                    count: hashes.len() as u32,
                    hashes: buf.freeze(),
                }
            }
            other => {
                let reason = format!("unexpected message kind {} from the primary", other.kind());
                out.push(SecondaryAction::Fail {
                    fault: secondary::Fault::BeforeStart {
                        what: "an unexpected message",
                    },
                });
                tracing::warn!("{reason}");
                return;
            }
        };
        self.engine.receive(incoming, now, out);
    }

    /// Frames held back for journal room go in when there is room.
    fn retry_held(&mut self, out: &mut Actions) {
        let Some(s) = &mut self.session else { return };
        let Some((frame, data)) = s.held.take() else {
            return;
        };
        self.feed(frame, data, out);
        self.act(out);
    }

    /// Tell the primary where this node's consistent image stands (a few times a
    /// second at most).
    fn report_consistent(&mut self) {
        let point = self.engine.consistent_point().map(|(_, seq, at)| (seq, at));
        let Some(s) = &mut self.session else { return };
        if point.is_none()
            || point == s.last_consistent_sent
            || s.last_consistent_at.elapsed() < Duration::from_millis(250)
        {
            return;
        }
        s.last_consistent_sent = point;
        s.last_consistent_at = Instant::now();
        let (seq, at_ms) = point.expect("checked");
        let _ = s.acks.try_send(link::control_frame(Message::Consistent {
            seq: seq.0,
            at_ms,
        }));
    }

    /// Decide a handshake (engine/handshake.rs) and start the session.
    /// Err(""): a quiet end (both secondary, already connected).
    async fn handshake(&mut self, stream: PeerStream, announce: bool) -> Result<(), String> {
        let peer_addr = stream.peer_addr();
        let cfg = self.cfg.clone();
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(1 << 20, rd);
        if announce {
            link::send_message(&mut wr, Message::Hello(self.hello()))
                .await
                .map_err(|e| format!("sending Hello: {e}"))?;
        }
        let mut scratch = BytesMut::new();
        let first = tokio::time::timeout(
            Duration::from_millis(cfg.connect_timeout_ms),
            wire::read_frame(&mut rd, &mut scratch),
        )
        .await
        .map_err(|_| format!("no Hello within {} ms", cfg.connect_timeout_ms))?
        .map_err(|e| format!("reading Hello: {e}"))?;
        let hello = match first.msg {
            Message::Hello(h) => h,
            Message::Refuse { reason } if reason.contains(crate::agent::ALREADY_CONNECTED) => {
                return Err(String::new());
            }
            Message::Refuse { reason } => return Err(format!("the peer refused: {reason}")),
            other => return Err(format!("expected Hello, got message kind {}", other.kind())),
        };
        let local = self.local();
        // ha (issue 12): a primary larger than this node (a pair cut mid-grow):
        // once everything else of its Hello checks out, this node grows to it
        // and the primary redials.
        // Only a node that already holds this volume (not a new one: a larger
        // primary is then a misconfiguration, refused naming both sizes).
        if hello.size_bytes > local.size_bytes && hello.role == wire::ROLE_PRIMARY && !local.is_new
        {
            let probe = Local {
                size_bytes: hello.size_bytes,
                ..local.clone()
            };
            if handshake::decide(&hello, &probe).is_ok() {
                let reason = if self.growing.is_some() {
                    "the secondary is growing its volume to the primary's size; retry shortly"
                        .to_string()
                } else {
                    self.grow_for_handshake(&hello.node_name, hello.size_bytes)
                };
                link::send_refusal(&mut wr, &reason).await;
                return Err(reason);
            }
        }
        let plan = match handshake::decide(&hello, &local) {
            Ok(p) => p,
            Err(refusal) => {
                if !refusal.is_quiet() {
                    tracing::error!(peer = %peer_addr, "refusing primary: {refusal}");
                    self.metrics.set_error(refusal.to_string());
                    self.handshake_text = Some(format!("refused: {refusal}"));
                    let event = if refusal.is_split_brain() {
                        EventKind::SplitBrain {
                            peer: hello.node_name.clone(),
                            local_generation: self.sb.gen_current.to_string(),
                            peer_generation: Generation(hello.generations.current).to_string(),
                            resolution: None,
                            detail: refusal.to_string(),
                        }
                    } else {
                        EventKind::HandshakeRefused {
                            peer_addr: peer_addr.to_string(),
                            stage: "hello".into(),
                            reason: refusal.to_string(),
                        }
                    };
                    self.metrics.events.emit(event);
                }
                link::send_refusal(&mut wr, &refusal.to_string()).await;
                return Err(if refusal.is_quiet() {
                    String::new()
                } else {
                    refusal.to_string()
                });
            }
        };
        if plan.discards_local {
            match write_discard_report(self, &hello.node_name, &plan) {
                Ok(path) => {
                    tracing::warn!(report = %path.display(), changed_blocks = self.own_dirty.dirty_count().0, "{plan}; this node's changed ranges are listed in the report");
                    self.discard_local = false;
                }
                Err(reason) => {
                    tracing::error!("{reason}");
                    link::send_refusal(&mut wr, &reason).await;
                    return Err(reason);
                }
            }
        }
        tracing::info!(
            primary = %hello.node_name,
            primary_generation = %Generation(hello.generations.current),
            primary_base = %Generation(hello.generations.bitmap_base),
            primary_changed_blocks = hello.changed_blocks,
            generation = %self.sb.gen_current,
            base = %self.sb.gen_bitmap_base,
            own_changed_blocks = self.own_dirty.dirty_count().0,
            "handshake decision: {plan}"
        );
        self.handshake_text = Some(plan.to_string());
        // An open resync section too large to finish is dropped; its blocks are
        // listed as this node's own (persisted first) so the primary resends them.
        // Some also for a section of markers only (no ranges): the journal is
        // truncated whenever the engine dropped records (seed 914662 sync).
        if let Some(dropped) = self.engine.restart_large_section() {
            let bs = self.cfg.block_size;
            for r in &dropped {
                let (a, b) = r.blocks(bs);
                self.own_dirty.mark(a, b);
            }
            tracing::warn!(
                ranges = dropped.len(),
                "dropping an unfinished resync that filled half the journal; its blocks are resent"
            );
            self.persist_own_bitmap_now().await?;
            self.jh.truncate(self.engine.tail());
        }
        if self.sb.is_new {
            // Adopt the primary's identity (G6) before anything is written; the
            // journal is recreated for it (a new node's is empty).
            self.sb = recovery::adopt_identity(
                &self.sb,
                VolumeId(hello.volume_id),
                Generation(hello.generations.current),
            );
            self.recreate_journal().await?;
            self.write_superblock();
            tracing::info!(volume_id = %self.sb.volume_id, "new secondary adopted the primary's volume identity");
        }
        // A bitmap resync covers what this node changed (or dropped) on its own too.
        let (own_dirty, own_verify) = if plan.sync == SyncPlan::Bitmap {
            (
                self.own_dirty.runs(wire::RUNS_PER_WELCOME_MAX),
                self.own_verify.runs(wire::RUNS_PER_WELCOME_MAX),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            volume_id: self.sb.volume_id.0,
            size_bytes: self.volume.size_bytes(),
            block_size: cfg.block_size,
            node_name: cfg.name.clone(),
            role: wire::ROLE_SECONDARY,
            disk_state: disk_code(self.sb.disk_state, self.sb.is_new),
            generations: wire::Generations {
                current: self.sb.gen_current.0,
                bitmap_base: self.sb.gen_bitmap_base.0,
                history: [self.sb.gen_history[0].0, self.sb.gen_history[1].0],
            },
            // wan (issue 11 item 4); ha (issue 12): online grow.
            capabilities: caps::ZSTD | caps::ZSTD_STREAM | caps::GROW,
            needs: plan.sync,
            own_dirty,
            own_verify,
            decision: plan.to_string(),
            stage_bytes: self.engine.stage_bytes(),
        };
        link::send_message(&mut wr, Message::Welcome(welcome))
            .await
            .map_err(|e| format!("sending Welcome: {e}"))?;
        tracing::info!(peer = %peer_addr, primary = %hello.node_name, primary_next_seq = hello.first_seq, plan = ?plan.sync, disk = %self.sb.disk_state, "primary attached");
        self.metrics.set_connected(true, &hello.node_name);
        self.metrics.clear_error();
        Metrics::add(&self.metrics.sessions, 1);
        let id = self.next_session;
        self.next_session += 1;
        let (ack_tx, ack_rx) = mpsc::channel(link::WRITER_QUEUE_FRAMES_MAX);
        let (hb_tx, hb_rx) = mpsc::channel(8);
        tokio::spawn(link::run_writer(
            wr,
            ack_rx,
            hb_rx,
            cfg.heartbeat_interval_ms,
        ));
        let (frames_tx, frames_rx) = mpsc::channel(64);
        tokio::spawn(frame_reader(
            FrameReader::new(rd, cfg.peer_timeout_ms, Some(hb_tx))
                .with_stream_decoding(hello.capabilities & caps::ZSTD_STREAM != 0), // wan
            id,
            frames_tx,
            self.events_tx.clone(),
            self.metrics.clone(),
        ));
        self.new_frames = Some(frames_rx);
        self.session = Some(Session {
            id,
            peer: hello.node_name.clone(),
            primary_gen: Generation(hello.generations.current),
            acks: ack_tx,
            held: None,
            last_consistent_sent: None,
            last_consistent_at: Instant::now(),
            ending: None,
        });
        let _ = Plan::clone(&plan);
        Ok(())
    }

    async fn persist_own_bitmap_now(&mut self) -> Result<(), String> {
        // Through the worker, in order; the handshake waits for nothing else.
        let mut bitmap = self.own_dirty.clone();
        bitmap.union_with(&self.own_verify);
        self.send_meta(MetaJob::Bitmap { bitmap });
        Ok(())
    }

    async fn recreate_journal(&mut self) -> Result<(), String> {
        // The journal of a new node holds nothing (no session ever attached): make a
        // new one under the adopted identity.
        if self.engine.tail() != self.engine.applied() {
            return Err("a new node's journal holds records; refusing to recreate it".into());
        }
        if let Some(j) = self.journal.take() {
            j.stop();
        }
        let _ = std::fs::remove_file(&self.cfg.journal);
        let opened = journal::open(
            &self.cfg.journal,
            self.sb.volume_id,
            self.cfg.block_size,
            self.cfg.journal_bytes,
            journal::Create::Fallocated,
            false,
            self.jdone_tx.clone(),
        )
        .map_err(|e| e.to_string())?;
        self.jh = opened.thread.handle();
        self.journal = Some(opened.thread);
        Ok(())
    }
}

impl Node {
    /// What the handshake decision needs to know about this node.
    fn local(&self) -> Local {
        let (has_consistent_image, inconsistent) = recovery::handshake_image(
            &self.sb,
            self.engine.is_section_open(),
            self.engine.consistent_point().is_some(),
        );
        Local {
            name: self.cfg.name.clone(),
            peer_name: self.cfg.peer_name.clone(),
            size_bytes: self.volume.size_bytes(),
            block_size: self.cfg.block_size,
            volume_id: self.sb.volume_id,
            is_new: self.sb.is_new,
            gens: GenInfo {
                current: self.sb.gen_current,
                bitmap_base: self.sb.gen_bitmap_base,
                history: self.sb.gen_history,
                changed_blocks: self.own_dirty.dirty_count().0,
                promoted_at_s: self.sb.promoted_at_s,
                inconsistent,
            },
            has_consistent_image,
            compare_by_hash: self.compare_by_hash && !self.has_completed_a_sync(),
            discard_local: self.discard_local,
            full_sync_owed: recovery::full_sync_owed(&self.sb), // ha
            policy: self.cfg.split_brain_policy.clone(),
            meta_path: self.cfg.meta.display().to_string(),
        }
    }

    /// A pre-seeded node compares by hash only until its first sync completed.
    fn has_completed_a_sync(&self) -> bool {
        !self.sb.is_new
            && self.sb.gen_current != Generation::NONE
            && self.sb.disk_state != DiskState::Inconsistent
    }

    /// The Hello this node sends when it dials its primary (role secondary).
    fn hello(&self) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            volume_id: self.sb.volume_id.0,
            size_bytes: self.volume.size_bytes(),
            block_size: self.cfg.block_size,
            node_name: self.cfg.name.clone(),
            peer_name: self.cfg.peer_name.clone(),
            role: wire::ROLE_SECONDARY,
            disk_state: disk_code(self.sb.disk_state, self.sb.is_new),
            generations: wire::Generations {
                current: self.sb.gen_current.0,
                bitmap_base: self.sb.gen_bitmap_base.0,
                history: [self.sb.gen_history[0].0, self.sb.gen_history[1].0],
            },
            capabilities: caps::ZSTD,
            first_seq: 0,
            changed_blocks: self.own_dirty.dirty_count().0,
            promoted_at_s: self.sb.promoted_at_s,
        }
    }

    /// The status document, published for the control socket on every tick.
    fn status(&self) -> StatusDoc {
        let m = &self.metrics;
        let mut doc = StatusDoc::build(
            &self.cfg,
            Role::Secondary,
            m,
            self.session
                .as_ref()
                .map(|s| (s.peer.clone(), "UpToDate".to_string())),
            self.disk_state_shown(),
            0,
            0,
            self.own_dirty.dirty_count(),
            None,
            self.sb.volume_id,
            self.sb.gen_current,
        );
        doc.size_bytes = self.volume.size_bytes(); // ha (issue 12)
        doc.generations = Some(GenerationsStatus::of(&self.sb));
        doc.handshake = self.handshake_text.clone();
        doc.poisoned = self.sb.poisoned;
        doc.consistent_point =
            self.engine
                .consistent_point()
                .map(|(lsn, seq, at_ms)| control::ConsistentStatus {
                    seq: seq.0,
                    at_unix_ms: at_ms,
                    age_s: if at_ms > 0 {
                        crate::agent::unix_now_ms().saturating_sub(at_ms) as f64 / 1000.0
                    } else {
                        0.0
                    },
                    journal_lsn: lsn.0,
                    resync_open: self.engine.is_section_open(),
                    // dr (issue 10)
                    behind_s: self.engine.newest_received().1.saturating_sub(at_ms) as f64 / 1000.0,
                });
        doc.journal = Some(control::JournalStatus {
            path: self.cfg.journal.display().to_string(),
            capacity_bytes: self.cfg.journal_bytes,
            used_bytes: self.engine.live_bytes(),
            records: self.journal_counts.map_or(0, |(_, records, _)| records),
            points: self.journal_counts.map_or(0, |(_, _, points)| points),
        });
        doc
    }

    /// The disk state an operator means: the image's (Inconsistent only when no
    /// consistent image exists at all; Outdated when known stale).
    fn disk_state_shown(&self) -> DiskState {
        match (self.engine.consistent_point(), self.sb.disk_state) {
            (None, _) => DiskState::Inconsistent,
            (Some(_), DiskState::Outdated) => DiskState::Outdated,
            (Some(_), _) => DiskState::UpToDate,
        }
    }

    fn publish(&mut self) {
        let fresh = self
            .journal_counts
            .is_some_and(|(at, _, _)| at.elapsed() < JOURNAL_COUNTS_MAX_AGE);
        if !fresh {
            let records = self.engine.records().count() as u64;
            let points = self.engine.points(usize::MAX).len() as u64;
            self.journal_counts = Some((Instant::now(), records, points));
        }
        let doc = self.status();
        self.snapshot.lock().expect("snapshot lock").doc = Some(doc);
    }

    async fn on_control(&mut self, cmd: ControlCmd) {
        match cmd {
            ControlCmd::ImageRead { view, range, reply } => {
                let answer = match view {
                    ImageView::Consistent => self
                        .engine
                        .begin_consistent_read(range)
                        .map(|s| (s, self.jh.clone()))
                        .ok_or_else(|| {
                            "this secondary holds no consistent image yet (its first copy is running)"
                                .to_string()
                        }),
                    ImageView::Inspection(id) => match &self.inspection {
                        Some(i)
                            if i.id == id
                                && self.engine.pin() == Some(i.lsn)
                                && i.lsn >= self.engine.applied() =>
                        {
                            Ok((self.engine.begin_view_read(&i.view, range), self.jh.clone()))
                        }
                        _ => Err("the inspection ended (stopped, rolled back, or its point left the journal to make room for replication); start a new one with `tandem inspect`".to_string()),
                    },
                };
                let started = answer.is_ok();
                if reply.send(answer).is_err() && started {
                    let mut out = Vec::new();
                    self.engine.end_read(&mut out);
                    self.act(&mut out);
                }
            }
            ControlCmd::ExportReadDone => {
                let mut out = Vec::new();
                self.engine.end_read(&mut out);
                self.act(&mut out);
            }
            ControlCmd::Points(reply) => {
                // dr (issue 10): the typed list `tandem points` prints.
                let doc = crate::dr::PointsDoc {
                    points: self.point_docs(),
                    inspection: self.inspection.as_ref().map(|i| crate::dr::InspectionDoc {
                        nbd: i.nbd.clone(),
                        point: i.point,
                    }),
                };
                let _ = reply.send(ControlReply::success(
                    serde_json::to_value(doc).expect("points serialize"),
                ));
            }
            // ha (issue 12 item 2): the primary is about to write without this node
            // (its fencing handler calls this): consistent, but it will lack writes.
            ControlCmd::Outdate(reply) => {
                if let Some(s) = &self.session {
                    let _ = reply.send(ControlReply::error(format!(
                        "{} is connected to its primary {}: it receives every write, so it is not outdated; \
                         cut the link first (the primary's fencing handler runs once it lost this node)",
                        self.cfg.name, s.peer
                    )));
                    return;
                }
                let before = self.sb.disk_state;
                self.sb = recovery::outdate(&self.sb);
                let message = format!(
                    "{} is {} (was {before}); it becomes UpToDate again once resynced from its primary",
                    self.cfg.name, self.sb.disk_state
                );
                if self.sb.disk_state != before {
                    let job = self.write_superblock();
                    tracing::warn!(
                        "outdated by the primary's fencing handler: this node's data is consistent but will lack the primary's writes; promoting it needs --force"
                    );
                    self.metrics.events.push(
                        "outdated",
                        "outdated by the primary's fencing handler (tandem outdate)".into(),
                    );
                    // Answered once durable (on_meta): the handler's success must hold
                    // across a crash of this node.
                    if let Some((_, earlier, _)) =
                        self.outdate_waiting.replace((job, reply, message))
                    {
                        let _ = earlier.send(ControlReply::error(
                            "superseded by a later tandem outdate".into(),
                        ));
                    }
                    return;
                }
                let _ = reply.send(ControlReply::success(
                    serde_json::json!({ "message": message }),
                ));
            }
            ControlCmd::Invalidate(reply) => self.start_invalidation(reply), // ha
            ControlCmd::Rollback { reply, .. } if self.invalidating() => {
                // ha: the image is being discarded.
                let _ = reply.send(ControlReply::error(
                    "an invalidation of this node is under way (tandem invalidate): its data is being discarded, there is nothing to roll back to".into(),
                ));
            }
            ControlCmd::Rollback { to, reply } => self.start_rollback(to, reply),
            ControlCmd::Inspect { start, reply } => {
                let answer = match start {
                    Some((at, nbd)) => self.start_inspection(at, &nbd).await,
                    None => match self.end_inspection("stopped by `tandem inspect --stop`") {
                        Some(m) => Ok(m),
                        None => Err("no inspection is being served".to_string()),
                    },
                };
                let _ = reply.send(match answer {
                    Ok(message) => ControlReply::success(serde_json::json!({ "message": message })),
                    Err(e) => ControlReply::error(e),
                });
            }
            ControlCmd::DiscardLocal(reply) => {
                self.discard_local = true;
                let mut own = self.own_dirty.clone();
                own.union_with(&self.own_verify);
                let blocks = own.dirty_count().0;
                let message = format!(
                    "at the next connection from {peer}, this node's {blocks} changed blocks ({} bytes) since generation {base} are discarded \
                     and replaced by {peer}'s data; the changed ranges are listed first in {}.split-brain-<time>.txt",
                    blocks.saturating_mul(u64::from(self.cfg.block_size)),
                    self.cfg.meta.display(),
                    peer = self.cfg.peer_name,
                    base = self.sb.gen_bitmap_base,
                );
                tracing::warn!("resolve --discard-local: {message}");
                let _ = reply.send(ControlReply::success(
                    serde_json::json!({ "message": message }),
                ));
            }
        }
    }

    /// Stop: say Goodbye, make the journal durable; for a promotion, bring the
    /// image to its last consistent point and copy it into the volume.
    async fn finish(
        mut self,
        promoting: bool,
        jdone_rx: &mut mpsc::UnboundedReceiver<JournalDone>,
        meta_rx: &mut mpsc::UnboundedReceiver<MetaDone>,
        events_rx: &mut mpsc::Receiver<Event>,
    ) -> Result<String, AgentError> {
        // For a promotion: where the image stands (returned to the caller).
        let mut note = String::new();
        // dr (issue 10): an inspection ends with the node; nothing stays pinned.
        self.end_inspection("the node is stopping");
        if let Some(r) = self.rollback.take() {
            let _ = r.reply.send(ControlReply::error(
                "the node stopped before the rollback completed; the journal holds the image as it was (or as rolled back if the truncation was done): check `tandem points` after the restart".into(),
            ));
        }
        self.engine.set_pin(None);
        self.abandon_invalidation(); // ha
        if let Some(s) = self.session.take() {
            let _ = s
                .acks
                .try_send(link::control_frame(Message::Goodbye { outdated: false }));
        }
        let mut out = Vec::new();
        self.engine.session_ended(&mut out);
        self.settle(&mut out, jdone_rx, meta_rx, events_rx).await?;
        if !promoting {
            // A clean stop copies the consistent image into the volume, so the image
            // file at rest is the replica (the rollback window starts over at the
            // next start); records of an unfinished resync stay in the journal.
            loop {
                let mut out = Vec::new();
                if !self.engine.checkpoint_all(&mut out) {
                    break;
                }
                self.act(&mut out);
                self.settle(&mut out, jdone_rx, meta_rx, events_rx).await?;
            }
        }
        if promoting {
            // The image becomes the consistent point: an open section is dropped
            // (its blocks now differ from the old primary's: they go into this
            // node's bitmap, which the primary role starts from), then everything
            // is copied into the volume.
            if let Some((lsn, seq, at_ms)) = self.engine.consistent_point() {
                // dr (issue 10): the newest write received, before the truncation
                // below forgets the dropped records (e2e_dr_promote).
                let (_, newest_at) = self.engine.newest_received();
                let dropped = if self.engine.is_section_open() || self.engine.tail() > lsn {
                    let d = self.engine.truncate_after(lsn);
                    self.jh.truncate(lsn);
                    d
                } else {
                    Vec::new()
                };
                let bs = self.cfg.block_size;
                for r in &dropped {
                    let (a, b) = r.blocks(bs);
                    self.own_dirty.mark(a, b);
                }
                if !dropped.is_empty() {
                    tracing::warn!(
                        ranges = dropped.len(),
                        "promotion mid-resync: rolled back to the last consistent point; the dropped resync's blocks are resent to the old primary when it rejoins"
                    );
                }
                note = promotion_note(seq, at_ms, newest_at);
                tracing::warn!(seq = seq.0, newest_write_at_ms = at_ms, "promoting {note}");
                self.metrics
                    .events
                    .push("promoted-at", format!("now primary {note}"));
                loop {
                    let mut out = Vec::new();
                    if !self.engine.checkpoint_all(&mut out) && self.engine.is_idle() {
                        break;
                    }
                    self.act(&mut out);
                    self.settle(&mut out, jdone_rx, meta_rx, events_rx).await?;
                    if self.engine.applied() == self.engine.tail() {
                        break;
                    }
                }
            }
        }
        // Persist what this node itself lacks relative to its peer (own changes,
        // dropped records): the next role starts from it.
        let mut bm = self.own_dirty.clone();
        bm.union_with(&self.own_verify);
        let worker = self.meta.take().expect("finish once");
        let (mut store, _) = tokio::task::spawn_blocking(move || worker.finish())
            .await
            .map_err(|e| AgentError::Refused(format!("metadata thread: {e}")))?;
        while meta_rx.try_recv().is_ok() {}
        self.note_consistent_write();
        let mut sb = self.sb.clone();
        sb.volume_mixed = !self.engine.is_volume_consistent();
        if !sb.volume_mixed {
            sb.mixed_through = 0;
        }
        sb.clean_shutdown = true;
        store.persist_bitmap(&mut sb, &bm)?;
        if let Some(j) = self.journal.take() {
            j.stop();
        }
        self.volume
            .flush()
            .await
            .map_err(|e| AgentError::Refused(format!("final flush failed: {e}")))?;
        tracing::info!(disk = %self.disk_state_shown(), "clean shutdown");
        Ok(note)
    }

    /// Run the engine's I/O until it is idle (syncs, checkpoints, comparisons).
    async fn settle(
        &mut self,
        out: &mut Actions,
        jdone_rx: &mut mpsc::UnboundedReceiver<JournalDone>,
        meta_rx: &mut mpsc::UnboundedReceiver<MetaDone>,
        events_rx: &mut mpsc::Receiver<Event>,
    ) -> Result<(), AgentError> {
        self.act(out);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            self.engine.tick(crate::agent::unix_now_ms(), out);
            self.act(out);
            if self.engine.is_idle()
                && self.engine.durable() == self.engine.tail()
                && self.checkpoint_waiting.is_none()
                && self.release_waiting.is_none()
            {
                return Ok(());
            }
            if self.engine.is_poisoned() {
                return Err(AgentError::Refused(
                    "the journal or the volume failed while stopping; check the disk".into(),
                ));
            }
            tokio::select! {
                Some(d) = jdone_rx.recv() => self.on_journal(d, out),
                Some(d) = meta_rx.recv() => self.on_meta(d, out),
                Some(ev) = events_rx.recv() => match ev {
                    Event::Checkpointed(r) => { self.on_copied(r, out); self.act(out) }
                    Event::Hashed { seq, result } => { self.engine.hash_done(seq, result, out); self.act(out) }
                    // A read of the read-only or inspect export that was in flight
                    // when the node stopped: its end releases the journal (else the
                    // stop waits for it forever; reported by the dr helper).
                    Event::Control(ControlCmd::ExportReadDone) => {
                        self.engine.end_read(out);
                        self.act(out)
                    }
                    Event::Conn { stream, .. } => {
                        let (_rd, mut wr) = stream.into_split();
                        link::send_refusal(&mut wr, "the secondary is stopping").await;
                    }
                    _ => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(AgentError::Refused("the journal did not settle within 120 s while stopping".into()));
                }
            }
        }
    }
}

/// How a promotion at the consistent point reads: `at the consistent point of
/// 2026-11-29 12:03:41.220 UTC (write 812), 37.2 s behind the newest write
/// received from the old primary`.
fn promotion_note(seq: Seq, at_ms: u64, newest_received_at_ms: u64) -> String {
    if at_ms == 0 {
        return format!(
            "at the consistent point of write {} (its time is not known)",
            seq.0
        );
    }
    let when = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("{at_ms} ms"));
    let behind = newest_received_at_ms.saturating_sub(at_ms) as f64 / 1000.0;
    if behind > 0.0 {
        format!(
            "at the consistent point of {when} (write {}), {behind:.1} s behind the newest write received from the old primary",
            seq.0
        )
    } else {
        format!(
            "at the consistent point of {when} (write {}), the newest write received from the old primary",
            seq.0
        )
    }
}

/// Remove a redo journal whose records are not part of this node's image (a
/// demoted primary's, from before its promotion; an invalidated node's): check
/// first that it is this volume's (a misconfigured path must not destroy
/// another's). Returns how many records it held.
fn remove_journal(
    cfg: &NodeConfig,
    volume_id: VolumeId,
    done: mpsc::UnboundedSender<JournalDone>,
) -> Result<usize, AgentError> {
    if !cfg.journal.exists() {
        return Ok(0);
    }
    let opened = journal::open(
        &cfg.journal,
        volume_id,
        cfg.block_size,
        cfg.journal_bytes,
        journal::Create::No,
        false,
        done,
    )
    .map_err(|e| AgentError::Refused(format!("{e}")))?;
    let records = opened.records.len();
    opened.thread.stop();
    std::fs::remove_file(&cfg.journal).map_err(|e| {
        AgentError::Refused(format!(
            "cannot remove the redo journal {}: {e}; check the file's directory permissions, or move it aside by hand",
            cfg.journal.display()
        ))
    })?;
    Ok(records)
}

/// Copy journal records into the volume in order (a checkpoint), then make the
/// volume durable. Zero and trim records punch holes where the volume can (a thin
/// secondary stays thin).
async fn copy_records(
    volume: &Volume,
    jh: &JournalHandle,
    records: &[Record],
) -> Result<(), String> {
    use crate::engine::secondary::RecordKind;
    // Writes that overlap none of each other are copied as one batch, up to
    // COPY_BATCH_MAX (and COPY_BATCH_BYTES_MAX) at a time: their payloads come
    // from the journal thread in one hand-off, and on a volume that does not
    // write inline they are written concurrently (one at a time, a checkpoint of
    // a random-write burst, 100 000 records of 4 KiB, ran at one O_DIRECT write
    // per round trip and held back every later frame once the journal was full:
    // sync --direct sequential writes after random ones, 20-40 MB/s against 180
    // fresh). The volume ends the same as copying in order: a write waits for
    // every earlier one it overlaps, zero and trim records for every earlier
    // record.
    let mut batch: Vec<Record> = Vec::new();
    for r in records {
        match r.kind {
            RecordKind::Write => {
                let batch_bytes: u64 = batch.iter().map(|b| b.range.len).sum();
                if batch.len() >= COPY_BATCH_MAX
                    || batch_bytes + r.range.len > COPY_BATCH_BYTES_MAX
                    || batch.iter().any(|b| b.range.overlaps(&r.range))
                {
                    copy_batch(volume, jh, &mut batch).await?;
                }
                batch.push(*r);
            }
            RecordKind::Zeroes | RecordKind::Trim => {
                copy_batch(volume, jh, &mut batch).await?;
                // A zero range stays unallocated (punch_hole writes zeros where
                // the volume cannot punch): write_zeroes' ZERO_RANGE allocates it
                // (issue 11).
                let result = if r.kind == RecordKind::Zeroes {
                    volume.punch_hole(r.range.offset, r.range.len).await
                } else {
                    volume.trim(r.range.offset, r.range.len).await
                };
                result.map_err(|e| copy_failed(r, e.to_string()))?;
            }
            _ => {}
        }
    }
    copy_batch(volume, jh, &mut batch).await?;
    volume
        .flush()
        .await
        .map_err(|e| format!("flushing the volume after a checkpoint failed: {e}"))
}

fn copy_failed(r: &Record, e: String) -> String {
    format!(
        "copying journal record {} ({} bytes at {}) into the volume failed: {e}",
        r.lsn, r.range.len, r.range.offset
    )
}

/// Copy `batch` (write records that overlap none of each other) into the
/// volume and empty it. Every started write finishes before it returns (an
/// error poisons the node; nothing is left writing behind it).
async fn copy_batch(
    volume: &Volume,
    jh: &JournalHandle,
    batch: &mut Vec<Record>,
) -> Result<(), String> {
    if batch.is_empty() {
        return Ok(());
    }
    let batch = std::mem::take(batch);
    let payloads = jh.read_many(batch.iter().map(|r| r.lsn).collect()).await?;
    for (r, data) in batch.iter().zip(&payloads) {
        if data.len() as u64 != r.range.len {
            return Err(format!(
                "journal record {} holds {} bytes for a {}-byte write",
                r.lsn,
                data.len(),
                r.range.len
            ));
        }
    }
    if volume.writes_inline() {
        // Page-cache copies of a few µs each: in order, on this task.
        for (r, data) in batch.iter().zip(&payloads) {
            volume
                .write_inline(r.range.offset, data)
                .map_err(|e| copy_failed(r, e.to_string()))?;
        }
        return Ok(());
    }
    let mut writes: tokio::task::JoinSet<Result<(), String>> = tokio::task::JoinSet::new();
    for (r, data) in batch.iter().zip(payloads) {
        let (volume, r) = (volume.clone(), *r);
        writes.spawn(async move {
            volume
                .write(r.range.offset, data, false)
                .await
                .map_err(|e| copy_failed(&r, e.to_string()))
        });
    }
    let mut first_error = None;
    while let Some(joined) = writes.join_next().await {
        let result = joined.map_err(|e| format!("a checkpoint copy task failed: {e}"))?;
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// How old the status document's journal counts may be (see `Node::journal_counts`):
/// walking a full journal's records every 5 ms tick cost the secondary 3.7% of
/// the machine's CPU in a sync 4 KiB QD32 run (session 11).
const JOURNAL_COUNTS_MAX_AGE: Duration = Duration::from_millis(500);

/// Journal records a checkpoint copies into the volume at once (writes that
/// overlap none of the others in flight), and their bytes in memory at most
/// (a single larger record goes alone). 8 MiB keeps a batch's payloads inside
/// the journal thread's malloc heap: at 64 MiB each batch of 1 MiB records
/// spanned new heaps that were unmapped when it was freed, and re-faulting them
/// cost the secondary ~50,000 page faults per 10 s of sequential 1 MiB writes
/// (session 25); 8 MiB is still 2,048 concurrent 4 KiB writes or eight 1 MiB ones.
const COPY_BATCH_MAX: usize = 128;
const COPY_BATCH_BYTES_MAX: u64 = 8 << 20;

/// Read the current image of `range` from its sources and compare its hashes.
async fn hash_image(
    volume: &Volume,
    jh: &JournalHandle,
    range: ByteRange,
    unit_bytes: u32,
    expected: &Bytes,
    sources: &[(ByteRange, Source)],
) -> Result<Vec<u32>, String> {
    let image = read_sources(volume, jh, range, sources).await?;
    let hashes: Vec<[u8; 32]> = expected
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32-byte hash"))
        .collect();
    Ok(crate::resync::mismatched_blocks(
        &image, unit_bytes, &hashes,
    ))
}

/// Accept connections; each authenticated one goes to the node task.
async fn accept_loop(
    listener: PeerListener,
    events_tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        match stream {
            Ok(stream) => {
                if events_tx
                    .send(Event::Conn {
                        stream,
                        announce: false,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                // One bad connection (foreign CA, wrong name, plaintext) never stops the listener.
                crate::agent::log_repeated("secondary-accept", || {
                    tracing::warn!("refused a connection: {e}")
                });
                metrics.set_error(e.to_string());
            }
        }
    }
}

/// Dial the peer while no primary is attached (one that attached meanwhile makes
/// the node task refuse the extra connection quietly).
async fn dial_loop(
    peer: SocketAddr,
    security: crate::transport::Security,
    connect_timeout_ms: u64,
    metrics: Arc<Metrics>,
    events_tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    let mut backoff = crate::transport::Backoff::new(1_000, 10_000);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.cancelled() => return,
        }
        if metrics.connected.load(std::sync::atomic::Ordering::Relaxed) {
            backoff = crate::transport::Backoff::new(1_000, 10_000);
            continue;
        }
        let stream = tokio::select! {
            s = crate::transport::connect(peer, &security, connect_timeout_ms) => s,
            _ = stop.cancelled() => return,
        };
        match stream {
            Ok(stream) => {
                if events_tx
                    .send(Event::Conn {
                        stream,
                        announce: true,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => tracing::debug!(%peer, "dialing the peer: {e}"),
        }
    }
}

/// Read frames, check payloads (crc after decompression, G5) and ranges; a bad
/// frame ends the session before anything of it is staged.
async fn frame_reader(
    mut rd: FrameReader<BufReader<PeerReadHalf>>,
    session: u64,
    frames_tx: mpsc::Sender<(Box<Frame>, Option<Bytes>)>,
    events_tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
) {
    let reason = loop {
        let frame = match rd.next().await {
            Ok(f) => f,
            Err(LinkError::BadFrame(e)) => {
                Metrics::add(&metrics.frames_rejected, 1);
                break format!("bad frame from the primary, dropping the connection: {e}");
            }
            Err(LinkError::Closed) => break "the primary closed the connection".into(),
            Err(e) => break format!("connection to the primary: {e}"),
        };
        let data = match &frame.msg {
            Message::Write { .. } => match frame.payload.clone().open() {
                Ok(d) => Some(d),
                Err(e) => {
                    Metrics::add(&metrics.frames_rejected, 1);
                    break format!("bad frame from the primary, dropping the connection: {e}");
                }
            },
            Message::Goodbye { outdated } => {
                break if *outdated {
                    "the primary said Goodbye (outdated)".into()
                } else {
                    "the primary said Goodbye".into()
                };
            }
            Message::Refuse { reason } => {
                break format!("the primary stopped the session: {reason}");
            }
            _ => None,
        };
        let frame = Frame {
            payload: wire::Payload::empty(),
            ..frame
        };
        if frames_tx.send((Box::new(frame), data)).await.is_err() {
            return;
        }
    };
    let _ = events_tx.send(Event::SessionEnd { session, reason }).await;
}

/// Before this node's own changes are overwritten, list them (byte ranges) in a
/// report file beside its metadata. Returns the path.
fn write_discard_report(node: &Node, peer: &str, plan: &Plan) -> Result<PathBuf, String> {
    let now = crate::agent::unix_now_s();
    let mut path = node.cfg.meta.clone().into_os_string();
    path.push(format!(".split-brain-{now}.txt"));
    let path = PathBuf::from(path);
    let bs = node.cfg.block_size as u64;
    let size = node.volume.size_bytes();
    let mut text = String::new();
    text += "# tandem split-brain report: this node's changes, discarded in favour of its peer\n";
    text += &format!("# resource: {}\n", node.cfg.resource);
    text += &format!(
        "# node: {} (discarded)  peer: {peer} (kept)\n",
        node.cfg.name
    );
    text += &format!(
        "# generation: {} (diverged from {})\n",
        node.sb.gen_current, node.sb.gen_bitmap_base
    );
    text += &format!("# unix time: {now}\n# decision: {plan}\n");
    text += &format!(
        "# changed: {} blocks of {bs} bytes; possibly changed (compared by hash): {} blocks\n",
        node.own_dirty.dirty_count().0,
        node.own_verify.dirty_count().0
    );
    text += "# columns: kind offset_bytes length_bytes\n";
    for (kind, set) in [("changed", &node.own_dirty), ("maybe", &node.own_verify)] {
        for (first, n) in set.runs(usize::MAX) {
            let offset = first * bs;
            let len = (n * bs).min(size - offset);
            text += &format!("{kind} {offset} {len}\n");
        }
    }
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        format!(
            "cannot write the split-brain report {}: {e}; not discarding anything",
            path.display()
        )
    })?;
    Ok(path)
}

fn disk_code(d: DiskState, is_new: bool) -> u8 {
    if is_new {
        return wire::DISK_NEW;
    }
    match d {
        DiskState::UpToDate => wire::DISK_UP_TO_DATE,
        DiskState::Inconsistent => wire::DISK_INCONSISTENT,
        DiskState::Outdated => wire::DISK_OUTDATED,
    }
}

/// Which image a read-only export serves.
#[derive(Clone, Copy, Debug)]
enum ImageView {
    /// The last consistent image, through the journal (`--export-readonly`).
    Consistent,
    /// dr (issue 10): inspection `id`'s point (`tandem inspect`).
    Inspection(u64),
}

/// A read-only export of an image of this node: each read asks the node where
/// the image's bytes are (volume, journal records, zeroes) and reads them.
struct ImageExport {
    view: ImageView,
    events_tx: mpsc::Sender<Event>,
    volume: Volume,
    size_bytes: u64,
}

impl crate::frontend::ExportBackend for ImageExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read(&self, offset: u64, len: u32) -> crate::frontend::IoFuture<Bytes> {
        let tx = self.events_tx.clone();
        let volume = self.volume.clone();
        let view = self.view;
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let range = ByteRange::new(offset, len as u64);
            tx.send(Event::Control(ControlCmd::ImageRead { view, range, reply }))
                .await
                .map_err(|_| std::io::Error::from_raw_os_error(libc::ESHUTDOWN))?;
            let (sources, jh) = rx
                .await
                .map_err(|_| std::io::Error::from_raw_os_error(libc::ESHUTDOWN))?
                .map_err(std::io::Error::other)?;
            let result = read_sources(&volume, &jh, range, &sources).await;
            let _ = tx.send(Event::Control(ControlCmd::ExportReadDone)).await;
            result.map_err(std::io::Error::other)
        })
    }

    fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> crate::frontend::IoFuture<()> {
        Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::EPERM)) })
    }

    fn write_zeroes(&self, _offset: u64, _len: u32, _fua: bool) -> crate::frontend::IoFuture<()> {
        Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::EPERM)) })
    }

    fn trim(&self, _offset: u64, _len: u32) -> crate::frontend::IoFuture<()> {
        Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::EPERM)) })
    }

    /// Nothing was written through this export.
    fn flush(&self) -> crate::frontend::IoFuture<()> {
        Box::pin(async { Ok(()) })
    }
}

/// Read `range` of an image from its sources (volume, journal records, zeroes).
async fn read_sources(
    volume: &Volume,
    jh: &JournalHandle,
    range: ByteRange,
    sources: &[(ByteRange, Source)],
) -> Result<Bytes, String> {
    let mut image = BytesMut::with_capacity(range.len as usize);
    for (r, src) in sources {
        match src {
            Source::Volume => {
                let d = volume
                    .read(r.offset, r.len as u32)
                    .await
                    .map_err(|e| format!("reading {} bytes at {}: {e}", r.len, r.offset))?;
                image.extend_from_slice(&d);
            }
            Source::Zero => image.resize(image.len() + r.len as usize, 0),
            Source::Record { lsn, skip } => {
                let d = jh.read(*lsn).await?;
                let (a, b) = (*skip as usize, (*skip + r.len) as usize);
                if b > d.len() {
                    return Err(format!(
                        "journal record {lsn} is shorter than the range it serves"
                    ));
                }
                image.extend_from_slice(&d[a..b]);
            }
        }
    }
    Ok(image.freeze())
}

/// dr (issue 10): decode `rollback {to}` and `inspect {at, nbd} | {stop}`.
fn dr_command(
    request: &ControlRequest,
    reply: oneshot::Sender<ControlReply>,
) -> Result<ControlCmd, String> {
    let spec = |key: &str| -> Result<Option<crate::dr::PointSpec>, String> {
        match request.args.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| format!("'{}': malformed '{key}': {e}", request.cmd)),
        }
    };
    if request.cmd == "rollback" {
        let to = spec("to")?.ok_or("rollback needs a point: --to SEQ|TIME")?;
        return Ok(ControlCmd::Rollback { to, reply });
    }
    if request.flag("stop") {
        return Ok(ControlCmd::Inspect { start: None, reply });
    }
    let at = spec("at")?.unwrap_or(crate::dr::PointSpec::Newest);
    let nbd = request
        .args
        .get("nbd")
        .and_then(|v| v.as_str())
        .ok_or("inspect needs --nbd ADDR (HOST:PORT or unix:/path), or --stop")?
        .to_string();
    Ok(ControlCmd::Inspect {
        start: Some((at, nbd)),
        reply,
    })
}

/// dr (issue 10): rollback and inspection on the node.
impl Node {
    /// The rollback window as `tandem points` lists it, oldest first.
    fn point_docs(&self) -> Vec<crate::dr::PointDoc> {
        self.engine
            .points(usize::MAX)
            .iter()
            .map(|p| crate::dr::PointDoc {
                journal_lsn: p.lsn.0,
                seq: p.seq.0,
                at_unix_ms: p.at_ms,
                later_bytes: p.later_bytes,
            })
            .collect()
    }

    /// `tandem rollback --to`: refused on a connected secondary, outside the
    /// window, or while another rollback runs; else the point is pinned (no
    /// checkpoint passes it) and the rollback proceeds in [`Self::step_rollback`].
    fn start_rollback(&mut self, to: crate::dr::PointSpec, reply: oneshot::Sender<ControlReply>) {
        let refuse = |reply: oneshot::Sender<ControlReply>, e: String| {
            let _ = reply.send(ControlReply::error(e));
        };
        if let Some(s) = &self.session {
            return refuse(
                reply,
                format!(
                    "this secondary is connected to its primary {}: a rollback would be undone by replication. Disconnect it first (stop or demote the primary, or stop this node's link), then roll back, then promote this node (or let the primary resend the blocks after the point)",
                    s.peer
                ),
            );
        }
        if self.rollback.is_some() {
            return refuse(reply, "a rollback is already under way".into());
        }
        if self.engine.is_poisoned() {
            return refuse(
                reply,
                "the journal or the volume failed on this node; restart it after checking the disk"
                    .into(),
            );
        }
        let points = self.point_docs();
        let point = match to.choose(&points) {
            Ok(p) => p,
            Err(e) => return refuse(reply, format!("cannot roll back to {e}")),
        };
        if Lsn(point.journal_lsn) == self.engine.tail() {
            let _ = reply.send(ControlReply::success(serde_json::json!({
                "message": format!(
                    "already at {}: nothing to roll back",
                    crate::dr::describe_point(&point)
                ),
                "point": point,
            })));
            return;
        }
        self.end_inspection("the secondary is rolling back");
        self.engine.set_pin(Some(Lsn(point.journal_lsn)));
        tracing::warn!(
            seq = point.seq,
            at_unix_ms = point.at_unix_ms,
            discarded_bytes = point.later_bytes,
            "rollback requested"
        );
        self.rollback = Some(PendingRollback {
            point,
            reply,
            stage: RollbackStage::Quiesce,
            dropped_bytes: 0,
        });
        self.step_rollback();
    }

    /// Advance a rollback: once no I/O runs, cut the engine's records after the
    /// point, record the blocks they touched (this node now lacks the primary's
    /// data there: the next session resends them) and the new consistent point
    /// durably, then truncate the journal. A crash before the truncation leaves the
    /// newer image and an over-marked bitmap (a harmless extra resync).
    fn step_rollback(&mut self) {
        let Some(r) = &self.rollback else { return };
        match r.stage {
            RollbackStage::Quiesce => {
                if !self.engine.is_idle()
                    || self.engine.durable() != self.engine.tail()
                    || self.checkpoint_waiting.is_some()
                    || self.release_waiting.is_some()
                    || self.copying.is_some()
                    || self.session.is_some()
                {
                    return;
                }
                self.end_inspection("the secondary is rolling back");
                let lsn = Lsn(self.rollback.as_ref().expect("checked").point.journal_lsn);
                if lsn < self.engine.applied() {
                    // A checkpoint already under way when it was asked copied past
                    // the point: it is in the volume now, out of reach.
                    let r = self.rollback.take().expect("checked");
                    self.engine.set_pin(None);
                    let _ = r.reply.send(ControlReply::error(format!(
                        "cannot roll back to {}: a checkpoint running when the rollback was asked copied past it into the volume; pick a newer point (`tandem points`)",
                        crate::dr::describe_point(&r.point)
                    )));
                    return;
                }
                let dropped = self.engine.truncate_after(lsn);
                let bs = self.cfg.block_size;
                let mut bytes = 0;
                for range in &dropped {
                    let (a, b) = range.blocks(bs);
                    self.own_dirty.mark(a, b);
                    bytes += range.len;
                }
                let (seq, at_ms) = self
                    .engine
                    .consistent_point()
                    .map_or((Seq::ZERO, 0), |(_, s, at)| (s, at));
                self.sb.consistent_seq = seq.0;
                self.sb.consistent_at_ms = at_ms;
                self.sb.volume_mixed = !self.engine.is_volume_consistent();
                if !self.sb.volume_mixed {
                    self.sb.mixed_through = 0;
                }
                let mut bitmap = self.own_dirty.clone();
                bitmap.union_with(&self.own_verify);
                self.send_meta(MetaJob::Bitmap { bitmap });
                let job = self.write_superblock();
                let r = self.rollback.as_mut().expect("checked");
                r.dropped_bytes = bytes;
                r.stage = RollbackStage::Metadata(job);
            }
            RollbackStage::Metadata(job) => {
                if self.meta_done < job {
                    return;
                }
                let lsn = Lsn(r.point.journal_lsn);
                self.rollback.as_mut().expect("checked").stage = RollbackStage::Truncate;
                self.jh.truncate(lsn);
            }
            RollbackStage::Truncate => {}
        }
    }

    /// The journal's truncation for a rollback finished.
    fn rollback_truncated(&mut self, result: Result<(), String>) {
        let Some(r) = self
            .rollback
            .take_if(|r| r.stage == RollbackStage::Truncate)
        else {
            return;
        };
        self.engine.set_pin(None);
        let reply = match result {
            Ok(()) => {
                let message = format!(
                    "rolled back to the consistent point of {}; {} bytes of later writes dropped (their {} changed bytes of blocks are resent by the primary at the next connection, unless this node is promoted first)",
                    crate::dr::describe_point(&r.point),
                    r.point.later_bytes,
                    r.dropped_bytes
                );
                tracing::warn!("{message}");
                self.metrics.events.push("rollback", message.clone());
                ControlReply::success(serde_json::json!({ "message": message, "point": r.point }))
            }
            Err(e) => {
                self.metrics.set_error(format!("rollback: {e}"));
                ControlReply::error(format!(
                    "truncating the journal failed: {e}; restart the node after checking the disk (its image is the rolled-back one or the one before)"
                ))
            }
        };
        let _ = r.reply.send(reply);
    }

    /// `tandem inspect --at --nbd`: serve the image as of a point, read-only.
    async fn start_inspection(
        &mut self,
        at: crate::dr::PointSpec,
        nbd: &str,
    ) -> Result<String, String> {
        if let Some(i) = &self.inspection {
            return Err(format!(
                "an inspection of {} is served on {} already; stop it first with `tandem inspect --stop`",
                crate::dr::describe_point(&i.point),
                i.nbd
            ));
        }
        if self.rollback.is_some() {
            return Err("a rollback is under way; inspect after it".into());
        }
        let point = at
            .choose(&self.point_docs())
            .map_err(|e| format!("cannot inspect {e}"))?;
        let lsn = Lsn(point.journal_lsn);
        if self.checkpoint_past(lsn) {
            return Err(format!(
                "a checkpoint is copying records after {} into the volume right now; retry in a moment, or pick a newer point",
                crate::dr::describe_point(&point)
            ));
        }
        let id = self.next_inspection;
        self.next_inspection += 1;
        let stop = CancellationToken::new();
        let backend = Arc::new(ImageExport {
            view: ImageView::Inspection(id),
            events_tx: self.events_tx.clone(),
            volume: self.volume.clone(),
            size_bytes: self.volume.size_bytes(),
        });
        let (bound, task) = crate::nbd::readonly::serve_backend_readonly(
            &self.cfg,
            nbd,
            backend,
            &self.metrics,
            stop.clone(),
        )
        .await
        .map_err(|e| format!("cannot serve the inspection on {nbd}: {e}"))?;
        self.engine.set_pin(Some(lsn));
        let view = self.engine.view_at(lsn);
        let nbd = bound.to_string();
        let message = format!(
            "serving the image as of {} read-only on {nbd} while replication continues (e.g. nbdfuse DIR nbd://ADDR, losetup -r, mount -o ro); it ends with `tandem inspect --stop`, or when the journal needs the room for replication",
            crate::dr::describe_point(&point)
        );
        tracing::info!("inspection: {message}");
        self.metrics
            .events
            .push("inspection", format!("started: {message}"));
        self.inspection = Some(Inspection {
            id,
            point,
            lsn,
            view,
            nbd,
            stop,
            task,
        });
        Ok(message)
    }

    /// A checkpoint under way (waiting for the superblock, copying, or waiting to
    /// release) goes past `lsn`: the volume will hold records after it.
    fn checkpoint_past(&self, lsn: Lsn) -> bool {
        lsn < self.engine.applied()
            || self
                .checkpoint_waiting
                .is_some_and(|(_, through, _, _)| through > lsn)
            || self.copying.is_some_and(|(through, _, _)| through > lsn)
            || self
                .release_waiting
                .is_some_and(|(through, _)| through > lsn)
    }

    /// End the inspection being served (if any): stop its export, unpin.
    fn end_inspection(&mut self, why: &str) -> Option<String> {
        let i = self.inspection.take()?;
        i.stop.cancel();
        i.task.abort();
        if self.rollback.is_none() {
            self.engine.set_pin(None);
        }
        let message = format!(
            "the inspection of {} on {} ended: {why}",
            crate::dr::describe_point(&i.point),
            i.nbd
        );
        tracing::info!("{message}");
        self.metrics.events.push("inspection", message.clone());
        Some(message)
    }

    /// The engine took the pin back (the journal needed the room): the view no
    /// longer holds; end the inspection.
    fn check_inspection(&mut self) {
        if let Some(i) = &self.inspection
            && self.engine.pin() != Some(i.lsn)
        {
            self.end_inspection(
                "the journal needed the room for replication (a larger journal-size keeps inspections longer)",
            );
        }
    }
}

struct SecondaryControl {
    resource: String,
    events_tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    snapshot: Arc<std::sync::Mutex<Snapshot>>,
}

impl ControlHandler for SecondaryControl {
    fn status(&self) -> control::BoxFuture<Option<StatusDoc>> {
        let doc = self.snapshot.lock().expect("snapshot lock").doc.clone();
        Box::pin(async move { doc })
    }

    fn other(&self, request: ControlRequest) -> control::BoxFuture<ControlReply> {
        let tx = self.events_tx.clone();
        let resource = self.resource.clone();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let cmd = match request.cmd.as_str() {
                "points" => ControlCmd::Points(reply),
                "outdate" => ControlCmd::Outdate(reply), // ha
                "invalidate" => ControlCmd::Invalidate(reply), // ha
                // dr (issue 10)
                "rollback" | "inspect" => match dr_command(&request, reply) {
                    Ok(cmd) => cmd,
                    Err(e) => return ControlReply::error(e),
                },
                "resolve" if request.flag("discard_local") => ControlCmd::DiscardLocal(reply),
                "resolve" => {
                    return ControlReply::error(
                        "resolve needs --discard-local: this node's own changes are discarded at the next handshake with its peer".into(),
                    );
                }
                "verify" | "verify-result" | "wait-sync" => {
                    // Only the primary orders a comparison against its write stream.
                    return ControlReply::error(format!(
                        "this is the secondary of resource '{}': run {} on the primary's control socket",
                        resource, request.cmd
                    ));
                }
                _ => {
                    return request.unknown(&[
                        "promote",
                        "demote",
                        "resolve",
                        "points",
                        "rollback",
                        "inspect",
                        "outdate",
                        "invalidate",
                    ]);
                }
            };
            if tx.send(Event::Control(cmd)).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::engine::secondary::{Lsn, RecordKind};

    /// Journal `records` (kind and range; write `i` fills its range with a byte
    /// derived from `i`), copy them with `copy_records` into a fresh volume of
    /// `size` bytes, O_DIRECT (io_uring) and buffered (writes inline), and
    /// compare with copying them one by one in order.
    async fn assert_copy_matches_in_order(size: u64, records: &[(RecordKind, ByteRange)]) {
        use crate::volume::{EngineChoice, OpenOptions};
        for direct in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (done_tx, _done_rx) = mpsc::unbounded_channel();
            let opened = journal::open(
                &dir.path().join("journal"),
                VolumeId([7; 16]),
                4096,
                128 << 20,
                journal::Create::Written,
                false,
                done_tx,
            )
            .expect("journal");
            let jh = opened.thread.handle();
            let opts = OpenOptions {
                create_size_bytes: Some(size),
                direct,
                engine: EngineChoice::Uring,
            };
            let volume = Volume::open(&dir.path().join("volume.img"), &opts).expect("volume");
            let mut model = vec![0u8; size as usize];
            let mut journaled = Vec::new();
            for (i, &(kind, range)) in (1u64..).zip(records) {
                let fill = (i % 251 + 1) as u8;
                let data = (kind == RecordKind::Write)
                    .then(|| Bytes::from(vec![fill; range.len as usize]));
                let r = Record {
                    lsn: Lsn(i),
                    seq: Seq(i),
                    kind,
                    range,
                    at_ms: 0,
                    journal_bytes: journal::record_bytes(range.len),
                    in_section: false,
                };
                jh.append(&r, data.clone());
                let byte = if data.is_some() { fill } else { 0 };
                model[range.offset as usize..range.end() as usize].fill(byte);
                journaled.push(r);
            }
            jh.sync();
            copy_records(&volume, &jh, &journaled).await.expect("copy");
            let got = volume.read(0, size as u32).await.expect("read");
            let first_bad = (0..size as usize).find(|&i| got[i] != model[i]);
            assert_eq!(
                first_bad, None,
                "direct {direct}: the volume differs from in-order copies"
            );
        }
    }

    /// A checkpoint copies records concurrently: the volume must still end with,
    /// per block, the newest record over it (overlapping writes, zero records
    /// between them), as when they were copied one by one in order; on an
    /// O_DIRECT volume (io_uring) and a buffered one (writes inline).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_copy_applies_overlapping_records_in_order() {
        let mut records = Vec::new();
        let mut x = 0x5eed_u64;
        for i in 1..=2_000u64 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            // 1-4 blocks among the first 24: nearly every record overlaps
            // one of the few before it.
            let range = ByteRange::new((x >> 33) % 24 * 4096, (1 + (x >> 20) % 4) * 4096);
            let kind = if i % 97 == 0 {
                RecordKind::Zeroes
            } else {
                RecordKind::Write
            };
            records.push((kind, range));
        }
        assert_copy_matches_in_order(1 << 20, &records).await;
    }

    /// Batches cut at their limits: more non-overlapping 4 KiB writes than
    /// COPY_BATCH_MAX, then more non-overlapping 1 MiB writes than
    /// COPY_BATCH_BYTES_MAX holds, then writes over both that overlap records
    /// of earlier batches, a zero record, and writes inside the write just before
    /// them: the volume ends as in-order copies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_copy_of_full_batches_applies_records_in_order() {
        const MIB: u64 = 1 << 20;
        let small = 3 * COPY_BATCH_MAX as u64 + 5;
        let large = 2 * COPY_BATCH_BYTES_MAX / MIB + 3;
        let size = 4 * MIB + large * MIB;
        let mut records = Vec::new();
        for i in 0..small {
            records.push((RecordKind::Write, ByteRange::new(i * 4096, 4096)));
        }
        for i in 0..large {
            records.push((RecordKind::Write, ByteRange::new(4 * MIB + i * MIB, MIB)));
        }
        records.push((RecordKind::Zeroes, ByteRange::new(4 * MIB + MIB / 2, MIB)));
        for i in 0..large {
            // Straddles two 1 MiB records; the small ones are overwritten too.
            let at = 4 * MIB + i * MIB + MIB / 2;
            records.push((RecordKind::Write, ByteRange::new(at, MIB.min(size - at))));
            // Inside the write just before it: the batch must end there.
            records.push((RecordKind::Write, ByteRange::new(at + 4096 * (i % 8), 4096)));
            records.push((RecordKind::Write, ByteRange::new(i * 8192, 8192)));
        }
        assert_copy_matches_in_order(size, &records).await;
    }

    #[test]
    fn a_promotion_note_names_the_point_in_utc_and_how_far_behind_it_is() {
        // 2026-11-29 12:03:41.220 UTC
        let at = 1_795_003_421_220 + 11 * 86_400_000;
        let note = promotion_note(Seq(812), at, at + 37_200);
        assert_eq!(
            note,
            "at the consistent point of 2026-11-29 12:03:41.220 UTC (write 812), 37.2 s behind the newest write received from the old primary"
        );
        assert!(promotion_note(Seq(5), 0, 0).contains("not known"));
    }
}
