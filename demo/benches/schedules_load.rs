//! Scheduled tasks on the NATS broker (issue 14's benchmarks), driving the real `switchyard`
//! binary with a plain async-nats client as a foreign publisher, on the machine's server (a
//! unique prefix) and on a private current server (`.tools/nats-current`):
//!
//! 1. **Release lateness**: `BENCH_SCHED_TASKS` (10,000) `demo.add` tasks with etas spread
//!    evenly over `BENCH_SCHED_SPREAD` (10) seconds, the first `BENCH_SCHED_LEAD` (5) seconds
//!    after publishing begins; one worker. Lateness is the result record's `started_at` minus
//!    the message's `eta`.
//! 2. **Far etas do not freeze a queue**: `BENCH_SCHED_FAR` (120,000) tasks due an hour ahead,
//!    then normal tasks: how long the far ones took to move into `<PREFIX>_SCHEDULED`, each
//!    worker's RSS before and after, and the normal tasks' publish-to-start latency.
//! 3. **A million scheduled**: `BENCH_SCHED_MILLION` (1,000,000; `0` skips) tasks due an hour
//!    and more ahead, on the private server only: RSS of a worker and a `switchyard beat`
//!    before and after, the stream's bytes and the store directory's size.
//!
//! `cargo bench --bench schedules_load` (env: the above, `BENCH_SCHED_SERVERS` =
//! `machine,current` (default both), `SWITCHYARD_NATS__URL`). Every wait is bounded; streams
//! on the machine's server are deleted at the end.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Unacknowledged publishes kept in flight.
const PUBLISH_WINDOW: usize = 1_000;
/// Record reads in flight.
const READS: usize = 64;

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// VmRSS of a process, in MB.
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Bytes under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One server, a prefix of the run's own, and the processes started on it.
struct Bench {
    label: &'static str,
    url: String,
    prefix: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
    server: Option<common::PrivateServer>,
    js: jetstream::Context,
}

impl Bench {
    /// Starts `switchyard <args>` (a worker or a beat), logging to the run's directory.
    fn spawn(&mut self, args: &[&str]) -> u32 {
        let log = self.dir.path().join(format!("{}.log", self.children.len()));
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new(common::binary())
            .args(args)
            .current_dir(common::root())
            .env("SWITCHYARD_TASKS__BROKER", "nats")
            .env("SWITCHYARD_NATS__PREFIX", &self.prefix)
            .env("SWITCHYARD_NATS__URL", &self.url)
            .env("SWITCHYARD_MAIL__DIR", self.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone().map_or(Stdio::null(), Stdio::from))
            .spawn()
            .expect("spawn switchyard");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// The first worker started (one is started when none was).
    fn worker(&mut self) -> u32 {
        match self.children.first() {
            Some(c) => c.id(),
            None => self.spawn(&["worker"]),
        }
    }

    fn stream_name(&self, kind: &str) -> String {
        format!("{}_{kind}", self.prefix.to_uppercase())
    }

    /// Messages in `<PREFIX>_<kind>` (0 when it does not exist yet).
    async fn messages(&self, kind: &str) -> (u64, u64) {
        match self.js.get_stream(self.stream_name(kind)).await {
            Ok(mut s) => s
                .info()
                .await
                .map_or((0, 0), |i| (i.state.messages, i.state.bytes)),
            Err(_) => (0, 0),
        }
    }

    /// Waits (bounded) until the worker made the task and scheduled streams.
    async fn until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for kind in ["TASKS", "SCHEDULED"] {
            while self.js.get_stream(self.stream_name(kind)).await.is_err() {
                assert!(Instant::now() < deadline, "no {kind} stream after 30 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// Publishes `n` task messages to the default queue (message `i` from `msg(i)`), with a
    /// window of acknowledgements in flight.
    async fn publish(&self, n: usize, msg: impl Fn(usize) -> Value) {
        let subject = format!("{}.tasks.default", self.prefix);
        let mut acks = VecDeque::with_capacity(PUBLISH_WINDOW);
        for i in 0..n {
            if acks.len() >= PUBLISH_WINDOW {
                if let Some(ack) = acks.pop_front() {
                    let ack: jetstream::context::PublishAckFuture = ack;
                    ack.await.expect("publish ack");
                }
            }
            let payload = msg(i).to_string();
            acks.push_back(
                self.js
                    .publish(subject.clone(), payload.into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("publish ack");
        }
    }

    /// When each task was released to its queue: a plain subscriber on the queue's subject
    /// sees the scheduler's publish (`Nats-Msg-Id: <id>:due:<seq>`).
    async fn watch_releases(&self) -> tokio::sync::watch::Receiver<HashMap<String, DateTime<Utc>>> {
        let client = async_nats::connect(&self.url).await.expect("nats");
        let mut sub = client
            .subscribe(format!("{}.tasks.default", self.prefix))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let (tx, rx) = tokio::sync::watch::channel(HashMap::new());
        tokio::spawn(async move {
            let _client = client;
            while let Some(m) = sub.next().await {
                let at = Utc::now();
                let msg_id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id"));
                if let Some((id, _)) = msg_id.and_then(|v| v.as_str().split_once(":due:")) {
                    tx.send_modify(|map| {
                        map.entry(id.to_owned()).or_insert(at);
                    });
                }
            }
        });
        rx
    }

    async fn results(&self) -> kv::Store {
        self.js
            .get_key_value(format!("{}_results", self.prefix))
            .await
            .expect("results bucket")
    }

    /// Polls the records of `ids` until each has started and finished, or `within` passes;
    /// returns each id's `started_at` (None: never ran).
    async fn started(&self, ids: &[String], within: Duration) -> Vec<Option<DateTime<Utc>>> {
        let kv = self.results().await;
        let deadline = Instant::now() + within;
        let mut out: Vec<Option<DateTime<Utc>>> = vec![None; ids.len()];
        loop {
            let missing: Vec<usize> = (0..ids.len()).filter(|i| out[*i].is_none()).collect();
            let found: Vec<(usize, Option<DateTime<Utc>>)> = futures_util::stream::iter(missing)
                .map(|i| {
                    let kv = &kv;
                    async move {
                        let rec = kv.get(&ids[i]).await.ok().flatten();
                        let rec = rec.and_then(|b| serde_json::from_slice::<Value>(&b).ok());
                        let done = rec.as_ref().filter(|r| r["state"] == "SUCCESS");
                        (i, done.and_then(|r| parse_time(&r["started_at"])))
                    }
                })
                .buffer_unordered(READS)
                .collect()
                .await;
            for (i, t) in found {
                out[i] = t;
            }
            if out.iter().all(Option::is_some) || Instant::now() >= deadline {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Deletes the run's streams (the machine's server; a private one goes with its dir).
    async fn cleanup(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        if self.server.is_none() {
            for s in ["TASKS", "DEAD", "SCHEDULED"] {
                common::delete_stream(&self.url, &self.stream_name(s)).await;
            }
            for b in ["results", "scheduler", "beat", "login"] {
                common::delete_stream(&self.url, &format!("KV_{}_{b}", self.prefix)).await;
            }
        }
    }
}

fn task(id: &str, i: usize, eta: Option<DateTime<Utc>>) -> Value {
    let mut m = json!({"id": id, "task": "demo.add", "args": {"x": i, "y": 1}});
    if let Some(eta) = eta {
        m["eta"] = json!(rfc3339(eta));
    }
    m
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

/// 1. Release lateness of `n` tasks due over `spread`, `lead` after publishing begins.
async fn lateness(b: &mut Bench, n: usize, lead: Duration, spread: Duration) {
    b.spawn(&["worker", "--node-id", "late-1"]);
    b.until_ready().await;
    let ids = ids(n);
    let begin = Utc::now();
    let first = begin + TimeDelta::from_std(lead).expect("lead");
    let step = spread.as_secs_f64() / n.max(1) as f64;
    let eta = |i: usize| first + TimeDelta::microseconds((i as f64 * step * 1e6) as i64);
    let released = b.watch_releases().await;
    let published = Instant::now();
    b.publish(n, |i| task(&ids[i], i, Some(eta(i)))).await;
    let publish_took = published.elapsed();
    let load = uptime();
    let end = eta(n.saturating_sub(1));
    let wait = (end - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(2);
    tokio::time::sleep(wait).await;
    let started = b.started(&ids, Duration::from_secs(60)).await;
    let mut late: Vec<f64> = started
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some(((*s)? - eta(i)).num_microseconds()? as f64 / 1e3))
        .collect();
    let released = released.borrow().clone();
    let mut out: Vec<f64> = ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| Some((*released.get(id)? - eta(i)).num_microseconds()? as f64 / 1e3))
        .collect();
    for (what, late) in [("started", &mut late), ("released", &mut out)] {
        late.sort_by(f64::total_cmp);
        let early = late.iter().filter(|l| **l < 0.0).count();
        println!(
            "{:<8} lateness  {what:<8} {n} tasks over {spread:?} (published in {publish_took:.2?}, load {load}): {}/{n}, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, min {:.1} ms, {early} early",
            b.label,
            late.len(),
            pct(late, 0.5),
            pct(late, 0.9),
            pct(late, 0.99),
            pct(late, 1.0),
            pct(late, 0.0),
        );
    }
}

/// 2. `n` far tasks, then normal ones: the move's duration, RSS, publish-to-start.
async fn far_etas(b: &mut Bench, n: usize) {
    let pids = [b.worker(), b.spawn(&["worker", "--node-id", "far-2"])];
    b.until_ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<f64> = pids.iter().map(|p| rss_mb(*p)).collect();
    let (held_before, _) = b.messages("SCHEDULED").await;
    let eta = Utc::now() + TimeDelta::hours(1);
    let ids = ids(n);
    let started = Instant::now();
    b.publish(n, |i| task(&ids[i], i, Some(eta))).await;
    let publish_took = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut held, mut queued);
    loop {
        (held, _) = b.messages("SCHEDULED").await;
        (queued, _) = b.messages("TASKS").await;
        if (held >= held_before + n as u64 && queued == 0) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let moved = started.elapsed();
    let load = uptime();
    // Normal tasks, one at a time, publish-to-start each.
    let mut lat = Vec::new();
    for i in 0..10 {
        let id = uuid::Uuid::new_v4().to_string();
        let at = Utc::now();
        b.publish(1, |_| task(&id, i, None)).await;
        let s = b
            .started(std::slice::from_ref(&id), Duration::from_secs(30))
            .await;
        lat.push(s[0].map_or(f64::NAN, |s| {
            (s - at).num_microseconds().unwrap_or(0) as f64 / 1e3
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<f64> = pids.iter().map(|p| rss_mb(*p)).collect();
    let rss: Vec<String> = before
        .iter()
        .zip(&after)
        .map(|(a, z)| format!("{a:.1}→{z:.1} MB ({:+.1})", z - a))
        .collect();
    let first = lat[0];
    lat.sort_by(f64::total_cmp);
    println!(
        "{:<8} far etas  {n} due in 1 h: published in {publish_took:.2?}, all held after {moved:.2?} ({} held, {queued} left in the queue; load {load})",
        b.label,
        held - held_before,
    );
    println!(
        "{:<8} far etas  then normal tasks publish-to-start: first {first:.1} ms, p50 {:.1} ms, max {:.1} ms (10); worker RSS {}",
        b.label,
        pct(&lat, 0.5),
        pct(&lat, 1.0),
        rss.join(", ")
    );
}

/// 3. A million scheduled: a worker's and a beat's RSS, the stream's bytes, the store's size.
async fn million(b: &mut Bench, n: usize) {
    let worker = b.worker();
    let beat = b.spawn(&["beat", "--node-id", "beat-1"]);
    b.until_ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store: Option<PathBuf> = b
        .server
        .as_ref()
        .and_then(|s| s.child.as_ref())
        .and_then(|c| std::fs::read_link(format!("/proc/{}/cwd", c.id())).ok());
    let disk_before = store.as_deref().map_or(0, dir_bytes);
    let (rw, rb) = (rss_mb(worker), rss_mb(beat));
    let (held_before, bytes_before) = b.messages("SCHEDULED").await;
    let base = Utc::now() + TimeDelta::hours(1);
    let step = 3600.0 / n.max(1) as f64;
    let started = Instant::now();
    b.publish(n, |i| {
        let eta = base + TimeDelta::microseconds((i as f64 * step * 1e6) as i64);
        task(&uuid::Uuid::new_v4().to_string(), i, Some(eta))
    })
    .await;
    let publish_took = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(1200);
    let (mut held, mut bytes, mut queued);
    loop {
        (held, bytes) = b.messages("SCHEDULED").await;
        (queued, _) = b.messages("TASKS").await;
        if (held >= held_before + n as u64 && queued == 0) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let moved = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (zw, zb) = (rss_mb(worker), rss_mb(beat));
    let disk = store.as_deref().map_or(0, dir_bytes);
    println!(
        "{:<8} million   {n} due in 1–2 h: published in {publish_took:.2?}, held after {moved:.2?} ({} held, {queued} queued; load {})",
        b.label,
        held - held_before,
        uptime()
    );
    println!(
        "{:<8} million   worker RSS {rw:.1}→{zw:.1} MB ({:+.1}), beat RSS {rb:.1}→{zb:.1} MB ({:+.1}); stream {:.1} MB ({:.0} B/task), store dir {:.1}→{:.1} MB",
        b.label,
        zw - rw,
        zb - rb,
        (bytes - bytes_before) as f64 / 1e6,
        (bytes - bytes_before) as f64 / n.max(1) as f64,
        disk_before as f64 / 1e6,
        disk as f64 / 1e6,
    );
}

fn main() {
    let n = common::env_num("BENCH_SCHED_TASKS", 10_000) as usize;
    let lead = Duration::from_secs(common::env_num("BENCH_SCHED_LEAD", 5));
    let spread = Duration::from_secs(common::env_num("BENCH_SCHED_SPREAD", 10));
    let far = common::env_num("BENCH_SCHED_FAR", 120_000) as usize;
    let million_n = common::env_num("BENCH_SCHED_MILLION", 1_000_000) as usize;
    let servers = std::env::var("BENCH_SCHED_SERVERS").unwrap_or_else(|_| "machine,current".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for server in servers.split(',').map(str::trim) {
        let (label, url, private) = match server {
            "machine" => ("machine", common::service_url("nats"), None),
            "current" => {
                let Some(s) = common::PrivateServer::nats_current() else {
                    continue;
                };
                ("current", s.nats_url(), Some(s))
            }
            other => panic!("BENCH_SCHED_SERVERS: unknown server {other}"),
        };
        rt.block_on(async {
            let client = async_nats::connect(&url).await.expect("nats");
            println!(
                "{label:<8} server {} at {url}",
                client.server_info().version
            );
            let mut b = Bench {
                label,
                url: url.clone(),
                prefix: common::unique_name("schedbench"),
                dir: tempfile::tempdir().expect("tempdir"),
                children: Vec::new(),
                server: private,
                js: jetstream::new(client),
            };
            if n > 0 {
                lateness(&mut b, n, lead, spread).await;
            }
            if far > 0 {
                far_etas(&mut b, far).await;
            }
            if million_n > 0 && b.server.is_some() {
                million(&mut b, million_n).await;
            }
            b.cleanup().await;
        });
    }
}
