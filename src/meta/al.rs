//! The write-intent (activity) log (ARCHITECTURE §4): byte encoding of one
//! log record and the choice of the newest record when the log is read back.
//!
//! This module owns the record format and the recovery rule. It does not
//! decide which extents are active (that is `engine::activity::ActiveSet`)
//! and does no I/O (the durable write and the read are in `MetaStore`).
//!
//! The log is a ring of [`AL_SLOT_COUNT`] (64) slots of 4 KiB in the AL area
//! (see [`super::layout`]). Every record is a *complete snapshot* of the active
//! extent set, not a delta, so recovery needs exactly one good record: the
//! valid one with the highest transaction number. Record `txn` goes to slot
//! `txn % 64`, so a write never lands on the newest record: a write torn by a
//! crash can only destroy the record it replaces, which is 64 transactions
//! old. The torn record's `write_activity` never returned, so no data write
//! that depended on it was started, and falling back to the previous record
//! (a superset of what was safe to forget, since extents are only retired
//! after their bitmap bits are persisted) loses nothing (G3).
//!
//! What a ring of snapshots cannot tell apart is a torn write of the next
//! record from a *completed* newest record that was damaged later (bit rot,
//! a lost write). [`ActivitySnapshot::intact`] says whether the ring looks
//! exactly like a history ending at the chosen transaction (at most the next
//! slot torn); if not, the active set may be incomplete and the caller must
//! treat the whole volume as possibly different.

use std::fmt;

use super::format::SlotFault;
use super::layout::{AL_SLOT_COUNT, AL_SLOT_LEN_BYTES};

pub const AL_MAGIC: [u8; 8] = *b"TANDEMAL";
/// Version of the record format. Format version 2 of the file did not change
/// the record, so a converted file keeps its log as it is.
pub const AL_RECORD_VERSION: u32 = 1;

const RECORD_LEN: usize = AL_SLOT_LEN_BYTES as usize;
/// Bytes before the extent list.
pub const AL_HEADER_LEN_BYTES: usize = 32;
/// The record's crc32 covers bytes `0..RECORD_CRC_OFFSET` and sits in the last 4 bytes.
const RECORD_CRC_OFFSET: usize = RECORD_LEN - 4;
/// Most extents one record can list: (4096 − 32 − 4) / 4 = 1015.
pub const AL_EXTENTS_MAX: usize = (RECORD_CRC_OFFSET - AL_HEADER_LEN_BYTES) / 4;
/// Default bound on active extents (`al-extents`): below [`AL_EXTENTS_MAX`] so a
/// record that retires extents has room to list them once more (up to 55), and
/// the retirement's bitmap pages share the record's fdatasync (issue 11; one
/// fdatasync per retirement instead of two).
pub const AL_EXTENTS_DEFAULT: usize = 960;

/// Highest transaction number accepted: far beyond any real history (one
/// transaction per nanosecond takes 146 years to get there), and it keeps
/// `txn + 1` from overflowing whatever a checksummed record says.
pub const AL_TXN_MAX: u64 = 1 << 62;

/// Slot (0..64) that record `txn` is written to.
pub fn al_slot_of(txn: u64) -> usize {
    (txn % AL_SLOT_COUNT) as usize
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

/// What a record must be consistent with: the volume it describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlGeometry {
    pub size_bytes: u64,
    pub block_size: u32,
}

impl AlGeometry {
    /// Why `extent_bytes` cannot be an extent size for this volume, if it cannot.
    /// An extent must be a power of two and a whole number of blocks, so
    /// every extent maps onto whole bitmap bits.
    fn extent_size_fault(&self, extent_bytes: u64) -> Option<&'static str> {
        if !extent_bytes.is_power_of_two() {
            Some("extent size is not a power of two")
        } else if extent_bytes < u64::from(self.block_size) {
            Some("extent size is smaller than the block size")
        } else {
            None
        }
    }

    /// Extents needed to cover the volume.
    fn extent_count(&self, extent_bytes: u64) -> u64 {
        self.size_bytes.div_ceil(extent_bytes)
    }
}

/// One activity-log record as stored: 4096 bytes.
///
/// ```text
/// offset  len        field
/// 0       8          magic "TANDEMAL"
/// 8       4          record version (1, AL_RECORD_VERSION)
/// 12      4          extent count n, 0..=1015
/// 16      8          transaction number, 1..=2^62; stored in slot txn % 64
/// 24      8          extent size in bytes (power of two, ≥ block size)
/// 32      4·n        active extent indices, u32, strictly ascending, each
///                    < ceil(volume size / extent size)
/// 32+4n   4060−4n    zero
/// 4092    4          crc32 (crc32fast) of bytes 0..4092
/// ```
///
/// Magic and version come first so any reader can tell what the bytes are;
/// the count sits in the 4 bytes after the version so the two u64 fields stay
/// 8-byte aligned and the header is a round 32 bytes, leaving 1015 extents
/// (3.96 GiB of 4 MiB extents) per record. The transaction number is what
/// recovery sorts on; a stored number that does not match the slot means the
/// record was read from (or written to) the wrong place. The extent size is
/// stored so a restart with a different configured extent size still reads
/// the old set correctly. The list is ascending so duplicates are impossible
/// and an index beyond the volume is caught. The crc is last so it covers
/// every byte before it, and a write torn at any sector boundary leaves a
/// mismatch. An all-zero slot (new file, never written) fails the magic and
/// is reported as [`SlotFault::Zeroed`], not as damage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivityRecord {
    pub txn: u64,
    pub extent_bytes: u64,
    /// Ascending, no duplicates, at most [`AL_EXTENTS_MAX`].
    pub extents: Vec<u32>,
}

impl ActivityRecord {
    /// Encode into one 4096-byte slot image.
    ///
    /// Panics if the record breaks its invariants (txn 0, too many or
    /// unsorted extents): the caller built it, so that is a bug.
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            (1..=AL_TXN_MAX).contains(&self.txn),
            "activity log transaction {} out of range",
            self.txn
        );
        assert!(
            self.extents.len() <= AL_EXTENTS_MAX,
            "{} active extents do not fit one activity-log record (max {AL_EXTENTS_MAX})",
            self.extents.len()
        );
        assert!(
            self.extents.windows(2).all(|w| w[0] < w[1]),
            "activity-log extents must be strictly ascending"
        );
        let mut b = vec![0u8; RECORD_LEN];
        b[0..8].copy_from_slice(&AL_MAGIC);
        b[8..12].copy_from_slice(&AL_RECORD_VERSION.to_le_bytes());
        let count = u32::try_from(self.extents.len()).expect("count ≤ 1015");
        b[12..16].copy_from_slice(&count.to_le_bytes());
        b[16..24].copy_from_slice(&self.txn.to_le_bytes());
        b[24..32].copy_from_slice(&self.extent_bytes.to_le_bytes());
        for (i, e) in self.extents.iter().enumerate() {
            let off = AL_HEADER_LEN_BYTES + 4 * i;
            b[off..off + 4].copy_from_slice(&e.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[..RECORD_CRC_OFFSET]);
        b[RECORD_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode the record stored in slot `slot`, checking every field against
    /// `geometry`. Never trusts the bytes: the checksum is verified before any
    /// field beyond the magic is used, and every length is bounded.
    pub fn decode(b: &[u8], slot: usize, geometry: AlGeometry) -> Result<Self, SlotFault> {
        if b.len() < RECORD_LEN {
            return Err(SlotFault::Short { len_bytes: b.len() });
        }
        let b = &b[..RECORD_LEN];
        if b.iter().all(|&x| x == 0) {
            return Err(SlotFault::Zeroed);
        }
        if b[0..8] != AL_MAGIC {
            return Err(SlotFault::BadMagic);
        }
        let stored = u32_at(b, RECORD_CRC_OFFSET);
        let computed = crc32fast::hash(&b[..RECORD_CRC_OFFSET]);
        if stored != computed {
            return Err(SlotFault::BadCrc { stored, computed });
        }
        let version = u32_at(b, 8);
        if version != AL_RECORD_VERSION {
            return Err(SlotFault::UnsupportedVersion { found: version });
        }
        let bad = |field: &'static str, value: u64| Err(SlotFault::BadField { field, value });
        let count = u32_at(b, 12);
        if count as usize > AL_EXTENTS_MAX {
            return bad("extent count", u64::from(count));
        }
        let count = count as usize;
        let txn = u64_at(b, 16);
        if txn == 0 || txn > AL_TXN_MAX || al_slot_of(txn) != slot {
            return bad("transaction number for this slot", txn);
        }
        let extent_bytes = u64_at(b, 24);
        if geometry.extent_size_fault(extent_bytes).is_some() {
            return bad("extent size", extent_bytes);
        }
        let extent_count = geometry.extent_count(extent_bytes);
        let list_end = AL_HEADER_LEN_BYTES + 4 * count;
        let mut extents = Vec::with_capacity(count);
        for off in (AL_HEADER_LEN_BYTES..list_end).step_by(4) {
            let e = u32_at(b, off);
            if u64::from(e) >= extent_count {
                return bad("extent index beyond the volume", u64::from(e));
            }
            if extents.last().is_some_and(|&prev| prev >= e) {
                return bad("extent index out of order", u64::from(e));
            }
            extents.push(e);
        }
        if let Some(pos) = b[list_end..RECORD_CRC_OFFSET].iter().position(|&x| x != 0) {
            return bad("padding byte offset", (list_end + pos) as u64);
        }
        Ok(ActivityRecord {
            txn,
            extent_bytes,
            extents,
        })
    }
}

/// What the activity log says after a (re)start: the newest valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivitySnapshot {
    /// Transaction number of the newest valid record; 0 if there is none.
    /// The next write uses `txn + 1`.
    pub txn: u64,
    /// Extent size the record was written with; 0 if there is no record.
    pub extent_bytes: u64,
    /// Extents that were active (ascending): each may hold writes that reached
    /// this node's disk but not the peer's, or the reverse.
    pub extents: Vec<u32>,
    /// Slots that are neither all zero nor a valid record (torn or damaged).
    pub bad_slots: u32,
    /// The ring is exactly what a history of transactions `1..=txn` leaves
    /// behind, with at most slot `(txn + 1) % 64` torn (a crash inside
    /// `write_activity`). If false, a completed record newer than `txn` may
    /// have been destroyed, `extents` may be missing active extents, and the
    /// caller must treat the whole volume as possibly different (full
    /// checksum resync). A new file (all zero) is intact with `txn` 0; a log
    /// of nothing but garbage is not intact, with `bad_slots` 64.
    pub intact: bool,
}

impl ActivitySnapshot {
    /// The snapshot of a log that was never written.
    pub fn empty() -> Self {
        ActivitySnapshot {
            txn: 0,
            extent_bytes: 0,
            extents: Vec::new(),
            bad_slots: 0,
            intact: true,
        }
    }
}

impl fmt::Display for ActivitySnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "activity log transaction {}, {} active extents of {} bytes, {} bad slots{}",
            self.txn,
            self.extents.len(),
            self.extent_bytes,
            self.bad_slots,
            if self.intact { "" } else { ", not intact" }
        )
    }
}

/// A record in the ring was written by another format version: refuse, as for
/// superblocks, rather than fall back to an older record and lose extents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlVersionFault {
    pub slot: usize,
    pub found: u32,
}

/// Pick the newest valid record from the decoded slots (index = slot) and
/// judge whether the ring is intact (see [`ActivitySnapshot::intact`]).
pub fn select_newest(
    slots: &[Result<ActivityRecord, SlotFault>],
) -> Result<ActivitySnapshot, AlVersionFault> {
    assert_eq!(slots.len() as u64, AL_SLOT_COUNT, "one entry per slot");
    for (slot, s) in slots.iter().enumerate() {
        if let Err(SlotFault::UnsupportedVersion { found }) = s {
            return Err(AlVersionFault {
                slot,
                found: *found,
            });
        }
    }
    let newest = slots
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .max_by_key(|r| r.txn);
    let bad_slots = slots
        .iter()
        .filter(|s| matches!(s, Err(f) if *f != SlotFault::Zeroed))
        .count() as u32;
    let txn = newest.map_or(0, |r| r.txn);
    let torn_allowed = al_slot_of(txn + 1);
    let intact = slots.iter().enumerate().all(|(slot, s)| {
        if slot == torn_allowed {
            return true;
        }
        match s {
            // Decode already checked txn ≡ slot; txn ≤ newest holds by choice.
            Ok(_) => true,
            // Zero is fine only where no transaction in 1..=txn belongs: slot 0
            // before txn 64, slot s > 0 before txn s.
            Err(SlotFault::Zeroed) => {
                if slot == 0 {
                    txn < AL_SLOT_COUNT
                } else {
                    (slot as u64) > txn
                }
            }
            Err(_) => false,
        }
    });
    Ok(match newest {
        Some(r) => ActivitySnapshot {
            txn: r.txn,
            extent_bytes: r.extent_bytes,
            extents: r.extents.clone(),
            bad_slots,
            intact,
        },
        None => ActivitySnapshot {
            bad_slots,
            intact,
            ..ActivitySnapshot::empty()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: AlGeometry = AlGeometry {
        size_bytes: 64 << 20, // 16 extents of 4 MiB
        block_size: 4096,
    };

    fn rec(txn: u64, extents: &[u32]) -> ActivityRecord {
        ActivityRecord {
            txn,
            extent_bytes: 4 << 20,
            extents: extents.to_vec(),
        }
    }

    fn history(last_txn: u64) -> Vec<Result<ActivityRecord, SlotFault>> {
        let mut slots: Vec<_> = (0..64).map(|_| Err(SlotFault::Zeroed)).collect();
        for txn in 1..=last_txn {
            slots[al_slot_of(txn)] = Ok(rec(txn, &[(txn % 16) as u32]));
        }
        slots
    }

    #[test]
    fn extents_max_is_what_fits() {
        assert_eq!(AL_EXTENTS_MAX, 1015);
        assert_eq!(AL_HEADER_LEN_BYTES + 4 * AL_EXTENTS_MAX + 4, RECORD_LEN);
    }

    #[test]
    fn record_round_trips_and_layout_matches_the_doc() {
        let r = rec(65, &[0, 3, 15]);
        let b = r.encode();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0..8], b"TANDEMAL");
        assert_eq!(u32_at(&b, 8), AL_RECORD_VERSION);
        assert_eq!(u32_at(&b, 12), 3);
        assert_eq!(u64_at(&b, 16), 65);
        assert_eq!(u64_at(&b, 24), 4 << 20);
        assert_eq!(u32_at(&b, 36), 3);
        assert_eq!(u32_at(&b, 4092), crc32fast::hash(&b[..4092]));
        assert_eq!(ActivityRecord::decode(&b, 1, GEO), Ok(r));
    }

    #[test]
    fn checksummed_invalid_fields_are_rejected() {
        let resign = |mut b: Vec<u8>| {
            let crc = crc32fast::hash(&b[..RECORD_CRC_OFFSET]);
            b[RECORD_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let good = rec(5, &[1, 2]).encode();
        let field_of = |b: Vec<u8>, slot: usize| match ActivityRecord::decode(&b, slot, GEO) {
            Err(SlotFault::BadField { field, .. }) => field,
            other => panic!("expected a bad field, got {other:?}"),
        };
        assert_eq!(
            field_of(good.clone(), 6),
            "transaction number for this slot"
        );
        let mut b = good.clone();
        b[12..16].copy_from_slice(&1016u32.to_le_bytes());
        assert_eq!(field_of(resign(b), 5), "extent count");
        let mut b = good.clone();
        b[24..32].copy_from_slice(&(3u64 << 20).to_le_bytes());
        assert_eq!(field_of(resign(b), 5), "extent size");
        let mut b = good.clone();
        b[24..32].copy_from_slice(&2048u64.to_le_bytes());
        assert_eq!(field_of(resign(b), 5), "extent size");
        let mut b = good.clone();
        b[36..40].copy_from_slice(&16u32.to_le_bytes()); // volume has extents 0..16
        assert_eq!(field_of(resign(b), 5), "extent index beyond the volume");
        let mut b = good.clone();
        b[36..40].copy_from_slice(&1u32.to_le_bytes()); // duplicate
        assert_eq!(field_of(resign(b), 5), "extent index out of order");
        let mut b = good.clone();
        b[100] = 1;
        assert_eq!(field_of(resign(b), 5), "padding byte offset");
        let mut b = good.clone();
        b[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(field_of(resign(b), 0), "transaction number for this slot");
        let mut b = good;
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            ActivityRecord::decode(&resign(b), 5, GEO),
            Err(SlotFault::UnsupportedVersion { found: 2 })
        );
    }

    #[test]
    fn damage_is_told_apart_from_zero() {
        let mut b = rec(5, &[1]).encode();
        b[40] ^= 1;
        assert!(matches!(
            ActivityRecord::decode(&b, 5, GEO),
            Err(SlotFault::BadCrc { .. })
        ));
        assert_eq!(
            ActivityRecord::decode(&[0; 4096], 5, GEO),
            Err(SlotFault::Zeroed)
        );
        assert_eq!(
            ActivityRecord::decode(&[0; 100], 5, GEO),
            Err(SlotFault::Short { len_bytes: 100 })
        );
        assert_eq!(
            ActivityRecord::decode(&[0xA5; 4096], 5, GEO),
            Err(SlotFault::BadMagic)
        );
    }

    #[test]
    fn newest_wins_and_a_clean_history_is_intact() {
        for last in [0, 1, 5, 63, 64, 65, 200] {
            let s = select_newest(&history(last)).unwrap();
            assert_eq!(s.txn, last);
            assert!(s.intact, "history to {last}");
            assert_eq!(s.bad_slots, 0);
        }
    }

    #[test]
    fn only_a_torn_next_slot_keeps_the_ring_intact() {
        let mut slots = history(100);
        slots[al_slot_of(101)] = Err(SlotFault::BadMagic);
        let s = select_newest(&slots).unwrap();
        assert_eq!((s.txn, s.bad_slots, s.intact), (100, 1, true));

        // The newest record itself destroyed: looks like a torn 100, falls back to 99.
        let mut slots = history(100);
        slots[al_slot_of(100)] = Err(SlotFault::BadMagic);
        let s = select_newest(&slots).unwrap();
        assert_eq!((s.txn, s.bad_slots, s.intact), (99, 1, true));

        // Two damaged slots cannot be one torn write.
        let mut slots = history(100);
        slots[al_slot_of(100)] = Err(SlotFault::BadMagic);
        slots[al_slot_of(80)] = Err(SlotFault::BadMagic);
        let s = select_newest(&slots).unwrap();
        assert_eq!((s.txn, s.bad_slots, s.intact), (99, 2, false));

        // A slot that should hold a record but is zero was wiped.
        let mut slots = history(100);
        slots[al_slot_of(70)] = Err(SlotFault::Zeroed);
        assert!(!select_newest(&slots).unwrap().intact);
        let mut slots = history(10);
        slots[3] = Err(SlotFault::Zeroed);
        assert!(!select_newest(&slots).unwrap().intact);
    }

    #[test]
    fn all_garbage_is_empty_and_not_intact() {
        let slots: Vec<_> = (0..64).map(|_| Err(SlotFault::BadMagic)).collect();
        let s = select_newest(&slots).unwrap();
        assert_eq!((s.txn, s.bad_slots, s.intact), (0, 64, false));
        assert!(s.extents.is_empty());
    }

    #[test]
    fn a_newer_version_anywhere_is_refused() {
        let mut slots = history(100);
        slots[7] = Err(SlotFault::UnsupportedVersion { found: 2 });
        assert_eq!(
            select_newest(&slots),
            Err(AlVersionFault { slot: 7, found: 2 })
        );
    }
}
