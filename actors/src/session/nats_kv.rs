//! The `nats_kv` engine: a [`Storage`] in JetStream key-value bucket `<prefix>_sessions`,
//! behind the generic [`KeyedStore`] (keys are keyed hashes, never session ids). A value is
//! framed: version and expiry (a bucket's TTL is one for all keys) in front of the sealed
//! record. Writes are compare-and-swap on the key's revision (`update` at the revision read,
//! 0 for a key never written); a lost check is the typed `WrongLastRevision` error.
//!
//! The bucket's stream is created directly (`KV_<bucket>`, subjects `$KV.<bucket>.>`, one
//! message per subject, rollups allowed, direct get), which works on NATS 2.9 as well as on
//! newer servers, and then opened as a key-value store. Also here: [`NatsLink`], the NATS
//! connection the session engines share, with a counter of connection changes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;

use super::storage::{frame, framed_entry, unframe, version_matches, Entry, Put, Storage};
use super::{now_unix, KeyedStore, RecordCodec, SaveOutcome, StoreError};

const ENGINE: &str = "nats_kv";

/// Request and connect timeout: past it the service counts as unavailable.
pub const NATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Most keys `purge_expired` looks at in one run.
const PURGE_SCAN_LIMIT: usize = 1_000_000;

/// How to reach NATS (the `[nats]` section).
#[derive(Debug, Clone, Default)]
pub struct NatsConnect {
    pub url: String,
    /// User and password (`[nats] user`/`password`); an empty user: none.
    pub user: String,
    pub password: String,
    pub token: String,
    pub creds_file: String,
    pub nkey_seed_file: String,
    pub tls_ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// The connection's name as servers show it.
    pub name: String,
}

/// A NATS connection and a counter bumped on every disconnect, reconnect and dropped message
/// (slow consumer), so holders of
/// state derived from NATS (the `cached_db` cache) can tell that they may have missed messages.
#[derive(Clone)]
pub struct NatsLink {
    pub client: async_nats::Client,
    changes: Arc<AtomicU64>,
}

impl NatsLink {
    /// Connects (failing at once when the server is unreachable); reconnects forever after.
    pub async fn connect(c: &NatsConnect) -> Result<Self, StoreError> {
        let fail = |e: &dyn std::fmt::Display| StoreError::Unavailable {
            engine: "nats",
            message: e.to_string(),
        };
        let mut opts = if c.creds_file.is_empty() {
            async_nats::ConnectOptions::new()
        } else {
            async_nats::ConnectOptions::with_credentials_file(&c.creds_file)
                .await
                .map_err(|e| fail(&format!("{}: {e}", c.creds_file)))?
        };
        if !c.token.is_empty() {
            opts = opts.token(c.token.clone());
        }
        if !c.user.is_empty() {
            opts = opts.user_and_password(c.user.clone(), c.password.clone());
            // Replies to this connection arrive on `_INBOX_<user>.…`, so a server can let each
            // user subscribe to its own replies only (docs/security.md).
            if c.user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                opts = opts.custom_inbox_prefix(format!("_INBOX_{}", c.user));
            }
        }
        if !c.nkey_seed_file.is_empty() {
            let seed = std::fs::read_to_string(&c.nkey_seed_file)
                .map_err(|e| fail(&format!("{}: {e}", c.nkey_seed_file)))?;
            opts = opts.nkey(seed.trim().to_owned());
        }
        if !c.tls_ca_file.is_empty() {
            opts = opts
                .add_root_certificates(PathBuf::from(&c.tls_ca_file))
                .require_tls(true);
        }
        if !c.tls_cert_file.is_empty() && !c.tls_key_file.is_empty() {
            opts = opts.add_client_certificate(
                PathBuf::from(&c.tls_cert_file),
                PathBuf::from(&c.tls_key_file),
            );
        }
        let changes = Arc::new(AtomicU64::new(0));
        let counter = changes.clone();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = opts
            .name(if c.name.is_empty() {
                "switchyard"
            } else {
                &c.name
            })
            .connection_timeout(NATS_TIMEOUT)
            .request_timeout(Some(NATS_TIMEOUT))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                (Duration::from_millis(50) * attempts.min(100) as u32).min(MAX_RECONNECT_DELAY)
            })
            .event_callback(move |event| {
                let counter = counter.clone();
                let down = down.clone();
                async move {
                    let counts = match &event {
                        async_nats::Event::Disconnected => {
                            down.store(true, Ordering::SeqCst);
                            true
                        }
                        // The first connect is not a change; a reconnect is.
                        async_nats::Event::Connected => down.swap(false, Ordering::SeqCst),
                        // Messages were dropped.
                        async_nats::Event::SlowConsumer(_) => true,
                        _ => false,
                    };
                    if counts {
                        tracing::info!("nats: {event}");
                        counter.fetch_add(1, Ordering::SeqCst);
                    } else {
                        tracing::debug!("nats: {event}");
                    }
                }
            })
            .connect(server_list(&c.url))
            .await
            .map_err(|e| fail(&e))?;
        Ok(Self { client, changes })
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// How many times the connection went down or came back so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// `Unavailable` unless connected (requests would only queue up until the timeout).
    pub fn require_connected(&self, engine: &'static str) -> Result<(), StoreError> {
        if self.is_connected() {
            Ok(())
        } else {
            Err(StoreError::Unavailable {
                engine,
                message: "not connected to NATS".into(),
            })
        }
    }
}

/// `nats.url` as the servers to connect to: a comma-separated list (a NATS cluster; the client
/// also learns the cluster's other servers from them).
fn server_list(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        engine: ENGINE,
        message: e.to_string(),
    }
}

/// Most remembered revisions; past it the memory starts over.
const MAX_REVISIONS: usize = 100_000;

/// Sessions in a NATS JetStream key-value bucket: the generic store over [`NatsKvStorage`].
pub type NatsKvStore = KeyedStore<NatsKvStorage>;

/// Framed values (version, expiry, sealed bytes) in a JetStream key-value bucket, written by
/// compare-and-swap on the key's revision.
pub struct NatsKvStorage {
    link: NatsLink,
    kv: kv::Store,
    /// The key revision each value had when this node last read or wrote it, with its
    /// version and expiry then: a write expecting that version goes straight to `update` at
    /// that revision (the revision check proves nothing changed), saving a read.
    revisions: DashMap<String, Seen>,
}

/// What this node last saw of a key.
#[derive(Clone, Copy)]
struct Seen {
    version: u64,
    expires_at: i64,
    revision: u64,
}

/// Creates the bucket's stream when missing, in a form NATS 2.9 understands.
async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<(), StoreError> {
    crate::jetstream::ensure_kv_stream(js, bucket, Duration::ZERO, true, replicas)
        .await
        .map_err(unavailable)
}

impl NatsKvStore {
    /// Opens (creating when missing, with `replicas` replicas) bucket `bucket` over `link`.
    pub async fn open(
        link: NatsLink,
        bucket: &str,
        codec: RecordCodec,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        let mut js = jetstream::new(link.client.clone());
        js.set_timeout(NATS_TIMEOUT);
        ensure_bucket(&js, bucket, replicas).await?;
        let kv = js
            .get_key_value(bucket)
            .await
            .map_err(|e| unavailable(format!("cannot open bucket {bucket}: {e}")))?;
        let storage = NatsKvStorage {
            link,
            kv,
            revisions: DashMap::new(),
        };
        Ok(KeyedStore::new(storage, codec))
    }

    /// The key-value store (benchmarks compare against it).
    pub fn kv(&self) -> &kv::Store {
        &self.storage().kv
    }
}

impl NatsKvStorage {
    fn remember(&self, key: &str, seen: Seen) {
        if self.revisions.len() >= MAX_REVISIONS {
            self.revisions.clear();
        }
        self.revisions.insert(key.to_owned(), seen);
    }

    /// The latest entry under `key`, deleted and purged ones included.
    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, StoreError> {
        self.link.require_connected(ENGINE)?;
        self.kv.entry(key).await.map_err(unavailable)
    }

    /// Writes `value` under `key` if its revision is still `revision` (0: never written):
    /// the new revision, or `None` when another writer got there first.
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.link.require_connected(ENGINE)?;
        match self.kv.update(key, value, revision).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// A live put's framed value's version and expiry.
fn framed(entry: &kv::Entry) -> Option<(u64, i64)> {
    if entry.operation != kv::Operation::Put {
        return None;
    }
    unframe(&entry.value).map(|(v, e, _)| (v, e))
}

#[async_trait]
impl Storage for NatsKvStorage {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let Some(entry) = self.entry(key).await? else {
            self.revisions.remove(key);
            return Ok(None);
        };
        match framed(&entry) {
            Some((version, expires_at)) => self.remember(
                key,
                Seen {
                    version,
                    expires_at,
                    revision: entry.revision,
                },
            ),
            None => {
                self.revisions.remove(key);
            }
        }
        Ok(framed_entry(&entry.value).filter(|_| entry.operation == kv::Operation::Put))
    }

    async fn put(&self, put: &Put) -> Result<SaveOutcome, StoreError> {
        let now = now_unix();
        let seen = self.revisions.get(&put.key).map(|s| *s);
        // The revision this node saw for the expected version: the revision check alone
        // proves the version (nothing was written since), so no read is needed.
        let revision = match (put.expected, seen) {
            (Some(v), Some(seen)) if seen.version == v && seen.expires_at > now => seen.revision,
            _ => {
                let current = self.entry(&put.key).await?;
                let stored = current.as_ref().and_then(framed);
                if !version_matches(stored, put.expected, now) {
                    return Ok(SaveOutcome::Conflict);
                }
                // An expired, deleted or unreadable value is replaced at its revision.
                current.map_or(0, |e| e.revision)
            }
        };
        let value = frame(put.version, put.expires_at, &put.bytes);
        let Some(revision) = self.update(&put.key, value.into(), revision).await? else {
            self.revisions.remove(&put.key);
            return Ok(SaveOutcome::Conflict);
        };
        self.remember(
            &put.key,
            Seen {
                version: put.version,
                expires_at: put.expires_at,
                revision,
            },
        );
        Ok(SaveOutcome::Saved)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.link.require_connected(ENGINE)?;
        self.revisions.remove(key);
        self.kv.delete(key).await.map_err(unavailable)
    }

    async fn purge_expired(&self, now: i64) -> Result<u64, StoreError> {
        self.link.require_connected(ENGINE)?;
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(unavailable)?
            .take(PURGE_SCAN_LIMIT)
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        let mut n = 0;
        for key in keys {
            let Some(entry) = self.entry(&key).await? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            if unframe(&entry.value).is_none_or(|(_, expires_at, _)| expires_at <= now) {
                self.kv.purge(&key).await.map_err(unavailable)?;
                self.revisions.remove(&key);
                n += 1;
            }
        }
        Ok(n)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.link.require_connected(ENGINE)?;
        self.kv.status().await.map(|_| ()).map_err(unavailable)
    }
}
