//! `[sessions]`, `[auth]` and `[context]`: what the HTTP layer needs per request.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::Origins;
use super::{ConfigError, ServerConfig, REDACTED};

section! {
    /// `[sessions]`: the session engine and the session cookie.
    pub struct SessionsConfig {
        /// Where session data lives.
        pub engine: SessionEngine = SessionEngine::Memory,
        /// Name of the session cookie.
        pub cookie_name: String = "sessionid".into(),
        /// Lifetime of a session and its cookie, in seconds (>= 1; default two weeks).
        pub cookie_age: u64 = 1_209_600,
        /// Make the cookie a browser-session cookie (no `Max-Age`).
        pub expire_at_browser_close: bool = false,
        /// Save the session (and refresh its expiry) on every request, not only when modified.
        pub save_every_request: bool = false,
        /// Set the cookie's `Secure` attribute.
        pub cookie_secure: bool = false,
        /// Set the cookie's `HttpOnly` attribute.
        pub cookie_http_only: bool = true,
        /// The cookie's `SameSite` attribute; `none` requires `cookie_secure = true`.
        pub cookie_same_site: SameSite = SameSite::Lax,
        /// The cookie's `Domain` attribute; empty: host-only cookie.
        pub cookie_domain: String = String::new(),
        /// The cookie's `Path` attribute.
        pub cookie_path: String = "/".into(),
        /// What happens to the anonymous session's data at login.
        pub on_login: OnLogin = OnLogin::Preserve,
        /// Largest serialized session, in bytes (>= 1); larger writes are refused.
        pub max_size: usize = 65_536,
        /// The memory engine's cap; the soonest-expiring sessions are evicted first.
        pub memory_max_sessions: usize = 1_000_000,
        /// Encrypt session data at rest in server-side engines (key derived from `secret_key`).
        pub encrypt: bool = false,
    }
}

impl SessionsConfig {
    pub(super) fn validate(&self, v: &Origins, server: &ServerConfig) -> Result<(), ConfigError> {
        let separator = |b: u8| b"()<>@,;:\\\"/[]?={}".contains(&b);
        let name = &self.cookie_name;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && !separator(b)) {
            let message = format!("expected a non-empty cookie name token, got {name:?}");
            return Err(v.fail("sessions.cookie_name", message));
        }
        v.range("sessions.cookie_age", self.cookie_age, 1, None)?;
        if !self.cookie_path.starts_with('/') {
            let message = format!(
                "expected a path starting with \"/\", got {:?}",
                self.cookie_path
            );
            return Err(v.fail("sessions.cookie_path", message));
        }
        if self.cookie_same_site == SameSite::None && !self.cookie_secure {
            let message = "\"none\" requires sessions.cookie_secure = true";
            return Err(v.fail("sessions.cookie_same_site", message));
        }
        if self.encrypt && server.secret_key.is_empty() {
            let message = "true requires server.secret_key (the encryption key is derived from it)";
            return Err(v.fail("sessions.encrypt", message));
        }
        v.range(
            "sessions.memory_max_sessions",
            self.memory_max_sessions as u64,
            1,
            None,
        )?;
        v.range("sessions.max_size", self.max_size as u64, 1, None)
    }
}

string_enum! {
    /// The session cookie's `SameSite` attribute.
    SameSite default Lax {
        /// `lax`: sent on top-level navigations.
        Lax => "lax",
        /// `strict`: same-site requests only.
        Strict => "strict",
        /// `none`: always sent (requires `Secure`).
        None => "none",
    }
}

string_enum! {
    /// What happens to the anonymous session's data at login.
    OnLogin default Preserve {
        /// Keep it, under a new session key.
        Preserve => "preserve",
        /// Merge it into the user's previous session.
        Merge => "merge",
        /// Drop it.
        Discard => "discard",
    }
}

string_enum! {
    /// Where session data lives.
    SessionEngine default Memory {
        /// In the node's memory (single node only).
        Memory => "memory",
        /// One file per session under `file.dir`.
        File => "file",
        /// A Postgres table.
        Postgres => "postgres",
        /// Postgres, cached in memory with NATS invalidations.
        CachedDb => "cached_db",
        /// A NATS key-value bucket.
        NatsKv => "nats_kv",
        /// Redis.
        Redis => "redis",
        /// Memcached.
        Memcached => "memcached",
        /// In the (signed) cookie itself.
        SignedCookies => "signed_cookies",
    }
}

section! {
    /// `[auth]`: users and login.
    pub struct AuthConfig {
        /// Where users are looked up.
        pub store: AuthStore = AuthStore::Config,
        /// Path anonymous visitors are redirected to when a page requires login.
        pub login_url: String = "/login".into(),
        /// Failed logins per username or per client address within `failure_window`, then 429.
        pub max_failures: u32 = 5,
        /// Seconds of the failed-login window.
        pub failure_window: u64 = 300,
        /// Password hashes at once per node; 0 = the number of cores.
        pub max_concurrent_hashes: u32 = 0,
        /// `[[auth.users]]`: the users of `store = "config"` (none built in).
        pub users: Vec<UserEntry> = Vec::new(),
    }
}

impl AuthConfig {
    pub(super) fn validate(&self, v: &Origins) -> Result<(), ConfigError> {
        if self.login_url.is_empty() {
            return Err(v.fail("auth.login_url", "expected a non-empty URL"));
        }
        if self.max_failures == 0 {
            return Err(v.fail("auth.max_failures", "expected at least 1"));
        }
        if self.failure_window == 0 {
            return Err(v.fail("auth.failure_window", "expected at least 1 second"));
        }
        let names = self.users.iter().map(|u| u.username.as_str());
        v.unique("auth.users", ".username", "user", names)?;
        match self
            .users
            .iter()
            .position(|u| argon2::PasswordHash::new(&u.password_hash).is_err())
        {
            Some(i) => Err(v.fail(
                format!("auth.users[{i}].password_hash"),
                "expected a PHC password hash such as \"$argon2id$v=19$m=19456,t=2,p=1$...\"",
            )),
            None => Ok(()),
        }
    }
}

/// One `[[auth.users]]` entry. `Debug` and [`super::Config::to_redacted_toml`] hide the hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// The login name (unique).
    pub username: String,
    /// PHC-format password hash, e.g. `$argon2id$v=19$m=19456,t=2,p=1$...`.
    pub password_hash: String,
    /// Permission names such as `shop.view_order`.
    #[serde(default)]
    pub permissions: Vec<String>,
}

impl fmt::Debug for UserEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserEntry")
            .field("username", &self.username)
            .field("password_hash", &REDACTED)
            .field("permissions", &self.permissions)
            .finish()
    }
}

string_enum! {
    /// Where users are looked up.
    AuthStore default Config {
        /// `[[auth.users]]` in the configuration.
        Config => "config",
        /// The Postgres database.
        Postgres => "postgres",
    }
}

section! {
    /// `[context]`: template context processors.
    pub struct ContextConfig {
        /// Registered processor names, in merge order (later ones win on equal variable names).
        pub processors: Vec<String> =
            ["debug", "request", "auth", "messages", "csrf", "static"].map(String::from).to_vec(),
        /// Run only the processors whose variables the template uses.
        pub lazy: bool = true,
        /// Time budget of each processor, in milliseconds (>= 1).
        pub timeout_ms: u64 = 200,
    }
}

impl ContextConfig {
    pub(super) fn validate(&self, v: &Origins) -> Result<(), ConfigError> {
        let names = self.processors.iter().map(String::as_str);
        v.unique("context.processors", "", "processor", names)?;
        v.range("context.timeout_ms", self.timeout_ms, 1, None)
    }
}
