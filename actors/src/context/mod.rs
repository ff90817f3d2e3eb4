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
    /// The peer's IP address, if known.
    pub peer_ip: Option<std::net::IpAddr>,
    /// The SQL queries this request ran through the project's pool (`{"sql", "time_ms"}`),
    /// if any ran before rendering.
    pub sql_log: Option<Arc<std::sync::Mutex<Vec<Value>>>>,
}

/// Why a processor contributed nothing.
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
    fn process(
        &self,
        req: Arc<RequestSnapshot>,
    ) -> BoxFuture<'static, Result<Map<String, Value>, String>>;
}

pub mod builtins;
pub mod messages;
pub mod worker;

pub use worker::{ContextOutcome, ContextWorker, ContextWorkers, EvaluateContext};
