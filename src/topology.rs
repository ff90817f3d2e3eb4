//! The only place that assembles a node: actors, pools, the HTTP server, and the shutdown order.
//!
//! Start order: metrics and templates, then the actors (on their own arbiter, each under an
//! actix `Supervisor`), then the HTTP server holding their addresses. Shutdown is the reverse:
//! the HTTP server stops accepting and finishes in-flight requests within
//! `server.shutdown_timeout`, then the actors stop, then the actor arbiter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::middleware::from_fn;
use actix_web::{web, HttpRequest, HttpServer};
use serde_json::{Map, Value};

use crate::app::{App, RouteFn, Running, StartError};
use crate::config::Config;
use crate::http::health::{self, AlwaysReady, Readiness};
use crate::http::metrics::{self, Metrics};
use crate::http::render::{self, ContextFuture, ContextSource, Renderer};
use crate::http::templates::Templates;
use crate::http::Error;

/// The variables every page gets before context processors exist: `static_url`.
struct BaseContext {
    static_url: String,
}

impl ContextSource for BaseContext {
    fn context(&self, _req: &HttpRequest, _template: &str) -> ContextFuture {
        let mut map = Map::new();
        map.insert("static_url".into(), Value::String(self.static_url.clone()));
        Box::pin(async move { map })
    }
}

/// A running node's parts, in the order they stop.
pub(crate) struct Topology {
    config: Arc<Config>,
    server: ServerHandle,
    server_task: Mutex<Option<actix_rt::task::JoinHandle<std::io::Result<()>>>>,
    actor_arbiter: actix_rt::Arbiter,
}

impl Topology {
    pub(crate) async fn start(app: App) -> Result<Running, StartError> {
        let App { config, routes } = app;
        let config = Arc::new(config);

        let metrics = web::Data::new(Metrics::new());
        let templates = Arc::new(Templates::load(
            &config.server.templates,
            config.server.debug,
        )?);
        let renderer = web::Data::new(Renderer {
            templates,
            debug: config.server.debug,
            source: Arc::new(BaseContext {
                static_url: config.server.static_url.clone(),
            }),
        });

        // Actors live on their own arbiter (thread), never on an HTTP worker.
        let actor_arbiter = actix_rt::Arbiter::new();

        let mut readiness = Readiness::default();
        readiness.add(AlwaysReady {
            name: "sessions".into(),
            detail: format!("engine {}", config.sessions.engine.as_str()),
        });
        readiness.add(AlwaysReady {
            name: "broker".into(),
            detail: format!("broker {}", config.tasks.broker.as_str()),
        });
        let readiness = web::Data::new(readiness);

        let factory_config = config.clone();
        let server = HttpServer::new(move || {
            http_app(
                &factory_config,
                &routes,
                metrics.clone(),
                renderer.clone(),
                readiness.clone(),
            )
        })
        .workers(config.actors.http_workers as usize)
        .shutdown_timeout(config.server.shutdown_timeout)
        .bind(&config.server.bind)
        .map_err(|source| StartError::Bind {
            addr: config.server.bind.clone(),
            source,
        })?;
        let addrs = server.addrs();
        let server = server.run();
        let handle = server.handle();
        let server_task = actix_rt::spawn(server);

        Ok(Running {
            addrs,
            topology: Topology {
                config,
                server: handle,
                server_task: Mutex::new(Some(server_task)),
                actor_arbiter,
            },
        })
    }

    /// Stops the HTTP server gracefully (used by embedders and tests; signals do it themselves).
    pub(crate) async fn stop_http(&self) {
        self.server.stop(true).await;
        self.wait_http().await;
    }

    /// Waits until the HTTP server has stopped.
    pub(crate) async fn wait_http(&self) {
        let task = self
            .server_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("http server failed: {e}"),
                Err(e) => tracing::error!("http server task failed: {e}"),
            }
        }
    }

    /// Stops the actors in order, after the HTTP server has stopped.
    pub(crate) async fn shutdown(self) {
        tracing::info!(node = %self.config.server.node_id_or_default(), "stopping actors");
        self.actor_arbiter.stop();
        // Give the arbiter's actors their `stopping` hooks.
        tokio::time::sleep(Duration::from_millis(10)).await;
        tracing::info!("stopped");
    }
}

fn http_app(
    config: &Config,
    routes: &[RouteFn],
    metrics: web::Data<Metrics>,
    renderer: web::Data<Renderer>,
    readiness: web::Data<Readiness>,
) -> actix_web::App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let mut app = actix_web::App::new()
        .app_data(metrics)
        .app_data(renderer)
        .app_data(readiness)
        .wrap(from_fn(render::render_middleware))
        .wrap(from_fn(metrics::metrics_middleware))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics_handler));
    for f in routes {
        app = app.configure(|cfg| f(cfg));
    }
    if config.server.debug {
        let mount = config.server.static_url.trim_end_matches('/');
        let mount = if mount.is_empty() { "/" } else { mount };
        app = app.service(actix_files::Files::new(mount, &config.server.static_dir));
    }
    app.default_service(web::to(not_found))
}

async fn not_found() -> Result<&'static str, Error> {
    Err(Error::NotFound)
}
