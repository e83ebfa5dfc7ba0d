//! The peer link, once for both roles: a batching frame writer with heartbeats
//! and a frame reader with a silence timeout, generic over any
//! `AsyncRead`/`AsyncWrite` (TLS, plain TCP, or an in-memory duplex in tests);
//! the handshake frames (`send_message`, `send_refusal`); and the identity
//! checks both sides make (G6).

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

/// Read frames; heartbeats are answered (through `hb_tx`, the writer's heartbeat
/// queue) and not returned. A peer silent for `timeout_ms` is dead.
pub struct FrameReader<R> {
    rd: R,
    scratch: BytesMut,
    timeout_ms: u64,
    hb_tx: Option<mpsc::Sender<u64>>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(rd: R, timeout_ms: u64, hb_tx: Option<mpsc::Sender<u64>>) -> Self {
        FrameReader {
            rd,
            scratch: BytesMut::new(),
            timeout_ms,
            hb_tx,
        }
    }

    /// The next frame that is not a heartbeat.
    pub async fn next(&mut self) -> Result<Frame, LinkError> {
        loop {
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
    mut wr: W,
    mut rx: mpsc::Receiver<Frame>,
    mut hb_rx: mpsc::Receiver<u64>,
    heartbeat_interval_ms: u64,
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
                    let mut batch = Batch::default();
                    let mut last = is_last(&f.msg);
                    batch.push(&f, &mut buf);
                    while batch.len_bytes < (4 << 20) && !last {
                        match rx.try_recv() {
                            Ok(f) => {
                                last |= is_last(&f.msg);
                                batch.push(&f, &mut buf);
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = batch.write(&mut wr, &mut buf).await {
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

    fn push(&mut self, frame: &Frame, buf: &mut BytesMut) {
        let before = buf.len();
        if frame.payload.wire_len() as usize >= Self::SPLIT_PAYLOAD_BYTES {
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
