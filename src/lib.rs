//! tandem: a userspace block-volume replicator (see README.md and ARCHITECTURE).

pub mod frontend;
pub mod types;
pub mod wire;
