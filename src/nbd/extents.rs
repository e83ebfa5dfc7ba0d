//! Allocation of a volume for `base:allocation` (SEEK_DATA/SEEK_HOLE on image
//! files) and read-ahead for `NBD_CMD_CACHE` (`posix_fadvise(WILLNEED)`).
//!
//! Owns: a read-only descriptor of the volume's file, opened beside the I/O
//! engine's (an `lseek` on it moves only its own offset; the data it reports is
//! the file's, page cache included, so writes that completed are seen as data).
//! Does not own the volume or its I/O. The volume module is growing a
//! sparse-extent API of its own; [`VolumeExtents::allocation`] is the one
//! function to point at it then.
//!
//! What the flags mean (`doc/proto.md`, `base:allocation`): a hole reported by
//! `SEEK_HOLE` is unallocated and reads as zeroes (`NBD_STATE_HOLE |
//! NBD_STATE_ZERO`); data is reported as allocated with unknown contents (0).
//! A block device, a memory volume, or a filesystem without SEEK_DATA report
//! everything as allocated with unknown contents, which the spec says is always
//! correct (a client then copies every byte, as before).

use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use rustix::fs::{Advice, SeekFrom};

use crate::frontend::{Extent, STATE_HOLE, STATE_ZERO};

/// How allocation is learned for one volume.
#[derive(Debug)]
enum Source {
    /// A regular file: SEEK_DATA/SEEK_HOLE.
    File(File),
    /// A block device: read-ahead works, allocation is unknown.
    Device(File),
    /// Nothing to ask (a memory volume, or no path).
    Unknown,
}

/// Allocation and read-ahead for one volume.
#[derive(Debug)]
pub struct VolumeExtents {
    source: Source,
    size_bytes: u64,
}

impl VolumeExtents {
    /// For the volume at `path` (None: a volume without a file, allocation unknown).
    pub fn open(path: Option<&Path>, size_bytes: u64) -> io::Result<VolumeExtents> {
        let source = match path {
            None => Source::Unknown,
            Some(path) => {
                let file = File::open(path)?;
                if file.metadata()?.file_type().is_block_device() {
                    Source::Device(file)
                } else {
                    Source::File(file)
                }
            }
        };
        Ok(VolumeExtents { source, size_bytes })
    }

    /// For an open [`crate::volume::Volume`].
    pub fn for_volume(volume: &crate::volume::Volume) -> io::Result<VolumeExtents> {
        VolumeExtents::open(volume.path(), volume.size_bytes())
    }

    /// Whether holes can be told from data.
    pub fn knows_holes(&self) -> bool {
        matches!(self.source, Source::File(_))
    }

    /// Allocation of `[offset, offset + len)` (cut at the end of the volume), as
    /// consecutive extents from `offset`, at most `extents_max` of them (the last
    /// may then end early). Blocking: call it from a blocking thread.
    pub fn allocation(&self, offset: u64, len: u64, extents_max: usize) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size_bytes);
        if offset >= end {
            return Ok(Vec::new());
        }
        let Source::File(file) = &self.source else {
            return Ok(vec![Extent {
                len_bytes: end - offset,
                flags: 0,
            }]);
        };
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, len_bytes: u64, flags: u32| match out.last_mut() {
            Some(last) if last.flags == flags => last.len_bytes += len_bytes,
            _ => out.push(Extent { len_bytes, flags }),
        };
        let mut pos = offset;
        while pos < end && out.len() < extents_max.max(1) {
            let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                // No data at or after `pos`: the rest is a hole (also past the end of
                // a file shorter than the volume, which reads as zeroes).
                Err(rustix::io::Errno::NXIO) => end,
                // A filesystem without SEEK_DATA: say what is always true.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                    push(&mut out, end - pos, 0);
                    break;
                }
                Err(e) => return Err(io::Error::from(e)),
            };
            if data > pos {
                let hole_end = data.min(end);
                push(&mut out, hole_end - pos, STATE_HOLE | STATE_ZERO);
                pos = hole_end;
                continue;
            }
            let hole = match rustix::fs::seek(file, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(io::Error::from(e)),
            };
            // SEEK_HOLE never returns `pos` itself here (pos is in data), but guard
            // against a filesystem that does: progress is guaranteed either way.
            let data_end = hole.max(pos + 1).min(end);
            push(&mut out, data_end - pos, 0);
            pos = data_end;
        }
        Ok(out)
    }

    /// Ask the kernel to read `[offset, offset + len)` ahead into the page cache.
    /// A hint: errors from filesystems that do not support it are ignored.
    pub fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        let file = match &self.source {
            Source::File(f) | Source::Device(f) => f,
            Source::Unknown => return Ok(()),
        };
        match rustix::fs::fadvise(file, offset, NonZeroU64::new(len), Advice::WillNeed) {
            Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::SPIPE) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    fn total(extents: &[Extent]) -> u64 {
        extents.iter().map(|e| e.len_bytes).sum()
    }

    #[test]
    fn holes_and_data_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(16 * MIB).unwrap();
        f.write_all_at(&[1u8; 4096], 4 * MIB).unwrap();
        f.write_all_at(&[2u8; 8192], 10 * MIB).unwrap();
        (&f).flush().unwrap();
        let x = VolumeExtents::open(Some(&path), 16 * MIB).unwrap();
        assert!(x.knows_holes());
        let all = x.allocation(0, 16 * MIB, 100).unwrap();
        assert_eq!(total(&all), 16 * MIB);
        let hz = STATE_HOLE | STATE_ZERO;
        // Filesystems allocate in their own block size; at least the written
        // ranges are data and the far regions are holes.
        let flags_at = |off: u64| {
            let mut at = 0;
            for e in &all {
                if off < at + e.len_bytes {
                    return e.flags;
                }
                at += e.len_bytes;
            }
            panic!("offset {off} not covered")
        };
        assert_eq!(flags_at(0), hz);
        assert_eq!(flags_at(4 * MIB), 0);
        assert_eq!(flags_at(4 * MIB + 4095), 0);
        assert_eq!(flags_at(7 * MIB), hz);
        assert_eq!(flags_at(10 * MIB + 8191), 0);
        assert_eq!(flags_at(15 * MIB), hz);
        // A window in the middle starts at its offset and ends at its end.
        let w = x.allocation(4 * MIB + 512, MIB, 100).unwrap();
        assert_eq!(total(&w), MIB);
        assert_eq!(w[0].flags, 0);
        // The extent budget ends the answer early, never late.
        let one = x.allocation(0, 16 * MIB, 1).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].flags, hz);
        assert!(one[0].len_bytes <= 4 * MIB);
        // Past the end of the volume: nothing.
        assert!(x.allocation(16 * MIB, 4096, 10).unwrap().is_empty());
    }

    #[test]
    fn unknown_sources_report_everything_allocated() {
        let x = VolumeExtents::open(None, 8 * MIB).unwrap();
        assert!(!x.knows_holes());
        assert_eq!(
            x.allocation(MIB, 2 * MIB, 10).unwrap(),
            vec![Extent {
                len_bytes: 2 * MIB,
                flags: 0
            }]
        );
        x.will_need(0, MIB).unwrap();
    }
}
