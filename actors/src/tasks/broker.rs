//! The broker traits: [`TaskQueue`] (queues with at-least-once delivery) and [`ResultStore`]
//! (result records, claim and revoke). A [`Broker`] is both, as the memory and NATS brokers
//! are; eager mode runs a private in-process queue over a shared memory result store.
//!
//! The contract, which `tests/tasks_behaviour.rs` checks against every implementation:
//!
//! - [`TaskQueue::publish`] appends a message's bytes to its queue; a `dedupe_id` seen within
//!   `tasks.dedupe_window` is dropped ([`PublishOutcome::Duplicate`]). `not_before` is a hint:
//!   a queue may hold the message until then; the worker also re-checks the eta.
//! - [`TaskQueue::fetch`] hands out one message of a queue at a time to any number of
//!   consumers ([`TaskQueue::fetch_batch`]: up to `max` at once, what a worker with free slots
//!   asks for). A delivery not acknowledged within `tasks.ack_wait` (a crash, a lost worker) is
//!   delivered again, with `delivered` counting every delivery. [`Delivery::nak`] puts it back
//!   after a delay; [`Delivery::progress`] extends the ack deadline of a long task.
//! - Result records live under the task id for `tasks.result_ttl`. [`ResultStore::claim`] and
//!   [`ResultStore::revoke`] are atomic against each other: a task is either revoked before it
//!   starts, or starts and can no longer be revoked.
//!
//! Errors are [`BrokerError`]s; [`BrokerError::is_transient`] says whether trying again later
//! can help (the service did not answer, a compare-and-swap lost) or not (an unknown queue,
//! a request the service refused, stored bytes that do not decode).

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{ResultRecord, TaskState};

/// The cause under a [`BrokerError`] (shared, so the error stays `Clone`).
pub type ErrorSource = Arc<dyn StdError + Send + Sync + 'static>;

/// Why a broker operation failed. [`BrokerError::is_transient`] tells retry from give-up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The service did not answer, the connection is down, or the request timed out: worth
    /// trying again later.
    #[error("broker unavailable: {op}{}", cause(.source))]
    Unavailable {
        /// What was being done, e.g. `publish to sy.tasks.default`.
        op: String,
        #[source]
        source: Option<ErrorSource>,
    },
    /// The service answered and refused the request (a stream or consumer it will not create,
    /// an invalid key): the same request will fail again.
    #[error("broker refused {op}: {source}")]
    Refused {
        op: String,
        #[source]
        source: ErrorSource,
    },
    /// A compare-and-swap on a result record kept losing to concurrent writers.
    #[error("{op} of task {id}: too much contention")]
    Contention { op: &'static str, id: String },
    /// The queue is not one the broker serves.
    #[error("unknown queue {0:?}")]
    UnknownQueue(String),
    /// Stored bytes (a result record) do not decode, or a record does not encode.
    #[error("broker data of {what}: {source}")]
    Data {
        what: String,
        #[source]
        source: Arc<serde_json::Error>,
    },
}

fn cause(source: &Option<ErrorSource>) -> String {
    source
        .as_ref()
        .map_or_else(String::new, |e| format!(": {e}"))
}

impl BrokerError {
    /// The service did not answer `op` because of `source`.
    pub fn unavailable(
        op: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        BrokerError::Unavailable {
            op: op.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// The service did not answer `op` because of a boxed `source` (`async_nats::Error`).
    pub fn unavailable_boxed(
        op: impl Into<String>,
        source: Box<dyn StdError + Send + Sync + 'static>,
    ) -> Self {
        BrokerError::Unavailable {
            op: op.into(),
            source: Some(Arc::from(source)),
        }
    }

    /// The service did not answer `op` (no underlying error to show: a timeout, no
    /// connection).
    pub fn unavailable_because(op: impl Into<String>) -> Self {
        BrokerError::Unavailable {
            op: op.into(),
            source: None,
        }
    }

    /// The service refused `op` because of `source`.
    pub fn refused(op: impl Into<String>, source: impl StdError + Send + Sync + 'static) -> Self {
        BrokerError::Refused {
            op: op.into(),
            source: Arc::new(source),
        }
    }

    /// The bytes of `what` do not decode (or encode).
    pub fn data(what: impl Into<String>, source: serde_json::Error) -> Self {
        BrokerError::Data {
            what: what.into(),
            source: Arc::new(source),
        }
    }

    /// Whether trying the same operation again later can succeed: true for
    /// [`BrokerError::Unavailable`] and [`BrokerError::Contention`], false for the rest.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BrokerError::Unavailable { .. } | BrokerError::Contention { .. }
        )
    }
}

/// The shortest wait that moves a delivery to the schedule store ([`TaskQueue::hold`]);
/// a closer eta waits as a delayed nak.
pub const HOLD_MIN: Duration = Duration::from_secs(2);

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

/// A standing supply of one queue's deliveries for one worker ([`TaskQueue::feed`]): the
/// broker keeps a request for the worker's free slots open, so a task published to an idle
/// worker is handed over as soon as it is stored rather than at the worker's next fetch.
#[async_trait]
pub trait Feed: Send {
    /// The next deliveries, at most `free` (the worker's free slots): waits for the first and
    /// takes whatever else arrived with it. Never more than `free` are asked for ahead, so a
    /// delivery never waits in the worker's hands for a slot. Cancel-safe: dropping the
    /// future while it waits loses no delivery.
    async fn next(&mut self, free: usize) -> Result<Vec<Delivery>, BrokerError>;
}

/// Where tasks wait: queues with at-least-once delivery.
#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
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
    /// A [`Feed`] of `queue` for a worker of `slots` slots, when the broker keeps requests
    /// standing (NATS); `None`: the worker fetches ([`TaskQueue::fetch_batch`], which on the
    /// memory broker wakes at a publish all the same).
    async fn feed(&self, queue: &str, slots: usize) -> Result<Option<Box<dyn Feed>>, BrokerError> {
        let _ = (queue, slots);
        Ok(None)
    }
    /// Moves a delivery whose task is due at `eta` (at least [`HOLD_MIN`] away) out of its
    /// queue into the broker's schedule store, from which it is released to the queue when
    /// due; the caller then acknowledges the delivery. `Ok(false)`: this broker keeps no
    /// schedule store (the delivery waits as a delayed nak, as on the memory broker).
    async fn hold(
        &self,
        delivery: &Delivery,
        id: &str,
        task: &str,
        eta: DateTime<Utc>,
    ) -> Result<bool, BrokerError> {
        let _ = (delivery, id, task, eta);
        Ok(false)
    }
    /// Leases `want` tokens of the cluster-wide limit `key` (a hash of the queue and
    /// `rate_key` value, see `rate::limit_key`), one per `interval_ns`, at `now_ns` (Unix
    /// nanoseconds), none if the first is more than `ahead_ns` away; see `rate::grant`. The
    /// default (a private queue with no other worker) grants them all now.
    async fn rate_lease(
        &self,
        key: &str,
        interval_ns: u64,
        want: u32,
        now_ns: u64,
        ahead_ns: u64,
    ) -> Result<super::rate::Grant, BrokerError> {
        let _ = (key, interval_ns, ahead_ns);
        Ok(super::rate::Grant {
            first_ns: now_ns,
            n: want,
        })
    }
    /// Puts a delivery that waits for rate-limit tokens back for `delay`, in a way that does
    /// not count towards `tasks.max_deliver` when the broker can (the memory broker requeues
    /// it uncounted; NATS holds it in the schedule store, see [`TaskQueue::hold`], unless the
    /// wait is short and the delivery fresh). The default is a delayed nak.
    async fn defer(
        &self,
        delivery: &Delivery,
        id: &str,
        task: &str,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        let _ = (id, task);
        delivery.nak(delay).await
    }
    /// Drops every waiting message of `queue` (its scheduled ones included); returns how many.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;
    /// Keeps a message that failed for good.
    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BrokerError>;

    /// Whether the broker answers.
    async fn ping(&self) -> Result<(), BrokerError>;
}

/// Where result records are kept (`tasks.result_ttl`), with the claim/revoke race decided.
#[async_trait]
pub trait ResultStore: Send + Sync + 'static {
    /// Writes a result record (kept `tasks.result_ttl`).
    async fn put_result(&self, record: &ResultRecord) -> Result<(), BrokerError>;
    /// The record of task `id`, if the store has one.
    async fn get_result(&self, id: &str) -> Result<Option<ResultRecord>, BrokerError>;
    /// Deletes the record of task `id`.
    async fn forget_result(&self, id: &str) -> Result<(), BrokerError>;
    /// Writes `started` (a STARTED record) unless the task is already REVOKED, SUCCESS or
    /// FAILURE (a redelivery of a finished task is not run again).
    async fn claim(&self, started: &ResultRecord) -> Result<Claim, BrokerError>;
    /// Writes `record` of a message that never ran (expired, bad args, unknown task, too many
    /// deliveries): create-only, unless the store's live record of the task is one `replace`
    /// accepts (the task's own retry). A record that does not decode is left alone. Returns
    /// whether it wrote; a foreign message reusing a task's id never overwrites its record.
    async fn put_unrun(
        &self,
        record: &ResultRecord,
        replace: &(dyn for<'r> Fn(&'r ResultRecord) -> bool + Send + Sync),
    ) -> Result<bool, BrokerError>;
    /// Marks task `id` REVOKED ([`ResultRecord::revoked`]) unless it started or finished;
    /// returns whether it did.
    async fn revoke(&self, id: &str) -> Result<bool, BrokerError>;
    /// Compare-and-swap on the record of `id`: `change` gets the live record (none: absent)
    /// and returns the record to write, or none to write nothing; a concurrent write makes it
    /// run again on the new record. What the canvas records of chains, groups and chords are
    /// kept with.
    async fn update_result(
        &self,
        id: &str,
        change: &(dyn for<'r> Fn(Option<&'r ResultRecord>) -> Option<ResultRecord> + Send + Sync),
    ) -> Result<super::canvas::Updated, BrokerError>;
}

/// A queue and a result store in one service (the memory and NATS brokers); what the worker
/// pool and the client take.
pub trait Broker: TaskQueue + ResultStore {}

impl<T: TaskQueue + ResultStore + ?Sized> Broker for T {}

/// Whether task `id`, whose live record (if any) is `existing`, may still be revoked: only a
/// task that has not started (no record, PENDING, or waiting for a retry).
pub(crate) fn revocable(existing: Option<&ResultRecord>) -> bool {
    existing.is_none_or(|r| matches!(r.state, TaskState::Pending | TaskState::Retry))
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn errors_keep_their_source_and_say_whether_to_retry() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        let e = BrokerError::unavailable("publish to sy.tasks.default", io);
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "broker unavailable: publish to sy.tasks.default: broken pipe"
        );
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("broken pipe")
        );

        let e = BrokerError::unavailable_because("ping (not connected to NATS)");
        assert!(e.is_transient());
        assert!(e.source().is_none());
        assert_eq!(
            e.to_string(),
            "broker unavailable: ping (not connected to NATS)"
        );

        let contention = BrokerError::Contention {
            op: "claim",
            id: "t1".into(),
        };
        assert!(contention.is_transient());
        assert_eq!(
            contention.to_string(),
            "claim of task t1: too much contention"
        );

        let bad = serde_json::from_slice::<ResultRecord>(b"{").expect_err("bad json");
        let e = BrokerError::data("result t1", bad);
        assert!(!e.is_transient());
        assert!(e.source().is_some());
        assert!(
            e.to_string().starts_with("broker data of result t1: "),
            "{e}"
        );

        let refused = BrokerError::refused("publish to x", std::io::Error::other("too large"));
        assert!(!refused.is_transient());
        assert!(!BrokerError::UnknownQueue("q".into()).is_transient());
    }
}
