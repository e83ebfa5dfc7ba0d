//! The `tandem status --json` contract (README, "Status JSON"): every field
//! with its type on a primary and a secondary, and how the figures move —
//! client writes grow with writes, lag returns to 0 once synced, lag seconds
//! keep growing while the secondary is away, connection states follow the
//! link, and `tandem events` tells the story. Plus the control socket's answers
//! to bad input: unknown commands, another resource's name, malformed lines.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::{
    NodeOpts, Pair, READY_TIMEOUT, count_events, events_of, primary_in_sync, run_ok,
    run_with_timeout,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 64 * MIB;

#[derive(Clone, Copy, Debug)]
enum T {
    Str,
    U64,
    F64,
    Obj,
    /// null or the inner type
    Opt(&'static T),
}

fn has_type(v: &Value, t: T) -> bool {
    match t {
        T::Str => v.is_string(),
        T::U64 => v.is_u64(),
        T::F64 => v.is_number(),
        T::Obj => v.is_object(),
        T::Opt(inner) => v.is_null() || has_type(v, *inner),
    }
}

/// The stable fields (README table) and their types.
const FIELDS: &[(&str, T)] = &[
    ("resource", T::Str),
    ("node", T::Str),
    ("role", T::Str),
    ("mode", T::Str),
    ("volume", T::Str),
    ("volume_id", T::Str),
    ("generation", T::Str),
    ("disk_state", T::Str),
    ("peer", T::Obj),
    ("peer/name", T::Str),
    ("peer/connection", T::Str),
    ("peer/disk_state", T::Opt(&T::Str)),
    ("lag", T::Obj),
    ("lag/bytes", T::U64),
    ("lag/writes", T::U64),
    ("lag/seconds", T::F64),
    ("out_of_sync_bytes", T::U64),
    ("resync", T::Opt(&T::Obj)),
    ("counters", T::Obj),
    ("counters/client_writes", T::U64),
    ("counters/client_write_bytes", T::U64),
    ("counters/client_reads", T::U64),
    ("counters/replicated_bytes", T::U64),
    ("counters/replicated_wire_bytes", T::U64),
    ("counters/resync_bytes", T::U64),
    ("counters/verified_bytes", T::U64),
    ("counters/verify_mismatched_blocks", T::U64),
    ("counters/verify_wire_bytes", T::U64),
    ("counters/ahead_episodes", T::U64),
    ("counters/applied_writes", T::U64),
    ("counters/sessions", T::U64),
    ("counters/frames_rejected", T::U64),
    ("write_latency_us", T::Opt(&T::Obj)),
    ("local_write_latency_us", T::Opt(&T::Obj)),
    ("replication_latency_us", T::Opt(&T::Obj)),
    ("throughput", T::Obj),
    ("throughput/write_bytes_per_s", T::F64),
    ("throughput/replicated_bytes_per_s", T::F64),
    ("throughput/resync_bytes_per_s", T::F64),
    ("generations", T::Obj),
    ("generations/current", T::Str),
    ("generations/bitmap_base", T::Str),
    ("handshake", T::Opt(&T::Str)),
    ("compression_ratio", T::F64),
    ("last_error", T::Opt(&T::Str)),
    ("uptime_s", T::U64),
    ("rpo", T::Opt(&T::Obj)),
];

fn check_fields(who: &str, s: &Value) {
    for (path, t) in FIELDS {
        let v = s.pointer(&format!("/{path}")).unwrap_or(&Value::Null);
        let present = path
            .rsplit_once('/')
            .map_or(s, |(parent, _)| {
                s.pointer(&format!("/{parent}")).expect("parent")
            })
            .as_object()
            .is_some_and(|o| o.contains_key(path.rsplit('/').next().expect("name")));
        assert!(present, "{who}: field {path} missing: {s}");
        assert!(has_type(v, *t), "{who}: field {path} is not {t:?}: {v}");
    }
    for field in [
        "write_latency_us",
        "local_write_latency_us",
        "replication_latency_us",
    ] {
        if let Some(l) = s[field].as_object() {
            for k in ["p50", "p99", "p999", "max", "count", "sum"] {
                assert!(l[k].is_u64(), "{who}: {field}.{k}: {s}");
            }
        }
    }
    if let Some(r) = s["resync"].as_object() {
        for k in ["done_bytes", "total_bytes"] {
            assert!(r[k].is_u64(), "{who}: resync.{k}: {s}");
        }
        assert!(r["percent"].is_number() && (r["eta_s"].is_null() || r["eta_s"].is_number()));
    }
    if let Some(r) = s["rpo"].as_object() {
        assert!(
            r["target_s"].is_number() && r["exceeded"].is_boolean(),
            "{s}"
        );
        assert!(r["since"].is_null() || r["since"].is_u64(), "{s}");
        assert!(r["violations"].is_u64(), "{s}");
    }
}

fn qemu_write(nbd_port: u16, offset: u64, len: u64) {
    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x5a {offset} {len}"),
            "-c",
            "flush",
            &format!("nbd://127.0.0.1:{nbd_port}"),
        ]),
        Duration::from_secs(60),
    );
}

#[test]
fn status_fields_have_their_types_and_move_as_the_pair_works() {
    let mut pair = Pair::start("sync", SIZE_BYTES);
    let p0 = pair.primary.status().expect("primary status");
    let s0 = pair.secondary.status().expect("secondary status");
    check_fields("primary", &p0);
    check_fields("secondary", &s0);
    assert_eq!(
        (p0["role"].as_str(), s0["role"].as_str()),
        (Some("primary"), Some("secondary"))
    );
    assert_eq!(p0["resource"], "r0");
    assert_eq!(p0["mode"], "sync");
    assert_eq!(p0["peer"]["name"], "secondary");
    assert_eq!(p0["peer"]["connection"], "connected");
    assert_eq!(p0["peer"]["disk_state"], "UpToDate");
    assert_eq!(s0["peer"]["connection"], "connected");
    assert_eq!(s0["disk_state"], "UpToDate");
    assert!(p0["rpo"].is_null(), "no --rpo-seconds, no rpo object");
    assert_eq!(p0["lag"]["seconds"], 0.0);

    qemu_write(pair.nbd_port, 0, MIB);
    let p1 = pair
        .primary
        .wait_status("synced after a write", READY_TIMEOUT, primary_in_sync);
    check_fields("primary after writes", &p1);
    let grew = |s: &Value, old: &Value, k: &str| {
        s["counters"][k].as_u64().expect(k) > old["counters"][k].as_u64().expect(k)
    };
    assert!(grew(&p1, &p0, "client_writes"), "{p0}\n{p1}");
    assert!(grew(&p1, &p0, "client_write_bytes"));
    assert!(grew(&p1, &p0, "replicated_bytes"));
    assert_eq!(p1["lag"]["writes"], 0);
    assert_eq!(p1["lag"]["bytes"], 0);
    assert_eq!(p1["lag"]["seconds"], 0.0);
    assert!(p1["write_latency_us"].is_object(), "{p1}");
    assert!(p1["local_write_latency_us"].is_object(), "{p1}");
    assert!(p1["replication_latency_us"].is_object(), "{p1}");
    // Writes show in the throughput of the second they happen in (sampled once a
    // second): keep writing until a status shows it.
    let mut seen = false;
    for i in 0..200 {
        qemu_write(pair.nbd_port, (i % 8) * (64 << 10), 64 << 10);
        let s = pair.primary.status().expect("primary status");
        if s["throughput"]["write_bytes_per_s"].as_f64() > Some(0.0)
            && s["throughput"]["replicated_bytes_per_s"].as_f64() > Some(0.0)
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "write throughput never showed in the status");
    assert!(
        p1["handshake"]
            .as_str()
            .is_some_and(|h| h.starts_with("full resync")),
        "{p1}"
    );
    let s1 = pair
        .secondary
        .wait_status("applied", READY_TIMEOUT, |s| grew(s, &s0, "applied_writes"));
    check_fields("secondary after writes", &s1);

    // The secondary goes away: the primary says so, keeps serving, and its lag in
    // seconds counts the age of the writes the secondary lacks.
    pair.secondary.stop();
    let p2 = pair.primary.wait_status("peer gone", READY_TIMEOUT, |s| {
        s["peer"]["connection"] == "connecting"
    });
    check_fields("primary without peer", &p2);
    assert!(p2["peer"]["disk_state"].is_null(), "{p2}");
    qemu_write(pair.nbd_port, 4 * MIB, 64 << 10);
    let p3 = pair.primary.status().expect("primary status");
    assert!(p3["out_of_sync_bytes"].as_u64() >= Some(64 << 10), "{p3}");
    std::thread::sleep(Duration::from_millis(1500));
    let p4 = pair.primary.status().expect("primary status");
    assert!(
        p4["lag"]["seconds"].as_f64().expect("lag") >= 1.0,
        "lag seconds must grow while the peer is away: {p4}"
    );

    // Back: resync, then lag 0 again.
    pair.secondary = pair.site.secondary(
        "secondary",
        &pair.secondary_img,
        SIZE_BYTES,
        pair.repl_port,
        &NodeOpts::default(),
    );
    pair.wait_synced(READY_TIMEOUT);
    let p5 = pair.primary.status().expect("primary status");
    assert_eq!(p5["lag"]["seconds"], 0.0, "{p5}");
    assert_eq!(p5["out_of_sync_bytes"], 0);
    assert!(grew(&p5, &p0, "sessions"));

    let events = events_of(&pair.primary.control);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(count_events(&events, "peer-connected"), 2, "{kinds:?}");
    assert_eq!(count_events(&events, "peer-disconnected"), 1, "{kinds:?}");
    assert!(count_events(&events, "resync-done") >= 1, "{kinds:?}");
    let ids: Vec<u64> = events
        .iter()
        .map(|e| e["id"].as_u64().expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    for e in &events {
        assert!(e["unix_ms"].as_u64() > Some(1_600_000_000_000), "{e}");
        assert!(e["message"].is_string(), "{e}");
    }
    let last = ids.last().copied().expect("events");
    let out = run_ok(
        Command::new(common::tandem_bin())
            .arg("events")
            .arg("--control")
            .arg(&pair.primary.control)
            .args(["--json", "--since", &last.to_string()]),
        Duration::from_secs(15),
    );
    assert_eq!(out, "", "nothing after the last id");
    pair.stop();
}

/// Send one raw line to a control socket, read one reply.
fn raw(control: &std::path::Path, line: &str) -> Value {
    let mut s = UnixStream::connect(control).expect("connect to the control socket");
    s.write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

#[test]
fn the_control_socket_refuses_bad_requests_clearly() {
    let site = common::Site::new();
    let mut secondary = site.secondary(
        "secondary",
        &site.path("secondary.img"),
        SIZE_BYTES,
        common::free_port(),
        &NodeOpts::default(),
    );
    secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
    let control = secondary.control.clone();

    let r = raw(&control, r#"{"cmd":"frobnicate"}"#);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().expect("error text");
    assert!(
        e.contains("frobnicate") && e.contains("status") && e.contains("events"),
        "the error names the command and lists the known ones: {e}"
    );
    let r = raw(&control, r#"{"cmd":"status","resource":"other"}"#);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().expect("error text");
    assert!(e.contains("'other'") && e.contains("'r0'"), "{e}");
    let r = raw(&control, "this is not json");
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().expect("error").contains("malformed"),
        "{r}"
    );
    let r = raw(&control, r#"{"cmd":"events","args":{"since":0}}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["result"]["events"].is_array() && r["result"]["last_id"].is_u64(),
        "{r}"
    );
    let r = raw(&control, r#"{"cmd":"status","resource":"r0"}"#);
    assert_eq!(r["ok"], true, "{r}");

    // The CLI sends --resource, and exits non-zero with the agent's refusal.
    for cmd in ["status", "events"] {
        let out = run_with_timeout(
            Command::new(common::tandem_bin())
                .arg(cmd)
                .arg("--control")
                .arg(&control)
                .args(["--resource", "other"]),
            Duration::from_secs(15),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{cmd}: must fail for another resource"
        );
        assert!(stderr.contains("'other'"), "{cmd}: {stderr}");
    }
    // --config FILE --node NAME finds the socket and sends the file's resource name.
    let write_config = |name: &str| {
        let path = site.path(&format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[resource]\nname = \"{name}\"\n\n[nodes.alpha]\naddress = \"127.0.0.1:1\"\nvolume = \"/nonexistent\"\n\n[nodes.beta]\naddress = \"127.0.0.1:2\"\nvolume = \"/nonexistent\"\ncontrol = \"{}\"\n",
                control.display()
            ),
        )
        .expect("write config");
        path
    };
    let ok = run_ok(
        Command::new(common::tandem_bin())
            .arg("status")
            .arg("--config")
            .arg(write_config("r0"))
            .args(["--node", "beta", "--json"]),
        Duration::from_secs(15),
    );
    let s: Value = serde_json::from_str(&ok).expect("status JSON");
    assert_eq!(s["role"], "secondary");
    let out = run_with_timeout(
        Command::new(common::tandem_bin())
            .arg("status")
            .arg("--config")
            .arg(write_config("r1"))
            .args(["--node", "beta"]),
        Duration::from_secs(15),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'r1'"));
    secondary.stop();
}
