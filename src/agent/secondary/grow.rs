//! ha (issue 12): online grow, the secondary's part. The primary sends `Grow`
//! in frame order before it grows itself; this node grows its volume (an image
//! file is extended, a block device checked and its new range zeroed), then its
//! metadata (bitmap area, then the superblock with the new size: durable), and
//! only then lets frames address the new range and answers `Grown`. A crash in
//! between leaves a volume larger than the metadata records, which a start
//! serves at the recorded size (agent/mod.rs `open_node`); the primary, which
//! grows only after the answer, still has the old size, and a handshake
//! accepts a secondary larger than its primary (engine/handshake.rs). A primary
//! larger than this node (a failover to a secondary that grew first, then the
//! old primary rejoins as secondary) makes this node grow at the connection.

use super::Node;
use crate::agent::metawork::MetaJob;
use crate::bitmap::DirtyBitmap;
use crate::wire::Message;

impl Node {
    fn answer_grow(&self, size_bytes: u64, error: String) {
        self.ack(Message::Grown { size_bytes, error });
    }

    /// Grow this node to `size_bytes`: the volume now, the metadata through the
    /// metadata thread ([`Self::grow_recorded`] finishes it). `answer`: a `Grow`
    /// from the session's primary waits for `Grown`. Ok(false): already that
    /// size, nothing to do.
    fn grow_to(&mut self, size_bytes: u64, answer: bool) -> Result<bool, String> {
        let current = self.volume.size_bytes();
        if self.growing.is_some() {
            return Err("a grow of this secondary is already under way".into());
        }
        if size_bytes < current {
            return Err(format!(
                "{} is already {current} bytes (an earlier resize grew it and was interrupted): resize to at least {current} bytes",
                self.cfg.name
            ));
        }
        if !size_bytes.is_multiple_of(u64::from(self.cfg.block_size)) {
            return Err(format!(
                "{size_bytes} bytes is not a multiple of the block size ({} bytes)",
                self.cfg.block_size
            ));
        }
        if size_bytes == current && self.sb.size_bytes == size_bytes {
            // An interrupted resize got this far: nothing to do.
            self.engine.grow(size_bytes);
            return Ok(false);
        }
        self.volume
            .grow(size_bytes)
            .map_err(|e| format!("{}: {e}", self.cfg.name))?;
        tracing::info!(
            from_bytes = current,
            to_bytes = size_bytes,
            "online grow: the volume is extended; recording the new size in the metadata"
        );
        self.sb.size_bytes = size_bytes;
        let blocks = DirtyBitmap::for_volume(size_bytes, self.cfg.block_size).block_count();
        self.own_dirty.grow(blocks);
        self.own_verify.grow(blocks);
        let mut bitmap = self.own_dirty.clone();
        bitmap.union_with(&self.own_verify);
        self.send_meta(MetaJob::Grow {
            sb: self.sb.clone(),
            bitmap,
        });
        self.growing = Some((current, size_bytes, answer));
        Ok(true)
    }

    /// `Grow` from the primary.
    pub(super) fn start_grow(&mut self, size_bytes: u64) {
        match self.grow_to(size_bytes, true) {
            Ok(true) => {}
            Ok(false) => self.answer_grow(size_bytes, String::new()),
            Err(e) => {
                tracing::warn!(size_bytes, "grow refused: {e}");
                self.answer_grow(size_bytes, e);
            }
        }
    }

    /// A primary larger than this node connects: the pair was cut mid-grow (this
    /// node was its primary and grew first, then failed over; or it missed the
    /// `Grow`). This node grows to the primary's size, like for a `Grow`, and the
    /// connection is refused until that is durable (the primary redials). The
    /// caller checked everything else of the Hello against this node first.
    /// Returns why the connection is refused now.
    pub(super) fn grow_for_handshake(&mut self, peer: &str, size_bytes: u64) -> String {
        match self.grow_to(size_bytes, false) {
            Ok(_) => {
                let message = format!(
                    "{peer}'s volume is {size_bytes} bytes, larger than {}'s: {} grows to it (an online grow the pair did not finish); the connection is retried",
                    self.cfg.name, self.cfg.name
                );
                tracing::warn!("{message}");
                message
            }
            Err(e) => format!(
                "{peer}'s volume is {size_bytes} bytes, larger than {}'s {} bytes, and growing it failed: {e}",
                self.cfg.name,
                self.volume.size_bytes()
            ),
        }
    }

    /// The metadata recorded the grow (or failed to).
    pub(super) fn grow_recorded(&mut self, result: &Result<u64, String>) {
        let Some((from, size_bytes, answer)) = self.growing.take() else {
            return;
        };
        match result {
            Ok(_) => {
                self.engine.grow(size_bytes);
                let message = format!(
                    "{} grew from {from} to {size_bytes} bytes (online grow, {})",
                    self.cfg.name,
                    if answer {
                        "asked by the primary"
                    } else {
                        "to its primary's size at a connection"
                    }
                );
                tracing::info!("{message}");
                self.metrics.events.push("grown", message);
                if answer {
                    self.answer_grow(size_bytes, String::new());
                }
            }
            Err(e) => {
                // The store is poisoned by the failed write: the node stops
                // acknowledging (metadata errors are handled like any other).
                if answer {
                    self.answer_grow(
                        size_bytes,
                        format!("{}: recording the new size failed: {e}", self.cfg.name),
                    );
                }
            }
        }
    }
}
