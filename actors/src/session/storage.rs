//! The small trait a stored engine implements: bytes under a key, with a version to
//! compare-and-swap on and an expiry. Everything else — codec, keyed-hash keys, record
//! authentication, expiry checks, versions, key rotation and the user index — is the generic
//! [`KeyedStore`](super::KeyedStore)'s, once for every engine.

use async_trait::async_trait;

use super::{SaveOutcome, StoreError};

/// What a storage holds under a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The sealed bytes (see [`RecordCodec`](super::RecordCodec)).
    pub bytes: Vec<u8>,
    /// The version the bytes were written with (the store checks it against the sealed one).
    pub version: u64,
}

/// One versioned write.
#[derive(Debug, Clone)]
pub struct Put {
    /// The storage key.
    pub key: String,
    /// The sealed bytes.
    pub bytes: Vec<u8>,
    /// The new version.
    pub version: u64,
    /// UNIX seconds after which the entry no longer counts (storages may drop it then).
    pub expires_at: i64,
    /// Write only if the live entry has this version (`None`: only if there is no live
    /// entry; an expired one is replaced).
    pub expected: Option<u64>,
}

/// Bytes under keys with compare-and-swap on a version. Implementations must be safe to call
/// from many tasks at once, and each `put` must be atomic against other nodes' writes to the
/// same key (the shards serialise one node's writes to one key).
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// The engine's name as in `sessions.engine`.
    fn engine(&self) -> &'static str;

    /// The entry under `key`, or `None` when missing (expired entries may be returned: the
    /// store checks expiry inside the authenticated record).
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Writes `put` if the version check passes: [`SaveOutcome::Conflict`] when it does not.
    async fn put(&self, put: &Put) -> Result<SaveOutcome, StoreError>;

    /// Several writes of distinct keys, answered per item in order. Storages that can write
    /// them in one round trip do so (group commit); the default runs them concurrently.
    async fn put_batch(&self, puts: &[Put]) -> Vec<Result<SaveOutcome, StoreError>> {
        futures_util::future::join_all(puts.iter().map(|p| self.put(p))).await
    }

    /// Deletes the entry under `key` (no error if missing).
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Deletes every entry expired at `now`; how many. Storages that expire entries
    /// themselves answer 0.
    async fn purge_expired(&self, now: i64) -> Result<u64, StoreError>;

    /// Whether the service answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Bytes of a framed value: version and expiry in front of the sealed bytes, for storages
/// with no place of their own for them (`nats_kv`, `memcached`, `file`).
const FRAME_HEADER: usize = 16;

/// `version | expires_at | bytes` (big-endian).
pub fn frame(version: u64, expires_at: i64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + bytes.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&expires_at.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// A framed value's version, expiry and bytes (`None`: too short to be one).
pub fn unframe(value: &[u8]) -> Option<(u64, i64, &[u8])> {
    if value.len() < FRAME_HEADER {
        return None;
    }
    let (head, bytes) = value.split_at(FRAME_HEADER);
    let version = u64::from_be_bytes(head[..8].try_into().ok()?);
    let expires_at = i64::from_be_bytes(head[8..].try_into().ok()?);
    Some((version, expires_at, bytes))
}

/// Whether a framed value stored with version `stored` (live or not) lets `put` through:
/// the live version must be the expected one.
pub fn version_matches(stored: Option<(u64, i64)>, expected: Option<u64>, now: i64) -> bool {
    let live = stored.filter(|(_, expires_at)| *expires_at > now);
    live.map(|(v, _)| v) == expected
}

/// An [`Entry`] from a framed value.
pub fn framed_entry(value: &[u8]) -> Option<Entry> {
    let (version, _, bytes) = unframe(value)?;
    Some(Entry {
        bytes: bytes.to_vec(),
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_short_values_are_refused() {
        let f = frame(7, 1_900_000_000, b"abc");
        assert_eq!(unframe(&f), Some((7, 1_900_000_000, b"abc".as_slice())));
        assert_eq!(unframe(&f[..15]), None);
        assert!(version_matches(None, None, 10));
        assert!(
            version_matches(Some((3, 5)), None, 10),
            "expired counts as absent"
        );
        assert!(version_matches(Some((3, 50)), Some(3), 10));
        assert!(!version_matches(Some((3, 50)), None, 10));
        assert!(!version_matches(Some((3, 50)), Some(2), 10));
    }
}
