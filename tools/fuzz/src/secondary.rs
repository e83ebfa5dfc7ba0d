//! The secondary's redo-journal engine (`engine::secondary`) driven through
//! whole lives — sessions, crashes, promotions — by frames decoded from the
//! input and I/O completions delivered in any order the agent allows, each
//! succeeding or failing as the input says, and checked after every step
//! against a model built only from the actions the engine emitted:
//!
//! - **frames**: what the protocol accepts is accepted and what it refuses is
//!   refused with the right fault (bad seq, before ResyncStart, out of order,
//!   beyond the volume, malformed HashCheck, marker ahead, start behind, resync
//!   too large); a refused frame leaves nothing behind (its only action is the
//!   `Fail`), and a poisoned engine ignores every frame;
//! - **journal**: `Append` LSNs are consecutive from the recovered tail; records
//!   carry their frame's seq, range and section flag; markers are appended only
//!   where they mean something (a section start/end, a point outside a section);
//! - **acknowledgements**: `Applied` follows the append of that frame; `Durable
//!   { through }` moves forward, never past the last seq received, and covers
//!   only seqs whose record a completed journal sync made durable, answered
//!   comparisons whose newest record read is durable, or seqs the primary
//!   skipped; hash replies answer the
//!   comparison completed, with its result; nothing is sent without a session;
//! - **I/O**: one journal sync and one checkpoint at a time; a sync covers the
//!   tail; a checkpoint copies from the first live record, only durable ones, not
//!   past the pin, not past the consistent point (unless the resource allows an
//!   inconsistent resync, or there is no consistent image to protect), never while
//!   a comparison or a consistent read holds the records, and says whether it
//!   leaves the volume consistent; hash and read sources are the newest record of
//!   each byte (of the consistent view, for a read inside a section), else the
//!   volume;
//! - **consistency**: the consistent point is durable, never inside a section
//!   (its record is not a section record; at the volume only when the volume is
//!   consistent), moves only forward (except an explicit truncation), reports the
//!   newest write it holds, survives a crash, and `MarkConsistent` names it;
//!   the listed rollback points are consistent, ordered, and their `later_bytes`
//!   exact;
//! - **poison**: after a failed journal sync, checkpoint or hash read the engine is
//!   poisoned: no `Append`, `Applied`, `Durable`, `MarkConsistent`, no checkpoint,
//!   and neither its durable LSN nor its consistent point moves again, whatever a
//!   later sync returns;
//! - **liveness**: once the faults stop and every I/O completes, everything
//!   appended becomes durable, every accepted frame is acknowledged durable, and
//!   a promotion (checkpoint everything, truncate to the consistent point) leaves
//!   no section open.
//!
//! Input: two config bytes (journal size, volume size, rollback window, sync
//! threshold, new node, inconsistent resyncs allowed), then operations: one
//! opcode byte (low 4 bits: what; high 4 bits: flags) and its arguments. Frames
//! use seqs relative to the next one expected, biased to be in order, so that
//! mutations reach the engine's deeper states; a "hostile" opcode takes raw
//! 64-bit seqs, offsets and lengths.
//!
//! The adapter ([`incoming`]) mirrors `agent::secondary`'s `feed` (the room check
//! before every frame, the frame-to-`Incoming` mapping); it is the code to adapt
//! when the engine's API changes.

use std::collections::{BTreeMap, BTreeSet};

use tandem::engine::secondary::{
    Config, Fault, Incoming, Lsn, Record, RecordKind, Room, SEQ_MAX, SecondaryAction,
    SecondaryEngine, Source,
};
use tandem::types::{ByteRange, Seq};

use crate::Input;

/// The payload stands for the data: a write's tag (its seq), or a hash list's.
type D = u64;
type Out = Vec<SecondaryAction<D>>;

const BLOCK: u64 = 4096;
const OVERHEAD: u64 = 64;
/// Operations per input (bounds time).
const OPS_MAX: usize = 2048;
/// Largest HashCheck range and unit (engine::secondary's documented limits).
const HASH_CHECK_MAX_BYTES: u64 = 64 << 20;
const HASH_UNIT_MAX_BYTES: u64 = 1 << 20;
const HASHES_MAX: u64 = tandem::wire::HASHES_PER_CHECK_MAX as u64;

// ---- the adapter: frames as the agent hands them to the engine ------------

/// A frame from the primary, as decoded from the wire (seq, message fields).
#[derive(Clone, Debug)]
pub enum Frame {
    ResyncStart {
        seq: u64,
        blocks: u64,
        full: bool,
    },
    Write {
        seq: u64,
        offset: u64,
        len: u64,
        fua: bool,
        at_ms: u64,
    },
    Zeroes {
        seq: u64,
        offset: u64,
        len: u64,
        fua: bool,
        at_ms: u64,
    },
    Trim {
        seq: u64,
        offset: u64,
        len: u64,
        at_ms: u64,
    },
    Flush {
        seq: u64,
    },
    ResyncDone {
        through: u64,
    },
    HashCheck {
        seq: u64,
        offset: u64,
        unit_bytes: u32,
        count: u32,
    },
}

/// The `Incoming` the agent builds from a frame (`agent::secondary` `feed`):
/// ResyncStart's `next` and Flush's `through` are the frame's seq.
pub fn incoming(f: &Frame) -> Incoming<D> {
    match *f {
        Frame::ResyncStart { seq, blocks, full } => Incoming::ResyncStart {
            next: Seq(seq),
            blocks,
            full,
        },
        Frame::Write {
            seq,
            offset,
            len,
            fua,
            at_ms,
        } => Incoming::Write {
            seq: Seq(seq),
            offset,
            fua,
            at_ms,
            data: seq,
            len,
        },
        Frame::Zeroes {
            seq,
            offset,
            len,
            fua,
            at_ms,
        } => Incoming::Zeroes {
            seq: Seq(seq),
            offset,
            len,
            fua,
            at_ms,
        },
        Frame::Trim {
            seq,
            offset,
            len,
            at_ms,
        } => Incoming::Trim {
            seq: Seq(seq),
            offset,
            len,
            at_ms,
        },
        Frame::Flush { seq } => Incoming::Flush { through: Seq(seq) },
        Frame::ResyncDone { through } => Incoming::ResyncDone {
            through: Seq(through),
        },
        Frame::HashCheck {
            seq,
            offset,
            unit_bytes,
            count,
        } => Incoming::HashCheck {
            seq: Seq(seq),
            offset,
            unit_bytes,
            count,
            hashes: seq,
        },
    }
}

/// With `FUZZ_TRACE=1`, print what the harness does (to read a crash input).
fn trace(line: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some()) {
        eprintln!("{}", line());
    }
}

// ---- the model -------------------------------------------------------------

/// Bugs found by this target in code outside tools/fuzz and not fixed yet:
/// `run` steers around them so campaigns keep looking for others; `run_strict`
/// reports them. Each has an ignored test in tests/regressions.rs that its fix
/// un-ignores; the fix also sets its flag in [`OPEN`] to false.
#[derive(Clone, Copy, Debug, Default)]
pub struct Open {
    /// A poisoned engine still issues journal syncs (`tick` → `maybe_sync`), and a
    /// success of one marks records durable and moves the consistent point
    /// (`journal_synced` does not look at `poisoned`). See tests/regressions.rs
    /// `a_failed_journal_sync_is_never_followed_by_durability`.
    pub durable_after_failed_sync: bool,
    /// `ResyncStart { blocks }` with a huge block count overflows
    /// `blocks * block_size` in `resync_start` (a panic with overflow checks, a
    /// wrong "fits" decision without). See tests/regressions.rs
    /// `a_resync_start_with_a_huge_block_count_is_refused_not_a_panic`.
    pub resync_blocks_overflow: bool,
    /// With `allow_inconsistent` (resync-overflow = inconsistent), a checkpoint
    /// that copies section records into the volume releases the records the
    /// consistent point stands on (or makes the volume it names mixed), but
    /// `consistent` keeps pointing there: `consistent_point()` reports an image
    /// that no longer exists (a promotion's `truncate_after` to it panics, a
    /// consistent read serves the mixed volume). See tests/regressions.rs
    /// `an_inconsistent_checkpoint_gives_up_the_consistent_point`.
    pub consistent_point_behind_checkpoint: bool,
    /// `truncate_after(applied)` (a rollback to the volume's own point) leaves
    /// `consistent_write` at the newest write of the dropped records: the
    /// consistent point (the volume) reports a write it does not hold. See
    /// tests/regressions.rs `a_rollback_to_the_volume_reports_the_volume_s_write`.
    pub truncate_keeps_consistent_write: bool,
    /// `checkpoint_all` (promotion, shutdown) starts a checkpoint on a poisoned
    /// engine (after a failed journal sync, checkpoint or hash read), although
    /// `maybe_checkpoint` refuses to. See tests/regressions.rs
    /// `a_poisoned_engine_starts_no_checkpoint`.
    pub checkpoint_all_when_poisoned: bool,
    /// A hash read of an ended session that completes in a later one is taken
    /// for that session's seq: `hash_done` looks the seq up in the current
    /// session, turns its pending entry (a write's record!) into `Done`, sends a
    /// `HashReply` for it and may send `Durable` past a record not yet synced.
    /// See tests/regressions.rs `a_hash_read_of_an_ended_session_is_not_taken_for_a_new_one`.
    pub stale_hash_done: bool,
}

/// The open bugs `run` steers around.
pub const OPEN: Open = Open {
    durable_after_failed_sync: false,
    resync_blocks_overflow: false,
    consistent_point_behind_checkpoint: false,
    truncate_keeps_consistent_write: false,
    checkpoint_all_when_poisoned: false,
    stale_hash_done: false,
};

/// A consistent point as the engine reports it: record, newest write (seq, accept time).
type Point = (Lsn, Seq, u64);

/// A record as the model tracks it.
#[derive(Clone, Copy, Debug)]
struct MRec {
    rec: Record,
}

/// Per-seq state of a session, as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pend {
    Record(Lsn),
    /// A comparison; `at` is the last record appended when it arrived (it reads
    /// the image as of then, whenever it starts); `read` is the newest journal
    /// record it read (its answer counts as durable only once that record is).
    Hash {
        answered: bool,
        at: Lsn,
        read: Lsn,
    },
}

#[derive(Debug)]
struct MSession {
    expected_next: u64,
    pending: BTreeMap<u64, Pend>,
    /// Seq ranges [start, end) skipped by a ResyncStart that went ahead.
    skipped: Vec<(u64, u64)>,
    durable_sent: u64,
    /// The last ResyncDone not answered by SectionDone: its seq and the journal
    /// record that must be durable first (its section end, else the tail).
    done_wanted: Option<(u64, Lsn)>,
}

/// The engine's configuration chosen by the input.
#[derive(Clone, Debug)]
struct Setup {
    cfg: Config,
}

struct Model {
    setup: Setup,
    /// Live journal records (after `applied`), in LSN order.
    live: Vec<MRec>,
    /// Every data record of this engine's life in LSN order (seq, at_ms), for the
    /// newest write a point holds; released ones included.
    writes: BTreeMap<Lsn, (Seq, u64)>,
    /// The newest write in the volume when this engine started.
    volume_write_at_start: (Seq, u64),
    applied: Lsn,
    durable: Lsn,
    tail: Lsn,
    /// Appending into a mixed image (a section is open, or no consistent image yet).
    in_section: bool,
    /// The superblock's `volume_mixed`, as the agent records it (what a restart
    /// passes as `volume_consistent`).
    volume_mixed: bool,
    /// The superblock's `mixed_through`: the newest record a checkpoint that left
    /// the volume mixed covered (a cut copy leaves pieces of any of them).
    mixed_through: Lsn,
    /// The engine's view: the records released so far left the volume consistent.
    volume_consistent: bool,
    /// The newest write copied into the volume (what a restart passes).
    volume_write: (Seq, u64),
    syncing: Option<Lsn>,
    checkpointing: Option<(Lsn, Lsn, bool)>,
    /// Comparisons in flight: (session, seq).
    hashes: Vec<(u64, u64)>,
    /// Consistent reads in flight.
    reads: u32,
    pin: Option<Lsn>,
    session: Option<MSession>,
    /// Sessions started (a comparison belongs to the session that asked).
    session_id: u64,
    /// The last session's next seq (a new session's ResyncStart continues from it).
    seq_base: u64,
    poisoned: bool,
    /// A journal sync failed: the durable LSN and the consistent point as they
    /// were then, frozen from then on (after a failed fdatasync the kernel may
    /// have dropped the pages; a later "successful" sync proves nothing).
    frozen: Option<(Lsn, Option<Point>)>,
    /// The consistent point last seen (moves only forward).
    consistent: Option<Point>,
    now_ms: u64,
    open: Open,
    /// Steering (Open::truncate_keeps_consistent_write): the consistent point's
    /// write is stale since a truncation to the volume, until the point moves.
    stale_point_write: Option<Lsn>,
}

impl Model {
    fn new(setup: Setup, open: Open) -> Model {
        Model {
            setup,
            live: Vec::new(),
            writes: BTreeMap::new(),
            volume_write_at_start: (Seq::ZERO, 0),
            applied: Lsn::ZERO,
            durable: Lsn::ZERO,
            tail: Lsn::ZERO,
            in_section: false,
            volume_mixed: false,
            mixed_through: Lsn::ZERO,
            volume_consistent: true,
            volume_write: (Seq::ZERO, 0),
            syncing: None,
            checkpointing: None,
            hashes: Vec::new(),
            reads: 0,
            pin: None,
            session: None,
            session_id: 0,
            seq_base: 1,
            poisoned: false,
            frozen: None,
            consistent: None,
            now_ms: 1_000_000,
            open,
            stale_point_write: None,
        }
    }

    fn cfg(&self) -> &Config {
        &self.setup.cfg
    }

    fn live_bytes(&self) -> u64 {
        self.live.iter().map(|r| r.rec.journal_bytes).sum()
    }

    fn record(&self, lsn: Lsn) -> Option<&Record> {
        self.live.iter().map(|r| &r.rec).find(|r| r.lsn == lsn)
    }

    /// The newest write held by the image through `lsn`.
    fn newest_write_through(&self, lsn: Lsn) -> (Seq, u64) {
        self.writes
            .range(..=lsn)
            .next_back()
            .map_or(self.volume_write_at_start, |(_, w)| *w)
    }

    /// Where the image reads byte `at` from, among live records up to `upto`.
    fn source_at(&self, at: u64, upto: Lsn) -> Source {
        for r in self.live.iter().rev().map(|r| &r.rec) {
            if r.lsn > upto || !r.kind.changes_data() {
                continue;
            }
            if r.range.offset <= at && at < r.range.offset + r.range.len {
                return match r.kind {
                    RecordKind::Write => Source::Record {
                        lsn: r.lsn,
                        skip: at - r.range.offset,
                    },
                    _ => Source::Zero,
                };
            }
        }
        Source::Volume
    }

    /// Check read sources against the live records (up to `upto`).
    fn check_sources(&self, range: ByteRange, sources: &[(ByteRange, Source)], upto: Lsn) {
        let mut at = range.offset;
        for (piece, src) in sources {
            assert_eq!(
                piece.offset, at,
                "sources of {range:?} leave a gap or overlap: {sources:?}"
            );
            assert!(piece.len > 0, "empty source piece: {sources:?}");
            let end = piece.offset + piece.len;
            // Every record boundary inside the piece starts a run to check.
            let mut cuts: BTreeSet<u64> = BTreeSet::new();
            cuts.insert(piece.offset);
            for r in self.live.iter().map(|r| &r.rec) {
                for x in [r.range.offset, r.range.offset + r.range.len] {
                    if piece.offset < x && x < end {
                        cuts.insert(x);
                    }
                }
            }
            for x in cuts {
                let want = self.source_at(x, upto);
                let got = match *src {
                    Source::Record { lsn, skip } => Source::Record {
                        lsn,
                        skip: skip + (x - piece.offset),
                    },
                    s => s,
                };
                assert_eq!(
                    got, want,
                    "byte {x} of {range:?} read from {got:?}, but its newest record says {want:?}"
                );
            }
            at = end;
        }
        assert_eq!(
            at,
            range.offset + range.len,
            "sources do not cover {range:?}"
        );
    }
}

/// What the model predicts for a frame.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    Refuse(&'static str),
    /// The engine is poisoned: nothing at all happens.
    Ignore,
}

fn fault_name(f: &Fault) -> &'static str {
    match f {
        Fault::OutOfOrder { .. } => "OutOfOrder",
        Fault::BeforeStart { .. } => "BeforeStart",
        Fault::StartBehind { .. } => "StartBehind",
        Fault::MarkerAhead { .. } => "MarkerAhead",
        Fault::OutOfRange { .. } => "OutOfRange",
        Fault::BadSeq { .. } => "BadSeq",
        Fault::BadHashCheck { .. } => "BadHashCheck",
        Fault::ResyncTooLarge { .. } => "ResyncTooLarge",
        Fault::JournalFullDuringResync { .. } => "JournalFullDuringResync",
        Fault::Io(_) => "Io",
    }
}

/// The range a HashCheck covers, by the protocol's rules (wire/msg.rs,
/// engine::secondary docs), written independently of the engine's helper.
fn hash_range(offset: u64, unit: u32, count: u32, size: u64) -> Option<ByteRange> {
    let unit = u64::from(unit);
    let count = u64::from(count);
    let ok = unit >= BLOCK
        && unit.is_power_of_two()
        && unit <= HASH_UNIT_MAX_BYTES
        && offset.is_multiple_of(BLOCK)
        && (1..=HASHES_MAX).contains(&count)
        && count * unit <= HASH_CHECK_MAX_BYTES
        && offset < size;
    if !ok {
        return None;
    }
    let len = (count * unit).min(size - offset);
    // Every unit but the last is whole: no hash for nothing.
    (len.div_ceil(unit) == count).then_some(ByteRange::new(offset, len))
}

struct Harness {
    e: SecondaryEngine<D>,
    m: Model,
    out: Out,
    /// A frame held while the journal has no room (the agent's `held`).
    held: Option<Frame>,
}

impl Harness {
    fn new(setup: Setup, volume_consistent: bool, open: Open) -> Harness {
        let e = SecondaryEngine::new(
            setup.cfg.clone(),
            Lsn::ZERO,
            Vec::new(),
            volume_consistent,
            Lsn::ZERO,
            (Seq::ZERO, 0),
        );
        let mut m = Model::new(setup, open);
        m.in_section = !volume_consistent;
        m.volume_mixed = !volume_consistent;
        m.volume_consistent = volume_consistent;
        let mut h = Harness {
            e,
            m,
            out: Vec::new(),
            held: None,
        };
        h.m.consistent = h.e.consistent_point();
        h.check_state();
        h
    }

    /// Predict what the engine must do with `f` (the protocol's rules).
    fn verdict(&self, f: &Frame) -> Verdict {
        let m = &self.m;
        if m.poisoned {
            return Verdict::Ignore;
        }
        let bad_seq = |s: u64| s == 0 || s > SEQ_MAX;
        let size = m.cfg().size_bytes;
        let data = |seq: u64, offset: u64, len: u64, payload: u64| {
            if bad_seq(seq) {
                return Verdict::Refuse("BadSeq");
            }
            let Some(s) = &m.session else {
                return Verdict::Refuse("BeforeStart");
            };
            if seq != s.expected_next {
                return Verdict::Refuse("OutOfOrder");
            }
            if len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
                return Verdict::Refuse("OutOfRange");
            }
            if m.live_bytes() + payload + OVERHEAD > m.cfg().journal_capacity_bytes {
                return Verdict::Refuse("JournalFullDuringResync");
            }
            Verdict::Accept
        };
        match *f {
            Frame::ResyncStart { seq, blocks, .. } => {
                if bad_seq(seq) {
                    return Verdict::Refuse("BadSeq");
                }
                if let Some(s) = &m.session
                    && seq < s.expected_next
                {
                    return Verdict::Refuse("StartBehind");
                }
                // What a section may use: the capacity less the room kept for
                // the largest frame, less 1/8 (62393a2: a larger announcement
                // let a resync be accepted that could never finish).
                let usable = m
                    .cfg()
                    .journal_capacity_bytes
                    .saturating_sub(m.cfg().frame_max_bytes + m.cfg().record_overhead_bytes * 4);
                if blocks > 0
                    && !m.in_section
                    && !m.cfg().allow_inconsistent
                    && u128::from(blocks) * u128::from(BLOCK) > u128::from(usable - usable / 8)
                {
                    return Verdict::Refuse("ResyncTooLarge");
                }
                Verdict::Accept
            }
            Frame::Write {
                seq, offset, len, ..
            } => data(seq, offset, len, len),
            Frame::Zeroes {
                seq, offset, len, ..
            }
            | Frame::Trim {
                seq, offset, len, ..
            } => data(seq, offset, len, 0),
            Frame::HashCheck {
                seq,
                offset,
                unit_bytes,
                count,
            } => {
                if bad_seq(seq) {
                    return Verdict::Refuse("BadSeq");
                }
                let Some(s) = &m.session else {
                    return Verdict::Refuse("BeforeStart");
                };
                if seq != s.expected_next {
                    return Verdict::Refuse("OutOfOrder");
                }
                match hash_range(offset, unit_bytes, count, size) {
                    None => Verdict::Refuse("BadHashCheck"),
                    Some(_) => Verdict::Accept,
                }
            }
            Frame::Flush { seq: through } | Frame::ResyncDone { through } => {
                let Some(s) = &m.session else {
                    return Verdict::Refuse("BeforeStart");
                };
                if through >= s.expected_next {
                    return Verdict::Refuse("MarkerAhead");
                }
                Verdict::Accept
            }
        }
    }

    /// The agent's `feed`: ask for room, then hand the frame over. Returns
    /// false when the frame is held (no room yet).
    fn frame(&mut self, f: Frame) -> bool {
        if self.m.open.stale_hash_done
            && self.m.session.is_none()
            && matches!(f, Frame::ResyncStart { .. })
        {
            // Steer around the open bug: the hash reads of ended sessions finish
            // before a new session starts.
            while !self.m.hashes.is_empty() && !self.m.poisoned {
                self.complete_hash(0, true, Vec::new());
            }
        }
        match self.e.room(&mut self.out) {
            Room::Free => {}
            Room::Wait => {
                trace(|| format!("room: wait, holding {f:?}"));
                self.process("room");
                self.held = Some(f);
                return false;
            }
            Room::Stuck => {
                trace(|| format!("room: stuck, {f:?} dropped"));
                let had_session = self.m.session.is_some() && !self.m.poisoned;
                let failed = self.out.iter().any(|a| {
                    matches!(
                        a,
                        SecondaryAction::Fail {
                            fault: Fault::JournalFullDuringResync { .. }
                        }
                    )
                });
                assert_eq!(
                    failed, had_session,
                    "a stuck journal must end the session (and only a live one)"
                );
                // A stuck journal holds only records that must stay: an open
                // section fills it (or nothing can be copied yet).
                self.process("room");
                return true;
            }
        }
        self.process("room");
        let verdict = self.verdict(&f);
        assert_ne!(
            verdict,
            Verdict::Refuse("JournalFullDuringResync"),
            "room() said a frame of the largest size fits, but {f:?} does not"
        );
        trace(|| format!("frame {f:?} (expect {verdict:?})"));
        let tail_before = self.m.tail;
        self.e.receive(incoming(&f), self.m.now_ms, &mut self.out);
        let fail = self.out.iter().find_map(|a| match a {
            SecondaryAction::Fail { fault } => Some(fault.clone()),
            _ => None,
        });
        match (&verdict, &fail) {
            (Verdict::Ignore, _) => {
                assert!(
                    self.out.is_empty(),
                    "a poisoned engine acted on {f:?}: {:?}",
                    self.out
                );
            }
            (Verdict::Accept, None) => {}
            (Verdict::Refuse(want), Some(got)) => {
                assert_eq!(
                    fault_name(got),
                    *want,
                    "{f:?} refused for the wrong reason: {got}"
                );
                assert_eq!(
                    self.out.len(),
                    1,
                    "a refused frame leaves nothing but its Fail: {:?}",
                    self.out
                );
            }
            (Verdict::Accept, Some(got)) => {
                panic!("{f:?} refused ({got}) although the protocol accepts it")
            }
            (Verdict::Refuse(want), None) => {
                panic!("{f:?} accepted although it must be refused ({want})")
            }
        }
        if fail.is_none() && verdict == Verdict::Accept {
            self.accept(&f, tail_before);
        }
        self.process("frame");
        true
    }

    /// Update the session model for an accepted frame (before its actions are checked).
    fn accept(&mut self, f: &Frame, tail_before: Lsn) {
        let m = &mut self.m;
        match *f {
            Frame::ResyncStart { seq, blocks, .. } => {
                let s = match &mut m.session {
                    None => {
                        m.session_id += 1;
                        m.session.insert(MSession {
                            expected_next: seq,
                            pending: BTreeMap::new(),
                            skipped: Vec::new(),
                            durable_sent: seq - 1,
                            done_wanted: None,
                        })
                    }
                    Some(s) => {
                        if seq > s.expected_next {
                            s.skipped.push((s.expected_next, seq));
                            s.expected_next = seq;
                        }
                        s
                    }
                };
                // Nothing to resend: an end marker, answered by SectionDone.
                if blocks == 0 {
                    s.done_wanted = Some((seq - 1, tail_before.next()));
                }
            }
            Frame::Write { seq, .. } | Frame::Zeroes { seq, .. } | Frame::Trim { seq, .. } => {
                let s = m.session.as_mut().expect("accepted");
                s.expected_next = seq + 1;
                s.pending.insert(seq, Pend::Record(tail_before.next()));
            }
            Frame::HashCheck { seq, .. } => {
                let s = m.session.as_mut().expect("accepted");
                s.expected_next = seq + 1;
                s.pending.insert(
                    seq,
                    Pend::Hash {
                        answered: false,
                        at: tail_before,
                        read: Lsn::ZERO,
                    },
                );
            }
            Frame::ResyncDone { through: seq } => {
                let lsn = if m.in_section {
                    tail_before.next()
                } else {
                    tail_before
                };
                m.session.as_mut().expect("accepted").done_wanted = Some((seq, lsn));
            }
            Frame::Flush { .. } => {}
        }
    }

    /// Check and record every action the engine just emitted.
    fn process(&mut self, ctx: &str) {
        let out = std::mem::take(&mut self.out);
        let mut last_append: Option<Record> = None;
        for a in out {
            trace(|| format!("  {ctx} -> {a:?}"));
            self.on_action(a, &mut last_append);
        }
        self.check_state();
    }

    fn on_action(&mut self, a: SecondaryAction<D>, last_append: &mut Option<Record>) {
        let poisoned = self.m.poisoned;
        match a {
            SecondaryAction::Append { record, data } => {
                assert!(!poisoned, "Append after the engine was poisoned");
                let m = &mut self.m;
                assert_eq!(
                    record.lsn,
                    m.tail.next(),
                    "Append LSNs are consecutive: {} after {}",
                    record.lsn,
                    m.tail
                );
                match record.kind {
                    RecordKind::SectionStart => m.in_section = true,
                    RecordKind::SectionEnd => m.in_section = false,
                    _ => {}
                }
                let in_section = m.in_section || record.kind == RecordKind::SectionStart;
                assert_eq!(
                    record.in_section, in_section,
                    "record {} section flag",
                    record.lsn
                );
                let payload = if record.kind == RecordKind::Write {
                    record.range.len
                } else {
                    0
                };
                assert_eq!(record.journal_bytes, payload + OVERHEAD);
                assert_eq!(
                    data.is_some(),
                    record.kind == RecordKind::Write,
                    "only a write carries a payload"
                );
                if let Some(d) = data {
                    assert_eq!(d, record.seq.0, "the payload of another frame appended");
                }
                if record.kind.changes_data() {
                    m.writes.insert(record.lsn, (record.seq, record.at_ms));
                } else {
                    assert_eq!(record.range.len, 0, "a marker covers no bytes");
                    if record.kind == RecordKind::Point {
                        assert!(!in_section, "a rollback point inside a section");
                    }
                }
                m.tail = record.lsn;
                m.live.push(MRec { rec: record });
                *last_append = Some(record);
            }
            SecondaryAction::SyncJournal { through } => {
                let m = &mut self.m;
                if m.frozen.is_some() {
                    assert!(
                        m.open.durable_after_failed_sync,
                        "a journal sync (through {through}) after a failed one"
                    );
                }
                assert!(m.syncing.is_none(), "two journal syncs at once");
                assert_eq!(through, m.tail, "a sync covers the tail");
                assert!(through > m.durable, "a sync of nothing new");
                m.syncing = Some(through);
            }
            SecondaryAction::Checkpoint {
                from,
                through,
                volume_consistent_after,
            } => {
                let m = &mut self.m;
                assert!(!poisoned, "a checkpoint after the engine was poisoned");
                assert!(m.checkpointing.is_none(), "two checkpoints at once");
                assert!(
                    m.hashes.is_empty() && m.reads == 0,
                    "a checkpoint while a comparison or read holds the records"
                );
                assert_eq!(
                    from,
                    m.applied.next(),
                    "a checkpoint starts at the oldest record"
                );
                assert!(through >= from, "an empty checkpoint");
                assert!(through <= m.durable, "a checkpoint of records not durable");
                if m.pin.is_some() && self.e.pin().is_none() {
                    // dr (issue 10): an inspection's pin yields when replication
                    // needs room (`room`): the engine dropped it to copy past it.
                    m.pin = None;
                }
                if let Some(p) = m.pin {
                    assert!(through <= p, "a checkpoint past the pin {p}");
                }
                if !m.setup.cfg.allow_inconsistent
                    && let Some((c, _, _)) = self.e.consistent_point()
                {
                    assert!(
                        through <= c,
                        "checkpoint through {through} passes the consistent point {c}"
                    );
                }
                let last = *m.record(through).expect("a live record");
                assert_eq!(volume_consistent_after, !last.in_section);
                if !volume_consistent_after {
                    // Recorded durably before the copy (agent::secondary), with
                    // how far the copy reaches.
                    m.volume_mixed = true;
                    m.mixed_through = m.mixed_through.max(through);
                }
                m.checkpointing = Some((from, through, volume_consistent_after));
            }
            SecondaryAction::StartHash {
                seq,
                range,
                unit_bytes,
                hashes,
                sources,
            } => {
                assert!(!poisoned);
                let m = &self.m;
                assert_eq!(hashes, seq.0, "the hashes of another frame");
                let s = m.session.as_ref().expect("a comparison within a session");
                let at = match s.pending.get(&seq.0) {
                    Some(&Pend::Hash {
                        answered: false,
                        at,
                        ..
                    }) => at,
                    _ => panic!("StartHash for seq {seq}, which is not a comparison just accepted"),
                };
                assert!(unit_bytes as u64 >= BLOCK);
                // The image as of the comparison's arrival: records appended
                // after it (later seqs) are not part of what the primary hashed,
                // however long a checkpoint delayed the read (e2e_verify).
                m.check_sources(range, &sources, at);
                let read = sources
                    .iter()
                    .filter_map(|(_, src)| match src {
                        Source::Record { lsn, .. } => Some(*lsn),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(Lsn::ZERO);
                let s = self.m.session.as_mut().expect("checked");
                s.pending.insert(
                    seq.0,
                    Pend::Hash {
                        answered: false,
                        at,
                        read,
                    },
                );
                self.m.hashes.push((self.m.session_id, seq.0));
            }
            SecondaryAction::SendApplied { seq } => {
                assert!(!poisoned, "Applied after the engine was poisoned");
                assert!(self.m.session.is_some(), "Applied without a session");
                let rec = last_append.expect("Applied follows its append");
                assert!(rec.kind.changes_data());
                assert_eq!(rec.seq, seq, "Applied {seq} for another frame's append");
            }
            SecondaryAction::SendDurable { through } => {
                assert!(!poisoned, "Durable after the engine was poisoned");
                let durable = self.m.durable;
                let s = self.m.session.as_mut().expect("Durable without a session");
                let through = through.0;
                assert!(
                    through > s.durable_sent,
                    "Durable went from {} to {through}",
                    s.durable_sent
                );
                assert!(
                    through < s.expected_next,
                    "Durable {through} before seq {} arrived",
                    s.expected_next
                );
                // Walk the seqs it covers, jumping over skipped ranges (they
                // may span billions of seqs).
                let mut seq = s.durable_sent + 1;
                while seq <= through {
                    if let Some(&(_, end)) = s.skipped.iter().find(|(a, b)| (*a..*b).contains(&seq))
                    {
                        seq = end;
                        continue;
                    }
                    match s.pending.get(&seq) {
                        Some(Pend::Record(lsn)) => assert!(
                            *lsn <= durable,
                            "Durable {through} covers seq {seq} whose record {lsn} is not durable (durable through {durable})"
                        ),
                        Some(Pend::Hash { answered, read, .. }) => {
                            assert!(
                                *answered,
                                "Durable {through} covers comparison {seq} not answered"
                            );
                            // Simulator seed 1373093 sync: a match against an
                            // unsynced record is no durable answer.
                            assert!(
                                *read <= durable,
                                "Durable {through} covers comparison {seq}, which read record {read}, not durable (durable through {durable})"
                            );
                        }
                        None => panic!("Durable {through} covers seq {seq}, never received"),
                    }
                    seq += 1;
                }
                s.durable_sent = through;
            }
            SecondaryAction::SendSectionDone { through } => {
                assert!(!poisoned, "SectionDone after the engine was poisoned");
                let durable = self.m.durable;
                let s = self
                    .m
                    .session
                    .as_mut()
                    .expect("SectionDone without a session");
                let (seq, lsn) = s
                    .done_wanted
                    .take()
                    .expect("SectionDone without a ResyncDone waiting for it");
                assert_eq!(through.0, seq, "SectionDone for another ResyncDone");
                assert!(
                    lsn <= durable,
                    "SectionDone {seq} before its record {lsn} is durable (durable through {durable})"
                );
                assert!(
                    s.durable_sent >= seq,
                    "SectionDone {seq} before Durable covered it ({})",
                    s.durable_sent
                );
            }
            SecondaryAction::SendHashReply { .. } => {
                unreachable!("checked in complete_hash")
            }
            SecondaryAction::MarkConsistent { through, at_ms } => {
                let m = &self.m;
                if m.frozen.is_some() {
                    assert!(
                        m.open.durable_after_failed_sync,
                        "MarkConsistent after a failed journal sync"
                    );
                }
                // The engine's state is as of the end of the call: with
                // resync-overflow = inconsistent a checkpoint started later in the
                // same call may already have given the point up.
                match self.e.consistent_point() {
                    Some(c) => assert_eq!(
                        (through, at_ms),
                        (c.0, c.2),
                        "MarkConsistent names another point"
                    ),
                    None => assert!(m.cfg().allow_inconsistent, "MarkConsistent without a point"),
                }
                // The agent records the node consistent, and the volume as it stands.
                self.m.volume_mixed = !self.m.volume_consistent;
                if !self.m.volume_mixed {
                    self.m.mixed_through = Lsn::ZERO;
                }
            }
            SecondaryAction::MarkSectionOpen => {
                let rec = last_append.expect("MarkSectionOpen follows its marker");
                assert_eq!(rec.kind, RecordKind::SectionStart);
            }
            SecondaryAction::Fail { fault } => {
                if let Fault::Io(_) = fault {
                    assert!(self.e.is_poisoned(), "an I/O failure poisons the engine");
                }
                if let Some(s) = self.m.session.take() {
                    self.m.seq_base = s.expected_next;
                }
            }
        }
    }

    /// Check the engine's state against the model (after every step).
    fn check_state(&mut self) {
        let e = &self.e;
        let m = &self.m;
        assert_eq!(e.tail(), m.tail, "tail");
        assert_eq!(e.applied(), m.applied, "applied");
        assert_eq!(e.durable(), m.durable, "durable");
        assert_eq!(e.live_bytes(), m.live_bytes(), "live bytes");
        assert_eq!(e.is_poisoned(), m.poisoned, "poisoned");
        assert_eq!(e.is_section_open(), m.in_section, "section open");
        assert_eq!(
            e.is_volume_consistent(),
            m.volume_consistent,
            "volume consistent"
        );
        assert!(
            e.records()
                .map(|r| r.lsn)
                .eq(m.live.iter().map(|r| r.rec.lsn))
        );
        let point = e.consistent_point();
        if let Some((lsn, seq, at_ms)) = point {
            assert!(
                lsn <= m.durable,
                "consistent point {lsn} not durable ({})",
                m.durable
            );
            // Steered around (Open::consistent_point_behind_checkpoint): a point
            // at or before what an inconsistent checkpoint copied over.
            let steered = m.open.consistent_point_behind_checkpoint
                && m.cfg().allow_inconsistent
                && (lsn < m.applied || (lsn == m.applied && !m.volume_consistent));
            assert!(
                lsn >= m.applied || steered,
                "consistent point {lsn} released"
            );
            if lsn == m.applied {
                assert!(
                    m.volume_consistent || steered,
                    "consistent point at a mixed volume"
                );
            } else if lsn > m.applied {
                let r = m
                    .record(lsn)
                    .expect("the consistent point's record is live");
                assert!(
                    !r.in_section,
                    "the consistent point {lsn} sits inside a section"
                );
            }
            let stale = m.stale_point_write == Some(lsn);
            assert!(
                steered || stale || (seq, at_ms) == m.newest_write_through(lsn),
                "the consistent point {lsn} reports another write: {:?}, not {:?}",
                (seq, at_ms),
                m.newest_write_through(lsn)
            );
        }
        if let Some(prev) = m.consistent
            && (point.is_some() || !m.cfg().allow_inconsistent)
        {
            // With resync-overflow = inconsistent a checkpoint past the point
            // gives it up; otherwise it never disappears.
            let now = point.expect("a consistent point never disappears");
            assert!(
                now.0 >= prev.0,
                "consistent point went back from {} to {}",
                prev.0,
                now.0
            );
        }
        if let Some((durable, frozen_point)) = m.frozen
            && !m.open.durable_after_failed_sync
        {
            assert_eq!(e.durable(), durable, "durable LSN moved after a failed I/O");
            assert_eq!(
                point, frozen_point,
                "consistent point moved after a failed I/O"
            );
        }
        if self.m.stale_point_write.is_some() && self.m.stale_point_write != point.map(|p| p.0) {
            self.m.stale_point_write = None;
        }
        self.m.consistent = point;
        self.check_points();
    }

    fn check_points(&self) {
        let points = self.e.points(64);
        let m = &self.m;
        let Some((c, _, _)) = self.e.consistent_point() else {
            assert!(points.is_empty());
            return;
        };
        let mut prev: Option<Lsn> = None;
        for p in &points {
            assert!(
                prev.is_none_or(|q| p.lsn > q),
                "points out of order: {points:?}"
            );
            prev = Some(p.lsn);
            assert!(
                p.lsn <= c && p.lsn >= m.applied,
                "point {p:?} outside [applied, consistent]"
            );
            let later: u64 = m
                .live
                .iter()
                .filter(|r| r.rec.lsn > p.lsn)
                .map(|r| r.rec.journal_bytes)
                .sum();
            assert_eq!(p.later_bytes, later, "later bytes of {p:?}");
            if p.lsn == m.applied {
                assert!(m.volume_consistent, "a point at a mixed volume");
            } else {
                let r = m.record(p.lsn).expect("a point's record is live");
                assert!(!r.in_section, "point {p:?} inside a section");
                let newest = m
                    .live
                    .iter()
                    .rev()
                    .map(|r| &r.rec)
                    .find(|r| r.lsn <= p.lsn && r.kind.changes_data())
                    .map(|r| (r.seq, r.at_ms));
                if let Some(w) = newest {
                    assert_eq!((p.seq, p.at_ms), w, "point {p:?} reports another write");
                }
            }
        }
    }

    fn journal_synced(&mut self, ok: bool) {
        let Some(through) = self.m.syncing.take() else {
            return;
        };
        trace(|| {
            format!(
                "journal sync through {through}: {}",
                if ok { "ok" } else { "EIO" }
            )
        });
        if ok {
            // A poisoned engine (any failed I/O) ignores a late success: the
            // failure may have dropped pages the sync covered.
            if !self.m.poisoned || self.m.open.durable_after_failed_sync {
                self.m.durable = through;
            }
            self.e.journal_synced(Ok(()), &mut self.out);
        } else {
            self.e
                .journal_synced(Err("EIO (fuzz)".into()), &mut self.out);
            self.poison();
            if self.m.frozen.is_none() {
                self.m.frozen = Some((self.m.durable, self.e.consistent_point()));
            }
        }
        self.process("sync");
    }

    fn checkpointed(&mut self, ok: bool) {
        let Some((_, through, after)) = self.m.checkpointing.take() else {
            return;
        };
        trace(|| {
            format!(
                "checkpoint through {through}: {}",
                if ok { "ok" } else { "EIO" }
            )
        });
        if ok {
            let m = &mut self.m;
            while m.live.first().is_some_and(|r| r.rec.lsn <= through) {
                let r = m.live.remove(0).rec;
                if r.kind.changes_data() {
                    m.volume_write = (r.seq, r.at_ms);
                }
            }
            m.applied = through;
            m.volume_consistent = after;
            if after {
                m.volume_mixed = false;
                m.mixed_through = Lsn::ZERO;
            }
            self.e.checkpointed(Ok(()), &mut self.out);
        } else {
            self.e.checkpointed(Err("EIO (fuzz)".into()), &mut self.out);
            self.poison();
        }
        self.process("checkpoint");
    }

    /// A failed I/O: the engine must be poisoned, and report it.
    fn poison(&mut self) {
        // Already poisoned: the engine ignores whatever a late completion says.
        assert!(
            self.m.poisoned
                || self.out.iter().any(|a| matches!(
                    a,
                    SecondaryAction::Fail {
                        fault: Fault::Io(_)
                    }
                )),
            "a failed I/O without Fail {{ Io }}: {:?}",
            self.out
        );
        self.m.poisoned = true;
    }

    fn complete_hash(&mut self, pick: u8, ok: bool, mismatched: Vec<u32>) {
        if self.m.hashes.is_empty() {
            return;
        }
        let i = usize::from(pick) % self.m.hashes.len();
        let (session, seq) = self.m.hashes.remove(i);
        trace(|| format!("hash {seq}: {}", if ok { "ok" } else { "EIO" }));
        if ok {
            self.e
                .hash_done(Seq(seq), Ok(mismatched.clone()), &mut self.out);
            let replies: Vec<_> = self
                .out
                .iter()
                .filter_map(|a| match a {
                    SecondaryAction::SendHashReply { seq, mismatched } => {
                        Some((seq.0, mismatched.clone()))
                    }
                    _ => None,
                })
                .collect();
            // Answered only within the session that asked (a comparison from an
            // earlier session is forgotten with it).
            let live = session == self.m.session_id
                && self
                    .m
                    .session
                    .as_ref()
                    .is_some_and(|s| s.pending.contains_key(&seq));
            if live {
                assert_eq!(
                    replies,
                    vec![(seq, mismatched)],
                    "the reply to comparison {seq}"
                );
                let s = self.m.session.as_mut().expect("live");
                let (at, read) = match s.pending.get(&seq) {
                    Some(&Pend::Hash { at, read, .. }) => (at, read),
                    other => panic!("comparison {seq} answered from {other:?}"),
                };
                s.pending.insert(
                    seq,
                    Pend::Hash {
                        answered: true,
                        at,
                        read,
                    },
                );
            } else {
                assert!(
                    replies.is_empty(),
                    "a reply without its session: {replies:?}"
                );
            }
            self.out
                .retain(|a| !matches!(a, SecondaryAction::SendHashReply { .. }));
        } else {
            self.e
                .hash_done(Seq(seq), Err("EIO (fuzz)".into()), &mut self.out);
            self.poison();
        }
        self.process("hash");
    }

    fn tick(&mut self, now_ms: u64) {
        trace(|| format!("tick {now_ms}"));
        self.m.now_ms = self.m.now_ms.max(now_ms);
        self.e.tick(now_ms, &mut self.out);
        self.process("tick");
    }

    fn session_ended(&mut self) {
        trace(|| "session ended".into());
        if let Some(s) = self.m.session.take() {
            self.m.seq_base = s.expected_next;
        }
        self.held = None;
        self.e.session_ended(&mut self.out);
        self.process("session end");
    }

    fn begin_read(&mut self, range: ByteRange) {
        // No consistent image at all (a first copy, or a section end that never
        // became durable): nothing to read. Outside a section every record is
        // part of it.
        let view = self.e.consistent_point().map(|c| {
            if self.m.in_section {
                c.0
            } else {
                Lsn(u64::MAX)
            }
        });
        let sources = self.e.begin_consistent_read(range);
        trace(|| format!("consistent read {range:?}: {sources:?}"));
        match (sources, view) {
            (None, None) => {}
            (Some(s), Some(upto)) => {
                self.m.check_sources(range, &s, upto);
                self.m.reads += 1;
            }
            (s, v) => panic!("consistent read {s:?} with consistent point {v:?}"),
        }
    }

    fn end_read(&mut self) {
        if self.m.reads == 0 {
            return;
        }
        self.m.reads -= 1;
        self.e.end_read(&mut self.out);
        self.process("read end");
    }

    /// A node crash (power loss): the journal keeps its synced records and
    /// `extra` of the others; I/O in flight is lost; the node restarts.
    fn crash(&mut self, extra: u8) {
        let m = &self.m;
        let keep = m.durable.0 + u64::from(extra) % (m.tail.0 - m.durable.0 + 1);
        let records: Vec<Record> = m
            .live
            .iter()
            .map(|r| r.rec)
            .filter(|r| r.lsn.0 <= keep)
            .collect();
        trace(|| format!("crash: restart with records {}..={keep}", m.applied.next()));
        let before = self.e.consistent_point();
        let e = SecondaryEngine::new(
            m.setup.cfg.clone(),
            m.applied,
            records.clone(),
            !m.volume_mixed,
            m.mixed_through,
            m.volume_write,
        );
        let mixed_through = if m.volume_mixed {
            m.mixed_through
        } else {
            Lsn::ZERO
        };
        let mut model = Model::new(m.setup.clone(), m.open);
        model.applied = m.applied;
        model.durable = Lsn(keep.max(m.applied.0));
        model.tail = model.durable;
        model.volume_mixed = m.volume_mixed;
        model.mixed_through = m.mixed_through;
        model.volume_consistent = !m.volume_mixed;
        model.session_id = m.session_id;
        model.volume_write = m.volume_write;
        model.volume_write_at_start = m.volume_write;
        model.seq_base = m.session.as_ref().map_or(m.seq_base, |s| s.expected_next);
        model.now_ms = m.now_ms;
        model.in_section = m.volume_mixed;
        for r in &records {
            match r.kind {
                RecordKind::SectionStart => model.in_section = true,
                RecordKind::SectionEnd => model.in_section = false,
                _ => {}
            }
            if r.kind.changes_data() {
                model.writes.insert(r.lsn, (r.seq, r.at_ms));
            }
            // The volume may hold pieces of every record a cut checkpoint covered:
            // no image before the newest of them is consistent.
            let mut rec = *r;
            rec.in_section =
                model.in_section || r.kind == RecordKind::SectionStart || r.lsn <= mixed_through;
            model.live.push(MRec { rec });
        }
        self.e = e;
        self.m = model;
        self.held = None;
        let after = self.e.consistent_point();
        // An inconsistent resync may give up the consistent image (allowed by
        // the resource file); otherwise it survives.
        if let Some(b) = before
            && !self.m.open.durable_after_failed_sync
            && !self.m.setup.cfg.allow_inconsistent
        {
            let a = after.expect("a durable consistent point survives a crash");
            assert!(
                a.0 >= b.0,
                "a crash took the consistent point back from {} to {}",
                b.0,
                a.0
            );
        }
        if let Some(a) = after {
            assert!(
                !self.m.volume_mixed || a.0 > self.m.mixed_through,
                "a consistent point at {} on a volume that may hold pieces of records through {}",
                a.0,
                self.m.mixed_through
            );
        }
        self.m.consistent = after;
        self.check_state();
    }

    /// Promotion or rollback on an idle node without a session: drop the records
    /// after a listed point (or the consistent point).
    fn truncate(&mut self, which: u8) {
        if self.m.session.is_some() || !self.e.is_idle() || self.m.poisoned {
            return;
        }
        let points = self.e.points(8);
        if points.is_empty() {
            return;
        }
        let p = points[usize::from(which) % points.len()];
        self.truncate_to(p.lsn);
    }

    fn truncate_to(&mut self, lsn: Lsn) {
        if lsn < self.m.applied {
            return;
        }
        trace(|| format!("truncate after {lsn}"));
        if self.m.open.truncate_keeps_consistent_write && lsn == self.m.applied {
            self.m.stale_point_write = Some(lsn);
        }
        let dropped = self.e.truncate_after(lsn);
        let m = &mut self.m;
        let mut expected = Vec::new();
        while m.live.last().is_some_and(|r| r.rec.lsn > lsn) {
            let r = m.live.pop().expect("checked").rec;
            if r.kind.changes_data() {
                expected.push(r.range);
            }
            m.writes.remove(&r.lsn);
        }
        assert_eq!(dropped, expected, "truncation reports what it dropped");
        m.tail = lsn;
        m.durable = lsn.max(m.applied);
        m.in_section = !m.volume_consistent;
        for r in m.live.iter().map(|r| r.rec) {
            match r.kind {
                RecordKind::SectionStart => m.in_section = true,
                RecordKind::SectionEnd => m.in_section = false,
                _ => {}
            }
        }
        assert!(
            !m.in_section,
            "a truncation to a consistent point leaves a section open"
        );
        let c = self
            .e
            .consistent_point()
            .expect("truncated to a consistent point");
        assert_eq!(
            c.0, lsn,
            "the consistent point is where the image was truncated"
        );
        m.consistent = Some(c);
        self.check_state();
    }

    fn checkpoint_all(&mut self) {
        if self.m.open.checkpoint_all_when_poisoned && self.m.poisoned {
            return;
        }
        trace(|| "checkpoint_all".into());
        self.e.checkpoint_all(&mut self.out);
        self.process("checkpoint_all");
    }

    fn set_pin(&mut self, pin: Option<Lsn>) {
        trace(|| format!("pin {pin:?}"));
        self.m.pin = pin;
        self.e.set_pin(pin);
    }

    /// Deliver everything successfully until nothing is left, then check what
    /// must have happened.
    fn drain(&mut self) {
        if self.m.poisoned {
            return;
        }
        self.set_pin(None);
        while self.m.reads > 0 {
            self.end_read();
        }
        for round in 0..10_000 {
            if let Some(f) = self.held.take()
                && !self.frame(f)
            {
                // Still held: completions below make room.
            }
            if !self.m.hashes.is_empty() {
                self.complete_hash(0, true, Vec::new());
            } else if self.m.syncing.is_some() {
                self.journal_synced(true);
            } else if self.m.checkpointing.is_some() {
                self.checkpointed(true);
            } else if self.held.is_none() {
                self.tick(self.m.now_ms + 10);
                if self.m.syncing.is_none() && self.m.checkpointing.is_none() {
                    break;
                }
            }
            assert!(round < 9_999, "the engine never settles");
            if self.m.poisoned {
                return;
            }
        }
        let m = &self.m;
        assert_eq!(
            m.durable, m.tail,
            "everything appended is durable once idle"
        );
        if let Some(s) = &m.session {
            assert_eq!(
                s.durable_sent,
                s.expected_next - 1,
                "every frame received is acknowledged durable once idle"
            );
            assert_eq!(
                s.done_wanted, None,
                "every ResyncDone is answered by SectionDone once idle"
            );
        }
        // A promotion: the session ends, everything copyable is copied, the
        // image goes back to the consistent point.
        self.session_ended();
        while self.m.syncing.is_some() {
            self.journal_synced(true);
        }
        for _ in 0..10_000 {
            if self.m.checkpointing.is_some() {
                self.checkpointed(true);
            } else if !self.e.checkpoint_all(&mut self.out) {
                self.process("checkpoint_all");
                break;
            } else {
                self.process("checkpoint_all");
            }
        }
        if self.m.poisoned || !self.e.is_idle() {
            return;
        }
        let c = self.e.consistent_point().map(|c| c.0);
        let limit = match c {
            Some(c) if !self.m.setup.cfg.allow_inconsistent => c.min(self.m.durable),
            _ => self.m.durable,
        };
        assert_eq!(
            self.m.applied, limit,
            "checkpoint_all copies everything it may (consistent point {c:?})"
        );
        if let Some(c) = c
            && c >= self.m.applied
        {
            self.truncate_to(c);
        }
    }
}

fn setup(input: &mut Input) -> Option<(Setup, bool)> {
    let a = input.u8()?;
    let b = input.u8()?;
    let size = match a >> 6 {
        0 => 1 << 20,
        1 => 64 << 20,
        2 => 64 << 30,
        _ => 16 << 40,
    };
    let capacity: u64 = match a & 3 {
        0 => 256 << 10,
        1 => 1 << 20,
        2 => 16 << 20,
        _ => 1 << 30,
    };
    let mut cfg = Config::new(size, BLOCK as u32, capacity);
    cfg.record_overhead_bytes = OVERHEAD;
    cfg.allow_inconsistent = a & 4 != 0;
    if a & 0x10 != 0 {
        cfg.rollback_window_bytes = capacity / 8;
        cfg.rollback_window_ms = 1000;
    }
    cfg.sync_threshold_bytes = if a & 0x20 != 0 { 4096 } else { capacity / 4 };
    cfg.checkpoint_batch_bytes = if b & 1 != 0 { 16 << 10 } else { capacity };
    // The largest frame the primary may send, scaled with the journal (the
    // agent's is the wire's payload limit, 32 MiB, with a journal far larger).
    cfg.frame_max_bytes = (capacity / 8).min(tandem::wire::PAYLOAD_MAX_BYTES as u64);
    Some((Setup { cfg }, a & 8 == 0))
}

/// A seq relative to `base`: mostly `base` itself, sometimes a little off.
fn rel_seq(base: u64, d: u8) -> u64 {
    if d < 0xc0 {
        base
    } else {
        base.saturating_add_signed(i64::from(d) - 0xe0)
    }
}

/// Decode one frame; `None` when the input ends.
fn decode_frame(input: &mut Input, op: u8, h: &Harness) -> Option<Frame> {
    let flags = op >> 4;
    let expected =
        h.m.session
            .as_ref()
            .map_or(h.m.seq_base, |s| s.expected_next);
    let size = h.m.cfg().size_bytes;
    let frame_max = h.m.cfg().frame_max_bytes;
    let at_ms = h.m.now_ms.saturating_sub(u64::from(flags & 8) * 100);
    let offset = |v: u16, flags: u8| {
        let v = u64::from(v);
        match flags & 6 {
            0 => v * BLOCK,
            2 => v * 512,
            4 => size.wrapping_sub(v * BLOCK),
            _ => v << 20,
        }
    };
    Some(match op & 0x0f {
        0 => {
            let seq = rel_seq(expected, input.u8()?);
            let off = offset(input.u16()?, flags);
            let len = ((u64::from(input.u8()?) + 1) * 512).min(frame_max);
            Frame::Write {
                seq,
                offset: off,
                len,
                fua: flags & 1 != 0,
                at_ms,
            }
        }
        1 | 2 => {
            let seq = rel_seq(expected, input.u8()?);
            let off = offset(input.u16()?, flags);
            let l = u64::from(input.u16()?);
            let len = if flags & 8 != 0 { l << 20 } else { l * BLOCK };
            if op & 0x0f == 1 {
                Frame::Zeroes {
                    seq,
                    offset: off,
                    len,
                    fua: flags & 1 != 0,
                    at_ms,
                }
            } else {
                Frame::Trim {
                    seq,
                    offset: off,
                    len,
                    at_ms,
                }
            }
        }
        3 => Frame::Flush {
            seq: rel_seq(expected.saturating_sub(1), input.u8()?),
        },
        4 => {
            let seq = rel_seq(expected, input.u8()?);
            let b = u64::from(input.u8()?);
            let blocks = match flags & 6 {
                0 => b % 4,
                2 => b,
                4 => b << 12,
                _ => u64::MAX >> (b % 64),
            };
            Frame::ResyncStart {
                seq,
                blocks,
                full: flags & 1 != 0,
            }
        }
        5 => Frame::ResyncDone {
            through: rel_seq(expected.saturating_sub(1), input.u8()?),
        },
        6 => {
            let seq = rel_seq(expected, input.u8()?);
            let off = offset(input.u16()?, flags & 6);
            let shift = input.u8()?;
            let unit_bytes = if flags & 1 != 0 {
                1u32.checked_shl(u32::from(shift % 32)).unwrap_or(0)
            } else {
                (BLOCK as u32) << (shift % 9)
            };
            let count = u32::from(input.u16()?) % 1100;
            Frame::HashCheck {
                seq,
                offset: off,
                unit_bytes,
                count,
            }
        }
        _ => {
            // Hostile: raw values.
            let kind = input.u8()?;
            let raw = |input: &mut Input| -> Option<u64> {
                Some(u64::from_le_bytes(input.take(8)?.try_into().ok()?))
            };
            let seq = raw(input)?;
            let a = raw(input)?;
            let b = raw(input)?;
            match kind % 7 {
                0 => Frame::Write {
                    seq,
                    offset: a,
                    len: b.min(frame_max),
                    fua: false,
                    at_ms: b,
                },
                1 => Frame::Zeroes {
                    seq,
                    offset: a,
                    len: b,
                    fua: true,
                    at_ms: a,
                },
                2 => Frame::Trim {
                    seq,
                    offset: a,
                    len: b,
                    at_ms: 0,
                },
                3 => Frame::Flush { seq },
                4 => Frame::ResyncStart {
                    seq,
                    blocks: a,
                    full: b & 1 != 0,
                },
                5 => Frame::ResyncDone { through: seq },
                _ => Frame::HashCheck {
                    seq,
                    offset: a,
                    unit_bytes: b as u32,
                    count: (b >> 32) as u32,
                },
            }
        }
    })
}

/// The fuzz target (open bugs not reported).
pub fn run(data: &[u8]) {
    run_checked(data, OPEN);
}

/// Every check, open bugs included (for the regression tests).
pub fn run_strict(data: &[u8]) {
    run_checked(data, Open::default());
}

fn run_checked(data: &[u8], open: Open) {
    let mut input = Input(data);
    let Some((setup, volume_consistent)) = setup(&mut input) else {
        return;
    };
    trace(|| {
        format!(
            "setup {:?}, volume consistent {volume_consistent}",
            setup.cfg
        )
    });
    let mut h = Harness::new(setup, volume_consistent, open);
    for _ in 0..OPS_MAX {
        let Some(op) = input.u8() else { break };
        let flags = op >> 4;
        match op & 0x0f {
            0..=6 | 15 => {
                if let Some(f) = h.held.take() {
                    // The held frame goes first (the reader waits meanwhile).
                    h.frame(f);
                    continue;
                }
                let Some(f) = decode_frame(&mut input, op, &h) else {
                    break;
                };
                if open.resync_blocks_overflow
                    && matches!(f, Frame::ResyncStart { blocks, .. } if blocks.checked_mul(BLOCK).is_none())
                {
                    continue;
                }
                h.frame(f);
            }
            7 => h.journal_synced(flags & 1 == 0),
            8 => h.checkpointed(flags & 1 == 0),
            9 => {
                let Some(pick) = input.u8() else { break };
                let n = usize::from(flags & 3);
                let mismatched: Vec<u32> = (0..n).map(|i| u32::from(pick) >> i).collect();
                h.complete_hash(pick, flags & 4 == 0, mismatched);
            }
            10 => {
                let Some(dt) = input.u8() else { break };
                let now = match flags & 3 {
                    0 => h.m.now_ms + u64::from(dt) * 16,
                    1 => h.m.now_ms + 2 * 3_600_000,
                    2 => h.m.now_ms.saturating_sub(u64::from(dt) * 1000),
                    _ => h.m.now_ms + (u64::from(dt) << 32),
                };
                h.tick(now);
            }
            11 => h.session_ended(),
            12 => {
                let Some(x) = input.u8() else { break };
                if flags & 1 != 0 {
                    h.crash(x);
                } else {
                    h.truncate(x);
                }
            }
            13 => {
                if flags & 1 != 0 {
                    h.checkpoint_all();
                } else if flags & 2 != 0 {
                    let pin = (flags & 4 != 0).then(|| {
                        h.e.consistent_point()
                            .map_or(h.m.applied, |c| c.0)
                            .max(h.m.applied)
                    });
                    h.set_pin(pin);
                } else {
                    h.end_read();
                }
            }
            _ => {
                let (Some(off), Some(len)) = (input.u16(), input.u16()) else {
                    break;
                };
                let size = h.m.cfg().size_bytes;
                let offset = (u64::from(off) * BLOCK).min(size - BLOCK);
                let len = (u64::from(len) * 512 + 1).min(size - offset);
                h.begin_read(ByteRange::new(offset, len));
            }
        }
    }
    h.drain();
}

/// Encode a recorded frame as `run` reads it (for seeds cut from real traffic),
/// relative to `expected` (the next seq the secondary expects). `None` for
/// frames the compact encoding cannot express (they go in as hostile frames).
pub fn encode_frame(f: &Frame, expected: u64) -> Vec<u8> {
    let rel = |seq: u64, base: u64| -> Option<u8> {
        if seq == base {
            Some(0)
        } else {
            let d = i64::try_from(seq).ok()? - i64::try_from(base).ok()?;
            (-32..32).contains(&d).then(|| (d + 0xe0) as u8)
        }
    };
    let u16_of = |v: u64, unit: u64| -> Option<[u8; 2]> {
        v.is_multiple_of(unit).then_some(())?;
        Some(u16::try_from(v / unit).ok()?.to_le_bytes())
    };
    let compact = || -> Option<Vec<u8>> {
        Some(match *f {
            Frame::Write {
                seq,
                offset,
                len,
                fua,
                ..
            } => {
                let mut v = vec![u8::from(fua) << 4, rel(seq, expected)?];
                v.extend(u16_of(offset, BLOCK)?);
                v.push(u8::try_from(len.div_ceil(512).checked_sub(1)?).ok()?);
                v
            }
            Frame::Zeroes {
                seq,
                offset,
                len,
                fua,
                ..
            } => {
                let mut v = vec![1 | u8::from(fua) << 4, rel(seq, expected)?];
                v.extend(u16_of(offset, BLOCK)?);
                v.extend(u16_of(len, BLOCK)?);
                v
            }
            Frame::Trim {
                seq, offset, len, ..
            } => {
                let mut v = vec![2, rel(seq, expected)?];
                v.extend(u16_of(offset, BLOCK)?);
                v.extend(u16_of(len, BLOCK)?);
                v
            }
            Frame::Flush { seq } => vec![3, rel(seq, expected.checked_sub(1)?)?],
            Frame::ResyncStart { seq, blocks, full } => {
                let b = u8::try_from(blocks).ok()?;
                vec![4 | 2 << 4 | u8::from(full) << 4, rel(seq, expected)?, b]
            }
            Frame::ResyncDone { through } => vec![5, rel(through, expected.checked_sub(1)?)?],
            Frame::HashCheck {
                seq,
                offset,
                unit_bytes,
                count,
            } => {
                let shift = (unit_bytes / BLOCK as u32).trailing_zeros() as u8;
                (unit_bytes == (BLOCK as u32) << shift).then_some(())?;
                let mut v = vec![6, rel(seq, expected)?];
                v.extend(u16_of(offset, BLOCK)?);
                v.push(shift);
                v.extend(u16::try_from(count).ok()?.to_le_bytes());
                v
            }
        })
    };
    if let Some(v) = compact() {
        return v;
    }
    let (kind, seq, a, b) = match *f {
        Frame::Write {
            seq, offset, len, ..
        } => (0, seq, offset, len),
        Frame::Zeroes {
            seq, offset, len, ..
        } => (1, seq, offset, len),
        Frame::Trim {
            seq, offset, len, ..
        } => (2, seq, offset, len),
        Frame::Flush { seq } => (3, seq, 0, 0),
        Frame::ResyncStart { seq, blocks, full } => (4, seq, blocks, u64::from(full)),
        Frame::ResyncDone { through } => (5, through, 0, 0),
        Frame::HashCheck {
            seq,
            offset,
            unit_bytes,
            count,
        } => (
            6,
            seq,
            offset,
            u64::from(unit_bytes) | u64::from(count) << 32,
        ),
    };
    let mut v = vec![15, kind];
    for x in [seq, a, b] {
        v.extend(x.to_le_bytes());
    }
    v
}

/// The frame the secondary acts on for a decoded wire frame (None for the
/// others: handshake, acks, heartbeats, Goodbye).
pub fn frame_of(seq: u64, msg: &tandem::wire::Message, payload_len: u64) -> Option<Frame> {
    use tandem::wire::Message;
    Some(match *msg {
        Message::ResyncStart { blocks, full } => Frame::ResyncStart { seq, blocks, full },
        Message::Write { offset, fua, at_ms } => Frame::Write {
            seq,
            offset,
            len: payload_len,
            fua,
            at_ms,
        },
        Message::WriteZeroes {
            offset,
            len,
            fua,
            at_ms,
        } => Frame::Zeroes {
            seq,
            offset,
            len,
            fua,
            at_ms,
        },
        Message::Trim { offset, len, at_ms } => Frame::Trim {
            seq,
            offset,
            len,
            at_ms,
        },
        Message::Flush => Frame::Flush { seq },
        Message::ResyncDone { through_seq } => Frame::ResyncDone {
            through: through_seq,
        },
        Message::HashCheck {
            offset,
            block_size,
            ref hashes,
        } => Frame::HashCheck {
            seq,
            offset,
            unit_bytes: block_size,
            count: hashes.len() as u32,
        },
        _ => return None,
    })
}
