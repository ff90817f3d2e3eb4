//! CSRF protection, as Django's middleware: every unsafe method (POST, PUT, PATCH, DELETE)
//! needs the session's token, in the `csrfmiddlewaretoken` form field or the `X-CSRFToken`
//! header; without a valid one the answer is 403. The token lives in the session (no separate
//! cookie) and is rotated at login. Routes can be exempted. With `sessions.cookie_secure`, the
//! request is taken to be HTTPS and its `Origin` (or else `Referer`) must be this host.

use std::collections::HashSet;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, ResponseError};
use futures_util::StreamExt;
use subtle::ConstantTimeEq;
use switchyard_actors::context::builtins::CSRF_SESSION_KEY;

use super::session::Session;
use super::Error;

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
    let host = req.connection_info().host().to_owned();
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

async fn check(req: &mut ServiceRequest, policy: &CsrfPolicy) -> Result<(), Error> {
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
    let expected = req
        .extensions()
        .get::<Session>()
        .and_then(|s| s.get::<String>(CSRF_SESSION_KEY).ok().flatten());
    let Some(expected) = expected else {
        return Err(forbidden(
            "no CSRF token in the session (load the form first)",
        ));
    };
    let given = match req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()) {
        Some(h) => Some(h.to_owned()),
        None => form_token(req).await?,
    };
    match given {
        None => Err(forbidden("CSRF token missing")),
        Some(g) if bool::from(g.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
        Some(_) => Err(forbidden("CSRF token incorrect")),
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
    if let Err(e) = check(&mut req, &policy).await {
        tracing::info!(path = %req.path(), "{e}");
        let (http_req, _) = req.into_parts();
        return Ok(ServiceResponse::new(http_req, e.error_response()));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
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
