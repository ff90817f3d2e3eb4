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
use actix_web::{web, HttpServer};
use rand::RngCore;
use switchyard_actors::context::builtins::{
    AuthProcessor, CsrfProcessor, DebugProcessor, MessagesProcessor, RequestProcessor,
    StaticProcessor,
};
use switchyard_actors::context::ContextProcessor;
use switchyard_actors::session::{CookieSigner, PgPool, SessionShards};

use crate::app::{App, RouteFn, Running, StartError};
use crate::config::{AuthStore, Config};
use crate::engines;
use crate::http::auth::Auth;
use crate::http::context::Processors;
use crate::http::health::{self, AlwaysReady, Readiness};
use crate::http::metrics::{self, Metrics};
use crate::http::render::{self, Renderer};
use crate::http::session::{self as session_mw, Backend, SessionLayer};
use crate::http::templates::Templates;
use crate::http::users::PgUsers;
use crate::http::Error;

/// A running node's parts, in the order they stop.
pub(crate) struct Topology {
    config: Arc<Config>,
    server: ServerHandle,
    server_task: Mutex<Option<actix_rt::task::JoinHandle<std::io::Result<()>>>>,
    actor_arbiter: actix_rt::Arbiter,
}

impl Topology {
    pub(crate) async fn start(app: App) -> Result<Running, StartError> {
        let App {
            config,
            routes,
            processors: app_processors,
            merge,
        } = app;
        let config = Arc::new(config);

        let metrics = web::Data::new(Metrics::new());
        let templates = Arc::new(Templates::load(
            &config.server.templates,
            config.server.debug,
        )?);
        let processors = processors(&config, app_processors)?;
        let renderer = web::Data::new(Renderer {
            templates,
            debug: config.server.debug,
            source: Arc::new(processors),
        });

        // Actors live on their own arbiter (thread), never on an HTTP worker.
        let actor_arbiter = actix_rt::Arbiter::new();

        let mut readiness = Readiness::default();
        let (backend, pool) = session_backend(&config, &actor_arbiter).await?;
        match &backend {
            Backend::Server(shards) => readiness.add(SessionCheck(shards.clone())),
            Backend::Signed(_) => readiness.add(AlwaysReady {
                name: "sessions".into(),
                detail: "engine signed_cookies".into(),
            }),
        }
        let sessions = web::Data::new(SessionLayer::new(&config.sessions, backend));
        let mut auth = Auth::new(&config.auth, config.sessions.on_login, merge);
        if config.auth.store == AuthStore::Postgres {
            let users = postgres_users(&config, pool).await?;
            readiness.add(UsersCheck(users.clone()));
            auth = auth.with_postgres(users);
        }
        let auth = web::Data::new(auth);
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
                sessions.clone(),
                auth.clone(),
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
    sessions: web::Data<SessionLayer>,
    auth: web::Data<Auth>,
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
        .app_data(sessions)
        .app_data(auth)
        .wrap(from_fn(render::render_middleware))
        .wrap(from_fn(session_mw::session_middleware))
        // Renders the error pages the session middleware itself answers with (503, 413).
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

/// The built-in processors plus the application's, in `context.processors` order.
fn processors(
    config: &Config,
    app: std::collections::HashMap<String, Arc<dyn ContextProcessor>>,
) -> Result<Processors, StartError> {
    let mut available: std::collections::HashMap<String, Arc<dyn ContextProcessor>> = [
        Arc::new(DebugProcessor {
            debug: config.server.debug,
            queries: None,
        }) as Arc<dyn ContextProcessor>,
        Arc::new(RequestProcessor),
        Arc::new(AuthProcessor),
        Arc::new(MessagesProcessor),
        Arc::new(CsrfProcessor),
        Arc::new(StaticProcessor {
            static_url: config.server.static_url.clone(),
        }),
    ]
    .into_iter()
    .map(|p| (p.name().to_owned(), p))
    .collect();
    available.extend(app);
    Processors::new(
        &config.context.processors,
        available,
        Duration::from_millis(config.context.timeout_ms),
    )
    .map_err(|e| StartError::Service {
        key: "context.processors".into(),
        message: e.to_string(),
    })
}

/// The signing secret: `server.secret_key`, or in debug without one a random per-process key.
pub(crate) fn secret(config: &Config) -> Vec<u8> {
    if config.server.secret_key.is_empty() {
        let mut key = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        tracing::warn!(
            "server.secret_key is empty: using a random key for this process; signed cookies \
             will not survive a restart (set server.secret_key)"
        );
        key
    } else {
        config.server.secret_key.as_bytes().to_vec()
    }
}

/// The session engine `sessions.engine` names, behind its shard actors, and the Postgres pool
/// it opened (if any) for others to share.
async fn session_backend(
    config: &Config,
    arbiter: &actix_rt::Arbiter,
) -> Result<(Backend, Option<PgPool>), StartError> {
    let Some(opened) = engines::open(config).await? else {
        let fallbacks: Vec<Vec<u8>> = config
            .server
            .secret_key_fallbacks
            .iter()
            .map(|k| k.as_bytes().to_vec())
            .collect();
        return Ok((
            Backend::Signed(CookieSigner::new(&secret(config), &fallbacks)),
            None,
        ));
    };
    if let Some(cached) = &opened.cached {
        cached
            .listen(Some(&arbiter.handle()))
            .await
            .map_err(|e| StartError::Service {
                key: "nats.url".into(),
                message: e.to_string(),
            })?;
    }
    let shards = SessionShards::start(
        config.actors.session_shards as usize,
        opened.store,
        &arbiter.handle(),
    );
    Ok((Backend::Server(shards), opened.postgres))
}

/// The Postgres user store of `auth.store = "postgres"` (sharing the engine's pool if any).
async fn postgres_users(config: &Config, pool: Option<PgPool>) -> Result<Arc<PgUsers>, StartError> {
    let pool = match pool {
        Some(p) => p,
        None => engines::postgres_pool(config).await?,
    };
    let users = PgUsers::open(pool).await.map_err(|e| StartError::Service {
        key: "postgres.url".into(),
        message: e.to_string(),
    })?;
    users.keep_fresh();
    Ok(users)
}

/// `/readyz`'s `database` check with `auth.store = "postgres"`.
struct UsersCheck(Arc<PgUsers>);

impl health::ReadinessCheck for UsersCheck {
    fn name(&self) -> &str {
        "database"
    }
    fn check(&self) -> futures_util::future::BoxFuture<'static, Result<String, String>> {
        let users = self.0.clone();
        Box::pin(async move {
            users
                .refresh()
                .await
                .map(|()| "postgres (auth.store)".to_owned())
                .map_err(|e| e.to_string())
        })
    }
}

/// `/readyz`'s `sessions` check: the engine answers.
struct SessionCheck(SessionShards);

impl health::ReadinessCheck for SessionCheck {
    fn name(&self) -> &str {
        "sessions"
    }
    fn check(&self) -> futures_util::future::BoxFuture<'static, Result<String, String>> {
        let shards = self.0.clone();
        Box::pin(async move {
            shards
                .ping()
                .await
                .map(|()| format!("engine {}", shards.engine()))
                .map_err(|e| e.to_string())
        })
    }
}
