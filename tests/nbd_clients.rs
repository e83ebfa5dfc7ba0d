//! The NBD server driven by real clients nobody here wrote: qemu-io (qemu-utils),
//! nbdinfo and nbdcopy (libnbd-bin). Each test checks the backend's bytes against a
//! model, not just the client's exit status.

mod nbd_support;

use std::sync::atomic::Ordering;

use nbd_support::{MemBackend, export, run, start};
use rand::{RngCore, SeedableRng};

const MIB: usize = 1024 * 1024;

fn qemu_output_ok(stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stdout).into_owned();
    for bad in ["failed", "error", "Pattern verification"] {
        assert!(!text.contains(bad), "qemu-io reported a problem:\n{text}");
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_zeroes_discards_and_reads_back_over_tcp() {
    let backend = MemBackend::new(64 * MIB);
    let srv = start(backend.clone(), export("vol0", false), "127.0.0.1:0").await;
    let url = format!("nbd://127.0.0.1:{}/vol0", srv.tcp_port());
    let mut model = vec![0u8; 64 * MIB];
    let fill = |m: &mut Vec<u8>, off: usize, len: usize, b: u8| m[off..off + len].fill(b);

    let commands = [
        "write -P 0xab 0 64k",
        // Unaligned offset and length: qemu does read-modify-write around them.
        "write -P 0xcd 4097 3000",
        "write -P 0x11 1M 1M",
        "write -z 1052672 8192",
        "discard 2M 64k",
        "write -f -P 0x77 60M 512",
        "flush",
        "read -P 0xab 0 4097",
        "read -P 0xcd 4097 3000",
        "read -P 0xab 7097 58439",
        "read -P 0x11 1M 4096",
        "read -P 0 1052672 8192",
        "read -P 0x11 1060864 1036288",
        "read -P 0x77 60M 512",
        "aio_write -P 0x42 8M 128k",
        "aio_write -P 0x43 9M 128k",
        "aio_flush",
        "read -P 0x42 8M 128k",
        "read -P 0x43 9M 128k",
    ];
    fill(&mut model, 0, 65536, 0xab);
    fill(&mut model, 4097, 3000, 0xcd);
    fill(&mut model, MIB, MIB, 0x11);
    fill(&mut model, 1052672, 8192, 0);
    fill(&mut model, 2 * MIB, 65536, 0); // MemBackend zero-fills trims
    fill(&mut model, 60 * MIB, 512, 0x77);
    fill(&mut model, 8 * MIB, 131072, 0x42);
    fill(&mut model, 9 * MIB, 131072, 0x43);

    let mut args = vec!["-f", "raw", &url];
    for c in &commands {
        args.extend(["-c", c]);
    }
    let out = qemu_output_ok(&run("qemu-io", &args).await);
    assert!(
        out.contains("wrote 3000/3000 bytes at offset 4097"),
        "{out}"
    );
    assert!(
        out.contains("read 8192/8192 bytes at offset 1052672"),
        "{out}"
    );

    assert!(
        backend.snapshot() == model,
        "backend contents differ from the model"
    );
    assert!(
        backend.flushes.load(Ordering::SeqCst) >= 1,
        "flush never reached the backend"
    );
    assert!(
        backend.zeroes.load(Ordering::SeqCst) >= 1,
        "write -z did not use WRITE_ZEROES"
    );
    assert!(
        backend.trims.load(Ordering::SeqCst) >= 1,
        "discard did not reach the backend"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_over_unix_socket_with_default_export_name() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    // A stale socket file from a dead server must not prevent binding.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());

    let backend = MemBackend::new(8 * MIB);
    let srv = start(
        backend.clone(),
        export("vol0", false),
        &format!("unix:{}", sock.display()),
    )
    .await;
    // Empty export name: the default export.
    let url = format!("nbd+unix:///?socket={}", sock.display());
    qemu_output_ok(
        &run(
            "qemu-io",
            &[
                "-f",
                "raw",
                &url,
                "-c",
                "write -P 0x5e 12345 100000",
                "-c",
                "read -P 0x5e 12345 100000",
                "-c",
                "read -P 0 0 12345",
            ],
        )
        .await,
    );
    let data = backend.snapshot();
    assert!(data[12345..112345].iter().all(|b| *b == 0x5e));
    assert!(data[..12345].iter().all(|b| *b == 0));
    assert!(data[112345..].iter().all(|b| *b == 0));
    srv.stop().await;
    assert!(!sock.exists(), "socket file left behind after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_block_sizes_and_list() {
    let backend = MemBackend::new(16 * MIB);
    let srv = start(backend, export("vol0", false), "127.0.0.1:0").await;
    let url = format!("nbd://127.0.0.1:{}/vol0", srv.tcp_port());

    let size = run("nbdinfo", &["--size", &url]).await;
    assert_eq!(
        String::from_utf8_lossy(&size).trim(),
        (16 * MIB).to_string()
    );

    let json = String::from_utf8(run("nbdinfo", &["--json", &url]).await).unwrap();
    let compact: String = json.split_whitespace().collect();
    for expected in [
        "\"export-name\":\"vol0\"",
        "\"description\":\"testexportvol0\"",
        "\"export-size\":16777216",
        "\"is_read_only\":false",
        "\"can_flush\":true",
        "\"can_fua\":true",
        "\"can_trim\":true",
        "\"can_zero\":true",
        "\"can_multi_conn\":true",
        // nbdinfo negotiates structured replies: one content chunk per read, so DF.
        "\"can_df\":true",
        "\"can_cache\":true",
        "\"can_fast_zero\":true",
        "\"block_size_minimum\":512",
        "\"block_size_preferred\":4096",
        "\"block_size_maximum\":33554432",
    ] {
        assert!(compact.contains(expected), "missing {expected} in:\n{json}");
    }

    let list_url = format!("nbd://127.0.0.1:{}", srv.tcp_port());
    let list = String::from_utf8(run("nbdinfo", &["--list", "--json", &list_url]).await).unwrap();
    let compact: String = list.split_whitespace().collect();
    assert!(compact.contains("\"export-name\":\"vol0\""), "{list}");

    // A read-only export says so.
    srv.stop().await;
    let srv = start(MemBackend::new(MIB), export("ro", true), "127.0.0.1:0").await;
    let url = format!("nbd://127.0.0.1:{}/ro", srv.tcp_port());
    let json = String::from_utf8(run("nbdinfo", &["--json", &url]).await).unwrap();
    let compact: String = json.split_whitespace().collect();
    assert!(compact.contains("\"is_read_only\":true"), "{json}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_unknown_export_name_fails() {
    let srv = start(MemBackend::new(MIB), export("vol0", false), "127.0.0.1:0").await;
    let url = format!("nbd://127.0.0.1:{}/other", srv.tcp_port());
    let out = tokio::process::Command::new("nbdinfo")
        .arg(&url)
        .output()
        .await
        .expect("run nbdinfo");
    assert!(!out.status.success(), "nbdinfo accepted an unknown export");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_random_image_over_several_connections() {
    let size = 24 * MIB;
    let mut image = vec![0u8; size];
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut image);
    // Leave a zero hole so nbdcopy may use WRITE_ZEROES or skip it.
    image[5 * MIB..7 * MIB].fill(0);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, &image).unwrap();

    let backend = MemBackend::new(size);
    // Fill the backend with garbage so a skipped zero range would be detected.
    backend.data.lock().unwrap().fill(0xee);
    let srv = start(backend.clone(), export("vol0", false), "127.0.0.1:0").await;
    let url = format!("nbd://127.0.0.1:{}/vol0", srv.tcp_port());

    // nbdcopy opens several connections because the server sets CAN_MULTI_CONN.
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            "--requests=16",
            "--flush",
            src.to_str().unwrap(),
            &url,
        ],
    )
    .await;
    assert!(
        backend.snapshot() == image,
        "image written by nbdcopy differs"
    );
    assert!(backend.flushes.load(Ordering::SeqCst) >= 1);

    let copied = run("nbdcopy", &["--connections=4", &url, "-"]).await;
    assert_eq!(copied.len(), size);
    assert!(copied == image, "image read back by nbdcopy differs");
    nbd_support::wait_for_connections(&srv.server, 0).await;
    srv.stop().await;
}
