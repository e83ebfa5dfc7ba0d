//! tandem: a userspace block-volume replicator (see README.md and ARCHITECTURE).

pub mod bitmap;
pub mod engine;
pub mod frontend;
pub mod meta;
pub mod types;
pub mod volume;
pub mod wire;
