//! Targets of the `switchyard-actors` crate: what arrives over HTTP (the session cookie, the
//! CSRF token) and what comes back from a store or NATS (stored session records, task
//! messages, dead letters). Each function takes any bytes; a panic is a bug.
//!
//! This file is also `actors/tests/hostile_input.rs`'s `targets` module: it may use only the
//! crates `switchyard-actors` itself depends on.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};
use switchyard_actors::context::builtins::{is_csrf_secret, unmask_csrf_token};
use switchyard_actors::session::{
    framed_entry, CookieSigner, Entry, KeyedStore, Put, RecordCodec, SaveOutcome, SessionId,
    SessionStore, SignedCookieError, Storage, StoreError,
};
use switchyard_actors::tasks::{
    is_valid_task_id, process_delivery, Acker, BrokerError, Delivery, Envelope, MemoryBroker,
    NatsNames, Registry, StoredDeadLetter, TaskError, TaskOptions, TaskSettings,
};

/// The secret the targets sign and seal with, and a fallback (a rotated key).
pub const SECRET: &[u8] = b"fuzz-target-secret-key-0123456789abcdef";
pub const FALLBACK: &[u8] = b"fuzz-target-old-secret-key-9876543210";

/// Runs `fut` to completion on this thread's runtime (one per thread, made once).
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(fut))
}

fn signer() -> CookieSigner {
    CookieSigner::new(SECRET, &[FALLBACK.to_vec()])
}

/// The session cookie and the CSRF token, as the HTTP layer reads them: a server-side engine's
/// session id (`SessionId::parse`), the `signed_cookies` engine's value (`CookieSigner::decode`)
/// and a `csrftoken` cookie or masked form value (`unmask_csrf_token`). Whatever parses must be
/// what it claims; any JSON object in the input is also session data, which a signed cookie
/// must carry back.
pub fn session_cookie(data: &[u8]) {
    // Cookie values reach the middleware as text; other bytes never get this far.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(id) = SessionId::parse(text) {
        assert_eq!(id.as_str(), text, "an id is what the cookie said");
    }
    let signer = signer();
    let now = chrono::Utc::now().timestamp();
    if let Some((_, expires)) = signer.decode(text) {
        assert!(expires > now, "an expired cookie decoded");
    }
    if let Some(secret) = unmask_csrf_token(text) {
        assert!(is_csrf_secret(&secret), "{text:?} unmasked to a non-secret");
    }
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) {
        round_trip_signed(&signer, &map, now + 60);
    }
}

/// Signs `map` and reads it back: the same keys (numbers may re-round), or a clear
/// "too large" error.
pub fn round_trip_signed(signer: &CookieSigner, map: &Map<String, Value>, expires: i64) {
    match signer.encode(map, expires) {
        Ok(cookie) => {
            let (back, at) = signer.decode(&cookie).expect("a cookie it signed decodes");
            assert_eq!(at, expires);
            assert!(back.keys().eq(map.keys()), "keys changed on the way");
        }
        Err(SignedCookieError::TooLarge { size, max }) => assert!(size > max),
        Err(e) => panic!("session data that is JSON cannot be signed: {e}"),
    }
}

/// A storage that holds, under every key, `json` sealed under that key by `codec` (so the
/// keyed store reads it as authentic) with `version`; writes succeed and change nothing.
struct Sealed {
    codec: RecordCodec,
    json: Vec<u8>,
    version: u64,
}

#[async_trait]
impl Storage for Sealed {
    fn engine(&self) -> &'static str {
        "fuzz"
    }
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let bytes = self.codec.seal(key, &self.json)?;
        Ok(Some(Entry {
            bytes,
            version: self.version,
        }))
    }
    async fn put(&self, _put: &Put) -> Result<SaveOutcome, StoreError> {
        Ok(SaveOutcome::Saved)
    }
    async fn delete(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }
    async fn purge_expired(&self, _now: i64) -> Result<u64, StoreError> {
        Ok(0)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A stored session value as the generic keyed store reads it back from any engine. The first
/// byte picks plain or encrypting codec (bit 0); the rest is, at once, (a) raw stored bytes and
/// a framed value (`nats_kv`, `memcached`, `file`) for `RecordCodec::decode`, which must refuse
/// anything it did not seal, and (b) the JSON inside a value the key did seal, for the keyed
/// store's record and user-index decoding, which must never hand out an expired record.
pub fn stored_record(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let codec = RecordCodec::new(mode & 1 == 1, SECRET, &[FALLBACK.to_vec()]);
    for bytes in [
        Some(rest),
        framed_entry(rest).as_ref().map(|e| &e.bytes[..]),
    ]
    .into_iter()
    .flatten()
    {
        // Opening without the key's tag is forgery: only a prefix-and-tag collision could.
        assert!(codec.decode("k", bytes).is_err(), "unsealed bytes opened");
    }
    // The version the storage claims: the record's own when it has one, so that the fuzzer
    // gets past the version check to what follows.
    let version = serde_json::from_slice::<Value>(rest)
        .ok()
        .and_then(|v| v.get("version")?.as_u64())
        .unwrap_or(u64::from(mode >> 1));
    let store = KeyedStore::new(
        Sealed {
            codec: codec.clone(),
            json: rest.to_vec(),
            version,
        },
        codec,
    );
    let id = SessionId::parse("fuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuz").expect("an id");
    block_on(async {
        if let Ok(Some(record)) = store.load(&id).await {
            assert!(!record.is_expired(), "an expired record loaded");
            assert_eq!(record.version, version);
        }
        let _ = store.sessions_of("alice").await;
    });
}

/// A delivery's acknowledgements go nowhere.
struct Quiet;

#[async_trait]
impl Acker for Quiet {
    async fn ack(&self) -> Result<(), BrokerError> {
        Ok(())
    }
    async fn nak(&self, _delay: Duration) -> Result<(), BrokerError> {
        Ok(())
    }
    async fn progress(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// Two tasks: `fuzz.echo` answers its arguments, `fuzz.retry` asks for a retry.
fn registry() -> Arc<Registry> {
    static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let mut r = Registry::new();
            r.register_fn(
                "fuzz.echo",
                TaskOptions::default(),
                |_, args: Value| async { Ok::<_, TaskError>(args) },
            );
            r.register_fn("fuzz.retry", TaskOptions::default(), |_, _: Value| async {
                Err::<Value, _>(TaskError::retry("fuzz", "again"))
            });
            Arc::new(r)
        })
        .clone()
}

/// A task message as a worker receives it: the first byte is how many times it was delivered
/// (1–16, `tasks.max_deliver` is 10), the rest the payload, run through the workers' runner
/// (decode → admit → claim → run → settle) on a memory broker. A payload that is no message
/// is dead-lettered once; a record written names a valid task id.
pub fn task_message(data: &[u8]) {
    let Some((&delivered, payload)) = data.split_first() else {
        return;
    };
    let settings = Arc::new(TaskSettings::default());
    let broker = Arc::new(MemoryBroker::new(&settings));
    let queue = settings.default_queue.clone();
    let delivery = Delivery::new(
        payload.to_vec(),
        queue,
        1,
        u32::from(delivered % 16) + 1,
        Box::new(Quiet),
    );
    let written = block_on(process_delivery(
        broker.clone(),
        broker.clone(),
        registry(),
        settings,
        delivery,
    ));
    if serde_json::from_slice::<Envelope>(payload).is_err() {
        let dead = broker.dead_letters();
        assert_eq!(dead.len(), 1, "a bad message is dead-lettered once");
        assert_eq!(dead[0].payload, payload, "the letter keeps the bytes");
    }
    if let Some(record) = written {
        assert!(is_valid_task_id(&record.id), "record under {:?}", record.id);
    }
}

/// A dead letter as `switchyard dead list` and `dead replay` read it from the stream: the input
/// is `headers \0 subject \0 payload` (the header block as NATS stores it, `NATS/1.0\r\n...`),
/// sent through async-nats' reading of a stored message, then `StoredDeadLetter::from_raw` and
/// the headers a replay would publish with. A letter prints as JSON (`dead list --json`).
pub fn dead_letter(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let headers = parts.next().unwrap_or_default();
    let subject = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let payload = parts.next().unwrap_or_default();
    let raw = json!({
        "subject": subject,
        "seq": 7,
        "data": STANDARD.encode(payload),
        "hdrs": (!headers.is_empty()).then(|| STANDARD.encode(headers)),
        "time": "2026-11-25T20:30:00Z",
    });
    let raw: async_nats::jetstream::stream::RawMessage =
        serde_json::from_value(raw).expect("a raw message");
    // What async-nats refuses never reaches Switchyard (dead list skips it).
    let Ok(message) = async_nats::jetstream::message::StreamMessage::try_from(raw) else {
        return;
    };
    let names = NatsNames::new("SWITCHYARD");
    let letter = StoredDeadLetter::from_raw(&names, &message);
    assert_eq!(letter.seq, 7);
    let replay = letter.replay_headers();
    let msg_id = replay
        .get("Nats-Msg-Id")
        .expect("a replay has a message id");
    assert!(msg_id.as_str().ends_with(":replay:7"));
    serde_json::to_string(&letter).expect("a letter prints as JSON");
}
