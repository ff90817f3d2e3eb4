//! The one trait every session engine implements, and what it stores.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{now_unix, SessionId, AUTH_USER_KEY};

/// A stored session: its data, when it expires, and a version for compare-and-swap.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The session's data.
    pub data: Map<String, Value>,
    /// UNIX seconds after which the session no longer exists.
    pub expires_at: i64,
    /// Incremented by every write; a write names the version it read.
    pub version: u64,
    /// UNIX seconds of the last write.
    #[serde(default)]
    pub updated_at: i64,
}

impl Record {
    /// Whether the record has expired at `now` (UNIX seconds).
    pub fn is_expired_at(&self, now: i64) -> bool {
        self.expires_at <= now
    }

    /// Whether the record has expired now.
    pub fn is_expired(&self) -> bool {
        self.is_expired_at(now_unix())
    }

    /// The logged-in user this session belongs to, if any.
    pub fn user(&self) -> Option<&str> {
        self.data.get(AUTH_USER_KEY).and_then(Value::as_str)
    }
}

impl SaveItem {
    /// The write of `record` under `id` expecting `expected`.
    pub fn new(id: &SessionId, record: &Record, expected: Option<u64>) -> Self {
        Self {
            id: id.clone(),
            record: record.clone(),
            expected,
        }
    }
}

/// One save through [`SessionStore::save_batch`], for stores whose batch is the write path.
pub async fn save_via_batch<S: SessionStore + ?Sized>(
    store: &S,
    id: &SessionId,
    record: &Record,
    expected: Option<u64>,
) -> Result<SaveOutcome, StoreError> {
    let item = SaveItem::new(id, record, expected);
    store
        .save_batch(std::slice::from_ref(&item))
        .await
        .pop()
        .unwrap_or(Ok(SaveOutcome::Conflict))
}

/// Where an engine keeps a session: for stored engines `hex(HMAC-SHA256(k, id))` (see
/// [`RecordCodec`](super::RecordCodec)), for in-process ones the id itself. The user index
/// hands out keys, never ids; the shards route by key, so a delete by key and a save by id of
/// one session meet in one shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(String);

impl SessionKey {
    /// A key as the engine spells it.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key as the engine spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A stable hash picking the shard that owns the session.
    pub fn shard_hash(&self) -> u64 {
        // FNV-1a: stable across processes and cheap.
        self.0.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

impl std::fmt::Display for SessionKey {
    /// Only a prefix: enough to tell keys apart in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = self
            .0
            .char_indices()
            .nth(8)
            .map_or(self.0.len(), |(i, _)| i);
        write!(f, "{}…", &self.0[..end])
    }
}

/// The result of a versioned write.
#[derive(Debug, Clone, PartialEq)]
pub enum SaveOutcome {
    /// Written; the record now has this version.
    Saved,
    /// Another writer got there first (or the session vanished); nothing was written.
    Conflict,
}

/// One write of a batch (see [`SessionStore::save_batch`]).
#[derive(Debug, Clone)]
pub struct SaveItem {
    /// The session's id.
    pub id: SessionId,
    /// The record to write (its `version` is the new version).
    pub record: Record,
    /// The version the write expects to replace (`None`: only if no live record exists).
    pub expected: Option<u64>,
}

/// Why an engine failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The service is unreachable or timed out: the request gets a 503, retrying may work.
    #[error("session engine {engine} unavailable: {message}")]
    Unavailable {
        engine: &'static str,
        message: String,
    },
    /// Stored bytes could not be decoded.
    #[error("session engine {engine}: corrupt record: {message}")]
    Corrupt {
        engine: &'static str,
        message: String,
    },
    /// Any other failure.
    #[error("session engine {engine}: {message}")]
    Other {
        engine: &'static str,
        message: String,
    },
}

impl StoreError {
    /// Whether retrying later may succeed (the service is down or slow).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// Where sessions live. Implementations must be safe to call from many tasks at once; the
/// shard actors serialise the writes to any one id within a node, and the version check
/// serialises them across nodes.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The engine's name as in `sessions.engine`.
    fn engine(&self) -> &'static str;

    /// The key session `id` is stored under (the default: the id itself, for in-process
    /// engines).
    fn key(&self, id: &SessionId) -> SessionKey {
        SessionKey::new(id.as_str())
    }

    /// The live record under `id`, or `None` when missing or expired.
    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError>;

    /// Writes `record` (whose `version` is the new version) if the stored version is
    /// `expected` (`None`: only if no live record exists).
    async fn save(
        &self,
        id: &SessionId,
        record: &Record,
        expected: Option<u64>,
    ) -> Result<SaveOutcome, StoreError>;

    /// Writes several records of distinct ids, each with its own version check, answering
    /// per item in order. Engines that can should write them in one round trip and commit
    /// them together (group commit); the default runs the single saves concurrently.
    async fn save_batch(&self, items: &[SaveItem]) -> Vec<Result<SaveOutcome, StoreError>> {
        futures_util::future::join_all(
            items
                .iter()
                .map(|i| self.save(&i.id, &i.record, i.expected)),
        )
        .await
    }

    /// The live record stored under `key` (a key the user index gave).
    async fn load_key(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        match SessionId::parse(key.as_str()) {
            Some(id) => self.load(&id).await,
            None => Ok(None),
        }
    }

    /// Deletes the record under `key` (no error if missing).
    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError>;

    /// Deletes every expired record; returns how many.
    async fn purge_expired(&self) -> Result<u64, StoreError>;

    /// The keys of every live session of `user`.
    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionKey>, StoreError>;

    /// Whether the engine's service answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// A load answered without waiting, for in-process engines: `Some` lets a reader skip
    /// the shard's mailbox (writes always go through it). The default is `None`.
    fn load_now(&self, _id: &SessionId) -> Option<Result<Option<Record>, StoreError>> {
        None
    }

    /// Whether [`SessionStore::save_now`] writes (in-process engines whose write is one atomic
    /// compare-and-swap in memory). The default is `false`: every write goes through a shard.
    fn saves_now(&self) -> bool {
        false
    }

    /// A versioned write done without waiting, where [`SessionStore::saves_now`]: a handler
    /// skips the shard's mailbox when its write goes through at once; a conflict still goes to
    /// the shard, which re-applies the request's changes. A write that went through may take
    /// `record` (it is left as `Record::default()`: no copy of the data is made); one that did
    /// not leaves it as it was. The default is `None`.
    fn save_now(
        &self,
        _id: &SessionId,
        _record: &mut Record,
        _expected: Option<u64>,
    ) -> Option<Result<SaveOutcome, StoreError>> {
        None
    }
}
