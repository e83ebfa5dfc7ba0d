//! The secondary's state machine (sans-IO): a redo journal in front of the volume.
//!
//! Every replicated change (a write, zeroes, a trim, resync data) is appended to
//! the journal in seq order before anything else; `Applied` follows the append
//! (the record is in the page cache, like a completed write) and `Durable` follows
//! the journal's fdatasync. The volume is written only by the **checkpointer**,
//! which copies the oldest records into it, fdatasyncs it, and only then releases
//! them from the journal. So at any instant — power loss included — the
//! secondary's image is the volume plus the journal's valid records, replayed in
//! order: an exact prefix of what the primary sent (G2). There is no epoch
//! barrier to get wrong: the journal's order is the order (issue 9, finding 7).
//!
//! **Sections and consistent points.** Outside a resync, every record boundary is
//! a consistent point (a prefix of the primary's history). A resync is not: it
//! sends the current contents of dirty blocks, so the image is mixed until the
//! resync's last block is in. The primary marks it with `ResyncStart { blocks > 0 }`
//! and `ResyncDone`; the journal records a section start and end. The checkpointer
//! never copies a record of an open section into the volume, so the last consistent
//! image (volume + records before the section) is always there: promoting this
//! node mid-resync drops the section's records and serves that image (issue 10).
//! A node with no consistent image at all (a new secondary's first full copy) has
//! nothing to protect and lets the checkpointer copy everything.
//!
//! **Rollback window.** Records are kept after they could be copied, up to
//! `rollback_window_bytes` and `rollback_window_ms`, so the image can be taken
//! back to an earlier consistent point (`tandem rollback`) or viewed there
//! (`tandem inspect`). Point markers are recorded at every relayed FLUSH (a
//! filesystem commit) and at the end of every resync.
//!
//! **Reads.** The current image of a block is its newest journal record, else the
//! volume. A hash comparison resolves its sources when it is admitted (so later
//! frames cannot change what it compares), and no checkpoint runs while one reads.
//!
//! This module owns the order, the acknowledgements, the section and consistency
//! state, the journal's space and the checkpoint policy. It does no I/O: the agent
//! appends, syncs, copies and reads as told.

use std::collections::{BTreeMap, VecDeque};

use crate::engine::rangeset::RangeMap;

use crate::types::{BlockIndex, ByteRange, Seq};

/// A journal record's position: consecutive from 1 for the journal's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a journal record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Data for `range` (the payload).
    Write,
    /// `range` reads as zeroes.
    Zeroes,
    /// `range` was discarded (reads as zeroes here: trim is applied as zeroing on
    /// the secondary, so both nodes read the same).
    Trim,
    /// A resync section starts: records after it are not a consistent image until
    /// its end.
    SectionStart,
    /// The section ends: the image through this record is consistent.
    SectionEnd,
    /// A consistent point worth listing (a relayed FLUSH).
    Point,
}

impl RecordKind {
    pub fn changes_data(self) -> bool {
        matches!(
            self,
            RecordKind::Write | RecordKind::Zeroes | RecordKind::Trim
        )
    }

    /// Byte encoding in the journal.
    pub fn code(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Zeroes => 2,
            RecordKind::Trim => 3,
            RecordKind::SectionStart => 4,
            RecordKind::SectionEnd => 5,
            RecordKind::Point => 6,
        }
    }

    pub fn from_code(code: u8) -> Option<RecordKind> {
        Some(match code {
            1 => RecordKind::Write,
            2 => RecordKind::Zeroes,
            3 => RecordKind::Trim,
            4 => RecordKind::SectionStart,
            5 => RecordKind::SectionEnd,
            6 => RecordKind::Point,
            _ => return None,
        })
    }
}

/// A journal record as the engine tracks it (the payload stays in the journal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    /// The primary's seq of the frame (markers: the last seq received before them).
    pub seq: Seq,
    pub kind: RecordKind,
    pub range: ByteRange,
    /// The primary's acceptance time of the write (ms since the epoch); for
    /// markers, that of the newest write before them.
    pub at_ms: u64,
    /// Bytes the record takes in the journal (header and payload).
    pub journal_bytes: u64,
    /// The image through this record is mixed (a resync section is open, or no
    /// consistent image exists yet). Computed by the engine; ignored on input.
    pub in_section: bool,
}

/// Where to read a piece of the current image from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Volume,
    /// The record's payload; `skip` bytes into it.
    Record {
        lsn: Lsn,
        skip: u64,
    },
    /// Reads as zeroes (a zero or trim record).
    Zero,
}

/// A frame from the primary, decoded.
#[derive(Debug)]
pub enum Incoming<D> {
    ResyncStart {
        next: Seq,
        blocks: u64,
        full: bool,
    },
    Write {
        seq: Seq,
        offset: u64,
        fua: bool,
        at_ms: u64,
        data: D,
        len: u64,
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
    HashCheck {
        seq: Seq,
        offset: u64,
        unit_bytes: u32,
        count: u32,
        hashes: D,
    },
    Flush {
        through: Seq,
    },
    ResyncDone {
        through: Seq,
    },
}

/// Something the agent must do, in order.
#[derive(Debug)]
pub enum SecondaryAction<D> {
    /// Append this record (with its payload for a write) to the journal, not yet
    /// durably.
    Append {
        record: Record,
        data: Option<D>,
    },
    /// fdatasync the journal; report with [`SecondaryEngine::journal_synced`].
    SyncJournal {
        through: Lsn,
    },
    /// Copy records `from..=through` into the volume in order, fdatasync the
    /// volume, release them from the journal durably; report with
    /// [`SecondaryEngine::checkpointed`]. When `volume_consistent_after` is false
    /// the copy makes the volume alone mixed: record that durably (superblock)
    /// BEFORE copying; when true, record it after the release.
    Checkpoint {
        from: Lsn,
        through: Lsn,
        volume_consistent_after: bool,
    },
    /// Read the current image of `range` from `sources` (in order, covering it),
    /// hash it in units of `unit_bytes` and compare with `hashes`; report with
    /// [`SecondaryEngine::hash_done`].
    StartHash {
        seq: Seq,
        range: ByteRange,
        unit_bytes: u32,
        hashes: D,
        sources: Vec<(ByteRange, Source)>,
    },
    SendApplied {
        seq: Seq,
    },
    SendDurable {
        through: Seq,
    },
    /// The resync that ended with `ResyncDone { through }` (or the
    /// `ResyncStart` of nothing that started at `through + 1`) is recorded durably:
    /// its section end is in the durable journal and this node holds the
    /// primary's image through `through` as a consistent one. Emitted after the
    /// `MarkConsistent` it may need, whose metadata must be durable before the
    /// agent sends it (the primary then takes the generation as the peer's).
    SendSectionDone {
        through: Seq,
    },
    SendHashReply {
        seq: Seq,
        mismatched: Vec<u32>,
    },
    /// The image is consistent again (or for the first time), through `through`
    /// whose newest write was accepted at `at_ms` (for the log and status).
    MarkConsistent {
        through: Lsn,
        at_ms: u64,
    },
    /// A resync section began: the image being appended to is mixed until it ends
    /// (the last consistent point stays in the journal). For the log and status.
    MarkSectionOpen,
    /// The session cannot continue.
    Fail {
        fault: Fault,
    },
}

/// Why a session ends (the secondary's side).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("frame seq {got} out of order: expected {expected}")]
    OutOfOrder { got: Seq, expected: Seq },
    #[error("{what} before ResyncStart")]
    BeforeStart { what: &'static str },
    #[error("ResyncStart names next seq {next}, but seq {expected} was expected")]
    StartBehind { next: Seq, expected: Seq },
    #[error("{what} through seq {through} before that seq arrived (next expected {expected})")]
    MarkerAhead {
        what: &'static str,
        through: Seq,
        expected: Seq,
    },
    #[error("frame seq {seq} addresses {offset}+{len}, beyond the volume ({size_bytes} bytes)")]
    OutOfRange {
        seq: Seq,
        offset: u64,
        len: u64,
        size_bytes: u64,
    },
    #[error("invalid seq {seq} (seqs are between 1 and {max})")]
    BadSeq { seq: Seq, max: u64 },
    #[error("malformed HashCheck seq {seq}")]
    BadHashCheck { seq: Seq },
    #[error(
        "the resync of {needed_bytes} bytes does not fit the journal ({available_bytes} bytes free); \
         this node keeps its last consistent image and refuses the resync: grow journal-size in the \
         resource file (then restart this node), or set resync-overflow = inconsistent to allow an \
         inconsistent resync"
    )]
    ResyncTooLarge {
        needed_bytes: u64,
        available_bytes: u64,
    },
    #[error(
        "the journal filled up during a resync ({capacity_bytes} bytes); this node keeps its last \
         consistent image and stops the resync: grow journal-size in the resource file, or set \
         resync-overflow = inconsistent"
    )]
    JournalFullDuringResync { capacity_bytes: u64 },
    #[error(
        "a journal or volume write failed: {0}; the node is poisoned, check the disk and restart it"
    )]
    Io(String),
}

impl Fault {
    /// A refusal the primary meets again at every reconnect until an operator
    /// acts (journal-size, resync-overflow): agents log it rate-limited.
    pub fn repeats_at_each_reconnect(&self) -> bool {
        matches!(
            self,
            Fault::ResyncTooLarge { .. } | Fault::JournalFullDuringResync { .. }
        )
    }
}

/// Largest seq accepted from a peer: leaves room to count past it.
pub const SEQ_MAX: u64 = u64::MAX / 2;

/// The secondary's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub size_bytes: u64,
    pub block_size: u32,
    /// The journal's ring size.
    pub journal_capacity_bytes: u64,
    /// Bytes a record costs besides its payload (header, alignment).
    pub record_overhead_bytes: u64,
    /// Keep records for rollback up to this many bytes...
    pub rollback_window_bytes: u64,
    /// ... and no older than this.
    pub rollback_window_ms: u64,
    /// Sync the journal once this many bytes were appended since the last sync.
    pub sync_threshold_bytes: u64,
    /// With nothing else asking (no FLUSH or FUA, no marker, under the byte
    /// threshold), a record is synced once it has waited this long
    /// (`flush-interval-ms`); 0: as soon as a tick or
    /// [`SecondaryEngine::sync_unsynced`] comes. A sync at every tick of a fixed
    /// 5 ms clock, whatever the records' age, often started just before a FLUSH
    /// arrived, which then waited for it and for one more fdatasync (QD1
    /// write+flush, sync mode: ~1 in 5 FLUSHes took two journal fdatasyncs).
    pub sync_interval_ms: u64,
    /// Largest checkpoint batch (payload bytes).
    pub checkpoint_batch_bytes: u64,
    /// Smallest checkpoint started only to keep the rollback window (without
    /// journal pressure or records past the window's age). Each checkpoint ends
    /// with an fdatasync of the volume and one of the journal's header: copying
    /// whatever crossed the window as soon as it did ran hundreds of tiny
    /// checkpoints a second under steady random writes (4 KiB QD32: ~500 volume
    /// fdatasyncs/s of 30–60 records each), every one competing with the
    /// journal's own fdatasyncs that `Durable` waits for.
    pub checkpoint_min_bytes: u64,
    /// Largest frame payload the primary may send (room is kept for one).
    pub frame_max_bytes: u64,
    /// A resync larger than the journal may make the image inconsistent (the
    /// last consistent image is then lost until it ends).
    pub allow_inconsistent: bool,
}

impl Config {
    pub fn new(size_bytes: u64, block_size: u32, journal_capacity_bytes: u64) -> Config {
        Config {
            size_bytes,
            block_size,
            journal_capacity_bytes,
            record_overhead_bytes: 64,
            rollback_window_bytes: journal_capacity_bytes / 2,
            rollback_window_ms: 3_600_000,
            sync_threshold_bytes: 8 << 20,
            sync_interval_ms: 0,
            checkpoint_batch_bytes: 64 << 20,
            checkpoint_min_bytes: (8 << 20).min(journal_capacity_bytes / 16),
            frame_max_bytes: crate::wire::PAYLOAD_MAX_BYTES as u64,
            allow_inconsistent: false,
        }
    }
}

/// What is pending for a seq of the session before `Durable` may pass it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// Appended as this record: durable once the journal sync covers it.
    Record(Lsn),
    /// A hash comparison in flight.
    Hash,
    /// Answered, with every journal record it read durable.
    Done,
}

/// A consistent point of the rollback window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    /// The image through this record is consistent.
    pub lsn: Lsn,
    /// The newest write it holds: the primary's seq and acceptance time.
    pub seq: Seq,
    pub at_ms: u64,
    /// Journal bytes recorded after it (what a rollback to it discards).
    pub later_bytes: u64,
}

/// Whether the agent may read the next frame (journal space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// A frame of the largest size fits.
    Free,
    /// Wait for the checkpoint in flight (or just started) to release records.
    Wait,
    /// Nothing can be released (an open section fills the journal): the session
    /// has failed.
    Stuck,
}

/// Per-connection order state.
struct Session {
    expected_next: Seq,
    pending: BTreeMap<Seq, Pending>,
    /// Seq ranges [start, end) the primary skipped (it went ahead).
    skipped: BTreeMap<Seq, Seq>,
    durable_through: Seq,
    /// Highest seq the primary asked to make durable (FLUSH, FUA, ResyncDone).
    sync_wanted: Seq,
    /// The last `ResyncDone` (its seq, the journal record that must be durable
    /// with it) whose `SectionDone` is not sent yet.
    section_done: Option<(Seq, Lsn)>,
}

/// The secondary's state.
pub struct SecondaryEngine<D> {
    cfg: Config,
    now_ms: u64,
    /// Live records, oldest first (the first is `applied + 1`).
    records: VecDeque<Record>,
    live_bytes: u64,
    /// Records through this one are copied into the volume (and released).
    applied: Lsn,
    /// With a volume that is not consistent: the newest record a checkpoint cut
    /// before a restart may have copied pieces of (superblock `mixed_through`).
    mixed_through: Lsn,
    /// The volume alone (records through `applied`) is a consistent image.
    volume_consistent: bool,
    /// Records through this one are durable in the journal.
    durable: Lsn,
    /// Last record appended.
    tail: Lsn,
    /// A journal sync in flight (through).
    syncing: Option<Lsn>,
    /// A tick asked for a sync while one was running.
    sync_again: bool,
    /// When the oldest record appended after the last sync started was appended
    /// (None: the last sync covers every record).
    unsynced_since_ms: Option<u64>,
    bytes_since_sync: u64,
    /// A checkpoint in flight (through).
    checkpointing: Option<Lsn>,
    /// Hash reads in flight (checkpoints wait for them).
    /// Reads of the image in flight (comparisons, the read-only export): no
    /// checkpoint moves records while they read.
    readers: u32,
    /// Hash checks that arrived while a checkpoint was copying (or while a read
    /// of the same seq from an ended session still runs): they start once it
    /// ends. What they read is fixed on arrival, at their seq: records received
    /// after them are not part of what the primary hashed (an online verify
    /// under client writes reported blocks that differed only by such a write:
    /// e2e_verify in a release build). A record the checkpoint copies is read
    /// from the volume once it ends, as the record is released then (simulator
    /// seed 100194 sync). Counted in `readers`.
    deferred_hashes: Vec<DeferredHash<D>>,
    /// Hash reads still running for sessions that ended, by seq (a new session
    /// reuses seqs): their answers are dropped, and a new comparison of the same
    /// seq waits for them (fuzz finding stale-hash-done-in-a-new-session).
    stale_hash_reads: BTreeMap<Seq, u32>,
    /// The consistent image while a section is open: (its record, its view).
    consistent_view: Option<(Lsn, RangeMap<Lsn>)>,
    /// Appending goes into a mixed image (a section is open, or no consistent
    /// image exists yet).
    in_section: bool,
    /// Newest durable consistent point: the image through it is consistent.
    consistent: Option<Lsn>,
    /// Newest write held by the consistent image: (seq, at_ms).
    consistent_write: (Seq, u64),
    /// Newest data record appended: (seq, at_ms), for markers.
    last_write: (Seq, u64),
    /// Newest durable data record: (seq, at_ms).
    durable_write: (Seq, u64),
    /// Newest write copied into the volume (as recorded at start, then by
    /// checkpoints): (seq, at_ms).
    volume_write: (Seq, u64),
    /// Newest point marker (or section end) appended.
    last_point: Lsn,
    /// The checkpointer may not pass this record (an inspection holds it).
    pin: Option<Lsn>,
    /// Newest record per block among the live records.
    index: RangeMap<Lsn>,
    session: Option<Session>,
    poisoned: Option<String>,
    _data: std::marker::PhantomData<D>,
}

impl<D> SecondaryEngine<D> {
    /// A secondary whose journal holds `records` (recovered, in order, all
    /// durable) after `applied` (everything before is in the volume).
    /// `volume_consistent`: the volume alone is a consistent image (false for a
    /// new node before its first full copy, or after an inconsistent resync);
    /// `mixed_through`: with a volume that is not consistent, the newest record a
    /// checkpoint that mixed it may have copied pieces of (the superblock's
    /// `mixed_through`; `Lsn::ZERO` when none): no image before it is
    /// consistent. `volume_write`: the newest write it holds as last recorded
    /// (seq, accept time; zeroes when unknown), reported while no record is
    /// newer.
    pub fn new(
        cfg: Config,
        applied: Lsn,
        records: Vec<Record>,
        volume_consistent: bool,
        mixed_through: Lsn,
        volume_write: (Seq, u64),
    ) -> Self {
        let mut e = SecondaryEngine {
            now_ms: 0,
            records: VecDeque::new(),
            live_bytes: 0,
            applied,
            volume_consistent,
            durable: applied,
            tail: applied,
            syncing: None,
            sync_again: false,
            unsynced_since_ms: None,
            bytes_since_sync: 0,
            checkpointing: None,
            readers: 0,
            deferred_hashes: Vec::new(),
            stale_hash_reads: BTreeMap::new(),
            consistent_view: None,
            in_section: !volume_consistent,
            mixed_through: if volume_consistent {
                Lsn::ZERO
            } else {
                mixed_through
            },
            consistent: volume_consistent.then_some(applied),
            consistent_write: volume_write,
            last_write: volume_write,
            durable_write: volume_write,
            volume_write,
            last_point: applied,
            pin: None,
            index: RangeMap::new(),
            session: None,
            poisoned: None,
            _data: std::marker::PhantomData,
            cfg,
        };
        for r in records {
            assert_eq!(r.lsn, e.tail.next(), "recovered records are consecutive");
            e.tail = r.lsn;
            e.track(r);
        }
        // What was recovered is durable by definition.
        e.mark_durable(e.tail);
        e
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn applied(&self) -> Lsn {
        self.applied
    }
    pub fn durable(&self) -> Lsn {
        self.durable
    }
    pub fn tail(&self) -> Lsn {
        self.tail
    }
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.iter()
    }
    /// The live records `from..=through` (found by index: records are kept in
    /// LSN order without gaps), e.g. a checkpoint's.
    pub fn records_between(&self, from: Lsn, through: Lsn) -> impl Iterator<Item = &Record> {
        let first = from.max(self.applied.next());
        let last = through.min(self.tail);
        let range = match (self.record_index(first), self.record_index(last)) {
            (Some(i), Some(j)) if i <= j => i..j + 1,
            _ => 0..0,
        };
        self.records.range(range)
    }
    pub fn is_volume_consistent(&self) -> bool {
        self.volume_consistent
    }
    /// The image being appended to is mixed (a resync section is open, or no
    /// consistent image exists yet).
    pub fn is_section_open(&self) -> bool {
        self.in_section
    }
    /// The last consistent point: record, and the newest write it holds.
    pub fn consistent_point(&self) -> Option<(Lsn, Seq, u64)> {
        self.consistent
            .map(|l| (l, self.consistent_write.0, self.consistent_write.1))
    }
    /// The newest write received (seq, the primary's accept time), consistent or
    /// not: how far a promotion at the consistent point is behind the old primary.
    pub fn newest_received(&self) -> (Seq, u64) {
        self.last_write
    }
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }
    /// The newest write the volume alone holds.
    fn consistent_write_of_volume(&self) -> (Seq, u64) {
        self.volume_write
    }

    /// The newest write (seq, the primary's accept time) the image through `lsn`
    /// holds: the newest data record at or before it, else the volume's newest
    /// write. When a checkpoint through `lsn` leaves the volume consistent, this is
    /// what the superblock records for the volume (`consistent_seq`/`_at_ms`): a
    /// batch may hold markers only, its writes copied by earlier batches while
    /// the volume was mixed, and the volume still holds them (the simulator, seed
    /// 303364 async: a first copy's section end released alone left the
    /// superblock at 0 ms, and a restart reported a consistent point 426 ms older
    /// than the one it had made durable).
    pub fn newest_write_through(&self, lsn: Lsn) -> (Seq, u64) {
        self.records
            .iter()
            .rev()
            .filter(|r| r.lsn <= lsn && r.kind.changes_data())
            .map(|r| (r.seq, r.at_ms))
            .next()
            .unwrap_or(self.volume_write)
    }

    pub fn is_idle(&self) -> bool {
        self.syncing.is_none() && self.checkpointing.is_none() && self.readers == 0
    }

    /// Add a record at the tail of the tracked list (appended or recovered).
    fn track(&mut self, mut r: Record) -> Record {
        match r.kind {
            RecordKind::SectionStart => self.in_section = true,
            RecordKind::SectionEnd => self.in_section = false,
            RecordKind::Point => self.last_point = r.lsn,
            _ => {}
        }
        if r.kind == RecordKind::SectionEnd {
            self.last_point = r.lsn;
        }
        // A mixed volume may hold pieces of any record a cut checkpoint covered:
        // no image before the newest of them is consistent, whatever sections
        // ended among them (fuzz finding checkpoint-section-after-restart).
        r.in_section = self.in_section
            || r.kind == RecordKind::SectionStart
            || (!self.volume_consistent && r.lsn <= self.mixed_through);
        if r.kind.changes_data() {
            self.index.insert(r.range.offset, r.range.end(), r.lsn);
            self.last_write = (r.seq, r.at_ms);
        }
        self.live_bytes += r.journal_bytes;
        self.records.push_back(r);
        r
    }

    fn record_index(&self, lsn: Lsn) -> Option<usize> {
        if lsn <= self.applied || lsn > self.tail {
            return None;
        }
        Some((lsn.0 - self.applied.0 - 1) as usize)
    }

    pub fn record(&self, lsn: Lsn) -> Option<&Record> {
        self.record_index(lsn).and_then(|i| self.records.get(i))
    }

    /// Records through `through` are durable: the consistent point moves to the
    /// newest of them outside a section. Returns whether the image became
    /// consistent after being mixed (a section ended, or the first full copy).
    fn mark_durable(&mut self, through: Lsn) -> bool {
        let start = self
            .record_index(self.durable.next())
            .unwrap_or(self.records.len());
        self.durable = through;
        let mut became = false;
        for i in start..self.records.len() {
            let r = self.records[i];
            if r.lsn > through {
                break;
            }
            if r.kind.changes_data() {
                self.durable_write = (r.seq, r.at_ms);
            }
            if !r.in_section {
                became |= self.consistent.is_none() || r.kind == RecordKind::SectionEnd;
                self.consistent = Some(r.lsn);
                self.consistent_write = self.durable_write;
            }
        }
        became
    }

    /// Where to read the current image of `range` from (the newest record for each
    /// byte, else the volume), merged into runs.
    pub fn sources(&self, range: ByteRange) -> Vec<(ByteRange, Source)> {
        self.resolve(&self.index, range)
    }

    /// A view of the image as of record `at` (≥ applied): the newest record for
    /// each byte at or before it. Built once per inspection.
    pub fn view_at(&self, at: Lsn) -> RangeMap<Lsn> {
        let mut view = RangeMap::new();
        for r in self.records.iter().take_while(|r| r.lsn <= at) {
            if r.kind.changes_data() {
                view.insert(r.range.offset, r.range.end(), r.lsn);
            }
        }
        view
    }

    /// Where to read `range` of a view built by [`Self::view_at`].
    pub fn sources_in(&self, view: &RangeMap<Lsn>, range: ByteRange) -> Vec<(ByteRange, Source)> {
        self.resolve(view, range)
    }

    /// dr (issue 10): start a read of `range` in a view built by [`Self::view_at`]
    /// (an inspection of an older point, pinned with [`Self::set_pin`]): where to
    /// read it from. No checkpoint starts until [`Self::end_read`].
    pub fn begin_view_read(
        &mut self,
        view: &RangeMap<Lsn>,
        range: ByteRange,
    ) -> Vec<(ByteRange, Source)> {
        self.readers += 1;
        self.resolve(view, range)
    }

    fn resolve(&self, map: &RangeMap<Lsn>, range: ByteRange) -> Vec<(ByteRange, Source)> {
        self.sources_of(&map.query(range.offset, range.end()))
    }

    /// Where to read pieces that `map` attributed to records (`None`: the volume):
    /// a record no longer live (copied into the volume since) is read there too.
    fn sources_of(&self, pieces: &[(u64, u64, Option<Lsn>)]) -> Vec<(ByteRange, Source)> {
        let mut out: Vec<(ByteRange, Source)> = Vec::new();
        for &(start, end, lsn) in pieces {
            let src = match lsn.and_then(|l| self.record(l)) {
                None => Source::Volume,
                Some(r) if r.kind == RecordKind::Write => Source::Record {
                    lsn: r.lsn,
                    skip: start - r.range.offset,
                },
                Some(_) => Source::Zero,
            };
            let piece = ByteRange::new(start, end - start);
            match out.last_mut() {
                Some((prev, s)) if prev.end() == start && continues(s, &src, prev.len) => {
                    prev.len += piece.len;
                }
                _ => out.push((piece, src)),
            }
        }
        out
    }

    /// Start a read of the last consistent image of `range`: where to read it
    /// from, or None when no consistent image exists (a first copy). No checkpoint
    /// runs until [`Self::end_read`].
    pub fn begin_consistent_read(&mut self, range: ByteRange) -> Option<Vec<(ByteRange, Source)>> {
        let c = self.consistent?;
        let sources = if !self.in_section {
            // Outside a section every record is part of a consistent prefix.
            self.sources(range)
        } else {
            if self.consistent_view.as_ref().is_none_or(|(l, _)| *l != c) {
                self.consistent_view = Some((c, self.view_at(c)));
            }
            let (_, view) = self.consistent_view.as_ref().expect("just built");
            self.resolve(view, range)
        };
        self.readers += 1;
        Some(sources)
    }

    /// A read started with [`Self::begin_consistent_read`] finished.
    pub fn end_read(&mut self, out: &mut Vec<SecondaryAction<D>>) {
        self.readers -= 1;
        self.maybe_checkpoint(out);
    }

    /// Consistent points in the rollback window, oldest first (the newest `max`).
    pub fn points(&self, max: usize) -> Vec<Point> {
        let Some(end) = self.consistent else {
            return Vec::new();
        };
        let mut points = Vec::new();
        let mut after = self.live_bytes;
        let mut write = self.volume_write;
        if self.volume_consistent {
            // dr (issue 10): the volume's point carries its newest write as last
            // recorded (a rollback to it reports a time, not "unknown").
            points.push(Point {
                lsn: self.applied,
                seq: self.volume_write.0,
                at_ms: self.volume_write.1,
                later_bytes: after,
            });
        }
        // A point whose image equals the previous one's (only markers between
        // them) is not listed twice.
        let mut changed = points.is_empty();
        for r in self.records.iter().take_while(|r| r.lsn <= end) {
            after -= r.journal_bytes;
            if r.kind.changes_data() {
                write = (r.seq, r.at_ms);
                changed = true;
            }
            let listed =
                matches!(r.kind, RecordKind::Point | RecordKind::SectionEnd) || r.lsn == end;
            if !r.in_section && listed && changed {
                changed = false;
                points.push(Point {
                    lsn: r.lsn,
                    seq: write.0,
                    at_ms: write.1,
                    later_bytes: after,
                });
            }
        }
        if points.len() > max {
            points.drain(..points.len() - max);
        }
        points
    }
}

/// A hash check waiting to start (`SecondaryEngine::deferred_hashes`).
#[derive(Debug)]
struct DeferredHash<D> {
    seq: Seq,
    range: ByteRange,
    unit_bytes: u32,
    hashes: D,
    /// The record each piece of `range` came from when the check arrived (`None`:
    /// the volume). A record a checkpoint copied since is read from the volume,
    /// which holds it: every record the checkpoint copied is older than the
    /// check, and a piece names the newest one covering it then, so no copied
    /// record overwrote it.
    pieces: Vec<(u64, u64, Option<Lsn>)>,
}

fn continues(prev: &Source, next: &Source, prev_len: u64) -> bool {
    match (prev, next) {
        (Source::Volume, Source::Volume) | (Source::Zero, Source::Zero) => true,
        (Source::Record { lsn: a, skip: s }, Source::Record { lsn: b, skip: t }) => {
            a == b && s + prev_len == *t
        }
        _ => false,
    }
}

impl<D> SecondaryEngine<D> {
    /// The session ended: nothing more arrives; what was appended stays (the
    /// primary resends whatever it did not see durable).
    pub fn session_ended(&mut self, out: &mut Vec<SecondaryAction<D>>) {
        self.end_session();
        self.maybe_sync(true, out);
    }

    /// Forget the session; its comparisons still reading become stale (their
    /// answers are dropped), those not started are dropped now.
    fn end_session(&mut self) {
        let Some(s) = self.session.take() else {
            return;
        };
        for (seq, p) in s.pending {
            if !matches!(p, Pending::Hash) {
                continue;
            }
            if let Some(i) = self.deferred_hashes.iter().position(|d| d.seq == seq) {
                self.deferred_hashes.remove(i);
                self.readers -= 1;
            } else {
                *self.stale_hash_reads.entry(seq).or_default() += 1;
            }
        }
    }

    /// Some record is not covered by any sync started so far (one appended
    /// while a sync runs is not covered by it). The agent times
    /// `sync_interval_ms` from when this turns true on its monotonic clock and
    /// then calls [`Self::sync_unsynced`]: the
    /// engine's clock is the wall clock (records carry the primary's times),
    /// which may stand still or jump back, and a tick goes only by it.
    pub fn has_unsynced(&self) -> bool {
        self.unsynced_since_ms.is_some() && self.poisoned.is_none()
    }

    /// Sync what waits now, or right after the sync that runs.
    pub fn sync_unsynced(&mut self, out: &mut Vec<SecondaryAction<D>>) {
        self.maybe_sync(true, out);
    }

    /// Periodic tick (a few ms): sync what has waited `sync_interval_ms`, maybe
    /// checkpoint.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<SecondaryAction<D>>) {
        self.now_ms = self.now_ms.max(now_ms);
        let due = self
            .unsynced_since_ms
            .is_none_or(|since| self.now_ms.saturating_sub(since) >= self.cfg.sync_interval_ms);
        self.maybe_sync(due, out);
        self.maybe_checkpoint(out);
    }

    fn fail(&mut self, fault: Fault, out: &mut Vec<SecondaryAction<D>>) {
        self.end_session();
        out.push(SecondaryAction::Fail { fault });
    }

    /// Whether the agent may read the next frame (a frame of up to
    /// [`crate::wire::PAYLOAD_MAX_BYTES`] must fit the journal).
    pub fn room(&mut self, out: &mut Vec<SecondaryAction<D>>) -> Room {
        let frame_max = self.frame_reserve();
        if self.live_bytes + frame_max <= self.cfg.journal_capacity_bytes {
            return Room::Free;
        }
        if self.checkpointing.is_some() || self.readers > 0 {
            return Room::Wait;
        }
        self.maybe_checkpoint(out);
        if self.checkpointing.is_some() {
            return Room::Wait;
        }
        // dr (issue 10): an inspection's pin never stops replication. When it is
        // what keeps the checkpointer from making room, it yields (the agent sees
        // `pin()` gone and ends the inspection).
        if let Some(pin) = self.pin.take() {
            self.maybe_checkpoint(out);
            if self.checkpointing.is_some() {
                return Room::Wait;
            }
            self.pin = Some(pin);
        }
        if self.syncing.is_some() || self.tail > self.durable {
            // Records not durable yet cannot be copied: sync first.
            self.maybe_sync(true, out);
            return Room::Wait;
        }
        if self.session.is_some() {
            self.fail(
                Fault::JournalFullDuringResync {
                    capacity_bytes: self.cfg.journal_capacity_bytes,
                },
                out,
            );
        }
        Room::Stuck
    }

    /// A frame arrived (in order on one stream). Nothing of a frame that is refused
    /// is kept (issue 9, findings 10 and 11): its seq is checked first.
    pub fn receive(&mut self, frame: Incoming<D>, now_ms: u64, out: &mut Vec<SecondaryAction<D>>) {
        self.now_ms = self.now_ms.max(now_ms);
        if self.poisoned.is_some() {
            return;
        }
        match frame {
            Incoming::ResyncStart { next, blocks, full } => {
                self.resync_start(next, blocks, full, out)
            }
            Incoming::Write {
                seq,
                offset,
                fua,
                at_ms,
                data,
                len,
            } => self.data_frame(
                seq,
                RecordKind::Write,
                offset,
                len,
                fua,
                at_ms,
                Some(data),
                out,
            ),
            Incoming::Zeroes {
                seq,
                offset,
                len,
                fua,
                at_ms,
            } => self.data_frame(seq, RecordKind::Zeroes, offset, len, fua, at_ms, None, out),
            Incoming::Trim {
                seq,
                offset,
                len,
                at_ms,
            } => self.data_frame(seq, RecordKind::Trim, offset, len, false, at_ms, None, out),
            Incoming::HashCheck {
                seq,
                offset,
                unit_bytes,
                count,
                hashes,
            } => self.hash_check(seq, offset, unit_bytes, count, hashes, out),
            Incoming::Flush { through } => self.flush_marker(through, out),
            Incoming::ResyncDone { through } => self.resync_done(through, out),
        }
    }

    fn check_seq(&mut self, seq: Seq, out: &mut Vec<SecondaryAction<D>>) -> bool {
        if seq.0 == 0 || seq.0 > SEQ_MAX {
            self.fail(Fault::BadSeq { seq, max: SEQ_MAX }, out);
            return false;
        }
        let Some(s) = &self.session else {
            self.fail(
                Fault::BeforeStart {
                    what: "a data frame",
                },
                out,
            );
            return false;
        };
        if seq != s.expected_next {
            let expected = s.expected_next;
            self.fail(Fault::OutOfOrder { got: seq, expected }, out);
            return false;
        }
        true
    }

    fn resync_start(
        &mut self,
        next: Seq,
        blocks: u64,
        _full: bool,
        out: &mut Vec<SecondaryAction<D>>,
    ) {
        if next.0 == 0 || next.0 > SEQ_MAX {
            self.fail(
                Fault::BadSeq {
                    seq: next,
                    max: SEQ_MAX,
                },
                out,
            );
            return;
        }
        match &mut self.session {
            None => {
                self.session = Some(Session {
                    expected_next: next,
                    pending: BTreeMap::new(),
                    skipped: BTreeMap::new(),
                    durable_through: next.prev(),
                    sync_wanted: Seq::ZERO,
                    section_done: None,
                });
            }
            Some(s) if next < s.expected_next => {
                let expected = s.expected_next;
                self.fail(Fault::StartBehind { next, expected }, out);
                return;
            }
            Some(s) => {
                if next > s.expected_next {
                    // The primary went ahead: seqs in between were tracked in its
                    // bitmap and are covered by the resync that follows.
                    s.skipped.insert(s.expected_next, next);
                    s.expected_next = next;
                }
            }
        }
        if blocks == 0 {
            // Nothing differs: the image is the primary's as of `next - 1`. A
            // marker says so durably (also when no section is open: the node then
            // takes the primary's generation, MarkConsistent), and `SectionDone`
            // tells the primary once it is durable, as after a `ResyncDone`.
            self.append_marker(RecordKind::SectionEnd, out);
            self.want_section_done(next.prev(), out);
        } else if !self.in_section {
            if !self.cfg.allow_inconsistent {
                // From the network: an overflowing count is simply too large
                // (fuzz finding resync-blocks-overflow).
                let needed = blocks.saturating_mul(self.cfg.block_size as u64);
                let available = self.space_for_section();
                if needed > available {
                    self.fail(
                        Fault::ResyncTooLarge {
                            needed_bytes: needed,
                            available_bytes: available,
                        },
                        out,
                    );
                    return;
                }
            }
            self.append_marker(RecordKind::SectionStart, out);
        }
        self.maybe_sync(false, out);
        self.advance_durable(out);
    }

    /// The largest resync this node stages in one section (announced in the
    /// Welcome): `u64::MAX` when it copies a larger one straight into the volume.
    pub fn stage_bytes(&self) -> u64 {
        if self.cfg.allow_inconsistent {
            u64::MAX
        } else {
            self.space_for_section()
        }
    }

    /// Journal bytes kept free for the next frame, whatever its size.
    fn frame_reserve(&self) -> u64 {
        self.cfg.frame_max_bytes + self.cfg.record_overhead_bytes * 4
    }

    /// Journal bytes a section may use: all of it but the room [`Self::room`]
    /// keeps free for the largest frame, less a margin (records of the consistent
    /// image before it are released by checkpoints as it grows; record headers).
    /// Announcing more let a resync be accepted that could never finish: refused
    /// with `JournalFullDuringResync` at the same point on every reconnect.
    fn space_for_section(&self) -> u64 {
        let usable = self
            .cfg
            .journal_capacity_bytes
            .saturating_sub(self.frame_reserve());
        usable - usable / 8
    }

    #[allow(clippy::too_many_arguments)]
    fn data_frame(
        &mut self,
        seq: Seq,
        kind: RecordKind,
        offset: u64,
        len: u64,
        fua: bool,
        at_ms: u64,
        data: Option<D>,
        out: &mut Vec<SecondaryAction<D>>,
    ) {
        if !self.check_seq(seq, out) {
            return;
        }
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|e| e > self.cfg.size_bytes)
        {
            self.fail(
                Fault::OutOfRange {
                    seq,
                    offset,
                    len,
                    size_bytes: self.cfg.size_bytes,
                },
                out,
            );
            return;
        }
        let payload = if kind == RecordKind::Write { len } else { 0 };
        let journal_bytes = payload + self.cfg.record_overhead_bytes;
        if self.live_bytes + journal_bytes > self.cfg.journal_capacity_bytes {
            // The agent asks `room()` before every frame; a frame that still does not
            // fit means the journal is full of records that must stay.
            let capacity_bytes = self.cfg.journal_capacity_bytes;
            self.fail(Fault::JournalFullDuringResync { capacity_bytes }, out);
            return;
        }
        let lsn = self.tail.next();
        self.tail = lsn;
        self.unsynced_since_ms.get_or_insert(self.now_ms);
        let record = self.track(Record {
            lsn,
            seq,
            kind,
            range: ByteRange::new(offset, len),
            at_ms,
            journal_bytes,
            in_section: false,
        });
        self.bytes_since_sync += journal_bytes;
        out.push(SecondaryAction::Append { record, data });
        out.push(SecondaryAction::SendApplied { seq });
        let s = self.session.as_mut().expect("checked");
        s.expected_next = seq.next();
        s.pending.insert(seq, Pending::Record(lsn));
        if fua {
            s.sync_wanted = s.sync_wanted.max(seq);
        }
        self.maybe_sync(false, out);
    }

    fn hash_check(
        &mut self,
        seq: Seq,
        offset: u64,
        unit_bytes: u32,
        count: u32,
        hashes: D,
        out: &mut Vec<SecondaryAction<D>>,
    ) {
        if !self.check_seq(seq, out) {
            return;
        }
        let Some(range) = hash_check_range(
            offset,
            unit_bytes,
            count as usize,
            self.cfg.size_bytes,
            self.cfg.block_size,
        ) else {
            self.fail(Fault::BadHashCheck { seq }, out);
            return;
        };
        let s = self.session.as_mut().expect("checked");
        s.expected_next = seq.next();
        s.pending.insert(seq, Pending::Hash);
        self.readers += 1;
        if self.checkpointing.is_some() || self.stale_hash_reads.contains_key(&seq) {
            let pieces = self.index.query(range.offset, range.end());
            self.deferred_hashes.push(DeferredHash {
                seq,
                range,
                unit_bytes,
                hashes,
                pieces,
            });
            return;
        }
        let sources = self.sources(range);
        out.push(SecondaryAction::StartHash {
            seq,
            range,
            unit_bytes,
            hashes,
            sources,
        });
    }

    /// Start the hash checks that waited for a checkpoint (its records are in the
    /// volume now) or for a stale read, or drop them when the node failed.
    fn start_deferred_hashes(&mut self, failed: bool, out: &mut Vec<SecondaryAction<D>>) {
        for d in std::mem::take(&mut self.deferred_hashes) {
            if failed {
                self.readers -= 1;
                continue;
            }
            if self.checkpointing.is_some() || self.stale_hash_reads.contains_key(&d.seq) {
                self.deferred_hashes.push(d);
                continue;
            }
            out.push(SecondaryAction::StartHash {
                seq: d.seq,
                range: d.range,
                unit_bytes: d.unit_bytes,
                hashes: d.hashes,
                sources: self.sources_of(&d.pieces),
            });
        }
    }

    /// A hash comparison finished: `mismatched` indices, or an I/O error.
    pub fn hash_done(
        &mut self,
        seq: Seq,
        result: Result<Vec<u32>, String>,
        out: &mut Vec<SecondaryAction<D>>,
    ) {
        self.readers -= 1;
        if let Some(n) = self.stale_hash_reads.get_mut(&seq) {
            // A read of a session that ended: its answer is for nobody.
            *n -= 1;
            if *n == 0 {
                self.stale_hash_reads.remove(&seq);
            }
            if let Err(e) = result {
                self.poisoned = Some(e.clone());
                self.fail(Fault::Io(e), out);
                self.start_deferred_hashes(true, out);
            } else {
                self.start_deferred_hashes(false, out);
            }
            self.maybe_checkpoint(out);
            return;
        }
        match result {
            Ok(mismatched) => {
                let (tail, durable) = (self.tail, self.durable);
                if let Some(s) = self.session.as_mut()
                    && let Some(p) = s.pending.get_mut(&seq)
                    && matches!(p, Pending::Hash)
                {
                    // The comparison read journal records (its sources) that may
                    // not be durable yet: the answer holds for the image a power
                    // loss would leave only once they are, and `Durable` past this
                    // seq lets the primary clear the compared blocks (simulator
                    // seed 1373093 sync). The newest record now covers them all.
                    *p = if tail > durable {
                        s.sync_wanted = s.sync_wanted.max(seq);
                        Pending::Record(tail)
                    } else {
                        Pending::Done
                    };
                    out.push(SecondaryAction::SendHashReply { seq, mismatched });
                    self.advance_durable(out);
                    self.maybe_sync(false, out);
                }
            }
            Err(e) => {
                self.poisoned = Some(e.clone());
                self.fail(Fault::Io(e), out);
            }
        }
        self.maybe_checkpoint(out);
    }

    fn marker_session(
        &mut self,
        what: &'static str,
        through: Seq,
        out: &mut Vec<SecondaryAction<D>>,
    ) -> bool {
        let Some(s) = self.session.as_mut() else {
            self.fail(Fault::BeforeStart { what }, out);
            return false;
        };
        if through >= s.expected_next {
            let expected = s.expected_next;
            self.fail(
                Fault::MarkerAhead {
                    what,
                    through,
                    expected,
                },
                out,
            );
            return false;
        }
        s.sync_wanted = s.sync_wanted.max(through);
        true
    }

    fn flush_marker(&mut self, through: Seq, out: &mut Vec<SecondaryAction<D>>) {
        if !self.marker_session("Flush", through, out) {
            return;
        }
        if !self.in_section && self.tail > self.last_point {
            self.append_marker(RecordKind::Point, out);
        }
        self.maybe_sync(false, out);
    }

    fn resync_done(&mut self, through: Seq, out: &mut Vec<SecondaryAction<D>>) {
        if !self.marker_session("ResyncDone", through, out) {
            return;
        }
        if self.in_section {
            self.append_marker(RecordKind::SectionEnd, out);
        }
        self.maybe_sync(false, out);
        self.want_section_done(through, out);
    }

    /// The primary waits for `SectionDone { through }`: everything appended so
    /// far (the end marker, if one was) must be durable first.
    fn want_section_done(&mut self, through: Seq, out: &mut Vec<SecondaryAction<D>>) {
        let tail = self.tail;
        if let Some(s) = self.session.as_mut() {
            s.section_done = Some((through, tail));
        }
        self.maybe_section_done(out);
    }

    /// Send `SectionDone` once the section end (and everything before it) is
    /// durable. A `Durable` covering the same seq does not say it: the section
    /// end shares the seq of the last write, and may be appended after that
    /// write's `Durable` went (sim seed 40236 async).
    fn maybe_section_done(&mut self, out: &mut Vec<SecondaryAction<D>>) {
        let durable = self.durable;
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if let Some((through, lsn)) = s.section_done
            && lsn <= durable
            && s.durable_through >= through
        {
            s.section_done = None;
            out.push(SecondaryAction::SendSectionDone { through });
        }
    }

    /// Append a marker; its seq is the last seq received, so the image through it is
    /// the primary's through that seq (outside a section).
    fn append_marker(&mut self, kind: RecordKind, out: &mut Vec<SecondaryAction<D>>) {
        let seq = self
            .session
            .as_ref()
            .map_or(Seq::ZERO, |s| s.expected_next.prev());
        let lsn = self.tail.next();
        self.tail = lsn;
        self.unsynced_since_ms.get_or_insert(self.now_ms);
        let record = self.track(Record {
            lsn,
            seq,
            kind,
            range: ByteRange::new(0, 0),
            at_ms: self.last_write.1,
            journal_bytes: self.cfg.record_overhead_bytes,
            in_section: false,
        });
        out.push(SecondaryAction::Append { record, data: None });
        if kind == RecordKind::SectionStart {
            out.push(SecondaryAction::MarkSectionOpen);
        }
    }

    fn maybe_sync(&mut self, tick: bool, out: &mut Vec<SecondaryAction<D>>) {
        if self.tail == self.durable || self.poisoned.is_some() {
            // Poisoned: a sync after a failed one proves nothing (G3; fuzz finding
            // consistent-after-failed-sync).
            return;
        }
        if self.syncing.is_some() {
            // Asked while one runs: the next one starts as soon as it ends.
            self.sync_again |= tick && self.syncing < Some(self.tail);
            return;
        }
        let tick = std::mem::take(&mut self.sync_again) || tick;
        let wanted = self.session.as_ref().is_some_and(|s| {
            s.sync_wanted > s.durable_through
                && s.pending
                    .range(..=s.sync_wanted)
                    .any(|(_, p)| matches!(p, Pending::Record(l) if *l > self.durable))
        });
        // Markers change what is consistent: make them durable at once.
        let marker = self
            .records
            .iter()
            .rev()
            .take_while(|r| r.lsn > self.durable)
            .any(|r| !r.kind.changes_data());
        if tick || wanted || marker || self.bytes_since_sync >= self.cfg.sync_threshold_bytes {
            self.syncing = Some(self.tail);
            self.unsynced_since_ms = None;
            self.bytes_since_sync = 0;
            out.push(SecondaryAction::SyncJournal { through: self.tail });
        }
    }

    /// The journal sync issued last finished.
    pub fn journal_synced(
        &mut self,
        result: Result<(), String>,
        out: &mut Vec<SecondaryAction<D>>,
    ) {
        let through = self.syncing.take().expect("journal_synced without a sync");
        if self.poisoned.is_some() {
            // A sync issued before the failure that reports success later: the
            // failed one may have dropped pages it covered.
            return;
        }
        if let Err(e) = result {
            // Never retried and assumed (G3): poisoned until an operator acts.
            self.poisoned = Some(e.clone());
            self.fail(Fault::Io(e), out);
            return;
        }
        if self.mark_durable(through) {
            let (lsn, _, at_ms) = self.consistent_point().expect("just became consistent");
            out.push(SecondaryAction::MarkConsistent {
                through: lsn,
                at_ms,
            });
        }
        self.advance_durable(out);
        self.maybe_sync(false, out);
        self.maybe_checkpoint(out);
    }

    /// Send `Durable` for every seq whose record is durable and every answered
    /// comparison, in order.
    fn advance_durable(&mut self, out: &mut Vec<SecondaryAction<D>>) {
        let durable = self.durable;
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let before = s.durable_through;
        loop {
            let next = s.durable_through.next();
            if let Some(end) = s.skipped.remove(&next) {
                s.durable_through = end.prev();
                continue;
            }
            match s.pending.first_key_value() {
                Some((&seq, &p)) if seq == next => {
                    let ok = match p {
                        Pending::Record(l) => l <= durable,
                        Pending::Done => true,
                        Pending::Hash => false,
                    };
                    if !ok {
                        break;
                    }
                    s.pending.pop_first();
                    s.durable_through = seq;
                }
                _ => break,
            }
        }
        if s.durable_through > before {
            out.push(SecondaryAction::SendDurable {
                through: s.durable_through,
            });
        }
        self.maybe_section_done(out);
    }

    /// The newest record the checkpointer may copy into the volume.
    fn copy_limit(&self) -> Lsn {
        let mut limit = if self.cfg.allow_inconsistent {
            self.durable
        } else {
            match self.consistent {
                Some(c) => c,
                // Nothing consistent to protect (a first full copy): copy what is
                // durable.
                None => self.durable,
            }
        };
        limit = limit.min(self.durable);
        if let Some(p) = self.pin {
            limit = limit.min(p);
        }
        limit
    }

    fn maybe_checkpoint(&mut self, out: &mut Vec<SecondaryAction<D>>) {
        if self.checkpointing.is_some() || self.readers > 0 || self.poisoned.is_some() {
            return;
        }
        let limit = self.copy_limit();
        if limit <= self.applied {
            return;
        }
        // Keep the rollback window unless the journal needs room.
        let mut over_window = self
            .live_bytes
            .saturating_sub(self.cfg.rollback_window_bytes);
        if over_window < self.cfg.checkpoint_min_bytes {
            // Too little past the window to be worth a checkpoint of its own
            // (records older than the window's age, or pressure, still go).
            over_window = 0;
        }
        let frame_max = self.frame_reserve();
        let pressure = self.live_bytes * 4 > self.cfg.journal_capacity_bytes * 3
            || self.live_bytes + frame_max > self.cfg.journal_capacity_bytes;
        let mut through = self.applied;
        let mut bytes = 0u64;
        for r in self.records.iter() {
            if r.lsn > limit || bytes >= self.cfg.checkpoint_batch_bytes {
                break;
            }
            let old =
                r.at_ms > 0 && self.now_ms.saturating_sub(r.at_ms) > self.cfg.rollback_window_ms;
            if !(pressure || bytes < over_window || old) {
                break;
            }
            through = r.lsn;
            bytes += r.journal_bytes;
        }
        if through > self.applied {
            self.start_checkpoint(through, out);
        }
    }

    fn start_checkpoint(&mut self, through: Lsn, out: &mut Vec<SecondaryAction<D>>) {
        if self.consistent.is_some_and(|c| through > c) {
            // resync-overflow = inconsistent: copying part of a section past the
            // consistent point destroys that image as the copy starts (fuzz
            // finding consistent-point-behind-inconsistent-checkpoint); the next
            // section end makes a new one.
            self.consistent = None;
            self.consistent_view = None;
        }
        self.checkpointing = Some(through);
        let from = self.applied.next();
        let last = *self.record(through).expect("live record");
        out.push(SecondaryAction::Checkpoint {
            from,
            through,
            volume_consistent_after: !last.in_section,
        });
    }

    /// Copy everything copyable now (promotion, shutdown), ignoring the rollback
    /// window. Returns false when nothing is left to copy.
    pub fn checkpoint_all(&mut self, out: &mut Vec<SecondaryAction<D>>) -> bool {
        if self.poisoned.is_some() {
            // Never copy into a volume (or from a journal) that failed (fuzz
            // finding checkpoint-all-when-poisoned).
            return false;
        }
        if self.checkpointing.is_some() || self.readers > 0 {
            return true;
        }
        let limit = self.copy_limit();
        if limit <= self.applied {
            return false;
        }
        let mut through = self.applied;
        let mut bytes = 0;
        for r in self.records.iter() {
            if r.lsn > limit || bytes >= self.cfg.checkpoint_batch_bytes {
                break;
            }
            through = r.lsn;
            bytes += r.journal_bytes;
        }
        self.start_checkpoint(through, out);
        true
    }

    /// A checkpoint finished: the records are in the volume, durably, and released.
    pub fn checkpointed(&mut self, result: Result<(), String>, out: &mut Vec<SecondaryAction<D>>) {
        let through = self
            .checkpointing
            .take()
            .expect("checkpointed without a checkpoint");
        if let Err(e) = result {
            self.poisoned = Some(e.clone());
            self.fail(Fault::Io(e), out);
            self.start_deferred_hashes(true, out);
            return;
        }
        while let Some(r) = self.records.front() {
            if r.lsn > through {
                break;
            }
            let r = self.records.pop_front().expect("front");
            self.live_bytes -= r.journal_bytes;
            self.volume_consistent = !r.in_section;
            if r.kind.changes_data() {
                self.index
                    .remove_value(r.range.offset, r.range.end(), r.lsn);
                self.volume_write = (r.seq, r.at_ms);
            }
        }
        self.applied = through;
        self.start_deferred_hashes(false, out);
        self.maybe_checkpoint(out);
    }

    /// Hold the checkpointer at `lsn` (an inspection of that point), or release.
    pub fn set_pin(&mut self, pin: Option<Lsn>) {
        self.pin = pin;
    }

    /// dr (issue 10): the pin in force; None after [`Self::room`] made it yield
    /// to replication (the journal had no room left while it held it).
    pub fn pin(&self) -> Option<Lsn> {
        self.pin
    }

    /// At the start of a session: an open resync section that has taken more than
    /// half the journal (repeated interruptions, writes during it) may never fit.
    /// Only the section's own records count: those before the consistent point
    /// (the rollback window keeps them until there is pressure) can be copied
    /// into the volume to make room.
    /// It is dropped (the image goes back to the last consistent point) and the
    /// ranges it touched are returned: the handshake reports them as blocks this
    /// node lacks, so the primary resends them in one new section. Progress is
    /// lost, the consistent image never is.
    ///
    /// `None`: nothing dropped. `Some(ranges)`: records after the consistent
    /// point were dropped, and the agent must truncate the journal after
    /// [`Self::tail`] — also when `ranges` is empty (a section of markers only,
    /// e.g. a `SectionStart` that a crash kept without the writes after it):
    /// the journal numbers its records itself, so a record left in it would
    /// shift every later LSN by one against the engine's (simulator seed 914662
    /// sync).
    pub fn restart_large_section(&mut self) -> Option<Vec<ByteRange>> {
        match self.consistent {
            // Only while no I/O runs (a sync or checkpoint in flight): else next time.
            Some(c)
                if self.in_section
                    && self.is_idle()
                    && self.bytes_after(c) > self.cfg.journal_capacity_bytes / 2 =>
            {
                Some(self.truncate_after(c))
            }
            _ => None,
        }
    }

    /// Journal bytes of the records after `lsn`.
    fn bytes_after(&self, lsn: Lsn) -> u64 {
        self.records
            .iter()
            .rev()
            .take_while(|r| r.lsn > lsn)
            .map(|r| r.journal_bytes)
            .sum()
    }

    /// ha (issue 12): the volume grew to `size_bytes` (the agent made it and the
    /// metadata that large, durably): frames may address the new range.
    pub fn grow(&mut self, size_bytes: u64) {
        assert!(
            size_bytes >= self.cfg.size_bytes,
            "a volume never shrinks ({} to {size_bytes} bytes)",
            self.cfg.size_bytes
        );
        self.cfg.size_bytes = size_bytes;
    }

    /// Drop every record after `lsn` (a rollback, or a promotion mid-resync); the
    /// agent truncates the journal durably. Returns the ranges the dropped records
    /// touched: they now differ from the primary's data.
    pub fn truncate_after(&mut self, lsn: Lsn) -> Vec<ByteRange> {
        assert!(self.session.is_none(), "truncate while a session runs");
        assert!(
            lsn >= self.applied,
            "cannot drop records already in the volume"
        );
        assert!(self.is_idle(), "truncate while I/O runs");
        let mut dropped = Vec::new();
        while let Some(r) = self.records.back() {
            if r.lsn <= lsn {
                break;
            }
            let r = self.records.pop_back().expect("back");
            if r.kind.changes_data() {
                dropped.push(r.range);
            }
        }
        // Rebuild everything derived from the records.
        self.consistent_view = None;
        let records: Vec<Record> = self.records.drain(..).collect();
        self.live_bytes = 0;
        self.index.clear();
        self.tail = self.applied;
        self.durable = self.applied;
        self.in_section = !self.volume_consistent;
        self.consistent = self.volume_consistent.then_some(self.applied);
        self.last_point = self.applied;
        self.durable_write = self.consistent_write_of_volume();
        // A rollback to the volume itself keeps no record: the point is the
        // volume's write, not a dropped one's (fuzz finding
        // rollback-to-volume-keeps-newer-write).
        self.consistent_write = self.durable_write;
        for r in records {
            self.tail = r.lsn;
            self.track(r);
        }
        self.mark_durable(self.tail);
        dropped
    }
}

impl Seq {
    /// The seq before this one (0 for 1).
    pub fn prev(self) -> Seq {
        Seq(self.0.saturating_sub(1))
    }
}

/// The range a HashCheck covers: `count` hashed units of `unit_bytes` bytes (a
/// block, or a power-of-two multiple of the block size up to [`HASH_UNIT_MAX_BYTES`])
/// from `offset`, the last one cut at the end of the volume. None when it is
/// malformed, out of the volume, or larger than [`HASH_CHECK_MAX_BYTES`].
pub fn hash_check_range(
    offset: u64,
    unit_bytes: u32,
    count: usize,
    size_bytes: u64,
    block_size: u32,
) -> Option<ByteRange> {
    let unit_ok = unit_bytes >= block_size
        && unit_bytes.is_power_of_two()
        && unit_bytes <= HASH_UNIT_MAX_BYTES;
    if !unit_ok
        || !offset.is_multiple_of(block_size as u64)
        || count as u64 * unit_bytes as u64 > HASH_CHECK_MAX_BYTES
        || count == 0
        || count > crate::wire::HASHES_PER_CHECK_MAX
        || offset >= size_bytes
    {
        return None;
    }
    let unit = unit_bytes as u64;
    let len = (count as u64 * unit).min(size_bytes - offset);
    (len.div_ceil(unit) == count as u64).then_some(ByteRange::new(offset, len))
}

/// Largest range one hash may cover, and largest range one HashCheck may make this
/// node read (it holds the range in memory while hashing).
pub const HASH_UNIT_MAX_BYTES: u32 = 1 << 20;
pub const HASH_CHECK_MAX_BYTES: u64 = 64 << 20;

/// Blocks touched by byte ranges, for a bitmap.
pub fn blocks_of(ranges: &[ByteRange], block_size: u32) -> Vec<(BlockIndex, BlockIndex)> {
    ranges.iter().map(|r| r.blocks(block_size)).collect()
}

#[cfg(test)]
mod tests;
