//! The open file descriptors of one on-disk volume and the synchronous (blocking)
//! operations on them, shared by both engines: the threads engine runs everything
//! here; the io_uring engine uses it for `write_zeroes`, `punch_hole`, `trim` and the
//! allocation queries (run on tokio's blocking pool) and for routing each request to
//! the right descriptor.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use super::buf::AlignedBuf;
use super::sys;

/// Largest chunk written when zeroes must be written as data (file systems without
/// `FALLOC_FL_ZERO_RANGE`, unaligned edges on block devices): 1 MiB bounds the memory
/// a single `write_zeroes` of any length can take.
pub const ZERO_CHUNK_BYTES_MAX: u64 = 1 << 20;

/// The descriptors of an open image file or block device.
pub struct VolumeFiles {
    pub path: PathBuf,
    /// The descriptor that holds the `flock` (and `O_EXCL` claim for block devices);
    /// opened with `O_DIRECT` when the volume is direct.
    pub primary: File,
    /// A second, buffered descriptor of the same file for requests that are not
    /// aligned for `O_DIRECT`; `None` when the volume is not direct. Linux keeps the
    /// page cache and direct I/O coherent for non-overlapping in-flight requests.
    pub buffered: Option<File>,
    /// Alignment (offset, length, memory address) `O_DIRECT` needs; 0 when not direct.
    pub direct_align_bytes: u64,
    pub is_block_device: bool,
    /// Granularity of the block-device zeroing calls (`fallocate` on a block device
    /// needs offset and length aligned to the logical block size): the device's
    /// logical block size, or 512 for files (unused there).
    pub zero_align_bytes: u64,
    /// What the file system turned out not to support; each is learned (and logged)
    /// once, after which the fallback is used without trying again.
    pub sparse: SparseProbe,
}

/// Sparse-file capabilities learned from the first failing call.
#[derive(Debug, Default)]
pub struct SparseProbe {
    /// `fallocate(PUNCH_HOLE)` failed with EOPNOTSUPP (ext2, ext4 without extents,
    /// ramfs, vfat; block devices without write-zeroes support).
    punch_hole_unsupported: AtomicBool,
    /// `lseek(SEEK_DATA)` failed with EINVAL/EOPNOTSUPP: the whole file counts as data.
    seek_data_unsupported: AtomicBool,
}

impl SparseProbe {
    pub fn punch_hole_unsupported(&self) -> bool {
        self.punch_hole_unsupported.load(Ordering::Relaxed)
    }

    pub fn seek_data_unsupported(&self) -> bool {
        self.seek_data_unsupported.load(Ordering::Relaxed)
    }
}

impl VolumeFiles {
    /// The descriptor a request at `offset` of `len_bytes` from/to memory at `addr`
    /// must use: the direct descriptor only when all three are aligned.
    pub fn fd_for(&self, offset: u64, len_bytes: u64, addr: usize) -> RawFd {
        match &self.buffered {
            Some(buffered) => {
                let align = self.direct_align_bytes;
                if offset.is_multiple_of(align)
                    && len_bytes.is_multiple_of(align)
                    && (addr as u64).is_multiple_of(align)
                {
                    self.primary.as_raw_fd()
                } else {
                    buffered.as_raw_fd()
                }
            }
            None => self.primary.as_raw_fd(),
        }
    }

    fn file_for(&self, offset: u64, len_bytes: u64, addr: usize) -> &File {
        match &self.buffered {
            Some(buffered) if self.fd_for(offset, len_bytes, addr) == buffered.as_raw_fd() => {
                buffered
            }
            _ => &self.primary,
        }
    }

    /// True when `data` must be copied into an aligned buffer to use the direct descriptor.
    pub fn needs_aligned_copy(&self, offset: u64, data: &[u8]) -> bool {
        let align = self.direct_align_bytes;
        self.buffered.is_some()
            && offset.is_multiple_of(align)
            && (data.len() as u64).is_multiple_of(align)
            && !(data.as_ptr() as u64).is_multiple_of(align)
    }

    /// Read exactly `len_bytes` at `offset`, resubmitting after short reads.
    pub fn read_sync(&self, offset: u64, len_bytes: u32) -> io::Result<Bytes> {
        let mut buf = AlignedBuf::zeroed(len_bytes as usize);
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf.as_mut_slice()[done..];
            let at = offset + done as u64;
            let file = self.file_for(at, rest.len() as u64, rest.as_ptr() as usize);
            match file.read_at(rest, at) {
                Ok(0) => return Err(unexpected_eof(&self.path, at)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf.into_bytes())
    }

    /// Write all of `data` at `offset`; with `fua`, make it durable before returning.
    pub fn write_sync(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let copy;
        let data = if self.needs_aligned_copy(offset, data) {
            copy = AlignedBuf::copy_from(data);
            copy.as_slice()
        } else {
            data
        };
        self.write_all_routed(offset, data)?;
        if fua { self.flush_sync() } else { Ok(()) }
    }

    fn write_all_routed(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            let at = offset + done as u64;
            let file = self.file_for(at, rest.len() as u64, rest.as_ptr() as usize);
            match file.write_at(rest, at) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!(
                            "volume {} accepted 0 bytes at offset {at}",
                            self.path.display()
                        ),
                    ));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `fdatasync`: durability is per inode, so one descriptor covers both.
    pub fn flush_sync(&self) -> io::Result<()> {
        self.primary.sync_data()
    }

    /// Make `[offset, offset + len_bytes)` read as zeros.
    pub fn write_zeroes_sync(&self, offset: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        if self.is_block_device {
            let (head, body, tail) = split_aligned(offset, len_bytes, self.zero_align_bytes);
            for (at, len) in [head, tail] {
                self.write_zero_chunks(at, len)?;
            }
            if body.1 > 0 {
                // fallocate(ZERO_RANGE) on a block device is BLKZEROOUT: the kernel
                // writes zero pages itself where the device has no zeroing command.
                match sys::zero_range(&self.primary, body.0, body.1) {
                    Ok(()) => {}
                    Err(e) if is_unsupported(&e) => self.write_zero_chunks(body.0, body.1)?,
                    Err(e) => return Err(e),
                }
            }
        } else {
            match sys::zero_range(&self.primary, offset, len_bytes) {
                Ok(()) => {}
                Err(e) if is_unsupported(&e) => self.write_zero_chunks(offset, len_bytes)?,
                Err(e) => return Err(e),
            }
        }
        if fua { self.flush_sync() } else { Ok(()) }
    }

    /// Write zeros as data, in chunks of at most [`ZERO_CHUNK_BYTES_MAX`].
    pub fn write_zero_chunks(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        let zeros = AlignedBuf::zeroed(len_bytes.min(ZERO_CHUNK_BYTES_MAX) as usize);
        let mut done = 0u64;
        while done < len_bytes {
            let n = (len_bytes - done).min(ZERO_CHUNK_BYTES_MAX);
            self.write_all_routed(offset + done, &zeros.as_slice()[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Make `[offset, offset + len_bytes)` read as zeros and give its space back where
    /// the storage can: files get a hole (`PUNCH_HOLE | KEEP_SIZE`); block devices get
    /// `fallocate(PUNCH_HOLE)` (write-zeroes with unmapping allowed: a thin device or a
    /// loop device over a sparse file deallocates) for the logical-block-aligned body,
    /// zeros written as data for the unaligned edges. Where the file system or device
    /// cannot punch, this is learned once, logged once (warn), and zeros are written
    /// instead ([`Self::write_zeroes_sync`]), so the range always reads as zeros.
    pub fn punch_hole_sync(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        if self.sparse.punch_hole_unsupported() {
            return self.write_zeroes_sync(offset, len_bytes, false);
        }
        let (head, body, tail) = if self.is_block_device {
            split_aligned(offset, len_bytes, self.zero_align_bytes)
        } else {
            ((offset, 0), (offset, len_bytes), (offset + len_bytes, 0))
        };
        if body.1 > 0 {
            match sys::punch_hole(&self.primary, body.0, body.1) {
                Ok(()) => {}
                Err(e) if is_unsupported(&e) => {
                    if !self
                        .sparse
                        .punch_hole_unsupported
                        .swap(true, Ordering::Relaxed)
                    {
                        tracing::warn!(
                            volume = %self.path.display(),
                            error = %e,
                            "this {} cannot punch holes; zero ranges are written as zeros and take space (a thin volume fills up)",
                            if self.is_block_device { "block device" } else { "file system" }
                        );
                    }
                    return self.write_zeroes_sync(offset, len_bytes, false);
                }
                Err(e) => return Err(e),
            }
        }
        for (at, len) in [head, tail] {
            self.write_zero_chunks(at, len)?;
        }
        Ok(())
    }

    /// The first range inside `[offset, end)` that may hold data, or `None` when the
    /// rest is a hole. Files: `lseek(SEEK_DATA)` then `lseek(SEEK_HOLE)`, so the
    /// range ends where the next hole starts (clipped to `end`); boundaries are the
    /// file system's block boundaries. A file system without SEEK_DATA (learned once,
    /// logged once at debug level) and every block device report the whole rest as
    /// data: the caller reads it and may skip zeros itself.
    pub fn next_data_sync(&self, offset: u64, end: u64) -> io::Result<Option<Range<u64>>> {
        if offset >= end {
            return Ok(None);
        }
        if self.is_block_device || self.sparse.seek_data_unsupported() {
            return Ok(Some(offset..end));
        }
        let data = match sys::seek_data(&self.primary, offset) {
            Ok(Some(data)) => data,
            Ok(None) => return Ok(None),
            Err(e) if is_seek_unsupported(&e) => {
                if !self
                    .sparse
                    .seek_data_unsupported
                    .swap(true, Ordering::Relaxed)
                {
                    tracing::debug!(volume = %self.path.display(), error = %e, "no SEEK_DATA on this file system; treating the whole volume as data");
                }
                return Ok(Some(offset..end));
            }
            Err(e) => return Err(e),
        };
        if data >= end {
            return Ok(None);
        }
        let hole = sys::seek_hole(&self.primary, data)?;
        Ok(Some(data..hole.clamp(data, end)))
    }
}

/// Split a range into an unaligned head, an `align`-aligned body and an unaligned
/// tail, each as `(offset, len)`.
fn split_aligned(offset: u64, len_bytes: u64, align: u64) -> ((u64, u64), (u64, u64), (u64, u64)) {
    let end = offset + len_bytes;
    let body_start = offset.next_multiple_of(align).min(end);
    let body_end = (end / align * align).max(body_start);
    (
        (offset, body_start - offset),
        (body_start, body_end - body_start),
        (body_end, end - body_end),
    )
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

/// `lseek` answers EINVAL for an unknown `whence` (a file system or kernel without
/// SEEK_DATA); some FUSE and network file systems answer EOPNOTSUPP.
fn is_seek_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

pub fn unexpected_eof(path: &std::path::Path, offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "volume {} ended at offset {offset}, inside its recorded size; was it truncated by another program?",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_into_unaligned_edges_and_aligned_body() {
        assert_eq!(split_aligned(0, 1024, 512), ((0, 0), (0, 1024), (1024, 0)));
        assert_eq!(
            split_aligned(100, 1000, 512),
            ((100, 412), (512, 512), (1024, 76))
        );
        assert_eq!(split_aligned(100, 10, 512), ((100, 10), (110, 0), (110, 0)));
        assert_eq!(split_aligned(510, 4, 512), ((510, 2), (512, 0), (512, 2)));
        assert_eq!(
            split_aligned(4095, 8194, 4096),
            ((4095, 1), (4096, 8192), (12288, 1))
        );
    }

    #[test]
    fn zero_chunk_fallback_zeroes_exactly_the_range() {
        let file = tempfile::tempfile().unwrap();
        let len = 3 * ZERO_CHUNK_BYTES_MAX + 777;
        file.write_all_at(&vec![0xAB; (len + 2000) as usize], 0)
            .unwrap();
        let files = VolumeFiles {
            path: "test".into(),
            primary: file,
            buffered: None,
            direct_align_bytes: 0,
            is_block_device: false,
            zero_align_bytes: 512,
            sparse: SparseProbe::default(),
        };
        files.write_zero_chunks(1000, len).unwrap();
        let back = files.read_sync(0, (len + 2000) as u32).unwrap();
        assert!(back[..1000].iter().all(|b| *b == 0xAB));
        assert!(back[1000..(1000 + len) as usize].iter().all(|b| *b == 0));
        assert!(back[(1000 + len) as usize..].iter().all(|b| *b == 0xAB));
    }
}

#[cfg(test)]
mod routing_tests {
    use super::*;

    #[test]
    fn only_fully_aligned_requests_use_the_direct_descriptor() {
        let direct = tempfile::tempfile().unwrap();
        let buffered = tempfile::tempfile().unwrap();
        let (direct_fd, buffered_fd) = (direct.as_raw_fd(), buffered.as_raw_fd());
        let files = VolumeFiles {
            path: "t".into(),
            primary: direct,
            buffered: Some(buffered),
            direct_align_bytes: 4096,
            is_block_device: false,
            zero_align_bytes: 512,
            sparse: SparseProbe::default(),
        };
        assert_eq!(files.fd_for(8192, 4096, 4096 * 3), direct_fd);
        assert_eq!(files.fd_for(8192 + 512, 4096, 4096), buffered_fd);
        assert_eq!(files.fd_for(8192, 4096 + 512, 4096), buffered_fd);
        assert_eq!(files.fd_for(8192, 4096, 4096 + 8), buffered_fd);
        let aligned = AlignedBuf::zeroed(8192);
        assert!(!files.needs_aligned_copy(0, aligned.as_slice()));
        let backing = vec![0u8; 8192 + 4096];
        let misaligned = &backing[(4096 - backing.as_ptr() as usize % 4096) + 1..][..4096];
        assert!(files.needs_aligned_copy(0, misaligned));
        assert!(
            !files.needs_aligned_copy(1, misaligned),
            "unaligned offsets go buffered without a copy"
        );

        let plain = VolumeFiles {
            path: "t".into(),
            primary: tempfile::tempfile().unwrap(),
            buffered: None,
            direct_align_bytes: 0,
            is_block_device: false,
            zero_align_bytes: 512,
            sparse: SparseProbe::default(),
        };
        assert_eq!(plain.fd_for(1, 1, 1), plain.primary.as_raw_fd());
        assert!(!plain.needs_aligned_copy(0, misaligned));
    }
}
