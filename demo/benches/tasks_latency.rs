//! Publish-to-start latency as a foreign client sees it: a plain async-nats client (no
//! Switchyard code on its side) publishes `demo.add` at a steady rate to one
//! `switchyard worker --config config/cluster.toml` process; a task's latency is its result
//! record's `started_at` minus the time just before its publish. For each rate: a warm-up,
//! then the measured tasks; p50/p90/p99/max of both that latency and, as the floor it stands
//! on, the same publishes' JetStream ack round trip.
//!
//! `cargo bench --bench tasks_latency` (env: `BENCH_RATES`, default `100,1000`;
//! `BENCH_LATENCY_TASKS`, default 2000; `BENCH_WARMUP_TASKS`, default 200;
//! `SWITCHYARD_NATS__URL`, `SWITCHYARD_POSTGRES__URL` (the config's outbox relay)). The worker
//! runs under a unique prefix whose streams are deleted at the end; its log goes to
//! `target/tasks_latency-worker.log`. `BENCH_BASELINE_BIN=<path to another switchyard binary>`
//! (an earlier build) measures that one too, in the same run, rate by rate, alternating.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use switchyard_actors::tasks::NatsNames;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn pct(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

fn summary(label: &str, mut v: Vec<i64>) -> String {
    v.sort_unstable();
    format!(
        "{label}: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} tasks)",
        pct(&v, 0.5),
        pct(&v, 0.9),
        pct(&v, 0.99),
        pct(&v, 1.0),
        v.len()
    )
}

/// The worker process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn spawn_worker(bin: &str, prefix: &str, nats: &str) -> Worker {
    let root = root();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("target/tasks_latency-worker.log"))
        .expect("log");
    let mut cmd = Command::new(bin);
    cmd.current_dir(&root)
        .args([
            "worker",
            "--config",
            "config/cluster.toml",
            "--node-id",
            "bench",
        ])
        .env("SWITCHYARD_NATS__PREFIX", prefix)
        .env("SWITCHYARD_NATS__URL", nats)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    if let Ok(url) = std::env::var("SWITCHYARD_POSTGRES__URL") {
        cmd.env("SWITCHYARD_POSTGRES__URL", url);
    }
    Worker(cmd.spawn().expect("spawn switchyard worker"))
}

/// Publishes `n` tasks at `rate`/s; the (id, publish time, ack round trip) of each.
async fn publish_at(
    js: &jetstream::Context,
    subject: &str,
    tag: &str,
    rate: u64,
    n: usize,
) -> Vec<(String, i64, i64)> {
    let sent = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        let id = format!("{tag}-{i}");
        let payload = format!(r#"{{"id":"{id}","task":"demo.add","args":{{"x":{i},"y":1}}}}"#);
        let t0 = now_ns();
        let ack = js.publish(subject.to_owned(), payload.into()).await;
        let sent = sent.clone();
        acks.push(tokio::spawn(async move {
            let ok = match ack {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if ok {
                if let Ok(mut s) = sent.lock() {
                    s.push((id, t0, now_ns() - t0));
                }
            }
        }));
    }
    for a in acks {
        let _ = a.await;
    }
    let out = sent.lock().map(|s| s.clone()).unwrap_or_default();
    out
}

/// The `started_at` (unix ns) of each task's result, waiting up to 60 s for all to finish.
async fn started_at(store: &jetstream::kv::Store, ids: &[String]) -> Vec<Option<i64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = vec![None; ids.len()];
    let mut left: Vec<usize> = (0..ids.len()).collect();
    while !left.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for i in left {
            let rec = store.get(&ids[i]).await.ok().flatten();
            let rec = rec.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            match rec {
                Some(r) if r["state"] == "SUCCESS" => {
                    out[i] = r["started_at"]
                        .as_str()
                        .and_then(|s| s.parse::<DateTime<Utc>>().ok())
                        .and_then(|t| t.timestamp_nanos_opt());
                }
                _ => still.push(i),
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    out
}

/// Runs every rate against the worker `bin` under a fresh prefix; one line per rate.
async fn measure(
    js: &jetstream::Context,
    nats: &str,
    label: &str,
    bin: &str,
    rate: u64,
    warm: usize,
    n: usize,
) {
    let prefix = support::unique_prefix("lat");
    let names = NatsNames::new(&prefix);
    let worker = spawn_worker(bin, &prefix, nats);
    // Ready once the worker created its queue's consumer.
    let deadline = Instant::now() + Duration::from_secs(60);
    let consumer = names.consumer("default");
    loop {
        if let Ok(s) = js.get_stream(names.tasks_stream()).await {
            if s.consumer_info(&consumer).await.is_ok() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not start (see target/tasks_latency-worker.log)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its feed or first fetch is up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let store = js
        .get_key_value(names.results_bucket())
        .await
        .expect("results bucket");
    let subject = names.task_subject("default");
    let tag = format!("r{rate}-{}", now_ns() % 1_000_000);
    let sent = publish_at(js, &subject, &tag, rate, warm + n).await;
    let sent: Vec<_> = sent
        .into_iter()
        .filter(|(id, _, _)| {
            id.rsplit('-')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i >= warm)
        })
        .collect();
    let ids: Vec<String> = sent.iter().map(|(id, _, _)| id.clone()).collect();
    let started = started_at(&store, &ids).await;
    let missing = started.iter().filter(|s| s.is_none()).count();
    let lat: Vec<i64> = sent
        .iter()
        .zip(&started)
        .filter_map(|((_, t0, _), s)| s.map(|s| s - t0))
        .collect();
    let acks: Vec<i64> = sent.iter().map(|(_, _, a)| *a).collect();
    println!(
        "{}",
        summary(
            &format!("tasks::foreign_publish_to_start  {label:<8} {rate}/s"),
            lat
        )
    );
    println!(
        "{}",
        summary(
            &format!("tasks::jetstream_publish_ack     {label:<8} {rate}/s"),
            acks
        )
    );
    if missing > 0 {
        println!("  {missing} tasks did not finish within 60 s");
    }
    drop(worker);
    for stream in names.task_streams() {
        let _ = js.delete_stream(&stream).await;
    }
}

fn main() {
    let rates: Vec<u64> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let n = support::env_num("BENCH_LATENCY_TASKS", 2_000) as usize;
    let warm = support::env_num("BENCH_WARMUP_TASKS", 200) as usize;
    let nats = support::nats_url();
    let mut bins = vec![("this", env!("CARGO_BIN_EXE_switchyard").to_owned())];
    if let Ok(baseline) = std::env::var("BENCH_BASELINE_BIN") {
        bins.push(("baseline", baseline));
    }
    let _ = std::fs::remove_file(root().join("target/tasks_latency-worker.log"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = async_nats::connect(&nats).await.expect("nats");
        let js = jetstream::new(client);
        for rate in rates {
            for (label, bin) in &bins {
                measure(&js, &nats, label, bin, rate, warm, n).await;
            }
        }
    });
}
