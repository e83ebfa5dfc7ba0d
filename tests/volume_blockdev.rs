//! Block-device volumes on a real loop device (losetup over a temporary image):
//! size via BLKGETSIZE64, exclusive claim, BLKZEROOUT, BLKDISCARD, O_DIRECT.
//! Needs root and /dev/loop-control (available on the project's test machine).

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use tandem::volume::{EngineChoice, OpenOptions, Volume, VolumeError};

/// A loop device attached to a file; detached on drop.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    fn attach(image: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let status = Command::new("losetup")
            .arg("--detach")
            .arg(&self.dev)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("could not detach {}", self.dev.display());
        }
    }
}

#[tokio::test]
async fn loop_device_volume_reports_size_is_exclusive_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("backing.img");
    let size_bytes: u64 = 8 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size_bytes)
        .unwrap();
    let loop_dev = LoopDevice::attach(&image);

    for (engine, direct) in [(EngineChoice::Uring, true), (EngineChoice::Threads, false)] {
        let opts = OpenOptions {
            create_size_bytes: None,
            direct,
            engine,
        };
        let volume = Volume::open(&loop_dev.dev, &opts).unwrap();
        assert!(volume.is_block_device());
        assert_eq!(volume.size_bytes(), size_bytes);

        let err = Volume::open(&loop_dev.dev, &opts).unwrap_err();
        assert!(matches!(err, VolumeError::Busy { .. }), "{err:?}");
        let wrong = OpenOptions {
            create_size_bytes: Some(size_bytes * 2),
            ..opts.clone()
        };
        assert!(matches!(
            Volume::open(&loop_dev.dev, &wrong).unwrap_err(),
            VolumeError::Busy { .. }
        ));

        let data = Bytes::from(vec![0xC3; 1 << 20]);
        volume.write(0, data.clone(), true).await.unwrap();
        volume
            .write(3, Bytes::from_static(b"unaligned"), false)
            .await
            .unwrap();
        let back = volume.read(0, 1 << 20).await.unwrap();
        assert_eq!(&back[3..12], b"unaligned");
        assert!(back[12..].iter().all(|b| *b == 0xC3));

        // BLKZEROOUT on the aligned interior, zero data on the unaligned edges.
        volume.write_zeroes(100, 600_000, true).await.unwrap();
        let back = volume.read(0, 1 << 20).await.unwrap();
        assert_eq!(&back[3..12], b"unaligned");
        assert!(back[12..100].iter().all(|b| *b == 0xC3));
        assert!(back[100..600_100].iter().all(|b| *b == 0), "zeroed range");
        assert!(back[600_100..].iter().all(|b| *b == 0xC3));

        // Trim on a block device zeroes the range (replicas stay identical) and must
        // not touch anything outside it.
        volume.trim(700_001, 100_000).await.unwrap();
        let before = volume.read(600_100, 700_001 - 600_100).await.unwrap();
        assert!(
            before.iter().all(|b| *b == 0xC3),
            "bytes before the trimmed range untouched"
        );
        let after = volume.read(800_001, 4096).await.unwrap();
        assert!(
            after.iter().all(|b| *b == 0xC3),
            "bytes after the trimmed range untouched"
        );
        let trimmed = volume.read(700_001, 100_000).await.unwrap();
        assert!(
            trimmed.iter().all(|b| *b == 0),
            "a trimmed range reads as zeros"
        );
        volume.flush().await.unwrap();
        drop(volume);

        // The writes reached the backing file through the loop device.
        let on_disk = std::fs::read(&image).unwrap();
        assert_eq!(&on_disk[3..12], b"unaligned");
        assert!(on_disk[100..600_100].iter().all(|b| *b == 0));
        std::fs::write(&image, vec![0u8; size_bytes as usize]).unwrap();
    }
}
