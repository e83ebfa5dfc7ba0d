//! Checksum resync helpers (ARCHITECTURE §5): per-block blake3 hashes of a range,
//! computed the same way on both nodes so identical blocks compare equal.
//!
//! The planning of resync passes (which blocks, in what order, as data or as
//! hashes) lives in the primary engine; this module owns only the hash format.

/// blake3 of each `block_size` block of `data` (the last one may be shorter, when
/// the range ends at the end of the volume).
pub fn hash_blocks(data: &[u8], block_size: u32) -> Vec<[u8; 32]> {
    data.chunks(block_size as usize)
        .map(|b| *blake3::hash(b).as_bytes())
        .collect()
}

/// Indices of the blocks of `data` whose hash differs from `expected`. A block count
/// that differs from `expected.len()` is the caller's bug (ranges are checked first).
pub fn mismatched_blocks(data: &[u8], block_size: u32, expected: &[[u8; 32]]) -> Vec<u32> {
    let local = hash_blocks(data, block_size);
    assert_eq!(
        local.len(),
        expected.len(),
        "hash check over a different block count"
    );
    local
        .iter()
        .zip(expected)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_differing_blocks_are_reported() {
        let mut a = vec![0u8; 4096 * 3 + 100];
        let expected = hash_blocks(&a, 4096);
        assert_eq!(expected.len(), 4);
        assert!(mismatched_blocks(&a, 4096, &expected).is_empty());
        a[4096 + 7] = 1;
        a[4096 * 3 + 99] = 1;
        assert_eq!(mismatched_blocks(&a, 4096, &expected), vec![1, 3]);
    }
}
