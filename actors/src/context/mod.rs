//! Context processors: functions of a request snapshot returning named template variables.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use crate::session::Session;

/// The logged-in user as processors see it.
#[derive(Debug, Clone, PartialEq)]
pub struct UserInfo {
    pub username: String,
    pub permissions: Vec<String>,
}

/// An owned, `Send` snapshot of a request, what processors get (an `HttpRequest` is `!Send`).
#[derive(Debug, Clone)]
pub struct RequestSnapshot {
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The logged-in user, if any.
    pub user: Option<UserInfo>,
    /// The request's session, if the session middleware ran.
    pub session: Option<Session>,
    /// The client's IP address, if known: the peer's, or what a trusted proxy forwarded.
    pub peer_ip: Option<std::net::IpAddr>,
    /// Whether the client is this machine (decided by the HTTP layer, which knows
    /// `server.trusted_proxies`).
    pub local: bool,
    /// The request's CSRF secret (its `csrftoken` cookie, or a new one the response sets),
    /// which the `csrf` processor masks into `csrf_token`.
    pub csrf_secret: Option<String>,
    /// The SQL queries this request ran through the project's pool (`{"sql", "time_ms"}`),
    /// if any ran before rendering.
    pub sql_log: Option<Arc<std::sync::Mutex<Vec<Value>>>>,
}

impl RequestSnapshot {
    /// The session value under `key` as a `T`; `None` when there is no session, no such key,
    /// or the value is not a `T` (a processor shows defaults rather than failing the page).
    pub fn session_get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.session.as_ref()?.get(key).ok().flatten()
    }
}

/// Why a processor could not compute its variables (it then contributes nothing and the page
/// lists the failure in `context_errors`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProcessError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProcessError {
    /// A failure described by `message`.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// A failure described by `message`, caused by `source`.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The message with every source, as the page and the log show it.
    pub fn chain(&self) -> String {
        let mut out = self.message.clone();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }
}

impl From<crate::session::SessionError> for ProcessError {
    fn from(e: crate::session::SessionError) -> Self {
        Self::with_source("session", e)
    }
}

/// What a processor computes: its variables, or why it failed.
pub type ProcessResult = Result<Map<String, Value>, ProcessError>;

/// Why a processor contributed nothing, as reported with the page.
#[derive(Debug, Clone, thiserror::Error)]
#[error("context processor `{processor}`: {message}")]
pub struct ProcessorError {
    pub processor: String,
    pub message: String,
}

/// A context processor: declares the variables it provides and computes them.
pub trait ContextProcessor: Send + Sync + 'static {
    /// The name it is registered and ordered under (`context.processors`).
    fn name(&self) -> &str;
    /// The top-level template variables it provides.
    fn provides(&self) -> &[&'static str];
    /// Computes the variables for one request.
    fn process(&self, req: Arc<RequestSnapshot>) -> BoxFuture<'static, ProcessResult>;
}

pub mod builtins;
pub mod messages;
pub mod worker;

pub use worker::{ContextOutcome, ContextWorker, ContextWorkers, EvaluateContext};
