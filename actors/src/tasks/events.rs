//! Task events (SPEC.md's `{"kind","task_id","task","queue","node","state","at"}`), handed to an
//! [`EventSink`]: metrics count them, the NATS broker publishes them.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::TaskState;

/// What happened to a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    TaskReceived,
    TaskStarted,
    TaskSucceeded,
    TaskFailed,
    TaskRetried,
    TaskRevoked,
    /// The running task reported progress (`TaskContext::progress`).
    TaskProgress,
}

impl EventKind {
    /// Every kind, in declaration order ([`EventKind::index`]).
    pub const ALL: [EventKind; 7] = [
        EventKind::TaskReceived,
        EventKind::TaskStarted,
        EventKind::TaskSucceeded,
        EventKind::TaskFailed,
        EventKind::TaskRetried,
        EventKind::TaskRevoked,
        EventKind::TaskProgress,
    ];

    /// The kind's place in [`EventKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The kind as SPEC.md writes it (`task-received`, …), the last part of its subject.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TaskReceived => "task-received",
            EventKind::TaskStarted => "task-started",
            EventKind::TaskSucceeded => "task-succeeded",
            EventKind::TaskFailed => "task-failed",
            EventKind::TaskRetried => "task-retried",
            EventKind::TaskRevoked => "task-revoked",
            EventKind::TaskProgress => "task-progress",
        }
    }
}

/// One task event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    pub kind: EventKind,
    pub task_id: String,
    pub task: String,
    pub queue: String,
    pub node: String,
    /// The state the task reached (RECEIVED events carry PENDING).
    pub state: TaskState,
    #[serde(serialize_with = "super::stamp::serialize")]
    pub at: DateTime<Utc>,
    /// task-progress: `{"done","total","info"}` as the record's `progress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
    /// task-received: the task's args, when small (at most [`EVENT_ARGS_MAX`] bytes of JSON),
    /// so that the dashboard can show and retry tasks it saw arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
    /// task-received: the task this one is a retry of (the dashboard's "Retry").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
}

/// The largest args (bytes of JSON) a task-received event carries.
pub const EVENT_ARGS_MAX: usize = 4096;

/// Receives every event of a worker node; must return quickly (it runs on the task runtime).
pub type EventSink = Arc<dyn Fn(&TaskEvent) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::EventKind;

    #[test]
    fn the_subject_name_of_a_kind_is_its_json_name() {
        for (i, kind) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i);
            assert_eq!(
                serde_json::to_value(kind).expect("json"),
                serde_json::Value::from(kind.as_str())
            );
        }
    }
}
