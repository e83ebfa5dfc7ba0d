//! tandem: a userspace block-volume replicator (see README.md and ARCHITECTURE).

pub mod transport;
pub mod types;
pub mod wire;
