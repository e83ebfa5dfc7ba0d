//! The `tandem` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use tandem::agent::{self, control};
use tandem::cli::{Cli, Command};
use tandem::config::NodeConfig;
use tandem::types::Role;
use tokio_util::sync::CancellationToken;

fn init_logging(format: &str, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Certs { out, names } => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            tandem::transport::generate_certs(&out, &names).map_err(|e| e.to_string())?;
            println!(
                "wrote {}/ca.pem and a certificate and key for: {}",
                out.display(),
                names.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Primary(args) => {
            let cfg =
                NodeConfig::resolve(Role::Primary, args.overrides()).map_err(|e| e.to_string())?;
            let stop = CancellationToken::new();
            agent::cancel_on_signals(stop.clone());
            agent::node::run(cfg, stop)
                .await
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Secondary(args) => {
            let cfg = NodeConfig::resolve(Role::Secondary, args.overrides())
                .map_err(|e| e.to_string())?;
            let stop = CancellationToken::new();
            agent::cancel_on_signals(stop.clone());
            agent::node::run(cfg, stop)
                .await
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            target,
            json,
            watch,
        } => loop {
            let (path, resource) = target.clone().resolve().map_err(|e| e.to_string())?;
            let mut req = control::ControlRequest::new("status");
            req.resource = resource;
            let reply = control::request(&path, &req).await?;
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
            role_command(&path, &req).await
        }
        Command::Demote {
            control: path,
            timeout,
        } => {
            let mut req = control::ControlRequest::new("demote");
            req.args = serde_json::json!({ "timeout_s": timeout });
            role_command(&path, &req).await
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
            role_command(&path, &req).await
        }
        Command::Events {
            target,
            follow,
            json,
            since,
        } => {
            let (path, resource) = target.resolve().map_err(|e| e.to_string())?;
            events(&path, resource, since, follow, json).await
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
            Ok(tandem::ops::verify(&control, repair, json, rate).await)
        }
        Command::WaitSync { control, timeout } => {
            Ok(tandem::ops::wait_sync(&control, timeout.map(std::time::Duration::from_secs)).await)
        }
        // nbd (issue 13)
        Command::Checkpoint { command } => {
            tandem::checkpoint::run_cli(command).await?;
            Ok(ExitCode::SUCCESS)
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

/// Send a command that answers with a message; print it, or fail with the error.
async fn role_command(
    path: &std::path::Path,
    req: &control::ControlRequest,
) -> Result<ExitCode, String> {
    let reply = control::request(path, req).await?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "refused".into()));
    }
    let message = reply
        .result
        .as_ref()
        .and_then(|r| r.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or("done");
    println!("{message}");
    Ok(ExitCode::SUCCESS)
}

/// `tandem events`: print the agent's events after `since`; with `follow`, poll
/// every 500 ms and print new ones until interrupted.
async fn events(
    path: &std::path::Path,
    resource: Option<String>,
    mut since: u64,
    follow: bool,
    json: bool,
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
        let reply = control::request(path, &req).await?;
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
