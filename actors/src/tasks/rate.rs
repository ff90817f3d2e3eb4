//! Rate limits. A task's own `rate_limit_per_sec` is a node-local token bucket holding one
//! token, so starts are spaced `1/rate` apart ([`RateLimiter`]). A queue's `rate_limit` holds
//! for the whole cluster ([`ClusterLimiter`]): the limit is cut into windows aligned on the
//! Unix clock (`tokens` starts per `window_ms`); the broker keeps one record per queue (and
//! `rate_key` value) saying how many of the current window's tokens were handed out, and a
//! worker leases a small slice of them at a time with one compare-and-swap
//! ([`super::TaskQueue::rate_lease`]), then spends the slice locally. So a worker pays one
//! round trip per slice, never per task, and the sum of the slices never passes the limit.

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

/// A cluster-wide limit as windows aligned on the Unix clock: at most `tokens` starts in each
/// window of `window_ms` milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub tokens: u32,
    pub window_ms: u64,
}

impl Limit {
    /// The windows of `rate` starts per second: whole-number rates of one per second or more
    /// get one-second windows ("10/s": 10 per second); a fractional rate the shortest window
    /// of up to 60 s holding a whole number of tokens ("90/m": 3 per 2 s), else one second
    /// rounded down; a rate under one per second one token per `1/rate` ("10/m": one per 6 s).
    pub fn from_rate(rate: f64) -> Option<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        if rate < 1.0 {
            let window_ms = (1000.0 / rate).round().clamp(1.0, 86_400_000.0) as u64;
            return Some(Self {
                tokens: 1,
                window_ms,
            });
        }
        let secs = (1..=60u32)
            .find(|&k| {
                let t = rate * f64::from(k);
                (t - t.round()).abs() < 1e-6
            })
            .unwrap_or(1);
        let tokens = (rate * f64::from(secs) + 1e-9)
            .floor()
            .min(f64::from(u32::MAX)) as u32;
        Some(Self {
            tokens: tokens.max(1),
            window_ms: u64::from(secs) * 1000,
        })
    }

    /// The window holding `now_ms`.
    pub fn window_of(&self, now_ms: u64) -> u64 {
        now_ms / self.window_ms
    }

    /// When window `w` ends, in Unix milliseconds.
    fn end_of(&self, w: u64) -> u64 {
        w.saturating_add(1).saturating_mul(self.window_ms)
    }

    /// Tokens one lease asks for: an eighth of a window's (1 for "10/s"), at most 256, so a
    /// worker holds little that others could have used, and pays a round trip per slice.
    pub fn slice(&self) -> u32 {
        (self.tokens / 8).clamp(1, MAX_SLICE)
    }
}

/// The broker's record of one limit (queue and `rate_key` value): the window it counts and how
/// many of its tokens were leased. JSON in the NATS `<prefix>_rates` bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub window: u64,
    pub taken: u32,
}

/// Leases up to `want` of window `window`'s `tokens` against `record` (the stored one, if
/// any): how many were granted and the record to store (`None`: nothing to write). A record
/// of a later window (a node whose clock runs ahead) is counted against, never reset.
pub fn grant(
    record: Option<WindowRecord>,
    window: u64,
    tokens: u32,
    want: u32,
) -> (u32, Option<WindowRecord>) {
    let current = match record {
        Some(r) if r.window >= window => r,
        _ => WindowRecord { window, taken: 0 },
    };
    let granted = want.min(tokens.saturating_sub(current.taken));
    if granted == 0 {
        return (0, None);
    }
    let next = WindowRecord {
        taken: current.taken + granted,
        ..current
    };
    (granted, Some(next))
}

/// The lease records of an in-process broker (the memory broker: the node is the cluster),
/// with idle keys dropped after [`RATE_KEY_IDLE`].
#[derive(Default)]
pub(crate) struct LeaseTable {
    records: HashMap<String, (WindowRecord, Instant)>,
    swept: Option<Instant>,
}

impl LeaseTable {
    pub(crate) fn lease(
        &mut self,
        key: &str,
        window: u64,
        tokens: u32,
        want: u32,
        now: Instant,
    ) -> u32 {
        if self
            .swept
            .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY)
        {
            self.records
                .retain(|_, (_, used)| now.duration_since(*used) < RATE_KEY_IDLE);
            self.swept = Some(now);
        }
        let stored = self.records.get(key).map(|(r, _)| *r);
        let (granted, next) = grant(stored, window, tokens, want);
        if let Some(next) = next {
            self.records.insert(key.to_owned(), (next, now));
        }
        granted
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

/// The Unix clock in milliseconds.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a worker's local budget says about taking tokens now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Local {
    /// Taken from the budget of window `window`.
    Got { window: u64, n: u32 },
    /// The budget is empty: lease more from the broker.
    Lease { window: u64 },
    /// The window's tokens are all leased: wait this long (the deferred task's turn).
    Exhausted(Duration),
}

/// A worker's budget of one limit.
#[derive(Debug)]
struct Budget {
    window: u64,
    left: u32,
    /// The broker had no more tokens for this window.
    exhausted: bool,
    /// Tasks deferred in this window (spreads their turns over the next windows).
    deferred: u32,
    used: Instant,
}

/// A queue's cluster-wide limit as one worker sees it: local budgets per limit key, refilled
/// by leases from the broker.
#[derive(Debug)]
pub(crate) struct ClusterLimiter {
    pub(crate) limit: Limit,
    budgets: Mutex<(HashMap<String, Budget>, Option<Instant>)>,
}

impl ClusterLimiter {
    pub(crate) fn new(limit: Limit) -> Self {
        Self {
            limit,
            budgets: Mutex::new((HashMap::new(), None)),
        }
    }

    fn with_budget<R>(
        &self,
        key: &str,
        now_ms: u64,
        now: Instant,
        f: impl FnOnce(&mut Budget, u64) -> R,
    ) -> R {
        let window = self.limit.window_of(now_ms);
        let mut guard = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let (budgets, swept) = &mut *guard;
        if swept.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY) {
            budgets.retain(|_, b| now.duration_since(b.used) < RATE_KEY_IDLE);
            *swept = Some(now);
        }
        let b = budgets.entry(key.to_owned()).or_insert(Budget {
            window,
            left: 0,
            exhausted: false,
            deferred: 0,
            used: now,
        });
        if b.window < window {
            *b = Budget {
                window,
                left: 0,
                exhausted: false,
                deferred: 0,
                used: now,
            };
        }
        b.used = now;
        f(b, window)
    }

    /// Takes up to `want` tokens of `key` from the local budget.
    pub(crate) fn take_local(&self, key: &str, want: u32, now_ms: u64, now: Instant) -> Local {
        let limit = self.limit;
        self.with_budget(key, now_ms, now, |b, window| {
            if b.left > 0 {
                let n = want.max(1).min(b.left);
                b.left -= n;
                return Local::Got { window, n };
            }
            if !b.exhausted {
                return Local::Lease { window };
            }
            // The n-th task deferred in this window gets the n-th token after it, spread
            // evenly over the windows to come.
            let n = u64::from(b.deferred);
            b.deferred = b.deferred.saturating_add(1);
            let tokens = u64::from(limit.tokens.max(1));
            let per_token = limit.window_ms / tokens;
            let at = limit
                .end_of(window)
                .saturating_add((n / tokens).saturating_mul(limit.window_ms))
                .saturating_add((n % tokens).saturating_mul(per_token));
            Local::Exhausted(Duration::from_millis(at.saturating_sub(now_ms).max(1)))
        })
    }

    /// Adds a lease of `granted` tokens of window `window` (zero: the window is used up).
    pub(crate) fn add_lease(&self, key: &str, window: u64, granted: u32, now_ms: u64) {
        self.with_budget(key, now_ms, Instant::now(), |b, _| {
            if b.window != window {
                return;
            }
            if granted == 0 {
                b.exhausted = true;
            } else {
                b.left = b.left.saturating_add(granted);
            }
        });
    }

    /// Gives back `n` tokens of window `window` that were taken and not used (a fetch that
    /// found fewer tasks); tokens of a past window are gone.
    pub(crate) fn give_back(&self, key: &str, window: u64, n: u32, now_ms: u64) {
        if n == 0 {
            return;
        }
        self.with_budget(key, now_ms, Instant::now(), |b, _| {
            if b.window == window {
                b.left = b.left.saturating_add(n);
            }
        });
    }

    /// Takes up to `want` tokens of `key`, leasing from `broker` when the local budget is
    /// empty: `Ok((window, n))`, or `Err(wait)` when none is left in this window (or the broker
    /// did not answer: the limit pauses rather than guess, see docs/tasks.md).
    pub(crate) async fn acquire(
        &self,
        broker: &dyn TaskQueue,
        key: &str,
        want: u32,
    ) -> Result<(u64, u32), Duration> {
        for _ in 0..3 {
            match self.take_local(key, want, unix_ms(), Instant::now()) {
                Local::Got { window, n } => return Ok((window, n)),
                Local::Exhausted(wait) => return Err(wait),
                Local::Lease { window } => {
                    let ask = self.limit.slice().max(want);
                    match broker.rate_lease(key, window, self.limit.tokens, ask).await {
                        Ok(granted) => self.add_lease(key, window, granted, unix_ms()),
                        Err(e) => {
                            log_lease_error(&e);
                            return Err(LEASE_ERROR_PAUSE);
                        }
                    }
                }
            }
        }
        Err(Duration::from_millis(10))
    }
}

/// Logs a failed lease, at most once every 10 s per process.
fn log_lease_error(e: &BrokerError) {
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
    #[test]
    fn limits_become_windows_of_whole_tokens() {
        let l = |r| Limit::from_rate(r).expect("limit");
        assert_eq!(
            l(10.0),
            Limit {
                tokens: 10,
                window_ms: 1000
            }
        );
        assert_eq!(
            l(1.5),
            Limit {
                tokens: 3,
                window_ms: 2000
            }
        );
        assert_eq!(
            l(10.0 / 60.0),
            Limit {
                tokens: 1,
                window_ms: 6000
            }
        );
        assert_eq!(
            l(1.0),
            Limit {
                tokens: 1,
                window_ms: 1000
            }
        );
        assert_eq!(Limit::from_rate(0.0), None);
        assert_eq!(Limit::from_rate(f64::NAN), None);
        assert_eq!(l(10.0).slice(), 1);
        assert_eq!(l(1000.0).slice(), 125);
        assert_eq!(l(1e9).slice(), MAX_SLICE);
        assert_eq!(l(10.0).window_of(12_345), 12);
    }

    #[test]
    fn grants_never_pass_the_window_and_reset_in_the_next() {
        let (g, r) = grant(None, 7, 10, 4);
        assert_eq!(
            (g, r),
            (
                4,
                Some(WindowRecord {
                    window: 7,
                    taken: 4
                })
            )
        );
        let (g, r) = grant(r, 7, 10, 8);
        assert_eq!(
            (g, r),
            (
                6,
                Some(WindowRecord {
                    window: 7,
                    taken: 10
                })
            )
        );
        assert_eq!(grant(r, 7, 10, 1), (0, None));
        // The next window starts from zero; a record of a later window (a clock ahead) is
        // counted against.
        assert_eq!(grant(r, 8, 10, 3).0, 3);
        assert_eq!(grant(r, 6, 10, 3), (0, None));
    }

    #[test]
    fn many_workers_leasing_slices_never_pass_the_limit() {
        let mut table = LeaseTable::default();
        let now = Instant::now();
        let limit = Limit::from_rate(100.0).expect("limit");
        let mut total = 0;
        for round in 0..100 {
            let _ = round;
            for _worker in 0..7 {
                total += table.lease("k", 3, limit.tokens, limit.slice(), now);
            }
        }
        assert_eq!(total, 100);
        assert_eq!(table.lease("other", 3, limit.tokens, 5, now), 5);
    }

    #[test]
    fn idle_keys_expire_from_the_lease_table() {
        let mut table = LeaseTable::default();
        let t0 = Instant::now();
        for i in 0..1000 {
            table.lease(&format!("k{i}"), 1, 10, 1, t0);
        }
        assert_eq!(table.len(), 1000);
        table.lease("fresh", 1, 10, 1, t0 + RATE_KEY_IDLE + SWEEP_EVERY);
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
            tokens: 4,
            window_ms: 1000,
        };
        let l = ClusterLimiter::new(limit);
        let now = Instant::now();
        let t = 10_250; // window 10, 750 ms before its end
        assert_eq!(l.take_local("k", 1, t, now), Local::Lease { window: 10 });
        l.add_lease("k", 10, 2, t);
        assert_eq!(
            l.take_local("k", 5, t, now),
            Local::Got { window: 10, n: 2 }
        );
        assert_eq!(l.take_local("k", 1, t, now), Local::Lease { window: 10 });
        // A fetch that found one task of two gives one back.
        l.give_back("k", 10, 1, t);
        assert_eq!(
            l.take_local("k", 1, t, now),
            Local::Got { window: 10, n: 1 }
        );
        l.add_lease("k", 10, 0, t);
        // Deferred tasks get the next window's tokens in turn, a quarter window apart.
        let waits: Vec<_> = (0..6)
            .map(|_| match l.take_local("k", 1, t, now) {
                Local::Exhausted(d) => d.as_millis(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits, [750, 1000, 1250, 1500, 1750, 2000]);
        // Other keys are not held up by this one; the next window leases again.
        assert_eq!(
            l.take_local("other", 1, t, now),
            Local::Lease { window: 10 }
        );
        assert_eq!(
            l.take_local("k", 1, 11_000, now),
            Local::Lease { window: 11 }
        );
        // A lease or give-back for a past window is dropped.
        l.add_lease("k", 10, 3, 11_000);
        l.give_back("k", 10, 3, 11_000);
        assert_eq!(
            l.take_local("k", 1, 11_000, now),
            Local::Lease { window: 11 }
        );
    }
}
