//! Overlap ordering for block I/O (G2).
//!
//! Both nodes run many writes at once, but two writes whose byte ranges overlap
//! must reach the volume in `seq` order, or the primary's image and the
//! secondary's image could end with different winners for the same bytes. The
//! [`RangeSequencer`] admits operations in `seq` order and says which may start:
//! an operation starts once every earlier operation that overlaps it has
//! completed. Non-overlapping operations never wait for each other.
//!
//! The sequencer does no I/O; its callers start and complete the operations.
//! Cost: admission looks only at operations whose start offset lies within
//! `max_len_bytes` below the new range, via an ordered map, so it is
//! O(log n + k) for k overlapping neighbours.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{ByteRange, Seq};

#[derive(Debug)]
struct Pending {
    range: ByteRange,
    /// Earlier overlapping operations that have not completed yet.
    blockers: u32,
    /// Later operations waiting for this one.
    dependents: Vec<Seq>,
}

/// Admits operations in seq order and releases them when their overlapping
/// predecessors have completed.
#[derive(Debug, Default)]
pub struct RangeSequencer {
    pending: BTreeMap<Seq, Pending>,
    /// (offset, seq) of every pending operation, for range queries.
    by_offset: BTreeSet<(u64, Seq)>,
    /// Longest range ever admitted: bounds how far below an offset to look.
    max_len_bytes: u64,
    last_admitted: Seq,
}

impl RangeSequencer {
    pub fn new() -> RangeSequencer {
        RangeSequencer::default()
    }

    /// Admit operation `seq` on `range`. Returns true when it may start now.
    /// Seqs must be admitted in increasing order.
    pub fn admit(&mut self, seq: Seq, range: ByteRange) -> bool {
        assert!(
            seq > self.last_admitted,
            "sequencer: seq {seq} admitted after {}",
            self.last_admitted
        );
        self.last_admitted = seq;
        self.max_len_bytes = self.max_len_bytes.max(range.len);
        let low = range.offset.saturating_sub(self.max_len_bytes);
        let mut blockers = 0;
        if range.len > 0 {
            let earlier: Vec<Seq> = self
                .by_offset
                .range((low, Seq::ZERO)..(range.end(), Seq::ZERO))
                .map(|&(_, s)| s)
                .collect();
            for other in earlier {
                let p = self.pending.get_mut(&other).expect("indexed op is pending");
                if p.range.overlaps(&range) {
                    p.dependents.push(seq);
                    blockers += 1;
                }
            }
        }
        self.pending.insert(
            seq,
            Pending {
                range,
                blockers,
                dependents: Vec::new(),
            },
        );
        self.by_offset.insert((range.offset, seq));
        blockers == 0
    }

    /// Mark `seq` complete; returns the operations that may start now, in seq order.
    pub fn complete(&mut self, seq: Seq) -> Vec<Seq> {
        let done = self
            .pending
            .remove(&seq)
            .unwrap_or_else(|| panic!("sequencer: completing unknown seq {seq}"));
        assert_eq!(
            done.blockers, 0,
            "sequencer: seq {seq} completed while blocked"
        );
        self.by_offset.remove(&(done.range.offset, seq));
        let mut ready = Vec::new();
        for dep in done.dependents {
            let p = self.pending.get_mut(&dep).expect("dependent is pending");
            p.blockers -= 1;
            if p.blockers == 0 {
                ready.push(dep);
            }
        }
        ready.sort();
        ready
    }

    /// Operations admitted and not yet completed (running or waiting).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn non_overlapping_ops_start_at_once() {
        let mut s = RangeSequencer::new();
        assert!(s.admit(Seq(1), ByteRange::new(0, 4096)));
        assert!(s.admit(Seq(2), ByteRange::new(4096, 4096)));
        assert!(s.complete(Seq(2)).is_empty());
        assert!(s.complete(Seq(1)).is_empty());
        assert!(s.is_empty());
    }

    #[test]
    fn overlapping_ops_wait_for_every_earlier_overlap() {
        let mut s = RangeSequencer::new();
        assert!(s.admit(Seq(1), ByteRange::new(0, 8192)));
        assert!(s.admit(Seq(2), ByteRange::new(8192, 4096)));
        // Overlaps both 1 and 2.
        assert!(!s.admit(Seq(3), ByteRange::new(4096, 8192)));
        assert!(s.complete(Seq(1)).is_empty());
        assert_eq!(s.complete(Seq(2)), vec![Seq(3)]);
        assert!(s.complete(Seq(3)).is_empty());
    }

    #[test]
    fn a_long_range_below_is_found() {
        let mut s = RangeSequencer::new();
        assert!(s.admit(Seq(1), ByteRange::new(0, 1 << 20)));
        assert!(!s.admit(Seq(2), ByteRange::new((1 << 20) - 1, 1)));
    }

    proptest! {
        /// Model: run ops in a random interleaving the sequencer allows; every pair
        /// of overlapping ops must complete in seq order, and nothing may deadlock.
        #[test]
        fn overlapping_ops_complete_in_seq_order(
            ops in proptest::collection::vec((0u64..64, 1u64..16), 1..60),
            picks in proptest::collection::vec(any::<u16>(), 200),
        ) {
            let mut s = RangeSequencer::new();
            let mut runnable = Vec::new();
            let ranges: Vec<ByteRange> = ops.iter().map(|&(o, l)| ByteRange::new(o * 512, l * 512)).collect();
            for (i, r) in ranges.iter().enumerate() {
                if s.admit(Seq(i as u64 + 1), *r) { runnable.push(Seq(i as u64 + 1)); }
            }
            let mut order = Vec::new();
            let mut pick = picks.into_iter().cycle();
            while !runnable.is_empty() {
                let i = pick.next().unwrap() as usize % runnable.len();
                let seq = runnable.swap_remove(i);
                order.push(seq);
                runnable.extend(s.complete(seq));
            }
            prop_assert_eq!(order.len(), ranges.len(), "deadlock: not every op ran");
            let pos: std::collections::HashMap<Seq, usize> = order.iter().enumerate().map(|(i, s)| (*s, i)).collect();
            for a in 0..ranges.len() {
                for b in a + 1..ranges.len() {
                    if ranges[a].overlaps(&ranges[b]) {
                        prop_assert!(pos[&Seq(a as u64 + 1)] < pos[&Seq(b as u64 + 1)]);
                    }
                }
            }
        }
    }
}
