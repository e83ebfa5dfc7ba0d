//! Opening volumes: creation, size checks, exclusive access, error messages.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem::volume::{EngineChoice, OpenOptions, Volume, VolumeError};

fn opts(create_size_bytes: Option<u64>, engine: EngineChoice) -> OpenOptions {
    OpenOptions {
        create_size_bytes,
        direct: false,
        engine,
    }
}

#[test]
fn missing_path_without_size_says_to_pass_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.img");
    let err = Volume::open(&path, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, VolumeError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("missing.img") && msg.contains("--size"),
        "{msg}"
    );
    assert!(!path.exists(), "nothing is created without --size");
}

#[test]
fn missing_path_with_size_creates_a_sparse_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.img");
    let size_bytes = 1 << 30;
    let volume = Volume::open(&path, &opts(Some(size_bytes), EngineChoice::Auto)).unwrap();
    assert_eq!(volume.size_bytes(), size_bytes);
    assert_eq!(volume.path(), Some(path.as_path()));
    assert!(!volume.is_block_device());
    assert!(["io_uring", "threads"].contains(&volume.engine_name()));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), size_bytes);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "image must be sparse, has {} blocks",
        meta.blocks()
    );
    drop(volume);
    // Reopening with the same size or without a size uses the existing image.
    assert_eq!(
        Volume::open(&path, &opts(Some(size_bytes), EngineChoice::Threads))
            .unwrap()
            .size_bytes(),
        size_bytes
    );
    assert_eq!(
        Volume::open(&path, &opts(None, EngineChoice::Uring))
            .unwrap()
            .size_bytes(),
        size_bytes
    );
}

#[test]
fn existing_image_of_another_size_names_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1073741824)
        .unwrap();
    let err = Volume::open(&path, &opts(Some(2147483648), EngineChoice::Auto)).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::SizeMismatch {
                actual_bytes: 1073741824,
                requested_bytes: 2147483648,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "volume {} is 1073741824 bytes but --size asks for 2147483648; ",
            path.display()
        )),
        "{msg}"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        1073741824,
        "a refused open does not resize"
    );
}

#[test]
fn sizes_that_are_not_multiples_of_512_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::File::create(&odd).unwrap().set_len(1000).unwrap();
    let err = Volume::open(&odd, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::SizeNotAligned {
                size_bytes: 1000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("multiple of 512"), "{err}");

    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    assert!(matches!(
        Volume::open(&empty, &OpenOptions::default()).unwrap_err(),
        VolumeError::SizeNotAligned { size_bytes: 0, .. }
    ));

    let fresh = dir.path().join("fresh.img");
    let err = Volume::open(&fresh, &opts(Some(4097), EngineChoice::Auto)).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::SizeNotAligned {
                size_bytes: 4097,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!fresh.exists(), "a refused size creates nothing");
}

#[test]
fn a_directory_is_not_a_volume() {
    let dir = tempfile::tempdir().unwrap();
    let err = Volume::open(dir.path(), &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, VolumeError::NotAVolume { .. }), "{err:?}");
}

#[test]
fn second_open_in_the_same_process_is_busy_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.img");
    for (first, second) in [
        (EngineChoice::Uring, EngineChoice::Threads),
        (EngineChoice::Threads, EngineChoice::Uring),
    ] {
        let held = Volume::open(&path, &opts(Some(1 << 20), first)).unwrap();
        for direct in [false, true] {
            let o = OpenOptions {
                create_size_bytes: None,
                direct,
                engine: second,
            };
            let err = Volume::open(&path, &o).unwrap_err();
            assert!(matches!(err, VolumeError::Busy { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                format!(
                    "volume {} is already held by another tandem agent (or another program); stop it first",
                    path.display()
                )
            );
        }
        // A clone is the same open volume, not a second holder.
        let clone = held.clone();
        drop(held);
        assert!(matches!(
            Volume::open(&path, &opts(None, second)).unwrap_err(),
            VolumeError::Busy { .. }
        ));
        drop(clone);
        Volume::open(&path, &opts(None, second)).unwrap();
    }
}

#[test]
fn another_process_holding_the_lock_makes_open_busy_and_vice_versa() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();

    // util-linux flock(1) waits for LOCK_EX on the file, then holds it while its child
    // sleeps (-o: only flock itself holds the descriptor). Its own process group lets
    // the test end both processes.
    let mut holder = Command::new("flock")
        .arg("-o")
        .arg(&path)
        .args(["sleep", "30"])
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match Volume::open(&path, &OpenOptions::default()) {
            Err(e @ VolumeError::Busy { .. }) => break e,
            Ok(v) => {
                drop(v);
                assert!(Instant::now() < deadline, "flock(1) never took the lock");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    };
    assert!(err.to_string().contains("already held"), "{err}");
    let status = Command::new("kill")
        .arg("--")
        .arg(format!("-{}", holder.id()))
        .status()
        .unwrap();
    assert!(status.success());
    holder.wait().unwrap();

    let volume = Volume::open(&path, &OpenOptions::default()).unwrap();
    let status = Command::new("flock")
        .arg("-n")
        .arg(&path)
        .arg("true")
        .status()
        .unwrap();
    assert!(
        !status.success(),
        "another process must not get the lock while the volume is open"
    );
    drop(volume);
    let status = Command::new("flock")
        .arg("-n")
        .arg(&path)
        .arg("true")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the lock is released when the volume is dropped"
    );
}

#[test]
fn errors_keep_the_io_error_as_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("x.img");
    let err = Volume::open(&path, &opts(Some(1 << 20), EngineChoice::Auto)).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::Create {
                size_bytes: 1048576,
                ..
            }
        ),
        "{err:?}"
    );
    let source = std::error::Error::source(&err).expect("io::Error is the source");
    let io = source.downcast_ref::<std::io::Error>().unwrap();
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
}
