//! Frontends: how clients reach a volume. Today there is one, the NBD server
//! ([`nbd`]), which the primary uses to export its volume.
//!
//! A frontend sees the volume only through [`ExportBackend`], a byte-addressed,
//! asynchronous block interface. It never sees replication types: the engine
//! implements the trait and decides what a write, a FUA or a flush means for the
//! pair (G1, G2). This module owns the trait and the frontends; it does not own
//! durability, ordering across connections, or the volume's contents.

pub mod nbd;

pub use nbd::{NbdAddress, NbdError, NbdExport, NbdListener, NbdServer};

/// A boxed future returned by [`ExportBackend`] operations. `'static` so that the
/// frontend can run it on its own task while it keeps reading requests.
pub type IoFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<T>> + Send + 'static>>;

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
}
