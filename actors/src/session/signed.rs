//! The `signed_cookies` engine's codec: the session data travels in the cookie, HMAC-SHA256
//! signed with a key derived from `secret_key`, verified against `secret_key_fallbacks` too.
//! The data is readable by the client (signed, not encrypted), as in Django.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

use super::now_unix;

type HmacSha256 = Hmac<Sha256>;

/// The largest cookie value this engine writes: browsers keep at most 4096 bytes of name,
/// value and attributes together, so leave room for those.
pub const SIGNED_COOKIE_MAX_BYTES: usize = 3800;

/// The salt separating these signatures from any other use of `secret_key`.
const SALT: &[u8] = b"switchyard.sessions.signed_cookies";

/// Why a signed cookie could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SignedCookieError {
    #[error(
        "session data needs a {size}-byte cookie, over the {max}-byte cookie limit of the \
         signed_cookies engine; store less in the session or use a server-side engine"
    )]
    TooLarge { size: usize, max: usize },
    #[error("cannot encode session: {0}")]
    Encode(String),
}

#[derive(Serialize, Deserialize)]
struct Payload {
    /// The data.
    d: Map<String, Value>,
    /// Expiry, UNIX seconds.
    e: i64,
    /// A random nonce, so every write (a `cycle_key` included) gives a new cookie value.
    #[serde(default)]
    n: u64,
}

/// Signs and verifies session cookies.
#[derive(Clone)]
pub struct CookieSigner {
    keys: Vec<Vec<u8>>,
}

impl CookieSigner {
    /// A signer for `secret` that also accepts signatures made with `fallbacks`.
    pub fn new(secret: &[u8], fallbacks: &[Vec<u8>]) -> Self {
        let keys = std::iter::once(secret)
            .chain(fallbacks.iter().map(Vec::as_slice))
            .map(derive_key)
            .collect();
        Self { keys }
    }

    /// Encodes and signs `data` expiring at `expires_at` (UNIX seconds).
    pub fn encode(
        &self,
        data: &Map<String, Value>,
        expires_at: i64,
    ) -> Result<String, SignedCookieError> {
        let payload = serde_json::to_vec(&Payload {
            d: data.clone(),
            e: expires_at,
            n: rand::random(),
        })
        .map_err(|e| SignedCookieError::Encode(e.to_string()))?;
        let body = URL_SAFE_NO_PAD.encode(payload);
        let sig = URL_SAFE_NO_PAD.encode(self.mac(&self.keys[0], body.as_bytes()));
        let value = format!("{body}.{sig}");
        if value.len() > SIGNED_COOKIE_MAX_BYTES {
            return Err(SignedCookieError::TooLarge {
                size: value.len(),
                max: SIGNED_COOKIE_MAX_BYTES,
            });
        }
        Ok(value)
    }

    /// Verifies and decodes a cookie value: `None` when malformed, tampered, signed with an
    /// unknown key, oversized, or expired.
    pub fn decode(&self, value: &str) -> Option<(Map<String, Value>, i64)> {
        if value.len() > SIGNED_COOKIE_MAX_BYTES {
            return None;
        }
        let (body, sig) = value.rsplit_once('.')?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        let valid = self.keys.iter().any(|k| {
            let mut mac = HmacSha256::new_from_slice(k).expect("HMAC takes any key length");
            mac.update(body.as_bytes());
            mac.verify_slice(&sig).is_ok()
        });
        if !valid {
            return None;
        }
        let payload: Payload = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
        (payload.e > now_unix()).then_some((payload.d, payload.e))
    }

    fn mac(&self, key: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(msg);
        mac.finalize().into_bytes().to_vec()
    }
}

fn derive_key(secret: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(SALT);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data() -> Map<String, Value> {
        json!({"cart": {"1": 2}})
            .as_object()
            .cloned()
            .expect("object")
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let s = CookieSigner::new(b"k1", &[]);
        let v = s.encode(&data(), now_unix() + 60).expect("encode");
        assert_eq!(s.decode(&v).map(|(d, _)| d), Some(data()));
        let mut tampered = v.clone().into_bytes();
        tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
        assert!(s
            .decode(&String::from_utf8(tampered).expect("utf8"))
            .is_none());
        assert!(s.decode("garbage").is_none());
        assert!(s.decode("a.b.c").is_none());
        assert!(CookieSigner::new(b"other", &[]).decode(&v).is_none());
    }

    #[test]
    fn fallback_keys_verify_and_expiry_is_enforced() {
        let old = CookieSigner::new(b"old", &[]);
        let v = old.encode(&data(), now_unix() + 60).expect("encode");
        let rotated = CookieSigner::new(b"new", &[b"old".to_vec()]);
        assert!(rotated.decode(&v).is_some());
        let expired = old.encode(&data(), now_unix() - 1).expect("encode");
        assert!(old.decode(&expired).is_none());
    }

    #[test]
    fn oversized_data_is_a_clear_error() {
        let s = CookieSigner::new(b"k", &[]);
        let mut big = Map::new();
        big.insert("blob".into(), json!("x".repeat(5000)));
        assert!(matches!(
            s.encode(&big, now_unix() + 60),
            Err(SignedCookieError::TooLarge { .. })
        ));
    }
}
