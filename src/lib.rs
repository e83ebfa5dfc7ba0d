//! tandem: a userspace block-volume replicator (see README.md and ARCHITECTURE).

pub mod agent;
pub mod bitmap;
pub mod cli;
pub mod config;
pub mod demo;
pub mod engine;
pub mod frontend;
pub mod meta;
pub mod metrics;
pub mod resync;
pub mod transport;
pub mod types;
pub mod volume;
pub mod wire;
