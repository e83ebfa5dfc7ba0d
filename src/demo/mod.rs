//! `tandem demo`: drives a workload through an NBD export over the real protocol.

mod run;

pub use run::{hash_file, run};
