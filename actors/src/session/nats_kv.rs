//! The `nats_kv` engine: JetStream key-value bucket `<prefix>_sessions`, key = session id,
//! value = the stored record (expiry inside it, checked on read, since a bucket's TTL is one
//! for all keys). Writes are compare-and-swap on the key's revision (`create` for new
//! sessions, `update` with the revision read). The user index is a key per user
//! (`u.<sha256(user)>`, a JSON list of ids) updated the same way.
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
use sha2::{Digest, Sha256};

use super::{now_unix, Record, RecordCodec, SaveOutcome, SessionId, SessionStore, StoreError};

const ENGINE: &str = "nats_kv";

/// Request and connect timeout: past it the service counts as unavailable.
pub const NATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Attempts at a read-modify-write of a user's index before giving up on it.
const INDEX_ATTEMPTS: u32 = 16;
/// Most keys `purge_expired` looks at in one run.
const PURGE_SCAN_LIMIT: usize = 1_000_000;

/// How to reach NATS (the `[nats]` section).
#[derive(Debug, Clone, Default)]
pub struct NatsConnect {
    pub url: String,
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
            .connect(c.url.as_str())
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

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        engine: ENGINE,
        message: e.to_string(),
    }
}

/// Most remembered revisions; past it the memory starts over.
const MAX_REVISIONS: usize = 100_000;

/// Sessions in a NATS JetStream key-value bucket.
pub struct NatsKvStore {
    link: NatsLink,
    kv: kv::Store,
    codec: RecordCodec,
    /// The key revision each session had when this node last read or wrote it, with the
    /// record's version and owner then: a write expecting that version goes straight to
    /// `update` at that revision (the revision check proves nothing changed), saving a read.
    revisions: DashMap<SessionId, Seen>,
}

/// What this node last saw of a session.
#[derive(Clone)]
struct Seen {
    version: u64,
    expires_at: i64,
    revision: u64,
    user: Option<String>,
}

/// Creates the bucket's stream when missing, in a form NATS 2.9 understands.
async fn ensure_bucket(js: &jetstream::Context, bucket: &str) -> Result<(), StoreError> {
    crate::jetstream::ensure_kv_stream(js, bucket, std::time::Duration::ZERO, true)
        .await
        .map_err(unavailable)
}

impl NatsKvStore {
    /// Opens (creating when missing) bucket `bucket` over `link`.
    pub async fn open(
        link: NatsLink,
        bucket: &str,
        codec: RecordCodec,
    ) -> Result<Self, StoreError> {
        let mut js = jetstream::new(link.client.clone());
        js.set_timeout(NATS_TIMEOUT);
        ensure_bucket(&js, bucket).await?;
        let kv = js
            .get_key_value(bucket)
            .await
            .map_err(|e| unavailable(format!("cannot open bucket {bucket}: {e}")))?;
        Ok(Self {
            link,
            kv,
            codec,
            revisions: DashMap::new(),
        })
    }

    /// The key-value store (benchmarks compare against it).
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    fn remember(&self, id: &SessionId, record: &Record, revision: u64) {
        if self.revisions.len() >= MAX_REVISIONS {
            self.revisions.clear();
        }
        self.revisions.insert(
            id.clone(),
            Seen {
                version: record.version,
                expires_at: record.expires_at,
                revision,
                user: record.user().map(str::to_owned),
            },
        );
    }

    fn index_key(user: &str) -> String {
        let h = Sha256::digest(user.as_bytes());
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        format!("u.{hex}")
    }

    /// The live entry under `key` (deleted and purged ones are `None`).
    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, StoreError> {
        self.link.require_connected(ENGINE)?;
        let entry = self.kv.entry(key).await.map_err(unavailable)?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put))
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

    /// Writes `value` under `key` if its revision is still `revision` (`None`: if absent or
    /// deleted): the new revision, or `None` when another writer got there first.
    async fn put_if(
        &self,
        key: &str,
        value: Bytes,
        revision: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        self.link.require_connected(ENGINE)?;
        let result = match revision {
            Some(rev) => self.kv.update(key, value, rev).await.map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            }),
            None => self.kv.create(key, value).await.map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            }),
        };
        match result {
            Ok(rev) => Ok(Some(rev)),
            Err((true, _)) => Ok(None),
            // A create racing another create can also surface as a failed revision check.
            Err((false, m)) if m.contains("wrong last sequence") => Ok(None),
            Err((false, m)) => Err(unavailable(m)),
        }
    }

    async fn update_index(
        &self,
        user: &str,
        id: &SessionId,
        remove: bool,
    ) -> Result<(), StoreError> {
        let key = Self::index_key(user);
        for _ in 0..INDEX_ATTEMPTS {
            let current = self.entry(&key).await?;
            let mut ids: Vec<String> = current
                .as_ref()
                .and_then(|e| serde_json::from_slice(&e.value).ok())
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
            let bytes = serde_json::to_vec(&ids).map_err(unavailable)?;
            if self
                .put_if(&key, bytes.into(), current.map(|e| e.revision))
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(unavailable(format!(
            "the session index of a user changed concurrently {INDEX_ATTEMPTS} times"
        )))
    }
}

#[async_trait]
impl SessionStore for NatsKvStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError> {
        let Some(entry) = self.entry(id.as_str()).await? else {
            self.revisions.remove(id);
            return Ok(None);
        };
        let record = self.decode(id, &entry.value).filter(|r| !r.is_expired());
        match &record {
            Some(r) => self.remember(id, r, entry.revision),
            None => {
                self.revisions.remove(id);
            }
        }
        Ok(record)
    }

    async fn save(
        &self,
        id: &SessionId,
        record: &Record,
        expected: Option<u64>,
    ) -> Result<SaveOutcome, StoreError> {
        let bytes = self.codec.encode(id, record)?;
        let seen = self.revisions.get(id).map(|s| s.clone());
        // The revision this node saw for the expected version: the revision check alone
        // proves the version (nothing was written since), so no read is needed.
        let (revision, old_user) = match (expected, seen) {
            (Some(v), Some(seen)) if seen.version == v && seen.expires_at > now_unix() => {
                (Some(seen.revision), seen.user)
            }
            _ => {
                let current = self.entry(id.as_str()).await?;
                let old = current
                    .as_ref()
                    .and_then(|e| self.decode(id, &e.value))
                    .filter(|r| !r.is_expired());
                if old.as_ref().map(|r| r.version) != expected {
                    return Ok(SaveOutcome::Conflict);
                }
                // An expired or unreadable value is replaced at its revision; a missing one
                // created.
                (
                    current.map(|e| e.revision),
                    old.as_ref().and_then(Record::user).map(str::to_owned),
                )
            }
        };
        let Some(new_revision) = self.put_if(id.as_str(), bytes.into(), revision).await? else {
            self.revisions.remove(id);
            return Ok(SaveOutcome::Conflict);
        };
        self.remember(id, record, new_revision);
        if let Some(user) = record.user() {
            if old_user.as_deref() != Some(user) {
                self.update_index(user, id, false).await?;
            }
        }
        Ok(SaveOutcome::Saved)
    }

    async fn delete(&self, id: &SessionId) -> Result<(), StoreError> {
        self.link.require_connected(ENGINE)?;
        self.revisions.remove(id);
        self.kv.delete(id.as_str()).await.map_err(unavailable)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.link.require_connected(ENGINE)?;
        let now = now_unix();
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
            let Some(id) = SessionId::parse(&key) else {
                continue;
            };
            let Some(entry) = self.entry(&key).await? else {
                continue;
            };
            let expired = self
                .decode(&id, &entry.value)
                .is_none_or(|r| r.is_expired_at(now));
            if expired {
                self.kv.purge(&key).await.map_err(unavailable)?;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionId>, StoreError> {
        let Some(entry) = self.entry(&Self::index_key(user)).await? else {
            return Ok(Vec::new());
        };
        let ids: Vec<String> = serde_json::from_slice(&entry.value).unwrap_or_default();
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
        self.link.require_connected(ENGINE)?;
        self.kv.status().await.map(|_| ()).map_err(unavailable)
    }
}
