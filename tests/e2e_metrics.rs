//! The Prometheus endpoint end to end: both agents of a pair serve `/metrics`
//! (`--metrics`), scraped with curl and checked with `promtool check metrics`
//! (clients nobody here wrote); the counters move as qemu-io writes through the
//! NBD export and agree with the status document. Also: a busy metrics address
//! is refused with a message naming it, and `--log-format json` gives one JSON
//! object per line with structured fields.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::{NodeOpts, READY_TIMEOUT, Site, free_port, metric, primary_in_sync, run_ok, scrape};

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 64 * MIB;

fn qemu_write(nbd_port: u16, offset: u64, len: u64, pattern: u8) {
    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} {offset} {len}"),
            "-c",
            "flush",
            &format!("nbd://127.0.0.1:{nbd_port}"),
        ]),
        Duration::from_secs(60),
    );
}

/// `promtool check metrics` (the Prometheus project's linter) accepts the text.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; see tools/test.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics refused the exposition:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Nodes {
    primary: common::Agent,
    secondary: common::Agent,
    nbd_port: u16,
    _site: Site,
}

fn start_pair(primary_extra: &[&str], secondary_extra: &[&str]) -> Nodes {
    let site = Site::new();
    let repl_port = free_port();
    let nbd_port = free_port();
    let opts = |extra: &[&str]| NodeOpts {
        tls_dir: None,
        extra: extra.iter().map(|s| s.to_string()).collect(),
    };
    let mut secondary = site.secondary(
        "secondary",
        &site.path("secondary.img"),
        SIZE_BYTES,
        repl_port,
        &opts(secondary_extra),
    );
    secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
    let mut primary = site.primary(
        "primary",
        &site.path("primary.img"),
        SIZE_BYTES,
        "sync",
        repl_port,
        nbd_port,
        &opts(primary_extra),
    );
    primary.wait_status("in sync", READY_TIMEOUT, primary_in_sync);
    Nodes {
        primary,
        secondary,
        nbd_port,
        _site: site,
    }
}

#[test]
fn metrics_move_with_writes_through_the_export_and_agree_with_status() {
    let p_addr = format!("127.0.0.1:{}", free_port());
    let s_addr = format!("127.0.0.1:{}", free_port());
    let mut n = start_pair(&["--metrics", &p_addr], &["--metrics", &s_addr]);
    let p0 = scrape(&p_addr);
    let s0 = scrape(&s_addr);
    promtool_accepts(&p0);
    promtool_accepts(&s0);
    let labels = [
        ("resource", "r0"),
        ("node", "primary"),
        ("peer", "secondary"),
    ];
    assert_eq!(metric(&p0, "tandem_up", &labels), 1.0);
    assert_eq!(metric(&p0, "tandem_is_primary", &[]), 1.0);
    assert_eq!(metric(&p0, "tandem_role", &[("role", "primary")]), 1.0);
    assert_eq!(metric(&p0, "tandem_peer_connected", &[]), 1.0);
    assert_eq!(metric(&p0, "tandem_disk_uptodate", &[]), 1.0);
    assert_eq!(
        metric(&s0, "tandem_is_primary", &[("node", "secondary")]),
        0.0
    );
    assert_eq!(metric(&s0, "tandem_role", &[("role", "secondary")]), 1.0);
    let writes0 = metric(&p0, "tandem_client_writes_total", &[]);
    let replicated0 = metric(&p0, "tandem_replicated_bytes_total", &[]);
    let applied0 = metric(&s0, "tandem_applied_writes_total", &[]);

    qemu_write(n.nbd_port, 0, MIB, 0xab);
    qemu_write(n.nbd_port, 8 * MIB, 2 * MIB, 0xcd);
    n.primary
        .wait_status("in sync after the writes", READY_TIMEOUT, primary_in_sync);

    let status = n.primary.status().expect("primary status");
    let p1 = scrape(&p_addr);
    promtool_accepts(&p1);
    let writes1 = metric(&p1, "tandem_client_writes_total", &[]);
    let replicated1 = metric(&p1, "tandem_replicated_bytes_total", &[]);
    assert!(writes1 >= writes0 + 2.0, "{writes0} -> {writes1}");
    assert!(
        metric(&p1, "tandem_client_write_bytes_total", &[]) >= (3 * MIB) as f64,
        "{p1}"
    );
    assert!(
        replicated1 >= replicated0 + (3 * MIB) as f64,
        "{replicated0} -> {replicated1}"
    );
    assert!(metric(&p1, "tandem_write_latency_seconds_count", &[]) >= 2.0);
    assert!(metric(&p1, "tandem_write_latency_seconds", &[("quantile", "0.99")]) > 0.0);
    assert_eq!(metric(&p1, "tandem_lag_writes", &[]), 0.0);
    assert_eq!(metric(&p1, "tandem_lag_seconds", &[]), 0.0);
    assert_eq!(metric(&p1, "tandem_out_of_sync_bytes", &[]), 0.0);
    // One source of truth: nothing is written now, so status and scrape agree.
    let c = &status["counters"];
    assert_eq!(writes1, c["client_writes"].as_f64().expect("client_writes"));
    assert_eq!(
        replicated1,
        c["replicated_bytes"].as_f64().expect("replicated_bytes")
    );
    assert_eq!(
        metric(&p1, "tandem_sessions_total", &[]),
        c["sessions"].as_f64().expect("sessions")
    );
    n.secondary
        .wait_status("applied the writes", READY_TIMEOUT, |s| {
            s["counters"]["applied_writes"].as_f64() > Some(applied0)
        });
    let s1 = scrape(&s_addr);
    assert!(metric(&s1, "tandem_applied_writes_total", &[]) > applied0);

    // Anything but /metrics is 404.
    let out = run_ok(
        Command::new("curl").args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{p_addr}/other"),
        ]),
        Duration::from_secs(15),
    );
    assert_eq!(out, "404");
    n.primary.stop();
    n.secondary.stop();
}

#[test]
fn a_busy_metrics_address_is_refused_naming_the_address_and_option() {
    let site = Site::new();
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("address").to_string();
    let mut secondary = site.secondary(
        "secondary",
        &site.path("secondary.img"),
        SIZE_BYTES,
        free_port(),
        &NodeOpts {
            tls_dir: None,
            extra: vec!["--metrics".into(), addr.clone()],
        },
    );
    let status = secondary.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the agent must refuse to start");
    let log = secondary.log_text();
    assert!(
        log.contains(&addr) && log.contains("--metrics") && log.contains("in use"),
        "the error names the address, the option and the cause: {log}"
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_level_and_fields() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut n = start_pair(
        &[
            "--log-format",
            "json",
            "--metrics",
            &metrics_addr,
            "--rpo-seconds",
            "30",
        ],
        &["--log-format", "json"],
    );
    qemu_write(n.nbd_port, 0, MIB, 0x11);
    n.primary
        .wait_status("in sync after the write", READY_TIMEOUT, primary_in_sync);
    n.primary.stop();
    n.secondary.stop();
    for agent in [&n.primary, &n.secondary] {
        let log = agent.log_text();
        let mut lines = 0;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", agent.name));
            assert!(v["level"].is_string(), "{}: no level: {line}", agent.name);
            assert!(
                v["fields"]["message"].is_string(),
                "{}: no fields.message: {line}",
                agent.name
            );
            lines += 1;
        }
        assert!(lines >= 3, "{}: only {lines} log lines", agent.name);
    }
    // The events that matter carry their figures as fields, not only in the text.
    let find = |log: &str, message: &str| -> serde_json::Value {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| {
                v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no log line starting with {message:?} in:\n{log}"))
    };
    let p = n.primary.log_text();
    let connected = find(&p, "connected to secondary");
    assert!(connected["fields"]["plan"].is_string(), "{connected}");
    assert!(
        connected["fields"]["out_of_sync_blocks"].is_u64(),
        "{connected}"
    );
    let serving = find(&p, "serving Prometheus metrics");
    assert_eq!(serving["fields"]["metrics"], metrics_addr.as_str());
    let s = n.secondary.log_text();
    let attached = find(&s, "primary attached");
    assert!(attached["fields"]["plan"].is_string(), "{attached}");
    let detached = find(&s, "primary detached");
    assert!(detached["fields"]["disk"].is_string(), "{detached}");
}
