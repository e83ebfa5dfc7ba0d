//! MetaStore under the durability model of ARCHITECTURE §4a, on a SimFile:
//! a sequence of superblock writes, bitmap persists and activity-log
//! transactions is cut by a power loss (or kill -9) at every instant — after
//! every single pwrite/fdatasync — and each cut is tried with several seeds
//! of what the volatile cache kept. After every cut the store must open and
//! hold the state before or after the step in progress, never garbage
//! accepted as valid and never an older state. A bitmap persist (format
//! version 2 writes it in place) may be cut between pages: then each
//! 512-byte sector of the bitmap holds its contents before or after, and once
//! the superblock of the persist is found, the whole new bitmap is.
//!
//! Not covered here: damage that is not a crash (bit rot, wiped slots), see
//! tests/meta_store.rs and tests/meta_al.rs.

mod meta_support;

use meta_support::sectors_old_or_new;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tandem::bitmap::DirtyBitmap;
use tandem::meta::{MetaError, MetaStore, Opened, SimFile, Superblock};
use tandem::types::{BlockCount, BlockIndex, DiskState, Generation, Role, VolumeId};

/// 1 GiB + 512 bytes: 262,145 blocks, a bitmap of several pages.
const SIZE_BYTES: u64 = (1 << 30) + 512;
const BLOCK_SIZE: u32 = 4096;
const BLOCKS: u64 = 262_145;
const EXTENT_BYTES: u64 = 4 << 20;
/// Outcomes of the volatile cache tried per instant.
const SEEDS_PER_CUT: u64 = 6;

fn fresh() -> Superblock {
    Superblock {
        volume_id: VolumeId([0x42; 16]),
        size_bytes: SIZE_BYTES,
        block_size: BLOCK_SIZE,
        role: Role::Primary,
        disk_state: DiskState::UpToDate,
        is_new: true,
        gen_current: Generation(1),
        gen_bitmap_base: Generation::NONE,
        gen_history: [Generation::NONE; 2],
        promoted_at_s: 0,
        clean_shutdown: false,
        resync_cursor: None,
        bitmap_valid: true,
        volume_mixed: false,
        poisoned: false,
        consistent_seq: 0,
        consistent_at_ms: 0,
        mixed_through: 0,
    }
}

#[derive(Clone, Debug)]
enum Step {
    Superblock(Superblock),
    Bitmap(Superblock, DirtyBitmap),
    Activity(Vec<u32>),
}

/// What the store holds after a step.
#[derive(Clone, Debug, PartialEq)]
struct State {
    sb: Superblock,
    bitmap: DirtyBitmap,
    extents: Vec<u32>,
}

fn bitmap(ranges: &[(u64, u64)]) -> DirtyBitmap {
    let mut bm = DirtyBitmap::new(BlockCount(BLOCKS));
    for &(a, b) in ranges {
        bm.mark(BlockIndex(a), BlockIndex(b));
    }
    bm
}

/// A history that touches every part of the file several times: both
/// superblock slots, bitmap bits set and cleared across pages, and more
/// activity-log transactions than the ring has slots.
fn steps() -> Vec<Step> {
    let mut steps = Vec::new();
    let mut sb = fresh();
    sb.is_new = false;
    steps.push(Step::Superblock(sb.clone()));
    steps.push(Step::Activity(vec![0, 3]));
    let mut bm = bitmap(&[(10, 20), (100_000, 100_100)]);
    // Each bitmap step also changes the superblock, so the test can tell
    // whether the superblock of the persist was written.
    sb.resync_cursor = Some(BlockIndex(1));
    steps.push(Step::Bitmap(sb.clone(), bm.clone()));
    steps.push(Step::Activity(vec![3, 200]));
    sb.gen_current = Generation(2);
    sb.gen_bitmap_base = Generation(1);
    steps.push(Step::Superblock(sb.clone()));
    bm.clear(BlockIndex(10), BlockIndex(20));
    bm.mark(BlockIndex(BLOCKS - 40), BlockIndex(BLOCKS));
    bm.mark(BlockIndex(33_000), BlockIndex(70_000));
    sb.resync_cursor = Some(BlockIndex(2));
    steps.push(Step::Bitmap(sb.clone(), bm.clone()));
    for i in 0..70u32 {
        steps.push(Step::Activity(vec![i, 180 + i]));
    }
    bm.clear_all();
    sb.clean_shutdown = true;
    steps.push(Step::Bitmap(sb.clone(), bm));
    steps.push(Step::Activity(vec![]));
    steps
}

fn states(steps: &[Step]) -> Vec<State> {
    let mut s = State {
        sb: fresh(),
        bitmap: bitmap(&[]),
        extents: vec![],
    };
    let mut out = vec![s.clone()];
    for step in steps {
        match step {
            Step::Superblock(sb) => s.sb = sb.clone(),
            Step::Bitmap(sb, bm) => {
                s.sb = sb.clone();
                s.sb.bitmap_valid = true;
                s.bitmap = bm.clone();
            }
            Step::Activity(e) => s.extents = e.clone(),
        }
        out.push(s.clone());
    }
    out
}

fn apply(store: &mut MetaStore<SimFile>, step: &Step) -> Result<(), MetaError> {
    match step {
        Step::Superblock(sb) => store.write_superblock(sb),
        Step::Bitmap(sb, bm) => store.persist_bitmap(&mut sb.clone(), bm),
        Step::Activity(e) => store.write_activity(EXTENT_BYTES, e),
    }
}

fn create(file: SimFile) -> Opened<SimFile> {
    MetaStore::create_on(file, "sim-meta", SIZE_BYTES, BLOCK_SIZE, fresh()).unwrap()
}

fn open(file: SimFile) -> Result<Opened<SimFile>, MetaError> {
    MetaStore::open_on(file, "sim-meta", SIZE_BYTES, BLOCK_SIZE)
}

/// Run `steps` on a new file that halts after `cut` more mutating calls;
/// returns the file and the index of the step that was cut (`steps.len()`
/// if none was).
fn run_until_cut(steps: &[Step], cut: Option<u64>) -> (SimFile, usize) {
    let disk = SimFile::new(7);
    let mut store = create(disk.reopen()).store;
    if let Some(cut) = cut {
        disk.halt_after_ops(cut);
    }
    for (i, step) in steps.iter().enumerate() {
        if apply(&mut store, step).is_err() {
            assert!(disk.is_halted(), "step {i} failed without a cut");
            return (disk, i);
        }
    }
    (disk, steps.len())
}

/// What a reopened store holds, checked to be `before` or `after` (per
/// sector for the bitmap, see the module documentation).
fn check(opened: &Opened<SimFile>, before: &State, after: &State, what: &str) {
    let found = State {
        sb: opened.superblock.clone(),
        bitmap: opened.bitmap.clone(),
        extents: opened.activity.extents.clone(),
    };
    assert!(
        opened.activity.intact,
        "{what}: activity log not intact: {}",
        opened.activity
    );
    if let Some(note) = &opened.recovered_from {
        assert!(
            !note.contains("bitmap copy") && !note.contains("bitmap page"),
            "{what}: the persisted bitmap was lost: {note}"
        );
    }
    assert!(
        found.sb == before.sb || found.sb == after.sb,
        "{what}: superblock neither before nor after\n found {:?}\n before {:?}\n after {:?}",
        found.sb,
        before.sb,
        after.sb
    );
    assert!(
        found.extents == before.extents || found.extents == after.extents,
        "{what}: activity log neither before nor after: {:?} / {:?} / {:?}",
        found.extents,
        before.extents,
        after.extents
    );
    assert!(
        sectors_old_or_new(&found.bitmap, &before.bitmap, &after.bitmap),
        "{what}: a bitmap sector is neither before nor after"
    );
    if found.sb == after.sb && after.sb != before.sb {
        assert!(
            found.bitmap == after.bitmap,
            "{what}: the superblock of a persist is durable but not all of its pages"
        );
    }
}

#[test]
fn power_loss_at_every_instant_leaves_the_state_before_or_after_each_step() {
    let steps = steps();
    let states = states(&steps);
    let total = {
        let disk = SimFile::new(7);
        let mut store = create(disk.reopen()).store;
        let start = disk.ops();
        for step in &steps {
            apply(&mut store, step).unwrap();
        }
        disk.ops() - start
    };
    assert!(total > 2 * steps.len() as u64, "{total} ops");
    for cut in 0..=total {
        let (disk, step) = run_until_cut(&steps, Some(cut));
        let before = &states[step];
        let after = &states[(step + 1).min(steps.len())];
        for seed in 0..SEEDS_PER_CUT {
            let what = format!("cut after {cut} of {total} ops (step {step}), seed {seed}");
            let trial = disk.fork();
            trial.power_loss(&mut StdRng::seed_from_u64(seed));
            let opened = open(trial.reopen()).unwrap_or_else(|e| panic!("{what}: {e}"));
            check(&opened, before, after, &what);
        }
        let what = format!("cut after {cut} of {total} ops (step {step}), kill -9");
        let trial = disk.fork();
        trial.kill9();
        let opened = open(trial.reopen()).unwrap_or_else(|e| panic!("{what}: {e}"));
        check(&opened, before, after, &what);
        for keep in [false, true] {
            let what = format!("cut after {cut} of {total} ops (step {step}), keep all: {keep}");
            let trial = disk.fork();
            if keep {
                trial.power_loss_keeping_volatile();
            } else {
                trial.power_loss_dropping_volatile();
            }
            let opened = open(trial.reopen()).unwrap_or_else(|e| panic!("{what}: {e}"));
            check(&opened, before, after, &what);
        }
    }
}

#[test]
fn a_store_reopened_after_a_cut_keeps_working_and_survives_the_next_cut() {
    // Recovery itself must leave a file that the next crash cannot break:
    // reopen after a power loss at every instant, write one more step, cut again.
    let steps = steps();
    let states = states(&steps);
    let total = {
        let (disk, _) = run_until_cut(&steps, None);
        disk.ops()
    };
    for cut in (0..total).step_by(5) {
        let (disk, step) = run_until_cut(&steps, Some(cut));
        disk.power_loss(&mut StdRng::seed_from_u64(cut));
        let opened = open(disk.reopen()).unwrap();
        check(
            &opened,
            &states[step],
            &states[(step + 1).min(steps.len())],
            &format!("first cut after {cut}"),
        );
        let mut sb = opened.superblock.clone();
        let mut store = opened.store;
        sb.gen_current = Generation(99);
        let bm = bitmap(&[(5, 6), (200_000, 200_001)]);
        store.persist_bitmap(&mut sb, &bm).unwrap();
        store.write_activity(EXTENT_BYTES, &[9]).unwrap();
        let after = State {
            sb: sb.clone(),
            bitmap: bm,
            extents: vec![9],
        };
        drop(store);
        disk.power_loss(&mut StdRng::seed_from_u64(cut + 1));
        let again = open(disk.reopen()).unwrap();
        check(&again, &after, &after, &format!("second cut after {cut}"));
    }
}

#[test]
fn a_failed_fdatasync_poisons_the_store_and_a_power_loss_keeps_before_or_after() {
    let steps = steps();
    let states = states(&steps);
    for (i, step) in steps.iter().enumerate().take(8) {
        for seed in 0..4 {
            let disk = SimFile::new(seed);
            let mut store = create(disk.reopen()).store;
            for s in &steps[..i] {
                apply(&mut store, s).unwrap();
            }
            disk.fail_next_sync();
            let err = apply(&mut store, step).unwrap_err();
            assert!(matches!(err, MetaError::Io { .. }), "{err:?}");
            assert!(store.is_poisoned());
            assert!(matches!(
                apply(&mut store, &steps[i]),
                Err(MetaError::Poisoned { .. })
            ));
            drop(store);
            disk.power_loss(&mut StdRng::seed_from_u64(seed));
            let opened = open(disk.reopen()).unwrap();
            check(
                &opened,
                &states[i],
                &states[i + 1],
                &format!("failed sync in step {i}, seed {seed}"),
            );
        }
    }
}

#[test]
fn a_power_loss_during_creation_never_opens_as_valid_garbage() {
    let total = {
        let disk = SimFile::new(1);
        drop(create(disk.reopen()));
        disk.ops()
    };
    for cut in 0..total {
        for seed in 0..SEEDS_PER_CUT {
            let disk = SimFile::new(1);
            disk.halt_after_ops(cut);
            assert!(
                MetaStore::create_on(disk.reopen(), "sim-meta", SIZE_BYTES, BLOCK_SIZE, fresh())
                    .is_err()
            );
            disk.power_loss(&mut StdRng::seed_from_u64(seed));
            match open(disk.reopen()) {
                Ok(opened) => {
                    assert_eq!(opened.superblock, fresh(), "cut {cut} seed {seed}");
                    assert_eq!(opened.bitmap.dirty_count(), BlockCount(0));
                    assert!(opened.activity.intact && opened.activity.extents.is_empty());
                }
                Err(MetaError::BothSlotsBad { .. }) => {}
                Err(e) => panic!("cut {cut} seed {seed}: {e}"),
            }
        }
    }
}

/// The engine's use of the store (ARCHITECTURE §4), in miniature: a write to
/// an inactive extent first records it in the activity log; when the log is
/// full the least recently used extent retires: its bitmap pages are made
/// durable with `persist_bitmap_pages`, and only then is the log record that
/// drops it written. Acks clear bits in memory only. At every instant the
/// persisted bitmap plus the logged extents must cover every block that may
/// differ (every bit set in memory): G3 under power loss.
#[test]
fn retiring_extents_by_pages_keeps_every_dirty_block_covered_at_every_instant() {
    const EXTENT_BLOCKS: u64 = EXTENT_BYTES / BLOCK_SIZE as u64;
    const ACTIVE_MAX: usize = 4;
    /// Extents used: spread over several bitmap pages (a page is 31.5 extents).
    const EXTENTS: [u32; 9] = [0, 1, 31, 32, 33, 64, 100, 200, 256];

    enum Outcome {
        Done,
        Cut,
    }
    // Returns the in-memory dirty set when the run ended.
    let run = |disk: &SimFile, seed: u64, cut: Option<u64>| -> (Outcome, DirtyBitmap) {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(seed);
        let opened = create(disk.reopen());
        let mut store = opened.store;
        let mut sb = opened.superblock;
        let mut bm = bitmap(&[]);
        let mut active: Vec<u32> = Vec::new(); // least recently used first
        if let Some(cut) = cut {
            disk.halt_after_ops(cut);
        }
        for _ in 0..60 {
            let e = EXTENTS[rng.gen_range(0..EXTENTS.len())];
            let first = u64::from(e) * EXTENT_BLOCKS;
            let a = first + rng.gen_range(0..EXTENT_BLOCKS.min(BLOCKS - first));
            // Within the extent (a write across two would activate both).
            let b = (a + rng.gen_range(1..64))
                .min(BLOCKS)
                .min(first + EXTENT_BLOCKS);
            if rng.gen_bool(0.3) {
                bm.clear(BlockIndex(a), BlockIndex(b)); // acked: in sync
                continue;
            }
            if let Some(i) = active.iter().position(|&x| x == e) {
                active.remove(i);
                active.push(e);
            } else {
                if active.len() == ACTIVE_MAX {
                    let r = active.remove(0);
                    let r0 = u64::from(r) * EXTENT_BLOCKS;
                    let r1 = (r0 + EXTENT_BLOCKS).min(BLOCKS);
                    let pages: Vec<_> = bm.pages_of(BlockIndex(r0), BlockIndex(r1)).collect();
                    if store.persist_bitmap_pages(&bm, pages).is_err() {
                        return (Outcome::Cut, bm);
                    }
                }
                active.push(e);
                let mut sorted = active.clone();
                sorted.sort_unstable();
                if store.write_activity(EXTENT_BYTES, &sorted).is_err() {
                    return (Outcome::Cut, bm);
                }
            }
            bm.mark(BlockIndex(a), BlockIndex(b)); // the write may now start
        }
        sb.clean_shutdown = true;
        if store.persist_bitmap(&mut sb, &bm).is_err() {
            return (Outcome::Cut, bm);
        }
        (Outcome::Done, bm)
    };
    for seed in 0..3 {
        let total = {
            let disk = SimFile::new(seed);
            let start = disk.ops();
            let (outcome, _) = run(&disk, seed, None);
            assert!(matches!(outcome, Outcome::Done));
            disk.ops() - start
        };
        let mut retirements_cut = 0;
        // Creation is not part of the cut: count from after it.
        let created_ops = {
            let d = SimFile::new(seed);
            drop(create(d.reopen()));
            d.ops()
        };
        for cut in 0..total {
            let disk = SimFile::new(seed);
            let (outcome, truth) = run(&disk, seed, Some(cut + created_ops));
            if matches!(outcome, Outcome::Done) {
                continue;
            }
            retirements_cut += 1;
            for loss in 0..3 {
                let trial = disk.fork();
                trial.power_loss(&mut StdRng::seed_from_u64(loss * 1000 + cut));
                let opened = open(trial.reopen()).unwrap();
                assert!(opened.activity.intact);
                let mut covered = opened.bitmap.clone();
                for &e in &opened.activity.extents {
                    let e0 = u64::from(e) * EXTENT_BLOCKS;
                    covered.mark(BlockIndex(e0), BlockIndex((e0 + EXTENT_BLOCKS).min(BLOCKS)));
                }
                let mut union = covered.clone();
                union.union_with(&truth);
                assert!(
                    union == covered,
                    "seed {seed}, cut after {cut} of {total} ops, loss {loss}: {} dirty blocks \
                     neither in the persisted bitmap nor in a logged extent",
                    union.dirty_count().0 - covered.dirty_count().0
                );
            }
        }
        assert!(
            retirements_cut > 10,
            "seed {seed}: only {retirements_cut} cuts"
        );
    }
}
