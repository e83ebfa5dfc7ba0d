//! The open file descriptors of one on-disk volume and the synchronous (blocking)
//! operations on them, shared by both engines: the threads engine runs everything
//! here; the io_uring engine uses it for `write_zeroes` and `trim` (run on tokio's
//! blocking pool) and for routing each request to the right descriptor.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;

use super::buf::AlignedBuf;
use super::sys;

/// Largest chunk written when zeroes must be written as data (file systems without
/// `FALLOC_FL_ZERO_RANGE`, unaligned edges on block devices): 1 MiB bounds the memory
/// a single `write_zeroes` of any length can take.
pub const ZERO_CHUNK_BYTES_MAX: u64 = 1 << 20;

/// Sector size the block-device zero/discard ioctls require offsets and lengths to be multiples of.
const SECTOR_BYTES: u64 = 512;

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
            let (head, body, tail) = split_sectors(offset, len_bytes);
            for (at, len) in [head, tail] {
                self.write_zero_chunks(at, len)?;
            }
            if body.1 > 0 {
                match sys::block_zero_out(&self.primary, body.0, body.1) {
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

    /// Tell the storage `[offset, offset + len_bytes)` is unused. Files: the range is
    /// deallocated and reads back as zeros (zeros are written where the file system
    /// cannot punch holes, so files always read zeros after a trim). Block devices:
    /// the range is zeroed (BLKZEROOUT), because after BLKDISCARD the content is
    /// unspecified and replicas must stay identical.
    pub fn trim_sync(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        if self.is_block_device {
            // After BLKDISCARD a device's contents are unspecified, so two replicas
            // could differ in trimmed ranges; zeroing keeps every image defined
            // (kernel-notes/trim.md). Files punch holes, which read as zeros.
            self.write_zeroes_sync(offset, len_bytes, false)
        } else {
            match sys::punch_hole(&self.primary, offset, len_bytes) {
                Err(e) if is_unsupported(&e) => self.write_zeroes_sync(offset, len_bytes, false),
                other => other,
            }
        }
    }
}

/// Split a range into an unaligned head, a 512-aligned body and an unaligned tail,
/// each as `(offset, len)`.
fn split_sectors(offset: u64, len_bytes: u64) -> ((u64, u64), (u64, u64), (u64, u64)) {
    let end = offset + len_bytes;
    let body_start = offset.next_multiple_of(SECTOR_BYTES).min(end);
    let body_end = (end / SECTOR_BYTES * SECTOR_BYTES).max(body_start);
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
        assert_eq!(split_sectors(0, 1024), ((0, 0), (0, 1024), (1024, 0)));
        assert_eq!(
            split_sectors(100, 1000),
            ((100, 412), (512, 512), (1024, 76))
        );
        assert_eq!(split_sectors(100, 10), ((100, 10), (110, 0), (110, 0)));
        assert_eq!(split_sectors(510, 4), ((510, 2), (512, 0), (512, 2)));
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
        };
        assert_eq!(plain.fd_for(1, 1, 1), plain.primary.as_raw_fd());
        assert!(!plain.needs_aligned_copy(0, misaligned));
    }
}
