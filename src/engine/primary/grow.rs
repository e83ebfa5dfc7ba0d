//! ha (issue 12): online grow of a running primary's state. The volume and the
//! metadata grow in the agent (volume/, meta/); here the bitmaps and the size
//! every range check uses. The new blocks are clean: both nodes zero them
//! before the new size is served (`Volume::grow`), so they hold the same bytes
//! there and nothing is resynced.

use super::PrimaryEngine;
use super::verify::VerifyState;
use crate::bitmap::DirtyBitmap;

/// Why the engine cannot grow now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrowRefusal {
    #[error(
        "the volume is {current_bytes} bytes: shrinking it to {size_bytes} bytes is refused (a filesystem on it would lose its end); nothing changed. Give a size of at least {current_bytes} bytes"
    )]
    Shrink { size_bytes: u64, current_bytes: u64 },
    #[error(
        "{size_bytes} bytes is not a multiple of the block size ({block_size} bytes); nothing changed"
    )]
    Unaligned { size_bytes: u64, block_size: u32 },
    #[error(
        "an online verify is running; the volume grows once it ended (tandem verify, or tandem status); nothing changed"
    )]
    VerifyRunning,
    #[error("this node's disk failed a write or flush (poisoned): {0}; nothing changed")]
    Poisoned(String),
}

impl<T, D: Clone> PrimaryEngine<T, D> {
    /// Whether the engine can grow to `size_bytes` now (nothing is changed).
    pub fn check_grow(&self, size_bytes: u64) -> Result<(), GrowRefusal> {
        if let Some(reason) = &self.poisoned {
            return Err(GrowRefusal::Poisoned(reason.clone()));
        }
        if size_bytes < self.cfg.size_bytes {
            return Err(GrowRefusal::Shrink {
                size_bytes,
                current_bytes: self.cfg.size_bytes,
            });
        }
        if !size_bytes.is_multiple_of(u64::from(self.cfg.block_size)) {
            return Err(GrowRefusal::Unaligned {
                size_bytes,
                block_size: self.cfg.block_size,
            });
        }
        if self
            .verify_report()
            .is_some_and(|r| matches!(r.state, VerifyState::Scanning | VerifyState::Repairing))
        {
            return Err(GrowRefusal::VerifyRunning);
        }
        Ok(())
    }

    /// Grow to `size_bytes`: the new blocks are clean (in sync). Call once the
    /// volume is that large on this node and on the peer, and before any
    /// request may address the new range.
    pub fn grow(&mut self, size_bytes: u64) -> Result<(), GrowRefusal> {
        self.check_grow(size_bytes)?;
        let blocks = DirtyBitmap::blocks_for(size_bytes, self.cfg.block_size);
        self.dirty.grow(blocks);
        self.resync.verify.grow(blocks);
        self.resync.grow_fine(blocks);
        self.cfg.size_bytes = size_bytes;
        Ok(())
    }
}
