//! MetaStore against a real file: creation, reopen, torn and zeroed superblock
//! slots, torn and damaged bitmap pages, geometry mismatches and the exclusive
//! lock. (Conversion from format version 1: tests/meta_v1_conversion.rs.)

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tandem::bitmap::{BitmapPage, DirtyBitmap};
use tandem::meta::layout::{Layout, SUPERBLOCK_SLOT_OFFSETS};
use tandem::meta::{BitmapSector, MetaError, MetaStore, Opened, Superblock};
use tandem::types::{BlockCount, BlockIndex, DiskState, Generation, Role, VolumeId};

const SIZE_BYTES: u64 = 64 * 1024 * 1024 + 512; // partial last block on purpose
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

fn open(path: &Path) -> Result<Opened, MetaError> {
    MetaStore::open_or_create(path, SIZE_BYTES, BLOCK_SIZE, fresh)
}

fn reopen(path: &Path) -> Opened {
    let opened = MetaStore::open_or_create(path, SIZE_BYTES, BLOCK_SIZE, || {
        panic!("must not create again")
    })
    .unwrap();
    assert!(!opened.created);
    opened
}

fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

/// Slot sequence number stored at byte 16 of each slot.
fn slot_seqs(path: &Path) -> [u64; 2] {
    let f = std::fs::File::open(path).unwrap();
    SUPERBLOCK_SLOT_OFFSETS.map(|off| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off + 16).unwrap();
        u64::from_le_bytes(b)
    })
}

fn newest_slot(path: &Path) -> usize {
    let s = slot_seqs(path);
    if s[1] > s[0] { 1 } else { 0 }
}

fn garbage(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn layout() -> Layout {
    Layout::new(SIZE_BYTES, BLOCK_SIZE)
}

#[test]
fn create_then_reopen_round_trips_superblock_and_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    assert_eq!(path, dir.path().join("vol.img.tandem-meta"));

    let opened = open(&path).unwrap();
    assert!(opened.created);
    assert_eq!(opened.recovered_from, None);
    assert_eq!(opened.superblock, fresh());
    assert_eq!(opened.bitmap.block_count(), BlockCount(16_385));
    assert_eq!(opened.bitmap.dirty_count(), BlockCount(0));
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        layout().file_len_bytes()
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary creation file left behind: {leftovers:?}"
    );

    let mut store = opened.store;
    let mut sb = fresh();
    sb.role = Role::Secondary;
    sb.disk_state = DiskState::Inconsistent;
    sb.is_new = false;
    sb.gen_history = [Generation(7), Generation(8)];
    sb.resync_cursor = Some(BlockIndex(99));
    sb.bitmap_valid = false;
    store.write_superblock(&sb).unwrap();
    let mut bm = DirtyBitmap::new(BlockCount(16_385));
    bm.mark(BlockIndex(3), BlockIndex(70));
    bm.mark(BlockIndex(16_384), BlockIndex(16_385));
    store.persist_bitmap(&mut sb, &bm).unwrap();
    assert!(sb.bitmap_valid, "persist_bitmap sets bitmap_valid");
    sb.clean_shutdown = true;
    store.write_superblock(&sb).unwrap();
    drop(store);

    let again = reopen(&path);
    assert_eq!(again.recovered_from, None);
    assert_eq!(again.superblock, sb);
    assert_eq!(again.bitmap, bm);
}

#[test]
fn torn_newest_slot_falls_back_to_the_older_one() {
    // "sector": the first 512-byte sector of the slot replaced by a sector of
    // another valid slot, the way a write torn at a sector boundary looks.
    for name in ["garbage", "zeroes", "half", "sector"] {
        let dir = tempfile::tempdir().unwrap();
        let path = meta_path(&dir);
        let mut store = open(&path).unwrap().store;
        let mut older = fresh();
        older.gen_current = Generation(1);
        store.write_superblock(&older).unwrap();
        let mut newer = fresh();
        newer.gen_current = Generation(2);
        store.write_superblock(&newer).unwrap();
        drop(store);
        assert_eq!(
            reopen(&path).superblock,
            newer,
            "{name}: healthy file reads the newest slot"
        );

        let torn = newest_slot(&path);
        let damage = match name {
            "garbage" => garbage(4096, 3),
            "zeroes" => vec![0u8; 4096],
            "half" => garbage(2048, 9),
            _ => {
                let mut sector = vec![0u8; 512];
                let f = std::fs::File::open(&path).unwrap();
                f.read_exact_at(&mut sector, SUPERBLOCK_SLOT_OFFSETS[1 - torn])
                    .unwrap();
                sector
            }
        };
        overwrite(&path, SUPERBLOCK_SLOT_OFFSETS[torn], &damage);
        let opened = reopen(&path);
        assert_eq!(opened.superblock, older, "{name}");
        let note = opened.recovered_from.expect("fallback must be reported");
        let torn_name = ["A", "B"][torn];
        assert!(
            note.contains(&format!("slot {torn_name} unusable")),
            "{name}: {note}"
        );
        if name == "sector" {
            assert!(note.contains("checksum mismatch"), "{note}");
        }

        // The next write goes to the damaged slot and the file is healthy again.
        let mut store = opened.store;
        let mut newest = fresh();
        newest.gen_current = Generation(3);
        store.write_superblock(&newest).unwrap();
        assert_eq!(newest_slot(&path), torn);
        drop(store);
        let healed = reopen(&path);
        assert_eq!(healed.recovered_from, None, "{name}");
        assert_eq!(healed.superblock, newest);
    }
}

#[test]
fn both_slots_bad_is_refused_with_both_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    drop(open(&path).unwrap());
    overwrite(&path, SUPERBLOCK_SLOT_OFFSETS[0], &[0u8; 4096]);
    overwrite(&path, SUPERBLOCK_SLOT_OFFSETS[1], &garbage(4096, 1));
    let err = open(&path).unwrap_err();
    assert!(matches!(err, MetaError::BothSlotsBad { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("slot A: all zeroes"), "{msg}");
    assert!(msg.contains("slot B: bad magic"), "{msg}");
    assert!(msg.contains("both superblock slots are bad"), "{msg}");
}

#[test]
fn truncated_file_is_both_slots_bad_not_a_new_volume() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    drop(open(&path).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100)
        .unwrap();
    let err = open(&path).unwrap_err();
    assert!(matches!(err, MetaError::BothSlotsBad { .. }), "{err:?}");
}

#[test]
fn size_and_block_size_mismatch_name_both_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    drop(open(&path).unwrap());

    let err = MetaStore::open_or_create(&path, 2 * SIZE_BYTES, BLOCK_SIZE, fresh).unwrap_err();
    assert!(matches!(err, MetaError::SizeMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&SIZE_BYTES.to_string()) && msg.contains(&(2 * SIZE_BYTES).to_string()),
        "{msg}"
    );

    let err = MetaStore::open_or_create(&path, SIZE_BYTES, 8192, fresh).unwrap_err();
    assert!(
        matches!(err, MetaError::BlockSizeMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("4096") && msg.contains("8192"), "{msg}");
}

#[test]
fn invalid_geometry_is_refused_before_touching_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    for (size, bs) in [
        (0, 4096),
        (SIZE_BYTES, 4095),
        (SIZE_BYTES, 256),
        (SIZE_BYTES, 1 << 21),
    ] {
        let err = MetaStore::open_or_create(&path, size, bs, || unreachable!()).unwrap_err();
        assert!(
            matches!(err, MetaError::InvalidGeometry { .. }),
            "{size} {bs}: {err:?}"
        );
    }
    assert!(!path.exists());
}

/// The bitmap area's file offset and a page's bytes as the store writes them.
fn area_offset(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, SUPERBLOCK_SLOT_OFFSETS[newest_slot(path)] + 96)
        .unwrap();
    u64::from_le_bytes(b)
}

fn encoded_page(bm: &DirtyBitmap, page: u64) -> Vec<u8> {
    let mut out = vec![0u8; 4096];
    BitmapSector::encode_page(page, bm.page_words(BitmapPage(page)), &mut out);
    out
}

#[test]
fn a_torn_page_write_leaves_each_sector_old_or_new_and_is_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = open(&path).unwrap().store;
    let mut sb = fresh();
    let mut old = DirtyBitmap::new(layout().block_count);
    old.mark(BlockIndex(0), BlockIndex(4032 * 3)); // sectors 0..3 all set
    store.persist_bitmap(&mut sb, &old).unwrap();
    drop(store);

    // A persist of `new` (sectors 0..3 cleared, sector 3 set) torn after
    // sectors 0 and 3 reached the disk: the others kept their old contents.
    let mut new = old.clone();
    new.clear(BlockIndex(0), BlockIndex(4032 * 3));
    new.mark(BlockIndex(4032 * 3), BlockIndex(4032 * 4));
    let page = encoded_page(&new, 0);
    let area = area_offset(&path);
    for s in [0u64, 3] {
        overwrite(
            &path,
            area + s * 512,
            &page[(s * 512) as usize..(s * 512 + 512) as usize],
        );
    }
    let opened = reopen(&path);
    assert_eq!(opened.recovered_from, None, "a tear is not damage");
    let mut expect = DirtyBitmap::new(layout().block_count);
    expect.mark(BlockIndex(4032), BlockIndex(4032 * 3)); // sectors 1, 2: old (set)
    expect.mark(BlockIndex(4032 * 3), BlockIndex(4032 * 4)); // sector 3: new (set)
    assert_eq!(opened.bitmap, expect);
}

#[test]
fn a_torn_superblock_after_a_persist_keeps_the_new_pages_with_the_older_superblock() {
    // Version 2 writes the bitmap in place: the pages are durable before the
    // superblock, so losing that superblock keeps them (documented crash rule).
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = open(&path).unwrap().store;
    let mut sb = fresh();
    sb.gen_current = Generation(5);
    store.write_superblock(&sb).unwrap();
    let mut bm = DirtyBitmap::new(layout().block_count);
    bm.mark(BlockIndex(10), BlockIndex(20));
    let mut newer = sb.clone();
    newer.gen_current = Generation(6);
    store.persist_bitmap(&mut newer, &bm).unwrap();
    drop(store);
    overwrite(
        &path,
        SUPERBLOCK_SLOT_OFFSETS[newest_slot(&path)],
        &garbage(4096, 2),
    );
    let opened = reopen(&path);
    assert!(opened.recovered_from.unwrap().contains("superblock slot"));
    assert_eq!(opened.superblock, sb);
    assert_eq!(opened.bitmap, bm);
}

#[test]
fn a_damaged_bitmap_sector_marks_its_blocks_dirty_and_the_next_persist_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = open(&path).unwrap().store;
    let mut sb = fresh();
    let mut bm = DirtyBitmap::new(layout().block_count);
    bm.mark(BlockIndex(1), BlockIndex(2));
    store.persist_bitmap(&mut sb, &bm).unwrap();
    drop(store);

    // Flip one byte of sector 3's data: only its checksum catches it.
    overwrite(&path, area_offset(&path) + 3 * 512 + 100, &[0xFF]);
    let opened = reopen(&path);
    let note = opened
        .recovered_from
        .clone()
        .expect("damaged bitmap must be reported");
    assert!(note.contains("1 bitmap page sector(s) damaged"), "{note}");
    assert!(note.contains("sector 3, checksum mismatch"), "{note}");
    let mut expect = bm.clone();
    expect.mark(BlockIndex(3 * 4032), BlockIndex(4 * 4032));
    assert_eq!(opened.bitmap, expect);

    // The damaged page is rewritten by the next persist even though the
    // caller's bitmap did not change it.
    let mut store = opened.store;
    let written = store
        .persist_bitmap_pages(&opened.bitmap, [BitmapPage(0)])
        .unwrap();
    assert_eq!(written.pages_written, 1);
    drop(store);
    let healed = reopen(&path);
    assert_eq!(healed.recovered_from, None);
    assert_eq!(healed.bitmap, expect);
}

#[test]
fn a_wiped_bitmap_area_means_every_block_is_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    drop(open(&path).unwrap());
    overwrite(&path, area_offset(&path), &vec![0u8; 4096]);
    let opened = reopen(&path);
    let note = opened.recovered_from.unwrap();
    assert!(note.contains("all zeroes"), "{note}");
    assert_eq!(opened.bitmap.dirty_count(), layout().block_count);
}

#[test]
fn a_truncated_bitmap_area_means_its_missing_blocks_are_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    drop(open(&path).unwrap());
    let end = area_offset(&path) + 2048;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(end)
        .unwrap();
    let opened = reopen(&path);
    assert!(
        opened
            .recovered_from
            .unwrap()
            .contains("past the end of the file")
    );
    // 16385 blocks: sectors 0..4 kept (clean), sector 4 (blocks 16128..) lost.
    assert_eq!(opened.bitmap.dirty_count(), BlockCount(16_385 - 4 * 4032));
}

#[test]
fn unsupported_version_is_refused_not_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    drop(open(&path).unwrap());
    let slot = newest_slot(&path);
    let f = std::fs::File::open(&path).unwrap();
    let mut bytes = vec![0u8; 4096];
    f.read_exact_at(&mut bytes, SUPERBLOCK_SLOT_OFFSETS[slot])
        .unwrap();
    bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..4092]);
    bytes[4092..].copy_from_slice(&crc.to_le_bytes());
    overwrite(&path, SUPERBLOCK_SLOT_OFFSETS[slot], &bytes);
    let err = open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            MetaError::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn second_opener_is_refused_while_the_first_holds_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let first = open(&path).unwrap();
    let err = open(&path).unwrap_err();
    assert!(matches!(err, MetaError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("locked by another process"));
    drop(first);
    assert!(!open(&path).unwrap().created);
}
