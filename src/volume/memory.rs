//! The in-memory device: a `Vec<u8>` behind a mutex, for tests of the layers above.
//! Range checks are done by `Volume` exactly as for on-disk volumes.
//!
//! It models a sparse file at [`MEMORY_PAGE_BYTES`] granularity so that tests of
//! sparse-aware code (resync skipping holes, zero frames punched on the secondary)
//! can run without a disk: a page is allocated by any write or `write_zeroes` that
//! touches it and deallocated by a `punch_hole` that covers it whole (a partly
//! covered page is zeroed and stays allocated, as on a file system).

use std::ops::Range;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

/// Allocation granularity of the memory device (the usual file-system block).
pub const MEMORY_PAGE_BYTES: u64 = 4096;

pub struct MemoryDevice {
    state: Mutex<State>,
}

struct State {
    data: Vec<u8>,
    /// One bit per page: set when the page is allocated.
    allocated: Vec<u64>,
}

impl MemoryDevice {
    pub fn new(size_bytes: u64) -> MemoryDevice {
        let len = usize::try_from(size_bytes).expect("memory volume size fits in usize");
        let pages = size_bytes.div_ceil(MEMORY_PAGE_BYTES) as usize;
        MemoryDevice {
            state: Mutex::new(State {
                data: vec![0; len],
                allocated: vec![0; pages.div_ceil(64)],
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every operation leaves the state valid, so a panic while holding it loses nothing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn span(offset: u64, len_bytes: u64) -> Range<usize> {
        // Volume checked offset + len <= size, and size fits in usize.
        offset as usize..(offset + len_bytes) as usize
    }

    pub fn read(&self, offset: u64, len_bytes: u32) -> Bytes {
        Bytes::copy_from_slice(&self.lock().data[Self::span(offset, len_bytes.into())])
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        state.data[Self::span(offset, data.len() as u64)].copy_from_slice(data);
        state.set_pages(touched_pages(offset, data.len() as u64), true);
    }

    /// Zeros that stay allocated (`FALLOC_FL_ZERO_RANGE` on a file).
    pub fn write_zeroes(&self, offset: u64, len_bytes: u64) {
        let mut state = self.lock();
        state.data[Self::span(offset, len_bytes)].fill(0);
        state.set_pages(touched_pages(offset, len_bytes), true);
    }

    /// Zeros, deallocating every page the range covers whole.
    pub fn punch_hole(&self, offset: u64, len_bytes: u64) {
        let mut state = self.lock();
        state.data[Self::span(offset, len_bytes)].fill(0);
        let first = offset.div_ceil(MEMORY_PAGE_BYTES);
        let end = (offset + len_bytes) / MEMORY_PAGE_BYTES;
        if first < end {
            state.set_pages(first..end, false);
        }
    }

    /// The first allocated run of pages inside `[offset, end)`, in bytes, clipped.
    pub fn next_data(&self, offset: u64, end: u64) -> Option<Range<u64>> {
        let state = self.lock();
        let page_end = end.div_ceil(MEMORY_PAGE_BYTES);
        let mut page = offset / MEMORY_PAGE_BYTES;
        while page < page_end && !state.is_allocated(page) {
            // Skip empty 64-page words in one step.
            if page.is_multiple_of(64) && state.allocated[(page / 64) as usize] == 0 {
                page += 64;
            } else {
                page += 1;
            }
        }
        if page >= page_end {
            return None;
        }
        let start = page;
        while page < page_end && state.is_allocated(page) {
            page += 1;
        }
        Some((start * MEMORY_PAGE_BYTES).max(offset)..(page * MEMORY_PAGE_BYTES).min(end))
    }
}

impl State {
    fn is_allocated(&self, page: u64) -> bool {
        self.allocated[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn set_pages(&mut self, pages: Range<u64>, allocated: bool) {
        for page in pages {
            let (word, bit) = ((page / 64) as usize, 1u64 << (page % 64));
            if allocated {
                self.allocated[word] |= bit;
            } else {
                self.allocated[word] &= !bit;
            }
        }
    }
}

/// Pages that a byte range touches at all.
fn touched_pages(offset: u64, len_bytes: u64) -> Range<u64> {
    if len_bytes == 0 {
        return 0..0;
    }
    offset / MEMORY_PAGE_BYTES..(offset + len_bytes).div_ceil(MEMORY_PAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_allocate_pages_and_whole_page_punches_free_them() {
        let dev = MemoryDevice::new(2 << 20);
        assert_eq!(dev.next_data(0, 2 << 20), None);
        dev.write(5000, &[1; 10]);
        assert_eq!(dev.next_data(0, 2 << 20), Some(4096..8192));
        assert_eq!(dev.next_data(6000, 7000), Some(6000..7000));
        assert_eq!(dev.next_data(8192, 2 << 20), None);
        dev.write_zeroes(300 * 4096, 2 * 4096 + 1);
        assert_eq!(dev.next_data(8192, 2 << 20), Some(300 * 4096..303 * 4096));
        // A punch that covers page 300 whole and page 301 partly.
        dev.punch_hole(300 * 4096, 4096 + 100);
        assert_eq!(dev.next_data(8192, 2 << 20), Some(301 * 4096..303 * 4096));
        dev.punch_hole(0, 2 << 20);
        assert_eq!(dev.next_data(0, 2 << 20), None);
        assert!(dev.read(5000, 10).iter().all(|b| *b == 0));
    }
}
