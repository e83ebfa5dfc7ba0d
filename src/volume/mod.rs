//! Block I/O on the local volume: an image file or a block device.
//!
//! Owns: opening a volume exclusively (`flock`, plus `O_EXCL` for block devices),
//! creating sparse images, learning the size, and the I/O engines that serve
//! `read`/`write`/`write_zeroes`/`trim`/`flush`:
//!
//! - **io_uring** (`uring.rs`): one thread owns the ring, batches queued requests
//!   into one submit, sleeps in `submit_and_wait` woken by an eventfd.
//! - **threads** (`threads.rs`): 4 threads doing `pread`/`pwrite`/`fdatasync`.
//! - **memory** (`memory.rs`): a `Vec<u8>` for tests, same API and range checks.
//!
//! Does not own: ordering between requests. The caller guarantees overlapping
//! requests are never in flight at the same time (ARCHITECTURE §G2); non-overlapping
//! requests may complete in any order.
//!
//! Engine choice: [`EngineChoice::Auto`] tries io_uring and falls back to threads
//! with a warning. The environment variable `TANDEM_IO_ENGINE` (`uring`, `threads`,
//! or `auto`) overrides `Auto`; an explicit `Uring` or `Threads` in [`OpenOptions`]
//! wins over the variable. An explicit `Uring` that cannot be set up is an error.
//!
//! Runtime: the async methods must run inside a tokio runtime (the io_uring engine
//! runs `write_zeroes`/`trim` on tokio's blocking pool). Dropping the last handle
//! closes the engine and blocks until requests already queued have completed.
//!
//! Semantics:
//! - `read` returns exactly `len` bytes; holes read as zeros. Requests must lie
//!   inside the volume and read/write carry at most [`REQUEST_BYTES_MAX`] (32 MiB);
//!   otherwise they fail with `ErrorKind::InvalidInput` (EINVAL) before any I/O.
//! - `write(.., fua = true)` is durable when it completes (`RWF_DSYNC` on io_uring,
//!   write + `fdatasync` on threads); `flush` is `fdatasync`.
//! - `write_zeroes`: files `fallocate(ZERO_RANGE)` (space stays allocated), falling
//!   back to writing zeros in 1 MiB chunks; block devices `fallocate(ZERO_RANGE)`,
//!   which is BLKZEROOUT (unaligned edges written as data).
//! - `punch_hole` (and `trim`, which is the same): the range reads as zeros and its
//!   space is given back: files `fallocate(PUNCH_HOLE)`; block devices
//!   `fallocate(PUNCH_HOLE)`, i.e. write-zeroes with unmapping allowed, never a
//!   plain discard (after BLKDISCARD the content is unspecified and two replicas
//!   could differ, G3). Where punching is unsupported, zeros are written (logged once).
//!
//! ## Sparse volumes (issue 11): the API for resync, verify and block status
//!
//! Cost that grows with the volume (reading the zeros of a sparse image, allocating
//! zeros on the secondary) is avoided with two calls:
//!
//! - **Where is data?** [`Volume::next_data`] (async) / [`Volume::next_data_blocking`]
//!   return the first range in `[offset, end)` that may hold data, from
//!   `lseek(SEEK_DATA/SEEK_HOLE)`; [`Volume::allocated_ranges`] iterates them,
//!   widened to the caller's block size. Everything outside them reads as zeros.
//!   Block devices and file systems without SEEK_DATA report everything as data
//!   ([`Volume::knows_holes`] says which case applies); the caller then reads and may
//!   detect all-zero blocks itself. A 1 TiB image holding a few MiB is scanned in
//!   well under a millisecond (tests/volume_sparse.rs).
//!   Use: the primary's resync/initial sync walks the dirty bitmap, asks for the data
//!   ranges of each dirty run, reads only those, and sends the holes as payload-free
//!   zero frames; verify hashes holes without reading them; the NBD frontend can
//!   answer NBD_CMD_BLOCK_STATUS (base:allocation) with the same ranges.
//! - **Keep zeros thin.** [`Volume::punch_hole`]: the secondary applies a zero frame
//!   (or a TRIM) with it instead of writing zeros, so a thin secondary stays thin; a
//!   file system that cannot punch is detected once, logged once, and gets zeros.
//!   [`Volume::write_zeroes`] stays the call for NBD WRITE_ZEROES with NO_HOLE.
//! - `O_DIRECT` (`direct: true`): aligned requests (offset, length and buffer aligned
//!   to 4096 for files, to the logical block size for block devices) use the direct
//!   descriptor; others go through a second, buffered descriptor of the same file.
//! - A failed flush (or durable write) poisons durability: every later `flush`
//!   fails too, because Linux reports a writeback error to `fdatasync` only once and
//!   a later success would claim durability that was lost ("never retry and assume
//!   durability", STYLE.md).

mod buf;
mod files;
mod memory;
mod sys;
mod threads;
mod uring;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::oneshot;

use files::{SparseProbe, VolumeFiles};
use memory::MemoryDevice;
use threads::{PoolOp, ThreadEngine};
use uring::{RingOp, UringEngine};

/// Largest read or write accepted in one request (NBD clients send at most 32 MiB).
pub const REQUEST_BYTES_MAX: u32 = 32 << 20;
/// Volume sizes must be a multiple of this (the smallest logical block size).
pub const SECTOR_BYTES: u64 = 512;
/// Environment variable that overrides [`EngineChoice::Auto`]: `uring`, `threads`, `auto`.
pub const ENGINE_ENV_VAR: &str = "TANDEM_IO_ENGINE";
/// `O_DIRECT` alignment assumed for image files: 4096 works on every file system
/// (some allow 512, none of the common ones need more).
const FILE_DIRECT_ALIGN_BYTES: u64 = 4096;

/// Which I/O engine serves an on-disk volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring, falling back to threads (with a warning) if it cannot be set up;
    /// overridable by `TANDEM_IO_ENGINE`.
    #[default]
    Auto,
    Uring,
    Threads,
}

/// How to open a volume.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Create a sparse image of this size if the path is missing; if the path exists
    /// its size must equal this.
    pub create_size_bytes: Option<u64>,
    /// Open with `O_DIRECT` (bypass the page cache for aligned requests).
    pub direct: bool,
    pub engine: EngineChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {path} does not exist; pass --size to create a sparse image of that size")]
    NotFound { path: PathBuf },
    #[error(
        "volume {path} is already held by another tandem agent (or another program); stop it first"
    )]
    Busy { path: PathBuf },
    #[error(
        "volume {path} is {actual_bytes} bytes but --size asks for {requested_bytes}; drop --size to use the image as it is, or point at another path"
    )]
    SizeMismatch {
        path: PathBuf,
        actual_bytes: u64,
        requested_bytes: u64,
    },
    #[error(
        "volume {path} is {size_bytes} bytes, which is not a positive multiple of 512; resize it or create a new image with --size"
    )]
    SizeNotAligned { path: PathBuf, size_bytes: u64 },
    #[error(
        "volume {path} is neither a regular file nor a block device; point at an image file or a block device"
    )]
    NotAVolume { path: PathBuf },
    #[error("cannot open volume {path}: {source}{hint}")]
    Open {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    // ha (issue 12): online grow.
    #[error(
        "volume {path} is {current_bytes} bytes: shrinking it to {size_bytes} bytes is refused (a filesystem on it would lose its end); nothing changed. Give a size of at least {current_bytes} bytes"
    )]
    Shrink {
        path: PathBuf,
        size_bytes: u64,
        current_bytes: u64,
    },
    #[error(
        "block device {path} is {device_bytes} bytes, smaller than the {size_bytes} bytes asked; grow the device first (lvextend, the SAN), then run tandem resize again; nothing changed"
    )]
    DeviceTooSmall {
        path: PathBuf,
        size_bytes: u64,
        device_bytes: u64,
    },
    #[error("growing {path} to {size_bytes} bytes failed: {source}; check the disk and free space")]
    Grow {
        path: PathBuf,
        size_bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("an in-memory volume cannot grow")]
    GrowMemory,
    #[error("cannot create a sparse image of {size_bytes} bytes at {path}: {source}")]
    Create {
        path: PathBuf,
        size_bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock volume {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the size of volume {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{ENGINE_ENV_VAR}={value} is not an I/O engine; use uring, threads or auto")]
    UnknownEngine { value: String },
    #[error(
        "cannot start the {engine} engine for volume {path}: {source}; use the threads engine ({ENGINE_ENV_VAR}=threads) if io_uring is disabled here"
    )]
    EngineStart {
        path: PathBuf,
        engine: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A handle to an open volume. Clones share the volume (and its engine); the volume
/// is closed and its lock released when the last clone is dropped.
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

struct Inner {
    /// The size served; grows with [`Volume::grow`] (ha, issue 12), never shrinks.
    size_bytes: std::sync::atomic::AtomicU64,
    path: Option<PathBuf>,
    is_block_device: bool,
    backend: Backend,
    /// The first durability failure (failed flush or durable write), if any.
    durability_lost: Mutex<Option<String>>,
}

enum Backend {
    Memory(MemoryDevice),
    Uring {
        files: Arc<VolumeFiles>,
        engine: UringEngine,
    },
    Threads {
        files: Arc<VolumeFiles>,
        engine: ThreadEngine,
    },
}

impl Volume {
    /// Open an image file or block device exclusively; see [`OpenOptions`].
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Volume, VolumeError> {
        let engine_choice = resolve_engine(opts.engine)?;
        let path_buf = path.to_path_buf();
        let open_err = |hint: &'static str| {
            let path = path_buf.clone();
            move |source: io::Error| VolumeError::Open { path, hint, source }
        };

        let mut created = false;
        let is_block_device = match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => true,
            Ok(meta) if meta.is_file() => false,
            Ok(_) => return Err(VolumeError::NotAVolume { path: path_buf }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let Some(size_bytes) = opts.create_size_bytes else {
                    return Err(VolumeError::NotFound { path: path_buf });
                };
                if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_BYTES) {
                    return Err(VolumeError::SizeNotAligned {
                        path: path_buf,
                        size_bytes,
                    });
                }
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                {
                    Ok(_) => created = true,
                    // Another process created it meanwhile; treat it as existing.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => {
                        return Err(VolumeError::Create {
                            path: path_buf,
                            size_bytes,
                            source,
                        });
                    }
                }
                false
            }
            Err(e) => return Err(open_err("")(e)),
        };

        let mut flags = 0;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        if is_block_device {
            // O_EXCL without O_CREAT claims a block device exclusively: fails with
            // EBUSY if it is mounted or claimed by another exclusive opener.
            flags |= libc::O_EXCL;
        }
        let primary = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| {
                if is_block_device && e.raw_os_error() == Some(libc::EBUSY) {
                    VolumeError::Busy {
                        path: path_buf.clone(),
                    }
                } else if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                    open_err("; this file system does not support O_DIRECT, open without --direct")(
                        e,
                    )
                } else {
                    open_err("")(e)
                }
            })?;
        match sys::flock_exclusive(&primary) {
            Ok(true) => {}
            Ok(false) => return Err(VolumeError::Busy { path: path_buf }),
            Err(source) => {
                return Err(VolumeError::Lock {
                    path: path_buf,
                    source,
                });
            }
        }

        if created && let Some(size_bytes) = opts.create_size_bytes {
            primary
                .set_len(size_bytes)
                .map_err(|source| VolumeError::Create {
                    path: path_buf.clone(),
                    size_bytes,
                    source,
                })?;
            tracing::info!(path = %path.display(), size_bytes, "created sparse volume image");
        }
        let size_bytes = if is_block_device {
            sys::block_device_size_bytes(&primary)
        } else {
            primary.metadata().map(|m| m.len())
        }
        .map_err(|source| VolumeError::Size {
            path: path_buf.clone(),
            source,
        })?;
        if let Some(requested_bytes) = opts.create_size_bytes
            && requested_bytes != size_bytes
        {
            return Err(VolumeError::SizeMismatch {
                path: path_buf,
                actual_bytes: size_bytes,
                requested_bytes,
            });
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(VolumeError::SizeNotAligned {
                path: path_buf,
                size_bytes,
            });
        }

        let logical_block_bytes: u64 = if is_block_device {
            sys::block_device_logical_block_bytes(&primary)
                .map_err(|source| VolumeError::Size {
                    path: path_buf.clone(),
                    source,
                })?
                .into()
        } else {
            SECTOR_BYTES
        };
        let (buffered, direct_align_bytes) = if opts.direct {
            let align = if is_block_device {
                logical_block_bytes
            } else {
                FILE_DIRECT_ALIGN_BYTES
            };
            let buffered: File = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(open_err(""))?;
            (Some(buffered), align)
        } else {
            (None, 0)
        };
        let files = Arc::new(VolumeFiles {
            path: path_buf.clone(),
            primary,
            buffered,
            direct_align_bytes,
            is_block_device,
            zero_align_bytes: logical_block_bytes,
            sparse: SparseProbe::default(),
        });

        let engine_err = |engine: &'static str| {
            let path = path_buf.clone();
            move |source: io::Error| VolumeError::EngineStart {
                path,
                engine,
                source,
            }
        };
        let backend = match engine_choice {
            EngineChoice::Uring => Backend::Uring {
                engine: UringEngine::start(files.clone()).map_err(engine_err("io_uring"))?,
                files,
            },
            EngineChoice::Threads => Backend::Threads {
                engine: ThreadEngine::start(files.clone()).map_err(engine_err("threads"))?,
                files,
            },
            EngineChoice::Auto => match UringEngine::start(files.clone()) {
                Ok(engine) => Backend::Uring { files, engine },
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "io_uring cannot be set up; using the threads engine");
                    Backend::Threads {
                        engine: ThreadEngine::start(files.clone())
                            .map_err(engine_err("threads"))?,
                        files,
                    }
                }
            },
        };
        let volume = Volume {
            inner: Arc::new(Inner {
                size_bytes: size_bytes.into(),
                path: Some(path_buf),
                is_block_device,
                backend,
                durability_lost: Mutex::new(None),
            }),
        };
        tracing::info!(path = %path.display(), size_bytes, engine = volume.engine_name(), direct = opts.direct, is_block_device, "opened volume");
        Ok(volume)
    }

    /// An in-memory volume of `size_bytes` (zeros), for tests.
    ///
    /// # Panics
    /// If `size_bytes` is 0 or not a multiple of 512, like an on-disk volume would be refused.
    pub fn memory(size_bytes: u64) -> Volume {
        assert!(
            size_bytes > 0 && size_bytes.is_multiple_of(SECTOR_BYTES),
            "memory volume size {size_bytes} is not a positive multiple of 512"
        );
        Volume {
            inner: Arc::new(Inner {
                size_bytes: size_bytes.into(),
                path: None,
                is_block_device: false,
                backend: Backend::Memory(MemoryDevice::new(size_bytes)),
                durability_lost: Mutex::new(None),
            }),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner
            .size_bytes
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// ha (issue 12): serve only the first `size_bytes` of a larger volume (the
    /// metadata records a smaller size: a block device grown before `tandem
    /// resize`, or a resize interrupted before its metadata recorded it). Never
    /// grows.
    pub fn limit_to(&self, size_bytes: u64) {
        assert!(size_bytes > 0 && size_bytes.is_multiple_of(SECTOR_BYTES));
        self.inner
            .size_bytes
            .fetch_min(size_bytes, std::sync::atomic::Ordering::AcqRel);
    }

    /// The size the file or device has now (an image file's length, a block
    /// device's size), whatever is served.
    pub fn physical_size_bytes(&self) -> io::Result<u64> {
        match &self.inner.backend {
            Backend::Memory(_) => Ok(self.size_bytes()),
            Backend::Uring { files, .. } | Backend::Threads { files, .. } => {
                if files.is_block_device {
                    sys::block_device_size_bytes(&files.primary)
                } else {
                    files.primary.metadata().map(|m| m.len())
                }
            }
        }
    }

    /// ha (issue 12): grow the volume to `size_bytes`, durably: an image file is
    /// extended (sparse; the new range reads as zeroes) and made durable; a block
    /// device must already be that large (the operator grows it first) and its
    /// new range is zeroed, so both nodes hold the same bytes there without a
    /// resync. Then the new size is served. Refused for a smaller size.
    pub fn grow(&self, size_bytes: u64) -> Result<(), VolumeError> {
        let old = self.size_bytes();
        let path = self
            .inner
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from("<memory>"));
        if size_bytes < old {
            return Err(VolumeError::Shrink {
                path,
                size_bytes,
                current_bytes: old,
            });
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(VolumeError::SizeNotAligned { path, size_bytes });
        }
        if size_bytes == old {
            return Ok(());
        }
        let files = match &self.inner.backend {
            Backend::Memory(_) => return Err(VolumeError::GrowMemory),
            Backend::Uring { files, .. } | Backend::Threads { files, .. } => files,
        };
        let grow_err = |source: io::Error| VolumeError::Grow {
            path: files.path.clone(),
            size_bytes,
            source,
        };
        if files.is_block_device {
            let device_bytes = sys::block_device_size_bytes(&files.primary).map_err(grow_err)?;
            if device_bytes < size_bytes {
                return Err(VolumeError::DeviceTooSmall {
                    path: files.path.clone(),
                    size_bytes,
                    device_bytes,
                });
            }
            // The new range holds whatever the device had: zeroed, on each node.
            let mut offset = old;
            while offset < size_bytes {
                let len = (size_bytes - offset).min(1 << 30);
                rustix::fs::fallocate(
                    &files.primary,
                    rustix::fs::FallocateFlags::ZERO_RANGE,
                    offset,
                    len,
                )
                .map_err(|e| grow_err(e.into()))?;
                offset += len;
            }
            files.primary.sync_data().map_err(grow_err)?;
        } else {
            let len = files.primary.metadata().map_err(grow_err)?.len();
            if len < size_bytes {
                files.primary.set_len(size_bytes).map_err(grow_err)?;
            }
            // Past the old size the file reads as zeroes (a resize interrupted
            // after extending it wrote nothing there: nothing is served there
            // before the metadata records the new size).
            files.primary.sync_all().map_err(grow_err)?;
        }
        self.inner
            .size_bytes
            .fetch_max(size_bytes, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// `"io_uring"`, `"threads"` or `"memory"`.
    pub fn engine_name(&self) -> &'static str {
        match self.inner.backend {
            Backend::Memory(_) => "memory",
            Backend::Uring { .. } => "io_uring",
            Backend::Threads { .. } => "threads",
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    pub fn is_block_device(&self) -> bool {
        self.inner.is_block_device
    }

    /// Read exactly `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        self.check_range("read", offset, len.into())?;
        self.check_request_len("read", len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        match &self.inner.backend {
            Backend::Memory(mem) => Ok(mem.read(offset, len)),
            Backend::Uring { engine, .. } => {
                let (reply, rx) = oneshot::channel();
                engine
                    .submit(RingOp::Read {
                        offset,
                        len_bytes: len,
                        reply,
                    })
                    .await?;
                rx.await.map_err(|_| uring::engine_stopped())?
            }
            Backend::Threads { engine, .. } => {
                let (reply, rx) = oneshot::channel();
                engine
                    .submit(PoolOp::Read {
                        offset,
                        len_bytes: len,
                        reply,
                    })
                    .await?;
                rx.await.map_err(|_| uring::engine_stopped())?
            }
        }
    }

    /// Whether a write without FUA is a plain copy into the page cache that
    /// [`Volume::write_inline`] performs on the calling thread.
    pub fn writes_inline(&self) -> bool {
        matches!(&self.inner.backend, Backend::Uring { files, .. } if files.buffered.is_none())
    }

    /// Write `data` at `offset` synchronously on the calling thread, for volumes
    /// where [`Volume::writes_inline`] holds (buffered, not FUA): a page-cache copy of
    /// a few µs, without the hop to an I/O thread. Same checks as [`Volume::write`].
    pub fn write_inline(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range("write", offset, data.len() as u64)?;
        self.check_request_len("write", u32::try_from(data.len()).unwrap_or(u32::MAX))?;
        match &self.inner.backend {
            Backend::Uring { files, .. } if files.buffered.is_none() => {
                use std::os::unix::fs::FileExt;
                files.primary.write_all_at(data, offset)
            }
            _ => {
                panic!("write_inline on a volume that does not write inline (check writes_inline)")
            }
        }
    }

    /// Write `data` at `offset`; with `fua` the data is durable when this returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.check_range("write", offset, data.len() as u64)?;
        self.check_request_len("write", len)?;
        if fua {
            self.check_durability()?;
        }
        if data.is_empty() {
            return if fua { self.flush().await } else { Ok(()) };
        }
        let result = match &self.inner.backend {
            Backend::Memory(mem) => {
                mem.write(offset, &data);
                Ok(())
            }
            // Buffered writes without FUA only copy into the page cache: a 4 KiB pwrite
            // costs a few µs on the calling thread, while the ring thread plus the
            // io-wq worker that io_uring punts buffered file writes to cost three
            // context switches (bench: ~10 per replicated write end to end). The
            // caller's thread may block briefly under dirty-page throttling.
            Backend::Uring { files, .. } if files.buffered.is_none() && !fua => {
                use std::os::unix::fs::FileExt;
                files.primary.write_all_at(&data, offset)
            }
            Backend::Uring { engine, .. } => {
                let (reply, rx) = oneshot::channel();
                engine
                    .submit(RingOp::Write {
                        offset,
                        data,
                        fua,
                        reply,
                    })
                    .await?;
                rx.await.map_err(|_| uring::engine_stopped())?
            }
            Backend::Threads { engine, .. } => {
                let (reply, rx) = oneshot::channel();
                engine
                    .submit(PoolOp::Write {
                        offset,
                        data,
                        fua,
                        reply,
                    })
                    .await?;
                rx.await.map_err(|_| uring::engine_stopped())?
            }
        };
        if fua {
            self.record_durability("durable write", result)
        } else {
            result
        }
    }

    /// Make `[offset, offset + len)` read as zeros (any length inside the volume).
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_range("write_zeroes", offset, len)?;
        if fua {
            self.check_durability()?;
        }
        let result = match &self.inner.backend {
            Backend::Memory(mem) => {
                mem.write_zeroes(offset, len);
                Ok(())
            }
            Backend::Uring { files, .. } => {
                let files = files.clone();
                run_blocking(move || files.write_zeroes_sync(offset, len, fua)).await
            }
            Backend::Threads { engine, .. } => {
                let (reply, rx) = oneshot::channel();
                engine
                    .submit(PoolOp::WriteZeroes {
                        offset,
                        len_bytes: len,
                        fua,
                        reply,
                    })
                    .await?;
                rx.await.map_err(|_| uring::engine_stopped())?
            }
        };
        if fua {
            self.record_durability("durable write_zeroes", result)
        } else {
            result
        }
    }

    /// Declare `[offset, offset + len)` unused: the same as [`Volume::punch_hole`], so
    /// a trimmed range reads as zeros on every backend (never a plain discard).
    pub async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len).await
    }

    /// Make `[offset, offset + len)` read as zeros **and keep it unallocated**: what
    /// the secondary does with a zero range so that a thin secondary stays thin.
    /// Any length inside the volume; not durable until the next flush (like a write
    /// without FUA).
    ///
    /// - Image files: `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
    /// - Block devices: `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the logical-block-aligned
    ///   body, which the kernel turns into WRITE_ZEROES with unmapping allowed (a thin
    ///   LV, an SSD with deterministic zeroing, or a loop device over a sparse file
    ///   deallocates); unaligned edges are written as zeros. Never BLKDISCARD alone:
    ///   a discarded range's content is unspecified.
    /// - Where the file system or device cannot punch (ext2, ext4 files without
    ///   extents, ramfs, vfat; devices without write-zeroes): learned on the first
    ///   call, logged once as a warning, and zeros are written instead
    ///   ([`Volume::write_zeroes`]): the result is still correct, only not thin.
    ///   [`Volume::punch_hole_unsupported`] reports it afterwards.
    /// - Memory volumes deallocate the 4 KiB pages the range covers whole.
    pub async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range("punch_hole", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match &self.inner.backend {
            Backend::Memory(mem) => {
                mem.punch_hole(offset, len);
                Ok(())
            }
            Backend::Uring { files, .. } => {
                let files = files.clone();
                run_blocking(move || files.punch_hole_sync(offset, len)).await
            }
            Backend::Threads { engine, .. } => {
                let (reply, rx) = oneshot::channel();
                engine
                    .submit(PoolOp::PunchHole {
                        offset,
                        len_bytes: len,
                        reply,
                    })
                    .await?;
                rx.await.map_err(|_| uring::engine_stopped())?
            }
        }
    }

    /// Whether an earlier [`Volume::punch_hole`] found that this volume cannot punch
    /// holes (zeros were written instead). `false` until a punch was tried.
    pub fn punch_hole_unsupported(&self) -> bool {
        match &self.inner.backend {
            Backend::Memory(_) => false,
            Backend::Uring { files, .. } | Backend::Threads { files, .. } => {
                files.sparse.punch_hole_unsupported()
            }
        }
    }

    /// Whether [`Volume::next_data`] can tell holes from data on this volume: true
    /// for memory volumes and for image files on a file system with SEEK_DATA (ext4,
    /// xfs, btrfs, tmpfs, ext2...; learned on the first query), false for block
    /// devices and file systems without it, where every range is reported as data.
    pub fn knows_holes(&self) -> bool {
        match &self.inner.backend {
            Backend::Memory(_) => true,
            Backend::Uring { files, .. } | Backend::Threads { files, .. } => {
                !files.is_block_device && !files.sparse.seek_data_unsupported()
            }
        }
    }

    /// The first range inside `[offset, end)` that may hold data, or `None` when the
    /// rest of it is a hole (reads as zeros). A blocking call: two `lseek`s, µs on a
    /// file whose extent tree is cached (see [`Volume::next_data`] from async code).
    ///
    /// - Image files: `lseek(SEEK_DATA)` then `lseek(SEEK_HOLE)`; the range is as the
    ///   file system reports it (its block boundaries, clipped to `[offset, end)`).
    ///   Preallocated (unwritten) extents count as holes on ext4/xfs: they read as
    ///   zeros. A file system without SEEK_DATA: the whole rest is data (learned
    ///   once; see [`Volume::knows_holes`]).
    /// - Block devices: always `Some(offset..end)`: a device has no holes to report
    ///   (even a thin one, through this interface). The caller reads and may skip
    ///   blocks that are all zeros itself.
    /// - Memory volumes: runs of allocated 4 KiB pages.
    ///
    /// A snapshot: a write that completes after the call may allocate a reported
    /// hole. Writes completed before the call are always reported as data (page-cache
    /// data not yet written back included).
    pub fn next_data_blocking(&self, offset: u64, end: u64) -> io::Result<Option<Range<u64>>> {
        self.check_range("next_data", offset, end.saturating_sub(offset))?;
        if offset >= end {
            return Ok(None);
        }
        match &self.inner.backend {
            Backend::Memory(mem) => Ok(mem.next_data(offset, end)),
            Backend::Uring { files, .. } | Backend::Threads { files, .. } => {
                files.next_data_sync(offset, end)
            }
        }
    }

    /// [`Volume::next_data_blocking`] for async callers: image files are queried on
    /// tokio's blocking pool (an `lseek` may read extent metadata from disk).
    pub async fn next_data(&self, offset: u64, end: u64) -> io::Result<Option<Range<u64>>> {
        self.check_range("next_data", offset, end.saturating_sub(offset))?;
        match &self.inner.backend {
            Backend::Uring { files, .. } | Backend::Threads { files, .. }
                if !files.is_block_device && !files.sparse.seek_data_unsupported() =>
            {
                let volume = self.clone();
                tokio::task::spawn_blocking(move || volume.next_data_blocking(offset, end))
                    .await
                    .map_err(|e| io::Error::other(format!("volume worker task failed: {e}")))?
            }
            _ => self.next_data_blocking(offset, end),
        }
    }

    /// The ranges inside `[offset, offset + len)` that may hold data, in order, each
    /// widened to multiples of `align_bytes` (the caller's block size; a power of two)
    /// and clipped to the asked range, adjacent ones merged: a block is left out only
    /// if it lies wholly in a hole. Built on [`Volume::next_data_blocking`] (same
    /// rules for block devices and file systems without SEEK_DATA: one range, the
    /// whole request). Lazy: each `next()` costs two `lseek`s, so memory stays
    /// bounded however fragmented the file is; a 1 TiB image with a few extents is
    /// scanned in well under a millisecond.
    ///
    /// # Panics
    /// If `align_bytes` is not a power of two.
    pub fn allocated_ranges(&self, offset: u64, len: u64, align_bytes: u64) -> AllocatedRanges<'_> {
        assert!(
            align_bytes.is_power_of_two(),
            "allocated_ranges: align_bytes {align_bytes} is not a power of two"
        );
        AllocatedRanges {
            volume: self,
            cursor: offset,
            start: offset,
            end: offset.saturating_add(len),
            align_bytes,
            pending: None,
            done: false,
        }
    }

    /// Make every completed write durable (`fdatasync`).
    pub async fn flush(&self) -> io::Result<()> {
        self.check_durability()?;
        let result = match &self.inner.backend {
            Backend::Memory(_) => Ok(()),
            Backend::Uring { engine, .. } => {
                let (reply, rx) = oneshot::channel();
                engine.submit(RingOp::Flush { reply }).await?;
                rx.await.map_err(|_| uring::engine_stopped())?
            }
            Backend::Threads { engine, .. } => {
                let (reply, rx) = oneshot::channel();
                engine.submit(PoolOp::Flush { reply }).await?;
                rx.await.map_err(|_| uring::engine_stopped())?
            }
        };
        self.record_durability("flush", result)
    }

    fn display_name(&self) -> String {
        match &self.inner.path {
            Some(p) => p.display().to_string(),
            None => "<memory>".to_string(),
        }
    }

    fn check_range(&self, what: &str, offset: u64, len_bytes: u64) -> io::Result<()> {
        match offset.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what} of {len_bytes} bytes at offset {offset} ends past the end of volume {} ({} bytes)",
                    self.display_name(),
                    self.size_bytes()
                ),
            )),
        }
    }

    fn check_request_len(&self, what: &str, len_bytes: u32) -> io::Result<()> {
        if len_bytes > REQUEST_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what} of {len_bytes} bytes on volume {} exceeds the {REQUEST_BYTES_MAX}-byte request limit; split it",
                    self.display_name()
                ),
            ));
        }
        Ok(())
    }

    fn check_durability(&self) -> io::Result<()> {
        match &*self
            .inner
            .durability_lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(first) => Err(io::Error::other(format!(
                "volume {} lost durability earlier ({first}); later flushes cannot prove data is safe: mark the volume for resync and restart",
                self.display_name()
            ))),
            None => Ok(()),
        }
    }

    fn record_durability(&self, what: &str, result: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &result {
            tracing::error!(volume = %self.display_name(), error = %e, "{what} failed; volume durability is lost");
            let mut lost = self
                .inner
                .durability_lost
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            lost.get_or_insert_with(|| format!("{what} failed: {e}"));
        }
        result
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.inner.path)
            .field("size_bytes", &self.size_bytes())
            .field("engine", &self.engine_name())
            .finish()
    }
}

/// Iterator returned by [`Volume::allocated_ranges`].
pub struct AllocatedRanges<'a> {
    volume: &'a Volume,
    /// Where the next `next_data` query starts.
    cursor: u64,
    /// The asked range: results are clipped to it.
    start: u64,
    end: u64,
    align_bytes: u64,
    /// A widened range waiting to be merged with the next one if they touch.
    pending: Option<Range<u64>>,
    done: bool,
}

impl Iterator for AllocatedRanges<'_> {
    type Item = io::Result<Range<u64>>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let found = if self.cursor < self.end {
                match self.volume.next_data_blocking(self.cursor, self.end) {
                    Ok(found) => found,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            } else {
                None
            };
            let Some(data) = found else {
                self.done = true;
                break;
            };
            let widened = (data.start / self.align_bytes * self.align_bytes).max(self.start)
                ..data
                    .end
                    .checked_next_multiple_of(self.align_bytes)
                    .unwrap_or(u64::MAX)
                    .min(self.end);
            self.cursor = widened.end;
            match self.pending.take() {
                Some(prev) if widened.start <= prev.end => {
                    self.pending = Some(prev.start..widened.end.max(prev.end));
                }
                Some(prev) => {
                    self.pending = Some(widened);
                    return Some(Ok(prev));
                }
                None => self.pending = Some(widened),
            }
        }
        self.pending.take().map(Ok)
    }
}

async fn run_blocking(f: impl FnOnce() -> io::Result<()> + Send + 'static) -> io::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("volume worker task failed: {e}")))?
}

fn resolve_engine(choice: EngineChoice) -> Result<EngineChoice, VolumeError> {
    if choice != EngineChoice::Auto {
        return Ok(choice);
    }
    match std::env::var(ENGINE_ENV_VAR) {
        Err(std::env::VarError::NotPresent) => Ok(EngineChoice::Auto),
        Err(std::env::VarError::NotUnicode(v)) => Err(VolumeError::UnknownEngine {
            value: v.to_string_lossy().into_owned(),
        }),
        Ok(v) => match v.trim() {
            "" | "auto" => Ok(EngineChoice::Auto),
            "uring" | "io_uring" => Ok(EngineChoice::Uring),
            "threads" => Ok(EngineChoice::Threads),
            _ => Err(VolumeError::UnknownEngine { value: v }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_flush_fails_every_later_flush_and_durable_write() {
        let volume = Volume::memory(1 << 20);
        volume.flush().await.unwrap();
        let failed =
            volume.record_durability("flush", Err(io::Error::from_raw_os_error(libc::EIO)));
        assert!(failed.is_err());
        let err = volume.flush().await.unwrap_err();
        assert!(
            err.to_string()
                .contains("lost durability earlier (flush failed"),
            "{err}"
        );
        assert!(
            volume
                .write(0, Bytes::from_static(b"x"), true)
                .await
                .is_err()
        );
        assert!(volume.write_zeroes(0, 512, true).await.is_err());
        // Plain writes still work: they promise nothing about durability.
        volume
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        assert!(
            volume.clone().flush().await.is_err(),
            "clones share the poisoned state"
        );
    }
}
