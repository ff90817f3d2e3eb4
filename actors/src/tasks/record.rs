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
    #[serde(serialize_with = "super::stamp::option")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "super::stamp::option")]
    pub finished_at: Option<DateTime<Utc>>,
    /// What the task last reported (`{"done","total","info"}`), null when it never did.
    #[serde(default)]
    pub progress: Option<Value>,
    /// The task this one retries (the dashboard's "Retry" publishes a copy with a new id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// A chain, group or chord: its members and progress (absent from a task's record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canvas: Option<super::canvas::CanvasInfo>,
}

/// Why a task was REVOKED: the record's `error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Revoked by a client before it started (`"revoked"`).
    Revoked,
    /// Not started before its `expires` (`"expired"`).
    Expired,
}

impl Revocation {
    /// The record's `error` for this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Revocation::Revoked => "revoked",
            Revocation::Expired => "expired",
        }
    }
}

/// Every record is built by exactly one constructor per state: [`ResultRecord::pending`] (and
/// [`ResultRecord::about`] to name the task), [`ResultRecord::started`], then from a STARTED
/// record [`ResultRecord::succeeded`] or [`ResultRecord::retrying`]; [`ResultRecord::failed`]
/// and [`ResultRecord::revoked`] from any record. Workers, brokers and eager mode all use
/// these, so a state's fields are decided in one place.
impl ResultRecord {
    /// PENDING: the record of a task the store does not know, null fields.
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
            progress: None,
            retry_of: None,
            canvas: None,
        }
    }

    /// The same record naming its task, retries so far and node (a PENDING record that
    /// [`ResultRecord::failed`] or [`ResultRecord::revoked`] then finishes).
    pub fn about(mut self, task: &str, retries: u32, node: &str) -> Self {
        self.task = Some(task.to_owned());
        self.retries = retries;
        self.node = Some(node.to_owned());
        self
    }

    /// STARTED: attempt `retries + 1` of `task` began on `node` at `at`.
    pub fn started(id: &str, task: &str, retries: u32, node: &str, at: DateTime<Utc>) -> Self {
        Self {
            state: TaskState::Started,
            started_at: Some(at),
            ..Self::pending(id).about(task, retries, node)
        }
    }

    /// SUCCESS: the started attempt returned `result` at `at`.
    pub fn succeeded(self, result: Value, at: DateTime<Utc>) -> Self {
        Self {
            state: TaskState::Success,
            result,
            error: None,
            finished_at: Some(at),
            ..self
        }
    }

    /// RETRY: the started attempt failed with `error`; retry number `retries` is scheduled.
    pub fn retrying(self, retries: u32, error: String) -> Self {
        Self {
            state: TaskState::Retry,
            retries,
            result: Value::Null,
            error: Some(error),
            finished_at: None,
            ..self
        }
    }

    /// FAILURE: the task failed for good with `error` (`"<kind>: <message>"`) at `at`.
    pub fn failed(self, error: String, at: DateTime<Utc>) -> Self {
        Self {
            state: TaskState::Failure,
            result: Value::Null,
            error: Some(error),
            finished_at: Some(at),
            ..self
        }
    }

    /// REVOKED: the task will never run, for `why`, decided at `at` (the record keeps what
    /// it knew: task, retries, node).
    pub fn revoked(self, why: Revocation, at: DateTime<Utc>) -> Self {
        Self {
            state: TaskState::Revoked,
            result: Value::Null,
            error: Some(why.as_str().to_owned()),
            finished_at: Some(at),
            ..self
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
            r#"{"id":"x","task":null,"state":"PENDING","result":null,"error":null,"retries":0,"node":null,"started_at":null,"finished_at":null,"progress":null}"#
        );
    }

    #[test]
    fn each_state_has_its_constructor() {
        let t0 = Utc::now();
        let started = ResultRecord::started("x", "demo.add", 1, "n", t0);
        assert_eq!(
            (started.state, started.retries, started.started_at),
            (TaskState::Started, 1, Some(t0))
        );
        let done = started.clone().succeeded(Value::from(5), t0);
        assert_eq!(
            (done.state, done.result.clone()),
            (TaskState::Success, Value::from(5))
        );
        let retry = started.clone().retrying(2, "io: x".into());
        assert_eq!(
            (retry.state, retry.retries, retry.finished_at),
            (TaskState::Retry, 2, None)
        );
        let failed = retry.clone().failed("io: y".into(), t0);
        assert_eq!(
            (failed.state, failed.error.as_deref()),
            (TaskState::Failure, Some("io: y"))
        );
        let revoked = ResultRecord::pending("x").revoked(Revocation::Revoked, t0);
        assert_eq!(
            (revoked.state, revoked.error.as_deref(), revoked.task),
            (TaskState::Revoked, Some("revoked"), None)
        );
        let expired = ResultRecord::pending("x")
            .about("demo.add", 0, "n")
            .revoked(Revocation::Expired, t0);
        assert_eq!(
            (expired.error.as_deref(), expired.task.as_deref()),
            (Some("expired"), Some("demo.add"))
        );
    }
}
