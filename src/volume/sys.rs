//! Thin wrappers around the Linux system calls the volume needs that `std` does not
//! offer: `flock`, `fallocate`, `lseek(SEEK_DATA/SEEK_HOLE)`, the block-device size
//! queries and `eventfd`. All of them go through rustix, which wraps each call
//! safely; this file holds no `unsafe` (issue 9: hand-written `unsafe` that rustix
//! already covers is replaced). Each wrapper retries `EINTR` where the call can be
//! interrupted and turns rustix's errno into `io::Error`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::event::EventfdFlags;
use rustix::fs::{FallocateFlags, FlockOperation, SeekFrom};
use rustix::io::Errno;

/// Retry `f` while it fails with `EINTR`.
fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Take an exclusive, non-blocking `flock` on `fd`. Returns `Ok(false)` when another
/// open file description (this process or another) already holds a lock.
pub fn flock_exclusive(fd: impl AsFd) -> io::Result<bool> {
    match retry(|| rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive)) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Size of a block device in bytes: `lseek(fd, 0, SEEK_END)` returns it (the kernel
/// computes it from the same field `BLKGETSIZE64` reads), without an ioctl. Every
/// volume I/O is positional (`pread`/`pwrite`/io_uring with offsets), so moving the
/// descriptor's file position changes nothing.
pub fn block_device_size_bytes(fd: impl AsFd) -> io::Result<u64> {
    retry(|| rustix::fs::seek(&fd, SeekFrom::End(0)))
}

/// Logical block size of a block device in bytes (`BLKSSZGET`), checked to be a power
/// of two of at least 512.
pub fn block_device_logical_block_bytes(fd: impl AsFd) -> io::Result<u32> {
    let block_bytes = retry(|| rustix::fs::ioctl_blksszget(&fd))?;
    if block_bytes.is_power_of_two() && block_bytes >= 512 {
        Ok(block_bytes)
    } else {
        Err(io::Error::other(format!(
            "BLKSSZGET returned an invalid logical block size {block_bytes}"
        )))
    }
}

fn fallocate(fd: impl AsFd, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    retry(|| rustix::fs::fallocate(&fd, mode, offset, len))
}

/// Deallocate `[offset, offset + len)`, keeping the size; the range reads as zeros.
///
/// Files: the file system frees the blocks (`EOPNOTSUPP` where it cannot, e.g. ext2,
/// ext4 files without extents, ramfs). Block devices: `REQ_OP_WRITE_ZEROES` with
/// unmapping allowed and no fallback (`EOPNOTSUPP` when the device cannot zero
/// that way); offset and length must be multiples of the logical block size. A loop
/// device turns it into a hole punched in its backing file.
pub fn punch_hole(fd: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// Zero `[offset, offset + len)` without writing data, keeping the size.
///
/// Files: unwritten extents (the space stays allocated). Block devices: the same as
/// the `BLKZEROOUT` ioctl (`REQ_OP_WRITE_ZEROES` without unmapping, the kernel
/// writing zero pages where the device has no such command); offset and length must
/// be multiples of the logical block size.
pub fn zero_range(fd: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        fd,
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// Where the next data at or after `offset` starts (`lseek(SEEK_DATA)`), or `None`
/// when only a hole remains up to the end of the file (`ENXIO`). Errors other than
/// `ENXIO` are returned as they are (`EINVAL`: the file system has no SEEK_DATA).
pub fn seek_data(fd: impl AsFd, offset: u64) -> io::Result<Option<u64>> {
    match retry(|| rustix::fs::seek(&fd, SeekFrom::Data(offset))) {
        Ok(at) => Ok(Some(at)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where the hole at or after `offset` starts (`lseek(SEEK_HOLE)`); the end of the
/// file counts as a hole, so inside the file this always finds one.
pub fn seek_hole(fd: impl AsFd, offset: u64) -> io::Result<u64> {
    retry(|| rustix::fs::seek(&fd, SeekFrom::Hole(offset)))
}

/// A blocking, close-on-exec eventfd. Blocking on purpose: io_uring honours
/// `O_NONBLOCK` and would complete the armed read with `-EAGAIN` instead of waiting.
pub fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(0, EventfdFlags::CLOEXEC)?)
}

/// Add 1 to an eventfd's counter, waking whoever waits on it. Never blocks in
/// practice: it would block only if the counter reached 2^64 - 2.
pub fn eventfd_signal(fd: impl AsFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    match retry(|| rustix::io::write(&fd, &one))? {
        8 => Ok(()),
        n => Err(io::Error::other(format!(
            "short write to eventfd ({n} of 8 bytes)"
        ))),
    }
}
