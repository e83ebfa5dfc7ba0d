//! The DR copy as a recovery tool (issue 10): point-in-time rollback and a
//! read-only inspection of an older point, through a real filesystem.
//!
//! ext4 on the primary's export (nbdfuse + loop), a seeded tree of files written
//! and the filesystem unmounted (a clean point); then the "ransomware": every
//! file overwritten with random bytes, half of them deleted, synced. Meanwhile
//! the secondary serves its image as of the clean point over NBD (`tandem
//! inspect`), read-only, while replication continues: mounted read-only it
//! shows the original files (blake3 of every file). Bad input is refused with a
//! message naming what to do: rollback on a connected secondary, on the primary,
//! outside the window. Then the primary stops, the secondary is rolled back to
//! the clean point (`tandem rollback --to SEQ`), promoted without --force, and its
//! volume is a clean ext4 (`e2fsck -fn`) with the original files. Last, the old
//! primary rejoins as secondary and ends identical to the rolled-back volume.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{Cleanup, TestRng, free_port, run_ok, run_with_timeout, tree_digests};

const SIZE_BYTES: u64 = 128 << 20;
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
const ALPHA: usize = 0;
const BETA: usize = 1;

/// ~120 files (0 B to 64 KiB, a few of 1 MiB) in nested directories.
fn make_tree(root: &Path, seed: u64) {
    let mut rng = TestRng::new(seed);
    for i in 0..120u64 {
        let mut dir = root.to_owned();
        for _ in 0..rng.below(3) {
            dir.push(format!("d{}", rng.below(4)));
        }
        std::fs::create_dir_all(&dir).expect("create tree dir");
        let len = if i % 40 == 0 {
            1 << 20
        } else {
            rng.below(65_536) as usize
        };
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        std::fs::write(dir.join(format!("f{i}.bin")), &data).expect("write tree file");
    }
}

/// Every file overwritten in place with random bytes of the same length; every
/// second one then deleted.
fn ransom(root: &Path, seed: u64) {
    let mut rng = TestRng::new(seed ^ 0x5eed);
    let files: Vec<PathBuf> = tree_digests(root).into_keys().collect();
    for (i, rel) in files.iter().enumerate() {
        let path = root.join(rel);
        let len = std::fs::metadata(&path).expect("stat").len() as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        std::fs::write(&path, &data).expect("overwrite");
        if i % 2 == 1 {
            std::fs::remove_file(&path).expect("delete");
        }
    }
}

/// An NBD export as a block device: nbdfuse, then a loop device on its file.
fn attach(cleanup: &mut Cleanup, dir: &Path, uri: &str, read_only: bool) -> String {
    std::fs::create_dir_all(dir).expect("mkdir fuse dir");
    let pidfile = dir.with_extension("pid");
    let mut nbdfuse = Command::new("nbdfuse");
    if read_only {
        nbdfuse.arg("-r");
    }
    let server = nbdfuse
        .arg("-P")
        .arg(&pidfile)
        .arg(dir)
        .arg(uri)
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdfuse (libnbd-bin)");
    cleanup.add_fuse(dir, server);
    let nbd_file = dir.join("nbd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(pidfile.exists() && nbd_file.exists()) {
        assert!(
            Instant::now() < deadline,
            "nbdfuse did not expose {} within 30 s",
            nbd_file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut losetup = Command::new("losetup");
    if read_only {
        losetup.arg("-r");
    }
    let dev = run_ok(losetup.arg("-f").arg("--show").arg(&nbd_file), CMD_TIMEOUT)
        .trim()
        .to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    cleanup.add_loop(&dev);
    dev
}

fn detach(cleanup: &mut Cleanup, dir: &Path, dev: &str) {
    cleanup.detach_loop(dev);
    // `losetup -d` lets go of the backing file asynchronously: a busy machine
    // still holds it a moment later, and the FUSE unmount would fail busy.
    let nbd_file = dir.join("nbd");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = run_ok(
            Command::new("losetup").arg("-j").arg(&nbd_file),
            CMD_TIMEOUT,
        );
        if held.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held} still holds {}",
            nbd_file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cleanup.unmount_fuse(dir);
}

fn mount(cleanup: &mut Cleanup, dev: &str, mnt: &Path, opts: &str) {
    std::fs::create_dir_all(mnt).expect("mkdir mount point");
    run_ok(
        Command::new("mount").args(["-o", opts]).arg(dev).arg(mnt),
        CMD_TIMEOUT,
    );
    cleanup.add_mount(mnt);
}

/// `tandem points --json` of a node.
fn points(c: &Cluster, node: usize) -> serde_json::Value {
    let text = c.ctl_ok(node, "points", &["--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("points --json: {e}: {text}"))
}

/// The newest point's seq once the secondary's consistent image holds the
/// primary's writes through `seq` at least (the primary in sync meanwhile).
fn wait_point_through(c: &mut Cluster, seq: u64) -> u64 {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let p = points(c, BETA);
        let newest = p["points"]
            .as_array()
            .and_then(|a| a.last())
            .map_or(0, |p| p["seq"].as_u64().expect("seq"));
        if newest >= seq {
            return newest;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary's newest point stayed at {newest}, below {seq}: {p}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The newest write seq the primary accepted, once the secondary holds it.
fn synced_seq(c: &mut Cluster) -> u64 {
    c.wait_synced(ALPHA, SYNC_TIMEOUT);
    let s = c.status(ALPHA);
    let seq = s["consistent_point"]["seq"].as_u64();
    wait_point_through(c, seq.unwrap_or(0))
}

#[test]
fn rollback_and_inspection_bring_back_files_overwritten_and_deleted_on_the_primary() {
    let seed = common::seed("dr-rollback");
    let mut c = Cluster::new("async", SIZE_BYTES, "journal-size = \"160M\"");
    c.start(BETA, "secondary");
    c.start(ALPHA, "primary");
    c.wait_synced(ALPHA, SYNC_TIMEOUT);
    let mut cleanup = Cleanup::new();

    // A clean filesystem with the original files.
    let src = c.site.path("src");
    make_tree(&src, seed);
    let expected = tree_digests(&src);
    assert!(expected.len() >= 100);
    let fuse = c.site.path("fuse-alpha");
    let mnt = c.site.path("mnt-alpha");
    let dev = attach(&mut cleanup, &fuse, &c.nbd_uri(ALPHA), false);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(&dev),
        CMD_TIMEOUT,
    );
    mount(&mut cleanup, &dev, &mnt, "rw");
    run_ok(
        Command::new("cp").arg("-a").arg(src.join(".")).arg(&mnt),
        CMD_TIMEOUT,
    );
    cleanup.umount(&mnt);
    let good = synced_seq(&mut c);
    let status = c.status(ALPHA);
    assert!(
        status["consistent_point"]["at_unix_ms"].as_u64() > Some(0),
        "the primary shows the DR copy's consistent point: {status}"
    );
    assert_eq!(
        status["consistent_point"]["behind_s"], 0.0,
        "in sync: the DR copy lacks nothing: {status}"
    );
    eprintln!("clean point: write seq {good}");

    // The attack, while the secondary serves the clean point read-only.
    mount(&mut cleanup, &dev, &mnt, "rw");
    let inspect_port = free_port();
    let inspect_addr = format!("127.0.0.1:{inspect_port}");
    let said = c.ctl_ok(
        BETA,
        "inspect",
        &["--at", &good.to_string(), "--nbd", &inspect_addr],
    );
    assert!(said.contains("read-only"), "{said}");
    eprintln!("inspect: {said}\npoints: {}", points(&c, BETA));
    ransom(&mnt, seed);
    run_ok(Command::new("sync").arg("-f").arg(&mnt), CMD_TIMEOUT);
    let ifuse = c.site.path("fuse-inspect");
    let imnt = c.site.path("mnt-inspect");
    let idev = attach(&mut cleanup, &ifuse, &format!("nbd://{inspect_addr}"), true);
    mount(&mut cleanup, &idev, &imnt, "ro");
    // Replication goes on meanwhile: the primary's latest writes reach the DR copy.
    cleanup.umount(&mnt);
    let after_attack = synced_seq(&mut c);
    assert!(after_attack > good, "{after_attack} > {good}");
    let listed = points(&c, BETA);
    assert_eq!(
        listed["inspection"]["point"]["seq"], good,
        "points shows the inspection: {listed}"
    );
    assert_eq!(
        tree_digests(&imnt),
        expected,
        "the inspection shows the original files while replication continues"
    );
    cleanup.umount(&imnt);
    detach(&mut cleanup, &ifuse, &idev);
    let said = c.ctl_ok(BETA, "inspect", &["--stop"]);
    assert!(said.contains("ended"), "{said}");
    detach(&mut cleanup, &fuse, &dev);

    // Refusals: a connected secondary, the primary (a point before the window below).
    let (ok, text) = c.ctl(BETA, "rollback", &["--to", &good.to_string()]);
    assert!(
        !ok && text.contains("connected") && text.contains("Disconnect it first"),
        "{text}"
    );
    let (ok, text) = c.ctl(ALPHA, "rollback", &["--to", &good.to_string()]);
    assert!(
        !ok && text.contains("primary") && text.contains("secondary"),
        "{text}"
    );

    // Disaster recovery: the primary goes away, the DR copy goes back in time.
    c.stop(ALPHA);
    c.agent(BETA)
        .wait_status("the primary detached", SYNC_TIMEOUT, |s| {
            s["peer"]["connection"] != "connected"
        });
    let (ok, text) = c.ctl(BETA, "rollback", &["--to", "2000-01-01T00:00:00Z"]);
    assert!(!ok && text.contains("before the rollback window"), "{text}");
    let said = c.ctl_ok(BETA, "rollback", &["--to", &good.to_string()]);
    assert!(said.contains("rolled back"), "{said}");
    let listed = points(&c, BETA);
    assert_eq!(
        listed["points"]
            .as_array()
            .and_then(|a| a.last())
            .map(|p| p["seq"].clone()),
        Some(good.into()),
        "the window now ends at the point: {listed}"
    );
    let said = c.ctl_ok(BETA, "promote", &[]);
    eprintln!("promote: {said}");
    c.agent(BETA)
        .wait_status("primary", SYNC_TIMEOUT, |s| s["role"] == "primary");
    c.stop(BETA);

    let img = c.image(BETA);
    let fsck = run_with_timeout(Command::new("e2fsck").arg("-fn").arg(&img), CMD_TIMEOUT);
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the rolled-back volume failed ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let rmnt = c.site.path("mnt-rolled-back");
    std::fs::create_dir(&rmnt).expect("mkdir");
    run_ok(
        Command::new("mount")
            .args(["-o", "ro,loop,noload"])
            .arg(&img)
            .arg(&rmnt),
        CMD_TIMEOUT,
    );
    cleanup.add_mount(&rmnt);
    let got = tree_digests(&rmnt);
    cleanup.umount(&rmnt);
    assert_eq!(
        got, expected,
        "the rolled-back volume holds the original files"
    );

    // Failback: the old primary rejoins as secondary and is brought to the
    // rolled-back data block for block (the blocks the rollback dropped are in
    // beta's bitmap), its later writes overwritten.
    c.start(BETA, "primary");
    c.start(ALPHA, "secondary");
    c.wait_synced(BETA, SYNC_TIMEOUT);
    c.stop(BETA);
    c.stop(ALPHA);
    common::assert_same_file(&c.image(ALPHA), &c.image(BETA));
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run_ok(c.arg(uri), CMD_TIMEOUT);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// A rolled-back secondary that is not promoted goes forward again: when its
/// primary comes back, the blocks the rollback dropped (recorded in its bitmap
/// before the journal was cut) are resent, and the images end identical.
#[test]
fn a_rolled_back_secondary_is_resynced_forward_by_its_returning_primary() {
    let mut c = Cluster::new("async", 64 << 20, "journal-size = \"128M\"");
    c.start(BETA, "secondary");
    c.start(ALPHA, "primary");
    c.wait_synced(ALPHA, SYNC_TIMEOUT);
    let uri = c.nbd_uri(ALPHA);
    qemu_io(&uri, &["write -P 0x11 0 4M", "flush"]);
    let first = synced_seq(&mut c);
    qemu_io(&uri, &["write -P 0x22 2M 4M", "flush"]);
    let second = synced_seq(&mut c);
    assert!(second > first, "{second} > {first}");
    c.stop(ALPHA);
    c.agent(BETA)
        .wait_status("the primary detached", SYNC_TIMEOUT, |s| {
            s["peer"]["connection"] != "connected"
        });
    let said = c.ctl_ok(BETA, "rollback", &["--to", &format!("seq:{first}")]);
    assert!(said.contains("rolled back"), "{said}");
    let s = c.status(BETA);
    assert_eq!(s["consistent_point"]["seq"], first, "{s}");
    c.start(ALPHA, "primary");
    c.wait_synced(ALPHA, SYNC_TIMEOUT);
    c.stop(ALPHA);
    c.stop(BETA);
    common::assert_same_file(&c.image(ALPHA), &c.image(BETA));
}

/// An inspection never stops replication: when the journal needs the room its
/// point holds, the inspection ends (its reads fail with the reason) and the
/// writes keep flowing.
///
/// Known failure (about 1 run in 9 on a loaded machine, not caused by the
/// inspection): the primary's clean stop says Goodbye right after a resync it
/// counts as done (Durable covers the ResyncDone's seq), while the secondary
/// still holds the ResyncDone frame (waiting for journal room) or has it queued;
/// the session end drops it, the section stays open, and the secondary's volume
/// at rest is the previous consistent image (`beta.img` differs: an older round
/// at offset 0, and its log lacks the last "in sync with the primary"). Reported
/// to the lead with the fix direction (end a session only after its frames).

#[test]
fn an_inspection_yields_when_replication_needs_the_journal() {
    // 256 MiB: a whole-volume resync after the primary went ahead fits (a 128 MiB
    // journal leaves 56 MiB for a resync, less than this 64 MiB volume).
    let mut c = Cluster::new("async", 64 << 20, "journal-size = \"256M\"");
    c.start(BETA, "secondary");
    c.start(ALPHA, "primary");
    c.wait_synced(ALPHA, SYNC_TIMEOUT);
    let uri = c.nbd_uri(ALPHA);
    qemu_io(&uri, &["write -P 0x33 0 1M", "flush"]);
    let point = synced_seq(&mut c);
    let addr = format!("127.0.0.1:{}", free_port());
    c.ctl_ok(
        BETA,
        "inspect",
        &["--at", &point.to_string(), "--nbd", &addr],
    );
    let inspect_uri = format!("nbd://{addr}");
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 0x33 0 1M"])
            .arg(&inspect_uri),
        CMD_TIMEOUT,
    );
    assert!(
        !out.contains("fail"),
        "the inspection reads the point: {out}"
    );
    // Twice the journal's ring of writes: the pin must yield.
    for round in 0..6u8 {
        qemu_io(
            &uri,
            &[&format!("write -P 0x{:02x} 0 64M", 0x40 + round), "flush"],
        );
    }
    c.wait_synced(ALPHA, SYNC_TIMEOUT);
    let listed = points(&c, BETA);
    assert!(
        listed["inspection"].is_null(),
        "the inspection ended: {listed}"
    );
    let events = c.ctl_ok(BETA, "events", &[]);
    assert!(
        events.contains("needed the room for replication"),
        "an event says why the inspection ended:\n{events}"
    );
    let (ok, text) = c.ctl(BETA, "inspect", &["--stop"]);
    assert!(!ok && text.contains("no inspection"), "{text}");
    c.stop(ALPHA);
    c.stop(BETA);
    same_or_logs(&c);
}

/// The images are identical, else the agents' logs are printed with the difference.
fn same_or_logs(c: &Cluster) {
    let diff = common::first_difference(&c.image(ALPHA), &c.image(BETA)).expect("compare images");
    if diff.is_some() {
        for name in common::cluster::NODES {
            let log =
                std::fs::read_to_string(c.site.path(&format!("{name}.log"))).unwrap_or_default();
            eprintln!("----- log of {name} -----\n{log}");
        }
    }
    common::assert_same_file(&c.image(ALPHA), &c.image(BETA));
}
