//! Tasks as an application sees them: the task API of `switchyard-actors`, re-exported, and
//! `[tasks]` turned into its settings. Define a task by implementing [`Task`], register it with
//! [`crate::App::task`], publish it from a handler through `web::Data<Tasks>`.
//! See `docs/tasks.md`.

use std::time::Duration;

pub use switchyard_actors::tasks::{
    new_task_id, AsyncResult, Backoff, Broker, BrokerError, CancellationToken, ClientError,
    DrainOutcome, EventKind, EventSink, MemoryBroker, PublishOptions, QueueSpec, Registry,
    ResultExt, ResultRecord, ResultStore, Revocation, Task, TaskContext, TaskError, TaskEvent,
    TaskOptions, TaskQueue, TaskSettings, TaskState, Tasks, WorkerPool,
};

use crate::config::Config;

/// `[tasks]` (and the node id) in the units the task system uses.
pub fn settings(config: &Config) -> TaskSettings {
    let t = &config.tasks;
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    TaskSettings {
        node_id: config.server.node_id_or_default(),
        default_queue: t.default_queue.clone(),
        queues: t
            .queues
            .iter()
            .map(|q| QueueSpec {
                name: q.name.clone(),
                concurrency: q.concurrency.max(1) as usize,
                rate_limit_per_sec: q.rate_limit_per_sec(),
            })
            .collect(),
        result_ttl: Duration::from_secs(t.result_ttl),
        default_max_retries: t.default_max_retries,
        backoff: Backoff {
            base: seconds(t.retry_backoff_base),
            max: seconds(t.retry_backoff_max),
        },
        soft_time_limit: secs(t.soft_time_limit),
        time_limit: secs(t.time_limit),
        ack_wait: Duration::from_secs(t.ack_wait.max(1)),
        max_deliver: t.max_deliver.max(1),
        dedupe_window: Duration::from_secs(t.dedupe_window),
        drain_timeout: Duration::from_secs(t.drain_timeout),
        ..TaskSettings::default()
    }
}

/// Seconds as a duration; out-of-range values saturate instead of panicking.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_map_to_spec_values() {
        let s = settings(&Config::default());
        assert_eq!(s.default_queue, "default");
        assert_eq!(s.queues, vec![QueueSpec::new("default", 8)]);
        assert_eq!(
            s.backoff.window(0),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
        assert_eq!(s.soft_time_limit, None);
        assert_eq!(s.result_ttl, Duration::from_secs(86_400));
    }
}
