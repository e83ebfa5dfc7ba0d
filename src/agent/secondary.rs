//! The secondary agent: listen, authenticate, check the handshake (G6), then
//! verify, decompress and apply frames in order (G2, G5), acknowledging
//! `Applied` per write and `Durable` per batched flush.
//!
//! Both nodes listen and dial: this node accepts its primary on `--listen`, and
//! dials the primary's address (`--peer`) while none is attached, announcing itself
//! with a Hello in the secondary role. One session at a time owns the volume; a
//! second connection while one is attached (or being dialed) is refused quietly. Nothing is written to the volume
//! before a handshake is accepted, and nothing but replication ever writes it (G8).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::control::{
    self, ControlHandler, ControlReply, ControlRequest, GenerationsStatus, StatusDoc,
};
use crate::agent::{AgentError, RoleContext, errno_of, security_for};
use crate::bitmap::DirtyBitmap;
use crate::config::NodeConfig;
use crate::engine::generations::{self, Decision, GenInfo, Loser};
use crate::engine::secondary::{ApplyKind, SecondaryAction, SecondaryEngine};
use crate::meta::{MetaStore, Superblock};
use crate::metrics::Metrics;
use crate::transport::{PeerListener, PeerReadHalf, PeerStream, PeerWriteHalf};
use crate::types::{BlockCount, BlockIndex, ByteRange, DiskState, Generation, Role, Seq, VolumeId};
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
    /// Blocks this node changed itself while it was primary, that its peer may not
    /// have: resent by the next primary (a rejoining node is rolled back to the
    /// primary's data) and listed in a split-brain report. Cleared once a resync
    /// from the peer completes.
    own_dirty: DirtyBitmap,
    /// Blocks it may have changed (active extents of a crash while primary):
    /// compared by hash.
    own_verify: DirtyBitmap,
    /// `tandem resolve --discard-local`: the next split brain (or newer-data refusal)
    /// with the peer is resolved by discarding this node's changes.
    discard_local: Arc<std::sync::atomic::AtomicBool>,
}

/// The part of a secondary's state shown by `tandem status`.
#[derive(Clone)]
struct Snapshot {
    disk_state: DiskState,
    volume_id: VolumeId,
    generation: Generation,
    peer: Option<String>,
    generations: GenerationsStatus,
    handshake: Option<String>,
    own_changed_blocks: u64,
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
        s.generations = GenerationsStatus::of(&self.sb);
        s.own_changed_blocks = self.own_dirty.dirty_count().0;
    }

    fn set_handshake(&mut self, text: String) {
        self.snapshot.lock().expect("snapshot lock").handshake = Some(text);
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

    /// This node's generations and changes, as the decision sees them.
    fn gen_info(&self) -> GenInfo {
        GenInfo {
            current: self.sb.gen_current,
            bitmap_base: self.sb.gen_bitmap_base,
            history: self.sb.gen_history,
            changed_blocks: self.own_dirty.dirty_count().0,
            promoted_at_s: self.sb.promoted_at_s,
            inconsistent: self.sb.disk_state != DiskState::UpToDate,
        }
    }

    /// A resync from the peer completed: its generation is now this node's, and
    /// nothing this node changed on its own remains.
    fn adopt_generation(&mut self, primary: Generation) -> Result<(), String> {
        if self.sb.gen_current != primary {
            self.sb.gen_history = [self.sb.gen_current, self.sb.gen_history[0]];
            self.sb.gen_current = primary;
        }
        self.sb.gen_bitmap_base = Generation::NONE;
        self.sb.disk_state = DiskState::UpToDate;
        if self.own_dirty.dirty_count().0 > 0 || self.own_verify.dirty_count().0 > 0 {
            self.own_dirty.clear_all();
            self.own_verify.clear_all();
            self.meta
                .persist_bitmap(&mut self.sb, &self.own_dirty)
                .map_err(|e| format!("writing metadata: {e}"))?;
            self.meta
                .write_activity(self.cfg.al_extent_bytes, &[])
                .map_err(|e| format!("writing metadata: {e}"))?;
        }
        self.write_superblock()
    }
}

/// What this node itself may have changed that its peer lacks, from its metadata:
/// the persisted bitmap (a node that was primary), plus, after an unclean stop,
/// the activity log's extents (compared by hash). Empty for a node that was only
/// ever secondary.
fn own_changes(
    cfg: &NodeConfig,
    sb: &crate::meta::Superblock,
    opened: &crate::meta::Opened,
    size_bytes: u64,
) -> (DirtyBitmap, DirtyBitmap) {
    let mut dirty = opened.bitmap.clone();
    let mut verify = DirtyBitmap::for_volume(size_bytes, cfg.block_size);
    if sb.is_new {
        dirty.clear_all();
    } else if !sb.bitmap_valid {
        dirty.clear_all();
        verify.mark_all();
    } else if !sb.clean_shutdown {
        let activity = &opened.activity;
        if activity.intact {
            for &e in &activity.extents {
                let start = e as u64 * activity.extent_bytes;
                let range = ByteRange::new(
                    start,
                    activity.extent_bytes.min(size_bytes.saturating_sub(start)),
                );
                let (a, b) = range.blocks(cfg.block_size);
                verify.mark(a, b);
            }
        } else {
            verify.mark_all();
        }
        let mut cursor = BlockIndex(0);
        while let Some((first, n)) = dirty.next_dirty_run(cursor, BlockCount(u64::MAX)) {
            verify.clear(first, BlockIndex(first.0 + n.0));
            cursor = BlockIndex(first.0 + n.0);
        }
    }
    (dirty, verify)
}

/// Run a secondary until `shutdown` is cancelled, with its own control socket.
pub async fn run(
    cfg: NodeConfig,
    shutdown: CancellationToken,
    ready: Option<oneshot::Sender<SecondaryReady>>,
) -> Result<(), AgentError> {
    crate::agent::run_alone(cfg, shutdown, |cfg, ctx| serve(cfg, ctx, ready)).await
}

/// Serve the secondary role until `ctx.stop` is cancelled.
pub async fn serve(
    cfg: Arc<NodeConfig>,
    ctx: RoleContext,
    ready: Option<oneshot::Sender<SecondaryReady>>,
) -> Result<(), AgentError> {
    let shutdown = ctx.stop.clone();
    let (volume, opened, rebuilt) = crate::agent::open_node(&cfg, Role::Secondary)?;
    // Data already on the volume (a pre-seeded copy, or metadata rebuilt after
    // damage) is compared by hash rather than overwritten wholesale.
    let verify_data = cfg.seeded || rebuilt;
    let mut sb = opened.superblock.clone();
    if sb.role == Role::Primary {
        tracing::warn!(generation = %sb.gen_current, "node was primary; starting as secondary (demoted)");
        sb.role = Role::Secondary;
    }
    let (own_dirty, own_verify) = own_changes(&cfg, &sb, &opened, volume.size_bytes());
    let mut meta = opened.store;
    if sb.clean_shutdown && !opened.activity.extents.is_empty() {
        // A clean stop left nothing in flight: the old activity log says nothing now.
        meta.write_activity(cfg.al_extent_bytes, &[])?;
    }
    if own_dirty.dirty_count().0 > 0 || own_verify.dirty_count().0 > 0 {
        tracing::warn!(
            changed_blocks = own_dirty.dirty_count().0,
            compare_blocks = own_verify.dirty_count().0,
            generation = %sb.gen_current,
            "this node changed blocks as primary that its peer may not have; the next primary resends them (or a split brain is reported)"
        );
    }
    sb.clean_shutdown = false;
    meta.write_superblock(&sb)?;
    let metrics = ctx.metrics.clone().unwrap_or_default();
    metrics.reset_role_state();
    let snapshot = Arc::new(std::sync::Mutex::new(Snapshot {
        disk_state: sb.disk_state,
        volume_id: sb.volume_id,
        generation: sb.gen_current,
        peer: None,
        generations: GenerationsStatus::of(&sb),
        handshake: None,
        own_changed_blocks: own_dirty.dirty_count().0,
    }));
    let discard_local = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // nbd (issue 13): the read-only export reads the volume beside replication.
    let readonly_volume = cfg.export_readonly.as_ref().map(|_| volume.clone());
    let node = Arc::new(Mutex::new(Node {
        cfg: cfg.clone(),
        volume,
        meta,
        sb,
        metrics: metrics.clone(),
        snapshot: snapshot.clone(),
        verify_data,
        own_dirty,
        own_verify,
        discard_local: discard_local.clone(),
    }));

    let security = security_for(&cfg);
    let listen = cfg.listen.expect("validated");
    // Refusals of misconfigured peers become events (hardening).
    let listener = PeerListener::bind(listen, &security)
        .await?
        .with_events(metrics.clone());
    let bound = listener.local_addr();
    tracing::info!(listen = %bound, expecting = %cfg.peer_name, "secondary listening");
    // nbd (issue 13): `--export-readonly ADDR` serves this volume read-only
    // (crate::nbd::readonly) while replication continues.
    let readonly_stop = CancellationToken::new();
    let readonly_export = match (&cfg.export_readonly, readonly_volume) {
        (Some(addr), Some(volume)) => Some(
            crate::nbd::readonly::serve_readonly(
                &cfg,
                addr,
                volume,
                &metrics,
                readonly_stop.clone(),
            )
            .await
            .map_err(|e| AgentError::Nbd(e.to_string()))?,
        ),
        _ => None,
    };

    let handler: Arc<dyn ControlHandler> = Arc::new(SecondaryControl {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        snapshot,
        discard_local,
    });
    ctx.control.set(Some(handler.clone()));
    let observers = crate::agent::monitor::start(&cfg, handler, metrics.clone()).await?;
    if let Some(ready) = ready {
        let _ = ready.send(SecondaryReady {
            listen: bound,
            metrics: metrics.clone(),
        });
    }

    let sessions = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(peer) = cfg.peer {
        // Both nodes dial: this one too, while no primary is attached.
        tasks.spawn(dialer(
            node.clone(),
            peer,
            security.clone(),
            sessions.clone(),
        ));
    }
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
                        Ok(guard) => match session(guard, stream, stop, None).await {
                            Err(reason) if quiet(&reason) => tracing::debug!(%peer, "session ended: {reason}"),
                            Err(reason) => tracing::warn!(%peer, "session ended: {reason}"),
                            Ok(()) => {}
                        },
                        Err(_) => {
                            // A session is attached (or this node is dialing its peer):
                            // only one primary, the configured peer, is ever accepted.
                            tracing::debug!(%peer, "refusing a second connection: {}", crate::agent::ALREADY_CONNECTED);
                            refuse(stream, crate::agent::ALREADY_CONNECTED).await;
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
    // nbd (issue 13): readers of the read-only export finish before the final flush.
    readonly_stop.cancel();
    if let Some((_, task)) = readonly_export {
        let _ = task.await;
    }
    observers.stop().await;
    ctx.control.set(None);
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

/// Dial the peer while no primary is attached, announcing this node with a Hello in
/// the secondary role; a primary answers with its own Hello and the session runs as
/// if it had dialed. A peer that is secondary too, or already connected, refuses
/// quietly.
async fn dialer(
    node: Arc<Mutex<Node>>,
    peer: SocketAddr,
    security: crate::transport::Security,
    stop: CancellationToken,
) {
    let mut backoff = crate::transport::Backoff::new(1_000, 10_000);
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.cancelled() => return,
        }
        let Ok(guard) = node.clone().try_lock_owned() else {
            // A primary is attached.
            backoff.reset();
            continue;
        };
        let connect_timeout_ms = guard.cfg.connect_timeout_ms;
        let stream = tokio::select! {
            s = crate::transport::connect(peer, &security, connect_timeout_ms) => s,
            _ = stop.cancelled() => return,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, "dialing the peer: {e}");
                continue;
            }
        };
        let hello = guard.hello();
        match session(guard, stream, stop.clone(), Some(hello)).await {
            Ok(()) => backoff.reset(),
            Err(reason) if quiet(&reason) => tracing::debug!(%peer, "dialed the peer: {reason}"),
            Err(reason) => {
                if last_log.is_none_or(|t| t.elapsed() >= crate::agent::RETRY_LOG_INTERVAL) {
                    tracing::warn!(%peer, "dialed the peer: {reason}");
                    last_log = Some(std::time::Instant::now());
                }
            }
        }
    }
}

/// Session ends that are part of both nodes dialing, not problems.
fn quiet(reason: &str) -> bool {
    reason.contains(crate::agent::ALREADY_CONNECTED) || reason.contains(BOTH_SECONDARY)
}

const BOTH_SECONDARY: &str = "both nodes are secondary: nothing to replicate until one is promoted";

async fn refuse(stream: PeerStream, reason: &str) {
    let (_rd, mut wr) = stream.into_split();
    crate::agent::send_refusal(&mut wr, reason).await;
}

/// Check a Hello against this node (G6). Returns what the secondary needs.
fn check_hello(h: &Hello, node: &Node) -> Result<Accepted, String> {
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
    if sb.is_new {
        // A new node (or one with rebuilt metadata) has no generations to compare.
        return Ok(if node.verify_data {
            Accepted::plan(
                SyncPlan::Verify,
                "initial sync of a pre-seeded (or rebuilt) volume: compare every block by hash",
            )
        } else {
            Accepted::plan(SyncPlan::Full, "initial full sync of a new secondary")
        });
    }
    let p = crate::agent::gen_info_of(h);
    let s = node.gen_info();
    let discard_local = node
        .discard_local
        .load(std::sync::atomic::Ordering::Relaxed);
    let bs = cfg.block_size as u64;
    let both = format!(
        "{} (primary): generation {}, diverged from {}, {} blocks ({} bytes) changed; {} (this node): generation {}, diverged from {}, {} blocks ({} bytes) changed",
        h.node_name,
        p.current,
        p.bitmap_base,
        p.changed_blocks,
        p.changed_blocks * bs,
        cfg.name,
        s.current,
        s.bitmap_base,
        s.changed_blocks,
        s.changed_blocks * bs
    );
    let discard = |why: String, common_base: bool| Accepted {
        plan: if common_base {
            SyncPlan::Bitmap
        } else {
            SyncPlan::Full
        },
        decision: format!(
            "{why}: discarding this node's changes, resync from {} ({})",
            h.node_name,
            if common_base {
                "changed blocks only"
            } else {
                "full"
            }
        ),
        report: true,
    };
    Ok(match generations::decide(&p, &s) {
        Decision::Bitmap { why } => Accepted::plan(SyncPlan::Bitmap, why),
        // A pre-seeded volume that never completed its first sync is still compared by
        // hash rather than overwritten wholesale.
        Decision::Full if node.verify_data => Accepted::plan(
            SyncPlan::Verify,
            "no bitmap covers this node's data (pre-seeded): compare every block by hash",
        ),
        Decision::Full => Accepted::plan(
            SyncPlan::Full,
            "this node is generations behind the primary: full resync",
        ),
        Decision::SecondaryNewer if discard_local => discard(
            "this node holds newer data, and resolve --discard-local was given".into(),
            p.bitmap_base == Generation::NONE && s.bitmap_base == p.current,
        ),
        Decision::SecondaryNewer => {
            return Err(format!(
                "this node holds newer data than the primary: {both}. The primary is stale: demote {} (tandem demote) and promote {}, \
                 or to discard this node's newer data run `tandem resolve --discard-local` on {}",
                h.node_name, cfg.name, cfg.name
            ));
        }
        Decision::SplitBrain => {
            let common_base = p.bitmap_base == s.bitmap_base;
            let loser = if discard_local {
                Some((Loser::Secondary, "resolve --discard-local".to_string()))
            } else {
                generations::split_brain_loser(
                    &cfg.split_brain_policy,
                    &p,
                    &h.node_name,
                    &s,
                    &cfg.name,
                )
                .map(|l| (l, format!("split-brain-policy {}", cfg.split_brain_policy)))
            };
            // Event (hardening): the split brain, and the rule that settles it (None: refused).
            node.metrics
                .events
                .emit(crate::metrics::events::EventKind::SplitBrain {
                    peer: h.node_name.clone(),
                    local_generation: s.current.to_string(),
                    peer_generation: p.current.to_string(),
                    resolution: match &loser {
                        Some((Loser::Secondary, by)) => Some(by.clone()),
                        _ => None,
                    },
                    detail: both.clone(),
                });
            match loser {
                Some((Loser::Secondary, by)) => discard(
                    format!("split brain ({both}) resolved by {by}"),
                    common_base,
                ),
                Some((Loser::Primary, by)) => {
                    return Err(format!(
                        "split brain: both nodes wrote while apart: {both}. {by} discards the primary {}'s changes, \
                         but a primary's data is never discarded while it serves: demote {} (tandem demote) and promote {}; \
                         {} then resyncs from {}",
                        h.node_name, h.node_name, cfg.name, h.node_name, cfg.name
                    ));
                }
                None => {
                    return Err(format!(
                        "split brain: both nodes wrote while apart: {both}. Not resolved automatically (split-brain-policy {}). \
                         To keep {}'s data, run `tandem resolve --discard-local` on {}; to keep {}'s, demote {}, promote {}, \
                         and resolve on {}",
                        cfg.split_brain_policy,
                        h.node_name,
                        cfg.name,
                        cfg.name,
                        h.node_name,
                        cfg.name,
                        h.node_name
                    ));
                }
            }
        }
        Decision::Unrelated if discard_local => discard(
            "no common generation, and resolve --discard-local was given".into(),
            false,
        ),
        Decision::Unrelated => {
            return Err(format!(
                "the nodes share no data generation: primary {} has {} (history {}, {}), this node {} has {} (history {}, {}); \
                 they hold unrelated data. To discard this node's data and copy everything from {}, run `tandem resolve --discard-local` on {}",
                h.node_name,
                p.current,
                p.history[0],
                p.history[1],
                cfg.name,
                s.current,
                s.history[0],
                s.history[1],
                h.node_name,
                cfg.name
            ));
        }
    })
}

/// A Hello this node accepts: what the primary must send, and why.
struct Accepted {
    plan: SyncPlan,
    decision: String,
    /// This node's changes are discarded: write the report first.
    report: bool,
}

impl Accepted {
    fn plan(plan: SyncPlan, why: &str) -> Accepted {
        Accepted {
            plan,
            decision: format!("{}: {why}", plan_name(plan)),
            report: false,
        }
    }
}

fn plan_name(plan: SyncPlan) -> &'static str {
    match plan {
        SyncPlan::Bitmap => "bitmap resync",
        SyncPlan::Full => "full resync",
        SyncPlan::Verify => "hash-compare resync",
    }
}

/// Before this node's own changes are overwritten, list them (byte ranges) in a
/// report file beside its metadata. Returns the path.
fn write_discard_report(node: &Node, peer: &str, decision: &str) -> Result<PathBuf, String> {
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
    text += &format!("# unix time: {now}\n# decision: {decision}\n");
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
    /// With the bytes each hash covers (a block, or a range of blocks).
    held_hashes: HashMap<Seq, (u32, Vec<[u8; 32]>)>,
    /// Volume operations started and not yet reported back.
    outstanding: usize,
    gen_primary: Generation,
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
                    let (bs, expected) = self
                        .held_hashes
                        .remove(&seq)
                        .expect("hash check has hashes");
                    let volume = self.volume.clone();
                    let tx = self.done_tx.clone();
                    let ack = self.ack_tx.clone();
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
                    // The bitmap base of an Inconsistent secondary names the generation
                    // it is a sync target of (see engine::generations).
                    let base = self.gen_primary;
                    if node.sb.disk_state != DiskState::Inconsistent
                        || node.sb.gen_bitmap_base != base
                    {
                        if node.sb.disk_state != DiskState::Inconsistent {
                            // Event (hardening): disk state change.
                            node.metrics.events.emit(
                                crate::metrics::events::EventKind::DiskState {
                                    disk_state: DiskState::Inconsistent.to_string(),
                                    previous: node.sb.disk_state.to_string(),
                                },
                            );
                        }
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
                    let was = (node.sb.disk_state, node.sb.gen_current);
                    if let Err(e) = node.adopt_generation(self.gen_primary) {
                        result = Err(e);
                    }
                    if was != (DiskState::UpToDate, self.gen_primary) {
                        tracing::info!(generation = %self.gen_primary, "in sync with the primary: disk is UpToDate");
                    }
                    if was.0 != node.sb.disk_state {
                        // Event (hardening): disk state change.
                        node.metrics
                            .events
                            .emit(crate::metrics::events::EventKind::DiskState {
                                disk_state: node.sb.disk_state.to_string(),
                                previous: was.0.to_string(),
                            });
                    }
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
            if let Err(errno) = result {
                // Event (hardening): the volume refused a replicated write.
                metrics
                    .events
                    .emit(crate::metrics::events::EventKind::IoError {
                        op: "write".into(),
                        error: std::io::Error::from_raw_os_error(errno).to_string(),
                        offset: Some(range.offset),
                        len: Some(range.len),
                    });
            }
            e.apply_done(seq, range, result, out)
        }
        Done::Flush { result } => {
            if let Err(errno) = result {
                // Event (hardening): a flush of the volume failed.
                metrics
                    .events
                    .emit(crate::metrics::events::EventKind::IoError {
                        op: "flush".into(),
                        error: std::io::Error::from_raw_os_error(errno).to_string(),
                        offset: None,
                        len: None,
                    });
            }
            e.flush_done(result, out)
        }
    }
}

/// One session with a primary; holds the node for its whole duration.
async fn session(
    mut node: tokio::sync::OwnedMutexGuard<Node>,
    stream: PeerStream,
    stop: CancellationToken,
    announce: Option<Hello>,
) -> Result<(), String> {
    let peer_addr = stream.peer_addr();
    let cfg = node.cfg.clone();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(1 << 20, rd);
    if let Some(h) = announce {
        crate::agent::send_message(&mut wr, Message::Hello(h))
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
        Message::Hello(h) if h.role == wire::ROLE_SECONDARY => {
            crate::agent::send_refusal(&mut wr, BOTH_SECONDARY).await;
            return Err(BOTH_SECONDARY.into());
        }
        Message::Hello(h) => h,
        Message::Refuse { reason } => return Err(format!("the peer refused: {reason}")),
        other => {
            return Err(format!("expected Hello, got message kind {}", other.kind()));
        }
    };
    let accepted = match check_hello(&hello, &node) {
        Ok(a) => a,
        Err(reason) => {
            tracing::error!(peer = %peer_addr, "refusing primary: {reason}");
            node.metrics.set_error(reason.clone());
            // Event (hardening): a Hello refused (G6 identity, generations).
            node.metrics
                .events
                .emit(crate::metrics::events::EventKind::HandshakeRefused {
                    peer_addr: peer_addr.to_string(),
                    stage: "hello".into(),
                    reason: reason.clone(),
                });
            node.set_handshake(format!("refused: {reason}"));
            crate::agent::send_refusal(&mut wr, &reason).await;
            return Err(reason);
        }
    };
    let plan = accepted.plan;
    if accepted.report {
        match write_discard_report(&node, &hello.node_name, &accepted.decision) {
            Ok(path) => {
                tracing::warn!(report = %path.display(), changed_blocks = node.own_dirty.dirty_count().0, "{}; this node's changed ranges are listed in the report", accepted.decision);
                node.discard_local
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
            Err(reason) => {
                tracing::error!("{reason}");
                crate::agent::send_refusal(&mut wr, &reason).await;
                return Err(reason);
            }
        }
    }
    tracing::info!(
        primary = %hello.node_name,
        primary_generation = %Generation(hello.generations.current),
        primary_base = %Generation(hello.generations.bitmap_base),
        primary_changed_blocks = hello.changed_blocks,
        generation = %node.sb.gen_current,
        base = %node.sb.gen_bitmap_base,
        own_changed_blocks = node.own_dirty.dirty_count().0,
        "handshake decision: {}", accepted.decision
    );
    node.set_handshake(accepted.decision.clone());
    // A bitmap resync covers what this node changed on its own too.
    let (own_dirty, own_verify) = if plan == SyncPlan::Bitmap {
        (
            node.own_dirty.runs(wire::RUNS_PER_WELCOME_MAX),
            node.own_verify.runs(wire::RUNS_PER_WELCOME_MAX),
        )
    } else {
        (Vec::new(), Vec::new())
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
        own_dirty,
        own_verify,
        decision: accepted.decision,
    };
    crate::agent::send_message(&mut wr, Message::Welcome(welcome))
        .await
        .map_err(|e| format!("sending Welcome: {e}"))?;
    tracing::info!(peer = %peer_addr, primary = %hello.node_name, primary_next_seq = hello.first_seq, plan = ?plan, disk = %node.sb.disk_state, "primary attached");
    node.set_peer(Some(hello.node_name.clone()));
    node.metrics.set_connected(true, &hello.node_name);
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
    node.metrics.set_connected(false, &reason);
    tracing::info!(peer = %peer_addr, disk = %node.sb.disk_state, "primary detached: {reason}");
    Ok(())
}

/// Handle one frame from the primary.
/// The range a HashCheck covers: `count` hashed units of `block_size` bytes (a
/// block, or a range of blocks: a power-of-two multiple of the block size up to
/// [`HASH_UNIT_MAX_BYTES`]) from `offset`, the last one cut at the end of the volume.
/// None when it is malformed, out of the volume, or larger than
/// [`HASH_CHECK_MAX_BYTES`].
fn hash_check_range(
    offset: u64,
    block_size: u32,
    count: usize,
    size_bytes: u64,
    expected_block_size: u32,
) -> Option<ByteRange> {
    let unit_ok = block_size >= expected_block_size
        && block_size.is_power_of_two()
        && block_size <= HASH_UNIT_MAX_BYTES;
    if !unit_ok
        || !offset.is_multiple_of(expected_block_size as u64)
        || count as u64 * block_size as u64 > HASH_CHECK_MAX_BYTES
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

/// Largest range one hash may cover, and largest range one HashCheck may make this
/// node read (it holds the range in memory while hashing).
const HASH_UNIT_MAX_BYTES: u32 = 1 << 20;
const HASH_CHECK_MAX_BYTES: u64 = 64 << 20;

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
            applier.held_hashes.insert(seq, (block_size, hashes));
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
    discard_local: Arc<std::sync::atomic::AtomicBool>,
}

impl ControlHandler for SecondaryControl {
    fn status(&self) -> control::BoxFuture<Option<StatusDoc>> {
        let snap = self.snapshot.lock().expect("snapshot lock").clone();
        let peer = snap.peer.map(|p| (p, "UpToDate".to_string()));
        let mut doc = StatusDoc::build(
            &self.cfg,
            Role::Secondary,
            &self.metrics,
            peer,
            snap.disk_state,
            0,
            0,
            BlockCount(snap.own_changed_blocks),
            None,
            snap.volume_id,
            snap.generation,
        );
        doc.generations = Some(snap.generations);
        doc.handshake = snap.handshake;
        Box::pin(async move { Some(doc) })
    }
    fn other(&self, request: ControlRequest) -> control::BoxFuture<ControlReply> {
        let reply = match request.cmd.as_str() {
            "resolve" if !request.flag("discard_local") => ControlReply::error(
                "resolve needs --discard-local: it discards this node's changes in favour of its peer's".into(),
            ),
            "resolve" => {
                let snap = self.snapshot.lock().expect("snapshot lock").clone();
                self.discard_local
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let message = format!(
                    "at the next connection from {}, this node's {} changed blocks ({} bytes) since generation {} are discarded \
                     and replaced by {}'s data; the changed ranges are listed first in {}.split-brain-<time>.txt",
                    self.cfg.peer_name,
                    snap.own_changed_blocks,
                    snap.own_changed_blocks * self.cfg.block_size as u64,
                    snap.generations.bitmap_base,
                    self.cfg.peer_name,
                    self.cfg.meta.display()
                );
                tracing::warn!("resolve --discard-local: {message}");
                ControlReply::success(serde_json::json!({ "message": message }))
            }
            "verify" | "verify-result" => ControlReply::error(format!(
                // Only the primary orders the comparison against its write stream.
                "this is the secondary of resource '{}': run verify on the primary's control socket",
                self.cfg.resource
            )),
            _ => request.unknown(&["promote", "demote", "resolve"]),
        };
        Box::pin(async move { reply })
    }
    fn metrics(&self) -> Option<Arc<Metrics>> {
        Some(self.metrics.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::hash_check_range;
    use crate::types::ByteRange;

    const BS: u32 = 4096;
    const SIZE: u64 = 10 * 4096 * 16 + 4096 * 3;

    #[test]
    fn hash_checks_cover_blocks_or_ranges_of_blocks() {
        // One hash per block.
        assert_eq!(
            hash_check_range(0, BS, 4, SIZE, BS),
            Some(ByteRange::new(0, 4 * 4096))
        );
        // One hash per 64 KiB range; the last range is cut at the end of the volume.
        assert_eq!(
            hash_check_range(0, 16 * BS, 2, SIZE, BS),
            Some(ByteRange::new(0, 2 * 16 * 4096))
        );
        let last = 10 * 16 * 4096;
        assert_eq!(
            hash_check_range(last, 16 * BS, 1, SIZE, BS),
            Some(ByteRange::new(last, 3 * 4096))
        );
        // Too many hashes for what is left of the volume.
        assert_eq!(hash_check_range(last, 16 * BS, 2, SIZE, BS), None);
    }

    #[test]
    fn malformed_hash_checks_are_refused() {
        for (offset, unit, count) in [
            (0, BS / 2, 1),   // smaller than a block
            (0, 3 * BS, 1),   // not a power of two
            (0, 2 << 20, 1),  // a range larger than 1 MiB
            (512, BS, 1),     // not block aligned
            (0, BS, 0),       // no hashes
            (0, 1 << 20, 65), // more than 64 MiB to read
            (SIZE, BS, 1),    // past the end
        ] {
            assert_eq!(
                hash_check_range(offset, unit, count, SIZE, BS),
                None,
                "offset {offset} unit {unit} count {count}"
            );
        }
    }
}
