//! Failover and failback (issue: roles, promotion, generations, reverse resync).
//!
//! - A planned switchover under a write workload: demote alpha, promote beta, the
//!   client carries on against beta; no acknowledged write is lost, no divergence.
//! - An unplanned failover: alpha is killed -9 in async mode while ext4 on its
//!   export is busy; beta is promoted; its filesystem mounts and fscks clean (G2);
//!   clients write through beta; alpha restarts as secondary, is found behind, and
//!   only changed blocks are resynced; the images end identical.
//! - Refusals: promoting while the peer is primary and connected, promoting an
//!   Inconsistent disk, a failing fencing command; resolve on a primary.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::Cluster;
use common::{Cleanup, TestRng, assert_same_file, run_ok, wait_until};
use tandem::nbd::client::NbdClient;

const BLOCK: u64 = 4096;
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);

/// What the writer knows at the end: the data of every acknowledged write, per
/// block, and the blocks whose last write failed (its outcome is unknown).
#[derive(Default)]
struct Written {
    acked: HashMap<u64, Bytes>,
    uncertain: std::collections::HashSet<u64>,
    writes: u64,
    reconnects: u64,
}

/// Write random 4 KiB blocks through whichever node serves NBD (trying `addrs` in
/// order), until `stop`; then flush.
async fn writer(addrs: Vec<String>, blocks: u64, seed: u64, stop: Arc<AtomicBool>) -> Written {
    let mut rng = TestRng::new(seed);
    let mut w = Written::default();
    let mut client: Option<NbdClient> = None;
    loop {
        let Some(c) = client.as_ref() else {
            if stop.load(Ordering::Relaxed) && w.writes > 0 {
                break;
            }
            for a in &addrs {
                if let Ok(c) = NbdClient::connect(a, "").await {
                    client = Some(c);
                    w.reconnects += 1;
                    break;
                }
            }
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        };
        if stop.load(Ordering::Relaxed) {
            c.flush().await.expect("final flush");
            break;
        }
        let block = rng.below(blocks);
        let mut data = vec![0u8; BLOCK as usize];
        rng.fill(&mut data);
        data[..8].copy_from_slice(&w.writes.to_le_bytes());
        let data = Bytes::from(data);
        match c.write(block * BLOCK, data.clone(), false).await {
            Ok(()) => {
                w.acked.insert(block, data);
                w.uncertain.remove(&block);
                w.writes += 1;
            }
            Err(_) => {
                // Closed by a demotion: this write may or may not have happened.
                w.acked.remove(&block);
                w.uncertain.insert(block);
                client = None;
            }
        }
    }
    w
}

fn assert_image_holds(path: &std::path::Path, w: &Written) {
    let image = std::fs::read(path).expect("read image");
    for (block, data) in &w.acked {
        let at = (*block * BLOCK) as usize;
        assert!(
            image[at..at + BLOCK as usize] == data[..],
            "{}: block {block} lost its last acknowledged write",
            path.display()
        );
    }
}

#[test]
fn planned_switchover_under_load_loses_no_write() {
    let seed = common::seed("switchover");
    let size = 64u64 << 20;
    let mut c = Cluster::new("sync", size, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let job = rt.spawn(writer(
        vec![c.nbd_addr(0), c.nbd_addr(1)],
        size / BLOCK,
        seed,
        stop.clone(),
    ));
    std::thread::sleep(Duration::from_secs(2));

    // Bad input: promoting beta while alpha is primary and connected.
    let (ok, text) = c.ctl(1, "promote", &[]);
    assert!(!ok, "promotion while the peer is primary succeeded: {text}");
    assert!(text.contains("primary and connected"), "{text}");

    // The switchover: the client is closed after 1 s (--force-disconnect; without
    // it the demotion is refused while a client is attached: e2e_admin), alpha
    // drains to beta.
    let out = c.ctl_ok(0, "demote", &["--timeout", "1", "--force-disconnect"]);
    assert!(out.contains("demoted"), "{out}");
    assert!(out.contains("peer holds every write"), "{out}");
    // The writer was attached: the demotion says what it did with it.
    assert!(out.contains("1 NBD client(s) attached"), "{out}");
    // The reply comes before the secondary role serves its control socket.
    c.agent(0)
        .wait_status("alpha serving as secondary", SYNC_TIMEOUT, |s| {
            s["role"] == "secondary"
        });
    let out = c.ctl_ok(1, "promote", &[]);
    assert!(out.contains("now primary"), "{out}");
    // The node's event ring carries on across the role change and tells the story.
    let events = common::events_of(&c.control(0));
    assert_eq!(common::count_events(&events, "demoted"), 1, "{events:?}");
    assert!(
        common::count_events(&events, "peer-connected") >= 1,
        "{events:?}"
    );
    let events = common::events_of(&c.control(1));
    assert_eq!(common::count_events(&events, "promoted"), 1, "{events:?}");
    // Demoting a secondary, promoting a primary: nothing to do, success.
    assert!(c.ctl_ok(0, "demote", &[]).contains("already secondary"));
    assert!(c.ctl_ok(1, "promote", &[]).contains("already primary"));

    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let w = rt.block_on(job).expect("writer");
    eprintln!(
        "writes {} reconnects {} uncertain {}",
        w.writes,
        w.reconnects,
        w.uncertain.len()
    );
    assert!(w.reconnects >= 2, "the writer never moved to beta");

    c.wait_synced(1, SYNC_TIMEOUT);
    let beta = c.status(1);
    let alpha = c.status(0);
    // The new primary started a generation descending from the old one; the old
    // primary caught up by bitmap, not by a full copy.
    let history = beta["generations"]["history"].to_string();
    assert!(
        history.contains(alpha["generations"]["history"][0].as_str().unwrap_or("?")),
        "beta's history {history} does not name the old generation: alpha {alpha}"
    );
    assert!(
        alpha["handshake"]
            .as_str()
            .unwrap_or_default()
            .starts_with("bitmap resync"),
        "{alpha}"
    );
    assert!(
        beta["counters"]["resync_bytes"]
            .as_u64()
            .unwrap_or(u64::MAX)
            < size / 4,
        "{beta}"
    );
    c.stop(1);
    c.stop(0);
    assert_same_file(&c.image(0), &c.image(1));
    assert_image_holds(&c.image(1), &w);
}

/// nbdfuse + losetup over a node's export: returns the loop device.
fn attach(c: &Cluster, node: usize, cleanup: &mut Cleanup, tag: &str) -> String {
    let fuse_dir = c.site.path(&format!("fuse-{tag}"));
    std::fs::create_dir_all(&fuse_dir).expect("mkdir");
    let pidfile = c.site.path(&format!("nbdfuse-{tag}.pid"));
    let server = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&fuse_dir)
        .arg(c.nbd_uri(node))
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdfuse (libnbd-bin)");
    cleanup.add_fuse(&fuse_dir, server);
    let nbd_file = fuse_dir.join("nbd");
    wait_until("nbdfuse serves", Duration::from_secs(30), || {
        pidfile.exists() && nbd_file.exists()
    });
    let dev = run_ok(
        Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg("--direct-io=on")
            .arg(&nbd_file),
        Duration::from_secs(30),
    )
    .trim()
    .to_string();
    cleanup.add_loop(&dev);
    dev
}

#[test]
fn unplanned_failover_with_busy_ext4_then_failback_by_bitmap() {
    let seed = common::seed("failover");
    let size = 256u64 << 20;
    let mut c = Cluster::new("async", size, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    let mut cleanup = Cleanup::new();

    // ext4 on alpha's export, busy with a writer when alpha dies.
    let dev = attach(&c, 0, &mut cleanup, "alpha");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&dev),
        Duration::from_secs(120),
    );
    let mnt = c.site.path("mnt-alpha");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    run_ok(
        Command::new("mount").arg(&dev).arg(&mnt),
        Duration::from_secs(60),
    );
    cleanup.add_mount(&mnt);
    let mut rng = TestRng::new(seed);
    for i in 0..40 {
        let mut data = vec![0u8; 64 << 10];
        rng.fill(&mut data);
        std::fs::write(mnt.join(format!("before-{i}")), &data).expect("write");
    }
    run_ok(&mut Command::new("sync"), Duration::from_secs(60));
    let busy = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "i=0; while :; do dd if=/dev/urandom of={}/busy-$i bs=64k count=4 conv=fsync 2>/dev/null || exit 0; i=$((i+1)); done",
            mnt.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("busy writer");
    std::thread::sleep(Duration::from_secs(3));
    c.kill(0);
    let mut busy = busy;
    let _ = busy.kill();
    let _ = busy.wait();
    // The dead export's mount and devices go; their errors do not matter.
    drop(cleanup);
    let mut cleanup = Cleanup::new();

    // Fail over: beta's peer is gone, its disk is UpToDate (prefix-consistent, G2).
    c.agent(1).wait_status("peer gone", SYNC_TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    let out = c.ctl_ok(1, "promote", &[]);
    assert!(out.contains("now primary"), "{out}");
    let dev = attach(&c, 1, &mut cleanup, "beta");
    let mnt = c.site.path("mnt-beta");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    // Mounting replays the journal; clients then write through the new primary.
    run_ok(
        Command::new("mount").arg(&dev).arg(&mnt),
        Duration::from_secs(60),
    );
    cleanup.add_mount(&mnt);
    for i in 0..40 {
        let before = std::fs::read(mnt.join(format!("before-{i}")))
            .expect("file written before the failover");
        assert_eq!(before.len(), 64 << 10);
    }
    for i in 0..20 {
        let mut data = vec![0u8; 32 << 10];
        rng.fill(&mut data);
        std::fs::write(mnt.join(format!("after-{i}")), &data).expect("write through beta");
    }
    cleanup.umount(&mnt);
    let fsck = common::run_with_timeout(
        Command::new("e2fsck").args(["-f", "-n"]).arg(&dev),
        Duration::from_secs(120),
    );
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the promoted node: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    cleanup.detach_loop(&dev);
    cleanup.unmount_fuse(&c.site.path("fuse-beta"));

    // Failback: alpha restarts as secondary; it is behind (and wrote blocks beta
    // never got): only those and beta's changed blocks are resynced.
    c.start(0, "secondary");
    c.wait_synced(1, SYNC_TIMEOUT);
    let alpha = c.status(0);
    let beta = c.status(1);
    assert!(
        alpha["handshake"]
            .as_str()
            .unwrap_or_default()
            .starts_with("bitmap resync"),
        "{alpha}"
    );
    let resynced = beta["counters"]["resync_bytes"]
        .as_u64()
        .expect("resync bytes");
    eprintln!("failback resynced {resynced} bytes of {size}");
    assert!(
        resynced < size / 4,
        "failback resynced {resynced} of {size} bytes: {beta}"
    );
    c.stop(1);
    c.stop(0);
    assert_same_file(&c.image(0), &c.image(1));
}

#[test]
fn promotion_refusals_and_fencing() {
    let size = 16u64 << 20;
    let mut c = Cluster::new(
        "sync",
        size,
        "fence-peer = \"echo fenced $TANDEM_PEER >> $TANDEM_FENCE_LOG; test -e $TANDEM_FENCE_LOG.ok\"",
    );
    // The fencing command reads TANDEM_FENCE_LOG from the agent's environment.
    let log = c.site.path("fence.log");
    // SAFETY: set before any thread of this test spawns an agent.
    unsafe { std::env::set_var("TANDEM_FENCE_LOG", &log) };
    c.start(1, "secondary");
    // A new secondary never synced: Inconsistent, promotion refused without --force.
    let (ok, text) = c.ctl(1, "promote", &[]);
    assert!(!ok && text.contains("Inconsistent"), "{text}");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    // resolve on a primary: refused.
    let (ok, text) = c.ctl(0, "resolve", &["--discard-local"]);
    assert!(!ok && text.contains("primary"), "{text}");
    c.kill(0);
    c.agent(1).wait_status("peer gone", SYNC_TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    // The fencing command fails: no promotion.
    let (ok, text) = c.ctl(1, "promote", &[]);
    assert!(!ok && text.contains("fencing command"), "{text}");
    assert_eq!(c.status(1)["role"], "secondary");
    // It succeeds: promoted.
    let mut ok_file = log.clone().into_os_string();
    ok_file.push(".ok");
    std::fs::write(&ok_file, "").expect("touch");
    let out = c.ctl_ok(1, "promote", &[]);
    assert!(out.contains("now primary"), "{out}");
    let fenced = std::fs::read_to_string(&log).expect("fence log");
    assert_eq!(
        fenced.lines().filter(|l| *l == "fenced alpha").count(),
        2,
        "{fenced}"
    );
    let started = Instant::now();
    c.stop(1);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn the_secondary_dials_when_the_primary_cannot_reach_it() {
    // Both nodes listen and dial. Here the primary's --peer points at a closed port
    // (as behind a one-way firewall); the secondary dials the primary's --listen
    // address, and the handshake runs as if the primary had dialed.
    let site = common::Site::new();
    let size = 8u64 << 20;
    let (primary_listen, secondary_listen, nowhere, nbd) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let secondary_opts = common::NodeOpts {
        extra: vec!["--peer".into(), format!("127.0.0.1:{primary_listen}")],
        ..Default::default()
    };
    let primary_opts = common::NodeOpts {
        extra: vec!["--listen".into(), format!("127.0.0.1:{primary_listen}")],
        ..Default::default()
    };
    let mut sec = site.secondary(
        "secondary",
        &site.path("s.img"),
        size,
        secondary_listen,
        &secondary_opts,
    );
    let mut pri = site.primary(
        "primary",
        &site.path("p.img"),
        size,
        "sync",
        nowhere,
        nbd,
        &primary_opts,
    );
    pri.wait_status("synced over the secondary's dial", SYNC_TIMEOUT, |s| {
        common::primary_in_sync(s)
    });
    let s = sec.wait_status("UpToDate", SYNC_TIMEOUT, |s| s["disk_state"] == "UpToDate");
    assert_eq!(s["peer"]["connection"], "connected", "{s}");
    pri.stop();
    sec.stop();
    assert_same_file(&site.path("p.img"), &site.path("s.img"));
}

/// A demotion the configuration cannot carry out (no replication address for the
/// secondary role) is refused before anything drains, and the node keeps serving
/// as primary. It used to hand over, then fail to start the secondary role and
/// exit 1.
#[test]
fn a_demotion_without_a_secondary_configuration_is_refused_up_front() {
    let site = common::Site::new();
    let (peer, nbd) = (common::free_port(), common::free_port());
    let mut primary = site.primary(
        "primary",
        &site.path("primary.img"),
        16 << 20,
        "sync",
        peer,
        nbd,
        &common::NodeOpts::default(),
    );
    primary.wait_status("serving", Duration::from_secs(60), |s| {
        s["role"] == "primary"
    });
    let out = common::run_with_timeout(
        std::process::Command::new(common::tandem_bin())
            .args(["demote", "--control"])
            .arg(&primary.control),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the demotion succeeded: {text}");
    assert!(text.contains("refusing to demote"), "{text}");
    assert!(text.contains("--listen"), "names what is missing: {text}");
    let s = primary.status().expect("still serving");
    assert_eq!(s["role"], "primary", "{s}");
    primary.stop();
}
