//! Login throttling and bounded password hashing (SPEC "HTTP hardening").
//!
//! - **Throttling.** Failed logins are counted per username and per client address in fixed
//!   windows: the first failure opens a window of `auth.failure_window` seconds; once it holds
//!   `auth.max_failures` failures, logins for that username (or from that address) answer 429
//!   with `Retry-After` until the window ends. With a NATS connection the counters live in the KV
//!   bucket `<prefix>_login` (keys are SHA-256 hashes of `user:NAME` / `addr:IP`; entries expire
//!   with the window), so the nodes behind a load balancer count together; a write that races
//!   another node's retries on the KV revision. Without NATS, or while it is unreachable, each
//!   node counts on its own.
//! - **Hashing.** argon2 runs on the blocking pool, at most `auth.max_concurrent_hashes` at once
//!   (a flood of wrong passwords cannot take the memory of many 19 MiB hashes); beyond that the
//!   login answers 503 with `Retry-After`. An unknown username is checked against a fixed hash,
//!   so it costs the same time as a wrong password (no user enumeration by timing).

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use async_nats::jetstream::kv;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// Attempts of one KV compare-and-swap before counting locally instead.
const KV_ATTEMPTS: u32 = 5;
/// `Retry-After` when every hashing slot is taken (a hash takes tens of milliseconds).
const BUSY_RETRY_AFTER: u64 = 1;

/// Failures in the current window of one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Window {
    /// Failures counted.
    count: u32,
    /// UNIX seconds of the window's first failure.
    start: i64,
}

impl Window {
    fn ended(&self, now: i64, window: i64) -> bool {
        now >= self.start.saturating_add(window)
    }

    /// The window after one more failure at `now`.
    fn fail(self, now: i64, window: i64) -> Self {
        if self.count == 0 || self.ended(now, window) {
            Window {
                count: 1,
                start: now,
            }
        } else {
            Window {
                count: self.count.saturating_add(1),
                start: self.start,
            }
        }
    }

    /// Seconds until the window ends, if it is full at `now`.
    fn blocked_for(&self, now: i64, max: u32, window: i64) -> Option<u64> {
        (self.count >= max && !self.ended(now, window))
            .then(|| (self.start.saturating_add(window) - now).max(1) as u64)
    }
}

/// Why a login attempt is refused before its password is looked at.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refused {
    /// Too many failures for this username or client address.
    #[error("too many failed logins; retry after {retry_after} s")]
    Throttled { retry_after: u64 },
    /// Every hashing slot is taken.
    #[error("too many logins at once; retry after {retry_after} s")]
    Busy { retry_after: u64 },
}

/// The login guard of a node.
pub struct LoginGuard {
    max_failures: u32,
    window: i64,
    local: DashMap<String, Window>,
    kv: Option<kv::Store>,
    hashes: Arc<Semaphore>,
    /// A hash an unknown username is checked against.
    dummy_hash: tokio::sync::OnceCell<String>,
}

impl LoginGuard {
    /// A guard allowing `max_failures` per `window`, hashing at most `max_hashes` at once.
    pub fn new(max_failures: u32, window: Duration, max_hashes: usize) -> Self {
        Self {
            max_failures: max_failures.max(1),
            window: i64::try_from(window.as_secs()).unwrap_or(i64::MAX).max(1),
            local: DashMap::new(),
            kv: None,
            hashes: Arc::new(Semaphore::new(max_hashes.max(1))),
            dummy_hash: tokio::sync::OnceCell::new(),
        }
    }

    /// Shares the counters through NATS KV (bucket `<prefix>_login`, with `replicas` replicas).
    pub async fn with_nats(
        mut self,
        client: async_nats::Client,
        prefix: &str,
        replicas: usize,
    ) -> Result<Self, String> {
        let js = async_nats::jetstream::new(client);
        let bucket = format!("{prefix}_login");
        let max_age = Duration::from_secs(self.window as u64);
        switchyard_actors::jetstream::ensure_kv_stream(&js, &bucket, max_age, false, replicas)
            .await?;
        let store = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| format!("cannot open bucket {bucket}: {e}"))?;
        self.kv = Some(store);
        Ok(self)
    }

    fn keys(username: &str, addr: Option<std::net::IpAddr>) -> Vec<String> {
        let mut keys = vec![format!("user:{username}")];
        if let Some(a) = addr {
            keys.push(format!("addr:{a}"));
        }
        keys
    }

    /// Refuses an attempt whose username or address is throttled.
    pub async fn check(
        &self,
        username: &str,
        addr: Option<std::net::IpAddr>,
    ) -> Result<(), Refused> {
        let now = now_unix();
        let mut wait = None;
        for key in Self::keys(username, addr) {
            let w = self.read(&key).await;
            if let Some(s) = w.blocked_for(now, self.max_failures, self.window) {
                wait = Some(wait.map_or(s, |x: u64| x.max(s)));
            }
        }
        match wait {
            Some(retry_after) => Err(Refused::Throttled { retry_after }),
            None => Ok(()),
        }
    }

    /// Counts a failed attempt.
    pub async fn failed(&self, username: &str, addr: Option<std::net::IpAddr>) {
        let now = now_unix();
        for key in Self::keys(username, addr) {
            self.modify(&key, |w| w.fail(now, self.window)).await;
        }
    }

    /// Forgets the username's failures after a successful login (its address keeps them).
    pub async fn succeeded(&self, username: &str) {
        self.modify(&format!("user:{username}"), |_| Window::default())
            .await;
    }

    /// Verifies `password` against `hash` (or, for an unknown user, against a fixed hash, to
    /// take the same time) on the blocking pool, within the hashing limit.
    pub async fn verify(&self, password: &str, hash: Option<String>) -> Result<bool, Refused> {
        let busy = Refused::Busy {
            retry_after: BUSY_RETRY_AFTER,
        };
        let permit = self.hashes.clone().try_acquire_owned().map_err(|_| busy)?;
        let known = hash.is_some();
        let hash = match hash {
            Some(h) => h,
            None => self.dummy_hash().await,
        };
        let password = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            PasswordHash::new(&hash).is_ok_and(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        Ok(known && ok)
    }

    async fn dummy_hash(&self) -> String {
        self.dummy_hash
            .get_or_init(|| async {
                let random = switchyard_actors::session::SessionId::generate();
                crate::http::users::hash_password_off_thread(random.as_str())
                    .await
                    .unwrap_or_default()
            })
            .await
            .clone()
    }

    async fn read(&self, key: &str) -> Window {
        if let Some(kv) = &self.kv {
            match kv.entry(kv_key(key)).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => {
                    return serde_json::from_slice(&e.value).unwrap_or_default();
                }
                Ok(_) => return Window::default(),
                Err(e) => tracing::warn!("login counters unreachable, counting locally: {e}"),
            }
        }
        self.local.get(key).map(|w| *w).unwrap_or_default()
    }

    async fn modify(&self, key: &str, f: impl Fn(Window) -> Window) {
        if let Some(kv) = &self.kv {
            if self.modify_kv(kv, &kv_key(key), &f).await {
                return;
            }
        }
        let mut entry = self.local.entry(key.to_owned()).or_default();
        *entry = f(*entry);
    }

    /// A compare-and-swap loop on the key's revision; `false` when NATS did not take it.
    async fn modify_kv(&self, kv: &kv::Store, key: &str, f: &impl Fn(Window) -> Window) -> bool {
        for _ in 0..KV_ATTEMPTS {
            let current = match kv.entry(key).await {
                Ok(e) => e.filter(|e| e.operation == kv::Operation::Put),
                Err(e) => {
                    tracing::warn!("login counters unreachable, counting locally: {e}");
                    return false;
                }
            };
            let (old, revision) = match &current {
                Some(e) => (
                    serde_json::from_slice(&e.value).unwrap_or_default(),
                    Some(e.revision),
                ),
                None => (Window::default(), None),
            };
            let Ok(value) = serde_json::to_vec(&f(old)) else {
                return false;
            };
            let written = match revision {
                Some(r) => kv.update(key, value.into(), r).await.is_ok(),
                None => kv.create(key, value.into()).await.is_ok(),
            };
            if written {
                return true;
            }
        }
        tracing::warn!("login counter {key} kept changing; counting locally");
        false
    }
}

/// A KV key for a counter key (usernames may hold any character).
fn kv_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_window_blocks_until_it_ends() {
        let (max, window) = (3, 300);
        let mut w = Window::default();
        for t in 0..3 {
            assert_eq!(w.blocked_for(100 + t, max, window), None);
            w = w.fail(100 + t, window);
        }
        assert_eq!(w.count, 3);
        assert_eq!(w.blocked_for(103, max, window), Some(297));
        assert_eq!(w.blocked_for(399, max, window), Some(1));
        assert_eq!(w.blocked_for(400, max, window), None, "the window passed");
        assert_eq!(
            w.fail(400, window),
            Window {
                count: 1,
                start: 400
            }
        );
    }

    #[tokio::test]
    async fn local_counters_throttle_by_user_and_by_address() {
        let guard = LoginGuard::new(2, Duration::from_secs(60), 1);
        let ip = Some("192.0.2.1".parse().expect("ip"));
        guard.failed("bob", ip).await;
        assert_eq!(guard.check("bob", ip).await, Ok(()));
        guard.failed("bob", None).await;
        assert!(matches!(
            guard.check("bob", None).await,
            Err(Refused::Throttled { retry_after }) if (1..=60).contains(&retry_after)
        ));
        assert_eq!(
            guard.check("carol", ip).await,
            Ok(()),
            "one failure from ip"
        );
        guard.failed("dave", ip).await;
        assert!(
            guard.check("carol", ip).await.is_err(),
            "the address is full"
        );
        guard.succeeded("bob").await;
        assert_eq!(guard.check("bob", None).await, Ok(()));
    }

    #[tokio::test]
    async fn unknown_users_are_hashed_too_and_hashing_is_bounded() {
        let guard = LoginGuard::new(5, Duration::from_secs(60), 1);
        let known = crate::http::users::hash_password("right").expect("hash");
        // The unknown user's check holds the only hashing slot while it runs, as a wrong
        // password does: a second attempt meanwhile is refused as busy.
        let (unknown, second) = tokio::join!(
            guard.verify("anything", None),
            guard.verify("right", Some(known.clone()))
        );
        assert_eq!(unknown, Ok(false));
        assert_eq!(second, Err(Refused::Busy { retry_after: 1 }));
        assert_eq!(guard.verify("right", Some(known.clone())).await, Ok(true));
        assert_eq!(guard.verify("wrong", Some(known)).await, Ok(false));
    }
}
