//! Tasks as an application sees them: the task API of `switchyard-actors`, re-exported, and
//! `[tasks]` turned into its settings. Define a task by implementing [`Task`], register it with
//! [`crate::App::task`], publish it from a handler through `web::Data<Tasks>`.
//! See `docs/tasks.md`.

use std::time::Duration;

pub use switchyard_actors::tasks::{
    new_task_id, AsyncResult, Backoff, Broker, BrokerError, CancellationToken, CanvasInfo,
    CanvasKind, ClientError, DrainOutcome, EventKind, EventSink, FailedStep, MemoryBroker,
    Outgoing, PublishOptions, QueueSpec, Registry, ResultExt, ResultRecord, ResultStore,
    Revocation, Signature, Task, TaskContext, TaskError, TaskEvent, TaskOptions, TaskQueue,
    TaskSettings, TaskState, Tasks, WorkerPool, MAX_MEMBERS,
};

use crate::config::Config;

/// `[tasks]` (and the node id) in the units the task system uses.
pub fn settings(config: &Config) -> TaskSettings {
    let t = &config.tasks;
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s.min(MAX_SECS)));
    let dur = |s: u64| Duration::from_secs(s.min(MAX_SECS));
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
                rate_key: q.rate_key(),
            })
            .collect(),
        result_ttl: dur(t.result_ttl),
        default_max_retries: t.default_max_retries,
        backoff: Backoff {
            base: seconds(t.retry_backoff_base),
            max: seconds(t.retry_backoff_max),
        },
        soft_time_limit: secs(t.soft_time_limit),
        time_limit: secs(t.time_limit),
        ack_wait: dur(t.ack_wait.max(1)),
        max_deliver: t.max_deliver.max(1),
        dedupe_window: dur(t.dedupe_window),
        drain_timeout: dur(t.drain_timeout),
        max_eta: dur(t.max_eta),
        dead_max_age: dur(t.dead_max_age),
        dead_max_bytes: t.dead_max_bytes.min(i64::MAX as u64),
        replicas: crate::engines::replicas(config),
        ..TaskSettings::default()
    }
}

/// The most seconds a setting means (100 years): longer values saturate here, so no clock
/// (an `Instant`, a timestamp, NATS's nanoseconds) overflows on them.
const MAX_SECS: u64 = 100 * 365 * 86_400;

/// Seconds as a duration; out-of-range values saturate instead of panicking.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.clamp(0.0, MAX_SECS as f64)).unwrap_or(Duration::ZERO)
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
        assert_eq!(s.max_eta, Duration::from_secs(2_592_000));
        assert_eq!(s.dead_max_age, Duration::from_secs(1_209_600));
        assert_eq!(s.dead_max_bytes, 1_073_741_824);
    }

    #[test]
    fn huge_numbers_saturate() {
        let mut config = Config::default();
        config.tasks.result_ttl = u64::MAX;
        config.tasks.retry_backoff_max = 1e300;
        config.tasks.retry_backoff_base = f64::INFINITY;
        config.tasks.max_eta = u64::MAX;
        config.tasks.dead_max_bytes = u64::MAX;
        let s = settings(&config);
        let century = Duration::from_secs(MAX_SECS);
        assert_eq!(
            (s.result_ttl, s.max_eta, s.backoff.max),
            (century, century, century)
        );
        assert_eq!(s.backoff.window(70), (century / 2, century));
        assert!(s.backoff.delay(70) <= century);
        assert_eq!(s.dead_max_bytes, i64::MAX as u64);
        // Usable as a deadline (this panicked with u64::MAX seconds).
        let _ = std::time::Instant::now() + s.result_ttl;
    }
}
