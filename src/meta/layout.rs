//! Where everything lives in the metadata file.
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
//! - Each bitmap copy is a 4 KiB header (see [`super::BitmapHeader`]) followed
//!   by the bitmap bytes padded with zeros to 4 KiB, so the data itself is
//!   4 KiB aligned (O_DIRECT-able, and partial rewrites stay sector aligned).

use crate::bitmap::DirtyBitmap;
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
/// Size of the header in front of each bitmap copy's data.
pub const BITMAP_HEADER_LEN_BYTES: u64 = 4096;

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
    /// Header plus data padded to 4 KiB.
    pub bitmap_copy_len_bytes: u64,
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
        }
    }

    /// File offset of bitmap copy `copy` (0 or 1): its header; data follows it.
    pub fn bitmap_copy_offset_bytes(&self, copy: u8) -> u64 {
        assert!(copy < 2, "bitmap copy index {copy} out of range");
        BITMAP_AREA_OFFSET_BYTES + u64::from(copy) * self.bitmap_copy_len_bytes
    }

    /// Total length of the metadata file.
    pub fn file_len_bytes(&self) -> u64 {
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
        assert_eq!(l.file_len_bytes(), 270_336 + 2 * 40_960);
        for off in [
            l.bitmap_copy_offset_bytes(0),
            l.bitmap_copy_offset_bytes(1),
            l.file_len_bytes(),
        ] {
            assert_eq!(off % REGION_ALIGN_BYTES, 0);
        }
    }
}
