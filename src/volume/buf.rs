//! A heap buffer aligned for `O_DIRECT`, convertible into `bytes::Bytes` without a copy.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Memory alignment of every [`AlignedBuf`]: 4096 satisfies the DMA alignment of every
/// device and file system we know of (most need 512 or less).
pub const BUF_ALIGN_BYTES: usize = 4096;

/// A zero-initialised, 4096-aligned heap buffer of a fixed length.
///
/// Its memory never moves while it lives, so a pointer into it stays valid while an
/// io_uring operation holds it (the engine keeps the buffer until the completion is reaped).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len_bytes: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf exclusively owns its allocation (like Vec<u8>); no interior sharing.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned bytes (like Vec<u8>).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len_bytes` zeroed bytes (at least one aligned block is allocated so the
    /// pointer is always valid and aligned, even for `len_bytes == 0`).
    pub fn zeroed(len_bytes: usize) -> AlignedBuf {
        let alloc_bytes = len_bytes.max(1).next_multiple_of(BUF_ALIGN_BYTES);
        let layout = Layout::from_size_align(alloc_bytes, BUF_ALIGN_BYTES)
            .expect("buffer layout: size is bounded by the 32 MiB request limit");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len_bytes,
            layout,
        }
    }

    /// Copy `data` into a new aligned buffer.
    pub fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len_bytes
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len_bytes initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len_bytes) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len_bytes initialised bytes, uniquely borrowed via &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len_bytes) }
    }

    /// Hand the buffer to `Bytes` without copying.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_convert_without_copy() {
        for len in [0usize, 1, 511, 4096, 4097, 1 << 20] {
            let mut buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_slice().as_ptr() as usize % BUF_ALIGN_BYTES, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.as_slice().iter().all(|b| *b == 0));
            if len > 0 {
                buf.as_mut_slice()[len - 1] = 7;
            }
            let ptr = buf.as_slice().as_ptr();
            let bytes = buf.into_bytes();
            assert_eq!(bytes.len(), len);
            assert_eq!(bytes.as_ptr(), ptr);
            if len > 0 {
                assert_eq!(bytes[len - 1], 7);
            }
        }
    }
}
