//! Seeded simulation of a primary and a secondary engine with random local I/O
//! completion order, random network delivery and random disconnects. Both
//! volumes are byte vectors; after the run drains, they must be identical and
//! the dirty bitmap empty (G2, G3). Every run prints its seed.

use std::collections::{HashMap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bitmap::DirtyBitmap;
use crate::engine::primary::{Action, Mode, OpKind, PrimaryEngine};
use crate::engine::secondary::{ApplyKind, SecondaryAction, SecondaryEngine};
use crate::types::{ByteRange, Seq};

const BS: u32 = 512;
const BLOCKS: u64 = 64;
const SIZE: u64 = BS as u64 * BLOCKS;
const AL_EXTENT: u64 = 2 * BS as u64;

#[derive(Clone, Debug)]
enum Net {
    ResyncStart(Seq, u64),
    Data {
        seq: Seq,
        kind: ApplyKind,
        range: ByteRange,
        data: Vec<u8>,
        fua: bool,
    },
    Flush {
        through: Seq,
    },
    ResyncDone {
        through: Seq,
    },
}

#[derive(Clone, Debug)]
enum Ack {
    Applied(Seq),
    Durable(Seq),
    HashReply(Seq, Vec<u32>),
}

struct Sim {
    rng: StdRng,
    mode: Mode,
    p: PrimaryEngine<u64>,
    s: Option<SecondaryEngine>,
    pvol: Vec<u8>,
    svol: Vec<u8>,
    /// Client data per seq (for local writes and frames).
    data: HashMap<Seq, (OpKind, ByteRange, Vec<u8>, bool)>,
    /// Local primary I/O started, not completed.
    plocal: Vec<Seq>,
    pflush: Vec<crate::engine::primary::FlushId>,
    to_s: VecDeque<Net>,
    to_p: VecDeque<Ack>,
    sapply: Vec<(Seq, ApplyKind, ByteRange, Vec<u8>)>,
    sheld: HashMap<Seq, Vec<u8>>,
    sflush: Option<Seq>,
    completed: u64,
    waiting_sync_applied: HashMap<Seq, ByteRange>,
    /// What a crash would leave on "disk": the persisted bitmap and the durable
    /// activity log, and the log write in flight.
    persisted: DirtyBitmap,
    al_durable: Vec<u32>,
    al_pending: Option<Vec<u32>>,
    coverage_checks: u64,
    hash_replies: u64,
    /// Bytes per hash of each hash check shipped (a block, or a range of blocks).
    hash_units: HashMap<Seq, u32>,
    /// Range hashes answered "differs" (the block-by-block level then runs).
    range_mismatches: u64,
    /// No disconnects and no ahead episodes while set (the verify sim's calm spells).
    calm: bool,
}

impl Sim {
    fn new(seed: u64, mode: Mode) -> Sim {
        let dirty = DirtyBitmap::for_volume(SIZE, BS);
        let mut p = PrimaryEngine::new(mode, SIZE, BS, dirty, Seq(1));
        p.set_resync_chunk_bytes(4 * BS as u64);
        // Ranges of 2 blocks: chunks of 4 blocks compare whole ranges first.
        p.set_range_hash_blocks(2);
        // Tiny extents and a tiny set, so retiring and the full-set path run often.
        p.enable_activity(crate::engine::activity::ActiveSet::new(AL_EXTENT, 4));
        Sim {
            rng: StdRng::seed_from_u64(seed),
            mode,
            p,
            s: None,
            pvol: vec![0; SIZE as usize],
            svol: vec![0; SIZE as usize],
            data: HashMap::new(),
            plocal: Vec::new(),
            pflush: Vec::new(),
            to_s: VecDeque::new(),
            to_p: VecDeque::new(),
            sapply: Vec::new(),
            sheld: HashMap::new(),
            sflush: None,
            completed: 0,
            waiting_sync_applied: HashMap::new(),
            persisted: DirtyBitmap::for_volume(SIZE, BS),
            al_durable: Vec::new(),
            al_pending: None,
            coverage_checks: 0,
            hash_replies: 0,
            hash_units: HashMap::new(),
            range_mismatches: 0,
            calm: false,
        }
    }

    /// Primary local I/O of `seq` completes: a write lands, a resync op reads.
    fn complete_local(&mut self, seq: Seq) {
        let (kind, range, data, fua) = self.data[&seq].clone();
        match kind {
            OpKind::Write => apply(&mut self.pvol, range, &data),
            OpKind::WriteZeroes | OpKind::Trim => {
                apply(&mut self.pvol, range, &vec![0; range.len as usize])
            }
            OpKind::ResyncRead | OpKind::HashRead | OpKind::VerifyRead | OpKind::RangeHashRead => {
                let d = self.pvol[range.offset as usize..range.end() as usize].to_vec();
                self.data.insert(seq, (kind, range, d, fua));
            }
        }
        let mut out = Vec::new();
        self.p.local_done(seq, Ok(()), &mut out);
        self.run_p(out);
    }

    /// A secondary apply reaches its volume (a hash check only reads).
    fn land_apply(&mut self, kind: ApplyKind, range: ByteRange, data: &[u8]) {
        match kind {
            ApplyKind::Write => apply(&mut self.svol, range, data),
            ApplyKind::WriteZeroes | ApplyKind::Trim => {
                apply(&mut self.svol, range, &vec![0; range.len as usize])
            }
            ApplyKind::HashCheck => {}
        }
    }

    /// A secondary apply completes; a hash check answers with the differing blocks.
    fn complete_apply(&mut self, (seq, kind, range, data): (Seq, ApplyKind, ByteRange, Vec<u8>)) {
        self.land_apply(kind, range, &data);
        if kind == ApplyKind::HashCheck {
            let local = &self.svol[range.offset as usize..range.end() as usize];
            let unit = self.hash_units.remove(&seq).unwrap_or(BS);
            let expected = crate::resync::hash_blocks(&data, unit);
            let mismatched = crate::resync::mismatched_blocks(local, unit, &expected);
            if unit > BS {
                self.range_mismatches += mismatched.len() as u64;
            }
            self.to_p.push_back(Ack::HashReply(seq, mismatched));
            self.hash_replies += 1;
        }
        let mut out = Vec::new();
        self.s
            .as_mut()
            .unwrap()
            .apply_done(seq, range, Ok(()), &mut out);
        self.run_s(out);
    }

    /// G3 under a crash of the primary at this instant: every block that differs
    /// between the images, or that local or remote I/O in flight may still change,
    /// is in the persisted bitmap or in an extent of the durable activity log.
    fn check_crash_coverage(&mut self) {
        let mut covered = self.persisted.clone();
        for &e in &self.al_durable {
            let r = ByteRange::new(e as u64 * AL_EXTENT, AL_EXTENT);
            let (a, b) = r.blocks(BS);
            covered.mark(a, b);
        }
        let block = |b: u64| (b * BS as u64) as usize..((b + 1) * BS as u64) as usize;
        for b in 0..BLOCKS {
            if self.pvol[block(b)] != self.svol[block(b)] {
                assert!(
                    covered.is_dirty(crate::types::BlockIndex(b)),
                    "block {b} differs but a crash now would not resync it"
                );
            }
        }
        let mut in_flight: Vec<ByteRange> = self
            .plocal
            .iter()
            .filter(|s| !self.data[s].0.is_resync())
            .map(|s| self.data[s].1)
            .collect();
        // A hash check only reads the secondary's volume.
        in_flight.extend(
            self.sapply
                .iter()
                .filter(|a| a.1 != ApplyKind::HashCheck)
                .map(|a| a.2),
        );
        for r in in_flight {
            let (a, b) = r.blocks(BS);
            for x in a.0..b.0 {
                assert!(
                    covered.is_dirty(crate::types::BlockIndex(x)),
                    "block {x} has I/O in flight but a crash now would not resync it"
                );
            }
        }
        self.coverage_checks += 1;
    }

    fn connect(&mut self, full: bool) {
        if full {
            // A full sync is recorded by the secondary's state (new or from another
            // generation), which a crash does not change.
            self.persisted.mark_all();
        }
        self.s = Some(SecondaryEngine::new(self.p.next_seq(), 4096));
        let mut out = Vec::new();
        self.p.session_started(full, &mut out);
        self.run_p(out);
    }

    fn disconnect(&mut self) {
        self.s = None;
        self.to_s.clear();
        self.to_p.clear();
        // In-flight secondary applies still land on its disk (they were submitted).
        for (_, kind, range, data) in std::mem::take(&mut self.sapply) {
            self.land_apply(kind, range, &data);
        }
        self.sheld.clear();
        self.sflush = None;
        let mut out = Vec::new();
        self.p.session_ended(&mut out);
        self.run_p(out);
    }

    fn run_p(&mut self, out: Vec<Action<u64>>) {
        for a in out {
            match a {
                Action::StartLocal {
                    seq, kind, range, ..
                } => {
                    if kind.is_resync() {
                        self.data.insert(seq, (kind, range, Vec::new(), false));
                    }
                    self.plocal.push(seq);
                }
                Action::Ship { seq } => {
                    let (kind, range, data, fua) = self.data[&seq].clone();
                    let (kind, data) = match kind {
                        OpKind::Write | OpKind::ResyncRead => (ApplyKind::Write, data),
                        // The sim carries the primary's bytes; the secondary compares blocks.
                        OpKind::HashRead | OpKind::VerifyRead | OpKind::RangeHashRead => {
                            let unit = self.p.hash_unit_blocks(kind).expect("a comparison");
                            self.hash_units.insert(seq, BS * unit as u32);
                            (ApplyKind::HashCheck, data)
                        }
                        OpKind::WriteZeroes => (ApplyKind::WriteZeroes, Vec::new()),
                        OpKind::Trim => (ApplyKind::Trim, Vec::new()),
                    };
                    self.to_s.push_back(Net::Data {
                        seq,
                        kind,
                        range,
                        data,
                        fua,
                    });
                }
                Action::ShipResyncStart { next, blocks, .. } => {
                    self.to_s.push_back(Net::ResyncStart(next, blocks.0))
                }
                Action::ShipFlush { through } => self.to_s.push_back(Net::Flush { through }),
                Action::ShipResyncDone { through } => {
                    self.to_s.push_back(Net::ResyncDone { through })
                }
                Action::Complete { seq, result, .. } => {
                    assert!(result.is_ok());
                    self.completed += 1;
                    if self.mode == Mode::Sync && self.p.is_streaming() {
                        // G1: a completed sync write was applied on the secondary.
                        self.waiting_sync_applied.remove(&seq);
                    }
                }
                Action::StartLocalFlush { id } => self.pflush.push(id),
                Action::CompleteFlush { result, .. } => assert!(result.is_ok()),
                Action::Release { .. } | Action::Forget { .. } => {}
                Action::DropSession { reason } => panic!("unexpected drop: {reason}"),
                Action::WriteActivityLog { active, retired } => {
                    assert!(
                        self.al_pending.is_none(),
                        "one activity-log write at a time"
                    );
                    if retired {
                        self.persisted = self.p.out_of_sync();
                    }
                    self.al_pending = Some(active);
                }
            }
        }
        self.p.assert_invariants();
    }

    fn run_s(&mut self, out: Vec<SecondaryAction>) {
        for a in out {
            match a {
                SecondaryAction::StartApply { seq, kind, range } => {
                    let data = self.sheld.remove(&seq).unwrap_or_default();
                    self.sapply.push((seq, kind, range, data));
                }
                SecondaryAction::SendApplied { seq } => self.to_p.push_back(Ack::Applied(seq)),
                SecondaryAction::StartFlush { through } => self.sflush = Some(through),
                SecondaryAction::SendDurable { through } => {
                    self.to_p.push_back(Ack::Durable(through))
                }
                SecondaryAction::MarkInconsistent | SecondaryAction::MarkUpToDate => {}
                SecondaryAction::Fail { reason } => panic!("secondary failed: {reason}"),
            }
        }
    }

    fn step(&mut self) {
        let r = self.rng.gen_range(0..100);
        if self.calm && r == 95 {
            return;
        }
        match r {
            0..=24 => {
                // A client write somewhere (unaligned too).
                let off = self.rng.gen_range(0..SIZE - 1);
                let len = self.rng.gen_range(1..=(SIZE - off).min(3 * BS as u64));
                let kind = match self.rng.gen_range(0..10) {
                    0 => OpKind::WriteZeroes,
                    1 => OpKind::Trim,
                    _ => OpKind::Write,
                };
                let data: Vec<u8> = if kind == OpKind::Write {
                    (0..len).map(|_| self.rng.r#gen()).collect()
                } else {
                    Vec::new()
                };
                let fua = self.rng.gen_bool(0.1);
                let range = ByteRange::new(off, len);
                let mut out = Vec::new();
                let seq = self.p.next_seq();
                self.data.insert(seq, (kind, range, data, fua));
                let got = self.p.submit(kind, range, fua, seq.0, 0, &mut out);
                assert_eq!(got, seq);
                self.run_p(out);
            }
            25..=39 if !self.plocal.is_empty() => {
                let i = self.rng.gen_range(0..self.plocal.len());
                let seq = self.plocal.swap_remove(i);
                self.complete_local(seq);
            }
            96 if self.al_pending.is_some() => {
                self.al_durable = self.al_pending.take().expect("checked");
                let mut out = Vec::new();
                self.p.activity_written(&mut out);
                self.run_p(out);
            }
            97 => self.check_crash_coverage(),
            40..=44 => {
                let mut out = Vec::new();
                let id = self.p.next_seq().0;
                self.p.flush(id, &mut out);
                self.run_p(out);
            }
            45..=49 if !self.pflush.is_empty() => {
                let id = self.pflush.remove(0);
                let mut out = Vec::new();
                self.p.local_flush_done(id, Ok(()), &mut out);
                self.run_p(out);
            }
            50..=64 if !self.to_s.is_empty() && self.s.is_some() => self.deliver_to_secondary(),
            65..=79 if !self.sapply.is_empty() => {
                let i = self.rng.gen_range(0..self.sapply.len());
                let a = self.sapply.swap_remove(i);
                self.complete_apply(a);
            }
            80..=84 if self.s.is_some() => {
                let mut out = Vec::new();
                if self.sflush.take().is_some() {
                    self.s.as_mut().unwrap().flush_done(Ok(()), &mut out);
                } else {
                    self.s.as_mut().unwrap().tick(&mut out);
                }
                self.run_s(out);
            }
            85..=94 if !self.to_p.is_empty() => self.deliver_to_primary(),
            95 if self.s.is_some() && self.rng.gen_bool(0.3) => self.disconnect(),
            95 if self.s.is_some() && self.p.is_shipping() => self.p.enter_ahead(),
            95 if self.p.is_ahead() => {
                let mut out = Vec::new();
                self.p.leave_ahead(&mut out);
                self.run_p(out);
            }
            95..=99 if self.p.wants_resync_chunk() => {
                let mut out = Vec::new();
                self.p.next_resync_chunk(0, &mut out);
                self.run_p(out);
            }
            96..=99 if self.s.is_none() => self.connect(false),
            _ => {}
        }
    }

    /// Run everything to quiescence while connected.
    fn drain(&mut self) {
        if self.s.is_none() {
            self.connect(false);
        }
        for _ in 0..1_000_000 {
            let busy = self.al_pending.is_some()
                || !self.plocal.is_empty()
                || !self.to_s.is_empty()
                || !self.sapply.is_empty()
                || !self.to_p.is_empty()
                || self.sflush.is_some()
                || !self.pflush.is_empty();
            if !busy {
                let mut out = Vec::new();
                self.s.as_mut().unwrap().tick(&mut out);
                if !out.is_empty() {
                    self.run_s(out);
                    continue;
                }
                if self.p.is_ahead() {
                    let mut out = Vec::new();
                    assert!(
                        self.p.leave_ahead(&mut out),
                        "an idle, flushed primary can always leave ahead"
                    );
                    self.run_p(out);
                    continue;
                }
                let mut out = Vec::new();
                self.s.as_mut().unwrap().tick(&mut out);
                let flushed = !out.is_empty();
                self.run_s(out);
                let mut out = Vec::new();
                let produced = self.p.next_resync_chunk(0, &mut out).is_some() || !out.is_empty();
                self.run_p(out);
                if !flushed && !produced {
                    return;
                }
            }
            if !self.plocal.is_empty() {
                let seq = self.plocal.remove(0);
                self.complete_local(seq);
                continue;
            }
            if self.al_pending.is_some() {
                self.al_durable = self.al_pending.take().expect("checked");
                let mut out = Vec::new();
                self.p.activity_written(&mut out);
                self.run_p(out);
                continue;
            }
            if !self.pflush.is_empty() {
                let id = self.pflush.remove(0);
                let mut out = Vec::new();
                self.p.local_flush_done(id, Ok(()), &mut out);
                self.run_p(out);
                continue;
            }
            // Reuse the random step for the network and secondary side.
            self.step_no_client();
        }
        panic!("simulation did not drain");
    }

    fn step_no_client(&mut self) {
        if !self.to_s.is_empty() {
            self.deliver_to_secondary();
        } else if !self.sapply.is_empty() {
            let a = self.sapply.remove(0);
            self.complete_apply(a);
        } else if self.sflush.take().is_some() {
            let mut out = Vec::new();
            self.s.as_mut().unwrap().flush_done(Ok(()), &mut out);
            self.run_s(out);
        } else if !self.to_p.is_empty() {
            self.deliver_to_primary();
        }
    }

    /// The next frame reaches the secondary's engine.
    fn deliver_to_secondary(&mut self) {
        let m = self.to_s.pop_front().expect("a frame in flight");
        let mut out = Vec::new();
        let s = self.s.as_mut().expect("connected");
        match m {
            Net::ResyncStart(next, blocks) => s.resync_started(next, blocks, &mut out),
            Net::Data {
                seq,
                kind,
                range,
                data,
                fua,
            } => {
                self.sheld.insert(seq, data);
                s.receive(seq, kind, range, fua, &mut out);
            }
            Net::Flush { through } => s.flush_requested(through, &mut out),
            Net::ResyncDone { through } => s.resync_done(through, &mut out),
        }
        self.run_s(out);
    }

    /// The next acknowledgement reaches the primary's engine.
    fn deliver_to_primary(&mut self) {
        let a = self.to_p.pop_front().expect("an ack in flight");
        let mut out = Vec::new();
        match a {
            Ack::Applied(seq) => self.p.peer_applied(seq, &mut out),
            Ack::Durable(seq) => self.p.peer_durable(seq, &mut out),
            Ack::HashReply(seq, m) => self.p.peer_hash_reply(seq, &m, &mut out),
        }
        self.run_p(out);
    }
}

fn apply(vol: &mut [u8], range: ByteRange, data: &[u8]) {
    vol[range.offset as usize..range.end() as usize].copy_from_slice(data);
}

/// Returns (crash-coverage checks made, hash replies sent, range hashes found
/// different) so the tests can show every path ran.
fn run(seed: u64, mode: Mode, steps: usize) -> (u64, u64, u64) {
    println!("sim seed={seed} mode={mode:?}");
    let mut sim = Sim::new(seed, mode);
    if sim.rng.gen_bool(0.5) {
        // A pre-seeded secondary: the same data but a few blocks differ; every block
        // is compared by hash before data is sent.
        let fill: Vec<u8> = (0..SIZE).map(|_| sim.rng.r#gen()).collect();
        sim.pvol.copy_from_slice(&fill);
        sim.svol.copy_from_slice(&fill);
        for _ in 0..sim.rng.gen_range(0..6) {
            let b = sim.rng.gen_range(0..SIZE);
            sim.svol[b as usize] ^= 0x5a;
        }
        sim.p.mark_verify(
            crate::types::BlockIndex(0),
            crate::types::BlockIndex(BLOCKS),
        );
        sim.persisted.mark_all();
        sim.connect(false);
    } else if sim.rng.gen_bool(0.5) {
        sim.connect(true);
    }
    for _ in 0..steps {
        sim.step();
    }
    sim.drain();
    let differing: Vec<u64> = (0..BLOCKS)
        .filter(|b| {
            let r = (b * BS as u64) as usize..((b + 1) * BS as u64) as usize;
            sim.pvol[r.clone()] != sim.svol[r]
        })
        .collect();
    assert!(
        differing.is_empty(),
        "seed {seed}: blocks {differing:?} differ after drain (verify left: {}, dirty left: {}, resync: {:?}, ahead: {})",
        sim.p.verify_count().0,
        sim.p.dirty().dirty_count().0,
        sim.p.resync_progress(),
        sim.p.is_ahead()
    );
    assert!(
        sim.pvol == sim.svol,
        "seed {seed}: images differ after drain"
    );
    assert_eq!(
        sim.p.dirty().dirty_count().0,
        0,
        "seed {seed}: dirty blocks remain"
    );
    assert_eq!(sim.p.lag().writes, 0, "seed {seed}: unacked writes remain");
    let _ = sim.completed;
    (sim.coverage_checks, sim.hash_replies, sim.range_mismatches)
}

/// 300 seeded runs from `TANDEM_SIM_SEED` (or `default_base`); every path must run.
fn run_many(default_base: u64, mode: Mode) {
    let base: u64 = std::env::var("TANDEM_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_base);
    let (mut checks, mut hashes, mut ranges) = (0, 0, 0);
    for i in 0..300 {
        let (c, h, r) = run(base + i, mode, 400);
        checks += c;
        hashes += h;
        ranges += r;
    }
    assert!(
        checks > 300 && hashes > 300 && ranges > 30,
        "coverage checks {checks}, hash replies {hashes}, differing ranges {ranges}"
    );
}

#[test]
fn random_workloads_with_disconnects_converge_async() {
    run_many(0x7a4d, Mode::Async);
}

#[test]
fn random_workloads_with_disconnects_converge_sync() {
    run_many(0x51c0, Mode::Sync);
}

/// Online verify under a random workload: both volumes start identical and every
/// write is replicated, so any mismatch a finished verify reports is a false
/// positive from a write in flight. Verifies start again and again while writes,
/// random local and remote completion orders, flushes, ahead episodes and
/// disconnects go on (a disconnect fails the verify; that is allowed).
fn run_verify(seed: u64, mode: Mode, steps: usize) -> (u64, u64) {
    use crate::engine::primary::VerifyState;
    println!("verify sim seed={seed} mode={mode:?}");
    let mut sim = Sim::new(seed, mode);
    let fill: Vec<u8> = (0..SIZE).map(|_| sim.rng.r#gen()).collect();
    sim.pvol.copy_from_slice(&fill);
    sim.svol.copy_from_slice(&fill);
    sim.connect(false);
    let (mut finished, mut compared) = (0u64, 0u64);
    let mut running = false;
    let mut fault_steps_left = 0u32;
    for _ in 0..steps {
        // Mostly calm, so verifies can finish; now and then a spell with disconnects
        // and ahead episodes.
        if fault_steps_left == 0 && sim.rng.gen_range(0..400) == 0 {
            fault_steps_left = 100;
        }
        fault_steps_left = fault_steps_left.saturating_sub(1);
        sim.calm = fault_steps_left == 0;
        match sim.rng.gen_range(0..10) {
            0 if !running => running = sim.p.start_online_verify(false).is_ok(),
            1..=2 if sim.p.wants_verify_chunk() => {
                let mut out = Vec::new();
                sim.p.next_verify_chunk(&mut out);
                sim.run_p(out);
            }
            // More I/O completions and deliveries than the plain step makes, so that
            // verifies finish within the run.
            3 if sim.al_pending.is_some() => {
                sim.al_durable = sim.al_pending.take().expect("checked");
                let mut out = Vec::new();
                sim.p.activity_written(&mut out);
                sim.run_p(out);
            }
            4 if !sim.plocal.is_empty() => {
                let i = sim.rng.gen_range(0..sim.plocal.len());
                let seq = sim.plocal.swap_remove(i);
                sim.complete_local(seq);
            }
            5 if sim.s.is_some() => {
                let mut out = Vec::new();
                if sim.sflush.take().is_some() {
                    sim.s.as_mut().unwrap().flush_done(Ok(()), &mut out);
                } else {
                    sim.s.as_mut().unwrap().tick(&mut out);
                }
                sim.run_s(out);
            }
            6 if sim.s.is_some() => sim.step_no_client(),
            _ => sim.step(),
        }
        if running && let Some(r) = sim.p.verify_report() {
            match r.state {
                VerifyState::Scanning | VerifyState::Repairing => {}
                VerifyState::Done => {
                    assert_eq!(
                        r.mismatched_blocks.0,
                        0,
                        "seed {seed}: verify reported {:?} on replicated volumes",
                        sim.p.verify_mismatched_ranges(100).0
                    );
                    finished += 1;
                    compared += r.compared_blocks.0;
                    running = false;
                }
                VerifyState::Failed(_) => running = false,
            }
        }
    }
    (finished, compared)
}

#[test]
fn online_verify_under_random_writes_reports_no_false_mismatch() {
    let base: u64 = std::env::var("TANDEM_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xf1e7);
    let (mut finished, mut compared) = (0, 0);
    for i in 0..120 {
        let mode = if i % 2 == 0 { Mode::Async } else { Mode::Sync };
        let (f, c) = run_verify(base + i, mode, 3000);
        finished += f;
        compared += c;
    }
    assert!(
        finished > 40 && compared >= finished * BLOCKS,
        "finished verifies {finished}, blocks compared {compared}"
    );
}
