//! The peer link, once for both roles: a batching frame writer with heartbeats
//! and a frame reader with a silence timeout, generic over any
//! `AsyncRead`/`AsyncWrite` (TLS, plain TCP, or an in-memory duplex in tests);
//! the handshake frames (`send_message`, `send_refusal`); and the identity
//! checks both sides make (G6).
//!
//! **Stream compression** (issue 11 item 4; both ends advertise
//! [`caps::ZSTD_STREAM`](crate::wire::caps::ZSTD_STREAM)): the primary's writer
//! compresses its whole byte stream with one zstd context per connection, so a
//! frame's payload is matched against everything sent before it (the history
//! window), not only against itself. Frames still carry the crc32 of their
//! uncompressed payload (G5): the reader decompresses the stream, then checks each
//! frame as before. On the wire the stream is cut into chunks, each a 4-byte
//! little-endian header (bit 31: compressed; bits 0..31: length) and its bytes; a
//! batch of frames is one chunk, compressed with a zstd flush at its end (so the
//! reader can decode everything sent so far), or sent raw when the data does
//! not compress. See [`StreamCompressor`] for how the level adapts.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::wire::{self, Frame, Message, Payload};

/// Frames queued to the writer at most (backpressure on the owner: the
/// replication window bounds what is in flight anyway).
pub const WRITER_QUEUE_FRAMES_MAX: usize = 8192;

/// Why a link ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the peer was silent for {0} ms (heartbeat timeout)")]
    Silent(u64),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the connection broke: {0}")]
    Broken(String),
    #[error("bad frame from the peer, dropping the connection: {0}")]
    BadFrame(String),
    #[error("the session was closed by this node")]
    ClosedHere,
}

/// One read that must deliver something within `timeout_ms` (else the peer is silent).
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    timeout_ms: u64,
) -> Result<usize, LinkError> {
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(Duration::from_millis(timeout_ms), rd.read(buf)).await {
        Err(_) => Err(LinkError::Silent(timeout_ms)),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(LinkError::Broken(e.to_string())),
    }
}

/// [`read_some`] into the spare capacity of `buf` (no zero-fill), at most `max`
/// bytes.
async fn read_some_buf<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
    timeout_ms: u64,
) -> Result<usize, LinkError> {
    use tokio::io::AsyncReadExt;
    let mut limited = (&mut *rd).take(max as u64);
    match tokio::time::timeout(Duration::from_millis(timeout_ms), limited.read_buf(buf)).await {
        Err(_) => Err(LinkError::Silent(timeout_ms)),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(LinkError::Broken(e.to_string())),
    }
}

/// Read frames; heartbeats are answered (through `hb_tx`, the writer's heartbeat
/// queue) and not returned. A peer silent for `timeout_ms` is dead.
pub struct FrameReader<R> {
    rd: R,
    scratch: BytesMut,
    timeout_ms: u64,
    hb_tx: Option<mpsc::Sender<u64>>,
    /// wan: the peer sends a chunked, zstd-compressed stream (see the module docs).
    stream: Option<StreamDecoder>,
}

/// Bytes a chunk may decode to at most (a batch of frames: 4 MiB of frames plus
/// one largest payload, with room to spare).
const CHUNK_DECODED_MAX_BYTES: usize = 64 << 20;
/// Chunk header bit: the chunk's bytes continue the connection's zstd stream.
const CHUNK_COMPRESSED: u32 = 1 << 31;

/// The reading end of stream compression.
struct StreamDecoder {
    dctx: zstd::zstd_safe::DCtx<'static>,
    /// Decoded bytes not yet parsed into frames.
    decoded: BytesMut,
    chunk: Vec<u8>,
}

impl StreamDecoder {
    fn new() -> StreamDecoder {
        StreamDecoder {
            dctx: zstd::zstd_safe::DCtx::create(),
            decoded: BytesMut::new(),
            chunk: Vec::new(),
        }
    }

    /// Read one chunk and append what it decodes to. The peer is silent (dead)
    /// only when no byte arrives for `timeout_ms`: a chunk of megabytes takes
    /// seconds over a slow link (e2e_faults' async switchover over 1 MiB/s timed
    /// out every session when the whole chunk had to arrive within the timeout).
    async fn read_chunk<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        timeout_ms: u64,
    ) -> Result<(), LinkError> {
        let mut hdr = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match read_some(rd, &mut hdr[got..], timeout_ms).await? {
                0 if got == 0 => return Err(LinkError::Closed),
                0 => {
                    return Err(LinkError::Broken(
                        "the peer closed inside a chunk header".into(),
                    ));
                }
                n => got += n,
            }
        }
        let word = u32::from_le_bytes(hdr);
        let len = (word & !CHUNK_COMPRESSED) as usize;
        if len > CHUNK_DECODED_MAX_BYTES {
            return Err(LinkError::BadFrame(format!(
                "a stream chunk of {len} bytes (at most {CHUNK_DECODED_MAX_BYTES})"
            )));
        }
        let closed = || LinkError::Broken("the peer closed inside a chunk".into());
        if word & CHUNK_COMPRESSED == 0 {
            // Raw: straight into the decoded bytes (no staging copy; on a fast
            // link the stream is mostly raw chunks, see `StreamCompressor`).
            self.decoded.reserve(len);
            let mut got = 0;
            while got < len {
                match read_some_buf(rd, &mut self.decoded, len - got, timeout_ms).await? {
                    0 => return Err(closed()),
                    n => got += n,
                }
            }
            return Ok(());
        }
        self.chunk.resize(len, 0);
        let mut got = 0;
        while got < len {
            match read_some(rd, &mut self.chunk[got..], timeout_ms).await? {
                0 => return Err(closed()),
                n => got += n,
            }
        }
        let mut input = zstd::zstd_safe::InBuffer::around(&self.chunk);
        let mut out: Vec<u8> = Vec::with_capacity(len * 4 + 4096);
        loop {
            if out.capacity() - out.len() < 64 << 10 {
                out.reserve(out.capacity().max(128 << 10));
            }
            if out.len() > CHUNK_DECODED_MAX_BYTES {
                return Err(LinkError::BadFrame(format!(
                    "a stream chunk decodes to more than {CHUNK_DECODED_MAX_BYTES} bytes"
                )));
            }
            let pos = out.len();
            let mut output = zstd::zstd_safe::OutBuffer::around_pos(&mut out, pos);
            self.dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| {
                    LinkError::BadFrame(format!(
                        "the compressed stream does not decode: {}",
                        zstd::zstd_safe::get_error_name(code)
                    ))
                })?;
            let produced = output.pos() > pos;
            // Done once the input is consumed and the last call filled less than
            // the room it had (nothing left inside the decoder).
            if input.pos() == self.chunk.len() && !(produced && out.capacity() == out.len()) {
                break;
            }
        }
        self.decoded.extend_from_slice(&out);
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(rd: R, timeout_ms: u64, hb_tx: Option<mpsc::Sender<u64>>) -> Self {
        FrameReader {
            rd,
            scratch: BytesMut::new(),
            timeout_ms,
            hb_tx,
            stream: None,
        }
    }

    /// wan (issue 11 item 4): the peer's frames come as a compressed stream.
    pub fn with_stream_decoding(mut self, on: bool) -> Self {
        self.stream = on.then(StreamDecoder::new);
        self
    }

    /// The next frame of a compressed stream.
    async fn next_from_stream(&mut self) -> Result<Frame, LinkError> {
        let d = self.stream.as_mut().expect("stream decoding");
        loop {
            match wire::decode_frame_split(&mut d.decoded) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => return Err(LinkError::BadFrame(e.to_string())),
            }
            d.read_chunk(&mut self.rd, self.timeout_ms).await?;
        }
    }

    /// The next frame that is not a heartbeat.
    pub async fn next(&mut self) -> Result<Frame, LinkError> {
        loop {
            if self.stream.is_some() {
                let frame = self.next_from_stream().await?;
                match frame.msg {
                    Message::Heartbeat { nonce } => {
                        if let Some(tx) = &self.hb_tx {
                            let _ = tx.try_send(nonce);
                        }
                    }
                    Message::HeartbeatReply { .. } => {}
                    _ => return Ok(frame),
                }
                continue;
            }
            let frame = match tokio::time::timeout(
                Duration::from_millis(self.timeout_ms),
                wire::read_frame(&mut self.rd, &mut self.scratch),
            )
            .await
            {
                Err(_) => return Err(LinkError::Silent(self.timeout_ms)),
                Ok(Err(wire::WireError::Closed)) => return Err(LinkError::Closed),
                Ok(Err(e @ (wire::WireError::Io { .. } | wire::WireError::Truncated { .. }))) => {
                    return Err(LinkError::Broken(e.to_string()));
                }
                Ok(Err(e)) => return Err(LinkError::BadFrame(e.to_string())),
                Ok(Ok(f)) => f,
            };
            match frame.msg {
                Message::Heartbeat { nonce } => {
                    if let Some(tx) = &self.hb_tx {
                        let _ = tx.try_send(nonce);
                    }
                }
                Message::HeartbeatReply { .. } => {}
                _ => return Ok(frame),
            }
        }
    }
}

/// Write frames in batches: everything queued goes out in one vectored write and
/// one flush; a heartbeat when idle; replies to the peer's heartbeats. Ends when
/// the queue closes (after writing what it held) or a Goodbye/Refuse is written.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    wr: W,
    rx: mpsc::Receiver<Frame>,
    hb_rx: mpsc::Receiver<u64>,
    heartbeat_interval_ms: u64,
) -> LinkError {
    run_writer_compressed(wr, rx, hb_rx, heartbeat_interval_ms, None).await
}

/// [`run_writer`], with the whole stream compressed when `compress` is given
/// (wan, issue 11 item 4; the reader must use
/// [`FrameReader::with_stream_decoding`]).
pub async fn run_writer_compressed<W: AsyncWrite + Unpin>(
    wr: W,
    rx: mpsc::Receiver<Frame>,
    hb_rx: mpsc::Receiver<u64>,
    heartbeat_interval_ms: u64,
    compress: Option<StreamCompressor>,
) -> LinkError {
    run_writer_converting(wr, rx, |f| f, hb_rx, heartbeat_interval_ms, compress).await
}

/// [`run_writer_compressed`] fed by the sender's own messages, each made a
/// frame by `to_frame` as it is taken from the queue: no task between the
/// sender and the socket (the primary's payloads need only their crc32 when
/// the stream is compressed as a whole; issue 11 item 3).
pub async fn run_writer_converting<W: AsyncWrite + Unpin, T>(
    mut wr: W,
    mut rx: mpsc::Receiver<T>,
    mut to_frame: impl FnMut(T) -> Frame,
    mut hb_rx: mpsc::Receiver<u64>,
    heartbeat_interval_ms: u64,
    mut compress: Option<StreamCompressor>,
) -> LinkError {
    let mut buf = BytesMut::with_capacity(1 << 20);
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_interval_ms));
    let mut nonce = 0u64;
    let mut last_send = Instant::now();
    loop {
        tokio::select! {
            f = rx.recv() => match f {
                None => {
                    let _ = wr.shutdown().await;
                    return LinkError::ClosedHere;
                }
                Some(f) => {
                    let f = to_frame(f);
                    // Heartbeat replies may wait in the buffer: they go first,
                    // and count (a raw chunk's header is this length).
                    let mut batch = Batch {
                        len_bytes: buf.len(),
                        ..Batch::default()
                    };
                    let mut last = is_last(&f.msg);
                    // A compressed stream needs the batch's bytes in one buffer,
                    // except in a raw span: then large payloads go out as their
                    // own slices (no copy into the batch, none into the chunk).
                    let whole = compress.as_ref().is_some_and(|c| c.raw_left == 0);
                    batch.push(&f, &mut buf, whole);
                    let mut more = false;
                    while batch.len_bytes < (4 << 20) && !last {
                        match rx.try_recv() {
                            Ok(f) => {
                                let f = to_frame(f);
                                last |= is_last(&f.msg);
                                batch.push(&f, &mut buf, whole);
                            }
                            Err(_) => break,
                        }
                    }
                    if batch.len_bytes >= (4 << 20) {
                        more = !rx.is_empty();
                    }
                    let idle = !more && rx.is_empty();
                    let written = match compress.take() {
                        Some(c) if !whole => {
                            let (c, r) = write_raw_batch(&mut wr, c, batch, &mut buf, more).await;
                            compress = Some(c);
                            r
                        }
                        Some(c) => {
                            let raw = buf.split().freeze();
                            let (c, r) = write_compressed(&mut wr, c, raw, more, idle).await;
                            compress = Some(c);
                            r
                        }
                        None => batch.write(&mut wr, &mut buf).await,
                    };
                    if let Err(e) = written {
                        return LinkError::Broken(e.to_string());
                    }
                    if let Err(e) = wr.flush().await {
                        return LinkError::Broken(e.to_string());
                    }
                    last_send = Instant::now();
                    if last {
                        let _ = wr.shutdown().await;
                        return LinkError::ClosedHere;
                    }
                }
            },
            Some(n) = hb_rx.recv() => {
                wire::encode_frame(&control_frame(Message::HeartbeatReply { nonce: n }), &mut buf);
            }
            _ = heartbeat.tick() => {
                if last_send.elapsed() >= Duration::from_millis(heartbeat_interval_ms) || !buf.is_empty() {
                    nonce += 1;
                    wire::encode_frame(&control_frame(Message::Heartbeat { nonce }), &mut buf);
                    if compress.is_some() {
                        // A raw chunk: heartbeats are not worth the compressor.
                        let hdr = (buf.len() as u32).to_le_bytes();
                        if let Err(e) = wr.write_all(&hdr).await {
                            return LinkError::Broken(e.to_string());
                        }
                    }
                    if let Err(e) = wr.write_all(&buf).await {
                        return LinkError::Broken(e.to_string());
                    }
                    buf.clear();
                    if let Err(e) = wr.flush().await {
                        return LinkError::Broken(e.to_string());
                    }
                    last_send = Instant::now();
                }
            }
        }
    }
}

fn is_last(m: &Message) -> bool {
    matches!(m, Message::Goodbye { .. } | Message::Refuse { .. })
}

/// A payload-free frame (acknowledgements, heartbeats, markers, handshake).
pub fn control_frame(msg: Message) -> Frame {
    Frame {
        seq: 0,
        msg,
        payload: Payload::empty(),
    }
}

/// Frames queued for one write. Small frames are encoded together into one buffer
/// (one TLS record for many ack-sized frames); a payload of 64 KiB or more is not
/// copied but sent as its own slice of a vectored write.
#[derive(Default)]
struct Batch {
    chunks: std::collections::VecDeque<Bytes>,
    len_bytes: usize,
}

impl Batch {
    const SPLIT_PAYLOAD_BYTES: usize = 64 << 10;

    /// `whole`: everything into `buf` (the stream is compressed as one).
    fn push(&mut self, frame: &Frame, buf: &mut BytesMut, whole: bool) {
        let before = buf.len();
        if !whole && frame.payload.wire_len() as usize >= Self::SPLIT_PAYLOAD_BYTES {
            let payload = wire::encode_frame_split(frame, buf);
            self.len_bytes += buf.len() - before + payload.len();
            self.chunks.push_back(buf.split().freeze());
            self.chunks.push_back(payload);
        } else {
            wire::encode_frame(frame, buf);
            self.len_bytes += buf.len() - before;
        }
    }

    /// Write everything (what is still in `buf` goes last).
    async fn write<W: AsyncWrite + Unpin>(
        mut self,
        wr: &mut W,
        buf: &mut BytesMut,
    ) -> std::io::Result<()> {
        if !buf.is_empty() {
            self.chunks.push_back(buf.split().freeze());
        }
        while !self.chunks.is_empty() {
            let slices: Vec<std::io::IoSlice<'_>> = self
                .chunks
                .iter()
                .take(64)
                .map(|c| std::io::IoSlice::new(c))
                .collect();
            let mut n = wr.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let front = self
                    .chunks
                    .front_mut()
                    .expect("bytes written come from queued chunks");
                if n >= front.len() {
                    n -= front.len();
                    self.chunks.pop_front();
                } else {
                    bytes::Buf::advance(front, n);
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// Batches up to this size are compressed on the writer task itself: a few
/// small frames take tens of microseconds, less than the hand-off to a blocking
/// thread and back that every QD1 write would pay (issue 11 item 3).
const INLINE_ENCODE_MAX_BYTES: usize = 16 << 10;

/// A latency-first stream (sync mode) sends batches up to this size raw when
/// nothing else is queued: a writer that keeps up is not short of link, and
/// every microsecond of compression is added to a client write's round trip
/// (4 KiB at level 3: ~25 µs of the primary's ~160 µs of CPU per sync QD1
/// write). Once frames queue up, batches grow past it and compress again.
const IDLE_RAW_MAX_BYTES: usize = 16 << 10;

/// Compress `raw` (a batch of encoded frames; a large one on a blocking
/// thread), write it as one chunk, and tell the compressor how long each part
/// took. `more`: frames were still queued when the batch closed (the writer is
/// the bottleneck); `idle`: none were.
async fn write_compressed<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut c: StreamCompressor,
    raw: Bytes,
    more: bool,
    idle: bool,
) -> (StreamCompressor, std::io::Result<()>) {
    let started = Instant::now();
    let raw_len = raw.len() as u64;
    let mut out = std::mem::take(&mut c.out);
    if c.latency_first && idle && raw.len() <= IDLE_RAW_MAX_BYTES {
        // Not a window's sample: the adaptive rules measure batches that load
        // the link or the CPU.
        out.clear();
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&raw);
        let r = wr.write_all(&out).await;
        c.wire_total += out.len() as u64;
        if let Some(m) = &c.metrics {
            crate::metrics::Metrics::add(&m.replicated_wire_bytes, out.len() as u64);
        }
        out.clear();
        c.out = out;
        return (c, r);
    }
    // A raw span's batches go through `write_raw_batch`.
    debug_assert_eq!(c.raw_left, 0, "a raw span's batch was to be compressed");
    let (mut c, mut out, result) = if raw.len() <= INLINE_ENCODE_MAX_BYTES {
        let r = c.encode(&raw, &mut out);
        (c, out, r)
    } else {
        match tokio::task::spawn_blocking(move || {
            let r = c.encode(&raw, &mut out);
            (c, out, r)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                return (
                    StreamCompressor::new(1, None),
                    Err(std::io::Error::other(format!("compression task: {e}"))),
                );
            }
        }
    };
    let compressed = match result {
        Ok(compressed) => compressed,
        Err(e) => return (c, Err(e)),
    };
    let compress_time = if compressed {
        started.elapsed()
    } else {
        Duration::ZERO
    };
    let write_started = Instant::now();
    let r = wr.write_all(&out).await;
    let write_time = write_started.elapsed();
    let wire = out.len() as u64;
    out.clear();
    c.out = out;
    if let Some(m) = &c.metrics {
        crate::metrics::Metrics::add(&m.replicated_wire_bytes, wire);
    }
    c.observe(compressed, raw_len, wire, compress_time, write_time, more);
    (c, r)
}

/// In a raw span: write `batch` as one raw chunk, its large payloads as their
/// own slices of a vectored write (sync seq 1M on loopback: copying each batch
/// into one buffer, and that into the chunk, was 11% of the primary's CPU).
async fn write_raw_batch<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut c: StreamCompressor,
    mut batch: Batch,
    buf: &mut BytesMut,
    more: bool,
) -> (StreamCompressor, std::io::Result<()>) {
    let raw_len = batch.len_bytes as u64;
    c.raw_left = c.raw_left.saturating_sub(raw_len);
    if c.raw_cpu && c.raw_left == 0 {
        // The span is over: measure the compressor again, briefly.
        c.raw_cpu = false;
        c.probe = true;
    }
    let hdr = u32::try_from(raw_len).expect("a batch is a few MiB");
    batch
        .chunks
        .push_front(Bytes::copy_from_slice(&hdr.to_le_bytes()));
    let write_started = Instant::now();
    let r = batch.write(wr, buf).await;
    let write_time = write_started.elapsed();
    let wire = raw_len + 4;
    if let Some(m) = &c.metrics {
        crate::metrics::Metrics::add(&m.replicated_wire_bytes, wire);
    }
    c.observe(false, raw_len, wire, Duration::ZERO, write_time, more);
    (c, r)
}

/// The compressing end of a connection's stream (see the module docs).
///
/// **Adaptive level.** It starts at the configured level, at least 3 (zstd -3
/// is where the issue's /usr/lib tar reaches 2.5:1). Every window (≥ 16 MiB of
/// input and ≥ 1 s) it compares the time spent compressing with the time spent
/// waiting for the socket to take the bytes, while the writer was busy:
/// - the link is the bottleneck (writes wait at least as long as compression):
///   one level up, two when writes wait 3× longer (at most [`Self::LEVEL_MAX`]):
///   CPU is spare, every byte saved is link time;
/// - the CPU is (compression takes twice as long as the writes): one level down
///   (not below 1);
/// - the CPU is, on a link that has been the bottleneck (the level went too far
///   up): one level down, and that level becomes a ceiling, tried again one
///   level higher after [`Self::CEILING_HOLD`] link-bound windows at it. Not raw
///   unless the rate the link carried when it was the bottleneck says so: its
///   writes now wait for nothing only because the compressor feeds it less than
///   it carries;
/// - data that does not shrink by 10%, unless the link is the bottleneck, goes
///   raw for the next 16 MiB (random, encrypted, already compressed), then
///   compression is tried again;
/// - the CPU is the bottleneck and the link carries bytes faster than the
///   compressor makes them (a LAN, loopback), at level 1 (or at any level when
///   the link is 4× faster): raw for a span (256 MiB, doubled at each such
///   episode in a row, at most 4 GiB), then a short window (≥ 100 ms) compressed
///   again to measure. A raw window whose writes show the link slower than the
///   compressor (its rate in the last compressed window, with a 25% margin) ends
///   the span early and resets it: on a WAN, one window of raw data at most.
///   Not in the first 64 MiB on the wire, while the socket's buffers take bytes
///   faster than any link. (Sync seq 1M on loopback, fio's data: 220 MB/s
///   compressing at level 1, 450–600 MB/s with this rule.)
///
/// A level change ends the zstd frame (single-threaded zstd applies a new level
/// at a frame start, and the new frame starts without history); the reader
/// decodes consecutive frames as one stream. So that few frames end, a window is
/// ≥ 16 MiB of input and ≥ 1 s: shorter ones mostly measured the socket's buffer
/// filling or draining (bench wan: a level change every ~16 MiB of the tar, each
/// one losing up to 16 MiB of history).
///
/// **Latency first** (sync mode): a small batch written while nothing else is
/// queued goes raw, outside the windows (see [`IDLE_RAW_MAX_BYTES`]).
///
/// **Long window.** Once the link has been the bottleneck the stream also
/// matches 16 MiB back (see [`Self::set_level`]), from then on at every level
/// from 3.
pub struct StreamCompressor {
    cctx: zstd::zstd_safe::CCtx<'static>,
    /// Small idle batches go raw (sync mode).
    latency_first: bool,
    level: i32,
    /// A level change waits for the current frame to end.
    pending_level: Option<i32>,
    /// The link has been the bottleneck: frames from level 3 use the long window.
    link_bound_seen: bool,
    /// Wire bytes per second the link carried in the last window it was the
    /// bottleneck of (or a busy raw window): what it can carry. A window the
    /// socket took at once says only that the link carries more than it was fed.
    link_capacity: Option<f64>,
    /// No level above this one: the CPU was the bottleneck one level higher on
    /// a link that had been the bottleneck before.
    ceiling: i32,
    /// Link-bound windows in a row at the ceiling (see [`Self::CEILING_HOLD`]).
    at_ceiling: u32,
    /// Input bytes still to send raw.
    raw_left: u64,
    /// The raw bytes of `raw_left` are there because the compressor could not
    /// keep up with the link (not because the data did not compress).
    raw_cpu: bool,
    /// Length of the next CPU-bound raw span.
    raw_span: u64,
    /// Raw bytes per second of compression time in the last compressed window.
    compress_rate: f64,
    /// Bytes written to the wire on this connection.
    wire_total: u64,
    /// The next compressed window follows a CPU-bound raw span: it ends after
    /// [`Self::PROBE_TIME`] rather than [`Self::WINDOW_TIME`].
    probe: bool,
    out: Vec<u8>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    win: Window,
    /// Level changes and raw episodes, for the log and tests.
    pub changes: u32,
}

#[derive(Default)]
struct Window {
    started: Option<Instant>,
    /// Its chunks went raw (a window holds chunks of one kind).
    raw_chunks: bool,
    raw: u64,
    wire: u64,
    compress: Duration,
    write: Duration,
    busy: bool,
}

impl StreamCompressor {
    pub const LEVEL_MAX: i32 = 9;
    /// From this level on, frames of a link-bound stream use a long window (see
    /// `set_level`).
    pub const LONG_LEVEL: i32 = 3;
    const LONG_WINDOW_LOG: u32 = 24;
    const WINDOW_BYTES: u64 = 16 << 20;
    const WINDOW_TIME: Duration = Duration::from_secs(1);
    const PROBE_TIME: Duration = Duration::from_millis(100);
    const RAW_SPAN_MIN: u64 = 256 << 20;
    const RAW_SPAN_MAX: u64 = 4 << 30;
    /// Wire bytes before the CPU-bound raw rule applies (socket buffers first).
    const RAW_WARMUP: u64 = 64 << 20;
    /// Link-bound windows in a row at the ceiling before one level above it is
    /// tried again (the CPU or the data may have changed): ~30 s.
    const CEILING_HOLD: u32 = 30;
    /// A link-bound window measures the link's capacity when its writes took
    /// at least this long (shorter ones mostly measure the socket's buffers).
    const CAPACITY_WRITE_MIN: Duration = Duration::from_millis(100);

    /// Start at `level` (clamped to 3..=LEVEL_MAX); wire bytes are counted in
    /// `metrics.replicated_wire_bytes` when given.
    pub fn new(level: i32, metrics: Option<std::sync::Arc<crate::metrics::Metrics>>) -> Self {
        let level = level.clamp(3, Self::LEVEL_MAX);
        let mut cctx = zstd::zstd_safe::CCtx::create();
        Self::set_level(&mut cctx, level, false);
        StreamCompressor {
            cctx,
            level,
            pending_level: None,
            link_bound_seen: false,
            link_capacity: None,
            ceiling: Self::LEVEL_MAX,
            at_ceiling: 0,
            raw_left: 0,
            raw_cpu: false,
            raw_span: Self::RAW_SPAN_MIN,
            compress_rate: 0.0,
            wire_total: 0,
            probe: false,
            out: Vec::new(),
            metrics,
            win: Window::default(),
            changes: 0,
            latency_first: false,
        }
    }

    /// Latency first (sync mode): small batches written while nothing else is
    /// queued go raw (see [`IDLE_RAW_MAX_BYTES`]).
    pub fn latency_first(mut self, on: bool) -> Self {
        self.latency_first = on;
        self
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// Parameters of the next frame. With `link_bound` (the link has been the
    /// bottleneck) and from [`Self::LONG_LEVEL`], the frame also matches against a
    /// 16 MiB window with long-distance matching: on the issue's /usr/lib tar
    /// (`zstd -b`, one core), -3 gives 2.50:1 at 176 MB/s, -3 --long=24 2.60:1 at
    /// about the same speed, -4 --long=24 2.63:1 at 88 MB/s. It costs ~18 MiB on
    /// each end while used; a link never seen as the bottleneck (loopback, a LAN
    /// faster than the compressor) stays at the level's 2 MiB default.
    fn set_level(cctx: &mut zstd::zstd_safe::CCtx<'static>, level: i32, link_bound: bool) {
        use zstd::zstd_safe::CParameter;
        let long = link_bound && level >= Self::LONG_LEVEL;
        let _ = cctx.set_parameter(CParameter::CompressionLevel(level));
        let _ = cctx.set_parameter(CParameter::EnableLongDistanceMatching(long));
        // 0: the level's own window.
        let _ = cctx.set_parameter(CParameter::WindowLog(if long {
            Self::LONG_WINDOW_LOG
        } else {
            0
        }));
    }

    /// Compress `input` into `out` as one chunk (header included), ending with a
    /// zstd flush (or a frame end when the level changes next). Ok(true).
    fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<bool> {
        use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective;
        out.clear();
        out.extend_from_slice(&[0u8; 4]);
        out.reserve(zstd::zstd_safe::compress_bound(input.len()) + 64);
        let end = self.pending_level.is_some();
        let directive = if end {
            ZSTD_EndDirective::ZSTD_e_end
        } else {
            ZSTD_EndDirective::ZSTD_e_flush
        };
        let mut inb = zstd::zstd_safe::InBuffer::around(input);
        loop {
            if out.capacity() - out.len() < 64 << 10 {
                out.reserve(128 << 10);
            }
            let pos = out.len();
            let mut outb = zstd::zstd_safe::OutBuffer::around_pos(out, pos);
            let remaining = self
                .cctx
                .compress_stream2(&mut outb, &mut inb, directive)
                .map_err(|code| {
                    std::io::Error::other(format!(
                        "zstd: {}",
                        zstd::zstd_safe::get_error_name(code)
                    ))
                })?;
            if remaining == 0 && inb.pos() == input.len() {
                break;
            }
        }
        if let Some(level) = self.pending_level.take() {
            self.level = level;
            Self::set_level(&mut self.cctx, level, self.link_bound_seen);
        }
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&(len | CHUNK_COMPRESSED).to_le_bytes());
        Ok(true)
    }

    /// Account one chunk; at the end of a window, adapt (see the type's docs).
    fn observe(
        &mut self,
        compressed: bool,
        raw: u64,
        wire: u64,
        compress_time: Duration,
        write_time: Duration,
        more: bool,
    ) {
        self.wire_total += wire;
        if self.win.started.is_some() && self.win.raw_chunks == compressed {
            // The kind of chunk changed: a window measures one kind.
            self.win = Window::default();
        }
        let w = &mut self.win;
        w.raw_chunks = !compressed;
        let now = Instant::now();
        let started = *w.started.get_or_insert(now);
        w.raw += raw;
        w.wire += wire;
        w.compress += compress_time;
        w.write += write_time;
        let wall = now.duration_since(started);
        // Busy: frames were waiting, or the writer worked most of the window.
        w.busy |= more || (w.compress + w.write) * 2 > wall;
        let probing = self.probe && compressed;
        let min_time = if probing {
            Self::PROBE_TIME
        } else {
            Self::WINDOW_TIME
        };
        if w.raw < Self::WINDOW_BYTES || wall < min_time {
            return;
        }
        let w = std::mem::take(&mut self.win);
        if probing {
            self.probe = false;
        }
        if w.raw_chunks {
            self.observe_raw(&w);
            return;
        }
        let ratio = w.wire as f64 / w.raw as f64;
        let level = self.pending_level.unwrap_or(self.level);
        let link_bound = w.busy && w.write >= w.compress;
        self.compress_rate = w.raw as f64 / w.compress.as_secs_f64().max(1e-6);
        let measured_rate = w.wire as f64 / w.write.as_secs_f64().max(1e-6);
        // CPU-bound, and the link carries bytes faster than the compressor makes
        // them: raw for a span, whatever the ratio (fio's buffers shrink to
        // 0.88-0.95: checked after the ratio rule, a window at 0.9-0.95 sent only
        // 16 MiB raw and compressed a whole window again, ~3 s at 100 MB/s at the
        // start of a sync seq 1M run).
        //
        // The link's rate: what it carried when it was the bottleneck, if it has
        // been. A CPU-bound window's writes wait for nothing when the compressor
        // feeds the link less than it carries, and bytes / write time (the socket
        // taking each chunk at once) then says nothing about the link (bench wan:
        // level 9 on a 10 MB/s link "measured" 1 GB/s and went raw at 1:1, where
        // it compressed 3.5:1 at 34 MB/s; 2.0x the link rate instead of 2.5x).
        let link_rate = self
            .link_capacity
            .filter(|_| level > 1)
            .unwrap_or(measured_rate);
        let cpu_bound = w.busy && w.compress > w.write * 2;
        let cpu_raw = cpu_bound
            && (level <= 1 || link_rate > self.compress_rate * 4.0)
            && self.wire_total >= Self::RAW_WARMUP
            && link_rate > self.compress_rate * 1.25;
        let decision = if cpu_raw {
            self.raw_left = self.raw_span;
            self.raw_cpu = true;
            self.raw_span = (self.raw_span * 2).min(Self::RAW_SPAN_MAX);
            "CPU-bound, the link faster than the compressor: raw for a span"
        } else if ratio > 0.9 && !link_bound {
            // On a link that waits anyway, compressing costs nothing and a
            // mixed stream's next compressible part gains (e2e_wan: /usr/lib has
            // incompressible stretches of megabytes).
            self.raw_left = 16 << 20;
            self.raw_cpu = false;
            "data does not compress: raw for 16 MiB"
        } else if !w.busy {
            return;
        } else if link_bound {
            let first = !std::mem::replace(&mut self.link_bound_seen, true);
            if w.write >= Self::CAPACITY_WRITE_MIN {
                self.link_capacity = Some(measured_rate);
            }
            self.raw_span = Self::RAW_SPAN_MIN;
            if level >= self.ceiling && self.ceiling < Self::LEVEL_MAX {
                self.at_ceiling += 1;
                if self.at_ceiling >= Self::CEILING_HOLD {
                    self.at_ceiling = 0;
                    self.ceiling += 1;
                }
            }
            if level < self.ceiling {
                // Far from balanced: two steps.
                let step = if w.write > w.compress * 3 { 2 } else { 1 };
                self.pending_level = Some((level + step).min(self.ceiling));
            } else if first {
                // Same level, a new frame: with the long window.
                self.pending_level = Some(level);
            } else {
                return;
            }
            "link-bound: level up"
        } else if cpu_bound && self.link_capacity.is_some() && level > 1 {
            // The link has been the bottleneck, at this level or a lower one:
            // the level went too far up.
            self.pending_level = Some(level - 1);
            self.ceiling = level - 1;
            self.at_ceiling = 0;
            "CPU-bound on a link that has been the bottleneck: level down, no higher for a while"
        } else if w.compress > w.write * 2 && level > 1 {
            // Not below level 1: with the socket's buffers taking the first
            // megabytes at once, a WAN looks CPU-bound at first (e2e_wan went raw
            // for all of /usr/lib that way); level 1 costs little on data that
            // compresses, and data that does not goes raw by the rule above.
            self.pending_level = Some(level - 1);
            "CPU-bound: level down"
        } else {
            return;
        };
        self.changes += 1;
        tracing::debug!(
            level,
            next = self.pending_level.unwrap_or(level),
            ratio = format!("{ratio:.2}"),
            compress_ms = w.compress.as_millis() as u64,
            write_ms = w.write.as_millis() as u64,
            link_mb_s = (link_rate / 1e6) as u64,
            ceiling = self.ceiling,
            "stream compression: {decision}"
        );
    }
}

impl StreamCompressor {
    /// The end of a window of raw chunks: in a CPU-bound raw span, a link slower
    /// than the compressor (with a margin) ends the span (see the type's docs).
    fn observe_raw(&mut self, w: &Window) {
        if !self.raw_cpu || !w.busy {
            return;
        }
        let link_rate = w.raw as f64 / w.write.as_secs_f64().max(1e-6);
        // Writes of a busy raw span wait when the link is the bottleneck: then
        // this is what it carries; otherwise at least this.
        self.link_capacity = Some(link_rate);
        if self.compress_rate > link_rate * 1.25 {
            self.raw_left = 0;
            self.raw_cpu = false;
            self.raw_span = Self::RAW_SPAN_MIN;
            self.changes += 1;
            tracing::debug!(
                link_mb_s = (link_rate / 1e6) as u64,
                compress_mb_s = (self.compress_rate / 1e6) as u64,
                "stream compression: the link is slower than the compressor: compressing again"
            );
        }
    }
}

/// Send one payload-free handshake frame (`Hello`, `Welcome`, `Refuse`) and flush it.
pub async fn send_message<W: AsyncWrite + Unpin>(wr: &mut W, msg: Message) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    wire::encode_frame(&control_frame(msg), &mut buf);
    wr.write_all(&buf).await?;
    wr.flush().await
}

/// Refuse a handshake with a reason the peer logs (best effort).
pub async fn send_refusal<W: AsyncWrite + Unpin>(wr: &mut W, reason: &str) {
    let _ = send_message(
        wr,
        Message::Refuse {
            reason: reason.to_string(),
        },
    )
    .await;
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counting writer: bytes that reached the "wire".
    struct Counting<W> {
        inner: W,
        bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for Counting<W> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if let std::task::Poll::Ready(Ok(n)) = &r {
                self.bytes
                    .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    type Duplex = tokio::io::DuplexStream;

    /// A compressed link over an in-memory pipe: the frame sender, the decoding
    /// reader, the writer task, and the bytes that reached the "wire".
    #[allow(clippy::type_complexity)]
    fn compressed_link(
        c: StreamCompressor,
    ) -> (
        mpsc::Sender<Frame>,
        FrameReader<tokio::io::ReadHalf<Duplex>>,
        tokio::task::JoinHandle<LinkError>,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_a_rd, a_wr) = tokio::io::split(a);
        let (b_rd, _b_wr) = tokio::io::split(b);
        let wire = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counting = Counting {
            inner: a_wr,
            bytes: wire.clone(),
        };
        let (tx, rx) = mpsc::channel(64);
        let (hb_tx, hb_rx) = mpsc::channel(4);
        // The heartbeat sender lives as long as the writer.
        let writer = tokio::spawn(async move {
            let r = run_writer_compressed(counting, rx, hb_rx, 50, Some(c)).await;
            drop(hb_tx);
            r
        });
        let reader = FrameReader::new(b_rd, 5_000, None).with_stream_decoding(true);
        (tx, reader, writer, wire)
    }

    /// Payloads that only repeat across frames (each one alone is random) cross a
    /// compressed stream intact, crc-checked, in a fraction of their size; random
    /// data crosses too; a level change (a new zstd frame) and raw chunks decode.
    #[tokio::test]
    async fn a_compressed_stream_carries_frames_intact_and_compresses_across_frames() {
        let mut c = StreamCompressor::new(1, None);
        c.pending_level = Some(3);
        let (tx, mut reader, writer, wire) = compressed_link(c);
        // 64 KiB of random bytes, sent 32 times in 4 KiB slices: each frame alone
        // is incompressible, the stream repeats itself.
        let mut rng = 0x1234_5678_9abc_def0u64;
        let block: Vec<u8> = (0..64 << 10)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let mut sent = Vec::new();
        let producer = tokio::spawn(async move {
            for i in 0..512u64 {
                let off = ((i % 16) * 4096) as usize;
                let data = Bytes::copy_from_slice(&block[off..off + 4096]);
                tx.send(Frame {
                    seq: i + 1,
                    msg: Message::Write {
                        offset: i * 4096,
                        fua: false,
                        at_ms: i,
                    },
                    payload: Payload::prepare(data, 0),
                })
                .await
                .unwrap();
            }
            tx.send(control_frame(Message::Goodbye { outdated: false }))
                .await
                .unwrap();
        });
        for i in 0..512u64 {
            let f = reader.next().await.unwrap();
            assert_eq!(f.seq, i + 1);
            sent.push(f.payload.open().expect("crc checks (G5)"));
        }
        assert!(matches!(
            reader.next().await.unwrap().msg,
            Message::Goodbye { .. }
        ));
        producer.await.unwrap();
        assert_eq!(writer.await.unwrap(), LinkError::ClosedHere);
        let raw = 512 * (4096 + wire::HEADER_LEN as u64);
        let on_wire = wire.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            on_wire * 4 < raw,
            "{on_wire} bytes on the wire for {raw} bytes of frames"
        );
        // Raw chunks (the incompressible path) decode too.
        let (tx, _hb_tx, mut reader, _ends) = raw_span_link(1 << 20, 50, 5_000);
        tx.send(Frame {
            seq: 7,
            msg: Message::Write {
                offset: 0,
                fua: true,
                at_ms: 1,
            },
            payload: Payload::prepare(Bytes::from(vec![5u8; 8192]), 0),
        })
        .await
        .unwrap();
        let f = reader.next().await.unwrap();
        assert_eq!(f.payload.open().unwrap(), Bytes::from(vec![5u8; 8192]));
        // In a raw span, large payloads go out as their own slices, between
        // small frames, in one chunk; then the span ends and compression resumes.
        let sizes = [100usize, 256 << 10, 200, 1 << 20, 64 << 10, 300];
        for (i, &len) in sizes.iter().enumerate() {
            tx.send(write_frame(8 + i as u64, vec![i as u8; len]))
                .await
                .unwrap();
        }
        for (i, &len) in sizes.iter().enumerate() {
            let f = reader.next().await.unwrap();
            assert_eq!(f.seq, 8 + i as u64);
            assert_eq!(f.payload.open().unwrap(), Bytes::from(vec![i as u8; len]));
        }
    }

    /// A Write frame (no FUA) of `data` at offset 0.
    fn write_frame(seq: u64, data: Vec<u8>) -> Frame {
        Frame {
            seq,
            msg: Message::Write {
                offset: 0,
                fua: false,
                at_ms: 1,
            },
            payload: Payload::prepare(Bytes::from(data), 0),
        }
    }

    /// A stream-compressing writer whose compressor is in a raw span of
    /// `raw_left` bytes, heartbeats every `hb_ms`, and a stream-decoding reader
    /// of its output (`reader_timeout_ms`): frames in, heartbeat nonces in, frames
    /// out. The unused halves of the pipe are returned to stay open.
    #[allow(clippy::type_complexity)]
    fn raw_span_link(
        raw_left: u64,
        hb_ms: u64,
        reader_timeout_ms: u64,
    ) -> (
        mpsc::Sender<Frame>,
        mpsc::Sender<u64>,
        FrameReader<tokio::io::ReadHalf<Duplex>>,
        (tokio::io::ReadHalf<Duplex>, tokio::io::WriteHalf<Duplex>),
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (a_rd, a_wr) = tokio::io::split(a);
        let (b_rd, b_wr) = tokio::io::split(b);
        let (tx, rx) = mpsc::channel(8);
        let (hb_tx, hb_rx) = mpsc::channel(4);
        let mut c = StreamCompressor::new(1, None);
        c.raw_left = raw_left;
        tokio::spawn(run_writer_compressed(a_wr, rx, hb_rx, hb_ms, Some(c)));
        let reader = FrameReader::new(b_rd, reader_timeout_ms, None).with_stream_decoding(true);
        (tx, hb_tx, reader, (a_rd, b_wr))
    }

    /// A heartbeat reply waits in the writer's buffer for the next batch; in a
    /// raw span that batch's chunk must count it (the power-loss trial of seed
    /// 5323199596019437088 lost its session to the corrupted stream: the chunk
    /// header left the reply's bytes out, and the primary wrote alone).
    #[tokio::test]
    async fn a_raw_span_chunk_counts_a_heartbeat_reply_waiting_in_the_buffer() {
        let (tx, hb_tx, mut reader, _ends) = raw_span_link(16 << 20, 60_000, 2_000);
        // After the interval's immediate first tick (which would write the
        // reply on its own), the next one is a minute away.
        tokio::time::sleep(Duration::from_millis(50)).await;
        hb_tx.send(41).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (seq, len) in [(1u64, 256usize << 10), (2, 100)] {
            tx.send(write_frame(seq, vec![seq as u8; len]))
                .await
                .unwrap();
        }
        let mut writes = Vec::new();
        while writes.len() < 2 {
            let f = reader.next().await.expect("the stream decodes");
            if let Message::Write { .. } = f.msg {
                writes.push((f.seq, f.payload.open().unwrap().len()));
            }
        }
        assert_eq!(writes, vec![(1, 256 << 10), (2, 100)]);
    }

    /// Compressed bytes for 4 MiB of half-random data sent twice in 4 KiB chunks
    /// by a compressor held at `level` (no adaptation: `encode` only), and checks
    /// the chunks decode to the input as one stream.
    fn wire_bytes_for_a_repeat_4_mib_back(level: i32, link_bound: bool) -> (u64, u64) {
        // Half of each 4 KiB random, half zeros: about half its size on its own,
        // nothing at all if the window reaches its copy.
        let mut rng = 0x0fed_cba9_8765_4321u64;
        let block: Vec<u8> = (0..4 << 20)
            .map(|i| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if i % 4096 < 2048 { rng as u8 } else { 0 }
            })
            .collect();
        let mut c = StreamCompressor::new(level, None);
        c.link_bound_seen = link_bound;
        StreamCompressor::set_level(&mut c.cctx, level, link_bound);
        let (mut stream, mut out, mut wire) = (Vec::new(), Vec::new(), 0u64);
        for _ in 0..2 {
            for chunk in block.chunks(4096) {
                assert!(c.encode(chunk, &mut out).unwrap());
                wire += out.len() as u64;
                stream.extend_from_slice(&out[4..]);
            }
        }
        // End the zstd frame (a level change does) so the stream decodes whole.
        c.pending_level = Some(level);
        assert!(c.encode(&[], &mut out).unwrap());
        stream.extend_from_slice(&out[4..]);
        let decoded = zstd::stream::decode_all(&stream[..]).unwrap();
        assert_eq!(decoded.len(), 2 * block.len());
        assert!(decoded[..block.len()] == block[..] && decoded[block.len()..] == block[..]);
        (2 * block.len() as u64, wire)
    }

    /// Once the link has been the bottleneck, the stream matches 16 MiB back from
    /// `LONG_LEVEL`: data repeated 4 MiB later crosses in a fraction of its size,
    /// where the default window (2 MiB at level 3) sees nothing to match.
    #[test]
    fn a_link_bound_stream_matches_far_back() {
        let level = StreamCompressor::LONG_LEVEL;
        let (raw, short) = wire_bytes_for_a_repeat_4_mib_back(level, false);
        assert!(
            short * 10 > raw * 4,
            "level 3: {short} bytes on the wire for {raw}"
        );
        let (raw, long) = wire_bytes_for_a_repeat_4_mib_back(level, true);
        assert!(
            long * 100 < raw * 35,
            "long window: {long} bytes on the wire for {raw}"
        );
    }

    /// One busy window of `WINDOW_BYTES` of input, 2 s long, ends: raw chunks, or
    /// compressed to half their size in `compress_ms`; written in `write_ms`.
    fn end_window(c: &mut StreamCompressor, raw: bool, compress_ms: u64, write_ms: u64) {
        c.win.started = Some(Instant::now() - StreamCompressor::WINDOW_TIME * 2);
        c.win.raw_chunks = raw;
        let bytes = StreamCompressor::WINDOW_BYTES;
        c.observe(
            !raw,
            bytes,
            if raw { bytes } else { bytes / 2 },
            Duration::from_millis(compress_ms),
            Duration::from_millis(write_ms),
            true,
        );
    }

    /// A window in which the socket made the writer wait longer than compression
    /// took: the level goes up (two steps when 3× longer) and the next frames use
    /// the long window; a window the compressor was the bottleneck of goes down.
    #[test]
    fn the_level_follows_the_bottleneck_and_a_link_bound_stream_goes_long() {
        let window = |c: &mut StreamCompressor, compress_ms: u64, write_ms: u64| {
            end_window(c, false, compress_ms, write_ms);
        };
        let mut c = StreamCompressor::new(3, None);
        window(&mut c, 500, 20);
        assert_eq!(c.pending_level, Some(2), "CPU-bound: one level down");
        assert!(!c.link_bound_seen, "a fast link keeps the short window");
        window(&mut c, 100, 400);
        assert_eq!(c.pending_level, Some(4), "link-bound: two levels up");
        assert!(c.link_bound_seen);
        window(&mut c, 100, 140);
        assert_eq!(c.pending_level, Some(5), "link-bound: one up");
        window(&mut c, 500, 200);
        assert_eq!(c.pending_level, Some(4), "CPU-bound: one down");
        let mut c = StreamCompressor::new(StreamCompressor::LEVEL_MAX, None);
        window(&mut c, 100, 200);
        assert_eq!(
            c.pending_level,
            Some(StreamCompressor::LEVEL_MAX),
            "at the top level a first link-bound window still starts a long-window frame"
        );
    }

    /// bench wan (/usr/lib tar, a 10 MB/s link): link-bound at level 7, the level
    /// goes to 9, where the compressor feeds the link less than it carries. The
    /// socket then takes each chunk at once and the link looks far faster than
    /// the compressor; it is not. The level steps down (not raw, which sent the
    /// tar at 1:1 half the time) and stays at or below the level that kept up,
    /// until `CEILING_HOLD` link-bound windows there try one higher again.
    #[test]
    fn a_level_too_high_for_the_link_steps_down_and_stays_down() {
        let mut c = StreamCompressor::new(7, None);
        c.wire_total = StreamCompressor::RAW_WARMUP;
        // 16 MiB compressed in 349 ms, written in 1,076 ms: link-bound.
        end_window(&mut c, false, 349, 1076);
        assert_eq!(c.pending_level, Some(9));
        // At 9: 1,143 ms compressing, 5 ms writing.
        end_window(&mut c, false, 1143, 5);
        assert_eq!(c.raw_left, 0, "not raw: the link was slower a level below");
        assert_eq!(c.pending_level, Some(8), "one level down");
        // At 8, still CPU-bound: down again.
        end_window(&mut c, false, 700, 5);
        assert_eq!(c.pending_level, Some(7));
        // At 7, link-bound: no higher than 7 for a while.
        for _ in 0..StreamCompressor::CEILING_HOLD - 1 {
            end_window(&mut c, false, 349, 1076);
            assert_eq!(c.pending_level, Some(7), "held at the ceiling");
        }
        end_window(&mut c, false, 349, 1076);
        assert_eq!(c.pending_level, Some(8), "one level higher tried again");
        // A loopback stream, never link-bound below its level, still goes raw.
        let mut c = StreamCompressor::new(3, None);
        c.wire_total = StreamCompressor::RAW_WARMUP;
        end_window(&mut c, false, 500, 20);
        assert_eq!(c.raw_left, StreamCompressor::RAW_SPAN_MIN);
    }

    /// Compression slower than the link (loopback, a LAN): once past the warm-up
    /// bytes, the stream goes raw for a span that doubles at each episode in a
    /// row; a raw window on a link slower than the compressor ends the span and
    /// resets it (a WAN gets its compression back within one window).
    /// Sync mode: a small batch written while nothing else is queued goes raw
    /// (compression would only add to the client's round trip); one written
    /// while frames wait, or a large one, compresses; an async stream compresses
    /// small idle batches too.
    #[tokio::test]
    async fn a_latency_first_stream_sends_small_idle_batches_raw() {
        let compressible = |len: usize| Bytes::from(vec![7u8; len]);
        let flag =
            |out: &[u8]| u32::from_le_bytes(out[..4].try_into().unwrap()) & CHUNK_COMPRESSED != 0;
        let mut c = StreamCompressor::new(3, None).latency_first(true);
        let cases = [
            (4096, false, true, false),
            (4096, false, false, true),
            (IDLE_RAW_MAX_BYTES + 1, false, true, true),
            (4096, true, false, true),
        ];
        for (len, more, idle, compressed) in cases {
            let mut out: Vec<u8> = Vec::new();
            let (next, r) = write_compressed(&mut out, c, compressible(len), more, idle).await;
            r.unwrap();
            c = next;
            assert_eq!(
                flag(&out),
                compressed,
                "{len} bytes, more {more}, idle {idle}"
            );
            if !compressed {
                assert_eq!(out.len(), 4 + len);
            }
        }
        let c = StreamCompressor::new(3, None);
        let mut out: Vec<u8> = Vec::new();
        let (_, r) = write_compressed(&mut out, c, compressible(4096), false, true).await;
        r.unwrap();
        assert!(flag(&out), "an async stream compresses a small idle batch");
    }

    #[test]
    fn a_link_faster_than_the_compressor_goes_raw_until_the_link_slows() {
        let window = end_window;
        // 16 MiB compressed in 500 ms (34 MB/s), its 8 MiB written in 20 ms
        // (419 MB/s): the link is 12x faster than the compressor.
        let mut c = StreamCompressor::new(3, None);
        window(&mut c, false, 500, 20);
        assert_eq!(
            c.raw_left, 0,
            "not while the socket buffers may fake a fast link"
        );
        assert_eq!(c.pending_level, Some(2), "CPU-bound: one level down");
        c.wire_total = StreamCompressor::RAW_WARMUP;
        window(&mut c, false, 500, 20);
        assert_eq!(
            c.raw_left,
            StreamCompressor::RAW_SPAN_MIN,
            "far faster link: raw"
        );
        assert!(c.raw_cpu);
        assert_eq!(
            c.raw_span,
            2 * StreamCompressor::RAW_SPAN_MIN,
            "the next span doubles"
        );
        // Raw, 16 MiB written in 20 ms: the link is still faster; raw goes on.
        window(&mut c, true, 0, 20);
        assert_eq!(c.raw_left, StreamCompressor::RAW_SPAN_MIN);
        // Raw, 16 MiB in 900 ms (19 MB/s, a WAN): compressing pays again.
        window(&mut c, true, 0, 900);
        assert_eq!(c.raw_left, 0, "a slow link ends the raw span");
        assert!(!c.raw_cpu);
        assert_eq!(c.raw_span, StreamCompressor::RAW_SPAN_MIN, "and resets it");
        // At level 1, a link only 2x faster than the compressor: raw as well.
        let mut c = StreamCompressor::new(3, None);
        c.wire_total = StreamCompressor::RAW_WARMUP;
        c.level = 1;
        // 16 MiB in 500 ms (34 MB/s); 8 MiB written in 120 ms (70 MB/s).
        window(&mut c, false, 500, 120);
        assert_eq!(c.raw_left, StreamCompressor::RAW_SPAN_MIN);
        // A link slower than the compressor at level 1 keeps compressing.
        let mut c = StreamCompressor::new(3, None);
        c.wire_total = StreamCompressor::RAW_WARMUP;
        c.level = 1;
        window(&mut c, false, 500, 240);
        assert_eq!(
            c.raw_left, 0,
            "8 MiB in 240 ms: 35 MB/s, no faster than compressing"
        );
    }

    /// Data that shrinks by less than 10% on a link far faster than the
    /// compressor, with the CPU the bottleneck: raw for a span (not 16 MiB, then a
    /// whole compressed window again). Not busy, or on a link that waits: the
    /// ratio rule as before.
    #[test]
    fn a_cpu_bound_stream_of_poorly_compressible_data_goes_raw_for_a_span() {
        let window = |c: &mut StreamCompressor, busy: bool, compress_ms: u64, write_ms: u64| {
            c.win.started = Some(Instant::now() - StreamCompressor::WINDOW_TIME * 2);
            c.win.raw_chunks = false;
            let bytes = StreamCompressor::WINDOW_BYTES;
            c.observe(
                true,
                bytes,
                bytes * 94 / 100,
                Duration::from_millis(compress_ms),
                Duration::from_millis(write_ms),
                busy,
            );
        };
        // Sync seq 1M on loopback: 947 ms compressing, 53 ms writing.
        let mut c = StreamCompressor::new(3, None);
        c.wire_total = StreamCompressor::RAW_WARMUP;
        window(&mut c, true, 947, 53);
        assert!(c.raw_cpu);
        assert_eq!(c.raw_left, StreamCompressor::RAW_SPAN_MIN);
        // Before the warm-up, or not busy: 16 MiB raw, then compress again.
        for (wire_total, busy, compress_ms, write_ms) in [
            (0, true, 947, 53),
            (StreamCompressor::RAW_WARMUP, false, 100, 10),
        ] {
            let mut c = StreamCompressor::new(3, None);
            c.wire_total = wire_total;
            window(&mut c, busy, compress_ms, write_ms);
            assert!(!c.raw_cpu);
            assert_eq!(c.raw_left, 16 << 20);
        }
        // A link that waits: compressing costs nothing, the level goes up.
        let mut c = StreamCompressor::new(3, None);
        c.wire_total = StreamCompressor::RAW_WARMUP;
        window(&mut c, true, 100, 900);
        assert_eq!(c.raw_left, 0);
        assert_eq!(c.pending_level, Some(5));
    }

    /// The writer batches and the reader answers heartbeats, over an in-memory pipe.
    #[tokio::test]
    async fn frames_cross_an_in_memory_link_and_heartbeats_are_answered() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (a_rd, a_wr) = tokio::io::split(a);
        let (b_rd, b_wr) = tokio::io::split(b);
        let (tx, rx) = mpsc::channel(16);
        let (_hb_tx, hb_rx) = mpsc::channel(4);
        let writer = tokio::spawn(run_writer(a_wr, rx, hb_rx, 20));
        let (b_hb_tx, b_hb_rx) = mpsc::channel(4);
        let (_b_tx, b_rx) = mpsc::channel::<Frame>(4);
        let b_writer = tokio::spawn(run_writer(b_wr, b_rx, b_hb_rx, 10_000));
        let mut reader = FrameReader::new(b_rd, 2_000, Some(b_hb_tx));
        for i in 1..=3 {
            tx.send(Frame {
                seq: i,
                msg: Message::Write {
                    offset: i * 4096,
                    fua: false,
                    at_ms: i,
                },
                payload: Payload::prepare(Bytes::from(vec![i as u8; 4096]), 1),
            })
            .await
            .unwrap();
        }
        for i in 1..=3 {
            let f = reader.next().await.unwrap();
            assert_eq!(f.seq, i);
            assert_eq!(f.payload.open().unwrap(), Bytes::from(vec![i as u8; 4096]));
        }
        // Idle: a heartbeat from A is answered by B's writer, which A reads.
        let mut a_reader = FrameReader::new(a_rd, 2_000, None);
        tx.send(control_frame(Message::Goodbye { outdated: false }))
            .await
            .unwrap();
        let f = reader.next().await.unwrap();
        assert!(matches!(f.msg, Message::Goodbye { outdated: false }));
        assert_eq!(writer.await.unwrap(), LinkError::ClosedHere);
        drop(_b_tx);
        let _ = b_writer.await;
        assert!(matches!(
            a_reader.next().await,
            Err(LinkError::Closed) | Err(LinkError::Broken(_))
        ));
    }
}
