//! Transactional enqueue (`tasks.outbox = "postgres"`): a task enqueued inside an application's
//! Postgres transaction is a row of the table `switchyard_outbox`, written in that transaction,
//! so it exists if and only if the transaction commits. A relay on every `serve` and `worker`
//! node claims rows (`FOR UPDATE SKIP LOCKED`, so relays never take the same row), publishes
//! each with its deterministic message id (the task id, or `unique:<key>`) and deletes them in
//! the claiming transaction. A crash between the application's commit and the publish leaves
//! the row for the next relay pass; a crash between the publish and the delete makes a relay
//! publish the row again, which the task stream's duplicate window drops. See docs/tasks.md.
//!
//! ```no_run
//! # async fn checkout(pool: &switchyard::db::PgPool, tasks: &switchyard::tasks::Tasks)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use switchyard::tasks::PublishOptions;
//! let mut conn = pool.get().await?;
//! let tx = conn.transaction().await?;
//! tx.execute("INSERT INTO orders (total) VALUES (42)", &[]).await?;
//! let args = serde_json::json!({ "order_id": 1 });
//! switchyard::outbox::enqueue(&tx, tasks, "shop.order_created", args, PublishOptions::new())
//!     .await?;
//! switchyard::outbox::commit(tx).await?; // the task is published after this, exactly once
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use switchyard_actors::tasks::{
    Broker, CancellationToken, ClientError, Outgoing, PublishOptions, Tasks,
};
use tokio_postgres::{GenericClient, Transaction};

use crate::db::PgPool;

/// The outbox table.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS switchyard_outbox (
    id         bigserial PRIMARY KEY,
    task_id    text   NOT NULL,
    queue      text   NOT NULL,
    dedupe_id  text   NOT NULL,
    payload    bytea  NOT NULL,
    created_ms bigint NOT NULL
)";

/// Rows one relay pass publishes at most.
const BATCH: i64 = 100;
/// How often an idle relay looks for rows.
const POLL: Duration = Duration::from_millis(100);
/// The pause after a relay pass failed.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Why a task could not be enqueued.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The task itself is refused (unknown queue, args not an object, an eta too far, ...).
    #[error(transparent)]
    Task(#[from] ClientError),
    /// The row could not be written.
    #[error("outbox: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Creates the outbox table when missing.
pub async fn install(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SCHEMA).await
}

/// Writes the prepared message `msg` ([`Tasks::prepare`]) as a row through `client` (the
/// application's transaction).
pub async fn insert(client: &impl GenericClient, msg: &Outgoing) -> Result<(), OutboxError> {
    let now = chrono::Utc::now().timestamp_millis();
    client
        .execute(
            "INSERT INTO switchyard_outbox (task_id, queue, dedupe_id, payload, created_ms) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&msg.id, &msg.queue, &msg.dedupe_id, &msg.payload, &now],
        )
        .await?;
    Ok(())
}

/// Enqueues `task` with `args` inside `client`'s transaction; returns the task id. The task
/// is checked as [`Tasks::send`] checks it, and published once the transaction commits.
pub async fn enqueue(
    client: &impl GenericClient,
    tasks: &Tasks,
    task: &str,
    args: Value,
    options: PublishOptions,
) -> Result<String, OutboxError> {
    let msg = tasks.prepare(task, args, &options)?;
    insert(client, &msg).await?;
    Ok(msg.id)
}

/// Commits `tx`. In builds with the `failpoints` feature, `SWITCHYARD_FAILPOINT=
/// outbox_after_commit` ends the process right after the commit (the crash the outbox is for).
pub async fn commit(tx: Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.commit().await?;
    #[cfg(feature = "failpoints")]
    if std::env::var("SWITCHYARD_FAILPOINT").as_deref() == Ok("outbox_after_commit") {
        eprintln!("failpoint outbox_after_commit: exiting after the commit");
        std::process::abort();
    }
    Ok(())
}

/// Starts the relay of this node: it publishes committed rows to `broker` until `stop`
/// fires.
pub(crate) fn spawn_relay(pool: PgPool, broker: Arc<dyn Broker>, stop: CancellationToken) {
    actix_rt::spawn(async move {
        let installed = match pool.get().await {
            Ok(conn) => install(&**conn).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = installed {
            tracing::warn!("outbox relay: cannot create the table yet: {e}");
        }
        loop {
            let pause = match relay_once(&pool, broker.as_ref()).await {
                Ok(n) if n as i64 == BATCH => Duration::ZERO,
                Ok(_) => POLL,
                Err(e) => {
                    tracing::warn!("outbox relay: {e}");
                    ERROR_PAUSE
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    });
}

/// One pass: claims up to [`BATCH`] rows, publishes them, deletes them; how many.
async fn relay_once(pool: &PgPool, broker: &dyn Broker) -> Result<usize, String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    let tx = conn.transaction().await.map_err(|e| e.to_string())?;
    let rows = tx
        .query(
            "SELECT id, task_id, queue, dedupe_id, payload FROM switchyard_outbox \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&BATCH],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
    for row in &rows {
        let msg = Outgoing {
            id: row.get(1),
            queue: row.get(2),
            dedupe_id: row.get(3),
            payload: row.get(4),
            not_before: None,
        };
        // A publish that fails rolls the pass back: the rows wait for the next one.
        broker.publish(msg).await.map_err(|e| e.to_string())?;
        ids.push(row.get(0));
    }
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute("DELETE FROM switchyard_outbox WHERE id = ANY($1)", &[&ids])
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(ids.len())
}
