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
use crate::config::NodeConfig;
use crate::types::{DiskState, Role};

/// The longest a fencing command may run before the promotion is refused.
const FENCE_TIMEOUT: Duration = Duration::from_secs(120);

type RoleReply = oneshot::Sender<Result<String, String>>;

enum RoleRequest {
    Promote { force: bool, reply: RoleReply },
    Demote { demote: Demote, reply: RoleReply },
}

/// Run a node until `shutdown` is cancelled, starting in `cfg.role`.
pub async fn run(cfg: NodeConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let cfg = Arc::new(cfg);
    let slot = HandlerSlot::default();
    let (req_tx, mut req_rx) = mpsc::channel(4);
    let role_now = Arc::new(std::sync::Mutex::new(cfg.role));
    let handler = Arc::new(NodeHandler(Arc::new(NodeControl {
        cfg: cfg.clone(),
        slot: slot.clone(),
        role: role_now.clone(),
        req_tx,
        busy: tokio::sync::Mutex::new(()),
    })));
    let control_stop = CancellationToken::new();
    let control_task =
        control::serve(&cfg.control, &cfg.resource, handler, control_stop.clone()).await?;
    // docs: systemd STATUS= lines and watchdog pings while the role answers (Type=notify).
    crate::systemd::supervise(slot.clone(), control_stop.clone());
    let result = host_roles(&cfg, &slot, &role_now, &mut req_rx, &shutdown).await;
    control_stop.cancel();
    let _ = control_task.await;
    result
}

/// Run one role after another until shutdown.
async fn host_roles(
    cfg: &Arc<NodeConfig>,
    slot: &HandlerSlot,
    role_now: &std::sync::Mutex<Role>,
    req_rx: &mut mpsc::Receiver<RoleRequest>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut role = cfg.role;
    let mut force = false;
    // One set of figures for the node's whole life: counters, latencies and the
    // event ring survive role changes (a failover's story stays in `tandem events`).
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
    // A role change waiting for the new role to come up, and the role to fall back to.
    // A role change waiting for the new role to serve: its reply, the role to go
    // back to if it fails, and what the old role said about it.
    let mut pending: Option<(RoleReply, Role, String)> = None;
    loop {
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
                if let Some((reply, _, note)) = pending.take() {
                    let generation = slot.status().await.map(|s| s.generation).unwrap_or_default();
                    let message = if note.is_empty() {
                        format!("now {role}, generation {generation}")
                    } else {
                        format!("now {role}, generation {generation}, {note}")
                    };
                    // Typed event (hardening: `tandem events --follow`).
                    metrics.events.emit(crate::metrics::events::EventKind::Promoted { role: role.to_string(), generation });
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
                    Some((reply, back, _)) => {
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
                                let _ = reply.send(Ok(message));
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
                        pending = Some((reply, Role::Secondary, note));
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
    cfg: Arc<NodeConfig>,
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

    async fn promote(&self, force: bool) -> Result<String, String> {
        let _one = self.busy.lock().await;
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
                self.cfg.name, self.cfg.peer_name, self.cfg.peer_name, self.cfg.peer_name
            ));
        }
        if status.disk_state != DiskState::UpToDate.to_string() && !force {
            return Err(format!(
                "refusing to promote {}: its disk is {} (a resync from {} did not complete, so its data may mix two generations). \
                 Reconnect {} and let the resync finish, or promote with --force to use this data anyway",
                self.cfg.name, status.disk_state, self.cfg.peer_name, self.cfg.peer_name
            ));
        }
        if status.poisoned && !force {
            // lead (issue 9 item 5): checked before the secondary stops, like the
            // disk state; recovery::primary_start refuses the same.
            return Err(format!(
                "refusing to promote {}: {}",
                self.cfg.name,
                crate::engine::recovery::StartRefusal::Poisoned
            ));
        }
        self.cfg
            .with_role(Role::Primary)
            .map_err(|e| format!("refusing to promote {}: {e}", self.cfg.name))?;
        if let Some(cmd) = &self.cfg.fence_peer {
            fence_peer(&self.cfg, cmd).await?;
        }
        self.change(|reply| RoleRequest::Promote { force, reply })
            .await
    }

    async fn demote(&self, demote: Demote) -> Result<String, String> {
        let _one = self.busy.lock().await;
        if self.role() == Role::Secondary {
            return Ok("already secondary".into());
        }
        self.change(|reply| RoleRequest::Demote { demote, reply })
            .await
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

/// Run the fencing command before a promotion while the peer is unreachable:
/// it must make sure the peer cannot write (power it off, cut its storage
/// network). A failure, or no answer within [`FENCE_TIMEOUT`], refuses the promotion.
async fn fence_peer(cfg: &NodeConfig, cmd: &str) -> Result<(), String> {
    tracing::warn!(command = cmd, peer = %cfg.peer_name, "peer not connected: fencing it before promotion");
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(cmd)
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
                "refusing to promote: the fencing command did not finish within {} s",
                FENCE_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("refusing to promote: cannot run the fencing command: {e}"))?;
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
        "refusing to promote: the fencing command for {} failed ({}){}",
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
                    ctl.cfg.name
                ))
            }),
            _ => ctl.slot.other(request),
        }
    }
}
