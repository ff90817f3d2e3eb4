//! Chord latency: a chord of `BENCH_CHORD_MEMBERS` (default 1,000) `demo.add` members into
//! `demo.sum`, run by `BENCH_CHORD_WORKERS` (default 2) `switchyard worker` processes on the
//! local NATS server. Per run: the time from the last member's end (the latest `finished_at`
//! of the member records) to the callback's start (its record's `started_at`), and from the
//! publish to the chord's SUCCESS. `BENCH_CHORD_RUNS` runs (default 3).
//!
//! `cargo bench -p switchyard-demo --bench chord_load` (`SWITCHYARD_NATS__URL`). Streams are
//! created under a unique prefix and deleted at the end; every wait is bounded (120 s a run).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::tasks::{PublishOptions, QueueSpec, Registry, Signature, TaskSettings, Tasks};
use switchyard_actors::tasks::NatsBroker;

#[path = "../tests/common/mod.rs"]
mod common;

const RUN_LIMIT: Duration = Duration::from_secs(120);

fn settings() -> TaskSettings {
    TaskSettings {
        queues: vec![QueueSpec::new("default", 8)],
        ..TaskSettings::default()
    }
}

fn main() {
    let members = common::env_num("BENCH_CHORD_MEMBERS", 1000) as usize;
    let workers = common::env_num("BENCH_CHORD_WORKERS", 2) as usize;
    let runs = common::env_num("BENCH_CHORD_RUNS", 3);
    if !common::service_available("nats") {
        return;
    }
    let url = common::service_url("nats");
    let prefix = common::unique_name("sychord");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let client = async_nats::connect(&url).await.expect("nats");
        let broker = Arc::new(
            NatsBroker::open(client, &prefix, &settings())
                .await
                .expect("broker"),
        );
        let tasks = Tasks::new(broker.clone(), Arc::new(Registry::new()), settings());
        let mut children: Vec<Child> = (0..workers)
            .map(|i| {
                Command::new(common::binary())
                    .args(["worker", "--node-id", &format!("bench-w{i}")])
                    .current_dir(common::root())
                    .env("SWITCHYARD_TASKS__BROKER", "nats")
                    .env("SWITCHYARD_NATS__URL", &url)
                    .env("SWITCHYARD_NATS__PREFIX", &prefix)
                    .env("SWITCHYARD_LOG__LEVEL", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn worker")
            })
            .collect();
        // The baseline: as many demo.add tasks without a canvas, published at once.
        let t0 = Instant::now();
        let mut ids = Vec::with_capacity(members);
        for i in 0..members {
            let h = tasks
                .send("demo.add", json!({"x": i, "y": 1}), PublishOptions::new())
                .await
                .expect("publish");
            ids.push(h.id().to_owned());
        }
        for id in &ids {
            tasks
                .handle::<serde_json::Value>(id.clone())
                .get(RUN_LIMIT)
                .await
                .expect("a plain task");
        }
        println!(
            "{members} plain demo.add tasks (no canvas), {workers} worker processes: {:.0} ms from the first publish to the last result",
            t0.elapsed().as_secs_f64() * 1000.0
        );
        println!("chord of {members} demo.add members into demo.sum, {workers} worker processes");
        for run in 0..runs {
            let sigs: Vec<Signature> = (0..members)
                .map(|i| Signature::new("demo.add", json!({"x": i, "y": 1})))
                .collect();
            let t0 = Instant::now();
            let chord = tasks
                .chord(
                    sigs,
                    Signature::new("demo.sum", json!({})).result_arg("values"),
                    PublishOptions::new(),
                )
                .await
                .expect("publish chord");
            let sum = chord.get(RUN_LIMIT).await.expect("chord result");
            let total = t0.elapsed();
            let rec = chord.record().await.expect("record");
            let info = rec.canvas.expect("canvas");
            let mut last_end = None;
            for id in &info.members {
                let r = tasks.result(id).await.expect("member");
                last_end = last_end.max(r.finished_at);
            }
            let cb = tasks
                .result(info.callback.as_deref().expect("callback"))
                .await
                .expect("callback record");
            let gap = cb
                .started_at
                .zip(last_end)
                .map(|(s, e)| (s - e).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            let expected: usize = (0..members).map(|i| i + 1).sum();
            assert_eq!(sum, json!(expected), "the callback's sum");
            println!(
                "  run {run}: last member end -> callback start {:.1} ms; publish -> chord SUCCESS {:.0} ms",
                gap.unwrap_or(f64::NAN),
                total.as_secs_f64() * 1000.0
            );
        }
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let names = broker.names().clone();
        let js = broker.jetstream();
        for stream in names.task_streams() {
            let _ = js.delete_stream(&stream).await;
        }
    });
}
