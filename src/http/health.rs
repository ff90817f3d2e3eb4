//! `/healthz` (the process answers) and `/readyz` (every service a request needs answers).

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use futures_util::future::{join_all, BoxFuture};
use serde_json::{json, Map, Value};

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One readiness check: a name (`sessions`, `broker`, `database`) and a probe.
pub trait ReadinessCheck: Send + Sync + 'static {
    /// The check's name in the `/readyz` body.
    fn name(&self) -> &str;
    /// `Ok(detail)` when the service answers, `Err(reason)` when it does not.
    fn check(&self) -> BoxFuture<'static, Result<String, String>>;
}

/// A check that always passes, for in-process parts (the memory engine and broker).
pub struct AlwaysReady {
    pub name: String,
    pub detail: String,
}

impl ReadinessCheck for AlwaysReady {
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self) -> BoxFuture<'static, Result<String, String>> {
        let detail = self.detail.clone();
        Box::pin(async move { Ok(detail) })
    }
}

/// Every readiness check of this node.
#[derive(Default, Clone)]
pub struct Readiness {
    checks: Vec<Arc<dyn ReadinessCheck>>,
}

impl Readiness {
    /// Adds a check.
    pub fn add(&mut self, check: impl ReadinessCheck) {
        self.checks.push(Arc::new(check));
    }

    /// Runs every check concurrently: whether all passed, and the JSON body.
    pub async fn run(&self) -> (bool, Value) {
        let results = join_all(self.checks.iter().map(|c| {
            let fut = c.check();
            async move {
                let r = match tokio::time::timeout(CHECK_TIMEOUT, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                };
                (c.name().to_owned(), r)
            }
        }))
        .await;
        let mut all_ok = true;
        let mut checks = Map::new();
        for (name, r) in results {
            let entry = match r {
                Ok(detail) => json!({"ok": true, "detail": detail}),
                Err(error) => {
                    all_ok = false;
                    json!({"ok": false, "error": error})
                }
            };
            checks.insert(name, entry);
        }
        let status = if all_ok { "ok" } else { "unavailable" };
        (all_ok, json!({"status": status, "checks": checks}))
    }
}

/// `GET /healthz`.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body("ok")
}

/// `GET /readyz`.
pub async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let (ok, body) = readiness.run().await;
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
