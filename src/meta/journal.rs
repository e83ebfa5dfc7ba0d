//! The on-disk log ring (ARCHITECTURE §4, "On-disk logs"): a bounded,
//! preallocated, checksummed ring of records in its own file that survives a
//! power loss at any instant. One implementation serves the primary's ordered
//! spill log (G4, issue 11 item 5) and the secondary's redo journal (G2,
//! issue 10); the file says which it is ([`JournalKind`]).
//!
//! This module owns the file format, the recovery scan and the order of
//! durable writes. It does not decide what goes in (the engine does: records
//! carry the caller's `kind`, `flags`, `seq`, volume range and timestamp,
//! passed through) nor when to sync or release (the caller: [`Journal::sync`],
//! [`Journal::release_through`] + [`Journal::persist_head`]).
//!
//! # File layout
//!
//! ```text
//! offset (bytes)   length          content
//! 0                4096            header slot A  (JournalHeader)
//! 4096             4096            header slot B
//! 8192             capacity        ring: records (RecordHeader + payload),
//!                                  64-byte aligned, preallocated with fallocate
//! ```
//!
//! # Rules that make it crash-safe
//!
//! - **Headers alternate** between the two slots with a sequence number, like
//!   the metadata superblock: a header write never lands on the newest
//!   header, so a torn one falls back to the previous one.
//! - **A record is accepted at recovery only if** its header checksum, its
//!   payload checksum, its position (where the previous one ended), its LSN
//!   (the previous one's + 1, starting at the header's head) and its epoch
//!   all hold; the first record that fails ends the log. That drops a torn
//!   tail and every stale record: one of an earlier lap has a smaller LSN,
//!   one written before a truncation has an older epoch than the header
//!   requires from the truncation point on.
//! - **Epochs.** [`Journal::truncate_after`] and every [`Journal::open`] first
//!   make the records they keep durable (fdatasync), then write a header with
//!   `epoch + 1` and `epoch_start_lsn` = the next LSN: from that LSN on only
//!   records of the new epoch are accepted, so records dropped by the
//!   truncation (or a torn tail found at open) are never resurrected, even
//!   when a later append over them is torn and leaves an old record at the
//!   very position and with the very LSN the scan expects. Records before
//!   `epoch_start_lsn` must carry an older epoch (they were durable when the
//!   header was written).
//! - **Space is reused only after the head that frees it is durable**:
//!   [`Journal::release_through`] only moves the head in memory; the space
//!   counts as free once [`Journal::persist_head`] has written and synced a
//!   header naming the new head. Otherwise a torn header write would fall
//!   back to an older head whose records were overwritten.
//! - **Appends are not durable until [`Journal::sync`]**: appends are buffered
//!   (at most [`PENDING_BYTES_MAX`] in memory, then written without fdatasync),
//!   `sync` writes what is buffered and fdatasyncs. After a crash the log
//!   holds every synced record and a prefix of the unsynced ones.
//! - A failed write or fdatasync poisons the journal: every later call that
//!   writes fails with [`JournalError::Poisoned`]. After a failed fdatasync
//!   nothing written since the last successful one may be assumed durable;
//!   the node restarts (and a power loss model treats those records as
//!   possibly lost).
//!
//! # Cost
//!
//! Appending costs a copy into the buffer; a sync one `pwrite` per buffered
//! run and one fdatasync. Memory: the buffer (≤ 1 MiB plus one record) and
//! one [`RecordInfo`] (72 bytes) per live record (18 MiB for a 1 GiB log of
//! 4 KiB writes); opening reads the live part
//! of the ring once, sequentially, 1 MiB at a time.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::types::VolumeId;

use super::file::{DurableFile, available_bytes};

/// Header slot magic.
pub const JOURNAL_MAGIC: [u8; 8] = *b"TANDEMJH";
/// Record header magic.
pub const RECORD_MAGIC: [u8; 4] = *b"TJRC";
/// Version of the journal format (header slot and record).
pub const JOURNAL_FORMAT_VERSION: u32 = 1;
/// Size of one header slot.
pub const HEADER_SLOT_LEN_BYTES: u64 = 4096;
/// File offsets of header slots A and B.
pub const HEADER_SLOT_OFFSETS: [u64; 2] = [0, HEADER_SLOT_LEN_BYTES];
/// Where the ring starts in the file.
pub const RING_OFFSET_BYTES: u64 = 2 * HEADER_SLOT_LEN_BYTES;
/// Size of a record header; records start at multiples of [`RECORD_ALIGN_BYTES`].
pub const RECORD_HEADER_LEN_BYTES: u64 = 64;
/// Alignment of records in the ring.
///
/// 64 bytes, the size of a record header: a payload-free record (trim,
/// write-zeroes, marker) takes 64 bytes and a 4 KiB write 4160, at most 63
/// bytes of padding per record. Sector (512 B) alignment would waste up to
/// 511 bytes per record and double the footprint of small records, for no
/// gain: the journal is written with buffered I/O, and a record sharing a
/// sector with the previous one cannot damage it: a write to that sector
/// carries the previous record's bytes unchanged, so a torn or lost write of
/// it leaves them as they were.
pub const RECORD_ALIGN_BYTES: u64 = 64;
/// Smallest ring accepted.
pub const CAPACITY_MIN_BYTES: u64 = 8192;
/// Bytes of appends held in memory before they are written (not synced).
pub const PENDING_BYTES_MAX: usize = 1 << 20;
/// Payloads larger than this are refused (the length field is 32 bits).
pub const PAYLOAD_MAX_BYTES: u64 = u32::MAX as u64;

const SLOT_LEN: usize = HEADER_SLOT_LEN_BYTES as usize;
const SLOT_CRC_OFFSET: usize = SLOT_LEN - 4;
const REC_HDR: usize = RECORD_HEADER_LEN_BYTES as usize;
const REC_CRC_OFFSET: usize = REC_HDR - 4;
/// Record type byte: a record carrying the caller's data.
const TYPE_ENTRY: u8 = 1;
/// Record type byte: padding to the ring's end; the next record is at position 0.
const TYPE_WRAP: u8 = 2;
/// Bytes read per `pread` by the recovery scan.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

fn align_up(n: u64) -> u64 {
    n.div_ceil(RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES
}

/// Bytes a record with a payload of `payload_len` bytes takes in the ring.
pub fn record_len_bytes(payload_len: u64) -> u64 {
    align_up(RECORD_HEADER_LEN_BYTES + payload_len)
}

/// Log sequence number: records are numbered 1, 2, 3… consecutively, across
/// wrap-arounds and restarts; a truncation reuses the numbers it dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a journal file is for. Checked at open, so one cannot be mistaken
/// for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalKind {
    /// The primary's ordered spill log (G4): writes not yet shipped, in order.
    Spill,
    /// The secondary's redo journal (G2): replicated or resync writes staged
    /// before they are applied.
    Redo,
}

impl JournalKind {
    fn code(self) -> u8 {
        match self {
            JournalKind::Spill => 1,
            JournalKind::Redo => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(JournalKind::Spill),
            2 => Some(JournalKind::Redo),
            _ => None,
        }
    }

    /// How an operator makes this file smaller.
    fn smaller_steps(self) -> &'static str {
        match self {
            JournalKind::Spill => {
                "set a smaller spill-size in the resource file (--spill-size; 0 turns the \
                 spill log off: a full window then falls back to the bitmap)"
            }
            JournalKind::Redo => "set a smaller journal-size in the resource file (--journal-size)",
        }
    }

    /// What an operator can do when this journal is missing or damaged.
    fn recovery_steps(self) -> &'static str {
        match self {
            JournalKind::Spill => {
                "nothing was overwritten. Restore the file if it was moved or is on an \
                 unmounted filesystem. If it is lost, move the damaged file aside (or remove \
                 it) and start the primary again: a new, empty log is created, and the writes \
                 the old one held are resynced from the dirty bitmap, which covers them"
            }
            JournalKind::Redo => {
                "nothing was overwritten. Restore the file if it was moved or is on an \
                 unmounted filesystem. If it is lost, the secondary's staged writes are lost \
                 with it and its consistent image cannot be proven: move the damaged file \
                 aside (or remove it), start the node, and let it resync from its primary"
            }
        }
    }
}

impl fmt::Display for JournalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JournalKind::Spill => "spill log",
            JournalKind::Redo => "redo journal",
        })
    }
}

/// What a journal belongs to; checked at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalIdentity {
    pub kind: JournalKind,
    pub volume_id: VolumeId,
    pub block_size: u32,
}

/// The fields of a record the caller chooses, passed through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RecordFields {
    /// The caller's record kind (write, write-zeroes, trim, markers…).
    pub kind: u8,
    /// The caller's flags.
    pub flags: u8,
    /// The caller's sequence number (the replication `seq`).
    pub seq: u64,
    /// Volume range the record is about. `len_bytes` may exceed the payload
    /// (zeroes, trim and markers carry none).
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// The caller's timestamp (e.g. when the write was accepted), ms.
    pub at_ms: u64,
}

/// One live record as the in-memory index holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    pub lsn: Lsn,
    pub fields: RecordFields,
    pub payload_len: u32,
    pub payload_crc: u32,
    /// Epoch the record was written in.
    pub epoch: u32,
    /// Byte position of the record (its header) in the ring.
    pub position: u64,
}

impl RecordInfo {
    /// Bytes it takes in the ring.
    pub fn len_bytes(&self) -> u64 {
        record_len_bytes(u64::from(self.payload_len))
    }
}

/// One record header in the ring: 64 bytes, followed by the payload, the
/// whole padded with zeroes to a multiple of 64 bytes.
///
/// ```text
/// offset  len  field
/// 0       4    magic "TJRC"
/// 4       1    record type: 1 entry, 2 wrap (padding to the ring's end; the
///              record with this LSN follows at ring position 0)
/// 5       1    kind (the caller's)
/// 6       1    flags (the caller's)
/// 7       1    reserved, 0
/// 8       8    LSN
/// 16      8    seq (the caller's)
/// 24      8    volume offset in bytes
/// 32      8    volume length in bytes
/// 40      8    at_ms (the caller's timestamp)
/// 48      4    epoch the record was written in
/// 52      4    payload length in bytes (0 for a wrap)
/// 56      4    crc32 of the payload
/// 60      4    crc32 of bytes 0..60
/// ```
///
/// The magic and type come first so a scan can tell a record from zeroes or
/// garbage before anything else; LSN and epoch, which decide whether the
/// record belongs to the log, are checksummed with everything else by the
/// header crc, which comes last so a write torn at any sector boundary
/// inside the header breaks it. The payload has its own checksum, separate
/// from the header's (TigerBeetle's rule): a header can be trusted, and its
/// length used, before the payload is read, and a torn payload is caught
/// even when the header made it to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub wrap: bool,
    pub lsn: Lsn,
    pub epoch: u32,
    pub fields: RecordFields,
    pub payload_len: u32,
    pub payload_crc: u32,
}

/// Why a record header was not accepted (the end of the log at recovery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// All zeroes: never written since the ring was allocated.
    Zeroed,
    BadMagic,
    BadCrc,
    BadType(u8),
    /// A checksummed header with a reserved byte set: not written by this format.
    BadReserved,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; REC_HDR] {
        let mut b = [0u8; REC_HDR];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = if self.wrap { TYPE_WRAP } else { TYPE_ENTRY };
        b[5] = self.fields.kind;
        b[6] = self.fields.flags;
        b[8..16].copy_from_slice(&self.lsn.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.fields.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.fields.offset_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.fields.len_bytes.to_le_bytes());
        b[40..48].copy_from_slice(&self.fields.at_ms.to_le_bytes());
        b[48..52].copy_from_slice(&self.epoch.to_le_bytes());
        b[52..56].copy_from_slice(&self.payload_len.to_le_bytes());
        b[56..60].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..REC_CRC_OFFSET]);
        b[REC_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<RecordHeader, RecordFault> {
        let b = &b[..REC_HDR];
        if b[0..4] != RECORD_MAGIC {
            return Err(if b.iter().all(|&x| x == 0) {
                RecordFault::Zeroed
            } else {
                RecordFault::BadMagic
            });
        }
        if u32_at(b, REC_CRC_OFFSET) != crc32fast::hash(&b[..REC_CRC_OFFSET]) {
            return Err(RecordFault::BadCrc);
        }
        let wrap = match b[4] {
            TYPE_ENTRY => false,
            TYPE_WRAP => true,
            t => return Err(RecordFault::BadType(t)),
        };
        if b[7] != 0 {
            return Err(RecordFault::BadReserved);
        }
        Ok(RecordHeader {
            wrap,
            lsn: Lsn(u64_at(b, 8)),
            epoch: u32_at(b, 48),
            fields: RecordFields {
                kind: b[5],
                flags: b[6],
                seq: u64_at(b, 16),
                offset_bytes: u64_at(b, 24),
                len_bytes: u64_at(b, 32),
                at_ms: u64_at(b, 40),
            },
            payload_len: u32_at(b, 52),
            payload_crc: u32_at(b, 56),
        })
    }
}

/// One header slot: 4096 bytes.
///
/// ```text
/// offset  len   field
/// 0       8     magic "TANDEMJH"
/// 8       4     format version (1)
/// 12      1     kind: 1 spill log, 2 redo journal
/// 13      3     reserved, 0
/// 16      8     header sequence number (the valid slot with the highest wins)
/// 24      16    volume id
/// 40      4     block size in bytes
/// 44      4     epoch
/// 48      8     ring capacity in bytes (multiple of 4096)
/// 56      8     head LSN: the oldest live record (= the next LSN if none)
/// 64      8     head position: its byte offset in the ring (multiple of 64)
/// 72      8     epoch start LSN: records from it on must carry this epoch,
///               records before it an older one
/// 80      4012  reserved, 0
/// 4092    4     crc32 of bytes 0..4092
/// ```
///
/// Identity (kind, volume, block size, capacity) comes right after the
/// sequence number so a mismatch is reported before the log is scanned; the
/// head and the epoch pair are what recovery needs to find and judge the
/// first record. The crc is last so it covers every byte before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    pub identity: JournalIdentity,
    pub header_seq: u64,
    pub epoch: u32,
    pub capacity_bytes: u64,
    pub head_lsn: Lsn,
    pub head_position: u64,
    pub epoch_start_lsn: Lsn,
}

/// Why a header slot could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderFault {
    Zeroed,
    Short { len_bytes: usize },
    BadMagic,
    BadCrc { stored: u32, computed: u32 },
    UnsupportedVersion { found: u32 },
    BadField { field: &'static str, value: u64 },
}

impl fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderFault::Zeroed => f.write_str("all zeroes"),
            HeaderFault::Short { len_bytes } => write!(f, "truncated to {len_bytes} bytes"),
            HeaderFault::BadMagic => f.write_str("bad magic (not a tandem journal header)"),
            HeaderFault::BadCrc { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:08x}, computed {computed:08x}): torn or corrupt"
            ),
            HeaderFault::UnsupportedVersion { found } => write!(
                f,
                "format version {found}, this build reads version {JOURNAL_FORMAT_VERSION}"
            ),
            HeaderFault::BadField { field, value } => write!(f, "invalid {field} value {value}"),
        }
    }
}

impl JournalHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT_LEN];
        b[0..8].copy_from_slice(&JOURNAL_MAGIC);
        b[8..12].copy_from_slice(&JOURNAL_FORMAT_VERSION.to_le_bytes());
        b[12] = self.identity.kind.code();
        b[16..24].copy_from_slice(&self.header_seq.to_le_bytes());
        b[24..40].copy_from_slice(&self.identity.volume_id.0);
        b[40..44].copy_from_slice(&self.identity.block_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.epoch.to_le_bytes());
        b[48..56].copy_from_slice(&self.capacity_bytes.to_le_bytes());
        b[56..64].copy_from_slice(&self.head_lsn.0.to_le_bytes());
        b[64..72].copy_from_slice(&self.head_position.to_le_bytes());
        b[72..80].copy_from_slice(&self.epoch_start_lsn.0.to_le_bytes());
        let crc = crc32fast::hash(&b[..SLOT_CRC_OFFSET]);
        b[SLOT_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<JournalHeader, HeaderFault> {
        if b.len() < SLOT_LEN {
            return Err(HeaderFault::Short { len_bytes: b.len() });
        }
        let b = &b[..SLOT_LEN];
        if b[0..8] != JOURNAL_MAGIC {
            return Err(if b.iter().all(|&x| x == 0) {
                HeaderFault::Zeroed
            } else {
                HeaderFault::BadMagic
            });
        }
        let stored = u32_at(b, SLOT_CRC_OFFSET);
        let computed = crc32fast::hash(&b[..SLOT_CRC_OFFSET]);
        if stored != computed {
            return Err(HeaderFault::BadCrc { stored, computed });
        }
        let version = u32_at(b, 8);
        if version != JOURNAL_FORMAT_VERSION {
            return Err(HeaderFault::UnsupportedVersion { found: version });
        }
        let bad = |field, value| Err(HeaderFault::BadField { field, value });
        let Some(kind) = JournalKind::from_code(b[12]) else {
            return bad("kind", u64::from(b[12]));
        };
        if b[13..16] != [0, 0, 0] || b[80..SLOT_CRC_OFFSET].iter().any(|&x| x != 0) {
            return bad("reserved bytes", 0);
        }
        let capacity_bytes = u64_at(b, 48);
        if capacity_bytes < CAPACITY_MIN_BYTES || !capacity_bytes.is_multiple_of(4096) {
            return bad("capacity", capacity_bytes);
        }
        let head_lsn = Lsn(u64_at(b, 56));
        let head_position = u64_at(b, 64);
        let epoch_start_lsn = Lsn(u64_at(b, 72));
        if head_lsn.0 == 0 || head_lsn.0 > u64::MAX / 2 {
            return bad("head LSN", head_lsn.0);
        }
        if head_position >= capacity_bytes || !head_position.is_multiple_of(RECORD_ALIGN_BYTES) {
            return bad("head position", head_position);
        }
        if epoch_start_lsn.0 == 0 || epoch_start_lsn.0 > u64::MAX / 2 {
            return bad("epoch start LSN", epoch_start_lsn.0);
        }
        let epoch = u32_at(b, 44);
        if epoch == 0 {
            return bad("epoch", 0);
        }
        Ok(JournalHeader {
            identity: JournalIdentity {
                kind,
                volume_id: VolumeId(b[24..40].try_into().expect("16 bytes")),
                block_size: u32_at(b, 40),
            },
            header_seq: u64_at(b, 16),
            epoch,
            capacity_bytes,
            head_lsn,
            head_position,
            epoch_start_lsn,
        })
    }
}

/// Errors of the journal. Messages say what happened, to which file, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{kind} {}: {op} failed; check the disk and the path", path.display())]
    Io {
        kind: JournalKind,
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{kind} {} does not exist; {}", path.display(), kind.recovery_steps())]
    Missing { kind: JournalKind, path: PathBuf },

    #[error(
        "{kind} {} already exists; refusing to create it again over its records: open it, or \
         move it aside first",
        path.display()
    )]
    Exists { kind: JournalKind, path: PathBuf },

    #[error(
        "{kind} {}: both header slots are damaged (slot A: {slot_a}; slot B: {slot_b}); {}",
        path.display(),
        kind.recovery_steps()
    )]
    Damaged {
        kind: JournalKind,
        path: PathBuf,
        slot_a: HeaderFault,
        slot_b: HeaderFault,
    },

    #[error(
        "{kind} {}: header slot {slot} has format version {found}, this build reads version \
         {JOURNAL_FORMAT_VERSION}; use a tandem build that understands it (nothing was \
         overwritten)",
        path.display()
    )]
    UnsupportedVersion {
        kind: JournalKind,
        path: PathBuf,
        slot: char,
        found: u32,
    },

    #[error(
        "{} is a {found} but a {expected} was expected; check the configured path (nothing was \
         overwritten)",
        path.display()
    )]
    WrongKind {
        path: PathBuf,
        found: JournalKind,
        expected: JournalKind,
    },

    #[error(
        "{kind} {} belongs to {what} {on_disk}, but this node's is {expected}; it is another \
         volume's journal: check the configured path (nothing was overwritten)",
        path.display()
    )]
    WrongVolume {
        kind: JournalKind,
        path: PathBuf,
        what: &'static str,
        on_disk: String,
        expected: String,
    },

    #[error(
        "{kind} {} is {len_bytes} bytes but its header describes a ring ending at byte \
         {needed_bytes}: the file was truncated; {}",
        path.display(),
        kind.recovery_steps()
    )]
    Truncated {
        kind: JournalKind,
        path: PathBuf,
        len_bytes: u64,
        needed_bytes: u64,
    },

    #[error(
        "{kind} {}: not enough space: it needs {needed_bytes} bytes{}; free space on that \
         filesystem or {}",
        path.display(),
        match available_bytes {
            Some(a) => format!(", the filesystem has {a} available"),
            None => String::new(),
        },
        kind.smaller_steps()
    )]
    NoSpace {
        kind: JournalKind,
        path: PathBuf,
        needed_bytes: u64,
        available_bytes: Option<u64>,
    },

    #[error(
        "{kind} {}: cannot be made {capacity_bytes} bytes: its live records take \
         {live_bytes}; it keeps its {current_bytes} bytes until they are released (a redo \
         journal's records are released once copied into the volume and past the rollback \
         window), then the next start resizes it",
        path.display()
    )]
    ResizeTooSmall {
        kind: JournalKind,
        path: PathBuf,
        live_bytes: u64,
        capacity_bytes: u64,
        current_bytes: u64,
    },

    #[error(
        "invalid journal capacity {capacity_bytes} bytes: it must be a multiple of 4096 of at \
         least {CAPACITY_MIN_BYTES}"
    )]
    InvalidCapacity { capacity_bytes: u64 },

    #[error(
        "{kind} {} is locked by another process (another tandem agent for this volume?); stop \
         it first",
        path.display()
    )]
    Locked { kind: JournalKind, path: PathBuf },

    #[error(
        "{kind} full: the record needs {needed_bytes} bytes and {free_bytes} are free; release \
         records (and persist the head) first"
    )]
    Full {
        kind: JournalKind,
        needed_bytes: u64,
        free_bytes: u64,
    },

    #[error(
        "{kind}: a record of {record_bytes} bytes can never fit a ring of {capacity_bytes} \
         bytes; split it, or configure a larger journal"
    )]
    RecordTooLarge {
        kind: JournalKind,
        record_bytes: u64,
        capacity_bytes: u64,
    },

    #[error(
        "{kind} {}: the payload of record {lsn} fails its checksum (stored {stored:08x}, \
         computed {computed:08x}): the disk returned damaged data",
        path.display()
    )]
    PayloadCorrupt {
        kind: JournalKind,
        path: PathBuf,
        lsn: Lsn,
        stored: u32,
        computed: u32,
    },

    #[error("{kind}: record {lsn} is not live (live records: {first} to {last})")]
    NotLive {
        kind: JournalKind,
        lsn: Lsn,
        first: Lsn,
        last: Lsn,
    },

    #[error(
        "{kind} {}: an earlier write or fdatasync failed, so its durability is unknown; no \
         further writes are made: restart the agent after checking the disk",
        path.display()
    )]
    Poisoned { kind: JournalKind, path: PathBuf },
}

/// Why the recovery scan stopped where it did: the end of the log. Normally
/// a never-written or stale record; after a crash, a torn one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// The ring holds `capacity` bytes of live records.
    RingFull,
    /// The record header there is not valid (zero, garbage, torn).
    Header(RecordFault),
    /// A valid header with another LSN than the next one: an earlier lap's record.
    StaleLsn { found: Lsn },
    /// A valid header whose epoch the header rules out: dropped by a truncation or a reopen.
    StaleEpoch { found: u32 },
    /// A header whose length or position cannot be right.
    BadGeometry,
    /// The payload fails its checksum: torn.
    BadPayload { lsn: Lsn },
}

impl fmt::Display for ScanEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanEnd::RingFull => f.write_str("the ring is full"),
            ScanEnd::Header(RecordFault::Zeroed) => f.write_str("never-written space"),
            ScanEnd::Header(fault) => write!(f, "an invalid record header ({fault:?})"),
            ScanEnd::StaleLsn { found } => write!(f, "a stale record (LSN {found})"),
            ScanEnd::StaleEpoch { found } => {
                write!(f, "a dropped record (epoch {found})")
            }
            ScanEnd::BadGeometry => f.write_str("a record that does not fit the ring"),
            ScanEnd::BadPayload { lsn } => write!(f, "a torn payload (record {lsn})"),
        }
    }
}

/// The journal, held open and locked (see the module documentation).
pub struct Journal<F: DurableFile = File> {
    path: PathBuf,
    file: F,
    identity: JournalIdentity,
    capacity: u64,
    header_seq: u64,
    /// Slot holding the newest header.
    current_slot: usize,
    epoch: u32,
    epoch_start: Lsn,
    /// Live records, oldest first.
    index: VecDeque<RecordInfo>,
    /// In-memory head (after releases): first live LSN and its position.
    head_lsn: Lsn,
    head_pos: u64,
    /// Head named by the newest durable header: space before it is free.
    durable_head_lsn: Lsn,
    durable_head_pos: u64,
    next_lsn: Lsn,
    /// Ring position where the next record goes.
    tail: u64,
    /// Bytes between the durable head and the tail (wrap padding included).
    used: u64,
    /// Appends not yet written: bytes for ring positions from `pending_pos`,
    /// holding the records from `pending_first_lsn` on.
    pending: Vec<u8>,
    pending_pos: u64,
    pending_first_lsn: Lsn,
    /// Written (pwrite) but not yet fdatasync'd, through this LSN.
    written_lsn: Lsn,
    durable_lsn: Lsn,
    /// Something was written since the last fdatasync.
    unsynced: bool,
    scan_end: Option<ScanEnd>,
    poisoned: bool,
}

impl<F: DurableFile> fmt::Debug for Journal<F> {
    // The index and the buffer can be megabytes: show the shape.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("kind", &self.identity.kind)
            .field("capacity", &self.capacity)
            .field("epoch", &self.epoch)
            .field("head_lsn", &self.head_lsn)
            .field("next_lsn", &self.next_lsn)
            .field("durable_lsn", &self.durable_lsn)
            .field("used", &self.used)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

fn validate_capacity(capacity_bytes: u64) -> Result<(), JournalError> {
    if capacity_bytes < CAPACITY_MIN_BYTES || !capacity_bytes.is_multiple_of(4096) {
        Err(JournalError::InvalidCapacity { capacity_bytes })
    } else {
        Ok(())
    }
}

impl Journal<File> {
    /// Create a journal file at `path` with a ring of `capacity_bytes`,
    /// preallocated. Refuses if the file exists ([`JournalError::Exists`]) or
    /// the filesystem lacks the space ([`JournalError::NoSpace`], with the
    /// bytes needed and available). Atomic: built under a temporary name,
    /// made durable, then linked into place, so a crash never leaves a
    /// half-made journal at `path`.
    pub fn create(
        path: &Path,
        identity: JournalIdentity,
        capacity_bytes: u64,
    ) -> Result<Journal<File>, JournalError> {
        Self::create_file(path, identity, capacity_bytes, false)
    }

    /// [`Journal::create`], with the ring written once with zeros (what a scan
    /// reads as never written) before the journal is linked into place.
    /// fallocate leaves unwritten extents, and the first fdatasync after a write
    /// into one also commits the filesystem's conversion of that extent: every
    /// durable append of the first pass round the ring paid it (the secondary's
    /// redo journal, sync mode, 4 KiB write + FLUSH at QD1 on ext4: ~1,200 IOPS
    /// against ~1,420 with a written ring). Databases zero-fill their
    /// write-ahead logs for the same reason. Costs a write of the whole ring
    /// (1–3 s per GiB here).
    pub fn create_written(
        path: &Path,
        identity: JournalIdentity,
        capacity_bytes: u64,
    ) -> Result<Journal<File>, JournalError> {
        Self::create_file(path, identity, capacity_bytes, true)
    }

    fn create_file(
        path: &Path,
        identity: JournalIdentity,
        capacity_bytes: u64,
        written: bool,
    ) -> Result<Journal<File>, JournalError> {
        validate_capacity(capacity_bytes)?;
        if path.exists() {
            return Err(JournalError::Exists {
                kind: identity.kind,
                path: path.to_path_buf(),
            });
        }
        Self::build_beside(
            path,
            identity,
            capacity_bytes,
            written,
            |_| Ok(()),
            |tmp| std::fs::hard_link(tmp, path),
            "link into place",
        )
    }

    /// Give the journal a ring of `capacity_bytes`: its live records are copied,
    /// in order and with their LSNs, fields and payloads, into a new journal
    /// built beside it (ring written once, like [`Journal::create_written`]),
    /// which then replaces it by a rename. A crash before the rename leaves
    /// the old journal as it was (and a stray temporary file); after it, the
    /// new one, durable. Refused, keeping this journal, when the live records
    /// do not fit the new ring ([`JournalError::ResizeTooSmall`]) or the
    /// filesystem lacks the space for both files at once
    /// ([`JournalError::NoSpace`]); on an error this journal is unchanged.
    pub fn resize(&mut self, capacity_bytes: u64) -> Result<(), JournalError> {
        validate_capacity(capacity_bytes)?;
        let live = self.live_bytes();
        if live > capacity_bytes {
            return Err(JournalError::ResizeTooSmall {
                kind: self.identity.kind,
                path: self.path.clone(),
                live_bytes: live,
                capacity_bytes,
                current_bytes: self.capacity,
            });
        }
        let path = self.path.clone();
        let new = Self::build_beside(
            &path,
            self.identity,
            capacity_bytes,
            true,
            |new| self.copy_live_into(new),
            |tmp| std::fs::rename(tmp, &path),
            "rename into place",
        )?;
        // The old file (unlinked by the rename) is closed, and its lock released, here.
        *self = new;
        Ok(())
    }

    /// Build a journal under a temporary name next to `path` (space checked,
    /// ring preallocated), let `fill` append to it, zero-fill the rest of the
    /// ring if `written`, make it durable, `place` it at `path` (`op` names that step in
    /// errors) and fsync the directory. The temporary name is removed on
    /// every path out.
    fn build_beside(
        path: &Path,
        identity: JournalIdentity,
        capacity_bytes: u64,
        written: bool,
        fill: impl FnOnce(&mut Journal<File>) -> Result<(), JournalError>,
        place: impl FnOnce(&Path) -> io::Result<()>,
        op: &'static str,
    ) -> Result<Journal<File>, JournalError> {
        let kind = identity.kind;
        let io_err = |path: &Path, op| {
            let path = path.to_path_buf();
            move |source| JournalError::Io {
                kind,
                path,
                op,
                source,
            }
        };
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(
            ".creating-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let tmp = PathBuf::from(tmp_name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        let result = (|| {
            let needed = RING_OFFSET_BYTES + capacity_bytes;
            let available = available_bytes(&file).map_err(io_err(&tmp, "statvfs"))?;
            if available < needed {
                return Err(JournalError::NoSpace {
                    kind,
                    path: path.to_path_buf(),
                    needed_bytes: needed,
                    available_bytes: Some(available),
                });
            }
            let mut journal =
                Self::create_on(file, &tmp, identity, capacity_bytes).map_err(|e| match e {
                    JournalError::NoSpace { needed_bytes, .. } => JournalError::NoSpace {
                        kind,
                        path: path.to_path_buf(),
                        needed_bytes,
                        available_bytes: Some(available),
                    },
                    e => e,
                })?;
            fill(&mut journal)?;
            if written {
                // What `fill` appended (from the ring's start) is written already.
                let filled = journal.used;
                zero_fill(
                    &journal.file,
                    RING_OFFSET_BYTES + filled,
                    capacity_bytes - filled,
                )
                .map_err(io_err(&tmp, "write zeros over the ring"))?;
            }
            journal.file.sync_all().map_err(io_err(&tmp, "fsync"))?;
            place(&tmp).map_err(io_err(path, op))?;
            journal.path = path.to_path_buf();
            Ok(journal)
        })();
        let _ = std::fs::remove_file(&tmp);
        let journal = result?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(
                parent,
                "fsync of the directory holding the new journal",
            ))?;
        Ok(journal)
    }

    /// Open the journal at `path`, which must exist ([`JournalError::Missing`]
    /// otherwise: a missing journal is never silently recreated) and belong
    /// to `identity`. See [`Journal::open_on`].
    pub fn open(path: &Path, identity: JournalIdentity) -> Result<Journal<File>, JournalError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(JournalError::Missing {
                    kind: identity.kind,
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(JournalError::Io {
                    kind: identity.kind,
                    path: path.to_path_buf(),
                    op: "open",
                    source,
                });
            }
        };
        Self::open_on(file, path, identity)
    }
}

/// Write zeros over `len` bytes of `file` from `offset` (allocated already).
fn zero_fill(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK_BYTES: u64 = 8 << 20;
    let zeros = vec![0u8; CHUNK_BYTES.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK_BYTES) as usize;
        DurableFile::write_all_at(file, &zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl<F: DurableFile> Journal<F> {
    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> JournalError + use<F> {
        let (kind, path) = (self.identity.kind, self.path.clone());
        move |source| JournalError::Io {
            kind,
            path,
            op,
            source,
        }
    }

    /// Create a journal in `file` (empty), named `name` in messages: the
    /// ring is preallocated (ENOSPC gives [`JournalError::NoSpace`]) and both
    /// header slots written and made durable. Not atomic (see
    /// [`Journal::create`] for a file by path).
    pub fn create_on(
        file: F,
        name: impl Into<PathBuf>,
        identity: JournalIdentity,
        capacity_bytes: u64,
    ) -> Result<Journal<F>, JournalError> {
        validate_capacity(capacity_bytes)?;
        let path = name.into();
        let kind = identity.kind;
        match file.try_lock_exclusive() {
            Ok(true) => {}
            Ok(false) => return Err(JournalError::Locked { kind, path }),
            Err(source) => {
                return Err(JournalError::Io {
                    kind,
                    path,
                    op: "flock",
                    source,
                });
            }
        }
        let needed = RING_OFFSET_BYTES + capacity_bytes;
        match file.allocate(0, needed) {
            Ok(()) => {}
            // A filesystem without fallocate: the ring stays sparse, its space
            // is not reserved (an append may then fail with ENOSPC, which
            // poisons the journal like any write error).
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                file.set_len(needed).map_err(|source| JournalError::Io {
                    kind,
                    path: path.clone(),
                    op: "set_len",
                    source,
                })?;
            }
            Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                return Err(JournalError::NoSpace {
                    kind,
                    path,
                    needed_bytes: needed,
                    available_bytes: None,
                });
            }
            Err(source) => {
                return Err(JournalError::Io {
                    kind,
                    path,
                    op: "fallocate",
                    source,
                });
            }
        }
        let mut journal = Journal {
            path,
            file,
            identity,
            capacity: capacity_bytes,
            header_seq: 0,
            current_slot: 1, // the first header goes to slot A
            epoch: 1,
            epoch_start: Lsn(1),
            index: VecDeque::new(),
            head_lsn: Lsn(1),
            head_pos: 0,
            durable_head_lsn: Lsn(1),
            durable_head_pos: 0,
            next_lsn: Lsn(1),
            tail: 0,
            used: 0,
            pending: Vec::new(),
            pending_pos: 0,
            pending_first_lsn: Lsn(1),
            written_lsn: Lsn(0),
            durable_lsn: Lsn(0),
            unsynced: false,
            scan_end: None,
            poisoned: false,
        };
        // Both slots valid from the start (a torn later write has a good twin).
        journal.write_header()?;
        journal.write_header()?;
        Ok(journal)
    }

    /// Open the journal in `file` (named `name` in messages), which must
    /// belong to `identity`: pick the newest valid header, scan the ring from
    /// its head and keep every record that passes (see the module
    /// documentation), then make them durable and start a new epoch, so that
    /// whatever followed them can never come back. The live records are then
    /// in [`records`](Self::records); [`scan_end`](Self::scan_end) says what
    /// ended the scan.
    ///
    /// Refused, with the recovery steps and nothing overwritten: both headers
    /// damaged, another kind, volume or block size, a truncated file, an
    /// unknown format version.
    pub fn open_on(
        file: F,
        name: impl Into<PathBuf>,
        identity: JournalIdentity,
    ) -> Result<Journal<F>, JournalError> {
        let path = name.into();
        let kind = identity.kind;
        let io_err = |op| {
            let path = path.clone();
            move |source| JournalError::Io {
                kind,
                path,
                op,
                source,
            }
        };
        match file.try_lock_exclusive() {
            Ok(true) => {}
            Ok(false) => return Err(JournalError::Locked { kind, path }),
            Err(source) => return Err(io_err("flock")(source)),
        }
        let mut slots = Vec::with_capacity(2);
        for offset in HEADER_SLOT_OFFSETS {
            let bytes = file
                .read_at_most(offset, SLOT_LEN)
                .map_err(io_err("read of a header slot"))?;
            slots.push(JournalHeader::decode(&bytes));
        }
        for (i, slot) in slots.iter().enumerate() {
            if let Err(HeaderFault::UnsupportedVersion { found }) = slot {
                return Err(JournalError::UnsupportedVersion {
                    kind,
                    path,
                    slot: ['A', 'B'][i],
                    found: *found,
                });
            }
        }
        let (current_slot, header) = match (&slots[0], &slots[1]) {
            (Ok(a), Ok(b)) => {
                if b.header_seq > a.header_seq {
                    (1, *b)
                } else {
                    (0, *a)
                }
            }
            (Ok(a), Err(_)) => (0, *a),
            (Err(_), Ok(b)) => (1, *b),
            (Err(a), Err(b)) => {
                return Err(JournalError::Damaged {
                    kind,
                    path,
                    slot_a: a.clone(),
                    slot_b: b.clone(),
                });
            }
        };
        let found = header.identity;
        if found.kind != identity.kind {
            return Err(JournalError::WrongKind {
                path,
                found: found.kind,
                expected: identity.kind,
            });
        }
        if found.volume_id != identity.volume_id {
            return Err(JournalError::WrongVolume {
                kind,
                path,
                what: "volume",
                on_disk: found.volume_id.to_string(),
                expected: identity.volume_id.to_string(),
            });
        }
        if found.block_size != identity.block_size {
            return Err(JournalError::WrongVolume {
                kind,
                path,
                what: "block size",
                on_disk: format!("{} bytes", found.block_size),
                expected: format!("{} bytes", identity.block_size),
            });
        }
        let needed = RING_OFFSET_BYTES + header.capacity_bytes;
        let len = file.len_bytes().map_err(io_err("stat"))?;
        if len < needed {
            return Err(JournalError::Truncated {
                kind,
                path,
                len_bytes: len,
                needed_bytes: needed,
            });
        }
        let mut journal = Journal {
            path,
            file,
            identity,
            capacity: header.capacity_bytes,
            header_seq: header.header_seq,
            current_slot,
            epoch: header.epoch,
            epoch_start: header.epoch_start_lsn,
            index: VecDeque::new(),
            head_lsn: header.head_lsn,
            head_pos: header.head_position,
            durable_head_lsn: header.head_lsn,
            durable_head_pos: header.head_position,
            next_lsn: header.head_lsn,
            tail: header.head_position,
            used: 0,
            pending: Vec::new(),
            pending_pos: header.head_position,
            pending_first_lsn: header.head_lsn,
            written_lsn: Lsn(header.head_lsn.0 - 1),
            durable_lsn: Lsn(header.head_lsn.0 - 1),
            unsynced: false,
            scan_end: None,
            poisoned: false,
        };
        journal.scan()?;
        // What was read may be in the page cache only (after a kill -9): make
        // it durable, then start a new epoch from the next LSN, so no record
        // after the last one kept can ever be accepted again.
        journal.unsynced = true;
        journal.sync()?;
        journal.start_epoch()?;
        Ok(journal)
    }

    /// The recovery scan (see the module documentation for the rules).
    fn scan(&mut self) -> Result<(), JournalError> {
        let mut reader = RingReader::new(self.capacity);
        let mut pos = self.head_pos;
        let mut expected = self.head_lsn;
        let mut consumed: u64 = 0;
        let mut last_epoch = 0u32;
        let end = loop {
            if pos == self.capacity {
                pos = 0;
            }
            if consumed + RECORD_HEADER_LEN_BYTES > self.capacity {
                break ScanEnd::RingFull;
            }
            let hdr_bytes = reader
                .read(&self.file, pos, REC_HDR)
                .map_err(self.io("read of the ring"))?;
            let h = match RecordHeader::decode(hdr_bytes) {
                Ok(h) => h,
                Err(fault) => break ScanEnd::Header(fault),
            };
            if h.lsn != expected {
                break ScanEnd::StaleLsn { found: h.lsn };
            }
            let epoch_ok = if h.lsn >= self.epoch_start {
                h.epoch == self.epoch
            } else {
                h.epoch < self.epoch
            };
            if !epoch_ok || h.epoch < last_epoch {
                break ScanEnd::StaleEpoch { found: h.epoch };
            }
            if h.wrap {
                // Padding from here to the ring's end; the record follows at 0.
                if h.payload_len != 0 || pos == 0 {
                    break ScanEnd::BadGeometry;
                }
                consumed += self.capacity - pos;
                pos = 0;
                last_epoch = h.epoch;
                continue;
            }
            let len = record_len_bytes(u64::from(h.payload_len));
            if pos + len > self.capacity || consumed + len > self.capacity {
                break ScanEnd::BadGeometry;
            }
            let payload = reader
                .read(
                    &self.file,
                    pos + RECORD_HEADER_LEN_BYTES,
                    h.payload_len as usize,
                )
                .map_err(self.io("read of the ring"))?;
            if crc32fast::hash(payload) != h.payload_crc {
                break ScanEnd::BadPayload { lsn: h.lsn };
            }
            self.index.push_back(RecordInfo {
                lsn: h.lsn,
                fields: h.fields,
                payload_len: h.payload_len,
                payload_crc: h.payload_crc,
                epoch: h.epoch,
                position: pos,
            });
            last_epoch = h.epoch;
            consumed += len;
            pos += len;
            expected = Lsn(expected.0 + 1);
        };
        self.scan_end = Some(end);
        // The tail goes right after the last record kept (a wrap padding after
        // it, if any, is written again when needed).
        self.tail = match self.index.back() {
            Some(last) => (last.position + last.len_bytes()) % self.capacity,
            None => self.head_pos,
        };
        self.next_lsn = expected;
        self.written_lsn = Lsn(expected.0 - 1);
        self.durable_lsn = Lsn(expected.0 - 1);
        self.pending_pos = self.tail;
        self.pending_first_lsn = expected;
        self.used = self.used_from_head();
        Ok(())
    }

    /// Bytes from the head to the tail, while the head is the durable one.
    /// Equal positions mean empty, or exactly full when records are live.
    fn used_from_head(&self) -> u64 {
        debug_assert_eq!(self.head_lsn, self.durable_head_lsn);
        if self.tail == self.head_pos {
            if self.index.is_empty() {
                0
            } else {
                self.capacity
            }
        } else {
            (self.tail + self.capacity - self.head_pos) % self.capacity
        }
    }

    /// What ended the recovery scan at open (`None` for a journal created by this handle).
    pub fn scan_end(&self) -> Option<&ScanEnd> {
        self.scan_end.as_ref()
    }

    pub fn identity(&self) -> JournalIdentity {
        self.identity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file underneath (a simulator inspects a `SimFile` through it).
    pub fn file(&self) -> &F {
        &self.file
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Ring capacity.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Bytes taken: from the durable head to the tail, wrap padding and
    /// released-but-not-persisted records included.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// Bytes an append may take now (a record that would cross the ring's
    /// end also needs the padding to it).
    pub fn free_bytes(&self) -> u64 {
        self.capacity - self.used
    }

    /// The live records, oldest first, from memory (no I/O).
    pub fn records(&self) -> impl ExactSizeIterator<Item = &RecordInfo> + '_ {
        self.index.iter()
    }

    /// The live record `lsn`, if it is live.
    pub fn record(&self, lsn: Lsn) -> Option<&RecordInfo> {
        let first = self.index.front()?.lsn;
        let i = lsn.0.checked_sub(first.0)?;
        self.index.get(usize::try_from(i).ok()?)
    }

    /// The oldest live LSN (the next one if none is live).
    pub fn head_lsn(&self) -> Lsn {
        self.head_lsn
    }

    /// The LSN the next append gets.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// Every record through this LSN is durable (0: none yet).
    pub fn durable_lsn(&self) -> Lsn {
        self.durable_lsn
    }

    /// Current epoch (bumped by every open and truncation).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    fn check_writable(&self) -> Result<(), JournalError> {
        if self.poisoned {
            Err(JournalError::Poisoned {
                kind: self.identity.kind,
                path: self.path.clone(),
            })
        } else {
            Ok(())
        }
    }

    fn poison(&mut self, op: &'static str) -> impl FnOnce(io::Error) -> JournalError + use<F> {
        self.poisoned = true;
        self.io(op)
    }

    /// Append a record (buffered: not durable until [`sync`](Self::sync)).
    /// Returns its LSN, or [`JournalError::Full`] with the bytes it needs
    /// (its own, plus the padding to the ring's end if it must wrap) and the
    /// bytes free; [`JournalError::RecordTooLarge`] if it could never fit.
    /// Nothing changes on an error.
    pub fn append(&mut self, fields: RecordFields, payload: &[u8]) -> Result<Lsn, JournalError> {
        self.check_writable()?;
        let kind = self.identity.kind;
        let len = record_len_bytes(payload.len() as u64);
        if payload.len() as u64 > PAYLOAD_MAX_BYTES || len > self.capacity {
            return Err(JournalError::RecordTooLarge {
                kind,
                record_bytes: len,
                capacity_bytes: self.capacity,
            });
        }
        let to_end = self.capacity - self.tail;
        let wrap = len > to_end;
        let needed = if wrap { to_end + len } else { len };
        if needed > self.free_bytes() {
            return Err(JournalError::Full {
                kind,
                needed_bytes: needed,
                free_bytes: self.free_bytes(),
            });
        }
        let lsn = self.next_lsn;
        if wrap {
            let pad = RecordHeader {
                wrap: true,
                lsn,
                epoch: self.epoch,
                fields: RecordFields::default(),
                payload_len: 0,
                payload_crc: crc32fast::hash(&[]),
            };
            self.push_pending(self.tail, &pad.encode(), &[]);
            self.used += to_end;
            self.tail = 0;
            // A run in the buffer never crosses the ring's end.
            self.write_pending()?;
        }
        let payload_len = u32::try_from(payload.len()).expect("bounded above");
        let header = RecordHeader {
            wrap: false,
            lsn,
            epoch: self.epoch,
            fields,
            payload_len,
            payload_crc: crc32fast::hash(payload),
        };
        let position = self.tail;
        self.push_pending(position, &header.encode(), payload);
        self.index.push_back(RecordInfo {
            lsn,
            fields,
            payload_len,
            payload_crc: header.payload_crc,
            epoch: self.epoch,
            position,
        });
        self.tail = (self.tail + len) % self.capacity;
        self.used += len;
        self.next_lsn = Lsn(lsn.0 + 1);
        if self.pending.len() >= PENDING_BYTES_MAX || self.tail == 0 {
            self.write_pending()?;
        }
        Ok(lsn)
    }

    /// Add a header and payload at ring position `pos` to the buffer,
    /// padded to the record alignment.
    fn push_pending(&mut self, pos: u64, header: &[u8], payload: &[u8]) {
        if self.pending.is_empty() {
            self.pending_pos = pos;
        }
        debug_assert_eq!(self.pending_pos + self.pending.len() as u64, pos);
        self.pending.extend_from_slice(header);
        self.pending.extend_from_slice(payload);
        let padded = align_up(self.pending.len() as u64) as usize;
        self.pending.resize(padded, 0);
    }

    /// Write the buffer (no fdatasync).
    fn write_pending(&mut self) -> Result<(), JournalError> {
        if self.pending.is_empty() {
            self.pending_first_lsn = self.next_lsn;
            return Ok(());
        }
        let offset = RING_OFFSET_BYTES + self.pending_pos;
        let result = self.file.write_all_at(&self.pending, offset);
        if let Err(e) = result {
            return Err(self.poison("ring write")(e));
        }
        self.unsynced = true;
        self.pending.clear();
        self.written_lsn = Lsn(self.next_lsn.0 - 1);
        self.pending_first_lsn = self.next_lsn;
        Ok(())
    }

    /// Write the buffered appends to the file without fdatasync: they then
    /// survive a crash of the process (kill -9) but not a power loss, and
    /// reads of them no longer come from memory.
    pub fn write_buffered(&mut self) -> Result<(), JournalError> {
        self.check_writable()?;
        self.write_pending()
    }

    /// Make every appended record durable: write the buffer, fdatasync.
    /// Returns the LSN through which the log is now durable.
    pub fn sync(&mut self) -> Result<Lsn, JournalError> {
        self.check_writable()?;
        self.write_pending()?;
        if self.unsynced {
            if let Err(e) = self.file.sync_data() {
                return Err(self.poison("fdatasync of the ring")(e));
            }
            self.unsynced = false;
        }
        self.durable_lsn = self.written_lsn;
        Ok(self.durable_lsn)
    }

    /// Read record `lsn`'s payload into `buf` (replacing its contents) and
    /// check it against its checksum. From the buffer if not yet written.
    pub fn read_payload_into(&self, lsn: Lsn, buf: &mut Vec<u8>) -> Result<(), JournalError> {
        let kind = self.identity.kind;
        let info = *self.record(lsn).ok_or(JournalError::NotLive {
            kind,
            lsn,
            first: self.head_lsn,
            last: Lsn(self.next_lsn.0 - 1),
        })?;
        let len = info.payload_len as usize;
        buf.clear();
        if lsn >= self.pending_first_lsn && !self.pending.is_empty() {
            let start = (info.position - self.pending_pos) as usize + REC_HDR;
            buf.extend_from_slice(&self.pending[start..start + len]);
        } else {
            buf.resize(len, 0);
            let offset = RING_OFFSET_BYTES + info.position + RECORD_HEADER_LEN_BYTES;
            let mut filled = 0;
            while filled < len {
                let n = self
                    .file
                    .read_at(&mut buf[filled..], offset + filled as u64)
                    .map_err(self.io("read of a payload"))?;
                if n == 0 {
                    return Err(self.io("read of a payload")(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the ring ends inside a record",
                    )));
                }
                filled += n;
            }
        }
        let computed = crc32fast::hash(buf);
        if computed != info.payload_crc {
            return Err(JournalError::PayloadCorrupt {
                kind,
                path: self.path.clone(),
                lsn,
                stored: info.payload_crc,
                computed,
            });
        }
        Ok(())
    }

    /// Record `lsn`'s payload (see [`read_payload_into`](Self::read_payload_into)).
    pub fn read_payload(&self, lsn: Lsn) -> Result<Vec<u8>, JournalError> {
        let mut buf = Vec::new();
        self.read_payload_into(lsn, &mut buf)?;
        Ok(buf)
    }

    /// Drop the records through `lsn` from the live set (in memory). Their
    /// space becomes free, and the drop survives a restart, only after
    /// [`persist_head`](Self::persist_head). Releasing an LSN already
    /// released does nothing; panics beyond the last appended one (a caller bug).
    pub fn release_through(&mut self, lsn: Lsn) {
        assert!(
            lsn < self.next_lsn,
            "release through {lsn}, but the last record is {}",
            self.next_lsn.0 - 1
        );
        while self.index.front().is_some_and(|r| r.lsn <= lsn) {
            self.index.pop_front();
        }
        if lsn >= self.head_lsn {
            self.head_lsn = Lsn(lsn.0 + 1);
            self.head_pos = self.index.front().map_or(self.tail, |r| r.position);
        }
    }

    /// Write a header naming the current head and fdatasync: released
    /// records stay released after a crash and their space is free.
    pub fn persist_head(&mut self) -> Result<(), JournalError> {
        self.check_writable()?;
        if self.durable_head_lsn == self.head_lsn {
            return Ok(());
        }
        self.write_header()
    }

    /// Durably drop every record after `lsn` (`lsn` = head − 1 drops all):
    /// the records kept are made durable, then a header with a new epoch
    /// starting at `lsn + 1` is written and synced. The next append gets
    /// LSN `lsn + 1` and goes where record `lsn + 1` was. Panics if `lsn` is
    /// before the head − 1 or after the last appended record (a caller bug).
    pub fn truncate_after(&mut self, lsn: Lsn) -> Result<(), JournalError> {
        self.check_writable()?;
        assert!(
            lsn.0 + 1 >= self.head_lsn.0 && lsn < self.next_lsn,
            "truncate after {lsn}: live records are {} to {}",
            self.head_lsn,
            self.next_lsn.0 - 1
        );
        // Records kept must be durable before the header says the log ends at them.
        self.sync()?;
        while self.index.back().is_some_and(|r| r.lsn > lsn) {
            self.index.pop_back();
        }
        self.tail = match self.index.back() {
            Some(last) => (last.position + last.len_bytes()) % self.capacity,
            None => self.head_pos,
        };
        self.next_lsn = Lsn(lsn.0 + 1);
        self.written_lsn = lsn.min(self.written_lsn);
        self.durable_lsn = lsn.min(self.durable_lsn);
        self.pending_pos = self.tail;
        self.pending_first_lsn = self.next_lsn;
        self.start_epoch()
    }

    /// Bytes the live records take laid end to end from the ring's start (no
    /// wrap padding): the smallest ring they can be copied into.
    pub fn live_bytes(&self) -> u64 {
        self.index.iter().map(RecordInfo::len_bytes).sum()
    }

    /// Copy the live records, in order, with their LSNs, fields and payloads
    /// (each checked against its checksum), into `dest`, a journal just
    /// created and still empty, and make them durable there. `dest` takes the
    /// head LSN and a newer epoch starting at it, so its header accepts exactly
    /// the records copied (they carry that epoch). `dest` must hold at least
    /// [`live_bytes`](Self::live_bytes).
    pub fn copy_live_into<G: DurableFile>(
        &self,
        dest: &mut Journal<G>,
    ) -> Result<(), JournalError> {
        assert!(
            dest.next_lsn == Lsn(1) && dest.index.is_empty() && dest.pending.is_empty(),
            "copy into a journal that is not new"
        );
        let head = self.head_lsn;
        dest.epoch = self
            .epoch
            .checked_add(1)
            .expect("journal epoch overflow (4 billion opens and truncations)");
        dest.epoch_start = head;
        dest.head_lsn = head;
        dest.durable_head_lsn = head;
        dest.next_lsn = head;
        dest.pending_first_lsn = head;
        dest.written_lsn = Lsn(head.0 - 1);
        dest.durable_lsn = Lsn(head.0 - 1);
        let mut buf = Vec::new();
        for info in &self.index {
            self.read_payload_into(info.lsn, &mut buf)?;
            let lsn = dest.append(info.fields, &buf)?;
            debug_assert_eq!(lsn, info.lsn);
        }
        dest.sync()?;
        // Both slots name the head and the epoch: a header torn later falls
        // back to a twin that says the same.
        dest.write_header()?;
        dest.write_header()
    }

    /// Bump the epoch from the next LSN and make it durable with the current head.
    fn start_epoch(&mut self) -> Result<(), JournalError> {
        self.epoch = self
            .epoch
            .checked_add(1)
            .expect("journal epoch overflow (4 billion opens and truncations)");
        self.epoch_start = self.next_lsn;
        self.write_header()
    }

    /// Write the header (current head and epoch) to the older slot, fdatasync.
    fn write_header(&mut self) -> Result<(), JournalError> {
        self.check_writable()?;
        let target = 1 - self.current_slot;
        let header = JournalHeader {
            identity: self.identity,
            header_seq: self.header_seq + 1,
            epoch: self.epoch,
            capacity_bytes: self.capacity,
            head_lsn: self.head_lsn,
            head_position: self.head_pos,
            epoch_start_lsn: self.epoch_start,
        };
        let result = self
            .file
            .write_all_at(&header.encode(), HEADER_SLOT_OFFSETS[target])
            .and_then(|()| self.file.sync_data());
        if let Err(e) = result {
            return Err(self.poison("header write")(e));
        }
        // The header sync also made every record written so far durable.
        self.unsynced = false;
        self.durable_lsn = self.written_lsn;
        self.current_slot = target;
        self.header_seq += 1;
        self.durable_head_lsn = self.head_lsn;
        self.durable_head_pos = self.head_pos;
        self.used = self.used_from_head();
        Ok(())
    }
}

/// Sequential reads of the ring for the recovery scan, a chunk at a time.
struct RingReader {
    capacity: u64,
    buf: Vec<u8>,
    /// Ring position of `buf[0]`.
    start: u64,
}

impl RingReader {
    fn new(capacity: u64) -> Self {
        RingReader {
            capacity,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// `len` bytes at ring position `pos` (the caller keeps `pos + len` within the ring).
    fn read(&mut self, file: &impl DurableFile, pos: u64, len: usize) -> io::Result<&[u8]> {
        debug_assert!(pos + len as u64 <= self.capacity);
        let have = pos >= self.start && pos + len as u64 <= self.start + self.buf.len() as u64;
        if !have {
            let want = (len.max(SCAN_CHUNK_BYTES) as u64).min(self.capacity - pos) as usize;
            self.buf = file.read_at_most(RING_OFFSET_BYTES + pos, want)?;
            self.start = pos;
            if self.buf.len() < len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the journal file ends inside its ring",
                ));
            }
        }
        let at = (pos - self.start) as usize;
        Ok(&self.buf[at..at + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_layout_matches_the_doc() {
        let h = RecordHeader {
            wrap: false,
            lsn: Lsn(0x0102_0304_0506_0708),
            epoch: 9,
            fields: RecordFields {
                kind: 3,
                flags: 0x80,
                seq: 77,
                offset_bytes: 4096 * 5,
                len_bytes: 8192,
                at_ms: 1_700_000_000_123,
            },
            payload_len: 8192,
            payload_crc: 0xDEAD_BEEF,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], b"TJRC");
        assert_eq!((b[4], b[5], b[6], b[7]), (1, 3, 0x80, 0));
        assert_eq!(u64_at(&b, 8), 0x0102_0304_0506_0708);
        assert_eq!(u64_at(&b, 16), 77);
        assert_eq!(u64_at(&b, 24), 4096 * 5);
        assert_eq!(u64_at(&b, 32), 8192);
        assert_eq!(u64_at(&b, 40), 1_700_000_000_123);
        assert_eq!(u32_at(&b, 48), 9);
        assert_eq!(u32_at(&b, 52), 8192);
        assert_eq!(u32_at(&b, 56), 0xDEAD_BEEF);
        assert_eq!(u32_at(&b, 60), crc32fast::hash(&b[..60]));
        assert_eq!(RecordHeader::decode(&b), Ok(h));
        let mut torn = b;
        torn[20] ^= 1;
        assert_eq!(RecordHeader::decode(&torn), Err(RecordFault::BadCrc));
        assert_eq!(RecordHeader::decode(&[0; 64]), Err(RecordFault::Zeroed));
        assert_eq!(RecordHeader::decode(&[7; 64]), Err(RecordFault::BadMagic));
    }

    /// `create_written` writes the whole ring (no unwritten extent is left for
    /// a durable append to convert): the filesystem reports data, no hole, from
    /// the ring's start to the end of the file; the ring reads as zeros and the
    /// journal reopens empty.
    #[test]
    fn a_written_journal_has_its_whole_ring_written_with_zeros() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let identity = JournalIdentity {
            kind: JournalKind::Redo,
            volume_id: VolumeId([3; 16]),
            block_size: 4096,
        };
        const RING: u64 = 4 << 20;
        let j = Journal::create_written(&path, identity, RING).expect("create");
        let fd = j.file.as_raw_fd();
        let at = |whence| unsafe { libc::lseek(fd, RING_OFFSET_BYTES as libc::off_t, whence) };
        assert_eq!(at(libc::SEEK_DATA), RING_OFFSET_BYTES as libc::off_t);
        assert_eq!(
            at(libc::SEEK_HOLE),
            (RING_OFFSET_BYTES + RING) as libc::off_t
        );
        drop(j);
        let ring = std::fs::read(&path).expect("read");
        assert_eq!(ring.len() as u64, RING_OFFSET_BYTES + RING);
        assert!(ring[RING_OFFSET_BYTES as usize..].iter().all(|&b| b == 0));
        let j = Journal::open(&path, identity).expect("reopen");
        assert_eq!(j.records().count(), 0);
    }

    #[test]
    fn header_slot_layout_matches_the_doc() {
        let h = JournalHeader {
            identity: JournalIdentity {
                kind: JournalKind::Redo,
                volume_id: VolumeId([5; 16]),
                block_size: 4096,
            },
            header_seq: 12,
            epoch: 3,
            capacity_bytes: 1 << 30,
            head_lsn: Lsn(1000),
            head_position: 64 * 7,
            epoch_start_lsn: Lsn(1200),
        };
        let b = h.encode();
        assert_eq!(&b[0..8], b"TANDEMJH");
        assert_eq!(u32_at(&b, 8), 1);
        assert_eq!(b[12], 2);
        assert_eq!(u64_at(&b, 16), 12);
        assert_eq!(&b[24..40], &[5; 16]);
        assert_eq!(u32_at(&b, 40), 4096);
        assert_eq!(u32_at(&b, 44), 3);
        assert_eq!(u64_at(&b, 48), 1 << 30);
        assert_eq!(u64_at(&b, 56), 1000);
        assert_eq!(u64_at(&b, 64), 448);
        assert_eq!(u64_at(&b, 72), 1200);
        assert_eq!(u32_at(&b, 4092), crc32fast::hash(&b[..4092]));
        assert_eq!(JournalHeader::decode(&b), Ok(h));
        let reseal = |mut b: Vec<u8>| {
            let crc = crc32fast::hash(&b[..4092]);
            b[4092..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut v = b.clone();
        v[8] = 2;
        assert_eq!(
            JournalHeader::decode(&reseal(v)),
            Err(HeaderFault::UnsupportedVersion { found: 2 })
        );
        let mut v = b.clone();
        v[64] = 1; // head position not 64-aligned
        assert!(matches!(
            JournalHeader::decode(&reseal(v)),
            Err(HeaderFault::BadField {
                field: "head position",
                ..
            })
        ));
        let mut v = b;
        v[12] = 9;
        assert!(matches!(
            JournalHeader::decode(&reseal(v)),
            Err(HeaderFault::BadField { field: "kind", .. })
        ));
    }

    #[test]
    fn an_index_entry_is_small() {
        assert_eq!(std::mem::size_of::<RecordInfo>(), 72);
    }

    #[test]
    fn record_sizes_are_64_byte_aligned() {
        assert_eq!(record_len_bytes(0), 64);
        assert_eq!(record_len_bytes(1), 128);
        assert_eq!(record_len_bytes(4096), 4160);
        assert_eq!(record_len_bytes(4096 - 64), 4096);
    }
}
