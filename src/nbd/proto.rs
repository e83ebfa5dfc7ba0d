//! The NBD wire format, once for both sides: constants, and pure encoders and
//! decoders of every message the handshake and the transmission phase carry.
//! No I/O and no state: [`super::negotiate`] holds the option-haggling state
//! machines, [`super::server`] and [`super::client`] are the async shells.
//!
//! All integers are big-endian ("network byte order"), as the NBD protocol
//! (`doc/proto.md` of the NetworkBlockDevice/nbd repository, with the
//! `EXTENDED_HEADERS` extension) fixes them.
//!
//! # Decoders are safe on untrusted bytes
//!
//! Every `decode_*` function is a pure function over a byte slice (or a
//! fixed-size array when the caller must read a fixed number of bytes first).
//! They never panic, never allocate more than a bounded multiple of their input,
//! check every length against the bytes actually present, reject trailing bytes,
//! and report what was wrong as a [`ProtoError`]. They are the entry points for
//! fuzz targets:
//!
//! | decoder | input | used by |
//! |---|---|---|
//! | [`decode_greeting`] | 18 bytes from the server | client |
//! | [`decode_option_header`] | 16 bytes: `IHAVEOPT`, option, length | server |
//! | [`decode_option`] | option code + its data | server |
//! | [`decode_option_reply_header`] | 20 bytes: magic, option, type, length | client |
//! | [`decode_option_reply`] | reply type + its data | client |
//! | [`decode_export_name_reply`] | 10 or 134 bytes after `NBD_OPT_EXPORT_NAME` | client |
//! | [`decode_request_header`] | 28 bytes (compact) | server |
//! | [`decode_extended_request_header`] | 32 bytes (extended) | server |
//! | [`reply_header_len`] + [`decode_reply_header`] | 16, 20 or 32 bytes | client |
//! | [`decode_chunk`] | a structured/extended chunk's type + payload | client |
//!
//! # Layouts
//!
//! Handshake (fixed newstyle), server first:
//! ```text
//! S: 8  "NBDMAGIC" 0x4e42444d41474943, 8 "IHAVEOPT" 0x49484156454f5054,
//!    2  handshake flags (bit0 FIXED_NEWSTYLE, bit1 NO_ZEROES)
//! C: 4  client flags (bit0 C_FIXED_NEWSTYLE, bit1 C_NO_ZEROES)
//! C: 8  "IHAVEOPT", 4 option, 4 data length, data            (an option)
//! S: 8  0x0003e889045565a9, 4 option, 4 reply type, 4 length, data (a reply)
//! ```
//! `NBD_OPT_EXPORT_NAME` is answered by `8 size, 2 transmission flags` and 124
//! zero bytes unless `C_NO_ZEROES` was agreed.
//!
//! Requests (client → server):
//! ```text
//! compact  (28): 4 magic 0x25609513, 2 flags, 2 type, 8 cookie, 8 offset, 4 length
//! extended (32): 4 magic 0x21e41c71, 2 flags, 2 type, 8 cookie, 8 offset, 8 length
//! ```
//! A compact request carries `length` payload bytes for `NBD_CMD_WRITE` only; an
//! extended one carries `length` payload bytes exactly when its flags hold
//! `NBD_CMD_FLAG_PAYLOAD_LEN` (otherwise `length` is the effect length).
//!
//! Replies (server → client):
//! ```text
//! simple     (16): 4 magic 0x67446698, 4 error, 8 cookie [+ read data]
//! structured (20): 4 magic 0x668e33ef, 2 flags, 2 type, 8 cookie, 4 length, payload
//! extended   (32): 4 magic 0x6e8a278c, 2 flags, 2 type, 8 cookie, 8 offset, 8 length, payload
//! ```
//! Chunk payloads: `OFFSET_DATA` = 8 offset + data; `OFFSET_HOLE` = 8 offset +
//! 4 length; `BLOCK_STATUS` = 4 context id + n × (4 length, 4 flags);
//! `BLOCK_STATUS_EXT` = 4 context id + 4 count + n × (8 length, 8 flags);
//! `ERROR` = 4 error + 2 message length + message; `ERROR_OFFSET` = the same + 8 offset.

use std::fmt;

// ---------------------------------------------------------------- constants

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle handshake's second magic (`cliserv_magic`); refused by both sides.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply; its data is a message for a human.
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR_BIT + 10;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TFLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15 marks an error chunk.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

/// `base:allocation`: the extent is not allocated (a hole).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty (changed since the bitmap began).
pub const STATE_DIRTY: u32 = 1 << 0;

pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of the dirty-bitmap contexts (the qemu namespace, docs/interop/nbd.rst).
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
pub const EXTENDED_REPLY_HEADER_LEN: usize = 32;
/// Bytes of zero padding after the `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_ZEROES_LEN: usize = 124;

/// Longest string (export name, description, query, message) the spec allows.
pub const STRING_MAX_BYTES: usize = 4096;
/// Largest option payload a server reads into memory. The largest legitimate
/// option is `NBD_OPT_SET_META_CONTEXT`/`NBD_OPT_GO`: a name (≤ 4096 bytes) and a
/// few queries or info requests; 8 KiB leaves room for a handful of each.
pub const OPTION_DATA_MAX_BYTES: u32 = 8 * 1024;
/// Largest option reply a client reads into memory: strings are ≤ 4096 bytes
/// and the fixed records are tiny, so 64 KiB is generous.
pub const OPTION_REPLY_DATA_MAX_BYTES: u32 = 64 * 1024;
/// Block status descriptors per chunk: the spec asks servers for at most 2^20;
/// we send at most 2^16 (a 512 KiB chunk), and clients ask again from where
/// the answer ended.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 1 << 16;

/// NBD error values (the `error` field of a reply), fixed by the spec; they
/// happen to equal the Linux errno numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdErrno {
    /// The usual name, for messages (`EPERM`, ...).
    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::Perm => "EPERM",
            NbdErrno::Io => "EIO",
            NbdErrno::NoMem => "ENOMEM",
            NbdErrno::Inval => "EINVAL",
            NbdErrno::NoSpc => "ENOSPC",
            NbdErrno::Overflow => "EOVERFLOW",
            NbdErrno::NotSup => "ENOTSUP",
            NbdErrno::Shutdown => "ESHUTDOWN",
        }
    }

    /// The name of any error value a server may send (clients treat unknown
    /// values as EINVAL, as the spec asks, but name them as they came).
    pub fn name_of(value: u32) -> &'static str {
        match value {
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

    /// Map a backend error to the NBD error the client should see. The raw OS
    /// error wins when there is one (it is the most precise); otherwise the kind.
    pub fn from_io(err: &std::io::Error) -> NbdErrno {
        use std::io::ErrorKind as K;
        if let Some(code) = err.raw_os_error() {
            match code {
                libc::EPERM | libc::EACCES | libc::EROFS => return NbdErrno::Perm,
                libc::EIO => return NbdErrno::Io,
                libc::ENOMEM => return NbdErrno::NoMem,
                libc::EINVAL => return NbdErrno::Inval,
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => return NbdErrno::NoSpc,
                libc::EOVERFLOW => return NbdErrno::Overflow,
                libc::EOPNOTSUPP => return NbdErrno::NotSup,
                libc::ESHUTDOWN => return NbdErrno::Shutdown,
                _ => {}
            }
        }
        match err.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => NbdErrno::Perm,
            K::OutOfMemory => NbdErrno::NoMem,
            K::InvalidInput => NbdErrno::Inval,
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => NbdErrno::NoSpc,
            K::Unsupported => NbdErrno::NotSup,
            _ => NbdErrno::Io,
        }
    }
}

/// The name of an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "an unknown option",
    }
}

/// The name of an option reply type, for messages.
pub fn option_reply_name(reply_type: u32) -> &'static str {
    match reply_type {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "an unknown reply type",
    }
}

/// The name of a command, for messages.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "an unknown command",
    }
}

// ---------------------------------------------------------------- errors

/// Why bytes did not decode. `what` names the message being decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("{what}: magic {got:#x}, expected {expected:#x}")]
    BadMagic {
        what: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("{what}: {need} bytes needed, {got} present")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("{what}: {extra} unexpected bytes after the last field")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what}: {len} bytes, the limit is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "the server speaks the oldstyle handshake, which is not supported; configure it for newstyle"
    )]
    Oldstyle,
    #[error("{what}: {reason}")]
    Invalid {
        what: &'static str,
        reason: &'static str,
    },
}

fn invalid(what: &'static str, reason: &'static str) -> ProtoError {
    ProtoError::Invalid { what, reason }
}

/// A bounds-checked big-endian reader over a byte slice.
struct Cursor<'a> {
    bytes: &'a [u8],
    what: &'static str,
    total: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Cursor<'a> {
        Cursor {
            bytes,
            what,
            total: bytes.len(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.bytes.len() < n {
            return Err(ProtoError::Truncated {
                what: self.what,
                need: self.total - self.bytes.len() + n,
                got: self.total,
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes, at most [`STRING_MAX_BYTES`].
    fn string(&mut self, len: u32) -> Result<&'a [u8], ProtoError> {
        let len = len as usize;
        if len > STRING_MAX_BYTES {
            return Err(ProtoError::TooLong {
                what: self.what,
                len,
                max: STRING_MAX_BYTES,
            });
        }
        self.take(len)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn finish(self) -> Result<(), ProtoError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes {
                what: self.what,
                extra: self.bytes.len(),
            })
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// A length that the caller has bounded (strings ≤ 4096 bytes, payloads ≤ 4 GiB).
fn len32(len: usize) -> u32 {
    u32::try_from(len).expect("length bounded by the caller to 32 bits")
}

// ---------------------------------------------------------------- handshake

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Decode the server's greeting; returns the handshake flags. An oldstyle
/// server (whose second magic is [`OLDSTYLE_MAGIC`]) is an error.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, ProtoError> {
    let mut c = Cursor::new(b, "server greeting");
    let magic = c.u64()?;
    if magic != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "server greeting",
            expected: NBDMAGIC,
            got: magic,
        });
    }
    let style = c.u64()?;
    if style == OLDSTYLE_MAGIC {
        return Err(ProtoError::Oldstyle);
    }
    if style != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "newstyle greeting",
            expected: IHAVEOPT,
            got: style,
        });
    }
    c.u16()
}

// ---------------------------------------------------------------- options

/// An option header as sent by the client (the data follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Decode `IHAVEOPT, option, length`.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let mut c = Cursor::new(b, "option header");
    let magic = c.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option header",
            expected: IHAVEOPT,
            got: magic,
        });
    }
    Ok(OptionHeader {
        option: c.u32()?,
        len: c.u32()?,
    })
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`:
/// `4 name length, name, 2 number of info requests, 2 × n info requests`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub infos: Vec<u16>,
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
/// `4 name length, name, 4 number of queries, n × (4 length, query)`.
/// Queries are UTF-8 strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub name: &'a [u8],
    pub queries: Vec<&'a str>,
}

/// An option as the server understands it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption<'a> {
    ExportName(&'a [u8]),
    /// Any data is ignored, as the spec asks.
    Abort,
    List,
    StartTls,
    Info(InfoRequest<'a>),
    Go(InfoRequest<'a>),
    StructuredReply,
    ListMetaContext(MetaContextRequest<'a>),
    SetMetaContext(MetaContextRequest<'a>),
    ExtendedHeaders,
    /// An option this implementation does not know (answered `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

impl ClientOption<'_> {
    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::StartTls => OPT_STARTTLS,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            ClientOption::Unknown(code) => *code,
        }
    }
}

/// Decode an option's data. `data` is the whole payload the option header
/// announced. Errors mean the payload is malformed for that option (the
/// server answers `NBD_REP_ERR_INVALID` and carries on).
pub fn decode_option(option: u32, data: &[u8]) -> Result<ClientOption<'_>, ProtoError> {
    let empty = |opt: ClientOption<'static>, what: &'static str| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(invalid(what, "this option takes no data"))
        }
    };
    match option {
        OPT_EXPORT_NAME => {
            if data.len() > STRING_MAX_BYTES {
                return Err(ProtoError::TooLong {
                    what: "NBD_OPT_EXPORT_NAME",
                    len: data.len(),
                    max: STRING_MAX_BYTES,
                });
            }
            Ok(ClientOption::ExportName(data))
        }
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => empty(ClientOption::List, "NBD_OPT_LIST"),
        OPT_STARTTLS => empty(ClientOption::StartTls, "NBD_OPT_STARTTLS"),
        OPT_STRUCTURED_REPLY => empty(ClientOption::StructuredReply, "NBD_OPT_STRUCTURED_REPLY"),
        OPT_EXTENDED_HEADERS => empty(ClientOption::ExtendedHeaders, "NBD_OPT_EXTENDED_HEADERS"),
        OPT_INFO | OPT_GO => {
            let what = option_name(option);
            let mut c = Cursor::new(data, what);
            let name_len = c.u32()?;
            let name = c.string(name_len)?;
            let count = c.u16()? as usize;
            if c.remaining() != count * 2 {
                return Err(invalid(
                    what,
                    "the number of information requests does not match the data length",
                ));
            }
            let infos = (0..count).map(|_| c.u16()).collect::<Result<Vec<_>, _>>()?;
            c.finish()?;
            let request = InfoRequest { name, infos };
            Ok(if option == OPT_INFO {
                ClientOption::Info(request)
            } else {
                ClientOption::Go(request)
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let what = option_name(option);
            let mut c = Cursor::new(data, what);
            let name_len = c.u32()?;
            let name = c.string(name_len)?;
            let count = c.u32()? as usize;
            // Each query takes at least its 4-byte length: a count the data cannot
            // hold is refused before anything is allocated for it.
            if count > c.remaining() / 4 {
                return Err(invalid(what, "more queries announced than the data holds"));
            }
            let mut queries = Vec::with_capacity(count);
            for _ in 0..count {
                let len = c.u32()?;
                let query = c.string(len)?;
                let query = std::str::from_utf8(query)
                    .map_err(|_| invalid(what, "a query is not valid UTF-8"))?;
                queries.push(query);
            }
            c.finish()?;
            let request = MetaContextRequest { name, queries };
            Ok(if option == OPT_LIST_META_CONTEXT {
                ClientOption::ListMetaContext(request)
            } else {
                ClientOption::SetMetaContext(request)
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Encode an option as the client sends it: header and data.
///
/// Panics if a name or query is longer than [`STRING_MAX_BYTES`], or an info
/// request list longer than 65535 entries: callers check names first.
pub fn encode_option(out: &mut Vec<u8>, option: &ClientOption<'_>) {
    put_u64(out, IHAVEOPT);
    put_u32(out, option.code());
    let len_at = out.len();
    put_u32(out, 0);
    let start = out.len();
    match option {
        ClientOption::ExportName(name) => {
            assert!(name.len() <= STRING_MAX_BYTES, "export name too long");
            out.extend_from_slice(name);
        }
        ClientOption::Info(r) | ClientOption::Go(r) => {
            assert!(r.name.len() <= STRING_MAX_BYTES, "export name too long");
            put_u32(out, len32(r.name.len()));
            out.extend_from_slice(r.name);
            put_u16(
                out,
                u16::try_from(r.infos.len()).expect("at most 65535 info requests"),
            );
            for i in &r.infos {
                put_u16(out, *i);
            }
        }
        ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r) => {
            assert!(r.name.len() <= STRING_MAX_BYTES, "export name too long");
            put_u32(out, len32(r.name.len()));
            out.extend_from_slice(r.name);
            put_u32(out, len32(r.queries.len()));
            for q in &r.queries {
                assert!(q.len() <= STRING_MAX_BYTES, "meta context query too long");
                put_u32(out, len32(q.len()));
                out.extend_from_slice(q.as_bytes());
            }
        }
        ClientOption::Abort
        | ClientOption::List
        | ClientOption::StartTls
        | ClientOption::StructuredReply
        | ClientOption::ExtendedHeaders
        | ClientOption::Unknown(_) => {}
    }
    let len = len32(out.len() - start);
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

// ---------------------------------------------------------------- option replies

/// An option reply header (the data follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

/// Decode `0x0003e889045565a9, option, reply type, length`.
pub fn decode_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtoError> {
    let mut c = Cursor::new(b, "option reply header");
    let magic = c.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply header",
            expected: OPTION_REPLY_MAGIC,
            got: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: c.u32()?,
        reply_type: c.u32()?,
        len: c.u32()?,
    })
}

/// The payload of an `NBD_REP_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info<'a> {
    /// `NBD_INFO_EXPORT`: 8 size, 2 transmission flags.
    Export { size_bytes: u64, flags: u16 },
    /// `NBD_INFO_NAME`: the canonical export name.
    Name(&'a [u8]),
    /// `NBD_INFO_DESCRIPTION`.
    Description(&'a [u8]),
    /// `NBD_INFO_BLOCK_SIZE`: 4 minimum, 4 preferred, 4 maximum payload.
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An information type this implementation does not know (clients ignore it).
    Unknown { kind: u16, data: &'a [u8] },
}

/// An option reply as the client understands it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReply<'a> {
    Ack,
    /// `NBD_REP_SERVER`: 4 name length, name, description.
    Server {
        name: &'a [u8],
        description: &'a [u8],
    },
    Info(Info<'a>),
    /// `NBD_REP_META_CONTEXT`: 4 context id, name (UTF-8).
    MetaContext {
        id: u32,
        name: &'a str,
    },
    /// Any reply type with bit 31 set; the data is a message for a human.
    Error {
        reply_type: u32,
        message: &'a [u8],
    },
}

impl OptionReply<'_> {
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { .. } => REP_SERVER,
            OptionReply::Info(_) => REP_INFO,
            OptionReply::MetaContext { .. } => REP_META_CONTEXT,
            OptionReply::Error { reply_type, .. } => *reply_type,
        }
    }
}

/// Decode an option reply's data for `reply_type`. A non-error type this
/// implementation does not know is an error (the client cannot know whether
/// the option succeeded).
pub fn decode_option_reply(reply_type: u32, data: &[u8]) -> Result<OptionReply<'_>, ProtoError> {
    match reply_type {
        REP_ACK => {
            if !data.is_empty() {
                return Err(invalid("NBD_REP_ACK", "carries data"));
            }
            Ok(OptionReply::Ack)
        }
        REP_SERVER => {
            let mut c = Cursor::new(data, "NBD_REP_SERVER");
            let len = c.u32()?;
            let name = c.string(len)?;
            let description = c.rest();
            if description.len() > STRING_MAX_BYTES {
                return Err(ProtoError::TooLong {
                    what: "NBD_REP_SERVER description",
                    len: description.len(),
                    max: STRING_MAX_BYTES,
                });
            }
            Ok(OptionReply::Server { name, description })
        }
        REP_INFO => {
            let mut c = Cursor::new(data, "NBD_REP_INFO");
            let kind = c.u16()?;
            let info = match kind {
                INFO_EXPORT => {
                    let mut c = Cursor::new(c.rest(), "NBD_INFO_EXPORT");
                    let size_bytes = c.u64()?;
                    let flags = c.u16()?;
                    c.finish()?;
                    Info::Export { size_bytes, flags }
                }
                INFO_NAME | INFO_DESCRIPTION => {
                    let s = c.rest();
                    if s.len() > STRING_MAX_BYTES {
                        return Err(ProtoError::TooLong {
                            what: "NBD_REP_INFO string",
                            len: s.len(),
                            max: STRING_MAX_BYTES,
                        });
                    }
                    if kind == INFO_NAME {
                        Info::Name(s)
                    } else {
                        Info::Description(s)
                    }
                }
                INFO_BLOCK_SIZE => {
                    let mut c = Cursor::new(c.rest(), "NBD_INFO_BLOCK_SIZE");
                    let minimum = c.u32()?;
                    let preferred = c.u32()?;
                    let maximum = c.u32()?;
                    c.finish()?;
                    Info::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    }
                }
                kind => Info::Unknown {
                    kind,
                    data: c.rest(),
                },
            };
            Ok(OptionReply::Info(info))
        }
        REP_META_CONTEXT => {
            let mut c = Cursor::new(data, "NBD_REP_META_CONTEXT");
            let id = c.u32()?;
            let name = c.rest();
            if name.len() > STRING_MAX_BYTES {
                return Err(ProtoError::TooLong {
                    what: "NBD_REP_META_CONTEXT name",
                    len: name.len(),
                    max: STRING_MAX_BYTES,
                });
            }
            let name = std::str::from_utf8(name)
                .map_err(|_| invalid("NBD_REP_META_CONTEXT", "name is not valid UTF-8"))?;
            Ok(OptionReply::MetaContext { id, name })
        }
        t if t & REP_ERR_BIT != 0 => Ok(OptionReply::Error {
            reply_type: t,
            message: data,
        }),
        _ => Err(invalid("option reply", "unknown non-error reply type")),
    }
}

/// Encode one option reply (header and data).
///
/// Panics if a string is longer than [`STRING_MAX_BYTES`] (callers bound them).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: &OptionReply<'_>) {
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply.reply_type());
    let len_at = out.len();
    put_u32(out, 0);
    let start = out.len();
    let string = |out: &mut Vec<u8>, s: &[u8]| {
        assert!(s.len() <= STRING_MAX_BYTES, "option reply string too long");
        out.extend_from_slice(s);
    };
    match reply {
        OptionReply::Ack => {}
        OptionReply::Server { name, description } => {
            put_u32(out, len32(name.len()));
            string(out, name);
            string(out, description);
        }
        OptionReply::Info(info) => match info {
            Info::Export { size_bytes, flags } => {
                put_u16(out, INFO_EXPORT);
                put_u64(out, *size_bytes);
                put_u16(out, *flags);
            }
            Info::Name(s) => {
                put_u16(out, INFO_NAME);
                string(out, s);
            }
            Info::Description(s) => {
                put_u16(out, INFO_DESCRIPTION);
                string(out, s);
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                put_u16(out, INFO_BLOCK_SIZE);
                put_u32(out, *minimum);
                put_u32(out, *preferred);
                put_u32(out, *maximum);
            }
            Info::Unknown { kind, data } => {
                put_u16(out, *kind);
                string(out, data);
            }
        },
        OptionReply::MetaContext { id, name } => {
            put_u32(out, *id);
            string(out, name.as_bytes());
        }
        OptionReply::Error { message, .. } => string(out, message),
    }
    let len = len32(out.len() - start);
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// An error reply whose message is cut (at a UTF-8 boundary) to the string limit.
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & REP_ERR_BIT != 0, "not an error reply type");
    encode_option_reply(
        out,
        option,
        &OptionReply::Error {
            reply_type,
            message: truncate_utf8(message, STRING_MAX_BYTES).as_bytes(),
        },
    );
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeroes unless
/// `no_zeroes`.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size_bytes: u64, flags: u16, no_zeroes: bool) {
    put_u64(out, size_bytes);
    put_u16(out, flags);
    if !no_zeroes {
        out.resize(out.len() + EXPORT_NAME_ZEROES_LEN, 0);
    }
}

/// Decode the reply to `NBD_OPT_EXPORT_NAME` (10 bytes, or 134 with the
/// zeroes): `(size, transmission flags)`.
pub fn decode_export_name_reply(b: &[u8]) -> Result<(u64, u16), ProtoError> {
    let what = "NBD_OPT_EXPORT_NAME reply";
    if b.len() != 10 && b.len() != 10 + EXPORT_NAME_ZEROES_LEN {
        return Err(invalid(what, "must be 10 or 134 bytes"));
    }
    let mut c = Cursor::new(b, what);
    let size = c.u64()?;
    let flags = c.u16()?;
    Ok((size, flags))
}

// ---------------------------------------------------------------- requests

/// Which request and reply headers the transmission phase uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderStyle {
    /// 28-byte requests, 32-bit lengths; simple or structured replies.
    Compact,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests and replies, 64-bit lengths.
    Extended,
}

impl HeaderStyle {
    pub fn request_len(self) -> usize {
        match self {
            HeaderStyle::Compact => COMPACT_REQUEST_LEN,
            HeaderStyle::Extended => EXTENDED_REQUEST_LEN,
        }
    }
}

/// A request header, either style (a compact length fits 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

impl Request {
    /// Payload bytes following this header on the wire.
    ///
    /// Under extended headers the spec says a write MUST carry
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`, but qemu's client (10.0) sends extended writes
    /// without it; its server, like this one, takes a write's length as its
    /// payload length either way. Any other command has a payload only with the flag.
    pub fn payload_len(&self, style: HeaderStyle) -> u64 {
        match style {
            _ if self.kind == CMD_WRITE => self.len,
            HeaderStyle::Compact => 0,
            HeaderStyle::Extended if self.flags & CMD_FLAG_PAYLOAD_LEN != 0 => self.len,
            HeaderStyle::Extended => 0,
        }
    }
}

/// Decode a compact (28-byte) request header. A wrong magic means the stream
/// cannot be resynchronised (the connection must close).
pub fn decode_request_header(b: &[u8; COMPACT_REQUEST_LEN]) -> Result<Request, ProtoError> {
    let mut c = Cursor::new(b, "request header");
    let magic = c.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request header",
            expected: u64::from(REQUEST_MAGIC),
            got: u64::from(magic),
        });
    }
    Ok(Request {
        flags: c.u16()?,
        kind: c.u16()?,
        cookie: c.u64()?,
        offset: c.u64()?,
        len: u64::from(c.u32()?),
    })
}

/// Decode an extended (32-byte) request header.
pub fn decode_extended_request_header(
    b: &[u8; EXTENDED_REQUEST_LEN],
) -> Result<Request, ProtoError> {
    let mut c = Cursor::new(b, "extended request header");
    let magic = c.u32()?;
    if magic != EXTENDED_REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "extended request header",
            expected: u64::from(EXTENDED_REQUEST_MAGIC),
            got: u64::from(magic),
        });
    }
    Ok(Request {
        flags: c.u16()?,
        kind: c.u16()?,
        cookie: c.u64()?,
        offset: c.u64()?,
        len: c.u64()?,
    })
}

/// Encode a request header in `style` into `out` (cleared first). A compact
/// header cannot carry a length above 32 bits: that is an error.
pub fn encode_request_header(
    style: HeaderStyle,
    r: &Request,
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    out.clear();
    match style {
        HeaderStyle::Compact => {
            let len = u32::try_from(r.len).map_err(|_| {
                invalid(
                    "request header",
                    "length above 32 bits needs extended headers",
                )
            })?;
            put_u32(out, REQUEST_MAGIC);
            put_u16(out, r.flags);
            put_u16(out, r.kind);
            put_u64(out, r.cookie);
            put_u64(out, r.offset);
            put_u32(out, len);
        }
        HeaderStyle::Extended => {
            put_u32(out, EXTENDED_REQUEST_MAGIC);
            put_u16(out, r.flags);
            put_u16(out, r.kind);
            put_u64(out, r.cookie);
            put_u64(out, r.offset);
            put_u64(out, r.len);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- replies

/// How the server frames replies: simple only, structured chunks, or extended chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyStyle {
    Simple,
    Structured,
    Extended,
}

/// A structured or extended reply chunk header. `offset` exists only in the
/// extended form (it echoes the request's offset); it is 0 for structured chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

/// A decoded reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { errno: u32, cookie: u64 },
    Structured(ChunkHeader),
    Extended(ChunkHeader),
}

/// Encode a simple reply header.
pub fn encode_simple_reply(errno: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Append a chunk header: 20 bytes for [`ReplyStyle::Structured`], 32 for
/// [`ReplyStyle::Extended`]. A structured chunk's length must fit 32 bits.
///
/// Panics for [`ReplyStyle::Simple`] or an oversized structured length: the
/// server never builds either (payloads are bounded far below 4 GiB).
pub fn encode_chunk_header(out: &mut Vec<u8>, style: ReplyStyle, h: &ChunkHeader) {
    match style {
        ReplyStyle::Simple => panic!("a simple reply has no chunk header"),
        ReplyStyle::Structured => {
            put_u32(out, STRUCTURED_REPLY_MAGIC);
            put_u16(out, h.flags);
            put_u16(out, h.kind);
            put_u64(out, h.cookie);
            put_u32(
                out,
                u32::try_from(h.len).expect("structured chunk length fits 32 bits"),
            );
        }
        ReplyStyle::Extended => {
            put_u32(out, EXTENDED_REPLY_MAGIC);
            put_u16(out, h.flags);
            put_u16(out, h.kind);
            put_u64(out, h.cookie);
            put_u64(out, h.offset);
            put_u64(out, h.len);
        }
    }
}

/// Length of the reply header that starts with `magic` (its first 4 bytes),
/// or `None` for a magic that starts no reply.
pub fn reply_header_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_HEADER_LEN),
        EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_HEADER_LEN),
        _ => None,
    }
}

/// Decode a whole reply header (16, 20 or 32 bytes, per its magic).
pub fn decode_reply_header(b: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let mut c = Cursor::new(b, "reply header");
    let magic = c.u32()?;
    let Some(len) = reply_header_len(magic) else {
        return Err(ProtoError::BadMagic {
            what: "reply header",
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            got: u64::from(magic),
        });
    };
    if b.len() != len {
        return Err(ProtoError::Truncated {
            what: "reply header",
            need: len,
            got: b.len(),
        });
    }
    let header = match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            errno: c.u32()?,
            cookie: c.u64()?,
        },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Structured(ChunkHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: 0,
            len: u64::from(c.u32()?),
        }),
        _ => ReplyHeader::Extended(ChunkHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u64()?,
        }),
    };
    c.finish()?;
    Ok(header)
}

/// One block status descriptor: `len` bytes with `flags` (the context's meaning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatusExtent {
    pub len: u64,
    pub flags: u64,
}

/// A decoded chunk payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    OffsetHole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context_id: u32,
        extents: Vec<BlockStatusExtent>,
    },
    /// `NBD_REPLY_TYPE_ERROR` (offset `None`), `NBD_REPLY_TYPE_ERROR_OFFSET`, or
    /// any other type with bit 15 set (its fields after the message ignored).
    Error {
        errno: u32,
        message: &'a [u8],
        offset: Option<u64>,
    },
}

/// Decode a chunk's payload. `style` tells which block status form is legal.
pub fn decode_chunk(style: ReplyStyle, kind: u16, payload: &[u8]) -> Result<Chunk<'_>, ProtoError> {
    match kind {
        REPLY_TYPE_NONE => {
            if !payload.is_empty() {
                return Err(invalid("NBD_REPLY_TYPE_NONE", "carries a payload"));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            let mut c = Cursor::new(payload, "NBD_REPLY_TYPE_OFFSET_DATA");
            let offset = c.u64()?;
            let data = c.rest();
            if data.is_empty() {
                return Err(invalid("NBD_REPLY_TYPE_OFFSET_DATA", "carries no data"));
            }
            Ok(Chunk::OffsetData { offset, data })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let mut c = Cursor::new(payload, "NBD_REPLY_TYPE_OFFSET_HOLE");
            let offset = c.u64()?;
            let len = c.u32()?;
            c.finish()?;
            if len == 0 {
                return Err(invalid("NBD_REPLY_TYPE_OFFSET_HOLE", "zero-length hole"));
            }
            Ok(Chunk::OffsetHole { offset, len })
        }
        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
            let extended = kind == REPLY_TYPE_BLOCK_STATUS_EXT;
            let what = if extended {
                "NBD_REPLY_TYPE_BLOCK_STATUS_EXT"
            } else {
                "NBD_REPLY_TYPE_BLOCK_STATUS"
            };
            if extended != (style == ReplyStyle::Extended) {
                return Err(invalid(
                    what,
                    "this block status form does not match the negotiated headers",
                ));
            }
            let mut c = Cursor::new(payload, what);
            let context_id = c.u32()?;
            let (count, each) = if extended {
                (c.u32()? as usize, 16)
            } else {
                (c.remaining() / 8, 8)
            };
            if count == 0 || c.remaining() != count.saturating_mul(each) {
                return Err(invalid(what, "descriptor count does not match the length"));
            }
            let mut extents = Vec::with_capacity(count);
            for _ in 0..count {
                let (len, flags) = if extended {
                    (c.u64()?, c.u64()?)
                } else {
                    (u64::from(c.u32()?), u64::from(c.u32()?))
                };
                if len == 0 {
                    return Err(invalid(what, "zero-length descriptor"));
                }
                extents.push(BlockStatusExtent { len, flags });
            }
            c.finish()?;
            Ok(Chunk::BlockStatus {
                context_id,
                extents,
            })
        }
        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
            let mut c = Cursor::new(payload, "error chunk");
            let errno = c.u32()?;
            let message_len = c.u16()? as usize;
            let message = c.take(message_len)?;
            let offset = if k == REPLY_TYPE_ERROR_OFFSET {
                let o = c.u64()?;
                c.finish()?;
                Some(o)
            } else if k == REPLY_TYPE_ERROR {
                c.finish()?;
                None
            } else {
                // An unknown error type: its trailing fields are not ours to read.
                None
            };
            if errno == 0 {
                return Err(invalid("error chunk", "error value 0"));
            }
            Ok(Chunk::Error {
                errno,
                message,
                offset,
            })
        }
        _ => Err(invalid("reply chunk", "unknown chunk type")),
    }
}

/// The payload of an `NBD_REPLY_TYPE_ERROR` chunk (message cut to the string limit).
pub fn encode_error_chunk_payload(out: &mut Vec<u8>, errno: u32, message: &str) {
    let message = truncate_utf8(message, STRING_MAX_BYTES);
    put_u32(out, errno);
    put_u16(
        out,
        u16::try_from(message.len()).expect("message cut to 4096 bytes"),
    );
    out.extend_from_slice(message.as_bytes());
}

/// The payload of a block status chunk in `style` (compact: `BLOCK_STATUS` with
/// 32-bit lengths and flags, which the caller has bounded; extended:
/// `BLOCK_STATUS_EXT`). Returns the chunk type.
///
/// Panics on an empty extent list, or a compact extent above 32 bits.
pub fn encode_block_status_payload(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    context_id: u32,
    extents: &[BlockStatusExtent],
) -> u16 {
    assert!(!extents.is_empty(), "a block status chunk needs an extent");
    put_u32(out, context_id);
    if style == ReplyStyle::Extended {
        put_u32(out, len32(extents.len()));
        for e in extents {
            put_u64(out, e.len);
            put_u64(out, e.flags);
        }
        REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        for e in extents {
            put_u32(
                out,
                u32::try_from(e.len).expect("compact extent length bounded to 32 bits"),
            );
            put_u32(
                out,
                u32::try_from(e.flags).expect("compact extent flags bounded to 32 bits"),
            );
        }
        REPLY_TYPE_BLOCK_STATUS
    }
}

// ---------------------------------------------------------------- admission

/// Hard cap on a payload the server reads (a write, or a payload it must skip):
/// a longer one closes the connection (the spec allows that), so a hostile
/// length cannot make the server read gigabytes.
pub const PAYLOAD_DISCARD_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// What a request is checked against: the export and the negotiated session.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    pub size_bytes: u64,
    /// Largest read or write payload (the advertised maximum).
    pub max_payload_bytes: u32,
    pub read_only: bool,
    pub style: HeaderStyle,
    /// Structured replies or extended headers: `NBD_CMD_FLAG_DF` is valid.
    pub structured: bool,
    /// Metadata contexts selected; `NBD_CMD_BLOCK_STATUS` needs at least one.
    pub meta_contexts: usize,
    /// The backend zeroes quickly: `NBD_CMD_FLAG_FAST_ZERO` is served, otherwise
    /// refused with `NBD_ENOTSUP`.
    pub fast_zero: bool,
}

/// A request that passed every check and may be handed to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// The `len` payload bytes follow the header and must be read next.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

/// The decision on one request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Execute(Command),
    /// Reply with `errno`; first read and discard `discard_bytes` payload bytes.
    Reject {
        errno: NbdErrno,
        discard_bytes: u32,
        reason: &'static str,
    },
    /// `NBD_CMD_DISC`: stop reading, finish what is in flight, close.
    Disconnect,
    /// The request cannot be answered without reading an unbounded payload.
    Close(&'static str),
}

/// Check a request header against the export and the session. Nothing that
/// fails here reaches the backend, and only a payload the header announces
/// is ever skipped.
pub fn admit(r: &Request, limits: &RequestLimits) -> Admission {
    let payload = r.payload_len(limits.style);
    if payload > PAYLOAD_DISCARD_MAX_BYTES {
        // Checked first: whatever else is wrong, we cannot skip this payload.
        return Admission::Close("request payload longer than 64 MiB");
    }
    // Fits: bounded by the 64 MiB cap just checked.
    let payload = payload as u32;
    let reject = |errno, reason| Admission::Reject {
        errno,
        discard_bytes: payload,
        reason,
    };
    let in_range = r
        .offset
        .checked_add(r.len)
        .is_some_and(|end| end <= limits.size_bytes);
    let extended = limits.style == HeaderStyle::Extended;
    let payload_flag = if extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
    // Flags valid on every command: FUA (the spec says servers must accept it).
    let unknown = |allowed: u16| r.flags & !(allowed | CMD_FLAG_FUA) != 0;
    if r.kind != CMD_WRITE && r.kind != CMD_DISC && payload > 0 {
        // Extended headers only: a payload on a command that takes none (we do
        // not offer NBD_FLAG_BLOCK_STATUS_PAYLOAD). Skip it, then refuse.
        return reject(NbdErrno::Inval, "payload on a command that takes none");
    }
    match r.kind {
        CMD_READ => {
            let df = if limits.structured { CMD_FLAG_DF } else { 0 };
            if unknown(df) {
                reject(NbdErrno::Inval, "unsupported flags on NBD_CMD_READ")
            } else if r.len == 0 {
                reject(NbdErrno::Inval, "zero-length read")
            } else if r.len > u64::from(limits.max_payload_bytes) {
                reject(
                    NbdErrno::Overflow,
                    "read longer than the maximum payload size",
                )
            } else if !in_range {
                reject(NbdErrno::Inval, "read beyond the end of the export")
            } else {
                Admission::Execute(Command::Read {
                    offset: r.offset,
                    len: r.len as u32,
                })
            }
        }
        CMD_WRITE => {
            if unknown(payload_flag) {
                reject(NbdErrno::Inval, "unsupported flags on NBD_CMD_WRITE")
            } else if limits.read_only {
                reject(NbdErrno::Perm, "write to a read-only export")
            } else if r.len == 0 {
                reject(NbdErrno::Inval, "zero-length write")
            } else if r.len > u64::from(limits.max_payload_bytes) {
                reject(
                    NbdErrno::Inval,
                    "write longer than the maximum payload size",
                )
            } else if !in_range {
                reject(NbdErrno::NoSpc, "write beyond the end of the export")
            } else {
                Admission::Execute(Command::Write {
                    offset: r.offset,
                    len: r.len as u32,
                    fua: r.flags & CMD_FLAG_FUA != 0,
                })
            }
        }
        CMD_DISC => Admission::Disconnect,
        CMD_FLUSH => {
            if unknown(0) {
                reject(NbdErrno::Inval, "unsupported flags on NBD_CMD_FLUSH")
            } else if r.offset != 0 || r.len != 0 {
                reject(
                    NbdErrno::Inval,
                    "NBD_CMD_FLUSH with non-zero offset or length",
                )
            } else {
                Admission::Execute(Command::Flush)
            }
        }
        CMD_TRIM => {
            if unknown(0) {
                reject(NbdErrno::Inval, "unsupported flags on NBD_CMD_TRIM")
            } else if limits.read_only {
                reject(NbdErrno::Perm, "trim on a read-only export")
            } else if r.len == 0 {
                reject(NbdErrno::Inval, "zero-length trim")
            } else if !in_range {
                reject(NbdErrno::Inval, "trim beyond the end of the export")
            } else {
                // FUA on a trim is accepted and ignored: trimmed contents are
                // unspecified, so there is nothing to make durable.
                Admission::Execute(Command::Trim {
                    offset: r.offset,
                    len: r.len,
                })
            }
        }
        CMD_WRITE_ZEROES => {
            let fast = r.flags & CMD_FLAG_FAST_ZERO != 0;
            if unknown(CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) {
                reject(NbdErrno::Inval, "unsupported flags on NBD_CMD_WRITE_ZEROES")
            } else if limits.read_only {
                reject(NbdErrno::Perm, "write-zeroes on a read-only export")
            } else if r.len == 0 {
                reject(NbdErrno::Inval, "zero-length write-zeroes")
            } else if !in_range {
                reject(NbdErrno::NoSpc, "write-zeroes beyond the end of the export")
            } else if fast && !limits.fast_zero {
                // The spec: fail quickly, change nothing.
                reject(
                    NbdErrno::NotSup,
                    "fast zeroing is not faster than writing on this export",
                )
            } else {
                // NO_HOLE only forbids deallocating; the backend always writes zeroes.
                Admission::Execute(Command::WriteZeroes {
                    offset: r.offset,
                    len: r.len,
                    fua: r.flags & CMD_FLAG_FUA != 0,
                })
            }
        }
        CMD_CACHE => {
            if unknown(0) {
                reject(NbdErrno::Inval, "unsupported flags on NBD_CMD_CACHE")
            } else if r.len == 0 {
                reject(NbdErrno::Inval, "zero-length cache")
            } else if !in_range {
                reject(NbdErrno::Inval, "cache beyond the end of the export")
            } else {
                Admission::Execute(Command::Cache {
                    offset: r.offset,
                    len: r.len,
                })
            }
        }
        CMD_BLOCK_STATUS => {
            if unknown(CMD_FLAG_REQ_ONE) {
                reject(NbdErrno::Inval, "unsupported flags on NBD_CMD_BLOCK_STATUS")
            } else if limits.meta_contexts == 0 || !limits.structured {
                reject(
                    NbdErrno::Inval,
                    "NBD_CMD_BLOCK_STATUS without a metadata context selected",
                )
            } else if r.len == 0 {
                reject(NbdErrno::Inval, "zero-length block status")
            } else if !in_range {
                reject(NbdErrno::Inval, "block status beyond the end of the export")
            } else {
                Admission::Execute(Command::BlockStatus {
                    offset: r.offset,
                    len: r.len,
                    req_one: r.flags & CMD_FLAG_REQ_ONE != 0,
                })
            }
        }
        _ => reject(NbdErrno::Inval, "unknown command"),
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} flags {:#x} cookie {:#x} offset {} length {}",
            command_name(self.kind),
            self.flags,
            self.cookie,
            self.offset,
            self.len
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(kind: u16, flags: u16, offset: u64, len: u64) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    const LIMITS: RequestLimits = RequestLimits {
        size_bytes: 1 << 20,
        max_payload_bytes: 1 << 16,
        read_only: false,
        style: HeaderStyle::Compact,
        structured: false,
        meta_contexts: 0,
        fast_zero: true,
    };

    fn errno_of(a: Admission) -> (NbdErrno, u32) {
        match a {
            Admission::Reject {
                errno,
                discard_bytes,
                ..
            } => (errno, discard_bytes),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn request_headers_match_the_spec_byte_for_byte() {
        let mut out = Vec::new();
        let r = request(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let r = Request {
            cookie: 0x0102_0304_0506_0708,
            ..r
        };
        encode_request_header(HeaderStyle::Compact, &r, &mut out).unwrap();
        assert_eq!(
            out,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        let decoded = decode_request_header(out.as_slice().try_into().unwrap()).unwrap();
        assert_eq!(decoded, r);
        encode_request_header(HeaderStyle::Extended, &r, &mut out).unwrap();
        assert_eq!(out.len(), 32);
        assert_eq!(&out[..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(&out[24..], &[0, 0, 0, 0, 0, 0, 2, 0]);
        // A compact header cannot carry a 64-bit length.
        assert!(
            encode_request_header(
                HeaderStyle::Compact,
                &request(CMD_TRIM, 0, 0, 1 << 32),
                &mut out
            )
            .is_err()
        );
        let mut bad = [0u8; COMPACT_REQUEST_LEN];
        bad[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert!(matches!(
            decode_request_header(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn valid_requests_are_executed() {
        let end = LIMITS.size_bytes;
        assert_eq!(
            admit(&request(CMD_READ, CMD_FLAG_FUA, end - 512, 512), &LIMITS),
            Admission::Execute(Command::Read {
                offset: end - 512,
                len: 512
            })
        );
        assert_eq!(
            admit(&request(CMD_WRITE, CMD_FLAG_FUA, 3, 1 << 16), &LIMITS),
            Admission::Execute(Command::Write {
                offset: 3,
                len: 1 << 16,
                fua: true
            })
        );
        assert_eq!(
            admit(&request(CMD_FLUSH, 0, 0, 0), &LIMITS),
            Admission::Execute(Command::Flush)
        );
        // Trim, write-zeroes and cache carry no payload: the size limit does not apply.
        assert_eq!(
            admit(&request(CMD_TRIM, 0, 0, end), &LIMITS),
            Admission::Execute(Command::Trim {
                offset: 0,
                len: end
            })
        );
        assert_eq!(
            admit(
                &request(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FUA | CMD_FLAG_FAST_ZERO,
                    0,
                    1
                ),
                &LIMITS
            ),
            Admission::Execute(Command::WriteZeroes {
                offset: 0,
                len: 1,
                fua: true
            })
        );
        assert_eq!(
            admit(&request(CMD_CACHE, 0, 4096, end - 4096), &LIMITS),
            Admission::Execute(Command::Cache {
                offset: 4096,
                len: end - 4096
            })
        );
        assert_eq!(
            admit(&request(CMD_DISC, 0, 0, 0), &LIMITS),
            Admission::Disconnect
        );
        let structured = RequestLimits {
            structured: true,
            meta_contexts: 2,
            ..LIMITS
        };
        assert_eq!(
            admit(&request(CMD_READ, CMD_FLAG_DF, 0, 512), &structured),
            Admission::Execute(Command::Read {
                offset: 0,
                len: 512
            })
        );
        assert_eq!(
            admit(
                &request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, end),
                &structured
            ),
            Admission::Execute(Command::BlockStatus {
                offset: 0,
                len: end,
                req_one: true
            })
        );
    }

    #[test]
    fn out_of_range_and_malformed_requests_are_rejected() {
        let end = LIMITS.size_bytes;
        use NbdErrno::*;
        let cases = [
            (request(CMD_READ, 0, end, 1), (Inval, 0)),
            (request(CMD_READ, 0, end - 1, 2), (Inval, 0)),
            (request(CMD_READ, 0, u64::MAX, 1), (Inval, 0)),
            (request(CMD_READ, 0, 0, 0), (Inval, 0)),
            (request(CMD_READ, 0, 0, (1 << 16) + 1), (Overflow, 0)),
            (request(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), (Inval, 0)),
            // DF needs structured replies.
            (request(CMD_READ, CMD_FLAG_DF, 0, 512), (Inval, 0)),
            (request(CMD_WRITE, 0, end - 1, 2), (NoSpc, 2)),
            (request(CMD_WRITE, 0, u64::MAX - 1, 4), (NoSpc, 4)),
            (
                request(CMD_WRITE, 0, 0, (1 << 16) + 1),
                (Inval, (1 << 16) + 1),
            ),
            (request(CMD_WRITE, 1 << 7, 0, 512), (Inval, 512)),
            // PAYLOAD_LEN is an extended-headers flag.
            (
                request(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512),
                (Inval, 512),
            ),
            (request(CMD_WRITE, 0, 0, 0), (Inval, 0)),
            (request(CMD_FLUSH, 0, 1, 0), (Inval, 0)),
            (request(CMD_FLUSH, 0, 0, 1), (Inval, 0)),
            (request(CMD_TRIM, 0, end, 1), (Inval, 0)),
            (request(CMD_TRIM, 0, 0, 0), (Inval, 0)),
            (request(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 1), (Inval, 0)),
            (request(CMD_WRITE_ZEROES, 1 << 6, 0, 1), (Inval, 0)),
            (
                request(CMD_WRITE_ZEROES, 0, u64::MAX, u32::MAX.into()),
                (NoSpc, 0),
            ),
            (request(CMD_CACHE, 0, end - 1, 2), (Inval, 0)),
            (request(CMD_CACHE, CMD_FLAG_DF, 0, 1), (Inval, 0)),
            // No contexts negotiated.
            (request(CMD_BLOCK_STATUS, 0, 0, 512), (Inval, 0)),
            (request(8, 0, 0, 512), (Inval, 0)),
            (request(u16::MAX, 0, 0, 512), (Inval, 0)),
        ];
        for (r, want) in cases {
            assert_eq!(errno_of(admit(&r, &LIMITS)), want, "{r}");
        }
        let structured = RequestLimits {
            structured: true,
            meta_contexts: 1,
            ..LIMITS
        };
        for r in [
            request(CMD_BLOCK_STATUS, 0, end, 1),
            request(CMD_BLOCK_STATUS, 0, 0, 0),
            request(CMD_BLOCK_STATUS, 0, 1, end),
            request(CMD_BLOCK_STATUS, CMD_FLAG_DF, 0, 1),
        ] {
            assert_eq!(errno_of(admit(&r, &structured)), (Inval, 0), "{r}");
        }
        let slow = RequestLimits {
            fast_zero: false,
            ..LIMITS
        };
        assert_eq!(
            errno_of(admit(
                &request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512),
                &slow
            )),
            (NotSup, 0)
        );
        assert!(matches!(
            admit(&request(CMD_WRITE_ZEROES, 0, 0, 512), &slow),
            Admission::Execute(_)
        ));
    }

    #[test]
    fn extended_headers_carry_payloads_by_flag_and_64_bit_effect_lengths() {
        let ext = RequestLimits {
            style: HeaderStyle::Extended,
            structured: true,
            size_bytes: 1 << 40,
            ..LIMITS
        };
        // A write carries its length as payload, with PAYLOAD_LEN as the spec
        // asks or without it as qemu 10 sends it.
        assert!(matches!(
            admit(&request(CMD_WRITE, 0, 0, 512), &ext),
            Admission::Execute(Command::Write { len: 512, .. })
        ));
        assert!(matches!(
            admit(&request(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512), &ext),
            Admission::Execute(Command::Write { len: 512, .. })
        ));
        // A payload on a command that takes none is skipped, then refused.
        assert_eq!(
            errno_of(admit(
                &request(CMD_FLUSH, CMD_FLAG_PAYLOAD_LEN, 0, 100),
                &ext
            )),
            (NbdErrno::Inval, 100)
        );
        assert_eq!(
            errno_of(admit(
                &request(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 12),
                &ext
            )),
            (NbdErrno::Inval, 12)
        );
        // 64-bit effect lengths.
        assert_eq!(
            admit(&request(CMD_WRITE_ZEROES, 0, 0, 1 << 36), &ext),
            Admission::Execute(Command::WriteZeroes {
                offset: 0,
                len: 1 << 36,
                fua: false
            })
        );
        assert!(matches!(
            admit(&request(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 1 << 36), &ext),
            Admission::Close(_)
        ));
    }

    #[test]
    fn oversized_write_payload_closes_the_connection() {
        for len in [PAYLOAD_DISCARD_MAX_BYTES + 1, u64::from(u32::MAX)] {
            assert!(matches!(
                admit(&request(CMD_WRITE, 0, 0, len), &LIMITS),
                Admission::Close(_)
            ));
        }
    }

    #[test]
    fn read_only_export_refuses_writes_with_eperm() {
        let ro = RequestLimits {
            read_only: true,
            ..LIMITS
        };
        assert_eq!(
            errno_of(admit(&request(CMD_WRITE, 0, 0, 512), &ro)),
            (NbdErrno::Perm, 512)
        );
        assert_eq!(
            errno_of(admit(&request(CMD_TRIM, 0, 0, 512), &ro)),
            (NbdErrno::Perm, 0)
        );
        assert_eq!(
            errno_of(admit(&request(CMD_WRITE_ZEROES, 0, 0, 512), &ro)),
            (NbdErrno::Perm, 0)
        );
        assert!(matches!(
            admit(&request(CMD_READ, 0, 0, 512), &ro),
            Admission::Execute(_)
        ));
        assert!(matches!(
            admit(&request(CMD_CACHE, 0, 0, 512), &ro),
            Admission::Execute(_)
        ));
    }

    #[test]
    fn io_errors_map_to_nbd_errors() {
        use std::io;
        let os = |c| NbdErrno::from_io(&io::Error::from_raw_os_error(c));
        assert_eq!(os(libc::EROFS), NbdErrno::Perm);
        assert_eq!(os(libc::EDQUOT), NbdErrno::NoSpc);
        assert_eq!(os(libc::EFBIG), NbdErrno::NoSpc);
        assert_eq!(os(libc::EOPNOTSUPP), NbdErrno::NotSup);
        assert_eq!(os(libc::ESHUTDOWN), NbdErrno::Shutdown);
        assert_eq!(os(libc::ENOMEM), NbdErrno::NoMem);
        assert_eq!(os(libc::EOVERFLOW), NbdErrno::Overflow);
        assert_eq!(os(libc::ETIMEDOUT), NbdErrno::Io);
        let kind = |k| NbdErrno::from_io(&io::Error::new(k, "x"));
        assert_eq!(kind(io::ErrorKind::PermissionDenied), NbdErrno::Perm);
        assert_eq!(kind(io::ErrorKind::InvalidInput), NbdErrno::Inval);
        assert_eq!(kind(io::ErrorKind::StorageFull), NbdErrno::NoSpc);
        assert_eq!(kind(io::ErrorKind::Unsupported), NbdErrno::NotSup);
        assert_eq!(kind(io::ErrorKind::Other), NbdErrno::Io);
    }

    #[test]
    fn malformed_option_payloads_are_errors_not_panics() {
        let mut lying_count = vec![0, 0, 0, 4, b'v', b'o', b'l', b'0', 0, 1, 0];
        let cases: Vec<(u32, Vec<u8>)> = vec![
            (OPT_GO, vec![]),
            (OPT_GO, vec![0, 0, 0]),
            (OPT_GO, vec![0, 0, 0, 4, b'v']),
            (OPT_INFO, vec![0xff, 0xff, 0xff, 0xff, 0, 0]),
            (OPT_GO, {
                lying_count.push(3);
                lying_count.push(9);
                lying_count
            }),
            (OPT_LIST, vec![1]),
            (OPT_STARTTLS, vec![0]),
            (OPT_STRUCTURED_REPLY, vec![0]),
            (OPT_EXTENDED_HEADERS, vec![0]),
            // Meta contexts: a count the data cannot hold, a query running past the
            // end, invalid UTF-8, trailing bytes.
            (
                OPT_SET_META_CONTEXT,
                vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            ),
            (
                OPT_SET_META_CONTEXT,
                vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'b'],
            ),
            (
                OPT_LIST_META_CONTEXT,
                vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0xc3, 0x28],
            ),
            (OPT_LIST_META_CONTEXT, vec![0, 0, 0, 0, 0, 0, 0, 0, 1]),
            (OPT_EXPORT_NAME, vec![b'a'; 5000]),
        ];
        for (option, data) in cases {
            assert!(
                decode_option(option, &data).is_err(),
                "{} {data:?}",
                option_name(option)
            );
        }
        assert_eq!(
            decode_option(OPT_ABORT, b"junk").unwrap(),
            ClientOption::Abort
        );
        assert_eq!(
            decode_option(77, b"junk").unwrap(),
            ClientOption::Unknown(77)
        );
    }

    // ------------------------------------------------------------ round trips

    fn string(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn query() -> BoxedStrategy<String> {
        "[a-z]{1,6}:[a-z:-]{0,12}".boxed()
    }

    #[derive(Clone, Debug)]
    enum OwnedOption {
        ExportName(Vec<u8>),
        Abort,
        List,
        StartTls,
        Info(Vec<u8>, Vec<u16>),
        Go(Vec<u8>, Vec<u16>),
        Structured,
        ListMeta(Vec<u8>, Vec<String>),
        SetMeta(Vec<u8>, Vec<String>),
        Extended,
        Unknown(u32),
    }

    impl OwnedOption {
        fn borrow(&self) -> ClientOption<'_> {
            match self {
                OwnedOption::ExportName(n) => ClientOption::ExportName(n),
                OwnedOption::Abort => ClientOption::Abort,
                OwnedOption::List => ClientOption::List,
                OwnedOption::StartTls => ClientOption::StartTls,
                OwnedOption::Info(n, i) => ClientOption::Info(InfoRequest {
                    name: n,
                    infos: i.clone(),
                }),
                OwnedOption::Go(n, i) => ClientOption::Go(InfoRequest {
                    name: n,
                    infos: i.clone(),
                }),
                OwnedOption::Structured => ClientOption::StructuredReply,
                OwnedOption::ListMeta(n, q) => ClientOption::ListMetaContext(MetaContextRequest {
                    name: n,
                    queries: q.iter().map(String::as_str).collect(),
                }),
                OwnedOption::SetMeta(n, q) => ClientOption::SetMetaContext(MetaContextRequest {
                    name: n,
                    queries: q.iter().map(String::as_str).collect(),
                }),
                OwnedOption::Extended => ClientOption::ExtendedHeaders,
                OwnedOption::Unknown(c) => ClientOption::Unknown(*c),
            }
        }
    }

    fn any_option() -> impl Strategy<Value = OwnedOption> {
        let infos = proptest::collection::vec(any::<u16>(), 0..8);
        let queries = proptest::collection::vec(query(), 0..6);
        prop_oneof![
            string(300).prop_map(OwnedOption::ExportName),
            Just(OwnedOption::Abort),
            Just(OwnedOption::List),
            Just(OwnedOption::StartTls),
            (string(300), infos.clone()).prop_map(|(n, i)| OwnedOption::Info(n, i)),
            (string(300), infos).prop_map(|(n, i)| OwnedOption::Go(n, i)),
            Just(OwnedOption::Structured),
            (string(100), queries.clone()).prop_map(|(n, q)| OwnedOption::ListMeta(n, q)),
            (string(100), queries).prop_map(|(n, q)| OwnedOption::SetMeta(n, q)),
            Just(OwnedOption::Extended),
            (12u32..).prop_map(OwnedOption::Unknown),
        ]
    }

    #[derive(Clone, Debug)]
    enum OwnedReply {
        Ack,
        Server(Vec<u8>, Vec<u8>),
        Export(u64, u16),
        Name(Vec<u8>),
        Description(Vec<u8>),
        BlockSize(u32, u32, u32),
        UnknownInfo(u16, Vec<u8>),
        Meta(u32, String),
        Error(u32, Vec<u8>),
    }

    impl OwnedReply {
        fn borrow(&self) -> OptionReply<'_> {
            match self {
                OwnedReply::Ack => OptionReply::Ack,
                OwnedReply::Server(n, d) => OptionReply::Server {
                    name: n,
                    description: d,
                },
                OwnedReply::Export(s, f) => OptionReply::Info(Info::Export {
                    size_bytes: *s,
                    flags: *f,
                }),
                OwnedReply::Name(n) => OptionReply::Info(Info::Name(n)),
                OwnedReply::Description(d) => OptionReply::Info(Info::Description(d)),
                OwnedReply::BlockSize(a, b, c) => OptionReply::Info(Info::BlockSize {
                    minimum: *a,
                    preferred: *b,
                    maximum: *c,
                }),
                OwnedReply::UnknownInfo(k, d) => {
                    OptionReply::Info(Info::Unknown { kind: *k, data: d })
                }
                OwnedReply::Meta(id, n) => OptionReply::MetaContext { id: *id, name: n },
                OwnedReply::Error(t, m) => OptionReply::Error {
                    reply_type: *t,
                    message: m,
                },
            }
        }
    }

    fn any_reply() -> impl Strategy<Value = OwnedReply> {
        prop_oneof![
            Just(OwnedReply::Ack),
            (string(100), string(100)).prop_map(|(n, d)| OwnedReply::Server(n, d)),
            (any::<u64>(), any::<u16>()).prop_map(|(s, f)| OwnedReply::Export(s, f)),
            string(100).prop_map(OwnedReply::Name),
            string(100).prop_map(OwnedReply::Description),
            (any::<u32>(), any::<u32>(), any::<u32>())
                .prop_map(|(a, b, c)| OwnedReply::BlockSize(a, b, c)),
            (4u16.., string(50)).prop_map(|(k, d)| OwnedReply::UnknownInfo(k, d)),
            (any::<u32>(), query()).prop_map(|(i, n)| OwnedReply::Meta(i, n)),
            (REP_ERR_BIT.., string(100)).prop_map(|(t, m)| OwnedReply::Error(t, m)),
        ]
    }

    fn any_request(style: HeaderStyle) -> impl Strategy<Value = Request> {
        let len = match style {
            HeaderStyle::Compact => (0..=u64::from(u32::MAX)).boxed(),
            HeaderStyle::Extended => any::<u64>().boxed(),
        };
        (any::<u16>(), any::<u16>(), any::<u64>(), any::<u64>(), len).prop_map(
            |(flags, kind, cookie, offset, len)| Request {
                flags,
                kind,
                cookie,
                offset,
                len,
            },
        )
    }

    proptest! {
        #[test]
        fn options_round_trip(o in any_option()) {
            let mut bytes = Vec::new();
            encode_option(&mut bytes, &o.borrow());
            let h = decode_option_header(bytes[..OPTION_HEADER_LEN].try_into().unwrap()).unwrap();
            prop_assert_eq!(h.len as usize, bytes.len() - OPTION_HEADER_LEN);
            let data = &bytes[OPTION_HEADER_LEN..];
            let decoded = decode_option(h.option, data).unwrap();
            // ABORT ignores its data and EXPORT_NAME/Unknown keep theirs: all equal.
            prop_assert_eq!(decoded, o.borrow());
        }

        #[test]
        fn option_replies_round_trip(option in any::<u32>(), r in any_reply()) {
            let mut bytes = Vec::new();
            encode_option_reply(&mut bytes, option, &r.borrow());
            let h = decode_option_reply_header(bytes[..OPTION_REPLY_HEADER_LEN].try_into().unwrap()).unwrap();
            prop_assert_eq!(h.option, option);
            prop_assert_eq!(h.len as usize, bytes.len() - OPTION_REPLY_HEADER_LEN);
            let decoded = decode_option_reply(h.reply_type, &bytes[OPTION_REPLY_HEADER_LEN..]).unwrap();
            prop_assert_eq!(decoded, r.borrow());
        }

        #[test]
        fn compact_requests_round_trip(r in any_request(HeaderStyle::Compact)) {
            let mut bytes = Vec::new();
            encode_request_header(HeaderStyle::Compact, &r, &mut bytes).unwrap();
            prop_assert_eq!(decode_request_header(bytes.as_slice().try_into().unwrap()).unwrap(), r);
        }

        #[test]
        fn extended_requests_round_trip(r in any_request(HeaderStyle::Extended)) {
            let mut bytes = Vec::new();
            encode_request_header(HeaderStyle::Extended, &r, &mut bytes).unwrap();
            prop_assert_eq!(decode_extended_request_header(bytes.as_slice().try_into().unwrap()).unwrap(), r);
        }

        #[test]
        fn reply_headers_round_trip(
            extended in any::<bool>(),
            flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
            offset in any::<u64>(), len in 0u64..(1 << 32),
            errno in any::<u32>(),
        ) {
            let simple = encode_simple_reply(errno, cookie);
            prop_assert_eq!(decode_reply_header(&simple).unwrap(), ReplyHeader::Simple { errno, cookie });
            let style = if extended { ReplyStyle::Extended } else { ReplyStyle::Structured };
            let h = ChunkHeader { flags, kind, cookie, offset: if extended { offset } else { 0 }, len };
            let mut bytes = Vec::new();
            encode_chunk_header(&mut bytes, style, &h);
            let magic = u32::from_be_bytes(bytes[..4].try_into().unwrap());
            prop_assert_eq!(reply_header_len(magic), Some(bytes.len()));
            let want = if extended { ReplyHeader::Extended(h) } else { ReplyHeader::Structured(h) };
            prop_assert_eq!(decode_reply_header(&bytes).unwrap(), want);
        }

        #[test]
        fn block_status_chunks_round_trip(
            extended in any::<bool>(),
            context_id in any::<u32>(),
            extents in proptest::collection::vec((1u64..(1 << 32), 0u64..(1 << 32)), 1..40),
        ) {
            let style = if extended { ReplyStyle::Extended } else { ReplyStyle::Structured };
            let extents: Vec<BlockStatusExtent> = extents.into_iter().map(|(len, flags)| BlockStatusExtent { len, flags }).collect();
            let mut payload = Vec::new();
            let kind = encode_block_status_payload(&mut payload, style, context_id, &extents);
            prop_assert_eq!(decode_chunk(style, kind, &payload).unwrap(), Chunk::BlockStatus { context_id, extents });
            // The other header style's form is refused.
            let other = if extended { ReplyStyle::Structured } else { ReplyStyle::Extended };
            prop_assert!(decode_chunk(other, kind, &payload).is_err());
        }

        #[test]
        fn error_and_content_chunks_round_trip(errno in 1u32.., message in "[ -~]{0,200}", offset in any::<u64>(), data in string(64)) {
            let mut payload = Vec::new();
            encode_error_chunk_payload(&mut payload, errno, &message);
            prop_assert_eq!(
                decode_chunk(ReplyStyle::Structured, REPLY_TYPE_ERROR, &payload).unwrap(),
                Chunk::Error { errno, message: message.as_bytes(), offset: None }
            );
            let mut with_offset = payload.clone();
            with_offset.extend_from_slice(&offset.to_be_bytes());
            prop_assert_eq!(
                decode_chunk(ReplyStyle::Extended, REPLY_TYPE_ERROR_OFFSET, &with_offset).unwrap(),
                Chunk::Error { errno, message: message.as_bytes(), offset: Some(offset) }
            );
            let mut od = offset.to_be_bytes().to_vec();
            od.extend_from_slice(&data);
            let decoded = decode_chunk(ReplyStyle::Structured, REPLY_TYPE_OFFSET_DATA, &od);
            if data.is_empty() {
                prop_assert!(decoded.is_err());
            } else {
                prop_assert_eq!(decoded.unwrap(), Chunk::OffsetData { offset, data: &data });
            }
        }

        /// The decoders a fuzz target drives: any bytes give Ok or Err, never a panic.
        #[test]
        fn decoders_never_panic(
            option in prop_oneof![0u32..16, any::<u32>()],
            kind in prop_oneof![0u16..8, REPLY_TYPE_ERROR_BIT..REPLY_TYPE_ERROR_BIT + 4, any::<u16>()],
            extended in any::<bool>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let _ = decode_option(option, &bytes);
            let _ = decode_option_reply(option, &bytes);
            let style = if extended { ReplyStyle::Extended } else { ReplyStyle::Structured };
            let _ = decode_chunk(style, kind, &bytes);
            let _ = decode_reply_header(&bytes);
            let _ = decode_export_name_reply(&bytes);
            if bytes.len() >= 32 {
                let _ = decode_request_header(bytes[..28].try_into().unwrap());
                let _ = decode_extended_request_header(bytes[..32].try_into().unwrap());
                let _ = decode_option_header(bytes[..16].try_into().unwrap());
                let _ = decode_option_reply_header(bytes[..20].try_into().unwrap());
                let _ = decode_greeting(bytes[..18].try_into().unwrap());
            }
        }

        #[test]
        fn admitted_requests_are_in_range_and_within_limits(
            kind in prop_oneof![0u16..10, any::<u16>()],
            flags in any::<u16>(),
            offset in prop_oneof![0u64..(1 << 21), any::<u64>()],
            len in prop_oneof![0u64..(1 << 17), 0u64..=u64::from(u32::MAX), any::<u64>()],
            read_only in any::<bool>(),
            extended in any::<bool>(),
            contexts in 0usize..3,
        ) {
            let style = if extended { HeaderStyle::Extended } else { HeaderStyle::Compact };
            let len = if extended { len } else { len & u64::from(u32::MAX) };
            let limits = RequestLimits { read_only, style, structured: extended || contexts > 0, meta_contexts: contexts, ..LIMITS };
            let r = Request { flags, kind, cookie: 1, offset, len };
            let in_bounds = |off: u64, len: u64| {
                len > 0 && off.checked_add(len).is_some_and(|e| e <= limits.size_bytes)
            };
            match admit(&r, &limits) {
                Admission::Execute(Command::Read { offset, len }) => {
                    prop_assert!(in_bounds(offset, len.into()) && len <= limits.max_payload_bytes);
                }
                Admission::Execute(Command::Write { offset, len, .. }) => {
                    prop_assert!(!read_only);
                    prop_assert!(in_bounds(offset, len.into()) && len <= limits.max_payload_bytes);
                    prop_assert_eq!(u64::from(len), r.payload_len(style));
                }
                Admission::Execute(Command::Trim { offset, len })
                | Admission::Execute(Command::WriteZeroes { offset, len, .. }) => {
                    prop_assert!(!read_only && in_bounds(offset, len));
                }
                Admission::Execute(Command::Cache { offset, len }) => prop_assert!(in_bounds(offset, len)),
                Admission::Execute(Command::BlockStatus { offset, len, .. }) => {
                    prop_assert!(contexts > 0 && in_bounds(offset, len));
                }
                Admission::Execute(Command::Flush) => {
                    prop_assert!(r.offset == 0 && r.len == 0);
                }
                Admission::Reject { discard_bytes, .. } => {
                    // Only a payload the header announces is skipped, never beyond the cap.
                    prop_assert_eq!(u64::from(discard_bytes), r.payload_len(style));
                    prop_assert!(u64::from(discard_bytes) <= PAYLOAD_DISCARD_MAX_BYTES);
                }
                Admission::Disconnect => prop_assert_eq!(kind, CMD_DISC),
                Admission::Close(_) => {
                    prop_assert!(r.payload_len(style) > PAYLOAD_DISCARD_MAX_BYTES);
                }
            }
        }
    }
}
