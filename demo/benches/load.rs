//! Load harness: `GET /` on a real in-process Switchyard node against a bare actix-web handler
//! rendering the same template, in one run. Prints req/s, p50/p99 and the ratio.
//!
//! `cargo bench --bench load` (env: `LOAD_SECONDS` per side, default 5; `LOAD_CONNECTIONS`,
//! default 32). Traffic goes to 127.0.0.1 only; every loop is bounded in time.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use actix_web::{web, HttpResponse, HttpServer};
use serde_json::json;
use switchyard::config::Config;
use switchyard::http::templates::Templates;

#[path = "support/mod.rs"]
mod support;

/// The same allocator as the `switchyard` binary, for both sides.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn products() -> serde_json::Value {
    let list: Vec<_> = switchyard_demo::PRODUCTS
        .iter()
        .map(|p| {
            json!({
                "id": p.id, "name": p.name, "description": p.description,
                "price": format!("{}.{:02}", p.price_cents / 100, p.price_cents % 100),
            })
        })
        .collect();
    // What the context processors give an anonymous visitor, as constants: the bare handler
    // renders the same page (CSRF fields included), so the ratio is the cost of computing
    // them (session, processors, middleware), not of a smaller page.
    json!({
        "title": "Products", "products": list, "static_url": "/static/", "debug": false,
        "csrf_token": "Zk3vYq8W1uXo2Rb7Ns5Tc0Lm9Pa4Hd6EjQ1wB5yG7iK", "cart_count": 0, "messages": [],
        "user": {"username": "", "is_authenticated": false}, "perms": [],
    })
}

/// Starts the bare baseline: one actix-web handler rendering `shop/index` directly.
fn start_bare(workers: usize) -> (SocketAddr, actix_web::dev::ServerHandle) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let sys = actix_rt::System::new();
        sys.block_on(async move {
            let templates = web::Data::new(
                Templates::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../templates"), false)
                    .expect("templates load"),
            );
            let ctx = web::Data::new(products());
            let server = HttpServer::new(move || {
                actix_web::App::new()
                    .app_data(templates.clone())
                    .app_data(ctx.clone())
                    .route(
                        "/",
                        web::get().to(
                            |t: web::Data<Templates>, c: web::Data<serde_json::Value>| async move {
                                match t.render("shop/index", &c) {
                                    Ok(html) => HttpResponse::Ok()
                                        .content_type("text/html; charset=utf-8")
                                        .body(html),
                                    Err(e) => {
                                        HttpResponse::InternalServerError().body(e.to_string())
                                    }
                                }
                            },
                        ),
                    )
            })
            .workers(workers)
            .bind("127.0.0.1:0")
            .expect("bind");
            let addr = server.addrs()[0];
            let server = server.run();
            tx.send((addr, server.handle())).expect("send addr");
            let _ = server.await;
        });
    });
    rx.recv().expect("bare server started")
}

fn main() {
    let seconds = support::env_num("LOAD_SECONDS", 5);
    let connections = support::env_num("LOAD_CONNECTIONS", 32) as usize;
    let mut config = Config::load(Some(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/default.toml"
    ))))
    .expect("config");
    config.server.bind = "127.0.0.1:0".into();
    config.server.debug = false;
    config.server.secret_key = "load-harness-secret-key-0123456789abcdef".into();
    // Knobs for finding where time goes: LOAD_PROCESSORS=a,b (or "none"), LOAD_ENGINE=name.
    if let Ok(list) = std::env::var("LOAD_PROCESSORS") {
        config.context.processors = list
            .split(',')
            .filter(|s| !s.is_empty() && *s != "none")
            .map(str::to_owned)
            .collect();
    }
    if let Ok(engine) = std::env::var("LOAD_ENGINE") {
        config.sessions.engine = toml::Value::String(engine)
            .try_into()
            .expect("LOAD_ENGINE names an engine");
    }
    let workers = config.actors.http_workers as usize;

    let node = support::start_node(config);
    let (bare_addr, bare) = start_bare(workers);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // Warm both up, then alternate one-second rounds so that whatever else the machine
    // does falls on both sides alike.
    let sy_url = format!("http://{}/", node.addr);
    let bare_url = format!("http://{bare_addr}/");
    let only = std::env::var("LOAD_ONLY").unwrap_or_default();
    let (run_switchyard, run_bare) = (only != "bare", only != "switchyard");
    let warm = Duration::from_millis(500);
    let bytes = |url: &str| {
        rt.block_on(async {
            match reqwest::get(url).await {
                Ok(r) => r.bytes().await.map(|b| b.len()).unwrap_or(0),
                Err(_) => 0,
            }
        })
    };
    let page_bytes = (bytes(&sy_url), bytes(&bare_url));
    rt.block_on(support::drive(&sy_url, connections, warm));
    rt.block_on(support::drive(&bare_url, connections, warm));
    let round = Duration::from_secs(1);
    let mut sy = support::LoadResult::empty();
    let mut base = support::LoadResult::empty();
    for _ in 0..seconds {
        if run_switchyard {
            sy.merge(rt.block_on(support::drive(&sy_url, connections, round)));
        }
        if run_bare {
            base.merge(rt.block_on(support::drive(&bare_url, connections, round)));
        }
    }

    println!(
        "load::get_index  ({connections} connections, {seconds} s each, {workers} http workers)"
    );
    println!(
        "  page: switchyard {} bytes, bare {} bytes",
        page_bytes.0, page_bytes.1
    );
    println!("  switchyard GET /   {}", sy.summary());
    println!("  bare actix-web     {}", base.summary());
    println!("  ratio switchyard/bare = {:.3}", sy.rps() / base.rps());
    rt.block_on(bare.stop(false));
    node.stop();
}
