//! Load harness for the NATS broker, in one run against the local server: end-to-end no-op
//! tasks/s (publish N, wait until all complete; results and events on) against two raw
//! async-nats loops fetching with the same batch size as the workers: publish + pull + ack,
//! and the same with the claim and result writes per message (a key-value create and an
//! update, as many at once as the workers' slots); then
//! publish-to-start latency at a steady rate after a warm-up (stamped at publish, read at the
//! first line of the task body). Each throughput line also gives the CPU a message cost this
//! process and the NATS server (when it runs on this machine and `/proc` shows it), and what
//! the connection sent and received per message: the server's share bounds how close any
//! client can come to the raw loop.
//!
//! `cargo bench --bench tasks_nats_load` (env: `BENCH_TASKS`, default 20000; `BENCH_RATE`,
//! default 1000/s; `BENCH_LATENCY_TASKS`, default 10000; `BENCH_WARMUP_SECONDS`, default 2;
//! `BENCH_NATS_EVENTS=0` to keep the task events off NATS; `SWITCHYARD_NATS__URL`). Streams
//! are created under a unique prefix and deleted at the end.

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchyard::tasks::{QueueSpec, Registry, Task, TaskContext, TaskError, TaskSettings};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The workers' concurrency, hence their fetch batch size.
const CONCURRENCY: usize = 64;
/// Publishes in flight at once.
const PUBLISHERS: usize = 64;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stamp {
    /// Unix nanoseconds at publish (0: not measured).
    t: u64,
}

/// A no-op task that records publish-to-start latency.
struct Noop(Arc<Mutex<Vec<u64>>>);

impl Task for Noop {
    const NAME: &'static str = "bench.noop";
    type Args = Stamp;
    type Output = ();

    async fn run(&self, _ctx: TaskContext, args: Stamp) -> Result<(), TaskError> {
        if args.t > 0 {
            let lat = now_ns().saturating_sub(args.t);
            if let Ok(mut l) = self.0.lock() {
                l.push(lat);
            }
        }
        Ok(())
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

/// Raw JetStream: publish `n` (pipelined), pull with batch `CONCURRENCY`, ack each.
/// Unacknowledged publishes the raw baseline keeps in flight.
const PUBLISH_WINDOW: usize = 1_000;

/// A work-queue stream `name` on `subject` and its durable consumer, for the raw loops.
async fn raw_queue(js: &jetstream::Context, name: &str, subject: &str) -> consumer::PullConsumer {
    let s = js
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("raw stream");
    s.create_consumer(consumer::pull::Config {
        durable_name: Some("raw".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        max_ack_pending: 100_000,
        ..Default::default()
    })
    .await
    .expect("raw consumer")
}

/// Publishes `n` messages (`payload(i)`) to `subject` in the background, with a window of
/// acks awaited as they come: async-nats holds at most 5,000 unacknowledged publishes and
/// then waits, so collecting every ack before awaiting any would stall past 5,000 tasks.
fn raw_publisher(
    js: &jetstream::Context,
    subject: &str,
    n: usize,
    payload: impl Fn(usize) -> bytes::Bytes + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let js = js.clone();
    let subject = subject.to_owned();
    tokio::spawn(async move {
        let mut acks = std::collections::VecDeque::with_capacity(PUBLISH_WINDOW);
        for i in 0..n {
            if acks.len() >= PUBLISH_WINDOW {
                if let Some(ack) = acks.pop_front() {
                    let ack: jetstream::context::PublishAckFuture = ack;
                    ack.await.expect("ack");
                }
            }
            acks.push_back(
                js.publish(subject.clone(), payload(i))
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    })
}

/// Messages/s and the CPU they cost ([`support::CpuMeter::summary`]).
async fn raw_baseline(
    client: async_nats::Client,
    url: &str,
    prefix: &str,
    n: usize,
) -> (f64, String) {
    let js = jetstream::new(client);
    let name = format!("{}_RAW", prefix.to_uppercase());
    let subject = format!("{prefix}.raw.q");
    let c = raw_queue(&js, &name, &subject).await;
    let payload = bytes::Bytes::from_static(br#"{"task":"bench.noop","args":{"t":0}}"#);
    let meter = support::CpuMeter::start(url).counting(&js.client());
    let start = Instant::now();
    let publisher = raw_publisher(&js, &subject, n, move |_| payload.clone());
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while done < n && Instant::now() < deadline {
        // Never more than are left: a last request for a full batch would wait out its
        // expiry (500 ms) for messages that never come.
        let mut batch = c
            .batch()
            .max_messages(CONCURRENCY.min(n - done))
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .expect("batch");
        while let Some(Ok(m)) = batch.next().await {
            m.ack().await.expect("ack");
            done += 1;
        }
    }
    let _ = publisher.await;
    let rate = done as f64 / start.elapsed().as_secs_f64();
    let cpu = meter.summary(done);
    let _ = js.delete_stream(&name).await;
    (rate, cpu)
}

/// Raw JetStream with the records a queue with a revocable claim and a stored result writes:
/// publish `n`, pull with batch `CONCURRENCY`, and per message (up to `CONCURRENCY` at once) a
/// key-value create (the claim), a put (the result), then the ack. The floor of what any
/// design with those guarantees does on NATS 2.9, without Switchyard. Messages/s and their CPU.
async fn raw_with_records(
    client: async_nats::Client,
    url: &str,
    prefix: &str,
    n: usize,
) -> (f64, String) {
    let js = jetstream::new(client);
    let name = format!("{}_RAWREC", prefix.to_uppercase());
    let subject = format!("{prefix}.rawrec.q");
    let bucket = format!("{prefix}_rawrec");
    let c = raw_queue(&js, &name, &subject).await;
    js.create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("raw bucket");
    let kv = js.get_key_value(&bucket).await.expect("raw bucket");
    let meter = support::CpuMeter::start(url).counting(&js.client());
    let start = Instant::now();
    let publisher = raw_publisher(&js, &subject, n, |i| {
        format!(r#"{{"id":"t{i}","task":"bench.noop","args":{{"t":0}}}}"#).into()
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut taken = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while taken < n && Instant::now() < deadline {
        let mut batch = c
            .batch()
            .max_messages(CONCURRENCY.min(n - taken))
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .expect("batch");
        while let Some(Ok(m)) = batch.next().await {
            taken += 1;
            let permit = slots.clone().acquire_owned().await.expect("slot");
            let (kv, done) = (kv.clone(), done.clone());
            tokio::spawn(async move {
                let id = format!("r{}", m.info().map(|i| i.stream_sequence).unwrap_or(0));
                let started = format!(r#"{{"id":"{id}","state":"STARTED"}}"#);
                let rev = kv.create(&id, started.into()).await.expect("claim");
                let finished = format!(r#"{{"id":"{id}","state":"SUCCESS","result":null}}"#);
                kv.update(&id, finished.into(), rev).await.expect("result");
                m.ack().await.expect("ack");
                done.fetch_add(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }
    while done.load(Ordering::Relaxed) < taken && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = publisher.await;
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let cpu = meter.summary(done.load(Ordering::Relaxed));
    let _ = js.delete_stream(&name).await;
    let _ = js.delete_stream(format!("KV_{bucket}")).await;
    (rate, cpu)
}

fn main() {
    let n = support::env_num("BENCH_TASKS", 20_000) as usize;
    let rate = support::env_num("BENCH_RATE", 1_000);
    let lat_n = support::env_num("BENCH_LATENCY_TASKS", 10_000) as usize;
    let warmup = Duration::from_secs(support::env_num("BENCH_WARMUP_SECONDS", 2));
    let url = support::nats_url();
    let prefix = support::unique_prefix("bench");
    let system = actix_rt::System::new();
    system.block_on(async move {
        let client = async_nats::connect(&url).await.expect("nats");
        let (raw, raw_cpu) = raw_baseline(client.clone(), &url, &prefix, n).await;
        let (raw_records, raw_records_cpu) =
            raw_with_records(client.clone(), &url, &prefix, n).await;

        let settings = TaskSettings {
            node_id: "bench".into(),
            queues: vec![QueueSpec::new("default", CONCURRENCY)],
            ..TaskSettings::default()
        };
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let mut registry = Registry::new();
        registry.register(Noop(latencies.clone()));
        let counting = support::CountingPool::start(client.clone(), &prefix, settings, registry).await;
        let (tasks, finished) = (counting.tasks.clone(), counting.finished.clone());

        // Throughput: N published by PUBLISHERS concurrent publishers, until all complete.
        let meter = support::CpuMeter::start(&url).counting(&client);
        let start = Instant::now();
        let per = n.div_ceil(PUBLISHERS);
        let mut pubs = Vec::new();
        for p in 0..PUBLISHERS {
            let tasks = tasks.clone();
            let count = per.min(n.saturating_sub(p * per));
            pubs.push(tokio::spawn(async move {
                for _ in 0..count {
                    tasks.delay::<Noop>(Stamp { t: 0 }).await.expect("publish");
                }
            }));
        }
        for p in pubs {
            let _ = p.await;
        }
        let published = start.elapsed();
        let deadline = Instant::now() + Duration::from_secs(300);
        while finished.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let e2e = finished.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        let e2e_cpu = meter.summary(finished.load(Ordering::Relaxed));
        println!("tasks::nats_e2e  {n} no-op tasks: {e2e:.0} tasks/s (published in {published:.2?}, results + events on); {e2e_cpu}");
        println!("tasks::raw_jetstream  publish+pull(batch {CONCURRENCY})+ack: {raw:.0} msgs/s; {raw_cpu}");
        println!("tasks::raw_jetstream_records  the same + a claim create and a result update per message: {raw_records:.0} msgs/s; {raw_records_cpu}");
        println!("ratio e2e/raw = {:.2}, e2e/raw_records = {:.2}", e2e / raw, e2e / raw_records);

        // Latency: a steady rate, warm-up first.
        if let Ok(mut l) = latencies.lock() {
            l.clear();
        }
        let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let warm_n = (warmup.as_secs_f64() * rate as f64) as usize;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let before = finished.load(Ordering::Relaxed);
        for i in 0..warm_n + lat_n {
            tick.tick().await;
            if i == warm_n {
                if let Ok(mut l) = latencies.lock() {
                    l.clear();
                }
            }
            let tasks = tasks.clone();
            tokio::spawn(async move {
                let _ = tasks.delay::<Noop>(Stamp { t: now_ns() }).await;
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while finished.load(Ordering::Relaxed) < before + warm_n + lat_n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
        lat.sort_unstable();
        println!(
            "tasks::publish_to_start  {} tasks at {rate}/s after {warmup:?} warm-up: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );

        counting.stop().await;
    });
}
