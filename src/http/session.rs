//! The session middleware and the [`Session`] extractor.
//!
//! Before the handler: the cookie's id is parsed (a malformed one is ignored, never adopted),
//! the session loaded through its shard actor (or, with `signed_cookies`, verified from the
//! cookie itself), and a handle put in the request. After the handler: a session that changed
//! is saved (or with `save_every_request`, any non-empty one), an emptied one is deleted with
//! its cookie, nothing is saved when the response is a 5xx, and a response that read the
//! session gets `Vary: Cookie`.

use std::future::{ready, Ready};
use std::ops::Deref;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::cookie::{time, Cookie, SameSite as CookieSameSite};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest, ResponseError};
use switchyard_actors::session::{
    self as sess, now_unix, CookieSigner, Expiry, SaveSession, SessionError, SessionId,
    SessionShards, SessionState,
};

use super::metrics::Metrics;
use super::Error;
use crate::config::{SameSite, SessionsConfig};

/// Paths that never touch the session (probes must answer even when the engine is down).
const SESSIONLESS_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// The request's session: typed get/insert/update/flush/cycle_key (see the methods of
/// [`switchyard_actors::session::Session`], which this dereferences to).
#[derive(Clone, Debug)]
pub struct Session(pub(crate) sess::Session);

impl Deref for Session {
    type Target = sess::Session;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Session {
    /// The session of `req` (`None` when the session middleware did not run).
    pub fn of(req: &HttpRequest) -> Option<Session> {
        req.extensions().get::<Session>().cloned()
    }
}

impl FromRequest for Session {
    type Error = Error;
    type Future = Ready<Result<Self, Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Session::of(req).ok_or_else(|| {
            Error::Internal("the session middleware is not installed on this route".into())
        }))
    }
}

/// Where sessions live, as far as the middleware cares.
#[derive(Clone)]
pub(crate) enum Backend {
    /// A server-side engine behind the shard actors.
    Server(SessionShards),
    /// The data in the cookie, signed.
    Signed(CookieSigner),
}

/// The cookie's attributes.
#[derive(Clone)]
struct CookieSettings {
    name: String,
    age: u64,
    browser_close: bool,
    secure: bool,
    http_only: bool,
    same_site: CookieSameSite,
    domain: String,
    path: String,
}

/// Everything the session middleware needs, shared by every HTTP worker.
pub struct SessionLayer {
    pub(crate) backend: Backend,
    cookie: CookieSettings,
    save_every_request: bool,
    max_size: usize,
    engine: &'static str,
    /// `switchyard_sessions_saved_total{engine}` of the node's metrics (looked up once).
    saved: std::sync::OnceLock<prometheus::IntCounter>,
}

impl SessionLayer {
    pub(crate) fn new(config: &SessionsConfig, backend: Backend) -> Self {
        let engine = match &backend {
            Backend::Server(shards) => shards.engine(),
            Backend::Signed(_) => "signed_cookies",
        };
        Self {
            backend,
            cookie: CookieSettings {
                name: config.cookie_name.clone(),
                age: config.cookie_age,
                browser_close: config.expire_at_browser_close,
                secure: config.cookie_secure,
                http_only: config.cookie_http_only,
                same_site: match config.cookie_same_site {
                    SameSite::Lax => CookieSameSite::Lax,
                    SameSite::Strict => CookieSameSite::Strict,
                    SameSite::None => CookieSameSite::None,
                },
                domain: config.cookie_domain.clone(),
                path: config.cookie_path.clone(),
            },
            save_every_request: config.save_every_request,
            max_size: config.max_size,
            engine,
            saved: std::sync::OnceLock::new(),
        }
    }

    /// The engine's name (`sessions.engine`).
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    /// The shard actors of a server-side engine.
    pub fn shards(&self) -> Option<&SessionShards> {
        match &self.backend {
            Backend::Server(s) => Some(s),
            Backend::Signed(_) => None,
        }
    }

    async fn load(&self, cookie: Option<&str>) -> Result<SessionState, SessionError> {
        let mut state = SessionState {
            max_size: self.max_size,
            had_cookie: cookie.is_some(),
            ..Default::default()
        };
        let Some(value) = cookie else {
            return Ok(state);
        };
        match &self.backend {
            Backend::Server(shards) => {
                // A malformed or unknown id gives a fresh session; the id is never adopted.
                let Some(id) = SessionId::parse(value) else {
                    return Ok(state);
                };
                if let Some(record) = shards.load(&id).await? {
                    state.id = Some(id);
                    state.base_version = Some(record.version);
                    state.data = record.data;
                }
            }
            Backend::Signed(signer) => {
                if let Some((data, _expires)) = signer.decode(value) {
                    state.data = data;
                }
            }
        }
        Ok(state)
    }

    /// Seconds until expiry for `expiry`, and whether the cookie lives until browser close.
    fn age(&self, expiry: Expiry) -> (u64, bool) {
        match expiry {
            Expiry::Default => (self.cookie.age, self.cookie.browser_close),
            Expiry::Seconds(n) => (n, false),
            Expiry::BrowserClose => (self.cookie.age, true),
        }
    }

    fn cookie(&self, value: String, max_age: Option<u64>) -> Cookie<'static> {
        let mut c = Cookie::build(self.cookie.name.clone(), value)
            .path(self.cookie.path.clone())
            .secure(self.cookie.secure)
            .http_only(self.cookie.http_only)
            .same_site(self.cookie.same_site)
            .finish();
        if !self.cookie.domain.is_empty() {
            c.set_domain(self.cookie.domain.clone());
        }
        if let Some(age) = max_age {
            c.set_max_age(time::Duration::seconds(age.min(i64::MAX as u64) as i64));
        }
        c
    }

    fn removal_cookie(&self) -> Cookie<'static> {
        let mut c = self.cookie(String::new(), Some(0));
        c.set_expires(time::OffsetDateTime::UNIX_EPOCH);
        c
    }

    /// Saves what the request did and sets or removes the cookie.
    async fn finish(
        &self,
        session: &sess::Session,
        res: &mut ServiceResponse<BoxBody>,
    ) -> Result<(), Error> {
        let expiry = session.expiry();
        let (accessed, modified, empty, had_cookie, to_delete) = session.with_state(|s| {
            let to_delete = std::mem::take(&mut s.to_delete);
            (
                s.accessed,
                s.modified,
                s.data.is_empty(),
                s.had_cookie,
                to_delete,
            )
        });
        if accessed {
            add_vary_cookie(res);
        }
        if let Backend::Server(shards) = &self.backend {
            // A flush deletes the old session even if the response failed: logout must stick.
            for id in &to_delete {
                shards.delete(id).await?;
            }
        }
        if res.status().is_server_error() {
            return Ok(());
        }
        let save = modified || (self.save_every_request && !empty);
        if !save {
            return Ok(());
        }
        if empty {
            if let Backend::Server(shards) = &self.backend {
                let ids = session.with_state(|s| [s.id.take(), s.cycled_from.take()]);
                for id in ids.into_iter().flatten() {
                    shards.delete(&id).await?;
                }
            }
            if had_cookie {
                res.response_mut()
                    .add_removal_cookie(&self.removal_cookie())
                    .map_err(Error::internal)?;
            }
            return Ok(());
        }
        let (age, browser_close) = self.age(expiry);
        let expires_at = now_unix().saturating_add(age.min(i64::MAX as u64 / 2) as i64);
        let value = match &self.backend {
            Backend::Server(shards) => {
                let msg = session.with_state(|s| SaveSession {
                    id: s.id.clone(),
                    base_version: s.base_version,
                    data: s.data.clone(),
                    changes: s.changes.clone(),
                    expires_at,
                    max_size: self.max_size,
                    delete_after: s.cycled_from.clone(),
                });
                let saved = shards.save(msg).await?;
                let value = saved.id.as_str().to_owned();
                session.with_state(|s| {
                    s.id = Some(saved.id);
                    s.base_version = Some(saved.version);
                    s.cycled_from = None;
                });
                value
            }
            Backend::Signed(signer) => signer
                .encode(&session.data(), expires_at)
                .map_err(|e| Error::PayloadTooLarge(e.to_string()))?,
        };
        if let Some(m) = res.request().app_data::<web::Data<Metrics>>() {
            self.saved
                .get_or_init(|| m.sessions_saved_counter(self.engine))
                .inc();
        }
        let cookie = self.cookie(value, (!browser_close).then_some(age));
        res.response_mut()
            .add_cookie(&cookie)
            .map_err(Error::internal)?;
        Ok(())
    }
}

fn add_vary_cookie(res: &mut ServiceResponse<BoxBody>) {
    let headers = res.headers_mut();
    let already = headers.get_all(header::VARY).any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("cookie"))
        })
    });
    if !already {
        headers.append(header::VARY, HeaderValue::from_static("Cookie"));
    }
}

/// The session middleware (see the module docs).
pub async fn session_middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(layer) = req.app_data::<web::Data<SessionLayer>>().cloned() else {
        return Ok(super::error::missing_state(req, "the session layer"));
    };
    if SESSIONLESS_PATHS.contains(&req.path()) {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    // The first cookie of that name, as `req.cookie` finds it, without copying the cookie.
    let cookie = req.cookies().ok().and_then(|cookies| {
        cookies
            .iter()
            .find(|c| c.name() == layer.cookie.name)
            .map(|c| c.value().to_owned())
    });
    let state = match layer.load(cookie.as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            let err = Error::from(e);
            let (http_req, _) = req.into_parts();
            return Ok(ServiceResponse::new(http_req, err.error_response()));
        }
    };
    let session = sess::Session::new(state);
    req.extensions_mut().insert(Session(session.clone()));
    let mut res = next.call(req).await?.map_into_boxed_body();
    if let Err(e) = layer.finish(&session, &mut res).await {
        let (http_req, _) = res.into_parts();
        return Ok(ServiceResponse::new(http_req, e.error_response()));
    }
    Ok(res)
}
