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
        // Decided by the HTTP layer (trusted proxies, forwarding headers).
        if self.debug && req.local {
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

/// Characters of CSRF secrets and masks (Django's).
const CSRF_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
/// Length of the CSRF secret (the `csrftoken` cookie) and of a mask; a form token is a mask
/// followed by the masked secret, twice as long.
pub const CSRF_SECRET_LEN: usize = 32;

fn csrf_index(c: u8) -> Option<usize> {
    CSRF_CHARS.iter().position(|&x| x == c)
}

/// A new random CSRF secret.
pub fn new_csrf_secret() -> String {
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    (0..CSRF_SECRET_LEN)
        .map(|_| char::from(CSRF_CHARS[rng.gen_range(0..CSRF_CHARS.len())]))
        .collect()
}

/// Whether `s` is a well-formed CSRF secret (a cookie value anything else is ignored).
pub fn is_csrf_secret(s: &str) -> bool {
    s.len() == CSRF_SECRET_LEN && s.bytes().all(|b| csrf_index(b).is_some())
}

/// The secret masked with a fresh random mask: every page gets a different value, so the
/// token in a page leaks nothing through compression (BREACH), as Django does.
pub fn mask_csrf_secret(secret: &str) -> String {
    let mask = new_csrf_secret();
    let n = CSRF_CHARS.len();
    let masked: String = secret
        .bytes()
        .zip(mask.bytes())
        .map(|(s, m)| {
            let (s, m) = (csrf_index(s).unwrap_or(0), csrf_index(m).unwrap_or(0));
            char::from(CSRF_CHARS[(s + m) % n])
        })
        .collect();
    mask + &masked
}

/// The secret inside a form token: a masked token (twice the secret's length) is unmasked, a
/// bare secret is taken as it is; anything else is `None`.
pub fn unmask_csrf_token(token: &str) -> Option<String> {
    if is_csrf_secret(token) {
        return Some(token.to_owned());
    }
    if token.len() != 2 * CSRF_SECRET_LEN || !token.is_ascii() {
        return None;
    }
    let (mask, masked) = token.split_at(CSRF_SECRET_LEN);
    let n = CSRF_CHARS.len();
    masked
        .bytes()
        .zip(mask.bytes())
        .map(|(c, m)| {
            Some(char::from(
                CSRF_CHARS[(csrf_index(c)? + n - csrf_index(m)?) % n],
            ))
        })
        .collect()
}

/// `csrf`: `csrf_token`, the request's CSRF secret masked afresh (templates write the form field with the `{{csrf_input}}` helper).
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
        if let Some(secret) = &req.csrf_secret {
            m.insert("csrf_token".into(), Value::String(mask_csrf_secret(secret)));
        }
        ready(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_tokens_differ_and_unmask_to_the_secret() {
        let secret = new_csrf_secret();
        assert!(is_csrf_secret(&secret));
        let (a, b) = (mask_csrf_secret(&secret), mask_csrf_secret(&secret));
        assert_ne!(a, b, "a fresh mask per page");
        assert_eq!(unmask_csrf_token(&a).as_deref(), Some(secret.as_str()));
        assert_eq!(unmask_csrf_token(&b).as_deref(), Some(secret.as_str()));
        assert_eq!(unmask_csrf_token(&secret).as_deref(), Some(secret.as_str()));
        for bad in [
            "",
            "short",
            &"é".repeat(32),
            &format!("{a}x"),
            &"-".repeat(64),
        ] {
            assert_eq!(unmask_csrf_token(bad), None, "{bad:?}");
        }
    }
}
