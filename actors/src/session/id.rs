//! Session ids: 256 bits from the OS CSPRNG, URL-safe base64 without padding (43 characters).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;

/// Random bytes in a session id.
const ID_BYTES: usize = 32;
/// Characters of an encoded id.
const ID_CHARS: usize = 43;

/// A session id that is well-formed (never trusted to exist: engines look it up).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl SessionId {
    /// A fresh random id.
    pub fn generate() -> Self {
        let mut bytes = [0u8; ID_BYTES];
        OsRng.fill_bytes(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses an id from a cookie; anything malformed is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = s.len() == ID_CHARS
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| Self(s.to_owned()))
    }

    /// The id as it goes in the cookie.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A stable hash for choosing a shard.
    pub fn shard_hash(&self) -> u64 {
        // FNV-1a: ids are random already, this only spreads them.
        self.0.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log a whole id: it is a bearer credential.
        write!(f, "{}…", &self.0[..8.min(self.0.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_never_show_a_whole_id() {
        let id = SessionId::generate();
        for shown in [format!("{id}"), format!("{id:?}")] {
            assert!(!shown.contains(id.as_str()), "{shown}");
            assert!(shown.contains(&id.as_str()[..8]), "{shown}");
        }
    }

    #[test]
    fn generated_ids_parse_and_differ() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), ID_CHARS);
        assert_eq!(SessionId::parse(a.as_str()), Some(a));
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "",
            "short",
            &"a".repeat(44),
            &format!("{}!", "a".repeat(42)),
            &"é".repeat(43),
        ] {
            assert_eq!(SessionId::parse(bad), None, "{bad:?}");
        }
    }
}
