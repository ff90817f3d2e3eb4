//! The fuzz targets: each takes arbitrary bytes, and panics only on a bug in Switchyard
//! (a panic on hostile input is one). The AFL++ binaries in `fuzz_targets/` run them under
//! coverage guidance; the property tests of the main workspace include the same files
//! (`actors/tests/hostile_input.rs`, `tests/hostile_config.rs`) and run them bounded inside
//! `cargo test`, so each target is one piece of code.

pub mod actors;
#[cfg(feature = "config")]
pub mod config;
