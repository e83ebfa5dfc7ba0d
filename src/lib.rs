//! # tandem — a userspace block-volume replicator
//!
//! A **primary** exports a volume (image file or block device) over NBD. Every
//! write gets a sequence number (`seq`) in the order the primary accepted it, is
//! written locally and, in parallel, shipped — crc32-checked, zstd-compressed when
//! that pays, over mutually authenticated TLS 1.3 — to a **secondary**, which
//! applies writes so that overlapping ones land in `seq` order. In sync mode a
//! write completes after both nodes have it; in async mode after the local write,
//! with a bounded window. When the link or the secondary is down, the primary
//! keeps serving and a dirty bitmap records what the secondary lacks; on reconnect
//! only those blocks are resent. A write-intent (activity) log bounds what a crash
//! of the primary can leave in doubt, and that is compared by blake3 hash.
//!
//! ## Layers (dependencies point down)
//!
//! - [`cli`], [`config`], `main.rs`: flags and TOML resource files → [`config::NodeConfig`].
//! - [`agent`]: the I/O shells. One owner task per volume holds the engine; NBD
//!   request tasks, volume I/O, the peer session reader/writer talk to it over
//!   channels. [`agent::control`] is the unix control socket (`tandem status`).
//! - [`frontend`]: the NBD server; it sees only [`frontend::ExportBackend`].
//! - [`engine`]: the sans-IO state machines — [`engine::primary`] (seq, ordering,
//!   shipping, acknowledgements, window, bitmap, resync passes, activity log pins)
//!   and [`engine::secondary`] (ordered apply, batched flushes, acks), plus the
//!   overlap [`engine::sequencer`] both use. Tested with synthetic events and a
//!   seeded simulation of both sides (`engine/sim.rs`).
//! - [`resync`]: block hashing for hash-compare resync; [`bitmap`]: the dirty bitmap.
//! - [`meta`]: the on-disk metadata — two superblock slots, two bitmap copies,
//!   the activity-log ring — documented byte by byte.
//! - [`wire`]: frame header (hand-encoded), bincode message bodies, payloads.
//! - [`transport`]: TLS (rustls via tokio-rustls), certificates, TCP options.
//! - [`volume`]: block I/O — io_uring engine, thread-pool fallback, memory device.
//! - [`metrics`]: counters and latency histograms behind the status document.
//!
//! ## Guarantees ([`architecture`], src/ARCHITECTURE.md; code and tests refer to them by number)
//!
//! - **G1 Sync durability.** In sync mode a write completes only after the local
//!   write and the secondary's write; a FLUSH or FUA write only after both nodes
//!   made it durable.
//! - **G2 Prefix consistency.** Once the secondary has applied everything it
//!   received, its image equals the primary's after some prefix `1..N` of `seq`.
//! - **G3 No silent divergence.** After any crash, link fault or restart the pair
//!   converges without a full copy, and durable metadata covers every block that
//!   may differ; what cannot be proven in sync is resynced.
//! - **G4 Bounded lag, then degrade.** The async window is bounded in bytes and
//!   writes; past it writes keep their order in the spill log; when that is full
//!   (or the peer is gone) writes are tracked in the bitmap, within what the
//!   secondary can stage for the resync that follows.
//! - **G5 Integrity on the wire.** crc32 of header, body and uncompressed payload;
//!   a bad frame is never applied.
//! - **G6 Identity.** Volume UUID, size, block size, names and generations are
//!   checked at the handshake; nothing is written before it is accepted.
//! - **G7 Authenticated peers only.** Mutual TLS 1.3 with the peer name checked;
//!   plaintext only with `--danger-plaintext`, on loopback.
//! - **G8 Roles are explicit.** Only the primary accepts client writes; taking the
//!   primary role starts a new generation.

pub mod agent;
// docs: the architecture and guarantees document (src/ARCHITECTURE.md), rendered by rustdoc.
pub mod architecture;
pub mod bitmap;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod demo;
// dr (issue 10): points, rollback and inspect (client side).
pub mod dr;
pub mod engine;
pub mod frontend;
pub mod meta;
pub mod metrics;
pub mod nbd;
pub mod ops;
// Rate-limited logging for repeatable conditions (hardening).
pub mod ratelog;
pub mod resync;
// docs: sd_notify readiness, status and watchdog for the systemd unit.
pub mod systemd;
pub mod transport;
pub mod types;
pub mod volume;
pub mod wire;
