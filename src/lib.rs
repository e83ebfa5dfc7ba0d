//! tandem: a userspace block-volume replicator (see README.md and ARCHITECTURE).

pub mod bitmap;
pub mod demo;
pub mod engine;
pub mod types;
pub mod wire;
