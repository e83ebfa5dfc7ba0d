//! rustls configuration from PEM files, and translation of handshake
//! failures into errors that say which side is wrong and what to do.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::pki_types::UnixTime;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{Inner, PeerStream, TlsFiles, TransportError};

/// The dialing side's TLS, loaded once from the certificate files: runs the
/// handshake over any byte stream (TCP, or an in-memory pipe in tests).
#[derive(Clone)]
pub struct TlsClient {
    files: TlsFiles,
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsClient {
    pub fn load(files: &TlsFiles) -> Result<TlsClient, TransportError> {
        Ok(TlsClient {
            files: files.clone(),
            connector: TlsConnector::from(client_config(files)?),
            server_name: files.peer_server_name()?,
        })
    }

    /// Run the client handshake over `io`: the server must present a
    /// certificate of our CA for the expected peer name (G7). `addr` names
    /// the peer in errors.
    pub async fn connect<S>(&self, io: S, addr: SocketAddr) -> Result<PeerStream<S>, TransportError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = self
            .connector
            .connect(self.server_name.clone(), io)
            .await
            .map_err(|e| classify_handshake_error(&self.files, addr, Side::Server, e))?;
        Ok(PeerStream {
            inner: Inner::Client(Box::new(stream)),
            peer_addr: addr,
        })
    }
}

/// The accepting side's TLS, loaded once from the certificate files.
#[derive(Clone)]
pub struct TlsServer {
    files: TlsFiles,
    acceptor: TlsAcceptor,
}

impl TlsServer {
    pub fn load(files: &TlsFiles) -> Result<TlsServer, TransportError> {
        files.peer_server_name()?;
        Ok(TlsServer {
            files: files.clone(),
            acceptor: TlsAcceptor::from(server_config(files)?),
        })
    }

    /// Run the server handshake over `io`: the client must present a
    /// certificate of our CA valid for the expected peer name (G7).
    pub async fn accept<S>(&self, io: S, addr: SocketAddr) -> Result<PeerStream<S>, TransportError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = self
            .acceptor
            .accept(io)
            .await
            .map_err(|e| classify_handshake_error(&self.files, addr, Side::Client, e))?;
        check_client_name(&self.files, addr, stream.get_ref().1.peer_certificates())?;
        Ok(PeerStream {
            inner: Inner::Server(Box::new(stream)),
            peer_addr: addr,
        })
    }
}

impl TlsFiles {
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.node_name))
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(format!("{}.key", self.node_name))
    }

    /// The expected peer name as a TLS server name (must be a DNS name).
    pub(super) fn peer_server_name(&self) -> Result<ServerName<'static>, TransportError> {
        match ServerName::try_from(self.peer_name.clone()) {
            Ok(name @ ServerName::DnsName(_)) => Ok(name),
            _ => Err(TransportError::BadNodeName {
                name: self.peer_name.clone(),
            }),
        }
    }
}

fn read_pem_file(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::CertFileRead {
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let pem = read_pem_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::CertFileInvalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TransportError::CertFileInvalid {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block".to_string(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let pem = read_pem_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TransportError::CertFileInvalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn load_roots(files: &TlsFiles) -> Result<Arc<RootCertStore>, TransportError> {
    let path = files.ca_path();
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&path)? {
        roots
            .add(cert)
            .map_err(|e| TransportError::CertFileInvalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn config_error(files: &TlsFiles) -> impl FnOnce(rustls::Error) -> TransportError + '_ {
    |source| TransportError::TlsConfig {
        cert_path: files.cert_path(),
        source,
    }
}

/// TLS 1.3 only, our certificate as client certificate, peers verified
/// against `ca.pem`.
pub(super) fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TransportError> {
    let roots = load_roots(files)?;
    let certs = load_certs(&files.cert_path())?;
    let key = load_key(&files.key_path())?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error(files))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(config_error(files))?;
    Ok(Arc::new(config))
}

/// The CA check of [`WebPkiClientVerifier`] plus the expected peer name, so a
/// client certificate for the wrong node is rejected *inside* the handshake:
/// the client then receives a `BadCertificate` alert instead of a
/// connection that silently closes.
#[derive(Debug)]
struct PeerNameClientVerifier {
    ca_verifier: Arc<dyn ClientCertVerifier>,
    expected: ServerName<'static>,
}

impl ClientCertVerifier for PeerNameClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca_verifier.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .ca_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, &self.expected)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca_verifier.supported_verify_schemes()
    }
}

/// TLS 1.3 only, a client certificate signed by `ca.pem` and valid for the
/// expected peer name required.
pub(super) fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TransportError> {
    let roots = load_roots(files)?;
    let certs = load_certs(&files.cert_path())?;
    let key = load_key(&files.key_path())?;
    let ca_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TransportError::CertFileInvalid {
            path: files.ca_path(),
            reason: e.to_string(),
        })?;
    let verifier = Arc::new(PeerNameClientVerifier {
        ca_verifier,
        expected: files.peer_server_name()?,
    });
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error(files))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(config_error(files))?;
    Ok(Arc::new(config))
}

/// Check that the verified client certificate names `files.peer_name`. The
/// handshake's verifier already did; this re-check on the finished
/// connection keeps G7 independent of how the verifier is wired.
pub(super) fn check_client_name(
    files: &TlsFiles,
    addr: SocketAddr,
    peer_certs: Option<&[CertificateDer<'static>]>,
) -> Result<(), TransportError> {
    let Some(end_entity) = peer_certs.and_then(|c| c.first()) else {
        return Err(TransportError::NoClientCertificate { addr });
    };
    let expected = files.peer_server_name()?;
    let result = rustls::server::ParsedCertificate::try_from(end_entity)
        .and_then(|parsed| rustls::client::verify_server_name(&parsed, &expected));
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(
            classify_rustls_error(files, addr, Side::Client, &e).unwrap_or_else(|| {
                TransportError::PeerCertificate {
                    addr,
                    side: Side::Client,
                    reason: e.to_string(),
                }
            }),
        ),
    }
}

/// Which end of the connection presented the certificate in question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// We dialed; the peer is the TLS server.
    Server,
    /// We accepted; the peer is the TLS client.
    Client,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Server => "server",
            Side::Client => "client",
        })
    }
}

fn classify_rustls_error(
    files: &TlsFiles,
    addr: SocketAddr,
    peer_side: Side,
    e: &rustls::Error,
) -> Option<TransportError> {
    use rustls::Error as E;
    Some(match e {
        E::InvalidCertificate(CertificateError::UnknownIssuer)
        | E::InvalidCertificate(CertificateError::BadSignature) => TransportError::UnknownCa {
            addr,
            side: peer_side,
            ca_path: files.ca_path(),
        },
        E::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            presented,
        }) => TransportError::PeerName {
            addr,
            expected: expected.to_str().into_owned(),
            found: presented.iter().map(|n| tidy_presented_name(n)).collect(),
        },
        E::InvalidCertificate(CertificateError::NotValidForName) => TransportError::PeerName {
            addr,
            expected: files.peer_name.clone(),
            found: Vec::new(),
        },
        E::InvalidCertificate(other) => TransportError::PeerCertificate {
            addr,
            side: peer_side,
            reason: format!("{other:?}"),
        },
        E::NoCertificatesPresented => TransportError::NoClientCertificate { addr },
        E::AlertReceived(alert) => TransportError::PeerRefusedUs {
            addr,
            alert: format!("{alert:?}"),
            cert_path: files.cert_path(),
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => TransportError::NotTls { addr },
        _ => return None,
    })
}

/// rustls reports presented names in Debug form (`DnsName("beta")`,
/// `IpAddress(127.0.0.1)`); show the bare name.
fn tidy_presented_name(name: &str) -> String {
    for prefix in ["DnsName(\"", "IpAddress("] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return rest.trim_end_matches(')').trim_end_matches('"').to_string();
        }
    }
    name.to_string()
}

/// Turn a failed TLS handshake into the most specific error we can name.
pub(super) fn classify_handshake_error(
    files: &TlsFiles,
    addr: SocketAddr,
    peer_side: Side,
    e: io::Error,
) -> TransportError {
    if let Some(rustls_error) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        && let Some(classified) = classify_rustls_error(files, addr, peer_side, rustls_error)
    {
        return classified;
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => TransportError::HandshakeClosed { addr },
        _ => TransportError::Handshake { addr, source: e },
    }
}

// nbd (issue 13): TLS for the NBD export. Its clients are not the peer node:
// they present certificates from the same CA (`tandem certs --name backup`)
// under names of their own, listed with --nbd-tls-client.

/// The CA check of [`WebPkiClientVerifier`] plus "valid for one of these names".
#[derive(Debug)]
struct AnyNameClientVerifier {
    ca_verifier: Arc<dyn ClientCertVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for AnyNameClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca_verifier.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .ca_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        if self
            .allowed
            .iter()
            .any(|name| rustls::client::verify_server_name(&parsed, name).is_ok())
        {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca_verifier.supported_verify_schemes()
    }
}

/// Server configuration for an NBD export: this node's certificate
/// (`files.node_name`), TLS 1.3 or 1.2 (NBD clients must support 1.2; gnutls
/// clients such as qemu and libnbd negotiate 1.3), and a client certificate
/// signed by `ca.pem` and valid for one of `client_names` required.
pub fn export_server_config(
    files: &TlsFiles,
    client_names: &[String],
) -> Result<Arc<ServerConfig>, TransportError> {
    let allowed = client_names
        .iter()
        .map(|name| match ServerName::try_from(name.clone()) {
            Ok(n @ ServerName::DnsName(_)) => Ok(n),
            _ => Err(TransportError::BadNodeName { name: name.clone() }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let roots = load_roots(files)?;
    let certs = load_certs(&files.cert_path())?;
    let key = load_key(&files.key_path())?;
    let ca_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TransportError::CertFileInvalid {
            path: files.ca_path(),
            reason: e.to_string(),
        })?;
    let verifier = Arc::new(AnyNameClientVerifier {
        ca_verifier,
        allowed,
    });
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(config_error(files))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(config_error(files))?;
    Ok(Arc::new(config))
}

/// Client configuration for tandem's own NBD client: the certificate of
/// `files.node_name` (a client name), `ca.pem` as the only root.
pub fn export_client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TransportError> {
    client_config(files)
}
