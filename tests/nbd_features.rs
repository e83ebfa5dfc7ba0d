//! The NBD server's newer protocol features, driven in-process by real clients
//! nobody here wrote (qemu-io/qemu-img 10, nbdinfo from libnbd 1.14) and by
//! tandem's own client in every reply style: structured replies, extended
//! headers (64-bit lengths), block status for `base:allocation` and
//! `qemu:dirty-bitmap:NAME`, CACHE, FAST_ZERO, STARTTLS with client
//! certificates, and the bad input the issue lists (unknown contexts, block
//! status out of range, plaintext after STARTTLS, stalled payloads).
//!
//! The backends are in memory (`nbd_support`); the agent-level tests (image
//! files, SEEK_DATA, checkpoints) are in `nbd_export_*.rs`.

mod nbd_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use nbd_support::{MemBackend, RecordingBackend, export, run, start, start_with};
use tandem::nbd::ServerOptions;
use tandem::nbd::client::{ClientOptions, NbdClient, NbdClientError};
use tandem::nbd::proto::{self, BlockStatusExtent, HeaderStyle, ReplyStyle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn json_of(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_negotiates_extended_headers_and_uses_them_for_io_and_block_status() {
    // 8 GiB with holes at [0, 1 GiB) and [5 GiB, 8 GiB).
    let backend = RecordingBackend::new(8 * GIB, vec![(0, GIB), (5 * GIB, 8 * GIB)], vec![]);
    let srv = start_with(
        backend.clone(),
        export("big", false),
        "127.0.0.1:0",
        ServerOptions::default(),
    )
    .await;
    let url = format!("nbd://127.0.0.1:{}/big", srv.tcp_port());
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0x61 4G 64k",
            "-c",
            "write -z 2G 1M",
            "-c",
            "discard 6G 1G",
            "-c",
            "read -P 0 7G 64k",
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("failed"), "{text}");
    let stats = srv.server.stats();
    assert!(
        stats.sessions_extended.load(Ordering::Relaxed) >= 1,
        "qemu did not negotiate extended headers"
    );
    let extended_requests = stats.requests_extended.load(Ordering::Relaxed);
    assert!(
        extended_requests >= 4,
        "{extended_requests} extended requests"
    );
    let ops = backend.ops.lock().unwrap().clone();
    assert!(ops.contains(&("write", 4 * GIB, 65536)), "{ops:?}");
    assert!(ops.contains(&("zeroes", 2 * GIB, MIB)), "{ops:?}");
    assert!(ops.contains(&("trim", 6 * GIB, GIB)), "{ops:?}");

    // qemu-img map reads the allocation through 64-bit block status chunks.
    let map = json_of(&run("qemu-img", &["map", "--output=json", "-f", "raw", &url]).await);
    let entries = map.as_array().expect("a JSON array");
    let mut at = 0;
    let mut zero_ranges = Vec::new();
    for e in entries {
        assert_eq!(e["start"].as_u64().unwrap(), at);
        let len = e["length"].as_u64().unwrap();
        if e["zero"] == true && e["data"] == false {
            zero_ranges.push((at, at + len));
        }
        at += len;
    }
    assert_eq!(at, 8 * GIB);
    assert_eq!(zero_ranges, vec![(0, GIB), (5 * GIB, 8 * GIB)], "{map}");
    assert!(stats.block_status_ext_chunks.load(Ordering::Relaxed) >= 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_maps_allocation_and_a_dirty_bitmap_over_structured_replies() {
    let backend = RecordingBackend::new(
        64 * MIB,
        vec![(0, 4 * MIB), (16 * MIB, 64 * MIB)],
        vec![(8 * MIB, 9 * MIB), (32 * MIB, 32 * MIB + 4096)],
    );
    let srv = start_with(
        backend.clone(),
        export("vol", false),
        "127.0.0.1:0",
        ServerOptions::default(),
    )
    .await;
    let url = format!("nbd://127.0.0.1:{}/vol", srv.tcp_port());
    let map = String::from_utf8(run("nbdinfo", &["--map", &url]).await).unwrap();
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let want = [
        ("0", "4194304", "3"),
        ("4194304", "12582912", "0"),
        ("16777216", "50331648", "3"),
    ];
    assert_eq!(rows.len(), want.len(), "{map}");
    for (row, (start, len, flags)) in rows.iter().zip(want) {
        assert_eq!(
            (&row[0][..], &row[1][..], &row[2][..]),
            (start, len, flags),
            "{map}"
        );
    }
    let dirty =
        String::from_utf8(run("nbdinfo", &["--map=qemu:dirty-bitmap:cp", &url]).await).unwrap();
    let dirty_rows: Vec<(u64, u64)> = dirty
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|r| r[2] == "1")
        .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
        .collect();
    assert_eq!(
        dirty_rows,
        vec![(8 * MIB, MIB), (32 * MIB, 4096)],
        "{dirty}"
    );
    // An unknown context is not offered: nbdinfo fails instead of guessing.
    let out = tokio::process::Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:nope", &url])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "nbdinfo mapped an unknown context");
    // NBD_OPT_LIST_META_CONTEXT: nbdinfo lists what the export offers.
    let info = String::from_utf8(run("nbdinfo", &[&url]).await).unwrap();
    let contexts: Vec<&str> = info
        .lines()
        .skip_while(|l| l.trim() != "contexts:")
        .skip(1)
        .take_while(|l| l.starts_with("\t\t"))
        .map(str::trim)
        .collect();
    assert_eq!(
        contexts,
        ["base:allocation", "qemu:dirty-bitmap:cp"],
        "{info}"
    );
    for (what, flag) in [
        ("--can", "structured-reply"),
        ("--can", "cache"),
        ("--can", "fast-zero"),
        ("--can", "df"),
        ("--can", "multi-conn"),
    ] {
        let status = tokio::process::Command::new("nbdinfo")
            .args([what, flag, &url])
            .status()
            .await
            .unwrap();
        assert_eq!(status.code(), Some(0), "nbdinfo {what} {flag}");
    }
    let status = tokio::process::Command::new("nbdinfo")
        .args(["--is", "read-only", &url])
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(2), "a writable export is not read-only");
    let stats = srv.server.stats();
    assert!(stats.sessions_structured.load(Ordering::Relaxed) >= 1);
    assert!(stats.block_status_chunks.load(Ordering::Relaxed) >= 2);
    srv.stop().await;
    let ro = start(
        MemBackend::new(MIB as usize),
        export("ro", true),
        "127.0.0.1:0",
    )
    .await;
    let url = format!("nbd://127.0.0.1:{}/ro", ro.tcp_port());
    let status = tokio::process::Command::new("nbdinfo")
        .args(["--is", "read-only", &url])
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "a read-only export says so");
    ro.stop().await;
}

async fn connect(port: u16, structured: bool, extended: bool, contexts: &[&str]) -> NbdClient {
    NbdClient::connect_with(
        &format!("127.0.0.1:{port}"),
        ClientOptions {
            export_name: "vol".into(),
            structured,
            extended,
            meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
            tls: None,
        },
    )
    .await
    .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tandem_client_and_server_agree_in_every_reply_style() {
    let backend = MemBackend::new(8 * MIB as usize);
    let srv = start(backend.clone(), export("vol", false), "127.0.0.1:0").await;
    for (structured, extended, contexts) in [
        (false, false, &[][..]),
        (true, false, &["base:allocation"][..]),
        (false, true, &["base:allocation"][..]),
        (true, true, &["base:allocation"][..]),
    ] {
        let c = connect(srv.tcp_port(), structured, extended, contexts).await;
        let n = c.negotiated();
        assert_eq!(n.style == HeaderStyle::Extended, extended);
        assert_eq!(n.reply != ReplyStyle::Simple, structured || extended);
        let data: Vec<u8> = (0..100_352u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        c.write(12_288, Bytes::from(data.clone()), true)
            .await
            .unwrap();
        assert_eq!(&c.read(12_288, 100_352).await.unwrap()[..], &data[..]);
        // Zeroes come back as a hole chunk where structured replies are on.
        assert!(
            c.read(4 * MIB, 65536)
                .await
                .unwrap()
                .iter()
                .all(|b| *b == 0)
        );
        c.write_zeroes_with(12_288, 1024, false, false)
            .await
            .unwrap();
        assert!(c.read(12_288, 1024).await.unwrap().iter().all(|b| *b == 0));
        c.trim(MIB, 4096).await.unwrap();
        c.cache(0, 8 * MIB).await.unwrap();
        c.flush().await.unwrap();
        // MemBackend does not zero fast: refused at once, nothing changed.
        match c.write_zeroes_with(13_312, 512, false, true).await {
            Err(NbdClientError::Server { errno: 95, .. }) => {}
            other => panic!("fast zero: {other:?}"),
        }
        assert_eq!(c.read(13_312, 512).await.unwrap()[..], data[1024..1536]);
        if !contexts.is_empty() {
            let extents = c.block_status("base:allocation", 0, 8 * MIB).await.unwrap();
            assert_eq!(
                extents,
                vec![BlockStatusExtent {
                    len: 8 * MIB,
                    flags: 0
                }]
            );
            // Out of range: an error, and the connection carries on.
            match c.block_status("base:allocation", 8 * MIB - 512, 1024).await {
                Err(NbdClientError::Server { errno: 22, .. }) => {}
                other => panic!("block status out of range: {other:?}"),
            }
        }
        assert_eq!(
            &c.read(12_288 + 1024, 512).await.unwrap()[..],
            &data[1024..1536]
        );
        c.disconnect().await.unwrap();
    }
    // Contexts the export lacks are not selected; block status is then refused locally.
    let c = connect(
        srv.tcp_port(),
        true,
        false,
        &["qemu:dirty-bitmap:nope", "x-a:b"],
    )
    .await;
    assert!(c.negotiated().contexts.is_empty());
    assert!(matches!(
        c.block_status("qemu:dirty-bitmap:nope", 0, 512).await,
        Err(NbdClientError::InvalidRequest { .. })
    ));
    c.disconnect().await.unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_bit_lengths_reach_the_backend_in_pieces_and_block_status_spans_them() {
    let backend = RecordingBackend::new(
        16 * GIB,
        vec![(GIB, 9 * GIB)],
        vec![(0, 4096), (12 * GIB, 12 * GIB + MIB)],
    );
    let srv = start_with(
        backend.clone(),
        export("vol", false),
        "127.0.0.1:0",
        ServerOptions::default(),
    )
    .await;
    let c = connect(
        srv.tcp_port(),
        true,
        true,
        &["base:allocation", "qemu:dirty-bitmap:cp"],
    )
    .await;
    assert_eq!(c.negotiated().contexts.len(), 2);
    c.trim_extended(GIB, 6 * GIB).await.unwrap();
    c.write_zeroes_with(8 * GIB, 5 * GIB, false, true)
        .await
        .unwrap();
    let ops = backend.ops.lock().unwrap().clone();
    let trims: Vec<_> = ops.iter().filter(|o| o.0 == "trim").collect();
    assert_eq!(trims.len(), 6);
    assert_eq!(trims.iter().map(|o| o.2).sum::<u64>(), 6 * GIB);
    let zeroes: u64 = ops.iter().filter(|o| o.0 == "zeroes").map(|o| o.2).sum();
    assert_eq!(zeroes, 5 * GIB);
    // One 64-bit descriptor covers the 8 GiB hole.
    let map = c
        .block_status("base:allocation", 0, 16 * GIB)
        .await
        .unwrap();
    assert_eq!(
        map,
        vec![
            BlockStatusExtent { len: GIB, flags: 0 },
            BlockStatusExtent {
                len: 8 * GIB,
                flags: 3
            },
            BlockStatusExtent {
                len: 7 * GIB,
                flags: 0
            },
        ]
    );
    let dirty = c
        .block_status("qemu:dirty-bitmap:cp", 0, 16 * GIB)
        .await
        .unwrap();
    assert_eq!(
        dirty[0],
        BlockStatusExtent {
            len: 4096,
            flags: 1
        }
    );
    assert_eq!(dirty[2], BlockStatusExtent { len: MIB, flags: 1 });
    c.disconnect().await.unwrap();
    // Compact headers: the same hole is split into 32-bit descriptors.
    let c = connect(srv.tcp_port(), true, false, &["base:allocation"]).await;
    let map = c
        .block_status("base:allocation", GIB, u64::from(u32::MAX) & !511)
        .await
        .unwrap();
    assert!(
        map.iter()
            .all(|e| e.len <= u64::from(u32::MAX) && e.flags == 3)
    );
    assert!(matches!(
        c.trim_extended(0, 5 * GIB).await,
        Err(NbdClientError::InvalidRequest { .. })
    ));
    c.disconnect().await.unwrap();
    assert!(
        srv.server
            .stats()
            .block_status_ext_chunks
            .load(Ordering::Relaxed)
            >= 2
    );
    srv.stop().await;
}

/// Certificates for a node and two export clients from one CA, plus a foreign CA.
fn certs(dir: &std::path::Path) {
    tandem::transport::generate_certs(&dir.join("ca1"), &["primary", "backup", "intruder"])
        .unwrap();
    tandem::transport::generate_certs(&dir.join("ca2"), &["backup"]).unwrap();
}

fn tls_options(dir: &std::path::Path) -> ServerOptions {
    let files = tandem::transport::TlsFiles {
        dir: dir.join("ca1"),
        node_name: "primary".into(),
        peer_name: "secondary".into(),
    };
    ServerOptions {
        tls: Some(tandem::transport::export_server_config(&files, &["backup".into()]).unwrap()),
        ..ServerOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_export_admits_listed_client_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let backend = MemBackend::new(MIB as usize);
    let srv = start_with(
        backend.clone(),
        export("vol", false),
        "127.0.0.1:0",
        tls_options(dir.path()),
    )
    .await;
    let addr = format!("127.0.0.1:{}", srv.tcp_port());
    let options = |tls| ClientOptions {
        export_name: "vol".into(),
        structured: true,
        tls,
        ..ClientOptions::default()
    };
    let good =
        tandem::nbd::tls::client_tls(&dir.path().join("ca1"), "backup", "127.0.0.1").unwrap();
    let c = NbdClient::connect_with(&addr, options(Some(good)))
        .await
        .expect("TLS connect");
    assert!(c.negotiated().tls);
    let block = Bytes::from(b"over tls".repeat(64));
    c.write(0, block.clone(), true).await.unwrap();
    assert_eq!(c.read(0, 512).await.unwrap(), block);
    c.disconnect().await.unwrap();
    // Plaintext: every option is refused until STARTTLS.
    match NbdClient::connect_with(&addr, options(None)).await {
        Err(NbdClientError::TlsRequired { .. }) => {}
        other => panic!("plaintext client: {other:?}"),
    }
    // A certificate of the same CA for a name not listed, and one of another CA.
    let intruder =
        tandem::nbd::tls::client_tls(&dir.path().join("ca1"), "intruder", "127.0.0.1").unwrap();
    assert!(
        NbdClient::connect_with(&addr, options(Some(intruder)))
            .await
            .is_err()
    );
    let mut foreign =
        tandem::nbd::tls::client_tls(&dir.path().join("ca2"), "backup", "127.0.0.1").unwrap();
    // It trusts our CA (so the server certificate checks out), but presents its own.
    foreign.config = {
        let files = tandem::transport::TlsFiles {
            dir: dir.path().join("mixed"),
            node_name: "backup".into(),
            peer_name: "primary".into(),
        };
        std::fs::create_dir_all(dir.path().join("mixed")).unwrap();
        std::fs::copy(
            dir.path().join("ca1/ca.pem"),
            dir.path().join("mixed/ca.pem"),
        )
        .unwrap();
        std::fs::copy(
            dir.path().join("ca2/backup.pem"),
            dir.path().join("mixed/backup.pem"),
        )
        .unwrap();
        std::fs::copy(
            dir.path().join("ca2/backup.key"),
            dir.path().join("mixed/backup.key"),
        )
        .unwrap();
        tandem::transport::export_client_config(&files).unwrap()
    };
    assert!(
        NbdClient::connect_with(&addr, options(Some(foreign)))
            .await
            .is_err()
    );
    let stats = srv.server.stats();
    assert_eq!(counter_reaches(&stats.tls_handshakes_failed, 2).await, 2);
    assert_eq!(stats.sessions_tls.load(Ordering::Relaxed), 1);
    assert_eq!(backend.mutations(), 1);
    srv.stop().await;
}

/// Read the greeting and send client flags; returns the stream.
async fn hello(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    proto::decode_greeting(&greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    s
}

/// The value of a server counter once it reaches `want` (or after 10 s): the
/// server bumps some counters just after it drops the connection, so a client
/// that saw the close may look before the bump (a flaky failure under suite load).
async fn counter_reaches(c: &std::sync::atomic::AtomicU64, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = c.load(Ordering::Relaxed);
        if v >= want || std::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn expect_closed(s: &mut TcpStream) {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the server did not close the connection")
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_sent_after_starttls_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let backend = MemBackend::new(MIB as usize);
    let srv = start_with(
        backend.clone(),
        export("vol", false),
        "127.0.0.1:0",
        tls_options(dir.path()),
    )
    .await;
    let mut s = hello(srv.tcp_port()).await;
    // STARTTLS and, in the same segment, a plaintext GO meant to run "inside" TLS.
    let mut m = Vec::new();
    proto::encode_option(&mut m, &proto::ClientOption::StartTls);
    proto::encode_option(
        &mut m,
        &proto::ClientOption::Go(proto::InfoRequest {
            name: b"",
            infos: vec![],
        }),
    );
    s.write_all(&m).await.unwrap();
    let mut header = [0u8; 20];
    s.read_exact(&mut header).await.unwrap();
    let h = proto::decode_option_reply_header(&header).unwrap();
    assert_eq!(h.reply_type, proto::REP_ACK);
    expect_closed(&mut s).await;
    assert_eq!(
        counter_reaches(&srv.server.stats().handshakes_failed, 1).await,
        1
    );
    assert_eq!(srv.server.stats().sessions.load(Ordering::Relaxed), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_counted_and_the_session_survives_them() {
    let backend = MemBackend::new(MIB as usize);
    let srv = start(backend.clone(), export("vol", false), "127.0.0.1:0").await;
    let mut s = hello(srv.tcp_port()).await;
    let mut m = Vec::new();
    proto::encode_option(
        &mut m,
        &proto::ClientOption::Go(proto::InfoRequest {
            name: b"",
            infos: vec![],
        }),
    );
    s.write_all(&m).await.unwrap();
    // INFO_EXPORT, then ACK.
    for _ in 0..2 {
        let mut header = [0u8; 20];
        s.read_exact(&mut header).await.unwrap();
        let h = proto::decode_option_reply_header(&header).unwrap();
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data).await.unwrap();
    }
    const BAD: u64 = 2000;
    let mut batch = Vec::new();
    let mut header = Vec::new();
    for cookie in 0..BAD {
        let r = proto::Request {
            flags: 0,
            kind: proto::CMD_READ,
            cookie,
            offset: MIB,
            len: 512,
        };
        proto::encode_request_header(HeaderStyle::Compact, &r, &mut header).unwrap();
        batch.extend_from_slice(&header);
    }
    let writer = tokio::spawn(async move {
        let (mut r, mut w) = s.into_split();
        w.write_all(&batch).await.unwrap();
        let mut replies = vec![0u8; BAD as usize * 16];
        r.read_exact(&mut replies).await.unwrap();
        (r, w, replies)
    });
    let (mut r, mut w, replies) = writer.await.unwrap();
    for reply in replies.chunks(16) {
        match proto::decode_reply_header(reply).unwrap() {
            proto::ReplyHeader::Simple { errno, .. } => assert_eq!(errno, 22),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        srv.server.stats().requests_rejected.load(Ordering::Relaxed),
        BAD
    );
    // Still in sync: a valid flush.
    let mut header = Vec::new();
    let flush = proto::Request {
        flags: 0,
        kind: proto::CMD_FLUSH,
        cookie: 9,
        offset: 0,
        len: 0,
    };
    proto::encode_request_header(HeaderStyle::Compact, &flush, &mut header).unwrap();
    w.write_all(&header).await.unwrap();
    let mut reply = [0u8; 16];
    r.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        proto::decode_reply_header(&reply).unwrap(),
        proto::ReplyHeader::Simple {
            errno: 0,
            cookie: 9
        }
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_write_payload_drops_the_connection_and_frees_its_budget() {
    let backend = MemBackend::new(64 * MIB as usize);
    let srv = start_with(
        backend.clone(),
        export("vol", false),
        "127.0.0.1:0",
        ServerOptions {
            payload_stall_timeout: Some(Duration::from_millis(500)),
            ..ServerOptions::default()
        },
    )
    .await;
    let c = NbdClient::connect(&format!("127.0.0.1:{}", srv.tcp_port()), "vol")
        .await
        .unwrap();
    // A raw client announces a 32 MiB write, sends 1 MiB of it and stalls.
    let mut s = hello(srv.tcp_port()).await;
    let mut m = Vec::new();
    proto::encode_option(&mut m, &proto::ClientOption::ExportName(b""));
    s.write_all(&m).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    let mut header = Vec::new();
    let w = proto::Request {
        flags: 0,
        kind: proto::CMD_WRITE,
        cookie: 1,
        offset: 0,
        len: 32 * MIB,
    };
    proto::encode_request_header(HeaderStyle::Compact, &w, &mut header).unwrap();
    s.write_all(&header).await.unwrap();
    s.write_all(&vec![7u8; MIB as usize]).await.unwrap();
    let started = std::time::Instant::now();
    expect_closed(&mut s).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        counter_reaches(&srv.server.stats().payload_timeouts, 1).await,
        1
    );
    assert_eq!(
        backend.mutations(),
        0,
        "a partial payload reached the backend"
    );
    // Other clients never noticed.
    c.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    c.disconnect().await.unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_requests_reach_the_backend() {
    let backend = RecordingBackend::new(GIB, vec![], vec![]);
    let srv = start_with(
        backend.clone(),
        export("vol", false),
        "127.0.0.1:0",
        ServerOptions::default(),
    )
    .await;
    let c = connect(srv.tcp_port(), false, false, &[]).await;
    c.cache(0, GIB).await.unwrap();
    c.disconnect().await.unwrap();
    assert!(backend.caches.load(Ordering::SeqCst) >= 1);
    srv.stop().await;
}
