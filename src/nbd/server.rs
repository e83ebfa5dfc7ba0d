//! NBD server: exports one [`ExportBackend`] over TCP or a unix socket to any
//! NBD client (the kernel's nbd-client, qemu, libnbd's nbdcopy/nbdinfo/nbdfuse).
//!
//! Owns: listening, the handshake (option haggling is [`super::negotiate`]),
//! `NBD_OPT_STARTTLS`, the transmission phase (simple, structured and extended
//! replies), request validation ([`super::proto::admit`]), concurrency and
//! memory bounds per connection and in total, timeouts on stalled payloads and
//! replies, rate-limited logging of refusals, graceful shutdown. Does not own
//! what a write means for replication (the backend decides), nor durability
//! (FLUSH and FUA are passed through, G1).
//!
//! Per connection, after the handshake:
//! - the *reader* (the connection task) reads one request at a time, checks it,
//!   reads a write's payload into a `BytesMut` that is frozen and handed to the
//!   backend without a copy, and spawns the backend operation;
//! - at most [`INFLIGHT_REQUESTS_MAX`] requests are in flight, and payload bytes
//!   (write payloads being received, read data waiting to be sent) are bounded
//!   per connection ([`CLIENT_PAYLOAD_BYTES_MAX`]) and over all connections
//!   ([`TOTAL_PAYLOAD_BYTES_MAX`]); beyond that the reader stops reading
//!   (backpressure onto the client's socket), it never buffers more;
//! - a write payload that stalls (no byte for [`PAYLOAD_STALL_TIMEOUT_MS`], or
//!   slower than [`PAYLOAD_RATE_MIN_BYTES_PER_S`] overall) drops the connection
//!   and frees its buffer; so does a client that accepts no reply bytes for
//!   [`REPLY_STALL_TIMEOUT_MS`]. An idle connection (no request in progress) is
//!   never timed out: kernel clients sit idle for hours;
//! - one *writer* task sends replies in completion order: it takes every reply
//!   that is ready and writes them with one vectored write, so read data goes from
//!   the backend's `Bytes` to the socket without being copied.
//!
//! Shutdown: when the token is cancelled, every reader stops reading new requests,
//! in-flight requests complete and are replied to, then connections close and
//! [`NbdServer::serve`] returns. A request whose header was read but whose payload
//! was not complete is dropped without a reply (it never reached the backend).

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::negotiate::{
    ExportInfo, MetaContext, Negotiated, ServerNegotiation, ServerStep, TlsMode,
};
use super::proto::{
    self, Admission, BlockStatusExtent, ChunkHeader, Command, HeaderStyle, NbdErrno, ReplyStyle,
    Request, RequestLimits,
};
use super::quiet::QuietLog;
use super::stream::{BoxRead, BoxWrite, Conn, Plain};
use crate::frontend::{ExportBackend, Extent, IoFuture};

/// Requests one connection may have in flight; beyond this the reader waits.
/// 128 covers the kernel nbd driver's default queue depth and qemu's 16.
pub const INFLIGHT_REQUESTS_MAX: usize = 128;
/// Payload bytes one connection may hold at once: write payloads being received
/// and read data not yet sent. At least the largest request (64 MiB).
pub const CLIENT_PAYLOAD_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// Payload bytes all connections together may hold. With 256 clients the
/// per-client bound alone would allow 16 GiB; this caps the server at 512 MiB.
pub const TOTAL_PAYLOAD_BYTES_MAX: u32 = 512 * 1024 * 1024;
/// Clients attached at once (including those still negotiating); more are refused.
pub const CONNECTIONS_MAX: usize = 256;
/// Time a client has from connecting to choosing an export (TLS handshake included).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 30_000;
/// A write payload (or a payload being skipped) that receives no byte for this
/// long drops the connection and frees its buffer.
pub const PAYLOAD_STALL_TIMEOUT_MS: u64 = 10_000;
/// ... as does one slower than this on average (after the stall allowance): a
/// 32 MiB payload must arrive within 10 s + 32 s.
pub const PAYLOAD_RATE_MIN_BYTES_PER_S: u64 = 1024 * 1024;
/// A client that accepts no reply bytes for this long while replies wait is
/// dropped (its read data is freed).
pub const REPLY_STALL_TIMEOUT_MS: u64 = 30_000;
/// During shutdown, time a client has to accept each batch of replies before the
/// connection is dropped (its backend operations have completed regardless).
pub const SHUTDOWN_REPLY_TIMEOUT_MS: u64 = 5_000;
/// Refusals of one kind are logged once, then summarised this often.
pub const REFUSAL_LOG_PERIOD_S: u64 = 60;
/// Replies written with one vectored write (a few iovecs each, well under IOV_MAX).
const REPLY_BATCH_MAX: usize = 64;
/// Pause after a failed accept (e.g. EMFILE) so the loop does not spin.
const ACCEPT_RETRY_DELAY_MS: u64 = 100;
/// Trims and write-zeroes longer than this (possible with extended headers) are
/// handed to the backend in pieces this large.
const EFFECT_CHUNK_BYTES: u64 = 1 << 30;
/// Budget one block status request holds for its reply (all contexts together).
const BLOCK_STATUS_REPLY_BYTES: u32 = 1024 * 1024;

/// Everything that can go wrong in the NBD frontend.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(
        "invalid NBD address '{input}': {reason}; use HOST:PORT, [V6]:PORT, unix:/PATH or /PATH"
    )]
    InvalidAddress { input: String, reason: String },
    #[error("cannot listen on NBD address {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} exists and is not a unix socket; refusing to replace it, choose another socket path"
    )]
    SocketPathOccupied { path: PathBuf },
    #[error(
        "another server is accepting connections on {path}; stop it or choose another socket path"
    )]
    SocketInUse { path: PathBuf },
    #[error("invalid NBD export '{name}': {reason}")]
    InvalidExport { name: String, reason: String },
    #[error(
        "refusing a plaintext NBD export on non-loopback address {address}: anyone on the network could read and write the volume. Configure TLS with --nbd-tls-client NAME (certificates from `tandem certs`), listen on loopback or a unix socket, or accept the risk with --danger-nbd-plaintext"
    )]
    PlaintextNotLoopback { address: String },
    #[error("NBD export TLS configuration: {0}")]
    TlsConfig(String),
    #[error("NBD connection {peer}: i/o error: {source}")]
    Io {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD connection {peer}: TLS handshake failed: {source}")]
    Tls {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD connection {peer}: protocol violation: {what}")]
    Protocol { peer: String, what: String },
    #[error("NBD connection {peer}: {what}; connection dropped")]
    Stalled { peer: String, what: String },
}

/// How the export is presented to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdExport {
    /// Export name clients ask for (the empty name is accepted as well).
    pub name: String,
    /// Human-readable description (NBD_OPT_LIST, NBD_INFO_DESCRIPTION).
    pub description: String,
    /// Advertise READ_ONLY and refuse writes, trims and write-zeroes with EPERM.
    pub read_only: bool,
    /// Smallest block size clients should use: a power of two, 1..=64 KiB.
    /// Advisory: unaligned requests are still served (the backend is byte-addressed).
    pub block_size_min: u32,
    /// Block size clients should prefer: a power of two, at least `block_size_min`.
    pub block_size_preferred: u32,
    /// Largest READ or WRITE payload: a multiple of `block_size_min`, at least
    /// `block_size_preferred`, at most 64 MiB.
    pub max_request_bytes: u32,
}

impl Default for NbdExport {
    fn default() -> Self {
        NbdExport {
            name: String::new(),
            description: "tandem replicated volume".into(),
            read_only: false,
            block_size_min: 512,
            block_size_preferred: 4096,
            // The spec's default maximum payload when none is advertised.
            max_request_bytes: 32 * 1024 * 1024,
        }
    }
}

impl NbdExport {
    /// Check the export against the protocol's rules (string lengths, block sizes).
    pub fn validate(&self) -> Result<(), NbdError> {
        let fail = |reason: String| {
            Err(NbdError::InvalidExport {
                name: self.name.clone(),
                reason,
            })
        };
        for (what, s) in [("name", &self.name), ("description", &self.description)] {
            if s.len() > proto::STRING_MAX_BYTES {
                return fail(format!("{what} is {} bytes, the limit is 4096", s.len()));
            }
            if s.contains('\0') {
                return fail(format!("{what} contains a NUL character"));
            }
        }
        let (min, pref, max) = (
            self.block_size_min,
            self.block_size_preferred,
            self.max_request_bytes,
        );
        if !min.is_power_of_two() || min > 64 * 1024 {
            return fail(format!(
                "block_size_min {min} must be a power of two between 1 and 65536"
            ));
        }
        if !pref.is_power_of_two() || pref < min {
            return fail(format!(
                "block_size_preferred {pref} must be a power of two and at least block_size_min {min}"
            ));
        }
        if max < pref
            || max % min != 0
            || u64::from(max) > proto::PAYLOAD_DISCARD_MAX_BYTES
            || max > CLIENT_PAYLOAD_BYTES_MAX
        {
            return fail(format!(
                "max_request_bytes {max} must be a multiple of block_size_min {min}, at least \
                 block_size_preferred {pref} and at most {}",
                proto::PAYLOAD_DISCARD_MAX_BYTES
            ));
        }
        Ok(())
    }
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl NbdAddress {
    /// Loopback TCP or a unix socket: only this host can connect.
    pub fn is_local(&self) -> bool {
        match self {
            NbdAddress::Tcp(a) => a.ip().to_canonical().is_loopback(),
            NbdAddress::Unix(_) => true,
        }
    }
}

impl FromStr for NbdAddress {
    type Err = NbdError;

    /// Accepts `127.0.0.1:10809`, `[::1]:10809`, `unix:/path` and `/abs/path`.
    fn from_str(s: &str) -> Result<Self, NbdError> {
        let invalid = |reason: &str| NbdError::InvalidAddress {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid("empty socket path"));
            }
            return Ok(NbdAddress::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(NbdAddress::Unix(PathBuf::from(s)));
        }
        s.parse::<SocketAddr>()
            .map(NbdAddress::Tcp)
            .map_err(|e| invalid(&e.to_string()))
    }
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Tcp(a) => write!(f, "{a}"),
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listening socket, ready for [`NbdServer::serve`]. A unix socket file is
/// removed when the listener is dropped.
#[derive(Debug)]
pub struct NbdListener {
    inner: ListenerKind,
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl NbdListener {
    /// The address actually bound (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> io::Result<NbdAddress> {
        match &self.inner {
            ListenerKind::Tcp(l) => l.local_addr().map(NbdAddress::Tcp),
            ListenerKind::Unix { path, .. } => Ok(NbdAddress::Unix(path.clone())),
        }
    }
}

impl Drop for NbdListener {
    fn drop(&mut self) {
        if let ListenerKind::Unix { path, .. } = &self.inner
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %path.display(), error = %e, "could not remove NBD unix socket");
        }
    }
}

/// Options of a server beyond the export itself.
#[derive(Clone, Default)]
pub struct ServerOptions {
    /// Require TLS (`NBD_OPT_STARTTLS`) on every connection, with this configuration.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Shorter timeouts for tests: payload stall, reply stall (default: the constants).
    pub payload_stall_timeout: Option<Duration>,
    pub reply_stall_timeout: Option<Duration>,
    /// Where to count (e.g. the agent's [`crate::metrics::Metrics::nbd`]); a fresh
    /// set when None.
    pub stats: Option<Arc<NbdStats>>,
}

impl fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptions")
            .field("tls", &self.tls.is_some())
            .field("payload_stall_timeout", &self.payload_stall_timeout)
            .field("reply_stall_timeout", &self.reply_stall_timeout)
            .finish()
    }
}

/// What the server counted since it started. Every refusal is counted here even
/// when its log line is suppressed.
#[derive(Debug, Default)]
pub struct NbdStats {
    /// Connections accepted, and refused because [`CONNECTIONS_MAX`] were attached.
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Connections that failed before the transmission phase (protocol errors,
    /// handshake timeouts, TLS failures), and the TLS failures among them.
    pub handshakes_failed: AtomicU64,
    pub tls_handshakes_failed: AtomicU64,
    /// Sessions that entered the transmission phase, and with which features.
    pub sessions: AtomicU64,
    pub sessions_tls: AtomicU64,
    pub sessions_structured: AtomicU64,
    pub sessions_extended: AtomicU64,
    /// Requests read, those with 32-byte extended headers, those refused.
    pub requests: AtomicU64,
    pub requests_extended: AtomicU64,
    pub requests_rejected: AtomicU64,
    /// Block status chunks sent, and those in the 64-bit `BLOCK_STATUS_EXT` form.
    pub block_status_chunks: AtomicU64,
    pub block_status_ext_chunks: AtomicU64,
    /// Connections dropped for a stalled payload or stalled reply reading, and
    /// for protocol violations during transmission.
    pub payload_timeouts: AtomicU64,
    pub reply_timeouts: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// ha (issue 15.3): the clients attached now (transmission phase), by
    /// connection number, as `tandem demote` names them.
    clients: std::sync::Mutex<std::collections::BTreeMap<u64, String>>,
    next_client: AtomicU64,
}

impl NbdStats {
    /// The clients attached now, oldest first: their address (TCP) or the
    /// socket plus the process on the other end (unix, from SO_PEERCRED).
    pub fn attached_clients(&self) -> Vec<String> {
        self.clients
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    fn client_attached(&self, peer: &str) -> u64 {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.clients.lock() {
            c.insert(id, peer.to_owned());
        }
        id
    }

    fn client_detached(&self, id: u64) {
        if let Ok(mut c) = self.clients.lock() {
            c.remove(&id);
        }
    }
}

/// ha (issue 15.3): a client's entry in [`NbdStats::attached_clients`] for as long
/// as it is attached.
struct ClientEntry<'a>(&'a NbdStats, u64);

impl Drop for ClientEntry<'_> {
    fn drop(&mut self) {
        self.0.client_detached(self.1);
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The NBD server for one export.
pub struct NbdServer {
    backend: Arc<dyn ExportBackend>,
    export: NbdExport,
    tls: Option<TlsAcceptor>,
    payload_stall: Duration,
    reply_stall: Duration,
    /// Clients in the transmission phase right now.
    attached: AtomicUsize,
    /// Payload bytes held by all connections ([`TOTAL_PAYLOAD_BYTES_MAX`]).
    payload_budget: Arc<Semaphore>,
    stats: Arc<NbdStats>,
    refusals: QuietLog,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("export", &self.export)
            .field("tls", &self.tls.is_some())
            .field("attached", &self.attached.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Bind a listening socket. For a unix socket, a stale socket file left by a
    /// dead server is removed; a live one, or a file that is not a socket, is an error.
    pub async fn bind(addr: &NbdAddress) -> Result<NbdListener, NbdError> {
        let bind_err = |source| NbdError::Bind {
            address: addr.to_string(),
            source,
        };
        let inner = match addr {
            NbdAddress::Tcp(a) => ListenerKind::Tcp(TcpListener::bind(a).await.map_err(bind_err)?),
            NbdAddress::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path).map_err(bind_err)?;
                ListenerKind::Unix {
                    listener,
                    path: path.clone(),
                }
            }
        };
        Ok(NbdListener { inner })
    }

    /// A plaintext server.
    pub fn new(backend: Arc<dyn ExportBackend>, export: NbdExport) -> Arc<NbdServer> {
        NbdServer::with_options(backend, export, ServerOptions::default())
    }

    pub fn with_options(
        backend: Arc<dyn ExportBackend>,
        export: NbdExport,
        options: ServerOptions,
    ) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            backend,
            export,
            tls: options.tls.map(TlsAcceptor::from),
            payload_stall: options
                .payload_stall_timeout
                .unwrap_or(Duration::from_millis(PAYLOAD_STALL_TIMEOUT_MS)),
            reply_stall: options
                .reply_stall_timeout
                .unwrap_or(Duration::from_millis(REPLY_STALL_TIMEOUT_MS)),
            attached: AtomicUsize::new(0),
            payload_budget: Arc::new(Semaphore::new(TOTAL_PAYLOAD_BYTES_MAX as usize)),
            stats: options.stats.unwrap_or_default(),
            refusals: QuietLog::new(Duration::from_secs(REFUSAL_LOG_PERIOD_S)),
        })
    }

    /// Clients currently attached (in the transmission phase).
    pub fn connections(&self) -> usize {
        self.attached.load(Ordering::Relaxed)
    }

    /// What the server counted so far.
    pub fn stats(&self) -> &NbdStats {
        &self.stats
    }

    /// Whether clients must negotiate TLS.
    pub fn requires_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Accept and serve until `shutdown` is cancelled; then stop reading new
    /// requests on every connection, complete and reply to those in flight, close,
    /// and return. Fails only if the export is invalid.
    pub async fn serve(
        self: Arc<Self>,
        listener: NbdListener,
        shutdown: CancellationToken,
    ) -> Result<(), NbdError> {
        self.serve_until(listener, shutdown.clone(), shutdown).await
    }

    /// Like [`NbdServer::serve`], in two steps: when `stop_accepting` is cancelled
    /// the listener closes (no new clients) while attached clients carry on; when
    /// `shutdown` is cancelled they stop as in `serve`. A demotion uses the gap to
    /// let clients finish by themselves.
    pub async fn serve_until(
        self: Arc<Self>,
        listener: NbdListener,
        stop_accepting: CancellationToken,
        shutdown: CancellationToken,
    ) -> Result<(), NbdError> {
        self.export.validate()?;
        let local = listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        info!(address = %local, export = %self.export.name, size_bytes = self.backend.size_bytes(),
              read_only = self.export.read_only, tls = self.tls.is_some(), "NBD server listening");
        let mut tasks = JoinSet::new();
        let mut summaries = tokio::time::interval(Duration::from_secs(REFUSAL_LOG_PERIOD_S));
        summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while tasks.try_join_next().is_some() {}
            let accepted = tokio::select! {
                biased;
                _ = stop_accepting.cancelled() => break,
                _ = shutdown.cancelled() => break,
                _ = summaries.tick() => {
                    self.refusals.flush(false);
                    continue;
                }
                a = accept(&listener) => a,
            };
            let (conn, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    self.refusals.event(
                        "NBD accept failures",
                        format_args!("NBD accept on {local} failed: {e}; retrying"),
                    );
                    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_DELAY_MS)).await;
                    continue;
                }
            };
            if tasks.len() >= CONNECTIONS_MAX {
                bump(&self.stats.connections_refused);
                self.refusals.event(
                    "NBD connections refused",
                    format_args!("NBD connection from {peer} refused: {CONNECTIONS_MAX} clients are connected"),
                );
                continue;
            }
            bump(&self.stats.connections_accepted);
            debug!(%peer, "NBD client connected");
            let server = Arc::clone(&self);
            let token = shutdown.clone();
            tasks.spawn(async move {
                match server.run_connection(conn, &peer, token).await {
                    Ok(Some(reason)) => info!(%peer, reason, "NBD client disconnected"),
                    Ok(None) => {}
                    Err(e) => server.refused_connection(&e),
                }
            });
        }
        drop(listener);
        info!(address = %local, connections = tasks.len(), "NBD server shutting down");
        while tasks.join_next().await.is_some() {}
        self.refusals.flush(true);
        info!(address = %local, "NBD server stopped");
        Ok(())
    }

    /// Count and (rate-limited) log a connection that ended in an error.
    fn refused_connection(&self, e: &NbdError) {
        let kind = match e {
            NbdError::Tls { .. } => "NBD TLS handshake failures",
            NbdError::Stalled { .. } => "NBD clients dropped for stalling",
            NbdError::Protocol { .. } => "NBD protocol violations",
            _ => "NBD connection errors",
        };
        self.refusals.event(kind, e);
    }

    /// One client from handshake to close. `Ok(Some(reason))`: a session ended
    /// normally; `Ok(None)`: the client left during the handshake.
    async fn run_connection(
        self: &Arc<Self>,
        conn: Conn,
        peer: &str,
        shutdown: CancellationToken,
    ) -> Result<Option<&'static str>, NbdError> {
        let handshake = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(None),
            r = tokio::time::timeout(
                Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
                self.handshake(conn, peer),
            ) => r,
        };
        let (negotiated, reader, writer) = match handshake {
            Err(_) => {
                bump(&self.stats.handshakes_failed);
                return Err(NbdError::Stalled {
                    peer: peer.to_owned(),
                    what: format!("handshake not finished within {HANDSHAKE_TIMEOUT_MS} ms"),
                });
            }
            Ok(Err(e)) => {
                bump(&self.stats.handshakes_failed);
                if matches!(e, NbdError::Tls { .. }) {
                    bump(&self.stats.tls_handshakes_failed);
                }
                return Err(e);
            }
            Ok(Ok(HandshakeEnd::Closed(reason))) => {
                debug!(%peer, reason, "NBD client left during the handshake");
                return Ok(None);
            }
            Ok(Ok(HandshakeEnd::Transmission {
                negotiated,
                reader,
                writer,
            })) => (negotiated, reader, writer),
        };
        bump(&self.stats.sessions);
        if negotiated.tls {
            bump(&self.stats.sessions_tls);
        }
        match negotiated.reply {
            ReplyStyle::Extended => bump(&self.stats.sessions_extended),
            ReplyStyle::Structured => bump(&self.stats.sessions_structured),
            ReplyStyle::Simple => {}
        }
        self.attached.fetch_add(1, Ordering::Relaxed);
        let _attached = AttachedGuard(&self.attached);
        let _entry = ClientEntry(&self.stats, self.stats.client_attached(peer));
        info!(%peer, tls = negotiated.tls, replies = ?negotiated.reply, headers = ?negotiated.style,
              contexts = ?negotiated.contexts.iter().map(|(_, c)| c.name()).collect::<Vec<_>>(),
              "NBD client attached");
        self.transmission(negotiated, reader, writer, peer, shutdown)
            .await
            .map(Some)
    }

    fn export_info(&self) -> ExportInfo {
        ExportInfo {
            name: self.export.name.clone(),
            description: self.export.description.clone(),
            size_bytes: self.backend.size_bytes(),
            read_only: self.export.read_only,
            block_size_min: self.export.block_size_min,
            block_size_preferred: self.export.block_size_preferred,
            max_payload_bytes: self.export.max_request_bytes,
            dirty_bitmaps: self.backend.dirty_bitmaps(),
        }
    }

    /// Option haggling, with STARTTLS when configured.
    async fn handshake(&self, conn: Conn, peer: &str) -> Result<HandshakeEnd, NbdError> {
        let io_err = |source| NbdError::Io {
            peer: peer.to_owned(),
            source,
        };
        let protocol = |what: String| NbdError::Protocol {
            peer: peer.to_owned(),
            what,
        };
        let tls_mode = if self.tls.is_some() {
            TlsMode::Required
        } else {
            TlsMode::Off
        };
        let mut neg = ServerNegotiation::new(self.export_info(), tls_mode);
        let mut stream = BufReader::with_capacity(8 * 1024, conn);
        stream.write_all(&neg.greeting()).await.map_err(io_err)?;
        stream.flush().await.map_err(io_err)?;
        let client_flags = match stream.read_u32().await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(HandshakeEnd::Closed(
                    "client closed before sending its flags",
                ));
            }
            Err(e) => return Err(io_err(e)),
        };
        neg.client_flags(client_flags).map_err(protocol)?;
        let mut data = Vec::with_capacity(256);
        let mut out = Vec::with_capacity(512);
        loop {
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            match stream.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(HandshakeEnd::Closed("client closed during the handshake"));
                }
                Err(e) => return Err(io_err(e)),
            }
            let h = proto::decode_option_header(&header).map_err(|e| protocol(e.to_string()))?;
            out.clear();
            let step = if h.len > proto::OPTION_DATA_MAX_BYTES {
                if h.len > OPTION_DISCARD_MAX_BYTES {
                    return Err(protocol(format!(
                        "{} carries {} bytes of data",
                        proto::option_name(h.option),
                        h.len
                    )));
                }
                discard(&mut stream, u64::from(h.len), self.payload_stall, peer).await?;
                neg.oversized_option(h, &mut out)
            } else {
                data.resize(h.len as usize, 0);
                stream.read_exact(&mut data).await.map_err(io_err)?;
                neg.option(h.option, &data, &mut out)
            };
            debug!(%peer, option = proto::option_name(h.option), len = h.len, ?step, "NBD option");
            stream.write_all(&out).await.map_err(io_err)?;
            stream.flush().await.map_err(io_err)?;
            match step {
                ServerStep::Continue => {}
                ServerStep::Close(reason) => {
                    let _ = stream.shutdown().await;
                    return Ok(HandshakeEnd::Closed(reason));
                }
                ServerStep::StartTls => {
                    // Bytes the client sent after STARTTLS, before the TLS handshake,
                    // would be plaintext injected ahead of the encrypted session.
                    if !stream.buffer().is_empty() {
                        return Err(protocol(
                            "data sent after NBD_OPT_STARTTLS before the TLS handshake".into(),
                        ));
                    }
                    let acceptor = self
                        .tls
                        .clone()
                        .expect("STARTTLS is accepted only with TLS configured");
                    let Conn::Plain(plain) = stream.into_inner() else {
                        unreachable!("STARTTLS is refused once TLS is active")
                    };
                    let tls = acceptor
                        .accept(plain)
                        .await
                        .map_err(|source| NbdError::Tls {
                            peer: peer.to_owned(),
                            source,
                        })?;
                    stream = BufReader::with_capacity(8 * 1024, Conn::ServerTls(Box::new(tls)));
                    neg.tls_started();
                    debug!(%peer, "NBD client started TLS");
                }
                ServerStep::Transmission(negotiated) => {
                    // A client may pipeline its first requests behind NBD_OPT_GO: keep
                    // what is buffered in front of the socket.
                    let leftover = stream.buffer().to_vec();
                    let (reader, writer) = stream.into_inner().split();
                    let reader: BoxRead = Box::new(std::io::Cursor::new(leftover).chain(reader));
                    return Ok(HandshakeEnd::Transmission {
                        negotiated,
                        reader,
                        writer,
                    });
                }
            }
        }
    }

    /// The transmission phase: read, admit and dispatch requests until the client
    /// disconnects, breaks the protocol, or the server shuts down; then wait until
    /// every dispatched request has been replied to (or the client is gone).
    async fn transmission(
        self: &Arc<Self>,
        negotiated: Negotiated,
        reader: BoxRead,
        writer: BoxWrite,
        peer: &str,
        shutdown: CancellationToken,
    ) -> Result<&'static str, NbdError> {
        let mut reader = BufReader::with_capacity(64 * 1024, reader);
        let session = Arc::new(Session {
            limits: RequestLimits {
                size_bytes: self.backend.size_bytes(),
                max_payload_bytes: self.export.max_request_bytes,
                read_only: self.export.read_only,
                style: negotiated.style,
                structured: negotiated.reply != ReplyStyle::Simple,
                meta_contexts: negotiated.contexts.len(),
                fast_zero: self.backend.fast_zeroes(),
            },
            reply: negotiated.reply,
            contexts: negotiated.contexts,
            peer: Arc::from(peer),
        });
        let window = InflightWindow {
            requests: Arc::new(Semaphore::new(INFLIGHT_REQUESTS_MAX)),
            bytes: Arc::new(Semaphore::new(CLIENT_PAYLOAD_BYTES_MAX as usize)),
        };
        // Every reply holds a request permit, so the channel never holds more than
        // INFLIGHT_REQUESTS_MAX replies and a send never waits.
        let (tx, rx) = mpsc::channel::<Reply>(INFLIGHT_REQUESTS_MAX);
        let writer_task = tokio::spawn(write_replies(
            writer,
            rx,
            session.reply,
            peer.to_owned(),
            self.reply_stall,
            shutdown.clone(),
        ));
        let ended = self
            .read_requests(&mut reader, &tx, &window, &session, &shutdown)
            .await;
        drop(tx);
        drop(reader);
        // The writer ends once every spawned request has sent its reply (each holds a
        // sender): in-flight backend operations always run to completion.
        match writer_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    bump(&self.stats.reply_timeouts);
                    return Err(NbdError::Stalled {
                        peer: peer.to_owned(),
                        what: e.to_string(),
                    });
                }
                return Err(NbdError::Io {
                    peer: peer.to_owned(),
                    source: e,
                });
            }
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
        ended
    }

    async fn read_requests<R>(
        self: &Arc<Self>,
        reader: &mut BufReader<R>,
        tx: &mpsc::Sender<Reply>,
        window: &InflightWindow,
        session: &Arc<Session>,
        shutdown: &CancellationToken,
    ) -> Result<&'static str, NbdError>
    where
        R: AsyncRead + Unpin,
    {
        let peer: &str = &session.peer;
        let io_err = |source| NbdError::Io {
            peer: peer.to_owned(),
            source,
        };
        let protocol = |what: String| {
            bump(&self.stats.protocol_errors);
            NbdError::Protocol {
                peer: peer.to_owned(),
                what,
            }
        };
        let style = session.limits.style;
        let mut header = [0u8; proto::EXTENDED_REQUEST_LEN];
        let header_len = style.request_len();
        loop {
            // Wait for a free slot first: this is the backpressure point.
            let next = async {
                let permit = Arc::clone(&window.requests)
                    .acquire_owned()
                    .await
                    .expect("request semaphore is never closed");
                reader
                    .read_exact(&mut header[..header_len])
                    .await
                    .map(|_| permit)
            };
            let request_permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok("server shutting down"),
                r = next => match r {
                    Ok(p) => p,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Ok("client closed the connection");
                    }
                    Err(e) => return Err(io_err(e)),
                },
            };
            let decoded = match style {
                HeaderStyle::Compact => proto::decode_request_header(
                    header[..proto::COMPACT_REQUEST_LEN]
                        .try_into()
                        .expect("28-byte slice"),
                ),
                HeaderStyle::Extended => {
                    bump(&self.stats.requests_extended);
                    proto::decode_extended_request_header(&header)
                }
            };
            let r = decoded.map_err(|e| protocol(e.to_string()))?;
            bump(&self.stats.requests);
            let admission = proto::admit(&r, &session.limits);
            debug!(%peer, request = %r, ?admission, "NBD request");
            let command = match admission {
                Admission::Execute(c) => c,
                Admission::Disconnect => return Ok("client sent NBD_CMD_DISC"),
                Admission::Close(what) => return Err(protocol(format!("{what} ({r})"))),
                Admission::Reject {
                    errno,
                    discard_bytes,
                    reason,
                } => {
                    bump(&self.stats.requests_rejected);
                    self.refusals.event(
                        "NBD requests refused",
                        format_args!(
                            "NBD request from {peer} refused with {}: {reason} ({r})",
                            errno.name()
                        ),
                    );
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok("server shutting down"),
                        res = discard(reader, u64::from(discard_bytes), self.payload_stall, peer) => res?,
                    }
                    let reply = Reply::new(
                        &r,
                        ReplyBody::Error {
                            errno,
                            message: reason.into(),
                        },
                        Permits::request(request_permit),
                    );
                    if tx.send(reply).await.is_err() {
                        return Ok("reply writer stopped");
                    }
                    continue;
                }
            };
            let budget = match command {
                Command::Read { len, .. } | Command::Write { len, .. } => len,
                Command::BlockStatus { .. } => BLOCK_STATUS_REPLY_BYTES,
                _ => 0,
            };
            let permits = if budget > 0 {
                // Per connection first, then over all connections; both bounds are at
                // least the largest request, so these can always be granted.
                let own = Arc::clone(&window.bytes)
                    .acquire_many_owned(budget)
                    .await
                    .expect("byte semaphore is never closed");
                let all = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok("server shutting down"),
                    p = Arc::clone(&self.payload_budget).acquire_many_owned(budget) =>
                        p.expect("payload semaphore is never closed"),
                };
                Permits {
                    _request: request_permit,
                    _bytes: Some((own, all)),
                }
            } else {
                Permits::request(request_permit)
            };
            let backend = &self.backend;
            let op = match command {
                Command::Read { offset, len } => Op::Read {
                    f: backend.read(offset, len),
                    offset,
                    len,
                },
                Command::Write { offset, len, fua } => {
                    let mut buf = BytesMut::with_capacity(len as usize);
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok("server shutting down"),
                        res = read_payload(reader, &mut buf, len as usize, self.payload_stall, peer) => {
                            if let Err(e) = res {
                                if matches!(e, NbdError::Stalled { .. }) {
                                    bump(&self.stats.payload_timeouts);
                                }
                                return Err(e);
                            }
                        }
                    }
                    Op::Unit(backend.write(offset, buf.freeze(), fua))
                }
                Command::Flush => Op::Unit(backend.flush()),
                Command::Trim { offset, len } => Op::Chunked {
                    backend: Arc::clone(backend),
                    offset,
                    len,
                    zeroes: None,
                },
                Command::WriteZeroes { offset, len, fua } => Op::Chunked {
                    backend: Arc::clone(backend),
                    offset,
                    len,
                    zeroes: Some(fua),
                },
                Command::Cache { offset, len } => Op::Unit(backend.cache(offset, len)),
                Command::BlockStatus {
                    offset,
                    len,
                    req_one,
                } => Op::BlockStatus {
                    backend: Arc::clone(backend),
                    offset,
                    len,
                    req_one,
                },
            };
            let tx = tx.clone();
            let session = Arc::clone(session);
            let server = Arc::clone(self);
            tokio::spawn(async move {
                let body = match op.complete(&session).await {
                    Ok(body) => body,
                    Err(e) => {
                        let errno = NbdErrno::from_io(&e);
                        warn!(peer = %session.peer, request = %r, error = %e, nbd_error = errno.name(),
                              "NBD request failed in the backend");
                        ReplyBody::Error {
                            errno,
                            message: e.to_string().into(),
                        }
                    }
                };
                if let ReplyBody::BlockStatus(chunks) = &body {
                    server
                        .stats
                        .block_status_chunks
                        .fetch_add(chunks.len() as u64, Ordering::Relaxed);
                    if session.reply == ReplyStyle::Extended {
                        server
                            .stats
                            .block_status_ext_chunks
                            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
                    }
                }
                // A send error means the writer gave up on a dead client; the backend
                // operation has completed either way.
                let _ = tx.send(Reply::new(&r, body, permits)).await;
            });
        }
    }
}

/// Options larger than [`proto::OPTION_DATA_MAX_BYTES`], up to this size, are read
/// and discarded so the client gets a proper `NBD_REP_ERR_TOO_BIG`; beyond it the
/// connection is closed (a client sending megabytes of option data is not
/// negotiating in good faith).
pub const OPTION_DISCARD_MAX_BYTES: u32 = 1024 * 1024;

enum HandshakeEnd {
    Transmission {
        negotiated: Negotiated,
        reader: BoxRead,
        writer: BoxWrite,
    },
    Closed(&'static str),
}

/// What one session agreed on, shared by its request tasks.
struct Session {
    limits: RequestLimits,
    reply: ReplyStyle,
    contexts: Vec<(u32, MetaContext)>,
    peer: Arc<str>,
}

/// A dispatched backend operation.
enum Op {
    Read {
        f: IoFuture<Bytes>,
        offset: u64,
        len: u32,
    },
    Unit(IoFuture<()>),
    /// A trim (`zeroes: None`) or write-zeroes (`Some(fua)`) of any 64-bit length.
    Chunked {
        backend: Arc<dyn ExportBackend>,
        offset: u64,
        len: u64,
        zeroes: Option<bool>,
    },
    BlockStatus {
        backend: Arc<dyn ExportBackend>,
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

impl Op {
    async fn complete(self, session: &Session) -> io::Result<ReplyBody> {
        match self {
            Op::Read { f, offset, len } => {
                let data = f.await?;
                if data.len() != len as usize {
                    // Sending a short payload would desynchronise the client.
                    return Err(io::Error::other(format!(
                        "backend returned {} bytes for a read of {len} bytes at offset {offset}",
                        data.len()
                    )));
                }
                // A read of zeroes travels as a 12-byte hole chunk where the client
                // can take one; checking stops at the first non-zero word.
                if session.reply != ReplyStyle::Simple && is_all_zero(&data) {
                    return Ok(ReplyBody::Hole(len));
                }
                Ok(ReplyBody::Data(data))
            }
            Op::Unit(f) => f.await.map(|()| ReplyBody::Done),
            Op::Chunked {
                backend,
                offset,
                len,
                zeroes,
            } => {
                let end = offset + len;
                let mut at = offset;
                while at < end {
                    // At most 1 GiB: fits the backend's 32-bit length.
                    let n = (end - at).min(EFFECT_CHUNK_BYTES) as u32;
                    match zeroes {
                        None => backend.trim(at, n).await?,
                        Some(fua) => backend.write_zeroes(at, n, fua).await?,
                    }
                    at += u64::from(n);
                }
                Ok(ReplyBody::Done)
            }
            Op::BlockStatus {
                backend,
                offset,
                len,
                req_one,
            } => {
                let size = backend.size_bytes();
                let per_context =
                    (proto::BLOCK_STATUS_EXTENTS_MAX / session.contexts.len().max(1)).max(1);
                let mut chunks = Vec::with_capacity(session.contexts.len());
                for (id, context) in &session.contexts {
                    let extents = backend
                        .block_status(context, offset, len, per_context)
                        .await?;
                    let wire = wire_extents(&extents, session.reply, size - offset, len, req_one);
                    if wire.is_empty() {
                        return Err(io::Error::other(format!(
                            "backend returned no extent for {} at offset {offset}",
                            context.name()
                        )));
                    }
                    chunks.push((*id, wire));
                }
                Ok(ReplyBody::BlockStatus(chunks))
            }
        }
    }
}

/// The extents a backend returned, made fit for the wire: empty extents dropped,
/// neighbours with equal flags merged, clipped at the end of the export (`room`
/// bytes from the request's offset), with `req_one` only the first extent cut to
/// the requested `len`, compact lengths split to fit 32 bits (at a 512-byte
/// multiple), at most [`proto::BLOCK_STATUS_EXTENTS_MAX`].
pub fn wire_extents(
    extents: &[Extent],
    style: ReplyStyle,
    room: u64,
    len: u64,
    req_one: bool,
) -> Vec<BlockStatusExtent> {
    const COMPACT_MAX: u64 = (u32::MAX as u64) & !511;
    let mut out: Vec<BlockStatusExtent> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        let n = e.len_bytes.min(room - covered);
        if n == 0 {
            continue;
        }
        covered += n;
        match out.last_mut() {
            Some(last) if last.flags == u64::from(e.flags) => last.len += n,
            _ => out.push(BlockStatusExtent {
                len: n,
                flags: u64::from(e.flags),
            }),
        }
        if covered == room {
            break;
        }
    }
    if req_one {
        out.truncate(1);
        if let Some(first) = out.first_mut() {
            first.len = first.len.min(len);
        }
    }
    if style != ReplyStyle::Extended {
        let mut split = Vec::with_capacity(out.len());
        for e in out {
            let mut left = e.len;
            while left > COMPACT_MAX {
                split.push(BlockStatusExtent {
                    len: COMPACT_MAX,
                    flags: e.flags,
                });
                left -= COMPACT_MAX;
            }
            split.push(BlockStatusExtent {
                len: left,
                flags: e.flags,
            });
        }
        out = split;
        if req_one {
            out.truncate(1);
        }
    }
    out.truncate(proto::BLOCK_STATUS_EXTENTS_MAX);
    out
}

/// Whether every byte is zero (8 bytes at a time; stops at the first non-zero word).
pub(crate) fn is_all_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(8);
    let tail_zero = words.remainder().iter().all(|&b| b == 0);
    tail_zero && words.all(|w| u64::from_ne_bytes(w.try_into().expect("8-byte chunk")) == 0)
}

/// A connection's in-flight limits: request slots and payload bytes.
struct InflightWindow {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// Keeps a request's slot and byte budget (this connection's and the server's)
/// until its reply is written.
struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Permits {
    fn request(request: OwnedSemaphorePermit) -> Permits {
        Permits {
            _request: request,
            _bytes: None,
        }
    }
}

enum ReplyBody {
    /// Success without data.
    Done,
    /// A successful read's data, exactly the requested length.
    Data(Bytes),
    /// A successful read of that many zero bytes (structured and extended only).
    Hole(u32),
    BlockStatus(Vec<(u32, Vec<BlockStatusExtent>)>),
    Error {
        errno: NbdErrno,
        message: std::borrow::Cow<'static, str>,
    },
}

struct Reply {
    cookie: u64,
    /// The request's offset (echoed in extended headers and content chunks).
    offset: u64,
    body: ReplyBody,
    _permits: Permits,
}

impl Reply {
    fn new(r: &Request, body: ReplyBody, permits: Permits) -> Reply {
        Reply {
            cookie: r.cookie,
            offset: r.offset,
            body,
            _permits: permits,
        }
    }

    /// Append this reply's header bytes (and small payloads) to `head`; the bulk
    /// data, if any, is returned to be written from its own buffer.
    fn encode<'a>(&'a self, style: ReplyStyle, head: &mut Vec<u8>) -> Option<&'a Bytes> {
        let chunk = |head: &mut Vec<u8>, flags: u16, kind: u16, len: u64| {
            proto::encode_chunk_header(
                head,
                style,
                &ChunkHeader {
                    flags,
                    kind,
                    cookie: self.cookie,
                    offset: self.offset,
                    len,
                },
            );
        };
        match (&self.body, style) {
            (ReplyBody::Done, ReplyStyle::Simple | ReplyStyle::Structured) => {
                head.extend_from_slice(&proto::encode_simple_reply(0, self.cookie));
                None
            }
            (ReplyBody::Data(data), ReplyStyle::Simple) => {
                head.extend_from_slice(&proto::encode_simple_reply(0, self.cookie));
                Some(data)
            }
            (ReplyBody::Error { errno, .. }, ReplyStyle::Simple) => {
                head.extend_from_slice(&proto::encode_simple_reply(*errno as u32, self.cookie));
                None
            }
            (ReplyBody::Hole(_) | ReplyBody::BlockStatus(_), ReplyStyle::Simple) => {
                unreachable!("holes and block status need structured replies")
            }
            (ReplyBody::Done, _) => {
                chunk(head, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0);
                None
            }
            (ReplyBody::Data(data), _) => {
                chunk(
                    head,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    8 + data.len() as u64,
                );
                head.extend_from_slice(&self.offset.to_be_bytes());
                Some(data)
            }
            (ReplyBody::Hole(len), _) => {
                chunk(
                    head,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_HOLE,
                    12,
                );
                head.extend_from_slice(&self.offset.to_be_bytes());
                head.extend_from_slice(&len.to_be_bytes());
                None
            }
            (ReplyBody::BlockStatus(chunks), _) => {
                let mut payload = Vec::new();
                for (i, (id, extents)) in chunks.iter().enumerate() {
                    payload.clear();
                    let kind =
                        proto::encode_block_status_payload(&mut payload, style, *id, extents);
                    let flags = if i + 1 == chunks.len() {
                        proto::REPLY_FLAG_DONE
                    } else {
                        0
                    };
                    chunk(head, flags, kind, payload.len() as u64);
                    head.extend_from_slice(&payload);
                }
                None
            }
            (ReplyBody::Error { errno, message }, _) => {
                let mut payload = Vec::new();
                proto::encode_error_chunk_payload(&mut payload, *errno as u32, message);
                chunk(
                    head,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_ERROR,
                    payload.len() as u64,
                );
                head.extend_from_slice(&payload);
                None
            }
        }
    }
}

/// Send replies until every sender is gone. Each round takes all replies that are
/// ready (up to [`REPLY_BATCH_MAX`]) and writes them with vectored writes. After a
/// write error the remaining replies are drained and dropped, so that the
/// connection task still waits for every in-flight backend operation.
async fn write_replies<W>(
    mut writer: W,
    mut rx: mpsc::Receiver<Reply>,
    style: ReplyStyle,
    peer: String,
    stall: Duration,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut batch: Vec<Reply> = Vec::with_capacity(REPLY_BATCH_MAX);
    let mut head: Vec<u8> = Vec::with_capacity(REPLY_BATCH_MAX * 32);
    let mut failed: Option<io::Error> = None;
    while rx.recv_many(&mut batch, REPLY_BATCH_MAX).await > 0 {
        if failed.is_none() {
            // Once shutdown has begun, a client that stops reading its replies must
            // not keep the server from stopping.
            let stalled = async {
                shutdown.cancelled().await;
                tokio::time::sleep(Duration::from_millis(SHUTDOWN_REPLY_TIMEOUT_MS)).await;
            };
            let written = tokio::select! {
                r = write_batch(&mut writer, &mut head, &batch, style, stall) => r,
                _ = stalled => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("client accepted no replies for {SHUTDOWN_REPLY_TIMEOUT_MS} ms during shutdown"),
                )),
            };
            if let Err(e) = written {
                debug!(%peer, error = %e, "NBD reply write failed; dropping further replies");
                failed = Some(e);
            }
        }
        batch.clear();
    }
    if let Some(e) = failed {
        return Err(e);
    }
    writer.shutdown().await
}

async fn write_batch<W>(
    writer: &mut W,
    head: &mut Vec<u8>,
    batch: &[Reply],
    style: ReplyStyle,
    stall: Duration,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    head.clear();
    // (end of this reply's header bytes in `head`, its bulk data)
    let mut parts: Vec<(usize, Option<&Bytes>)> = Vec::with_capacity(batch.len());
    for reply in batch {
        let data = reply.encode(style, head);
        parts.push((head.len(), data));
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    let mut start = 0;
    for (end, data) in &parts {
        slices.push(IoSlice::new(&head[start..*end]));
        start = *end;
        if let Some(data) = data {
            slices.push(IoSlice::new(data));
        }
    }
    let mut remaining = &mut slices[..];
    while !remaining.is_empty() {
        let n = tokio::time::timeout(stall, writer.write_vectored(remaining))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client accepted no reply bytes for {} ms",
                        stall.as_millis()
                    ),
                )
            })??;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        IoSlice::advance_slices(&mut remaining, n);
    }
    tokio::time::timeout(stall, writer.flush())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply flush stalled"))?
}

/// The deadline for a payload of `len` bytes: the stall allowance plus the time
/// it takes at [`PAYLOAD_RATE_MIN_BYTES_PER_S`].
fn payload_deadline(len: u64, stall: Duration) -> Instant {
    Instant::now()
        + stall
        + Duration::from_millis(len.saturating_mul(1000) / PAYLOAD_RATE_MIN_BYTES_PER_S)
}

fn stalled(peer: &str, what: String) -> NbdError {
    NbdError::Stalled {
        peer: peer.to_owned(),
        what,
    }
}

/// Read exactly `len` payload bytes into `buf`, or fail if the client stalls.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    len: usize,
    stall: Duration,
    peer: &str,
) -> Result<(), NbdError> {
    let deadline = payload_deadline(len as u64, stall);
    let mut limited = (&mut *reader).take(len as u64);
    while buf.len() < len {
        let until = deadline.min(Instant::now() + stall);
        match tokio::time::timeout_at(until, limited.read_buf(buf)).await {
            Err(_) => {
                return Err(stalled(
                    peer,
                    format!(
                        "write payload stalled: {} of {len} bytes received, then nothing for {} ms \
                         (or slower than {PAYLOAD_RATE_MIN_BYTES_PER_S} bytes/s)",
                        buf.len(),
                        stall.as_millis()
                    ),
                ));
            }
            Ok(Ok(0)) => {
                return Err(NbdError::Io {
                    peer: peer.to_owned(),
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("client closed after {} of {len} payload bytes", buf.len()),
                    ),
                });
            }
            Ok(Ok(_)) => {}
            Ok(Err(source)) => {
                return Err(NbdError::Io {
                    peer: peer.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Read and drop `len` bytes (a refused request's payload), or fail if the client stalls.
async fn discard<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    len: u64,
    stall: Duration,
    peer: &str,
) -> Result<(), NbdError> {
    let deadline = payload_deadline(len, stall);
    let mut left = len;
    while left > 0 {
        let until = deadline.min(Instant::now() + stall);
        let n = match tokio::time::timeout_at(until, reader.fill_buf()).await {
            Err(_) => {
                return Err(stalled(
                    peer,
                    format!("payload being skipped stalled with {left} of {len} bytes missing"),
                ));
            }
            Ok(Ok([])) => {
                return Err(NbdError::Io {
                    peer: peer.to_owned(),
                    source: io::Error::from(io::ErrorKind::UnexpectedEof),
                });
            }
            Ok(Ok(b)) => (b.len() as u64).min(left) as usize,
            Ok(Err(source)) => {
                return Err(NbdError::Io {
                    peer: peer.to_owned(),
                    source,
                });
            }
        };
        reader.consume(n);
        left -= n as u64;
    }
    Ok(())
}

struct AttachedGuard<'a>(&'a AtomicUsize);

impl Drop for AttachedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept(listener: &NbdListener) -> io::Result<(Conn, String)> {
    match &listener.inner {
        ListenerKind::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            // Replies are batched by the writer; Nagle would only add latency.
            stream.set_nodelay(true)?;
            Ok((Conn::Plain(Plain::Tcp(stream)), addr.to_string()))
        }
        ListenerKind::Unix { listener, path } => {
            let (stream, _) = listener.accept().await?;
            // ha (issue 15.3): name the process on the other end, so that logs and
            // a refused `tandem demote` say which client is attached.
            let who = stream
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .map(|pid| {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|c| c.trim().to_owned())
                        .unwrap_or_else(|_| "?".into());
                    format!(" (pid {pid} {comm})")
                })
                .unwrap_or_default();
            Ok((
                Conn::Plain(Plain::Unix(stream)),
                format!("unix:{}{who}", path.display()),
            ))
        }
    }
}

/// Remove a socket file left behind by a server that is gone. Refuses to remove
/// anything that is not a socket, or a socket somebody is still accepting on.
async fn remove_stale_socket(path: &Path) -> Result<(), NbdError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(NbdError::Bind {
                address: format!("unix:{}", path.display()),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(NbdError::SocketPathOccupied {
            path: path.to_owned(),
        });
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(NbdError::SocketInUse {
            path: path.to_owned(),
        });
    }
    info!(path = %path.display(), "removing stale NBD unix socket");
    std::fs::remove_file(path).map_err(|source| NbdError::Bind {
        address: format!("unix:{}", path.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "127.0.0.1:10809".parse::<NbdAddress>().unwrap(),
            NbdAddress::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "[::1]:1".parse::<NbdAddress>().unwrap(),
            NbdAddress::Tcp("[::1]:1".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/t.sock".parse::<NbdAddress>().unwrap(),
            NbdAddress::Unix("/run/t.sock".into())
        );
        assert_eq!(
            "/run/t.sock".parse::<NbdAddress>().unwrap(),
            NbdAddress::Unix("/run/t.sock".into())
        );
        for bad in [
            "",
            "unix:",
            "localhost",
            "127.0.0.1",
            "1.2.3.4:99999",
            "[::1]",
        ] {
            assert!(bad.parse::<NbdAddress>().is_err(), "{bad}");
        }
        let a: NbdAddress = "unix:/x".parse().unwrap();
        assert_eq!(a.to_string().parse::<NbdAddress>().unwrap(), a);
    }

    #[test]
    fn export_validation() {
        assert!(NbdExport::default().validate().is_ok());
        let bad = [
            NbdExport {
                block_size_min: 3,
                ..NbdExport::default()
            },
            NbdExport {
                block_size_min: 128 * 1024,
                block_size_preferred: 128 * 1024,
                ..NbdExport::default()
            },
            NbdExport {
                block_size_preferred: 256,
                ..NbdExport::default()
            },
            NbdExport {
                max_request_bytes: 1000,
                ..NbdExport::default()
            },
            NbdExport {
                max_request_bytes: 128 * 1024 * 1024,
                ..NbdExport::default()
            },
            NbdExport {
                name: "a\0b".into(),
                ..NbdExport::default()
            },
            NbdExport {
                description: "d".repeat(5000),
                ..NbdExport::default()
            },
        ];
        for e in bad {
            assert!(e.validate().is_err(), "{e:?}");
        }
    }

    #[test]
    fn wire_extents_merge_clip_and_split() {
        let e = |len_bytes, flags| Extent { len_bytes, flags };
        // Merged, clipped at the end of the export.
        assert_eq!(
            wire_extents(
                &[e(512, 3), e(512, 3), e(1024, 0), e(4096, 0)],
                ReplyStyle::Structured,
                1536,
                100,
                false
            ),
            vec![
                BlockStatusExtent {
                    len: 1024,
                    flags: 3
                },
                BlockStatusExtent { len: 512, flags: 0 }
            ]
        );
        // REQ_ONE: one extent, no longer than the request.
        assert_eq!(
            wire_extents(
                &[e(8192, 3), e(512, 0)],
                ReplyStyle::Extended,
                1 << 20,
                4096,
                true
            ),
            vec![BlockStatusExtent {
                len: 4096,
                flags: 3
            }]
        );
        // Compact lengths fit 32 bits; extended ones need not.
        let big = wire_extents(
            &[e(5 << 30, 3)],
            ReplyStyle::Structured,
            8 << 30,
            8 << 30,
            false,
        );
        assert_eq!(big.len(), 2);
        assert!(
            big.iter()
                .all(|x| x.len <= u64::from(u32::MAX) && x.len % 512 == 0)
        );
        assert_eq!(big.iter().map(|x| x.len).sum::<u64>(), 5 << 30);
        assert_eq!(
            wire_extents(
                &[e(5 << 30, 3)],
                ReplyStyle::Extended,
                8 << 30,
                8 << 30,
                false
            )
            .len(),
            1
        );
        // Empty extents vanish.
        assert!(wire_extents(&[e(0, 1)], ReplyStyle::Extended, 10, 10, false).is_empty());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use std::sync::atomic::{AtomicBool, AtomicU64};

        /// Reads zeroes, records mutations and whether any range was out of bounds.
        struct Recorder {
            size_bytes: u64,
            mutations: AtomicU64,
            out_of_range: AtomicBool,
        }

        impl Recorder {
            fn check(&self, offset: u64, len: u64) {
                if len == 0 || offset.checked_add(len).is_none_or(|e| e > self.size_bytes) {
                    self.out_of_range.store(true, Ordering::SeqCst);
                }
            }
        }

        impl ExportBackend for Recorder {
            fn size_bytes(&self) -> u64 {
                self.size_bytes
            }
            fn read(&self, offset: u64, len: u32) -> IoFuture<Bytes> {
                self.check(offset, u64::from(len));
                Box::pin(async move { Ok(Bytes::from(vec![0u8; len as usize])) })
            }
            fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<()> {
                self.check(offset, data.len() as u64);
                self.mutations.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            }
            fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> IoFuture<()> {
                self.check(offset, u64::from(len));
                self.mutations.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            }
            fn trim(&self, offset: u64, len: u32) -> IoFuture<()> {
                self.check(offset, u64::from(len));
                self.mutations.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            }
            fn flush(&self) -> IoFuture<()> {
                Box::pin(async { Ok(()) })
            }
            fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
                self.check(offset, len);
                Box::pin(async { Ok(()) })
            }
            fn block_status(
                &self,
                _c: &MetaContext,
                offset: u64,
                len: u64,
                _max: usize,
            ) -> IoFuture<Vec<Extent>> {
                self.check(offset, len);
                Box::pin(async move {
                    Ok(vec![Extent {
                        len_bytes: len,
                        flags: 0,
                    }])
                })
            }
        }

        #[derive(Debug, Clone)]
        struct RawRequest {
            good_magic: bool,
            kind: u16,
            flags: u16,
            offset: u64,
            len: u32,
            payload: Vec<u8>,
        }

        fn raw_request() -> impl Strategy<Value = RawRequest> {
            (
                prop::bool::weighted(0.95),
                prop_oneof![0u16..9, any::<u16>()],
                prop_oneof![
                    Just(0u16),
                    Just(1u16),
                    Just(proto::CMD_FLAG_PAYLOAD_LEN),
                    any::<u16>()
                ],
                prop_oneof![0u64..70_000, any::<u64>()],
                prop_oneof![0u32..5000, any::<u32>()],
                proptest::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(|(good_magic, kind, flags, offset, len, payload)| {
                    RawRequest {
                        good_magic,
                        kind,
                        flags,
                        offset,
                        len,
                        payload,
                    }
                })
        }

        async fn drive(
            read_only: bool,
            extended: bool,
            requests: Vec<RawRequest>,
        ) -> Arc<Recorder> {
            let backend = Arc::new(Recorder {
                size_bytes: 65_536,
                mutations: AtomicU64::new(0),
                out_of_range: AtomicBool::new(false),
            });
            let server = NbdServer::new(
                backend.clone(),
                NbdExport {
                    read_only,
                    max_request_bytes: 4096,
                    ..NbdExport::default()
                },
            );
            let (client, server_side) = tokio::net::UnixStream::pair().unwrap();
            let token = CancellationToken::new();
            let task = tokio::spawn(async move {
                let _ = server
                    .run_connection(Conn::Plain(Plain::Unix(server_side)), "fuzz", token)
                    .await;
            });
            let (mut cr, mut cw) = client.into_split();
            // Drain everything the server sends so its writer never blocks.
            let drain = tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = cr.read_to_end(&mut sink).await;
            });
            let mut m = Vec::new();
            m.extend_from_slice(&3u32.to_be_bytes());
            if extended {
                proto::encode_option(&mut m, &proto::ClientOption::ExtendedHeaders);
                proto::encode_option(
                    &mut m,
                    &proto::ClientOption::SetMetaContext(proto::MetaContextRequest {
                        name: b"",
                        queries: vec!["base:allocation"],
                    }),
                );
            }
            m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            m.extend_from_slice(&proto::OPT_GO.to_be_bytes());
            m.extend_from_slice(&6u32.to_be_bytes());
            m.extend_from_slice(&[0; 6]);
            for r in &requests {
                let magic = match (r.good_magic, extended) {
                    (false, _) => 0x1234_5678,
                    (true, false) => proto::REQUEST_MAGIC,
                    (true, true) => proto::EXTENDED_REQUEST_MAGIC,
                };
                m.extend_from_slice(&magic.to_be_bytes());
                m.extend_from_slice(&r.flags.to_be_bytes());
                m.extend_from_slice(&r.kind.to_be_bytes());
                m.extend_from_slice(&7u64.to_be_bytes());
                m.extend_from_slice(&r.offset.to_be_bytes());
                if extended {
                    m.extend_from_slice(&u64::from(r.len).to_be_bytes());
                } else {
                    m.extend_from_slice(&r.len.to_be_bytes());
                }
                m.extend_from_slice(&r.payload);
            }
            let _ = cw.write_all(&m).await;
            let _ = cw.shutdown().await;
            drop(cw);
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("connection did not end after the client closed")
                .expect("connection task panicked");
            drain.await.unwrap();
            backend
        }

        #[tokio::test]
        async fn fixture_executes_valid_requests() {
            let write = RawRequest {
                good_magic: true,
                kind: proto::CMD_WRITE,
                flags: 0,
                offset: 100,
                len: 200,
                payload: vec![1; 200],
            };
            let trim = RawRequest {
                kind: proto::CMD_TRIM,
                payload: vec![],
                ..write.clone()
            };
            let backend = drive(false, false, vec![write.clone(), trim.clone()]).await;
            assert_eq!(backend.mutations.load(Ordering::SeqCst), 2);
            let backend = drive(true, false, vec![write.clone(), trim.clone()]).await;
            assert_eq!(backend.mutations.load(Ordering::SeqCst), 0);
            let ext_write = RawRequest {
                flags: proto::CMD_FLAG_PAYLOAD_LEN,
                ..write
            };
            let backend = drive(false, true, vec![ext_write, trim]).await;
            assert_eq!(backend.mutations.load(Ordering::SeqCst), 2);
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn random_requests_never_panic_or_reach_the_backend_out_of_range(
                read_only in any::<bool>(),
                extended in any::<bool>(),
                requests in proptest::collection::vec(raw_request(), 0..24),
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let backend = rt.block_on(drive(read_only, extended, requests));
                prop_assert!(!backend.out_of_range.load(Ordering::SeqCst));
                if read_only {
                    prop_assert_eq!(backend.mutations.load(Ordering::SeqCst), 0);
                }
            }
        }
    }
}
