//! Cluster operations (docs/cluster.md): heartbeats and `cluster status` over real `serve` and
//! `worker` processes, a worker node's `/metrics`, and a three-node JetStream cluster of
//! private `nats-server`s losing its task-stream leader while tasks flow and sessions are
//! written (`nats.replicas = 3`). Each test runs under its own `nats.prefix`.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard::tasks::{QueueSpec, Registry, TaskSettings, TaskState, Tasks};
use switchyard_actors::session::{
    NatsConnect, NatsKvStore, NatsLink, Record, RecordCodec, SaveOutcome, SessionId, SessionStore,
};
use switchyard_actors::tasks::NatsBroker;

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(20);

type Worker = common::Spawned;

/// The URL of the `metrics on http://IP:PORT` line of `node`, once printed.
fn metrics_url(node: &Worker) -> String {
    node.wait_for("metrics on ", WAIT);
    let log = node.log();
    let line = log
        .lines()
        .find(|l| l.starts_with("metrics on "))
        .expect("the metrics line");
    format!("{}/metrics", line.trim_start_matches("metrics on ").trim())
}

fn env_pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `cluster status --json`: the nodes it lists, by node id.
fn status_json(env: &[(String, String)]) -> HashMap<String, Value> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = common::run_cli(&["cluster", "status", "--json"], &env, None);
    assert_eq!(code, 0, "cluster status: {err}");
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            (v["node"].as_str().expect("node").to_owned(), v)
        })
        .collect()
}

/// Polls `cluster status --json` until `done` holds for its nodes (at most [`WAIT`]).
fn status_until(
    env: &[(String, String)],
    what: &str,
    done: impl Fn(&HashMap<String, Value>) -> bool,
) -> HashMap<String, Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let nodes = status_json(env);
        if done(&nodes) {
            return nodes;
        }
        assert!(Instant::now() < deadline, "never {what}: {nodes:?}");
    }
}

/// The value of a sample in a metrics text (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    common::sample(text, series).parse().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_lists_live_nodes_and_forgets_a_killed_worker() {
    if !common::service_available("nats") || !common::service_available("postgres") {
        return;
    }
    let prefix = common::unique_name("syc");
    let postgres = common::fresh_postgres_url();
    let nats = common::service_url("nats");
    let env = env_pairs(&[
        ("SWITCHYARD_TASKS__BROKER", "nats"),
        ("SWITCHYARD_NATS__PREFIX", &prefix),
        ("SWITCHYARD_NATS__URL", &nats),
        ("SWITCHYARD_POSTGRES__URL", &postgres),
        ("SWITCHYARD_CLUSTER__HEARTBEAT_INTERVAL", "1"),
    ]);
    let node = common::spawn_node(common::NodeOptions {
        env: env.clone(),
        args: vec!["--node-id".into(), "web-1".into()],
        ..Default::default()
    });
    let w1 = Worker::spawn("worker", &["--node-id", "w1", "--queues", "default"], &env);
    let mut w2 = Worker::spawn("worker", &["--node-id", "w2"], &env);
    let _b1 = Worker::spawn("beat", &["--node-id", "b1"], &env);

    // Garbage on the heartbeat subject meanwhile is ignored.
    let client = async_nats::connect(&nats).await.expect("nats");
    let hostile = Arc::new(AtomicBool::new(true));
    let noise = {
        let (client, hostile) = (client.clone(), hostile.clone());
        let subject = format!("{prefix}.events.node-heartbeat");
        tokio::spawn(async move {
            while hostile.load(Ordering::Relaxed) {
                for junk in [
                    &b"not json"[..],
                    br#"{"node":"","role":"worker"}"#,
                    br#"{"node":"ghost\u001b[2J","role":"worker","queues":[],"in_flight":0,"version":"x","last_seen":"2026-12-01T00:00:00Z","metrics":null}"#,
                ] {
                    let _ = client.publish(subject.clone(), junk.into()).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let nodes = status_until(&env, "listed web-1, w1, w2 and b1", |n| {
        ["web-1", "w1", "w2", "b1"]
            .iter()
            .all(|id| n.contains_key(*id))
    });
    hostile.store(false, Ordering::Relaxed);
    let _ = noise.await;
    assert_eq!(nodes.len(), 4, "only the four real nodes: {nodes:?}");
    assert_eq!(nodes["b1"]["role"], "beat");
    assert_eq!(nodes["b1"]["queues"], json!(["default", "emails"]));
    assert!(nodes["b1"]["metrics"].is_string(), "{}", nodes["b1"]);
    assert_eq!(nodes["web-1"]["role"], "serve");
    assert_eq!(nodes["web-1"]["queues"], json!([]));
    assert_eq!(nodes["web-1"]["metrics"], node.url("/metrics"));
    assert_eq!(nodes["w1"]["role"], "worker");
    assert_eq!(nodes["w1"]["queues"], json!(["default"]));
    assert_eq!(nodes["w2"]["queues"], json!(["default", "emails"]));
    for n in nodes.values() {
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
        assert!(n["in_flight"].is_u64(), "{n}");
        let seen = n["last_seen"].as_str().expect("last_seen");
        chrono::DateTime::parse_from_rfc3339(seen).expect("RFC 3339");
    }
    // The worker advertises the metrics URL it printed.
    let w1_metrics = metrics_url(&w1);
    assert_eq!(nodes["w1"]["metrics"], w1_metrics.as_str());

    // The table form: a header and one row per node.
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, table, err) = common::run_cli(&["cluster", "status"], &env_ref, None);
    assert_eq!(code, 0, "{err}");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NODE",
            "ROLE",
            "QUEUES",
            "IN_FLIGHT",
            "VERSION",
            "LAST_SEEN"
        ]
    );
    assert!(table
        .lines()
        .any(|l| l.starts_with("w2 ") && l.contains("default,emails")));

    // Tasks by state, queue depth and in-flight on the workers' /metrics.
    let http = common::client();
    for i in 0..4 {
        let args = format!(r#"{{"x":{i},"y":1}}"#);
        let (code, _, err) = common::run_cli(
            &["publish", "demo.add", &args, "--wait", "15"],
            &env_ref,
            None,
        );
        assert_eq!(code, 0, "{err}");
    }
    let urls = [w1_metrics, metrics_url(&w2)];
    let deadline = Instant::now() + WAIT;
    loop {
        let mut succeeded = 0.0;
        let mut text = String::new();
        for url in &urls {
            text = http
                .get(url)
                .send()
                .await
                .expect("GET")
                .text()
                .await
                .expect("body");
            succeeded += sample(
                &text,
                r#"switchyard_tasks_total{state="SUCCESS",task="demo.add"}"#,
            );
            assert!(
                text.contains(r#"switchyard_queue_depth{queue="default"}"#),
                "{text}"
            );
            assert!(
                text.contains(r#"switchyard_consumer_lag{queue="default"}"#),
                "{text}"
            );
            assert!(text.contains("switchyard_tasks_in_flight "), "{text}");
        }
        if succeeded == 4.0 {
            assert!(
                text.contains(r#"switchyard_queue_depth{queue="emails"}"#),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{succeeded} successes counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A SIGKILLed worker is gone within 10 s (three intervals of 1 s and one listen).
    let killed = Instant::now();
    let _ = w2.child.kill();
    let _ = w2.child.wait();
    let nodes = status_until(&env, "forgot w2", |n| !n.contains_key("w2"));
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
    assert!(
        nodes.contains_key("w1") && nodes.contains_key("web-1"),
        "{nodes:?}"
    );

    drop((node, w1, w2));
    let js = async_nats::jetstream::new(client);
    for stream in [
        format!("{}_TASKS", prefix.to_uppercase()),
        format!("{}_DEAD", prefix.to_uppercase()),
        format!("{}_SCHEDULED", prefix.to_uppercase()),
        format!("KV_{prefix}_results"),
        format!("KV_{prefix}_login"),
        format!("KV_{prefix}_unique"),
        format!("KV_{prefix}_scheduler"),
        format!("KV_{prefix}_beat"),
    ] {
        let _ = js.delete_stream(&stream).await;
    }
    common::drop_database(&postgres).await;
}

/// One session writer: increments `n` in its session, compare-and-swap on the version, and
/// remembers the last write the engine acknowledged.
async fn write_session(store: Arc<NatsKvStore>, stop: Arc<AtomicBool>) -> (SessionId, u64) {
    let id = SessionId::generate();
    let mut current: Option<Record> = None;
    let mut acked = 0;
    while !stop.load(Ordering::Relaxed) {
        let n = current
            .as_ref()
            .map_or(0, |r| r.data["n"].as_u64().unwrap_or(0))
            + 1;
        let mut data = serde_json::Map::new();
        data.insert("n".into(), json!(n));
        let record = Record {
            data,
            expires_at: switchyard_actors::session::now_unix() + 3600,
            version: current.as_ref().map_or(1, |r| r.version + 1),
            updated_at: switchyard_actors::session::now_unix(),
        };
        let expected = current.as_ref().map(|r| r.version);
        match store.save(&id, &record, expected).await {
            Ok(SaveOutcome::Saved) => {
                acked = n;
                current = Some(record);
            }
            // A write whose answer was lost may have landed: read what is there.
            _ => match store.load(&id).await {
                Ok(r) => current = r,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (id, acked)
}

/// Whether the JetStream cluster places a stream of three replicas (it does once every server
/// has joined its meta group): creates and deletes a probe stream.
async fn places_three_replicas(js: &async_nats::jetstream::Context) -> bool {
    let probe = async_nats::jetstream::stream::Config {
        name: common::unique_name("PROBE"),
        num_replicas: 3,
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    };
    let name = probe.name.clone();
    let placed = js.create_stream(probe).await.is_ok();
    if placed {
        let _ = js.delete_stream(&name).await;
    }
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_nats_cluster_loses_its_stream_leader_and_no_task_or_session_write() {
    let started = Instant::now();
    let Some(mut servers) = common::PrivateServer::nats_cluster(3) else {
        return;
    };
    if !common::service_available("postgres") {
        return;
    }
    let urls: Vec<String> = servers.iter().map(|s| s.nats_url()).collect();
    let url_list = urls.join(",");
    let client = async_nats::connect(urls.clone())
        .await
        .expect("nats cluster");
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + WAIT;
    while !places_three_replicas(&js).await {
        assert!(
            Instant::now() < deadline,
            "JetStream cluster never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let prefix = common::unique_name("sycl");
    let postgres = common::fresh_postgres_url();
    let env = env_pairs(&[
        ("SWITCHYARD_TASKS__BROKER", "nats"),
        ("SWITCHYARD_NATS__PREFIX", &prefix),
        ("SWITCHYARD_NATS__URL", &url_list),
        ("SWITCHYARD_NATS__REPLICAS", "3"),
        ("SWITCHYARD_POSTGRES__URL", &postgres),
        ("SWITCHYARD_TASKS__ACK_WAIT", "2"),
        ("SWITCHYARD_CLUSTER__METRICS_BIND", ""),
    ]);
    // The worker creates the streams and the results bucket, replicated three times.
    let worker = Worker::spawn("worker", &["--node-id", "cw1"], &env);
    let tasks_stream = format!("{}_TASKS", prefix.to_uppercase());
    let deadline = Instant::now() + WAIT;
    while js.get_stream(&tasks_stream).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no task stream:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settings = TaskSettings {
        queues: vec![QueueSpec::new("default", 8), QueueSpec::new("emails", 4)],
        replicas: 3,
        ..TaskSettings::default()
    };
    let broker = Arc::new(
        NatsBroker::open(client.clone(), &prefix, &settings)
            .await
            .expect("broker"),
    );
    let tasks = Tasks::new(broker, Arc::new(Registry::new()), settings);
    let link = NatsLink::connect(&NatsConnect {
        url: url_list.clone(),
        ..Default::default()
    })
    .await
    .expect("session link over the server list");
    let bucket = format!("{prefix}_sessions");
    let sessions = Arc::new(
        NatsKvStore::open(link, &bucket, RecordCodec::plain(), 3)
            .await
            .expect("sessions bucket"),
    );
    for stream in [
        tasks_stream.clone(),
        format!("{}_DEAD", prefix.to_uppercase()),
        format!("KV_{prefix}_results"),
        format!("KV_{bucket}"),
    ] {
        let mut s = js.get_stream(&stream).await.expect("stream");
        let replicas = s.info().await.expect("info").config.num_replicas;
        assert_eq!(replicas, 3, "{stream}");
    }

    // Tasks flow and sessions are written...
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (tasks, stop) = (tasks.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), 0);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match tasks
                    .send("demo.add", json!({"x": i, "y": 1}), Default::default())
                    .await
                {
                    Ok(h) => acked.push(h.id().to_owned()),
                    Err(_) => refused += 1,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (acked, refused)
        })
    };
    let writers: Vec<_> = (0..10)
        .map(|_| tokio::spawn(write_session(sessions.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // ... when the server leading the task stream is SIGKILLed.
    let mut stream = js.get_stream(&tasks_stream).await.expect("stream");
    let info = stream.info().await.expect("stream info");
    let leader = info
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("a leader");
    let index = (0..servers.len())
        .find(|i| leader == format!("n{i}"))
        .unwrap_or_else(|| panic!("leader {leader:?} is none of n0..n2"));
    servers[index].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = publisher.await.expect("publisher");
    let mut written = Vec::new();
    for w in writers {
        written.push(w.await.expect("writer"));
    }
    assert!(acked.len() >= 20, "only {} tasks published", acked.len());

    // Every acknowledged task reaches SUCCESS.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<String> = acked.clone();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for id in pending {
            match tasks.result(&id).await {
                Ok(r) if r.state == TaskState::Success => {}
                _ => still.push(id),
            }
        }
        pending = still;
        if !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} of {} tasks never succeeded (first {}); worker:\n{}",
                pending.len(),
                acked.len(),
                pending[0],
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Every acknowledged session write is there (a write whose answer was lost may be too).
    for (id, acked_n) in &written {
        assert!(*acked_n > 0, "no session write was acknowledged");
        let record = sessions.load(id).await.expect("load").expect("session");
        let n = record.data["n"].as_u64().unwrap_or(0);
        assert!(
            n >= *acked_n,
            "session lost writes: stored {n}, acknowledged {acked_n}"
        );
    }
    println!(
        "{} tasks acknowledged ({refused} refused), {} session writes acknowledged, leader {leader} \
         killed, {:?} in all",
        acked.len(),
        written.iter().map(|(_, n)| n).sum::<u64>(),
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    drop(worker);
    common::drop_database(&postgres).await;
}
