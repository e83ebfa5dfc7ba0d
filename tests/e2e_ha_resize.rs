//! Online grow (`tandem resize --size`, issue 12 item 4) as an administrator runs
//! it: both image files grow from 1 GiB to 2 GiB under a fio write load through
//! the export (`fio --ioengine=nbd`, its connection stays attached throughout),
//! a new NBD client sees 2 GiB and writes there, and the images are identical
//! after. Refusals (a shrink, on the secondary, with the secondary away, a block
//! device not grown yet) change nothing. A volume found larger than its
//! metadata records at start (a resize cut after the image grew, before the
//! metadata recorded it; or a block device grown before `tandem resize`) is
//! served at the recorded size until the resize is run again. A primary killed
//! -9 after its secondary grew (and before it did) reconciles with the larger
//! secondary at the handshake; after a failover to that secondary, the old
//! primary grows itself when it rejoins. NBD checkpoints follow the grow.
//!
//! Block devices are loop devices grown by `losetup -c` (as an operator grows an
//! LV first). Not covered here: power loss (the metadata's order is
//! tests/meta_grow_power_loss.rs), and a kill of a node inside its own
//! volume-then-metadata grow (its outcome, a volume longer than its metadata,
//! is built by hand here).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::assert_same_file;
use common::cluster::Cluster;
use tandem::nbd::client::NbdClient;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);

/// `tandem resize --size SIZE --control SOCK`: (success, output).
fn resize(c: &Cluster, node: usize, size: &str) -> (bool, String) {
    c.ctl(node, "resize", &["--size", size])
}

/// The size a new NBD client of `addr` sees.
fn export_size(addr: &str) -> u64 {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        NbdClient::connect(addr, "")
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
            .size_bytes()
    })
}

/// Write `n` MiB of `seed`-derived data at byte `offset` through a new client.
fn write_at(addr: &str, offset: u64, n: u64, seed: u64) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let c = NbdClient::connect(addr, "")
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let mut rng = common::TestRng::new(seed);
        for m in 0..n {
            let mut data = vec![0u8; MIB as usize];
            rng.fill(&mut data);
            c.write(offset + m * MIB, Bytes::from(data), false)
                .await
                .expect("write");
        }
        c.flush().await.expect("flush");
    });
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

#[test]
fn online_grow_from_1g_to_2g_under_fio_load_keeps_the_images_identical() {
    let mut c = Cluster::new("sync", GIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);

    // fio writes 4 KiB blocks at random over the first GiB for 20 s, on one NBD
    // connection negotiated at 1 GiB.
    let fio_log = c.site.path("fio.log");
    let mut fio = Command::new("fio")
        .current_dir(c.site.dir.path())
        .arg("--name=grow")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", c.nbd_uri(0)))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=1G",
            "--time_based",
            "--runtime=20",
            "--end_fsync=1",
            "--randseed=1212",
        ])
        .stdout(std::fs::File::create(&fio_log).expect("fio log"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("fio (see tools/test.sh)");
    std::thread::sleep(Duration::from_secs(4));

    let started = Instant::now();
    let (ok, out) = resize(&c, 0, "2G");
    eprintln!("resize under load took {:?}: {out}", started.elapsed());
    assert!(ok, "resize failed: {out}");
    assert!(out.contains("grown from 1073741824 to 2147483648"), "{out}");
    assert_eq!(file_len(&c.image(0)), 2 * GIB);
    assert_eq!(file_len(&c.image(1)), 2 * GIB);
    for node in 0..2 {
        assert_eq!(c.status(node)["size_bytes"], 2 * GIB, "tandem status");
    }
    let (_, text) = c.ctl(0, "status", &[]);
    assert!(text.contains("size:2147483648"), "{text}");
    // A client connecting now sees the new size (libnbd's nbdinfo, and ours),
    // and writes there.
    let info = common::run_ok(
        Command::new("nbdinfo").arg("--size").arg(c.nbd_uri(0)),
        Duration::from_secs(60),
    );
    assert_eq!(info.trim(), (2 * GIB).to_string(), "nbdinfo --size");
    assert_eq!(export_size(&c.nbd_addr(0)), 2 * GIB);
    write_at(&c.nbd_addr(0), GIB + 512 * MIB, 8, 31);
    write_at(&c.nbd_addr(0), 2 * GIB - 4 * MIB, 4, 32);

    let status = fio.wait().expect("fio");
    let log = std::fs::read_to_string(&fio_log).unwrap_or_default();
    assert!(status.success(), "fio failed ({status}):\n{log}");
    assert!(log.contains("err= 0"), "fio reported an error:\n{log}");
    if let Some(line) = log.lines().find(|l| l.contains("IOPS=")) {
        eprintln!("fio across the resize: {}", line.trim());
    }
    c.wait_synced(0, SYNC_TIMEOUT);
    let kinds: Vec<String> = common::events_of(&c.control(1))
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "grown"), "{kinds:?}");
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));

    // A restart serves the grown size (the resource file still says 1 GiB: it
    // is the size a new image is created with).
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    assert_eq!(export_size(&c.nbd_addr(0)), 2 * GIB);
    c.stop(0);
    c.stop(1);
}

#[test]
fn resize_refusals_name_the_reason_and_change_nothing() {
    let mut c = Cluster::new("sync", 64 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);

    let (ok, out) = resize(&c, 0, "32M");
    assert!(!ok, "a shrink was accepted: {out}");
    assert!(
        out.contains("shrinking") && out.contains("nothing changed"),
        "{out}"
    );
    let (ok, out) = resize(&c, 1, "128M");
    assert!(!ok, "a secondary started a resize: {out}");
    assert!(
        out.contains("secondary") && out.contains("primary's control socket"),
        "{out}"
    );
    let (ok, out) = resize(&c, 0, "64M");
    assert!(ok && out.contains("already"), "{out}");

    c.stop(1);
    c.agent(0).wait_status("peer gone", SYNC_TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    let (ok, out) = resize(&c, 0, "128M");
    assert!(!ok, "a resize ran without the secondary: {out}");
    assert!(
        out.contains("not connected") && out.contains("nothing changed"),
        "{out}"
    );
    for node in 0..2 {
        assert_eq!(file_len(&c.image(node)), 64 * MIB, "node {node} changed");
    }
    assert_eq!(export_size(&c.nbd_addr(0)), 64 * MIB);
    c.start(1, "secondary");
    c.wait_synced(0, SYNC_TIMEOUT);
    let (ok, out) = resize(&c, 0, "128M");
    assert!(ok, "{out}");
    assert_eq!(export_size(&c.nbd_addr(0)), 128 * MIB);
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

/// What a crash between a node's volume grow and its metadata's leaves behind:
/// an image longer than the metadata records. The node serves the recorded size
/// (nothing was ever written past it), the pair stays in sync, and the resize
/// run again completes.
#[test]
fn a_volume_longer_than_its_metadata_records_is_served_at_the_recorded_size() {
    let mut c = Cluster::new("sync", 64 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    write_at(&c.nbd_addr(0), 0, 4, 41);
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    for node in 0..2 {
        std::fs::OpenOptions::new()
            .write(true)
            .open(c.image(node))
            .expect("open")
            .set_len(96 * MIB)
            .expect("extend");
    }
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    assert_eq!(export_size(&c.nbd_addr(0)), 64 * MIB);
    let log = c.agent(0).log_text();
    assert!(log.contains("larger than its metadata records"), "{log}");
    let (ok, out) = resize(&c, 0, "128M");
    assert!(ok, "{out}");
    assert_eq!(export_size(&c.nbd_addr(0)), 128 * MIB);
    write_at(&c.nbd_addr(0), 100 * MIB, 4, 42);
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

/// A crash between the two nodes' grows: the secondary is stopped (SIGSTOP) with
/// the primary's `Grow` in its socket, the primary is killed -9 while it waits
/// for the answer, then the secondary continues and grows alone. The restarted
/// primary (still at the old size) and the larger secondary reconcile at the
/// handshake, the pair syncs, and the resize run again completes.
#[test]
fn a_primary_killed_after_its_secondary_grew_reconciles_and_the_resize_completes() {
    let (mut c, out) = grow_cut_on_the_primary(51);
    assert!(!out.status.success(), "the resize completed: {out:?}");
    c.agent(1)
        .wait_status("the session gone", SYNC_TIMEOUT, |s| {
            s["peer"]["connection"] != "connected"
        });
    common::wait_until("the secondary grew alone", SYNC_TIMEOUT, || {
        file_len(&c.image(1)) == 128 * MIB
    });
    assert_eq!(file_len(&c.image(0)), 64 * MIB, "the primary grew");

    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    assert_eq!(export_size(&c.nbd_addr(0)), 64 * MIB);
    write_at(&c.nbd_addr(0), 60 * MIB, 4, 52);
    c.wait_synced(0, SYNC_TIMEOUT);
    let (ok, out) = resize(&c, 0, "128M");
    assert!(ok, "{out}");
    assert_eq!(export_size(&c.nbd_addr(0)), 128 * MIB);
    write_at(&c.nbd_addr(0), 120 * MIB, 8, 53);
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

/// `tandem checkpoint ... --control SOCK` on the primary; must succeed.
fn checkpoint(c: &Cluster, args: &[&str]) -> String {
    let out = common::run_with_timeout(
        Command::new(common::tandem_bin())
            .arg("checkpoint")
            .args(args)
            .arg("--control")
            .arg(c.control(0)),
        Duration::from_secs(60),
    );
    let text = common::output_text(&out);
    assert!(out.status.success(), "tandem checkpoint {args:?}: {text}");
    text
}

/// The changed bytes `tandem checkpoint list` reports for `name`.
fn changed_bytes(c: &Cluster, name: &str) -> u64 {
    let list = checkpoint(c, &["list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    list.as_array()
        .expect("a list")
        .iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("no checkpoint {name}: {list}"))["changed_bytes"]
        .as_u64()
        .expect("changed_bytes")
}

/// NBD checkpoints (incremental backups) across a resize: one taken before
/// counts the grown range as changed (its backup had none), one taken after
/// records writes past the old end, and the primary restarts with the
/// checkpoint file of the grown volume (it refused to start: the file named the
/// old size).
#[test]
fn checkpoints_follow_a_resize_and_the_primary_restarts() {
    let mut c = Cluster::new("sync", 64 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    checkpoint(&c, &["create", "before"]);
    write_at(&c.nbd_addr(0), 0, 1, 60);
    let (ok, out) = resize(&c, 0, "128M");
    assert!(ok, "{out}");
    assert_eq!(changed_bytes(&c, "before"), MIB + 64 * MIB);

    checkpoint(&c, &["create", "after"]);
    write_at(&c.nbd_addr(0), 100 * MIB, 4, 61);
    assert_eq!(changed_bytes(&c, "after"), 4 * MIB);
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    assert_eq!(export_size(&c.nbd_addr(0)), 128 * MIB);
    assert_eq!(changed_bytes(&c, "after"), 4 * MIB);
    assert_eq!(changed_bytes(&c, "before"), 65 * MIB);
    c.stop(0);
    c.stop(1);
    assert_same_file(&c.image(0), &c.image(1));
}

/// Block devices (loop devices over files here): the operator grows them first.
/// A resize before that is refused on the node whose device is too small,
/// nothing changed; after `losetup -c`, the resize zeroes the new range on each
/// node (whatever the devices held there: different garbage on each side here),
/// so the devices are identical without a resync.
#[test]
fn block_devices_grown_by_the_operator_are_checked_then_their_new_range_zeroed() {
    let mut cleanup = common::Cleanup::new();
    let mut c = Cluster::new("sync", 64 * MIB, "");
    let mut text = std::fs::read_to_string(&c.config).expect("resource file");
    let mut devices = Vec::new();
    for (node, name) in ["alpha", "beta"].iter().enumerate() {
        let backing = c.site.path(&format!("{name}.backing"));
        let f = std::fs::File::create(&backing).expect("backing file");
        f.set_len(64 * MIB).expect("size");
        let dev = common::run_ok(
            Command::new("losetup")
                .arg("-f")
                .arg("--show")
                .arg(&backing),
            Duration::from_secs(30),
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        cleanup.add_loop(&dev);
        let image = c.image(node).display().to_string();
        text = text.replace(
            &format!("volume = \"{image}\""),
            &format!(
                "volume = \"{dev}\"\nmeta = \"{}\"\njournal = \"{}\"",
                c.site.path(&format!("{name}.meta")).display(),
                c.site.path(&format!("{name}.journal")).display()
            ),
        );
        devices.push((dev, backing));
    }
    std::fs::write(&c.config, &text).expect("write resource file");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    write_at(&c.nbd_addr(0), 4 * MIB, 4, 71);
    c.wait_synced(0, SYNC_TIMEOUT);

    // Not grown yet: refused on the primary, nothing changed.
    let (ok, out) = resize(&c, 0, "96M");
    assert!(!ok, "{out}");
    assert!(
        out.contains("grow the device first") && out.contains("nothing changed"),
        "{out}"
    );
    // The primary's device grown, the secondary's not: the secondary refuses.
    let grow = |backing: &std::path::Path, dev: &str, fill: u8| {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(backing)
            .expect("backing");
        f.set_len(96 * MIB).expect("grow backing");
        f.seek(SeekFrom::Start(64 * MIB)).expect("seek");
        f.write_all(&vec![fill; 8 * MIB as usize]).expect("garbage");
        f.sync_all().expect("sync");
        common::run_ok(
            Command::new("losetup").arg("-c").arg(dev),
            Duration::from_secs(30),
        );
    };
    grow(&devices[0].1, &devices[0].0, 0x11);
    let (ok, out) = resize(&c, 0, "96M");
    assert!(!ok, "{out}");
    assert!(
        out.contains("refused by the secondary") && out.contains("grow the device first"),
        "{out}"
    );
    assert_eq!(export_size(&c.nbd_addr(0)), 64 * MIB);
    grow(&devices[1].1, &devices[1].0, 0x22);
    let (ok, out) = resize(&c, 0, "96M");
    assert!(ok, "{out}");
    assert_eq!(export_size(&c.nbd_addr(0)), 96 * MIB);
    write_at(&c.nbd_addr(0), 90 * MIB, 2, 72);
    c.wait_synced(0, SYNC_TIMEOUT);
    c.stop(0);
    c.stop(1);
    assert_same_file(&devices[0].1, &devices[1].1);
    drop(c);
    for (dev, _) in &devices {
        cleanup.detach_loop(dev);
    }
}

/// The same cut, then a failover instead of a second resize: the secondary that
/// grew is promoted and serves the grown size; the old primary, started again
/// as its secondary at the old size, grows itself to its new primary's size at
/// the connection (it was refused as too small before: the pair could never be
/// joined again, since a resize needs the peer connected).
#[test]
fn a_failover_to_the_secondary_that_grew_first_grows_the_old_primary_when_it_rejoins() {
    let (mut c, _) = grow_cut_on_the_primary(81);
    common::wait_until("the secondary grew alone", SYNC_TIMEOUT, || {
        file_len(&c.image(1)) == 128 * MIB
    });
    c.agent(1)
        .wait_status("the session gone", SYNC_TIMEOUT, |s| {
            s["peer"]["connection"] != "connected"
        });

    let out = c.ctl_ok(1, "promote", &[]);
    assert!(out.contains("now primary"), "{out}");
    c.agent(1)
        .wait_status("primary", SYNC_TIMEOUT, |s| s["role"] == "primary");
    assert_eq!(export_size(&c.nbd_addr(1)), 128 * MIB);
    write_at(&c.nbd_addr(1), 100 * MIB, 4, 82);
    c.start(0, "secondary");
    c.wait_synced(1, SYNC_TIMEOUT);
    assert_eq!(file_len(&c.image(0)), 128 * MIB);
    let log = c.agent(0).log_text();
    assert!(log.contains("grows to it"), "{log}");
    c.stop(1);
    c.stop(0);
    assert_same_file(&c.image(0), &c.image(1));
}

/// A synced 64 MiB sync-mode pair (4 MiB written at 8 MiB with `seed`); its
/// secondary SIGSTOPped while `tandem resize --size 128M` runs on the primary,
/// which is killed -9 0.7 s in (it sends Grow at once and waits, well within its
/// peer timeout); then the secondary continues. Returns the pair and the resize
/// command's output.
fn grow_cut_on_the_primary(seed: u64) -> (Cluster, std::process::Output) {
    let mut c = Cluster::new("sync", 64 * MIB, "");
    c.start(1, "secondary");
    c.start(0, "primary");
    c.wait_synced(0, SYNC_TIMEOUT);
    write_at(&c.nbd_addr(0), 8 * MIB, 4, seed);
    c.wait_synced(0, SYNC_TIMEOUT);
    c.agent(1).signal(libc::SIGSTOP);
    let control = c.control(0);
    let asking = std::thread::spawn(move || {
        common::run_with_timeout(
            Command::new(common::tandem_bin())
                .args(["resize", "--size", "128M", "--control"])
                .arg(control),
            Duration::from_secs(60),
        )
    });
    std::thread::sleep(Duration::from_millis(700));
    c.kill(0);
    let out = asking.join().expect("resize thread");
    c.agent(1).signal(libc::SIGCONT);
    (c, out)
}
