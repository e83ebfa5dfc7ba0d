//! ha (issue 12): online grow, the secondary's part. The primary sends `Grow`
//! in frame order before it grows itself; this node grows its volume (an image
//! file is extended, a block device checked and its new range zeroed), then its
//! metadata (bitmap area, then the superblock with the new size: durable), and
//! only then lets frames address the new range and answers `Grown`. A crash in
//! between leaves a volume larger than the metadata records, which a start
//! serves at the recorded size (agent/mod.rs `open_node`); the primary, which
//! grows only after the answer, still has the old size, and a handshake
//! accepts a secondary larger than its primary (engine/handshake.rs).

use super::Node;
use crate::agent::metawork::MetaJob;
use crate::bitmap::DirtyBitmap;
use crate::wire::Message;

impl Node {
    fn answer_grow(&self, size_bytes: u64, error: String) {
        self.ack(Message::Grown { size_bytes, error });
    }

    /// `Grow` from the primary.
    pub(super) fn start_grow(&mut self, size_bytes: u64) {
        let current = self.volume.size_bytes();
        let refuse = |node: &Node, e: String| {
            tracing::warn!(size_bytes, "grow refused: {e}");
            node.answer_grow(size_bytes, e);
        };
        if self.growing.is_some() {
            return refuse(self, "a grow of this secondary is already under way".into());
        }
        if size_bytes < current {
            return refuse(
                self,
                format!(
                    "{} is already {current} bytes (an earlier resize grew it and was interrupted): resize to at least {current} bytes",
                    self.cfg.name
                ),
            );
        }
        if !size_bytes.is_multiple_of(u64::from(self.cfg.block_size)) {
            return refuse(
                self,
                format!(
                    "{size_bytes} bytes is not a multiple of the block size ({} bytes)",
                    self.cfg.block_size
                ),
            );
        }
        if size_bytes == current && self.sb.size_bytes == size_bytes {
            // An interrupted resize got this far: nothing to do.
            self.engine.grow(size_bytes);
            return self.answer_grow(size_bytes, String::new());
        }
        if let Err(e) = self.volume.grow(size_bytes) {
            return refuse(self, format!("{}: {e}", self.cfg.name));
        }
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
        self.growing = Some((current, size_bytes));
    }

    /// The metadata recorded the grow (or failed to).
    pub(super) fn grow_recorded(&mut self, result: &Result<u64, String>) {
        let Some((from, size_bytes)) = self.growing.take() else {
            return;
        };
        match result {
            Ok(_) => {
                self.engine.grow(size_bytes);
                let message = format!(
                    "{} grew from {from} to {size_bytes} bytes (online grow, asked by the primary)",
                    self.cfg.name
                );
                tracing::info!("{message}");
                self.metrics.events.push("grown", message);
                self.answer_grow(size_bytes, String::new());
            }
            Err(e) => {
                // The store is poisoned by the failed write: the node stops
                // acknowledging (metadata errors are handled like any other).
                self.answer_grow(
                    size_bytes,
                    format!("{}: recording the new size failed: {e}", self.cfg.name),
                );
            }
        }
    }
}
