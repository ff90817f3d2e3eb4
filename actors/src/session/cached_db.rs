//! The `cached_db` engine: the `postgres` engine with an in-process read cache, kept coherent
//! across nodes by invalidations `{"key","version"}` on `<prefix>.sessions.invalidate`
//! (`key`: the session's storage key, the keyed hash of its id — never the id itself).
//!
//! Reads hit the cache; a miss loads from Postgres and fills it. Writes go to Postgres first
//! (group-committed like `postgres`), then the writer publishes one invalidation per written
//! session, each with a reply subject, and answers only once every live node acknowledged it:
//! each node applies an invalidation (drops its older copy) before it acknowledges. So once a
//! write's response has arrived, no node serves the old data — reads need no round trip.
//!
//! Live nodes: every caching node publishes a heartbeat `{"node"}` on
//! `<prefix>.sessions.nodes` every [`HEARTBEAT`]; a writer waits for the nodes it heard from
//! within [`NODE_TTL`]. A node caches only after a warm-up of [`WARM_UP`] since it (re)joined
//! (so every writer counts it), and only while it hears its own heartbeat (so its messages
//! flow). A node that does not acknowledge within [`NATS_TIMEOUT`] is taken for gone.
//!
//! While the node is not connected to NATS, and after every disconnect, reconnect or
//! slow-consumer event, it drops its whole cache and reads from Postgres, since it may have
//! missed invalidations. A fill races an invalidation (a load that read version 5 may finish
//! after the invalidation for version 6 arrived), so a fill only lands when no invalidation
//! arrived and no cache drop happened since the load began (two counters).
//!
//! Every message is authenticated (SPEC "Trust boundaries"): a header `Switchyard-Auth` holds
//! the hex HMAC-SHA256 of its kind, subject, reply subject and payload under a key derived from
//! `server.secret_key` for this purpose ([`RecordCodec::sign_message`]; the fallbacks' keys
//! verify too). A message without a valid tag is ignored and counted
//! ([`CachedDbStore::rejected`]; the metric `switchyard_sessions_invalidations_rejected_total`):
//! a forged invalidation drops nothing and is not acknowledged, a forged acknowledgement is not
//! the node's, a forged heartbeat adds no node for writers to wait for. An acknowledgement's
//! subject names the writer and the invalidation, so it answers that one only; a heartbeat
//! carries a counter and its sending time, so a replayed one is refused (a counter not above
//! the last one heard from that node, or sent more than [`HEARTBEAT_MAX_AGE`] ago).
//!
//! One task per node consumes the three subscriptions (invalidations, heartbeats, acks) and
//! sends the heartbeats; it is a plain task rather than an actor because the writers wait on
//! it through shared state (the pending acknowledgements), not through messages.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::HeaderMap;
use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::nats_kv::{NatsLink, NATS_TIMEOUT};
use super::store::save_via_batch;
use super::{
    PostgresStore, Record, RecordCodec, SaveItem, SaveOutcome, SessionId, SessionKey, SessionStore,
    StoreError,
};

const ENGINE: &str = "cached_db";

/// Most sessions a node caches; past it the cache starts over (a crude but safe bound).
const MAX_CACHED: usize = 100_000;
/// How often a caching node announces itself.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A node unheard for this long is gone (writers stop waiting for it).
pub const NODE_TTL: Duration = Duration::from_millis(2000);
/// How long a node that (re)joined waits before caching: every writer has heard it by then.
pub const WARM_UP: Duration = Duration::from_millis(1500);
/// How long the CLI listens for heartbeats before it writes (to know whom to wait for).
pub const DISCOVERY: Duration = Duration::from_millis(800);
/// A heartbeat sent longer ago than this (by the sender's clock) is refused as a replay; also
/// the clock difference between nodes this tolerates.
pub const HEARTBEAT_MAX_AGE: Duration = Duration::from_secs(30);
/// The header carrying a message's tag.
const AUTH_HEADER: &str = "Switchyard-Auth";

/// The kinds of message between nodes, as the metric labels them.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Invalidation = 0,
    Ack = 1,
    Heartbeat = 2,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Invalidation, Kind::Ack, Kind::Heartbeat];

    fn label(self) -> &'static str {
        match self {
            Kind::Invalidation => "invalidation",
            Kind::Ack => "ack",
            Kind::Heartbeat => "heartbeat",
        }
    }
}

/// The invalidation message (`version` null: the session was deleted).
#[derive(Debug, Serialize, Deserialize)]
struct Invalidation {
    key: String,
    version: Option<u64>,
}

/// An acknowledgement.
#[derive(Debug, Serialize, Deserialize)]
struct NodeMsg {
    node: String,
}

/// A heartbeat: the node, its count of heartbeats sent, and when (UNIX milliseconds).
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    node: String,
    n: u64,
    at: i64,
}

fn millis_since(start: Instant) -> i64 {
    i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// An invalidation waiting for acknowledgements.
struct Pending {
    waiting: HashSet<String>,
    done: Option<oneshot::Sender<()>>,
}

/// The cache, the live nodes and the pending acknowledgements, shared with the listener.
struct Cache {
    entries: DashMap<SessionKey, Record>,
    /// Bumped on every whole-cache drop.
    generation: AtomicU64,
    /// Bumped on every invalidation received.
    invalidations: AtomicU64,
    /// The link's change counter when last looked at.
    seen_changes: AtomicU64,
    /// Whether the listener runs with caching on.
    listening: AtomicBool,
    /// This node's name on the wire.
    node: String,
    /// The time base of the millisecond fields below.
    epoch: Instant,
    /// No caching before this (ms since `epoch`): warm-up after (re)joining.
    cache_from_ms: AtomicI64,
    /// When this node last heard its own heartbeat (ms since `epoch`; -1: never).
    own_heartbeat_ms: AtomicI64,
    /// Nodes heard from, with when and their heartbeat counter then.
    nodes: Mutex<HashMap<String, (Instant, u64)>>,
    /// Signs and verifies messages.
    codec: RecordCodec,
    /// Messages refused, by [`Kind`].
    rejected: [AtomicU64; 3],
    /// Invalidations sent and not yet acknowledged by everyone, by sequence number.
    pending: Mutex<HashMap<u64, Pending>>,
    next_seq: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A point in the cache's history; a fill is allowed only if nothing happened since.
#[derive(Clone, Copy, PartialEq)]
struct Mark(u64, u64);

impl Cache {
    /// An empty cache of node `node`, not caching yet.
    fn new(node: String, codec: RecordCodec, changes: u64) -> Self {
        Self {
            entries: DashMap::new(),
            generation: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            seen_changes: AtomicU64::new(changes),
            listening: AtomicBool::new(false),
            node,
            epoch: Instant::now(),
            cache_from_ms: AtomicI64::new(i64::MAX),
            own_heartbeat_ms: AtomicI64::new(-1),
            nodes: Mutex::new(HashMap::new()),
            codec,
            rejected: Default::default(),
            pending: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn mark(&self) -> Mark {
        Mark(
            self.generation.load(Ordering::SeqCst),
            self.invalidations.load(Ordering::SeqCst),
        )
    }

    fn drop_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.entries.clear();
    }

    /// Puts `record` in the cache if nothing invalidated it since `mark`.
    fn fill(&self, id: &SessionKey, record: Record, mark: Mark) {
        if self.mark() != mark {
            self.entries.remove(id);
            return;
        }
        if self.entries.len() >= MAX_CACHED {
            self.drop_all();
            return;
        }
        self.entries.insert(id.clone(), record);
        // A drop or invalidation between the check and the insert: undo.
        if self.mark() != mark {
            self.entries.remove(id);
        }
    }

    /// The headers authenticating a message of `kind` on `subject` (with `reply`).
    fn sign(&self, kind: Kind, subject: &str, reply: &str, payload: &[u8]) -> HeaderMap {
        let tag = self.codec.sign_message(&[
            kind.label().as_bytes(),
            subject.as_bytes(),
            reply.as_bytes(),
            payload,
        ]);
        let mut headers = HeaderMap::new();
        headers.insert(AUTH_HEADER, tag.as_str());
        headers
    }

    /// Whether `msg` carries a valid tag for `kind`; counts and logs it when not.
    fn verify(&self, kind: Kind, msg: &async_nats::Message) -> bool {
        let reply = msg.reply.as_ref().map_or("", |r| r.as_str());
        let parts: [&[u8]; 4] = [
            kind.label().as_bytes(),
            msg.subject.as_bytes(),
            reply.as_bytes(),
            &msg.payload,
        ];
        let valid = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(AUTH_HEADER))
            .is_some_and(|tag| self.codec.verify_message(&parts, tag.as_str()));
        if !valid {
            self.reject(
                kind,
                &msg.subject,
                "not authenticated by any configured secret_key",
            );
        }
        valid
    }

    fn reject(&self, kind: Kind, subject: &str, why: &str) {
        self.rejected[kind as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(kind = kind.label(), %subject, "session message ignored: {why}");
    }

    fn apply(&self, msg: &async_nats::Message) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        let inv = match serde_json::from_slice::<Invalidation>(&msg.payload) {
            Ok(inv) => inv,
            Err(e) => {
                tracing::warn!("malformed session invalidation on {}: {e}", msg.subject);
                // Unknown content: be safe.
                self.drop_all();
                return;
            }
        };
        let id = SessionKey::new(inv.key);
        match inv.version {
            Some(v) => {
                self.entries.remove_if(&id, |_, r| r.version < v);
            }
            None => {
                self.entries.remove(&id);
            }
        }
    }

    /// Starts the warm-up again (after joining or any connection change).
    fn rejoin(&self) {
        let from =
            millis_since(self.epoch) + i64::try_from(WARM_UP.as_millis()).unwrap_or(i64::MAX);
        self.cache_from_ms.store(from, Ordering::SeqCst);
    }

    /// Whether this node may serve from its cache now (warm-up over, heartbeats flowing).
    fn may_cache(&self) -> bool {
        let now = millis_since(self.epoch);
        let own = self.own_heartbeat_ms.load(Ordering::SeqCst);
        self.listening.load(Ordering::SeqCst)
            && now >= self.cache_from_ms.load(Ordering::SeqCst)
            && own >= 0
            && now - own < i64::try_from(NODE_TTL.as_millis()).unwrap_or(i64::MAX) / 2
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, u64)>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The nodes heard from within [`NODE_TTL`].
    fn live_nodes(&self) -> HashSet<String> {
        let mut nodes = self.lock_nodes();
        nodes.retain(|_, (seen, _)| seen.elapsed() < NODE_TTL);
        nodes.keys().cloned().collect()
    }

    /// Notes an authenticated heartbeat; false (and nothing noted) for a replayed one.
    fn heard(&self, hb: Heartbeat) -> bool {
        let age = chrono::Utc::now().timestamp_millis().saturating_sub(hb.at);
        if age.unsigned_abs() > HEARTBEAT_MAX_AGE.as_millis() as u64 {
            return false;
        }
        let mut nodes = self.lock_nodes();
        if nodes.get(&hb.node).is_some_and(|(_, last)| hb.n <= *last) {
            return false;
        }
        if hb.node == self.node {
            self.own_heartbeat_ms
                .store(millis_since(self.epoch), Ordering::SeqCst);
        }
        nodes.insert(hb.node, (Instant::now(), hb.n));
        true
    }

    fn acked(&self, seq: u64, node: &str) {
        let mut pending = self.lock_pending();
        let complete = match pending.get_mut(&seq) {
            Some(p) => {
                p.waiting.remove(node);
                p.waiting.is_empty()
            }
            None => false,
        };
        if complete {
            if let Some(done) = pending.remove(&seq).and_then(|mut p| p.done.take()) {
                let _ = done.send(());
            }
        }
    }

    /// Forgets `nodes` (they did not answer in time) and what waits for them.
    fn forget(&self, nodes: &HashSet<String>) {
        self.lock_nodes().retain(|n, _| !nodes.contains(n));
        let mut pending = self.lock_pending();
        let mut complete = Vec::new();
        for (seq, p) in pending.iter_mut() {
            p.waiting.retain(|n| !nodes.contains(n));
            if p.waiting.is_empty() {
                complete.push(*seq);
            }
        }
        for seq in complete {
            if let Some(done) = pending.remove(&seq).and_then(|mut p| p.done.take()) {
                let _ = done.send(());
            }
        }
    }
}

/// The subscriptions a listener consumes.
struct Subscriptions {
    /// `None` for a node that does not cache (the CLI).
    invalidations: Option<async_nats::Subscriber>,
    nodes: async_nats::Subscriber,
    acks: async_nats::Subscriber,
}

/// The listener: applies and acknowledges invalidations, tracks live nodes, collects the
/// acknowledgements of this node's invalidations and (when caching) sends heartbeats.
async fn listen_loop(
    cache: Weak<Cache>,
    mut subs: Subscriptions,
    client: async_nats::Client,
    nodes_subject: String,
) {
    let caching = subs.invalidations.is_some();
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut sent: u64 = 0;
    loop {
        let Some(c) = cache.upgrade() else { break };
        let invalidation = async {
            match subs.invalidations.as_mut() {
                Some(sub) => sub.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = invalidation => match msg {
                Some(msg) if c.verify(Kind::Invalidation, &msg) => {
                    c.apply(&msg);
                    if let Some(reply) = msg.reply {
                        ack(&client, &c, reply).await;
                    }
                }
                Some(_) => {}
                None => break,
            },
            msg = subs.nodes.next() => match msg {
                Some(msg) if c.verify(Kind::Heartbeat, &msg) => {
                    match serde_json::from_slice::<Heartbeat>(&msg.payload) {
                        Ok(hb) => {
                            if !c.heard(hb) {
                                c.reject(Kind::Heartbeat, &msg.subject, "replayed or too old");
                            }
                        }
                        Err(e) => tracing::debug!("malformed heartbeat: {e}"),
                    }
                }
                Some(_) => {}
                None => break,
            },
            msg = subs.acks.next() => match msg {
                Some(msg) if c.verify(Kind::Ack, &msg) => {
                    let seq = msg.subject.rsplit('.').next().and_then(|s| s.parse().ok());
                    match (seq, serde_json::from_slice::<NodeMsg>(&msg.payload)) {
                        (Some(seq), Ok(m)) => c.acked(seq, &m.node),
                        _ => tracing::debug!("malformed acknowledgement on {}", msg.subject),
                    }
                }
                Some(_) => {}
                None => break,
            },
            _ = tick.tick() => {
                if caching {
                    sent += 1;
                    let hb = Heartbeat {
                        node: c.node.clone(),
                        n: sent,
                        at: chrono::Utc::now().timestamp_millis(),
                    };
                    if let Ok(payload) = serde_json::to_vec(&hb) {
                        let headers = c.sign(Kind::Heartbeat, &nodes_subject, "", &payload);
                        let _ = client
                            .publish_with_headers(nodes_subject.clone(), headers, payload.into())
                            .await;
                    }
                }
            }
        }
    }
    if let Some(c) = cache.upgrade() {
        // No more invalidations: caching would no longer be safe.
        c.listening.store(false, Ordering::SeqCst);
        c.drop_all();
        tracing::warn!("session invalidation listener stopped; cached_db reads go to Postgres");
    }
}

async fn ack(client: &async_nats::Client, cache: &Cache, reply: async_nats::Subject) {
    if let Ok(payload) = serde_json::to_vec(&NodeMsg {
        node: cache.node.clone(),
    }) {
        let headers = cache.sign(Kind::Ack, &reply, "", &payload);
        if let Err(e) = client
            .publish_with_headers(reply, headers, payload.into())
            .await
        {
            tracing::debug!("cannot acknowledge an invalidation: {e}");
        }
    }
}

/// The `cached_db` engine.
pub struct CachedDbStore {
    db: Arc<PostgresStore>,
    link: NatsLink,
    subject: String,
    nodes_subject: String,
    inbox: String,
    cache: Arc<Cache>,
}

impl CachedDbStore {
    /// The engine over `db`, publishing invalidations on `<prefix>.sessions.invalidate`. It
    /// caches nothing until [`CachedDbStore::listen`] runs with caching on.
    pub fn new(db: Arc<PostgresStore>, link: NatsLink, prefix: &str) -> Self {
        let node = uuid::Uuid::new_v4().simple().to_string();
        let inbox = format!("{}.{node}", link.client.new_inbox());
        let cache = Arc::new(Cache::new(node, db.codec().clone(), link.changes()));
        Self {
            db,
            link,
            subject: format!("{prefix}.sessions.invalidate"),
            nodes_subject: format!("{prefix}.sessions.nodes"),
            inbox,
            cache,
        }
    }

    /// Starts the listener: on `arbiter` as a caching node (`serve`), or with `None` on the
    /// current runtime as a writer that does not cache (the CLI), which then listens for
    /// [`DISCOVERY`] to learn the live nodes before it returns.
    pub async fn listen(&self, arbiter: Option<&ArbiterHandle>) -> Result<(), StoreError> {
        let unavailable = |message: String| StoreError::Unavailable {
            engine: ENGINE,
            message,
        };
        let client = &self.link.client;
        let subscribe = |subject: String| async move {
            client
                .subscribe(subject.clone())
                .await
                .map_err(|e| unavailable(format!("cannot subscribe to {subject}: {e}")))
        };
        let subs = Subscriptions {
            invalidations: match arbiter {
                Some(_) => Some(subscribe(self.subject.clone()).await?),
                None => None,
            },
            nodes: subscribe(self.nodes_subject.clone()).await?,
            acks: subscribe(format!("{}.*", self.inbox)).await?,
        };
        let fut = listen_loop(
            Arc::downgrade(&self.cache),
            subs,
            self.link.client.clone(),
            self.nodes_subject.clone(),
        );
        match arbiter {
            Some(arbiter) => {
                if !arbiter.spawn(fut) {
                    return Err(unavailable("the actor arbiter is not running".into()));
                }
                self.cache.rejoin();
                self.cache.listening.store(true, Ordering::SeqCst);
            }
            None => {
                tokio::spawn(fut);
                tokio::time::sleep(DISCOVERY).await;
            }
        }
        Ok(())
    }

    /// Cache hits and misses so far.
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.cache.hits.load(Ordering::Relaxed),
            self.cache.misses.load(Ordering::Relaxed),
        )
    }

    /// The kinds of message [`CachedDbStore::rejected`] counts.
    pub const MESSAGE_KINDS: [&'static str; 3] = ["invalidation", "ack", "heartbeat"];

    /// Messages of `kind` (one of [`CachedDbStore::MESSAGE_KINDS`]) ignored so far because
    /// they were not authenticated (or, for heartbeats, replayed).
    pub fn rejected(&self, kind: &str) -> u64 {
        Kind::ALL.iter().find(|k| k.label() == kind).map_or(0, |k| {
            self.cache.rejected[*k as usize].load(Ordering::Relaxed)
        })
    }

    /// Whether the cache may be used now; drops it after any connection change.
    fn cache_usable(&self) -> bool {
        let changes = self.link.changes();
        if self.cache.seen_changes.swap(changes, Ordering::SeqCst) != changes {
            self.cache.drop_all();
            self.cache.rejoin();
        }
        let usable = self.link.is_connected() && self.cache.may_cache();
        if !usable && !self.cache.entries.is_empty() {
            self.cache.drop_all();
        }
        usable
    }

    /// A live cached copy of the session under `key`, when the cache is in use.
    fn hit(&self, key: &SessionKey) -> Option<Option<Record>> {
        if !self.cache_usable() {
            return None;
        }
        let r = self.cache.entries.get(key)?;
        if r.is_expired() {
            return None;
        }
        self.cache.hits.fetch_add(1, Ordering::Relaxed);
        Some(Some(r.clone()))
    }

    /// Publishes invalidations and waits until every live node applied them.
    async fn announce(&self, invalidations: &[Invalidation]) {
        if invalidations.is_empty() {
            return;
        }
        if !self.link.is_connected() {
            tracing::warn!(
                "not connected to NATS: {} session invalidation(s) not sent; nodes that are \
                 connected may serve their cached copy",
                invalidations.len()
            );
            return;
        }
        let nodes = self.cache.live_nodes();
        let mut waits = Vec::new();
        for inv in invalidations {
            let Ok(payload) = serde_json::to_vec(inv) else {
                continue;
            };
            let seq = self.cache.next_seq.fetch_add(1, Ordering::SeqCst);
            if !nodes.is_empty() {
                let (done, wait) = oneshot::channel();
                self.cache.lock_pending().insert(
                    seq,
                    Pending {
                        waiting: nodes.clone(),
                        done: Some(done),
                    },
                );
                waits.push((seq, wait));
            }
            let reply = format!("{}.{seq}", self.inbox);
            let headers = self
                .cache
                .sign(Kind::Invalidation, &self.subject, &reply, &payload);
            if let Err(e) = self
                .link
                .client
                .publish_with_reply_and_headers(
                    self.subject.clone(),
                    reply,
                    headers,
                    payload.into(),
                )
                .await
            {
                tracing::warn!("session invalidation not sent: {e}");
            }
        }
        let seqs: Vec<u64> = waits.iter().map(|(seq, _)| *seq).collect();
        let all = futures_util::future::join_all(waits.into_iter().map(|(_, w)| w));
        if tokio::time::timeout(NATS_TIMEOUT, all).await.is_err() {
            let missing: HashSet<String> = {
                let mut pending = self.cache.lock_pending();
                seqs.iter()
                    .filter_map(|s| pending.remove(s))
                    .flat_map(|p| p.waiting)
                    .collect()
            };
            tracing::warn!(
                "no acknowledgement within {NATS_TIMEOUT:?} from node(s) {missing:?}; taken for gone"
            );
            self.cache.forget(&missing);
        }
    }
}

#[async_trait]
impl SessionStore for CachedDbStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    fn key(&self, id: &SessionId) -> SessionKey {
        self.db.key(id)
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError> {
        let key = self.db.key(id);
        if let Some(hit) = self.hit(&key) {
            return Ok(hit);
        }
        let usable = self.cache_usable();
        self.cache.misses.fetch_add(1, Ordering::Relaxed);
        let mark = self.cache.mark();
        let record = self.db.load(id).await?;
        if usable {
            match &record {
                Some(r) => self.cache.fill(&key, r.clone(), mark),
                None => {
                    self.cache.entries.remove(&key);
                }
            }
        }
        Ok(record)
    }

    async fn load_key(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        self.db.load_key(key).await
    }

    async fn save(
        &self,
        id: &SessionId,
        record: &Record,
        expected: Option<u64>,
    ) -> Result<SaveOutcome, StoreError> {
        save_via_batch(self, id, record, expected).await
    }

    async fn save_batch(&self, items: &[SaveItem]) -> Vec<Result<SaveOutcome, StoreError>> {
        let outcomes = self.db.save_batch(items).await;
        let mut invalidations = Vec::new();
        for (item, outcome) in items.iter().zip(&outcomes) {
            match outcome {
                Ok(SaveOutcome::Saved) => invalidations.push(Invalidation {
                    key: self.db.key(&item.id).as_str().to_owned(),
                    version: Some(item.record.version),
                }),
                // A conflict means our copy (if any) is stale.
                Ok(SaveOutcome::Conflict) => {
                    self.cache.entries.remove(&self.db.key(&item.id));
                }
                Err(_) => {}
            }
        }
        // Every node (this one too) drops its older copy before the writers are answered;
        // the next read fills the cache again. (Filling it here could race a newer write
        // from another node.)
        self.announce(&invalidations).await;
        outcomes
    }

    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        self.db.delete(key).await?;
        self.cache.entries.remove(key);
        self.cache.invalidations.fetch_add(1, Ordering::SeqCst);
        self.announce(&[Invalidation {
            key: key.as_str().to_owned(),
            version: None,
        }])
        .await;
        Ok(())
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        // Cached copies of expired sessions are never served (expiry is checked on read).
        self.db.purge_expired().await
    }

    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionKey>, StoreError> {
        self.db.sessions_of(user).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Without NATS the engine still works (uncached); only Postgres is required.
        self.db.ping().await
    }

    /// A cache hit is answered at once, without the shard's mailbox; a miss (or a cache not in
    /// use) goes through the shard to Postgres.
    fn load_now(&self, id: &SessionId) -> Option<Result<Option<Record>, StoreError>> {
        self.hit(&self.db.key(id)).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(
        subject: &str,
        reply: Option<&str>,
        payload: &str,
        headers: HeaderMap,
    ) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: reply.map(Into::into),
            payload: payload.to_owned().into(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn only_messages_signed_for_their_kind_subject_and_reply_verify() {
        let node = Cache::new("a".into(), RecordCodec::new(false, b"current", &[]), 0);
        let old = Cache::new("b".into(), RecordCodec::new(false, b"old", &[]), 0);
        let rotated = Cache::new(
            "c".into(),
            RecordCodec::new(false, b"current", &[b"old".to_vec()]),
            0,
        );
        let body = r#"{"key":"k","version":3}"#;
        let signed =
            |c: &Cache, kind| c.sign(kind, "p.sessions.invalidate", "r.1", body.as_bytes());
        let msg = |h| message("p.sessions.invalidate", Some("r.1"), body, h);
        assert!(node.verify(Kind::Invalidation, &msg(signed(&node, Kind::Invalidation))));
        assert!(rotated.verify(Kind::Invalidation, &msg(signed(&old, Kind::Invalidation))));
        // Another secret, another kind, another reply subject, another payload, no tag.
        assert!(!node.verify(Kind::Invalidation, &msg(signed(&old, Kind::Invalidation))));
        assert!(!node.verify(Kind::Invalidation, &msg(signed(&node, Kind::Ack))));
        let moved = message(
            "p.sessions.invalidate",
            Some("r.2"),
            body,
            signed(&node, Kind::Invalidation),
        );
        assert!(!node.verify(Kind::Invalidation, &moved));
        let altered = message(
            "p.sessions.invalidate",
            Some("r.1"),
            r#"{"key":"k","version":4}"#,
            signed(&node, Kind::Invalidation),
        );
        assert!(!node.verify(Kind::Invalidation, &altered));
        assert!(!node.verify(Kind::Invalidation, &msg(HeaderMap::new())));
        assert_eq!(
            node.rejected[Kind::Invalidation as usize].load(Ordering::Relaxed),
            5
        );
    }

    #[test]
    fn replayed_and_old_heartbeats_are_refused() {
        let cache = Cache::new("a".into(), RecordCodec::plain(), 0);
        let now = chrono::Utc::now().timestamp_millis();
        let hb = |n, at| Heartbeat {
            node: "b".into(),
            n,
            at,
        };
        assert!(cache.heard(hb(5, now)));
        assert!(!cache.heard(hb(5, now)), "the same heartbeat again");
        assert!(!cache.heard(hb(4, now)), "an older one");
        assert!(cache.heard(hb(6, now)));
        let max_age = HEARTBEAT_MAX_AGE.as_millis() as i64;
        assert!(
            !cache.heard(hb(7, now - max_age - 1000)),
            "sent too long ago"
        );
        assert!(
            !cache.heard(hb(7, now + max_age + 1000)),
            "from too far ahead"
        );
        assert_eq!(cache.live_nodes(), HashSet::from(["b".to_owned()]));
    }
}
