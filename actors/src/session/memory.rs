//! The `memory` engine: a `DashMap` in this process (the embedded default). Expiry is enforced
//! on read and by `purge_expired`; a user → sessions index is kept beside the records.

use std::collections::HashSet;

use async_trait::async_trait;
use dashmap::DashMap;

use super::{now_unix, Record, SaveOutcome, SessionId, SessionKey, SessionStore, StoreError};

/// Sessions in this process's memory; lost on restart.
#[derive(Default)]
pub struct MemoryStore {
    records: DashMap<SessionId, Record>,
    by_user: DashMap<String, HashSet<SessionId>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records are held (expired ones included until read or purged).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The compare-and-swap write (atomic under the record's map entry), then the index.
    fn write(&self, id: &SessionId, record: &Record, expected: Option<u64>) -> SaveOutcome {
        let now = now_unix();
        let mut old_user = None;
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
                    e.insert(record.clone());
                }
                dashmap::Entry::Vacant(e) => {
                    if expected.is_some() {
                        return SaveOutcome::Conflict;
                    }
                    e.insert(record.clone());
                }
            }
        }
        if old_user.as_deref() != record.user() {
            self.unindex(id, old_user.as_deref());
        }
        if let Some(user) = record.user() {
            self.by_user
                .entry(user.to_owned())
                .or_default()
                .insert(id.clone());
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
        Ok(self.write(id, record, expected))
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
        record: &Record,
        expected: Option<u64>,
    ) -> Option<Result<SaveOutcome, StoreError>> {
        Some(Ok(self.write(id, record, expected)))
    }
}
