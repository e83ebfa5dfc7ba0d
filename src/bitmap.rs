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
//!
//! **Pages.** The bitmap is persisted in place by pages ([`BitmapPage`], each
//! [`PAGE_BLOCKS`] bits, one 4 KiB page of the metadata file, see
//! `meta::format::BitmapSector`), so that persisting costs I/O proportional to
//! what changed (ARCHITECTURE §4). The bitmap records which pages had a bit
//! change since the caller last took the list ([`take_changed_pages`]): one
//! bit per page, 1 KiB per TiB of volume at 4 KiB blocks. It knows nothing of
//! the disk; `meta::MetaStore` skips pages whose contents it already wrote.
//!
//! [`take_changed_pages`]: DirtyBitmap::take_changed_pages

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::types::{BlockCount, BlockIndex};

const WORD_BITS: u64 = 64;

/// 64-bit words in one persisted page: 8 sectors of 504 data bytes (63 words)
/// each; the other 8 bytes of each 512-byte sector are its index and checksum.
pub const PAGE_WORDS: u64 = 504;
/// Blocks (bits) in one persisted page: 32,256, so a page covers 126 MiB of
/// volume at 4 KiB blocks and a 4 MiB activity extent touches one page or two.
pub const PAGE_BLOCKS: u64 = PAGE_WORDS * WORD_BITS;

/// Index of a persisted bitmap page: blocks `[p × PAGE_BLOCKS, (p + 1) × PAGE_BLOCKS)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BitmapPage(pub u64);

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
/// Equality compares the bits only, not which pages changed.
#[derive(Clone)]
pub struct DirtyBitmap {
    /// Shared between clones until one of them changes a word (copy on write):
    /// a persist image is a clone of the bitmap plus the blocks in flight, and
    /// most persists find those blocks set already, so the image costs no copy
    /// of the words (2 MiB at 64 GiB) unless one changes.
    words: Arc<Vec<u64>>,
    block_count: u64,
    /// Number of set bits, kept equal to the popcount of `words`.
    dirty_count: u64,
    /// One bit per page: some bit of the page changed since the last
    /// [`take_changed_pages`](Self::take_changed_pages).
    changed: Vec<u64>,
    /// Per group of [`GROUP_WORDS`] words, how many of them are non-zero: the
    /// search for the next dirty block skips clean groups (a 64 GiB volume's
    /// bitmap is 262,144 words; a resync asks for the next run once per chunk).
    group_nonzero: Vec<u8>,
}

/// Words per entry of `DirtyBitmap::group_nonzero` (fits a u8 count).
const GROUP_WORDS: usize = 64;

fn group_counts(words: &[u64]) -> Vec<u8> {
    words
        .chunks(GROUP_WORDS)
        .map(|g| g.iter().filter(|&&w| w != 0).count() as u8)
        .collect()
}

impl PartialEq for DirtyBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.block_count == other.block_count && self.words == other.words
    }
}

impl Eq for DirtyBitmap {}

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

fn page_count(block_count: u64) -> u64 {
    block_count.div_ceil(PAGE_BLOCKS)
}

fn changed_words(block_count: u64) -> Vec<u64> {
    vec![0; word_count(page_count(block_count))]
}

impl DirtyBitmap {
    /// An all-clean bitmap of `block_count` blocks.
    pub fn new(block_count: BlockCount) -> Self {
        DirtyBitmap {
            words: Arc::new(vec![0; word_count(block_count.0)]),
            block_count: block_count.0,
            dirty_count: 0,
            changed: changed_words(block_count.0),
            group_nonzero: vec![0; word_count(block_count.0).div_ceil(GROUP_WORDS)],
        }
    }

    /// An all-clean bitmap for a volume of `size_bytes` at `block_size` bytes per
    /// bit; a partial last block counts as a whole block.
    pub fn for_volume(size_bytes: u64, block_size: u32) -> Self {
        Self::new(Self::blocks_for(size_bytes, block_size))
    }

    /// The bits of [`Self::for_volume`], without building the bitmap.
    pub fn blocks_for(size_bytes: u64, block_size: u32) -> BlockCount {
        assert!(block_size > 0, "block size must be positive");
        BlockCount(size_bytes.div_ceil(u64::from(block_size)))
    }

    pub fn block_count(&self) -> BlockCount {
        BlockCount(self.block_count)
    }

    /// ha (issue 12, online grow): the volume grew to `block_count` blocks; the
    /// new blocks are clean. The page that held the old end (and every new page)
    /// counts as changed, so the next persist writes them. Panics on a shrink.
    pub fn grow(&mut self, block_count: BlockCount) {
        assert!(
            block_count.0 >= self.block_count,
            "a bitmap never shrinks ({} to {} blocks)",
            self.block_count,
            block_count.0
        );
        if block_count.0 == self.block_count {
            return;
        }
        let old_pages = page_count(self.block_count);
        // Bits past the old end are zero (the struct's invariant): clean.
        Arc::make_mut(&mut self.words).resize(word_count(block_count.0), 0);
        // The new words are zero: their groups count none.
        self.group_nonzero
            .resize(self.words.len().div_ceil(GROUP_WORDS), 0);
        self.changed
            .resize(word_count(page_count(block_count.0)), 0);
        self.block_count = block_count.0;
        for page in old_pages.saturating_sub(1)..page_count(block_count.0) {
            self.changed[(page / WORD_BITS) as usize] |= 1 << (page % WORD_BITS);
        }
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
        self.for_each_word_mask(first, end, |word, mask| word | mask);
    }

    /// Mark blocks `[first, end)` clean. Panics unless `first <= end <= block_count`.
    pub fn clear(&mut self, first: BlockIndex, end: BlockIndex) {
        self.for_each_word_mask(first, end, |word, mask| word & !mask);
    }

    pub fn mark_all(&mut self) {
        self.mark(BlockIndex(0), BlockIndex(self.block_count));
    }

    pub fn clear_all(&mut self) {
        for w in 0..self.words.len() {
            if self.words[w] != 0 {
                Arc::make_mut(&mut self.words)[w] = 0;
                self.note_word_changed(w);
            }
        }
        self.group_nonzero.fill(0);
        self.dirty_count = 0;
    }

    fn note_word_changed(&mut self, word: usize) {
        let page = word as u64 / PAGE_WORDS;
        self.changed[(page / WORD_BITS) as usize] |= 1 << (page % WORD_BITS);
    }

    /// Set word `w` to `new`; returns the change in set bits.
    fn set_word(&mut self, w: usize, new: u64) -> i64 {
        let old = self.words[w];
        if old == new {
            return 0;
        }
        Arc::make_mut(&mut self.words)[w] = new;
        self.note_word_changed(w);
        match (old == 0, new == 0) {
            (true, false) => self.group_nonzero[w / GROUP_WORDS] += 1,
            (false, true) => self.group_nonzero[w / GROUP_WORDS] -= 1,
            _ => {}
        }
        new.count_ones() as i64 - old.count_ones() as i64
    }

    /// Set every word of group `g` (whole: GROUP_WORDS words) to `target` (0 or
    /// all ones), as [`Self::set_word`] on each would: pages with a changed word
    /// noted, the group's non-zero count, the change in set bits returned.
    fn fill_group(&mut self, g: usize, target: u64) -> i64 {
        debug_assert!(target == 0 || target == u64::MAX);
        let start = g * GROUP_WORDS;
        let words = &self.words[start..start + GROUP_WORDS];
        // One comparison per group, not per word: `diff` has a bit set iff some
        // word differs from the target.
        let diff = words.iter().fold(0, |acc, &w| acc | (w ^ target));
        if diff == 0 {
            return 0;
        }
        let ones_before: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        // A group spans one page or two (PAGE_WORDS is not a multiple of
        // GROUP_WORDS): note each page some changed word of the group lies in.
        let mut at = start;
        while at < start + GROUP_WORDS {
            let page_end = ((at as u64 / PAGE_WORDS + 1) * PAGE_WORDS) as usize;
            let seg_end = page_end.min(start + GROUP_WORDS);
            let seg = &self.words[at..seg_end];
            if seg.iter().fold(0, |acc, &w| acc | (w ^ target)) != 0 {
                self.note_word_changed(at);
            }
            at = seg_end;
        }
        Arc::make_mut(&mut self.words)[start..start + GROUP_WORDS].fill(target);
        self.group_nonzero[g] = if target == 0 { 0 } else { GROUP_WORDS as u8 };
        let ones_after = u64::from(target.count_ones()) * GROUP_WORDS as u64;
        ones_after as i64 - ones_before as i64
    }

    /// Replace every word overlapping `[first, end)` by `op(word, mask)`, with
    /// `mask` selecting the bits of the range in that word.
    fn for_each_word_mask(
        &mut self,
        first: BlockIndex,
        end: BlockIndex,
        op: impl Fn(u64, u64) -> u64,
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
        let apply =
            |this: &mut Self, w: usize, mask: u64| this.set_word(w, op(this.words[w], mask));
        if first_word == last_word {
            delta += apply(self, first_word, bit_mask(first_bit, last_bit));
        } else {
            delta += apply(self, first_word, bit_mask(first_bit, WORD_BITS - 1));
            // Whole words: every one becomes `op(_, u64::MAX)` (all set for a
            // mark, all clear for a clear). Groups of GROUP_WORDS entirely inside
            // the range are done in bulk (a whole-volume mark of 64 GiB is 262,144
            // words; the primary's persisted image marks such ranges per persist).
            let target = op(0, u64::MAX);
            debug_assert_eq!(target, op(u64::MAX, u64::MAX));
            let (lo, hi) = (first_word + 1, last_word);
            let mut w = lo;
            while w < hi {
                if w.is_multiple_of(GROUP_WORDS) && w + GROUP_WORDS <= hi {
                    delta += self.fill_group(w / GROUP_WORDS, target);
                    w += GROUP_WORDS;
                } else {
                    delta += apply(self, w, u64::MAX);
                    w += 1;
                }
            }
            delta += apply(self, last_word, bit_mask(0, last_bit));
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
            if w.is_multiple_of(GROUP_WORDS) {
                // Skip groups of clean words.
                let g = w / GROUP_WORDS;
                let next = self.group_nonzero.get(g..)?.iter().position(|&n| n != 0)?;
                w = (g + next) * GROUP_WORDS;
            }
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

    /// How many blocks are dirty in both `self` and `other` (same block count
    /// required).
    pub fn count_common(&self, other: &DirtyBitmap) -> u64 {
        assert_eq!(
            self.block_count, other.block_count,
            "common count of bitmaps with different block counts"
        );
        self.words
            .iter()
            .zip(other.words.iter())
            .map(|(a, b)| u64::from((a & b).count_ones()))
            .sum()
    }

    /// Mark every block that is dirty in `other` (same block count required).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        assert_eq!(
            self.block_count, other.block_count,
            "union of bitmaps with different block counts"
        );
        let mut delta: i64 = 0;
        for w in 0..self.words.len() {
            let theirs = other.words[w];
            if theirs & !self.words[w] != 0 {
                delta += self.set_word(w, self.words[w] | theirs);
            }
        }
        self.dirty_count = self
            .dirty_count
            .checked_add_signed(delta)
            .expect("dirty count out of range");
    }

    /// Number of persisted pages the bitmap spans (see [`PAGE_BLOCKS`]).
    pub fn page_count(&self) -> u64 {
        page_count(self.block_count)
    }

    /// The pages holding blocks `[first, end)` (empty if the range is).
    /// Panics unless `first <= end <= block_count`.
    pub fn pages_of(
        &self,
        first: BlockIndex,
        end: BlockIndex,
    ) -> impl Iterator<Item = BitmapPage> + use<> {
        assert!(
            first.0 <= end.0 && end.0 <= self.block_count,
            "block range [{}, {}) invalid for a bitmap of {} blocks",
            first.0,
            end.0,
            self.block_count
        );
        let pages: Range<u64> = if first.0 == end.0 {
            0..0
        } else {
            first.0 / PAGE_BLOCKS..(end.0 - 1) / PAGE_BLOCKS + 1
        };
        pages.map(BitmapPage)
    }

    /// The pages with a bit changed since the last
    /// [`take_changed_pages`](Self::take_changed_pages) (or since the bitmap
    /// was made), ascending.
    pub fn changed_pages(&self) -> impl Iterator<Item = BitmapPage> + '_ {
        self.changed.iter().enumerate().flat_map(|(i, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(BitmapPage(i as u64 * WORD_BITS + bit))
            })
        })
    }

    /// [`changed_pages`](Self::changed_pages), and forget them: the next call
    /// reports only pages changed after this one.
    pub fn take_changed_pages(&mut self) -> Vec<BitmapPage> {
        let pages = self.changed_pages().collect();
        self.changed.fill(0);
        pages
    }

    /// Mark `page` as changed, e.g. to persist it again after a failed persist.
    pub fn note_page_changed(&mut self, page: BitmapPage) {
        assert!(page.0 < self.page_count(), "page {} out of range", page.0);
        self.changed[(page.0 / WORD_BITS) as usize] |= 1 << (page.0 % WORD_BITS);
    }

    /// The words of `page` (bit `b` of word `i` is block
    /// `page × PAGE_BLOCKS + 64 i + b`); fewer than [`PAGE_WORDS`] for the last page.
    pub fn page_words(&self, page: BitmapPage) -> &[u64] {
        assert!(page.0 < self.page_count(), "page {} out of range", page.0);
        let start = (page.0 * PAGE_WORDS) as usize;
        let end = (start + PAGE_WORDS as usize).min(self.words.len());
        &self.words[start..end]
    }

    /// Blocks of `page`: `[page × PAGE_BLOCKS, min((page + 1) × PAGE_BLOCKS, block_count))`.
    pub fn page_blocks(&self, page: BitmapPage) -> (BlockIndex, BlockIndex) {
        assert!(page.0 < self.page_count(), "page {} out of range", page.0);
        let first = page.0 * PAGE_BLOCKS;
        (
            BlockIndex(first),
            BlockIndex((first + PAGE_BLOCKS).min(self.block_count)),
        )
    }

    /// Set, in `words` (the words of `page`, as [`page_words`](Self::page_words)
    /// lays them out), the bits of blocks `[first, end)` that fall in the page.
    /// For building one page of "bitmap plus ranges in flight" without a
    /// copy of the whole bitmap. The caller keeps `end` within the volume.
    pub fn mark_in_page(page: BitmapPage, words: &mut [u64], first: BlockIndex, end: BlockIndex) {
        let page_first = page.0 * PAGE_BLOCKS;
        let lo = first.0.max(page_first);
        let hi = end.0.min(page_first + words.len() as u64 * WORD_BITS);
        let mut b = lo;
        while b < hi {
            let rel = b - page_first;
            let w = (rel / WORD_BITS) as usize;
            let bit = rel % WORD_BITS;
            let last_bit = (hi - 1 - page_first).min((w as u64 + 1) * WORD_BITS - 1) % WORD_BITS;
            words[w] |= bit_mask(bit, last_bit);
            b = page_first + w as u64 * WORD_BITS + last_bit + 1;
        }
    }

    /// Replace the words of `page` by `words` (as [`page_words`](Self::page_words)
    /// lays them out): what a persisted page image does to the bitmap read back.
    /// Panics on a page out of range, a wrong word count, or bits past the end.
    pub fn set_page_words(&mut self, page: BitmapPage, words: &[u64]) {
        let start = (page.0 * PAGE_WORDS) as usize;
        let count = self.page_words(page).len();
        assert_eq!(words.len(), count, "page {} holds {count} words", page.0);
        if let Some(&last) = words.last()
            && start + count == self.words.len()
            && !self.block_count.is_multiple_of(WORD_BITS)
        {
            assert!(
                last >> (self.block_count % WORD_BITS) == 0,
                "bits set past the last block"
            );
        }
        let mut delta = 0;
        for (i, &w) in words.iter().enumerate() {
            delta += self.set_word(start + i, w);
        }
        self.dirty_count = self
            .dirty_count
            .checked_add_signed(delta)
            .expect("dirty count out of range");
    }

    /// A bitmap from its words (as [`page_words`](Self::page_words) gives them,
    /// concatenated). No page counts as changed. Fails like
    /// [`from_bytes`](Self::from_bytes) on a wrong length or bits past the end.
    pub fn from_words(block_count: BlockCount, words: Vec<u64>) -> Result<Self, BitmapError> {
        let expected = word_count(block_count.0);
        if words.len() != expected {
            return Err(BitmapError::LengthMismatch {
                block_count: block_count.0,
                expected_bytes: Self::encoded_len_bytes(block_count),
                actual_bytes: words.len() as u64 * 8,
            });
        }
        let tail_bits = block_count.0 % WORD_BITS;
        if tail_bits != 0 && words[expected - 1] & (u64::MAX << tail_bits) != 0 {
            return Err(BitmapError::BitsBeyondEnd {
                block_count: block_count.0,
            });
        }
        let dirty_count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(DirtyBitmap {
            group_nonzero: group_counts(&words),
            words: Arc::new(words),
            block_count: block_count.0,
            dirty_count,
            changed: changed_words(block_count.0),
        })
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
        for word in self.words.iter() {
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
            group_nonzero: group_counts(&words),
            words: Arc::new(words),
            block_count: block_count.0,
            dirty_count,
            changed: changed_words(block_count.0),
        })
    }
}

/// Some pages of a bitmap image, each whole: what a persist writes when an
/// activity extent retires (ARCHITECTURE §4: "retiring one writes only the bitmap
/// pages that cover it"), instead of a copy of the whole bitmap (32 MiB per TiB).
/// Built from the dirty bitmap's pages, then widened with the ranges in flight
/// ([`BitmapPages::mark`]); a page not listed is left as it is on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BitmapPages {
    pages: std::collections::BTreeMap<u64, Vec<u64>>,
}

impl BitmapPages {
    /// The pages of `bm` that hold blocks of `ranges`, copied.
    pub fn covering(
        bm: &DirtyBitmap,
        ranges: impl IntoIterator<Item = (BlockIndex, BlockIndex)>,
    ) -> BitmapPages {
        let mut pages = std::collections::BTreeMap::new();
        for (first, end) in ranges {
            for page in bm.pages_of(first, end) {
                pages
                    .entry(page.0)
                    .or_insert_with(|| bm.page_words(page).to_vec());
            }
        }
        BitmapPages { pages }
    }

    /// Set the bits of blocks `[first, end)` in the listed pages (blocks of other
    /// pages are not part of this image).
    pub fn mark(&mut self, first: BlockIndex, end: BlockIndex) {
        if first.0 >= end.0 {
            return;
        }
        let (lo, hi) = (first.0 / PAGE_BLOCKS, (end.0 - 1) / PAGE_BLOCKS);
        for (&page, words) in self.pages.range_mut(lo..=hi) {
            DirtyBitmap::mark_in_page(BitmapPage(page), words, first, end);
        }
    }

    /// Whether block `b` is listed and set.
    pub fn is_dirty(&self, b: BlockIndex) -> bool {
        let rel = b.0 % PAGE_BLOCKS;
        self.pages.get(&(b.0 / PAGE_BLOCKS)).is_some_and(|w| {
            w.get((rel / WORD_BITS) as usize)
                .is_some_and(|word| word >> (rel % WORD_BITS) & 1 == 1)
        })
    }

    /// Whether page `page` is listed.
    pub fn contains(&self, page: BitmapPage) -> bool {
        self.pages.contains_key(&page.0)
    }

    /// The listed pages, ascending, with their words.
    pub fn iter(&self) -> impl Iterator<Item = (BitmapPage, &[u64])> + '_ {
        self.pages
            .iter()
            .map(|(&p, w)| (BitmapPage(p), w.as_slice()))
    }

    /// The words of a listed page.
    pub fn words(&self, page: BitmapPage) -> Option<&[u64]> {
        self.pages.get(&page.0).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Write the listed pages into `bm` (what the bitmap read back after this
    /// image was persisted holds).
    pub fn apply_to(&self, bm: &mut DirtyBitmap) {
        for (page, words) in self.iter() {
            bm.set_page_words(page, words);
        }
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

    #[test]
    fn pages_cover_their_blocks_and_words_round_trip() {
        let blocks = 3 * PAGE_BLOCKS + 100;
        let mut bm = DirtyBitmap::new(BlockCount(blocks));
        assert_eq!(bm.page_count(), 4);
        let pages = |bm: &DirtyBitmap, a, b| {
            bm.pages_of(BlockIndex(a), BlockIndex(b))
                .map(|p| p.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(pages(&bm, 0, 0), Vec::<u64>::new());
        assert_eq!(pages(&bm, 0, 1), vec![0]);
        assert_eq!(pages(&bm, PAGE_BLOCKS - 1, PAGE_BLOCKS + 1), vec![0, 1]);
        assert_eq!(pages(&bm, PAGE_BLOCKS, 2 * PAGE_BLOCKS), vec![1]);
        assert_eq!(pages(&bm, 0, blocks), vec![0, 1, 2, 3]);
        assert_eq!(bm.page_words(BitmapPage(0)).len(), PAGE_WORDS as usize);
        assert_eq!(bm.page_words(BitmapPage(3)).len(), 2);
        bm.mark(BlockIndex(PAGE_BLOCKS + 5), BlockIndex(PAGE_BLOCKS + 7));
        bm.mark(BlockIndex(blocks - 1), BlockIndex(blocks));
        assert_eq!(bm.page_words(BitmapPage(1))[0], 0b110_0000);
        let words: Vec<u64> = (0..4)
            .flat_map(|p| bm.page_words(BitmapPage(p)).to_vec())
            .collect();
        let back = DirtyBitmap::from_words(BlockCount(blocks), words.clone()).unwrap();
        assert_eq!(back, bm);
        assert_eq!(
            back.changed_pages().count(),
            0,
            "a loaded bitmap changed nothing"
        );
        let mut stray = words;
        *stray.last_mut().unwrap() |= 1 << 63;
        assert_eq!(
            DirtyBitmap::from_words(BlockCount(blocks), stray),
            Err(BitmapError::BitsBeyondEnd {
                block_count: blocks
            })
        );
    }

    #[test]
    fn mark_in_page_matches_mark_on_the_whole_bitmap() {
        let blocks = 2 * PAGE_BLOCKS + 130;
        for (a, b) in [
            (0, 1),
            (63, 65),
            (PAGE_BLOCKS - 3, PAGE_BLOCKS + 70),
            (5, blocks),
            (2 * PAGE_BLOCKS + 64, 2 * PAGE_BLOCKS + 129),
            (100, 100),
        ] {
            let mut whole = DirtyBitmap::new(BlockCount(blocks));
            whole.mark(BlockIndex(7), BlockIndex(9));
            let base = whole.clone();
            whole.mark(BlockIndex(a), BlockIndex(b));
            for p in 0..whole.page_count() {
                let page = BitmapPage(p);
                let mut words = base.page_words(page).to_vec();
                DirtyBitmap::mark_in_page(page, &mut words, BlockIndex(a), BlockIndex(b));
                assert_eq!(words, whole.page_words(page), "[{a}, {b}) page {p}");
            }
            assert_eq!(
                base.page_blocks(BitmapPage(2)),
                (BlockIndex(2 * PAGE_BLOCKS), BlockIndex(blocks))
            );
        }
    }

    #[test]
    fn only_pages_whose_bits_changed_are_reported() {
        let mut bm = DirtyBitmap::new(BlockCount(4 * PAGE_BLOCKS));
        bm.mark(BlockIndex(10), BlockIndex(20));
        bm.clear(BlockIndex(2 * PAGE_BLOCKS), BlockIndex(3 * PAGE_BLOCKS)); // already clear
        assert_eq!(bm.take_changed_pages(), vec![BitmapPage(0)]);
        assert_eq!(bm.take_changed_pages(), vec![]);
        bm.mark(BlockIndex(10), BlockIndex(20)); // already set
        assert_eq!(bm.changed_pages().count(), 0);
        bm.mark(BlockIndex(PAGE_BLOCKS - 1), BlockIndex(3 * PAGE_BLOCKS + 1));
        assert_eq!(
            bm.take_changed_pages(),
            vec![BitmapPage(0), BitmapPage(1), BitmapPage(2), BitmapPage(3)]
        );
        bm.clear_all();
        bm.note_page_changed(BitmapPage(2));
        assert_eq!(
            bm.take_changed_pages(),
            vec![BitmapPage(0), BitmapPage(1), BitmapPage(2), BitmapPage(3)]
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Mark(u64, u64),
        Clear(u64, u64),
        MarkAll,
        ClearAll,
        Union(Vec<(u64, u64)>),
        RoundTrip,
        TakeChanged,
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
            2 => Just(Op::TakeChanged),
        ]
    }

    fn case() -> impl Strategy<Value = (u64, Vec<Op>, Vec<(u64, u64)>)> {
        // Up to 20,000 blocks: several groups of words the search skips.
        prop_oneof![0u64..300, 4000u64..20_000].prop_flat_map(|n| {
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
            // Pages where some bit flipped since the last take.
            let mut model_changed = BTreeSet::new();
            for op in ops {
                let before = model.clone();
                match op {
                    Op::Mark(a, b) => { bm.mark(BlockIndex(a), BlockIndex(b)); model.extend(a..b); }
                    Op::Clear(a, b) => { bm.clear(BlockIndex(a), BlockIndex(b)); for i in a..b { model.remove(&i); } }
                    Op::MarkAll => { bm.mark_all(); model.extend(0..n); }
                    Op::ClearAll => { bm.clear_all(); model.clear(); }
                    Op::Union(ranges) => {
                        let mut other = DirtyBitmap::new(BlockCount(n));
                        let mut theirs = BTreeSet::new();
                        for (a, b) in ranges { other.mark(BlockIndex(a), BlockIndex(b)); theirs.extend(a..b); }
                        prop_assert_eq!(bm.count_common(&other), model.intersection(&theirs).count() as u64);
                        model.extend(theirs);
                        bm.union_with(&other);
                    }
                    Op::RoundTrip => {
                        let bytes = bm.to_bytes();
                        prop_assert_eq!(bytes.len() as u64, n.div_ceil(8));
                        bm = DirtyBitmap::from_bytes(BlockCount(n), &bytes).unwrap();
                        model_changed.clear();
                    }
                    Op::TakeChanged => {
                        let taken: Vec<u64> = bm.take_changed_pages().iter().map(|p| p.0).collect();
                        prop_assert_eq!(taken, model_changed.iter().copied().collect::<Vec<_>>());
                        model_changed.clear();
                    }
                }
                for b in before.symmetric_difference(&model) {
                    model_changed.insert(b / PAGE_BLOCKS);
                }
                prop_assert_eq!(bm.dirty_count().0, model.len() as u64);
                prop_assert_eq!(&bm.group_nonzero, &group_counts(&bm.words));
            }
            let reported: Vec<u64> = bm.changed_pages().map(|p| p.0).collect();
            prop_assert_eq!(reported, model_changed.into_iter().collect::<Vec<_>>());
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Page tracking across page boundaries, against a plain vector of bits:
        /// a page is reported iff one of its bits flipped since the last take.
        #[test]
        fn changed_pages_match_a_model_across_pages(
            (n, ops) in (PAGE_BLOCKS..3 * PAGE_BLOCKS + 300).prop_flat_map(|n| {
                (Just(n), proptest::collection::vec(op(n), 0..12))
            })
        ) {
            let mut bm = DirtyBitmap::new(BlockCount(n));
            let mut model = vec![false; n as usize];
            let mut model_changed = BTreeSet::new();
            for op in ops {
                let before = model.clone();
                match op {
                    Op::Mark(a, b) => { bm.mark(BlockIndex(a), BlockIndex(b)); model[a as usize..b as usize].fill(true); }
                    Op::Clear(a, b) => { bm.clear(BlockIndex(a), BlockIndex(b)); model[a as usize..b as usize].fill(false); }
                    Op::MarkAll => { bm.mark_all(); model.fill(true); }
                    Op::ClearAll => { bm.clear_all(); model.fill(false); }
                    Op::Union(ranges) => {
                        let mut other = DirtyBitmap::new(BlockCount(n));
                        for (a, b) in ranges { other.mark(BlockIndex(a), BlockIndex(b)); model[a as usize..b as usize].fill(true); }
                        bm.union_with(&other);
                    }
                    Op::RoundTrip => {
                        let words: Vec<u64> = (0..bm.page_count())
                            .flat_map(|p| bm.page_words(BitmapPage(p)).to_vec())
                            .collect();
                        bm = DirtyBitmap::from_words(BlockCount(n), words).unwrap();
                        model_changed.clear();
                    }
                    Op::TakeChanged => {
                        let taken: Vec<u64> = bm.take_changed_pages().iter().map(|p| p.0).collect();
                        prop_assert_eq!(taken, model_changed.iter().copied().collect::<Vec<_>>());
                        model_changed.clear();
                    }
                }
                for (b, (x, y)) in before.iter().zip(&model).enumerate() {
                    if x != y {
                        model_changed.insert(b as u64 / PAGE_BLOCKS);
                    }
                }
                prop_assert_eq!(bm.dirty_count().0, model.iter().filter(|&&x| x).count() as u64);
            }
            let reported: Vec<u64> = bm.changed_pages().map(|p| p.0).collect();
            prop_assert_eq!(reported, model_changed.into_iter().collect::<Vec<_>>());
        }
    }
    #[test]
    fn bitmap_pages_hold_whole_pages_and_apply_back() {
        let blocks = 3 * PAGE_BLOCKS + 10;
        let mut bm = DirtyBitmap::new(BlockCount(blocks));
        bm.mark(BlockIndex(5), BlockIndex(7));
        bm.mark(BlockIndex(PAGE_BLOCKS + 1), BlockIndex(PAGE_BLOCKS + 2));
        bm.mark(BlockIndex(3 * PAGE_BLOCKS + 9), BlockIndex(blocks));
        // Pages of blocks in page 1 and the last page only.
        let mut pages = BitmapPages::covering(
            &bm,
            [
                (BlockIndex(PAGE_BLOCKS), BlockIndex(PAGE_BLOCKS + 4)),
                (BlockIndex(blocks - 1), BlockIndex(blocks)),
            ],
        );
        assert_eq!(pages.len(), 2);
        assert!(pages.contains(BitmapPage(1)) && pages.contains(BitmapPage(3)));
        assert!(pages.is_dirty(BlockIndex(PAGE_BLOCKS + 1)));
        assert!(!pages.is_dirty(BlockIndex(5)), "page 0 is not listed");
        // Ranges in flight mark listed pages only.
        pages.mark(BlockIndex(0), BlockIndex(PAGE_BLOCKS + 100));
        assert!(pages.is_dirty(BlockIndex(PAGE_BLOCKS + 99)));
        assert!(!pages.is_dirty(BlockIndex(3)));
        // Applied to an older persisted copy: listed pages replaced, others kept.
        let mut disk = DirtyBitmap::new(BlockCount(blocks));
        disk.mark(BlockIndex(2 * PAGE_BLOCKS), BlockIndex(2 * PAGE_BLOCKS + 1));
        pages.apply_to(&mut disk);
        assert!(disk.is_dirty(BlockIndex(2 * PAGE_BLOCKS)));
        assert!(disk.is_dirty(BlockIndex(PAGE_BLOCKS + 50)));
        assert!(disk.is_dirty(BlockIndex(blocks - 1)));
        assert!(!disk.is_dirty(BlockIndex(5)));
        assert_eq!(disk.dirty_count().0, 1 + 100 + 1);
    }

    /// ha (issue 12): a grown bitmap keeps its bits, adds clean blocks, and
    /// names the old last page and the new pages as changed.
    #[test]
    fn a_grown_bitmap_keeps_its_bits_and_adds_clean_blocks() {
        let mut bm = DirtyBitmap::new(BlockCount(PAGE_BLOCKS + 10));
        bm.mark(BlockIndex(3), BlockIndex(5));
        bm.mark(BlockIndex(PAGE_BLOCKS + 9), BlockIndex(PAGE_BLOCKS + 10));
        bm.take_changed_pages();
        bm.grow(BlockCount(3 * PAGE_BLOCKS + 1));
        assert_eq!(bm.block_count(), BlockCount(3 * PAGE_BLOCKS + 1));
        assert_eq!(bm.dirty_count(), BlockCount(3));
        assert!(bm.is_dirty(BlockIndex(PAGE_BLOCKS + 9)));
        assert!(!bm.is_dirty(BlockIndex(PAGE_BLOCKS + 10)));
        assert!(!bm.is_dirty(BlockIndex(3 * PAGE_BLOCKS)));
        let pages: Vec<u64> = bm.take_changed_pages().iter().map(|p| p.0).collect();
        assert_eq!(pages, vec![1, 2, 3]);
        bm.mark(BlockIndex(3 * PAGE_BLOCKS), BlockIndex(3 * PAGE_BLOCKS + 1));
        assert_eq!(bm.dirty_count(), BlockCount(4));
        assert_eq!(bm.group_nonzero, group_counts(&bm.words));
        assert_eq!(
            bm.next_dirty_run(BlockIndex(PAGE_BLOCKS + 10), BlockCount(u64::MAX)),
            Some((BlockIndex(3 * PAGE_BLOCKS), BlockCount(1)))
        );
    }
}
