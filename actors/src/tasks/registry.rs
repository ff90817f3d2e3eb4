//! The task registry: explicit registration, and the type-erased entries workers call by name.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::Value;

use super::rate::RateLimiter;
use super::task::AppData;
use super::{Task, TaskContext, TaskError, TaskOptions};

/// A boxed task body returning its result as JSON.
pub(crate) type TaskFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

/// A task behind its name: JSON arguments in, JSON result out.
trait ErasedTask: Send + Sync {
    fn call(self: Arc<Self>, ctx: TaskContext, args: Value) -> TaskFuture;
}

struct Typed<T>(T);

impl<T: Task> ErasedTask for Typed<T> {
    fn call(self: Arc<Self>, ctx: TaskContext, args: Value) -> TaskFuture {
        Box::pin(async move {
            let args: T::Args = serde_json::from_value(args).map_err(TaskError::bad_args)?;
            let out = self.0.run(ctx, args).await?;
            serde_json::to_value(out).map_err(|e| TaskError::fail("bad_result", e))
        })
    }
}

/// A task that is an async function of its context and arguments.
struct FnTask<F, A, O> {
    f: F,
    types: std::marker::PhantomData<fn(A) -> O>,
}

impl<F, A, O, Fut> ErasedTask for FnTask<F, A, O>
where
    F: Fn(TaskContext, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    A: serde::de::DeserializeOwned + Send + 'static,
    O: serde::Serialize + 'static,
{
    fn call(self: Arc<Self>, ctx: TaskContext, args: Value) -> TaskFuture {
        Box::pin(async move {
            let args: A = serde_json::from_value(args).map_err(TaskError::bad_args)?;
            let out = (self.f)(ctx, args).await?;
            serde_json::to_value(out).map_err(|e| TaskError::fail("bad_result", e))
        })
    }
}

/// One registered task.
pub struct TaskEntry {
    name: &'static str,
    options: TaskOptions,
    task: Arc<dyn ErasedTask>,
    limiter: Option<RateLimiter>,
    data: Arc<AppData>,
}

impl std::fmt::Debug for TaskEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskEntry")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl TaskEntry {
    /// The registered name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The task's own options.
    pub fn options(&self) -> &TaskOptions {
        &self.options
    }

    /// Waits for the task's own rate limit, if it has one.
    pub(crate) async fn rate_limit(&self) {
        if let Some(l) = &self.limiter {
            l.acquire().await;
        }
    }

    /// Runs the body once; a panic in it becomes a `panic` failure instead of unwinding into
    /// the worker.
    pub(crate) fn call(&self, mut ctx: TaskContext, args: Value) -> TaskFuture {
        ctx.data = self.data.clone();
        let body = self.task.clone().call(ctx, args);
        Box::pin(async move {
            match AssertUnwindSafe(body).catch_unwind().await {
                Ok(r) => r,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "the task body panicked".into());
                    Err(TaskError::fail("panic", what))
                }
            }
        })
    }
}

/// The tasks a node knows, by name. Registration is explicit: a worker runs only tasks
/// registered here, and fails others with `unknown_task`.
#[derive(Default, Debug)]
pub struct Registry {
    tasks: BTreeMap<&'static str, Arc<TaskEntry>>,
    data: Arc<AppData>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `task` under [`Task::NAME`]; a task registered twice keeps the last one.
    pub fn register<T: Task>(&mut self, task: T) -> &mut Self {
        self.insert(T::NAME, T::options(), Arc::new(Typed(task)))
    }

    /// Registers the async function `f` as the task `name` with `options`: its arguments are
    /// the message's `args` object decoded as `A`, its result is `O` as JSON.
    pub fn register_fn<F, A, O, Fut>(
        &mut self,
        name: &'static str,
        options: TaskOptions,
        f: F,
    ) -> &mut Self
    where
        F: Fn(TaskContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
        A: serde::de::DeserializeOwned + Send + 'static,
        O: serde::Serialize + 'static,
    {
        let task = FnTask {
            f,
            types: std::marker::PhantomData,
        };
        self.insert(name, options, Arc::new(task))
    }

    fn insert(
        &mut self,
        name: &'static str,
        options: TaskOptions,
        task: Arc<dyn ErasedTask>,
    ) -> &mut Self {
        let limiter = options
            .rate_limit_per_sec
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(RateLimiter::new);
        let entry = TaskEntry {
            name,
            options,
            task,
            limiter,
            data: self.data.clone(),
        };
        if self.tasks.insert(name, Arc::new(entry)).is_some() {
            tracing::warn!(task = name, "task registered twice; the last one wins");
        }
        self
    }

    /// Shares `value` with every task of this registry as `ctx.data::<T>()`.
    pub fn insert_data<T: ?Sized + Send + Sync + 'static>(&mut self, value: Arc<T>) -> &mut Self {
        self.data.insert(value);
        self
    }

    /// The entry registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<TaskEntry>> {
        self.tasks.get(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.keys().copied().collect()
    }

    /// How many tasks are registered.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is registered.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}
