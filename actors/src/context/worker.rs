//! The context-processor actors: each evaluates the processors a render needs, concurrently,
//! each under the timeout; a failing or slow one contributes nothing and is reported.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::join_all;
use serde_json::{Map, Value};

use super::{ContextProcessor, ProcessorError, RequestSnapshot};

/// Run `processors` for one request.
#[derive(Message)]
#[rtype(result = "ContextOutcome")]
pub struct EvaluateContext {
    pub snapshot: RequestSnapshot,
    /// In merge order.
    pub processors: Vec<Arc<dyn ContextProcessor>>,
    /// Each processor's time limit (`context.timeout_ms`).
    pub timeout: Duration,
}

/// What the processors produced, in the order they were given.
#[derive(Debug, Default)]
pub struct ContextOutcome {
    /// Processor name → its variables (only those that succeeded).
    pub values: Vec<(String, Map<String, Value>)>,
    /// Those that failed or timed out.
    pub failures: Vec<ProcessorError>,
}

/// One context-processor actor.
#[derive(Default)]
pub struct ContextWorker;

impl Actor for ContextWorker {
    type Context = Context<Self>;
}

impl Supervised for ContextWorker {}

impl Handler<EvaluateContext> for ContextWorker {
    type Result = ResponseFuture<ContextOutcome>;

    fn handle(&mut self, msg: EvaluateContext, _ctx: &mut Context<Self>) -> Self::Result {
        Box::pin(evaluate(msg))
    }
}

/// Evaluates `msg`'s processors concurrently (also used inline when no actor is involved).
pub async fn evaluate(msg: EvaluateContext) -> ContextOutcome {
    let EvaluateContext {
        snapshot,
        processors,
        timeout,
    } = msg;
    let runs = processors.iter().map(|p| {
        let name = p.name().to_owned();
        let fut = p.process(snapshot.clone());
        async move {
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(map)) => Ok(map),
                Ok(Err(message)) => Err(message),
                Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
            };
            (name, r)
        }
    });
    let mut out = ContextOutcome::default();
    for (name, r) in join_all(runs).await {
        match r {
            Ok(map) => out.values.push((name, map)),
            Err(message) => {
                tracing::warn!(processor = %name, "context processor failed: {message}");
                out.failures.push(ProcessorError {
                    processor: name,
                    message,
                });
            }
        }
    }
    out
}

/// The context workers of a node, used round-robin.
#[derive(Clone)]
pub struct ContextWorkers {
    workers: Arc<[Addr<ContextWorker>]>,
    next: Arc<AtomicUsize>,
}

impl ContextWorkers {
    /// Starts `count` supervised workers on `arbiter`.
    pub fn start(count: usize, arbiter: &ArbiterHandle) -> Self {
        let workers: Vec<_> = (0..count.max(1))
            .map(|_| Supervisor::start_in_arbiter(arbiter, |_| ContextWorker))
            .collect();
        Self {
            workers: workers.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Evaluates through the next worker.
    pub async fn evaluate(&self, msg: EvaluateContext) -> Result<ContextOutcome, MailboxError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.workers[i].send(msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;
    use serde_json::json;

    struct Fixed(&'static str, Result<Value, String>, Duration);

    impl ContextProcessor for Fixed {
        fn name(&self) -> &str {
            self.0
        }
        fn provides(&self) -> &[&'static str] {
            &["v"]
        }
        fn process(
            &self,
            _req: RequestSnapshot,
        ) -> BoxFuture<'static, Result<Map<String, Value>, String>> {
            let (r, d) = (self.1.clone(), self.2);
            Box::pin(async move {
                tokio::time::sleep(d).await;
                r.map(|v| Map::from_iter([("v".to_owned(), v)]))
            })
        }
    }

    fn snapshot() -> RequestSnapshot {
        RequestSnapshot {
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![],
            user: None,
            session: None,
            peer_ip: None,
        }
    }

    #[actix_rt::test]
    async fn failing_and_slow_processors_contribute_nothing() {
        let arbiter = Arbiter::new();
        let workers = ContextWorkers::start(2, &arbiter.handle());
        let out = workers
            .evaluate(EvaluateContext {
                snapshot: snapshot(),
                processors: vec![
                    Arc::new(Fixed("ok", Ok(json!(1)), Duration::ZERO)),
                    Arc::new(Fixed("bad", Err("boom".into()), Duration::ZERO)),
                    Arc::new(Fixed("slow", Ok(json!(2)), Duration::from_secs(5))),
                ],
                timeout: Duration::from_millis(50),
            })
            .await
            .expect("answered");
        assert_eq!(out.values.len(), 1);
        assert_eq!(out.values[0].0, "ok");
        let failed: Vec<_> = out.failures.iter().map(|f| f.processor.as_str()).collect();
        assert_eq!(failed, ["bad", "slow"]);
        assert!(out.failures[1].message.contains("timed out"));
        arbiter.stop();
    }
}
