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
    let thread = std::thread::Builder::new()
        .name("bench-node".into())
        .spawn(move || {
            let sys = actix_rt::System::new();
            sys.block_on(async move {
                let app = switchyard_demo::install(switchyard::App::new(config));
                let running = app.start().await.expect("node starts");
                addr_tx.send(running.addr()).expect("send addr");
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                running.stop().await;
            });
        })
        .expect("the node's thread");
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
        // `BENCH_NATS_EVENTS=0` keeps the events off NATS (they are still counted here), to
        // measure what publishing them costs.
        let sink = if env_num("BENCH_NATS_EVENTS", 1) == 0 {
            sink
        } else {
            broker.event_sink(Some(sink))
        };
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

/// CPU time so far of process `pid`'s live threads, in nanoseconds (the first field of each
/// `/proc/PID/task/TID/schedstat`); `None` off Linux or when the process is gone. Threads that
/// already exited are not counted, so compare it across phases of long-lived threads.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(tasks.flatten().map(|t| schedstat_ns(&t.path())).sum())
}

/// The CPU time of the thread at `/proc/PID/task/TID` (0 when it cannot be read).
fn schedstat_ns(task: &std::path::Path) -> u64 {
    std::fs::read_to_string(task.join("schedstat"))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .unwrap_or(0)
}

/// CPU time so far of each live thread of this process: (thread id, name, nanoseconds).
pub fn threads_cpu_ns() -> Vec<(u32, String, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let ns = schedstat_ns(&t.path());
            let tid = t
                .file_name()
                .to_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            (tid, name.trim().to_owned(), ns)
        })
        .collect()
}

/// The process listening on the TCP port of `url` on this machine (the local NATS server),
/// found through `/proc/net/tcp*` and the processes' socket descriptors; `None` when it is not
/// local, not Linux, or not visible to this user.
pub fn listener_pid(url: &str) -> Option<u32> {
    let port: u16 = url.rsplit(':').next()?.trim_end_matches('/').parse().ok()?;
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_dir.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// CPU spent by this process and by the NATS server over a phase, for "µs per message", and
/// optionally what one connection sent and received.
pub struct CpuMeter {
    server: Option<u32>,
    start: (Option<u64>, Option<u64>),
    traffic: Option<(std::sync::Arc<async_nats::Statistics>, [u64; 4])>,
}

fn traffic_now(s: &async_nats::Statistics) -> [u64; 4] {
    use std::sync::atomic::Ordering::Relaxed;
    [
        s.out_messages.load(Relaxed),
        s.in_messages.load(Relaxed),
        s.out_bytes.load(Relaxed),
        s.in_bytes.load(Relaxed),
    ]
}

impl CpuMeter {
    /// Starts measuring this process and the server listening on `url`'s port.
    pub fn start(url: &str) -> Self {
        let server = listener_pid(url);
        Self {
            start: (cpu_ns(std::process::id()), server.and_then(cpu_ns)),
            server,
            traffic: None,
        }
    }

    /// Also counts the messages and payload bytes `client` sends and receives.
    pub fn counting(mut self, client: &async_nats::Client) -> Self {
        let stats = client.statistics();
        let now = traffic_now(&stats);
        self.traffic = Some((stats, now));
        self
    }

    /// Microseconds of CPU per message since the start, over `n` messages: (this process,
    /// the server); `None` for what could not be read.
    pub fn per_message_us(&self, n: usize) -> (Option<f64>, Option<f64>) {
        let per = |before: Option<u64>, after: Option<u64>| {
            Some(after?.saturating_sub(before?) as f64 / 1e3 / n.max(1) as f64)
        };
        (
            per(self.start.0, cpu_ns(std::process::id())),
            per(self.start.1, self.server.and_then(cpu_ns)),
        )
    }

    /// `per_message_us` as text: "bench process X µs, NATS server Y µs of CPU per message".
    pub fn summary(&self, n: usize) -> String {
        let show = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.1}"));
        let (own, server) = self.per_message_us(n);
        let mut text = format!(
            "CPU per message: bench process {} µs, NATS server {} µs",
            show(own),
            show(server)
        );
        if let Some((stats, before)) = &self.traffic {
            let now = traffic_now(stats);
            let per = |i: usize| now[i].saturating_sub(before[i]) as f64 / n.max(1) as f64;
            text.push_str(&format!(
                "; per message the connection sent {:.2} messages ({:.0} bytes on the wire) and \
                 received {:.2} ({:.0} bytes)",
                per(0),
                per(2),
                per(1),
                per(3)
            ));
        }
        text
    }
}
