//! A real filesystem on the replicated volume, through the kernel: nbdfuse
//! exposes the primary's export as a file, a loop device sits on it, ext4 is
//! made and mounted, a tree of ~500 seeded random files in nested directories
//! is copied in, and everything is torn down (umount, losetup -d, FUSE
//! unmount). After the primary drained on SIGTERM the secondary's image is a
//! clean ext4 (`e2fsck -fn`) that, loop-mounted read-only, holds exactly the
//! same files (blake3 of every file). Sync mode.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cleanup, Pair, TestRng, run_ok, tree_digests};

const SIZE_BYTES: u64 = 128 << 20;
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// ~500 files (0 B to 64 KiB, a few of 1 MiB) in nested directories.
fn make_tree(root: &Path, seed: u64) {
    let mut rng = TestRng::new(seed);
    for i in 0..500u64 {
        let depth = rng.below(4);
        let mut dir = root.to_owned();
        for _ in 0..depth {
            dir.push(format!("d{}", rng.below(6)));
        }
        std::fs::create_dir_all(&dir).expect("create tree dir");
        let len = if i % 100 == 0 {
            1 << 20
        } else {
            rng.below(65_536) as usize
        };
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        std::fs::write(dir.join(format!("f{i}.bin")), &data).expect("write tree file");
    }
}

#[test]
fn ext4_through_nbdfuse_and_loop_replicates_a_file_tree() {
    let seed = common::seed("fs");
    let mut pair = Pair::start("sync", SIZE_BYTES);
    let mut cleanup = Cleanup::new();
    let fuse_dir = pair.site.path("fuse");
    let mnt = pair.site.path("mnt");
    let src = pair.site.path("src");
    for d in [&fuse_dir, &mnt, &src] {
        std::fs::create_dir(d).expect("mkdir");
    }
    make_tree(&src, seed);
    let expected = tree_digests(&src);
    assert!(expected.len() >= 500);

    // nbdfuse runs in the foreground; -P writes its pid once it serves.
    let pidfile = pair.site.path("nbdfuse.pid");
    let server = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&fuse_dir)
        .arg(pair.nbd_uri())
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdfuse (libnbd-bin)");
    cleanup.add_fuse(&fuse_dir, server);
    let nbd_file = fuse_dir.join("nbd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(pidfile.exists() && nbd_file.exists()) {
        assert!(
            Instant::now() < deadline,
            "nbdfuse did not expose {} within 30 s",
            nbd_file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let dev = run_ok(
        Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(&nbd_file),
        CMD_TIMEOUT,
    )
    .trim()
    .to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    cleanup.add_loop(&dev);

    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(&dev),
        CMD_TIMEOUT,
    );
    run_ok(Command::new("mount").arg(&dev).arg(&mnt), CMD_TIMEOUT);
    cleanup.add_mount(&mnt);
    run_ok(
        Command::new("cp").arg("-a").arg(src.join(".")).arg(&mnt),
        CMD_TIMEOUT,
    );
    run_ok(Command::new("sync").arg("-f").arg(&mnt), CMD_TIMEOUT);
    assert_eq!(
        tree_digests(&mnt),
        expected,
        "files read back on the primary"
    );
    cleanup.umount(&mnt);
    cleanup.detach_loop(&dev);
    cleanup.unmount_fuse(&fuse_dir);

    pair.stop();

    let fsck = common::run_with_timeout(
        Command::new("e2fsck").arg("-fn").arg(&pair.secondary_img),
        CMD_TIMEOUT,
    );
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the secondary image failed ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let sec_mnt = pair.site.path("secondary-mnt");
    std::fs::create_dir(&sec_mnt).expect("mkdir");
    run_ok(
        Command::new("mount")
            .args(["-o", "ro,loop,noload"])
            .arg(&pair.secondary_img)
            .arg(&sec_mnt),
        CMD_TIMEOUT,
    );
    cleanup.add_mount(&sec_mnt);
    let got = tree_digests(&sec_mnt);
    cleanup.umount(&sec_mnt);
    assert_eq!(got.len(), expected.len(), "file count on the secondary");
    assert_eq!(got, expected, "file contents on the secondary");
}
