//! Authentication: the user store, `login`/`logout`, the `LoginRequired` extractor, and the
//! login policy (`sessions.on_login`).
//!
//! Login always gives the session a new key (against fixation). What happens to the anonymous
//! data is `sessions.on_login`: `preserve` keeps it, `discard` starts clean, `merge` calls the
//! application's merge hook with the anonymous data and the user's most recent other session.
//! Logging in as a different user than the session's flushes first; logout flushes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};

use serde_json::{Map, Value};
use switchyard_actors::session::AUTH_USER_KEY;

use super::session::{Session, SessionLayer};
use super::throttle::LoginGuard;
use super::users::{PgUsers, StoredUser};
use super::Error;
use crate::config::{AuthConfig, OnLogin};

/// A user as handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub permissions: Vec<String>,
    /// May open the operator dashboard (`staff = true`).
    pub staff: bool,
}

impl User {
    /// Whether the user holds `permission` (`app.codename`, as in Django).
    pub fn has_perm(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }
}

/// Merges the anonymous session's data into the user's previous session data at login
/// (`on_login = "merge"`): `(anonymous, previous) -> merged`.
pub type MergeFn =
    Arc<dyn Fn(&Map<String, Value>, &Map<String, Value>) -> Map<String, Value> + Send + Sync>;

/// The user store and login policy.
pub struct Auth {
    users: HashMap<String, StoredUser>,
    /// `auth.store = "postgres"`: the users live there instead of `users`.
    db: Option<Arc<PgUsers>>,
    login_url: String,
    on_login: OnLogin,
    merge: Option<MergeFn>,
    /// Login throttling and the hashing limit.
    guard: LoginGuard,
}

impl Auth {
    pub(crate) fn new(config: &AuthConfig, on_login: OnLogin, merge: Option<MergeFn>) -> Self {
        let users = config
            .users
            .iter()
            .map(|u| {
                (
                    u.username.clone(),
                    StoredUser {
                        password_hash: u.password_hash.clone(),
                        permissions: u.permissions.clone(),
                        staff: u.staff,
                    },
                )
            })
            .collect();
        let hashes = match config.max_concurrent_hashes {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        Self {
            users,
            db: None,
            login_url: config.login_url.clone(),
            on_login,
            merge,
            guard: LoginGuard::new(
                config.max_failures,
                std::time::Duration::from_secs(config.failure_window),
                hashes,
            ),
        }
    }

    /// Shares the failed-login counters of the cluster through NATS KV.
    pub(crate) async fn with_nats(
        mut self,
        client: async_nats::Client,
        prefix: &str,
        replicas: usize,
    ) -> Result<Self, String> {
        self.guard = self.guard.with_nats(client, prefix, replicas).await?;
        Ok(self)
    }

    /// Looks users up in Postgres (`auth.store = "postgres"`) instead of `[[auth.users]]`.
    pub(crate) fn with_postgres(mut self, users: Arc<PgUsers>) -> Self {
        self.users.clear();
        self.db = Some(users);
        self
    }

    /// The Postgres user store, with `auth.store = "postgres"`.
    pub fn postgres_users(&self) -> Option<&Arc<PgUsers>> {
        self.db.as_ref()
    }

    fn stored(&self, username: &str) -> Option<StoredUser> {
        match &self.db {
            Some(db) => db.get(username),
            None => self.users.get(username).cloned(),
        }
    }

    /// The user named `username`, if it exists.
    pub fn user(&self, username: &str) -> Option<User> {
        self.stored(username).map(|u| User {
            username: username.to_owned(),
            permissions: u.permissions,
            staff: u.staff,
        })
    }

    /// Checks a login attempt from `req`: `Ok(None)` when the password is wrong or the user
    /// unknown (the same time either way), 429 when the username or the client address failed
    /// too often (`auth.max_failures` in `auth.failure_window`), 503 when every hashing slot is
    /// taken (`auth.max_concurrent_hashes`). Hashing runs on the blocking pool.
    pub async fn authenticate(
        &self,
        req: &HttpRequest,
        username: &str,
        password: &str,
    ) -> Result<Option<User>, Error> {
        // The client's address: a trusted proxy's X-Forwarded-For, else the peer.
        let addr = super::client::client(req).ip;
        self.guard.check(username, addr).await?;
        let stored = match &self.db {
            // Always the database's current hash: a new or changed password counts at once.
            Some(db) => match db.fetch(username).await {
                Ok(u) => u,
                Err(e) => {
                    return Err(Error::Unavailable {
                        what: "user store".into(),
                        message: e.to_string(),
                    })
                }
            },
            None => self.users.get(username).cloned(),
        };
        let ok = self
            .guard
            .verify(password, stored.map(|u| u.password_hash))
            .await?;
        if ok {
            self.guard.succeeded(username).await;
            Ok(self.user(username))
        } else {
            self.guard.failed(username, addr).await;
            Ok(None)
        }
    }

    /// `auth.login_url`.
    pub fn login_url(&self) -> &str {
        &self.login_url
    }
}

/// The logged-in user of `req`, if any (a session naming a user that no longer exists is
/// anonymous).
pub fn current_user(req: &HttpRequest) -> Option<User> {
    let auth = req.app_data::<web::Data<Auth>>()?;
    let session = Session::of(req)?;
    auth.user(&session.user()?)
}

/// Logs `user` in on this request's session (see the module docs for the policy).
pub async fn login(req: &HttpRequest, user: &User) -> Result<(), Error> {
    let auth = req
        .app_data::<web::Data<Auth>>()
        .ok_or_else(|| Error::Internal("auth is not configured".into()))?;
    let session = Session::of(req)
        .ok_or_else(|| Error::Internal("the session middleware is not installed".into()))?;
    if session.user().is_some_and(|u| u != user.username) {
        session.flush();
    }
    match auth.on_login {
        OnLogin::Preserve => session.cycle_key(),
        OnLogin::Discard => session.flush(),
        OnLogin::Merge => {
            let previous = previous_session_data(req, &user.username).await?;
            let anonymous = session.data();
            let merged = match (&auth.merge, previous) {
                (_, None) => anonymous,
                (Some(f), Some(prev)) => f(&anonymous, &prev),
                (None, Some(mut prev)) => {
                    prev.extend(anonymous);
                    prev
                }
            };
            session.flush();
            for (k, v) in merged {
                session.insert(&k, v)?;
            }
        }
    }
    super::csrf::rotate_token(req);
    session.insert(AUTH_USER_KEY, &user.username)?;
    Ok(())
}

/// The data of the user's most recently written other session, if any.
async fn previous_session_data(
    req: &HttpRequest,
    username: &str,
) -> Result<Option<Map<String, Value>>, Error> {
    let Some(shards) = req
        .app_data::<web::Data<SessionLayer>>()
        .and_then(|l| l.shards().cloned())
    else {
        return Ok(None);
    };
    let current = Session::of(req)
        .and_then(|s| s.id())
        .map(|id| shards.key(&id));
    let mut best: Option<(i64, Map<String, Value>)> = None;
    for key in shards.sessions_of(username).await? {
        if Some(&key) == current.as_ref() {
            continue;
        }
        if let Some(r) = shards.load_key(&key).await? {
            if best.as_ref().is_none_or(|(t, _)| r.updated_at > *t) {
                best = Some((r.updated_at, r.data));
            }
        }
    }
    Ok(best.map(|(_, mut data)| {
        data.retain(|k, _| !k.starts_with('_'));
        data
    }))
}

/// Logs the request's user out: the session is flushed (new key, data gone).
pub fn logout(req: &HttpRequest) {
    if let Some(session) = Session::of(req) {
        session.flush();
    }
}

/// Ends every session of `username` except the current request's ("log out everywhere").
/// Returns how many sessions ended.
pub async fn revoke_other_sessions(req: &HttpRequest, username: &str) -> Result<u64, Error> {
    let Some(shards) = req
        .app_data::<web::Data<SessionLayer>>()
        .and_then(|l| l.shards().cloned())
    else {
        return Ok(0);
    };
    let keep = Session::of(req).and_then(|s| s.id());
    Ok(shards.revoke_user(username, keep.as_ref()).await?)
}

/// Changes `username`'s password (`auth.store = "postgres"`) and ends every other session of
/// that user, keeping the current request's. Returns how many sessions ended.
pub async fn change_password(
    req: &HttpRequest,
    username: &str,
    new_password: &str,
) -> Result<u64, Error> {
    let db = req
        .app_data::<web::Data<Auth>>()
        .and_then(|a| a.postgres_users().cloned())
        .ok_or_else(|| {
            Error::BadRequest("passwords can only be changed with auth.store = \"postgres\"".into())
        })?;
    db.set_password(username, new_password)
        .await
        .map_err(|e| match e {
            super::users::UserError::Store(e) if e.is_unavailable() => Error::Unavailable {
                what: "user store".into(),
                message: e.to_string(),
            },
            super::users::UserError::Invalid(m) => Error::BadRequest(m),
            e => Error::internal(e),
        })?;
    revoke_other_sessions(req, username).await
}

/// `next` if it is a path on this site (`/…`, not `//host` or `/\host`), else `None`.
pub fn safe_next(next: &str) -> Option<&str> {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.chars().any(|c| c.is_control() || c == '\\');
    ok.then_some(next)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The login URL with `next` set to `path`.
pub fn login_redirect(login_url: &str, next: &str) -> String {
    let sep = if login_url.contains('?') { '&' } else { '?' };
    format!("{login_url}{sep}next={}", percent_encode(next))
}

/// An extractor for views that need a logged-in user: anonymous visitors get a 303 to
/// `auth.login_url?next=<this path>`.
#[derive(Debug, Clone)]
pub struct LoginRequired(pub User);

impl FromRequest for LoginRequired {
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let result = match current_user(req) {
            Some(u) => Ok(LoginRequired(u)),
            None => {
                let login_url = req
                    .app_data::<web::Data<Auth>>()
                    .map(|a| a.login_url().to_owned())
                    .unwrap_or_else(|| "/login".into());
                let next = match req.query_string() {
                    "" => req.path().to_owned(),
                    q => format!("{}?{q}", req.path()),
                };
                Err(Error::LoginRequired {
                    location: login_redirect(&login_url, &next),
                })
            }
        };
        Box::pin(async move { result })
    }
}

/// An extractor for the current user, if any.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub Option<User>);

impl FromRequest for CurrentUser {
    type Error = Error;
    type Future = std::future::Ready<Result<Self, Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(Ok(CurrentUser(current_user(req))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_must_stay_on_site() {
        assert_eq!(safe_next("/cart"), Some("/cart"));
        assert_eq!(safe_next("/orders/1?x=2"), Some("/orders/1?x=2"));
        for bad in [
            "https://evil.example/",
            "//evil.example/",
            "/\\evil.example",
            "evil",
            "",
            "/ok\r\nSet-Cookie: x",
        ] {
            assert_eq!(safe_next(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn login_redirect_encodes_next() {
        assert_eq!(login_redirect("/login", "/cart"), "/login?next=/cart");
        assert_eq!(
            login_redirect("/login", "/a?b=c&d"),
            "/login?next=/a%3Fb%3Dc%26d"
        );
    }
}
