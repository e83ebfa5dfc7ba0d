//! Where everything lives in the metadata file.
//!
//! Format version 2 (written by this build):
//!
//! ```text
//! offset (bytes)              length                     content
//! 0                           4096                       superblock slot A
//! 4096                        4096                       superblock slot B
//! 8192                        64 × 4096 = 262144         activity-log ring (zero when new)
//! A (superblock, byte 96)     P × 4096                   bitmap area: P pages, in place
//! ```
//!
//! `P = ceil(blocks / 32256)` pages of eight checksummed 512-byte sectors
//! (see [`super::format::BitmapSector`]): 4 KiB per 126 MiB of volume at
//! 4 KiB blocks, 32.5 MiB per TiB. A new file has its area at `A = 270336`,
//! right after the log; a file converted from version 1 has it after the
//! two version-1 copies (which are then punched out), so the conversion never
//! overwrites the copy the version-1 superblock selects. The superblock
//! records `A` and `P`.
//!
//! Format version 1 (read and converted at open):
//!
//! ```text
//! offset (bytes)              length                     content
//! 0                           4096                       superblock slot A
//! 4096                        4096                       superblock slot B
//! 8192                        64 × 4096 = 262144         activity-log ring (zero when new)
//! 270336                      bitmap_copy_len_bytes      bitmap copy 0
//! 270336 + bitmap_copy_len    bitmap_copy_len_bytes      bitmap copy 1
//! ```
//!
//! Why this shape:
//! - Every region starts on a 4 KiB boundary and is a multiple of 4 KiB, so no
//!   write to one region shares a sector (512 B or 4 KiB) with another: a torn
//!   write can damage only the region being written, never its twin.
//! - The superblock slots come first and have fixed offsets, so a reader can
//!   find them before it knows the volume's size (which is inside them).
//! - The activity-log area (ARCHITECTURE §4) has a fixed size and sits before
//!   the bitmaps, whose size depends on the volume size; so the bitmaps can be
//!   found from the superblock alone and a resize never moves the log.
//!   64 slots × 4 KiB hold a ring of full-snapshot log records (see
//!   [`super::al`]): a record never overwrites the newest one.
//! - Each version-1 bitmap copy is a 4 KiB header (see [`super::BitmapHeader`])
//!   followed by the bitmap bytes padded with zeros to 4 KiB, so the data
//!   itself is 4 KiB aligned (O_DIRECT-able, and partial rewrites stay sector
//!   aligned).
//! - Version 2 keeps one bitmap, written in place by 4 KiB pages, instead of
//!   two whole copies: a persist then costs the pages that changed, not
//!   32 MiB per TiB (ARCHITECTURE §4, "retiring one writes only the bitmap
//!   pages that cover it"). Pages are 4 KiB aligned, the unit of page-cache
//!   writeback and of O_DIRECT.

use crate::bitmap::{DirtyBitmap, PAGE_BLOCKS};
use crate::types::BlockCount;

/// Every region's alignment and the superblock slot size.
pub const REGION_ALIGN_BYTES: u64 = 4096;
/// Size of one superblock slot.
pub const SUPERBLOCK_SLOT_LEN_BYTES: u64 = 4096;
/// File offsets of superblock slots A and B.
pub const SUPERBLOCK_SLOT_OFFSETS: [u64; 2] = [0, SUPERBLOCK_SLOT_LEN_BYTES];
/// Start of the activity-log area.
pub const AL_OFFSET_BYTES: u64 = 2 * SUPERBLOCK_SLOT_LEN_BYTES;
/// Number of activity-log slots (records) in the ring.
pub const AL_SLOT_COUNT: u64 = 64;
/// Size of one activity-log slot.
pub const AL_SLOT_LEN_BYTES: u64 = 4096;
/// Size of the whole activity-log area.
pub const AL_LEN_BYTES: u64 = AL_SLOT_COUNT * AL_SLOT_LEN_BYTES;
/// Start of bitmap copy 0.
pub const BITMAP_AREA_OFFSET_BYTES: u64 = AL_OFFSET_BYTES + AL_LEN_BYTES;
/// Size of the header in front of each version-1 bitmap copy's data.
pub const BITMAP_HEADER_LEN_BYTES: u64 = 4096;
/// Size of one version-2 bitmap page.
pub const BITMAP_PAGE_LEN_BYTES: u64 = 4096;

/// Smallest and largest accepted block size (bitmap granularity).
pub const BLOCK_SIZE_MIN_BYTES: u32 = 512;
pub const BLOCK_SIZE_MAX_BYTES: u32 = 1 << 20;

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// The geometry of one metadata file, derived from the volume size and block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size_bytes: u64,
    pub block_size: u32,
    /// Blocks in the volume, a partial last block included.
    pub block_count: BlockCount,
    /// Length of the serialized bitmap (one bit per block, rounded up to a byte).
    pub bitmap_len_bytes: u64,
    /// Version 1: header plus data padded to 4 KiB.
    pub bitmap_copy_len_bytes: u64,
    /// Version 2: pages in the bitmap area.
    pub bitmap_page_count: u64,
}

impl Layout {
    /// Caller has validated the geometry (see `MetaStore::open_or_create`).
    pub fn new(size_bytes: u64, block_size: u32) -> Layout {
        assert!(block_size > 0);
        let block_count = BlockCount(size_bytes.div_ceil(u64::from(block_size)));
        let bitmap_len_bytes = DirtyBitmap::encoded_len_bytes(block_count);
        Layout {
            size_bytes,
            block_size,
            block_count,
            bitmap_len_bytes,
            bitmap_copy_len_bytes: BITMAP_HEADER_LEN_BYTES
                + round_up(bitmap_len_bytes, REGION_ALIGN_BYTES),
            bitmap_page_count: block_count.0.div_ceil(PAGE_BLOCKS),
        }
    }

    /// Version 1: file offset of bitmap copy `copy` (0 or 1): its header; data follows it.
    pub fn bitmap_copy_offset_bytes(&self, copy: u8) -> u64 {
        assert!(copy < 2, "bitmap copy index {copy} out of range");
        BITMAP_AREA_OFFSET_BYTES + u64::from(copy) * self.bitmap_copy_len_bytes
    }

    /// Version 2: length of the bitmap area.
    pub fn bitmap_area_len_bytes(&self) -> u64 {
        self.bitmap_page_count * BITMAP_PAGE_LEN_BYTES
    }

    /// Length of a new (version 2) metadata file: its bitmap area starts at
    /// [`BITMAP_AREA_OFFSET_BYTES`].
    pub fn file_len_bytes(&self) -> u64 {
        BITMAP_AREA_OFFSET_BYTES + self.bitmap_area_len_bytes()
    }

    /// Length of a version-1 file: the end of bitmap copy 1. A file converted
    /// to version 2 has its bitmap area here.
    pub fn v1_file_len_bytes(&self) -> u64 {
        BITMAP_AREA_OFFSET_BYTES + 2 * self.bitmap_copy_len_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_aligned_and_disjoint() {
        let l = Layout::new((1 << 30) + 1, 4096); // 1 GiB + 1 byte: 262145 blocks
        assert_eq!(l.block_count, BlockCount(262_145));
        assert_eq!(l.bitmap_len_bytes, 32_769);
        assert_eq!(l.bitmap_copy_len_bytes, 4096 + 36_864);
        assert_eq!(BITMAP_AREA_OFFSET_BYTES, 270_336);
        assert_eq!(l.bitmap_copy_offset_bytes(0), 270_336);
        assert_eq!(l.bitmap_copy_offset_bytes(1), 270_336 + 40_960);
        assert_eq!(l.v1_file_len_bytes(), 270_336 + 2 * 40_960);
        assert_eq!(l.bitmap_page_count, 9); // 262145 / 32256 = 8.13
        assert_eq!(l.file_len_bytes(), 270_336 + 9 * 4096);
        for off in [
            l.bitmap_copy_offset_bytes(0),
            l.bitmap_copy_offset_bytes(1),
            l.v1_file_len_bytes(),
            l.file_len_bytes(),
        ] {
            assert_eq!(off % REGION_ALIGN_BYTES, 0);
        }
    }
}
