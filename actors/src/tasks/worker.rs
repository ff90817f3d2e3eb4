//! The worker actors: one [`TaskWorker`] per queue takes deliveries, at most `concurrency` at
//! a time and no faster than the queue's rate limit, and runs each on the task runtime (a
//! tokio runtime of its own, never the arbiter that carries the actors). Without a rate limit
//! the actor runs a feed loop on that runtime: the broker's [`Feed`] keeps a request for
//! exactly the free slots standing (docs/architecture.md, "The delivery model"); under one it
//! fetches only what its tokens cover. The [`WorkerPool`]
//! owns the workers and that runtime, and shuts them down: warm (stop fetching, let in-flight
//! tasks finish within `drain_timeout`), then cold (fire their tokens, abort them).
//!
//! In-flight tasks are tracked by the pool's [`Jobs`] table, not only by the actors: on a
//! signal actix-server stops the whole actix system, arbiters included, and the tasks (which
//! run on the task runtime, not on an arbiter) must still be drained after their worker actor
//! is gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::broker::{Broker, Feed};
use super::events::EventSink;
use super::execute::Runner;
use super::rate::{
    limit_key, log_lease_error, unix_ns, ClusterLimiter, Limit, Local, LEASE_ERROR_PAUSE,
};
use super::{Envelope, QueueSpec, Registry, TaskQueue, TaskSettings};

/// How long one fetch waits for a message before the worker asks again.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// The pause after the broker failed a fetch.
const FETCH_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// At a cold shutdown, how long tasks get between their token firing and the abort.
const COLD_GRACE: Duration = Duration::from_millis(200);
/// How long a stop-fetching request may take to reach a worker.
const DRAIN_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Every in-flight task of a pool, with its abort handle.
#[derive(Default)]
struct Jobs {
    running: Mutex<HashMap<u64, AbortHandle>>,
    idle: Notify,
    next: AtomicU64,
}

impl Jobs {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn insert(&self, job: u64, handle: AbortHandle) {
        self.lock().insert(job, handle);
    }

    fn remove(&self, job: u64) {
        let mut running = self.lock();
        running.remove(&job);
        if running.is_empty() {
            self.idle.notify_waiters();
        }
    }

    /// Resolves once no task is in flight.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }

    fn abort_all(&self) -> usize {
        let running = std::mem::take(&mut *self.lock());
        for handle in running.values() {
            handle.abort();
        }
        running.len()
    }
}

/// A task of a worker that had every slot taken finished (or was aborted): fetch again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaskFinished {
    pub job: u64,
}

/// Stop fetching new tasks (the first step of a shutdown); in-flight ones go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Who hears that a slot came free.
enum Wake {
    /// The worker actor fetching under a rate limit: told only when it had stopped fetching
    /// for want of a slot (one cross-thread message saved per task otherwise).
    Actor(Addr<TaskWorker>),
    /// The feed loop, which may top up its standing request.
    Loop(Arc<Notify>),
}

/// Frees the task's slot when dropped: after the task ends, or when it is aborted.
struct FinishGuard {
    wake: Wake,
    jobs: Arc<Jobs>,
    job: u64,
    running: Arc<AtomicUsize>,
    concurrency: usize,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        self.jobs.remove(self.job);
        let was = self.running.fetch_sub(1, Ordering::AcqRel);
        match &self.wake {
            Wake::Actor(worker) if was >= self.concurrency => {
                worker.do_send(TaskFinished { job: self.job });
            }
            Wake::Actor(_) => {}
            Wake::Loop(freed) => freed.notify_one(),
        }
    }
}

/// Runs `delivery` on `runtime` as job `guard.job`, through `gate` first when it has one.
fn start_job(
    runtime: &tokio::runtime::Handle,
    runner: Arc<Runner>,
    delivery: super::Delivery,
    guard: FinishGuard,
    gate: Option<Gate>,
) {
    let jobs = guard.jobs.clone();
    let job = guard.job;
    // The task waits for its entry in the jobs table, so it cannot finish (and remove
    // itself) before it was added.
    let (go, registered) = oneshot::channel::<()>();
    let handle = runtime.spawn(async move {
        let _guard = guard;
        if registered.await.is_ok() {
            if let Some(gate) = gate {
                if !gate.admit(&delivery).await {
                    return;
                }
            }
            // Boxed: the runner's future is about 9 KB, and a task's future is moved by
            // value into the runtime and again when it finishes; unboxed, those copies were
            // 8% of a worker's CPU on no-op tasks (docs/architecture.md).
            Box::pin(runner.process(delivery)).await;
        }
    });
    jobs.insert(job, handle.abort_handle());
    let _ = go.send(());
}

/// The worker of a queue without a rate limit: a loop on the task runtime that keeps the
/// broker's [`Feed`] asking for exactly the free slots and starts each delivery as it comes
/// (on the thread that received it), or, on a broker with no feed, fetches for them.
async fn feed_loop(
    queue: QueueSpec,
    runner: Arc<Runner>,
    jobs: Arc<Jobs>,
    running: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let size = queue.concurrency.max(1);
    let freed = Arc::new(Notify::new());
    let runtime = tokio::runtime::Handle::current();
    let mut feed: Option<Option<Box<dyn Feed>>> = None;
    let pause = |stop: &CancellationToken| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = tokio::time::sleep(FETCH_ERROR_PAUSE) => {}
                () = stop.cancelled() => {}
            }
        }
    };
    while !stop.is_cancelled() {
        let free = size.saturating_sub(running.load(Ordering::Acquire));
        if free == 0 {
            tokio::select! {
                () = freed.notified() => continue,
                () = stop.cancelled() => break,
            }
        }
        let source = match &mut feed {
            Some(source) => source,
            None => match runner.queue.feed(&queue.name, size).await {
                Ok(source) => feed.insert(source),
                Err(e) => {
                    tracing::error!(queue = %queue.name, "cannot start fetching: {e}");
                    pause(&stop).await;
                    continue;
                }
            },
        };
        let got = tokio::select! {
            got = async {
                match source {
                    Some(f) => f.next(free).await,
                    None => runner.queue.fetch_batch(&queue.name, free, FETCH_WAIT).await,
                }
            } => got,
            () = freed.notified() => continue,
            () = stop.cancelled() => break,
        };
        match got {
            Ok(deliveries) => {
                for delivery in deliveries {
                    running.fetch_add(1, Ordering::AcqRel);
                    let guard = FinishGuard {
                        wake: Wake::Loop(freed.clone()),
                        jobs: jobs.clone(),
                        job: jobs.next_id(),
                        running: running.clone(),
                        concurrency: size,
                    };
                    start_job(&runtime, runner.clone(), delivery, guard, None);
                }
            }
            Err(e) => {
                tracing::error!(queue = %queue.name, "fetch failed: {e}");
                feed = None;
                pause(&stop).await;
            }
        }
    }
    // Dropping the feed unsubscribes its inbox: the requests still standing deliver nothing.
}

/// The worker of one queue.
pub struct TaskWorker {
    queue: QueueSpec,
    runner: Arc<Runner>,
    runtime: tokio::runtime::Handle,
    jobs: Arc<Jobs>,
    /// This worker's tasks in flight (decremented by each task's [`FinishGuard`]).
    running: Arc<AtomicUsize>,
    fetch: Option<SpawnHandle>,
    /// A timer or a lease for the rate limit is pending.
    rate_timer: bool,
    /// The queue's cluster-wide rate limit, when it has one.
    limiter: Option<Arc<ClusterLimiter>>,
    /// The limit's key when it has no `rate_key` (the worker leases before it fetches).
    unkeyed: Option<String>,
    draining: bool,
    /// Stops the feed loop of a queue without a rate limit (`None`: this actor fetches).
    feeding: Option<CancellationToken>,
}

/// A queue's rate limit checked per delivery, once its args are read: always under a
/// `rate_key` (a worker cannot know the key before it fetches), and for a delivery whose
/// tokens went stale while its fetch waited for a message. A delivery with no token left is
/// put back until its turn ([`TaskQueue::defer`]) and frees its slot, so one busy key never
/// holds up the others.
struct Gate {
    limiter: Arc<ClusterLimiter>,
    /// The `rate_key` field; `None`: the queue's one limit, under `key`.
    field: Option<String>,
    key: String,
    broker: Arc<dyn TaskQueue>,
}

impl Gate {
    /// Whether the delivery may run now; if not, it was put back.
    async fn admit(&self, delivery: &super::Delivery) -> bool {
        // A message the runner would refuse, or one waiting for its eta, is its business.
        let env = match serde_json::from_slice::<Envelope>(&delivery.payload) {
            Ok(env) if env.wait_for_eta(chrono::Utc::now()).is_none() => env,
            _ => return true,
        };
        let id = env
            .id
            .clone()
            .unwrap_or_else(|| Envelope::fallback_id(self.broker.stream(), delivery.seq));
        if !super::is_valid_task_id(&id) {
            return true;
        }
        let key = match &self.field {
            Some(field) => limit_key(&delivery.queue, env.args.get(field)),
            None => self.key.clone(),
        };
        match self.limiter.acquire(&*self.broker, &key).await {
            Ok(()) => true,
            Err(wait) => {
                if let Err(e) = self.broker.defer(delivery, &id, &env.task, wait).await {
                    tracing::warn!(
                        seq = delivery.seq,
                        "cannot put back a rate-limited task: {e}"
                    );
                }
                false
            }
        }
    }
}

impl TaskWorker {
    fn new(
        queue: QueueSpec,
        runner: Arc<Runner>,
        runtime: tokio::runtime::Handle,
        jobs: Arc<Jobs>,
    ) -> Self {
        let limiter = queue
            .rate_limit_per_sec
            .and_then(Limit::from_rate)
            .map(|l| Arc::new(ClusterLimiter::new(l, runner.settings.ack_wait)));
        let unkeyed = match (&limiter, &queue.rate_key) {
            (Some(_), None) => Some(limit_key(&queue.name, None)),
            _ => None,
        };
        Self {
            queue,
            runner,
            runtime,
            jobs,
            running: Arc::new(AtomicUsize::new(0)),
            fetch: None,
            rate_timer: false,
            limiter,
            unkeyed,
            draining: false,
            feeding: None,
        }
    }

    /// Pumps again after `wait`.
    fn pump_later(&mut self, wait: Duration, ctx: &mut Context<Self>) {
        self.rate_timer = true;
        ctx.run_later(wait, |act, ctx| {
            act.rate_timer = false;
            act.pump(ctx);
        });
    }

    /// Under a limit without `rate_key`: takes tokens for up to `free` tasks from the local
    /// budget (`free` when there is no limit); `None` when the worker must wait first (a
    /// timer or a lease is pending).
    fn take_tokens(&mut self, free: usize, ctx: &mut Context<Self>) -> Option<u32> {
        let want = u32::try_from(free).unwrap_or(u32::MAX);
        let (Some(limiter), Some(key)) = (self.limiter.clone(), self.unkeyed.clone()) else {
            return Some(want);
        };
        match limiter.take_local(&key, want, false, unix_ns(), Instant::now()) {
            Local::Got(n) => Some(n),
            Local::Wait(d) | Local::Exhausted(d) => {
                self.pump_later(d, ctx);
                None
            }
            Local::Leasing => {
                self.pump_later(Duration::from_millis(2), ctx);
                None
            }
            Local::Lease => {
                self.rate_timer = true;
                let broker = self.runner.queue.clone();
                let limit = limiter.limit;
                let fut = async move {
                    let res = broker
                        .rate_lease(
                            &key,
                            limit.interval_ns,
                            limit.slice,
                            unix_ns(),
                            limit.interval_ns,
                        )
                        .await;
                    (key, res)
                }
                .into_actor(self)
                .map(move |(key, res), act, ctx| {
                    act.rate_timer = false;
                    match res {
                        Ok(grant) => limiter.add_lease(&key, grant),
                        Err(e) => {
                            limiter.lease_failed(&key);
                            log_lease_error(&e);
                            act.pump_later(LEASE_ERROR_PAUSE, ctx);
                            return;
                        }
                    }
                    act.pump(ctx);
                });
                ctx.spawn(fut);
                None
            }
        }
    }

    /// Fetches deliveries for the free slots (one under a rate limit) if the rate limit allows
    /// and no fetch is already waiting.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.draining
            || self.fetch.is_some()
            || self.rate_timer
            || self.running.load(Ordering::Acquire) >= self.queue.concurrency.max(1)
        {
            return;
        }
        let broker = self.runner.queue.clone();
        let queue = self.queue.name.clone();
        let free = self
            .queue
            .concurrency
            .max(1)
            .saturating_sub(self.running.load(Ordering::Acquire))
            .max(1);
        let Some(held) = self.take_tokens(free, ctx) else {
            return;
        };
        let max = (held as usize).clamp(1, free);
        let taken_at = unix_ns();
        let fut = async move { broker.fetch_batch(&queue, max, FETCH_WAIT).await }
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.fetch = None;
                let got = res.as_ref().map_or(0, Vec::len);
                // Tokens held while the fetch waited for a message are stale once a slice's
                // span passed: spent then, they would make a burst. The deliveries take fresh
                // tokens one by one instead, and the stale ones are dropped.
                let mut stale = false;
                if let (Some(limiter), Some(key)) = (&act.limiter, &act.unkeyed) {
                    stale = unix_ns().saturating_sub(taken_at) > limiter.limit.stale_after_ns();
                    if !stale {
                        let got = u32::try_from(got).unwrap_or(u32::MAX);
                        limiter.give_back(key, held.saturating_sub(got));
                    }
                }
                match res {
                    Ok(deliveries) => {
                        for delivery in deliveries {
                            act.dispatch(delivery, stale, ctx);
                        }
                    }
                    Err(e) => {
                        tracing::error!(queue = %act.queue.name, "fetch failed: {e}");
                        if act.draining {
                            return;
                        }
                        act.pump_later(FETCH_ERROR_PAUSE, ctx);
                        return;
                    }
                }
                act.pump(ctx);
            });
        self.fetch = Some(ctx.spawn(fut));
    }

    /// Runs a delivery on the task runtime.
    fn dispatch(&mut self, delivery: super::Delivery, stale: bool, ctx: &mut Context<Self>) {
        self.running.fetch_add(1, Ordering::AcqRel);
        let guard = FinishGuard {
            wake: Wake::Actor(ctx.address()),
            jobs: self.jobs.clone(),
            job: self.jobs.next_id(),
            running: self.running.clone(),
            concurrency: self.queue.concurrency.max(1),
        };
        let gate = match (&self.limiter, &self.queue.rate_key) {
            (Some(limiter), Some(field)) => Some(Gate {
                limiter: limiter.clone(),
                field: Some(field.clone()),
                key: String::new(),
                broker: self.runner.queue.clone(),
            }),
            (Some(limiter), None) if stale => Some(Gate {
                limiter: limiter.clone(),
                field: None,
                key: self.unkeyed.clone().unwrap_or_default(),
                broker: self.runner.queue.clone(),
            }),
            _ => None,
        };
        start_job(&self.runtime, self.runner.clone(), delivery, guard, gate);
    }
}

impl Actor for TaskWorker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(
            queue = %self.queue.name,
            concurrency = self.queue.concurrency,
            rate_limit_per_sec = ?self.queue.rate_limit_per_sec,
            rate_key = ?self.queue.rate_key,
            tasks = %self.runner.registry.names().join(", "),
            "task worker started"
        );
        if self.limiter.is_some() {
            // A rate-limited queue fetches only what its tokens cover (a standing request
            // would hold deliveries its budget may not run yet).
            self.pump(ctx);
            return;
        }
        let stop = CancellationToken::new();
        self.feeding = Some(stop.clone());
        self.runtime.spawn(feed_loop(
            self.queue.clone(),
            self.runner.clone(),
            self.jobs.clone(),
            self.running.clone(),
            stop,
        ));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(stop) = self.feeding.take() {
            stop.cancel();
        }
    }
}

impl Supervised for TaskWorker {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(queue = %self.queue.name, "task worker restarting");
        if let Some(stop) = self.feeding.take() {
            stop.cancel();
        }
        self.fetch = None;
        self.rate_timer = false;
    }
}

impl Handler<TaskFinished> for TaskWorker {
    type Result = ();

    fn handle(&mut self, _msg: TaskFinished, ctx: &mut Context<Self>) {
        self.pump(ctx);
    }
}

impl Handler<Drain> for TaskWorker {
    type Result = ();

    fn handle(&mut self, _msg: Drain, ctx: &mut Context<Self>) {
        self.draining = true;
        if let Some(stop) = self.feeding.take() {
            stop.cancel();
        }
        if let Some(fetch) = self.fetch.take() {
            ctx.cancel_future(fetch);
        }
    }
}

/// How a [`WorkerPool::drain`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every in-flight task finished.
    Finished,
    /// `drain_timeout` passed or the cold token fired: the tasks' tokens fired and this many
    /// tasks, still running after a short grace, were aborted.
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
    jobs: Arc<Jobs>,
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
            .filter(|q| queues.is_none_or(|names| names.contains(&q.name)))
            .cloned()
            .collect();
        let jobs = Arc::new(Jobs::default());
        let runner = Arc::new(Runner {
            queue: broker.clone(),
            results: broker,
            registry,
            settings: Arc::new(settings),
            events,
            cold: cold.clone(),
            eager: false,
            batches: Default::default(),
        });
        let workers = specs
            .into_iter()
            .map(|spec| {
                let runner = runner.clone();
                let handle = runtime.handle().clone();
                let jobs = jobs.clone();
                Supervisor::start_in_arbiter(arbiter, move |_| {
                    TaskWorker::new(spec, runner, handle, jobs)
                })
            })
            .collect();
        Ok(Self {
            workers,
            jobs,
            cold,
            drain_timeout,
            _runtime: TaskRuntime(Mutex::new(Some(runtime))),
        })
    }

    /// The token that, once cancelled, turns a warm shutdown cold (the second signal).
    pub fn cold_token(&self) -> CancellationToken {
        self.cold.clone()
    }

    /// Tasks in flight right now.
    pub fn in_flight(&self) -> usize {
        self.jobs.lock().len()
    }

    /// A reader of [`WorkerPool::in_flight`] that outlives this borrow (heartbeats, metrics).
    pub fn in_flight_reader(&self) -> crate::cluster::InFlight {
        let jobs = self.jobs.clone();
        std::sync::Arc::new(move || jobs.lock().len() as u64)
    }

    /// Warm shutdown: stop fetching and wait for in-flight tasks, at most `drain_timeout` or
    /// until the cold token fires; then cold: fire every task's token, give them
    /// `COLD_GRACE`, and abort what is left.
    pub async fn drain(&self) -> DrainOutcome {
        // A worker whose arbiter already stopped fetches nothing either: its error is fine.
        let stop_fetching = join_all(self.workers.iter().map(|w| w.send(Drain)));
        let _ = tokio::time::timeout(DRAIN_SEND_TIMEOUT, stop_fetching).await;
        let finished = tokio::select! {
            () = self.jobs.idle() => true,
            () = tokio::time::sleep(self.drain_timeout) => false,
            () = self.cold.cancelled() => false,
        };
        if finished {
            return DrainOutcome::Finished;
        }
        self.cold.cancel();
        let _ = tokio::time::timeout(COLD_GRACE, self.jobs.idle()).await;
        let aborted = self.jobs.abort_all();
        tracing::warn!(aborted, "cold shutdown: in-flight tasks aborted");
        DrainOutcome::Aborted(aborted)
    }
}
