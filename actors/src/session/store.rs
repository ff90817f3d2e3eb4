//! The one trait every session engine implements, and what it stores.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{now_unix, SessionId, AUTH_USER_KEY};

/// A stored session: its data, when it expires, and a version for compare-and-swap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

    /// Deletes the record under `id` (no error if missing).
    async fn delete(&self, id: &SessionId) -> Result<(), StoreError>;

    /// Deletes every expired record; returns how many.
    async fn purge_expired(&self) -> Result<u64, StoreError>;

    /// The ids of every live session of `user`.
    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionId>, StoreError>;

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
    /// the shard, which re-applies the request's changes. The default is `None`.
    fn save_now(
        &self,
        _id: &SessionId,
        _record: &Record,
        _expected: Option<u64>,
    ) -> Option<Result<SaveOutcome, StoreError>> {
        None
    }
}
