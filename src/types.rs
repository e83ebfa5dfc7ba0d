//! Newtypes for things with identity or units, so that a block index can never be
//! passed where a byte offset or a sequence number is expected.

use std::fmt;

/// Position of a write in the order the primary accepted it (ARCHITECTURE §3).
/// Sequence numbers start at 1; 0 means "nothing yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);
    pub fn next(self) -> Seq {
        Seq(self.0.checked_add(1).expect("seq overflow"))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Index of a bitmap block (granularity = the volume's block size, default 4 KiB).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIndex(pub u64);

/// A number of blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockCount(pub u64);

/// A volume's identity (G6): random at creation, adopted by a new secondary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VolumeId(pub [u8; 16]);

impl VolumeId {
    pub const NIL: VolumeId = VolumeId([0; 16]);
    pub fn random() -> VolumeId {
        VolumeId(*uuid::Uuid::new_v4().as_bytes())
    }
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", uuid::Uuid::from_bytes(self.0))
    }
}

/// A generation identifier (G8): a random 64-bit value started on promotion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub u64);

impl Generation {
    pub const NONE: Generation = Generation(0);
    pub fn random() -> Generation {
        loop {
            let g: u64 = rand::random();
            if g != 0 {
                return Generation(g);
            }
        }
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// A byte range `[offset, offset + len)` of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    pub fn new(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
    pub fn overlaps(&self, other: &ByteRange) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
    /// First and one-past-last block touched by this range.
    pub fn blocks(&self, block_size_bytes: u32) -> (BlockIndex, BlockIndex) {
        let bs = block_size_bytes as u64;
        if self.len == 0 {
            return (BlockIndex(self.offset / bs), BlockIndex(self.offset / bs));
        }
        (
            BlockIndex(self.offset / bs),
            BlockIndex(self.end().div_ceil(bs)),
        )
    }
}

/// A node's role (G8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Secondary,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        })
    }
}

/// Disk state as recorded in the superblock (ARCHITECTURE §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskState {
    /// Holds a complete, prefix-consistent copy.
    UpToDate,
    /// A resync is under way or never completed: not prefix-consistent.
    Inconsistent,
    /// Consistent but known to be older than the peer.
    Outdated,
}

impl fmt::Display for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskState::UpToDate => "UpToDate",
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Outdated => "Outdated",
        })
    }
}

/// Parse a size with an optional K/M/G/T suffix (powers of 1024), e.g. `256M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1u64 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1u64 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1u64 << 40),
        _ => (s, 1),
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid size '{s}': expected a number with an optional K, M, G or T suffix")
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn ranges_map_to_touched_blocks() {
        assert_eq!(
            ByteRange::new(0, 4096).blocks(4096),
            (BlockIndex(0), BlockIndex(1))
        );
        assert_eq!(
            ByteRange::new(512, 4096).blocks(4096),
            (BlockIndex(0), BlockIndex(2))
        );
        assert!(ByteRange::new(0, 10).overlaps(&ByteRange::new(9, 1)));
        assert!(!ByteRange::new(0, 10).overlaps(&ByteRange::new(10, 1)));
    }
}
