//! Named checkpoints: for each, the blocks clients changed since it was
//! created, served to NBD clients as `qemu:dirty-bitmap:NAME` so that an
//! incremental backup copies only what changed (`tandem checkpoint create|list|
//! remove NAME --control SOCK`).
//!
//! Owns: the in-memory change maps, marking them on every client write,
//! write-zeroes and trim (before the data is issued), and their persistence in
//! `META.checkpoints` beside the volume's metadata. Does not own the data path
//! (the primary's export calls [`CheckpointStore::mark`]) nor the NBD protocol.
//!
//! # Never miss a changed block
//!
//! A map may over-approximate (report a block changed that was not), never
//! under-approximate: a backup built on a missed block is silently wrong.
//!
//! - Maps are exact in memory and persisted whole on a clean stop (the header's
//!   clean flag), every [`PERSIST_INTERVAL_S`] seconds while they change, and at
//!   every create/remove.
//! - Between persists, a *write-intent* record (like DRBD's activity log, §4 of
//!   ARCHITECTURE.md) covers what the file does not: the volume is cut into
//!   [`HOT_EXTENT_BYTES`] extents, and before the first write to an extent that is
//!   not yet *hot* the extent is recorded durably (one small write + fdatasync,
//!   batched with concurrent activations). A full persist empties the record.
//! - After an unclean stop (kill -9, power loss), every hot extent is marked in
//!   every map. The data of a write can reach the disk (page cache writeback) at
//!   any moment after it is issued, so the record is durable before the write is
//!   issued: any block that may differ is either in the persisted maps or in a
//!   hot extent.
//! - If this node was a secondary in between (its peer wrote, and those writes
//!   were never marked here), or the volume's metadata was recreated (another
//!   volume id), every map is marked whole.
//! - A checkpoint created while writes are in flight includes their ranges (a
//!   backup started after the create may read the old contents of a block whose
//!   write completes later).
//!
//! - If the write-intent record cannot be made durable (an I/O error on the
//!   metadata's filesystem), the client's write fails with EIO rather than go
//!   unrecorded. The record is rewritten in place, so a full filesystem does not
//!   cause this; only the periodic full persist needs new space (its failure is
//!   logged and retried, the record keeps covering the changes).
//!
//! `checkpoint list` says which maps were over-approximated this way, when and
//! why, and how many bytes they mark. Maps are run lists (O(changed runs) in
//! memory and on disk, not O(volume)); past [`RUNS_MAX`] runs, runs closer than
//! a growing gap are merged (another over-approximation, also listed).
//!
//! # File format (`META.checkpoints`), all integers little-endian
//!
//! ```text
//! header, 4096 bytes at offset 0
//! offset len  field
//! 0      8    magic "TNDMCKPT"
//! 8      4    format version (1)
//! 12     4    flags: bit0 clean (written by a clean stop: the maps are exact);
//!             other bits 0
//! 16     8    file sequence number (+1 per full persist)
//! 24     8    volume size in bytes
//! 32     4    block size in bytes (the unit of the maps)
//! 36     4    reserved, 0
//! 40     8    hot extent size in bytes
//! 48     16   volume id (UUID) of the volume the maps belong to
//! 64     4    number of checkpoints
//! 68     4    crc32 of the records area
//! 72     8    length of the records area in bytes
//! 80     4012 reserved, 0
//! 4092   4    crc32 (crc32fast) of bytes 0..4092
//!
//! write-intent slots A and B, INTENT_SLOT_LEN (32768) bytes each, at 4096 and 36864
//! 0      8    magic "TNDMINTN"
//! 8      8    file sequence number (must equal the header's)
//! 16     8    intent sequence (the valid slot with the higher one is current)
//! 24     4    number of hot extents n (at most 4091)
//! 28     4    reserved, 0
//! 32     8n   hot extent indexes (extent i covers bytes i×hot size ..)
//! ..          zero padding
//! 32764  4    crc32 of bytes 0..32764 of the slot
//!
//! records area at 69632, one record per checkpoint
//! 0      2    name length L (1..=128)
//! 2      L    name (ASCII letters, digits, '.', '_', '-')
//! 2+L    8    created (unix seconds)
//! +8     8    merge gap in blocks (0: exact runs; g: runs closer than g were merged)
//! +8     1    over-approximation: 0 none, 1 unclean stop (hot extents marked),
//!             2 the node was a secondary or its metadata was recreated (all
//!             marked), 3 unclean stop without a readable intent record (all marked)
//! +1     8    when that was recorded (unix seconds; 0 if none)
//! +8     8    number of runs m
//! +8     16m  runs: first block, block count (sorted, disjoint, not touching)
//! ```
//!
//! Magic and version first so any reader can tell what the bytes are; the
//! header has its own checksum and records their own, so a torn write is
//! detected; the intent slots alternate so a torn slot leaves the previous one
//! (whose write it guarded was never issued). A full persist writes a new file
//! beside the old one, fsyncs it and renames it over (then fsyncs the directory).

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent::control::{ControlReply, ControlRequest};
use crate::frontend::{Extent, STATE_DIRTY};
use crate::types::VolumeId;

/// Write-intent granularity: the first write to each such extent after a
/// persist costs one small durable write; after a crash whole extents are marked.
pub const HOT_EXTENT_BYTES: u64 = 64 << 20;
/// Maps are persisted whole this often while they change (bounds how much a
/// crash over-approximates: extents first written in the last minute or so).
pub const PERSIST_INTERVAL_S: u64 = 60;
/// Runs a map keeps before merging neighbours (16 MiB on disk at most).
pub const RUNS_MAX: usize = 1 << 20;
/// Checkpoints per volume.
pub const CHECKPOINTS_MAX: usize = 64;
/// Longest checkpoint name.
pub const NAME_MAX_BYTES: usize = 128;

const MAGIC: [u8; 8] = *b"TNDMCKPT";
const INTENT_MAGIC: [u8; 8] = *b"TNDMINTN";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 4096;
const INTENT_SLOT_LEN: usize = 32 * 1024;
const INTENT_HEADER_LEN: usize = 32;
/// Hot extents one intent slot holds; more force a full persist first.
const INTENT_EXTENTS_MAX: usize = (INTENT_SLOT_LEN - INTENT_HEADER_LEN - 4) / 8;
const RECORDS_OFFSET: u64 = (HEADER_LEN + 2 * INTENT_SLOT_LEN) as u64;
const FLAG_CLEAN: u32 = 1;

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint file {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "checkpoint file {} belongs to a volume of {file_bytes} bytes in {file_block} byte blocks, this volume has {volume_bytes} bytes in {volume_block} byte blocks; remove the file (its checkpoints are lost) or use the right --meta",
        path.display()
    )]
    VolumeMismatch {
        path: PathBuf,
        file_bytes: u64,
        file_block: u32,
        volume_bytes: u64,
        volume_block: u32,
    },
    #[error(
        "invalid checkpoint name {name:?}: use 1 to {NAME_MAX_BYTES} ASCII letters, digits, '.', '_' or '-'"
    )]
    BadName { name: String },
    #[error("checkpoint {name:?} already exists; remove it first or pick another name")]
    Exists { name: String },
    #[error("no checkpoint named {name:?}; `tandem checkpoint list` shows the existing ones")]
    Unknown { name: String },
    #[error("at most {CHECKPOINTS_MAX} checkpoints per volume; remove one first")]
    TooMany,
}

/// Why a map over-approximates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recovery {
    /// The agent stopped uncleanly: extents written since the last persist were marked whole.
    UncleanStop,
    /// This node was a secondary in between, or its metadata was recreated:
    /// everything was marked.
    WrittenElsewhere,
    /// Unclean stop and the write-intent record was unreadable: everything was marked.
    UncleanStopNoIntent,
}

impl Recovery {
    fn code(self) -> u8 {
        match self {
            Recovery::UncleanStop => 1,
            Recovery::WrittenElsewhere => 2,
            Recovery::UncleanStopNoIntent => 3,
        }
    }

    fn from_code(c: u8) -> Option<Option<Recovery>> {
        match c {
            0 => Some(None),
            1 => Some(Some(Recovery::UncleanStop)),
            2 => Some(Some(Recovery::WrittenElsewhere)),
            3 => Some(Some(Recovery::UncleanStopNoIntent)),
            _ => None,
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Recovery::UncleanStop => {
                "the agent stopped uncleanly; every 64 MiB extent written since the last persist is marked changed"
            }
            Recovery::WrittenElsewhere => {
                "this node was a secondary for a while (its peer wrote), or its metadata was recreated; every block is marked changed"
            }
            Recovery::UncleanStopNoIntent => {
                "the agent stopped uncleanly and its write-intent record was unreadable; every block is marked changed"
            }
        }
    }
}

/// Sorted, disjoint, non-touching runs of blocks `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSet {
    runs: BTreeMap<u64, u64>,
}

impl RunSet {
    /// Add `[a, b)`, merging with every run it overlaps or touches.
    pub fn insert(&mut self, mut a: u64, mut b: u64) {
        if a >= b {
            return;
        }
        let touching: Vec<u64> = self
            .runs
            .range(..=b)
            .rev()
            .take_while(|(_, end)| **end >= a)
            .map(|(start, _)| *start)
            .collect();
        for start in touching {
            let end = self.runs.remove(&start).expect("collected above");
            a = a.min(start);
            b = b.max(end);
        }
        self.runs.insert(a, b);
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Blocks covered.
    pub fn blocks(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(s, e)| (*s, *e))
    }

    pub fn contains(&self, block: u64) -> bool {
        self.runs
            .range(..=block)
            .next_back()
            .is_some_and(|(_, end)| *end > block)
    }

    /// Merge runs separated by gaps of at most `gap` blocks.
    fn merge_gaps(&mut self, gap: u64) {
        let mut merged: BTreeMap<u64, u64> = BTreeMap::new();
        let mut current: Option<(u64, u64)> = None;
        for (s, e) in self.iter() {
            current = match current {
                Some((cs, ce)) if s - ce <= gap => Some((cs, e)),
                Some(run) => {
                    merged.insert(run.0, run.1);
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((s, e)) = current {
            merged.insert(s, e);
        }
        self.runs = merged;
    }
}

/// One checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Checkpoint {
    created_unix_s: u64,
    runs: RunSet,
    /// 0: exact; g: runs closer than g blocks were merged.
    merge_gap_blocks: u64,
    recovery: Option<(Recovery, u64)>,
}

/// What `checkpoint list` shows of a checkpoint (stable JSON field names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub name: String,
    pub created_unix_s: u64,
    /// Bytes marked changed since the checkpoint was created.
    pub changed_bytes: u64,
    /// The NBD metadata context that serves the map.
    pub context: String,
    /// "exact", or "over-approximated" (see `reason`): the map may mark blocks
    /// that did not change, never the other way round.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_approximated_since_unix_s: Option<u64>,
}

struct State {
    checkpoints: BTreeMap<String, Checkpoint>,
    /// Extents recorded durably as possibly written since the last full persist.
    hot: std::collections::BTreeSet<u64>,
    /// Block ranges of writes issued and not yet completed.
    inflight: HashMap<u64, (u64, u64)>,
    next_inflight: u64,
    /// Maps changed since the last full persist.
    dirty: bool,
    /// Sequence numbers of the file on disk and of its newest intent slot.
    file_seq: u64,
    intent_seq: u64,
    /// Whether the file exists (nothing is written until the first checkpoint).
    file_exists: bool,
}

/// The checkpoints of one volume.
pub struct CheckpointStore {
    path: PathBuf,
    /// The volume's size; grows with `tandem resize` (ha, issue 12).
    size_bytes: std::sync::atomic::AtomicU64,
    block_size: u32,
    volume_id: VolumeId,
    state: Mutex<State>,
    /// Serialises writes to the file (full persists and intent records).
    file: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `META.checkpoints` for the metadata file `META`.
pub fn path_for(meta: &Path) -> PathBuf {
    let mut p = meta.as_os_str().to_owned();
    p.push(".checkpoints");
    PathBuf::from(p)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What a checkpoint file holds.
#[derive(Debug, PartialEq, Eq)]
struct FileImage {
    clean: bool,
    file_seq: u64,
    size_bytes: u64,
    block_size: u32,
    hot_extent_bytes: u64,
    volume_id: VolumeId,
    checkpoints: BTreeMap<String, Checkpoint>,
    /// The newest valid intent slot's extents (None: no valid slot).
    hot: Option<Vec<u64>>,
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn encode_records(checkpoints: &BTreeMap<String, Checkpoint>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, c) in checkpoints {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&c.created_unix_s.to_le_bytes());
        out.extend_from_slice(&c.merge_gap_blocks.to_le_bytes());
        let (code, at) = c.recovery.map_or((0, 0), |(r, at)| (r.code(), at));
        out.push(code);
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&(c.runs.len() as u64).to_le_bytes());
        for (s, e) in c.runs.iter() {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&(e - s).to_le_bytes());
        }
    }
    out
}

fn encode_header(img: &FileImage, records: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(if img.clean { FLAG_CLEAN } else { 0 }).to_le_bytes());
    h[16..24].copy_from_slice(&img.file_seq.to_le_bytes());
    h[24..32].copy_from_slice(&img.size_bytes.to_le_bytes());
    h[32..36].copy_from_slice(&img.block_size.to_le_bytes());
    h[40..48].copy_from_slice(&img.hot_extent_bytes.to_le_bytes());
    h[48..64].copy_from_slice(&img.volume_id.0);
    h[64..68].copy_from_slice(&(img.checkpoints.len() as u32).to_le_bytes());
    h[68..72].copy_from_slice(&crc(records).to_le_bytes());
    h[72..80].copy_from_slice(&(records.len() as u64).to_le_bytes());
    let c = crc(&h[..HEADER_LEN - 4]);
    h[HEADER_LEN - 4..].copy_from_slice(&c.to_le_bytes());
    h
}

fn encode_intent_slot(file_seq: u64, intent_seq: u64, hot: &[u64]) -> Vec<u8> {
    assert!(hot.len() <= INTENT_EXTENTS_MAX, "intent slot overflow");
    let mut s = vec![0u8; INTENT_SLOT_LEN];
    s[0..8].copy_from_slice(&INTENT_MAGIC);
    s[8..16].copy_from_slice(&file_seq.to_le_bytes());
    s[16..24].copy_from_slice(&intent_seq.to_le_bytes());
    s[24..28].copy_from_slice(&(hot.len() as u32).to_le_bytes());
    for (i, e) in hot.iter().enumerate() {
        let at = INTENT_HEADER_LEN + 8 * i;
        s[at..at + 8].copy_from_slice(&e.to_le_bytes());
    }
    let c = crc(&s[..INTENT_SLOT_LEN - 4]);
    s[INTENT_SLOT_LEN - 4..].copy_from_slice(&c.to_le_bytes());
    s
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}
fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// A slot's (intent sequence, extents), if it is valid for `file_seq`.
fn decode_intent_slot(s: &[u8], file_seq: u64) -> Option<(u64, Vec<u64>)> {
    if s.len() != INTENT_SLOT_LEN
        || s[0..8] != INTENT_MAGIC
        || crc(&s[..INTENT_SLOT_LEN - 4]) != le_u32(&s[INTENT_SLOT_LEN - 4..])
        || le_u64(&s[8..16]) != file_seq
    {
        return None;
    }
    let n = le_u32(&s[24..28]) as usize;
    if n > INTENT_EXTENTS_MAX {
        return None;
    }
    let hot = (0..n)
        .map(|i| le_u64(&s[INTENT_HEADER_LEN + 8 * i..]))
        .collect();
    Some((le_u64(&s[16..24]), hot))
}

/// Why a file did not decode (it is then moved aside, never trusted).
fn decode_file(bytes: &[u8]) -> Result<FileImage, &'static str> {
    if bytes.len() < RECORDS_OFFSET as usize {
        return Err("shorter than its fixed part");
    }
    let h = &bytes[..HEADER_LEN];
    if h[0..8] != MAGIC {
        return Err("bad magic");
    }
    if crc(&h[..HEADER_LEN - 4]) != le_u32(&h[HEADER_LEN - 4..]) {
        return Err("header checksum mismatch");
    }
    if le_u32(&h[8..12]) != VERSION {
        return Err("unknown format version");
    }
    let flags = le_u32(&h[12..16]);
    if flags & !FLAG_CLEAN != 0 {
        return Err("unknown flags");
    }
    let file_seq = le_u64(&h[16..24]);
    let count = le_u32(&h[64..68]) as usize;
    let records_crc = le_u32(&h[68..72]);
    let records_len = le_u64(&h[72..80]);
    let records = bytes
        .get(RECORDS_OFFSET as usize..)
        .filter(|r| r.len() as u64 == records_len)
        .ok_or("records area length mismatch")?;
    if crc(records) != records_crc {
        return Err("records checksum mismatch");
    }
    let mut checkpoints = BTreeMap::new();
    let mut r = records;
    let mut take = |n: usize| -> Result<&[u8], &'static str> {
        if r.len() < n {
            return Err("truncated record");
        }
        let (a, b) = r.split_at(n);
        r = b;
        Ok(a)
    };
    for _ in 0..count {
        let name_len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let name = std::str::from_utf8(take(name_len)?).map_err(|_| "name is not UTF-8")?;
        if !valid_name(name) {
            return Err("invalid checkpoint name");
        }
        let created_unix_s = le_u64(take(8)?);
        let merge_gap_blocks = le_u64(take(8)?);
        let code = take(1)?[0];
        let at = le_u64(take(8)?);
        let recovery = Recovery::from_code(code)
            .ok_or("unknown over-approximation code")?
            .map(|r| (r, at));
        let n = le_u64(take(8)?);
        if n > (RUNS_MAX as u64) * 2 {
            return Err("too many runs");
        }
        let mut runs = RunSet::default();
        let mut last_end = None;
        for _ in 0..n {
            let s = le_u64(take(8)?);
            let len = le_u64(take(8)?);
            let e = s.checked_add(len).ok_or("run overflows")?;
            if len == 0 || last_end.is_some_and(|l| s <= l) {
                return Err("runs out of order");
            }
            last_end = Some(e);
            runs.runs.insert(s, e);
        }
        if checkpoints
            .insert(
                name.to_owned(),
                Checkpoint {
                    created_unix_s,
                    runs,
                    merge_gap_blocks,
                    recovery,
                },
            )
            .is_some()
        {
            return Err("duplicate checkpoint name");
        }
    }
    if !r.is_empty() {
        return Err("trailing bytes after the records");
    }
    let slot = |i: usize| {
        let at = HEADER_LEN + i * INTENT_SLOT_LEN;
        decode_intent_slot(&bytes[at..at + INTENT_SLOT_LEN], file_seq)
    };
    let hot = match (slot(0), slot(1)) {
        (Some(a), Some(b)) => Some(if a.0 >= b.0 { a.1 } else { b.1 }),
        (Some(a), None) | (None, Some(a)) => Some(a.1),
        (None, None) => None,
    };
    Ok(FileImage {
        clean: flags & FLAG_CLEAN != 0,
        file_seq,
        size_bytes: le_u64(&h[24..32]),
        block_size: le_u32(&h[32..36]),
        hot_extent_bytes: le_u64(&h[40..48]),
        volume_id: VolumeId(h[48..64].try_into().expect("16 bytes")),
        checkpoints,
        hot,
    })
}

fn encode_file(img: &FileImage) -> Vec<u8> {
    let records = encode_records(&img.checkpoints);
    let mut out = Vec::with_capacity(RECORDS_OFFSET as usize + records.len());
    out.extend_from_slice(&encode_header(img, &records));
    // Both slots empty and valid for this file: the record starts empty.
    let empty = encode_intent_slot(img.file_seq, 0, &[]);
    out.extend_from_slice(&empty);
    out.extend_from_slice(&empty);
    out.extend_from_slice(&records);
    out
}

/// Marks the blocks of a write in flight; dropped when the write completed.
#[must_use = "hold the mark until the write has completed"]
pub struct Marked {
    store: Arc<CheckpointStore>,
    id: u64,
}

impl Drop for Marked {
    fn drop(&mut self) {
        self.store.lock().inflight.remove(&self.id);
    }
}

impl CheckpointStore {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock; a poisoned lock is a broken
        // invariant, which is a panic by design.
        self.state.lock().expect("checkpoint state poisoned")
    }

    fn io_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
        move |source| CheckpointError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    fn blocks_of(&self, offset: u64, len: u64) -> (u64, u64) {
        let bs = u64::from(self.block_size);
        (offset / bs, offset.saturating_add(len).div_ceil(bs))
    }

    /// Open the checkpoints of the volume whose metadata is `meta`, as the primary
    /// starts serving it. `was_secondary`: the node was a secondary since it last
    /// served as primary (its volume was written by replication, unmarked).
    /// Recovers after an unclean stop (see the module docs) and records the
    /// running state durably before returning.
    pub async fn open(
        meta: &Path,
        size_bytes: u64,
        block_size: u32,
        volume_id: VolumeId,
        was_secondary: bool,
    ) -> Result<Arc<CheckpointStore>, CheckpointError> {
        let path = path_for(meta);
        let store = Arc::new(CheckpointStore {
            path: path.clone(),
            size_bytes: size_bytes.into(),
            block_size,
            volume_id,
            state: Mutex::new(State {
                checkpoints: BTreeMap::new(),
                hot: Default::default(),
                inflight: HashMap::new(),
                next_inflight: 1,
                dirty: false,
                file_seq: 0,
                intent_seq: 0,
                file_exists: false,
            }),
            file: tokio::sync::Mutex::new(()),
        });
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(store),
            Err(e) => return Err(store.io_err("read")(e)),
        };
        let img = match decode_file(&bytes) {
            Ok(img) => img,
            Err(why) => {
                // Never trust a damaged map; keep it for inspection. Backup tools
                // then find no checkpoint and take a full backup: safe.
                let aside = path.with_extension(format!("checkpoints.damaged-{}", unix_now_s()));
                tracing::error!(path = %path.display(), reason = why, moved_to = %aside.display(),
                    "checkpoint file is damaged; its checkpoints are dropped (the next backup must be a full one)");
                std::fs::rename(&path, &aside).map_err(store.io_err("move aside"))?;
                return Ok(store);
            }
        };
        // ha (issue 12): a file of a smaller volume with the same blocks is this
        // volume before an online grow (`tandem resize`) that the file did not
        // record yet: its checkpoints keep their runs, and the grown range counts
        // as changed (writes there may not have been recorded).
        let grown = img.block_size == block_size && img.size_bytes < size_bytes;
        if (img.size_bytes != size_bytes || img.block_size != block_size) && !grown {
            return Err(CheckpointError::VolumeMismatch {
                path,
                file_bytes: img.size_bytes,
                file_block: img.block_size,
                volume_bytes: size_bytes,
                volume_block: block_size,
            });
        }
        let mut checkpoints = img.checkpoints;
        let now = unix_now_s();
        let all_blocks = size_bytes.div_ceil(u64::from(block_size));
        let mark_all = |cps: &mut BTreeMap<String, Checkpoint>, why| {
            for c in cps.values_mut() {
                c.runs.insert(0, all_blocks);
                c.recovery = Some((why, now));
            }
        };
        if grown {
            let old_blocks = img.size_bytes.div_ceil(u64::from(block_size));
            tracing::warn!(
                checkpoints = checkpoints.len(),
                file_bytes = img.size_bytes,
                volume_bytes = size_bytes,
                "the volume grew (tandem resize) since the checkpoints were last saved: every checkpoint marks the grown range changed"
            );
            for c in checkpoints.values_mut() {
                c.runs.insert(old_blocks, all_blocks);
            }
        }
        if was_secondary || img.volume_id != volume_id {
            tracing::warn!(checkpoints = checkpoints.len(), was_secondary, file_volume_id = %img.volume_id, %volume_id,
                "this node was a secondary (or its metadata was recreated) since the checkpoints were last saved; every checkpoint now marks the whole volume changed");
            mark_all(&mut checkpoints, Recovery::WrittenElsewhere);
        } else if !img.clean {
            match img.hot {
                Some(hot) => {
                    let per = img.hot_extent_bytes.max(1) / u64::from(block_size);
                    for c in checkpoints.values_mut() {
                        for e in &hot {
                            c.runs.insert(
                                e.saturating_mul(per),
                                (e + 1).saturating_mul(per).min(all_blocks),
                            );
                        }
                        if !hot.is_empty() {
                            c.recovery = Some((Recovery::UncleanStop, now));
                        }
                    }
                    tracing::warn!(
                        checkpoints = checkpoints.len(),
                        hot_extents = hot.len(),
                        extent_bytes = img.hot_extent_bytes,
                        "previous run stopped uncleanly: the extents written since the checkpoints were last saved are marked changed in every checkpoint"
                    );
                }
                None => {
                    tracing::warn!(
                        checkpoints = checkpoints.len(),
                        "previous run stopped uncleanly and the checkpoint write-intent record is unreadable: every checkpoint now marks the whole volume changed"
                    );
                    mark_all(&mut checkpoints, Recovery::UncleanStopNoIntent);
                }
            }
        }
        {
            let mut st = store.lock();
            st.checkpoints = checkpoints;
            st.file_seq = img.file_seq;
            st.file_exists = true;
            st.dirty = true;
        }
        // The running state: not clean until a clean stop says so.
        store.persist(false).await?;
        Ok(store)
    }

    /// Names of the checkpoints (the `qemu:dirty-bitmap:NAME` contexts).
    /// The volume's size as the checkpoints know it.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// ha (issue 12): the volume grew to `size_bytes` (before the export serves
    /// it): marks and block status cover the new range from now on, and the next
    /// save records the new size.
    /// Every checkpoint counts the grown range as changed: a backup taken at
    /// it had no such range.
    pub fn grow(&self, size_bytes: u64) {
        let old = self
            .size_bytes
            .fetch_max(size_bytes, std::sync::atomic::Ordering::AcqRel);
        if size_bytes <= old {
            return;
        }
        let bs = u64::from(self.block_size);
        let (old_blocks, new_blocks) = (old.div_ceil(bs), size_bytes.div_ceil(bs));
        let mut st = self.lock();
        for c in st.checkpoints.values_mut() {
            c.runs.insert(old_blocks, new_blocks);
        }
        st.dirty = true;
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().checkpoints.keys().cloned().collect()
    }

    /// What `checkpoint list` shows.
    pub fn list(&self) -> Vec<CheckpointInfo> {
        let bs = u64::from(self.block_size);
        self.lock()
            .checkpoints
            .iter()
            .map(|(name, c)| {
                let (state, reason, since) = match (c.recovery, c.merge_gap_blocks) {
                    (Some((r, at)), _) => ("over-approximated", Some(r.explain().to_owned()), Some(at)),
                    (None, 0) => ("exact", None, None),
                    (None, gap) => (
                        "over-approximated",
                        Some(format!(
                            "more than {RUNS_MAX} changed runs: runs closer than {} bytes were merged",
                            gap * bs
                        )),
                        None,
                    ),
                };
                CheckpointInfo {
                    name: name.clone(),
                    created_unix_s: c.created_unix_s,
                    changed_bytes: (c.runs.blocks() * bs).min(self.size_bytes()),
                    context: format!("{}{name}", crate::nbd::proto::CONTEXT_DIRTY_BITMAP_PREFIX),
                    state: state.to_owned(),
                    reason,
                    over_approximated_since_unix_s: since,
                }
            })
            .collect()
    }

    /// Create checkpoint `name`: from now on it marks every block written. Writes
    /// in flight at this moment are marked too. Durable when it returns.
    pub async fn create(&self, name: &str) -> Result<CheckpointInfo, CheckpointError> {
        if !valid_name(name) {
            return Err(CheckpointError::BadName {
                name: name.to_owned(),
            });
        }
        {
            let mut st = self.lock();
            if st.checkpoints.contains_key(name) {
                return Err(CheckpointError::Exists {
                    name: name.to_owned(),
                });
            }
            if st.checkpoints.len() >= CHECKPOINTS_MAX {
                return Err(CheckpointError::TooMany);
            }
            let mut runs = RunSet::default();
            for (a, b) in st.inflight.values() {
                runs.insert(*a, *b);
            }
            st.checkpoints.insert(
                name.to_owned(),
                Checkpoint {
                    created_unix_s: unix_now_s(),
                    runs,
                    merge_gap_blocks: 0,
                    recovery: None,
                },
            );
            st.dirty = true;
        }
        if let Err(e) = self.persist(false).await {
            self.lock().checkpoints.remove(name);
            return Err(e);
        }
        tracing::info!(checkpoint = name, "checkpoint created");
        Ok(self
            .list()
            .into_iter()
            .find(|c| c.name == name)
            .expect("just created"))
    }

    /// Remove checkpoint `name`. Durable when it returns.
    pub async fn remove(&self, name: &str) -> Result<(), CheckpointError> {
        let removed = {
            let mut st = self.lock();
            let removed = st
                .checkpoints
                .remove(name)
                .ok_or_else(|| CheckpointError::Unknown {
                    name: name.to_owned(),
                })?;
            st.dirty = true;
            removed
        };
        if let Err(e) = self.persist(false).await {
            self.lock().checkpoints.insert(name.to_owned(), removed);
            return Err(e);
        }
        tracing::info!(checkpoint = name, "checkpoint removed");
        Ok(())
    }

    /// Mark `[offset, offset + len)` changed in every checkpoint before a write,
    /// write-zeroes or trim is issued; returns once that is durable enough to
    /// survive a crash (see the module docs). Hold the result until the write
    /// completed: a checkpoint created meanwhile includes the range.
    pub async fn mark(self: &Arc<Self>, offset: u64, len: u64) -> Result<Marked, CheckpointError> {
        let (first, end) = self.blocks_of(offset, len);
        let need = {
            let mut st = self.lock();
            let id = st.next_inflight;
            st.next_inflight += 1;
            st.inflight.insert(id, (first, end));
            let marked = Marked {
                store: Arc::clone(self),
                id,
            };
            if st.checkpoints.is_empty() {
                return Ok(marked);
            }
            self.mark_locked(&mut st, first, end);
            let missing = self.missing_extents(&st, offset, len);
            if missing.is_empty() {
                return Ok(marked);
            }
            (marked, missing)
        };
        let (marked, missing) = need;
        self.activate(&missing).await?;
        Ok(marked)
    }

    fn mark_locked(&self, st: &mut State, first: u64, end: u64) {
        st.dirty = true;
        for c in st.checkpoints.values_mut() {
            c.runs.insert(first, end);
            if c.runs.len() > RUNS_MAX {
                let mut gap = c.merge_gap_blocks.max(1);
                while c.runs.len() > RUNS_MAX / 2 {
                    c.runs.merge_gaps(gap);
                    c.merge_gap_blocks = c.merge_gap_blocks.max(gap);
                    gap *= 2;
                }
                tracing::warn!(
                    runs = c.runs.len(),
                    merge_gap_bytes = c.merge_gap_blocks * u64::from(self.block_size),
                    "a checkpoint map grew past {RUNS_MAX} runs; neighbouring runs were merged (it now over-approximates)"
                );
            }
        }
    }

    fn missing_extents(&self, st: &State, offset: u64, len: u64) -> Vec<u64> {
        let first = offset / HOT_EXTENT_BYTES;
        let last = (offset + len.max(1) - 1) / HOT_EXTENT_BYTES;
        (first..=last).filter(|e| !st.hot.contains(e)).collect()
    }

    /// Record `extents` as hot durably (unless another task did meanwhile).
    async fn activate(&self, extents: &[u64]) -> Result<(), CheckpointError> {
        let _file = self.file.lock().await;
        let full = {
            let st = self.lock();
            if extents.iter().all(|e| st.hot.contains(e)) {
                return Ok(());
            }
            // A checkpoint exists, so its creation wrote the file.
            assert!(st.file_exists, "a checkpoint exists without its file");
            st.hot.len() + extents.iter().filter(|e| !st.hot.contains(e)).count()
                > INTENT_EXTENTS_MAX
        };
        if full {
            // The record is full: persist the maps, which empties it; the new
            // extents then start a fresh record.
            self.persist_locked(false).await?;
        }
        let (slot, bytes) = {
            let st = self.lock();
            let mut hot = st.hot.clone();
            hot.extend(extents.iter().copied());
            let intent_seq = st.intent_seq + 1;
            let list: Vec<u64> = hot.iter().copied().collect();
            let bytes = encode_intent_slot(st.file_seq, intent_seq, &list);
            ((intent_seq % 2) as usize, (bytes, hot, intent_seq))
        };
        let (bytes, hot, intent_seq) = bytes;
        let path = self.path.clone();
        let at = (HEADER_LEN + slot * INTENT_SLOT_LEN) as u64;
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let f = OpenOptions::new().write(true).open(&path)?;
            f.write_all_at(&bytes, at)?;
            f.sync_data()
        })
        .await
        .map_err(|e| self.io_err("write-intent record")(io::Error::other(e)))?
        .map_err(self.io_err("write-intent record"))?;
        let mut st = self.lock();
        st.hot = hot;
        st.intent_seq = intent_seq;
        Ok(())
    }

    /// Persist the maps now (`clean`: this is a clean stop, the maps are exact).
    pub async fn persist(&self, clean: bool) -> Result<(), CheckpointError> {
        let _file = self.file.lock().await;
        self.persist_locked(clean).await
    }

    /// A full persist; the caller holds the file lock.
    async fn persist_locked(&self, clean: bool) -> Result<(), CheckpointError> {
        let (img, old_hot) = {
            let mut st = self.lock();
            if st.checkpoints.is_empty() && !st.file_exists {
                return Ok(());
            }
            let old_hot = std::mem::take(&mut st.hot);
            st.dirty = false;
            let img = FileImage {
                clean,
                file_seq: st.file_seq + 1,
                size_bytes: self.size_bytes(),
                block_size: self.block_size,
                hot_extent_bytes: HOT_EXTENT_BYTES,
                volume_id: self.volume_id,
                checkpoints: st.checkpoints.clone(),
                hot: Some(Vec::new()),
            };
            (img, old_hot)
        };
        let bytes = encode_file(&img);
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
        let mut st = self.lock();
        match written {
            Ok(()) => {
                st.file_seq = img.file_seq;
                st.intent_seq = 0;
                st.file_exists = true;
                Ok(())
            }
            Err(e) => {
                // The old file (and its record) is still the one on disk: keep its
                // hot extents, or writes to them would go unrecorded.
                st.hot.extend(old_hot);
                st.dirty = true;
                Err(self.io_err("persist")(e))
            }
        }
    }

    /// Persist every [`PERSIST_INTERVAL_S`] seconds while the maps change, until
    /// `stop` is cancelled or the store is dropped.
    pub fn spawn_periodic(
        self: &Arc<Self>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(PERSIST_INTERVAL_S));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(store) = weak.upgrade() else { return };
                if store.lock().dirty
                    && let Err(e) = store.persist(false).await
                {
                    tracing::error!(
                        "periodic checkpoint persist failed (retried next period; the write-intent record still covers the changes): {e}"
                    );
                }
            }
        })
    }

    /// A clean stop: persist the maps as exact. Call after the last client write completed.
    pub async fn close(&self) -> Result<(), CheckpointError> {
        self.persist(true).await
    }

    /// The dirty-bitmap extents of checkpoint `name` for `[offset, offset + len)`
    /// (cut at the end of the volume), at most `extents_max`.
    pub fn block_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        extents_max: usize,
    ) -> Result<Vec<Extent>, CheckpointError> {
        let st = self.lock();
        let c = st
            .checkpoints
            .get(name)
            .ok_or_else(|| CheckpointError::Unknown {
                name: name.to_owned(),
            })?;
        let bs = u64::from(self.block_size);
        let end = offset.saturating_add(len).min(self.size_bytes());
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, n: u64, flags: u32| {
            if n == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.flags == flags => last.len_bytes += n,
                _ => out.push(Extent {
                    len_bytes: n,
                    flags,
                }),
            }
        };
        let mut pos = offset;
        // The run that may start before `offset` and still cover it, then the rest.
        let first_block = offset / bs;
        let start_key = c
            .runs
            .runs
            .range(..=first_block)
            .next_back()
            .map_or(first_block, |(s, _)| *s);
        for (s, e) in c.runs.runs.range(start_key..) {
            if pos >= end || out.len() >= extents_max.max(1) {
                break;
            }
            let (s, e) = ((s * bs).max(offset), (e * bs).min(end));
            if e <= pos {
                continue;
            }
            if s >= end {
                break;
            }
            push(&mut out, s.saturating_sub(pos), 0);
            push(&mut out, e - s.max(pos), STATE_DIRTY);
            pos = e;
        }
        if pos < end && out.len() < extents_max.max(1) {
            push(&mut out, end - pos, 0);
        }
        out.truncate(extents_max.max(1));
        Ok(out)
    }
}

/// Write `bytes` to `path` so that a crash leaves either the old or the new file.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Answer the control commands `checkpoint-create {"name"}`, `checkpoint-list`,
/// `checkpoint-remove {"name"}`.
pub async fn control(store: &CheckpointStore, request: &ControlRequest) -> ControlReply {
    let name = || request.text("name").unwrap_or_default().to_owned();
    let result = match request.cmd.as_str() {
        "checkpoint-create" => store
            .create(&name())
            .await
            .map(|info| serde_json::json!({ "checkpoint": info, "message": format!("checkpoint {} created; read its changes as NBD metadata context {}", info.name, info.context) })),
        "checkpoint-remove" => store
            .remove(&name())
            .await
            .map(|()| serde_json::json!({ "message": format!("checkpoint {} removed", name()) })),
        "checkpoint-list" => Ok(serde_json::json!({ "checkpoints": store.list() })),
        other => {
            return ControlReply::error(format!("unknown checkpoint command {other:?}"));
        }
    };
    match result {
        Ok(v) => ControlReply::success(v),
        Err(e) => ControlReply::error(e.to_string()),
    }
}

/// The control commands this module answers.
pub const CONTROL_COMMANDS: [&str; 3] =
    ["checkpoint-create", "checkpoint-list", "checkpoint-remove"];

/// `tandem checkpoint ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CheckpointCommand {
    /// Create checkpoint NAME on a running primary: from now on it records every
    /// block written; NBD clients read it as metadata context qemu:dirty-bitmap:NAME.
    Create {
        name: String,
        /// The primary's control socket.
        #[arg(long)]
        control: PathBuf,
    },
    /// List the checkpoints: changed bytes, and whether the map is exact or
    /// over-approximated (after an unclean stop) and why.
    List {
        /// The primary's control socket.
        #[arg(long)]
        control: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove checkpoint NAME.
    Remove {
        name: String,
        /// The primary's control socket.
        #[arg(long)]
        control: PathBuf,
    },
}

/// Run `tandem checkpoint ...`: print the result, or return the error.
pub async fn run_cli(command: CheckpointCommand) -> Result<(), String> {
    let (control, cmd, args, json) = match command {
        CheckpointCommand::Create { name, control } => (
            control,
            "checkpoint-create",
            serde_json::json!({ "name": name }),
            false,
        ),
        CheckpointCommand::Remove { name, control } => (
            control,
            "checkpoint-remove",
            serde_json::json!({ "name": name }),
            false,
        ),
        CheckpointCommand::List { control, json } => {
            (control, "checkpoint-list", serde_json::Value::Null, json)
        }
    };
    let mut req = ControlRequest::new(cmd);
    req.args = args;
    let reply = crate::agent::control::request(&control, &req).await?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "refused".into()));
    }
    let result = reply.result.unwrap_or_default();
    if let Some(m) = result.get("message").and_then(|m| m.as_str()) {
        println!("{m}");
        return Ok(());
    }
    let list: Vec<CheckpointInfo> = serde_json::from_value(result["checkpoints"].clone())
        .map_err(|e| format!("malformed checkpoint list: {e}"))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("serializes")
        );
        return Ok(());
    }
    if list.is_empty() {
        println!("no checkpoints");
    }
    for c in list {
        println!(
            "{}  created {}  changed {} bytes  {}  ({})",
            c.name, c.created_unix_s, c.changed_bytes, c.state, c.context
        );
        if let Some(r) = c.reason {
            println!("    {r}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: u32 = 4096;
    const MIB: u64 = 1 << 20;

    async fn store(dir: &Path, size: u64, volume: u8) -> Arc<CheckpointStore> {
        open(dir, size, volume, false).await
    }

    async fn open(dir: &Path, size: u64, volume: u8, was_secondary: bool) -> Arc<CheckpointStore> {
        CheckpointStore::open(
            &dir.join("vol.meta"),
            size,
            BS,
            VolumeId([volume; 16]),
            was_secondary,
        )
        .await
        .unwrap()
    }

    fn dirty_ranges(s: &CheckpointStore, name: &str) -> Vec<(u64, u64)> {
        let size = s.size_bytes();
        let mut at = 0;
        let mut out = Vec::new();
        for e in s.block_status(name, 0, size, usize::MAX).unwrap() {
            if e.flags == STATE_DIRTY {
                out.push((at, at + e.len_bytes));
            }
            at += e.len_bytes;
        }
        assert_eq!(at, size, "extents cover the volume");
        out
    }

    /// ha (issue 12): a resize grows the store (the grown range counts as
    /// changed for every checkpoint), and a file saved before the grow opens
    /// against the grown volume with the same answer; a smaller volume or
    /// another block size is still refused.
    #[tokio::test]
    async fn a_grown_volume_counts_its_new_range_as_changed() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 64 * MIB, 7).await;
        s.create("b1").await.unwrap();
        drop(s.mark(8192, 4096).await.unwrap());
        s.close().await.unwrap();
        drop(s);
        // Saved at 64 MiB, the volume grew to 96 MiB (a crash before the save).
        let s = store(dir.path(), 96 * MIB, 7).await;
        assert_eq!(
            dirty_ranges(&s, "b1"),
            vec![(8192, 12288), (64 * MIB, 96 * MIB)]
        );
        // Online: grown while running.
        s.create("b2").await.unwrap();
        s.grow(128 * MIB);
        assert_eq!(dirty_ranges(&s, "b2"), vec![(96 * MIB, 128 * MIB)]);
        drop(s.mark(100 * MIB, 4096).await.unwrap());
        s.close().await.unwrap();
        drop(s);
        let s = store(dir.path(), 128 * MIB, 7).await;
        assert_eq!(dirty_ranges(&s, "b2"), vec![(96 * MIB, 128 * MIB)]);
        drop(s);
        assert!(
            CheckpointStore::open(
                &dir.path().join("vol.meta"),
                64 * MIB,
                BS,
                VolumeId([7; 16]),
                false
            )
            .await
            .is_err()
        );
    }

    #[tokio::test]
    async fn marks_only_writes_after_creation_and_survives_a_clean_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 64 * MIB, 7).await;
        drop(s.mark(0, 4096).await.unwrap());
        assert!(
            !path_for(&dir.path().join("vol.meta")).exists(),
            "no file before a checkpoint"
        );
        s.create("b1").await.unwrap();
        drop(s.mark(8192, 100).await.unwrap());
        drop(s.mark(MIB, 2 * 4096).await.unwrap());
        assert_eq!(
            dirty_ranges(&s, "b1"),
            vec![(8192, 12288), (MIB, MIB + 8192)]
        );
        s.create("b2").await.unwrap();
        drop(s.mark(MIB + 4096, 4096).await.unwrap());
        assert_eq!(dirty_ranges(&s, "b2"), vec![(MIB + 4096, MIB + 8192)]);
        assert!(matches!(
            s.create("b2").await,
            Err(CheckpointError::Exists { .. })
        ));
        assert!(matches!(
            s.create("a b").await,
            Err(CheckpointError::BadName { .. })
        ));
        s.close().await.unwrap();
        drop(s);
        let s = store(dir.path(), 64 * MIB, 7).await;
        assert_eq!(
            dirty_ranges(&s, "b1"),
            vec![(8192, 12288), (MIB, MIB + 8192)]
        );
        assert!(
            s.list().iter().all(|c| c.state == "exact"),
            "{:?}",
            s.list()
        );
        s.remove("b1").await.unwrap();
        assert_eq!(s.names(), vec!["b2".to_string()]);
        assert!(matches!(
            s.remove("b1").await,
            Err(CheckpointError::Unknown { .. })
        ));
    }

    #[tokio::test]
    async fn an_unclean_stop_marks_the_hot_extents_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1024 * MIB, 7).await;
        s.create("b").await.unwrap();
        // Written after the last full persist: covered by the intent record only.
        drop(s.mark(200 * MIB + 4096, 4096).await.unwrap());
        drop(s.mark(700 * MIB, 4096).await.unwrap());
        // No close: the process "dies" here.
        drop(s);
        let s = store(dir.path(), 1024 * MIB, 7).await;
        let ranges = dirty_ranges(&s, "b");
        assert_eq!(
            ranges,
            vec![(192 * MIB, 256 * MIB), (640 * MIB, 704 * MIB)],
            "the two hot 64 MiB extents"
        );
        let info = &s.list()[0];
        assert_eq!(info.state, "over-approximated");
        assert!(info.reason.as_deref().unwrap().contains("uncleanly"));
        // The over-approximation is a property of the map: it stays listed.
        s.close().await.unwrap();
        drop(s);
        let s = store(dir.path(), 1024 * MIB, 7).await;
        assert_eq!(s.list()[0].state, "over-approximated");
    }

    #[tokio::test]
    async fn a_stint_as_secondary_or_new_metadata_marks_everything() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 64 * MIB, 7).await;
        s.create("b").await.unwrap();
        s.create("c").await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let s = open(dir.path(), 64 * MIB, 7, true).await;
        assert_eq!(dirty_ranges(&s, "b"), vec![(0, 64 * MIB)]);
        assert!(s.list()[0].reason.as_deref().unwrap().contains("secondary"));
        s.remove("b").await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let s = store(dir.path(), 64 * MIB, 9).await;
        assert_eq!(dirty_ranges(&s, "c"), vec![(0, 64 * MIB)]);
    }

    #[tokio::test]
    async fn a_periodic_persist_makes_older_writes_exact_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1024 * MIB, 7).await;
        s.create("b").await.unwrap();
        drop(s.mark(200 * MIB, 4096).await.unwrap());
        // What the periodic task does: the maps are saved, the record emptied.
        s.persist(false).await.unwrap();
        drop(s.mark(700 * MIB + 8192, 4096).await.unwrap());
        drop(s);
        let s = store(dir.path(), 1024 * MIB, 7).await;
        assert_eq!(
            dirty_ranges(&s, "b"),
            vec![(200 * MIB, 200 * MIB + 4096), (640 * MIB, 704 * MIB)],
            "the saved write exactly, the later one by its extent"
        );
    }

    #[tokio::test]
    async fn a_checkpoint_created_during_a_write_includes_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 64 * MIB, 7).await;
        let in_flight = s.mark(4 * MIB, 4096).await.unwrap();
        s.create("b").await.unwrap();
        drop(in_flight);
        assert_eq!(dirty_ranges(&s, "b"), vec![(4 * MIB, 4 * MIB + 4096)]);
    }

    #[tokio::test]
    async fn a_damaged_file_is_moved_aside_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 64 * MIB, 7).await;
        s.create("b").await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let path = path_for(&dir.path().join("vol.meta"));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let s = store(dir.path(), 64 * MIB, 7).await;
        assert!(s.names().is_empty());
        assert!(!path.exists());
        // A volume of another size is refused with both sizes named (ha, issue
        // 12: a larger one is the same volume grown by `tandem resize`, see
        // a_grown_volume_counts_its_new_range_as_changed).
        s.create("c").await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let e = CheckpointStore::open(
            &dir.path().join("vol.meta"),
            32 * MIB,
            BS,
            VolumeId([7; 16]),
            false,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("33554432"), "{e}");
    }

    #[tokio::test]
    async fn a_torn_intent_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1024 * MIB, 7).await;
        s.create("b").await.unwrap();
        drop(s.mark(0, 4096).await.unwrap()); // intent seq 1 -> slot 1: {0}
        drop(s.mark(300 * MIB, 4096).await.unwrap()); // seq 2 -> slot 0: {0, 4}
        drop(s);
        // Tear the newest slot (seq 2, slot 0): its write guarded extent 4, whose
        // data write was never issued, so falling back to {0} is safe.
        let path = path_for(&dir.path().join("vol.meta"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let s = store(dir.path(), 1024 * MIB, 7).await;
        assert_eq!(dirty_ranges(&s, "b"), vec![(0, 64 * MIB)]);
    }

    proptest! {
        #[test]
        fn runsets_match_a_set_of_blocks(ops in proptest::collection::vec((0u64..200, 1u64..20), 0..60)) {
            let mut runs = RunSet::default();
            let mut model = std::collections::BTreeSet::new();
            for (a, n) in ops {
                runs.insert(a, a + n);
                model.extend(a..a + n);
            }
            prop_assert_eq!(runs.blocks(), model.len() as u64);
            for b in 0..230 {
                prop_assert_eq!(runs.contains(b), model.contains(&b));
            }
            // Disjoint and not touching.
            let v: Vec<_> = runs.iter().collect();
            for w in v.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
        }

        #[test]
        fn files_round_trip(
            clean in any::<bool>(),
            seq in any::<u64>(),
            cps in proptest::collection::btree_map("[a-z]{1,8}", proptest::collection::vec((0u64..1000, 1u64..50), 0..20), 0..5),
        ) {
            let checkpoints = cps.into_iter().map(|(name, ops)| {
                let mut runs = RunSet::default();
                for (a, n) in ops { runs.insert(a, a + n); }
                (name, Checkpoint { created_unix_s: 5, runs, merge_gap_blocks: 0, recovery: Some((Recovery::UncleanStop, 9)) })
            }).collect();
            let img = FileImage { clean, file_seq: seq, size_bytes: 1 << 30, block_size: BS, hot_extent_bytes: HOT_EXTENT_BYTES,
                volume_id: VolumeId([3; 16]), checkpoints, hot: Some(Vec::new()) };
            let bytes = encode_file(&img);
            prop_assert_eq!(decode_file(&bytes).unwrap(), img);
            // Any single flipped byte is detected (or lands in padding and changes nothing).
            for i in (0..bytes.len()).step_by(997) {
                let mut b = bytes.clone();
                b[i] ^= 0x20;
                if let Ok(d) = decode_file(&b) {
                    prop_assert!(d.checkpoints == decode_file(&bytes).unwrap().checkpoints);
                }
            }
        }
    }
}
