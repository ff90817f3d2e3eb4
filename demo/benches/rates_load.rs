//! What a cluster-wide rate limit costs when it does not bind: end-to-end no-op tasks/s on a
//! queue without a limit, on the same kind of queue with `rate_limit` far above the load
//! (1,000,000/s), and with that limit per `rate_key` value (100 distinct users), in one run
//! against the local NATS server, each measured `BENCH_ROUNDS` times in turn (results and
//! events on, one in-process worker pool, as `tasks_nats_load`).
//!
//! `cargo bench -p switchyard-demo --bench rates_load` (env: `BENCH_TASKS` per measurement,
//! default 5000; `BENCH_ROUNDS`, default 2; `SWITCHYARD_NATS__URL`). Streams and buckets are
//! created under a unique prefix and deleted at the end. Target: limited / unlimited >= 0.9.

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::tasks::{
    PublishOptions, QueueSpec, Registry, Task, TaskContext, TaskError, TaskSettings, Tasks,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The workers' concurrency, hence their fetch batch size.
const CONCURRENCY: usize = 64;
/// Publishes in flight at once.
const PUBLISHERS: usize = 64;
/// A limit far above what one machine runs.
const FAR_ABOVE: f64 = 1_000_000.0;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Args {
    user: u32,
}

struct Noop;

impl Task for Noop {
    const NAME: &'static str = "bench.noop";
    type Args = Args;
    type Output = ();

    async fn run(&self, _ctx: TaskContext, _args: Args) -> Result<(), TaskError> {
        Ok(())
    }
}

/// Publishes `n` tasks to `queue` from [`PUBLISHERS`] publishers and waits until all
/// succeeded; tasks/s from the first publish to the last success.
async fn measure(tasks: &Tasks, finished: &AtomicUsize, queue: &str, n: usize) -> f64 {
    let before = finished.load(Ordering::Relaxed);
    let start = Instant::now();
    let per = n.div_ceil(PUBLISHERS);
    let mut pubs = Vec::new();
    for p in 0..PUBLISHERS {
        let tasks = tasks.clone();
        let queue = queue.to_owned();
        let count = per.min(n.saturating_sub(p * per));
        pubs.push(tokio::spawn(async move {
            for i in 0..count {
                let args = Args {
                    user: ((p * per + i) % 100) as u32,
                };
                tasks
                    .apply_async::<Noop>(args, PublishOptions::new().queue(&queue))
                    .await
                    .expect("publish");
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
    let done = finished.load(Ordering::Relaxed) - before;
    let rate = done as f64 / start.elapsed().as_secs_f64();
    eprintln!("{queue}: {done} of {n} tasks, {rate:.0}/s");
    rate
}

fn main() {
    let n = support::env_num("BENCH_TASKS", 5_000) as usize;
    let rounds = support::env_num("BENCH_ROUNDS", 2).max(1);
    let url = support::nats_url();
    let prefix = support::unique_prefix("benchrate");
    let system = actix_rt::System::new();
    system.block_on(async move {
        let client = async_nats::connect(&url).await.expect("nats");
        let limited = |name: &str, key: Option<&str>| QueueSpec {
            name: name.into(),
            concurrency: CONCURRENCY,
            rate_limit_per_sec: Some(FAR_ABOVE),
            rate_key: key.map(str::to_owned),
        };
        let settings = TaskSettings {
            node_id: "bench".into(),
            queues: vec![
                QueueSpec::new("free", CONCURRENCY),
                limited("limited", None),
                limited("keyed", Some("user")),
            ],
            ..TaskSettings::default()
        };
        let mut registry = Registry::new();
        registry.register(Noop);
        let counting = support::CountingPool::start(client.clone(), &prefix, settings, registry).await;
        let (tasks, finished) = (counting.tasks.clone(), counting.finished.clone());

        // Warm-up, then the three queues in turn, `rounds` times.
        measure(&tasks, &finished, "free", n / 5).await;
        let mut rates: [Vec<f64>; 3] = Default::default();
        for _ in 0..rounds {
            for (i, q) in ["free", "limited", "keyed"].iter().enumerate() {
                rates[i].push(measure(&tasks, &finished, q, n).await);
            }
        }
        let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        let (free, limited, keyed) = (mean(&rates[0]), mean(&rates[1]), mean(&rates[2]));
        println!("rates::unlimited  {n} no-op tasks x {rounds}: {free:.0} tasks/s {:?}", rates[0]);
        println!(
            "rates::limited  rate_limit {FAR_ABOVE}/s: {limited:.0} tasks/s {:?}; ratio {:.2}",
            rates[1],
            limited / free
        );
        println!(
            "rates::keyed  rate_limit {FAR_ABOVE}/s per user, 100 users: {keyed:.0} tasks/s {:?}; ratio {:.2}",
            rates[2],
            keyed / free
        );

        counting.stop().await;
    });
}
