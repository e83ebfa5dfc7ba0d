//! Online verify (`tandem verify`) and the answers to hash comparisons.
//!
//! An online verify compares every block of both volumes by blake3 hash while
//! client writes keep flowing, and must never report a block that differs only
//! because a write was in flight. The mechanism is ordering, not retrying: a
//! verify chunk is an op like any other, with its own seq `S`, and
//! - on the primary it goes through the overlap sequencer: its local read starts
//!   only once every earlier overlapping op (seq < S) has completed locally, and
//!   every later overlapping op (seq > S) waits until the read has finished. The
//!   hashes therefore describe exactly the primary's range after the writes < S and
//!   before the writes > S;
//! - its `HashCheck` frame is shipped in seq order, and the secondary hashes its
//!   blocks after applying every earlier frame and before any later one. As long
//!   as every write < S is in the stream (connected, not ahead, no dirty block
//!   awaiting resync), both sides hash the same logical state, so a reported
//!   mismatch is a real divergence.
//!
//! Chunks are produced only in that situation: the verify pauses while the
//! primary is ahead or a resync is pending (blocks in the dirty bitmap are known
//! to differ, they are not what verify looks for), and fails if the session
//! ends. Chunks change nothing on the secondary; they take a window slot but no
//! window bytes; at most [`VERIFY_CHUNKS_IN_FLIGHT_MAX`] are outstanding, paced by
//! the verify's own rate. The cost on clients: a write overlapping a chunk waits
//! for one chunk read (at most `resync_chunk_bytes`, 1 MiB by default).
//! With `repair`, the mismatched blocks are marked dirty once the scan is complete
//! and a resync pass sends them; the verify is done when none of them is dirty any
//! more, i.e. their resync frames are durable on the secondary.

use std::collections::BTreeMap;

use super::stream::Carried;
use super::{Action, OpKind, PrimaryEngine, SessionFault};
use crate::bitmap::DirtyBitmap;
use crate::types::{BlockCount, BlockIndex, ByteRange, Seq};

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
struct Run {
    repair: bool,
    /// Next block to compare.
    cursor: BlockIndex,
    compared: u64,
    /// Blocks the secondary reported different (one bit per block, so bounded).
    mismatched: DirtyBitmap,
    state: VerifyState,
    /// Verify rate limit in bytes read per second (0 = unlimited) and its bucket.
    rate_bytes_per_s: u64,
    budget_bytes: i64,
    last_refill_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub(super) struct Online {
    run: Option<Run>,
    /// Chunks issued in this session and not answered yet.
    pub(super) chunks: BTreeMap<Seq, ByteRange>,
}

impl Online {
    pub(super) fn session_ended(&mut self) {
        self.chunks.clear();
        if let Some(r) = self.run.as_mut() {
            r.last_refill_ms = None;
        }
    }
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    /// Start an online verify of the whole volume (see the module docs), reading at
    /// most `rate_bytes_per_s` (0 = unlimited).
    pub fn start_online_verify(
        &mut self,
        repair: bool,
        rate_bytes_per_s: u64,
    ) -> Result<(), VerifyRefusal> {
        if let Some(v) = &self.online.run
            && matches!(v.state, VerifyState::Scanning | VerifyState::Repairing)
        {
            return Err(VerifyRefusal::InProgress(
                self.verify_report().expect("running"),
            ));
        }
        if !self.is_streaming() {
            return Err(VerifyRefusal::NotConnected);
        }
        if self.is_ahead() {
            return Err(VerifyRefusal::Ahead);
        }
        let pending = self.dirty.dirty_count().0;
        if self.resync_progress().is_some() || pending > 0 {
            return Err(VerifyRefusal::Resyncing {
                pending_blocks: pending,
            });
        }
        self.online.run = Some(Run {
            repair,
            cursor: BlockIndex(0),
            compared: 0,
            mismatched: DirtyBitmap::new(self.dirty.block_count()),
            state: VerifyState::Scanning,
            rate_bytes_per_s,
            budget_bytes: 0,
            last_refill_ms: None,
        });
        Ok(())
    }

    /// The verify running, or the one finished last.
    pub fn verify_report(&self) -> Option<VerifyReport> {
        self.online.run.as_ref().map(|v| VerifyReport {
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
        let Some(v) = &self.online.run else {
            return (Vec::new(), false);
        };
        let bs = self.cfg.block_size as u64;
        let mut ranges = Vec::new();
        let mut from = BlockIndex(0);
        while let Some((first, n)) = v.mismatched.next_dirty_run(from, BlockCount(u64::MAX)) {
            if ranges.len() == max {
                return (ranges, true);
            }
            let offset = first.0 * bs;
            ranges.push(ByteRange::new(
                offset,
                (n.0 * bs).min(self.cfg.size_bytes - offset),
            ));
            from = BlockIndex(first.0 + n.0);
        }
        (ranges, false)
    }

    /// Whether a verify chunk could be produced now: scanning, blocks left, connected
    /// and shipping, no resync pending (module docs), and fewer than
    /// [`VERIFY_CHUNKS_IN_FLIGHT_MAX`] chunks unanswered.
    pub fn wants_verify_chunk(&self) -> bool {
        self.online.run.as_ref().is_some_and(|v| {
            v.state == VerifyState::Scanning && v.cursor.0 < self.dirty.block_count().0
        }) && self.is_shipping()
            && self.resync_progress().is_none()
            && self.dirty.dirty_count().0 == 0
            && self.online.chunks.len() < VERIFY_CHUNKS_IN_FLIGHT_MAX
    }

    /// Produce verify chunks while the verify's rate and the window allow.
    pub(super) fn pump_verify(&mut self, out: &mut Vec<Action<T, D>>) {
        if !self.wants_verify_chunk() {
            if let Some(r) = self.online.run.as_mut() {
                r.last_refill_ms = None;
            }
            return;
        }
        let now = self.now_ms;
        let r = self.online.run.as_mut().expect("wants a chunk");
        let rate = r.rate_bytes_per_s;
        if rate > 0 {
            let last = *r.last_refill_ms.get_or_insert(now);
            r.last_refill_ms = Some(now);
            let refill = (rate as u128 * now.saturating_sub(last) as u128 / 1000) as i64;
            r.budget_bytes = (r.budget_bytes + refill).min((rate / 10).max(1 << 20) as i64);
        }
        while self.wants_verify_chunk()
            && self.stream.has_window_room(&self.cfg, 0)
            && self
                .online
                .run
                .as_ref()
                .is_some_and(|r| r.rate_bytes_per_s == 0 || r.budget_bytes > 0)
        {
            self.next_verify_chunk(out);
        }
    }

    /// Produce the next verify chunk: a local read and hash ordered at its seq by the
    /// sequencer, then a `HashCheck` frame at the same seq.
    fn next_verify_chunk(&mut self, out: &mut Vec<Action<T, D>>) {
        let bs = self.cfg.block_size as u64;
        let max_blocks =
            (self.cfg.resync_chunk_bytes / bs).min(crate::wire::HASHES_PER_CHECK_MAX as u64);
        let blocks_total = self.dirty.block_count().0;
        let v = self.online.run.as_mut().expect("checked");
        let first = v.cursor;
        let count = max_blocks.min(blocks_total - first.0);
        v.cursor = BlockIndex(first.0 + count);
        let offset = first.0 * bs;
        let range = ByteRange::new(offset, (count * bs).min(self.cfg.size_bytes - offset));
        v.budget_bytes -= range.len as i64;
        let seq = self.admit_internal(range, OpKind::VerifyRead, out);
        self.online.chunks.insert(seq, range);
        self.stream
            .enqueue_carried(seq, range, self.now_ms, Carried::Verify, 0);
    }

    /// The secondary compared the hash check `seq`: `mismatched` are the indices of
    /// the hashes that differ. A resync comparison keeps those blocks dirty (a data
    /// pass sends them); a verify chunk reports them.
    pub fn peer_hash_reply(&mut self, seq: Seq, mismatched: &[u32], out: &mut Vec<Action<T, D>>) {
        if !self.is_streaming() {
            return;
        }
        if let Some(range) = self.online.chunks.remove(&seq) {
            self.verify_reply(seq, range, mismatched, out);
            self.peer_applied(seq, out);
            return;
        }
        let bs = self.cfg.block_size as u64;
        let Ok(i) = self.stream.unacked.binary_search_by_key(&seq, |u| u.seq) else {
            self.end_session(SessionFault::UnexpectedHashReply { seq }, out);
            return;
        };
        let u = &self.stream.unacked[i];
        let Carried::Compare { unit_blocks } = u.carried else {
            self.end_session(SessionFault::UnexpectedHashReply { seq }, out);
            return;
        };
        if !u.shipped {
            self.end_session(SessionFault::UnexpectedHashReply { seq }, out);
            return;
        }
        let unit = unit_blocks * bs;
        let units = u.range.len.div_ceil(unit);
        if mismatched.iter().any(|&m| m as u64 >= units) {
            self.end_session(SessionFault::MalformedHashReply { seq, units }, out);
            return;
        }
        let range = u.range;
        self.stream.unacked[i].answered = true;
        for &m in mismatched {
            let off = range.offset + m as u64 * unit;
            let r = ByteRange::new(off, unit.min(range.end() - off));
            self.stream.unacked[i].keep.push(r);
            if unit > bs {
                // A range differs: compare its blocks one by one in the next pass.
                let (a, b) = r.blocks(self.cfg.block_size);
                self.resync.verify.mark(a, b);
                self.resync.mark_fine(a, b);
            }
        }
        self.peer_applied(seq, out);
    }

    /// The secondary answered verify chunk `seq`.
    fn verify_reply(
        &mut self,
        seq: Seq,
        range: ByteRange,
        mismatched: &[u32],
        out: &mut Vec<Action<T, D>>,
    ) {
        let bs = self.cfg.block_size as u64;
        let blocks = range.len.div_ceil(bs);
        if mismatched.iter().any(|&m| m as u64 >= blocks) {
            self.end_session(SessionFault::MalformedHashReply { seq, units: blocks }, out);
            return;
        }
        let Some(v) = self.online.run.as_mut() else {
            return;
        };
        if v.state != VerifyState::Scanning {
            return;
        }
        let (first, _) = range.blocks(self.cfg.block_size);
        for &m in mismatched {
            let b = BlockIndex(first.0 + m as u64);
            v.mismatched.mark(b, BlockIndex(b.0 + 1));
        }
        v.compared += blocks;
        if v.cursor.0 < self.dirty.block_count().0 || !self.online.chunks.is_empty() {
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
                (n.0 * bs).min(self.cfg.size_bytes - offset),
            ));
        }
        if self.resync_progress().is_none() && self.is_shipping() {
            self.start_pass(false, out);
        }
    }

    /// With repair: done once no mismatched block is dirty any more (its resync frame
    /// is durable on the secondary).
    pub(super) fn check_verify_repaired(&mut self) {
        let Some(v) = self.online.run.as_mut() else {
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
    pub(super) fn fail_verify(&mut self, reason: String) {
        if let Some(v) = self.online.run.as_mut() {
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
