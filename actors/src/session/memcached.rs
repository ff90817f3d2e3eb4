//! The `memcached` engine: one item per session that memcached expires itself (the item's
//! exptime is the session's expiry), written with `add` (new sessions) and `cas` (versioned
//! updates), over a small text-protocol client with a bb8 pool per server.
//!
//! Keys: `<namespace>:s:<id>`, and `<namespace>:u:<sha256(user)>` holding the user's session
//! ids as JSON (updated with `gets`/`cas`). Memcached is a cache: under memory pressure it may
//! evict sessions (see docs/sessions.md).

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{Record, RecordCodec, SaveOutcome, SessionId, SessionStore, StoreError};

const ENGINE: &str = "memcached";

/// Per-operation timeout: past it the service counts as unavailable.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Connections per server.
const POOL_SIZE: u32 = 16;
/// Attempts at a read-modify-write of a user's index before giving up on it.
const INDEX_ATTEMPTS: u32 = 16;
/// Largest item this client accepts from a server (memcached's default limit is 1 MiB).
const MAX_ITEM_BYTES: usize = 8 << 20;

fn unavailable(message: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        engine: ENGINE,
        message: message.to_string(),
    }
}

fn protocol(message: impl std::fmt::Display) -> StoreError {
    StoreError::Other {
        engine: ENGINE,
        message: message.to_string(),
    }
}

/// One connection speaking the text protocol.
pub struct McConn {
    io: BufReader<TcpStream>,
    broken: bool,
}

/// What a store command answered.
#[derive(Debug, PartialEq)]
enum Reply {
    Stored,
    NotStored,
    Exists,
    NotFound,
}

impl McConn {
    async fn line(&mut self) -> Result<String, StoreError> {
        let mut line = String::new();
        let n = (&mut self.io)
            .take(4096)
            .read_line(&mut line)
            .await
            .map_err(unavailable)?;
        if n == 0 || !line.ends_with("\r\n") {
            return Err(unavailable("connection closed"));
        }
        line.truncate(line.len() - 2);
        if line == "ERROR" || line.starts_with("CLIENT_ERROR") || line.starts_with("SERVER_ERROR") {
            return Err(protocol(line));
        }
        Ok(line)
    }

    /// `gets key`: the value and its cas unique.
    async fn gets(&mut self, key: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        self.io
            .get_mut()
            .write_all(format!("gets {key}\r\n").as_bytes())
            .await
            .map_err(unavailable)?;
        let header = self.line().await?;
        if header == "END" {
            return Ok(None);
        }
        // VALUE <key> <flags> <bytes> <cas>
        let parts: Vec<&str> = header.split(' ').collect();
        let (Some(&"VALUE"), Some(len), Some(cas)) = (parts.first(), parts.get(3), parts.get(4))
        else {
            return Err(protocol(format!("unexpected reply {header:?}")));
        };
        let len: usize = len.parse().map_err(protocol)?;
        let cas: u64 = cas.parse().map_err(protocol)?;
        if len > MAX_ITEM_BYTES {
            return Err(protocol(format!("item of {len} bytes is too large")));
        }
        let mut data = vec![0u8; len + 2];
        self.io.read_exact(&mut data).await.map_err(unavailable)?;
        data.truncate(len);
        let end = self.line().await?;
        if end != "END" {
            return Err(protocol(format!("unexpected reply {end:?}")));
        }
        Ok(Some((data, cas)))
    }

    /// `add`/`set`/`cas` with `data`.
    async fn store(
        &mut self,
        command: &str,
        key: &str,
        exptime: i64,
        data: &[u8],
        cas: Option<u64>,
    ) -> Result<Reply, StoreError> {
        let mut buf = match cas {
            Some(cas) => format!("{command} {key} 0 {exptime} {} {cas}\r\n", data.len()),
            None => format!("{command} {key} 0 {exptime} {}\r\n", data.len()),
        }
        .into_bytes();
        buf.extend_from_slice(data);
        buf.extend_from_slice(b"\r\n");
        self.io
            .get_mut()
            .write_all(&buf)
            .await
            .map_err(unavailable)?;
        match self.line().await?.as_str() {
            "STORED" => Ok(Reply::Stored),
            "NOT_STORED" => Ok(Reply::NotStored),
            "EXISTS" => Ok(Reply::Exists),
            "NOT_FOUND" => Ok(Reply::NotFound),
            other => Err(protocol(format!("unexpected reply {other:?}"))),
        }
    }

    async fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        self.io
            .get_mut()
            .write_all(format!("delete {key}\r\n").as_bytes())
            .await
            .map_err(unavailable)?;
        match self.line().await?.as_str() {
            "DELETED" | "NOT_FOUND" => Ok(()),
            other => Err(protocol(format!("unexpected reply {other:?}"))),
        }
    }

    async fn version(&mut self) -> Result<(), StoreError> {
        self.io
            .get_mut()
            .write_all(b"version\r\n")
            .await
            .map_err(unavailable)?;
        let line = self.line().await?;
        if line.starts_with("VERSION") {
            Ok(())
        } else {
            Err(protocol(format!("unexpected reply {line:?}")))
        }
    }
}

/// bb8 manager of [`McConn`]s to one server.
pub struct McManager {
    addr: String,
}

impl bb8::ManageConnection for McManager {
    type Connection = McConn;
    type Error = StoreError;

    async fn connect(&self) -> Result<McConn, StoreError> {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| unavailable(format!("no connection to {} within {TIMEOUT:?}", self.addr)))?
            .map_err(|e| unavailable(format!("{}: {e}", self.addr)))?;
        let _ = stream.set_nodelay(true);
        Ok(McConn {
            io: BufReader::new(stream),
            broken: false,
        })
    }

    async fn is_valid(&self, _conn: &mut McConn) -> Result<(), StoreError> {
        Ok(())
    }

    fn has_broken(&self, conn: &mut McConn) -> bool {
        conn.broken
    }
}

type McPool = bb8::Pool<McManager>;

/// Sessions in memcached.
pub struct MemcachedStore {
    pools: Vec<McPool>,
    codec: RecordCodec,
    namespace: String,
}

/// Runs `op` on a pooled connection with a timeout; a failed or timed-out connection is
/// discarded (a half-read reply would poison it).
async fn with_conn<T, F>(pool: &McPool, op: F) -> Result<T, StoreError>
where
    F: for<'c> FnOnce(
        &'c mut McConn,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>,
    >,
{
    let mut conn = pool.get().await.map_err(|e| match e {
        bb8::RunError::User(e) => e,
        bb8::RunError::TimedOut => unavailable(format!("no connection within {TIMEOUT:?}")),
    })?;
    let result = tokio::time::timeout(TIMEOUT, op(&mut conn)).await;
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            conn.broken = true;
            Err(e)
        }
        Err(_) => {
            conn.broken = true;
            Err(unavailable(format!("no answer within {TIMEOUT:?}")))
        }
    }
}

impl MemcachedStore {
    /// A store over `servers` (`host:port` each); checks that the first answers.
    pub async fn connect(
        servers: &[String],
        namespace: &str,
        codec: RecordCodec,
    ) -> Result<Self, StoreError> {
        if servers.is_empty() {
            return Err(protocol("no servers configured"));
        }
        let mut pools = Vec::new();
        for addr in servers {
            let pool = bb8::Pool::builder()
                .max_size(POOL_SIZE)
                .connection_timeout(TIMEOUT)
                .test_on_check_out(false)
                .retry_connection(false)
                .build_unchecked(McManager { addr: addr.clone() });
            pools.push(pool);
        }
        let store = Self {
            pools,
            codec,
            namespace: namespace.to_owned(),
        };
        for pool in &store.pools {
            with_conn(pool, |c| Box::pin(c.version())).await?;
        }
        Ok(store)
    }

    fn pool(&self, key: &str) -> &McPool {
        let h = Sha256::digest(key.as_bytes());
        let n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        &self.pools[(n % self.pools.len() as u64) as usize]
    }

    fn key(&self, id: &SessionId) -> String {
        format!("{}:s:{}", self.namespace, id.as_str())
    }

    fn index_key(&self, user: &str) -> String {
        let h = Sha256::digest(user.as_bytes());
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:u:{hex}", self.namespace)
    }

    async fn gets(&self, key: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let k = key.to_owned();
        with_conn(self.pool(key), move |c| {
            Box::pin(async move { c.gets(&k).await })
        })
        .await
    }

    async fn store(
        &self,
        command: &'static str,
        key: &str,
        exptime: i64,
        data: Vec<u8>,
        cas: Option<u64>,
    ) -> Result<Reply, StoreError> {
        let k = key.to_owned();
        with_conn(self.pool(key), move |c| {
            Box::pin(async move { c.store(command, &k, exptime, &data, cas).await })
        })
        .await
    }

    /// Adds `id` to (or with `remove`, takes it from) `user`'s index.
    async fn update_index(
        &self,
        user: &str,
        id: &SessionId,
        remove: bool,
    ) -> Result<(), StoreError> {
        let key = self.index_key(user);
        for _ in 0..INDEX_ATTEMPTS {
            let current = self.gets(&key).await?;
            let mut ids: Vec<String> = current
                .as_ref()
                .and_then(|(bytes, _)| serde_json::from_slice(bytes).ok())
                .unwrap_or_default();
            let present = ids.iter().any(|i| i == id.as_str());
            if present != remove {
                return Ok(());
            }
            if remove {
                ids.retain(|i| i != id.as_str());
            } else {
                ids.push(id.as_str().to_owned());
            }
            let bytes = serde_json::to_vec(&ids).map_err(protocol)?;
            let outcome = match current {
                Some((_, cas)) => self.store("cas", &key, 0, bytes, Some(cas)).await?,
                None => self.store("add", &key, 0, bytes, None).await?,
            };
            if outcome == Reply::Stored {
                return Ok(());
            }
        }
        Err(unavailable(format!(
            "the session index of a user changed concurrently {INDEX_ATTEMPTS} times"
        )))
    }

    fn decode(&self, id: &SessionId, bytes: &[u8]) -> Option<Record> {
        match self.codec.decode(id, bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(session = %id, "unreadable session, treated as missing: {e}");
                None
            }
        }
    }
}

#[async_trait]
impl SessionStore for MemcachedStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError> {
        Ok(self
            .gets(&self.key(id))
            .await?
            .and_then(|(bytes, _)| self.decode(id, &bytes))
            .filter(|r| !r.is_expired()))
    }

    async fn save(
        &self,
        id: &SessionId,
        record: &Record,
        expected: Option<u64>,
    ) -> Result<SaveOutcome, StoreError> {
        let key = self.key(id);
        let bytes = self.codec.encode(id, record)?;
        let current = self.gets(&key).await?;
        let old = current
            .as_ref()
            .and_then(|(b, cas)| Some((self.decode(id, b)?, *cas)));
        let live = old.as_ref().filter(|(r, _)| !r.is_expired());
        if live.map(|(r, _)| r.version) != expected {
            return Ok(SaveOutcome::Conflict);
        }
        let outcome = match &current {
            Some((_, cas)) => {
                self.store("cas", &key, record.expires_at, bytes, Some(*cas))
                    .await?
            }
            None => {
                self.store("add", &key, record.expires_at, bytes, None)
                    .await?
            }
        };
        if outcome != Reply::Stored {
            return Ok(SaveOutcome::Conflict);
        }
        let old_user = live.and_then(|(r, _)| r.user().map(str::to_owned));
        if let Some(user) = record.user() {
            if old_user.as_deref() != Some(user) {
                self.update_index(user, id, false).await?;
            }
        }
        Ok(SaveOutcome::Saved)
    }

    async fn delete(&self, id: &SessionId) -> Result<(), StoreError> {
        let key = self.key(id);
        let k = key.clone();
        with_conn(self.pool(&key), move |c| {
            Box::pin(async move { c.delete(&k).await })
        })
        .await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        // Memcached expires sessions itself; nothing is left to delete.
        Ok(0)
    }

    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionId>, StoreError> {
        let Some((bytes, _)) = self.gets(&self.index_key(user)).await? else {
            return Ok(Vec::new());
        };
        let ids: Vec<String> = serde_json::from_slice(&bytes).unwrap_or_default();
        let mut live = Vec::new();
        for id in ids.iter().filter_map(|i| SessionId::parse(i)) {
            match self.load(&id).await? {
                Some(r) if r.user() == Some(user) => live.push(id),
                _ => self.update_index(user, &id, true).await?,
            }
        }
        Ok(live)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        for pool in &self.pools {
            with_conn(pool, |c| Box::pin(c.version())).await?;
        }
        Ok(())
    }
}
