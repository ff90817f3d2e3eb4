//! Load harness for sessions: a cart page that reads the session cart and writes the session
//! on every request (`memory` engine), against the same page rendered without a session, in
//! one run on one in-process node. Prints req/s, p50/p99 and the ratio.
//!
//! `cargo bench --bench sessions_load` (env: `LOAD_SECONDS`, default 5; `LOAD_CONNECTIONS`,
//! default 32; `LOAD_ENGINE`, default memory; `LOAD_ONLY=with` or `without` drives one side,
//! for profiling one under callgrind). Traffic goes to 127.0.0.1 only.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;
use switchyard::config::Config;
use switchyard::{web, App, Render, Session};

#[path = "support/mod.rs"]
mod support;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TEMPLATE: &str = "<h1>Cart</h1><table>{{#each items}}<tr><td>{{name}}</td><td>{{qty}}</td></tr>{{/each}}</table><p>{{visits}}</p>";

fn items(cart: &BTreeMap<String, u32>) -> serde_json::Value {
    json!(cart
        .iter()
        .map(|(k, v)| json!({"name": format!("product {k}"), "qty": v}))
        .collect::<Vec<_>>())
}

fn fixed_cart() -> BTreeMap<String, u32> {
    BTreeMap::from([("1".into(), 2), ("2".into(), 1), ("3".into(), 4)])
}

async fn with_session(session: Session) -> Render {
    let cart: BTreeMap<String, u32> = session
        .get("cart")
        .ok()
        .flatten()
        .unwrap_or_else(fixed_cart);
    // The write: a visit counter, as a page that tracks something per visitor would.
    let visits = session
        .update("visits", |v: Option<u64>| v.unwrap_or(0) + 1)
        .unwrap_or(0);
    Render::new("cart", json!({"items": items(&cart), "visits": visits}))
}

async fn without_session() -> Render {
    Render::new("cart", json!({"items": items(&fixed_cart()), "visits": 1}))
}

fn main() {
    let seconds = support::env_num("LOAD_SECONDS", 5);
    let connections = support::env_num("LOAD_CONNECTIONS", 32) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cart.hbs"), TEMPLATE).expect("template");
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".into();
    config.server.debug = false;
    config.server.secret_key = "load-harness-secret-key-0123456789abcdef".into();
    config.server.templates = dir.path().to_path_buf();
    config.context.processors = vec![];
    if let Ok(engine) = std::env::var("LOAD_ENGINE") {
        config.sessions.engine = toml::Value::String(engine).try_into().expect("engine name");
    }

    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let running = App::new(config)
                .routes(|cfg| {
                    cfg.route("/with-session", web::get().to(with_session))
                        .route("/without-session", web::get().to(without_session));
                })
                .start()
                .await
                .expect("node starts");
            addr_tx.send(running.addr()).expect("send addr");
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            running.stop().await;
        });
    });
    let addr = addr_rx.recv().expect("started");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let with = format!("http://{addr}/with-session");
    let without = format!("http://{addr}/without-session");
    // Each connection's client keeps its cookie: its first request creates the session, every
    // later one loads it, updates it and saves it.
    let drive_with = |d| support::drive(&with, connections, d);
    rt.block_on(drive_with(Duration::from_millis(500)));
    rt.block_on(support::drive(
        &without,
        connections,
        Duration::from_millis(500),
    ));
    let only = std::env::var("LOAD_ONLY").unwrap_or_default();
    let (run_with, run_without) = (only != "without", only != "with");
    let mut a = support::LoadResult::empty();
    let mut b = support::LoadResult::empty();
    for _ in 0..seconds {
        if run_with {
            a.merge(rt.block_on(drive_with(Duration::from_secs(1))));
        }
        if run_without {
            b.merge(rt.block_on(support::drive(
                &without,
                connections,
                Duration::from_secs(1),
            )));
        }
    }
    println!("load::cart_session  ({connections} connections, {seconds} rounds of 1 s each side)");
    println!("  session read + write   {}", a.summary());
    println!("  same page, no session  {}", b.summary());
    println!("  ratio = {:.3}", a.rps() / b.rps());
    let _ = stop_tx.send(());
    let _ = thread.join();
}
