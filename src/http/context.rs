//! Context processors for rendering: the registry in `context.processors` order, the request
//! snapshot they get, and the merge (later processors win; the handler's own context wins over
//! all, as in Django).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpMessage, HttpRequest};
use futures_util::future::join_all;
use serde_json::{Map, Value};
use switchyard_actors::context::{ContextProcessor, RequestSnapshot, UserInfo};

use super::auth::current_user;
use super::render::{ContextFuture, ContextSource};
use super::session::Session;

/// The processors of a node, in merge order.
pub struct Processors {
    list: Vec<Arc<dyn ContextProcessor>>,
    timeout: Duration,
}

/// A name in `context.processors` that no built-in or application processor has.
#[derive(Debug, thiserror::Error)]
#[error("context.processors: unknown processor `{0}` (built-in: debug, request, auth, messages, csrf, static; or one the application registers)")]
pub struct UnknownProcessor(pub String);

impl Processors {
    /// Orders `available` by `names` (`context.processors`).
    pub fn new(
        names: &[String],
        mut available: HashMap<String, Arc<dyn ContextProcessor>>,
        timeout: Duration,
    ) -> Result<Self, UnknownProcessor> {
        let list = names
            .iter()
            .map(|n| {
                available
                    .remove(n)
                    .ok_or_else(|| UnknownProcessor(n.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { list, timeout })
    }

    /// The processors in merge order.
    pub fn list(&self) -> &[Arc<dyn ContextProcessor>] {
        &self.list
    }
}

/// An owned snapshot of `req` for processors.
pub fn snapshot(req: &HttpRequest) -> RequestSnapshot {
    RequestSnapshot {
        method: req.method().as_str().to_owned(),
        path: req.path().to_owned(),
        query: req.query_string().to_owned(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        user: current_user(req).map(|u| UserInfo {
            username: u.username,
            permissions: u.permissions,
        }),
        session: req.extensions().get::<Session>().map(|s| s.0.clone()),
        peer_ip: req.peer_addr().map(|a| a.ip()),
    }
}

impl ContextSource for Processors {
    fn context(&self, req: &HttpRequest, _template: &str) -> ContextFuture {
        let snap = snapshot(req);
        let timeout = self.timeout;
        let runs: Vec<_> = self
            .list
            .iter()
            .map(|p| {
                let name = p.name().to_owned();
                let fut = p.process(snap.clone());
                async move {
                    match tokio::time::timeout(timeout, fut).await {
                        Ok(Ok(map)) => Some(map),
                        Ok(Err(e)) => {
                            tracing::warn!(processor = %name, "context processor failed: {e}");
                            None
                        }
                        Err(_) => {
                            tracing::warn!(processor = %name, ?timeout, "context processor timed out");
                            None
                        }
                    }
                }
            })
            .collect();
        Box::pin(async move {
            let mut out = Map::new();
            for map in join_all(runs).await.into_iter().flatten() {
                out.extend(map);
            }
            out
        })
    }
}

/// Helper for application processors that need no I/O: wraps a closure.
pub struct FnProcessor<F> {
    name: String,
    provides: &'static [&'static str],
    f: F,
}

impl<F> FnProcessor<F>
where
    F: Fn(&RequestSnapshot) -> Map<String, Value> + Send + Sync + 'static,
{
    /// A processor named `name` providing `provides`, computed by `f`.
    pub fn new(name: impl Into<String>, provides: &'static [&'static str], f: F) -> Self {
        Self {
            name: name.into(),
            provides,
            f,
        }
    }
}

impl<F> ContextProcessor for FnProcessor<F>
where
    F: Fn(&RequestSnapshot) -> Map<String, Value> + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn provides(&self) -> &[&'static str] {
        self.provides
    }
    fn process(
        &self,
        req: RequestSnapshot,
    ) -> futures_util::future::BoxFuture<'static, Result<Map<String, Value>, String>> {
        let map = (self.f)(&req);
        Box::pin(async move { Ok(map) })
    }
}
