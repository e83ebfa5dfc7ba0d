//! The secondary's apply engine fed sequences of decoded frames, interleaved
//! with volume completions chosen by the input, checked against a model:
//!
//! - a frame is accepted only in seq order; anything else is refused (`Fail`),
//!   and after a refusal nothing new is accepted;
//! - `StartApply` only for accepted frames, once each, and never while an
//!   earlier accepted frame with an overlapping range has not completed (G2);
//! - `Applied` only after the write completed without error; `Durable` only
//!   through writes that completed before the flush that covers them started;
//!   `Durable` never goes backwards;
//! - once a write or flush failed, the disk is never marked UpToDate again
//!   in that session (the image is no longer a prefix of the primary's);
//! - at the end, with every completion delivered, everything accepted is
//!   applied and (after a tick) durable.
//!
//! Input: records of `[schedule][frame]`. The schedule byte's low 3 bits say
//! how many completions to deliver first (each chosen by one more byte: which
//! apply or the flush, and whether it fails), bit 3 a timer tick. Frames are
//! a compact encoding of the messages the secondary acts on (kind, seq offset,
//! range, flags), so mutations reach the engine instead of dying at a crc.
//!
//! The engine adapter ([`feed`]) mirrors `agent::secondary::on_frame` and the
//! reader's range check; it is the only code to adapt when the engine's API
//! changes.

use std::collections::{BTreeMap, BTreeSet};

use tandem::engine::secondary::{ApplyKind, SecondaryAction, SecondaryEngine};
use tandem::types::{ByteRange, Seq};
use tandem::wire::Message;

use crate::Input;

const VOLUME_BYTES: u64 = 64 << 20;
const BLOCK_BYTES: u64 = 4096;
const FLUSH_THRESHOLD_BYTES: u64 = 1 << 20;
/// Frames per input (bounds time).
const FRAMES_MAX: usize = 512;
/// errno of an injected failure (EIO).
const EIO: i32 = 5;

// ---- adapter: the only code that knows the engine's API --------------------

/// Hand one decoded frame to the engine as the agent does. `Err`: the session
/// ends (protocol error or a frame the reader drops).
pub fn feed(
    engine: &mut Option<SecondaryEngine>,
    seq: u64,
    msg: &Message,
    payload_len: u64,
    out: &mut Vec<SecondaryAction>,
) -> Result<(), String> {
    let seq = Seq(seq);
    // The reader drops a frame whose range passes the volume's end.
    let range = match msg {
        Message::Write { offset, .. } => Some(ByteRange::new(*offset, payload_len)),
        Message::WriteZeroes { offset, len, .. } | Message::Trim { offset, len } => {
            Some(ByteRange::new(*offset, u64::from(*len)))
        }
        _ => None,
    };
    if let Some(r) = range
        && r.offset.checked_add(r.len).is_none_or(|e| e > VOLUME_BYTES)
    {
        return Err("frame beyond the volume".into());
    }
    match msg {
        Message::ResyncStart { blocks, .. } => engine
            .get_or_insert_with(|| SecondaryEngine::new(seq, FLUSH_THRESHOLD_BYTES))
            .resync_started(seq, *blocks, out),
        Message::Write { fua, .. } => engine.as_mut().ok_or("Write before ResyncStart")?.receive(
            seq,
            ApplyKind::Write,
            range.expect("write range"),
            *fua,
            out,
        ),
        Message::WriteZeroes { fua, .. } => engine
            .as_mut()
            .ok_or("WriteZeroes before ResyncStart")?
            .receive(
                seq,
                ApplyKind::WriteZeroes,
                range.expect("range"),
                *fua,
                out,
            ),
        Message::Trim { .. } => engine.as_mut().ok_or("Trim before ResyncStart")?.receive(
            seq,
            ApplyKind::Trim,
            range.expect("range"),
            false,
            out,
        ),
        Message::Flush => engine
            .as_mut()
            .ok_or("Flush before ResyncStart")?
            .flush_requested(seq, out),
        Message::ResyncDone { through_seq } => engine
            .as_mut()
            .ok_or("ResyncDone before ResyncStart")?
            .resync_done(Seq(*through_seq), out),
        Message::HashCheck {
            offset,
            block_size,
            hashes,
        } => {
            let e = engine.as_mut().ok_or("HashCheck before ResyncStart")?;
            let len = (u64::from(*block_size) * hashes.len() as u64)
                .min(VOLUME_BYTES.saturating_sub(*offset));
            if len == 0 {
                return Err("malformed HashCheck".into());
            }
            e.receive(
                seq,
                ApplyKind::HashCheck,
                ByteRange::new(*offset, len),
                false,
                out,
            );
        }
        Message::Goodbye => return Err("Goodbye".into()),
        _ => {}
    }
    Ok(())
}

fn apply_done(
    e: &mut SecondaryEngine,
    seq: u64,
    range: ByteRange,
    ok: bool,
    out: &mut Vec<SecondaryAction>,
) {
    e.apply_done(Seq(seq), range, if ok { Ok(()) } else { Err(EIO) }, out);
}

fn flush_done(e: &mut SecondaryEngine, ok: bool, out: &mut Vec<SecondaryAction>) {
    e.flush_done(if ok { Ok(()) } else { Err(EIO) }, out);
}

fn tick(e: &mut SecondaryEngine, out: &mut Vec<SecondaryAction>) {
    e.tick(out);
}

/// With `FUZZ_TRACE=1`, print what the harness does (to read a crash input).
fn trace(line: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some()) {
        eprintln!("{}", line());
    }
}

// ---- the model ---------------------------------------------------------------

#[derive(Default)]
struct Model {
    /// Frames the engine accepted (in seq order), with their kind and range.
    accepted: BTreeMap<u64, (ApplyKind, ByteRange)>,
    /// Seq ranges [start, end) skipped by a ResyncStart (never applied).
    skipped: Vec<(u64, u64)>,
    /// The next seq the engine must accept (None before the first ResyncStart).
    expected_next: Option<u64>,
    started: BTreeSet<u64>,
    in_flight: Vec<u64>,
    completed_ok: BTreeSet<u64>,
    completed_err: BTreeSet<u64>,
    applied_sent: BTreeSet<u64>,
    /// The flush in flight: its `through` and the seqs completed when it started.
    flushing: Option<(u64, BTreeSet<u64>)>,
    durable: u64,
    failed: bool,
    io_failed: bool,
    /// Open bugs not to report (see [`Open`]).
    open: Open,
}

impl Model {
    fn completed(&self, seq: u64) -> bool {
        self.completed_ok.contains(&seq) || self.completed_err.contains(&seq)
    }

    fn is_skipped(&self, seq: u64) -> bool {
        self.skipped.iter().any(|(a, b)| (*a..*b).contains(&seq))
    }

    /// Every accepted seq ≤ `through` in `done` (or skipped).
    fn covered(&self, through: u64, done: &BTreeSet<u64>) -> bool {
        self.accepted
            .range(..=through)
            .all(|(s, _)| done.contains(s) || self.is_skipped(*s))
    }

    /// Check and record one action of the engine.
    fn on_action(&mut self, a: &SecondaryAction) {
        match a {
            SecondaryAction::StartApply { seq, kind, range } => {
                let seq = seq.0;
                let Some((k, r)) = self.accepted.get(&seq) else {
                    panic!("StartApply of seq {seq}, which the engine never accepted");
                };
                assert_eq!((k, r), (kind, range), "StartApply of seq {seq} changed");
                assert!(self.started.insert(seq), "seq {seq} started twice");
                // A zero-length range touches no byte: it orders against nothing.
                let touches =
                    |a: &ByteRange, b: &ByteRange| a.len > 0 && b.len > 0 && a.overlaps(b);
                for (s, (_, earlier)) in self.accepted.range(..seq) {
                    assert!(
                        !touches(earlier, range) || self.completed(*s),
                        "seq {seq} {range:?} started before overlapping seq {s} {earlier:?} completed (G2)"
                    );
                }
                self.in_flight.push(seq);
            }
            SecondaryAction::SendApplied { seq } => {
                let seq = seq.0;
                assert!(!self.failed, "Applied {seq} after the session failed");
                assert!(
                    self.completed_ok.contains(&seq),
                    "Applied {seq} before it completed"
                );
                assert_ne!(
                    self.accepted[&seq].0,
                    ApplyKind::HashCheck,
                    "Applied for hash check {seq}"
                );
                assert!(self.applied_sent.insert(seq), "Applied {seq} twice");
            }
            SecondaryAction::StartFlush { through } => {
                assert!(!self.failed, "flush started after the session failed");
                assert!(self.flushing.is_none(), "two flushes at once");
                assert!(
                    self.covered(through.0, &self.completed_ok),
                    "flush through {through} before every write up to it completed"
                );
                self.flushing = Some((through.0, self.completed_ok.clone()));
            }
            SecondaryAction::SendDurable { through } => {
                // Emitted by flush_done: checked there against the flush that ended.
                assert!(through.0 >= self.durable, "Durable went back to {through}");
                self.durable = through.0;
            }
            SecondaryAction::MarkInconsistent => {}
            SecondaryAction::MarkUpToDate => {
                assert!(
                    !self.io_failed || self.open.uptodate_after_failure,
                    "UpToDate after a failed write or flush in this session"
                );
            }
            SecondaryAction::Fail { .. } => self.failed = true,
        }
    }
}

struct Harness {
    engine: Option<SecondaryEngine>,
    model: Model,
    out: Vec<SecondaryAction>,
}

impl Harness {
    fn process(&mut self) {
        for a in std::mem::take(&mut self.out) {
            trace(|| format!("  -> {a:?}"));
            self.model.on_action(&a);
        }
    }

    /// Deliver the frame; `false` when the session ends.
    fn frame(&mut self, seq: u64, msg: &Message, payload_len: u64) -> bool {
        trace(|| format!("frame seq {seq} {msg:?} payload {payload_len}"));
        let m = &mut self.model;
        let was_failed = m.failed;
        // What the engine must do with it (the protocol, ARCHITECTURE §3).
        let accepted_as = match msg {
            Message::Write { offset, .. } => {
                Some((ApplyKind::Write, ByteRange::new(*offset, payload_len)))
            }
            Message::WriteZeroes { offset, len, .. } => Some((
                ApplyKind::WriteZeroes,
                ByteRange::new(*offset, u64::from(*len)),
            )),
            Message::Trim { offset, len } => {
                Some((ApplyKind::Trim, ByteRange::new(*offset, u64::from(*len))))
            }
            Message::HashCheck {
                offset,
                block_size,
                hashes,
            } => Some((
                ApplyKind::HashCheck,
                ByteRange::new(
                    *offset,
                    (u64::from(*block_size) * hashes.len() as u64)
                        .min(VOLUME_BYTES.saturating_sub(*offset)),
                ),
            )),
            _ => None,
        };
        let result = feed(&mut self.engine, seq, msg, payload_len, &mut self.out);
        let failed_now = self
            .out
            .iter()
            .any(|a| matches!(a, SecondaryAction::Fail { .. }));
        let m = &mut self.model;
        match (msg, &result) {
            (_, Err(_)) => {}
            (Message::ResyncStart { .. }, Ok(())) => {
                let expected = *m.expected_next.get_or_insert(seq);
                if was_failed {
                } else if seq < expected {
                    assert!(failed_now, "ResyncStart {seq} behind {expected} accepted");
                } else {
                    assert!(!failed_now, "ResyncStart {seq} refused");
                    if seq > expected {
                        m.skipped.push((expected, seq));
                    }
                    m.expected_next = Some(seq);
                }
            }
            (_, Ok(())) => {
                if let Some((kind, range)) = accepted_as {
                    let expected = m.expected_next.expect("an engine exists");
                    if was_failed {
                        assert!(self.out.is_empty(), "a failed engine acted on seq {seq}");
                    } else if seq == expected {
                        assert!(!failed_now, "in-order seq {seq} refused");
                        m.accepted.insert(seq, (kind, range));
                        m.expected_next = Some(seq + 1);
                    } else {
                        assert!(failed_now, "seq {seq} accepted, {expected} expected");
                    }
                }
            }
        }
        self.process();
        result.is_ok() && !self.model.failed
    }

    /// Deliver one completion chosen by `c`.
    fn complete(&mut self, c: u8) {
        let ok = c & 0x3f != 0x3f;
        let Some(e) = self.engine.as_mut() else {
            return;
        };
        if c & 0x80 != 0 && self.model.flushing.is_some() {
            let (through, done_at_start) = self.model.flushing.take().expect("checked");
            trace(|| {
                format!(
                    "flush through {through} done: {}",
                    if ok { "ok" } else { "EIO" }
                )
            });
            flush_done(e, ok, &mut self.out);
            if ok {
                let durable: Vec<u64> = self
                    .out
                    .iter()
                    .filter_map(|a| match a {
                        SecondaryAction::SendDurable { through } => Some(through.0),
                        _ => None,
                    })
                    .collect();
                for d in durable {
                    assert!(d <= through, "Durable {d} from a flush through {through}");
                    assert!(
                        self.model.covered(d, &done_at_start),
                        "Durable {d} covers writes that completed after its flush started"
                    );
                }
            } else {
                self.model.io_failed = true;
            }
            self.process();
            return;
        }
        if self.model.in_flight.is_empty() {
            return;
        }
        let i = usize::from(c) % self.model.in_flight.len();
        let seq = self.model.in_flight.remove(i);
        let range = self.model.accepted[&seq].1;
        trace(|| format!("apply seq {seq} done: {}", if ok { "ok" } else { "EIO" }));
        if ok {
            self.model.completed_ok.insert(seq);
        } else {
            self.model.completed_err.insert(seq);
            self.model.io_failed = true;
        }
        apply_done(e, seq, range, ok, &mut self.out);
        self.process();
    }

    fn tick(&mut self) {
        if let Some(e) = self.engine.as_mut() {
            trace(|| "tick".into());
            tick(e, &mut self.out);
            self.process();
        }
    }

    /// Deliver every completion (successfully), then check nothing is left behind.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if !self.model.in_flight.is_empty() {
                self.complete(0);
            } else if self.model.flushing.is_some() {
                self.complete(0x80);
            } else {
                break;
            }
        }
        if self.model.failed || self.engine.is_none() {
            return;
        }
        self.tick();
        while self.model.flushing.is_some() {
            self.complete(0x80);
            self.tick();
        }
        let m = &self.model;
        for seq in m.accepted.keys() {
            assert!(m.started.contains(seq), "accepted seq {seq} never started");
        }
        if let Some(last) = m.accepted.keys().next_back()
            && !m.io_failed
        {
            assert!(
                m.durable >= *last,
                "durable {} < last applied {last} after a tick",
                m.durable
            );
        }
    }
}

/// Decode one compact frame; seqs are relative to the next expected one.
fn decode_msg(input: &mut Input, expected_next: u64) -> Option<(u64, Message, u64)> {
    let k = input.u8()?;
    let delta = i64::from(input.u8()? as i8);
    let seq = (expected_next as i64 + delta).max(0) as u64;
    let fua = k & 0x08 != 0;
    let msg = match k & 0x07 {
        0 => {
            let offset = u64::from(input.u16()?) * 512;
            let len = (u64::from(input.u8()?) + 1) * 512;
            return Some((seq, Message::Write { offset, fua }, len));
        }
        1 => Message::WriteZeroes {
            offset: u64::from(input.u16()?) * 512,
            len: u32::from(input.u16()?) * 512,
            fua,
        },
        2 => Message::Trim {
            offset: u64::from(input.u16()?) * 512,
            len: u32::from(input.u16()?) * 512,
        },
        3 => Message::Flush,
        4 => Message::ResyncStart {
            blocks: u64::from(input.u8()?),
            full: fua,
        },
        5 => Message::ResyncDone {
            through_seq: (expected_next as i64 - 1 + i64::from(input.u8()? as i8)).max(0) as u64,
        },
        6 => {
            let offset = u64::from(input.u16()?) * BLOCK_BYTES;
            let block_size = (BLOCK_BYTES as u32) << (input.u8()? % 9);
            let n = usize::from(input.u8()? % 16) + 1;
            Message::HashCheck {
                offset,
                block_size,
                hashes: vec![[0; 32]; n],
            }
        }
        _ => Message::Heartbeat { nonce: 0 },
    };
    Some((seq, msg, 0))
}

/// Bugs found by this target in code outside tools/fuzz and not fixed yet.
/// `run` steers around them so campaigns look for others; `run_strict`
/// reports them. Each has an ignored test in tests/regressions.rs that its fix
/// un-ignores; the fix also sets its flag here to false.
#[derive(Clone, Copy, Debug, Default)]
pub struct Open {
    /// Open 1: `agent::secondary::on_frame` creates the engine with the frame
    /// seq of the first ResyncStart, and `SecondaryEngine::new` asserts seq > 0:
    /// an authenticated primary that sends ResyncStart with seq 0 panics the
    /// secondary's session task.
    pub seq_zero_resync_start: bool,
    /// Open 2: a flush that started before a write failed still completes with
    /// `MarkUpToDate` when it covers a pending ResyncDone: the disk is recorded
    /// UpToDate after the engine marked it Inconsistent for a failed write.
    pub uptodate_after_failure: bool,
}

/// The open bugs `run` steers around.
pub const OPEN: Open = Open {
    seq_zero_resync_start: true,
    uptodate_after_failure: true,
};

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
    let mut h = Harness {
        engine: None,
        model: Model {
            open,
            ..Model::default()
        },
        out: Vec::new(),
    };
    for _ in 0..FRAMES_MAX {
        let Some(schedule) = input.u8() else { break };
        for _ in 0..(schedule & 0x07) {
            let Some(c) = input.u8() else { break };
            h.complete(c);
        }
        if schedule & 0x08 != 0 {
            h.tick();
        }
        // The agent ends the session at a Fail: no frame is fed after it (the
        // operations in flight still complete, in `drain`).
        if h.model.failed {
            break;
        }
        let expected = h.model.expected_next.unwrap_or(1);
        let Some((seq, msg, payload_len)) = decode_msg(&mut input, expected) else {
            break;
        };
        if open.seq_zero_resync_start
            && matches!(msg, Message::ResyncStart { .. })
            && seq == 0
            && h.engine.is_none()
        {
            break;
        }
        if !h.frame(seq, &msg, payload_len) {
            break;
        }
    }
    h.drain();
}

/// Encode a frame as `run` reads it (for seeds made from recorded traffic):
/// a schedule byte, then the compact frame. `None` for messages the secondary
/// does not act on, or ranges the encoding cannot express.
pub fn encode_record(
    schedule: u8,
    seq: u64,
    msg: &Message,
    payload_len: u64,
    expected_next: u64,
) -> Option<Vec<u8>> {
    let delta = i8::try_from(seq as i64 - expected_next as i64).ok()? as u8;
    let u16_of = |v: u64, unit: u64| -> Option<[u8; 2]> {
        v.is_multiple_of(unit).then_some(())?;
        Some(u16::try_from(v / unit).ok()?.to_le_bytes())
    };
    let mut out = vec![schedule];
    match msg {
        Message::Write { offset, fua } => {
            out.extend([u8::from(*fua) << 3, delta]);
            out.extend(u16_of(*offset, 512)?);
            out.push(u8::try_from(payload_len.div_ceil(512).checked_sub(1)?).ok()?);
        }
        Message::WriteZeroes { offset, len, fua } => {
            out.extend([1 | u8::from(*fua) << 3, delta]);
            out.extend(u16_of(*offset, 512)?);
            out.extend(u16_of(u64::from(*len), 512)?);
        }
        Message::Trim { offset, len } => {
            out.extend([2, delta]);
            out.extend(u16_of(*offset, 512)?);
            out.extend(u16_of(u64::from(*len), 512)?);
        }
        Message::Flush => out.extend([3, delta]),
        Message::ResyncStart { blocks, full } => {
            out.extend([4 | u8::from(*full) << 3, delta, (*blocks).min(255) as u8]);
        }
        Message::ResyncDone { through_seq } => {
            let d = i8::try_from(*through_seq as i64 - (expected_next as i64 - 1)).ok()? as u8;
            out.extend([5, delta, d]);
        }
        Message::HashCheck {
            offset,
            block_size,
            hashes,
        } => {
            out.extend([6, delta]);
            out.extend(u16_of(*offset, BLOCK_BYTES)?);
            out.push((block_size / BLOCK_BYTES as u32).trailing_zeros() as u8);
            out.push((hashes.len().clamp(1, 16) - 1) as u8);
        }
        _ => return None,
    }
    Some(out)
}
