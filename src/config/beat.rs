//! `[beat]`: periodic schedules (`every` read by humantime, `cron` checked by croner).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::Origins;
use super::{ConfigError, TasksConfig};

section! {
    /// `[beat]`: periodic schedules.
    pub struct BeatConfig {
        /// `[[beat.schedule]]`: the schedules (none built in).
        pub schedule: Vec<ScheduleEntry> = Vec::new(),
    }
}

/// One `[[beat.schedule]]` entry: exactly one of `every` and `cron`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Schedule name (unique); identifies its ticks across beat nodes.
    pub name: String,
    /// Task to publish, e.g. `switchyard.clear_sessions`.
    pub task: String,
    /// Interval in humantime syntax, such as `"30s"`, `"5m"`, `"1h"`, `"1d"` or `"1h 30m"`.
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Cron expression with seconds, 6 fields: `sec min hour day month weekday`.
    #[serde(default)]
    pub cron: Option<String>,
    /// Queue to publish to; default: the task's own queue or `tasks.default_queue`.
    #[serde(default)]
    pub queue: Option<String>,
    /// Task arguments (a TOML table, a JSON object on the wire).
    #[serde(default)]
    pub args: serde_json::Map<String, serde_json::Value>,
}

impl ScheduleEntry {
    /// The `every` interval, when set.
    pub fn every_duration(&self) -> Option<Duration> {
        self.every
    }
}

impl BeatConfig {
    pub(super) fn validate(&self, v: &Origins, tasks: &TasksConfig) -> Result<(), ConfigError> {
        let names = self.schedule.iter().map(|s| s.name.as_str());
        v.unique("beat.schedule", ".name", "schedule", names)?;
        for (i, entry) in self.schedule.iter().enumerate() {
            let key = format!("beat.schedule[{i}]");
            if entry.task.is_empty() {
                return Err(v.fail(format!("{key}.task"), "expected a non-empty task name"));
            }
            match (&entry.every, &entry.cron) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(v.fail(key, "expected exactly one of `every` and `cron`"));
                }
                (Some(every), None) if every.is_zero() => {
                    let message = "expected a positive interval such as \"30s\" or \"1h 30m\"";
                    return Err(v.fail(format!("{key}.every"), message));
                }
                (Some(_), None) => {}
                (None, Some(cron)) => {
                    if let Err(e) = croner::Cron::new(cron).with_seconds_required().parse() {
                        let message = format!(
                            "expected 6 fields `sec min hour day month weekday`, got {cron:?} \
                             ({e})"
                        );
                        return Err(v.fail(format!("{key}.cron"), message));
                    }
                }
            }
            if let Some(queue) = &entry.queue {
                if tasks.queue(queue).is_none() {
                    let message =
                        format!("expected one of the queues in tasks.queues, got {queue:?}");
                    return Err(v.fail(format!("{key}.queue"), message));
                }
            }
        }
        Ok(())
    }
}
