//! Tasks inside a node built with the public `App` API: a registered task published from a
//! handler runs on the node's in-process workers, and stopping the node drains them (the
//! task in flight finishes before `stop` returns).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::config::Config;
use switchyard::tasks::{Task, TaskContext, TaskError, TaskState, Tasks};
use switchyard::{web, App};

/// Works `ms` milliseconds, then raises its flag.
struct Slow(Arc<AtomicBool>);

impl Task for Slow {
    const NAME: &'static str = "test.slow";
    type Args = SlowArgs;
    type Output = u64;

    async fn run(&self, _ctx: TaskContext, args: SlowArgs) -> Result<u64, TaskError> {
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        self.0.store(true, Ordering::SeqCst);
        Ok(args.ms)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SlowArgs {
    ms: u64,
}

async fn go(tasks: web::Data<Tasks>) -> Result<String, switchyard::Error> {
    let handle = tasks
        .delay::<Slow>(SlowArgs { ms: 500 })
        .await
        .map_err(switchyard::Error::internal)?;
    Ok(handle.id().to_owned())
}

async fn state(tasks: web::Data<Tasks>, id: web::Path<String>) -> String {
    tasks
        .result(&id)
        .await
        .map(|r| r.state.as_str().to_owned())
        .unwrap_or_else(|e| e.to_string())
}

fn config() -> Config {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".into();
    config.server.templates = format!("{}/../templates", env!("CARGO_MANIFEST_DIR")).into();
    config.tasks.drain_timeout = 10;
    config
}

#[actix_rt::test]
async fn stopping_the_node_drains_in_flight_tasks() {
    let done = Arc::new(AtomicBool::new(false));
    let app = App::new(config()).task(Slow(done.clone())).routes(|cfg| {
        cfg.route("/go", web::get().to(go))
            .route("/state/{id}", web::get().to(state));
    });
    // The application's task beside the built-in one.
    assert_eq!(
        app.tasks().names(),
        ["switchyard.clear_sessions", "test.slow"]
    );
    let running = app.start().await.expect("node starts");
    let base = format!("http://{}", running.addr());
    let c = reqwest::Client::new();
    let id = c
        .get(format!("{base}/go"))
        .send()
        .await
        .expect("GET /go")
        .text()
        .await
        .expect("id");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c
            .get(format!("{base}/state/{id}"))
            .send()
            .await
            .expect("GET /state")
            .text()
            .await
            .expect("state");
        if s == TaskState::Started.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "task {id} is {s}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!done.load(Ordering::SeqCst));
    let t0 = Instant::now();
    running.stop().await;
    assert!(
        done.load(Ordering::SeqCst),
        "stop returned before the task finished"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
