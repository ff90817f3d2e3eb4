//! Context processors for rendering: the registry in `context.processors` order, the request
//! snapshot they get, and the merge (later processors win; the handler's own context wins over
//! all, as in Django).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpMessage, HttpRequest};
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use switchyard_actors::context::{
    ContextProcessor, ContextWorkers, ProcessError, ProcessResult, ProcessorError, RequestSnapshot,
    UserInfo,
};

use super::auth::current_user;
use super::session::Session;
use super::template_vars::Needs;

/// The processors of a node, in merge order, and the actors that evaluate them.
pub struct Processors {
    list: Vec<Arc<dyn ContextProcessor>>,
    timeout: Duration,
    workers: Option<ContextWorkers>,
}

/// Processor results already computed for this request (a processor runs at most once per
/// request, however many templates it renders).
/// Shared by the renders of one request (request extensions are not `Send`, so `Rc` is fine).
#[derive(Default, Clone)]
struct ContextMemo(Rc<RefCell<HashMap<String, Map<String, Value>>>>);

/// The merged variables and the processors that failed.
#[derive(Debug, Default)]
pub struct Evaluated {
    pub vars: Map<String, Value>,
    pub failures: Vec<ProcessorError>,
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
        Ok(Self {
            list,
            timeout,
            workers: None,
        })
    }

    /// Evaluates through these actors instead of inline.
    pub fn with_workers(mut self, workers: ContextWorkers) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Runs the processors `needs` asks for (each at most once per request) and merges their
    /// variables in `context.processors` order, later ones winning.
    pub async fn evaluate(&self, req: &HttpRequest, needs: &Needs) -> Evaluated {
        let memo = req
            .extensions_mut()
            .get_or_insert_with(ContextMemo::default)
            .clone();
        let wanted: Vec<_> = self
            .list
            .iter()
            .filter(|p| needs.wants_any(p.provides()))
            .collect();
        let to_run: Vec<_> = {
            let done = memo.0.borrow();
            wanted
                .iter()
                .filter(|p| !done.contains_key(p.name()))
                .map(|p| Arc::clone(p))
                .collect()
        };
        let mut failures = Vec::new();
        if !to_run.is_empty() {
            let outcome = ContextWorkers::evaluate(
                self.workers.as_ref(),
                &to_run,
                Arc::new(snapshot(req)),
                self.timeout,
            )
            .await;
            memo.0.borrow_mut().extend(outcome.values);
            failures = outcome.failures;
        }
        let done = memo.0.borrow();
        let mut vars = Map::new();
        for p in &wanted {
            if let Some(v) = done.get(p.name()) {
                vars.extend(v.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        Evaluated { vars, failures }
    }

    /// The processors in merge order.
    pub fn list(&self) -> &[Arc<dyn ContextProcessor>] {
        &self.list
    }
}

/// An owned snapshot of `req` for processors.
pub fn snapshot(req: &HttpRequest) -> RequestSnapshot {
    let client = super::client::client(req);
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
        peer_ip: client.ip,
        local: client.local,
        csrf_secret: req
            .extensions()
            .get::<super::csrf::CsrfSecret>()
            .map(|s| s.value.clone()),
        sql_log: req
            .extensions()
            .get::<crate::db::QueryLog>()
            .map(|l| l.shared()),
    }
}

/// A context processor made of a function that needs no I/O (see [`crate::context::processor`]).
pub struct FnProcessor<F> {
    name: String,
    provides: &'static [&'static str],
    f: F,
}

impl<F> FnProcessor<F>
where
    F: Fn(&RequestSnapshot) -> Value + Send + Sync + 'static,
{
    /// A processor named `name` providing `provides`, computed by `f`, which returns a JSON
    /// object of those variables.
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
    F: Fn(&RequestSnapshot) -> Value + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn provides(&self) -> &[&'static str] {
        self.provides
    }
    fn process(&self, req: Arc<RequestSnapshot>) -> BoxFuture<'static, ProcessResult> {
        let result = match (self.f)(&req) {
            Value::Object(map) => Ok(map),
            other => Err(ProcessError::msg(format!(
                "returned {other}, not a JSON object of variables"
            ))),
        };
        Box::pin(std::future::ready(result))
    }
}
