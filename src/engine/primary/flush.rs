//! Client FLUSHes, local fdatasyncs, and what is only in the page cache.
//!
//! A FLUSH covers every write completed before it (on any connection: the NBD
//! export sets CAN_MULTI_CONN). It completes once (1) a local fdatasync that
//! *started* after it arrived has completed, and (2) in sync mode, the secondary
//! is durable through the last seq assigned before it (G1); with
//! `on-disconnect = block` also only once no resync section is open, i.e. the
//! secondary holds every write this node ever acknowledged.
//!
//! Local fdatasyncs run one at a time; requests arriving while one runs are
//! covered by the next one, which starts when it ends (so bursts of FLUSHes cost
//! two fdatasyncs, not one each). Besides client FLUSHes, a background fdatasync
//! runs when a completed write has stayed in the page cache longer than
//! `local_flush_interval_ms`: blocks written since the last completed local flush
//! are "volatile" (a power loss may undo them) and are what a retirement of their
//! extent must keep in the persisted bitmap (intent.rs).
//!
//! A failed fdatasync poisons the volume: every pending FLUSH fails, and so does
//! every later one, even if a later fdatasync returns success (after a failure
//! Linux may have dropped the dirty pages; a retry proves nothing; issue 9 #8).

use std::collections::VecDeque;

use super::{Action, Errno, PrimaryEngine};
use crate::engine::rangeset::RangeSet;
use crate::types::{BlockIndex, ByteRange, Seq};

/// Identifies a local fdatasync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalFlushId(pub u64);

/// What a client FLUSH still needs from the secondary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remote {
    Nothing,
    /// Durable through this seq.
    DurableThrough(Seq),
    /// Durable through this seq, and no resync section open.
    InSync(Seq),
}

#[derive(Debug)]
struct PendingFlush<T> {
    token: T,
    /// The local fdatasync that must complete.
    local_needed: LocalFlushId,
    local_done: bool,
    remote: Remote,
}

pub(super) struct Flushes<T> {
    pending: VecDeque<PendingFlush<T>>,
    /// The fdatasync in flight.
    running: Option<LocalFlushId>,
    /// Last id handed out (running or completed).
    last_id: u64,
    /// A flush was requested after `running` started: start the next one then.
    wanted: bool,
    /// Blocks of writes completed since the running (or last) fdatasync started.
    volatile_new: RangeSet,
    /// Blocks the running fdatasync will make durable.
    volatile_running: RangeSet,
    /// When the oldest block of `volatile_new` was written.
    oldest_new_ms: Option<u64>,
}

impl<T> Flushes<T> {
    pub(super) fn new() -> Flushes<T> {
        Flushes {
            pending: VecDeque::new(),
            running: None,
            last_id: 0,
            wanted: false,
            volatile_new: RangeSet::new(),
            volatile_running: RangeSet::new(),
            oldest_new_ms: None,
        }
    }

    /// A write of `range` completed without FUA: it is in the page cache only.
    pub(super) fn note_volatile(&mut self, range: ByteRange, block_size: u32) {
        let (a, b) = range.blocks(block_size);
        self.volatile_new.insert(a, b);
    }

    /// Blocks written locally and not yet covered by a completed fdatasync.
    pub(super) fn volatile_runs(&self) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        self.volatile_new.iter().chain(self.volatile_running.iter())
    }

    /// The volatile blocks of `[first, end)`, clipped to it (in two ordered parts:
    /// written since the running fdatasync started, then those it covers).
    pub(super) fn volatile_runs_within(
        &self,
        first: BlockIndex,
        end: BlockIndex,
    ) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        self.volatile_new
            .within(first, end)
            .chain(self.volatile_running.within(first, end))
    }

    /// The local fdatasync that will have made every volatile block durable: the
    /// next to start if blocks wait for one, else the one running.
    pub(super) fn covering_volatile(&self) -> Option<LocalFlushId> {
        if !self.volatile_new.is_empty() {
            Some(LocalFlushId(self.last_id + 1))
        } else if self.volatile_running.is_empty() {
            None
        } else {
            self.running
        }
    }

    pub(super) fn assert_invariants(&self) {
        if self.running.is_none() {
            assert!(self.volatile_running.is_empty());
            assert!(!self.wanted);
        }
    }
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    /// A client FLUSH (see the module docs).
    pub fn flush(&mut self, token: T, now_ms: u64, out: &mut Vec<Action<T, D>>) {
        self.now_ms = self.now_ms.max(now_ms);
        if self.poisoned.is_some() {
            out.push(Action::Complete {
                token,
                result: Err(libc::EIO),
            });
            return;
        }
        let through = Seq(self.next_seq.0 - 1);
        let remote = match self.cfg.mode {
            super::Mode::Async => Remote::Nothing,
            super::Mode::Sync => match (self.cfg.peer_loss, self.stream.is_streaming()) {
                (super::PeerLoss::Block, _) => Remote::InSync(through),
                (super::PeerLoss::Degrade, true) => Remote::DurableThrough(through),
                // Degraded: the peer is away; this node alone makes it durable.
                (super::PeerLoss::Degrade, false) => Remote::Nothing,
            },
        };
        // dr (issue 10): async mode relays the FLUSH too (nothing waits for it):
        // on the secondary it is a consistent point of the rollback window.
        let relay = remote != Remote::Nothing || self.cfg.mode == super::Mode::Async;
        if relay && self.stream.is_streaming() {
            self.stream.flush_markers.push_back(through);
        }
        let local_needed = self.request_local_flush(out);
        self.flush.pending.push_back(PendingFlush {
            token,
            local_needed,
            local_done: false,
            remote,
        });
        self.pump_ship(out);
    }

    /// Ask for an fdatasync that starts from now on; returns its id.
    fn request_local_flush(&mut self, out: &mut Vec<Action<T, D>>) -> LocalFlushId {
        match self.flush.running {
            None => self.start_local_flush(out),
            Some(running) => {
                self.flush.wanted = true;
                LocalFlushId(running.0 + 1)
            }
        }
    }

    fn start_local_flush(&mut self, out: &mut Vec<Action<T, D>>) -> LocalFlushId {
        assert!(self.flush.running.is_none());
        self.flush.last_id += 1;
        let id = LocalFlushId(self.flush.last_id);
        self.flush.running = Some(id);
        self.flush.wanted = false;
        let new = std::mem::take(&mut self.flush.volatile_new);
        self.flush.volatile_running.union_with(&new);
        self.flush.oldest_new_ms = None;
        out.push(Action::StartLocalFlush { id });
        id
    }

    /// Background fdatasync: a completed write has stayed only in the page cache for
    /// longer than the interval.
    pub(super) fn maybe_background_flush(&mut self, out: &mut Vec<Action<T, D>>) {
        if self.flush.volatile_new.is_empty() {
            self.flush.oldest_new_ms = None;
            return;
        }
        let oldest = *self.flush.oldest_new_ms.get_or_insert(self.now_ms);
        if self.flush.running.is_none()
            && self.poisoned.is_none()
            && self.now_ms.saturating_sub(oldest) >= self.cfg.local_flush_interval_ms
        {
            self.start_local_flush(out);
        }
    }

    /// A local fdatasync finished.
    pub fn local_flush_done(
        &mut self,
        id: LocalFlushId,
        result: Result<(), Errno>,
        out: &mut Vec<Action<T, D>>,
    ) {
        assert_eq!(
            self.flush.running,
            Some(id),
            "local_flush_done for a flush not running"
        );
        self.flush.running = None;
        match result {
            Ok(()) => {
                self.flush.volatile_running.clear();
                if self.persist.stale_until.is_some_and(|n| n <= id) {
                    self.persist.stale_until = None;
                    self.persist.changed = true;
                }
                for f in self.flush.pending.iter_mut() {
                    if f.local_needed <= id {
                        f.local_done = true;
                    }
                }
                if self.flush.wanted && self.poisoned.is_none() {
                    self.start_local_flush(out);
                }
                self.flush.wanted = false;
                self.try_complete_flushes(out);
            }
            Err(errno) => {
                self.flush.wanted = false;
                // Not durable, and no later fdatasync will make them so (Linux
                // drops failed pages from writeback): still volatile, so whatever
                // covers them (activity log extents) stays (found by the sim).
                let failed = std::mem::take(&mut self.flush.volatile_running);
                self.flush.volatile_new.union_with(&failed);
                self.poison(
                    format!(
                        "a local flush (fdatasync) of the volume failed: {}",
                        std::io::Error::from_raw_os_error(errno)
                    ),
                    out,
                );
            }
        }
    }

    pub(super) fn fail_all_flushes(&mut self, out: &mut Vec<Action<T, D>>) {
        for f in self.flush.pending.drain(..) {
            out.push(Action::Complete {
                token: f.token,
                result: Err(libc::EIO),
            });
        }
    }

    pub(super) fn try_complete_flushes(&mut self, out: &mut Vec<Action<T, D>>) {
        let durable = self.stream.durable_through();
        let in_sync = self.is_in_sync();
        let mut i = 0;
        while i < self.flush.pending.len() {
            let f = &self.flush.pending[i];
            let remote_ok = match f.remote {
                Remote::Nothing => true,
                Remote::DurableThrough(s) => durable >= s,
                Remote::InSync(s) => in_sync && durable >= s,
            };
            if f.local_done && remote_ok {
                let f = self.flush.pending.remove(i).expect("index valid");
                out.push(Action::Complete {
                    token: f.token,
                    result: Ok(()),
                });
            } else {
                i += 1;
            }
        }
    }

    /// The session ended: in degrade mode a FLUSH no longer waits for the peer; in
    /// block mode it waits until the secondary is back in sync.
    pub(super) fn flush_session_ended(&mut self, out: &mut Vec<Action<T, D>>) {
        for f in self.flush.pending.iter_mut() {
            if let Remote::DurableThrough(s) = f.remote {
                f.remote = match self.cfg.peer_loss {
                    super::PeerLoss::Degrade => Remote::Nothing,
                    super::PeerLoss::Block => Remote::InSync(s),
                };
            }
        }
        self.try_complete_flushes(out);
    }
}
