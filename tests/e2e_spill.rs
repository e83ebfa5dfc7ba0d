//! Issue 11 item 5: the primary's ordered spill log (G4), with real agent
//! processes and the fault proxy throttling the replication link.
//!
//! Async mode with a small window (1 MiB / 16 writes) and writes faster than the
//! link: without a spill log the primary goes ahead and the secondary is in a
//! resync (not a prefix) most of the time (e2e_faults.rs, test (e)). With one,
//! the burst goes to the spill log and ships from it in order: the primary never
//! goes ahead, the secondary's consistent point keeps advancing and it is never
//! in a resync section; after the burst the pair converges with identical
//! images. A kill -9 of the primary with the log full of unshipped writes: the
//! restart marks them in the bitmap and resyncs them. A spill log too small for
//! the burst: the primary goes ahead only once it is full.
//! Each test prints its seed; rerun with `TANDEM_TEST_SEED=<seed>`.

mod common;
#[allow(dead_code)]
#[path = "common/faults.rs"]
mod faults;

use std::time::{Duration, Instant};

use faultproxy::{Dir, Fault};
use faults::{BLOCK_BYTES, LoadCfg, Model, Rig, RigOpts, counter, kill9, mib};

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 128 * MIB;

fn load_cfg(seed: u64, bytes_per_s: u64) -> LoadCfg {
    LoadCfg {
        seed,
        volume_blocks: SIZE_BYTES / BLOCK_BYTES,
        min_blocks: 1,
        max_blocks: 16,
        depth: 8,
        bytes_per_s,
        total_bytes: None,
    }
}

fn spill_opts(spill_size: &str) -> RigOpts {
    RigOpts::new("async", SIZE_BYTES).primary(&[
        "--queue-bytes-max",
        "1M",
        "--queue-writes-max",
        "16",
        "--spill-size",
        spill_size,
    ])
}

/// What the secondary's status said about its consistent image while polled.
#[derive(Default, Debug)]
struct Watch {
    polls: u64,
    /// Polls where the secondary had a consistent image and no resync was open.
    consistent: u64,
    /// Distinct consistent seqs seen (the point advanced).
    seqs: std::collections::BTreeSet<u64>,
    primary_ahead: bool,
}

fn watch(rig: &Rig, w: &mut Watch) {
    if let Some(s) = rig.secondary.status() {
        w.polls += 1;
        let cp = &s["consistent_point"];
        if cp.is_object() && cp["resync_open"] == false {
            w.consistent += 1;
            w.seqs.insert(cp["seq"].as_u64().unwrap_or(0));
        }
    }
    if let Some(p) = rig.primary.status() {
        w.primary_ahead |= p["peer"]["connection"] == "ahead";
    }
}

fn assert_no_failed_writes(model: &std::sync::Arc<std::sync::Mutex<Model>>, what: &str) {
    let m = model.lock().expect("model");
    assert_eq!(
        m.failed_writes, 0,
        "{what}: the primary must keep serving writes; last error: {:?}",
        m.last_error
    );
}

/// A burst 4× the link rate over a window of 1 MiB: spilled, never ahead; the
/// secondary stays consistent and its consistent point advances throughout.
#[test]
fn throttled_burst_spills_in_order_and_secondary_stays_consistent() {
    let seed = common::seed("spill burst");
    let mut rig = Rig::start(spill_opts("64M"), seed);
    let model = Model::shared();
    rig.proxy.set(Fault::Throttle {
        bytes_per_s: 2 * MIB,
        dir: Dir::Up,
    });
    let load = rig.start_load(load_cfg(seed, 8 * MIB), &model);
    let mut w = Watch::default();
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        watch(&rig, &mut w);
        std::thread::sleep(Duration::from_millis(100));
    }
    load.stop();
    let p = rig.primary.status().expect("primary status");
    let spilled = counter(&p, "spilled_bytes");
    let live = p["counters"]["spill_live_bytes"].as_u64().unwrap_or(0);
    // The backlog drains through the throttled link, still in order.
    let drain_deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < drain_deadline {
        watch(&rig, &mut w);
        std::thread::sleep(Duration::from_millis(100));
    }
    rig.proxy.clear();
    assert_no_failed_writes(&model, "spill burst");
    let s = rig.wait_converged("after the burst");
    let log = rig.primary.log_text();
    eprintln!(
        "spill burst: {} spilled, {} in the log at the end of the burst, {} ahead episodes; secondary consistent in {}/{} polls, {} distinct consistent points",
        mib(spilled),
        mib(live),
        counter(&s, "ahead_episodes"),
        w.consistent,
        w.polls,
        w.seqs.len()
    );
    rig.finish(&model);
    assert!(
        log.contains("spilling writes to the spill log"),
        "the window of 1 MiB must overflow at 8 MiB/s over a 2 MiB/s link"
    );
    assert!(
        log.contains("spill log drained"),
        "the episode's end is logged"
    );
    assert!(spilled > 4 * MIB, "spilled only {spilled} bytes");
    assert_eq!(
        counter(&s, "ahead_episodes"),
        0,
        "never ahead with room in the spill log"
    );
    assert!(!w.primary_ahead, "status never shows ahead");
    assert!(w.polls >= 20, "{w:?}");
    assert_eq!(
        w.consistent, w.polls,
        "the secondary is a consistent copy at every poll: {w:?}"
    );
    assert!(
        w.seqs.len() >= 5,
        "the consistent point advances through the burst: {w:?}"
    );
}

/// kill -9 of the primary while the spill log holds writes not yet shipped: the
/// restart marks them in the bitmap before anything else and resyncs them.
#[test]
fn primary_killed_with_a_full_spill_log_resyncs_the_spilled_writes() {
    let seed = common::seed("spill kill");
    let mut rig = Rig::start(spill_opts("64M"), seed);
    let model = Model::shared();
    rig.proxy.set(Fault::Throttle {
        bytes_per_s: MIB,
        dir: Dir::Up,
    });
    let load = rig.start_load(load_cfg(seed, 8 * MIB), &model);
    std::thread::sleep(Duration::from_secs(4));
    load.stop();
    let p = rig.primary.status().expect("primary status");
    let live = p["counters"]["spill_live_bytes"].as_u64().unwrap_or(0);
    assert!(
        live > 2 * MIB,
        "the spill log holds a backlog: {live} bytes"
    );
    kill9(&mut rig.primary);
    rig.proxy.clear();
    rig.restart_primary();
    assert_no_failed_writes(&model, "spill kill");
    rig.wait_converged("after the restart");
    let log = rig.primary.log_text();
    rig.finish(&model);
    assert!(
        log.contains("the spill log holds writes of the previous run"),
        "the restart reads the spill log"
    );
}

/// A spill log smaller than the burst: it fills, then (only then) the primary
/// goes ahead; the pair converges.
#[test]
fn a_full_spill_log_goes_ahead_then_converges() {
    let seed = common::seed("spill full");
    let mut rig = Rig::start(spill_opts("4M"), seed);
    let model = Model::shared();
    rig.proxy.set(Fault::Throttle {
        bytes_per_s: MIB,
        dir: Dir::Up,
    });
    let load = rig.start_load(load_cfg(seed, 8 * MIB), &model);
    std::thread::sleep(Duration::from_secs(4));
    load.stop();
    rig.proxy.clear();
    assert_no_failed_writes(&model, "spill full");
    let s = rig.wait_converged("after the burst");
    let log = rig.primary.log_text();
    rig.finish(&model);
    assert!(log.contains("spilling writes to the spill log"));
    assert!(
        log.contains("replication window (and spill log) full: going ahead"),
        "a 4 MiB spill log overflows"
    );
    assert!(counter(&s, "ahead_episodes") >= 1);
    assert!(counter(&s, "spill_episodes") >= 1);
}

/// Issue 11 (found by tools/bench.sh at 1 GiB with the defaults): a secondary
/// whose journal cannot stage a resync of the whole volume. Before protocol 5
/// the primary went ahead once its spill log was full; the resync that followed
/// was larger than the journal, the secondary refused it on every reconnect
/// (every ~3 s, forever) and kept an ever older image. Now the secondary
/// announces what it can stage and the primary goes ahead only within half of it
/// (the ahead budget): a request that would take the bitmap past it waits for
/// the resync pass, so no resync is ever larger than the secondary stages, and
/// the pair converges.
#[test]
fn a_secondary_that_cannot_stage_a_whole_volume_resync_is_never_left_behind() {
    let seed = common::seed("stage limit");
    const BIG: u64 = 512 * MIB;
    let opts = RigOpts::new("async", BIG)
        .primary(&[
            "--queue-bytes-max",
            "1M",
            "--queue-writes-max",
            "16",
            "--spill-size",
            "4M",
        ])
        // Stages 112 MiB: far less than the 512 MiB volume.
        .secondary(&["--journal-size", "128M"]);
    let mut rig = Rig::start(opts, seed);
    let model = Model::shared();
    rig.proxy.set(Fault::Throttle {
        bytes_per_s: MIB,
        dir: Dir::Up,
    });
    // Random writes of 4-64 KiB over the whole volume at up to 64 MiB/s: going
    // ahead for these 6 s dirties far more than the journal stages.
    let load = rig.start_load(
        LoadCfg {
            volume_blocks: BIG / BLOCK_BYTES,
            ..load_cfg(seed, 64 * MIB)
        },
        &model,
    );
    std::thread::sleep(Duration::from_secs(6));
    load.stop();
    rig.proxy.clear();
    assert_no_failed_writes(&model, "stage limit");
    let s = rig.wait_converged("after the burst");
    let primary_log = rig.primary.log_text();
    let secondary_log = rig.secondary.log_text();
    eprintln!(
        "stage limit: {} ahead episodes, {} spilled",
        counter(&s, "ahead_episodes"),
        mib(counter(&s, "spilled_bytes"))
    );
    rig.finish(&model);
    assert!(
        !secondary_log.contains("does not fit the journal"),
        "the secondary never had to refuse a resync"
    );
    assert!(
        counter(&s, "ahead_episodes") >= 1,
        "ahead within the budget"
    );
    assert!(
        primary_log.contains("writes to other blocks wait for the resync pass"),
        "reaching the ahead budget is logged, with its figures"
    );
}

/// An async pair in sync whose secondary has the smallest journal, `--journal-size
/// 128M`: it stages 28 MiB (7/8 of what is left after wrap padding and the room
/// kept for the largest frame).
struct SmallJournalPair {
    site: common::Site,
    p_img: std::path::PathBuf,
    s_img: std::path::PathBuf,
    repl: u16,
    nbd: u16,
    secondary: common::Agent,
    primary: common::Agent,
}

impl SmallJournalPair {
    fn start(size: u64) -> SmallJournalPair {
        SmallJournalPair::start_with(size, &common::NodeOpts::default())
    }

    fn start_with(size: u64, primary_opts: &common::NodeOpts) -> SmallJournalPair {
        let site = common::Site::new();
        let (p_img, s_img) = (site.path("primary.img"), site.path("secondary.img"));
        let (repl, nbd) = (common::free_port(), common::free_port());
        let small = common::NodeOpts {
            extra: vec!["--journal-size".into(), "128M".into()],
            ..Default::default()
        };
        let mut secondary = site.secondary("secondary", &s_img, size, repl, &small);
        secondary.wait_status("control socket", common::READY_TIMEOUT, |_| true);
        let mut primary = site.primary("primary", &p_img, size, "async", repl, nbd, primary_opts);
        primary.wait_status("in sync", common::READY_TIMEOUT, common::primary_in_sync);
        SmallJournalPair {
            site,
            p_img,
            s_img,
            repl,
            nbd,
            secondary,
            primary,
        }
    }
}

/// A resync larger than what the secondary's journal stages is refused at every
/// reconnect until an operator acts (grow journal-size, or allow an inconsistent
/// resync). The primary dials again every few seconds; each refusal used to cost
/// an ERROR line on the secondary and a WARN on the primary, every 5 s for as
/// long as nobody acted (720 of each an hour). Now each side logs the first
/// refusal in full and then a summary per interval (ratelog), the primary's status
/// says why it is not in sync, and once the operator allows the resync the pair
/// converges to identical images.
#[test]
fn a_refused_resync_is_logged_once_then_summarised_and_converges_once_allowed() {
    let seed = common::seed("refused resync");
    const SIZE: u64 = 256 * MIB;
    let SmallJournalPair {
        site,
        p_img,
        s_img,
        repl,
        nbd,
        mut secondary,
        mut primary,
    } = SmallJournalPair::start(SIZE);
    secondary.stop();
    // 160 MiB changed while apart: more than the journal stages.
    common::write_seeded(&format!("127.0.0.1:{nbd}"), 0, 160, MIB, seed);
    secondary.restart();
    let refusals = |a: &common::Agent| a.log_text().matches("does not fit the journal").count();
    common::wait_until("a first refusal", Duration::from_secs(60), || {
        refusals(&secondary) >= 1
    });
    // The primary dials again at least every 5 s: five or more refusals.
    std::thread::sleep(Duration::from_secs(25));
    let (on_secondary, on_primary) = (refusals(&secondary), refusals(&primary));
    eprintln!(
        "refused resync: {on_secondary} lines on the secondary, {on_primary} on the primary in 25 s"
    );
    assert!(
        on_secondary <= 2 && on_primary <= 2,
        "a repeated refusal is logged once, then summarised: {on_secondary} lines on the \
         secondary, {on_primary} on the primary"
    );
    let status = primary.status().expect("primary status");
    assert!(
        status.to_string().contains("does not fit the journal"),
        "the primary's status says why it is not in sync: {status}"
    );
    // The operator allows an inconsistent resync: the pair converges.
    secondary.stop();
    let allowed = common::NodeOpts {
        extra: vec![
            "--journal-size".into(),
            "128M".into(),
            "--resync-overflow".into(),
            "inconsistent".into(),
        ],
        ..Default::default()
    };
    let mut secondary = site.secondary("secondary-allowed", &s_img, SIZE, repl, &allowed);
    primary.wait_status(
        "in sync once allowed",
        Duration::from_secs(60),
        common::primary_in_sync,
    );
    primary.stop();
    secondary.stop();
    common::assert_same_file(&p_img, &s_img);
}

/// Found in session 22: a secondary with `--journal-size 128M` announced that it
/// stages 56 MiB, but the room its journal keeps free for the largest frame
/// (32 MiB) left a section about 32 MiB. A 40 MiB resync after an outage was
/// accepted, stopped with "the journal filled up during a resync", dropped and
/// resent on every reconnect, forever (9 times in 40 s). The secondary must
/// refuse it at once with the size it needs (the operator-action state), and
/// converge once the operator does what the refusal says: grow journal-size and
/// restart the node. (That remedy did not work until session 23: an existing
/// journal kept the size it was created with. Now the start resizes it,
/// keeping the records of the rollback window, and the resync is staged: the
/// secondary stays a consistent copy throughout.)
#[test]
fn a_resync_beyond_what_the_journal_really_stages_is_refused_at_once_not_retried() {
    let seed = common::seed("resync beyond the real stage size");
    const SIZE: u64 = 512 * MIB;
    let SmallJournalPair {
        site,
        p_img,
        s_img,
        repl,
        nbd,
        mut secondary,
        mut primary,
    } = SmallJournalPair::start(SIZE);
    let addr = format!("127.0.0.1:{nbd}");
    // 48 MiB streamed: they stay in the secondary's rollback window.
    common::write_seeded(&addr, 0, 48, MIB, seed);
    primary.wait_status("in sync", common::READY_TIMEOUT, common::primary_in_sync);
    secondary.stop();
    // 40 MiB changed while apart: under the 56 MiB once announced, over what fits.
    common::write_seeded(&addr, 100, 40, MIB, seed ^ 1);
    secondary.restart();
    let count = |a: &common::Agent, what: &str| a.log_text().matches(what).count();
    common::wait_until("a refusal", Duration::from_secs(60), || {
        count(&secondary, "does not fit the journal") >= 1
            || count(&secondary, "the journal filled up during a resync") >= 1
    });
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        count(&secondary, "the journal filled up during a resync"),
        0,
        "an accepted resync must fit: the secondary accepted one it could not finish"
    );
    assert!(count(&secondary, "does not fit the journal") >= 1);
    // The operator grows journal-size (no --resync-overflow): the restart
    // resizes the journal and the resync is staged in it.
    secondary.stop();
    let journal = {
        let mut p = s_img.clone().into_os_string();
        p.push(".tandem-meta.journal");
        std::path::PathBuf::from(p)
    };
    let journal_len = || std::fs::metadata(&journal).expect("the journal").len();
    assert_eq!(journal_len(), 8192 + 128 * MIB, "{}", journal.display());
    let grown = common::NodeOpts {
        extra: vec!["--journal-size".into(), "256M".into()],
        ..Default::default()
    };
    let mut secondary = site.secondary("secondary-grown", &s_img, SIZE, repl, &grown);
    common::wait_until("the journal resized", Duration::from_secs(30), || {
        count(&secondary, "journal resized") >= 1
    });
    assert_eq!(journal_len(), 8192 + 256 * MIB);
    primary.wait_status(
        "in sync once the journal is grown",
        Duration::from_secs(60),
        common::primary_in_sync,
    );
    assert_eq!(
        count(&secondary, "does not fit the journal"),
        0,
        "the grown journal stages the resync"
    );
    primary.stop();
    secondary.stop();
    common::assert_same_file(&p_img, &s_img);
}

/// Found in session 23: a resync's section holds everything shipped until it
/// ends, the resync and the client writes that join it, and the secondary cannot
/// copy any of it into its volume before the end. A small resync after a short
/// outage (16 MiB, the secondary stages 28 MiB) slowed by `--resync-rate`, with
/// a client writing 64 MiB meanwhile, filled the secondary's journal: "the
/// journal filled up during a resync", the session ended, and the next resync
/// (the 16 MiB plus the 64 MiB, now in the bitmap) was refused as too large. The
/// pair needed an operator for what was a short outage. Writes that would take
/// the section past what the secondary stages now wait for the section to end.
#[test]
fn client_writes_joining_a_resync_never_overflow_what_the_secondary_stages() {
    let seed = common::seed("writes joining a resync");
    const SIZE: u64 = 512 * MIB;
    let slow = common::NodeOpts {
        extra: vec!["--resync-rate".into(), "2M".into()],
        ..Default::default()
    };
    let SmallJournalPair {
        site: _site,
        p_img,
        s_img,
        nbd,
        mut secondary,
        mut primary,
        ..
    } = SmallJournalPair::start_with(SIZE, &slow);
    let addr = format!("127.0.0.1:{nbd}");
    let passes = |a: &common::Agent| a.log_text().matches("resync starts").count();
    let initial = passes(&primary);
    secondary.stop();
    common::write_seeded(&addr, 0, 16, MIB, seed);
    secondary.restart();
    common::wait_until("the resync starts", Duration::from_secs(60), || {
        passes(&primary) > initial
    });
    // 64 MiB while the 16 MiB resync runs at 2 MB/s (about 8 s).
    common::write_seeded(&addr, 100, 64, MIB, seed ^ 1);
    primary.wait_status(
        "in sync after the resync and the writes that joined it",
        Duration::from_secs(120),
        common::primary_in_sync,
    );
    let log = secondary.log_text();
    for refusal in [
        "the journal filled up during a resync",
        "does not fit the journal",
    ] {
        assert!(
            !log.contains(refusal),
            "the section stayed within what the secondary stages: {refusal:?} in its log"
        );
    }
    primary.stop();
    secondary.stop();
    common::assert_same_file(&p_img, &s_img);
}
