//! The [`Broker`] trait: queues with at-least-once delivery, and the result store, as the
//! memory broker provides them now and the NATS JetStream broker will.
//!
//! The contract, which `tests/tasks_behaviour.rs` checks against every implementation:
//!
//! - [`Broker::publish`] appends a message's bytes to its queue; a `dedupe_id` seen within
//!   `tasks.dedupe_window` is dropped ([`PublishOutcome::Duplicate`]). `not_before` is a hint:
//!   a broker may hold the message until then; the worker also re-checks the eta.
//! - [`Broker::fetch`] hands out one message of a queue at a time to any number of consumers
//!   ([`Broker::fetch_batch`]: up to `max` at once, what a worker with free slots asks for).
//!   A delivery not acknowledged within `tasks.ack_wait` (a crash, a lost worker) is delivered
//!   again, with `delivered` counting every delivery. [`Delivery::nak`] puts it back after a
//!   delay; [`Delivery::progress`] extends the ack deadline of a long task.
//! - Result records live under the task id for `tasks.result_ttl`. [`Broker::claim`] and
//!   [`Broker::revoke`] are atomic against each other: a task is either revoked before it
//!   starts, or starts and can no longer be revoked.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{ResultRecord, TaskState};

/// Why a broker operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker's service is unreachable or refused the operation.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The queue is not one the broker serves.
    #[error("unknown queue {0:?}")]
    UnknownQueue(String),
    /// A stored value could not be decoded.
    #[error("broker data: {0}")]
    Data(String),
}

/// A message to publish.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The task id (for duplicate reports).
    pub id: String,
    pub queue: String,
    /// The task message's JSON bytes.
    pub payload: Vec<u8>,
    /// Deduplication id (`Nats-Msg-Id`): the task id, `unique:<key>`, or `<id>:retry:<n>`.
    pub dedupe_id: String,
    /// Not to be delivered before this time (a hint; see the module docs).
    pub not_before: Option<DateTime<Utc>>,
}

/// What publishing did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Appended to the queue.
    Queued,
    /// Dropped as a duplicate of an earlier message (whose task id, when the broker knows it).
    Duplicate { original_id: Option<String> },
}

/// Acknowledges one delivery; each broker has its own.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done: never deliver it again.
    async fn ack(&self) -> Result<(), BrokerError>;
    /// Not now: deliver it again after `delay`.
    async fn nak(&self, delay: Duration) -> Result<(), BrokerError>;
    /// Still working: restart the ack deadline.
    async fn progress(&self) -> Result<(), BrokerError>;
}

/// One delivery of a message.
pub struct Delivery {
    /// The message's bytes, as published.
    pub payload: Vec<u8>,
    /// The queue it came from (the subject decides, not the message).
    pub queue: String,
    /// The stream sequence (stable across redeliveries).
    pub seq: u64,
    /// Deliveries of this message so far, this one included (from 1).
    pub delivered: u32,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("seq", &self.seq)
            .field("delivered", &self.delivered)
            .field("bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery acknowledged through `acker`.
    pub fn new(
        payload: Vec<u8>,
        queue: String,
        seq: u64,
        delivered: u32,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            payload,
            queue,
            seq,
            delivered,
            acker,
        }
    }
    /// See [`Acker::ack`].
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }
    /// See [`Acker::nak`].
    pub async fn nak(&self, delay: Duration) -> Result<(), BrokerError> {
        self.acker.nak(delay).await
    }
    /// See [`Acker::progress`].
    pub async fn progress(&self) -> Result<(), BrokerError> {
        self.acker.progress().await
    }
}

/// A message that failed for good, with the original bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// The task id, when the message had a readable one.
    pub id: Option<String>,
    pub task: Option<String>,
    pub queue: String,
    pub payload: Vec<u8>,
    pub reason: String,
    pub dead_at: DateTime<Utc>,
}

/// What [`Broker::claim`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The STARTED record is written: run the attempt.
    Claimed,
    /// The task is already in this final state: do not run it.
    Refused(TaskState),
}

/// Where tasks wait and results are kept.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The broker's name (`memory`, `nats`).
    fn kind(&self) -> &'static str;
    /// The stream name that, with a sequence, makes [`super::Envelope::fallback_id`].
    fn stream(&self) -> &str;

    /// Appends a message to its queue.
    async fn publish(&self, msg: Outgoing) -> Result<PublishOutcome, BrokerError>;
    /// The next message of `queue`, waiting at most `wait`; `None` when none came.
    async fn fetch(&self, queue: &str, wait: Duration) -> Result<Option<Delivery>, BrokerError>;
    /// Up to `max` messages of `queue`: what is ready now, or the first to come within `wait`
    /// (empty when none came). The default fetches one.
    async fn fetch_batch(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let _ = max;
        Ok(self.fetch(queue, wait).await?.into_iter().collect())
    }
    /// Drops every waiting message of `queue`; returns how many.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;
    /// Keeps a message that failed for good.
    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BrokerError>;

    /// Writes a result record (kept `tasks.result_ttl`).
    async fn put_result(&self, record: &ResultRecord) -> Result<(), BrokerError>;
    /// The record of task `id`, if the store has one.
    async fn get_result(&self, id: &str) -> Result<Option<ResultRecord>, BrokerError>;
    /// Deletes the record of task `id`.
    async fn forget_result(&self, id: &str) -> Result<(), BrokerError>;
    /// Writes `started` (a STARTED record) unless the task is already REVOKED, SUCCESS or
    /// FAILURE (a redelivery of a finished task is not run again).
    async fn claim(&self, started: &ResultRecord) -> Result<Claim, BrokerError>;
    /// Marks task `id` REVOKED unless it started or finished; returns whether it did.
    async fn revoke(&self, id: &str) -> Result<bool, BrokerError>;

    /// Whether the broker answers.
    async fn ping(&self) -> Result<(), BrokerError>;
}
