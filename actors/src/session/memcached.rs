//! The `memcached` engine: a [`Storage`] of one item per value that memcached expires itself
//! (the item's exptime is the value's expiry), written with `add` (new keys) and `gets` +
//! `cas` (versioned updates), over a small text-protocol client with a bb8 pool per server,
//! behind the generic [`KeyedStore`]. Why a client of our own: see docs/sessions.md.
//!
//! Items: `<namespace>:s:<keyed hash>`, the value framed (version, expiry, sealed bytes).
//! Memcached is a cache: under memory pressure it may evict sessions (see
//! docs/sessions.md).

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::storage::{frame, framed_entry, unframe, version_matches, Entry, Put, Storage};
use super::{now_unix, KeyedStore, RecordCodec, SaveOutcome, StoreError};

const ENGINE: &str = "memcached";

/// Per-operation timeout: past it the service counts as unavailable.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Connections per server.
const POOL_SIZE: u32 = 16;
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

/// Sessions in memcached: the generic store over [`MemcachedStorage`].
pub type MemcachedStore = KeyedStore<MemcachedStorage>;

/// Framed values (version, expiry, sealed bytes) as memcached items, expired by memcached.
pub struct MemcachedStorage {
    pools: Vec<McPool>,
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
    /// A store over `servers` (`host:port` each); checks that each answers.
    pub async fn connect(
        servers: &[String],
        namespace: &str,
        codec: RecordCodec,
    ) -> Result<Self, StoreError> {
        if servers.is_empty() {
            return Err(protocol("no servers configured"));
        }
        let pools = servers
            .iter()
            .map(|addr| {
                bb8::Pool::builder()
                    .max_size(POOL_SIZE)
                    .connection_timeout(TIMEOUT)
                    .test_on_check_out(false)
                    .retry_connection(false)
                    .build_unchecked(McManager { addr: addr.clone() })
            })
            .collect();
        let storage = MemcachedStorage {
            pools,
            namespace: namespace.to_owned(),
        };
        storage.ping().await?;
        Ok(KeyedStore::new(storage, codec))
    }
}

impl MemcachedStorage {
    fn pool(&self, key: &str) -> &McPool {
        let h = Sha256::digest(key.as_bytes());
        let n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        &self.pools[(n % self.pools.len() as u64) as usize]
    }

    fn item(&self, key: &str) -> String {
        format!("{}:s:{key}", self.namespace)
    }

    async fn gets(&self, item: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let k = item.to_owned();
        with_conn(self.pool(item), move |c| {
            Box::pin(async move { c.gets(&k).await })
        })
        .await
    }

    async fn store(
        &self,
        command: &'static str,
        item: &str,
        exptime: i64,
        data: Vec<u8>,
        cas: Option<u64>,
    ) -> Result<Reply, StoreError> {
        let k = item.to_owned();
        with_conn(self.pool(item), move |c| {
            Box::pin(async move { c.store(command, &k, exptime, &data, cas).await })
        })
        .await
    }
}

#[async_trait]
impl Storage for MemcachedStorage {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .gets(&self.item(key))
            .await?
            .and_then(|(value, _)| framed_entry(&value)))
    }

    async fn put(&self, put: &Put) -> Result<SaveOutcome, StoreError> {
        let item = self.item(&put.key);
        let current = self.gets(&item).await?;
        let stored = current
            .as_ref()
            .and_then(|(value, _)| unframe(value))
            .map(|(v, e, _)| (v, e));
        if !version_matches(stored, put.expected, now_unix()) {
            return Ok(SaveOutcome::Conflict);
        }
        let value = frame(put.version, put.expires_at, &put.bytes);
        let reply = match current {
            Some((_, cas)) => {
                self.store("cas", &item, put.expires_at, value, Some(cas))
                    .await?
            }
            None => {
                self.store("add", &item, put.expires_at, value, None)
                    .await?
            }
        };
        Ok(if reply == Reply::Stored {
            SaveOutcome::Saved
        } else {
            SaveOutcome::Conflict
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let item = self.item(key);
        let k = item.clone();
        with_conn(self.pool(&item), move |c| {
            Box::pin(async move { c.delete(&k).await })
        })
        .await
    }

    async fn purge_expired(&self, _now: i64) -> Result<u64, StoreError> {
        // Memcached expires items itself; nothing is left to delete.
        Ok(0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        for pool in &self.pools {
            with_conn(pool, |c| Box::pin(c.version())).await?;
        }
        Ok(())
    }
}
