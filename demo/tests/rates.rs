//! Cluster-wide rate limits (docs/tasks.md "Rate limits"): three real `switchyard worker`
//! processes on NATS share a queue's `rate_limit = "10/s"`, and with `rate_key = "user"` each
//! user gets their own 10/s. Starts are read from the result records' `started_at`. Runs on
//! the machine's NATS server and, when installed, on a private current one.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use switchyard::tasks::{
    PublishOptions, QueueSpec, Registry, ResultRecord, TaskSettings, TaskState, Tasks,
};
use switchyard_actors::tasks::NatsBroker;

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
[tasks]
broker = "nats"

[[tasks.queues]]
name = "default"
concurrency = 8

[[tasks.queues]]
name = "emails"
concurrency = 4

[[tasks.queues]]
name = "limited"
concurrency = 8
rate_limit = "10/s"

[[tasks.queues]]
name = "peruser"
concurrency = 8
rate_limit = "10/s"
rate_key = "user"

[cluster]
heartbeat_interval = 1
"#;

type Worker = common::Spawned;

/// A worker of both queues of [`CONFIG`].
fn worker(config: &Path, node: &str, env: &[(String, String)]) -> Worker {
    let config = config.display().to_string();
    let args = [
        "--config",
        &config,
        "--node-id",
        node,
        "--queues",
        "limited,peruser",
    ];
    Worker::spawn("worker", &args, env)
}

/// Waits until `cluster status --json` lists every node of `nodes`.
fn wait_listed(config: &Path, env: &[(String, String)], nodes: &[&str], workers: &[Worker]) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let config = config.display().to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, out, err) = common::run_cli(
            &["cluster", "status", "--json", "--config", &config],
            &env,
            None,
        );
        assert_eq!(code, 0, "cluster status: {err}");
        let listed: Vec<String> = out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["node"].as_str().map(str::to_owned))
            .collect();
        if nodes.iter().all(|n| listed.iter().any(|l| l == n)) {
            return;
        }
        let logs: Vec<String> = workers.iter().map(Worker::log).collect();
        assert!(
            Instant::now() < deadline,
            "never listed {nodes:?}: {listed:?}\n{logs:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Publishes `demo.add` to `queue` once per element of `extra` (merged into the args); returns
/// the task ids in publish order.
async fn publish(tasks: &Tasks, queue: &str, extra: &[Value]) -> Vec<String> {
    let mut ids = Vec::new();
    for (i, e) in extra.iter().enumerate() {
        let mut args = json!({"x": i, "y": 1});
        if let (Some(args), Some(e)) = (args.as_object_mut(), e.as_object()) {
            args.extend(e.clone());
        }
        let handle = tasks
            .send("demo.add", args, PublishOptions::new().queue(queue))
            .await
            .expect("publish");
        ids.push(handle.id().to_owned());
    }
    ids
}

/// The SUCCESS records of `ids`, once all are there.
async fn records(tasks: &Tasks, ids: &[String], workers: &[Worker]) -> Vec<ResultRecord> {
    let deadline = Instant::now() + WAIT;
    let mut done = Vec::new();
    for id in ids {
        loop {
            if let Ok(r) = tasks.result(id).await {
                if r.state == TaskState::Success {
                    done.push(r);
                    break;
                }
                assert!(!r.state.is_ready(), "task {id} ended {r:?}");
            }
            let logs: Vec<String> = workers.iter().map(Worker::log).collect();
            assert!(
                Instant::now() < deadline,
                "task {id} unfinished after {WAIT:?}; {} of {} done\n{logs:#?}",
                done.len(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    done
}

/// Seconds from the first start to the last.
fn spread(records: &[&ResultRecord]) -> f64 {
    let starts: Vec<DateTime<Utc>> = records
        .iter()
        .map(|r| r.started_at.expect("started_at"))
        .collect();
    let (first, last) = (starts.iter().min(), starts.iter().max());
    match (first, last) {
        (Some(f), Some(l)) => (*l - *f).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    }
}

/// The most starts within any one second.
fn most_in_a_second(records: &[&ResultRecord]) -> usize {
    let mut starts: Vec<DateTime<Utc>> = records
        .iter()
        .map(|r| r.started_at.expect("started_at"))
        .collect();
    starts.sort();
    (0..starts.len())
        .map(|i| {
            starts[i..]
                .iter()
                .take_while(|s| **s - starts[i] < chrono::Duration::seconds(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

async fn three_workers_share_the_limit(nats: &str) {
    let prefix = common::unique_name("syr");
    let (_dir, config) = common::write_config(CONFIG);
    let env: Vec<(String, String)> = [
        ("SWITCHYARD_NATS__URL", nats),
        ("SWITCHYARD_NATS__PREFIX", prefix.as_str()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let workers: Vec<Worker> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| worker(&config, n, &env))
        .collect();
    wait_listed(&config, &env, &["r1", "r2", "r3"], &workers);

    let client = async_nats::connect(nats).await.expect("nats");
    let queue = |name: &str| QueueSpec::new(name, 8);
    let settings = TaskSettings {
        queues: vec![queue("default"), queue("limited"), queue("peruser")],
        ..TaskSettings::default()
    };
    let broker = NatsBroker::open_client(client.clone(), &prefix, &settings)
        .await
        .expect("broker");
    let tasks = Tasks::new(Arc::new(broker), Arc::new(Registry::new()), settings);

    // One limit for the queue: 100 tasks start over 9-12 s (10/s over three workers).
    let ids = publish(&tasks, "limited", &vec![json!({}); 100]).await;
    let done = records(&tasks, &ids, &workers).await;
    let all: Vec<&ResultRecord> = done.iter().collect();
    let s = spread(&all);
    let mut nodes: Vec<&str> = done.iter().filter_map(|r| r.node.as_deref()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    eprintln!(
        "limited: 100 starts over {s:.2} s, at most {} in a second, on nodes {nodes:?}",
        most_in_a_second(&all)
    );
    assert!((9.0..=12.0).contains(&s), "100 starts over {s:.2} s");
    assert!(most_in_a_second(&all) <= 11, "{}", most_in_a_second(&all));

    // Per user: 50 of alice's and 50 of bob's, interleaved, each user at their own 10/s.
    let users: Vec<Value> = (0..100)
        .map(|i| json!({"user": if i % 2 == 0 { "alice" } else { "bob" }}))
        .collect();
    let t0 = Instant::now();
    let ids = publish(&tasks, "peruser", &users).await;
    let done = records(&tasks, &ids, &workers).await;
    let elapsed = t0.elapsed();
    for (k, user) in ["alice", "bob"].iter().enumerate() {
        let mine: Vec<&ResultRecord> = done.iter().skip(k).step_by(2).collect();
        assert_eq!(mine.len(), 50);
        let s = spread(&mine);
        let most = most_in_a_second(&mine);
        eprintln!("peruser: {user}'s 50 starts over {s:.2} s, at most {most} in a second");
        assert!((4.5..=8.0).contains(&s), "{user}: 50 starts over {s:.2} s");
        assert!(most <= 11, "{user}: {most} starts in one second");
    }
    eprintln!("peruser: 100 tasks of two users done in {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(9),
        "two users' 50 tasks each took {elapsed:?} (one shared 10/s limit would take 10 s)"
    );

    // The limits' state lives under hashed keys: one per queue and user value.
    let js = async_nats::jetstream::new(client);
    let kv = js
        .get_key_value(format!("{prefix}_rates"))
        .await
        .expect("rates bucket");
    let mut keys = Vec::new();
    let mut listed = kv.keys().await.expect("keys");
    while let Some(k) = futures_util::StreamExt::next(&mut listed).await {
        keys.push(k.expect("key"));
    }
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| k.len() == 40 && k.chars().all(|c| c.is_ascii_hexdigit())),
        "{keys:?}"
    );

    drop(workers);
    for stream in [
        format!("{}_TASKS", prefix.to_uppercase()),
        format!("{}_DEAD", prefix.to_uppercase()),
        format!("{}_SCHEDULED", prefix.to_uppercase()),
        format!("KV_{prefix}_results"),
        format!("KV_{prefix}_unique"),
        format!("KV_{prefix}_scheduler"),
        format!("KV_{prefix}_rates"),
    ] {
        let _ = js.delete_stream(&stream).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_over_three_workers() {
    if !common::service_available("nats") {
        return;
    }
    three_workers_share_the_limit(&common::service_url("nats")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_over_three_workers_on_the_current_server() {
    let Some(server) = common::PrivateServer::nats_current() else {
        eprintln!("no current nats-server: skipped");
        return;
    };
    three_workers_share_the_limit(&server.nats_url()).await;
}
