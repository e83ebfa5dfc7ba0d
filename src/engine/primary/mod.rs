//! The primary's replication state machine (sans-IO).
//!
//! It owns every decision of the primary: sequence numbers, overlap ordering of
//! local I/O, which frames are shipped and when (the replication window, the
//! "ahead" policy, resync pacing), which client requests may complete (G1), the
//! dirty bitmap of blocks the secondary may lack, the write-intent (activity) log,
//! local flushes, and what must be persisted before what (G3). It does not own
//! sockets, files, payload bytes (it carries them as an opaque `D`) or clocks (the
//! agent passes the time in). The agent feeds it events and carries out the
//! [`Action`]s it returns, in order.
//!
//! The parts, one file each:
//! - [`intent`]: the activity log — which extents are active, pins, what a
//!   retirement must persist first;
//! - [`stream`]: the session with the secondary — shipping in seq order, the
//!   replication window and the ahead policy (G4), acknowledgements, session end;
//! - [`flush`]: client FLUSHes and local fdatasyncs, locally volatile blocks,
//!   poisoning;
//! - [`resync`]: resync passes (bitmap data, hash comparison), their pacing and
//!   the consistent point they end at;
//! - [`verify`]: the online verify.
//!
//! An op (a client write piece, a resync read, a comparison) moves through two
//! independent tracks: its local I/O ([`LocalStage`]) and its frame
//! ([`ShipStage`]). It leaves the op table once both are settled and its client
//! (if any) has been answered.
//!
//! Invariants (checked by [`PrimaryEngine::assert_invariants`] after every event in
//! tests and the simulator):
//! - frames are shipped in strictly increasing seq order with no gap in a session;
//! - a block leaves the dirty bitmap only when a resync frame covering it is
//!   durable on the secondary and no newer change to it is outside the stream;
//! - while not shipping, every accepted client write's blocks are marked dirty.

mod flush;
mod grow; // ha (issue 12)
mod intent;
pub use intent::LOG_WRITES_IN_FLIGHT;
mod resync;
mod stream;
mod verify;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::bitmap::DirtyBitmap;
use crate::engine::activity::ActiveSet;
use crate::engine::rangeset::Coverage;
use crate::engine::sequencer::RangeSequencer;
use crate::types::{BlockCount, BlockIndex, ByteRange, Seq};

pub use flush::LocalFlushId;
pub use grow::GrowRefusal; // ha
pub use resync::{HOLE_PROBE_BYTES, RANGE_HASH_BLOCKS, ResyncProgress, ZERO_CHUNK_BYTES_MAX};
pub use stream::spill_record_bytes; // wan (issue 11 item 5)
pub use verify::{VERIFY_CHUNKS_IN_FLIGHT_MAX, VerifyRefusal, VerifyReport, VerifyState};

/// Replication mode (one word, one meaning: "sync" is the mode, "flush" the block operation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A write completes after the local write and the secondary's `Applied` (G1).
    Sync,
    /// A write completes after the local write; the secondary follows behind.
    Async,
}

/// What a sync-mode primary does with client writes while its peer is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerLoss {
    /// Complete writes on this node alone and track them for resync (degraded).
    Degrade,
    /// Hold writes (and FLUSHes) until the peer is back and has them (G1 holds).
    Block,
}

/// What an operation does to the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Write,
    WriteZeroes,
    Trim,
    /// A resync read: read the range locally, then ship its current contents.
    ResyncRead,
    /// A resync comparison: read the range locally, hash each block (blake3) and
    /// ship the hashes; the secondary answers which blocks differ.
    HashRead,
    /// An online verify chunk: read and hash like `HashRead`, but the answer goes
    /// to the running verify, not to the dirty bitmap.
    VerifyRead,
    /// A coarse resync comparison: one hash per range of blocks
    /// ([`RANGE_HASH_BLOCKS`] by default); ranges that differ are compared again
    /// block by block, so only the blocks that really differ are sent.
    RangeHashRead,
}

impl OpKind {
    /// Ops of the replication itself (not client requests).
    pub fn is_resync(self) -> bool {
        matches!(
            self,
            OpKind::ResyncRead | OpKind::HashRead | OpKind::VerifyRead | OpKind::RangeHashRead
        )
    }

    /// Ops that change the volume.
    pub fn is_client(self) -> bool {
        !self.is_resync()
    }
}

/// An errno value to hand back to the client (EIO, ENOSPC, ...).
pub type Errno = i32;

/// The primary's settings (from the resource file), with the defaults the agent uses.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub size_bytes: u64,
    pub block_size: u32,
    pub peer_loss: PeerLoss,
    /// Replication window (G4): bytes and writes shipped and not yet durable on
    /// the secondary.
    pub window_bytes_max: u64,
    pub window_writes_max: u64,
    /// Largest resync read.
    pub resync_chunk_bytes: u64,
    /// Blocks per hash of a coarse comparison.
    pub range_hash_blocks: u64,
    /// Resync rate limit in bytes on the wire per second; 0 = unlimited.
    pub resync_rate_bytes_per_s: u64,
    /// ha (`tandem pause-sync`): no resync chunk is produced while set; client
    /// writes still replicate, the out-of-sync blocks wait.
    pub resync_paused: bool,
    /// Shortest time the primary stays ahead once it went there: each return costs
    /// a resync pass, and a link slower than the writers would otherwise flap.
    pub ahead_min_ms: u64,
    /// Longest a completed write stays only in the page cache before a background
    /// local flush covers it (bounds what a retirement must keep in the bitmap).
    pub local_flush_interval_ms: u64,
    /// Persist a changing bitmap at most this often (resync progress; what a
    /// restart then resends).
    pub persist_interval_ms: u64,
    /// wan (issue 11 item 5): record bytes the spill log may hold (async mode; 0 =
    /// no spill log): writes that do not fit the window go there and ship from
    /// there in order (stream.rs). The agent leaves room for one wrap of the ring.
    pub spill_bytes_max: u64,
}

impl Config {
    pub fn new(mode: Mode, size_bytes: u64, block_size: u32) -> Config {
        Config {
            mode,
            size_bytes,
            block_size,
            peer_loss: PeerLoss::Degrade,
            window_bytes_max: 64 << 20,
            window_writes_max: 4096,
            resync_chunk_bytes: 1 << 20,
            range_hash_blocks: RANGE_HASH_BLOCKS,
            resync_rate_bytes_per_s: 0,
            resync_paused: false,
            ahead_min_ms: 500,
            local_flush_interval_ms: 2_000,
            persist_interval_ms: 10_000,
            spill_bytes_max: 0,
        }
    }
}

/// A frame for the secondary, in the order it must be sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing<D> {
    /// A resync starts that puts about `blocks` blocks in the secondary's journal
    /// (what it checks against what it stages: the blocks sent as data and a 32nd
    /// of those compared by hash, see `staged_blocks`; 0 = nothing differs);
    /// `next` is the seq of the next frame.
    /// The first one of a session comes before any other frame; a later one after
    /// the ahead state tells the secondary that the seqs below `next` it has not
    /// seen will never arrive.
    ResyncStart {
        next: Seq,
        blocks: BlockCount,
        full: bool,
    },
    Write {
        seq: Seq,
        offset: u64,
        fua: bool,
        /// When the primary accepted the write (the agent's clock, ms).
        at_ms: u64,
        data: D,
    },
    Zeroes {
        seq: Seq,
        offset: u64,
        len: u64,
        fua: bool,
        at_ms: u64,
    },
    Trim {
        seq: Seq,
        offset: u64,
        len: u64,
        at_ms: u64,
    },
    /// Compare `hashes` (one per `unit_bytes` from `offset`) at this seq.
    HashCheck {
        seq: Seq,
        offset: u64,
        unit_bytes: u32,
        hashes: D,
    },
    /// Make everything through `through` durable.
    Flush { through: Seq },
    /// The resync is complete: once durable through `through`, the secondary is a
    /// consistent copy of this node as of `through` (G2).
    ResyncDone { through: Seq },
}

/// What a local read produced.
#[derive(Debug)]
pub enum ReadResult<D> {
    /// The range's data (a resync read).
    Data(D),
    /// The range reads as zeroes (a hole, or all-zero data): shipped without payload.
    Zero,
    /// Block hashes (a comparison).
    Hashes(D),
}

/// Why the engine ends a session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionFault {
    #[error("local read for resync of offset {offset} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    ResyncReadFailed { offset: u64, errno: Errno },
    #[error("hash reply for seq {seq}, which is not an outstanding hash check")]
    UnexpectedHashReply { seq: Seq },
    #[error("malformed hash reply for seq {seq}: a block index beyond its {units} hashes")]
    MalformedHashReply { seq: Seq, units: u64 },
    #[error("peer claims seq {through} durable, but only seqs below {next_ship} were shipped")]
    DurableBeyondShipped { through: Seq, next_ship: Seq },
    #[error("peer claims seq {through} durable before it answered the hash check {seq}")]
    DurableBeforeHashReply { through: Seq, seq: Seq },
    #[error("peer reports seq {seq} applied, but only seqs below {next_ship} were shipped")]
    AppliedBeyondShipped { seq: Seq, next_ship: Seq },
    #[error(
        "peer reports the resync section through seq {through} done, but no ResyncDone through it was shipped"
    )]
    SectionDoneUnasked { through: Seq },
    /// wan (issue 11 item 5)
    #[error("{reason}; the spill log is off until the agent restarts, its writes are resynced")]
    SpillFailed { reason: String },
    #[error("the bitmap could not be persisted before the session's stream could start")]
    GatePersistFailed,
}

/// Something worth a log line or a counter; decided here so that it is said once
/// per episode, with its figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// The window (and the spill log) filled: new writes are tracked in the bitmap
    /// only (G4).
    EnteredAhead {
        lag_writes: u64,
        lag_bytes: u64,
        spill_bytes: u64,
    },
    /// wan (issue 11 item 5): the window filled: writes go to the spill log and
    /// ship from there in order.
    EnteredSpill {
        lag_writes: u64,
        lag_bytes: u64,
        capacity_bytes: u64,
    },
    /// The spill log is empty again (everything in it is durable on the secondary).
    LeftSpill {
        spilled_writes: u64,
        spilled_bytes: u64,
        peak_bytes: u64,
        spill_ms: u64,
    },
    /// A spill-log read or write failed: spilling is off until the next start.
    SpillFailed { reason: String },
    /// The secondary caught up; a resync pass sends what changed meanwhile.
    LeftAhead {
        out_of_sync_blocks: u64,
        ahead_ms: u64,
    },
    /// The window (and spill log) filled while a resync section was open, or
    /// when going ahead with this write would take the bitmap past the ahead
    /// budget (half of `peer_stage_bytes`, what the secondary announced it
    /// stages): writes wait for room instead of going ahead, so the secondary
    /// reaches a consistent point.
    Throttling {
        lag_bytes: u64,
        peer_stage_bytes: Option<u64>,
    },
    /// Ahead, the dirty bitmap reached the ahead budget (half of what the
    /// secondary stages, `peer_stage_bytes`, when that is less than the volume):
    /// requests that would grow it wait until the resync pass starts. Once per
    /// ahead episode.
    AheadBudgetFull {
        dirty_bytes: u64,
        budget_bytes: u64,
        peer_stage_bytes: u64,
    },
    /// A client request would take the open resync section past what the
    /// secondary stages (`section_bytes` so far, counting the whole resync):
    /// requests wait until the section ends. Once per section.
    SectionFull {
        section_bytes: u64,
        peer_stage_bytes: u64,
    },
    /// A resync pass starts.
    ResyncStarted { blocks: BlockCount, full: bool },
    /// The secondary is a consistent copy as of `through` again.
    InSync { through: Seq, resynced_blocks: u64 },
    /// A local write failed: the volume is poisoned.
    LocalWriteFailed {
        seq: Seq,
        range: ByteRange,
        errno: Errno,
    },
}

/// Something the agent must do, in the order given.
#[derive(Debug)]
pub enum Action<T, D> {
    /// Start the local I/O of `seq`: a write of `data`, zeroes, a trim, or a read
    /// (resync: the data; comparison: hashes of `hash_unit_bytes` units). Report
    /// with [`PrimaryEngine::local_done`] (writes) or [`PrimaryEngine::read_done`].
    StartLocal {
        seq: Seq,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        data: Option<D>,
        hash_unit_bytes: u32,
    },
    /// Send this frame to the secondary now.
    Ship(Outgoing<D>),
    /// Answer a client write (or FLUSH).
    Complete { token: T, result: Result<(), Errno> },
    /// Make every completed local write durable (fdatasync); report with
    /// [`PrimaryEngine::local_flush_done`].
    StartLocalFlush { id: LocalFlushId },
    /// Write the activity log with this active set durably, then call
    /// [`PrimaryEngine::activity_written`]. These writes are carried out in the
    /// order given, each durable before the next begins (at most
    /// [`LOG_WRITES_IN_FLIGHT`] are given before the first is reported). When
    /// `bitmap` is given (extents retired), persist those bitmap pages too: they
    /// cover the retired extents' blocks that may differ (ARCHITECTURE §4); other
    /// pages stay as on disk.
    /// The pages are durable FIRST (their own fdatasync) unless
    /// `pages_with_record`: then `active` still lists the retired extents, and
    /// pages and record may be made durable together, in either order.
    WriteActivityLog {
        active: Vec<u32>,
        // scale (issue 11): only the pages covering the retired extents.
        bitmap: Option<crate::bitmap::BitmapPages>,
        pages_with_record: bool,
    },
    /// scale (issue 11): tell where `[offset, offset + len)` holds data (SEEK_DATA),
    /// at once, with [`PrimaryEngine::holes_probed`] (only after
    /// [`PrimaryEngine::enable_hole_probes`]).
    ProbeHoles { offset: u64, len: u64 },
    /// Persist this bitmap (resync progress); report with
    /// [`PrimaryEngine::bitmap_persisted`].
    PersistBitmap { bitmap: DirtyBitmap },
    /// The volume is poisoned (a failed write or flush): record it durably.
    Poisoned { reason: String },
    /// The first write without the peer is about to be accepted: start a new
    /// generation durably (superblock), then call
    /// [`PrimaryEngine::generation_started`]; writes wait meanwhile (G8: if the
    /// peer is promoted meanwhile, both sides then hold new generations and the
    /// reconnect sees a split brain instead of silently rolling these writes back).
    StartGenerationAlone,
    /// The peer holds this node's current generation (in sync): the bitmap is
    /// relative to it from now on; record that (superblock, no hurry).
    PeerReachedGeneration,
    /// End the session with the secondary; the dirty bitmap keeps what must be resent.
    DropSession { fault: SessionFault },
    /// For the log and the metrics.
    Note(Note),
    /// wan (issue 11 item 5): append this async op to the spill log (buffered, not
    /// yet durable): its frame ships from there later. `data` for a write.
    SpillAppend {
        seq: Seq,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        at_ms: u64,
        data: Option<D>,
    },
    /// Make every spill append so far durable; report with
    /// [`PrimaryEngine::spill_synced`].
    SyncSpill,
    /// Read the payload of spilled write `seq` back; report with
    /// [`PrimaryEngine::spill_read_done`].
    ReadSpill { seq: Seq },
    /// The records through `seq` are durable on the secondary: release them
    /// durably; report with [`PrimaryEngine::spill_released`].
    ReleaseSpill { through: Seq },
    /// Empty the spill log durably (every record's blocks are in the persisted
    /// bitmap); report with [`PrimaryEngine::spill_released`].
    ResetSpill,
}

/// The local side of an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LocalStage {
    /// Waiting for earlier overlapping ops (`ordered`) and for its extents to be
    /// durably in the activity log (`logged`).
    Waiting {
        ordered: bool,
        logged: bool,
    },
    Running,
    Done(Result<(), Errno>),
}

/// The frame side of an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShipStage {
    /// Not part of the stream (not connected, ahead, or a local-only op).
    Outside,
    /// In the stream; its frame needs the local read first.
    AwaitingRead,
    /// In the stream and ready to go once the ship cursor reaches it.
    Ready,
    Shipped,
    /// Shipped and reported applied by the secondary.
    Applied,
    /// wan (issue 11 item 5): in the stream by way of the spill log; its frame is
    /// the stream's entry's business (the op may leave the table before it ships).
    Spilled,
}

/// Who is told when a client op completes.
#[derive(Debug)]
enum Completion<T> {
    /// Nobody (replication's own op), or already answered.
    None,
    Token(T),
    /// One piece of a request split at extent boundaries.
    Piece(u64),
}

#[derive(Debug)]
struct Op<T, D> {
    range: ByteRange,
    kind: OpKind,
    fua: bool,
    at_ms: u64,
    completion: Completion<T>,
    /// The write's payload until it is both started locally and shipped; a read's
    /// result until it is shipped.
    data: Option<D>,
    local: LocalStage,
    ship: ShipStage,
    /// Async write whose completion waits until it is shipped (window full while a
    /// resync section is open, see stream.rs).
    held_for_window: bool,
    /// Sync write in flight when the peer was lost with `on-disconnect = block`:
    /// answered once the secondary is back in sync and holds it (G1).
    wait_in_sync: bool,
}

/// A client request split into pieces: answered once every piece is.
#[derive(Debug)]
struct Group<T> {
    token: Option<T>,
    remaining: u32,
    result: Result<(), Errno>,
}

/// A block-mode submission waiting for the peer (see [`PeerLoss::Block`]).
#[derive(Debug)]
struct Parked<T, D> {
    kind: OpKind,
    range: ByteRange,
    fua: bool,
    data: Option<D>,
    token: T,
}

/// Lag figures (G4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lag {
    pub writes: u64,
    pub bytes: u64,
    /// Acceptance time of the oldest write the secondary has not made durable:
    /// the oldest write in the stream, or the oldest change tracked only in the
    /// dirty bitmap (link down, ahead, resync pending), whichever is older.
    pub oldest_accepted_at_ms: Option<u64>,
}

/// The primary's replication state.
pub struct PrimaryEngine<T, D> {
    cfg: Config,
    /// The agent's clock as of the last event that carried it (ms).
    now_ms: u64,
    next_seq: Seq,
    ops: BTreeMap<Seq, Op<T, D>>,
    /// The byte ranges of the client ops in `ops`, indexed by offset (an
    /// activity-log retirement looks up the ops over its pages: issue 14).
    client_cover: Coverage,
    groups: HashMap<u64, Group<T>>,
    next_group: u64,
    sequencer: RangeSequencer,
    /// Blocks the secondary may lack, outside the stream.
    dirty: DirtyBitmap,
    /// When the oldest change tracked only in `dirty` was accepted (G4: lag in
    /// seconds stays meaningful while the link is down or the primary is ahead).
    /// Conservative: it stays until `dirty` is empty.
    dirty_since_ms: Option<u64>,
    stream: stream::Stream<D>,
    resync: resync::Resync,
    flush: flush::Flushes<T>,
    intent: Option<intent::Intent>,
    online: verify::Online,
    /// A local write or flush failed: nothing is acknowledged any more (G3).
    poisoned: Option<String>,
    /// Block mode without a peer: client requests wait here, in order.
    parked: VecDeque<Parked<T, D>>,
    persist: intent::Persist,
    /// The peer may not hold this node's generation: the next write without it
    /// needs a new generation first (None: not needed; Some(false): needed;
    /// Some(true): being persisted, writes wait in `parked`).
    alone: Option<bool>,
    /// Client pieces admitted (seq, range, data), for the simulator's oracle.
    #[cfg(test)]
    admissions: Vec<(Seq, ByteRange, Option<D>)>,
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    /// The client pieces admitted since the last call, in seq order (simulator).
    #[cfg(test)]
    pub(crate) fn drain_admissions(&mut self) -> Vec<(Seq, ByteRange, Option<D>)> {
        std::mem::take(&mut self.admissions)
    }

    /// The first ops of the table with their stages (simulator diagnostics).
    #[cfg(test)]
    pub(crate) fn debug_ops(&self, max: usize) -> String {
        let mut text = format!(
            "next_seq {} next_ship {} unacked {:?} durable {} section {} blocked {:?}\n",
            self.next_seq,
            self.stream.next_ship(),
            self.stream.unacked_totals(),
            self.stream.durable_through(),
            self.stream.is_section_open(),
            self.intent.as_ref().map(|i| i.blocked_len())
        );
        let from = Seq(self.stream.next_ship().0.saturating_sub(2));
        for (seq, op) in self.ops.range(from..).take(max) {
            text += &format!(
                "  {seq}: {:?} {:?} local {:?} ship {:?} held {} wait {} completion {}\n",
                op.kind,
                op.range,
                op.local,
                op.ship,
                op.held_for_window,
                op.wait_in_sync,
                !matches!(op.completion, Completion::None)
            );
        }
        text
    }

    /// A primary whose secondary may lack the blocks in `dirty` (from the
    /// metadata), whose first write gets `first_seq`.
    pub fn new(cfg: Config, dirty: DirtyBitmap, first_seq: Seq) -> Self {
        assert!(cfg.block_size.is_power_of_two() && cfg.block_size >= 512);
        assert_eq!(
            dirty.block_count(),
            DirtyBitmap::blocks_for(cfg.size_bytes, cfg.block_size)
        );
        assert!(first_seq > Seq::ZERO);
        assert!(
            cfg.range_hash_blocks >= 2,
            "a range hash covers at least 2 blocks"
        );
        let mut cfg = cfg;
        let bs = cfg.block_size as u64;
        cfg.resync_chunk_bytes = (cfg.resync_chunk_bytes.clamp(bs, 32 << 20) / bs) * bs;
        let blocks = dirty.block_count();
        PrimaryEngine {
            now_ms: 0,
            next_seq: first_seq,
            ops: BTreeMap::new(),
            client_cover: Coverage::new(),
            groups: HashMap::new(),
            next_group: 1,
            sequencer: RangeSequencer::new(),
            dirty_since_ms: None,
            stream: stream::Stream::new(first_seq, cfg.spill_bytes_max),
            resync: resync::Resync::new(blocks),
            flush: flush::Flushes::new(),
            intent: None,
            online: verify::Online::default(),
            poisoned: None,
            parked: VecDeque::new(),
            persist: intent::Persist::default(),
            alone: None,
            #[cfg(test)]
            admissions: Vec::new(),
            dirty,
            cfg,
        }
    }

    /// Use a write-intent log with this active set (ARCHITECTURE §4).
    pub fn enable_activity(&mut self, set: ActiveSet) {
        assert!(
            self.ops.is_empty(),
            "enable the activity log before any write"
        );
        self.intent = Some(intent::Intent::new(set));
    }

    /// Simulator: records list at most `n` extents (≥ the active set's bound).
    #[cfg(test)]
    pub(crate) fn set_activity_record_max(&mut self, n: usize) {
        self.intent
            .as_mut()
            .expect("activity log enabled")
            .set_record_max(n);
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn mode(&self) -> Mode {
        self.cfg.mode
    }
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }
    pub fn dirty(&self) -> &DirtyBitmap {
        &self.dirty
    }
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }
    pub fn poison_reason(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }
    /// Operations not finished locally or not yet answered.
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }
    /// Client requests waiting for the peer (block mode).
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// A demotion may hand the data over: nothing in flight or waiting, the
    /// secondary in sync (no resync, nothing dirty, not ahead) and holding every
    /// write durably (issue 9 bug 4: the unacked queue alone is not enough).
    pub fn ready_to_hand_over(&self) -> bool {
        self.ops.is_empty()
            && self.parked.is_empty()
            && self.is_in_sync()
            && !self.is_ahead()
            && self.lag().writes == 0
    }

    /// Change the resync rate limit (bytes per second on the wire; 0 = unlimited).
    pub fn set_resync_rate(&mut self, bytes_per_s: u64) {
        self.cfg.resync_rate_bytes_per_s = bytes_per_s;
        self.resync.reset_budget(); // ha: the new rate starts from an empty bucket
    }

    /// ha: pause or resume the resync (`tandem pause-sync` / `resume-sync`).
    pub fn set_resync_paused(&mut self, paused: bool) {
        self.cfg.resync_paused = paused;
    }

    /// Mark blocks that differ on the secondary for reasons of its own (it wrote them
    /// while it was primary, or rolled them back): the next resync sends them as data.
    pub fn mark_out_of_sync(&mut self, first: BlockIndex, end: BlockIndex) {
        self.dirty.mark(first, end);
        self.note_dirty_since(self.now_ms);
    }

    /// Mark blocks as possibly different but probably identical on the secondary:
    /// they are resynced by comparing hashes first (ARCHITECTURE §5).
    pub fn mark_verify(&mut self, first: BlockIndex, end: BlockIndex) {
        self.dirty.mark(first, end);
        self.resync.verify.mark(first, end);
        self.note_dirty_since(self.now_ms);
    }

    /// Requests and internal operations in flight (the fuzz target checks the
    /// invariants, which walk them, less often when there are thousands).
    pub fn op_count(&self) -> usize {
        self.ops.len()
    }

    pub fn verify_count(&self) -> BlockCount {
        self.resync.verify.dirty_count()
    }

    /// Dirty blocks that are only suspected, not known, to differ: the active
    /// extents at a crash (`mark_verify`), until a comparison settles them.
    pub fn suspected_blocks(&self) -> BlockCount {
        BlockCount(self.dirty.count_common(&self.resync.verify))
    }

    /// Refuse every further client request with EIO (e.g. a failed metadata write:
    /// durability can no longer be promised).
    pub fn poison(&mut self, reason: String, out: &mut Vec<Action<T, D>>) {
        if self.poisoned.is_some() {
            return;
        }
        self.poisoned = Some(reason.clone());
        out.push(Action::Poisoned { reason });
        // Nothing waits for durability any more: every pending flush fails (a
        // flush that "succeeds" after a failed one proves nothing).
        self.fail_all_flushes(out);
        let parked: Vec<Parked<T, D>> = self.parked.drain(..).collect();
        for p in parked {
            out.push(Action::Complete {
                token: p.token,
                result: Err(libc::EIO),
            });
        }
    }

    /// The blocks that may differ on the secondary right now: the dirty bitmap plus
    /// every write not yet durable there. This is what a persisted bitmap must cover
    /// (together with the activity log) after a clean stop.
    pub fn out_of_sync(&self) -> DirtyBitmap {
        self.dirty_plus(self.in_flight_block_ranges())
    }

    /// What a persisted bitmap must hold while running: [`Self::out_of_sync`] plus
    /// the blocks written locally and not yet covered by a local flush (a power
    /// loss of this node may undo them while the secondary keeps them).
    pub fn persist_image(&self) -> DirtyBitmap {
        self.dirty_plus(
            self.in_flight_block_ranges()
                .chain(self.flush.volatile_runs()),
        )
    }

    /// Blocks of every write not yet durable on the secondary and of every
    /// client op in flight (they overlap: an op in flight is often unacked too).
    fn in_flight_block_ranges(&self) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        self.in_flight_block_ranges_within(BlockIndex(0), BlockIndex(u64::MAX))
    }

    /// [`Self::in_flight_block_ranges`] clipped to blocks `[first, end)`, found
    /// through the offset indexes (O(log n + k), not a walk of every op).
    pub(super) fn in_flight_block_ranges_within(
        &self,
        first: BlockIndex,
        end: BlockIndex,
    ) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        let bs = self.cfg.block_size;
        self.stream
            .unacked_block_ranges_within(first, end, bs)
            .chain(self.client_cover.blocks_within(first, end, bs))
    }

    /// A copy of the dirty bitmap with `ranges` marked, each block once: the
    /// ranges are merged into one set first (marking is idempotent, so the copy is
    /// the same as marking them one by one, changed pages included).
    fn dirty_plus(&self, ranges: impl Iterator<Item = (BlockIndex, BlockIndex)>) -> DirtyBitmap {
        let set = crate::engine::rangeset::RangeSet::from_ranges(ranges);
        let mut bm = self.dirty.clone();
        for (a, b) in set.iter() {
            bm.mark(a, b);
        }
        bm
    }

    /// Lag figures (G4).
    pub fn lag(&self) -> Lag {
        let streamed = self.stream.oldest_unacked_at_ms();
        let dirty = self
            .dirty_since_ms
            .filter(|_| self.dirty.dirty_count().0 > 0);
        let (writes, bytes) = self.stream.unacked_totals();
        Lag {
            writes,
            bytes,
            oldest_accepted_at_ms: match (streamed, dirty) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    fn note_dirty_since(&mut self, accepted_at_ms: u64) {
        self.dirty_since_ms = Some(
            self.dirty_since_ms
                .map_or(accepted_at_ms, |t| t.min(accepted_at_ms)),
        );
    }

    /// Periodic turn of the owner loop (every few ms): pacing of resync and verify
    /// chunks, leaving the ahead state, background local flushes.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Action<T, D>>) {
        self.now_ms = self.now_ms.max(now_ms);
        if self.dirty.dirty_count().0 == 0 {
            self.dirty_since_ms = None;
        } else if self.dirty_since_ms.is_none() {
            // Blocks that became dirty without a client write (a full sync, a
            // restart with a persisted bitmap) count from the first time seen.
            self.dirty_since_ms = Some(self.now_ms);
        }
        self.maybe_leave_ahead(out);
        self.maybe_leave_spill(out); // wan
        self.pump_spill_io(out); // wan
        self.maybe_background_flush(out);
        self.maybe_persist_progress(out);
        self.pump_resync(out);
        self.pump_verify(out);
        self.pump_ship(out);
    }

    /// Accept a client write, write-zeroes or trim. Ranges beyond the volume are
    /// refused with EINVAL; a payload-free request spanning many extents is split
    /// at extent boundaries (each piece has its own seq; the client is answered
    /// once every piece is done).
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        data: Option<D>,
        token: T,
        now_ms: u64,
        out: &mut Vec<Action<T, D>>,
    ) {
        assert!(kind.is_client());
        assert_eq!(
            data.is_some(),
            kind == OpKind::Write,
            "a write carries data, nothing else does"
        );
        self.now_ms = self.now_ms.max(now_ms);
        if self.poisoned.is_some() {
            out.push(Action::Complete {
                token,
                result: Err(libc::EIO),
            });
            return;
        }
        // checked: a request whose end wraps u64 is refused, not a panic (fuzz
        // finding, tools/fuzz regressions/primary/submit-range-overflow).
        let end = range.offset.checked_add(range.len);
        if range.len == 0 || end.is_none_or(|e| e > self.cfg.size_bytes) {
            out.push(Action::Complete {
                token,
                result: if range.len == 0 && range.offset <= self.cfg.size_bytes {
                    Ok(())
                } else {
                    Err(libc::EINVAL)
                },
            });
            return;
        }
        if self.must_park()
            || (!self.stream.is_streaming() && self.alone == Some(false))
            || self.waits_for_ahead_budget(range, out)
            || self.waits_for_section_room(kind, range, out)
        {
            self.parked.push_back(Parked {
                kind,
                range,
                fua,
                data,
                token,
            });
            self.admit_parked(out);
            return;
        }
        self.admit_client(kind, range, fua, data, token, out);
        self.pump_ship(out);
    }

    /// Block mode, sync, no session: requests wait for the peer (G1). Also while a
    /// new generation is being persisted before the first write alone.
    fn must_park(&self) -> bool {
        let block = self.cfg.mode == Mode::Sync
            && self.cfg.peer_loss == PeerLoss::Block
            && !self.stream.is_streaming();
        block || !self.parked.is_empty() || self.alone == Some(true)
    }

    /// Writes without the peer need a new generation first (the agent sets this at
    /// start when the peer's generation is this node's, and the engine after the
    /// peer reached it).
    pub fn set_generation_shared_with_peer(&mut self, shared: bool) {
        self.alone = shared.then_some(false);
    }

    /// The new generation for writing alone is durable: the waiting writes go.
    pub fn generation_started(&mut self, out: &mut Vec<Action<T, D>>) {
        assert_eq!(
            self.alone,
            Some(true),
            "generation_started without a request"
        );
        self.alone = None;
        self.admit_parked(out);
    }

    /// Admit parked requests in order while nothing else holds them.
    pub(super) fn admit_parked(&mut self, out: &mut Vec<Action<T, D>>) {
        while !self.parked.is_empty() {
            let block = self.cfg.mode == Mode::Sync
                && self.cfg.peer_loss == PeerLoss::Block
                && !self.stream.is_streaming();
            if block || self.alone == Some(true) {
                break;
            }
            if !self.stream.is_streaming() && self.alone == Some(false) {
                self.alone = Some(true);
                out.push(Action::StartGenerationAlone);
                break;
            }
            let (front_kind, front) = {
                let p = self.parked.front().expect("checked");
                (p.kind, p.range)
            };
            if self.waits_for_ahead_budget(front, out)
                || self.waits_for_section_room(front_kind, front, out)
            {
                break;
            }
            let p = self.parked.pop_front().expect("checked");
            self.admit_client(p.kind, p.range, p.fua, p.data, p.token, out);
        }
        self.pump_ship(out);
    }

    fn admit_client(
        &mut self,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        data: Option<D>,
        token: T,
        out: &mut Vec<Action<T, D>>,
    ) {
        let pieces = self.split(kind, range);
        if pieces.len() == 1 {
            self.admit_piece(kind, range, fua, data, Completion::Token(token), out);
            return;
        }
        let group = self.next_group;
        self.next_group += 1;
        self.groups.insert(
            group,
            Group {
                token: Some(token),
                remaining: pieces.len() as u32,
                result: Ok(()),
            },
        );
        for piece in pieces {
            self.admit_piece(kind, piece, fua, None, Completion::Piece(group), out);
        }
    }

    /// Split a payload-free request into pieces of at most a quarter of the
    /// activity log (and at most 16 extents), cut at extent boundaries, so that a
    /// TRIM of a whole volume never needs more active extents than the log holds
    /// and never holds up other writes for long.
    fn split(&self, kind: OpKind, range: ByteRange) -> Vec<ByteRange> {
        let Some(intent) = &self.intent else {
            return vec![range];
        };
        let extent = intent.extent_bytes();
        let piece_extents = (intent.max_active() as u64 / 4).clamp(1, 16);
        let piece_max = piece_extents * extent;
        if kind == OpKind::Write {
            return vec![range];
        }
        let mut pieces = Vec::new();
        let mut offset = range.offset;
        while offset < range.end() {
            // Up to the extent boundary `piece_extents` extents ahead.
            let boundary = (offset / extent + piece_extents) * extent;
            let end = boundary.min(range.end()).min(offset + piece_max);
            pieces.push(ByteRange::new(offset, end - offset));
            offset = end;
        }
        pieces
    }

    fn admit_piece(
        &mut self,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        data: Option<D>,
        completion: Completion<T>,
        out: &mut Vec<Action<T, D>>,
    ) {
        let seq = self.assign_seq();
        #[cfg(test)]
        self.admissions.push((seq, range, data.clone()));
        let at_ms = self.now_ms;
        let wire_bytes = if kind == OpKind::Write { range.len } else { 0 };
        let placement = self.place_in_stream(seq, range, wire_bytes, out);
        let in_stream = placement != stream::Placement::Outside;
        if in_stream && self.stream.is_section_open() {
            self.stream.join_section(wire_bytes);
        }
        let spilled = placement == stream::Placement::Spilled;
        if spilled {
            // wan (issue 11 item 5)
            self.spill_op(seq, kind, range, fua, at_ms, wire_bytes, data.clone(), out);
        } else if in_stream {
            self.stream.enqueue(seq, range, at_ms, false, wire_bytes);
        } else {
            self.mark_dirty(range);
            self.note_dirty_since(at_ms);
        }
        let ordered = self.sequencer.admit(seq, range);
        let logged = self.pin(seq, range, in_stream, out);
        debug_assert!(kind.is_client());
        self.client_cover.add(range.offset, range.end());
        self.ops.insert(
            seq,
            Op {
                range,
                kind,
                fua,
                at_ms,
                completion,
                data,
                local: LocalStage::Waiting { ordered, logged },
                ship: if spilled {
                    ShipStage::Spilled
                } else if in_stream {
                    ShipStage::Ready
                } else {
                    ShipStage::Outside
                },
                held_for_window: placement == stream::Placement::HeldForWindow,
                wait_in_sync: false,
            },
        );
        self.try_start(seq, out);
    }

    fn assign_seq(&mut self) -> Seq {
        let seq = self.next_seq;
        self.next_seq = seq.next();
        seq
    }

    /// Admit an op of the replication itself (a resync read or a comparison): no
    /// client waits for it; it starts once earlier overlapping ops are done (G2).
    fn admit_internal(
        &mut self,
        range: ByteRange,
        kind: OpKind,
        out: &mut Vec<Action<T, D>>,
    ) -> Seq {
        let seq = self.assign_seq();
        let ordered = self.sequencer.admit(seq, range);
        self.ops.insert(
            seq,
            Op {
                range,
                kind,
                fua: false,
                at_ms: self.now_ms,
                completion: Completion::None,
                data: None,
                local: LocalStage::Waiting {
                    ordered,
                    logged: true,
                },
                ship: ShipStage::AwaitingRead,
                held_for_window: false,
                wait_in_sync: false,
            },
        );
        self.try_start(seq, out);
        seq
    }

    /// Start the local I/O of `seq` once the sequencer and the activity log allow it.
    fn try_start(&mut self, seq: Seq, out: &mut Vec<Action<T, D>>) {
        let op = self.ops.get_mut(&seq).expect("try_start for unknown op");
        if op.local
            != (LocalStage::Waiting {
                ordered: true,
                logged: true,
            })
        {
            return;
        }
        op.local = LocalStage::Running;
        let data = match (op.kind, op.ship) {
            // The frame still needs the payload: share it (D is cheap to clone).
            (OpKind::Write, ShipStage::Ready) => op.data.clone(),
            (OpKind::Write, _) => op.data.take(),
            _ => None,
        };
        let hash_unit_bytes = match op.kind {
            OpKind::HashRead | OpKind::VerifyRead => self.cfg.block_size,
            OpKind::RangeHashRead => self.cfg.block_size * self.cfg.range_hash_blocks as u32,
            _ => 0,
        };
        out.push(Action::StartLocal {
            seq,
            kind: op.kind,
            range: op.range,
            fua: op.fua,
            data,
            hash_unit_bytes,
        });
    }

    /// The local write, write-zeroes or trim `seq` finished.
    pub fn local_done(&mut self, seq: Seq, result: Result<(), Errno>, out: &mut Vec<Action<T, D>>) {
        let op = self.ops.get_mut(&seq).expect("local_done for unknown op");
        assert_eq!(
            op.local,
            LocalStage::Running,
            "local_done for op not running"
        );
        assert!(op.kind.is_client(), "reads complete with read_done");
        op.local = LocalStage::Done(result);
        let (range, fua) = (op.range, op.fua);
        match result {
            Ok(()) if !fua => self.flush.note_volatile(range, self.cfg.block_size),
            Ok(()) => {}
            Err(errno) => {
                // The volume may now hold anything in this range while the secondary
                // may hold the new data: resync the range from here, and stop
                // acknowledging anything (G3: never retried and assumed).
                self.mark_dirty(range);
                self.note_dirty_since(self.now_ms);
                out.push(Action::Note(Note::LocalWriteFailed { seq, range, errno }));
                self.poison(
                    format!(
                        "a local write of {} bytes at offset {} failed: {}",
                        range.len,
                        range.offset,
                        std::io::Error::from_raw_os_error(errno)
                    ),
                    out,
                );
            }
        }
        self.release_order(seq, out);
        self.unpin(seq, out);
        self.try_complete(seq, out);
        self.pump_ship(out);
    }

    /// The local read `seq` (resync, comparison or verify) finished.
    pub fn read_done(
        &mut self,
        seq: Seq,
        result: Result<ReadResult<D>, Errno>,
        out: &mut Vec<Action<T, D>>,
    ) {
        let op = self.ops.get_mut(&seq).expect("read_done for unknown op");
        assert_eq!(
            op.local,
            LocalStage::Running,
            "read_done for op not running"
        );
        assert!(op.kind.is_resync(), "client ops complete with local_done");
        let (kind, range) = (op.kind, op.range);
        match result {
            Ok(r) => {
                op.local = LocalStage::Done(Ok(()));
                if op.ship == ShipStage::AwaitingRead {
                    op.ship = ShipStage::Ready;
                    op.data = match r {
                        ReadResult::Data(d) | ReadResult::Hashes(d) => Some(d),
                        ReadResult::Zero => None,
                    };
                    self.resync.charge_read(kind, range, op.data.is_some());
                }
            }
            Err(errno) => {
                op.local = LocalStage::Done(Err(errno));
                let in_session = op.ship == ShipStage::AwaitingRead;
                op.ship = ShipStage::Outside;
                if in_session {
                    // Nothing to ship: the stream cannot continue with a gap, so the
                    // session ends here (its blocks stay dirty).
                    if kind == OpKind::VerifyRead {
                        self.fail_verify(format!(
                            "the local read of offset {} failed: {}",
                            range.offset,
                            std::io::Error::from_raw_os_error(errno)
                        ));
                    }
                    let fault = SessionFault::ResyncReadFailed {
                        offset: range.offset,
                        errno,
                    };
                    self.end_session(fault, out);
                }
            }
        }
        self.release_order(seq, out);
        self.pump_ship(out);
        self.try_remove(seq);
    }

    /// Let ops waiting behind `seq` in the sequencer go.
    fn release_order(&mut self, seq: Seq, out: &mut Vec<Action<T, D>>) {
        for next in self.sequencer.complete(seq) {
            let op = self.ops.get_mut(&next).expect("released op exists");
            if let LocalStage::Waiting { logged, .. } = op.local {
                op.local = LocalStage::Waiting {
                    ordered: true,
                    logged,
                };
            }
            self.try_start(next, out);
        }
    }

    /// Mark a range dirty outside the stream. A resync chunk still in flight that
    /// overlaps it must not clear these blocks when it becomes durable: its data is
    /// older than this change.
    fn mark_dirty(&mut self, range: ByteRange) {
        let (a, b) = range.blocks(self.cfg.block_size);
        self.dirty.mark(a, b);
        self.stream.keep_dirty(range);
    }

    /// Answer the client of `seq` if everything it waits for is done, and drop the
    /// op once it is settled.
    fn try_complete(&mut self, seq: Seq, out: &mut Vec<Action<T, D>>) {
        let Some(op) = self.ops.get(&seq) else {
            return;
        };
        let LocalStage::Done(result) = op.local else {
            return;
        };
        if !matches!(op.completion, Completion::None) {
            let remote_ok = result.is_err() || self.remote_settled(seq, op);
            if remote_ok {
                let op = self.ops.get_mut(&seq).expect("present");
                let completion = std::mem::replace(&mut op.completion, Completion::None);
                self.answer(completion, result, out);
            }
        }
        self.try_remove(seq);
    }

    /// Whether a client write's remote side allows its completion (G1, G4).
    fn remote_settled(&self, seq: Seq, op: &Op<T, D>) -> bool {
        if op.wait_in_sync {
            return false;
        }
        match (op.ship, self.cfg.mode) {
            (ShipStage::Outside, _) => true,
            // Async only: the spill log holds it for the secondary.
            (ShipStage::Spilled, _) => true,
            (ShipStage::AwaitingRead, _) => unreachable!("client ops need no read"),
            (ShipStage::Ready, Mode::Async) => !op.held_for_window,
            (ShipStage::Shipped | ShipStage::Applied, Mode::Async) => true,
            (_, Mode::Sync) if op.fua => self.stream.durable_through() >= seq,
            (ShipStage::Applied, Mode::Sync) => true,
            (_, Mode::Sync) => self.stream.durable_through() >= seq,
        }
    }

    fn answer(
        &mut self,
        completion: Completion<T>,
        result: Result<(), Errno>,
        out: &mut Vec<Action<T, D>>,
    ) {
        match completion {
            Completion::None => {}
            Completion::Token(token) => out.push(Action::Complete { token, result }),
            Completion::Piece(g) => {
                let group = self.groups.get_mut(&g).expect("piece of a live group");
                if group.result.is_ok() {
                    group.result = result;
                }
                group.remaining -= 1;
                if group.remaining == 0 {
                    let group = self.groups.remove(&g).expect("present");
                    out.push(Action::Complete {
                        token: group.token.expect("answered once"),
                        result: group.result,
                    });
                }
            }
        }
    }

    /// An op is kept until it is done locally, answered and its frame settled.
    fn try_remove(&mut self, seq: Seq) {
        if let Some(op) = self.ops.get(&seq) {
            let done = matches!(op.local, LocalStage::Done(_));
            let answered = matches!(op.completion, Completion::None);
            let settled = matches!(
                op.ship,
                ShipStage::Outside | ShipStage::Shipped | ShipStage::Applied | ShipStage::Spilled
            );
            if done && answered && settled {
                if op.kind.is_client() {
                    self.client_cover.remove(op.range.offset, op.range.end());
                }
                self.ops.remove(&seq);
            }
        }
    }

    /// Check the invariants; called after events by tests and the simulator.
    pub fn assert_invariants(&self) {
        self.stream.assert_invariants(self.next_seq);
        assert!(
            self.client_cover.matches_cheaply(
                self.ops
                    .values()
                    .filter(|op| op.kind.is_client())
                    .map(|op| (op.range.offset, op.range.end())),
                64
            ),
            "client op index out of step"
        );
        for (seq, op) in &self.ops {
            if matches!(op.ship, ShipStage::Shipped | ShipStage::Applied) {
                assert!(
                    *seq < self.stream.next_ship(),
                    "shipped op {seq} beyond the cursor"
                );
            }
            if matches!(
                op.ship,
                ShipStage::Ready | ShipStage::AwaitingRead | ShipStage::Spilled
            ) {
                assert!(
                    self.stream.is_streaming(),
                    "op {seq} waits to ship while not streaming"
                );
            }
        }
        if let Some(i) = &self.intent {
            i.assert_invariants();
        }
        self.flush.assert_invariants();
        if self.poisoned.is_some() {
            assert!(self.parked.is_empty(), "parked requests while poisoned");
        }
    }
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    /// A client write lost its session before the secondary had it. In degrade
    /// mode (and async) it completes on this node alone, its blocks in the bitmap;
    /// in sync block mode it waits until the secondary is back in sync (G1).
    pub(super) fn park_or_complete_after_loss(&mut self, seq: Seq, out: &mut Vec<Action<T, D>>) {
        let block = self.cfg.mode == Mode::Sync && self.cfg.peer_loss == PeerLoss::Block;
        let op = self.ops.get_mut(&seq).expect("listed");
        if block && !matches!(op.completion, Completion::None) {
            op.wait_in_sync = true;
        }
        self.try_complete(seq, out);
    }

    /// The secondary holds everything again: writes that waited for it complete.
    pub(super) fn release_in_sync_waiters(&mut self, out: &mut Vec<Action<T, D>>) {
        self.release_in_sync_waiters_through(Seq(u64::MAX), out);
    }

    /// The secondary holds this node's image through `through`: writes up to it
    /// that waited for it complete.
    pub(super) fn release_in_sync_waiters_through(
        &mut self,
        through: Seq,
        out: &mut Vec<Action<T, D>>,
    ) {
        let waiting: Vec<Seq> = self
            .ops
            .range(..=through)
            .filter(|(_, op)| op.wait_in_sync)
            .map(|(s, _)| *s)
            .collect();
        for seq in waiting {
            self.ops.get_mut(&seq).expect("listed").wait_in_sync = false;
            self.try_complete(seq, out);
        }
        // FLUSHes waiting for the same (block mode) complete with them: a FLUSH
        // that came while apart waited forever after a resync with nothing to
        // resend (fuzz primary target, regressions/primary/
        // block-flush-after-an-empty-resync).
        self.try_complete_flushes(out);
    }
}
