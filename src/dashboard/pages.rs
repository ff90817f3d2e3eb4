//! The dashboard's routes: pages (staff only), actions (CSRF-protected POSTs answering 303 with
//! a flash message), the `events` stream, and the built-in assets under `static/`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use switchyard_actors::context::messages;
use switchyard_actors::tasks::{
    BeatEntry, BeatStore, DeadLetter, MemoryBroker, NatsBeatStore, NatsBroker, Outgoing,
    PublishOptions, ResultStore, TaskQueue, TaskState, Tasks,
};
use tokio::sync::broadcast::error::RecvError;

use super::monitor::{Batch, Frame, Monitor, TaskFilter};
use crate::http::auth::{LoginRequired, User};
use crate::http::session::Session;
use crate::http::{Error, Render};

/// Rows per page of the task list.
const PAGE_SIZE: usize = 50;
/// Most dead letters a page shows and an "all" action touches.
const DEAD_LIMIT: usize = 1000;
/// A comment line every so often keeps proxies from closing an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

const CSS: &str = include_str!("static/dashboard.css");
const JS: &str = include_str!("static/dashboard.js");

/// Where the dashboard reads queues and dead letters.
#[derive(Clone)]
pub(crate) enum Backend {
    Memory(Arc<MemoryBroker>),
    Nats(Box<NatsBroker>),
    /// `always_eager`: no queues.
    None,
}

/// What the dashboard's handlers share.
pub(crate) struct Dashboard {
    pub(crate) path: String,
    pub(crate) monitor: Arc<Monitor>,
    pub(crate) backend: Backend,
    pub(crate) queues: Vec<String>,
    pub(crate) node: String,
    pub(crate) schedules: Vec<BeatEntry>,
    /// The embedded beat's store (memory broker, or `[beat] embedded`).
    pub(crate) beat_store: Option<Arc<dyn BeatStore>>,
    /// On NATS without an embedded beat: the beat bucket, opened on first use.
    pub(crate) nats_beat: tokio::sync::OnceCell<Arc<dyn BeatStore>>,
}

/// The staff user of a dashboard request: anonymous → 303 to the login page, others → 403.
pub struct Staff(pub User);

impl FromRequest for Staff {
    type Error = Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let login = LoginRequired::from_request(req, payload);
        Box::pin(async move {
            let LoginRequired(user) = login.await?;
            if !user.staff {
                return Err(Error::Forbidden(
                    "The dashboard is for staff users only.".into(),
                ));
            }
            Ok(Staff(user))
        })
    }
}

/// Adds the dashboard's routes under `dashboard.path`.
pub(crate) fn routes(cfg: &mut web::ServiceConfig, dashboard: web::Data<Dashboard>) {
    let p = dashboard.path.clone();
    cfg.app_data(dashboard)
        .route(&p, web::get().to(overview))
        .route(&format!("{p}tasks"), web::get().to(task_list))
        .route(&format!("{p}tasks/{{id}}"), web::get().to(task_page))
        .route(&format!("{p}tasks/{{id}}/revoke"), web::post().to(revoke))
        .route(&format!("{p}tasks/{{id}}/retry"), web::post().to(retry))
        .route(&format!("{p}dead"), web::get().to(dead_page))
        .route(&format!("{p}dead/replay"), web::post().to(dead_replay))
        .route(&format!("{p}dead/discard"), web::post().to(dead_discard))
        .route(&format!("{p}schedules"), web::get().to(schedules))
        .route(&format!("{p}events"), web::get().to(events))
        .route(&format!("{p}static/dashboard.css"), web::get().to(css))
        .route(&format!("{p}static/dashboard.js"), web::get().to(js));
}

fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

fn broker_err(e: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        what: "task broker".into(),
        message: e.to_string(),
    }
}

fn page(d: &Dashboard, template: &str, title: &str, section: &str, mut ctx: Value) -> Render {
    if let Value::Object(map) = &mut ctx {
        map.insert("title".into(), Value::from(title));
        map.insert("dash".into(), Value::from(d.path.clone()));
        map.insert("section".into(), Value::from(section));
        map.insert(format!("nav_{section}"), Value::Bool(true));
        map.insert("this_node".into(), Value::from(d.node.clone()));
        // The page's stream starts after the last event the page already shows.
        map.insert("after".into(), Value::from(d.monitor.last_id()));
    }
    Render::new(format!("switchyard/dashboard/{template}"), ctx)
}

fn summary_json(t: &super::monitor::TaskSummary) -> Value {
    json!({
        "id": t.id, "task": t.task, "queue": t.queue, "state": t.state.as_str(),
        "node": t.node, "seen_at": when(t.seen_at), "updated_at": when(t.updated_at),
        "progress": t.progress.as_ref().map(progress_json),
    })
}

fn progress_json(p: &Value) -> Value {
    let done = p.get("done").and_then(Value::as_u64).unwrap_or(0);
    let total = p.get("total").and_then(Value::as_u64).unwrap_or(0);
    json!({"done": done, "total": total, "info": p.get("info").map(Value::to_string)})
}

/// Per queue: waiting, running, scheduled, dead, finished in the last minute.
async fn queue_rows(d: &Dashboard) -> Result<Vec<Value>, Error> {
    let (mut scheduled, mut dead) = (BTreeMap::new(), BTreeMap::<String, u64>::new());
    match &d.backend {
        Backend::Nats(b) => {
            scheduled = b.scheduled_counts().await.unwrap_or_default();
            dead = b.dead_counts().await.map_err(broker_err)?;
        }
        Backend::Memory(b) => {
            for l in b.dead_letters() {
                *dead.entry(l.queue).or_default() += 1;
            }
        }
        Backend::None => {}
    }
    let mut rows = Vec::new();
    for q in &d.queues {
        let waiting = match &d.backend {
            Backend::Nats(b) => b.backlog(q).await.map(|(w, _)| w).map_err(broker_err)?,
            Backend::Memory(b) => b.depth(q) as u64,
            Backend::None => 0,
        };
        rows.push(json!({
            "name": q,
            "waiting": waiting,
            "running": d.monitor.running(q),
            "scheduled": scheduled.get(q).copied().unwrap_or(0),
            "dead": dead.get(q).copied().unwrap_or(0),
            "per_minute": d.monitor.finished_last_minute(q),
        }));
    }
    Ok(rows)
}

/// `GET <dashboard>`: queues, nodes, the newest tasks.
async fn overview(_staff: Staff, d: web::Data<Dashboard>) -> Result<Render, Error> {
    let queues = queue_rows(&d).await?;
    let mut nodes: Vec<Value> = d
        .monitor
        .nodes()
        .iter()
        .map(|n| {
            json!({"node": n.node, "role": n.role.as_str(), "queues": n.queues.join(", "),
                   "in_flight": n.in_flight, "version": n.version,
                   "last_seen": when(n.last_seen)})
        })
        .collect();
    if nodes.is_empty() {
        // Without heartbeats (the memory broker) the node itself is the cluster.
        nodes.push(
            json!({"node": d.node, "role": "serve", "queues": d.queues.join(", "),
            "in_flight": d.queues.iter().map(|q| d.monitor.running(q)).sum::<u64>(),
            "version": env!("CARGO_PKG_VERSION"), "last_seen": when(Utc::now())}),
        );
    }
    let (recent, total) = d.monitor.tasks(&TaskFilter::default(), 0, 20);
    let recent: Vec<Value> = recent.iter().map(summary_json).collect();
    Ok(page(
        &d,
        "overview",
        "Overview",
        "overview",
        json!({"queues": queues, "nodes": nodes, "tasks": recent, "indexed": total, "live": true}),
    ))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    task: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    page: Option<usize>,
}

fn parse_state(s: &str) -> Option<TaskState> {
    serde_json::from_value(Value::from(s.to_ascii_uppercase())).ok()
}

/// `GET <dashboard>tasks`: newest first, filtered, paginated.
async fn task_list(
    _staff: Staff,
    d: web::Data<Dashboard>,
    tasks: web::Data<Tasks>,
    q: web::Query<ListQuery>,
) -> Result<Render, Error> {
    let state = match q.state.trim() {
        "" => None,
        s => Some(parse_state(s).ok_or_else(|| {
            Error::BadRequest(format!(
                "unknown state {s:?} (PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED)"
            ))
        })?),
    };
    let filter = TaskFilter {
        state,
        task: Some(q.task.trim().to_owned()).filter(|s| !s.is_empty()),
        id_prefix: Some(q.id.trim().to_owned()).filter(|s| !s.is_empty()),
    };
    let page_no = q.page.unwrap_or(1).clamp(1, 1_000_000);
    let (rows, total) = d
        .monitor
        .tasks(&filter, (page_no - 1) * PAGE_SIZE, PAGE_SIZE);
    let mut rows: Vec<Value> = rows.iter().map(summary_json).collect();
    // An exact id is always found: from the results store when the index forgot it.
    if rows.is_empty() {
        if let Some(id) = filter.id_prefix.as_deref() {
            if switchyard_actors::tasks::is_valid_task_id(id) {
                let rec = tasks.result(id).await?;
                if rec.state != TaskState::Pending || rec.task.is_some() {
                    rows.push(json!({"id": rec.id, "task": rec.task, "queue": "", "state": rec.state.as_str(),
                        "node": rec.node, "seen_at": "", "updated_at": rec.finished_at.or(rec.started_at).map(when)}));
                }
            }
        }
    }
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let query = |p: usize| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("state", &q.state)
            .append_pair("task", &q.task)
            .append_pair("id", &q.id)
            .append_pair("page", &p.to_string())
            .finish()
    };
    let live = page_no == 1
        && filter.state.is_none()
        && filter.task.is_none()
        && filter.id_prefix.is_none();
    Ok(page(
        &d,
        "tasks",
        "Tasks",
        "tasks",
        json!({
            "tasks": rows, "total": total, "page": page_no, "pages": pages,
            "prev": (page_no > 1).then(|| query(page_no - 1)),
            "next": (page_no < pages).then(|| query(page_no + 1)),
            "filter": {"state": q.state, "task": q.task, "id": q.id},
            "states": ["PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"],
            "live": live,
        }),
    ))
}

/// A time as the pages show it: UTC to the millisecond.
fn when(t: chrono::DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `GET <dashboard>tasks/{id}`: the record, the args, the events.
async fn task_page(
    _staff: Staff,
    d: web::Data<Dashboard>,
    tasks: web::Data<Tasks>,
    id: web::Path<String>,
) -> Result<Render, Error> {
    let id = id.into_inner();
    if !switchyard_actors::tasks::is_valid_task_id(&id) {
        return Err(Error::NotFound);
    }
    let seen = d.monitor.task(&id);
    let rec = tasks.result(&id).await?;
    if seen.is_none() && rec.task.is_none() && rec.state == TaskState::Pending {
        return Err(Error::NotFound);
    }
    let state = match (&seen, rec.state) {
        // The store knows better once the task started; before, the events do.
        (Some(s), TaskState::Pending) => s.state,
        (_, st) => st,
    };
    let events: Vec<Value> = seen
        .as_ref()
        .map(|s| {
            s.events
                .iter()
                .map(|e| json!({"kind": e.kind, "state": e.state.as_str(), "node": e.node, "at": when(e.at)}))
                .collect()
        })
        .unwrap_or_default();
    let progress = rec
        .progress
        .clone()
        .or_else(|| seen.as_ref().and_then(|s| s.progress.clone()));
    let args = seen.as_ref().and_then(|s| s.args.clone());
    Ok(page(
        &d,
        "task",
        &format!("Task {id}"),
        "tasks",
        json!({
            "id": id,
            "task": rec.task.clone().or_else(|| seen.as_ref().map(|s| s.task.clone())),
            "queue": seen.as_ref().map(|s| s.queue.clone()),
            "state": state.as_str(),
            "result": (!rec.result.is_null()).then(|| pretty(&rec.result)),
            "error": rec.error,
            "retries": rec.retries,
            "node": rec.node,
            "started_at": rec.started_at.map(when),
            "finished_at": rec.finished_at.map(when),
            "progress": progress.as_ref().map(progress_json),
            "args": args.as_ref().map(pretty),
            "retry_of": rec.retry_of.or_else(|| seen.as_ref().and_then(|s| s.retry_of.clone())),
            "events": events,
            "can_retry": args.is_some() && seen.is_some(),
            "can_revoke": matches!(state, TaskState::Pending | TaskState::Retry),
        }),
    ))
}

/// `POST <dashboard>tasks/{id}/revoke`.
async fn revoke(
    _staff: Staff,
    d: web::Data<Dashboard>,
    tasks: web::Data<Tasks>,
    session: Session,
    id: web::Path<String>,
) -> Result<HttpResponse, Error> {
    let id = id.into_inner();
    if !switchyard_actors::tasks::is_valid_task_id(&id) {
        return Err(Error::NotFound);
    }
    if tasks.revoke(&id).await? {
        messages::success(&session, format!("Task {id} revoked."))?;
    } else {
        messages::warning(
            &session,
            format!("Task {id} was not revoked: it already started or finished."),
        )?;
    }
    Ok(see_other(&format!("{}tasks/{id}", d.path)))
}

/// `POST <dashboard>tasks/{id}/retry`: a copy with a new id whose record names the original.
async fn retry(
    _staff: Staff,
    d: web::Data<Dashboard>,
    tasks: web::Data<Tasks>,
    session: Session,
    id: web::Path<String>,
) -> Result<HttpResponse, Error> {
    let id = id.into_inner();
    let Some(seen) = d.monitor.task(&id) else {
        messages::error(
            &session,
            format!("Task {id} is not in the recent-tasks index: its args are unknown."),
        )?;
        return Ok(see_other(&format!("{}tasks/{id}", d.path)));
    };
    let Some(args) = seen.args.clone() else {
        messages::error(
            &session,
            format!("The args of task {id} are unknown (too large to keep)."),
        )?;
        return Ok(see_other(&format!("{}tasks/{id}", d.path)));
    };
    let Some(broker) = tasks.broker().cloned() else {
        return Err(Error::BadRequest(
            "tasks run eagerly on this node: nothing to retry on".into(),
        ));
    };
    let options = PublishOptions::new().queue(seen.queue.clone());
    let out = tasks.prepare(&seen.task, args, &options)?;
    let mut env: Value = serde_json::from_slice(&out.payload).map_err(Error::internal)?;
    env["retry_of"] = Value::from(id.clone());
    let out = Outgoing {
        payload: serde_json::to_vec(&env).map_err(Error::internal)?,
        ..out
    };
    let new_id = out.id.clone();
    broker.publish(out).await.map_err(broker_err)?;
    messages::success(&session, format!("Task {id} retried as {new_id}."))?;
    Ok(see_other(&format!("{}tasks/{new_id}", d.path)))
}

/// A dead letter as the page lists it.
struct Letter {
    seq: u64,
    id: Option<String>,
    task: Option<String>,
    queue: String,
    subject: String,
    reason: String,
    dead_at: Option<chrono::DateTime<Utc>>,
}

async fn letters(d: &Dashboard, queue: Option<&str>) -> Result<Vec<Letter>, Error> {
    Ok(match &d.backend {
        Backend::Nats(b) => b
            .dead_letters(queue, DEAD_LIMIT)
            .await
            .map_err(broker_err)?
            .into_iter()
            .map(|l| Letter {
                subject: b.names().task_subject(&l.queue),
                seq: l.seq,
                id: l.id,
                task: l.task,
                queue: l.queue,
                reason: l.reason,
                dead_at: l.dead_at,
            })
            .collect(),
        Backend::Memory(b) => b
            .numbered_dead_letters()
            .into_iter()
            .filter(|(_, l)| queue.is_none_or(|q| l.queue == q))
            .take(DEAD_LIMIT)
            .map(|(n, l): (u64, DeadLetter)| Letter {
                seq: n,
                id: l.id,
                task: l.task,
                subject: l.queue.clone(),
                queue: l.queue,
                reason: l.reason,
                dead_at: Some(l.dead_at),
            })
            .collect(),
        Backend::None => Vec::new(),
    })
}

#[derive(Debug, Deserialize)]
struct DeadQuery {
    #[serde(default)]
    queue: String,
}

/// `GET <dashboard>dead`.
async fn dead_page(
    _staff: Staff,
    d: web::Data<Dashboard>,
    q: web::Query<DeadQuery>,
) -> Result<Render, Error> {
    let queue = Some(q.queue.trim()).filter(|s| !s.is_empty());
    let rows: Vec<Value> = letters(&d, queue)
        .await?
        .iter()
        .rev()
        .map(|l| {
            json!({"seq": l.seq, "id": l.id, "task": l.task, "queue": l.queue, "subject": l.subject,
                   "reason": l.reason, "dead_at": l.dead_at.map(when)})
        })
        .collect();
    Ok(page(
        &d,
        "dead",
        "Dead letters",
        "dead",
        json!({"letters": rows, "queue": q.queue, "queues": d.queues}),
    ))
}

#[derive(Debug, Deserialize)]
struct DeadForm {
    /// One letter, by number.
    #[serde(default)]
    seq: Option<u64>,
    /// Every letter (of `queue`, when given).
    #[serde(default)]
    all: Option<String>,
    #[serde(default)]
    queue: String,
}

async fn chosen(d: &Dashboard, form: &DeadForm) -> Result<Vec<Letter>, Error> {
    let queue = Some(form.queue.trim()).filter(|s| !s.is_empty());
    let all = letters(d, queue).await?;
    match (form.seq, form.all.is_some()) {
        (Some(seq), _) => Ok(all.into_iter().filter(|l| l.seq == seq).collect()),
        (None, true) => Ok(all),
        (None, false) => Err(Error::BadRequest("name a letter (seq) or all".into())),
    }
}

/// `POST <dashboard>dead/replay`: back to their queues.
async fn dead_replay(
    _staff: Staff,
    d: web::Data<Dashboard>,
    session: Session,
    form: web::Form<DeadForm>,
) -> Result<HttpResponse, Error> {
    let chosen = chosen(&d, &form).await?;
    let mut replayed = 0;
    for l in &chosen {
        let ok = match &d.backend {
            Backend::Nats(b) => {
                let stored = switchyard_actors::tasks::StoredDeadLetter {
                    seq: l.seq,
                    id: l.id.clone(),
                    task: l.task.clone(),
                    queue: l.queue.clone(),
                    reason: l.reason.clone(),
                    dead_at: l.dead_at,
                };
                b.replay(&stored).await.map_err(broker_err).map(|_| true)?
            }
            Backend::Memory(b) => {
                let Some((n, letter)) = b.remove_dead_letters(&[l.seq]).pop() else {
                    continue;
                };
                replay_memory(b, n, letter).await?;
                true
            }
            Backend::None => false,
        };
        replayed += usize::from(ok);
    }
    match (chosen.len(), replayed) {
        (0, _) => messages::warning(&session, "No dead letter matched.")?,
        (_, n) => messages::success(&session, format!("{n} dead letter(s) replayed."))?,
    }
    Ok(see_other(&format!("{}dead", d.path)))
}

async fn replay_memory(b: &MemoryBroker, n: u64, letter: DeadLetter) -> Result<(), Error> {
    let id = letter.id.clone().unwrap_or_else(|| format!("dead-{n}"));
    if let Some(task_id) = letter
        .id
        .as_deref()
        .filter(|i| switchyard_actors::tasks::is_valid_task_id(i))
    {
        let failed = b.get_result(task_id).await.map_err(broker_err)?;
        if failed.is_some_and(|r| r.state == TaskState::Failure) {
            b.forget_result(task_id).await.map_err(broker_err)?;
        }
    }
    b.publish(Outgoing {
        dedupe_id: format!("{id}:replay:{n}"),
        id,
        queue: letter.queue,
        payload: letter.payload,
        not_before: None,
    })
    .await
    .map_err(broker_err)?;
    Ok(())
}

/// `POST <dashboard>dead/discard`: deleted for good.
async fn dead_discard(
    _staff: Staff,
    d: web::Data<Dashboard>,
    session: Session,
    form: web::Form<DeadForm>,
) -> Result<HttpResponse, Error> {
    let chosen = chosen(&d, &form).await?;
    match &d.backend {
        Backend::Nats(b) => {
            for l in &chosen {
                b.discard(l.seq).await.map_err(broker_err)?;
            }
        }
        Backend::Memory(b) => {
            let seqs: Vec<u64> = chosen.iter().map(|l| l.seq).collect();
            b.remove_dead_letters(&seqs);
        }
        Backend::None => {}
    }
    match chosen.len() {
        0 => messages::warning(&session, "No dead letter matched.")?,
        n => messages::success(&session, format!("{n} dead letter(s) discarded."))?,
    }
    Ok(see_other(&format!("{}dead", d.path)))
}

/// `GET <dashboard>schedules`: each beat entry with its last and next run.
async fn schedules(_staff: Staff, d: web::Data<Dashboard>) -> Result<Render, Error> {
    let store: Option<Arc<dyn BeatStore>> = match (&d.beat_store, &d.backend) {
        (Some(s), _) => Some(s.clone()),
        (None, Backend::Nats(b)) if !d.schedules.is_empty() => Some(
            d.nats_beat
                .get_or_try_init(|| async {
                    NatsBeatStore::open(b, &d.node)
                        .await
                        .map(|s| Arc::new(s) as Arc<dyn BeatStore>)
                })
                .await
                .map_err(broker_err)?
                .clone(),
        ),
        _ => None,
    };
    let now = Utc::now();
    let mut rows = Vec::new();
    for e in &d.schedules {
        let last = match &store {
            Some(s) => s.last(&e.name).await.map_err(broker_err)?,
            None => None,
        };
        let next = e.next_after(last.as_ref().map_or(now, |l| l.tick.max(now)));
        rows.push(json!({
            "name": e.name, "task": e.task, "queue": e.queue, "every": format!("{:?}", e.every),
            "last": last.as_ref().map(|l| when(l.tick)), "last_id": last.map(|l| l.id),
            "next": next.map(when),
        }));
    }
    Ok(page(
        &d,
        "schedules",
        "Schedules",
        "schedules",
        json!({"schedules": rows}),
    ))
}

async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "max-age=300"))
        .body(CSS)
}

async fn js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "max-age=300"))
        .body(JS)
}

/// `GET <dashboard>events`: every task and node event, as server-sent events.
async fn events(_staff: Staff, req: HttpRequest, d: web::Data<Dashboard>) -> HttpResponse {
    event_stream(&req, &d.monitor, None)
}

/// Where a stream resumes: its `Last-Event-ID` (a reconnect), else its `?after=N` (the id of
/// the last event the page was rendered with).
fn last_event_id(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get("Last-Event-ID")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| {
            form_urlencoded::parse(req.query_string().as_bytes())
                .find(|(k, _)| k == "after")
                .and_then(|(_, v)| v.parse().ok())
        })
}

fn frame_bytes(f: &Frame) -> Bytes {
    f.sse.clone()
}

/// A `snapshot` event: the stream missed frames (a reconnect from too long ago, or a reader
/// too slow); the page reloads for a fresh state.
const SNAPSHOT: &[u8] = b"event: snapshot\ndata: {\"kind\":\"snapshot\"}\n\n";

struct StreamState {
    rx: tokio::sync::broadcast::Receiver<Arc<Batch>>,
    queued: std::collections::VecDeque<Bytes>,
    tick: tokio::time::Interval,
    task: Option<String>,
    /// The id of the last frame sent.
    sent: u64,
}

impl StreamState {
    /// What this stream writes of `batch`: all of it as it is, or, for a stream of one task
    /// (or one that already sent some of its frames from the history), its new frames.
    fn take(&mut self, batch: &Batch) -> Option<Bytes> {
        if self.task.is_none() && batch.first_id() > self.sent {
            self.sent = batch.frames.last().map_or(self.sent, |f| f.id);
            return (!batch.sse.is_empty()).then(|| batch.sse.clone());
        }
        let mut out = actix_web::web::BytesMut::new();
        for f in &batch.frames {
            if f.id > self.sent && (self.task.is_none() || f.task_id == self.task) {
                self.sent = f.id;
                out.extend_from_slice(&f.sse);
            }
        }
        (!out.is_empty()).then(|| out.freeze())
    }
}

/// A `text/event-stream` of `monitor`'s frames (only those of task `task`, when given), each
/// `id: N` and `data: <event JSON>`. A `Last-Event-ID` (or `?after=N`) the history still
/// covers resumes after it; an older one gets a `snapshot` event first. A stream of one task
/// without either starts with that task's events still in the history. A reader more than
/// [`super::monitor::CLIENT_BUFFER`] frames behind skips ahead with a `snapshot` event.
pub fn event_stream(req: &HttpRequest, monitor: &Monitor, task: Option<String>) -> HttpResponse {
    // Subscribed before the history is read: nothing falls between; `sent` drops what both
    // hold.
    let rx = monitor.subscribe();
    let mut queued = std::collections::VecDeque::new();
    queued.push_back(Bytes::from_static(b"retry: 1000\n: switchyard events\n\n"));
    let mut sent = 0;
    let mut replay = |frames: Vec<Arc<Frame>>| {
        for f in frames {
            if task.is_none() || f.task_id == task {
                sent = sent.max(f.id);
                queued.push_back(frame_bytes(&f));
            }
        }
    };
    match (last_event_id(req), &task) {
        (Some(last), _) => match monitor.since(last) {
            Some(frames) => replay(frames),
            None => queued.push_back(Bytes::from_static(SNAPSHOT)),
        },
        (None, Some(id)) => replay(monitor.history_of(id)),
        (None, None) => {}
    }
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        rx,
        queued,
        tick,
        task,
        sent,
    };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        if let Some(b) = st.queued.pop_front() {
            return Some((Ok::<_, Infallible>(b), st));
        }
        loop {
            tokio::select! {
                r = st.rx.recv() => match r {
                    Ok(batch) => {
                        if let Some(out) = st.take(&batch) {
                            return Some((Ok(out), st));
                        }
                    }
                    Err(RecvError::Lagged(_)) => return Some((Ok(Bytes::from_static(SNAPSHOT)), st)),
                    Err(RecvError::Closed) => return None,
                },
                _ = st.tick.tick() => return Some((Ok(Bytes::from_static(b": keepalive\n\n")), st)),
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}
