//! The one place where errors become responses.
//!
//! Every handler and middleware error is a [`Error`]. A 5xx logs the whole error chain and shows
//! a generic page; its detail reaches the page only when `server.debug` is on (the render
//! middleware decides, see [`super::render`]).

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use super::page::PendingRender;
use super::templates::TemplateError;

/// An error a handler or middleware can return.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing at this address.
    #[error("not found")]
    NotFound,
    /// The request is not allowed (a missing or wrong CSRF token, say).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The request itself is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The visitor must log in first; carries the login URL with its `next`.
    #[error("login required")]
    LoginRequired { location: String },
    /// The request or the session it would produce is too large.
    #[error("too large: {0}")]
    PayloadTooLarge(String),
    /// Too many attempts (failed logins): 429 with `Retry-After`.
    #[error("too many requests; retry after {retry_after} s")]
    TooManyRequests { retry_after: u64 },
    /// The node is at a limit it keeps (hashing slots): 503 with `Retry-After`.
    #[error("busy; retry after {retry_after} s")]
    Busy { retry_after: u64 },
    /// A service the request needs (session engine, broker, database) is unreachable.
    #[error("{what} unavailable: {message}")]
    Unavailable { what: String, message: String },
    /// A template failed to parse or render.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Anything else: a bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Wraps any error as an internal one, keeping its whole chain in the message.
    pub fn internal(e: impl std::error::Error) -> Self {
        let mut msg = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        Error::Internal(msg)
    }

    fn title(&self) -> &'static str {
        match self {
            Error::NotFound => "Page not found",
            Error::Forbidden(_) => "Forbidden",
            Error::BadRequest(_) => "Bad request",
            Error::LoginRequired { .. } => "Login required",
            Error::PayloadTooLarge(_) => "Too large",
            Error::TooManyRequests { .. } => "Too many attempts",
            Error::Unavailable { .. } | Error::Busy { .. } => "Service unavailable",
            Error::Template(_) | Error::Internal(_) => "Server error",
        }
    }

    /// What the visitor may always see (never internals).
    fn public_message(&self) -> String {
        match self {
            Error::NotFound => "The page you asked for does not exist.".into(),
            Error::Forbidden(why) => why.clone(),
            Error::BadRequest(why) => why.clone(),
            Error::LoginRequired { .. } => "Please log in.".into(),
            Error::PayloadTooLarge(why) => why.clone(),
            Error::TooManyRequests { retry_after } => {
                format!("Too many failed attempts. Please try again in {retry_after} seconds.")
            }
            Error::Busy { .. } => "The server is busy. Please try again in a moment.".into(),
            Error::Unavailable { what, .. } => {
                format!("The {what} is unavailable right now. Please try again in a moment.")
            }
            Error::Template(_) | Error::Internal(_) => {
                "Something went wrong on our side. It has been logged.".into()
            }
        }
    }
}

/// A session failure in a handler: `?` maps it (503 when the engine is unreachable, 413 when
/// the session would be too large, else 500).
impl From<switchyard_actors::session::SessionError> for Error {
    fn from(e: switchyard_actors::session::SessionError) -> Self {
        use switchyard_actors::session::SessionError;
        match e {
            e if e.is_unavailable() => Error::Unavailable {
                what: "session store".into(),
                message: e.to_string(),
            },
            SessionError::TooLarge { .. } => Error::PayloadTooLarge(e.to_string()),
            e => Error::internal(e),
        }
    }
}

/// A task-client failure in a handler: `?` maps it (503 when the broker failed, else 500).
impl From<switchyard_actors::tasks::ClientError> for Error {
    fn from(e: switchyard_actors::tasks::ClientError) -> Self {
        use switchyard_actors::tasks::ClientError;
        match e {
            ClientError::Broker(_) | ClientError::Timeout { .. } => Error::Unavailable {
                what: "task broker".into(),
                message: e.to_string(),
            },
            e => Error::internal(e),
        }
    }
}

/// A refused login attempt: 429 (throttled) or 503 (no hashing slot), with `Retry-After`.
impl From<super::throttle::Refused> for Error {
    fn from(e: super::throttle::Refused) -> Self {
        match e {
            super::throttle::Refused::Throttled { retry_after } => {
                Error::TooManyRequests { retry_after }
            }
            super::throttle::Refused::Busy { retry_after } => Error::Busy { retry_after },
        }
    }
}

/// A query failure in a handler: `?` maps it (503 when Postgres is unreachable, else 500).
impl From<crate::db::DbError> for Error {
    fn from(e: crate::db::DbError) -> Self {
        match e {
            crate::db::DbError::Unavailable(_) => Error::Unavailable {
                what: "database".into(),
                message: e.to_string(),
            },
            e => Error::internal(e),
        }
    }
}

/// The answer of a middleware whose state was not installed beside it: a 500, never a
/// pass-through (a CSRF or session check that silently did nothing would fail open).
pub(crate) fn missing_state(
    req: actix_web::dev::ServiceRequest,
    what: &str,
) -> actix_web::dev::ServiceResponse<actix_web::body::BoxBody> {
    let e = Error::Internal(format!(
        "{what} is not installed on this app (a start-up bug)"
    ));
    let (http_req, _) = req.into_parts();
    actix_web::dev::ServiceResponse::new(http_req, e.error_response())
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        match self {
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::LoginRequired { .. } => StatusCode::SEE_OTHER,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable { .. } | Error::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Template(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let Error::LoginRequired { location } = self {
            return HttpResponse::SeeOther()
                .insert_header((header::LOCATION, location.as_str()))
                .finish();
        }
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), "{self}");
        }
        let mut res = HttpResponse::build(status);
        if let Error::TooManyRequests { retry_after } | Error::Busy { retry_after } = self {
            res.insert_header((header::RETRY_AFTER, retry_after.to_string()));
        }
        let mut res = res.content_type("text/plain; charset=utf-8").body(format!(
            "{}\n{}\n",
            self.title(),
            self.public_message()
        ));
        let page = PendingRender::error(
            status,
            json!({
                "status": status.as_u16(),
                "title": self.title(),
                "message": self.public_message(),
            }),
            status.is_server_error().then(|| self.to_string()),
        );
        res.extensions_mut().insert(page);
        res
    }
}
