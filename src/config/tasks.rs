//! `[tasks]` and `[mail]`: the task system and the mail its demo tasks send.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::Origins;
use super::{expected_name, is_name, ConfigError};

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
        /// Retry backoff base, in seconds: attempt n waits a random time in [d/2, d],
        /// d = min(base * 2^n, max).
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
}

impl TasksConfig {
    /// The queue called `name`, if configured.
    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }

    pub(super) fn validate(&self, v: &Origins) -> Result<(), ConfigError> {
        for (key, value) in [
            ("tasks.retry_backoff_base", self.retry_backoff_base),
            ("tasks.retry_backoff_max", self.retry_backoff_max),
        ] {
            if !value.is_finite() || value < 0.0 {
                let message = format!("expected a non-negative number of seconds, got {value}");
                return Err(v.fail(key, message));
            }
        }
        v.range("tasks.max_deliver", self.max_deliver.into(), 1, None)?;
        if self.queues.is_empty() {
            return Err(v.fail("tasks.queues", "expected at least one queue"));
        }
        for (i, queue) in self.queues.iter().enumerate() {
            let key = format!("tasks.queues[{i}]");
            if !is_name(&queue.name) {
                return Err(v.fail(format!("{key}.name"), expected_name(&queue.name)));
            }
            v.range(
                &format!("{key}.concurrency"),
                queue.concurrency.into(),
                1,
                None,
            )?;
            if parse_rate_limit(&queue.rate_limit).is_none() {
                let message = format!(
                    "expected \"N/s\", \"N/m\", \"N/h\" (N >= 1) or \"\", got {:?}",
                    queue.rate_limit
                );
                return Err(v.fail(format!("{key}.rate_limit"), message));
            }
        }
        let names = self.queues.iter().map(|q| q.name.as_str());
        v.unique("tasks.queues", ".name", "queue", names)?;
        if self.queue(&self.default_queue).is_none() {
            let names: Vec<String> = self
                .queues
                .iter()
                .map(|q| format!("{:?}", q.name))
                .collect();
            let message = format!(
                "expected one of the queues in tasks.queues ({}), got {:?}",
                names.join(", "),
                self.default_queue
            );
            return Err(v.fail("tasks.default_queue", message));
        }
        Ok(())
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
        Self {
            name: "default".into(),
            concurrency: default_concurrency(),
            rate_limit: String::new(),
        }
    }
}

impl QueueConfig {
    /// The rate limit in tasks per second; `None` when there is none (or it is malformed,
    /// which validation rejects).
    pub fn rate_limit_per_sec(&self) -> Option<f64> {
        parse_rate_limit(&self.rate_limit).flatten()
    }
}

/// `""` → `Some(None)`; `"N/s"`, `"N/m"`, `"N/h"` with N >= 1 → `Some(Some(per second))`;
/// anything else → `None`.
fn parse_rate_limit(s: &str) -> Option<Option<f64>> {
    if s.is_empty() {
        return Some(None);
    }
    let (count, unit) = s.split_once('/')?;
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let count: u64 = count.parse().ok().filter(|&n| n >= 1)?;
    let seconds = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(Some(count as f64 / seconds))
}

string_enum! {
    /// Where task queues live.
    Broker default Memory {
        /// Inside `switchyard serve` (single node).
        Memory => "memory",
        /// NATS JetStream.
        Nats => "nats",
    }
}

section! {
    /// `[mail]`: outgoing mail.
    pub struct MailConfig {
        /// How mail is "sent".
        pub backend: MailBackend = MailBackend::File,
        /// Directory of the `file` backend (`<dir>/<task id>.eml`), relative to the working
        /// directory.
        pub dir: PathBuf = "outbox".into(),
        /// Sender address.
        pub from: String = "shop@example.com".into(),
    }
}

string_enum! {
    /// How mail is delivered.
    MailBackend default File {
        /// Written to `mail.dir`.
        File => "file",
        /// Printed to stderr.
        Console => "console",
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
