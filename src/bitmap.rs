//! The in-memory dirty-block bitmap (ARCHITECTURE §4): one bit per block of the
//! volume, set when a block may differ between the two nodes.
//!
//! This module owns the bit operations only; it does no I/O. Persisting the
//! bitmap (checksums, alternating copies) belongs to `meta/`, deciding when a
//! bit may be cleared belongs to the engine (§3: only once `Durable` covers
//! every write to the block).
//!
//! Marking runs on every client write, and a single write or a resync step can
//! cover millions of blocks, so ranges are handled a 64-bit word at a time and
//! the number of dirty blocks is maintained incrementally (`dirty_count` is
//! O(1)). Invariant: bits at positions `>= block_count` in the last word are
//! always zero, so scans never report blocks past the end of the volume.

use std::fmt;

use crate::types::{BlockCount, BlockIndex};

const WORD_BITS: u64 = 64;

/// Errors decoding a persisted bitmap.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitmapError {
    #[error(
        "bitmap for {block_count} blocks must be {expected_bytes} bytes, got {actual_bytes}; \
         the persisted bitmap belongs to a different volume size or is truncated"
    )]
    LengthMismatch {
        block_count: u64,
        expected_bytes: u64,
        actual_bytes: u64,
    },
    #[error(
        "bitmap for {block_count} blocks has bits set past the last block; \
         the persisted bitmap is corrupt"
    )]
    BitsBeyondEnd { block_count: u64 },
}

/// One bit per block; a set bit means "this block may differ from the peer".
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    block_count: u64,
    /// Number of set bits, kept equal to the popcount of `words`.
    dirty_count: u64,
}

impl fmt::Debug for DirtyBitmap {
    // The words themselves can be megabytes: show the shape, not the bits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("block_count", &self.block_count)
            .field("dirty_count", &self.dirty_count)
            .finish()
    }
}

/// Mask with bits `lo..=hi` set (`lo <= hi < 64`).
fn bit_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo <= hi && hi < WORD_BITS);
    (u64::MAX >> (WORD_BITS - 1 - hi)) & (u64::MAX << lo)
}

fn word_count(block_count: u64) -> usize {
    usize::try_from(block_count.div_ceil(WORD_BITS))
        .expect("bitmap word count exceeds address space")
}

impl DirtyBitmap {
    /// An all-clean bitmap of `block_count` blocks.
    pub fn new(block_count: BlockCount) -> Self {
        DirtyBitmap {
            words: vec![0; word_count(block_count.0)],
            block_count: block_count.0,
            dirty_count: 0,
        }
    }

    /// An all-clean bitmap for a volume of `size_bytes` at `block_size` bytes per
    /// bit; a partial last block counts as a whole block.
    pub fn for_volume(size_bytes: u64, block_size: u32) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self::new(BlockCount(size_bytes.div_ceil(u64::from(block_size))))
    }

    pub fn block_count(&self) -> BlockCount {
        BlockCount(self.block_count)
    }

    /// Number of dirty blocks, O(1).
    pub fn dirty_count(&self) -> BlockCount {
        BlockCount(self.dirty_count)
    }

    /// Panics if `b` is past the last block (a caller bug, not an operating error).
    pub fn is_dirty(&self, b: BlockIndex) -> bool {
        assert!(
            b.0 < self.block_count,
            "block {} out of range (block count {})",
            b.0,
            self.block_count
        );
        self.words[(b.0 / WORD_BITS) as usize] & (1 << (b.0 % WORD_BITS)) != 0
    }

    /// Mark blocks `[first, end)` dirty. Panics unless `first <= end <= block_count`.
    pub fn mark(&mut self, first: BlockIndex, end: BlockIndex) {
        self.for_each_word_mask(first, end, |word, mask| {
            let old = *word;
            *word |= mask;
            (*word).count_ones() as i64 - old.count_ones() as i64
        });
    }

    /// Mark blocks `[first, end)` clean. Panics unless `first <= end <= block_count`.
    pub fn clear(&mut self, first: BlockIndex, end: BlockIndex) {
        self.for_each_word_mask(first, end, |word, mask| {
            let old = *word;
            *word &= !mask;
            (*word).count_ones() as i64 - old.count_ones() as i64
        });
    }

    pub fn mark_all(&mut self) {
        self.mark(BlockIndex(0), BlockIndex(self.block_count));
    }

    pub fn clear_all(&mut self) {
        self.words.fill(0);
        self.dirty_count = 0;
    }

    /// Apply `op(word, mask)` to every word overlapping `[first, end)`, with
    /// `mask` selecting the bits of the range in that word; `op` returns the
    /// change in set bits.
    fn for_each_word_mask(
        &mut self,
        first: BlockIndex,
        end: BlockIndex,
        mut op: impl FnMut(&mut u64, u64) -> i64,
    ) {
        assert!(
            first.0 <= end.0 && end.0 <= self.block_count,
            "block range [{}, {}) invalid for a bitmap of {} blocks",
            first.0,
            end.0,
            self.block_count
        );
        if first.0 == end.0 {
            return;
        }
        let last = end.0 - 1;
        let (first_word, last_word) = ((first.0 / WORD_BITS) as usize, (last / WORD_BITS) as usize);
        let (first_bit, last_bit) = (first.0 % WORD_BITS, last % WORD_BITS);
        let mut delta: i64 = 0;
        if first_word == last_word {
            delta += op(&mut self.words[first_word], bit_mask(first_bit, last_bit));
        } else {
            delta += op(
                &mut self.words[first_word],
                bit_mask(first_bit, WORD_BITS - 1),
            );
            for word in &mut self.words[first_word + 1..last_word] {
                delta += op(word, u64::MAX);
            }
            delta += op(&mut self.words[last_word], bit_mask(0, last_bit));
        }
        self.dirty_count = self
            .dirty_count
            .checked_add_signed(delta)
            .expect("dirty count out of range");
        debug_assert!(self.dirty_count <= self.block_count);
    }

    /// First set bit at or after `from`, if any.
    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.block_count {
            return None;
        }
        let mut w = (from / WORD_BITS) as usize;
        let mut word = self.words[w] & (u64::MAX << (from % WORD_BITS));
        loop {
            if word != 0 {
                // Bits past block_count are zero, so this is a real block.
                return Some(w as u64 * WORD_BITS + u64::from(word.trailing_zeros()));
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }

    /// First clear bit in `[from, limit)`, or `limit` if all are set.
    fn next_clear(&self, from: u64, limit: u64) -> u64 {
        debug_assert!(from < limit && limit <= self.block_count);
        let mut w = (from / WORD_BITS) as usize;
        let mut word = !self.words[w] & (u64::MAX << (from % WORD_BITS));
        loop {
            if word != 0 {
                return (w as u64 * WORD_BITS + u64::from(word.trailing_zeros())).min(limit);
            }
            w += 1;
            if w as u64 * WORD_BITS >= limit {
                return limit;
            }
            word = !self.words[w];
        }
    }

    /// First run of dirty blocks at or after `from`, at most `max` blocks long.
    /// Returns `None` when no block at or after `from` is dirty (or `max` is 0).
    /// A run longer than `max` is returned in pieces by calling again from
    /// `start + len`.
    pub fn next_dirty_run(
        &self,
        from: BlockIndex,
        max: BlockCount,
    ) -> Option<(BlockIndex, BlockCount)> {
        if max.0 == 0 {
            return None;
        }
        let start = self.next_set(from.0)?;
        let limit = start.saturating_add(max.0).min(self.block_count);
        let end = self.next_clear(start, limit);
        Some((BlockIndex(start), BlockCount(end - start)))
    }

    /// The dirty blocks as runs `(first, count)` in order, at most `max_runs` of
    /// them: when there are more, runs closer than a growing gap are merged, so the
    /// result always covers every dirty block (a superset, never fewer).
    pub fn runs(&self, max_runs: usize) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut cursor = BlockIndex(0);
        while let Some((first, n)) = self.next_dirty_run(cursor, BlockCount(u64::MAX)) {
            runs.push((first.0, n.0));
            cursor = BlockIndex(first.0 + n.0);
        }
        let mut gap = 1u64;
        while runs.len() > max_runs.max(1) {
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
            for (first, n) in runs {
                match merged.last_mut() {
                    Some((f, m)) if first - (*f + *m) <= gap => *m = first + n - *f,
                    _ => merged.push((first, n)),
                }
            }
            runs = merged;
            gap *= 2;
        }
        runs
    }

    /// Mark every block that is dirty in `other` (same block count required).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        assert_eq!(
            self.block_count, other.block_count,
            "union of bitmaps with different block counts"
        );
        let mut dirty: u64 = 0;
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= *theirs;
            dirty += u64::from(mine.count_ones());
        }
        self.dirty_count = dirty;
    }

    /// Length of the serialized form: one bit per block, rounded up to a byte.
    pub fn encoded_len_bytes(block_count: BlockCount) -> u64 {
        block_count.0.div_ceil(8)
    }

    /// Serialize: bit `b` is bit `b % 8` of byte `b / 8` (little-endian words
    /// truncated to `ceil(block_count / 8)` bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = Self::encoded_len_bytes(self.block_count()) as usize;
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for word in &self.words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Inverse of [`to_bytes`](Self::to_bytes). The length must match exactly
    /// and no bit past the last block may be set.
    pub fn from_bytes(block_count: BlockCount, bytes: &[u8]) -> Result<Self, BitmapError> {
        let expected_bytes = Self::encoded_len_bytes(block_count);
        if bytes.len() as u64 != expected_bytes {
            return Err(BitmapError::LengthMismatch {
                block_count: block_count.0,
                expected_bytes,
                actual_bytes: bytes.len() as u64,
            });
        }
        let mut words = Vec::with_capacity(word_count(block_count.0));
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            words.push(u64::from_le_bytes(buf));
        }
        debug_assert_eq!(words.len(), word_count(block_count.0));
        let tail_bits = block_count.0 % WORD_BITS;
        if tail_bits != 0 {
            let last = *words
                .last()
                .expect("a non-multiple of 64 blocks has at least one word");
            if last & (u64::MAX << tail_bits) != 0 {
                return Err(BitmapError::BitsBeyondEnd {
                    block_count: block_count.0,
                });
            }
        }
        let dirty_count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(DirtyBitmap {
            words,
            block_count: block_count.0,
            dirty_count,
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn runs_cover_every_dirty_block_within_the_limit() {
        let mut bm = DirtyBitmap::new(BlockCount(10_000));
        for i in (0..10_000).step_by(7) {
            bm.mark(BlockIndex(i), BlockIndex(i + 2));
        }
        let exact = bm.runs(usize::MAX);
        assert_eq!(exact.len(), 1429);
        assert_eq!(exact[0], (0, 2));
        for max in [1, 10, 100, 1000] {
            let runs = bm.runs(max);
            assert!(runs.len() <= max, "{} runs > {max}", runs.len());
            let mut covered = DirtyBitmap::new(BlockCount(10_000));
            for (f, n) in &runs {
                covered.mark(BlockIndex(*f), BlockIndex(f + n));
            }
            let mut both = covered.clone();
            both.union_with(&bm);
            assert_eq!(
                both.dirty_count(),
                covered.dirty_count(),
                "max {max}: not a superset"
            );
        }
        assert!(DirtyBitmap::new(BlockCount(5)).runs(3).is_empty());
    }
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn partial_last_block_counts_as_a_block() {
        assert_eq!(
            DirtyBitmap::for_volume(4096 * 10, 4096).block_count(),
            BlockCount(10)
        );
        assert_eq!(
            DirtyBitmap::for_volume(4096 * 10 + 1, 4096).block_count(),
            BlockCount(11)
        );
        assert_eq!(
            DirtyBitmap::for_volume(0, 4096).block_count(),
            BlockCount(0)
        );
    }

    #[test]
    fn word_boundaries_mark_and_clear_exactly() {
        let mut bm = DirtyBitmap::new(BlockCount(200));
        bm.mark(BlockIndex(63), BlockIndex(129));
        assert_eq!(bm.dirty_count(), BlockCount(66));
        assert!(!bm.is_dirty(BlockIndex(62)));
        assert!(bm.is_dirty(BlockIndex(63)));
        assert!(bm.is_dirty(BlockIndex(128)));
        assert!(!bm.is_dirty(BlockIndex(129)));
        bm.clear(BlockIndex(64), BlockIndex(128));
        assert_eq!(bm.dirty_count(), BlockCount(2));
        assert_eq!(
            bm.next_dirty_run(BlockIndex(0), BlockCount(10)),
            Some((BlockIndex(63), BlockCount(1)))
        );
        assert_eq!(
            bm.next_dirty_run(BlockIndex(64), BlockCount(10)),
            Some((BlockIndex(128), BlockCount(1)))
        );
        assert_eq!(bm.next_dirty_run(BlockIndex(129), BlockCount(10)), None);
    }

    #[test]
    fn mark_all_stops_at_the_last_block() {
        let mut bm = DirtyBitmap::new(BlockCount(70));
        bm.mark_all();
        assert_eq!(bm.dirty_count(), BlockCount(70));
        assert_eq!(
            bm.next_dirty_run(BlockIndex(0), BlockCount(1000)),
            Some((BlockIndex(0), BlockCount(70)))
        );
        let bytes = bm.to_bytes();
        assert_eq!(bytes.len(), 9);
        assert_eq!(bytes[8], 0b0011_1111);
        bm.clear_all();
        assert_eq!(bm.dirty_count(), BlockCount(0));
        assert_eq!(bm.next_dirty_run(BlockIndex(0), BlockCount(1000)), None);
    }

    #[test]
    fn long_run_is_split_by_max() {
        let mut bm = DirtyBitmap::new(BlockCount(1000));
        bm.mark(BlockIndex(10), BlockIndex(500));
        assert_eq!(
            bm.next_dirty_run(BlockIndex(0), BlockCount(128)),
            Some((BlockIndex(10), BlockCount(128)))
        );
        assert_eq!(
            bm.next_dirty_run(BlockIndex(138), BlockCount(1000)),
            Some((BlockIndex(138), BlockCount(362)))
        );
        assert_eq!(bm.next_dirty_run(BlockIndex(0), BlockCount(0)), None);
    }

    #[test]
    fn one_tib_of_blocks_marks_and_scans_by_word() {
        // 1 TiB at 4 KiB = 2^28 blocks = 32 MiB of bitmap (ARCHITECTURE §4).
        let blocks = 1u64 << 28;
        let mut bm = DirtyBitmap::new(BlockCount(blocks));
        bm.mark(BlockIndex(1), BlockIndex(blocks - 1));
        assert_eq!(bm.dirty_count(), BlockCount(blocks - 2));
        assert_eq!(
            bm.next_dirty_run(BlockIndex(0), BlockCount(u64::MAX)),
            Some((BlockIndex(1), BlockCount(blocks - 2)))
        );
        bm.clear(BlockIndex(5), BlockIndex(blocks - 5));
        assert_eq!(bm.dirty_count(), BlockCount(8));
        assert_eq!(
            bm.next_dirty_run(BlockIndex(5), BlockCount(u64::MAX)),
            Some((BlockIndex(blocks - 5), BlockCount(4)))
        );
    }

    #[test]
    fn from_bytes_rejects_wrong_length_and_stray_bits() {
        assert_eq!(
            DirtyBitmap::from_bytes(BlockCount(70), &[0; 8]),
            Err(BitmapError::LengthMismatch {
                block_count: 70,
                expected_bytes: 9,
                actual_bytes: 8
            })
        );
        let mut bytes = vec![0u8; 9];
        bytes[8] = 0b0100_0000; // block 70: one past the end
        assert_eq!(
            DirtyBitmap::from_bytes(BlockCount(70), &bytes),
            Err(BitmapError::BitsBeyondEnd { block_count: 70 })
        );
        bytes[8] = 0b0010_0000; // block 69: the last one
        let bm = DirtyBitmap::from_bytes(BlockCount(70), &bytes).unwrap();
        assert!(bm.is_dirty(BlockIndex(69)));
        assert_eq!(bm.dirty_count(), BlockCount(1));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Mark(u64, u64),
        Clear(u64, u64),
        MarkAll,
        ClearAll,
        Union(Vec<(u64, u64)>),
        RoundTrip,
    }

    fn range(n: u64) -> impl Strategy<Value = (u64, u64)> {
        (0..=n, 0..=n).prop_map(|(a, b)| (a.min(b), a.max(b)))
    }

    fn op(n: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => range(n).prop_map(|(a, b)| Op::Mark(a, b)),
            6 => range(n).prop_map(|(a, b)| Op::Clear(a, b)),
            1 => Just(Op::MarkAll),
            1 => Just(Op::ClearAll),
            2 => proptest::collection::vec(range(n), 0..4).prop_map(Op::Union),
            1 => Just(Op::RoundTrip),
        ]
    }

    fn case() -> impl Strategy<Value = (u64, Vec<Op>, Vec<(u64, u64)>)> {
        (0u64..300).prop_flat_map(|n| {
            (
                Just(n),
                proptest::collection::vec(op(n), 0..40),
                proptest::collection::vec((0..=n + 2, 0..80u64), 1..20),
            )
        })
    }

    /// The model's answer to `next_dirty_run`.
    fn model_run(model: &BTreeSet<u64>, from: u64, max: u64) -> Option<(BlockIndex, BlockCount)> {
        if max == 0 {
            return None;
        }
        let start = *model.range(from..).next()?;
        let mut len = 1;
        while len < max && model.contains(&(start + len)) {
            len += 1;
        }
        Some((BlockIndex(start), BlockCount(len)))
    }

    proptest! {
        #[test]
        fn bitmap_matches_btreeset_model((n, ops, queries) in case()) {
            let mut bm = DirtyBitmap::new(BlockCount(n));
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Mark(a, b) => { bm.mark(BlockIndex(a), BlockIndex(b)); model.extend(a..b); }
                    Op::Clear(a, b) => { bm.clear(BlockIndex(a), BlockIndex(b)); for i in a..b { model.remove(&i); } }
                    Op::MarkAll => { bm.mark_all(); model.extend(0..n); }
                    Op::ClearAll => { bm.clear_all(); model.clear(); }
                    Op::Union(ranges) => {
                        let mut other = DirtyBitmap::new(BlockCount(n));
                        for (a, b) in ranges { other.mark(BlockIndex(a), BlockIndex(b)); model.extend(a..b); }
                        bm.union_with(&other);
                    }
                    Op::RoundTrip => {
                        let bytes = bm.to_bytes();
                        prop_assert_eq!(bytes.len() as u64, n.div_ceil(8));
                        bm = DirtyBitmap::from_bytes(BlockCount(n), &bytes).unwrap();
                    }
                }
                prop_assert_eq!(bm.dirty_count().0, model.len() as u64);
            }
            for i in 0..n {
                prop_assert_eq!(bm.is_dirty(BlockIndex(i)), model.contains(&i), "block {}", i);
            }
            for (from, max) in queries {
                prop_assert_eq!(
                    bm.next_dirty_run(BlockIndex(from), BlockCount(max)),
                    model_run(&model, from, max),
                    "from {} max {}", from, max
                );
            }
            let back = DirtyBitmap::from_bytes(BlockCount(n), &bm.to_bytes()).unwrap();
            prop_assert_eq!(back, bm);
        }
    }
}
