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
    pub at: DateTime<Utc>,
}

/// Receives every event of a worker node; must return quickly (it runs on the task runtime).
pub type EventSink = Arc<dyn Fn(&TaskEvent) + Send + Sync>;
