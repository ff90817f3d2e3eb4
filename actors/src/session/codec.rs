//! How stored engines name and seal what they store (SPEC "Trust boundaries"):
//!
//! - a session is stored under `hex(HMAC-SHA256(k_key, session id))`, a user's index under
//!   `u` + `hex(HMAC-SHA256(k_key, "user:" + name))`: whoever reads the store learns no cookie;
//! - every stored value is authenticated with `k_auth` and bound to the storage key it is
//!   stored under: `SYA2 | HMAC-SHA256(k_auth, key | json) | json`, or with
//!   `sessions.encrypt = true` `SYE2 | 24-byte nonce | XChaCha20-Poly1305(k_enc, json, aad =
//!   key)`. Anything else (an altered byte, a record copied under another key, plain JSON)
//!   does not open, and the session loads as missing.
//!
//! The three keys are derived from `server.secret_key` with HKDF-SHA256 (salt `switchyard`,
//! one info string per purpose), and so is a fourth that authenticates the `cached_db` engine's
//! messages between nodes ([`RecordCodec::sign_message`]). Keys derived from `server.secret_key_fallbacks` open records
//! too and name the keys a session may still be stored under, so a key rotation keeps every
//! session: it is found under its old key and re-saved under the current one.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;

use super::{Record, SessionId, StoreError};

/// The first bytes of an authenticated (not encrypted) value.
const MAGIC_AUTH: &[u8; 4] = b"SYA2";
/// The first bytes of an encrypted value.
const MAGIC_SEALED: &[u8; 4] = b"SYE2";
/// XChaCha20 nonce length: random nonces are safe at this size.
const NONCE_BYTES: usize = 24;
/// HMAC-SHA256 tag length.
const TAG_BYTES: usize = 32;
const HKDF_SALT: &[u8] = b"switchyard";
const INFO_KEY: &[u8] = b"switchyard session storage keys v2";
const INFO_AUTH: &[u8] = b"switchyard session record authentication v2";
const INFO_ENC: &[u8] = b"switchyard session records v2";
const INFO_MESSAGES: &[u8] = b"switchyard cached_db messages v1";

/// The secret every node uses when `debug = true` and `server.secret_key` is empty: nodes of
/// one development cluster then share sessions and signed cookies. Never for production
/// (configuration refuses an empty key without `debug`).
pub const DEVELOPMENT_SECRET_KEY: &[u8] =
    b"switchyard-development-secret-key-not-for-production-use";

type HmacSha256 = Hmac<Sha256>;

/// The keys derived from one secret.
#[derive(Clone)]
struct KeySet {
    naming: HmacSha256,
    auth: HmacSha256,
    enc: XChaCha20Poly1305,
    messages: HmacSha256,
}

fn hkdf(secret: &[u8], info: &[u8]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), secret);
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32, so expand cannot fail.
    let _ = hk.expand(info, &mut key);
    key
}

fn hmac(key: &[u8; 32]) -> HmacSha256 {
    // HMAC takes keys of any length.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

impl KeySet {
    fn derive(secret: &[u8]) -> Self {
        Self {
            naming: hmac(&hkdf(secret, INFO_KEY)),
            auth: hmac(&hkdf(secret, INFO_AUTH)),
            enc: XChaCha20Poly1305::new(&hkdf(secret, INFO_ENC).into()),
            messages: hmac(&hkdf(secret, INFO_MESSAGES)),
        }
    }

    fn name(&self, parts: &[&[u8]]) -> String {
        let mut mac = self.naming.clone();
        for p in parts {
            mac.update(p);
        }
        hex(&mac.finalize().into_bytes())
    }

    /// The MAC of a message made of `parts` (each length-prefixed: no two splits collide).
    fn message_tag(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = self.messages.clone();
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    fn tag(&self, key: &str, json: &[u8]) -> HmacSha256 {
        let mut mac = self.auth.clone();
        mac.update(&(key.len() as u64).to_be_bytes());
        mac.update(key.as_bytes());
        mac.update(json);
        mac
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The bytes of a lowercase or uppercase hex string; `None` if it is not one.
fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    bytes
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Names and seals stored values; cheap to clone.
#[derive(Clone)]
pub struct RecordCodec {
    /// Encrypt new writes (`sessions.encrypt`).
    encrypt: bool,
    /// The current secret's keys first, then the fallbacks'.
    keys: Vec<KeySet>,
}

impl std::fmt::Debug for RecordCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordCodec")
            .field("encrypt", &self.encrypt)
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn corrupt(message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        engine: "codec",
        message: message.into(),
    }
}

impl RecordCodec {
    /// Not encrypted, keyed by [`DEVELOPMENT_SECRET_KEY`] (tests and benchmarks).
    pub fn plain() -> Self {
        Self::new(false, DEVELOPMENT_SECRET_KEY, &[])
    }

    /// Keys derived from `secret` (the current key; empty: [`DEVELOPMENT_SECRET_KEY`]) and
    /// `fallbacks`; new writes are encrypted when `encrypt` is set.
    pub fn new(encrypt: bool, secret: &[u8], fallbacks: &[Vec<u8>]) -> Self {
        let current = if secret.is_empty() {
            DEVELOPMENT_SECRET_KEY
        } else {
            secret
        };
        let keys = std::iter::once(current)
            .chain(
                fallbacks
                    .iter()
                    .map(Vec::as_slice)
                    .filter(|k| !k.is_empty()),
            )
            .map(KeySet::derive)
            .collect();
        Self { encrypt, keys }
    }

    /// Whether new writes are encrypted.
    pub fn encrypts(&self) -> bool {
        self.encrypt
    }

    /// How many secrets name and open values (the current one and the fallbacks).
    pub fn generations(&self) -> usize {
        self.keys.len()
    }

    /// The storage key of session `id` under secret `generation` (0: the current one).
    pub fn session_key(&self, id: &SessionId, generation: usize) -> Option<String> {
        Some(self.keys.get(generation)?.name(&[id.as_str().as_bytes()]))
    }

    /// The storage key of `user`'s index under secret `generation`.
    pub fn user_key(&self, user: &str, generation: usize) -> Option<String> {
        let name = self
            .keys
            .get(generation)?
            .name(&[b"user:", user.as_bytes()]);
        Some(format!("u{name}"))
    }

    /// The tag (hex) authenticating a message between nodes made of `parts` (its kind, subject,
    /// payload...), under the current secret's message key.
    pub fn sign_message(&self, parts: &[&[u8]]) -> String {
        hex(&self.keys[0].message_tag(parts).finalize().into_bytes())
    }

    /// Whether `tag` (hex) authenticates `parts` under the current secret or a fallback.
    pub fn verify_message(&self, parts: &[&[u8]], tag: &str) -> bool {
        let Some(tag) = unhex(tag).filter(|t| t.len() == TAG_BYTES) else {
            return false;
        };
        self.keys
            .iter()
            .any(|k| k.message_tag(parts).verify_slice(&tag).is_ok())
    }

    /// The stored bytes of `json` under storage key `key` (current secret).
    pub fn seal(&self, key: &str, json: &[u8]) -> Result<Vec<u8>, StoreError> {
        let k = &self.keys[0];
        if !self.encrypt {
            let tag = k.tag(key, json).finalize().into_bytes();
            let mut out = Vec::with_capacity(MAGIC_AUTH.len() + TAG_BYTES + json.len());
            out.extend_from_slice(MAGIC_AUTH);
            out.extend_from_slice(&tag);
            out.extend_from_slice(json);
            return Ok(out);
        }
        let mut nonce = [0u8; NONCE_BYTES];
        OsRng.fill_bytes(&mut nonce);
        let sealed = k
            .enc
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: json,
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Other {
                engine: "codec",
                message: "cannot encrypt a session".into(),
            })?;
        let mut out = Vec::with_capacity(MAGIC_SEALED.len() + NONCE_BYTES + sealed.len());
        out.extend_from_slice(MAGIC_SEALED);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The JSON stored as `bytes` under `key`, if a known secret authenticates it.
    pub fn open(&self, key: &str, bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
        if let Some(rest) = bytes.strip_prefix(MAGIC_AUTH.as_slice()) {
            if rest.len() < TAG_BYTES {
                return Err(corrupt("authenticated record too short"));
            }
            let (tag, json) = rest.split_at(TAG_BYTES);
            return self
                .keys
                .iter()
                .any(|k| k.tag(key, json).verify_slice(tag).is_ok())
                .then(|| json.to_vec())
                .ok_or_else(|| corrupt("record not authenticated by any configured key"));
        }
        let Some(rest) = bytes.strip_prefix(MAGIC_SEALED.as_slice()) else {
            return Err(corrupt("not an authenticated record"));
        };
        if rest.len() < NONCE_BYTES {
            return Err(corrupt("encrypted record too short"));
        }
        let (nonce, sealed) = rest.split_at(NONCE_BYTES);
        self.keys
            .iter()
            .find_map(|k| {
                k.enc
                    .decrypt(
                        XNonce::from_slice(nonce),
                        Payload {
                            msg: sealed,
                            aad: key.as_bytes(),
                        },
                    )
                    .ok()
            })
            .ok_or_else(|| corrupt("encrypted record: no configured key opens it"))
    }

    /// The stored bytes of `record` under `key`.
    pub fn encode(&self, key: &str, record: &Record) -> Result<Vec<u8>, StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Other {
            engine: "codec",
            message: format!("cannot serialize a session: {e}"),
        })?;
        self.seal(key, &json)
    }

    /// The record stored as `bytes` under `key`.
    pub fn decode(&self, key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
        let json = self.open(key, bytes)?;
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
    fn keys_are_keyed_hashes_of_the_id() {
        let id = SessionId::generate();
        let a = RecordCodec::new(false, b"secret-a", &[]);
        let b = RecordCodec::new(false, b"secret-b", &[b"secret-a".to_vec()]);
        let key = a.session_key(&id, 0).unwrap_or_default();
        assert_eq!(key.len(), 64);
        assert!(!key.contains(id.as_str()));
        assert_ne!(b.session_key(&id, 0), Some(key.clone()));
        assert_eq!(b.session_key(&id, 1), Some(key));
        assert_eq!(b.session_key(&id, 2), None);
        assert!(a.user_key("bob", 0).unwrap_or_default().starts_with('u'));
    }

    #[test]
    fn encrypted_bytes_hide_the_data_and_round_trip() -> Result<(), StoreError> {
        let codec = RecordCodec::new(true, b"current-secret", &[]);
        let bytes = codec.encode("k1", &record())?;
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("plaintext-marker") && !text.contains("cart"));
        assert_eq!(codec.decode("k1", &bytes)?, record());
        // Bound to the key: the same bytes under another key do not open.
        assert!(codec.decode("k2", &bytes).is_err());
        Ok(())
    }

    #[test]
    fn every_altered_byte_and_plain_json_are_refused() -> Result<(), StoreError> {
        for encrypt in [false, true] {
            let codec = RecordCodec::new(encrypt, b"s", &[]);
            let bytes = codec.encode("k", &record())?;
            for i in 0..bytes.len() {
                let mut altered = bytes.clone();
                altered[i] ^= 0x01;
                assert!(codec.decode("k", &altered).is_err(), "byte {i} ({encrypt})");
            }
            assert!(codec.decode("k", &bytes[..bytes.len() - 1]).is_err());
        }
        let json = serde_json::to_vec(&record()).unwrap_or_default();
        assert!(RecordCodec::plain().decode("k", &json).is_err());
        Ok(())
    }

    #[test]
    fn messages_are_signed_per_purpose_and_fallbacks_verify() {
        let old = RecordCodec::new(false, b"old-secret", &[]);
        let rotated = RecordCodec::new(false, b"new-secret", &[b"old-secret".to_vec()]);
        let parts: [&[u8]; 2] = [b"ack", b"subject"];
        let tag = old.sign_message(&parts);
        assert!(old.verify_message(&parts, &tag));
        assert!(
            rotated.verify_message(&parts, &tag),
            "fallback key verifies"
        );
        assert!(!RecordCodec::new(false, b"new-secret", &[]).verify_message(&parts, &tag));
        // Another split of the same bytes, another part, a truncated or non-hex tag: refused.
        assert!(!old.verify_message(&[b"acks", b"ubject"], &tag));
        assert!(!old.verify_message(&[b"ack", b"subject2"], &tag));
        assert!(!old.verify_message(&parts, &tag[..62]));
        assert!(!old.verify_message(&parts, &"zz".repeat(32)));
        assert!(!old.verify_message(&parts, ""));
        // Not the record key: a record tag never passes as a message tag.
        assert_ne!(tag, old.sign_message(&[b"ack"]));
    }

    #[test]
    fn fallback_keys_still_open() -> Result<(), StoreError> {
        for encrypt in [false, true] {
            let old = RecordCodec::new(encrypt, b"old-secret", &[]);
            let bytes = old.encode("k", &record())?;
            let rotated = RecordCodec::new(encrypt, b"new-secret", &[b"old-secret".to_vec()]);
            assert_eq!(rotated.decode("k", &bytes)?, record());
            let without = RecordCodec::new(encrypt, b"new-secret", &[]);
            assert!(matches!(
                without.decode("k", &bytes),
                Err(StoreError::Corrupt { .. })
            ));
        }
        Ok(())
    }
}
