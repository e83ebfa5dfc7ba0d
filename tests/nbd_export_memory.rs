//! Memory held by hostile NBD clients is bounded and returned (issue 14, item 3),
//! measured on the real agent's resident set (/proc/PID/status VmRSS):
//!
//! - 8 clients announce 32 MiB writes, send 31 MiB of each and stall: the agent
//!   holds ~248 MiB for them, drops each connection once its payload has received
//!   nothing for 10 s (PAYLOAD_STALL_TIMEOUT_MS), and its RSS returns to baseline.
//! - 20 such clients (620 MiB of payload) never make the agent hold more than the
//!   512 MiB total payload budget; those beyond it are not read until budget frees.
//! - Each drop is counted; the log holds one line per kind, not one per client.
//!
//! The figures are printed (run with --nocapture to see them).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Agent, NodeOpts, Site, free_port, run_ok};
use tandem::nbd::proto;

const MIB: u64 = 1 << 20;
const ANNOUNCED: u64 = 32 * MIB;
const SENT: usize = 31 << 20;

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// Connect, announce a 32 MiB write, send 31 MiB, stall. Returns when the server
/// closed the connection, with the time it took from the last byte sent.
fn stalled_client(port: u16) -> std::thread::JoinHandle<Duration> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut greeting = [0u8; proto::GREETING_LEN];
        s.read_exact(&mut greeting).unwrap();
        let mut m = 3u32.to_be_bytes().to_vec();
        proto::encode_option(&mut m, &proto::ClientOption::ExportName(b""));
        s.write_all(&m).unwrap();
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).unwrap();
        let mut header = Vec::new();
        let r = proto::Request {
            flags: 0,
            kind: proto::CMD_WRITE,
            cookie: 1,
            offset: 0,
            len: ANNOUNCED,
        };
        proto::encode_request_header(proto::HeaderStyle::Compact, &r, &mut header).unwrap();
        s.write_all(&header).unwrap();
        // Blocks while the server does not read (no payload budget for it yet).
        let _ = s.write_all(&vec![0x5a; SENT]);
        let stalled_at = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        stalled_at.elapsed()
    })
}

/// Sample the agent's RSS until every client is done; returns the peak.
fn watch(pid: i32, clients: Vec<std::thread::JoinHandle<Duration>>) -> (u64, Vec<Duration>) {
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !clients.iter().all(|c| c.is_finished()) {
        peak = peak.max(rss_bytes(pid));
        assert!(
            Instant::now() < deadline,
            "stalled clients were not dropped within 180 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (
        peak,
        clients.into_iter().map(|c| c.join().unwrap()).collect(),
    )
}

/// RSS once it has settled (freed buffers are unmapped promptly; allow a moment).
fn settled_rss(pid: i32, below: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rss = rss_bytes(pid);
        if rss <= below || Instant::now() > deadline {
            return rss;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn stalled_write_payloads_are_dropped_and_their_memory_returned_within_bounds() {
    let site = Site::new();
    let nbd_port = free_port();
    let mut primary: Agent = site.primary(
        "primary",
        &site.path("primary.img"),
        1 << 30,
        "async",
        free_port(),
        nbd_port,
        &NodeOpts::default(),
    );
    primary.wait_status("serving", Duration::from_secs(60), |_| true);
    let pid = primary.pid();
    // Warm up the allocator and the I/O path with a normal client first.
    run_ok(
        std::process::Command::new("qemu-io").args([
            "-f",
            "raw",
            &format!("nbd://127.0.0.1:{nbd_port}"),
            "-c",
            "write -P 1 0 32M",
            "-c",
            "read -P 1 0 32M",
        ]),
        Duration::from_secs(120),
    );
    std::thread::sleep(Duration::from_millis(500));
    let baseline = rss_bytes(pid);

    // Eight within the total budget.
    let started = Instant::now();
    let clients = (0..8).map(|_| stalled_client(nbd_port)).collect();
    let (peak, waits) = watch(pid, clients);
    let elapsed = started.elapsed();
    let after = settled_rss(pid, baseline + 16 * MIB);
    eprintln!(
        "8 stalled clients: RSS baseline {} MiB, peak {} MiB, {} MiB after they were dropped; \
         dropped {:.1}-{:.1} s after their last byte, all within {:.1} s",
        baseline / MIB,
        peak / MIB,
        after / MIB,
        waits.iter().min().unwrap().as_secs_f64(),
        waits.iter().max().unwrap().as_secs_f64(),
        elapsed.as_secs_f64()
    );
    assert!(
        peak >= baseline + 200 * MIB,
        "the payloads were never buffered? peak {peak}"
    );
    for w in &waits {
        assert!(
            *w >= Duration::from_secs(9) && *w <= Duration::from_secs(25),
            "dropped {w:?} after stalling (timeout 10 s)"
        );
    }
    assert!(
        after <= baseline + 16 * MIB,
        "RSS {after} did not return to baseline {baseline}"
    );

    // Twenty: 620 MiB of payload against a 512 MiB total budget.
    let clients = (0..20).map(|_| stalled_client(nbd_port)).collect();
    let (peak20, _) = watch(pid, clients);
    let after20 = settled_rss(pid, baseline + 16 * MIB);
    eprintln!(
        "20 stalled clients: RSS peak {} MiB over the baseline (budget 512 MiB), {} MiB after",
        (peak20 - baseline) / MIB,
        after20 / MIB
    );
    assert!(
        peak20 <= baseline + (512 + 48) * MIB,
        "peak {peak20} exceeds the 512 MiB payload budget"
    );
    assert!(
        peak20 >= baseline + 400 * MIB,
        "the budget was never filled? peak {peak20}"
    );
    assert!(
        after20 <= baseline + 16 * MIB,
        "RSS {after20} did not return to baseline {baseline}"
    );

    // 28 drops, logged once (the summary comes once a minute).
    let log = primary.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("write payload stalled"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines for 28 stalled clients"
    );
    // The export still serves.
    run_ok(
        std::process::Command::new("qemu-io").args([
            "-f",
            "raw",
            &format!("nbd://127.0.0.1:{nbd_port}"),
            "-c",
            "read -P 1 0 1M",
        ]),
        Duration::from_secs(60),
    );
    primary.stop();
}
