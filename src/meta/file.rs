//! The file the on-disk formats are written through, and a simulated one that
//! loses what was not made durable (ARCHITECTURE §4a).
//!
//! [`DurableFile`] is the handful of calls the metadata store and the on-disk
//! logs make: `pread`, `pwrite`, `fdatasync`, length, `fallocate`, hole punching
//! and an exclusive lock. It is implemented for [`std::fs::File`] (through
//! rustix for `fallocate`, no hand-written `unsafe`) and for [`SimFile`].
//!
//! [`SimFile`] is an in-memory file that models the durability contract tests
//! and the simulator assume:
//!
//! - Every `pwrite` lands in a volatile cache, per 512-byte sector ([`SECTOR_BYTES`]).
//!   Reads see the newest data, as reads through the page cache do.
//! - `fdatasync` makes everything written before it durable.
//! - [`SimFile::power_loss`] keeps the durable image plus an arbitrary, seeded
//!   random subset of the volatile sectors: page-cache writeback does not keep
//!   write order, so any sector may or may not have reached the disk, and one
//!   written several times since the last `fdatasync` may come back as any of
//!   those versions (or the durable one). A file length changed since the last
//!   `fdatasync` comes back as either the old or the new length. The choice
//!   is made per 4 KiB page (writeback's unit): each page reached the disk
//!   whole (newest or an older version), not at all, or torn (each sector on
//!   its own); the share of pages that made it varies from one power loss to
//!   the next, so "everything but one page" and "nothing but one page" both occur.
//! - [`SimFile::kill9`] keeps everything: the page cache survives the process.
//!   What was volatile stays volatile (a later power loss can still drop it).
//! - [`SimFile::fail_next_sync`] makes the next `fdatasync` fail once, with
//!   Linux semantics: the error is returned to that one call, the affected
//!   sectors are then considered clean and may or may not have reached the disk
//!   (decided at that moment, seeded), and a later `fdatasync` succeeds without
//!   having saved them. Reads keep returning the cached data until a power loss.
//! - [`SimFile::fail_next_write`] makes the next `pwrite` fail with EIO, writing nothing.
//! - [`SimFile::halt_after_ops`] stops the node after a number of mutating
//!   calls: every later call fails until a power loss or kill -9. With
//!   [`SimFile::ops`] a test can cut the power at every instant of a sequence.
//! - [`SimFile::set_space_limit`]: writes and allocations past it fail with ENOSPC.
//!
//! Handles: [`SimFile::reopen`] gives another handle on the same file (another
//! open file description). A power loss or kill -9 ends the process that held
//! the old handles: every I/O call on a handle opened before it fails, so a
//! store left over from before the crash cannot write into the new world.
//!
//! The simulated file is sparse (a hash map of written sectors, zeroes stored as
//! nothing) and deterministic for a given seed and call sequence (no
//! iteration over randomly ordered maps). The durable image is readable for
//! oracles ([`SimFile::read_durable`]), as are counters of the I/O done
//! ([`SimFile::stats`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{File, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// The unit of a torn write in the model: a write either reached the disk for
/// a whole 512-byte sector or not at all.
pub const SECTOR_BYTES: u64 = 512;
const SECTOR: usize = SECTOR_BYTES as usize;

/// File I/O as the on-disk formats need it. Offsets and lengths are in bytes.
/// Every method takes `&self`, like `pread`/`pwrite` on a shared descriptor.
pub trait DurableFile: fmt::Debug + Send + Sync {
    /// `pread`: up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `pwrite` of all of `buf` at `offset`, extending the file if needed.
    /// Not durable until [`sync_data`](Self::sync_data).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: everything written before it is durable when it returns `Ok`.
    /// After an error nothing written since the previous successful call can be
    /// assumed durable, and a later `Ok` does not change that (Linux semantics).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length of the file.
    fn len_bytes(&self) -> io::Result<u64>;
    /// `ftruncate`: grow (with zeroes, sparse) or shrink the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// `fallocate` mode 0: reserve space for `[offset, offset + len)`, growing
    /// the file if needed, so later writes there cannot fail with ENOSPC.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range reads as zeroes and its
    /// space is released. Not durable until `sync_data`. Filesystems without
    /// hole punching return `Unsupported`/EOPNOTSUPP.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Take an exclusive lock without waiting (`flock(LOCK_EX | LOCK_NB)`):
    /// `Ok(false)` if another open file description holds it. Released when
    /// this handle is closed.
    fn try_lock_exclusive(&self) -> io::Result<bool>;

    /// Read `len` bytes at `offset`, or fewer if the file ends first.
    fn read_at_most(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match self.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }
}

impl DurableFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(self, rustix::fs::FallocateFlags::empty(), offset, len)
            .map_err(io::Error::from)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(self, flags, offset, len).map_err(io::Error::from)
    }

    fn try_lock_exclusive(&self) -> io::Result<bool> {
        match self.try_lock() {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Free space of the filesystem holding `file`, in bytes available to an
/// unprivileged writer (`f_bavail × f_frsize`).
pub fn available_bytes(file: &File) -> io::Result<u64> {
    let st = rustix::fs::fstatvfs(file).map_err(io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// What reached the disk of one 4 KiB page in the cache at a power loss.
#[derive(Clone, Copy)]
enum PageFate {
    Durable,
    Newest,
    /// Any of the unsynced versions, per sector.
    Older,
    /// Per sector: the durable contents or any unsynced version.
    Torn,
}

const SECTORS_PER_PAGE: u64 = 4096 / SECTOR_BYTES;

/// One sector's contents; `None` is all zeroes (a hole costs no memory).
type SectorData = Option<Box<[u8; SECTOR]>>;

/// At most this many unsynced versions are kept per sector: the oldest and the
/// newest ones, which are the interesting ones for "an older write survived".
const VERSIONS_MAX: usize = 4;

#[derive(Clone, Default)]
struct Sector {
    durable: SectorData,
    /// Writes since the data last reached the disk, oldest first. Non-empty
    /// and not in `SimState::dirty` only after a failed fdatasync: the cache
    /// holds data the disk may lack, and nothing will write it back.
    versions: Vec<SectorData>,
}

impl Sector {
    fn current(&self) -> &SectorData {
        self.versions.last().unwrap_or(&self.durable)
    }

    fn push(&mut self, data: SectorData) {
        if self.versions.len() == VERSIONS_MAX {
            self.versions.remove(1);
        }
        self.versions.push(data);
    }
}

/// Counters of the I/O a [`SimFile`] has seen, over all its handles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Successful `pwrite` calls and the bytes they wrote.
    pub writes: u64,
    pub bytes_written: u64,
    /// `fdatasync` calls that returned `Ok`.
    pub syncs: u64,
    /// Reads and the bytes they returned.
    pub reads: u64,
    pub bytes_read: u64,
    /// Power losses so far.
    pub power_losses: u64,
}

#[derive(Clone)]
struct SimState {
    /// Sectors ever written and not zero on disk; ordered, so ranges (a
    /// punched hole, a shrink) visit only the sectors that exist.
    sectors: BTreeMap<u64, Sector>,
    /// Sectors written since the last fdatasync (ordered: power loss walks it).
    dirty: BTreeSet<u64>,
    len: u64,
    durable_len: u64,
    /// Reboots (power loss or kill -9) so far; a handle from an older boot is dead.
    boot: u64,
    next_handle: u64,
    lock_owner: Option<u64>,
    rng: StdRng,
    fail_next_write: bool,
    fail_next_sync: bool,
    /// Mutating calls left before the node halts; `None`: never.
    halt_in_ops: Option<u64>,
    halted: bool,
    ops: u64,
    space_limit: Option<u64>,
    stats: SimStats,
}

/// An in-memory file with the durability model of ARCHITECTURE §4a; see the
/// module documentation. Cloning is [`reopen`](Self::reopen).
pub struct SimFile {
    state: Arc<Mutex<SimState>>,
    handle: u64,
    boot: u64,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("SimFile")
            .field("handle", &self.handle)
            .field("len", &s.len)
            .field("durable_len", &s.durable_len)
            .field("volatile_sectors", &s.dirty.len())
            .finish()
    }
}

impl Clone for SimFile {
    fn clone(&self) -> Self {
        self.reopen()
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut s = self.lock();
        if s.lock_owner == Some(self.handle) {
            s.lock_owner = None;
        }
    }
}

fn sim_error(kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(kind, format!("simulated file: {what}"))
}

/// EIO, as a failing disk returns it (callers may look at the errno).
fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl SimFile {
    /// An empty file. `seed` drives the outcome of an injected fdatasync failure.
    pub fn new(seed: u64) -> SimFile {
        SimFile {
            state: Arc::new(Mutex::new(SimState {
                sectors: BTreeMap::new(),
                dirty: BTreeSet::new(),
                len: 0,
                durable_len: 0,
                boot: 0,
                next_handle: 1,
                lock_owner: None,
                rng: StdRng::seed_from_u64(seed),
                fail_next_write: false,
                fail_next_sync: false,
                halt_in_ops: None,
                halted: false,
                ops: 0,
                space_limit: None,
                stats: SimStats::default(),
            })),
            handle: 0,
            boot: 0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves consistent state (every
        // mutation completes before the guard drops), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Another handle on the same file, as a new process would open it.
    pub fn reopen(&self) -> SimFile {
        let mut s = self.lock();
        let handle = s.next_handle;
        s.next_handle += 1;
        SimFile {
            state: Arc::clone(&self.state),
            handle,
            boot: s.boot,
        }
    }

    /// An independent copy of the file as it is now (contents, cache, length,
    /// pending faults, counters): to try several crash outcomes from one
    /// instant. The copy has no handles open and no lock held.
    pub fn fork(&self) -> SimFile {
        let mut state = self.lock().clone();
        state.lock_owner = None;
        state.boot += 1;
        let boot = state.boot;
        SimFile {
            state: Arc::new(Mutex::new(state)),
            handle: 0,
            boot,
        }
    }

    /// Power loss of the node: the durable image survives, plus a random subset
    /// of the volatile sectors (each one as any of its unsynced versions), and
    /// the old or the new length. The cache is then empty, pending injected
    /// faults are cleared, locks are released, and handles opened before it are dead.
    pub fn power_loss(&self, rng: &mut (impl RngCore + ?Sized)) {
        // How much of the cache reached the disk varies from one power loss to
        // the next; writeback goes by 4 KiB page, and a page in flight may be torn.
        let keep_p: f64 = rng.r#gen();
        let keep_new_len = rng.gen_bool(0.5);
        let mut page = u64::MAX;
        let mut choice = PageFate::Durable;
        self.power_loss_with(
            &mut |index, versions| {
                if index / SECTORS_PER_PAGE != page {
                    page = index / SECTORS_PER_PAGE;
                    choice = if rng.gen_ratio(1, 8) {
                        PageFate::Torn
                    } else if !rng.gen_bool(keep_p) {
                        PageFate::Durable
                    } else if rng.gen_ratio(1, 4) {
                        PageFate::Older
                    } else {
                        PageFate::Newest
                    };
                }
                match choice {
                    PageFate::Durable => 0,
                    PageFate::Newest => versions,
                    PageFate::Older => rng.gen_range(1..=versions),
                    PageFate::Torn => rng.gen_range(0..=versions),
                }
            },
            keep_new_len,
        );
    }

    /// Power loss that keeps nothing volatile: the worst case, deterministic.
    pub fn power_loss_dropping_volatile(&self) {
        self.power_loss_with(&mut |_, _| 0, false);
    }

    /// Power loss that keeps the newest version of every volatile sector: what
    /// a lucky writeback leaves (everything written survives, unordered writes included).
    pub fn power_loss_keeping_volatile(&self) {
        self.power_loss_with(&mut |_, versions| versions, true);
    }

    /// `pick(sector, versions)` chooses what survives of a volatile sector:
    /// 0 its durable contents, k in 1..=versions its k-th unsynced write.
    /// Sectors are offered in ascending order.
    fn power_loss_with(&self, pick: &mut dyn FnMut(u64, usize) -> usize, keep_new_len: bool) {
        let mut s = self.lock();
        let dirty = std::mem::take(&mut s.dirty);
        for index in &dirty {
            let sector = s.sectors.get_mut(index).expect("dirty sector exists");
            let k = pick(*index, sector.versions.len());
            if k > 0 {
                sector.durable = sector.versions.swap_remove(k - 1);
            }
        }
        if keep_new_len {
            s.durable_len = s.len;
        }
        let durable_len = s.durable_len;
        s.len = durable_len;
        let first_gone = durable_len.div_ceil(SECTOR_BYTES);
        s.sectors.retain(|&index, sector| {
            sector.versions.clear();
            index < first_gone && sector.durable.is_some()
        });
        // A sector cut by the length reads as zeroes past it after regrowth.
        if !durable_len.is_multiple_of(SECTOR_BYTES) {
            let index = durable_len / SECTOR_BYTES;
            if let Some(Some(data)) = s.sectors.get_mut(&index).map(|sec| sec.durable.as_mut()) {
                data[(durable_len % SECTOR_BYTES) as usize..].fill(0);
            }
        }
        s.stats.power_losses += 1;
        Self::reboot(&mut s);
    }

    /// kill -9 of the process: every byte written stays (in the cache, still
    /// volatile); locks are released and handles opened before it are dead.
    pub fn kill9(&self) {
        let mut s = self.lock();
        Self::reboot(&mut s);
    }

    fn reboot(s: &mut SimState) {
        s.boot += 1;
        s.lock_owner = None;
        s.halted = false;
        s.halt_in_ops = None;
        s.fail_next_write = false;
        s.fail_next_sync = false;
    }

    /// The next `fdatasync` fails with EIO (see the module documentation).
    pub fn fail_next_sync(&self) {
        self.lock().fail_next_sync = true;
    }

    /// The next `pwrite` fails with EIO and writes nothing.
    pub fn fail_next_write(&self) {
        self.lock().fail_next_write = true;
    }

    /// After `ops` more mutating calls (write, sync, set_len, allocate, punch),
    /// the node halts: every later call on any handle fails until
    /// [`power_loss`](Self::power_loss) or [`kill9`](Self::kill9). `0` halts now.
    pub fn halt_after_ops(&self, ops: u64) {
        let mut s = self.lock();
        if ops == 0 {
            s.halted = true;
        } else {
            s.halt_in_ops = Some(ops);
        }
    }

    /// Whether the node is halted (see [`halt_after_ops`](Self::halt_after_ops)).
    pub fn is_halted(&self) -> bool {
        self.lock().halted
    }

    /// Mutating calls made so far (over all handles and boots).
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Writes and allocations reaching past `limit` bytes fail with ENOSPC, as
    /// on a filesystem with that much room for this file; `None` lifts it.
    pub fn set_space_limit(&self, limit: Option<u64>) {
        self.lock().space_limit = limit;
    }

    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// Sectors written since the last fdatasync (what a power loss may drop).
    pub fn volatile_sectors(&self) -> usize {
        self.lock().dirty.len()
    }

    /// Length the file would have after a power loss that kept nothing volatile.
    pub fn durable_len(&self) -> u64 {
        self.lock().durable_len
    }

    /// Read the durable image (what a power loss that keeps nothing volatile
    /// leaves): up to `buf.len()` bytes at `offset`, fewer at its end.
    pub fn read_durable(&self, buf: &mut [u8], offset: u64) -> usize {
        let s = self.lock();
        Self::copy_out(&s, buf, offset, s.durable_len, |sec| &sec.durable)
    }

    /// Copy `[offset, min(offset + buf.len(), len))` out of the sectors as
    /// `view` sees them; returns the bytes copied.
    fn copy_out(
        s: &SimState,
        buf: &mut [u8],
        offset: u64,
        len: u64,
        view: impl Fn(&Sector) -> &SectorData,
    ) -> usize {
        if offset >= len {
            return 0;
        }
        let n = (buf.len() as u64).min(len - offset) as usize;
        let mut done = 0;
        while done < n {
            let pos = offset + done as u64;
            let index = pos / SECTOR_BYTES;
            let within = (pos % SECTOR_BYTES) as usize;
            let take = (SECTOR - within).min(n - done);
            match s.sectors.get(&index).map(&view) {
                Some(Some(data)) => {
                    buf[done..done + take].copy_from_slice(&data[within..within + take])
                }
                _ => buf[done..done + take].fill(0),
            }
            done += take;
        }
        n
    }

    /// Common entry of every I/O call: refuse on a dead handle or a halted node.
    fn enter(&self, mutating: bool) -> io::Result<MutexGuard<'_, SimState>> {
        let mut s = self.lock();
        if self.boot != s.boot {
            return Err(sim_error(
                io::ErrorKind::Other,
                "handle opened before a power loss or kill -9 (its process is gone)",
            ));
        }
        if s.halted {
            return Err(sim_error(io::ErrorKind::Other, "node halted"));
        }
        if mutating {
            s.ops += 1;
            if let Some(left) = s.halt_in_ops.as_mut() {
                *left -= 1;
                if *left == 0 {
                    s.halt_in_ops = None;
                    s.halted = true;
                }
            }
        }
        Ok(s)
    }

    fn check_space(s: &SimState, end: u64) -> io::Result<()> {
        match s.space_limit {
            Some(limit) if end > limit => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => Ok(()),
        }
    }

    fn set_length(s: &mut SimState, len: u64) {
        if len < s.len {
            // Bytes past the new end read as zeroes if the file grows again.
            let old_len = s.len;
            Self::put(s, len, (old_len - len) as usize, None);
        }
        s.len = len;
    }

    /// Write `data` (or zeroes when `None`) at `offset` into the cache.
    fn put(s: &mut SimState, offset: u64, len: usize, data: Option<&[u8]>) {
        let end = offset + len as u64;
        let first_full = offset.div_ceil(SECTOR_BYTES);
        let end_full = end / SECTOR_BYTES;
        if data.is_none() && first_full < end_full {
            // Zeroes over whole sectors: only sectors that exist can change.
            if !offset.is_multiple_of(SECTOR_BYTES) {
                Self::put_sector(
                    s,
                    offset,
                    (first_full * SECTOR_BYTES - offset) as usize,
                    None,
                );
            }
            let present: Vec<u64> = s
                .sectors
                .range(first_full..end_full)
                .filter(|(_, sector)| sector.current().is_some())
                .map(|(&i, _)| i)
                .collect();
            for index in present {
                Self::put_sector(s, index * SECTOR_BYTES, SECTOR, None);
            }
            if !end.is_multiple_of(SECTOR_BYTES) {
                let at = end_full * SECTOR_BYTES;
                Self::put_sector(s, at, (end - at) as usize, None);
            }
            return;
        }
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let take = (SECTOR - (pos % SECTOR_BYTES) as usize).min(len - done);
            Self::put_sector(s, pos, take, data.map(|d| &d[done..done + take]));
            done += take;
        }
    }

    /// Write `take` bytes at `pos`, all within one sector.
    fn put_sector(s: &mut SimState, pos: u64, take: usize, data: Option<&[u8]>) {
        let index = pos / SECTOR_BYTES;
        let within = (pos % SECTOR_BYTES) as usize;
        debug_assert!(within + take <= SECTOR);
        let zero = data.is_none_or(|d| d.iter().all(|&b| b == 0));
        let Some(sector) = s.sectors.get_mut(&index) else {
            if zero {
                return; // zeroes over a sector that is zero everywhere: no change
            }
            let mut b = Box::new([0u8; SECTOR]);
            b[within..within + take].copy_from_slice(data.expect("not zero"));
            s.sectors.insert(
                index,
                Sector {
                    durable: None,
                    versions: vec![Some(b)],
                },
            );
            s.dirty.insert(index);
            return;
        };
        let new: SectorData = if take == SECTOR && zero {
            None
        } else if take == SECTOR {
            let mut b = Box::new([0u8; SECTOR]);
            b.copy_from_slice(data.expect("not zero"));
            Some(b)
        } else {
            let mut b = match sector.current() {
                Some(old) => old.clone(),
                None => Box::new([0u8; SECTOR]),
            };
            match data {
                Some(d) => b[within..within + take].copy_from_slice(d),
                None => b[within..within + take].fill(0),
            }
            if b.iter().all(|&x| x == 0) {
                None
            } else {
                Some(b)
            }
        };
        sector.push(new);
        s.dirty.insert(index);
    }
}

impl DurableFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut s = self.enter(false)?;
        let len = s.len;
        let n = Self::copy_out(&s, buf, offset, len, Sector::current);
        s.stats.reads += 1;
        s.stats.bytes_read += n as u64;
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.enter(true)?;
        if std::mem::take(&mut s.fail_next_write) {
            return Err(eio());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| sim_error(io::ErrorKind::InvalidInput, "offset overflow"))?;
        Self::check_space(&s, end)?;
        Self::put(&mut s, offset, buf.len(), Some(buf));
        if end > s.len {
            s.len = end;
        }
        s.stats.writes += 1;
        s.stats.bytes_written += buf.len() as u64;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.enter(true)?;
        let dirty = std::mem::take(&mut s.dirty);
        if std::mem::take(&mut s.fail_next_sync) {
            // Writeback failed for some of the pages: each dirty sector did or did
            // not reach the disk, and is clean now either way.
            for index in &dirty {
                let reached = s.rng.gen_bool(0.5);
                let sector = s.sectors.get_mut(index).expect("dirty sector exists");
                let newest = sector.versions.pop().expect("dirty sector has a version");
                if reached {
                    sector.durable = newest.clone();
                    sector.versions.clear();
                } else {
                    // The cache keeps showing the lost data until power loss.
                    sector.versions.clear();
                    sector.versions.push(newest);
                }
            }
            if s.rng.gen_bool(0.5) {
                s.durable_len = s.len;
            }
            return Err(eio());
        }
        for index in &dirty {
            let sector = s.sectors.get_mut(index).expect("dirty sector exists");
            let newest = sector.versions.pop().expect("dirty sector has a version");
            sector.durable = newest;
            sector.versions.clear();
        }
        s.durable_len = s.len;
        s.stats.syncs += 1;
        Ok(())
    }

    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.enter(false)?.len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.enter(true)?;
        Self::set_length(&mut s, len);
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = self.enter(true)?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| sim_error(io::ErrorKind::InvalidInput, "offset overflow"))?;
        Self::check_space(&s, end)?;
        if end > s.len {
            Self::set_length(&mut s, end);
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = self.enter(true)?;
        let end = offset.saturating_add(len).min(s.len);
        if end > offset {
            Self::put(&mut s, offset, (end - offset) as usize, None);
        }
        Ok(())
    }

    fn try_lock_exclusive(&self) -> io::Result<bool> {
        let mut s = self.enter(false)?;
        match s.lock_owner {
            Some(owner) if owner != self.handle => Ok(false),
            _ => {
                s.lock_owner = Some(self.handle);
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(f: &SimFile, offset: u64, len: usize) -> Vec<u8> {
        f.read_at_most(offset, len).unwrap()
    }

    fn durable(f: &SimFile, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let n = f.read_durable(&mut b, offset);
        b.truncate(n);
        b
    }

    #[test]
    fn writes_are_visible_at_once_and_durable_only_after_sync() {
        let f = SimFile::new(1);
        f.write_all_at(&[7u8; 1000], 100).unwrap();
        assert_eq!(f.len_bytes().unwrap(), 1100);
        assert_eq!(read(&f, 100, 1000), vec![7u8; 1000]);
        assert_eq!(read(&f, 0, 100), vec![0u8; 100]);
        assert_eq!(f.durable_len(), 0);
        assert_eq!(f.volatile_sectors(), 3);
        f.sync_data().unwrap();
        assert_eq!(f.volatile_sectors(), 0);
        assert_eq!(durable(&f, 100, 1000), vec![7u8; 1000]);
        f.power_loss_dropping_volatile();
        let g = f.reopen();
        assert_eq!(read(&g, 100, 1000), vec![7u8; 1000]);
    }

    #[test]
    fn power_loss_without_sync_drops_everything_in_the_worst_case() {
        let f = SimFile::new(1);
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&[2u8; 4096], 0).unwrap();
        f.write_all_at(&[3u8; 512], 8192).unwrap();
        f.power_loss_dropping_volatile();
        let g = f.reopen();
        assert_eq!(g.len_bytes().unwrap(), 4096);
        assert_eq!(read(&g, 0, 4096), vec![1u8; 4096]);
    }

    #[test]
    fn power_loss_keeps_any_subset_of_sectors_and_any_version() {
        // Three unsynced versions of 8 sectors: every sector must come back as
        // one of {durable, v1, v2, v3}, and over many seeds every choice shows up.
        let mut seen = [[false; 4]; 8];
        for seed in 0..200 {
            let f = SimFile::new(seed);
            f.write_all_at(&[0xA0; 4096], 0).unwrap();
            f.sync_data().unwrap();
            for v in 1..=3u8 {
                f.write_all_at(&[0xA0 + v; 4096], 0).unwrap();
            }
            let mut rng = StdRng::seed_from_u64(seed);
            f.power_loss(&mut rng);
            let g = f.reopen();
            let data = read(&g, 0, 4096);
            for (i, sector) in data.chunks(512).enumerate() {
                let v = sector[0] - 0xA0;
                assert!(v <= 3, "sector {i} has foreign data {:x}", sector[0]);
                assert!(sector.iter().all(|&b| b == sector[0]), "a sector is atomic");
                seen[i][v as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| s.iter().all(|&x| x)), "{seen:?}");
    }

    #[test]
    fn power_loss_is_deterministic_for_a_seed() {
        let run = |seed| {
            let f = SimFile::new(9);
            for i in 0..50u64 {
                f.write_all_at(&[i as u8 + 1; 700], i * 300).unwrap();
            }
            f.power_loss(&mut StdRng::seed_from_u64(seed));
            read(&f.reopen(), 0, 20_000)
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn kill9_keeps_volatile_data_but_a_later_power_loss_can_drop_it() {
        let f = SimFile::new(1);
        f.write_all_at(&[5u8; 512], 0).unwrap();
        f.kill9();
        assert!(
            f.write_all_at(&[6u8; 512], 0).is_err(),
            "old handle is dead"
        );
        let g = f.reopen();
        assert_eq!(read(&g, 0, 512), vec![5u8; 512]);
        g.power_loss_dropping_volatile();
        assert_eq!(read(&f.reopen(), 0, 512), Vec::<u8>::new());
    }

    #[test]
    fn a_failed_sync_is_reported_once_and_the_data_may_be_lost() {
        let mut lost = 0;
        let mut kept = 0;
        for seed in 0..64 {
            let f = SimFile::new(seed);
            f.write_all_at(&[1u8; 512], 0).unwrap();
            f.sync_data().unwrap();
            f.write_all_at(&[2u8; 512], 0).unwrap();
            f.fail_next_sync();
            assert!(f.sync_data().is_err());
            // Reads still see the cached data; the next sync "succeeds"...
            assert_eq!(read(&f, 0, 512), vec![2u8; 512]);
            f.sync_data().unwrap();
            // ...without having saved it: power loss shows what the disk got.
            f.power_loss(&mut StdRng::seed_from_u64(seed));
            match read(&f.reopen(), 0, 512)[0] {
                1 => lost += 1,
                2 => kept += 1,
                other => panic!("foreign byte {other}"),
            }
        }
        assert!(lost > 0 && kept > 0, "lost {lost} kept {kept}");
    }

    #[test]
    fn halt_after_ops_stops_every_call_until_a_reboot() {
        let f = SimFile::new(1);
        f.halt_after_ops(2);
        f.write_all_at(&[1], 0).unwrap();
        f.sync_data().unwrap();
        assert!(f.is_halted());
        assert!(f.write_all_at(&[1], 0).is_err());
        assert!(f.read_at_most(0, 1).is_err());
        assert_eq!(f.ops(), 2);
        f.power_loss_dropping_volatile();
        let g = f.reopen();
        assert_eq!(read(&g, 0, 1), vec![1]);
        g.write_all_at(&[2], 0).unwrap();
    }

    #[test]
    fn length_changes_are_volatile_until_sync() {
        let f = SimFile::new(1);
        f.allocate(0, 8192).unwrap();
        f.sync_data().unwrap();
        f.set_len(100).unwrap();
        assert_eq!(f.len_bytes().unwrap(), 100);
        f.power_loss_dropping_volatile();
        let g = f.reopen();
        assert_eq!(g.len_bytes().unwrap(), 8192);
        g.write_all_at(&[9u8; 512], 0).unwrap();
        g.set_len(10).unwrap();
        g.set_len(512).unwrap();
        assert_eq!(read(&g, 0, 512)[..10], [9u8; 10]);
        assert!(read(&g, 0, 512)[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn space_limit_gives_enospc() {
        let f = SimFile::new(1);
        f.set_space_limit(Some(4096));
        f.allocate(0, 4096).unwrap();
        let err = f.allocate(0, 4097).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(f.write_all_at(&[1], 4096).is_err());
    }

    #[test]
    fn the_lock_is_exclusive_per_handle_and_released_on_drop_and_reboot() {
        let f = SimFile::new(1);
        let a = f.reopen();
        let b = f.reopen();
        assert!(a.try_lock_exclusive().unwrap());
        assert!(a.try_lock_exclusive().unwrap(), "relocking the same handle");
        assert!(!b.try_lock_exclusive().unwrap());
        drop(a);
        assert!(b.try_lock_exclusive().unwrap());
        f.kill9();
        assert!(f.reopen().try_lock_exclusive().unwrap());
    }

    #[test]
    fn a_fork_is_independent() {
        let f = SimFile::new(1);
        f.write_all_at(&[1u8; 512], 0).unwrap();
        let g = f.fork();
        f.write_all_at(&[2u8; 512], 0).unwrap();
        g.power_loss_dropping_volatile();
        assert_eq!(read(&f, 0, 512), vec![2u8; 512]);
        assert_eq!(read(&g.reopen(), 0, 512), Vec::<u8>::new());
    }

    #[test]
    fn a_huge_hole_costs_only_the_sectors_that_exist() {
        // A TRIM of 16 TiB in the simulator touches two written sectors, not 2^35.
        let f = SimFile::new(1);
        f.set_len(16 << 40).unwrap();
        f.write_all_at(&[1u8; 512], 1 << 40).unwrap();
        f.write_all_at(&[2u8; 700], (8 << 40) + 100).unwrap();
        f.sync_data().unwrap();
        let started = std::time::Instant::now();
        f.punch_hole(0, 16 << 40).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(f.volatile_sectors(), 3);
        assert_eq!(read(&f, 1 << 40, 512), vec![0u8; 512]);
        f.power_loss_dropping_volatile();
        assert_eq!(read(&f.reopen(), 1 << 40, 512), vec![1u8; 512]);
    }

    #[test]
    fn punch_hole_reads_zero() {
        let f = SimFile::new(1);
        f.write_all_at(&[3u8; 2048], 0).unwrap();
        f.punch_hole(100, 1000).unwrap();
        let d = read(&f, 0, 2048);
        assert!(d[..100].iter().all(|&b| b == 3));
        assert!(d[100..1100].iter().all(|&b| b == 0));
        assert!(d[1100..].iter().all(|&b| b == 3));
        assert_eq!(f.len_bytes().unwrap(), 2048);
    }

    #[test]
    fn real_file_allocate_punch_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let a = open();
        a.allocate(0, 1 << 20).unwrap();
        assert_eq!(a.len_bytes().unwrap(), 1 << 20);
        DurableFile::write_all_at(&a, &[1u8; 8192], 0).unwrap();
        a.punch_hole(4096, 4096).unwrap();
        let d = a.read_at_most(0, 8192).unwrap();
        assert!(d[..4096].iter().all(|&b| b == 1));
        assert!(d[4096..].iter().all(|&b| b == 0));
        assert!(a.try_lock_exclusive().unwrap());
        assert!(!open().try_lock_exclusive().unwrap());
        assert!(available_bytes(&a).unwrap() > 0);
    }
}
