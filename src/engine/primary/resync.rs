//! Resync passes: sending the blocks of the dirty bitmap (as data, or first as
//! hashes when they are probably identical), paced, until the secondary is a
//! consistent copy again.
//!
//! A pass covers the dirty blocks from a cursor to the end of the volume, in
//! chunks of at most `resync_chunk_bytes`. Each chunk is a read with its own seq,
//! ordered among client writes by the sequencer and shipped in seq order, so a
//! chunk never overwrites a newer write on the secondary (ARCHITECTURE §5), and
//! once every chunk of a pass is durable the secondary holds this node's image as
//! of the last shipped seq — provided nothing became dirty meanwhile (a write
//! while ahead, a block a comparison found different). The pass ends when all its
//! chunks are durable (so every comparison has been answered: a `HashReply`
//! precedes the `Durable` that covers it). Then:
//! - nothing dirty left: `ResyncDone { through }` is shipped; once the secondary
//!   answers `SectionDone { through }` (its section end and the metadata naming
//!   this node's generation are durable) it is a consistent copy as of `through`
//!   and the section closes. A `Durable` covering `through` is not enough: the
//!   section end shares that seq with the last write and may not be durable yet;
//!   taking the generation as the peer's then would make the two sides disagree
//!   after a crash (sim seed 40236 async);
//! - blocks left (mismatches, changes kept by a chunk): another pass.
//!
//! Pacing: a token bucket of `resync_rate_bytes_per_s` (refilled on every tick,
//! at most 100 ms of budget kept), charged with each chunk's bytes on the wire;
//! chunks also occupy the replication window like writes.

use super::stream::Carried;
use super::{Action, Note, OpKind, Outgoing, PrimaryEngine, SessionFault};
use crate::bitmap::DirtyBitmap;
use crate::types::{BlockCount, BlockIndex, ByteRange, Seq};

/// Blocks per hash of a coarse comparison (64 KiB at 4 KiB blocks). Checksum resync
/// (seeding, crash recovery) compares ranges first, then block by block only where
/// a range differs. With 1% of blocks changed at random, 85% of 16-block ranges are
/// unchanged, so the hashes on the wire shrink about fourfold; clustered changes
/// (the usual case) do much better.
pub const RANGE_HASH_BLOCKS: u64 = 16;

/// Bytes of the volume one hole probe asks about ([`Action::ProbeHoles`]).
pub const HOLE_PROBE_BYTES: u64 = 64 << 30;

/// Largest zero chunk (payload-free): a hole of a sparse volume goes in frames of
/// up to this many bytes, so a 1 TiB volume holding little data syncs in a few
/// dozen frames instead of a million reads of zeros (issue 11).
pub const ZERO_CHUNK_BYTES_MAX: u64 = 16 << 30;

/// What the agent reported of the volume's allocation (SEEK_DATA / SEEK_HOLE),
/// kept true as client writes arrive: the hint that lets a resync pass send holes
/// as zero chunks without reading them.
///
/// Soundness: a zero chunk gets a seq like any resync chunk, so on the secondary it
/// lands after every write with a smaller seq; it must therefore equal this node's
/// image as of its seq. A probe answered while client writes were in flight may not
/// see them, so their ranges are taken out of the answer; every client write
/// admitted later takes its range out of the hint when it is admitted (before any
/// chunk after it can be produced). What remains read as zeros at the chunk's seq.
#[derive(Debug, Default)]
pub(super) struct Holes {
    /// The agent answers probes (image files whose file system reports holes).
    pub(super) enabled: bool,
    /// Blocks `[from, to)` are described: hole runs (first → end) in `zero`,
    /// everything else there may hold data.
    from: u64,
    to: u64,
    zero: std::collections::BTreeMap<u64, u64>,
    /// A probe was asked and not answered yet.
    probing: bool,
    /// Zero chunks produced in this session (pruned as they become durable): their
    /// reads must find zeros ([`PrimaryEngine::is_zero_chunk`]).
    chunks: std::collections::BTreeSet<Seq>,
}

impl Holes {
    fn covers(&self, b: u64) -> bool {
        self.from <= b && b < self.to
    }

    /// End of the hole holding `b`, if any.
    fn hole_end(&self, b: u64) -> Option<u64> {
        self.zero
            .range(..=b)
            .next_back()
            .filter(|(_, e)| **e > b)
            .map(|(_, e)| *e)
    }

    /// Start of the first hole after `b`.
    fn next_hole(&self, b: u64) -> Option<u64> {
        self.zero.range(b + 1..).next().map(|(s, _)| *s)
    }

    /// Blocks `[first, end)` may hold data from now on.
    pub(super) fn forget(&mut self, first: u64, end: u64) {
        if first >= end || self.zero.is_empty() {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .zero
            .range(..end)
            .rev()
            .take_while(|(_, e)| **e > first)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in hit {
            self.zero.remove(&s);
            if s < first {
                self.zero.insert(s, first);
            }
            if e > end {
                self.zero.insert(end, e);
            }
        }
    }

    /// Forget where the holes are (a pass that needs them probes again). Kept
    /// past its pass, the map would take every later client write into a hole
    /// as one more run, for the rest of the session (up to millions over a
    /// 64 GiB probe; seen in a profile of random writes after an initial sync).
    fn forget_all(&mut self) {
        self.from = 0;
        self.to = 0;
        self.zero.clear();
    }

    fn clear(&mut self) {
        self.forget_all();
        self.probing = false;
        self.chunks.clear();
    }
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
struct Pass {
    progress: ResyncProgress,
    /// Every chunk has been produced.
    exhausted: bool,
    /// Chunks produced and not yet durable on the secondary.
    live: u32,
}

pub(super) struct Resync {
    /// Dirty blocks that may well be identical on the secondary (active extents
    /// after a crash, a pre-seeded copy): compared by hash before any data is sent.
    pub(super) verify: DirtyBitmap,
    /// Blocks of `verify` whose range differed: compared block by block, not by range.
    fine: DirtyBitmap,
    pass: Option<Pass>,
    /// Token bucket (bytes); may go negative after a large chunk.
    budget_bytes: i64,
    last_refill_ms: Option<u64>,
    /// Blocks shipped by the passes of the current section (for the InSync note).
    section_blocks: u64,
    /// Blocks the passes of the current section announced that the secondary
    /// stages (see [`PrimaryEngine::staged_blocks`]); reset with the session.
    section_staged_blocks: u64,
    /// Holes of the volume ahead of the cursor (when the agent answers probes).
    pub(super) holes: Holes,
}

impl Resync {
    pub(super) fn new(blocks: BlockCount) -> Resync {
        Resync {
            verify: DirtyBitmap::new(blocks),
            fine: DirtyBitmap::new(blocks),
            pass: None,
            budget_bytes: 0,
            last_refill_ms: None,
            section_blocks: 0,
            section_staged_blocks: 0,
            holes: Holes::default(),
        }
    }

    /// ha (issue 12): the volume grew; the new blocks need no comparison.
    pub(super) fn grow_fine(&mut self, blocks: crate::types::BlockCount) {
        self.fine.grow(blocks);
    }

    /// No chunk of a pass is in flight.
    pub(super) fn pass_is_idle(&self) -> bool {
        self.pass.as_ref().is_none_or(|p| p.live == 0)
    }

    /// Blocks the passes of the current section announced as staged.
    pub(super) fn section_staged_blocks(&self) -> u64 {
        self.section_staged_blocks
    }

    pub(super) fn chunk_shipped(&mut self, range: ByteRange, block_size: u32) {
        if let Some(p) = self.pass.as_mut() {
            let (a, b) = range.blocks(block_size);
            p.progress.shipped_blocks.0 += b.0 - a.0;
            self.section_blocks += b.0 - a.0;
        }
    }

    pub(super) fn chunk_settled(&mut self) {
        if let Some(p) = self.pass.as_mut() {
            p.live -= 1;
        }
    }

    /// What a chunk costs on the wire.
    fn wire_cost(kind: OpKind, range: ByteRange, has_data: bool) -> i64 {
        let header = crate::wire::HEADER_LEN as i64;
        match kind {
            OpKind::ResyncRead if has_data => header + range.len as i64,
            OpKind::ResyncRead => header,
            // Verify chunks are paced by the verify's own rate.
            OpKind::VerifyRead => 0,
            _ => header + 32 * range.len.div_ceil(4096) as i64,
        }
    }

    /// ha (issue 12): charge the bucket when a chunk starts, with what it costs if
    /// its read finds data. Charging only when reads completed let every chunk the
    /// window allowed start at once (a 256 KiB/s resync sent 16 MiB in 0.6 s).
    pub(super) fn charge_start(&mut self, kind: OpKind, range: ByteRange) {
        self.budget_bytes -= Self::wire_cost(kind, range, true);
    }

    /// A chunk's read completed: give back what it does not send (zeroes).
    pub(super) fn charge_read(&mut self, kind: OpKind, range: ByteRange, has_data: bool) {
        self.budget_bytes +=
            Self::wire_cost(kind, range, true) - Self::wire_cost(kind, range, has_data);
    }

    /// ha: the rate changed (or is unlimited): no debt or credit from before carries over.
    pub(super) fn reset_budget(&mut self) {
        self.budget_bytes = 0;
        self.last_refill_ms = None;
    }

    /// A comparison was lost with its session: compare again next time, except the
    /// blocks already known to differ (the blocks of a range known to differ stay
    /// marked for a block-by-block comparison).
    pub(super) fn requeue_comparison(
        &mut self,
        range: ByteRange,
        unit_blocks: u64,
        keep: &[ByteRange],
        block_size: u32,
    ) {
        let (a, b) = range.blocks(block_size);
        self.verify.mark(a, b);
        if unit_blocks <= 1 {
            for k in keep {
                let (a, b) = k.blocks(block_size);
                self.verify.clear(a, b);
            }
        }
    }

    pub(super) fn mark_fine(&mut self, first: BlockIndex, end: BlockIndex) {
        self.fine.mark(first, end);
    }

    pub(super) fn session_ended(&mut self) {
        self.pass = None;
        // The next session's first pass starts the section the secondary counts
        // (it drops one that grew too large at the reconnect).
        self.section_staged_blocks = 0;
        self.last_refill_ms = None;
        let enabled = self.holes.enabled;
        self.holes.clear();
        self.holes.enabled = enabled;
    }
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        self.resync.pass.as_ref().map(|p| p.progress)
    }

    /// Start a resync pass over the dirty bitmap; ships ResyncStart (whose seq tells
    /// the secondary the next seq to come).
    /// Blocks a resync of the dirty bitmap puts in the secondary's journal, as
    /// its `ResyncStart` announces them (the secondary refuses a resync larger
    /// than it stages): every block sent as data, and a 32nd of the blocks only
    /// suspected to differ (the active extents at a crash, a seeded copy), which
    /// are compared by hash and sent only if they differ. Found in session 23:
    /// counting those whole, a primary killed while random writes kept its 960
    /// default 4 MiB extents active announced a 4 GB resync after the restart,
    /// which a secondary with the default 1 GiB journal refused on every
    /// reconnect, although a few MiB differed. At least 1 when anything is dirty
    /// (0 tells the secondary that nothing differs).
    pub(super) fn staged_blocks(&self) -> u64 {
        let total = self.dirty.dirty_count().0;
        if total == 0 {
            return 0;
        }
        let suspected = self.suspected_blocks().0;
        (total - suspected + suspected.div_ceil(32)).max(1)
    }

    pub(super) fn start_pass(&mut self, full: bool, out: &mut Vec<Action<T, D>>) {
        let total = self.dirty.dirty_count();
        let staged = self.staged_blocks();
        self.resync.pass = None;
        if total.0 > 0 {
            if !self.stream.is_section_open() {
                self.resync.section_blocks = 0;
                self.resync.section_staged_blocks = 0;
                self.stream.open_section();
                // Client ops in the stream not shipped yet ship after the
                // ResyncStart: they join the section too.
                self.stream.join_unshipped();
            }
            self.resync.section_staged_blocks += staged;
            self.resync.pass = Some(Pass {
                progress: ResyncProgress {
                    full,
                    total_blocks: total,
                    shipped_blocks: BlockCount(0),
                    cursor: BlockIndex(0),
                },
                exhausted: false,
                live: 0,
            });
            out.push(Action::Note(Note::ResyncStarted {
                blocks: total,
                full,
            }));
        }
        out.push(Action::Ship(Outgoing::ResyncStart {
            next: self.stream.next_ship(),
            blocks: BlockCount(staged),
            full,
        }));
        if total.0 == 0 {
            // Nothing to resend: the secondary holds this node's data through
            // `next - 1`. It says so with a marker, and the section closes (and
            // the peer counts as holding this node's generation) on its
            // `SectionDone`, as after a `ResyncDone` (see the module docs).
            self.stream.done_marker = Some(Seq(self.stream.next_ship().0 - 1));
            if !self.stream.is_section_open() {
                // Block-mode writes that lost their session wait for the
                // secondary to hold everything again: it does (what it lacked
                // would be dirty). They waited forever when their frames had been
                // made durable before the session dropped (fuzz primary target,
                // regressions/primary/block-waiters-after-an-empty-resync).
                self.release_in_sync_waiters(out);
            }
        }
    }

    /// Whether a resync chunk could be produced now.
    pub fn wants_resync_chunk(&self) -> bool {
        self.is_shipping()
            && !self.resync.holes.probing
            && self.resync.pass.as_ref().is_some_and(|p| !p.exhausted)
    }

    /// Whether resync read `seq` is a zero chunk built from a hole probe: its range
    /// must still read as zeros (finding data there means something else wrote the
    /// volume), and may be longer than any read.
    pub fn is_zero_chunk(&self, seq: Seq) -> bool {
        self.resync.holes.chunks.contains(&seq)
    }

    /// The agent can say where the volume's holes are (an image file on a file
    /// system with SEEK_DATA): resync passes then ask ([`Action::ProbeHoles`]) and
    /// send holes as zero chunks without reading them.
    pub fn enable_hole_probes(&mut self) {
        self.resync.holes.enabled = true;
    }

    /// The answer to [`Action::ProbeHoles`]: of `[offset, offset + len)` (`len` may
    /// be shorter than asked: the answer covers only that much), only `data` may
    /// hold data (ranges in order, any alignment); the rest reads as zeros. Must be
    /// given before any other event (the agent answers as it carries out the
    /// action), and read the allocation after every write completed so far.
    pub fn holes_probed(
        &mut self,
        offset: u64,
        len: u64,
        data: &[std::ops::Range<u64>],
        out: &mut Vec<Action<T, D>>,
    ) {
        let bs = u64::from(self.cfg.block_size);
        let holes = &mut self.resync.holes;
        holes.probing = false;
        if self.resync.pass.is_none() {
            // The pass that asked has ended: nothing to describe holes for.
            holes.forget_all();
            self.pump_resync(out);
            return;
        }
        holes.zero.clear();
        holes.from = offset.div_ceil(bs);
        holes.to = (offset + len)
            .min(self.cfg.size_bytes)
            .div_ceil(bs)
            .max(holes.from);
        if offset + len >= self.cfg.size_bytes {
            holes.to = self.dirty.block_count().0;
        }
        let mut at = holes.from;
        for r in data {
            let (a, b) = (r.start / bs, r.end.div_ceil(bs).min(holes.to));
            if a > at {
                holes.zero.insert(at, a.min(holes.to));
            }
            at = at.max(b);
        }
        if at < holes.to {
            holes.zero.insert(at, holes.to);
        }
        // Writes in flight may be missing from the answer.
        for op in self.ops.values().filter(|op| op.kind.is_client()) {
            let (a, b) = op.range.blocks(self.cfg.block_size);
            self.resync.holes.forget(a.0, b.0);
        }
        self.pump_resync(out);
    }

    /// Produce chunks while the rate limit and the window allow.
    pub(super) fn pump_resync(&mut self, out: &mut Vec<Action<T, D>>) {
        // ha: `tandem pause-sync` stops the chunks (and the budget's refill).
        if !self.wants_resync_chunk() || self.cfg.resync_paused {
            self.resync.last_refill_ms = None;
            return;
        }
        let rate = self.cfg.resync_rate_bytes_per_s;
        if rate == 0 {
            // ha: unlimited; a later rate starts from an empty bucket.
            self.resync.budget_bytes = 0;
        } else {
            let last = *self.resync.last_refill_ms.get_or_insert(self.now_ms);
            let elapsed_ms = self.now_ms.saturating_sub(last);
            self.resync.last_refill_ms = Some(self.now_ms);
            let refill = (rate as u128 * elapsed_ms as u128 / 1000) as i64;
            // At most 100 ms of budget accumulates, so a pause does not turn into a burst.
            let cap = (rate / 10).max(1 << 20) as i64;
            self.resync.budget_bytes = (self.resync.budget_bytes + refill).min(cap);
        }
        while self.wants_resync_chunk()
            && (rate == 0 || self.resync.budget_bytes > 0)
            && self
                .stream
                .has_window_room(&self.cfg, self.cfg.resync_chunk_bytes)
        {
            self.next_resync_chunk(out);
        }
    }

    /// Produce the next resync chunk: a read of dirty blocks whose contents (or
    /// hashes) will be shipped in seq order.
    fn next_resync_chunk(&mut self, out: &mut Vec<Action<T, D>>) {
        let bs = self.cfg.block_size as u64;
        let max_blocks = BlockCount(self.cfg.resync_chunk_bytes / bs);
        let cursor = self.resync.pass.as_ref().expect("checked").progress.cursor;
        let Some((first, mut run)) = self.dirty.next_dirty_run(cursor, max_blocks) else {
            let blocks = self.dirty.block_count();
            let p = self.resync.pass.as_mut().expect("checked");
            p.exhausted = true;
            p.progress.cursor = BlockIndex(blocks.0);
            self.maybe_finish_pass(out);
            return;
        };
        if self.resync.holes.enabled {
            let holes = &mut self.resync.holes;
            if !holes.covers(first.0) {
                holes.probing = true;
                let offset = first.0 * bs;
                out.push(Action::ProbeHoles {
                    offset,
                    len: HOLE_PROBE_BYTES.min(self.cfg.size_bytes - offset),
                });
                return;
            }
            if let Some(end) = holes.hole_end(first.0) {
                // A hole: one zero chunk over the dirty run inside it, compared
                // blocks included (zeros sent are exact, a hash costs a read).
                let cap = (end - first.0).min(ZERO_CHUNK_BYTES_MAX / bs);
                let (_, n) = self
                    .dirty
                    .next_dirty_run(first, BlockCount(cap))
                    .expect("first is dirty");
                let end = BlockIndex(first.0 + n.0);
                self.resync.verify.clear(first, end);
                self.resync.fine.clear(first, end);
                let range = ByteRange::new(
                    first.0 * bs,
                    (n.0 * bs).min(self.cfg.size_bytes - first.0 * bs),
                );
                let p = self.resync.pass.as_mut().expect("checked");
                p.progress.cursor = end;
                p.live += 1;
                let durable = self.stream.durable_through();
                let chunks = &mut self.resync.holes.chunks;
                *chunks = chunks.split_off(&durable.next());
                chunks.insert(self.next_seq);
                // Charged like any chunk (its read gives back all but a header:
                // charge_read), so the credit stays balanced under a rate limit.
                self.resync.charge_start(OpKind::ResyncRead, range);
                let seq = self.admit_internal(range, OpKind::ResyncRead, out);
                self.stream
                    .enqueue_carried(seq, range, self.now_ms, Carried::Data, 0);
                return;
            }
            // Data: stop where the next hole starts, which goes as a zero chunk.
            if let Some(h) = holes.next_hole(first.0) {
                run = BlockCount(run.0.min(h - first.0));
            }
        }
        // Blocks to verify go out as hashes (at most HASHES_PER_CHECK_MAX), the others
        // as data; a chunk is one or the other. Whole ranges are compared first (one
        // hash per range_hash_blocks), blocks of a range that differed one by one.
        let hash_run = self.resync.verify.next_dirty_run(first, run);
        let (kind, count) = match hash_run {
            Some((start, n)) if start == first => {
                let unit = self.cfg.range_hash_blocks;
                let mut units = if self.resync.fine.is_dirty(first) {
                    0
                } else {
                    n.0 / unit
                };
                if units > 0
                    && let Some((f, _)) = self
                        .resync
                        .fine
                        .next_dirty_run(first, BlockCount(units * unit))
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
                self.resync.verify.clear(first, BlockIndex(first.0 + n.0));
                self.resync.fine.clear(first, BlockIndex(first.0 + n.0));
                (kind, n)
            }
            Some((start, _)) if start.0 < first.0 + run.0 => {
                (OpKind::ResyncRead, BlockCount(start.0 - first.0))
            }
            _ => (OpKind::ResyncRead, run),
        };
        let offset = first.0 * bs;
        let len = (count.0 * bs).min(self.cfg.size_bytes - offset);
        let range = ByteRange::new(offset, len);
        self.resync.charge_start(kind, range); // ha: paced when started
        let p = self.resync.pass.as_mut().expect("checked");
        p.progress.cursor = BlockIndex(first.0 + count.0);
        p.live += 1;
        let carried = match kind {
            OpKind::ResyncRead => Carried::Data,
            OpKind::HashRead => Carried::Compare { unit_blocks: 1 },
            _ => Carried::Compare {
                unit_blocks: self.cfg.range_hash_blocks,
            },
        };
        let seq = self.admit_internal(range, kind, out);
        let wire = if kind == OpKind::ResyncRead { len } else { 0 };
        self.stream
            .enqueue_carried(seq, range, self.now_ms, carried, wire);
    }

    /// End the pass once every chunk is produced and durable (see the module docs).
    pub(super) fn maybe_finish_pass(&mut self, out: &mut Vec<Action<T, D>>) {
        let Some(p) = &self.resync.pass else {
            return;
        };
        if !p.exhausted || p.live > 0 {
            return;
        }
        self.resync.pass = None;
        self.resync.holes.forget_all();
        if self.is_ahead() {
            // Leaving ahead starts the next pass.
            return;
        }
        if self.dirty.dirty_count().0 == 0 {
            let through = Seq(self.stream.next_ship().0 - 1);
            self.stream.done_marker = Some(through);
            out.push(Action::Ship(Outgoing::ResyncDone { through }));
            // The secondary may have made all of it durable already.
            self.after_durable(out);
        } else {
            self.start_pass(false, out);
        }
    }

    /// The secondary recorded durably the end of the section that `ResyncDone {
    /// through }` ended (see the module docs).
    pub fn peer_section_done(&mut self, through: Seq, out: &mut Vec<Action<T, D>>) {
        if !self.stream.is_streaming() {
            return;
        }
        match self.stream.done_marker {
            Some(marker) if through <= marker => {}
            // Only for a ResyncDone shipped: a newer one supersedes an older one
            // (a pass that started after it), so an older answer is stale.
            None if self.stream.section_done.is_some_and(|s| through <= s) => return,
            _ => {
                self.end_session(SessionFault::SectionDoneUnasked { through }, out);
                return;
            }
        }
        if self.stream.section_done.is_none_or(|s| s < through) {
            self.stream.section_done = Some(through);
        }
        self.after_durable(out);
    }

    /// After the secondary's durable point moved: passes, sections, FLUSHes, verify.
    pub(super) fn after_durable(&mut self, out: &mut Vec<Action<T, D>>) {
        self.maybe_finish_pass(out);
        if let Some(marker) = self.stream.done_marker
            && self.stream.durable_through() >= marker
            && self.stream.section_done >= Some(marker)
        {
            self.stream.done_marker = None;
            // The secondary holds this node's image through `marker` durably:
            // block-mode writes up to it that lost their session are on it,
            // whatever became dirty after the ResyncDone (a later write whose
            // local I/O failed and poisoned the node kept the section from
            // closing, and such a write waited forever: fuzz primary target,
            // regressions/primary/block-waiter-after-a-poisoned-section-end).
            self.release_in_sync_waiters_through(marker, out);
            if self.dirty.dirty_count().0 == 0 && !self.is_ahead() && self.resync.pass.is_none() {
                self.stream.close_section();
                out.push(Action::Note(Note::InSync {
                    through: marker,
                    resynced_blocks: std::mem::take(&mut self.resync.section_blocks),
                }));
                if self.alone.is_none() {
                    out.push(Action::PeerReachedGeneration);
                }
                self.alone = Some(false);
                // Requests that waited for the section to end go now.
                self.admit_parked(out);
                // The bitmap on disk still lists what this pass resent (a full sync:
                // every block); a crash before the next periodic persist would
                // resend all of it again.
                self.persist_now(out);
                self.release_in_sync_waiters(out);
            }
        }
        self.try_complete_flushes(out);
        self.check_verify_repaired();
    }
}

#[cfg(test)]
mod hole_tests {
    //! Hole probes (issue 11): holes go as large zero chunks without reads, data
    //! as ordinary chunks, and a write the probe could not see is never zeroed.

    use super::super::{Config, Mode, Outgoing, ReadResult};
    use super::*;

    const BS: u64 = 4096;
    type E = PrimaryEngine<u32, Vec<u8>>;
    type Out = Vec<Action<u32, Vec<u8>>>;

    fn full_sync_engine(blocks: u64) -> (E, Out) {
        let mut c = Config::new(Mode::Async, blocks * BS, BS as u32);
        c.resync_chunk_bytes = 16 * BS;
        let mut dirty = DirtyBitmap::for_volume(c.size_bytes, c.block_size);
        dirty.mark_all();
        let mut e = PrimaryEngine::new(c, dirty, Seq(1));
        e.enable_hole_probes();
        let mut out = Vec::new();
        e.session_started(true, &mut out);
        // The session waits for the all-dirty bitmap to be persisted.
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::PersistBitmap { .. }))
        );
        out.clear();
        e.bitmap_persisted(Ok(()), &mut out);
        e.tick(1, &mut out);
        (e, out)
    }

    fn probe(out: &Out) -> Option<(u64, u64)> {
        out.iter().find_map(|a| match a {
            Action::ProbeHoles { offset, len } => Some((*offset, *len)),
            _ => None,
        })
    }

    /// Answer local reads: data where `data` says, zeros elsewhere; collect frames.
    fn settle(e: &mut E, out: &mut Out, frames: &mut Vec<(u64, u64, bool)>) {
        loop {
            let pending = std::mem::take(out);
            if pending.is_empty() {
                return;
            }
            for a in pending {
                match a {
                    Action::StartLocal { seq, kind, .. } if kind.is_client() => {
                        e.local_done(seq, Ok(()), out);
                    }
                    Action::StartLocal { seq, range, .. } => {
                        let r = if range.len > 16 * BS {
                            ReadResult::Zero
                        } else {
                            ReadResult::Data(vec![1])
                        };
                        e.read_done(seq, Ok(r), out);
                    }
                    Action::Ship(Outgoing::Write {
                        offset, data: _, ..
                    }) => frames.push((offset, 0, true)),
                    Action::Ship(Outgoing::Zeroes { offset, len, .. }) => {
                        frames.push((offset, len, false))
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn holes_go_as_large_zero_chunks_and_data_as_chunks() {
        let blocks = 1 << 20; // 4 GiB
        let (mut e, mut out) = full_sync_engine(blocks);
        let (offset, len) = probe(&out).expect("the pass asks where data is");
        assert_eq!((offset, len), (0, blocks * BS));
        out.clear();
        // Data at [1 GiB, 1 GiB + 64 KiB) only.
        let g = 1u64 << 30;
        let data: Vec<std::ops::Range<u64>> = std::iter::once(g..g + (64 << 10)).collect();
        e.holes_probed(offset, len, &data, &mut out);
        let mut frames = Vec::new();
        settle(&mut e, &mut out, &mut frames);
        assert_eq!(
            frames,
            vec![
                (0, g, false),
                (g, 0, true),
                (g + (64 << 10), 4 * g - g - (64 << 10), false)
            ],
            "one zero chunk per hole, the data read in chunks of 16 blocks"
        );
    }

    #[test]
    fn a_write_in_flight_at_the_probe_is_not_zeroed() {
        let blocks = 1 << 16;
        let (mut e, mut out) = full_sync_engine(blocks);
        let (offset, len) = probe(&out).expect("probe");
        out.clear();
        // A client write into the "hole" is admitted before the answer comes (the
        // probe may not have seen it).
        e.submit(
            OpKind::Write,
            ByteRange::new(100 * BS, BS),
            false,
            Some(vec![7]),
            1,
            0,
            &mut out,
        );
        e.holes_probed(offset, len, &[], &mut out);
        let mut frames = Vec::new();
        settle(&mut e, &mut out, &mut frames);
        let zeroed: Vec<_> = frames.iter().filter(|f| !f.2).collect();
        assert!(
            zeroed
                .iter()
                .all(|&&(o, l, _)| o + l <= 100 * BS || o >= 101 * BS),
            "block 100 holds a write: no zero chunk may cover it: {frames:?}"
        );
        // A write admitted after the answer takes its range out of the hint too.
        let (mut e, mut out) = full_sync_engine(blocks);
        let (offset, len) = probe(&out).expect("probe");
        out.clear();
        e.holes_probed(offset, len, &[], &mut out);
        // The first zero chunk went out already; the rest of the pass follows.
        assert!(!e.resync.holes.zero.is_empty() || e.resync.holes.to > 0);
        e.resync.holes.forget(0, blocks);
        assert!(e.resync.holes.hole_end(200).is_none());
    }
    /// The hole map of a pass is dropped when the pass ends: every client write
    /// afterwards would split it (one entry per write into a hole, up to millions
    /// over a 64 GiB probe) for as long as the session lasts, a cost per write
    /// and memory that grows with the volume, not with the bitmaps (issue 11).
    #[test]
    fn the_hole_map_goes_with_the_pass() {
        let blocks = 1 << 16;
        let (mut e, mut out) = full_sync_engine(blocks);
        let (offset, len) = probe(&out).expect("probe");
        out.clear();
        e.holes_probed(offset, len, std::slice::from_ref(&(0..BS)), &mut out);
        let mut frames = Vec::new();
        settle(&mut e, &mut out, &mut frames);
        let last = e.next_seq.prev();
        e.peer_durable(last, &mut out);
        assert!(e.resync_progress().is_none(), "the pass ended");
        let through = out
            .iter()
            .find_map(|a| match a {
                Action::Ship(Outgoing::ResyncDone { through }) => Some(*through),
                _ => None,
            })
            .expect("ResyncDone");
        e.peer_durable(through, &mut out);
        e.peer_section_done(through, &mut out);
        for i in 0..64 {
            e.submit(
                OpKind::Write,
                ByteRange::new((2 + 7 * i) * BS, BS),
                false,
                Some(vec![1]),
                1,
                0,
                &mut out,
            );
        }
        assert!(
            e.resync.holes.zero.is_empty(),
            "{} hole runs kept after the pass",
            e.resync.holes.zero.len()
        );
        assert!(!e.resync.holes.covers(0), "a later pass probes again");
    }

    /// A zero chunk is charged like any chunk when it starts, so the refund of its
    /// read (all but a header) leaves no credit behind: merged with the ha branch's
    /// start-time charging, a 1 GiB hole left 1 GiB of credit and the rate limit of
    /// the rest of the pass was void.
    #[test]
    fn a_zero_chunk_leaves_no_rate_credit() {
        let blocks = 1 << 18; // 1 GiB
        let mut c = Config::new(Mode::Async, blocks * BS, BS as u32);
        c.resync_chunk_bytes = 16 * BS;
        c.resync_rate_bytes_per_s = 1 << 20;
        let mut dirty = DirtyBitmap::for_volume(c.size_bytes, c.block_size);
        dirty.mark_all();
        let mut e: E = PrimaryEngine::new(c, dirty, Seq(1));
        e.enable_hole_probes();
        let mut out = Vec::new();
        e.session_started(true, &mut out);
        out.clear();
        e.bitmap_persisted(Ok(()), &mut out);
        e.tick(1, &mut out);
        e.tick(200, &mut out); // some budget
        let (offset, len) = probe(&out).expect("probe");
        out.clear();
        // Data in the last 64 KiB only: one zero chunk first.
        let end = blocks * BS;
        let data: Vec<std::ops::Range<u64>> = std::iter::once(end - (64 << 10)..end).collect();
        e.holes_probed(offset, len, &data, &mut out);
        let mut frames = Vec::new();
        settle(&mut e, &mut out, &mut frames);
        assert_eq!(frames.first(), Some(&(0, end - (64 << 10), false)));
        assert!(
            e.resync.budget_bytes <= 1 << 20,
            "{} bytes of credit after a zero chunk",
            e.resync.budget_bytes
        );
    }
}
