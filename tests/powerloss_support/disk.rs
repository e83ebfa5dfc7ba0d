//! A node's "disk" that loses its unflushed writes when its power is cut.
//!
//! Stack, bottom up (all processes are ours; their PIDs are recorded):
//!
//! ```text
//!   backing.img            sparse file on the host: what the "platter" holds
//!   nbdkit file + cache    --filter=cache cache=writeback cache-min-block-size=4096:
//!                          a write stays in the filter's cache (an unlinked temp
//!                          file in DIR/cache, gone when nbdkit dies) until a
//!                          FLUSH or a FUA write reaches the filter, which then
//!                          writes it into backing.img (--filter=fua
//!                          fuamode=discard below it: no host fdatasync)
//!   nbdfuse --unix SOCK    FUSE file DIR/fuse/nbd; fsync on it is an NBD FLUSH
//!   losetup --direct-io    /dev/loopN; a REQ_PREFLUSH/REQ_FUA from ext4 becomes an
//!                          fsync of the FUSE file (loop advertises a write cache)
//!   ext4, mounted on DIR/mnt   the agent's volume image and metadata live here
//! ```
//!
//! Cutting the power SIGKILLs nbdkit (its cache is lost: only what was flushed is
//! in backing.img), then lazily unmounts ext4 and the FUSE mount and detaches the
//! loop device: whatever the kernel still holds for them can no longer reach any
//! disk. Restoring starts a fresh nbdkit over the same backing file, reattaches,
//! and mounts (ext4 replays its journal). tools/powerloss/README.md shows the
//! measurements that this really behaves like a disk with a volatile cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::run_ok;

const CMD_TIMEOUT: Duration = Duration::from_secs(120);

pub struct PowerDisk {
    pub name: String,
    dir: PathBuf,
    backing: PathBuf,
    sock: PathBuf,
    fuse_dir: PathBuf,
    /// Where the node's filesystem is mounted while powered.
    pub mnt: PathBuf,
    nbdkit: Option<Child>,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mounted: bool,
}

/// Wait until `cond` holds or `timeout` passes; false on timeout.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

impl PowerDisk {
    /// A new powered disk of `size_bytes` (sparse) under `dir`, formatted with ext4
    /// and mounted. `mkfs` writes only what a fresh sparse disk needs (no discard,
    /// lazy inode tables and journal: the backing file reads as zeros anyway).
    pub fn create(dir: &Path, name: &str, size_bytes: u64) -> PowerDisk {
        let dir = dir.join(format!("disk-{name}"));
        fs::create_dir_all(dir.join("cache")).expect("mkdir disk dir");
        fs::create_dir_all(dir.join("fuse")).expect("mkdir fuse dir");
        fs::create_dir_all(dir.join("mnt")).expect("mkdir mount point");
        let backing = dir.join("backing.img");
        fs::File::create(&backing)
            .and_then(|f| f.set_len(size_bytes))
            .expect("create sparse backing file");
        let mut disk = PowerDisk {
            name: name.into(),
            sock: dir.join("nbdkit.sock"),
            fuse_dir: dir.join("fuse"),
            mnt: dir.join("mnt"),
            backing,
            dir,
            nbdkit: None,
            nbdfuse: None,
            loop_dev: None,
            mounted: false,
        };
        disk.power_on();
        run_ok(
            Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-E",
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                ])
                .arg(disk.loop_dev()),
            CMD_TIMEOUT,
        );
        disk.mount();
        disk
    }

    pub fn loop_dev(&self) -> &str {
        self.loop_dev.as_deref().expect("disk is powered")
    }

    pub fn is_powered(&self) -> bool {
        self.nbdkit.is_some()
    }

    /// nbdkit + nbdfuse + loop device; not mounted yet.
    pub fn power_on(&mut self) {
        assert!(self.nbdkit.is_none(), "{}: already powered", self.name);
        let pidfile = self.dir.join("nbdkit.pid");
        let _ = fs::remove_file(&pidfile);
        let _ = fs::remove_file(&self.sock);
        let log = fs::File::create(self.dir.join("nbdkit.log")).expect("nbdkit log");
        let nbdkit = Command::new("nbdkit")
            .arg("-f")
            .arg("--exit-with-parent")
            .arg("-U")
            .arg(&self.sock)
            .arg("-P")
            .arg(&pidfile)
            // Outer filter first: cache (the volatile disk cache), then fua in
            // discard mode, so that a flush writes the dirty blocks into the backing
            // file but does not fdatasync it on the host: the host never loses
            // power here, and a host fdatasync on a shared disk costs tens of ms.
            .args(["--filter=cache", "--filter=fua", "file"])
            .arg(&self.backing)
            .args([
                "cache=writeback",
                "cache-min-block-size=4096",
                "fuamode=discard",
            ])
            // The cache is an unlinked temporary file in TMPDIR: keep it in our dir.
            .env("TMPDIR", self.dir.join("cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start nbdkit (package nbdkit, see tools/test.sh)");
        self.nbdkit = Some(nbdkit);
        assert!(
            wait_for(Duration::from_secs(30), || pidfile.exists()),
            "{}: nbdkit did not write its pidfile within 30 s",
            self.name
        );
        let fuse_pid = self.dir.join("nbdfuse.pid");
        let _ = fs::remove_file(&fuse_pid);
        let nbdfuse = Command::new("nbdfuse")
            .arg("-P")
            .arg(&fuse_pid)
            .arg(&self.fuse_dir)
            .arg("--unix")
            .arg(&self.sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdfuse (package libnbd-bin)");
        self.nbdfuse = Some(nbdfuse);
        let nbd_file = self.fuse_dir.join("nbd");
        assert!(
            wait_for(Duration::from_secs(30), || fuse_pid.exists()
                && nbd_file.exists()),
            "{}: nbdfuse did not serve {} within 30 s",
            self.name,
            nbd_file.display()
        );
        let dev = run_ok(
            Command::new("losetup")
                .args(["-f", "--show", "--direct-io=on"])
                .arg(&nbd_file),
            CMD_TIMEOUT,
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loop_dev = Some(dev);
    }

    /// Mount the node filesystem (after a cut: ext4 replays its journal here).
    pub fn mount(&mut self) {
        run_ok(
            Command::new("mount")
                .args(["-o", "noinit_itable"])
                .arg(self.loop_dev())
                .arg(&self.mnt),
            CMD_TIMEOUT,
        );
        self.mounted = true;
    }

    /// `mount -o remount,OPTS` (e.g. a long journal commit interval for the self-test).
    pub fn remount_with(&self, opts: &str) {
        run_ok(
            Command::new("mount")
                .arg("-o")
                .arg(format!("remount,{opts}"))
                .arg(&self.mnt),
            CMD_TIMEOUT,
        );
    }

    /// Unmount, `e2fsck -fn` (must be clean), mount again.
    pub fn check_clean(&mut self) {
        run_ok(Command::new("umount").arg(&self.mnt), CMD_TIMEOUT);
        self.mounted = false;
        run_ok(
            Command::new("e2fsck")
                .args(["-f", "-n"])
                .arg(self.loop_dev()),
            CMD_TIMEOUT,
        );
        self.mount();
    }

    /// Power back on after a cut: fresh nbdkit over the same backing file, attach, mount.
    pub fn restore(&mut self) {
        self.power_on();
        self.mount();
    }

    /// Cut the power: SIGKILL nbdkit (its writeback cache is lost) and, in the same
    /// instant, every process of `same_node` (the node's agent, its clients); then
    /// tear down what the kernel still holds. Returns after everything is gone.
    pub fn cut(&mut self, same_node: &[i32]) {
        let nbdkit = self.nbdkit.take().expect("disk is powered");
        kill9(nbdkit.id() as i32);
        for &pid in same_node {
            kill9(pid);
        }
        self.after_cut(nbdkit);
    }

    /// Cut several disks in one instant (all nbdkits first, then `same_nodes`).
    pub fn cut_many(disks: &mut [&mut PowerDisk], same_nodes: &[i32]) {
        let kits: Vec<Child> = disks
            .iter_mut()
            .map(|d| d.nbdkit.take().expect("disk is powered"))
            .collect();
        for k in &kits {
            kill9(k.id() as i32);
        }
        for &pid in same_nodes {
            kill9(pid);
        }
        for (d, k) in disks.iter_mut().zip(kits) {
            d.after_cut(k);
        }
    }

    fn after_cut(&mut self, mut nbdkit: Child) {
        let _ = nbdkit.wait();
        if let Some(mut f) = self.nbdfuse.take() {
            let _ = f.kill();
            let _ = f.wait();
        }
        if self.mounted {
            self.mounted = false;
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.fuse_dir)
            .stderr(Stdio::null())
            .status();
        if let Some(dev) = self.loop_dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }

    /// Clean power-off: unmount (flushes), detach, stop nbdkit with SIGTERM.
    pub fn power_off_clean(&mut self) {
        if self.mounted {
            run_ok(Command::new("umount").arg(&self.mnt), CMD_TIMEOUT);
            self.mounted = false;
        }
        if let Some(dev) = self.loop_dev.take() {
            run_ok(Command::new("losetup").arg("-d").arg(&dev), CMD_TIMEOUT);
        }
        if self.nbdfuse.is_some() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.fuse_dir)
                .status();
            if let Some(mut f) = self.nbdfuse.take() {
                let _ = f.kill();
                let _ = f.wait();
            }
        }
        if let Some(mut k) = self.nbdkit.take() {
            // SAFETY: kill(2) takes integers; the pid is our own unreaped child.
            unsafe { libc::kill(k.id() as i32, libc::SIGTERM) };
            let _ = k.wait();
        }
    }
}

impl Drop for PowerDisk {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
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
        if let Some(mut f) = self.nbdfuse.take() {
            let _ = f.kill();
            let _ = f.wait();
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.fuse_dir)
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.fuse_dir)
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut k) = self.nbdkit.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

/// SIGKILL a process we started (by its recorded pid).
pub fn kill9(pid: i32) {
    // SAFETY: kill(2) takes integers; every pid passed here is our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
