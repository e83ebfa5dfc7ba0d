//! On-disk metadata beside a volume (ARCHITECTURE §4): the superblock, the
//! persisted dirty bitmap, and the write-intent (activity) log.
//!
//! This module owns the file format and the order of durable writes; it does
//! not decide *what* the superblock says (that is the engine's job) nor which
//! bits are dirty (`bitmap.rs` holds the bits, the engine marks them).
//!
//! Crash safety (G3) rests on three rules:
//! - **Never overwrite the newest.** There are two superblock slots; a write
//!   always goes to the one that is *not* the newest, so a torn write can
//!   only destroy something already superseded. The activity log is a ring of
//!   64 full snapshots with the same rule (see [`al`]).
//! - **Data, flush, then pointer.** Whatever a superblock or log record
//!   relies on is written and fdatasync'd before it.
//! - **Bitmap pages in place, set bits relied upon only once durable.** The
//!   bitmap (format version 2) is one area written in place by pages of
//!   checksummed 512-byte sectors; a torn page leaves each sector old or new,
//!   which is safe because a caller drops the activity-log cover of a block
//!   only after the page holding its bit is durable (see [`MetaStore`]).
//!
//! A failed write or fdatasync poisons the store: later writes are refused,
//! because after a failed fdatasync the kernel may have dropped the dirty
//! pages and a retry that "succeeds" proves nothing.
//!
//! All I/O goes through [`DurableFile`]: a real file, or a [`SimFile`] that
//! models power loss (ARCHITECTURE §4a) for tests and the simulator.
//!
//! The on-disk log ring (the primary's spill log, the secondary's redo
//! journal) is a file of its own: [`journal`].
//!
//! Layout byte by byte: [`layout`] (regions), [`SlotImage`] (superblock
//! slot), [`BitmapSector`] (bitmap area), [`ActivityRecord`] (activity-log
//! record), [`BitmapHeader`] (format version 1's bitmap copy header, read to
//! convert).

pub mod al;
pub mod file;
pub mod format;
pub mod journal;
pub mod layout;
mod store;

use std::io;
use std::path::PathBuf;

pub use al::{AL_EXTENTS_DEFAULT, AL_EXTENTS_MAX, ActivityRecord, ActivitySnapshot};
pub use file::{DurableFile, SimFile, SimStats};
pub use format::{
    BitmapHeader, BitmapLocation, BitmapSector, FORMAT_VERSION, SectorFault, SlotFault, SlotImage,
    Superblock,
};
pub use journal::{
    Journal, JournalError, JournalIdentity, JournalKind, Lsn, RecordFields, RecordInfo, ScanEnd,
};
pub use layout::Layout;
pub use store::{MetaStore, Opened, PagesPersisted};

/// Errors opening, creating or writing a metadata file.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata {}: {op} failed; check the disk and the path", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "metadata {} is locked by another process (another tandem agent for this volume?); \
         stop it first",
        path.display()
    )]
    Locked { path: PathBuf },

    #[error(
        "metadata {} is for a volume of {on_disk_bytes} bytes but the volume is {requested_bytes} bytes; \
         use the matching volume or recreate the metadata (forces a full resync)",
        path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        on_disk_bytes: u64,
        requested_bytes: u64,
    },

    #[error(
        "metadata {} uses a block size of {on_disk_bytes} bytes but {requested_bytes} bytes was requested; \
         use the recorded block size or recreate the metadata (forces a full resync)",
        path.display()
    )]
    BlockSizeMismatch {
        path: PathBuf,
        on_disk_bytes: u32,
        requested_bytes: u32,
    },

    #[error(
        "metadata {}: both superblock slots are bad (slot A: {slot_a}; slot B: {slot_b}); \
         the node's identity and state are lost: restore the file or recreate the metadata \
         and run a full resync",
        path.display()
    )]
    BothSlotsBad {
        path: PathBuf,
        slot_a: SlotFault,
        slot_b: SlotFault,
    },

    #[error(
        "metadata {}: superblock slot {slot} has format version {found}, this build reads \
         version {supported}; use a tandem build that understands it",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        slot: char,
        found: u32,
        supported: u32,
    },

    #[error(
        "metadata {}: activity-log slot {slot} has format version {found}, this build reads \
         version {supported}; use a tandem build that understands it",
        path.display()
    )]
    AlUnsupportedVersion {
        path: PathBuf,
        slot: usize,
        found: u32,
        supported: u32,
    },

    #[error(
        "invalid volume geometry: size {size_bytes} bytes, block size {block_size} bytes: {reason}"
    )]
    InvalidGeometry {
        size_bytes: u64,
        block_size: u32,
        reason: &'static str,
    },

    #[error(
        "metadata {}: the superblock describes a bitmap area of {on_disk_pages} pages but the \
         volume needs {expected_pages}; the file is inconsistent: restore it or recreate the \
         metadata (forces a full resync)",
        path.display()
    )]
    BitmapAreaMismatch {
        path: PathBuf,
        on_disk_pages: u64,
        expected_pages: u64,
    },

    #[error(
        "metadata {}: an earlier write or fdatasync failed, so its durability is unknown; \
         no further metadata writes are made: restart the agent after checking the disk",
        path.display()
    )]
    Poisoned { path: PathBuf },
}
