//! The secondary's read-only export (`--export-readonly`), with real agents and
//! the kernel: an ext4 filesystem is made and filled on the primary through
//! nbdfuse + loop; then, while a second client keeps writing to the primary (raw
//! blocks past the end of the filesystem, replicated in sync mode), the
//! secondary's export is mounted through nbdfuse + `losetup -r` + `mount -o ro`
//! and shows exactly the files written on the primary. The export says
//! READ_ONLY (`nbdinfo --is read-only`), and a write sent anyway is refused with
//! EPERM and changes nothing. After the writer stops, the secondary's image
//! equals the primary's: replication went on under the readers.
//!
//! Not covered: mounting while the primary's filesystem itself changes. The
//! export serves the replica as replication leaves it, which is consistent only
//! between writes; the secondary journal (the lead's work) will serve the last
//! consistent image instead.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Cleanup, NodeOpts, Site, TestRng, free_port, primary_in_sync, run_ok, tree_digests};
use tandem::nbd::proto;

const SIZE_BYTES: u64 = 512 << 20;
const FS_BYTES: u64 = 256 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

fn make_tree(root: &Path, seed: u64) {
    let mut rng = TestRng::new(seed);
    for i in 0..200u64 {
        let dir = root.join(format!("d{}", rng.below(5)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut data = vec![0u8; rng.below(200_000) as usize];
        rng.fill(&mut data);
        std::fs::write(dir.join(format!("f{i}")), &data).unwrap();
    }
}

/// nbdfuse `uri` on `dir` (read-only with `ro`); waits until DIR/nbd exists.
fn fuse(cleanup: &mut Cleanup, dir: &Path, uri: &str, ro: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let pidfile = dir.with_extension("pid");
    let mut cmd = Command::new("nbdfuse");
    if ro {
        cmd.arg("-r");
    }
    let server = cmd
        .arg("-P")
        .arg(&pidfile)
        .arg(dir)
        .arg(uri)
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdfuse (libnbd-bin)");
    cleanup.add_fuse(dir, server);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(pidfile.exists() && dir.join("nbd").exists()) {
        assert!(
            Instant::now() < deadline,
            "nbdfuse did not expose {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn losetup(cleanup: &mut Cleanup, file: &Path, ro: bool) -> String {
    let mut cmd = Command::new("losetup");
    cmd.arg("-f").arg("--show");
    if ro {
        cmd.arg("-r");
    }
    let dev = run_ok(cmd.arg(file), TIMEOUT).trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    cleanup.add_loop(&dev);
    dev
}

/// One write request over a raw connection (tandem's client refuses to send it).
fn raw_write_is_refused(port: u16) -> u32 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut greeting = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greeting).unwrap();
    let mut m = 3u32.to_be_bytes().to_vec();
    proto::encode_option(&mut m, &proto::ClientOption::ExportName(b""));
    s.write_all(&m).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    let flags = u16::from_be_bytes([reply[8], reply[9]]);
    assert_ne!(
        flags & proto::TFLAG_READ_ONLY,
        0,
        "READ_ONLY not advertised"
    );
    let mut header = Vec::new();
    let r = proto::Request {
        flags: 0,
        kind: proto::CMD_WRITE,
        cookie: 5,
        offset: 0,
        len: 4096,
    };
    proto::encode_request_header(proto::HeaderStyle::Compact, &r, &mut header).unwrap();
    s.write_all(&header).unwrap();
    s.write_all(&[0xffu8; 4096]).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    match proto::decode_reply_header(&reply).unwrap() {
        proto::ReplyHeader::Simple { errno, cookie: 5 } => errno,
        other => panic!("{other:?}"),
    }
}

#[test]
fn secondary_export_mounts_read_only_and_shows_the_files_while_the_primary_writes() {
    let seed = common::seed("readonly-export");
    let site = Site::new();
    let (repl_port, nbd_port, ro_port) = (free_port(), free_port(), free_port());
    let secondary_img = site.path("secondary.img");
    let primary_img = site.path("primary.img");
    let mut secondary = site.secondary(
        "secondary",
        &secondary_img,
        SIZE_BYTES,
        repl_port,
        &NodeOpts {
            tls_dir: None,
            extra: vec!["--export-readonly".into(), format!("127.0.0.1:{ro_port}")],
        },
    );
    secondary.wait_status("control socket", TIMEOUT, |_| true);
    let mut primary = site.primary(
        "primary",
        &primary_img,
        SIZE_BYTES,
        "sync",
        repl_port,
        nbd_port,
        &NodeOpts::default(),
    );
    primary.wait_status("in sync", TIMEOUT, primary_in_sync);

    let mut cleanup = Cleanup::new();
    // The filesystem, made and filled on the primary.
    let src = site.path("src");
    make_tree(&src, seed);
    let expected = tree_digests(&src);
    fuse(
        &mut cleanup,
        &site.path("pfuse"),
        &format!("nbd://127.0.0.1:{nbd_port}"),
        false,
    );
    let pdev = losetup(&mut cleanup, &site.path("pfuse").join("nbd"), false);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(&pdev)
            .arg("256M"),
        TIMEOUT,
    );
    let pmnt = site.path("pmnt");
    std::fs::create_dir(&pmnt).unwrap();
    run_ok(Command::new("mount").arg(&pdev).arg(&pmnt), TIMEOUT);
    cleanup.add_mount(&pmnt);
    run_ok(
        Command::new("cp").arg("-a").arg(src.join(".")).arg(&pmnt),
        TIMEOUT,
    );
    cleanup.umount(&pmnt);
    cleanup.detach_loop(&pdev);
    cleanup.unmount_fuse(&site.path("pfuse"));

    // Writes go on on the primary, past the filesystem, from another client.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let c =
                    tandem::nbd::client::NbdClient::connect(&format!("127.0.0.1:{nbd_port}"), "")
                        .await
                        .unwrap();
                let mut rng = TestRng::new(seed ^ 1);
                while !stop.load(Ordering::Relaxed) {
                    let off = FS_BYTES + rng.below((SIZE_BYTES - FS_BYTES) / 65536 - 1) * 65536;
                    let mut data = vec![0u8; 65536];
                    rng.fill(&mut data);
                    c.write(off, bytes::Bytes::from(data), false).await.unwrap();
                    written.fetch_add(1, Ordering::Relaxed);
                }
                c.flush().await.unwrap();
                c.disconnect().await.unwrap();
            });
        })
    };

    // The secondary's export, read-only all the way down.
    let ro_uri = format!("nbd://127.0.0.1:{ro_port}");
    let status = Command::new("nbdinfo")
        .args(["--is", "read-only", &ro_uri])
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "the secondary's export is not read-only"
    );
    let before = written.load(Ordering::Relaxed);
    fuse(&mut cleanup, &site.path("sfuse"), &ro_uri, true);
    let sdev = losetup(&mut cleanup, &site.path("sfuse").join("nbd"), true);
    let smnt = site.path("smnt");
    std::fs::create_dir(&smnt).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-o", "ro"])
            .arg(&sdev)
            .arg(&smnt),
        TIMEOUT,
    );
    cleanup.add_mount(&smnt);
    let got = tree_digests(&smnt);
    let during = written.load(Ordering::Relaxed);
    assert_eq!(got.len(), expected.len(), "file count on the secondary");
    assert_eq!(got, expected, "file contents on the secondary");
    assert!(
        during > before,
        "the primary's writer made no progress while the secondary was read"
    );
    assert_eq!(
        raw_write_is_refused(ro_port),
        1,
        "a write to the read-only export"
    );
    cleanup.umount(&smnt);
    cleanup.detach_loop(&sdev);
    cleanup.unmount_fuse(&site.path("sfuse"));

    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!(
        "{} writes of 64 KiB replicated while the secondary was mounted",
        written.load(Ordering::Relaxed)
    );
    primary.wait_status("in sync", TIMEOUT, primary_in_sync);
    primary.stop();
    secondary.stop();
    common::assert_same_file(&primary_img, &secondary_img);
}
