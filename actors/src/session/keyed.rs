//! The one generic store every stored engine runs behind: [`KeyedStore`] over a
//! [`Storage`]. It owns, once for all engines:
//!
//! - naming: a session lives under `hex(HMAC-SHA256(k, id))`, never under its id;
//! - the codec: every value authenticated (and with `encrypt`, encrypted) and bound to its
//!   key; a value that does not open, or whose version disagrees with the storage's, is a
//!   missing session (logged), never an error page;
//! - expiry (checked inside the authenticated record) and versions;
//! - key rotation: a session not found under the current key is looked up under the keys
//!   of `secret_key_fallbacks` and re-saved under the current one;
//! - the user → sessions index: a value per user under `u` + `hex(HMAC(k, "user:" +
//!   name))`, holding the user name and the storage keys of the user's sessions (never an
//!   id), updated by compare-and-swap like a session, cleaned when read.

use async_trait::async_trait;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::storage::{Entry, Put, Storage};
use super::store::save_via_batch;
use super::{
    now_unix, Record, RecordCodec, SaveItem, SaveOutcome, SessionId, SessionKey, SessionStore,
    StoreError,
};

/// Attempts at a read-modify-write of a user's index before giving up on it.
const INDEX_ATTEMPTS: u32 = 16;
/// Most remembered owners; past it the memory starts over.
const MAX_OWNERS: usize = 100_000;

/// A user's index as stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    user: String,
    keys: Vec<String>,
    /// The latest expiry of a session it indexed: the index lives as long.
    #[serde(default)]
    expires_at: i64,
}

/// Sessions in a [`Storage`], named by keyed hash and authenticated.
pub struct KeyedStore<S> {
    storage: S,
    codec: RecordCodec,
    /// The owner each session had at the version this node last read or wrote: a write that
    /// keeps the owner needs no index update.
    owners: DashMap<String, (u64, Option<String>)>,
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Other {
        engine: "codec",
        message: e.to_string(),
    })
}

impl<S: Storage> KeyedStore<S> {
    /// A store over `storage`, naming and sealing with `codec`.
    pub fn new(storage: S, codec: RecordCodec) -> Self {
        Self {
            storage,
            codec,
            owners: DashMap::new(),
        }
    }

    /// The storage underneath.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The storage, giving up the store.
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// The codec.
    pub fn codec(&self) -> &RecordCodec {
        &self.codec
    }

    fn remember(&self, key: &str, record: &Record) {
        if self.owners.len() >= MAX_OWNERS {
            self.owners.clear();
        }
        self.owners.insert(
            key.to_owned(),
            (record.version, record.user().map(str::to_owned)),
        );
    }

    /// The live record in `entry` stored under `key`; an unreadable one is missing.
    fn open_entry(&self, key: &str, entry: &Entry) -> Option<Record> {
        match self.codec.decode(key, &entry.bytes) {
            Ok(r) if r.version != entry.version => {
                tracing::warn!(key = %SessionKey::new(key), "session version mismatch, treated as missing");
                None
            }
            Ok(r) => Some(r).filter(|r| !r.is_expired()),
            Err(e) => {
                tracing::warn!(key = %SessionKey::new(key), "unreadable session, treated as missing: {e}");
                None
            }
        }
    }

    /// The live record under `key`.
    async fn load_at(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let Some(entry) = self.storage.get(key).await? else {
            self.owners.remove(key);
            return Ok(None);
        };
        let record = self.open_entry(key, &entry);
        match &record {
            Some(r) => self.remember(key, r),
            None => {
                self.owners.remove(key);
            }
        }
        Ok(record)
    }

    /// A session stored under a fallback secret's key: re-saved under `current` and the old
    /// value deleted.
    async fn migrate(&self, id: &SessionId, current: &str) -> Result<Option<Record>, StoreError> {
        for generation in 1..self.codec.generations() {
            let Some(old) = self.codec.session_key(id, generation) else {
                break;
            };
            let Some(record) = self.load_at(&old).await? else {
                continue;
            };
            let item = SaveItem {
                id: id.clone(),
                record: record.clone(),
                expected: None,
            };
            let outcome = self.write(std::slice::from_ref(&item)).await.pop();
            match outcome {
                Some(Ok(SaveOutcome::Saved)) => {
                    self.storage.delete(&old).await?;
                    self.owners.remove(&old);
                    tracing::info!(key = %SessionKey::new(current), "session re-saved under the current secret_key");
                    return Ok(Some(record));
                }
                // Written under the current key meanwhile: that one counts.
                Some(Ok(SaveOutcome::Conflict)) | None => return self.load_at(current).await,
                Some(Err(e)) => return Err(e),
            }
        }
        Ok(None)
    }

    fn put_of(&self, item: &SaveItem) -> Result<Put, StoreError> {
        let key = self.codec.session_key(&item.id, 0).unwrap_or_default();
        let bytes = self.codec.encode(&key, &item.record)?;
        Ok(Put {
            key,
            bytes,
            version: item.record.version,
            expires_at: item.record.expires_at,
            expected: item.expected,
        })
    }

    /// Writes `items`, then indexes the ones whose owner is new.
    async fn write(&self, items: &[SaveItem]) -> Vec<Result<SaveOutcome, StoreError>> {
        let mut puts = Vec::with_capacity(items.len());
        let mut failed = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match self.put_of(item) {
                Ok(p) => puts.push(p),
                Err(e) => failed.push((i, e)),
            }
        }
        let mut written = self.storage.put_batch(&puts).await.into_iter();
        let mut puts = puts.into_iter();
        let mut failed = failed.into_iter().peekable();
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if failed.peek().is_some_and(|(j, _)| *j == i) {
                if let Some((_, e)) = failed.next() {
                    out.push(Err(e));
                }
                continue;
            }
            let (Some(put), Some(result)) = (puts.next(), written.next()) else {
                out.push(Err(StoreError::Other {
                    engine: self.storage.engine(),
                    message: "the storage answered fewer writes than it was given".into(),
                }));
                continue;
            };
            out.push(match result {
                Ok(SaveOutcome::Saved) => self.after_write(&put.key, item).await,
                other => {
                    self.owners.remove(&put.key);
                    other
                }
            });
        }
        out
    }

    /// Indexes a written session under its owner unless the owner is unchanged.
    async fn after_write(&self, key: &str, item: &SaveItem) -> Result<SaveOutcome, StoreError> {
        let record = &item.record;
        if let Some(user) = record.user() {
            let known = self
                .owners
                .get(key)
                .is_some_and(|o| Some(o.0) == item.expected && o.1.as_deref() == Some(user));
            if !known {
                let index = self.codec.user_key(user, 0).unwrap_or_default();
                self.update_index(&index, user, key, false, record.expires_at)
                    .await?;
            }
        }
        self.remember(key, record);
        Ok(SaveOutcome::Saved)
    }

    /// The index stored under `index` and its version.
    async fn read_index(&self, index: &str) -> Result<Option<(Index, u64)>, StoreError> {
        let Some(entry) = self.storage.get(index).await? else {
            return Ok(None);
        };
        let parsed = self
            .codec
            .open(index, &entry.bytes)
            .ok()
            .and_then(|json| serde_json::from_slice::<Index>(&json).ok());
        Ok(Some((parsed.unwrap_or_default(), entry.version)))
    }

    /// Adds `key` to (or with `remove`, takes it from) the index under `index`.
    async fn update_index(
        &self,
        index: &str,
        user: &str,
        key: &str,
        remove: bool,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        for _ in 0..INDEX_ATTEMPTS {
            let current = self.read_index(index).await?;
            let version = current.as_ref().map(|(_, v)| *v);
            let mut ix = current.map(|(ix, _)| ix).unwrap_or_default();
            let present = ix.keys.iter().any(|k| k == key);
            if present != remove {
                return Ok(());
            }
            if remove {
                ix.keys.retain(|k| k != key);
            } else {
                ix.keys.push(key.to_owned());
            }
            ix.user = user.to_owned();
            // The index lives as long as the longest session it has seen (two weeks at least).
            ix.expires_at = ix.expires_at.max(expires_at).max(now_unix() + 86_400 * 14);
            let put = Put {
                key: index.to_owned(),
                bytes: self.codec.seal(index, &to_json(&ix)?)?,
                version: version.map_or(1, |v| v + 1),
                expires_at: ix.expires_at,
                expected: version,
            };
            if self.storage.put(&put).await? == SaveOutcome::Saved {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable {
            engine: self.storage.engine(),
            message: format!(
                "the session index of a user changed concurrently {INDEX_ATTEMPTS} times"
            ),
        })
    }
}

#[async_trait]
impl<S: Storage> SessionStore for KeyedStore<S> {
    fn engine(&self) -> &'static str {
        self.storage.engine()
    }

    fn key(&self, id: &SessionId) -> SessionKey {
        SessionKey::new(self.codec.session_key(id, 0).unwrap_or_default())
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError> {
        let key = self.codec.session_key(id, 0).unwrap_or_default();
        match self.load_at(&key).await? {
            Some(r) => Ok(Some(r)),
            None if self.codec.generations() > 1 => self.migrate(id, &key).await,
            None => Ok(None),
        }
    }

    async fn load_key(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        self.load_at(key.as_str()).await
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
        self.write(items).await
    }

    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        self.owners.remove(key.as_str());
        self.storage.delete(key.as_str()).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.storage.purge_expired(now_unix()).await
    }

    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionKey>, StoreError> {
        let mut live = Vec::new();
        for generation in 0..self.codec.generations() {
            let Some(index) = self.codec.user_key(user, generation) else {
                break;
            };
            let Some((ix, _)) = self.read_index(&index).await? else {
                continue;
            };
            for key in ix.keys {
                match self.load_at(&key).await? {
                    Some(r) if r.user() == Some(user) => live.push(SessionKey::new(key)),
                    _ => self.update_index(&index, user, &key, true, 0).await?,
                }
            }
        }
        Ok(live)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.storage.ping().await
    }
}
