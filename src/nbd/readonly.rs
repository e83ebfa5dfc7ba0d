//! The read-only export of a secondary's volume (`--export-readonly ADDR`):
//! clients read the replica while replication continues; `NBD_FLAG_READ_ONLY`
//! is set and writes, trims and write-zeroes are refused with `EPERM` before
//! they reach anything (G8: a secondary's volume is written by replication only).
//!
//! What a reader sees today: the volume as replication leaves it at the moment
//! of the read, a mix of consistent points while writes are applied (like a
//! crash-consistent snapshot taken slowly). The secondary journal will give it
//! the last consistent image instead: swap [`ReadOnlyExport`]'s `read` (and
//! `block_status`) for that view; nothing else here changes.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::extents::VolumeExtents;
use super::{NbdAddress, NbdExport, NbdServer};
use crate::config::NodeConfig;
use crate::frontend::{ExportBackend, Extent, IoFuture, MetaContext};
use crate::volume::Volume;

/// A volume, readable only.
pub struct ReadOnlyExport {
    volume: Volume,
    extents: Arc<VolumeExtents>,
}

impl ReadOnlyExport {
    pub fn new(volume: Volume) -> io::Result<ReadOnlyExport> {
        let extents = Arc::new(VolumeExtents::for_volume(&volume)?);
        Ok(ReadOnlyExport { volume, extents })
    }
}

fn refused() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

impl ExportBackend for ReadOnlyExport {
    fn size_bytes(&self) -> u64 {
        self.volume.size_bytes()
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<Bytes> {
        let volume = self.volume.clone();
        Box::pin(async move { volume.read(offset, len).await })
    }

    // The server refuses these on a read-only export before they get here; the
    // backend refuses them too, so no path can write a secondary's volume.
    fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> IoFuture<()> {
        Box::pin(async { Err(refused()) })
    }

    fn write_zeroes(&self, _offset: u64, _len: u32, _fua: bool) -> IoFuture<()> {
        Box::pin(async { Err(refused()) })
    }

    fn trim(&self, _offset: u64, _len: u32) -> IoFuture<()> {
        Box::pin(async { Err(refused()) })
    }

    /// Nothing was written through this export, so nothing is to be made durable.
    fn flush(&self) -> IoFuture<()> {
        Box::pin(async { Ok(()) })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        let extents = Arc::clone(&self.extents);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || extents.will_need(offset, len))
                .await
                .map_err(io::Error::other)?
        })
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
        extents_max: usize,
    ) -> IoFuture<Vec<Extent>> {
        let extents = Arc::clone(&self.extents);
        let context = context.clone();
        Box::pin(async move {
            match context {
                MetaContext::Allocation => tokio::task::spawn_blocking(move || {
                    extents.allocation(offset, len, extents_max)
                })
                .await
                .map_err(io::Error::other)?,
                MetaContext::DirtyBitmap(name) => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the read-only export has no dirty bitmap {name:?}"),
                )),
            }
        })
    }
}

/// Serve `volume` read-only on the node's `--export-readonly` address until
/// `stop`, with the node's export TLS settings. Returns the address bound and
/// the server task (which ends once `stop` is cancelled and clients are done).
pub async fn serve_readonly(
    cfg: &NodeConfig,
    address: &str,
    volume: Volume,
    metrics: &crate::metrics::Metrics,
    stop: CancellationToken,
) -> Result<(NbdAddress, tokio::task::JoinHandle<()>), super::NbdError> {
    let backend = ReadOnlyExport::new(volume).map_err(|e| super::NbdError::InvalidExport {
        name: cfg.nbd_name.clone(),
        reason: format!("cannot open the volume for allocation queries: {e}"),
    })?;
    serve_backend_readonly(cfg, address, Arc::new(backend), metrics, stop).await
}

/// Like [`serve_readonly`] for any backend: the consistent-image view of the
/// secondary journal plugs in here (its writes must fail; the server refuses
/// them before they get there anyway).
pub async fn serve_backend_readonly(
    cfg: &NodeConfig,
    address: &str,
    backend: Arc<dyn ExportBackend>,
    metrics: &crate::metrics::Metrics,
    stop: CancellationToken,
) -> Result<(NbdAddress, tokio::task::JoinHandle<()>), super::NbdError> {
    let addr: NbdAddress = address.parse()?;
    let options = super::tls::server_options(cfg, &addr, metrics)?;
    let export = NbdExport {
        name: cfg.nbd_name.clone(),
        description: format!(
            "tandem resource {} (secondary {}, read-only)",
            cfg.resource, cfg.name
        ),
        read_only: true,
        block_size_preferred: cfg.block_size.max(512),
        ..NbdExport::default()
    };
    export.validate()?;
    let listener = NbdServer::bind(&addr).await?;
    let bound = listener
        .local_addr()
        .map_err(|source| super::NbdError::Bind {
            address: addr.to_string(),
            source,
        })?;
    let server = NbdServer::with_options(backend, export, options);
    tracing::info!(nbd = %bound, "read-only NBD export of the secondary's volume");
    let task = tokio::spawn(async move {
        if let Err(e) = server.serve(listener, stop).await {
            tracing::error!("read-only NBD export: {e}");
        }
    });
    Ok((bound, task))
}
