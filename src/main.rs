//! The `tandem` binary: parse the command line, set up logging, run.
//!
//! Starting a node agent: the configuration is resolved, then every
//! precondition is checked ([`NodeConfig::preflight`]) before the agent creates
//! or opens anything; files are created private (umask 077); a start that
//! fails before the node ever served removes the image and metadata it created,
//! so a refused start leaves nothing behind.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tandem::agent::{self, control};
use tandem::cli::{Cli, Command};
use tandem::config::NodeConfig;
use tandem::types::Role;
use tokio_util::sync::CancellationToken;

/// Colour (ANSI escapes) in human logs only on a terminal, and never with
/// `NO_COLOR` set to anything non-empty (https://no-color.org): files, pipes
/// and journald get plain text.
fn log_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn init_logging(format: &str, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = log_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Exit status of a process stopped by a panic (the same as Rust's own for a
/// panic on the main thread).
const EXIT_PANIC: i32 = 101;

/// The message a panic carries (`panic!("...")` gives `&str` or `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A panic anywhere ends the process. Tokio catches a panic in a spawned task and
/// only reports it to whoever awaits the task's handle: an agent whose metadata
/// thread, session or encoder task died would keep its control socket and export
/// and look alive while no longer replicating. Once a panic is logged (one line
/// naming the thread and place), the process exits with status 101, so systemd
/// or Pacemaker restart it and the next start recovers from the metadata (G3).
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Rust's own report first (with a backtrace when RUST_BACKTRACE is set).
        default(info);
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown place".into());
        let message = panic_message(info.payload());
        tracing::error!(
            thread,
            location,
            "panic: {message}; exiting with status {EXIT_PANIC} (a partly running agent could stop replicating unnoticed; the next start recovers from the metadata)"
        );
        tandem::systemd::stopping(&format!("panic at {location}: {message}"));
        std::process::exit(EXIT_PANIC);
    }));
}

/// Keep freed payload buffers in the process instead of handing them back to
/// the kernel after every frame.
///
/// Replication moves its data in buffers of up to a few MiB (NBD requests,
/// frames, journal reads for the checkpoint), allocated and freed once per
/// request. glibc serves allocations above its mmap threshold (128 KiB, growing
/// on its own only up to the largest size freed so far) with a fresh `mmap`
/// and returns them with `munmap` (and trims its heap tops above twice that),
/// so every MiB replicated cost 256 page faults and the zeroing of 256 pages,
/// on each node. Measured on a 2-core VM (benches/RESULTS.md, session 25): the
/// secondary spent ~20% of its CPU in page faults, page zeroing and unmapping
/// during sequential 1 MiB writes; with these settings minor faults per 10 s
/// fell from 112k–143k to 13k on the primary and from 142k–166k to 24k–30k on
/// the secondary, and seq 1 MiB on a fresh pair ran faster (sync 461–511 to
/// 600–614 MB/s, async 172–214 to 301–349 MB/s, with the same thresholds given
/// as `GLIBC_TUNABLES`). The resident set stays at most the peak working set
/// plus the trim threshold.
///
/// A user's own `GLIBC_TUNABLES` malloc settings win: nothing is changed then.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    /// Largest size glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit).
    const MMAP_THRESHOLD_BYTES: libc::c_int = 32 << 20;
    /// Free memory at the heap top kept before it is returned to the kernel.
    const TRIM_THRESHOLD_BYTES: libc::c_int = 128 << 20;
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters; it is called before any
    // other thread exists, and both values are in the ranges glibc documents
    // (it returns 0 and changes nothing otherwise, which is harmless).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    install_panic_hook();
    // The demo prints its own progress; agents log at info (TANDEM_LOG or RUST_LOG override).
    let level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    init_logging(&cli.log_format, level);
    // TANDEM_WORKER_THREADS sizes the async runtime (default: one per core).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("TANDEM_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeouts = Timeouts(cli.control_timeout.map(Duration::from_secs));
    match runtime.block_on(run(cli.command, timeouts)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The control timeout the user gave (`--control-timeout`), or each command's default.
#[derive(Clone, Copy)]
struct Timeouts(Option<Duration>);

impl Timeouts {
    fn query(self) -> Duration {
        self.0.unwrap_or(tandem::ops::CONTROL_TIMEOUT_DEFAULT)
    }
    fn promote(self) -> Duration {
        self.0.unwrap_or(tandem::ops::PROMOTE_TIMEOUT_DEFAULT)
    }
    fn demote(self, wait_s: u64) -> Duration {
        self.0
            .unwrap_or(Duration::from_secs(wait_s) + tandem::ops::DEMOTE_TIMEOUT_EXTRA)
    }
}

/// Files the agent may create: the ones absent now.
fn absent(paths: &[&Path]) -> Vec<PathBuf> {
    paths
        .iter()
        .filter(|p| std::fs::symlink_metadata(p).is_err())
        .map(|p| p.to_path_buf())
        .collect()
}

/// Run a node agent: resolve, check every precondition, then run until SIGTERM.
/// `up`: the role is the one the metadata persisted (`role` is where it starts;
/// see agent/node.rs).
async fn run_agent(role: Role, args: tandem::cli::NodeArgs, up: bool) -> Result<ExitCode, String> {
    let overrides = args.overrides();
    let cfg = NodeConfig::resolve(role, overrides.clone()).map_err(|e| e.to_string())?;
    cfg.preflight().map_err(|e| e.to_string())?;
    let mut start = agent::node::Start {
        overrides: Some(overrides),
        role: Some(role),
        promote_after: None,
    };
    if up {
        let persisted = tandem::ops::persisted_superblock(&cfg.meta)?;
        match persisted.as_ref().map(|sb| sb.role) {
            Some(Role::Primary) => {
                let window = agent::node::up_window(&cfg);
                tracing::warn!(
                    window_s = window.as_secs(),
                    "up: {} stopped as primary: starting as secondary; promoting it unless a primary peer connects within the window",
                    cfg.name
                );
                start.promote_after = Some(window);
            }
            Some(Role::Secondary) => {
                tracing::info!(
                    "up: {} stopped as secondary: starting as secondary",
                    cfg.name
                )
            }
            None => tracing::info!(
                "up: {} has no metadata yet: starting as secondary",
                cfg.name
            ),
        }
    }
    // Images, metadata, split-brain reports and sockets are the agent's alone,
    // whatever umask it inherited (the unit sets UMask=0077 too).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let created = absent(&[&cfg.volume, &cfg.meta]);
    let stop = CancellationToken::new();
    agent::cancel_on_signals(stop.clone());
    let stopping = stop.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        tandem::systemd::stopping("stopping: draining to the peer, flushing, persisting metadata");
    });
    match agent::node::run_with(cfg, stop, start).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if !tandem::systemd::was_ready() => {
            // The node never served: nothing but this start can have used the
            // files it created, and a refused start must leave nothing behind.
            let removed: Vec<String> = created
                .iter()
                .filter(|p| std::fs::remove_file(p).is_ok())
                .map(|p| p.display().to_string())
                .collect();
            if removed.is_empty() {
                Err(e.to_string())
            } else {
                Err(format!(
                    "{e} (removed what this start had created: {})",
                    removed.join(", ")
                ))
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn run(command: Command, timeouts: Timeouts) -> Result<ExitCode, String> {
    match command {
        Command::Certs {
            out,
            names,
            ca,
            renew,
            valid_years,
        } => certs(&out, names, ca.as_deref(), renew, valid_years),
        Command::Primary(args) => run_agent(Role::Primary, args, false).await,
        Command::Secondary(args) => run_agent(Role::Secondary, args, false).await,
        Command::Up(args) => run_agent(Role::Secondary, args, true).await,
        Command::Adjust { target } => {
            simple_command(target, "adjust", serde_json::json!({}), timeouts.query()).await
        }
        Command::Set {
            setting: tandem::cli::SetCommand::ResyncRate { rate, target },
        } => {
            let rate = tandem::types::parse_size(&rate).map_err(|e| format!("resync-rate: {e}"))?;
            simple_command(
                target,
                "set-resync-rate",
                serde_json::json!({ "rate_bytes_per_s": rate }),
                timeouts.query(),
            )
            .await
        }
        Command::PauseSync { target } => {
            simple_command(
                target,
                "pause-sync",
                serde_json::json!({}),
                timeouts.query(),
            )
            .await
        }
        Command::Disconnect { target } => {
            simple_command(
                target,
                "disconnect",
                serde_json::json!({}),
                timeouts.query(),
            )
            .await
        }
        Command::Connect { target } => {
            simple_command(target, "connect", serde_json::json!({}), timeouts.query()).await
        }
        Command::Outdate { target } => {
            simple_command(target, "outdate", serde_json::json!({}), timeouts.query()).await
        }
        Command::Resize { target, size } => {
            let size_bytes =
                tandem::types::parse_size(&size).map_err(|e| format!("--size: {e}"))?;
            simple_command(
                target,
                "resize",
                serde_json::json!({ "size_bytes": size_bytes }),
                timeouts.promote(),
            )
            .await
        }
        Command::Invalidate { target, yes } => {
            let (path, resource) = target.resolve().map_err(|e| e.to_string())?;
            tandem::ops::invalidate(&path, resource, yes, timeouts.query()).await
        }
        Command::ResumeSync { target } => {
            simple_command(
                target,
                "resume-sync",
                serde_json::json!({}),
                timeouts.query(),
            )
            .await
        }
        Command::Status {
            target,
            json,
            watch,
            all,
            dir,
        } => loop {
            if all {
                if watch {
                    print!("\x1b[2J\x1b[H");
                }
                let ok = status_all(&dir, target.node.as_deref(), json, timeouts.query()).await?;
                if !watch {
                    return Ok(if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    });
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let (path, resource) = target.clone().resolve().map_err(|e| e.to_string())?;
            let mut req = control::ControlRequest::new("status");
            req.resource = resource;
            let reply = tandem::ops::ask(&path, &req, timeouts.query()).await?;
            let Some(status) = reply.status else {
                return Err(reply
                    .error
                    .unwrap_or_else(|| "agent returned no status".into()));
            };
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serializes")
                );
            } else {
                print!("{}", status.human());
            }
            if !watch {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        },
        Command::Promote {
            control: path,
            force,
        } => {
            let mut req = control::ControlRequest::new("promote");
            req.args = serde_json::json!({ "force": force });
            role_command(&path, &req, timeouts.promote()).await
        }
        Command::Demote {
            control: path,
            timeout,
            force,
            force_disconnect,
        } => {
            let mut req = control::ControlRequest::new("demote");
            req.args = serde_json::json!({ "timeout_s": timeout, "force": force, "force_disconnect": force_disconnect });
            role_command(&path, &req, timeouts.demote(timeout)).await
        }
        Command::Resolve {
            control: path,
            discard_local,
        } => {
            if !discard_local {
                return Err(
                    "resolve needs --discard-local: run it on the node whose changes are to be discarded".into(),
                );
            }
            let mut req = control::ControlRequest::new("resolve");
            req.args = serde_json::json!({ "discard_local": true });
            role_command(&path, &req, timeouts.query()).await
        }
        Command::Events {
            target,
            follow,
            json,
            since,
        } => {
            let (path, resource) = target.resolve().map_err(|e| e.to_string())?;
            events(&path, resource, since, follow, json, timeouts.query()).await
        }
        Command::Verify {
            control,
            repair,
            json,
            rate,
        } => {
            let rate = match rate.as_deref().map(tandem::types::parse_size).transpose() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: --rate: {e}");
                    return Ok(ExitCode::from(tandem::ops::EXIT_ERROR));
                }
            };
            Ok(tandem::ops::verify(&control, repair, json, rate, timeouts.query()).await)
        }
        Command::WaitSync { control, timeout } => Ok(tandem::ops::wait_sync(
            &control,
            timeout.map(Duration::from_secs),
            timeouts.query(),
        )
        .await),
        // nbd (issue 13)
        Command::Checkpoint { command } => {
            tandem::checkpoint::run_cli(command).await?;
            Ok(ExitCode::SUCCESS)
        }
        // dr (issue 10)
        Command::Points { target, json } => {
            let (path, _) = target.resolve().map_err(|e| e.to_string())?;
            tandem::dr::points(&path, json, timeouts.query()).await
        }
        Command::Rollback { control, to } => {
            tandem::dr::rollback(&control, &to, timeouts.promote()).await
        }
        Command::Inspect {
            control,
            at,
            nbd,
            stop,
        } => {
            tandem::dr::inspect(
                &control,
                at.as_deref(),
                nbd.as_deref(),
                stop,
                timeouts.query(),
            )
            .await
        }
        Command::Demo { size, seconds, dir } => {
            let size_bytes = tandem::types::parse_size(&size)?;
            let ok = tandem::demo::run(size_bytes, seconds, dir)
                .await
                .map_err(|e| e.to_string())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `tandem certs`: a new CA and node certificates, or (`--ca`) node certificates
/// signed by an existing CA.
fn certs(
    out: &Path,
    names: Vec<String>,
    ca: Option<&Path>,
    renew: bool,
    valid_years: u32,
) -> Result<ExitCode, String> {
    let Some(ca) = ca else {
        let names = if names.is_empty() {
            vec!["primary".to_string(), "secondary".to_string()]
        } else {
            names
        };
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        tandem::transport::generate_certs_valid_for(out, &names, valid_years)
            .map_err(|e| e.to_string())?;
        println!(
            "wrote {0}/ca.pem, {0}/ca.key (keep it off the nodes) and a certificate and key for: {1}; valid for {valid_years} years",
            out.display(),
            names.join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    };
    if names.is_empty() {
        return Err("--ca needs --name NAME: the node to sign a certificate for".into());
    }
    for name in &names {
        let signed = tandem::transport::sign_node_cert(ca, name, out, valid_years, renew)
            .map_err(|e| e.to_string())?;
        println!(
            "wrote {} and {} for {name}, signed by {}/ca.pem, valid until {}{}{}",
            signed.cert.display(),
            signed.key.display(),
            ca.display(),
            signed.not_after,
            signed
                .previous
                .map(|(c, k)| format!(
                    "; the old pair is kept as {} and {}",
                    c.display(),
                    k.display()
                ))
                .unwrap_or_default(),
            signed
                .ca_copied
                .map(|c| format!("; copied the CA certificate to {}", c.display()))
                .unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tandem status --all`: every resource file in `dir`, this host's node of each
/// asked for its status. Returns whether every agent answered.
async fn status_all(
    dir: &Path,
    node: Option<&str>,
    json: bool,
    timeout: Duration,
) -> Result<bool, String> {
    let resources = tandem::config::local_resources(dir, node).map_err(|e| e.to_string())?;
    if resources.is_empty() {
        return Err(format!(
            "no resource files (*.toml) in {}; pass --dir DIR",
            dir.display()
        ));
    }
    let mut all_ok = true;
    let mut docs = Vec::new();
    for r in resources {
        let answer = match (&r.node, &r.control) {
            (Err(e), _) => Err(e.clone()),
            (Ok(n), None) => Err(format!("node '{n}' has neither control nor volume")),
            (Ok(_), Some(control)) => {
                let mut req = control::ControlRequest::new("status");
                req.resource = Some(r.resource.clone());
                match tandem::ops::ask(control, &req, timeout).await {
                    Ok(reply) => reply
                        .status
                        .ok_or_else(|| reply.error.unwrap_or_else(|| "no status".into())),
                    Err(e) => Err(e),
                }
            }
        };
        all_ok &= answer.is_ok();
        if json {
            docs.push(match answer {
                Ok(status) => serde_json::json!({
                    "file": r.file, "resource": r.resource, "node": r.node.ok(),
                    "control": r.control, "ok": true, "status": status,
                }),
                Err(error) => serde_json::json!({
                    "file": r.file, "resource": r.resource, "node": r.node.ok(),
                    "control": r.control, "ok": false, "error": error,
                }),
            });
        } else {
            match answer {
                Ok(status) => print!("{}", status.human()),
                Err(e) => println!("{} ({}): not answering: {e}", r.resource, r.file.display()),
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&docs).expect("status serializes")
        );
    }
    Ok(all_ok)
}

/// ha: a runtime command to the agent `target` names: print its message, or fail.
async fn simple_command(
    target: tandem::cli::ControlTarget,
    cmd: &str,
    args: serde_json::Value,
    timeout: Duration,
) -> Result<ExitCode, String> {
    let (path, resource) = target.resolve().map_err(|e| e.to_string())?;
    let mut req = control::ControlRequest::new(cmd);
    req.resource = resource;
    req.args = args;
    role_command(&path, &req, timeout).await
}

/// Send a command that answers with a message; print it, or fail with the error.
async fn role_command(
    path: &Path,
    req: &control::ControlRequest,
    timeout: Duration,
) -> Result<ExitCode, String> {
    tandem::ops::ask_and_print(path, req, timeout, "done").await
}

/// `tandem events`: print the agent's events after `since`; with `follow`, poll
/// every 500 ms and print new ones until interrupted.
async fn events(
    path: &std::path::Path,
    resource: Option<String>,
    mut since: u64,
    follow: bool,
    json: bool,
    timeout: Duration,
) -> Result<ExitCode, String> {
    use tandem::metrics::events::EventsSince;
    if follow {
        // Pushed by the agent as they happen (hardening: no polling).
        return follow_events(path, resource, since, json).await;
    }
    loop {
        let mut req = control::ControlRequest::new("events");
        req.resource = resource.clone();
        req.args = serde_json::json!({ "since": since });
        let reply = tandem::ops::ask(path, &req, timeout).await?;
        if !reply.ok {
            return Err(reply
                .error
                .unwrap_or_else(|| "agent refused the events request".into()));
        }
        let got: EventsSince = serde_json::from_value(reply.result.unwrap_or_default())
            .map_err(|e| format!("malformed events reply: {e}"))?;
        if got.missed > 0 {
            eprintln!(
                "note: {} older events were dropped from the agent's ring before they could be shown",
                got.missed
            );
        }
        for e in &got.events {
            if json {
                println!("{}", serde_json::to_string(e).expect("event serializes"));
            } else {
                println!(
                    "{} #{} {:<18} {}",
                    format_unix_ms(e.unix_ms),
                    e.id,
                    e.kind,
                    e.message
                );
            }
        }
        since = since.max(got.last_id);
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `tandem events --follow`: print each event the agent pushes (the events after
/// `since`, the state dump, then live ones) until the agent goes away.
async fn follow_events(
    path: &std::path::Path,
    resource: Option<String>,
    since: u64,
    json: bool,
) -> Result<ExitCode, String> {
    use std::io::Write;
    control::follow_events(path, resource, since, |e| {
        if json {
            println!("{}", serde_json::to_string(&e).expect("event serializes"));
        } else {
            println!(
                "{} #{} {:<18} {}",
                format_unix_ms(e.unix_ms),
                e.id,
                e.kind,
                e.message
            );
        }
        let _ = std::io::stdout().flush();
    })
    .await?;
    Err("the agent closed the event stream (it stopped?)".into())
}

/// `2025-01-31T12:34:56.789Z` from milliseconds since the Unix epoch (UTC).
fn format_unix_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::log_colour;

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        assert!(log_colour(true, None));
        assert!(
            log_colour(true, Some("".into())),
            "an empty NO_COLOR is unset"
        );
        assert!(!log_colour(true, Some("1".into())));
        assert!(!log_colour(false, None));
        assert!(!log_colour(false, Some("1".into())));
    }
}
