//! The task model's behaviour suite, written once and run against every way tasks can run:
//! the memory broker with its worker actors, and eager mode (the NATS broker adds its harness
//! here). Each case is a generic fn over [`Harness`]; `behaviour_suite!` instantiates them.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchyard::tasks::{
    new_task_id, Backoff, ClientError, EventKind, EventSink, MemoryBroker, PublishOptions,
    QueueSpec, Registry, Task, TaskContext, TaskError, TaskEvent, TaskOptions, TaskSettings,
    TaskState, Tasks, WorkerPool,
};
use switchyard_actors::tasks::{DrainOutcome, NatsBroker, Outgoing, TaskQueue};
use switchyard_demo::tasks::{Add, AddArgs, Flaky, FlakyArgs, Sleep, SleepArgs};

/// Generous upper bound for anything the suite waits for.
const WAIT: Duration = Duration::from_secs(10);
/// Scheduling slack allowed on top of a wait's upper bound (2 shared cores).
const SLACK: Duration = Duration::from_millis(120);
/// Slack on a lower bound (wall-clock eta to monotonic time conversions).
const EARLY: Duration = Duration::from_millis(5);

/// Starts under a rate limit of one per `interval`: on average no faster than the limit (the
/// span of n starts is at least n - 1 intervals), and no two starts closer than half an
/// interval. The limiter grants tokens on time; a body's own start may be scheduled a little
/// late, which shortens the gap to the next one, so single gaps get that much slack.
fn assert_rate_limited(starts: &[Instant], interval: Duration) {
    let (Some(first), Some(last)) = (starts.first(), starts.last()) else {
        return;
    };
    let span = last.duration_since(*first);
    let need = interval * (starts.len() as u32 - 1);
    assert!(
        span + EARLY >= need,
        "{} starts within {span:?}, limit allows no less than {need:?}",
        starts.len()
    );
    for w in starts.windows(2) {
        let gap = w[1].duration_since(w[0]);
        assert!(
            gap >= interval / 2,
            "starts {gap:?} apart, under half the interval"
        );
    }
}
const BACKOFF_BASE: Duration = Duration::from_millis(100);

fn settings() -> TaskSettings {
    TaskSettings {
        node_id: "suite".into(),
        queues: vec![
            QueueSpec::new("default", 4),
            QueueSpec {
                name: "limited".into(),
                concurrency: 4,
                rate_limit_per_sec: Some(10.0),
                rate_key: None,
            },
            QueueSpec::new("pair", 2),
        ],
        backoff: Backoff {
            base: BACKOFF_BASE,
            max: Duration::from_secs(1),
        },
        ack_wait: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        runtime_threads: 2,
        ..TaskSettings::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The probe: a test task that records its attempts.

#[derive(Clone, Debug)]
struct Attempt {
    id: String,
    started: Instant,
    ended: Option<Instant>,
}

#[derive(Default)]
struct ProbeLog {
    attempts: Mutex<Vec<Attempt>>,
    running: Mutex<(usize, usize)>,
}

impl ProbeLog {
    fn of(&self, id: &str) -> Vec<Attempt> {
        let all = self.attempts.lock().expect("log");
        all.iter().filter(|a| a.id == id).cloned().collect()
    }
    fn all(&self) -> Vec<Attempt> {
        self.attempts.lock().expect("log").clone()
    }
    fn max_running(&self) -> usize {
        self.running.lock().expect("log").1
    }
}

struct Running<'a>(&'a ProbeLog);

impl<'a> Running<'a> {
    fn new(log: &'a ProbeLog) -> Self {
        let mut r = log.running.lock().expect("log");
        r.0 += 1;
        r.1 = r.1.max(r.0);
        Running(log)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.running.lock() {
            r.0 -= 1;
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct ProbeArgs {
    /// Fail this many attempts first.
    fail: u32,
    /// Fail with a non-retried error.
    fatal: bool,
    /// Fail by an explicit retry with this countdown.
    retry_in_ms: Option<u64>,
    /// Work this long.
    sleep_ms: u64,
    /// While working, poll the cancellation token every 5 ms and stop when it fires.
    poll_cancel: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ProbeOut {
    attempt: u32,
    worked_ms: u64,
    cancelled: bool,
}

/// Probe<0> plain, <1> soft limit 150 ms, <2> hard limit 150 ms, <3> 10 starts/s,
/// <4> ignore_result.
struct Probe<const K: u8>(Arc<ProbeLog>);

const PROBE_NAMES: [&str; 5] = [
    "probe.plain",
    "probe.soft",
    "probe.hard",
    "probe.rate",
    "probe.ignored",
];
const LIMIT: Duration = Duration::from_millis(150);

impl<const K: u8> Task for Probe<K> {
    const NAME: &'static str = PROBE_NAMES[K as usize];
    type Args = ProbeArgs;
    type Output = ProbeOut;

    fn options() -> TaskOptions {
        match K {
            1 => TaskOptions::new().soft_time_limit(LIMIT),
            2 => TaskOptions::new().time_limit(LIMIT).max_retries(0),
            3 => TaskOptions::new().rate_limit_per_sec(10.0),
            4 => TaskOptions::new().ignore_result(),
            _ => TaskOptions::new(),
        }
    }

    async fn run(&self, ctx: TaskContext, args: ProbeArgs) -> Result<ProbeOut, TaskError> {
        let started = Instant::now();
        let attempt = {
            let mut log = self.0.attempts.lock().expect("log");
            log.push(Attempt {
                id: ctx.id().to_owned(),
                started,
                ended: None,
            });
            log.iter().filter(|a| a.id == ctx.id()).count() as u32
        };
        let _running = Running::new(&self.0);
        let work = Duration::from_millis(args.sleep_ms);
        let mut cancelled = false;
        if args.poll_cancel {
            // Bounded by `work` (and the 10 s at most any case asks for).
            while started.elapsed() < work {
                if ctx.is_cancelled() {
                    cancelled = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } else if !work.is_zero() {
            tokio::time::sleep(work).await;
        }
        let out = if attempt <= args.fail {
            Err(match (args.retry_in_ms, args.fatal) {
                (Some(ms), _) => ctx.retry(Duration::from_millis(ms)),
                (None, true) => TaskError::fail("probe", format!("attempt {attempt} failed")),
                (None, false) => TaskError::retry("probe", format!("attempt {attempt} failed")),
            })
        } else {
            Ok(ProbeOut {
                attempt,
                worked_ms: started.elapsed().as_millis() as u64,
                cancelled,
            })
        };
        let mut log = self.0.attempts.lock().expect("log");
        if let Some(a) = log
            .iter_mut()
            .rev()
            .find(|a| a.id == ctx.id() && a.ended.is_none())
        {
            a.ended = Some(Instant::now());
        }
        out
    }
}

/// Returns whether its context says it runs eagerly.
struct EagerProbe;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct EagerProbeArgs {}

impl Task for EagerProbe {
    const NAME: &'static str = "probe.eager";
    type Args = EagerProbeArgs;
    type Output = bool;

    async fn run(&self, ctx: TaskContext, _args: EagerProbeArgs) -> Result<bool, TaskError> {
        Ok(ctx.is_eager())
    }
}

fn registry(log: &Arc<ProbeLog>) -> Registry {
    let mut r = Registry::new();
    r.register(Add)
        .register(EagerProbe)
        .register(Sleep)
        .register(Flaky)
        .register(Probe::<0>(log.clone()))
        .register(Probe::<1>(log.clone()))
        .register(Probe::<2>(log.clone()))
        .register(Probe::<3>(log.clone()))
        .register(Probe::<4>(log.clone()));
    r
}

// ---------------------------------------------------------------------------------------------
// Harnesses.

/// One way of running tasks.
trait Harness: Sized {
    /// Whether worker actors consume a broker (false: eager, tasks run inside publish).
    const WORKERS: bool;
    /// The shared service the harness needs (the case is skipped, or fails under
    /// `SWITCHYARD_REQUIRE_SERVICES=1`, when it is unreachable).
    const SERVICE: Option<&'static str> = None;
    async fn start(settings: TaskSettings, registry: Registry) -> Self;
    fn tasks(&self) -> &Tasks;
    /// Events so far (eager mode has none).
    fn events(&self) -> Vec<TaskEvent>;
    /// Warm shutdown of the workers.
    async fn drain(&self) -> Option<DrainOutcome>;
    async fn stop(self);
}

struct MemoryHarness {
    tasks: Tasks,
    broker: Arc<MemoryBroker>,
    pool: WorkerPool,
    arbiter: actix_rt::Arbiter,
    events: Arc<Mutex<Vec<TaskEvent>>>,
}

impl Harness for MemoryHarness {
    const WORKERS: bool = true;

    async fn start(settings: TaskSettings, registry: Registry) -> Self {
        let broker = Arc::new(MemoryBroker::new(&settings));
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink: EventSink = {
            let events = events.clone();
            Arc::new(move |e: &TaskEvent| events.lock().expect("events").push(e.clone()))
        };
        let registry = Arc::new(registry);
        let arbiter = actix_rt::Arbiter::new();
        let pool = WorkerPool::start(
            settings.clone(),
            None,
            broker.clone(),
            registry.clone(),
            Some(sink),
            &arbiter.handle(),
        )
        .expect("worker pool");
        Self {
            tasks: Tasks::new(broker.clone(), registry, settings),
            broker,
            pool,
            arbiter,
            events,
        }
    }
    fn tasks(&self) -> &Tasks {
        &self.tasks
    }
    fn events(&self) -> Vec<TaskEvent> {
        self.events.lock().expect("events").clone()
    }
    async fn drain(&self) -> Option<DrainOutcome> {
        Some(self.pool.drain().await)
    }
    async fn stop(self) {
        self.pool.cold_token().cancel();
        self.pool.drain().await;
        self.arbiter.stop();
    }
}

/// The NATS JetStream broker on the shared server, under a unique `nats.prefix`; its streams
/// and bucket are deleted at the end.
struct NatsHarness {
    inner: MemoryLike,
    broker: Arc<NatsBroker>,
}

/// The parts a broker-backed harness shares.
struct MemoryLike {
    tasks: Tasks,
    pool: WorkerPool,
    arbiter: actix_rt::Arbiter,
    events: Arc<Mutex<Vec<TaskEvent>>>,
}

impl NatsHarness {
    async fn open(settings: &TaskSettings) -> Arc<NatsBroker> {
        let client = async_nats::connect(common::service_url("nats"))
            .await
            .expect("nats");
        let prefix = common::unique_name("sy");
        Arc::new(
            NatsBroker::open(client, &prefix, settings)
                .await
                .expect("nats broker"),
        )
    }

    async fn delete(broker: &NatsBroker) {
        let names = broker.names();
        let js = broker.jetstream();
        for stream in names.task_streams() {
            let _ = js.delete_stream(&stream).await;
        }
    }
}

impl Harness for NatsHarness {
    const WORKERS: bool = true;
    const SERVICE: Option<&'static str> = Some("nats");

    async fn start(settings: TaskSettings, registry: Registry) -> Self {
        let broker = Self::open(&settings).await;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink: EventSink = {
            let events = events.clone();
            Arc::new(move |e: &TaskEvent| events.lock().expect("events").push(e.clone()))
        };
        let sink = broker.event_sink(Some(sink));
        let registry = Arc::new(registry);
        let arbiter = actix_rt::Arbiter::new();
        let pool = WorkerPool::start(
            settings.clone(),
            None,
            broker.clone(),
            registry.clone(),
            Some(sink),
            &arbiter.handle(),
        )
        .expect("worker pool");
        Self {
            inner: MemoryLike {
                tasks: Tasks::new(broker.clone(), registry, settings),
                pool,
                arbiter,
                events,
            },
            broker,
        }
    }
    fn tasks(&self) -> &Tasks {
        &self.inner.tasks
    }
    fn events(&self) -> Vec<TaskEvent> {
        self.inner.events.lock().expect("events").clone()
    }
    async fn drain(&self) -> Option<DrainOutcome> {
        Some(self.inner.pool.drain().await)
    }
    async fn stop(self) {
        self.inner.pool.cold_token().cancel();
        self.inner.pool.drain().await;
        self.inner.arbiter.stop();
        Self::delete(&self.broker).await;
    }
}

struct EagerHarness {
    tasks: Tasks,
}

impl Harness for EagerHarness {
    const WORKERS: bool = false;

    async fn start(settings: TaskSettings, registry: Registry) -> Self {
        Self {
            tasks: Tasks::eager(Arc::new(registry), settings),
        }
    }
    fn tasks(&self) -> &Tasks {
        &self.tasks
    }
    fn events(&self) -> Vec<TaskEvent> {
        Vec::new()
    }
    async fn drain(&self) -> Option<DrainOutcome> {
        None
    }
    async fn stop(self) {}
}

async fn start<H: Harness>() -> (H, Arc<ProbeLog>) {
    let log = Arc::new(ProbeLog::default());
    (H::start(settings(), registry(&log)).await, log)
}

/// Polls until `f` holds, at most [`WAIT`].
async fn until<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls the record of `id` until it is in `state`, at most [`WAIT`].
async fn until_state(tasks: &Tasks, id: &str, state: TaskState) {
    let deadline = Instant::now() + WAIT;
    loop {
        let rec = tasks.result(id).await.expect("result");
        if rec.state == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} never reached {state}: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn kinds(events: &[TaskEvent], id: &str) -> Vec<EventKind> {
    events
        .iter()
        .filter(|e| e.task_id == id)
        .map(|e| e.kind)
        .collect()
}

fn assert_within(what: &str, d: Duration, lo: Duration, hi: Duration) {
    assert!(
        d + EARLY >= lo && d <= hi + SLACK,
        "{what}: {d:?} not in [{lo:?}, {hi:?}] (+{SLACK:?} slack)"
    );
}

// ---------------------------------------------------------------------------------------------
// The cases.

async fn publish_succeeds<H: Harness>() {
    let (h, _) = start::<H>().await;
    let t = h.tasks();
    let handle = t
        .delay::<Add>(AddArgs { x: 2, y: 3 })
        .await
        .expect("publish");
    assert_eq!(handle.id(), handle.id().to_lowercase());
    assert!(
        uuid::Uuid::parse_str(handle.id()).is_ok(),
        "{}",
        handle.id()
    );
    assert_eq!(handle.get(WAIT).await.expect("result"), 5);
    assert!(handle.ready().await.expect("ready"));
    let rec = handle.record().await.expect("record");
    assert_eq!(rec.state, TaskState::Success);
    assert_eq!(rec.result, json!(5));
    assert_eq!((rec.error, rec.retries), (None, 0));
    assert_eq!(rec.task.as_deref(), Some("demo.add"));
    assert!(rec.started_at.is_some() && rec.finished_at.is_some());
    // By name, as the CLI and foreign clients publish.
    let by_name = t
        .send("demo.add", json!({"x": 40, "y": 2}), PublishOptions::new())
        .await
        .expect("publish");
    assert_eq!(by_name.get(WAIT).await.expect("result"), json!(42));
    if H::WORKERS {
        let ev = h.events();
        assert_eq!(
            kinds(&ev, handle.id()),
            [
                EventKind::TaskReceived,
                EventKind::TaskStarted,
                EventKind::TaskSucceeded
            ]
        );
    }
    h.stop().await;
}

async fn flaky_fails_twice_then_succeeds<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t = h.tasks();
    let flaky = t
        .delay::<Flaky>(FlakyArgs { fail_times: 2 })
        .await
        .expect("publish");
    assert_eq!(flaky.get(WAIT).await.expect("result"), 3, "third attempt");
    let rec = flaky.record().await.expect("record");
    assert_eq!((rec.state, rec.retries), (TaskState::Success, 2));
    if H::WORKERS {
        use EventKind::*;
        assert_eq!(
            kinds(&h.events(), flaky.id()),
            [
                TaskReceived,
                TaskStarted,
                TaskRetried,
                TaskStarted,
                TaskRetried,
                TaskStarted,
                TaskSucceeded
            ]
        );
    }
    // The waits between attempts fall in the backoff windows [d/2, d], d = base * 2^n.
    let probe = t
        .delay::<Probe<0>>(ProbeArgs {
            fail: 2,
            ..ProbeArgs::default()
        })
        .await
        .expect("publish");
    let out = probe.get(WAIT).await.expect("result");
    assert_eq!(out.attempt, 3);
    let attempts = log.of(probe.id());
    assert_eq!(attempts.len(), 3);
    for n in 0..2 {
        let ended = attempts[n].ended.expect("attempt ended");
        let gap = attempts[n + 1].started.duration_since(ended);
        let d = BACKOFF_BASE * 2u32.pow(n as u32);
        assert_within(&format!("wait before retry {n}"), gap, d / 2, d);
    }
    h.stop().await;
}

async fn exhausted_retries_fail<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t = h.tasks();
    let args = ProbeArgs {
        fail: 99,
        ..ProbeArgs::default()
    };
    let handle = t
        .apply_async::<Probe<0>>(args, PublishOptions::new().max_retries(2))
        .await
        .expect("publish");
    match handle.get(WAIT).await {
        Err(ClientError::Failed { state, error, .. }) => {
            assert_eq!(state, TaskState::Failure);
            assert_eq!(error, "probe: attempt 3 failed");
        }
        other => panic!("expected FAILURE, got {other:?}"),
    }
    assert_eq!(handle.record().await.expect("record").retries, 2);
    assert_eq!(log.of(handle.id()).len(), 3);
    // A non-retried error fails at once.
    let fatal = t
        .delay::<Probe<0>>(ProbeArgs {
            fail: 99,
            fatal: true,
            ..ProbeArgs::default()
        })
        .await
        .expect("publish");
    assert!(matches!(
        fatal.get(WAIT).await,
        Err(ClientError::Failed {
            state: TaskState::Failure,
            ..
        })
    ));
    assert_eq!(fatal.record().await.expect("record").retries, 0);
    assert_eq!(log.of(fatal.id()).len(), 1);
    h.stop().await;
}

async fn revoked_before_start_never_runs<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t = h.tasks();
    let id = new_task_id();
    assert!(t.revoke(&id).await.expect("revoke"));
    let handle = t
        .apply_async::<Probe<0>>(ProbeArgs::default(), PublishOptions::new().task_id(&id))
        .await
        .expect("publish");
    match handle.get(WAIT).await {
        Err(ClientError::Failed { state, .. }) => assert_eq!(state, TaskState::Revoked),
        other => panic!("expected REVOKED, got {other:?}"),
    }
    if H::WORKERS {
        // The worker saw the message and dropped it.
        until("the revoked event", || {
            kinds(&h.events(), &id).contains(&EventKind::TaskRevoked)
        })
        .await;
        // Revoking a task that waits for its countdown.
        let later = t
            .apply_async::<Probe<0>>(
                ProbeArgs::default(),
                PublishOptions::new().countdown(Duration::from_millis(200)),
            )
            .await
            .expect("publish");
        assert!(t.revoke(later.id()).await.expect("revoke"));
        until("the delayed task's revoked event", || {
            kinds(&h.events(), later.id()).contains(&EventKind::TaskRevoked)
        })
        .await;
        assert_eq!(later.state().await.expect("state"), TaskState::Revoked);
        assert!(log.of(later.id()).is_empty(), "a revoked task ran");
        // A finished task can no longer be revoked.
        let done = t
            .delay::<Add>(AddArgs { x: 1, y: 1 })
            .await
            .expect("publish");
        done.get(WAIT).await.expect("result");
        assert!(!t.revoke(done.id()).await.expect("revoke"));
        assert_eq!(done.state().await.expect("state"), TaskState::Success);
    }
    assert!(log.of(&id).is_empty(), "a revoked task ran");
    h.stop().await;
}

async fn expired_task_is_not_run<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t = h.tasks();
    let handle = t
        .apply_async::<Probe<0>>(
            ProbeArgs::default(),
            PublishOptions::new().expires(Utc::now() - chrono::Duration::seconds(1)),
        )
        .await
        .expect("publish");
    match handle.get(WAIT).await {
        Err(ClientError::Failed { state, error, .. }) => {
            assert_eq!((state, error.as_str()), (TaskState::Revoked, "expired"))
        }
        other => panic!("expected REVOKED/expired, got {other:?}"),
    }
    if H::WORKERS {
        // Scheduled past its expiry: never runs.
        let late = t
            .apply_async::<Probe<0>>(
                ProbeArgs::default(),
                PublishOptions::new()
                    .countdown(Duration::from_millis(150))
                    .expires_in(Duration::from_millis(50)),
            )
            .await
            .expect("publish");
        until_state(t, late.id(), TaskState::Revoked).await;
        assert!(log.of(late.id()).is_empty());
    }
    assert!(log.of(handle.id()).is_empty());
    h.stop().await;
}

/// REVOKED records have one shape whichever way the task runs (eager included): built by
/// `ResultRecord::revoked`, with `"revoked"` or `"expired"`, a finish time, no start, no result.
async fn revoked_and_expired_records_have_one_shape<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t = h.tasks();
    let id = new_task_id();
    assert!(t.revoke(&id).await.expect("revoke"));
    let revoked = t
        .apply_async::<Probe<0>>(ProbeArgs::default(), PublishOptions::new().task_id(&id))
        .await
        .expect("publish");
    assert!(revoked.get(WAIT).await.is_err());
    let rec = t.result(&id).await.expect("result");
    assert_eq!(
        (
            rec.state,
            rec.error.as_deref(),
            rec.task.as_deref(),
            rec.node.as_deref()
        ),
        (TaskState::Revoked, Some("revoked"), None, None),
        "{rec:?}"
    );
    assert_eq!(
        (rec.retries, rec.started_at, &rec.result),
        (0, None, &json!(null))
    );
    assert!(rec.finished_at.is_some(), "{rec:?}");

    let expired = t
        .apply_async::<Probe<0>>(
            ProbeArgs::default(),
            PublishOptions::new().expires(Utc::now() - chrono::Duration::seconds(1)),
        )
        .await
        .expect("publish");
    assert!(expired.get(WAIT).await.is_err());
    let rec = t.result(expired.id()).await.expect("result");
    assert_eq!(
        (
            rec.state,
            rec.error.as_deref(),
            rec.task.as_deref(),
            rec.node.as_deref()
        ),
        (
            TaskState::Revoked,
            Some("expired"),
            Some("probe.plain"),
            Some("suite")
        ),
        "{rec:?}"
    );
    assert_eq!(
        (rec.retries, rec.started_at, &rec.result),
        (0, None, &json!(null))
    );
    assert!(rec.finished_at.is_some(), "{rec:?}");
    // The handle's record (eager: the one it holds) is the stored one.
    assert_eq!(expired.record().await.expect("record"), rec);
    assert!(log.of(&id).is_empty() && log.of(expired.id()).is_empty());
    h.stop().await;
}

/// A retry that comes due after the task's expiry is not run: the expiry rule applies to
/// every delivery, the retries' too, in eager mode as on workers.
async fn a_retry_due_after_expiry_is_revoked<H: Harness>() {
    let (h, log) = start::<H>().await;
    let handle = h
        .tasks()
        .apply_async::<Probe<0>>(
            ProbeArgs {
                fail: 1,
                retry_in_ms: Some(400),
                ..ProbeArgs::default()
            },
            PublishOptions::new().expires_in(Duration::from_millis(200)),
        )
        .await
        .expect("publish");
    match handle.get(WAIT).await {
        Err(ClientError::Failed { state, error, .. }) => {
            assert_eq!((state, error.as_str()), (TaskState::Revoked, "expired"))
        }
        other => panic!("expected REVOKED/expired, got {other:?}"),
    }
    let rec = handle.record().await.expect("record");
    assert_eq!(
        (rec.retries, rec.task.as_deref()),
        (1, Some("probe.plain")),
        "{rec:?}"
    );
    assert_eq!(log.of(handle.id()).len(), 1, "the expired retry ran");
    h.stop().await;
}

/// The context says whether the body runs eagerly, and which attempt this is.
async fn context_knows_eager_and_attempt<H: Harness>() {
    let (h, _) = start::<H>().await;
    let handle = h
        .tasks()
        .delay::<Flaky>(FlakyArgs { fail_times: 1 })
        .await
        .expect("publish");
    assert_eq!(handle.get(WAIT).await.expect("result"), 2);
    let t = h
        .tasks()
        .delay::<EagerProbe>(EagerProbeArgs {})
        .await
        .expect("publish");
    assert_eq!(t.get(WAIT).await.expect("result"), !H::WORKERS);
    h.stop().await;
}

async fn rate_limit_is_honoured<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t = h.tasks();
    // The task's own limit: 10 starts/s.
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(
            t.delay::<Probe<3>>(ProbeArgs::default())
                .await
                .expect("publish"),
        );
    }
    for handle in &handles {
        handle.get(WAIT).await.expect("result");
    }
    let mut starts: Vec<Instant> = log.all().iter().map(|a| a.started).collect();
    starts.sort();
    assert_eq!(starts.len(), 4);
    assert_rate_limited(&starts, Duration::from_millis(100));
    h.stop().await;
}

async fn soft_time_limit_fires_the_token<H: Harness>() {
    let (h, _) = start::<H>().await;
    let handle = h
        .tasks()
        .delay::<Probe<1>>(ProbeArgs {
            sleep_ms: 5_000,
            poll_cancel: true,
            ..ProbeArgs::default()
        })
        .await
        .expect("publish");
    let out = handle.get(WAIT).await.expect("result");
    assert!(out.cancelled, "{out:?}");
    // The task polls every 5 ms: it stops within 100 ms of the limit.
    let worked = Duration::from_millis(out.worked_ms);
    assert!(
        worked + EARLY >= LIMIT && worked <= LIMIT + Duration::from_millis(100),
        "stopped after {worked:?}, limit {LIMIT:?}"
    );
    h.stop().await;
}

async fn hard_time_limit_aborts_the_attempt<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t0 = Instant::now();
    let handle = h
        .tasks()
        .delay::<Probe<2>>(ProbeArgs {
            sleep_ms: 5_000,
            ..ProbeArgs::default()
        })
        .await
        .expect("publish");
    match handle.get(WAIT).await {
        Err(ClientError::Failed { state, error, .. }) => {
            assert_eq!(state, TaskState::Failure);
            assert!(error.starts_with("time_limit: "), "{error}");
        }
        other => panic!("expected FAILURE, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let attempts = log.of(handle.id());
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].ended.is_none(), "the body ran to its end");
    h.stop().await;
}

async fn explicit_retry_waits_its_countdown<H: Harness>() {
    let (h, log) = start::<H>().await;
    let handle = h
        .tasks()
        .delay::<Probe<0>>(ProbeArgs {
            fail: 1,
            retry_in_ms: Some(250),
            ..ProbeArgs::default()
        })
        .await
        .expect("publish");
    assert_eq!(handle.get(WAIT).await.expect("result").attempt, 2);
    assert_eq!(handle.record().await.expect("record").retries, 1);
    let a = log.of(handle.id());
    let gap = a[1].started.duration_since(a[0].ended.expect("ended"));
    let countdown = Duration::from_millis(250);
    assert_within("explicit retry countdown", gap, countdown, countdown);
    h.stop().await;
}

async fn bad_arguments_fail_clearly<H: Harness>() {
    let (h, _) = start::<H>().await;
    let t = h.tasks();
    let expect_failure = |expected: &'static str| {
        move |r: Result<serde_json::Value, ClientError>| match r {
            Err(ClientError::Failed { state, error, .. }) => {
                assert_eq!(state, TaskState::Failure);
                assert!(error.starts_with(expected), "{error:?} !~ {expected:?}");
            }
            other => panic!("expected FAILURE {expected:?}, got {other:?}"),
        }
    };
    let wrong_type = t
        .send(
            "demo.add",
            json!({"x": "two", "y": 3}),
            PublishOptions::new(),
        )
        .await
        .expect("publish");
    expect_failure("bad_args: invalid type: string \"two\", expected i64")(
        wrong_type.get(WAIT).await,
    );
    let missing = t
        .send("demo.add", json!({"x": 1}), PublishOptions::new())
        .await
        .expect("publish");
    expect_failure("bad_args: missing field `y`")(missing.get(WAIT).await);
    let unknown = t
        .send("no.such.task", json!({}), PublishOptions::new())
        .await
        .expect("publish");
    expect_failure("unknown_task: no task named \"no.such.task\"")(unknown.get(WAIT).await);
    let out_of_range = t
        .delay::<Sleep>(SleepArgs { seconds: -1.0 })
        .await
        .expect("publish");
    assert!(matches!(
        out_of_range.get(WAIT).await,
        Err(ClientError::Failed { state: TaskState::Failure, error, .. }) if error.starts_with("bad_args: seconds")
    ));
    // Not an object: refused before publishing.
    assert!(matches!(
        t.send("demo.add", json!([2, 3]), PublishOptions::new())
            .await,
        Err(ClientError::Args(_))
    ));
    assert!(matches!(
        t.send("demo.add", json!({}), PublishOptions::new().queue("nope"))
            .await,
        Err(ClientError::UnknownQueue(_))
    ));
    h.stop().await;
}

async fn forget_drops_the_record<H: Harness>() {
    let (h, _) = start::<H>().await;
    let t = h.tasks();
    let mut handle = t
        .delay::<Add>(AddArgs { x: 1, y: 2 })
        .await
        .expect("publish");
    assert_eq!(handle.get(WAIT).await.expect("result"), 3);
    handle.forget().await.expect("forget");
    let rec = t.result(handle.id()).await.expect("result");
    assert_eq!(rec.state, TaskState::Pending);
    assert_eq!(rec.task, None);
    h.stop().await;
}

async fn ignore_result_keeps_no_success_record<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t = h.tasks();
    let handle = t
        .delay::<Probe<4>>(ProbeArgs::default())
        .await
        .expect("publish");
    until("the ignored task's attempt", || {
        log.of(handle.id()).iter().any(|a| a.ended.is_some())
    })
    .await;
    if H::WORKERS {
        assert!(matches!(
            handle.get(WAIT).await,
            Err(ClientError::ResultIgnored { .. })
        ));
        until("the success event", || {
            kinds(&h.events(), handle.id()).contains(&EventKind::TaskSucceeded)
        })
        .await;
    } else {
        // Eager: the handle holds the result, the store keeps nothing.
        assert_eq!(handle.get(WAIT).await.expect("result").attempt, 1);
    }
    assert_eq!(
        t.result(handle.id()).await.expect("result").state,
        TaskState::Pending
    );
    h.stop().await;
}

// Worker-only cases.

async fn warm_shutdown_finishes_in_flight<H: Harness>() {
    let (h, _) = start::<H>().await;
    let t = h.tasks();
    let handle = t
        .delay::<Sleep>(SleepArgs { seconds: 0.4 })
        .await
        .expect("publish");
    until_state(t, handle.id(), TaskState::Started).await;
    let t0 = Instant::now();
    assert_eq!(h.drain().await, Some(DrainOutcome::Finished));
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(handle.state().await.expect("state"), TaskState::Success);
    let slept = handle.get(WAIT).await.expect("result");
    assert!(slept >= 0.4 - 0.005, "slept {slept}");
    // A drained worker takes no new work.
    let after = t
        .delay::<Add>(AddArgs { x: 1, y: 1 })
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(after.state().await.expect("state"), TaskState::Pending);
    h.stop().await;
}

async fn cold_shutdown_aborts_after_drain_timeout<H: Harness>() {
    let log = Arc::new(ProbeLog::default());
    let s = TaskSettings {
        drain_timeout: Duration::from_millis(200),
        ..settings()
    };
    let h = H::start(s, registry(&log)).await;
    let t = h.tasks();
    // demo.sleep stops when its token fires; the probe ignores it and must be aborted.
    let polite = t
        .delay::<Sleep>(SleepArgs { seconds: 5.0 })
        .await
        .expect("publish");
    let stubborn = t
        .delay::<Probe<0>>(ProbeArgs {
            sleep_ms: 5_000,
            ..ProbeArgs::default()
        })
        .await
        .expect("publish");
    until_state(t, polite.id(), TaskState::Started).await;
    until_state(t, stubborn.id(), TaskState::Started).await;
    let t0 = Instant::now();
    assert_eq!(h.drain().await, Some(DrainOutcome::Aborted(1)));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The polite one returned what it slept when the token fired.
    let slept = polite.get(WAIT).await.expect("result");
    assert!(slept < 1.0, "slept {slept}");
    assert_eq!(stubborn.state().await.expect("state"), TaskState::Started);
    assert!(log.of(stubborn.id())[0].ended.is_none());
    h.stop().await;
}

async fn concurrency_and_queue_rate_limit<H: Harness>() {
    let (h, log) = start::<H>().await;
    let t = h.tasks();
    let mut handles = Vec::new();
    for _ in 0..5 {
        let args = ProbeArgs {
            sleep_ms: 100,
            ..ProbeArgs::default()
        };
        handles.push(
            t.apply_async::<Probe<0>>(args, PublishOptions::new().queue("pair"))
                .await
                .expect("publish"),
        );
    }
    for handle in &handles {
        handle.get(WAIT).await.expect("result");
    }
    assert_eq!(log.max_running(), 2, "queue `pair` has concurrency 2");

    // Queue `limited`: 10 starts/s.
    let mut limited = Vec::new();
    for _ in 0..4 {
        limited.push(
            t.apply_async::<Probe<0>>(ProbeArgs::default(), PublishOptions::new().queue("limited"))
                .await
                .expect("publish"),
        );
    }
    let mut starts = Vec::new();
    for handle in &limited {
        handle.get(WAIT).await.expect("result");
        starts.push(log.of(handle.id())[0].started);
    }
    starts.sort();
    assert_rate_limited(&starts, Duration::from_millis(100));
    h.stop().await;
}

/// SPEC.md "Trust boundaries": messages that never run (expired, unknown task, bad args)
/// reusing a finished task's id leave its record as it was.
async fn never_run_messages_leave_a_finished_record_alone<H: Harness>() {
    let (h, _) = start::<H>().await;
    let t = h.tasks();
    let id = new_task_id();
    let done = t
        .send(
            "demo.add",
            json!({"x": 2, "y": 3}),
            PublishOptions::new().task_id(&id),
        )
        .await
        .expect("publish");
    assert_eq!(done.get(WAIT).await.expect("result"), json!(5));
    let before = t.result(&id).await.expect("record");
    assert_eq!(before.state, TaskState::Success);
    // Each with its own `unique` key, so the queue does not drop it as a duplicate id.
    let reuse = |n: u32| {
        PublishOptions::new()
            .task_id(&id)
            .unique(format!("{id}-{n}"))
    };
    let past = Utc::now() - chrono::TimeDelta::seconds(5);
    for (n, (task, args, options)) in [
        ("demo.add", json!({"x": 1, "y": 1}), reuse(1).expires(past)),
        ("no.such.task", json!({}), reuse(2)),
        ("demo.add", json!({"x": "two"}), reuse(3)),
    ]
    .into_iter()
    .enumerate()
    {
        let sent = t.send(task, args, options).await;
        // Eager mode runs it inline: the handle's record is the store's, still SUCCESS.
        assert!(sent.is_ok(), "reuse {n}: {:?}", sent.err());
    }
    if H::WORKERS {
        until("the three reusing messages received", || {
            kinds(&h.events(), &id)
                .iter()
                .filter(|k| **k == EventKind::TaskReceived)
                .count()
                == 4
        })
        .await;
        // A task published after them has run; the runner settles a message in one pass.
        let later = t
            .delay::<Add>(AddArgs { x: 1, y: 1 })
            .await
            .expect("publish");
        later.get(WAIT).await.expect("result");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ev = h.events();
        assert!(
            !kinds(&ev, &id)
                .iter()
                .any(|k| matches!(k, EventKind::TaskRevoked | EventKind::TaskFailed)),
            "{:?}",
            kinds(&ev, &id)
        );
    }
    assert_eq!(t.result(&id).await.expect("record"), before);
    h.stop().await;
}

/// Out-of-range publish options are refused with an error, never a panic.
async fn out_of_range_options_are_refused<H: Harness>() {
    let (h, _) = start::<H>().await;
    let t = h.tasks();
    let add = || json!({"x": 1, "y": 2});
    for options in [
        PublishOptions::new().countdown(Duration::from_secs(10_000_000_000_000)),
        PublishOptions::new().countdown(Duration::MAX),
        PublishOptions::new().countdown(settings().max_eta + Duration::from_secs(60)),
        PublishOptions::new().eta(Utc::now() + chrono::TimeDelta::days(365)),
        PublishOptions::new().task_id("a*b"),
        PublishOptions::new().task_id("a b"),
        PublishOptions::new().task_id("x".repeat(129)),
        PublishOptions::new().task_id(""),
    ] {
        let what = format!("{options:?}");
        match t.send("demo.add", add(), options).await {
            Err(ClientError::Options(msg)) => assert!(!msg.is_empty()),
            other => panic!("{what}: expected an options error, got {other:?}"),
        }
    }
    // Within the limits it runs; a far expiry saturates.
    let ok = t
        .send(
            "demo.add",
            add(),
            PublishOptions::new()
                .task_id("Order_42-retry")
                .expires_in(Duration::MAX),
        )
        .await
        .expect("publish");
    assert_eq!(ok.get(WAIT).await.expect("result"), json!(3));
    h.stop().await;
}

macro_rules! behaviour_suite {
    ($module:ident, $harness:ty, [$($worker_case:ident),*]) => {
        mod $module {
            use super::*;
            behaviour_suite!(@cases $harness, [
                publish_succeeds,
                flaky_fails_twice_then_succeeds,
                exhausted_retries_fail,
                revoked_before_start_never_runs,
                expired_task_is_not_run,
                rate_limit_is_honoured,
                soft_time_limit_fires_the_token,
                hard_time_limit_aborts_the_attempt,
                explicit_retry_waits_its_countdown,
                bad_arguments_fail_clearly,
                forget_drops_the_record,
                ignore_result_keeps_no_success_record,
                revoked_and_expired_records_have_one_shape,
                a_retry_due_after_expiry_is_revoked,
                context_knows_eager_and_attempt,
                never_run_messages_leave_a_finished_record_alone,
                out_of_range_options_are_refused
                $(, $worker_case)*
            ]);
        }
    };
    (@cases $harness:ty, [$($case:ident),*]) => {
        $(
            #[actix_rt::test]
            async fn $case() {
                if let Some(service) = <$harness as Harness>::SERVICE {
                    if !common::service_available(service) {
                        return;
                    }
                }
                super::$case::<$harness>().await
            }
        )*
    };
}

behaviour_suite!(
    memory,
    MemoryHarness,
    [
        warm_shutdown_finishes_in_flight,
        cold_shutdown_aborts_after_drain_timeout,
        concurrency_and_queue_rate_limit
    ]
);
behaviour_suite!(eager, EagerHarness, []);
behaviour_suite!(
    nats,
    NatsHarness,
    [
        warm_shutdown_finishes_in_flight,
        cold_shutdown_aborts_after_drain_timeout,
        concurrency_and_queue_rate_limit
    ]
);

// ---------------------------------------------------------------------------------------------
// The memory broker's own cases: foreign messages.

mod memory_broker {
    use super::*;

    async fn raw(h: &MemoryHarness, payload: &[u8]) {
        h.broker
            .publish(Outgoing {
                id: new_task_id(),
                queue: "default".into(),
                payload: payload.to_vec(),
                dedupe_id: new_task_id(),
                not_before: None,
            })
            .await
            .expect("publish");
    }

    #[actix_rt::test]
    async fn foreign_messages_bad_json_and_bad_args_are_dead_lettered() {
        let (h, _) = start::<MemoryHarness>().await;
        raw(&h, b"{not json").await;
        let id = new_task_id();
        raw(
            &h,
            json!({"id": id, "task": "demo.add", "args": [1, 2]})
                .to_string()
                .as_bytes(),
        )
        .await;
        until("two dead letters", || h.broker.dead_letters().len() == 2).await;
        let mut reasons: Vec<_> = h
            .broker
            .dead_letters()
            .into_iter()
            .map(|d| d.reason)
            .collect();
        reasons.sort();
        assert_eq!(reasons, ["bad args", "bad message"]);
        let rec = h.tasks.result(&id).await.expect("result");
        assert_eq!(rec.state, TaskState::Failure);
        assert_eq!(
            rec.error.as_deref(),
            Some("bad_args: args must be a JSON object")
        );
        // Only `task` and `args`: the id is derived from the stream sequence.
        raw(&h, br#"{"task": "demo.add", "args": {"x": 2, "y": 3}}"#).await;
        until("the foreign task's success", || {
            h.events()
                .iter()
                .any(|e| e.kind == EventKind::TaskSucceeded && e.task == "demo.add")
        })
        .await;
        let done = h
            .events()
            .into_iter()
            .find(|e| e.kind == EventKind::TaskSucceeded)
            .expect("event");
        assert_eq!(
            h.tasks.result(&done.task_id).await.expect("result").result,
            json!(5)
        );
        h.stop().await;
    }

    #[actix_rt::test]
    async fn unique_publishes_are_deduplicated() {
        let (h, log) = start::<MemoryHarness>().await;
        let opts = || {
            PublishOptions::new()
                .unique("once")
                .countdown(Duration::from_millis(50))
        };
        let a = h
            .tasks
            .apply_async::<Probe<0>>(ProbeArgs::default(), opts())
            .await
            .expect("publish");
        let b = h
            .tasks
            .apply_async::<Probe<0>>(ProbeArgs::default(), opts())
            .await
            .expect("publish");
        assert_eq!(a.id(), b.id(), "the duplicate names the first task");
        a.get(WAIT).await.expect("result");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(log.all().len(), 1);
        // A key is a message header: a line break in it is refused, not a panic.
        for bad in ["a\nb", "", &"k".repeat(300)] {
            let err = h
                .tasks
                .apply_async::<Probe<0>>(ProbeArgs::default(), PublishOptions::new().unique(bad))
                .await
                .expect_err("refused");
            assert!(matches!(err, ClientError::Options(_)), "{err:?}");
        }
        h.stop().await;
    }

    #[actix_rt::test]
    async fn many_tasks_all_finish_once() {
        let (h, log) = start::<MemoryHarness>().await;
        let mut handles = Vec::new();
        for _ in 0..200 {
            handles.push(
                h.tasks
                    .delay::<Probe<0>>(ProbeArgs::default())
                    .await
                    .expect("publish"),
            );
        }
        for handle in &handles {
            assert_eq!(handle.get(WAIT).await.expect("result").attempt, 1);
        }
        let mut per_id: HashMap<String, usize> = HashMap::new();
        for a in log.all() {
            *per_id.entry(a.id).or_default() += 1;
        }
        assert_eq!(per_id.len(), 200);
        assert!(per_id.values().all(|n| *n == 1));
        h.stop().await;
    }
}
