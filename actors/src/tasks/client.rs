//! The client side: [`Tasks`] publishes tasks (`delay`, `apply_async`, by name with `send`),
//! reads result records, revokes; [`AsyncResult`] is the handle a publish returns.
//!
//! In eager mode (`tasks.always_eager`) publishing runs the task inline, through the same
//! runner as the workers (decode → admit → claim → run → settle): the message goes to a private
//! in-process queue of its own, the publisher processes its deliveries until the task is
//! settled (retries wait their backoff there), and records go to a bounded in-process result
//! store, so expiry, revocation, retries and limits follow the workers' rules and the record
//! crosses JSON as from a broker. No broker, no I/O, no events. Unlike on workers, an eager
//! publish does not wait for its `countdown`/`eta`.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::broker::{Broker, BrokerError, Outgoing, PublishOutcome, ResultStore, TaskQueue};
use super::canvas::{CanvasKind, CanvasSpec, Signature};
use super::execute::Runner;
use super::{
    is_valid_task_id, new_task_id, Envelope, MemoryBroker, PublishOptions, Registry, ResultRecord,
    Task,
};
use super::{TaskOptions, TaskSettings, TaskState};

/// Eager result records kept for [`Tasks::result`] and [`Tasks::revoke`] (oldest dropped).
const EAGER_KEEP: usize = 10_000;
/// The longest an eager publish waits for the next delivery of its private queue (a retry's
/// countdown); longer waits take further passes.
const EAGER_FETCH_WAIT: Duration = Duration::from_secs(3600);
/// Passes over the private queue beyond `max_retries + 1` (put-backs) before giving up.
const EAGER_EXTRA_PASSES: u32 = 16;
/// First and longest pause between two looks at a result while waiting for it.
const POLL_FIRST: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);

/// Why a client operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The queue is not configured.
    #[error("queue {0:?} is not in tasks.queues")]
    UnknownQueue(String),
    /// The arguments do not serialize to a JSON object.
    #[error("task arguments: {0}")]
    Args(String),
    /// A publish option is out of range (a task id SPEC.md does not allow, an eta beyond
    /// `tasks.max_eta`, a time that does not fit).
    #[error("publish options: {0}")]
    Options(String),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The task was not ready in time.
    #[error("task {id} not ready after {waited:?} (state {state})")]
    Timeout {
        id: String,
        waited: Duration,
        state: TaskState,
    },
    /// The task failed or was revoked; `error` is the record's.
    #[error("task {id} is {state}: {error}")]
    Failed {
        id: String,
        state: TaskState,
        error: String,
    },
    /// The stored result does not decode as the task's output type.
    #[error("task {id}: result does not decode: {message}")]
    Decode { id: String, message: String },
    /// The task keeps no result to wait for (`ignore_result`).
    #[error("task {id} ignores its result")]
    ResultIgnored { id: String },
}

enum Backend {
    Broker(Arc<dyn Broker>),
    /// Eager mode's result store (each publish brings its own queue).
    Eager(Arc<MemoryBroker>),
}

struct Inner {
    backend: Backend,
    registry: Arc<Registry>,
    settings: Arc<TaskSettings>,
}

/// Publishes tasks and reads their results. Cheap to clone; handlers get it as
/// `web::Data<Tasks>`.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("eager", &self.is_eager())
            .field("tasks", &self.inner.registry.names())
            .finish()
    }
}

impl Tasks {
    /// A client publishing to `broker`.
    pub fn new(broker: Arc<dyn Broker>, registry: Arc<Registry>, settings: TaskSettings) -> Self {
        Self::with(Backend::Broker(broker), registry, settings)
    }

    /// A client running every task inline (`tasks.always_eager`).
    pub fn eager(registry: Arc<Registry>, settings: TaskSettings) -> Self {
        let store = Arc::new(MemoryBroker::results_only(&settings, EAGER_KEEP));
        Self::with(Backend::Eager(store), registry, settings)
    }

    fn with(backend: Backend, registry: Arc<Registry>, settings: TaskSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                registry,
                settings: Arc::new(settings),
            }),
        }
    }

    /// Whether tasks run inline.
    pub fn is_eager(&self) -> bool {
        matches!(self.inner.backend, Backend::Eager(_))
    }

    /// The broker (`None` in eager mode).
    pub fn broker(&self) -> Option<&Arc<dyn Broker>> {
        match &self.inner.backend {
            Backend::Broker(b) => Some(b),
            Backend::Eager(_) => None,
        }
    }

    /// Whether `queue` is configured.
    pub fn has_queue(&self, queue: &str) -> bool {
        self.inner.settings.queue(queue).is_some()
    }

    /// The queue of tasks published without one.
    pub fn default_queue(&self) -> &str {
        &self.inner.settings.default_queue
    }

    /// The registered tasks.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Publishes `T` with `args` and default options.
    pub async fn delay<T: Task>(
        &self,
        args: T::Args,
    ) -> Result<AsyncResult<T::Output>, ClientError> {
        self.apply_async::<T>(args, PublishOptions::default()).await
    }

    /// Publishes `T` with `args` and `options`.
    pub async fn apply_async<T: Task>(
        &self,
        args: T::Args,
        options: PublishOptions,
    ) -> Result<AsyncResult<T::Output>, ClientError> {
        let args = serde_json::to_value(&args).map_err(|e| ClientError::Args(e.to_string()))?;
        self.publish(T::NAME, args, &options, &T::options()).await
    }

    /// Publishes the task called `task` (known or not to this node) with JSON `args`.
    pub async fn send(
        &self,
        task: &str,
        args: Value,
        options: PublishOptions,
    ) -> Result<AsyncResult<Value>, ClientError> {
        let task_options = self.options_of(task);
        self.publish(task, args, &options, &task_options).await
    }

    /// The options `task` was registered with (the defaults for a task this node does not
    /// know).
    fn options_of(&self, task: &str) -> TaskOptions {
        let entry = self.inner.registry.get(task);
        entry.map(|e| e.options().clone()).unwrap_or_default()
    }

    /// The message `send` would publish for `task`, checked the same way, without publishing
    /// it: what a transactional outbox stores and publishes later.
    pub fn prepare(
        &self,
        task: &str,
        args: Value,
        options: &PublishOptions,
    ) -> Result<Outgoing, ClientError> {
        let task_options = self.options_of(task);
        Ok(self
            .prepare_with(task, args, options, &task_options, None)?
            .0)
    }

    /// The checked message of `task` and its envelope.
    fn prepare_with(
        &self,
        task: &str,
        args: Value,
        options: &PublishOptions,
        task_options: &TaskOptions,
        canvas: Option<&CanvasSpec>,
    ) -> Result<(Outgoing, Envelope), ClientError> {
        let settings = &self.inner.settings;
        let queue = options
            .queue
            .clone()
            .or_else(|| task_options.queue.clone())
            .unwrap_or_else(|| settings.default_queue.clone());
        if settings.queue(&queue).is_none() {
            return Err(ClientError::UnknownQueue(queue));
        }
        if !args.is_object() {
            return Err(ClientError::Args(format!(
                "expected a JSON object, got {}",
                json_kind(&args)
            )));
        }
        let now = Utc::now();
        let id = options.task_id.clone().unwrap_or_else(new_task_id);
        if !is_valid_task_id(&id) {
            return Err(ClientError::Options(format!(
                "task id {id:?} is not 1-128 characters of [A-Za-z0-9_-]"
            )));
        }
        let later = |what: &str, d: Duration| {
            chrono::TimeDelta::from_std(d)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .ok_or_else(|| ClientError::Options(format!("{what} of {d:?} is out of range")))
        };
        let eta = match (options.eta, options.countdown) {
            (Some(eta), _) => Some(eta),
            (None, Some(c)) => Some(later("countdown", c)?),
            (None, None) => None,
        };
        if let Some(eta) = eta {
            if (eta - now).to_std().is_ok_and(|d| d > settings.max_eta) {
                return Err(ClientError::Options(format!(
                    "eta {eta} is further than tasks.max_eta ({}s) from now",
                    settings.max_eta.as_secs()
                )));
            }
        }
        let expires = match (options.expires, task_options.expires) {
            (Some(at), _) => Some(at),
            (None, Some(d)) => Some(later("expires", d)?),
            (None, None) => None,
        };
        let env = Envelope {
            id: Some(id.clone()),
            task: task.to_owned(),
            args,
            queue: Some(queue.clone()),
            retries: 0,
            max_retries: Some(
                options
                    .max_retries
                    .or(task_options.max_retries)
                    .unwrap_or(settings.default_max_retries),
            ),
            eta,
            expires,
            published_at: Some(now),
            retry_of: None,
            canvas: None,
            tasks: canvas.map(|c| serde_json::json!(c.tasks)),
            callback: canvas.and_then(|c| c.callback.as_ref().map(|cb| serde_json::json!(cb))),
        };
        if canvas.is_some() {
            // The same check a worker makes of a foreign publisher's canvas.
            CanvasSpec::parse(&env).map_err(ClientError::Options)?;
        }
        let payload = serde_json::to_vec(&env).map_err(|e| ClientError::Args(e.to_string()))?;
        // The key travels in a message header: no control characters, a bounded length.
        if let Some(k) = options.unique.as_ref() {
            if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) {
                return Err(ClientError::Options(format!(
                    "unique key {k:?} must be 1-256 characters without control characters"
                )));
            }
        }
        let dedupe_id = options
            .unique
            .as_ref()
            .map_or_else(|| id.clone(), |k| format!("unique:{k}"));
        let msg = Outgoing {
            id,
            queue,
            payload,
            dedupe_id,
            not_before: eta,
        };
        Ok((msg, env))
    }

    async fn publish<T>(
        &self,
        task: &str,
        args: Value,
        options: &PublishOptions,
        task_options: &TaskOptions,
    ) -> Result<AsyncResult<T>, ClientError> {
        self.publish_canvas(task, args, options, task_options, None)
            .await
    }

    /// Publishes a task message, or with `canvas` a canvas message.
    async fn publish_canvas<T>(
        &self,
        task: &str,
        args: Value,
        options: &PublishOptions,
        task_options: &TaskOptions,
        canvas: Option<&CanvasSpec>,
    ) -> Result<AsyncResult<T>, ClientError> {
        let (msg, env) = self.prepare_with(task, args, options, task_options, canvas)?;
        let id = msg.id.clone();
        match &self.inner.backend {
            Backend::Broker(broker) => {
                let outcome = broker.publish(msg).await?;
                let id = match outcome {
                    PublishOutcome::Queued => id,
                    PublishOutcome::Duplicate { original_id } => original_id.unwrap_or(id),
                };
                Ok(AsyncResult::new(
                    id,
                    self.clone(),
                    None,
                    task_options.ignore_result,
                ))
            }
            Backend::Eager(store) => {
                let msg = Outgoing {
                    dedupe_id: id.clone(),
                    not_before: None,
                    ..msg
                };
                let record = self.run_eager(store, msg, &env).await?;
                // The record crosses JSON as it would from a result store.
                let record = serde_json::to_vec(&record)
                    .and_then(|b| serde_json::from_slice::<ResultRecord>(&b))
                    .map_err(|e| ClientError::Decode {
                        id: id.clone(),
                        message: e.to_string(),
                    })?;
                Ok(AsyncResult::new(id, self.clone(), Some(record), false))
            }
        }
    }

    /// Runs a published message inline through the workers' runner: the message goes to a
    /// private in-process queue, and its deliveries (the first, then each retry when its
    /// countdown is due) are processed here until the task is settled. Returns the final
    /// record (kept in the handle even when `ignore_result` kept it out of the store).
    async fn run_eager(
        &self,
        store: &Arc<MemoryBroker>,
        msg: Outgoing,
        env: &Envelope,
    ) -> Result<ResultRecord, ClientError> {
        let settings = &self.inner.settings;
        let id = msg.id.clone();
        let queue_name = msg.queue.clone();
        let queue = Arc::new(MemoryBroker::single_queue(&queue_name, settings));
        let runner = Runner {
            queue: queue.clone(),
            results: store.clone(),
            registry: self.inner.registry.clone(),
            settings: settings.clone(),
            events: None,
            cold: CancellationToken::new(),
            eager: true,
            batches: Default::default(),
        };
        queue.publish(msg).await?;
        let attempts = env
            .max_retries
            .unwrap_or(settings.default_max_retries)
            .saturating_add(1);
        // A canvas: every member's attempts (they keep the default retries) and its callback.
        let members = env
            .tasks
            .as_ref()
            .and_then(Value::as_array)
            .map_or(0, |t| t.len() as u32 + 1);
        let member_attempts = settings.default_max_retries.saturating_add(1);
        let passes = attempts
            .saturating_add(members.saturating_mul(member_attempts))
            .saturating_add(EAGER_EXTRA_PASSES);
        let mut last = None;
        // Each pass settles the task, queues its next attempt (a retry), or puts the message
        // back; bounded by `passes`.
        for _ in 0..passes {
            if queue.depth(&queue_name) == 0 {
                break;
            }
            let Some(delivery) = queue.fetch(&queue_name, EAGER_FETCH_WAIT).await? else {
                continue;
            };
            if let Some(rec) = runner.process(delivery).await {
                if rec.id == id && rec.state.is_ready() {
                    return Ok(rec);
                }
                if rec.id == id {
                    last = Some(rec);
                }
            }
            if members > 0 {
                if let Some(rec) = store.get_result(&id).await? {
                    if rec.state.is_ready() {
                        return Ok(rec);
                    }
                }
            }
        }
        // Not settled by this publish (revoked or finished before it ran): what the store has.
        Ok(store
            .get_result(&id)
            .await?
            .or(last)
            .unwrap_or_else(|| ResultRecord::pending(id)))
    }

    /// The result record of task `id`; PENDING with null fields when unknown or expired.
    /// A canvas's record lists its member ids.
    pub async fn result(&self, id: &str) -> Result<ResultRecord, ClientError> {
        let store: &dyn ResultStore = match &self.inner.backend {
            Backend::Broker(b) => b.as_ref(),
            Backend::Eager(store) => store.as_ref(),
        };
        let mut rec = store
            .get_result(id)
            .await?
            .unwrap_or_else(|| ResultRecord::pending(id));
        if let Some(info) = rec.canvas.as_mut() {
            info.fill(id);
        }
        Ok(rec)
    }

    /// Revokes task `id` if it has not started: it will never run and its record is REVOKED.
    /// Returns whether it was revoked (false: it already started or finished).
    /// A chain, group or chord id revokes the canvas: its record becomes REVOKED and its
    /// members that have not started are revoked (see [`Tasks::chain`]).
    pub async fn revoke(&self, id: &str) -> Result<bool, ClientError> {
        let store: &dyn ResultStore = match &self.inner.backend {
            Backend::Broker(b) => b.as_ref(),
            Backend::Eager(store) => store.as_ref(),
        };
        if store.revoke(id).await? {
            return Ok(true);
        }
        Ok(super::canvas::revoke(store, id).await?)
    }

    /// Publishes a chain: each step runs after the one before it succeeded, with that step's
    /// result bound to its `result_arg` (when it names one); a step that fails for good stops
    /// the chain. The handle's id is the chain's, its record says which step failed, and its
    /// result is the last step's. 1 to [`MAX_MEMBERS`](super::MAX_MEMBERS) steps; no canvas inside a canvas.
    pub async fn chain(
        &self,
        steps: Vec<Signature>,
        options: PublishOptions,
    ) -> Result<AsyncResult<Value>, ClientError> {
        self.canvas(CanvasKind::Chain, steps, None, options).await
    }

    /// Publishes a group: its members run in parallel; its result is their results in order
    /// (a member that fails for good fails the group). 1 to [`MAX_MEMBERS`](super::MAX_MEMBERS) members.
    pub async fn group(
        &self,
        members: Vec<Signature>,
        options: PublishOptions,
    ) -> Result<AsyncResult<Vec<Value>>, ClientError> {
        self.canvas(CanvasKind::Group, members, None, options).await
    }

    /// Publishes a chord: a group, then `callback` (once, after every member succeeded) with
    /// the list of results in order under its `result_arg` (required). The chord's result is
    /// the callback's.
    pub async fn chord(
        &self,
        members: Vec<Signature>,
        callback: Signature,
        options: PublishOptions,
    ) -> Result<AsyncResult<Value>, ClientError> {
        self.canvas(CanvasKind::Chord, members, Some(callback), options)
            .await
    }

    async fn canvas<T>(
        &self,
        kind: CanvasKind,
        tasks: Vec<Signature>,
        callback: Option<Signature>,
        options: PublishOptions,
    ) -> Result<AsyncResult<T>, ClientError> {
        let spec = CanvasSpec {
            kind,
            tasks,
            callback,
        };
        let args = Value::Object(Default::default());
        self.publish_canvas(
            kind.task_name(),
            args,
            &options,
            &TaskOptions::default(),
            Some(&spec),
        )
        .await
    }

    /// Drops every waiting task of `queue`; returns how many (always 0 in eager mode).
    pub async fn purge(&self, queue: &str) -> Result<u64, ClientError> {
        match &self.inner.backend {
            Backend::Broker(b) => Ok(b.purge(queue).await?),
            Backend::Eager(_) => Ok(0),
        }
    }

    /// A handle on an existing task id.
    pub fn handle<T>(&self, id: impl Into<String>) -> AsyncResult<T> {
        AsyncResult::new(id.into(), self.clone(), None, false)
    }

    async fn forget(&self, id: &str) -> Result<(), ClientError> {
        match &self.inner.backend {
            Backend::Broker(b) => Ok(b.forget_result(id).await?),
            Backend::Eager(store) => Ok(store.forget_result(id).await?),
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The handle of a published task (Celery's `AsyncResult`), typed by the task's output.
pub struct AsyncResult<T> {
    id: String,
    tasks: Tasks,
    /// Eager mode: the finished record.
    eager: Option<ResultRecord>,
    ignore_result: bool,
    _output: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("id", &self.id)
            .field("eager", &self.eager)
            .finish()
    }
}

impl<T> AsyncResult<T> {
    fn new(id: String, tasks: Tasks, eager: Option<ResultRecord>, ignore_result: bool) -> Self {
        Self {
            id,
            tasks,
            eager,
            ignore_result,
            _output: PhantomData,
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current result record (eager: the finished one, no I/O).
    pub async fn record(&self) -> Result<ResultRecord, ClientError> {
        match &self.eager {
            Some(rec) => {
                let mut rec = rec.clone();
                if let Some(info) = rec.canvas.as_mut() {
                    info.fill(&self.id);
                }
                Ok(rec)
            }
            None => self.tasks.result(&self.id).await,
        }
    }

    /// The current state.
    pub async fn state(&self) -> Result<TaskState, ClientError> {
        Ok(self.record().await?.state)
    }

    /// Whether the task is done (SUCCESS, FAILURE or REVOKED).
    pub async fn ready(&self) -> Result<bool, ClientError> {
        Ok(self.state().await?.is_ready())
    }

    /// Deletes the result record.
    pub async fn forget(&mut self) -> Result<(), ClientError> {
        self.eager = None;
        self.tasks.forget(&self.id).await
    }
}

impl<T: DeserializeOwned> AsyncResult<T> {
    /// Waits at most `timeout` for the task to finish; its result on SUCCESS, else
    /// [`ClientError::Failed`] (FAILURE, REVOKED) or [`ClientError::Timeout`].
    pub async fn get(&self, timeout: Duration) -> Result<T, ClientError> {
        if self.ignore_result {
            return Err(ClientError::ResultIgnored {
                id: self.id.clone(),
            });
        }
        let started = Instant::now();
        let mut pause = POLL_FIRST;
        loop {
            let rec = self.record().await?;
            if rec.state.is_ready() {
                return self.output(rec);
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(ClientError::Timeout {
                    id: self.id.clone(),
                    waited,
                    state: rec.state,
                });
            }
            tokio::time::sleep(pause.min(timeout - waited)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    fn output(&self, rec: ResultRecord) -> Result<T, ClientError> {
        match rec.state {
            TaskState::Success => {
                serde_json::from_value(rec.result).map_err(|e| ClientError::Decode {
                    id: self.id.clone(),
                    message: e.to_string(),
                })
            }
            state => Err(ClientError::Failed {
                id: self.id.clone(),
                state,
                error: rec.error.unwrap_or_default(),
            }),
        }
    }
}

impl<T: Serialize> AsyncResult<T> {
    /// The handle, untyped.
    pub fn untyped(self) -> AsyncResult<Value> {
        AsyncResult::new(self.id, self.tasks, self.eager, self.ignore_result)
    }
}
