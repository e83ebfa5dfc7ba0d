//! A small asynchronous NBD client: one connection, many concurrent requests.
//!
//! Owns: the client side of the NBD handshake (fixed newstyle, `NBD_OPT_GO`
//! with an `NBD_INFO_BLOCK_SIZE` request, falling back to
//! `NBD_OPT_EXPORT_NAME`), and the transmission phase with *simple replies
//! only* (structured replies are never negotiated). It is used by
//! `tandem demo` to drive a workload through tandem's own NBD export over the
//! real protocol, and by integration tests against servers nobody here wrote.
//! It does not own any volume logic, TLS (`NBD_OPT_STARTTLS`), block status or
//! multi-connection setups.
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
//! # Wire layouts (all integers big-endian; see `doc/proto.md` of the
//! NetworkBlockDevice/nbd repository)
//!
//! Handshake, server greeting (18 bytes):
//! ```text
//! 0..8    u64  NBDMAGIC  0x4e42444d41474943
//! 8..16   u64  IHAVEOPT  0x49484156454f5054 (oldstyle 0x00420281861253 is refused)
//! 16..18  u16  handshake flags (bit 0 FIXED_NEWSTYLE, bit 1 NO_ZEROES)
//! ```
//! Client flags (4 bytes): u32, bit 0 C_FIXED_NEWSTYLE, bit 1 C_NO_ZEROES,
//! each set only if the server offered it.
//!
//! Option request (16 + len bytes): u64 IHAVEOPT, u32 option, u32 len, data.
//! `NBD_OPT_GO` (7) data: u32 name len, name bytes, u16 number of info
//! requests (1), u16 `NBD_INFO_BLOCK_SIZE` (3).
//!
//! Option reply (20 + len bytes):
//! ```text
//! 0..8    u64  0x0003e889045565a9
//! 8..12   u32  option being answered
//! 12..16  u32  reply type (1 ACK, 3 INFO, bit 31 set = error, payload = message)
//! 16..20  u32  payload length (bounded here by OPTION_REPLY_LEN_MAX_BYTES)
//! ```
//! `NBD_REP_INFO` payloads: u16 info type, then for `NBD_INFO_EXPORT` (0)
//! u64 size + u16 transmission flags (12 bytes total), for
//! `NBD_INFO_BLOCK_SIZE` (3) u32 minimum, u32 preferred, u32 maximum (14 bytes).
//!
//! `NBD_OPT_EXPORT_NAME` (1) reply, no header: u64 size, u16 transmission
//! flags, then 124 zero bytes unless NO_ZEROES was agreed.
//!
//! Request (28 bytes, then `len` payload bytes for `NBD_CMD_WRITE` only):
//! ```text
//! 0..4    u32  0x25609513
//! 4..6    u16  command flags (bit 0 FUA)
//! 6..8    u16  type (0 READ, 1 WRITE, 2 DISC, 3 FLUSH, 4 TRIM, 6 WRITE_ZEROES)
//! 8..16   u64  cookie ("handle"), unique among requests in flight
//! 16..24  u64  offset in bytes
//! 24..28  u32  length in bytes
//! ```
//! Simple reply (16 bytes, then exactly the requested length of data for a
//! successful `NBD_CMD_READ`, nothing otherwise):
//! ```text
//! 0..4    u32  0x67446698
//! 4..8    u32  error (0 = success, else an errno such as 5 EIO, 22 EINVAL)
//! 8..16   u64  cookie of the request being answered
//! ```
//! Because the payload length of a simple reply is implied by the request, a
//! reply's payload can never be longer than what the client itself asked for.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT_MAGIC: u64 = 0x4948_4156_454f_5054;
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const HANDSHAKE_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const HANDSHAKE_FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag bit 0: always set by a conforming server.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag bit 1: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag bit 2: the server accepts `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag bit 3: the server honours `NBD_CMD_FLAG_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag bit 5: the server accepts `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag bit 6: the server accepts `NBD_CMD_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag bit 8: FLUSH/FUA effects are visible on all connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1 << 0;

const REQUEST_HEADER_LEN_BYTES: usize = 28;
const SIMPLE_REPLY_HEADER_LEN_BYTES: usize = 16;

/// Upper bound on the whole connect + handshake; a server that accepts the
/// TCP connection but never speaks must not hang `connect` forever.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Option reply payloads are strings (≤ 4096 bytes by the spec) or small
/// fixed records; 64 KiB leaves room for any legitimate reply.
const OPTION_REPLY_LEN_MAX_BYTES: u32 = 64 * 1024;
/// The spec caps strings, export names included, at 4096 bytes.
const EXPORT_NAME_LEN_MAX_BYTES: usize = 4096;
/// Error messages from option replies are kept up to this many bytes.
const SERVER_MESSAGE_LEN_MAX_BYTES: usize = 512;
/// The spec's default maximum payload when the server advertises none.
const PAYLOAD_LEN_DEFAULT_MAX_BYTES: u32 = 32 * 1024 * 1024;
/// Hard cap on one request's payload regardless of what the server
/// advertises, so a hostile server cannot make us allocate gigabytes.
const PAYLOAD_LEN_CAP_BYTES: u32 = 128 * 1024 * 1024;
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

    #[error("export name is invalid ({len_bytes} bytes): {reason}")]
    InvalidExportName {
        len_bytes: usize,
        reason: &'static str,
    },

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
        reply: String,
        message: String,
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

    #[error("NBD server returned error {errno} ({}) for {op} at offset {offset}", errno_name(*.errno))]
    Server {
        errno: u32,
        op: &'static str,
        offset: u64,
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

/// The usual name of an NBD error value, for messages.
fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error value",
    }
}

fn option_reply_name(reply_type: u32) -> String {
    let name = match reply_type {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (this client does not do TLS)",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (the server is shutting down)",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        _ => return format!("reply type {reply_type:#x}"),
    };
    name.to_string()
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum_bytes: u32,
    pub preferred_bytes: u32,
    pub maximum_bytes: u32,
}

/// What the handshake established about the export.
#[derive(Clone, Debug)]
struct ExportInfo {
    size_bytes: u64,
    transmission_flags: u16,
    block_sizes: Option<BlockSizes>,
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

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

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

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn option_header(option: u32, data_len_bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data_len_bytes);
    out.put_u64(IHAVEOPT_MAGIC);
    out.put_u32(option);
    // The caller bounded the data (name ≤ 4096 bytes), so this cannot truncate.
    out.put_u32(u32::try_from(data_len_bytes).expect("option data bounded by caller"));
    out
}

/// Runs the handshake on a fresh stream and returns what was negotiated.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: &str,
    export_name: &str,
) -> Result<ExportInfo, NbdClientError> {
    let mut greeting = [0u8; 18];
    read_handshake(stream, &mut greeting[..8], addr, "server greeting").await?;
    let magic = be_u64(&greeting[..8]);
    if magic != NBD_MAGIC {
        return Err(NbdClientError::BadMagic {
            addr: addr.to_string(),
            stage: "server greeting",
            expected: NBD_MAGIC,
            got: magic,
        });
    }
    read_handshake(stream, &mut greeting[8..16], addr, "server greeting").await?;
    let style = be_u64(&greeting[8..16]);
    if style == OLDSTYLE_MAGIC {
        return Err(NbdClientError::OldstyleServer {
            addr: addr.to_string(),
        });
    }
    if style != IHAVEOPT_MAGIC {
        return Err(NbdClientError::BadMagic {
            addr: addr.to_string(),
            stage: "newstyle greeting",
            expected: IHAVEOPT_MAGIC,
            got: style,
        });
    }
    read_handshake(stream, &mut greeting[16..18], addr, "handshake flags").await?;
    let handshake_flags = be_u16(&greeting[16..18]);
    let fixed_newstyle = handshake_flags & HANDSHAKE_FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = handshake_flags & HANDSHAKE_FLAG_NO_ZEROES != 0;
    let mut client_flags = 0u32;
    if fixed_newstyle {
        client_flags |= CLIENT_FLAG_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= CLIENT_FLAG_NO_ZEROES;
    }
    write_handshake(stream, &client_flags.to_be_bytes(), addr, "client flags").await?;

    // Only fixed newstyle servers answer options other than EXPORT_NAME.
    if fixed_newstyle && let Some(info) = option_go(stream, addr, export_name).await? {
        return Ok(info);
    }
    option_export_name(stream, addr, export_name, no_zeroes).await
}

/// Sends `NBD_OPT_GO`; `Ok(None)` means the server does not know the option.
async fn option_go<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: &str,
    export_name: &str,
) -> Result<Option<ExportInfo>, NbdClientError> {
    let name = export_name.as_bytes();
    let data_len_bytes = 4 + name.len() + 2 + 2;
    let mut request = option_header(OPT_GO, data_len_bytes);
    request.put_u32(name.len() as u32);
    request.put_slice(name);
    request.put_u16(1);
    request.put_u16(INFO_BLOCK_SIZE);
    write_handshake(stream, &request, addr, "sending NBD_OPT_GO").await?;

    let protocol = |detail: String| NbdClientError::Protocol {
        detail: format!("{addr}: {detail}"),
    };
    let mut export: Option<(u64, u16)> = None;
    let mut block_sizes: Option<BlockSizes> = None;
    loop {
        let mut header = [0u8; 20];
        read_handshake(stream, &mut header, addr, "NBD_OPT_GO reply").await?;
        let magic = be_u64(&header[..8]);
        if magic != OPTION_REPLY_MAGIC {
            return Err(NbdClientError::BadMagic {
                addr: addr.to_string(),
                stage: "option reply",
                expected: OPTION_REPLY_MAGIC,
                got: magic,
            });
        }
        let option = be_u32(&header[8..12]);
        let reply_type = be_u32(&header[12..16]);
        let len_bytes = be_u32(&header[16..20]);
        if option != OPT_GO {
            return Err(protocol(format!(
                "option reply for option {option} while waiting for NBD_OPT_GO ({OPT_GO})"
            )));
        }
        if len_bytes > OPTION_REPLY_LEN_MAX_BYTES {
            return Err(protocol(format!(
                "option reply of {len_bytes} bytes exceeds the {OPTION_REPLY_LEN_MAX_BYTES}-byte limit"
            )));
        }
        let mut payload = vec![0u8; len_bytes as usize];
        read_handshake(stream, &mut payload, addr, "NBD_OPT_GO reply payload").await?;

        match reply_type {
            REP_ACK => {
                if !payload.is_empty() {
                    return Err(protocol(format!(
                        "NBD_REP_ACK with a {len_bytes}-byte payload"
                    )));
                }
                let Some((size_bytes, transmission_flags)) = export else {
                    return Err(protocol(
                        "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".to_string(),
                    ));
                };
                return Ok(Some(ExportInfo {
                    size_bytes,
                    transmission_flags,
                    block_sizes,
                }));
            }
            REP_INFO => {
                if payload.len() < 2 {
                    return Err(protocol(format!(
                        "NBD_REP_INFO of {len_bytes} bytes has no info type"
                    )));
                }
                match be_u16(&payload[..2]) {
                    INFO_EXPORT => {
                        if payload.len() != 12 {
                            return Err(protocol(format!(
                                "NBD_INFO_EXPORT of {len_bytes} bytes, expected 12"
                            )));
                        }
                        export = Some((be_u64(&payload[2..10]), be_u16(&payload[10..12])));
                    }
                    INFO_BLOCK_SIZE => {
                        if payload.len() != 14 {
                            return Err(protocol(format!(
                                "NBD_INFO_BLOCK_SIZE of {len_bytes} bytes, expected 14"
                            )));
                        }
                        let sizes = BlockSizes {
                            minimum_bytes: be_u32(&payload[2..6]),
                            preferred_bytes: be_u32(&payload[6..10]),
                            maximum_bytes: be_u32(&payload[10..14]),
                        };
                        validate_block_sizes(sizes).map_err(|reason| {
                            protocol(format!("NBD_INFO_BLOCK_SIZE {sizes:?}: {reason}"))
                        })?;
                        block_sizes = Some(sizes);
                    }
                    // NAME, DESCRIPTION and future info types are not needed.
                    _ => {}
                }
            }
            REP_ERR_UNSUP => return Ok(None),
            t if t & REP_ERR_BIT != 0 => {
                let message = server_message(&payload);
                // Soft disconnect as the spec asks; best effort, since the
                // error below is what the caller needs either way.
                let abort = option_header(OPT_ABORT, 0);
                let _ = write_handshake(stream, &abort, addr, "sending NBD_OPT_ABORT").await;
                if t == REP_ERR_UNKNOWN {
                    return Err(NbdClientError::ExportNotFound {
                        addr: addr.to_string(),
                        export_name: export_name.to_string(),
                        message,
                    });
                }
                return Err(NbdClientError::OptionRefused {
                    addr: addr.to_string(),
                    export_name: export_name.to_string(),
                    option: "NBD_OPT_GO",
                    reply: option_reply_name(t),
                    message,
                });
            }
            other => {
                return Err(protocol(format!(
                    "unexpected reply type {other} to NBD_OPT_GO"
                )));
            }
        }
    }
}

/// Checks the constraints the spec puts on advertised block sizes.
fn validate_block_sizes(sizes: BlockSizes) -> Result<(), &'static str> {
    let BlockSizes {
        minimum_bytes,
        preferred_bytes,
        maximum_bytes,
    } = sizes;
    if !minimum_bytes.is_power_of_two() || minimum_bytes > 64 * 1024 {
        return Err("minimum is not a power of two up to 64 KiB");
    }
    if !preferred_bytes.is_power_of_two() || preferred_bytes < minimum_bytes {
        return Err("preferred is not a power of two at least the minimum");
    }
    if maximum_bytes < minimum_bytes || !maximum_bytes.is_multiple_of(minimum_bytes) {
        return Err("maximum is not a multiple of the minimum");
    }
    Ok(())
}

/// A server's error message, lossily decoded and truncated for display.
fn server_message(payload: &[u8]) -> String {
    if payload.is_empty() {
        return "no message".to_string();
    }
    let end = payload.len().min(SERVER_MESSAGE_LEN_MAX_BYTES);
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// Sends `NBD_OPT_EXPORT_NAME`, which ends option haggling; a server that
/// does not have the export can only close the connection.
async fn option_export_name<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: &str,
    export_name: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, NbdClientError> {
    let name = export_name.as_bytes();
    let mut request = option_header(OPT_EXPORT_NAME, name.len());
    request.put_slice(name);
    write_handshake(stream, &request, addr, "sending NBD_OPT_EXPORT_NAME").await?;
    let reply_len_bytes = if no_zeroes { 10 } else { 10 + 124 };
    let mut reply = [0u8; 10 + 124];
    read_handshake(
        stream,
        &mut reply[..reply_len_bytes],
        addr,
        "NBD_OPT_EXPORT_NAME reply",
    )
    .await
    .map_err(|e| match e {
        NbdClientError::ClosedDuringHandshake { .. } => NbdClientError::ExportRefused {
            addr: addr.to_string(),
            export_name: export_name.to_string(),
        },
        other => other,
    })?;
    Ok(ExportInfo {
        size_bytes: be_u64(&reply[..8]),
        transmission_flags: be_u16(&reply[8..10]),
        block_sizes: None,
    })
}

// ------------------------------------------------------------- transmission

/// One request waiting for its reply.
struct Pending {
    op: &'static str,
    offset: u64,
    /// Payload bytes a successful reply carries (the read length, else 0).
    reply_payload_len_bytes: u32,
    reply: oneshot::Sender<Result<Option<Bytes>, NbdClientError>>,
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
        header: [u8; REQUEST_HEADER_LEN_BYTES],
        payload: Option<Bytes>,
    },
    Disconnect {
        header: [u8; REQUEST_HEADER_LEN_BYTES],
        done: oneshot::Sender<io::Result<()>>,
    },
}

fn encode_request(
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    len_bytes: u32,
) -> [u8; REQUEST_HEADER_LEN_BYTES] {
    let mut header = [0u8; REQUEST_HEADER_LEN_BYTES];
    header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&command.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..24].copy_from_slice(&offset.to_be_bytes());
    header[24..28].copy_from_slice(&len_bytes.to_be_bytes());
    header
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

/// Decodes simple replies and completes the matching pending requests.
async fn reader_task(read: BoxRead, shared: Arc<Shared>) {
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    loop {
        let mut header = [0u8; SIMPLE_REPLY_HEADER_LEN_BYTES];
        if let Err(e) = r.read_exact(&mut header).await {
            let err = if e.kind() == io::ErrorKind::UnexpectedEof {
                let disconnecting = matches!(shared.lock().conn, ConnState::Disconnecting);
                if disconnecting {
                    NbdClientError::Disconnected
                } else {
                    NbdClientError::ServerClosed
                }
            } else {
                NbdClientError::TransmissionIo {
                    stage: "reading a reply header",
                    source: e,
                }
            };
            shared.fail(err);
            return;
        }
        let magic = be_u32(&header[0..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            let detail = if magic == STRUCTURED_REPLY_MAGIC {
                "structured reply chunk received, but structured replies were not negotiated"
                    .to_string()
            } else {
                format!(
                    "reply magic {magic:#010x}, expected {SIMPLE_REPLY_MAGIC:#010x} (header bytes {header:02x?})"
                )
            };
            shared.fail(NbdClientError::Protocol { detail });
            return;
        }
        let errno = be_u32(&header[4..8]);
        let cookie = be_u64(&header[8..16]);
        let pending = shared.lock().pending.remove(&cookie);
        let Some(p) = pending else {
            shared.fail(NbdClientError::Protocol {
                detail: format!("reply for cookie {cookie:#x}, which no request in flight has"),
            });
            return;
        };
        let result = if errno != 0 {
            // A simple error reply carries no payload, even for a read.
            Err(NbdClientError::Server {
                errno,
                op: p.op,
                offset: p.offset,
            })
        } else if p.reply_payload_len_bytes > 0 {
            let mut data = BytesMut::zeroed(p.reply_payload_len_bytes as usize);
            if let Err(e) = r.read_exact(&mut data).await {
                let err = if e.kind() == io::ErrorKind::UnexpectedEof {
                    NbdClientError::Protocol {
                        detail: format!(
                            "server closed the connection in the middle of a {}-byte read reply",
                            p.reply_payload_len_bytes
                        ),
                    }
                } else {
                    NbdClientError::TransmissionIo {
                        stage: "reading a read reply's data",
                        source: e,
                    }
                };
                let cause = shared.fail(err);
                let _ = p.reply.send(Err(NbdClientError::ConnectionLost {
                    op: p.op,
                    offset: p.offset,
                    cause,
                }));
                return;
            }
            Ok(Some(data.freeze()))
        } else {
            Ok(None)
        };
        // The caller may have been cancelled; the reply was still consumed.
        let _ = p.reply.send(result);
    }
}

struct Inner {
    info: ExportInfo,
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
            .field("size_bytes", &self.inner.info.size_bytes)
            .field("transmission_flags", &self.inner.info.transmission_flags)
            .field("block_sizes", &self.inner.info.block_sizes)
            .finish()
    }
}

impl NbdClient {
    /// Connects to `addr` ("127.0.0.1:10809", `[::1]:10809`, "host:port",
    /// "unix:/path" or "/abs/path") and opens `export_name` ("" = the
    /// server's default export) with the fixed newstyle handshake.
    pub async fn connect(addr: &str, export_name: &str) -> Result<NbdClient, NbdClientError> {
        if export_name.len() > EXPORT_NAME_LEN_MAX_BYTES {
            return Err(NbdClientError::InvalidExportName {
                len_bytes: export_name.len(),
                reason: "longer than the 4096 bytes the NBD protocol allows",
            });
        }
        if export_name.contains('\0') {
            return Err(NbdClientError::InvalidExportName {
                len_bytes: export_name.len(),
                reason: "contains a NUL character",
            });
        }
        let target = parse_addr(addr)?;
        let setup = async {
            match target {
                Target::Tcp(host_port) => {
                    let mut stream = TcpStream::connect(host_port).await.map_err(|source| {
                        NbdClientError::Connect {
                            addr: addr.to_string(),
                            source,
                        }
                    })?;
                    // Requests are small and latency-bound; never wait for Nagle.
                    stream
                        .set_nodelay(true)
                        .map_err(|source| NbdClientError::Connect {
                            addr: addr.to_string(),
                            source,
                        })?;
                    let info = handshake(&mut stream, addr, export_name).await?;
                    let (r, w) = stream.into_split();
                    Ok::<_, NbdClientError>((info, Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
                }
                Target::Unix(path) => {
                    let mut stream = UnixStream::connect(path).await.map_err(|source| {
                        NbdClientError::Connect {
                            addr: addr.to_string(),
                            source,
                        }
                    })?;
                    let info = handshake(&mut stream, addr, export_name).await?;
                    let (r, w) = stream.into_split();
                    Ok((info, Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
                }
            }
        };
        let (info, read, write) =
            tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), setup)
                .await
                .map_err(|_| NbdClientError::HandshakeTimeout {
                    addr: addr.to_string(),
                    timeout_ms: HANDSHAKE_TIMEOUT_MS,
                })??;
        tracing::debug!(
            addr,
            export_name,
            size_bytes = info.size_bytes,
            transmission_flags = info.transmission_flags,
            block_sizes = ?info.block_sizes,
            "nbd client connected"
        );

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
        let reader = tokio::spawn(reader_task(read, shared.clone()));
        Ok(NbdClient {
            inner: Arc::new(Inner {
                info,
                export_name: export_name.to_string(),
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
        self.inner.info.size_bytes
    }

    /// Transmission flags (`NBD_FLAG_*` constants of this module).
    pub fn transmission_flags(&self) -> u16 {
        self.inner.info.transmission_flags
    }

    /// Preferred block size, if the server advertised block sizes.
    pub fn block_size_preferred(&self) -> Option<u32> {
        self.inner.info.block_sizes.map(|s| s.preferred_bytes)
    }

    /// All advertised block size constraints, if any.
    pub fn block_sizes(&self) -> Option<BlockSizes> {
        self.inner.info.block_sizes
    }

    /// The export name this connection opened.
    pub fn export_name(&self) -> &str {
        &self.inner.export_name
    }

    /// Reads `len` bytes at `offset`; the result is exactly `len` bytes.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdClientError> {
        self.check_range("read", offset, len, true)?;
        let data = self
            .submit("read", CMD_READ, 0, offset, len, None, len)
            .await?;
        // The reader task reads exactly `len` bytes for a successful read.
        Ok(data.expect("a successful read reply carries its payload"))
    }

    /// Writes `data` at `offset`; with `fua` the server persists it before
    /// replying (needs `NBD_FLAG_SEND_FUA`).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdClientError> {
        let len = u32::try_from(data.len()).map_err(|_| NbdClientError::InvalidRequest {
            op: "write",
            offset,
            len_bytes: data.len() as u64,
            reason: "longer than the 32-bit NBD length field".to_string(),
        })?;
        self.check_writable("write")?;
        let flags = self.fua_flag("write", fua)?;
        self.check_range("write", offset, len, true)?;
        self.submit("write", CMD_WRITE, flags, offset, len, Some(data), 0)
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
        self.check_writable("write_zeroes")?;
        self.check_flag(
            "write_zeroes",
            NBD_FLAG_SEND_WRITE_ZEROES,
            "NBD_FLAG_SEND_WRITE_ZEROES",
        )?;
        let flags = self.fua_flag("write_zeroes", fua)?;
        self.check_range("write_zeroes", offset, len, false)?;
        self.submit(
            "write_zeroes",
            CMD_WRITE_ZEROES,
            flags,
            offset,
            len,
            None,
            0,
        )
        .await?;
        Ok(())
    }

    /// Tells the server that `len` bytes at `offset` are no longer needed.
    /// What they read as afterwards is up to the server.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdClientError> {
        self.check_writable("trim")?;
        self.check_flag("trim", NBD_FLAG_SEND_TRIM, "NBD_FLAG_SEND_TRIM")?;
        self.check_range("trim", offset, len, false)?;
        self.submit("trim", CMD_TRIM, 0, offset, len, None, 0)
            .await?;
        Ok(())
    }

    /// Makes every write the server has already acknowledged durable.
    pub async fn flush(&self) -> Result<(), NbdClientError> {
        self.check_flag("flush", NBD_FLAG_SEND_FLUSH, "NBD_FLAG_SEND_FLUSH")?;
        self.submit("flush", CMD_FLUSH, 0, 0, 0, None, 0).await?;
        Ok(())
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
        let header = encode_request(0, CMD_DISC, 0, 0, 0);
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
        Ok(CMD_FLAG_FUA)
    }

    /// Client-side checks: length non-zero, no u64 overflow, alignment to
    /// the advertised minimum block size (we asked for block sizes, so we
    /// promised to honour them), and payload-carrying requests within the
    /// maximum. The export size is deliberately not checked: the server
    /// answers out-of-range requests with an error.
    fn check_range(
        &self,
        op: &'static str,
        offset: u64,
        len_bytes: u32,
        carries_payload: bool,
    ) -> Result<(), NbdClientError> {
        let invalid = |reason: String| NbdClientError::InvalidRequest {
            op,
            offset,
            len_bytes: u64::from(len_bytes),
            reason,
        };
        if len_bytes == 0 {
            return Err(invalid(
                "zero-length requests are unspecified in NBD".to_string(),
            ));
        }
        if offset.checked_add(u64::from(len_bytes)).is_none() {
            return Err(invalid("offset + length overflows 64 bits".to_string()));
        }
        let sizes = self.inner.info.block_sizes;
        if let Some(sizes) = sizes {
            let minimum = u64::from(sizes.minimum_bytes);
            if !offset.is_multiple_of(minimum) || !u64::from(len_bytes).is_multiple_of(minimum) {
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
            if len_bytes > maximum {
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
        command: u16,
        flags: u16,
        offset: u64,
        len_bytes: u32,
        payload: Option<Bytes>,
        reply_payload_len_bytes: u32,
    ) -> Result<Option<Bytes>, NbdClientError> {
        let inner = &self.inner;
        let permit = inner.inflight.clone().acquire_owned().await.map_err(|_| {
            NbdClientError::ConnectionLost {
                op,
                offset,
                cause: Arc::new(NbdClientError::Disconnected),
            }
        })?;
        // Reserve the channel slot first: from here to `send` there is no
        // await, so a cancelled caller never leaves a pending entry behind
        // without its request being queued.
        let slot = inner
            .tx
            .reserve()
            .await
            .map_err(|_| self.lost(op, offset))?;
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
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
                    reply_payload_len_bytes,
                    reply: reply_tx,
                    _inflight: permit,
                },
            );
            assert!(
                previous.is_none(),
                "nbd cookie {cookie} reused while in flight"
            );
        }
        slot.send(Outbound::Request {
            header: encode_request(flags, command, cookie, offset, len_bytes),
            payload,
        });
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
    fn request_header_layout_matches_the_spec() {
        let h = encode_request(CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..6], &[0, 1]);
        assert_eq!(&h[6..8], &[0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&h[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&h[24..28], &[0, 0, 2, 0]);
    }

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
    fn block_size_validation_rejects_nonsense() {
        let ok = BlockSizes {
            minimum_bytes: 512,
            preferred_bytes: 4096,
            maximum_bytes: 32 * 1024 * 1024,
        };
        assert!(validate_block_sizes(ok).is_ok());
        assert!(
            validate_block_sizes(BlockSizes {
                minimum_bytes: 0,
                ..ok
            })
            .is_err()
        );
        assert!(
            validate_block_sizes(BlockSizes {
                minimum_bytes: 768,
                ..ok
            })
            .is_err()
        );
        assert!(
            validate_block_sizes(BlockSizes {
                preferred_bytes: 256,
                ..ok
            })
            .is_err()
        );
        assert!(
            validate_block_sizes(BlockSizes {
                maximum_bytes: 1000,
                ..ok
            })
            .is_err()
        );
    }

    #[test]
    fn server_error_message_names_the_errno() {
        let e = NbdClientError::Server {
            errno: 22,
            op: "read",
            offset: 4096,
        };
        assert_eq!(
            e.to_string(),
            "NBD server returned error 22 (EINVAL) for read at offset 4096"
        );
    }
}
