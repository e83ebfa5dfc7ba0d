//! `MetaStore`: the open, exclusively locked metadata file and the durable
//! write sequences on it. Metadata writes are rare (role changes, bitmap
//! persists, activity-extent changes), so plain `pwrite` + `fdatasync` is
//! enough; callers on an async runtime use `spawn_blocking`.
//!
//! **Bitmap persists (format version 2).** The bitmap lives in one area,
//! written in place by 4 KiB pages ([`BitmapSector`]). The store remembers a
//! 128-bit hash of every page as it last made it durable (16 bytes per
//! 126 MiB of volume), so a persist writes only the pages whose contents
//! differ and fdatasyncs once, and skips the fdatasync when nothing differs.
//! The crash rule that makes writing in place safe, which callers must keep:
//!
//! - A bit that is **set** is relied upon only once the page holding it is
//!   durable: the caller keeps the blocks covered by other means (their
//!   activity-log extent) until [`MetaStore::persist_bitmap_pages`] has
//!   returned, and only then writes the activity-log record that drops the
//!   extent. One fdatasync cannot cover both: the log record must not become
//!   durable before the pages. What one fdatasync can cover is a record that
//!   still lists the extent together with its pages
//!   ([`MetaStore::write_activity_with_pages`]); the next record drops it.
//! - A page write torn by a power loss leaves each 512-byte sector with its
//!   old or its new contents (each sector is checksummed on its own, so a
//!   tear is not damage). A tear in a write that clears bits therefore leaves
//!   some of them set: the safe side. A tear in a write that sets bits loses
//!   only bits the rule above does not yet rely on.
//! - Consequently a persist is not atomic across pages, nor with the
//!   superblock that [`MetaStore::persist_bitmap`] writes after the pages: a
//!   crash in between leaves the new pages with the old superblock. That is
//!   safe whenever the old superblock stays true of the new bitmap, which
//!   holds when the bitmap only drops blocks that are durably in sync (the
//!   one reason to clear a bit) and only adds blocks already covered.
//!
//! `bitmap_valid` keeps its meaning: the persisted bitmap covers every block
//! that may differ except those of the activity log's extents.
//!
//! **Version-1 files** are converted when opened: the copy the version-1
//! superblock selects is read (with the same fallbacks as before), the
//! version-2 area is written *after* both version-1 copies and made durable,
//! then the version-2 superblock is written to the older slot and made
//! durable, then to the other slot; finally the version-1 copies are punched
//! out. A power loss at any point leaves a file that opens as version 1
//! (selected copy untouched, a torn version-2 slot falls back to the
//! version-1 one) or as version 2.
//!
//! The store does its I/O through [`DurableFile`]: a real file
//! (`MetaStore<File>`, the default, opened by path with
//! [`MetaStore::open_or_create`]) or a [`super::SimFile`] in tests and the
//! simulator ([`MetaStore::open_or_create_on`], [`MetaStore::create_on`],
//! [`MetaStore::open_on`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::bitmap::{BitmapPage, DirtyBitmap, PAGE_WORDS};
use crate::types::BlockIndex;

use super::MetaError;
use super::al::{
    AL_EXTENTS_MAX, AL_RECORD_VERSION, ActivityRecord, ActivitySnapshot, AlGeometry, al_slot_of,
    select_newest,
};
use super::file::DurableFile;
use super::format::{
    BITMAP_PAGE_BYTES, BITMAP_SECTOR_BLOCKS, BitmapHeader, BitmapLocation, BitmapSector,
    FORMAT_VERSION, FORMAT_VERSION_V1, SlotFault, SlotImage, Superblock,
};
use super::layout::{
    AL_LEN_BYTES, AL_OFFSET_BYTES, AL_SLOT_LEN_BYTES, BITMAP_AREA_OFFSET_BYTES,
    BITMAP_HEADER_LEN_BYTES, BITMAP_PAGE_LEN_BYTES, BLOCK_SIZE_MAX_BYTES, BLOCK_SIZE_MIN_BYTES,
    Layout, SUPERBLOCK_SLOT_LEN_BYTES, SUPERBLOCK_SLOT_OFFSETS,
};

const SLOT_NAMES: [char; 2] = ['A', 'B'];
/// The `op` of the error when another process created the file first.
const LINK_OP: &str = "link into place";

/// The metadata file, held open and `flock`ed exclusively for as long as this
/// value lives.
pub struct MetaStore<F: DurableFile = File> {
    /// The file's path, or the name given to a simulated file; used in messages.
    path: PathBuf,
    file: F,
    layout: Layout,
    /// Slot (0 = A, 1 = B) holding the newest valid superblock.
    current_slot: usize,
    /// Its sequence number; the next write uses `slot_seq + 1`.
    slot_seq: u64,
    /// Where the bitmap area starts (270336, or after the version-1 copies in
    /// a converted file).
    bitmap_area_offset: u64,
    /// Hash of each page's bytes as last made durable; `None` when unknown
    /// (damaged on disk, or a failed write), so the page is always rewritten.
    page_hashes: Vec<Option<PageHash>>,
    /// Transaction number of the newest activity-log record (0: none yet);
    /// the next record is `al_txn + 1`.
    al_txn: u64,
    poisoned: bool,
}

impl<F: DurableFile> std::fmt::Debug for MetaStore<F> {
    // One hash per bitmap page (8,000 per TiB): show the shape.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .field("slot_seq", &self.slot_seq)
            .field("bitmap_area_offset", &self.bitmap_area_offset)
            .field("al_txn", &self.al_txn)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// Result of [`MetaStore::open_or_create`].
#[derive(Debug)]
pub struct Opened<F: DurableFile = File> {
    pub store: MetaStore<F>,
    pub superblock: Superblock,
    /// The last persisted bitmap. If `superblock.bitmap_valid` is false it may
    /// miss blocks written since, and the caller must widen it (activity log,
    /// or `mark_all`). If the persisted copy was unreadable this is all dirty
    /// (G3: what cannot be proven in sync is resynced) and `recovered_from`
    /// says so.
    pub bitmap: DirtyBitmap,
    /// The activity log as found at open (empty for a new file). After a
    /// crash of the primary, every extent in it is possibly different from
    /// the peer (ARCHITECTURE §4); if `activity.intact` is false, the whole
    /// volume is. Not reflected in `bitmap`: the caller widens that.
    pub activity: ActivitySnapshot,
    /// The file did not exist and was created from `fresh`.
    pub created: bool,
    /// What was damaged and what was used instead, e.g.
    /// "superblock slot B unusable (all zeroes), used slot A"; `None` if nothing was.
    pub recovered_from: Option<String>,
    /// The file was in this older format version and has been converted to
    /// [`FORMAT_VERSION`] (worth a log line); `None` if it was current.
    pub converted_from: Option<u32>,
}

type PageHash = [u8; 16];

fn page_hash(page: &[u8]) -> PageHash {
    let h = blake3::hash(page);
    h.as_bytes()[..16].try_into().expect("16 bytes")
}

/// Pages written per `pwrite` at most (1 MiB): bounds the buffer of a persist
/// that changes many pages (a full sync marks 32.5 MiB per TiB).
const PAGES_PER_WRITE_MAX: usize = 256;

/// What a bitmap persist did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagesPersisted {
    /// Pages asked for (after removing duplicates).
    pub pages_checked: u64,
    /// Pages whose contents differed from the durable ones, written.
    pub pages_written: u64,
    /// Whether an fdatasync was issued (not when nothing needed writing).
    pub synced: bool,
}

impl PagesPersisted {
    pub fn bytes_written(&self) -> u64 {
        self.pages_written * BITMAP_PAGE_LEN_BYTES
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn validate_geometry(size_bytes: u64, block_size: u32) -> Result<(), MetaError> {
    let reason = if size_bytes == 0 {
        Some("the volume is empty")
    } else if !block_size.is_power_of_two() {
        Some("block size must be a power of two")
    } else if !(BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&block_size) {
        Some("block size must be between 512 bytes and 1 MiB")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(MetaError::InvalidGeometry {
            size_bytes,
            block_size,
            reason,
        }),
        None => Ok(()),
    }
}

/// Lock `file` exclusively without waiting. The lock belongs to the open file
/// description and is released when the `File` is closed.
fn lock_exclusive(file: &impl DurableFile, path: &Path) -> Result<(), MetaError> {
    match file.try_lock_exclusive() {
        Ok(true) => Ok(()),
        Ok(false) => Err(MetaError::Locked {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(MetaError::Io {
            path: path.to_path_buf(),
            op: "flock",
            source,
        }),
    }
}

impl MetaStore<File> {
    /// `<volume>.tandem-meta`, the sidecar file beside an image.
    pub fn default_path_for(volume: &Path) -> PathBuf {
        let mut name = volume.as_os_str().to_owned();
        name.push(".tandem-meta");
        PathBuf::from(name)
    }

    /// Open the metadata file at `path`, or create it (`created = true`) for a
    /// volume of this size and block size with `fresh()` as the initial
    /// superblock and an all-clean persisted bitmap. The file is locked
    /// exclusively (`flock`); a second opener gets [`MetaError::Locked`].
    ///
    /// An existing file for a different volume size or block size is refused
    /// with both values named. A damaged superblock slot falls back to the
    /// other one (reported in `recovered_from`); if both are bad the result is
    /// [`MetaError::BothSlotsBad`] and the caller decides.
    ///
    /// Creation is atomic: the file is built under a temporary name, made
    /// durable, then hard-linked into place (which fails rather than replace
    /// a file another process created meanwhile), so a crash never leaves a
    /// half-created metadata file behind.
    pub fn open_or_create(
        path: &Path,
        size_bytes: u64,
        block_size: u32,
        fresh: impl FnOnce() -> Superblock,
    ) -> Result<Opened, MetaError> {
        validate_geometry(size_bytes, block_size)?;
        let layout = Layout::new(size_bytes, block_size);
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => Self::open_existing(path, file, layout),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match Self::create(path, layout, fresh()) {
                    // Lost a creation race: someone else's file is in place now; open it.
                    Err(MetaError::Io {
                        op: LINK_OP,
                        source,
                        ..
                    }) if source.kind() == io::ErrorKind::AlreadyExists => {
                        let file = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(path)
                            .map_err(io_err(path, "open"))?;
                        Self::open_existing(path, file, layout)
                    }
                    other => other,
                }
            }
            Err(e) => Err(io_err(path, "open")(e)),
        }
    }

    fn create(path: &Path, layout: Layout, sb: Superblock) -> Result<Opened, MetaError> {
        assert_eq!(
            sb.size_bytes, layout.size_bytes,
            "fresh superblock size differs from the volume size"
        );
        assert_eq!(
            sb.block_size, layout.block_size,
            "fresh superblock block size differs from the requested one"
        );
        let mut tmp_name = path.as_os_str().to_owned();
        // Unique per attempt, so a stale file left by a crash (or a racing
        // opener in this process) never collides with ours.
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
        let result = Self::initialize(&tmp, file, layout, sb).and_then(|mut opened| {
            opened
                .store
                .file
                .sync_all()
                .map_err(io_err(&tmp, "fsync"))?;
            std::fs::hard_link(&tmp, path).map_err(io_err(path, LINK_OP))?;
            opened.store.path = path.to_path_buf();
            Ok(opened)
        });
        // Whether linking succeeded or not, the temporary name must go.
        let _ = std::fs::remove_file(&tmp);
        let opened = result?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(
                parent,
                "fsync of the directory holding the new metadata file",
            ))?;
        Ok(opened)
    }
}

impl<F: DurableFile> MetaStore<F> {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A write or fdatasync failed; every later write returns [`MetaError::Poisoned`].
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The file underneath (a simulator inspects a [`super::SimFile`] through it).
    pub fn file(&self) -> &F {
        &self.file
    }

    /// [`MetaStore::open_or_create`] on an already open file: creates the
    /// metadata in place (see [`create_on`](Self::create_on)) when the file is
    /// empty, opens it otherwise. `name` is used in messages.
    pub fn open_or_create_on(
        file: F,
        name: impl Into<PathBuf>,
        size_bytes: u64,
        block_size: u32,
        fresh: impl FnOnce() -> Superblock,
    ) -> Result<Opened<F>, MetaError> {
        let name = name.into();
        let len = file.len_bytes().map_err(io_err(&name, "stat"))?;
        if len == 0 {
            Self::create_on(file, name, size_bytes, block_size, fresh())
        } else {
            Self::open_on(file, name, size_bytes, block_size)
        }
    }

    /// Write new metadata into `file` in place, for a volume of this size and
    /// block size, with `sb` as the initial superblock and an all-clean
    /// persisted bitmap. Unlike [`MetaStore::open_or_create`] this is not
    /// atomic: a crash part way leaves a file whose superblock slots are
    /// zero or torn ([`MetaError::BothSlotsBad`] when opened), never one that
    /// opens with half-written contents.
    pub fn create_on(
        file: F,
        name: impl Into<PathBuf>,
        size_bytes: u64,
        block_size: u32,
        sb: Superblock,
    ) -> Result<Opened<F>, MetaError> {
        validate_geometry(size_bytes, block_size)?;
        let layout = Layout::new(size_bytes, block_size);
        assert_eq!(
            sb.size_bytes, layout.size_bytes,
            "fresh superblock size differs from the volume size"
        );
        assert_eq!(
            sb.block_size, layout.block_size,
            "fresh superblock block size differs from the requested one"
        );
        Self::initialize(&name.into(), file, layout, sb)
    }

    /// Open existing metadata in `file` (see [`MetaStore::open_or_create`] for
    /// what is checked and recovered). `name` is used in messages.
    pub fn open_on(
        file: F,
        name: impl Into<PathBuf>,
        size_bytes: u64,
        block_size: u32,
    ) -> Result<Opened<F>, MetaError> {
        validate_geometry(size_bytes, block_size)?;
        Self::open_existing(&name.into(), file, Layout::new(size_bytes, block_size))
    }

    fn with_file(path: &Path, file: F, layout: Layout) -> Self {
        MetaStore {
            path: path.to_path_buf(),
            file,
            layout,
            current_slot: 1, // so the first superblock write goes to slot A
            slot_seq: 0,
            bitmap_area_offset: BITMAP_AREA_OFFSET_BYTES,
            page_hashes: vec![None; layout.bitmap_page_count as usize],
            al_txn: 0,
            poisoned: false,
        }
    }

    /// Write a complete, valid metadata file into `file` (named `tmp` in messages).
    fn initialize(
        tmp: &Path,
        file: F,
        layout: Layout,
        sb: Superblock,
    ) -> Result<Opened<F>, MetaError> {
        lock_exclusive(&file, tmp)?;
        // Zero-filled (sparse): the AL area starts out zero (= never written).
        file.set_len(layout.file_len_bytes())
            .map_err(io_err(tmp, "set_len"))?;
        let mut store = Self::with_file(tmp, file, layout);
        let bitmap = DirtyBitmap::new(layout.block_count);
        // Every page is written: an all-zero sector reads as damage, not as clean.
        store.write_pages(&bitmap, (0..layout.bitmap_page_count).map(BitmapPage))?;
        // Both slots valid from the start, so a later torn write of either
        // always has a good twin and opening a healthy file reports nothing.
        store.write_superblock(&sb)?;
        store.write_superblock(&sb)?;
        Ok(Opened {
            store,
            superblock: sb,
            bitmap,
            activity: ActivitySnapshot::empty(),
            created: true,
            recovered_from: None,
            converted_from: None,
        })
    }

    fn open_existing(path: &Path, file: F, layout: Layout) -> Result<Opened<F>, MetaError> {
        lock_exclusive(&file, path)?;
        let mut slots: Vec<Result<SlotImage, SlotFault>> = Vec::with_capacity(2);
        for offset in SUPERBLOCK_SLOT_OFFSETS {
            let bytes = file
                .read_at_most(offset, SUPERBLOCK_SLOT_LEN_BYTES as usize)
                .map_err(io_err(path, "read of a superblock slot"))?;
            slots.push(SlotImage::decode(&bytes));
        }
        // A slot written by an unknown format version is not damage: falling
        // back to its older twin would silently roll the node's state back.
        for (i, slot) in slots.iter().enumerate() {
            if let Err(SlotFault::UnsupportedVersion { found }) = slot {
                return Err(MetaError::UnsupportedVersion {
                    path: path.to_path_buf(),
                    slot: SLOT_NAMES[i],
                    found: *found,
                    supported: FORMAT_VERSION,
                });
            }
        }
        let mut notes = Vec::new();
        let (current_slot, image) = match (&slots[0], &slots[1]) {
            (Ok(a), Ok(b)) => {
                if b.slot_seq > a.slot_seq {
                    (1, b.clone())
                } else {
                    (0, a.clone())
                }
            }
            (Ok(a), Err(fault)) => {
                notes.push(format!("superblock slot B unusable ({fault}), used slot A"));
                (0, a.clone())
            }
            (Err(fault), Ok(b)) => {
                notes.push(format!("superblock slot A unusable ({fault}), used slot B"));
                (1, b.clone())
            }
            (Err(a), Err(b)) => {
                return Err(MetaError::BothSlotsBad {
                    path: path.to_path_buf(),
                    slot_a: a.clone(),
                    slot_b: b.clone(),
                });
            }
        };
        let sb = image.superblock.clone();
        if sb.size_bytes != layout.size_bytes {
            return Err(MetaError::SizeMismatch {
                path: path.to_path_buf(),
                on_disk_bytes: sb.size_bytes,
                requested_bytes: layout.size_bytes,
            });
        }
        if sb.block_size != layout.block_size {
            return Err(MetaError::BlockSizeMismatch {
                path: path.to_path_buf(),
                on_disk_bytes: sb.block_size,
                requested_bytes: layout.block_size,
            });
        }
        let mut store = Self::with_file(path, file, layout);
        store.current_slot = current_slot;
        store.slot_seq = image.slot_seq;
        let activity = store.read_activity()?;
        store.al_txn = activity.txn;
        if activity.bad_slots > 0 {
            notes.push(format!(
                "{activity}{}",
                if activity.intact {
                    " (a torn write of the next record, used the previous one)"
                } else {
                    "; the activity log cannot be trusted: the whole volume is possibly \
                     different from the peer"
                }
            ));
        } else if !activity.intact {
            notes.push(format!(
                "{activity}; activity-log records are missing: the whole volume is possibly \
                 different from the peer"
            ));
        }
        let (bitmap, converted_from) = match image.bitmap {
            BitmapLocation::V1 { copy, seq } => {
                let bitmap = match store.read_v1_bitmap_copy(copy, seq)? {
                    Ok(bm) => bm,
                    Err(why) => {
                        notes.push(format!(
                            "bitmap copy {copy} unusable ({why}); every block is treated as dirty"
                        ));
                        let mut bm = DirtyBitmap::new(layout.block_count);
                        bm.mark_all();
                        bm
                    }
                };
                store.convert_from_v1(&sb, &bitmap)?;
                (bitmap, Some(FORMAT_VERSION_V1))
            }
            BitmapLocation::V2 {
                area_offset_bytes,
                page_count,
            } => {
                if page_count != layout.bitmap_page_count {
                    return Err(MetaError::BitmapAreaMismatch {
                        path: path.to_path_buf(),
                        on_disk_pages: page_count,
                        expected_pages: layout.bitmap_page_count,
                    });
                }
                store.bitmap_area_offset = area_offset_bytes;
                let (bitmap, note) = store.read_bitmap_area()?;
                notes.extend(note);
                (bitmap, None)
            }
        };
        let recovered_from = if notes.is_empty() {
            None
        } else {
            Some(notes.join("; "))
        };
        Ok(Opened {
            store,
            superblock: sb,
            bitmap,
            activity,
            created: false,
            recovered_from,
            converted_from,
        })
    }

    /// Convert a version-1 file whose newest superblock is `sb` and whose
    /// bitmap is `bitmap` (see the module documentation for the order).
    fn convert_from_v1(&mut self, sb: &Superblock, bitmap: &DirtyBitmap) -> Result<(), MetaError> {
        let v1_end = self.layout.v1_file_len_bytes();
        let area_len = self.layout.bitmap_area_len_bytes();
        self.bitmap_area_offset = v1_end;
        match self.file.allocate(v1_end, area_len) {
            Ok(()) => {}
            // No fallocate on this filesystem: grow the file; the writes allocate.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => self
                .file
                .set_len(v1_end + area_len)
                .map_err(io_err(&self.path, "set_len for the converted bitmap"))?,
            Err(source) => {
                return Err(MetaError::Io {
                    path: self.path.clone(),
                    op: "fallocate for the converted bitmap",
                    source,
                });
            }
        }
        self.write_pages(bitmap, (0..self.layout.bitmap_page_count).map(BitmapPage))?;
        // First the older slot (the version-1 one that is not newest), then
        // the other, so no version-1 slot remains to fall back to.
        self.write_superblock(sb)?;
        self.write_superblock(sb)?;
        // The version-1 copies are dead: give their space back. Best effort:
        // not every filesystem punches holes, and left in place they are
        // only unused bytes.
        let _ = self
            .file
            .punch_hole(BITMAP_AREA_OFFSET_BYTES, v1_end - BITMAP_AREA_OFFSET_BYTES);
        Ok(())
    }

    /// Read the version-2 bitmap area. A damaged sector's blocks are marked
    /// dirty and reported in the note; its page's hash stays unknown, so the
    /// next persist rewrites it.
    fn read_bitmap_area(&mut self) -> Result<(DirtyBitmap, Option<String>), MetaError> {
        let layout = self.layout;
        let word_count = layout.block_count.0.div_ceil(64) as usize;
        let tail_bits = match layout.block_count.0 % 64 {
            0 => 64,
            n => n as u32,
        };
        let mut words = vec![0u64; word_count];
        let mut damaged: Vec<(u64, String)> = Vec::new();
        let chunk_pages = PAGES_PER_WRITE_MAX as u64;
        let mut first = 0;
        while first < layout.bitmap_page_count {
            let pages = chunk_pages.min(layout.bitmap_page_count - first);
            let bytes = self
                .file
                .read_at_most(
                    self.bitmap_area_offset + first * BITMAP_PAGE_LEN_BYTES,
                    (pages * BITMAP_PAGE_LEN_BYTES) as usize,
                )
                .map_err(io_err(&self.path, "read of the bitmap area"))?;
            for page in first..first + pages {
                let start = ((page - first) * BITMAP_PAGE_LEN_BYTES) as usize;
                let page_bytes =
                    &bytes[start.min(bytes.len())..(start + BITMAP_PAGE_BYTES).min(bytes.len())];
                let w0 = (page * PAGE_WORDS) as usize;
                let w1 = (w0 + PAGE_WORDS as usize).min(word_count);
                let last_page = page + 1 == layout.bitmap_page_count;
                let faults = BitmapSector::decode_page(
                    page,
                    page_bytes,
                    &mut words[w0..w1],
                    if last_page { tail_bits } else { 64 },
                );
                if faults.is_empty() && page_bytes.len() == BITMAP_PAGE_BYTES {
                    self.page_hashes[page as usize] = Some(page_hash(page_bytes));
                }
                for (sector, fault) in faults {
                    damaged.push((page * 8 + sector as u64, fault.to_string()));
                }
            }
            first += pages;
        }
        let mut bitmap = DirtyBitmap::from_words(layout.block_count, words)
            .expect("decoding checked the length and the bits past the end");
        for (sector, _) in &damaged {
            let a = sector * BITMAP_SECTOR_BLOCKS;
            let b = (a + BITMAP_SECTOR_BLOCKS).min(layout.block_count.0);
            bitmap.mark(BlockIndex(a), BlockIndex(b));
        }
        // Loading is not a change.
        bitmap.take_changed_pages();
        let note = (!damaged.is_empty()).then(|| {
            let (sector, why) = &damaged[0];
            format!(
                "{} bitmap page sector(s) damaged (first: sector {sector}, {why}); their \
                 blocks ({} each) are treated as dirty",
                damaged.len(),
                BITMAP_SECTOR_BLOCKS
            )
        });
        Ok((bitmap, note))
    }

    /// Read the version-1 bitmap copy `copy`, whose header must carry `seq`.
    /// The outer error is an I/O failure; the inner one says why the copy's
    /// contents are unusable.
    fn read_v1_bitmap_copy(
        &self,
        copy: u8,
        seq: u64,
    ) -> Result<Result<DirtyBitmap, String>, MetaError> {
        let offset = self.layout.bitmap_copy_offset_bytes(copy);
        let header_bytes = self
            .file
            .read_at_most(offset, BITMAP_HEADER_LEN_BYTES as usize)
            .map_err(io_err(&self.path, "read of a bitmap header"))?;
        let header = match BitmapHeader::decode(&header_bytes) {
            Ok(h) => h,
            Err(why) => return Ok(Err(why)),
        };
        let expect = |what: &str, found: u64, wanted: u64| {
            if found == wanted {
                Ok(())
            } else {
                Err(format!("header {what} is {found}, expected {wanted}"))
            }
        };
        let checks = expect("copy index", u64::from(header.copy), u64::from(copy))
            .and(expect("sequence number", header.bitmap_seq, seq))
            .and(expect(
                "block count",
                header.block_count,
                self.layout.block_count.0,
            ))
            .and(expect(
                "length",
                header.len_bytes,
                self.layout.bitmap_len_bytes,
            ));
        if let Err(why) = checks {
            return Ok(Err(why));
        }
        // The length was just checked against the layout, so this allocation is bounded.
        let len = usize::try_from(header.len_bytes).expect("bitmap length fits in memory");
        let data = self
            .file
            .read_at_most(offset + BITMAP_HEADER_LEN_BYTES, len)
            .map_err(io_err(&self.path, "read of a bitmap copy"))?;
        if data.len() != len {
            return Ok(Err(format!(
                "data truncated to {} of {len} bytes",
                data.len()
            )));
        }
        let computed = crc32fast::hash(&data);
        if computed != header.data_crc {
            return Ok(Err(format!(
                "data checksum mismatch (stored {:08x}, computed {computed:08x}): torn or corrupt",
                header.data_crc
            )));
        }
        Ok(DirtyBitmap::from_bytes(self.layout.block_count, &data).map_err(|e| e.to_string()))
    }

    fn check_writable(&self) -> Result<(), MetaError> {
        if self.poisoned {
            Err(MetaError::Poisoned {
                path: self.path.clone(),
            })
        } else {
            Ok(())
        }
    }

    fn poison(&mut self, op: &'static str) -> impl FnOnce(io::Error) -> MetaError + '_ {
        move |source| {
            self.poisoned = true;
            MetaError::Io {
                path: self.path.clone(),
                op,
                source,
            }
        }
    }

    /// `pwrite` then `fdatasync`; any failure poisons the store.
    fn write_durable(
        &mut self,
        offset: u64,
        bytes: &[u8],
        op: &'static str,
    ) -> Result<(), MetaError> {
        let result = self
            .file
            .write_all_at(bytes, offset)
            .and_then(|()| self.file.sync_data());
        result.map_err(self.poison(op))
    }

    /// Write the superblock to the older slot with an incremented sequence
    /// number, then fdatasync. On success it is the newest slot.
    pub fn write_superblock(&mut self, sb: &Superblock) -> Result<(), MetaError> {
        self.check_writable()?;
        assert_eq!(
            sb.size_bytes, self.layout.size_bytes,
            "superblock size differs from the metadata's"
        );
        assert_eq!(
            sb.block_size, self.layout.block_size,
            "superblock block size differs from the metadata's"
        );
        let target = 1 - self.current_slot;
        let slot_seq = self
            .slot_seq
            .checked_add(1)
            .expect("superblock sequence number overflow");
        let image = SlotImage {
            superblock: sb.clone(),
            slot_seq,
            bitmap: BitmapLocation::V2 {
                area_offset_bytes: self.bitmap_area_offset,
                page_count: self.layout.bitmap_page_count,
            },
        };
        self.write_durable(
            SUPERBLOCK_SLOT_OFFSETS[target],
            &image.encode(),
            "superblock write",
        )?;
        self.current_slot = target;
        self.slot_seq = slot_seq;
        Ok(())
    }

    /// Make the listed pages of `bm` durable in the bitmap area: pages whose
    /// contents already are durable are skipped; the others are written
    /// (consecutive pages in one `pwrite`) and made durable by one fdatasync
    /// (none if nothing needed writing). The superblock is not written.
    ///
    /// This is the persist to use when an activity extent retires
    /// (ARCHITECTURE §4): pass the pages holding its blocks
    /// (`bm.pages_of(first, end)`), and write the activity-log record that drops
    /// the extent only after this returned `Ok` (see the crash rule in the
    /// module documentation). `bm` must be the complete out-of-sync set, since
    /// each listed page is written whole. Costs 4 KiB per changed page, about
    /// 2 µs of hashing per listed page.
    ///
    /// A failure poisons the store. Panics on a caller bug: a bitmap of
    /// another size, a page beyond the bitmap.
    pub fn persist_bitmap_pages(
        &mut self,
        bm: &DirtyBitmap,
        pages: impl IntoIterator<Item = BitmapPage>,
    ) -> Result<PagesPersisted, MetaError> {
        self.check_writable()?;
        self.write_pages_if_changed(bm, pages, false)
    }

    /// Persist the bitmap durably: make every page of `bm` durable (writing
    /// only those that changed, see [`persist_bitmap_pages`]), then write
    /// `sb` (with `bitmap_valid` set) and fdatasync. A crash before the
    /// superblock write leaves the old superblock with a bitmap that is, per
    /// 512-byte sector, the old or the new one (see the module documentation).
    ///
    /// [`persist_bitmap_pages`]: Self::persist_bitmap_pages
    pub fn persist_bitmap(
        &mut self,
        sb: &mut Superblock,
        bm: &DirtyBitmap,
    ) -> Result<(), MetaError> {
        self.check_writable()?;
        let all = (0..self.layout.bitmap_page_count).map(BitmapPage);
        self.write_pages_if_changed(bm, all, false)?;
        sb.bitmap_valid = true;
        self.write_superblock(sb)
    }

    /// Persist the pages of `bm` that changed since its changed-page list was
    /// last taken ([`DirtyBitmap::take_changed_pages`]), and take it: after
    /// `Ok`, `bm` reports only pages changed after this persist. For a
    /// bitmap that is itself the complete out-of-sync set (e.g. while
    /// disconnected, every write goes to it): a periodic persist then costs
    /// the pages touched since the previous one. On an error the pages stay
    /// listed as changed (and the store is poisoned).
    pub fn persist_changed_pages(
        &mut self,
        bm: &mut DirtyBitmap,
    ) -> Result<PagesPersisted, MetaError> {
        let pages = bm.take_changed_pages();
        let result = self.persist_bitmap_pages(bm, pages.iter().copied());
        if result.is_err() {
            for &page in &pages {
                bm.note_page_changed(page);
            }
        }
        result
    }

    /// [`persist_bitmap_pages`](Self::persist_bitmap_pages) without a bitmap:
    /// `fill(page, words)` fills the zeroed `words` of each listed page (as
    /// [`DirtyBitmap::page_words`] would give them) with the out-of-sync
    /// blocks. Lets a caller whose out-of-sync set is a bitmap plus ranges in
    /// flight build just the pages it persists, instead of a copy of the
    /// whole bitmap (32 MiB per TiB) per retirement:
    ///
    /// ```text
    /// store.persist_bitmap_pages_with(dirty.pages_of(a, b), |page, words| {
    ///     words.copy_from_slice(dirty.page_words(page));
    ///     for r in in_flight { DirtyBitmap::mark_in_page(page, words, r.first, r.end) }
    /// })
    /// ```
    ///
    /// Panics if `fill` sets a bit past the volume's last block.
    pub fn persist_bitmap_pages_with(
        &mut self,
        pages: impl IntoIterator<Item = BitmapPage>,
        fill: impl FnMut(BitmapPage, &mut [u64]),
    ) -> Result<PagesPersisted, MetaError> {
        self.check_writable()?;
        self.write_words_if_changed(pages, fill, false)
    }

    /// [`persist_bitmap`](Self::persist_bitmap), but every page is written
    /// whether or not it changed: rewrites a bitmap area suspected damaged.
    pub fn rewrite_bitmap(
        &mut self,
        sb: &mut Superblock,
        bm: &DirtyBitmap,
    ) -> Result<(), MetaError> {
        self.check_writable()?;
        let all = (0..self.layout.bitmap_page_count).map(BitmapPage);
        self.write_pages_if_changed(bm, all, true)?;
        sb.bitmap_valid = true;
        self.write_superblock(sb)
    }

    fn write_pages_if_changed(
        &mut self,
        bm: &DirtyBitmap,
        pages: impl IntoIterator<Item = BitmapPage>,
        force: bool,
    ) -> Result<PagesPersisted, MetaError> {
        assert_eq!(
            bm.block_count(),
            self.layout.block_count,
            "bitmap block count differs from the metadata's"
        );
        self.write_words_if_changed(
            pages,
            |page, words| words.copy_from_slice(bm.page_words(page)),
            force,
        )
    }

    /// Words of page `page` of this volume's bitmap: [`PAGE_WORDS`], fewer for the last.
    fn page_word_count(&self, page: u64) -> usize {
        let words = self.layout.block_count.0.div_ceil(64);
        (words - page * PAGE_WORDS).min(PAGE_WORDS) as usize
    }

    fn write_words_if_changed(
        &mut self,
        pages: impl IntoIterator<Item = BitmapPage>,
        fill: impl FnMut(BitmapPage, &mut [u64]),
        force: bool,
    ) -> Result<PagesPersisted, MetaError> {
        let (mut result, written) = self.write_words_unsynced(pages, fill, force)?;
        if written.is_empty() {
            return Ok(result);
        }
        self.file
            .sync_data()
            .map_err(self.poison("fdatasync of bitmap pages"))?;
        result.synced = true;
        self.pages_durable(written);
        Ok(result)
    }

    /// The pages just made durable hold these contents.
    fn pages_durable(&mut self, written: Vec<(u64, PageHash)>) {
        for (page, hash) in written {
            self.page_hashes[page as usize] = Some(hash);
        }
    }

    /// Write the listed pages whose contents differ from the durable ones (all
    /// of them with `force`), without an fdatasync. Returns the pages written
    /// and their hashes, to record once an fdatasync has covered them; until
    /// then their durable contents are unknown.
    fn write_words_unsynced(
        &mut self,
        pages: impl IntoIterator<Item = BitmapPage>,
        mut fill: impl FnMut(BitmapPage, &mut [u64]),
        force: bool,
    ) -> Result<(PagesPersisted, Vec<(u64, PageHash)>), MetaError> {
        let tail_mask = match self.layout.block_count.0 % 64 {
            0 => u64::MAX,
            n => u64::MAX >> (64 - n),
        };
        let mut pages: Vec<u64> = pages.into_iter().map(|p| p.0).collect();
        pages.sort_unstable();
        pages.dedup();
        if let Some(&last) = pages.last() {
            assert!(
                last < self.layout.bitmap_page_count,
                "bitmap page {last} beyond the bitmap ({} pages)",
                self.layout.bitmap_page_count
            );
        }
        let mut result = PagesPersisted {
            pages_checked: pages.len() as u64,
            ..PagesPersisted::default()
        };
        // Encode each page, keep those whose bytes differ from the durable ones.
        let mut batch: Vec<u8> = Vec::new();
        let mut batch_first: Option<u64> = None;
        let mut batch_hashes: Vec<(u64, PageHash)> = Vec::new();
        let mut page_buf = vec![0u8; BITMAP_PAGE_BYTES];
        let mut words_buf = vec![0u64; PAGE_WORDS as usize];
        let mut written_hashes: Vec<(u64, PageHash)> = Vec::new();
        for &page in &pages {
            let words = &mut words_buf[..self.page_word_count(page)];
            words.fill(0);
            fill(BitmapPage(page), words);
            if page + 1 == self.layout.bitmap_page_count {
                let last = words.last().copied().unwrap_or(0);
                assert!(
                    last & !tail_mask == 0,
                    "bitmap page {page} has bits set past the last block"
                );
            }
            BitmapSector::encode_page(page, words, &mut page_buf);
            let hash = page_hash(&page_buf);
            if !force && self.page_hashes[page as usize] == Some(hash) {
                continue;
            }
            let contiguous = batch_first.is_some_and(|f| f + batch_hashes.len() as u64 == page);
            if !contiguous || batch_hashes.len() == PAGES_PER_WRITE_MAX {
                self.flush_batch(
                    &mut batch,
                    batch_first,
                    &mut batch_hashes,
                    &mut written_hashes,
                )?;
                batch_first = Some(page);
            }
            batch.extend_from_slice(&page_buf);
            batch_hashes.push((page, hash));
        }
        self.flush_batch(
            &mut batch,
            batch_first,
            &mut batch_hashes,
            &mut written_hashes,
        )?;
        result.pages_written = written_hashes.len() as u64;
        Ok((result, written_hashes))
    }

    fn flush_batch(
        &mut self,
        batch: &mut Vec<u8>,
        first: Option<u64>,
        hashes: &mut Vec<(u64, PageHash)>,
        written: &mut Vec<(u64, PageHash)>,
    ) -> Result<(), MetaError> {
        let Some(first) = first else { return Ok(()) };
        if batch.is_empty() {
            return Ok(());
        }
        // Until the fdatasync succeeds, these pages' durable contents are unknown.
        for (page, _) in hashes.iter() {
            self.page_hashes[*page as usize] = None;
        }
        let offset = self.bitmap_area_offset + first * BITMAP_PAGE_LEN_BYTES;
        self.file
            .write_all_at(batch, offset)
            .map_err(self.poison("bitmap page write"))?;
        written.append(hashes);
        batch.clear();
        Ok(())
    }

    /// Write every listed page and fdatasync, regardless of what is durable
    /// (creation and conversion).
    fn write_pages(
        &mut self,
        bm: &DirtyBitmap,
        pages: impl IntoIterator<Item = BitmapPage>,
    ) -> Result<PagesPersisted, MetaError> {
        self.check_writable()?;
        self.write_pages_if_changed(bm, pages, true)
    }

    /// ha (issue 12, online grow): the volume grew to `sb.size_bytes`. The
    /// bitmap area is the file's last region (at 270336, or after a converted
    /// file's version-1 copies), so it grows in place at its end; the layout
    /// never moves the activity log. Order (G3): the page that held the old end
    /// and every new page are written from `bm` (the grown bitmap: its new
    /// blocks clean) and made durable; only then does the superblock record the
    /// new size and page count. A crash before that leaves the old superblock,
    /// whose pages are intact: the rewritten last page holds the same bits for
    /// the old blocks and zeroes past the old end (a bit set there would only
    /// mark its sector dirty at the next open). A size equal to the current one
    /// writes the superblock alone.
    ///
    /// Panics on a caller bug: a smaller size, another block size, a bitmap of
    /// another size.
    pub fn grow(&mut self, sb: &Superblock, bm: &DirtyBitmap) -> Result<(), MetaError> {
        self.check_writable()?;
        let old = self.layout;
        assert!(
            sb.size_bytes >= old.size_bytes,
            "metadata never shrinks ({} to {} bytes)",
            old.size_bytes,
            sb.size_bytes
        );
        assert_eq!(sb.block_size, old.block_size, "a grow keeps the block size");
        validate_geometry(sb.size_bytes, sb.block_size)?;
        let new = Layout::new(sb.size_bytes, sb.block_size);
        assert_eq!(
            bm.block_count(),
            new.block_count,
            "the grown bitmap's block count differs from the new size's"
        );
        if new.bitmap_page_count > old.bitmap_page_count {
            let area_end = self.bitmap_area_offset + new.bitmap_area_len_bytes();
            // A failure poisons the store: the caller's next superblock names
            // the new size, which this layout would not match.
            let len = self.file.len_bytes();
            let len = len.map_err(self.poison("size check before a grow"))?;
            if len < area_end {
                let r = self.file.set_len(area_end);
                r.map_err(self.poison("extension of the bitmap area"))?;
            }
        }
        self.layout = new;
        self.page_hashes
            .resize(new.bitmap_page_count as usize, None);
        // The old last page's hash covered fewer words: rewrite it.
        if let Some(h) = self
            .page_hashes
            .get_mut(old.bitmap_page_count.saturating_sub(1) as usize)
        {
            *h = None;
        }
        self.write_pages(
            bm,
            (old.bitmap_page_count.saturating_sub(1)..new.bitmap_page_count).map(BitmapPage),
        )?;
        self.write_superblock(sb)
    }

    /// Pages in the bitmap area.
    pub fn bitmap_page_count(&self) -> u64 {
        self.layout.bitmap_page_count
    }

    /// Read the activity log and pick its newest valid record (see
    /// [`ActivitySnapshot`] for torn and damaged slots). A record with a
    /// valid checksum but another format version is refused with
    /// [`MetaError::AlUnsupportedVersion`] rather than skipped, since
    /// leaving it out could forget active extents.
    pub fn read_activity(&self) -> Result<ActivitySnapshot, MetaError> {
        let area = self
            .file
            .read_at_most(AL_OFFSET_BYTES, AL_LEN_BYTES as usize)
            .map_err(io_err(&self.path, "read of the activity log"))?;
        let geometry = AlGeometry {
            size_bytes: self.layout.size_bytes,
            block_size: self.layout.block_size,
        };
        let slot_len = AL_SLOT_LEN_BYTES as usize;
        // A file cut short inside the area gives short (or empty) slices: Short faults.
        let slots: Vec<_> = (0..AL_LEN_BYTES as usize / slot_len)
            .map(|slot| {
                let start = (slot * slot_len).min(area.len());
                let end = ((slot + 1) * slot_len).min(area.len());
                ActivityRecord::decode(&area[start..end], slot, geometry)
            })
            .collect();
        select_newest(&slots).map_err(|fault| MetaError::AlUnsupportedVersion {
            path: self.path.clone(),
            slot: fault.slot,
            found: fault.found,
            supported: AL_RECORD_VERSION,
        })
    }

    /// Record `extents` (strictly ascending, indices of `extent_bytes`-sized
    /// extents) as the active set: write the next activity-log transaction to
    /// its ring slot, then fdatasync. Only after this returns `Ok` may a write
    /// to a newly activated extent start (ARCHITECTURE §4); a failure poisons
    /// the store like every other metadata write.
    ///
    /// Panics on a caller bug: more than [`AL_EXTENTS_MAX`] extents, an
    /// unsorted list, an extent beyond the volume, or an extent size that is
    /// not a power of two of at least the block size.
    pub fn write_activity(&mut self, extent_bytes: u64, extents: &[u32]) -> Result<(), MetaError> {
        self.check_writable()?;
        let (txn, offset, record) = self.activity_record(extent_bytes, extents);
        self.write_durable(offset, &record, "activity-log write")?;
        self.al_txn = txn;
        Ok(())
    }

    /// Issue 11: a retirement in one fdatasync instead of two. Write the listed
    /// bitmap pages whose contents changed (`fill` as for
    /// [`persist_bitmap_pages_with`](Self::persist_bitmap_pages_with)) and the
    /// next activity-log record listing `extents`, then one fdatasync.
    ///
    /// A power loss may keep the record without the pages or the pages without
    /// the record, so the caller's rule differs from the two-step write: the
    /// pages may take over the coverage of extents that `extents` **still
    /// lists**, never of extents it drops. The next record may drop them, since
    /// it is written after this one returned. Panics as
    /// [`write_activity`](Self::write_activity) does.
    pub fn write_activity_with_pages(
        &mut self,
        extent_bytes: u64,
        extents: &[u32],
        pages: impl IntoIterator<Item = BitmapPage>,
        fill: impl FnMut(BitmapPage, &mut [u64]),
    ) -> Result<PagesPersisted, MetaError> {
        self.check_writable()?;
        let (txn, offset, record) = self.activity_record(extent_bytes, extents);
        let (mut result, written) = self.write_words_unsynced(pages, fill, false)?;
        self.file
            .write_all_at(&record, offset)
            .and_then(|()| self.file.sync_data())
            .map_err(self.poison("activity-log and bitmap page write"))?;
        result.synced = true;
        self.pages_durable(written);
        self.al_txn = txn;
        Ok(result)
    }

    /// The next activity-log record (its txn, offset and bytes) listing
    /// `extents`; panics on the caller bugs [`write_activity`](Self::write_activity) lists.
    fn activity_record(&self, extent_bytes: u64, extents: &[u32]) -> (u64, u64, Vec<u8>) {
        assert!(
            extents.len() <= AL_EXTENTS_MAX,
            "{} active extents do not fit the activity log (max {AL_EXTENTS_MAX})",
            extents.len()
        );
        assert!(
            extent_bytes.is_power_of_two() && extent_bytes >= u64::from(self.layout.block_size),
            "extent size {extent_bytes} is not a power of two of at least the block size {}",
            self.layout.block_size
        );
        let extent_count = self.layout.size_bytes.div_ceil(extent_bytes);
        if let Some(&e) = extents.iter().find(|&&e| u64::from(e) >= extent_count) {
            panic!(
                "extent {e} is beyond the volume ({extent_count} extents of {extent_bytes} bytes)"
            );
        }
        // Cannot overflow: decoding bounds a stored txn by AL_TXN_MAX = 2^62.
        let txn = self.al_txn + 1;
        let record = ActivityRecord {
            txn,
            extent_bytes,
            extents: extents.to_vec(),
        };
        let offset = AL_OFFSET_BYTES + al_slot_of(txn) as u64 * AL_SLOT_LEN_BYTES;
        (txn, offset, record.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DiskState, Generation, Role, VolumeId};

    #[test]
    fn a_failed_activity_write_poisons_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let size_bytes = 64 << 20;
        let fresh = || Superblock {
            volume_id: VolumeId([1; 16]),
            size_bytes,
            block_size: 4096,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            is_new: true,
            gen_current: Generation(7),
            gen_bitmap_base: Generation::NONE,
            gen_history: [Generation::NONE; 2],
            promoted_at_s: 0,
            clean_shutdown: false,
            resync_cursor: None,
            bitmap_valid: true,
            volume_mixed: false,
            poisoned: false,
            consistent_seq: 0,
            consistent_at_ms: 0,
            mixed_through: 0,
        };
        let mut store = MetaStore::open_or_create(&path, size_bytes, 4096, fresh)
            .unwrap()
            .store;
        store.write_activity(4 << 20, &[1]).unwrap();
        // A read-only descriptor makes the pwrite fail (EBADF), as a dying disk would.
        store.file = File::open(&path).unwrap();
        match store.write_activity(4 << 20, &[1, 2]) {
            Err(MetaError::Io {
                op: "activity-log write",
                ..
            }) => {}
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(store.is_poisoned());
        assert_eq!(store.al_txn, 1, "a failed write must not advance the log");
        store.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(matches!(
            store.write_activity(4 << 20, &[3]),
            Err(MetaError::Poisoned { .. })
        ));
        assert_eq!(store.read_activity().unwrap().extents, vec![1]);
    }

    /// ha (issue 12): a grow keeps the bitmap's bits and the activity log, and
    /// is recorded only by the superblock: before it the file opens at the old
    /// size (the new pages are ignored), after it at the new size.
    #[test]
    fn a_grown_metadata_file_keeps_its_bits_and_opens_at_the_new_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let old_bytes: u64 = 200 << 20; // 2 bitmap pages
        let new_bytes: u64 = 600 << 20; // 5 pages
        let fresh = |size_bytes| Superblock {
            volume_id: VolumeId([1; 16]),
            size_bytes,
            block_size: 4096,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            is_new: false,
            gen_current: Generation(7),
            gen_bitmap_base: Generation::NONE,
            gen_history: [Generation::NONE; 2],
            promoted_at_s: 0,
            clean_shutdown: true,
            resync_cursor: None,
            bitmap_valid: true,
            volume_mixed: false,
            poisoned: false,
            consistent_seq: 0,
            consistent_at_ms: 0,
            mixed_through: 0,
        };
        let opened =
            MetaStore::open_or_create(&path, old_bytes, 4096, || fresh(old_bytes)).unwrap();
        let mut store = opened.store;
        let mut sb = opened.superblock;
        let mut bm = DirtyBitmap::for_volume(old_bytes, 4096);
        let last_old = bm.block_count().0 - 1;
        bm.mark(BlockIndex(5), BlockIndex(9));
        bm.mark(BlockIndex(last_old), BlockIndex(last_old + 1));
        store.persist_bitmap(&mut sb, &bm).unwrap();
        store.write_activity(4 << 20, &[3, 49]).unwrap();

        // The pages alone (a crash before the superblock): still the old size.
        let mut grown = bm.clone();
        grown.grow(DirtyBitmap::for_volume(new_bytes, 4096).block_count());
        drop(store);
        {
            let mut store = MetaStore::open_or_create(&path, old_bytes, 4096, || unreachable!())
                .unwrap()
                .store;
            let old_layout = store.layout;
            store.layout = Layout::new(new_bytes, 4096);
            store.page_hashes.resize(5, None);
            store.page_hashes[1] = None;
            store
                .file
                .set_len(store.bitmap_area_offset + store.layout.bitmap_area_len_bytes())
                .unwrap();
            store.write_pages(&grown, (1..5).map(BitmapPage)).unwrap();
            store.layout = old_layout;
        }
        let again = MetaStore::open_or_create(&path, old_bytes, 4096, || unreachable!()).unwrap();
        assert_eq!(again.superblock.size_bytes, old_bytes);
        assert_eq!(again.bitmap, bm, "the old size's bits, intact");
        assert!(again.recovered_from.is_none(), "{:?}", again.recovered_from);
        let mut store = again.store;

        // The grow.
        sb.size_bytes = new_bytes;
        store.grow(&sb, &grown).unwrap();
        drop(store);
        assert!(MetaStore::open_or_create(&path, old_bytes, 4096, || unreachable!()).is_err());
        let opened = MetaStore::open_or_create(&path, new_bytes, 4096, || unreachable!()).unwrap();
        assert_eq!(opened.superblock.size_bytes, new_bytes);
        assert_eq!(opened.bitmap, grown);
        assert_eq!(opened.bitmap.dirty_count().0, 5);
        assert_eq!(opened.activity.extents, vec![3, 49]);
        let mut store = opened.store;
        let mut bm = opened.bitmap;
        bm.mark(BlockIndex(150_000), BlockIndex(150_001));
        store.persist_bitmap(&mut sb, &bm).unwrap();
        drop(store);
        let opened = MetaStore::open_or_create(&path, new_bytes, 4096, || unreachable!()).unwrap();
        assert_eq!(opened.bitmap, bm);
    }
}
