//! Hostile input against real agents (the `tandem` binary as separate
//! processes, TLS between them), issue 14:
//!
//! - ten connections to the replication port that send one byte and hang delay
//!   a restarted primary's reconnect by less than a second;
//! - a flood of junk connections (TLS junk, plaintext junk, half handshakes,
//!   a node with the wrong certificate) and junk control lines grows each
//!   agent's log by less than 100 KB and shows up as counters in the status
//!   and in /metrics, while replication goes on;
//! - a 400 MiB control line costs no more than the line limit in memory, and
//!   a non-UTF-8 line gets an error reply.
//!
//! The flood runs `TANDEM_JUNK_SECONDS` seconds (default 15 here; the issue's
//! figure is 60 s: `TANDEM_JUNK_SECONDS=60 cargo nextest run --test
//! transport_e2e_hostile junk`). It prints its rate.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, NodeOpts, READY_TIMEOUT, Site, free_port, primary_in_sync, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 64 << 20;

struct Rig {
    primary: Agent,
    secondary: Agent,
    repl_port: u16,
    primary_listen: u16,
    nbd_port: u16,
    metrics: [String; 2],
    site: Site,
}

impl Rig {
    fn start() -> Rig {
        let site = Site::with_names(&["primary", "secondary", "gamma"]);
        let repl_port = free_port();
        let primary_listen = free_port();
        let nbd_port = free_port();
        let metrics = [
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        ];
        let mut secondary = site.secondary(
            "secondary",
            &site.path("secondary.img"),
            SIZE,
            repl_port,
            &NodeOpts {
                extra: vec!["--metrics".into(), metrics[1].clone()],
                ..NodeOpts::default()
            },
        );
        secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
        let mut rig = Rig {
            primary: Rig::spawn_primary(&site, repl_port, primary_listen, nbd_port, &metrics[0]),
            secondary,
            repl_port,
            primary_listen,
            nbd_port,
            metrics,
            site,
        };
        rig.wait_synced();
        rig
    }

    fn spawn_primary(
        site: &Site,
        repl_port: u16,
        listen: u16,
        nbd_port: u16,
        metrics: &str,
    ) -> Agent {
        site.primary(
            "primary",
            &site.path("primary.img"),
            SIZE,
            "sync",
            repl_port,
            nbd_port,
            &NodeOpts {
                extra: vec![
                    "--listen".into(),
                    format!("127.0.0.1:{listen}"),
                    "--metrics".into(),
                    metrics.into(),
                ],
                ..NodeOpts::default()
            },
        )
    }

    fn wait_synced(&mut self) {
        self.primary
            .wait_status("connected and in sync", READY_TIMEOUT, primary_in_sync);
    }

    /// Stop the primary, start it again, and time it from spawn to connected.
    fn restart_primary(&mut self) -> Duration {
        self.primary.stop();
        let started = Instant::now();
        self.primary = Rig::spawn_primary(
            &self.site,
            self.repl_port,
            self.primary_listen,
            self.nbd_port,
            &self.metrics[0],
        );
        self.primary.wait_status("reconnected", READY_TIMEOUT, |s| {
            s["peer"]["connection"] == "connected"
        });
        started.elapsed()
    }
}

/// Connections that send one byte (the first of a TLS record) and hang.
fn hanging_connections(port: u16, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(&[0x16]).unwrap();
            c
        })
        .collect()
}

#[test]
fn ten_hanging_connections_delay_a_reconnect_by_less_than_a_second() {
    let mut rig = Rig::start();
    // Baseline and with junk, twice each; the smallest of each pair counts
    // (agent start-up on a busy machine varies more than what is measured).
    let mut baseline = Duration::MAX;
    let mut with_junk = Duration::MAX;
    for _ in 0..2 {
        baseline = baseline.min(rig.restart_primary());
        // Ten connections hang on the secondary's replication port, opened
        // just before the primary comes back (the handshake deadline is 5 s).
        let junk = hanging_connections(rig.repl_port, 10);
        with_junk = with_junk.min(rig.restart_primary());
        drop(junk);
    }
    let delay = with_junk.saturating_sub(baseline);
    println!(
        "reconnect: {baseline:?} without junk, {with_junk:?} with 10 hanging connections: delayed by {delay:?}"
    );
    // One handshake at a time, 10 s each, made it wait 10 x 10 s (issue 14).
    assert!(delay < Duration::from_secs(1), "delayed by {delay:?}");
    let s = rig.secondary.status().expect("status");
    assert!(
        s["rejected"]["handshakes"].as_u64().unwrap_or(0) >= 10,
        "the hanging connections are counted: {}",
        s["rejected"]
    );
}

/// The first TLS record a real client sends (its ClientHello), to replay as a
/// half handshake.
fn client_hello(certs: &Path) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = tandem::transport::TlsClient::load(&tandem::transport::TlsFiles {
            dir: certs.to_path_buf(),
            node_name: "primary".into(),
            peer_name: "secondary".into(),
        })
        .unwrap();
        let (a, mut b) = tokio::io::duplex(64 << 10);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let dial = tokio::spawn(async move { client.connect(a, addr).await.map(|_| ()) });
        let mut head = [0u8; 5];
        b.read_exact(&mut head).await.unwrap();
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        let mut body = vec![0u8; len];
        b.read_exact(&mut body).await.unwrap();
        dial.abort();
        let mut hello = head.to_vec();
        hello.extend(body);
        hello
    })
}

#[derive(Default)]
struct JunkStats {
    connections: AtomicU64,
    control_lines: AtomicU64,
}

/// Open junk connections to `ports` as fast as they go until `stop`.
async fn junk_worker(
    id: u64,
    ports: Arc<Vec<(u16, tandem::transport::Security)>>,
    hello: Arc<Vec<u8>>,
    stats: Arc<JunkStats>,
    stop: Arc<AtomicBool>,
) {
    let mut held = std::collections::VecDeque::new();
    let mut n: u64 = id;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        // Every kind of junk goes to every port.
        let (port, gamma) = &ports[((n / 8) % ports.len() as u64) as usize];
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        match n % 8 {
            // A node of the same CA with the wrong name: a full handshake, refused.
            0 => {
                let _ = tandem::transport::connect(addr, gamma, 2_000).await;
            }
            kind => {
                let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else {
                    continue;
                };
                let junk: Vec<u8> = match kind {
                    1 | 2 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                    3 | 4 => {
                        // A TLS record header with garbage.
                        let mut j = vec![0x16, 0x03, 0x01, 0x00, 0x40];
                        j.extend((0..64).map(|i| (i as u64 * n) as u8));
                        j
                    }
                    // A real ClientHello, then nothing (held open a while).
                    _ => hello.to_vec(),
                };
                let _ = c.write_all(&junk).await;
                if kind >= 5 {
                    held.push_back(c);
                    if held.len() > 8 {
                        held.pop_front();
                    }
                }
            }
        }
        stats.connections.fetch_add(1, Ordering::Relaxed);
    }
}

/// Junk lines to a control socket until `stop`: not UTF-8, not JSON, too long.
fn control_junk(sock: &Path, stats: &JunkStats, stop: &AtomicBool) {
    let long = vec![b'x'; 100 << 10];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = UnixStream::connect(sock) else {
            continue;
        };
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(b"\xff\xfe\xfd\n{not json\n");
        let _ = c.write_all(&long);
        let _ = c.write_all(b"\n");
        let mut buf = [0u8; 4096];
        let mut replies = 0;
        let mut got = Vec::new();
        while replies < 3 {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    got.extend_from_slice(&buf[..k]);
                    replies = got.iter().filter(|b| **b == b'\n').count();
                }
            }
        }
        stats.control_lines.fetch_add(3, Ordering::Relaxed);
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn junk_flood_keeps_logs_small_and_is_counted_in_status_and_metrics() {
    let seconds: u64 = std::env::var("TANDEM_JUNK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut rig = Rig::start();
    let logs = [rig.primary.log.clone(), rig.secondary.log.clone()];
    let before = logs.each_ref().map(|l| file_len(l));
    let hello = Arc::new(client_hello(&rig.site.certs));
    // gamma holds a certificate of the same CA and dials each node by its name:
    // the node refuses gamma's name.
    let gamma = |peer: &str| {
        tandem::transport::Security::Tls(tandem::transport::TlsFiles {
            dir: rig.site.certs.clone(),
            node_name: "gamma".into(),
            peer_name: peer.into(),
        })
    };
    let ports = Arc::new(vec![
        (rig.repl_port, gamma("secondary")),
        (rig.primary_listen, gamma("primary")),
    ]);
    let stats = Arc::new(JunkStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let workers: Vec<_> = (0..6)
        .map(|id| {
            rt.spawn(junk_worker(
                id,
                ports.clone(),
                hello.clone(),
                stats.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let controls: Vec<_> = [rig.primary.control.clone(), rig.secondary.control.clone()]
        .into_iter()
        .map(|sock| {
            let (stats, stop) = (stats.clone(), stop.clone());
            std::thread::spawn(move || control_junk(&sock, &stats, &stop))
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        rt.block_on(w).unwrap();
    }
    for c in controls {
        c.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(rt);
    let connections = stats.connections.load(Ordering::Relaxed);
    let lines = stats.control_lines.load(Ordering::Relaxed);
    // Let the handshakes still in progress time out (5 s) and be counted.
    std::thread::sleep(Duration::from_secs(6));
    let grown = [0, 1].map(|i| file_len(&logs[i]).saturating_sub(before[i]));
    println!(
        "junk for {elapsed:.1} s: {connections} connections ({:.0}/s), {lines} control lines ({:.0}/s); logs grew by {} bytes (primary) and {} bytes (secondary)",
        connections as f64 / elapsed,
        lines as f64 / elapsed,
        grown[0],
        grown[1]
    );
    // What the secondary logged about the flood (a few lines per condition).
    let tail = std::fs::read(&logs[1]).unwrap();
    println!(
        "----- the secondary's log during the flood -----\n{}",
        String::from_utf8_lossy(&tail[(before[1] as usize).min(tail.len())..])
    );
    for (i, name) in ["primary", "secondary"].iter().enumerate() {
        assert!(
            grown[i] < 100_000,
            "{name}'s log grew by {} bytes:\n{}",
            grown[i],
            String::from_utf8_lossy(
                &std::fs::read(&logs[i]).unwrap()[before[i] as usize..]
                    [..(grown[i] as usize).min(20_000)]
            )
        );
    }
    // Counted, in the status and in /metrics, on both agents.
    for (i, agent) in [&rig.primary, &rig.secondary].into_iter().enumerate() {
        let s = agent.status().expect("status");
        let r = &s["rejected"];
        println!("{} rejected: {r}", agent.name);
        let handshakes = r["handshakes"].as_u64().unwrap();
        let control = r["control_lines"].as_u64().unwrap();
        assert!(handshakes > 100, "{}: {r}", agent.name);
        assert!(control > 10, "{}: {r}", agent.name);
        for reason in [
            "transport.plaintext-peer",
            "transport.not-tls",
            "transport.peer-name",
            "control.not-utf8",
            "control.malformed-json",
            "control.line-too-long",
        ] {
            assert!(
                r["reasons"][reason].as_u64().unwrap_or(0) > 0,
                "{reason}: {r}"
            );
        }
        let text = scrape(&rig.metrics[i]);
        let m = common::metric(&text, "tandem_rejected_total", &[("kind", "handshake")]);
        assert!(m >= handshakes as f64, "{m} < {handshakes}");
        assert!(common::metric(&text, "tandem_rejected_total", &[("kind", "control_line")]) > 0.0);
    }
    // Replication went on throughout.
    rig.wait_synced();
    let s = rig.secondary.status().unwrap();
    assert_eq!(s["peer"]["connection"], "connected", "{s}");
}

/// Peak resident memory of a process (VmHWM), bytes.
fn peak_rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

fn read_reply(c: &mut UnixStream) -> serde_json::Value {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    serde_json::from_slice(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
}

#[test]
fn a_400_mib_control_line_costs_no_more_than_the_line_limit() {
    let site = Site::new();
    let mut agent = site.secondary(
        "secondary",
        &site.path("s.img"),
        SIZE,
        free_port(),
        &NodeOpts::default(),
    );
    agent.wait_status("control socket", READY_TIMEOUT, |_| true);
    let pid = agent.pid();
    let peak_before = peak_rss_bytes(pid);

    // Not UTF-8: an error reply, and the connection stays usable.
    let mut c = UnixStream::connect(&agent.control).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"{\"cmd\":\"st\xffatus\"}\n").unwrap();
    let r = read_reply(&mut c);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("not UTF-8"), "{r}");
    c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert_eq!(read_reply(&mut c)["ok"], true);

    // 400 MiB without a newline: refused as soon as it passes 64 KiB.
    let mut writer = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..400 {
            writer.write_all(&chunk).unwrap();
        }
        writer.write_all(b"\n{\"cmd\":\"status\"}\n").unwrap();
    });
    let r = read_reply(&mut c);
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("longer than 65536 bytes"),
        "{r}"
    );
    sender.join().unwrap();
    // The rest of the line was discarded; the next request is answered.
    let r = read_reply(&mut c);
    assert_eq!(r["ok"], true, "{r}");
    let grown = peak_rss_bytes(pid).saturating_sub(peak_before);
    println!(
        "peak RSS {} KiB before, grew by {} KiB with a 400 MiB control line",
        peak_before / 1024,
        grown / 1024
    );
    // Buffered whole, the line cost 400 MiB (issue 14). Now at most the 64 KiB
    // limit plus the 16 KiB read buffer; 1 MiB leaves room for the allocator.
    assert!(grown < 1 << 20, "peak RSS grew by {grown} bytes");
    let s = agent.status().unwrap();
    assert!(
        s["rejected"]["control_lines"].as_u64().unwrap() >= 2,
        "{}",
        s["rejected"]
    );
}
