//! `tandem invalidate` as an administrator runs it (issue 12 item 4): a
//! secondary's data is discarded and every block copied again from its primary.
//! Blocks corrupted behind tandem's back on the secondary's image (where no
//! bitmap or generation can see them) are repaired only by that full resync; a
//! primary refuses; a secondary killed -9 after the invalidate, mid-resync, comes
//! back still owing the full resync (Inconsistent), never UpToDate.
//!
//! Not covered here: power loss between the superblock write and the journal's
//! truncation (engine/recovery.rs and engine/handshake.rs unit tests cover the
//! decision a restart then makes).

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use common::{assert_same_file, run_with_timeout, tandem_bin};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Overwrite 4 KiB blocks of an image file directly (behind the agent's back) with
/// a pattern, and make it durable.
fn corrupt_blocks(image: &std::path::Path, blocks: &[u64]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .expect("open the image");
    for &b in blocks {
        f.seek(SeekFrom::Start(b * BLOCK)).expect("seek");
        f.write_all(&[0xa5; BLOCK as usize]).expect("write");
    }
    f.sync_all().expect("fsync");
}

/// `tandem verify` against the primary: its exit code (0 identical, 1 differences).
fn verify(c: &Cluster) -> (i32, String) {
    let out = run_with_timeout(
        Command::new(tandem_bin())
            .args(["verify", "--control"])
            .arg(c.control(0)),
        Duration::from_secs(120),
    );
    (out.status.code().unwrap_or(-1), common::output_text(&out))
}

/// `tandem set resync-rate RATE` on the primary.
fn set_resync_rate(c: &Cluster, rate: &str) {
    let out = run_with_timeout(
        Command::new(tandem_bin())
            .args(["set", "resync-rate", rate, "--control"])
            .arg(c.control(0)),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
}

fn event_kinds(c: &Cluster, node: usize) -> Vec<String> {
    common::events_of(&c.control(node))
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn invalidate_on_a_secondary_repairs_blocks_corrupted_behind_its_back() {
    let mut c = Cluster::new("sync", 32 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    write_mib(&c.nbd_addr(0), 2, 6, 21);
    c.wait_synced(0, SYNC_TIMEOUT);
    // A clean stop copies the redo journal into the image file; then the file is
    // corrupted while the node is down (a disk's silent error, a stray dd):
    // never-written blocks and blocks of the data written above. No bitmap or
    // generation knows; only a comparison or a full copy can find them.
    c.stop(1);
    let corrupted = [0, 1, 300, 1000, 4095, 5000, 7000, 8191];
    corrupt_blocks(&c.image(1), &corrupted);
    c.start(1, "secondary");
    c.wait_synced(0, SYNC_TIMEOUT);
    let (code, text) = verify(&c);
    assert_eq!(code, 1, "verify does not see the corruption: {text}");

    // No terminal and no --yes: refused, nothing changed.
    let (ok, text) = c.ctl(1, "invalidate", &[]);
    assert!(!ok, "invalidate ran unconfirmed: {text}");
    assert!(
        text.contains("--yes") && text.contains("nothing changed"),
        "{text}"
    );
    let s = c.status(1);
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    assert_eq!(s["peer"]["connection"], "connected", "{s}");

    let out = c.ctl_ok(1, "invalidate", &["--yes"]);
    assert!(
        out.contains("invalidated") && out.contains("every block"),
        "{out}"
    );
    c.wait_synced(0, SYNC_TIMEOUT);
    let log = c.agent(1).log_text();
    assert!(
        log.contains("handshake decision: full resync: this node was invalidated"),
        "{log}"
    );
    let kinds = event_kinds(&c, 1);
    for k in ["invalidated", "invalidate-done", "disk-state"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event: {kinds:?}");
    }
    let (code, text) = verify(&c);
    assert_eq!(code, 0, "differences left after the full resync: {text}");
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

/// `tandem invalidate` on a terminal (a pty from script(1)) with `answer` typed
/// at the prompt: (success, what the terminal showed).
fn invalidate_on_a_terminal(c: &Cluster, node: usize, answer: &str) -> (bool, String) {
    use std::io::Write;
    let command = format!(
        "{} invalidate --control {}",
        tandem_bin(),
        c.control(node).display()
    );
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    // The prompt comes after a status query; typed ahead, the line waits.
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{answer}\n").as_bytes())
        .expect("type");
    let out = child.wait_with_output().expect("script");
    (out.status.success(), common::output_text(&out))
}

/// On a terminal, invalidate asks; anything but "yes" changes nothing.
#[test]
fn invalidate_asks_on_a_terminal_and_only_yes_goes_on() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    let (ok, text) = invalidate_on_a_terminal(&c, 1, "no");
    assert!(!ok, "{text}");
    assert!(
        text.contains("This discards the data of beta") && text.contains("not confirmed"),
        "{text}"
    );
    let s = c.status(1);
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    assert_eq!(s["peer"]["connection"], "connected", "{s}");
    let (ok, text) = invalidate_on_a_terminal(&c, 1, "yes");
    assert!(ok, "{text}");
    assert!(text.contains("beta invalidated"), "{text}");
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

#[test]
fn invalidate_on_a_primary_is_refused_and_changes_nothing() {
    let mut c = Cluster::new("sync", 16 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    let before = c.status(0);
    let (ok, text) = c.ctl(0, "invalidate", &["--yes"]);
    assert!(!ok, "a primary was invalidated: {text}");
    assert!(
        text.contains("refused")
            && text.contains("primary")
            && text.contains("nothing changed")
            && text.contains("tandem demote")
            && text.contains("tandem promote"),
        "{text}"
    );
    let s = c.status(0);
    assert_eq!(s["role"], "primary", "{s}");
    assert_eq!(s["generation"], before["generation"], "{s}");
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    assert_eq!(s["peer"]["connection"], "connected", "{s}");
    assert_eq!(c.status(1)["disk_state"], "UpToDate");
    c.stop(0);
    c.stop(1);
}

#[test]
fn a_secondary_killed_after_invalidate_comes_back_owing_the_full_resync() {
    let mut c = Cluster::new("sync", 48 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    write_mib(&c.nbd_addr(0), 0, 4, 22);
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(1);
    corrupt_blocks(&c.image(1), &[6000, 6001, 11000]);
    c.start(1, "secondary");
    c.wait_synced(0, SYNC_TIMEOUT);
    let (code, text) = verify(&c);
    assert_eq!(code, 1, "verify does not see the corruption: {text}");

    // 1 MiB/s over 48 MiB: the full resync takes most of a minute.
    set_resync_rate(&c, "1M");
    c.ctl_ok(1, "invalidate", &["--yes"]);
    // The primary reconnects and starts the full resync.
    let s = c
        .agent(0)
        .wait_status("full resync running", SYNC_TIMEOUT, |s| {
            s["peer"]["connection"] == "connected"
                && s["out_of_sync_bytes"].as_u64() > Some(40 * MIB)
        });
    eprintln!("full resync: {} bytes out of sync", s["out_of_sync_bytes"]);
    c.kill(1);
    c.start(1, "secondary");
    // Inconsistent from its first status on, through the resync.
    let s = c.status(1);
    assert_eq!(s["disk_state"], "Inconsistent", "came back as {s}");
    let s1 = c
        .agent(1)
        .wait_status("the full resync again", SYNC_TIMEOUT, |s| {
            s["peer"]["connection"] == "connected"
                && s["handshake"]
                    .as_str()
                    .is_some_and(|h| h.contains("full resync"))
        });
    assert!(
        s1["handshake"]
            .as_str()
            .is_some_and(|h| h.contains("invalidated")),
        "{s1}"
    );
    assert_eq!(s1["disk_state"], "Inconsistent", "{s1}");
    let s = c.status(0);
    eprintln!(
        "after the restart: {} bytes out of sync",
        s["out_of_sync_bytes"]
    );
    // Every block again: the whole volume is out of sync at the primary.
    assert!(
        s["out_of_sync_bytes"].as_u64() > Some(40 * MIB),
        "not a full resync after the restart: {s}"
    );
    set_resync_rate(&c, "0");
    c.wait_synced(0, SYNC_TIMEOUT);
    assert_eq!(c.status(1)["disk_state"], "UpToDate");
    let (code, text) = verify(&c);
    assert_eq!(code, 0, "{text}");
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

/// Write `n` MiB of `seed`-derived data from MiB `first` on.
fn write_mib(addr: &str, first: u64, n: u64, seed: u64) {
    common::write_seeded(addr, first, n, MIB, seed)
}
