//! The replication wire format: frames (hand-encoded header, bincode body,
//! optional payload) and the messages they carry.

pub mod msg;

pub use msg::*;
