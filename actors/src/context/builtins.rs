//! The built-in processors, matching Django's: `debug`, `request`, `auth`, `messages`, `csrf`
//! and `static`.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};

use super::{messages, ContextProcessor, RequestSnapshot};

type Output = BoxFuture<'static, super::ProcessResult>;

fn ready(map: Map<String, Value>) -> Output {
    Box::pin(async move { Ok(map) })
}

/// `static`: `static_url`.
pub struct StaticProcessor {
    pub static_url: String,
}

impl ContextProcessor for StaticProcessor {
    fn name(&self) -> &str {
        "static"
    }
    fn provides(&self) -> &[&'static str] {
        &["static_url"]
    }
    fn process(&self, _req: Arc<RequestSnapshot>) -> Output {
        let mut m = Map::new();
        m.insert("static_url".into(), Value::String(self.static_url.clone()));
        ready(m)
    }
}

/// `auth`: `user` (`username`, `is_authenticated`) and `perms` (permission → true).
pub struct AuthProcessor;

impl ContextProcessor for AuthProcessor {
    fn name(&self) -> &str {
        "auth"
    }
    fn provides(&self) -> &[&'static str] {
        &["user", "perms"]
    }
    fn process(&self, req: Arc<RequestSnapshot>) -> Output {
        let mut m = Map::new();
        match req.user.clone() {
            Some(u) => {
                m.insert(
                    "user".into(),
                    json!({"username": u.username, "is_authenticated": true}),
                );
                let perms: Map<String, Value> = u
                    .permissions
                    .into_iter()
                    .map(|p| (p, Value::Bool(true)))
                    .collect();
                m.insert("perms".into(), Value::Object(perms));
            }
            None => {
                m.insert(
                    "user".into(),
                    json!({"username": "", "is_authenticated": false}),
                );
                m.insert("perms".into(), json!({}));
            }
        }
        ready(m)
    }
}

/// `messages`: the pending flash messages, consumed by rendering them.
pub struct MessagesProcessor;

impl ContextProcessor for MessagesProcessor {
    fn name(&self) -> &str {
        "messages"
    }
    fn provides(&self) -> &[&'static str] {
        &["messages"]
    }
    fn process(&self, req: Arc<RequestSnapshot>) -> Output {
        let list = req.session.as_ref().map(messages::take).unwrap_or_default();
        let mut m = Map::new();
        m.insert(
            "messages".into(),
            serde_json::to_value(list).unwrap_or(Value::Array(Vec::new())),
        );
        ready(m)
    }
}

/// Headers never shown to templates.
const HIDDEN_HEADERS: &[&str] = &["cookie", "authorization", "proxy-authorization"];

/// `request`: `request` with `method`, `path`, `query` (parsed) and `headers` (`Cookie` and
/// `Authorization` hidden).
pub struct RequestProcessor;

impl ContextProcessor for RequestProcessor {
    fn name(&self) -> &str {
        "request"
    }
    fn provides(&self) -> &[&'static str] {
        &["request"]
    }
    fn process(&self, req: Arc<RequestSnapshot>) -> Output {
        let headers: Map<String, Value> = req
            .headers
            .iter()
            .filter(|(k, _)| !HIDDEN_HEADERS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let query: Map<String, Value> = req
            .query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), Value::String(v.to_owned()))
            })
            .collect();
        let mut m = Map::new();
        m.insert(
            "request".into(),
            json!({
                "method": req.method,
                "path": req.path,
                "query_string": req.query,
                "query": query,
                "headers": headers,
            }),
        );
        ready(m)
    }
}

/// `debug`: `debug` and `sql_queries`, only when the server is in debug mode and the client is
/// local (as Django's `INTERNAL_IPS`).
pub struct DebugProcessor {
    pub debug: bool,
}

impl ContextProcessor for DebugProcessor {
    fn name(&self) -> &str {
        "debug"
    }
    fn provides(&self) -> &[&'static str] {
        &["debug", "sql_queries"]
    }
    fn process(&self, req: Arc<RequestSnapshot>) -> Output {
        let mut m = Map::new();
        let local = req.peer_ip.is_some_and(|ip| ip.is_loopback());
        if self.debug && local {
            let queries = req
                .sql_log
                .as_ref()
                .map(|log| log.lock().unwrap_or_else(|e| e.into_inner()).clone())
                .unwrap_or_default();
            m.insert("debug".into(), Value::Bool(true));
            m.insert("sql_queries".into(), Value::Array(queries));
        }
        ready(m)
    }
}

/// The session key holding the CSRF token.
pub const CSRF_SESSION_KEY: &str = "_csrf_token";

/// The session's CSRF token, created (and stored in the session) on first use.
pub fn csrf_token(session: &crate::session::Session) -> Option<String> {
    if let Ok(Some(t)) = session.get::<String>(CSRF_SESSION_KEY) {
        return Some(t);
    }
    let token = crate::session::SessionId::generate().as_str().to_owned();
    session.insert(CSRF_SESSION_KEY, &token).ok()?;
    Some(token)
}

/// `csrf`: `csrf_token` (templates write the form field with the `{{csrf_input}}` helper).
pub struct CsrfProcessor;

impl ContextProcessor for CsrfProcessor {
    fn name(&self) -> &str {
        "csrf"
    }
    fn provides(&self) -> &[&'static str] {
        &["csrf_token"]
    }
    fn process(&self, req: Arc<RequestSnapshot>) -> Output {
        let mut m = Map::new();
        if let Some(token) = req.session.as_ref().and_then(csrf_token) {
            m.insert("csrf_token".into(), Value::String(token));
        }
        ready(m)
    }
}
