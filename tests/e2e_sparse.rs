//! A thin primary stays a thin secondary (issue 11, item 2): the initial full sync
//! of a large sparse volume with little data allocates on the secondary about what
//! the primary holds, not the volume's size, and the images are equal.
//!
//! Volumes are sparse files of 16 GiB holding a few MiB of data. A watchdog stops
//! the test as soon as the secondary allocates more than the limit, so a regression
//! never fills the shared disk.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use std::process::Command;

use common::{
    NodeOpts, Pair, Site, TestRng, assert_same_sparse, free_port, primary_in_sync, run_ok, seed,
};

const GIB: u64 = 1 << 30;

/// Bytes the file occupies on disk (st_blocks).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Write `pieces` pieces of `piece` random bytes at random aligned offsets; returns
/// the bytes written.
fn scatter_data(path: &Path, size: u64, pieces: u64, piece: u64, seed: u64) -> u64 {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("create image");
    f.set_len(size).expect("size the sparse image");
    let mut rng = TestRng::new(seed);
    let mut buf = vec![0u8; piece as usize];
    for _ in 0..pieces {
        let at = rng.below(size / piece) * piece;
        rng.fill(&mut buf);
        f.write_all_at(&buf, at).expect("write data");
    }
    f.sync_all().expect("sync image");
    pieces * piece
}

/// Wait for `cond` while the secondary's allocation stays under `limit`.
fn wait_thin(
    what: &str,
    img: &Path,
    limit: u64,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) {
    let started = Instant::now();
    loop {
        let a = allocated(img);
        assert!(
            a <= limit,
            "{what}: the secondary allocated {a} bytes, more than {limit} (a thin primary must stay a thin secondary)"
        );
        if cond() {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not done after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn initial_sync_of_a_sparse_16gib_volume_keeps_the_secondary_thin() {
    let seed = seed("initial_sync_of_a_sparse_16gib_volume_keeps_the_secondary_thin");
    let size = 16 * GIB;
    let site = Site::new();
    let p_img = site.path("primary.img");
    let s_img = site.path("secondary.img");
    let data = scatter_data(&p_img, size, 64, 256 << 10, seed);
    // Data, plus 1% of the volume for metadata-like overhead of the file system.
    let limit = data + size / 100;
    let (repl, nbd) = (free_port(), free_port());
    let mut secondary = site.secondary("secondary", &s_img, size, repl, &NodeOpts::default());
    secondary.wait_status("control socket", Duration::from_secs(60), |_| true);
    let mut primary = site.primary(
        "primary",
        &p_img,
        size,
        "async",
        repl,
        nbd,
        &NodeOpts::default(),
    );
    let started = Instant::now();
    wait_thin(
        "initial sync",
        &s_img,
        limit,
        Duration::from_secs(300),
        || {
            primary.status().is_some_and(|s| primary_in_sync(&s))
                && secondary
                    .status()
                    .is_some_and(|s| s["disk_state"] == "UpToDate")
        },
    );
    eprintln!(
        "initial sync of {size} bytes holding {data}: {:?}, secondary allocated {} bytes",
        started.elapsed(),
        allocated(&s_img)
    );
    primary.stop();
    // A clean stop copies the journal into the volume: zero ranges must be holes there.
    secondary.stop();
    let a = allocated(&s_img);
    eprintln!("after stop the secondary allocates {a} bytes");
    assert!(
        a <= limit,
        "after a clean stop the secondary allocates {a} bytes, more than {limit}"
    );
    assert_same_sparse(&p_img, &s_img);
}

fn qemu_io(uri: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = run_ok(&mut c, Duration::from_secs(300));
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// A 64 GiB pair: the initial sync, client writes and discards, and a resync after
/// the secondary was killed (its changes include discarded ranges, resent as zero
/// frames the secondary punches) keep the secondary about as thin as the primary.
#[test]
fn a_64gib_pair_stays_thin_through_writes_discards_and_a_resync() {
    let seed = seed("a_64gib_pair_stays_thin_through_writes_discards_and_a_resync");
    let size = 64 * GIB;
    let mut pair = Pair::start("async", size);
    let uri = pair.nbd_uri();
    let mut rng = TestRng::new(seed);
    let mut offsets: Vec<u64> = (0..16)
        .map(|_| rng.below(size / (1 << 20) - 4) << 20)
        .collect();
    offsets.sort_unstable();
    let writes: Vec<String> = offsets
        .iter()
        .enumerate()
        .map(|(i, o)| format!("write -P {} {o} 1M", 1 + i))
        .collect();
    qemu_io(&uri, &writes);
    qemu_io(&uri, &[format!("discard {} 1M", offsets[0])]);
    pair.wait_synced(Duration::from_secs(120));
    // An outage: the secondary is killed; the primary tracks what changes meanwhile.
    pair.secondary.signal(libc::SIGKILL);
    pair.secondary.wait_exit(Duration::from_secs(30));
    let more: Vec<String> = offsets
        .iter()
        .map(|o| format!("write -P 200 {} 256k", o + (2 << 20)))
        .collect();
    qemu_io(&uri, &more);
    // Discard what was written before (the resync resends these as zeros) and a
    // range in the middle of the volume (smaller than the secondary's journal: the
    // secondary counts a resync's blocks against it, zero ranges included).
    let discards: Vec<String> = offsets[1..8]
        .iter()
        .map(|o| format!("discard {o} 1M"))
        .chain([format!("discard {} 256M", 16 * GIB)])
        .collect();
    qemu_io(&uri, &discards);
    pair.secondary.restart();
    let limit = allocated(&pair.primary_img) + size / 100;
    let (p, s) = (&mut pair.primary, &mut pair.secondary);
    wait_thin(
        "resync",
        &pair.secondary_img,
        limit,
        Duration::from_secs(300),
        || {
            p.status().is_some_and(|st| primary_in_sync(&st))
                && s.status().is_some_and(|st| {
                    st["disk_state"] == "UpToDate" && st["peer"]["connection"] == "connected"
                })
        },
    );
    pair.stop();
    let (pa, sa) = (allocated(&pair.primary_img), allocated(&pair.secondary_img));
    eprintln!("primary allocates {pa} bytes, secondary {sa}");
    assert!(
        sa <= pa + size / 100,
        "the secondary allocates {sa} bytes, the primary {pa}: more than 1% of the volume apart"
    );
    assert_same_sparse(&pair.primary_img, &pair.secondary_img);
}
