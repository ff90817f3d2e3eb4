//! Checkout throughput with the transactional outbox against publish-after-commit, in one run:
//! `switchyard serve --config config/cluster.toml` (orders and sessions in Postgres, tasks on
//! NATS) twice on fresh databases and prefixes, once with `tasks.outbox = "postgres"` (the
//! order's e-mail task is a row written in the order's transaction, published by the relay)
//! and once with `tasks.outbox = ""` (the task is published after the commit). Each run logs
//! `BENCH_OUTBOX_CLIENTS` (default 16) clients in as alice and has each add a product to its
//! cart and check out, over and over, for `BENCH_OUTBOX_SECONDS` (default 20) after a 2 s
//! warm-up; it prints orders/s and the p50/p99 of the checkout POST. After the outbox run it
//! also waits (at most 30 s) until the relay has published every order's task and prints how
//! long that took past the last checkout. No worker runs.
//!
//! `cargo bench -p switchyard-demo --bench outbox_load` (the services from
//! `SWITCHYARD_POSTGRES__URL` and `SWITCHYARD_NATS__URL`). Traffic goes to 127.0.0.1 only; every
//! loop is bounded in time and by `BENCH_OUTBOX_MAX_ORDERS` (default 1,000,000). The databases
//! and streams are deleted at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_actors::tasks::NatsNames;

#[path = "../tests/common/mod.rs"]
mod common;

struct Run {
    orders: u64,
    failed: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
    /// Outbox: how long after the last checkout the relay had published every task.
    drained_after: Option<Duration>,
    published: u64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn published(js: &async_nats::jetstream::Context, prefix: &str) -> u64 {
    let names = NatsNames::new(prefix);
    match js.get_stream(names.tasks_stream()).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn one_run(outbox: bool, clients: usize, seconds: u64, max_orders: u64) -> Run {
    let db_url = common::fresh_postgres_url();
    let nats_url = common::service_url("nats");
    let prefix = common::unique_name("syobx");
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
                "outbox-bench-secret-key-0123456789abcdef".into(),
            ),
            ("SWITCHYARD_LOG__LEVEL".into(), "warn".into()),
            (
                "SWITCHYARD_TASKS__OUTBOX".into(),
                if outbox { "postgres" } else { "" }.into(),
            ),
        ],
        ..Default::default()
    });
    let node = Arc::new(node);
    // Log the clients in one after the other (concurrent logins would find every password
    // hashing slot taken: 503, by design).
    let mut sessions = Vec::new();
    for n in 0..clients {
        let c = common::client();
        common::login(&c, &node, "alice", "wonderland").await;
        let (_, html) = common::get_page(&c, &node.url("/cart")).await;
        let token = common::csrf_token(&html).unwrap_or_default();
        sessions.push((n, c, token));
    }
    let warmup_until = Instant::now() + Duration::from_secs(2);
    let deadline = warmup_until + Duration::from_secs(seconds);
    let orders = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for (n, c, mut token) in sessions {
        let node = node.clone();
        let orders = orders.clone();
        handles.push(tokio::spawn(async move {
            let product = switchyard_demo::PRODUCTS[n % switchyard_demo::PRODUCTS.len()].id;
            let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
            while Instant::now() < deadline && orders.load(Ordering::Relaxed) < max_orders {
                let form = [("csrfmiddlewaretoken", token.as_str())];
                let added = c
                    .post(node.url(&format!("/cart/add/{product}")))
                    .form(&form)
                    .send()
                    .await;
                if !added.is_ok_and(|r| r.status().is_redirection() || r.status().is_success()) {
                    failed += 1;
                    let (_, html) = common::get_page(&c, &node.url("/cart")).await;
                    token = common::csrf_token(&html).unwrap_or_default();
                    continue;
                }
                let t = Instant::now();
                let res = c.post(node.url("/orders")).form(&form).send().await;
                let took = t.elapsed();
                let good =
                    res.is_ok_and(|r| r.status().is_redirection() || r.status().is_success());
                if Instant::now() < warmup_until {
                    continue;
                }
                if good {
                    ok += 1;
                    orders.fetch_add(1, Ordering::Relaxed);
                    lat.push(took.as_micros() as u64);
                } else {
                    failed += 1;
                }
            }
            (ok, failed, lat)
        }));
    }
    let mut run = Run {
        orders: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        drained_after: None,
        published: 0,
    };
    for h in handles {
        let (ok, failed, lat) = h.await.expect("client");
        run.orders += ok;
        run.failed += failed;
        run.latencies_us.extend(lat);
    }
    let ended = Instant::now();
    run.elapsed = ended.saturating_duration_since(warmup_until);
    run.latencies_us.sort_unstable();
    // Every order (warm-up included) has its task in the stream once the relay caught up.
    let client = async_nats::connect(&nats_url).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let (pg, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .expect("postgres");
    tokio::spawn(conn);
    let total_orders: i64 = pg
        .query_one("SELECT count(*) FROM switchyard_orders", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        run.published = published(&js, &prefix).await;
        if run.published >= total_orders as u64 {
            if outbox {
                run.drained_after = Some(ended.elapsed());
            }
            break;
        }
        if Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(pg);
    drop(node);
    common::drop_database(&db_url).await;
    common::delete_stream(&nats_url, &NatsNames::new(&prefix).tasks_stream()).await;
    for bucket in [
        "results",
        "unique",
        "sessions",
        "login",
        "beat",
        "scheduler",
    ] {
        common::delete_stream(&nats_url, &format!("KV_{prefix}_{bucket}")).await;
    }
    for stream in [
        NatsNames::new(&prefix).dead_stream(),
        NatsNames::new(&prefix).scheduled_stream(),
    ] {
        common::delete_stream(&nats_url, &stream).await;
    }
    run
}

fn main() {
    let clients = common::env_num("BENCH_OUTBOX_CLIENTS", 16) as usize;
    let seconds = common::env_num("BENCH_OUTBOX_SECONDS", 20);
    let max_orders = common::env_num("BENCH_OUTBOX_MAX_ORDERS", 1_000_000);
    if !common::service_available("postgres") || !common::service_available("nats") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        println!("checkout: {clients} clients, {seconds} s each (after a 2 s warm-up)");
        for outbox in [true, false] {
            let run = one_run(outbox, clients, seconds, max_orders).await;
            let name = if outbox { "outbox (postgres)" } else { "publish after commit" };
            println!(
                "  {name:<22} {:>6} orders  {:>7.1} orders/s  p50 {:.1} ms  p99 {:.1} ms  failed {}  tasks published {}{}",
                run.orders,
                run.orders as f64 / run.elapsed.as_secs_f64().max(f64::EPSILON),
                percentile(&run.latencies_us, 0.5),
                percentile(&run.latencies_us, 0.99),
                run.failed,
                run.published,
                run.drained_after
                    .map(|d| format!("  (relay caught up {:.0} ms after the last checkout)", d.as_secs_f64() * 1000.0))
                    .unwrap_or_default(),
            );
        }
    });
}
