//! Shared pieces of the NBD integration tests: an in-memory backend that counts
//! what reached it, and a helper that runs a server on an ephemeral address.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem::frontend::{
    ExportBackend, Extent, IoFuture, MetaContext, NbdAddress, NbdExport, NbdServer,
};
use tandem::nbd::ServerOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A volume in memory. Trim zero-fills (any content is allowed after a trim; zero
/// makes the model simple). `write_delay_ms` holds every write that long, so
/// tests can observe requests in flight.
pub struct MemBackend {
    pub data: Arc<Mutex<Vec<u8>>>,
    pub write_delay_ms: u64,
    /// Backend calls that change data (write, write_zeroes, trim), counted on entry.
    pub mutations_started: AtomicU64,
    pub writes_completed: Arc<AtomicU64>,
    pub zeroes: AtomicU64,
    pub trims: AtomicU64,
    pub flushes: AtomicU64,
}

impl MemBackend {
    pub fn new(size_bytes: usize) -> Arc<MemBackend> {
        Self::with_delay(size_bytes, 0)
    }

    pub fn with_delay(size_bytes: usize, write_delay_ms: u64) -> Arc<MemBackend> {
        Arc::new(MemBackend {
            data: Arc::new(Mutex::new(vec![0; size_bytes])),
            write_delay_ms,
            mutations_started: AtomicU64::new(0),
            writes_completed: Arc::new(AtomicU64::new(0)),
            zeroes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub fn mutations(&self) -> u64 {
        self.mutations_started.load(Ordering::SeqCst)
    }

    fn fill(&self, offset: u64, len: u32, byte: u8) {
        let mut d = self.data.lock().unwrap();
        let start = offset as usize;
        // The server guarantees the range is inside the volume; panic loudly if not.
        d[start..start + len as usize].fill(byte);
    }
}

impl ExportBackend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<Bytes> {
        let d = self.data.lock().unwrap();
        let start = offset as usize;
        let out = Bytes::copy_from_slice(&d[start..start + len as usize]);
        Box::pin(async move { Ok(out) })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<()> {
        self.mutations_started.fetch_add(1, Ordering::SeqCst);
        let delay = self.write_delay_ms;
        let (volume, completed) = (Arc::clone(&self.data), Arc::clone(&self.writes_completed));
        Box::pin(async move {
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let mut d = volume.lock().unwrap();
            let start = offset as usize;
            d[start..start + data.len()].copy_from_slice(&data);
            completed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> IoFuture<()> {
        self.mutations_started.fetch_add(1, Ordering::SeqCst);
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        self.fill(offset, len, 0);
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, offset: u64, len: u32) -> IoFuture<()> {
        self.mutations_started.fetch_add(1, Ordering::SeqCst);
        self.trims.fetch_add(1, Ordering::SeqCst);
        self.fill(offset, len, 0);
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> IoFuture<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

pub fn export(name: &str, read_only: bool) -> NbdExport {
    NbdExport {
        name: name.to_owned(),
        description: format!("test export {name}"),
        read_only,
        block_size_min: 512,
        block_size_preferred: 4096,
        max_request_bytes: 32 * 1024 * 1024,
    }
}

pub struct Running {
    pub server: Arc<NbdServer>,
    pub address: NbdAddress,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    pub fn tcp_port(&self) -> u16 {
        match &self.address {
            NbdAddress::Tcp(a) => a.port(),
            NbdAddress::Unix(p) => panic!("server listens on unix socket {}", p.display()),
        }
    }

    /// Cancel and wait until `serve` has returned.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("NBD server did not stop within 10 s")
            .expect("NBD server task panicked");
    }
}

pub async fn start(backend: Arc<MemBackend>, export: NbdExport, address: &str) -> Running {
    start_with(backend, export, address, ServerOptions::default()).await
}

/// Like [`start`], for any backend and with server options (TLS, timeouts).
pub async fn start_with(
    backend: Arc<dyn ExportBackend>,
    export: NbdExport,
    address: &str,
    options: ServerOptions,
) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tandem=info".into()),
        )
        .with_test_writer()
        .try_init();
    let listener = NbdServer::bind(&address.parse().unwrap())
        .await
        .expect("bind NBD listener");
    let address = listener.local_addr().unwrap();
    let server = NbdServer::with_options(backend, export, options);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let server = Arc::clone(&server);
        let shutdown = shutdown.clone();
        async move {
            server
                .serve(listener, shutdown)
                .await
                .expect("serve failed")
        }
    });
    Running {
        server,
        address,
        shutdown,
        task,
    }
}

/// Run an external client and return its stdout; panics with its output if it failed.
pub async fn run(program: &str, args: &[&str]) -> Vec<u8> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program).args(args).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 60 s"))
    .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Wait (up to 10 s) until the server reports `n` attached clients.
pub async fn wait_for_connections(server: &NbdServer, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.connections() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server has {} attached clients, expected {n}",
            server.connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A large volume that keeps no data: reads return zeroes, mutations are
/// recorded as (kind, offset, length). Block status for `base:allocation`
/// reports `holes` (byte ranges) as hole+zero, the rest as data; a dirty
/// bitmap named "cp" reports `dirty` ranges.
pub struct RecordingBackend {
    pub size_bytes: u64,
    pub ops: Mutex<Vec<(&'static str, u64, u64)>>,
    pub holes: Vec<(u64, u64)>,
    pub dirty: Vec<(u64, u64)>,
    pub caches: AtomicU64,
}

impl RecordingBackend {
    pub fn new(
        size_bytes: u64,
        holes: Vec<(u64, u64)>,
        dirty: Vec<(u64, u64)>,
    ) -> Arc<RecordingBackend> {
        Arc::new(RecordingBackend {
            size_bytes,
            ops: Mutex::new(Vec::new()),
            holes,
            dirty,
            caches: AtomicU64::new(0),
        })
    }

    fn record(&self, kind: &'static str, offset: u64, len: u64) {
        assert!(
            offset + len <= self.size_bytes,
            "{kind} {offset}+{len} beyond the volume"
        );
        self.ops.lock().unwrap().push((kind, offset, len));
    }

    /// Extents of `[offset, offset + len)`: `ranges` with `flags`, the rest 0.
    fn extents(ranges: &[(u64, u64)], flags: u32, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        for &(s, e) in ranges {
            let (s, e) = (s.max(pos), e.min(end));
            if s >= e {
                continue;
            }
            if s > pos {
                out.push(Extent {
                    len_bytes: s - pos,
                    flags: 0,
                });
            }
            out.push(Extent {
                len_bytes: e - s,
                flags,
            });
            pos = e;
        }
        if pos < end {
            out.push(Extent {
                len_bytes: end - pos,
                flags: 0,
            });
        }
        out
    }
}

impl ExportBackend for RecordingBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read(&self, _offset: u64, len: u32) -> IoFuture<Bytes> {
        Box::pin(async move { Ok(Bytes::from(vec![0u8; len as usize])) })
    }
    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<()> {
        self.record("write", offset, data.len() as u64);
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> IoFuture<()> {
        self.record("zeroes", offset, len.into());
        Box::pin(async { Ok(()) })
    }
    fn trim(&self, offset: u64, len: u32) -> IoFuture<()> {
        self.record("trim", offset, len.into());
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> IoFuture<()> {
        Box::pin(async { Ok(()) })
    }
    fn fast_zeroes(&self) -> bool {
        true
    }
    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        assert!(offset + len <= self.size_bytes);
        self.caches.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
    fn dirty_bitmaps(&self) -> Vec<String> {
        vec!["cp".into()]
    }
    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
        _max: usize,
    ) -> IoFuture<Vec<Extent>> {
        let len = len.min(self.size_bytes - offset);
        let out = match context {
            MetaContext::Allocation => Self::extents(&self.holes, 3, offset, len),
            MetaContext::DirtyBitmap(_) => Self::extents(&self.dirty, 1, offset, len),
        };
        Box::pin(async move { Ok(out) })
    }
}

/// `nbdinfo --map` output (`start length type description` per line) as
/// (start, length, type).
pub fn parse_map(text: &str) -> Vec<(u64, u64, u32)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse()
                    .unwrap_or_else(|_| panic!("bad map line {l:?}")),
                f[1].parse()
                    .unwrap_or_else(|_| panic!("bad map line {l:?}")),
                f[2].parse()
                    .unwrap_or_else(|_| panic!("bad map line {l:?}")),
            )
        })
        .collect()
}

/// The byte ranges of a map whose type satisfies `pred`, neighbours merged;
/// also checks the map is contiguous from 0 and returns its total length.
pub fn ranges_where(map: &[(u64, u64, u32)], pred: impl Fn(u32) -> bool) -> (Vec<(u64, u64)>, u64) {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    for &(start, len, ty) in map {
        assert_eq!(start, at, "map is not contiguous: {map:?}");
        if pred(ty) {
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = start + len,
                _ => out.push((start, start + len)),
            }
        }
        at = start + len;
    }
    (out, at)
}

/// Bytes a file occupies on disk (st_blocks × 512).
pub fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}
