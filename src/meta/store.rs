//! `MetaStore`: the open, exclusively locked metadata file and the durable
//! write sequences on it. Metadata writes are rare (role changes, bitmap
//! persists, activity-extent changes), so plain `pwrite` + `fdatasync` is
//! enough; callers on an async runtime use `spawn_blocking`.
//!
//! The store does its I/O through [`DurableFile`]: a real file
//! (`MetaStore<File>`, the default, opened by path with
//! [`MetaStore::open_or_create`]) or a [`super::SimFile`] in tests and the
//! simulator ([`MetaStore::open_or_create_on`], [`MetaStore::create_on`],
//! [`MetaStore::open_on`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::bitmap::DirtyBitmap;

use super::MetaError;
use super::al::{
    AL_EXTENTS_MAX, ActivityRecord, ActivitySnapshot, AlGeometry, al_slot_of, select_newest,
};
use super::file::DurableFile;
use super::format::{BitmapHeader, FORMAT_VERSION, SlotFault, SlotImage, Superblock};
use super::layout::{
    AL_LEN_BYTES, AL_OFFSET_BYTES, AL_SLOT_LEN_BYTES, BITMAP_HEADER_LEN_BYTES,
    BLOCK_SIZE_MAX_BYTES, BLOCK_SIZE_MIN_BYTES, Layout, SUPERBLOCK_SLOT_LEN_BYTES,
    SUPERBLOCK_SLOT_OFFSETS,
};

const SLOT_NAMES: [char; 2] = ['A', 'B'];
/// The `op` of the error when another process created the file first.
const LINK_OP: &str = "link into place";

/// The metadata file, held open and `flock`ed exclusively for as long as this
/// value lives.
#[derive(Debug)]
pub struct MetaStore<F: DurableFile = File> {
    /// The file's path, or the name given to a simulated file; used in messages.
    path: PathBuf,
    file: F,
    layout: Layout,
    /// Slot (0 = A, 1 = B) holding the newest valid superblock.
    current_slot: usize,
    /// Its sequence number; the next write uses `slot_seq + 1`.
    slot_seq: u64,
    /// Bitmap copy selected by the newest superblock, and its sequence number.
    bitmap_copy: u8,
    bitmap_seq: u64,
    /// Transaction number of the newest activity-log record (0: none yet);
    /// the next record is `al_txn + 1`.
    al_txn: u64,
    poisoned: bool,
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

    /// Write a complete, valid metadata file into `file` (named `tmp` in messages).
    fn initialize(
        tmp: &Path,
        file: F,
        layout: Layout,
        sb: Superblock,
    ) -> Result<Opened<F>, MetaError> {
        lock_exclusive(&file, tmp)?;
        // Zero-filled (sparse): the AL area and bitmap copy 1 start out zero.
        file.set_len(layout.file_len_bytes())
            .map_err(io_err(tmp, "set_len"))?;
        let mut store = MetaStore {
            path: tmp.to_path_buf(),
            file,
            layout,
            current_slot: 1, // so the first superblock write goes to slot A
            slot_seq: 0,
            bitmap_copy: 1, // so the first bitmap write goes to copy 0
            bitmap_seq: 0,
            al_txn: 0,
            poisoned: false,
        };
        let bitmap = DirtyBitmap::new(layout.block_count);
        store.write_bitmap_copy(&bitmap)?;
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
        // A slot written by another format version is not damage: falling back
        // to its older twin would silently roll the node's state back.
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
        let sb = image.superblock;
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
        let mut store = MetaStore {
            path: path.to_path_buf(),
            file,
            layout,
            current_slot,
            slot_seq: image.slot_seq,
            bitmap_copy: image.bitmap_copy,
            bitmap_seq: image.bitmap_seq,
            al_txn: 0,
            poisoned: false,
        };
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
        let bitmap = match store.read_bitmap_copy()? {
            Ok(bm) => bm,
            Err(why) => {
                notes.push(format!(
                    "bitmap copy {} unusable ({why}); every block is treated as dirty",
                    image.bitmap_copy
                ));
                let mut bm = DirtyBitmap::new(layout.block_count);
                bm.mark_all();
                bm
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
        })
    }

    /// Read the bitmap copy the current superblock selects. The outer error is
    /// an I/O failure; the inner one says why the copy's contents are unusable.
    fn read_bitmap_copy(&self) -> Result<Result<DirtyBitmap, String>, MetaError> {
        let offset = self.layout.bitmap_copy_offset_bytes(self.bitmap_copy);
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
        let checks = expect(
            "copy index",
            u64::from(header.copy),
            u64::from(self.bitmap_copy),
        )
        .and(expect(
            "sequence number",
            header.bitmap_seq,
            self.bitmap_seq,
        ))
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
        result.map_err(|source| {
            self.poisoned = true;
            MetaError::Io {
                path: self.path.clone(),
                op,
                source,
            }
        })
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
            bitmap_copy: self.bitmap_copy,
            bitmap_seq: self.bitmap_seq,
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

    /// Write `bm` to the bitmap copy the newest superblock does not select,
    /// and fdatasync; on success the store selects it for the next superblock
    /// write.
    fn write_bitmap_copy(&mut self, bm: &DirtyBitmap) -> Result<(), MetaError> {
        self.check_writable()?;
        assert_eq!(
            bm.block_count(),
            self.layout.block_count,
            "bitmap block count differs from the metadata's"
        );
        let target = 1 - self.bitmap_copy;
        let bitmap_seq = self
            .bitmap_seq
            .checked_add(1)
            .expect("bitmap sequence number overflow");
        let data = bm.to_bytes();
        debug_assert_eq!(data.len() as u64, self.layout.bitmap_len_bytes);
        // One buffer, one pwrite: header, data, zero padding to the copy's end.
        let mut buf = vec![0u8; self.layout.bitmap_copy_len_bytes as usize];
        let header = BitmapHeader {
            copy: target,
            bitmap_seq,
            block_count: self.layout.block_count.0,
            len_bytes: data.len() as u64,
            data_crc: crc32fast::hash(&data),
        };
        header.encode_into(&mut buf);
        let data_start = BITMAP_HEADER_LEN_BYTES as usize;
        buf[data_start..data_start + data.len()].copy_from_slice(&data);
        self.write_durable(
            self.layout.bitmap_copy_offset_bytes(target),
            &buf,
            "bitmap write",
        )?;
        self.bitmap_copy = target;
        self.bitmap_seq = bitmap_seq;
        Ok(())
    }

    /// Persist the bitmap durably: write it to the copy the newest superblock
    /// does not select, fdatasync, then write `sb` (with `bitmap_valid` set)
    /// selecting that copy. A crash at any point leaves the last good bitmap
    /// selected by the last good superblock.
    pub fn persist_bitmap(
        &mut self,
        sb: &mut Superblock,
        bm: &DirtyBitmap,
    ) -> Result<(), MetaError> {
        self.write_bitmap_copy(bm)?;
        sb.bitmap_valid = true;
        self.write_superblock(sb)
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
            supported: FORMAT_VERSION,
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
        self.write_durable(offset, &record.encode(), "activity-log write")?;
        self.al_txn = txn;
        Ok(())
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
}
