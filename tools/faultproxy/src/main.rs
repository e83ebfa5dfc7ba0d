//! `faultproxy`: run a fault-injecting proxy, or control a running one (`faultproxy ctl`).
//! See tools/faultproxy/README.md.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use faultproxy::{Dir, Fault, Proxy, Request, Response};

#[derive(Parser, Debug)]
#[command(
    name = "faultproxy",
    about = "Fault-injecting TCP proxy: delay, throttle, blackhole, reset, cut, bit flips",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address clients connect to.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address every accepted connection is forwarded to.
    #[arg(long)]
    upstream: Option<SocketAddr>,
    /// Unix socket for the JSON-lines control protocol (and `faultproxy ctl`).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Seed for jitter and bit flips; random (and printed) when omitted.
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Talk to a running proxy through its control socket.
    Ctl {
        #[arg(long)]
        control: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
}

#[derive(Subcommand, Debug)]
enum CtlAction {
    /// Install a fault (replaces an earlier fault of the same kind).
    Set {
        #[command(subcommand)]
        fault: FaultArg,
    },
    /// Remove every fault.
    Clear,
    /// Print faults in force and counters.
    Stats,
}

#[derive(Subcommand, Debug)]
enum FaultArg {
    /// Delay every chunk by ms ± jitter-ms (order kept).
    Delay {
        #[arg(long)]
        ms: u64,
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
        #[arg(long, value_enum, default_value_t = DirArg::Both)]
        dir: DirArg,
    },
    /// Limit each direction to bytes-per-s (shared by all connections).
    Throttle {
        #[arg(long)]
        bytes_per_s: u64,
        #[arg(long, value_enum, default_value_t = DirArg::Both)]
        dir: DirArg,
    },
    /// Stop forwarding and reading in both directions; sockets stay open.
    Blackhole,
    /// Reset all connections (RST); with --reject-new also reset new ones until cleared.
    Reset {
        #[arg(long)]
        reject_new: bool,
    },
    /// Reset each connection after forwarding this many more bytes in dir.
    CutAfter {
        #[arg(long)]
        bytes: u64,
        #[arg(long, value_enum, default_value_t = DirArg::Both)]
        dir: DirArg,
    },
    /// Flip one random bit in every Nth chunk in dir.
    FlipBits {
        #[arg(long)]
        every_nth_chunk: u64,
        #[arg(long, value_enum, default_value_t = DirArg::Both)]
        dir: DirArg,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DirArg {
    Up,
    Down,
    Both,
}

impl From<DirArg> for Dir {
    fn from(d: DirArg) -> Dir {
        match d {
            DirArg::Up => Dir::Up,
            DirArg::Down => Dir::Down,
            DirArg::Both => Dir::Both,
        }
    }
}

impl From<FaultArg> for Fault {
    fn from(f: FaultArg) -> Fault {
        match f {
            FaultArg::Delay { ms, jitter_ms, dir } => Fault::Delay {
                ms,
                jitter_ms,
                dir: dir.into(),
            },
            FaultArg::Throttle { bytes_per_s, dir } => Fault::Throttle {
                bytes_per_s,
                dir: dir.into(),
            },
            FaultArg::Blackhole => Fault::Blackhole,
            FaultArg::Reset { reject_new } => Fault::Reset { reject_new },
            FaultArg::CutAfter { bytes, dir } => Fault::CutAfter {
                bytes,
                dir: dir.into(),
            },
            FaultArg::FlipBits {
                every_nth_chunk,
                dir,
            } => Fault::FlipBits {
                every_nth_chunk,
                dir: dir.into(),
            },
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Ctl { control, action }) => ctl(control, action),
        None => {
            let (Some(listen), Some(upstream)) = (cli.listen, cli.upstream) else {
                bail!(
                    "--listen and --upstream are required (or use `faultproxy ctl ...`); see --help"
                );
            };
            let seed = cli.seed.unwrap_or_else(rand::random);
            serve(listen, upstream, cli.control, seed)
        }
    }
}

fn serve(
    listen: SocketAddr,
    upstream: SocketAddr,
    control: Option<PathBuf>,
    seed: u64,
) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let proxy = Proxy::start(listen, upstream, seed)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        if let Some(path) = &control {
            proxy.serve_control(path)?;
        }
        // One machine-readable line for scripts and tests (port 0 resolves here).
        println!(
            "faultproxy listening={} upstream={} seed={}",
            proxy.local_addr(),
            upstream,
            seed
        );
        std::io::stdout().flush().ok();
        tokio::signal::ctrl_c()
            .await
            .context("cannot wait for Ctrl-C")?;
        tracing::info!("interrupted; stopping");
        drop(proxy);
        Ok(())
    })
}

fn ctl(control: PathBuf, action: CtlAction) -> anyhow::Result<()> {
    let request = match action {
        CtlAction::Set { fault } => Request::Set {
            fault: fault.into(),
        },
        CtlAction::Clear => Request::Clear,
        CtlAction::Stats => Request::Stats,
    };
    let mut stream = UnixStream::connect(&control).with_context(|| {
        format!(
            "cannot connect to control socket {}; is faultproxy running with --control?",
            control.display()
        )
    })?;
    let mut line = serde_json::to_vec(&request)?;
    line.push(b'\n');
    stream.write_all(&line).context("cannot send the request")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("cannot read the response")?;
    let response: Response = serde_json::from_str(&reply)
        .with_context(|| format!("malformed response from the proxy: {reply:?}"))?;
    println!("{}", serde_json::to_string_pretty(&response)?);
    if !response.ok {
        bail!(
            "proxy refused the request: {}",
            response.error.unwrap_or_default()
        );
    }
    Ok(())
}
