//! The task message (SPEC.md's format) and the per-call publishing options.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The namespace of ids given to foreign messages that carry none (UUIDv5 of
/// `"<stream>:<sequence>"`), so a redelivery keeps its id.
const FALLBACK_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5d1c_8f3e_2a47_4b7e_9c0d_71e2_a3b4_c5d6);

/// A task message, as it travels (JSON, UTF-8). Only `task` and `args` are required from a
/// foreign publisher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The task id; a foreign message without one gets [`Envelope::fallback_id`].
    #[serde(default)]
    pub id: Option<String>,
    /// The registered task name.
    pub task: String,
    /// The arguments: must be a JSON object.
    pub args: Value,
    /// The queue it was published to (the broker's subject is what decides).
    #[serde(default)]
    pub queue: Option<String>,
    /// Retries so far, at publish time.
    #[serde(default)]
    pub retries: u32,
    /// Retries allowed; `None`: the task's own or `tasks.default_max_retries`.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Not to run before this time.
    #[serde(default, serialize_with = "super::stamp::option")]
    pub eta: Option<DateTime<Utc>>,
    /// Not to start after this time (then REVOKED, error `"expired"`).
    #[serde(default, serialize_with = "super::stamp::option")]
    pub expires: Option<DateTime<Utc>>,
    /// When it was published.
    #[serde(default, serialize_with = "super::stamp::option")]
    pub published_at: Option<DateTime<Utc>>,
    /// The task this message retries (set by the dashboard's "Retry"); its record names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// A canvas member: `{"id": "<canvas id>", "index": n}` (docs/task-protocol.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canvas: Option<Value>,
    /// A canvas message (`switchyard.chain`, `.group`, `.chord`): its members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Value>,
    /// A chord message: its callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Value>,
}

impl Envelope {
    /// The deterministic id of a message without one: UUIDv5 of its stream and sequence.
    pub fn fallback_id(stream: &str, seq: u64) -> String {
        Uuid::new_v5(&FALLBACK_ID_NAMESPACE, format!("{stream}:{seq}").as_bytes()).to_string()
    }

    /// Whether the task must no longer start at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// How long until the eta, if it is in the future.
    pub fn wait_for_eta(&self, now: DateTime<Utc>) -> Option<Duration> {
        self.eta
            .and_then(|eta| (eta - now).to_std().ok())
            .filter(|d| !d.is_zero())
    }
}

/// Whether `id` is a task id SPEC.md allows: 1–128 characters of `[A-Za-z0-9_-]` (UUIDs fit).
/// Any other id is dead-lettered at once (`bad id`): it could not be a result key.
pub fn is_valid_task_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A new task id: a lowercase hyphenated UUID v7 (time-ordered). The random bits come from
/// the thread-local generator rather than a system call per id.
pub fn new_task_id() -> String {
    let millis = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

/// Options of one publish (Celery's `apply_async` keywords); unset fields take the task's
/// options, then `[tasks]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PublishOptions {
    /// Use this id instead of a fresh one (it must be unique).
    pub task_id: Option<String>,
    /// Run no sooner than this long from now.
    pub countdown: Option<Duration>,
    /// Run no sooner than this time (wins over `countdown`).
    pub eta: Option<DateTime<Utc>>,
    /// Do not start after this time.
    pub expires: Option<DateTime<Utc>>,
    /// Publish to this queue.
    pub queue: Option<String>,
    /// Retries allowed after the first attempt.
    pub max_retries: Option<u32>,
    /// A deduplication key: a second publish with the same key within `tasks.dedupe_window`
    /// is dropped, and its handle names the first task.
    pub unique: Option<String>,
}

impl PublishOptions {
    /// Every option unset.
    pub fn new() -> Self {
        Self::default()
    }
    /// Uses `id` as the task id.
    pub fn task_id(mut self, id: impl Into<String>) -> Self {
        self.task_id = Some(id.into());
        self
    }
    /// Runs no sooner than `countdown` from now.
    pub fn countdown(mut self, countdown: Duration) -> Self {
        self.countdown = Some(countdown);
        self
    }
    /// Runs no sooner than `eta`.
    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.eta = Some(eta);
        self
    }
    /// Does not start after `expires`.
    pub fn expires(mut self, expires: DateTime<Utc>) -> Self {
        self.expires = Some(expires);
        self
    }
    /// Does not start later than `after` from now (a time past year 9999 saturates there).
    pub fn expires_in(mut self, after: Duration) -> Self {
        let at = chrono::TimeDelta::from_std(after)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d));
        // 9999-12-31T23:59:59Z: the last time RFC 3339 writes.
        let end = DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.expires = Some(at.filter(|t| *t < end).unwrap_or(end));
        self
    }
    /// Publishes to `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    /// Allows `n` retries.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = Some(n);
        self
    }
    /// Deduplicates on `key`.
    pub fn unique(mut self, key: impl Into<String>) -> Self {
        self.unique = Some(key.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_parses_and_foreign_minimum_too() {
        let m: Envelope = serde_json::from_str(
            r#"{"id": "0192f7c4-7c1e-7a51-8f0e-3b7d2a9c4e11", "task": "shop.order_created",
                "args": {"order_id": 42}, "queue": "emails", "retries": 0, "max_retries": 5,
                "eta": null, "expires": null, "published_at": "2026-11-25T20:30:00Z"}"#,
        )
        .expect("spec example");
        assert_eq!(m.max_retries, Some(5));
        assert_eq!(m.args["order_id"], 42);
        let m: Envelope =
            serde_json::from_str(r#"{"task": "demo.add", "args": {"x": 1, "y": 2}}"#).expect("min");
        assert_eq!(m.id, None);
        assert_eq!(m.retries, 0);
    }

    #[test]
    fn huge_expiry_saturates() {
        let o = PublishOptions::new().expires_in(Duration::MAX);
        let at = o.expires.expect("set");
        let text = serde_json::to_string(&at).expect("encodes");
        assert_eq!(text, "\"9999-12-31T23:59:59Z\"");
        let back: DateTime<Utc> = serde_json::from_str(&text).expect("decodes");
        assert_eq!(back, at);
    }

    #[test]
    fn task_ids_are_checked_as_spec_says() {
        assert!(is_valid_task_id(&new_task_id()));
        assert!(is_valid_task_id("a"));
        assert!(is_valid_task_id("order_42-b"));
        assert!(is_valid_task_id(&"x".repeat(128)));
        assert!(!is_valid_task_id(&"x".repeat(129)));
        for bad in ["", "a*b", "a>b", "a b", "a.b", "é", "a/b", "a\nb"] {
            assert!(!is_valid_task_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_lowercase_uuids_and_fallbacks_are_stable() {
        let id = new_task_id();
        assert_eq!(id, id.to_lowercase());
        let parsed = Uuid::parse_str(&id).expect("a uuid");
        assert_eq!(parsed.get_version_num(), 7);
        assert_ne!(new_task_id(), id);
        assert_eq!(
            Envelope::fallback_id("SWITCHYARD_TASKS", 7),
            Envelope::fallback_id("SWITCHYARD_TASKS", 7)
        );
        assert_ne!(
            Envelope::fallback_id("SWITCHYARD_TASKS", 7),
            Envelope::fallback_id("SWITCHYARD_TASKS", 8)
        );
    }
}
