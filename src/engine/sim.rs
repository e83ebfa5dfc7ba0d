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
}

impl Sim {
    fn new(seed: u64, mode: Mode) -> Sim {
        let dirty = DirtyBitmap::for_volume(SIZE, BS);
        let mut p = PrimaryEngine::new(mode, SIZE, BS, dirty, Seq(1));
        p.set_resync_chunk_bytes(4 * BS as u64);
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
        }
    }

    fn connect(&mut self, full: bool) {
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
        for (_, kind, range, data) in self.sapply.drain(..) {
            match kind {
                ApplyKind::Write => apply(&mut self.svol, range, &data),
                _ => apply(&mut self.svol, range, &vec![0; range.len as usize]),
            }
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
                    if kind == OpKind::ResyncRead {
                        self.data.insert(seq, (kind, range, Vec::new(), false));
                    }
                    self.plocal.push(seq);
                }
                Action::Ship { seq } => {
                    let (kind, range, data, fua) = self.data[&seq].clone();
                    let (kind, data) = match kind {
                        OpKind::Write | OpKind::ResyncRead => (ApplyKind::Write, data),
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
                let (kind, range, data, fua) = self.data[&seq].clone();
                match kind {
                    OpKind::Write => apply(&mut self.pvol, range, &data),
                    OpKind::WriteZeroes | OpKind::Trim => {
                        apply(&mut self.pvol, range, &vec![0; range.len as usize])
                    }
                    OpKind::ResyncRead => {
                        let d = self.pvol[range.offset as usize..range.end() as usize].to_vec();
                        self.data.insert(seq, (kind, range, d, fua));
                    }
                }
                let mut out = Vec::new();
                self.p.local_done(seq, Ok(()), &mut out);
                self.run_p(out);
            }
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
            50..=64 if !self.to_s.is_empty() && self.s.is_some() => {
                let m = self.to_s.pop_front().unwrap();
                let mut out = Vec::new();
                let s = self.s.as_mut().unwrap();
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
            65..=79 if !self.sapply.is_empty() => {
                let i = self.rng.gen_range(0..self.sapply.len());
                let (seq, kind, range, data) = self.sapply.swap_remove(i);
                match kind {
                    ApplyKind::Write => apply(&mut self.svol, range, &data),
                    _ => apply(&mut self.svol, range, &vec![0; range.len as usize]),
                }
                let mut out = Vec::new();
                self.s
                    .as_mut()
                    .unwrap()
                    .apply_done(seq, range, Ok(()), &mut out);
                self.run_s(out);
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
            85..=94 if !self.to_p.is_empty() => {
                let a = self.to_p.pop_front().unwrap();
                let mut out = Vec::new();
                match a {
                    Ack::Applied(seq) => self.p.peer_applied(seq, &mut out),
                    Ack::Durable(seq) => self.p.peer_durable(seq, &mut out),
                }
                self.run_p(out);
            }
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
            let busy = !self.plocal.is_empty()
                || !self.to_s.is_empty()
                || !self.sapply.is_empty()
                || !self.to_p.is_empty()
                || self.sflush.is_some()
                || !self.pflush.is_empty();
            if !busy && self.p.is_ahead() {
                let mut out = Vec::new();
                assert!(
                    self.p.leave_ahead(&mut out),
                    "an idle primary can always leave ahead"
                );
                self.run_p(out);
                continue;
            }
            if !busy {
                let mut out = Vec::new();
                self.s.as_mut().unwrap().tick(&mut out);
                let flushed = !out.is_empty();
                self.run_s(out);
                let mut out = Vec::new();
                self.p.next_resync_chunk(0, &mut out);
                let produced = !out.is_empty();
                self.run_p(out);
                if !flushed && !produced {
                    return;
                }
            }
            if !self.plocal.is_empty() {
                let seq = self.plocal.remove(0);
                let (kind, range, data, fua) = self.data[&seq].clone();
                match kind {
                    OpKind::Write => apply(&mut self.pvol, range, &data),
                    OpKind::WriteZeroes | OpKind::Trim => {
                        apply(&mut self.pvol, range, &vec![0; range.len as usize])
                    }
                    OpKind::ResyncRead => {
                        let d = self.pvol[range.offset as usize..range.end() as usize].to_vec();
                        self.data.insert(seq, (kind, range, d, fua));
                    }
                }
                let mut out = Vec::new();
                self.p.local_done(seq, Ok(()), &mut out);
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
        let mut out = Vec::new();
        if let Some(m) = self.to_s.pop_front() {
            let s = self.s.as_mut().unwrap();
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
        } else if !self.sapply.is_empty() {
            let (seq, kind, range, data) = self.sapply.remove(0);
            match kind {
                ApplyKind::Write => apply(&mut self.svol, range, &data),
                _ => apply(&mut self.svol, range, &vec![0; range.len as usize]),
            }
            self.s
                .as_mut()
                .unwrap()
                .apply_done(seq, range, Ok(()), &mut out);
            self.run_s(out);
        } else if self.sflush.take().is_some() {
            self.s.as_mut().unwrap().flush_done(Ok(()), &mut out);
            self.run_s(out);
        } else if let Some(a) = self.to_p.pop_front() {
            let mut out = Vec::new();
            match a {
                Ack::Applied(seq) => self.p.peer_applied(seq, &mut out),
                Ack::Durable(seq) => self.p.peer_durable(seq, &mut out),
            }
            self.run_p(out);
        }
    }
}

fn apply(vol: &mut [u8], range: ByteRange, data: &[u8]) {
    vol[range.offset as usize..range.end() as usize].copy_from_slice(data);
}

fn run(seed: u64, mode: Mode, steps: usize) {
    println!("sim seed={seed} mode={mode:?}");
    let mut sim = Sim::new(seed, mode);
    if sim.rng.gen_bool(0.5) {
        sim.connect(true);
    }
    for _ in 0..steps {
        sim.step();
    }
    sim.drain();
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
}

#[test]
fn random_workloads_with_disconnects_converge_async() {
    let base: u64 = std::env::var("TANDEM_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a4d);
    for i in 0..300 {
        run(base + i, Mode::Async, 400);
    }
}

#[test]
fn random_workloads_with_disconnects_converge_sync() {
    let base: u64 = std::env::var("TANDEM_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x51c0);
    for i in 0..300 {
        run(base + i, Mode::Sync, 400);
    }
}
