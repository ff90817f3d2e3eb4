//! Load harness of the dashboard (docs/dashboard.md), against the local NATS server:
//!
//! 1. Task throughput (no-op tasks, a 64-wide worker pool publishing events to NATS, end to
//!    end: publish N, wait until all succeeded) with no dashboard, then with a `serve` node whose
//!    dashboard follows the events and 50 open `events` streams read continuously (by readers
//!    on a thread of their own, standing in for browsers) plus one overview page load a
//!    second, then with none again (the serve node stopped); the ratio (target >= 0.95). Then
//!    the CPU a task cost in the first phase without and in the phase with the dashboard,
//!    split into the worker and publishers, the readers, the serve node and the NATS server
//!    (from `/proc`, when the server runs on this machine): what the dashboard adds, and who
//!    pays it.
//! 2. Overview page latency with 100,000 finished tasks in the results store (and their events
//!    in the recent-tasks index): sequential GETs of the overview, the first task-list page and
//!    a filtered one, beside the shop's `/cart` page (a page that reads nothing) for scale.
//!
//! `cargo bench --bench dashboard_load` (env: `BENCH_TASKS`, default 10000; `BENCH_STREAMS`,
//! default 50; `BENCH_RECORDS`, default 100000; `BENCH_PAGES`, default 200;
//! `SWITCHYARD_NATS__URL`). Streams are created under a unique prefix and deleted at the end.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use support::env_num;
use switchyard::config::{Broker, Config};
use switchyard::tasks::{
    EventKind, QueueSpec, Registry, ResultRecord, ResultStore, Task, TaskContext, TaskError,
    TaskEvent, TaskSettings, Tasks,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONCURRENCY: usize = 64;
const PUBLISHERS: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Empty {}

struct Noop;

impl Task for Noop {
    const NAME: &'static str = "bench.noop";
    type Args = Empty;
    type Output = ();

    async fn run(&self, _ctx: TaskContext, _args: Empty) -> Result<(), TaskError> {
        Ok(())
    }
}

/// Publishes `n` no-op tasks and waits until `finished` grew by `n`; tasks/s.
async fn run_tasks(tasks: &Tasks, finished: &AtomicUsize, n: usize) -> f64 {
    let before = finished.load(Ordering::Relaxed);
    let start = Instant::now();
    let per = n.div_ceil(PUBLISHERS);
    let mut pubs = Vec::new();
    for p in 0..PUBLISHERS {
        let tasks = tasks.clone();
        let count = per.min(n.saturating_sub(p * per));
        pubs.push(tokio::spawn(async move {
            for _ in 0..count {
                tasks.delay::<Noop>(Empty {}).await.expect("publish");
            }
        }));
    }
    for p in pubs {
        let _ = p.await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while finished.load(Ordering::Relaxed) < before + n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (finished.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// A client logged in as alice (staff in config/default.toml).
async fn alice(base: &str) -> reqwest::Client {
    let c = client();
    let html = c
        .get(format!("{base}/login"))
        .send()
        .await
        .expect("login page")
        .text()
        .await
        .expect("body");
    let key = "name=\"csrfmiddlewaretoken\" value=\"";
    let start = html.find(key).expect("token") + key.len();
    let token = &html[start..start + html[start..].find('"').expect("end")];
    let res = c
        .post(format!("{base}/login"))
        .form(&[
            ("username", "alice"),
            ("password", "wonderland"),
            ("csrfmiddlewaretoken", token),
        ])
        .send()
        .await
        .expect("login");
    assert_eq!(res.status(), 303, "alice logs in");
    c
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Sequential GETs of `path`: p50, p99, max in ms.
async fn page_latency(c: &reqwest::Client, base: &str, path: &str, n: usize) -> (f64, f64, f64) {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let res = c.get(format!("{base}{path}")).send().await.expect("GET");
        assert_eq!(res.status(), 200, "{path}");
        let _ = res.bytes().await;
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    (pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0))
}

fn main() {
    let n = env_num("BENCH_TASKS", 10_000) as usize;
    let streams = env_num("BENCH_STREAMS", 50) as usize;
    let records = env_num("BENCH_RECORDS", 100_000) as usize;
    let pages = env_num("BENCH_PAGES", 200) as usize;
    let url = support::nats_url();
    let prefix = support::unique_prefix("benchdash");
    let system = actix_rt::System::new();
    system.block_on(async move {
        let client = async_nats::connect(&url).await.expect("nats");
        let settings = TaskSettings {
            node_id: "bench".into(),
            queues: vec![QueueSpec::new("default", CONCURRENCY)],
            ..TaskSettings::default()
        };
        let mut registry = Registry::new();
        registry.register(Noop);
        let counting =
            support::CountingPool::start(client.clone(), &prefix, settings, registry).await;
        let (broker, tasks, finished) = (
            counting.broker.clone(),
            counting.tasks.clone(),
            counting.finished.clone(),
        );
        // Warm-up (consumer, connections).
        run_tasks(&tasks, &finished, n / 10).await;

        // 1. Throughput without and with the dashboard and its streams.
        let meter = support::CpuMeter::start(&url);
        let none_1 = run_tasks(&tasks, &finished, n).await;
        let none_1_cpu = meter.per_message_us(n);
        let bench_threads: Vec<u32> = support::threads_cpu_ns().iter().map(|t| t.0).collect();
        let mut config = Config::load_with_env(
            Some(std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../config/default.toml"
            ))),
            &[],
        )
        .expect("config/default.toml");
        config.server.bind = "127.0.0.1:0".into();
        config.tasks.broker = Broker::Nats;
        config.nats.url = url.clone().into();
        config.nats.prefix = prefix.clone();
        config.log.level = "warn".into();
        let node = support::start_node(config.clone());
        let base = format!("http://{}", node.addr);
        let received = Arc::new(AtomicU64::new(0));
        // The readers stand in for browsers: on a thread of their own (as a browser is never
        // on the worker's runtime), still on this machine's two cores.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let readers = {
            let received = received.clone();
            let base = base.clone();
            std::thread::Builder::new()
                .name("bench-readers".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("readers' runtime");
                    rt.block_on(async move {
                        let mut readers = Vec::new();
                        for _ in 0..streams {
                            let c = alice(&base).await;
                            let received = received.clone();
                            let base = base.clone();
                            readers.push(tokio::spawn(async move {
                                let mut res = c
                                    .get(format!("{base}/_switchyard/events"))
                                    .send()
                                    .await
                                    .expect("events");
                                while let Ok(Some(chunk)) = res.chunk().await {
                                    received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                                }
                            }));
                        }
                        let _ = ready_tx.send(());
                        let _ = stop_rx.await;
                        for r in readers {
                            r.abort();
                        }
                    });
                })
                .expect("the readers' thread")
        };
        let _ = ready_rx.await;
        let dash = alice(&base).await;
        let overview = {
            let base = base.clone();
            tokio::spawn(async move {
                loop {
                    let _ = dash.get(format!("{base}/_switchyard/")).send().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (threads_0, meter) = (support::threads_cpu_ns(), support::CpuMeter::start(&url));
        let with = run_tasks(&tasks, &finished, n).await;
        let with_cpu = {
            // Per thread group: the worker and publishers (threads that ran before the node
            // started), the readers, the serve node (every thread it started).
            let mut groups = [0u64; 3];
            for (tid, name, ns) in support::threads_cpu_ns() {
                let before = threads_0.iter().find(|t| t.0 == tid).map_or(0, |t| t.2);
                let g = if bench_threads.contains(&tid) {
                    0
                } else if name == "bench-readers" {
                    1
                } else {
                    2
                };
                groups[g] += ns.saturating_sub(before);
            }
            (groups, meter.per_message_us(n).1)
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let bytes = received.load(Ordering::Relaxed);
        overview.abort();
        let _ = stop_tx.send(());
        let _ = readers.join();
        // "Without" means without: the serve node (its monitor follows every event) stops
        // before the second phase without a dashboard, and a fresh one serves part 2.
        node.stop();
        let none_2 = run_tasks(&tasks, &finished, n).await;
        let node = support::start_node(config);
        let base = format!("http://{}", node.addr);
        // Its monitor subscribes to the events as it starts; give that a moment before the
        // fill publishes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let none = (none_1 + none_2) / 2.0;
        println!(
            "dashboard::throughput  {n} no-op tasks: {none:.0} tasks/s without a dashboard \
             ({none_1:.0}, {none_2:.0}); {with:.0} tasks/s with one dashboard and {streams} event \
             streams ({:.1} MB streamed); ratio {:.3}",
            bytes as f64 / 1e6,
            with / none
        );
        let us = |ns: u64| ns as f64 / 1e3 / n as f64;
        println!(
            "dashboard::cpu  µs of CPU per task without a dashboard (first phase): this process \
             {:.1}, NATS server {:.1}; with it: worker and publishers {:.1}, the {streams} \
             readers {:.1}, the serve node {:.1}, NATS server {:.1}",
            none_1_cpu.0.unwrap_or(f64::NAN),
            none_1_cpu.1.unwrap_or(f64::NAN),
            us(with_cpu.0[0]),
            us(with_cpu.0[1]),
            us(with_cpu.0[2]),
            with_cpu.1.unwrap_or(f64::NAN)
        );

        // 2. The overview with `records` finished tasks in the results store and the index.
        let t = Instant::now();
        let mut writers = Vec::new();
        let per = records.div_ceil(64);
        for w in 0..64 {
            let broker = broker.clone();
            let nats = client.clone();
            let prefix = prefix.clone();
            let count = per.min(records.saturating_sub(w * per));
            writers.push(tokio::spawn(async move {
                for i in 0..count {
                    let id = format!("rec-{w}-{i}");
                    let now = chrono::Utc::now();
                    let rec = ResultRecord::started(&id, "bench.noop", 0, "bench", now)
                        .succeeded(serde_json::Value::Null, now);
                    broker.put_result(&rec).await.expect("put");
                    let event = TaskEvent {
                        kind: EventKind::TaskSucceeded,
                        task_id: id,
                        task: "bench.noop".into(),
                        queue: "default".into(),
                        node: "bench".into(),
                        state: switchyard::tasks::TaskState::Success,
                        at: now,
                        progress: None,
                        args: None,
                        retry_of: None,
                    };
                    let _ = nats
                        .publish(
                            format!("{prefix}.events.task-succeeded"),
                            serde_json::to_vec(&event).expect("json").into(),
                        )
                        .await;
                }
            }));
        }
        for w in writers {
            let _ = w.await;
        }
        let _ = client.flush().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "dashboard::fill  {records} SUCCESS records and events written in {:.1?}",
            t.elapsed()
        );
        let c = alice(&base).await;
        let indexed = c
            .get(format!("{base}/_switchyard/"))
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .unwrap_or_default();
        let count = indexed
            .split("<small>(")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap_or("?")
            .to_owned();
        for path in [
            "/cart",
            "/_switchyard/",
            "/_switchyard/tasks",
            "/_switchyard/tasks?id=rec-63-",
        ] {
            let (p50, p99, max) = page_latency(&c, &base, path, pages).await;
            println!(
                "dashboard::page  GET {path} with {records} finished tasks ({count} in the index), \
                 {pages} sequential: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
            );
        }

        node.stop();
        let js = broker.jetstream();
        let _ = js.delete_stream(&format!("KV_{prefix}_login")).await;
        counting.stop().await;
    });
}
