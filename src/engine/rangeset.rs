//! A set of block indices stored as disjoint runs, for sets that are usually
//! small or clustered (blocks written since the last local flush, hash-compare
//! candidates) where a whole-volume bitmap would cost 32 MiB per TiB.
//!
//! Cost: O(log n + k) per insert or remove touching k runs; memory one map
//! entry per run.

use std::collections::BTreeMap;

use crate::types::{BlockCount, BlockIndex};

/// Disjoint, non-adjacent runs `[start, end)` of block indices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (exclusive); runs never overlap or touch.
    runs: BTreeMap<u64, u64>,
    len: u64,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// Number of blocks in the set.
    pub fn count(&self) -> BlockCount {
        BlockCount(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of runs (the memory cost).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    pub fn clear(&mut self) {
        self.runs.clear();
        self.len = 0;
    }

    /// The union of `ranges` (in any order, overlapping or not): the same set
    /// as inserting them one by one, built by one sort and one merge instead of a
    /// map lookup per range (persist images merge every range in flight).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (BlockIndex, BlockIndex)>) -> RangeSet {
        let mut all: Vec<(u64, u64)> = ranges
            .into_iter()
            .filter(|(a, b)| a.0 < b.0)
            .map(|(a, b)| (a.0, b.0))
            .collect();
        // By start only: the merge below takes equal starts in any order.
        all.sort_unstable_by_key(|r| r.0);
        let mut runs: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (a, b) in all {
            match runs.last_mut() {
                // Overlapping or touching: one run (runs never touch).
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => runs.push((a, b)),
            }
        }
        let len = runs.iter().map(|(a, b)| b - a).sum();
        RangeSet {
            runs: runs.into_iter().collect(),
            len,
        }
    }

    /// Add blocks `[first, end)`.
    pub fn insert(&mut self, first: BlockIndex, end: BlockIndex) {
        let (mut lo, mut hi) = (first.0, end.0);
        if lo >= hi {
            return;
        }
        // Merge with every run that overlaps or touches [lo, hi], the last one
        // first (one lookup each, no list of them: inserts run per range in
        // flight when the engine builds a persist image).
        while let Some((&s, &e)) = self.runs.range(..=hi).next_back() {
            if e < lo {
                break;
            }
            self.runs.remove(&s);
            self.len -= e - s;
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.runs.insert(lo, hi);
        self.len += hi - lo;
    }

    /// Remove blocks `[first, end)`.
    pub fn remove(&mut self, first: BlockIndex, end: BlockIndex) {
        let (lo, hi) = (first.0, end.0);
        if lo >= hi {
            return;
        }
        // Every run that overlaps [lo, hi), the last one first; a part left of
        // `lo` ends the walk (it no longer overlaps), one right of `hi` is past it.
        while let Some((&s, &e)) = self.runs.range(..hi).next_back() {
            if e <= lo {
                break;
            }
            self.runs.remove(&s);
            self.len -= e - s;
            if s < lo {
                self.runs.insert(s, lo);
                self.len += lo - s;
            }
            if e > hi {
                self.runs.insert(hi, e);
                self.len += e - hi;
            }
        }
    }

    pub fn contains(&self, b: BlockIndex) -> bool {
        self.runs
            .range(..=b.0)
            .next_back()
            .is_some_and(|(_, e)| *e > b.0)
    }

    /// Whether any block of `[first, end)` is in the set.
    pub fn intersects(&self, first: BlockIndex, end: BlockIndex) -> bool {
        first.0 < end.0
            && self
                .runs
                .range(..end.0)
                .next_back()
                .is_some_and(|(_, e)| *e > first.0)
    }

    /// The runs in order, as `(first, end)`.
    pub fn iter(&self) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        self.runs
            .iter()
            .map(|(s, e)| (BlockIndex(*s), BlockIndex(*e)))
    }

    /// Add every block of `other`.
    pub fn union_with(&mut self, other: &RangeSet) {
        for (a, b) in other.iter() {
            self.insert(a, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn behaves_like_a_set_of_blocks(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..20), 0..80)) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for (add, first, n) in ops {
                let (a, b) = (BlockIndex(first), BlockIndex(first + n));
                if add {
                    set.insert(a, b);
                    model.extend(first..first + n);
                } else {
                    set.remove(a, b);
                    for x in first..first + n {
                        model.remove(&x);
                    }
                }
                prop_assert_eq!(set.count().0, model.len() as u64);
                let mut prev_end = None;
                for (s, e) in set.iter() {
                    prop_assert!(s.0 < e.0);
                    if let Some(p) = prev_end {
                        prop_assert!(s.0 > p, "runs touch or overlap");
                    }
                    prev_end = Some(e.0);
                }
            }
            prop_assert_eq!(&RangeSet::from_ranges(set.iter()), &set);
            for x in 0..230 {
                prop_assert_eq!(set.contains(BlockIndex(x)), model.contains(&x));
                prop_assert_eq!(
                    set.intersects(BlockIndex(x), BlockIndex(x + 3)),
                    (x..x + 3).any(|y| model.contains(&y))
                );
            }
        }
    }

    proptest! {
        #[test]
        fn from_ranges_is_inserting_one_by_one(ranges in proptest::collection::vec((0u64..300, 0u64..40), 0..120)) {
            let ranges: Vec<(BlockIndex, BlockIndex)> = ranges
                .into_iter()
                .map(|(first, n)| (BlockIndex(first), BlockIndex(first + n)))
                .collect();
            let mut one_by_one = RangeSet::new();
            for &(a, b) in &ranges {
                one_by_one.insert(a, b);
            }
            let merged = RangeSet::from_ranges(ranges.iter().copied());
            prop_assert_eq!(merged.count(), one_by_one.count());
            prop_assert_eq!(merged.iter().collect::<Vec<_>>(), one_by_one.iter().collect::<Vec<_>>());
        }
    }
}

/// Disjoint byte ranges each mapped to a value (the newest journal record that
/// wrote them): inserting a range overwrites whatever it covers, splitting the
/// pieces it cuts.
#[derive(Clone, Debug, Default)]
pub struct RangeMap<V> {
    /// start → (end, value); pieces never overlap.
    pieces: BTreeMap<u64, (u64, V)>,
}

impl<V: Copy + PartialEq> RangeMap<V> {
    pub fn new() -> Self {
        RangeMap {
            pieces: BTreeMap::new(),
        }
    }

    pub fn clear(&mut self) {
        self.pieces.clear();
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Cut the pieces overlapping `[start, end)` out of the map.
    fn cut(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, u64, V)> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, (e, v))| (*s, *e, *v))
            .collect();
        for (s, e, v) in overlapping {
            self.pieces.remove(&s);
            if s < start {
                self.pieces.insert(s, (start, v));
            }
            if e > end {
                self.pieces.insert(end, (e, v));
            }
        }
    }

    /// `[start, end)` now maps to `value`.
    pub fn insert(&mut self, start: u64, end: u64, value: V) {
        if start >= end {
            return;
        }
        self.cut(start, end);
        self.pieces.insert(start, (end, value));
    }

    /// Remove the pieces of `[start, end)` that still map to `value` (a record whose
    /// data moved to the volume; newer records over it stay).
    pub fn remove_value(&mut self, start: u64, end: u64, value: V) {
        let hit: Vec<(u64, u64)> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .filter(|(_, (_, v))| *v == value)
            .map(|(s, (e, _))| (*s, *e))
            .collect();
        for (s, e) in hit {
            self.cut(s.max(start), e.min(end));
        }
    }

    /// The pieces of `[start, end)` in order, gaps as `None`.
    pub fn query(&self, start: u64, end: u64) -> Vec<(u64, u64, Option<V>)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .pieces
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .unwrap_or(start);
        for (&s, &(e, v)) in self.pieces.range(first..end) {
            let (s, e) = (s.max(start), e.min(end));
            if s >= e {
                continue;
            }
            if s > at {
                out.push((at, s, None));
            }
            out.push((s, e, Some(v)));
            at = e;
        }
        if at < end {
            out.push((at, end, None));
        }
        out
    }
}

#[cfg(test)]
mod map_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_byte_array_of_values(ops in proptest::collection::vec((any::<bool>(), 0u64..300, 1u64..60, 0u8..8), 0..60)) {
            let mut map = RangeMap::new();
            let mut model = vec![None; 400];
            for (insert, start, len, v) in ops {
                let end = start + len;
                if insert {
                    map.insert(start, end, v);
                    for x in start..end { model[x as usize] = Some(v); }
                } else {
                    map.remove_value(start, end, v);
                    for x in start..end { if model[x as usize] == Some(v) { model[x as usize] = None; } }
                }
            }
            let pieces = map.query(0, 400);
            let mut at = 0;
            for (s, e, v) in pieces {
                prop_assert_eq!(s, at);
                for x in s..e { prop_assert_eq!(model[x as usize], v); }
                at = e;
            }
            prop_assert_eq!(at, 400);
            for (s, e, v) in map.query(37, 211) {
                prop_assert!(s >= 37 && e <= 211);
                for x in s..e { prop_assert_eq!(model[x as usize], v); }
            }
        }
    }
}
