//! G3 with real processes: the primary is killed with SIGKILL in the middle of
//! an fio random-write load (async mode, so the secondary lags), restarted on
//! the same image and metadata, and the pair converges to identical images
//! without a full copy (the activity log bounds what may differ).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{NodeOpts, Pair, READY_TIMEOUT, assert_same_file, free_port, primary_in_sync};

const SIZE_BYTES: u64 = 64 << 20;

/// An fio process killed when dropped.
struct Load(Child);

impl Load {
    /// fio's NBD engine writing 4 KiB blocks at random over `size` (fio's
    /// syntax) of the pair's export at queue depth 16, for `runtime_s` seconds,
    /// seeded; `extra` adds options. Its stderr is kept for the test to read.
    fn random_writes(
        pair: &Pair,
        name: &str,
        size: &str,
        runtime_s: u32,
        seed: u64,
        extra: &[&str],
    ) -> Load {
        Load(
            Command::new("fio")
                .current_dir(pair.site.dir.path())
                .arg(format!("--name={name}"))
                .arg("--ioengine=nbd")
                .arg(format!("--uri={}", pair.nbd_uri()))
                .args(["--rw=randwrite", "--bs=4k", "--iodepth=16", "--time_based"])
                .arg(format!("--size={size}"))
                .arg(format!("--runtime={runtime_s}"))
                .arg("--verify_state_save=0")
                .args(extra)
                // fio parses the seed as a signed 64-bit number.
                .arg(format!("--randseed={}", seed >> 1))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start fio"),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn primary_killed_mid_write_converges_after_restart_without_full_copy() {
    let seed = common::seed("crash");
    let mut pair = Pair::start("async", SIZE_BYTES);
    let load = Load::random_writes(&pair, "crash-load", "64M", 60, seed, &[]);
    pair.primary
        .wait_status("client writes under way", Duration::from_secs(30), |s| {
            s["counters"]["client_writes"].as_u64().unwrap_or(0) > 2000
        });
    pair.primary.signal(libc::SIGKILL);
    let status = pair.primary.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "SIGKILL ends the primary: {status}");
    drop(load);

    // Restart on the same image and metadata (new control socket and NBD port).
    pair.primary = pair.site.primary(
        "primary-restarted",
        &pair.primary_img,
        SIZE_BYTES,
        "async",
        pair.repl_port,
        free_port(),
        &NodeOpts::default(),
    );
    pair.primary
        .wait_status("reconnected and in sync", READY_TIMEOUT, primary_in_sync);
    pair.secondary.wait_status("UpToDate", READY_TIMEOUT, |s| {
        s["disk_state"] == "UpToDate" && s["peer"]["connection"] == "connected"
    });
    let s = pair.primary.status().expect("primary status");
    pair.stop();
    // Safety first (G3): the pair converged to identical images.
    assert_same_file(&pair.primary_img, &pair.secondary_img);
    // Then efficiency (G3, ARCHITECTURE §4): only the persisted bitmap and the
    // active extents may be resynced, never the whole volume.
    let resynced = s["counters"]["resync_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        resynced < SIZE_BYTES,
        "recovery after a crash must not copy the whole volume ({resynced} of {SIZE_BYTES} bytes resynced): {s}"
    );
}

/// G3/G4 the other way round: the secondary is killed with SIGKILL under a
/// sync-mode fio load. The primary keeps serving (fio sees no error), tracks
/// the writes in its bitmap, and after the secondary restarts the resync
/// (with new writes still arriving) brings both images to identity.
#[test]
fn secondary_killed_under_sync_load_resyncs_while_writes_continue() {
    let seed = common::seed("secondary crash");
    let mut pair = Pair::start("sync", SIZE_BYTES);
    let mut load = Load::random_writes(
        &pair,
        "secondary-crash-load",
        "64M",
        10,
        seed,
        &["--end_fsync=1"],
    );
    pair.primary
        .wait_status("client writes under way", Duration::from_secs(30), |s| {
            s["counters"]["client_writes"].as_u64().unwrap_or(0) > 1000
        });
    pair.secondary.signal(libc::SIGKILL);
    pair.secondary.wait_exit(Duration::from_secs(10));
    pair.primary
        .wait_status("peer loss noticed", Duration::from_secs(20), |s| {
            s["peer"]["connection"] != "connected"
        });
    let before = pair.primary.status().expect("primary status")["counters"]["client_writes"]
        .as_u64()
        .unwrap_or(0);
    pair.primary.wait_status(
        "writes continue without the secondary",
        Duration::from_secs(10),
        |s| s["counters"]["client_writes"].as_u64().unwrap_or(0) > before + 500,
    );
    pair.secondary = pair.site.secondary(
        "secondary-restarted",
        &pair.secondary_img,
        SIZE_BYTES,
        pair.repl_port,
        &NodeOpts::default(),
    );
    // fio ends by itself (runtime 10 s); it must not have seen a single error.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = load.0.try_wait().expect("try_wait fio") {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "fio did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut fio_err = String::new();
    if let Some(mut e) = load.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut fio_err);
    }
    assert!(
        status.success(),
        "fio saw errors while the secondary was down: {fio_err}"
    );
    pair.wait_synced(READY_TIMEOUT);
    pair.stop();
    assert_same_file(&pair.primary_img, &pair.secondary_img);
}

/// Found in session 23 on a 16 GiB sync pair at default settings: random writes
/// spread over the volume keep all 960 activity extents (4 MiB each) active; after
/// the primary was killed and restarted, its resync announced every block of them
/// (4,035,870,720 bytes, compared by hash) and the secondary, whose default 1 GiB
/// journal stages 812 MiB, refused it on every reconnect: the pair needed an
/// operator after a crash, although a few writes differed. Blocks compared by
/// hash now count a 32nd in the announced size, and the pair converges.
#[test]
fn a_primary_crash_with_every_default_extent_active_converges_without_an_operator() {
    // 2,048 extents of 4 MiB: enough that 960 active ones (3.75 GiB) are far
    // more than the default journal stages.
    const SIZE: u64 = 8 << 30;
    let seed = common::seed("crash with a full activity log");
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1} s: {what}", t0.elapsed().as_secs_f64());
    let mut pair = Pair::start("sync", SIZE);
    phase("pair in sync");
    let load = Load::random_writes(&pair, "spread-load", "8G", 120, seed, &[]);
    // 4,000 writes over 2,048 extents: the 960 slots of the log are all taken.
    pair.primary.wait_status(
        "writes spread over the volume",
        Duration::from_secs(120),
        |s| s["counters"]["client_writes"].as_u64().unwrap_or(0) > 4000,
    );
    phase("log full; SIGKILL");
    pair.primary.signal(libc::SIGKILL);
    pair.primary.wait_exit(Duration::from_secs(10));
    drop(load);
    pair.primary = pair.site.primary(
        "primary-restarted",
        &pair.primary_img,
        SIZE,
        "sync",
        pair.repl_port,
        free_port(),
        &NodeOpts::default(),
    );
    let passes = |a: &common::Agent| a.log_text().matches("resync starts").count();
    common::wait_until(
        "the recovery resync starts",
        Duration::from_secs(60),
        || passes(&pair.primary) > 0,
    );
    let started = pair.primary.log_text();
    let line = started
        .lines()
        .find(|l| l.contains("resync starts"))
        .expect("logged");
    eprintln!("{line}");
    pair.primary.wait_status(
        "in sync after the recovery resync",
        Duration::from_secs(300),
        primary_in_sync,
    );
    phase("in sync after the recovery");
    let refused = pair
        .secondary
        .log_text()
        .matches("does not fit the journal")
        .count();
    assert_eq!(refused, 0, "the secondary staged the recovery resync");
    let s = pair.primary.status().expect("primary status");
    eprintln!(
        "recovery: {} bytes resynced, {} verified by hash",
        s["counters"]["resync_bytes"], s["counters"]["verified_bytes"]
    );
    pair.stop();
    common::assert_same_sparse(&pair.primary_img, &pair.secondary_img);
    phase("images compared");
}
