//! Soak: `switchyard serve --config config/cluster.toml` (sessions in Postgres, tasks on NATS
//! JetStream) on a private database and NATS prefix, driven by `SOAK_CONNECTIONS` concurrent
//! visitors for `SOAK_SECONDS` after a warm-up. A visit mixes anonymous page views (no
//! cookies), cart POSTs (CSRF token from the page), a login as alice / wonderland and a
//! checkout, then logs out. Prints requests, non-2xx/3xx answers and p50/p99 per kind, and the
//! server's RSS after the warm-up, every 10 s, and at the end (the target is 0 5xx and a flat
//! RSS). A login answered 503 with `Retry-After` (every hashing slot of
//! `auth.max_concurrent_hashes` taken: the designed back-pressure) is retried after the wait,
//! as a browser would, and counted apart. No worker runs: a checkout only publishes its task.
//!
//! `cargo bench -p switchyard-demo --bench soak` (env: `SOAK_SECONDS`, default 60;
//! `SOAK_CONNECTIONS`, default 256; `SOAK_WARMUP_SECONDS`, default 5; `SOAK_ANON_PER_VISIT`,
//! default 8; `SOAK_MAX_REQUESTS`, default 20 000 000; the services from
//! `SWITCHYARD_POSTGRES__URL` and `SWITCHYARD_NATS__URL`). Traffic goes to 127.0.0.1 only;
//! every loop is bounded in time and count. The database and the NATS streams are deleted at
//! the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Client, Method};
use switchyard_actors::tasks::NatsNames;

#[path = "../tests/common/mod.rs"]
mod common;

/// One kind of request of a visit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// `GET /` without cookies.
    Anonymous,
    /// A page read for its CSRF token (`GET /`, `/login`, `/cart`) with the visitor's cookies.
    Page,
    /// `POST /cart/add/{id}`.
    CartAdd,
    /// `POST /login`.
    Login,
    /// `POST /orders`.
    Checkout,
    /// `POST /logout`.
    Logout,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Anonymous => "anonymous",
            Kind::Page => "page",
            Kind::CartAdd => "cart add",
            Kind::Login => "login",
            Kind::Checkout => "checkout",
            Kind::Logout => "logout",
        }
    }
}

/// What one kind measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    /// Answers that were neither 2xx nor 3xx, by status.
    bad: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection errors, timeouts).
    failed: u64,
    /// Logins answered 503 with `Retry-After` (every hashing slot taken, by design): retried
    /// after the wait, as a browser would; not in `bad`.
    busy: u64,
}

/// How a request ended.
enum Answer {
    /// 2xx or 3xx, with the body.
    Ok(String),
    /// A login answered 503 with `Retry-After`: try again after this wait.
    Busy(Duration),
    /// Anything else (tallied).
    Failed,
}

/// Attempts of one login that keeps finding every hashing slot taken.
const LOGIN_ATTEMPTS: u32 = 5;

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (status, n) in other.bad {
            *self.bad.entry(status).or_default() += n;
        }
        self.failed += other.failed;
        self.busy += other.busy;
    }

    fn server_errors(&self) -> u64 {
        self.bad.range(500..).map(|(_, n)| n).sum()
    }

    fn percentile_us(&mut self, p: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        self.latencies_us.sort_unstable();
        let idx = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[idx.min(self.latencies_us.len() - 1)]
    }
}

/// One visitor's run: its tallies per kind.
struct Visitor {
    anonymous: Client,
    tallies: BTreeMap<Kind, Tally>,
    base: String,
    /// Requests sent by every visitor together, against `max_requests`.
    sent: Arc<AtomicU64>,
    max_requests: u64,
    deadline: Instant,
}

impl Visitor {
    fn done(&self) -> bool {
        Instant::now() >= self.deadline || self.sent.load(Ordering::Relaxed) >= self.max_requests
    }

    /// Sends one request; its body when it was answered 2xx/3xx.
    async fn send(
        &mut self,
        kind: Kind,
        client: &Client,
        method: Method,
        path: &str,
        form: &[(&str, &str)],
    ) -> Option<String> {
        match self.answer(kind, client, method, path, form).await {
            Answer::Ok(body) => Some(body),
            Answer::Busy(_) | Answer::Failed => None,
        }
    }

    /// Sends one request and tallies how it ended.
    async fn answer(
        &mut self,
        kind: Kind,
        client: &Client,
        method: Method,
        path: &str,
        form: &[(&str, &str)],
    ) -> Answer {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let mut req = client.request(method.clone(), format!("{}{path}", self.base));
        if method == Method::POST {
            req = req.form(form);
        }
        let started = Instant::now();
        let tally = self.tallies.entry(kind).or_default();
        let Ok(res) = req.send().await else {
            tally.failed += 1;
            return Answer::Failed;
        };
        let status = res.status();
        let retry_after = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body = res.text().await;
        tally
            .latencies_us
            .push(started.elapsed().as_micros() as u64);
        match (body, retry_after) {
            (Ok(body), _) if status.is_success() || status.is_redirection() => Answer::Ok(body),
            (Ok(_), Some(secs)) if kind == Kind::Login && status.as_u16() == 503 => {
                tally.busy += 1;
                Answer::Busy(Duration::from_secs(secs.clamp(1, 10)))
            }
            (Ok(_), _) => {
                *tally.bad.entry(status.as_u16()).or_default() += 1;
                Answer::Failed
            }
            (Err(_), _) => {
                tally.failed += 1;
                Answer::Failed
            }
        }
    }

    /// A page read with the visitor's cookies, and the CSRF token in its forms.
    async fn token(&mut self, client: &Client, path: &str) -> Option<String> {
        let html = self
            .send(Kind::Page, client, Method::GET, path, &[])
            .await?;
        common::csrf_token(&html)
    }

    /// One visit: anonymous views, then a new visitor who fills a cart, logs in, checks out
    /// and logs out. Stops at the first step that fails (the failure is tallied).
    async fn visit(&mut self, anon_views: u64, n: usize) -> Option<()> {
        for _ in 0..anon_views {
            let anonymous = self.anonymous.clone();
            self.send(Kind::Anonymous, &anonymous, Method::GET, "/", &[])
                .await;
        }
        let client = browser();
        let token = self.token(&client, "/").await?;
        let products = switchyard_demo::PRODUCTS;
        for p in [
            &products[n % products.len()],
            &products[(n + 1) % products.len()],
        ] {
            let form = [("csrfmiddlewaretoken", token.as_str())];
            let path = format!("/cart/add/{}", p.id);
            self.send(Kind::CartAdd, &client, Method::POST, &path, &form)
                .await?;
        }
        let token = self.token(&client, "/login").await?;
        let form = [
            ("username", "alice"),
            ("password", "wonderland"),
            ("csrfmiddlewaretoken", token.as_str()),
        ];
        let mut attempts = 0;
        loop {
            match self
                .answer(Kind::Login, &client, Method::POST, "/login", &form)
                .await
            {
                Answer::Ok(_) => break,
                Answer::Busy(wait) if attempts + 1 < LOGIN_ATTEMPTS && !self.done() => {
                    attempts += 1;
                    tokio::time::sleep(wait).await;
                }
                Answer::Busy(_) | Answer::Failed => return None,
            }
        }
        // Login rotates the CSRF secret: a fresh token from the cart page.
        let token = self.token(&client, "/cart").await?;
        let form = [("csrfmiddlewaretoken", token.as_str())];
        self.send(Kind::Checkout, &client, Method::POST, "/orders", &form)
            .await?;
        self.send(Kind::Logout, &client, Method::POST, "/logout", &form)
            .await?;
        Some(())
    }
}

/// A browser: keeps cookies, does not follow redirects, gives up on an answer after 20 s.
fn browser() -> Client {
    Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Runs `connections` visitors until `duration` has passed or `max_requests` were sent.
async fn drive(
    base: &str,
    connections: usize,
    duration: Duration,
    anon_views: u64,
    max_requests: u64,
) -> BTreeMap<Kind, Tally> {
    let deadline = Instant::now() + duration;
    let sent = Arc::new(AtomicU64::new(0));
    let anonymous = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut tasks = Vec::new();
    for n in 0..connections {
        let mut visitor = Visitor {
            anonymous: anonymous.clone(),
            tallies: BTreeMap::new(),
            base: base.to_owned(),
            sent: sent.clone(),
            max_requests,
            deadline,
        };
        tasks.push(tokio::spawn(async move {
            let mut product = n;
            while !visitor.done() {
                let _ = visitor.visit(anon_views, product).await;
                product += 1;
            }
            visitor.tallies
        }));
    }
    let mut total: BTreeMap<Kind, Tally> = BTreeMap::new();
    for task in tasks {
        if let Ok(tallies) = task.await {
            for (kind, tally) in tallies {
                total.entry(kind).or_default().merge(tally);
            }
        }
    }
    total
}

/// The resident set of process `pid`, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let seconds = common::env_num("SOAK_SECONDS", 60);
    let connections = common::env_num("SOAK_CONNECTIONS", 256) as usize;
    let warmup = common::env_num("SOAK_WARMUP_SECONDS", 5);
    let anon_views = common::env_num("SOAK_ANON_PER_VISIT", 8);
    let max_requests = common::env_num("SOAK_MAX_REQUESTS", 20_000_000);
    if !common::service_available("postgres") || !common::service_available("nats") {
        return;
    }
    let db_url = common::fresh_postgres_url();
    let nats_url = common::service_url("nats");
    let prefix = common::unique_name("sysoak");
    let node = common::spawn_node(common::NodeOptions {
        config: Some(
            std::fs::read_to_string(common::root().join("config/cluster.toml"))
                .expect("config/cluster.toml"),
        ),
        env: vec![
            ("SWITCHYARD_POSTGRES__URL".into(), db_url.clone()),
            ("SWITCHYARD_NATS__URL".into(), nats_url.clone()),
            ("SWITCHYARD_NATS__PREFIX".into(), prefix.clone()),
            ("SWITCHYARD_SERVER__DEBUG".into(), "false".into()),
            (
                "SWITCHYARD_SERVER__SECRET_KEY".into(),
                "soak-secret-key-0123456789abcdef0123456789".into(),
            ),
            ("SWITCHYARD_LOG__LEVEL".into(), "warn".into()),
        ],
        ..Default::default()
    });
    let pid = node.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let base = node.base.clone();

    let warm = rt.block_on(drive(
        &base,
        connections,
        Duration::from_secs(warmup),
        anon_views,
        max_requests,
    ));
    let warm_requests: usize = warm.values().map(|t| t.latencies_us.len()).sum();
    let rss_start = rss_kib(pid);
    println!(
        "soak: {connections} connections, {seconds} s after a {warmup} s warm-up \
         ({warm_requests} requests); {anon_views} anonymous views per visit"
    );
    println!("  RSS after warm-up: {} MiB", rss_start / 1024);

    // RSS every 10 s while the load runs.
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampling = {
        let samples = samples.clone();
        rt.spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            for _ in 0..seconds / 10 {
                tick.tick().await;
                let at = started.elapsed().as_secs();
                samples.lock().expect("samples").push((at, rss_kib(pid)));
            }
        })
    };
    let started = Instant::now();
    let mut tallies = rt.block_on(drive(
        &base,
        connections,
        Duration::from_secs(seconds),
        anon_views,
        max_requests,
    ));
    let elapsed = started.elapsed();
    sampling.abort();
    let rss_end = rss_kib(pid);

    let mut requests = 0;
    let mut server_errors = 0;
    let mut busy = 0;
    for (kind, tally) in &mut tallies {
        let n = tally.latencies_us.len() as u64;
        requests += n;
        server_errors += tally.server_errors();
        busy += tally.busy;
        let (p50, p99) = (tally.percentile_us(0.50), tally.percentile_us(0.99));
        println!(
            "  {:<10} {n:>8} requests  {:>7.0}/s  p50 {:>7} \u{b5}s  p99 {:>8} \u{b5}s  \
             not 2xx/3xx {:?}  no answer {}  busy {}",
            kind.name(),
            n as f64 / elapsed.as_secs_f64(),
            p50,
            p99,
            tally.bad,
            tally.failed,
            tally.busy
        );
    }
    println!(
        "  total      {requests:>8} requests  {:>7.0}/s  5xx {server_errors} (besides {busy} \
         logins answered 503 + Retry-After while every hashing slot was taken, retried)",
        requests as f64 / elapsed.as_secs_f64()
    );
    let trace: Vec<String> = samples
        .lock()
        .expect("samples")
        .iter()
        .map(|(at, kib)| format!("{at}s {} MiB", kib / 1024))
        .collect();
    println!("  RSS while loaded: {}", trace.join(", "));
    println!(
        "  RSS at the end: {} MiB ({:+} MiB since the warm-up)",
        rss_end / 1024,
        (rss_end as i64 - rss_start as i64) / 1024
    );
    let stderr = node.stderr();
    let warnings = stderr.lines().filter(|l| l.contains("WARN")).count();
    let errors = stderr.lines().filter(|l| l.contains("ERROR")).count();
    println!("  server log: {warnings} warnings, {errors} errors");
    for line in stderr.lines().filter(|l| l.contains("ERROR")).take(5) {
        println!("    {line}");
    }

    drop(node);
    let names = NatsNames::new(prefix.clone());
    rt.block_on(async {
        common::drop_database(&db_url).await;
        for stream in [
            names.tasks_stream(),
            names.dead_stream(),
            format!("KV_{}", names.results_bucket()),
            format!("KV_{prefix}_login"),
        ] {
            common::delete_stream(&nats_url, &stream).await;
        }
    });
}
