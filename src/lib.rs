//! tandem: a userspace block-volume replicator (see README.md and ARCHITECTURE).

pub mod types;
pub mod volume;
pub mod wire;
