//! Split brain (G8): both nodes written while apart. The reconnect is refused with
//! an error naming both generations and how many blocks each side changed; each
//! policy, and the manual `tandem resolve --discard-local`, then converges to the
//! winner's data, and the loser's report lists exactly the ranges it had written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use common::{assert_same_file, run_ok};

const SIZE: u64 = 32 << 20;
const TIMEOUT: Duration = Duration::from_secs(90);
const ALPHA: usize = 0;
const BETA: usize = 1;

/// Ranges (offset, length) each side writes while apart: block aligned, not adjacent.
const ALPHA_WRITES: [(u64, u64); 3] = [(1 << 20, 64 << 10), (5 << 20, 4096), (20 << 20, 8192)];
const BETA_WRITES: [(u64, u64); 2] = [(2 << 20, 128 << 10), (9 << 20, 4096)];

fn nbd_write(uri: &str, offset: u64, len: u64, pattern: u8) {
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", uri, "-c"])
            .arg(format!("write -P {pattern} {offset} {len}")),
        Duration::from_secs(60),
    );
}

/// alpha primary and beta secondary, synced over a base pattern; then beta stops,
/// alpha writes ALPHA_WRITES, alpha stops, beta is promoted and writes BETA_WRITES.
/// Both run afterwards: beta primary, alpha not running.
fn diverge(resource_extra: &str) -> Cluster {
    let mut c = Cluster::new("sync", SIZE, resource_extra);
    c.start(BETA, "secondary");
    c.start(ALPHA, "primary");
    c.wait_synced(ALPHA, TIMEOUT);
    nbd_write(&c.nbd_uri(ALPHA), 0, SIZE, 0x11);
    c.wait_synced(ALPHA, TIMEOUT);
    c.stop(BETA);
    for (off, len) in ALPHA_WRITES {
        nbd_write(&c.nbd_uri(ALPHA), off, len, 0xaa);
    }
    c.stop(ALPHA);
    c.start(BETA, "secondary");
    let out = c.ctl_ok(BETA, "promote", &[]);
    assert!(out.contains("now primary"), "{out}");
    for (off, len) in BETA_WRITES {
        nbd_write(&c.nbd_uri(BETA), off, len, 0xbb);
    }
    c
}

fn blocks(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|r| r.1 / 4096).sum()
}

/// The loser's report: its path and its `changed OFFSET LEN` lines.
fn report_of(meta: &Path) -> (PathBuf, Vec<(u64, u64)>) {
    let dir = meta.parent().expect("dir");
    let prefix = format!(
        "{}.split-brain-",
        meta.file_name().expect("name").to_string_lossy()
    );
    let path = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with(&prefix) && n.to_string_lossy().ends_with(".txt")
            })
        })
        .unwrap_or_else(|| panic!("no split-brain report beside {}", meta.display()));
    let text = std::fs::read_to_string(&path).expect("read report");
    let changed = text
        .lines()
        .filter_map(|l| l.strip_prefix("changed "))
        .map(|l| {
            let mut it = l
                .split_whitespace()
                .map(|n| n.parse::<u64>().expect("number"));
            (it.next().expect("offset"), it.next().expect("length"))
        })
        .collect();
    (path, changed)
}

/// After the loser was resynced from the winner: identical images holding the
/// winner's writes, and the loser's report lists exactly its own writes.
fn assert_converged(
    c: &mut Cluster,
    winner: usize,
    loser_writes: &[(u64, u64)],
    winner_writes: &[(u64, u64)],
    winner_pattern: u8,
) {
    let loser = 1 - winner;
    c.wait_synced(winner, TIMEOUT);
    let (path, changed) = report_of(&c.meta(loser));
    assert_eq!(
        changed,
        loser_writes,
        "report {} lists other ranges",
        path.display()
    );
    c.stop(winner);
    c.stop(loser);
    assert_same_file(&c.image(ALPHA), &c.image(BETA));
    let image = std::fs::read(c.image(winner)).expect("read");
    for &(off, len) in winner_writes {
        assert!(
            image[off as usize..(off + len) as usize]
                .iter()
                .all(|&b| b == winner_pattern)
        );
    }
    for &(off, len) in loser_writes {
        assert!(
            image[off as usize..(off + len) as usize]
                .iter()
                .all(|&b| b == 0x11),
            "the loser's write at {off} survived"
        );
    }
}

#[test]
fn split_brain_is_refused_with_both_generations_then_resolved_by_hand() {
    let mut c = diverge("");
    // alpha comes back as primary: two primaries, each refuses the other.
    c.start(ALPHA, "primary");
    let s = c
        .agent(ALPHA)
        .wait_status("refused as a second primary", TIMEOUT, |s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("both nodes are primary"))
        });
    assert!(
        s["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("split brain"),
        "{s}"
    );
    // beta steps down; alpha's next attempt meets a secondary that refuses it.
    // beta's writes are on no peer: a demotion then needs --force (issue 9).
    c.ctl_ok(BETA, "demote", &["--timeout", "1", "--force"]);
    let s = c
        .agent(BETA)
        .wait_status("split brain refused", TIMEOUT, |s| {
            s["handshake"]
                .as_str()
                .is_some_and(|h| h.contains("split brain"))
        });
    let h = s["handshake"].as_str().expect("handshake").to_string();
    let alpha_gen = c.status(ALPHA)["generation"]
        .as_str()
        .expect("gen")
        .to_string();
    let beta_gen = s["generation"].as_str().expect("gen").to_string();
    assert!(h.starts_with("refused"), "{h}");
    assert!(h.contains(&alpha_gen) && h.contains(&beta_gen), "{h}");
    assert!(
        h.contains(&format!("{} blocks", blocks(&ALPHA_WRITES)))
            && h.contains(&format!("{} blocks", blocks(&BETA_WRITES))),
        "{h}"
    );
    assert_eq!(c.status(ALPHA)["peer"]["connection"], "connecting");
    // The manual resolution on the losing node.
    let out = c.ctl_ok(BETA, "resolve", &["--discard-local"]);
    assert!(
        out.contains(&format!("{} changed blocks", blocks(&BETA_WRITES))),
        "{out}"
    );
    assert_converged(&mut c, ALPHA, &BETA_WRITES, &ALPHA_WRITES, 0xaa);
}

/// Reconnect with beta (the younger primary) demoted to secondary (with --force:
/// its writes are on no peer).
fn reconnect_with_beta_secondary(c: &mut Cluster) {
    c.ctl_ok(BETA, "demote", &["--timeout", "1", "--force"]);
    c.start(ALPHA, "primary");
}

#[test]
fn policy_discard_younger_primary() {
    let mut c = diverge("split-brain-policy = \"discard-younger-primary\"");
    reconnect_with_beta_secondary(&mut c);
    assert_converged(&mut c, ALPHA, &BETA_WRITES, &ALPHA_WRITES, 0xaa);
}

#[test]
fn policy_discard_least_changes() {
    // beta changed fewer blocks (33) than alpha (19)? No: alpha 16+1+2 = 19, beta
    // 32+1 = 33, so alpha has the least changes and loses; it must be the secondary.
    let mut c = diverge("split-brain-policy = \"discard-least-changes\"");
    assert!(blocks(&ALPHA_WRITES) < blocks(&BETA_WRITES));
    c.start(ALPHA, "secondary");
    assert_converged(&mut c, BETA, &ALPHA_WRITES, &BETA_WRITES, 0xbb);
}

#[test]
fn policy_discard_node_never_discards_a_serving_primary() {
    let mut c = diverge("split-brain-policy = \"discard-node alpha\"");
    // alpha is the named loser, but while it is primary its data is not discarded.
    reconnect_with_beta_secondary(&mut c);
    let s = c
        .agent(BETA)
        .wait_status("refused: the loser is primary", TIMEOUT, |s| {
            s["handshake"]
                .as_str()
                .is_some_and(|h| h.contains("never discarded"))
        });
    assert!(
        s["handshake"]
            .as_str()
            .unwrap_or_default()
            .contains("demote alpha"),
        "{s}"
    );
    // As the policy says: alpha steps down, beta takes over, alpha is resynced.
    c.ctl_ok(ALPHA, "demote", &["--timeout", "1", "--force"]);
    c.ctl_ok(BETA, "promote", &[]);
    assert_converged(&mut c, BETA, &ALPHA_WRITES, &BETA_WRITES, 0xbb);
}
