//! Shared fixtures of the end-to-end tests: they drive the built `tandem`
//! binary as separate processes, exactly as an administrator would.
//!
//! Owns: free-port selection, certificate directories, spawning agents with
//! their logs in the test's temporary directory (printed when the test
//! fails), readiness polling through `tandem status --json`, SIGTERM-based
//! shutdown with a bounded wait, byte-for-byte image comparison, running
//! external clients with a timeout, seeded randomness (the seed is printed),
//! and a guard that undoes loop devices and mounts even when a test panics.

#![allow(dead_code)] // Each test binary uses a different subset of the helpers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn tandem_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

/// A TCP port that was free a moment ago (bind port 0, read it, release it), and
/// never handed out before in this test process: the kernel may give the same
/// ephemeral port twice in a row once it is released, and two agents of one test
/// would then collide.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local address").port();
        if GIVEN.lock().expect("port set").insert(port) {
            return port;
        }
    }
}

/// The seed of a randomized test: `TANDEM_TEST_SEED` if set, else fresh. Always printed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("TANDEM_TEST_SEED") {
        Ok(s) => s.parse().expect("TANDEM_TEST_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: seed {seed} (rerun with TANDEM_TEST_SEED={seed})");
    seed
}

/// splitmix64: fast enough in debug builds to fill hundreds of MiB, and reproducible.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant for tests).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// Write `n` units of `unit` bytes of `seed`-derived data, from unit `first` on,
/// through the NBD export at `addr`, then flush.
pub fn write_seeded(addr: &str, first: u64, n: u64, unit: u64, seed: u64) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let c = tandem::nbd::client::NbdClient::connect(addr, "")
            .await
            .unwrap_or_else(|e| panic!("connect to the export {addr}: {e}"));
        let mut rng = TestRng::new(seed);
        for u in first..first + n {
            let mut data = vec![0u8; unit as usize];
            rng.fill(&mut data);
            c.write(u * unit, bytes::Bytes::from(data), false)
                .await
                .expect("write");
        }
        c.flush().await.expect("flush");
    });
}

/// Write `len_bytes` of seeded random data to `path`.
pub fn write_random_file(path: &Path, len_bytes: u64, seed: u64) {
    use std::io::Write;
    let mut rng = TestRng::new(seed);
    let mut f = io::BufWriter::new(File::create(path).expect("create random file"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len_bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    f.flush().expect("flush random file");
}

/// The first offset at which two files differ (a length difference counts at
/// the shorter length), or None when they are identical.
pub fn first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let mut fa = io::BufReader::with_capacity(1 << 20, File::open(a)?);
    let mut fb = io::BufReader::with_capacity(1 << 20, File::open(b)?);
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let n = na.min(nb);
        // Slice equality is a memcmp even in debug builds; search only on a mismatch.
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The data ranges of a file (SEEK_DATA / SEEK_HOLE).
pub fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).expect("open image");
    let len = f.metadata().expect("metadata").len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0i64;
    while (at as u64) < len {
        // SAFETY: plain lseek on an fd we own.
        let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if start < 0 {
            break; // ENXIO: no data past `at`
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        assert!(end > start, "SEEK_HOLE after SEEK_DATA");
        out.push((start as u64, end as u64));
        at = end;
    }
    out
}

/// Compare two sparse images of the same size by reading only what either holds
/// as data (elsewhere both read as zeros): seconds for a 16 GiB image that
/// [`assert_same_file`] reads whole in a minute.
pub fn assert_same_sparse(a: &Path, b: &Path) {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    assert_eq!(fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let mut ranges = data_ranges(a);
    ranges.extend(data_ranges(b));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = (end - at).min(1 << 20) as usize;
            fa.read_exact_at(&mut ba[..n], at).unwrap();
            fb.read_exact_at(&mut bb[..n], at).unwrap();
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
                panic!(
                    "{} and {} differ at offset {}",
                    a.display(),
                    b.display(),
                    at + i as u64
                );
            }
            at += n as u64;
        }
    }
}

/// Panic with the first differing offset (and the bytes there) unless identical.
pub fn assert_same_file(a: &Path, b: &Path) {
    match first_difference(a, b) {
        Ok(None) => {}
        Ok(Some(off)) => {
            let byte_at = |p: &Path| -> String {
                use std::os::unix::fs::FileExt;
                let mut x = [0u8; 1];
                match File::open(p).and_then(|f| f.read_at(&mut x, off)) {
                    Ok(1) => format!("{:#04x}", x[0]),
                    _ => "EOF".into(),
                }
            };
            panic!(
                "{} and {} differ first at byte offset {off} (block {} of 4 KiB): {} vs {}",
                a.display(),
                b.display(),
                off / 4096,
                byte_at(a),
                byte_at(b)
            );
        }
        Err(e) => panic!("comparing {} and {}: {e}", a.display(), b.display()),
    }
}

/// Run a command to completion, killing it after `timeout`; stdout and stderr
/// are collected. Panics (with the output so far) on timeout.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {shown}: {e} (is it installed? see tools/test.sh)")
        });
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = t_out.join().unwrap_or_default();
            let stderr = t_err.join().unwrap_or_default();
            panic!(
                "{shown} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// A command's stdout followed by its stderr, as text (for messages and checks).
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a command that must succeed within `timeout`; returns its stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let shown = format!("{cmd:?}");
    let out = run_with_timeout(cmd, timeout);
    assert!(
        out.status.success(),
        "{shown} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Make a certificate directory with `tandem certs`.
pub fn make_certs(dir: &Path, names: &[&str]) {
    let mut cmd = Command::new(tandem_bin());
    cmd.arg("certs").arg("--out").arg(dir);
    for n in names {
        cmd.arg("--name").arg(n);
    }
    run_ok(&mut cmd, Duration::from_secs(30));
}

/// `--size` value in bytes, as the CLI accepts it.
pub fn size_arg(len_bytes: u64) -> String {
    len_bytes.to_string()
}

/// One running agent process (`tandem primary|secondary ...`).
pub struct Agent {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub control: PathBuf,
    /// The command line, for a restart.
    pub args: Vec<String>,
}

impl Agent {
    /// Spawn `tandem <args>` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, args: &[String], log: PathBuf, control: PathBuf) -> Agent {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open agent log");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new(tandem_bin())
            .args(args)
            .env("TANDEM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn tandem");
        Agent {
            name: name.into(),
            child: Some(child),
            log,
            control,
            args: args.to_vec(),
        }
    }

    /// Start the same command line again (after it exited or was killed).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} still runs", self.name);
        let mut again = Agent::spawn(
            &self.name,
            &self.args,
            self.log.clone(),
            self.control.clone(),
        );
        self.child = again.child.take();
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent not yet reaped").id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running (not exited)?
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// How the process ended, if it has (None while it runs or once reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// `tandem status --control SOCK --json`, parsed; None while unreachable.
    pub fn status(&self) -> Option<serde_json::Value> {
        status_of(&self.control)
    }

    /// Poll the status until `pred` holds; panics with the last status and log on timeout.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if !self.is_running() {
                panic!(
                    "{} exited while waiting for {what}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: {what} not reached within {timeout:?}; last status: {}",
                    self.name,
                    last.map(|s| s.to_string()).unwrap_or_else(|| "none".into())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Send a signal to the agent.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid();
        // SAFETY: kill(2) only takes integers; the pid is our own unreaped child.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
    }

    /// Wait up to `timeout` for the process to exit, returning its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("agent already reaped");
            if let Some(s) = child.try_wait().expect("try_wait") {
                self.child = None;
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, wait (bounded), and require exit code 0.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(60));
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; log:\n{}",
            self.name,
            self.log_text()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} ({}) -----\n{}\n----- end of log of {} -----",
                self.name,
                self.log.display(),
                self.log_text(),
                self.name
            );
        }
    }
}

/// `tandem status --control SOCK --json`, parsed; None if the agent does not answer.
pub fn status_of(control: &Path) -> Option<serde_json::Value> {
    let out = Command::new(tandem_bin())
        .arg("status")
        .arg("--control")
        .arg(control)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Extra options for one node.
#[derive(Clone, Debug, Default)]
pub struct NodeOpts {
    /// Certificate directory (default: the pair's shared one).
    pub tls_dir: Option<PathBuf>,
    /// Additional command-line arguments.
    pub extra: Vec<String>,
}

/// Everything a test needs to start agents in one temporary directory.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
}

impl Site {
    /// A temporary directory with a certificate set for `primary` and `secondary`.
    pub fn new() -> Site {
        Site::with_names(&["primary", "secondary"])
    }

    /// A temporary directory with a certificate set for `names` (one CA).
    pub fn with_names(names: &[&str]) -> Site {
        let dir = tempfile::Builder::new()
            .prefix("tandem-e2e-")
            .tempdir()
            .expect("tempdir");
        let certs = dir.path().join("certs");
        make_certs(&certs, names);
        Site { dir, certs }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Start a secondary on `volume` listening on `port`.
    pub fn secondary(
        &self,
        label: &str,
        volume: &Path,
        size_bytes: u64,
        port: u16,
        opts: &NodeOpts,
    ) -> Agent {
        let control = self.path(&format!("{label}.sock"));
        let mut args: Vec<String> = vec![
            "secondary".into(),
            "--volume".into(),
            volume.display().to_string(),
            "--size".into(),
            size_arg(size_bytes),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--tls-dir".into(),
            opts.tls_dir
                .as_ref()
                .unwrap_or(&self.certs)
                .display()
                .to_string(),
            "--control".into(),
            control.display().to_string(),
        ];
        args.extend(opts.extra.iter().cloned());
        Agent::spawn(label, &args, self.path(&format!("{label}.log")), control)
    }

    /// Start a primary on `volume`, replicating to `peer_port`, exporting NBD on `nbd_port`.
    #[allow(clippy::too_many_arguments)]
    pub fn primary(
        &self,
        label: &str,
        volume: &Path,
        size_bytes: u64,
        mode: &str,
        peer_port: u16,
        nbd_port: u16,
        opts: &NodeOpts,
    ) -> Agent {
        let control = self.path(&format!("{label}.sock"));
        let mut args: Vec<String> = vec![
            "primary".into(),
            "--volume".into(),
            volume.display().to_string(),
            "--size".into(),
            size_arg(size_bytes),
            "--peer".into(),
            format!("127.0.0.1:{peer_port}"),
            "--nbd".into(),
            format!("127.0.0.1:{nbd_port}"),
            "--mode".into(),
            mode.into(),
            "--tls-dir".into(),
            opts.tls_dir
                .as_ref()
                .unwrap_or(&self.certs)
                .display()
                .to_string(),
            "--control".into(),
            control.display().to_string(),
        ];
        args.extend(opts.extra.iter().cloned());
        Agent::spawn(label, &args, self.path(&format!("{label}.log")), control)
    }
}

/// A connected primary/secondary pair with fresh sparse images.
pub struct Pair {
    // Agents are declared before the site so that they are killed (and their
    // logs printed) before the directory holding the logs is removed.
    pub primary: Agent,
    pub secondary: Agent,
    pub primary_img: PathBuf,
    pub secondary_img: PathBuf,
    pub nbd_port: u16,
    pub repl_port: u16,
    pub size_bytes: u64,
    pub site: Site,
}

/// How long a pair may take to connect and finish the initial sync.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Pair {
    /// Start a secondary and a primary in `mode` ("sync" or "async") on
    /// `size_bytes` images and wait until they are connected and in sync.
    pub fn start(mode: &str, size_bytes: u64) -> Pair {
        let site = Site::new();
        let secondary_img = site.path("secondary.img");
        let primary_img = site.path("primary.img");
        let repl_port = free_port();
        let nbd_port = free_port();
        let mut secondary = site.secondary(
            "secondary",
            &secondary_img,
            size_bytes,
            repl_port,
            &NodeOpts::default(),
        );
        secondary.wait_status("control socket", READY_TIMEOUT, |_| true);
        let primary = site.primary(
            "primary",
            &primary_img,
            size_bytes,
            mode,
            repl_port,
            nbd_port,
            &NodeOpts::default(),
        );
        let mut pair = Pair {
            primary,
            secondary,
            primary_img,
            secondary_img,
            nbd_port,
            repl_port,
            size_bytes,
            site,
        };
        pair.wait_synced(READY_TIMEOUT);
        pair
    }

    pub fn nbd_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.nbd_port)
    }

    /// Wait until the primary is connected with nothing out of sync or in flight
    /// and the secondary reports UpToDate.
    pub fn wait_synced(&mut self, timeout: Duration) {
        self.primary
            .wait_status("connected and in sync", timeout, primary_in_sync);
        self.secondary.wait_status("UpToDate", timeout, |s| {
            s["disk_state"] == "UpToDate" && s["peer"]["connection"] == "connected"
        });
    }

    /// Kill the secondary (SIGKILL: a crash; its journal keeps what was durable)
    /// or stop it (SIGTERM), start it again, and wait until it answers.
    pub fn restart_secondary(&mut self, kill: bool) {
        if kill {
            self.secondary.signal(libc::SIGKILL);
            self.secondary.wait_exit(Duration::from_secs(30));
        } else {
            self.secondary.stop();
        }
        self.secondary.restart();
        self.secondary
            .wait_status("control socket after a restart", READY_TIMEOUT, |_| true);
    }

    /// Drain and stop both agents (primary first), each must exit 0.
    pub fn stop(&mut self) {
        self.primary.stop();
        self.secondary.stop();
    }
}

/// The primary's status says: connected, no resync running, nothing dirty, no lag.
pub fn primary_in_sync(s: &serde_json::Value) -> bool {
    s["peer"]["connection"] == "connected"
        && s["out_of_sync_bytes"] == 0
        && s["lag"]["writes"] == 0
        && s["resync"].is_null()
}

/// Something to undo at the end of a test, in reverse order of setup.
enum Undo {
    /// A loop device such as /dev/loop3.
    Loop(String),
    /// A kernel mount point.
    Mount(PathBuf),
    /// A FUSE mount point and the process serving it.
    Fuse(PathBuf, Option<Child>),
}

/// Undoes loop devices and mounts when dropped, even on panic. Explicit
/// teardown through the methods below checks that each step succeeds.
#[derive(Default)]
pub struct Cleanup {
    undo: Vec<Undo>,
}

impl Cleanup {
    pub fn new() -> Cleanup {
        Cleanup::default()
    }

    pub fn add_loop(&mut self, dev: &str) {
        self.undo.push(Undo::Loop(dev.into()));
    }

    pub fn add_mount(&mut self, dir: &Path) {
        self.undo.push(Undo::Mount(dir.into()));
    }

    pub fn add_fuse(&mut self, dir: &Path, server: Child) {
        self.undo.push(Undo::Fuse(dir.into(), Some(server)));
    }

    fn take(&mut self, pred: impl Fn(&Undo) -> bool) -> Undo {
        let i = self
            .undo
            .iter()
            .rposition(pred)
            .expect("cleanup entry registered");
        self.undo.remove(i)
    }

    /// `umount DIR`, checked.
    pub fn umount(&mut self, dir: &Path) {
        self.take(|u| matches!(u, Undo::Mount(d) if d == dir));
        run_ok(Command::new("umount").arg(dir), Duration::from_secs(60));
    }

    /// `losetup -d DEV`, checked.
    pub fn detach_loop(&mut self, dev: &str) {
        self.take(|u| matches!(u, Undo::Loop(d) if d == dev));
        run_ok(
            Command::new("losetup").arg("-d").arg(dev),
            Duration::from_secs(30),
        );
    }

    /// `fusermount3 -u DIR`, checked, then wait for the FUSE server to exit.
    pub fn unmount_fuse(&mut self, dir: &Path) {
        let Undo::Fuse(_, server) = self.take(|u| matches!(u, Undo::Fuse(d, _) if d == dir)) else {
            unreachable!("take matched a Fuse entry")
        };
        run_ok(
            Command::new("fusermount3").arg("-u").arg(dir),
            Duration::from_secs(30),
        );
        if let Some(mut server) = server {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = server.try_wait().expect("try_wait") {
                    assert!(status.success(), "FUSE server exited with {status}");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = server.kill();
                    let _ = server.wait();
                    panic!("FUSE server did not exit within 30 s of fusermount3 -u");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Loop(dev) => {
                    let _ = Command::new("losetup").arg("-d").arg(&dev).status();
                }
                Undo::Mount(dir) => {
                    let ok = Command::new("umount")
                        .arg(&dir)
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        let _ = Command::new("umount").arg("-l").arg(&dir).status();
                    }
                }
                Undo::Fuse(dir, server) => {
                    let ok = Command::new("fusermount3")
                        .arg("-u")
                        .arg(&dir)
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        let _ = Command::new("fusermount3").arg("-uz").arg(&dir).status();
                        let _ = Command::new("umount").arg("-l").arg(&dir).status();
                    }
                    if let Some(mut s) = server {
                        let _ = s.kill();
                        let _ = s.wait();
                    }
                }
            }
        }
    }
}

/// blake3 of every regular file under `root`, keyed by relative path.
pub fn tree_digests(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                if path.file_name().is_some_and(|n| n == "lost+found") {
                    continue;
                }
                walk(root, &path, out);
            } else if ft.is_file() {
                let data =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                let rel = path.strip_prefix(root).expect("under root").to_owned();
                out.insert(rel, blake3::hash(&data).to_hex().to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Read a whole file (for "untouched" checks of small volumes).
pub fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// blake3 of a whole file (for "untouched" checks without keeping a copy).
pub fn file_digest(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// Poll `cond` every 100 ms until it holds; panic naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
pub mod cluster;

/// `GET http://ADDR/metrics` with curl (a client nobody here wrote); the body.
pub fn scrape(addr: &str) -> String {
    let out = run_with_timeout(
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10"])
            .arg(format!("http://{addr}/metrics")),
        Duration::from_secs(15),
    );
    assert!(
        out.status.success(),
        "curl http://{addr}/metrics failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the exposition is UTF-8")
}

/// The value of the one sample of `name` whose labels contain every `label="value"`
/// of `labels`; panics naming the metric when there is none or several.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("unparsable sample line {l:?}"))
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected one sample of {name} {labels:?}, found {hits:?} in:\n{text}"
    );
    hits[0]
}

/// `tandem events --control SOCK --json`: the agent's events, oldest first.
pub fn events_of(control: &Path) -> Vec<serde_json::Value> {
    let out = run_with_timeout(
        Command::new(tandem_bin())
            .arg("events")
            .arg("--control")
            .arg(control)
            .arg("--json"),
        Duration::from_secs(15),
    );
    assert!(
        out.status.success(),
        "tandem events failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?}: {e}")))
        .collect()
}

/// How many events of `kind` are in `events`.
pub fn count_events(events: &[serde_json::Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}
