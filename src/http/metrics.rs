//! Prometheus metrics: the registry, the names SPEC.md fixes, and the request middleware.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The route label of requests no route matched.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Every metric Switchyard exports.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    sessions_saved: IntCounterVec,
    sessions_evicted: IntCounterVec,
    sessions_rejected: IntCounterVec,
    tasks: IntCounterVec,
    queue_depth: IntGaugeVec,
    consumer_lag: IntGaugeVec,
    in_flight: IntGauge,
    /// Counters whose owner keeps the count (the memory engine's evictions, the `cached_db`
    /// messages refused), brought up to it at every scrape.
    read_at_scrape: std::sync::Mutex<Vec<(IntCounter, ScrapeFn)>>,
}

/// Reads a total kept elsewhere.
type ScrapeFn = Box<dyn Fn() -> u64 + Send + Sync>;

impl Metrics {
    /// Creates the registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new("switchyard_http_requests_total", "HTTP requests answered."),
            &["route", "method", "status"],
        )
        .expect("metric definition is valid");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_http_request_duration_seconds",
                "Time from request to response head.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["route", "method"],
        )
        .expect("metric definition is valid");
        let sessions_saved = IntCounterVec::new(
            Opts::new("switchyard_sessions_saved_total", "Sessions written."),
            &["engine"],
        )
        .expect("metric definition is valid");
        let sessions_evicted = IntCounterVec::new(
            Opts::new(
                "switchyard_sessions_evicted_total",
                "Sessions the memory engine evicted at its cap (sessions.memory_max_sessions).",
            ),
            &["engine"],
        )
        .expect("metric definition is valid");
        let sessions_rejected = IntCounterVec::new(
            Opts::new(
                "switchyard_sessions_invalidations_rejected_total",
                "cached_db messages between nodes ignored: not authenticated by secret_key \
                 (or a replayed heartbeat), by kind (invalidation, ack, heartbeat).",
            ),
            &["kind"],
        )
        .expect("metric definition is valid");
        let tasks = IntCounterVec::new(
            Opts::new("switchyard_tasks_total", "Task state changes."),
            &["task", "state"],
        )
        .expect("metric definition is valid");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "switchyard_queue_depth",
                "Tasks of a queue in the broker: waiting, delayed or running (worker nodes).",
            ),
            &["queue"],
        )
        .expect("metric definition is valid");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "switchyard_consumer_lag",
                "Tasks of a queue its consumer has not delivered to any worker yet.",
            ),
            &["queue"],
        )
        .expect("metric definition is valid");
        let in_flight = IntGauge::new("switchyard_tasks_in_flight", "Tasks running on this node.")
            .expect("metric definition is valid");
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(sessions_saved.clone()),
            Box::new(sessions_evicted.clone()),
            Box::new(sessions_rejected.clone()),
            Box::new(tasks.clone()),
            Box::new(queue_depth.clone()),
            Box::new(consumer_lag.clone()),
            Box::new(in_flight.clone()),
        ] {
            registry
                .register(c)
                .expect("each metric is registered once");
        }
        Self {
            registry,
            http_requests,
            http_duration,
            sessions_saved,
            sessions_evicted,
            sessions_rejected,
            tasks,
            queue_depth,
            consumer_lag,
            in_flight,
            read_at_scrape: Default::default(),
        }
    }

    fn read_at_scrape(&self, counter: IntCounter, total: impl Fn() -> u64 + Send + Sync + 'static) {
        self.read_at_scrape
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((counter, Box::new(total)));
    }

    /// Counts the memory engine's evictions, read from `total` at every scrape.
    pub(crate) fn count_evictions(&self, total: impl Fn() -> u64 + Send + Sync + 'static) {
        self.read_at_scrape(self.sessions_evicted.with_label_values(&["memory"]), total);
    }

    /// Counts the `cached_db` messages of `kind` refused, read from `total` at every scrape.
    pub(crate) fn count_rejected(
        &self,
        kind: &str,
        total: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.read_at_scrape(self.sessions_rejected.with_label_values(&[kind]), total);
    }

    /// Counts one session written by `engine`.
    pub fn session_saved(&self, engine: &str) {
        self.sessions_saved.with_label_values(&[engine]).inc();
    }

    /// The counter of sessions written by `engine`, for a caller that counts many (a label
    /// lookup hashes and locks; the session middleware looks it up once).
    pub(crate) fn sessions_saved_counter(&self, engine: &str) -> prometheus::IntCounter {
        self.sessions_saved.with_label_values(&[engine])
    }

    /// Exports `task`'s counters at 0 for every state a worker reports (PENDING: received), so
    /// the series exist before the first task runs.
    pub fn task_registered(&self, task: &str) {
        for state in [
            "PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED",
        ] {
            self.tasks.with_label_values(&[task, state]);
        }
    }

    /// Counts one task reaching `state`.
    pub fn task_state(&self, task: &str, state: &str) {
        self.tasks.with_label_values(&[task, state]).inc();
    }

    /// Sets a queue's backlog: `waiting` not yet delivered (the consumer's lag), `unacked`
    /// delivered and not acknowledged (running or delayed); the depth is both.
    pub fn queue_backlog(&self, queue: &str, waiting: u64, unacked: u64) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.consumer_lag
            .with_label_values(&[queue])
            .set(gauge(waiting));
        self.queue_depth
            .with_label_values(&[queue])
            .set(gauge(waiting.saturating_add(unacked)));
    }

    /// Sets the tasks running on this node.
    pub fn tasks_in_flight(&self, n: u64) {
        self.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        for (c, total) in self
            .read_at_scrape
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            c.inc_by(total().saturating_sub(c.get()));
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!("cannot encode metrics: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// An event sink counting every task event of a node's workers in `switchyard_tasks_total`.
pub(crate) fn task_events(metrics: web::Data<Metrics>) -> switchyard_actors::tasks::EventSink {
    std::sync::Arc::new(move |e| metrics.task_state(&e.task, e.state.as_str()))
}

/// Counts and times every request under its route pattern.
pub async fn metrics_middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let method = method_label(req.method());
    let res = next.call(req).await?;
    if let Some(m) = metrics {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
        let status = res.status();
        m.http_requests
            .with_label_values(&[route.as_str(), method, status.as_str()])
            .inc();
        m.http_duration
            .with_label_values(&[route.as_str(), method])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}

/// A method as a metrics label: the standard ones by name, anything else `OTHER`, so made-up
/// methods cannot add series.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::PATCH, "PATCH"),
        (Method::DELETE, "DELETE"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN
        .iter()
        .find(|(m, _)| m == method)
        .map_or("OTHER", |(_, label)| label)
}

/// `GET /metrics`.
pub async fn metrics_handler(metrics: web::Data<Metrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics.render())
}
