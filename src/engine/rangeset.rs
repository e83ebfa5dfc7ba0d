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

    /// The runs that overlap `[first, end)`, clipped to it, in order: O(log n + k)
    /// for k of them (a retirement asks for the volatile blocks of its bitmap
    /// pages only, not for every run written since the last fdatasync).
    pub fn within(
        &self,
        first: BlockIndex,
        end: BlockIndex,
    ) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        let (lo, hi) = (first.0, end.0);
        // The run starting at or before `lo` may reach into the range.
        let from = self.runs.range(..=lo).next_back().map_or(lo, |(&s, _)| s);
        self.runs
            .range(from..hi.max(from))
            .map(move |(&s, &e)| (BlockIndex(s.max(lo)), BlockIndex(e.min(hi))))
            .filter(|(s, e)| s.0 < e.0)
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
            // `within`: the set's blocks of a window, as clipped runs in order.
            for (lo, len) in [(0, 230), (7, 0), (7, 1), (13, 29), (50, 100), (199, 40)] {
                let (a, b) = (BlockIndex(lo), BlockIndex(lo + len));
                let runs: Vec<_> = set.within(a, b).collect();
                let mut blocks = Vec::new();
                for (s, e) in &runs {
                    prop_assert!(s.0 < e.0 && s.0 >= lo && e.0 <= lo + len);
                    blocks.extend(s.0..e.0);
                }
                prop_assert!(blocks.windows(2).all(|w| w[0] < w[1]), "runs out of order");
                let expect: Vec<u64> = model.range(lo..lo + len).copied().collect();
                prop_assert_eq!(blocks, expect);
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

/// A multiset of ranges `[start, end)` (of blocks or bytes: the unit is the
/// caller's) kept as the number of ranges covering each point: disjoint pieces
/// with their count, never a piece of count 0, never two touching pieces with
/// the same count (so two coverages of the same multiset are equal maps).
///
/// The primary engine keeps the ranges of its ops and frames in flight here, so
/// that an activity-log retirement finds the few in flight over its pages in
/// O(log n + k) instead of walking all of them (issue 14: a request split into P
/// pieces made its retirements cost O(P²)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// start → (end, count ≥ 1).
    pieces: BTreeMap<u64, (u64, u32)>,
}

impl Coverage {
    pub fn new() -> Coverage {
        Coverage::default()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Make `at` a piece boundary (a piece over it is cut in two).
    fn split_at(&mut self, at: u64) {
        if let Some((&s, &(e, c))) = self.pieces.range(..at).next_back()
            && e > at
        {
            self.pieces.insert(s, (at, c));
            self.pieces.insert(at, (e, c));
        }
    }

    /// Join the piece ending at `at` with the one starting there when their
    /// counts are equal (keeps the map canonical).
    fn join_at(&mut self, at: u64) {
        let Some(&(e2, c2)) = self.pieces.get(&at) else {
            return;
        };
        if let Some((&s1, &(e1, c1))) = self.pieces.range(..at).next_back()
            && e1 == at
            && c1 == c2
        {
            self.pieces.remove(&at);
            self.pieces.insert(s1, (e2, c1));
        }
    }

    /// One more range `[start, end)`.
    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.split_at(start);
        self.split_at(end);
        let mut gaps = Vec::new();
        let mut at = start;
        for (&s, (e, c)) in self.pieces.range_mut(start..end) {
            if s > at {
                gaps.push((at, s));
            }
            *c += 1;
            at = *e;
        }
        if at < end {
            gaps.push((at, end));
        }
        for (s, e) in gaps {
            self.pieces.insert(s, (e, 1));
        }
        self.join_at(start);
        self.join_at(end);
    }

    /// One range `[start, end)` fewer; it must have been added.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.split_at(start);
        self.split_at(end);
        let mut at = start;
        let mut emptied = Vec::new();
        for (&s, (e, c)) in self.pieces.range_mut(start..end) {
            assert_eq!(s, at, "coverage: removing [{start}, {end}) never added");
            *c -= 1;
            if *c == 0 {
                emptied.push(s);
            }
            at = *e;
        }
        assert_eq!(at, end, "coverage: removing [{start}, {end}) never added");
        for s in emptied {
            self.pieces.remove(&s);
        }
        self.join_at(start);
        self.join_at(end);
    }

    /// Whether this is the coverage of exactly `ranges` (in any order): one sort
    /// and sweep of their ends, not a rebuild (the engines' invariant checks).
    pub fn matches(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> bool {
        let mut ends: Vec<(u64, i64)> = Vec::new();
        for (s, e) in ranges {
            if s < e {
                ends.push((s, 1));
                ends.push((e, -1));
            }
        }
        ends.sort_unstable();
        // The canonical pieces of the sweep, compared one by one with the map's.
        let mut mine = self.pieces.iter().map(|(&s, &(e, c))| (s, e, i64::from(c)));
        let mut open: Option<(u64, i64)> = None; // start and count of the piece being built
        let mut count = 0i64;
        let mut i = 0;
        while i < ends.len() {
            let at = ends[i].0;
            while i < ends.len() && ends[i].0 == at {
                count += ends[i].1;
                i += 1;
            }
            match open {
                Some((_, c)) if c == count => {}
                Some((s, c)) => {
                    if mine.next() != Some((s, at, c)) {
                        return false;
                    }
                    open = (count > 0).then_some((at, count));
                }
                None => open = (count > 0).then_some((at, count)),
            }
        }
        open.is_none() && mine.next().is_none()
    }

    /// [`Self::matches`] for up to `full_max` ranges; past that, in one pass
    /// with no sort, whether the covered points and their sum (each counted once
    /// per range over it) are those of `ranges`: a range added or removed once
    /// too often, or at another place, changes them (the engines call their
    /// invariant checks after every step; a sort of thousands of ranges each
    /// time was over half of a fuzz run).
    pub fn matches_cheaply(
        &self,
        ranges: impl Iterator<Item = (u64, u64)>,
        full_max: usize,
    ) -> bool {
        // One walk of `ranges` (callers pass walks of the op table): the first
        // `full_max` kept for the exact comparison, the moments of all of them
        // for the cheap one.
        let mut few = Vec::new();
        let mut theirs = (0u128, 0u128);
        let mut n = 0usize;
        for (s, e) in ranges {
            theirs = add_moments(theirs, s, e, 1);
            if n < full_max {
                few.push((s, e));
            }
            n += 1;
        }
        if n <= full_max {
            return self.matches(few);
        }
        let mine = self
            .pieces
            .iter()
            .fold((0u128, 0u128), |m, (&s, &(e, c))| add_moments(m, s, e, c));
        mine == theirs
    }

    /// Every covered piece, in order (touching pieces differ in count only).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pieces.iter().map(|(&s, &(e, _))| (s, e))
    }

    /// With the pieces in bytes: the blocks of `block_size` bytes of those over
    /// blocks `[first, end)`, clipped to them (pieces may share a block at their
    /// ends).
    pub fn blocks_within(
        &self,
        first: BlockIndex,
        end: BlockIndex,
        block_size: u32,
    ) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        let bs = u64::from(block_size);
        self.within(first.0.saturating_mul(bs), end.0.saturating_mul(bs))
            .map(move |(s, e)| (BlockIndex(s / bs), BlockIndex(e.div_ceil(bs))))
    }

    /// The covered pieces of `[start, end)`, clipped to it, in order.
    pub fn within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self
            .pieces
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map_or(start, |(s, _)| *s);
        self.pieces
            .range(first..end.max(first))
            .map(move |(&s, &(e, _))| (s.max(start), e.min(end)))
            .filter(|(s, e)| s < e)
    }
}

/// `m` plus `count` times the number of points of `[s, e)` and their sum
/// (wrapping: both sides of a comparison wrap alike).
fn add_moments(m: (u128, u128), s: u64, e: u64, count: u32) -> (u128, u128) {
    if s >= e {
        return m;
    }
    let (s, e, c) = (u128::from(s), u128::from(e), u128::from(count));
    let len = e - s;
    // (s + e - 1) * len is even: one of the two factors is.
    let sum = (s + e - 1).wrapping_mul(len) / 2;
    (
        m.0.wrapping_add(len.wrapping_mul(c)),
        m.1.wrapping_add(sum.wrapping_mul(c)),
    )
}

#[cfg(test)]
mod coverage_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn counts_like_an_array_and_stays_canonical(
            ops in proptest::collection::vec((0u64..200, 1u64..40, any::<bool>()), 0..80)
        ) {
            let mut cover = Coverage::new();
            let mut model = vec![0u32; 300];
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (start, len, remove) in ops {
                if remove && !live.is_empty() {
                    let (s, e) = live.swap_remove(start as usize % live.len());
                    cover.remove(s, e);
                    for x in s..e { model[x as usize] -= 1; }
                } else {
                    cover.add(start, start + len);
                    live.push((start, start + len));
                    for x in start..start + len { model[x as usize] += 1; }
                }
                // Canonical: equal to the coverage built from scratch in another order.
                let mut fresh = Coverage::new();
                for &(s, e) in live.iter().rev() {
                    fresh.add(s, e);
                }
                prop_assert_eq!(&fresh, &cover);
                prop_assert!(cover.matches(live.iter().copied()));
                prop_assert!(cover.matches_cheaply(live.iter().copied(), 0));
                if let Some(&(s, e)) = live.first() {
                    prop_assert!(!cover.matches(live.iter().skip(1).copied()));
                    let mut more = live.clone();
                    more.push((s, e + 1));
                    prop_assert!(!cover.matches(more.iter().copied()));
                    prop_assert!(!cover.matches_cheaply(more.iter().copied(), 0));
                    prop_assert!(!cover.matches_cheaply(live.iter().skip(1).copied(), 0));
                }
                let mut prev: Option<(u64, u32)> = None;
                for (&s, &(e, c)) in &cover.pieces {
                    prop_assert!(s < e && c > 0);
                    prop_assert!((s..e).all(|x| model[x as usize] == c));
                    if let Some((pe, pc)) = prev {
                        prop_assert!(pe <= s);
                        prop_assert!(pe < s || pc != c, "touching pieces of equal count");
                    }
                    prev = Some((e, c));
                }
                let covered: u64 = cover.iter().map(|(s, e)| e - s).sum();
                prop_assert_eq!(covered, model.iter().filter(|&&c| c > 0).count() as u64);
                for lo in (0..250).step_by(7) {
                    let hi = lo + 23;
                    let got: Vec<u64> = cover.within(lo, hi).flat_map(|(s, e)| s..e).collect();
                    let want: Vec<u64> = (lo..hi).filter(|&x| model[x as usize] > 0).collect();
                    prop_assert_eq!(got, want);
                }
            }
            for (s, e) in live {
                cover.remove(s, e);
            }
            prop_assert!(cover.is_empty());
        }
    }
}
