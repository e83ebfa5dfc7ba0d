//! Thin wrappers around the Linux system calls the volume needs that `std` does not
//! offer: `flock`, block-device ioctls, `fallocate`, `eventfd`. Each wrapper turns
//! the C return convention into an `io::Result`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes (include/uapi/linux/fs.h).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`: logical block (sector) size of a block device in bytes.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `_IO(0x12, 127)`: write zeroes to a byte range `[u64 start, u64 len]`, both 512-aligned.
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Take an exclusive, non-blocking `flock` on `fd`. Returns `Ok(false)` when another
/// open file description (this process or another) already holds a lock.
pub fn flock_exclusive(fd: &impl AsRawFd) -> io::Result<bool> {
    loop {
        // SAFETY: flock only reads the integer fd, which the caller keeps open.
        let ret = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

/// Size of a block device in bytes (`BLKGETSIZE64`).
pub fn block_device_size_bytes(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut size_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live
    // local u64 for the duration of the call.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BLKGETSIZE64 as _,
            &mut size_bytes as *mut u64,
        )
    })?;
    Ok(size_bytes)
}

/// Logical block size of a block device in bytes (`BLKSSZGET`).
pub fn block_device_logical_block_bytes(fd: &impl AsRawFd) -> io::Result<u32> {
    let mut block_bytes: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BLKSSZGET as _,
            &mut block_bytes as *mut libc::c_int,
        )
    })?;
    u32::try_from(block_bytes)
        .ok()
        .filter(|b| b.is_power_of_two() && *b >= 512)
        .ok_or_else(|| {
            io::Error::other(format!(
                "BLKSSZGET returned an invalid logical block size {block_bytes}"
            ))
        })
}

fn block_range_ioctl(
    fd: &impl AsRawFd,
    request: libc::c_ulong,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 values through the pointer, which
    // points to a live local array for the duration of the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, range.as_ptr()) })?;
    Ok(())
}

/// Zero `[offset, offset + len)` on a block device; both must be 512-aligned.
pub fn block_zero_out(fd: &impl AsRawFd, offset: u64, len: u64) -> io::Result<()> {
    block_range_ioctl(fd, BLKZEROOUT, offset, len)
}

fn fallocate(fd: &impl AsRawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate takes only integers; the fd is kept open by the caller.
        let ret = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Deallocate `[offset, offset + len)` of a file, keeping its size; reads return zeros.
pub fn punch_hole(fd: &impl AsRawFd, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zero `[offset, offset + len)` of a file without writing data blocks, keeping its size.
pub fn zero_range(fd: &impl AsRawFd, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        fd,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// A blocking, close-on-exec eventfd. Blocking on purpose: io_uring honours
/// `O_NONBLOCK` and would complete the armed read with `-EAGAIN` instead of waiting.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes only integers and returns a new fd or -1.
    let fd: RawFd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add 1 to an eventfd's counter, waking whoever waits on it. Never blocks in
/// practice: it would block only if the counter reached 2^64 - 2.
pub fn eventfd_signal(fd: &impl AsRawFd) -> io::Result<()> {
    let one: u64 = 1;
    loop {
        // SAFETY: write reads 8 bytes from a live local u64.
        let ret = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if ret == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if ret < 0 && err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(if ret < 0 {
            err
        } else {
            io::Error::other("short write to eventfd")
        });
    }
}
