//! The `postgres` engine: a [`Storage`] of one row per stored value (versioned, expiry
//! indexed) over a bb8 pool, behind the generic [`KeyedStore`] (column `id` holds the keyed
//! hash, never a session id; the user index is rows of the same table). A batch of saves is
//! one statement, so a group commit is one round trip and one transaction; each row carries
//! its own compare-and-swap result.
//!
//! Group commit spans the shards: every save of the node (each shard's batch, single saves)
//! joins one queue, and at most [`COMMIT_STATEMENTS`] statements are in flight at once, each
//! taking everything that queued while the previous ones ran (up to [`COMMIT_MAX_ROWS`] rows,
//! distinct ids). Under load the statements grow rather than multiply, so the server commits
//! (and flushes its WAL) once for many sessions; when idle a save is written at once. Measured
//! with `cargo bench --bench sessions` (64 savers, 8 shards): per-shard statements carried 4
//! rows each (20,500 saves/s), the shared queue about 17 (41,600 saves/s).
//!
//! The database named in `postgres.url` is created when missing (through the `postgres`
//! maintenance database of the same server), and the tables when missing, under an advisory
//! lock so that nodes starting together do not race.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, Statement};

use super::storage::{Entry, Put, Storage};
use super::{now_unix, KeyedStore, RecordCodec, SaveOutcome, StoreError};

const ENGINE: &str = "postgres";

/// Group-commit statements one node has in flight at once: while one commits, the next
/// gathers. Measured with `cargo bench --bench sessions` (64 savers, 8 shards, 5 s) on this
/// project's 2-core machine: one at a time 36,600 saves/s at 20 rows per statement, two
/// 41,600 at 17 rows.
pub const COMMIT_STATEMENTS: usize = 2;

/// Most rows one group-commit statement carries.
pub const COMMIT_MAX_ROWS: usize = 256;

/// How long getting a pooled connection (or a first connection) may take before the service
/// counts as unavailable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one database operation (pool checkout, preparing and running its statements) may
/// take, measured by the client, before it fails as `Unavailable` (a 503). A stalled server
/// (stopped, or its host gone with the TCP connection still open) answers nothing at all: this
/// is what bounds the request then. 1.5 s keeps a request that needs the database under 2 s,
/// and is hundreds of times what the engine's statements take on a healthy server (about
/// 1 ms, 5 ms for a 256-row group commit).
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(1500);

/// `statement_timeout` of every pooled connection: the server cancels a statement running
/// longer (SQLSTATE 57014, mapped to `Unavailable`). Below [`QUERY_TIMEOUT`] so that a slow
/// statement the client would give up on anyway stops using the server (and its row locks)
/// too, and the client mostly sees the server's own error rather than its timeout.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_millis(1000);

/// Idle time before TCP keepalive probes start on a database connection: a connection whose
/// peer vanished (host down, network cut, no RST) is noticed and dropped from the pool in
/// about this plus the kernel's probes, instead of after TCP's retransmission timeout (15 min
/// on Linux). Short enough to matter, long enough to cost nothing (one empty segment a
/// connection every 10 s when idle).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);

/// A pool of Postgres connections.
pub type PgPool = bb8::Pool<PgManager>;

/// A pooled Postgres connection that keeps its prepared statements: the engine's statements
/// are parsed and planned once per connection, not once per request. Dereferences to the
/// `tokio_postgres::Client`.
pub struct PgConn {
    client: tokio_postgres::Client,
    statements: HashMap<&'static str, Statement>,
}

impl PgConn {
    /// The prepared statement for `sql` (prepared on first use on this connection).
    pub async fn prepared(
        &mut self,
        sql: &'static str,
        types: &[Type],
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare_typed(sql, types).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

impl Deref for PgConn {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

impl DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.client
    }
}

/// bb8 manager of [`PgConn`]s.
pub struct PgManager {
    config: tokio_postgres::Config,
}

impl bb8::ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PgConn, tokio_postgres::Error> {
        Ok(PgConn {
            client: connect(&self.config).await?,
            statements: HashMap::new(),
        })
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), tokio_postgres::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}

/// Advisory lock key serialising schema creation across nodes ("switchyd" in ASCII).
const SCHEMA_LOCK: i64 = 0x7377_6974_6368_7964;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS switchyard_sessions (
    id          text   PRIMARY KEY,
    data        bytea  NOT NULL,
    username    text,
    expires_at  bigint NOT NULL,
    version     bigint NOT NULL,
    updated_at  bigint NOT NULL
) WITH (
    -- Rows are rewritten often: room on each page for in-page (HOT) updates, and vacuum
    -- early, so hot sessions do not bloat the table and its indexes.
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05
);
CREATE INDEX IF NOT EXISTS switchyard_sessions_expires_at_idx
    ON switchyard_sessions (expires_at);
CREATE INDEX IF NOT EXISTS switchyard_sessions_username_idx
    ON switchyard_sessions (username) WHERE username IS NOT NULL;
";

/// Every save of a batch in one statement: rows that expect a version update only that
/// version of a live row; rows that expect nothing insert, or take over an expired row. The
/// ids returned are the rows written.
const SAVE_BATCH: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::int8[], $5::int8[],
                         $6::int8[])
        AS t(id, data, expires_at, version, updated_at, expected)
), upd AS (
    UPDATE switchyard_sessions s
       SET data = i.data, username = NULL, expires_at = i.expires_at,
           version = i.version, updated_at = i.updated_at
      FROM input i
     WHERE s.id = i.id AND i.expected IS NOT NULL AND s.version = i.expected
       AND s.expires_at > $7
    RETURNING s.id
), ins AS (
    INSERT INTO switchyard_sessions AS s (id, data, expires_at, version, updated_at)
    SELECT id, data, expires_at, version, updated_at FROM input WHERE expected IS NULL
    ON CONFLICT (id) DO UPDATE
       SET data = EXCLUDED.data, username = NULL,
           expires_at = EXCLUDED.expires_at, version = EXCLUDED.version,
           updated_at = EXCLUDED.updated_at
     WHERE s.expires_at <= $7
    RETURNING s.id
)
SELECT id FROM upd UNION ALL SELECT id FROM ins";

const LOAD: &str =
    "SELECT data, version FROM switchyard_sessions WHERE id = $1 AND expires_at > $2";

/// Runs one database operation, failing it as `Unavailable` after [`QUERY_TIMEOUT`]. The
/// operation is dropped then: its pooled connection goes back to the pool, and the answer the
/// server gives later, if any, is discarded by the connection.
pub async fn bounded<T>(
    engine: &'static str,
    op: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(QUERY_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable {
                engine,
                message: format!("no answer from the database within {QUERY_TIMEOUT:?}"),
            })
        })
}

/// Maps a Postgres error: connection trouble, and a statement cancelled by
/// `statement_timeout`, are `Unavailable` (503, retry later).
pub fn pg_error(engine: &'static str, e: tokio_postgres::Error) -> StoreError {
    let unavailable = match e.code() {
        None => true,
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::QUERY_CANCELED
        }
    };
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    if unavailable {
        StoreError::Unavailable { engine, message }
    } else {
        StoreError::Other { engine, message }
    }
}

/// Maps a pool error: a timeout waiting for a connection is `Unavailable`.
pub fn pool_error(engine: &'static str, e: bb8::RunError<tokio_postgres::Error>) -> StoreError {
    match e {
        bb8::RunError::User(e) => pg_error(engine, e),
        bb8::RunError::TimedOut => StoreError::Unavailable {
            engine,
            message: format!("no database connection within {CONNECT_TIMEOUT:?}"),
        },
    }
}

/// Connects to `url`, creating its database when missing, and returns a pool of `size`.
pub async fn connect_pool(url: &str, size: u32) -> Result<PgPool, StoreError> {
    connect_pool_with_timeout(url, size, CONNECT_TIMEOUT).await
}

/// [`connect_pool`] with another wait limit for a pooled connection (benchmarks).
pub async fn connect_pool_with_timeout(
    url: &str,
    size: u32,
    timeout: Duration,
) -> Result<PgPool, StoreError> {
    let config = tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Other {
        engine: ENGINE,
        message: format!("invalid URL: {e}"),
    })?;
    match probe(&config).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {
            create_database(&config).await?;
        }
        Err(e) => return Err(pg_error(ENGINE, e)),
    }
    let mut config = config;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.keepalives(true).keepalives_idle(KEEPALIVE_IDLE);
    let statement_timeout = format!("-c statement_timeout={}", STATEMENT_TIMEOUT.as_millis());
    let options = match config.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {statement_timeout}"),
        _ => statement_timeout,
    };
    config.options(options);
    let manager = PgManager { config };
    bb8::Pool::builder()
        .max_size(size.max(1))
        .connection_timeout(timeout)
        // A broken connection fails its query (a 503 for that request) and is dropped when
        // returned; checking every checkout would cost a round trip per query.
        .test_on_check_out(false)
        .build(manager)
        .await
        .map_err(|e| pg_error(ENGINE, e))
}

async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("postgres connection closed: {e}");
        }
    });
    Ok(client)
}

async fn probe(config: &tokio_postgres::Config) -> Result<(), tokio_postgres::Error> {
    let mut config = config.clone();
    config.connect_timeout(CONNECT_TIMEOUT);
    let client = connect(&config).await?;
    client.simple_query("SELECT 1").await.map(|_| ())
}

async fn create_database(config: &tokio_postgres::Config) -> Result<(), StoreError> {
    let name = config.get_dbname().unwrap_or("postgres").to_owned();
    let mut admin = config.clone();
    admin.dbname("postgres");
    admin.connect_timeout(CONNECT_TIMEOUT);
    let client = connect(&admin).await.map_err(|e| pg_error(ENGINE, e))?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match client
        .simple_query(&format!("CREATE DATABASE {quoted}"))
        .await
    {
        Ok(_) => {
            tracing::info!(database = %name, "created the database");
            Ok(())
        }
        // Another node created it first.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(()),
        Err(e) => Err(pg_error(ENGINE, e)),
    }
}

/// Runs `ddl` (idempotent statements) under the schema advisory lock.
pub async fn migrate(pool: &PgPool, engine: &'static str, ddl: &str) -> Result<(), StoreError> {
    bounded(engine, async {
        let mut conn = pool.get().await.map_err(|e| pool_error(engine, e))?;
        let tx = conn.transaction().await.map_err(|e| pg_error(engine, e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(|e| pg_error(engine, e))?;
        tx.batch_execute(ddl)
            .await
            .map_err(|e| pg_error(engine, e))?;
        tx.commit().await.map_err(|e| pg_error(engine, e))
    })
    .await
}

/// Sessions in a Postgres table: the generic store over [`PostgresStorage`].
pub type PostgresStore = KeyedStore<PostgresStorage>;

/// Rows of table `switchyard_sessions`, written by group commit.
pub struct PostgresStorage {
    inner: Arc<Inner>,
}

/// What the storage and its group-commit drivers share.
struct Inner {
    pool: PgPool,
    batches: AtomicU64,
    rows: AtomicU64,
    commit: Mutex<CommitQueue>,
}

/// Saves waiting for a statement, and how many statements are in flight.
#[derive(Default)]
struct CommitQueue {
    waiting: VecDeque<Waiting>,
    in_flight: usize,
}

/// One caller's saves (encoded), waiting to be written together.
struct Waiting {
    rows: Columns,
    reply: oneshot::Sender<Result<Vec<SaveOutcome>, StoreError>>,
}

/// The statement's parameters, one array per column.
#[derive(Default)]
struct Columns {
    ids: Vec<String>,
    data: Vec<Vec<u8>>,
    expires: Vec<i64>,
    versions: Vec<i64>,
    updated: Vec<i64>,
    expected: Vec<Option<i64>>,
}

impl Columns {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn append(&mut self, other: Columns) {
        self.ids.extend(other.ids);
        self.data.extend(other.data);
        self.expires.extend(other.expires);
        self.versions.extend(other.versions);
        self.updated.extend(other.updated);
        self.expected.extend(other.expected);
    }
}

/// Gives back a driver's slot if it ends without finding the queue empty (its runtime
/// stopped mid-statement); a driver that finds it empty gives it back under the same lock.
struct InFlight<'a> {
    inner: &'a Inner,
    held: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.held {
            let mut q = self.inner.commit.lock().unwrap_or_else(|p| p.into_inner());
            q.in_flight -= 1;
        }
    }
}

impl Inner {
    fn columns(puts: &[Put]) -> Columns {
        let n = puts.len();
        let now = now_unix();
        let mut c = Columns {
            ids: Vec::with_capacity(n),
            data: Vec::with_capacity(n),
            expires: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            updated: Vec::with_capacity(n),
            expected: Vec::with_capacity(n),
        };
        for put in puts {
            c.ids.push(put.key.clone());
            c.data.push(put.bytes.clone());
            c.expires.push(put.expires_at);
            c.versions.push(to_i64(put.version));
            c.updated.push(now);
            c.expected.push(put.expected.map(to_i64));
        }
        c
    }

    /// Takes the next statement's worth of waiting saves: whole callers, in arrival order,
    /// distinct ids, at most [`COMMIT_MAX_ROWS`] rows (a larger caller goes alone). A caller
    /// whose ids clash with ones already taken waits for the next statement.
    fn take(q: &mut CommitQueue) -> Vec<Waiting> {
        let mut taken: Vec<Waiting> = Vec::new();
        let mut ids: HashSet<String> = HashSet::new();
        let mut rows = 0;
        let mut i = 0;
        while i < q.waiting.len() {
            let w = &q.waiting[i];
            let n = w.rows.len();
            if !taken.is_empty() && rows + n > COMMIT_MAX_ROWS {
                break;
            }
            if w.rows.ids.iter().any(|id| ids.contains(id)) {
                i += 1;
                continue;
            }
            ids.extend(w.rows.ids.iter().cloned());
            rows += n;
            if let Some(w) = q.waiting.remove(i) {
                taken.push(w);
            }
        }
        taken
    }

    /// A group-commit driver: writes statements while saves wait, then gives its slot back.
    async fn drive(self: Arc<Self>) {
        let mut slot = InFlight {
            inner: &self,
            held: true,
        };
        loop {
            let taken = {
                let mut q = self.commit.lock().unwrap_or_else(|p| p.into_inner());
                let taken = Self::take(&mut q);
                if taken.is_empty() {
                    // Under the lock: a save queued after this sees the slot free.
                    q.in_flight -= 1;
                    slot.held = false;
                    return;
                }
                taken
            };
            let mut all = Columns::default();
            let mut sizes = Vec::with_capacity(taken.len());
            let mut replies = Vec::with_capacity(taken.len());
            for w in taken {
                sizes.push(w.rows.len());
                replies.push(w.reply);
                all.append(w.rows);
            }
            match self.write(&all).await {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for (n, reply) in sizes.into_iter().zip(replies) {
                        let _ = reply.send(Ok(outcomes.by_ref().take(n).collect()));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// One statement writing every row of `c`; the outcome of each row, in order.
    async fn write(&self, c: &Columns) -> Result<Vec<SaveOutcome>, StoreError> {
        bounded(ENGINE, self.write_unbounded(c)).await
    }

    async fn write_unbounded(&self, c: &Columns) -> Result<Vec<SaveOutcome>, StoreError> {
        let now = now_unix();
        let mut conn = self.pool.get().await.map_err(|e| pool_error(ENGINE, e))?;
        let stmt = conn
            .prepared(
                SAVE_BATCH,
                &[
                    Type::TEXT_ARRAY,
                    Type::BYTEA_ARRAY,
                    Type::INT8_ARRAY,
                    Type::INT8_ARRAY,
                    Type::INT8_ARRAY,
                    Type::INT8_ARRAY,
                    Type::INT8,
                ],
            )
            .await
            .map_err(|e| pg_error(ENGINE, e))?;
        let rows = conn
            .query(
                &stmt,
                &[
                    &c.ids,
                    &c.data,
                    &c.expires,
                    &c.versions,
                    &c.updated,
                    &c.expected,
                    &now,
                ],
            )
            .await
            .map_err(|e| pg_error(ENGINE, e))?;
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(c.len() as u64, Ordering::Relaxed);
        let written: HashSet<&str> = rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
        Ok(c.ids
            .iter()
            .map(|id| {
                if written.contains(id.as_str()) {
                    SaveOutcome::Saved
                } else {
                    SaveOutcome::Conflict
                }
            })
            .collect())
    }
}

impl PostgresStore {
    /// The engine over `pool`, creating its tables when missing.
    pub async fn open(pool: PgPool, codec: RecordCodec) -> Result<Self, StoreError> {
        migrate(&pool, ENGINE, SCHEMA).await?;
        let storage = PostgresStorage {
            inner: Arc::new(Inner {
                pool,
                batches: AtomicU64::new(0),
                rows: AtomicU64::new(0),
                commit: Mutex::new(CommitQueue::default()),
            }),
        };
        Ok(KeyedStore::new(storage, codec))
    }

    /// The pool (shared with the Postgres auth store).
    pub fn pool(&self) -> &PgPool {
        &self.storage().inner.pool
    }

    /// Batch statements written so far and the rows they carried (group commit's effect).
    pub fn batch_stats(&self) -> (u64, u64) {
        let inner = &self.storage().inner;
        (
            inner.batches.load(Ordering::Relaxed),
            inner.rows.load(Ordering::Relaxed),
        )
    }
}

impl PostgresStorage {
    async fn conn(&self) -> Result<bb8::PooledConnection<'_, PgManager>, StoreError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| pool_error(ENGINE, e))
    }

    /// Queues `puts` for the next group-commit statement and waits for their outcomes,
    /// starting a driver when fewer than [`COMMIT_STATEMENTS`] are running.
    async fn write_batch(&self, puts: &[Put]) -> Result<Vec<SaveOutcome>, StoreError> {
        if puts.is_empty() {
            return Ok(Vec::new());
        }
        let rows = Inner::columns(puts);
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = self.inner.commit.lock().unwrap_or_else(|p| p.into_inner());
            q.waiting.push_back(Waiting { rows, reply });
            let start = q.in_flight < COMMIT_STATEMENTS;
            if start {
                q.in_flight += 1;
            }
            start
        };
        if start {
            tokio::spawn(self.inner.clone().drive());
        }
        answer.await.map_err(|_| StoreError::Unavailable {
            engine: ENGINE,
            message: "the group-commit writer stopped before the write finished".into(),
        })?
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait]
impl Storage for PostgresStorage {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        bounded(ENGINE, self.load(key)).await
    }

    async fn put(&self, put: &Put) -> Result<SaveOutcome, StoreError> {
        let mut out = self.write_batch(std::slice::from_ref(put)).await?;
        Ok(out.pop().unwrap_or(SaveOutcome::Conflict))
    }

    async fn put_batch(&self, puts: &[Put]) -> Vec<Result<SaveOutcome, StoreError>> {
        match self.write_batch(puts).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(e) => puts.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        bounded(ENGINE, async {
            let conn = self.conn().await?;
            conn.query_typed(
                "DELETE FROM switchyard_sessions WHERE id = $1",
                &[(&key, Type::TEXT)],
            )
            .await
            .map_err(|e| pg_error(ENGINE, e))?;
            Ok(())
        })
        .await
    }

    async fn purge_expired(&self, now: i64) -> Result<u64, StoreError> {
        bounded(ENGINE, async {
            let conn = self.conn().await?;
            conn.execute(
                "DELETE FROM switchyard_sessions WHERE expires_at <= $1",
                &[&now],
            )
            .await
            .map_err(|e| pg_error(ENGINE, e))
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        bounded(ENGINE, async {
            let conn = self.conn().await?;
            conn.simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| pg_error(ENGINE, e))
        })
        .await
    }
}

impl PostgresStorage {
    /// The live row of `key`, unbounded (see [`Storage::get`]).
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut conn = self.conn().await?;
        let stmt = conn
            .prepared(LOAD, &[Type::TEXT, Type::INT8])
            .await
            .map_err(|e| pg_error(ENGINE, e))?;
        let rows = conn
            .query(&stmt, &[&key, &now_unix()])
            .await
            .map_err(|e| pg_error(ENGINE, e))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let bytes: Vec<u8> = row.try_get(0).map_err(|e| pg_error(ENGINE, e))?;
        let version: i64 = row.try_get(1).map_err(|e| pg_error(ENGINE, e))?;
        Ok(Some(Entry {
            bytes,
            version: u64::try_from(version).unwrap_or(0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{
        Change, Record, SaveItem, SaveSession, SessionId, SessionShards, SessionStore, UpdateFn,
    };
    use serde_json::{json, Value};
    use std::sync::Arc;

    /// A fresh database on the test Postgres, or `None` (skipped) when it is unreachable.
    async fn fresh_store() -> Option<(PostgresStore, String)> {
        let base = std::env::var("SWITCHYARD_POSTGRES__URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/switchyard".into());
        let host = base
            .split("://")
            .nth(1)?
            .split('/')
            .next()?
            .rsplit('@')
            .next()?;
        let reachable = std::net::TcpStream::connect(host).is_ok();
        if !reachable {
            assert_ne!(
                std::env::var("SWITCHYARD_REQUIRE_SERVICES").as_deref(),
                Ok("1"),
                "postgres not reachable at {base}"
            );
            println!("SKIPPED: postgres not reachable at {base}");
            return None;
        }
        let db = format!(
            "sy_t_unit_{}",
            &SessionId::generate().as_str()[..12].to_lowercase()
        )
        .replace('-', "_");
        let url = match base.rfind('/') {
            Some(i) if i > base.find("://")? + 2 => format!("{}/{db}", &base[..i]),
            _ => format!("{base}/{db}"),
        };
        let pool = connect_pool(&url, 4).await.ok()?;
        let store = PostgresStore::open(pool, RecordCodec::plain()).await.ok()?;
        Some((store, url))
    }

    async fn drop_db(url: &str) {
        let Ok(config) = tokio_postgres::Config::from_str(url) else {
            return;
        };
        let db = config.get_dbname().unwrap_or_default().to_owned();
        let mut admin = config.clone();
        admin.dbname("postgres");
        if let Ok(client) = connect(&admin).await {
            let _ = client
                .simple_query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .await;
        }
    }

    fn record(n: i64, version: u64) -> Record {
        Record {
            data: json!({ "n": n }).as_object().cloned().unwrap_or_default(),
            expires_at: now_unix() + 60,
            version,
            updated_at: now_unix(),
        }
    }

    fn item(id: &SessionId, n: i64, expected: Option<u64>) -> SaveItem {
        SaveItem {
            id: id.clone(),
            record: record(n, expected.map_or(1, |v| v + 1)),
            expected,
        }
    }

    #[actix_rt::test]
    async fn one_statement_answers_each_row_its_own_cas_result() -> Result<(), StoreError> {
        let Some((store, url)) = fresh_store().await else {
            return Ok(());
        };
        let [a, b, c, d, e] = std::array::from_fn(|_| SessionId::generate());
        for id in [&b, &c, &e] {
            assert_eq!(
                store.save(id, &record(0, 1), None).await?,
                SaveOutcome::Saved
            );
        }
        let before = store.batch_stats().0;
        let outcomes = store
            .save_batch(&[
                item(&a, 1, None),    // new: written
                item(&b, 2, Some(1)), // current version: written
                item(&c, 3, Some(7)), // stale version: conflict
                item(&d, 4, Some(1)), // no such session: conflict
                item(&e, 5, None),    // exists and live: conflict
            ])
            .await;
        let outcomes: Vec<SaveOutcome> = outcomes.into_iter().collect::<Result<_, _>>()?;
        use SaveOutcome::{Conflict, Saved};
        assert_eq!(outcomes, vec![Saved, Saved, Conflict, Conflict, Conflict]);
        assert_eq!(store.batch_stats().0, before + 1, "one statement");
        let n = |r: Option<Record>| r.map(|r| (r.data["n"].clone(), r.version));
        assert_eq!(n(store.load(&a).await?), Some((json!(1), 1)));
        assert_eq!(n(store.load(&b).await?), Some((json!(2), 2)));
        assert_eq!(n(store.load(&c).await?), Some((json!(0), 1)));
        assert_eq!(n(store.load(&d).await?), None);
        assert_eq!(n(store.load(&e).await?), Some((json!(0), 1)));
        drop(store);
        drop_db(&url).await;
        Ok(())
    }

    /// A shard save of `{"n": n}` expiring in a minute.
    fn save_msg(
        id: Option<SessionId>,
        base_version: Option<u64>,
        n: i64,
        changes: Vec<Change>,
    ) -> SaveSession {
        SaveSession {
            id,
            base_version,
            data: json!({ "n": n }).as_object().cloned().unwrap_or_default(),
            changes,
            expires_at: now_unix() + 60,
            max_size: 1024,
            delete_after: None,
        }
    }

    #[actix_rt::test]
    async fn saves_of_every_shard_share_statements() -> Result<(), Box<dyn std::error::Error>> {
        let Some((store, url)) = fresh_store().await else {
            return Ok(());
        };
        let store = Arc::new(store);
        let arbiter = actix::Arbiter::new();
        let shards = SessionShards::start(8, store.clone(), &arbiter.handle());
        let msg = || save_msg(None, None, 1, Vec::new());
        // 64 new sessions at once over 8 shards: a group commit per shard would need at least
        // one statement per shard; the node's queue gathers them into fewer.
        let (batches0, rows0) = store.batch_stats();
        let saved: Vec<_> = futures_util::future::join_all((0..64).map(|_| shards.save(msg())))
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let (batches, rows) = store.batch_stats();
        assert_eq!(rows - rows0, 64);
        assert!(
            batches - batches0 < 8,
            "{} statements for 64 saves on 8 shards",
            batches - batches0
        );
        for s in &saved {
            assert!(
                store.load(&s.id).await?.is_some(),
                "committed before answered"
            );
        }
        arbiter.stop();
        drop_db(&url).await;
        Ok(())
    }

    #[actix_rt::test]
    async fn a_shard_group_commits_waiting_saves() -> Result<(), Box<dyn std::error::Error>> {
        let Some((store, url)) = fresh_store().await else {
            return Ok(());
        };
        let store = Arc::new(store);
        let arbiter = actix::Arbiter::new();
        let shards = SessionShards::start(1, store.clone(), &arbiter.handle());
        let inc: UpdateFn = Arc::new(|v| Ok(json!(v.and_then(Value::as_i64).unwrap_or(0) + 1)));
        let msg = |id: Option<SessionId>, base: Option<u64>, n: i64| {
            save_msg(id, base, n, vec![Change::Update("n".into(), inc.clone())])
        };
        // 40 new sessions at once on one shard: fewer statements than saves.
        let (batches0, rows0) = store.batch_stats();
        let saves = (0..40).map(|_| shards.save(msg(None, None, 1)));
        let saved: Vec<_> = futures_util::future::join_all(saves)
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let (batches, rows) = store.batch_stats();
        assert_eq!(rows - rows0, 40);
        assert!(
            batches - batches0 < 40,
            "{} statements for 40 saves",
            batches - batches0
        );
        for s in &saved {
            assert!(
                store.load(&s.id).await?.is_some(),
                "answered only once committed"
            );
        }
        // 20 writers from one base version: each re-applied after losing, none lost.
        let first = &saved[0];
        let writes =
            (0..20).map(|_| shards.save(msg(Some(first.id.clone()), Some(first.version), 2)));
        for r in futures_util::future::join_all(writes).await {
            r?;
        }
        let rec = store.load(&first.id).await?.ok_or("session gone")?;
        assert_eq!(rec.data["n"], json!(21));
        arbiter.stop();
        drop_db(&url).await;
        Ok(())
    }
}
