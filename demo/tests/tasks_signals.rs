//! Signals and the in-process task workers: the first SIGTERM stops HTTP and drains the workers
//! warm; a second one turns the drain cold, so a long task no longer holds the node up. (Its own
//! test binary: the signals go to this whole process.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use switchyard::config::Config;
use switchyard::tasks::{Task, TaskContext, TaskError, TaskState, Tasks};
use switchyard::{web, App};

/// Sleeps ten seconds unless cancelled; records whether it saw its token fire.
struct Long {
    cancelled: Arc<AtomicBool>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NoArgs {}

impl Task for Long {
    const NAME: &'static str = "test.long";
    type Args = NoArgs;
    type Output = ();

    async fn run(&self, ctx: TaskContext, _args: NoArgs) -> Result<(), TaskError> {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
            () = ctx.cancelled() => self.cancelled.store(true, Ordering::SeqCst),
        }
        // Keep going after the token (as a task ignoring it would): only the abort stops it.
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok(())
    }
}

async fn go(tasks: web::Data<Tasks>) -> Result<String, switchyard::Error> {
    let handle = tasks
        .delay::<Long>(NoArgs {})
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

#[actix_rt::test]
async fn second_sigterm_turns_the_drain_cold() {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".into();
    config.server.templates = format!("{}/../templates", env!("CARGO_MANIFEST_DIR")).into();
    config.server.shutdown_timeout = 1;
    config.tasks.drain_timeout = 60;
    let cancelled = Arc::new(AtomicBool::new(false));
    let running = App::new(config)
        .task(Long {
            cancelled: cancelled.clone(),
        })
        .routes(|cfg| {
            cfg.route("/go", web::get().to(go))
                .route("/state/{id}", web::get().to(state));
        })
        .start()
        .await
        .expect("node starts");
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

    let waiting = actix_rt::spawn(running.wait());
    let me = Pid::from_raw(std::process::id() as i32);
    kill(me, Signal::SIGTERM).expect("first SIGTERM");
    // Warm: the node waits for the task (drain_timeout is 60 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "the warm drain did not wait for the task"
    );
    assert!(!cancelled.load(Ordering::SeqCst));

    let t0 = Instant::now();
    kill(me, Signal::SIGTERM).expect("second SIGTERM");
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the cold shutdown ends the node promptly")
        .expect("join");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        cancelled.load(Ordering::SeqCst),
        "the task's token fired at the cold shutdown"
    );
}
