//! Agents: the I/O shells that wire an engine to a volume, the metadata store,
//! the peer transport, the NBD export and the control socket, as tokio tasks.
//!
//! One task owns a volume's replication state (the engine); the others talk to
//! it over bounded channels (ARCHITECTURE §1). Local I/O completions come back
//! on a channel whose length is bounded by the ops in flight, which the engine
//! and the replication window bound.

pub mod control;
pub mod primary;
pub mod secondary;

use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::meta::MetaError;
use crate::transport::{Security, TlsFiles, TransportError};
use crate::volume::VolumeError;
use crate::wire::WireError;

/// Errors that stop an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("NBD export: {0}")]
    Nbd(String),
    #[error("control socket {}: {source}", path.display())]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error(
        "metadata {meta} belongs to a volume of {meta_bytes} bytes, but {volume} has {volume_bytes} bytes; use the right --meta or recreate it"
    )]
    MetaVolumeMismatch {
        meta: String,
        meta_bytes: u64,
        volume: String,
        volume_bytes: u64,
    },
}

/// The transport security a node config asks for.
pub fn security_for(cfg: &NodeConfig) -> Security {
    if cfg.danger_plaintext {
        Security::DangerPlaintext
    } else {
        Security::Tls(TlsFiles {
            dir: cfg.tls_dir.clone(),
            node_name: cfg.name.clone(),
            peer_name: cfg.peer_name.clone(),
        })
    }
}

/// Map an I/O error to the errno handed to NBD clients.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::InvalidInput => libc::EINVAL,
        io::ErrorKind::OutOfMemory => libc::ENOMEM,
        io::ErrorKind::Unsupported => libc::EOPNOTSUPP,
        io::ErrorKind::PermissionDenied => libc::EPERM,
        _ => libc::EIO,
    })
}

/// Cancel `token` on SIGTERM or SIGINT (the first one); a second signal is left
/// to the default handler only after the agent has exited.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot install the SIGTERM handler: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
}

/// How long to wait between log lines that repeat the same connection failure.
pub(crate) const RETRY_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Metadata of a block device must live on a persistent filesystem: the default
/// sidecar path (`/dev/sdX.tandem-meta`) would land on devtmpfs and vanish at reboot,
/// silently losing the bitmap and the volume's identity.
pub fn check_meta_path(cfg: &NodeConfig, volume: &crate::volume::Volume) -> Result<(), AgentError> {
    if volume.is_block_device() && cfg.meta == crate::meta::MetaStore::default_path_for(&cfg.volume)
    {
        return Err(AgentError::Refused(format!(
            "{} is a block device: pass --meta PATH on a persistent filesystem (e.g. /var/lib/tandem/{}.meta) for its metadata",
            cfg.volume.display(),
            cfg.resource
        )));
    }
    Ok(())
}
