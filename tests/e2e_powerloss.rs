//! Power loss of a node's disk, with real processes (issue 9, item 3).
//!
//! Each node's volume image and metadata live on ext4 over an nbdkit export whose
//! cache filter (writeback) keeps every write volatile until a flush reaches it;
//! cutting a node's power SIGKILLs that nbdkit with the node's agent (and, on the
//! primary, the application). See tests/powerloss_support/ and
//! tools/powerloss/README.md.
//!
//! - `power_cut_device_loses_unflushed_writes_and_keeps_flushed_ones`: the
//!   self-test of the harness: through the whole node stack, a write that reached
//!   the device without a flush is gone after a cut, a flushed one survives.
//! - `power_cut_{primary,secondary,both}_*`: seeded trials (CI scale: a 1 GiB
//!   volume, 16 activity-log extents so that extents retire during the
//!   workload); `TANDEM_TEST_SEED` replays the first trial of a test.
//! - `powerloss_campaign` (ignored; `tools/powerloss/run.sh`): many trials per
//!   role and mode on a 16 GiB sparse volume, figures in a JSON-lines file.
//!
//! Not covered here: torn writes inside one 4 KiB block (the cache filter keeps
//! or loses whole 4 KiB blocks), a disk that reorders or loses *flushed* writes,
//! and I/O errors (issue 9, item 5).

mod common;
mod powerloss_support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use powerloss_support::disk::PowerDisk;
use powerloss_support::{Role, TrialConfig, certs, run_trial};

const GIB: u64 = 1 << 30;

/// Distinctive 64 KiB contents for the self-test.
fn marked(tag: &[u8; 8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 << 10);
    let mut i = 0u64;
    while v.len() < 64 << 10 {
        v.extend_from_slice(b"PWRLOSS:");
        v.extend_from_slice(tag);
        v.extend_from_slice(&i.to_le_bytes());
        v.extend_from_slice(&[0xA5; 8]);
        i += 1;
    }
    v
}

/// Does the (sparse) file contain `needle` (at a 32-byte aligned position)?
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let mut f = fs::File::open(path).expect("open backing file");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read backing file");
        if n == 0 {
            return false;
        }
        if buf[..n].chunks(32).any(|c| c.starts_with(needle)) {
            return true;
        }
    }
}

fn sync_file_range_write(f: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes an fd we keep open and integers.
    let rc = unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            0,
            0,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    assert_eq!(
        rc,
        0,
        "sync_file_range: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn power_cut_device_loses_unflushed_writes_and_keeps_flushed_ones() {
    let dir = tempfile::Builder::new()
        .prefix("tandem-powerloss-selftest-")
        .tempdir()
        .expect("tempdir");
    let mut disk = PowerDisk::create(dir.path(), "selftest", 2 * GIB);
    // No journal commit (and so no flush) of its own during the test: every
    // flush that reaches the device below is one this test asked for.
    disk.remount_with("commit=300");
    let backing = dir.path().join("disk-selftest/backing.img");
    let (kept, in_place_old) = (marked(b"KEPT0001"), marked(b"OLDDATA1"));
    // 1. A file written and fsync'd: on the backing file at once.
    let mut f = fs::File::create(disk.mnt.join("kept")).expect("create");
    f.write_all(&kept).expect("write");
    f.sync_all().expect("fsync");
    assert!(
        file_contains(&backing, &kept[..32]),
        "an fsync'd write did not reach the backing file"
    );
    // 2. A file fsync'd, then overwritten in place and written back to the device
    //    (sync_file_range: no flush): the device has the new data, the backing
    //    file still the old. 3. A new file never synced: only in the page cache.
    //    Then the cut. A flush from outside this test (sync(2) from any process on
    //    the machine flushes every filesystem, this one included) persists the
    //    overwrite as a real disk would; then the attempt is repeated with new
    //    bytes, at most 5 times, each one reported.
    let mut g = fs::File::create(disk.mnt.join("in-place")).expect("create");
    g.write_all(&in_place_old).expect("write");
    g.sync_all().expect("fsync");
    drop(g);
    let mut durable = in_place_old.clone();
    let mut lost_attempts = 0;
    for attempt in 0..5u8 {
        let in_place_new = marked(&[b'N', b'E', b'W', b'D', b'A', b'T', b'A', b'0' + attempt]);
        let lost = marked(&[b'L', b'O', b'S', b'T', b'0', b'0', b'0', b'0' + attempt]);
        let g = fs::OpenOptions::new()
            .write(true)
            .open(disk.mnt.join("in-place"))
            .expect("open");
        g.write_all_at(&in_place_new, 0).expect("overwrite");
        sync_file_range_write(&g);
        drop(g);
        let early = file_contains(&backing, &in_place_new[..32]);
        // The device itself (through the cache) already returns the new data.
        let mut dev_view = vec![0u8; 32];
        let probe = fs::File::open(disk.mnt.join("in-place")).expect("open");
        probe.read_exact_at(&mut dev_view, 0).expect("read");
        assert_eq!(dev_view, in_place_new[..32]);
        drop(probe);
        fs::write(disk.mnt.join(format!("lost-{attempt}")), &lost).expect("write");
        disk.cut(&[]);
        disk.restore();
        disk.remount_with("commit=300");
        assert_eq!(
            fs::read(disk.mnt.join("kept")).expect("the fsync'd file survives"),
            kept
        );
        let now = fs::read(disk.mnt.join("in-place")).expect("the in-place file survives");
        if early || now == in_place_new {
            eprintln!(
                "self-test attempt {attempt}: the unflushed overwrite was persisted by a flush from outside the test (in the backing file before the cut: {early}); again"
            );
            assert_eq!(now, in_place_new, "a flushed overwrite was lost");
            durable = in_place_new;
            continue;
        }
        assert_eq!(
            now, durable,
            "the unflushed overwrite must be lost and the last flushed contents kept"
        );
        let lost_now = fs::read(disk.mnt.join(format!("lost-{attempt}"))).unwrap_or_default();
        assert_ne!(lost_now, lost, "an unsynced new file survived a power cut");
        lost_attempts += 1;
        break;
    }
    assert_eq!(
        lost_attempts, 1,
        "in 5 attempts an unflushed overwrite never stayed unflushed until the cut"
    );
    let in_place_new = marked(b"NEWDATAF");

    // 4. Flushed with fdatasync this time: it survives.
    let g = fs::OpenOptions::new()
        .write(true)
        .open(disk.mnt.join("in-place"))
        .expect("open");
    g.write_all_at(&in_place_new, 0).expect("overwrite");
    g.sync_data().expect("fdatasync");
    drop(g);
    disk.cut(&[]);
    disk.restore();
    assert_eq!(
        fs::read(disk.mnt.join("in-place")).expect("read"),
        in_place_new,
        "an fdatasync'd overwrite was lost"
    );
    disk.check_clean();
    disk.power_off_clean();
}

/// `trials` seeded trials of one role and mode at CI scale (1 GiB volume, 16
/// activity-log extents, so extents retire during the workload). The seeds come
/// from the test's seed; every failed check of every trial is reported.
fn ci_trials(role: Role, mode: &str, test: &str, trials: u32) {
    let seed = common::seed(test);
    let dir = tempfile::Builder::new()
        .prefix("tandem-powerloss-certs-")
        .tempdir()
        .expect("tempdir");
    let certs = certs(dir.path());
    let mut rng = common::TestRng::new(seed);
    let mut failed = Vec::new();
    for i in 0..trials {
        let cfg = TrialConfig {
            role,
            mode: mode.into(),
            volume_bytes: GIB,
            al_extents: 16,
            al_extent_size: None,
            al_extent_size_after: None,
            // The first trial replays from the test's seed itself.
            seed: if i == 0 { seed } else { rng.next_u64() },
            cut_after_ms: (2500, 7000),
            converge_timeout: Duration::from_secs(150),
            cut_in_spread: true,
        };
        let report = run_trial(&cfg, &certs);
        if !report.findings.is_empty() {
            failed.push(report.summary());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {trials} power-loss trial(s) failed (test seed {seed}):\n{}",
        failed.len(),
        failed.join("\n")
    );
}

// Bug-hunting odds (measured at 134a6c6, debug build): with plain random cut
// instants a primary cut diverged in about half the trials; the CI trials cut
// while an O_DIRECT job runs (`cut_in_spread`), and the primary and both-cut
// tests run two trials each.

#[test]
fn power_cut_primary_sync_failover_converges_and_fscks_clean() {
    ci_trials(Role::Primary, "sync", "power_cut_primary_sync", 2);
}

#[test]
fn power_cut_secondary_async_restarts_consistent_and_converges() {
    ci_trials(Role::Secondary, "async", "power_cut_secondary_async", 1);
}

#[test]
fn power_cut_both_sync_converges_and_fscks_clean() {
    ci_trials(Role::Both, "sync", "power_cut_both_sync", 2);
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| panic!("bad size {s:?}"))
        * mul
}

/// The long run: `POWERLOSS_TRIALS` trials per role and mode (interleaved), on a
/// `POWERLOSS_SIZE` sparse volume; see tools/powerloss/run.sh for every variable.
#[test]
#[ignore = "long campaign: run with tools/powerloss/run.sh"]
fn powerloss_campaign() {
    let trials: u64 = env_or("POWERLOSS_TRIALS", "50")
        .parse()
        .expect("POWERLOSS_TRIALS");
    let roles: Vec<Role> = env_or("POWERLOSS_ROLES", "primary,secondary,both")
        .split(',')
        .map(Role::parse)
        .collect();
    let modes: Vec<String> = env_or("POWERLOSS_MODES", "sync,async")
        .split(',')
        .map(str::to_owned)
        .collect();
    let volume_bytes = parse_size(&env_or("POWERLOSS_SIZE", "16G"));
    let al_extents: u32 = env_or("POWERLOSS_AL_EXTENTS", "32")
        .parse()
        .expect("AL_EXTENTS");
    let al_extent_size = std::env::var("POWERLOSS_AL_EXTENT_SIZE").ok();
    let al_extent_size_after = std::env::var("POWERLOSS_AL_EXTENT_SIZE_AFTER").ok();
    let cut = env_or("POWERLOSS_CUT_MS", "2500..8000");
    let (lo, hi) = cut.split_once("..").expect("POWERLOSS_CUT_MS is MIN..MAX");
    let cut_after_ms = (lo.parse().expect("cut min"), hi.parse().expect("cut max"));
    let converge_timeout = Duration::from_secs(
        env_or("POWERLOSS_CONVERGE_S", "600")
            .parse()
            .expect("CONVERGE_S"),
    );
    let cut_in_spread = env_or("POWERLOSS_CUT_IN_SPREAD", "0") == "1";
    let replay: Option<u64> = std::env::var("POWERLOSS_TRIAL_SEED")
        .ok()
        .map(|s| s.parse().expect("POWERLOSS_TRIAL_SEED"));
    let master: u64 = match std::env::var("POWERLOSS_SEED") {
        Ok(s) => s.parse().expect("POWERLOSS_SEED"),
        Err(_) => rand::random(),
    };
    let trials = if replay.is_some() { 1 } else { trials };
    let out_path = std::path::PathBuf::from(env_or(
        "POWERLOSS_OUT",
        &format!(
            "{}/target/powerloss/campaign-{master}.jsonl",
            env!("CARGO_MANIFEST_DIR")
        ),
    ));
    fs::create_dir_all(out_path.parent().expect("out dir")).expect("mkdir out dir");
    let mut out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out_path)
        .expect("open results file");
    eprintln!(
        "powerloss campaign: seed {master} (rerun with POWERLOSS_SEED={master}), {trials} trial(s) per role {roles:?} and mode {modes:?}, volume {volume_bytes} bytes, al-extents {al_extents}, al-extent-size {} then {}, cut after {cut} ms; results in {}",
        al_extent_size.as_deref().unwrap_or("default"),
        al_extent_size_after
            .as_deref()
            .or(al_extent_size.as_deref())
            .unwrap_or("default"),
        out_path.display()
    );
    let certs_dir = tempfile::Builder::new()
        .prefix("tandem-powerloss-certs-")
        .tempdir()
        .expect("tempdir");
    let certs = certs(certs_dir.path());
    let mut rng = common::TestRng::new(master);
    let started = Instant::now();
    // (role, mode) -> (trials, failed trials, failed checks by name, failing seeds)
    type Tally = (u64, u64, BTreeMap<&'static str, u64>, Vec<u64>);
    let mut tally: BTreeMap<(String, String), Tally> = BTreeMap::new();
    // `touch target/powerloss/STOP` ends the campaign after the running trial.
    let stop_file = out_path.with_file_name("STOP");
    let _ = fs::remove_file(&stop_file);
    'campaign: for _ in 0..trials {
        for mode in &modes {
            for &role in &roles {
                if stop_file.exists() {
                    eprintln!(
                        "powerloss campaign: {} exists: stopping",
                        stop_file.display()
                    );
                    break 'campaign;
                }
                let seed = replay.unwrap_or_else(|| rng.next_u64());
                let cfg = TrialConfig {
                    role,
                    mode: mode.clone(),
                    volume_bytes,
                    al_extents,
                    al_extent_size: al_extent_size.clone(),
                    al_extent_size_after: al_extent_size_after.clone(),
                    seed,
                    cut_after_ms,
                    converge_timeout,
                    cut_in_spread,
                };
                let report = run_trial(&cfg, &certs);
                writeln!(out, "{}", report.json()).expect("write results");
                let t = tally
                    .entry((role.to_string(), mode.clone()))
                    .or_insert_with(|| (0, 0, BTreeMap::new(), Vec::new()));
                t.0 += 1;
                if !report.findings.is_empty() {
                    t.1 += 1;
                    t.3.push(seed);
                    let mut seen = std::collections::BTreeSet::new();
                    for f in &report.findings {
                        if seen.insert(f.check) {
                            *t.2.entry(f.check).or_default() += 1;
                        }
                    }
                }
            }
        }
    }
    let mut summary = format!(
        "powerloss campaign seed {master}: {:.0} s, results in {}\n",
        started.elapsed().as_secs_f64(),
        out_path.display()
    );
    let mut failed = 0;
    for ((role, mode), (n, bad, checks, seeds)) in &tally {
        failed += bad;
        summary += &format!(
            "  cut {role:<9} {mode:<5}: {n} trials, {bad} failed {checks:?}{}\n",
            if seeds.is_empty() {
                String::new()
            } else {
                format!(" seeds {seeds:?}")
            }
        );
    }
    eprintln!("{summary}");
    assert_eq!(failed, 0, "{summary}");
}

/// Issue 10: power loss of the secondary in the middle of a resync (after an
/// outage while the application wrote on): it comes back consistent (its image
/// mounts and fscks clean) and converges.
#[test]
fn power_cut_secondary_mid_resync_comes_back_consistent() {
    ci_trials(
        Role::SecondaryMidResync,
        "async",
        "power_cut_secondary_mid_resync",
        1,
    );
}

/// Killing the application kills every fio process of it. fio forks a process
/// per job; a SIGKILL of the parent alone left the job running, orphaned (14
/// left behind by the 156 trials of seeds 1137 and 1138, session 7).
#[test]
fn killing_the_workload_leaves_no_fio_process_behind() {
    use powerloss_support::fsops::{Workload, children_of};
    let dir = tempfile::Builder::new()
        .prefix("tandem-powerloss-workload-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&mnt).expect("mnt");
    Workload::prepare(&mnt);
    let mut w = Workload::start(&mnt, 64 << 20, 7);
    // A fio job's own process: a child of the fio that the workload started.
    let deadline = Instant::now() + Duration::from_secs(30);
    let jobs = loop {
        let jobs: Vec<i32> = w.fio_pids().into_iter().flat_map(children_of).collect();
        if !jobs.is_empty() {
            break jobs;
        }
        assert!(Instant::now() < deadline, "no fio job process appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    w.finish(true);
    let alive = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            let state = s.rsplit_once(')').map_or("", |(_, r)| r.trim_start());
            !state.starts_with('Z') && !state.starts_with('X')
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while jobs.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "fio job processes {jobs:?} outlive the workload's kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
