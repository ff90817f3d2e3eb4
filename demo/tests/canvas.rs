//! Canvas (chain, group, chord): built from plain JSON by a raw NATS client and run by
//! `switchyard worker` processes (a chord survives a SIGKILLed worker with its callback run
//! exactly once), and through the client API on the memory broker and in eager mode (results,
//! a failed step, revocation, hostile canvas fields).

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use switchyard::tasks::{
    MemoryBroker, PublishOptions, QueueSpec, Registry, ResultRecord, Signature, TaskSettings,
    TaskState, Tasks, WorkerPool,
};
use switchyard_actors::tasks::{callback_id, member_id, NatsBroker, Outgoing, TaskQueue};
use switchyard_demo::tasks::{Add, Sleep, Sum};

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(30);
/// The short ack wait the worker processes run with (seconds).
const ACK_WAIT_SECS: u64 = 1;

fn settings() -> TaskSettings {
    TaskSettings {
        queues: vec![QueueSpec::new("default", 8)],
        ack_wait: Duration::from_secs(ACK_WAIT_SECS),
        ..TaskSettings::default()
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Add).register(Sum).register(Sleep);
    r
}

async fn until_ready(tasks: &Tasks, id: &str) -> ResultRecord {
    let deadline = Instant::now() + WAIT;
    loop {
        let rec = tasks.result(id).await.expect("result");
        if rec.state.is_ready() {
            return rec;
        }
        assert!(Instant::now() < deadline, "{id} never finished: {rec:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Worker processes on NATS, canvases published as plain JSON by a raw async-nats client.

struct Env {
    url: String,
    prefix: String,
    broker: Arc<NatsBroker>,
    tasks: Tasks,
    raw: async_nats::jetstream::Context,
    client: async_nats::Client,
    workers: Vec<Child>,
}

impl Env {
    async fn start() -> Option<Env> {
        if !common::service_available("nats") {
            return None;
        }
        let url = common::service_url("nats");
        let prefix = common::unique_name("syc");
        let client = async_nats::connect(&url).await.expect("nats");
        let broker = Arc::new(
            NatsBroker::open(client.clone(), &prefix, &settings())
                .await
                .expect("broker"),
        );
        let tasks = Tasks::new(broker.clone(), Arc::new(Registry::new()), settings());
        Some(Env {
            url,
            prefix,
            broker,
            tasks,
            raw: async_nats::jetstream::new(client.clone()),
            client,
            workers: Vec::new(),
        })
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SWITCHYARD_TASKS__BROKER".into(), "nats".into()),
            ("SWITCHYARD_NATS__PREFIX".into(), self.prefix.clone()),
            ("SWITCHYARD_NATS__URL".into(), self.url.clone()),
            (
                "SWITCHYARD_TASKS__ACK_WAIT".into(),
                ACK_WAIT_SECS.to_string(),
            ),
        ]
    }

    fn worker(&mut self, node: &str) -> usize {
        let mut cmd = Command::new(common::binary());
        cmd.args(["worker", "--node-id", node])
            .current_dir(common::root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        self.workers.push(cmd.spawn().expect("spawn worker"));
        self.workers.len() - 1
    }

    fn kill(&mut self, i: usize) {
        let _ = self.workers[i].kill();
        let _ = self.workers[i].wait();
    }

    /// Publishes a task message as a foreign publisher would: plain JSON, `Nats-Msg-Id` = id.
    async fn publish_json(&self, msg: Value) {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg["id"].as_str() {
            headers.insert("Nats-Msg-Id", id);
        }
        self.raw
            .publish_with_headers(
                format!("{}.tasks.default", self.prefix),
                headers,
                serde_json::to_vec(&msg).expect("json").into(),
            )
            .await
            .expect("publish")
            .await
            .expect("ack");
    }

    /// `switchyard <command> ID`, its output parsed.
    fn cli(&self, command: &str, id: &str) -> Value {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, out, err) = common::run_cli(&[command, id], &env, None);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(out.trim()).expect("JSON")
    }

    /// `switchyard result ID`, parsed.
    fn cli_result(&self, id: &str) -> Value {
        self.cli("result", id)
    }

    async fn events(&self, kind: &str) -> async_nats::Subscriber {
        let sub = self
            .client
            .subscribe(format!("{}.events.{kind}", self.prefix))
            .await
            .expect("subscribe");
        self.client.flush().await.expect("flush");
        sub
    }

    async fn stop(mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        let names = self.broker.names().clone();
        let js = self.broker.jetstream();
        for stream in names.task_streams() {
            let _ = js.delete_stream(&stream).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Task id → how many events of a kind arrived for it (within a short grace after the last).
async fn count_by_task(sub: &mut async_nats::Subscriber) -> HashMap<String, usize> {
    let mut n: HashMap<String, usize> = HashMap::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(700), sub.next()).await {
        let e: Value = serde_json::from_slice(&m.payload).expect("event");
        *n.entry(e["task_id"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    n
}

#[tokio::test]
async fn a_foreign_chain_and_group_run_on_worker_processes() {
    let Some(mut env) = Env::start().await else {
        return;
    };
    env.worker("w1");
    // The chain of the acceptance: demo.add(1, 2) → demo.add(y=10) with the result in x.
    env.publish_json(json!({
        "id": "chain-1", "task": "switchyard.chain", "args": {},
        "tasks": [
            {"task": "demo.add", "args": {"x": 1, "y": 2}},
            {"task": "demo.add", "args": {"y": 10}, "result_arg": "x"}
        ]
    }))
    .await;
    // A group of 10 demo.add: the results in order.
    let members: Vec<Value> = (0..10)
        .map(|i| json!({"task": "demo.add", "args": {"x": i, "y": 100}}))
        .collect();
    env.publish_json(
        json!({"id": "group-1", "task": "switchyard.group", "args": {}, "tasks": members}),
    )
    .await;

    let chain = until_ready(&env.tasks, "chain-1").await;
    assert_eq!(
        (chain.state, chain.result.clone()),
        (TaskState::Success, json!(13))
    );
    let rec = env.cli_result("chain-1");
    assert_eq!(rec["state"], "SUCCESS");
    assert_eq!(rec["result"], 13);
    assert_eq!(rec["canvas"]["kind"], "chain");
    assert_eq!(
        rec["canvas"]["members"],
        json!([member_id("chain-1", 0), member_id("chain-1", 1)])
    );
    assert_eq!(rec["canvas"]["results"], json!([3, 13]));
    assert_eq!(rec["canvas"]["failed_step"], Value::Null);
    // Each step has its own record.
    let second = env
        .tasks
        .result(&member_id("chain-1", 1))
        .await
        .expect("step");
    assert_eq!(second.result, json!(13));

    let group = until_ready(&env.tasks, "group-1").await;
    assert_eq!(group.state, TaskState::Success, "{group:?}");
    let want: Vec<i64> = (100..110).collect();
    assert_eq!(group.result, json!(want));
    assert_eq!(group.canvas.as_ref().map(|c| c.completed), Some(10));

    // A failing step stops its chain: step 1 overflows, step 2 is never published.
    env.publish_json(json!({
        "id": "chain-2", "task": "switchyard.chain", "args": {},
        "tasks": [
            {"task": "demo.add", "args": {"x": 1, "y": 2}},
            {"task": "demo.add", "args": {"y": i64::MAX}, "result_arg": "x"},
            {"task": "demo.add", "args": {"y": 1}, "result_arg": "x"}
        ]
    }))
    .await;
    let failed = until_ready(&env.tasks, "chain-2").await;
    assert_eq!(failed.state, TaskState::Failure);
    let step = failed
        .canvas
        .and_then(|c| c.failed_step)
        .expect("failed step");
    assert_eq!((step.index, step.id.clone()), (1, member_id("chain-2", 1)));
    assert!(
        step.error.as_deref().unwrap_or("").starts_with("overflow"),
        "{step:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let third = env
        .tasks
        .result(&member_id("chain-2", 2))
        .await
        .expect("step");
    assert_eq!(
        third.state,
        TaskState::Pending,
        "a stopped chain runs no further step"
    );

    // `switchyard revoke` of a chain while its first step runs: the chain is REVOKED and its
    // next step never runs.
    env.publish_json(json!({
        "id": "chain-3", "task": "switchyard.chain", "args": {},
        "tasks": [
            {"task": "demo.sleep", "args": {"seconds": 1.0}},
            {"task": "demo.add", "args": {"x": 1, "y": 1}}
        ]
    }))
    .await;
    let first = member_id("chain-3", 0);
    let deadline = Instant::now() + WAIT;
    while env.tasks.result(&first).await.expect("step").state != TaskState::Started {
        assert!(Instant::now() < deadline, "the first step never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.cli("revoke", "chain-3"), json!({"revoked": 1}));
    assert_eq!(env.cli_result("chain-3")["state"], "REVOKED");
    let deadline = Instant::now() + WAIT;
    while env.tasks.result(&first).await.expect("step").state != TaskState::Success {
        assert!(Instant::now() < deadline, "the running step finishes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = env
        .tasks
        .result(&member_id("chain-3", 1))
        .await
        .expect("step");
    assert_eq!(second.state, TaskState::Revoked, "{second:?}");
    assert_eq!(second.started_at, None, "never ran");

    // Hostile canvas fields: a dead letter with a clear reason, the worker still serving.
    env.publish_json(
        json!({"id": "bad-1", "task": "switchyard.group", "args": {},
        "tasks": [{"task": "switchyard.chain", "args": {}}]}),
    )
    .await;
    env.publish_json(
        json!({"id": "bad-2", "task": "switchyard.group", "args": {},
        "tasks": vec![json!({"task": "demo.add"}); 1001]}),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    let letters = loop {
        let letters = env
            .broker
            .dead_letters(None, 10)
            .await
            .expect("dead letters");
        if letters.len() >= 2 || Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    assert_eq!(reasons, ["bad canvas", "bad canvas"], "{letters:?}");
    let bad = env.tasks.result("bad-1").await.expect("record");
    assert!(
        bad.error
            .as_deref()
            .unwrap_or("")
            .contains("cannot be nested"),
        "{bad:?}"
    );
    env.stop().await;
}

/// The acceptance's chord: 20 members into demo.sum, two worker processes, one SIGKILLed
/// mid-way. The callback starts and succeeds exactly once (its task events), with the sum of
/// the members' recorded results.
#[tokio::test]
async fn a_chord_survives_a_sigkilled_worker_and_runs_its_callback_once() {
    let Some(mut env) = Env::start().await else {
        return;
    };
    let mut started = env.events("task-started").await;
    let mut succeeded = env.events("task-succeeded").await;
    let w1 = env.worker("w1");
    env.worker("w2");
    const N: usize = 20;
    // Staggered lengths: some finish while others (on both workers) still run.
    let members: Vec<Value> = (0..N)
        .map(|i| json!({"task": "demo.sleep", "args": {"seconds": 0.2 + 0.07 * i as f64}}))
        .collect();
    env.publish_json(json!({
        "id": "chord-1", "task": "switchyard.chord", "args": {}, "tasks": members,
        "callback": {"task": "demo.sum", "args": {}, "result_arg": "values"}
    }))
    .await;
    let ids: Vec<String> = (0..N).map(|i| member_id("chord-1", i)).collect();
    // Mid-way: a member finished and w1 is running one.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut done = 0;
        let mut on_w1 = 0;
        for id in &ids {
            let r = env.tasks.result(id).await.expect("member");
            done += usize::from(r.state == TaskState::Success);
            on_w1 += usize::from(r.state == TaskState::Started && r.node.as_deref() == Some("w1"));
        }
        if done >= 1 && on_w1 >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never mid-way");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.kill(w1);
    let chord = until_ready(&env.tasks, "chord-1").await;
    assert_eq!(chord.state, TaskState::Success, "{chord:?}");
    let mut results = Vec::new();
    let mut last_end = None;
    for id in &ids {
        let r = env.tasks.result(id).await.expect("member");
        assert_eq!(r.state, TaskState::Success);
        results.push(r.result.as_f64().expect("seconds"));
        last_end = last_end.max(r.finished_at);
    }
    let sum: f64 = results.iter().sum();
    assert_eq!(
        chord.result.as_f64(),
        Some(sum),
        "the callback's sum of the results"
    );
    let info = chord.canvas.clone().expect("canvas");
    assert_eq!(info.completed, N);
    assert!(info.callback_published);
    let cb = info.callback.clone().expect("callback id");
    assert_eq!(cb, callback_id("chord-1"));
    let cb_rec = env.tasks.result(&cb).await.expect("callback");
    assert_eq!(cb_rec.result.as_f64(), Some(sum));
    assert!(
        cb_rec.started_at >= last_end,
        "the callback started after every member ended"
    );

    let starts = count_by_task(&mut started).await;
    let successes = count_by_task(&mut succeeded).await;
    assert_eq!(
        starts.get(&cb),
        Some(&1),
        "the callback started once: {starts:?}"
    );
    assert_eq!(successes.get(&cb), Some(&1), "the callback succeeded once");
    assert!(
        ids.iter()
            .any(|id| starts.get(id).copied().unwrap_or(0) >= 2),
        "a member of the killed worker ran again: {starts:?}"
    );
    let rec = env.cli_result("chord-1");
    assert_eq!(rec["canvas"]["callback"], cb);
    assert_eq!(rec["canvas"]["members"].as_array().map(Vec::len), Some(N));
    env.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The client API on the memory broker (worker actors in this process) and in eager mode.

struct Memory {
    tasks: Tasks,
    broker: Arc<MemoryBroker>,
    pool: WorkerPool,
    arbiter: actix_rt::Arbiter,
}

impl Memory {
    fn start() -> Self {
        let settings = settings();
        let broker = Arc::new(MemoryBroker::new(&settings));
        let registry = Arc::new(registry());
        let arbiter = actix_rt::Arbiter::new();
        let pool = WorkerPool::start(
            settings.clone(),
            None,
            broker.clone(),
            registry.clone(),
            None,
            &arbiter.handle(),
        )
        .expect("worker pool");
        Self {
            tasks: Tasks::new(broker.clone(), registry, settings),
            broker,
            pool,
            arbiter,
        }
    }

    async fn stop(self) {
        self.pool.cold_token().cancel();
        self.pool.drain().await;
        self.arbiter.stop();
    }
}

fn add(x: i64, y: i64) -> Signature {
    Signature::new("demo.add", json!({"x": x, "y": y}))
}

async fn chain_group_chord(tasks: &Tasks) {
    let chain = tasks
        .chain(
            vec![
                add(1, 2),
                Signature::new("demo.add", json!({"y": 10})).result_arg("x"),
            ],
            PublishOptions::new(),
        )
        .await
        .expect("chain");
    assert_eq!(chain.get(WAIT).await.expect("13"), json!(13));

    let group = tasks
        .group((0..10).map(|i| add(i, i)).collect(), PublishOptions::new())
        .await
        .expect("group");
    let want: Vec<Value> = (0..10).map(|i| json!(2 * i)).collect();
    assert_eq!(group.get(WAIT).await.expect("results"), want);

    let chord = tasks
        .chord(
            (1..=20).map(|i| add(i, 0)).collect(),
            Signature::new("demo.sum", json!({})).result_arg("values"),
            PublishOptions::new().task_id("chord-api"),
        )
        .await
        .expect("chord");
    assert_eq!(chord.id(), "chord-api");
    assert_eq!(chord.get(WAIT).await.expect("sum"), json!(210));
    let rec = chord.record().await.expect("record");
    let info = rec.canvas.expect("canvas");
    assert_eq!(info.members.len(), 20);
    assert_eq!(info.callback, Some(callback_id("chord-api")));

    // A failed step: the canvas fails, naming it.
    let failing = tasks
        .chain(
            vec![
                add(i64::MAX, 1),
                Signature::new("demo.add", json!({"y": 1})).result_arg("x"),
            ],
            PublishOptions::new(),
        )
        .await
        .expect("chain");
    let err = failing.get(WAIT).await.expect_err("fails");
    assert!(err.to_string().contains("step 0"), "{err}");
    let rec = failing.record().await.expect("record");
    assert_eq!(
        rec.canvas.and_then(|c| c.failed_step).map(|s| s.index),
        Some(0)
    );

    // The client refuses a canvas a worker would refuse.
    let err = tasks
        .chord(
            vec![add(1, 1)],
            Signature::new("demo.sum", json!({})),
            PublishOptions::new(),
        )
        .await
        .expect_err("no result_arg");
    assert!(err.to_string().contains("result_arg"), "{err}");
    let err = tasks
        .group(vec![add(1, 1); 1001], PublishOptions::new())
        .await
        .expect_err("too big");
    assert!(err.to_string().contains("1-1000"), "{err}");
}

#[actix_rt::test]
async fn memory_broker_chain_group_chord_and_revoke() {
    let m = Memory::start();
    chain_group_chord(&m.tasks).await;

    // Revoking a chain while its first step runs: the canvas is REVOKED, the next step never
    // runs.
    let chain = m
        .tasks
        .chain(
            vec![
                Signature::new("demo.sleep", json!({"seconds": 0.5})),
                Signature::new("demo.add", json!({"x": 1, "y": 1})),
            ],
            PublishOptions::new(),
        )
        .await
        .expect("chain");
    let first = member_id(chain.id(), 0);
    let deadline = Instant::now() + WAIT;
    while m.tasks.result(&first).await.expect("rec").state != TaskState::Started {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(m.tasks.revoke(chain.id()).await.expect("revoke"));
    let rec = chain.record().await.expect("record");
    assert_eq!(rec.state, TaskState::Revoked);
    assert!(rec.canvas.is_some(), "the record keeps its members");
    let deadline = Instant::now() + WAIT;
    while m.tasks.result(&first).await.expect("rec").state != TaskState::Success {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = m
        .tasks
        .result(&member_id(chain.id(), 1))
        .await
        .expect("rec");
    assert_eq!(second.state, TaskState::Revoked, "{second:?}");
    assert_eq!(
        chain.record().await.expect("record").state,
        TaskState::Revoked
    );

    // A redelivered member is counted once: publishing a finished member's message again
    // changes nothing.
    let group = m
        .tasks
        .group(vec![add(1, 1), add(2, 2)], PublishOptions::new())
        .await
        .expect("group");
    assert_eq!(
        group.get(WAIT).await.expect("results"),
        vec![json!(2), json!(4)]
    );
    let mid = member_id(group.id(), 0);
    let again = json!({"id": mid, "task": "demo.add", "args": {"x": 1, "y": 1},
        "canvas": {"id": group.id(), "index": 0}});
    m.broker
        .publish(Outgoing {
            id: format!("{mid}-again"),
            queue: "default".into(),
            payload: serde_json::to_vec(&again).expect("json"),
            dedupe_id: format!("{mid}-again"),
            not_before: None,
        })
        .await
        .expect("publish");
    // A stranger claiming to be member 1 with another id is ignored.
    let stranger = json!({"id": "stranger", "task": "demo.add", "args": {"x": 50, "y": 50},
        "canvas": {"id": group.id(), "index": 1}});
    m.broker
        .publish(Outgoing {
            id: "stranger".into(),
            queue: "default".into(),
            payload: serde_json::to_vec(&stranger).expect("json"),
            dedupe_id: "stranger".into(),
            not_before: None,
        })
        .await
        .expect("publish");
    let deadline = Instant::now() + WAIT;
    while m.tasks.result("stranger").await.expect("rec").state != TaskState::Success {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rec = group.record().await.expect("record");
    assert_eq!(rec.result, json!([2, 4]));
    assert_eq!(rec.canvas.map(|c| c.completed), Some(2));

    // Hostile canvas fields are dead-lettered with a reason.
    let bad = json!({"id": "bad", "task": "demo.add", "args": {"x": 1, "y": 1},
        "canvas": {"id": "x", "index": "zero"}});
    m.broker
        .publish(Outgoing {
            id: "bad".into(),
            queue: "default".into(),
            payload: serde_json::to_vec(&bad).expect("json"),
            dedupe_id: "bad".into(),
            not_before: None,
        })
        .await
        .expect("publish");
    let deadline = Instant::now() + WAIT;
    while m.broker.dead_letters().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(m.broker.dead_letters()[0].reason, "bad canvas");
    m.stop().await;
}

#[tokio::test]
async fn demo_sum_adds_integers_exactly_and_refuses_bad_args_clearly() {
    let tasks = Tasks::eager(Arc::new(registry()), settings());
    let sum = |values: Value| {
        let tasks = tasks.clone();
        async move {
            tasks
                .send("demo.sum", json!({"values": values}), PublishOptions::new())
                .await
                .expect("publish")
                .record()
                .await
                .expect("record")
        }
    };
    assert_eq!(sum(json!([1, 2])).await.result, json!(3));
    assert_eq!(sum(json!([])).await.result, json!(0));
    assert_eq!(sum(json!([1, 0.5])).await.result, json!(1.5));
    let overflow = sum(json!([i64::MAX, 1])).await;
    assert_eq!(overflow.state, TaskState::Failure);
    assert!(
        overflow
            .error
            .as_deref()
            .unwrap_or("")
            .starts_with("overflow"),
        "{overflow:?}"
    );
    for bad in [json!("1, 2"), json!([1, "2"]), json!(null)] {
        let rec = sum(bad.clone()).await;
        assert_eq!(rec.state, TaskState::Failure, "{bad}");
        assert!(
            rec.error.as_deref().unwrap_or("").starts_with("bad_args"),
            "{bad}: {rec:?}"
        );
    }
}

#[tokio::test]
async fn eager_mode_runs_a_canvas_inline() {
    let tasks = Tasks::eager(Arc::new(registry()), settings());
    chain_group_chord(&tasks).await;
}
