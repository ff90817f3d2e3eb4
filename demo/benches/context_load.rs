//! Load harness for context processors: one page, five application processors, rendered
//! lazily (only the processor the template uses runs), eagerly (`context.lazy = false`: all
//! five run, as in Django) and with no processors at all, in one run. Two of the five wait on
//! simulated I/O (200 µs), as processors that query a database do.
//!
//! `cargo bench --bench context_load` (env: `LOAD_SECONDS`, default 5; `LOAD_CONNECTIONS`,
//! default 32). Traffic goes to 127.0.0.1 only.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{json, Map};
use switchyard::config::Config;
use switchyard::context::{ProcessResult, Request as RequestSnapshot};
use switchyard::{web, App, ContextProcessor, Render};

#[path = "support/mod.rs"]
mod support;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A processor providing one variable, optionally after simulated I/O.
struct Work {
    name: &'static str,
    provides: &'static [&'static str],
    io: Option<Duration>,
}

impl ContextProcessor for Work {
    fn name(&self) -> &str {
        self.name
    }
    fn provides(&self) -> &[&'static str] {
        self.provides
    }
    fn process(&self, req: Arc<RequestSnapshot>) -> BoxFuture<'static, ProcessResult> {
        let (var, io) = (self.provides[0], self.io);
        Box::pin(async move {
            if let Some(d) = io {
                tokio::time::sleep(d).await;
            }
            let mut m = Map::new();
            m.insert(var.into(), json!({"path": req.path, "items": [1, 2, 3]}));
            Ok(m)
        })
    }
}

fn processors() -> Vec<Work> {
    let io = Some(Duration::from_micros(200));
    vec![
        Work {
            name: "p1",
            provides: &["v1"],
            io: None,
        },
        Work {
            name: "p2",
            provides: &["v2"],
            io,
        },
        Work {
            name: "p3",
            provides: &["v3"],
            io: None,
        },
        Work {
            name: "p4",
            provides: &["v4"],
            io,
        },
        Work {
            name: "p5",
            provides: &["v5"],
            io: None,
        },
    ]
}

const TEMPLATE: &str =
    "<h1>Page</h1>{{#each rows}}<p>{{this}}</p>{{/each}}<footer>{{v1.path}}</footer>";

fn start(
    dir: &std::path::Path,
    configure: impl FnOnce(&mut Config) + Send + 'static,
) -> (SocketAddr, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let dir = dir.to_path_buf();
    let thread = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let mut config = Config::default();
            config.server.bind = "127.0.0.1:0".into();
            config.server.debug = false;
            config.server.secret_key = "load-harness-secret-key-0123456789abcdef".into();
            config.server.templates = dir;
            config.context.processors = ["p1", "p2", "p3", "p4", "p5"].map(String::from).to_vec();
            configure(&mut config);
            let mut app = App::new(config).routes(|cfg| {
                cfg.route(
                    "/",
                    web::get().to(|| async {
                        Render::new("page", json!({"rows": ["a", "b", "c", "d"]}))
                    }),
                );
            });
            for p in processors() {
                app = app.context_processor(p);
            }
            let running = app.start().await.expect("node starts");
            addr_tx.send(running.addr()).expect("send addr");
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            running.stop().await;
        });
    });
    (addr_rx.recv().expect("started"), stop_tx, thread)
}

fn main() {
    let seconds = support::env_num("LOAD_SECONDS", 5);
    let connections = support::env_num("LOAD_CONNECTIONS", 32) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("page.hbs"), TEMPLATE).expect("template");
    let nodes = [
        ("lazy (1 of 5 runs)", start(dir.path(), |_| {})),
        (
            "eager (5 of 5 run)",
            start(dir.path(), |c| c.context.lazy = false),
        ),
        (
            "no processors",
            start(dir.path(), |c| c.context.processors = vec![]),
        ),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let urls: Vec<String> = nodes
        .iter()
        .map(|(_, (a, _, _))| format!("http://{a}/"))
        .collect();
    for u in &urls {
        rt.block_on(support::drive(u, connections, Duration::from_millis(500)));
    }
    let mut results: Vec<support::LoadResult> =
        urls.iter().map(|_| support::LoadResult::empty()).collect();
    for _ in 0..seconds {
        for (u, r) in urls.iter().zip(results.iter_mut()) {
            r.merge(rt.block_on(support::drive(u, connections, Duration::from_secs(1))));
        }
    }
    println!("load::context_processors  ({connections} connections, {seconds} rounds of 1 s each)");
    for ((label, _), r) in nodes.iter().zip(&results) {
        println!("  {label:<20} {}", r.summary());
    }
    println!(
        "  lazy/none = {:.3}   eager/none = {:.3}   lazy/eager = {:.3}",
        results[0].rps() / results[2].rps(),
        results[1].rps() / results[2].rps(),
        results[0].rps() / results[1].rps()
    );
    for (_, (_, stop, thread)) in nodes {
        let _ = stop.send(());
        let _ = thread.join();
    }
}
