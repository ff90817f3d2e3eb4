//! The `redis` engine: a [`Storage`] of one hash per value (`v` version, `d` sealed bytes)
//! that Redis expires itself (`EXPIREAT`), written by a Lua script comparing `v` (one round
//! trip), behind the generic [`KeyedStore`].
//!
//! Keys: `<namespace>:s:<keyed hash>`; the namespace is `nats.prefix` (see
//! docs/sessions.md).

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, RedisError, Script};
use async_trait::async_trait;

use super::storage::{Entry, Put, Storage};
use super::{KeyedStore, RecordCodec, SaveOutcome, StoreError};

const ENGINE: &str = "redis";

/// Connection and response timeout: past it the service counts as unavailable.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Compare-and-swap write. KEYS: the value's key. ARGV: expected version ('' = none), new
/// version, bytes, expires_at.
const PUT: &str = r"
local cur = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3])
redis.call('EXPIREAT', KEYS[1], ARGV[4])
return 1
";

/// Sessions in Redis: the generic store over [`RedisStorage`].
pub type RedisStore = KeyedStore<RedisStorage>;

/// A hash per value (`v` version, `d` sealed bytes) that Redis expires itself.
pub struct RedisStorage {
    conn: ConnectionManager,
    prefix: String,
    put: Script,
}

fn redis_error(e: RedisError) -> StoreError {
    let message = e.to_string();
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        StoreError::Unavailable {
            engine: ENGINE,
            message,
        }
    } else {
        StoreError::Other {
            engine: ENGINE,
            message,
        }
    }
}

impl RedisStore {
    /// Connects to `url`; keys start with `namespace:s:`.
    pub async fn connect(
        url: &str,
        namespace: &str,
        codec: RecordCodec,
    ) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url).map_err(|e| StoreError::Other {
            engine: ENGINE,
            message: format!("invalid URL: {e}"),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(TIMEOUT)
            .set_response_timeout(TIMEOUT)
            .set_number_of_retries(2)
            .set_max_delay(500);
        let conn = tokio::time::timeout(
            TIMEOUT * 2,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Unavailable {
            engine: ENGINE,
            message: format!("no connection within {:?}", TIMEOUT * 2),
        })?
        .map_err(redis_error)?;
        let storage = RedisStorage {
            conn,
            prefix: format!("{namespace}:s:"),
            put: Script::new(PUT),
        };
        Ok(KeyedStore::new(storage, codec))
    }
}

impl RedisStorage {
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

#[async_trait]
impl Storage for RedisStorage {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut conn = self.conn.clone();
        let (version, bytes): (Option<u64>, Option<Vec<u8>>) = ::redis::cmd("HMGET")
            .arg(self.key(key))
            .arg("v")
            .arg("d")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(version
            .zip(bytes)
            .map(|(version, bytes)| Entry { bytes, version }))
    }

    async fn put(&self, put: &Put) -> Result<SaveOutcome, StoreError> {
        let mut conn = self.conn.clone();
        let written: i64 = self
            .put
            .key(self.key(&put.key))
            .arg(put.expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(put.version.to_string())
            .arg(put.bytes.as_slice())
            .arg(put.expires_at)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(if written == 1 {
            SaveOutcome::Saved
        } else {
            SaveOutcome::Conflict
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(self.key(key)).await.map_err(redis_error)?;
        Ok(())
    }

    async fn purge_expired(&self, _now: i64) -> Result<u64, StoreError> {
        // Redis expires values itself; nothing is left to delete.
        Ok(0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = ::redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }
}
