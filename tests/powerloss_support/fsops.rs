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
        if let Some(mut c) = self.nbdfuse.take() {
            if lazy {
                // Crashed: the server is gone first (as it would be with its node).
                let _ = c.kill();
                let _ = c.wait();
            }
            self.nbdfuse = Some(c);
        }
        if let Some(dir) = self.fuse_dir.take() {
            let _ = Command::new("fusermount3")
                .arg(if lazy { "-uz" } else { "-u" })
                .arg(&dir)
                .stderr(Stdio::null())
                .status();
            // fusermount3 can race with a server that is still exiting; a lazy
            // unmount of a mount point that is already gone just fails quietly.
            let _ = Command::new("umount")
                .arg("-l")
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
            // The O_DIRECT writer keeps a few writes in flight (concurrent
            // activity-log activations are committed together).
            if self.direct {
                "--ioengine=libaio".into()
            } else {
                "--ioengine=psync".into()
            },
            format!("--iodepth={}", if self.direct { 4 } else { 1 }),
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
            // No verify-state file in the working directory when a job is killed.
            "--verify_state_save=0".into(),
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

/// The application: fio jobs on the mounted filesystem, in rounds (see
/// `run_files`): fsync'd small files, recorded for verification; O_DIRECT random
/// writes spread over a quarter of the volume with no FLUSH after them; buffered
/// files left unsynced; deletions. Files are in `DIRS` directories, which ext4
/// spreads over block groups.
pub struct Workload {
    stop: Arc<AtomicBool>,
    pids: Arc<[AtomicI32; 1]>,
    /// Since when the O_DIRECT spread job now running has been running.
    spread_since: Arc<Mutex<Option<Instant>>>,
    done: Arc<Mutex<Vec<FioJob>>>,
    handles: Vec<std::thread::JoinHandle<String>>,
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
        let pids = Arc::new([AtomicI32::new(0)]);
        let done = Arc::new(Mutex::new(Vec::new()));
        let spread_since = Arc::new(Mutex::new(None));
        let handles = {
            let (s, p, d, mnt) = (stop.clone(), pids.clone(), done.clone(), mnt.to_owned());
            let since = spread_since.clone();
            vec![std::thread::spawn(move || {
                run_files(&mnt, volume_bytes, seed, &s, &p[0], &d, &since)
            })]
        };
        Workload {
            stop,
            pids,
            spread_since,
            done,
            handles,
        }
    }

    /// How long the O_DIRECT spread job now running has been running, if one is.
    pub fn spread_running_for(&self) -> Option<Duration> {
        self.spread_since
            .lock()
            .expect("spread")
            .map(|t| t.elapsed())
    }

    /// PIDs of the fio processes running now: each fio the workload started and
    /// the process it forked for its job (which calls setsid(), so a kill of the
    /// parent alone leaves it running; 14 were left behind by the 156 trials of
    /// seeds 1137 and 1138).
    pub fn fio_pids(&self) -> Vec<i32> {
        self.fio_parents()
            .into_iter()
            .flat_map(|p| std::iter::once(p).chain(children_of(p)))
            .collect()
    }

    fn fio_parents(&self) -> Vec<i32> {
        self.pids
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .filter(|&p| p > 0)
            .collect()
    }

    /// Stop after the current jobs (or at once if `kill`); returns how it ended.
    pub fn finish(&mut self, kill: bool) -> String {
        self.stop.store(true, Ordering::SeqCst);
        if kill {
            // Stopped first, a fio forks no job process after the list is taken.
            for p in self.fio_parents() {
                // SAFETY: kill(2) takes integers; `p` is our own child.
                unsafe { libc::kill(p, libc::SIGSTOP) };
            }
            for p in self.fio_pids() {
                kill9(p);
            }
        }
        self.handles
            .drain(..)
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| "workload thread panicked".into())
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The jobs that completed with fsync (in the order they completed).
    pub fn fsynced_jobs(&self) -> Vec<FioJob> {
        self.done.lock().expect("jobs").clone()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.finish(true);
        }
    }
}

/// The processes whose parent is `parent` (from /proc).
pub fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the ")" that ends the command name: state, then ppid.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Run one fio job to its end, its pid published in `pid` meanwhile.
fn run_job(mnt: &Path, job: &FioJob, pid: &AtomicI32) -> Result<(), String> {
    // fio's report goes to a log beside the mount point (the trial's directory).
    let log_path = mnt
        .parent()
        .expect("mount point has a parent")
        .join(format!(
            "fio-{}.log",
            if job.direct { "spread" } else { "files" }
        ));
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| format!("dup fio log: {e}"))?;
    let mut child = job
        .write_cmd(mnt)
        .arg("--status-interval=1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot start fio: {e}"))?;
    pid.store(child.id() as i32, Ordering::SeqCst);
    let status = child.wait();
    pid.store(0, Ordering::SeqCst);
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("fio job {} ended with {s}", job.file)),
        Err(e) => Err(format!("waiting for fio: {e}")),
    }
}

fn run_files(
    mnt: &Path,
    volume_bytes: u64,
    seed: u64,
    stop: &AtomicBool,
    pid: &AtomicI32,
    done: &Mutex<Vec<FioJob>>,
    spread_since: &Mutex<Option<Instant>>,
) -> String {
    let mut rng = TestRng::new(seed);
    let mut unsynced: Vec<String> = Vec::new();
    let mut n = 0u64;
    // Rounds of: a burst of 1-3 fsync'd files; then an O_DIRECT job of random
    // writes over the spread file (a quarter of the volume, preallocated:
    // unwritten extents, metadata only), which touches more activity-log extents
    // than the log holds and is followed by no FLUSH of its own; then now and
    // then a buffered file left unsynced, or a deletion.
    while !stop.load(Ordering::SeqCst) {
        let mut round: Vec<FioJob> = Vec::new();
        for _ in 0..1 + rng.below(3) {
            n += 1;
            let size_bytes = (1 + rng.below(16)) * 256 * 1024;
            round.push(FioJob {
                file: format!("d{}/f{n}", rng.below(DIRS as u64)),
                size_bytes,
                io_bytes: size_bytes,
                bs_bytes: [4096u64, 16384, 65536][rng.below(3) as usize],
                rw: if rng.below(2) == 0 {
                    "write"
                } else {
                    "randwrite"
                },
                seed: rng.next_u64() >> 1,
                fsynced: true,
                direct: false,
            });
        }
        round.push(FioJob {
            file: "spread".into(),
            size_bytes: volume_bytes / 4,
            io_bytes: (1 + rng.below(4)) << 18,
            bs_bytes: [4096u64, 16384][rng.below(2) as usize],
            rw: "randwrite",
            seed: rng.next_u64() >> 1,
            fsynced: false,
            direct: true,
        });
        if rng.below(3) == 0 {
            n += 1;
            let size_bytes = (1 + rng.below(16)) * 256 * 1024;
            round.push(FioJob {
                file: format!("d{}/f{n}", rng.below(DIRS as u64)),
                size_bytes,
                io_bytes: size_bytes,
                bs_bytes: 65536,
                rw: "write",
                seed: rng.next_u64() >> 1,
                fsynced: false,
                direct: false,
            });
        }
        if rng.below(3) == 0 && !unsynced.is_empty() {
            let i = rng.below(unsynced.len() as u64) as usize;
            let f = unsynced.swap_remove(i);
            let _ = fs::remove_file(mnt.join(&f));
        }
        for job in round {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if job.direct {
                *spread_since.lock().expect("spread") = Some(Instant::now());
            }
            let result = run_job(mnt, &job, pid);
            *spread_since.lock().expect("spread") = None;
            if let Err(e) = result {
                return format!("{e} after {n} files");
            }
            if job.fsynced {
                // fio fsync'd the file; make its directory entry durable as well.
                let dir = mnt.join(&job.file);
                let dir = dir.parent().expect("job dir");
                if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
                    return format!("fsync of {}: {e}", dir.display());
                }
                done.lock().expect("jobs").push(job);
            } else if !job.direct {
                unsynced.push(job.file);
            }
        }
    }
    format!("stopped after {n} files")
}
