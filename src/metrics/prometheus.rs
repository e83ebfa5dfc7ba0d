//! The Prometheus text exposition format (version 0.0.4), rendered from the
//! status document: `/metrics` and `tandem status --json` come from the same
//! [`StatusDoc`], so they never disagree.
//!
//! Every sample carries `resource`, `node` and `peer` labels. Names follow the
//! Prometheus conventions: counters end in `_total`, units are in the name
//! (`_bytes`, `_seconds`), states are one-hot gauges with a `state`/`role` label.
//! The metric names are a stable interface (alert rules and dashboards in
//! deploy/ use them; a unit test checks that every name they use exists).

use std::fmt::Write as _;

use crate::agent::control::{LatencyStatus, StatusDoc};
use crate::metrics::rejections::RejectClass;

/// The Content-Type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Disk states in one-hot order (a state not listed here gets its own sample).
const DISK_STATES: [&str; 3] = ["UpToDate", "Inconsistent", "Outdated"];
const ROLES: [&str; 2] = ["primary", "secondary"];
const CONNECTION_STATES: [&str; 3] = ["connected", "ahead", "connecting"];

/// Escape a label value: backslash, double quote and line feed.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escape HELP text: backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        // Display never uses an exponent and prints integers without a fraction.
        format!("{v}")
    }
}

struct Exposition {
    out: String,
    /// `resource="r0",node="alpha",peer="beta"`, escaped.
    base: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, extra: &[(&str, &str)], value: f64) {
        let mut labels = self.base.clone();
        for (k, v) in extra {
            let _ = write!(labels, ",{k}=\"{}\"", escape_label_value(v));
        }
        let _ = writeln!(self.out, "{name}{{{labels}}} {}", format_value(value));
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value as f64);
    }

    /// A one-hot gauge: one sample per state, 1 for `current`, 0 for the others.
    fn one_hot(&mut self, name: &str, label: &str, help: &str, states: &[&str], current: &str) {
        self.family(name, "gauge", help);
        for s in states {
            self.sample(name, &[(label, s)], f64::from(u8::from(*s == current)));
        }
        if !states.contains(&current) {
            self.sample(name, &[(label, current)], 1.0);
        }
    }
}

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

/// Render the exposition for one agent's status document.
pub fn render(doc: &StatusDoc) -> String {
    let mut e = Exposition {
        out: String::with_capacity(8 << 10),
        base: format!(
            "resource=\"{}\",node=\"{}\",peer=\"{}\"",
            escape_label_value(&doc.resource),
            escape_label_value(&doc.node),
            escape_label_value(&doc.peer.name)
        ),
    };
    e.gauge("tandem_up", "1 while the agent answers.", 1.0);
    e.one_hot(
        "tandem_role",
        "role",
        "The node's role (one-hot).",
        &ROLES,
        &doc.role,
    );
    e.gauge(
        "tandem_is_primary",
        "1 if this node is the primary.",
        flag(doc.role == "primary"),
    );
    let connected = matches!(doc.peer.connection.as_str(), "connected" | "ahead");
    e.gauge(
        "tandem_peer_connected",
        "1 while a replication session with the peer is up.",
        flag(connected),
    );
    e.one_hot(
        "tandem_peer_connection_state",
        "state",
        "The replication link: connected, ahead (connected, tracking writes in the bitmap because the window is full) or connecting (one-hot).",
        &CONNECTION_STATES,
        &doc.peer.connection,
    );
    e.gauge(
        "tandem_disk_uptodate",
        "1 if this node's disk is UpToDate.",
        flag(doc.disk_state == "UpToDate"),
    );
    e.one_hot(
        "tandem_disk_state",
        "state",
        "This node's disk state (one-hot).",
        &DISK_STATES,
        &doc.disk_state,
    );
    e.gauge(
        "tandem_lag_seconds",
        "Age of the oldest write the secondary does not hold durably yet, including writes tracked only in the bitmap while the link is down (primary).",
        doc.lag.seconds,
    );
    e.gauge(
        "tandem_lag_bytes",
        "Bytes shipped and not yet durable on the secondary (the replication window).",
        doc.lag.bytes as f64,
    );
    e.gauge(
        "tandem_lag_writes",
        "Writes shipped and not yet durable on the secondary (the replication window).",
        doc.lag.writes as f64,
    );
    e.gauge(
        "tandem_out_of_sync_bytes",
        "Bytes marked in the dirty bitmap: they may differ on the secondary and will be resynced.",
        doc.out_of_sync_bytes as f64,
    );
    let (resync_active, remaining) = match &doc.resync {
        Some(r) => (true, r.total_bytes.saturating_sub(r.done_bytes)),
        None => (false, 0),
    };
    e.gauge(
        "tandem_resync_active",
        "1 while a resync pass runs.",
        flag(resync_active),
    );
    e.gauge(
        "tandem_resync_remaining_bytes",
        "Bytes the running resync pass has yet to send or compare.",
        remaining as f64,
    );
    let c = &doc.counters;
    e.counter(
        "tandem_replicated_bytes_total",
        "Payload bytes shipped to the secondary (writes and resync), uncompressed.",
        c.replicated_bytes,
    );
    e.counter(
        "tandem_replicated_wire_bytes_total",
        "Payload bytes shipped to the secondary as sent on the wire (compressed).",
        c.replicated_wire_bytes,
    );
    e.counter(
        "tandem_client_writes_total",
        "Client write, write-zeroes and trim requests accepted.",
        c.client_writes,
    );
    e.counter(
        "tandem_client_write_bytes_total",
        "Bytes of client write, write-zeroes and trim requests accepted.",
        c.client_write_bytes,
    );
    e.counter(
        "tandem_client_reads_total",
        "Client read requests served.",
        c.client_reads,
    );
    e.counter(
        "tandem_resync_bytes_total",
        "Bytes of resync traffic (uncompressed).",
        c.resync_bytes,
    );
    e.counter(
        "tandem_verified_bytes_total",
        "Bytes compared by blake3 hash instead of sent.",
        c.verified_bytes,
    );
    e.counter(
        "tandem_verify_wire_bytes_total",
        "Bytes of hash-comparison frames sent (headers and hashes).",
        c.verify_wire_bytes,
    );
    e.counter(
        "tandem_verify_mismatched_blocks_total",
        "Blocks found different by hash comparison.",
        c.verify_mismatched_blocks,
    );
    e.counter(
        "tandem_applied_writes_total",
        "Writes applied to this node's volume by replication (secondary).",
        c.applied_writes,
    );
    e.counter(
        "tandem_sessions_total",
        "Replication sessions established.",
        c.sessions,
    );
    e.counter(
        "tandem_frames_rejected_total",
        "Frames refused for a bad checksum or malformed content (G5).",
        c.frames_rejected,
    );
    // Refused input (hardening, issue 14): one sample per kind, always present.
    e.family(
        "tandem_rejected_total",
        "counter",
        "Input refused since the process started: connections dropped before their handshake, failed handshakes, frames, NBD requests and control lines (label kind).",
    );
    for class in RejectClass::ALL {
        e.sample(
            "tandem_rejected_total",
            &[("kind", class.label())],
            doc.rejected.of_class(class) as f64,
        );
    }
    e.family(
        "tandem_rejected_reasons_total",
        "counter",
        "Input refused, by reason (the key of its rate-limited log line, e.g. transport.handshake-timeout).",
    );
    for (reason, n) in &doc.rejected.reasons {
        e.sample(
            "tandem_rejected_reasons_total",
            &[("reason", reason)],
            *n as f64,
        );
    }
    e.counter(
        "tandem_ahead_episodes_total",
        "Times the primary went ahead (replication window full; writes tracked in the bitmap).",
        c.ahead_episodes,
    );
    e.gauge(
        "tandem_compression_ratio",
        "Uncompressed / wire bytes of shipped payloads (1 before any traffic).",
        doc.compression_ratio,
    );
    e.gauge(
        "tandem_uptime_seconds",
        "Seconds since the agent started.",
        doc.uptime_s as f64,
    );
    for (name, help, lat) in [
        (
            "tandem_write_latency_seconds",
            "Client write latency, from request to reply (quantiles from an HDR histogram since start).",
            doc.write_latency_us.as_ref(),
        ),
        (
            "tandem_local_write_latency_seconds",
            "Write latency of this node's own volume (quantiles since start).",
            doc.local_write_latency_us.as_ref(),
        ),
        (
            "tandem_replication_latency_seconds",
            "From shipping a write to the secondary's Durable covering it (quantiles since start).",
            doc.replication_latency_us.as_ref(),
        ),
    ] {
        summary(&mut e, name, help, lat);
    }
    if let Some(r) = &doc.rpo {
        e.gauge(
            "tandem_rpo_seconds",
            "The recovery point objective: the most seconds of writes the secondary may lack.",
            r.target_s,
        );
    }
    let (exceeded, violations) = doc
        .rpo
        .as_ref()
        .map_or((false, 0), |r| (r.exceeded, r.violations));
    e.gauge(
        "tandem_rpo_exceeded",
        "1 while the lag is above the RPO target (0 without a target).",
        flag(exceeded),
    );
    e.counter(
        "tandem_rpo_violations_total",
        "Times the lag crossed above the RPO target.",
        violations,
    );
    consistent_point(&mut e, doc);
    e.out
}

/// dr (issue 10): the DR copy's consistent point (on a primary as its secondary
/// last reported it) and the secondary's redo journal. The consistent-point
/// samples appear once a point is known (absent, not 0, before: a 0 timestamp
/// would read as 1970 in an age alert).
fn consistent_point(e: &mut Exposition, doc: &StatusDoc) {
    if let Some(c) = &doc.consistent_point {
        e.gauge(
            "tandem_consistent_point_timestamp_seconds",
            "Unix time the primary accepted the newest write of the DR copy's consistent image (on a primary: as its secondary last reported it); 0 when not known.",
            c.at_unix_ms as f64 / 1000.0,
        );
        e.gauge(
            "tandem_consistent_point_seq",
            "The primary's write seq of the newest write in the DR copy's consistent image.",
            c.seq as f64,
        );
        e.gauge(
            "tandem_consistent_point_age_seconds",
            "Seconds since the newest write of the consistent image was accepted.",
            c.age_s,
        );
        e.gauge(
            "tandem_consistent_point_behind_seconds",
            "Primary: age of the oldest write the DR copy's consistent image lacks (0 = it holds every write; what a disaster now would lose). Secondary: how much older the consistent image is than the newest write received.",
            c.behind_s,
        );
        e.gauge(
            "tandem_consistent_point_resync_open",
            "1 while a resync runs: the consistent image is kept as it was until the resync completes.",
            flag(c.resync_open),
        );
    }
    if let Some(j) = &doc.journal {
        e.gauge(
            "tandem_journal_capacity_bytes",
            "Size of the secondary's redo journal.",
            j.capacity_bytes as f64,
        );
        e.gauge(
            "tandem_journal_used_bytes",
            "Bytes of live records in the secondary's redo journal.",
            j.used_bytes as f64,
        );
        e.gauge(
            "tandem_rollback_points",
            "Consistent points in the secondary's rollback window (`tandem points`).",
            j.points as f64,
        );
    }
}

/// A latency summary: quantiles 0.5, 0.99, 0.999 (NaN before the first sample),
/// `_sum` and `_count`, in seconds.
fn summary(e: &mut Exposition, name: &str, help: &str, lat: Option<&LatencyStatus>) {
    e.family(name, "summary", help);
    let us = |v: u64| v as f64 / 1e6;
    for (q, v) in [
        ("0.5", lat.map(|l| l.p50)),
        ("0.99", lat.map(|l| l.p99)),
        ("0.999", lat.map(|l| l.p999)),
    ] {
        e.sample(name, &[("quantile", q)], v.map_or(f64::NAN, us));
    }
    e.sample(&format!("{name}_sum"), &[], lat.map_or(0.0, |l| us(l.sum)));
    e.sample(
        &format!("{name}_count"),
        &[],
        lat.map_or(0, |l| l.count) as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::control::{
        Counters, LagStatus, LatencyStatus, PeerStatus, ProgressStatus, RpoStatus,
    };
    use std::collections::{BTreeMap, BTreeSet};

    fn doc() -> StatusDoc {
        StatusDoc {
            resource: "r0".into(),
            node: "alpha".into(),
            role: "primary".into(),
            mode: "sync".into(),
            volume: "/srv/a.img".into(),
            size_bytes: 1 << 30, // ha
            volume_id: "00000000-0000-0000-0000-000000000000".into(),
            generation: "1".into(),
            disk_state: "UpToDate".into(),
            peer: PeerStatus {
                name: "beta".into(),
                connection: "connected".into(),
                disk_state: Some("Inconsistent".into()),
            },
            lag: LagStatus {
                bytes: 8192,
                writes: 2,
                seconds: 0.25,
            },
            out_of_sync_bytes: 1 << 20,
            resync: Some(ProgressStatus {
                done_bytes: 1 << 19,
                total_bytes: 1 << 20,
                percent: 50.0,
                eta_s: Some(1.0),
            }),
            counters: Counters {
                client_writes: 10,
                client_write_bytes: 40960,
                client_reads: 3,
                replicated_bytes: 50000,
                replicated_wire_bytes: 20000,
                resync_bytes: 9000,
                verified_bytes: 0,
                verify_wire_bytes: 0,
                verify_mismatched_blocks: 0,
                ahead_episodes: 1,
                spill_episodes: 0, // wan
                spilled_bytes: 0,
                spill_live_bytes: 0,
                applied_writes: 0,
                sessions: 2,
                frames_rejected: 0,
            },
            write_latency_us: Some(LatencyStatus {
                p50: 500,
                p99: 1500,
                p999: 3000,
                max: 4000,
                count: 10,
                sum: 7000,
            }),
            local_write_latency_us: None,
            replication_latency_us: Some(LatencyStatus {
                p50: 800,
                p99: 2000,
                p999: 5000,
                max: 6000,
                count: 10,
                sum: 9000,
            }),
            throughput: Some(crate::agent::control::ThroughputStatus {
                write_bytes_per_s: 1e6,
                replicated_bytes_per_s: 2e6,
                resync_bytes_per_s: 0.0,
            }),
            compression_ratio: 2.5,
            last_error: None,
            uptime_s: 12,
            generations: None,
            handshake: None,
            verify: None,
            consistent_point: None,
            journal: None,
            poisoned: false,
            rpo: Some(RpoStatus {
                target_s: 10.0,
                exceeded: true,
                since: Some(1_700_000_000_000),
                violations: 3,
            }),
            rejected: crate::metrics::rejections::RejectionCounts {
                connections: 4,
                handshakes: 70,
                frames: 1,
                nbd_requests: 0,
                control_lines: 2,
                reasons: [
                    ("transport.handshake-timeout".to_string(), 60),
                    ("transport.not-tls".to_string(), 10),
                ]
                .into_iter()
                .collect(),
            },
        }
    }

    /// A sample line: its name, labels (unescaped) and value.
    type Sample = (String, BTreeMap<String, String>, f64);

    /// A strict reader of the text format: HELP and TYPE precede a family's
    /// samples, every sample is `name{labels} value`, label values are quoted
    /// with `\\`, `\"` and `\n` escapes. Returns the families (name → type)
    /// and the samples; panics naming the line otherwise.
    pub(crate) fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        let mut families = BTreeMap::new();
        let mut helped = BTreeSet::new();
        let mut samples = Vec::new();
        let is_name = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !s.starts_with(|c: char| c.is_ascii_digit())
        };
        assert!(text.ends_with('\n'), "the exposition ends with a line feed");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').expect("HELP name text");
                assert!(is_name(name), "bad name in {line:?}");
                assert!(helped.insert(name.to_string()), "second HELP: {line:?}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(helped.contains(name), "TYPE before HELP: {line:?}");
                assert!(
                    ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind),
                    "{line:?}"
                );
                assert!(
                    families
                        .insert(name.to_string(), kind.to_string())
                        .is_none(),
                    "second TYPE: {line:?}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let open = line
                .find('{')
                .unwrap_or_else(|| panic!("no labels: {line:?}"));
            let name = &line[..open];
            assert!(is_name(name), "bad name in {line:?}");
            let family = families
                .keys()
                .find(|f| {
                    name == f.as_str()
                        || (families[f.as_str()] == "summary"
                            && (name == format!("{f}_sum") || name == format!("{f}_count")))
                })
                .unwrap_or_else(|| panic!("sample before its HELP/TYPE: {line:?}"));
            if families[family] == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {line:?}");
            }
            // Labels: k="v" pairs separated by commas, values escaped.
            let mut labels = BTreeMap::new();
            let mut chars = line[open + 1..].chars().peekable();
            loop {
                let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
                assert!(is_name(&key), "bad label name {key:?} in {line:?}");
                assert_eq!(chars.next(), Some('='), "{line:?}");
                assert_eq!(chars.next(), Some('"'), "{line:?}");
                let mut value = String::new();
                loop {
                    match chars
                        .next()
                        .unwrap_or_else(|| panic!("unterminated: {line:?}"))
                    {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        '\n' => panic!("raw line feed in {line:?}"),
                        c => value.push(c),
                    }
                }
                assert!(
                    labels.insert(key, value).is_none(),
                    "duplicate label: {line:?}"
                );
                match chars.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("expected , or }} but got {other:?} in {line:?}"),
                }
            }
            assert_eq!(chars.next(), Some(' '), "{line:?}");
            let value: String = chars.collect();
            let value: f64 = match value.as_str() {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            samples.push((name.to_string(), labels, value));
        }
        (families, samples)
    }

    fn value(samples: &[Sample], name: &str, extra: &[(&str, &str)]) -> f64 {
        let hits: Vec<f64> = samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && extra
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
            .collect();
        assert_eq!(hits.len(), 1, "{name} {extra:?}: {hits:?}");
        hits[0]
    }

    /// dr (issue 10): the DR copy's consistent point and the journal, when known.
    #[test]
    fn the_consistent_point_and_the_journal_are_rendered_when_known() {
        let text = render(&doc());
        assert!(
            !text.contains("tandem_consistent_point"),
            "absent while unknown"
        );
        let mut d = doc();
        d.consistent_point = Some(crate::agent::control::ConsistentStatus {
            seq: 812,
            at_unix_ms: 1_795_003_421_220,
            age_s: 37.5,
            behind_s: 12.25,
            journal_lsn: 0,
            resync_open: true,
        });
        d.journal = Some(crate::agent::control::JournalStatus {
            path: "/srv/j".into(),
            capacity_bytes: 1 << 30,
            used_bytes: 4096,
            records: 3,
            points: 2,
        });
        let (families, samples) = parse(&render(&d));
        assert_eq!(
            families["tandem_consistent_point_timestamp_seconds"],
            "gauge"
        );
        assert_eq!(
            value(&samples, "tandem_consistent_point_timestamp_seconds", &[]),
            1_795_003_421.22
        );
        assert_eq!(value(&samples, "tandem_consistent_point_seq", &[]), 812.0);
        assert_eq!(
            value(&samples, "tandem_consistent_point_age_seconds", &[]),
            37.5
        );
        assert_eq!(
            value(&samples, "tandem_consistent_point_behind_seconds", &[]),
            12.25
        );
        assert_eq!(
            value(&samples, "tandem_consistent_point_resync_open", &[]),
            1.0
        );
        assert_eq!(value(&samples, "tandem_journal_used_bytes", &[]), 4096.0);
        assert_eq!(value(&samples, "tandem_rollback_points", &[]), 2.0);
    }

    #[test]
    fn the_exposition_parses_and_carries_the_status_figures() {
        let text = render(&doc());
        let (families, samples) = parse(&text);
        for (_, labels, _) in &samples {
            assert_eq!(labels["resource"], "r0");
            assert_eq!(labels["node"], "alpha");
            assert_eq!(labels["peer"], "beta");
        }
        assert_eq!(families["tandem_client_writes_total"], "counter");
        assert_eq!(families["tandem_write_latency_seconds"], "summary");
        assert_eq!(value(&samples, "tandem_up", &[]), 1.0);
        assert_eq!(value(&samples, "tandem_is_primary", &[]), 1.0);
        assert_eq!(value(&samples, "tandem_role", &[("role", "primary")]), 1.0);
        assert_eq!(
            value(&samples, "tandem_role", &[("role", "secondary")]),
            0.0
        );
        assert_eq!(value(&samples, "tandem_peer_connected", &[]), 1.0);
        assert_eq!(value(&samples, "tandem_disk_uptodate", &[]), 1.0);
        assert_eq!(
            value(&samples, "tandem_disk_state", &[("state", "Outdated")]),
            0.0
        );
        assert_eq!(value(&samples, "tandem_lag_seconds", &[]), 0.25);
        assert_eq!(value(&samples, "tandem_lag_bytes", &[]), 8192.0);
        assert_eq!(value(&samples, "tandem_lag_writes", &[]), 2.0);
        assert_eq!(value(&samples, "tandem_out_of_sync_bytes", &[]), 1048576.0);
        assert_eq!(
            value(&samples, "tandem_resync_remaining_bytes", &[]),
            524288.0
        );
        assert_eq!(value(&samples, "tandem_client_writes_total", &[]), 10.0);
        assert_eq!(
            value(&samples, "tandem_replicated_bytes_total", &[]),
            50000.0
        );
        assert_eq!(
            value(&samples, "tandem_replicated_wire_bytes_total", &[]),
            20000.0
        );
        assert_eq!(value(&samples, "tandem_ahead_episodes_total", &[]), 1.0);
        assert_eq!(
            value(
                &samples,
                "tandem_write_latency_seconds",
                &[("quantile", "0.99")]
            ),
            0.0015
        );
        assert_eq!(
            value(&samples, "tandem_write_latency_seconds_sum", &[]),
            0.007
        );
        assert_eq!(
            value(&samples, "tandem_write_latency_seconds_count", &[]),
            10.0
        );
        assert_eq!(value(&samples, "tandem_rpo_seconds", &[]), 10.0);
        assert_eq!(value(&samples, "tandem_rpo_exceeded", &[]), 1.0);
        assert_eq!(value(&samples, "tandem_rpo_violations_total", &[]), 3.0);
        assert_eq!(families["tandem_rejected_total"], "counter");
        for (kind, n) in [
            ("connection", 4.0),
            ("handshake", 70.0),
            ("frame", 1.0),
            ("nbd_request", 0.0),
            ("control_line", 2.0),
        ] {
            assert_eq!(
                value(&samples, "tandem_rejected_total", &[("kind", kind)]),
                n,
                "{kind}"
            );
        }
        assert_eq!(
            value(
                &samples,
                "tandem_rejected_reasons_total",
                &[("reason", "transport.handshake-timeout")]
            ),
            60.0
        );
    }

    #[test]
    fn states_are_one_hot_and_an_unknown_state_still_shows() {
        let mut d = doc();
        d.disk_state = "Diskless".into();
        d.peer.connection = "ahead".into();
        d.role = "secondary".into();
        d.rpo = None;
        d.write_latency_us = None;
        let (_, samples) = parse(&render(&d));
        let ones = |name: &str| {
            samples
                .iter()
                .filter(|(n, _, v)| n == name && *v == 1.0)
                .count()
        };
        assert_eq!(ones("tandem_disk_state"), 1);
        assert_eq!(
            value(&samples, "tandem_disk_state", &[("state", "Diskless")]),
            1.0
        );
        assert_eq!(ones("tandem_role"), 1);
        assert_eq!(ones("tandem_peer_connection_state"), 1);
        assert_eq!(
            value(&samples, "tandem_peer_connected", &[]),
            1.0,
            "ahead is connected"
        );
        assert_eq!(value(&samples, "tandem_is_primary", &[]), 0.0);
        assert!(
            !samples.iter().any(|s| s.0 == "tandem_rpo_seconds"),
            "no target, no sample"
        );
        assert_eq!(value(&samples, "tandem_rpo_exceeded", &[]), 0.0);
        assert!(
            value(
                &samples,
                "tandem_write_latency_seconds",
                &[("quantile", "0.5")]
            )
            .is_nan()
        );
        assert_eq!(
            value(&samples, "tandem_write_latency_seconds_count", &[]),
            0.0
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut d = doc();
        d.resource = "r\"0\\x\ny".into();
        let text = render(&d);
        assert!(text.contains(r#"resource="r\"0\\x\ny""#), "{text}");
        let (_, samples) = parse(&text);
        assert!(samples.iter().all(|s| s.1["resource"] == "r\"0\\x\ny"));
    }

    /// Every `tandem_*` name the shipped alert rules and dashboard use is exported.
    #[test]
    fn deploy_rules_and_dashboard_use_only_exported_metrics() {
        let (families, samples) = parse(&render(&doc()));
        let exported: BTreeSet<&str> = samples
            .iter()
            .map(|s| s.0.as_str())
            .chain(families.keys().map(String::as_str))
            .collect();
        let names_in = |text: &str| -> BTreeSet<String> {
            let mut names = BTreeSet::new();
            let mut rest = text;
            while let Some(i) = rest.find("tandem_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
            names
        };
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../deploy/grafana/tandem-dashboard.json"))
                .expect("the dashboard is valid JSON");
        let mut exprs = Vec::new();
        fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        if k == "expr" {
                            out.push(v.as_str().expect("expr is a string").to_string());
                        } else {
                            collect(v, out);
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        collect(&dashboard, &mut exprs);
        assert!(exprs.len() >= 6, "the dashboard has its panels: {exprs:?}");
        let rules = include_str!("../../deploy/prometheus/tandem-alerts.yml");
        for (what, text) in [
            ("dashboard", exprs.join("\n")),
            ("alert rules", rules.to_string()),
        ] {
            let used = names_in(&text);
            assert!(!used.is_empty(), "{what} uses no tandem metric");
            for name in used {
                assert!(
                    exported.contains(name.as_str()),
                    "{what} uses {name}, which the exporter does not export"
                );
            }
        }
    }
}
