//! The `memory` engine: a `DashMap` in this process (the embedded default). Expiry is enforced
//! on read and by `purge_expired` (which the node runs on a timer); a user → sessions index is
//! kept beside the records. The store holds at most `sessions.memory_max_sessions` records: a
//! write that goes past the cap evicts the soonest-expiring sessions, [`EVICT_FRACTION`] of the
//! cap at once so that the scan this takes is paid once per many writes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use dashmap::DashMap;

use super::{now_unix, Record, SaveOutcome, SessionId, SessionKey, SessionStore, StoreError};

/// The share of the cap one eviction removes (1%: at the default cap of a million, a 10,000
/// session batch per scan).
pub const EVICT_FRACTION: f64 = 0.01;

/// Sessions in this process's memory; lost on restart.
pub struct MemoryStore {
    records: DashMap<SessionId, Record>,
    by_user: DashMap<String, HashSet<SessionId>>,
    max_sessions: usize,
    evicting: std::sync::Mutex<()>,
    evicted: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_limit(usize::MAX)
    }
}

impl MemoryStore {
    /// An empty store without a cap.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store holding at most `max_sessions` records.
    pub fn with_limit(max_sessions: usize) -> Self {
        Self {
            records: DashMap::new(),
            by_user: DashMap::new(),
            max_sessions: max_sessions.max(1),
            evicting: std::sync::Mutex::new(()),
            evicted: AtomicU64::new(0),
        }
    }

    /// Sessions evicted by the cap so far.
    pub fn evicted_total(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Past the cap: removes the soonest-expiring records (expired ones first), a batch at once.
    fn evict(&self) {
        // One evictor at a time; writers meanwhile go on (the cap may be passed briefly).
        let Ok(_guard) = self.evicting.try_lock() else {
            return;
        };
        if self.records.len() <= self.max_sessions {
            return;
        }
        let batch = ((self.max_sessions as f64 * EVICT_FRACTION) as usize).max(1);
        let excess = self.records.len() - self.max_sessions;
        let n = excess + batch.min(self.max_sessions);
        let mut by_expiry: Vec<(i64, SessionId)> = self
            .records
            .iter()
            .map(|r| (r.expires_at, r.key().clone()))
            .collect();
        let n = n.min(by_expiry.len());
        if n == 0 {
            return;
        }
        by_expiry.select_nth_unstable_by_key(n - 1, |(t, _)| *t);
        for (_, id) in by_expiry.into_iter().take(n) {
            if let Some((_, r)) = self.records.remove(&id) {
                self.unindex(&id, r.user());
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        tracing::warn!(
            evicted = n,
            max = self.max_sessions,
            "memory engine full (sessions.memory_max_sessions): evicted the soonest-expiring sessions"
        );
    }

    /// How many records are held (expired ones included until read or purged).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The compare-and-swap write (atomic under the record's map entry), then the index. A
    /// write that goes through takes `record` (no copy of the data is made).
    fn write(&self, id: &SessionId, record: &mut Record, expected: Option<u64>) -> SaveOutcome {
        let now = now_unix();
        let user = record.user().map(str::to_owned);
        let old_user;
        {
            let entry = self.records.entry(id.clone());
            match entry {
                dashmap::Entry::Occupied(mut e) => {
                    let live = !e.get().is_expired_at(now);
                    let current = live.then(|| e.get().version);
                    if current != expected {
                        return SaveOutcome::Conflict;
                    }
                    old_user = e.get().user().map(str::to_owned);
                    e.insert(std::mem::take(record));
                }
                dashmap::Entry::Vacant(e) => {
                    if expected.is_some() {
                        return SaveOutcome::Conflict;
                    }
                    old_user = None;
                    e.insert(std::mem::take(record));
                }
            }
        }
        if self.records.len() > self.max_sessions {
            self.evict();
        }
        if old_user != user {
            self.unindex(id, old_user.as_deref());
        }
        if let Some(user) = user {
            self.by_user.entry(user).or_default().insert(id.clone());
        }
        SaveOutcome::Saved
    }

    fn unindex(&self, id: &SessionId, user: Option<&str>) {
        if let Some(user) = user {
            if let Some(mut ids) = self.by_user.get_mut(user) {
                ids.remove(id);
            }
            self.by_user.remove_if(user, |_, ids| ids.is_empty());
        }
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    fn engine(&self) -> &'static str {
        "memory"
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError> {
        let now = now_unix();
        let expired = match self.records.get(id) {
            None => return Ok(None),
            Some(r) if !r.is_expired_at(now) => return Ok(Some(r.clone())),
            Some(r) => r.user().map(str::to_owned),
        };
        self.records.remove_if(id, |_, r| r.is_expired_at(now));
        self.unindex(id, expired.as_deref());
        Ok(None)
    }

    async fn save(
        &self,
        id: &SessionId,
        record: &Record,
        expected: Option<u64>,
    ) -> Result<SaveOutcome, StoreError> {
        Ok(self.write(id, &mut record.clone(), expected))
    }

    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        let Some(id) = SessionId::parse(key.as_str()) else {
            return Ok(());
        };
        if let Some((_, r)) = self.records.remove(&id) {
            self.unindex(&id, r.user());
        }
        Ok(())
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = now_unix();
        let expired: Vec<(SessionId, Option<String>)> = self
            .records
            .iter()
            .filter(|r| r.is_expired_at(now))
            .map(|r| (r.key().clone(), r.user().map(str::to_owned)))
            .collect();
        let mut n = 0;
        for (id, user) in expired {
            if self
                .records
                .remove_if(&id, |_, r| r.is_expired_at(now))
                .is_some()
            {
                self.unindex(&id, user.as_deref());
                n += 1;
            }
        }
        Ok(n)
    }

    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionKey>, StoreError> {
        let now = now_unix();
        let ids: Vec<SessionId> = self
            .by_user
            .get(user)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        Ok(ids
            .into_iter()
            .filter(|id| {
                self.records
                    .get(id)
                    .is_some_and(|r| !r.is_expired_at(now) && r.user() == Some(user))
            })
            .map(|id| self.key(&id))
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn load_now(&self, id: &SessionId) -> Option<Result<Option<Record>, StoreError>> {
        let now = now_unix();
        match self.records.get(id) {
            None => Some(Ok(None)),
            Some(r) if !r.is_expired_at(now) => Some(Ok(Some(r.clone()))),
            // Expired: let the shard's `load` remove it and its index entry.
            Some(_) => None,
        }
    }

    fn saves_now(&self) -> bool {
        true
    }

    fn save_now(
        &self,
        id: &SessionId,
        record: &mut Record,
        expected: Option<u64>,
    ) -> Option<Result<SaveOutcome, StoreError>> {
        Some(Ok(self.write(id, record, expected)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn record(expires_at: i64) -> Record {
        Record {
            data: Map::new(),
            expires_at,
            version: 1,
            updated_at: 0,
        }
    }

    #[tokio::test]
    async fn the_cap_evicts_the_soonest_expiring_first() {
        let store = MemoryStore::with_limit(100);
        let now = now_unix();
        let ids: Vec<SessionId> = (0..150).map(|_| SessionId::generate()).collect();
        // Later ids expire sooner: the last 50 written are the first to go.
        for (i, id) in ids.iter().enumerate() {
            store
                .save(id, &record(now + 10_000 - i as i64), None)
                .await
                .expect("save");
        }
        assert!(store.len() <= 100, "{}", store.len());
        assert!(store.evicted_total() >= 50);
        for id in &ids[..90] {
            assert!(
                store.load(id).await.expect("load").is_some(),
                "long-lived kept"
            );
        }
        let mut late = 0;
        for id in &ids[100..] {
            late += usize::from(store.load(id).await.expect("load").is_some());
        }
        assert!(
            late <= 1,
            "the soonest-expiring went first ({late} of them kept)"
        );
    }

    #[tokio::test]
    async fn purge_removes_expired_records() {
        let store = MemoryStore::new();
        let now = now_unix();
        store
            .save(&SessionId::generate(), &record(now - 1), None)
            .await
            .expect("save");
        store
            .save(&SessionId::generate(), &record(now + 60), None)
            .await
            .expect("save");
        assert_eq!(store.purge_expired().await.expect("purge"), 1);
        assert_eq!(store.len(), 1);
    }
}
