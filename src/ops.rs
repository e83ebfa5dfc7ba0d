//! Operator commands run against an agent's control socket: every request goes
//! through [`ask`], bounded by the control timeout (`--control-timeout`), so a
//! wedged agent never hangs a script, a unit or the OCF agent. And the long
//! foreground commands `tandem verify` and `tandem wait-sync`. They start or watch an operation on the
//! agent and poll it; the work itself happens in the agent (agent/primary/verify.rs).
//!
//! Progress is an indicatif bar on stderr when stderr is a terminal; off a terminal
//! `verify` prints nothing until its result and `wait-sync` logs one line about
//! every 10 s, so logs of scripts and units stay readable.
//!
//! Exit codes of `tandem verify`: 0 = the volumes are identical (or every
//! difference was repaired), 1 = differences found (without `--repair`), 2 = could
//! not verify (agent unreachable, not a connected primary, a verify already
//! running, the connection lost during the verify, ...).
//! Exit codes of `tandem wait-sync`: 0 = connected and in sync, 1 = timed out,
//! 2 = error (agent unreachable, not a primary).

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::agent::control::{self, ControlRequest, StatusDoc};

/// Poll interval for the result of a running verify.
const VERIFY_POLL: Duration = Duration::from_millis(200);
/// Poll interval of `wait-sync`.
const WAIT_SYNC_POLL: Duration = Duration::from_millis(500);
/// `wait-sync` off a terminal: one progress line this often.
const WAIT_SYNC_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long a query (status, events, verify polls) waits for the agent's answer
/// by default: a live agent answers in milliseconds; 10 s rides out a busy disk.
pub const CONTROL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// `tandem promote` by default: the fencing command may run up to 120 s first.
pub const PROMOTE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(150);
/// `tandem demote` waits its `--timeout` for clients, then the drain (up to
/// `drain-timeout-ms`, 30 s by default): this much more by default.
pub const DEMOTE_TIMEOUT_EXTRA: Duration = Duration::from_secs(90);

/// Send one request to the agent behind `path` and wait at most `timeout` for
/// its reply (connecting included).
pub async fn ask(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<control::ControlReply, String> {
    match tokio::time::timeout(timeout, control::request(path, req)).await {
        Ok(reply) => reply,
        Err(_) => Err(format!(
            "the agent on {} did not answer '{}' within {} s; it may be busy or hung: check its log (journalctl -u tandem@RESOURCE), or wait longer with --control-timeout SECS",
            path.display(),
            req.cmd,
            timeout.as_secs_f64()
        )),
    }
}

pub const EXIT_IDENTICAL: u8 = 0;
pub const EXIT_DIFFERENT: u8 = 1;
pub const EXIT_ERROR: u8 = 2;

fn bar_style(what: &str) -> Result<ProgressStyle, indicatif::style::TemplateError> {
    Ok(ProgressStyle::with_template(&format!(
        "{what} [{{bar:40}}] {{percent:>3}}% {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} eta {{eta}} {{msg}}"
    ))?
    .progress_chars("=> "))
}

/// A progress bar on stderr, or None when stderr is not a terminal.
fn byte_bar(total_bytes: u64, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total_bytes);
    // The template is fixed; the unit test below proves it parses.
    bar.set_style(bar_style(what).expect("the progress template parses"));
    Some(bar)
}

/// Run `tandem verify`: start a verify on the primary behind `path`, follow it, print
/// the result (human or JSON) and return the documented exit code.
pub async fn verify(
    path: &Path,
    repair: bool,
    json: bool,
    rate_bytes_per_s: Option<u64>,
    timeout: Duration,
) -> ExitCode {
    match verify_inner(path, repair, rate_bytes_per_s, timeout).await {
        Ok(result) => {
            let code = report_verify(&result, repair, json);
            ExitCode::from(code)
        }
        Err(message) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "state": "error", "error": message })
                );
            }
            eprintln!("error: {message}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn verify_inner(
    path: &Path,
    repair: bool,
    rate: Option<u64>,
    timeout: Duration,
) -> Result<Value, String> {
    let mut req = ControlRequest::new("verify");
    let mut args = serde_json::json!({ "repair": repair });
    if let Some(r) = rate {
        args["rate"] = r.into();
    }
    req.args = args;
    let reply = ask(path, &req, timeout).await?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "verify refused".into()));
    }
    let started = reply.result.unwrap_or_default();
    let id = started["id"]
        .as_u64()
        .ok_or("the agent returned no verify id")?;
    let total = started["total_bytes"].as_u64().unwrap_or(0);
    let bar = byte_bar(total, "verify");
    loop {
        tokio::time::sleep(VERIFY_POLL).await;
        let reply = ask(path, &ControlRequest::new("verify-result"), timeout).await?;
        if !reply.ok {
            return Err(reply.error.unwrap_or_else(|| "verify-result failed".into()));
        }
        let r = reply.result.unwrap_or_default();
        if r["id"].as_u64() != Some(id) {
            return Err(format!(
                "the agent reports verify {} instead of {id} (restarted?)",
                r["id"]
            ));
        }
        let state = r["state"].as_str().unwrap_or("unknown").to_string();
        if let Some(bar) = &bar {
            bar.set_position(r["done_bytes"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "{} mismatched{}",
                r["mismatched_blocks"].as_u64().unwrap_or(0),
                if state == "repairing" {
                    ", repairing"
                } else {
                    ""
                }
            ));
        }
        match state.as_str() {
            "scanning" | "repairing" => continue,
            "failed" => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                return Err(r["error"].as_str().unwrap_or("verify failed").to_string());
            }
            "done" => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                return Ok(r);
            }
            other => return Err(format!("unexpected verify state '{other}'")),
        }
    }
}

/// Print a finished verify's result; returns the exit code.
fn report_verify(r: &Value, repair: bool, json: bool) -> u8 {
    let mismatched = r["mismatched_blocks"].as_u64().unwrap_or(0);
    let repaired = repair && mismatched > 0;
    let code = if mismatched == 0 || repaired {
        EXIT_IDENTICAL
    } else {
        EXIT_DIFFERENT
    };
    if json {
        let mut out = r.clone();
        out["ok"] = true.into();
        out["identical"] = (mismatched == 0).into();
        out["repaired"] = repaired.into();
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return code;
    }
    let total = r["total_bytes"].as_u64().unwrap_or(0);
    let elapsed = r["elapsed_s"].as_f64().unwrap_or(0.0);
    if mismatched == 0 {
        println!("verify: {total} bytes compared in {elapsed:.1} s: the volumes are identical");
        return code;
    }
    let ranges = r["ranges"].as_array().cloned().unwrap_or_default();
    println!(
        "verify: {total} bytes compared in {elapsed:.1} s: {mismatched} blocks ({} bytes) differ in {} range(s){}:",
        r["mismatched_bytes"].as_u64().unwrap_or(0),
        ranges.len(),
        if r["ranges_truncated"].as_bool() == Some(true) {
            " (list truncated)"
        } else {
            ""
        }
    );
    for range in &ranges {
        println!(
            "  offset {} length {}",
            range["offset"].as_u64().unwrap_or(0),
            range["length"].as_u64().unwrap_or(0)
        );
    }
    if repaired {
        println!(
            "repaired: the differing blocks were resynced from the primary and are durable on the secondary"
        );
    } else {
        println!("run `tandem verify --repair` to resync them from the primary");
    }
    code
}

/// The primary's status says: connected, no resync running, nothing out of sync, no lag.
pub fn in_sync(s: &StatusDoc) -> bool {
    s.peer.connection == "connected"
        && s.out_of_sync_bytes == 0
        && s.lag.writes == 0
        && s.resync.is_none()
}

fn sync_state_line(s: &StatusDoc) -> String {
    let resync = match &s.resync {
        Some(r) => format!(
            "resync {:.1}% ({} of {} bytes{})",
            r.percent,
            r.done_bytes,
            r.total_bytes,
            r.eta_s
                .map(|e| format!(", about {e:.0} s left"))
                .unwrap_or_default()
        ),
        None => "no resync running".into(),
    };
    format!(
        "connection {}, {resync}, {} bytes out of sync, lag {} writes",
        s.peer.connection, s.out_of_sync_bytes, s.lag.writes
    )
}

/// Run `tandem wait-sync`: wait until the primary behind `path` reports its peer
/// connected and in sync. Returns the documented exit code.
pub async fn wait_sync(
    path: &Path,
    timeout: Option<Duration>,
    control_timeout: Duration,
) -> ExitCode {
    let start = Instant::now();
    let mut bar: Option<ProgressBar> = None;
    let tty = std::io::stderr().is_terminal();
    let mut last_log: Option<Instant> = None;
    loop {
        let reply = match ask(path, &ControlRequest::new("status"), control_timeout).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_ERROR);
            }
        };
        let Some(s) = reply.status else {
            eprintln!(
                "error: {}",
                reply
                    .error
                    .unwrap_or_else(|| "agent returned no status".into())
            );
            return ExitCode::from(EXIT_ERROR);
        };
        if s.role != "primary" {
            eprintln!(
                "error: this agent is in the {} role; run wait-sync on the primary's control socket",
                s.role
            );
            return ExitCode::from(EXIT_ERROR);
        }
        if in_sync(&s) {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            println!(
                "{}: peer {} connected and in sync after {:.1} s",
                s.resource,
                s.peer.name,
                start.elapsed().as_secs_f64()
            );
            return ExitCode::from(EXIT_IDENTICAL);
        }
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            if let Some(b) = &bar {
                b.abandon();
            }
            eprintln!(
                "error: not in sync after {} s: {}",
                t.as_secs(),
                sync_state_line(&s)
            );
            return ExitCode::from(EXIT_DIFFERENT);
        }
        if tty {
            match (&s.resync, &bar) {
                (Some(r), Some(b)) => {
                    b.set_length(r.total_bytes);
                    b.set_position(r.done_bytes);
                }
                (Some(r), None) => {
                    let b = byte_bar(r.total_bytes, "resync").expect("stderr is a terminal");
                    b.set_position(r.done_bytes);
                    bar = Some(b);
                }
                (None, _) => {}
            }
            if let Some(b) = &bar {
                b.set_message(format!("connection {}", s.peer.connection));
            }
        } else if last_log.is_none_or(|t| t.elapsed() >= WAIT_SYNC_LOG_INTERVAL) {
            last_log = Some(Instant::now());
            eprintln!("waiting for sync: {}", sync_state_line(&s));
        }
        tokio::time::sleep(WAIT_SYNC_POLL).await;
    }
}

/// ha: the superblock a node's metadata file holds (the newer of its two valid
/// slots), read without opening the node; `Ok(None)` when there is no metadata
/// yet (a new node). For `tandem up`, which starts the role it persisted.
pub fn persisted_superblock(meta: &Path) -> Result<Option<crate::meta::Superblock>, String> {
    use crate::meta::format::SlotImage;
    use crate::meta::layout::{SUPERBLOCK_SLOT_LEN_BYTES, SUPERBLOCK_SLOT_OFFSETS};
    use std::os::unix::fs::FileExt;
    let file = match std::fs::File::open(meta) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the metadata {}: {e}", meta.display())),
    };
    let mut best: Option<SlotImage> = None;
    let mut faults = Vec::new();
    for offset in SUPERBLOCK_SLOT_OFFSETS {
        let mut buf = vec![0u8; SUPERBLOCK_SLOT_LEN_BYTES as usize];
        let n = file
            .read_at(&mut buf, offset)
            .map_err(|e| format!("cannot read the metadata {}: {e}", meta.display()))?;
        buf.truncate(n);
        match SlotImage::decode(&buf) {
            Ok(slot) if best.as_ref().is_none_or(|b| slot.slot_seq > b.slot_seq) => {
                best = Some(slot)
            }
            Ok(_) => {}
            Err(fault) => faults.push(format!("{fault}")),
        }
    }
    match best {
        Some(slot) => Ok(Some(slot.superblock)),
        None => Err(format!(
            "the metadata {} holds no readable superblock ({}): start the node with tandem secondary or tandem primary, which report and recover what they can",
            meta.display(),
            faults.join("; ")
        )),
    }
}

/// ha (issue 12): `tandem invalidate`: this node's data is discarded and copied
/// again from its primary. Asks for confirmation on a terminal unless `yes`; off
/// a terminal, `--yes` is required (a script states its intent).
pub async fn invalidate(
    path: &Path,
    resource: Option<String>,
    yes: bool,
    timeout: Duration,
) -> Result<ExitCode, String> {
    if !yes {
        let mut req = ControlRequest::new("status");
        req.resource = resource.clone();
        let reply = ask(path, &req, timeout).await?;
        let status = reply.status.ok_or_else(|| {
            reply
                .error
                .unwrap_or_else(|| "the agent returned no status".into())
        })?;
        if !std::io::stdin().is_terminal() {
            return Err(format!(
                "invalidate discards the data of {} (resource {}) and copies every block again from its primary: confirm with --yes (no terminal to ask on); nothing changed",
                status.node, status.resource
            ));
        }
        eprint!(
            "This discards the data of {} (resource {}, {}, disk {}): it becomes Inconsistent and every block is copied again from its primary.\nType 'yes' to go on: ",
            status.node, status.resource, status.role, status.disk_state
        );
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("reading the confirmation: {e}"))?;
        if line.trim() != "yes" {
            return Err("invalidate not confirmed; nothing changed".into());
        }
    }
    let mut req = ControlRequest::new("invalidate");
    req.resource = resource;
    ask_and_print(path, &req, timeout, "invalidated").await
}

/// Send a command that answers with a message; print it (`default` when the
/// answer has none), or fail with the agent's error.
pub async fn ask_and_print(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
    default: &str,
) -> Result<ExitCode, String> {
    let reply = ask(path, req, timeout).await?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "refused".into()));
    }
    let message = reply
        .result
        .as_ref()
        .and_then(|r| r.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or(default);
    println!("{message}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_template_parses() {
        bar_style("verify").expect("template");
    }
}
