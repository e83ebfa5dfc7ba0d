//! `tandem events --follow` against real agents (issue 12 item 8): the agent
//! pushes the events over the control connection as they happen, one JSON
//! object per line with a stable schema (type, id, time, unix_ms, resource,
//! node, kind, message and the kind's fields), after a dump of the current
//! state; a refused handshake becomes an event; the control client times out
//! with a clear error instead of hanging.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{NodeOpts, READY_TIMEOUT, Site, free_port, primary_in_sync, tandem_bin};

const SIZE: u64 = 32 << 20;

/// A running `tandem events --follow --json`; its lines arrive on a channel.
struct Follower {
    child: std::process::Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Follower {
    fn start(control: &std::path::Path) -> Follower {
        let mut child = Command::new(tandem_bin())
            .args(["events", "--follow", "--json", "--control"])
            .arg(control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn tandem events");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("event line {line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// The next event of `kind`, skipping others; panics after `timeout`.
    fn wait_for(&self, kind: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(e) if e["kind"] == kind => return e,
                Ok(_) => {}
                Err(_) => panic!("no {kind} event within {timeout:?}"),
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_schema(e: &serde_json::Value, node: &str) {
    for field in ["type", "time", "kind", "message", "resource", "node"] {
        assert!(e[field].is_string(), "{field} in {e}");
    }
    assert!(e["id"].is_u64() && e["unix_ms"].is_u64(), "{e}");
    assert_eq!(e["node"], node, "{e}");
    assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
    assert!(
        ["exists", "dump-done", "change", "event"].contains(&e["type"].as_str().unwrap()),
        "{e}"
    );
}

#[test]
fn events_follow_dumps_the_state_then_pushes_changes_as_they_happen() {
    let site = Site::with_names(&["primary", "secondary", "gamma"]);
    let repl_port = free_port();
    let nbd_port = free_port();
    let secondary_img = site.path("s.img");
    let mut secondary = site.secondary(
        "secondary",
        &secondary_img,
        SIZE,
        repl_port,
        &NodeOpts::default(),
    );
    secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
    let mut primary = site.primary(
        "primary",
        &site.path("p.img"),
        SIZE,
        "sync",
        repl_port,
        nbd_port,
        &NodeOpts::default(),
    );
    primary.wait_status("in sync", READY_TIMEOUT, primary_in_sync);
    let node = primary.status().unwrap()["node"]
        .as_str()
        .unwrap()
        .to_string();

    let follower = Follower::start(&primary.control);
    // History first (the ring), then the state now, then dump-done.
    let role = follower.wait_for("role", Duration::from_secs(10));
    assert_eq!(role["type"], "exists");
    assert_eq!(role["role"], "primary");
    assert_eq!(role["id"], 0);
    assert_schema(&role, &node);
    let disk = follower.wait_for("disk-state", Duration::from_secs(5));
    assert_eq!(disk["disk_state"], "UpToDate", "{disk}");
    let conn = follower.wait_for("connection", Duration::from_secs(5));
    assert_eq!(conn["connection"], "connected", "{conn}");
    assert_eq!(conn["peer_disk_state"], "UpToDate", "{conn}");
    follower.wait_for("dump-done", Duration::from_secs(5));

    // A change is pushed as it happens.
    secondary.stop();
    let down = follower.wait_for("peer-disconnected", Duration::from_secs(15));
    assert_eq!(down["type"], "change");
    assert_eq!(down["connection"], "connecting", "{down}");
    assert!(down["id"].as_u64().unwrap() > 0);
    assert_schema(&down, &node);

    // The primary writes alone; the secondary comes back and is resynced.
    common::run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 64k",
            &format!("nbd://127.0.0.1:{nbd_port}"),
        ]),
        Duration::from_secs(60),
    );
    let mut secondary = site.secondary(
        "secondary",
        &secondary_img,
        SIZE,
        repl_port,
        &NodeOpts::default(),
    );
    secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
    let up = follower.wait_for("peer-connected", READY_TIMEOUT);
    assert_schema(&up, &node);
    let started = follower.wait_for("resync-started", READY_TIMEOUT);
    assert!(started["total_blocks"].as_u64().unwrap() >= 16, "{started}");
    let done = follower.wait_for("resync-done", READY_TIMEOUT);
    assert!(done["shipped_blocks"].is_u64(), "{done}");

    // The secondary's story, from its ring: it stayed UpToDate through the
    // resync (G2 during resyncs: the resync goes into a journal section and its
    // last consistent image is kept), so the dump shows UpToDate and no change.
    let sec_follower = Follower::start(&secondary.control);
    let state = sec_follower.wait_for("disk-state", Duration::from_secs(10));
    assert_eq!(state["disk_state"], "UpToDate", "{state}");
    assert_ne!(state["previous"], "Inconsistent", "{state}");
    sec_follower.wait_for("dump-done", Duration::from_secs(10));

    // A node with a certificate for the wrong name dials the secondary: refused,
    // and recorded as an event there.
    let gamma = tandem::transport::Security::Tls(tandem::transport::TlsFiles {
        dir: site.certs.clone(),
        node_name: "gamma".into(),
        peer_name: "secondary".into(),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr = format!("127.0.0.1:{repl_port}").parse().unwrap();
        if let Ok(mut s) = tandem::transport::connect(addr, &gamma, 5_000).await {
            let _ = tandem::wire::read_frame(&mut s, &mut bytes::BytesMut::new()).await;
        }
    });
    let refused = sec_follower.wait_for("handshake-refused", Duration::from_secs(10));
    assert_eq!(refused["type"], "event");
    assert_eq!(refused["stage"], "tls");
    assert!(
        refused["reason"].as_str().unwrap().contains("gamma"),
        "{refused}"
    );
    assert!(
        refused["peer_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{refused}"
    );
}

#[test]
fn the_control_client_times_out_on_a_silent_agent_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("hung.sock");
    // A "hung agent": it accepts and never answers.
    let listener = UnixListener::bind(&sock).unwrap();
    let _holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let started = Instant::now();
    let out = Command::new(tandem_bin())
        .args(["status", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("did not answer 'status' within 10 s"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
}
