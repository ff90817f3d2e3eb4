//! `[tasks]`, `[mail]` and `[beat]`: the task system, its demo mail and periodic schedules.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Broker, MailBackend};

section! {
    /// `[tasks]`: the task system.
    pub struct TasksConfig {
        /// Where the queues live.
        pub broker: Broker = Broker::Memory,
        /// Run tasks inline on publish (for tests).
        pub always_eager: bool = false,
        /// Queue of tasks published without one; must be in `queues`.
        pub default_queue: String = "default".into(),
        /// Seconds result records are kept.
        pub result_ttl: u64 = 86_400,
        /// Retries a task gets unless it says otherwise.
        pub default_max_retries: u32 = 3,
        /// Retry backoff base d, in seconds: attempt n waits in [d/2, d], d = min(base * 2^n, max).
        pub retry_backoff_base: f64 = 1.0,
        /// Retry backoff ceiling, in seconds.
        pub retry_backoff_max: f64 = 600.0,
        /// Seconds after which a running task's cancellation token fires; 0 = none.
        pub soft_time_limit: u64 = 0,
        /// Seconds after which a running task is aborted and the attempt fails; 0 = none.
        pub time_limit: u64 = 0,
        /// Seconds before an unacknowledged task is redelivered.
        pub ack_wait: u64 = 30,
        /// Deliveries (crashes included) before a task is dead-lettered (>= 1).
        pub max_deliver: u32 = 10,
        /// Seconds of the stream's duplicate-detection window.
        pub dedupe_window: u64 = 120,
        /// Seconds a stopping worker gives its in-flight tasks.
        pub drain_timeout: u64 = 30,
        /// `[[tasks.queues]]`: the queues (built in: `default` alone).
        pub queues: Vec<QueueConfig> = vec![QueueConfig::default()],
    }

    /// `[mail]`: outgoing mail.
    pub struct MailConfig {
        /// How mail is "sent".
        pub backend: MailBackend = MailBackend::File,
        /// Directory of the `file` backend (`<dir>/<task id>.eml`), relative to the working dir.
        pub dir: PathBuf = "outbox".into(),
        /// Sender address.
        pub from: String = "shop@example.com".into(),
    }

    /// `[beat]`: periodic schedules.
    pub struct BeatConfig {
        /// `[[beat.schedule]]`: the schedules (none built in).
        pub schedule: Vec<ScheduleEntry> = Vec::new(),
    }
}

impl TasksConfig {
    /// The queue called `name`, if configured.
    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }
}

/// One `[[tasks.queues]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue name: letters, digits, `_` and `-` (unique).
    pub name: String,
    /// Tasks of this queue a worker runs at once (>= 1; default 8).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Most task starts per time unit on each worker: `"N/s"`, `"N/m"`, `"N/h"`; empty = none.
    #[serde(default)]
    pub rate_limit: String,
}

fn default_concurrency() -> u32 {
    8
}

impl Default for QueueConfig {
    fn default() -> Self {
        let (name, concurrency) = ("default".into(), default_concurrency());
        Self {
            name,
            concurrency,
            rate_limit: String::new(),
        }
    }
}

impl QueueConfig {
    /// The rate limit in tasks per second, if there is one.
    pub fn rate_limit_per_sec(&self) -> Option<f64> {
        parse_rate_limit(&self.rate_limit).flatten()
    }
}

/// `""` → `Some(None)`; `"N/s"`, `"N/m"`, `"N/h"` (N >= 1) → `Some(Some(per second))`; else `None`.
pub(super) fn parse_rate_limit(s: &str) -> Option<Option<f64>> {
    let Some((count, unit)) = s.split_once('/') else {
        return s.is_empty().then_some(None);
    };
    let signed = count.starts_with('+');
    let count: u64 = count.parse().ok().filter(|&n| n >= 1 && !signed)?;
    let units = [("s", 1.0), ("m", 60.0), ("h", 3600.0)];
    let (_, seconds) = units.into_iter().find(|&(u, _)| u == unit)?;
    Some(Some(count as f64 / seconds))
}

/// One `[[beat.schedule]]` entry: exactly one of `every` and `cron`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Schedule name (unique); identifies its ticks across beat nodes.
    pub name: String,
    /// Task to publish, e.g. `switchyard.clear_sessions`.
    pub task: String,
    /// Interval in humantime syntax, such as `"30s"`, `"5m"`, `"1h"`, `"1d"` or `"1h 30m"`.
    #[serde(with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Cron expression with seconds, 6 fields: `sec min hour day month weekday`.
    pub cron: Option<String>,
    /// Queue to publish to; default: the task's own queue or `tasks.default_queue`.
    pub queue: Option<String>,
    /// Task arguments (a TOML table, a JSON object on the wire).
    pub args: serde_json::Map<String, serde_json::Value>,
}

impl ScheduleEntry {
    /// The `every` interval, when set.
    pub fn every_duration(&self) -> Option<Duration> {
        self.every
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits() {
        let queue = |rate: &str| QueueConfig {
            rate_limit: rate.into(),
            ..QueueConfig::default()
        };
        assert_eq!(queue("").rate_limit_per_sec(), None);
        assert_eq!(queue("100/s").rate_limit_per_sec(), Some(100.0));
        assert_eq!(queue("120/m").rate_limit_per_sec(), Some(2.0));
        assert_eq!(queue("3600/h").rate_limit_per_sec(), Some(1.0));
        for bad in ["0/s", "1/d", "x/s", "10", "/s", "+1/s"] {
            assert_eq!(parse_rate_limit(bad), None, "{bad}");
        }
    }
}
