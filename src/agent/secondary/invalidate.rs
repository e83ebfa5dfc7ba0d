//! ha (issue 12): `tandem invalidate` on a secondary: its data is discarded and
//! copied again, every block, from its primary.
//!
//! The order makes a crash at any instant safe (engine/recovery.rs,
//! [`recovery::invalidate`]):
//! 1. the session ends (the primary is told why, and reconnects; no session
//!    starts again until step 3 is done), and the node waits for its I/O
//!    (journal syncs, checkpoints, reads) to end;
//! 2. the superblock saying "Inconsistent, a full resync is owed" is made
//!    durable;
//! 3. every record of the redo journal is dropped (the engine starts over with
//!    no consistent image, so the full copy needs no section and no journal room
//!    for the whole volume) and the journal is truncated.
//!
//! A start that finds a full resync owed drops the journal too (a crash between 2
//! and 3). The handshake then plans a full resync whatever the generations say;
//! only its end clears the flag ([`Node::full_sync_done`]).

use tokio::sync::oneshot;

use super::{Engine, Node};
use crate::agent::control::ControlReply;
use crate::engine::recovery;
use crate::types::Seq;

/// An invalidation under way.
pub(super) struct Pending {
    reply: oneshot::Sender<ControlReply>,
    stage: Stage,
    /// The session it ended (for the message).
    ended: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Waiting for the journal syncs, checkpoints and reads in flight to end.
    Quiesce,
    /// The superblock owing a full resync is being written (this metadata job).
    Metadata(u64),
    /// The journal's records are being dropped.
    Truncate,
}

impl Node {
    /// Whether an invalidation is under way (no session starts meanwhile).
    pub(super) fn invalidating(&self) -> bool {
        self.invalidation.is_some()
    }

    /// `tandem invalidate`: refused while a rollback runs or on a failed disk;
    /// otherwise the session ends and [`Self::step_invalidation`] proceeds.
    pub(super) fn start_invalidation(&mut self, reply: oneshot::Sender<ControlReply>) {
        let refuse = |reply: oneshot::Sender<ControlReply>, e: String| {
            let _ = reply.send(ControlReply::error(e));
        };
        if self.invalidation.is_some() {
            return refuse(
                reply,
                "an invalidation of this node is already under way; wait for it (tandem status)"
                    .into(),
            );
        }
        if self.rollback.is_some() {
            return refuse(
                reply,
                format!(
                    "invalidate refused on {}: a rollback is under way (nothing changed); wait for it to end, then run tandem invalidate again",
                    self.cfg.name
                ),
            );
        }
        if self.engine.is_poisoned() {
            return refuse(
                reply,
                format!(
                    "invalidate refused on {}: its journal or volume failed a write (poisoned; nothing changed); check the disk and restart the node: it then compares every block with its primary",
                    self.cfg.name
                ),
            );
        }
        if self.sb.is_new {
            return refuse(
                reply,
                format!(
                    "{} has never synced with a primary: it holds no data to discard, and its first connection copies every block anyway (nothing changed)",
                    self.cfg.name
                ),
            );
        }
        self.end_inspection("the node is being invalidated");
        let ended = self.session.take().map(|s| {
            let reason = format!(
                "{} was invalidated (tandem invalidate): its data is discarded; reconnect for a full resync",
                self.cfg.name
            );
            let _ = s.acks.try_send(crate::agent::link::control_frame(
                crate::wire::Message::Refuse {
                    reason: reason.clone(),
                },
            ));
            tracing::info!(session = s.id, primary = %s.peer, "session ended: {reason}");
            self.metrics.set_connected(false, &reason);
            s.peer
        });
        let mut out = Vec::new();
        self.engine.session_ended(&mut out);
        self.act(&mut out);
        tracing::warn!(
            primary = ?ended,
            "invalidate: this node's data is discarded; every block will be copied again from the primary"
        );
        self.invalidation = Some(Pending {
            reply,
            stage: Stage::Quiesce,
            ended,
        });
        self.step_invalidation(None);
    }

    /// Advance an invalidation; `failed`: a metadata write that just failed.
    pub(super) fn step_invalidation(&mut self, failed: Option<&str>) {
        let Some(p) = &self.invalidation else { return };
        // No journal sync, checkpoint or read may run when the engine is
        // replaced (the checkpointer may start one while the superblock is
        // written: it is waited for too).
        let quiet = self.engine.is_idle()
            && self.engine.durable() == self.engine.tail()
            && self.checkpoint_waiting.is_none()
            && self.release_waiting.is_none()
            && self.copying.is_none()
            && self.session.is_none();
        match p.stage {
            Stage::Quiesce => {
                if !quiet {
                    return;
                }
                self.sb = recovery::invalidate(&self.sb);
                self.handshake_text = Some(format!(
                    "invalidated (tandem invalidate): a full resync from {} is owed",
                    self.cfg.peer_name
                ));
                let job = self.write_superblock();
                self.invalidation.as_mut().expect("checked").stage = Stage::Metadata(job);
            }
            Stage::Metadata(job) => {
                if let Some(e) = failed {
                    let p = self.invalidation.take().expect("checked");
                    let _ = p.reply.send(ControlReply::error(format!(
                        "invalidate: writing the superblock failed: {e}; the node is poisoned: check the disk and restart it"
                    )));
                    return;
                }
                if self.meta_done < job || !quiet {
                    return;
                }
                // Every record goes: the engine starts over with no consistent
                // image (what it holds now is being discarded), the volume as
                // its base. No I/O runs (Quiesce), no session can start.
                let applied = self.engine.applied();
                let cfg = self.engine.config().clone();
                self.engine = Engine::new(
                    cfg,
                    applied,
                    Vec::new(),
                    false,
                    crate::engine::secondary::Lsn::ZERO,
                    (Seq::ZERO, 0),
                );
                self.invalidation.as_mut().expect("checked").stage = Stage::Truncate;
                self.jh.truncate(applied);
            }
            Stage::Truncate => {}
        }
    }

    /// The journal's truncation finished: answer the command.
    pub(super) fn invalidation_truncated(&mut self, result: &Result<(), String>) -> bool {
        let Some(p) = self.invalidation.take_if(|p| p.stage == Stage::Truncate) else {
            return false;
        };
        let reply = match result {
            Ok(()) => {
                let message = format!(
                    "{} invalidated: its data is discarded (Inconsistent, not promotable); {}every block is copied again from {} at its next connection, then it is UpToDate",
                    self.cfg.name,
                    match &p.ended {
                        Some(peer) => format!("the session with {peer} was ended; "),
                        None => String::new(),
                    },
                    self.cfg.peer_name
                );
                tracing::warn!("{message}");
                self.metrics.events.push("invalidated", message.clone());
                ControlReply::success(serde_json::json!({ "message": message }))
            }
            Err(e) => {
                self.metrics
                    .set_error(format!("invalidate: truncating the journal: {e}"));
                ControlReply::error(format!(
                    "invalidate: the superblock owes a full resync, but dropping the journal's records failed: {e}; restart the node after checking the disk (it drops them at start)"
                ))
            }
        };
        let _ = p.reply.send(reply);
        true
    }

    /// The node stops before the invalidation completed.
    pub(super) fn abandon_invalidation(&mut self) {
        if let Some(p) = self.invalidation.take() {
            let recorded = !matches!(p.stage, Stage::Quiesce);
            let _ = p.reply.send(ControlReply::error(if recorded {
                "the node stopped during the invalidation: if its superblock recorded it (tandem status shows Inconsistent after the restart), the full resync follows its next start; otherwise run tandem invalidate again".into()
            } else {
                "the node stopped before the invalidation was recorded: nothing changed; run tandem invalidate again".into()
            }));
        }
    }

    /// A consistent point after the full resync an invalidation owed: the
    /// superblock stops owing it (written by the caller).
    pub(super) fn full_sync_done(&mut self) {
        if !recovery::full_sync_owed(&self.sb) {
            return;
        }
        self.sb = recovery::full_sync_completed(&self.sb);
        let message = format!(
            "full resync from {} completed after tandem invalidate: {} is UpToDate",
            self.session
                .as_ref()
                .map_or(self.cfg.peer_name.as_str(), |s| s.peer.as_str()),
            self.cfg.name
        );
        tracing::info!("{message}");
        self.metrics.events.push("invalidate-done", message);
    }
}
