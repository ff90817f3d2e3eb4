//! The application's Postgres handle: queries go through the project's pool, are counted, and
//! are logged per request (SQL text and time) for the `debug` context processor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix_web::{HttpMessage, HttpRequest};
use serde_json::{json, Value};
pub use switchyard_actors::session::QUERY_TIMEOUT;
pub use switchyard_actors::session::{connect_pool, PgPool};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::config::PostgresConfig;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had from the pool (Postgres down or the pool exhausted), or no
    /// answer within [`QUERY_TIMEOUT`].
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// The statement failed.
    #[error("postgres: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// The queries one request ran: `{"sql", "time_ms"}` entries, shared with its context
/// processors through the request snapshot.
#[derive(Clone, Default, Debug)]
pub struct QueryLog(pub(crate) Arc<Mutex<Vec<Value>>>);

impl QueryLog {
    /// The log of `req`, created on first use.
    pub fn of(req: &HttpRequest) -> QueryLog {
        req.extensions_mut()
            .get_or_insert_with(QueryLog::default)
            .clone()
    }

    /// The log as a snapshot carries it.
    pub fn shared(&self) -> Arc<Mutex<Vec<Value>>> {
        self.0.clone()
    }

    fn push(&self, sql: &str, started: Instant) {
        let entry = json!({
            "sql": sql,
            "time_ms": (started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
        });
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
    }
}

/// The project's Postgres pool, counting every query it runs.
pub struct Db {
    pool: PgPool,
    queries: AtomicU64,
}

impl Db {
    /// Connects to `[postgres]` (creating the database when missing).
    pub async fn connect(config: &PostgresConfig) -> Result<Arc<Db>, DbError> {
        let pool = connect_pool(config.url.expose_secret(), config.pool_size)
            .await
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        Ok(Arc::new(Db::from_pool(pool)))
    }

    /// Wraps an existing pool.
    pub fn from_pool(pool: PgPool) -> Db {
        Db {
            pool,
            queries: AtomicU64::new(0),
        }
    }

    /// Runs `sql`, recording it in `log` (the request's, for the debug page) when given.
    pub async fn query(
        &self,
        log: Option<&QueryLog>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        let started = Instant::now();
        // Checkout and statement bounded together, as the session engine's are.
        let rows = tokio::time::timeout(QUERY_TIMEOUT, async {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| DbError::Unavailable(e.to_string()))?;
            self.queries.fetch_add(1, Ordering::Relaxed);
            Ok::<_, DbError>(conn.query(sql, params).await?)
        })
        .await
        .map_err(|_| {
            DbError::Unavailable(format!(
                "no answer from the database within {QUERY_TIMEOUT:?}"
            ))
        })??;
        if let Some(log) = log {
            log.push(sql, started);
        }
        Ok(rows)
    }

    /// How many queries this handle has run.
    pub fn queries_total(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}
