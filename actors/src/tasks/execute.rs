//! Running tasks: the one runner every mode goes through. A delivery passes the stages
//! decode → admit (id, args, deliveries, expiry, eta and `max_eta`, known task) → claim
//! (against a revocation) → run (one attempt under its soft and hard limits) → settle
//! (SUCCESS, RETRY with the next message published, or FAILURE; dead letters; acknowledge).
//! A message that never ran writes its record create-only. Worker pools run it on their
//! broker's deliveries; eager mode runs it inline on a private in-process queue, so a rule
//! about retries, expiry or revocation is written here once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::broker::{Claim, DeadLetter, Delivery, Outgoing, ResultStore, TaskQueue, HOLD_MIN};
use super::canvas::{CanvasSpec, Membership};
use super::events::{EventKind, EventSink, TaskEvent};
use super::record::Revocation;
use super::{Backoff, Envelope, Registry, ResultRecord, TaskContext, TaskEntry, TaskError};
use super::{TaskSettings, TaskState};

/// The dead-letter reason of a message delivered more than `tasks.max_deliver` times.
const MAX_DELIVERIES: &str = "max deliveries";

/// The dead-letter reason of a message whose canvas fields are not as docs/task-protocol.md
/// says (or a canvas id taken by a task).
const BAD_CANVAS: &str = "bad canvas";

/// How long a delivery is put back when the result store is unreachable at claim time.
const CLAIM_RETRY_DELAY: Duration = Duration::from_secs(1);

/// One task's limits and retry policy, resolved against `[tasks]`.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) max_retries: u32,
    pub(crate) backoff: Backoff,
    pub(crate) soft_time_limit: Option<Duration>,
    pub(crate) time_limit: Option<Duration>,
    pub(crate) retry_on_time_limit: bool,
    pub(crate) ignore_result: bool,
}

/// Runs one attempt: the cancellation token fires at the soft limit; at the hard limit the body
/// is dropped (at its next await) and the attempt fails with `time_limit`.
pub(crate) async fn run_attempt(
    entry: &TaskEntry,
    ctx: TaskContext,
    args: Value,
    plan: &Plan,
) -> Result<Value, TaskError> {
    let token = ctx.cancel.clone();
    let soft = plan.soft_time_limit;
    let mut body = entry.call(ctx, args);
    let limited = async move {
        if let Some(soft) = soft {
            tokio::select! {
                r = &mut body => return r,
                () = tokio::time::sleep(soft) => token.cancel(),
            }
        }
        body.await
    };
    match plan.time_limit {
        Some(hard) => match tokio::time::timeout(hard, limited).await {
            Ok(r) => r,
            Err(_) => {
                let message = format!("hard time limit of {:.3}s exceeded", hard.as_secs_f64());
                Err(if plan.retry_on_time_limit {
                    TaskError::retry("time_limit", message)
                } else {
                    TaskError::fail("time_limit", message)
                })
            }
        },
        None => limited.await,
    }
}

/// What follows a failed attempt.
#[derive(Debug, PartialEq)]
pub(crate) enum AfterError {
    /// Retry after this wait.
    Retry(Duration),
    /// Fail the task.
    Fail,
}

/// Retry errors are retried while `retries < max_retries`, after their own countdown or the
/// backoff of retry number `retries`; everything else fails.
pub(crate) fn after_error(err: &TaskError, retries: u32, plan: &Plan) -> AfterError {
    match err {
        TaskError::Retry { countdown, .. } if retries < plan.max_retries => {
            AfterError::Retry(countdown.unwrap_or_else(|| plan.backoff.delay(retries)))
        }
        _ => AfterError::Fail,
    }
}

/// Awaits `fut`, telling the broker every `every` that the delivery is still being worked on.
async fn with_heartbeat<F: Future>(delivery: &Delivery, fut: F, every: Duration) -> F::Output {
    tokio::pin!(fut);
    let every = every.max(Duration::from_millis(10));
    // The first tick one period from now: an interval's immediate first tick still goes
    // through the timer wheel (1 ms granularity), and awaiting it delayed the start of every
    // task by up to a millisecond (publish-to-start p50 1.8 ms, 0.67 ms without).
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tick.tick() => {
                if let Err(e) = delivery.progress().await {
                    tracing::warn!(seq = delivery.seq, "cannot extend the ack deadline: {e}");
                }
            }
        }
    }
}

/// What a worker needs to process deliveries; shared by the workers of one pool (eager mode
/// builds one per publish, over its private queue).
pub(crate) struct Runner {
    pub(crate) queue: Arc<dyn TaskQueue>,
    pub(crate) results: Arc<dyn ResultStore>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) settings: Arc<TaskSettings>,
    pub(crate) events: Option<EventSink>,
    /// Fires at a cold shutdown; every task's token is a child of it.
    pub(crate) cold: CancellationToken,
    /// Eager mode: the body's context says so, and an eta is not waited for.
    pub(crate) eager: bool,
    /// Canvas members waiting to be recorded together (`canvas.rs`).
    pub(crate) batches: super::canvas::CanvasBatches,
}

/// Who a delivery is about, once known.
struct Subject<'a> {
    id: &'a str,
    task: &'a str,
    queue: &'a str,
    /// The message's `retries`.
    retries: u32,
}

/// Which live record a message that never ran may replace (otherwise its record is
/// create-only): the RETRY record of its own task at the same retry count, and, after too many
/// deliveries, any record that is not final (a worker died with it STARTED).
fn replaceable(retries: u32, after_deliveries: bool) -> impl Fn(&ResultRecord) -> bool {
    move |r| {
        (r.state == TaskState::Retry && r.retries == retries)
            || (after_deliveries && !r.state.is_ready())
    }
}

impl Runner {
    fn emit(&self, kind: EventKind, s: &Subject<'_>, state: TaskState) {
        if let Some(sink) = &self.events {
            sink(&TaskEvent {
                kind,
                task_id: s.id.to_owned(),
                task: s.task.to_owned(),
                queue: s.queue.to_owned(),
                node: self.settings.node_id.clone(),
                state,
                at: Utc::now(),
                progress: None,
                args: None,
                retry_of: None,
            });
        }
    }

    /// task-received, with the args when small and the task it retries.
    fn emit_received(&self, s: &Subject<'_>, env: &Envelope) {
        if let Some(sink) = &self.events {
            let args = serde_json::to_string(&env.args)
                .ok()
                .filter(|a| a.len() <= super::events::EVENT_ARGS_MAX)
                .map(|_| env.args.clone());
            sink(&TaskEvent {
                kind: EventKind::TaskReceived,
                task_id: s.id.to_owned(),
                task: s.task.to_owned(),
                queue: s.queue.to_owned(),
                node: self.settings.node_id.clone(),
                state: TaskState::Pending,
                at: Utc::now(),
                progress: None,
                args,
                retry_of: env.retry_of.clone(),
            });
        }
    }

    async fn put(&self, record: &ResultRecord) {
        if let Err(e) = self.results.put_result(record).await {
            tracing::error!(task_id = %record.id, state = %record.state, "cannot store result: {e}");
        }
    }

    async fn ack(&self, delivery: &Delivery) {
        if let Err(e) = delivery.ack().await {
            tracing::warn!(seq = delivery.seq, "cannot acknowledge: {e}");
        }
    }

    async fn nak(&self, delivery: &Delivery, delay: Duration) {
        if let Err(e) = delivery.nak(delay).await {
            tracing::warn!(seq = delivery.seq, "cannot put back: {e}");
        }
    }

    /// Writes the record of a message that never ran (see [`ResultStore::put_unrun`]); whether
    /// it did.
    async fn put_unrun(&self, record: &ResultRecord, after_deliveries: bool) -> bool {
        let replace = replaceable(record.retries, after_deliveries);
        match self.results.put_unrun(record, &replace).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(task_id = %record.id, state = %record.state, "a message that never ran names a task with a record: left as it was");
                false
            }
            Err(e) => {
                tracing::error!(task_id = %record.id, state = %record.state, "cannot store result: {e}");
                false
            }
        }
    }

    /// Fails a message for good: FAILURE record (when it has a usable id and `record`; never
    /// over another task's record), dead letter, ack.
    async fn reject(
        &self,
        delivery: &Delivery,
        subject: Option<&Subject<'_>>,
        record: bool,
        reason: &str,
        error: String,
    ) -> Option<ResultRecord> {
        tracing::warn!(queue = %delivery.queue, seq = delivery.seq, reason, "{error}");
        let mut failed = None;
        if let Some(s) = subject.filter(|_| record) {
            let rec = ResultRecord::pending(s.id)
                .about(s.task, s.retries, &self.settings.node_id)
                .failed(error, Utc::now());
            if self.put_unrun(&rec, reason == MAX_DELIVERIES).await {
                self.emit(EventKind::TaskFailed, s, TaskState::Failure);
                failed = Some(rec);
            }
        }
        let letter = DeadLetter {
            id: subject.map(|s| s.id.to_owned()),
            task: subject.map(|s| s.task.to_owned()),
            queue: delivery.queue.clone(),
            payload: delivery.payload.clone(),
            reason: reason.to_owned(),
            dead_at: Utc::now(),
        };
        match self.queue.dead_letter(letter).await {
            Ok(()) => self.ack(delivery).await,
            // Keep the message rather than lose it; it comes back after ack_wait.
            Err(e) => tracing::error!(seq = delivery.seq, "cannot dead-letter: {e}"),
        }
        failed
    }

    /// Processes one delivery to the end: every path acknowledges, puts back, or (when the
    /// broker fails) leaves it for redelivery. Returns the record this delivery wrote (also
    /// when `ignore_result` kept it out of the store), or `None` when it wrote none (a message
    /// without a readable id, put back, or already finished).
    pub(crate) async fn process(&self, delivery: Delivery) -> Option<ResultRecord> {
        // Decode.
        let now = Utc::now();
        let env: Envelope = match serde_json::from_slice(&delivery.payload) {
            Ok(env) => env,
            Err(e) => {
                let error = format!("bad_message: {e}");
                return self
                    .reject(&delivery, None, false, "bad message", error)
                    .await;
            }
        };
        let id = env
            .id
            .clone()
            .unwrap_or_else(|| Envelope::fallback_id(self.queue.stream(), delivery.seq));
        let s = Subject {
            id: &id,
            task: &env.task,
            queue: &delivery.queue,
            retries: env.retries,
        };
        // An id that cannot be a result key (SPEC.md: 1–128 of `[A-Za-z0-9_-]`) would fail
        // every claim: dead-lettered at once, no record.
        if !super::is_valid_task_id(&id) {
            let error = format!("bad_id: task id {id:?} is not 1-128 characters of [A-Za-z0-9_-]");
            return self
                .reject(&delivery, Some(&s), false, "bad id", error)
                .await;
        }
        if delivery.delivered == 1 && env.retries == 0 {
            self.emit_received(&s, &env);
        }
        // Admit.
        if !env.args.is_object() {
            let error = "bad_args: args must be a JSON object".to_owned();
            return self
                .reject(&delivery, Some(&s), true, "bad args", error)
                .await;
        }
        let member = match env.canvas.as_ref().map(Membership::parse).transpose() {
            Ok(m) => m,
            Err(e) => {
                let error = format!("bad_canvas: {e}");
                return self
                    .reject(&delivery, Some(&s), true, BAD_CANVAS, error)
                    .await;
            }
        };
        let spec = match CanvasSpec::parse(&env) {
            Ok(spec) => spec,
            Err(e) => {
                let error = format!("bad_canvas: {e}");
                let failed = self
                    .reject(&delivery, Some(&s), true, BAD_CANVAS, error)
                    .await;
                self.after_unrun(&delivery, member.as_ref(), failed.as_ref())
                    .await;
                return failed;
            }
        };
        if delivery.delivered > self.settings.max_deliver {
            let error = format!(
                "max_deliver: delivered {} times (tasks.max_deliver = {})",
                delivery.delivered, self.settings.max_deliver
            );
            let failed = self
                .reject(&delivery, Some(&s), true, MAX_DELIVERIES, error)
                .await;
            self.after_unrun(&delivery, member.as_ref(), failed.as_ref())
                .await;
            return failed;
        }
        if env.is_expired(now) {
            let rec = ResultRecord::pending(&id)
                .about(&env.task, env.retries, &self.settings.node_id)
                .revoked(Revocation::Expired, now);
            let wrote = self.put_unrun(&rec, false).await;
            if wrote {
                self.emit(EventKind::TaskRevoked, &s, TaskState::Revoked);
                self.after_unrun(&delivery, member.as_ref(), Some(&rec))
                    .await;
            }
            self.ack(&delivery).await;
            return wrote.then_some(rec);
        }
        if let Some(wait) = env.wait_for_eta(now).filter(|w| *w > self.settings.max_eta) {
            let error = format!(
                "eta_too_far: eta {}s away (tasks.max_eta = {}s)",
                wait.as_secs(),
                self.settings.max_eta.as_secs()
            );
            let failed = self
                .reject(&delivery, Some(&s), true, "eta too far", error)
                .await;
            self.after_unrun(&delivery, member.as_ref(), failed.as_ref())
                .await;
            return failed;
        }
        if let (false, Some(wait), Some(eta)) = (self.eager, env.wait_for_eta(now), env.eta) {
            // A far eta leaves the queue for the schedule store (no delivery waits in a
            // worker's hands for long); a close one waits as a delayed nak.
            let held = match wait >= HOLD_MIN {
                true => self.queue.hold(&delivery, &id, &env.task, eta).await,
                false => Ok(false),
            };
            match held {
                Ok(true) => self.ack(&delivery).await,
                Ok(false) => self.nak(&delivery, wait).await,
                Err(e) => {
                    tracing::warn!(task_id = %id, "cannot schedule, putting back: {e}");
                    self.nak(&delivery, CLAIM_RETRY_DELAY).await;
                }
            }
            return None;
        }
        if let Some(spec) = spec {
            return match self.expand(&delivery, &id, &env, spec).await {
                Ok(rec) => {
                    self.ack(&delivery).await;
                    rec
                }
                Err((true, e)) => {
                    tracing::warn!(task_id = %id, "cannot expand the canvas, putting back: {e}");
                    self.nak(&delivery, CLAIM_RETRY_DELAY).await;
                    None
                }
                Err((false, error)) => {
                    self.reject(&delivery, Some(&s), false, BAD_CANVAS, error)
                        .await
                }
            };
        }
        let Some(entry) = self.registry.get(&env.task) else {
            let error = format!(
                "unknown_task: no task named {:?} is registered on node {}",
                env.task, self.settings.node_id
            );
            let failed = self
                .reject(&delivery, Some(&s), true, "unknown task", error)
                .await;
            self.after_unrun(&delivery, member.as_ref(), failed.as_ref())
                .await;
            return failed;
        };
        let plan = self.settings.plan(entry.options(), env.max_retries);

        // Claim.
        let started = ResultRecord {
            retry_of: env.retry_of.clone(),
            ..ResultRecord::started(
                &id,
                &env.task,
                env.retries,
                &self.settings.node_id,
                Utc::now(),
            )
        };
        match self.results.claim(&started).await {
            Ok(Claim::Claimed) => {}
            Ok(Claim::Refused(state)) => {
                tracing::info!(task_id = %id, %state, "not running a task that is already {state}");
                if state == TaskState::Revoked {
                    self.emit(EventKind::TaskRevoked, &s, state);
                }
                // A canvas member that finished before (its runner died before telling its
                // canvas, or it is a duplicate): tell it again; counted once.
                if let Some(m) = &member {
                    let told = match self.results.get_result(&id).await {
                        Ok(Some(rec)) => self.settle_member(&delivery, m, &rec).await,
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = told {
                        tracing::warn!(task_id = %id, "cannot update the canvas, putting back: {e}");
                        self.nak(&delivery, CLAIM_RETRY_DELAY).await;
                        return None;
                    }
                }
                self.ack(&delivery).await;
                return None;
            }
            Err(e) => {
                // Unavailable or contended: later. Otherwise the store refuses this record,
                // and the message waits for redelivery (ack_wait) rather than spin.
                let delay = if e.is_transient() {
                    CLAIM_RETRY_DELAY
                } else {
                    self.settings.ack_wait
                };
                tracing::warn!(task_id = %id, ?delay, "cannot claim, putting back: {e}");
                self.nak(&delivery, delay).await;
                return None;
            }
        }
        // After the claim: a broker round trip between the limiter and the body would make
        // starts jitter by its latency.
        entry.rate_limit().await;
        self.emit(EventKind::TaskStarted, &s, TaskState::Started);

        // Run.
        let progress = Arc::new(super::progress::ProgressReporter::new(
            started.clone(),
            &delivery.queue,
            self.results.clone(),
            self.events.clone(),
        ));
        let ctx = TaskContext {
            id: id.clone(),
            task: env.task.clone(),
            queue: delivery.queue.clone(),
            retries: env.retries,
            max_retries: plan.max_retries,
            eta: env.eta,
            eager: self.eager,
            cancel: self.cold.child_token(),
            data: Default::default(),
            progress: Some(progress.clone()),
        };
        let attempt = run_attempt(entry, ctx, env.args.clone(), &plan);
        // Eager mode's private queue has no other consumer to take the delivery over: no
        // heartbeat (and no timer per call).
        let outcome = if self.eager {
            attempt.await
        } else {
            with_heartbeat(&delivery, attempt, self.settings.ack_wait / 2).await
        };

        // Settle (the final record keeps the last progress reported).
        let started = ResultRecord {
            progress: progress.last(),
            ..started
        };
        let rec = match outcome {
            Ok(value) => {
                let rec = started.succeeded(value, Utc::now());
                if plan.ignore_result {
                    if let Err(e) = self.results.forget_result(&id).await {
                        tracing::warn!(task_id = %id, "cannot drop the result: {e}");
                    }
                } else {
                    self.put(&rec).await;
                }
                self.emit(EventKind::TaskSucceeded, &s, TaskState::Success);
                rec
            }
            Err(err) => match after_error(&err, env.retries, &plan) {
                AfterError::Retry(countdown) => {
                    // A retry waits at most `tasks.max_eta` (a huge backoff or countdown
                    // saturates there rather than overflow the clock).
                    let countdown = countdown.min(self.settings.max_eta);
                    let retries = env.retries + 1;
                    let rec = started.retrying(retries, err.to_string());
                    // The RETRY record goes first, so the next attempt's STARTED follows it.
                    self.put(&rec).await;
                    let eta = chrono::TimeDelta::from_std(countdown)
                        .ok()
                        .and_then(|d| Utc::now().checked_add_signed(d))
                        .unwrap_or_else(Utc::now);
                    let next = Envelope {
                        id: Some(id.clone()),
                        retries,
                        eta: Some(eta),
                        queue: Some(delivery.queue.clone()),
                        ..env.clone()
                    };
                    let sent = match serde_json::to_vec(&next) {
                        Ok(payload) => self
                            .queue
                            .publish(Outgoing {
                                id: id.clone(),
                                queue: delivery.queue.clone(),
                                payload,
                                dedupe_id: format!("{id}:retry:{retries}"),
                                not_before: Some(eta),
                            })
                            .await
                            .map_err(|e| (e.is_transient(), e.to_string())),
                        Err(e) => Err((false, e.to_string())),
                    };
                    match sent {
                        Ok(_) => {
                            tracing::info!(task_id = %id, task = %env.task, retries, ?countdown, "retrying: {err}");
                            self.emit(EventKind::TaskRetried, &s, TaskState::Retry);
                            rec
                        }
                        Err((true, e)) => {
                            tracing::warn!(task_id = %id, "cannot publish the retry, putting back: {e}");
                            self.nak(&delivery, countdown).await;
                            return Some(rec);
                        }
                        // The retry can never be published: the task fails now.
                        Err((false, e)) => {
                            let error = format!("{err} (retry not published: {e})");
                            tracing::warn!(task_id = %id, task = %env.task, "task failed: {error}");
                            let rec = rec.failed(error, Utc::now());
                            self.put(&rec).await;
                            self.emit(EventKind::TaskFailed, &s, TaskState::Failure);
                            rec
                        }
                    }
                }
                AfterError::Fail => {
                    let rec = started.failed(err.to_string(), Utc::now());
                    tracing::warn!(task_id = %id, task = %env.task, "task failed: {err}");
                    self.put(&rec).await;
                    self.emit(EventKind::TaskFailed, &s, TaskState::Failure);
                    rec
                }
            },
        };
        if let Some(m) = &member {
            if let Err(e) = self.settle_member(&delivery, m, &rec).await {
                // The record is final: the redelivery is refused at its claim and tells the
                // canvas then.
                tracing::warn!(task_id = %id, "cannot update the canvas, putting back: {e}");
                self.nak(&delivery, CLAIM_RETRY_DELAY).await;
                return Some(rec);
            }
        }
        self.ack(&delivery).await;
        Some(rec)
    }

    /// Tells the canvas of a member that failed or expired without running (best effort: the
    /// message is already acknowledged).
    async fn after_unrun(
        &self,
        delivery: &Delivery,
        member: Option<&Membership>,
        rec: Option<&ResultRecord>,
    ) {
        if let (Some(m), Some(rec)) = (member, rec) {
            if let Err(e) = self.settle_member(delivery, m, rec).await {
                tracing::warn!(task_id = %rec.id, canvas = %m.id, "cannot update the canvas: {e}");
            }
        }
    }
}

/// Runs one delivery through the runner every worker uses (decode → admit → claim → run →
/// settle) with `queue` as its broker and `results` as its result store, no events; returns
/// the record it wrote (`None`: none, as a worker). For fuzz targets and property tests
/// (`fuzz/`): whatever the payload, it ends as a record, a dead letter or put back, never a
/// panic.
pub async fn process_delivery(
    queue: Arc<dyn TaskQueue>,
    results: Arc<dyn ResultStore>,
    registry: Arc<Registry>,
    settings: Arc<TaskSettings>,
    delivery: Delivery,
) -> Option<ResultRecord> {
    let runner = Runner {
        queue,
        results,
        registry,
        settings,
        events: None,
        cold: CancellationToken::new(),
        eager: false,
        batches: Default::default(),
    };
    runner.process(delivery).await
}
