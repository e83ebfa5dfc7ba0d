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
//! The stream type is generic over any `AsyncRead + AsyncWrite` byte stream:
//! [`PeerStream<S>`] (default `TcpStream`), with [`TlsClient::connect`] and
//! [`TlsServer::accept`] running the same TLS handshake and checks over TCP or
//! an in-memory pipe (`tokio::io::duplex`).
//!
//! **Hostile connections** (issue 14). The replication port may face networks
//! the user does not control. [`PeerListener`] handshakes connections
//! concurrently, each within a short deadline
//! ([`HANDSHAKE_TIMEOUT_MS_DEFAULT`]), with at most
//! [`HANDSHAKES_IN_PROGRESS_MAX`] in progress and
//! [`HANDSHAKES_PER_SOURCE_MAX`] from one address. A new connection always
//! gets a slot: when full, the oldest unauthenticated handshake of the address
//! holding the most slots is dropped. So junk that connects and stalls can
//! delay a real peer by one handshake at most, never by a queue of deadlines.
//! Every refused connection is counted and logged rate-limited
//! ([`crate::metrics::rejections`]).
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

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::{client, rustls, server};

use crate::metrics::rejections::{self, RejectClass, Rejections};

pub use backoff::Backoff;
pub use certs::generate_certs;
// docs: signing with an existing CA, and the start-up check of a node's TLS files.
pub use certs::{
    CertError, Signed, VALID_YEARS_DEFAULT, check_tls_files, generate_certs_valid_for,
    sign_node_cert,
};
pub use tcp::{KEEPALIVE_S_DEFAULT, USER_TIMEOUT_MS_DEFAULT, configure_tcp};
pub use tls::{Side, TlsClient, TlsServer};
// nbd (issue 13): TLS configurations for the NBD export and its clients.
pub use tls::{export_client_config, export_server_config};

/// How long an accepted connection may take to complete its handshake before it
/// is dropped. A TLS 1.3 handshake with client authentication takes two round
/// trips plus a few ms of signing: under 1 s even on a 300 ms WAN link. Junk
/// that connects and stalls is freed after this.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Handshakes in progress at once, from all sources. Each holds a socket and
/// a rustls server state (~20 KiB).
pub const HANDSHAKES_IN_PROGRESS_MAX: usize = 64;
/// Handshakes in progress from one IP address: one address cannot take more
/// than a quarter of the slots, so a peer at another address always finds room
/// without evicting anyone.
pub const HANDSHAKES_PER_SOURCE_MAX: usize = 16;

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
        "handshake with {addr} did not finish within {timeout_ms} ms; the peer may not be a tandem node, speak plaintext (--danger-plaintext) to a TLS node, or be stalled"
    )]
    HandshakeTimeout { addr: SocketAddr, timeout_ms: u64 },
    #[error(
        "dropped the unfinished handshake with {addr} after {age_ms} ms to make room: {in_progress} handshakes in progress ({from_source} from {source_ip}); if this is the peer, something floods this port with connections"
    )]
    Evicted {
        addr: SocketAddr,
        age_ms: u64,
        in_progress: usize,
        from_source: usize,
        source_ip: IpAddr,
    },
    #[error(
        "peer {addr} does not speak the tandem protocol (first bytes {first_bytes}); if it is a tandem node started with TLS, start this one with TLS too (without --danger-plaintext)"
    )]
    NotTandem {
        addr: SocketAddr,
        first_bytes: String,
    },
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

impl TransportError {
    /// How a refused connection is counted and which rate-limited log key it uses.
    pub fn rejection(&self) -> (RejectClass, &'static str) {
        use TransportError as E;
        match self {
            E::Evicted { .. } => (RejectClass::Connection, "transport.evicted"),
            E::Accept { .. } => (RejectClass::Connection, "transport.accept-failed"),
            E::SocketOption { .. } => (RejectClass::Connection, "transport.socket-option"),
            E::HandshakeTimeout { .. } => (RejectClass::Handshake, "transport.handshake-timeout"),
            E::PlaintextPeer { .. } => (RejectClass::Handshake, "transport.plaintext-peer"),
            E::NotTandem { .. } => (RejectClass::Handshake, "transport.not-tandem"),
            E::NotTls { .. } => (RejectClass::Handshake, "transport.not-tls"),
            E::HandshakeClosed { .. } => (RejectClass::Handshake, "transport.handshake-closed"),
            E::UnknownCa { .. } => (RejectClass::Handshake, "transport.unknown-ca"),
            E::PeerName { .. } => (RejectClass::Handshake, "transport.peer-name"),
            E::PeerCertificate { .. } => (RejectClass::Handshake, "transport.peer-certificate"),
            E::NoClientCertificate { .. } => {
                (RejectClass::Handshake, "transport.no-client-certificate")
            }
            E::PeerRefusedUs { .. } => (RejectClass::Handshake, "transport.peer-refused-us"),
            _ => (RejectClass::Handshake, "transport.handshake-failed"),
        }
    }

    /// A refusal an operator should hear about as an event: a tandem node (or
    /// something holding a certificate) that is misconfigured, not random junk.
    pub fn is_misconfigured_peer(&self) -> bool {
        matches!(
            self,
            TransportError::PlaintextPeer { .. }
                | TransportError::UnknownCa { .. }
                | TransportError::PeerName { .. }
                | TransportError::PeerCertificate { .. }
                | TransportError::NoClientCertificate { .. }
        )
    }
}

fn check_plaintext_allowed(addr: SocketAddr) -> Result<(), TransportError> {
    if addr.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(TransportError::PlaintextNotLoopback { addr })
    }
}

enum Inner<S> {
    // Boxed: a TLS stream holds ~1 KiB of connection state, the TCP stream a
    // few words.
    Client(Box<client::TlsStream<S>>),
    Server(Box<server::TlsStream<S>>),
    Plain(S),
}

/// An established, authenticated (or loopback plaintext) link to the peer, over
/// TCP by default or over any byte stream `S` (an in-memory pipe in tests).
pub struct PeerStream<S = TcpStream> {
    inner: Inner<S>,
    peer_addr: SocketAddr,
}

/// The read half of a [`PeerStream`] (for a reader task).
pub type PeerReadHalf<S = TcpStream> = tokio::io::ReadHalf<PeerStream<S>>;
/// The write half of a [`PeerStream`] (for the sender task).
pub type PeerWriteHalf<S = TcpStream> = tokio::io::WriteHalf<PeerStream<S>>;

impl<S> PeerStream<S> {
    /// A plaintext link over `io` (no authentication). For tests and in-memory
    /// links; over TCP, [`connect`] and [`PeerListener`] enforce loopback (G7).
    pub fn plain(io: S, peer_addr: SocketAddr) -> PeerStream<S> {
        PeerStream {
            inner: Inner::Plain(io),
            peer_addr,
        }
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Whether the link is TLS (false only for `DangerPlaintext`).
    pub fn is_tls(&self) -> bool {
        !matches!(self.inner, Inner::Plain(_))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> PeerStream<S> {
    /// Split into halves usable from two tasks.
    pub fn into_split(self) -> (PeerReadHalf<S>, PeerWriteHalf<S>) {
        tokio::io::split(self)
    }
}

impl<S> std::fmt::Debug for PeerStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream")
            .field("peer_addr", &self.peer_addr)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PeerStream<S> {
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

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PeerStream<S> {
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
        Security::Tls(files) => Some(TlsClient::load(files)?),
    };
    let dial = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TransportError::Connect { addr, source })?;
        configure_tcp(&tcp, KEEPALIVE_S_DEFAULT, USER_TIMEOUT_MS_DEFAULT)?;
        match tls {
            None => Ok(PeerStream::plain(tcp, addr)),
            Some(client) => client.connect(tcp, addr).await,
        }
    };
    tokio::time::timeout(Duration::from_millis(timeout_ms), dial)
        .await
        .map_err(|_| TransportError::ConnectTimeout { addr, timeout_ms })?
}

/// Bounds of a [`PeerListener`] (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    pub handshake_timeout_ms: u64,
    pub in_progress_max: usize,
    pub per_source_max: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            in_progress_max: HANDSHAKES_IN_PROGRESS_MAX,
            per_source_max: HANDSHAKES_PER_SOURCE_MAX,
        }
    }
}

type HandshakeResult = (u64, Result<PeerStream, TransportError>);

struct InProgress {
    addr: SocketAddr,
    started: Instant,
    abort: AbortHandle,
}

/// The handshakes running for one listener. Owned by the listener (dropping it
/// aborts them all); driven by whoever calls `accept`.
#[derive(Default)]
struct Handshakes {
    tasks: JoinSet<HandshakeResult>,
    in_progress: HashMap<u64, InProgress>,
    next_id: u64,
}

impl Handshakes {
    fn count_of_source(&self, ip: IpAddr) -> usize {
        self.in_progress
            .values()
            .filter(|h| h.addr.ip() == ip)
            .count()
    }

    /// Make room for a connection from `ip`: when its address, or the listener,
    /// is at its limit, drop the oldest handshake of that address (or of the
    /// address holding the most slots). Returns the dropped connection's error.
    fn make_room(&mut self, ip: IpAddr, limits: &ListenerLimits) -> Option<TransportError> {
        let from_ip = self.count_of_source(ip);
        let victim_ip = if from_ip >= limits.per_source_max.max(1) {
            ip
        } else if self.in_progress.len() >= limits.in_progress_max.max(1) {
            let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
            for h in self.in_progress.values() {
                *per_ip.entry(h.addr.ip()).or_default() += 1;
            }
            per_ip
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .map(|(ip, _)| ip)?
        } else {
            return None;
        };
        let (&id, _) = self
            .in_progress
            .iter()
            .filter(|(_, h)| h.addr.ip() == victim_ip)
            .min_by_key(|(id, h)| (h.started, **id))?;
        let in_progress = self.in_progress.len();
        let from_source = self.count_of_source(victim_ip);
        let victim = self.in_progress.remove(&id).expect("victim is in progress");
        victim.abort.abort();
        Some(TransportError::Evicted {
            addr: victim.addr,
            age_ms: victim.started.elapsed().as_millis() as u64,
            in_progress,
            from_source,
            source_ip: victim_ip,
        })
    }
}

/// Accepts and authenticates peer connections, many handshakes at once (see
/// the module docs for the bounds).
pub struct PeerListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<Arc<TlsServer>>,
    limits: ListenerLimits,
    handshakes: tokio::sync::Mutex<Handshakes>,
    rejections: &'static Rejections,
    /// Where refusals of misconfigured peers are recorded as events.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for PeerListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerListener")
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
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

/// Wait for the first bytes of a TLS connection and refuse a peer that is not
/// speaking TLS, naming what it sent (rustls would only say "corrupt message").
async fn check_first_byte_tls(tcp: &TcpStream, addr: SocketAddr) -> Result<(), TransportError> {
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
    Ok(())
}

/// Plaintext: the dialer sends its Hello first, so a tandem peer's first four
/// bytes are the frame magic. Anything else is refused before an agent sees
/// it, so plaintext junk costs no more than TLS junk.
async fn check_first_bytes_plain(tcp: &TcpStream, addr: SocketAddr) -> Result<(), TransportError> {
    let magic = crate::wire::FRAME_MAGIC.to_le_bytes();
    let mut first = [0u8; 4];
    loop {
        let n = tcp
            .peek(&mut first)
            .await
            .map_err(|source| TransportError::Handshake { addr, source })?;
        if n == 0 {
            return Err(TransportError::HandshakeClosed { addr });
        }
        if first[..n] != magic[..n] {
            return Err(TransportError::NotTandem {
                addr,
                first_bytes: hex_bytes(&first[..n]),
            });
        }
        if n == magic.len() {
            return Ok(());
        }
        // peek returns at once while fewer bytes than asked are queued: wait a
        // little for the rest (the handshake deadline bounds the loop).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    tls: Option<Arc<TlsServer>>,
    timeout_ms: u64,
) -> Result<PeerStream, TransportError> {
    let handshake = async {
        configure_tcp(&tcp, KEEPALIVE_S_DEFAULT, USER_TIMEOUT_MS_DEFAULT)?;
        match tls {
            None => {
                check_first_bytes_plain(&tcp, addr).await?;
                Ok(PeerStream::plain(tcp, addr))
            }
            Some(server) => {
                check_first_byte_tls(&tcp, addr).await?;
                server.accept(tcp, addr).await
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(timeout_ms), handshake)
        .await
        .map_err(|_| TransportError::HandshakeTimeout { addr, timeout_ms })?
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
            Security::Tls(files) => Some(Arc::new(TlsServer::load(files)?)),
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
            limits: ListenerLimits::default(),
            handshakes: tokio::sync::Mutex::new(Handshakes::default()),
            rejections: rejections::global(),
            metrics: None,
        })
    }

    /// Change how long one connection's handshake may take.
    pub fn with_handshake_timeout_ms(mut self, handshake_timeout_ms: u64) -> Self {
        self.limits.handshake_timeout_ms = handshake_timeout_ms;
        self
    }

    /// Change all the bounds.
    pub fn with_limits(mut self, limits: ListenerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Count rejections in `rejections` instead of the process-wide counters.
    pub fn with_rejections(mut self, rejections: &'static Rejections) -> Self {
        self.rejections = rejections;
        self
    }

    /// Record refusals of misconfigured peers (wrong CA, wrong name, plaintext
    /// to TLS) as `handshake-refused` events in `metrics`, at most one per
    /// condition per log summary interval.
    pub fn with_events(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn limits(&self) -> ListenerLimits {
        self.limits
    }

    /// Handshakes in progress now.
    pub async fn handshakes_in_progress(&self) -> usize {
        self.handshakes.lock().await.in_progress.len()
    }

    /// The next authenticated connection. Refused connections (failed or timed
    /// out handshakes, evictions) are counted and logged rate-limited, never
    /// returned, so this only returns `Err` if the listener cannot accept at
    /// all. Cancel-safe: handshakes in progress go on between calls, and a
    /// finished one waits for the next call.
    pub async fn accept(&self) -> Result<PeerStream, TransportError> {
        loop {
            match self.accept_or_refuse().await {
                Ok(stream) => return Ok(stream),
                Err(e) => {
                    let accept_failed = matches!(e, TransportError::Accept { .. });
                    self.refused(&e);
                    if accept_failed {
                        // EMFILE and friends: give handshakes time to finish and
                        // free descriptors instead of spinning.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    /// Count and log a refused connection; misconfigured peers also become events.
    fn refused(&self, e: &TransportError) {
        let (class, key) = e.rejection();
        let logged = self
            .rejections
            .reject(class, key, || format!("refused a connection: {e}"));
        if logged
            && e.is_misconfigured_peer()
            && let Some(m) = &self.metrics
        {
            m.events
                .emit(crate::metrics::events::EventKind::HandshakeRefused {
                    peer_addr: match e {
                        TransportError::PlaintextPeer { addr, .. }
                        | TransportError::UnknownCa { addr, .. }
                        | TransportError::PeerName { addr, .. }
                        | TransportError::PeerCertificate { addr, .. }
                        | TransportError::NoClientCertificate { addr } => addr.to_string(),
                        _ => String::new(),
                    },
                    stage: "tls".into(),
                    reason: e.to_string(),
                });
        }
    }

    /// The outcome of the next connection to finish its handshake (or to be
    /// evicted): what `accept` did before handshakes ran concurrently. For
    /// tests and callers that want each refusal's error.
    pub async fn accept_or_refuse(&self) -> Result<PeerStream, TransportError> {
        let mut hs = self.handshakes.lock().await;
        loop {
            let has_tasks = !hs.tasks.is_empty();
            tokio::select! {
                biased;
                done = hs.tasks.join_next(), if has_tasks => match done {
                    Some(Ok((id, result))) => {
                        hs.in_progress.remove(&id);
                        return result;
                    }
                    // Evicted: already counted when it was aborted.
                    Some(Err(e)) if e.is_cancelled() => continue,
                    Some(Err(e)) => {
                        // A panic inside rustls or our checks: a bug, but one
                        // connection's, not the listener's.
                        tracing::error!("a handshake task failed: {e}");
                        hs.in_progress.retain(|_, h| !h.abort.is_finished());
                        continue;
                    }
                    None => continue,
                },
                accepted = self.listener.accept() => {
                    let (tcp, addr) =
                        accepted.map_err(|source| TransportError::Accept { source })?;
                    let evicted = hs.make_room(addr.ip(), &self.limits);
                    let id = hs.next_id;
                    hs.next_id += 1;
                    let abort = hs.tasks.spawn(handshake_task(
                        id,
                        tcp,
                        addr,
                        self.tls.clone(),
                        self.limits.handshake_timeout_ms,
                    ));
                    hs.in_progress.insert(
                        id,
                        InProgress {
                            addr,
                            started: Instant::now(),
                            abort,
                        },
                    );
                    if let Some(e) = evicted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

async fn handshake_task(
    id: u64,
    tcp: TcpStream,
    addr: SocketAddr,
    tls: Option<Arc<TlsServer>>,
    timeout_ms: u64,
) -> HandshakeResult {
    (id, handshake(tcp, addr, tls, timeout_ms).await)
}
