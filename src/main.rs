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
            agent::primary::run(cfg, stop, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Secondary(args) => {
            let cfg = NodeConfig::resolve(Role::Secondary, args.overrides())
                .map_err(|e| e.to_string())?;
            let stop = CancellationToken::new();
            agent::cancel_on_signals(stop.clone());
            agent::secondary::run(cfg, stop, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            control: path,
            json,
            watch,
        } => loop {
            let reply = control::request(&path, &control::ControlRequest::new("status")).await?;
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
