//! Tasks (the Celery role): typed task definitions, explicit registration, the task message
//! and result record, the [`TaskQueue`] and [`ResultStore`] traits (a [`Broker`] is both) with
//! the in-process [`MemoryBroker`] and the JetStream [`NatsBroker`], the one runner every
//! delivery goes through, the worker actors, and the [`Tasks`] client that publishes tasks (or,
//! in eager mode, runs them inline through the same runner on a private in-process queue).
//!
//! # Layout
//!
//! - `task`: the [`Task`] trait, [`TaskOptions`], [`TaskContext`], [`TaskError`].
//! - `registry`: the [`Registry`] of tasks by name (type-erased entries).
//! - `envelope`, `record`, `events`: the task message, the result record, task events.
//! - `broker`: the [`TaskQueue`] and [`ResultStore`] traits ([`Broker`]: both) and the typed
//!   [`BrokerError`]; `memory`: the memory broker; `nats`: the NATS JetStream broker.
//! - `scheduled`: scheduled tasks on NATS (the `<PREFIX>_SCHEDULED` stream) and the
//!   [`Scheduler`] that releases them when due.
//! - `beat`: periodic tasks ([`Beat`]), its lease and tick ids.
//! - `execute`: the runner: decode → admit → claim → run → settle, for workers and eager mode.
//! - `canvas`: chains, groups and chords ([`Signature`], the canvas record's [`CanvasInfo`]):
//!   the runner expands a canvas message and records each finished member with a
//!   compare-and-swap.
//! - `worker`: the [`TaskWorker`] actors (one per queue) and the [`WorkerPool`] that owns them
//!   and the task runtime.
//! - `client`: [`Tasks`] (publish, results, revoke) and the [`AsyncResult`] handle.

mod beat;
mod broker;
mod canvas;
mod client;
mod envelope;
mod events;
mod execute;
mod feed;
mod memory;
mod nats;
mod progress;
mod rate;
mod record;
mod registry;
mod scheduled;
mod stamp;
mod task;
mod worker;

use std::time::Duration;

pub use beat::{
    tick_id, Beat, BeatEntry, BeatStore, Every, Fired, MemoryBeatStore, Misfire, NatsBeatStore,
};
pub use broker::{
    Acker, Broker, BrokerError, Claim, DeadLetter, Delivery, ErrorSource, Feed, Outgoing,
    PublishOutcome, ResultStore, TaskQueue, HOLD_MIN,
};
pub use canvas::{
    callback_id, member_id, CanvasInfo, CanvasKind, CanvasSpec, FailedStep, Membership, Signature,
    Updated, CHAIN, CHORD, GROUP, MAX_MEMBERS,
};
pub use client::{AsyncResult, ClientError, Tasks};
pub use envelope::{is_valid_task_id, new_task_id, Envelope, PublishOptions};
pub use events::{EventKind, EventSink, TaskEvent, EVENT_ARGS_MAX};
pub use execute::process_delivery;
pub use memory::MemoryBroker;
pub use nats::{NatsBroker, NatsNames, Opening, StoredDeadLetter, PUBLISH_RETRY_FOR};
pub use progress::PROGRESS_EVERY;
pub use record::{ResultRecord, Revocation, TaskState};
pub use registry::{Registry, TaskEntry};
pub use scheduled::{ScheduledTask, Scheduler};
pub use task::{AppData, Backoff, ResultExt, Task, TaskContext, TaskError, TaskOptions};
pub use tokio_util::sync::CancellationToken;
pub use worker::{Drain, DrainOutcome, TaskFinished, TaskWorker, WorkerPool};

/// One queue a node serves.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    /// Tasks of this queue one worker runs at once (>= 1).
    pub concurrency: usize,
    /// Most task starts per second over every worker of the queue in the cluster; `None`:
    /// unlimited.
    pub rate_limit_per_sec: Option<f64>,
    /// An `args` field: the rate limit holds per distinct value of it (`None`: one limit).
    pub rate_key: Option<String>,
}

impl QueueSpec {
    /// A queue without a rate limit.
    pub fn new(name: impl Into<String>, concurrency: usize) -> Self {
        Self {
            name: name.into(),
            concurrency,
            rate_limit_per_sec: None,
            rate_key: None,
        }
    }
}

/// The task system's settings (`[tasks]`, in the units the code uses).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSettings {
    /// This node's id, written to result records and events.
    pub node_id: String,
    /// Queue of tasks published without one.
    pub default_queue: String,
    pub queues: Vec<QueueSpec>,
    /// How long result records are kept.
    pub result_ttl: Duration,
    pub default_max_retries: u32,
    pub backoff: Backoff,
    /// Default soft time limit (`None`: none).
    pub soft_time_limit: Option<Duration>,
    /// Default hard time limit (`None`: none).
    pub time_limit: Option<Duration>,
    /// How long a delivery may go unacknowledged before it is delivered again.
    pub ack_wait: Duration,
    /// Deliveries before a message is dead-lettered.
    pub max_deliver: u32,
    /// The broker's duplicate window.
    pub dedupe_window: Duration,
    /// How long a warm shutdown waits for in-flight tasks.
    pub drain_timeout: Duration,
    /// Threads of the runtime task bodies run on.
    pub runtime_threads: usize,
    /// The furthest eta a task may have (SPEC.md `tasks.max_eta`, 30 days): the client refuses
    /// a further one, the runner dead-letters it (`eta too far`).
    pub max_eta: Duration,
    /// How long the dead-letter stream keeps a letter (`tasks.dead_max_age`); zero: no limit.
    pub dead_max_age: Duration,
    /// Bytes the dead-letter stream keeps (`tasks.dead_max_bytes`); zero: no limit.
    pub dead_max_bytes: u64,
    /// Replicas of the streams and bucket the NATS broker creates (`nats.replicas`).
    pub replicas: usize,
}

impl Default for TaskSettings {
    /// SPEC.md's `[tasks]` defaults.
    fn default() -> Self {
        Self {
            node_id: "local".into(),
            default_queue: "default".into(),
            queues: vec![QueueSpec::new("default", 8)],
            result_ttl: Duration::from_secs(86_400),
            default_max_retries: 3,
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(600),
            },
            soft_time_limit: None,
            time_limit: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            dedupe_window: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(30),
            runtime_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_eta: Duration::from_secs(2_592_000),
            dead_max_age: Duration::from_secs(1_209_600),
            dead_max_bytes: 1_073_741_824,
            replicas: 1,
        }
    }
}

impl TaskSettings {
    /// The queue called `name`.
    pub fn queue(&self, name: &str) -> Option<&QueueSpec> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The limits and retry policy of one task: its options over these defaults, with a
    /// message's own `max_retries` over both.
    pub(crate) fn plan(&self, options: &TaskOptions, max_retries: Option<u32>) -> execute::Plan {
        execute::Plan {
            max_retries: max_retries
                .or(options.max_retries)
                .unwrap_or(self.default_max_retries),
            backoff: options.backoff.unwrap_or(self.backoff),
            soft_time_limit: options.soft_time_limit.or(self.soft_time_limit),
            time_limit: options.time_limit.or(self.time_limit),
            retry_on_time_limit: options.retry_on_time_limit,
            ignore_result: options.ignore_result,
        }
    }
}
