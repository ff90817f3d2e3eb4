//! The task commands of `tasks.broker = "nats"`: `worker`, `publish`, `result`, `revoke`,
//! `purge`, `dead list`, `dead replay` and `cluster status`, with SPEC.md's output (stdout: results only) and
//! exit codes (2 bad usage, 1 runtime failure).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use switchyard_actors::tasks::{
    CancellationToken, NatsBeatStore, NatsBroker, Opening, PublishOptions, Registry, Scheduler,
    TaskSettings, TaskState, Tasks, WorkerPool,
};

use crate::cluster::{self, Presence, Refresh, Role};
use crate::config::Config;
use crate::engines;
use crate::http::metrics::{task_events, Metrics};

/// Exit code for bad usage.
const EXIT_USAGE: u8 = 2;
/// Exit code for a runtime failure.
const EXIT_FAILURE: u8 = 1;
/// Pause between result polls of `publish --wait`.
const WAIT_POLL: Duration = Duration::from_millis(20);
/// How long a stopping node waits for its scheduler's in-flight releases.
const SCHEDULER_STOP: Duration = Duration::from_secs(5);
/// Most dead letters `dead list` and `dead replay --all` look at.
const DEAD_LIMIT: usize = 100_000;

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILURE)
}

/// The broker for a command: `publish` and `result` open it as a client, the administrative
/// commands as an admin, `worker` and `beat` as a node (docs/security.md: what each may do).
async fn open(
    config: &Config,
    settings: &TaskSettings,
    opening: Opening,
) -> Result<NatsBroker, ExitCode> {
    engines::nats_broker(&engines::Services::new(config), settings, opening)
        .await
        .map_err(failure)
}

/// What `switchyard publish` was asked.
pub(crate) struct PublishRequest {
    pub(crate) task: String,
    pub(crate) args: Option<String>,
    pub(crate) queue: Option<String>,
    pub(crate) unique: Option<String>,
    pub(crate) countdown: Option<f64>,
    pub(crate) eta: Option<String>,
    pub(crate) wait: Option<f64>,
}

/// `switchyard publish`: the id, or with `--wait` the final record (exit 1 unless SUCCESS).
pub(crate) async fn publish(registry: Registry, config: Config, req: PublishRequest) -> ExitCode {
    let args: Value = match req.args.as_deref().map(serde_json::from_str).transpose() {
        Ok(v) => v.unwrap_or_else(|| Value::Object(Default::default())),
        Err(e) => return usage(format!("ARGS_JSON is not JSON: {e}")),
    };
    if !args.is_object() {
        return usage("ARGS_JSON must be a JSON object");
    }
    let mut options = PublishOptions::new();
    if let Some(q) = req.queue {
        options = options.queue(q);
    }
    if let Some(k) = req.unique {
        options = options.unique(k);
    }
    if let Some(c) = req.countdown {
        match Duration::try_from_secs_f64(c) {
            Ok(d) => options = options.countdown(d),
            Err(_) => return usage(format!("--countdown {c}: expected seconds from 0")),
        }
    }
    if let Some(eta) = req.eta {
        match DateTime::parse_from_rfc3339(&eta) {
            Ok(t) => options = options.eta(t.with_timezone(&Utc)),
            Err(e) => return usage(format!("--eta {eta:?}: expected RFC 3339: {e}")),
        }
    }
    let wait = match req.wait.map(Duration::try_from_secs_f64).transpose() {
        Ok(w) => w,
        Err(_) => return usage("--wait: expected seconds >= 0"),
    };
    let settings = crate::tasks::settings(&config);
    let broker = match open(&config, &settings, Opening::Client).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let tasks = Tasks::new(Arc::new(broker), Arc::new(registry), settings);
    let handle = match tasks.send(&req.task, args, options).await {
        Ok(h) => h,
        Err(e @ switchyard_actors::tasks::ClientError::UnknownQueue(_)) => return usage(e),
        Err(e @ switchyard_actors::tasks::ClientError::Args(_)) => return usage(e),
        Err(e @ switchyard_actors::tasks::ClientError::Options(_)) => return usage(e),
        Err(e) => return failure(e),
    };
    let Some(wait) = wait else {
        println!("{}", handle.id());
        return ExitCode::SUCCESS;
    };
    // A wait too long for the clock waits as long as it takes.
    let deadline = Instant::now().checked_add(wait);
    loop {
        let rec = match tasks.result(handle.id()).await {
            Ok(r) => r,
            Err(e) => return failure(e),
        };
        if rec.state.is_ready() || deadline.is_some_and(|d| Instant::now() >= d) {
            println!("{}", rec.to_json_line());
            return if rec.state == TaskState::Success {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            };
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// `result`, `revoke`, `purge`.
pub(crate) enum Simple {
    Result(String),
    Revoke(String),
    Purge(String),
}

pub(crate) async fn simple(config: Config, cmd: Simple) -> ExitCode {
    let settings = crate::tasks::settings(&config);
    let opening = match cmd {
        Simple::Result(_) => Opening::Client,
        Simple::Revoke(_) | Simple::Purge(_) => Opening::Admin,
    };
    let broker = match open(&config, &settings, opening).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let tasks = Tasks::new(Arc::new(broker), Arc::new(Registry::new()), settings);
    match cmd {
        Simple::Result(id) => match tasks.result(&id).await {
            Ok(rec) => println!("{}", rec.to_json_line()),
            Err(e) => return failure(e),
        },
        Simple::Revoke(id) => match tasks.revoke(&id).await {
            Ok(done) => println!("{{\"revoked\":{}}}", u8::from(done)),
            Err(e) => return failure(e),
        },
        Simple::Purge(queue) => match tasks.purge(&queue).await {
            Ok(n) => println!("{{\"purged\":{n}}}"),
            Err(e) => return failure(e),
        },
    }
    ExitCode::SUCCESS
}

/// `dead list [QUEUE]`: one JSON line per letter.
pub(crate) async fn dead_list(config: Config, queue: Option<String>) -> ExitCode {
    let settings = crate::tasks::settings(&config);
    let broker = match open(&config, &settings, Opening::Admin).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    match broker.dead_letters(queue.as_deref(), DEAD_LIMIT).await {
        Ok(letters) => {
            for l in letters {
                match serde_json::to_string(&l) {
                    Ok(line) => println!("{line}"),
                    Err(e) => return failure(e),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => failure(e),
    }
}

/// `dead replay ID|--all [QUEUE]`: ID is a task id or a dead-letter sequence number.
pub(crate) async fn dead_replay(
    config: Config,
    id: Option<String>,
    all: bool,
    queue: Option<String>,
) -> ExitCode {
    // `dead replay --all QUEUE` parses QUEUE as the id position.
    let (id, queue) = if all {
        (None, queue.or(id))
    } else {
        (id, queue)
    };
    if id.is_none() && !all {
        return usage("dead replay needs an ID or --all");
    }
    let settings = crate::tasks::settings(&config);
    let broker = match open(&config, &settings, Opening::Admin).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let letters = match broker.dead_letters(queue.as_deref(), DEAD_LIMIT).await {
        Ok(l) => l,
        Err(e) => return failure(e),
    };
    let chosen: Vec<_> = letters
        .into_iter()
        .filter(|l| match &id {
            None => true,
            Some(id) => l.id.as_deref() == Some(id.as_str()) || l.seq.to_string() == *id,
        })
        .collect();
    if chosen.is_empty() {
        if let Some(id) = id {
            return failure(format!("no dead letter {id}"));
        }
    }
    // One bad letter does not stop `--all`: it is reported and skipped, and the exit code says
    // some were left.
    let mut skipped = 0;
    for letter in &chosen {
        match broker.replay(letter).await {
            Ok(id) => println!("{id}"),
            Err(e) if all => {
                eprintln!("dead letter {} skipped: {e}", letter.seq);
                skipped += 1;
            }
            Err(e) => return failure(e),
        }
    }
    if skipped > 0 {
        return failure(format!("{skipped} dead letter(s) not replayed"));
    }
    ExitCode::SUCCESS
}

/// `switchyard worker`: consumes the queues until SIGTERM/SIGINT, then drains (a second signal
/// makes the drain cold).
pub(crate) fn worker(
    config: Config,
    registry: Registry,
    queues: Vec<String>,
    concurrency: Option<u32>,
) -> ExitCode {
    let mut settings = crate::tasks::settings(&config);
    for q in &queues {
        if settings.queue(q).is_none() {
            return usage(format!(
                "--queues: {q:?} is not a queue of [[tasks.queues]]"
            ));
        }
    }
    if let Some(n) = concurrency {
        for q in &mut settings.queues {
            q.concurrency = n.max(1) as usize;
        }
    }
    let registry = Arc::new(registry);
    let system = actix_rt::System::new();
    system.block_on(async move {
        let broker = match open(&config, &settings, Opening::Node).await {
            Ok(b) => Arc::new(b),
            Err(code) => return code,
        };
        let metrics = actix_web::web::Data::new(Metrics::new());
        for name in registry.names() {
            metrics.task_registered(name);
        }
        let sink = broker.event_sink(Some(task_events(metrics.clone())));
        let arbiter = actix_rt::Arbiter::new();
        let queues = (!queues.is_empty()).then_some(queues);
        let pool = match WorkerPool::start(
            settings.clone(),
            queues.as_deref(),
            broker.clone(),
            registry.clone(),
            Some(sink),
            &arbiter.handle(),
        ) {
            Ok(p) => p,
            Err(e) => return failure(format!("cannot start the task runtime: {e}")),
        };
        let served: Vec<String> = match &queues {
            Some(q) => q.clone(),
            None => settings.queues.iter().map(|q| q.name.clone()).collect(),
        };
        // The scheduler releases this node's queues' scheduled tasks when due.
        let stop = CancellationToken::new();
        let scheduler = Scheduler::new((*broker).clone(), served.clone());
        let scheduler = actix_rt::spawn(scheduler.run(stop.clone()));
        if config.tasks.outbox == crate::config::Outbox::Postgres {
            match engines::Services::new(&config).postgres().await {
                Ok(pool) => crate::outbox::spawn_relay(pool, broker.clone(), stop.clone()),
                Err(e) => return failure(e),
            }
        }
        let in_flight = pool.in_flight_reader();
        let heartbeat = cluster::heartbeat(&config, broker.client().clone(), Role::Worker)
            .queues(served.clone())
            .in_flight(in_flight.clone());
        let refresh = worker_refresh(broker.clone(), served.clone(), metrics.clone(), in_flight);
        let presence = match Presence::start(&config, heartbeat, metrics, refresh) {
            Ok(p) => p,
            Err(e) => return failure(e),
        };
        tracing::info!(
            node = %settings.node_id,
            queues = %served.join(","),
            tasks = %registry.names().join(", "),
            "worker ready"
        );
        let Some(mut signals) = Signals::new() else {
            return failure("cannot listen for signals");
        };
        signals.next().await;
        stop.cancel();
        tracing::info!("stopping: draining in-flight tasks");
        let cold = pool.cold_token();
        actix_rt::spawn(async move {
            signals.next().await;
            tracing::warn!("second signal: cold shutdown");
            cold.cancel();
        });
        let outcome = pool.drain().await;
        let _ = tokio::time::timeout(SCHEDULER_STOP, scheduler).await;
        drop(presence);
        tracing::info!(?outcome, "worker stopped");
        arbiter.stop();
        ExitCode::SUCCESS
    })
}

/// SIGTERM and SIGINT, as a node waits for them.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Option<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok()?;
        let int = signal(SignalKind::interrupt()).ok()?;
        Some(Self { term, int })
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// `switchyard scheduled list [--queue Q]`: one JSON line per task waiting for its eta.
pub(crate) async fn scheduled_list(config: Config, queue: Option<String>) -> ExitCode {
    let settings = crate::tasks::settings(&config);
    if let Some(q) = queue.as_deref().filter(|q| settings.queue(q).is_none()) {
        return usage(format!("--queue: {q:?} is not a queue of [[tasks.queues]]"));
    }
    let broker = match open(&config, &settings, Opening::Admin).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    match broker.scheduled(queue.as_deref()).await {
        Ok(tasks) => {
            for t in tasks {
                let eta = t.eta.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let line =
                    serde_json::json!({"id": t.id, "task": t.task, "queue": t.queue, "eta": eta});
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => failure(e),
    }
}

/// `switchyard beat`: fires the schedules while it leads (any number run; one leads) and
/// releases scheduled tasks of every queue, until SIGTERM/SIGINT; then gives the lease up.
pub(crate) fn beat(config: Config, registry: Registry) -> ExitCode {
    let entries = match crate::beat::entries(&config) {
        Ok(e) => e,
        Err(e) => return usage(e),
    };
    let settings = crate::tasks::settings(&config);
    let system = actix_rt::System::new();
    system.block_on(async move {
        let broker = match open(&config, &settings, Opening::Node).await {
            Ok(b) => b,
            Err(code) => return code,
        };
        let store = match NatsBeatStore::open(&broker, &settings.node_id).await {
            Ok(s) => Arc::new(s),
            Err(e) => return failure(e),
        };
        let queues = settings.queues.iter().map(|q| q.name.clone()).collect();
        let tasks = Tasks::new(
            Arc::new(broker.clone()),
            Arc::new(registry),
            settings.clone(),
        );
        let stop = CancellationToken::new();
        let beat = crate::beat::beat(&config, entries, store, tasks);
        let beat = actix_rt::spawn(beat.run(stop.clone()));
        // In the cluster view as `beat`, with the queues it schedules for; its /metrics shows
        // their depths.
        let queues: Vec<String> = queues;
        let metrics = actix_web::web::Data::new(Metrics::new());
        let idle: cluster::InFlight = Arc::new(|| 0);
        let heartbeat =
            cluster::heartbeat(&config, broker.client().clone(), Role::Beat).queues(queues.clone());
        let broker = Arc::new(broker);
        let refresh = worker_refresh(broker.clone(), queues.clone(), metrics.clone(), idle);
        let presence = match Presence::start(&config, heartbeat, metrics, refresh) {
            Ok(p) => p,
            Err(e) => return failure(e),
        };
        let scheduler = Scheduler::new((*broker).clone(), queues);
        let scheduler = actix_rt::spawn(scheduler.run(stop.clone()));
        tracing::info!(node = %settings.node_id, "beat ready");
        let Some(mut signals) = Signals::new() else {
            return failure("cannot listen for signals");
        };
        signals.next().await;
        stop.cancel();
        let _ = tokio::time::timeout(SCHEDULER_STOP, beat).await;
        let _ = tokio::time::timeout(SCHEDULER_STOP, scheduler).await;
        drop(presence);
        tracing::info!("beat stopped");
        ExitCode::SUCCESS
    })
}
/// A worker node's metrics before a scrape: each served queue's backlog (from its consumer;
/// a queue NATS does not answer for keeps its last value) and the tasks in flight.
fn worker_refresh(
    broker: Arc<NatsBroker>,
    queues: Vec<String>,
    metrics: actix_web::web::Data<Metrics>,
    in_flight: cluster::InFlight,
) -> Refresh {
    Arc::new(move || {
        let (broker, queues, metrics) = (broker.clone(), queues.clone(), metrics.clone());
        metrics.tasks_in_flight(in_flight());
        Box::pin(async move {
            for queue in &queues {
                match broker.backlog(queue).await {
                    Ok((waiting, unacked)) => metrics.queue_backlog(queue, waiting, unacked),
                    Err(e) => tracing::debug!(%queue, "metrics: {e}"),
                }
            }
        })
    })
}

/// `cluster status [--json]`: listens to the heartbeats for one interval and a margin, then
/// prints the live nodes (a table, or one JSON line per node).
pub(crate) async fn cluster_status(config: Config, json: bool) -> ExitCode {
    let link = match engines::Services::new(&config).nats().await {
        Ok(link) => link,
        Err(e) => return failure(e),
    };
    let interval = cluster::interval(&config);
    let listen = switchyard_actors::cluster::listen_time(interval);
    let gathered =
        switchyard_actors::cluster::gather(&link.client, &config.nats.prefix, interval, listen);
    let nodes = match gathered.await {
        Ok(nodes) => nodes,
        Err(e) => return failure(format!("nats.url: {e}")),
    };
    if json {
        for node in &nodes {
            match serde_json::to_string(node) {
                Ok(line) => println!("{line}"),
                Err(e) => return failure(e),
            }
        }
    } else {
        print!("{}", cluster::table(&nodes));
    }
    if nodes.is_empty() {
        eprintln!("no live nodes under nats.prefix = {:?}", config.nats.prefix);
    }
    ExitCode::SUCCESS
}
