//! `[sessions]`, `[auth]` and `[context]`: what the HTTP layer needs per request.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{AuthStore, OnLogin, SameSite, SessionEngine, REDACTED};

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
        /// Encrypt session data at rest in server-side engines (key derived from `secret_key`).
        pub encrypt: bool = false,
    }

    /// `[auth]`: users and login.
    pub struct AuthConfig {
        /// Where users are looked up.
        pub store: AuthStore = AuthStore::Config,
        /// Path anonymous visitors are redirected to when a page requires login.
        pub login_url: String = "/login".into(),
        /// `[[auth.users]]`: the users of `store = "config"` (none built in).
        pub users: Vec<UserEntry> = Vec::new(),
    }

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
