//! The replication wire format: frames (hand-encoded header, bincode body,
//! optional payload) and the messages they carry.

pub mod frame;
pub mod msg;

pub use frame::*;
pub use msg::*;
