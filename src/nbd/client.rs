//! tandem's asynchronous NBD client: one connection, many concurrent requests.
//!
//! Owns: connecting (TCP or unix socket), the handshake (the option haggling
//! itself is [`super::negotiate::ClientNegotiation`]), `NBD_OPT_STARTTLS` with a
//! client certificate, and the transmission phase with simple, structured or
//! extended replies, block status included. Used by `tandem demo`, the tests and
//! tools; the wire format is [`super::proto`], the same code the server uses.
//! Does not own any volume logic.
//!
//! # Pipelining
//!
//! A [`NbdClient`] is a cheap `Clone` handle; every method takes `&self`, so
//! many tasks can issue requests on one connection at once. A request
//! registers a pending entry (cookie → oneshot sender) and is queued on a
//! bounded channel to a *writer task*, which batches queued requests into one
//! buffered write. A *reader task* decodes replies, matches them to pending
//! entries by cookie and wakes the caller. At most [`INFLIGHT_REQUESTS_MAX`]
//! requests are in flight (a semaphore, released when the reply arrives), so
//! memory is bounded. Callers may be cancelled at any await point: a request
//! is either queued whole or not at all, and a reply whose caller is gone is
//! still consumed from the stream and then discarded.
//!
//! If the connection fails (I/O error, server closes, garbage on the wire),
//! every pending and every later request fails with
//! [`NbdClientError::ConnectionLost`], which carries the first cause.
//!
//! Replies are checked against what was asked: a simple reply's data length is
//! the read's length; structured content chunks must lie inside the read and
//! not overlap, and must cover it before the final chunk; a chunk payload is
//! never larger than its request allows, so a hostile server cannot make the
//! client allocate more than it asked for.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

use super::negotiate::{
    BlockSizes, ClientNegotiated, ClientNegotiation, ClientNegotiationError, ClientStep,
    ClientWants,
};
use super::proto::{
    self, BlockStatusExtent, Chunk, HeaderStyle, ProtoError, ReplyHeader, ReplyStyle, Request,
};
use super::stream::{BoxRead, BoxWrite, Conn, Plain};

pub use super::proto::{
    TFLAG_CAN_MULTI_CONN as NBD_FLAG_CAN_MULTI_CONN, TFLAG_HAS_FLAGS as NBD_FLAG_HAS_FLAGS,
    TFLAG_READ_ONLY as NBD_FLAG_READ_ONLY, TFLAG_SEND_CACHE as NBD_FLAG_SEND_CACHE,
    TFLAG_SEND_DF as NBD_FLAG_SEND_DF, TFLAG_SEND_FAST_ZERO as NBD_FLAG_SEND_FAST_ZERO,
    TFLAG_SEND_FLUSH as NBD_FLAG_SEND_FLUSH, TFLAG_SEND_FUA as NBD_FLAG_SEND_FUA,
    TFLAG_SEND_TRIM as NBD_FLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES as NBD_FLAG_SEND_WRITE_ZEROES,
};

/// Upper bound on the whole connect + handshake; a server that accepts the
/// TCP connection but never speaks must not hang `connect` forever.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// The spec's default maximum payload when the server advertises none.
const PAYLOAD_LEN_DEFAULT_MAX_BYTES: u32 = 32 * 1024 * 1024;
/// Hard cap on one request's payload regardless of what the server
/// advertises, so a hostile server cannot make us allocate gigabytes.
const PAYLOAD_LEN_CAP_BYTES: u32 = 128 * 1024 * 1024;
/// Largest block status chunk accepted: 2^20 descriptors of 16 bytes, the
/// spec's recommended ceiling, plus the chunk's own fields.
const BLOCK_STATUS_CHUNK_MAX_BYTES: u64 = 8 + 16 * (1 << 20);
/// Largest error chunk: a 4096-byte message plus the fixed fields.
const ERROR_CHUNK_MAX_BYTES: u64 = 4 + 2 + 4096 + 8;
/// Requests in flight on one connection. 128 covers QD32 from 32 tasks with
/// room to spare while bounding memory to 128 × the maximum payload.
pub const INFLIGHT_REQUESTS_MAX: usize = 128;
/// Bytes the writer task gathers before a syscall (headers and small writes
/// are coalesced; larger payloads bypass the buffer).
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How long `disconnect` waits for the server to close after `NBD_CMD_DISC`.
const DISCONNECT_WAIT_MS: u64 = 5_000;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    #[error(
        "invalid NBD address {addr:?}: {reason}; use HOST:PORT, [IPV6]:PORT, unix:/path or /abs/path"
    )]
    InvalidAddress { addr: String, reason: &'static str },

    #[error(
        "cannot connect to NBD server at {addr}: {source}; check that the server is running and listening there"
    )]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "NBD handshake with {addr} did not finish within {timeout_ms} ms; is this an NBD server?"
    )]
    HandshakeTimeout { addr: String, timeout_ms: u64 },

    #[error("I/O error during NBD handshake with {addr} ({stage}): {source}")]
    HandshakeIo {
        addr: String,
        stage: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "NBD server at {addr} closed the connection during the handshake ({stage}); check the server log"
    )]
    ClosedDuringHandshake { addr: String, stage: &'static str },

    #[error(
        "{addr} is not a newstyle NBD server: expected magic {expected:#018x} at {stage}, got {got:#018x}"
    )]
    BadMagic {
        addr: String,
        stage: &'static str,
        expected: u64,
        got: u64,
    },

    #[error(
        "NBD server at {addr} speaks the oldstyle handshake, which this client does not support; configure the server for newstyle"
    )]
    OldstyleServer { addr: String },

    #[error("export name is invalid: {reason}")]
    InvalidOptions { reason: String },

    #[error(
        "NBD server at {addr} has no export named {export_name:?} ({message}); check the export name"
    )]
    ExportNotFound {
        addr: String,
        export_name: String,
        message: String,
    },

    #[error(
        "NBD server at {addr} closed the connection after NBD_OPT_EXPORT_NAME {export_name:?}: the export probably does not exist or requires TLS"
    )]
    ExportRefused { addr: String, export_name: String },

    #[error(
        "NBD server at {addr} refused {option} for export {export_name:?} with {reply} ({message})"
    )]
    OptionRefused {
        addr: String,
        export_name: String,
        option: &'static str,
        reply: &'static str,
        message: String,
    },

    #[error(
        "NBD server at {addr} requires TLS ({message}); connect with a client certificate (ClientOptions::tls)"
    )]
    TlsRequired { addr: String, message: String },

    #[error("TLS handshake with NBD server {addr} failed: {source}")]
    Tls {
        addr: String,
        #[source]
        source: io::Error,
    },

    #[error("NBD protocol violation by the server: {detail}; the connection is unusable")]
    Protocol { detail: String },

    #[error("{op} at offset {offset} length {len_bytes} not sent: {reason}")]
    InvalidRequest {
        op: &'static str,
        offset: u64,
        len_bytes: u64,
        reason: String,
    },

    #[error("{op} not sent: the server did not advertise {flag}")]
    Unsupported {
        op: &'static str,
        flag: &'static str,
    },

    #[error("{op} not sent: the export is read-only")]
    ReadOnly { op: &'static str },

    #[error("NBD server returned error {errno} ({}) for {op} at offset {offset}{}", proto::NbdErrno::name_of(*.errno), message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Server {
        errno: u32,
        op: &'static str,
        offset: u64,
        /// The message of a structured error chunk, if the server sent one.
        message: Option<String>,
    },

    #[error("I/O error on the NBD connection while {stage}: {source}")]
    TransmissionIo {
        stage: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("NBD server closed the connection")]
    ServerClosed,

    #[error("the NBD connection was disconnected by this client")]
    Disconnected,

    #[error("{op} at offset {offset} failed: the NBD connection is broken ({cause}); reconnect")]
    ConnectionLost {
        op: &'static str,
        offset: u64,
        #[source]
        cause: Arc<NbdClientError>,
    },
}

/// TLS for the client: the configuration (CA, client certificate) and the name
/// the server's certificate must carry.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// What to negotiate.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Export to open ("" = the server's default export).
    pub export_name: String,
    /// Ask for structured replies.
    pub structured: bool,
    /// Ask for extended headers (64-bit lengths; implies structured replies).
    pub extended: bool,
    /// Metadata contexts to select for [`NbdClient::block_status`].
    pub meta_contexts: Vec<String>,
    /// Insist on TLS with these credentials.
    pub tls: Option<ClientTls>,
}

/// Where to connect.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Tcp(&'a str),
    Unix(&'a str),
}

fn parse_addr(addr: &str) -> Result<Target<'_>, NbdClientError> {
    let invalid = |reason| NbdClientError::InvalidAddress {
        addr: addr.to_string(),
        reason,
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(invalid("empty unix socket path"));
        }
        return Ok(Target::Unix(path));
    }
    if addr.starts_with('/') {
        return Ok(Target::Unix(addr));
    }
    if addr.is_empty() {
        return Err(invalid("empty address"));
    }
    if !addr.contains(':') {
        return Err(invalid("missing :PORT"));
    }
    Ok(Target::Tcp(addr))
}

// ---------------------------------------------------------------- handshake

/// Reads exactly `buf.len()` bytes, naming the handshake stage on failure.
async fn read_handshake<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    addr: &str,
    stage: &'static str,
) -> Result<(), NbdClientError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(NbdClientError::ClosedDuringHandshake {
                addr: addr.to_string(),
                stage,
            })
        }
        Err(source) => Err(NbdClientError::HandshakeIo {
            addr: addr.to_string(),
            stage,
            source,
        }),
    }
}

async fn write_handshake<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &[u8],
    addr: &str,
    stage: &'static str,
) -> Result<(), NbdClientError> {
    let result = async {
        stream.write_all(buf).await?;
        stream.flush().await
    }
    .await;
    result.map_err(|source| {
        if matches!(
            source.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            NbdClientError::ClosedDuringHandshake {
                addr: addr.to_string(),
                stage,
            }
        } else {
            NbdClientError::HandshakeIo {
                addr: addr.to_string(),
                stage,
                source,
            }
        }
    })
}

/// Translate a negotiation failure into the client's error.
fn negotiation_error(e: ClientNegotiationError, addr: &str, export_name: &str) -> NbdClientError {
    match e {
        ClientNegotiationError::Proto(ProtoError::BadMagic {
            what,
            expected,
            got,
        }) => NbdClientError::BadMagic {
            addr: addr.to_string(),
            stage: what,
            expected,
            got,
        },
        ClientNegotiationError::Proto(ProtoError::Oldstyle) => NbdClientError::OldstyleServer {
            addr: addr.to_string(),
        },
        ClientNegotiationError::ExportNotFound { message, .. } => NbdClientError::ExportNotFound {
            addr: addr.to_string(),
            export_name: export_name.to_string(),
            message,
        },
        ClientNegotiationError::Refused {
            option,
            reply,
            message,
        } => NbdClientError::OptionRefused {
            addr: addr.to_string(),
            export_name: export_name.to_string(),
            option,
            reply,
            message,
        },
        ClientNegotiationError::TlsRequired { message } => NbdClientError::TlsRequired {
            addr: addr.to_string(),
            message,
        },
        ClientNegotiationError::Invalid(reason) if !reason.contains("acknowledged") => {
            NbdClientError::InvalidOptions { reason }
        }
        other => NbdClientError::Protocol {
            detail: format!("{addr}: {other}"),
        },
    }
}

/// Runs the handshake on a fresh connection; returns it (upgraded to TLS if
/// asked) and what was negotiated.
async fn handshake(
    conn: Conn,
    addr: &str,
    options: &ClientOptions,
) -> Result<(Conn, ClientNegotiated), NbdClientError> {
    let wants = ClientWants {
        export_name: options.export_name.clone(),
        tls: options.tls.is_some(),
        structured: options.structured,
        extended: options.extended,
        meta_contexts: options.meta_contexts.clone(),
    };
    let mut neg = ClientNegotiation::new(wants).map_err(|e| NbdClientError::InvalidOptions {
        reason: e.to_string(),
    })?;
    let name = options.export_name.as_str();
    let fail = |e| negotiation_error(e, addr, name);
    let mut stream = BufReader::with_capacity(8 * 1024, conn);
    let mut greeting = [0u8; proto::GREETING_LEN];
    read_handshake(&mut stream, &mut greeting, addr, "server greeting").await?;
    let mut step = neg.greeting(&greeting).map_err(fail)?;
    loop {
        step = match step {
            ClientStep::Send(bytes) => {
                if !bytes.is_empty() {
                    write_handshake(&mut stream, &bytes, addr, "sending an option").await?;
                }
                let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
                read_handshake(&mut stream, &mut header, addr, "option reply").await?;
                let h = proto::decode_option_reply_header(&header)
                    .map_err(|e| fail(ClientNegotiationError::Proto(e)))?;
                if h.len > proto::OPTION_REPLY_DATA_MAX_BYTES {
                    return Err(NbdClientError::Protocol {
                        detail: format!(
                            "{addr}: option reply of {} bytes exceeds the {}-byte limit",
                            h.len,
                            proto::OPTION_REPLY_DATA_MAX_BYTES
                        ),
                    });
                }
                let mut data = vec![0u8; h.len as usize];
                read_handshake(&mut stream, &mut data, addr, "option reply data").await?;
                match neg.reply(h, &data) {
                    Ok(step) => step,
                    Err(e) => {
                        // Soft disconnect as the spec asks; best effort, since the
                        // error is what the caller needs either way.
                        let _ = write_handshake(
                            &mut stream,
                            &ClientNegotiation::abort_bytes(),
                            addr,
                            "sending NBD_OPT_ABORT",
                        )
                        .await;
                        return Err(fail(e));
                    }
                }
            }
            ClientStep::StartTls => {
                let tls = options
                    .tls
                    .as_ref()
                    .expect("STARTTLS is sent only with TLS options");
                if !stream.buffer().is_empty() {
                    return Err(NbdClientError::Protocol {
                        detail: format!(
                            "{addr}: data after the NBD_OPT_STARTTLS reply, before TLS"
                        ),
                    });
                }
                let Conn::Plain(plain) = stream.into_inner() else {
                    unreachable!("STARTTLS only once")
                };
                let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
                let tls_stream = connector
                    .connect(tls.server_name.clone(), plain)
                    .await
                    .map_err(|source| NbdClientError::Tls {
                        addr: addr.to_string(),
                        source,
                    })?;
                stream = BufReader::with_capacity(8 * 1024, Conn::ClientTls(Box::new(tls_stream)));
                neg.tls_started()
            }
            ClientStep::SendExportName(bytes) => {
                write_handshake(&mut stream, &bytes, addr, "sending NBD_OPT_EXPORT_NAME").await?;
                let mut reply = vec![0u8; neg.export_name_reply_len()];
                read_handshake(&mut stream, &mut reply, addr, "NBD_OPT_EXPORT_NAME reply")
                    .await
                    .map_err(|e| match e {
                        NbdClientError::ClosedDuringHandshake { .. } => {
                            NbdClientError::ExportRefused {
                                addr: addr.to_string(),
                                export_name: name.to_string(),
                            }
                        }
                        other => other,
                    })?;
                ClientStep::Done(neg.export_name_reply(&reply).map_err(fail)?)
            }
            ClientStep::Done(negotiated) => {
                if !stream.buffer().is_empty() {
                    return Err(NbdClientError::Protocol {
                        detail: format!("{addr}: data after the end of the handshake"),
                    });
                }
                return Ok((stream.into_inner(), negotiated));
            }
        };
    }
}

// ------------------------------------------------------------- transmission

/// What a pending request expects, and what has arrived of its reply.
enum Expect {
    /// Success carries no data.
    Nothing,
    /// A read of `len` bytes: simple data, or content chunks filling `buf`.
    Read {
        len: u32,
        buf: Option<BytesMut>,
        /// Ranges (relative to the request's offset) received so far.
        covered: Vec<(u64, u64)>,
    },
    /// Block status chunks, one per context.
    BlockStatus {
        chunks: Vec<(u32, Vec<BlockStatusExtent>)>,
    },
}

/// What a successful reply delivers.
enum ReplyData {
    None,
    Data(Bytes),
    BlockStatus(Vec<(u32, Vec<BlockStatusExtent>)>),
}

/// One request waiting for its reply.
struct Pending {
    op: &'static str,
    offset: u64,
    expect: Expect,
    /// The first error chunk of a structured reply.
    error: Option<(u32, String)>,
    reply: oneshot::Sender<Result<ReplyData, NbdClientError>>,
    /// Held until the reply arrives, so the in-flight bound holds even when
    /// the caller has been cancelled.
    _inflight: OwnedSemaphorePermit,
}

enum ConnState {
    Open,
    /// `NBD_CMD_DISC` is being sent; EOF from the server is expected.
    Disconnecting,
    /// Broken or closed; the first cause is kept for every later request.
    Failed(Arc<NbdClientError>),
}

struct SharedState {
    pending: HashMap<u64, Pending>,
    conn: ConnState,
}

/// State shared between the handles and the reader/writer tasks.
struct Shared {
    state: Mutex<SharedState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // No code path panics while holding this lock; poisoning would mean
        // a broken invariant, which is a panic by design.
        self.state
            .lock()
            .expect("nbd client state poisoned: a task panicked while holding it")
    }

    /// Marks the connection failed (keeping an earlier cause if any) and
    /// fails every pending request. Returns the cause in effect.
    fn fail(&self, err: NbdClientError) -> Arc<NbdClientError> {
        let mut state = self.lock();
        let cause = match &state.conn {
            ConnState::Failed(cause) => cause.clone(),
            ConnState::Open | ConnState::Disconnecting => {
                let cause = Arc::new(err);
                state.conn = ConnState::Failed(cause.clone());
                cause
            }
        };
        for (_, p) in state.pending.drain() {
            let _ = p.reply.send(Err(NbdClientError::ConnectionLost {
                op: p.op,
                offset: p.offset,
                cause: cause.clone(),
            }));
        }
        cause
    }
}

enum Outbound {
    Request {
        header: Vec<u8>,
        payload: Option<Bytes>,
    },
    Disconnect {
        header: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
}

/// Sends queued requests, coalescing whatever is queued into one flush.
async fn writer_task(mut rx: mpsc::Receiver<Outbound>, write: BoxWrite, shared: Arc<Shared>) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, write);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Outbound::Request { header, payload } => {
                    let result = async {
                        w.write_all(&header).await?;
                        if let Some(data) = payload {
                            w.write_all(&data).await?;
                        }
                        Ok::<(), io::Error>(())
                    }
                    .await;
                    if let Err(source) = result {
                        shared.fail(NbdClientError::TransmissionIo {
                            stage: "sending a request",
                            source,
                        });
                        return;
                    }
                }
                Outbound::Disconnect { header, done } => {
                    let result = async {
                        w.write_all(&header).await?;
                        w.flush().await?;
                        w.shutdown().await
                    }
                    .await;
                    let _ = done.send(result);
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(source) = w.flush().await {
            shared.fail(NbdClientError::TransmissionIo {
                stage: "sending requests",
                source,
            });
            return;
        }
    }
    // Every handle is gone: close our half so the server sees EOF.
    let _ = w.shutdown().await;
}

fn protocol(detail: String) -> NbdClientError {
    NbdClientError::Protocol { detail }
}

/// Decodes replies and completes the matching pending requests.
async fn reader_task(read: BoxRead, shared: Arc<Shared>, reply_style: ReplyStyle) {
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    loop {
        match read_one_reply(&mut r, &shared, reply_style).await {
            Ok(()) => {}
            Err(err) => {
                shared.fail(err);
                return;
            }
        }
    }
}

async fn read_exact_or<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    stage: &'static str,
) -> Result<(), NbdClientError> {
    r.read_exact(buf).await.map(|_| ()).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            protocol(format!(
                "server closed the connection in the middle of {stage}"
            ))
        } else {
            NbdClientError::TransmissionIo { stage, source: e }
        }
    })
}

async fn read_one_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    reply_style: ReplyStyle,
) -> Result<(), NbdClientError> {
    let mut header = [0u8; proto::EXTENDED_REPLY_HEADER_LEN];
    if let Err(e) = r.read_exact(&mut header[..4]).await {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            if matches!(shared.lock().conn, ConnState::Disconnecting) {
                NbdClientError::Disconnected
            } else {
                NbdClientError::ServerClosed
            }
        } else {
            NbdClientError::TransmissionIo {
                stage: "reading a reply header",
                source: e,
            }
        });
    }
    let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let expected_magic = match reply_style {
        ReplyStyle::Simple => proto::SIMPLE_REPLY_MAGIC,
        ReplyStyle::Structured => proto::STRUCTURED_REPLY_MAGIC,
        ReplyStyle::Extended => proto::EXTENDED_REPLY_MAGIC,
    };
    let allowed = match reply_style {
        // Structured sessions may still get simple replies (never for reads).
        ReplyStyle::Structured => {
            magic == proto::SIMPLE_REPLY_MAGIC || magic == proto::STRUCTURED_REPLY_MAGIC
        }
        _ => magic == expected_magic,
    };
    let Some(len) = proto::reply_header_len(magic).filter(|_| allowed) else {
        let detail = match magic {
            proto::STRUCTURED_REPLY_MAGIC | proto::EXTENDED_REPLY_MAGIC => {
                "structured reply chunk received, but structured replies (or this header form) were not negotiated".to_string()
            }
            _ => format!(
                "reply magic {magic:#010x}, expected {expected_magic:#010x} (first bytes {:02x?})",
                &header[..4]
            ),
        };
        return Err(protocol(detail));
    };
    read_exact_or(r, &mut header[4..len], "a reply header").await?;
    let decoded =
        proto::decode_reply_header(&header[..len]).map_err(|e| protocol(e.to_string()))?;
    match decoded {
        ReplyHeader::Simple { errno, cookie } => {
            let mut taken = Taken::new(shared, cookie)?;
            let p = taken.get();
            let result = if errno != 0 {
                // A simple error reply carries no payload, even for a read.
                Err(NbdClientError::Server {
                    errno,
                    op: p.op,
                    offset: p.offset,
                    message: None,
                })
            } else {
                match &p.expect {
                    Expect::Nothing => Ok(ReplyData::None),
                    Expect::Read { .. } | Expect::BlockStatus { .. }
                        if reply_style != ReplyStyle::Simple =>
                    {
                        return Err(protocol(format!(
                            "a simple reply to {} in a structured session",
                            p.op
                        )));
                    }
                    Expect::BlockStatus { .. } => Ok(ReplyData::None),
                    Expect::Read { len, .. } => {
                        let len = *len;
                        let mut data = BytesMut::zeroed(len as usize);
                        if let Err(e) = r.read_exact(&mut data).await {
                            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                                protocol(format!(
                                    "server closed the connection in the middle of a {len}-byte read reply"
                                ))
                            } else {
                                NbdClientError::TransmissionIo {
                                    stage: "reading a read reply's data",
                                    source: e,
                                }
                            });
                        }
                        Ok(ReplyData::Data(data.freeze()))
                    }
                }
            };
            // The caller may have been cancelled; the reply was still consumed.
            let _ = taken.finish().reply.send(result);
            Ok(())
        }
        ReplyHeader::Structured(h) | ReplyHeader::Extended(h) => {
            read_chunk(r, shared, reply_style, h).await
        }
    }
}

async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    reply_style: ReplyStyle,
    h: proto::ChunkHeader,
) -> Result<(), NbdClientError> {
    // The pending entry is out of the map while its payload is read; it goes back
    // unless this chunk is the last (also on errors, so that the failure reaches it).
    let mut taken = Taken::new(shared, h.cookie)?;
    let p = taken.get();
    let limit = match (&p.expect, h.kind) {
        (_, k) if k & proto::REPLY_TYPE_ERROR_BIT != 0 => ERROR_CHUNK_MAX_BYTES,
        (Expect::Read { len, .. }, proto::REPLY_TYPE_OFFSET_DATA) => 8 + u64::from(*len),
        (Expect::Read { .. }, proto::REPLY_TYPE_OFFSET_HOLE) => 12,
        (Expect::BlockStatus { .. }, proto::REPLY_TYPE_BLOCK_STATUS)
        | (Expect::BlockStatus { .. }, proto::REPLY_TYPE_BLOCK_STATUS_EXT) => {
            BLOCK_STATUS_CHUNK_MAX_BYTES
        }
        (_, proto::REPLY_TYPE_NONE) => 0,
        (_, kind) => {
            return Err(protocol(format!(
                "chunk type {kind} is not a valid reply to {}",
                p.op
            )));
        }
    };
    if h.len > limit {
        return Err(protocol(format!(
            "chunk of {} bytes for {} exceeds the {limit} bytes it may carry",
            h.len, p.op
        )));
    }
    if h.kind == proto::REPLY_TYPE_OFFSET_DATA {
        // Read the data straight into the request's buffer.
        let Expect::Read { len, buf, covered } = &mut p.expect else {
            unreachable!("checked above")
        };
        if h.len <= 8 {
            return Err(protocol("NBD_REPLY_TYPE_OFFSET_DATA without data".into()));
        }
        let mut off = [0u8; 8];
        read_exact_or(r, &mut off, "a data chunk").await?;
        let at = u64::from_be_bytes(off);
        let n = h.len - 8;
        let rel = at
            .checked_sub(p.offset)
            .filter(|rel| rel + n <= u64::from(*len));
        let Some(rel) = rel else {
            return Err(protocol(format!(
                "data chunk at {at}+{n} lies outside the read of {len} bytes at {}",
                p.offset
            )));
        };
        claim(covered, rel, n)?;
        let buf = buf.get_or_insert_with(|| BytesMut::zeroed(*len as usize));
        read_exact_or(
            r,
            &mut buf[rel as usize..(rel + n) as usize],
            "a data chunk",
        )
        .await?;
    } else {
        let mut payload = vec![0u8; h.len as usize];
        read_exact_or(r, &mut payload, "a reply chunk").await?;
        let chunk = proto::decode_chunk(reply_style, h.kind, &payload)
            .map_err(|e| protocol(e.to_string()))?;
        match (chunk, &mut p.expect) {
            (Chunk::None, _) => {}
            (Chunk::OffsetHole { offset, len: n }, Expect::Read { len, covered, .. }) => {
                let rel = offset
                    .checked_sub(p.offset)
                    .filter(|rel| rel + u64::from(n) <= u64::from(*len));
                let Some(rel) = rel else {
                    return Err(protocol(format!(
                        "hole chunk at {offset}+{n} lies outside the read of {len} bytes at {}",
                        p.offset
                    )));
                };
                claim(covered, rel, u64::from(n))?;
            }
            (
                Chunk::BlockStatus {
                    context_id,
                    extents,
                },
                Expect::BlockStatus { chunks },
            ) => {
                if chunks.iter().any(|(id, _)| *id == context_id) {
                    return Err(protocol(format!(
                        "two block status chunks for context {context_id}"
                    )));
                }
                chunks.push((context_id, extents));
            }
            (Chunk::Error { errno, message, .. }, _) => {
                if p.error.is_none() {
                    p.error = Some((errno, String::from_utf8_lossy(message).into_owned()));
                }
            }
            (_, _) => {
                return Err(protocol(format!(
                    "unexpected chunk type {} for {}",
                    h.kind, p.op
                )));
            }
        }
    }
    if h.flags & proto::REPLY_FLAG_DONE == 0 {
        return Ok(());
    }
    if let Expect::Read { len, covered, .. } = &p.expect
        && p.error.is_none()
    {
        let total: u64 = covered.iter().map(|(_, n)| n).sum();
        if total != u64::from(*len) {
            return Err(protocol(format!(
                "read of {len} bytes at {} ended after {total} bytes of chunks",
                p.offset
            )));
        }
    }
    let mut p = taken.finish();
    let result = if let Some((errno, message)) = p.error.take() {
        Err(NbdClientError::Server {
            errno,
            op: p.op,
            offset: p.offset,
            message: Some(message),
        })
    } else {
        match p.expect {
            Expect::Nothing => Ok(ReplyData::None),
            Expect::Read { len, buf, .. } => Ok(ReplyData::Data(
                buf.unwrap_or_else(|| BytesMut::zeroed(len as usize))
                    .freeze(),
            )),
            Expect::BlockStatus { chunks } => Ok(ReplyData::BlockStatus(chunks)),
        }
    };
    let _ = p.reply.send(result);
    Ok(())
}

/// A pending entry taken out of the map while its reply is read. Dropped without
/// [`Taken::finish`] (more chunks to come, or an error), it goes back into the
/// map, where a connection failure finds and fails it.
struct Taken<'a> {
    shared: &'a Shared,
    cookie: u64,
    p: Option<Pending>,
}

impl<'a> Taken<'a> {
    fn new(shared: &'a Shared, cookie: u64) -> Result<Taken<'a>, NbdClientError> {
        let p = shared.lock().pending.remove(&cookie).ok_or_else(|| {
            protocol(format!(
                "reply for cookie {cookie:#x}, which no request in flight has"
            ))
        })?;
        Ok(Taken {
            shared,
            cookie,
            p: Some(p),
        })
    }

    fn get(&mut self) -> &mut Pending {
        self.p.as_mut().expect("taken until finished")
    }

    fn finish(mut self) -> Pending {
        self.p.take().expect("finished once")
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.p.take() {
            self.shared.lock().pending.insert(self.cookie, p);
        }
    }
}

/// Record that `[rel, rel + n)` of a read arrived; overlapping chunks are a violation.
fn claim(covered: &mut Vec<(u64, u64)>, rel: u64, n: u64) -> Result<(), NbdClientError> {
    if covered
        .iter()
        .any(|&(start, len)| rel < start + len && start < rel + n)
    {
        return Err(protocol(format!(
            "content chunk at +{rel} of {n} bytes overlaps an earlier chunk"
        )));
    }
    covered.push((rel, n));
    Ok(())
}

struct Inner {
    negotiated: ClientNegotiated,
    export_name: String,
    tx: mpsc::Sender<Outbound>,
    inflight: Arc<Semaphore>,
    next_cookie: AtomicU64,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Nobody can wait for a reply any more. The writer task ends by
        // itself when `tx` is dropped; the reader would block on the socket.
        if let Ok(mut reader) = self.reader.lock()
            && let Some(handle) = reader.take()
        {
            handle.abort();
        }
    }
}

/// A connection to one NBD export. Clones share the connection.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export_name", &self.inner.export_name)
            .field("negotiated", &self.inner.negotiated)
            .finish()
    }
}

impl NbdClient {
    /// Connects to `addr` ("127.0.0.1:10809", `[::1]:10809`, "host:port",
    /// "unix:/path" or "/abs/path") and opens `export_name` ("" = the
    /// server's default export) with simple replies.
    pub async fn connect(addr: &str, export_name: &str) -> Result<NbdClient, NbdClientError> {
        NbdClient::connect_with(
            addr,
            ClientOptions {
                export_name: export_name.to_owned(),
                ..ClientOptions::default()
            },
        )
        .await
    }

    /// Connects with the features in `options`.
    pub async fn connect_with(
        addr: &str,
        options: ClientOptions,
    ) -> Result<NbdClient, NbdClientError> {
        let target = parse_addr(addr)?;
        let connect_err = |source| NbdClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let setup = async {
            let conn = match target {
                Target::Tcp(host_port) => {
                    let stream = TcpStream::connect(host_port).await.map_err(connect_err)?;
                    // Requests are small and latency-bound; never wait for Nagle.
                    stream.set_nodelay(true).map_err(connect_err)?;
                    Conn::Plain(Plain::Tcp(stream))
                }
                Target::Unix(path) => Conn::Plain(Plain::Unix(
                    UnixStream::connect(path).await.map_err(connect_err)?,
                )),
            };
            handshake(conn, addr, &options).await
        };
        let (conn, negotiated) =
            tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), setup)
                .await
                .map_err(|_| NbdClientError::HandshakeTimeout {
                    addr: addr.to_string(),
                    timeout_ms: HANDSHAKE_TIMEOUT_MS,
                })??;
        tracing::debug!(addr, export_name = %options.export_name, ?negotiated, "nbd client connected");
        let (read, write) = conn.split();
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState {
                pending: HashMap::with_capacity(INFLIGHT_REQUESTS_MAX),
                conn: ConnState::Open,
            }),
        });
        // Every queued request holds an in-flight permit, so the channel
        // never holds more than INFLIGHT_REQUESTS_MAX requests plus a DISC.
        let (tx, rx) = mpsc::channel(INFLIGHT_REQUESTS_MAX + 1);
        tokio::spawn(writer_task(rx, write, shared.clone()));
        let reader = tokio::spawn(reader_task(read, shared.clone(), negotiated.reply));
        Ok(NbdClient {
            inner: Arc::new(Inner {
                negotiated,
                export_name: options.export_name,
                tx,
                inflight: Arc::new(Semaphore::new(INFLIGHT_REQUESTS_MAX)),
                next_cookie: AtomicU64::new(1),
                shared,
                reader: Mutex::new(Some(reader)),
            }),
        })
    }

    /// Size of the export in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.inner.negotiated.size_bytes
    }

    /// Transmission flags (`NBD_FLAG_*` constants of this module).
    pub fn transmission_flags(&self) -> u16 {
        self.inner.negotiated.transmission_flags
    }

    /// Preferred block size, if the server advertised block sizes.
    pub fn block_size_preferred(&self) -> Option<u32> {
        self.inner.negotiated.block_sizes.map(|s| s.preferred_bytes)
    }

    /// All advertised block size constraints, if any.
    pub fn block_sizes(&self) -> Option<BlockSizes> {
        self.inner.negotiated.block_sizes
    }

    /// The export name this connection opened.
    pub fn export_name(&self) -> &str {
        &self.inner.export_name
    }

    /// What the handshake agreed on (reply style, headers, contexts, TLS).
    pub fn negotiated(&self) -> &ClientNegotiated {
        &self.inner.negotiated
    }

    /// Reads `len` bytes at `offset`; the result is exactly `len` bytes.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdClientError> {
        self.check_range("read", offset, u64::from(len), true)?;
        let expect = Expect::Read {
            len,
            buf: None,
            covered: Vec::new(),
        };
        match self
            .submit(
                "read",
                proto::CMD_READ,
                0,
                offset,
                u64::from(len),
                None,
                expect,
            )
            .await?
        {
            ReplyData::Data(d) => Ok(d),
            _ => unreachable!("a successful read reply carries its data"),
        }
    }

    /// Writes `data` at `offset`; with `fua` the server persists it before
    /// replying (needs `NBD_FLAG_SEND_FUA`).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdClientError> {
        let len = data.len() as u64;
        self.check_writable("write")?;
        let mut flags = self.fua_flag("write", fua)?;
        self.check_range("write", offset, len, true)?;
        if self.inner.negotiated.style == HeaderStyle::Extended {
            flags |= proto::CMD_FLAG_PAYLOAD_LEN;
        }
        self.submit(
            "write",
            proto::CMD_WRITE,
            flags,
            offset,
            len,
            Some(data),
            Expect::Nothing,
        )
        .await?;
        Ok(())
    }

    /// Writes `len` zero bytes at `offset` without sending them.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), NbdClientError> {
        self.write_zeroes_with(offset, u64::from(len), fua, false)
            .await
    }

    /// Like [`NbdClient::write_zeroes`], for any 64-bit length (beyond 4 GiB only
    /// with extended headers); with `fast`, the server must refuse at once
    /// (`ENOTSUP`) unless zeroing is faster than writing.
    pub async fn write_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        fast: bool,
    ) -> Result<(), NbdClientError> {
        self.check_writable("write_zeroes")?;
        self.check_flag(
            "write_zeroes",
            NBD_FLAG_SEND_WRITE_ZEROES,
            "NBD_FLAG_SEND_WRITE_ZEROES",
        )?;
        let mut flags = self.fua_flag("write_zeroes", fua)?;
        if fast {
            self.check_flag(
                "write_zeroes",
                NBD_FLAG_SEND_FAST_ZERO,
                "NBD_FLAG_SEND_FAST_ZERO",
            )?;
            flags |= proto::CMD_FLAG_FAST_ZERO;
        }
        self.check_range("write_zeroes", offset, len, false)?;
        self.submit(
            "write_zeroes",
            proto::CMD_WRITE_ZEROES,
            flags,
            offset,
            len,
            None,
            Expect::Nothing,
        )
        .await?;
        Ok(())
    }

    /// Tells the server that `len` bytes at `offset` are no longer needed.
    /// What they read as afterwards is up to the server.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdClientError> {
        self.trim_extended(offset, u64::from(len)).await
    }

    /// Like [`NbdClient::trim`], for any 64-bit length (beyond 4 GiB only with
    /// extended headers).
    pub async fn trim_extended(&self, offset: u64, len: u64) -> Result<(), NbdClientError> {
        self.check_writable("trim")?;
        self.check_flag("trim", NBD_FLAG_SEND_TRIM, "NBD_FLAG_SEND_TRIM")?;
        self.check_range("trim", offset, len, false)?;
        self.submit(
            "trim",
            proto::CMD_TRIM,
            0,
            offset,
            len,
            None,
            Expect::Nothing,
        )
        .await?;
        Ok(())
    }

    /// Asks the server to prepare `len` bytes at `offset` for reading (`NBD_CMD_CACHE`).
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), NbdClientError> {
        self.check_flag("cache", NBD_FLAG_SEND_CACHE, "NBD_FLAG_SEND_CACHE")?;
        self.check_range("cache", offset, len, false)?;
        self.submit(
            "cache",
            proto::CMD_CACHE,
            0,
            offset,
            len,
            None,
            Expect::Nothing,
        )
        .await?;
        Ok(())
    }

    /// Makes every write the server has already acknowledged durable.
    pub async fn flush(&self) -> Result<(), NbdClientError> {
        self.check_flag("flush", NBD_FLAG_SEND_FLUSH, "NBD_FLAG_SEND_FLUSH")?;
        self.submit("flush", proto::CMD_FLUSH, 0, 0, 0, None, Expect::Nothing)
            .await?;
        Ok(())
    }

    /// The status of `[offset, offset + len)` in metadata context `context`
    /// (one negotiated with [`ClientOptions::meta_contexts`]): consecutive extents
    /// from `offset`, possibly ending before `offset + len` (ask again from there).
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<BlockStatusExtent>, NbdClientError> {
        let Some(id) = self
            .inner
            .negotiated
            .contexts
            .iter()
            .find(|(_, name)| name == context)
            .map(|(id, _)| *id)
        else {
            return Err(NbdClientError::InvalidRequest {
                op: "block_status",
                offset,
                len_bytes: len,
                reason: format!("metadata context {context:?} was not negotiated"),
            });
        };
        self.check_range("block_status", offset, len, false)?;
        let expect = Expect::BlockStatus { chunks: Vec::new() };
        let reply = self
            .submit(
                "block_status",
                proto::CMD_BLOCK_STATUS,
                0,
                offset,
                len,
                None,
                expect,
            )
            .await?;
        let ReplyData::BlockStatus(chunks) = reply else {
            return Err(protocol(
                "block status answered without status chunks".into(),
            ));
        };
        chunks
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, e)| e)
            .ok_or_else(|| protocol(format!("no block status chunk for context {context:?}")))
    }

    /// Waits for every request in flight, sends `NBD_CMD_DISC` and closes
    /// the connection. Other clones of this handle fail afterwards with
    /// [`NbdClientError::Disconnected`].
    pub async fn disconnect(self) -> Result<(), NbdClientError> {
        let inner = &self.inner;
        // All permits = nothing in flight; the spec asks clients to wait.
        let all_permits = inner
            .inflight
            .acquire_many(INFLIGHT_REQUESTS_MAX as u32)
            .await
            .map_err(|_| NbdClientError::Disconnected)?;
        inner.inflight.close();
        {
            let mut state = inner.shared.lock();
            if let ConnState::Failed(cause) = &state.conn {
                return Err(NbdClientError::ConnectionLost {
                    op: "disconnect",
                    offset: 0,
                    cause: cause.clone(),
                });
            }
            state.conn = ConnState::Disconnecting;
        }
        let (done_tx, done_rx) = oneshot::channel();
        let header = self.header(proto::CMD_DISC, 0, 0, 0, 0)?;
        if inner
            .tx
            .send(Outbound::Disconnect {
                header,
                done: done_tx,
            })
            .await
            .is_err()
        {
            return Err(self.lost("disconnect", 0));
        }
        match done_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                return Err(NbdClientError::TransmissionIo {
                    stage: "sending NBD_CMD_DISC",
                    source,
                });
            }
            Err(_) => return Err(self.lost("disconnect", 0)),
        }
        // The server closes its side after DISC; wait for that so that the
        // caller can rely on the server having finished with the export.
        let reader = inner
            .reader
            .lock()
            .expect("nbd client reader handle poisoned")
            .take();
        if let Some(mut handle) = reader {
            let wait = Duration::from_millis(DISCONNECT_WAIT_MS);
            if tokio::time::timeout(wait, &mut handle).await.is_err() {
                tracing::warn!(
                    wait_ms = DISCONNECT_WAIT_MS,
                    "nbd server did not close the connection after NBD_CMD_DISC; closing it ourselves"
                );
                handle.abort();
            }
        }
        drop(all_permits);
        Ok(())
    }

    fn header(
        &self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, NbdClientError> {
        let mut header = Vec::with_capacity(proto::EXTENDED_REQUEST_LEN);
        proto::encode_request_header(
            self.inner.negotiated.style,
            &Request {
                flags,
                kind,
                cookie,
                offset,
                len,
            },
            &mut header,
        )
        .map_err(|e| NbdClientError::InvalidRequest {
            op: proto::command_name(kind),
            offset,
            len_bytes: len,
            reason: e.to_string(),
        })?;
        Ok(header)
    }

    fn lost(&self, op: &'static str, offset: u64) -> NbdClientError {
        let cause = match &self.inner.shared.lock().conn {
            ConnState::Failed(cause) => cause.clone(),
            ConnState::Open | ConnState::Disconnecting => Arc::new(NbdClientError::Disconnected),
        };
        NbdClientError::ConnectionLost { op, offset, cause }
    }

    fn check_flag(
        &self,
        op: &'static str,
        flag: u16,
        flag_name: &'static str,
    ) -> Result<(), NbdClientError> {
        if self.transmission_flags() & flag == 0 {
            return Err(NbdClientError::Unsupported {
                op,
                flag: flag_name,
            });
        }
        Ok(())
    }

    fn check_writable(&self, op: &'static str) -> Result<(), NbdClientError> {
        if self.transmission_flags() & NBD_FLAG_READ_ONLY != 0 {
            return Err(NbdClientError::ReadOnly { op });
        }
        Ok(())
    }

    fn fua_flag(&self, op: &'static str, fua: bool) -> Result<u16, NbdClientError> {
        if !fua {
            return Ok(0);
        }
        self.check_flag(op, NBD_FLAG_SEND_FUA, "NBD_FLAG_SEND_FUA")?;
        Ok(proto::CMD_FLAG_FUA)
    }

    /// Client-side checks: length non-zero, no u64 overflow, 32-bit lengths
    /// without extended headers, alignment to the advertised minimum block size
    /// (we asked for block sizes, so we promised to honour them), and
    /// payload-carrying requests within the maximum. The export size is
    /// deliberately not checked: the server answers out-of-range requests with
    /// an error.
    fn check_range(
        &self,
        op: &'static str,
        offset: u64,
        len_bytes: u64,
        carries_payload: bool,
    ) -> Result<(), NbdClientError> {
        let invalid = |reason: String| NbdClientError::InvalidRequest {
            op,
            offset,
            len_bytes,
            reason,
        };
        if len_bytes == 0 {
            return Err(invalid(
                "zero-length requests are unspecified in NBD".to_string(),
            ));
        }
        if offset.checked_add(len_bytes).is_none() {
            return Err(invalid("offset + length overflows 64 bits".to_string()));
        }
        if self.inner.negotiated.style == HeaderStyle::Compact && len_bytes > u64::from(u32::MAX) {
            return Err(invalid(
                "longer than 32 bits, which needs extended headers".to_string(),
            ));
        }
        let sizes = self.inner.negotiated.block_sizes;
        if let Some(sizes) = sizes {
            let minimum = u64::from(sizes.minimum_bytes);
            if !offset.is_multiple_of(minimum) || !len_bytes.is_multiple_of(minimum) {
                return Err(invalid(format!(
                    "not aligned to the server's minimum block size of {minimum} bytes"
                )));
            }
        }
        if carries_payload {
            let maximum = sizes
                .map(|s| s.maximum_bytes)
                .unwrap_or(PAYLOAD_LEN_DEFAULT_MAX_BYTES)
                .min(PAYLOAD_LEN_CAP_BYTES);
            if len_bytes > u64::from(maximum) {
                return Err(invalid(format!(
                    "longer than the {maximum}-byte maximum payload; split the request"
                )));
            }
        }
        Ok(())
    }

    /// Queues one request and waits for its reply.
    #[allow(clippy::too_many_arguments)]
    async fn submit(
        &self,
        op: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<Bytes>,
        expect: Expect,
    ) -> Result<ReplyData, NbdClientError> {
        let inner = &self.inner;
        let permit = inner.inflight.clone().acquire_owned().await.map_err(|_| {
            NbdClientError::ConnectionLost {
                op,
                offset,
                cause: Arc::new(NbdClientError::Disconnected),
            }
        })?;
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let header = self.header(kind, flags, cookie, offset, len)?;
        // Reserve the channel slot first: from here to `send` there is no
        // await, so a cancelled caller never leaves a pending entry behind
        // without its request being queued.
        let slot = inner
            .tx
            .reserve()
            .await
            .map_err(|_| self.lost(op, offset))?;
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut state = inner.shared.lock();
            match &state.conn {
                ConnState::Open => {}
                ConnState::Failed(cause) => {
                    return Err(NbdClientError::ConnectionLost {
                        op,
                        offset,
                        cause: cause.clone(),
                    });
                }
                ConnState::Disconnecting => {
                    return Err(NbdClientError::ConnectionLost {
                        op,
                        offset,
                        cause: Arc::new(NbdClientError::Disconnected),
                    });
                }
            }
            let previous = state.pending.insert(
                cookie,
                Pending {
                    op,
                    offset,
                    expect,
                    error: None,
                    reply: reply_tx,
                    _inflight: permit,
                },
            );
            assert!(
                previous.is_none(),
                "nbd cookie {cookie} reused while in flight"
            );
        }
        slot.send(Outbound::Request { header, payload });
        match reply_rx.await {
            Ok(result) => result,
            Err(_) => Err(self.lost(op, offset)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_to_tcp_or_unix() {
        assert_eq!(
            parse_addr("127.0.0.1:10809").unwrap(),
            Target::Tcp("127.0.0.1:10809")
        );
        assert_eq!(
            parse_addr("[::1]:10809").unwrap(),
            Target::Tcp("[::1]:10809")
        );
        assert_eq!(
            parse_addr("unix:/run/x.sock").unwrap(),
            Target::Unix("/run/x.sock")
        );
        assert_eq!(
            parse_addr("/run/x.sock").unwrap(),
            Target::Unix("/run/x.sock")
        );
        assert!(parse_addr("unix:").is_err());
        assert!(parse_addr("").is_err());
        assert!(parse_addr("localhost").is_err());
    }

    #[test]
    fn server_error_message_names_the_errno() {
        let e = NbdClientError::Server {
            errno: 22,
            op: "read",
            offset: 4096,
            message: None,
        };
        assert_eq!(
            e.to_string(),
            "NBD server returned error 22 (EINVAL) for read at offset 4096"
        );
        let e = NbdClientError::Server {
            errno: 1,
            op: "write",
            offset: 0,
            message: Some("read-only export".into()),
        };
        assert!(
            e.to_string()
                .ends_with("(EPERM) for write at offset 0: read-only export")
        );
    }

    #[test]
    fn overlapping_content_chunks_are_refused() {
        let mut covered = Vec::new();
        claim(&mut covered, 0, 512).unwrap();
        claim(&mut covered, 512, 512).unwrap();
        assert!(claim(&mut covered, 511, 2).is_err());
        assert!(claim(&mut covered, 0, 1).is_err());
        claim(&mut covered, 4096, 1).unwrap();
    }
}
