//! The secondary agent: listen, authenticate, check the handshake (G6), then
//! verify, decompress and apply frames in order (G2, G5), acknowledging
//! `Applied` per write and `Durable` per batched flush.
//!
//! One session at a time owns the volume; a second primary that connects while
//! one is attached is refused with a reason. Nothing is written to the volume
//! before a handshake is accepted, and nothing but replication ever writes it (G8).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::control::{self, ControlHandler, ControlReply, ControlRequest, StatusDoc};
use crate::agent::{AgentError, errno_of, security_for};
use crate::config::NodeConfig;
use crate::engine::secondary::{ApplyKind, SecondaryAction, SecondaryEngine};
use crate::meta::{MetaStore, Superblock};
use crate::metrics::Metrics;
use crate::transport::{PeerListener, PeerReadHalf, PeerStream, PeerWriteHalf};
use crate::types::{BlockCount, ByteRange, DiskState, Generation, Role, Seq, VolumeId};
use crate::volume::Volume;
use crate::wire::{
    self, Frame, Hello, Message, PROTOCOL_VERSION, Payload, SyncPlan, Welcome, caps,
};

/// What the agent tells its caller once it listens.
#[derive(Clone)]
pub struct SecondaryReady {
    pub listen: SocketAddr,
    pub metrics: Arc<Metrics>,
}

/// The node's durable state, owned by whichever session is attached.
struct Node {
    cfg: Arc<NodeConfig>,
    volume: Volume,
    meta: MetaStore,
    sb: Superblock,
    metrics: Arc<Metrics>,
    /// Until a first sync completes, compare the volume's data by hash (--seeded or
    /// rebuilt metadata) instead of receiving every block.
    verify_data: bool,
    /// What the control socket reports; updated with every superblock write.
    snapshot: Arc<std::sync::Mutex<Snapshot>>,
}

/// The part of a secondary's state shown by `tandem status`.
#[derive(Clone)]
struct Snapshot {
    disk_state: DiskState,
    volume_id: VolumeId,
    generation: Generation,
    peer: Option<String>,
}

impl Node {
    fn write_superblock(&mut self) -> Result<(), String> {
        self.meta
            .write_superblock(&self.sb)
            .map_err(|e| format!("writing metadata: {e}"))?;
        self.update_snapshot();
        Ok(())
    }

    fn set_peer(&mut self, peer: Option<String>) {
        self.snapshot.lock().expect("snapshot lock").peer = peer;
    }

    fn update_snapshot(&self) {
        let mut s = self.snapshot.lock().expect("snapshot lock");
        s.disk_state = self.sb.disk_state;
        s.volume_id = self.sb.volume_id;
        s.generation = self.sb.gen_current;
    }
}

/// Run a secondary until `shutdown` is cancelled.
pub async fn run(
    cfg: NodeConfig,
    shutdown: CancellationToken,
    ready: Option<oneshot::Sender<SecondaryReady>>,
) -> Result<(), AgentError> {
    let cfg = Arc::new(cfg);
    let (volume, opened, rebuilt) = crate::agent::open_node(&cfg, Role::Secondary)?;
    // Data already on the volume (a pre-seeded copy, or metadata rebuilt after
    // damage) is compared by hash rather than overwritten wholesale.
    let verify_data = cfg.seeded || rebuilt;
    let mut sb = opened.superblock;
    if sb.role == Role::Primary {
        tracing::warn!(generation = %sb.gen_current, "node was primary; starting as secondary (demoted)");
        sb.role = Role::Secondary;
    }
    sb.clean_shutdown = false;
    let mut meta = opened.store;
    meta.write_superblock(&sb)?;
    let metrics = Arc::new(Metrics::default());
    let snapshot = Arc::new(std::sync::Mutex::new(Snapshot {
        disk_state: sb.disk_state,
        volume_id: sb.volume_id,
        generation: sb.gen_current,
        peer: None,
    }));
    let node = Arc::new(Mutex::new(Node {
        cfg: cfg.clone(),
        volume,
        meta,
        sb,
        metrics: metrics.clone(),
        snapshot: snapshot.clone(),
        verify_data,
    }));

    let security = security_for(&cfg);
    let listen = cfg.listen.expect("validated");
    let listener = PeerListener::bind(listen, &security).await?;
    let bound = listener.local_addr();
    tracing::info!(listen = %bound, expecting = %cfg.peer_name, "secondary listening");

    let control_stop = CancellationToken::new();
    let control_task = control::serve(
        &cfg.control,
        &cfg.resource,
        Arc::new(SecondaryControl {
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            snapshot,
        }),
        control_stop.clone(),
    )
    .await?;
    if let Some(ready) = ready {
        let _ = ready.send(SecondaryReady {
            listen: bound,
            metrics: metrics.clone(),
        });
    }

    let sessions = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        match stream {
            Ok(stream) => {
                let node = node.clone();
                let stop = sessions.clone();
                tasks.spawn(async move {
                    let peer = stream.peer_addr();
                    match node.clone().try_lock_owned() {
                        Ok(guard) => {
                            if let Err(reason) = session(guard, stream, stop).await {
                                tracing::warn!(%peer, "session ended: {reason}");
                            }
                        }
                        Err(_) => {
                            let reason = "another primary is already attached to this secondary; stop it first".to_string();
                            tracing::warn!(%peer, "refusing connection: {reason}");
                            refuse(stream, &reason).await;
                        }
                    }
                });
            }
            Err(e) => {
                // One bad connection (foreign CA, wrong name, plaintext) never stops the listener.
                tracing::warn!("refused a connection: {e}");
                metrics.set_error(e.to_string());
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    tracing::info!("stopping: finishing the writes in flight, then a final flush");
    sessions.cancel();
    while tasks.join_next().await.is_some() {}
    control_stop.cancel();
    let _ = control_task.await;
    let mut node = node.lock().await;
    node.volume
        .flush()
        .await
        .map_err(|e| AgentError::Refused(format!("final flush failed: {e}")))?;
    node.sb.clean_shutdown = true;
    node.write_superblock().map_err(AgentError::Refused)?;
    tracing::info!(disk = %node.sb.disk_state, "clean shutdown");
    Ok(())
}

async fn refuse(stream: PeerStream, reason: &str) {
    let (_rd, mut wr) = stream.into_split();
    crate::agent::send_refusal(&mut wr, reason).await;
}

/// Check a Hello against this node (G6). Returns what the secondary needs.
fn check_hello(h: &Hello, node: &Node) -> Result<SyncPlan, String> {
    let cfg = &node.cfg;
    let sb = &node.sb;
    let size = node.volume.size_bytes();
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version mismatch: local {PROTOCOL_VERSION}, peer {}; run the same tandem version on both nodes",
            h.protocol_version
        ));
    }
    if h.size_bytes != size {
        return Err(format!(
            "volume size mismatch: local {size} bytes, peer {} bytes; resize one side or recreate metadata",
            h.size_bytes
        ));
    }
    if h.block_size != cfg.block_size {
        return Err(format!(
            "block size mismatch: local {} bytes, peer {} bytes; use the same --block-size on both nodes",
            cfg.block_size, h.block_size
        ));
    }
    if h.node_name != cfg.peer_name {
        return Err(format!(
            "peer calls itself '{}' but '{}' was expected (--peer-name)",
            h.node_name, cfg.peer_name
        ));
    }
    if h.peer_name != cfg.name {
        return Err(format!(
            "peer expects a node named '{}' but this node is '{}' (--name)",
            h.peer_name, cfg.name
        ));
    }
    if h.role != wire::ROLE_PRIMARY {
        return Err("the peer is not in the primary role; nothing to replicate".into());
    }
    if !sb.is_new && sb.volume_id != VolumeId(h.volume_id) {
        return Err(format!(
            "volume UUID mismatch: local {}, peer {}; these volumes hold unrelated data (recreate this node's metadata {} to resync it from scratch)",
            sb.volume_id,
            VolumeId(h.volume_id),
            cfg.meta.display()
        ));
    }
    // The primary's bitmap is relative to the state this node reached in the primary's
    // generation: valid whenever this node completed a sync in that generation, even if
    // a later resync was interrupted (the primary keeps those blocks dirty until they
    // are durable here). A new node, or one from another generation, needs everything.
    let primary = Generation(h.generations.current);
    let same_generation = sb.gen_current != Generation::NONE && sb.gen_current == primary;
    // An interrupted full sync from this same primary generation resumes from the
    // primary's bitmap: the primary persisted it (all dirty) before the sync began.
    let resuming = sb.gen_bitmap_base != Generation::NONE && sb.gen_bitmap_base == primary;
    Ok(if !sb.is_new && (same_generation || resuming) {
        SyncPlan::Bitmap
    } else if node.verify_data {
        SyncPlan::Verify
    } else {
        SyncPlan::Full
    })
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

enum Incoming {
    Frame(Box<Frame>, Option<Bytes>),
    Closed(String),
}

enum Done {
    Apply {
        seq: Seq,
        range: ByteRange,
        result: Result<(), i32>,
    },
    Flush {
        result: Result<(), i32>,
    },
}

/// Starts volume I/O for engine actions and sends acknowledgements.
struct Applier {
    volume: Volume,
    done_tx: mpsc::UnboundedSender<Done>,
    ack_tx: mpsc::UnboundedSender<Message>,
    /// Payloads of received writes, until their apply starts.
    held: HashMap<Seq, Bytes>,
    /// Expected block hashes of received hash checks, until the check starts.
    held_hashes: HashMap<Seq, Vec<[u8; 32]>>,
    block_size: u32,
    /// Volume operations started and not yet reported back.
    outstanding: usize,
    gen_primary: Generation,
    /// The resync announced last is a full one (every block).
    full_resync: bool,
}

impl Applier {
    /// Carry out engine actions; an Err ends the session with that reason.
    fn carry_out(&mut self, node: &mut Node, out: &mut Vec<SecondaryAction>) -> Result<(), String> {
        let mut result = Ok(());
        for action in out.drain(..) {
            match action {
                SecondaryAction::StartApply {
                    seq,
                    kind: ApplyKind::HashCheck,
                    range,
                } => {
                    let expected = self
                        .held_hashes
                        .remove(&seq)
                        .expect("hash check has hashes");
                    let volume = self.volume.clone();
                    let tx = self.done_tx.clone();
                    let ack = self.ack_tx.clone();
                    let bs = self.block_size;
                    self.outstanding += 1;
                    tokio::spawn(async move {
                        let result = match volume.read(range.offset, range.len as u32).await {
                            Ok(data) => {
                                let mismatched =
                                    crate::resync::mismatched_blocks(&data, bs, &expected);
                                // Sent before the completion is fed to the engine, so it
                                // precedes any Durable that covers this seq.
                                let _ = ack.send(Message::HashReply {
                                    seq: seq.0,
                                    mismatched,
                                });
                                Ok(())
                            }
                            Err(e) => Err(errno_of(&e)),
                        };
                        let _ = tx.send(Done::Apply { seq, range, result });
                    });
                }
                SecondaryAction::StartApply {
                    seq,
                    kind: ApplyKind::Write,
                    range,
                } if self.volume.writes_inline() => {
                    // A page-cache copy: done here, reported through the same channel.
                    let data = self.held.remove(&seq).expect("write frame has data");
                    let result = self
                        .volume
                        .write_inline(range.offset, &data)
                        .map_err(|e| errno_of(&e));
                    self.outstanding += 1;
                    let _ = self.done_tx.send(Done::Apply { seq, range, result });
                }
                SecondaryAction::StartApply { seq, kind, range } => {
                    let data = self.held.remove(&seq);
                    let volume = self.volume.clone();
                    let tx = self.done_tx.clone();
                    self.outstanding += 1;
                    tokio::spawn(async move {
                        let result = match kind {
                            ApplyKind::Write => {
                                volume
                                    .write(range.offset, data.expect("write frame has data"), false)
                                    .await
                            }
                            ApplyKind::WriteZeroes => {
                                volume.write_zeroes(range.offset, range.len, false).await
                            }
                            ApplyKind::Trim => volume.trim(range.offset, range.len).await,
                            ApplyKind::HashCheck => unreachable!("hash checks are matched above"),
                        };
                        let _ = tx.send(Done::Apply {
                            seq,
                            range,
                            result: result.map_err(|e| errno_of(&e)),
                        });
                    });
                }
                SecondaryAction::SendApplied { seq } => {
                    let _ = self.ack_tx.send(Message::Applied { seq: seq.0 });
                }
                SecondaryAction::StartFlush { .. } => {
                    let volume = self.volume.clone();
                    let tx = self.done_tx.clone();
                    self.outstanding += 1;
                    tokio::spawn(async move {
                        let result = volume.flush().await.map_err(|e| errno_of(&e));
                        let _ = tx.send(Done::Flush { result });
                    });
                }
                SecondaryAction::SendDurable { through } => {
                    let _ = self.ack_tx.send(Message::Durable {
                        through_seq: through.0,
                    });
                }
                SecondaryAction::MarkInconsistent => {
                    let base = if self.full_resync {
                        self.gen_primary
                    } else {
                        node.sb.gen_bitmap_base
                    };
                    if node.sb.disk_state != DiskState::Inconsistent
                        || node.sb.gen_bitmap_base != base
                    {
                        node.sb.disk_state = DiskState::Inconsistent;
                        // A full sync's progress lives in that primary's bitmap.
                        node.sb.gen_bitmap_base = base;
                        if let Err(e) = node.write_superblock() {
                            result = Err(e);
                        }
                        tracing::info!("disk is Inconsistent until a resync completes");
                    }
                }
                SecondaryAction::MarkUpToDate => {
                    node.sb.disk_state = DiskState::UpToDate;
                    node.sb.gen_current = self.gen_primary;
                    if let Err(e) = node.write_superblock() {
                        result = Err(e);
                    }
                    tracing::info!(generation = %self.gen_primary, "resync complete: disk is UpToDate");
                }
                SecondaryAction::Fail { reason } => {
                    tracing::error!("stopping the session: {reason}");
                    node.metrics.set_error(reason.clone());
                    let _ = self.ack_tx.send(Message::Refuse {
                        reason: reason.clone(),
                    });
                    result = Err(reason);
                }
            }
        }
        result
    }
}

/// Feed a finished volume operation to the engine.
fn feed(e: &mut SecondaryEngine, done: Done, metrics: &Metrics, out: &mut Vec<SecondaryAction>) {
    match done {
        Done::Apply { seq, range, result } => {
            if result.is_ok() {
                Metrics::add(&metrics.applied_writes, 1);
                Metrics::add(&metrics.applied_bytes, range.len);
            }
            e.apply_done(seq, range, result, out)
        }
        Done::Flush { result } => e.flush_done(result, out),
    }
}

/// One session with a primary; holds the node for its whole duration.
async fn session(
    mut node: tokio::sync::OwnedMutexGuard<Node>,
    stream: PeerStream,
    stop: CancellationToken,
) -> Result<(), String> {
    let peer_addr = stream.peer_addr();
    let cfg = node.cfg.clone();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(1 << 20, rd);
    let mut scratch = BytesMut::new();
    let first = tokio::time::timeout(
        Duration::from_millis(cfg.connect_timeout_ms),
        wire::read_frame(&mut rd, &mut scratch),
    )
    .await
    .map_err(|_| format!("no Hello within {} ms", cfg.connect_timeout_ms))?
    .map_err(|e| format!("reading Hello: {e}"))?;
    let Message::Hello(hello) = first.msg else {
        return Err(format!(
            "expected Hello, got message kind {}",
            first.msg.kind()
        ));
    };
    let plan = match check_hello(&hello, &node) {
        Ok(plan) => plan,
        Err(reason) => {
            tracing::error!(peer = %peer_addr, "refusing primary: {reason}");
            node.metrics.set_error(reason.clone());
            crate::agent::send_refusal(&mut wr, &reason).await;
            return Err(reason);
        }
    };
    if node.sb.is_new {
        // Adopt the primary's identity (G6) before anything is written; the volume is
        // Inconsistent until the full sync completes.
        node.sb.volume_id = VolumeId(hello.volume_id);
        node.sb.is_new = false;
        node.sb.disk_state = DiskState::Inconsistent;
        node.write_superblock()?;
        tracing::info!(volume_id = %node.sb.volume_id, "new secondary adopted the primary's volume identity");
    }
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        volume_id: node.sb.volume_id.0,
        size_bytes: node.volume.size_bytes(),
        block_size: cfg.block_size,
        node_name: cfg.name.clone(),
        role: wire::ROLE_SECONDARY,
        disk_state: disk_code(node.sb.disk_state, node.sb.is_new),
        generations: wire::Generations {
            current: node.sb.gen_current.0,
            bitmap_base: node.sb.gen_bitmap_base.0,
            history: [node.sb.gen_history[0].0, node.sb.gen_history[1].0],
        },
        capabilities: caps::ZSTD,
        needs: plan,
    };
    crate::agent::send_message(&mut wr, Message::Welcome(welcome))
        .await
        .map_err(|e| format!("sending Welcome: {e}"))?;
    tracing::info!(peer = %peer_addr, primary = %hello.node_name, primary_next_seq = hello.first_seq, plan = ?plan, disk = %node.sb.disk_state, "primary attached");
    node.set_peer(Some(hello.node_name.clone()));
    node.metrics.connected.store(true, Ordering::Relaxed);
    Metrics::add(&node.metrics.sessions, 1);

    let (in_tx, mut in_rx) = mpsc::channel(256);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(frame_reader(
        rd,
        in_tx,
        cfg.peer_timeout_ms,
        node.metrics.clone(),
        node.volume.size_bytes(),
    ));
    let writer = tokio::spawn(ack_writer(wr, ack_rx, cfg.heartbeat_interval_ms));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut engine: Option<SecondaryEngine> = None;
    let mut applier = Applier {
        volume: node.volume.clone(),
        done_tx,
        ack_tx,
        held: HashMap::new(),
        held_hashes: HashMap::new(),
        block_size: cfg.block_size,
        full_resync: false,
        outstanding: 0,
        gen_primary: Generation(hello.generations.current),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.flush_interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    let mut ending: Option<String> = None;
    while ending.is_none() {
        tokio::select! {
            biased;
            Some(done) = done_rx.recv() => {
                applier.outstanding -= 1;
                let e = engine.as_mut().expect("I/O is only started by an engine");
                feed(e, done, &node.metrics, &mut out);
            }
            msg = in_rx.recv() => match msg {
                None => ending = Some("reader stopped".into()),
                Some(Incoming::Closed(reason)) => ending = Some(reason),
                Some(Incoming::Frame(frame, data)) => {
                    if let Err(reason) = on_frame(*frame, data, &mut engine, &mut applier, &cfg, &mut out) {
                        ending = Some(reason);
                    }
                }
            },
            _ = tick.tick() => if let Some(e) = engine.as_mut() { e.tick(&mut out) },
            _ = stop.cancelled() => ending = Some("secondary shutting down".into()),
        }
        if let Err(reason) = applier.carry_out(&mut node, &mut out) {
            ending.get_or_insert(reason);
        }
    }
    let reason = ending.expect("loop ends with a reason");
    // G2: apply everything received (released writes included) before the volume can
    // change hands, so the image is a prefix of the primary's write order.
    reader.abort();
    while applier.outstanding > 0 {
        let done = done_rx.recv().await.expect("the session holds a sender");
        applier.outstanding -= 1;
        let e = engine.as_mut().expect("I/O is only started by an engine");
        feed(e, done, &node.metrics, &mut out);
        if let Err(e) = applier.carry_out(&mut node, &mut out) {
            tracing::error!("while finishing the session: {e}");
        }
    }
    let ack_tx = applier.ack_tx;
    if let Err(e) = node.volume.flush().await {
        tracing::error!("flush after session failed: {e}");
    }
    if stop.is_cancelled() {
        let _ = ack_tx.send(Message::Goodbye);
    }
    drop(ack_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    node.set_peer(None);
    node.metrics.connected.store(false, Ordering::Relaxed);
    tracing::info!(peer = %peer_addr, disk = %node.sb.disk_state, "primary detached: {reason}");
    Ok(())
}

/// Handle one frame from the primary.
/// The range a HashCheck covers: `count` blocks from `offset`, the last one cut at
/// the end of the volume. None when it is malformed or out of the volume.
fn hash_check_range(
    offset: u64,
    block_size: u32,
    count: usize,
    size_bytes: u64,
    expected_block_size: u32,
) -> Option<ByteRange> {
    if block_size != expected_block_size
        || count == 0
        || count > crate::wire::HASHES_PER_CHECK_MAX
        || offset >= size_bytes
    {
        return None;
    }
    let bs = block_size as u64;
    let len = (count as u64 * bs).min(size_bytes - offset);
    (len.div_ceil(bs) == count as u64).then_some(ByteRange::new(offset, len))
}

fn on_frame(
    frame: Frame,
    data: Option<Bytes>,
    engine: &mut Option<SecondaryEngine>,
    applier: &mut Applier,
    cfg: &NodeConfig,
    out: &mut Vec<SecondaryAction>,
) -> Result<(), String> {
    let seq = Seq(frame.seq);
    match frame.msg {
        Message::ResyncStart { blocks, full } => {
            let e = engine.get_or_insert_with(|| SecondaryEngine::new(seq, cfg.flush_bytes_max));
            if blocks > 0 {
                tracing::info!(
                    blocks,
                    bytes = blocks * cfg.block_size as u64,
                    full,
                    "primary announces a resync"
                );
            }
            applier.full_resync = full;
            e.resync_started(seq, blocks, out);
        }
        Message::Write { offset, fua } => {
            let e = engine.as_mut().ok_or("Write before ResyncStart")?;
            let data = data.expect("reader opens payloads of writes");
            let range = ByteRange::new(offset, data.len() as u64);
            applier.held.insert(seq, data);
            e.receive(seq, ApplyKind::Write, range, fua, out);
        }
        Message::WriteZeroes { offset, len, fua } => {
            let e = engine.as_mut().ok_or("WriteZeroes before ResyncStart")?;
            e.receive(
                seq,
                ApplyKind::WriteZeroes,
                ByteRange::new(offset, len as u64),
                fua,
                out,
            );
        }
        Message::Trim { offset, len } => {
            let e = engine.as_mut().ok_or("Trim before ResyncStart")?;
            e.receive(
                seq,
                ApplyKind::Trim,
                ByteRange::new(offset, len as u64),
                false,
                out,
            );
        }
        Message::Flush => engine
            .as_mut()
            .ok_or("Flush before ResyncStart")?
            .flush_requested(seq, out),
        Message::ResyncDone { through_seq } => engine
            .as_mut()
            .ok_or("ResyncDone before ResyncStart")?
            .resync_done(Seq(through_seq), out),
        Message::HashCheck {
            offset,
            block_size,
            hashes,
        } => {
            let e = engine.as_mut().ok_or("HashCheck before ResyncStart")?;
            let range = hash_check_range(
                offset,
                block_size,
                hashes.len(),
                applier.volume.size_bytes(),
                cfg.block_size,
            )
            .ok_or_else(|| format!("malformed HashCheck seq {seq}"))?;
            applier.held_hashes.insert(seq, hashes);
            e.receive(seq, ApplyKind::HashCheck, range, false, out);
        }
        Message::Goodbye => return Err("primary said Goodbye".into()),
        other => {
            return Err(format!(
                "unexpected message kind {} from primary",
                other.kind()
            ));
        }
    }
    Ok(())
}

/// Read frames, check payload crc after decompression (G5) and ranges; a bad
/// frame ends the session before anything of it is applied.
async fn frame_reader(
    mut rd: BufReader<PeerReadHalf>,
    tx: mpsc::Sender<Incoming>,
    peer_timeout_ms: u64,
    metrics: Arc<Metrics>,
    size_bytes: u64,
) {
    let mut scratch = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(
            Duration::from_millis(peer_timeout_ms),
            wire::read_frame(&mut rd, &mut scratch),
        )
        .await
        {
            Err(_) => Err(format!(
                "primary silent for {peer_timeout_ms} ms (heartbeat timeout)"
            )),
            Ok(Err(wire::WireError::Closed)) => Err("primary closed the connection".into()),
            Ok(Err(e @ (wire::WireError::Io { .. } | wire::WireError::Truncated { .. }))) => {
                Err(format!("connection to the primary lost: {e}"))
            }
            Ok(Err(e)) => {
                Metrics::add(&metrics.frames_rejected, 1);
                Err(format!(
                    "bad frame from primary, dropping the connection: {e}"
                ))
            }
            Ok(Ok(f)) => Ok(f),
        };
        let frame = match frame {
            Ok(f) => f,
            Err(reason) => {
                let _ = tx.send(Incoming::Closed(reason)).await;
                return;
            }
        };
        let (range, data) = match &frame.msg {
            Message::Heartbeat { .. } | Message::HeartbeatReply { .. } => continue,
            Message::Write { offset, .. } => {
                let payload = frame.payload.clone();
                match payload.open() {
                    Ok(d) => (Some(ByteRange::new(*offset, d.len() as u64)), Some(d)),
                    Err(e) => {
                        Metrics::add(&metrics.frames_rejected, 1);
                        let _ = tx
                            .send(Incoming::Closed(format!(
                                "bad frame from primary, dropping the connection: {e}"
                            )))
                            .await;
                        return;
                    }
                }
            }
            Message::WriteZeroes { offset, len, .. } | Message::Trim { offset, len } => {
                (Some(ByteRange::new(*offset, *len as u64)), None)
            }
            // HashCheck ranges are validated by on_frame, which knows the block size.
            _ => (None, None),
        };
        if let Some(r) = range
            && r.offset
                .checked_add(r.len)
                .is_none_or(|end| end > size_bytes)
        {
            Metrics::add(&metrics.frames_rejected, 1);
            let _ = tx
                .send(Incoming::Closed(format!(
                    "frame seq {} addresses {}+{} beyond the volume ({size_bytes} bytes)",
                    frame.seq, r.offset, r.len
                )))
                .await;
            return;
        }
        let frame = Frame {
            payload: Payload::empty(),
            ..frame
        };
        if tx
            .send(Incoming::Frame(Box::new(frame), data))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Send acknowledgements in batches; heartbeat when idle.
async fn ack_writer(
    mut wr: PeerWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Message>,
    heartbeat_interval_ms: u64,
) {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_interval_ms));
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { break };
                let mut last = matches!(m, Message::Goodbye | Message::Refuse { .. });
                wire::encode_frame(&Frame { seq: 0, msg: m, payload: Payload::empty() }, &mut buf);
                while let Ok(m) = rx.try_recv() {
                    last |= matches!(m, Message::Goodbye | Message::Refuse { .. });
                    wire::encode_frame(&Frame { seq: 0, msg: m, payload: Payload::empty() }, &mut buf);
                }
                if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
                buf.clear();
                if last {
                    break;
                }
            }
            _ = heartbeat.tick() => {
                nonce += 1;
                wire::encode_frame(&Frame { seq: 0, msg: Message::Heartbeat { nonce }, payload: Payload::empty() }, &mut buf);
                if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
                buf.clear();
            }
        }
    }
    let _ = wr.shutdown().await;
}

struct SecondaryControl {
    cfg: Arc<NodeConfig>,
    metrics: Arc<Metrics>,
    snapshot: Arc<std::sync::Mutex<Snapshot>>,
}

impl ControlHandler for SecondaryControl {
    fn status(&self) -> control::BoxFuture<Option<StatusDoc>> {
        let snap = self.snapshot.lock().expect("snapshot lock").clone();
        let peer = snap.peer.map(|p| (p, "UpToDate".to_string()));
        let doc = StatusDoc::build(
            &self.cfg,
            Role::Secondary,
            &self.metrics,
            peer,
            snap.disk_state,
            0,
            0,
            BlockCount(0),
            None,
            snap.volume_id,
            snap.generation,
        );
        Box::pin(async move { Some(doc) })
    }
    fn other(&self, request: ControlRequest) -> control::BoxFuture<ControlReply> {
        let resource = self.cfg.resource.clone();
        Box::pin(async move {
            if matches!(request.cmd.as_str(), "verify" | "verify-result") {
                // Only the primary orders the comparison against its write stream.
                return ControlReply::error(format!(
                    "this is the secondary of resource '{resource}': run verify on the primary's control socket"
                ));
            }
            request.unknown(&["status"])
        })
    }
}
