//! The NBD protocol, once for both sides.
//!
//! - [`proto`]: constants and pure encoders/decoders of every message (the
//!   fuzzable surface: `decode_*` functions over byte slices).
//! - [`negotiate`]: option haggling as sans-IO state machines, server
//!   ([`negotiate::ServerNegotiation`]) and client ([`negotiate::ClientNegotiation`]).
//! - [`server`]: the async server that exports a [`crate::frontend::ExportBackend`]
//!   (structured replies, extended headers, block status, STARTTLS, bounded memory).
//! - [`client`]: tandem's own async client (the demo, tests, tools).
//! - [`extents`]: allocation (SEEK_DATA/SEEK_HOLE) of image files for
//!   `base:allocation`, and read-ahead for `NBD_CMD_CACHE`.
//! - [`readonly`]: the read-only export of a secondary's volume.
//! - [`tls`]: the export's TLS configuration from the node's certificates.
//!
//! What the server does not own: replication (the backend), checkpoints
//! ([`crate::checkpoint`] marks them and answers `qemu:dirty-bitmap:NAME`).

pub mod client;
pub mod extents;
pub mod negotiate;
pub mod proto;
mod quiet;
pub mod readonly;
pub mod server;
mod stream;
pub mod tls;
pub mod tracked;

pub use server::{
    NbdAddress, NbdError, NbdExport, NbdListener, NbdServer, NbdStats, ServerOptions,
};
