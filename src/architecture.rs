//! The architecture and guarantees of tandem (G1–G8): the contract that the
//! code, the tests and the README refer to. The text is `src/ARCHITECTURE.md`
//! in the repository, included here so that `cargo doc` renders it as the page
//! of this module and the two can never diverge.
#![doc = include_str!("ARCHITECTURE.md")]
