//! The `cached_db` engine: the `postgres` engine with an in-process read cache, kept coherent
//! across nodes by invalidations `{"id","version"}` on `<prefix>.sessions.invalidate`.
//!
//! Reads hit the cache; a miss loads from Postgres and fills it. Writes go to Postgres first
//! (group-committed like `postgres`), then the writer publishes one invalidation per written
//! session and flushes the NATS connection before answering, then updates its own cache. A
//! node drops its entries older than an invalidation it receives. While the node is not
//! connected to NATS, and after every disconnect or reconnect, it drops its whole cache and
//! reads straight from Postgres, since it may have missed invalidations.
//!
//! A fill races an invalidation: a load that read version 5 may finish after the invalidation
//! for version 6 arrived. So a fill only lands when no invalidation arrived and no cache drop
//! happened since the load began (two counters), and otherwise is skipped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use async_trait::async_trait;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::nats_kv::{NatsLink, NATS_TIMEOUT};
use super::{
    PostgresStore, Record, SaveItem, SaveOutcome, SessionId, SessionStore, StoreError,
};

const ENGINE: &str = "cached_db";

/// Most sessions a node caches; past it the cache starts over (a crude but safe bound).
const MAX_CACHED: usize = 100_000;

/// The invalidation message (`version` null: the session was deleted).
#[derive(Debug, Serialize, Deserialize)]
struct Invalidation {
    id: String,
    version: Option<u64>,
}

/// The cache and its coherence counters, shared with the listener actor.
#[derive(Default)]
struct Cache {
    entries: DashMap<SessionId, Record>,
    /// Bumped on every whole-cache drop.
    generation: AtomicU64,
    /// Bumped on every invalidation received.
    invalidations: AtomicU64,
    /// The link's change counter when last looked at.
    seen_changes: AtomicU64,
    /// Whether the invalidation listener runs (no listener: never cache).
    listening: AtomicBool,
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

    fn invalidate(&self, inv: &Invalidation) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
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
}

/// The `cached_db` engine.
pub struct CachedDbStore {
    db: Arc<PostgresStore>,
    link: NatsLink,
    subject: String,
    cache: Arc<Cache>,
}

/// Receives invalidations and applies them to the cache.
struct InvalidationListener {
    cache: Arc<Cache>,
}

impl Actor for InvalidationListener {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // No more invalidations: caching would no longer be safe.
        self.cache.listening.store(false, Ordering::SeqCst);
        self.cache.drop_all();
    }
}

impl StreamHandler<async_nats::Message> for InvalidationListener {
    fn handle(&mut self, msg: async_nats::Message, _ctx: &mut Context<Self>) {
        match serde_json::from_slice::<Invalidation>(&msg.payload) {
            Ok(inv) => self.cache.invalidate(&inv),
            Err(e) => {
                tracing::warn!("malformed session invalidation on {}: {e}", msg.subject);
                // Unknown content: be safe.
                self.cache.drop_all();
            }
        }
    }
}

impl CachedDbStore {
    /// The engine over `db`, publishing invalidations on `subject`. It caches nothing until
    /// [`CachedDbStore::listen`] runs (the CLI never does).
    pub fn new(db: Arc<PostgresStore>, link: NatsLink, subject: String) -> Self {
        let cache = Arc::new(Cache::default());
        cache
            .seen_changes
            .store(link.changes(), Ordering::SeqCst);
        Self {
            db,
            link,
            subject,
            cache,
        }
    }

    /// Subscribes to the invalidations and starts applying them on `arbiter`; from then on
    /// reads are cached.
    pub async fn listen(&self, arbiter: &ArbiterHandle) -> Result<(), StoreError> {
        let sub = self
            .link
            .client
            .subscribe(self.subject.clone())
            .await
            .map_err(|e| StoreError::Unavailable {
                engine: ENGINE,
                message: format!("cannot subscribe to {}: {e}", self.subject),
            })?;
        // The subscription must be in place on the server before anything is cached.
        tokio::time::timeout(NATS_TIMEOUT, self.link.client.flush())
            .await
            .map_err(|_| StoreError::Unavailable {
                engine: ENGINE,
                message: "NATS flush timed out".into(),
            })?
            .map_err(|e| StoreError::Unavailable {
                engine: ENGINE,
                message: e.to_string(),
            })?;
        let cache = self.cache.clone();
        InvalidationListener::start_in_arbiter(arbiter, move |ctx| {
            ctx.add_stream(sub);
            InvalidationListener { cache }
        });
        self.cache.listening.store(true, Ordering::SeqCst);
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

    /// Publishes invalidations and waits until the server has them.
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
        match tokio::time::timeout(NATS_TIMEOUT, self.link.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("session invalidations not flushed: {e}"),
            Err(_) => tracing::warn!("session invalidations not flushed within {NATS_TIMEOUT:?}"),
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
        if usable {
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
