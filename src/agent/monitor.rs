//! Side tasks that watch an agent without touching its data path: the
//! Prometheus endpoint (`--metrics`) and, on a primary with `--rpo-seconds`,
//! the RPO check with its log lines, events and hook (`--rpo-hook`).
//!
//! Both read the same figures as the status document: the endpoint renders
//! the handler's `status()` per scrape, the RPO check reads the lag from the
//! shared [`Metrics`] every [`RPO_CHECK_INTERVAL`]. A hook runs in its own
//! task, one at a time, with a timeout; a slow or failing hook is logged and
//! never delays a write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentError;
use crate::agent::control::ControlHandler;
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::metrics::http::{self, Render};
use crate::metrics::prometheus;
use crate::metrics::rpo::{RPO_CHECK_INTERVAL, RpoMonitor, RpoTransition};
use crate::types::Role;

/// A hook that has not finished after this long is killed (and that is logged).
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// Hook runs waiting behind a slow one; beyond this, further runs are skipped
/// (and logged). Crossings are rare, so 16 is hours of flapping.
const HOOK_QUEUE_MAX: usize = 16;
/// How long a scrape waits for the agent's status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The running side tasks; [`Observers::stop`] ends them.
pub struct Observers {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The metrics endpoint's bound address (when `--metrics` is set).
    pub metrics_addr: Option<SocketAddr>,
}

impl Observers {
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Start the metrics endpoint and the RPO check as `cfg` asks.
pub async fn start(
    cfg: &NodeConfig,
    handler: Arc<dyn ControlHandler>,
    metrics: Arc<Metrics>,
) -> Result<Observers, AgentError> {
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut metrics_addr = None;
    if let Some(addr) = cfg.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| {
                let source = if source.kind() == std::io::ErrorKind::AddrInUse {
                    std::io::Error::new(
                        source.kind(),
                        format!("{source}; another process listens there: pick another address"),
                    )
                } else {
                    source
                };
                AgentError::Metrics { addr, source }
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| AgentError::Metrics { addr, source })?;
        metrics_addr = Some(bound);
        tracing::info!(metrics = %bound, "serving Prometheus metrics at /metrics");
        let render: Render = Arc::new(move || {
            let handler = handler.clone();
            Box::pin(async move {
                let doc = tokio::time::timeout(STATUS_TIMEOUT, handler.status())
                    .await
                    .ok()
                    .flatten()?;
                Some(prometheus::render(&doc))
            })
        });
        tasks.push(http::serve(listener, render, stop.clone()));
    }
    tasks.push(tokio::spawn(sample_rates(metrics.clone(), stop.clone())));
    if cfg.role == Role::Primary
        && let Some(target_s) = cfg.rpo_seconds
    {
        let hook = cfg.rpo_hook.clone().map(|command| HookEnv {
            command,
            resource: cfg.resource.clone(),
            node: cfg.name.clone(),
            peer: cfg.peer_name.clone(),
            target_s,
        });
        tasks.push(tokio::spawn(rpo_check(
            RpoMonitor::new(target_s),
            metrics,
            hook,
            stop.clone(),
        )));
    }
    Ok(Observers {
        stop,
        tasks,
        metrics_addr,
    })
}

/// What a hook run is told besides the event.
#[derive(Clone, Debug)]
struct HookEnv {
    command: String,
    resource: String,
    node: String,
    peer: String,
    target_s: f64,
}

async fn rpo_check(
    mut monitor: RpoMonitor,
    metrics: Arc<Metrics>,
    hook: Option<HookEnv>,
    stop: CancellationToken,
) {
    let target_s = monitor.target_s();
    let (hook_tx, hook_task) = match hook {
        Some(env) => {
            let (tx, rx) = mpsc::channel(HOOK_QUEUE_MAX);
            (Some(tx), Some(tokio::spawn(run_hooks(env, rx))))
        }
        None => (None, None),
    };
    let mut tick = tokio::time::interval(RPO_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let lag_s = metrics.lag_seconds();
        let Some(t) = monitor.observe(lag_s) else {
            continue;
        };
        let message = match t {
            RpoTransition::Exceeded => {
                metrics
                    .rpo_exceeded_since_unix_ms
                    .store(unix_ms(), Ordering::Relaxed);
                metrics.rpo_exceeded.store(true, Ordering::Relaxed);
                Metrics::add(&metrics.rpo_violations, 1);
                let message = format!("rpo exceeded: lag {lag_s:.1} s > target {target_s} s");
                tracing::warn!(event = t.kind(), lag_s, target_s, "{message}");
                message
            }
            RpoTransition::Recovered => {
                metrics.rpo_exceeded.store(false, Ordering::Relaxed);
                metrics
                    .rpo_exceeded_since_unix_ms
                    .store(0, Ordering::Relaxed);
                let message = format!("rpo recovered: lag {lag_s:.1} s <= target {target_s} s");
                tracing::info!(event = t.kind(), lag_s, target_s, "{message}");
                message
            }
        };
        let _ = message; // the event builds the same text (hardening: typed events)
        metrics.events.emit(crate::metrics::events::EventKind::Rpo {
            exceeded: matches!(t, RpoTransition::Exceeded),
            lag_s,
            target_s,
        });
        if let Some(tx) = &hook_tx
            && tx.try_send((t, lag_s)).is_err()
        {
            tracing::warn!(
                event = t.kind(),
                "rpo hook: {HOOK_QUEUE_MAX} runs already waiting behind a slow hook; this run is dropped (the event and the metric are recorded)"
            );
        }
    }
    if let Some(task) = hook_task {
        // A hook still running is killed with its task (kill_on_drop).
        task.abort();
        let _ = task.await;
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Run hooks one at a time, in the order of the crossings.
async fn run_hooks(env: HookEnv, mut rx: mpsc::Receiver<(RpoTransition, f64)>) {
    while let Some((t, lag_s)) = rx.recv().await {
        run_hook(&env, t, lag_s).await;
    }
}

async fn run_hook(env: &HookEnv, t: RpoTransition, lag_s: f64) {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&env.command)
        .env("TANDEM_EVENT", t.kind())
        .env("TANDEM_RESOURCE", &env.resource)
        .env("TANDEM_NODE", &env.node)
        .env("TANDEM_PEER", &env.peer)
        .env("TANDEM_LAG_SECONDS", format!("{lag_s:.3}"))
        .env("TANDEM_RPO_SECONDS", env.target_s.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(event = t.kind(), hook = %env.command, "rpo hook: cannot run sh -c: {e}");
            return;
        }
    };
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output()).await {
        Err(_) => tracing::error!(
            event = t.kind(),
            hook = %env.command,
            timeout_s = HOOK_TIMEOUT.as_secs(),
            "rpo hook did not finish in time; killed"
        ),
        Ok(Err(e)) => {
            tracing::error!(event = t.kind(), hook = %env.command, "rpo hook: {e}")
        }
        Ok(Ok(out)) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = {
                let s = stderr.trim();
                let start = s.char_indices().rev().nth(499).map_or(0, |(i, _)| i);
                s[start..].to_string()
            };
            tracing::error!(
                event = t.kind(),
                hook = %env.command,
                status = %out.status,
                stderr = %tail,
                "rpo hook failed"
            );
        }
        Ok(Ok(_)) => {
            tracing::info!(event = t.kind(), hook = %env.command, "rpo hook ran")
        }
    }
}

/// Throughput figures of the status: the byte counters sampled once a second.
async fn sample_rates(metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut last = [0u64; 3];
    metrics.sample_rates(&mut last, std::time::Duration::from_secs(1));
    let mut at = std::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                metrics.sample_rates(&mut last, at.elapsed());
                at = std::time::Instant::now();
            }
            _ = stop.cancelled() => return,
        }
    }
}
