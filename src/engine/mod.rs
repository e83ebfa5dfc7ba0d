//! Replication state machines. No sockets, no files: events in, actions out
//! (ARCHITECTURE §6), so they are tested with synthetic events.

pub mod activity;
pub mod generations;
pub mod handshake;
pub mod primary;
pub mod rangeset;
pub mod recovery;
pub mod secondary;
pub mod sequencer;

#[cfg(test)]
mod sim;
