//! The result record (SPEC.md's format) and task states.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A task's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskState {
    /// Unknown to the result store: waiting, or never published, or forgotten/expired.
    Pending,
    /// An attempt is running.
    Started,
    /// An attempt failed; another is scheduled.
    Retry,
    /// Finished with a result.
    Success,
    /// Failed for good.
    Failure,
    /// Revoked before it started, or expired.
    Revoked,
}

impl TaskState {
    /// The state's name as SPEC.md writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Started => "STARTED",
            TaskState::Retry => "RETRY",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Revoked => "REVOKED",
        }
    }

    /// Whether the task is done (SUCCESS, FAILURE or REVOKED).
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failure | TaskState::Revoked
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task's result record, kept `tasks.result_ttl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub id: String,
    pub task: Option<String>,
    pub state: TaskState,
    /// The result (SUCCESS), else null.
    pub result: Value,
    /// `"<kind>: <message>"` (FAILURE, RETRY, REVOKED), else null.
    pub error: Option<String>,
    /// Retries so far; authoritative (the message's own field is its value at publish).
    pub retries: u32,
    /// The node that ran the last attempt.
    pub node: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl ResultRecord {
    /// The record of a task the store does not know: PENDING, null fields.
    pub fn pending(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            task: None,
            state: TaskState::Pending,
            result: Value::Null,
            error: None,
            retries: 0,
            node: None,
            started_at: None,
            finished_at: None,
        }
    }

    /// A record of `task` in `state`.
    pub(crate) fn new(id: &str, task: &str, state: TaskState, retries: u32, node: &str) -> Self {
        Self {
            id: id.to_owned(),
            task: Some(task.to_owned()),
            state,
            result: Value::Null,
            error: None,
            retries,
            node: Some(node.to_owned()),
            started_at: None,
            finished_at: None,
        }
    }

    /// The record as one line of compact JSON.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_record_has_null_fields_in_spec_order() {
        let line = ResultRecord::pending("x").to_json_line();
        assert_eq!(
            line,
            r#"{"id":"x","task":null,"state":"PENDING","result":null,"error":null,"retries":0,"node":null,"started_at":null,"finished_at":null}"#
        );
    }
}
