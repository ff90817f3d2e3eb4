//! The `memcached` engine: a [`Storage`] of one item per value that memcached expires itself
//! (the item's TTL is the value's expiry), through the maintained `async-memcached` client's
//! meta commands: `ms … ME` (add) for new keys, `mg … v c` then `ms … C<cas>` for versioned
//! updates, `md` for deletes. A bb8 pool of clients per server, behind the generic
//! [`KeyedStore`]; a conflict is the client's typed `Status::Exists` / `NotStored` /
//! `NotFound`, never a reply's text.
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

/// A client error as a store error: I/O and closed connections are the service being
/// unavailable, anything else (a refused command, a reply that does not parse) is not.
fn store_error(e: McError) -> StoreError {
    match e {
        McError::Connect(_) | McError::Io(_) | McError::ConnectionClosed => unavailable(e),
        other => protocol(other),
    }
}

/// bb8 manager of `async-memcached` clients to one server.
pub struct McManager {
    addr: String,
}

impl bb8::ManageConnection for McManager {
    type Connection = Client;
    type Error = StoreError;

    async fn connect(&self) -> Result<Client, StoreError> {
        tokio::time::timeout(TIMEOUT, Client::new(&self.addr))
            .await
            .map_err(|_| unavailable(format!("no connection to {} within {TIMEOUT:?}", self.addr)))?
            .map_err(|e| unavailable(format!("{}: {e}", self.addr)))
    }

    async fn is_valid(&self, _conn: &mut Client) -> Result<(), StoreError> {
        Ok(())
    }

    fn has_broken(&self, conn: &mut Client) -> bool {
        // An operation that failed or was cut off by the timeout closes its connection.
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

/// Runs `op` on a pooled client with a timeout (an operation cut off closes its connection,
/// which the pool then discards).
async fn with_client<T, F>(pool: &McPool, op: F) -> Result<T, StoreError>
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
    fn pool(&self, item: &str) -> &McPool {
        let h = Sha256::digest(item.as_bytes());
        let n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        &self.pools[(n % self.pools.len() as u64) as usize]
    }

    fn item(&self, key: &str) -> String {
        format!("{}:s:{key}", self.namespace)
    }

    /// The item's value and cas unique (`mg <item> v c`).
    async fn gets(&self, item: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let k = item.to_owned();
        with_client(self.pool(item), move |c| {
            Box::pin(async move {
                let found = c
                    .meta_get(&k, false, None, Some(&["v", "c"]))
                    .await
                    .map_err(store_error)?;
                match found {
                    None => Ok(None),
                    Some(v) => match (v.data, v.cas) {
                        (Some(data), Some(cas)) => Ok(Some((data, cas))),
                        _ => Err(protocol("a meta get answered without value or cas")),
                    },
                }
            })
        })
        .await
    }

    /// `ms <item> <len> T<exptime> (ME | C<cas>)`: whether it was stored (a lost add or cas is
    /// `false`).
    async fn store(
        &self,
        item: &str,
        exptime: i64,
        data: Vec<u8>,
        cas: Option<u64>,
    ) -> Result<bool, StoreError> {
        let k = item.to_owned();
        with_client(self.pool(item), move |c| {
            Box::pin(async move {
                let ttl = format!("T{exptime}");
                let mode = match cas {
                    Some(cas) => format!("C{cas}"),
                    None => "ME".to_owned(),
                };
                let flags = [ttl.as_str(), mode.as_str()];
                match c
                    .meta_set(&k, data.as_slice(), false, None, Some(&flags))
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(McError::Protocol(
                        Status::Exists | Status::NotStored | Status::NotFound,
                    )) => Ok(false),
                    Err(e) => Err(store_error(e)),
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
        let cas = current.map(|(_, cas)| cas);
        Ok(if self.store(&item, put.expires_at, value, cas).await? {
            SaveOutcome::Saved
        } else {
            SaveOutcome::Conflict
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let item = self.item(key);
        let k = item.clone();
        with_client(self.pool(&item), move |c| {
            Box::pin(async move {
                match c.meta_delete(&k, false, None, None).await {
                    Ok(_) | Err(McError::Protocol(Status::NotFound)) => Ok(()),
                    Err(e) => Err(store_error(e)),
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
            with_client(pool, |c| {
                Box::pin(async move { c.version().await.map(drop).map_err(store_error) })
            })
            .await?;
        }
        Ok(())
    }
}
