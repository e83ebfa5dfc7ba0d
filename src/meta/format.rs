//! Byte-level encoding of a superblock slot and a bitmap copy header.
//!
//! All integers are little-endian. Decoding never trusts the bytes: every
//! field is range-checked and the checksum is verified before anything else is
//! interpreted beyond the magic.

use std::fmt;

use crate::types::{BlockIndex, DiskState, Generation, Role, VolumeId};

use super::layout::SUPERBLOCK_SLOT_LEN_BYTES;

/// The current on-disk format version (superblock and bitmap header).
pub const FORMAT_VERSION: u32 = 1;
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"TANDEMSB";
pub const BITMAP_MAGIC: [u8; 8] = *b"TANDEMBM";

const SLOT_LEN: usize = SUPERBLOCK_SLOT_LEN_BYTES as usize;
/// The slot's crc32 covers bytes `0..SLOT_CRC_OFFSET` and sits in the last 4 bytes.
const SLOT_CRC_OFFSET: usize = SLOT_LEN - 4;

const FLAG_IS_NEW: u32 = 1 << 0;
const FLAG_CLEAN_SHUTDOWN: u32 = 1 << 1;
const FLAG_BITMAP_VALID: u32 = 1 << 2;
const FLAG_RESYNC_CURSOR: u32 = 1 << 3;
const FLAGS_KNOWN: u32 = FLAG_IS_NEW | FLAG_CLEAN_SHUTDOWN | FLAG_BITMAP_VALID | FLAG_RESYNC_CURSOR;

/// The node's durable state (ARCHITECTURE §4), as callers see it. The store
/// adds the slot sequence number and the bitmap-copy selection when it
/// writes a slot; see [`SlotImage`] for the bytes.
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
    pub resync_cursor: Option<BlockIndex>,
    /// The persisted bitmap area holds the bitmap as of the last persist.
    pub bitmap_valid: bool,
}

/// One superblock slot as stored: 4096 bytes.
///
/// ```text
/// offset  len   field
/// 0       8     magic "TANDEMSB"
/// 8       4     format version (1)
/// 12      4     flags: bit0 is_new, bit1 clean_shutdown, bit2 bitmap_valid,
///               bit3 resync_cursor present; other bits must be 0
/// 16      8     slot sequence number (the valid slot with the highest wins)
/// 24      16    volume id (UUID bytes)
/// 40      8     volume size in bytes
/// 48      4     block size in bytes
/// 52      1     role: 1 primary, 2 secondary
/// 53      1     disk state: 1 UpToDate, 2 Inconsistent, 3 Outdated
/// 54      1     current bitmap copy: 0 or 1
/// 55      1     reserved, 0
/// 56      8     generation: current
/// 64      8     generation: bitmap base
/// 72      16    generation: history[0], history[1]
/// 88      8     resync cursor (block index; meaningful only if flag bit3)
/// 96      8     bitmap sequence number the current copy's header must carry
/// 104     8     promoted at (unix seconds; 0 = never primary)
/// 112     3980  reserved, 0
/// 4092    4     crc32 (crc32fast) of bytes 0..4092
/// ```
///
/// Magic and version come first so any reader can tell what the bytes are
/// before interpreting them; the sequence number is next because slot
/// selection needs nothing else; the enums start at 1 so an all-zero slot
/// fails field checks as well as the checksum; the crc is last so it covers
/// every byte before it, and a write torn at any sector boundary leaves a
/// mismatch. The bitmap sequence number ties the slot to one specific
/// persist of the bitmap, so a copy with a valid checksum but from an older
/// persist is never mistaken for the current one.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotImage {
    pub superblock: Superblock,
    pub slot_seq: u64,
    pub bitmap_copy: u8,
    pub bitmap_seq: u64,
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
                    "format version {found}, this build reads version {FORMAT_VERSION}"
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
        assert!(self.bitmap_copy < 2);
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
        if sb.resync_cursor.is_some() {
            flags |= FLAG_RESYNC_CURSOR;
        }
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.slot_seq.to_le_bytes());
        b[24..40].copy_from_slice(&sb.volume_id.0);
        b[40..48].copy_from_slice(&sb.size_bytes.to_le_bytes());
        b[48..52].copy_from_slice(&sb.block_size.to_le_bytes());
        b[52] = role_code(sb.role);
        b[53] = disk_state_code(sb.disk_state);
        b[54] = self.bitmap_copy;
        b[56..64].copy_from_slice(&sb.gen_current.0.to_le_bytes());
        b[64..72].copy_from_slice(&sb.gen_bitmap_base.0.to_le_bytes());
        b[72..80].copy_from_slice(&sb.gen_history[0].0.to_le_bytes());
        b[80..88].copy_from_slice(&sb.gen_history[1].0.to_le_bytes());
        b[88..96].copy_from_slice(&sb.resync_cursor.map_or(0, |c| c.0).to_le_bytes());
        b[96..104].copy_from_slice(&self.bitmap_seq.to_le_bytes());
        b[104..112].copy_from_slice(&sb.promoted_at_s.to_le_bytes());
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
        if version != FORMAT_VERSION {
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
        let bitmap_copy = b[54];
        if bitmap_copy > 1 {
            return Err(SlotFault::BadField {
                field: "bitmap copy",
                value: u64::from(bitmap_copy),
            });
        }
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
        };
        Ok(SlotImage {
            superblock,
            slot_seq: u64_at(b, 16),
            bitmap_copy,
            bitmap_seq: u64_at(b, 96),
        })
    }
}

/// The header in front of each bitmap copy: one 4096-byte block.
///
/// ```text
/// offset  len   field
/// 0       8     magic "TANDEMBM"
/// 8       4     format version (1)
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
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
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
        if version != FORMAT_VERSION {
            return Err(format!(
                "header format version {version}, expected {FORMAT_VERSION}"
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
            },
            slot_seq: 42,
            bitmap_copy: 1,
            bitmap_seq: 9,
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
        other.bitmap_copy = 0;
        assert_eq!(SlotImage::decode(&other.encode()), Ok(other));
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
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            SlotImage::decode(&reseal(b)),
            Err(SlotFault::UnsupportedVersion { found: 2 })
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
        let mut b = sample().encode();
        b[54] = 2;
        assert!(matches!(
            SlotImage::decode(&reseal(b)),
            Err(SlotFault::BadField {
                field: "bitmap copy",
                ..
            })
        ));
        let mut b = sample().encode();
        b[12] |= 0x80;
        assert!(matches!(
            SlotImage::decode(&reseal(b)),
            Err(SlotFault::BadField { field: "flags", .. })
        ));
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
