//! Frontends: how clients reach a volume. Today there is one, the NBD server
//! ([`crate::nbd::server`]), which the primary uses to export its volume and the
//! secondary to export a read-only view of its own.
//!
//! A frontend sees the volume only through [`ExportBackend`], a byte-addressed,
//! asynchronous block interface. It never sees replication types: the engine
//! implements the trait and decides what a write, a FUA or a flush means for the
//! pair (G1, G2). This module owns the trait; it does not own durability,
//! ordering across connections, or the volume's contents.

pub use crate::nbd::negotiate::MetaContext;
pub use crate::nbd::{NbdAddress, NbdError, NbdExport, NbdListener, NbdServer};

/// A boxed future returned by [`ExportBackend`] operations. `'static` so that the
/// frontend can run it on its own task while it keeps reading requests.
pub type IoFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<T>> + Send + 'static>>;

/// One extent of a block-status answer: `len_bytes` bytes, starting where the
/// previous extent ended, with the context's `flags` (for `base:allocation`
/// [`STATE_HOLE`] and [`STATE_ZERO`], for a dirty bitmap [`STATE_DIRTY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len_bytes: u64,
    pub flags: u32,
}

pub use crate::nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};

/// What a frontend needs from the volume it exports.
///
/// Offsets and lengths are in bytes. The frontend has already checked that every
/// range lies inside `0..size_bytes()` and that lengths are non-zero; it does not
/// enforce any alignment, so implementations must accept byte-granular ranges.
/// Operations may be issued concurrently, also for overlapping ranges; their order
/// of completion is the implementation's business (NBD clients do not rely on an
/// order between concurrent requests).
pub trait ExportBackend: Send + Sync + 'static {
    /// Size of the exported volume in bytes; constant for the life of an export.
    fn size_bytes(&self) -> u64;
    /// Read `len` bytes at `offset`. The returned buffer must hold exactly `len` bytes.
    fn read(&self, offset: u64, len: u32) -> IoFuture<bytes::Bytes>;
    /// Write `data` at `offset`; with `fua`, complete only once the data is durable.
    fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> IoFuture<()>;
    /// Make `len` bytes at `offset` read as zeroes; with `fua`, durably.
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> IoFuture<()>;
    /// The client no longer needs `len` bytes at `offset` (contents become unspecified).
    fn trim(&self, offset: u64, len: u32) -> IoFuture<()>;
    /// Make every write that has completed so far durable. Global: it covers writes
    /// completed on every connection, which is why the NBD server sets CAN_MULTI_CONN.
    fn flush(&self) -> IoFuture<()>;

    /// Whether [`ExportBackend::write_zeroes`] is much cheaper than writing zeroes
    /// (a hole punched or a zero range allocated, nothing copied): requests with
    /// `NBD_CMD_FLAG_FAST_ZERO` are executed when true, refused at once with
    /// `NBD_ENOTSUP` when false (the spec's contract for fast zeroing).
    fn fast_zeroes(&self) -> bool {
        false
    }

    /// The client will soon read `len` bytes at `offset` (`NBD_CMD_CACHE`): a hint,
    /// e.g. read-ahead. Completing without doing anything is correct.
    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        let _ = (offset, len);
        Box::pin(async { Ok(()) })
    }

    /// Names of the dirty bitmaps clients may select as `qemu:dirty-bitmap:NAME`
    /// (tandem's checkpoints). Read when a client negotiates.
    fn dirty_bitmaps(&self) -> Vec<String> {
        Vec::new()
    }

    /// The status of `[offset, offset + len)` in `context`: consecutive extents
    /// starting at `offset`, at least one and at most `extents_max`. They may end
    /// before `offset + len` (the client asks again from there) but never past the
    /// end of the export. The default knows nothing: everything allocated, contents
    /// unknown (flags 0), which the spec says is always a correct answer for
    /// `base:allocation`; it has no dirty bitmaps.
    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
        extents_max: usize,
    ) -> IoFuture<Vec<Extent>> {
        let _ = (offset, extents_max);
        let result = match context {
            MetaContext::Allocation => Ok(vec![Extent {
                len_bytes: len,
                flags: 0,
            }]),
            MetaContext::DirtyBitmap(name) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("this export has no dirty bitmap named {name:?}"),
            )),
        };
        Box::pin(async move { result })
    }
}
