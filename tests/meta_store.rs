//! MetaStore against a real file: creation, reopen, torn and zeroed superblock
//! slots, torn bitmap copies, geometry mismatches and the exclusive lock.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tandem::bitmap::DirtyBitmap;
use tandem::meta::layout::{BITMAP_HEADER_LEN_BYTES, Layout, SUPERBLOCK_SLOT_OFFSETS};
use tandem::meta::{MetaError, MetaStore, Opened, Superblock};
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

/// Bitmap copy selected by a slot (byte 54).
fn selected_copy(path: &Path, slot: usize) -> u8 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, SUPERBLOCK_SLOT_OFFSETS[slot] + 54)
        .unwrap();
    b[0]
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

#[test]
fn torn_bitmap_write_keeps_the_last_persisted_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = open(&path).unwrap().store;
    let mut sb = fresh();
    let mut bm1 = DirtyBitmap::new(layout().block_count);
    bm1.mark(BlockIndex(0), BlockIndex(1000));
    store.persist_bitmap(&mut sb, &bm1).unwrap();
    let mut bm2 = bm1.clone();
    bm2.mark(BlockIndex(5000), BlockIndex(9000));
    store.persist_bitmap(&mut sb, &bm2).unwrap();
    drop(store);

    // A crash in the middle of a third persist: the copy not selected by the
    // newest superblock is half written, the superblock was not yet written.
    let current = selected_copy(&path, newest_slot(&path));
    let other_offset = layout().bitmap_copy_offset_bytes(1 - current);
    overwrite(&path, other_offset, &garbage(6000, 5));
    let opened = reopen(&path);
    assert_eq!(opened.recovered_from, None);
    assert_eq!(opened.bitmap, bm2);
}

#[test]
fn torn_superblock_after_bitmap_write_keeps_the_previous_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = open(&path).unwrap().store;
    let mut sb = fresh();
    let mut bm1 = DirtyBitmap::new(layout().block_count);
    bm1.mark(BlockIndex(10), BlockIndex(20));
    store.persist_bitmap(&mut sb, &bm1).unwrap();
    let mut bm2 = bm1.clone();
    bm2.mark_all();
    store.persist_bitmap(&mut sb, &bm2).unwrap();
    drop(store);

    // The superblock that selected bm2 was torn: the older slot selects bm1's
    // copy, which the bm2 persist must not have overwritten.
    overwrite(
        &path,
        SUPERBLOCK_SLOT_OFFSETS[newest_slot(&path)],
        &garbage(4096, 2),
    );
    let opened = reopen(&path);
    assert!(opened.recovered_from.unwrap().contains("superblock slot"));
    assert_eq!(opened.bitmap, bm1);
}

#[test]
fn corrupt_current_bitmap_copy_means_every_block_is_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = open(&path).unwrap().store;
    let mut sb = fresh();
    let mut bm = DirtyBitmap::new(layout().block_count);
    bm.mark(BlockIndex(1), BlockIndex(2));
    store.persist_bitmap(&mut sb, &bm).unwrap();
    drop(store);

    let current = selected_copy(&path, newest_slot(&path));
    // Flip one byte of the data (not the header): only the data crc catches it.
    let data_offset = layout().bitmap_copy_offset_bytes(current) + BITMAP_HEADER_LEN_BYTES + 100;
    overwrite(&path, data_offset, &[0xFF]);
    let opened = reopen(&path);
    let note = opened
        .recovered_from
        .expect("damaged bitmap must be reported");
    assert!(
        note.contains(&format!("bitmap copy {current} unusable")),
        "{note}"
    );
    assert!(note.contains("data checksum mismatch"), "{note}");
    assert_eq!(opened.bitmap.dirty_count(), layout().block_count);
}

#[test]
fn stale_bitmap_copy_with_valid_checksum_is_not_used() {
    // Double fault: a persist wrote the copy the older slot selects (valid
    // checksum, newer sequence number) and crashed before its superblock
    // write, and then the newest slot was lost too. The older slot's bitmap
    // sequence number exposes the mismatch instead of trusting the copy.
    let dir = tempfile::tempdir().unwrap();
    let path = meta_path(&dir);
    let mut store = open(&path).unwrap().store;
    let mut sb = fresh();
    let mut bm = DirtyBitmap::new(layout().block_count);
    for i in 0..3 {
        bm.mark(BlockIndex(i * 100), BlockIndex(i * 100 + 1));
        store.persist_bitmap(&mut sb, &bm).unwrap();
    }
    drop(store);
    let newest = newest_slot(&path);
    let older_copy = selected_copy(&path, 1 - newest);
    assert_eq!(
        older_copy,
        selected_copy(&path, newest) ^ 1,
        "persists alternate copies"
    );

    let header_offset = layout().bitmap_copy_offset_bytes(older_copy);
    let f = std::fs::File::open(&path).unwrap();
    let mut header = vec![0u8; 48];
    f.read_exact_at(&mut header, header_offset).unwrap();
    let seq = u64::from_le_bytes(header[16..24].try_into().unwrap());
    header[16..24].copy_from_slice(&(seq + 2).to_le_bytes());
    let crc = crc32fast::hash(&header[..44]);
    header[44..48].copy_from_slice(&crc.to_le_bytes());
    overwrite(&path, header_offset, &header);
    overwrite(&path, SUPERBLOCK_SLOT_OFFSETS[newest], &[0u8; 4096]);

    let opened = reopen(&path);
    let note = opened.recovered_from.unwrap();
    assert!(note.contains("sequence number"), "{note}");
    assert_eq!(opened.bitmap.dirty_count(), layout().block_count);
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
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..4092]);
    bytes[4092..].copy_from_slice(&crc.to_le_bytes());
    overwrite(&path, SUPERBLOCK_SLOT_OFFSETS[slot], &bytes);
    let err = open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            MetaError::UnsupportedVersion {
                found: 2,
                supported: 1,
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
