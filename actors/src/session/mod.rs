//! Sessions: the store trait every engine implements, the engines, and the shard actors.
//!
//! A session is a JSON object kept under a random id. Engines keep [`Record`]s; the
//! [`SessionShards`] route each id to one [`SessionShard`] actor, which owns the writes to the
//! sessions that hash to it and resolves concurrent writes by compare-and-swap on the record's
//! version, re-applying the request's [`Change`]s to the fresh data on a conflict.

mod cached_db;
mod change;
mod codec;
mod file;
mod handle;
mod id;
mod keyed;
mod memcached;
mod memory;
mod nats_kv;
mod postgres;
mod redis;
mod shard;
mod signed;
mod storage;
mod store;

pub use self::redis::{RedisStorage, RedisStore};
pub use cached_db::{CachedDbStore, WARM_UP as CACHED_DB_WARM_UP};
pub use change::{Change, UpdateFn};
pub use codec::{RecordCodec, DEVELOPMENT_SECRET_KEY};
pub use file::{FileStorage, FileStore};
pub use handle::{Expiry, Session, SessionState, EXPIRY_KEY};
pub use id::SessionId;
pub use keyed::KeyedStore;
pub use memcached::{MemcachedStorage, MemcachedStore};
pub use memory::MemoryStore;
pub use nats_kv::{NatsConnect, NatsKvStorage, NatsKvStore, NatsLink};
pub use postgres::{
    bounded, connect_pool, connect_pool_with_timeout, migrate, pg_error, pool_error, PgConn,
    PgManager, PgPool, PostgresStorage, PostgresStore, QUERY_TIMEOUT, STATEMENT_TIMEOUT,
};
pub use shard::{
    DeleteSession, LoadSession, SaveSession, Saved, SessionShard, SessionShards, MAX_BATCH,
};
pub use signed::{CookieSigner, SignedCookieError, SIGNED_COOKIE_MAX_BYTES};
pub use storage::{frame, framed_entry, unframe, version_matches, Entry, Put, Storage};
pub use store::{Record, SaveItem, SaveOutcome, SessionKey, SessionStore, StoreError};

/// The session key holding the logged-in user's name.
pub const AUTH_USER_KEY: &str = "_auth_user";

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The engine's service failed or is unreachable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The serialized data would exceed `sessions.max_size`.
    #[error("session data is {size} bytes, over the limit of {max} bytes (sessions.max_size)")]
    TooLarge { size: usize, max: usize },
    /// A value could not be (de)serialized as the requested type.
    #[error("session value `{key}`: {message}")]
    Value { key: String, message: String },
    /// Concurrent writers kept winning; the write was not applied.
    #[error("session {id} changed concurrently {attempts} times in a row; write not applied")]
    Contention { id: String, attempts: u32 },
    /// The shard actor is gone (the node is shutting down).
    #[error("session shard unavailable: {0}")]
    Mailbox(String),
}

impl SessionError {
    /// Whether the failure is the engine's service being unreachable (answer 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, SessionError::Store(e) if e.is_unavailable())
            || matches!(self, SessionError::Mailbox(_))
    }
}

/// Current UNIX time in seconds.
pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}
