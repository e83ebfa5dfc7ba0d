//! NBD server: exports one [`ExportBackend`] over TCP or a unix socket to any
//! NBD client (the kernel's nbd-client, qemu, libnbd's nbdcopy/nbdinfo/nbdfuse).
//!
//! Owns: listening, the fixed-newstyle handshake, the transmission phase, request
//! validation, concurrency and backpressure per connection, graceful shutdown.
//! Does not own: what a write means for replication (the backend decides), nor
//! durability (FLUSH and FUA are passed through, G1). The byte-level protocol lives
//! in `proto` (no I/O); this file is the async shell around it.
//!
//! Per connection, after the handshake:
//! - the *reader* (the connection task) reads one request at a time, checks it
//!   with `proto::admit`, reads a write's payload into a `BytesMut` that is frozen
//!   and handed to the backend without a copy, and spawns the backend operation;
//! - at most [`INFLIGHT_REQUESTS_MAX`] requests and [`INFLIGHT_BYTES_MAX`] payload
//!   bytes are in flight; beyond that the reader stops reading (backpressure onto
//!   the client's socket), it never buffers;
//! - one *writer* task sends replies in completion order: it takes every reply
//!   that is ready and writes them with one vectored write, so read data goes from
//!   the backend's `Bytes` to the socket without being copied.
//!
//! Shutdown: when the token is cancelled, every reader stops reading new requests,
//! in-flight requests complete and are replied to, then connections close and
//! [`NbdServer::serve`] returns. A request whose header was read but whose payload
//! was not complete is dropped without a reply (it never reached the backend).

// Public for the fuzz targets in tools/fuzz (hardening).
pub mod proto;

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::proto::{Admission, Command, NbdErrno, OptionOutcome, RequestLimits};
use super::{ExportBackend, IoFuture};

/// Requests one connection may have in flight; beyond this the reader waits.
/// 128 covers the kernel nbd driver's default queue depth and qemu's 16.
pub const INFLIGHT_REQUESTS_MAX: usize = 128;
/// Read and write payload bytes one connection may have in flight (memory bound).
pub const INFLIGHT_BYTES_MAX: u32 = 128 * 1024 * 1024;
/// Clients attached at once (including those still negotiating); more are refused.
pub const CONNECTIONS_MAX: usize = 256;
/// Time a client has from connecting to choosing an export.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 30_000;
/// During shutdown, time a client has to accept each batch of replies before the
/// connection is dropped (its backend operations have completed regardless).
pub const SHUTDOWN_REPLY_TIMEOUT_MS: u64 = 5_000;
/// Replies written with one vectored write (two iovecs each, well under IOV_MAX).
const REPLY_BATCH_MAX: usize = 64;
/// Pause after a failed accept (e.g. EMFILE) so the loop does not spin.
const ACCEPT_RETRY_DELAY_MS: u64 = 100;

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
    #[error("NBD connection {peer}: i/o error: {source}")]
    Io {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD connection {peer}: protocol violation: {what}")]
    Protocol { peer: String, what: String },
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
        if max < pref || max % min != 0 || max > proto::WRITE_DISCARD_MAX_BYTES {
            return fail(format!(
                "max_request_bytes {max} must be a multiple of block_size_min {min}, at least \
                 block_size_preferred {pref} and at most {}",
                proto::WRITE_DISCARD_MAX_BYTES
            ));
        }
        Ok(())
    }

    fn transmission_flags(&self) -> u16 {
        let mut flags = proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES
            // The backend's flush is global (see ExportBackend::flush).
            | proto::TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= proto::TFLAG_READ_ONLY;
        }
        flags
    }
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
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

/// The NBD server for one export.
pub struct NbdServer {
    backend: Arc<dyn ExportBackend>,
    export: NbdExport,
    /// Clients in the transmission phase right now.
    attached: AtomicUsize,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("export", &self.export)
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

    pub fn new(backend: Arc<dyn ExportBackend>, export: NbdExport) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            backend,
            export,
            attached: AtomicUsize::new(0),
        })
    }

    /// Clients currently attached (in the transmission phase).
    pub fn connections(&self) -> usize {
        self.attached.load(Ordering::Relaxed)
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
              read_only = self.export.read_only, "NBD server listening");
        let mut tasks = JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let accepted = tokio::select! {
                biased;
                _ = stop_accepting.cancelled() => break,
                _ = shutdown.cancelled() => break,
                a = accept(&listener) => a,
            };
            let (reader, writer, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    warn!(address = %local, error = %e, "NBD accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_DELAY_MS)).await;
                    continue;
                }
            };
            if tasks.len() >= CONNECTIONS_MAX {
                warn!(%peer, limit = CONNECTIONS_MAX, "NBD connection refused: too many clients");
                continue;
            }
            info!(%peer, "NBD client connected");
            let server = Arc::clone(&self);
            let token = shutdown.clone();
            tasks.spawn(async move {
                match server.run_connection(reader, writer, &peer, token).await {
                    Ok(reason) => info!(%peer, reason, "NBD client disconnected"),
                    Err(e) => warn!(%peer, error = %e, "NBD client dropped"),
                }
            });
        }
        drop(listener);
        info!(address = %local, connections = tasks.len(), "NBD server shutting down");
        while tasks.join_next().await.is_some() {}
        info!(address = %local, "NBD server stopped");
        Ok(())
    }

    /// One client from handshake to close. `Ok` carries why it ended normally.
    async fn run_connection<R, W>(
        &self,
        reader: R,
        mut writer: W,
        peer: &str,
        shutdown: CancellationToken,
    ) -> Result<&'static str, NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut reader = BufReader::with_capacity(64 * 1024, reader);
        let handshake = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok("server shutting down during handshake"),
            r = tokio::time::timeout(
                Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
                self.handshake(&mut reader, &mut writer, peer),
            ) => r,
        };
        match handshake {
            Err(_) => {
                return Err(NbdError::Protocol {
                    peer: peer.to_owned(),
                    what: format!("handshake not finished within {HANDSHAKE_TIMEOUT_MS} ms"),
                });
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Some(reason))) => {
                let _ = writer.shutdown().await;
                return Ok(reason);
            }
            Ok(Ok(None)) => {}
        }
        self.attached.fetch_add(1, Ordering::Relaxed);
        let _attached = AttachedGuard(&self.attached);
        debug!(%peer, "NBD client entered transmission");
        self.transmission(reader, writer, peer, shutdown).await
    }

    /// Run the option haggling. `Ok(None)`: enter transmission; `Ok(Some(reason))`:
    /// the client left (or must be left) cleanly.
    async fn handshake<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
        peer: &str,
    ) -> Result<Option<&'static str>, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let io_err = |source| NbdError::Io {
            peer: peer.to_owned(),
            source,
        };
        let protocol = |what: String| NbdError::Protocol {
            peer: peer.to_owned(),
            what,
        };
        let mut greeting = [0u8; 18];
        greeting[..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
        greeting[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
        greeting[16..]
            .copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        writer.write_all(&greeting).await.map_err(io_err)?;
        writer.flush().await.map_err(io_err)?;

        let client_flags = reader.read_u32().await.map_err(io_err)?;
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(protocol(format!(
                "client flags {client_flags:#x} include unknown bits"
            )));
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        let info = self.export_info();
        let mut data = Vec::with_capacity(256);
        let mut out = Vec::with_capacity(512);
        for _ in 0..proto::OPTIONS_PER_CONNECTION_MAX {
            let magic = match reader.read_u64().await {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(Some("client closed during handshake"));
                }
                Err(e) => return Err(io_err(e)),
            };
            if magic != proto::IHAVEOPT {
                return Err(protocol(format!("option magic {magic:#x} is not IHAVEOPT")));
            }
            let option = reader.read_u32().await.map_err(io_err)?;
            let len_bytes = reader.read_u32().await.map_err(io_err)?;
            out.clear();
            if len_bytes > proto::OPTION_DATA_MAX_BYTES {
                if len_bytes > proto::OPTION_DISCARD_MAX_BYTES || option == proto::OPT_EXPORT_NAME {
                    return Err(protocol(format!(
                        "option {option} carries {len_bytes} bytes of data"
                    )));
                }
                discard(reader, len_bytes).await.map_err(io_err)?;
                proto::answer_oversized_option(option, len_bytes, &mut out);
                writer.write_all(&out).await.map_err(io_err)?;
                writer.flush().await.map_err(io_err)?;
                continue;
            }
            data.resize(len_bytes as usize, 0);
            reader.read_exact(&mut data).await.map_err(io_err)?;
            let outcome = proto::answer_option(&info, no_zeroes, option, &data, &mut out);
            debug!(%peer, option, len_bytes, ?outcome, "NBD option");
            writer.write_all(&out).await.map_err(io_err)?;
            writer.flush().await.map_err(io_err)?;
            match outcome {
                OptionOutcome::Continue => {}
                OptionOutcome::Transmission => return Ok(None),
                OptionOutcome::Close(reason) => return Ok(Some(reason)),
            }
        }
        Err(protocol(format!(
            "more than {} options without choosing an export",
            proto::OPTIONS_PER_CONNECTION_MAX
        )))
    }

    fn export_info(&self) -> proto::ExportInfo {
        proto::ExportInfo {
            name: self.export.name.clone(),
            description: self.export.description.clone(),
            size_bytes: self.backend.size_bytes(),
            transmission_flags: self.export.transmission_flags(),
            block_size_min: self.export.block_size_min,
            block_size_preferred: self.export.block_size_preferred,
            max_request_bytes: self.export.max_request_bytes,
        }
    }

    /// The transmission phase: read, admit and dispatch requests until the client
    /// disconnects, breaks the protocol, or the server shuts down; then wait until
    /// every dispatched request has been replied to (or the client is gone).
    async fn transmission<R, W>(
        &self,
        mut reader: BufReader<R>,
        writer: W,
        peer: &str,
        shutdown: CancellationToken,
    ) -> Result<&'static str, NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let limits = RequestLimits {
            size_bytes: self.backend.size_bytes(),
            max_request_bytes: self.export.max_request_bytes,
            read_only: self.export.read_only,
        };
        let window = InflightWindow {
            requests: Arc::new(Semaphore::new(INFLIGHT_REQUESTS_MAX)),
            bytes: Arc::new(Semaphore::new(INFLIGHT_BYTES_MAX as usize)),
        };
        let peer_shared: Arc<str> = Arc::from(peer);
        // Every reply holds a request permit, so the channel never holds more than
        // INFLIGHT_REQUESTS_MAX replies and a send never waits.
        let (tx, rx) = mpsc::channel::<Reply>(INFLIGHT_REQUESTS_MAX);
        let writer_task =
            tokio::spawn(write_replies(writer, rx, peer.to_owned(), shutdown.clone()));

        let ended = self
            .read_requests(&mut reader, &tx, &window, &limits, &peer_shared, &shutdown)
            .await;
        drop(tx);
        drop(reader);
        // The writer ends once every spawned request has sent its reply (each holds a
        // sender): in-flight backend operations always run to completion.
        match writer_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
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
        &self,
        reader: &mut BufReader<R>,
        tx: &mpsc::Sender<Reply>,
        window: &InflightWindow,
        limits: &RequestLimits,
        peer_shared: &Arc<str>,
        shutdown: &CancellationToken,
    ) -> Result<&'static str, NbdError>
    where
        R: AsyncRead + Unpin,
    {
        let peer: &str = peer_shared;
        let io_err = |source| NbdError::Io {
            peer: peer.to_owned(),
            source,
        };
        let protocol = |what: String| NbdError::Protocol {
            peer: peer.to_owned(),
            what,
        };
        let mut header = [0u8; proto::REQUEST_HEADER_LEN];
        loop {
            // Wait for a free slot first: this is the backpressure point.
            let next = async {
                let permit = Arc::clone(&window.requests)
                    .acquire_owned()
                    .await
                    .expect("request semaphore is never closed");
                reader.read_exact(&mut header).await.map(|_| permit)
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
            let h = proto::decode_request_header(&header)
                .map_err(|magic| protocol(format!("request magic {magic:#010x} is wrong")))?;
            let admission = proto::admit(&h, limits);
            debug!(%peer, cookie = h.cookie, kind = h.kind, flags = h.flags, offset = h.offset,
                   len = h.len, ?admission, "NBD request");
            let command = match admission {
                Admission::Execute(c) => c,
                Admission::Disconnect => return Ok("client sent NBD_CMD_DISC"),
                Admission::Close(what) => return Err(protocol(what.to_owned())),
                Admission::Reject {
                    errno,
                    discard_bytes,
                    reason,
                } => {
                    warn!(%peer, cookie = h.cookie, kind = h.kind, offset = h.offset, len = h.len,
                          error = ?errno, reason, "NBD request refused");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok("server shutting down"),
                        r = discard(reader, discard_bytes) => r.map_err(io_err)?,
                    }
                    let reply = Reply::error(h.cookie, errno, request_permit);
                    if tx.send(reply).await.is_err() {
                        return Ok("reply writer stopped");
                    }
                    continue;
                }
            };
            let payload_len = match command {
                Command::Read { len, .. } | Command::Write { len, .. } => len,
                _ => 0,
            };
            let byte_permit = if payload_len > 0 {
                // max_request_bytes <= 64 MiB < INFLIGHT_BYTES_MAX, so this can be granted.
                Some(
                    Arc::clone(&window.bytes)
                        .acquire_many_owned(payload_len)
                        .await
                        .expect("byte semaphore is never closed"),
                )
            } else {
                None
            };
            let permits = Permits {
                _request: request_permit,
                _bytes: byte_permit,
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
                    let mut limited = (&mut *reader).take(u64::from(len));
                    let read = async {
                        while buf.len() < len as usize {
                            if limited.read_buf(&mut buf).await? == 0 {
                                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                            }
                        }
                        Ok(())
                    };
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok("server shutting down"),
                        r = read => r.map_err(io_err)?,
                    }
                    Op::Other(backend.write(offset, buf.freeze(), fua))
                }
                Command::Flush => Op::Other(backend.flush()),
                Command::Trim { offset, len } => Op::Other(backend.trim(offset, len)),
                Command::WriteZeroes { offset, len, fua } => {
                    Op::Other(backend.write_zeroes(offset, len, fua))
                }
            };
            let tx = tx.clone();
            let cookie = h.cookie;
            let kind = h.kind;
            let peer = Arc::clone(peer_shared);
            tokio::spawn(async move {
                let reply = match op.complete().await {
                    Ok(data) => Reply {
                        cookie,
                        errno: 0,
                        data,
                        _permits: permits,
                    },
                    Err(e) => {
                        let errno = NbdErrno::from_io(&e);
                        warn!(%peer, cookie, kind, error = %e, nbd_error = ?errno,
                              "NBD request failed in the backend");
                        Reply {
                            cookie,
                            errno: errno as u32,
                            data: None,
                            _permits: permits,
                        }
                    }
                };
                // A send error means the writer gave up on a dead client; the backend
                // operation has completed either way.
                let _ = tx.send(reply).await;
            });
        }
    }
}

/// A dispatched backend operation (kept unboxed beyond the backend's own box).
enum Op {
    Read {
        f: IoFuture<Bytes>,
        offset: u64,
        len: u32,
    },
    Other(IoFuture<()>),
}

impl Op {
    /// Await the backend; `Some(data)` for a successful read.
    async fn complete(self) -> io::Result<Option<Bytes>> {
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
                Ok(Some(data))
            }
            Op::Other(f) => f.await.map(|()| None),
        }
    }
}

/// A connection's in-flight limits: request slots and payload bytes.
struct InflightWindow {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// Keeps a connection's in-flight slot and byte budget until its reply is written.
struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Reply {
    cookie: u64,
    errno: u32,
    /// Data of a successful read; exactly the requested length.
    data: Option<Bytes>,
    _permits: Permits,
}

impl Reply {
    fn error(cookie: u64, errno: NbdErrno, request: OwnedSemaphorePermit) -> Reply {
        Reply {
            cookie,
            errno: errno as u32,
            data: None,
            _permits: Permits {
                _request: request,
                _bytes: None,
            },
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
    peer: String,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut batch: Vec<Reply> = Vec::with_capacity(REPLY_BATCH_MAX);
    let mut headers: Vec<[u8; proto::SIMPLE_REPLY_LEN]> = Vec::with_capacity(REPLY_BATCH_MAX);
    let mut failed: Option<io::Error> = None;
    while rx.recv_many(&mut batch, REPLY_BATCH_MAX).await > 0 {
        if failed.is_none() {
            headers.clear();
            headers.extend(
                batch
                    .iter()
                    .map(|r| proto::encode_simple_reply(r.errno, r.cookie)),
            );
            // Once shutdown has begun, a client that stops reading its replies must
            // not keep the server from stopping.
            let stalled = async {
                shutdown.cancelled().await;
                tokio::time::sleep(Duration::from_millis(SHUTDOWN_REPLY_TIMEOUT_MS)).await;
            };
            let written = tokio::select! {
                r = write_batch(&mut writer, &headers, &batch) => r,
                _ = stalled => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("client accepted no replies for {SHUTDOWN_REPLY_TIMEOUT_MS} ms during shutdown"),
                )),
            };
            if let Err(e) = written {
                warn!(%peer, error = %e, "NBD reply write failed; dropping further replies");
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
    headers: &[[u8; proto::SIMPLE_REPLY_LEN]],
    batch: &[Reply],
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for (header, reply) in headers.iter().zip(batch) {
        slices.push(IoSlice::new(header));
        if let Some(data) = &reply.data {
            slices.push(IoSlice::new(data));
        }
    }
    let mut remaining = &mut slices[..];
    while !remaining.is_empty() {
        let n = writer.write_vectored(remaining).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        IoSlice::advance_slices(&mut remaining, n);
    }
    writer.flush().await
}

/// Read and drop `len_bytes` bytes.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len_bytes: u32) -> io::Result<()> {
    if len_bytes == 0 {
        return Ok(());
    }
    let copied = tokio::io::copy(
        &mut (&mut *reader).take(u64::from(len_bytes)),
        &mut tokio::io::sink(),
    )
    .await?;
    if copied < u64::from(len_bytes) {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(())
}

struct AttachedGuard<'a>(&'a AtomicUsize);

impl Drop for AttachedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Halves = (
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
    String,
);

async fn accept(listener: &NbdListener) -> io::Result<Halves> {
    match &listener.inner {
        ListenerKind::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            // Replies are batched by the writer; Nagle would only add latency.
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w), addr.to_string()))
        }
        ListenerKind::Unix { listener, path } => {
            let (stream, _) = listener.accept().await?;
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w), format!("unix:{}", path.display())))
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
    fn transmission_flags_follow_read_only() {
        let rw = NbdExport::default().transmission_flags();
        assert_eq!(rw & proto::TFLAG_READ_ONLY, 0);
        assert_ne!(rw & proto::TFLAG_CAN_MULTI_CONN, 0);
        let ro = NbdExport {
            read_only: true,
            ..NbdExport::default()
        }
        .transmission_flags();
        assert_ne!(ro & proto::TFLAG_READ_ONLY, 0);
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
                prop_oneof![0u16..8, any::<u16>()],
                prop_oneof![Just(0u16), Just(1u16), any::<u16>()],
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

        async fn drive(read_only: bool, requests: Vec<RawRequest>) -> Arc<Recorder> {
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
            let (client, server_side) = tokio::io::duplex(1 << 16);
            let (sr, sw) = tokio::io::split(server_side);
            let token = CancellationToken::new();
            let task = tokio::spawn(async move {
                let _ = server.run_connection(sr, sw, "fuzz", token).await;
            });
            let (mut cr, mut cw) = tokio::io::split(client);
            // Drain everything the server sends so its writer never blocks.
            let drain = tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = cr.read_to_end(&mut sink).await;
            });
            let mut m = Vec::new();
            m.extend_from_slice(&3u32.to_be_bytes());
            m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            m.extend_from_slice(&proto::OPT_GO.to_be_bytes());
            m.extend_from_slice(&6u32.to_be_bytes());
            m.extend_from_slice(&[0; 6]);
            for r in &requests {
                let magic = if r.good_magic {
                    proto::REQUEST_MAGIC
                } else {
                    0x1234_5678
                };
                m.extend_from_slice(&magic.to_be_bytes());
                m.extend_from_slice(&r.flags.to_be_bytes());
                m.extend_from_slice(&r.kind.to_be_bytes());
                m.extend_from_slice(&7u64.to_be_bytes());
                m.extend_from_slice(&r.offset.to_be_bytes());
                m.extend_from_slice(&r.len.to_be_bytes());
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
            let backend = drive(false, vec![write.clone(), trim.clone()]).await;
            assert_eq!(backend.mutations.load(Ordering::SeqCst), 2);
            let backend = drive(true, vec![write, trim]).await;
            assert_eq!(backend.mutations.load(Ordering::SeqCst), 0);
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn random_requests_never_panic_or_reach_the_backend_out_of_range(
                read_only in any::<bool>(),
                requests in proptest::collection::vec(raw_request(), 0..24),
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let backend = rt.block_on(drive(read_only, requests));
                prop_assert!(!backend.out_of_range.load(Ordering::SeqCst));
                if read_only {
                    prop_assert_eq!(backend.mutations.load(Ordering::SeqCst), 0);
                }
            }
        }
    }
}
