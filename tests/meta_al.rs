//! The activity log of MetaStore against a real file: round trip, the ring
//! wrapping across reopen, torn and zeroed newest slots, garbage, the largest
//! record, newer format versions. (Poisoning on a failed write: the unit test
//! in src/meta/store.rs.)

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tandem::meta::al::al_slot_of;
use tandem::meta::layout::{AL_OFFSET_BYTES, AL_SLOT_COUNT, AL_SLOT_LEN_BYTES};
use tandem::meta::{
    AL_EXTENTS_MAX, ActivityRecord, ActivitySnapshot, MetaError, MetaStore, Opened, Superblock,
};
use tandem::types::{DiskState, Generation, Role, VolumeId};

const EXTENT_BYTES: u64 = 4 << 20;
/// Room for more than AL_EXTENTS_MAX extents of 4 MiB (1100 × 4 MiB), plus a
/// partial last extent.
const SIZE_BYTES: u64 = 1100 * EXTENT_BYTES + 4096;
const BLOCK_SIZE: u32 = 4096;

fn fresh() -> Superblock {
    Superblock {
        volume_id: VolumeId([0x5A; 16]),
        size_bytes: SIZE_BYTES,
        block_size: BLOCK_SIZE,
        role: Role::Primary,
        disk_state: DiskState::UpToDate,
        is_new: true,
        gen_current: Generation(0x1111),
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

fn meta_path(dir: &tempfile::TempDir) -> PathBuf {
    MetaStore::default_path_for(&dir.path().join("vol.img"))
}

fn create(path: &Path) -> Opened {
    let opened = MetaStore::open_or_create(path, SIZE_BYTES, BLOCK_SIZE, fresh).unwrap();
    assert!(opened.created);
    opened
}

fn try_reopen(path: &Path) -> Result<Opened, MetaError> {
    MetaStore::open_or_create(path, SIZE_BYTES, BLOCK_SIZE, || {
        panic!("must not create again")
    })
}

fn reopen(path: &Path) -> Opened {
    try_reopen(path).unwrap()
}

fn slot_offset(slot: usize) -> u64 {
    AL_OFFSET_BYTES + slot as u64 * AL_SLOT_LEN_BYTES
}

fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

/// The extent list written by transaction `txn` in the multi-transaction tests:
/// distinct for every txn, so the record that won can be identified.
fn extents_for(txn: u64) -> Vec<u32> {
    let base = (txn % 1000) as u32;
    vec![base, base + 1, 1099]
}

#[test]
fn new_file_has_an_empty_intact_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let opened = create(&path);
    assert_eq!(opened.activity, ActivitySnapshot::empty());
    assert_eq!(
        opened.store.read_activity().unwrap(),
        ActivitySnapshot::empty()
    );
    drop(opened);
    let opened = reopen(&path);
    assert_eq!(opened.activity, ActivitySnapshot::empty());
    assert_eq!(opened.recovered_from, None);
}

#[test]
fn activity_round_trips_through_write_read_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    store.write_activity(EXTENT_BYTES, &[0, 7, 1100]).unwrap();
    let expect = ActivitySnapshot {
        txn: 1,
        extent_bytes: EXTENT_BYTES,
        extents: vec![0, 7, 1100],
        bad_slots: 0,
        intact: true,
    };
    assert_eq!(store.read_activity().unwrap(), expect);
    store.write_activity(EXTENT_BYTES, &[]).unwrap();
    let expect_empty = ActivitySnapshot {
        txn: 2,
        extents: vec![],
        ..expect.clone()
    };
    assert_eq!(store.read_activity().unwrap(), expect_empty);
    drop(store);
    let opened = reopen(&path);
    assert_eq!(opened.activity, expect_empty);
    assert_eq!(opened.recovered_from, None);
}

#[test]
fn two_hundred_transactions_wrap_the_ring_and_the_newest_wins_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    for txn in 1..=130 {
        store
            .write_activity(EXTENT_BYTES, &extents_for(txn))
            .unwrap();
    }
    drop(store);
    // Writing continues from the highest transaction found at open.
    let mut opened = reopen(&path);
    assert_eq!(opened.activity.txn, 130);
    assert_eq!(opened.activity.extents, extents_for(130));
    for txn in 131..=200 {
        opened
            .store
            .write_activity(EXTENT_BYTES, &extents_for(txn))
            .unwrap();
    }
    drop(opened);
    let opened = reopen(&path);
    assert_eq!(
        opened.activity,
        ActivitySnapshot {
            txn: 200,
            extent_bytes: EXTENT_BYTES,
            extents: extents_for(200),
            bad_slots: 0,
            intact: true,
        }
    );
    // Every slot holds the last of its transactions: 137..=200.
    let f = std::fs::File::open(&path).unwrap();
    for slot in 0..AL_SLOT_COUNT as usize {
        let mut txn = [0u8; 8];
        f.read_exact_at(&mut txn, slot_offset(slot) + 16).unwrap();
        let txn = u64::from_le_bytes(txn);
        assert!((137..=200).contains(&txn), "slot {slot} holds {txn}");
        assert_eq!(al_slot_of(txn), slot);
    }
}

#[test]
fn a_torn_newest_slot_falls_back_to_the_previous_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    for txn in 1..=70 {
        store
            .write_activity(EXTENT_BYTES, &extents_for(txn))
            .unwrap();
    }
    drop(store);
    // Torn: the first 512-byte sector of record 70 is new, the rest is whatever
    // was there (record 6); simulated by damaging the tail.
    let newest = slot_offset(al_slot_of(70));
    overwrite(&path, newest + 2048, &[0xEE; 2048]);
    let mut opened = reopen(&path);
    assert_eq!(opened.activity.txn, 69);
    assert_eq!(opened.activity.extents, extents_for(69));
    assert_eq!(opened.activity.bad_slots, 1);
    assert!(opened.activity.intact);
    let note = opened.recovered_from.clone().unwrap();
    assert!(note.contains("torn write"), "{note}");
    // The next write reuses transaction 70 and its slot, repairing the ring.
    opened
        .store
        .write_activity(EXTENT_BYTES, &extents_for(700))
        .unwrap();
    drop(opened);
    let opened = reopen(&path);
    assert_eq!(opened.activity.txn, 70);
    assert_eq!(opened.activity.extents, extents_for(700));
    assert_eq!(opened.activity.bad_slots, 0);
    assert_eq!(opened.recovered_from, None);
}

#[test]
fn a_zeroed_newest_slot_falls_back_to_the_previous_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    for txn in 1..=5 {
        store
            .write_activity(EXTENT_BYTES, &extents_for(txn))
            .unwrap();
    }
    drop(store);
    overwrite(&path, slot_offset(5), &[0; AL_SLOT_LEN_BYTES as usize]);
    let opened = reopen(&path);
    assert_eq!(opened.activity.txn, 4);
    assert_eq!(opened.activity.extents, extents_for(4));
    assert_eq!(opened.activity.bad_slots, 0);
    assert!(opened.activity.intact);
}

#[test]
fn damage_beyond_one_torn_write_is_reported_as_not_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    for txn in 1..=100 {
        store
            .write_activity(EXTENT_BYTES, &extents_for(txn))
            .unwrap();
    }
    drop(store);
    overwrite(&path, slot_offset(al_slot_of(100)) + 100, &[0xEE; 8]);
    overwrite(&path, slot_offset(al_slot_of(90)) + 100, &[0xEE; 8]);
    let opened = reopen(&path);
    assert_eq!(opened.activity.txn, 99);
    assert_eq!(opened.activity.bad_slots, 2);
    assert!(!opened.activity.intact);
    let note = opened.recovered_from.unwrap();
    assert!(note.contains("whole volume"), "{note}");
}

#[test]
fn garbage_in_every_slot_gives_an_empty_snapshot_that_is_not_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    drop(create(&path));
    let mut x: u32 = 0x1234_5678;
    let garbage: Vec<u8> = (0..AL_SLOT_COUNT * AL_SLOT_LEN_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    overwrite(&path, AL_OFFSET_BYTES, &garbage);
    let opened = reopen(&path);
    assert_eq!(
        opened.activity,
        ActivitySnapshot {
            txn: 0,
            extent_bytes: 0,
            extents: vec![],
            bad_slots: 64,
            intact: false,
        }
    );
    assert!(opened.recovered_from.unwrap().contains("whole volume"));
}

#[test]
fn the_largest_record_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    let extents: Vec<u32> = (0..AL_EXTENTS_MAX as u32).map(|i| i + 50).collect();
    store.write_activity(EXTENT_BYTES, &extents).unwrap();
    drop(store);
    let opened = reopen(&path);
    assert_eq!(opened.activity.extents, extents);
    assert_eq!(opened.activity.txn, 1);
}

#[test]
#[should_panic(expected = "do not fit the activity log")]
fn more_than_the_largest_record_is_a_caller_bug() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    let extents: Vec<u32> = (0..=AL_EXTENTS_MAX as u32).collect();
    let _ = store.write_activity(EXTENT_BYTES, &extents);
}

#[test]
#[should_panic(expected = "beyond the volume")]
fn an_extent_beyond_the_volume_is_a_caller_bug() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    let _ = store.write_activity(EXTENT_BYTES, &[1101]);
}

#[test]
fn a_record_of_a_newer_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    store.write_activity(EXTENT_BYTES, &[1, 2]).unwrap();
    drop(store);
    // A validly checksummed record claiming version 2, in an older slot.
    let mut b = ActivityRecord {
        txn: 64 + 30,
        extent_bytes: EXTENT_BYTES,
        extents: vec![3],
    }
    .encode();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&b[..4092]);
    b[4092..].copy_from_slice(&crc.to_le_bytes());
    overwrite(&path, slot_offset(30), &b);
    match try_reopen(&path) {
        Err(MetaError::AlUnsupportedVersion {
            slot: 30,
            found: 2,
            supported: 1,
            ..
        }) => {}
        other => panic!("expected AlUnsupportedVersion, got {other:?}"),
    }
}

#[test]
fn a_record_written_with_another_extent_size_reads_back_with_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = create(&path).store;
    store.write_activity(1 << 20, &[4399]).unwrap();
    drop(store);
    let opened = reopen(&path);
    assert_eq!(opened.activity.extent_bytes, 1 << 20);
    assert_eq!(opened.activity.extents, vec![4399]);
}
