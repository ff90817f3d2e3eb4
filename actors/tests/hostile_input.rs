//! Everything that arrives over HTTP or NATS is hostile: the parsers of session cookies (ids,
//! signed cookies, CSRF tokens), stored session records, task messages and dead letters never
//! panic on any input, accept what they produced themselves, and refuse what was altered. The
//! target functions are the coverage-guided fuzz targets' own (`fuzz/src/actors.rs`,
//! docs/fuzzing.md); here they run bounded, as property tests inside `cargo test`, and over
//! the committed seeds and the inputs fuzzing found (`fuzz/seeds/`, `fuzz/regressions/`).

#[path = "../../fuzz/src/actors.rs"]
mod targets;

use chrono::Utc;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use switchyard_actors::session::{CookieSigner, Record, RecordCodec};
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
    fn session_cookies_parse_only_what_they_print(
        s in prop_oneof!["\\PC{0,64}", "[A-Za-z0-9_-]{43}", "[a-zA-Z0-9]{32,64}"],
    ) {
        targets::session_cookie(s.as_bytes());
    }

    #[test]
    fn signed_cookies_never_panic_and_refuse_alterations(
        value in "\\PC{0,300}",
        data in small_map(),
        flip in any::<prop::sample::Index>(),
    ) {
        targets::session_cookie(value.as_bytes());
        let signer = CookieSigner::new(b"property-test-secret-key-0123456789", &[]);
        targets::round_trip_signed(&signer, &data, Utc::now().timestamp() + 60);
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
        targets::stored_record(&bytes);
        let codec = RecordCodec::new(encrypt, b"property-test-secret-key-0123456789", &[]);
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
        id in proptest::option::of(prop_oneof!["[a-z0-9-]{1,40}", "\\PC{0,40}"]),
        task in prop_oneof![Just("fuzz.echo".to_owned()), Just("fuzz.retry".to_owned()),
            "\\PC{0,20}"],
        retries in any::<u32>(),
        max_retries in proptest::option::of(any::<u32>()),
        eta in proptest::option::of(any::<i64>()),
        expires in proptest::option::of(any::<i64>()),
        delivered in any::<u8>(),
    ) {
        let now = Utc::now();
        targets::task_message(&bytes);
        // Well-formed JSON with extreme values: times far in the past or the future.
        let time = |t: Option<i64>| t.and_then(|s| chrono::DateTime::from_timestamp(s, 0));
        let message = json!({
            "id": id, "task": task,
            "args": {}, "retries": retries, "max_retries": max_retries,
            "eta": time(eta), "expires": time(expires),
        });
        let env: Envelope = serde_json::from_value(message.clone()).expect("a valid message parses");
        let _ = (env.is_expired(now), env.wait_for_eta(now));
        let mut input = vec![delivered];
        input.extend(serde_json::to_vec(&message).expect("JSON"));
        targets::task_message(&input);
    }
}

proptest! {
    // Fewer cases: each runs the keyed store or async-nats' reading several times over.
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn stored_records_of_any_shape_never_panic(
        mode in any::<u8>(),
        data in small_map(),
        expires_at in prop_oneof![any::<i64>(), Just(Utc::now().timestamp() + 3600)],
        version in prop_oneof![any::<u64>(), Just(1u64)],
        user in proptest::option::of("\\PC{0,12}"),
        keys in proptest::collection::vec("\\PC{0,70}", 0..4),
    ) {
        let record = json!({"data": data, "expires_at": expires_at, "version": version,
            "updated_at": 0});
        let index = json!({"user": user, "keys": keys, "expires_at": expires_at});
        for value in [record, index] {
            let mut input = vec![mode];
            input.extend(serde_json::to_vec(&value).expect("JSON"));
            targets::stored_record(&input);
        }
    }

    #[test]
    fn dead_letters_never_panic(
        header_lines in proptest::collection::vec(
            ("[A-Za-z-]{1,24}|Switchyard-Reason|Switchyard-Failed-At", "\\PC{0,30}"), 0..4),
        status in "( [0-9]{0,4}( [a-z ]{0,10})?)?",
        queue in "[a-z_.>*]{0,12}",
        // Line breaks too: a `bad id` letter keeps whatever id the message had.
        id in proptest::option::of(prop_oneof!["\\PC{0,20}", "[a-z0-9\r\n-]{1,8}"]),
        task in proptest::option::of("\\PC{0,20}"),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut headers = format!("NATS/1.0{status}\r\n");
        for (k, v) in &header_lines {
            headers.push_str(&format!("{k}: {v}\r\n"));
        }
        headers.push_str("\r\n");
        let payload = json!({"id": id, "task": task, "args": {}});
        for body in [serde_json::to_vec(&payload).expect("JSON"), junk.clone()] {
            let mut input = headers.clone().into_bytes();
            input.push(0);
            input.extend(format!("SWITCHYARD.dead.{queue}").into_bytes());
            input.push(0);
            input.extend(body);
            targets::dead_letter(&input);
        }
        targets::dead_letter(&junk);
    }
}

/// Every committed seed and every input fuzzing found (fuzz/seeds/<target>/,
/// fuzz/regressions/<target>/) runs through its target.
/// A fuzz target by name.
type Target = (&'static str, fn(&[u8]));

#[test]
fn seeds_and_regressions_run_clean() {
    let targets: [Target; 4] = [
        ("session_cookie", targets::session_cookie),
        ("stored_record", targets::stored_record),
        ("task_message", targets::task_message),
        ("dead_letter", targets::dead_letter),
    ];
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut ran = 0;
    for (name, target) in targets {
        for kind in ["seeds", "regressions"] {
            let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join(name)) else {
                continue;
            };
            for file in dir {
                let path = file.expect("a directory entry").path();
                let input = std::fs::read(&path).expect("read an input");
                eprintln!("{name}: {}", path.display());
                target(&input);
                ran += 1;
            }
        }
    }
    assert!(ran >= 8, "the seeds are there ({ran} inputs)");
}
