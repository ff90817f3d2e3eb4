//! Scheduled tasks on the NATS broker: a task whose eta is at least
//! [`HOLD_MIN`](super::broker::HOLD_MIN) away leaves its
//! queue for the stream `<PREFIX>_SCHEDULED` (subjects `<prefix>.scheduled.>`, which task
//! publishers may not write), and a [`Scheduler`] on every worker and beat node releases it to
//! its queue when due. Nothing waits in a worker's memory or as an unacknowledged delivery: a
//! million scheduled tasks cost disk, and a restart of every process loses none.
//!
//! **The index is the subject.** A task due at unix second `t` is stored under
//! `<prefix>.scheduled.<queue>.<t / 3600>.<t % 3600>` with its id, task name and eta in headers,
//! so "what is due in second `t`" is one exact-subject question to the server (how many, then an
//! ordered consumer over that subject), and "which seconds of hour `h` hold anything" is one
//! subject listing, which is how a scheduler catches up after downtime. This works on every
//! server from 2.9 on (docs/tasks.md says why the 2.12 message schedules are not used).
//!
//! **Releasing.** Per queue, a scheduler loads each second's entries one second ahead
//! ([`LOOKAHEAD`]) and publishes each to `<prefix>.tasks.<queue>` at its eta with
//! `Nats-Msg-Id: <id>:due:<entry sequence>`, then removes the second's released entries with
//! one purge of its subject (up to the last sequence it loaded). Any number of schedulers may
//! run: they release an entry under the same message id, so the stream's duplicate window keeps
//! one. A sweep re-checks every second again [`SWEEP_LAG`] later (an entry written just behind
//! the front, a release cut short by a crash) and keeps its position in the KV bucket
//! `<prefix>_scheduler` (`cursor.<queue>`), from where a restarted scheduler catches up: a task
//! that fell due while nothing ran starts on recovery.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::{consumer, kv, stream};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::broker::{BrokerError, Delivery};
use super::nats::{unavailable, NatsBroker};

/// How far ahead of a second its entries are loaded.
pub const LOOKAHEAD: Duration = Duration::from_secs(1);
/// How long after a second the sweep looks at it again.
pub const SWEEP_LAG: i64 = 30;
/// How often a scheduler wakes up.
const TICK: Duration = Duration::from_millis(250);
/// Header: the task id of a scheduled entry.
pub const HEADER_ID: &str = "Switchyard-Task-Id";
/// Header: the task name of a scheduled entry.
pub const HEADER_TASK: &str = "Switchyard-Task";
/// Header: when a scheduled entry is due (RFC 3339, milliseconds).
pub const HEADER_ETA: &str = "Switchyard-Eta";
/// Entries released at once by one scheduler.
const RELEASE_CONCURRENCY: usize = 64;
/// Longest a slot's entries may take to load.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Most sweep steps (a second, or an hour when catching up) per wake-up.
const SWEEP_STEPS: usize = 64;
/// How often the sweep's position is saved.
const CURSOR_EVERY: i64 = 5;

/// One task waiting for its eta, as `switchyard scheduled list` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScheduledTask {
    pub id: String,
    pub task: String,
    pub queue: String,
    pub eta: DateTime<Utc>,
}

/// An entry loaded for release.
struct Entry {
    seq: u64,
    /// The slot subject it is stored under.
    subject: String,
    id: String,
    eta: DateTime<Utc>,
    payload: Bytes,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn header(headers: Option<&HeaderMap>, name: &str) -> Option<String> {
    Some(headers?.get(name)?.as_str().to_owned())
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

impl NatsBroker {
    /// `<prefix>.scheduled.<queue>.<hour>.<second of the hour>` of unix second `t`.
    fn slot_subject(&self, queue: &str, t: i64) -> String {
        let hour = t.div_euclid(3600);
        let prefix = &self.names().prefix;
        format!("{prefix}.scheduled.{queue}.{hour}.{}", t.rem_euclid(3600))
    }

    /// The stream of scheduled tasks.
    async fn scheduled_stream(&self) -> Result<stream::Stream, BrokerError> {
        let name = self.names().scheduled_stream();
        let stream = self
            .scheduled
            .get_or_try_init(|| self.jetstream().get_stream(&name))
            .await
            .map_err(unavailable(format!("get stream {name}")))?;
        Ok(stream.clone())
    }

    /// Stores `delivery` (task `id`, due at `eta`) in the scheduled stream; the message id
    /// makes a second move of the same delivery a duplicate.
    pub(super) async fn hold_delivery(
        &self,
        delivery: &Delivery,
        id: &str,
        task: &str,
        eta: DateTime<Utc>,
    ) -> Result<(), BrokerError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("{id}:hold:{}", delivery.seq).as_str(),
        );
        headers.insert(HEADER_ID, id);
        headers.insert(HEADER_TASK, task);
        headers.insert(HEADER_ETA, rfc3339(eta).as_str());
        let subject = self.slot_subject(&delivery.queue, eta.timestamp());
        let payload = Bytes::from(delivery.payload.clone());
        self.publish_raw(subject, payload, headers)
            .await
            .map(|_| ())
    }

    /// Drops the scheduled tasks of `queue`; returns how many.
    pub(super) async fn purge_scheduled(&self, queue: &str) -> Result<u64, BrokerError> {
        let filter = format!("{}.scheduled.{queue}.>", self.names().prefix);
        let stream = self.scheduled_stream().await?;
        let res = stream
            .purge()
            .filter(filter)
            .await
            .map_err(unavailable(format!("purge scheduled tasks of {queue}")))?;
        Ok(res.purged)
    }

    /// Every scheduled task (of `queue`), soonest first.
    pub async fn scheduled(&self, queue: Option<&str>) -> Result<Vec<ScheduledTask>, BrokerError> {
        let prefix = &self.names().prefix;
        let filter = match queue {
            Some(q) => format!("{prefix}.scheduled.{q}.>"),
            None => format!("{prefix}.scheduled.>"),
        };
        let mut out: Vec<ScheduledTask> = self
            .load(&filter, None)
            .await?
            .into_iter()
            .map(|(e, subject, task)| ScheduledTask {
                queue: subject
                    .split('.')
                    .nth_back(2)
                    .unwrap_or_default()
                    .to_owned(),
                id: e.id,
                task,
                eta: e.eta,
            })
            .collect();
        out.sort_by(|a, b| (a.eta, &a.id).cmp(&(b.eta, &b.id)));
        Ok(out)
    }

    /// How many tasks each queue has scheduled (queues without any are left out).
    pub async fn scheduled_counts(&self) -> Result<BTreeMap<String, u64>, BrokerError> {
        let filter = format!("{}.scheduled.>", self.names().prefix);
        let mut counts = BTreeMap::new();
        for (subject, n) in self.subjects(&filter).await? {
            let queue = subject.split('.').nth_back(2).unwrap_or_default();
            *counts.entry(queue.to_owned()).or_insert(0) += n;
        }
        Ok(counts)
    }

    /// How many messages each subject matching `filter` holds.
    async fn subjects(&self, filter: &str) -> Result<BTreeMap<String, u64>, BrokerError> {
        let stream = self.scheduled_stream().await?;
        let op = || format!("list subjects {filter}");
        let listed = stream
            .info_with_subjects(filter)
            .await
            .map_err(unavailable(op()))?;
        let listed: Vec<(String, usize)> = listed.try_collect().await.map_err(unavailable(op()))?;
        Ok(listed.into_iter().map(|(s, n)| (s, n as u64)).collect())
    }

    /// The entries under `filter` (at most `expect` of them, when known) with their subjects
    /// and task names. An entry without a readable id or eta is skipped (and stays; only
    /// Switchyard's nodes write this stream).
    async fn load(
        &self,
        filter: &str,
        expect: Option<u64>,
    ) -> Result<Vec<(Entry, String, String)>, BrokerError> {
        let stream = self.scheduled_stream().await?;
        let op = || format!("read scheduled tasks {filter}");
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(unavailable(op()))?;
        let mut out = Vec::new();
        let mut left = consumer.cached_info().num_pending;
        if let Some(n) = expect {
            left = left.min(n);
        }
        if left == 0 {
            return Ok(out);
        }
        let mut msgs = consumer.messages().await.map_err(unavailable(op()))?;
        let deadline = tokio::time::Instant::now() + LOAD_TIMEOUT;
        while left > 0 {
            let m = match tokio::time::timeout_at(deadline, msgs.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(BrokerError::unavailable(op(), e)),
                Ok(None) | Err(_) => return Err(BrokerError::unavailable_because(op())),
            };
            left -= 1;
            let Ok(info) = m.info() else { continue };
            let seq = info.stream_sequence;
            let pending = info.pending;
            let h = m.headers.as_ref();
            let (id, task) = (header(h, HEADER_ID), header(h, HEADER_TASK));
            let eta = header(h, HEADER_ETA).and_then(|t| parse_time(&t));
            if let (Some(id), Some(eta)) = (id, eta) {
                let subject = m.subject.to_string();
                let payload = m.payload.clone();
                let task = task.unwrap_or_default();
                let entry = Entry {
                    seq,
                    subject: subject.clone(),
                    id,
                    eta,
                    payload,
                };
                out.push((entry, subject, task));
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Publishes a due entry to its queue (it is deleted afterwards, see [`Self::remove`]).
    async fn release(&self, queue: &str, entry: &Entry) -> Result<(), BrokerError> {
        let mut headers = HeaderMap::new();
        let msg_id = format!("{}:due:{}", entry.id, entry.seq);
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let subject = self.names().task_subject(queue);
        self.publish_raw(subject, entry.payload.clone(), headers)
            .await
            .map(|_| ())
    }

    /// Deletes released entries: a second whose loaded entries were all released is purged
    /// in one request (up to its last loaded sequence, so an entry written since stays);
    /// otherwise the released ones are deleted one by one. Another scheduler may have
    /// removed them first.
    async fn remove(&self, released: Vec<(Entry, bool)>) {
        let Ok(stream) = self.scheduled_stream().await else {
            return; // The sweep releases them again, under the same message ids.
        };
        let mut slots: BTreeMap<String, (bool, u64, Vec<u64>)> = BTreeMap::new();
        for (entry, ok) in released {
            let slot = slots.entry(entry.subject).or_insert((true, 0, Vec::new()));
            slot.0 &= ok;
            slot.1 = slot.1.max(entry.seq);
            if ok {
                slot.2.push(entry.seq);
            }
        }
        for (subject, (all, last, seqs)) in slots {
            if all {
                let purged = stream
                    .purge()
                    .filter(subject.as_str())
                    .sequence(last + 1)
                    .await;
                if let Err(e) = purged {
                    tracing::debug!(%subject, "cannot purge released entries: {e}");
                }
                continue;
            }
            for seq in seqs {
                if let Err(e) = stream.delete_message(seq).await {
                    tracing::debug!(seq, "scheduled entry already gone: {e}");
                }
            }
        }
    }
}

/// Releases the scheduled tasks of some queues when due (see the module docs).
pub struct Scheduler {
    broker: NatsBroker,
    queues: Vec<String>,
}

impl Scheduler {
    /// A scheduler for `queues` over `broker`.
    pub fn new(broker: NatsBroker, queues: Vec<String>) -> Self {
        Self { broker, queues }
    }

    /// Runs until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let version = self.broker.server_version();
        let native = schedules_supported(&version);
        tracing::info!(
            server = %version,
            stream = %self.broker.names().scheduled_stream(),
            server_has_message_schedules = native,
            "scheduled tasks: the JetStream index (on every server version; docs/tasks.md)"
        );
        let cursors = match self.broker.scheduler_bucket().await {
            Ok(kv) => Some(kv),
            Err(e) => {
                tracing::warn!("scheduler: no cursor bucket, catching up from the start: {e}");
                None
            }
        };
        let mut loops = JoinSet::new();
        for queue in self.queues {
            let q = QueueScheduler {
                broker: self.broker.clone(),
                cursors: cursors.clone(),
                queue,
            };
            loops.spawn(q.run(stop.clone()));
        }
        while loops.join_next().await.is_some() {}
    }
}

/// One queue's front (on-time releases) and sweep (a second look, and catching up).
struct QueueScheduler {
    broker: NatsBroker,
    cursors: Option<kv::Store>,
    queue: String,
}

impl QueueScheduler {
    fn cursor_key(&self) -> String {
        format!("cursor.{}", self.queue)
    }

    /// Where the sweep starts: the saved cursor, else as far back as an entry can be.
    async fn start(&self) -> i64 {
        let saved = match &self.cursors {
            Some(kv) => kv.get(self.cursor_key()).await.ok().flatten(),
            None => None,
        };
        let saved = saved.and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok());
        let oldest = Utc::now().timestamp() - self.broker.scheduled_max_age().as_secs() as i64;
        saved.unwrap_or(oldest).max(oldest)
    }

    async fn run(self, stop: CancellationToken) {
        let mut sweep = self.start().await;
        let mut saved = sweep;
        let mut front = sweep.max(Utc::now().timestamp() - SWEEP_LAG);
        let mut releasing = JoinSet::new();
        tracing::info!(queue = %self.queue, "scheduler started");
        loop {
            let now = Utc::now();
            let ahead = now.timestamp() + LOOKAHEAD.as_secs() as i64;
            // The front: each second once, one second ahead.
            while front <= ahead && !stop.is_cancelled() {
                match self.due(front, None).await {
                    Ok(entries) => self.spawn(&mut releasing, entries),
                    Err(e) => {
                        tracing::warn!(queue = %self.queue, "scheduler: {e}");
                        break;
                    }
                }
                front += 1;
            }
            // The sweep: a second look, or catching up an hour at a time.
            let target = now.timestamp() - SWEEP_LAG;
            // Bounded per wake-up, so that a long catch-up never holds the front back.
            let mut steps = 0;
            while sweep < target && steps < SWEEP_STEPS && !stop.is_cancelled() {
                steps += 1;
                match self.sweep_step(sweep, target).await {
                    Ok((entries, next)) => {
                        self.spawn(&mut releasing, entries);
                        sweep = next;
                    }
                    Err(e) => {
                        tracing::warn!(queue = %self.queue, "scheduler sweep: {e}");
                        break;
                    }
                }
            }
            if sweep - saved >= CURSOR_EVERY {
                if let Some(kv) = &self.cursors {
                    let value = Bytes::from(sweep.to_string());
                    if kv.put(self.cursor_key(), value).await.is_ok() {
                        saved = sweep;
                    }
                }
            }
            while releasing.try_join_next().is_some() {}
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(TICK) => {}
            }
        }
        // In-flight releases finish (each is one publish and one delete).
        while releasing.join_next().await.is_some() {}
    }

    /// The entries of second `t` (`count` when already known), soonest first.
    async fn due(&self, t: i64, count: Option<u64>) -> Result<Vec<Entry>, BrokerError> {
        let subject = self.broker.slot_subject(&self.queue, t);
        let count = match count {
            Some(n) => n,
            None => self
                .broker
                .subjects(&subject)
                .await?
                .get(&subject)
                .copied()
                .unwrap_or(0),
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut entries: Vec<Entry> = self
            .broker
            .load(&subject, Some(count))
            .await?
            .into_iter()
            .map(|(e, _, _)| e)
            .collect();
        entries.sort_by_key(|e| (e.eta, e.seq));
        Ok(entries)
    }

    /// One step of the sweep from second `sweep` towards `target`: within the target's hour a
    /// second at a time, before it a whole hour from one subject listing. Returns the entries
    /// found and where the sweep goes on.
    async fn sweep_step(&self, sweep: i64, target: i64) -> Result<(Vec<Entry>, i64), BrokerError> {
        let hour = sweep.div_euclid(3600);
        if hour == target.div_euclid(3600) {
            return Ok((self.due(sweep, None).await?, sweep + 1));
        }
        let prefix = &self.broker.names().prefix;
        let filter = format!("{prefix}.scheduled.{}.{hour}.*", self.queue);
        let mut entries = Vec::new();
        for (subject, count) in self.broker.subjects(&filter).await? {
            let second = subject
                .rsplit('.')
                .next()
                .and_then(|s| s.parse::<i64>().ok());
            let Some(t) = second.map(|s| hour * 3600 + s).filter(|t| *t >= sweep) else {
                continue;
            };
            entries.extend(self.due(t, Some(count)).await?);
        }
        Ok((entries, (hour + 1) * 3600))
    }

    /// Releases `entries` in the background, each at its eta.
    fn spawn(&self, releasing: &mut JoinSet<()>, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let broker = self.broker.clone();
        let queue = self.queue.clone();
        releasing.spawn(async move {
            let released: Vec<(Entry, bool)> = futures_util::stream::iter(entries)
                .map(|entry| {
                    let (broker, queue) = (&broker, &queue);
                    async move {
                        let wait = (entry.eta - Utc::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(wait).await;
                        let sent = broker.release(queue, &entry).await;
                        if let Err(e) = &sent {
                            // The sweep tries again.
                            tracing::warn!(task_id = %entry.id, "cannot release: {e}");
                        }
                        (entry, sent.is_ok())
                    }
                })
                .buffered(RELEASE_CONCURRENCY)
                .collect()
                .await;
            broker.remove(released).await;
        });
    }
}

impl NatsBroker {
    /// The bucket of the schedulers' sweep positions.
    async fn scheduler_bucket(&self) -> Result<kv::Store, BrokerError> {
        let bucket = self.names().scheduler_bucket();
        super::nats::ensure_bucket(self.jetstream(), &bucket, Duration::ZERO, self.replicas())
            .await?;
        self.jetstream()
            .get_key_value(&bucket)
            .await
            .map_err(unavailable(format!("open bucket {bucket}")))
    }
}

/// Whether a server of `version` has message schedules (2.12 and later).
pub fn schedules_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 12)
}

/// The scheduled stream's configuration: entries are kept `tasks.max_eta` plus a week, so a
/// task due while nothing ran still has a week to be released.
pub(super) fn stream_config(
    names: &super::NatsNames,
    settings: &super::TaskSettings,
) -> stream::Config {
    stream::Config {
        name: names.scheduled_stream(),
        subjects: vec![format!("{}.scheduled.>", names.prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: settings.dedupe_window,
        max_age: scheduled_max_age(settings.max_eta),
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// How long a scheduled entry is kept at most.
pub(super) fn scheduled_max_age(max_eta: Duration) -> Duration {
    max_eta.saturating_add(Duration::from_secs(7 * 86_400))
}
