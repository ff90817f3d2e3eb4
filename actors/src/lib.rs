//! Switchyard's actors and their messages. This crate knows nothing of HTTP or templates.
//!
//! # Layout
//!
//! - `session`: the session store trait, one file per engine, the sharded session actors.
//! - `context`: context processors, flash messages, and the actors that evaluate processors.
//! - `tasks`: the task model and registry, brokers (memory, NATS), workers, the client.
//! - `jetstream`: the JetStream helpers the NATS engine and broker share.
//! - `cluster`: node heartbeats and the cluster view `cluster status` prints.

pub mod cluster;
pub mod context;
pub mod jetstream;
pub mod session;
pub mod tasks;
