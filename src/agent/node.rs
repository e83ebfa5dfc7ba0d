//! A node agent: one process per resource and node, whose role changes at runtime.
//!
//! The process starts in the role its subcommand names (`tandem primary` or
//! `tandem secondary`) and keeps its control socket for its whole life; the role
//! runs underneath ([`super::primary::serve`] or [`super::secondary::serve`]) and
//! is swapped on request:
//!
//! - **demote** (primary → secondary): no new NBD clients; attached clients get a
//!   bounded time to disconnect, then are closed after their requests in flight
//!   complete; the replication queue drains to the peer; the metadata is persisted
//!   with role secondary; the node listens for the peer as a secondary.
//! - **promote** (secondary → primary): refused while the peer is primary and
//!   connected to this node, and while the disk is not UpToDate unless forced.
//!   When the peer is not connected, the fencing command (if configured) runs
//!   first and must succeed. The primary role starts a new generation (G8).
//!
//! `tandem up` (the systemd unit's command) starts the role the metadata
//! persisted, never a second primary: a node that stopped as secondary (or was
//! never started) comes up secondary; one that stopped as primary comes up as
//! secondary first, waits [`up_window`] for a primary peer to connect (the peer
//! may have been promoted while this node was away), and then promotes itself
//! through the same checks and fencing as `tandem promote`, or stays secondary.
//!
//! Runtime operations: `set-resync-rate`, `pause-sync`/`resume-sync` (answered by
//! the primary role), `adjust` (re-read the resource file; SIGHUP does the same):
//! what may change live changes, the rest applies at the next role change, and a
//! file that names another volume or other nodes is refused with nothing changed.
//!
//! Cluster decisions (who is primary, fencing, quorum) are Pacemaker's: the OCF
//! agent in deploy/ calls these commands.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::control::{
    self, BoxFuture, ControlHandler, ControlReply, ControlRequest, HandlerSlot, StatusDoc,
};
use crate::agent::{AgentError, Demote, RoleContext, primary, secondary};
use crate::config::{NodeConfig, Overrides};
use crate::types::{DiskState, Role};

/// The node's configuration; `adjust` replaces it (roles started later use the new one).
type SharedCfg = Arc<std::sync::RwLock<Arc<NodeConfig>>>;

/// How a node process starts besides its configuration.
#[derive(Clone, Debug, Default)]
pub struct Start {
    /// `tandem up` of a node whose metadata says it was primary: start as
    /// secondary, and promote after this long unless a primary peer connected.
    pub promote_after: Option<Duration>,
    /// The options the node was started with, to re-read the resource file on
    /// `adjust` and SIGHUP (None: nothing to re-read).
    pub overrides: Option<Overrides>,
    /// The role `overrides` resolve with.
    pub role: Option<Role>,
}

/// How long `tandem up` of a former primary waits for a primary peer to connect
/// before it promotes itself: both nodes dial each other, the peer retries at
/// most every 5 s, and the handshake is bounded by the connect timeout.
pub fn up_window(cfg: &NodeConfig) -> Duration {
    Duration::from_millis(5_000 + cfg.connect_timeout_ms + cfg.peer_timeout_ms)
}

/// The longest a fencing command may run before the promotion is refused.
const FENCE_TIMEOUT: Duration = Duration::from_secs(120);

type RoleReply = oneshot::Sender<Result<String, String>>;

enum RoleRequest {
    Promote { force: bool, reply: RoleReply },
    Demote { demote: Demote, reply: RoleReply },
}

/// Run a node until `shutdown` is cancelled, starting in `cfg.role`.
pub async fn run(cfg: NodeConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_with(cfg, shutdown, Start::default()).await
}

/// Run a node until `shutdown` is cancelled, starting in `cfg.role` as `start` says.
pub async fn run_with(
    cfg: NodeConfig,
    shutdown: CancellationToken,
    start: Start,
) -> Result<(), AgentError> {
    let first_role = cfg.role;
    let cfg: SharedCfg = Arc::new(std::sync::RwLock::new(Arc::new(cfg)));
    let now = cfg.read().expect("cfg lock").clone();
    let slot = HandlerSlot::default();
    let (req_tx, mut req_rx) = mpsc::channel(4);
    let role_now = Arc::new(std::sync::Mutex::new(first_role));
    let ctl = Arc::new(NodeControl {
        cfg: cfg.clone(),
        slot: slot.clone(),
        role: role_now.clone(),
        req_tx,
        busy: tokio::sync::Mutex::new(()),
        start: start.clone(),
    });
    let handler = Arc::new(NodeHandler(ctl.clone()));
    let control_stop = CancellationToken::new();
    let control_task =
        control::serve(&now.control, &now.resource, handler, control_stop.clone()).await?;
    // docs: systemd STATUS= lines and watchdog pings while the role answers (Type=notify).
    crate::systemd::supervise(slot.clone(), control_stop.clone());
    reload_on_sighup(ctl.clone(), control_stop.clone());
    if let Some(window) = start.promote_after {
        tokio::spawn(promote_unless_peer_primary(
            ctl.clone(),
            window,
            shutdown.clone(),
        ));
    }
    let result = host_roles(&cfg, first_role, &slot, &role_now, &mut req_rx, &shutdown).await;
    control_stop.cancel();
    let _ = control_task.await;
    result
}

/// SIGHUP re-reads the resource file, like `tandem adjust` (instead of ending the
/// process, SIGHUP's default).
fn reload_on_sighup(ctl: Arc<NodeControl>, stop: CancellationToken) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install the SIGHUP handler (adjust by signal): {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            tracing::info!("SIGHUP: re-reading the resource file");
            match ctl.adjust().await {
                Ok(message) => tracing::info!("adjust: {message}"),
                Err(e) => tracing::error!("adjust refused: {e}"),
            }
        }
    });
}

/// `tandem up` of a node that stopped as primary: it runs as secondary; unless a
/// primary peer connects within `window`, it promotes itself with `promote`'s
/// checks and fencing. A refusal leaves it secondary (logged, and in its events).
async fn promote_unless_peer_primary(
    ctl: Arc<NodeControl>,
    window: Duration,
    shutdown: CancellationToken,
) {
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let Some(status) = ctl.slot.status().await else {
            continue;
        };
        // The window starts once the secondary role listens and dials.
        let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + window);
        if status.role != "secondary" {
            return;
        }
        // A primary peer answered: connected, or its Hello was refused (a split
        // brain): either way it serves, and this node must not.
        if status.peer.connection != "connecting" || status.handshake.is_some() {
            tracing::warn!(
                peer = %status.peer.name,
                handshake = status.handshake.as_deref().unwrap_or(""),
                "up: this node stopped as primary, but its peer is primary now (promoted while this node was away): staying secondary"
            );
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    tracing::warn!(
        window_s = window.as_secs(),
        "up: this node stopped as primary and no primary peer connected: promoting it (the same checks and fencing as tandem promote)"
    );
    match ctl.promote(false).await {
        Ok(message) => tracing::info!("up: {message}"),
        Err(e) => tracing::error!("up: staying secondary: {e}"),
    }
}

/// Run one role after another until shutdown.
async fn host_roles(
    shared_cfg: &SharedCfg,
    first_role: Role,
    slot: &HandlerSlot,
    role_now: &std::sync::Mutex<Role>,
    req_rx: &mut mpsc::Receiver<RoleRequest>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut role = first_role;
    let mut force = false;
    // One set of figures for the node's whole life: counters, latencies and the
    // event ring survive role changes (a failover's story stays in `tandem events`).
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
    // A role change waiting for the new role to serve: its reply, the role to go
    // back to if it fails (none after a demotion: the primary has handed over, so
    // the agent stops as it would have), and what the old role said about it.
    let mut pending: Option<(RoleReply, Option<Role>, String)> = None;
    loop {
        // The configuration as of now (`adjust` may have replaced it).
        let cfg = shared_cfg.read().expect("cfg lock").clone();
        let role_cfg = Arc::new(
            cfg.with_role(role)
                .map_err(|e| AgentError::Refused(e.to_string()))?,
        );
        *role_now.lock().expect("role lock") = role;
        let ctx = RoleContext {
            stop: shutdown.child_token(),
            control: slot.clone(),
            demote: Arc::default(),
            force: std::mem::take(&mut force),
            promoting: Arc::default(),
            metrics: Some(metrics.clone()),
        };
        let (up_tx, up_rx) = oneshot::channel::<()>();
        let mut runner = match role {
            Role::Primary => tokio::spawn(primary::serve(
                role_cfg,
                ctx.clone(),
                Some(signal_up(up_tx)),
            )),
            Role::Secondary => {
                let c = ctx.clone();
                tokio::spawn(async move {
                    secondary::serve(role_cfg, c, Some(signal_up(up_tx)))
                        .await
                        .map(primary::Stopped::Done)
                })
            }
        };
        tokio::select! {
            // docs: `Ok` only: a role that fails before it serves drops its ready
            // sender, and that `Err` must not count as up (it sent READY=1 and
            // answered a failed promotion "now primary" when this branch won the race).
            Ok(()) = up_rx => {
                // docs: READY=1 for systemd (Type=notify): the export or the listener is bound.
                crate::systemd::ready(&format!("{role} of resource {}, node {}: serving", cfg.resource, cfg.name));
                if let Some((reply, back, note)) = pending.take() {
                    let generation = slot.status().await.map(|s| s.generation).unwrap_or_default();
                    let message = if back.is_none() {
                        // A demotion is answered once the secondary serves, so that
                        // the next `tandem status` finds it (the OCF monitor right
                        // after `demote` failed while a new journal was zeroed).
                        note
                    } else if note.is_empty() {
                        format!("now {role}, generation {generation}")
                    } else {
                        format!("now {role}, generation {generation}, {note}")
                    };
                    // Typed event (hardening: `tandem events --follow`).
                    if back.is_some() {
                        metrics.events.emit(crate::metrics::events::EventKind::Promoted { role: role.to_string(), generation });
                    }
                    let _ = reply.send(Ok(message));
                }
            }
            r = &mut runner => {
                let err = match r {
                    Ok(Ok(_)) => AgentError::Refused(format!("the {role} role stopped while starting")),
                    Ok(Err(e)) => e,
                    Err(e) => AgentError::Refused(format!("the {role} role failed: {e}")),
                };
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                match pending.take() {
                    Some((reply, None, _)) => {
                        tracing::error!("becoming {role} failed: {err}");
                        let _ = reply.send(Err(format!("demoted, but becoming {role} failed: {err}; the agent stops")));
                        return Err(err);
                    }
                    Some((reply, Some(back), _)) => {
                        tracing::error!("becoming {role} failed: {err}; staying {back}");
                        let _ = reply.send(Err(format!("becoming {role} failed: {err}; the node stays {back}")));
                        role = back;
                        continue;
                    }
                    None => return Err(err),
                }
            }
        }
        // The role runs; wait for its end or a role change.
        loop {
            tokio::select! {
                r = &mut runner => {
                    return match r {
                        Ok(Ok(_)) if shutdown.is_cancelled() => Ok(()),
                        Ok(Ok(_)) => Err(AgentError::Refused(format!("the {role} role stopped unexpectedly"))),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(AgentError::Refused(format!("the {role} role failed: {e}"))),
                    };
                }
                Some(req) = req_rx.recv() => match (role, req) {
                    (Role::Primary, RoleRequest::Demote { demote, reply }) => {
                        tracing::warn!(wait_s = demote.wait.as_secs(), force = demote.force, "demoting to secondary");
                        *ctx.demote.lock().expect("demote lock") = Some(demote);
                        ctx.stop.cancel();
                        match runner.await {
                            Ok(Ok(primary::Stopped::Done(summary))) => {
                                tracing::info!("primary role ended: {summary}");
                                let message = format!("demoted: {summary}");
                                metrics.events.emit(crate::metrics::events::EventKind::Demoted { role: "secondary".into(), detail: summary }); // typed event (hardening)
                                pending = Some((reply, None, message));
                                role = Role::Secondary;
                                break;
                            }
                            Ok(Ok(primary::Stopped::DemotionRefused(reason))) => {
                                tracing::warn!("{reason}");
                                let _ = reply.send(Err(reason));
                                // The export comes back; the role stays primary.
                                break;
                            }
                            Ok(Err(e)) => {
                                let _ = reply.send(Err(format!("demotion failed: {e}")));
                                return Err(e);
                            }
                            Err(e) => {
                                let _ = reply.send(Err(format!("demotion failed: {e}")));
                                return Err(AgentError::Refused(format!("the primary role failed: {e}")));
                            }
                        }
                    }
                    (Role::Secondary, RoleRequest::Promote { force: f, reply }) => {
                        tracing::warn!(force = f, "promoting to primary");
                        *ctx.promoting.lock().expect("promoting lock") = true;
                        ctx.stop.cancel();
                        let note = match runner.await {
                            Ok(Ok(primary::Stopped::Done(note))) => note,
                            Ok(Ok(_)) => String::new(),
                            Ok(Err(e)) => {
                                let _ = reply.send(Err(format!("promotion failed: {e}")));
                                return Err(e);
                            }
                            Err(e) => {
                                let _ = reply.send(Err(format!("promotion failed: {e}")));
                                return Err(AgentError::Refused(format!("the secondary role failed: {e}")));
                            }
                        };
                        pending = Some((reply, Some(Role::Secondary), note));
                        force = f;
                        role = Role::Primary;
                        break;
                    }
                    (_, RoleRequest::Promote { reply, .. }) => {
                        let _ = reply.send(Ok("already primary".into()));
                    }
                    (_, RoleRequest::Demote { reply, .. }) => {
                        let _ = reply.send(Ok("already secondary".into()));
                    }
                },
            }
        }
    }
}

/// A ready channel for a role's serve function that signals `up` once the role
/// serves, whatever the role reports with it.
fn signal_up<R: Send + 'static>(up: oneshot::Sender<()>) -> oneshot::Sender<R> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        if rx.await.is_ok() {
            let _ = up.send(());
        }
    });
    tx
}

/// The node's control socket: role changes here, everything else goes to the role.
struct NodeControl {
    cfg: SharedCfg,
    /// How the node was started (for `adjust`).
    start: Start,
    slot: HandlerSlot,
    role: Arc<std::sync::Mutex<Role>>,
    req_tx: mpsc::Sender<RoleRequest>,
    /// One role change at a time.
    busy: tokio::sync::Mutex<()>,
}

impl NodeControl {
    fn role(&self) -> Role {
        *self.role.lock().expect("role lock")
    }

    fn cfg(&self) -> Arc<NodeConfig> {
        self.cfg.read().expect("cfg lock").clone()
    }

    /// `tandem adjust` and SIGHUP: re-read the resource file; refuse a file that
    /// names another volume or other nodes (nothing changes); otherwise apply what
    /// can change live (the resync rate, on a primary) and keep the rest for the
    /// next role change. One role change or adjust at a time.
    async fn adjust(&self) -> Result<String, String> {
        let _one = self.busy.lock().await;
        let (Some(overrides), Some(role)) = (&self.start.overrides, self.start.role) else {
            return Err("this agent was not started from options it can re-read: restart it to change its configuration".into());
        };
        let Some(file) = overrides.config.clone() else {
            return Err(
                "this agent was started without --config: there is no resource file to re-read; restart it with new options".into(),
            );
        };
        let old = self.cfg();
        let new = NodeConfig::resolve(role, overrides.clone())
            .map_err(|e| format!("{} not applied, nothing changed: {e}", file.display()))?;
        let plan = crate::config::adjust_plan(&old, &new)
            .map_err(|e| format!("{} not applied, nothing changed: {e}", file.display()))?;
        if plan.live.is_empty() && plan.later.is_empty() {
            return Ok(format!("{}: no change", file.display()));
        }
        // The node's configuration from now on (later role starts use it).
        *self.cfg.write().expect("cfg lock") = Arc::new(NodeConfig {
            role: old.role,
            ..new.clone()
        });
        let mut applied = Vec::new();
        if plan.live.contains(&"resync-rate") && self.role() == Role::Primary {
            let mut req = ControlRequest::new("set-resync-rate");
            req.args = serde_json::json!({ "rate_bytes_per_s": new.resync_rate_bytes_per_s });
            let reply = self.slot.other(req).await;
            if !reply.ok {
                return Err(format!(
                    "the new resync rate was not applied to the running primary: {}",
                    reply.error.unwrap_or_default()
                ));
            }
            applied.push(format!(
                "resync-rate {} bytes/s (live)",
                new.resync_rate_bytes_per_s
            ));
        } else if plan.live.contains(&"resync-rate") {
            applied.push(format!(
                "resync-rate {} bytes/s (when this node is primary)",
                new.resync_rate_bytes_per_s
            ));
        }
        let mut message = format!("{}: applied", file.display());
        if !applied.is_empty() {
            message += &format!(" {}", applied.join(", "));
        }
        if !plan.later.is_empty() {
            message += &format!(
                "; at the next role change or restart: {}",
                plan.later.join(", ")
            );
        }
        Ok(message)
    }

    /// `tandem set resync-rate`: live on a primary, and kept for the node's later
    /// roles (until the next adjust or restart).
    async fn set_resync_rate(&self, rate: u64) -> Result<String, String> {
        let _one = self.busy.lock().await;
        let old = self.cfg();
        *self.cfg.write().expect("cfg lock") = Arc::new(NodeConfig {
            resync_rate_bytes_per_s: rate,
            ..(*old).clone()
        });
        if self.role() != Role::Primary {
            return Ok(format!(
                "resync rate {rate} bytes/s kept for when {} is primary (the primary paces the resync)",
                old.name
            ));
        }
        let mut req = ControlRequest::new("set-resync-rate");
        req.args = serde_json::json!({ "rate_bytes_per_s": rate });
        let reply = self.slot.other(req).await;
        if !reply.ok {
            return Err(reply.error.unwrap_or_else(|| "refused".into()));
        }
        Ok(format!(
            "resync rate now {} (live)",
            if rate == 0 {
                "unlimited".to_string()
            } else {
                format!("{rate} bytes/s")
            }
        ))
    }

    async fn promote(&self, force: bool) -> Result<String, String> {
        let _one = self.busy.lock().await;
        let cfg = self.cfg();
        if self.role() == Role::Primary {
            return Ok("already primary".into());
        }
        let status: StatusDoc = self
            .slot
            .status()
            .await
            .ok_or("the agent is changing roles; try again in a moment")?;
        if status.peer.connection != "connecting" {
            return Err(format!(
                "refusing to promote {}: its peer {} is primary and connected to it. Demote {} first (tandem demote on {}), or stop it",
                cfg.name, cfg.peer_name, cfg.peer_name, cfg.peer_name
            ));
        }
        if status.disk_state == DiskState::Outdated.to_string() && !force {
            // ha (issue 12 item 2): the same refusal as recovery::primary_start's.
            return Err(format!(
                "refusing to promote {}: {}",
                cfg.name,
                crate::engine::recovery::StartRefusal::Outdated
            ));
        }
        if status.disk_state != DiskState::UpToDate.to_string() && !force {
            return Err(format!(
                "refusing to promote {}: its disk is {} (a resync from {} did not complete, so its data may mix two generations). \
                 Reconnect {} and let the resync finish, or promote with --force to use this data anyway",
                cfg.name, status.disk_state, cfg.peer_name, cfg.peer_name
            ));
        }
        if status.poisoned && !force {
            // lead (issue 9 item 5): checked before the secondary stops, like the
            // disk state; recovery::primary_start refuses the same.
            return Err(format!(
                "refusing to promote {}: {}",
                cfg.name,
                crate::engine::recovery::StartRefusal::Poisoned
            ));
        }
        cfg.with_role(Role::Primary)
            .map_err(|e| format!("refusing to promote {}: {e}", cfg.name))?;
        if let Some(cmd) = &cfg.fence_peer {
            fence_peer(&cfg, cmd, "promote")
                .await
                .map_err(|e| format!("refusing to promote: {e}"))?;
        }
        self.change(|reply| RoleRequest::Promote { force, reply })
            .await
    }

    async fn demote(&self, demote: Demote) -> Result<String, String> {
        let _one = self.busy.lock().await;
        if self.role() == Role::Secondary {
            return Ok("already secondary".into());
        }
        // Checked before draining: a demotion that ends in a secondary role the
        // configuration cannot run (no replication address to listen on) stopped
        // the agent after handing over (exit 1; e2e_failover).
        let cfg = self.cfg();
        cfg.with_role(Role::Secondary)
            .map_err(|e| format!("refusing to demote {}: {e}", cfg.name))?;
        let waited_for = if demote.force_disconnect {
            0
        } else {
            self.clients_gone(&cfg.name, demote.wait).await?
        };
        let done = self
            .change(|reply| RoleRequest::Demote { demote, reply })
            .await?;
        Ok(if waited_for > 0 {
            format!("{waited_for} NBD client(s) detached while it waited; {done}")
        } else {
            done
        })
    }

    /// ha (issue 15.3): wait up to `wait` for the export's NBD clients to detach;
    /// refuse, nothing changed, naming those still attached. Closing them is
    /// `--force-disconnect`'s job: a filesystem mounted on a closed export aborts
    /// its journal.
    /// `Ok(n)`: the `n` clients attached at first have detached.
    async fn clients_gone(&self, name: &str, wait: Duration) -> Result<usize, String> {
        let Some(metrics) = self.slot.metrics() else {
            return Ok(0);
        };
        let deadline = tokio::time::Instant::now() + wait;
        let first = metrics.nbd.attached_clients().len();
        let mut logged = false;
        loop {
            let clients = metrics.nbd.attached_clients();
            if clients.is_empty() {
                return Ok(first);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "refusing to demote {name}: {} NBD client(s) still attached after {} s: {}. \
                     Unmount the filesystem and detach the device first (umount, then losetup -d + fusermount3 -u, or nbd-client -d), \
                     or demote --force-disconnect to close them (a filesystem still mounted on them aborts its journal). {name} is still primary",
                    clients.len(),
                    wait.as_secs(),
                    clients.join(", ")
                ));
            }
            if !logged {
                tracing::info!(clients = ?clients, wait_s = wait.as_secs(), "demote: waiting for the NBD clients to detach");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn change(&self, req: impl FnOnce(RoleReply) -> RoleRequest) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.req_tx
            .send(req(reply))
            .await
            .map_err(|_| "the agent is stopping".to_string())?;
        rx.await
            .map_err(|_| "the agent stopped during the role change".to_string())?
    }
}

/// Run the fencing command while the peer is unreachable, before a promotion
/// (`reason` "promote": it must make sure the peer cannot write: power it off,
/// cut its storage network) or before a primary's first write without its peer
/// ("write-alone": it must make sure the peer cannot be promoted with the older
/// data: `tandem outdate` on it, a Pacemaker constraint). `Err` says why it
/// failed, or that it gave no answer within [`FENCE_TIMEOUT`].
pub(crate) async fn fence_peer(cfg: &NodeConfig, cmd: &str, reason: &str) -> Result<(), String> {
    tracing::warn!(command = cmd, peer = %cfg.peer_name, reason, "peer not connected: running the fencing command");
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .env("TANDEM_FENCE_REASON", reason)
        .env("TANDEM_RESOURCE", &cfg.resource)
        .env("TANDEM_NODE", &cfg.name)
        .env("TANDEM_PEER", &cfg.peer_name)
        .env(
            "TANDEM_PEER_ADDRESS",
            cfg.peer.map(|a| a.to_string()).unwrap_or_default(),
        )
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(FENCE_TIMEOUT, c.output())
        .await
        .map_err(|_| {
            format!(
                "the fencing command did not finish within {} s",
                FENCE_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("cannot run the fencing command: {e}"))?;
    if out.status.success() {
        tracing::info!(peer = %cfg.peer_name, "fencing command succeeded");
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .trim()
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!(
        "the fencing command for {} failed ({}){}",
        cfg.peer_name,
        out.status,
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    ))
}

/// The control handler the node serves: role changes here (one at a time),
/// everything else goes to the role's handler.
struct NodeHandler(Arc<NodeControl>);

impl ControlHandler for NodeHandler {
    fn status(&self) -> BoxFuture<Option<StatusDoc>> {
        self.0.slot.status()
    }

    fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        self.0.slot.metrics()
    }

    fn other(&self, request: ControlRequest) -> BoxFuture<ControlReply> {
        let ctl = self.0.clone();
        match request.cmd.as_str() {
            "promote" | "demote" => Box::pin(async move {
                let result = if request.cmd == "promote" {
                    ctl.promote(request.flag("force")).await
                } else {
                    let wait = Duration::from_secs(request.number("timeout_s").unwrap_or(30));
                    ctl.demote(Demote {
                        wait,
                        force: request.flag("force"),
                        force_disconnect: request.flag("force_disconnect"),
                    })
                    .await
                };
                match result {
                    Ok(message) => ControlReply::success(serde_json::json!({ "message": message })),
                    Err(e) => ControlReply::error(e),
                }
            }),
            "resolve" if ctl.role() == Role::Primary => Box::pin(async move {
                ControlReply::error(format!(
                    "{} is primary: its data is never discarded while it serves. Demote it first (tandem demote), then resolve",
                    ctl.cfg().name
                ))
            }),
            // ha: runtime operations.
            "adjust" | "set-resync-rate" => Box::pin(async move {
                let result = if request.cmd == "adjust" {
                    ctl.adjust().await
                } else {
                    match request.number("rate_bytes_per_s") {
                        Some(rate) => ctl.set_resync_rate(rate).await,
                        None => Err("set-resync-rate needs rate_bytes_per_s".into()),
                    }
                };
                match result {
                    Ok(message) => ControlReply::success(serde_json::json!({ "message": message })),
                    Err(e) => ControlReply::error(e),
                }
            }),
            // ha (issue 12): a primary's data is what it serves.
            "invalidate" if ctl.role() == Role::Primary => Box::pin(async move {
                let cfg = ctl.cfg();
                ControlReply::error(format!(
                    "invalidate refused on {name}: it is primary, and a primary's data is what its clients and its peer read; nothing changed. \
                     To copy {name}'s data again from {peer}: demote {name} (tandem demote), promote {peer} (tandem promote), then run tandem invalidate on {name}",
                    name = cfg.name,
                    peer = cfg.peer_name
                ))
            }),
            // ha (issue 12): online grow starts on the primary.
            "resize" if ctl.role() == Role::Secondary => Box::pin(async move {
                let cfg = ctl.cfg();
                ControlReply::error(format!(
                    "resize refused on {}: it is secondary; the primary ({}) grows the pair (this node first) — run tandem resize against the primary's control socket; nothing changed",
                    cfg.name, cfg.peer_name
                ))
            }),
            "outdate" if ctl.role() == Role::Primary => Box::pin(async move {
                ControlReply::error(format!(
                    "{} is primary: only a secondary is outdated (its primary's fencing handler runs tandem outdate on it)",
                    ctl.cfg().name
                ))
            }),
            "pause-sync" | "resume-sync" | "connect" | "disconnect"
                if ctl.role() == Role::Secondary =>
            {
                Box::pin(async move {
                    let cfg = ctl.cfg();
                    ControlReply::error(format!(
                        "{} is secondary: the primary ({}) dials and paces the replication link; run tandem {} against the primary's control socket",
                        cfg.name, cfg.peer_name, request.cmd
                    ))
                })
            }
            // ha: a panic in an agent task on request, to test that the process
            // then exits (main's panic hook). Debug builds with
            // TANDEM_DEBUG_COMMANDS=1 only.
            #[cfg(debug_assertions)]
            "debug-panic-task" if std::env::var_os("TANDEM_DEBUG_COMMANDS").is_some() => {
                tokio::spawn(async {
                    panic!("debug-panic-task: a panic requested over the control socket");
                });
                Box::pin(async {
                    ControlReply::success(serde_json::json!({ "message": "a task panics" }))
                })
            }
            _ => ctl.slot.other(request),
        }
    }
}
