//! Opening a metadata file of format version 1 converts it to version 2
//! (MetaStore module documentation): on a real file, and on a SimFile with a
//! power loss at every instant of the conversion. The version-1 file is
//! tests/fixtures/meta_v1_64MiB.hex, written by the version-1 code itself
//! (tandem 134a6c6), not by a re-implementation of the old format.

use std::os::unix::fs::FileExt;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tandem::bitmap::DirtyBitmap;
use tandem::meta::layout::{Layout, SUPERBLOCK_SLOT_OFFSETS};
use tandem::meta::{DurableFile, MetaStore, Opened, SimFile, Superblock};
use tandem::types::{BlockCount, BlockIndex, DiskState, Generation, Role, VolumeId};

const SIZE_BYTES: u64 = 64 * 1024 * 1024 + 512;
const BLOCK_SIZE: u32 = 4096;
const BLOCKS: u64 = 16_385;

/// The fixture's file: its length and its non-zero 512-byte sectors.
fn fixture() -> (u64, Vec<(u64, Vec<u8>)>) {
    let text = include_str!("fixtures/meta_v1_64MiB.hex");
    let mut len = None;
    let mut sectors = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (key, value) = line.split_once(' ').expect("two fields");
        if key == "len" {
            len = Some(value.parse().unwrap());
            continue;
        }
        let bytes = (0..value.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&value[i..i + 2], 16).unwrap())
            .collect();
        sectors.push((key.parse().unwrap(), bytes));
    }
    (len.expect("a len line"), sectors)
}

fn write_fixture(file: &impl DurableFile) {
    let (len, sectors) = fixture();
    file.set_len(len).unwrap();
    for (offset, bytes) in sectors {
        file.write_all_at(&bytes, offset).unwrap();
    }
    file.sync_data().unwrap();
}

/// What the version-1 code wrote (see the fixture's header).
fn expected_superblock() -> Superblock {
    Superblock {
        volume_id: VolumeId(*b"v1-fixture-volum"),
        size_bytes: SIZE_BYTES,
        block_size: BLOCK_SIZE,
        role: Role::Primary,
        disk_state: DiskState::UpToDate,
        is_new: false,
        gen_current: Generation(0x1234_5678_9abc_def0),
        gen_bitmap_base: Generation(0x0fed_cba9_8765_4321),
        gen_history: [Generation(11), Generation(12)],
        promoted_at_s: 1_764_000_000,
        clean_shutdown: false,
        resync_cursor: Some(BlockIndex(777)),
        bitmap_valid: true,
        volume_mixed: false,
        poisoned: false,
        consistent_seq: 0,
        consistent_at_ms: 0,
        mixed_through: 0,
    }
}

fn expected_bitmap() -> DirtyBitmap {
    let mut bm = DirtyBitmap::new(BlockCount(BLOCKS));
    bm.mark(BlockIndex(4000), BlockIndex(4100));
    bm.mark(BlockIndex(16_384), BlockIndex(16_385));
    bm
}

fn check_state<F: DurableFile>(opened: &Opened<F>, what: &str) {
    assert_eq!(opened.superblock, expected_superblock(), "{what}");
    assert_eq!(opened.bitmap, expected_bitmap(), "{what}");
    assert_eq!(opened.activity.txn, 3, "{what}");
    assert_eq!(opened.activity.extents, vec![1, 5, 15], "{what}");
    assert!(opened.activity.intact, "{what}");
}

fn slot_versions(file: &impl DurableFile) -> [u32; 2] {
    SUPERBLOCK_SLOT_OFFSETS.map(|off| {
        let b = file.read_at_most(off + 8, 4).unwrap();
        u32::from_le_bytes(b.try_into().unwrap())
    })
}

#[test]
fn a_version_1_file_is_converted_on_open_and_keeps_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.tandem-meta");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    write_fixture(&f);
    drop(f);
    let opened =
        MetaStore::open_or_create(&path, SIZE_BYTES, BLOCK_SIZE, || unreachable!()).unwrap();
    assert_eq!(opened.converted_from, Some(1));
    assert_eq!(opened.recovered_from, None);
    check_state(&opened, "converted");
    drop(opened);

    let f = std::fs::File::open(&path).unwrap();
    assert_eq!(slot_versions(&f), [2, 2], "both slots rewritten");
    let layout = Layout::new(SIZE_BYTES, BLOCK_SIZE);
    // The bitmap area went after the version-1 copies, which were punched out.
    assert_eq!(
        f.metadata().unwrap().len(),
        layout.v1_file_len_bytes() + layout.bitmap_area_len_bytes()
    );
    let mut old_copies = vec![0u8; (layout.v1_file_len_bytes() - 270_336) as usize];
    f.read_exact_at(&mut old_copies, 270_336).unwrap();
    assert!(
        old_copies.iter().all(|&b| b == 0),
        "version-1 copies punched"
    );
    drop(f);

    let again =
        MetaStore::open_or_create(&path, SIZE_BYTES, BLOCK_SIZE, || unreachable!()).unwrap();
    assert_eq!(again.converted_from, None);
    assert_eq!(again.recovered_from, None);
    check_state(&again, "reopened");

    // And it works as a version-2 file: persist pages, reopen.
    let mut store = again.store;
    let mut bm = expected_bitmap();
    bm.clear(BlockIndex(4000), BlockIndex(4100));
    let written = store
        .persist_bitmap_pages(&bm, bm.pages_of(BlockIndex(4000), BlockIndex(4100)))
        .unwrap();
    assert_eq!(written.pages_written, 1);
    drop(store);
    let last = MetaStore::open_or_create(&path, SIZE_BYTES, BLOCK_SIZE, || unreachable!()).unwrap();
    assert_eq!(last.bitmap, bm);
}

#[test]
fn a_power_loss_at_any_instant_of_the_conversion_opens_as_version_1_or_2_with_the_same_state() {
    let total = {
        let disk = SimFile::new(1);
        write_fixture(&disk);
        let start = disk.ops();
        let opened = MetaStore::open_on(disk.reopen(), "sim-v1", SIZE_BYTES, BLOCK_SIZE).unwrap();
        assert_eq!(opened.converted_from, Some(1));
        disk.ops() - start
    };
    assert!(total >= 5, "{total} ops");
    let (mut as_v1, mut as_v2) = (0, 0);
    for cut in 0..total {
        for seed in 0..8 {
            let what = format!("cut after {cut} of {total} ops, seed {seed}");
            let disk = SimFile::new(1);
            write_fixture(&disk);
            disk.halt_after_ops(cut);
            let cut_open = MetaStore::open_on(disk.reopen(), "sim-v1", SIZE_BYTES, BLOCK_SIZE);
            // The last call is the best-effort punch of the old copies: its
            // failure does not fail the open.
            assert!(
                cut_open.is_err() || cut + 1 == total,
                "{what}: the conversion was cut"
            );
            drop(cut_open);
            disk.power_loss(&mut StdRng::seed_from_u64(seed * 1000 + cut));
            let versions = slot_versions(&disk.reopen());
            let opened = MetaStore::open_on(disk.reopen(), "sim-v1", SIZE_BYTES, BLOCK_SIZE)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            match opened.converted_from {
                Some(1) => as_v1 += 1,
                None => as_v2 += 1,
                other => panic!("{what}: converted from {other:?}"),
            }
            assert!(
                versions.contains(&1) || opened.converted_from.is_none(),
                "{what}: {versions:?}"
            );
            if let Some(note) = &opened.recovered_from {
                assert!(!note.contains("bitmap"), "{what}: {note}");
            }
            check_state(&opened, &what);
            drop(opened);
            let again = MetaStore::open_on(disk.reopen(), "sim-v1", SIZE_BYTES, BLOCK_SIZE)
                .unwrap_or_else(|e| panic!("{what}, second open: {e}"));
            assert_eq!(again.converted_from, None, "{what}");
            check_state(&again, &what);
        }
    }
    assert!(as_v1 > 0 && as_v2 > 0, "v1 {as_v1}, v2 {as_v2}");
}

#[test]
fn a_stale_version_1_copy_with_a_valid_checksum_is_not_used() {
    // Double fault, as before version 2: a persist wrote the copy the older
    // slot selects (valid checksum, newer sequence number) and crashed before
    // its superblock write, and then the newest slot was lost too. The older
    // slot's bitmap sequence number exposes the mismatch: every block is dirty.
    let disk = SimFile::new(1);
    write_fixture(&disk);
    // Slot A (seq 5) is newest and selects copy 1; slot B selects copy 0 (seq 3).
    let layout = Layout::new(SIZE_BYTES, BLOCK_SIZE);
    let header_offset = layout.bitmap_copy_offset_bytes(0);
    let mut header = disk.read_at_most(header_offset, 48).unwrap();
    assert_eq!(u64::from_le_bytes(header[16..24].try_into().unwrap()), 3);
    header[16..24].copy_from_slice(&5u64.to_le_bytes());
    let crc = crc32fast::hash(&header[..44]);
    header[44..48].copy_from_slice(&crc.to_le_bytes());
    disk.write_all_at(&header, header_offset).unwrap();
    disk.write_all_at(&[0u8; 4096], SUPERBLOCK_SLOT_OFFSETS[0])
        .unwrap();
    let opened = MetaStore::open_on(disk.reopen(), "sim-v1", SIZE_BYTES, BLOCK_SIZE).unwrap();
    let note = opened.recovered_from.clone().unwrap();
    assert!(note.contains("bitmap copy 0 unusable"), "{note}");
    assert!(note.contains("sequence number"), "{note}");
    assert_eq!(opened.bitmap.dirty_count(), BlockCount(BLOCKS));
    assert_eq!(opened.converted_from, Some(1));
    drop(opened);
    // The all-dirty bitmap is what was converted.
    let again = MetaStore::open_on(disk.reopen(), "sim-v1", SIZE_BYTES, BLOCK_SIZE).unwrap();
    assert_eq!(again.bitmap.dirty_count(), BlockCount(BLOCKS));
    assert_eq!(again.recovered_from, None);
}

#[test]
fn a_damaged_version_1_copy_converts_to_every_block_dirty() {
    let disk = SimFile::new(1);
    write_fixture(&disk);
    let layout = Layout::new(SIZE_BYTES, BLOCK_SIZE);
    // One byte of copy 1's data (the selected copy): only the data crc catches it.
    disk.write_all_at(&[0xFF], layout.bitmap_copy_offset_bytes(1) + 4096 + 100)
        .unwrap();
    let opened = MetaStore::open_on(disk.reopen(), "sim-v1", SIZE_BYTES, BLOCK_SIZE).unwrap();
    let note = opened.recovered_from.clone().unwrap();
    assert!(note.contains("bitmap copy 1 unusable"), "{note}");
    assert!(note.contains("data checksum mismatch"), "{note}");
    assert_eq!(opened.bitmap.dirty_count(), BlockCount(BLOCKS));
}
