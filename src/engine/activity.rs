//! The set of active extents of the write-intent (activity) log
//! (ARCHITECTURE §4), sans-IO: writes begin and end, the set says when it
//! changed and must be persisted.
//!
//! This module owns the decision of which extents are active and when an
//! extent may be retired. It does not write anything: the caller persists a
//! [`Transition`] with `MetaStore::write_activity` (after persisting the
//! bitmap bits of its retired extents), and only then starts the write.
//!
//! Rules:
//! - Before a write may start, every extent it touches is active and
//!   recorded durably. A write to extents already active costs no metadata
//!   I/O; activating costs one durable write of the whole set (one 4 KiB
//!   record, see `meta::al`).
//! - An extent with a write in flight (refcount > 0, "pinned") is never
//!   retired: after a crash it might differ from the peer.
//! - Extents retire lazily: only when room is needed for a new one, least
//!   recently begun first, and only while idle (refcount 0). So a hot set
//!   that fits stays active and costs nothing.
//!
//! Cost per operation: O((k + r) log n) for a write touching k extents that
//! retires r, over n active extents (a `HashMap` by extent and a `BTreeSet`
//! of idle extents ordered by last use). Producing the active list for a
//! transition is O(n log n), n ≤ 1015, once per activation, which is already
//! paying for an fdatasync.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use crate::meta::AL_EXTENTS_MAX;

/// Default extent size: 4 MiB, DRBD's choice. The bitmap of an active extent
/// is 1024 blocks of 4 KiB, cheap to hash-compare after a crash.
pub const EXTENT_BYTES_DEFAULT: u64 = 4 << 20;
/// Default bound on active extents: 512 × 4 MiB = 2 GiB of hot data. After a
/// crash of the primary that is what gets hash-compared (a few seconds of
/// reading at 500 MB/s), against one AL write per newly touched 4 MiB.
pub const MAX_ACTIVE_DEFAULT: usize = 512;

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Tick of the last `begin` that touched this extent (LRU order).
    tick: u64,
    /// Writes in flight on this extent.
    refcount: u32,
}

/// The active extents and their in-flight write counts.
#[derive(Debug)]
pub struct ActiveSet {
    extent_bytes: u64,
    extent_shift: u32,
    max_active: usize,
    entries: HashMap<u32, Entry>,
    /// `(tick, extent)` of every entry with refcount 0: the retirement
    /// candidates, oldest first.
    idle: BTreeSet<(u64, u32)>,
    next_tick: u64,
}

/// The active set changed: persist the new set ([`ActiveSet::active`]) to the
/// activity log (after persisting the bitmap bits of `retired`) before starting
/// the write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Extents added by this `begin`, ascending.
    pub activated: Vec<u32>,
    /// Idle extents dropped to make room, ascending. Their dirty-bitmap bits
    /// must be durable before the new set is, since after a crash nothing
    /// else says they may differ.
    pub retired: Vec<u32>,
}

/// Every active extent is pinned by a write in flight, so none can be
/// retired to make room: wait for a write to end, then `begin` again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "activity log full: {needed} active extents must be retired to start this write but only \
     {retirable} are idle; wait for an in-flight write to complete"
)]
pub struct Full {
    pub needed: usize,
    pub retirable: usize,
}

impl ActiveSet {
    /// An empty set of `extent_bytes`-sized extents (a power of two), holding
    /// at most `max_active` (1..=[`AL_EXTENTS_MAX`]) extents.
    pub fn new(extent_bytes: u64, max_active: usize) -> Self {
        assert!(
            extent_bytes.is_power_of_two(),
            "extent size {extent_bytes} is not a power of two"
        );
        assert!(
            (1..=AL_EXTENTS_MAX).contains(&max_active),
            "max active extents {max_active} must be between 1 and {AL_EXTENTS_MAX}"
        );
        ActiveSet {
            extent_bytes,
            extent_shift: extent_bytes.trailing_zeros(),
            max_active,
            entries: HashMap::new(),
            idle: BTreeSet::new(),
            next_tick: 0,
        }
    }

    /// The set after a restart: `extents` (from the activity log, in
    /// `extent_bytes` units) are active and idle, oldest first in the given
    /// order. If there are more than `max_active` (the bound was lowered),
    /// all are kept, because forgetting one before its bitmap bits are
    /// persisted would lose it; the next activation retires the excess.
    pub fn from_snapshot(extent_bytes: u64, max_active: usize, extents: &[u32]) -> Self {
        let mut set = ActiveSet::new(extent_bytes, max_active);
        for &e in extents {
            let tick = set.tick();
            let previous = set.entries.insert(e, Entry { tick, refcount: 0 });
            assert!(
                previous.is_none(),
                "extent {e} listed twice in the snapshot"
            );
            set.idle.insert((tick, e));
        }
        set
    }

    fn tick(&mut self) -> u64 {
        let t = self.next_tick;
        self.next_tick = t.checked_add(1).expect("activity tick overflow");
        t
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    pub fn max_active(&self) -> usize {
        self.max_active
    }

    /// Extents a byte range touches; empty for `len` 0.
    ///
    /// Panics if the range overflows u64 or reaches extent index u32::MAX:
    /// the caller bounds ranges by the volume size first.
    pub fn extents_of(&self, offset: u64, len: u64) -> Range<u32> {
        let to_index = |byte: u64| {
            u32::try_from(byte >> self.extent_shift).unwrap_or_else(|_| {
                panic!(
                    "byte {byte} is beyond the last extent index of {}-byte extents",
                    self.extent_bytes
                )
            })
        };
        let first = to_index(offset);
        if len == 0 {
            return first..first;
        }
        let last_byte = offset
            .checked_add(len - 1)
            .expect("write range overflows u64");
        let last = to_index(last_byte);
        let end = last
            .checked_add(1)
            .expect("extent index u32::MAX is unusable");
        first..end
    }

    /// A write to `[offset, offset + len)` is about to start: pins its extents
    /// (refcount += 1) and makes them the most recently used.
    ///
    /// Returns `Ok(None)` when all of them were already active (no metadata
    /// I/O needed), `Ok(Some(transition))` when the set changed and the new
    /// set ([`Self::active`]) must be written to the activity log durably
    /// before the write starts, and `Err(Full)` (with nothing changed) when
    /// making room would need a pinned extent retired. The transition does not
    /// list the new set: one log write covers many transitions, and a sorted
    /// copy of ~1 000 extents per activation was ~5% of the CPU of random
    /// writes over a 64 GiB volume (issue 11).
    ///
    /// Panics if the write spans more than `max_active` extents: it could
    /// never be admitted, and request sizes are bounded long before that
    /// (32 MiB NBD requests span at most 9 extents of 4 MiB).
    pub fn begin(&mut self, offset: u64, len: u64) -> Result<Option<Transition>, Full> {
        let range = self.extents_of(offset, len);
        if range.is_empty() {
            return Ok(None);
        }
        assert!(
            range.len() <= self.max_active,
            "a write spanning {} extents can never fit {} active extents",
            range.len(),
            self.max_active
        );
        let activated: Vec<u32> = range
            .clone()
            .filter(|e| !self.entries.contains_key(e))
            .collect();
        // Room is made only when something is activated: a set over its bound
        // after a restart shrinks on the next activation, never silently.
        let needed = if activated.is_empty() {
            0
        } else {
            (self.entries.len() + activated.len()).saturating_sub(self.max_active)
        };
        let mut retired = Vec::with_capacity(needed);
        if needed > 0 {
            // Oldest idle extents first; those this write touches stay.
            retired.extend(
                self.idle
                    .iter()
                    .map(|&(_, e)| e)
                    .filter(|e| !range.contains(e))
                    .take(needed),
            );
            if retired.len() < needed {
                return Err(Full {
                    needed,
                    retirable: retired.len(),
                });
            }
        }
        for &e in &retired {
            let entry = self.entries.remove(&e).expect("retired extent is active");
            assert_eq!(entry.refcount, 0, "retired extent {e} is pinned");
            let was_idle = self.idle.remove(&(entry.tick, e));
            assert!(was_idle, "idle index lost extent {e}");
        }
        let tick = self.tick();
        for e in range {
            match self.entries.get_mut(&e) {
                Some(entry) => {
                    if entry.refcount == 0 {
                        let was_idle = self.idle.remove(&(entry.tick, e));
                        assert!(was_idle, "idle index lost extent {e}");
                    }
                    entry.tick = tick;
                    entry.refcount = entry
                        .refcount
                        .checked_add(1)
                        .expect("in-flight writes per extent overflow u32");
                }
                None => {
                    self.entries.insert(e, Entry { tick, refcount: 1 });
                }
            }
        }
        if activated.is_empty() {
            debug_assert!(retired.is_empty());
            return Ok(None);
        }
        retired.sort_unstable();
        Ok(Some(Transition { activated, retired }))
    }

    /// The write to `[offset, offset + len)` that `begin` admitted has
    /// completed (or failed): unpins its extents (refcount -= 1). They stay
    /// active; an idle extent retires only when room is needed.
    ///
    /// Panics if the range was not begun: refcounts would go wrong and an
    /// extent with a write in flight could be retired.
    pub fn end(&mut self, offset: u64, len: u64) {
        for e in self.extents_of(offset, len) {
            let entry = self
                .entries
                .get_mut(&e)
                .unwrap_or_else(|| panic!("end of a write to inactive extent {e}"));
            assert!(entry.refcount > 0, "end without begin on extent {e}");
            entry.refcount -= 1;
            if entry.refcount == 0 {
                self.idle.insert((entry.tick, e));
            }
        }
    }

    /// The active extents, ascending.
    pub fn active(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.entries.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The active extents among `extents`, in no particular order: a look-up of
    /// each of them or a walk of the set, whichever is shorter (a retirement
    /// asks about the extents of a few bitmap pages, 32 per page at 4 MiB).
    pub fn active_within(&self, extents: Range<u32>) -> Vec<u32> {
        if extents.len() <= self.entries.len() {
            extents.filter(|e| self.entries.contains_key(e)).collect()
        } else {
            self.entries
                .keys()
                .copied()
                .filter(|e| extents.contains(e))
                .collect()
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn is_active(&self, e: u32) -> bool {
        self.entries.contains_key(&e)
    }

    /// Writes in flight on extent `e` (0 if inactive).
    pub fn refcount(&self, e: u32) -> u32 {
        self.entries.get(&e).map_or(0, |entry| entry.refcount)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn extents_of_covers_exactly_the_touched_extents() {
        let s = ActiveSet::new(4 * MIB, 8);
        assert_eq!(s.extents_of(0, 1), 0..1);
        assert_eq!(s.extents_of(0, 4 * MIB), 0..1);
        assert_eq!(s.extents_of(0, 4 * MIB + 1), 0..2);
        assert_eq!(s.extents_of(4 * MIB - 1, 2), 0..2);
        assert_eq!(s.extents_of(8 * MIB, 0), 2..2);
        // A 32 MiB write misaligned by one block spans 9 extents.
        assert_eq!(s.extents_of(4096, 32 * MIB).len(), 9);
    }

    #[test]
    fn a_write_to_an_active_extent_costs_nothing() {
        let mut s = ActiveSet::new(4 * MIB, 4);
        let t = s.begin(0, 4096).unwrap().unwrap();
        assert_eq!(t.activated, vec![0]);
        assert_eq!(t.retired, Vec::<u32>::new());
        assert_eq!(s.active(), vec![0]);
        assert_eq!(s.begin(8192, 4096), Ok(None));
        s.end(0, 4096);
        s.end(8192, 4096);
        assert_eq!(s.refcount(0), 0);
        assert!(s.is_active(0), "extents retire lazily, not on end");
        assert_eq!(s.begin(0, 512), Ok(None));
    }

    #[test]
    fn the_least_recently_begun_idle_extent_retires() {
        let mut s = ActiveSet::new(MIB, 3);
        for e in [0u64, 1, 2] {
            s.begin(e * MIB, 1).unwrap();
            s.end(e * MIB, 1);
        }
        s.begin(0, 1).unwrap(); // 0 is now the most recent, pinned
        let t = s.begin(5 * MIB, 1).unwrap().unwrap();
        assert_eq!(t.retired, vec![1]);
        assert_eq!(s.active(), vec![0, 2, 5]);
    }

    #[test]
    fn a_full_set_of_pinned_extents_refuses_and_changes_nothing() {
        let mut s = ActiveSet::new(MIB, 2);
        s.begin(0, 2 * MIB).unwrap();
        assert_eq!(
            s.begin(7 * MIB, 1),
            Err(Full {
                needed: 1,
                retirable: 0
            })
        );
        assert_eq!(s.active(), vec![0, 1]);
        assert_eq!(s.refcount(0), 1);
        s.end(MIB, MIB);
        let t = s.begin(7 * MIB, 1).unwrap().unwrap();
        assert_eq!((t.retired, s.active()), (vec![1], vec![0, 7]));
    }

    #[test]
    fn a_restart_keeps_every_logged_extent_until_room_is_needed() {
        let mut s = ActiveSet::from_snapshot(MIB, 2, &[4, 9, 12]);
        assert_eq!(
            s.len(),
            3,
            "over the bound after a restart: nothing forgotten"
        );
        assert_eq!(s.begin(9 * MIB, 1), Ok(None));
        let t = s.begin(0, 1).unwrap().unwrap();
        assert_eq!(t.retired, vec![4, 12]);
        assert_eq!(s.active(), vec![0, 9]);
    }

    #[test]
    #[should_panic(expected = "never fit")]
    fn a_write_wider_than_the_set_is_a_caller_bug() {
        let mut s = ActiveSet::new(MIB, 2);
        let _ = s.begin(0, 3 * MIB);
    }

    #[test]
    #[should_panic(expected = "end of a write to inactive extent")]
    fn end_without_begin_is_a_caller_bug() {
        let mut s = ActiveSet::new(MIB, 2);
        s.end(0, 1);
    }

    /// The obvious O(n) implementation: a map of extent → (last tick, refcount).
    struct Model {
        max_active: usize,
        map: BTreeMap<u32, (u64, u32)>,
        tick: u64,
    }

    impl Model {
        fn begin(&mut self, range: Range<u32>) -> Result<Option<Transition>, Full> {
            if range.is_empty() {
                return Ok(None);
            }
            let activated: Vec<u32> = range
                .clone()
                .filter(|e| !self.map.contains_key(e))
                .collect();
            let needed = if activated.is_empty() {
                0
            } else {
                (self.map.len() + activated.len()).saturating_sub(self.max_active)
            };
            let mut idle: Vec<(u64, u32)> = self
                .map
                .iter()
                .filter(|(e, (_, refs))| *refs == 0 && !range.contains(e))
                .map(|(&e, &(tick, _))| (tick, e))
                .collect();
            idle.sort();
            if idle.len() < needed {
                return Err(Full {
                    needed,
                    retirable: idle.len(),
                });
            }
            let mut retired: Vec<u32> = idle[..needed].iter().map(|&(_, e)| e).collect();
            for e in &retired {
                self.map.remove(e);
            }
            for e in range {
                let entry = self.map.entry(e).or_insert((0, 0));
                entry.0 = self.tick;
                entry.1 += 1;
            }
            self.tick += 1;
            if activated.is_empty() {
                return Ok(None);
            }
            retired.sort();
            Ok(Some(Transition { activated, retired }))
        }

        fn end(&mut self, range: Range<u32>) {
            for e in range {
                self.map.get_mut(&e).unwrap().1 -= 1;
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Begin { offset: u64, len: u64 },
        End { pick: usize },
    }

    const EXTENT: u64 = 4096;
    const VOLUME_EXTENTS: u64 = 24;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..VOLUME_EXTENTS * EXTENT, 0..3 * EXTENT)
                .prop_map(|(offset, len)| Op::Begin { offset, len }),
            2 => any::<usize>().prop_map(|pick| Op::End { pick }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn active_set_matches_the_model_and_keeps_its_invariants(
            max_active in 4usize..10,
            restored in proptest::collection::btree_set(0..VOLUME_EXTENTS as u32, 0..12),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let restored: Vec<u32> = restored.into_iter().collect();
            let mut set = ActiveSet::from_snapshot(EXTENT, max_active, &restored);
            let mut model = Model {
                max_active,
                map: restored.iter().enumerate().map(|(i, &e)| (e, (i as u64, 0))).collect(),
                tick: restored.len() as u64,
            };
            // Over the bound only after a restart with more extents than it.
            let mut len_max = max_active.max(restored.len());
            let mut in_flight: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                let before = set.active();
                match op {
                    Op::Begin { offset, len } => {
                        let range = set.extents_of(offset, len);
                        let got = set.begin(offset, len);
                        prop_assert_eq!(&got, &model.begin(range.clone()));
                        match got {
                            Err(full) => {
                                prop_assert_eq!(set.active(), before.clone());
                                prop_assert!(full.retirable < full.needed);
                            }
                            Ok(transition) => {
                                in_flight.push((offset, len));
                                let after = set.active();
                                // A transition is reported exactly when the set changed.
                                prop_assert_eq!(transition.is_some(), after != before);
                                if let Some(t) = transition {
                                    // An activation brings the set within its bound.
                                    prop_assert!(after.len() <= max_active);
                                    len_max = max_active;
                                    let added: Vec<u32> = after.iter().copied()
                                        .filter(|e| !before.contains(e)).collect();
                                    let dropped: Vec<u32> = before.iter().copied()
                                        .filter(|e| !after.contains(e)).collect();
                                    prop_assert_eq!(&t.activated, &added);
                                    prop_assert_eq!(&t.retired, &dropped);
                                    // Pinned extents (this write's included) never retire.
                                    for &(o, l) in &in_flight {
                                        for e in set.extents_of(o, l) {
                                            prop_assert!(!t.retired.contains(&e));
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Op::End { pick } => {
                        if in_flight.is_empty() {
                            continue;
                        }
                        let (offset, len) = in_flight.swap_remove(pick % in_flight.len());
                        set.end(offset, len);
                        model.end(set.extents_of(offset, len));
                        prop_assert_eq!(set.active(), before);
                    }
                }
                prop_assert!(set.len() <= len_max);
                prop_assert_eq!(set.active(), model.map.keys().copied().collect::<Vec<_>>());
                // Both ways of `active_within`: a look-up per extent of a short
                // range, a walk of the set for a long one.
                for within in [2..5u32, 0..u32::MAX] {
                    let mut got = set.active_within(within.clone());
                    got.sort_unstable();
                    let want: Vec<u32> = model.map.keys().copied()
                        .filter(|e| within.contains(e)).collect();
                    prop_assert_eq!(got, want);
                }
                // Every extent of a begun write stays active until its end,
                // and refcounts count exactly the writes in flight.
                let mut pins: BTreeMap<u32, u32> = BTreeMap::new();
                for &(o, l) in &in_flight {
                    for e in set.extents_of(o, l) {
                        prop_assert!(set.is_active(e));
                        *pins.entry(e).or_default() += 1;
                    }
                }
                for e in set.active() {
                    prop_assert_eq!(set.refcount(e), pins.get(&e).copied().unwrap_or(0));
                }
            }
        }
    }
}
