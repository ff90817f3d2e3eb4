//! The `nats` broker: JetStream stream `<PREFIX>_TASKS` on `<prefix>.tasks.>` (file storage,
//! work-queue retention, duplicate window = `tasks.dedupe_window`), one durable pull consumer
//! per queue shared by every worker, dead letters in `<PREFIX>_DEAD` on `<prefix>.dead.>`,
//! result records in the key-value bucket `<prefix>_results`, the notes of unique publishes in
//! `<prefix>_unique` (kept one dedupe window), events on `<prefix>.events.*`.
//!
//! Only JetStream features NATS 2.9 has are used: the results bucket's stream is created
//! directly (`KV_<bucket>`) and then opened as a key-value store; delayed delivery (an eta, a
//! retry countdown) is a negative ack with a delay, done by the worker; dead-lettering is done
//! by the worker (a work-queue stream never moves a message by itself). See
//! `docs/task-protocol.md`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::broker::{
    revocable, Acker, BrokerError, Claim, DeadLetter, Delivery, Feed, Outgoing, PublishOutcome,
    ResultStore, TaskQueue,
};
use super::canvas::Updated;
use super::feed::PullFeed;
use super::record::Revocation;
use super::{Envelope, EventKind, EventSink, ResultRecord, TaskEvent, TaskSettings, TaskState};

/// Request timeout of one JetStream API call or publish.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a publish keeps retrying while NATS is unreachable before it fails.
pub const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(10);
/// Pause between publish attempts.
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Unacknowledged deliveries a queue's consumer allows (delayed naks hold slots too).
const MAX_ACK_PENDING: i64 = 100_000;
/// Attempts at a compare-and-swap on a result record.
const CAS_ATTEMPTS: u32 = 32;
/// Events buffered for publishing before new ones are dropped.
const EVENT_BUFFER: usize = 65_536;
/// Header: why a message was dead-lettered.
pub const HEADER_REASON: &str = "Switchyard-Reason";
/// Header: when (RFC 3339).
pub const HEADER_FAILED_AT: &str = "Switchyard-Failed-At";
/// Header: the subject the message was published to.
pub const HEADER_ORIGINAL_SUBJECT: &str = "Switchyard-Original-Subject";

/// `map_err` for an operation the service did not answer.
pub(super) fn unavailable<E>(op: impl Into<String>) -> impl FnOnce(E) -> BrokerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let op = op.into();
    move |e| BrokerError::unavailable(op, e)
}

/// Whether a publish that failed this way can succeed when tried again (false: the message
/// itself is refused, e.g. larger than the server's `max_payload`).
fn publish_retryable(kind: &jetstream::context::PublishErrorKind) -> bool {
    use jetstream::context::PublishErrorKind as K;
    !matches!(
        kind,
        K::MaxPayloadExceeded | K::WrongLastMessageId | K::WrongLastSequence
    )
}

/// A result record's JSON bytes.
fn encode(record: &ResultRecord) -> Result<Bytes, BrokerError> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|e| BrokerError::data(format!("result {}", record.id), e))
}

/// The names under one `nats.prefix`.
#[derive(Clone, Debug)]
pub struct NatsNames {
    pub prefix: String,
}

impl NatsNames {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
    /// `<PREFIX>_TASKS`.
    pub fn tasks_stream(&self) -> String {
        format!("{}_TASKS", self.prefix.to_uppercase())
    }
    /// `<PREFIX>_DEAD`.
    pub fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.prefix.to_uppercase())
    }
    /// `<prefix>.tasks.<queue>`.
    pub fn task_subject(&self, queue: &str) -> String {
        format!("{}.tasks.{queue}", self.prefix)
    }
    /// `<prefix>.dead.<queue>`.
    pub fn dead_subject(&self, queue: &str) -> String {
        format!("{}.dead.{queue}", self.prefix)
    }
    /// `<prefix>.events.<kind>`.
    pub fn event_subject(&self, kind: &str) -> String {
        format!("{}.events.{kind}", self.prefix)
    }
    /// `<PREFIX>_SCHEDULED`: tasks waiting for their eta (see `scheduled`).
    pub fn scheduled_stream(&self) -> String {
        format!("{}_SCHEDULED", self.prefix.to_uppercase())
    }
    /// `<prefix>_scheduler`: the schedulers' sweep positions.
    pub fn scheduler_bucket(&self) -> String {
        format!("{}_scheduler", self.prefix)
    }
    /// `<prefix>_results`.
    pub fn results_bucket(&self) -> String {
        format!("{}_results", self.prefix)
    }
    /// `<prefix>_rates`: the cluster-wide rate limits' windows (docs/tasks.md).
    pub fn rates_bucket(&self) -> String {
        format!("{}_rates", self.prefix)
    }
    /// `<prefix>_unique`: unique key → task id, kept `tasks.dedupe_window`.
    pub fn unique_bucket(&self) -> String {
        format!("{}_unique", self.prefix)
    }
    /// Every stream the task broker creates under this prefix, the KV buckets as their `KV_`
    /// streams: what a test or a bench deletes when it is done with its prefix.
    pub fn task_streams(&self) -> [String; 7] {
        [
            self.tasks_stream(),
            self.dead_stream(),
            self.scheduled_stream(),
            format!("KV_{}", self.results_bucket()),
            format!("KV_{}", self.scheduler_bucket()),
            format!("KV_{}", self.rates_bucket()),
            format!("KV_{}", self.unique_bucket()),
        ]
    }
    /// The durable consumer of a queue.
    pub fn consumer(&self, queue: &str) -> String {
        format!("{}_{}", self.prefix, queue).replace(['.', '*', '>', ' '], "_")
    }
}

/// Creates a key-value bucket's stream when missing, in a form NATS 2.9 understands.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<(), BrokerError> {
    crate::jetstream::ensure_kv_stream(js, bucket, max_age, false, replicas)
        .await
        .map_err(|e| BrokerError::unavailable_because(format!("bucket {bucket}: {e}")))
}

async fn ensure_stream(js: &jetstream::Context, config: stream::Config) -> Result<(), BrokerError> {
    let op = format!("create stream {}", config.name);
    crate::jetstream::ensure_stream(js, config)
        .await
        .map_err(|e| {
            use jetstream::context::CreateStreamErrorKind as K;
            match e.kind() {
                K::TimedOut | K::JetStreamUnavailable => BrokerError::unavailable(op, e),
                _ => BrokerError::refused(op, e),
            }
        })
}

/// Whether `get_stream` failed because the stream does not exist.
fn stream_missing(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// `tasks.dead_max_bytes` as JetStream's `max_bytes` (-1: no limit).
fn dead_max_bytes(bytes: u64) -> i64 {
    match bytes {
        0 => -1,
        n => i64::try_from(n).unwrap_or(i64::MAX),
    }
}

/// Brings the limits of an existing dead-letter stream (one created before them, or under
/// other settings) to `tasks.dead_max_age` / `tasks.dead_max_bytes`; a refusal is logged.
async fn ensure_dead_limits(
    js: &jetstream::Context,
    name: &str,
    settings: &TaskSettings,
) -> Result<(), BrokerError> {
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(unavailable(format!("get stream {name}")))?;
    let info = stream
        .info()
        .await
        .map_err(unavailable(format!("read stream {name}")))?;
    let max_bytes = dead_max_bytes(settings.dead_max_bytes);
    if info.config.max_age == settings.dead_max_age && info.config.max_bytes == max_bytes {
        return Ok(());
    }
    let config = stream::Config {
        max_age: settings.dead_max_age,
        max_bytes,
        ..info.config.clone()
    };
    // A NATS user that may not update streams (SPEC.md's `publisher`) still works; the nodes
    // (`app`) set the limits.
    if let Err(e) = js.update_stream(config).await {
        tracing::warn!(
            stream = name,
            "cannot set tasks.dead_max_age / dead_max_bytes: {e}"
        );
    }
    Ok(())
}

/// The JetStream broker. Cloning shares the connection.
#[derive(Clone)]
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    names: NatsNames,
    stream: String,
    kv: kv::Store,
    /// Unique key → task id of its first publish (`<prefix>_unique`).
    unique: kv::Store,
    ack_wait: Duration,
    max_eta: Duration,
    /// `nats.replicas`, for the buckets opened later (scheduler, beat).
    replicas: usize,
    consumers: std::sync::Arc<Mutex<HashMap<String, consumer::PullConsumer>>>,
    /// The scheduled stream's handle, looked up once (every scheduler second asks it).
    pub(super) scheduled: std::sync::Arc<tokio::sync::OnceCell<stream::Stream>>,
    /// The `<prefix>_rates` bucket, opened (and created) by the first lease.
    rates: std::sync::Arc<tokio::sync::OnceCell<kv::Store>>,
}

/// What a process opens the broker for, and so what it creates when missing and which NATS
/// permissions it needs (docs/security.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// `publish`, `result` (the `publisher` user): the task stream and the two buckets.
    Client,
    /// The administrative commands (`operator`): also the DEAD and SCHEDULED streams.
    Admin,
    /// `serve`, `worker`, `beat` (`app`): also the queues' consumers and the DEAD limits.
    Node,
}

impl NatsBroker {
    /// Opens the broker under `prefix` over `client` for a node: creates the streams, the
    /// buckets and the consumers of `settings`' queues when missing, and sets the DEAD limits.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        settings: &TaskSettings,
    ) -> Result<Self, BrokerError> {
        Self::open_as(client, prefix, settings, Opening::Node).await
    }

    /// Opens the broker for `opening`: each opening creates what the one before it does, and
    /// more; a stream or bucket that exists is only looked up.
    pub async fn open_as(
        client: async_nats::Client,
        prefix: &str,
        settings: &TaskSettings,
        opening: Opening,
    ) -> Result<Self, BrokerError> {
        let broker = Self::open_client(client, prefix, settings).await?;
        if opening == Opening::Client {
            return Ok(broker);
        }
        let (js, names) = (&broker.js, &broker.names);
        ensure_stream(
            js,
            stream::Config {
                name: names.dead_stream(),
                subjects: vec![format!("{prefix}.dead.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                max_age: settings.dead_max_age,
                max_bytes: dead_max_bytes(settings.dead_max_bytes),
                ..Default::default()
            },
        )
        .await?;
        ensure_stream(js, super::scheduled::stream_config(names, settings)).await?;
        if opening == Opening::Admin {
            return Ok(broker);
        }
        ensure_dead_limits(js, &names.dead_stream(), settings).await?;
        for q in &settings.queues {
            broker.consumer(&q.name).await?;
        }
        Ok(broker)
    }

    /// Opens the broker for a client (`publish`, `result`): the task stream and the two
    /// buckets, created only when missing (so a NATS user that may only read their info works
    /// once a node created them; docs/security.md), no consumer.
    pub async fn open_client(
        client: async_nats::Client,
        prefix: &str,
        settings: &TaskSettings,
    ) -> Result<Self, BrokerError> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        let names = NatsNames::new(prefix);
        ensure_stream(
            &js,
            stream::Config {
                name: names.tasks_stream(),
                subjects: vec![format!("{prefix}.tasks.>")],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: settings.dedupe_window,
                num_replicas: settings.replicas,
                ..Default::default()
            },
        )
        .await?;
        let open_bucket = |bucket: String, max_age: Duration| {
            let js = js.clone();
            async move {
                ensure_bucket(&js, &bucket, max_age, settings.replicas).await?;
                js.get_key_value(&bucket)
                    .await
                    .map_err(unavailable(format!("open bucket {bucket}")))
            }
        };
        let kv = open_bucket(names.results_bucket(), settings.result_ttl).await?;
        let unique = open_bucket(names.unique_bucket(), settings.dedupe_window).await?;
        Ok(Self {
            client,
            js,
            stream: names.tasks_stream(),
            names,
            kv,
            unique,
            ack_wait: settings.ack_wait,
            max_eta: settings.max_eta,
            replicas: settings.replicas,
            consumers: Default::default(),
            scheduled: Default::default(),
            rates: Default::default(),
        })
    }

    /// The `<prefix>_rates` bucket: entries of limits idle for a minute expire (`max_age`).
    async fn rates(&self) -> Result<&kv::Store, BrokerError> {
        self.rates
            .get_or_try_init(|| async {
                let bucket = self.names.rates_bucket();
                ensure_bucket(&self.js, &bucket, super::rate::RATE_KEY_IDLE, self.replicas).await?;
                self.js
                    .get_key_value(&bucket)
                    .await
                    .map_err(unavailable(format!("open bucket {bucket}")))
            })
            .await
    }

    /// The names in use.
    pub fn names(&self) -> &NatsNames {
        &self.names
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The version the NATS server announced (`2.9.10`).
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// `nats.replicas`.
    pub(super) fn replicas(&self) -> usize {
        self.replicas
    }

    /// How long a scheduled entry is kept at most.
    pub(super) fn scheduled_max_age(&self) -> Duration {
        super::scheduled::scheduled_max_age(self.max_eta)
    }

    /// The NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// A queue's backlog for metrics: (tasks its consumer has not delivered yet, tasks
    /// delivered and not acknowledged yet), from the consumer's info.
    pub async fn backlog(&self, queue: &str) -> Result<(u64, u64), BrokerError> {
        let mut c = self.consumer(queue).await?;
        let info = c
            .info()
            .await
            .map_err(unavailable(format!("read consumer of queue {queue}")))?;
        Ok((info.num_pending, info.num_ack_pending as u64))
    }

    /// The queue's durable consumer, created when missing.
    async fn consumer(&self, queue: &str) -> Result<consumer::PullConsumer, BrokerError> {
        let mut map = self.consumers.lock().await;
        if let Some(c) = map.get(queue) {
            return Ok(c.clone());
        }
        let name = self.names.consumer(queue);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: self.names.task_subject(queue),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: -1,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(unavailable(format!("get stream {}", self.stream)))?;
        let c = stream
            .get_or_create_consumer::<consumer::pull::Config>(&name, config)
            .await
            .map_err(unavailable(format!("create consumer {name}")))?;
        map.insert(queue.to_owned(), c.clone());
        Ok(c)
    }

    /// One pull request: without `wait`, what is ready now; with it, up to `max` arriving
    /// within `wait`.
    async fn pull(
        &self,
        c: &consumer::PullConsumer,
        queue: &str,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let mut out = Vec::new();
        let mut msgs = match wait {
            None => c.fetch().max_messages(max).messages().await,
            Some(wait) => c.batch().max_messages(max).expires(wait).messages().await,
        }
        .map_err(unavailable(format!("fetch from queue {queue}")))?;
        while let Some(m) = msgs.next().await {
            match m {
                Ok(m) => out.push(delivery(queue, m)),
                Err(e) => {
                    tracing::debug!("fetch: {e}");
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Publishes with `Nats-Msg-Id`, retrying for up to [`PUBLISH_RETRY_FOR`] while NATS
    /// does not answer (the same id makes a retried publish safe).
    pub(super) async fn publish_raw(
        &self,
        subject: String,
        payload: Bytes,
        headers: HeaderMap,
    ) -> Result<jetstream::publish::PublishAck, BrokerError> {
        let deadline = Instant::now() + PUBLISH_RETRY_FOR;
        loop {
            let sent = match self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let e = match sent {
                Ok(ack) => return Ok(ack),
                Err(e) => e,
            };
            if !publish_retryable(&e.kind()) {
                return Err(BrokerError::refused(format!("publish to {subject}"), e));
            }
            if Instant::now() >= deadline {
                let op = format!("publish to {subject} (tried for {PUBLISH_RETRY_FOR:?})");
                return Err(BrokerError::unavailable(op, e));
            }
            tracing::debug!(%subject, "publish failed, retrying: {e}");
            tokio::time::sleep(PUBLISH_RETRY_PAUSE).await;
        }
    }

    fn unique_key(dedupe_id: &str) -> Option<String> {
        let key = dedupe_id.strip_prefix("unique:")?;
        let h = Sha256::digest(key.as_bytes());
        Some(h.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The task id of the message a duplicate publish collided with.
    async fn original_id(&self, msg: &Outgoing, seq: u64) -> Option<String> {
        let Some(key) = Self::unique_key(&msg.dedupe_id) else {
            // Plain and retry dedupe ids carry the task id itself.
            return Some(msg.id.clone());
        };
        // The note first: a client that may not read task messages (docs/security.md's
        // `publisher`) finds the id there once the first publisher noted it.
        if let Ok(Some(v)) = self.unique.get(&key).await {
            return String::from_utf8(v.to_vec()).ok();
        }
        if let Ok(stream) = self.js.get_stream(&self.stream).await {
            if let Ok(m) = stream.get_raw_message(seq).await {
                if let Some(id) = serde_json::from_slice::<Envelope>(&m.payload)
                    .ok()
                    .and_then(|e| e.id)
                {
                    return Some(id);
                }
            }
        }
        // Already consumed: the first publisher noted its id (retry briefly: it may be racing).
        for _ in 0..10 {
            if let Ok(Some(v)) = self.unique.get(&key).await {
                return String::from_utf8(v.to_vec()).ok();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The live record under `id` with its revision.
    async fn entry(&self, id: &str) -> Result<Option<(ResultRecord, u64)>, BrokerError> {
        let entry = self
            .kv
            .entry(id)
            .await
            .map_err(unavailable(format!("read result {id}")))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let rec = serde_json::from_slice(&e.value)
                    .map_err(|err| BrokerError::data(format!("result {id}"), err))?;
                Ok(Some((rec, e.revision)))
            }
            // Deleted or purged: the store does not know the task.
            Some(_) | None => Ok(None),
        }
    }

    /// Writes `record` if the key is still at `revision` (`None`: absent); whether it did.
    async fn put_if(
        &self,
        record: &ResultRecord,
        revision: Option<u64>,
    ) -> Result<bool, BrokerError> {
        let bytes = encode(record)?;
        let op = || format!("write result {}", record.id);
        match revision {
            Some(rev) => match self.kv.update(&record.id, bytes, rev).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) if e.kind() == kv::UpdateErrorKind::InvalidKey => {
                    Err(BrokerError::refused(op(), e))
                }
                Err(e) => Err(BrokerError::unavailable(op(), e)),
            },
            None => match self.kv.create(&record.id, bytes).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) if e.kind() == kv::CreateErrorKind::InvalidKey => {
                    Err(BrokerError::refused(op(), e))
                }
                Err(e) => Err(BrokerError::unavailable(op(), e)),
            },
        }
    }

    /// An event sink publishing to `<prefix>.events.<kind>` (in the background, in order;
    /// dropped when the buffer is full), then handing each event to `next`.
    pub fn event_sink(&self, next: Option<EventSink>) -> EventSink {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(async_nats::Subject, Bytes)>(EVENT_BUFFER);
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some((subject, payload)) = rx.recv().await {
                if let Err(e) = client.publish(subject, payload).await {
                    tracing::debug!("cannot publish event: {e}");
                }
            }
        });
        // Each kind's subject made once (a clone is a reference count), not per event.
        let subjects: Vec<async_nats::Subject> = EventKind::ALL
            .iter()
            .map(|k| self.names.event_subject(k.as_str()).into())
            .collect();
        std::sync::Arc::new(move |e: &TaskEvent| {
            if let Ok(payload) = serde_json::to_vec(e) {
                let subject = subjects[e.kind.index()].clone();
                let _ = tx.try_send((subject, Bytes::from(payload)));
            }
            if let Some(next) = &next {
                next(e);
            }
        })
    }

    /// Dead letters kept, oldest first, of `queue` (all queues: `None`), at most `limit`.
    pub async fn dead_letters(
        &self,
        queue: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>, BrokerError> {
        let name = self.names.dead_stream();
        let mut stream = match self.js.get_stream(&name).await {
            Ok(s) => s,
            // No node created it yet: no letters.
            Err(e) if stream_missing(&e) => return Ok(Vec::new()),
            Err(e) => return Err(BrokerError::unavailable(format!("get stream {name}"), e)),
        };
        let info = stream
            .info()
            .await
            .map_err(unavailable(format!("read stream {name}")))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return Ok(out);
        }
        let want = queue.map(|q| self.names.dead_subject(q));
        let mut seq = first;
        while seq <= last && out.len() < limit {
            if let Ok(m) = stream.get_raw_message(seq).await {
                if want.as_deref().is_none_or(|w| m.subject.as_str() == w) {
                    out.push(StoredDeadLetter::from_raw(&self.names, &m));
                }
            }
            seq += 1;
        }
        Ok(out)
    }

    /// How many dead letters each queue has (queues without any are left out).
    pub async fn dead_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u64>, BrokerError> {
        let name = self.names.dead_stream();
        let stream = match self.js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) if stream_missing(&e) => return Ok(Default::default()),
            Err(e) => return Err(BrokerError::unavailable(format!("get stream {name}"), e)),
        };
        let filter = format!("{}.dead.>", self.names.prefix);
        let op = || format!("list subjects {filter}");
        let listed = stream
            .info_with_subjects(filter.clone())
            .await
            .map_err(unavailable(op()))?;
        let listed: Vec<(String, usize)> = futures_util::TryStreamExt::try_collect(listed)
            .await
            .map_err(unavailable(op()))?;
        let strip = format!("{}.dead.", self.names.prefix);
        Ok(listed
            .into_iter()
            .filter_map(|(s, n)| Some((s.strip_prefix(&strip)?.to_owned(), n as u64)))
            .collect())
    }

    /// Deletes dead letter `seq` without replaying it.
    pub async fn discard(&self, seq: u64) -> Result<(), BrokerError> {
        let name = self.names.dead_stream();
        let stream = self
            .js
            .get_stream(&name)
            .await
            .map_err(unavailable(format!("get stream {name}")))?;
        stream
            .delete_message(seq)
            .await
            .map_err(unavailable(format!("delete dead letter {seq}")))?;
        Ok(())
    }

    /// Sends dead letter `seq` back to its queue (`Nats-Msg-Id` `<id>:replay:<seq>`), forgets
    /// the task's FAILURE record so it can run, and deletes the letter; returns the task id
    /// (or `seq:<n>` for a message without one).
    pub async fn replay(&self, letter: &StoredDeadLetter) -> Result<String, BrokerError> {
        let name = self.names.dead_stream();
        let stream = self
            .js
            .get_stream(&name)
            .await
            .map_err(unavailable(format!("get stream {name}")))?;
        let m = stream
            .get_raw_message(letter.seq)
            .await
            .map_err(unavailable(format!("read dead letter {}", letter.seq)))?;
        let id = letter
            .id
            .clone()
            .unwrap_or_else(|| format!("seq:{}", letter.seq));
        // Only a FAILURE record is the letter's to forget: a letter that reused another task's
        // id (or has an id that is no key, `bad id`) leaves that task's record alone.
        if let Some(task_id) = letter.id.as_deref().filter(|i| super::is_valid_task_id(i)) {
            let failed = self.get_result(task_id).await?;
            if failed.is_some_and(|r| r.state == TaskState::Failure) {
                self.forget_result(task_id).await?;
            }
        }
        self.publish_raw(
            self.names.task_subject(&letter.queue),
            m.payload.clone(),
            letter.replay_headers(),
        )
        .await?;
        stream
            .delete_message(letter.seq)
            .await
            .map_err(unavailable(format!("delete dead letter {}", letter.seq)))?;
        Ok(id)
    }
}

/// A dead letter as `switchyard dead list` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct StoredDeadLetter {
    pub seq: u64,
    pub id: Option<String>,
    pub task: Option<String>,
    pub queue: String,
    pub reason: String,
    pub dead_at: Option<DateTime<Utc>>,
}

impl StoredDeadLetter {
    /// Reads a letter as the dead-letter stream keeps it: the task id and name from its payload
    /// (when it is JSON), the queue from its subject, the reason and time from its headers.
    /// Anything else in the letter (it is hostile: a foreign message's bytes) is ignored.
    pub fn from_raw(names: &NatsNames, m: &jetstream::message::StreamMessage) -> Self {
        let env: Option<serde_json::Value> = serde_json::from_slice(&m.payload).ok();
        let field = |k: &str| {
            env.as_ref()
                .and_then(|v| v.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let header = |k: &str| m.headers.get(k).map(|v| v.as_str().to_owned());
        let queue = m
            .subject
            .as_str()
            .strip_prefix(&format!("{}.dead.", names.prefix))
            .unwrap_or_default()
            .to_owned();
        Self {
            seq: m.sequence,
            id: field("id"),
            task: field("task"),
            queue,
            reason: header(HEADER_REASON).unwrap_or_default(),
            dead_at: header(HEADER_FAILED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// The headers its replay is published with: `Nats-Msg-Id` `<id>:replay:<seq>`, or
    /// `seq:<seq>:replay:<seq>` when the letter's id is not a task id (a `bad id` letter's id
    /// may hold anything, line breaks too, which no header value can).
    pub fn replay_headers(&self) -> HeaderMap {
        let id = self.id.as_deref().filter(|i| super::is_valid_task_id(i));
        let id = id.map_or_else(|| format!("seq:{}", self.seq), str::to_owned);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{id}:replay:{}", self.seq).as_str());
        headers
    }
}

/// A JetStream message of `queue` as a [`Delivery`], acknowledged through NATS.
pub(super) fn delivery(queue: &str, msg: jetstream::Message) -> Delivery {
    let (seq, delivered) = msg
        .info()
        .map(|i| {
            (
                i.stream_sequence,
                i.delivered.clamp(1, u32::MAX as i64) as u32,
            )
        })
        .unwrap_or((0, 1));
    let (msg, acker) = msg.split();
    Delivery::new(
        msg.payload.to_vec(),
        queue.to_owned(),
        seq,
        delivered,
        Box::new(NatsAcker(acker)),
    )
}

struct NatsAcker(jetstream::message::Acker);

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.0
            .ack()
            .await
            .map_err(|e| BrokerError::unavailable_boxed("ack", e))
    }
    async fn nak(&self, delay: Duration) -> Result<(), BrokerError> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.0
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(|e| BrokerError::unavailable_boxed("nak", e))
    }
    async fn progress(&self) -> Result<(), BrokerError> {
        self.0
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| BrokerError::unavailable_boxed("progress", e))
    }
}

#[async_trait]
impl TaskQueue for NatsBroker {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn stream(&self) -> &str {
        &self.stream
    }

    async fn publish(&self, msg: Outgoing) -> Result<PublishOutcome, BrokerError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg.dedupe_id.as_str());
        let ack = self
            .publish_raw(
                self.names.task_subject(&msg.queue),
                Bytes::from(msg.payload.clone()),
                headers,
            )
            .await?;
        if ack.duplicate {
            return Ok(PublishOutcome::Duplicate {
                original_id: self.original_id(&msg, ack.sequence).await,
            });
        }
        if let Some(key) = Self::unique_key(&msg.dedupe_id) {
            if let Err(e) = self.unique.put(&key, Bytes::from(msg.id.clone())).await {
                tracing::warn!(task_id = %msg.id, "cannot note the unique key: {e}");
            }
        }
        Ok(PublishOutcome::Queued)
    }

    async fn fetch(&self, queue: &str, wait: Duration) -> Result<Option<Delivery>, BrokerError> {
        Ok(self.fetch_batch(queue, 1, wait).await?.into_iter().next())
    }

    async fn fetch_batch(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let c = self.consumer(queue).await?;
        let max = max.max(1);
        // The server ends a pull request; a connection lost meanwhile must not leave this
        // waiting forever, so each request is also bounded here.
        let ready = tokio::time::timeout(REQUEST_TIMEOUT, self.pull(&c, queue, max, None)).await;
        let out = match ready {
            Ok(r) => r?,
            Err(_) => {
                let op = format!("fetch from queue {queue} (timed out)");
                return Err(BrokerError::unavailable_because(op));
            }
        };
        if !out.is_empty() || wait.is_zero() {
            return Ok(out);
        }
        // Nothing ready: wait for the first to come.
        match tokio::time::timeout(wait + REQUEST_TIMEOUT, self.pull(&c, queue, 1, Some(wait)))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(BrokerError::unavailable_because(format!(
                "fetch from queue {queue} (timed out)"
            ))),
        }
    }

    async fn feed(&self, queue: &str, slots: usize) -> Result<Option<Box<dyn Feed>>, BrokerError> {
        // The consumer exists (created when missing) before a request names it: looked up
        // afresh, so a feed opened again after an error recreates a consumer someone deleted.
        self.consumers.lock().await.remove(queue);
        self.consumer(queue).await?;
        let feed = PullFeed::open(
            self.js.clone(),
            queue,
            &self.stream,
            &self.names.consumer(queue),
            slots,
        )
        .await?;
        Ok(Some(Box::new(feed)))
    }

    async fn hold(
        &self,
        delivery: &Delivery,
        id: &str,
        task: &str,
        eta: DateTime<Utc>,
    ) -> Result<bool, BrokerError> {
        self.hold_delivery(delivery, id, task, eta).await?;
        Ok(true)
    }

    async fn rate_lease(
        &self,
        key: &str,
        interval_ns: u64,
        want: u32,
        now_ns: u64,
        ahead_ns: u64,
    ) -> Result<super::rate::Grant, BrokerError> {
        use super::rate::{grant, RateRecord};
        let kv = self.rates().await?;
        let op = || format!("lease rate tokens of {key}");
        for _ in 0..CAS_ATTEMPTS {
            let entry = kv.entry(key).await.map_err(unavailable(op()))?;
            let live = entry.filter(|e| e.operation == kv::Operation::Put);
            // A record that does not decode (not ours) counts as none and is overwritten.
            let stored = live
                .as_ref()
                .and_then(|e| serde_json::from_slice::<RateRecord>(&e.value).ok());
            let (granted, next) = grant(stored, interval_ns, want, now_ns, ahead_ns);
            let Some(next) = next else {
                return Ok(granted);
            };
            let bytes =
                Bytes::from(serde_json::to_vec(&next).map_err(|e| BrokerError::data(op(), e))?);
            let written = match &live {
                Some(e) => match kv.update(key, bytes, e.revision).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                    Err(e) => return Err(BrokerError::unavailable(op(), e)),
                },
                None => match kv.create(key, bytes).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(BrokerError::unavailable(op(), e)),
                },
            };
            if written {
                return Ok(granted);
            }
        }
        Err(BrokerError::Contention {
            op: "rate lease",
            id: key.to_owned(),
        })
    }

    async fn defer(
        &self,
        delivery: &Delivery,
        id: &str,
        task: &str,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        // A short wait of a fresh delivery is a delayed nak (one request); a long one, or a
        // delivery deferred before, moves to the schedule store, where deliveries are not
        // counted against tasks.max_deliver.
        if delay < super::broker::HOLD_MIN && delivery.delivered < 3 {
            return delivery.nak(delay).await;
        }
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
        self.hold_delivery(delivery, id, task, Utc::now() + delay)
            .await?;
        delivery.ack().await
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let scheduled = self.purge_scheduled(queue).await?;
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(unavailable(format!("get stream {}", self.stream)))?;
        let res = stream
            .purge()
            .filter(self.names.task_subject(queue))
            .await
            .map_err(unavailable(format!("purge queue {queue}")))?;
        Ok(res.purged + scheduled)
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BrokerError> {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_REASON, letter.reason.as_str());
        headers.insert(
            HEADER_FAILED_AT,
            letter
                .dead_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .as_str(),
        );
        headers.insert(
            HEADER_ORIGINAL_SUBJECT,
            self.names.task_subject(&letter.queue).as_str(),
        );
        self.publish_raw(
            self.names.dead_subject(&letter.queue),
            Bytes::from(letter.payload),
            headers,
        )
        .await
        .map(|_| ())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(BrokerError::unavailable_because(
                "ping (not connected to NATS)",
            ));
        }
        self.js
            .get_stream(&self.stream)
            .await
            .map(|_| ())
            .map_err(unavailable(format!("ping (get stream {})", self.stream)))
    }
}

#[async_trait]
impl ResultStore for NatsBroker {
    async fn put_result(&self, record: &ResultRecord) -> Result<(), BrokerError> {
        let bytes = encode(record)?;
        // Retried like a publish: the worker acknowledges the message after this, so a record
        // lost here would leave the task STARTED for good.
        let deadline = Instant::now() + PUBLISH_RETRY_FOR;
        loop {
            match self.kv.put(&record.id, bytes.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::PutErrorKind::InvalidKey => {
                    return Err(BrokerError::refused(
                        format!("write result {}", record.id),
                        e,
                    ))
                }
                Err(e) if Instant::now() >= deadline => {
                    let op = format!(
                        "write result {} (tried for {PUBLISH_RETRY_FOR:?})",
                        record.id
                    );
                    return Err(BrokerError::unavailable(op, e));
                }
                Err(e) => {
                    tracing::debug!(task_id = %record.id, "result put failed, retrying: {e}");
                    tokio::time::sleep(PUBLISH_RETRY_PAUSE).await;
                }
            }
        }
    }

    async fn get_result(&self, id: &str) -> Result<Option<ResultRecord>, BrokerError> {
        Ok(self.entry(id).await?.map(|(r, _)| r))
    }

    async fn forget_result(&self, id: &str) -> Result<(), BrokerError> {
        self.kv
            .purge(id)
            .await
            .map_err(unavailable(format!("forget result {id}")))
    }

    async fn claim(&self, started: &ResultRecord) -> Result<Claim, BrokerError> {
        // A first delivery has no record yet (publishing writes none): one create claims it
        // in one round trip. A record that exists (a retry, a revocation, a redelivery) makes
        // the create fail, and the read + compare-and-swap below decides.
        if self.put_if(started, None).await? {
            return Ok(Claim::Claimed);
        }
        for _ in 0..CAS_ATTEMPTS {
            let raw = self
                .kv
                .entry(&started.id)
                .await
                .map_err(unavailable(format!("read result {}", started.id)))?;
            let revision = match raw {
                Some(e) if e.operation == kv::Operation::Put => {
                    if let Ok(r) = serde_json::from_slice::<ResultRecord>(&e.value) {
                        if r.state.is_ready() {
                            return Ok(Claim::Refused(r.state));
                        }
                    }
                    Some(e.revision)
                }
                Some(e) => Some(e.revision),
                None => None,
            };
            if self.put_if(started, revision).await? {
                return Ok(Claim::Claimed);
            }
        }
        Err(BrokerError::Contention {
            op: "claim",
            id: started.id.clone(),
        })
    }

    async fn put_unrun(
        &self,
        record: &ResultRecord,
        replace: &(dyn for<'r> Fn(&'r ResultRecord) -> bool + Send + Sync),
    ) -> Result<bool, BrokerError> {
        if self.put_if(record, None).await? {
            return Ok(true);
        }
        for _ in 0..CAS_ATTEMPTS {
            let raw = self
                .kv
                .entry(&record.id)
                .await
                .map_err(unavailable(format!("read result {}", record.id)))?;
            let revision = match raw {
                Some(e) if e.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<ResultRecord>(&e.value) {
                        Ok(r) if replace(&r) => Some(e.revision),
                        _ => return Ok(false),
                    }
                }
                Some(e) => Some(e.revision),
                None => None,
            };
            if self.put_if(record, revision).await? {
                return Ok(true);
            }
        }
        Err(BrokerError::Contention {
            op: "write result",
            id: record.id.clone(),
        })
    }

    async fn revoke(&self, id: &str) -> Result<bool, BrokerError> {
        for _ in 0..CAS_ATTEMPTS {
            let raw = self
                .kv
                .entry(id)
                .await
                .map_err(unavailable(format!("read result {id}")))?;
            let (existing, revision) = match raw {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<ResultRecord>(&e.value).ok(),
                    Some(e.revision),
                ),
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            if !revocable(existing.as_ref()) {
                return Ok(false);
            }
            let record = existing
                .unwrap_or_else(|| ResultRecord::pending(id))
                .revoked(Revocation::Revoked, Utc::now());
            if self.put_if(&record, revision).await? {
                return Ok(true);
            }
        }
        Err(BrokerError::Contention {
            op: "revoke",
            id: id.to_owned(),
        })
    }

    async fn update_result(
        &self,
        id: &str,
        change: &(dyn for<'r> Fn(Option<&'r ResultRecord>) -> Option<ResultRecord> + Send + Sync),
    ) -> Result<Updated, BrokerError> {
        for attempt in 0..super::canvas::CAS_ATTEMPTS {
            let (before, revision) = match self.entry(id).await? {
                Some((rec, rev)) => (Some(rec), Some(rev)),
                None => {
                    // Absent, or deleted/purged (a revision to swap against all the same).
                    let raw = self
                        .kv
                        .entry(id)
                        .await
                        .map_err(unavailable(format!("read result {id}")))?;
                    (None, raw.map(|e| e.revision))
                }
            };
            let Some(after) = change(before.as_ref()) else {
                return Ok(Updated {
                    before,
                    after: None,
                });
            };
            if self.put_if(&after, revision).await? {
                return Ok(Updated {
                    before,
                    after: Some(after),
                });
            }
            tokio::time::sleep(super::canvas::cas_pause(attempt)).await;
        }
        Err(BrokerError::Contention {
            op: "update",
            id: id.to_owned(),
        })
    }
}
