//! The `memory` broker: queues and results inside one process, with the NATS broker's
//! semantics (at-least-once delivery with an ack deadline, delayed redelivery, deduplication,
//! result TTL, atomic claim/revoke).
//!
//! Its state sits behind one mutex: publishers are HTTP workers and consumers are worker
//! actors on other threads, every critical section is a few map operations with no await
//! inside, and one lock makes claim/revoke and deliver/ack trivially atomic. Each queue has a
//! `Notify` so idle consumers sleep until a message arrives or a delayed one comes due.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::Notify;

use super::broker::{
    revocable, Acker, BrokerError, Claim, DeadLetter, Delivery, Outgoing, PublishOutcome,
    ResultStore, TaskQueue,
};
use super::canvas::Updated;
use super::record::Revocation;
use super::{ResultRecord, TaskSettings};

/// The stream name used for fallback ids of messages without one.
const STREAM: &str = "MEMORY_TASKS";
/// How often expired results and dedupe ids are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Dead letters kept (the oldest are dropped).
const MAX_DEAD_LETTERS: usize = 10_000;

#[derive(Clone)]
struct Message {
    seq: u64,
    payload: Arc<Vec<u8>>,
    /// Deliveries so far.
    delivered: u32,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Message>,
    /// Held until their time: keyed by (due, seq).
    delayed: BTreeMap<(Instant, u64), Message>,
    /// Delivered, not yet acknowledged: seq → (message, ack deadline).
    in_flight: HashMap<u64, (Message, Instant)>,
}

impl QueueState {
    /// Moves due delayed messages and overdue deliveries back to `ready`.
    fn promote(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
        let overdue: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in overdue {
            if let Some((msg, _)) = self.in_flight.remove(&seq) {
                self.ready.push_back(msg);
            }
        }
    }

    /// When something next becomes deliverable without a publish.
    fn next_wake(&self) -> Option<Instant> {
        let delayed = self.delayed.keys().next().map(|(t, _)| *t);
        let overdue = self.in_flight.values().map(|(_, d)| *d).min();
        match (delayed, overdue) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

struct StoredResult {
    record: ResultRecord,
    expires: Instant,
}

struct State {
    queues: HashMap<String, QueueState>,
    results: HashMap<String, StoredResult>,
    /// With a result limit: ids in the order their records were first written.
    result_order: VecDeque<String>,
    /// dedupe id → (until, task id).
    dedupe: HashMap<String, (Instant, String)>,
    /// Dead letters with their numbers (from 1, never reused).
    dead: VecDeque<(u64, DeadLetter)>,
    next_dead: u64,
    next_seq: u64,
    last_sweep: Instant,
}

struct Inner {
    state: Mutex<State>,
    notify: HashMap<String, Notify>,
    ack_wait: Duration,
    result_ttl: Duration,
    dedupe_window: Duration,
    /// Most result records kept (the oldest are dropped first); `None`: no limit but the TTL.
    max_results: Option<usize>,
    /// The cluster-wide rate limits' leases (on this broker the node is the cluster).
    leases: std::sync::Mutex<super::rate::LeaseTable>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, queue: &str) {
        if let Some(n) = self.notify.get(queue) {
            n.notify_one();
        }
    }
}

impl State {
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        self.results.retain(|_, r| r.expires > now);
        self.dedupe.retain(|_, (until, _)| *until > now);
    }

    /// Stores `record` until `expires`, dropping the oldest records beyond `max`.
    fn store_result(&mut self, record: ResultRecord, expires: Instant, max: Option<usize>) {
        let id = record.id.clone();
        let fresh = self
            .results
            .insert(id.clone(), StoredResult { record, expires })
            .is_none();
        let Some(max) = max else {
            return;
        };
        if fresh {
            self.result_order.push_back(id);
        }
        // Ids forgotten meanwhile stay in the order list: bounded by twice the limit.
        while self.results.len() > max || self.result_order.len() > max.saturating_mul(2) {
            let Some(old) = self.result_order.pop_front() else {
                break;
            };
            self.results.remove(&old);
        }
    }

    fn live_result(&self, id: &str, now: Instant) -> Option<&ResultRecord> {
        self.results
            .get(id)
            .filter(|r| r.expires > now)
            .map(|r| &r.record)
    }
}

/// The in-process broker. Cloning shares the queues.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl MemoryBroker {
    /// A broker serving the queues of `settings`, with its ack wait, result TTL and dedupe
    /// window.
    pub fn new(settings: &TaskSettings) -> Self {
        Self::build(
            settings.queues.iter().map(|q| q.name.as_str()),
            settings,
            None,
        )
    }

    /// A result store (and a queue serving nothing) keeping at most `max_results` records,
    /// the oldest written dropped first: eager mode's store.
    pub fn results_only(settings: &TaskSettings, max_results: usize) -> Self {
        Self::build(std::iter::empty(), settings, Some(max_results.max(1)))
    }

    /// A queue serving only `queue` (eager mode's private queue for one publish).
    pub(crate) fn single_queue(queue: &str, settings: &TaskSettings) -> Self {
        Self::build(std::iter::once(queue), settings, None)
    }

    fn build<'a>(
        queue_names: impl Iterator<Item = &'a str> + Clone,
        settings: &TaskSettings,
        max_results: Option<usize>,
    ) -> Self {
        let queues = queue_names
            .clone()
            .map(|q| (q.to_owned(), QueueState::default()))
            .collect();
        let notify = queue_names.map(|q| (q.to_owned(), Notify::new())).collect();
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    queues,
                    results: HashMap::new(),
                    result_order: VecDeque::new(),
                    dedupe: HashMap::new(),
                    dead: VecDeque::new(),
                    next_dead: 0,
                    next_seq: 1,
                    last_sweep: Instant::now(),
                }),
                notify,
                ack_wait: settings.ack_wait,
                result_ttl: settings.result_ttl,
                dedupe_window: settings.dedupe_window,
                max_results,
                leases: Default::default(),
            }),
        }
    }

    /// The dead letters kept so far, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner
            .lock()
            .dead
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The dead letters kept so far with their numbers, oldest first.
    pub fn numbered_dead_letters(&self) -> Vec<(u64, DeadLetter)> {
        self.inner.lock().dead.iter().cloned().collect()
    }

    /// Removes the dead letters numbered `numbers`; returns those it removed.
    pub fn remove_dead_letters(&self, numbers: &[u64]) -> Vec<(u64, DeadLetter)> {
        let mut state = self.inner.lock();
        let (gone, kept) = std::mem::take(&mut state.dead)
            .into_iter()
            .partition(|(n, _)| numbers.contains(n));
        state.dead = kept;
        gone.into_iter().collect()
    }

    /// Messages of `queue` waiting or in flight.
    pub fn depth(&self, queue: &str) -> usize {
        self.inner
            .lock()
            .queues
            .get(queue)
            .map_or(0, |q| q.ready.len() + q.delayed.len() + q.in_flight.len())
    }

    /// Delivers up to `max` ready messages; when none is ready, says when one may be.
    fn take(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Result<Vec<Delivery>, Option<Instant>>, BrokerError> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        let q = state
            .queues
            .get_mut(queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.to_owned()))?;
        q.promote(now);
        if q.ready.is_empty() {
            return Ok(Err(q.next_wake()));
        }
        let mut out = Vec::new();
        while out.len() < max.max(1) {
            let Some(mut msg) = q.ready.pop_front() else {
                break;
            };
            msg.delivered = msg.delivered.saturating_add(1);
            let (seq, delivered, payload) = (msg.seq, msg.delivered, msg.payload.clone());
            q.in_flight.insert(seq, (msg, now + self.inner.ack_wait));
            let acker = MemoryAcker {
                inner: self.inner.clone(),
                queue: queue.to_owned(),
                seq,
                delivered,
            };
            out.push(Delivery::new(
                payload.as_ref().clone(),
                queue.to_owned(),
                seq,
                delivered,
                Box::new(acker),
            ));
        }
        Ok(Ok(out))
    }
}

/// Acknowledges one delivery; acts only while that delivery is the current one (an ack after
/// the deadline passed and the message went to another consumer is ignored).
struct MemoryAcker {
    inner: Arc<Inner>,
    queue: String,
    seq: u64,
    delivered: u32,
}

impl MemoryAcker {
    fn with_current<R>(&self, f: impl FnOnce(&mut QueueState) -> R) -> Option<R> {
        let mut state = self.inner.lock();
        let q = state.queues.get_mut(&self.queue)?;
        let current = q
            .in_flight
            .get(&self.seq)
            .is_some_and(|(m, _)| m.delivered == self.delivered);
        current.then(|| f(q))
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.with_current(|q| q.in_flight.remove(&self.seq));
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), BrokerError> {
        // A delay too far for the clock: as far as a day (the runner caps etas far below).
        let now = Instant::now();
        let due = now
            .checked_add(delay)
            .unwrap_or(now + Duration::from_secs(86_400));
        let requeued = self.with_current(|q| {
            if let Some((msg, _)) = q.in_flight.remove(&self.seq) {
                if delay.is_zero() {
                    q.ready.push_back(msg);
                } else {
                    q.delayed.insert((due, msg.seq), msg);
                }
            }
        });
        if requeued.is_some() {
            self.inner.notify(&self.queue);
        }
        Ok(())
    }

    async fn progress(&self) -> Result<(), BrokerError> {
        let deadline = Instant::now() + self.inner.ack_wait;
        self.with_current(|q| {
            if let Some(entry) = q.in_flight.get_mut(&self.seq) {
                entry.1 = deadline;
            }
        });
        Ok(())
    }
}

#[async_trait]
impl TaskQueue for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn rate_lease(
        &self,
        key: &str,
        interval_ns: u64,
        want: u32,
        now_ns: u64,
        ahead_ns: u64,
    ) -> Result<super::rate::Grant, BrokerError> {
        let mut leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        Ok(leases.lease(key, interval_ns, want, now_ns, ahead_ns, Instant::now()))
    }

    async fn defer(
        &self,
        delivery: &Delivery,
        _id: &str,
        _task: &str,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        let now = Instant::now();
        let due = now
            .checked_add(delay)
            .unwrap_or(now + Duration::from_secs(86_400));
        let moved = {
            let mut state = self.inner.lock();
            let Some(q) = state.queues.get_mut(&delivery.queue) else {
                return Ok(());
            };
            let current = q
                .in_flight
                .get(&delivery.seq)
                .is_some_and(|(m, _)| m.delivered == delivery.delivered);
            match current.then(|| q.in_flight.remove(&delivery.seq)).flatten() {
                Some((mut msg, _)) => {
                    // Waiting for the rate limit is not a delivery.
                    msg.delivered = msg.delivered.saturating_sub(1);
                    q.delayed.insert((due, msg.seq), msg);
                    true
                }
                None => false,
            }
        };
        if moved {
            self.inner.notify(&delivery.queue);
        }
        Ok(())
    }

    fn stream(&self) -> &str {
        STREAM
    }

    async fn publish(&self, msg: Outgoing) -> Result<PublishOutcome, BrokerError> {
        let now = Instant::now();
        {
            let mut state = self.inner.lock();
            state.sweep(now);
            if let Some((until, original)) = state.dedupe.get(&msg.dedupe_id) {
                if *until > now {
                    return Ok(PublishOutcome::Duplicate {
                        original_id: Some(original.clone()),
                    });
                }
            }
            if !state.queues.contains_key(&msg.queue) {
                return Err(BrokerError::UnknownQueue(msg.queue));
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let until = now + self.inner.dedupe_window;
            state.dedupe.insert(msg.dedupe_id, (until, msg.id));
            let message = Message {
                seq,
                payload: Arc::new(msg.payload),
                delivered: 0,
            };
            let due = msg
                .not_before
                .and_then(|t| (t - Utc::now()).to_std().ok())
                .filter(|d| !d.is_zero())
                .and_then(|d| now.checked_add(d));
            let q = state
                .queues
                .get_mut(&msg.queue)
                .ok_or_else(|| BrokerError::UnknownQueue(msg.queue.clone()))?;
            match due {
                Some(due) => {
                    q.delayed.insert((due, seq), message);
                }
                None => q.ready.push_back(message),
            }
        }
        self.inner.notify(&msg.queue);
        Ok(PublishOutcome::Queued)
    }

    async fn fetch(&self, queue: &str, wait: Duration) -> Result<Option<Delivery>, BrokerError> {
        Ok(self.fetch_batch(queue, 1, wait).await?.pop())
    }

    async fn fetch_batch(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = Instant::now() + wait;
        let notify = self
            .inner
            .notify
            .get(queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.to_owned()))?;
        // Each round either delivers, returns at the deadline, or sleeps until a publish, a
        // delayed message comes due, or the deadline: bounded by `wait`.
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = match self.take(queue, max)? {
                Ok(deliveries) => return Ok(deliveries),
                Err(next) => next,
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = next.map_or(deadline, |t| t.min(deadline));
            let _ = tokio::time::timeout_at(until.into(), notified).await;
        }
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut state = self.inner.lock();
        let q = state
            .queues
            .get_mut(queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.to_owned()))?;
        let n = q.ready.len() + q.delayed.len();
        q.ready.clear();
        q.delayed.clear();
        Ok(n as u64)
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BrokerError> {
        let mut state = self.inner.lock();
        if state.dead.len() >= MAX_DEAD_LETTERS {
            state.dead.pop_front();
        }
        state.next_dead += 1;
        let n = state.next_dead;
        state.dead.push_back((n, letter));
        Ok(())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

#[async_trait]
impl ResultStore for MemoryBroker {
    async fn put_result(&self, record: &ResultRecord) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        state.sweep(now);
        let expires = now + self.inner.result_ttl;
        state.store_result(record.clone(), expires, self.inner.max_results);
        Ok(())
    }

    async fn get_result(&self, id: &str) -> Result<Option<ResultRecord>, BrokerError> {
        Ok(self.inner.lock().live_result(id, Instant::now()).cloned())
    }

    async fn forget_result(&self, id: &str) -> Result<(), BrokerError> {
        self.inner.lock().results.remove(id);
        Ok(())
    }

    async fn claim(&self, started: &ResultRecord) -> Result<Claim, BrokerError> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        if let Some(r) = state.live_result(&started.id, now) {
            if r.state.is_ready() {
                return Ok(Claim::Refused(r.state));
            }
        }
        let expires = now + self.inner.result_ttl;
        state.store_result(started.clone(), expires, self.inner.max_results);
        Ok(Claim::Claimed)
    }

    async fn put_unrun(
        &self,
        record: &ResultRecord,
        replace: &(dyn for<'r> Fn(&'r ResultRecord) -> bool + Send + Sync),
    ) -> Result<bool, BrokerError> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        if state
            .live_result(&record.id, now)
            .is_some_and(|r| !replace(r))
        {
            return Ok(false);
        }
        let expires = now + self.inner.result_ttl;
        state.store_result(record.clone(), expires, self.inner.max_results);
        Ok(true)
    }

    async fn revoke(&self, id: &str) -> Result<bool, BrokerError> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        let existing = state.live_result(id, now);
        if !revocable(existing) {
            return Ok(false);
        }
        let record = existing
            .cloned()
            .unwrap_or_else(|| ResultRecord::pending(id))
            .revoked(Revocation::Revoked, Utc::now());
        let expires = now + self.inner.result_ttl;
        state.store_result(record, expires, self.inner.max_results);
        Ok(true)
    }

    async fn update_result(
        &self,
        id: &str,
        change: &(dyn for<'r> Fn(Option<&'r ResultRecord>) -> Option<ResultRecord> + Send + Sync),
    ) -> Result<Updated, BrokerError> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        let before = state.live_result(id, now).cloned();
        let after = change(before.as_ref());
        if let Some(rec) = &after {
            let expires = now + self.inner.result_ttl;
            state.store_result(rec.clone(), expires, self.inner.max_results);
        }
        Ok(Updated { before, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{QueueSpec, TaskState};

    fn broker(ack_wait_ms: u64, ttl_ms: u64) -> MemoryBroker {
        MemoryBroker::new(&TaskSettings {
            queues: vec![QueueSpec::new("q", 1)],
            ack_wait: Duration::from_millis(ack_wait_ms),
            result_ttl: Duration::from_millis(ttl_ms),
            dedupe_window: Duration::from_millis(200),
            ..TaskSettings::default()
        })
    }

    fn msg(id: &str, dedupe: &str) -> Outgoing {
        Outgoing {
            id: id.into(),
            queue: "q".into(),
            payload: id.as_bytes().to_vec(),
            dedupe_id: dedupe.into(),
            not_before: None,
        }
    }

    #[tokio::test]
    async fn a_deferred_delivery_comes_back_uncounted_and_leases_hold_per_key() {
        let b = broker(60_000, 60_000);
        b.publish(msg("a", "a")).await.expect("publish");
        for _ in 0..20 {
            let d = b
                .fetch("q", Duration::from_secs(2))
                .await
                .expect("fetch")
                .expect("delivered");
            // Waiting for the rate limit never counts towards max_deliver.
            assert_eq!(d.delivered, 1);
            b.defer(&d, "a", "t", Duration::from_millis(5))
                .await
                .expect("defer");
        }
        // The node is the cluster: one lease table for every worker of the broker.
        let ms = 1_000_000;
        let g = b
            .rate_lease("k", 100 * ms, 1, 0, 100 * ms)
            .await
            .expect("lease");
        assert_eq!((g.first_ns, g.n), (0, 1));
        let g = b
            .rate_lease("k", 100 * ms, 1, 0, 100 * ms)
            .await
            .expect("lease");
        assert_eq!((g.first_ns, g.n), (100 * ms, 1));
        let g = b
            .rate_lease("k", 100 * ms, 1, 0, 100 * ms)
            .await
            .expect("lease");
        assert_eq!((g.first_ns, g.n), (200 * ms, 0));
        let g = b
            .rate_lease("other", 100 * ms, 1, 0, 100 * ms)
            .await
            .expect("lease");
        assert_eq!((g.first_ns, g.n), (0, 1));
    }

    #[tokio::test]
    async fn an_unacknowledged_delivery_comes_back_after_ack_wait() {
        let b = broker(100, 60_000);
        b.publish(msg("a", "a")).await.expect("publish");
        let first = b
            .fetch("q", Duration::from_millis(10))
            .await
            .expect("fetch")
            .expect("delivered");
        assert_eq!(first.delivered, 1);
        assert!(b
            .fetch("q", Duration::from_millis(20))
            .await
            .expect("fetch")
            .is_none());
        drop(first); // a crashed consumer
        let t0 = Instant::now();
        let again = b
            .fetch("q", Duration::from_secs(2))
            .await
            .expect("fetch")
            .expect("redelivered");
        assert_eq!((again.seq, again.delivered), (1, 2));
        assert!(t0.elapsed() < Duration::from_secs(1));
        again.ack().await.expect("ack");
        assert_eq!(b.depth("q"), 0);
    }

    #[tokio::test]
    async fn nak_redelivers_after_the_delay_and_stale_acks_are_ignored() {
        let b = broker(60_000, 60_000);
        b.publish(msg("a", "a")).await.expect("publish");
        let d = b
            .fetch("q", Duration::from_millis(10))
            .await
            .expect("fetch")
            .expect("delivered");
        let t0 = Instant::now();
        d.nak(Duration::from_millis(80)).await.expect("nak");
        d.ack().await.expect("stale ack is a no-op");
        let again = b
            .fetch("q", Duration::from_secs(2))
            .await
            .expect("fetch")
            .expect("redelivered");
        assert!(t0.elapsed() >= Duration::from_millis(80));
        assert_eq!(again.delivered, 2);
    }

    #[tokio::test]
    async fn a_batch_takes_what_is_ready_up_to_max() {
        let b = broker(60_000, 60_000);
        for id in ["a", "b", "c"] {
            b.publish(msg(id, id)).await.expect("publish");
        }
        let batch = b
            .fetch_batch("q", 2, Duration::from_millis(10))
            .await
            .expect("fetch");
        assert_eq!(
            batch.iter().map(|d| d.payload.clone()).collect::<Vec<_>>(),
            [b"a".to_vec(), b"b".to_vec()]
        );
        let rest = b
            .fetch_batch("q", 5, Duration::from_millis(10))
            .await
            .expect("fetch");
        assert_eq!(rest.len(), 1);
        assert!(b
            .fetch_batch("q", 5, Duration::from_millis(10))
            .await
            .expect("fetch")
            .is_empty());
    }

    #[tokio::test]
    async fn duplicates_within_the_window_are_dropped() {
        let b = broker(60_000, 60_000);
        assert_eq!(
            b.publish(msg("a", "unique:k")).await.expect("publish"),
            PublishOutcome::Queued
        );
        assert_eq!(
            b.publish(msg("b", "unique:k")).await.expect("publish"),
            PublishOutcome::Duplicate {
                original_id: Some("a".into())
            }
        );
        assert_eq!(b.depth("q"), 1);
        assert!(matches!(
            b.publish(Outgoing {
                queue: "nope".into(),
                ..msg("c", "c")
            })
            .await,
            Err(BrokerError::UnknownQueue(_))
        ));
    }

    #[tokio::test]
    async fn results_expire_and_revoke_races_claim() {
        let b = broker(60_000, 100);
        let started = ResultRecord::started("t", "demo.add", 0, "n", Utc::now());
        assert_eq!(b.claim(&started).await.expect("claim"), Claim::Claimed);
        assert!(!b.revoke("t").await.expect("revoke"), "started: too late");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(b.get_result("t").await.expect("get"), None, "expired");
        assert!(b.revoke("u").await.expect("revoke"));
        let rec = b.get_result("u").await.expect("get").expect("revoked");
        assert_eq!(rec.state, TaskState::Revoked);
        let started = ResultRecord::started("u", "demo.add", 0, "n", Utc::now());
        assert_eq!(
            b.claim(&started).await.expect("claim"),
            Claim::Refused(TaskState::Revoked),
            "revoked first"
        );
    }

    #[tokio::test]
    async fn a_result_limit_drops_the_oldest_records() {
        let b = MemoryBroker::results_only(&TaskSettings::default(), 2);
        for id in ["a", "b", "c"] {
            b.put_result(&ResultRecord::pending(id).about("t", 0, "n"))
                .await
                .expect("put");
        }
        assert_eq!(b.get_result("a").await.expect("get"), None);
        assert!(b.get_result("c").await.expect("get").is_some());
        assert!(b.get_result("b").await.expect("get").is_some());
    }
}
