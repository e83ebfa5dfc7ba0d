//! The session with the secondary: frames in seq order, the replication window,
//! the ahead policy (G4), acknowledgements and the end of a session.
//!
//! **Window.** Every op in the stream whose payload is held in memory (a client
//! write, a resync chunk, a spilled write read back for shipping) holds its bytes
//! (payload bytes; payload-free frames count 0) and one write slot until the
//! secondary says `Durable`. In sync mode a full window only delays shipping
//! (clients wait for `Applied` anyway). In async mode a write that does not fit:
//! - goes to the **spill log** (VVR's SRL) while the log has room: the write keeps
//!   its seq in the stream, its payload is appended to a preallocated on-disk log
//!   (`Action::SpillAppend`) instead of being kept in memory, and it is read back
//!   (`Action::ReadSpill`) and shipped in order once the shipped part of the window
//!   has room. The secondary stays a prefix of this node's history (no section, its
//!   consistent point keeps advancing) through bursts larger than the window;
//! - goes **ahead** when the spill log is full (or there is none) and the secondary
//!   is a consistent copy (no resync section open): it and every later write are
//!   tracked in the bitmap only, until the window has drained to half and at least
//!   `ahead_min_ms` passed; then a resync pass sends what changed. When the
//!   secondary stages less than the whole volume (its Welcome), the bitmap is held
//!   within the **ahead budget**, half of what it stages (the other half is for
//!   the writes that join the pass's section): a request that would take the
//!   bitmap past it is parked, with every request after it, until the pass starts;
//! - is **held** otherwise (a section is open, i.e. the secondary is not a prefix
//!   of this node's history until the running resync ends): it joins the stream
//!   and its client waits until it is shipped. Going ahead again would extend the
//!   section with every burst and the secondary might never reach a consistent
//!   point under sustained load; holding bounds a section by one window's worth
//!   of throttled writes plus the dirty blocks it started with (issue 10).
//!
//! **Sections.** A section opens when the primary goes ahead or a resync of a
//! non-empty bitmap starts, and closes when the `ResyncDone` that ends it is
//! durable on the secondary.
//!
//! **Spill log and crashes (G3).** A spilled write pins its activity-log extents
//! like any write in the stream, until its spill record is durable
//! (`Action::SyncSpill`, one at a time, appends batched behind it); from then on
//! the spill log covers it instead: at the next start, the blocks of every record
//! still in the log are marked in the bitmap before anything else (agent/spill.rs).
//! Records are released (`Action::ReleaseSpill`, durable) once the secondary made
//! them durable. When the session ends, every write not yet durable there goes into
//! the dirty bitmap as usual; the log is emptied (`Action::ResetSpill`) only after a
//! bitmap persist covering those blocks is durable. Only a read-back or a log write
//! that fails ends the session (the blocks are resynced from the volume) and turns
//! the spill log off until the next start.
//!
//! **Episodes.** Entering and leaving the ahead state, the spill log and write
//! throttling are each reported once per episode, with figures ([`super::Note`]).

use std::collections::VecDeque;

use super::{
    Action, Completion, LocalStage, Mode, Note, OpKind, Outgoing, PrimaryEngine, SessionFault,
    ShipStage,
};
use crate::engine::rangeset::Coverage;
use crate::meta::journal::{RECORD_HEADER_LEN_BYTES, record_len_bytes};
use crate::types::{BlockCount, BlockIndex, ByteRange, Seq};

/// Where a new write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placement {
    InStream,
    /// In the stream, but its client waits until it is shipped.
    HeldForWindow,
    /// In the stream, its payload in the spill log until it is read back to ship.
    Spilled,
    Outside,
}

/// What an entry of the stream carries, for what its `Durable` (or the session's
/// end) means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Carried {
    /// A client write: holds an activity-log pin until durable.
    Client,
    /// Resync data: clears its dirty blocks once durable.
    Data,
    /// A resync comparison of `unit_blocks` per hash: clears the blocks that
    /// matched once durable.
    Compare { unit_blocks: u64 },
    /// An online verify chunk: changes nothing on the secondary.
    Verify,
}

#[derive(Debug)]
pub(super) struct Unacked<D> {
    pub(super) seq: Seq,
    pub(super) range: ByteRange,
    pub(super) carried: Carried,
    pub(super) at_ms: u64,
    /// Window bytes it holds.
    pub(super) wire_bytes: u64,
    pub(super) shipped: bool,
    /// For a resync chunk: ranges marked dirty after the chunk was read (writes not
    /// shipped while ahead, local errors), and for a comparison the blocks the
    /// secondary reported different. Its Durable must not clear them.
    pub(super) keep: Vec<ByteRange>,
    /// A client write still holds the activity-log pin that stands for its
    /// durability on the secondary (dropped at Durable, at the session's end, or
    /// once its spill record is durable).
    pub(super) remote_pin: bool,
    /// The write was spilled: its payload is in the spill log until read back.
    pub(super) spill: Option<Spilled<D>>,
    /// A hash check (`Carried::Compare`) whose reply came. The secondary holds
    /// its Durable back until it answered (engine::secondary `Pending::Hash`),
    /// so a Durable that covers an unanswered check is a protocol violation.
    pub(super) answered: bool,
}

impl<D> Unacked<D> {
    /// Its payload is held in memory (or being read back into it).
    fn in_memory(&self) -> bool {
        self.spill
            .as_ref()
            .is_none_or(|s| !matches!(s.state, SpillState::Unread))
    }
}

/// A spilled write's frame, rebuilt from its entry once its payload is back.
#[derive(Debug)]
pub(super) struct Spilled<D> {
    kind: OpKind,
    fua: bool,
    /// Bytes its record takes in the spill log.
    record_bytes: u64,
    state: SpillState<D>,
}

#[derive(Debug)]
enum SpillState<D> {
    /// Only in the spill log.
    Unread,
    /// A read-back is running.
    Reading,
    /// Back in memory (`None`: a payload-free op), waiting for the ship cursor.
    Loaded(Option<D>),
    Shipped,
}

/// Reads of the spill log in flight at most.
const SPILL_READS_MAX: u32 = 64;

/// The spill log as the engine accounts for it (the agent owns the file).
#[derive(Debug, Default)]
struct SpillLog {
    /// Record bytes it may hold (0: no spill log).
    capacity_bytes: u64,
    /// Record bytes and records appended and not yet released durably.
    live_bytes: u64,
    live_records: u64,
    /// Spilled seqs appended since the last sync was issued: their remote pins
    /// drop once a sync covers them.
    unsynced: Vec<Seq>,
    syncing: Option<Vec<Seq>>,
    /// Released on the secondary's Durable, not yet freed: (through, bytes, records).
    release_wanted: Option<(Seq, u64, u64)>,
    releasing: Option<(Seq, u64, u64)>,
    reset: Reset,
    /// Spilled entries before this seq have had their read-back issued.
    read_cursor: Seq,
    reads_in_flight: u32,
    /// A spill-log read or write failed: no more spilling until the next start.
    failed: bool,
    episode: Option<Episode>,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Reset {
    #[default]
    None,
    /// Empty the log once the bitmap persist with this number is durable (it covers
    /// every record's blocks).
    AfterPersist(u64),
    Running,
}

#[derive(Debug)]
struct Episode {
    since_ms: u64,
    writes: u64,
    bytes: u64,
    peak_bytes: u64,
}

/// Bytes a spilled op of `payload_bytes` takes in the spill log.
pub fn spill_record_bytes(payload_bytes: u64) -> u64 {
    record_len_bytes(payload_bytes)
}

#[derive(Debug)]
struct Ahead {
    /// Seqs from here on are not shipped.
    from: Seq,
    since_ms: u64,
    /// A request waited for the ahead budget in this episode (noted once).
    budget_full: bool,
}

pub(super) struct Stream<D> {
    streaming: bool,
    ahead: Option<Ahead>,
    /// The secondary is not a prefix of this node's history until the resync that
    /// is running (or pending) ends.
    section_open: bool,
    /// Writes are being held for room (noted once per episode).
    throttling: bool,
    stream_first: Seq,
    next_ship: Seq,
    /// In-stream ops not yet durable on the secondary, in seq order.
    /// Entries leave it only through [`Stream::pop_unacked`] and
    /// [`Stream::take_unacked`], which keep `unacked_cover` in step.
    pub(super) unacked: VecDeque<Unacked<D>>,
    /// The byte ranges of `unacked` that may differ on the secondary (every
    /// entry but a verify's comparison), indexed by offset: an activity-log
    /// retirement asks for the few over its pages instead of walking the window.
    unacked_cover: Coverage,
    /// Bytes of `unacked` (the lag).
    unacked_bytes: u64,
    /// Bytes and writes of `unacked` whose payload is in memory (window occupancy).
    mem_bytes: u64,
    mem_writes: u64,
    /// Bytes and writes shipped and not yet durable.
    shipped_bytes: u64,
    shipped_writes: u64,
    /// Spilled entries read back (or being read) and not yet shipped.
    loading_bytes: u64,
    loading_writes: u64,
    spill: SpillLog,
    durable_through: Seq,
    /// Flush markers waiting for the ship cursor to pass them.
    pub(super) flush_markers: VecDeque<Seq>,
    /// The ResyncDone shipped whose section is not closed yet.
    pub(super) done_marker: Option<Seq>,
    /// The newest `SectionDone` of this session: the secondary recorded durably
    /// that it holds this node's image through it (a section closes on it, not
    /// on a `Durable` of the same seq).
    pub(super) section_done: Option<Seq>,
    /// A session waits for a bitmap persist before its first frame: (full, the
    /// persist number it needs).
    pub(super) gate: Option<(bool, u64)>,
    /// The largest resync the secondary stages while keeping its consistent
    /// image (its Welcome); `u64::MAX` = any.
    peer_stage_bytes: u64,
    /// Journal bytes (record headers included) of the client ops that joined
    /// the open section: the secondary holds them, with the resync, until the
    /// section ends.
    section_joined_bytes: u64,
    /// A request waited for the section to end in this section (noted once).
    section_full_noted: bool,
}

impl<D> Stream<D> {
    pub(super) fn new(first_seq: Seq, spill_bytes_max: u64) -> Stream<D> {
        Stream {
            streaming: false,
            ahead: None,
            section_open: false,
            throttling: false,
            stream_first: first_seq,
            next_ship: first_seq,
            unacked: VecDeque::new(),
            unacked_cover: Coverage::new(),
            unacked_bytes: 0,
            mem_bytes: 0,
            mem_writes: 0,
            shipped_bytes: 0,
            shipped_writes: 0,
            loading_bytes: 0,
            loading_writes: 0,
            spill: SpillLog {
                capacity_bytes: spill_bytes_max,
                read_cursor: first_seq,
                ..SpillLog::default()
            },
            durable_through: Seq::ZERO,
            flush_markers: VecDeque::new(),
            done_marker: None,
            section_done: None,
            gate: None,
            peer_stage_bytes: u64::MAX,
            section_joined_bytes: 0,
            section_full_noted: false,
        }
    }

    pub(super) fn is_streaming(&self) -> bool {
        self.streaming
    }
    pub(super) fn next_ship(&self) -> Seq {
        self.next_ship
    }
    pub(super) fn durable_through(&self) -> Seq {
        self.durable_through
    }
    pub(super) fn is_section_open(&self) -> bool {
        self.section_open
    }
    pub(super) fn unacked_totals(&self) -> (u64, u64) {
        (self.unacked.len() as u64, self.unacked_bytes)
    }
    pub(super) fn oldest_unacked_at_ms(&self) -> Option<u64> {
        self.unacked.front().map(|u| u.at_ms)
    }

    pub(super) fn enqueue(
        &mut self,
        seq: Seq,
        range: ByteRange,
        at_ms: u64,
        resync: bool,
        wire_bytes: u64,
    ) {
        debug_assert!(!resync);
        self.enqueue_carried(seq, range, at_ms, Carried::Client, wire_bytes);
    }

    pub(super) fn enqueue_carried(
        &mut self,
        seq: Seq,
        range: ByteRange,
        at_ms: u64,
        carried: Carried,
        wire_bytes: u64,
    ) {
        assert!(self.streaming, "enqueue while not streaming");
        assert!(self.unacked.back().is_none_or(|u| u.seq < seq));
        if carried != Carried::Verify {
            self.unacked_cover.add(range.offset, range.end());
        }
        self.unacked.push_back(Unacked {
            seq,
            range,
            carried,
            at_ms,
            wire_bytes,
            shipped: false,
            keep: Vec::new(),
            remote_pin: carried == Carried::Client,
            spill: None,
            answered: false,
        });
        self.unacked_bytes += wire_bytes;
        self.mem_bytes += wire_bytes;
        self.mem_writes += 1;
    }

    /// A client op that goes to the spill log (see the module docs).
    #[allow(clippy::too_many_arguments)]
    fn enqueue_spilled(
        &mut self,
        seq: Seq,
        range: ByteRange,
        at_ms: u64,
        kind: OpKind,
        fua: bool,
        wire_bytes: u64,
        record_bytes: u64,
    ) {
        assert!(self.streaming, "spill while not streaming");
        assert!(self.unacked.back().is_none_or(|u| u.seq < seq));
        self.unacked_cover.add(range.offset, range.end());
        self.unacked.push_back(Unacked {
            seq,
            range,
            carried: Carried::Client,
            at_ms,
            wire_bytes,
            shipped: false,
            keep: Vec::new(),
            remote_pin: true,
            answered: false,
            spill: Some(Spilled {
                kind,
                fua,
                record_bytes,
                state: SpillState::Unread,
            }),
        });
        self.unacked_bytes += wire_bytes;
        self.spill.live_bytes += record_bytes;
        self.spill.live_records += 1;
        self.spill.unsynced.push(seq);
    }

    /// Whether a new op could go to the spill log now.
    fn spill_room(&self, record_bytes: u64) -> bool {
        let s = &self.spill;
        s.capacity_bytes > 0
            && !s.failed
            && s.reset == Reset::None
            && s.live_bytes + record_bytes <= s.capacity_bytes
    }

    /// Spill-log figures: (live record bytes, live records, capacity).
    pub(super) fn spill_usage(&self) -> (u64, u64, u64) {
        (
            self.spill.live_bytes,
            self.spill.live_records,
            self.spill.capacity_bytes,
        )
    }

    fn index_of(&self, seq: Seq) -> Option<usize> {
        self.unacked.binary_search_by_key(&seq, |u| u.seq).ok()
    }

    pub(super) fn open_section(&mut self) {
        if !self.section_open {
            self.new_section();
        }
        self.section_open = true;
    }

    pub(super) fn close_section(&mut self) {
        self.section_open = false;
        self.new_section();
    }

    /// Nothing has joined the section (about to open, or none open).
    fn new_section(&mut self) {
        self.section_joined_bytes = 0;
        self.section_full_noted = false;
    }

    /// The client ops in the stream not shipped yet join the section opening now.
    pub(super) fn join_unshipped(&mut self) {
        let bytes: u64 = self
            .unacked
            .iter()
            .filter(|u| !u.shipped && matches!(u.carried, Carried::Client))
            .map(|u| spill_record_bytes(u.wire_bytes))
            .sum();
        self.section_joined_bytes += bytes;
    }

    /// A client op of `wire_bytes` joins the open section (or the one a pass
    /// about to start opens).
    pub(super) fn join_section(&mut self, wire_bytes: u64) {
        self.section_joined_bytes += spill_record_bytes(wire_bytes);
    }

    /// Room in the window for another op of `wire_bytes` (resync chunks wait for it).
    pub(super) fn has_window_room(&self, cfg: &super::Config, wire_bytes: u64) -> bool {
        self.has_room(cfg, wire_bytes)
    }

    /// Every block of every write not yet durable on the secondary, range by
    /// range (scale, issue 11: a retirement persists only the bitmap pages of its
    /// extents).
    /// The blocks of every unacked entry but a verify's comparisons within
    /// blocks `[first, end)`, found by offset: O(log n + k) for the k pieces
    /// there (they may touch or share a block at their ends).
    pub(super) fn unacked_block_ranges_within(
        &self,
        first: BlockIndex,
        end: BlockIndex,
        block_size: u32,
    ) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        self.unacked_cover.blocks_within(first, end, block_size)
    }

    /// The oldest unacked entry, taken out of the window.
    pub(super) fn pop_unacked(&mut self) -> Option<Unacked<D>> {
        let u = self.unacked.pop_front()?;
        if u.carried != Carried::Verify {
            self.unacked_cover.remove(u.range.offset, u.range.end());
        }
        Some(u)
    }

    /// Every unacked entry, taken out of the window.
    pub(super) fn take_unacked(&mut self) -> Vec<Unacked<D>> {
        self.unacked_cover = Coverage::new();
        self.unacked.drain(..).collect()
    }

    /// A range was marked dirty outside the stream: resync chunks in flight over it
    /// must not clear it when durable.
    pub(super) fn keep_dirty(&mut self, range: ByteRange) {
        for u in self
            .unacked
            .iter_mut()
            .filter(|u| matches!(u.carried, Carried::Data | Carried::Compare { .. }))
            .filter(|u| u.range.overlaps(&range))
        {
            u.keep.push(range);
        }
    }

    fn has_room(&self, cfg: &super::Config, wire_bytes: u64) -> bool {
        self.mem_writes == 0
            || (self.mem_bytes + wire_bytes <= cfg.window_bytes_max
                && self.mem_writes < cfg.window_writes_max)
    }

    pub(super) fn assert_invariants(&self, next_seq: Seq) {
        // One pass over the window (the simulator and the fuzz targets call
        // this after every step).
        let mut prev = Seq::ZERO;
        let (mut unacked, mut mem, mut mem_writes, mut loading, mut loading_writes) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut shipped, mut shipped_writes, mut spilled) = (0u64, 0u64, 0u64);
        for u in &self.unacked {
            assert!(u.seq > prev, "unacked out of order");
            assert!(
                u.seq >= self.stream_first,
                "unacked from an earlier session"
            );
            prev = u.seq;
            assert!(self.streaming, "unacked writes while not streaming");
            assert_eq!(
                u.shipped,
                u.seq < self.next_ship,
                "shipped flag and cursor disagree"
            );
            unacked += u.wire_bytes;
            if u.in_memory() {
                mem += u.wire_bytes;
                mem_writes += 1;
            }
            if u.shipped {
                shipped += u.wire_bytes;
                shipped_writes += 1;
            }
            if let Some(s) = &u.spill {
                if matches!(s.state, SpillState::Reading | SpillState::Loaded(_)) {
                    loading += u.wire_bytes;
                    loading_writes += 1;
                }
                assert_eq!(
                    u.shipped,
                    matches!(s.state, SpillState::Shipped),
                    "a spilled entry ships from its loaded state"
                );
                if !matches!(s.state, SpillState::Unread) && u.seq >= self.spill.read_cursor {
                    panic!("spilled seq {} read back beyond the read cursor", u.seq);
                }
                spilled += s.record_bytes;
            }
        }
        assert_eq!(self.unacked_bytes, unacked);
        // The index against the window.
        assert!(
            self.unacked_cover.matches_cheaply(
                self.unacked
                    .iter()
                    .filter(|u| u.carried != Carried::Verify)
                    .map(|u| (u.range.offset, u.range.end())),
                64
            ),
            "unacked index out of step"
        );
        assert_eq!(self.mem_bytes, mem);
        assert_eq!(self.mem_writes, mem_writes);
        assert_eq!(self.loading_bytes, loading);
        assert_eq!(self.loading_writes, loading_writes);
        if self.spill.reset == Reset::None {
            assert!(
                spilled <= self.spill.live_bytes,
                "spilled entries beyond the live spill records"
            );
        }
        assert!(
            self.spill.live_bytes <= self.spill.capacity_bytes,
            "spill log over capacity"
        );
        assert_eq!(self.shipped_bytes, shipped);
        assert_eq!(self.shipped_writes, shipped_writes);
        assert!(self.next_ship <= next_seq);
        if self.ahead.is_some() {
            assert!(self.section_open, "ahead without an open section");
        }
    }
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    pub fn is_streaming(&self) -> bool {
        self.stream.streaming
    }
    pub fn is_ahead(&self) -> bool {
        self.stream.ahead.is_some()
    }
    /// Connected and shipping new writes (not ahead).
    pub fn is_shipping(&self) -> bool {
        self.stream.streaming && self.stream.ahead.is_none()
    }
    pub fn durable_through(&self) -> Seq {
        self.stream.durable_through
    }
    /// The secondary is a consistent, current copy: connected, no resync section
    /// open, nothing dirty.
    pub fn is_in_sync(&self) -> bool {
        self.stream.streaming && !self.stream.section_open && self.dirty.dirty_count().0 == 0
    }

    /// The most bytes the dirty bitmap may cover while ahead: `None` (no limit)
    /// when the secondary stages a resync of the whole volume; otherwise half of
    /// what it stages, the other half left for the writes that join the stream
    /// while the resync after the ahead episode runs (they belong to its section).
    pub(super) fn ahead_budget_bytes(&self) -> Option<u64> {
        (self.cfg.size_bytes > self.stream.peer_stage_bytes)
            .then_some(self.stream.peer_stage_bytes / 2)
    }

    /// Bytes of `range` the dirty bitmap does not cover yet.
    fn new_dirty_bytes(&self, range: ByteRange) -> u64 {
        let (first, end) = range.blocks(self.cfg.block_size);
        let mut dirty = 0;
        let mut cursor = first;
        while cursor < end {
            let Some((a, n)) = self
                .dirty
                .next_dirty_run(cursor, BlockCount(end.0 - cursor.0))
            else {
                break;
            };
            if a >= end {
                break;
            }
            let run_end = (a.0 + n.0).min(end.0);
            dirty += run_end - a.0;
            cursor = BlockIndex(run_end);
        }
        (end.0 - first.0 - dirty) * u64::from(self.cfg.block_size)
    }

    /// Ahead tracks a client request of `range` in the bitmap only if the bitmap
    /// then stays within [`Self::ahead_budget_bytes`].
    fn fits_ahead_budget(&self, range: ByteRange) -> bool {
        self.ahead_budget_bytes().is_none_or(|budget| {
            let dirty = self.dirty.dirty_count().0 * u64::from(self.cfg.block_size);
            dirty + self.new_dirty_bytes(range) <= budget
        })
    }

    /// While ahead, a request that would take the bitmap past the ahead budget
    /// waits (parked, in order with every later request) until the episode ends
    /// and the resync pass starts; the first such request of an episode is noted.
    pub(super) fn waits_for_ahead_budget(
        &mut self,
        range: ByteRange,
        out: &mut Vec<Action<T, D>>,
    ) -> bool {
        if self.stream.ahead.is_none() || self.fits_ahead_budget(range) {
            return false;
        }
        let dirty_bytes = self.dirty.dirty_count().0 * u64::from(self.cfg.block_size);
        let budget_bytes = self.ahead_budget_bytes().unwrap_or(u64::MAX);
        let ahead = self.stream.ahead.as_mut().expect("checked");
        if !ahead.budget_full {
            ahead.budget_full = true;
            out.push(Action::Note(Note::AheadBudgetFull {
                dirty_bytes,
                budget_bytes,
                peer_stage_bytes: self.stream.peer_stage_bytes,
            }));
        }
        true
    }

    /// Journal bytes the open section takes on the secondary once its passes
    /// have shipped what they announced (each block with a record header of its
    /// own, the worst case), and the client ops that joined it.
    fn section_estimate_bytes(&self) -> u64 {
        self.resync.section_staged_blocks()
            * (u64::from(self.cfg.block_size) + RECORD_HEADER_LEN_BYTES)
            + self.stream.section_joined_bytes
    }

    /// Found in session 23: the secondary holds a section (a resync and every
    /// client op that joins it) in its journal until the section ends, and stages
    /// at most `peer_stage_bytes`. Client writes during a slow resync filled the
    /// journal ("the journal filled up during a resync"), the session ended and
    /// the next resync, larger by those writes, was refused: a short outage then
    /// needed an operator. A client op that would take the section past what the
    /// secondary stages waits (parked, in order with every later request) until
    /// the section ends; the first one of a section is noted.
    pub(super) fn waits_for_section_room(
        &mut self,
        kind: OpKind,
        range: ByteRange,
        out: &mut Vec<Action<T, D>>,
    ) -> bool {
        let s = &self.stream;
        if !s.streaming || s.ahead.is_some() || !s.section_open || s.peer_stage_bytes == u64::MAX {
            return false;
        }
        let wire_bytes = if kind == OpKind::Write { range.len } else { 0 };
        let section_bytes = self.section_estimate_bytes();
        if section_bytes + spill_record_bytes(wire_bytes) <= s.peer_stage_bytes {
            return false;
        }
        if !self.stream.section_full_noted {
            self.stream.section_full_noted = true;
            out.push(Action::Note(Note::SectionFull {
                section_bytes,
                peer_stage_bytes: self.stream.peer_stage_bytes,
            }));
        }
        true
    }

    /// Decide where a new client op of `wire_bytes` over `range` goes (see the
    /// module docs).
    pub(super) fn place_in_stream(
        &mut self,
        seq: Seq,
        range: ByteRange,
        wire_bytes: u64,
        out: &mut Vec<Action<T, D>>,
    ) -> Placement {
        if !self.stream.streaming || self.stream.ahead.is_some() {
            return Placement::Outside;
        }
        if self.cfg.mode == Mode::Sync || self.stream.has_room(&self.cfg, wire_bytes) {
            if self.stream.throttling && self.stream.mem_bytes <= self.cfg.window_bytes_max / 2 {
                self.stream.throttling = false;
            }
            return Placement::InStream;
        }
        if self.stream.spill_room(spill_record_bytes(wire_bytes)) {
            if self.stream.spill.episode.is_none() {
                let (lag_writes, lag_bytes) = self.stream.unacked_totals();
                self.stream.spill.episode = Some(Episode {
                    since_ms: self.now_ms,
                    writes: 0,
                    bytes: 0,
                    peak_bytes: 0,
                });
                out.push(Action::Note(Note::EnteredSpill {
                    lag_writes,
                    lag_bytes,
                    capacity_bytes: self.stream.spill.capacity_bytes,
                }));
            }
            return Placement::Spilled;
        }
        // Ahead means a resync of whatever changes meanwhile: it must stay small
        // enough for the secondary to stage. Otherwise it would refuse the resync
        // (keeping its ever older image) on every reconnect, and the pair would
        // never catch up (issue 11: a 1 GiB burst on a 1 GiB volume against the
        // default 1 GiB journal). When the secondary cannot stage the whole
        // volume, the bitmap is held within the ahead budget (requests past it
        // wait for the resync pass); writes wait for room when even this one
        // would not fit.
        let resync_fits = self.fits_ahead_budget(range);
        if !self.stream.section_open && resync_fits {
            let (lag_writes, lag_bytes) = self.stream.unacked_totals();
            self.stream.ahead = Some(Ahead {
                from: seq,
                since_ms: self.now_ms,
                budget_full: false,
            });
            self.stream.open_section();
            out.push(Action::Note(Note::EnteredAhead {
                lag_writes,
                lag_bytes,
                spill_bytes: self.stream.spill.live_bytes,
            }));
            return Placement::Outside;
        }
        if !self.stream.throttling {
            self.stream.throttling = true;
            out.push(Action::Note(Note::Throttling {
                lag_bytes: self.stream.unacked_bytes,
                peer_stage_bytes: (!self.stream.section_open)
                    .then_some(self.stream.peer_stage_bytes),
            }));
        }
        Placement::HeldForWindow
    }

    /// The secondary of the session about to start stages resyncs of up to
    /// `bytes` (its Welcome; `u64::MAX` = any size). Call before
    /// [`Self::peer_connected`].
    pub fn set_peer_stage_bytes(&mut self, bytes: u64) {
        self.stream.peer_stage_bytes = bytes;
    }

    /// The spill log's figures: (record bytes live, records live, capacity).
    pub fn spill_usage(&self) -> (u64, u64, u64) {
        self.stream.spill_usage()
    }

    /// Put client op `seq` into the stream by way of the spill log.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn spill_op(
        &mut self,
        seq: Seq,
        kind: OpKind,
        range: ByteRange,
        fua: bool,
        at_ms: u64,
        wire_bytes: u64,
        data: Option<D>,
        out: &mut Vec<Action<T, D>>,
    ) {
        let record_bytes = spill_record_bytes(wire_bytes);
        self.stream
            .enqueue_spilled(seq, range, at_ms, kind, fua, wire_bytes, record_bytes);
        let live = self.stream.spill.live_bytes;
        if let Some(e) = self.stream.spill.episode.as_mut() {
            e.writes += 1;
            e.bytes += wire_bytes;
            e.peak_bytes = e.peak_bytes.max(live);
        }
        out.push(Action::SpillAppend {
            seq,
            kind,
            range,
            fua,
            at_ms,
            data,
        });
        self.pump_spill_io(out);
    }

    /// Issue the spill log's next sync, release or reset (one at a time).
    pub(super) fn pump_spill_io(&mut self, out: &mut Vec<Action<T, D>>) {
        let persisted = self.persisted_through();
        let s = &mut self.stream.spill;
        if s.syncing.is_some() || s.releasing.is_some() || s.reset == Reset::Running {
            return;
        }
        if let Reset::AfterPersist(n) = s.reset {
            if persisted >= n {
                // Every record's blocks are in the persisted bitmap: the log is not
                // needed for crash coverage any more.
                s.reset = Reset::Running;
                s.unsynced.clear();
                s.release_wanted = None;
                out.push(Action::ResetSpill);
            }
            return;
        }
        if !s.unsynced.is_empty() {
            s.syncing = Some(std::mem::take(&mut s.unsynced));
            out.push(Action::SyncSpill);
            return;
        }
        if let Some(r) = s.release_wanted.take() {
            s.releasing = Some(r);
            out.push(Action::ReleaseSpill { through: r.0 });
        }
    }

    /// The spill log's sync issued last is done.
    pub fn spill_synced(&mut self, result: Result<(), String>, out: &mut Vec<Action<T, D>>) {
        let seqs = self
            .stream
            .spill
            .syncing
            .take()
            .expect("spill_synced without a sync");
        if let Err(e) = result {
            self.spill_failed(format!("writing the spill log failed: {e}"), out);
            return;
        }
        // Durable in the log: the log covers these writes after a crash, so their
        // extents no longer need to stay active for them. A write still waiting
        // for room in the activity log keeps its remote pin until Durable (sim
        // seed 1: dropping it here, before the pin existed, leaked it and
        // blocked every later write).
        for seq in seqs {
            if let Some(i) = self.stream.index_of(seq)
                && self.holds_pins(seq)
                && std::mem::take(&mut self.stream.unacked[i].remote_pin)
            {
                self.unpin(seq, out);
            }
        }
        self.pump_spill_io(out);
        self.pump_ship(out);
    }

    /// The read-back of spilled write `seq` finished.
    pub fn spill_read_done(
        &mut self,
        seq: Seq,
        result: Result<D, String>,
        out: &mut Vec<Action<T, D>>,
    ) {
        self.stream.spill.reads_in_flight -= 1;
        let Some(i) = self.stream.index_of(seq) else {
            // The session ended meanwhile.
            return;
        };
        let Some(sp) = self.stream.unacked[i].spill.as_mut() else {
            return;
        };
        if !matches!(sp.state, SpillState::Reading) {
            return;
        }
        match result {
            Ok(d) => {
                sp.state = SpillState::Loaded(Some(d));
                self.pump_ship(out);
            }
            Err(e) => self.spill_failed(
                format!("reading write {seq} back from the spill log failed: {e}"),
                out,
            ),
        }
    }

    /// The spill log's release or reset issued last is durable.
    pub fn spill_released(&mut self, result: Result<(), String>, out: &mut Vec<Action<T, D>>) {
        let s = &mut self.stream.spill;
        if s.reset == Reset::Running {
            s.reset = Reset::None;
            s.live_bytes = 0;
            s.live_records = 0;
        } else {
            let (_, bytes, records) = s
                .releasing
                .take()
                .expect("spill_released without a release");
            s.live_bytes -= bytes;
            s.live_records -= records;
        }
        if let Err(e) = result {
            self.spill_failed(format!("releasing spill-log records failed: {e}"), out);
            return;
        }
        self.maybe_leave_spill(out);
        self.pump_spill_io(out);
    }

    /// A spill-log read or write failed: no more spilling until the next start;
    /// the session ends (its writes go into the bitmap and are resynced from the
    /// volume). The records still in the log cover their writes after a crash.
    fn spill_failed(&mut self, reason: String, out: &mut Vec<Action<T, D>>) {
        if !self.stream.spill.failed {
            self.stream.spill.failed = true;
            out.push(Action::Note(Note::SpillFailed {
                reason: reason.clone(),
            }));
        }
        if self.stream.streaming {
            self.end_session(SessionFault::SpillFailed { reason }, out);
        }
    }

    /// The spill episode ends once the log is empty and the window has drained to half.
    pub(super) fn maybe_leave_spill(&mut self, out: &mut Vec<Action<T, D>>) {
        let s = &self.stream.spill;
        if s.episode.is_none()
            || s.live_records > 0
            || self.stream.mem_bytes > self.cfg.window_bytes_max / 2
        {
            return;
        }
        let e = self.stream.spill.episode.take().expect("checked");
        out.push(Action::Note(Note::LeftSpill {
            spilled_writes: e.writes,
            spilled_bytes: e.bytes,
            peak_bytes: e.peak_bytes,
            spill_ms: self.now_ms.saturating_sub(e.since_ms),
        }));
    }

    /// Issue read-backs of spilled entries while the shipped part of the window
    /// has room for them (the cursor's own window check then always passes for
    /// them: no spilled entry waits behind memory it cannot get).
    fn pump_spill_reads(&mut self, out: &mut Vec<Action<T, D>>) {
        let st = &mut self.stream;
        if st.spill.reads_in_flight >= SPILL_READS_MAX {
            return;
        }
        let cursor = st.spill.read_cursor;
        let start = st.unacked.partition_point(|u| u.seq < cursor);
        for i in start..st.unacked.len() {
            let u = &mut st.unacked[i];
            if let Some(sp) = u.spill.as_mut()
                && matches!(sp.state, SpillState::Unread)
            {
                let in_flight_writes = st.shipped_writes + st.loading_writes;
                let room = in_flight_writes == 0
                    || (st.shipped_bytes + st.loading_bytes + u.wire_bytes
                        <= self.cfg.window_bytes_max
                        && in_flight_writes < self.cfg.window_writes_max);
                if !room || st.spill.reads_in_flight >= SPILL_READS_MAX {
                    return;
                }
                if sp.kind == OpKind::Write {
                    sp.state = SpillState::Reading;
                    st.spill.reads_in_flight += 1;
                    out.push(Action::ReadSpill { seq: u.seq });
                } else {
                    sp.state = SpillState::Loaded(None);
                }
                st.loading_bytes += u.wire_bytes;
                st.loading_writes += 1;
                st.mem_bytes += u.wire_bytes;
                st.mem_writes += 1;
            }
            st.spill.read_cursor = u.seq.next();
        }
    }

    /// Ship the spilled entry at the cursor (index `i` of the stream) if its
    /// payload is back; false when the cursor must wait.
    fn ship_spilled(&mut self, i: usize, out: &mut Vec<Action<T, D>>) -> bool {
        let seq = self.stream.unacked[i].seq;
        if !self.is_logged(seq) && self.ops.contains_key(&seq) {
            return false;
        }
        let st = &mut self.stream;
        let u = &mut st.unacked[i];
        let sp = u.spill.as_mut().expect("a spilled entry");
        if !matches!(sp.state, SpillState::Loaded(_)) {
            return false;
        }
        if !(st.shipped_writes == 0
            || (st.shipped_bytes + u.wire_bytes <= self.cfg.window_bytes_max
                && st.shipped_writes < self.cfg.window_writes_max))
        {
            return false;
        }
        let SpillState::Loaded(data) = std::mem::replace(&mut sp.state, SpillState::Shipped) else {
            unreachable!("checked above");
        };
        u.shipped = true;
        st.shipped_bytes += u.wire_bytes;
        st.shipped_writes += 1;
        st.loading_bytes -= u.wire_bytes;
        st.loading_writes -= 1;
        st.next_ship = seq.next();
        let (range, at_ms, fua, kind) = (u.range, u.at_ms, sp.fua, sp.kind);
        let frame = match (kind, data) {
            (OpKind::Write, Some(data)) => Outgoing::Write {
                seq,
                offset: range.offset,
                fua,
                at_ms,
                data,
            },
            (OpKind::Trim, _) => Outgoing::Trim {
                seq,
                offset: range.offset,
                len: range.len,
                at_ms,
            },
            (OpKind::Write | OpKind::WriteZeroes, _) => Outgoing::Zeroes {
                seq,
                offset: range.offset,
                len: range.len,
                fua,
                at_ms,
            },
            (other, _) => unreachable!("only client ops spill, not {other:?}"),
        };
        out.push(Action::Ship(frame));
        if let Some(op) = self.ops.get_mut(&seq) {
            op.ship = ShipStage::Shipped;
        }
        self.try_remove(seq);
        true
    }

    /// Leave the ahead state once the window has drained to half (hysteresis, so the
    /// primary does not flap between the two states on every ack) and at least
    /// `ahead_min_ms` passed, and everything accepted before it has been shipped:
    /// the secondary is told the next seq (the skipped seqs never arrive) and a
    /// resync pass sends what changed meanwhile.
    pub(super) fn maybe_leave_ahead(&mut self, out: &mut Vec<Action<T, D>>) {
        let Some(ahead) = &self.stream.ahead else {
            return;
        };
        let ahead_ms = self.now_ms.saturating_sub(ahead.since_ms);
        if ahead_ms < self.cfg.ahead_min_ms
            || self.stream.next_ship < ahead.from
            || self.stream.unacked_bytes > self.cfg.window_bytes_max / 2
            || self.stream.unacked.len() as u64 > self.cfg.window_writes_max / 2
        {
            return;
        }
        assert!(
            self.resync.pass_is_idle(),
            "no resync chunk is produced while ahead"
        );
        self.stream.ahead = None;
        self.stream.next_ship = self.next_seq;
        // Every op in between is outside the stream.
        out.push(Action::Note(Note::LeftAhead {
            out_of_sync_blocks: self.dirty.dirty_count().0,
            ahead_ms,
        }));
        self.start_pass(false, out);
        // Requests that waited for the ahead budget join the pass's section.
        self.admit_parked(out);
    }

    /// Ship every ready frame at the head of the stream (in seq order, within the
    /// window), then any flush markers the cursor has passed.
    pub(super) fn pump_ship(&mut self, out: &mut Vec<Action<T, D>>) {
        if !self.stream.streaming || self.stream.gate.is_some() {
            return;
        }
        self.pump_spill_reads(out);
        while self.stream.next_ship < self.next_seq {
            let seq = self.stream.next_ship;
            if self.stream.ahead.as_ref().is_some_and(|a| seq >= a.from) {
                break;
            }
            // The entry at the cursor is the first one not shipped.
            let i = self.stream.shipped_writes as usize;
            if self
                .stream
                .unacked
                .get(i)
                .is_some_and(|u| u.spill.is_some())
            {
                assert_eq!(
                    self.stream.unacked[i].seq, seq,
                    "the ship cursor and the stream disagree"
                );
                if !self.ship_spilled(i, out) {
                    break;
                }
                continue;
            }
            let logged = self.is_logged(seq);
            let Some(op) = self.ops.get_mut(&seq) else {
                panic!("ship cursor at seq {seq} without an op");
            };
            if op.ship == ShipStage::AwaitingRead || !logged {
                break;
            }
            assert_eq!(
                op.ship,
                ShipStage::Ready,
                "seq {seq} at the cursor is not in the stream"
            );
            // Entries before it are shipped, it is the first one that is not.
            let u = &mut self.stream.unacked[self.stream.shipped_writes as usize];
            assert_eq!(u.seq, seq, "the ship cursor and the stream disagree");
            if !(self.stream.shipped_writes == 0
                || (self.stream.shipped_bytes + u.wire_bytes <= self.cfg.window_bytes_max
                    && self.stream.shipped_writes < self.cfg.window_writes_max))
            {
                break;
            }
            u.shipped = true;
            self.stream.shipped_bytes += u.wire_bytes;
            self.stream.shipped_writes += 1;
            self.stream.next_ship = seq.next();
            op.ship = ShipStage::Shipped;
            let data = if matches!(op.local, LocalStage::Waiting { .. }) {
                op.data.clone()
            } else {
                op.data.take()
            };
            let (range, at_ms, fua, kind) = (op.range, op.at_ms, op.fua, op.kind);
            let frame = match (kind, data) {
                (OpKind::Write | OpKind::ResyncRead, Some(data)) => Outgoing::Write {
                    seq,
                    offset: range.offset,
                    fua,
                    at_ms,
                    data,
                },
                (OpKind::Write | OpKind::ResyncRead | OpKind::WriteZeroes, _) => Outgoing::Zeroes {
                    seq,
                    offset: range.offset,
                    len: range.len,
                    fua,
                    at_ms,
                },
                (OpKind::Trim, _) => Outgoing::Trim {
                    seq,
                    offset: range.offset,
                    len: range.len,
                    at_ms,
                },
                (OpKind::HashRead | OpKind::VerifyRead | OpKind::RangeHashRead, hashes) => {
                    let unit_blocks = if kind == OpKind::RangeHashRead {
                        self.cfg.range_hash_blocks
                    } else {
                        1
                    };
                    Outgoing::HashCheck {
                        seq,
                        offset: range.offset,
                        unit_bytes: self.cfg.block_size * unit_blocks as u32,
                        hashes: hashes.expect("a comparison ships its hashes"),
                    }
                }
            };
            out.push(Action::Ship(frame));
            if kind.is_resync() && kind != OpKind::VerifyRead {
                self.resync.chunk_shipped(range, self.cfg.block_size);
            }
            let held = op.held_for_window;
            op.held_for_window = false;
            if held {
                self.try_complete(seq, out);
            }
            self.try_remove(seq);
        }
        while let Some(&through) = self.stream.flush_markers.front() {
            if through >= self.stream.next_ship {
                break;
            }
            self.stream.flush_markers.pop_front();
            out.push(Action::Ship(Outgoing::Flush { through }));
        }
    }

    /// The handshake accepted `plan`; the secondary listed the blocks it changed
    /// itself (`own_dirty`, resent as data) and may have changed (`own_verify`,
    /// compared by hash) as runs `(first, count)`. A rejoining node is rolled back
    /// to this node's data block for block (G8).
    pub fn peer_connected(
        &mut self,
        plan: crate::wire::SyncPlan,
        own_dirty: &[(u64, u64)],
        own_verify: &[(u64, u64)],
        out: &mut Vec<Action<T, D>>,
    ) {
        use crate::wire::SyncPlan;
        let blocks = self.dirty.block_count().0;
        let clamp = |(f, n): (u64, u64)| {
            (
                crate::types::BlockIndex(f.min(blocks)),
                crate::types::BlockIndex(f.saturating_add(n).min(blocks)),
            )
        };
        match plan {
            SyncPlan::Bitmap => {
                for &r in own_dirty {
                    let (a, b) = clamp(r);
                    self.mark_out_of_sync(a, b);
                }
                for &r in own_verify {
                    let (a, b) = clamp(r);
                    self.mark_verify(a, b);
                }
            }
            SyncPlan::Verify => {
                // A pre-seeded secondary (or one whose metadata was rebuilt): every
                // block is compared by hash, only those that differ are sent.
                self.mark_verify(
                    crate::types::BlockIndex(0),
                    crate::types::BlockIndex(blocks),
                );
            }
            SyncPlan::Full => {}
        }
        self.session_started(plan != SyncPlan::Bitmap, out);
    }

    /// A session with the secondary begins; `full` when the secondary needs every block.
    pub fn session_started(&mut self, full: bool, out: &mut Vec<Action<T, D>>) {
        assert!(!self.stream.streaming, "session started twice");
        assert!(self.stream.unacked.is_empty());
        self.stream.streaming = true;
        self.stream.ahead = None;
        self.stream.throttling = false;
        self.stream.stream_first = self.next_seq;
        self.stream.next_ship = self.next_seq;
        self.stream.spill.read_cursor = self.next_seq;
        self.stream.durable_through = Seq(self.next_seq.0 - 1);
        self.stream.done_marker = None;
        self.stream.section_done = None;
        if full {
            self.dirty.mark_all();
            self.note_dirty_since(self.now_ms);
        }
        if self.dirty.dirty_count().0 > 0 {
            // What this session will resend must be durable in the bitmap before the
            // secondary sees any of it: if this node crashes mid-resync, the
            // secondary resumes from this node's persisted bitmap, and a full sync or
            // the blocks the secondary listed in its Welcome are only in memory now.
            let needed = self.persist_now(out);
            self.stream.gate = Some((full, needed));
        } else {
            self.open_stream(full, out);
        }
        // Block mode: the requests that waited for the peer go now, in order.
        self.admit_parked(out);
    }

    /// The first frame of a session: ResyncStart, whose seq tells the secondary the
    /// session's first seq; `blocks` is 0 when nothing needs resending.
    pub(super) fn open_stream(&mut self, full: bool, out: &mut Vec<Action<T, D>>) {
        self.stream.gate = None;
        self.start_pass(full, out);
        self.pump_ship(out);
    }

    /// The persist a gated session waits for is durable.
    pub(super) fn maybe_open_gate(&mut self, persisted: u64, out: &mut Vec<Action<T, D>>) {
        if let Some((full, needed)) = self.stream.gate
            && persisted >= needed
        {
            self.open_stream(full, out);
        }
    }

    /// The secondary applied `seq`.
    pub fn peer_applied(&mut self, seq: Seq, out: &mut Vec<Action<T, D>>) {
        if !self.stream.streaming {
            return;
        }
        if seq >= self.stream.next_ship {
            let fault = SessionFault::AppliedBeyondShipped {
                seq,
                next_ship: self.stream.next_ship,
            };
            self.end_session(fault, out);
            return;
        }
        if let Some(op) = self.ops.get_mut(&seq)
            && op.ship == ShipStage::Shipped
        {
            op.ship = ShipStage::Applied;
            self.try_complete(seq, out);
        }
    }

    /// The secondary made everything through `through` durable.
    pub fn peer_durable(&mut self, through: Seq, out: &mut Vec<Action<T, D>>) {
        if !self.stream.streaming || through <= self.stream.durable_through {
            return;
        }
        if through >= self.stream.next_ship {
            let fault = SessionFault::DurableBeyondShipped {
                through,
                next_ship: self.stream.next_ship,
            };
            self.end_session(fault, out);
            return;
        }
        // A Durable past a hash check the peer has not answered would clear the
        // dirty bits of blocks only compared, never sent: refuse it.
        let unanswered = self
            .stream
            .unacked
            .iter()
            .take_while(|u| u.seq <= through)
            .find(|u| matches!(u.carried, Carried::Compare { .. }) && !u.answered)
            .map(|u| u.seq)
            .or_else(|| self.online.chunks.range(..=through).next().map(|(s, _)| *s));
        if let Some(seq) = unanswered {
            self.end_session(SessionFault::DurableBeforeHashReply { through, seq }, out);
            return;
        }
        self.stream.durable_through = through;
        let bs = self.cfg.block_size;
        while let Some(u) = self.stream.unacked.front() {
            if u.seq > through {
                break;
            }
            let u = self.stream.pop_unacked().expect("front exists");
            self.stream.unacked_bytes -= u.wire_bytes;
            self.stream.shipped_bytes -= u.wire_bytes;
            self.stream.shipped_writes -= 1;
            // Shipped entries are in memory (a spilled one was read back).
            self.stream.mem_bytes -= u.wire_bytes;
            self.stream.mem_writes -= 1;
            if let Some(sp) = &u.spill {
                let s = &mut self.stream.spill;
                let (_, bytes, records) = s.release_wanted.get_or_insert((u.seq, 0, 0));
                *bytes += sp.record_bytes;
                *records += 1;
                s.release_wanted.as_mut().expect("set").0 = u.seq;
            }
            match u.carried {
                Carried::Client if u.remote_pin => self.unpin(u.seq, out),
                Carried::Client => {}
                Carried::Data | Carried::Compare { .. } => {
                    // The secondary durably holds this range as of u.seq (compared
                    // blocks that differed are in `keep`). A newer write in the
                    // stream is tracked on its own (and re-marked if the session
                    // drops); a newer change outside the stream is in `keep`.
                    let (a, b) = u.range.blocks(bs);
                    self.dirty.clear(a, b);
                    self.persist.changed = true;
                    for k in &u.keep {
                        let (a, b) = k.blocks(bs);
                        self.dirty.mark(a, b);
                    }
                    self.resync.chunk_settled();
                }
                Carried::Verify => {}
            }
        }
        if self.dirty.dirty_count().0 == 0 {
            self.dirty_since_ms = None;
        }
        // Sync-mode writes waiting for Durable (FUA) or whose Applied we never saw.
        let waiting: Vec<Seq> = self
            .ops
            .range(..=through)
            .filter(|(_, op)| !matches!(op.completion, Completion::None))
            .map(|(s, _)| *s)
            .collect();
        for seq in waiting {
            self.try_complete(seq, out);
        }
        self.after_durable(out);
        self.pump_spill_io(out);
        self.maybe_leave_spill(out);
        self.pump_ship(out);
    }

    /// End the session with a fault the engine found (the agent closes it).
    pub(super) fn end_session(&mut self, fault: SessionFault, out: &mut Vec<Action<T, D>>) {
        out.push(Action::DropSession { fault });
        self.session_ended(out);
    }

    /// The session ended (link down, peer gone, protocol error). Everything not
    /// durable on the secondary goes back into the dirty bitmap (G3, G4).
    pub fn session_ended(&mut self, out: &mut Vec<Action<T, D>>) {
        if !self.stream.streaming {
            return;
        }
        self.stream.streaming = false;
        self.stream.ahead = None;
        self.stream.throttling = false;
        let drained: Vec<Unacked<D>> = self.stream.take_unacked();
        self.stream.unacked_bytes = 0;
        self.stream.mem_bytes = 0;
        self.stream.mem_writes = 0;
        self.stream.shipped_bytes = 0;
        self.stream.shipped_writes = 0;
        self.stream.loading_bytes = 0;
        self.stream.loading_writes = 0;
        self.stream.spill.read_cursor = self.next_seq;
        let bs = self.cfg.block_size;
        // Every drained write is marked before any pin drops: an unpin may retire
        // an extent, whose log write persists bitmap pages built from the dirty
        // bitmap and the stream, and a write drained but not yet marked would be
        // in neither (sim seed 400484: its spill record was released once a later
        // persist covered it, then the retirement's pages landed without it).
        let mut unpin = Vec::new();
        for u in drained {
            let (a, b) = u.range.blocks(bs);
            match u.carried {
                Carried::Client => {
                    self.dirty.mark(a, b);
                    // Not on the secondary yet: its age carries over into the bitmap.
                    self.note_dirty_since(u.at_ms);
                    if u.remote_pin {
                        unpin.push(u.seq);
                    }
                }
                Carried::Data => self.dirty.mark(a, b),
                Carried::Compare { unit_blocks } => {
                    self.dirty.mark(a, b);
                    self.resync.requeue_comparison(
                        u.range,
                        unit_blocks,
                        &u.keep,
                        self.cfg.block_size,
                    );
                }
                Carried::Verify => {}
            }
        }
        for seq in unpin {
            self.unpin(seq, out);
        }
        self.stream.flush_markers.clear();
        self.stream.done_marker = None;
        self.stream.section_done = None;
        self.stream.gate = None;
        self.stream.section_open = self.dirty.dirty_count().0 > 0;
        self.stream.new_section();
        self.resync.session_ended();
        self.online.session_ended();
        self.fail_verify(
            "the connection to the secondary was lost; run verify again once it is connected"
                .into(),
        );
        let seqs: Vec<Seq> = self.ops.keys().copied().collect();
        for seq in seqs {
            let op = self.ops.get_mut(&seq).expect("listed");
            if matches!(op.ship, ShipStage::Outside) {
                continue;
            }
            let unshipped = matches!(op.ship, ShipStage::Ready | ShipStage::AwaitingRead);
            op.ship = ShipStage::Outside;
            op.held_for_window = false;
            if unshipped
                && op.kind == OpKind::Write
                && !matches!(op.local, LocalStage::Waiting { .. })
            {
                op.data = None;
            }
            if op.kind.is_client() {
                self.park_or_complete_after_loss(seq, out);
            }
            self.try_remove(seq);
        }
        // The spill log's records are now covered by the dirty bitmap, once a
        // persist of it is durable; then the log is emptied.
        let s = &self.stream.spill;
        if !s.failed
            && s.reset == Reset::None
            && (s.live_records > 0 || s.syncing.is_some() || !s.unsynced.is_empty())
        {
            let n = self.persist_now(out);
            self.stream.spill.reset = Reset::AfterPersist(n);
        }
        self.pump_spill_io(out);
        self.flush_session_ended(out);
        // Requests that waited for the ahead budget or for the section to end
        // wait no more: without a session they go on alone (or wait for the
        // peer, in block mode).
        self.admit_parked(out);
    }
}
