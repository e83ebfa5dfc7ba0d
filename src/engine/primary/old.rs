//! The primary's replication state machine (sans-IO).
//!
//! It owns: sequence numbers, overlap ordering of local I/O, the order in which
//! frames are shipped, which client requests may complete (G1), the window of
//! shipped-but-not-durable writes (ARCHITECTURE §3), the dirty bitmap of blocks
//! the secondary may lack, and the resync cursor. It does not own: sockets,
//! files, payload bytes or timers. The agent feeds it events and carries out the
//! [`Action`]s it returns, in order.
//!
//! Invariants (checked by `assert_invariants` after every event in tests):
//! - every op with `in_stream` has `seq >= stream_first`;
//! - frames are shipped in strictly increasing seq order, with no gaps in a session;
//! - a block leaves the dirty bitmap only when a resync frame covering it is durable;
//! - while not streaming, every accepted write's blocks are marked dirty.
//!
//! ## Online verify (`tandem verify`)
//!
//! An online verify compares every block of both volumes by blake3 hash while
//! client writes keep flowing, and must never report a block that differs only
//! because a write was in flight. The mechanism is ordering, not retrying: a
//! verify chunk is an op like any other, with its own seq `S`, and
//! - on the primary it goes through the overlap sequencer ([`RangeSequencer`]):
//!   its local read starts only once every earlier overlapping op (seq < S) has
//!   completed locally, and every later overlapping op (seq > S) waits until the
//!   read has finished. The hashes therefore describe exactly the primary's range
//!   after the writes < S and before the writes > S;
//! - its `HashCheck` frame is shipped in seq order, and the secondary admits it
//!   into its own sequencer like a write (engine/secondary.rs): it hashes its
//!   blocks after applying every earlier overlapping frame and before any later
//!   one. As long as every write < S is in the stream (connected, not ahead, no
//!   dirty block awaiting resync), both sides hash the same logical state, so a
//!   reported mismatch is a real divergence.
//!
//! Chunks are produced only in that situation: the verify pauses while the
//! primary is ahead or a resync is pending (blocks in the dirty bitmap are known
//! to differ, they are not what verify looks for), and fails if the session
//! ends. Chunks are not part of the replication window (they change nothing on
//! the secondary, so there is nothing to make durable or to resend); at most
//! [`VERIFY_CHUNKS_IN_FLIGHT_MAX`] are outstanding, and the agent rate-limits them.
//! The cost on clients: a write overlapping a chunk waits for one chunk read
//! (at most `resync_chunk_bytes`, 1 MiB by default).
//! With `repair`, the mismatched blocks are marked dirty once the scan is complete
//! and a resync pass sends them; the verify is done when none of them is dirty any
//! more, i.e. their resync frames are durable on the secondary.

use std::collections::{BTreeMap, VecDeque};

use std::collections::HashMap;

use crate::bitmap::DirtyBitmap;
use crate::engine::activity::ActiveSet;
use crate::engine::sequencer::RangeSequencer;
use crate::types::{BlockCount, BlockIndex, ByteRange, Seq};

/// Replication mode (one word, one meaning: "sync" is the mode, "flush" the block operation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A write completes after the local write and the secondary's `Applied` (G1).
    Sync,
    /// A write completes after the local write; the secondary follows behind.
    Async,
}

/// What a client operation does to the volume.
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
    /// to the running verify, not to the dirty bitmap (see the module docs).
    VerifyRead,
    /// A coarse resync comparison: one hash per range of blocks
    /// ([`RANGE_HASH_BLOCKS`] by default). Ranges
    /// that differ are compared again block by block in the next pass, so only the
    /// blocks that really differ are sent.
    RangeHashRead,
}

/// Blocks per hash of a coarse comparison (64 KiB at 4 KiB blocks). Checksum resync
/// (seeding, crash recovery) compares ranges first, then block by block only where
/// a range differs. With 1% of blocks changed at random, 85% of 16-block ranges are
/// unchanged, so the hashes on the wire shrink about fourfold; clustered changes
/// (the usual case) do much better.
pub const RANGE_HASH_BLOCKS: u64 = 16;

impl OpKind {
    /// Resync ops (not client requests).
    pub fn is_resync(self) -> bool {
        matches!(
            self,
            OpKind::ResyncRead | OpKind::HashRead | OpKind::VerifyRead | OpKind::RangeHashRead
        )
    }
}

/// An errno value to hand back to the client (EIO, ENOSPC, ...).
pub type Errno = i32;

/// Identifies a client FLUSH.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlushId(pub u64);

/// Something the agent must do, in the order given.
#[derive(Debug)]
pub enum Action<T> {
    /// Start the local I/O of `seq` (its data is held by the agent).
    StartLocal {
        seq: Seq,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
    },
    /// Send the frame of `seq` to the secondary now.
    Ship { seq: Seq },
    /// Send `ResyncStart` with frame seq `next`, the seq of the next frame to come.
    /// The first one of a session comes before any other frame; a later one after
    /// the ahead state tells the secondary that the seqs below `next` it has not
    /// seen will never arrive.
    ShipResyncStart {
        next: Seq,
        blocks: BlockCount,
        full: bool,
    },
    /// Send `Flush` with frame seq `through`.
    ShipFlush { through: Seq },
    /// Send `ResyncDone { through }`.
    ShipResyncDone { through: Seq },
    /// Complete a client write.
    Complete {
        seq: Seq,
        token: T,
        result: Result<(), Errno>,
    },
    /// Make every completed local write durable (fdatasync).
    StartLocalFlush { id: FlushId },
    /// Complete a client flush.
    CompleteFlush {
        id: FlushId,
        token: T,
        result: Result<(), Errno>,
    },
    /// The write `seq` no longer occupies the replication window.
    Release { seq: Seq },
    /// Drop the agent's data for `seq` (shipped or no longer to be shipped).
    Forget { seq: Seq },
    /// Write the activity log durably with this active set, then call
    /// `activity_written`. When `retired` is true some extents left the set: persist
    /// the out-of-sync bitmap durably FIRST, so its bits stay covered (ARCHITECTURE §4).
    WriteActivityLog { active: Vec<u32>, retired: bool },
    /// The session cannot continue (e.g. a resync read failed, leaving a gap in the
    /// stream): close it; the dirty bitmap keeps what must be resent.
    DropSession { reason: String },
}

#[derive(Debug, PartialEq, Eq)]
enum Local {
    Waiting,
    Running,
    Done(Result<(), Errno>),
}

#[derive(Debug)]
struct Op<T> {
    range: ByteRange,
    kind: OpKind,
    fua: bool,
    token: Option<T>,
    local: Local,
    /// Earlier overlapping ops are done (the sequencer released it).
    seq_ready: bool,
    /// Its extents are durably in the activity log (always true without one).
    al_ready: bool,
    in_stream: bool,
    frame_ready: bool,
    shipped: bool,
    applied: bool,
}

#[derive(Debug)]
struct Unacked {
    seq: Seq,
    range: ByteRange,
    resync: bool,
    accepted_at_ms: u64,
    /// For a resync chunk: ranges marked dirty after the chunk was read (writes not
    /// shipped while ahead, local errors), and for a hash chunk the blocks the
    /// secondary reported different. Its Durable must not clear them.
    keep: Vec<ByteRange>,
    /// For a hash chunk, blocks per hash (1, or the range size for a coarse one);
    /// 0 for data. A hash chunk's blocks go back into `verify` if the session drops.
    hash_unit_blocks: u64,
}

#[derive(Debug)]
struct PendingFlush<T> {
    id: FlushId,
    /// Highest seq assigned when the flush arrived; the secondary must be durable through it.
    through: Seq,
    /// Whether the secondary was asked to flush (we were streaming).
    remote: bool,
    local: Option<Result<(), Errno>>,
    token: Option<T>,
}

/// Progress of a resync pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncProgress {
    pub full: bool,
    pub total_blocks: BlockCount,
    /// Blocks whose resync frames have been shipped in this pass.
    pub shipped_blocks: BlockCount,
    pub cursor: BlockIndex,
}

#[derive(Debug)]
struct Resync {
    progress: ResyncProgress,
    /// Resync ops of this pass not yet shipped.
    outstanding: u32,
    /// All chunks have been produced; ResyncDone follows once they are shipped.
    exhausted: bool,
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

/// The write-intent log's bookkeeping (ARCHITECTURE §4). A client write pins its
/// extents from acceptance until it is done locally and, if shipped, durable on
/// the secondary; neither its local I/O nor its frame may go out before the log
/// record naming its extents is durable.
struct Activity {
    set: ActiveSet,
    /// Writes of the log issued and completed (numbered from 1).
    issued: u64,
    completed: u64,
    /// Extent → the log write that records it, until that write completes.
    recording: HashMap<u32, u64>,
    /// The set changed since the last write was issued.
    changed: bool,
    retired: bool,
    /// Ops waiting for log write n.
    waiters: BTreeMap<u64, Vec<Seq>>,
    /// Ops whose extents did not fit (every active extent pinned), in seq order.
    /// Later ops queue behind them so the earliest cannot starve.
    blocked: VecDeque<Seq>,
    /// Remaining pins per op: local completion, and durability on the secondary.
    pins: HashMap<Seq, (ByteRange, u8)>,
}

/// The primary's replication state.
pub struct PrimaryEngine<T> {
    mode: Mode,
    block_size: u32,
    size_bytes: u64,
    resync_chunk_bytes: u64,
    next_seq: Seq,
    ops: BTreeMap<Seq, Op<T>>,
    sequencer: RangeSequencer,
    dirty: DirtyBitmap,
    /// Dirty blocks that may well be identical on the secondary (active extents after
    /// a crash, a pre-seeded copy): compared by hash before any data is sent.
    verify: DirtyBitmap,
    /// Blocks of `verify` whose range differed: compared block by block, not by range.
    fine: DirtyBitmap,
    /// Blocks per hash of a coarse comparison.
    range_hash_blocks: u64,
    streaming: bool,
    /// Ahead (G4): connected, but new writes are tracked only in the bitmap because
    /// the replication window was full. Seqs from `ahead_from` on are not shipped.
    ahead: bool,
    ahead_from: Seq,
    stream_first: Seq,
    next_ship: Seq,
    unacked: VecDeque<Unacked>,
    unacked_bytes: u64,
    durable_through: Seq,
    flushes: VecDeque<PendingFlush<T>>,
    next_flush_id: u64,
    /// Flush markers waiting for the ship cursor to pass them.
    flush_markers: VecDeque<Seq>,
    resync: Option<Resync>,
    resync_done_marker: Option<Seq>,
    /// A local flush failed: nothing may be acknowledged as durable any more.
    poisoned: bool,
    al: Option<Activity>,
    /// When the oldest change tracked only in `dirty` was accepted (G4: lag in
    /// seconds stays meaningful while the link is down or the primary is ahead).
    /// The bitmap does not say which block is how old, so this is conservative:
    /// it stays until `dirty` is empty. None while `dirty` is empty.
    dirty_since_ms: Option<u64>,
    /// The online verify running or finished last (see the module docs).
    online: Option<OnlineVerify>,
    /// Verify chunks issued in this session and not answered yet.
    verify_chunks: BTreeMap<Seq, ByteRange>,
}

impl<T> PrimaryEngine<T> {
    pub fn new(
        mode: Mode,
        size_bytes: u64,
        block_size: u32,
        dirty: DirtyBitmap,
        first_seq: Seq,
    ) -> Self {
        assert!(block_size.is_power_of_two() && block_size >= 512);
        assert_eq!(
            dirty.block_count(),
            DirtyBitmap::for_volume(size_bytes, block_size).block_count()
        );
        assert!(first_seq > Seq::ZERO);
        PrimaryEngine {
            mode,
            block_size,
            size_bytes,
            resync_chunk_bytes: 1 << 20,
            next_seq: first_seq,
            ops: BTreeMap::new(),
            sequencer: RangeSequencer::new(),
            verify: DirtyBitmap::new(dirty.block_count()),
            fine: DirtyBitmap::new(dirty.block_count()),
            range_hash_blocks: RANGE_HASH_BLOCKS,
            dirty,
            streaming: false,
            stream_first: first_seq,
            next_ship: first_seq,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            durable_through: Seq::ZERO,
            flushes: VecDeque::new(),
            next_flush_id: 1,
            flush_markers: VecDeque::new(),
            resync: None,
            resync_done_marker: None,
            poisoned: false,
            ahead: false,
            ahead_from: first_seq,
            al: None,
            dirty_since_ms: None,
            online: None,
            verify_chunks: BTreeMap::new(),
        }
    }

    pub fn set_resync_chunk_bytes(&mut self, bytes: u64) {
        assert!(bytes >= self.block_size as u64 && bytes <= 32 << 20);
        self.resync_chunk_bytes = bytes - bytes % self.block_size as u64;
    }

    /// Blocks per hash of a coarse comparison (tests and the simulation use small
    /// ranges so that small volumes exercise both levels).
    pub fn set_range_hash_blocks(&mut self, blocks: u64) {
        assert!(blocks >= 2, "a range hash covers at least 2 blocks");
        self.range_hash_blocks = blocks;
    }

    /// For a comparison op: how many blocks each hash covers.
    pub fn hash_unit_blocks(&self, kind: OpKind) -> Option<u64> {
        match kind {
            OpKind::HashRead | OpKind::VerifyRead => Some(1),
            OpKind::RangeHashRead => Some(self.range_hash_blocks),
            _ => None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn is_ahead(&self) -> bool {
        self.ahead
    }
    /// Connected and shipping new writes (not ahead).
    pub fn is_shipping(&self) -> bool {
        self.streaming && !self.ahead
    }
    pub fn is_streaming(&self) -> bool {
        self.streaming
    }
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }
    pub fn dirty(&self) -> &DirtyBitmap {
        &self.dirty
    }
    /// Refuse every further client request with EIO (a failed flush or metadata
    /// write: durability can no longer be promised).
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        self.resync.as_ref().map(|r| r.progress)
    }
    pub fn durable_through(&self) -> Seq {
        self.durable_through
    }
    /// Operations not finished locally or not yet completed to their client.
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }
    pub fn lag(&self) -> Lag {
        let streamed = self.unacked.front().map(|u| u.accepted_at_ms);
        let dirty = self
            .dirty_since_ms
            .filter(|_| self.dirty.dirty_count().0 > 0);
        Lag {
            writes: self.unacked.len() as u64,
            bytes: self.unacked_bytes,
            oldest_accepted_at_ms: match (streamed, dirty) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// Keep the age of the bitmap-only changes current: called with the clock on
    /// every turn of the owner loop. Blocks that became dirty without a client
    /// write (a full sync, a restart with a persisted bitmap, a seeded compare)
    /// count from the first time they are seen; an empty bitmap has no age.
    pub fn observe_dirty(&mut self, now_ms: u64) {
        if self.dirty.dirty_count().0 == 0 {
            self.dirty_since_ms = None;
        } else {
            self.note_dirty_since(now_ms);
        }
    }

    fn note_dirty_since(&mut self, accepted_at_ms: u64) {
        self.dirty_since_ms = Some(
            self.dirty_since_ms
                .map_or(accepted_at_ms, |t| t.min(accepted_at_ms)),
        );
    }

    /// The blocks that may differ on the secondary right now: the dirty bitmap plus
    /// every write not yet durable there. This is what must be persisted.
    pub fn out_of_sync(&self) -> DirtyBitmap {
        let mut bm = self.dirty.clone();
        for u in &self.unacked {
            let (a, b) = u.range.blocks(self.block_size);
            bm.mark(a, b);
        }
        for op in self.ops.values() {
            if !op.kind.is_resync() {
                let (a, b) = op.range.blocks(self.block_size);
                bm.mark(a, b);
            }
        }
        bm
    }

    /// Accept a client write, write-zeroes or trim. The caller has range-checked it.
    pub fn submit(
        &mut self,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        token: T,
        now_ms: u64,
        out: &mut Vec<Action<T>>,
    ) -> Seq {
        assert!(!kind.is_resync());
        assert!(
            range.end() <= self.size_bytes,
            "range {range:?} beyond volume"
        );
        let seq = self.assign_seq();
        if self.poisoned {
            out.push(Action::Complete {
                seq,
                token,
                result: Err(libc::EIO),
            });
            return seq;
        }
        let in_stream = self.streaming && !self.ahead;
        if in_stream {
            self.unacked.push_back(Unacked {
                seq,
                range,
                resync: false,
                accepted_at_ms: now_ms,
                keep: Vec::new(),
                hash_unit_blocks: 0,
            });
            self.unacked_bytes += range.len;
        } else {
            self.mark_dirty(range);
            self.note_dirty_since(now_ms);
        }
        let runnable = self.sequencer.admit(seq, range);
        let pinned_ready = self.pin(seq, range, in_stream, out);
        self.ops.insert(
            seq,
            Op {
                range,
                kind,
                fua,
                token: Some(token),
                local: Local::Waiting,
                seq_ready: false,
                al_ready: pinned_ready,
                in_stream,
                frame_ready: pinned_ready,
                shipped: false,
                applied: false,
            },
        );
        if runnable {
            self.ops.get_mut(&seq).expect("inserted").seq_ready = true;
            self.try_start(seq, out);
        }
        if in_stream {
            self.pump_ship(out);
        } else {
            out.push(Action::Forget { seq });
        }
        seq
    }

    /// The local I/O of `seq` finished.
    pub fn local_done(&mut self, seq: Seq, result: Result<(), Errno>, out: &mut Vec<Action<T>>) {
        let op = self.ops.get_mut(&seq).expect("local_done for unknown op");
        assert_eq!(op.local, Local::Running, "local_done for op not running");
        let is_client = !op.kind.is_resync();
        if let Err(errno) = result {
            // The local volume may now hold anything in this range while the secondary
            // may hold the new data: resync the range from here (G3).
            tracing::error!(
                seq = seq.0,
                offset = op.range.offset,
                len = op.range.len,
                errno,
                "local I/O failed; range marked for resync"
            );
            let range = op.range;
            self.mark_dirty(range);
        }
        let op = self.ops.get_mut(&seq).expect("checked above");
        op.local = Local::Done(result);
        if op.kind.is_resync() && !op.in_stream {
            // The session this read was for has ended; its blocks stay dirty.
            out.push(Action::Forget { seq });
        } else if op.kind.is_resync() {
            match result {
                Ok(()) => op.frame_ready = true,
                Err(errno) => {
                    // Nothing to ship: the stream cannot continue with a gap, so the
                    // session ends here (its blocks stay dirty) and the agent closes it.
                    let offset = op.range.offset;
                    if op.kind == OpKind::VerifyRead {
                        self.fail_verify(format!(
                            "the local read of offset {offset} failed: {}",
                            std::io::Error::from_raw_os_error(errno)
                        ));
                    }
                    out.push(Action::DropSession {
                        reason: format!(
                            "local read for resync of offset {offset} failed: {}",
                            std::io::Error::from_raw_os_error(errno)
                        ),
                    });
                    self.session_ended(out);
                }
            }
        }
        for next in self.sequencer.complete(seq) {
            self.ops
                .get_mut(&next)
                .expect("released op exists")
                .seq_ready = true;
            self.try_start(next, out);
        }
        if is_client {
            self.unpin(seq, out);
        }
        self.pump_ship(out);
        self.try_complete(seq, out);
    }
}

impl<T> PrimaryEngine<T> {
    /// Mark a range dirty outside the stream. A resync chunk still in flight that
    /// overlaps it must not clear these blocks when it becomes durable: its data is
    /// older than this change.
    fn mark_dirty(&mut self, range: ByteRange) {
        let (a, b) = range.blocks(self.block_size);
        self.dirty.mark(a, b);
        for u in self
            .unacked
            .iter_mut()
            .filter(|u| u.resync && u.range.overlaps(&range))
        {
            u.keep.push(range);
        }
    }

    /// Use a write-intent log with this active set (ARCHITECTURE §4).
    pub fn enable_activity(&mut self, set: ActiveSet) {
        assert!(
            self.ops.is_empty(),
            "enable the activity log before any write"
        );
        self.al = Some(Activity {
            set,
            issued: 0,
            completed: 0,
            recording: HashMap::new(),
            changed: false,
            retired: false,
            waiters: BTreeMap::new(),
            blocked: VecDeque::new(),
            pins: HashMap::new(),
        });
    }

    /// Extents currently in the activity log's active set.
    pub fn active_extents(&self) -> Option<Vec<u32>> {
        self.al.as_ref().map(|a| a.set.active())
    }

    /// Pin the extents of client write `seq`. Returns whether it may go now (its
    /// extents are durably logged); otherwise it waits for a log write.
    fn pin(
        &mut self,
        seq: Seq,
        range: ByteRange,
        in_stream: bool,
        out: &mut Vec<Action<T>>,
    ) -> bool {
        let Some(al) = self.al.as_mut() else {
            return true;
        };
        let count = if in_stream { 2 } else { 1 };
        if !al.blocked.is_empty() {
            al.blocked.push_back(seq);
            return false;
        }
        let ready = match Self::try_pin(al, seq, range, count) {
            None => {
                al.blocked.push_back(seq);
                false
            }
            Some(ready) => ready,
        };
        self.issue_activity_write(out);
        ready
    }

    /// Begin in the active set; None when it is full. Some(ready).
    fn try_pin(al: &mut Activity, seq: Seq, range: ByteRange, count: u8) -> Option<bool> {
        let transition = al.set.begin(range.offset, range.len).ok()?;
        al.pins.insert(seq, (range, count));
        if let Some(t) = transition {
            al.changed = true;
            al.retired |= !t.retired.is_empty();
            for e in t.activated {
                al.recording.insert(e, al.issued + 1);
            }
        }
        let need = al
            .set
            .extents_of(range.offset, range.len)
            .filter_map(|e| al.recording.get(&e).copied())
            .max();
        match need {
            Some(n) => {
                al.waiters.entry(n).or_default().push(seq);
                Some(false)
            }
            None => Some(true),
        }
    }

    fn issue_activity_write(&mut self, out: &mut Vec<Action<T>>) {
        let Some(al) = self.al.as_mut() else { return };
        if al.changed && al.issued == al.completed {
            al.issued += 1;
            al.changed = false;
            let retired = std::mem::take(&mut al.retired);
            out.push(Action::WriteActivityLog {
                active: al.set.active(),
                retired,
            });
        }
    }

    /// The activity-log write issued last is durable.
    pub fn activity_written(&mut self, out: &mut Vec<Action<T>>) {
        let al = self.al.as_mut().expect("activity log enabled");
        assert!(
            al.issued > al.completed,
            "activity_written without a write in flight"
        );
        al.completed = al.issued;
        let done = al.completed;
        al.recording.retain(|_, n| *n > done);
        let mut released = Vec::new();
        while let Some(entry) = al.waiters.first_entry() {
            if *entry.key() > done {
                break;
            }
            released.extend(entry.remove());
        }
        self.release_logged(released, out);
        self.issue_activity_write(out);
    }

    fn release_logged(&mut self, seqs: Vec<Seq>, out: &mut Vec<Action<T>>) {
        for seq in seqs {
            if let Some(op) = self.ops.get_mut(&seq) {
                op.al_ready = true;
                if op.in_stream {
                    op.frame_ready = true;
                }
                self.try_start(seq, out);
            }
        }
        self.pump_ship(out);
    }

    /// Drop one pin of client write `seq` (local completion, or durability on the
    /// secondary / the session's end); at zero its extents may retire.
    fn unpin(&mut self, seq: Seq, out: &mut Vec<Action<T>>) {
        let Some(al) = self.al.as_mut() else { return };
        let Some(entry) = al.pins.get_mut(&seq) else {
            return;
        };
        entry.1 -= 1;
        if entry.1 > 0 {
            return;
        }
        let (range, _) = al.pins.remove(&seq).expect("present");
        al.set.end(range.offset, range.len);
        // Blocked writes go in seq order as room appears.
        let mut ready = Vec::new();
        while let Some(&front) = al.blocked.front() {
            let Some(op) = self.ops.get(&front) else {
                al.blocked.pop_front();
                continue;
            };
            let count = if op.in_stream { 2 } else { 1 };
            match Self::try_pin(al, front, op.range, count) {
                None => break,
                Some(r) => {
                    al.blocked.pop_front();
                    if r {
                        ready.push(front);
                    }
                }
            }
        }
        self.issue_activity_write(out);
        self.release_logged(ready, out);
    }

    fn assign_seq(&mut self) -> Seq {
        let seq = self.next_seq;
        self.next_seq = seq.next();
        seq
    }

    /// Start the local I/O of `seq` once the sequencer and the activity log allow it.
    fn try_start(&mut self, seq: Seq, out: &mut Vec<Action<T>>) {
        let op = self.ops.get_mut(&seq).expect("try_start for unknown op");
        if op.local != Local::Waiting || !op.seq_ready || !op.al_ready {
            return;
        }
        op.local = Local::Running;
        out.push(Action::StartLocal {
            seq,
            kind: op.kind,
            range: op.range,
            fua: op.fua,
        });
    }

    /// Ship every ready frame at the head of the stream, then any flush or
    /// resync-done markers the ship cursor has passed.
    fn pump_ship(&mut self, out: &mut Vec<Action<T>>) {
        if !self.streaming {
            return;
        }
        while self.next_ship < self.next_seq {
            if self.ahead && self.next_ship >= self.ahead_from {
                break;
            }
            let seq = self.next_ship;
            match self.ops.get_mut(&seq) {
                Some(op) if op.in_stream => {
                    if !op.frame_ready {
                        break;
                    }
                    op.shipped = true;
                    out.push(Action::Ship { seq });
                    out.push(Action::Forget { seq });
                    if matches!(
                        op.kind,
                        OpKind::ResyncRead | OpKind::HashRead | OpKind::RangeHashRead
                    ) {
                        let r = self
                            .resync
                            .as_mut()
                            .expect("a shipped resync op belongs to the current pass");
                        r.outstanding -= 1;
                        let (a, b) = op.range.blocks(self.block_size);
                        r.progress.shipped_blocks.0 += b.0 - a.0;
                    }
                    self.next_ship = seq.next();
                    self.try_remove(seq);
                }
                // Every seq assigned while streaming has an op until it is shipped.
                _ => panic!("ship cursor at seq {seq} without a streamed op"),
            }
        }
        while let Some(&through) = self.flush_markers.front() {
            if through >= self.next_ship {
                break;
            }
            self.flush_markers.pop_front();
            out.push(Action::ShipFlush { through });
        }
        if let Some(r) = &self.resync
            && r.exhausted
            && r.outstanding == 0
            && self.resync_done_marker.is_none()
        {
            let through = Seq(self.next_ship.0 - 1);
            self.resync_done_marker = Some(through);
            out.push(Action::ShipResyncDone { through });
            // The secondary may have made all of it durable already.
            self.finish_pass_if_durable(out);
        }
    }

    /// A resync pass is over once its ResyncDone marker is durable; blocks still
    /// dirty (hash mismatches, local errors) get another pass.
    fn finish_pass_if_durable(&mut self, out: &mut Vec<Action<T>>) {
        if let Some(marker) = self.resync_done_marker
            && self.durable_through >= marker
        {
            self.resync_done_marker = None;
            self.resync = None;
            if self.dirty.dirty_count().0 > 0 && !self.ahead {
                self.start_resync(false, out);
            }
        }
    }

    fn try_complete(&mut self, seq: Seq, out: &mut Vec<Action<T>>) {
        let Some(op) = self.ops.get_mut(&seq) else {
            return;
        };
        let Local::Done(result) = op.local else {
            return;
        };
        if op.token.is_some() {
            let remote_ok = match self.mode {
                _ if result.is_err() || !op.in_stream => true,
                Mode::Async => true,
                Mode::Sync if op.fua => self.durable_through >= seq,
                Mode::Sync => op.applied || self.durable_through >= seq,
            };
            if remote_ok {
                let token = op.token.take().expect("checked above");
                out.push(Action::Complete { seq, token, result });
            }
        }
        self.try_remove(seq);
    }

    /// An op is kept until it is done locally, completed to its client and shipped.
    fn try_remove(&mut self, seq: Seq) {
        if let Some(op) = self.ops.get(&seq) {
            let done = matches!(op.local, Local::Done(_));
            if done && op.token.is_none() && (!op.in_stream || op.shipped) {
                self.ops.remove(&seq);
            }
        }
    }

    /// Mark blocks that differ on the secondary for reasons of its own (it wrote them
    /// while it was primary): the next resync sends them as data.
    pub fn mark_out_of_sync(&mut self, first: BlockIndex, end: BlockIndex) {
        self.dirty.mark(first, end);
    }

    /// Mark blocks as possibly different but probably identical on the secondary:
    /// they are resynced by comparing hashes first (ARCHITECTURE §5).
    pub fn mark_verify(&mut self, first: BlockIndex, end: BlockIndex) {
        self.dirty.mark(first, end);
        self.verify.mark(first, end);
    }

    pub fn verify_count(&self) -> BlockCount {
        self.verify.dirty_count()
    }

    /// The secondary compared the hash chunk `seq`: `mismatched` are block indices
    /// within it that differ. They stay dirty (a data pass sends them); the rest
    /// are cleared when the chunk is durable.
    pub fn peer_hash_reply(&mut self, seq: Seq, mismatched: &[u32], out: &mut Vec<Action<T>>) {
        if !self.streaming {
            return;
        }
        if let Some(range) = self.verify_chunks.remove(&seq) {
            self.verify_reply(seq, range, mismatched, out);
            return;
        }
        let bs = self.block_size as u64;
        let Ok(i) = self.unacked.binary_search_by_key(&seq, |u| u.seq) else {
            out.push(Action::DropSession {
                reason: format!("hash reply for seq {seq}, which is not an outstanding hash check"),
            });
            return;
        };
        let u = &mut self.unacked[i];
        let unit = u.hash_unit_blocks.max(1) * bs;
        let hashes = u.range.len.div_ceil(unit);
        if u.hash_unit_blocks == 0 || mismatched.iter().any(|&m| m as u64 >= hashes) {
            out.push(Action::DropSession {
                reason: format!("malformed hash reply for seq {seq}"),
            });
            return;
        }
        for &m in mismatched {
            let off = u.range.offset + m as u64 * unit;
            let range = ByteRange::new(off, unit.min(u.range.end() - off));
            u.keep.push(range);
            if unit > bs {
                // A range differs: compare its blocks one by one in the next pass.
                let (a, b) = range.blocks(self.block_size);
                self.verify.mark(a, b);
                self.fine.mark(a, b);
            }
        }
        self.peer_applied(seq, out);
    }

    /// The secondary applied `seq`.
    pub fn peer_applied(&mut self, seq: Seq, out: &mut Vec<Action<T>>) {
        if let Some(op) = self.ops.get_mut(&seq)
            && op.in_stream
        {
            op.applied = true;
            self.try_complete(seq, out);
        }
    }

    /// The secondary made everything through `through` durable.
    pub fn peer_durable(&mut self, through: Seq, out: &mut Vec<Action<T>>) {
        if !self.streaming || through <= self.durable_through {
            return;
        }
        if through >= self.next_ship {
            out.push(Action::DropSession {
                reason: format!(
                    "peer claims seq {through} durable, but only seqs below {} were shipped",
                    self.next_ship
                ),
            });
            return;
        }
        self.durable_through = through;
        while let Some(u) = self.unacked.front() {
            if u.seq > through {
                break;
            }
            let u = self.unacked.pop_front().expect("front exists");
            self.unacked_bytes -= u.range.len;
            if !u.resync {
                self.unpin(u.seq, out);
            }
            if u.resync {
                // The secondary durably holds this range as of u.seq. A newer write
                // in the stream is tracked on its own (and re-marked if the session
                // drops); a newer change outside the stream is in `keep`.
                let (a, b) = u.range.blocks(self.block_size);
                self.dirty.clear(a, b);
                for k in &u.keep {
                    let (a, b) = k.blocks(self.block_size);
                    self.dirty.mark(a, b);
                }
            }
            out.push(Action::Release { seq: u.seq });
        }
        if self.dirty.dirty_count().0 == 0 {
            // Everything tracked only in the bitmap is on the secondary now.
            self.dirty_since_ms = None;
        }
        // Sync-mode writes waiting for Durable (FUA) or whose Applied we never saw.
        let waiting: Vec<Seq> = self
            .ops
            .range(..=through)
            .filter(|(_, op)| op.token.is_some())
            .map(|(s, _)| *s)
            .collect();
        for seq in waiting {
            self.try_complete(seq, out);
        }
        self.try_complete_flushes(out);
        self.finish_pass_if_durable(out);
        self.check_verify_repaired();
    }

    /// A client FLUSH: all completed writes must become durable locally and, in
    /// sync mode, on the secondary (G1).
    pub fn flush(&mut self, token: T, out: &mut Vec<Action<T>>) -> FlushId {
        let id = FlushId(self.next_flush_id);
        self.next_flush_id += 1;
        if self.poisoned {
            out.push(Action::CompleteFlush {
                id,
                token,
                result: Err(libc::EIO),
            });
            return id;
        }
        let through = Seq(self.next_seq.0 - 1);
        let remote = self.streaming;
        if remote {
            self.flush_markers.push_back(through);
        }
        self.flushes.push_back(PendingFlush {
            id,
            through,
            remote,
            local: None,
            token: Some(token),
        });
        out.push(Action::StartLocalFlush { id });
        self.pump_ship(out);
        id
    }

    pub fn local_flush_done(
        &mut self,
        id: FlushId,
        result: Result<(), Errno>,
        out: &mut Vec<Action<T>>,
    ) {
        if let Err(errno) = result {
            // STYLE: a failed flush poisons the volume; never retry and assume durability.
            tracing::error!(
                errno,
                "local flush failed: volume poisoned, every further request fails"
            );
            self.poisoned = true;
        }
        let f = self
            .flushes
            .iter_mut()
            .find(|f| f.id == id)
            .expect("unknown flush");
        f.local = Some(result);
        self.try_complete_flushes(out);
    }

    fn try_complete_flushes(&mut self, out: &mut Vec<Action<T>>) {
        let mode = self.mode;
        let durable = self.durable_through;
        let mut i = 0;
        while i < self.flushes.len() {
            let f = &self.flushes[i];
            let ready = match f.local {
                None => false,
                Some(Err(_)) => true,
                Some(Ok(())) => mode == Mode::Async || !f.remote || durable >= f.through,
            };
            if ready {
                let mut f = self.flushes.remove(i).expect("index valid");
                let result = f.local.expect("ready implies local done");
                out.push(Action::CompleteFlush {
                    id: f.id,
                    token: f.token.take().expect("token once"),
                    result,
                });
            } else {
                i += 1;
            }
        }
    }

    /// A session with the secondary begins; `full` when the secondary needs every block.
    pub fn session_started(&mut self, full: bool, out: &mut Vec<Action<T>>) {
        assert!(!self.streaming, "session started twice");
        assert!(self.unacked.is_empty());
        self.streaming = true;
        self.stream_first = self.next_seq;
        self.next_ship = self.next_seq;
        self.durable_through = Seq(self.next_seq.0 - 1);
        if full {
            self.dirty.mark_all();
        }
        // Every session opens with ResyncStart, whose frame seq tells the secondary
        // the session's first seq; `blocks` is 0 when nothing needs resending.
        self.start_resync(full, out);
    }

    fn start_resync(&mut self, full: bool, out: &mut Vec<Action<T>>) {
        let total = self.dirty.dirty_count();
        self.resync = None;
        if total.0 > 0 {
            self.resync = Some(Resync {
                progress: ResyncProgress {
                    full,
                    total_blocks: total,
                    shipped_blocks: BlockCount(0),
                    cursor: BlockIndex(0),
                },
                outstanding: 0,
                exhausted: false,
            });
        }
        out.push(Action::ShipResyncStart {
            next: self.next_ship,
            blocks: total,
            full,
        });
    }

    /// Whether a resync chunk could be produced now.
    pub fn wants_resync_chunk(&self) -> bool {
        self.is_shipping() && self.resync.as_ref().is_some_and(|r| !r.exhausted)
    }

    /// The replication window is full (async mode): stop shipping new writes and
    /// track them in the bitmap only, without blocking clients (G4). Frames already
    /// accepted into the stream still go out and are still acknowledged.
    pub fn enter_ahead(&mut self) {
        if !self.streaming || self.ahead {
            return;
        }
        self.ahead = true;
        self.ahead_from = self.next_seq;
    }

    /// Leave the ahead state once everything accepted before it has been shipped:
    /// the secondary is told the next seq (the skipped seqs never arrive) and a
    /// resync pass sends what changed meanwhile. Returns false (nothing done) while
    /// earlier frames are still waiting to be shipped.
    pub fn leave_ahead(&mut self, out: &mut Vec<Action<T>>) -> bool {
        if !self.ahead {
            return true;
        }
        if self.next_ship < self.ahead_from {
            return false;
        }
        // No resync chunks are produced while ahead, so none can be outstanding.
        assert!(
            self.resync.as_ref().is_none_or(|r| r.outstanding == 0),
            "no resync chunk is produced while ahead"
        );
        self.ahead = false;
        self.next_ship = self.next_seq;
        self.resync_done_marker = None;
        self.start_resync(false, out);
        true
    }

    /// Produce the next resync chunk: a read of dirty blocks whose contents will be
    /// shipped in seq order, so it can never overwrite a newer write (ARCHITECTURE §5).
    pub fn next_resync_chunk(
        &mut self,
        now_ms: u64,
        out: &mut Vec<Action<T>>,
    ) -> Option<(Seq, ByteRange, OpKind)> {
        if !self.wants_resync_chunk() {
            return None;
        }
        let bs = self.block_size as u64;
        let max_blocks = BlockCount(self.resync_chunk_bytes / bs);
        let cursor = self.resync.as_ref().expect("checked").progress.cursor;
        let Some((first, run)) = self.dirty.next_dirty_run(cursor, max_blocks) else {
            let r = self.resync.as_mut().expect("checked");
            r.exhausted = true;
            r.progress.cursor = BlockIndex(self.dirty.block_count().0);
            self.pump_ship(out);
            return None;
        };
        // Blocks to verify go out as hashes (at most HASHES_PER_CHECK_MAX), the others
        // as data; a chunk is one or the other.
        // Whole ranges are compared first (one hash per RANGE_HASH_BLOCKS), blocks
        // of a range that differed one by one.
        let hash_run = self.verify.next_dirty_run(first, run);
        let (kind, count) = match hash_run {
            Some((start, n)) if start == first => {
                let unit = self.range_hash_blocks;
                let mut units = if self.fine.is_dirty(first) {
                    0
                } else {
                    n.0 / unit
                };
                if units > 0
                    && let Some((f, _)) = self.fine.next_dirty_run(first, BlockCount(units * unit))
                {
                    units = (f.0 - first.0) / unit;
                }
                let units = units.min(crate::wire::HASHES_PER_CHECK_MAX as u64);
                let (kind, n) = if units > 0 {
                    (OpKind::RangeHashRead, BlockCount(units * unit))
                } else {
                    (
                        OpKind::HashRead,
                        BlockCount(n.0.min(crate::wire::HASHES_PER_CHECK_MAX as u64)),
                    )
                };
                self.verify.clear(first, BlockIndex(first.0 + n.0));
                self.fine.clear(first, BlockIndex(first.0 + n.0));
                (kind, n)
            }
            Some((start, _)) if start.0 < first.0 + run.0 => {
                (OpKind::ResyncRead, BlockCount(start.0 - first.0))
            }
            _ => (OpKind::ResyncRead, run),
        };
        let offset = first.0 * bs;
        let len = (count.0 * bs).min(self.size_bytes - offset);
        let range = ByteRange::new(offset, len);
        let seq = self.assign_seq();
        let r = self.resync.as_mut().expect("checked");
        r.progress.cursor = BlockIndex(first.0 + count.0);
        r.outstanding += 1;
        self.unacked.push_back(Unacked {
            seq,
            range,
            resync: true,
            accepted_at_ms: now_ms,
            keep: Vec::new(),
            hash_unit_blocks: self.hash_unit_blocks(kind).unwrap_or(0),
        });
        self.unacked_bytes += len;
        self.admit_internal(seq, range, kind, out);
        Some((seq, range, kind))
    }

    /// Admit an op of the replication itself (a resync read or a comparison): no
    /// client waits for it; it starts once earlier overlapping ops are done (G2).
    fn admit_internal(
        &mut self,
        seq: Seq,
        range: ByteRange,
        kind: OpKind,
        out: &mut Vec<Action<T>>,
    ) {
        let runnable = self.sequencer.admit(seq, range);
        self.ops.insert(
            seq,
            Op {
                range,
                kind,
                fua: false,
                token: None,
                local: Local::Waiting,
                seq_ready: false,
                al_ready: true,
                in_stream: true,
                frame_ready: false,
                shipped: false,
                applied: false,
            },
        );
        if runnable {
            self.ops.get_mut(&seq).expect("inserted").seq_ready = true;
            self.try_start(seq, out);
        }
    }

    /// The session ended (link down, peer gone, protocol error). Everything not
    /// durable on the secondary goes back into the dirty bitmap (G3, G4).
    pub fn session_ended(&mut self, out: &mut Vec<Action<T>>) {
        if !self.streaming {
            return;
        }
        self.streaming = false;
        self.ahead = false;
        let drained: Vec<Unacked> = self.unacked.drain(..).collect();
        for u in drained {
            if !u.resync {
                self.unpin(u.seq, out);
                // Not on the secondary yet: its age carries over into the bitmap.
                self.note_dirty_since(u.accepted_at_ms);
            }
            let (a, b) = u.range.blocks(self.block_size);
            self.dirty.mark(a, b);
            if u.hash_unit_blocks > 0 {
                // Not compared yet (or the answer was lost): compare again next time,
                // except the blocks already known to differ (the blocks of a range
                // known to differ stay marked for a block-by-block comparison).
                self.verify.mark(a, b);
                if u.hash_unit_blocks <= 1 {
                    for k in &u.keep {
                        let (a, b) = k.blocks(self.block_size);
                        self.verify.clear(a, b);
                    }
                }
            }
            out.push(Action::Release { seq: u.seq });
        }
        self.unacked_bytes = 0;
        self.verify_chunks.clear();
        self.fail_verify(
            "the connection to the secondary was lost; run verify again once it is connected"
                .into(),
        );
        self.flush_markers.clear();
        self.resync = None;
        self.resync_done_marker = None;
        let seqs: Vec<Seq> = self.ops.keys().copied().collect();
        for seq in seqs {
            let op = self.ops.get_mut(&seq).expect("listed");
            if op.in_stream {
                op.in_stream = false;
                if !op.shipped {
                    out.push(Action::Forget { seq });
                }
                // Sync-mode writers waiting for the peer complete now (degrade).
                self.try_complete(seq, out);
            }
        }
        for f in self.flushes.iter_mut() {
            f.remote = false;
        }
        self.try_complete_flushes(out);
    }

    /// Check the invariants; called after events by tests and debug builds.
    pub fn assert_invariants(&self) {
        let mut prev = Seq::ZERO;
        for u in &self.unacked {
            assert!(u.seq > prev, "unacked out of order");
            prev = u.seq;
            assert!(self.streaming, "unacked writes while not streaming");
        }
        assert_eq!(
            self.unacked_bytes,
            self.unacked.iter().map(|u| u.range.len).sum::<u64>()
        );
        for (seq, op) in &self.ops {
            if op.in_stream {
                assert!(*seq >= self.stream_first);
            }
            if op.shipped {
                assert!(*seq < self.next_ship);
            }
        }
        assert!(self.next_ship <= self.next_seq);
    }
}

/// Most verify chunks issued and not answered at once: bounds the hashes held and
/// the reads running on both nodes (8 × 1 MiB by default).
pub const VERIFY_CHUNKS_IN_FLIGHT_MAX: usize = 8;

/// Where an online verify stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyState {
    /// Comparing blocks (paused while ahead or while a resync is pending).
    Scanning,
    /// The scan is complete; the mismatched blocks are being resynced.
    Repairing,
    /// Finished: every block compared (and, with repair, every mismatch resynced).
    Done,
    /// Stopped before the end; the text says why.
    Failed(String),
}

/// A snapshot of the online verify, for status and the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub state: VerifyState,
    pub repair: bool,
    pub total_blocks: BlockCount,
    /// Blocks whose comparison has been answered.
    pub compared_blocks: BlockCount,
    pub mismatched_blocks: BlockCount,
}

/// Why a verify cannot start now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyRefusal {
    #[error("the secondary is not connected; verify needs a connected peer (see `tandem status`)")]
    NotConnected,
    #[error(
        "the primary is ahead of the secondary (replication window full, new writes tracked only in the bitmap); verify once it has caught up"
    )]
    Ahead,
    #[error(
        "a resync is pending ({pending_blocks} blocks out of sync); verify once it is done (`tandem wait-sync`)"
    )]
    Resyncing { pending_blocks: u64 },
    #[error(
        "a verify is already in progress: {compared} of {total} blocks compared, {mismatched} mismatched{repairing}",
        compared = .0.compared_blocks.0,
        total = .0.total_blocks.0,
        mismatched = .0.mismatched_blocks.0,
        repairing = if .0.state == VerifyState::Repairing { ", repairing" } else { "" }
    )]
    InProgress(VerifyReport),
}

#[derive(Debug)]
struct OnlineVerify {
    repair: bool,
    /// Next block to compare.
    cursor: BlockIndex,
    compared: u64,
    /// Blocks the secondary reported different (one bit per block, so bounded).
    mismatched: DirtyBitmap,
    state: VerifyState,
}

impl<T> PrimaryEngine<T> {
    /// Start an online verify of the whole volume (see the module docs).
    pub fn start_online_verify(&mut self, repair: bool) -> Result<(), VerifyRefusal> {
        if let Some(v) = &self.online
            && matches!(v.state, VerifyState::Scanning | VerifyState::Repairing)
        {
            return Err(VerifyRefusal::InProgress(
                self.verify_report().expect("running"),
            ));
        }
        if !self.streaming {
            return Err(VerifyRefusal::NotConnected);
        }
        if self.ahead {
            return Err(VerifyRefusal::Ahead);
        }
        let pending = self.dirty.dirty_count().0;
        if self.resync.is_some() || pending > 0 {
            return Err(VerifyRefusal::Resyncing {
                pending_blocks: pending,
            });
        }
        self.online = Some(OnlineVerify {
            repair,
            cursor: BlockIndex(0),
            compared: 0,
            mismatched: DirtyBitmap::new(self.dirty.block_count()),
            state: VerifyState::Scanning,
        });
        Ok(())
    }

    /// The verify running, or the one finished last.
    pub fn verify_report(&self) -> Option<VerifyReport> {
        self.online.as_ref().map(|v| VerifyReport {
            state: v.state.clone(),
            repair: v.repair,
            total_blocks: self.dirty.block_count(),
            compared_blocks: BlockCount(v.compared),
            mismatched_blocks: v.mismatched.dirty_count(),
        })
    }

    /// The mismatched blocks of the verify as byte ranges, adjacent blocks merged, in
    /// volume order; at most `max` of them, and whether more exist.
    pub fn verify_mismatched_ranges(&self, max: usize) -> (Vec<ByteRange>, bool) {
        let Some(v) = &self.online else {
            return (Vec::new(), false);
        };
        let bs = self.block_size as u64;
        let mut ranges = Vec::new();
        let mut from = BlockIndex(0);
        while let Some((first, n)) = v.mismatched.next_dirty_run(from, BlockCount(u64::MAX)) {
            if ranges.len() == max {
                return (ranges, true);
            }
            let offset = first.0 * bs;
            ranges.push(ByteRange::new(
                offset,
                (n.0 * bs).min(self.size_bytes - offset),
            ));
            from = BlockIndex(first.0 + n.0);
        }
        (ranges, false)
    }

    /// Whether a verify chunk could be produced now: scanning, blocks left, connected
    /// and shipping, no resync pending (module docs), and fewer than
    /// [`VERIFY_CHUNKS_IN_FLIGHT_MAX`] chunks unanswered.
    pub fn wants_verify_chunk(&self) -> bool {
        self.online.as_ref().is_some_and(|v| {
            v.state == VerifyState::Scanning && v.cursor.0 < self.dirty.block_count().0
        }) && self.is_shipping()
            && self.resync.is_none()
            && self.dirty.dirty_count().0 == 0
            && self.verify_chunks.len() < VERIFY_CHUNKS_IN_FLIGHT_MAX
    }

    /// Produce the next verify chunk: a local read and hash ordered at its seq by the
    /// sequencer, then a `HashCheck` frame at the same seq.
    pub fn next_verify_chunk(&mut self, out: &mut Vec<Action<T>>) -> Option<(Seq, ByteRange)> {
        if !self.wants_verify_chunk() {
            return None;
        }
        let bs = self.block_size as u64;
        let max_blocks =
            (self.resync_chunk_bytes / bs).min(crate::wire::HASHES_PER_CHECK_MAX as u64);
        let blocks_total = self.dirty.block_count().0;
        let v = self.online.as_mut().expect("checked");
        let first = v.cursor;
        let count = max_blocks.min(blocks_total - first.0);
        v.cursor = BlockIndex(first.0 + count);
        let offset = first.0 * bs;
        let range = ByteRange::new(offset, (count * bs).min(self.size_bytes - offset));
        let seq = self.assign_seq();
        self.verify_chunks.insert(seq, range);
        self.admit_internal(seq, range, OpKind::VerifyRead, out);
        Some((seq, range))
    }

    /// The secondary answered verify chunk `seq`.
    fn verify_reply(
        &mut self,
        seq: Seq,
        range: ByteRange,
        mismatched: &[u32],
        out: &mut Vec<Action<T>>,
    ) {
        let bs = self.block_size as u64;
        let blocks = range.len.div_ceil(bs);
        if mismatched.iter().any(|&m| m as u64 >= blocks) {
            out.push(Action::DropSession {
                reason: format!(
                    "malformed hash reply for verify seq {seq}: a block index beyond its {blocks} blocks"
                ),
            });
            return;
        }
        let Some(v) = self.online.as_mut() else {
            return;
        };
        if v.state != VerifyState::Scanning {
            return;
        }
        let (first, _) = range.blocks(self.block_size);
        for &m in mismatched {
            let b = BlockIndex(first.0 + m as u64);
            v.mismatched.mark(b, BlockIndex(b.0 + 1));
        }
        v.compared += blocks;
        if v.cursor.0 < self.dirty.block_count().0 || !self.verify_chunks.is_empty() {
            return;
        }
        // Every block compared.
        if !v.repair || v.mismatched.dirty_count().0 == 0 {
            v.state = VerifyState::Done;
            return;
        }
        v.state = VerifyState::Repairing;
        let mut runs = Vec::new();
        let mut from = BlockIndex(0);
        while let Some((first, n)) = v.mismatched.next_dirty_run(from, BlockCount(u64::MAX)) {
            runs.push((first, n));
            from = BlockIndex(first.0 + n.0);
        }
        for (first, n) in runs {
            let offset = first.0 * bs;
            self.mark_dirty(ByteRange::new(
                offset,
                (n.0 * bs).min(self.size_bytes - offset),
            ));
        }
        if self.resync.is_none() && self.is_shipping() {
            self.start_resync(false, out);
        }
    }

    /// With repair: done once no mismatched block is dirty any more (its resync frame
    /// is durable on the secondary).
    fn check_verify_repaired(&mut self) {
        let Some(v) = self.online.as_mut() else {
            return;
        };
        if v.state != VerifyState::Repairing {
            return;
        }
        let mut from = BlockIndex(0);
        while let Some((first, n)) = v.mismatched.next_dirty_run(from, BlockCount(u64::MAX)) {
            if (first.0..first.0 + n.0).any(|b| self.dirty.is_dirty(BlockIndex(b))) {
                return;
            }
            from = BlockIndex(first.0 + n.0);
        }
        v.state = VerifyState::Done;
    }

    /// Stop a running verify with this reason (a finished one is kept as it is).
    fn fail_verify(&mut self, reason: String) {
        if let Some(v) = self.online.as_mut() {
            match v.state {
                VerifyState::Scanning => {
                    v.state = VerifyState::Failed(format!("verify interrupted: {reason}"))
                }
                VerifyState::Repairing => {
                    v.state = VerifyState::Failed(format!(
                        "repair interrupted: {reason}; the mismatched blocks stay marked out of sync and are resynced when the secondary is back"
                    ))
                }
                VerifyState::Done | VerifyState::Failed(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(mode: Mode) -> PrimaryEngine<u32> {
        PrimaryEngine::new(
            mode,
            64 * 4096,
            4096,
            DirtyBitmap::for_volume(64 * 4096, 4096),
            Seq(1),
        )
    }

    #[test]
    fn a_failed_resync_read_ends_the_session_and_keeps_the_blocks_dirty() {
        let mut e = engine(Mode::Async);
        let mut out = Vec::new();
        e.session_started(true, &mut out);
        let (seq, range, _) = e.next_resync_chunk(0, &mut out).expect("a chunk");
        out.clear();
        e.local_done(seq, Err(libc::EIO), &mut out);
        assert!(
            out.iter().any(|a| matches!(a, Action::DropSession { .. })),
            "{out:?}"
        );
        assert!(!e.is_streaming());
        let (a, _) = range.blocks(4096);
        assert!(e.dirty().is_dirty(a));
        assert_eq!(e.dirty().dirty_count().0, 64);
        e.assert_invariants();
    }

    #[test]
    fn sync_write_completes_only_after_applied_and_fua_only_after_durable() {
        let mut e = engine(Mode::Sync);
        let mut out = Vec::new();
        e.session_started(false, &mut out);
        out.clear();
        let s1 = e.submit(
            OpKind::Write,
            ByteRange::new(0, 4096),
            false,
            1,
            0,
            &mut out,
        );
        let s2 = e.submit(
            OpKind::Write,
            ByteRange::new(8192, 4096),
            true,
            2,
            0,
            &mut out,
        );
        out.clear();
        e.local_done(s1, Ok(()), &mut out);
        e.local_done(s2, Ok(()), &mut out);
        assert!(
            !out.iter().any(|a| matches!(a, Action::Complete { .. })),
            "nothing completes before the peer: {out:?}"
        );
        e.peer_applied(s1, &mut out);
        e.peer_applied(s2, &mut out);
        let done: Vec<u32> = out
            .iter()
            .filter_map(|a| {
                if let Action::Complete { token, .. } = a {
                    Some(*token)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(done, vec![1], "the FUA write waits for Durable (G1)");
        out.clear();
        e.peer_durable(s2, &mut out);
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Complete { token: 2, .. }))
        );
    }

    #[test]
    fn sync_writes_complete_locally_when_the_peer_goes_away() {
        let mut e = engine(Mode::Sync);
        let mut out = Vec::new();
        e.session_started(false, &mut out);
        let s1 = e.submit(
            OpKind::Write,
            ByteRange::new(0, 4096),
            false,
            7,
            0,
            &mut out,
        );
        e.local_done(s1, Ok(()), &mut out);
        out.clear();
        e.session_ended(&mut out);
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Complete {
                token: 7,
                result: Ok(()),
                ..
            }
        )));
        assert!(
            e.dirty().is_dirty(BlockIndex(0)),
            "the unacknowledged write is tracked for resync (G3)"
        );
    }

    #[test]
    fn lag_age_survives_the_link_going_down_and_clears_once_resynced() {
        let mut e = engine(Mode::Async);
        let mut out = Vec::new();
        e.session_started(false, &mut out);
        let s1 = e.submit(
            OpKind::Write,
            ByteRange::new(0, 4096),
            false,
            1,
            100,
            &mut out,
        );
        e.local_done(s1, Ok(()), &mut out);
        assert_eq!(e.lag().oldest_accepted_at_ms, Some(100));
        // The link drops: the write is now tracked only in the bitmap, and is
        // still the oldest change the secondary does not have (G4).
        e.session_ended(&mut out);
        e.observe_dirty(300);
        assert_eq!(e.lag().writes, 0);
        assert_eq!(e.lag().oldest_accepted_at_ms, Some(100));
        let s2 = e.submit(
            OpKind::Write,
            ByteRange::new(8 * 4096, 4096),
            false,
            2,
            500,
            &mut out,
        );
        e.local_done(s2, Ok(()), &mut out);
        assert_eq!(e.lag().oldest_accepted_at_ms, Some(100));
        // Back: the resync pass ships both blocks; once durable, no age is left.
        out.clear();
        e.session_started(false, &mut out);
        let mut last = Seq::ZERO;
        while let Some((seq, _, _)) = e.next_resync_chunk(600, &mut out) {
            e.local_done(seq, Ok(()), &mut out);
            last = seq;
        }
        assert_eq!(e.lag().oldest_accepted_at_ms, Some(100), "not durable yet");
        let through = out
            .iter()
            .find_map(|a| match a {
                Action::ShipResyncDone { through } => Some(*through),
                _ => None,
            })
            .unwrap_or(last);
        e.peer_durable(through, &mut out);
        e.observe_dirty(700);
        assert_eq!(e.dirty().dirty_count().0, 0);
        assert_eq!(e.lag().oldest_accepted_at_ms, None);
        // A later bitmap-only change counts from its own acceptance, not the old one.
        e.session_ended(&mut out);
        let s3 = e.submit(
            OpKind::Write,
            ByteRange::new(0, 4096),
            false,
            3,
            900,
            &mut out,
        );
        e.local_done(s3, Ok(()), &mut out);
        assert_eq!(e.lag().oldest_accepted_at_ms, Some(900));
        e.assert_invariants();
    }

    #[test]
    fn a_durable_claim_beyond_what_was_shipped_drops_the_session() {
        let mut e = engine(Mode::Async);
        let mut out = Vec::new();
        e.session_started(false, &mut out);
        out.clear();
        e.peer_durable(Seq(99), &mut out);
        assert!(out.iter().any(|a| matches!(a, Action::DropSession { .. })));
    }
}

#[cfg(test)]
mod hash_tests {
    use super::*;

    #[test]
    fn hash_chunks_clear_matching_blocks_and_resend_mismatches_as_data() {
        let mut e: PrimaryEngine<u32> = PrimaryEngine::new(
            Mode::Async,
            8 * 4096,
            4096,
            DirtyBitmap::for_volume(8 * 4096, 4096),
            Seq(1),
        );
        e.set_resync_chunk_bytes(4 * 4096);
        e.mark_verify(BlockIndex(0), BlockIndex(8));
        let mut out = Vec::new();
        e.session_started(false, &mut out);
        let (s1, r1, k1) = e.next_resync_chunk(0, &mut out).unwrap();
        let (s2, r2, k2) = e.next_resync_chunk(0, &mut out).unwrap();
        assert_eq!((k1, k2), (OpKind::HashRead, OpKind::HashRead));
        assert_eq!(
            (r1, r2),
            (
                ByteRange::new(0, 4 * 4096),
                ByteRange::new(4 * 4096, 4 * 4096)
            )
        );
        e.local_done(s1, Ok(()), &mut out);
        e.local_done(s2, Ok(()), &mut out);
        assert!(e.next_resync_chunk(0, &mut out).is_none());
        out.clear();
        e.peer_hash_reply(s1, &[1], &mut out);
        e.peer_hash_reply(s2, &[], &mut out);
        assert!(
            !out.iter().any(|a| matches!(a, Action::DropSession { .. })),
            "{out:?}"
        );
        let done_marker = out.iter().find_map(|a| {
            if let Action::ShipResyncDone { through } = a {
                Some(*through)
            } else {
                None
            }
        });
        let through = done_marker.unwrap_or(s2);
        out.clear();
        e.peer_durable(through, &mut out);
        assert_eq!(
            e.dirty().dirty_count().0,
            1,
            "only the mismatched block stays dirty"
        );
        assert!(e.dirty().is_dirty(BlockIndex(1)));
        let (_, r3, k3) = e
            .next_resync_chunk(0, &mut out)
            .expect("a data pass for the mismatch");
        assert_eq!((r3, k3), (ByteRange::new(4096, 4096), OpKind::ResyncRead));
    }
}

#[cfg(test)]
mod verify_tests {
    use super::*;

    const BS: u64 = 4096;

    fn connected(blocks: u64, chunk_blocks: u64) -> PrimaryEngine<u32> {
        let mut e = PrimaryEngine::new(
            Mode::Async,
            blocks * BS,
            BS as u32,
            DirtyBitmap::for_volume(blocks * BS, BS as u32),
            Seq(1),
        );
        e.set_resync_chunk_bytes(chunk_blocks * BS);
        let mut out = Vec::new();
        e.session_started(false, &mut out);
        e
    }

    fn started(out: &[Action<u32>], seq: Seq) -> bool {
        out.iter()
            .any(|a| matches!(a, Action::StartLocal { seq: s, .. } if *s == seq))
    }

    fn shipped(out: &[Action<u32>], seq: Seq) -> bool {
        out.iter()
            .any(|a| matches!(a, Action::Ship { seq: s } if *s == seq))
    }

    #[test]
    fn a_verify_read_runs_after_earlier_overlapping_writes_and_before_later_ones() {
        let mut e = connected(8, 4);
        let mut out = Vec::new();
        let w1 = e.submit(OpKind::Write, ByteRange::new(BS, BS), false, 1, 0, &mut out);
        assert!(started(&out, w1));
        assert!(
            shipped(&out, w1),
            "a write ships while it is written locally"
        );
        e.start_online_verify(false).expect("connected and clean");
        out.clear();
        let (v, range) = e.next_verify_chunk(&mut out).expect("a chunk");
        assert_eq!(range, ByteRange::new(0, 4 * BS));
        assert!(
            !started(&out, v),
            "the hash read must wait for the earlier write w1 to land: {out:?}"
        );
        out.clear();
        let w2 = e.submit(
            OpKind::Write,
            ByteRange::new(2 * BS, BS),
            false,
            2,
            0,
            &mut out,
        );
        assert!(
            !started(&out, w2),
            "a later overlapping write must wait for the hash read: {out:?}"
        );
        out.clear();
        e.local_done(w1, Ok(()), &mut out);
        assert!(started(&out, v), "{out:?}");
        assert!(!started(&out, w2), "{out:?}");
        out.clear();
        e.local_done(v, Ok(()), &mut out);
        assert!(started(&out, w2), "{out:?}");
        assert!(
            shipped(&out, v),
            "the check ships at its seq, after w1: {out:?}"
        );
        e.assert_invariants();
    }

    #[test]
    fn verify_reports_exactly_the_mismatched_blocks_as_merged_byte_ranges() {
        let mut e = connected(10, 4);
        e.start_online_verify(false).unwrap();
        let mut out = Vec::new();
        let mut chunks = Vec::new();
        while let Some(c) = e.next_verify_chunk(&mut out) {
            chunks.push(c);
        }
        assert_eq!(chunks.len(), 3, "4 + 4 + 2 blocks");
        assert_eq!(chunks[2].1, ByteRange::new(8 * BS, 2 * BS));
        for (seq, _) in &chunks {
            e.local_done(*seq, Ok(()), &mut out);
        }
        let r = e.verify_report().unwrap();
        assert_eq!(r.state, VerifyState::Scanning);
        // Blocks 3 and 4 (adjacent across two chunks) and 9 differ.
        e.peer_hash_reply(chunks[1].0, &[0], &mut out);
        e.peer_hash_reply(chunks[0].0, &[3], &mut out);
        assert_eq!(e.verify_report().unwrap().state, VerifyState::Scanning);
        e.peer_hash_reply(chunks[2].0, &[1], &mut out);
        assert!(
            !out.iter().any(|a| matches!(a, Action::DropSession { .. })),
            "{out:?}"
        );
        let r = e.verify_report().unwrap();
        assert_eq!(r.state, VerifyState::Done);
        assert_eq!(r.compared_blocks, BlockCount(10));
        assert_eq!(r.mismatched_blocks, BlockCount(3));
        assert_eq!(
            e.verify_mismatched_ranges(10),
            (
                vec![ByteRange::new(3 * BS, 2 * BS), ByteRange::new(9 * BS, BS)],
                false
            )
        );
        assert_eq!(
            e.verify_mismatched_ranges(1),
            (vec![ByteRange::new(3 * BS, 2 * BS)], true)
        );
        assert_eq!(
            e.dirty().dirty_count().0,
            0,
            "without repair nothing is marked"
        );
        e.assert_invariants();
    }

    #[test]
    fn repair_resyncs_the_mismatches_and_finishes_once_they_are_durable() {
        let mut e = connected(8, 8);
        e.start_online_verify(true).unwrap();
        let mut out = Vec::new();
        let (seq, _) = e.next_verify_chunk(&mut out).unwrap();
        e.local_done(seq, Ok(()), &mut out);
        out.clear();
        e.peer_hash_reply(seq, &[2, 5], &mut out);
        assert_eq!(e.verify_report().unwrap().state, VerifyState::Repairing);
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::ShipResyncStart { blocks, .. } if blocks.0 == 2)),
            "{out:?}"
        );
        assert!(e.dirty().is_dirty(BlockIndex(2)) && e.dirty().is_dirty(BlockIndex(5)));
        let mut resent = Vec::new();
        while let Some((s, r, k)) = e.next_resync_chunk(0, &mut out) {
            assert_eq!(k, OpKind::ResyncRead);
            resent.push(r);
            e.local_done(s, Ok(()), &mut out);
        }
        assert_eq!(
            resent,
            vec![ByteRange::new(2 * BS, BS), ByteRange::new(5 * BS, BS)]
        );
        assert_eq!(e.verify_report().unwrap().state, VerifyState::Repairing);
        let last = Seq(e.next_seq().0 - 1);
        e.peer_durable(last, &mut out);
        assert_eq!(e.verify_report().unwrap().state, VerifyState::Done);
        assert_eq!(e.dirty().dirty_count().0, 0);
    }

    #[test]
    fn verify_is_refused_unless_connected_shipping_clean_and_idle() {
        let mut e: PrimaryEngine<u32> = PrimaryEngine::new(
            Mode::Async,
            8 * BS,
            BS as u32,
            DirtyBitmap::for_volume(8 * BS, BS as u32),
            Seq(1),
        );
        assert_eq!(
            e.start_online_verify(false),
            Err(VerifyRefusal::NotConnected)
        );
        let mut out = Vec::new();
        e.session_started(true, &mut out);
        assert!(matches!(
            e.start_online_verify(false),
            Err(VerifyRefusal::Resyncing { pending_blocks: 8 })
        ));
        let mut e = connected(8, 4);
        e.enter_ahead();
        assert_eq!(e.start_online_verify(false), Err(VerifyRefusal::Ahead));
        let mut e = connected(8, 4);
        e.start_online_verify(false).unwrap();
        let err = e.start_online_verify(true).unwrap_err();
        assert!(matches!(err, VerifyRefusal::InProgress(_)));
        assert!(
            err.to_string()
                .contains("already in progress: 0 of 8 blocks"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_session_fails_the_verify_and_marks_nothing() {
        let mut e = connected(8, 4);
        e.start_online_verify(false).unwrap();
        let mut out = Vec::new();
        let (seq, _) = e.next_verify_chunk(&mut out).unwrap();
        e.local_done(seq, Ok(()), &mut out);
        e.session_ended(&mut out);
        let r = e.verify_report().unwrap();
        assert!(
            matches!(&r.state, VerifyState::Failed(m) if m.contains("connection to the secondary was lost")),
            "{r:?}"
        );
        assert_eq!(
            e.dirty().dirty_count().0,
            0,
            "a hash check changes nothing on the secondary, so nothing needs resending"
        );
        assert!(!e.wants_verify_chunk());
        // A new verify may start on the next session.
        e.session_started(false, &mut out);
        e.start_online_verify(false).unwrap();
        e.assert_invariants();
    }

    #[test]
    fn verify_pauses_while_a_resync_is_pending() {
        let mut e = connected(8, 4);
        e.start_online_verify(false).unwrap();
        let mut out = Vec::new();
        let (v, _) = e.next_verify_chunk(&mut out).unwrap();
        e.local_done(v, Ok(()), &mut out);
        e.enter_ahead();
        assert!(!e.wants_verify_chunk(), "no chunks while ahead");
        e.submit(
            OpKind::Write,
            ByteRange::new(7 * BS, BS),
            false,
            1,
            0,
            &mut out,
        );
        assert!(e.leave_ahead(&mut out));
        assert!(
            !e.wants_verify_chunk(),
            "block 7 awaits resync: a mismatch there is known, not a verify finding"
        );
    }
}
