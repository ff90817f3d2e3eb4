//! Rate limits. A task's own `rate_limit_per_sec` is a node-local token bucket holding one
//! token, so starts are spaced `1/rate` apart ([`RateLimiter`]). A queue's `rate_limit` holds
//! for the whole cluster ([`ClusterLimiter`]): the broker keeps one record per queue (and
//! `rate_key` value) saying when the limit's next token is free; a worker leases a small slice
//! of tokens (free one interval apart from then) with one compare-and-swap
//! ([`super::TaskQueue::rate_lease`]) and spends them locally, each at its time. So a worker
//! pays one round trip per slice, never per task, and tokens never come faster than the
//! limit, however many workers lease.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::broker::{BrokerError, TaskQueue};

/// A token bucket of capacity one: at most one start every `1/rate` seconds, no bursts.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    interval: Duration,
    /// When the next token is available.
    next: Option<Instant>,
}

impl TokenBucket {
    /// A bucket for `rate` starts per second (`rate > 0`).
    pub(crate) fn new(rate: f64) -> Self {
        let interval = if rate.is_finite() && rate > 0.0 {
            Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX)
        } else {
            Duration::ZERO
        };
        Self {
            interval,
            next: None,
        }
    }

    /// Takes the token now, or says how long until it is available.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        match self.next {
            Some(next) if next > now => Err(next - now),
            _ => {
                self.next = Some(now + self.interval);
                Ok(())
            }
        }
    }
}

/// A token bucket shared by every worker of a node (a task's own `rate_limit_per_sec`).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    bucket: Mutex<TokenBucket>,
}

impl RateLimiter {
    pub(crate) fn new(rate: f64) -> Self {
        Self {
            bucket: Mutex::new(TokenBucket::new(rate)),
        }
    }

    /// Waits for a token. Each wait is exactly the time until the next token, so the loop
    /// ends once the callers ahead of this one have started.
    pub(crate) async fn acquire(&self) {
        loop {
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                match b.try_take(Instant::now()) {
                    Ok(()) => return,
                    Err(wait) => wait,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// How long the state of a key nobody used is kept (SPEC.md: a minute), in workers, in the
/// memory broker and, as the bucket's `max_age`, in the NATS `<prefix>_rates` bucket.
pub const RATE_KEY_IDLE: Duration = Duration::from_secs(60);
/// How often a table of keys is swept of idle ones.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The most tokens one lease takes.
const MAX_SLICE: u32 = 256;
/// How long a worker waits before asking again when the broker did not answer a lease.
pub(crate) const LEASE_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// A task under `rate_key` books the next token of its key when it comes within this long,
/// and waits for it in place (holding its slot, and its delivery, well within ack_wait); a
/// later one puts the task back ([`super::TaskQueue::defer`]) until about its turn.
pub(crate) const BOOK_AHEAD: Duration = Duration::from_secs(1);

/// The least time a leased token stays usable after its time (see [`Limit::stale_after_ns`]).
const STALE_AFTER_MIN: Duration = Duration::from_millis(100);

/// A cluster-wide limit: one start per `interval_ns`, leased `slice` tokens at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub interval_ns: u64,
    pub slice: u32,
}

impl Limit {
    /// The limit of `rate` starts per second. A lease takes an eighth of a second's tokens
    /// (1 for "10/s", at most 256), so a worker holds little that others could have used and
    /// pays one round trip per slice.
    pub fn from_rate(rate: f64) -> Option<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let interval_ns = (1e9 / rate).round().clamp(1.0, 86_400e9) as u64;
        let slice = (rate / 8.0).floor().clamp(1.0, f64::from(MAX_SLICE)) as u32;
        Some(Self { interval_ns, slice })
    }

    fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// How late a leased token may still be spent: a slice's span, and at least
    /// [`STALE_AFTER_MIN`] (a lease's round trip may take longer than a fast limit's slice).
    pub fn stale_after_ns(&self) -> u64 {
        let min = u64::try_from(STALE_AFTER_MIN.as_nanos()).unwrap_or(u64::MAX);
        self.interval_ns
            .saturating_mul(u64::from(self.slice.max(1)))
            .max(min)
    }
}

/// The broker's record of one limit (queue and `rate_key` value): when its next token is
/// free, in Unix nanoseconds. JSON in the NATS `<prefix>_rates` bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateRecord {
    pub next_ns: u64,
}

/// What a lease got: `n` tokens, the first free at `first_ns` and one per interval after it;
/// `n == 0`: no token is free before `first_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub first_ns: u64,
    pub n: u32,
}

/// Leases `want` tokens of a limit of one per `interval_ns` against `record` (the stored one,
/// if any) at `now_ns`: the grant and the record to store (`None`: nothing to write). Tokens
/// never come faster than the interval over all leases; time nobody used is not saved up (no
/// bursts); a lease whose first token is more than `ahead_ns` away is refused (the caller
/// waits, or puts its task back).
pub fn grant(
    record: Option<RateRecord>,
    interval_ns: u64,
    want: u32,
    now_ns: u64,
    ahead_ns: u64,
) -> (Grant, Option<RateRecord>) {
    let next = record.map_or(now_ns, |r| r.next_ns).max(now_ns);
    if next > now_ns.saturating_add(ahead_ns) {
        return (
            Grant {
                first_ns: next,
                n: 0,
            },
            None,
        );
    }
    let n = want.max(1);
    let next_ns = next.saturating_add(interval_ns.saturating_mul(u64::from(n)));
    (Grant { first_ns: next, n }, Some(RateRecord { next_ns }))
}

/// The lease records of an in-process broker (the memory broker: the node is the cluster),
/// with idle keys dropped after [`RATE_KEY_IDLE`].
#[derive(Default)]
pub(crate) struct LeaseTable {
    records: HashMap<String, (RateRecord, Instant)>,
    swept: Option<Instant>,
}

impl LeaseTable {
    pub(crate) fn lease(
        &mut self,
        key: &str,
        interval_ns: u64,
        want: u32,
        now_ns: u64,
        ahead_ns: u64,
        now: Instant,
    ) -> Grant {
        if self
            .swept
            .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY)
        {
            self.records
                .retain(|_, (_, used)| now.duration_since(*used) < RATE_KEY_IDLE);
            self.swept = Some(now);
        }
        let stored = self.records.get(key).map(|(r, _)| *r);
        let (grant, next) = grant(stored, interval_ns, want, now_ns, ahead_ns);
        if let Some(next) = next {
            self.records.insert(key.to_owned(), (next, now));
        }
        grant
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.records.len()
    }
}

/// The key of a limit in the broker: a hash of the queue and the `rate_key` value (its JSON;
/// none when the task has no such field), so a publisher's values never become keys.
pub fn limit_key(queue: &str, value: Option<&serde_json::Value>) -> String {
    let mut h = Sha256::new();
    h.update(queue.as_bytes());
    match value {
        Some(v) => {
            h.update(b"\x00=");
            h.update(v.to_string().as_bytes());
        }
        None => h.update(b"\x00none"),
    }
    let digest = h.finalize();
    digest[..20].iter().map(|b| format!("{b:02x}")).collect()
}

/// The Unix clock in nanoseconds.
pub(crate) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What a worker's local budget says about taking tokens now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Local {
    /// Took `n` tokens.
    Got(u32),
    /// The budget's next token is free in this long.
    Wait(Duration),
    /// The budget is empty: lease more from the broker (the caller must report the answer
    /// with [`ClusterLimiter::add_lease`] or [`ClusterLimiter::lease_failed`]).
    Lease,
    /// Another task of this worker is leasing for this key: ask again very soon.
    Leasing,
    /// The broker has no token before this long (for a deferred task: its turn).
    Exhausted(Duration),
}

/// A worker's budget of one limit.
#[derive(Debug)]
struct Budget {
    /// When the next leased token is free (Unix ns), and how many are left.
    next_ns: u64,
    left: u32,
    leasing: bool,
    /// The broker said: no token before this.
    exhausted_until: u64,
    /// The turn the next deferred task gets (spreads deferred tasks one interval apart).
    deferred_until: u64,
    used: Instant,
}

/// A queue's cluster-wide limit as one worker sees it: local budgets per limit key, refilled
/// by leases from the broker.
#[derive(Debug)]
pub(crate) struct ClusterLimiter {
    pub(crate) limit: Limit,
    /// How far ahead a task under `rate_key` books its token and waits for it in place.
    pub(crate) book_ahead: Duration,
    budgets: Mutex<(HashMap<String, Budget>, Option<Instant>)>,
}

impl ClusterLimiter {
    /// A limiter whose keyed tasks book tokens up to `book_ahead` ahead (at most
    /// [`BOOK_AHEAD`], and half of `tasks.ack_wait`, so no delivery waits past it).
    pub(crate) fn new(limit: Limit, ack_wait: Duration) -> Self {
        Self {
            limit,
            book_ahead: BOOK_AHEAD.min(ack_wait / 2),
            budgets: Mutex::new((HashMap::new(), None)),
        }
    }

    fn with_budget<R>(&self, key: &str, now: Instant, f: impl FnOnce(&mut Budget) -> R) -> R {
        let mut guard = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let (budgets, swept) = &mut *guard;
        if swept.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY) {
            budgets.retain(|_, b| b.leasing || now.duration_since(b.used) < RATE_KEY_IDLE);
            *swept = Some(now);
        }
        let b = budgets.entry(key.to_owned()).or_insert(Budget {
            next_ns: 0,
            left: 0,
            leasing: false,
            exhausted_until: 0,
            deferred_until: 0,
            used: now,
        });
        b.used = now;
        f(b)
    }

    /// Takes up to `want` tokens of `key` that are free at `now_ns`. `defer`: a task that
    /// will be put back if none is free (it gets the next turn, one interval after the last).
    pub(crate) fn take_local(
        &self,
        key: &str,
        want: u32,
        defer: bool,
        now_ns: u64,
        now: Instant,
    ) -> Local {
        let i = self.limit.interval_ns;
        self.with_budget(key, now, |b| {
            // Tokens later than a slice's span are dropped: time not used is not saved up
            // beyond one slice.
            let span = self.limit.stale_after_ns();
            if b.left > 0 && now_ns > b.next_ns.saturating_add(span) {
                let stale = ((now_ns - b.next_ns - span) / i + 1).min(u64::from(b.left));
                b.left -= stale as u32;
                b.next_ns += stale * i;
            }
            if b.left > 0 {
                if b.next_ns > now_ns {
                    return Local::Wait(Duration::from_nanos(b.next_ns - now_ns));
                }
                let ready = (now_ns - b.next_ns) / i + 1;
                let n = want
                    .max(1)
                    .min(b.left)
                    .min(u32::try_from(ready).unwrap_or(u32::MAX));
                b.left -= n;
                b.next_ns += u64::from(n) * i;
                return Local::Got(n);
            }
            if b.leasing {
                return Local::Leasing;
            }
            if b.exhausted_until > now_ns {
                // A deferred task comes back half a booking horizon before the broker's next
                // free token, one interval after the one deferred before it.
                let half = u64::try_from(self.book_ahead.as_nanos() / 2).unwrap_or(0);
                let at = match defer {
                    true => {
                        let at = b
                            .exhausted_until
                            .saturating_sub(half)
                            .max(b.deferred_until)
                            .max(now_ns + 1);
                        b.deferred_until = at.saturating_add(i);
                        at
                    }
                    false => b.exhausted_until,
                };
                return Local::Exhausted(Duration::from_nanos(at - now_ns));
            }
            b.leasing = true;
            Local::Lease
        })
    }

    /// Records the broker's answer to a lease of `key`.
    pub(crate) fn add_lease(&self, key: &str, grant: Grant) {
        self.with_budget(key, Instant::now(), |b| {
            b.leasing = false;
            if grant.n == 0 {
                b.exhausted_until = grant.first_ns;
            } else {
                b.next_ns = grant.first_ns;
                b.left = grant.n;
            }
        });
    }

    /// The lease of `key` failed: the next take leases again.
    pub(crate) fn lease_failed(&self, key: &str) {
        self.with_budget(key, Instant::now(), |b| b.leasing = false);
    }

    /// Gives back the last `n` tokens taken of `key` (a fetch that found fewer tasks).
    pub(crate) fn give_back(&self, key: &str, n: u32) {
        if n == 0 {
            return;
        }
        let i = self.limit.interval_ns;
        self.with_budget(key, Instant::now(), |b| {
            b.left = b.left.saturating_add(n);
            b.next_ns = b.next_ns.saturating_sub(u64::from(n) * i);
        });
    }

    /// Takes one token of `key` for a task, leasing (booking up to `book_ahead`) from
    /// `broker` when the local budget is empty and waiting in place for a booked token:
    /// `Ok(())`, or `Err(wait)` when the task must be put back for that long (or the broker
    /// did not answer: the limit pauses rather than guess, see docs/tasks.md).
    pub(crate) async fn acquire(&self, broker: &dyn TaskQueue, key: &str) -> Result<(), Duration> {
        let ahead = u64::try_from(self.book_ahead.as_nanos()).unwrap_or(u64::MAX);
        for _ in 0..64 {
            match self.take_local(key, 1, true, unix_ns(), Instant::now()) {
                Local::Got(_) => return Ok(()),
                Local::Wait(d) if d <= self.book_ahead => tokio::time::sleep(d).await,
                Local::Wait(d) | Local::Exhausted(d) => return Err(d),
                Local::Leasing => tokio::time::sleep(Duration::from_millis(2)).await,
                Local::Lease => {
                    let l = self.limit;
                    match broker
                        .rate_lease(key, l.interval_ns, l.slice, unix_ns(), ahead)
                        .await
                    {
                        Ok(grant) => self.add_lease(key, grant),
                        Err(e) => {
                            self.lease_failed(key);
                            log_lease_error(&e);
                            return Err(LEASE_ERROR_PAUSE);
                        }
                    }
                }
            }
        }
        Err(self.limit.interval().max(Duration::from_millis(10)))
    }
}

/// Logs a failed lease, at most once every 10 s per process.
pub(crate) fn log_lease_error(e: &BrokerError) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        *last = Some(Instant::now());
        tracing::warn!("rate limit paused: cannot lease tokens: {e}");
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_spaced_by_the_interval() {
        let mut b = TokenBucket::new(10.0);
        let t0 = Instant::now();
        assert!(b.try_take(t0).is_ok());
        let wait = b.try_take(t0).expect_err("second token must wait");
        assert_eq!(wait, Duration::from_millis(100));
        assert!(b.try_take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.try_take(t0 + Duration::from_millis(150)).is_err());
    }
    const MS: u64 = 1_000_000;

    #[test]
    fn limits_become_intervals_and_slices() {
        let l = |r| Limit::from_rate(r).expect("limit");
        assert_eq!(
            l(10.0),
            Limit {
                interval_ns: 100 * MS,
                slice: 1
            }
        );
        assert_eq!(
            l(10.0 / 60.0),
            Limit {
                interval_ns: 6000 * MS,
                slice: 1
            }
        );
        assert_eq!(l(1000.0).slice, 125);
        assert_eq!(l(1e9).slice, MAX_SLICE);
        assert_eq!(l(1e12).interval_ns, 1);
        assert_eq!(l(10.0).stale_after_ns(), 100 * MS);
        assert_eq!(l(1e6).stale_after_ns(), 100 * MS);
        assert_eq!(l(0.5).stale_after_ns(), 2000 * MS);
        assert_eq!(Limit::from_rate(0.0), None);
        assert_eq!(Limit::from_rate(f64::NAN), None);
    }

    #[test]
    fn grants_are_spaced_by_the_interval_and_do_not_save_up() {
        let i = 100 * MS;
        let (g, r) = grant(None, i, 3, 1000 * MS, i);
        assert_eq!(
            g,
            Grant {
                first_ns: 1000 * MS,
                n: 3
            }
        );
        assert_eq!(r, Some(RateRecord { next_ns: 1300 * MS }));
        // The next lease starts where that one ends, one interval ahead at most.
        let (g, r) = grant(r, i, 1, 1200 * MS, i);
        assert_eq!(
            g,
            Grant {
                first_ns: 1300 * MS,
                n: 1
            }
        );
        let refused = (
            Grant {
                first_ns: 1400 * MS,
                n: 0,
            },
            None,
        );
        assert_eq!(grant(r, i, 1, 1250 * MS, i), refused);
        // A keyed task may book further ahead.
        let booked = grant(r, i, 1, 1250 * MS, 1000 * MS).0;
        assert_eq!(
            booked,
            Grant {
                first_ns: 1400 * MS,
                n: 1
            }
        );
        // Idle time is not saved up: after a pause, tokens start from now.
        let (g, _) = grant(r, i, 2, 9000 * MS, i);
        assert_eq!(
            g,
            Grant {
                first_ns: 9000 * MS,
                n: 2
            }
        );
        // A record far ahead (a node whose clock runs ahead) is waited for, never reset.
        assert_eq!(
            grant(Some(RateRecord { next_ns: 5000 * MS }), i, 1, 1000 * MS, i)
                .0
                .n,
            0
        );
    }

    #[test]
    fn many_workers_leasing_slices_never_pass_the_limit() {
        // Seven workers lease a 100/s limit as fast as they can for a simulated second: the
        // tokens granted are free at most 100 in that second (plus the one at its end).
        let mut table = LeaseTable::default();
        let real = Instant::now();
        let limit = Limit::from_rate(100.0).expect("limit");
        let mut times = Vec::new();
        let mut now = 0u64;
        while now < 1000 * MS {
            for _worker in 0..7 {
                let g = table.lease("k", limit.interval_ns, limit.slice, now, MS, real);
                times.extend((0..g.n).map(|j| g.first_ns + u64::from(j) * limit.interval_ns));
            }
            now += MS;
        }
        let in_second = times.iter().filter(|&&t| t < 1000 * MS).count();
        assert_eq!(in_second, 100);
        times.sort_unstable();
        assert!(times.windows(2).all(|w| w[1] - w[0] >= limit.interval_ns));
        let other = table.lease("other", limit.interval_ns, 5, now, MS, real);
        assert_eq!(
            other,
            Grant {
                first_ns: now,
                n: 5
            }
        );
    }

    #[test]
    fn idle_keys_expire_from_the_lease_table() {
        let mut table = LeaseTable::default();
        let t0 = Instant::now();
        for i in 0..1000 {
            table.lease(&format!("k{i}"), MS, 1, 0, MS, t0);
        }
        assert_eq!(table.len(), 1000);
        table.lease("fresh", MS, 1, 0, MS, t0 + RATE_KEY_IDLE + SWEEP_EVERY);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn keys_are_hashes_of_queue_and_value() {
        let a = limit_key("q", Some(&serde_json::json!("alice")));
        assert_eq!(a.len(), 40);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, limit_key("q", Some(&serde_json::json!("bob"))));
        assert_ne!(a, limit_key("r", Some(&serde_json::json!("alice"))));
        assert_ne!(
            limit_key("q", None),
            limit_key("q", Some(&serde_json::json!(null)))
        );
        let hostile = limit_key("q", Some(&serde_json::json!("a.b.*.>\u{0} $KV")));
        assert!(hostile.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_worker_spends_its_lease_locally_then_defers_in_turn() {
        let limit = Limit {
            interval_ns: 100 * MS,
            slice: 4,
        };
        let l = ClusterLimiter::new(limit, Duration::from_secs(30));
        let now = Instant::now();
        let t = 10_000 * MS;
        assert_eq!(l.take_local("k", 1, false, t, now), Local::Lease);
        assert_eq!(l.take_local("k", 1, false, t, now), Local::Leasing);
        l.add_lease("k", Grant { first_ns: t, n: 4 });
        // One token is free now; the next one an interval later.
        assert_eq!(l.take_local("k", 3, false, t, now), Local::Got(1));
        assert_eq!(
            l.take_local("k", 1, false, t + 40 * MS, now),
            Local::Wait(Duration::from_millis(60))
        );
        assert_eq!(
            l.take_local("k", 3, false, t + 210 * MS, now),
            Local::Got(2)
        );
        // A fetch that found nothing gives its tokens back.
        l.give_back("k", 2);
        assert_eq!(
            l.take_local("k", 1, false, t + 210 * MS, now),
            Local::Got(1)
        );
        // Tokens not used for long are dropped, not spent in a burst.
        assert_eq!(
            l.take_local("k", 5, false, t + 5000 * MS, now),
            Local::Lease
        );
        l.add_lease(
            "k",
            Grant {
                first_ns: t + 6200 * MS,
                n: 0,
            },
        );
        // Deferred tasks come back half a booking horizon (1 s) before the broker's next
        // free token, one interval apart.
        let waits: Vec<_> = (0..4)
            .map(|_| match l.take_local("k", 1, true, t + 5000 * MS, now) {
                Local::Exhausted(d) => d.as_millis(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits, [700, 800, 900, 1000]);
        // A keyed task books up to a second ahead, and half of ack_wait at most.
        assert_eq!(l.book_ahead, Duration::from_secs(1));
        let short = ClusterLimiter::new(limit, Duration::from_secs(1));
        assert_eq!(short.book_ahead, Duration::from_millis(500));
        // Another key is not held up by this one.
        assert_eq!(
            l.take_local("other", 1, true, t + 5000 * MS, now),
            Local::Lease
        );
        // Once that time passed, the worker leases again.
        assert_eq!(l.take_local("k", 1, true, t + 6200 * MS, now), Local::Lease);
        l.lease_failed("k");
        assert_eq!(l.take_local("k", 1, true, t + 6200 * MS, now), Local::Lease);
    }
}
