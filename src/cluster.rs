//! A node's part in the cluster (docs/cluster.md): its heartbeat on
//! `<prefix>.events.node-heartbeat` every `cluster.heartbeat_interval`, and on worker and beat
//! nodes the `/metrics` endpoint on `cluster.metrics_bind` ([`Presence`]); and the table
//! `cluster status` prints. The heartbeat itself and the view of the cluster live in
//! `switchyard_actors::cluster`.

use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, HttpResponse, HttpServer};
use futures_util::future::BoxFuture;
pub use switchyard_actors::cluster::{Heartbeat, HeartbeatHandle, InFlight, NodeStatus, Role};

use crate::config::Config;
use crate::error::StartError;
use crate::http::metrics::Metrics;

/// `cluster.heartbeat_interval` as a duration.
pub(crate) fn interval(config: &Config) -> Duration {
    Duration::from_secs(config.cluster.heartbeat_interval.clamp(1, 3600))
}

/// This node's heartbeat (id `server.node_id`, or hostname-pid), not yet started.
pub(crate) fn heartbeat(config: &Config, client: async_nats::Client, role: Role) -> Heartbeat {
    let node = config.server.node_id_or_default();
    Heartbeat::new(client, &config.nats.prefix, interval(config), node, role)
}

/// Brings gauges up to date before a scrape (queue depths, in-flight tasks).
pub(crate) type Refresh = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// What a worker or beat node runs beside its work: its heartbeat, and its `/metrics` server
/// unless `cluster.metrics_bind = ""`. Both stop when this is dropped (the server at once,
/// without waiting: it only ever answers scrapes).
pub(crate) struct Presence {
    _heartbeat: HeartbeatHandle,
    metrics: Option<ServerHandle>,
}

impl Presence {
    /// Serves `metrics` on `cluster.metrics_bind` (printing `metrics on http://IP:PORT` to
    /// stderr), then starts `heartbeat` carrying that URL. Needs a running actix system.
    pub(crate) fn start(
        config: &Config,
        heartbeat: Heartbeat,
        metrics: web::Data<Metrics>,
        refresh: Refresh,
    ) -> Result<Self, StartError> {
        let bind = &config.cluster.metrics_bind;
        let (url, server) = if bind.is_empty() {
            (None, None)
        } else {
            let server = HttpServer::new(move || {
                let (metrics, refresh) = (metrics.clone(), refresh.clone());
                actix_web::App::new().route(
                    "/metrics",
                    web::get().to(move || scrape(metrics.clone(), refresh.clone())),
                )
            })
            .workers(1)
            .disable_signals()
            .shutdown_timeout(1)
            .bind(bind)
            .map_err(|source| StartError::Bind {
                addr: bind.clone(),
                source,
            })?;
            let Some(addr) = server.addrs().first().copied() else {
                let source = std::io::Error::other("bound to no address");
                return Err(StartError::Bind {
                    addr: bind.clone(),
                    source,
                });
            };
            let server = server.run();
            let handle = server.handle();
            actix_rt::spawn(server);
            eprintln!("metrics on http://{addr}");
            (Some(format!("http://{addr}/metrics")), Some(handle))
        };
        Ok(Self {
            _heartbeat: heartbeat.metrics(url).start(),
            metrics: server,
        })
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        if let Some(server) = self.metrics.take() {
            // Stopping is a message to the server; the returned future need not be awaited.
            drop(server.stop(false));
        }
    }
}

/// `GET /metrics` of a worker or beat node.
async fn scrape(metrics: web::Data<Metrics>, refresh: Refresh) -> HttpResponse {
    refresh().await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics.render())
}

/// `cluster status`'s table: a header and one row per node, columns padded to their widest
/// cell.
pub(crate) fn table(nodes: &[NodeStatus]) -> String {
    let header = [
        "NODE",
        "ROLE",
        "QUEUES",
        "IN_FLIGHT",
        "VERSION",
        "LAST_SEEN",
    ]
    .map(String::from);
    let rows: Vec<[String; 6]> = nodes
        .iter()
        .map(|n| {
            [
                n.node.clone(),
                n.role.as_str().to_owned(),
                if n.queues.is_empty() {
                    "-".to_owned()
                } else {
                    n.queues.join(",")
                },
                n.in_flight.to_string(),
                n.version.clone(),
                n.last_seen
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_spec_columns_and_one_row_per_node() {
        let node = |id: &str, role, queues: &[&str]| NodeStatus {
            node: id.into(),
            role,
            queues: queues.iter().map(|q| q.to_string()).collect(),
            in_flight: 3,
            version: "0.1.0".into(),
            last_seen: "2026-12-01T01:02:03Z".parse().expect("time"),
            metrics: None,
        };
        let text = table(&[
            node("web-1", Role::Serve, &[]),
            node("worker-long-name", Role::Worker, &["default", "emails"]),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let columns = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            columns(lines[0]),
            [
                "NODE",
                "ROLE",
                "QUEUES",
                "IN_FLIGHT",
                "VERSION",
                "LAST_SEEN"
            ]
        );
        assert_eq!(
            columns(lines[2]),
            [
                "worker-long-name",
                "worker",
                "default,emails",
                "3",
                "0.1.0",
                "2026-12-01T01:02:03Z"
            ]
        );
        assert_eq!(columns(lines[1])[2], "-");
        // Columns line up.
        assert_eq!(lines[0].find("ROLE"), lines[1].find("serve"));
    }
}
