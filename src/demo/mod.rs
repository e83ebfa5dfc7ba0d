//! `tandem demo`: drives a workload through an NBD export over the real protocol.

pub mod nbd_client;
mod run;

pub use run::{hash_file, run};
