//! Canvas: chains, groups and chords, built from plain JSON fields of the task message
//! (docs/task-protocol.md) so that a publisher in any language can build one.
//!
//! A canvas message is a task message whose `task` is `switchyard.chain`, `switchyard.group`
//! or `switchyard.chord`, with the members under `tasks` (and a chord's `callback`). The
//! runner that receives it *expands* it: it writes the canvas record under the message's id
//! (kind, member ids, per-member results) and publishes the members (a chain: its first step)
//! with deterministic ids (UUIDv5 of `"<canvas id>:<index>"`, `"<canvas id>:callback"`) as
//! their `Nats-Msg-Id`, so a redelivered canvas message publishes nothing twice. Each member
//! carries `"canvas": {"id", "index"}`; when it settles for good, its runner records it in the
//! canvas record with a compare-and-swap ([`ResultStore::update_result`]):
//!
//! - a chain publishes its next step with the result bound to the step's `result_arg`, or
//!   finishes with the last result; a failed step stops it (FAILURE, `failed_step`);
//! - a group finishes when every member has, its result the members' results in order;
//! - a chord's member whose swap completes the set publishes the callback, with the results in
//!   order under the callback's `result_arg`; a re-run member finding itself counted does
//!   nothing (it only re-publishes the callback, deduplicated by its id, when the record says
//!   it was never published), and the callback's claim refuses an id that already finished.
//!
//! Revoking a canvas id marks its record REVOKED and revokes every member that has not started.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::broker::{BrokerError, Delivery, Outgoing, ResultStore};
use super::execute::Runner;
use super::{Envelope, ResultRecord, TaskState};

/// The task name of a chain message.
pub const CHAIN: &str = "switchyard.chain";
/// The task name of a group message.
pub const GROUP: &str = "switchyard.group";
/// The task name of a chord message.
pub const CHORD: &str = "switchyard.chord";
/// The most members a group or chord (and steps a chain) may have.
pub const MAX_MEMBERS: usize = 1000;
/// The longest task name, `result_arg` and queue name a step may give.
const MAX_NAME: usize = 256;
/// Compare-and-swap attempts on a canvas record before giving up (the delivery is put back).
pub(crate) const CAS_ATTEMPTS: u32 = 200;
/// Members published at once while expanding a group.
const PUBLISH_CONCURRENCY: usize = 64;

/// The namespace of member and callback ids.
const MEMBER_NAMESPACE: Uuid = Uuid::from_u128(0x8c2e_41d7_9b3a_4f60_a1e5_6d0c_2b7f_9e14);

/// The id of member `index` of canvas `canvas`: UUIDv5 of `"<canvas>:<index>"`.
pub fn member_id(canvas: &str, index: usize) -> String {
    Uuid::new_v5(&MEMBER_NAMESPACE, format!("{canvas}:{index}").as_bytes()).to_string()
}

/// The id of the callback of chord `canvas`: UUIDv5 of `"<canvas>:callback"`.
pub fn callback_id(canvas: &str) -> String {
    Uuid::new_v5(&MEMBER_NAMESPACE, format!("{canvas}:callback").as_bytes()).to_string()
}

/// Whether `task` names a canvas (`switchyard.chain`, `.group`, `.chord`).
pub fn is_canvas_task(task: &str) -> bool {
    matches!(task, CHAIN | GROUP | CHORD)
}

/// The kind of a canvas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CanvasKind {
    Chain,
    Group,
    Chord,
}

impl CanvasKind {
    /// The task name of a message of this kind.
    pub fn task_name(self) -> &'static str {
        match self {
            CanvasKind::Chain => CHAIN,
            CanvasKind::Group => GROUP,
            CanvasKind::Chord => CHORD,
        }
    }

    fn of(task: &str) -> Option<Self> {
        match task {
            CHAIN => Some(CanvasKind::Chain),
            GROUP => Some(CanvasKind::Group),
            CHORD => Some(CanvasKind::Chord),
            _ => None,
        }
    }
}

/// One member of a canvas: a task, its args, and (chain steps after the first, chord
/// callbacks) the args field the previous result is bound to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub task: String,
    #[serde(default = "empty_args")]
    pub args: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_arg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

fn empty_args() -> Value {
    Value::Object(Map::new())
}

impl Signature {
    /// `task` with JSON `args` (an object).
    pub fn new(task: impl Into<String>, args: Value) -> Self {
        Self {
            task: task.into(),
            args,
            result_arg: None,
            queue: None,
            max_retries: None,
        }
    }

    /// Task `T` with `args`.
    pub fn of<T: super::Task>(args: &T::Args) -> Result<Self, serde_json::Error> {
        Ok(Self::new(T::NAME, serde_json::to_value(args)?))
    }

    /// Binds the previous result (a chord callback: the list of results) to args field `name`.
    pub fn result_arg(mut self, name: impl Into<String>) -> Self {
        self.result_arg = Some(name.into());
        self
    }

    /// Publishes this member to `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Allows `n` retries.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = Some(n);
        self
    }

    /// Its args with `result` bound to its `result_arg` (unchanged without one).
    fn bound_args(&self, result: Value) -> Value {
        let mut args = self.args.clone();
        if let (Some(name), Some(obj)) = (&self.result_arg, args.as_object_mut()) {
            obj.insert(name.clone(), result);
        }
        args
    }

    fn check(&self, at: &str) -> Result<(), String> {
        let short =
            |s: &str| !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(char::is_control);
        if !short(&self.task) {
            return Err(format!("{at}: task must be 1-{MAX_NAME} characters"));
        }
        if is_canvas_task(&self.task) {
            return Err(format!(
                "{at}: a canvas cannot be nested ({} inside a canvas)",
                self.task
            ));
        }
        if !self.args.is_object() {
            return Err(format!("{at}: args must be a JSON object"));
        }
        if let Some(r) = &self.result_arg {
            if !short(r) {
                return Err(format!("{at}: result_arg must be 1-{MAX_NAME} characters"));
            }
        }
        if let Some(q) = &self.queue {
            let ok = (1..=MAX_NAME).contains(&q.len())
                && q.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(format!("{at}: queue must be 1-{MAX_NAME} of [A-Za-z0-9_-]"));
            }
        }
        Ok(())
    }
}

/// A canvas message's members, read from its `tasks` and `callback` fields.
#[derive(Clone, Debug, PartialEq)]
pub struct CanvasSpec {
    pub kind: CanvasKind,
    pub tasks: Vec<Signature>,
    pub callback: Option<Signature>,
}

impl CanvasSpec {
    /// The canvas of a message: `Ok(None)` for an ordinary task message, an error (the
    /// dead-letter reason's text) for canvas fields that are not as docs/task-protocol.md
    /// says.
    pub fn parse(env: &Envelope) -> Result<Option<Self>, String> {
        let Some(kind) = CanvasKind::of(&env.task) else {
            if env.tasks.is_some() || env.callback.is_some() {
                return Err(format!(
                    "tasks and callback belong to {CHAIN}, {GROUP} or {CHORD} messages, not {:?}",
                    env.task
                ));
            }
            return Ok(None);
        };
        if env.canvas.is_some() {
            return Err("a canvas cannot be nested (a canvas message with a canvas field)".into());
        }
        let Some(Value::Array(items)) = &env.tasks else {
            return Err(format!("{}: tasks must be an array of tasks", env.task));
        };
        if items.is_empty() || items.len() > MAX_MEMBERS {
            return Err(format!(
                "{}: tasks must have 1-{MAX_MEMBERS} entries, got {}",
                env.task,
                items.len()
            ));
        }
        let mut tasks = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let sig: Signature = Signature::deserialize(item)
                .map_err(|e| format!("{}: tasks[{i}]: {e}", env.task))?;
            sig.check(&format!("{}: tasks[{i}]", env.task))?;
            tasks.push(sig);
        }
        let callback = match (&env.callback, kind) {
            (None, CanvasKind::Chord) => {
                return Err(format!("{CHORD}: callback is required"));
            }
            (Some(_), CanvasKind::Chain | CanvasKind::Group) => {
                return Err(format!("{}: only a chord has a callback", env.task));
            }
            (None, _) => None,
            (Some(v), _) => {
                let sig =
                    Signature::deserialize(v).map_err(|e| format!("{CHORD}: callback: {e}"))?;
                sig.check(&format!("{CHORD}: callback"))?;
                if sig.result_arg.is_none() {
                    return Err(format!(
                        "{CHORD}: callback: result_arg (the args field that gets the results) is required"
                    ));
                }
                Some(sig)
            }
        };
        Ok(Some(Self {
            kind,
            tasks,
            callback,
        }))
    }

    /// The canvas record's `canvas` field before any member ran.
    fn info(&self, id: &str) -> CanvasInfo {
        let n = self.tasks.len();
        CanvasInfo {
            kind: self.kind,
            members: Vec::new(),
            size: n,
            callback: self.callback.as_ref().map(|_| callback_id(id)),
            completed: 0,
            done: "0".repeat(n),
            results: vec![Value::Null; n],
            failed_step: None,
            callback_published: false,
            steps: match self.kind {
                CanvasKind::Chain => self.tasks.clone(),
                _ => Vec::new(),
            },
            callback_task: self.callback.clone(),
        }
    }
}

/// A member's `canvas` field: the canvas it belongs to and its place (a chord's callback:
/// the member count).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Membership {
    pub id: String,
    pub index: usize,
}

impl Membership {
    /// The membership a message's `canvas` field names, checked.
    pub fn parse(v: &Value) -> Result<Self, String> {
        let m = Membership::deserialize(v).map_err(|e| format!("canvas: {e}"))?;
        if !super::is_valid_task_id(&m.id) {
            return Err("canvas: id is not 1-128 characters of [A-Za-z0-9_-]".into());
        }
        if m.index > MAX_MEMBERS {
            return Err(format!("canvas: index must be 0-{MAX_MEMBERS}"));
        }
        Ok(m)
    }
}

/// The step that failed a canvas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailedStep {
    /// Its place (a chord's callback: the member count).
    pub index: usize,
    pub id: String,
    pub task: Option<String>,
    pub state: TaskState,
    pub error: Option<String>,
}

/// The `canvas` field of a canvas's result record (docs/tasks.md shows its JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanvasInfo {
    pub kind: CanvasKind,
    /// Member ids in order (a chain: every step's, published one after the other). Not
    /// stored (each is [`member_id`] of the canvas id and its index): [`CanvasInfo::fill`]
    /// adds them to a record read back, as `switchyard result` shows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// How many members (a chain: steps).
    pub size: usize,
    /// A chord's callback id.
    pub callback: Option<String>,
    /// Members finished for good.
    pub completed: usize,
    /// Per member, one character: `1` finished for good, `0` not yet.
    pub done: String,
    /// Per member: its result (null until it succeeded).
    pub results: Vec<Value>,
    /// The member that failed the canvas.
    pub failed_step: Option<FailedStep>,
    /// A chord: whether its callback was published.
    #[serde(default)]
    pub callback_published: bool,
    /// A chain: its steps (what the next one is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Signature>,
    /// A chord: its callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_task: Option<Signature>,
}

impl CanvasInfo {
    /// Adds the member ids of canvas `id` (not stored: see [`CanvasInfo::members`]).
    pub fn fill(&mut self, id: &str) {
        if self.members.is_empty() {
            self.members = (0..self.size).map(|i| member_id(id, i)).collect();
        }
    }
}

/// A member waiting for its batch's compare-and-swap.
type Waiter = (
    Membership,
    ResultRecord,
    tokio::sync::oneshot::Sender<Result<Recorded, BrokerError>>,
);

/// The members of each canvas waiting to be recorded in this process; a canvas id is present
/// while a leader writes its batches.
#[derive(Default)]
pub(crate) struct CanvasBatches(std::sync::Mutex<HashMap<String, Vec<Waiter>>>);

impl CanvasBatches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Waiter>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Ends a leadership whose future was dropped: the waiting members get an error (their
/// deliveries come back) and the next member leads.
struct LeaderGuard<'a> {
    batches: &'a CanvasBatches,
    id: &'a str,
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.batches.lock().remove(self.id);
        }
    }
}

/// What recording one member did.
#[derive(Clone, Debug)]
pub(crate) struct Recorded {
    /// The canvas record now.
    canvas: Option<ResultRecord>,
    /// This update counted the member (false: counted before, or not a member).
    counted: bool,
    /// This member's count made every member done.
    completed_set: bool,
}

/// `items` applied one after the other to `existing` (each as [`record_member`]): the record
/// to write (none: nothing changed) and, per item, whether it counted and whether it
/// completed the set.
fn apply_all(
    existing: Option<&ResultRecord>,
    items: &[(Membership, ResultRecord)],
) -> (Option<ResultRecord>, Vec<(bool, bool)>) {
    let mut changed: Option<ResultRecord> = None;
    let mut outcomes = Vec::with_capacity(items.len());
    for (m, rec) in items {
        let Some(base) = changed.as_ref().or(existing) else {
            outcomes.push((false, false));
            continue;
        };
        match record_member(base, m, rec) {
            Some(next) => {
                let done = |r: &ResultRecord| r.canvas.as_ref().map(|c| (c.completed, c.size));
                let completes = matches!(done(&next), Some((c, n)) if c == n)
                    && !matches!(done(base), Some((c, n)) if c == n);
                outcomes.push((true, completes));
                changed = Some(next);
            }
            None => outcomes.push((false, false)),
        }
    }
    (changed, outcomes)
}

/// What [`ResultStore::update_result`] found and wrote.
#[derive(Clone, Debug, Default)]
pub struct Updated {
    /// The live record before (none: absent).
    pub before: Option<ResultRecord>,
    /// The record written (none: the update wrote nothing).
    pub after: Option<ResultRecord>,
}

impl Updated {
    /// The record as it is now.
    pub fn current(&self) -> Option<&ResultRecord> {
        self.after.as_ref().or(self.before.as_ref())
    }
}

/// The change a finished member makes to its canvas record (`None`: none).
fn record_member(
    canvas: &ResultRecord,
    m: &Membership,
    member: &ResultRecord,
) -> Option<ResultRecord> {
    let info = canvas.canvas.as_ref()?;
    if canvas.state.is_ready() {
        return None;
    }
    let now = Utc::now();
    let failed = |rec: &ResultRecord, info: CanvasInfo| {
        let step = FailedStep {
            index: m.index,
            id: member.id.clone(),
            task: member.task.clone(),
            state: member.state,
            error: member.error.clone(),
        };
        let error = format!(
            "canvas_failed: step {} ({}) is {}: {}",
            m.index,
            member.task.as_deref().unwrap_or("?"),
            member.state,
            member.error.as_deref().unwrap_or("")
        );
        let mut info = info;
        info.failed_step = Some(step);
        let mut rec = rec.clone().failed(error, now);
        rec.canvas = Some(info);
        rec
    };
    // The callback.
    if m.index == info.size {
        if info.callback.as_deref() != Some(member.id.as_str()) {
            return None;
        }
        return Some(match member.state {
            TaskState::Success => {
                let mut rec = canvas.clone().succeeded(member.result.clone(), now);
                rec.canvas = Some(info.clone());
                rec
            }
            _ => failed(canvas, info.clone()),
        });
    }
    if m.index >= info.size
        || member_id(&canvas.id, m.index) != member.id
        || info.done.as_bytes().get(m.index) != Some(&b'0')
    {
        return None;
    }
    let mut info = info.clone();
    info.done.replace_range(m.index..=m.index, "1");
    info.completed += 1;
    if member.state != TaskState::Success {
        return Some(failed(canvas, info));
    }
    info.results[m.index] = member.result.clone();
    let all = info.completed == info.size;
    let mut rec = canvas.clone();
    match info.kind {
        CanvasKind::Chain if m.index + 1 == info.size => {
            rec = rec.succeeded(member.result.clone(), now);
        }
        CanvasKind::Group if all => {
            rec = rec.succeeded(Value::Array(info.results.clone()), now);
        }
        _ => {}
    }
    rec.canvas = Some(info);
    Some(rec)
}

/// Revokes canvas `id`: its record becomes REVOKED and every member (and callback) that has
/// not started is revoked. Returns whether the record was a live canvas.
pub(crate) async fn revoke(store: &dyn ResultStore, id: &str) -> Result<bool, BrokerError> {
    let up = store
        .update_result(id, &|existing| {
            let rec = existing?;
            if rec.canvas.is_none() || rec.state.is_ready() {
                return None;
            }
            let mut revoked = rec.clone().revoked(super::Revocation::Revoked, Utc::now());
            revoked.canvas = rec.canvas.clone();
            Some(revoked)
        })
        .await?;
    let Some(rec) = up.after else {
        return Ok(false);
    };
    if let Some(info) = &rec.canvas {
        for i in 0..info.size {
            store.revoke(&member_id(id, i)).await?;
        }
        if let Some(cb) = &info.callback {
            store.revoke(cb).await?;
        }
    }
    Ok(true)
}

impl Runner {
    /// Expands canvas message `id` (see the module docs); returns the canvas record.
    pub(crate) async fn expand(
        &self,
        delivery: &Delivery,
        id: &str,
        env: &Envelope,
        spec: CanvasSpec,
    ) -> Result<Option<ResultRecord>, (bool, String)> {
        let node = self.settings.node_id.clone();
        let fresh = {
            let mut rec = ResultRecord::started(id, &env.task, 0, &node, Utc::now());
            rec.canvas = Some(spec.info(id));
            rec
        };
        let up = self
            .results
            .update_result(id, &|existing| match existing {
                None => Some(fresh.clone()),
                Some(_) => None,
            })
            .await
            .map_err(|e| (e.is_transient(), e.to_string()))?;
        let Some(rec) = up.current().cloned() else {
            return Ok(None);
        };
        if rec.canvas.is_none() && rec.state.is_ready() {
            // Revoked (or expired) before it was expanded: nothing to publish.
            return Ok(Some(rec));
        }
        if rec.canvas.is_none() {
            return Err((false, format!("bad_canvas: id {id} is taken by a task")));
        }
        if rec.state.is_ready() {
            return Ok(Some(rec));
        }
        let first = match spec.kind {
            CanvasKind::Chain => 1,
            _ => spec.tasks.len(),
        };
        let outgoing: Vec<Outgoing> = spec.tasks[..first]
            .iter()
            .enumerate()
            .map(|(i, sig)| {
                self.signed_message(delivery, id, i, &member_id(id, i), sig, sig.args.clone())
            })
            .collect::<Result<_, _>>()
            .map_err(|e| (false, e.to_string()))?;
        self.publish_all(outgoing).await?;
        Ok(Some(rec))
    }

    fn signed_message(
        &self,
        delivery: &Delivery,
        canvas: &str,
        index: usize,
        mid: &str,
        sig: &Signature,
        args: Value,
    ) -> Result<Outgoing, BrokerError> {
        // Eager mode runs everything on its private queue.
        let queue = match self.eager {
            true => delivery.queue.clone(),
            false => sig
                .queue
                .clone()
                .or_else(|| {
                    self.registry
                        .get(&sig.task)
                        .and_then(|e| e.options().queue.clone())
                })
                .unwrap_or_else(|| delivery.queue.clone()),
        };
        let env = Envelope {
            id: Some(mid.to_owned()),
            task: sig.task.clone(),
            args,
            queue: Some(queue.clone()),
            retries: 0,
            max_retries: sig.max_retries,
            eta: None,
            expires: None,
            published_at: Some(Utc::now()),
            retry_of: None,
            canvas: Some(serde_json::json!({"id": canvas, "index": index})),
            tasks: None,
            callback: None,
        };
        let payload =
            serde_json::to_vec(&env).map_err(|e| BrokerError::data(format!("member {mid}"), e))?;
        Ok(Outgoing {
            id: mid.to_owned(),
            queue,
            payload,
            dedupe_id: mid.to_owned(),
            not_before: None,
        })
    }

    async fn publish_all(&self, msgs: Vec<Outgoing>) -> Result<(), (bool, String)> {
        use futures_util::StreamExt;
        let queue = &self.queue;
        let mut sent = futures_util::stream::iter(msgs)
            .map(|m| async move { queue.publish(m).await })
            .buffer_unordered(PUBLISH_CONCURRENCY);
        let mut first_err = None;
        while let Some(r) = sent.next().await {
            if let Err(e) = r {
                first_err.get_or_insert((e.is_transient(), format!("bad_canvas: {e}")));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Records finished member `rec` in its canvas record. The members of one canvas that
    /// finish at once in this process are recorded together: the first becomes the leader and
    /// writes every waiting member's change in one compare-and-swap (again for those that
    /// came meanwhile), so the members compete with other processes, not with each other.
    async fn record_in_batch(
        &self,
        m: &Membership,
        rec: &ResultRecord,
    ) -> Result<Recorded, BrokerError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut map = self.batches.lock();
            match map.get_mut(&m.id) {
                Some(waiting) => {
                    waiting.push((m.clone(), rec.clone(), tx));
                    false
                }
                None => {
                    map.insert(m.id.clone(), vec![(m.clone(), rec.clone(), tx)]);
                    true
                }
            }
        };
        if lead {
            let mut guard = LeaderGuard {
                batches: &self.batches,
                id: &m.id,
                armed: true,
            };
            loop {
                let batch: Vec<Waiter> = {
                    let mut map = self.batches.lock();
                    match map.get_mut(&m.id) {
                        Some(waiting) if !waiting.is_empty() => std::mem::take(waiting),
                        _ => {
                            map.remove(&m.id);
                            guard.armed = false;
                            break;
                        }
                    }
                };
                let items: Vec<(Membership, ResultRecord)> = batch
                    .iter()
                    .map(|(m, r, _)| (m.clone(), r.clone()))
                    .collect();
                let res = self
                    .results
                    .update_result(&m.id, &|existing| apply_all(existing, &items).0)
                    .await;
                match res {
                    Ok(up) => {
                        let wrote = up.after.is_some();
                        let (_, outcomes) = apply_all(up.before.as_ref(), &items);
                        let current = up.current().cloned();
                        for ((_, _, tx), (counted, completes)) in batch.into_iter().zip(outcomes) {
                            let _ = tx.send(Ok(Recorded {
                                canvas: current.clone(),
                                counted: counted && wrote,
                                completed_set: completes && wrote,
                            }));
                        }
                    }
                    Err(e) => {
                        for (_, _, tx) in batch {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
        rx.await.unwrap_or_else(|_| {
            Err(BrokerError::unavailable_because(format!(
                "record a member of canvas {} (the update was dropped)",
                m.id
            )))
        })
    }

    /// Records finished member `rec` in its canvas and does what follows (the next chain
    /// step, a chord's callback). Idempotent: a member counted before changes nothing.
    pub(crate) async fn settle_member(
        &self,
        delivery: &Delivery,
        m: &Membership,
        rec: &ResultRecord,
    ) -> Result<(), BrokerError> {
        if !rec.state.is_ready() {
            return Ok(());
        }
        let recorded = self.record_in_batch(m, rec).await?;
        let Some(canvas) = recorded.canvas.as_ref() else {
            return Ok(());
        };
        let Some(info) = canvas.canvas.as_ref() else {
            tracing::warn!(task_id = %rec.id, canvas = %m.id, "member of a canvas that has no canvas record: ignored");
            return Ok(());
        };
        if canvas.state.is_ready() || rec.state != TaskState::Success {
            return Ok(());
        }
        let counted_now = recorded.counted;
        match info.kind {
            CanvasKind::Chain => {
                let next = m.index + 1;
                let Some(step) = info.steps.get(next) else {
                    return Ok(());
                };
                if member_id(&m.id, m.index) != rec.id {
                    return Ok(());
                }
                let next_id = member_id(&m.id, next);
                // A re-run step re-publishes the next one only if it never ran.
                if !counted_now && self.results.get_result(&next_id).await?.is_some() {
                    return Ok(());
                }
                let msg = self.signed_message(
                    delivery,
                    &m.id,
                    next,
                    &next_id,
                    step,
                    step.bound_args(rec.result.clone()),
                )?;
                self.publish_or_fail(canvas, next, msg).await
            }
            CanvasKind::Chord if info.completed == info.size => {
                let Some((cb_id, cb)) = info.callback.as_ref().zip(info.callback_task.as_ref())
                else {
                    return Ok(());
                };
                // The member whose update completed the set publishes the callback; one
                // counted before only when the callback was never published (its runner died
                // in between).
                if !recorded.completed_set
                    && (counted_now
                        || info.callback_published
                        || self.results.get_result(cb_id).await?.is_some())
                {
                    return Ok(());
                }
                let n = info.size;
                let msg = self.signed_message(
                    delivery,
                    &m.id,
                    n,
                    cb_id,
                    cb,
                    cb.bound_args(Value::Array(info.results.clone())),
                )?;
                self.publish_or_fail(canvas, n, msg).await?;
                // Best effort: a re-run member then knows not to publish it again.
                let _ = self
                    .results
                    .update_result(&m.id, &|existing| {
                        let r = existing?;
                        let mut info = r.canvas.clone()?;
                        if info.callback_published {
                            return None;
                        }
                        info.callback_published = true;
                        let mut r = r.clone();
                        r.canvas = Some(info);
                        Some(r)
                    })
                    .await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Publishes the next member; one that can never be published fails the canvas.
    async fn publish_or_fail(
        &self,
        canvas: &ResultRecord,
        index: usize,
        msg: Outgoing,
    ) -> Result<(), BrokerError> {
        let mid = msg.id.clone();
        let task: Option<String> = serde_json::from_slice::<Envelope>(&msg.payload)
            .ok()
            .map(|e| e.task);
        match self.queue.publish(msg).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                tracing::warn!(canvas = %canvas.id, "cannot publish member {index}: {e}");
                let error = format!("bad_canvas: member {index} cannot be published: {e}");
                self.results
                    .update_result(&canvas.id, &|existing| {
                        let r = existing?;
                        let mut info = r.canvas.clone()?;
                        if r.state.is_ready() {
                            return None;
                        }
                        info.failed_step = Some(FailedStep {
                            index,
                            id: mid.clone(),
                            task: task.clone(),
                            state: TaskState::Failure,
                            error: Some(error.clone()),
                        });
                        let mut r = r.clone().failed(error.clone(), Utc::now());
                        r.canvas = Some(info);
                        Some(r)
                    })
                    .await?;
                Ok(())
            }
        }
    }
}

/// How long to wait between two compare-and-swap attempts on a canvas record (jittered, so
/// members finishing together spread out).
pub(crate) fn cas_pause(attempt: u32) -> Duration {
    let base = u64::from(attempt.min(8)) + 1;
    Duration::from_micros(rand::random::<u64>() % (base * 200) + 50)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(v: Value) -> Envelope {
        serde_json::from_value(v).expect("envelope")
    }

    #[test]
    fn canvas_fields_parse_and_hostile_ones_are_refused_with_a_reason() {
        let spec = CanvasSpec::parse(&env(json!({"task": CHAIN, "args": {}, "tasks": [
            {"task": "demo.add", "args": {"x": 1, "y": 2}},
            {"task": "demo.add", "args": {"y": 10}, "result_arg": "x"}]})))
        .expect("ok")
        .expect("a canvas");
        assert_eq!(spec.kind, CanvasKind::Chain);
        assert_eq!(spec.tasks[1].result_arg.as_deref(), Some("x"));
        assert_eq!(
            CanvasSpec::parse(&env(json!({"task": "demo.add", "args": {}}))),
            Ok(None)
        );
        let too_many: Vec<Value> = (0..=MAX_MEMBERS)
            .map(|_| json!({"task": "demo.add"}))
            .collect();
        let cases = [
            (json!({"task": GROUP, "args": {}}), "tasks must be an array"),
            (
                json!({"task": GROUP, "args": {}, "tasks": []}),
                "1-1000 entries",
            ),
            (
                json!({"task": GROUP, "args": {}, "tasks": too_many}),
                "got 1001",
            ),
            (json!({"task": GROUP, "args": {}, "tasks": [7]}), "tasks[0]"),
            (
                json!({"task": GROUP, "args": {}, "tasks": [{"task": ""}]}),
                "1-256",
            ),
            (
                json!({"task": GROUP, "args": {}, "tasks": [{"task": "a", "args": [1]}]}),
                "args must be a JSON object",
            ),
            (
                json!({"task": GROUP, "args": {}, "tasks": [{"task": "a", "bogus": 1}]}),
                "unknown field",
            ),
            (
                json!({"task": GROUP, "args": {}, "tasks": [{"task": CHAIN, "tasks": []}]}),
                "unknown field",
            ),
            (
                json!({"task": GROUP, "args": {}, "tasks": [{"task": CHAIN}]}),
                "cannot be nested",
            ),
            (
                json!({"task": GROUP, "args": {}, "tasks": [{"task": "a", "queue": "a.b"}]}),
                "queue must be",
            ),
            (
                json!({"task": GROUP, "args": {}, "tasks": [{"task": "a", "result_arg": ""}]}),
                "result_arg must be",
            ),
            (
                json!({"task": CHORD, "args": {}, "tasks": [{"task": "a"}]}),
                "callback is required",
            ),
            (
                json!({"task": CHORD, "args": {}, "tasks": [{"task": "a"}], "callback": {"task": "b"}}),
                "result_arg",
            ),
            (
                json!({"task": GROUP, "args": {}, "tasks": [{"task": "a"}], "callback": {"task": "b"}}),
                "only a chord",
            ),
            (
                json!({"task": "demo.add", "args": {}, "tasks": []}),
                "belong to",
            ),
            (
                json!({"task": CHAIN, "args": {}, "tasks": [{"task": "a"}], "canvas": {"id": "x", "index": 0}}),
                "nested",
            ),
        ];
        for (msg, want) in cases {
            let err = CanvasSpec::parse(&env(msg.clone())).expect_err("refused");
            assert!(err.contains(want), "{msg}: {err}");
        }
        // Deep nesting is an error of the JSON decoder, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let text = format!(r#"{{"task": "{GROUP}", "args": {{}}, "tasks": {deep}}}"#);
        assert!(serde_json::from_str::<Envelope>(&text).is_err());
    }

    #[test]
    fn memberships_are_checked() {
        assert_eq!(
            Membership::parse(&json!({"id": "c1", "index": 3})),
            Ok(Membership {
                id: "c1".into(),
                index: 3
            })
        );
        for bad in [
            json!("c1"),
            json!({"id": "c 1", "index": 0}),
            json!({"id": "c1", "index": -1}),
            json!({"id": "c1", "index": 1001}),
            json!({"id": "c1"}),
            json!({"id": "c1", "index": 0, "x": 1}),
        ] {
            assert!(Membership::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(member_id("c", 0), member_id("c", 0));
        assert_ne!(member_id("c", 0), member_id("c", 1));
        assert_ne!(member_id("c", 0), member_id("d", 0));
        assert_ne!(callback_id("c"), member_id("c", 0));
        assert!(super::super::is_valid_task_id(&callback_id(
            &"x".repeat(128)
        )));
    }

    fn canvas_record(kind: CanvasKind, n: usize, chord: bool) -> ResultRecord {
        let task = |i: usize| json!({"task": "demo.add", "args": {"x": i, "y": 0}});
        let mut msg = json!({"task": kind.task_name(), "args": {},
            "tasks": (0..n).map(task).collect::<Vec<_>>()});
        if chord {
            msg["callback"] = json!({"task": "demo.sum", "result_arg": "values"});
        }
        let spec = CanvasSpec::parse(&env(msg)).expect("ok").expect("canvas");
        let mut rec = ResultRecord::started("c", kind.task_name(), 0, "n", Utc::now());
        rec.canvas = Some(spec.info("c"));
        rec
    }

    fn done(id: String, state: TaskState, result: Value) -> ResultRecord {
        let rec = ResultRecord::started(&id, "demo.add", 0, "n", Utc::now());
        match state {
            TaskState::Success => rec.succeeded(result, Utc::now()),
            _ => rec.failed("boom: no".into(), Utc::now()),
        }
    }

    #[test]
    fn a_group_collects_results_in_order_and_counts_each_member_once() {
        let mut rec = canvas_record(CanvasKind::Group, 3, false);
        for i in [2, 0, 1] {
            let m = Membership {
                id: "c".into(),
                index: i,
            };
            let member = done(member_id("c", i), TaskState::Success, json!(i * 10));
            rec = record_member(&rec, &m, &member).expect("counted");
            // Counted once: the same member again changes nothing.
            assert_eq!(record_member(&rec, &m, &member), None);
        }
        assert_eq!(rec.state, TaskState::Success);
        assert_eq!(rec.result, json!([0, 10, 20]));
        assert_eq!(rec.canvas.as_ref().map(|c| c.completed), Some(3));
    }

    #[test]
    fn a_failed_step_fails_the_canvas_and_names_the_step_and_strangers_are_ignored() {
        let rec = canvas_record(CanvasKind::Chain, 3, false);
        let m = Membership {
            id: "c".into(),
            index: 1,
        };
        // A message claiming to be member 1 with another id changes nothing.
        let stranger = done("someone".into(), TaskState::Success, json!(1));
        assert_eq!(record_member(&rec, &m, &stranger), None);
        let failed = record_member(
            &rec,
            &m,
            &done(member_id("c", 1), TaskState::Failure, json!(null)),
        )
        .expect("written");
        assert_eq!(failed.state, TaskState::Failure);
        let step = failed
            .canvas
            .as_ref()
            .and_then(|c| c.failed_step.clone())
            .expect("step");
        assert_eq!((step.index, step.id), (1, member_id("c", 1)));
        assert!(failed.error.as_deref().unwrap_or("").contains("step 1"));
        // A final canvas takes no more members.
        let m2 = Membership {
            id: "c".into(),
            index: 2,
        };
        assert_eq!(
            record_member(
                &failed,
                &m2,
                &done(member_id("c", 2), TaskState::Success, json!(1))
            ),
            None
        );
    }

    #[test]
    fn a_chain_ends_with_its_last_step_and_a_chord_with_its_callback() {
        let mut rec = canvas_record(CanvasKind::Chain, 2, false);
        for i in 0..2 {
            let m = Membership {
                id: "c".into(),
                index: i,
            };
            rec = record_member(
                &rec,
                &m,
                &done(member_id("c", i), TaskState::Success, json!(i + 5)),
            )
            .expect("counted");
        }
        assert_eq!(
            (rec.state, rec.result.clone()),
            (TaskState::Success, json!(6))
        );

        let mut rec = canvas_record(CanvasKind::Chord, 2, true);
        for i in 0..2 {
            let m = Membership {
                id: "c".into(),
                index: i,
            };
            rec = record_member(
                &rec,
                &m,
                &done(member_id("c", i), TaskState::Success, json!(i)),
            )
            .expect("counted");
        }
        // Every member done, the callback not yet: still STARTED.
        assert_eq!(rec.state, TaskState::Started);
        let m = Membership {
            id: "c".into(),
            index: 2,
        };
        let rec = record_member(
            &rec,
            &m,
            &done(callback_id("c"), TaskState::Success, json!(1)),
        )
        .expect("callback");
        assert_eq!(
            (rec.state, rec.result.clone()),
            (TaskState::Success, json!(1))
        );
    }

    #[test]
    fn a_batch_counts_each_member_once_and_names_one_completer() {
        let rec = canvas_record(CanvasKind::Chord, 3, true);
        let item = |i: usize| {
            (
                Membership {
                    id: "c".into(),
                    index: i,
                },
                done(member_id("c", i), TaskState::Success, json!(i)),
            )
        };
        // Member 1 twice in one batch (a duplicate delivery), then the rest.
        let (first, outcomes) = apply_all(Some(&rec), &[item(1), item(1)]);
        assert_eq!(outcomes, [(true, false), (false, false)]);
        let first = first.expect("changed");
        let (all, outcomes) = apply_all(Some(&first), &[item(0), item(2), item(1)]);
        assert_eq!(outcomes, [(true, false), (true, true), (false, false)]);
        let all = all.expect("changed");
        assert_eq!(all.canvas.as_ref().map(|c| c.done.as_str()), Some("111"));
        assert_eq!(
            all.canvas.as_ref().map(|c| c.results.clone()),
            Some(vec![json!(0), json!(1), json!(2)])
        );
        // Counted before: nothing to write, nobody completes again.
        let (again, outcomes) = apply_all(Some(&all), &[item(2)]);
        assert_eq!((again, outcomes), (None, vec![(false, false)]));
        // No record: nothing.
        assert_eq!(apply_all(None, &[item(0)]), (None, vec![(false, false)]));
    }

    #[test]
    fn binding_puts_the_result_under_result_arg() {
        let s = Signature::new("demo.add", json!({"y": 10})).result_arg("x");
        assert_eq!(s.bound_args(json!(3)), json!({"x": 3, "y": 10}));
        let s = Signature::new("demo.add", json!({"y": 10}));
        assert_eq!(s.bound_args(json!(3)), json!({"y": 10}));
    }
}
