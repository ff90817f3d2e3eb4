//! A rolling restart (docs/cluster.md): three `switchyard worker` processes on NATS are
//! restarted one by one (SIGTERM, wait for the exit, start again) while tasks are published at
//! a steady rate (200/s by default); every task reaches SUCCESS and none is started or
//! finished twice, counted by task id from the result records and the task events.
//!
//! Bounded: `ROLLING_RATE` tasks/s (default 200) for as long as the three restarts take
//! (about 15 s), each wait at most [`WAIT`].

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use switchyard::tasks::{PublishOptions, QueueSpec, Registry, TaskSettings, TaskState, Tasks};
use switchyard_actors::tasks::NatsBroker;

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(90);

const CONFIG: &str = r#"
[tasks]
broker = "nats"
ack_wait = 5
drain_timeout = 20

[[tasks.queues]]
name = "default"
concurrency = 16

[[tasks.queues]]
name = "emails"
concurrency = 4

[cluster]
heartbeat_interval = 1
"#;

type Worker = common::Spawned;

/// A worker of every queue of the config.
fn worker(config: &Path, node: &str, env: &[(String, String)]) -> Worker {
    let config = config.display().to_string();
    Worker::spawn("worker", &["--config", &config, "--node-id", node], env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_workers_one_by_one_loses_and_doubles_nothing() {
    if !common::service_available("nats") {
        return;
    }
    let rate = common::env_num("ROLLING_RATE", 200).max(1);
    let nats = common::service_url("nats");
    let prefix = common::unique_name("syroll");
    let (_dir, config) = common::write_config(CONFIG);
    let env: Vec<(String, String)> = [
        ("SWITCHYARD_NATS__URL", nats.as_str()),
        ("SWITCHYARD_NATS__PREFIX", prefix.as_str()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let names = ["w1", "w2", "w3"];
    let mut workers: Vec<Worker> = names.iter().map(|n| worker(&config, n, &env)).collect();
    for w in &workers {
        w.wait_for("worker ready", WAIT);
    }

    let client = async_nats::connect(&nats).await.expect("nats");
    // Task events by task id: (started, succeeded).
    let events: Arc<Mutex<HashMap<String, (u32, u32)>>> = Arc::default();
    let mut sub = client
        .subscribe(format!("{prefix}.events.>"))
        .await
        .expect("subscribe");
    let listener = {
        let events = events.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(e) = serde_json::from_slice::<Value>(&msg.payload) else {
                    continue;
                };
                let (Some(kind), Some(id)) = (e["kind"].as_str(), e["task_id"].as_str()) else {
                    continue;
                };
                let mut map = events.lock().expect("events");
                let entry = map.entry(id.to_owned()).or_default();
                match kind {
                    "task-started" => entry.0 += 1,
                    "task-succeeded" => entry.1 += 1,
                    _ => {}
                }
            }
        })
    };
    let settings = TaskSettings {
        queues: vec![QueueSpec::new("default", 16)],
        ..TaskSettings::default()
    };
    let broker = NatsBroker::open_client(client.clone(), &prefix, &settings)
        .await
        .expect("broker");
    let tasks = Arc::new(Tasks::new(
        Arc::new(broker),
        Arc::new(Registry::new()),
        settings,
    ));

    // A steady stream of tasks until the restarts are done.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (tasks, stop) = (tasks.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let period = Duration::from_secs_f64(1.0 / rate as f64);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < WAIT {
                tick.tick().await;
                let args = json!({"x": ids.len(), "y": 1});
                let h = tasks
                    .send("demo.add", args, PublishOptions::new())
                    .await
                    .expect("publish");
                ids.push(h.id().to_owned());
            }
            (ids, t0.elapsed())
        })
    };

    // Restart the workers one by one while the tasks flow.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, name) in names.iter().enumerate() {
        let t = Instant::now();
        workers[i].terminate(WAIT);
        workers[i] = worker(&config, name, &env);
        workers[i].wait_for("worker ready", WAIT);
        eprintln!("{name} restarted in {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (ids, published_for) = publisher.await.expect("publisher");
    eprintln!(
        "published {} tasks in {published_for:?} ({:.0}/s)",
        ids.len(),
        ids.len() as f64 / published_for.as_secs_f64()
    );
    assert!(ids.len() as u64 >= rate * 5, "only {} published", ids.len());

    // Every task succeeded exactly once.
    let deadline = Instant::now() + WAIT;
    let mut missing: Vec<&String> = ids.iter().collect();
    while !missing.is_empty() {
        let mut still = Vec::new();
        for id in missing {
            match tasks.result(id).await {
                Ok(r) if r.state == TaskState::Success => {}
                Ok(r) if r.state.is_ready() => panic!("task {id} ended {r:?}"),
                _ => still.push(id),
            }
        }
        missing = still;
        let logs: Vec<String> = workers.iter().map(Worker::log).collect();
        assert!(
            missing.is_empty() || Instant::now() < deadline,
            "{} of {} tasks unfinished: {:?}\n{logs:#?}",
            missing.len(),
            ids.len(),
            &missing[..missing.len().min(5)]
        );
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // The last events arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    listener.abort();
    let events = events.lock().expect("events").clone();
    let doubled: Vec<(&String, &(u32, u32))> = events
        .iter()
        .filter(|(_, (s, d))| *s > 1 || *d > 1)
        .collect();
    assert!(
        doubled.is_empty(),
        "started or succeeded twice: {doubled:?}"
    );
    let succeeded = ids
        .iter()
        .filter(|id| events.get(*id).is_some_and(|e| e.1 == 1))
        .count();
    eprintln!(
        "{} tasks: all SUCCESS, none doubled; {succeeded} task-succeeded events seen",
        ids.len()
    );
    // Events are core NATS (at most once): nearly all of them arrive.
    assert!(
        succeeded * 100 >= ids.len() * 99,
        "{succeeded} of {}",
        ids.len()
    );

    drop(workers);
    let js = async_nats::jetstream::new(client);
    for stream in [
        format!("{}_TASKS", prefix.to_uppercase()),
        format!("{}_DEAD", prefix.to_uppercase()),
        format!("{}_SCHEDULED", prefix.to_uppercase()),
        format!("KV_{prefix}_results"),
        format!("KV_{prefix}_unique"),
        format!("KV_{prefix}_scheduler"),
    ] {
        let _ = js.delete_stream(&stream).await;
    }
}
