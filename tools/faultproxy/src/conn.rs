//! The data path: accepting connections and pumping bytes through the faults.
//!
//! Owns: the accept loop, one task per proxied connection, and per direction a reader
//! and a writer joined by a bounded channel. Does not own fault state changes (they
//! arrive through a `watch` channel from `lib.rs`) nor the control socket.
//!
//! Per direction the reader stops reading while a blackhole is set, stamps each chunk
//! with its delay deadline and hands it to the writer; the writer waits for the
//! deadline, for the blackhole to lift and for throttle tokens, then applies cut and
//! bit flips and writes. Memory per direction is bounded by `CHANNEL_CHUNKS + 2`
//! chunks of at most `CHUNK_BYTES_MAX` (≈ 640 KiB), beyond which TCP backpressure applies.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::fault::{Dir, FaultSet};

/// Largest chunk read and forwarded at once: 64 KiB, the usual loopback segment
/// aggregation, so pass-through costs few syscalls while the buffer stays bounded.
pub(crate) const CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Chunks queued between reader and writer of one direction. With a delay this bounds
/// throughput to `CHANNEL_CHUNKS * CHUNK_BYTES_MAX / delay` (8 × 64 KiB / 50 ms ≈ 10 MiB/s),
/// like a link with a finite bandwidth-delay product.
const CHANNEL_CHUNKS: usize = 8;
/// A throttled reader reads at most 1/20 s worth of bytes at once, so a slow rate
/// trickles instead of arriving in 64 KiB bursts.
const THROTTLE_READS_PER_S: u64 = 20;
/// Token bucket burst: 1/10 s worth of bytes.
const THROTTLE_BURST_PER_S: f64 = 10.0;
/// How long a cut waits for the kernel to deliver its last bytes before sending RST.
const CUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters behind [`crate::Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) connections_rejected: AtomicU64,
    pub(crate) upstream_connect_failures: AtomicU64,
    pub(crate) bits_flipped: AtomicU64,
    pub(crate) resets: AtomicU64,
    pub(crate) cuts: AtomicU64,
}

/// A token bucket in "debt" form: tokens may go negative, the caller sleeps the debt off.
/// Shared by all connections of one direction, like one physical link.
#[derive(Debug)]
struct Bucket {
    bytes_per_s: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn burst(bytes_per_s: u64) -> f64 {
        (bytes_per_s as f64 / THROTTLE_BURST_PER_S).max(1.0)
    }

    /// Takes `len_bytes` tokens and returns how long to wait before sending them.
    fn reserve(
        slot: &mut Option<Bucket>,
        bytes_per_s: u64,
        len_bytes: usize,
        now: Instant,
    ) -> Duration {
        let bucket = match slot {
            Some(b) if b.bytes_per_s == bytes_per_s => b,
            _ => slot.insert(Bucket {
                bytes_per_s,
                tokens: Bucket::burst(bytes_per_s),
                last: now,
            }),
        };
        let rate = bytes_per_s as f64;
        let elapsed_s = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed_s * rate).min(Bucket::burst(bytes_per_s));
        bucket.last = now;
        bucket.tokens -= len_bytes as f64;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / rate)
        }
    }
}

/// State shared by the accept loop, all connections and the control side.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) seed: u64,
    pub(crate) upstream: SocketAddr,
    pub(crate) faults: watch::Sender<FaultSet>,
    pub(crate) counters: Counters,
    pub(crate) next_change_id: AtomicU64,
    next_conn_id: AtomicU64,
    /// Index 0 = up, 1 = down.
    buckets: [Mutex<Option<Bucket>>; 2],
}

impl Shared {
    pub(crate) fn new(seed: u64, upstream: SocketAddr) -> Shared {
        Shared {
            seed,
            upstream,
            faults: watch::Sender::new(FaultSet::default()),
            counters: Counters::default(),
            next_change_id: AtomicU64::new(1),
            next_conn_id: AtomicU64::new(0),
            buckets: [Mutex::new(None), Mutex::new(None)],
        }
    }

    async fn throttle(&self, flow: Dir, bytes_per_s: u64, len_bytes: usize) {
        let wait = {
            let mut slot = self.buckets[dir_index(flow)]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Bucket::reserve(&mut slot, bytes_per_s, len_bytes, Instant::now())
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    fn count_forwarded(&self, flow: Dir, len_bytes: usize) {
        let counter = match flow {
            Dir::Up => &self.counters.bytes_up,
            _ => &self.counters.bytes_down,
        };
        counter.fetch_add(len_bytes as u64, Ordering::Relaxed);
    }
}

fn dir_index(flow: Dir) -> usize {
    match flow {
        Dir::Up => 0,
        Dir::Down => 1,
        Dir::Both => unreachable!("a flow has a single direction"),
    }
}

/// One RNG stream per (connection, direction, role) derived from the seed with
/// splitmix64, so a run is reproducible from the seed whatever the task interleaving.
fn stream_rng(seed: u64, conn_id: u64, flow: Dir, role: u64) -> StdRng {
    let mut x = seed
        ^ conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ ((dir_index(flow) as u64) << 1 | role).wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(x ^ (x >> 31))
}

/// Closes the socket with RST instead of FIN.
fn reset_socket(stream: TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        warn!(error = %e, "cannot set SO_LINGER 0; the socket closes with FIN instead of RST");
    }
    drop(stream);
}

/// Accepts until the task is aborted (when the `Proxy` is dropped); aborting drops the
/// `JoinSet`, which aborts every connection task.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    if shared.faults.borrow().reject_new {
                        shared.counters.connections_rejected.fetch_add(1, Ordering::Relaxed);
                        info!(%peer, "reject_new is set: resetting new connection");
                        reset_socket(client);
                        continue;
                    }
                    conns.spawn(handle_connection(shared.clone(), client, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed; retrying in 50 ms");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Why one direction (or the whole connection) stopped.
#[derive(Debug)]
enum End {
    /// A cut fault spent its byte budget.
    Cut,
    /// A socket error; the other side is reset so the peer sees an error too.
    Io(io::Error),
}

enum Msg {
    Data {
        bytes: Vec<u8>,
        due: Option<Instant>,
    },
    Eof,
}

struct ActiveGuard<'a>(&'a Counters);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_connection(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr) {
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    shared
        .counters
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    shared
        .counters
        .connections_active
        .fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&shared.counters);
    let mut faults = shared.faults.subscribe();
    let reset_epoch = faults.borrow_and_update().reset_epoch;

    let mut upstream = match TcpStream::connect(shared.upstream).await {
        Ok(s) => s,
        Err(e) => {
            shared
                .counters
                .upstream_connect_failures
                .fetch_add(1, Ordering::Relaxed);
            warn!(conn_id, %peer, upstream = %shared.upstream, error = %e,
                "cannot connect to upstream; resetting the client connection");
            reset_socket(client);
            return;
        }
    };
    // Chunks are the unit of delay and bit flips: do not let Nagle merge them.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    debug!(conn_id, %peer, "connection open");

    let outcome = {
        let (client_rd, client_wr) = client.split();
        let (upstream_rd, upstream_wr) = upstream.split();
        let pumps = async {
            tokio::try_join!(
                pump(&shared, conn_id, Dir::Up, client_rd, upstream_wr),
                pump(&shared, conn_id, Dir::Down, upstream_rd, client_wr),
            )
        };
        let reset = faults.wait_for(|f| f.reset_epoch != reset_epoch);
        tokio::select! {
            r = pumps => r.map(|_| ()),
            _ = reset => {
                info!(conn_id, %peer, "reset fault: closing connection with RST");
                shared.counters.resets.fetch_add(1, Ordering::Relaxed);
                Err(End::Io(io::ErrorKind::ConnectionReset.into()))
            }
        }
    };
    match outcome {
        Ok(()) => debug!(conn_id, %peer, "connection closed by the peers"),
        Err(end) => {
            match end {
                End::Cut => {
                    info!(conn_id, %peer, "cut fault: byte budget spent, closing connection with RST");
                    shared.counters.cuts.fetch_add(1, Ordering::Relaxed);
                    shared.counters.resets.fetch_add(1, Ordering::Relaxed);
                }
                End::Io(e) => {
                    debug!(conn_id, %peer, error = %e, "connection ended with an error; resetting both sides");
                }
            }
            reset_socket(client);
            reset_socket(upstream);
        }
    }
}

/// Forwards one direction until EOF (then half-closes) or an error / cut.
async fn pump<R, W>(
    shared: &Shared,
    conn_id: u64,
    flow: Dir,
    reader: R,
    writer: W,
) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + AsRef<TcpStream>,
{
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::try_join!(
        read_side(shared, conn_id, flow, reader, tx),
        write_side(shared, conn_id, flow, writer, rx),
    )
    .map(|_| ())
}

async fn read_side<R: AsyncRead + Unpin>(
    shared: &Shared,
    conn_id: u64,
    flow: Dir,
    mut reader: R,
    tx: mpsc::Sender<Msg>,
) -> Result<(), End> {
    let mut faults = shared.faults.subscribe();
    let mut rng = stream_rng(shared.seed, conn_id, flow, 0);
    loop {
        // Blackhole: stop reading, so the sender's TCP window closes.
        let read_cap_bytes = {
            let Ok(f) = faults.wait_for(|f| !f.blackhole).await else {
                return Ok(());
            };
            match f.throttle {
                Some((bytes_per_s, dir)) if dir.covers(flow) => {
                    (bytes_per_s / THROTTLE_READS_PER_S).clamp(1, CHUNK_BYTES_MAX as u64) as usize
                }
                _ => CHUNK_BYTES_MAX,
            }
        };
        let mut bytes = vec![0u8; read_cap_bytes];
        let len_bytes = reader.read(&mut bytes).await.map_err(End::Io)?;
        if len_bytes == 0 {
            // The writer may be gone already (it failed); then the error wins anyway.
            let _ = tx.send(Msg::Eof).await;
            return Ok(());
        }
        bytes.truncate(len_bytes);
        let delay = faults.borrow().delay;
        let due = match delay {
            Some((ms, jitter_ms, dir)) if dir.covers(flow) => {
                let jitter = if jitter_ms > 0 {
                    rng.gen_range(-(jitter_ms as i64)..=jitter_ms as i64)
                } else {
                    0
                };
                let delay_ms = (ms as i64 + jitter).max(0) as u64;
                Some(Instant::now() + Duration::from_millis(delay_ms))
            }
            _ => None,
        };
        if tx.send(Msg::Data { bytes, due }).await.is_err() {
            return Ok(());
        }
    }
}

async fn write_side<W: AsyncWrite + Unpin + AsRef<TcpStream>>(
    shared: &Shared,
    conn_id: u64,
    flow: Dir,
    mut writer: W,
    mut rx: mpsc::Receiver<Msg>,
) -> Result<(), End> {
    let mut faults = shared.faults.subscribe();
    let mut rng = stream_rng(shared.seed, conn_id, flow, 1);
    // (change_id, bytes still allowed) of the cut in force.
    let mut cut_budget: Option<(u64, u64)> = None;
    // (change_id, chunks seen) of the bit flip in force.
    let mut flip_count: Option<(u64, u64)> = None;
    while let Some(msg) = rx.recv().await {
        let mut bytes = match msg {
            Msg::Data { bytes, due } => {
                // The writer is sequential, so a chunk never overtakes an earlier one even
                // when jitter gave it an earlier deadline.
                if let Some(due) = due {
                    tokio::time::sleep_until(due).await;
                }
                bytes
            }
            Msg::Eof => {
                writer.shutdown().await.map_err(End::Io)?;
                return Ok(());
            }
        };
        let (throttle, cut, flip) = {
            let Ok(f) = faults.wait_for(|f| !f.blackhole).await else {
                return Ok(());
            };
            (f.throttle, f.cut_after, f.flip_bits)
        };
        if let Some((bytes_per_s, dir)) = throttle
            && dir.covers(flow)
        {
            shared.throttle(flow, bytes_per_s, bytes.len()).await;
        }

        let mut cut_now = false;
        match cut {
            Some(c) if c.spec.1.covers(flow) => {
                let budget = match &mut cut_budget {
                    Some((id, left)) if *id == c.change_id => left,
                    slot => &mut slot.insert((c.change_id, c.spec.0)).1,
                };
                if bytes.len() as u64 >= *budget {
                    bytes.truncate(*budget as usize);
                    *budget = 0;
                    cut_now = true;
                } else {
                    *budget -= bytes.len() as u64;
                }
            }
            _ => cut_budget = None,
        }

        match flip {
            Some(c) if c.spec.1.covers(flow) => {
                let seen = match &mut flip_count {
                    Some((id, seen)) if *id == c.change_id => seen,
                    slot => &mut slot.insert((c.change_id, 0)).1,
                };
                *seen += 1;
                if (*seen).is_multiple_of(c.spec.0) && !bytes.is_empty() {
                    let bit = rng.gen_range(0..bytes.len() * 8);
                    bytes[bit / 8] ^= 1 << (bit % 8);
                    shared.counters.bits_flipped.fetch_add(1, Ordering::Relaxed);
                    debug!(conn_id, ?flow, chunk = *seen, bit, "flipped one bit");
                }
            }
            _ => flip_count = None,
        }

        writer.write_all(&bytes).await.map_err(End::Io)?;
        shared.count_forwarded(flow, bytes.len());
        if cut_now {
            wait_send_queue_drained(writer.as_ref(), CUT_DRAIN_TIMEOUT).await;
            return Err(End::Cut);
        }
    }
    // The reader stopped without EOF (its error ends the connection).
    Ok(())
}

/// Bytes the kernel still holds for `stream` (unsent or unacknowledged), via TIOCOUTQ.
fn send_queue_len_bytes(stream: &TcpStream) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: the fd belongs to `stream`, which is borrowed (so open) for the whole call;
    // TIOCOUTQ writes exactly one c_int through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as usize)
}

/// A reset discards what the kernel has not delivered yet; wait (bounded) until the
/// bytes a cut promised have left, so the peer gets exactly N bytes before the RST.
async fn wait_send_queue_drained(stream: &TcpStream, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match send_queue_len_bytes(stream) {
            Ok(0) => return,
            Ok(queued) if Instant::now() >= deadline => {
                warn!(
                    queued,
                    "peer did not take the last bytes before the cut; resetting anyway"
                );
                return;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => {
                warn!(error = %e, "cannot read the send queue length; resetting now");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_charges_debt_at_the_configured_rate() {
        let now = Instant::now();
        let mut slot = None;
        // 1000 B/s: burst 100 B.
        assert_eq!(Bucket::reserve(&mut slot, 1000, 100, now), Duration::ZERO);
        let wait = Bucket::reserve(&mut slot, 1000, 500, now);
        assert_eq!(wait, Duration::from_millis(500));
        // After the debt is slept off, the next 100 B cost another 100 ms.
        let later = now + Duration::from_millis(500);
        assert_eq!(
            Bucket::reserve(&mut slot, 1000, 100, later),
            Duration::from_millis(100)
        );
        // A new rate starts a fresh bucket.
        assert_eq!(Bucket::reserve(&mut slot, 2000, 200, later), Duration::ZERO);
    }

    #[test]
    fn rng_streams_differ_per_connection_and_direction_and_repeat_per_seed() {
        let a: u64 = stream_rng(7, 0, Dir::Up, 0).r#gen();
        let b: u64 = stream_rng(7, 0, Dir::Down, 0).r#gen();
        let c: u64 = stream_rng(7, 1, Dir::Up, 0).r#gen();
        let d: u64 = stream_rng(7, 0, Dir::Up, 1).r#gen();
        let again: u64 = stream_rng(7, 0, Dir::Up, 0).r#gen();
        assert_eq!(a, again);
        assert!(a != b && a != c && a != d && b != c);
    }
}
