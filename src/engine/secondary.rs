//! The secondary's apply state machine (sans-IO).
//!
//! Frames arrive in seq order on one stream. Non-overlapping writes are applied
//! in parallel, overlapping ones in seq order (via [`RangeSequencer`]); "applied
//! through N" advances only when every write ≤ N has completed (G2). Flushes
//! are batched: on a timer tick, past a byte threshold, or when the primary
//! relays a FLUSH or a FUA write — never once per write unless asked
//! (ARCHITECTURE §3). It owns no sockets and no files.

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::sequencer::RangeSequencer;
use crate::types::{ByteRange, Seq};

/// What an incoming frame asks the volume to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyKind {
    Write,
    WriteZeroes,
    Trim,
    /// Compare the range with the primary's block hashes; the agent answers with
    /// HashReply, which stands in for Applied.
    HashCheck,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SecondaryAction {
    /// Apply `seq` to the volume (the agent holds its payload).
    StartApply {
        seq: Seq,
        kind: ApplyKind,
        range: ByteRange,
    },
    /// Acknowledge `Applied { seq }`.
    SendApplied { seq: Seq },
    /// fdatasync the volume; everything applied through `through` is covered.
    StartFlush { through: Seq },
    /// Acknowledge `Durable { through_seq }`.
    SendDurable { through: Seq },
    /// Record Inconsistent durably before anything else is applied (resync begins).
    MarkInconsistent,
    /// The resync is durable: record UpToDate.
    MarkUpToDate,
    /// Stop: the session cannot go on (protocol violation or failed I/O).
    Fail { reason: String },
}

/// The secondary's per-session apply state.
pub struct SecondaryEngine {
    sequencer: RangeSequencer,
    expected_next: Seq,
    waiting: BTreeMap<Seq, (ApplyKind, ByteRange)>,
    applied_through: Seq,
    completed_above: BTreeSet<Seq>,
    /// Seq ranges [start, end) the primary skipped (it went ahead): never applied,
    /// but "applied through" may pass over them.
    skipped: BTreeMap<Seq, Seq>,
    /// Hash checks in flight: answered by HashReply instead of Applied.
    hash_checks: std::collections::HashSet<Seq>,
    durable_through: Seq,
    flushing: Option<Seq>,
    /// Highest seq the primary asked to make durable (FLUSH or FUA).
    flush_wanted: Seq,
    bytes_since_flush: u64,
    flush_threshold_bytes: u64,
    resync_done_at: Option<Seq>,
    failed: bool,
}

impl SecondaryEngine {
    /// A session whose first frame will carry `first_seq`.
    pub fn new(first_seq: Seq, flush_threshold_bytes: u64) -> SecondaryEngine {
        assert!(first_seq > Seq::ZERO);
        let before = Seq(first_seq.0 - 1);
        SecondaryEngine {
            sequencer: RangeSequencer::new(),
            expected_next: first_seq,
            waiting: BTreeMap::new(),
            applied_through: before,
            completed_above: BTreeSet::new(),
            skipped: BTreeMap::new(),
            hash_checks: std::collections::HashSet::new(),
            durable_through: before,
            flushing: None,
            flush_wanted: Seq::ZERO,
            bytes_since_flush: 0,
            flush_threshold_bytes,
            resync_done_at: None,
            failed: false,
        }
    }

    pub fn applied_through(&self) -> Seq {
        self.applied_through
    }
    pub fn durable_through(&self) -> Seq {
        self.durable_through
    }
    /// Writes received and not yet applied.
    pub fn in_flight(&self) -> usize {
        self.sequencer.len()
    }
    pub fn is_idle(&self) -> bool {
        self.sequencer.is_empty() && self.flushing.is_none()
    }

    /// A write, write-zeroes or trim frame arrived.
    pub fn receive(
        &mut self,
        seq: Seq,
        kind: ApplyKind,
        range: ByteRange,
        fua: bool,
        out: &mut Vec<SecondaryAction>,
    ) {
        if self.failed {
            return;
        }
        if seq != self.expected_next {
            self.fail(
                format!(
                    "frame seq {seq} out of order: expected {}",
                    self.expected_next
                ),
                out,
            );
            return;
        }
        self.expected_next = seq.next();
        if kind == ApplyKind::HashCheck {
            self.hash_checks.insert(seq);
        }
        if fua {
            self.flush_wanted = self.flush_wanted.max(seq);
        }
        if self.sequencer.admit(seq, range) {
            out.push(SecondaryAction::StartApply { seq, kind, range });
        } else {
            self.waiting.insert(seq, (kind, range));
        }
    }

    /// The primary relayed a FLUSH covering everything through `through`.
    pub fn flush_requested(&mut self, through: Seq, out: &mut Vec<SecondaryAction>) {
        if through >= self.expected_next {
            self.fail(
                format!(
                    "flush through seq {through} before that seq arrived (next expected {})",
                    self.expected_next
                ),
                out,
            );
            return;
        }
        self.flush_wanted = self.flush_wanted.max(through);
        self.maybe_flush(out);
    }

    /// The primary finished a resync pass through `through`.
    pub fn resync_done(&mut self, through: Seq, out: &mut Vec<SecondaryAction>) {
        if through >= self.expected_next {
            self.fail(
                format!("resync done through seq {through} before that seq arrived"),
                out,
            );
            return;
        }
        if through <= self.durable_through {
            out.push(SecondaryAction::MarkUpToDate);
            return;
        }
        self.resync_done_at = Some(through);
        self.flush_wanted = self.flush_wanted.max(through);
        self.maybe_flush(out);
    }

    pub fn apply_done(
        &mut self,
        seq: Seq,
        range: ByteRange,
        result: Result<(), i32>,
        out: &mut Vec<SecondaryAction>,
    ) {
        // Release the writes waiting behind this one even when it failed, so every
        // write received is eventually attempted and nothing waits forever.
        let released = self.sequencer.complete(seq);
        if let Err(errno) = result {
            // The volume now lacks a write it acknowledged receiving: it is no longer
            // prefix-consistent. The primary keeps the range dirty (never Applied).
            out.push(SecondaryAction::MarkInconsistent);
            self.fail(
                format!(
                    "applying seq {seq} at offset {} ({} bytes) failed: {}; the disk is marked Inconsistent and the primary keeps the range for resync",
                    range.offset,
                    range.len,
                    std::io::Error::from_raw_os_error(errno)
                ),
                out,
            );
        } else if self.hash_checks.remove(&seq) {
            // Answered by the agent's HashReply, sent before this completion.
        } else if !self.failed {
            self.bytes_since_flush += range.len;
            out.push(SecondaryAction::SendApplied { seq });
        }
        for next in released {
            let (kind, range) = self.waiting.remove(&next).expect("released op was waiting");
            out.push(SecondaryAction::StartApply {
                seq: next,
                kind,
                range,
            });
        }
        if self.failed {
            // Nothing more counts as applied or durable in a failed session.
            return;
        }
        self.completed_above.insert(seq);
        self.advance();
        if self.bytes_since_flush >= self.flush_threshold_bytes {
            self.flush_wanted = self.flush_wanted.max(self.applied_through);
        }
        self.maybe_flush(out);
    }

    /// Periodic tick (a few ms): flush whatever has been applied since the last flush.
    pub fn tick(&mut self, out: &mut Vec<SecondaryAction>) {
        if self.applied_through > self.durable_through {
            self.flush_wanted = self.flush_wanted.max(self.applied_through);
        }
        self.maybe_flush(out);
    }

    fn maybe_flush(&mut self, out: &mut Vec<SecondaryAction>) {
        if self.failed || self.flushing.is_some() {
            return;
        }
        if self.flush_wanted > self.durable_through && self.applied_through > self.durable_through {
            // Flush what is applied now; a wanted seq beyond it is covered by a later flush.
            let through = self.applied_through;
            self.flushing = Some(through);
            self.bytes_since_flush = 0;
            out.push(SecondaryAction::StartFlush { through });
        }
    }

    pub fn flush_done(&mut self, result: Result<(), i32>, out: &mut Vec<SecondaryAction>) {
        let through = self.flushing.take().expect("flush_done without a flush");
        if let Err(errno) = result {
            self.fail(
                format!("flush of the volume failed: {}; volume poisoned, restart the agent after checking the disk", std::io::Error::from_raw_os_error(errno)),
                out,
            );
            return;
        }
        self.durable_through = through;
        out.push(SecondaryAction::SendDurable { through });
        if let Some(at) = self.resync_done_at
            && through >= at
        {
            self.resync_done_at = None;
            out.push(SecondaryAction::MarkUpToDate);
        }
        self.maybe_flush(out);
    }

    /// A `ResyncStart` arrived: a resync of `blocks` blocks begins when `blocks` > 0.
    pub fn resync_started(&mut self, next: Seq, blocks: u64, out: &mut Vec<SecondaryAction>) {
        if self.failed {
            return;
        }
        if next < self.expected_next {
            self.fail(
                format!(
                    "ResyncStart names next seq {next}, but seq {} was expected",
                    self.expected_next
                ),
                out,
            );
            return;
        }
        if next > self.expected_next {
            // The primary went ahead: seqs in between were tracked in its bitmap
            // and are covered by the resync that follows.
            self.skipped.insert(self.expected_next, next);
            self.expected_next = next;
            self.advance();
        }
        self.resync_done_at = None;
        if blocks > 0 {
            out.push(SecondaryAction::MarkInconsistent);
        } else {
            // Nothing differs: this node holds the primary's data as of this seq (its
            // earlier sessions' writes were made durable when they ended), so it is
            // UpToDate in the primary's generation.
            out.push(SecondaryAction::MarkUpToDate);
        }
    }

    fn advance(&mut self) {
        loop {
            let next = self.applied_through.next();
            if self.completed_above.first() == Some(&next) {
                self.completed_above.pop_first();
                self.applied_through = next;
            } else if let Some(end) = self.skipped.remove(&next) {
                self.applied_through = Seq(end.0 - 1);
            } else {
                break;
            }
        }
    }

    fn fail(&mut self, reason: String, out: &mut Vec<SecondaryAction>) {
        self.failed = true;
        out.push(SecondaryAction::Fail { reason });
    }
}
