//! Byte-level encoding of a superblock slot, a bitmap sector (format
//! version 2) and a bitmap copy header (format version 1, read to convert).
//!
//! All integers are little-endian. Decoding never trusts the bytes: every
//! field is range-checked and the checksum is verified before anything else is
//! interpreted beyond the magic.
//!
//! Format versions:
//! - **1** (until 134a6c6): two whole bitmap copies, written alternately, each
//!   with a header and one checksum ([`BitmapHeader`]); the superblock selects
//!   one. Every persist wrote and fdatasync'd a whole copy: 32 MiB per TiB.
//! - **2**: one bitmap area written in place by 4 KiB pages of checksummed
//!   512-byte sectors ([`BitmapSector`]); the superblock records where the area
//!   is. A persist writes only the pages that changed. A version-1 file is
//!   converted when it is opened (see `MetaStore`).
//!
//! The activity-log record has its own version ([`super::al::AL_RECORD_VERSION`]),
//! unchanged by version 2.

use std::fmt;

use crate::bitmap::PAGE_WORDS;
use crate::types::{BlockIndex, DiskState, Generation, Role, VolumeId};

use super::layout::{BITMAP_AREA_OFFSET_BYTES, REGION_ALIGN_BYTES, SUPERBLOCK_SLOT_LEN_BYTES};

/// The on-disk format version this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The previous format, still read (and converted) at open.
pub const FORMAT_VERSION_V1: u32 = 1;
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"TANDEMSB";
pub const BITMAP_MAGIC: [u8; 8] = *b"TANDEMBM";

const SLOT_LEN: usize = SUPERBLOCK_SLOT_LEN_BYTES as usize;
/// The slot's crc32 covers bytes `0..SLOT_CRC_OFFSET` and sits in the last 4 bytes.
const SLOT_CRC_OFFSET: usize = SLOT_LEN - 4;

const FLAG_IS_NEW: u32 = 1 << 0;
const FLAG_CLEAN_SHUTDOWN: u32 = 1 << 1;
const FLAG_BITMAP_VALID: u32 = 1 << 2;
const FLAG_RESYNC_CURSOR: u32 = 1 << 3;
const FLAG_VOLUME_MIXED: u32 = 1 << 4;
const FLAG_POISONED: u32 = 1 << 5;
const FLAGS_KNOWN: u32 = FLAG_IS_NEW
    | FLAG_CLEAN_SHUTDOWN
    | FLAG_BITMAP_VALID
    | FLAG_RESYNC_CURSOR
    | FLAG_VOLUME_MIXED
    | FLAG_POISONED;

/// The node's durable state (ARCHITECTURE §4), as callers see it. The store
/// adds the slot sequence number and where the bitmap is when it writes a
/// slot; see [`SlotImage`] for the bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Superblock {
    pub volume_id: VolumeId,
    pub size_bytes: u64,
    pub block_size: u32,
    pub role: Role,
    pub disk_state: DiskState,
    /// Created, never synced with a peer nor adopted an identity.
    pub is_new: bool,
    pub gen_current: Generation,
    pub gen_bitmap_base: Generation,
    pub gen_history: [Generation; 2],
    /// When this node last became primary (unix seconds; 0 = never). Split-brain
    /// policy `discard-younger-primary` compares it.
    pub promoted_at_s: u64,
    pub clean_shutdown: bool,
    /// Secondary: a full resync from the peer is owed from this block on (set
    /// by `tandem invalidate`, cleared when that resync completes; see
    /// `engine::recovery::invalidate`).
    pub resync_cursor: Option<BlockIndex>,
    /// The persisted bitmap covers every block that may differ, except
    /// blocks of extents in the activity log (when this is false the caller
    /// must widen it, e.g. compare everything). Set by `persist_bitmap`.
    pub bitmap_valid: bool,
    /// Secondary: the volume file alone is not a consistent image (a checkpoint
    /// copied part of a resync section into it); the consistent image is the
    /// volume plus the redo journal's records through the consistent point.
    pub volume_mixed: bool,
    /// A write or fdatasync of this node's volume or journal failed (G3: never
    /// retried and assumed): it is not served as primary again without --force,
    /// and its whole volume is compared with the peer's at the next resync.
    pub poisoned: bool,
    /// Secondary: the newest write of its last recorded consistent image (seq,
    /// primary's accept time in unix ms; 0 = unknown). Never newer than what the
    /// volume and journal hold: reported as the consistent point when the
    /// journal holds nothing newer.
    pub consistent_seq: u64,
    pub consistent_at_ms: u64,
    /// Secondary, with `volume_mixed`: the newest journal record (lsn) a
    /// checkpoint that left the volume mixed may have copied pieces of. A cut
    /// copy leaves pieces of any record up to it in the volume, so no image
    /// before it is consistent after a restart (engine::secondary). 0 = none.
    pub mixed_through: u64,
}

/// One superblock slot as stored: 4096 bytes.
///
/// ```text
/// offset  len   field
/// 0       8     magic "TANDEMSB"
/// 8       4     format version: 2 (1 is read, to convert it)
/// 12      4     flags: bit0 is_new, bit1 clean_shutdown, bit2 bitmap_valid,
///               bit3 resync_cursor present, bit4 volume_mixed (secondary: the
///               volume alone is not consistent, its journal completes it);
///               other bits must be 0
/// 16      8     slot sequence number (the valid slot with the highest wins)
/// 24      16    volume id (UUID bytes)
/// 40      8     volume size in bytes
/// 48      4     block size in bytes
/// 52      1     role: 1 primary, 2 secondary
/// 53      1     disk state: 1 UpToDate, 2 Inconsistent, 3 Outdated
/// 54      1     v1: current bitmap copy, 0 or 1; v2: reserved, 0
/// 55      1     reserved, 0
/// 56      8     generation: current
/// 64      8     generation: bitmap base
/// 72      16    generation: history[0], history[1]
/// 88      8     resync cursor (block index; meaningful only if flag bit3)
/// 96      8     v1: bitmap sequence number the current copy's header must carry
///               v2: file offset of the bitmap area (multiple of 4096, ≥ 270336)
/// 104     8     promoted at (unix seconds; 0 = never primary)
/// 112     8     v1: reserved, 0; v2: bitmap page count (must match the volume)
/// 120     8     secondary: seq of the newest write in its last recorded consistent
///               image (0 = unknown)
/// 128     8     secondary: when the primary accepted that write (unix ms; 0 = unknown)
/// 136     8     secondary, with bit4: the newest journal record (lsn) a checkpoint
///               that left the volume mixed may have copied (0 = none)
/// 144     3948  reserved, 0
/// 4092    4     crc32 (crc32fast) of bytes 0..4092
/// ```
///
/// Magic and version come first so any reader can tell what the bytes are
/// before interpreting them; the sequence number is next because slot
/// selection needs nothing else; the enums start at 1 so an all-zero slot
/// fails field checks as well as the checksum; the crc is last so it covers
/// every byte before it, and a write torn at any sector boundary leaves a
/// mismatch. Version 2 reuses version 1's bitmap fields (the layout is
/// otherwise identical, so the conversion changes only those): the area's
/// offset is stored rather than implied so a converted file can keep its
/// version-1 copies intact while the new area is written beside them, and
/// the page count lets a reader check the area against the volume before
/// reading it. In version 1 the bitmap sequence number ties the slot to one
/// specific persist, so a copy with a valid checksum but from an older
/// persist is never mistaken for the current one.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotImage {
    pub superblock: Superblock,
    pub slot_seq: u64,
    pub bitmap: BitmapLocation,
}

/// Where a slot says the persisted bitmap is; the variant is the format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapLocation {
    /// Version 1: copy 0 or 1, whose header must carry `seq`.
    V1 { copy: u8, seq: u64 },
    /// Version 2: `page_count` pages of 4 KiB from `area_offset_bytes`.
    V2 {
        area_offset_bytes: u64,
        page_count: u64,
    },
}

impl SlotImage {
    pub fn version(&self) -> u32 {
        match self.bitmap {
            BitmapLocation::V1 { .. } => FORMAT_VERSION_V1,
            BitmapLocation::V2 { .. } => FORMAT_VERSION,
        }
    }
}

/// Why a slot could not be used. Shown to operators in `Opened::recovered_from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotFault {
    /// Every byte is zero: never written, or wiped.
    Zeroed,
    /// The file ends before the slot does.
    Short {
        len_bytes: usize,
    },
    BadMagic,
    BadCrc {
        stored: u32,
        computed: u32,
    },
    /// Checksum is valid but a field holds a value this version never writes.
    BadField {
        field: &'static str,
        value: u64,
    },
    /// Checksum is valid and the slot was written by another format version.
    UnsupportedVersion {
        found: u32,
    },
}

impl fmt::Display for SlotFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotFault::Zeroed => f.write_str("all zeroes"),
            SlotFault::Short { len_bytes } => write!(f, "truncated to {len_bytes} bytes"),
            SlotFault::BadMagic => f.write_str("bad magic (garbage or not a tandem superblock)"),
            SlotFault::BadCrc { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch (stored {stored:08x}, computed {computed:08x}): torn or corrupt"
                )
            }
            SlotFault::BadField { field, value } => write!(f, "invalid {field} value {value}"),
            SlotFault::UnsupportedVersion { found } => {
                write!(
                    f,
                    "format version {found}, this build reads versions \
                     {FORMAT_VERSION_V1} and {FORMAT_VERSION}"
                )
            }
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Primary => 1,
        Role::Secondary => 2,
    }
}

fn disk_state_code(d: DiskState) -> u8 {
    match d {
        DiskState::UpToDate => 1,
        DiskState::Inconsistent => 2,
        DiskState::Outdated => 3,
    }
}

impl SlotImage {
    pub fn encode(&self) -> Vec<u8> {
        let sb = &self.superblock;
        let mut b = vec![0u8; SLOT_LEN];
        let mut flags = 0;
        if sb.is_new {
            flags |= FLAG_IS_NEW;
        }
        if sb.clean_shutdown {
            flags |= FLAG_CLEAN_SHUTDOWN;
        }
        if sb.bitmap_valid {
            flags |= FLAG_BITMAP_VALID;
        }
        if sb.volume_mixed {
            flags |= FLAG_VOLUME_MIXED;
        }
        if sb.poisoned {
            flags |= FLAG_POISONED;
        }
        if sb.resync_cursor.is_some() {
            flags |= FLAG_RESYNC_CURSOR;
        }
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        b[8..12].copy_from_slice(&self.version().to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.slot_seq.to_le_bytes());
        b[24..40].copy_from_slice(&sb.volume_id.0);
        b[40..48].copy_from_slice(&sb.size_bytes.to_le_bytes());
        b[48..52].copy_from_slice(&sb.block_size.to_le_bytes());
        b[52] = role_code(sb.role);
        b[53] = disk_state_code(sb.disk_state);
        match self.bitmap {
            BitmapLocation::V1 { copy, seq } => {
                assert!(copy < 2, "bitmap copy {copy}");
                b[54] = copy;
                b[96..104].copy_from_slice(&seq.to_le_bytes());
            }
            BitmapLocation::V2 {
                area_offset_bytes,
                page_count,
            } => {
                b[96..104].copy_from_slice(&area_offset_bytes.to_le_bytes());
                b[112..120].copy_from_slice(&page_count.to_le_bytes());
            }
        }
        b[56..64].copy_from_slice(&sb.gen_current.0.to_le_bytes());
        b[64..72].copy_from_slice(&sb.gen_bitmap_base.0.to_le_bytes());
        b[72..80].copy_from_slice(&sb.gen_history[0].0.to_le_bytes());
        b[80..88].copy_from_slice(&sb.gen_history[1].0.to_le_bytes());
        b[88..96].copy_from_slice(&sb.resync_cursor.map_or(0, |c| c.0).to_le_bytes());
        b[104..112].copy_from_slice(&sb.promoted_at_s.to_le_bytes());
        b[120..128].copy_from_slice(&sb.consistent_seq.to_le_bytes());
        b[128..136].copy_from_slice(&sb.consistent_at_ms.to_le_bytes());
        b[136..144].copy_from_slice(&sb.mixed_through.to_le_bytes());
        let crc = crc32fast::hash(&b[..SLOT_CRC_OFFSET]);
        b[SLOT_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SlotImage, SlotFault> {
        if b.len() < SLOT_LEN {
            return Err(SlotFault::Short { len_bytes: b.len() });
        }
        let b = &b[..SLOT_LEN];
        if b.iter().all(|&x| x == 0) {
            return Err(SlotFault::Zeroed);
        }
        if b[0..8] != SUPERBLOCK_MAGIC {
            return Err(SlotFault::BadMagic);
        }
        let stored = u32_at(b, SLOT_CRC_OFFSET);
        let computed = crc32fast::hash(&b[..SLOT_CRC_OFFSET]);
        if stored != computed {
            return Err(SlotFault::BadCrc { stored, computed });
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION && version != FORMAT_VERSION_V1 {
            return Err(SlotFault::UnsupportedVersion { found: version });
        }
        let flags = u32_at(b, 12);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(SlotFault::BadField {
                field: "flags",
                value: u64::from(flags),
            });
        }
        let role = match b[52] {
            1 => Role::Primary,
            2 => Role::Secondary,
            v => {
                return Err(SlotFault::BadField {
                    field: "role",
                    value: u64::from(v),
                });
            }
        };
        let disk_state = match b[53] {
            1 => DiskState::UpToDate,
            2 => DiskState::Inconsistent,
            3 => DiskState::Outdated,
            v => {
                return Err(SlotFault::BadField {
                    field: "disk state",
                    value: u64::from(v),
                });
            }
        };
        let bitmap = if version == FORMAT_VERSION_V1 {
            let copy = b[54];
            if copy > 1 {
                return Err(SlotFault::BadField {
                    field: "bitmap copy",
                    value: u64::from(copy),
                });
            }
            BitmapLocation::V1 {
                copy,
                seq: u64_at(b, 96),
            }
        } else {
            if b[54] != 0 {
                return Err(SlotFault::BadField {
                    field: "reserved byte 54",
                    value: u64::from(b[54]),
                });
            }
            let area_offset_bytes = u64_at(b, 96);
            if area_offset_bytes < BITMAP_AREA_OFFSET_BYTES
                || !area_offset_bytes.is_multiple_of(REGION_ALIGN_BYTES)
            {
                return Err(SlotFault::BadField {
                    field: "bitmap area offset",
                    value: area_offset_bytes,
                });
            }
            let page_count = u64_at(b, 112);
            if page_count == 0 {
                return Err(SlotFault::BadField {
                    field: "bitmap page count",
                    value: 0,
                });
            }
            BitmapLocation::V2 {
                area_offset_bytes,
                page_count,
            }
        };
        let cursor = u64_at(b, 88);
        let resync_cursor = if flags & FLAG_RESYNC_CURSOR != 0 {
            Some(BlockIndex(cursor))
        } else if cursor != 0 {
            return Err(SlotFault::BadField {
                field: "resync cursor without flag",
                value: cursor,
            });
        } else {
            None
        };
        let superblock = Superblock {
            volume_id: VolumeId(b[24..40].try_into().expect("16-byte slice")),
            size_bytes: u64_at(b, 40),
            block_size: u32_at(b, 48),
            role,
            disk_state,
            is_new: flags & FLAG_IS_NEW != 0,
            gen_current: Generation(u64_at(b, 56)),
            gen_bitmap_base: Generation(u64_at(b, 64)),
            gen_history: [Generation(u64_at(b, 72)), Generation(u64_at(b, 80))],
            promoted_at_s: u64_at(b, 104),
            clean_shutdown: flags & FLAG_CLEAN_SHUTDOWN != 0,
            resync_cursor,
            bitmap_valid: flags & FLAG_BITMAP_VALID != 0,
            volume_mixed: flags & FLAG_VOLUME_MIXED != 0,
            poisoned: flags & FLAG_POISONED != 0,
            consistent_seq: u64_at(b, 120),
            consistent_at_ms: u64_at(b, 128),
            mixed_through: u64_at(b, 136),
        };
        Ok(SlotImage {
            superblock,
            slot_seq: u64_at(b, 16),
            bitmap,
        })
    }
}

/// The header in front of each bitmap copy: one 4096-byte block.
///
/// ```text
/// offset  len   field
/// 0       8     magic "TANDEMBM"
/// 8       4     format version (1: only version 1 has copies)
/// 12      4     copy index (0 or 1): catches a copy read from the wrong offset
/// 16      8     bitmap sequence number (must equal the superblock's)
/// 24      8     block count
/// 32      8     data length in bytes (= ceil(block count / 8))
/// 40      4     crc32 of the data bytes (data starts at header + 4096)
/// 44      4     crc32 of header bytes 0..44
/// 48      4048  reserved, 0
/// ```
///
/// The header has its own checksum, separate from the data's, so a bad
/// header is recognised before its length field is used to read anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapHeader {
    pub copy: u8,
    pub bitmap_seq: u64,
    pub block_count: u64,
    pub len_bytes: u64,
    pub data_crc: u32,
}

/// Bytes of the header actually used (the rest of the 4 KiB block is zero).
pub const BITMAP_HEADER_USED_BYTES: usize = 48;

impl BitmapHeader {
    /// Encodes into the first [`BITMAP_HEADER_USED_BYTES`] of `out`.
    pub fn encode_into(&self, out: &mut [u8]) {
        let b = &mut out[..BITMAP_HEADER_USED_BYTES];
        b[0..8].copy_from_slice(&BITMAP_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION_V1.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(self.copy).to_le_bytes());
        b[16..24].copy_from_slice(&self.bitmap_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.block_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.len_bytes.to_le_bytes());
        b[40..44].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks magic, version and header checksum.
    pub fn decode(b: &[u8]) -> Result<BitmapHeader, String> {
        if b.len() < BITMAP_HEADER_USED_BYTES {
            return Err(format!("header truncated to {} bytes", b.len()));
        }
        if b[0..8] != BITMAP_MAGIC {
            return Err("bad header magic".into());
        }
        let (stored, computed) = (u32_at(b, 44), crc32fast::hash(&b[..44]));
        if stored != computed {
            return Err(format!(
                "header checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ));
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION_V1 {
            return Err(format!(
                "header format version {version}, expected {FORMAT_VERSION_V1}"
            ));
        }
        let copy = u32_at(b, 12);
        if copy > 1 {
            return Err(format!("header copy index {copy}"));
        }
        Ok(BitmapHeader {
            copy: copy as u8,
            bitmap_seq: u64_at(b, 16),
            block_count: u64_at(b, 24),
            len_bytes: u64_at(b, 32),
            data_crc: u32_at(b, 40),
        })
    }
}

/// Bytes of one version-2 bitmap page: eight [`BitmapSector`]s.
pub const BITMAP_PAGE_BYTES: usize = 4096;
/// Bytes of one bitmap sector, the unit a torn write keeps or loses whole.
pub const BITMAP_SECTOR_BYTES: usize = 512;
/// Sectors in a page.
pub const BITMAP_SECTORS_PER_PAGE: usize = BITMAP_PAGE_BYTES / BITMAP_SECTOR_BYTES;
/// Bitmap bytes in a sector: 63 words.
pub const BITMAP_SECTOR_DATA_BYTES: usize = 504;
/// Bitmap words (64 blocks each) in a sector.
pub const BITMAP_SECTOR_WORDS: usize = BITMAP_SECTOR_DATA_BYTES / 8;
/// Blocks covered by one sector: 4032.
pub const BITMAP_SECTOR_BLOCKS: u64 = BITMAP_SECTOR_WORDS as u64 * 64;
const SECTOR_INDEX_OFFSET: usize = BITMAP_SECTOR_DATA_BYTES;
const SECTOR_CRC_OFFSET: usize = BITMAP_SECTOR_BYTES - 4;

const _: () = assert!(BITMAP_SECTOR_WORDS * BITMAP_SECTORS_PER_PAGE == PAGE_WORDS as usize);

/// One 512-byte sector of the version-2 bitmap area. The area is an array of
/// pages of 4096 bytes, 8 sectors each; page `p` holds the bits of
/// [`crate::bitmap::BitmapPage`] `p` (32,256 blocks), sector `s` of it blocks
/// `(8p + s) × 4032 .. (8p + s + 1) × 4032`.
///
/// ```text
/// offset  len   field
/// 0       504   63 bitmap words, u64 little-endian: bit b of word w is block
///               (sector index × 4032 + 64 w + b); bits past the volume's
///               last block are 0
/// 504     4     sector index within the area (8 × page + sector), u32
/// 508     4     crc32 (crc32fast) of bytes 0..508
/// ```
///
/// Why sectors and not one checksum per page: a power loss can leave a page
/// write torn at any sector boundary (ARCHITECTURE §4a), and each sector then
/// holds either its old or its new contents. That is harmless by
/// construction (the crash rule on `MetaStore::persist_bitmap_pages`: set bits
/// are relied upon only once their page is durable, and a clear torn midway
/// leaves bits set), so a torn page must not look damaged: a per-page
/// checksum would fail and throw away 126 MiB of bitmap after every crash
/// during a persist. A checksum per sector stays valid through any tear and
/// still catches real damage: bit rot, a lost or zeroed write (an all-zero
/// sector fails, since the crc of zeroes is not zero), or a sector written at
/// the wrong place (the index). A damaged sector's 4032 blocks are treated as
/// dirty (G3: what cannot be proven in sync is resynced). The index comes
/// after the data so the data is word-aligned in the sector; the crc is last
/// so it covers everything before it. 504 bytes of data per 512 is 1.6 %
/// overhead; a page covers 32,256 blocks instead of 32,768.
#[derive(Debug)]
pub struct BitmapSector;

/// Why a bitmap sector was not used. Its blocks are then treated as dirty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SectorFault {
    /// Every byte zero: never written, or wiped.
    Zeroed,
    /// The file ends before the sector does.
    Short,
    BadCrc {
        stored: u32,
        computed: u32,
    },
    /// A valid sector of another place in the area.
    WrongIndex {
        found: u32,
    },
    /// A valid sector with bits set for blocks past the end of the volume.
    BitsBeyondEnd,
}

impl fmt::Display for SectorFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectorFault::Zeroed => f.write_str("all zeroes"),
            SectorFault::Short => f.write_str("past the end of the file"),
            SectorFault::BadCrc { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
            SectorFault::WrongIndex { found } => {
                write!(f, "holds sector {found} (misplaced write)")
            }
            SectorFault::BitsBeyondEnd => f.write_str("bits set past the last block"),
        }
    }
}

impl BitmapSector {
    /// Encode the words of page `page` (at most [`PAGE_WORDS`]; missing
    /// words are zero) into `out`, [`BITMAP_PAGE_BYTES`] long.
    pub fn encode_page(page: u64, words: &[u64], out: &mut [u8]) {
        assert_eq!(out.len(), BITMAP_PAGE_BYTES);
        assert!(words.len() <= PAGE_WORDS as usize);
        out.fill(0);
        for (s, sector) in out.chunks_exact_mut(BITMAP_SECTOR_BYTES).enumerate() {
            let first = s * BITMAP_SECTOR_WORDS;
            for (w, word) in words
                .iter()
                .skip(first)
                .take(BITMAP_SECTOR_WORDS)
                .enumerate()
            {
                sector[8 * w..8 * w + 8].copy_from_slice(&word.to_le_bytes());
            }
            let index = u32::try_from(page * BITMAP_SECTORS_PER_PAGE as u64 + s as u64)
                .expect("bitmap sector index fits in 32 bits");
            sector[SECTOR_INDEX_OFFSET..SECTOR_CRC_OFFSET].copy_from_slice(&index.to_le_bytes());
            let crc = crc32fast::hash(&sector[..SECTOR_CRC_OFFSET]);
            sector[SECTOR_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        }
    }

    /// Decode page `page` from `bytes` (shorter than a page if the file ends
    /// early) into `words` (the page's words: [`PAGE_WORDS`], fewer for the
    /// last page), of which the last holds `tail_bits` valid bits (64 if all).
    /// A damaged sector's words are left untouched and its fault returned
    /// with its index in the page.
    pub fn decode_page(
        page: u64,
        bytes: &[u8],
        words: &mut [u64],
        tail_bits: u32,
    ) -> Vec<(usize, SectorFault)> {
        assert!(words.len() <= PAGE_WORDS as usize && (1..=64).contains(&tail_bits));
        let mut faults = Vec::new();
        let sectors = words.len().div_ceil(BITMAP_SECTOR_WORDS);
        for s in 0..sectors {
            let start = s * BITMAP_SECTOR_BYTES;
            let Some(sector) = bytes.get(start..start + BITMAP_SECTOR_BYTES) else {
                faults.push((s, SectorFault::Short));
                continue;
            };
            if let Err(fault) = Self::check(page, s, sector, words, tail_bits) {
                faults.push((s, fault));
                continue;
            }
            let first = s * BITMAP_SECTOR_WORDS;
            let last = (first + BITMAP_SECTOR_WORDS).min(words.len());
            for (w, word) in words[first..last].iter_mut().enumerate() {
                *word = u64_at(sector, 8 * w);
            }
        }
        faults
    }

    fn check(
        page: u64,
        s: usize,
        sector: &[u8],
        words: &[u64],
        tail_bits: u32,
    ) -> Result<(), SectorFault> {
        if sector.iter().all(|&b| b == 0) {
            return Err(SectorFault::Zeroed);
        }
        let stored = u32_at(sector, SECTOR_CRC_OFFSET);
        let computed = crc32fast::hash(&sector[..SECTOR_CRC_OFFSET]);
        if stored != computed {
            return Err(SectorFault::BadCrc { stored, computed });
        }
        let found = u32_at(sector, SECTOR_INDEX_OFFSET);
        if u64::from(found) != page * BITMAP_SECTORS_PER_PAGE as u64 + s as u64 {
            return Err(SectorFault::WrongIndex { found });
        }
        // Words of this sector past the page's last word, and bits past the last block.
        let first = s * BITMAP_SECTOR_WORDS;
        for w in 0..BITMAP_SECTOR_WORDS {
            let word = u64_at(sector, 8 * w);
            let index = first + w;
            let allowed = if index + 1 < words.len() {
                u64::MAX
            } else if index + 1 == words.len() {
                u64::MAX >> (64 - tail_bits)
            } else {
                0
            };
            if word & !allowed != 0 {
                return Err(SectorFault::BitsBeyondEnd);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SlotImage {
        SlotImage {
            superblock: Superblock {
                volume_id: VolumeId([7; 16]),
                size_bytes: 1 << 30,
                block_size: 4096,
                role: Role::Secondary,
                disk_state: DiskState::Outdated,
                is_new: true,
                gen_current: Generation(0xAABB),
                gen_bitmap_base: Generation(0xCCDD),
                gen_history: [Generation(1), Generation(2)],
                promoted_at_s: 1_700_000_000,
                clean_shutdown: true,
                resync_cursor: Some(BlockIndex(12345)),
                bitmap_valid: true,
                volume_mixed: false,
                poisoned: false,
                consistent_seq: 0,
                consistent_at_ms: 0,
                mixed_through: 0,
            },
            slot_seq: 42,
            bitmap: BitmapLocation::V2 {
                area_offset_bytes: 270_336,
                page_count: 9,
            },
        }
    }

    #[test]
    fn slot_round_trips_every_field() {
        let img = sample();
        let bytes = img.encode();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(SlotImage::decode(&bytes), Ok(img.clone()));
        let mut other = img;
        other.superblock.role = Role::Primary;
        other.superblock.disk_state = DiskState::Inconsistent;
        other.superblock.is_new = false;
        other.superblock.clean_shutdown = false;
        other.superblock.bitmap_valid = false;
        other.superblock.resync_cursor = None;
        other.bitmap = BitmapLocation::V1 { copy: 1, seq: 9 };
        let b = other.encode();
        assert_eq!(u32_at(&b, 8), 1);
        assert_eq!(b[54], 1);
        assert_eq!(u64_at(&b, 96), 9);
        assert_eq!(SlotImage::decode(&b), Ok(other));
    }

    #[test]
    fn v2_slot_layout_matches_the_doc() {
        let b = sample().encode();
        assert_eq!(&b[0..8], b"TANDEMSB");
        assert_eq!(u32_at(&b, 8), 2);
        assert_eq!(u64_at(&b, 16), 42);
        assert_eq!(b[54], 0);
        assert_eq!(u64_at(&b, 96), 270_336);
        assert_eq!(u64_at(&b, 104), 1_700_000_000);
        assert_eq!(u64_at(&b, 112), 9);
        assert!(b[144..4092].iter().all(|&x| x == 0));
        assert_eq!(u32_at(&b, 4092), crc32fast::hash(&b[..4092]));
    }

    #[test]
    fn slot_faults_are_told_apart() {
        assert_eq!(SlotImage::decode(&[0u8; 4096]), Err(SlotFault::Zeroed));
        assert_eq!(
            SlotImage::decode(&[0u8; 100]),
            Err(SlotFault::Short { len_bytes: 100 })
        );
        let mut bytes = sample().encode();
        bytes[2000] ^= 1;
        assert!(matches!(
            SlotImage::decode(&bytes),
            Err(SlotFault::BadCrc { .. })
        ));
        let mut bytes = sample().encode();
        bytes[0] = b'X';
        assert_eq!(SlotImage::decode(&bytes), Err(SlotFault::BadMagic));
    }

    #[test]
    fn checksummed_invalid_fields_are_rejected() {
        let reseal = |mut b: Vec<u8>| {
            let crc = crc32fast::hash(&b[..SLOT_CRC_OFFSET]);
            b[SLOT_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut b = sample().encode();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            SlotImage::decode(&reseal(b)),
            Err(SlotFault::UnsupportedVersion { found: 3 })
        );
        let mut b = sample().encode();
        b[52] = 0;
        assert_eq!(
            SlotImage::decode(&reseal(b)),
            Err(SlotFault::BadField {
                field: "role",
                value: 0
            })
        );
        let mut v1 = sample();
        v1.bitmap = BitmapLocation::V1 { copy: 0, seq: 1 };
        let mut b = v1.encode();
        b[54] = 2;
        assert!(matches!(
            SlotImage::decode(&reseal(b)),
            Err(SlotFault::BadField {
                field: "bitmap copy",
                ..
            })
        ));
        for (at, value, field) in [
            (54, 1u64, "reserved byte 54"),
            (96, 4096, "bitmap area offset"),
            (96, 270_336 + 512, "bitmap area offset"),
            (112, 0, "bitmap page count"),
        ] {
            let mut b = sample().encode();
            if at == 54 {
                b[54] = value as u8;
            } else {
                b[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            match SlotImage::decode(&reseal(b)) {
                Err(SlotFault::BadField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut b = sample().encode();
        b[12] |= 0x80;
        assert!(matches!(
            SlotImage::decode(&reseal(b)),
            Err(SlotFault::BadField { field: "flags", .. })
        ));
    }

    #[test]
    fn bitmap_sectors_round_trip_and_layout_matches_the_doc() {
        let words: Vec<u64> = (0..PAGE_WORDS).map(|i| i * 0x0101_0101 + 1).collect();
        let mut page = vec![0u8; BITMAP_PAGE_BYTES];
        BitmapSector::encode_page(3, &words, &mut page);
        // Sector 1 of page 3: index 25, words 63..126.
        let sector = &page[512..1024];
        assert_eq!(u64_at(sector, 0), words[63]);
        assert_eq!(u64_at(sector, 496), words[125]);
        assert_eq!(u32_at(sector, 504), 25);
        assert_eq!(u32_at(sector, 508), crc32fast::hash(&sector[..508]));
        let mut back = vec![0u64; PAGE_WORDS as usize];
        assert_eq!(BitmapSector::decode_page(3, &page, &mut back, 64), vec![]);
        assert_eq!(back, words);
        assert_eq!(BITMAP_SECTOR_BLOCKS, 4032);
    }

    #[test]
    fn damaged_bitmap_sectors_are_reported_one_by_one() {
        let words = vec![u64::MAX; PAGE_WORDS as usize];
        let mut page = vec![0u8; BITMAP_PAGE_BYTES];
        BitmapSector::encode_page(0, &words, &mut page);
        let mut other = vec![0u8; BITMAP_PAGE_BYTES];
        BitmapSector::encode_page(1, &words, &mut other);
        page[2 * 512 + 7] ^= 1; // bit rot in sector 2
        page[4 * 512..5 * 512].fill(0); // sector 4 lost
        page[5 * 512..6 * 512].copy_from_slice(&other[5 * 512..6 * 512]); // misplaced
        let mut back = vec![0u64; PAGE_WORDS as usize];
        let faults = BitmapSector::decode_page(0, &page[..7 * 512 + 100], &mut back, 64);
        let kinds: Vec<(usize, String)> = faults.iter().map(|(s, f)| (*s, f.to_string())).collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        assert!(kinds[0].0 == 2 && kinds[0].1.contains("checksum mismatch"));
        assert_eq!(kinds[1], (4, "all zeroes".to_string()));
        assert_eq!(
            kinds[2],
            (5, "holds sector 13 (misplaced write)".to_string())
        );
        assert_eq!(kinds[3], (7, "past the end of the file".to_string()));
        // Good sectors decoded, damaged ones left alone (0 here).
        assert_eq!(back[0], u64::MAX);
        assert_eq!(back[2 * 63], 0);
        assert_eq!(back[3 * 63], u64::MAX);
    }

    #[test]
    fn bits_past_the_last_block_are_damage() {
        // A last page of 70 words whose last word holds 10 valid bits.
        let mut words = vec![0u64; 70];
        words[69] = 1 << 9;
        let mut page = vec![0u8; BITMAP_PAGE_BYTES];
        BitmapSector::encode_page(2, &words, &mut page);
        let mut back = vec![0u64; 70];
        assert_eq!(BitmapSector::decode_page(2, &page, &mut back, 10), vec![]);
        assert_eq!(back, words);
        words[69] = 1 << 10;
        BitmapSector::encode_page(2, &words, &mut page);
        assert_eq!(
            BitmapSector::decode_page(2, &page, &mut back, 10),
            vec![(1, SectorFault::BitsBeyondEnd)]
        );
        // A word past the page's last one, in an encoded (valid) sector.
        let mut long = vec![0u64; 80];
        long[75] = 1;
        BitmapSector::encode_page(2, &long, &mut page);
        let mut back = vec![0u64; 70];
        assert_eq!(
            BitmapSector::decode_page(2, &page, &mut back, 64),
            vec![(1, SectorFault::BitsBeyondEnd)]
        );
    }

    #[test]
    fn bitmap_header_round_trips_and_detects_damage() {
        let h = BitmapHeader {
            copy: 1,
            bitmap_seq: 5,
            block_count: 1000,
            len_bytes: 125,
            data_crc: 0xDEAD_BEEF,
        };
        let mut buf = vec![0u8; 4096];
        h.encode_into(&mut buf);
        assert_eq!(BitmapHeader::decode(&buf), Ok(h));
        buf[20] ^= 4;
        assert!(BitmapHeader::decode(&buf).unwrap_err().contains("checksum"));
    }
}
