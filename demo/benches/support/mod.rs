//! Shared pieces of the load harnesses: an in-process node and a bounded HTTP load driver.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use switchyard::config::Config;

/// A Switchyard node running in its own actix system thread.
pub struct InProcessNode {
    pub addr: SocketAddr,
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl InProcessNode {
    /// Stops the node and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Starts the demo shop on `config` in-process, from the workspace root (where the demo's
/// relative `templates/` and `static/` are; cargo runs benches from `demo/`).
pub fn start_node(config: Config) -> InProcessNode {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    std::env::set_current_dir(root).expect("the workspace root");
    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let sys = actix_rt::System::new();
        sys.block_on(async move {
            let app = switchyard_demo::install(switchyard::App::new(config));
            let running = app.start().await.expect("node starts");
            addr_tx.send(running.addr()).expect("send addr");
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            running.stop().await;
        });
    });
    let addr = addr_rx.recv().expect("node started");
    InProcessNode {
        addr,
        stop: stop_tx,
        thread,
    }
}

/// What one load run measured.
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies_us: Vec<u64>,
}

impl LoadResult {
    /// Nothing measured yet.
    pub fn empty() -> Self {
        Self {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latencies_us: Vec::new(),
        }
    }

    /// Adds another run's numbers (elapsed times add up).
    pub fn merge(&mut self, other: LoadResult) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
    }

    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    pub fn percentile_us(&self, p: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[idx.min(v.len() - 1)]
    }

    pub fn summary(&self) -> String {
        format!(
            "{:>9.0} req/s  p50 {:>6} µs  p99 {:>6} µs  ({} requests, {} errors)",
            self.rps(),
            self.percentile_us(0.50),
            self.percentile_us(0.99),
            self.requests,
            self.errors
        )
    }
}

/// Sends `GET url` from `connections` concurrent clients for `duration` (bounded).
pub async fn drive(url: &str, connections: usize, duration: Duration) -> LoadResult {
    drive_with(url, connections, duration, |c, u| c.get(u)).await
}

/// Like [`drive`], with a request builder (cookies, method) per request.
pub async fn drive_with<F>(
    url: &str,
    connections: usize,
    duration: Duration,
    build: F,
) -> LoadResult
where
    F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder + Send + Sync + Clone + 'static,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let url = url.to_owned();
        let build = build.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .cookie_store(true)
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(1)
                .build()
                .expect("client");
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match build(&client, &url).send().await {
                    Ok(res) if res.status().is_success() => {
                        let _ = res.bytes().await;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            latencies_us.extend(lat);
            errors += e;
        }
    }
    LoadResult {
        requests: latencies_us.len() as u64,
        errors,
        elapsed: started.elapsed(),
        latencies_us,
    }
}

/// The NATS server the benches use: `SWITCHYARD_NATS__URL`, else the local one.
#[allow(dead_code)] // not every bench talks to NATS
pub fn nats_url() -> String {
    std::env::var("SWITCHYARD_NATS__URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A NATS prefix of its own for one bench run: `stem` and the clock's nanoseconds.
#[allow(dead_code)]
pub fn unique_prefix(stem: &str) -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000);
    format!("{stem}{ns}")
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A worker pool on a NATS broker, in this process, that counts the tasks it finished (their
/// `task-succeeded` events): what the task benches drive. Call inside an actix system.
pub struct CountingPool {
    pub broker: std::sync::Arc<switchyard_actors::tasks::NatsBroker>,
    pub tasks: switchyard::tasks::Tasks,
    /// Tasks that succeeded so far.
    pub finished: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pool: switchyard::tasks::WorkerPool,
    arbiter: actix_rt::Arbiter,
}

impl CountingPool {
    /// Opens the broker under `prefix` and starts a pool of `settings`' queues.
    pub async fn start(
        client: async_nats::Client,
        prefix: &str,
        settings: switchyard::tasks::TaskSettings,
        registry: switchyard::tasks::Registry,
    ) -> CountingPool {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use switchyard::tasks::{EventKind, EventSink, TaskEvent, Tasks, WorkerPool};

        let broker = Arc::new(
            switchyard_actors::tasks::NatsBroker::open(client, prefix, &settings)
                .await
                .expect("broker"),
        );
        let registry = Arc::new(registry);
        let finished = Arc::new(AtomicUsize::new(0));
        let sink: EventSink = {
            let finished = finished.clone();
            Arc::new(move |e: &TaskEvent| {
                if e.kind == EventKind::TaskSucceeded {
                    finished.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let sink = broker.event_sink(Some(sink));
        let arbiter = actix_rt::Arbiter::new();
        let pool = WorkerPool::start(
            settings.clone(),
            None,
            broker.clone(),
            registry.clone(),
            Some(sink),
            &arbiter.handle(),
        )
        .expect("pool");
        let tasks = Tasks::new(broker.clone(), registry, settings);
        CountingPool {
            broker,
            tasks,
            finished,
            pool,
            arbiter,
        }
    }

    /// Stops the pool (in-flight tasks finish first) and its arbiter, and deletes every
    /// stream and bucket of the broker's prefix.
    pub async fn stop(self) {
        self.pool.cold_token().cancel();
        self.pool.drain().await;
        self.arbiter.stop();
        let js = self.broker.jetstream();
        for stream in self.broker.names().task_streams() {
            let _ = js.delete_stream(&stream).await;
        }
    }
}
