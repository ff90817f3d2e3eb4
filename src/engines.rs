//! Opens the session engine `sessions.engine` names, with the pools and connections it needs
//! (called by `topology` for `serve`, and by the CLI's `sessions` and `users` commands).

use std::sync::Arc;

use switchyard_actors::session::{
    connect_pool, CachedDbStore, FileStore, MemcachedStore, MemoryStore, NatsConnect, NatsKvStore,
    NatsLink, PgPool, PostgresStore, RecordCodec, RedisStore, SessionStore,
};

use crate::app::StartError;
use crate::config::{Config, SessionEngine};

/// An opened server-side engine and what it connected to.
pub(crate) struct Opened {
    pub(crate) store: Arc<dyn SessionStore>,
    /// The Postgres pool, when the engine uses Postgres (shared with `auth.store`).
    pub(crate) postgres: Option<PgPool>,
    /// The `cached_db` engine, whose listener `serve` starts.
    pub(crate) cached: Option<Arc<CachedDbStore>>,
}

fn service(key: &str, e: impl std::fmt::Display) -> StartError {
    StartError::Service {
        key: key.into(),
        message: e.to_string(),
    }
}

/// The codec stored engines name and seal records with: keys from `server.secret_key` (the
/// fixed development key in debug without one) and its fallbacks, `sessions.encrypt`.
pub(crate) fn codec(config: &Config) -> Result<RecordCodec, StartError> {
    if config.sessions.encrypt && config.server.secret_key.is_empty() {
        return Err(service(
            "server.secret_key",
            "sessions.encrypt = true needs a secret_key to derive the encryption key from",
        ));
    }
    let fallbacks: Vec<Vec<u8>> = config
        .server
        .secret_key_fallbacks
        .iter()
        .map(|k| k.as_bytes().to_vec())
        .collect();
    Ok(RecordCodec::new(
        config.sessions.encrypt,
        &crate::topology::secret(config),
        &fallbacks,
    ))
}

/// Connects to Postgres (`postgres.url`), creating the database when missing.
pub(crate) async fn postgres_pool(config: &Config) -> Result<PgPool, StartError> {
    connect_pool(&config.postgres.url, config.postgres.pool_size)
        .await
        .map_err(|e| service("postgres.url", e))
}

/// Connects to NATS (`nats.url` and the authentication keys).
pub(crate) async fn nats_link(config: &Config) -> Result<NatsLink, StartError> {
    let n = &config.nats;
    NatsLink::connect(&NatsConnect {
        url: n.url.clone(),
        token: n.token.clone(),
        creds_file: n.creds_file.clone(),
        nkey_seed_file: n.nkey_seed_file.clone(),
        tls_ca_file: n.tls_ca_file.clone(),
        tls_cert_file: n.tls_cert_file.clone(),
        tls_key_file: n.tls_key_file.clone(),
        name: format!("switchyard {}", config.server.node_id_or_default()),
    })
    .await
    .map_err(|e| service("nats.url", e))
}

/// Opens the configured server-side engine; `None` for `signed_cookies`.
pub(crate) async fn open(config: &Config) -> Result<Option<Opened>, StartError> {
    let prefix = &config.nats.prefix;
    let plain = |store: Arc<dyn SessionStore>| Opened {
        store,
        postgres: None,
        cached: None,
    };
    let opened = match config.sessions.engine {
        SessionEngine::SignedCookies => return Ok(None),
        // Memory never leaves the process: nothing is at rest to encrypt.
        SessionEngine::Memory => plain(Arc::new(MemoryStore::new())),
        SessionEngine::File => plain(Arc::new(
            FileStore::open(&config.file.dir)
                .map_err(|e| service("file.dir", e))?
                .with_codec(codec(config)?),
        )),
        SessionEngine::Postgres => {
            let pool = postgres_pool(config).await?;
            let store = PostgresStore::open(pool.clone(), codec(config)?)
                .await
                .map_err(|e| service("postgres.url", e))?;
            Opened {
                store: Arc::new(store),
                postgres: Some(pool),
                cached: None,
            }
        }
        SessionEngine::CachedDb => {
            let pool = postgres_pool(config).await?;
            let db = PostgresStore::open(pool.clone(), codec(config)?)
                .await
                .map_err(|e| service("postgres.url", e))?;
            let link = nats_link(config).await?;
            let cached = Arc::new(CachedDbStore::new(Arc::new(db), link, prefix));
            Opened {
                store: cached.clone(),
                postgres: Some(pool),
                cached: Some(cached),
            }
        }
        SessionEngine::NatsKv => {
            let link = nats_link(config).await?;
            let store = NatsKvStore::open(link, &format!("{prefix}_sessions"), codec(config)?)
                .await
                .map_err(|e| service("nats.url", e))?;
            plain(Arc::new(store))
        }
        SessionEngine::Redis => plain(Arc::new(
            RedisStore::connect(&config.redis.url, prefix, codec(config)?)
                .await
                .map_err(|e| service("redis.url", e))?,
        )),
        SessionEngine::Memcached => plain(Arc::new(
            MemcachedStore::connect(&config.memcached.servers, prefix, codec(config)?)
                .await
                .map_err(|e| service("memcached.servers", e))?,
        )),
    };
    Ok(Some(opened))
}

/// Connects to NATS and opens the task broker under `nats.prefix` (`tasks.broker = "nats"`).
pub(crate) async fn nats_broker(
    config: &Config,
    settings: &switchyard_actors::tasks::TaskSettings,
) -> Result<switchyard_actors::tasks::NatsBroker, StartError> {
    let link = nats_link(config).await?;
    switchyard_actors::tasks::NatsBroker::open(link.client, &config.nats.prefix, settings)
        .await
        .map_err(|e| service("nats.url", e))
}
