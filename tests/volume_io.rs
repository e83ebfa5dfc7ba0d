//! Data-path tests of `tandem::volume`: every engine (io_uring, threads, memory),
//! buffered and O_DIRECT, against a `Vec<u8>` model of the volume.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use tandem::volume::{EngineChoice, OpenOptions, REQUEST_BYTES_MAX, Volume};

const SIZE_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
struct Config {
    engine: EngineChoice,
    direct: bool,
}

const DISK_CONFIGS: [Config; 4] = [
    Config {
        engine: EngineChoice::Uring,
        direct: false,
    },
    Config {
        engine: EngineChoice::Uring,
        direct: true,
    },
    Config {
        engine: EngineChoice::Threads,
        direct: false,
    },
    Config {
        engine: EngineChoice::Threads,
        direct: true,
    },
];

fn open(dir: &Path, config: Config, size_bytes: u64) -> Volume {
    let opts = OpenOptions {
        create_size_bytes: Some(size_bytes),
        direct: config.direct,
        engine: config.engine,
    };
    let volume = Volume::open(&dir.join("vol.img"), &opts).unwrap();
    let expected = match config.engine {
        EngineChoice::Uring => "io_uring",
        EngineChoice::Threads => "threads",
        EngineChoice::Auto => unreachable!("tests pick the engine"),
    };
    assert_eq!(volume.engine_name(), expected);
    volume
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(7919))
                % 253) as u8
                + 1
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        offset: u64,
        len: u32,
        seed: u64,
        fua: bool,
    },
    Read {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// Apply `op` to the volume and the model; reads are compared on the spot.
async fn apply(volume: &Volume, model: &mut [u8], op: &Op) {
    match *op {
        Op::Write {
            offset,
            len,
            seed,
            fua,
        } => {
            let data = pattern(seed, len as usize);
            volume
                .write(offset, Bytes::from(data.clone()), fua)
                .await
                .unwrap();
            model[offset as usize..offset as usize + len as usize].copy_from_slice(&data);
        }
        Op::Read { offset, len } => {
            let got = volume.read(offset, len).await.unwrap();
            assert_eq!(got.len(), len as usize);
            assert!(
                got[..] == model[offset as usize..offset as usize + len as usize],
                "read {len} at {offset} differs from the model"
            );
        }
        Op::WriteZeroes { offset, len, fua } => {
            volume.write_zeroes(offset, len, fua).await.unwrap();
            model[offset as usize..(offset + len) as usize].fill(0);
        }
        Op::Trim { offset, len } => {
            // Files and memory volumes read trimmed ranges as zeros (module docs).
            volume.trim(offset, len).await.unwrap();
            model[offset as usize..(offset + len) as usize].fill(0);
        }
        Op::Flush => volume.flush().await.unwrap(),
    }
}

async fn assert_matches_model(volume: &Volume, model: &[u8]) {
    let whole = volume.read(0, model.len() as u32).await.unwrap();
    let first_diff = whole.iter().zip(model).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "volume differs from the model at byte {first_diff:?}"
    );
}

fn scripted_ops() -> Vec<Op> {
    vec![
        Op::Read {
            offset: 0,
            len: 4096,
        },
        Op::Write {
            offset: 0,
            len: 4096,
            seed: 1,
            fua: false,
        },
        Op::Write {
            offset: 8192,
            len: 65536,
            seed: 2,
            fua: true,
        },
        Op::Write {
            offset: 100,
            len: 333,
            seed: 3,
            fua: false,
        },
        Op::Write {
            offset: 4095,
            len: 4098,
            seed: 4,
            fua: true,
        },
        Op::Read {
            offset: 0,
            len: 80000,
        },
        Op::Read { offset: 1, len: 1 },
        Op::WriteZeroes {
            offset: 8192 + 4096,
            len: 8192,
            fua: false,
        },
        Op::WriteZeroes {
            offset: 8200,
            len: 1000,
            fua: true,
        },
        Op::Trim {
            offset: 8192 + 32768,
            len: 16384,
        },
        Op::Trim {
            offset: 130,
            len: 77,
        },
        Op::Flush,
        Op::Write {
            offset: SIZE_BYTES - 4096,
            len: 4096,
            seed: 5,
            fua: false,
        },
        Op::Write {
            offset: SIZE_BYTES - 7,
            len: 7,
            seed: 6,
            fua: false,
        },
        Op::Read {
            offset: SIZE_BYTES - 10000,
            len: 10000,
        },
        Op::WriteZeroes {
            offset: 0,
            len: SIZE_BYTES / 2,
            fua: false,
        },
        Op::Write {
            offset: 4096 * 3,
            len: 4096 * 5,
            seed: 7,
            fua: false,
        },
        Op::Flush,
    ]
}

#[tokio::test]
async fn every_engine_matches_the_model_for_read_write_zeroes_trim_flush() {
    for config in DISK_CONFIGS {
        let dir = tempfile::tempdir().unwrap();
        let volume = open(dir.path(), config, SIZE_BYTES);
        let mut model = vec![0u8; SIZE_BYTES as usize];
        for op in scripted_ops() {
            apply(&volume, &mut model, &op).await;
        }
        assert_matches_model(&volume, &model).await;
        drop(volume);
        // The data is in the file, not only in the engine: check through std.
        let on_disk = std::fs::read(dir.path().join("vol.img")).unwrap();
        assert!(
            on_disk == model,
            "{config:?}: file contents differ from the model"
        );
    }
    let volume = Volume::memory(SIZE_BYTES);
    let mut model = vec![0u8; SIZE_BYTES as usize];
    for op in scripted_ops() {
        apply(&volume, &mut model, &op).await;
    }
    assert_matches_model(&volume, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_non_overlapping_writes_read_back_intact() {
    const WRITERS: u64 = 96;
    let region_bytes = SIZE_BYTES / WRITERS / 512 * 512;
    for config in DISK_CONFIGS {
        let dir = tempfile::tempdir().unwrap();
        let volume = open(dir.path(), config, SIZE_BYTES);
        let mut tasks = Vec::new();
        for i in 0..WRITERS {
            let volume = volume.clone();
            tasks.push(tokio::spawn(async move {
                // Some writers are unaligned to exercise the buffered side of O_DIRECT.
                let offset = i * region_bytes + if i % 3 == 0 { 17 } else { 0 };
                let len = region_bytes - if i % 3 == 0 { 17 } else { 0 };
                volume
                    .write(offset, Bytes::from(pattern(i, len as usize)), i % 5 == 0)
                    .await
                    .unwrap();
                let back = volume.read(offset, len as u32).await.unwrap();
                assert!(
                    back[..] == pattern(i, len as usize)[..],
                    "writer {i} read back other data"
                );
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        volume.flush().await.unwrap();
        let whole = volume.read(0, SIZE_BYTES as u32).await.unwrap();
        for i in 0..WRITERS {
            let offset = (i * region_bytes + if i % 3 == 0 { 17 } else { 0 }) as usize;
            let end = ((i + 1) * region_bytes) as usize;
            assert!(
                whole[offset..end] == pattern(i, end - offset)[..],
                "{config:?}: region {i} differs"
            );
        }
    }
}

#[tokio::test]
async fn direct_volume_serves_unaligned_offsets_lengths_and_buffers() {
    for engine in [EngineChoice::Uring, EngineChoice::Threads] {
        let dir = tempfile::tempdir().unwrap();
        let volume = open(
            dir.path(),
            Config {
                engine,
                direct: true,
            },
            SIZE_BYTES,
        );
        let mut model = vec![0u8; SIZE_BYTES as usize];
        // An aligned offset and length but a misaligned buffer (slice at +1 of a Vec).
        let backing = Bytes::from(pattern(9, 8192 + 1));
        let misaligned = backing.slice(1..);
        volume.write(4096, misaligned.clone(), false).await.unwrap();
        model[4096..4096 + 8192].copy_from_slice(&misaligned);
        for (offset, len) in [
            (1u64, 511u32),
            (511, 2),
            (4097, 4095),
            (12345, 54321),
            (0, 3),
        ] {
            let op = Op::Write {
                offset,
                len,
                seed: offset,
                fua: false,
            };
            apply(&volume, &mut model, &op).await;
            apply(
                &volume,
                &mut model,
                &Op::Read {
                    offset: offset.saturating_sub(100),
                    len: len + 200,
                },
            )
            .await;
        }
        // Holes read as zeros through the direct path too.
        let hole = volume.read(SIZE_BYTES - 65536, 65536).await.unwrap();
        assert!(hole.iter().all(|b| *b == 0));
        assert_matches_model(&volume, &model).await;
    }
}

#[tokio::test]
async fn requests_outside_the_volume_or_too_large_are_refused_before_io() {
    let dir = tempfile::tempdir().unwrap();
    let volumes = [
        open(
            dir.path(),
            Config {
                engine: EngineChoice::Uring,
                direct: false,
            },
            SIZE_BYTES,
        ),
        Volume::memory(SIZE_BYTES),
    ];
    for volume in &volumes {
        let past_end = volume.read(SIZE_BYTES - 511, 512).await.unwrap_err();
        assert_eq!(past_end.kind(), std::io::ErrorKind::InvalidInput);
        assert!(
            past_end.to_string().contains("ends past the end of volume"),
            "{past_end}"
        );
        let err = volume
            .write(SIZE_BYTES, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let err = volume.write_zeroes(u64::MAX, 2, false).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let err = volume.trim(1, SIZE_BYTES).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        // Nothing was written by the refused requests.
        assert!(
            volume
                .read(0, SIZE_BYTES as u32)
                .await
                .unwrap()
                .iter()
                .all(|b| *b == 0)
        );
        assert_eq!(volume.read(0, 0).await.unwrap().len(), 0);
    }
    let big = Volume::memory(64 << 20);
    let err = big.read(0, REQUEST_BYTES_MAX + 1).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("request limit"), "{err}");
    assert_eq!(
        big.read(0, REQUEST_BYTES_MAX).await.unwrap().len(),
        REQUEST_BYTES_MAX as usize
    );
}

#[tokio::test]
async fn large_write_zeroes_and_trim_on_files_zero_the_whole_range() {
    let size_bytes = 64 << 20;
    for config in [DISK_CONFIGS[0], DISK_CONFIGS[3]] {
        let dir = tempfile::tempdir().unwrap();
        let volume = open(dir.path(), config, size_bytes);
        let data = Bytes::from(vec![0x5A; 8 << 20]);
        for i in 0..8 {
            volume
                .write(i * (8 << 20), data.clone(), false)
                .await
                .unwrap();
        }
        volume.write_zeroes(1000, 40 << 20, true).await.unwrap();
        volume.trim((48 << 20) + 3, 8 << 20).await.unwrap();
        let head = volume.read(0, 1000).await.unwrap();
        assert!(head.iter().all(|b| *b == 0x5A));
        let zeroed = volume.read(1000, 32 << 20).await.unwrap();
        assert!(zeroed.iter().all(|b| *b == 0));
        let after = volume.read(1000 + (40 << 20), 1000).await.unwrap();
        assert!(after.iter().all(|b| *b == 0x5A));
        let trimmed = volume.read((48 << 20) + 3, 8 << 20).await.unwrap();
        assert!(trimmed.iter().all(|b| *b == 0));
        let tail = volume.read((56 << 20) + 3, 1000).await.unwrap();
        assert!(tail.iter().all(|b| *b == 0x5A));
    }
}

#[tokio::test]
async fn clones_share_one_volume_and_the_last_drop_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        engine: EngineChoice::Uring,
        direct: false,
    };
    let a = open(dir.path(), config, SIZE_BYTES);
    let b = a.clone();
    a.write(0, Bytes::from_static(b"shared"), false)
        .await
        .unwrap();
    assert_eq!(&b.read(0, 6).await.unwrap()[..], b"shared");
    drop(a);
    b.flush().await.unwrap();
    drop(b);
    let again = open(dir.path(), config, SIZE_BYTES);
    assert_eq!(&again.read(0, 6).await.unwrap()[..], b"shared");
}

fn op_strategy(size_bytes: u64) -> impl Strategy<Value = Op> {
    // Half the offsets and lengths are 4096-aligned so O_DIRECT takes the direct path.
    let offset = prop_oneof![(0..size_bytes / 4096).prop_map(|b| b * 4096), 0..size_bytes];
    let len = prop_oneof![(0u64..8).prop_map(|b| b * 4096), 0u64..20000];
    (0u8..5, offset, len, any::<u64>(), any::<bool>()).prop_map(
        move |(kind, offset, len, seed, fua)| {
            let len = len.min(size_bytes - offset);
            match kind {
                0 => Op::Write {
                    offset,
                    len: len as u32,
                    seed,
                    fua,
                },
                1 => Op::Read {
                    offset,
                    len: len as u32,
                },
                2 => Op::WriteZeroes { offset, len, fua },
                3 => Op::Trim { offset, len },
                _ => Op::Flush,
            }
        },
    )
}

fn run_ops(config: Option<Config>, ops: &[Op]) {
    let size_bytes = 128 * 1024;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let volume = match config {
            Some(config) => open(dir.path(), config, size_bytes),
            None => Volume::memory(size_bytes),
        };
        let mut model = vec![0u8; size_bytes as usize];
        for op in ops {
            apply(&volume, &mut model, op).await;
        }
        assert_matches_model(&volume, &model).await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn uring_buffered_matches_model(ops in proptest::collection::vec(op_strategy(128 * 1024), 1..40)) {
        run_ops(Some(DISK_CONFIGS[0]), &ops);
    }

    #[test]
    fn uring_direct_matches_model(ops in proptest::collection::vec(op_strategy(128 * 1024), 1..40)) {
        run_ops(Some(DISK_CONFIGS[1]), &ops);
    }

    #[test]
    fn threads_buffered_matches_model(ops in proptest::collection::vec(op_strategy(128 * 1024), 1..40)) {
        run_ops(Some(DISK_CONFIGS[2]), &ops);
    }

    #[test]
    fn threads_direct_matches_model(ops in proptest::collection::vec(op_strategy(128 * 1024), 1..40)) {
        run_ops(Some(DISK_CONFIGS[3]), &ops);
    }

    #[test]
    fn memory_matches_model(ops in proptest::collection::vec(op_strategy(128 * 1024), 1..40)) {
        run_ops(None, &ops);
    }
}

/// Volume is a cheap handle usable from any task.
#[test]
fn volume_is_send_sync_and_clone() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<Volume>();
    let _: Arc<Volume> = Arc::new(Volume::memory(512));
}
