//! Defining tasks: the [`Task`] trait, its [`TaskOptions`], the body's [`TaskContext`], and the
//! [`TaskError`] that says whether a failure is retried.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// A task: a name, typed arguments and result (both go through JSON), options, and a body.
///
/// ```
/// use switchyard_actors::tasks::{Task, TaskContext, TaskError, TaskOptions};
///
/// struct Add;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct AddArgs { x: i64, y: i64 }
///
/// impl Task for Add {
///     const NAME: &'static str = "demo.add";
///     type Args = AddArgs;
///     type Output = i64;
///
///     fn options() -> TaskOptions {
///         TaskOptions::new().max_retries(0)
///     }
///
///     async fn run(&self, _ctx: TaskContext, args: AddArgs) -> Result<i64, TaskError> {
///         args.x.checked_add(args.y).ok_or_else(|| TaskError::fail("overflow", "x + y overflows"))
///     }
/// }
/// ```
pub trait Task: Send + Sync + 'static {
    /// The registered name, e.g. `shop.order_created`.
    const NAME: &'static str;
    /// The arguments; they travel as a JSON object.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The result, stored as JSON in the result record.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// The task's options; unset fields fall back to `[tasks]`.
    fn options() -> TaskOptions {
        TaskOptions::default()
    }

    /// The body. It runs on the task runtime, never on an actor's arbiter; it should poll
    /// [`TaskContext::is_cancelled`] (or await [`TaskContext::cancelled`]) when it can run long.
    fn run(
        &self,
        ctx: TaskContext,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;
}

/// Retry backoff: retry `n` (0 for the first) waits a random time in `[d/2, d]`,
/// `d = min(base · 2^n, max)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The ceiling `d` of retry `n`'s wait.
    pub fn ceiling(&self, n: u32) -> Duration {
        let factor = 2f64.powi(n.min(64) as i32);
        let d = self.base.as_secs_f64() * factor;
        if d >= self.max.as_secs_f64() {
            return self.max;
        }
        Duration::try_from_secs_f64(d.max(0.0)).unwrap_or(self.max)
    }

    /// The window `[d/2, d]` of retry `n`'s wait.
    pub fn window(&self, n: u32) -> (Duration, Duration) {
        let d = self.ceiling(n);
        (d / 2, d)
    }

    /// A random wait for retry `n`, within [`Backoff::window`].
    pub fn delay(&self, n: u32) -> Duration {
        let (lo, hi) = self.window(n);
        if hi <= lo {
            return hi;
        }
        let secs = rand::thread_rng().gen_range(lo.as_secs_f64()..=hi.as_secs_f64());
        Duration::try_from_secs_f64(secs)
            .unwrap_or(hi)
            .clamp(lo, hi)
    }
}

/// A task's options. Unset fields take the `[tasks]` defaults; publishing can override the
/// queue, retries and expiry per call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskOptions {
    /// Queue the task is published to (default: `tasks.default_queue`).
    pub queue: Option<String>,
    /// Retries after the first attempt (default: `tasks.default_max_retries`).
    pub max_retries: Option<u32>,
    /// Retry backoff (default: `tasks.retry_backoff_base` / `retry_backoff_max`).
    pub backoff: Option<Backoff>,
    /// After this long the context's cancellation token fires (default:
    /// `tasks.soft_time_limit`).
    pub soft_time_limit: Option<Duration>,
    /// After this long the body is dropped at its next await and the attempt fails (default:
    /// `tasks.time_limit`).
    pub time_limit: Option<Duration>,
    /// Whether an attempt that hit the hard time limit is retried (default: no, it fails).
    pub retry_on_time_limit: bool,
    /// Most starts of this task per second on one node (default: none).
    pub rate_limit_per_sec: Option<f64>,
    /// Default expiry, counted from publishing: a task not started by then is REVOKED with
    /// error `"expired"` (default: none).
    pub expires: Option<Duration>,
    /// Store no result records for this task (its handle cannot be waited on).
    pub ignore_result: bool,
}

impl TaskOptions {
    /// Every option unset.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    /// Sets the retries after the first attempt.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = Some(n);
        self
    }
    /// Sets the retry backoff.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff = Some(Backoff { base, max });
        self
    }
    /// Sets the soft time limit.
    pub fn soft_time_limit(mut self, limit: Duration) -> Self {
        self.soft_time_limit = Some(limit);
        self
    }
    /// Sets the hard time limit.
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = Some(limit);
        self
    }
    /// Retries attempts that hit the hard time limit.
    pub fn retry_on_time_limit(mut self) -> Self {
        self.retry_on_time_limit = true;
        self
    }
    /// Sets the rate limit, in starts per second on one node.
    pub fn rate_limit_per_sec(mut self, rate: f64) -> Self {
        self.rate_limit_per_sec = Some(rate);
        self
    }
    /// Sets the default expiry, counted from publishing.
    pub fn expires(mut self, after: Duration) -> Self {
        self.expires = Some(after);
        self
    }
    /// Stores no result records.
    pub fn ignore_result(mut self) -> Self {
        self.ignore_result = true;
        self
    }
}

/// Why a task body failed, and whether it is retried: [`TaskError::Retry`] is retried with
/// backoff (or after its own countdown) while retries remain, [`TaskError::Fail`] fails the
/// task at once. The result record's `error` is `"<kind>: <message>"`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TaskError {
    /// A transient failure: retry.
    #[error("{kind}: {message}")]
    Retry {
        kind: String,
        message: String,
        /// Wait this long instead of the backoff.
        countdown: Option<Duration>,
    },
    /// A permanent failure: do not retry.
    #[error("{kind}: {message}")]
    Fail { kind: String, message: String },
}

impl TaskError {
    /// A failure retried with backoff.
    pub fn retry(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        TaskError::Retry {
            kind: kind.into(),
            message: message.to_string(),
            countdown: None,
        }
    }

    /// A failure retried after `countdown` instead of the backoff.
    pub fn retry_in(
        countdown: Duration,
        kind: impl Into<String>,
        message: impl fmt::Display,
    ) -> Self {
        TaskError::Retry {
            kind: kind.into(),
            message: message.to_string(),
            countdown: Some(countdown),
        }
    }

    /// A failure that is not retried.
    pub fn fail(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        TaskError::Fail {
            kind: kind.into(),
            message: message.to_string(),
        }
    }

    /// The error's kind, e.g. `bad_args`.
    pub fn kind(&self) -> &str {
        match self {
            TaskError::Retry { kind, .. } | TaskError::Fail { kind, .. } => kind,
        }
    }

    /// Whether the error asks for a retry.
    pub fn is_retry(&self) -> bool {
        matches!(self, TaskError::Retry { .. })
    }

    /// Arguments that do not fit the task's `Args` (never retried).
    pub(crate) fn bad_args(message: impl fmt::Display) -> Self {
        Self::fail("bad_args", message)
    }
}

/// `?`-friendly conversions of any error into a [`TaskError`].
pub trait ResultExt<T> {
    /// A failure here is transient: retry with backoff.
    fn or_retry(self, kind: &str) -> Result<T, TaskError>;
    /// A failure here is permanent: fail the task.
    fn or_fail(self, kind: &str) -> Result<T, TaskError>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn or_retry(self, kind: &str) -> Result<T, TaskError> {
        self.map_err(|e| TaskError::retry(kind, e))
    }
    fn or_fail(self, kind: &str) -> Result<T, TaskError> {
        self.map_err(|e| TaskError::fail(kind, e))
    }
}

/// Values an application shares with its tasks, by type (`Arc<T>` for any `T`, unsized too).
#[derive(Default)]
pub struct AppData {
    values: std::sync::RwLock<
        std::collections::HashMap<std::any::TypeId, Box<dyn std::any::Any + Send + Sync>>,
    >,
}

impl AppData {
    /// Shares `value` under its type `T` (a second value of one type replaces the first).
    pub fn insert<T: ?Sized + Send + Sync + 'static>(&self, value: Arc<T>) {
        self.values
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(std::any::TypeId::of::<T>(), Box::new(value));
    }

    /// The value shared under `T`, if any.
    pub fn get<T: ?Sized + Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.values
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&std::any::TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<Arc<T>>())
            .cloned()
    }
}

impl std::fmt::Debug for AppData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppData").finish_non_exhaustive()
    }
}

/// What a running task knows about itself (Celery's `bind=True`): its id, which attempt this
/// is, its eta, and a cancellation token that fires at the soft time limit or at a cold
/// shutdown.
#[derive(Clone, Debug)]
pub struct TaskContext {
    pub(crate) id: String,
    pub(crate) task: String,
    pub(crate) queue: String,
    pub(crate) retries: u32,
    pub(crate) max_retries: u32,
    pub(crate) eta: Option<DateTime<Utc>>,
    pub(crate) eager: bool,
    pub(crate) cancel: CancellationToken,
    /// The application's shared values (`App::data`), set by the registry entry that runs.
    pub(crate) data: Arc<AppData>,
    /// Where [`TaskContext::progress`] reports to (none: reports are dropped).
    pub(crate) progress: Option<Arc<super::progress::ProgressReporter>>,
}

impl TaskContext {
    /// The task id (a lowercase hyphenated UUID for tasks Switchyard published).
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The task's registered name.
    pub fn task(&self) -> &str {
        &self.task
    }
    /// The queue it was delivered from.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// Retries so far (0 on the first attempt).
    pub fn retries(&self) -> u32 {
        self.retries
    }
    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.retries.saturating_add(1)
    }
    /// Retries allowed after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }
    /// When the task was scheduled to run, if it was.
    pub fn eta(&self) -> Option<DateTime<Utc>> {
        self.eta
    }
    /// Whether it runs eagerly (inline in the publisher).
    pub fn is_eager(&self) -> bool {
        self.eager
    }
    /// Whether the soft time limit passed or the worker is shutting down cold.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
    /// Resolves when [`TaskContext::is_cancelled`] becomes true.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
    /// The cancellation token itself (to hand to other futures).
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
    /// The application's shared value of type `T` (registered with `App::data`, as actix's
    /// `web::Data<T>` for handlers). A task asking for a type nobody registered fails with
    /// `missing_data` (a programming error, not retried).
    pub fn data<T: ?Sized + Send + Sync + 'static>(&self) -> Result<Arc<T>, TaskError> {
        self.data.get::<T>().ok_or_else(|| {
            TaskError::fail(
                "missing_data",
                format!("no {} registered (App::data)", std::any::type_name::<T>()),
            )
        })
    }
    /// Reports progress: `done` of `total` steps and any `info` (a JSON value). The task's
    /// record gains `"progress": {"done","total","info"}` and a `task-progress` event is
    /// emitted; reports closer together than [`super::PROGRESS_EVERY`] are only kept for the
    /// final record (except the last step, `done >= total`), so a tight loop may call it on
    /// every step.
    pub async fn progress(&self, done: u64, total: u64, info: serde_json::Value) {
        if let Some(p) = &self.progress {
            p.report(done, total, info).await;
        }
    }
    /// An explicit retry after `countdown` (Celery's `self.retry(countdown=...)`); return it
    /// as the body's error. It counts against `max_retries` like any retry.
    pub fn retry(&self, countdown: Duration) -> TaskError {
        TaskError::retry_in(countdown, "retry", "retry requested by the task")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_windows_follow_the_formula() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(600),
        };
        assert_eq!(
            b.window(0),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
        assert_eq!(
            b.window(3),
            (Duration::from_secs(4), Duration::from_secs(8))
        );
        assert_eq!(b.ceiling(20), Duration::from_secs(600));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(600));
        for n in 0..12 {
            let (lo, hi) = b.window(n);
            for _ in 0..50 {
                let d = b.delay(n);
                assert!(
                    d >= lo && d <= hi,
                    "retry {n}: {d:?} not in [{lo:?}, {hi:?}]"
                );
            }
        }
    }

    #[test]
    fn errors_say_kind_and_message() {
        let e = TaskError::retry("io", "disk full");
        assert_eq!(e.to_string(), "io: disk full");
        assert!(e.is_retry());
        let e: Result<(), _> = Err::<(), _>("nope").or_fail("bad");
        assert_eq!(e, Err(TaskError::fail("bad", "nope")));
    }
}
