//! How server-side engines turn a [`Record`] into stored bytes: JSON, or with
//! `sessions.encrypt = true` an XChaCha20-Poly1305 box bound to the session id.
//!
//! The key is derived from `server.secret_key` with HKDF-SHA256; keys derived from
//! `server.secret_key_fallbacks` still decrypt, so a key rotation keeps every session readable
//! (a session is re-encrypted under the current key at its next write). Decoding accepts plain
//! JSON too, so turning encryption on does not end existing sessions.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;

use super::{Record, SessionId, StoreError};

/// The first bytes of an encrypted record (format version 1).
const MAGIC: &[u8; 4] = b"SYE1";
/// XChaCha20 nonce length: random nonces are safe at this size.
const NONCE_BYTES: usize = 24;
/// HKDF salt and info: a key for nothing but session records.
const HKDF_SALT: &[u8] = b"switchyard";
const HKDF_INFO: &[u8] = b"switchyard session records v1";

/// Encodes and decodes stored records; cheap to clone.
#[derive(Clone)]
pub struct RecordCodec {
    /// Encrypt new writes (`sessions.encrypt`).
    encrypt: bool,
    /// The current key first, then the fallbacks' keys.
    keys: Vec<XChaCha20Poly1305>,
}

impl std::fmt::Debug for RecordCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordCodec")
            .field("encrypt", &self.encrypt)
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn derive(secret: &[u8]) -> XChaCha20Poly1305 {
    let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), secret);
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32, so expand cannot fail.
    let _ = hk.expand(HKDF_INFO, &mut key);
    XChaCha20Poly1305::new(&key.into())
}

impl RecordCodec {
    /// Plain JSON, no keys.
    pub fn plain() -> Self {
        Self {
            encrypt: false,
            keys: Vec::new(),
        }
    }

    /// A codec with keys derived from `secret` and `fallbacks`; it encrypts new writes when
    /// `encrypt` is set (which then needs a non-empty `secret`).
    pub fn new(encrypt: bool, secret: &[u8], fallbacks: &[Vec<u8>]) -> Self {
        let keys = std::iter::once(secret)
            .chain(fallbacks.iter().map(Vec::as_slice))
            .filter(|k| !k.is_empty())
            .map(derive)
            .collect::<Vec<_>>();
        Self {
            encrypt: encrypt && !keys.is_empty(),
            keys,
        }
    }

    /// Whether new writes are encrypted.
    pub fn encrypts(&self) -> bool {
        self.encrypt
    }

    /// The stored bytes of `record` under `id`.
    pub fn encode(&self, id: &SessionId, record: &Record) -> Result<Vec<u8>, StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Other {
            engine: "codec",
            message: format!("cannot serialize a session: {e}"),
        })?;
        let Some(key) = self.keys.first().filter(|_| self.encrypt) else {
            return Ok(json);
        };
        let mut nonce = [0u8; NONCE_BYTES];
        OsRng.fill_bytes(&mut nonce);
        let sealed = key
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &json,
                    aad: id.as_str().as_bytes(),
                },
            )
            .map_err(|_| StoreError::Other {
                engine: "codec",
                message: "cannot encrypt a session".into(),
            })?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_BYTES + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The record stored as `bytes` under `id`: plain JSON, or a box any known key opens.
    pub fn decode(&self, id: &SessionId, bytes: &[u8]) -> Result<Record, StoreError> {
        let corrupt = |message: String| StoreError::Corrupt {
            engine: "codec",
            message,
        };
        let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()));
        };
        if rest.len() < NONCE_BYTES {
            return Err(corrupt("encrypted record too short".into()));
        }
        let (nonce, sealed) = rest.split_at(NONCE_BYTES);
        let payload = || Payload {
            msg: sealed,
            aad: id.as_str().as_bytes(),
        };
        let json = self
            .keys
            .iter()
            .find_map(|k| k.decrypt(XNonce::from_slice(nonce), payload()).ok())
            .ok_or_else(|| {
                corrupt("encrypted record: no configured key opens it (secret_key changed?)".into())
            })?;
        serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Record {
        Record {
            data: json!({"cart": {"1": 2}, "note": "plaintext-marker"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            expires_at: 2_000_000_000,
            version: 3,
            updated_at: 1_700_000_000,
        }
    }

    #[test]
    fn encrypted_bytes_hide_the_data_and_round_trip() -> Result<(), StoreError> {
        let id = SessionId::generate();
        let codec = RecordCodec::new(true, b"current-secret", &[]);
        let bytes = codec.encode(&id, &record())?;
        assert!(bytes.starts_with(MAGIC));
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("plaintext-marker") && !text.contains("cart"));
        assert_eq!(codec.decode(&id, &bytes)?, record());
        // Bound to the id: the same bytes under another id do not open.
        assert!(codec.decode(&SessionId::generate(), &bytes).is_err());
        Ok(())
    }

    #[test]
    fn fallback_keys_still_open_and_plain_json_is_accepted() -> Result<(), StoreError> {
        let id = SessionId::generate();
        let old = RecordCodec::new(true, b"old-secret", &[]);
        let bytes = old.encode(&id, &record())?;
        let rotated = RecordCodec::new(true, b"new-secret", &[b"old-secret".to_vec()]);
        assert_eq!(rotated.decode(&id, &bytes)?, record());
        let without = RecordCodec::new(true, b"new-secret", &[]);
        assert!(matches!(
            without.decode(&id, &bytes),
            Err(StoreError::Corrupt { .. })
        ));
        let plain = RecordCodec::plain().encode(&id, &record())?;
        assert_eq!(rotated.decode(&id, &plain)?, record());
        Ok(())
    }
}
