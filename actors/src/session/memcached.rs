//! The `memcached` engine: a [`Storage`] of one item per value that memcached expires itself
//! (the item's exptime is the value's expiry), written with the meta protocol of memcached
//! 1.6+ through the `async-memcached` client: `ms … ME` adds a new key, `mg … v c` reads a
//! value with its cas unique and `ms … C<cas>` replaces it only if nothing changed since. A
//! bb8 pool per server, behind the generic [`KeyedStore`].
//!
//! Items: `<namespace>:s:<keyed hash>`, the value framed (version, expiry, sealed bytes).
//! Memcached is a cache: under memory pressure it may evict sessions (see
//! docs/sessions.md).

use std::time::Duration;

use async_memcached::{Client, Error as McError, MetaProtocol, Status};
use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::storage::{frame, framed_entry, unframe, version_matches, Entry, Put, Storage};
use super::{now_unix, KeyedStore, RecordCodec, SaveOutcome, StoreError};

const ENGINE: &str = "memcached";

/// Per-operation timeout: past it the service counts as unavailable.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Connections per server.
const POOL_SIZE: u32 = 16;

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

/// A client error as a store error: lost connections make the service unavailable, anything
/// else is a protocol error.
fn mc_error(e: McError) -> StoreError {
    match e {
        McError::Connect(_) | McError::Io(_) | McError::ConnectionClosed => unavailable(e),
        other => protocol(other),
    }
}

/// What a conditional store answered: stored, or lost to another writer (`EX` for a changed
/// cas, `NS` for an add of an existing key, `NF` for a key gone since it was read).
#[derive(Debug, PartialEq)]
enum Reply {
    Stored,
    Lost,
}

/// bb8 manager of `async-memcached` clients to one server.
pub struct McManager {
    dsn: String,
}

impl bb8::ManageConnection for McManager {
    type Connection = Client;
    type Error = StoreError;

    async fn connect(&self) -> Result<Client, StoreError> {
        tokio::time::timeout(TIMEOUT, Client::new(&self.dsn))
            .await
            .map_err(|_| unavailable(format!("no connection to {} within {TIMEOUT:?}", self.dsn)))?
            .map_err(|e| unavailable(format!("{}: {e}", self.dsn)))
    }

    async fn is_valid(&self, _conn: &mut Client) -> Result<(), StoreError> {
        Ok(())
    }

    /// A client whose operation failed midway (our timeout dropped it, or the server closed)
    /// has closed its connection: it is never handed out again.
    fn has_broken(&self, conn: &mut Client) -> bool {
        conn.is_closed()
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

/// Runs `op` on a pooled connection with a timeout. A timed-out operation is dropped, which
/// closes its connection (a half-read reply would poison it), and bb8 discards it.
async fn with_conn<T, F>(pool: &McPool, op: F) -> Result<T, StoreError>
where
    F: for<'c> FnOnce(
        &'c mut Client,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>,
    >,
{
    let mut conn = pool.get().await.map_err(|e| match e {
        bb8::RunError::User(e) => e,
        bb8::RunError::TimedOut => unavailable(format!("no connection within {TIMEOUT:?}")),
    })?;
    tokio::time::timeout(TIMEOUT, op(&mut conn))
        .await
        .map_err(|_| unavailable(format!("no answer within {TIMEOUT:?}")))?
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
                    .build_unchecked(McManager {
                        dsn: format!("tcp://{addr}"),
                    })
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

    /// `mg <item> v c`: the value and its cas unique.
    async fn gets(&self, item: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let k = item.to_owned();
        with_conn(self.pool(item), move |c| {
            Box::pin(async move {
                let Some(found) = c
                    .meta_get(&k, false, None, Some(&["v", "c"]))
                    .await
                    .map_err(mc_error)?
                else {
                    return Ok(None);
                };
                match (found.data, found.cas) {
                    (Some(data), Some(cas)) => Ok(Some((data, cas))),
                    (None, Some(cas)) => Ok(Some((Vec::new(), cas))),
                    _ => Err(protocol("reply without the value's cas unique")),
                }
            })
        })
        .await
    }

    /// `ms <item> … T<exptime>` with `ME` (add: only if absent) or `C<cas>` (only if
    /// unchanged since the read that gave `cas`).
    async fn store(
        &self,
        item: &str,
        exptime: i64,
        data: Vec<u8>,
        cas: Option<u64>,
    ) -> Result<Reply, StoreError> {
        let k = item.to_owned();
        let ttl = format!("T{}", exptime.max(1));
        let condition = match cas {
            Some(cas) => format!("C{cas}"),
            None => "ME".to_owned(),
        };
        with_conn(self.pool(item), move |c| {
            Box::pin(async move {
                let flags = [ttl.as_str(), condition.as_str()];
                match c
                    .meta_set(&k, data.as_slice(), false, None, Some(&flags))
                    .await
                {
                    Ok(_) => Ok(Reply::Stored),
                    Err(McError::Protocol(
                        Status::Exists | Status::NotStored | Status::NotFound,
                    )) => Ok(Reply::Lost),
                    Err(e) => Err(mc_error(e)),
                }
            })
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
            Some((_, cas)) => self.store(&item, put.expires_at, value, Some(cas)).await?,
            None => self.store(&item, put.expires_at, value, None).await?,
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
            Box::pin(async move {
                match c.meta_delete(&k, false, None, None).await {
                    Ok(_) | Err(McError::Protocol(Status::NotFound)) => Ok(()),
                    Err(e) => Err(mc_error(e)),
                }
            })
        })
        .await
    }

    async fn purge_expired(&self, _now: i64) -> Result<u64, StoreError> {
        // Memcached expires items itself; nothing is left to delete.
        Ok(0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        for pool in &self.pools {
            with_conn(pool, |c| {
                Box::pin(async move { c.version().await.map(drop).map_err(mc_error) })
            })
            .await?;
        }
        Ok(())
    }
}
