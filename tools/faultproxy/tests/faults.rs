//! Each fault against real TCP: an echo (or recording) server behind an in-process proxy,
//! plus the binary's control socket and `ctl` client.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use faultproxy::{Dir, Fault, Proxy};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::time::timeout;

const LOCALHOST_ANY_PORT: &str = "127.0.0.1:0";
const TEST_TIMEOUT: Duration = Duration::from_secs(15);

fn random_bytes(seed: u64, len_bytes: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len_bytes];
    StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// Echo server: every connection gets its bytes back until EOF.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(LOCALHOST_ANY_PORT).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut rd, mut wr) = sock.split();
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = wr.shutdown().await;
                }
            });
        }
    });
    addr
}

async fn proxy_to(upstream: SocketAddr, seed: u64) -> Proxy {
    Proxy::start(LOCALHOST_ANY_PORT.parse().unwrap(), upstream, seed)
        .await
        .unwrap()
}

/// Writes `data` and reads the same number of bytes back, concurrently.
async fn round_trip(sock: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut rd, mut wr) = sock.split();
    let mut back = vec![0u8; data.len()];
    let (w, r) = tokio::join!(wr.write_all(data), rd.read_exact(&mut back));
    w?;
    r?;
    Ok(back)
}

/// Reads until EOF or error; returns what arrived and how it ended.
async fn read_until_end<R: AsyncReadExt + Unpin>(mut rd: R) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_round_trips_1_mib_of_random_bytes_intact() {
    let proxy = proxy_to(echo_server().await, 1).await;
    let data = random_bytes(11, 1 << 20);
    let mut sock = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let back = timeout(TEST_TIMEOUT, round_trip(&mut sock, &data))
        .await
        .unwrap()
        .unwrap();
    assert!(back == data, "echoed bytes differ from the sent bytes");
    let stats = proxy.stats();
    assert_eq!(stats.bytes_up, 1 << 20);
    assert_eq!(stats.bytes_down, 1 << 20);
    assert_eq!(stats.connections_accepted, 1);
    assert_eq!(stats.bits_flipped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_adds_latency_both_ways_and_jitter_keeps_order() {
    let proxy = proxy_to(echo_server().await, 2).await;
    let mut sock = TcpStream::connect(proxy.local_addr()).await.unwrap();
    sock.set_nodelay(true).unwrap();
    let started = Instant::now();
    round_trip(&mut sock, b"ping").await.unwrap();
    let undelayed = started.elapsed();
    assert!(undelayed < Duration::from_millis(200), "{undelayed:?}");

    // Applies to the already open connection.
    proxy.set(Fault::Delay {
        ms: 100,
        jitter_ms: 0,
        dir: Dir::Both,
    });
    let started = Instant::now();
    round_trip(&mut sock, b"ping").await.unwrap();
    let delayed = started.elapsed();
    assert!(
        delayed >= Duration::from_millis(200) && delayed < Duration::from_millis(1500),
        "round trip took {delayed:?}, expected 200 ms (100 ms each way)"
    );

    // Jitter larger than the gap between chunks: a chunk may get an earlier deadline than
    // its predecessor, yet bytes must arrive in order.
    proxy.set(Fault::Delay {
        ms: 20,
        jitter_ms: 15,
        dir: Dir::Both,
    });
    let data = random_bytes(22, 64 * 1000);
    let (mut rd, mut wr) = sock.split();
    let writer = async {
        for piece in data.chunks(1000) {
            wr.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let mut back = vec![0u8; data.len()];
    let (_, r) = timeout(TEST_TIMEOUT, async {
        tokio::join!(writer, rd.read_exact(&mut back))
    })
    .await
    .unwrap();
    r.unwrap();
    assert!(back == data, "jittered stream was reordered or corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_limits_the_rate_of_one_direction() {
    let proxy = proxy_to(echo_server().await, 3).await;
    let bytes_per_s: u64 = 256 * 1024;
    proxy.set(Fault::Throttle {
        bytes_per_s,
        dir: Dir::Up,
    });
    let data = random_bytes(33, 384 * 1024);
    let mut sock = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let started = Instant::now();
    let back = timeout(TEST_TIMEOUT, round_trip(&mut sock, &data))
        .await
        .unwrap()
        .unwrap();
    let elapsed_s = started.elapsed().as_secs_f64();
    assert!(back == data);
    let measured_bytes_per_s = data.len() as f64 / elapsed_s;
    assert!(
        measured_bytes_per_s <= 2.0 * bytes_per_s as f64
            && measured_bytes_per_s >= bytes_per_s as f64 / 2.0,
        "measured {measured_bytes_per_s:.0} B/s for a throttle of {bytes_per_s} B/s"
    );

    // Cleared: the same transfer is much faster.
    proxy.clear();
    let started = Instant::now();
    round_trip(&mut sock, &data).await.unwrap();
    assert!(started.elapsed().as_secs_f64() < elapsed_s / 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_stalls_with_backpressure_then_resumes_intact_when_cleared() {
    let proxy = proxy_to(echo_server().await, 4).await;
    let mut sock = TcpStream::connect(proxy.local_addr()).await.unwrap();
    round_trip(&mut sock, b"before").await.unwrap();

    proxy.set(Fault::Blackhole);
    // More than every buffer on the path can hold (client send buffer ≤ 4 MiB, proxy
    // receive buffer ≤ 32 MiB here, proxy queue < 1 MiB), so the writer must block.
    // Each 8-byte word holds its own index (cheap to make in a debug build, and any loss,
    // duplication or reordering shows).
    let data: Arc<Vec<u8>> = Arc::new(
        (0..(48u64 << 20) / 8)
            .flat_map(|i| (i ^ 0x5A5A_5A5A_5A5A_5A5A).to_le_bytes())
            .collect(),
    );
    let (mut rd, mut wr) = sock.into_split();
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            wr.write_all(&data).await.unwrap();
            wr
        })
    };
    let received = Arc::new(AtomicUsize::new(0));
    let reader = {
        let received = received.clone();
        let len = data.len();
        tokio::spawn(async move {
            let mut back = vec![0u8; len];
            let mut filled = 0;
            while filled < len {
                let n = rd.read(&mut back[filled..]).await.unwrap();
                assert!(n > 0, "unexpected EOF after {filled} bytes");
                filled += n;
                received.store(filled, Ordering::SeqCst);
            }
            back
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats_during = proxy.stats();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !writer.is_finished(),
        "writer finished: the blackhole buffered everything"
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        0,
        "bytes crossed the blackhole"
    );
    let stats_after = proxy.stats();
    assert_eq!(stats_during.bytes_up, stats_after.bytes_up);
    assert_eq!(stats_during.bytes_down, stats_after.bytes_down);
    assert_eq!(stats_after.resets, 0);

    proxy.clear();
    let back = timeout(TEST_TIMEOUT, reader).await.unwrap().unwrap();
    timeout(TEST_TIMEOUT, writer).await.unwrap().unwrap();
    assert!(back == *data, "data after the blackhole differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_clients_a_connection_error_and_reject_new_refuses_until_cleared() {
    let proxy = proxy_to(echo_server().await, 5).await;
    let mut open = TcpStream::connect(proxy.local_addr()).await.unwrap();
    round_trip(&mut open, b"hello").await.unwrap();

    proxy.set(Fault::Reset { reject_new: true });
    let mut buf = [0u8; 16];
    let read = timeout(TEST_TIMEOUT, open.read(&mut buf)).await.unwrap();
    match read {
        Err(e) => assert!(is_reset(&e), "{e:?}"),
        Ok(n) => panic!("expected a reset, read returned Ok({n})"),
    }

    // The proxy accepts and resets at once: the RST may even beat connect()'s completion.
    match TcpStream::connect(proxy.local_addr()).await {
        Err(e) => assert!(is_reset(&e), "{e:?}"),
        Ok(mut refused) => {
            let read = timeout(TEST_TIMEOUT, refused.read(&mut buf)).await.unwrap();
            match read {
                Err(e) => assert!(is_reset(&e), "{e:?}"),
                Ok(n) => panic!("expected a reset of the new connection, read returned Ok({n})"),
            }
        }
    }

    proxy.clear();
    let mut fresh = TcpStream::connect(proxy.local_addr()).await.unwrap();
    assert_eq!(round_trip(&mut fresh, b"again").await.unwrap(), b"again");
    let stats = proxy.stats();
    assert_eq!(stats.resets, 1);
    assert_eq!(stats.connections_rejected, 1);
    assert_eq!(stats.connections_active, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_after_n_bytes_up_delivers_exactly_n_then_both_sides_error() {
    let listener = TcpListener::bind(LOCALHOST_ANY_PORT).await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let recorder = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        read_until_end(sock).await
    });
    let proxy = proxy_to(upstream, 6).await;
    let mut sock = TcpStream::connect(proxy.local_addr()).await.unwrap();
    // Set while the connection is open: "N more bytes" from now.
    let cut_bytes = 12_345;
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.set(Fault::CutAfter {
        bytes: cut_bytes,
        dir: Dir::Up,
    });
    let data = random_bytes(66, 50_000);
    let mut write_end = Ok(());
    for piece in data.chunks(5000) {
        write_end = sock.write_all(piece).await;
        if write_end.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (got, end) = timeout(TEST_TIMEOUT, recorder).await.unwrap().unwrap();
    assert_eq!(
        got.len() as u64,
        cut_bytes,
        "upstream got the wrong number of bytes"
    );
    assert!(
        got == data[..cut_bytes as usize],
        "the bytes before the cut differ"
    );
    assert!(
        matches!(&end, Err(e) if is_reset(e)),
        "upstream saw {end:?}, not a reset"
    );

    // The kernel reports a reset once: to the write that hit it, or else to the next read.
    let (back, read_end) = timeout(TEST_TIMEOUT, read_until_end(&mut sock))
        .await
        .unwrap();
    assert!(back.is_empty());
    assert!(
        matches!(&write_end, Err(e) if is_reset(e)) || matches!(&read_end, Err(e) if is_reset(e)),
        "client saw write {write_end:?} and read {read_end:?}, not a reset"
    );
    let stats = proxy.stats();
    assert_eq!(stats.bytes_up, cut_bytes);
    assert_eq!(stats.cuts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_after_n_bytes_down_delivers_exactly_n_to_the_client_then_errors() {
    let listener = TcpListener::bind(LOCALHOST_ANY_PORT).await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let data = random_bytes(77, 300_000);
    let sent = data.clone();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let _ = sock.write_all(&sent).await;
        // Keep the socket open so only the cut ends the connection.
        let _ = read_until_end(sock).await;
    });
    let proxy = proxy_to(upstream, 7).await;
    let cut_bytes = 100_001; // spans two 64 KiB chunks, ends mid-chunk
    proxy.set(Fault::CutAfter {
        bytes: cut_bytes,
        dir: Dir::Down,
    });
    let sock = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (got, end) = timeout(TEST_TIMEOUT, read_until_end(sock)).await.unwrap();
    assert_eq!(got.len() as u64, cut_bytes);
    assert!(got == data[..cut_bytes as usize]);
    assert!(
        matches!(&end, Err(e) if is_reset(e)),
        "client saw {end:?}, not a reset"
    );
}

/// Sends `count` 256-byte messages one at a time (each waits for its echo, so each is one
/// chunk per direction) and returns the number of differing bits per message.
async fn flipped_bits_per_message(proxy: &Proxy, count: usize) -> Vec<u32> {
    let mut sock = TcpStream::connect(proxy.local_addr()).await.unwrap();
    sock.set_nodelay(true).unwrap();
    let mut diffs = Vec::new();
    for i in 0..count {
        let msg = random_bytes(100 + i as u64, 256);
        let back = timeout(TEST_TIMEOUT, round_trip(&mut sock, &msg))
            .await
            .unwrap()
            .unwrap();
        diffs.push(
            msg.iter()
                .zip(&back)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum(),
        );
    }
    diffs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flip_bits_corrupts_exactly_one_bit_in_every_nth_chunk_reproducibly() {
    let echo = echo_server().await;
    let proxy = proxy_to(echo, 8).await;
    proxy.set(Fault::FlipBits {
        every_nth_chunk: 3,
        dir: Dir::Up,
    });
    let diffs = flipped_bits_per_message(&proxy, 9).await;
    assert_eq!(diffs, vec![0, 0, 1, 0, 0, 1, 0, 0, 1]);
    assert_eq!(proxy.stats().bits_flipped, 3);

    // Both directions, every chunk: each message crosses twice, two bits differ unless
    // both flips hit the same bit (then zero), never anything else.
    proxy.set(Fault::FlipBits {
        every_nth_chunk: 1,
        dir: Dir::Both,
    });
    let diffs = flipped_bits_per_message(&proxy, 4).await;
    assert!(diffs.iter().all(|&d| d == 2 || d == 0), "{diffs:?}");
    assert_eq!(proxy.stats().bits_flipped, 3 + 8);

    // Same seed, same connection order: the same bits flip.
    let positions = |proxy: Proxy| async move {
        proxy.set(Fault::FlipBits {
            every_nth_chunk: 1,
            dir: Dir::Up,
        });
        let mut sock = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let msg = vec![0u8; 512];
        round_trip(&mut sock, &msg).await.unwrap()
    };
    let a = positions(proxy_to(echo, 99).await).await;
    let b = positions(proxy_to(echo, 99).await).await;
    let c = positions(proxy_to(echo, 100).await).await;
    assert_eq!(a.iter().map(|x| x.count_ones()).sum::<u32>(), 1);
    assert_eq!(a, b, "same seed flipped different bits");
    assert_ne!(
        a, c,
        "different seeds flipped the same bit (1 in 4096 chance)"
    );
}

async fn control_request(path: &std::path::Path, line: &str) -> serde_json::Value {
    let sock = UnixStream::connect(path).await.unwrap();
    let (rd, mut wr) = sock.into_split();
    // The proxy answers an over-long line and closes before reading the rest, so a
    // write may fail with EPIPE; the reply is what the test checks.
    let _ = wr.write_all(line.as_bytes()).await;
    let _ = wr.write_all(b"\n").await;
    let mut reply = String::new();
    BufReader::new(rd).read_line(&mut reply).await.unwrap();
    serde_json::from_str(&reply).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_sets_clears_reports_and_rejects_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let proxy = proxy_to(echo_server().await, 9).await;
    proxy.serve_control(&path).unwrap();

    let r = control_request(
        &path,
        r#"{"cmd":"set","fault":{"kind":"delay","ms":50,"jitter_ms":10,"dir":"both"}}"#,
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["faults"][0]["kind"], "delay");
    assert_eq!(
        proxy.faults(),
        vec![Fault::Delay {
            ms: 50,
            jitter_ms: 10,
            dir: Dir::Both
        }]
    );
    let r = control_request(&path, r#"{"cmd":"stats"}"#).await;
    assert_eq!(r["stats"]["bytes_up"], 0, "{r}");
    let r = control_request(&path, r#"{"cmd":"clear"}"#).await;
    assert_eq!(r["faults"], serde_json::json!([]));
    assert!(proxy.faults().is_empty());

    let r = control_request(
        &path,
        r#"{"cmd":"set","fault":{"kind":"throttle","bytes_per_s":0}}"#,
    )
    .await;
    assert_eq!(r["ok"], false);
    assert!(proxy.faults().is_empty());
    let r = control_request(&path, r#"{"cmd":"explode"}"#).await;
    assert_eq!(r["ok"], false);
    let r = control_request(&path, &"x".repeat(10_000)).await;
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("exceeds"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_ctl_client_changes_faults_while_traffic_flows() {
    let dir = tempfile::tempdir().unwrap();
    let ctl_path = dir.path().join("ctl.sock");
    let echo = echo_server().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_faultproxy"))
        .args([
            "--listen",
            LOCALHOST_ANY_PORT,
            "--upstream",
            &echo.to_string(),
        ])
        .arg("--control")
        .arg(&ctl_path)
        .args(["--seed", "42"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    timeout(
        TEST_TIMEOUT,
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first_line),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(first_line.contains("seed=42"), "{first_line}");
    let listen: SocketAddr = first_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listening="))
        .unwrap()
        .parse()
        .unwrap();

    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_faultproxy"))
            .arg("ctl")
            .arg("--control")
            .arg(&ctl_path)
            .args(args)
            .output()
            .unwrap()
    };
    let mut sock = TcpStream::connect(listen).await.unwrap();
    round_trip(&mut sock, b"hi").await.unwrap();

    let out = ctl(&["set", "delay", "--ms", "150", "--dir", "up"]);
    assert!(out.status.success(), "{out:?}");
    let started = Instant::now();
    round_trip(&mut sock, b"hi").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));

    let out = ctl(&["stats"]);
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["stats"]["bytes_up"], 4, "{stats}");
    assert_eq!(stats["faults"][0]["ms"], 150);

    let out = ctl(&["set", "throttle", "--bytes-per-s", "0"]);
    assert!(!out.status.success(), "a zero throttle must be refused");
    let out = ctl(&["clear"]);
    assert!(out.status.success(), "{out:?}");
    let started = Instant::now();
    round_trip(&mut sock, b"hi").await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(150));
    child.kill().await.unwrap();
}
