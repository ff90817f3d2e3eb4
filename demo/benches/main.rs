//! Criterion benchmarks, one module per area; groups are named `area::what`.
//!
//! `cargo bench --bench main`

use criterion::{criterion_group, criterion_main, Criterion};

mod templates {
    use super::*;
    use switchyard::http::templates::Templates;

    pub fn bench(c: &mut Criterion) {
        let t = Templates::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../templates"), false)
            .expect("templates");
        let products: Vec<_> = switchyard_demo::PRODUCTS
            .iter()
            .map(|p| serde_json::json!({"id": p.id, "name": p.name, "description": p.description, "price": "1.00"}))
            .collect();
        let ctx = serde_json::json!({"products": products, "static_url": "/static/"});
        c.bench_function("templates::render_index", |b| {
            b.iter(|| t.render("shop/index", &ctx).expect("render"))
        });
    }
}

mod tasks {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use criterion::{black_box, Throughput};
    use switchyard::tasks::{
        EventKind, EventSink, MemoryBroker, Registry, Task, TaskContext, TaskError, TaskEvent,
        TaskSettings, Tasks, WorkerPool,
    };
    use switchyard_demo::tasks::{Add, AddArgs};

    /// Tasks per end-to-end round.
    const ROUND: u64 = 2_000;
    /// The longest one round may take before the bench gives up.
    const ROUND_LIMIT: Duration = Duration::from_secs(60);

    struct Noop;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct NoArgs {}

    impl Task for Noop {
        const NAME: &'static str = "bench.noop";
        type Args = NoArgs;
        type Output = ();

        async fn run(&self, _ctx: TaskContext, _args: NoArgs) -> Result<(), TaskError> {
            Ok(())
        }
    }

    fn registry() -> Arc<Registry> {
        let mut r = Registry::new();
        r.register(Add).register(Noop);
        Arc::new(r)
    }

    /// CPU time this thread used so far.
    fn thread_cpu() -> Duration {
        use nix::time::{clock_gettime, ClockId};
        clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
            .map(Duration::from)
            .unwrap_or_default()
    }

    pub fn bench(c: &mut Criterion) {
        // One eager call: envelope to JSON and back, the body, the record to JSON and back.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let eager = Tasks::eager(registry(), TaskSettings::default());
        c.bench_function("tasks::eager_call", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        let h = eager
                            .delay::<Add>(AddArgs { x: 2, y: 3 })
                            .await
                            .expect("publish");
                        black_box(h.get(Duration::ZERO).await.expect("result"));
                    }
                    t0.elapsed()
                })
            })
        });

        // The same, counting only this thread's CPU time (the eager call runs entirely on it):
        // the cost without the other processes of a shared machine.
        c.bench_function("tasks::eager_call_cpu", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t0 = thread_cpu();
                    for _ in 0..iters {
                        let h = eager
                            .delay::<Add>(AddArgs { x: 2, y: 3 })
                            .await
                            .expect("publish");
                        black_box(h.get(Duration::ZERO).await.expect("result"));
                    }
                    thread_cpu().saturating_sub(t0)
                })
            })
        });

        // The memory broker end to end: publish ROUND no-op tasks, wait until every one
        // succeeded on the in-process workers (default queue: concurrency 8).
        let mut group = c.benchmark_group("tasks::memory");
        group.throughput(Throughput::Elements(ROUND));
        group.sample_size(10);
        group.bench_function("end_to_end_noop", |b| {
            b.iter_custom(|iters| {
                let sys = actix_rt::System::new();
                sys.block_on(async {
                    let settings = TaskSettings::default();
                    let broker = Arc::new(MemoryBroker::new(&settings));
                    let done = Arc::new(AtomicU64::new(0));
                    let sink: EventSink = {
                        let done = done.clone();
                        Arc::new(move |e: &TaskEvent| {
                            if e.kind == EventKind::TaskSucceeded {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    };
                    let arbiter = actix_rt::Arbiter::new();
                    let pool = WorkerPool::start(
                        settings.clone(),
                        None,
                        broker.clone(),
                        registry(),
                        Some(sink),
                        &arbiter.handle(),
                    )
                    .expect("pool");
                    let client = Tasks::new(broker, registry(), settings);
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        let target = (i + 1) * ROUND;
                        let t0 = Instant::now();
                        for _ in 0..ROUND {
                            client.delay::<Noop>(NoArgs {}).await.expect("publish");
                        }
                        while done.load(Ordering::Relaxed) < target {
                            assert!(t0.elapsed() < ROUND_LIMIT, "round did not finish");
                            tokio::time::sleep(Duration::from_micros(200)).await;
                        }
                        total += t0.elapsed();
                    }
                    pool.drain().await;
                    arbiter.stop();
                    total
                })
            })
        });
        group.finish();
    }
}

mod dashboard {
    use super::*;
    use std::time::Duration;

    use criterion::Throughput;
    use switchyard::dashboard::Monitor;
    use switchyard::tasks::{EventKind, TaskEvent, TaskState};

    /// What a serve node's monitor does with the task events from NATS (parse each, index
    /// it, make its frame and batch it for the open streams): one iteration is the three
    /// events of a task, with one stream open; a fresh monitor every 30,000 tasks, so the index
    /// grows as in the load harness.
    pub fn bench(c: &mut Criterion) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        const TASKS: usize = 30_000;
        let payloads: Vec<[Vec<u8>; 3]> = (0..TASKS)
            .map(|i| {
                [
                    (EventKind::TaskReceived, TaskState::Pending),
                    (EventKind::TaskStarted, TaskState::Started),
                    (EventKind::TaskSucceeded, TaskState::Success),
                ]
                .map(|(kind, state)| {
                    serde_json::to_vec(&TaskEvent {
                        kind,
                        task_id: format!("01a23183-d697-7c2d-8d01-{i:012x}"),
                        task: "bench.noop".into(),
                        queue: "default".into(),
                        node: "bench".into(),
                        state,
                        at: chrono::Utc::now(),
                        progress: None,
                        args: None,
                        retry_of: None,
                    })
                    .expect("json")
                })
            })
            .collect();
        let mut group = c.benchmark_group("dashboard");
        group.throughput(Throughput::Elements(1));
        group.bench_function("monitor_task_events", |b| {
            let mut monitor = Monitor::new(Duration::from_secs(5));
            let mut rx = monitor.subscribe();
            let mut i = 0;
            b.iter(|| {
                if i == TASKS {
                    i = 0;
                    monitor = Monitor::new(Duration::from_secs(5));
                    rx = monitor.subscribe();
                }
                for p in &payloads[i] {
                    let e: TaskEvent = serde_json::from_slice(p).expect("event");
                    monitor.observe(&e);
                }
                i += 1;
                while rx.try_recv().is_ok() {}
            })
        });
        group.finish();
    }
}

criterion_group!(benches, templates::bench, tasks::bench, dashboard::bench);
criterion_main!(benches);
