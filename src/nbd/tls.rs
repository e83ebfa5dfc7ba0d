//! TLS for the NBD export, from the node's certificates (`tandem certs`):
//! the server presents the node's own certificate (`DIR/NAME.pem`); clients
//! must present a certificate signed by the same CA for one of the names given
//! with `--nbd-tls-client` (e.g. `tandem certs --name backup` gives
//! `backup.pem`/`backup.key` for a backup host). These names are separate from
//! the node names: an export client cannot pose as a replication peer, nor a
//! peer as an export client, unless an administrator lists it.
//!
//! Policy: with export clients configured, every connection must negotiate
//! `NBD_OPT_STARTTLS` first (the spec's FORCEDTLS mode), loopback included.
//! Without, the export is plaintext, and a plaintext export on a non-loopback
//! TCP address is refused unless `--danger-nbd-plaintext` says otherwise.

use std::sync::Arc;

use tokio_rustls::rustls::pki_types::ServerName;

use super::client::ClientTls;
use super::{NbdAddress, NbdError, ServerOptions};
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::transport::TlsFiles;

/// The server options (TLS or not, counters in `metrics`) for an export of
/// `cfg` on `addr`, or why that export must not be served.
pub fn server_options(
    cfg: &NodeConfig,
    addr: &NbdAddress,
    metrics: &Metrics,
) -> Result<ServerOptions, NbdError> {
    let plain = ServerOptions {
        stats: Some(Arc::clone(&metrics.nbd)),
        ..ServerOptions::default()
    };
    if cfg.nbd_tls_clients.is_empty() {
        if !addr.is_local() && !cfg.danger_nbd_plaintext {
            return Err(NbdError::PlaintextNotLoopback {
                address: addr.to_string(),
            });
        }
        return Ok(plain);
    }
    let files = TlsFiles {
        dir: cfg.tls_dir.clone(),
        node_name: cfg.name.clone(),
        peer_name: cfg.peer_name.clone(),
    };
    let config = crate::transport::export_server_config(&files, &cfg.nbd_tls_clients)
        .map_err(|e| NbdError::TlsConfig(e.to_string()))?;
    Ok(ServerOptions {
        tls: Some(config),
        ..plain
    })
}

/// Client TLS for tandem's own client: the certificate `DIR/CLIENT.pem`, the CA
/// `DIR/ca.pem`, and the name the server's certificate must carry (a node name,
/// or an IP address the node certificate lists, such as 127.0.0.1).
pub fn client_tls(
    dir: &std::path::Path,
    client_name: &str,
    server_name: &str,
) -> Result<ClientTls, NbdError> {
    let files = TlsFiles {
        dir: dir.to_owned(),
        node_name: client_name.to_owned(),
        peer_name: server_name.to_owned(),
    };
    let config = crate::transport::export_client_config(&files)
        .map_err(|e| NbdError::TlsConfig(e.to_string()))?;
    let server_name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
        NbdError::TlsConfig(format!(
            "{server_name:?} is neither a DNS name nor an IP address"
        ))
    })?;
    Ok(ClientTls {
        config: Arc::clone(&config),
        server_name,
    })
}
