//! The replication link: TCP with keepalive and user timeout, wrapped in TLS
//! 1.3 with mutual certificate authentication and an expected-peer-name check
//! (G7), plus certificate generation (`tandem certs`) and reconnect backoff.
//!
//! This module owns establishing and authenticating byte streams. It does not
//! own framing (`wire::frame` reads and writes frames over any
//! `AsyncRead + AsyncWrite`, so a [`PeerStream`] or an in-memory pipe both
//! work), the handshake messages (G6, engine) or the reconnect loop (agent),
//! which uses [`Backoff`].
//!
//! Plaintext ([`Security::DangerPlaintext`]) exists for tests and benchmarks
//! on one host and is refused on any address that is not loopback.
//!
//! Authentication: the dialing side verifies the server certificate against
//! `DIR/ca.pem` with server name = the expected peer name; the accepting side
//! requires a client certificate signed by the same CA and then checks that it
//! is valid for the expected peer name. A node with a certificate of the right
//! CA but the wrong name (say a third node of the same cluster) is refused.

mod backoff;
mod certs;
mod tcp;
mod tls;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, rustls, server};

pub use backoff::Backoff;
pub use certs::generate_certs;
// docs: signing with an existing CA, and the start-up check of a node's TLS files.
pub use certs::{
    CertError, Signed, VALID_YEARS_DEFAULT, check_tls_files, generate_certs_valid_for,
    sign_node_cert,
};
pub use tcp::{KEEPALIVE_S_DEFAULT, USER_TIMEOUT_MS_DEFAULT, configure_tcp};
pub use tls::Side;
// nbd (issue 13): TLS configurations for the NBD export and its clients.
pub use tls::{export_client_config, export_server_config};

/// How long an accepted connection may take to complete its TLS handshake
/// before it is dropped. A peer that connects and stays silent cannot hold
/// the listener longer than this.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// Where this node's certificate, key and CA live, and who the peer must be.
/// Certificates are `DIR/<node_name>.pem` + `DIR/<node_name>.key`, the CA is
/// `DIR/ca.pem` (all as written by `tandem certs --out DIR`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub dir: PathBuf,
    pub node_name: String,
    pub peer_name: String,
}

/// How a link is secured.
#[derive(Clone, Debug)]
pub enum Security {
    Tls(TlsFiles),
    /// No encryption, no authentication; loopback addresses only (G7).
    DangerPlaintext,
}

/// Errors establishing a link. Each message names what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "cannot read {path}: {source}; create certificates with `tandem certs --out DIR` and copy ca.pem, NAME.pem and NAME.key to each node"
    )]
    CertFileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a usable PEM file ({reason}); regenerate it with `tandem certs --out DIR`"
    )]
    CertFileInvalid { path: PathBuf, reason: String },
    #[error("TLS configuration with {cert_path} failed; the key may not match the certificate")]
    TlsConfig {
        cert_path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "invalid node name {name:?}: node names must be DNS names (letters, digits, '-', '.'), not IP addresses or \"ca\""
    )]
    BadNodeName { name: String },
    #[error("node name {name:?} is given twice")]
    DuplicateNodeName { name: String },
    #[error(
        "{path} already exists; refusing to overwrite certificates (choose another --out directory or remove the old files deliberately)"
    )]
    CertExists { path: PathBuf },
    #[error("cannot write {path}")]
    CertWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("certificate generation failed ({what})")]
    CertGen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "refusing plaintext on non-loopback address {addr}: --danger-plaintext is allowed only on 127.0.0.0/8 and ::1; use TLS (`tandem certs --out DIR`)"
    )]
    PlaintextNotLoopback { addr: SocketAddr },
    #[error("cannot connect to {addr}; is the peer running and listening there?")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "connecting to {addr} timed out after {timeout_ms} ms; is the peer running and reachable?"
    )]
    ConnectTimeout { addr: SocketAddr, timeout_ms: u64 },
    #[error("cannot listen on {addr}; is another process using the port?")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("accepting a connection failed")]
    Accept {
        #[source]
        source: io::Error,
    },
    #[error("setting {option} on a socket failed")]
    SocketOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "TLS handshake with {addr} did not finish within {timeout_ms} ms; the peer may speak plaintext (--danger-plaintext) or be stalled"
    )]
    HandshakeTimeout { addr: SocketAddr, timeout_ms: u64 },
    #[error(
        "peer {addr} spoke plaintext to a TLS listener (first bytes {first_bytes}); start it without --danger-plaintext, with certificates from the same `tandem certs` run"
    )]
    PlaintextPeer {
        addr: SocketAddr,
        first_bytes: String,
    },
    #[error(
        "peer {addr} does not speak TLS (it sent a non-TLS message during the handshake); start it without --danger-plaintext"
    )]
    NotTls { addr: SocketAddr },
    #[error(
        "peer {addr} closed the connection during the TLS handshake; it may be running with --danger-plaintext or have refused our certificate, check its log"
    )]
    HandshakeClosed { addr: SocketAddr },
    #[error(
        "the certificate of {side} {addr} is not signed by our CA {ca_path}; both nodes need ca.pem and their certificates from the same `tandem certs` run"
    )]
    UnknownCa {
        addr: SocketAddr,
        side: Side,
        ca_path: PathBuf,
    },
    #[error(
        "peer {addr} presented a certificate for {}, expected {expected:?}; fix peer_name in the configuration or give that node the certificate NAME.pem for {expected:?}",
        if found.is_empty() { "other names".to_string() } else { format!("{found:?}") }
    )]
    PeerName {
        addr: SocketAddr,
        expected: String,
        found: Vec<String>,
    },
    #[error(
        "the certificate of {side} {addr} was rejected: {reason}; regenerate it with `tandem certs`"
    )]
    PeerCertificate {
        addr: SocketAddr,
        side: Side,
        reason: String,
    },
    #[error("peer {addr} sent no client certificate; it must be started with TLS certificates")]
    NoClientCertificate { addr: SocketAddr },
    #[error(
        "peer {addr} refused the TLS handshake (alert {alert}); it probably does not trust our certificate {cert_path}: both nodes need certificates from the same `tandem certs` run, and its peer_name must match our node name"
    )]
    PeerRefusedUs {
        addr: SocketAddr,
        alert: String,
        cert_path: PathBuf,
    },
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

fn check_plaintext_allowed(addr: SocketAddr) -> Result<(), TransportError> {
    if addr.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(TransportError::PlaintextNotLoopback { addr })
    }
}

enum Inner {
    // Boxed: a TLS stream holds ~1 KiB of connection state, the TCP stream a
    // few words.
    Client(Box<client::TlsStream<TcpStream>>),
    Server(Box<server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

/// An established, authenticated (or loopback plaintext) link to the peer.
pub struct PeerStream {
    inner: Inner,
    peer_addr: SocketAddr,
}

/// The read half of a [`PeerStream`] (for a reader task).
pub type PeerReadHalf = tokio::io::ReadHalf<PeerStream>;
/// The write half of a [`PeerStream`] (for the sender task).
pub type PeerWriteHalf = tokio::io::WriteHalf<PeerStream>;

impl PeerStream {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Whether the link is TLS (false only for `DangerPlaintext`).
    pub fn is_tls(&self) -> bool {
        !matches!(self.inner, Inner::Plain(_))
    }

    /// Split into halves usable from two tasks.
    pub fn into_split(self) -> (PeerReadHalf, PeerWriteHalf) {
        tokio::io::split(self)
    }
}

impl std::fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream")
            .field("peer_addr", &self.peer_addr)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Client(s) => s.is_write_vectored(),
            Inner::Server(s) => s.is_write_vectored(),
            Inner::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Inner::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Dial `addr` and authenticate it. `timeout_ms` bounds the TCP connect and
/// the TLS handshake together.
pub async fn connect(
    addr: SocketAddr,
    security: &Security,
    timeout_ms: u64,
) -> Result<PeerStream, TransportError> {
    // Load certificates before dialing, so a missing file is reported as
    // such and not as a network problem.
    let tls = match security {
        Security::DangerPlaintext => {
            check_plaintext_allowed(addr)?;
            None
        }
        Security::Tls(files) => {
            Some((files, tls::client_config(files)?, files.peer_server_name()?))
        }
    };
    let dial = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TransportError::Connect { addr, source })?;
        configure_tcp(&tcp, KEEPALIVE_S_DEFAULT, USER_TIMEOUT_MS_DEFAULT)?;
        let inner = match tls {
            None => Inner::Plain(tcp),
            Some((files, config, server_name)) => {
                let stream = TlsConnector::from(config)
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| tls::classify_handshake_error(files, addr, Side::Server, e))?;
                Inner::Client(Box::new(stream))
            }
        };
        Ok(PeerStream {
            inner,
            peer_addr: addr,
        })
    };
    tokio::time::timeout(Duration::from_millis(timeout_ms), dial)
        .await
        .map_err(|_| TransportError::ConnectTimeout { addr, timeout_ms })?
}

/// Accepts and authenticates peer connections.
pub struct PeerListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<(TlsFiles, TlsAcceptor)>,
    handshake_timeout_ms: u64,
}

impl std::fmt::Debug for PeerListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerListener")
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// First byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

fn hex_bytes(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut s = hex.join(" ");
    if bytes.starts_with(b"TNDM") {
        s.push_str(", a tandem frame");
    }
    s
}

impl PeerListener {
    /// Listen on `addr`. Certificates are loaded now, so a missing file fails
    /// at startup rather than at the first connection.
    pub async fn bind(
        addr: SocketAddr,
        security: &Security,
    ) -> Result<PeerListener, TransportError> {
        let tls = match security {
            Security::DangerPlaintext => {
                check_plaintext_allowed(addr)?;
                None
            }
            Security::Tls(files) => {
                files.peer_server_name()?;
                let config = tls::server_config(files)?;
                Some((files.clone(), TlsAcceptor::from(config)))
            }
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TransportError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransportError::Bind { addr, source })?;
        Ok(PeerListener {
            listener,
            local_addr,
            tls,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
        })
    }

    /// Change how long one connection's handshake may take.
    pub fn with_handshake_timeout_ms(mut self, handshake_timeout_ms: u64) -> Self {
        self.handshake_timeout_ms = handshake_timeout_ms;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accept one connection and authenticate it. A failed handshake returns
    /// `Err` for that connection only; the listener stays usable. Connections
    /// are handshaken one at a time (a replication listener expects one
    /// peer), each bounded by the handshake timeout.
    pub async fn accept(&self) -> Result<PeerStream, TransportError> {
        let (tcp, addr) = self
            .listener
            .accept()
            .await
            .map_err(|source| TransportError::Accept { source })?;
        configure_tcp(&tcp, KEEPALIVE_S_DEFAULT, USER_TIMEOUT_MS_DEFAULT)?;
        let Some((files, acceptor)) = &self.tls else {
            return Ok(PeerStream {
                inner: Inner::Plain(tcp),
                peer_addr: addr,
            });
        };
        let timeout_ms = self.handshake_timeout_ms;
        let handshake = async {
            // Peek before handing the socket to rustls, so a plaintext peer is
            // named as such (rustls would only say "corrupt message").
            let mut first = [0u8; 8];
            let n = tcp
                .peek(&mut first)
                .await
                .map_err(|source| TransportError::Handshake { addr, source })?;
            if n == 0 {
                return Err(TransportError::HandshakeClosed { addr });
            }
            if first[0] != TLS_HANDSHAKE_RECORD {
                return Err(TransportError::PlaintextPeer {
                    addr,
                    first_bytes: hex_bytes(&first[..n]),
                });
            }
            let stream = acceptor
                .accept(tcp)
                .await
                .map_err(|e| tls::classify_handshake_error(files, addr, Side::Client, e))?;
            tls::check_client_name(files, addr, stream.get_ref().1.peer_certificates())?;
            Ok(PeerStream {
                inner: Inner::Server(Box::new(stream)),
                peer_addr: addr,
            })
        };
        tokio::time::timeout(Duration::from_millis(timeout_ms), handshake)
            .await
            .map_err(|_| TransportError::HandshakeTimeout { addr, timeout_ms })?
    }
}
