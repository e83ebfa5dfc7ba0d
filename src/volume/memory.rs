//! The in-memory device: a `Vec<u8>` behind a mutex, for tests of the layers above.
//! Range checks are done by `Volume` exactly as for on-disk volumes.

use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

pub struct MemoryDevice {
    data: Mutex<Vec<u8>>,
}

impl MemoryDevice {
    pub fn new(size_bytes: u64) -> MemoryDevice {
        let len = usize::try_from(size_bytes).expect("memory volume size fits in usize");
        MemoryDevice {
            data: Mutex::new(vec![0; len]),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // Every operation leaves the Vec valid, so a panic while holding it loses nothing.
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn span(offset: u64, len_bytes: u64) -> std::ops::Range<usize> {
        // Volume checked offset + len <= size, and size fits in usize.
        offset as usize..(offset + len_bytes) as usize
    }

    pub fn read(&self, offset: u64, len_bytes: u32) -> Bytes {
        Bytes::copy_from_slice(&self.lock()[Self::span(offset, len_bytes.into())])
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        self.lock()[Self::span(offset, data.len() as u64)].copy_from_slice(data);
    }

    pub fn write_zeroes(&self, offset: u64, len_bytes: u64) {
        self.lock()[Self::span(offset, len_bytes)].fill(0);
    }
}
