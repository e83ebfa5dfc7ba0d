//! Promotion in the middle of a resync (issue 10, item 3): the secondary goes
//! back to its last consistent image, needs no --force, and says where it
//! stands and how far behind the old primary's newest write that is.
//!
//! Async mode: 48 MiB of random data written while the secondary is away are
//! resynced when it is back, for seconds. The primary is killed
//! (SIGKILL) while the secondary reports the resync open; the secondary is
//! promoted without --force.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::run_ok;

const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
const ALPHA: usize = 0;
const BETA: usize = 1;

#[test]
fn a_promotion_mid_resync_goes_back_to_the_consistent_image_and_says_how_far_behind() {
    let mut c = Cluster::new("async", 64 << 20, "journal-size = \"256M\"");
    c.start(BETA, "secondary");
    c.start(ALPHA, "primary");
    c.wait_synced(ALPHA, SYNC_TIMEOUT);
    // Streamed writes stay in the secondary's journal (its rollback window), and a
    // crash keeps them there; then it is away while 48 MiB change; back, they
    // are resynced.
    let uri = c.nbd_uri(ALPHA);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush"])
            .arg(&uri),
        SYNC_TIMEOUT,
    );
    c.wait_synced(ALPHA, SYNC_TIMEOUT);
    c.kill(BETA);
    // Random bytes: the resync rate counts bytes on the wire, after compression.
    let data = c.site.path("random.bin");
    common::write_random_file(&data, 48 << 20, common::seed("dr-promote"));
    run_ok(Command::new("nbdcopy").arg(&data).arg(&uri), SYNC_TIMEOUT);
    c.start(BETA, "secondary");
    let s = c
        .agent(BETA)
        .wait_status("a resync open on the secondary", SYNC_TIMEOUT, |s| {
            s["consistent_point"]["resync_open"] == true
                && s["consistent_point"]["behind_s"].as_f64() > Some(0.0)
        });
    eprintln!("mid-resync: {}", s["consistent_point"]);
    c.kill(ALPHA);
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let before = loop {
        let s = c.status(BETA);
        if s["peer"]["connection"] != "connected" {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary never saw the primary gone"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        before["consistent_point"]["resync_open"], true,
        "killed mid-resync: {before}"
    );
    assert_eq!(before["disk_state"], "UpToDate", "{before}");
    let said = c.ctl_ok(BETA, "promote", &[]);
    eprintln!("promote: {said}");
    assert!(
        said.contains("at the consistent point of")
            && said.contains("s behind the newest write received"),
        "the promotion says where it stands and how far behind: {said}"
    );
    c.agent(BETA)
        .wait_status("primary", SYNC_TIMEOUT, |s| s["role"] == "primary");
    c.stop(BETA);
}
