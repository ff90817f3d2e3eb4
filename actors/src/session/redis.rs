//! The `redis` engine: one hash per session (`v` version, `d` stored bytes, `u` owner) that
//! Redis expires itself (`EXPIREAT`), written by Lua scripts so the version check and the
//! user → sessions index (`SADD` to a set per user) change atomically with the data.
//!
//! Keys: `<namespace>:session:<id>` and `<namespace>:user:<name>`; the namespace is
//! `nats.prefix` (see docs/sessions.md).

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, RedisError, Script};
use async_trait::async_trait;

use super::{Record, RecordCodec, SaveOutcome, SessionId, SessionStore, StoreError};

const ENGINE: &str = "redis";

/// Connection and response timeout: past it the service counts as unavailable.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Compare-and-swap write. KEYS: session, new owner's index. ARGV: expected version ('' =
/// none), new version, bytes, expires_at, owner ('' = none), id, index prefix.
const SAVE: &str = r"
local cur = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
local old = redis.call('HGET', KEYS[1], 'u')
if old and old ~= '' and old ~= ARGV[5] then
  redis.call('SREM', ARGV[7] .. old, ARGV[6])
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3], 'u', ARGV[5])
redis.call('EXPIREAT', KEYS[1], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('SADD', KEYS[2], ARGV[6])
  local left = tonumber(ARGV[4]) - tonumber(redis.call('TIME')[1])
  if redis.call('TTL', KEYS[2]) < left then redis.call('EXPIREAT', KEYS[2], ARGV[4]) end
end
return 1
";

/// Delete with its index entry. KEYS: session. ARGV: id, index prefix.
const DELETE: &str = r"
local old = redis.call('HGET', KEYS[1], 'u')
redis.call('DEL', KEYS[1])
if old and old ~= '' then redis.call('SREM', ARGV[2] .. old, ARGV[1]) end
return 1
";

/// Sessions in Redis.
pub struct RedisStore {
    conn: ConnectionManager,
    codec: RecordCodec,
    session_prefix: String,
    user_prefix: String,
    save: Script,
    delete: Script,
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
    /// Connects to `url`; keys start with `namespace:`.
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
        Ok(Self {
            conn,
            codec,
            session_prefix: format!("{namespace}:session:"),
            user_prefix: format!("{namespace}:user:"),
            save: Script::new(SAVE),
            delete: Script::new(DELETE),
        })
    }

    fn key(&self, id: &SessionId) -> String {
        format!("{}{}", self.session_prefix, id.as_str())
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError> {
        let mut conn = self.conn.clone();
        let bytes: Option<Vec<u8>> = conn.hget(self.key(id), "d").await.map_err(redis_error)?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        match self.codec.decode(id, &bytes) {
            Ok(r) if !r.is_expired() => Ok(Some(r)),
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::warn!(session = %id, "unreadable session, treated as missing: {e}");
                Ok(None)
            }
        }
    }

    async fn save(
        &self,
        id: &SessionId,
        record: &Record,
        expected: Option<u64>,
    ) -> Result<SaveOutcome, StoreError> {
        let bytes = self.codec.encode(id, record)?;
        let user = record.user().unwrap_or("");
        let mut conn = self.conn.clone();
        let written: i64 = self
            .save
            .key(self.key(id))
            .key(format!("{}{user}", self.user_prefix))
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(record.version.to_string())
            .arg(bytes)
            .arg(record.expires_at)
            .arg(user)
            .arg(id.as_str())
            .arg(&self.user_prefix)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(if written == 1 {
            SaveOutcome::Saved
        } else {
            SaveOutcome::Conflict
        })
    }

    async fn delete(&self, id: &SessionId) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .delete
            .key(self.key(id))
            .arg(id.as_str())
            .arg(&self.user_prefix)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        // Redis expires sessions itself; nothing is left to delete.
        Ok(0)
    }

    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionId>, StoreError> {
        let index = format!("{}{user}", self.user_prefix);
        let mut conn = self.conn.clone();
        let members: Vec<String> = conn.smembers(&index).await.map_err(redis_error)?;
        let ids: Vec<SessionId> = members.iter().filter_map(|m| SessionId::parse(m)).collect();
        if ids.is_empty() {
            return Ok(ids);
        }
        let mut pipe = ::redis::pipe();
        for id in &ids {
            pipe.hget(self.key(id), "u");
        }
        let owners: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        let mut live = Vec::new();
        let mut stale = Vec::new();
        for (id, owner) in ids.into_iter().zip(owners) {
            if owner.as_deref() == Some(user) {
                live.push(id);
            } else {
                stale.push(id.as_str().to_owned());
            }
        }
        if !stale.is_empty() {
            let _: Result<i64, _> = conn.srem(&index, stale).await;
        }
        Ok(live)
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
