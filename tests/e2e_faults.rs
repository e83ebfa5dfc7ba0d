//! Issue 3 acceptance: faults between and on the nodes, with real agent
//! processes and the fault proxy (`tools/faultproxy`) on the replication link.
//!
//! Every test runs a seeded NBD write workload, injects a fault, heals or
//! restarts, waits for convergence (primary connected, nothing out of sync,
//! no resync, no lag; secondary UpToDate), stops both agents with SIGTERM
//! (exit 0), compares the images block by block, checks the primary against
//! the workload's model of the last acknowledged write of every block, and
//! checks that what recovery sent is bounded by what was written (the dirty
//! set), not by the volume. Each test prints its seed; rerun with
//! `TANDEM_TEST_SEED=<seed>`.

mod common;
#[path = "common/faults.rs"]
mod faults;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultproxy::{Dir, Fault};
use faults::{BLOCK_BYTES, LoadCfg, Model, Rig, RigOpts, counter, kill9, mib, progress};

const MIB: u64 = 1 << 20;
/// Volume of the load tests: large enough that "bounded by the dirty set"
/// means something, small enough for a fast initial sync of a sparse image.
const SIZE_BYTES: u64 = 128 * MIB;
/// Writes in flight when the link drops (depth × largest write) are resent
/// even though they completed before the measurement window: this bounds them.
const INFLIGHT_SLACK_BYTES: u64 = 2 * MIB;

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

/// Issued bytes (acknowledged, failed or in flight) of the log entries from `from` on.
fn issued_since(model: &std::sync::Arc<std::sync::Mutex<Model>>, from: usize) -> u64 {
    let m = model.lock().expect("model");
    m.log[from.min(m.log.len())..]
        .iter()
        .map(|w| w.len_bytes)
        .sum()
}

fn log_len(model: &std::sync::Arc<std::sync::Mutex<Model>>) -> usize {
    model.lock().expect("model").log.len()
}

fn assert_no_failed_writes(model: &std::sync::Arc<std::sync::Mutex<Model>>, what: &str) {
    let m = model.lock().expect("model");
    assert_eq!(
        m.failed_writes, 0,
        "{what}: the primary must keep serving writes; last error: {:?}",
        m.last_error
    );
}

/// Primary connected with no resync and nothing dirty (lag may be non-zero under load).
fn resynced(s: &serde_json::Value) -> bool {
    s["peer"]["connection"] == "connected" && s["resync"].is_null() && s["out_of_sync_bytes"] == 0
}

/// The byte bound of the acceptance criteria, exactly: a 256 MiB volume of random
/// data is in sync; the secondary is killed; 64 MiB of random 4 KiB writes land at
/// random offsets; the secondary restarts. Recovery must move only the dirty blocks:
/// resync bytes equal the distinct written blocks, and the proxy sees well under
/// 100 MiB go up the link.
#[test]
fn outage_with_64mib_of_random_writes_moves_well_under_100mib() {
    let seed = common::seed("byte bound");
    let size_bytes = 1024 * MIB;
    let mut opts = RigOpts::new("sync", size_bytes);
    opts.random_fill_seed = Some(seed ^ 0x5eed);
    let t0 = Instant::now();
    let mut rig = Rig::start(opts, seed);
    eprintln!(
        "initial sync of {} of random data: {:?}",
        mib(size_bytes),
        t0.elapsed()
    );
    let s0 = rig.primary.status().expect("primary status");
    assert!(
        counter(&s0, "resync_bytes") >= size_bytes,
        "the initial sync copies the random volume: {s0}"
    );

    kill9(&mut rig.secondary);
    rig.wait_disconnected("secondary loss noticed", Duration::from_secs(10));
    let model = Model::shared();
    let mut load = rig.start_load(
        LoadCfg {
            seed,
            volume_blocks: size_bytes / BLOCK_BYTES,
            min_blocks: 1,
            max_blocks: 1,
            depth: 32,
            bytes_per_s: 0,
            total_bytes: Some(64 * MIB),
        },
        &model,
    );
    load.join();
    assert_no_failed_writes(&model, "writes during the outage");
    let distinct_bytes = model.lock().expect("model").distinct_blocks() * BLOCK_BYTES;
    let p0 = rig.proxy.stats();
    let t1 = Instant::now();
    rig.restart_secondary();
    let s1 = rig.wait_converged("after the outage");
    let recovery = t1.elapsed();
    let p1 = rig.proxy.stats();
    let resync = counter(&s1, "resync_bytes") - counter(&s0, "resync_bytes");
    let wire_up = p1.bytes_up - p0.bytes_up;
    let wire_down = p1.bytes_down - p0.bytes_down;
    eprintln!(
        "byte bound: wrote 64 MiB ({} distinct) during the outage; recovery in {recovery:?}: resync {} , link up {}, down {}",
        mib(distinct_bytes),
        mib(resync),
        mib(wire_up),
        mib(wire_down)
    );
    rig.finish(&model);
    assert!(
        resync >= distinct_bytes,
        "every changed block must be resent: resync {resync} < distinct written {distinct_bytes}"
    );
    assert!(
        resync <= distinct_bytes + MIB,
        "resync must be bounded by the dirty set: {resync} bytes resent for {distinct_bytes} distinct bytes written"
    );
    assert!(
        wire_up < 100 * MIB,
        "64 MiB of random writes on a {} volume must move well under 100 MiB, moved {}",
        mib(size_bytes),
        mib(wire_up)
    );
}

/// The byte bound after a primary crash: like the test above, but the primary is
/// killed with SIGKILL after the 64 MiB were written while the secondary was down,
/// so its in-memory bitmap is lost. Recovery (persisted bitmap plus activity-log
/// extents compared by blake3) must still send only the blocks that differ.
#[test]
fn outage_then_primary_crash_moves_only_what_differs() {
    let seed = common::seed("byte bound after primary crash");
    let size_bytes = 256 * MIB;
    let mut opts = RigOpts::new("sync", size_bytes);
    opts.random_fill_seed = Some(seed ^ 0x5eed);
    let mut rig = Rig::start(opts, seed);
    kill9(&mut rig.secondary);
    rig.wait_disconnected("secondary loss noticed", Duration::from_secs(10));
    let model = Model::shared();
    let mut load = rig.start_load(
        LoadCfg {
            seed,
            volume_blocks: size_bytes / BLOCK_BYTES,
            min_blocks: 1,
            max_blocks: 1,
            depth: 32,
            bytes_per_s: 0,
            total_bytes: Some(64 * MIB),
        },
        &model,
    );
    load.join();
    assert_no_failed_writes(&model, "writes during the outage");
    let distinct_bytes = model.lock().expect("model").distinct_blocks() * BLOCK_BYTES;
    kill9(&mut rig.primary);
    let p0 = rig.proxy.stats();
    rig.restart_secondary();
    rig.secondary
        .wait_status("control socket", Duration::from_secs(30), |_| true);
    let t = Instant::now();
    rig.restart_primary();
    let s = rig.wait_converged("after the outage and the primary crash");
    let p1 = rig.proxy.stats();
    let resync = counter(&s, "resync_bytes");
    // The restarted primary's sessions: more than one when a session was cut
    // during the resync (the rig's 1 s peer timeout, on a loaded machine).
    let sessions = counter(&s, "sessions");
    let wire_up = p1.bytes_up - p0.bytes_up;
    let wire_down = p1.bytes_down - p0.bytes_down;
    eprintln!(
        "byte bound after primary crash: {} distinct written; recovery in {:?} over {sessions} session(s): resync {}, verified {:?}, link up {}, down {}",
        mib(distinct_bytes),
        t.elapsed(),
        mib(resync),
        s["counters"].get("verified_bytes"),
        mib(wire_up),
        mib(wire_down)
    );
    rig.finish(&model);
    assert!(
        resync >= distinct_bytes,
        "every changed block must be resent: resync {resync} < distinct written {distinct_bytes}"
    );
    // `resync_bytes` counts blocks read for resync. A cut session's blocks read
    // but not acknowledged are read again by the next one (seed
    // 3147694201130365594 under suite load: 97.6 MiB counted, 59.5 MiB up the
    // link), so the bound allows one more pass after each cut; the link bound
    // below holds either way.
    let passes = sessions.max(1);
    assert!(
        resync <= passes * distinct_bytes + MIB,
        "a crash must not turn into a copy: {resync} bytes resent for {distinct_bytes} distinct bytes written over {sessions} session(s)"
    );
    assert!(
        wire_up + wire_down < 100 * MIB,
        "recovery moved {} on the link for {} written",
        mib(wire_up + wire_down),
        mib(distinct_bytes)
    );
}

/// Minimal reproduction of the previous test's failure: a primary killed right
/// after the initial full sync, with no write at all, must not resend the volume.
#[test]
fn primary_crash_right_after_initial_sync_does_not_recopy_the_volume() {
    let seed = common::seed("crash after initial sync");
    let mut rig = Rig::start(RigOpts::new("sync", SIZE_BYTES), seed);
    // Let any post-sync bookkeeping run; nothing is written.
    std::thread::sleep(Duration::from_secs(2));
    kill9(&mut rig.primary);
    rig.restart_primary();
    let s = rig.wait_converged("after the crash");
    let resync = counter(&s, "resync_bytes");
    eprintln!("crash after initial sync: resync {}", mib(resync));
    rig.finish(&Model::shared());
    assert!(
        resync < SIZE_BYTES / 4,
        "a primary crash with nothing written since the initial sync resent {} of a {} volume: the bitmap persisted when the full sync started is never rewritten after it completes",
        mib(resync),
        mib(SIZE_BYTES)
    );
}

/// (a) The secondary is killed with SIGKILL and restarted, three times, while a
/// sync-mode workload keeps writing. Writes never fail; each resync is bounded by
/// what was written around the outage.
#[test]
fn secondary_kill9_three_times_under_load() {
    let seed = common::seed("secondary kill -9 x3");
    let mut rig = Rig::start(RigOpts::new("sync", SIZE_BYTES), seed);
    let model = Model::shared();
    let load = rig.start_load(load_cfg(seed, 4 * MIB), &model);
    let mut total_resync = 0;
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(800));
        let r0 = rig.primary.status().expect("primary status");
        let from = log_len(&model);
        kill9(&mut rig.secondary);
        rig.wait_disconnected("secondary loss noticed", Duration::from_secs(10));
        let (c_dis, _, _) = progress(&model);
        std::thread::sleep(Duration::from_millis(1500));
        let (c_after, _, _) = progress(&model);
        assert!(
            c_after > c_dis + 10,
            "round {round}: writes must complete without the secondary ({c_dis} -> {c_after})"
        );
        let t = Instant::now();
        rig.restart_secondary();
        let r1 = rig.primary.wait_status(
            "reconnected and resynced under load",
            faults::CONVERGE_TIMEOUT,
            resynced,
        );
        let resync = counter(&r1, "resync_bytes") - counter(&r0, "resync_bytes");
        let written = issued_since(&model, from);
        eprintln!(
            "round {round}: resync {} for {} written since the kill, in {:?}",
            mib(resync),
            mib(written),
            t.elapsed()
        );
        assert!(
            resync <= written + INFLIGHT_SLACK_BYTES,
            "round {round}: resync {resync} bytes exceeds what was written ({written}) plus the in-flight window"
        );
        total_resync += resync;
    }
    load.stop();
    assert_no_failed_writes(&model, "secondary kill -9 x3");
    rig.wait_converged("after the last restart");
    let (_, written, _) = progress(&model);
    eprintln!(
        "secondary kill x3: total resync {} of {} written",
        mib(total_resync),
        mib(written)
    );
    rig.finish(&model);
}

/// Run a seeded load against the primary, kill it with SIGKILL about a second
/// into the writes, stop the load and clear the proxy's fault; returns the
/// primary's status just before the kill.
fn kill9_primary_under_load(
    rig: &mut Rig,
    model: &Arc<Mutex<Model>>,
    seed: u64,
) -> serde_json::Value {
    let mut load = rig.start_load(load_cfg(seed, 8 * MIB), model);
    rig.primary
        .wait_status("writes under way", Duration::from_secs(30), |s| {
            counter(s, "client_writes") > 100
        });
    std::thread::sleep(Duration::from_millis(1000));
    let before = rig.primary.status().expect("primary status");
    kill9(&mut rig.primary);
    load.join();
    rig.proxy.clear();
    before
}

/// (b) The primary is killed with SIGKILL mid-write and restarted with the same
/// arguments, three times; the secondary stays up. Recovery (persisted bitmap plus
/// activity-log extents compared by hash) sends at most what was written since the
/// last convergence.
#[test]
fn primary_kill9_three_times() {
    let seed = common::seed("primary kill -9 x3");
    let opts = RigOpts::new("async", SIZE_BYTES).primary(&["--al-extents", "16"]);
    let mut rig = Rig::start(opts, seed);
    let model = Model::shared();
    let mut verified = Vec::new();
    for round in 0..3u64 {
        let from = log_len(&model);
        // Round 0 crashes a primary whose secondary keeps up; round 1 one whose
        // secondary lags behind a 1 MiB/s link (the async window holds megabytes
        // not yet durable there); round 2 one that is disconnected (blackhole) and
        // tracks every write in its in-memory bitmap only.
        match round {
            1 => rig.proxy.set(Fault::Throttle {
                bytes_per_s: MIB,
                dir: Dir::Up,
            }),
            2 => rig.proxy.set(Fault::Blackhole),
            _ => {}
        }
        let before = kill9_primary_under_load(&mut rig, &model, seed.wrapping_add(round));
        eprintln!(
            "round {round}: at the crash: connection {}, lag {}, out of sync {}",
            before["peer"]["connection"],
            mib(before["lag"]["bytes"].as_u64().unwrap_or(0)),
            mib(before["out_of_sync_bytes"].as_u64().unwrap_or(0))
        );
        let written = issued_since(&model, from);
        let p0 = rig.proxy.stats();
        let t = Instant::now();
        rig.restart_primary();
        let s = rig.wait_converged("after the primary restart");
        let p1 = rig.proxy.stats();
        // A new process: its counters count this recovery only.
        let resync = counter(&s, "resync_bytes");
        verified.push(s["counters"].get("verified_bytes").cloned());
        let wire = (p1.bytes_up - p0.bytes_up) + (p1.bytes_down - p0.bytes_down);
        eprintln!(
            "round {round}: {} written since the last convergence; recovery in {:?}: resync {}, link up+down {}",
            mib(written),
            t.elapsed(),
            mib(resync),
            mib(wire)
        );
        assert!(
            resync <= written + MIB,
            "round {round}: recovery resent {resync} bytes, more than the {written} bytes written since the pair last converged: {s}"
        );
        // Hash exchange: at most 16 extents of 4 MiB, a few dozen bytes per 4 KiB block.
        assert!(
            wire <= written + 4 * MIB,
            "round {round}: recovery moved {wire} bytes on the link for {written} bytes written"
        );
    }
    rig.finish(&model);
    // Crash recovery compares the activity-log extents by hash; the status must say
    // how much was compared (`counters.verified_bytes`), or an operator cannot tell
    // a hash-compare recovery from a copy.
    assert!(
        verified.iter().all(|v| v
            .as_ref()
            .is_some_and(|v| v.as_u64().is_some_and(|n| n > 0))),
        "after each primary crash the status must report counters.verified_bytes > 0; got {verified:?}"
    );
}

/// scale (issue 11): `--al-extent-size` is taken at each start. A primary killed
/// while its secondary lags behind a 1 MiB/s link restarts with another extent
/// size (64 MiB, then 1 MiB, then 64 MiB again): recovery covers the extents the
/// crashed run logged at the size that run logged them with, and the pair
/// converges to identical images every time.
#[test]
fn primary_kill9_across_al_extent_size_changes() {
    let seed = common::seed("primary kill -9 across al-extent-size changes");
    let size_arg = |opts: &mut RigOpts, size: &str| {
        opts.primary_extra.retain(|a| !a.ends_with('M'));
        opts.primary_extra.push(size.to_string());
    };
    let mut opts =
        RigOpts::new("async", SIZE_BYTES).primary(&["--al-extents", "16", "--al-extent-size"]);
    size_arg(&mut opts, "64M");
    let mut rig = Rig::start(opts, seed);
    let model = Model::shared();
    for (round, next) in ["1M", "64M"].into_iter().enumerate() {
        rig.proxy.set(Fault::Throttle {
            bytes_per_s: MIB,
            dir: Dir::Up,
        });
        let before = kill9_primary_under_load(&mut rig, &model, seed.wrapping_add(round as u64));
        eprintln!(
            "round {round}: killed with lag {}; restarting with --al-extent-size {next}",
            mib(before["lag"]["bytes"].as_u64().unwrap_or(0))
        );
        assert!(
            before["lag"]["bytes"].as_u64().unwrap_or(0) > 0,
            "round {round}: the secondary must lag at the crash for the test to mean anything: {before}"
        );
        size_arg(&mut rig.opts, next);
        rig.restart_primary();
        rig.wait_converged("after the primary restart with another extent size");
    }
    rig.finish(&model);
}

/// (c) A blackholed link (no RST, nothing forwarded) for 5 s under a sync-mode
/// load: the primary notices within the peer timeout, keeps completing writes,
/// and converges after the link heals.
#[test]
fn blackhole_5s_primary_keeps_serving_then_converges() {
    let seed = common::seed("blackhole");
    let mut rig = Rig::start(RigOpts::new("sync", SIZE_BYTES), seed);
    let model = Model::shared();
    let load = rig.start_load(load_cfg(seed, 4 * MIB), &model);
    std::thread::sleep(Duration::from_secs(1));
    let r0 = rig.primary.status().expect("primary status");
    let from = log_len(&model);
    let (c0, _, _) = progress(&model);
    let t = Instant::now();
    rig.proxy.set(Fault::Blackhole);
    rig.wait_disconnected("blackhole noticed", Duration::from_secs(5));
    let noticed = t.elapsed();
    std::thread::sleep(Duration::from_secs(5).saturating_sub(t.elapsed()));
    let (c1, b_during, _) = progress(&model);
    rig.proxy.clear();
    eprintln!(
        "blackhole: noticed after {noticed:?}; {} writes completed during the 5 s",
        c1 - c0
    );
    assert!(
        c1 - c0 >= 100,
        "the primary must keep serving during a blackhole: only {} writes completed in 5 s",
        c1 - c0
    );
    let t_heal = Instant::now();
    let r1 = rig.primary.wait_status(
        "reconnected and resynced after the blackhole",
        faults::CONVERGE_TIMEOUT,
        resynced,
    );
    let resync = counter(&r1, "resync_bytes") - counter(&r0, "resync_bytes");
    let written = issued_since(&model, from);
    eprintln!(
        "blackhole: healed and resynced in {:?}: resync {} for {} written since the fault ({} by the end of it)",
        t_heal.elapsed(),
        mib(resync),
        mib(written),
        mib(b_during)
    );
    load.stop();
    assert_no_failed_writes(&model, "blackhole");
    rig.wait_converged("after the blackhole");
    rig.finish(&model);
    assert!(
        resync <= written + INFLIGHT_SLACK_BYTES,
        "resync {resync} bytes exceeds what was written since the fault ({written})"
    );
}

/// (d) Every connection is reset after a few KB upstream, in the middle of
/// large write frames, for 3 s; then the link heals and the pair converges.
#[test]
fn reset_mid_frame_reconnects_and_converges() {
    let seed = common::seed("cut mid-frame");
    let mut rig = Rig::start(RigOpts::new("sync", SIZE_BYTES), seed);
    let model = Model::shared();
    let load = rig.start_load(
        LoadCfg {
            min_blocks: 64,
            max_blocks: 256,
            depth: 4,
            ..load_cfg(seed, 8 * MIB)
        },
        &model,
    );
    std::thread::sleep(Duration::from_secs(1));
    let r0 = rig.primary.status().expect("primary status");
    let from = log_len(&model);
    let p0 = rig.proxy.stats();
    rig.proxy.set(Fault::CutAfter {
        bytes: 6000,
        dir: Dir::Up,
    });
    std::thread::sleep(Duration::from_secs(3));
    rig.proxy.clear();
    let t_heal = Instant::now();
    rig.primary.wait_status(
        "reconnected and resynced after the cuts",
        faults::CONVERGE_TIMEOUT,
        resynced,
    );
    let healed_in = t_heal.elapsed();
    load.stop();
    assert_no_failed_writes(&model, "cut mid-frame");
    let s = rig.wait_converged("after the cuts");
    let p1 = rig.proxy.stats();
    let written = issued_since(&model, from);
    let wire_up = p1.bytes_up - p0.bytes_up;
    let sessions = counter(&s, "sessions") - counter(&r0, "sessions");
    eprintln!(
        "cut: {} connections cut, {sessions} new sessions, resynced {healed_in:?} after the heal; link up {} for {} written since the fault (resync counter {}, which counts frames handed to sessions that were then cut)",
        p1.cuts,
        mib(wire_up),
        mib(written),
        mib(counter(&s, "resync_bytes") - counter(&r0, "resync_bytes")),
    );
    rig.finish(&model);
    assert!(p1.cuts >= 1, "the fault must have cut a connection: {p1:?}");
    assert!(sessions >= 1, "the primary must have reconnected");
    // What reaches the secondary: each cut session carries at most 6000 bytes plus the
    // handshake; the healed session carries the dirty set (written since the fault plus
    // what was in flight at the first cut) and the writes streamed after the heal.
    let bound = written + INFLIGHT_SLACK_BYTES + sessions * 64 * 1024;
    assert!(
        wire_up <= bound,
        "recovery from cuts moved {wire_up} bytes up the link, more than the {bound} bytes written since the fault plus the in-flight window"
    );
}

/// (e) Async mode with a tiny window, the link throttled to 2 MiB/s below an
/// 8 MiB/s write rate: the window overflows and the primary goes ahead (shown in
/// `tandem status`), writes keep completing; after the throttle is cleared the
/// pair converges.
#[test]
fn throttled_link_overflows_async_window_goes_ahead_then_converges() {
    let seed = common::seed("throttle ahead");
    let opts = RigOpts::new("async", SIZE_BYTES).primary(&[
        "--queue-bytes-max",
        "1M",
        "--queue-writes-max",
        "16",
        // wan: no spill log, so that the full window goes ahead at once
        // (tests/e2e_spill.rs covers the spill log).
        "--spill-size",
        "0",
    ]);
    let mut rig = Rig::start(opts, seed);
    let model = Model::shared();
    let r0 = rig.primary.status().expect("primary status");
    let from = log_len(&model);
    rig.proxy.set(Fault::Throttle {
        bytes_per_s: 2 * MIB,
        dir: Dir::Up,
    });
    let load = rig.start_load(load_cfg(seed, 8 * MIB), &model);
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut status_ahead = false;
    let mut connections_seen = std::collections::BTreeSet::new();
    while Instant::now() < deadline {
        if let Some(s) = rig.primary.status() {
            let c = s["peer"]["connection"].as_str().unwrap_or("?").to_string();
            status_ahead |= c == "ahead";
            connections_seen.insert(c);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log_ahead = rig.primary.log_text().contains("going ahead");
    rig.proxy.clear();
    load.stop();
    assert_no_failed_writes(&model, "throttled async");
    let s = rig.wait_converged("after the throttle");
    let resync = counter(&s, "resync_bytes") - counter(&r0, "resync_bytes");
    let written = issued_since(&model, from);
    eprintln!(
        "throttle: log says ahead: {log_ahead}; status connections seen: {connections_seen:?}; resync {} for {} written",
        mib(resync),
        mib(written)
    );
    rig.finish(&model);
    assert!(
        log_ahead,
        "the window of 1 MiB / 16 writes must overflow at 8 MiB/s over a 2 MiB/s link"
    );
    assert!(
        resync <= written,
        "resync {resync} bytes exceeds what was written ({written})"
    );
    assert!(
        status_ahead,
        "the primary went ahead (its log says so) but `tandem status` never showed connection \"ahead\" (seen: {connections_seen:?})"
    );
}

/// (f) Bit flips in transit towards the secondary, through TLS: TLS rejects the
/// record (bad MAC) and the connection drops; nothing corrupt is applied.
#[test]
fn bit_flips_under_tls_are_never_applied() {
    bit_flips(false);
}

/// (f) Bit flips in transit on a plaintext link: tandem's own crc32s must catch
/// every one (`frames_rejected` > 0 on the secondary), and nothing corrupt is applied.
#[test]
fn bit_flips_in_plaintext_are_rejected_by_crc() {
    bit_flips(true);
}

fn bit_flips(plaintext: bool) {
    let seed = common::seed(if plaintext {
        "bit flips plaintext"
    } else {
        "bit flips tls"
    });
    let mut opts = RigOpts::new("sync", SIZE_BYTES);
    if plaintext {
        opts = opts.both(&["--danger-plaintext"]);
    }
    let mut rig = Rig::start(opts, seed);
    let model = Model::shared();
    let load = rig.start_load(load_cfg(seed, 4 * MIB), &model);
    std::thread::sleep(Duration::from_millis(500));
    let r0 = rig.primary.status().expect("primary status");
    rig.proxy.set(Fault::FlipBits {
        every_nth_chunk: 8,
        dir: Dir::Up,
    });
    std::thread::sleep(Duration::from_secs(4));
    rig.proxy.clear();
    load.stop();
    assert_no_failed_writes(&model, "bit flips");
    let s = rig.wait_converged("after the bit flips");
    let stats = rig.proxy.stats();
    let sec = rig.secondary.status().expect("secondary status");
    let sec_log = rig.secondary.log_text();
    eprintln!(
        "flips: {} bits flipped, secondary frames_rejected {}, primary sessions {} -> {}",
        stats.bits_flipped,
        counter(&sec, "frames_rejected"),
        counter(&r0, "sessions"),
        counter(&s, "sessions")
    );
    rig.finish(&model);
    assert!(stats.bits_flipped >= 1, "no bit was flipped: {stats:?}");
    assert!(
        counter(&s, "sessions") > counter(&r0, "sessions"),
        "a corrupted link must be dropped and redialled"
    );
    if plaintext {
        assert!(
            counter(&sec, "frames_rejected") >= 1,
            "plaintext: the secondary must reject corrupted frames by crc: {sec}"
        );
        assert!(
            sec_log.contains("bad frame"),
            "the secondary must log the bad frame"
        );
    }
}

/// (g) Both nodes are killed with SIGKILL under an async load, the secondary is
/// restarted first, then the primary; the pair converges with a bounded resync.
#[test]
fn both_killed_then_restarted_secondary_first() {
    let seed = common::seed("both kill -9");
    let opts = RigOpts::new("async", SIZE_BYTES).primary(&["--al-extents", "16"]);
    let mut rig = Rig::start(opts, seed);
    let model = Model::shared();
    let mut load = rig.start_load(load_cfg(seed, 8 * MIB), &model);
    rig.primary
        .wait_status("writes under way", Duration::from_secs(30), |s| {
            counter(s, "client_writes") > 200
        });
    kill9(&mut rig.secondary);
    kill9(&mut rig.primary);
    load.join();
    let written = issued_since(&model, 0);
    rig.restart_secondary();
    rig.secondary
        .wait_status("control socket", Duration::from_secs(30), |_| true);
    let t = Instant::now();
    rig.restart_primary();
    let s = rig.wait_converged("after both restarted");
    eprintln!(
        "both killed: {} written; recovery in {:?}: resync {}",
        mib(written),
        t.elapsed(),
        mib(counter(&s, "resync_bytes"))
    );
    rig.finish(&model);
    assert!(
        counter(&s, "resync_bytes") <= written + MIB,
        "recovery resent more than was ever written: {s}"
    );
}

/// G4 in async mode: a link slower than the writes must not slow the writers
/// while the replication window (64 MiB by default) has room: writes complete
/// after the local write, and the lag grows instead.
#[test]
fn async_slow_link_does_not_throttle_writers_while_window_has_room() {
    let seed = common::seed("async slow link");
    let mut rig = Rig::start(RigOpts::new("async", SIZE_BYTES), seed);
    let model = Model::shared();
    rig.proxy.set(Fault::Throttle {
        bytes_per_s: MIB,
        dir: Dir::Up,
    });
    let load = rig.start_load(load_cfg(seed, 8 * MIB), &model);
    let t = Instant::now();
    let mut max_lag = 0;
    while t.elapsed() < Duration::from_secs(4) {
        if let Some(s) = rig.primary.status() {
            max_lag = max_lag.max(s["lag"]["bytes"].as_u64().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, done_bytes, _) = progress(&model);
    let elapsed = t.elapsed();
    rig.proxy.clear();
    load.stop();
    assert_no_failed_writes(&model, "async over a slow link");
    rig.wait_converged("after the slow link");
    rig.finish(&model);
    let rate = done_bytes as f64 / elapsed.as_secs_f64();
    eprintln!(
        "async slow link: clients wrote {} in {elapsed:?} ({}/s) over a 1 MiB/s link; max lag {}",
        mib(done_bytes),
        mib(rate as u64),
        mib(max_lag)
    );
    assert!(
        rate >= 6.0 * MIB as f64,
        "async writers were slowed to {}/s (offered 8 MiB/s) by a 1 MiB/s link although the 64 MiB window never filled (max lag {})",
        mib(rate as u64),
        mib(max_lag)
    );
}

/// Issue 9 bug 4 (acceptance): an async switchover while the primary is ahead
/// loses no acknowledged write. The writes go ahead over a throttled link (the
/// secondary lacks them, the bitmap holds them); `tandem demote` must wait for
/// the resync that sends them, not only for the unacked queue, before it hands
/// over. The promoted secondary then holds every acknowledged write. (Before
/// the fix the drain ended with "lag_writes=0" and hundreds of MiB out of sync.)
#[test]
fn async_switchover_while_ahead_loses_no_acknowledged_write() {
    let seed = common::seed("async switchover while ahead");
    // Where the primary listens once it is demoted to secondary.
    let listen = format!("127.0.0.1:{}", common::free_port());
    let opts = RigOpts::new("async", SIZE_BYTES).primary(&[
        "--queue-bytes-max",
        "8M",
        "--queue-writes-max",
        "256",
        "--listen",
        &listen,
        // wan: no spill log, so that the full window goes ahead (the premise).
        "--spill-size",
        "0",
    ]);
    let mut rig = Rig::start(opts, seed);
    let model = Model::shared();
    rig.proxy.set(Fault::Throttle {
        bytes_per_s: MIB,
        dir: Dir::Up,
    });
    let load = rig.start_load(load_cfg(seed, 8 * MIB), &model);
    rig.primary
        .wait_status("ahead", Duration::from_secs(30), |s| {
            s["peer"]["connection"] == "ahead"
        });
    std::thread::sleep(Duration::from_secs(1));
    load.stop();
    assert_no_failed_writes(&model, "async while ahead");
    let s = rig.primary.status().expect("primary status");
    let behind = s["out_of_sync_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "demoting with {} out of sync, connection {}",
        mib(behind),
        s["peer"]["connection"]
    );
    assert!(
        behind > 0 && s["peer"]["connection"] == "ahead",
        "the workload did not leave the primary ahead: {s}"
    );

    // The planned switchover, still over the throttled link.
    let t = Instant::now();
    let out = common::run_ok(
        std::process::Command::new(common::tandem_bin())
            .args(["demote", "--timeout", "120", "--control"])
            .arg(&rig.primary.control),
        Duration::from_secs(180),
    );
    eprintln!("demote after {:?}: {}", t.elapsed(), out.trim());
    assert!(out.contains("peer holds every write"), "{out}");
    rig.proxy.clear();
    // The secondary (a standalone `tandem secondary`, promoted by restarting it
    // as primary in production) holds the handed-over image; stopping it copies
    // its journal into its volume.
    let s = rig.secondary.status().expect("secondary status");
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    rig.secondary.stop();
    rig.primary.stop();
    // Every acknowledged write is on the secondary.
    model.lock().expect("model").verify(&rig.secondary_img);
    common::assert_same_file(&rig.primary_img, &rig.secondary_img);
}

/// Issue 9 finding 12, with a relay that cuts once: the first session of a new
/// pair drops after the secondary's Welcome (it has taken the volume's identity)
/// and before the ResyncStart. The pair must start the first copy over when the
/// link returns, not refuse each other for sharing no data generation until an
/// operator runs `resolve --discard-local`.
///
/// Every chunk towards the secondary is held 500 ms (the TLS handshake still fits
/// in the connect timeout), so after the Welcome the primary's ResyncStart is
/// still in the relay when the connections are reset.
#[test]
fn a_first_session_cut_after_the_welcome_starts_the_first_copy_over() {
    let seed = common::seed("cut after welcome");
    let mut rig = Rig::launch(
        RigOpts::new("sync", SIZE_BYTES),
        seed,
        Some(Fault::Delay {
            ms: 500,
            jitter_ms: 0,
            dir: Dir::Up,
        }),
    );
    common::wait_until(
        "the secondary takes the volume's identity",
        Duration::from_secs(60),
        || {
            rig.secondary
                .log_text()
                .contains("adopted the primary's volume identity")
        },
    );
    rig.proxy.set(Fault::Reset { reject_new: false });
    rig.proxy.clear();
    assert!(
        !rig.secondary
            .log_text()
            .contains("primary announces a resync"),
        "the cut came after the ResyncStart: this run did not test the window"
    );
    let s = rig.wait_converged("after the cut");
    eprintln!("after the cut: {}", s["handshake"]);
    assert!(
        !rig.secondary
            .log_text()
            .contains("share no data generation"),
        "the secondary refused its own primary after the cut"
    );
    rig.finish(&Model::shared());
}
