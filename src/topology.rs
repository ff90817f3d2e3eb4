//! The only place that assembles a node: actors, pools, the HTTP server, and the shutdown order.
//!
//! Start order: metrics and templates, then the actors (on their own arbiter, each under an
//! actix `Supervisor`), then the HTTP server holding their addresses. Shutdown is the reverse:
//! the HTTP server stops accepting and finishes in-flight requests within
//! `server.shutdown_timeout`, then the task workers drain (warm: in-flight tasks get
//! `tasks.drain_timeout`; a second SIGTERM/SIGINT makes it cold), then the actors stop, then the
//! actor arbiter.
//!
//! Task workers (with `tasks.broker = "memory"` and not `always_eager`) run on an arbiter of
//! their own, and the task bodies on the worker pool's own runtime.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::middleware::from_fn;
use actix_web::{web, HttpServer};
use switchyard_actors::context::builtins::{
    AuthProcessor, CsrfProcessor, DebugProcessor, MessagesProcessor, RequestProcessor,
    StaticProcessor,
};
use switchyard_actors::context::{ContextProcessor, ContextWorkers};
use switchyard_actors::session::{CachedDbStore, CookieSigner, SessionShards};
use switchyard_actors::tasks::{
    BeatStore, CancellationToken, MemoryBroker, Opening, Registry, Tasks, WorkerPool,
};

use crate::cluster::{self, HeartbeatHandle, Role};
use crate::config::{AuthStore, Broker, Config, Outbox};
use crate::dashboard::{self, Backend as DashBackend, Dashboard, Monitor};
use crate::engines;
use crate::error::StartError;
use crate::http::auth::Auth;
use crate::http::auth::MergeFn;
use crate::http::client;
use crate::http::context::Processors;
use crate::http::csrf::{self, CsrfPolicy};
use crate::http::health::{self, AlwaysReady, Readiness};
use crate::http::metrics::{self, Metrics};
use crate::http::render::{self, Renderer};
use crate::http::session::{self as session_mw, Backend, SessionLayer};
use crate::http::templates::Templates;
use crate::http::users::PgUsers;
use crate::http::Error;

/// The `Content-Security-Policy` of every response: same-origin resources only, no inline
/// script or style, never framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; \
     base-uri 'self'; object-src 'none'";

/// A function adding routes to the HTTP app (called once per HTTP worker).
pub(crate) type RouteFn = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// What an application hands over to be assembled (the parts of an `App`).
pub(crate) struct Parts {
    pub(crate) config: Config,
    pub(crate) routes: Vec<RouteFn>,
    pub(crate) processors: std::collections::HashMap<String, Arc<dyn ContextProcessor>>,
    pub(crate) merge: Option<MergeFn>,
    pub(crate) csrf_exempt: std::collections::HashSet<String>,
    pub(crate) tasks: Registry,
}

/// A started node (what `App::start` returns).
pub struct Running {
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) topology: Topology,
}

impl Running {
    /// The address the HTTP server listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every address the HTTP server listens on.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops the node: stop accepting, finish in-flight requests, stop the actors in order.
    pub async fn stop(self) {
        self.topology.stop_http().await;
        self.topology.shutdown().await;
    }

    /// Waits until the HTTP server stops (SIGINT or SIGTERM), then stops the actors in order.
    pub async fn wait(self) {
        self.topology.wait_http().await;
        self.topology.shutdown().await;
    }
}

/// A running node's parts, in the order they stop.
pub(crate) struct Topology {
    config: Arc<Config>,
    server: ServerHandle,
    server_task: Mutex<Option<actix_rt::task::JoinHandle<std::io::Result<()>>>>,
    actor_arbiter: actix_rt::Arbiter,
    context_arbiter: actix_rt::Arbiter,
    task_workers: Option<TaskWorkers>,
    /// Stops the embedded beat (which then releases its lease).
    beat_stop: CancellationToken,
    /// This node's heartbeat (NATS broker), stopped first at shutdown.
    heartbeat: Option<HeartbeatHandle>,
}

/// The in-process task workers (memory broker) and the arbiter their actors live on.
struct TaskWorkers {
    pool: WorkerPool,
    arbiter: actix_rt::Arbiter,
}

impl Topology {
    pub(crate) async fn start(parts: Parts) -> Result<Running, StartError> {
        let Parts {
            config,
            routes,
            processors: app_processors,
            merge,
            csrf_exempt,
            tasks: task_registry,
        } = parts;
        let config = Arc::new(config);
        if let Some(warning) = config.cluster_session_warning() {
            tracing::warn!("{warning}");
        }

        let metrics = web::Data::new(Metrics::new());
        let templates = Arc::new(Templates::load(
            &config.server.templates,
            config.server.debug,
        )?);
        // Actors live on their own arbiters (threads), never on an HTTP worker: the session
        // shards on one, the context workers on another.
        let actor_arbiter = actix_rt::Arbiter::new();
        let context_arbiter = actix_rt::Arbiter::new();

        let workers = ContextWorkers::start(
            config.actors.context_workers as usize,
            &context_arbiter.handle(),
        );
        let processors = processors(&config, app_processors)?.with_workers(workers);
        let renderer = web::Data::new(Renderer {
            templates,
            debug: config.server.debug,
            lazy: config.context.lazy,
            processors: Arc::new(processors),
        });

        // One NATS connection and one Postgres pool for the whole node, opened on first use.
        let services = engines::Services::new(&config);
        let mut readiness = Readiness::default();
        let backend = session_backend(&services, &actor_arbiter, &metrics).await?;
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
            let users = postgres_users(&services).await?;
            readiness.add(UsersCheck(users.clone()));
            auth = auth.with_postgres(users);
        }
        let csrf = web::Data::new(CsrfPolicy::new(csrf_exempt, &config.sessions));
        // What the dashboard and the live streams read (fed by this node's workers or NATS).
        let monitor = Arc::new(Monitor::new(cluster::interval(&config)));
        let (tasks, task_workers, dash_backend) =
            task_system(&services, task_registry, &metrics, &monitor).await?;
        let (beat_stop, beat_store) = embedded_beat(&services, &tasks).await?;
        if let (Outbox::Postgres, Some(broker)) = (config.tasks.outbox, tasks.broker()) {
            let pool = services.postgres().await?;
            crate::outbox::spawn_relay(pool, broker.clone(), beat_stop.clone());
        }
        // With NATS, the nodes count failed logins together.
        if let Some(link) = services.nats_if_open() {
            auth = auth
                .with_nats(link.client, &config.nats.prefix, engines::replicas(&config))
                .await
                .map_err(|e| StartError::service("nats.url", e))?;
        }
        let auth = web::Data::new(auth);
        match services.nats_if_open() {
            Some(link) if config.tasks.broker == Broker::Nats => readiness.add(BrokerCheck {
                client: link.client,
                stream: switchyard_actors::tasks::NatsNames::new(&config.nats.prefix)
                    .tasks_stream(),
            }),
            _ => readiness.add(AlwaysReady {
                name: "broker".into(),
                detail: format!("broker {} (in-process)", config.tasks.broker.as_str()),
            }),
        }
        if let (Some(link), Broker::Nats) = (services.nats_if_open(), config.tasks.broker) {
            monitor
                .clone()
                .listen(link.client, &config.nats.prefix)
                .await
                .map_err(|e| StartError::service("nats.url", e))?;
        }
        let dashboard = (!config.server.dashboard_path.is_empty()).then(|| {
            web::Data::new(Dashboard {
                path: config.server.dashboard_path.clone(),
                monitor: monitor.clone(),
                backend: dash_backend,
                queues: config.tasks.queues.iter().map(|q| q.name.clone()).collect(),
                node: config.server.node_id_or_default(),
                schedules: crate::beat::entries(&config).unwrap_or_default(),
                beat_store,
                nats_beat: Default::default(),
            })
        });
        let monitor = web::Data::from(monitor);
        let readiness = web::Data::new(readiness);
        // Handlers reach the task client as `web::Data<Tasks>`.
        let tasks = web::Data::new(tasks);
        let mut routes = routes;
        routes.insert(
            0,
            Arc::new(move |cfg: &mut web::ServiceConfig| {
                cfg.app_data(tasks.clone());
            }),
        );

        let factory_config = config.clone();
        let shared = Shared {
            metrics,
            renderer,
            readiness,
            sessions,
            auth,
            csrf,
            monitor,
            dashboard,
        };
        let server = HttpServer::new(move || http_app(&factory_config, &routes, &shared))
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
        // With the NATS broker the node shows in `cluster status`.
        let heartbeat = match services.nats_if_open() {
            Some(link) if config.tasks.broker == Broker::Nats => Some(
                cluster::heartbeat(&config, link.client, Role::Serve)
                    .metrics(Some(format!("http://{}/metrics", addrs[0])))
                    .start(),
            ),
            _ => None,
        };

        Ok(Running {
            addrs,
            topology: Topology {
                config,
                server: handle,
                server_task: Mutex::new(Some(server_task)),
                actor_arbiter,
                context_arbiter,
                task_workers,
                beat_stop,
                heartbeat,
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
        self.beat_stop.cancel();
        drop(self.heartbeat);
        if let Some(workers) = self.task_workers {
            tracing::info!(
                drain_timeout = self.config.tasks.drain_timeout,
                "draining task workers"
            );
            workers.pool.drain().await;
            workers.arbiter.stop();
        }
        tracing::info!(node = %self.config.server.node_id_or_default(), "stopping actors");
        // Context workers first (no more renders), then the session shards.
        self.context_arbiter.stop();
        let _ = self.context_arbiter.join();
        self.actor_arbiter.stop();
        let _ = self.actor_arbiter.join();
        tracing::info!("stopped");
    }
}

/// What every HTTP worker's app shares (cheap `Arc` clones).
#[derive(Clone)]
struct Shared {
    metrics: web::Data<Metrics>,
    renderer: web::Data<Renderer>,
    readiness: web::Data<Readiness>,
    sessions: web::Data<SessionLayer>,
    auth: web::Data<Auth>,
    csrf: web::Data<CsrfPolicy>,
    monitor: web::Data<Monitor>,
    dashboard: Option<web::Data<Dashboard>>,
}

fn http_app(
    config: &Config,
    routes: &[RouteFn],
    shared: &Shared,
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
        .app_data(shared.metrics.clone())
        .app_data(shared.renderer.clone())
        .app_data(shared.readiness.clone())
        .app_data(shared.sessions.clone())
        .app_data(shared.auth.clone())
        .app_data(shared.csrf.clone())
        .app_data(web::Data::new(client::TrustedProxies(
            config.server.trusted_proxies.clone(),
        )))
        // A path segment that does not parse as the handler's type (`web::Path<u32>`) is a 404
        // page, as an unknown route is.
        .app_data(web::PathConfig::default().error_handler(|_, _| Error::NotFound.into()))
        .wrap(from_fn(render::render_middleware))
        .wrap(from_fn(csrf::csrf_middleware))
        .wrap(from_fn(session_mw::session_middleware))
        // Renders the error pages the session middleware itself answers with (503, 413).
        .wrap(from_fn(render::render_middleware))
        .wrap(from_fn(metrics::metrics_middleware))
        // SPEC "HTTP hardening": no framing, no sniffing, no cross-origin referrers, and a CSP
        // that allows no inline script (outermost, so error pages carry them too).
        .wrap(
            actix_web::middleware::DefaultHeaders::new()
                .add(("X-Frame-Options", "DENY"))
                .add(("X-Content-Type-Options", "nosniff"))
                .add(("Referrer-Policy", "same-origin"))
                .add(("Content-Security-Policy", CONTENT_SECURITY_POLICY)),
        )
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics_handler))
        .app_data(shared.monitor.clone());
    if let Some(d) = &shared.dashboard {
        let d = d.clone();
        app = app.configure(move |cfg| dashboard::routes(cfg, d));
    }
    for f in routes {
        app = app.configure(|cfg| f(cfg));
    }
    // In debug, static files are served from `server.static_dir` when it exists.
    if config.server.debug && std::path::Path::new(&config.server.static_dir).is_dir() {
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
    .map_err(|e| StartError::service("context.processors", e))
}

/// The session engine `sessions.engine` names, behind its shard actors.
async fn session_backend(
    services: &engines::Services<'_>,
    arbiter: &actix_rt::Arbiter,
    metrics: &Metrics,
) -> Result<Backend, StartError> {
    let config = services.config();
    let Some(opened) = engines::open(services).await? else {
        let fallbacks: Vec<Vec<u8>> = config
            .server
            .secret_key_fallbacks
            .iter()
            .map(|k| k.expose_secret().as_bytes().to_vec())
            .collect();
        return Ok(Backend::Signed(CookieSigner::new(
            &engines::secret(config),
            &fallbacks,
        )));
    };
    if let Some(memory) = opened.memory.clone() {
        metrics.count_evictions(move || memory.evicted_total());
    }
    if let Some(cached) = &opened.cached {
        cached
            .listen(Some(&arbiter.handle()))
            .await
            .map_err(|e| StartError::service("nats.url", e))?;
        for kind in CachedDbStore::MESSAGE_KINDS {
            let store = Arc::downgrade(cached);
            metrics.count_rejected(kind, move || {
                store.upgrade().map_or(0, |s| s.rejected(kind))
            });
        }
    }
    let shards = SessionShards::start(
        config.actors.session_shards as usize,
        opened.store,
        &arbiter.handle(),
    );
    Ok(Backend::Server(shards))
}

/// The Postgres user store of `auth.store = "postgres"` (on the node's one pool).
async fn postgres_users(services: &engines::Services<'_>) -> Result<Arc<PgUsers>, StartError> {
    let pool = services.postgres().await?;
    let users = PgUsers::open(pool)
        .await
        .map_err(|e| StartError::service("postgres.url", e))?;
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

/// The task client, and with `tasks.broker = "memory"` (not eager) the in-process workers.
/// With `tasks.broker = "nats"` the client publishes to JetStream and `switchyard worker`
/// processes run the tasks.
async fn task_system(
    services: &engines::Services<'_>,
    registry: Registry,
    metrics: &web::Data<Metrics>,
    monitor: &Arc<Monitor>,
) -> Result<(Tasks, Option<TaskWorkers>, DashBackend), StartError> {
    let config = services.config();
    let settings = crate::tasks::settings(config);
    let registry = Arc::new(registry);
    if config.tasks.always_eager {
        tracing::info!(tasks = %registry.names().join(", "), "tasks run eagerly (tasks.always_eager)");
        return Ok((Tasks::eager(registry, settings), None, DashBackend::None));
    }
    match config.tasks.broker {
        Broker::Memory => {}
        Broker::Nats => {
            let broker = engines::nats_broker(services, &settings, Opening::Node).await?;
            let backend = DashBackend::Nats(Box::new(broker.clone()));
            return Ok((
                Tasks::new(Arc::new(broker), registry, settings),
                None,
                backend,
            ));
        }
    }
    let broker = Arc::new(MemoryBroker::new(&settings));
    for name in registry.names() {
        metrics.task_registered(name);
    }
    let events = monitor.sink(Some(metrics::task_events(metrics.clone())));
    let arbiter = actix_rt::Arbiter::new();
    let pool = WorkerPool::start(
        settings.clone(),
        None,
        broker.clone(),
        registry.clone(),
        Some(events),
        &arbiter.handle(),
    )
    .map_err(|e| StartError::service("tasks", e))?;
    cold_on_second_signal(pool.cold_token());
    Ok((
        Tasks::new(broker.clone(), registry, settings),
        Some(TaskWorkers { pool, arbiter }),
        DashBackend::Memory(broker),
    ))
}

/// Starts the beat inside `serve` when it has schedules and runs there: always on the memory
/// broker, with `[beat] embedded = true` on NATS. Returns the token that stops it.
async fn embedded_beat(
    services: &engines::Services<'_>,
    tasks: &Tasks,
) -> Result<(CancellationToken, Option<Arc<dyn BeatStore>>), StartError> {
    let config = services.config();
    let stop = CancellationToken::new();
    let broker = match config.tasks.broker {
        Broker::Memory => None,
        Broker::Nats if config.beat.embedded => {
            let settings = crate::tasks::settings(config);
            Some(engines::nats_broker(services, &settings, Opening::Node).await?)
        }
        Broker::Nats => return Ok((stop, None)),
    };
    let entries = crate::beat::entries(config).map_err(|e| StartError::service("beat", e))?;
    let store = crate::beat::embedded(config, entries, tasks.clone(), broker, stop.clone())
        .await
        .map_err(|e| StartError::service("beat", e))?;
    Ok((stop, store))
}

/// The first SIGTERM/SIGINT stops the HTTP server and starts a warm drain of the task workers;
/// a second one turns the drain cold (in-flight tasks are cancelled and aborted).
fn cold_on_second_signal(cold: switchyard_actors::tasks::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for signals: a second signal will not force a cold shutdown");
        return;
    };
    actix_rt::spawn(async move {
        for seen in 1..=2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                () = cold.cancelled() => return,
            }
            if seen == 2 {
                tracing::warn!("second signal: cold shutdown of the task workers");
                cold.cancel();
            }
        }
    });
}

/// `/readyz`'s `broker` check with `tasks.broker = "nats"`: the connection is up and the task
/// stream answers.
struct BrokerCheck {
    client: async_nats::Client,
    stream: String,
}

impl health::ReadinessCheck for BrokerCheck {
    fn name(&self) -> &str {
        "broker"
    }
    fn check(&self) -> futures_util::future::BoxFuture<'static, Result<String, String>> {
        let (client, stream) = (self.client.clone(), self.stream.clone());
        Box::pin(async move {
            let state = client.connection_state();
            if state != async_nats::connection::State::Connected {
                return Err(format!("nats {state}"));
            }
            let mut info = async_nats::jetstream::new(client)
                .get_stream(&stream)
                .await
                .map_err(|e| format!("stream {stream}: {e}"))?;
            let info = info
                .info()
                .await
                .map_err(|e| format!("stream {stream}: {e}"))?;
            Ok(format!(
                "nats, stream {stream} ({} waiting)",
                info.state.messages
            ))
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
