//! The write-intent (activity) log's bookkeeping (ARCHITECTURE §4).
//!
//! A client write pins its extents from acceptance until it is done locally and,
//! if it is in the stream, durable on the secondary (or out of the stream, its
//! blocks then in the dirty bitmap). Neither its local I/O nor its frame may go
//! out before the log record naming its extents is durable: after a crash of this
//! node, the logged extents are what may differ besides the persisted bitmap.
//!
//! Retiring an extent drops it from the log, so whatever of it may differ must be
//! in the persisted bitmap first: its dirty blocks, its writes not yet durable on
//! the secondary, and — the part a process kill never shows — its blocks written
//! locally but not yet covered by a local flush. A power loss undoes those on this
//! node while the secondary may keep them (issue 9, finding 1). Rather than an
//! fdatasync of the whole volume before every retirement (it would write back the
//! page cache each time), those blocks go into the persisted bitmap with the
//! others; the next persist after a local flush clears them again.
//!
//! Writes of the log are issued one at a time ([`LOG_WRITES_IN_FLIGHT`]);
//! activations arriving meanwhile are batched into the next record (one small
//! durable write per batch).
//!
//! A record that retires extents lists them once more when it has room
//! (`record_max`), so its bitmap pages and the record can share one fdatasync
//! (`pages_with_record`): whichever of the two a power loss keeps, the retired
//! extents stay covered — by the record listing them, or by the pages. The next
//! record drops them, and it only begins after that fdatasync returned.
//! Without room the pages are made durable first, then the record (two
//! fdatasyncs). Issue 11: random writes over a whole 64 GiB volume retire an
//! extent with nearly every write, and the writes waited on two fdatasyncs per
//! record.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{Action, LocalStage, PrimaryEngine, ShipStage};
use crate::bitmap::{BitmapPages, PAGE_BLOCKS};
use crate::engine::activity::ActiveSet;
use crate::engine::rangeset::RangeSet;
use crate::meta::AL_EXTENTS_MAX;
use crate::types::{BlockIndex, ByteRange, Seq};

/// Activity-log writes issued and not yet reported durable, at most. More than
/// one is allowed by the engine, the simulator and the fuzz target (the writer
/// carries them out in order, each durable before the next begins), but two
/// measured no faster (issue 11, benches/RESULTS.md, session 16).
pub const LOG_WRITES_IN_FLIGHT: u64 = 1;

pub(super) struct Intent {
    set: ActiveSet,
    /// Writes of the log issued and completed (numbered from 1).
    issued: u64,
    completed: u64,
    /// Extent → the log write that records it, until that write completes.
    recording: HashMap<u32, u64>,
    /// The set changed since the last write was issued.
    changed: bool,
    /// Extents that left the set since the last write was issued: their bitmap
    /// pages are persisted before the write that drops them.
    retired: Vec<u32>,
    /// Ops waiting for log write n.
    waiters: BTreeMap<u64, Vec<Seq>>,
    /// Ops whose extents did not fit (every active extent pinned), in seq order.
    /// Later ops queue behind them so the earliest cannot starve.
    blocked: VecDeque<Seq>,
    /// Remaining pins per op: local completion, and (in the stream) durability on
    /// the secondary.
    pins: HashMap<Seq, (ByteRange, u8)>,
    /// Most extents one record may list ([`AL_EXTENTS_MAX`]; lower in the
    /// simulator so that both ways of writing a retirement are exercised).
    record_max: usize,
}

impl Intent {
    pub(super) fn new(set: ActiveSet) -> Intent {
        Intent {
            set,
            issued: 0,
            completed: 0,
            recording: HashMap::new(),
            changed: false,
            retired: Vec::new(),
            waiters: BTreeMap::new(),
            blocked: VecDeque::new(),
            pins: HashMap::new(),
            record_max: AL_EXTENTS_MAX,
        }
    }

    #[cfg(test)]
    pub(super) fn set_record_max(&mut self, n: usize) {
        assert!(
            n >= self.set.max_active(),
            "a record lists every active extent"
        );
        self.record_max = n.min(AL_EXTENTS_MAX);
    }

    pub(super) fn extent_bytes(&self) -> u64 {
        self.set.extent_bytes()
    }

    pub(super) fn max_active(&self) -> usize {
        self.set.max_active()
    }

    /// Begin `seq` in the active set; None when it does not fit now. Some(logged).
    fn try_pin(&mut self, seq: Seq, range: ByteRange, count: u8) -> Option<bool> {
        let transition = self.set.begin(range.offset, range.len).ok()?;
        self.pins.insert(seq, (range, count));
        if let Some(t) = transition {
            self.changed = true;
            self.retired.extend_from_slice(&t.retired);
            for e in t.activated {
                self.recording.insert(e, self.issued + 1);
            }
        }
        let need = self
            .set
            .extents_of(range.offset, range.len)
            .filter_map(|e| self.recording.get(&e).copied())
            .max();
        match need {
            Some(n) => {
                self.waiters.entry(n).or_default().push(seq);
                Some(false)
            }
            None => Some(true),
        }
    }

    #[cfg(test)]
    pub(super) fn blocked_len(&self) -> String {
        let mut pins: Vec<_> = self
            .pins
            .iter()
            .map(|(s, (r, c))| (s.0, r.offset, *c))
            .collect();
        pins.sort();
        format!(
            "blocked {} (first {:?}) pins {:?} active {:?} issued {} completed {} changed {}",
            self.blocked.len(),
            self.blocked.front(),
            pins,
            self.set.active(),
            self.issued,
            self.completed,
            self.changed
        )
    }

    pub(super) fn assert_invariants(&self) {
        assert!(self.completed <= self.issued);
        assert!(
            self.issued - self.completed <= LOG_WRITES_IN_FLIGHT,
            "at most {LOG_WRITES_IN_FLIGHT} log writes in flight"
        );
    }
}

/// Periodic persists of the bitmap (resync progress, changes while apart).
#[derive(Debug, Default)]
pub(super) struct Persist {
    in_flight: bool,
    last_ms: u64,
    last_count: u64,
    /// Bits changed in a way the count does not show (set and cleared).
    pub(super) changed: bool,
    /// Persists issued and completed (numbered from 1).
    issued: u64,
    done: u64,
    /// Another persist is wanted once the one in flight completes.
    again: bool,
    /// A retirement persisted blocks only in the page cache as set bits: once
    /// this local flush completes they are durable here, and a persist clears
    /// them (a stale bit costs a resend of its block after every later crash).
    pub(super) stale_until: Option<super::flush::LocalFlushId>,
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    /// Extents currently in the activity log's active set.
    pub fn active_extents(&self) -> Option<Vec<u32>> {
        self.intent.as_ref().map(|i| i.set.active())
    }

    /// Pin the extents of client write `seq`. Returns whether it may go now (its
    /// extents are durably logged); otherwise it waits for a log write.
    pub(super) fn pin(
        &mut self,
        seq: Seq,
        range: ByteRange,
        in_stream: bool,
        out: &mut Vec<Action<T, D>>,
    ) -> bool {
        // The range may hold data from now on (hole hints of resync passes).
        let (a, b) = range.blocks(self.cfg.block_size);
        self.resync.holes.forget(a.0, b.0);
        let Some(intent) = self.intent.as_mut() else {
            return true;
        };
        let count = if in_stream { 2 } else { 1 };
        if !intent.blocked.is_empty() {
            intent.blocked.push_back(seq);
            return false;
        }
        let logged = match intent.try_pin(seq, range, count) {
            None => {
                intent.blocked.push_back(seq);
                false
            }
            Some(logged) => logged,
        };
        self.issue_activity_write(out);
        logged
    }

    fn issue_activity_write(&mut self, out: &mut Vec<Action<T, D>>) {
        let Some(intent) = self.intent.as_mut() else {
            return;
        };
        if !intent.changed || intent.issued - intent.completed >= LOG_WRITES_IN_FLIGHT {
            return;
        }
        intent.issued += 1;
        intent.changed = false;
        let retired = std::mem::take(&mut intent.retired);
        let mut active = intent.set.active();
        // One fdatasync for pages and record when the record can list the retired
        // extents too (module docs).
        let pages_with_record =
            !retired.is_empty() && active.len() + retired.len() <= intent.record_max;
        if pages_with_record {
            active.extend_from_slice(&retired);
            active.sort_unstable();
            active.dedup();
        }
        let bitmap = (!retired.is_empty()).then(|| self.retirement_pages(&retired));
        if bitmap.is_some()
            && let Some(id) = self.flush.covering_volatile()
        {
            self.persist.stale_until = self.persist.stale_until.max(Some(id));
        }
        out.push(Action::WriteActivityLog {
            active,
            bitmap,
            pages_with_record,
        });
    }

    /// The pages of [`PrimaryEngine::persist_image`] that hold the blocks of the
    /// `retired` extents, built page by page (issue 11: a copy of the whole bitmap
    /// per retirement made random writes over a large volume cost O(volume size)).
    /// Pages not listed stay as they are on disk: their blocks that may differ are
    /// either of active extents (covered by the log) or were on disk already when
    /// their own extent retired; bits cleared since then are cleared lazily by the
    /// next periodic or final persist (a stale set bit only resends a block).
    pub(super) fn retirement_pages(&self, retired: &[u32]) -> BitmapPages {
        let intent = self.intent.as_ref().expect("activity log enabled");
        let bs = u64::from(self.cfg.block_size);
        let per_extent = intent.extent_bytes() / bs;
        let blocks = self.dirty.block_count().0;
        let ranges = retired.iter().map(|&e| {
            let first = (u64::from(e) * per_extent).min(blocks);
            (
                BlockIndex(first),
                BlockIndex((first + per_extent).min(blocks)),
            )
        });
        let mut pages = BitmapPages::covering(&self.dirty, ranges);
        // The blocks of the listed pages, as merged spans: `BitmapPages::mark`
        // sets bits of listed pages only, so a range is clipped to these spans
        // before it joins the set (the same bits are marked; a retirement of one
        // extent no longer merges every range in flight over the whole volume).
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for (page, words) in pages.iter() {
            let first = page.0 * PAGE_BLOCKS;
            let end = first + words.len() as u64 * 64;
            match spans.last_mut() {
                Some(last) if last.1 == first => last.1 = end,
                _ => spans.push((first, end)),
            }
        }
        // Blocks in flight or only in the page cache, as one set (unacked writes
        // and client ops in flight overlap; each run costs a walk of the pages).
        // Those in flight are looked up by offset for each span (issue 14: a
        // walk of every op and frame made a request of P pieces cost O(P²)).
        let in_flight = spans.iter().flat_map(|&(lo, hi)| {
            self.in_flight_block_ranges_within(BlockIndex(lo), BlockIndex(hi))
        });
        // The volatile runs are looked up per span too: between two fdatasyncs a
        // buffered volume may hold one run per random write (thousands), and a
        // walk of all of them at each retirement cost O(runs) per log write.
        let volatile = spans.iter().flat_map(|&(lo, hi)| {
            self.flush
                .volatile_runs_within(BlockIndex(lo), BlockIndex(hi))
        });
        let mut transient = RangeSet::from_ranges(in_flight.chain(volatile));
        // Minus the extents active before this log write and after it: whatever
        // of them may differ, a crash recovery compares by hash, so their blocks
        // stay out of the persisted bitmap (there they would be resent as data,
        // and stay set until a later persist). Extents this write activates are
        // not covered yet: until it is durable the log on disk is the previous one.
        // Only the extents within the listed pages matter (`pages.mark` sets no
        // other bits): a walk and sort of the whole set (~1 000 extents) per log
        // write was a few % of the CPU of random writes over 64 GiB (issue 11).
        let index = |e: u64| u32::try_from(e).unwrap_or(u32::MAX);
        for &(lo, hi) in &spans {
            let extents = index(lo / per_extent)..index(hi.div_ceil(per_extent));
            for e in intent.set.active_within(extents) {
                if !intent.recording.contains_key(&e) {
                    let first = (u64::from(e) * per_extent).min(blocks);
                    transient.remove(
                        BlockIndex(first),
                        BlockIndex((first + per_extent).min(blocks)),
                    );
                }
            }
        }
        for (a, b) in transient.iter() {
            pages.mark(a, b);
        }
        pages
    }

    /// The oldest activity-log write in flight is durable (or failed: then the
    /// volume is poisoned, since crash coverage can no longer be recorded).
    pub fn activity_written(&mut self, result: Result<(), String>, out: &mut Vec<Action<T, D>>) {
        if let Err(e) = result {
            self.poison(format!("the activity log could not be written: {e}"), out);
        }
        let intent = self.intent.as_mut().expect("activity log enabled");
        assert!(
            intent.issued > intent.completed,
            "activity_written without a write in flight"
        );
        intent.completed += 1;
        let done = intent.completed;
        intent.recording.retain(|_, n| *n > done);
        let mut released = Vec::new();
        while let Some(entry) = intent.waiters.first_entry() {
            if *entry.key() > done {
                break;
            }
            released.extend(entry.remove());
        }
        self.release_logged(released, out);
        self.issue_activity_write(out);
    }

    fn release_logged(&mut self, seqs: Vec<Seq>, out: &mut Vec<Action<T, D>>) {
        for seq in seqs {
            if let Some(op) = self.ops.get_mut(&seq)
                && let LocalStage::Waiting { ordered, .. } = op.local
            {
                op.local = LocalStage::Waiting {
                    ordered,
                    logged: true,
                };
                self.try_start(seq, out);
            }
        }
        self.pump_ship(out);
    }

    /// Drop one pin of client write `seq` (local completion, or durability on the
    /// secondary / leaving the stream); at zero its extents may retire.
    pub(super) fn unpin(&mut self, seq: Seq, out: &mut Vec<Action<T, D>>) {
        let Some(intent) = self.intent.as_mut() else {
            return;
        };
        let Some(entry) = intent.pins.get_mut(&seq) else {
            return;
        };
        entry.1 -= 1;
        if entry.1 > 0 {
            return;
        }
        let (range, _) = intent.pins.remove(&seq).expect("present");
        intent.set.end(range.offset, range.len);
        // Blocked writes go in seq order as room appears.
        let mut ready = Vec::new();
        while let Some(&front) = intent.blocked.front() {
            let Some(op) = self.ops.get(&front) else {
                intent.blocked.pop_front();
                continue;
            };
            let count = if op.ship == ShipStage::Outside { 1 } else { 2 };
            match intent.try_pin(front, op.range, count) {
                None => break,
                Some(logged) => {
                    intent.blocked.pop_front();
                    if logged {
                        ready.push(front);
                    }
                }
            }
        }
        self.issue_activity_write(out);
        self.release_logged(ready, out);
    }

    /// Persist the bitmap now and then while it changes (a resync, the link down,
    /// ahead), so that a restart resends little: at most every
    /// `persist_interval_ms`, one persist at a time.
    pub(super) fn maybe_persist_progress(&mut self, out: &mut Vec<Action<T, D>>) {
        if self.persist.in_flight
            || self.dirty.dirty_count().0 == self.persist.last_count && !self.persist.changed
        {
            return;
        }
        if self.now_ms.saturating_sub(self.persist.last_ms) < self.cfg.persist_interval_ms {
            return;
        }
        self.issue_persist(out);
    }

    fn issue_persist(&mut self, out: &mut Vec<Action<T, D>>) {
        self.persist.in_flight = true;
        self.persist.issued += 1;
        self.persist.last_ms = self.now_ms;
        self.persist.last_count = self.dirty.dirty_count().0;
        self.persist.changed = false;
        // The image holds the volatile blocks too: clear them once flushed.
        if let Some(id) = self.flush.covering_volatile() {
            self.persist.stale_until = self.persist.stale_until.max(Some(id));
        }
        out.push(Action::PersistBitmap {
            bitmap: self.persist_image(),
        });
    }

    /// Persist the bitmap as it is now (after one in flight, if any); returns the
    /// number of the persist to wait for.
    pub(super) fn persist_now(&mut self, out: &mut Vec<Action<T, D>>) -> u64 {
        if self.persist.in_flight {
            self.persist.again = true;
            self.persist.issued + 1
        } else {
            self.issue_persist(out);
            self.persist.issued
        }
    }

    /// The bitmap persist issued last is durable (or failed: the volume is
    /// poisoned, crash coverage can no longer be recorded).
    pub fn bitmap_persisted(&mut self, result: Result<(), String>, out: &mut Vec<Action<T, D>>) {
        assert!(self.persist.in_flight, "bitmap_persisted without a persist");
        self.persist.in_flight = false;
        if let Err(e) = result {
            self.poison(format!("the bitmap could not be persisted: {e}"), out);
            if self.stream.gate.is_some() {
                // A session waits for this persist to start streaming: end it, so
                // the writes waiting on the peer complete alone or wait for the
                // next session, whose gate persists again (fuzz finding
                // sync-write-hangs-after-failed-gate-persist).
                self.stream.gate = None;
                out.push(Action::DropSession {
                    fault: super::SessionFault::GatePersistFailed,
                });
            }
            return;
        }
        self.persist.done = self.persist.issued;
        if std::mem::take(&mut self.persist.again) {
            self.issue_persist(out);
        }
        let done = self.persist.done;
        self.maybe_open_gate(done, out);
    }

    /// wan (issue 11 item 5): the number of the last bitmap persist that is durable.
    pub(super) fn persisted_through(&self) -> u64 {
        self.persist.done
    }

    /// wan: whether `seq` holds pins now (false while it waits in the blocked
    /// queue: it is pinned, with both pins, when it leaves it).
    pub(super) fn holds_pins(&self, seq: Seq) -> bool {
        self.intent
            .as_ref()
            .is_none_or(|i| i.pins.contains_key(&seq))
    }

    /// Whether `seq`'s extents are durably logged (its frame may go out).
    pub(super) fn is_logged(&self, seq: Seq) -> bool {
        self.ops
            .get(&seq)
            .is_some_and(|op| !matches!(op.local, LocalStage::Waiting { logged: false, .. }))
    }
}
