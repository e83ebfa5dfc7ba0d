//! ha (issue 12): online grow, `tandem resize --size SIZE` on the primary.
//!
//! Order, so that a crash at any point leaves the pair consistent and its
//! metadata recoverable:
//! 1. checks (nothing changed on refusal): not a shrink, block-size aligned, no
//!    verify running, this node's block device (if any) already that large, the
//!    secondary connected and able to grow (capability GROW);
//! 2. `Grow` goes to the secondary in frame order; it grows its volume, then its
//!    metadata durably, and answers `Grown` (agent/secondary/grow.rs);
//! 3. this node grows its volume (image extended, block device's new range
//!    zeroed), its engine (bitmaps: the new blocks are clean, both nodes hold
//!    zeroes there), then its metadata (bitmap area, then the superblock with the
//!    new size: durable);
//! 4. the NBD checkpoints grow (every checkpoint counts the new range as
//!    changed: a backup taken at it had none);
//! 5. only then the export's size grows: new NBD connections see it (NBD has no
//!    resize notification; attached clients keep the size they negotiated until
//!    they reconnect), and nothing addresses the new range before.
//!
//! A crash after 2 leaves the secondary larger than the primary, which the
//! handshake accepts (the extra range is zeroed and unused) until the resize is
//! run again; a crash in 3 before the superblock leaves a volume larger than its
//! metadata, which a start serves at the recorded size (agent/mod.rs).

use tokio::sync::oneshot;

use super::{Actions, Owner, ToPeer};
use crate::agent::control::ControlReply;
use crate::agent::metawork::MetaJob;
use crate::wire::caps;

/// A resize under way.
pub(super) struct Pending {
    from_bytes: u64,
    size_bytes: u64,
    reply: oneshot::Sender<ControlReply>,
    stage: Stage,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// `Grow` sent in this session; waiting for `Grown`.
    Peer { session: u64 },
    /// This node's metadata is recording it.
    Meta,
}

impl Owner {
    /// `tandem resize --size`: check, then ask the secondary first.
    pub(super) fn start_resize(&mut self, size_bytes: u64, reply: oneshot::Sender<ControlReply>) {
        let name = self.cfg.name.clone();
        let refuse = |reply: oneshot::Sender<ControlReply>, why: String| {
            let _ = reply.send(ControlReply::error(format!(
                "resize refused on {name}: {why}"
            )));
        };
        if self.grow.is_some() {
            return refuse(reply, "a resize is already under way".into());
        }
        if self.draining.is_some() {
            return refuse(reply, "the node is stopping".into());
        }
        let current = self.engine.config().size_bytes;
        if size_bytes == current {
            let _ = reply.send(ControlReply::success(serde_json::json!({
                "message": format!("{name} is already {size_bytes} bytes: nothing to do"),
                "size_bytes": size_bytes,
            })));
            return;
        }
        if let Err(e) = self.engine.check_grow(size_bytes) {
            return refuse(reply, e.to_string());
        }
        if self.volume.is_block_device() {
            match self.volume.physical_size_bytes() {
                Ok(device) if device < size_bytes => {
                    return refuse(
                        reply,
                        format!(
                            "its block device {} is {device} bytes, smaller than {size_bytes}: grow the device first (on both nodes), then run tandem resize again; nothing changed",
                            self.cfg.volume.display()
                        ),
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    return refuse(
                        reply,
                        format!("reading the size of {}: {e}", self.cfg.volume.display()),
                    );
                }
            }
        }
        let Some(s) = &self.session else {
            return refuse(
                reply,
                format!(
                    "its secondary {} is not connected, and the pair grows together (the secondary first); nothing changed. Bring the link up (start {peer}, or tandem connect) and run tandem resize again",
                    self.cfg.peer_name,
                    peer = self.cfg.peer_name
                ),
            );
        };
        if s.peer.capabilities & caps::GROW == 0 {
            return refuse(
                reply,
                format!(
                    "its secondary {} runs a tandem without online grow; upgrade it first; nothing changed",
                    s.peer.node_name
                ),
            );
        }
        if s.tx.try_send(ToPeer::Grow { size_bytes }).is_err() {
            return refuse(
                reply,
                "the replication link is busy or ending; run tandem resize again".into(),
            );
        }
        tracing::info!(
            from_bytes = current,
            to_bytes = size_bytes,
            secondary = %s.peer.node_name,
            "resize: asking the secondary to grow first"
        );
        self.grow = Some(Pending {
            from_bytes: current,
            size_bytes,
            reply,
            stage: Stage::Peer { session: s.id },
        });
    }

    /// The secondary answered `Grow`.
    pub(super) fn peer_grown(
        &mut self,
        session: u64,
        size_bytes: u64,
        error: String,
        out: &mut Actions,
    ) {
        let Some(p) = self
            .grow
            .take_if(|p| p.stage == Stage::Peer { session } && p.size_bytes == size_bytes)
        else {
            return;
        };
        let fail = |p: Pending, why: String| {
            tracing::warn!("resize: {why}");
            let _ = p.reply.send(ControlReply::error(why));
        };
        if !error.is_empty() {
            return fail(
                p,
                format!(
                    "resize refused by the secondary {}: {error}; nothing changed on {}",
                    self.cfg.peer_name, self.cfg.name
                ),
            );
        }
        // The secondary holds the new size durably: now this node.
        if let Err(e) = self.engine.check_grow(size_bytes) {
            return fail(
                p,
                format!(
                    "resize: the secondary grew to {size_bytes} bytes, but {} cannot now: {e}. Run tandem resize again once that is resolved (a larger secondary is harmless meanwhile)",
                    self.cfg.name
                ),
            );
        }
        if let Err(e) = self.volume.grow(size_bytes) {
            return fail(
                p,
                format!(
                    "resize: the secondary grew to {size_bytes} bytes, but growing {}'s volume failed: {e}. Run tandem resize again once that is resolved (a larger secondary is harmless meanwhile)",
                    self.cfg.name
                ),
            );
        }
        self.engine
            .grow(size_bytes)
            .expect("checked just before, nothing ran in between");
        self.sb.size_bytes = size_bytes;
        let bitmap = self.engine.persist_image();
        self.meta
            .as_ref()
            .expect("the metadata worker runs until finish")
            .send(MetaJob::Grow {
                sb: self.sb.clone(),
                bitmap,
            });
        self.grow = Some(Pending {
            stage: Stage::Meta,
            ..p
        });
        self.act(out);
    }

    /// This node's metadata recorded the grow (or failed to).
    pub(super) fn grow_recorded(&mut self, result: Result<u64, String>, out: &mut Actions) {
        let Some(p) = self.grow.take_if(|p| p.stage == Stage::Meta) else {
            return;
        };
        match result {
            Ok(size_bytes) => {
                // NBD checkpoints cover the new range (counted as changed)
                // before any client can write there.
                if let Some(c) = self.shared.checkpoints.get() {
                    c.grow(size_bytes);
                }
                // Publish: new NBD connections see the new size from here on.
                self.shared
                    .size_bytes
                    .store(size_bytes, std::sync::atomic::Ordering::Release);
                let message = format!(
                    "grown from {} to {size_bytes} bytes on {} and {}; new NBD connections see {size_bytes} bytes (clients attached now keep the size they negotiated until they reconnect)",
                    p.from_bytes, self.cfg.name, self.cfg.peer_name
                );
                tracing::info!("{message}");
                self.shared.metrics.events.push("grown", message.clone());
                let _ = p.reply.send(ControlReply::success(serde_json::json!({
                    "message": message,
                    "size_bytes": size_bytes,
                })));
            }
            Err(e) => {
                tracing::error!(
                    "resize: recording the new size failed: {e}; refusing further writes"
                );
                self.engine
                    .poison(format!("recording a grow in the metadata failed: {e}"), out);
                let _ = p.reply.send(ControlReply::error(format!(
                    "resize: recording the new size in {}'s metadata failed: {e}; the node is poisoned: check the disk and restart it (it serves the size its metadata records)",
                    self.cfg.name
                )));
                self.act(out);
            }
        }
    }

    /// The session ended while the secondary was asked to grow.
    pub(super) fn grow_session_ended(&mut self) {
        if let Some(p) = self.grow.take_if(|p| matches!(p.stage, Stage::Peer { .. })) {
            let _ = p.reply.send(ControlReply::error(format!(
                "resize: the session with {} ended before it answered; it may have grown (harmless: the extra range is unused), {} did not. Run tandem resize again once it is connected",
                self.cfg.peer_name, self.cfg.name
            )));
        }
    }
}
