//! What the dashboard and the live streams read: a bounded index of recent tasks fed by task
//! events, the live nodes from heartbeats, and a broadcast of every event as one SSE frame.
//!
//! Publishing an event never waits for a reader. While streams are open, frames gather for
//! [`COALESCE`] (or until they reach [`BATCH_BYTES`]) and go as one [`Batch`] to a
//! `tokio::sync::broadcast` channel of [`CLIENT_BUFFER`] batches: the work per event is done
//! once, not once per stream, and a stream writes a batch's bytes as they are. A stream that
//! falls further behind is told to reload (it "lags") instead of slowing the worker that
//! emitted the event.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use switchyard_actors::cluster::{ClusterView, NodeStatus};
use switchyard_actors::tasks::{EventKind, TaskEvent, TaskState};
use tokio::sync::broadcast;

/// How many tasks the recent-tasks index keeps (the oldest are forgotten first).
pub const RECENT_TASKS: usize = 100_000;
/// Events kept per task in the index.
const EVENTS_PER_TASK: usize = 32;
/// Frames kept for `Last-Event-ID` reconnects.
const HISTORY: usize = 4096;
/// Batches one stream may fall behind before it is told to reload (about 5 s of them).
pub const CLIENT_BUFFER: usize = 256;
/// How long frames gather before they go to the streams as one batch: an event reaches a
/// page at most this much later, and a stream wakes about 50 times a second under load
/// instead of once per event.
pub const COALESCE: Duration = Duration::from_millis(20);
/// A window's frames go out early once their bytes reach this. actix-web copies each chunk a
/// stream writes into the connection's write buffer and keeps that buffer for the next chunk
/// only up to 128 KiB; a bigger batch (a 20 ms window at 14k tasks/s is about 170 KB) made
/// every stream allocate a fresh buffer for every batch, which the kernel then zeroed page by
/// page (docs/dashboard.md).
pub const BATCH_BYTES: usize = 64 * 1024;
/// The largest event taken from NATS (Switchyard's own are far smaller: args above
/// `EVENT_ARGS_MAX` are left out), so the index's memory stays bounded.
const MAX_EVENT_BYTES: usize = 16 * 1024;
/// The window of the per-queue rate, in whole seconds: the current second and the 59 before.
const RATE_SECONDS: usize = 60;

/// One event of a task, as the task page lists it.
#[derive(Clone, Debug, Serialize)]
pub struct EventLine {
    pub kind: EventKind,
    pub state: TaskState,
    pub node: String,
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
}

/// A task as the index knows it from its events.
#[derive(Clone, Debug, Serialize)]
pub struct TaskSummary {
    pub id: String,
    pub task: String,
    pub queue: String,
    pub state: TaskState,
    pub node: String,
    /// When its first event arrived.
    pub seen_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub progress: Option<Value>,
    /// Its args, when its task-received event carried them (small args only).
    pub args: Option<Value>,
    pub retry_of: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventLine>,
}

/// One server-sent event: its id and its `data:` JSON (one line).
#[derive(Debug)]
pub struct Frame {
    pub id: u64,
    /// The task it is about (none for node heartbeats).
    pub task_id: Option<String>,
    /// The frame as the stream sends it (`id: N`, `data: JSON`, a blank line), made once
    /// for every reader.
    pub sse: actix_web::web::Bytes,
}

impl Frame {
    /// Its `data:` JSON.
    pub fn data(&self) -> &str {
        let text = std::str::from_utf8(&self.sse).unwrap_or_default();
        text.split_once("data: ")
            .map_or("", |(_, rest)| rest.trim_end_matches('\n'))
    }
}

/// The frames of one [`COALESCE`] window, as every stream gets them.
#[derive(Debug)]
pub struct Batch {
    /// In id order.
    pub frames: Vec<Arc<Frame>>,
    /// `frames`' bytes, concatenated once for every stream.
    pub sse: actix_web::web::Bytes,
}

impl Batch {
    /// The frames of one window, in id order.
    fn of(frames: Vec<Arc<Frame>>) -> Self {
        let len = frames.iter().map(|f| f.sse.len()).sum();
        let mut sse = actix_web::web::BytesMut::with_capacity(len);
        for f in &frames {
            sse.extend_from_slice(&f.sse);
        }
        Self {
            frames,
            sse: sse.freeze(),
        }
    }

    /// The first frame's id (0: empty).
    pub fn first_id(&self) -> u64 {
        self.frames.first().map_or(0, |f| f.id)
    }
}

/// What the flusher and the streams share.
struct Fanout {
    /// The window's frames so far and their bytes. Batches are sent with this held, so they
    /// go out in id order whether the flusher or a full window sends them.
    pending: Mutex<Pending>,
    wake: tokio::sync::Notify,
    tx: broadcast::Sender<Arc<Batch>>,
    /// A flusher task is running (it ends when the last stream closed).
    flushing: Mutex<bool>,
}

/// The frames of the window being gathered.
#[derive(Default)]
struct Pending {
    frames: Vec<Arc<Frame>>,
    bytes: usize,
}

impl Fanout {
    /// Adds `frame` to the window; sends the window at once when it reached [`BATCH_BYTES`],
    /// else wakes the flusher.
    fn push(&self, frame: Arc<Frame>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.bytes += frame.sse.len();
        pending.frames.push(frame);
        if pending.bytes >= BATCH_BYTES {
            self.send(&mut pending);
        } else {
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// Sends the window's frames as one batch (with the window's lock held).
    fn send(&self, pending: &mut Pending) {
        let frames = std::mem::take(&mut pending.frames);
        pending.bytes = 0;
        if !frames.is_empty() {
            let _ = self.tx.send(Arc::new(Batch::of(frames)));
        }
    }

    /// Sends what gathered, a [`COALESCE`] after the first frame of each window, until no
    /// stream is left.
    async fn flush(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(COALESCE).await;
            self.send(&mut self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            let mut flushing = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
            if self.tx.receiver_count() == 0 {
                *flushing = false;
                return;
            }
        }
    }
}

#[derive(Default)]
struct Index {
    tasks: HashMap<String, TaskSummary>,
    /// Ids, oldest first.
    order: VecDeque<String>,
    /// Tasks in STARTED per queue.
    running: HashMap<String, u64>,
    /// Finished (success or failure) events per queue and second of the last minute.
    finished: HashMap<String, Rate>,
}

/// Finished tasks of one queue in each of the last [`RATE_SECONDS`] seconds: memory and work
/// per event stay constant whatever the rate (a list of the minute's events would hold
/// 840,000 entries at 14,000 tasks/s, and the overview would count them once per queue).
#[derive(Clone, Copy)]
struct Rate {
    /// `counts[s % RATE_SECONDS]` is second `s` (seconds since the monitor started).
    counts: [u32; RATE_SECONDS],
    /// The newest second counted.
    second: u64,
}

impl Rate {
    /// Moves the window to end at `second`, forgetting the seconds that left it.
    fn advance(&mut self, second: u64) {
        if second <= self.second {
            return;
        }
        let gone = (second - self.second).min(RATE_SECONDS as u64);
        for s in (second + 1 - gone)..=second {
            self.counts[(s % RATE_SECONDS as u64) as usize] = 0;
        }
        self.second = second;
    }

    fn record(&mut self, second: u64) {
        self.advance(second);
        let i = (second % RATE_SECONDS as u64) as usize;
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    /// The count of the window ending at `second`.
    fn total(mut self, second: u64) -> u64 {
        self.advance(second);
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }
}

/// A filter of the task list.
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    pub task: Option<String>,
    pub id_prefix: Option<String>,
}

impl TaskFilter {
    fn matches(&self, t: &TaskSummary) -> bool {
        self.state.is_none_or(|s| s == t.state)
            && self.task.as_deref().is_none_or(|n| t.task == n)
            && self
                .id_prefix
                .as_deref()
                .is_none_or(|p| t.id.starts_with(p))
    }
}

/// The recent tasks, the live nodes and the event broadcast of one node.
pub struct Monitor {
    index: Mutex<Index>,
    fanout: Arc<Fanout>,
    history: Mutex<VecDeque<Arc<Frame>>>,
    next_id: AtomicU64,
    nodes: Mutex<ClusterView>,
    capacity: usize,
    started: Instant,
}

impl Monitor {
    /// An empty monitor for heartbeats every `heartbeat_interval`.
    pub fn new(heartbeat_interval: Duration) -> Self {
        Self::with_capacity(heartbeat_interval, RECENT_TASKS)
    }

    /// An empty monitor keeping at most `capacity` tasks.
    pub fn with_capacity(heartbeat_interval: Duration, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(CLIENT_BUFFER);
        let capacity = capacity.max(1);
        Self {
            index: Mutex::default(),
            fanout: Arc::new(Fanout {
                pending: Mutex::default(),
                wake: tokio::sync::Notify::new(),
                tx,
                flushing: Mutex::new(false),
            }),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            next_id: AtomicU64::new(1),
            nodes: Mutex::new(ClusterView::new(heartbeat_interval)),
            capacity,
            started: Instant::now(),
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in one task event: the index, then every stream.
    pub fn observe(&self, e: &TaskEvent) {
        {
            let mut ix = self.index();
            let ix = &mut *ix;
            let line = EventLine {
                kind: e.kind,
                state: e.state,
                node: e.node.clone(),
                at: e.at,
                progress: e.progress.clone(),
            };
            let old_state = match ix.tasks.get_mut(&e.task_id) {
                Some(t) => {
                    let old = t.state;
                    // Progress keeps the state; a late received/progress event never moves a
                    // finished task back.
                    let keep = matches!(e.kind, EventKind::TaskProgress | EventKind::TaskReceived)
                        && t.state != TaskState::Pending;
                    if !keep {
                        t.state = e.state;
                    }
                    if !e.node.is_empty() && t.node != e.node {
                        t.node = e.node.clone();
                    }
                    t.updated_at = e.at;
                    if e.progress.is_some() {
                        t.progress = e.progress.clone();
                    }
                    if e.args.is_some() {
                        t.args = e.args.clone();
                    }
                    if e.retry_of.is_some() {
                        t.retry_of = e.retry_of.clone();
                    }
                    if t.events.len() >= EVENTS_PER_TASK {
                        // Full: progress reports make room first, so the outcome is kept.
                        let i = t
                            .events
                            .iter()
                            .position(|e| e.kind == EventKind::TaskProgress)
                            .unwrap_or(0);
                        t.events.remove(i);
                    }
                    t.events.push(line);
                    Some(old)
                }
                None => {
                    ix.tasks.insert(
                        e.task_id.clone(),
                        TaskSummary {
                            id: e.task_id.clone(),
                            task: e.task.clone(),
                            queue: e.queue.clone(),
                            state: e.state,
                            node: e.node.clone(),
                            seen_at: e.at,
                            updated_at: e.at,
                            progress: e.progress.clone(),
                            args: e.args.clone(),
                            retry_of: e.retry_of.clone(),
                            events: vec![line],
                        },
                    );
                    ix.order.push_back(e.task_id.clone());
                    None
                }
            };
            let new_state = ix.tasks.get(&e.task_id).map(|t| t.state);
            if old_state != new_state {
                if old_state == Some(TaskState::Started) {
                    dec(&mut ix.running, &e.queue);
                }
                if new_state == Some(TaskState::Started) {
                    *ix.running.entry(e.queue.clone()).or_default() += 1;
                }
            }
            if matches!(e.kind, EventKind::TaskSucceeded | EventKind::TaskFailed) {
                let second = self.second();
                if let Some(rate) = ix.finished.get_mut(&e.queue) {
                    rate.record(second);
                } else {
                    // A new queue: forget the ones idle for the whole window first, so names
                    // that stopped coming do not pile up.
                    ix.finished
                        .retain(|_, r| second.saturating_sub(r.second) < RATE_SECONDS as u64);
                    let mut rate = Rate {
                        counts: [0; RATE_SECONDS],
                        second,
                    };
                    rate.record(second);
                    ix.finished.insert(e.queue.clone(), rate);
                }
            }
            while ix.order.len() > self.capacity {
                let Some(old) = ix.order.pop_front() else {
                    break;
                };
                if let Some(t) = ix.tasks.remove(&old) {
                    if t.state == TaskState::Started {
                        dec(&mut ix.running, &t.queue);
                    }
                }
            }
        }
        // Straight into the frame: the event's JSON is written once, where the stream reads it.
        self.send(Some(e.task_id.clone()), |out| {
            serde_json::to_writer(out, e).is_ok()
        });
    }

    /// Takes in one heartbeat (a `node-heartbeat` payload); whether it was one.
    pub fn observe_heartbeat(&self, payload: &[u8]) -> bool {
        let Some(status) = NodeStatus::parse(payload) else {
            return false;
        };
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(payload, Instant::now());
        let mut value = serde_json::to_value(&status).unwrap_or_default();
        if let Value::Object(map) = &mut value {
            map.insert("kind".into(), Value::from("node-heartbeat"));
        }
        self.send(None, |out| serde_json::to_writer(out, &value).is_ok());
        true
    }

    /// Sends one frame whose `data:` JSON `write` appends (nothing when it fails).
    fn send(&self, task_id: Option<String>, write: impl FnOnce(&mut Vec<u8>) -> bool) {
        use std::io::Write;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut sse = Vec::with_capacity(256);
        let _ = write!(sse, "id: {id}\ndata: ");
        if !write(&mut sse) {
            return;
        }
        sse.extend_from_slice(b"\n\n");
        let frame = Arc::new(Frame {
            id,
            task_id,
            sse: sse.into(),
        });
        {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if h.len() >= HISTORY {
                h.pop_front();
            }
            h.push_back(frame.clone());
        }
        // Nobody watching: nothing to gather (a stream that opens later replays the history).
        if self.fanout.tx.receiver_count() > 0 {
            self.fanout.push(frame);
        }
    }

    /// The id of the last frame sent (0: none yet).
    pub fn last_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// A new stream's receiver of batches (call within a tokio runtime: the first stream
    /// starts the flusher).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        let rx = self.fanout.tx.subscribe();
        let mut flushing = self
            .fanout
            .flushing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !*flushing {
            *flushing = true;
            tokio::spawn(self.fanout.clone().flush());
        }
        rx
    }

    /// The frames after `last_id`, when the history still holds all of them.
    pub fn since(&self, last_id: u64) -> Option<Vec<Arc<Frame>>> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let next = self.next_id.load(Ordering::Relaxed);
        if last_id >= next {
            return None;
        }
        let oldest = h.front().map_or(next, |f| f.id);
        if last_id + 1 < oldest {
            return None;
        }
        Some(h.iter().filter(|f| f.id > last_id).cloned().collect())
    }

    /// The frames of task `task_id` the history still holds.
    pub fn history_of(&self, task_id: &str) -> Vec<Arc<Frame>> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.iter()
            .filter(|f| f.task_id.as_deref() == Some(task_id))
            .cloned()
            .collect()
    }

    /// Streams open now.
    pub fn streams(&self) -> usize {
        self.fanout.tx.receiver_count()
    }

    /// The task `id` from the index.
    pub fn task(&self, id: &str) -> Option<TaskSummary> {
        self.index().tasks.get(id).cloned()
    }

    /// Tasks matching `filter`, newest first: `limit` from `offset`, and how many match.
    pub fn tasks(
        &self,
        filter: &TaskFilter,
        offset: usize,
        limit: usize,
    ) -> (Vec<TaskSummary>, usize) {
        let ix = self.index();
        if filter.state.is_none() && filter.task.is_none() && filter.id_prefix.is_none() {
            // No filter: the page alone, not a scan of the index.
            let out = ix
                .order
                .iter()
                .rev()
                .skip(offset)
                .take(limit)
                .filter_map(|id| ix.tasks.get(id))
                .map(|t| TaskSummary {
                    events: Vec::new(),
                    ..t.clone()
                })
                .collect();
            return (out, ix.order.len());
        }
        let mut out = Vec::new();
        let mut matched = 0;
        for id in ix.order.iter().rev() {
            // The id is at hand: a prefix that does not match skips the lookup.
            if filter
                .id_prefix
                .as_deref()
                .is_some_and(|p| !id.starts_with(p))
            {
                continue;
            }
            let Some(t) = ix.tasks.get(id) else { continue };
            if !filter.matches(t) {
                continue;
            }
            if matched >= offset && out.len() < limit {
                let mut t = t.clone();
                t.events.clear();
                out.push(t);
            }
            matched += 1;
        }
        (out, matched)
    }

    /// Tasks the index holds.
    pub fn len(&self) -> usize {
        self.index().tasks.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tasks running now in `queue` (as events tell).
    pub fn running(&self, queue: &str) -> u64 {
        self.index().running.get(queue).copied().unwrap_or(0)
    }

    /// Tasks of `queue` that finished in the last minute (this second and the 59 before).
    pub fn finished_last_minute(&self, queue: &str) -> u64 {
        let second = self.second();
        self.index()
            .finished
            .get(queue)
            .map_or(0, |r| r.total(second))
    }

    /// Whole seconds since the monitor started.
    fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The live nodes from heartbeats.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live(Instant::now())
    }

    /// Every task event to the monitor (chained after `next`), for the in-process workers.
    pub fn sink(
        self: &Arc<Self>,
        next: Option<switchyard_actors::tasks::EventSink>,
    ) -> switchyard_actors::tasks::EventSink {
        let monitor = self.clone();
        Arc::new(move |e: &TaskEvent| {
            if let Some(next) = &next {
                next(e);
            }
            monitor.observe(e);
        })
    }

    /// Feeds the monitor from `<prefix>.events.>` until the subscription ends.
    pub async fn listen(
        self: Arc<Self>,
        client: async_nats::Client,
        prefix: &str,
    ) -> Result<(), async_nats::SubscribeError> {
        use futures_util::StreamExt;
        let heartbeat = switchyard_actors::cluster::heartbeat_subject(prefix);
        let mut sub = client.subscribe(format!("{prefix}.events.>")).await?;
        actix_rt::spawn(async move {
            while let Some(msg) = sub.next().await {
                if msg.payload.len() > MAX_EVENT_BYTES {
                    tracing::debug!(subject = %msg.subject, "ignored an oversized event");
                } else if msg.subject.as_str() == heartbeat {
                    self.observe_heartbeat(&msg.payload);
                } else if let Ok(e) = serde_json::from_slice::<TaskEvent>(&msg.payload) {
                    if e.task_id.len() <= 128 && e.task.len() <= 512 && e.queue.len() <= 512 {
                        self.observe(&e);
                    }
                } else {
                    tracing::debug!(subject = %msg.subject, "ignored a malformed event");
                }
            }
        });
        Ok(())
    }
}

fn dec(map: &mut HashMap<String, u64>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: EventKind, state: TaskState) -> TaskEvent {
        TaskEvent {
            kind,
            task_id: id.into(),
            task: "demo.add".into(),
            queue: "default".into(),
            node: "n1".into(),
            state,
            at: Utc::now(),
            progress: None,
            args: None,
            retry_of: None,
        }
    }

    #[test]
    fn the_index_keeps_the_newest_tasks_and_counts_running_ones() {
        let m = Monitor::with_capacity(Duration::from_secs(5), 3);
        for i in 0..5 {
            m.observe(&event(
                &format!("t{i}"),
                EventKind::TaskReceived,
                TaskState::Pending,
            ));
        }
        m.observe(&event("t4", EventKind::TaskStarted, TaskState::Started));
        assert_eq!(m.len(), 3);
        let (page, total) = m.tasks(&TaskFilter::default(), 0, 10);
        let ids: Vec<&str> = page.iter().map(|t| t.id.as_str()).collect();
        assert_eq!((ids, total), (vec!["t4", "t3", "t2"], 3));
        assert_eq!(m.running("default"), 1);
        m.observe(&event("t4", EventKind::TaskSucceeded, TaskState::Success));
        assert_eq!(m.running("default"), 0);
        assert_eq!(m.finished_last_minute("default"), 1);
        let t4 = m.task("t4").expect("t4");
        assert_eq!(t4.events.len(), 3);
        let filter = TaskFilter {
            state: Some(TaskState::Success),
            ..Default::default()
        };
        assert_eq!(m.tasks(&filter, 0, 10).1, 1);
        let filter = TaskFilter {
            id_prefix: Some("t3".into()),
            ..Default::default()
        };
        assert_eq!(m.tasks(&filter, 0, 10).0[0].id, "t3");
    }

    #[test]
    fn the_rate_counts_the_last_sixty_seconds_and_forgets_older_ones() {
        let mut r = Rate {
            counts: [0; RATE_SECONDS],
            second: 100,
        };
        r.record(100);
        r.record(100);
        r.record(130);
        assert_eq!(r.total(130), 3);
        // Second 100 is in the window ending at 159, not in the one ending at 160.
        assert_eq!(r.total(159), 3);
        assert_eq!(r.total(160), 1);
        assert_eq!(r.total(189), 1);
        assert_eq!(r.total(190), 0);
        // A late reading (an older second than the newest counted) sees the whole window.
        assert_eq!(r.total(120), 3);
        // Far ahead: everything is forgotten, and counting starts over.
        r.record(1_000);
        assert_eq!(r.total(1_000), 1);
        assert_eq!(r.counts.iter().map(|&c| u64::from(c)).sum::<u64>(), 1);
    }

    #[tokio::test]
    async fn a_stream_can_resume_after_its_last_event_id() {
        let m = Monitor::new(Duration::from_secs(5));
        let mut rx = m.subscribe();
        m.observe(&event("a", EventKind::TaskReceived, TaskState::Pending));
        m.observe(&event("b", EventKind::TaskReceived, TaskState::Pending));
        m.observe(&event("a", EventKind::TaskStarted, TaskState::Started));
        // One batch of the three, in order, their bytes made once.
        let batch = rx.recv().await.expect("a batch");
        let ids: Vec<_> = batch.frames.iter().map(|f| f.task_id.as_deref()).collect();
        assert_eq!(ids, [Some("a"), Some("b"), Some("a")]);
        assert!(batch.frames[2].data().contains("task-started"));
        let sse = String::from_utf8_lossy(&batch.sse).into_owned();
        assert_eq!(sse.matches("data: ").count(), 3, "{sse}");
        let first = m.since(0).expect("in history")[0].clone();
        let data: Value = serde_json::from_str(first.data()).expect("one JSON object");
        assert_eq!(data["task_id"], "a", "{}", first.data());
        let rest = m.since(first.id).expect("in history");
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].task_id.as_deref(), Some("b"));
        assert!(m.since(first.id + 10).is_none());
        assert!(!m.observe_heartbeat(b"not json"));
    }

    #[tokio::test]
    async fn a_burst_goes_out_in_batches_of_bounded_size_in_order() {
        let m = Monitor::new(Duration::from_secs(5));
        let mut rx = m.subscribe();
        let n = 2000;
        for i in 0..n {
            m.observe(&event(
                &format!("t{i}"),
                EventKind::TaskReceived,
                TaskState::Pending,
            ));
        }
        let (mut ids, mut batches) = (Vec::new(), 0);
        while ids.len() < n {
            let batch = tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .expect("a batch within 2 s")
                .expect("not lagging");
            let largest = batch.frames.iter().map(|f| f.sse.len()).max().unwrap_or(0);
            assert!(
                batch.sse.len() < BATCH_BYTES + largest,
                "{}",
                batch.sse.len()
            );
            let bytes: usize = batch.frames.iter().map(|f| f.sse.len()).sum();
            assert_eq!(batch.sse.len(), bytes);
            ids.extend(batch.frames.iter().map(|f| f.id));
            batches += 1;
        }
        // Well over BATCH_BYTES in all, sent as several batches, every frame once, in order.
        assert!(batches > 2, "{batches} batches");
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "ids in order");
        assert_eq!(ids.len(), n);
    }
}
