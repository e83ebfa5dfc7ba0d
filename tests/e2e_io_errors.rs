//! Issue 9 item 5: a failed write poisons a node durably, on either side.
//!
//! The volume sits on a small tmpfs, so the write that would allocate past its
//! size fails with ENOSPC: a real I/O error from the kernel, not an injected one.
//! The node must stop acknowledging, say so in its status, persist the fact in its
//! superblock at once (a kill -9 right after does not forget it), refuse to be
//! served as primary after a restart, and, as a secondary, have every block
//! compared with the primary's before it counts as whole again.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Cleanup, NodeOpts, READY_TIMEOUT, Site, free_port, run_with_timeout};

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 64 * MIB;

/// A tmpfs of `size_mib` at `dir`, unmounted by `cleanup` even on failure.
fn small_fs(dir: &Path, size_mib: u64, cleanup: &mut Cleanup) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size_mib}M"), "tmpfs"])
        .arg(dir)
        .output()
        .expect("mount");
    assert!(out.status.success(), "mount tmpfs: {out:?}");
    cleanup.add_mount(dir);
}

fn remount(dir: &Path, size_mib: u64) {
    let out = Command::new("mount")
        .args(["-o", &format!("remount,size={size_mib}M")])
        .arg(dir)
        .output()
        .expect("mount");
    assert!(out.status.success(), "remount tmpfs: {out:?}");
}

/// Write `len` (qemu-io units) of a pattern at offset 0 through the export; true if qemu-io
/// reported every write as done.
fn write_through(uri: &str, len: &str) -> bool {
    let out = run_with_timeout(
        Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P 0x5a 0 {len}"), uri]),
        Duration::from_secs(120),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("qemu-io: {}", text.trim());
    out.status.success() && !text.contains("failed")
}

fn opts(extra: &[&str]) -> NodeOpts {
    NodeOpts {
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..NodeOpts::default()
    }
}

fn meta(site: &Site, label: &str) -> String {
    site.path(&format!("{label}.meta")).display().to_string()
}

#[test]
fn a_failed_write_poisons_the_primary_across_a_crash() {
    let site = Site::new();
    let mut cleanup = Cleanup::new();
    let small: PathBuf = site.path("small");
    small_fs(&small, 8, &mut cleanup);
    let (repl, nbd) = (free_port(), free_port());
    let mut secondary = site.secondary(
        "secondary",
        &site.path("secondary.img"),
        SIZE_BYTES,
        repl,
        &NodeOpts::default(),
    );
    secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
    let pmeta = meta(&site, "primary");
    let mut primary = site.primary(
        "primary",
        &small.join("primary.img"),
        SIZE_BYTES,
        "sync",
        repl,
        nbd,
        &opts(&["--meta", &pmeta]),
    );
    primary.wait_status("in sync", READY_TIMEOUT, common::primary_in_sync);
    let uri = format!("nbd://127.0.0.1:{nbd}");

    assert!(
        !write_through(&uri, "16M"),
        "16 MiB cannot fit on an 8 MiB filesystem: some write must fail"
    );
    let s = primary.wait_status("poisoned", Duration::from_secs(30), |s| {
        s["poisoned"] == true
    });
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("poisoned"),
        "status says why: {s}"
    );
    // Nothing is acknowledged after the failure, even a write that would fit.
    assert!(
        !write_through(&uri, "4k"),
        "a poisoned primary refuses every write"
    );

    // A crash right after: the flag was persisted when the write failed.
    primary.signal(libc::SIGKILL);
    primary.wait_exit(Duration::from_secs(30));
    remount(&small, 256);
    primary.restart();
    let status = primary.wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "a poisoned disk is not served as primary again without --force"
    );
    let log = primary.log_text();
    assert!(
        log.contains("poisoned"),
        "the refusal names the reason: {log}"
    );
    secondary.stop();
}

#[test]
fn a_failed_volume_write_poisons_the_secondary_across_a_crash() {
    let site = Site::new();
    let mut cleanup = Cleanup::new();
    let small: PathBuf = site.path("small");
    small_fs(&small, 8, &mut cleanup);
    let (repl, nbd) = (free_port(), free_port());
    let simg = small.join("secondary.img");
    let smeta = meta(&site, "secondary");
    let sjournal = site.path("secondary.journal").display().to_string();
    // Records are copied into the volume at once (no rollback window): the copy
    // is the write that fails.
    let mut secondary = site.secondary(
        "secondary",
        &simg,
        SIZE_BYTES,
        repl,
        &opts(&[
            "--meta",
            &smeta,
            "--journal",
            &sjournal,
            "--rollback-window-s",
            "0",
        ]),
    );
    secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
    let pimg = site.path("primary.img");
    let mut primary = site.primary(
        "primary",
        &pimg,
        SIZE_BYTES,
        "async",
        repl,
        nbd,
        &NodeOpts::default(),
    );
    // The first copy of an empty sparse volume allocates nothing (holes go as
    // zero chunks); 16 MiB of data copied into the volume does not fit.
    primary.wait_status("in sync", READY_TIMEOUT, common::primary_in_sync);
    let uri = format!("nbd://127.0.0.1:{nbd}");
    assert!(
        write_through(&uri, "16M"),
        "async: the primary's own writes succeed"
    );
    let s = secondary.wait_status("poisoned", Duration::from_secs(60), |s| {
        s["poisoned"] == true
    });
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("poisoned"),
        "status says why: {s}"
    );
    // It does not take a session it cannot serve: the primary is told why.
    primary.wait_status("refused", Duration::from_secs(30), |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("poisoned"))
    });

    // Killed while poisoned, restarted with room on its disk: it says so at
    // start, and the primary compares every block before it is whole again.
    secondary.signal(libc::SIGKILL);
    secondary.wait_exit(Duration::from_secs(30));
    remount(&small, 256);
    secondary.restart();
    secondary.wait_status("control socket after a restart", READY_TIMEOUT, |_| true);
    let s = secondary.wait_status("UpToDate, not poisoned", Duration::from_secs(120), |s| {
        s["disk_state"] == "UpToDate" && s["poisoned"] == false
    });
    eprintln!("secondary after the restart: {s}");
    assert!(
        secondary
            .log_text()
            .contains("failed a write or fdatasync before"),
        "the restart names the earlier failure"
    );
    let p = primary.wait_status("in sync", READY_TIMEOUT, common::primary_in_sync);
    // Every block is covered by the pass after the restart: the 16 MiB of data
    // compared by hash, the holes sent as zero chunks.
    assert!(
        p["counters"]["verified_bytes"].as_u64().unwrap_or(0) >= 16 * MIB,
        "the data compared after the failed write: {p}"
    );
    let blocks = SIZE_BYTES / 4096;
    assert!(
        primary
            .log_text()
            .matches(&format!("shipped_blocks={blocks}"))
            .count()
            >= 2,
        "the pass after the restart covers all {blocks} blocks"
    );
    primary.stop();
    secondary.stop();
    common::assert_same_file(&pimg, &simg);
}
