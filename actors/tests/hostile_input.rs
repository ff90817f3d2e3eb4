//! Everything that arrives over HTTP or NATS is hostile: the parsers of session cookies (ids and
//! signed cookies), stored session records and task messages never panic on any input, accept
//! what they produced themselves, and refuse what was altered. The same inputs are the seeds of
//! the coverage-guided fuzz targets in `fuzz/` (docs/operations.md); here they run bounded, as
//! property tests inside `cargo test`.

use chrono::Utc;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use switchyard_actors::session::{CookieSigner, Record, RecordCodec, SessionId};
use switchyard_actors::tasks::Envelope;

/// Cases per property: enough to cover the shapes, bounded for CI time.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    }
}

fn record(data: Map<String, Value>) -> Record {
    Record {
        data,
        expires_at: Utc::now().timestamp() + 3600,
        version: 3,
        updated_at: 0,
    }
}

fn small_map() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 0..6)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k, json!(v))).collect())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn session_ids_parse_only_what_they_print(s in "\\PC{0,64}") {
        if let Some(id) = SessionId::parse(&s) {
            prop_assert_eq!(id.as_str(), s.as_str());
        }
    }

    #[test]
    fn signed_cookies_never_panic_and_refuse_alterations(
        value in "\\PC{0,300}",
        data in small_map(),
        flip in any::<prop::sample::Index>(),
    ) {
        let signer = CookieSigner::new(b"property-test-secret-key-0123456789", &[]);
        let _ = signer.decode(&value);
        let cookie = signer
            .encode(&data, Utc::now().timestamp() + 60)
            .expect("a small cookie encodes");
        let (decoded, _) = signer.decode(&cookie).expect("its own cookie decodes");
        prop_assert_eq!(&decoded, &data);
        // One character changed to another of the alphabet: refused, or (only in the last
        // character's unused bits of base64) the very same bytes.
        let mut chars: Vec<char> = cookie.chars().collect();
        let i = flip.index(chars.len());
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let altered: String = chars.into_iter().collect();
        if let Some((d, _)) = signer.decode(&altered) {
            prop_assert_eq!(&d, &decoded);
        }
    }

    #[test]
    fn stored_records_never_panic_and_refuse_one_altered_byte(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        data in small_map(),
        encrypt in any::<bool>(),
        flip in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let codec = RecordCodec::new(encrypt, b"property-test-secret-key-0123456789", &[]);
        let _ = codec.decode("k", &bytes);
        let sealed = codec.encode("k", &record(data.clone())).expect("encode");
        let opened = codec.decode("k", &sealed).expect("its own record decodes");
        prop_assert_eq!(opened.data, data);
        prop_assert!(codec.decode("other-key", &sealed).is_err(), "bound to its key");
        let mut altered = sealed.clone();
        let i = flip.index(altered.len());
        altered[i] ^= xor;
        prop_assert!(codec.decode("k", &altered).is_err(), "byte {} altered", i);
    }

    #[test]
    fn task_messages_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        id in proptest::option::of("\\PC{0,40}"),
        task in "\\PC{0,20}",
        retries in any::<u32>(),
        max_retries in proptest::option::of(any::<u32>()),
        eta in proptest::option::of(any::<i64>()),
        expires in proptest::option::of(any::<i64>()),
    ) {
        let now = Utc::now();
        if let Ok(env) = serde_json::from_slice::<Envelope>(&bytes) {
            let _ = (env.is_expired(now), env.wait_for_eta(now));
        }
        // Well-formed JSON with extreme values: times far in the past or the future.
        let time = |t: Option<i64>| t.and_then(|s| chrono::DateTime::from_timestamp(s, 0));
        let message = json!({
            "id": id, "task": task, "args": {}, "retries": retries, "max_retries": max_retries,
            "eta": time(eta), "expires": time(expires),
        });
        let env: Envelope = serde_json::from_value(message).expect("a valid message parses");
        let _ = (env.is_expired(now), env.wait_for_eta(now));
    }
}
