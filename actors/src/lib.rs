//! Switchyard's actors and their messages. This crate knows nothing of HTTP or templates.
//!
//! # Layout
//!
//! - `session`: the session store trait, one file per engine, the sharded session actors.
//! - `context`: context processors and the actors that evaluate them.
//! - `tasks`: the task model, brokers, workers, the scheduler and results.
//! - `messages`: messages that cross actor boundaries.

pub mod context;
pub mod jetstream;
pub mod session;
pub mod tasks;
