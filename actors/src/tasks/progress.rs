//! Task progress (`TaskContext::progress`): the running attempt's STARTED record gains
//! `"progress": {"done","total","info"}` and a `task-progress` event is emitted, at most once
//! per [`PROGRESS_EVERY`] (a tight loop reporting every step cannot flood the broker); the
//! last report, written or not, goes into the attempt's final record.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};

use super::events::{EventKind, EventSink, TaskEvent};
use super::{ResultRecord, ResultStore, TaskState};

/// The shortest time between two progress writes of one attempt (the final report,
/// `done >= total`, is always written).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Reports one attempt's progress.
pub(crate) struct ProgressReporter {
    started: ResultRecord,
    queue: String,
    results: Arc<dyn ResultStore>,
    events: Option<EventSink>,
    state: Mutex<State>,
    /// One write at a time, in order.
    write: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    last: Option<Value>,
    written_at: Option<Instant>,
}

impl ProgressReporter {
    pub(crate) fn new(
        started: ResultRecord,
        queue: &str,
        results: Arc<dyn ResultStore>,
        events: Option<EventSink>,
    ) -> Self {
        Self {
            started,
            queue: queue.to_owned(),
            results,
            events,
            state: Mutex::default(),
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// Records a report; writes it (record and event) unless one was written less than
    /// [`PROGRESS_EVERY`] ago.
    pub(crate) async fn report(&self, done: u64, total: u64, info: Value) {
        let progress = json!({"done": done, "total": total, "info": info});
        let due = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.last = Some(progress.clone());
            let due = done >= total || st.written_at.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
            if due {
                st.written_at = Some(Instant::now());
            }
            due
        };
        if !due {
            return;
        }
        let _one = self.write.lock().await;
        let record = ResultRecord {
            progress: Some(progress.clone()),
            ..self.started.clone()
        };
        if let Err(e) = self.results.put_result(&record).await {
            tracing::warn!(task_id = %record.id, "cannot store progress: {e}");
        }
        if let Some(sink) = &self.events {
            sink(&TaskEvent {
                kind: EventKind::TaskProgress,
                task_id: record.id.clone(),
                task: record.task.clone().unwrap_or_default(),
                queue: self.queue.clone(),
                node: record.node.clone().unwrap_or_default(),
                state: TaskState::Started,
                at: Utc::now(),
                progress: Some(progress),
                args: None,
                retry_of: None,
            });
        }
    }

    /// The last report, if any.
    pub(crate) fn last(&self) -> Option<Value> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
            .clone()
    }
}

impl std::fmt::Debug for ProgressReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressReporter")
            .field("task_id", &self.started.id)
            .finish_non_exhaustive()
    }
}
