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
//! - nothing dirty left: `ResyncDone { through }` is shipped; once it is durable
//!   the secondary is a consistent copy as of `through` (it marks itself UpToDate)
//!   and the section closes;
//! - blocks left (mismatches, changes kept by a chunk): another pass.
//!
//! Pacing: a token bucket of `resync_rate_bytes_per_s` (refilled on every tick,
//! at most 100 ms of budget kept), charged with each chunk's bytes on the wire;
//! chunks also occupy the replication window like writes.

use super::stream::Carried;
use super::{Action, Note, OpKind, Outgoing, PrimaryEngine};
use crate::bitmap::DirtyBitmap;
use crate::types::{BlockCount, BlockIndex, ByteRange, Seq};

/// Blocks per hash of a coarse comparison (64 KiB at 4 KiB blocks). Checksum resync
/// (seeding, crash recovery) compares ranges first, then block by block only where
/// a range differs. With 1% of blocks changed at random, 85% of 16-block ranges are
/// unchanged, so the hashes on the wire shrink about fourfold; clustered changes
/// (the usual case) do much better.
pub const RANGE_HASH_BLOCKS: u64 = 16;

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
        }
    }

    /// No chunk of a pass is in flight.
    pub(super) fn pass_is_idle(&self) -> bool {
        self.pass.as_ref().is_none_or(|p| p.live == 0)
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
        self.last_refill_ms = None;
    }
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        self.resync.pass.as_ref().map(|p| p.progress)
    }

    /// Start a resync pass over the dirty bitmap; ships ResyncStart (whose seq tells
    /// the secondary the next seq to come).
    pub(super) fn start_pass(&mut self, full: bool, out: &mut Vec<Action<T, D>>) {
        let total = self.dirty.dirty_count();
        self.resync.pass = None;
        if total.0 > 0 {
            if !self.stream.is_section_open() {
                self.resync.section_blocks = 0;
            }
            self.stream.open_section();
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
            blocks: total,
            full,
        }));
        if total.0 == 0 && !self.stream.is_section_open() {
            // Nothing to resend: the secondary holds this node's data.
            if self.alone.is_none() {
                out.push(Action::PeerReachedGeneration);
            }
            self.alone = Some(false);
        }
    }

    /// Whether a resync chunk could be produced now.
    pub fn wants_resync_chunk(&self) -> bool {
        self.is_shipping() && self.resync.pass.as_ref().is_some_and(|p| !p.exhausted)
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
        let Some((first, run)) = self.dirty.next_dirty_run(cursor, max_blocks) else {
            let blocks = self.dirty.block_count();
            let p = self.resync.pass.as_mut().expect("checked");
            p.exhausted = true;
            p.progress.cursor = BlockIndex(blocks.0);
            self.maybe_finish_pass(out);
            return;
        };
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

    /// After the secondary's durable point moved: passes, sections, FLUSHes, verify.
    pub(super) fn after_durable(&mut self, out: &mut Vec<Action<T, D>>) {
        self.maybe_finish_pass(out);
        if let Some(marker) = self.stream.done_marker
            && self.stream.durable_through() >= marker
        {
            self.stream.done_marker = None;
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
