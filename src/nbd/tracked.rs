//! The primary's export as NBD clients see it: the replicated backend, plus
//! checkpoint marking on every write, write-zeroes and trim
//! ([`crate::checkpoint`]), `base:allocation` from the volume's file
//! ([`super::extents`]), `qemu:dirty-bitmap:NAME` from the checkpoints, and
//! read-ahead for `NBD_CMD_CACHE`.
//!
//! Owns: the order "mark the checkpoints durably enough, then issue the write",
//! and holding the mark until the write completes. Does not own replication
//! (the inner backend) nor the maps (the checkpoint store).

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::extents::VolumeExtents;
use crate::checkpoint::CheckpointStore;
use crate::frontend::{ExportBackend, Extent, IoFuture, MetaContext};
use crate::volume::Volume;

pub struct TrackedExport {
    inner: Arc<dyn ExportBackend>,
    checkpoints: Arc<CheckpointStore>,
    extents: Arc<VolumeExtents>,
}

impl TrackedExport {
    /// Wrap `inner` (which serves `volume`).
    pub fn new(
        inner: Arc<dyn ExportBackend>,
        volume: &Volume,
        checkpoints: Arc<CheckpointStore>,
    ) -> io::Result<TrackedExport> {
        Ok(TrackedExport {
            inner,
            checkpoints,
            extents: Arc::new(VolumeExtents::for_volume(volume)?),
        })
    }

    /// Mark, then run the write `op` builds, holding the mark until it completes.
    fn marked(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce(&dyn ExportBackend) -> IoFuture<()> + Send + 'static,
    ) -> IoFuture<()> {
        let inner = Arc::clone(&self.inner);
        let checkpoints = Arc::clone(&self.checkpoints);
        Box::pin(async move {
            let _marked = checkpoints
                .mark(offset, len)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            op(inner.as_ref()).await
        })
    }
}

impl ExportBackend for TrackedExport {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<Bytes> {
        self.inner.read(offset, len)
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        let len = data.len() as u64;
        self.marked(offset, len, move |b| b.write(offset, data, fua))
    }

    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> IoFuture<()> {
        self.marked(offset, u64::from(len), move |b| {
            b.write_zeroes(offset, len, fua)
        })
    }

    fn trim(&self, offset: u64, len: u32) -> IoFuture<()> {
        self.marked(offset, u64::from(len), move |b| b.trim(offset, len))
    }

    fn flush(&self) -> IoFuture<()> {
        self.inner.flush()
    }

    /// Zeroing an image file is a hole punched or a zero range allocated, and
    /// replication ships it without payload: much faster than writing zeroes.
    /// Block devices may fall back to writing zero pages, so they say no.
    fn fast_zeroes(&self) -> bool {
        self.extents.knows_holes()
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        let extents = Arc::clone(&self.extents);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || extents.will_need(offset, len))
                .await
                .map_err(io::Error::other)?
        })
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.checkpoints.names()
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
        extents_max: usize,
    ) -> IoFuture<Vec<Extent>> {
        match context {
            MetaContext::Allocation => {
                let extents = Arc::clone(&self.extents);
                Box::pin(async move {
                    tokio::task::spawn_blocking(move || {
                        extents.allocation(offset, len, extents_max)
                    })
                    .await
                    .map_err(io::Error::other)?
                })
            }
            MetaContext::DirtyBitmap(name) => {
                let result = self
                    .checkpoints
                    .block_status(name, offset, len, extents_max)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()));
                Box::pin(async move { result })
            }
        }
    }
}
