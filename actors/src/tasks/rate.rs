//! Rate limits: a token bucket holding one token, so starts are spaced `1/rate` apart.

use std::sync::Mutex;
use std::time::{Duration, Instant};

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

    /// Counts a start at `now` (a fetch holds its token while it waits; the interval runs
    /// from the delivery, not from when the wait began).
    pub(crate) fn started_at(&mut self, now: Instant) {
        self.next = Some(now + self.interval);
    }

    /// Gives back a token taken for nothing (a fetch that found no task).
    pub(crate) fn refund(&mut self) {
        self.next = None;
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
        b.started_at(t0 + Duration::from_millis(150));
        assert!(b.try_take(t0 + Duration::from_millis(200)).is_err());
        b.refund();
        assert!(b.try_take(t0 + Duration::from_millis(101)).is_ok());
    }
}
