//! Beat: periodic tasks (Celery's beat). Every `[[beat.schedule]]` entry ticks on an interval
//! (`every`, aligned to the unix epoch so every beat computes the same ticks) or a six-field
//! cron expression in a time zone; each tick is published as a task whose id is the UUIDv5 of
//! `beat:<name>:<tick time UTC>`, so a tick fired twice (two leaders, a retried publish) is one
//! task: the broker's duplicate window drops the second publish.
//!
//! Any number of beats run; one leads. The lease is the key `leader` of the KV bucket
//! `<prefix>_beat` (value: the node id): the leader renews it every [`RENEW_EVERY`] with a
//! compare-and-swap on its revision; a standby that sees the same revision for [`LEASE_TTL`] by
//! its own clock takes it over with a compare-and-swap of its own, and a leader that stops
//! deletes the key so that a standby takes over at once. The last tick each entry fired is
//! kept beside it (`last.<name>`), so a new leader knows what is missed (`misfire`) and whether
//! the previous tick's task is still running (`overlap = "skip"`). On the memory broker the one
//! process leads and keeps that state in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::broker::BrokerError;
use super::nats::{unavailable, NatsBroker};
use super::{PublishOptions, TaskState, Tasks};

/// How long a lease lives without renewal, as a standby sees it.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the leader renews its lease and a standby looks at it.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often the beat wakes up to fire due ticks.
const TICK: Duration = Duration::from_millis(100);
/// Most ticks one entry fires in one wake-up (a long catch-up goes on at the next).
const MAX_TICKS_PER_WAKE: usize = 1000;

/// What to do with ticks missed while no beat ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misfire {
    /// Drop them: the next tick after now fires.
    Skip,
    /// Fire them, at most this far back.
    CatchUp(Duration),
}

/// When an entry ticks.
#[derive(Clone, Debug)]
pub enum Every {
    /// Every multiple of this interval since the unix epoch (whole seconds, at least one).
    Interval(Duration),
    /// A six-field cron expression (seconds first) in a time zone.
    Cron(Box<croner::Cron>, chrono_tz::Tz),
}

/// One schedule entry.
#[derive(Clone, Debug)]
pub struct BeatEntry {
    pub name: String,
    pub task: String,
    pub args: Value,
    /// `None`: the task's own queue.
    pub queue: Option<String>,
    pub every: Every,
    pub misfire: Misfire,
    /// `overlap = "skip"`: no tick fires while the previous tick's task is unfinished.
    pub skip_overlap: bool,
}

impl BeatEntry {
    /// The first tick strictly after `t`, if there is one.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.every {
            Every::Interval(d) => {
                let period = d.as_secs().max(1) as i64;
                let next = (t.timestamp().div_euclid(period) + 1).checked_mul(period)?;
                DateTime::from_timestamp(next, 0)
            }
            Every::Cron(cron, tz) => {
                use chrono::{LocalResult, TimeZone};
                let mut from = t.with_timezone(tz);
                for _ in 0..8 {
                    let next = cron.find_next_occurrence(&from, false).ok()?;
                    if next.with_timezone(&Utc) > t {
                        return Some(next.with_timezone(&Utc));
                    }
                    // The first instance of a wall-clock time that a DST change repeats,
                    // already behind `t`: its repeat does not fire, the search goes on after it.
                    let after = next.naive_local() + chrono::TimeDelta::seconds(1);
                    from = match tz.from_local_datetime(&after) {
                        LocalResult::Single(x) | LocalResult::Ambiguous(_, x) => x,
                        LocalResult::None => next + chrono::TimeDelta::seconds(1),
                    };
                }
                None
            }
        }
    }
}

/// The task id of `name`'s tick at `tick`: UUIDv5 (URL namespace) of
/// `beat:<name>:<YYYY-MM-DDTHH:MM:SSZ>`.
pub fn tick_id(name: &str, tick: DateTime<Utc>) -> String {
    let key = format!("beat:{name}:{}", tick.format("%Y-%m-%dT%H:%M:%SZ"));
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes()).to_string()
}

/// The last tick an entry fired.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fired {
    pub tick: DateTime<Utc>,
    pub id: String,
}

/// Where the lease and the last ticks live.
#[async_trait]
pub trait BeatStore: Send + Sync {
    /// Takes or renews the lease; whether this node leads now.
    async fn lead(&self) -> Result<bool, BrokerError>;
    /// Gives the lease up (a clean stop).
    async fn resign(&self);
    /// The last tick `name` fired.
    async fn last(&self, name: &str) -> Result<Option<Fired>, BrokerError>;
    /// Records the last tick `name` fired.
    async fn set_last(&self, name: &str, fired: &Fired) -> Result<(), BrokerError>;
}

/// One process, one beat: it always leads, and remembers in memory.
#[derive(Default)]
pub struct MemoryBeatStore(Mutex<HashMap<String, Fired>>);

#[async_trait]
impl BeatStore for MemoryBeatStore {
    async fn lead(&self) -> Result<bool, BrokerError> {
        Ok(true)
    }
    async fn resign(&self) {}
    async fn last(&self, name: &str) -> Result<Option<Fired>, BrokerError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned())
    }
    async fn set_last(&self, name: &str, fired: &Fired) -> Result<(), BrokerError> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(name.to_owned(), fired.clone());
        Ok(())
    }
}

/// The lease as this node knows it.
#[derive(Default)]
struct LeaseState {
    /// The revision of the `leader` entry this node wrote last, while it leads.
    held: Option<u64>,
    /// Another node's entry: its revision and when this node first saw it.
    seen: Option<(u64, Instant)>,
}

/// The lease and last ticks in the KV bucket `<prefix>_beat`.
pub struct NatsBeatStore {
    kv: kv::Store,
    node: String,
    state: Mutex<LeaseState>,
}

/// The lease key.
pub const LEADER_KEY: &str = "leader";

impl NatsBeatStore {
    /// Opens (creating when missing) the bucket `<prefix>_beat` of `broker` for node `node`.
    pub async fn open(broker: &NatsBroker, node: &str) -> Result<Self, BrokerError> {
        let bucket = format!("{}_beat", broker.names().prefix);
        super::nats::ensure_bucket(
            broker.jetstream(),
            &bucket,
            Duration::ZERO,
            broker.replicas(),
        )
        .await?;
        let kv = broker
            .jetstream()
            .get_key_value(&bucket)
            .await
            .map_err(unavailable(format!("open bucket {bucket}")))?;
        Ok(Self {
            kv,
            node: node.to_owned(),
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn last_key(name: &str) -> String {
        format!("last.{name}")
    }

    /// Writes the lease over `revision` (`None`: the key is absent); the new revision, or
    /// `None` when another node wrote first.
    async fn write(&self, revision: Option<u64>) -> Result<Option<u64>, BrokerError> {
        let value = Bytes::from(self.node.clone());
        let op = || "write the beat lease".to_owned();
        match revision {
            Some(rev) => match self.kv.update(LEADER_KEY, value, rev).await {
                Ok(r) => Ok(Some(r)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(BrokerError::unavailable(op(), e)),
            },
            None => match self.kv.create(LEADER_KEY, value).await {
                Ok(r) => Ok(Some(r)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(BrokerError::unavailable(op(), e)),
            },
        }
    }
}

#[async_trait]
impl BeatStore for NatsBeatStore {
    async fn lead(&self) -> Result<bool, BrokerError> {
        let held = self.state().held;
        if let Some(rev) = held {
            let renewed = self.write(Some(rev)).await?;
            self.state().held = renewed;
            if renewed.is_none() {
                tracing::warn!(node = %self.node, "beat lease lost to another node");
            }
            return Ok(renewed.is_some());
        }
        let entry = self
            .kv
            .entry(LEADER_KEY)
            .await
            .map_err(unavailable("read the beat lease"))?;
        let take = match &entry {
            // No leader (never one, or one that resigned): take it.
            None => Some(None),
            Some(e) if e.operation != kv::Operation::Put => Some(Some(e.revision)),
            // Our own lease from before a restart of this node id.
            Some(e) if e.value.as_ref() == self.node.as_bytes() => Some(Some(e.revision)),
            Some(e) => {
                let mut state = self.state();
                match state.seen {
                    Some((rev, since)) if rev == e.revision && since.elapsed() >= LEASE_TTL => {
                        Some(Some(e.revision))
                    }
                    Some((rev, _)) if rev == e.revision => None,
                    _ => {
                        state.seen = Some((e.revision, Instant::now()));
                        None
                    }
                }
            }
        };
        let Some(revision) = take else {
            return Ok(false);
        };
        let won = self.write(revision).await?;
        let mut state = self.state();
        state.held = won;
        state.seen = None;
        if won.is_some() {
            tracing::info!(node = %self.node, "beat lease taken: this node leads");
        }
        Ok(won.is_some())
    }

    async fn resign(&self) {
        let held = self.state().held.take();
        if let Some(rev) = held {
            match self.kv.delete_expect_revision(LEADER_KEY, Some(rev)).await {
                Ok(()) => tracing::info!(node = %self.node, "beat lease released"),
                Err(e) => tracing::warn!(node = %self.node, "cannot release the beat lease: {e}"),
            }
        }
    }

    async fn last(&self, name: &str) -> Result<Option<Fired>, BrokerError> {
        let value = self
            .kv
            .get(Self::last_key(name))
            .await
            .map_err(unavailable(format!("read the last tick of {name}")))?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    async fn set_last(&self, name: &str, fired: &Fired) -> Result<(), BrokerError> {
        let bytes = serde_json::to_vec(fired).map_err(|e| BrokerError::data("last tick", e))?;
        self.kv
            .put(Self::last_key(name), Bytes::from(bytes))
            .await
            .map(|_| ())
            .map_err(unavailable(format!("write the last tick of {name}")))
    }
}

/// One entry's position while this node leads.
struct Cursor {
    /// Ticks up to here are handled (fired or skipped).
    at: DateTime<Utc>,
    last: Option<Fired>,
}

/// The beat: fires its entries' ticks while it leads.
pub struct Beat {
    entries: Vec<BeatEntry>,
    store: Arc<dyn BeatStore>,
    tasks: Tasks,
    result_ttl: Duration,
}

impl Beat {
    /// A beat of `entries`, publishing through `tasks`, leading through `store`.
    pub fn new(
        entries: Vec<BeatEntry>,
        store: Arc<dyn BeatStore>,
        tasks: Tasks,
        result_ttl: Duration,
    ) -> Self {
        Self {
            entries,
            store,
            tasks,
            result_ttl,
        }
    }

    /// Runs until `stop` fires, then resigns the lease.
    pub async fn run(self, stop: CancellationToken) {
        let mut cursors: Option<Vec<Cursor>> = None;
        let mut checked: Option<Instant> = None;
        tracing::info!(entries = self.entries.len(), "beat started");
        loop {
            if checked.is_none_or(|c| c.elapsed() >= RENEW_EVERY) {
                checked = Some(Instant::now());
                match self.store.lead().await {
                    Ok(true) if cursors.is_none() => cursors = Some(self.cursors().await),
                    Ok(true) => {}
                    Ok(false) => cursors = None,
                    Err(e) => {
                        // Without the store no tick can be recorded; a standby may take over.
                        tracing::warn!("beat: {e}");
                        cursors = None;
                    }
                }
            }
            if let Some(cursors) = cursors.as_mut() {
                for (entry, cursor) in self.entries.iter().zip(cursors.iter_mut()) {
                    self.fire_due(entry, cursor).await;
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(TICK) => {}
            }
        }
        self.store.resign().await;
        tracing::info!("beat stopped");
    }

    /// Where each entry starts when this node begins to lead (see [`Misfire`]).
    async fn cursors(&self) -> Vec<Cursor> {
        let now = Utc::now();
        let mut out = Vec::with_capacity(self.entries.len());
        for entry in &self.entries {
            let last = match self.store.last(&entry.name).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(schedule = %entry.name, "beat: {e}");
                    None
                }
            };
            let floor = match entry.misfire {
                Misfire::Skip => now,
                Misfire::CatchUp(window) => chrono::TimeDelta::from_std(window)
                    .ok()
                    .and_then(|w| now.checked_sub_signed(w))
                    .unwrap_or(now),
            };
            // A schedule that never fired starts now.
            let at = last.as_ref().map_or(now, |l| l.tick.max(floor));
            out.push(Cursor { at, last });
        }
        out
    }

    /// Fires `entry`'s ticks that are due.
    async fn fire_due(&self, entry: &BeatEntry, cursor: &mut Cursor) {
        let now = Utc::now();
        for _ in 0..MAX_TICKS_PER_WAKE {
            let Some(tick) = entry.next_after(cursor.at).filter(|t| *t <= now) else {
                return;
            };
            if entry.skip_overlap && self.previous_unfinished(cursor.last.as_ref(), now).await {
                tracing::debug!(schedule = %entry.name, %tick, "previous tick unfinished: skipped");
                cursor.at = tick;
                continue;
            }
            let id = tick_id(&entry.name, tick);
            let mut options = PublishOptions::new().task_id(id.clone());
            options.queue = entry.queue.clone();
            match self
                .tasks
                .send(&entry.task, entry.args.clone(), options)
                .await
            {
                Ok(_) => {
                    let at = tick.to_rfc3339_opts(SecondsFormat::Secs, true);
                    tracing::info!(schedule = %entry.name, tick = %at, task_id = %id, "tick fired");
                    let fired = Fired { tick, id };
                    if let Err(e) = self.store.set_last(&entry.name, &fired).await {
                        tracing::warn!(schedule = %entry.name, "beat: {e}");
                    }
                    cursor.last = Some(fired);
                    cursor.at = tick;
                }
                Err(e) => {
                    // The same tick (same id) is tried again at the next wake-up.
                    tracing::warn!(schedule = %entry.name, "cannot fire tick {tick}: {e}");
                    return;
                }
            }
        }
    }

    /// Whether the task of the last fired tick has not finished (a record that is not final,
    /// or none yet while the result could still come).
    async fn previous_unfinished(&self, last: Option<&Fired>, now: DateTime<Utc>) -> bool {
        let Some(last) = last else { return false };
        let recent = (now - last.tick)
            .to_std()
            .map_or(true, |age| age < self.result_ttl);
        match self.tasks.result(&last.id).await {
            Ok(r) => {
                let done = matches!(
                    r.state,
                    TaskState::Success | TaskState::Failure | TaskState::Revoked
                );
                !done && recent
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn entry(every: Every) -> BeatEntry {
        BeatEntry {
            name: "e".into(),
            task: "t".into(),
            args: Value::Object(Default::default()),
            queue: None,
            every,
            misfire: Misfire::Skip,
            skip_overlap: false,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn cron(expr: &str, tz: &str) -> Every {
        let c = croner::Cron::new(expr)
            .with_seconds_required()
            .parse()
            .expect("cron");
        Every::Cron(Box::new(c), chrono_tz::Tz::from_str(tz).expect("tz"))
    }

    #[test]
    fn intervals_tick_on_multiples_of_the_period_since_the_epoch() {
        let e = entry(Every::Interval(Duration::from_secs(300)));
        let t = at("2026-12-01T10:02:13Z");
        assert_eq!(e.next_after(t), Some(at("2026-12-01T10:05:00Z")));
        assert_eq!(
            e.next_after(at("2026-12-01T10:05:00Z")),
            Some(at("2026-12-01T10:10:00Z"))
        );
    }

    #[test]
    fn cron_ticks_follow_the_time_zone() {
        // 09:00 in Lisbon is 09:00 UTC in winter and 08:00 UTC in summer.
        let e = entry(cron("0 0 9 * * *", "Europe/Lisbon"));
        assert_eq!(
            e.next_after(at("2026-12-01T10:00:00Z")),
            Some(at("2026-12-02T09:00:00Z"))
        );
        assert_eq!(
            e.next_after(at("2026-07-01T10:00:00Z")),
            Some(at("2026-07-02T08:00:00Z"))
        );
    }

    #[test]
    fn a_local_time_that_dst_repeats_fires_once() {
        // Lisbon falls back on 2026-10-25 at 02:00 WEST to 01:00 WET: 01:30 happens twice.
        let e = entry(cron("0 30 1 * * *", "Europe/Lisbon"));
        let first = e.next_after(at("2026-10-24T23:00:00Z")).expect("first");
        assert_eq!(first, at("2026-10-25T00:30:00Z"));
        let next = e.next_after(first).expect("next");
        assert_eq!(next, at("2026-10-26T01:30:00Z"), "the repeat is skipped");
        // From between the two 01:30s as well.
        let between = e.next_after(at("2026-10-25T01:10:00Z")).expect("between");
        assert_eq!(between, at("2026-10-26T01:30:00Z"));
    }

    #[test]
    fn a_local_time_that_dst_skips_moves_on() {
        // Lisbon springs forward on 2026-03-29 at 01:00 WET to 02:00 WEST: 01:30 never happens.
        let e = entry(cron("0 30 1 * * *", "Europe/Lisbon"));
        let t = e.next_after(at("2026-03-28T12:00:00Z")).expect("next");
        assert!(t > at("2026-03-28T12:00:00Z"));
        assert!(t <= at("2026-03-30T00:30:00Z"), "{t}");
    }

    #[test]
    fn tick_ids_are_uuidv5_of_name_and_time() {
        let t = at("2026-12-01T10:05:00Z");
        let want = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            b"beat:clear-sessions:2026-12-01T10:05:00Z",
        );
        assert_eq!(tick_id("clear-sessions", t), want.to_string());
        assert_ne!(tick_id("clear-sessions", t), tick_id("other", t));
    }
}
