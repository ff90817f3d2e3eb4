//! The worker actors: one [`TaskWorker`] per queue fetches deliveries, at most `concurrency`
//! at a time and no faster than the queue's rate limit, and runs each on the task runtime (a
//! tokio runtime of its own, never the arbiter that carries the actors). The [`WorkerPool`]
//! owns the workers and that runtime, and shuts them down: warm (stop fetching, let in-flight
//! tasks finish within `drain_timeout`), then cold (fire their tokens, abort them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::broker::Broker;
use super::events::EventSink;
use super::execute::Runner;
use super::rate::TokenBucket;
use super::{QueueSpec, Registry, TaskSettings};

/// How long one fetch waits for a message before the worker asks again.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// The pause after the broker failed a fetch.
const FETCH_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// One task finished (or was aborted): its slot is free.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaskFinished {
    pub job: u64,
}

/// Stop fetching; answers once no task is in flight.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Abort every in-flight task now (a cold shutdown).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Abort;

/// Sends [`TaskFinished`] when dropped: after the task ends, or when it is aborted.
struct FinishGuard {
    worker: Addr<TaskWorker>,
    job: u64,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        self.worker.do_send(TaskFinished { job: self.job });
    }
}

/// The worker of one queue.
pub struct TaskWorker {
    queue: QueueSpec,
    runner: Arc<Runner>,
    runtime: tokio::runtime::Handle,
    in_flight: HashMap<u64, AbortHandle>,
    next_job: u64,
    fetch: Option<SpawnHandle>,
    /// A timer waiting for the rate limit is pending.
    rate_timer: bool,
    rate: Option<TokenBucket>,
    draining: bool,
    idle_waiters: Vec<oneshot::Sender<()>>,
}

impl TaskWorker {
    fn new(queue: QueueSpec, runner: Arc<Runner>, runtime: tokio::runtime::Handle) -> Self {
        let rate = queue.rate_limit_per_sec.map(TokenBucket::new);
        Self {
            queue,
            runner,
            runtime,
            in_flight: HashMap::new(),
            next_job: 0,
            fetch: None,
            rate_timer: false,
            rate,
            draining: false,
            idle_waiters: Vec::new(),
        }
    }

    /// Fetches one more delivery if a slot is free, the rate limit allows, and no fetch is
    /// already waiting.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.draining
            || self.fetch.is_some()
            || self.rate_timer
            || self.in_flight.len() >= self.queue.concurrency.max(1)
        {
            return;
        }
        if let Some(bucket) = &mut self.rate {
            if let Err(wait) = bucket.try_take(Instant::now()) {
                self.rate_timer = true;
                ctx.run_later(wait, |act, ctx| {
                    act.rate_timer = false;
                    act.pump(ctx);
                });
                return;
            }
        }
        let broker = self.runner.broker.clone();
        let queue = self.queue.name.clone();
        let fut = async move { broker.fetch(&queue, FETCH_WAIT).await }
            .into_actor(self)
            .map(|res, act, ctx| {
                act.fetch = None;
                match res {
                    Ok(Some(delivery)) => {
                        if let Some(bucket) = &mut act.rate {
                            bucket.started_at(Instant::now());
                        }
                        act.dispatch(delivery, ctx)
                    }
                    Ok(None) => {
                        if let Some(bucket) = &mut act.rate {
                            bucket.refund();
                        }
                    }
                    Err(e) => {
                        tracing::error!(queue = %act.queue.name, "fetch failed: {e}");
                        if act.draining {
                            return;
                        }
                        act.rate_timer = true;
                        ctx.run_later(FETCH_ERROR_PAUSE, |act, ctx| {
                            act.rate_timer = false;
                            act.pump(ctx);
                        });
                        return;
                    }
                }
                act.pump(ctx);
            });
        self.fetch = Some(ctx.spawn(fut));
    }

    /// Runs a delivery on the task runtime.
    fn dispatch(&mut self, delivery: super::Delivery, ctx: &mut Context<Self>) {
        let job = self.next_job;
        self.next_job += 1;
        let guard = FinishGuard {
            worker: ctx.address(),
            job,
        };
        let runner = self.runner.clone();
        let handle = self.runtime.spawn(async move {
            let _guard = guard;
            runner.process(delivery).await;
        });
        self.in_flight.insert(job, handle.abort_handle());
    }

    fn notify_if_idle(&mut self) {
        if self.in_flight.is_empty() {
            for w in self.idle_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

impl Actor for TaskWorker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(
            queue = %self.queue.name,
            concurrency = self.queue.concurrency,
            rate_limit_per_sec = ?self.queue.rate_limit_per_sec,
            tasks = %self.runner.registry.names().join(", "),
            "task worker started"
        );
        self.pump(ctx);
    }
}

impl Supervised for TaskWorker {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(queue = %self.queue.name, "task worker restarting");
        self.fetch = None;
        self.rate_timer = false;
    }
}

impl Handler<TaskFinished> for TaskWorker {
    type Result = ();

    fn handle(&mut self, msg: TaskFinished, ctx: &mut Context<Self>) {
        self.in_flight.remove(&msg.job);
        self.notify_if_idle();
        self.pump(ctx);
    }
}

impl Handler<Drain> for TaskWorker {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Drain, ctx: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        if let Some(fetch) = self.fetch.take() {
            ctx.cancel_future(fetch);
        }
        let (tx, rx) = oneshot::channel();
        self.idle_waiters.push(tx);
        self.notify_if_idle();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<Abort> for TaskWorker {
    type Result = usize;

    fn handle(&mut self, _msg: Abort, _ctx: &mut Context<Self>) -> usize {
        self.draining = true;
        let n = self.in_flight.len();
        for (_, handle) in self.in_flight.drain() {
            handle.abort();
        }
        self.notify_if_idle();
        n
    }
}

/// How a [`WorkerPool::drain`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every in-flight task finished.
    Finished,
    /// `drain_timeout` passed or the cold token fired; this many tasks were aborted.
    Aborted(usize),
}

/// The task runtime: dropped without blocking (its threads are told to stop; a task that is
/// still running is abandoned at its next await).
struct TaskRuntime(Mutex<Option<tokio::runtime::Runtime>>);

impl Drop for TaskRuntime {
    fn drop(&mut self) {
        let rt = self.0.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(rt) = rt {
            rt.shutdown_background();
        }
    }
}

/// A node's task workers (one per queue it serves) and the runtime their tasks run on.
pub struct WorkerPool {
    workers: Vec<Addr<TaskWorker>>,
    cold: CancellationToken,
    drain_timeout: Duration,
    _runtime: TaskRuntime,
}

impl WorkerPool {
    /// Starts a worker for each queue of `settings` (or only `queues`, when given) on
    /// `arbiter`, with a runtime of `settings.runtime_threads` threads for task bodies.
    pub fn start(
        settings: TaskSettings,
        queues: Option<&[String]>,
        broker: Arc<dyn Broker>,
        registry: Arc<Registry>,
        events: Option<EventSink>,
        arbiter: &ArbiterHandle,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.runtime_threads.max(1))
            .thread_name("switchyard-task")
            .enable_all()
            .build()?;
        let cold = CancellationToken::new();
        let drain_timeout = settings.drain_timeout;
        let specs: Vec<QueueSpec> = settings
            .queues
            .iter()
            .filter(|q| queues.map_or(true, |names| names.contains(&q.name)))
            .cloned()
            .collect();
        let runner = Arc::new(Runner {
            broker,
            registry,
            settings: Arc::new(settings),
            events,
            cold: cold.clone(),
        });
        let workers = specs
            .into_iter()
            .map(|spec| {
                let runner = runner.clone();
                let handle = runtime.handle().clone();
                Supervisor::start_in_arbiter(arbiter, move |_| {
                    TaskWorker::new(spec, runner, handle)
                })
            })
            .collect();
        Ok(Self {
            workers,
            cold,
            drain_timeout,
            _runtime: TaskRuntime(Mutex::new(Some(runtime))),
        })
    }

    /// The token that, once cancelled, turns a warm shutdown cold (the second signal).
    pub fn cold_token(&self) -> CancellationToken {
        self.cold.clone()
    }

    /// Warm shutdown: stop fetching and wait for in-flight tasks, at most `drain_timeout` or
    /// until the cold token fires; then cold: fire every task's token and abort what is left.
    pub async fn drain(&self) -> DrainOutcome {
        let waits = join_all(self.workers.iter().map(|w| w.send(Drain)));
        let finished = tokio::select! {
            _ = waits => true,
            () = tokio::time::sleep(self.drain_timeout) => false,
            () = self.cold.cancelled() => false,
        };
        if finished {
            return DrainOutcome::Finished;
        }
        self.cold.cancel();
        let aborted = join_all(self.workers.iter().map(|w| w.send(Abort)))
            .await
            .into_iter()
            .map(|r| r.unwrap_or(0))
            .sum();
        tracing::warn!(aborted, "cold shutdown: in-flight tasks aborted");
        DrainOutcome::Aborted(aborted)
    }
}
