//! The NBD wire protocol without I/O: constants, option negotiation decisions,
//! request admission and reply encoding. The async shell in `nbd.rs` reads bytes,
//! calls these functions and writes what they produce, so everything a client can
//! influence here is unit-tested against malformed input.
//!
//! All integers are big-endian ("network byte order").
//!
//! Handshake (fixed newstyle), server first:
//! ```text
//! S: 8  "NBDMAGIC"                 0x4e42444d41474943
//! S: 8  "IHAVEOPT"                 0x49484156454f5054
//! S: 2  handshake flags            FIXED_NEWSTYLE | NO_ZEROES
//! C: 4  client flags               C_FIXED_NEWSTYLE | C_NO_ZEROES (anything else: close)
//! then repeated options:
//! C: 8  "IHAVEOPT", 4 option, 4 data length, data
//! S: 8  0x0003e889045565a9, 4 option, 4 reply type, 4 data length, data
//! ```
//! `NBD_OPT_EXPORT_NAME` is answered instead by `8 size, 2 transmission flags`,
//! followed by 124 zero bytes unless the client set `C_NO_ZEROES`.
//!
//! Transmission: a request is a 28-byte header
//! `4 magic 0x25609513, 2 command flags, 2 type, 8 cookie, 8 offset, 4 length`,
//! followed by `length` payload bytes for `NBD_CMD_WRITE` only. A simple reply is
//! `4 magic 0x67446698, 4 error, 8 cookie`, followed by the data of a successful
//! `NBD_CMD_READ`. Structured replies are never negotiated.

use std::io;

use bytes::BufMut;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

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

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Length of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Largest option payload we read into memory. The largest legitimate option is
/// NBD_OPT_INFO/GO: 4 + name (at most 4096 bytes per the spec) + 2 + 2 per info
/// request; 8 KiB leaves room for a few thousand info requests.
pub const OPTION_DATA_MAX_BYTES: u32 = 8 * 1024;
/// Larger options, up to this size, are read and discarded so the client gets a
/// proper NBD_REP_ERR_TOO_BIG; beyond it the connection is closed (a client
/// sending megabytes of option data is not negotiating in good faith).
pub const OPTION_DISCARD_MAX_BYTES: u32 = 1024 * 1024;
/// Options a client may send before it must choose an export or leave.
pub const OPTIONS_PER_CONNECTION_MAX: u32 = 256;
/// Longest string (export name, description) the spec allows.
pub const STRING_MAX_BYTES: usize = 4096;
/// A write whose length exceeds the export's maximum request size, but not this,
/// has its payload read and discarded and gets EINVAL; a longer one closes the
/// connection, as the spec allows, so a hostile length cannot make us read 4 GiB.
pub const WRITE_DISCARD_MAX_BYTES: u32 = 64 * 1024 * 1024;

/// NBD error values (the `error` field of a reply). These are the values the
/// spec fixes, which happen to equal Linux errno numbers.
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
    /// Map a backend error to the NBD error the client should see. The raw OS
    /// error wins when there is one (it is the most precise); otherwise the kind.
    pub fn from_io(err: &io::Error) -> NbdErrno {
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
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NbdErrno::Perm,
            io::ErrorKind::OutOfMemory => NbdErrno::NoMem,
            io::ErrorKind::InvalidInput => NbdErrno::Inval,
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge => NbdErrno::NoSpc,
            io::ErrorKind::Unsupported => NbdErrno::NotSup,
            _ => NbdErrno::Io,
        }
    }
}

/// What the negotiation needs to know about the export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub block_size_min: u32,
    pub block_size_preferred: u32,
    pub max_request_bytes: u32,
}

impl ExportInfo {
    /// The empty name selects the default export, which is our only export.
    fn matches(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }
}

/// What the connection does after an option has been answered.
#[derive(Debug, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Keep negotiating.
    Continue,
    /// The reply is written; enter the transmission phase.
    Transmission,
    /// Write the reply (possibly empty) and close the connection.
    Close(&'static str),
}

/// Answer one option. `data` is the option payload, at most
/// [`OPTION_DATA_MAX_BYTES`] long (longer options never reach this function).
/// The bytes to send are appended to `out`.
pub fn answer_option(
    export: &ExportInfo,
    client_no_zeroes: bool,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> OptionOutcome {
    match option {
        OPT_EXPORT_NAME => {
            if !export.matches(data) {
                // The spec gives EXPORT_NAME no way to report an error.
                return OptionOutcome::Close("NBD_OPT_EXPORT_NAME named an unknown export");
            }
            out.put_u64(export.size_bytes);
            out.put_u16(export.transmission_flags);
            if !client_no_zeroes {
                out.put_bytes(0, 124);
            }
            OptionOutcome::Transmission
        }
        OPT_ABORT => {
            put_option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Close("client sent NBD_OPT_ABORT")
        }
        OPT_LIST => {
            if !data.is_empty() {
                put_option_error(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                return OptionOutcome::Continue;
            }
            let name = export.name.as_bytes();
            let desc = export.description.as_bytes();
            put_option_header(out, option, REP_SERVER, 4 + name.len() + desc.len());
            out.put_u32(name.len() as u32);
            out.put_slice(name);
            out.put_slice(desc);
            put_option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Continue
        }
        OPT_INFO | OPT_GO => {
            let request = match parse_info_request(data) {
                Ok(r) => r,
                Err(reason) => {
                    put_option_error(out, option, REP_ERR_INVALID, reason);
                    return OptionOutcome::Continue;
                }
            };
            if !export.matches(request.name) {
                let shown = String::from_utf8_lossy(&request.name[..request.name.len().min(256)]);
                let msg = format!(
                    "no export named '{shown}'; this server exports '{}' (or use the empty name)",
                    export.name
                );
                put_option_error(out, option, REP_ERR_UNKNOWN, &msg);
                return OptionOutcome::Continue;
            }
            let mut export_info = [0u8; 12];
            export_info[..8].copy_from_slice(&export.size_bytes.to_be_bytes());
            export_info[8..10].copy_from_slice(&export.transmission_flags.to_be_bytes());
            put_info(out, option, INFO_EXPORT, &export_info[..10]);
            let (mut name, mut desc, mut block) = (false, false, false);
            for info in request.info_requests() {
                match info {
                    INFO_NAME if !name => {
                        name = true;
                        put_info(out, option, INFO_NAME, export.name.as_bytes());
                    }
                    INFO_DESCRIPTION if !desc => {
                        desc = true;
                        put_info(out, option, INFO_DESCRIPTION, export.description.as_bytes());
                    }
                    INFO_BLOCK_SIZE if !block => {
                        block = true;
                        let mut sizes = [0u8; 12];
                        sizes[..4].copy_from_slice(&export.block_size_min.to_be_bytes());
                        sizes[4..8].copy_from_slice(&export.block_size_preferred.to_be_bytes());
                        sizes[8..].copy_from_slice(&export.max_request_bytes.to_be_bytes());
                        put_info(out, option, INFO_BLOCK_SIZE, &sizes);
                    }
                    // Duplicates, NBD_INFO_EXPORT (always sent) and unknown requests
                    // are ignored, as the spec requires.
                    _ => {}
                }
            }
            put_option_reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                OptionOutcome::Transmission
            } else {
                OptionOutcome::Continue
            }
        }
        OPT_STARTTLS => {
            put_option_error(
                out,
                option,
                REP_ERR_UNSUP,
                "TLS is not offered by this server",
            );
            OptionOutcome::Continue
        }
        OPT_STRUCTURED_REPLY => {
            put_option_error(
                out,
                option,
                REP_ERR_UNSUP,
                "this server sends simple replies only",
            );
            OptionOutcome::Continue
        }
        // Meta contexts, extended headers and anything unknown.
        _ => {
            put_option_error(
                out,
                option,
                REP_ERR_UNSUP,
                "option not supported by this server",
            );
            OptionOutcome::Continue
        }
    }
}

/// Reply to an option whose payload was too large to read.
pub fn answer_oversized_option(option: u32, len_bytes: u32, out: &mut Vec<u8>) {
    let msg = format!(
        "option data of {len_bytes} bytes exceeds this server's limit of {OPTION_DATA_MAX_BYTES} bytes"
    );
    put_option_error(out, option, REP_ERR_TOO_BIG, &msg);
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO:
/// `4 name length, name, 2 number of info requests, 2 per info request`.
struct InfoRequest<'a> {
    name: &'a [u8],
    requests: &'a [u8],
}

impl InfoRequest<'_> {
    fn info_requests(&self) -> impl Iterator<Item = u16> + '_ {
        self.requests
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    let Some((len_bytes, rest)) = data.split_first_chunk::<4>() else {
        return Err("option data too short for an export name length");
    };
    let name_len = u32::from_be_bytes(*len_bytes) as usize;
    if name_len > STRING_MAX_BYTES {
        return Err("export name longer than 4096 bytes");
    }
    if rest.len() < name_len + 2 {
        return Err("export name length exceeds the option data");
    }
    let (name, rest) = rest.split_at(name_len);
    let (count_bytes, requests) = rest.split_at(2);
    let count = u16::from_be_bytes([count_bytes[0], count_bytes[1]]) as usize;
    if requests.len() != count * 2 {
        return Err("number of information requests does not match the option length");
    }
    Ok(InfoRequest { name, requests })
}

fn put_option_header(out: &mut Vec<u8>, option: u32, reply: u32, len: usize) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    // Every caller passes at most a few KiB: names and messages are bounded.
    out.put_u32(u32::try_from(len).expect("option reply longer than 4 GiB"));
}

fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    put_option_header(out, option, reply, data.len());
    out.put_slice(data);
}

fn put_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    put_option_reply(out, option, reply, message.as_bytes());
}

fn put_info(out: &mut Vec<u8>, option: u32, info: u16, data: &[u8]) {
    put_option_header(out, option, REP_INFO, 2 + data.len());
    out.put_u16(info);
    out.put_slice(data);
}

/// A decoded request header (the 28 bytes before any payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Decode a request header; `Err(magic)` if the magic is wrong, after which the
/// stream cannot be resynchronised.
pub fn decode_request_header(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, u32> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
        len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
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
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
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
    /// NBD_CMD_DISC: stop reading, finish what is in flight, close.
    Disconnect,
    /// The request cannot be answered without reading an unbounded payload.
    Close(&'static str),
}

/// Limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    pub size_bytes: u64,
    pub max_request_bytes: u32,
    pub read_only: bool,
}

/// Check a request header against the export. Nothing that fails here reaches the
/// backend.
pub fn admit(h: &RequestHeader, limits: &RequestLimits) -> Admission {
    let reject = |errno, discard_bytes, reason| Admission::Reject {
        errno,
        discard_bytes,
        reason,
    };
    // End of the range, or None if it overflows u64 or passes the end of the export.
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= limits.size_bytes);
    match h.kind {
        CMD_READ => {
            if h.flags & !CMD_FLAG_FUA != 0 {
                reject(NbdErrno::Inval, 0, "unsupported flags on NBD_CMD_READ")
            } else if h.len == 0 {
                reject(NbdErrno::Inval, 0, "zero-length read")
            } else if h.len > limits.max_request_bytes {
                reject(
                    NbdErrno::Overflow,
                    0,
                    "read longer than the maximum request size",
                )
            } else if !in_range {
                reject(NbdErrno::Inval, 0, "read beyond the end of the export")
            } else {
                Admission::Execute(Command::Read {
                    offset: h.offset,
                    len: h.len,
                })
            }
        }
        CMD_WRITE => {
            if h.len > WRITE_DISCARD_MAX_BYTES {
                // Checked first: whatever else is wrong, we cannot skip this payload.
                Admission::Close("write payload longer than 64 MiB")
            } else if h.flags & !CMD_FLAG_FUA != 0 {
                reject(NbdErrno::Inval, h.len, "unsupported flags on NBD_CMD_WRITE")
            } else if limits.read_only {
                reject(NbdErrno::Perm, h.len, "write to a read-only export")
            } else if h.len == 0 {
                reject(NbdErrno::Inval, 0, "zero-length write")
            } else if h.len > limits.max_request_bytes {
                reject(
                    NbdErrno::Inval,
                    h.len,
                    "write longer than the maximum request size",
                )
            } else if !in_range {
                reject(NbdErrno::NoSpc, h.len, "write beyond the end of the export")
            } else {
                Admission::Execute(Command::Write {
                    offset: h.offset,
                    len: h.len,
                    fua: h.flags & CMD_FLAG_FUA != 0,
                })
            }
        }
        CMD_DISC => Admission::Disconnect,
        CMD_FLUSH => {
            if h.flags & !CMD_FLAG_FUA != 0 {
                reject(NbdErrno::Inval, 0, "unsupported flags on NBD_CMD_FLUSH")
            } else if h.offset != 0 || h.len != 0 {
                reject(
                    NbdErrno::Inval,
                    0,
                    "NBD_CMD_FLUSH with non-zero offset or length",
                )
            } else {
                Admission::Execute(Command::Flush)
            }
        }
        CMD_TRIM => {
            if h.flags & !CMD_FLAG_FUA != 0 {
                reject(NbdErrno::Inval, 0, "unsupported flags on NBD_CMD_TRIM")
            } else if limits.read_only {
                reject(NbdErrno::Perm, 0, "trim on a read-only export")
            } else if h.len == 0 {
                reject(NbdErrno::Inval, 0, "zero-length trim")
            } else if !in_range {
                reject(NbdErrno::NoSpc, 0, "trim beyond the end of the export")
            } else {
                // FUA on a trim is accepted and ignored: trimmed contents are
                // unspecified, so there is nothing to make durable.
                Admission::Execute(Command::Trim {
                    offset: h.offset,
                    len: h.len,
                })
            }
        }
        CMD_WRITE_ZEROES => {
            if h.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 {
                reject(
                    NbdErrno::Inval,
                    0,
                    "unsupported flags on NBD_CMD_WRITE_ZEROES",
                )
            } else if limits.read_only {
                reject(NbdErrno::Perm, 0, "write-zeroes on a read-only export")
            } else if h.len == 0 {
                reject(NbdErrno::Inval, 0, "zero-length write-zeroes")
            } else if !in_range {
                reject(
                    NbdErrno::NoSpc,
                    0,
                    "write-zeroes beyond the end of the export",
                )
            } else {
                // NO_HOLE only forbids deallocating; the backend always writes zeroes.
                Admission::Execute(Command::WriteZeroes {
                    offset: h.offset,
                    len: h.len,
                    fua: h.flags & CMD_FLAG_FUA != 0,
                })
            }
        }
        _ => reject(NbdErrno::Inval, 0, "unknown command"),
    }
}

/// Encode a simple reply header.
pub fn encode_simple_reply(errno: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "vol0".into(),
            description: "test volume".into(),
            size_bytes: 1 << 20,
            transmission_flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH,
            block_size_min: 512,
            block_size_preferred: 4096,
            max_request_bytes: 1 << 16,
        }
    }

    /// Split a stream of option replies into (option, reply type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(
                u64::from_be_bytes(out[..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let opt = u32::from_be_bytes(out[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(out[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            v.push((opt, ty, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name);
        d.put_u16(infos.len() as u16);
        for i in infos {
            d.put_u16(*i);
        }
        d
    }

    #[test]
    fn go_with_all_info_requests_answers_each_once_then_ack() {
        let mut out = Vec::new();
        let data = info_data(
            b"vol0",
            &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, INFO_NAME, 999],
        );
        let next = answer_option(&export(), true, OPT_GO, &data, &mut out);
        assert_eq!(next, OptionOutcome::Transmission);
        let r = replies(&out);
        let types: Vec<u16> = r
            .iter()
            .filter(|x| x.1 == REP_INFO)
            .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
            .collect();
        assert_eq!(
            types,
            vec![INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]
        );
        assert_eq!(r[0].2[2..10], (1u64 << 20).to_be_bytes());
        assert_eq!(r[1].2[2..], [0, 0, 2, 0, 0, 0, 16, 0, 0, 1, 0, 0]);
        assert_eq!(&r[2].2[2..], b"vol0");
        assert_eq!(r.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn info_with_default_name_continues_negotiation() {
        let mut out = Vec::new();
        let next = answer_option(&export(), true, OPT_INFO, &info_data(b"", &[]), &mut out);
        assert_eq!(next, OptionOutcome::Continue);
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].1, r[1].1), (REP_INFO, REP_ACK));
    }

    #[test]
    fn go_with_unknown_export_is_err_unknown() {
        let mut out = Vec::new();
        let next = answer_option(&export(), true, OPT_GO, &info_data(b"nope", &[]), &mut out);
        assert_eq!(next, OptionOutcome::Continue);
        let r = replies(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert!(String::from_utf8(r[0].2.clone()).unwrap().contains("nope"));
    }

    #[test]
    fn malformed_info_payloads_are_err_invalid() {
        let mut long_name = info_data(&[b'a'; 5000], &[]);
        long_name.truncate(long_name.len());
        let mut lying_count = info_data(b"vol0", &[INFO_NAME]);
        lying_count.pop();
        let mut trailing = info_data(b"vol0", &[]);
        trailing.push(0);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0, 0, 0],
            vec![0, 0, 0, 4, b'v'],
            vec![0xff, 0xff, 0xff, 0xff, 0, 0],
            long_name,
            lying_count,
            trailing,
        ];
        for data in cases {
            for opt in [OPT_INFO, OPT_GO] {
                let mut out = Vec::new();
                assert_eq!(
                    answer_option(&export(), true, opt, &data, &mut out),
                    OptionOutcome::Continue,
                    "{data:?}"
                );
                let r = replies(&out);
                assert_eq!(r.len(), 1);
                assert_eq!(r[0].1, REP_ERR_INVALID, "{data:?}");
            }
        }
    }

    #[test]
    fn export_name_honours_no_zeroes() {
        for (no_zeroes, len) in [(true, 10), (false, 134)] {
            let mut out = Vec::new();
            let next = answer_option(&export(), no_zeroes, OPT_EXPORT_NAME, b"vol0", &mut out);
            assert_eq!(next, OptionOutcome::Transmission);
            assert_eq!(out.len(), len);
            assert_eq!(out[..8], (1u64 << 20).to_be_bytes());
        }
        let mut out = Vec::new();
        let next = answer_option(&export(), true, OPT_EXPORT_NAME, b"other", &mut out);
        assert!(matches!(next, OptionOutcome::Close(_)));
        assert!(out.is_empty());
    }

    #[test]
    fn list_names_the_export_and_rejects_data() {
        let mut out = Vec::new();
        answer_option(&export(), true, OPT_LIST, &[], &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[..8], b"\0\0\0\x04vol0");
        assert_eq!(&r[0].2[8..], b"test volume");
        assert_eq!(r[1].1, REP_ACK);
        let mut out = Vec::new();
        answer_option(&export(), true, OPT_LIST, &[1], &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn unsupported_options_get_err_unsup() {
        for opt in [
            OPT_STARTTLS,
            OPT_STRUCTURED_REPLY,
            4,
            9,
            10,
            11,
            12345,
            u32::MAX,
        ] {
            let mut out = Vec::new();
            assert_eq!(
                answer_option(&export(), true, opt, &[1, 2, 3], &mut out),
                OptionOutcome::Continue
            );
            let r = replies(&out);
            assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_UNSUP));
        }
    }

    #[test]
    fn abort_acks_then_closes() {
        let mut out = Vec::new();
        let next = answer_option(&export(), true, OPT_ABORT, &[], &mut out);
        assert!(matches!(next, OptionOutcome::Close(_)));
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    fn header(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    const LIMITS: RequestLimits = RequestLimits {
        size_bytes: 1 << 20,
        max_request_bytes: 1 << 16,
        read_only: false,
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
    fn header_decoding_checks_magic_and_fields() {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&1u16.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beefu64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            decode_request_header(&b),
            Ok(RequestHeader {
                flags: 1,
                kind: CMD_WRITE,
                cookie: 0xdead_beef,
                offset: 4096,
                len: 512
            })
        );
        b[0] ^= 1;
        assert!(decode_request_header(&b).is_err());
    }

    #[test]
    fn valid_requests_are_executed() {
        let end = LIMITS.size_bytes;
        assert_eq!(
            admit(&header(CMD_READ, CMD_FLAG_FUA, end - 512, 512), &LIMITS),
            Admission::Execute(Command::Read {
                offset: end - 512,
                len: 512
            })
        );
        assert_eq!(
            admit(&header(CMD_WRITE, CMD_FLAG_FUA, 3, 1 << 16), &LIMITS),
            Admission::Execute(Command::Write {
                offset: 3,
                len: 1 << 16,
                fua: true
            })
        );
        assert_eq!(
            admit(&header(CMD_FLUSH, 0, 0, 0), &LIMITS),
            Admission::Execute(Command::Flush)
        );
        // Trim and write-zeroes carry no payload, so the request size limit does not apply.
        assert_eq!(
            admit(&header(CMD_TRIM, 0, 0, end as u32), &LIMITS),
            Admission::Execute(Command::Trim {
                offset: 0,
                len: end as u32
            })
        );
        assert_eq!(
            admit(
                &header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 1),
                &LIMITS
            ),
            Admission::Execute(Command::WriteZeroes {
                offset: 0,
                len: 1,
                fua: true
            })
        );
        assert_eq!(
            admit(&header(CMD_DISC, 0, 0, 0), &LIMITS),
            Admission::Disconnect
        );
    }

    #[test]
    fn out_of_range_and_malformed_requests_are_rejected() {
        let end = LIMITS.size_bytes;
        use NbdErrno::*;
        let cases = [
            (header(CMD_READ, 0, end, 1), (Inval, 0)),
            (header(CMD_READ, 0, end - 1, 2), (Inval, 0)),
            (header(CMD_READ, 0, u64::MAX, 1), (Inval, 0)),
            (header(CMD_READ, 0, 0, 0), (Inval, 0)),
            (header(CMD_READ, 0, 0, (1 << 16) + 1), (Overflow, 0)),
            (header(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), (Inval, 0)),
            (header(CMD_WRITE, 0, end - 1, 2), (NoSpc, 2)),
            (header(CMD_WRITE, 0, u64::MAX - 1, 4), (NoSpc, 4)),
            (
                header(CMD_WRITE, 0, 0, (1 << 16) + 1),
                (Inval, (1 << 16) + 1),
            ),
            (header(CMD_WRITE, 1 << 7, 0, 512), (Inval, 512)),
            (header(CMD_WRITE, 0, 0, 0), (Inval, 0)),
            (header(CMD_FLUSH, 0, 1, 0), (Inval, 0)),
            (header(CMD_FLUSH, 0, 0, 1), (Inval, 0)),
            (header(CMD_TRIM, 0, end, 1), (NoSpc, 0)),
            (header(CMD_TRIM, 0, 0, 0), (Inval, 0)),
            (header(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 1), (Inval, 0)),
            (header(CMD_WRITE_ZEROES, 1 << 4, 0, 1), (Inval, 0)),
            (header(CMD_WRITE_ZEROES, 0, u64::MAX, u32::MAX), (NoSpc, 0)),
            (header(5, 0, 0, 512), (Inval, 0)),
            (header(7, 0, 0, 512), (Inval, 0)),
            (header(u16::MAX, 0, 0, 512), (Inval, 0)),
        ];
        for (h, want) in cases {
            assert_eq!(errno_of(admit(&h, &LIMITS)), want, "{h:?}");
        }
    }

    #[test]
    fn oversized_write_payload_closes_the_connection() {
        for len in [WRITE_DISCARD_MAX_BYTES + 1, u32::MAX] {
            assert!(matches!(
                admit(&header(CMD_WRITE, 0, 0, len), &LIMITS),
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
            errno_of(admit(&header(CMD_WRITE, 0, 0, 512), &ro)),
            (NbdErrno::Perm, 512)
        );
        assert_eq!(
            errno_of(admit(&header(CMD_TRIM, 0, 0, 512), &ro)),
            (NbdErrno::Perm, 0)
        );
        assert_eq!(
            errno_of(admit(&header(CMD_WRITE_ZEROES, 0, 0, 512), &ro)),
            (NbdErrno::Perm, 0)
        );
        assert!(matches!(
            admit(&header(CMD_READ, 0, 0, 512), &ro),
            Admission::Execute(_)
        ));
    }

    #[test]
    fn io_errors_map_to_nbd_errors() {
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

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_option_gets_well_formed_replies(
                option in prop_oneof![0u32..16, any::<u32>()],
                data in proptest::collection::vec(any::<u8>(), 0..600),
                no_zeroes in any::<bool>(),
            ) {
                let mut out = Vec::new();
                let outcome = answer_option(&export(), no_zeroes, option, &data, &mut out);
                if option == OPT_EXPORT_NAME {
                    prop_assert!(outcome != OptionOutcome::Continue);
                } else {
                    // Parses as a sequence of option replies, each for this option.
                    let r = replies(&out);
                    prop_assert!(!r.is_empty());
                    prop_assert!(r.iter().all(|x| x.0 == option));
                    let last = r.last().unwrap().1;
                    prop_assert!(last == REP_ACK || last & (1 << 31) != 0);
                    if outcome == OptionOutcome::Transmission {
                        prop_assert_eq!(option, OPT_GO);
                        prop_assert_eq!(last, REP_ACK);
                    }
                }
            }

            #[test]
            fn admitted_requests_are_in_range_and_within_limits(
                kind in prop_oneof![0u16..10, any::<u16>()],
                flags in any::<u16>(),
                offset in prop_oneof![0u64..(1 << 21), any::<u64>()],
                len in prop_oneof![0u32..(1 << 17), any::<u32>()],
                read_only in any::<bool>(),
            ) {
                let limits = RequestLimits { read_only, ..LIMITS };
                let h = RequestHeader { flags, kind, cookie: 1, offset, len };
                let in_bounds = |off: u64, len: u32| {
                    len > 0 && off.checked_add(u64::from(len)).is_some_and(|e| e <= limits.size_bytes)
                };
                match admit(&h, &limits) {
                    Admission::Execute(Command::Read { offset, len }) => {
                        prop_assert!(in_bounds(offset, len) && len <= limits.max_request_bytes);
                    }
                    Admission::Execute(Command::Write { offset, len, .. }) => {
                        prop_assert!(!read_only);
                        prop_assert!(in_bounds(offset, len) && len <= limits.max_request_bytes);
                    }
                    Admission::Execute(Command::Trim { offset, len })
                    | Admission::Execute(Command::WriteZeroes { offset, len, .. }) => {
                        prop_assert!(!read_only && in_bounds(offset, len));
                    }
                    Admission::Execute(Command::Flush) => {
                        prop_assert!(h.offset == 0 && h.len == 0);
                    }
                    Admission::Reject { discard_bytes, .. } => {
                        // Only a write's payload is ever skipped, and never beyond the cap.
                        prop_assert!(discard_bytes == 0 || (kind == CMD_WRITE && discard_bytes == len));
                        prop_assert!(discard_bytes <= WRITE_DISCARD_MAX_BYTES);
                    }
                    Admission::Disconnect => prop_assert_eq!(kind, CMD_DISC),
                    Admission::Close(_) => {
                        prop_assert!(kind == CMD_WRITE && len > WRITE_DISCARD_MAX_BYTES);
                    }
                }
            }
        }
    }
}
