//! Fixtures of the fault tests (`tests/e2e_fault*.rs`): a primary/secondary
//! pair whose replication link runs through the in-process fault proxy
//! (`faultproxy`), and a seeded NBD write workload with a write log and a
//! model of what every block must contain.
//!
//! Owns: the [`Rig`] (proxy on a tokio runtime owned by the test, agents as
//! processes, restart with the same arguments, kill -9, convergence, clean
//! stop plus image comparison), the [`Workload`] (pipelined random writes
//! through `tandem::nbd::client::NbdClient`, never two overlapping
//! writes in flight, so the last completed write of every block is known),
//! and counter helpers for the "recovery is bounded by the dirty set" checks.
//!
//! Block contents are a pure function of (write seed, block index), so a
//! mismatch names the write that should be there; the write log is printed
//! on a failed check and every test prints its seed (`TANDEM_TEST_SEED`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use faultproxy::{Fault, Proxy};
use tandem::nbd::client::NbdClient;
use tokio::task::JoinSet;

use crate::common::{
    Agent, NodeOpts, Site, TestRng, assert_same_file, free_port, primary_in_sync, write_random_file,
};

/// Granularity of the workload (and of tandem's default bitmap).
pub const BLOCK_BYTES: u64 = 4096;

/// Heartbeat and timeouts small enough that a dead link is noticed in about a second.
pub const FAST_TIMEOUTS: [&str; 6] = [
    "--heartbeat-interval-ms",
    "200",
    "--peer-timeout-ms",
    "1000",
    "--connect-timeout-ms",
    "2000",
];

/// What a test wants from its rig.
#[derive(Clone, Debug)]
pub struct RigOpts {
    pub mode: &'static str,
    pub size_bytes: u64,
    /// Extra arguments for the primary (after the fast timeouts).
    pub primary_extra: Vec<String>,
    /// Extra arguments for the secondary.
    pub secondary_extra: Vec<String>,
    /// Fill the primary's image with seeded random data before the first start.
    pub random_fill_seed: Option<u64>,
}

impl RigOpts {
    pub fn new(mode: &'static str, size_bytes: u64) -> RigOpts {
        RigOpts {
            mode,
            size_bytes,
            primary_extra: Vec::new(),
            secondary_extra: Vec::new(),
            random_fill_seed: None,
        }
    }

    /// Add `args` to both agents.
    pub fn both(mut self, args: &[&str]) -> RigOpts {
        for a in args {
            self.primary_extra.push(a.to_string());
            self.secondary_extra.push(a.to_string());
        }
        self
    }

    pub fn primary(mut self, args: &[&str]) -> RigOpts {
        self.primary_extra
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Add `args` to the secondary (e2e_spill; unused by e2e_faults).
    #[allow(dead_code)]
    pub fn secondary(mut self, args: &[&str]) -> RigOpts {
        self.secondary_extra
            .extend(args.iter().map(|a| a.to_string()));
        self
    }
}

/// A pair behind the fault proxy: primary → proxy (P) → secondary (S).
pub struct Rig {
    // Agents first: they are killed (and their logs printed on panic) before
    // the proxy, the runtime and the directory holding the logs go away.
    pub primary: Agent,
    pub secondary: Agent,
    pub proxy: Proxy,
    pub rt: tokio::runtime::Runtime,
    pub opts: RigOpts,
    pub primary_img: PathBuf,
    pub secondary_img: PathBuf,
    pub nbd_port: u16,
    pub repl_port: u16,
    pub site: Site,
}

/// How long a pair may take to connect, resync and drain after a fault.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);

impl Rig {
    /// Start secondary, proxy and primary; wait for the initial sync.
    pub fn start(opts: RigOpts, seed: u64) -> Rig {
        let mut rig = Rig::launch(opts, seed, None);
        rig.wait_converged("initial sync");
        rig
    }

    /// Start secondary, proxy (with `fault` set before the primary dials) and
    /// primary; do not wait for anything.
    #[allow(dead_code)]
    pub fn launch(opts: RigOpts, seed: u64, fault: Option<Fault>) -> Rig {
        let site = Site::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let secondary_img = site.path("secondary.img");
        let primary_img = site.path("primary.img");
        if let Some(fill) = opts.random_fill_seed {
            write_random_file(&primary_img, opts.size_bytes, fill);
        }
        let repl_port = free_port();
        let nbd_port = free_port();
        let upstream = format!("127.0.0.1:{repl_port}").parse().expect("address");
        let proxy = rt
            .block_on(Proxy::start(
                "127.0.0.1:0".parse().expect("address"),
                upstream,
                seed,
            ))
            .expect("start the fault proxy");
        if let Some(f) = fault {
            proxy.set(f);
        }
        let mut secondary = spawn_secondary(&site, &opts, &secondary_img, repl_port);
        secondary.wait_status("control socket", CONVERGE_TIMEOUT, |_| true);
        let primary = spawn_primary(
            &site,
            &opts,
            &primary_img,
            proxy.local_addr().port(),
            nbd_port,
        );
        Rig {
            primary,
            secondary,
            proxy,
            rt,
            opts,
            primary_img,
            secondary_img,
            nbd_port,
            repl_port,
            site,
        }
    }

    pub fn nbd_addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd_port)
    }

    /// Restart the secondary with exactly the same arguments (same log file).
    pub fn restart_secondary(&mut self) {
        assert!(!self.secondary.is_running(), "secondary still running");
        self.secondary =
            spawn_secondary(&self.site, &self.opts, &self.secondary_img, self.repl_port);
    }

    /// Restart the primary with exactly the same arguments (same log file, NBD port).
    pub fn restart_primary(&mut self) {
        assert!(!self.primary.is_running(), "primary still running");
        self.primary = spawn_primary(
            &self.site,
            &self.opts,
            &self.primary_img,
            self.proxy.local_addr().port(),
            self.nbd_port,
        );
    }

    /// Primary connected, nothing dirty, no resync, no lag; secondary UpToDate and connected.
    pub fn wait_converged(&mut self, what: &str) -> serde_json::Value {
        let s = self.primary.wait_status(
            &format!("{what}: converged"),
            CONVERGE_TIMEOUT,
            primary_in_sync,
        );
        self.secondary.wait_status(
            &format!("{what}: secondary UpToDate"),
            CONVERGE_TIMEOUT,
            |s| s["disk_state"] == "UpToDate" && s["peer"]["connection"] == "connected",
        );
        s
    }

    /// Wait until the primary says the peer is gone.
    pub fn wait_disconnected(&mut self, what: &str, timeout: Duration) {
        self.primary
            .wait_status(what, timeout, |s| s["peer"]["connection"] != "connected");
    }

    /// SIGTERM both (primary first, exit 0 each), then compare the images
    /// block by block and check the primary against the workload's model.
    pub fn finish(&mut self, model: &Arc<Mutex<Model>>) {
        self.primary.stop();
        self.secondary.stop();
        assert_same_file(&self.primary_img, &self.secondary_img);
        model.lock().expect("model").verify(&self.primary_img);
    }

    /// Start a background workload against the primary's export.
    pub fn start_load(&self, cfg: LoadCfg, model: &Arc<Mutex<Model>>) -> Load {
        Load::start(&self.rt, self.nbd_addr(), cfg, model.clone())
    }
}

/// SIGKILL and reap.
pub fn kill9(agent: &mut Agent) {
    agent.signal(libc::SIGKILL);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "SIGKILL ends {}: {status}", agent.name);
}

fn spawn_secondary(site: &Site, opts: &RigOpts, img: &std::path::Path, port: u16) -> Agent {
    let mut extra: Vec<String> = FAST_TIMEOUTS.iter().map(|s| s.to_string()).collect();
    extra.extend(opts.secondary_extra.iter().cloned());
    site.secondary(
        "secondary",
        img,
        opts.size_bytes,
        port,
        &NodeOpts {
            tls_dir: None,
            extra,
        },
    )
}

fn spawn_primary(
    site: &Site,
    opts: &RigOpts,
    img: &std::path::Path,
    peer_port: u16,
    nbd_port: u16,
) -> Agent {
    let mut extra: Vec<String> = FAST_TIMEOUTS.iter().map(|s| s.to_string()).collect();
    extra.extend(opts.primary_extra.iter().cloned());
    site.primary(
        "primary",
        img,
        opts.size_bytes,
        opts.mode,
        peer_port,
        nbd_port,
        &NodeOpts {
            tls_dir: None,
            extra,
        },
    )
}

/// A counter of `tandem status --json` (0 if absent).
pub fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

/// Mebibytes, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The content of one 4 KiB block written by the write with `write_seed`.
pub fn block_content(write_seed: u64, block: u64, buf: &mut [u8]) {
    TestRng::new(write_seed ^ block.wrapping_mul(0xd6e8_feb8_6659_fd93)).fill(buf);
}

/// One write issued by the workload.
#[derive(Clone, Copy, Debug)]
pub struct WriteRec {
    pub offset: u64,
    pub len_bytes: u64,
    pub seed: u64,
    /// None while in flight, then whether the server acknowledged it.
    pub ok: Option<bool>,
}

/// The workload's knowledge of the primary's image.
#[derive(Default)]
pub struct Model {
    /// Block → seed of the last acknowledged write covering it.
    pub blocks: HashMap<u64, u64>,
    /// Blocks whose last write failed (the server may or may not have applied it).
    pub ambiguous: HashSet<u64>,
    pub log: Vec<WriteRec>,
    pub completed_writes: u64,
    pub completed_bytes: u64,
    pub failed_writes: u64,
    pub last_error: Option<String>,
}

impl Model {
    pub fn shared() -> Arc<Mutex<Model>> {
        Arc::new(Mutex::new(Model::default()))
    }

    /// Distinct blocks ever written successfully or ambiguously.
    pub fn distinct_blocks(&self) -> u64 {
        (self.blocks.len() + self.ambiguous.len()) as u64
    }

    /// Every block with a known last write holds exactly that write's data.
    pub fn verify(&self, image: &std::path::Path) {
        let f = File::open(image).unwrap_or_else(|e| panic!("open {}: {e}", image.display()));
        let mut got = vec![0u8; BLOCK_BYTES as usize];
        let mut want = vec![0u8; BLOCK_BYTES as usize];
        for (&block, &seed) in &self.blocks {
            f.read_exact_at(&mut got, block * BLOCK_BYTES)
                .unwrap_or_else(|e| panic!("read block {block}: {e}"));
            block_content(seed, block, &mut want);
            if got != want {
                let writes: Vec<&WriteRec> = self
                    .log
                    .iter()
                    .filter(|w| {
                        w.offset <= block * BLOCK_BYTES
                            && block * BLOCK_BYTES < w.offset + w.len_bytes
                    })
                    .collect();
                panic!(
                    "{}: block {block} (offset {}) does not hold the last acknowledged write (seed {seed}); writes covering it, oldest first: {writes:?}",
                    image.display(),
                    block * BLOCK_BYTES
                );
            }
        }
    }
}

/// Shape of a workload.
#[derive(Clone, Copy, Debug)]
pub struct LoadCfg {
    pub seed: u64,
    /// Region written: blocks `0..volume_blocks`.
    pub volume_blocks: u64,
    /// Each write covers a random number of blocks in this range.
    pub min_blocks: u64,
    pub max_blocks: u64,
    /// Writes in flight at once.
    pub depth: usize,
    /// Issue rate limit in bytes per second, 0 = unlimited.
    pub bytes_per_s: u64,
    /// Stop after issuing this many bytes (None: until stopped).
    pub total_bytes: Option<u64>,
}

/// A workload running on the rig's runtime.
pub struct Load {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
    handle: tokio::runtime::Handle,
}

impl Load {
    pub fn start(
        rt: &tokio::runtime::Runtime,
        addr: String,
        cfg: LoadCfg,
        model: Arc<Mutex<Model>>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let task = rt.spawn(run_load(addr, cfg, model, stop.clone()));
        Load {
            stop,
            task: Some(task),
            handle: rt.handle().clone(),
        }
    }

    /// Ask the workload to stop issuing, and wait for the writes in flight.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.join();
    }

    /// Wait until the workload ends by itself (total reached or connection lost).
    pub fn join(&mut self) {
        if let Some(t) = self.task.take() {
            let r = self
                .handle
                .block_on(async { tokio::time::timeout(Duration::from_secs(120), t).await });
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("workload task failed: {e}"),
                Err(_) => panic!("workload did not end within 120 s"),
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn run_load(addr: String, cfg: LoadCfg, model: Arc<Mutex<Model>>, stop: Arc<AtomicBool>) {
    let client = match NbdClient::connect(&addr, "").await {
        Ok(c) => c,
        Err(e) => {
            let mut m = model.lock().expect("model");
            m.last_error = Some(format!("connect {addr}: {e}"));
            m.failed_writes += 1;
            return;
        }
    };
    let mut rng = TestRng::new(cfg.seed);
    let started = Instant::now();
    let mut issued_bytes = 0u64;
    let mut inflight_blocks: HashSet<u64> = HashSet::new();
    let mut tasks: JoinSet<(usize, u64, u64, Result<(), String>)> = JoinSet::new();
    let mut broken = false;
    loop {
        let done_issuing = broken
            || stop.load(Ordering::Relaxed)
            || cfg.total_bytes.is_some_and(|t| issued_bytes >= t);
        if done_issuing && tasks.is_empty() {
            break;
        }
        if done_issuing || tasks.len() >= cfg.depth {
            if let Some(r) = tasks.join_next().await {
                let (idx, offset, len, res) = r.expect("write task");
                broken |= res.is_err();
                settle(&model, &mut inflight_blocks, idx, offset, len, res);
            }
            continue;
        }
        if cfg.bytes_per_s > 0 {
            let due = Duration::from_secs_f64(issued_bytes as f64 / cfg.bytes_per_s as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                tokio::time::sleep((due - elapsed).min(Duration::from_millis(50))).await;
                continue;
            }
        }
        let nblocks = cfg.min_blocks + rng.below(cfg.max_blocks - cfg.min_blocks + 1);
        let mut start = None;
        for _ in 0..16 {
            let b = rng.below(cfg.volume_blocks - nblocks + 1);
            if (b..b + nblocks).all(|x| !inflight_blocks.contains(&x)) {
                start = Some(b);
                break;
            }
        }
        let Some(first) = start else {
            // Too crowded: let one finish first.
            if let Some(r) = tasks.join_next().await {
                let (idx, offset, len, res) = r.expect("write task");
                broken |= res.is_err();
                settle(&model, &mut inflight_blocks, idx, offset, len, res);
            }
            continue;
        };
        let seed = rng.next_u64();
        let mut data = vec![0u8; (nblocks * BLOCK_BYTES) as usize];
        for (i, chunk) in data.chunks_exact_mut(BLOCK_BYTES as usize).enumerate() {
            block_content(seed, first + i as u64, chunk);
        }
        let offset = first * BLOCK_BYTES;
        let len = nblocks * BLOCK_BYTES;
        inflight_blocks.extend(first..first + nblocks);
        let idx = {
            let mut m = model.lock().expect("model");
            m.log.push(WriteRec {
                offset,
                len_bytes: len,
                seed,
                ok: None,
            });
            m.log.len() - 1
        };
        let c = client.clone();
        let data = Bytes::from(data);
        tasks.spawn(async move {
            let res = c
                .write(offset, data, false)
                .await
                .map_err(|e| e.to_string());
            (idx, offset, len, res)
        });
        issued_bytes += len;
    }
    if !broken {
        let _ = client.flush().await;
        let _ = client.disconnect().await;
    }
}

fn settle(
    model: &Arc<Mutex<Model>>,
    inflight: &mut HashSet<u64>,
    idx: usize,
    offset: u64,
    len: u64,
    res: Result<(), String>,
) {
    let first = offset / BLOCK_BYTES;
    let n = len / BLOCK_BYTES;
    for b in first..first + n {
        inflight.remove(&b);
    }
    let mut m = model.lock().expect("model");
    let seed = m.log[idx].seed;
    match res {
        Ok(()) => {
            m.log[idx].ok = Some(true);
            m.completed_writes += 1;
            m.completed_bytes += len;
            for b in first..first + n {
                m.blocks.insert(b, seed);
                m.ambiguous.remove(&b);
            }
        }
        Err(e) => {
            m.log[idx].ok = Some(false);
            m.failed_writes += 1;
            m.last_error = Some(e);
            for b in first..first + n {
                m.blocks.remove(&b);
                m.ambiguous.insert(b);
            }
        }
    }
}

/// Snapshot of the workload's progress.
pub fn progress(model: &Arc<Mutex<Model>>) -> (u64, u64, u64) {
    let m = model.lock().expect("model");
    (m.completed_writes, m.completed_bytes, m.failed_writes)
}
