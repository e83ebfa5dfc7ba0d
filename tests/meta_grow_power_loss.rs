//! ha (issue 12): an online grow of the metadata (`MetaStore::grow`) under the
//! durability model of ARCHITECTURE §4a, on a SimFile: a grow and the bitmap
//! persist after it are cut by a power loss (or kill -9) at every instant.
//! After every cut the file opens at exactly one of the two sizes — the old one
//! (with the old superblock, bitmap and activity log intact) until the grow's
//! superblock is durable, the new one after (with the grown bitmap) — never at
//! neither, never with a bitmap page lost. This is the recovery an agent relies
//! on: it opens the metadata at the size its superblock records and serves a
//! longer volume at that size (agent/mod.rs `open_node`).

mod meta_support;

use meta_support::sectors_old_or_new;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tandem::bitmap::DirtyBitmap;
use tandem::meta::{MetaError, MetaStore, Opened, SimFile, Superblock};
use tandem::types::{BlockIndex, DiskState, Generation, Role, VolumeId};

/// 200 MiB + 512 bytes (2 bitmap pages, a partial last block) grown to
/// 1 GiB (9 pages).
const OLD_BYTES: u64 = (200 << 20) + 512;
const NEW_BYTES: u64 = 1 << 30;
const BLOCK_SIZE: u32 = 4096;
const EXTENT_BYTES: u64 = 4 << 20;
const SEEDS_PER_CUT: u64 = 4;

fn fresh() -> Superblock {
    Superblock {
        volume_id: VolumeId([0x42; 16]),
        size_bytes: OLD_BYTES,
        block_size: BLOCK_SIZE,
        role: Role::Primary,
        disk_state: DiskState::UpToDate,
        is_new: false,
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

/// The state before the grow, the grow's, and the persist's after it.
struct States {
    old: (Superblock, DirtyBitmap),
    grown: (Superblock, DirtyBitmap),
    persisted: (Superblock, DirtyBitmap),
}

fn states() -> States {
    let sb = fresh();
    let mut bm = DirtyBitmap::for_volume(OLD_BYTES, BLOCK_SIZE);
    let last = bm.block_count().0;
    bm.mark(BlockIndex(7), BlockIndex(9));
    bm.mark(BlockIndex(40_000), BlockIndex(40_010));
    bm.mark(BlockIndex(last - 1), BlockIndex(last));
    let mut grown_sb = sb.clone();
    grown_sb.size_bytes = NEW_BYTES;
    let mut grown = bm.clone();
    grown.grow(DirtyBitmap::for_volume(NEW_BYTES, BLOCK_SIZE).block_count());
    let mut after_sb = grown_sb.clone();
    after_sb.gen_current = Generation(2);
    let mut after = grown.clone();
    after.mark(BlockIndex(200_000), BlockIndex(200_100));
    after.clear(BlockIndex(7), BlockIndex(9));
    States {
        old: (sb, bm),
        grown: (grown_sb, grown),
        persisted: (after_sb, after),
    }
}

/// Set up the old state, then (after `cut` more mutating calls, if any) the
/// grow and a persist. Returns the file.
fn run(s: &States, cut: Option<u64>) -> SimFile {
    let disk = SimFile::new(11);
    let mut store = MetaStore::create_on(disk.reopen(), "sim-meta", OLD_BYTES, BLOCK_SIZE, fresh())
        .unwrap()
        .store;
    store
        .persist_bitmap(&mut s.old.0.clone(), &s.old.1)
        .unwrap();
    store.write_activity(EXTENT_BYTES, &[0, 49]).unwrap();
    if let Some(cut) = cut {
        disk.halt_after_ops(cut);
    }
    let r = store
        .grow(&s.grown.0, &s.grown.1)
        .and_then(|()| store.persist_bitmap(&mut s.persisted.0.clone(), &s.persisted.1));
    if r.is_err() {
        assert!(disk.is_halted(), "failed without a cut: {r:?}");
    }
    disk
}

fn open(file: SimFile, size: u64) -> Result<Opened<SimFile>, MetaError> {
    MetaStore::open_on(file, "sim-meta", size, BLOCK_SIZE)
}

/// The file after a crash opens at one size, holding a state of that size.
fn check(file: &SimFile, s: &States, what: &str) {
    let at_new = open(file.reopen(), NEW_BYTES);
    let at_old = open(file.reopen(), OLD_BYTES);
    let (opened, expected): (Opened<SimFile>, Vec<&(Superblock, DirtyBitmap)>) =
        match (at_new, at_old) {
            (Ok(o), Err(_)) => (o, vec![&s.grown, &s.persisted]),
            (Err(_), Ok(o)) => (o, vec![&s.old]),
            (Ok(_), Ok(_)) => panic!("{what}: opens at both sizes"),
            (Err(a), Err(b)) => panic!("{what}: opens at neither size: {a}; {b}"),
        };
    assert!(
        opened.activity.intact && opened.activity.extents == vec![0, 49],
        "{what}: activity log {}",
        opened.activity
    );
    if let Some(note) = &opened.recovered_from {
        assert!(!note.contains("bitmap page"), "{what}: {note}");
    }
    let found = (opened.superblock.clone(), opened.bitmap.clone());
    let sb_matches: Vec<_> = expected.iter().filter(|e| e.0 == found.0).collect();
    assert!(
        !sb_matches.is_empty(),
        "{what}: superblock {:?} is none of the expected",
        found.0
    );
    // The persist after the grow may be cut between its pages and its
    // superblock: each sector then holds the grown or the persisted bits
    // (tests/meta_power_loss.rs); the grow's and the old state's are exact.
    if found.0 == s.persisted.0 {
        assert!(found.1 == s.persisted.1, "{what}: the persist's pages");
    } else if found.0 == s.old.0 {
        assert!(found.1 == s.old.1, "{what}: the old bitmap changed");
    } else {
        assert!(
            sectors_old_or_new(&found.1, &s.grown.1, &s.persisted.1),
            "{what}: a bitmap sector is neither the grow's nor the persist's"
        );
    }
}

#[test]
fn a_grow_cut_by_power_loss_at_every_instant_opens_at_the_old_or_the_new_size() {
    let s = states();
    let total = {
        let disk = SimFile::new(11);
        let mut store =
            MetaStore::create_on(disk.reopen(), "sim-meta", OLD_BYTES, BLOCK_SIZE, fresh())
                .unwrap()
                .store;
        store
            .persist_bitmap(&mut s.old.0.clone(), &s.old.1)
            .unwrap();
        store.write_activity(EXTENT_BYTES, &[0, 49]).unwrap();
        let start = disk.ops();
        store.grow(&s.grown.0, &s.grown.1).unwrap();
        store
            .persist_bitmap(&mut s.persisted.0.clone(), &s.persisted.1)
            .unwrap();
        disk.ops() - start
    };
    assert!(total >= 4, "{total} ops");
    let mut new_size_seen = false;
    for cut in 0..=total {
        let disk = run(&s, Some(cut));
        for seed in 0..SEEDS_PER_CUT {
            let trial = disk.fork();
            trial.power_loss(&mut StdRng::seed_from_u64(seed));
            check(
                &trial,
                &s,
                &format!("cut after {cut} of {total} ops, seed {seed}"),
            );
        }
        let trial = disk.fork();
        trial.kill9();
        check(
            &trial,
            &s,
            &format!("cut after {cut} of {total} ops, kill -9"),
        );
        new_size_seen |= open(trial.reopen(), NEW_BYTES).is_ok();
    }
    assert!(new_size_seen, "no cut reached the grown state");
    let done = run(&s, None);
    let opened = open(done.reopen(), NEW_BYTES).expect("grown");
    assert_eq!(opened.superblock, s.persisted.0);
    assert_eq!(opened.bitmap, s.persisted.1);
}
