//! CSRF protection, as Django's middleware: every unsafe method (POST, PUT, PATCH, DELETE)
//! needs a token matching the visitor's secret, in the `csrfmiddlewaretoken` form field or the
//! `X-CSRFToken` header; without a valid one the answer is 403.
//!
//! The secret lives in the `csrftoken` cookie (random, 32 characters, readable by scripts for
//! `X-CSRFToken`), never in the session, so a visitor who stores nothing gets no server-side
//! session, and any node can check a token. A visitor without the cookie gets a new secret,
//! set on the first HTML page that may have used it. Pages carry the secret masked afresh
//! (`csrf_token`, two pages show different values, both accepted). Login rotates the secret.
//! Routes can be exempted. With `sessions.cookie_secure`, the request is taken to be HTTPS and
//! its `Origin` (or else `Referer`) must be this host.

use std::collections::HashSet;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::cookie::{time, Cookie, SameSite as CookieSameSite};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest, ResponseError};
use futures_util::StreamExt;
use subtle::ConstantTimeEq;
use switchyard_actors::context::builtins::{is_csrf_secret, new_csrf_secret, unmask_csrf_token};

use super::Error;
use crate::config::{SameSite, SessionsConfig};

/// The cookie holding the CSRF secret (Django's name).
pub const CSRF_COOKIE: &str = "csrftoken";
/// How long the CSRF cookie lives: a year, as Django's `CSRF_COOKIE_AGE`.
const CSRF_COOKIE_AGE: time::Duration = time::Duration::days(365);

/// The form field carrying the token.
pub const CSRF_FIELD: &str = "csrfmiddlewaretoken";
/// The header carrying the token.
pub const CSRF_HEADER: &str = "x-csrftoken";
/// The largest form body searched for the token.
const MAX_FORM_BYTES: usize = 1 << 20;

/// The CSRF policy of a node.
pub struct CsrfPolicy {
    /// Route patterns exempt from the check (`App::csrf_exempt`).
    pub(crate) exempt: HashSet<String>,
    /// Check `Origin`/`Referer` as over HTTPS (`sessions.cookie_secure`).
    pub(crate) check_origin: bool,
    /// The cookie's `Path`, `Domain`, `SameSite` and `Secure` (the `sessions.cookie_*` keys).
    path: String,
    domain: String,
    same_site: CookieSameSite,
    secure: bool,
}

impl CsrfPolicy {
    /// The policy with routes `exempt` and the cookie attributes of `[sessions]`.
    pub(crate) fn new(exempt: HashSet<String>, sessions: &SessionsConfig) -> Self {
        Self {
            exempt,
            check_origin: sessions.cookie_secure,
            path: sessions.cookie_path.clone(),
            domain: sessions.cookie_domain.clone(),
            same_site: match sessions.cookie_same_site {
                SameSite::Lax => CookieSameSite::Lax,
                SameSite::Strict => CookieSameSite::Strict,
                SameSite::None => CookieSameSite::None,
            },
            secure: sessions.cookie_secure,
        }
    }

    fn cookie(&self, secret: String) -> Cookie<'static> {
        let mut c = Cookie::build(CSRF_COOKIE, secret)
            .path(self.path.clone())
            .same_site(self.same_site)
            .secure(self.secure)
            .http_only(false)
            .max_age(CSRF_COOKIE_AGE)
            .finish();
        if !self.domain.is_empty() {
            c.set_domain(self.domain.clone());
        }
        c
    }
}

/// The request's CSRF secret: from its cookie, or new (then the response sets the cookie).
#[derive(Clone, Debug)]
pub(crate) struct CsrfSecret {
    pub(crate) value: String,
    new: bool,
}

/// Marks a response whose request logged in: it carries a fresh CSRF secret.
struct RotateCsrf;

/// Rotates the visitor's CSRF secret with this request's response (login does).
pub fn rotate_token(req: &HttpRequest) {
    req.extensions_mut().insert(RotateCsrf);
}

fn forbidden(why: &str) -> Error {
    Error::Forbidden(format!("CSRF verification failed: {why}."))
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

fn origin_ok(req: &ServiceRequest) -> Result<(), Error> {
    // Not `connection_info()`: it believes X-Forwarded-Host from anyone.
    let host = super::client::client(req.request()).host;
    let expected = format!("https://{host}");
    let headers = req.headers();
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        return if origin == expected {
            Ok(())
        } else {
            Err(forbidden(&format!("origin {origin} is not {expected}")))
        };
    }
    match headers.get(header::REFERER).and_then(|v| v.to_str().ok()) {
        None => Err(forbidden("referer checking failed, no Referer")),
        Some(r) if r == expected || r.starts_with(&format!("{expected}/")) => Ok(()),
        Some(r) => Err(forbidden(&format!("referer {r} does not match {expected}"))),
    }
}

/// Reads the form body (bounded), finds the token, and puts the body back for the handler.
async fn form_token(req: &mut ServiceRequest) -> Result<Option<String>, Error> {
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Ok(None);
    }
    let mut payload = req.take_payload();
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| Error::BadRequest(format!("cannot read body: {e}")))?;
        if body.len() + chunk.len() > MAX_FORM_BYTES {
            return Err(Error::PayloadTooLarge(format!(
                "form bodies are limited to {MAX_FORM_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    let token = form_urlencoded::parse(&body)
        .find(|(k, _)| k == CSRF_FIELD)
        .map(|(_, v)| v.into_owned());
    req.set_payload(Payload::from(body));
    Ok(token)
}

async fn check(
    req: &mut ServiceRequest,
    policy: &CsrfPolicy,
    secret: Option<&str>,
) -> Result<(), Error> {
    if is_safe(req.method()) {
        return Ok(());
    }
    if req
        .match_pattern()
        .is_some_and(|p| policy.exempt.contains(&p))
    {
        return Ok(());
    }
    if policy.check_origin {
        origin_ok(req)?;
    }
    let Some(expected) = secret else {
        return Err(forbidden("CSRF cookie not set (load the form first)"));
    };
    let given = match req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()) {
        Some(h) => Some(h.to_owned()),
        None => form_token(req).await?,
    };
    let Some(given) = given else {
        return Err(forbidden("CSRF token missing"));
    };
    match unmask_csrf_token(&given) {
        Some(g) if bool::from(g.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
        _ => Err(forbidden("CSRF token incorrect")),
    }
}

/// The CSRF middleware (runs inside the session middleware).
pub async fn csrf_middleware(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(policy) = req.app_data::<web::Data<CsrfPolicy>>().cloned() else {
        return Ok(super::error::missing_state(req, "the CSRF policy"));
    };
    let cookie = req
        .cookie(CSRF_COOKIE)
        .map(|c| c.value().to_owned())
        .filter(|v| is_csrf_secret(v));
    if let Err(e) = check(&mut req, &policy, cookie.as_deref()).await {
        tracing::info!(path = %req.path(), "{e}");
        let (http_req, _) = req.into_parts();
        return Ok(ServiceResponse::new(http_req, e.error_response()));
    }
    let secret = match cookie {
        Some(value) => CsrfSecret { value, new: false },
        None => CsrfSecret {
            value: new_csrf_secret(),
            new: true,
        },
    };
    req.extensions_mut().insert(secret.clone());
    let mut res = next.call(req).await?.map_into_boxed_body();
    let rotate = res.request().extensions().get::<RotateCsrf>().is_some();
    let is_html = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/html"));
    let set = if rotate {
        Some(new_csrf_secret())
    } else if secret.new && is_html {
        Some(secret.value)
    } else {
        None
    };
    if let Some(value) = set {
        if let Err(e) = res.response_mut().add_cookie(&policy.cookie(value)) {
            tracing::error!("cannot set the CSRF cookie: {e}");
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use actix_web::middleware::from_fn;
    use actix_web::{test, web, App, HttpResponse};

    #[actix_web::test]
    async fn without_its_policy_the_middleware_fails_closed() {
        let app = test::init_service(
            App::new()
                .wrap(from_fn(super::csrf_middleware))
                .route("/", web::post().to(HttpResponse::Ok)),
        )
        .await;
        let res = test::call_service(&app, test::TestRequest::post().uri("/").to_request()).await;
        assert_eq!(res.status(), 500, "a POST must never pass an absent check");
    }
}
