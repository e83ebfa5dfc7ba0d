//! What a node starts with, from its persisted metadata, and every transition of
//! its superblock (sans-IO: functions from old state to new state; the agent
//! writes what they return).
//!
//! G3 after a crash: what may differ from the peer is the persisted bitmap plus
//! every extent the activity log names; those extents are probably identical, so
//! they are compared by hash. Without trustworthy metadata every block is compared
//! by hash: never assumed in sync, never a blind full copy.

use crate::bitmap::DirtyBitmap;
use crate::meta::{ActivitySnapshot, Superblock};
use crate::types::{BlockCount, BlockIndex, ByteRange, DiskState, Generation, Role};

/// How the metadata says the previous run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// A clean stop: the persisted bitmap is exact.
    Clean { out_of_sync_blocks: u64 },
    /// An unclean stop: the bitmap's blocks are resent, the activity log's extents
    /// compared by hash.
    Crash {
        active_extents: usize,
        compare_blocks: u64,
        send_blocks: u64,
    },
    /// The disk failed a write or fdatasync (started with --force): every block
    /// is compared by hash.
    Poisoned { compare_blocks: u64 },
    /// The metadata cannot say what changed: every block is compared by hash.
    Unknown {
        bitmap_valid: bool,
        activity_log_intact: bool,
    },
}

/// What a primary starts with.
#[derive(Clone, Debug)]
pub struct PrimaryStart {
    /// To persist before serving (with `covered` as the bitmap and an empty
    /// activity log): the new role and generation, not a clean shutdown.
    pub sb: Superblock,
    /// Blocks the secondary may lack (sent as data).
    pub dirty: DirtyBitmap,
    /// Blocks that may differ but probably do not (compared by hash first).
    pub verify: DirtyBitmap,
    pub recovery: Recovery,
    /// This start promoted a secondary: the generation it left.
    pub promoted_from: Option<Generation>,
}

impl PrimaryStart {
    /// The bitmap to persist before serving: once it covers everything the old
    /// activity log did, the log starts empty.
    pub fn covered(&self) -> DirtyBitmap {
        let mut covered = self.dirty.clone();
        covered.union_with(&self.verify);
        covered
    }
}

/// Why a node may not become primary.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartRefusal {
    #[error(
        "this node's disk holds no consistent image ({disk}: its first full copy never completed); \
         refusing to serve it as primary. Resync it from its peer first, or remove its metadata \
         to start it as a new primary"
    )]
    NoConsistentImage { disk: String },
    #[error(
        "this node's disk is Outdated: its peer wrote while it was away, so it lacks writes \
         (consistent, but older). Promote the peer instead, or promote this node with --force to \
         serve the older data (the peer's newer writes then make a split brain)"
    )]
    Outdated,
    #[error(
        "this node stopped as a secondary without copying its redo journal into its volume (it crashed, \
         or a checkpoint was interrupted): its volume alone is not its replica. Start it as secondary \
         first (tandem secondary; the journal is replayed), then promote it (tandem promote), which \
         copies the consistent image into the volume"
    )]
    JournalNotCopied,
    #[error(
        "this node's disk failed a write or an fdatasync (it is poisoned): blocks it acknowledged may \
         not be on it. Check the disk, then promote its peer instead, or start this node as secondary \
         (its peer compares every block with it) or promote it with --force (it compares every block \
         with its peer and sends its own data where they differ)"
    )]
    Poisoned,
    // ha (issue 12): `tandem invalidate`.
    #[error(
        "this node was invalidated (tandem invalidate): its data was discarded and is owed a full \
         resync from its peer, which has not completed; refusing to serve it as primary. Promote \
         the peer instead and let this node resync from it"
    )]
    Invalidated,
}

fn extent_blocks(
    activity: &ActivitySnapshot,
    e: u32,
    size_bytes: u64,
    block_size: u32,
) -> (BlockIndex, BlockIndex) {
    let start = e as u64 * activity.extent_bytes;
    ByteRange::new(
        start,
        activity.extent_bytes.min(size_bytes.saturating_sub(start)),
    )
    .blocks(block_size)
}

/// The primary role starts (a new primary, a restart, or a promotion).
///
/// The caller makes the volume durable (fdatasync) before it uses this plan: a
/// kill -9 leaves the previous run's writes in the page cache, where a power loss
/// may still undo them, and once this run's resync has cleared their blocks from
/// the bitmap nothing would cover them (found by the simulator, seed 20988 sync).
pub fn primary_start(
    sb: &Superblock,
    bitmap: &DirtyBitmap,
    activity: &ActivitySnapshot,
    force: bool,
    now_s: u64,
) -> Result<PrimaryStart, StartRefusal> {
    let mut sb = sb.clone();
    let mut promoted_from = None;
    if sb.poisoned && !force {
        // Issue 9 item 5: nothing is served as durable after a failed write.
        return Err(StartRefusal::Poisoned);
    }
    if sb.role == Role::Secondary || sb.is_new {
        if full_sync_owed(&sb) {
            // ha (issue 12): its data was discarded on purpose; --force does not
            // bring it back.
            return Err(StartRefusal::Invalidated);
        }
        // G8: taking the primary role starts a new generation.
        match sb.disk_state {
            _ if sb.is_new => {
                return Err(StartRefusal::NoConsistentImage { disk: "new".into() });
            }
            DiskState::Inconsistent => {
                return Err(StartRefusal::NoConsistentImage {
                    disk: "Inconsistent".into(),
                });
            }
            DiskState::Outdated if !force => return Err(StartRefusal::Outdated),
            DiskState::Outdated | DiskState::UpToDate => {}
        }
        if sb.role == Role::Secondary && (!sb.clean_shutdown || sb.volume_mixed) {
            // Issue 10: the replica is the volume plus the journal's records.
            return Err(StartRefusal::JournalNotCopied);
        }
        promoted_from = Some(sb.gen_current);
        sb = promote(&sb, now_s);
    }
    let size_bytes = sb.size_bytes;
    let block_size = sb.block_size;
    let mut verify = DirtyBitmap::for_volume(size_bytes, block_size);
    let mut dirty = bitmap.clone();
    let recovery = if sb.poisoned {
        // Forced: the persisted bitmap covers every block from here on, so the flag
        // may go (a crash before the comparison ends resends everything).
        let mut cursor = BlockIndex(0);
        verify.mark_all();
        while let Some((first, n)) = dirty.next_dirty_run(cursor, BlockCount(u64::MAX)) {
            verify.clear(first, BlockIndex(first.0 + n.0));
            cursor = BlockIndex(first.0 + n.0);
        }
        sb.poisoned = false;
        Recovery::Poisoned {
            compare_blocks: verify.dirty_count().0,
        }
    } else if sb.clean_shutdown && sb.bitmap_valid {
        Recovery::Clean {
            out_of_sync_blocks: dirty.dirty_count().0,
        }
    } else if sb.bitmap_valid && activity.intact {
        for &e in &activity.extents {
            let (a, b) = extent_blocks(activity, e, size_bytes, block_size);
            verify.mark(a, b);
        }
        // Blocks already in the bitmap are sent as data, not compared.
        let mut cursor = BlockIndex(0);
        while let Some((first, n)) = dirty.next_dirty_run(cursor, BlockCount(u64::MAX)) {
            verify.clear(first, BlockIndex(first.0 + n.0));
            cursor = BlockIndex(first.0 + n.0);
        }
        Recovery::Crash {
            active_extents: activity.extents.len(),
            compare_blocks: verify.dirty_count().0,
            send_blocks: dirty.dirty_count().0,
        }
    } else {
        dirty.clear_all();
        verify.mark_all();
        Recovery::Unknown {
            bitmap_valid: sb.bitmap_valid,
            activity_log_intact: activity.intact,
        }
    };
    sb.clean_shutdown = false;
    sb.bitmap_valid = true;
    Ok(PrimaryStart {
        sb,
        dirty,
        verify,
        recovery,
        promoted_from,
    })
}

/// A secondary becomes primary: a new generation whose base is what its peer is
/// known to hold (G8).
pub fn promote(sb: &Superblock, now_s: u64) -> Superblock {
    let mut sb = sb.clone();
    let new_gen = Generation::random();
    // The peer is known to hold (at most) the old generation, plus what this node
    // writes from now on: the bitmap is relative to it. An UpToDate secondary never
    // has a base unless it was primary and diverged before; keep the older one,
    // its bitmap covers both.
    let base = if sb.gen_bitmap_base != Generation::NONE {
        sb.gen_bitmap_base
    } else {
        sb.gen_current
    };
    sb.gen_history = [sb.gen_current, sb.gen_history[0]];
    sb.gen_current = new_gen;
    sb.gen_bitmap_base = base;
    sb.promoted_at_s = now_s;
    sb.role = Role::Primary;
    sb.disk_state = DiskState::UpToDate;
    sb
}

/// What a secondary starts with: what it changed itself (as primary) that its peer
/// may lack, from its metadata.
#[derive(Clone, Debug)]
pub struct SecondaryStart {
    pub sb: Superblock,
    /// Blocks it changed (its persisted bitmap, a node that was primary).
    pub own_dirty: DirtyBitmap,
    /// Blocks it may have changed (active extents of a crash while primary).
    pub own_verify: DirtyBitmap,
    /// It was primary and is demoted by this start.
    pub demoted: bool,
}

/// The secondary role starts (a new node, a restart, or a demotion).
///
/// The caller makes the volume and the journal durable first: records a kill -9
/// left in the page cache are recovered as valid, and must be on disk before this
/// node counts them (a consistent point, a generation adopted) in its metadata.
pub fn secondary_start(
    sb: &Superblock,
    bitmap: &DirtyBitmap,
    activity: &ActivitySnapshot,
) -> SecondaryStart {
    let mut sb = sb.clone();
    let size_bytes = sb.size_bytes;
    let block_size = sb.block_size;
    let demoted = sb.role == Role::Primary;
    sb.role = Role::Secondary;
    let mut dirty = bitmap.clone();
    let mut verify = DirtyBitmap::for_volume(size_bytes, block_size);
    if sb.is_new {
        dirty.clear_all();
    } else if !sb.bitmap_valid {
        dirty.clear_all();
        verify.mark_all();
    } else if sb.poisoned {
        // A failed write or fdatasync: every block is compared (its own changes
        // are still sent as such). The flag stays until the primary has compared
        // them (the agent clears it at the next consistent point).
        verify.mark_all();
        let mut cursor = BlockIndex(0);
        while let Some((first, n)) = dirty.next_dirty_run(cursor, BlockCount(u64::MAX)) {
            verify.clear(first, BlockIndex(first.0 + n.0));
            cursor = BlockIndex(first.0 + n.0);
        }
    } else if !sb.clean_shutdown {
        if activity.intact {
            for &e in &activity.extents {
                let (a, b) = extent_blocks(activity, e, size_bytes, block_size);
                verify.mark(a, b);
            }
        } else {
            verify.mark_all();
        }
        let mut cursor = BlockIndex(0);
        while let Some((first, n)) = dirty.next_dirty_run(cursor, BlockCount(u64::MAX)) {
            verify.clear(first, BlockIndex(first.0 + n.0));
            cursor = BlockIndex(first.0 + n.0);
        }
    }
    sb.clean_shutdown = false;
    sb.bitmap_valid = true;
    SecondaryStart {
        sb,
        own_dirty: dirty,
        own_verify: verify,
        demoted,
    }
}

/// Whether a starting secondary may take its volume (with the journal's records
/// after it) as a consistent image: a node that holds one (not new, not a sync
/// target, not mixed by a cut checkpoint) and whose disk never failed. A poisoned
/// node (a failed write or fdatasync, here or while it was primary) may lack
/// blocks it acknowledged: it claims no consistent point until the primary has
/// compared every block (sim seed 301491 sync: a poisoned primary, demoted by a
/// planned switchover, reported its volume as a consistent image without two
/// blocks whose fdatasync had failed).
pub fn volume_consistent_at_start(sb: &Superblock) -> bool {
    !sb.is_new && sb.disk_state != DiskState::Inconsistent && !sb.volume_mixed && !sb.poisoned
}

/// What a secondary tells the handshake of its own image: (it held a consistent
/// image, so its generations count; it is a sync target that has not finished).
/// A poisoned node has no consistent point now, but its generations still say
/// what it held before the failure: they are compared (a split brain is still
/// one), its every block is compared by the resync (`secondary_start` marks
/// them), and it is no sync target, whatever its engine's open section says
/// (the engine treats its image as mixed until that comparison ends).
pub fn handshake_image(
    sb: &Superblock,
    section_open: bool,
    has_consistent_point: bool,
) -> (bool, bool) {
    if sb.poisoned && !sb.is_new && sb.disk_state != DiskState::Inconsistent {
        return (true, false);
    }
    (has_consistent_point, section_open)
}

/// A secondary restarts and its journal holds the end of a resync section (or of
/// its first full copy) that its superblock never recorded: the crash came after
/// the end marker was durable and before the superblock said so. Its image is
/// then the generation it was the sync target of (its bitmap base, which it never
/// held itself), recorded now as the consistent point would have been. Without
/// this the handshake compared a generation-less (or older) superblock with a
/// journal that holds a complete copy and refused the pair as unrelated (the
/// simulator, seed 100714 async). None when nothing is to be recorded.
pub fn recovered_sync_end(
    sb: &Superblock,
    section_open: bool,
    has_consistent_point: bool,
) -> Option<Superblock> {
    let base = sb.gen_bitmap_base;
    let sync_target = sb.role == Role::Secondary
        && !sb.is_new
        && base != Generation::NONE
        && base != sb.gen_current
        && !sb.gen_history.contains(&base);
    // An invalidated node's journal is dropped at start; nothing it held is adopted.
    (sync_target && !section_open && has_consistent_point && !full_sync_owed(sb))
        .then(|| adopt_generation(sb, base))
}

/// The consistent point a secondary recovered from its journal at start, as
/// (seq, at_ms) of its newest write, when the superblock does not hold it yet
/// (the point became durable after the last superblock write, or its sync ended
/// in a crash): the superblock to write before anything else, as
/// `MarkConsistent` would have. Without it, a checkpoint that releases the
/// records before the point (the volume still mixed) leaves the superblock's
/// older write the only record of it, and the next restart reports that one
/// (sim seed 719557 sync: 0 ms where 316 ms had been durable).
pub fn recovered_consistent_write(
    sb: &Superblock,
    point: Option<(u64, u64)>,
) -> Option<Superblock> {
    let (seq, at_ms) = point?;
    let newer =
        at_ms >= sb.consistent_at_ms && (seq, at_ms) != (sb.consistent_seq, sb.consistent_at_ms);
    newer.then(|| {
        let mut sb = sb.clone();
        sb.consistent_seq = seq;
        sb.consistent_at_ms = at_ms;
        sb
    })
}

/// The first write accepted while the peer is away starts a new generation, made
/// durable before the write is: if the peer is promoted meanwhile, both sides then
/// hold new generations from one common one, and the reconnect sees a split brain
/// instead of silently rolling these writes back (G8).
pub fn start_generation_alone(sb: &Superblock) -> Superblock {
    let mut sb = sb.clone();
    let old = sb.gen_current;
    sb.gen_history = [old, sb.gen_history[0]];
    sb.gen_current = Generation::random();
    sb.gen_bitmap_base = old;
    sb
}

/// The peer holds this node's current generation (a resync completed, or nothing
/// needed sending): the bitmap is relative to it from now on.
pub fn peer_reached_generation(sb: &Superblock) -> Superblock {
    let mut sb = sb.clone();
    sb.gen_bitmap_base = Generation::NONE;
    sb
}

/// A new secondary takes the primary's volume identity at its first handshake
/// (G6), before anything is written; it has no consistent image until its first
/// full copy completes.
pub fn adopt_identity(
    sb: &Superblock,
    volume_id: crate::types::VolumeId,
    sync_target: Generation,
) -> Superblock {
    let mut sb = sb.clone();
    sb.volume_id = volume_id;
    sb.is_new = false;
    sb.disk_state = DiskState::Inconsistent;
    sb.gen_bitmap_base = sync_target;
    sb
}

/// A secondary's resync from `primary` begins: the generation it is a sync target
/// of (an interrupted resync resumes from that primary's bitmap).
pub fn sync_target(sb: &Superblock, primary: Generation) -> Superblock {
    let mut sb = sb.clone();
    sb.gen_bitmap_base = primary;
    sb
}

/// A resync from `primary` completed: its generation is now this node's, nothing
/// this node changed on its own remains, and its image is consistent.
pub fn adopt_generation(sb: &Superblock, primary: Generation) -> Superblock {
    let mut sb = sb.clone();
    if sb.gen_current != primary {
        sb.gen_history = [sb.gen_current, sb.gen_history[0]];
        sb.gen_current = primary;
    }
    sb.gen_bitmap_base = Generation::NONE;
    sb.disk_state = DiskState::UpToDate;
    sb
}

/// ha (issue 12): `tandem invalidate` on a secondary. Its data is discarded: the
/// disk is Inconsistent (never promoted, never reported UpToDate) and a full
/// resync is owed, recorded as a resync cursor at block 0. The agent writes this
/// durably BEFORE it drops its journal's records, and a start that finds it drops
/// whatever the journal still holds: the handshake then plans a full resync
/// ([`crate::engine::handshake::Why::Invalidated`]) whatever the generations say,
/// and only the end of that resync ([`full_sync_completed`]) clears it. A crash
/// at any point in between comes back owing the full resync, never UpToDate.
pub fn invalidate(sb: &Superblock) -> Superblock {
    let mut sb = sb.clone();
    sb.disk_state = DiskState::Inconsistent;
    sb.resync_cursor = Some(BlockIndex(0));
    // The journal's records go (a start recreates it): no record it named is
    // kept, and nothing before the full resync's end is consistent anyway.
    sb.mixed_through = 0;
    sb
}

/// A full resync is owed to this node (it was invalidated and the resync has not
/// completed): see [`invalidate`].
pub fn full_sync_owed(sb: &Superblock) -> bool {
    sb.resync_cursor.is_some()
}

/// The node's image is consistent again after a full resync: nothing is owed.
pub fn full_sync_completed(sb: &Superblock) -> Superblock {
    let mut sb = sb.clone();
    sb.resync_cursor = None;
    sb
}

/// The peer wrote without this node (it told us, or fencing did): this node's
/// data is consistent but older (G8).
pub fn outdate(sb: &Superblock) -> Superblock {
    let mut sb = sb.clone();
    if sb.disk_state == DiskState::UpToDate {
        sb.disk_state = DiskState::Outdated;
    }
    sb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::VolumeId;

    fn sb(role: Role, disk: DiskState) -> Superblock {
        Superblock {
            volume_id: VolumeId([1; 16]),
            size_bytes: 64 * 4096,
            block_size: 4096,
            role,
            disk_state: disk,
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
        }
    }

    fn activity(extents: &[u32]) -> ActivitySnapshot {
        let mut a = ActivitySnapshot::empty();
        a.extent_bytes = 4 * 4096;
        a.extents = extents.to_vec();
        a.txn = 1;
        a.intact = true;
        a
    }

    #[test]
    fn promotion_starts_a_generation_based_on_the_old_one() {
        let s = sb(Role::Secondary, DiskState::UpToDate);
        let bm = DirtyBitmap::for_volume(64 * 4096, 4096);
        let p = primary_start(&s, &bm, &ActivitySnapshot::empty(), false, 9).unwrap();
        assert_eq!(p.promoted_from, Some(Generation(7)));
        assert_eq!(p.sb.gen_bitmap_base, Generation(7));
        assert_eq!(p.sb.gen_history[0], Generation(7));
        assert_ne!(p.sb.gen_current, Generation(7));
        assert_eq!(p.sb.role, Role::Primary);
        assert!(!p.sb.clean_shutdown, "running: not clean until it stops");
    }

    #[test]
    fn only_a_consistent_disk_is_promoted_and_outdated_only_with_force() {
        let bm = DirtyBitmap::for_volume(64 * 4096, 4096);
        let none = ActivitySnapshot::empty();
        let s = sb(Role::Secondary, DiskState::Inconsistent);
        assert!(matches!(
            primary_start(&s, &bm, &none, true, 0),
            Err(StartRefusal::NoConsistentImage { .. })
        ));
        let s = sb(Role::Secondary, DiskState::Outdated);
        assert_eq!(
            primary_start(&s, &bm, &none, false, 0).unwrap_err(),
            StartRefusal::Outdated
        );
        assert!(primary_start(&s, &bm, &none, true, 0).is_ok());
    }

    #[test]
    fn a_secondary_whose_journal_was_not_copied_is_not_started_as_primary() {
        let bm = DirtyBitmap::for_volume(64 * 4096, 4096);
        let none = ActivitySnapshot::empty();
        let mut s = sb(Role::Secondary, DiskState::UpToDate);
        s.clean_shutdown = false;
        assert_eq!(
            primary_start(&s, &bm, &none, true, 0).unwrap_err(),
            StartRefusal::JournalNotCopied,
            "a crashed secondary's journal holds part of its image"
        );
        s.clean_shutdown = true;
        s.volume_mixed = true;
        assert_eq!(
            primary_start(&s, &bm, &none, true, 0).unwrap_err(),
            StartRefusal::JournalNotCopied
        );
        s.volume_mixed = false;
        assert!(primary_start(&s, &bm, &none, false, 0).is_ok());
    }

    #[test]
    fn a_crashed_primary_resends_its_bitmap_and_compares_its_active_extents() {
        let mut s = sb(Role::Primary, DiskState::UpToDate);
        s.clean_shutdown = false;
        let mut bm = DirtyBitmap::for_volume(64 * 4096, 4096);
        bm.mark(BlockIndex(5), BlockIndex(6));
        let p = primary_start(&s, &bm, &activity(&[1, 3]), false, 0).unwrap();
        assert!(p.dirty.is_dirty(BlockIndex(5)));
        assert!(!p.verify.is_dirty(BlockIndex(5)), "sent, not compared");
        assert_eq!(p.verify.dirty_count().0, 7, "extents 1 and 3 minus block 5");
        let torn = ActivitySnapshot {
            intact: false,
            ..activity(&[1])
        };
        let p = primary_start(&s, &bm, &torn, false, 0).unwrap();
        assert_eq!(
            p.verify.dirty_count().0,
            64,
            "an incomplete log: compare everything"
        );
    }

    /// Issue 9 item 5: a failed write or fdatasync is remembered across restarts.
    /// Sim seed 301491 sync: a demoted poisoned primary took its volume as a
    /// consistent image. It claims none now, but its generations still count.
    #[test]
    fn a_poisoned_node_claims_no_consistent_image_but_its_generations_count() {
        let mut s = sb(Role::Secondary, DiskState::UpToDate);
        assert!(volume_consistent_at_start(&s));
        assert_eq!(handshake_image(&s, false, true), (true, false));
        s.poisoned = true;
        assert!(!volume_consistent_at_start(&s));
        // The engine then holds no point and has its image open as a section.
        assert_eq!(
            handshake_image(&s, true, false),
            (true, false),
            "generations compared (a split brain stays one), no sync target"
        );
        s.disk_state = DiskState::Outdated;
        assert_eq!(handshake_image(&s, true, false), (true, false));
        // A sync target that never finished before its disk failed: nothing
        // to keep (a checkpoint of a poisoned node leaves its state alone).
        s.disk_state = DiskState::Inconsistent;
        assert_eq!(handshake_image(&s, true, false), (false, true));
        s.disk_state = DiskState::UpToDate;
        s.is_new = true;
        assert!(!volume_consistent_at_start(&s));
        assert_eq!(handshake_image(&s, false, false), (false, false));
    }

    #[test]
    fn a_poisoned_node_is_not_served_as_primary_without_force_and_compares_every_block() {
        let mut bm = DirtyBitmap::for_volume(64 * 4096, 4096);
        bm.mark(BlockIndex(2), BlockIndex(3));
        let none = ActivitySnapshot::empty();
        let mut s = sb(Role::Primary, DiskState::UpToDate);
        s.poisoned = true;
        assert_eq!(
            primary_start(&s, &bm, &none, false, 0).unwrap_err(),
            StartRefusal::Poisoned
        );
        let p = primary_start(&s, &bm, &none, true, 0).unwrap();
        assert_eq!(p.recovery, Recovery::Poisoned { compare_blocks: 63 });
        assert!(
            p.dirty.is_dirty(BlockIndex(2)),
            "its own changes are still sent"
        );
        assert_eq!(p.covered().dirty_count().0, 64, "persisted before serving");
        assert!(!p.sb.poisoned, "the bitmap covers every block instead");

        let mut s = sb(Role::Secondary, DiskState::UpToDate);
        s.poisoned = true;
        assert_eq!(
            primary_start(&s, &bm, &none, false, 0).unwrap_err(),
            StartRefusal::Poisoned
        );
        let st = secondary_start(&s, &bm, &none);
        assert!(
            st.sb.poisoned,
            "kept until the primary has compared every block"
        );
        assert_eq!(st.own_verify.dirty_count().0, 63);
        assert!(st.own_dirty.is_dirty(BlockIndex(2)));
    }

    /// ha (issue 12): an invalidated node owes a full resync until one completes,
    /// across restarts (the superblock says so), and is never promoted meanwhile.
    #[test]
    fn an_invalidated_secondary_owes_a_full_resync_and_is_not_promoted() {
        let bm = DirtyBitmap::for_volume(64 * 4096, 4096);
        let none = ActivitySnapshot::empty();
        let s = invalidate(&sb(Role::Secondary, DiskState::UpToDate));
        assert!(full_sync_owed(&s));
        assert_eq!(s.disk_state, DiskState::Inconsistent);
        assert_eq!(s.gen_current, Generation(7), "the identity stays");
        for force in [false, true] {
            assert_eq!(
                primary_start(&s, &bm, &none, force, 0).unwrap_err(),
                StartRefusal::Invalidated
            );
        }
        // A restart (crash or not) keeps owing it.
        let mut crashed = s.clone();
        crashed.clean_shutdown = false;
        let st = secondary_start(&crashed, &bm, &none);
        assert!(full_sync_owed(&st.sb));
        assert_eq!(st.sb.disk_state, DiskState::Inconsistent);
        // A resync's end adopting the primary's generation clears it only with
        // full_sync_completed.
        let adopted = adopt_generation(&st.sb, Generation(9));
        assert!(full_sync_owed(&adopted));
        let mut done = full_sync_completed(&adopted);
        assert!(!full_sync_owed(&done));
        assert_eq!(done.disk_state, DiskState::UpToDate);
        done.clean_shutdown = true; // then stopped cleanly
        assert!(primary_start(&done, &bm, &none, false, 0).is_ok());
    }

    #[test]
    fn a_sync_end_the_superblock_missed_is_recorded_at_restart() {
        let mut s = sb(Role::Secondary, DiskState::Inconsistent);
        s.gen_current = Generation::NONE;
        s.gen_bitmap_base = Generation(9);
        let adopted = recovered_sync_end(&s, false, true).expect("recorded");
        assert_eq!(adopted.gen_current, Generation(9));
        assert_eq!(adopted.disk_state, DiskState::UpToDate);
        assert_eq!(adopted.gen_bitmap_base, Generation::NONE);
        assert!(
            recovered_sync_end(&s, true, true).is_none(),
            "still in the section"
        );
        assert!(recovered_sync_end(&s, false, false).is_none(), "no image");
        // A node promoted from generation 7 keeps 7 as its base: not a sync target.
        let mut p = sb(Role::Secondary, DiskState::UpToDate);
        p.gen_current = Generation(8);
        p.gen_bitmap_base = Generation(7);
        p.gen_history = [Generation(7), Generation::NONE];
        assert!(recovered_sync_end(&p, false, true).is_none());
    }
}
