//! Session engine benchmarks against baselines measured in the same run:
//!
//! - `sessions::postgres_saves`: the `postgres` engine through its shard actors (group commit)
//!   against a naive loop of one `INSERT … ON CONFLICT` per save over the same pool: 64
//!   concurrent savers, pool 16, 1 KiB values; saves/s and p99 save latency.
//! - `sessions::cached_db_get_cart`: read-only `GET /cart` on a node with `cached_db` against
//!   one with `memory`.
//! - `sessions::nats_kv_get_put`: the `nats_kv` engine's load + versioned save against a raw
//!   KV get + put loop on the same bucket.
//!
//! `cargo bench --bench sessions` (env: `SESSIONS_BENCH_SECONDS` per measurement, default 15;
//! `SESSIONS_BENCH_RUNS`, default 3, the median is reported; `SESSIONS_BENCH_ONLY`, a
//! comma-separated subset of `postgres,cached_db,nats_kv`). Needs the machine's Postgres and
//! NATS (URLs from `SWITCHYARD_POSTGRES__URL` / `SWITCHYARD_NATS__URL`). Traffic goes to
//! 127.0.0.1 only; every loop is bounded in time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use switchyard::config::{Config, SessionEngine};
use switchyard_actors::session::{
    connect_pool_with_timeout, now_unix, Change, NatsConnect, NatsKvStore, NatsLink, PostgresStore,
    Record, RecordCodec, SaveSession, SessionId, SessionShards, SessionStore,
};
use tokio_postgres::types::Type;

#[path = "support/mod.rs"]
mod support;

const SAVERS: usize = 64;
const POOL: u32 = 16;
const VALUE_BYTES: usize = 1024;
/// `actors.session_shards`' default; `SESSIONS_BENCH_SHARDS` overrides.
const SHARDS: usize = 8;
const KV_WORKERS: usize = 16;
const HTTP_CONNECTIONS: usize = 32;

fn wanted(part: &str) -> bool {
    std::env::var("SESSIONS_BENCH_ONLY")
        .map(|v| v.split(',').any(|p| p.trim() == part))
        .unwrap_or(true)
}

fn postgres_url(db: &str) -> String {
    let base = std::env::var("SWITCHYARD_POSTGRES__URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/switchyard".into());
    match base.rfind('/') {
        Some(i) if i > base.find("://").map_or(0, |j| j + 2) => format!("{}/{db}", &base[..i]),
        _ => format!("{base}/{db}"),
    }
}

fn blob() -> Value {
    json!("x".repeat(VALUE_BYTES))
}

/// Operations and their latencies (µs) over one timed run.
struct Run {
    ops: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn p50_ms(&self) -> f64 {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        v[(v.len() - 1) / 2] as f64 / 1000.0
    }
    fn p99_ms(&self) -> f64 {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        v[((v.len() - 1) as f64 * 0.99) as usize] as f64 / 1000.0
    }
}

/// Waits for every worker of a run started at `started` and merges what they counted.
async fn gather(tasks: Vec<tokio::task::JoinHandle<(u64, Vec<u64>)>>, started: Instant) -> Run {
    let mut parts = Vec::new();
    for t in tasks {
        if let Ok(p) = t.await {
            parts.push(p);
        }
    }
    merge(parts, started.elapsed())
}

fn merge(parts: Vec<(u64, Vec<u64>)>, elapsed: Duration) -> Run {
    let mut latencies_us = Vec::new();
    let mut ops = 0;
    for (n, lat) in parts {
        ops += n;
        latencies_us.extend(lat);
    }
    Run {
        ops,
        elapsed,
        latencies_us,
    }
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

async fn engine_saves(shards: &SessionShards, seconds: u64) -> Run {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..SAVERS)
        .map(|_| {
            let shards = shards.clone();
            actix_rt::spawn(async move {
                let mut data = Map::new();
                data.insert("blob".into(), blob());
                let (mut id, mut version) = (None::<SessionId>, None::<u64>);
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let saved = shards
                        .save(SaveSession {
                            id: id.clone(),
                            base_version: version,
                            data: data.clone(),
                            changes: vec![Change::Set("blob".into(), blob())],
                            expires_at: now_unix() + 3600,
                            max_size: 65536,
                            delete_after: None,
                        })
                        .await;
                    match saved {
                        Ok(s) => {
                            lat.push(t.elapsed().as_micros() as u64);
                            id = Some(s.id);
                            version = Some(s.version);
                        }
                        Err(e) => eprintln!("engine save failed: {e}"),
                    }
                }
                (lat.len() as u64, lat)
            })
        })
        .collect();
    gather(tasks, started).await
}

const NAIVE_UPSERT: &str =
    "INSERT INTO bench_naive_sessions (id, data, expires_at, version, updated_at)
     VALUES ($1, $2, $3, 1, $4)
     ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data, expires_at = EXCLUDED.expires_at,
         version = bench_naive_sessions.version + 1, updated_at = EXCLUDED.updated_at";

async fn naive_saves(pool: &switchyard_actors::session::PgPool, seconds: u64) -> Run {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..SAVERS)
        .map(|_| {
            let pool = pool.clone();
            actix_rt::spawn(async move {
                let id = SessionId::generate().as_str().to_owned();
                let mut data = Map::new();
                data.insert("blob".into(), blob());
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let bytes = serde_json::to_vec(&data).unwrap_or_default();
                    let now = now_unix();
                    let r = match pool.get().await {
                        Ok(conn) => conn
                            .query_typed(
                                NAIVE_UPSERT,
                                &[
                                    (&id, Type::TEXT),
                                    (&bytes, Type::BYTEA),
                                    (&(now + 3600), Type::INT8),
                                    (&now, Type::INT8),
                                ],
                            )
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match r {
                        Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                        Err(e) => eprintln!("naive save failed: {e}"),
                    }
                }
                (lat.len() as u64, lat)
            })
        })
        .collect();
    gather(tasks, started).await
}

fn bench_postgres(seconds: u64, runs: u64) {
    let sys = actix_rt::System::new();
    sys.block_on(async move {
        let url = postgres_url("switchyard_bench");
        let pool = connect_pool_with_timeout(&url, POOL, Duration::from_secs(60))
            .await
            .expect("postgres");
        // A fresh table with the engine's current definition.
        pool.get()
            .await
            .expect("conn")
            .batch_execute("DROP TABLE IF EXISTS switchyard_sessions")
            .await
            .expect("drop");
        let store = Arc::new(
            PostgresStore::open(pool.clone(), RecordCodec::plain())
                .await
                .expect("store"),
        );
        {
            let conn = pool.get().await.expect("conn");
            conn.batch_execute(
                "CREATE TABLE IF NOT EXISTS bench_naive_sessions (id text PRIMARY KEY, \
                 data bytea NOT NULL, expires_at bigint NOT NULL, version bigint NOT NULL, \
                 updated_at bigint NOT NULL);
                 TRUNCATE bench_naive_sessions; TRUNCATE switchyard_sessions;",
            )
            .await
            .expect("tables");
        }
        let arbiter = actix::Arbiter::new();
        let shard_count = support::env_num("SESSIONS_BENCH_SHARDS", SHARDS as u64) as usize;
        let shards = SessionShards::start(shard_count, store.clone(), &arbiter.handle());
        let (mut engine, mut naive) = (Vec::new(), Vec::new());
        for run in 0..runs {
            // Each run starts from empty tables (no dead rows left by the previous one).
            pool.get()
                .await
                .expect("conn")
                .batch_execute("TRUNCATE bench_naive_sessions; TRUNCATE switchyard_sessions;")
                .await
                .expect("truncate");
            let (b0, r0) = store.batch_stats();
            let e = engine_saves(&shards, seconds).await;
            let (b1, r1) = store.batch_stats();
            let n = naive_saves(&pool, seconds).await;
            println!(
                "  run {}: engine {:>8.0} saves/s (p99 {:.2} ms, {:.1} rows/statement)   naive {:>8.0} saves/s (p99 {:.2} ms)",
                run + 1,
                e.rate(),
                e.p99_ms(),
                (r1 - r0) as f64 / (b1 - b0).max(1) as f64,
                n.rate(),
                n.p99_ms()
            );
            engine.push(e);
            naive.push(n);
        }
        let (e, n) = (median(engine), median(naive));
        println!(
            "sessions::postgres_saves  ({SAVERS} savers, pool {POOL}, {VALUE_BYTES} B values, {shard_count} shards, {seconds} s, median of {runs})"
        );
        println!(
            "  postgres engine     {:>8.0} saves/s  p50 {:.2} ms  p99 {:.2} ms",
            e.rate(),
            e.p50_ms(),
            e.p99_ms()
        );
        println!(
            "  naive upsert loop   {:>8.0} saves/s  p50 {:.2} ms  p99 {:.2} ms",
            n.rate(),
            n.p50_ms(),
            n.p99_ms()
        );
        println!("  ratio engine/naive = {:.2}", e.rate() / n.rate());
        arbiter.stop();
    });
}

fn shop_config(engine: SessionEngine) -> Config {
    let mut config = Config::load(Some(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/default.toml"
    ))))
    .expect("config");
    config.server.bind = "127.0.0.1:0".into();
    config.server.debug = false;
    config.server.secret_key = "sessions-bench-secret-key-0123456789abcdef".into();
    config.sessions.engine = engine;
    config.postgres.url = postgres_url("switchyard_bench").into();
    config.nats.url = support::nats_url().into();
    config.nats.prefix = "switchyard_bench".into();
    config
}

/// A session with one item in its cart on `addr`: its cookie header.
async fn cart_cookie(addr: std::net::SocketAddr) -> String {
    // A cookie store: the CSRF token of the form must come back with its cookie.
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let page = client
        .get(format!("http://{addr}/"))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .unwrap_or_default();
    let key = "name=\"csrfmiddlewaretoken\" value=\"";
    let token = page.find(key).and_then(|i| {
        let s = i + key.len();
        page[s..].find('"').map(|e| page[s..s + e].to_owned())
    });
    let res = client
        .post(format!("http://{addr}/cart/add/1"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            token
                .map(|t| format!("csrfmiddlewaretoken={t}"))
                .unwrap_or_default(),
        )
        .send()
        .await
        .expect("add to cart");
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("sessionid="))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
        .expect("session cookie")
}

fn bench_cached_db(seconds: u64, runs: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // Both nodes run side by side; the runs alternate so that both see the same machine.
    let engines = [SessionEngine::Memory, SessionEngine::CachedDb];
    let nodes: Vec<_> = engines
        .iter()
        .map(|e| support::start_node(shop_config(*e)))
        .collect();
    // cached_db caches only after its warm-up (every writer must know the node first).
    std::thread::sleep(switchyard_actors::session::CACHED_DB_WARM_UP + Duration::from_millis(500));
    let targets: Vec<(String, String)> = nodes
        .iter()
        .map(|n| {
            (
                format!("http://{}/cart", n.addr),
                rt.block_on(cart_cookie(n.addr)),
            )
        })
        .collect();
    let drive = |(url, cookie): &(String, String), d: Duration| {
        let cookie = cookie.clone();
        rt.block_on(support::drive_with(
            url,
            HTTP_CONNECTIONS,
            d,
            move |c, u| c.get(u).header("cookie", cookie.clone()),
        ))
    };
    for t in &targets {
        drive(t, Duration::from_millis(500));
    }
    let mut results: Vec<Vec<support::LoadResult>> = vec![Vec::new(), Vec::new()];
    for run in 0..runs {
        for (i, t) in targets.iter().enumerate() {
            let r = drive(t, Duration::from_secs(seconds));
            println!(
                "  run {}: {:<10} {}",
                run + 1,
                engines[i].as_str(),
                r.summary()
            );
            results[i].push(r);
        }
    }
    for node in nodes {
        node.stop();
    }
    println!(
        "sessions::cached_db_get_cart  (GET /cart, {HTTP_CONNECTIONS} connections, {seconds} s, median of {runs})"
    );
    let mut rates = Vec::new();
    for (engine, mut rs) in engines.iter().zip(results) {
        rs.sort_by(|a, b| a.rps().total_cmp(&b.rps()));
        let mid = rs.len() / 2;
        let r = rs.swap_remove(mid);
        println!("  {:<10} {}", engine.as_str(), r.summary());
        rates.push(r.rps());
    }
    if let [memory, cached] = rates[..] {
        println!("  ratio cached_db/memory = {:.3}", cached / memory);
    }
}

async fn kv_engine(store: &Arc<NatsKvStore>, seconds: u64) -> Run {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..KV_WORKERS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = SessionId::generate();
                let mut data = Map::new();
                data.insert("blob".into(), blob());
                let mut record = Record {
                    data,
                    expires_at: now_unix() + 3600,
                    version: 1,
                    updated_at: now_unix(),
                };
                let _ = store.save(&id, &record, None).await;
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let Ok(Some(current)) = store.load(&id).await else {
                        eprintln!("nats_kv load failed");
                        continue;
                    };
                    record.version = current.version + 1;
                    match store.save(&id, &record, Some(current.version)).await {
                        Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                        Err(e) => eprintln!("nats_kv save failed: {e}"),
                    }
                }
                (lat.len() as u64, lat)
            })
        })
        .collect();
    gather(tasks, started).await
}

/// Raw get + put (`cas = false`) or get + update at the revision read (`cas = true`).
async fn kv_raw(kv: &async_nats::jetstream::kv::Store, seconds: u64, cas: bool) -> Run {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..KV_WORKERS)
        .map(|_| {
            let kv = kv.clone();
            tokio::spawn(async move {
                let key = format!("raw{}", &SessionId::generate().as_str()[..16]).replace('-', "_");
                let value = bytes::Bytes::from(vec![b'x'; VALUE_BYTES + 64]);
                let _ = kv.put(&key, value.clone()).await;
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = if cas {
                        match kv.entry(&key).await {
                            Ok(Some(e)) => kv.update(&key, value.clone(), e.revision).await.is_ok(),
                            _ => false,
                        }
                    } else {
                        kv.get(&key).await.is_ok() && kv.put(&key, value.clone()).await.is_ok()
                    };
                    if ok {
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                }
                let _ = kv.purge(&key).await;
                (lat.len() as u64, lat)
            })
        })
        .collect();
    gather(tasks, started).await
}

fn bench_nats_kv(seconds: u64, runs: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let link = NatsLink::connect(&NatsConnect {
            url: support::nats_url(),
            ..Default::default()
        })
        .await
        .expect("nats");
        let store = Arc::new(
            NatsKvStore::open(link, "switchyard_bench_sessions", RecordCodec::plain(), 1)
                .await
                .expect("bucket"),
        );
        let kv = store.kv().clone();
        let (mut engine, mut raw, mut raw_cas) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let e = kv_engine(&store, seconds).await;
            let r = kv_raw(&kv, seconds, false).await;
            let c = kv_raw(&kv, seconds, true).await;
            println!(
                "  run {}: engine {:>8.0} get+put/s   raw {:>8.0} get+put/s   raw with revision check {:>8.0}/s",
                run + 1,
                e.rate(),
                r.rate(),
                c.rate()
            );
            engine.push(e);
            raw.push(r);
            raw_cas.push(c);
        }
        let (e, r, c) = (median(engine), median(raw), median(raw_cas));
        println!("sessions::nats_kv_get_put  ({KV_WORKERS} workers, {VALUE_BYTES} B values, {seconds} s, median of {runs})");
        println!("  nats_kv engine  {:>8.0} get+put/s  p99 {:.2} ms", e.rate(), e.p99_ms());
        println!("  raw KV loop     {:>8.0} get+put/s  p99 {:.2} ms", r.rate(), r.p99_ms());
        println!(
            "  raw KV get+update at revision (what a versioned write costs)  {:>8.0}/s  p99 {:.2} ms",
            c.rate(),
            c.p99_ms()
        );
        println!("  ratio engine/raw = {:.2}", e.rate() / r.rate());
    });
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let seconds = support::env_num("SESSIONS_BENCH_SECONDS", 15);
    let runs = support::env_num("SESSIONS_BENCH_RUNS", 3).max(1);
    if wanted("postgres") {
        bench_postgres(seconds, runs);
    }
    if wanted("cached_db") {
        bench_cached_db(seconds, runs);
    }
    if wanted("nats_kv") {
        bench_nats_kv(seconds, runs);
    }
}
