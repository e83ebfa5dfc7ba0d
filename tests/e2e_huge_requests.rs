//! Issue 9 item 4: TRIM and WRITE_ZEROES of any size the protocol allows, on a
//! large sparse volume, through the export as a user sends them: `qemu-io -c
//! 'discard 0 2047M'` and a whole-volume `blkdiscard` on a loop device over the
//! export (nbdfuse). Before the fix the first panicked the primary's owner task
//! (an assert in the activity log) and every later request failed with
//! ESHUTDOWN. The agents must keep serving, other writes keep completing while
//! the big requests run, and the images end identical.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cleanup, Pair, run_ok, run_with_timeout};

const GIB: u64 = 1 << 30;
const CMD_TIMEOUT: Duration = Duration::from_secs(600);

/// The volume size: 16 GiB (sparse), `TANDEM_HUGE_GIB` to change it.
fn size_bytes() -> u64 {
    std::env::var("TANDEM_HUGE_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
        * GIB
}

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = run_ok(&mut c, CMD_TIMEOUT);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// Blocks the file really occupies, in bytes.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn discard_2047m_and_a_whole_volume_blkdiscard_keep_the_pair_serving() {
    let size = size_bytes();
    let mut pair = Pair::start("sync", size);
    let uri = pair.nbd_uri();
    let mut cleanup = Cleanup::new();
    eprintln!("volume {} GiB (sparse)", size / GIB);

    // Data in several places, including past the range the first TRIM covers.
    let spots: Vec<u64> = vec![0, GIB, 2 * GIB, size / 2, size - 8 * (1 << 20)];
    let writes: Vec<String> = spots
        .iter()
        .enumerate()
        .map(|(i, off)| format!("write -P {} {off} 4M", 0x11 + i))
        .collect();
    qemu_io(&uri, &writes);

    // The request that used to panic the owner task: one NBD_CMD_TRIM of 2047 MiB.
    let t = Instant::now();
    qemu_io(&uri, &["discard 0 2047M".into()]);
    eprintln!("discard 0 2047M: {:?}", t.elapsed());
    // The agent still serves; what the TRIM covered reads as zeroes (the export
    // advertises that trimmed blocks read back as zeroes), what it did not is kept.
    qemu_io(
        &uri,
        &[
            "read -P 0 0 4M".into(),
            format!("read -P {} {} 4M", 0x11 + 2, 2 * GIB),
            format!("write -P 0x77 {} 4M", GIB),
        ],
    );
    // WRITE_ZEROES of the protocol's largest size (4 GiB - 512).
    qemu_io(&uri, &[format!("write -z {} {}", GIB, 4 * GIB - 512)]);

    // A whole-volume blkdiscard through the kernel: nbdfuse + a loop device.
    let fuse_dir = pair.site.path("fuse");
    std::fs::create_dir(&fuse_dir).expect("mkdir");
    let pidfile = pair.site.path("nbdfuse.pid");
    let server = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&fuse_dir)
        .arg(&uri)
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdfuse (libnbd-bin)");
    cleanup.add_fuse(&fuse_dir, server);
    let nbd_file = fuse_dir.join("nbd");
    common::wait_until("nbdfuse serves", Duration::from_secs(30), || {
        pidfile.exists() && nbd_file.exists()
    });
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

    // Other writes keep completing while the discard runs.
    let writer_uri = uri.clone();
    let last = size - 4 * (1 << 20);
    let writer = std::thread::spawn(move || {
        let mut done = 0u32;
        let t = Instant::now();
        let mut worst = Duration::ZERO;
        while t.elapsed() < Duration::from_secs(5) {
            let w = Instant::now();
            let out = run_with_timeout(
                Command::new("qemu-io").args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P 0x42 {last} 64k"),
                    &writer_uri,
                ]),
                CMD_TIMEOUT,
            );
            assert!(out.status.success(), "a write beside the discard failed");
            worst = worst.max(w.elapsed());
            done += 1;
        }
        (done, worst)
    });
    let t = Instant::now();
    let out = run_with_timeout(Command::new("blkdiscard").arg("-v").arg(&dev), CMD_TIMEOUT);
    assert!(
        out.status.success(),
        "blkdiscard of the whole volume failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "blkdiscard {} GiB: {:?} {}",
        size / GIB,
        t.elapsed(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let (done, worst) = writer.join().expect("writer");
    eprintln!("writes beside the discard: {done}, slowest {worst:?}");
    assert!(done > 0, "no write completed beside the discard");
    cleanup.detach_loop(&dev);
    cleanup.unmount_fuse(&fuse_dir);

    // Still serving, and replicating.
    qemu_io(&uri, &[format!("write -P 0x99 {} 1M", 3 * GIB)]);
    pair.wait_synced(CMD_TIMEOUT);
    let s = pair.primary.status().expect("status");
    assert!(s["last_error"].is_null(), "primary reports an error: {s}");
    pair.stop();

    let cmp = run_with_timeout(
        Command::new("cmp")
            .arg(&pair.primary_img)
            .arg(&pair.secondary_img),
        CMD_TIMEOUT,
    );
    assert!(
        cmp.status.success(),
        "images differ: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    eprintln!(
        "allocated after the discards: primary {} MiB, secondary {} MiB",
        allocated(&pair.primary_img) >> 20,
        allocated(&pair.secondary_img) >> 20
    );
}
