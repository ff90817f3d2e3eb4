//! The context-processor actors: each evaluates the processors a render needs, concurrently,
//! each under the timeout; a failing or slow one contributes nothing and is reported.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::{join_all, BoxFuture};
use futures_util::FutureExt;
use serde_json::{Map, Value};

pub use super::ProcessResult as ProcessorResult;
use super::{ContextProcessor, ProcessError, ProcessorError, RequestSnapshot};

/// A processor's computation for one request.
pub type ProcessorFuture = BoxFuture<'static, ProcessorResult>;

/// Drive processors that had to wait (I/O), each under the timeout.
#[derive(Message)]
#[rtype(result = "ContextOutcome")]
pub struct EvaluateContext {
    /// Processor name and its started computation, in merge order.
    pub runs: Vec<(String, ProcessorFuture)>,
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

impl ContextOutcome {
    fn push(&mut self, name: String, r: ProcessorResult) {
        match r {
            Ok(map) => self.values.push((name, map)),
            Err(e) => {
                let message = e.chain();
                tracing::warn!(processor = %name, "context processor failed: {message}");
                self.failures.push(ProcessorError {
                    processor: name,
                    message,
                });
            }
        }
    }
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
        Box::pin(drive(msg))
    }
}

/// Drives every run concurrently, each under the timeout.
async fn drive(msg: EvaluateContext) -> ContextOutcome {
    let timeout = msg.timeout;
    let runs = msg.runs.into_iter().map(|(name, fut)| async move {
        let r = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ProcessError::msg(format!(
                "timed out after {} ms",
                timeout.as_millis()
            ))),
        };
        (name, r)
    });
    let mut out = ContextOutcome::default();
    for (name, r) in join_all(runs).await {
        out.push(name, r);
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

    /// Evaluates `processors` for `snapshot`, in order. Each processor is started and polled
    /// once here: one that is ready at once (a pure function of the request) costs no
    /// message; those that must wait are handed to the next context actor, which drives them
    /// concurrently, each under `timeout`.
    pub async fn evaluate(
        workers: Option<&ContextWorkers>,
        processors: &[Arc<dyn ContextProcessor>],
        snapshot: Arc<RequestSnapshot>,
        timeout: Duration,
    ) -> ContextOutcome {
        let mut ready: Vec<Option<(String, ProcessorResult)>> = Vec::new();
        let mut waiting = Vec::new();
        for p in processors {
            let name = p.name().to_owned();
            let mut fut = p.process(snapshot.clone());
            match (&mut fut).now_or_never() {
                Some(r) => ready.push(Some((name, r))),
                None => {
                    ready.push(None);
                    waiting.push((name, fut));
                }
            }
        }
        let mut driven = if waiting.is_empty() {
            ContextOutcome::default()
        } else {
            let names: Vec<String> = waiting.iter().map(|(n, _)| n.clone()).collect();
            let msg = EvaluateContext {
                runs: waiting,
                timeout,
            };
            match workers {
                None => drive(msg).await,
                Some(w) => {
                    let i = w.next.fetch_add(1, Ordering::Relaxed) % w.workers.len();
                    w.workers[i].send(msg).await.unwrap_or_else(|e| {
                        let mut out = ContextOutcome::default();
                        for n in names {
                            out.push(
                                n,
                                Err(ProcessError::with_source("context workers unavailable", e)),
                            );
                        }
                        out
                    })
                }
            }
        };
        // Merge back in processor order.
        let mut out = ContextOutcome::default();
        let mut driven_values: std::collections::HashMap<String, Map<String, Value>> =
            driven.values.drain(..).collect();
        for (slot, p) in ready.into_iter().zip(processors) {
            match slot {
                Some((name, r)) => out.push(name, r),
                None => {
                    if let Some(v) = driven_values.remove(p.name()) {
                        out.values.push((p.name().to_owned(), v));
                    }
                }
            }
        }
        out.failures.extend(driven.failures);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;
    use serde_json::json;

    struct Fixed(&'static str, Result<Value, &'static str>, Duration);

    impl ContextProcessor for Fixed {
        fn name(&self) -> &str {
            self.0
        }
        fn provides(&self) -> &[&'static str] {
            &["v"]
        }
        fn process(&self, _req: Arc<RequestSnapshot>) -> BoxFuture<'static, ProcessorResult> {
            let (r, d) = (self.1.clone(), self.2);
            Box::pin(async move {
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                r.map(|v| Map::from_iter([("v".to_owned(), v)]))
                    .map_err(ProcessError::msg)
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
            local: false,
            csrf_secret: None,
            sql_log: None,
        }
    }

    #[actix_rt::test]
    async fn failing_and_slow_processors_contribute_nothing() {
        let arbiter = Arbiter::new();
        let workers = ContextWorkers::start(2, &arbiter.handle());
        let processors: Vec<Arc<dyn ContextProcessor>> = vec![
            Arc::new(Fixed("ok", Ok(json!(1)), Duration::ZERO)),
            Arc::new(Fixed("bad", Err("boom"), Duration::ZERO)),
            Arc::new(Fixed("slow", Ok(json!(2)), Duration::from_secs(5))),
            Arc::new(Fixed("io", Ok(json!(3)), Duration::from_millis(5))),
        ];
        let out = ContextWorkers::evaluate(
            Some(&workers),
            &processors,
            Arc::new(snapshot()),
            Duration::from_millis(50),
        )
        .await;
        let names: Vec<_> = out.values.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["ok", "io"],
            "in order, the waiting one driven by the actor"
        );
        let failed: Vec<_> = out.failures.iter().map(|f| f.processor.as_str()).collect();
        assert_eq!(failed, ["bad", "slow"]);
        assert!(out.failures[1].message.contains("timed out"));
        arbiter.stop();
    }
}
