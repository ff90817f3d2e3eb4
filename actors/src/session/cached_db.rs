//! The `cached_db` engine: the `postgres` engine with an in-process read cache, kept coherent
//! across nodes by invalidations `{"id","version"}` on `<prefix>.sessions.invalidate`.
//!
//! Reads hit the cache; a miss loads from Postgres and fills it. Writes go to Postgres first
//! (group-committed like `postgres`), then the writer publishes one invalidation per written
//! session and completes a round trip through the NATS server before answering, so the server
//! has routed the invalidations. A node drops its entries older than an invalidation it
//! receives.
//!
//! Read-your-writes across nodes: before a cache hit a node also completes a round trip
//! through the server (a request nobody answers, which the server rejects at once) and applies
//! every invalidation that arrived before the reply. The server delivers in order, so any
//! write answered before the read began has been applied. Concurrent readers share one round
//! trip (the *sync rounds*: a reader waits for the first round that started after it arrived).
//! The subscription is consumed by the same task that runs the rounds rather than by an actor,
//! because a round must drain the subscription before it completes.
//!
//! While the node is not connected to NATS, and after every disconnect, reconnect or slow-
//! consumer event, it drops its whole cache and reads from Postgres, since it may have missed
//! invalidations. A fill races an invalidation (a load that read version 5 may finish after
//! the invalidation for version 6 arrived), so a fill only lands when no invalidation arrived
//! and no cache drop happened since the load began (two counters), and is skipped otherwise.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::nats_kv::{NatsLink, NATS_TIMEOUT};
use super::{PostgresStore, Record, SaveItem, SaveOutcome, SessionId, SessionStore, StoreError};

const ENGINE: &str = "cached_db";

/// Most sessions a node caches; past it the cache starts over (a crude but safe bound).
const MAX_CACHED: usize = 100_000;
/// Most buffered invalidations one round applies before it answers (the rest follow).
const MAX_DRAIN: usize = 100_000;
/// How often the listener checks that its store still exists.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The invalidation message (`version` null: the session was deleted).
#[derive(Debug, Serialize, Deserialize)]
struct Invalidation {
    id: String,
    version: Option<u64>,
}

/// The cache and its coherence counters, shared with the listener task.
struct Cache {
    entries: DashMap<SessionId, Record>,
    /// Bumped on every whole-cache drop.
    generation: AtomicU64,
    /// Bumped on every invalidation received.
    invalidations: AtomicU64,
    /// The link's change counter when last looked at.
    seen_changes: AtomicU64,
    /// Whether the listener runs (no listener: never cache).
    listening: AtomicBool,
    /// The number of the last sync round started.
    rounds_started: AtomicU64,
    /// Wakes the listener to run a round.
    wake: Notify,
    /// The last round finished and whether it succeeded.
    rounds_done: watch::Receiver<(u64, bool)>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A point in the cache's history; a fill is allowed only if nothing happened since.
#[derive(Clone, Copy, PartialEq)]
struct Mark(u64, u64);

impl Cache {
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
    fn fill(&self, id: &SessionId, record: Record, mark: Mark) {
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
        let Some(id) = SessionId::parse(&inv.id) else {
            return;
        };
        match inv.version {
            Some(v) => {
                self.entries.remove_if(&id, |_, r| r.version < v);
            }
            None => {
                self.entries.remove(&id);
            }
        }
    }

    /// Waits for a sync round that started after this call: afterwards every invalidation the
    /// server routed before the call has been applied. `false` when the round failed.
    async fn synced(&self) -> bool {
        let target = self.rounds_started.load(Ordering::SeqCst) + 1;
        let mut done = self.rounds_done.clone();
        self.wake.notify_one();
        let wait = async {
            loop {
                let (round, ok) = *done.borrow_and_update();
                if round >= target {
                    return ok;
                }
                if done.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(NATS_TIMEOUT * 2, wait)
            .await
            .unwrap_or(false)
    }
}

/// The listener: applies invalidations as they come and runs the sync rounds.
async fn listen_loop(
    cache: Weak<Cache>,
    mut sub: async_nats::Subscriber,
    client: async_nats::Client,
    sync_subject: String,
    done: watch::Sender<(u64, bool)>,
) {
    let mut round = 0u64;
    loop {
        let Some(c) = cache.upgrade() else { break };
        tokio::select! {
            _ = c.wake.notified() => {
                round += 1;
                c.rounds_started.store(round, Ordering::SeqCst);
                let ok = match tokio::time::timeout(
                    NATS_TIMEOUT,
                    client.request(sync_subject.clone(), bytes::Bytes::new()),
                )
                .await
                {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => e.kind() == async_nats::client::RequestErrorKind::NoResponders,
                    Err(_) => false,
                };
                // Everything the server sent before its reply is buffered: apply it.
                for _ in 0..MAX_DRAIN {
                    match sub.next().now_or_never() {
                        Some(Some(msg)) => c.apply(&msg),
                        Some(None) | None => break,
                    }
                }
                let _ = done.send((round, ok));
            }
            msg = sub.next() => match msg {
                Some(msg) => c.apply(&msg),
                None => break,
            },
            _ = tokio::time::sleep(IDLE_CHECK) => {}
        }
    }
    if let Some(c) = cache.upgrade() {
        // No more invalidations: caching would no longer be safe.
        c.listening.store(false, Ordering::SeqCst);
        c.drop_all();
        tracing::warn!("session invalidation listener stopped; cached_db reads go to Postgres");
    }
}

/// The `cached_db` engine.
pub struct CachedDbStore {
    db: Arc<PostgresStore>,
    link: NatsLink,
    subject: String,
    sync_subject: String,
    cache: Arc<Cache>,
    rounds_done: std::sync::Mutex<Option<watch::Sender<(u64, bool)>>>,
}

impl CachedDbStore {
    /// The engine over `db`, publishing invalidations on `<prefix>.sessions.invalidate`. It
    /// caches nothing until [`CachedDbStore::listen`] runs (the CLI never does).
    pub fn new(db: Arc<PostgresStore>, link: NatsLink, prefix: &str) -> Self {
        let (done_tx, done_rx) = watch::channel((0, false));
        let cache = Arc::new(Cache {
            entries: DashMap::new(),
            generation: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            seen_changes: AtomicU64::new(link.changes()),
            listening: AtomicBool::new(false),
            rounds_started: AtomicU64::new(0),
            wake: Notify::new(),
            rounds_done: done_rx,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        });
        Self {
            db,
            link,
            subject: format!("{prefix}.sessions.invalidate"),
            sync_subject: format!("{prefix}.sessions.sync"),
            cache,
            rounds_done: std::sync::Mutex::new(Some(done_tx)),
        }
    }

    /// Subscribes to the invalidations and starts the listener on `arbiter`; from then on
    /// reads are cached.
    pub async fn listen(&self, arbiter: &ArbiterHandle) -> Result<(), StoreError> {
        let unavailable = |message: String| StoreError::Unavailable {
            engine: ENGINE,
            message,
        };
        let Some(done) = self
            .rounds_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let sub = self
            .link
            .client
            .subscribe(self.subject.clone())
            .await
            .map_err(|e| unavailable(format!("cannot subscribe to {}: {e}", self.subject)))?;
        let fut = listen_loop(
            Arc::downgrade(&self.cache),
            sub,
            self.link.client.clone(),
            self.sync_subject.clone(),
            done,
        );
        if !arbiter.spawn(fut) {
            return Err(unavailable("the actor arbiter is not running".into()));
        }
        self.cache.listening.store(true, Ordering::SeqCst);
        // The subscription is in place on the server once a round trip completes.
        if !self.cache.synced().await {
            self.cache.listening.store(false, Ordering::SeqCst);
            return Err(unavailable("no round trip through the NATS server".into()));
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

    /// Whether the cache may be used now; drops it after any connection change.
    fn cache_usable(&self) -> bool {
        let changes = self.link.changes();
        if self.cache.seen_changes.swap(changes, Ordering::SeqCst) != changes {
            self.cache.drop_all();
        }
        let usable = self.cache.listening.load(Ordering::SeqCst) && self.link.is_connected();
        if !usable && !self.cache.entries.is_empty() {
            self.cache.drop_all();
        }
        usable
    }

    /// Publishes invalidations and waits until the server has routed them.
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
        for inv in invalidations {
            let Ok(payload) = serde_json::to_vec(inv) else {
                continue;
            };
            if let Err(e) = self
                .link
                .client
                .publish(self.subject.clone(), payload.into())
                .await
            {
                tracing::warn!("session invalidation not sent: {e}");
            }
        }
        let routed = if self.cache.listening.load(Ordering::SeqCst) {
            self.cache.synced().await
        } else {
            // The CLI has no listener: a round trip of its own.
            match tokio::time::timeout(
                NATS_TIMEOUT,
                self.link
                    .client
                    .request(self.sync_subject.clone(), bytes::Bytes::new()),
            )
            .await
            {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => e.kind() == async_nats::client::RequestErrorKind::NoResponders,
                Err(_) => false,
            }
        };
        if !routed {
            tracing::warn!("session invalidations not confirmed by the NATS server");
        }
    }
}

#[async_trait]
impl SessionStore for CachedDbStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError> {
        let usable = self.cache_usable();
        // A cache hit is only served after a sync round (read-your-writes across nodes),
        // which may have removed the entry.
        if usable && self.cache.entries.contains_key(id) && self.cache.synced().await {
            if let Some(r) = self.cache.entries.get(id) {
                if !r.is_expired() {
                    self.cache.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(r.clone()));
                }
            }
        }
        self.cache.misses.fetch_add(1, Ordering::Relaxed);
        let mark = self.cache.mark();
        let record = self.db.load(id).await?;
        if usable {
            match &record {
                Some(r) => self.cache.fill(id, r.clone(), mark),
                None => {
                    self.cache.entries.remove(id);
                }
            }
        }
        Ok(record)
    }

    async fn save(
        &self,
        id: &SessionId,
        record: &Record,
        expected: Option<u64>,
    ) -> Result<SaveOutcome, StoreError> {
        let item = SaveItem {
            id: id.clone(),
            record: record.clone(),
            expected,
        };
        self.save_batch(std::slice::from_ref(&item))
            .await
            .pop()
            .unwrap_or(Ok(SaveOutcome::Conflict))
    }

    async fn save_batch(&self, items: &[SaveItem]) -> Vec<Result<SaveOutcome, StoreError>> {
        let mark = self.cache.mark();
        let outcomes = self.db.save_batch(items).await;
        let mut invalidations = Vec::new();
        for (item, outcome) in items.iter().zip(&outcomes) {
            match outcome {
                Ok(SaveOutcome::Saved) => invalidations.push(Invalidation {
                    id: item.id.as_str().to_owned(),
                    version: Some(item.record.version),
                }),
                // A conflict means our copy (if any) is stale.
                Ok(SaveOutcome::Conflict) => {
                    self.cache.entries.remove(&item.id);
                }
                Err(_) => {}
            }
        }
        self.announce(&invalidations).await;
        if self.cache_usable() {
            for (item, outcome) in items.iter().zip(&outcomes) {
                if matches!(outcome, Ok(SaveOutcome::Saved)) {
                    self.cache.fill(&item.id, item.record.clone(), mark);
                }
            }
        }
        outcomes
    }

    async fn delete(&self, id: &SessionId) -> Result<(), StoreError> {
        self.db.delete(id).await?;
        self.cache.entries.remove(id);
        self.cache.invalidations.fetch_add(1, Ordering::SeqCst);
        self.announce(&[Invalidation {
            id: id.as_str().to_owned(),
            version: None,
        }])
        .await;
        Ok(())
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        // Cached copies of expired sessions are never served (expiry is checked on read).
        self.db.purge_expired().await
    }

    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionId>, StoreError> {
        self.db.sessions_of(user).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Without NATS the engine still works (uncached); only Postgres is required.
        self.db.ping().await
    }
}
