//! The session with the secondary: frames in seq order, the replication window,
//! the ahead policy (G4), acknowledgements and the end of a session.
//!
//! **Window.** Every op in the stream (a client write, a resync chunk) holds its
//! bytes (payload bytes; payload-free frames count 0) and one write slot from
//! acceptance until the secondary says `Durable`. In sync mode a full window only
//! delays shipping (clients wait for `Applied` anyway). In async mode a write that
//! does not fit:
//! - goes **ahead** when the secondary is a consistent copy (no resync section
//!   open): it and every later write are tracked in the bitmap only, until the
//!   window has drained to half and at least `ahead_min_ms` passed; then a resync
//!   pass sends what changed;
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

use std::collections::VecDeque;

use super::{
    Action, Completion, LocalStage, Mode, Note, OpKind, Outgoing, PrimaryEngine, SessionFault,
    ShipStage,
};
use crate::bitmap::DirtyBitmap;
use crate::types::{ByteRange, Seq};

/// Where a new write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placement {
    InStream,
    /// In the stream, but its client waits until it is shipped.
    HeldForWindow,
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
pub(super) struct Unacked {
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
}

#[derive(Debug)]
struct Ahead {
    /// Seqs from here on are not shipped.
    from: Seq,
    since_ms: u64,
}

pub(super) struct Stream {
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
    pub(super) unacked: VecDeque<Unacked>,
    /// Bytes and writes of `unacked` (window occupancy).
    unacked_bytes: u64,
    /// Bytes and writes shipped and not yet durable.
    shipped_bytes: u64,
    shipped_writes: u64,
    durable_through: Seq,
    /// Flush markers waiting for the ship cursor to pass them.
    pub(super) flush_markers: VecDeque<Seq>,
    /// The ResyncDone shipped and not yet durable.
    pub(super) done_marker: Option<Seq>,
    /// A session waits for a bitmap persist before its first frame: (full, the
    /// persist number it needs).
    pub(super) gate: Option<(bool, u64)>,
}

impl Stream {
    pub(super) fn new(first_seq: Seq) -> Stream {
        Stream {
            streaming: false,
            ahead: None,
            section_open: false,
            throttling: false,
            stream_first: first_seq,
            next_ship: first_seq,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            shipped_bytes: 0,
            shipped_writes: 0,
            durable_through: Seq::ZERO,
            flush_markers: VecDeque::new(),
            done_marker: None,
            gate: None,
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
        self.unacked.push_back(Unacked {
            seq,
            range,
            carried,
            at_ms,
            wire_bytes,
            shipped: false,
            keep: Vec::new(),
        });
        self.unacked_bytes += wire_bytes;
    }

    pub(super) fn open_section(&mut self) {
        self.section_open = true;
    }

    pub(super) fn close_section(&mut self) {
        self.section_open = false;
    }

    /// Room in the window for another op of `wire_bytes` (resync chunks wait for it).
    pub(super) fn has_window_room(&self, cfg: &super::Config, wire_bytes: u64) -> bool {
        self.has_room(cfg, wire_bytes)
    }

    /// Every block of every write not yet durable on the secondary.
    pub(super) fn mark_unacked(&self, bm: &mut DirtyBitmap, block_size: u32) {
        for u in self.unacked.iter().filter(|u| u.carried != Carried::Verify) {
            let (a, b) = u.range.blocks(block_size);
            bm.mark(a, b);
        }
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
        self.unacked.is_empty()
            || (self.unacked_bytes + wire_bytes <= cfg.window_bytes_max
                && (self.unacked.len() as u64) < cfg.window_writes_max)
    }

    pub(super) fn assert_invariants(&self, next_seq: Seq) {
        let mut prev = Seq::ZERO;
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
        }
        assert_eq!(
            self.unacked_bytes,
            self.unacked.iter().map(|u| u.wire_bytes).sum::<u64>()
        );
        assert_eq!(
            self.shipped_bytes,
            self.unacked
                .iter()
                .filter(|u| u.shipped)
                .map(|u| u.wire_bytes)
                .sum::<u64>()
        );
        assert_eq!(
            self.shipped_writes,
            self.unacked.iter().filter(|u| u.shipped).count() as u64
        );
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

    /// Decide where a new client write of `wire_bytes` goes (see the module docs).
    pub(super) fn place_in_stream(
        &mut self,
        seq: Seq,
        wire_bytes: u64,
        out: &mut Vec<Action<T, D>>,
    ) -> Placement {
        if !self.stream.streaming || self.stream.ahead.is_some() {
            return Placement::Outside;
        }
        if self.cfg.mode == Mode::Sync || self.stream.has_room(&self.cfg, wire_bytes) {
            if self.stream.throttling && self.stream.unacked_bytes <= self.cfg.window_bytes_max / 2
            {
                self.stream.throttling = false;
            }
            return Placement::InStream;
        }
        if !self.stream.section_open {
            let (lag_writes, lag_bytes) = self.stream.unacked_totals();
            self.stream.ahead = Some(Ahead {
                from: seq,
                since_ms: self.now_ms,
            });
            self.stream.section_open = true;
            out.push(Action::Note(Note::EnteredAhead {
                lag_writes,
                lag_bytes,
            }));
            return Placement::Outside;
        }
        if !self.stream.throttling {
            self.stream.throttling = true;
            out.push(Action::Note(Note::Throttling {
                lag_bytes: self.stream.unacked_bytes,
            }));
        }
        Placement::HeldForWindow
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
    }

    /// Ship every ready frame at the head of the stream (in seq order, within the
    /// window), then any flush markers the cursor has passed.
    pub(super) fn pump_ship(&mut self, out: &mut Vec<Action<T, D>>) {
        if !self.stream.streaming || self.stream.gate.is_some() {
            return;
        }
        while self.stream.next_ship < self.next_seq {
            let seq = self.stream.next_ship;
            if self.stream.ahead.as_ref().is_some_and(|a| seq >= a.from) {
                break;
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
        self.stream.durable_through = Seq(self.next_seq.0 - 1);
        self.stream.done_marker = None;
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
        self.stream.durable_through = through;
        let bs = self.cfg.block_size;
        while let Some(u) = self.stream.unacked.front() {
            if u.seq > through {
                break;
            }
            let u = self.stream.unacked.pop_front().expect("front exists");
            self.stream.unacked_bytes -= u.wire_bytes;
            self.stream.shipped_bytes -= u.wire_bytes;
            self.stream.shipped_writes -= 1;
            match u.carried {
                Carried::Client => self.unpin(u.seq, out),
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
        let drained: Vec<Unacked> = self.stream.unacked.drain(..).collect();
        self.stream.unacked_bytes = 0;
        self.stream.shipped_bytes = 0;
        self.stream.shipped_writes = 0;
        let bs = self.cfg.block_size;
        for u in drained {
            let (a, b) = u.range.blocks(bs);
            match u.carried {
                Carried::Client => {
                    self.dirty.mark(a, b);
                    // Not on the secondary yet: its age carries over into the bitmap.
                    self.note_dirty_since(u.at_ms);
                    self.unpin(u.seq, out);
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
        self.stream.flush_markers.clear();
        self.stream.done_marker = None;
        self.stream.gate = None;
        self.stream.section_open = self.dirty.dirty_count().0 > 0;
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
        self.flush_session_ended(out);
    }
}
