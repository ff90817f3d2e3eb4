//! The services a node connects to, each opened at most once per process ([`Services`]: one
//! NATS connection shared by sessions, tasks and events; one Postgres pool shared by the session
//! engine and the user store), and the session engine `sessions.engine` names on top of them
//! (for `topology`'s `serve`, and the CLI's `sessions`, `users` and task commands).

use std::sync::Arc;

use switchyard_actors::session::{
    connect_pool, CachedDbStore, FileStore, MemcachedStore, MemoryStore, NatsConnect, NatsKvStore,
    NatsLink, PgPool, PostgresStore, RecordCodec, RedisStore, SessionStore,
};

use crate::config::{Config, SessionEngine};
use crate::error::StartError;

/// An opened server-side engine.
pub(crate) struct Opened {
    pub(crate) store: Arc<dyn SessionStore>,
    /// The `cached_db` engine, whose listener `serve` starts.
    pub(crate) cached: Option<Arc<CachedDbStore>>,
    /// The `memory` engine, whose evictions the metrics count.
    pub(crate) memory: Option<Arc<MemoryStore>>,
}

/// How often the memory engine deletes its expired sessions (reads skip them meanwhile).
const MEMORY_PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes the memory engine's expired sessions every [`MEMORY_PURGE_EVERY`] for as long as
/// the store lives (a flood of one-time visitors is not kept until each is read again).
fn purge_on_a_timer(store: &Arc<MemoryStore>) {
    let weak = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(MEMORY_PURGE_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            match store.purge_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(purged = n, "memory engine: expired sessions deleted"),
                Err(e) => tracing::warn!("memory engine purge: {e}"),
            }
        }
    });
}

/// The connections of one process, opened on first use and then shared.
pub(crate) struct Services<'a> {
    config: &'a Config,
    nats: tokio::sync::OnceCell<NatsLink>,
    postgres: tokio::sync::OnceCell<PgPool>,
}

impl<'a> Services<'a> {
    /// Nothing connected yet.
    pub(crate) fn new(config: &'a Config) -> Self {
        Self {
            config,
            nats: tokio::sync::OnceCell::new(),
            postgres: tokio::sync::OnceCell::new(),
        }
    }

    /// The configuration the services come from.
    pub(crate) fn config(&self) -> &'a Config {
        self.config
    }

    /// The process's NATS connection (`nats.url` and the authentication keys).
    pub(crate) async fn nats(&self) -> Result<NatsLink, StartError> {
        self.nats
            .get_or_try_init(|| nats_link(self.config))
            .await
            .cloned()
    }

    /// The NATS connection, if one was opened.
    pub(crate) fn nats_if_open(&self) -> Option<NatsLink> {
        self.nats.get().cloned()
    }

    /// The process's Postgres pool (`postgres.url`), creating the database when missing.
    pub(crate) async fn postgres(&self) -> Result<PgPool, StartError> {
        self.postgres
            .get_or_try_init(|| postgres_pool(self.config))
            .await
            .cloned()
    }
}

/// The signing secret: `server.secret_key`, or in debug without one the fixed development key
/// (every node uses the same one, so nodes of a development cluster share sessions; SPEC
/// "Trust boundaries"), logged as such.
pub(crate) fn secret(config: &Config) -> Vec<u8> {
    if config.server.secret_key.is_empty() {
        tracing::warn!(
            "server.secret_key is empty: using the fixed development key to sign cookies and \
             name and authenticate stored sessions; anyone can forge sessions under it (set \
             server.secret_key in production)"
        );
        switchyard_actors::session::DEVELOPMENT_SECRET_KEY.to_vec()
    } else {
        config.server.secret_key.expose_secret().as_bytes().to_vec()
    }
}

/// The codec stored engines name and seal records with: keys from `server.secret_key` (the
/// fixed development key in debug without one) and its fallbacks, `sessions.encrypt`.
pub(crate) fn codec(config: &Config) -> Result<RecordCodec, StartError> {
    if config.sessions.encrypt && config.server.secret_key.is_empty() {
        return Err(StartError::service(
            "server.secret_key",
            "sessions.encrypt = true needs a secret_key to derive the encryption key from",
        ));
    }
    let fallbacks: Vec<Vec<u8>> = config
        .server
        .secret_key_fallbacks
        .iter()
        .map(|k| k.expose_secret().as_bytes().to_vec())
        .collect();
    Ok(RecordCodec::new(
        config.sessions.encrypt,
        &secret(config),
        &fallbacks,
    ))
}

/// Connects to Postgres (`postgres.url`), creating the database when missing.
async fn postgres_pool(config: &Config) -> Result<PgPool, StartError> {
    connect_pool(
        config.postgres.url.expose_secret(),
        config.postgres.pool_size,
    )
    .await
    .map_err(|e| StartError::service("postgres.url", e))
}

/// Connects to NATS (`nats.url` and the authentication keys).
async fn nats_link(config: &Config) -> Result<NatsLink, StartError> {
    let n = &config.nats;
    NatsLink::connect(&NatsConnect {
        url: n.url.expose_secret().to_owned(),
        user: n.user.clone(),
        password: n.password.expose_secret().to_owned(),
        token: n.token.expose_secret().to_owned(),
        creds_file: n.creds_file.clone(),
        nkey_seed_file: n.nkey_seed_file.clone(),
        tls_ca_file: n.tls_ca_file.clone(),
        tls_cert_file: n.tls_cert_file.clone(),
        tls_key_file: n.tls_key_file.clone(),
        name: format!("switchyard {}", config.server.node_id_or_default()),
    })
    .await
    .map_err(|e| StartError::service("nats.url", e))
}

/// `nats.replicas`: the replicas of every stream and bucket Switchyard creates.
pub(crate) fn replicas(config: &Config) -> usize {
    config.nats.replicas.clamp(1, 5) as usize
}

/// Opens the configured server-side engine on `services`; `None` for `signed_cookies`.
pub(crate) async fn open(services: &Services<'_>) -> Result<Option<Opened>, StartError> {
    let config = services.config;
    let prefix = &config.nats.prefix;
    let plain = |store: Arc<dyn SessionStore>| Opened {
        store,
        cached: None,
        memory: None,
    };
    let opened = match config.sessions.engine {
        SessionEngine::SignedCookies => return Ok(None),
        // Memory never leaves the process: nothing is at rest to encrypt.
        SessionEngine::Memory => {
            let store = Arc::new(MemoryStore::with_limit(config.sessions.memory_max_sessions));
            purge_on_a_timer(&store);
            Opened {
                store: store.clone(),
                cached: None,
                memory: Some(store),
            }
        }
        SessionEngine::File => plain(Arc::new(
            FileStore::open(&config.file.dir)
                .map_err(|e| StartError::service("file.dir", e))?
                .with_codec(codec(config)?),
        )),
        SessionEngine::Postgres => {
            let pool = services.postgres().await?;
            let store = PostgresStore::open(pool, codec(config)?)
                .await
                .map_err(|e| StartError::service("postgres.url", e))?;
            plain(Arc::new(store))
        }
        SessionEngine::CachedDb => {
            let pool = services.postgres().await?;
            let db = PostgresStore::open(pool, codec(config)?)
                .await
                .map_err(|e| StartError::service("postgres.url", e))?;
            let link = services.nats().await?;
            let cached = Arc::new(CachedDbStore::new(Arc::new(db), link, prefix));
            Opened {
                store: cached.clone(),
                cached: Some(cached),
                memory: None,
            }
        }
        SessionEngine::NatsKv => {
            let link = services.nats().await?;
            let bucket = format!("{prefix}_sessions");
            let store = NatsKvStore::open(link, &bucket, codec(config)?, replicas(config))
                .await
                .map_err(|e| StartError::service("nats.url", e))?;
            plain(Arc::new(store))
        }
        SessionEngine::Redis => plain(Arc::new(
            RedisStore::connect(config.redis.url.expose_secret(), prefix, codec(config)?)
                .await
                .map_err(|e| StartError::service("redis.url", e))?,
        )),
        SessionEngine::Memcached => plain(Arc::new(
            MemcachedStore::connect(&config.memcached.servers, prefix, codec(config)?)
                .await
                .map_err(|e| StartError::service("memcached.servers", e))?,
        )),
    };
    Ok(Some(opened))
}

/// Opens the task broker under `nats.prefix` on the process's NATS connection
/// (`tasks.broker = "nats"`) for `opening`: a node creates the consumers, a CLI command none,
/// and needs only the NATS permissions docs/security.md gives `publisher` or `operator`.
pub(crate) async fn nats_broker(
    services: &Services<'_>,
    settings: &switchyard_actors::tasks::TaskSettings,
    opening: switchyard_actors::tasks::Opening,
) -> Result<switchyard_actors::tasks::NatsBroker, StartError> {
    let link = services.nats().await?;
    switchyard_actors::tasks::NatsBroker::open_as(
        link.client,
        &services.config.nats.prefix,
        settings,
        opening,
    )
    .await
    .map_err(|e| StartError::service("nats.url", e))
}
