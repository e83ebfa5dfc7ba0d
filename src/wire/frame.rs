//! The frame codec: one [`Frame`] = a fixed 40-byte hand-encoded header, a
//! bincode body (a [`Message`]) and an optional payload (the data of a `Write`).
//!
//! This module owns the byte layout of a frame and every check made on bytes
//! read from a peer: magic, version, header crc32, length bounds, body crc32,
//! kind byte against the decoded body, trailing bytes, and (in
//! [`Payload::open`]) decompression bounded by the announced length and the
//! crc32 of the *uncompressed* payload (G5). It does not own the connection,
//! retries or what happens to a bad frame (the caller drops the connection and
//! resends or marks the range dirty).
//!
//! The header is hand-encoded, not bincode, so its length is fixed and known
//! before anything is decoded, and so its own crc32 can be checked before any
//! length in it is trusted (TigerBeetle keeps header and body checksums apart
//! for the same reason: a corrupt length must never make us read a wrong
//! amount of bytes and then blame the body).

use std::cell::RefCell;
use std::io;

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::msg::Message;

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 40;
/// `"TNDM"` read as a little-endian u32: the bytes on the wire are `54 4E 44 4D`.
pub const FRAME_MAGIC: u32 = 0x4D44_4E54;
/// Version of the frame *header* layout (the message vocabulary has its own
/// [`super::PROTOCOL_VERSION`], exchanged in `Hello`).
pub const FRAME_VERSION: u8 = 1;
/// Largest bincode body accepted. The largest message (`Hello`/`Welcome` with
/// two node names) is a few hundred bytes; 64 KiB bounds what a peer can make
/// us buffer and allocate before the body crc is checked.
pub const BODY_MAX_BYTES: u32 = 64 << 10;
/// Largest uncompressed payload (one write). 32 MiB is the NBD maximum request
/// size most clients use; larger writes are split by the frontend.
pub const PAYLOAD_MAX_BYTES: u32 = 32 << 20;
/// Flag bit 0: the payload is zstd-compressed.
pub const FLAG_PAYLOAD_ZSTD: u16 = 1 << 0;
const FLAGS_KNOWN: u16 = FLAG_PAYLOAD_ZSTD;

/// bincode configuration of message bodies: standard (little-endian, varint
/// integers) with a decode limit so that a claimed string or vector length can
/// never make the decoder allocate more than a body can hold.
type BodyConfig = Configuration<LittleEndian, Varint, Limit<{ BODY_MAX_BYTES as usize }>>;

fn body_config() -> BodyConfig {
    bincode::config::standard().with_limit::<{ BODY_MAX_BYTES as usize }>()
}

/// Largest on-wire length a compressed payload of `raw_len_bytes` may have
/// (zstd's worst case for incompressible input).
fn payload_wire_max_bytes(raw_len_bytes: u32) -> u64 {
    zstd::zstd_safe::compress_bound(raw_len_bytes as usize) as u64
}

/// Errors of the frame codec. Every variant names the frame (by seq) when the
/// header was trusted far enough to know it.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the stream cleanly at a frame boundary.
    #[error("peer closed the connection at a frame boundary")]
    Closed,
    #[error(
        "connection ended in the middle of a frame ({what}: got {got_bytes} of {expected_bytes} bytes); the peer crashed or the link broke, reconnect and resend"
    )]
    Truncated {
        what: &'static str,
        got_bytes: usize,
        expected_bytes: usize,
    },
    #[error("I/O error while reading a frame ({what})")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "bad frame magic {found:#010x} (expected {FRAME_MAGIC:#010x}); the peer is not a tandem node, speaks TLS to a plaintext listener, or the stream is out of sync"
    )]
    BadMagic { found: u32 },
    #[error(
        "frame header crc32 mismatch: header says {expected:#010x}, computed {actual:#010x}; the header was corrupted in transit, dropping the connection"
    )]
    HeaderCrc { expected: u32, actual: u32 },
    #[error(
        "unsupported frame version {found} (this node speaks {FRAME_VERSION}); upgrade the older node"
    )]
    BadVersion { found: u8 },
    #[error("frame seq {seq}: unknown message kind {kind}; the peer runs a newer protocol")]
    UnknownKind { seq: u64, kind: u8 },
    #[error("frame seq {seq}: unknown flag bits {flags:#06x}; the peer runs a newer protocol")]
    BadFlags { seq: u64, flags: u16 },
    #[error("frame seq {seq}: {what} of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge {
        seq: u64,
        what: &'static str,
        len_bytes: u64,
        max_bytes: u64,
    },
    #[error(
        "frame seq {seq}: inconsistent payload lengths (wire {wire_len_bytes} bytes, raw {raw_len_bytes} bytes, compressed: {compressed})"
    )]
    PayloadLengths {
        seq: u64,
        wire_len_bytes: u32,
        raw_len_bytes: u32,
        compressed: bool,
    },
    #[error("frame seq {seq}: message kind {kind} must not carry a payload")]
    UnexpectedPayload { seq: u64, kind: u8 },
    #[error(
        "frame seq {seq}: body crc32 mismatch: header says {expected:#010x}, computed {actual:#010x}; the body was corrupted in transit, dropping the connection"
    )]
    BodyCrc {
        seq: u64,
        expected: u32,
        actual: u32,
    },
    #[error("frame seq {seq}: body does not decode as a message of kind {kind}")]
    BodyDecode {
        seq: u64,
        kind: u8,
        #[source]
        source: bincode::error::DecodeError,
    },
    #[error("frame seq {seq}: header kind {header_kind} but the body decodes as kind {body_kind}")]
    KindMismatch {
        seq: u64,
        header_kind: u8,
        body_kind: u8,
    },
    #[error("frame seq {seq}: {trailing_bytes} trailing bytes after the message body")]
    TrailingBody { seq: u64, trailing_bytes: usize },
    #[error(
        "{}: payload crc32 mismatch: expected {expected:#010x}, computed {actual:#010x} over {raw_len_bytes} bytes; the payload was corrupted, it must not be applied",
        payload_origin(.seq)
    )]
    PayloadCrc {
        /// The frame's seq, or `None` for a payload prepared locally.
        seq: Option<u64>,
        expected: u32,
        actual: u32,
        raw_len_bytes: u32,
    },
    #[error(
        "{}: payload does not decompress (zstd, {wire_len_bytes} bytes on the wire, {raw_len_bytes} bytes announced)",
        payload_origin(.seq)
    )]
    Decompress {
        seq: Option<u64>,
        wire_len_bytes: u32,
        raw_len_bytes: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: payload decompressed to {actual_bytes} bytes but the header announced {expected_bytes} bytes",
        payload_origin(.seq)
    )]
    DecompressedLen {
        seq: Option<u64>,
        expected_bytes: u32,
        actual_bytes: usize,
    },
}

fn payload_origin(seq: &Option<u64>) -> String {
    match seq {
        Some(seq) => format!("frame seq {seq}"),
        None => "locally prepared payload".to_string(),
    }
}

/// The data of a write as it travels: on-wire bytes (compressed or not), the
/// uncompressed length and the crc32 of the uncompressed bytes (G5).
#[derive(Clone, Debug)]
pub struct Payload {
    wire: Bytes,
    raw_len_bytes: u32,
    crc32: u32,
    compressed: bool,
    /// The seq of the frame it arrived in (for error messages); `None` when
    /// prepared locally.
    received_seq: Option<u64>,
}

thread_local! {
    /// One zstd compression context per thread, reused across `prepare` calls
    /// (a context is ~1 MiB of tables at level 3; allocating one per 4 KiB
    /// write would cost more than compressing it). Tagged with its level.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    /// One zstd decompression context per thread, reused across `open` calls.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Compress `data` at `level` with this thread's context; `None` when zstd
/// fails (it only fails on allocation failure or a bad level), in which case
/// the caller sends the data uncompressed, which is always correct.
fn compress_with_thread_context(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let reuse = matches!(&*slot, Some((l, _)) if *l == level);
        if !reuse {
            match slot.as_mut() {
                Some((l, c)) => {
                    c.set_compression_level(level).ok()?;
                    *l = level;
                }
                None => *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?)),
            }
        }
        let (_, compressor) = slot.as_mut()?;
        // Only worth keeping if it shrinks: give zstd exactly raw_len - 1 bytes
        // of room, so "does not fit" (an error) means "did not shrink".
        let mut out = Vec::with_capacity(data.len().saturating_sub(1));
        compressor.compress_to_buffer(data, &mut out).ok()?;
        Some(out)
    })
}

fn decompress_with_thread_context(
    wire: &[u8],
    raw_len_bytes: u32,
    seq: Option<u64>,
) -> Result<Vec<u8>, WireError> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot =
                Some(
                    zstd::bulk::Decompressor::new().map_err(|source| WireError::Decompress {
                        seq,
                        wire_len_bytes: wire.len() as u32,
                        raw_len_bytes,
                        source,
                    })?,
                );
        }
        let Some(decompressor) = slot.as_mut() else {
            unreachable!("decompressor was installed just above");
        };
        // Capacity = the announced raw length (≤ PAYLOAD_MAX_BYTES, checked when
        // the header was parsed): a zstd bomb fails here instead of growing.
        let mut out = Vec::with_capacity(raw_len_bytes as usize);
        decompressor
            .decompress_to_buffer(wire, &mut out)
            .map_err(|source| WireError::Decompress {
                seq,
                wire_len_bytes: wire.len() as u32,
                raw_len_bytes,
                source,
            })?;
        Ok(out)
    })
}

impl Payload {
    /// No payload (every message but `Write`, or a zero-length write).
    pub fn empty() -> Payload {
        Payload {
            wire: Bytes::new(),
            raw_len_bytes: 0,
            crc32: crc32fast::hash(&[]),
            compressed: false,
            received_seq: None,
        }
    }

    /// crc32 of `data` is computed first (G5: over the uncompressed bytes);
    /// then zstd at `level` (0 = no compression); the data is sent raw when
    /// compression does not shrink it. Called in the NBD request path, not the
    /// sender, so compression runs in parallel with the local write.
    ///
    /// # Panics
    /// If `data` is longer than [`PAYLOAD_MAX_BYTES`]: the frontend must split
    /// larger requests, a longer payload is a bug in the caller.
    pub fn prepare(data: Bytes, level: i32) -> Payload {
        assert!(
            data.len() <= PAYLOAD_MAX_BYTES as usize,
            "payload of {} bytes exceeds PAYLOAD_MAX_BYTES; the caller must split it",
            data.len()
        );
        let raw_len_bytes = data.len() as u32;
        let crc32 = crc32fast::hash(&data);
        if level != 0
            && !data.is_empty()
            && let Some(compressed) = compress_with_thread_context(&data, level)
            && compressed.len() < data.len()
        {
            return Payload {
                wire: Bytes::from(compressed),
                raw_len_bytes,
                crc32,
                compressed: true,
                received_seq: None,
            };
        }
        Payload {
            wire: data,
            raw_len_bytes,
            crc32,
            compressed: false,
            received_seq: None,
        }
    }

    /// Uncompressed length in bytes.
    pub fn raw_len(&self) -> u32 {
        self.raw_len_bytes
    }

    /// Length on the wire in bytes (compressed length if compressed).
    pub fn wire_len(&self) -> u32 {
        self.wire.len() as u32
    }

    pub fn is_compressed(&self) -> bool {
        self.compressed
    }

    /// crc32 of the uncompressed bytes.
    pub fn crc32(&self) -> u32 {
        self.crc32
    }

    /// Decompress (bounded by the raw length) and verify the crc32 of the
    /// uncompressed bytes (G5). A mismatch is an error: the data must not be
    /// applied.
    pub fn open(self) -> Result<Bytes, WireError> {
        let data = if self.compressed {
            let out =
                decompress_with_thread_context(&self.wire, self.raw_len_bytes, self.received_seq)?;
            if out.len() != self.raw_len_bytes as usize {
                return Err(WireError::DecompressedLen {
                    seq: self.received_seq,
                    expected_bytes: self.raw_len_bytes,
                    actual_bytes: out.len(),
                });
            }
            Bytes::from(out)
        } else {
            if self.wire.len() != self.raw_len_bytes as usize {
                return Err(WireError::DecompressedLen {
                    seq: self.received_seq,
                    expected_bytes: self.raw_len_bytes,
                    actual_bytes: self.wire.len(),
                });
            }
            self.wire
        };
        let actual = crc32fast::hash(&data);
        if actual != self.crc32 {
            return Err(WireError::PayloadCrc {
                seq: self.received_seq,
                expected: self.crc32,
                actual,
                raw_len_bytes: self.raw_len_bytes,
            });
        }
        Ok(data)
    }
}

/// One unit of the replication stream.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The write order for `Write`/`WriteZeroes`/`Trim`/`Flush` (G2); 0 for
    /// handshake frames; free for acknowledgements and heartbeats.
    pub seq: u64,
    pub msg: Message,
    pub payload: Payload,
}

/// The decoded, crc-checked and bounds-checked frame header.
///
/// Layout (40 bytes, all integers little-endian):
///
/// | offset | size | field              | meaning                                                     |
/// |-------:|-----:|--------------------|-------------------------------------------------------------|
/// |      0 |    4 | `magic`            | `0x4D444E54`, bytes `54 4E 44 4D` = "TNDM"                  |
/// |      4 |    1 | `version`          | [`FRAME_VERSION`] = 1                                       |
/// |      5 |    1 | `kind`             | [`Message::kind`] of the body                               |
/// |      6 |    2 | `flags`            | bit 0: payload zstd-compressed; other bits must be 0        |
/// |      8 |    8 | `seq`              | frame sequence number                                       |
/// |     16 |    4 | `body_len`         | bincode body length, ≤ [`BODY_MAX_BYTES`]                   |
/// |     20 |    4 | `payload_wire_len` | payload bytes following the body                            |
/// |     24 |    4 | `payload_raw_len`  | uncompressed payload length, ≤ [`PAYLOAD_MAX_BYTES`]        |
/// |     28 |    4 | `body_crc32`       | crc32 of the body bytes                                     |
/// |     32 |    4 | `payload_crc32`    | crc32 of the *uncompressed* payload (G5)                    |
/// |     36 |    4 | `header_crc32`     | crc32 of header bytes 0..36                                 |
///
/// Why this order: magic and version first so a non-tandem or future peer is
/// recognised from the first 5 bytes; the fields needed to size the read
/// (lengths) before the checksums they protect; the header crc last so it
/// covers everything before it and the header can be checked in one pass
/// before any length is trusted. 40 bytes keeps the u64 `seq` 8-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    kind: u8,
    flags: u16,
    seq: u64,
    body_len_bytes: u32,
    payload_wire_len_bytes: u32,
    payload_raw_len_bytes: u32,
    body_crc32: u32,
    payload_crc32: u32,
}

fn le_u16(b: &[u8; HEADER_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Kind bytes this version knows, and whether that kind may carry a payload.
/// Kept next to [`Message::kind`] by the `kind_table_matches_messages` test.
fn kind_info(kind: u8) -> Option<bool> {
    match kind {
        4 => Some(true),
        1..=3 | 5..=20 => Some(false),
        _ => None,
    }
}

impl FrameHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4] = FRAME_VERSION;
        b[5] = self.kind;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_len_bytes.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_wire_len_bytes.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_raw_len_bytes.to_le_bytes());
        b[28..32].copy_from_slice(&self.body_crc32.to_le_bytes());
        b[32..36].copy_from_slice(&self.payload_crc32.to_le_bytes());
        let crc = crc32fast::hash(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and check a header. Order: magic (is this tandem at all), header
    /// crc (may any other field be trusted), then version, kind, flags, bounds.
    fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let magic = le_u32(b, 0);
        if magic != FRAME_MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let expected = le_u32(b, 36);
        let actual = crc32fast::hash(&b[0..36]);
        if expected != actual {
            return Err(WireError::HeaderCrc { expected, actual });
        }
        if b[4] != FRAME_VERSION {
            return Err(WireError::BadVersion { found: b[4] });
        }
        let h = FrameHeader {
            kind: b[5],
            flags: le_u16(b, 6),
            seq: le_u64(b, 8),
            body_len_bytes: le_u32(b, 16),
            payload_wire_len_bytes: le_u32(b, 20),
            payload_raw_len_bytes: le_u32(b, 24),
            body_crc32: le_u32(b, 28),
            payload_crc32: le_u32(b, 32),
        };
        let seq = h.seq;
        let Some(may_have_payload) = kind_info(h.kind) else {
            return Err(WireError::UnknownKind { seq, kind: h.kind });
        };
        if h.flags & !FLAGS_KNOWN != 0 {
            return Err(WireError::BadFlags {
                seq,
                flags: h.flags,
            });
        }
        if h.body_len_bytes > BODY_MAX_BYTES {
            return Err(WireError::TooLarge {
                seq,
                what: "message body",
                len_bytes: h.body_len_bytes.into(),
                max_bytes: BODY_MAX_BYTES.into(),
            });
        }
        if h.payload_raw_len_bytes > PAYLOAD_MAX_BYTES {
            return Err(WireError::TooLarge {
                seq,
                what: "payload",
                len_bytes: h.payload_raw_len_bytes.into(),
                max_bytes: PAYLOAD_MAX_BYTES.into(),
            });
        }
        let compressed = h.flags & FLAG_PAYLOAD_ZSTD != 0;
        if !may_have_payload
            && (h.payload_wire_len_bytes != 0 || h.payload_raw_len_bytes != 0 || compressed)
        {
            return Err(WireError::UnexpectedPayload { seq, kind: h.kind });
        }
        let lengths_ok = if compressed {
            // A compressed payload is never empty (a zstd frame has a header),
            // and never longer than zstd's worst case for its raw length.
            h.payload_wire_len_bytes > 0
                && u64::from(h.payload_wire_len_bytes)
                    <= payload_wire_max_bytes(h.payload_raw_len_bytes)
        } else {
            h.payload_wire_len_bytes == h.payload_raw_len_bytes
        };
        if !lengths_ok {
            return Err(WireError::PayloadLengths {
                seq,
                wire_len_bytes: h.payload_wire_len_bytes,
                raw_len_bytes: h.payload_raw_len_bytes,
                compressed,
            });
        }
        Ok(h)
    }

    fn payload_compressed(&self) -> bool {
        self.flags & FLAG_PAYLOAD_ZSTD != 0
    }
}

/// Check the body crc, decode the message, check its kind and that it fills
/// the body exactly.
fn decode_body(h: &FrameHeader, body: &[u8]) -> Result<Message, WireError> {
    let seq = h.seq;
    let actual = crc32fast::hash(body);
    if actual != h.body_crc32 {
        return Err(WireError::BodyCrc {
            seq,
            expected: h.body_crc32,
            actual,
        });
    }
    let (msg, used_bytes): (Message, usize) = bincode::decode_from_slice(body, body_config())
        .map_err(|source| WireError::BodyDecode {
            seq,
            kind: h.kind,
            source,
        })?;
    if msg.kind() != h.kind {
        return Err(WireError::KindMismatch {
            seq,
            header_kind: h.kind,
            body_kind: msg.kind(),
        });
    }
    if used_bytes != body.len() {
        return Err(WireError::TrailingBody {
            seq,
            trailing_bytes: body.len() - used_bytes,
        });
    }
    Ok(msg)
}

fn payload_from_header(h: &FrameHeader, wire: Bytes) -> Payload {
    Payload {
        wire,
        raw_len_bytes: h.payload_raw_len_bytes,
        crc32: h.payload_crc32,
        compressed: h.payload_compressed(),
        received_seq: Some(h.seq),
    }
}

/// Append `frame` (header + body + payload) to `out`.
///
/// # Panics
/// If the encoded body exceeds [`BODY_MAX_BYTES`] or a message without a
/// payload is given one: both are bugs in the caller (every message this
/// node builds is small; only `Write` carries data).
pub fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    encode_frame_head(frame, out);
    out.extend_from_slice(&frame.payload.wire);
}

/// Encode the header and body of `frame` into `out` (not the payload), and return
/// the payload's on-wire bytes to send right after them, so a sender can write
/// both with one vectored write instead of copying the payload.
pub fn encode_frame_split(frame: &Frame, out: &mut BytesMut) -> Bytes {
    encode_frame_head(frame, out);
    frame.payload.wire.clone()
}

fn encode_frame_head(frame: &Frame, out: &mut BytesMut) {
    let payload = &frame.payload;
    assert!(
        frame.msg.has_payload() || (payload.raw_len_bytes == 0 && payload.wire.is_empty()),
        "message kind {} must not carry a payload",
        frame.msg.kind()
    );
    out.reserve(HEADER_LEN + 64);
    let header_at = out.len();
    out.put_bytes(0, HEADER_LEN);
    let body_at = out.len();
    // Writing into a BytesMut cannot fail (it grows), and every Message is
    // encodable, so an error here is a broken invariant.
    bincode::encode_into_std_write(&frame.msg, &mut (&mut *out).writer(), body_config())
        .expect("encoding a message into memory cannot fail");
    let body_len = out.len() - body_at;
    assert!(
        body_len <= BODY_MAX_BYTES as usize,
        "message body of {body_len} bytes exceeds BODY_MAX_BYTES"
    );
    let body_crc32 = crc32fast::hash(&out[body_at..]);
    let header = FrameHeader {
        kind: frame.msg.kind(),
        flags: if payload.compressed {
            FLAG_PAYLOAD_ZSTD
        } else {
            0
        },
        seq: frame.seq,
        body_len_bytes: body_len as u32,
        payload_wire_len_bytes: payload.wire.len() as u32,
        payload_raw_len_bytes: payload.raw_len_bytes,
        body_crc32,
        payload_crc32: payload.crc32,
    };
    out[header_at..body_at].copy_from_slice(&header.encode());
}

/// Decode one frame from the front of `buf` (sync; for tests and fuzzing, and
/// for callers that buffer themselves). `Ok(None)`: `buf` holds less than one
/// whole frame. `Ok(Some((frame, used_bytes)))`: one frame of `used_bytes`.
/// The payload is copied out of `buf` and stays compressed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some((h, msg, body_end, frame_end)) = decode_frame_parts(buf)? else {
        return Ok(None);
    };
    let payload = payload_from_header(&h, Bytes::copy_from_slice(&buf[body_end..frame_end]));
    Ok(Some((
        Frame {
            seq: h.seq,
            msg,
            payload,
        },
        frame_end,
    )))
}

/// [`decode_frame`] from the front of a receive buffer, which loses the frame's
/// bytes. A payload of [`SHARE_PAYLOAD_MIN_BYTES`] or more shares them (no copy:
/// it keeps that part of the buffer's allocation alive); a smaller one is copied,
/// so a few small payloads held long never pin megabytes of received stream.
pub fn decode_frame_split(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    let Some((h, msg, body_end, frame_end)) = decode_frame_parts(buf)? else {
        return Ok(None);
    };
    let wire = if frame_end - body_end >= SHARE_PAYLOAD_MIN_BYTES {
        buf.split_to(frame_end).freeze().slice(body_end..)
    } else {
        let wire = Bytes::copy_from_slice(&buf[body_end..frame_end]);
        bytes::Buf::advance(buf, frame_end);
        wire
    };
    Ok(Some(Frame {
        seq: h.seq,
        msg,
        payload: payload_from_header(&h, wire),
    }))
}

/// Payloads from this size up share the receive buffer ([`decode_frame_split`]).
pub const SHARE_PAYLOAD_MIN_BYTES: usize = 64 << 10;

/// The header and body of the frame at the front of `buf`, and where its body and
/// payload end; `None` while `buf` holds less than the whole frame.
fn decode_frame_parts(
    buf: &[u8],
) -> Result<Option<(FrameHeader, Message, usize, usize)>, WireError> {
    let Some(header_bytes) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let h = FrameHeader::decode(header_bytes)?;
    let body_end = HEADER_LEN + h.body_len_bytes as usize;
    let frame_end = body_end + h.payload_wire_len_bytes as usize;
    if buf.len() < frame_end {
        return Ok(None);
    }
    let msg = decode_body(&h, &buf[HEADER_LEN..body_end])?;
    Ok(Some((h, msg, body_end, frame_end)))
}

/// Fill `buf` completely; returns how many bytes were read before EOF.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(WireError::Io { what, source }),
        }
    }
    Ok(got)
}

/// Append exactly `len_bytes` bytes from `r` to `buf` without zero-filling
/// (reads go straight into spare capacity) and without reading past them.
async fn read_exact_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    len_bytes: usize,
    what: &'static str,
) -> Result<(), WireError> {
    buf.reserve(len_bytes);
    let start = buf.len();
    let mut limited = (&mut *r).take(len_bytes as u64);
    while buf.len() - start < len_bytes {
        match limited.read_buf(buf).await {
            Ok(0) => {
                return Err(WireError::Truncated {
                    what,
                    got_bytes: buf.len() - start,
                    expected_bytes: len_bytes,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(WireError::Io { what, source }),
        }
    }
    Ok(())
}

/// Read one frame. Checks magic, version, header crc, bounds, body crc and
/// kind; the payload stays compressed (the caller calls [`Payload::open`],
/// which checks the payload crc). `scratch` is reused for bodies; a payload
/// is split off it as its own `Bytes`. A clean EOF before the first header
/// byte is [`WireError::Closed`]; EOF anywhere else is
/// [`WireError::Truncated`]. Wrap `r` in a `BufReader` to batch small reads.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    scratch: &mut BytesMut,
) -> Result<Frame, WireError> {
    let mut header_bytes = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header_bytes, "frame header").await?;
    if got == 0 {
        return Err(WireError::Closed);
    }
    if got < HEADER_LEN {
        // Check the magic of what we have, so that a plaintext/TLS mix-up
        // is reported as such rather than as a short read.
        if got >= 4 {
            let found = u32::from_le_bytes([
                header_bytes[0],
                header_bytes[1],
                header_bytes[2],
                header_bytes[3],
            ]);
            if found != FRAME_MAGIC {
                return Err(WireError::BadMagic { found });
            }
        }
        return Err(WireError::Truncated {
            what: "frame header",
            got_bytes: got,
            expected_bytes: HEADER_LEN,
        });
    }
    let h = FrameHeader::decode(&header_bytes)?;
    scratch.clear();
    read_exact_into(r, scratch, h.body_len_bytes as usize, "message body").await?;
    let msg = decode_body(&h, scratch)?;
    let payload_wire = if h.payload_wire_len_bytes == 0 {
        Bytes::new()
    } else {
        scratch.clear();
        read_exact_into(r, scratch, h.payload_wire_len_bytes as usize, "payload").await?;
        scratch.split().freeze()
    };
    Ok(Frame {
        seq: h.seq,
        msg,
        payload: payload_from_header(&h, payload_wire),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::msg::{Generations, Hello, SyncPlan, Welcome};
    use proptest::prelude::*;

    fn all_messages() -> Vec<Message> {
        let g = Generations {
            current: 7,
            bitmap_base: 5,
            history: [3, 1],
        };
        vec![
            Message::Hello(Hello {
                protocol_version: 1,
                volume_id: [9; 16],
                size_bytes: 1 << 30,
                block_size: 4096,
                node_name: "alpha".into(),
                peer_name: "beta".into(),
                role: 1,
                disk_state: 1,
                generations: g,
                capabilities: 1,
                first_seq: 42,
                changed_blocks: 7,
                promoted_at_s: 1_700_000_000,
            }),
            Message::Welcome(Welcome {
                protocol_version: 1,
                volume_id: [9; 16],
                size_bytes: 1 << 30,
                block_size: 4096,
                node_name: "beta".into(),
                role: 2,
                disk_state: 2,
                generations: g,
                capabilities: 1,
                needs: SyncPlan::Full,
                own_dirty: vec![(0, 3), (100, 1)],
                own_verify: vec![(1024, 1024)],
                decision: "full resync: new secondary".into(),
                stage_bytes: 940 << 20,
            }),
            Message::Refuse {
                reason: "volume size mismatch".into(),
            },
            Message::Write {
                offset: 4096,
                fua: true,
                at_ms: 1_764_000_000_000,
            },
            Message::WriteZeroes {
                offset: 0,
                len: 1 << 40,
                fua: false,
                at_ms: 1,
            },
            Message::Trim {
                offset: 8192,
                len: 4096,
                at_ms: u64::MAX,
            },
            Message::Flush,
            Message::Applied { seq: u64::MAX },
            Message::Durable { through_seq: 17 },
            Message::Heartbeat { nonce: 3 },
            Message::HeartbeatReply { nonce: 3 },
            Message::ResyncDone { through_seq: 99 },
            Message::Goodbye { outdated: true },
            Message::ResyncStart {
                blocks: 65536,
                full: true,
            },
            Message::HashCheck {
                offset: 4096,
                block_size: 4096,
                hashes: vec![[7u8; 32]; 3],
            },
            Message::HashReply {
                seq: 9,
                mismatched: vec![0, 2],
            },
            Message::Consistent {
                seq: 12,
                at_ms: 1_764_000_000_000,
            },
            Message::Grow {
                size_bytes: 2 << 30,
            },
            Message::Grown {
                size_bytes: 2 << 30,
                error: "no".into(),
            },
            Message::SectionDone { through_seq: 99 },
        ]
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(frame, &mut out);
        out.to_vec()
    }

    fn write_frame(seq: u64, data: &[u8], level: i32) -> Frame {
        Frame {
            seq,
            msg: Message::Write {
                offset: 0,
                fua: false,
                at_ms: 0,
            },
            payload: Payload::prepare(Bytes::copy_from_slice(data), level),
        }
    }

    /// Decode fully, including opening the payload; any error along the way.
    fn decode_and_open(buf: &[u8]) -> Result<Option<(u64, Message, Bytes, usize)>, WireError> {
        match decode_frame(buf)? {
            None => Ok(None),
            Some((f, used)) => Ok(Some((f.seq, f.msg, f.payload.open()?, used))),
        }
    }

    #[test]
    fn kind_table_matches_messages() {
        for m in all_messages() {
            assert_eq!(kind_info(m.kind()), Some(m.has_payload()), "{m:?}");
        }
        let known = (0..=255u8).filter(|k| kind_info(*k).is_some()).count();
        assert_eq!(known, all_messages().len());
    }

    #[test]
    fn header_layout_is_as_documented() {
        let f = write_frame(0x0102_0304_0506_0708, b"abc", 0);
        let b = encoded(&f);
        assert_eq!(&b[0..4], b"TNDM");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 4);
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        let body_len = u32::from_le_bytes(b[16..20].try_into().unwrap());
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), 3);
        let body = &b[HEADER_LEN..HEADER_LEN + body_len as usize];
        assert_eq!(
            u32::from_le_bytes(b[28..32].try_into().unwrap()),
            crc32fast::hash(body)
        );
        assert_eq!(
            u32::from_le_bytes(b[32..36].try_into().unwrap()),
            crc32fast::hash(b"abc")
        );
        assert_eq!(
            u32::from_le_bytes(b[36..40].try_into().unwrap()),
            crc32fast::hash(&b[0..36])
        );
        assert_eq!(&b[HEADER_LEN + body_len as usize..], b"abc");
    }

    #[test]
    fn every_message_round_trips() {
        for (i, msg) in all_messages().into_iter().enumerate() {
            let payload = if msg.has_payload() {
                Payload::prepare(Bytes::from(vec![7u8; 8192]), 3)
            } else {
                Payload::empty()
            };
            let f = Frame {
                seq: i as u64,
                msg: msg.clone(),
                payload,
            };
            let b = encoded(&f);
            let (seq, m, data, used) = decode_and_open(&b).unwrap().unwrap();
            assert_eq!((seq, &m, used), (i as u64, &msg, b.len()));
            if msg.has_payload() {
                assert_eq!(data, vec![7u8; 8192]);
            } else {
                assert!(data.is_empty());
            }
        }
    }

    #[test]
    fn compression_is_used_only_when_it_shrinks() {
        let zeros = Payload::prepare(Bytes::from(vec![0u8; 65536]), 3);
        assert!(zeros.is_compressed());
        assert!(zeros.wire_len() < 1000);
        assert_eq!(zeros.raw_len(), 65536);
        let mut noise = vec![0u8; 65536];
        rand::RngCore::fill_bytes(
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7),
            &mut noise,
        );
        let noisy = Payload::prepare(Bytes::from(noise.clone()), 3);
        assert!(!noisy.is_compressed());
        assert_eq!(noisy.wire_len(), 65536);
        let plain = Payload::prepare(Bytes::from(vec![0u8; 4096]), 0);
        assert!(!plain.is_compressed());
        assert_eq!(noisy.open().unwrap(), noise);
    }

    #[test]
    fn empty_payload_opens_to_nothing() {
        assert!(Payload::empty().open().unwrap().is_empty());
        assert!(Payload::prepare(Bytes::new(), 3).open().unwrap().is_empty());
    }

    #[test]
    fn corrupted_payload_crc_is_an_error() {
        let mut p = Payload::prepare(Bytes::from(vec![1u8; 4096]), 0);
        p.crc32 ^= 1;
        assert!(matches!(
            p.open(),
            Err(WireError::PayloadCrc { seq: None, .. })
        ));
        // Received: the error names the frame.
        let mut b = encoded(&write_frame(5, &[1u8; 4096], 0));
        let last = b.len() - 1;
        b[last] ^= 0x10;
        let (f, _) = decode_frame(&b).unwrap().unwrap();
        let err = f.payload.open().unwrap_err();
        assert!(
            matches!(err, WireError::PayloadCrc { seq: Some(5), .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("frame seq 5: payload crc32 mismatch")
        );
    }

    /// Any single bit flip gives an error or an incomplete frame, never a
    /// frame that differs from the one sent. (A few bits of a zstd frame
    /// header are ignored by the decoder, e.g. the reserved bit of the frame
    /// header descriptor: flipping those yields the original data, which the
    /// payload crc then confirms.)
    #[test]
    fn every_bit_flip_is_detected() {
        for level in [0, 3] {
            let data: Vec<u8> = (0..300u32).map(|i| (i % 7) as u8).collect();
            let f = write_frame(5, &data, level);
            let b = encoded(&f);
            let mut undetected_bits = 0;
            for bit in 0..b.len() * 8 {
                let mut c = b.clone();
                c[bit / 8] ^= 1 << (bit % 8);
                match decode_and_open(&c) {
                    Err(_) | Ok(None) => {}
                    Ok(Some((seq, msg, got, _))) => {
                        assert!(
                            bit / 8 >= HEADER_LEN + 3 && level != 0,
                            "bit {bit} flipped outside a compressed payload went unnoticed"
                        );
                        assert_eq!(
                            (seq, &msg, &got[..]),
                            (f.seq, &f.msg, &data[..]),
                            "bit {bit}"
                        );
                        undetected_bits += 1;
                    }
                }
            }
            assert!(undetected_bits <= 8, "{undetected_bits} harmless flips");
        }
    }

    #[test]
    fn truncation_is_incomplete_never_a_frame() {
        let b = encoded(&write_frame(1, &[5u8; 100], 0));
        for len in 0..b.len() {
            assert!(matches!(decode_frame(&b[..len]), Ok(None)), "len {len}");
        }
        assert!(decode_frame(&b).unwrap().is_some());
    }

    /// Rewrite header fields and re-seal the header crc, as a buggy or
    /// hostile peer would.
    fn resealed(mut b: Vec<u8>, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        edit(&mut b[..HEADER_LEN]);
        let crc = crc32fast::hash(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn oversize_and_inconsistent_lengths_are_refused() {
        let b = encoded(&write_frame(1, &[5u8; 100], 0));
        let body_too_big = resealed(b.clone(), |h| {
            h[16..20].copy_from_slice(&(BODY_MAX_BYTES + 1).to_le_bytes())
        });
        assert!(matches!(
            decode_frame(&body_too_big),
            Err(WireError::TooLarge {
                what: "message body",
                ..
            })
        ));
        let payload_too_big = resealed(b.clone(), |h| {
            h[20..24].copy_from_slice(&(PAYLOAD_MAX_BYTES + 1).to_le_bytes());
            h[24..28].copy_from_slice(&(PAYLOAD_MAX_BYTES + 1).to_le_bytes());
        });
        assert!(matches!(
            decode_frame(&payload_too_big),
            Err(WireError::TooLarge {
                what: "payload",
                ..
            })
        ));
        let wire_ne_raw = resealed(b.clone(), |h| {
            h[24..28].copy_from_slice(&99u32.to_le_bytes())
        });
        assert!(matches!(
            decode_frame(&wire_ne_raw),
            Err(WireError::PayloadLengths { .. })
        ));
        let compressed_bomb = resealed(b.clone(), |h| {
            h[6] = 1;
            h[24..28].copy_from_slice(&1u32.to_le_bytes());
        });
        assert!(matches!(
            decode_frame(&compressed_bomb),
            Err(WireError::PayloadLengths { .. })
        ));
        let unknown_flag = resealed(b.clone(), |h| h[7] = 0x80);
        assert!(matches!(
            decode_frame(&unknown_flag),
            Err(WireError::BadFlags { .. })
        ));
        let unknown_kind = resealed(b.clone(), |h| h[5] = 200);
        assert!(matches!(
            decode_frame(&unknown_kind),
            Err(WireError::UnknownKind { kind: 200, .. })
        ));
        let wrong_kind = resealed(b.clone(), |h| h[5] = 7);
        assert!(matches!(
            decode_frame(&wrong_kind),
            Err(WireError::UnexpectedPayload { .. })
        ));
        let version = resealed(b, |h| h[4] = 2);
        assert!(matches!(
            decode_frame(&version),
            Err(WireError::BadVersion { found: 2 })
        ));
    }

    #[test]
    fn kind_must_match_body() {
        let f = Frame {
            seq: 3,
            msg: Message::Heartbeat { nonce: 1 },
            payload: Payload::empty(),
        };
        let b = resealed(encoded(&f), |h| {
            h[5] = Message::HeartbeatReply { nonce: 0 }.kind()
        });
        assert!(matches!(
            decode_frame(&b),
            Err(WireError::KindMismatch { .. })
        ));
    }

    #[test]
    fn trailing_body_bytes_are_refused() {
        let f = Frame {
            seq: 3,
            msg: Message::Flush,
            payload: Payload::empty(),
        };
        let mut b = encoded(&f);
        b.push(0);
        let body_len = (b.len() - HEADER_LEN) as u32;
        let body_crc = crc32fast::hash(&b[HEADER_LEN..]);
        let b = resealed(b, |h| {
            h[16..20].copy_from_slice(&body_len.to_le_bytes());
            h[28..32].copy_from_slice(&body_crc.to_le_bytes());
        });
        assert!(matches!(
            decode_frame(&b),
            Err(WireError::TrailingBody {
                trailing_bytes: 1,
                ..
            })
        ));
    }

    #[test]
    fn decompression_is_bounded_by_raw_len() {
        // A valid zstd frame of 64 KiB zeros announced as 100 raw bytes.
        let big = zstd::bulk::compress(&[0u8; 65536], 3).unwrap();
        let p = Payload {
            wire: Bytes::from(big),
            raw_len_bytes: 100,
            crc32: crc32fast::hash(&[0u8; 100]),
            compressed: true,
            received_seq: Some(9),
        };
        assert!(matches!(p.open(), Err(WireError::Decompress { .. })));
    }

    #[tokio::test]
    async fn read_frame_reads_a_stream_of_frames_then_closed() {
        let mut stream = BytesMut::new();
        let msgs = all_messages();
        for (i, m) in msgs.iter().enumerate() {
            let payload = if m.has_payload() {
                Payload::prepare(Bytes::from(vec![3u8; 100_000]), 1)
            } else {
                Payload::empty()
            };
            encode_frame(
                &Frame {
                    seq: i as u64,
                    msg: m.clone(),
                    payload,
                },
                &mut stream,
            );
        }
        let bytes = stream.freeze();
        let mut r: &[u8] = &bytes;
        let mut scratch = BytesMut::new();
        for (i, m) in msgs.iter().enumerate() {
            let f = read_frame(&mut r, &mut scratch).await.unwrap();
            assert_eq!((f.seq, &f.msg), (i as u64, m));
            let data = f.payload.open().unwrap();
            assert_eq!(data.len(), if m.has_payload() { 100_000 } else { 0 });
        }
        assert!(matches!(
            read_frame(&mut r, &mut scratch).await,
            Err(WireError::Closed)
        ));
    }

    #[tokio::test]
    async fn read_frame_eof_mid_frame_is_truncated_not_closed() {
        let b = encoded(&write_frame(1, &[5u8; 100], 0));
        for len in [1, 20, HEADER_LEN, HEADER_LEN + 2, b.len() - 1] {
            let mut r: &[u8] = &b[..len];
            let err = read_frame(&mut r, &mut BytesMut::new()).await.unwrap_err();
            assert!(
                matches!(err, WireError::Truncated { .. }),
                "len {len}: {err}"
            );
        }
        let mut r: &[u8] = b"\x16\x03\x01\x02\x00 tls client hello";
        assert!(matches!(
            read_frame(&mut r, &mut BytesMut::new()).await,
            Err(WireError::BadMagic { .. })
        ));
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<bool>(), any::<u64>())
                .prop_map(|(offset, fua, at_ms)| Message::Write { offset, fua, at_ms }),
            (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(offset, len, fua)| {
                Message::WriteZeroes {
                    offset,
                    len,
                    fua,
                    at_ms: 7,
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Message::Trim {
                offset,
                len,
                at_ms: 9
            }),
            Just(Message::Flush),
            any::<u64>().prop_map(|seq| Message::Applied { seq }),
            any::<u64>().prop_map(|through_seq| Message::Durable { through_seq }),
            any::<u64>().prop_map(|nonce| Message::Heartbeat { nonce }),
            ".{0,200}".prop_map(|reason| Message::Refuse { reason }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(
            seq in any::<u64>(),
            msg in arb_message(),
            data in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..20_000),
                (0usize..50_000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
            ],
            level in prop_oneof![Just(0), 1..=5i32, Just(-1)],
        ) {
            let payload = if msg.has_payload() {
                Payload::prepare(Bytes::from(data.clone()), level)
            } else {
                Payload::empty()
            };
            prop_assert!(payload.wire_len() <= payload.raw_len());
            let b = encoded(&Frame { seq, msg: msg.clone(), payload });
            let mut with_next = b.clone();
            with_next.extend_from_slice(&b[..HEADER_LEN / 2]);
            let (s, m, d, used) = decode_and_open(&with_next).unwrap().unwrap();
            prop_assert_eq!(s, seq);
            prop_assert_eq!(m, msg.clone());
            prop_assert_eq!(used, b.len());
            if msg.has_payload() {
                prop_assert_eq!(&d[..], &data[..]);
            } else {
                prop_assert!(d.is_empty());
            }
        }

        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_and_open(&buf);
        }

        #[test]
        fn random_corruption_never_yields_a_wrong_frame(
            msg in arb_message(),
            data in proptest::collection::vec(0u8..4, 0..2000),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let data = if msg.has_payload() { data } else { Vec::new() };
            let payload = if msg.has_payload() {
                Payload::prepare(Bytes::from(data.clone()), 3)
            } else {
                Payload::empty()
            };
            let mut b = encoded(&Frame { seq: 1, msg: msg.clone(), payload });
            let i = at.index(b.len());
            b[i] ^= xor;
            if let Ok(Some((seq, m, d, _))) = decode_and_open(&b) {
                // Only an ignored bit of a zstd frame header can go unnoticed,
                // and then the data is exactly what was sent.
                prop_assert_eq!(seq, 1);
                prop_assert_eq!(m, msg);
                prop_assert_eq!(&d[..], &data[..]);
            }
        }
    }
}
