//! Filesystem plumbing of the power-loss trials: an ext4 on a loop device over an
//! NBD export (the application on the primary) or over an image file (checking a
//! node's copy), fsck, and the fio workload whose fsync'd files are verified later.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{TestRng, run_ok, run_with_timeout};
use crate::powerloss_support::disk::kill9;

const CMD_TIMEOUT: Duration = Duration::from_secs(300);

/// A loop device (over an NBD export through nbdfuse, or over a file) and an ext4
/// mount point on it. Everything is undone on drop, even when a test panics.
pub struct Mounted {
    fuse_dir: Option<PathBuf>,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    pub mnt: PathBuf,
    mounted: bool,
}

/// Output of a command as one string (status, stdout, stderr), for findings.
pub fn describe(out: &std::process::Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Mounted {
    /// nbdfuse + `losetup --direct-io=on` over `uri` (e.g. nbd://127.0.0.1:PORT).
    pub fn attach_export(dir: &Path, tag: &str, uri: &str) -> Mounted {
        let fuse_dir = dir.join(format!("fuse-{tag}"));
        let mnt = dir.join(format!("mnt-{tag}"));
        fs::create_dir_all(&fuse_dir).expect("mkdir fuse dir");
        fs::create_dir_all(&mnt).expect("mkdir mount point");
        let pidfile = dir.join(format!("nbdfuse-{tag}.pid"));
        let _ = fs::remove_file(&pidfile);
        let server = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&fuse_dir)
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdfuse (package libnbd-bin)");
        let mut m = Mounted {
            fuse_dir: Some(fuse_dir.clone()),
            nbdfuse: Some(server),
            loop_dev: None,
            mnt,
            mounted: false,
        };
        let nbd_file = fuse_dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(pidfile.exists() && nbd_file.exists()) {
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not serve {uri} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m.loop_dev = Some(losetup(&nbd_file));
        m
    }

    /// A loop device over an image file.
    pub fn attach_file(dir: &Path, tag: &str, image: &Path) -> Mounted {
        let mnt = dir.join(format!("mnt-{tag}"));
        fs::create_dir_all(&mnt).expect("mkdir mount point");
        Mounted {
            fuse_dir: None,
            nbdfuse: None,
            loop_dev: Some(losetup(image)),
            mnt,
            mounted: false,
        }
    }

    pub fn dev(&self) -> &str {
        self.loop_dev.as_deref().expect("attached")
    }

    pub fn nbdfuse_pid(&self) -> Option<i32> {
        self.nbdfuse.as_ref().map(|c| c.id() as i32)
    }

    pub fn mkfs(&self) {
        run_ok(
            Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-E",
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                ])
                .arg(self.dev()),
            CMD_TIMEOUT,
        );
    }

    /// Mount (replaying the journal if needed); Err with mount's output.
    pub fn mount(&mut self) -> Result<(), String> {
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-o", "noinit_itable"])
                .arg(self.dev())
                .arg(&self.mnt),
            CMD_TIMEOUT,
        );
        if !out.status.success() {
            return Err(describe(&out));
        }
        self.mounted = true;
        Ok(())
    }

    pub fn umount(&mut self) -> Result<(), String> {
        let out = run_with_timeout(Command::new("umount").arg(&self.mnt), CMD_TIMEOUT);
        if !out.status.success() {
            return Err(describe(&out));
        }
        self.mounted = false;
        Ok(())
    }

    /// `e2fsck -fn` of the (unmounted) device: Ok, or Err with its output.
    pub fn fsck(&self) -> Result<(), String> {
        assert!(!self.mounted, "fsck of a mounted filesystem");
        let out = run_with_timeout(
            Command::new("e2fsck").args(["-f", "-n"]).arg(self.dev()),
            CMD_TIMEOUT,
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(describe(&out))
        }
    }

    /// The application died with its node: SIGKILL nbdfuse (and `same_node`), then
    /// drop what the kernel still holds without waiting for it.
    pub fn crash(&mut self, same_node: &[i32]) {
        if let Some(pid) = self.nbdfuse_pid() {
            kill9(pid);
        }
        for &pid in same_node {
            kill9(pid);
        }
        self.teardown(true);
    }

    fn teardown(&mut self, lazy: bool) {
        if self.mounted {
            self.mounted = false;
            let ok = !lazy
                && Command::new("umount")
                    .arg(&self.mnt)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        if let Some(dir) = self.fuse_dir.take() {
            let _ = Command::new("fusermount3")
                .arg(if lazy { "-uz" } else { "-u" })
                .arg(&dir)
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Orderly detach (unmount first if mounted; the unmount must succeed).
    pub fn detach(mut self) -> Result<(), String> {
        if self.mounted {
            self.umount()?;
        }
        self.teardown(false);
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.teardown(false);
    }
}

fn losetup(file: &Path) -> String {
    let dev = run_ok(
        Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file),
        Duration::from_secs(60),
    )
    .trim()
    .to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    dev
}

/// One fio job: a file written with crc32c verify headers.
#[derive(Clone, Debug)]
pub struct FioJob {
    /// Relative to the mount point.
    pub file: String,
    pub size_bytes: u64,
    /// Bytes written (less than `size_bytes` for a job spread over a large file).
    pub io_bytes: u64,
    pub bs_bytes: u64,
    pub rw: &'static str,
    pub seed: u64,
    /// Ended with fsync (fio's end_fsync=1) and the directory fsync'd after it.
    pub fsynced: bool,
    /// O_DIRECT: the writes reach the export at once, with no FLUSH after them.
    pub direct: bool,
}

impl FioJob {
    fn args(&self, mnt: &Path) -> Vec<String> {
        vec![
            "--name=w".into(),
            format!("--filename={}", mnt.join(&self.file).display()),
            format!("--size={}", self.size_bytes),
            format!("--io_size={}", self.io_bytes),
            format!("--bs={}", self.bs_bytes),
            format!("--rw={}", self.rw),
            "--ioengine=psync".into(),
            format!("--direct={}", u8::from(self.direct)),
            // A large sparse job is preallocated (unwritten extents: metadata
            // only), so its random writes land all over its region of the volume.
            format!(
                "--fallocate={}",
                if self.io_bytes < self.size_bytes {
                    "native"
                } else {
                    "none"
                }
            ),
            "--verify=crc32c".into(),
            format!("--randseed={}", self.seed),
            "--output-format=terse".into(),
        ]
    }

    fn write_cmd(&self, mnt: &Path) -> Command {
        let mut c = Command::new("fio");
        c.args(self.args(mnt))
            .arg("--do_verify=0")
            .arg(format!("--end_fsync={}", u8::from(self.fsynced)));
        c
    }

    /// `fio --verify_only`: Ok or Err with fio's output.
    pub fn verify(&self, mnt: &Path) -> Result<(), String> {
        if !mnt.join(&self.file).exists() {
            return Err(format!("{} is missing", self.file));
        }
        let out = run_with_timeout(
            Command::new("fio")
                .args(self.args(mnt))
                .arg("--verify_only=1")
                .arg("--verify_fatal=1"),
            CMD_TIMEOUT,
        );
        if out.status.success() {
            Ok(())
        } else {
            let text = describe(&out);
            let tail: String = text
                .lines()
                .filter(|l| !l.is_empty())
                .take(8)
                .collect::<Vec<_>>()
                .join("\n");
            Err(format!("{}: {tail}", self.file))
        }
    }
}

/// The application: fio jobs, one after another, in `DIRS` directories (ext4
/// spreads top-level directories over block groups): small files, some fsync'd
/// and recorded for verification, some not, some deleted; and O_DIRECT random
/// writes over large preallocated files, which touch more activity-log extents
/// than the log holds and are never followed by a FLUSH of their own.
pub struct Workload {
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicI32>,
    done: Arc<Mutex<Vec<FioJob>>>,
    handle: Option<std::thread::JoinHandle<String>>,
}

const DIRS: usize = 8;

impl Workload {
    pub fn prepare(mnt: &Path) {
        for d in 0..DIRS {
            fs::create_dir_all(mnt.join(format!("d{d}"))).expect("mkdir workload dir");
        }
        run_ok(Command::new("sync").arg("-f").arg(mnt), CMD_TIMEOUT);
    }

    pub fn start(mnt: &Path, volume_bytes: u64, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicI32::new(0));
        let done = Arc::new(Mutex::new(Vec::new()));
        let (s, p, d) = (stop.clone(), pid.clone(), done.clone());
        let mnt = mnt.to_owned();
        let handle = std::thread::spawn(move || run_workload(&mnt, volume_bytes, seed, &s, &p, &d));
        Workload {
            stop,
            pid,
            done,
            handle: Some(handle),
        }
    }

    /// PID of the fio process running now (0 between jobs).
    pub fn fio_pid(&self) -> i32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// Stop after the current job (or at once if `kill`); returns how it ended.
    pub fn finish(&mut self, kill: bool) -> String {
        self.stop.store(true, Ordering::SeqCst);
        if kill {
            let p = self.fio_pid();
            if p > 0 {
                kill9(p);
            }
        }
        self.handle
            .take()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| "workload thread panicked".into())
            })
            .unwrap_or_default()
    }

    /// The jobs that completed with fsync (in the order they completed).
    pub fn fsynced_jobs(&self) -> Vec<FioJob> {
        self.done.lock().expect("jobs").clone()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.finish(true);
        }
    }
}

fn run_workload(
    mnt: &Path,
    volume_bytes: u64,
    seed: u64,
    stop: &AtomicBool,
    pid: &AtomicI32,
    done: &Mutex<Vec<FioJob>>,
) -> String {
    let mut rng = TestRng::new(seed);
    let mut unsynced: Vec<String> = Vec::new();
    let mut spread: Vec<String> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let dice = rng.below(20);
        if dice == 0 && !unsynced.is_empty() {
            let i = rng.below(unsynced.len() as u64) as usize;
            let f = unsynced.swap_remove(i);
            let _ = fs::remove_file(mnt.join(&f));
            continue;
        }
        let file = format!("d{}/f{n}", rng.below(DIRS as u64));
        let bs_bytes = [4096u64, 16384, 65536][rng.below(3) as usize];
        let seed = rng.next_u64() >> 1;
        let rw = if rng.below(2) == 0 {
            "write"
        } else {
            "randwrite"
        };
        let job = if dice < 6 {
            // O_DIRECT random writes over a large preallocated file (1/16 to 1/8
            // of the volume): many activity-log extents, no FLUSH after them.
            let size_bytes = (volume_bytes / 16) * (1 + rng.below(2));
            FioJob {
                file,
                size_bytes,
                io_bytes: (1 + rng.below(4)) << 20,
                bs_bytes: bs_bytes.min(16384),
                rw: "randwrite",
                seed,
                fsynced: false,
                direct: true,
            }
        } else {
            let size_bytes = (1 + rng.below(16)) * 256 * 1024;
            FioJob {
                file,
                size_bytes,
                io_bytes: size_bytes,
                bs_bytes,
                rw,
                seed,
                fsynced: dice >= 9,
                direct: false,
            }
        };
        if job.direct {
            // At most two large files at a time (space on the volume).
            while spread.len() >= 2 {
                let f = spread.remove(0);
                let _ = fs::remove_file(mnt.join(&f));
            }
        }
        let child = job
            .write_cmd(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return format!("cannot start fio: {e}"),
        };
        pid.store(child.id() as i32, Ordering::SeqCst);
        let status = child.wait();
        pid.store(0, Ordering::SeqCst);
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => return format!("fio job {} ended with {s} after {n} jobs", job.file),
            Err(e) => return format!("waiting for fio: {e}"),
        }
        if job.fsynced {
            // fio fsync'd the file; make its directory entry durable as well.
            let dir = mnt.join(&job.file);
            let dir = dir.parent().expect("job dir");
            if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
                return format!("fsync of {}: {e}", dir.display());
            }
            done.lock().expect("jobs").push(job);
        } else if job.direct {
            spread.push(job.file);
        } else {
            unsynced.push(job.file);
        }
    }
    format!("stopped after {n} jobs")
}
