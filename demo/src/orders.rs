//! Orders: what checkout creates, behind the [`OrderStore`] trait: in this process's memory,
//! or in Postgres (table `switchyard_orders`) when the task queues are shared through NATS
//! (`tasks.broker = "nats"`), so that a worker on another node can read them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchyard::db::QUERY_TIMEOUT;
use switchyard::tasks::{ClientError, Outgoing};

/// One line of an order, priced when it was placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub product_id: u32,
    pub name: String,
    pub quantity: u32,
    /// Unit price in cents.
    pub price_cents: u64,
}

/// An order as checkout creates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOrder {
    /// The username of who placed it.
    pub owner: String,
    pub items: Vec<OrderItem>,
    pub total_cents: u64,
    /// The confirmation e-mail task.
    pub task_id: Option<String>,
}

/// A stored order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: u64,
    pub owner: String,
    pub items: Vec<OrderItem>,
    pub total_cents: u64,
    pub task_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Why an order operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The store's service is unreachable.
    #[error("order store unavailable: {0}")]
    Unavailable(String),
}

/// Where orders live.
#[async_trait]
pub trait OrderStore: Send + Sync + 'static {
    /// Stores a new order under the next integer id.
    async fn create(&self, order: NewOrder) -> Result<Order, OrderError>;
    /// The order `id`, if it exists.
    async fn get(&self, id: u64) -> Result<Option<Order>, OrderError>;
    /// Deletes order `id` (checkout undoes an order whose task could not be published).
    async fn delete(&self, id: u64) -> Result<(), OrderError>;
    /// Stores a new order and, in the same transaction, the task `task` makes for its id
    /// (`tasks.outbox = "postgres"`: published if and only if the order commits). `None`:
    /// this store has no transactions (the caller publishes after `create`).
    async fn create_with_task(
        &self,
        order: NewOrder,
        task: &(dyn Fn(u64) -> Result<Outgoing, ClientError> + Sync),
    ) -> Option<Result<Order, OrderError>> {
        let _ = (order, task);
        None
    }
}

/// Orders in this process's memory (`default.toml`).
#[derive(Default)]
pub struct MemoryOrderStore {
    orders: Mutex<(u64, BTreeMap<u64, Order>)>,
}

impl MemoryOrderStore {
    /// An empty store; ids start at 1.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl OrderStore for MemoryOrderStore {
    async fn create(&self, order: NewOrder) -> Result<Order, OrderError> {
        let mut guard = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        let (last, orders) = &mut *guard;
        *last += 1;
        let stored = Order {
            id: *last,
            owner: order.owner,
            items: order.items,
            total_cents: order.total_cents,
            task_id: order.task_id,
            created_at: Utc::now(),
        };
        orders.insert(stored.id, stored.clone());
        Ok(stored)
    }

    async fn get(&self, id: u64) -> Result<Option<Order>, OrderError> {
        let guard = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        Ok(guard.1.get(&id).cloned())
    }

    async fn delete(&self, id: u64) -> Result<(), OrderError> {
        let mut guard = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        guard.1.remove(&id);
        Ok(())
    }
}

/// Orders in Postgres (`postgres.url`), table `switchyard_orders`; the pool is opened (and the
/// table created) on first use, so installing the shop stays synchronous.
pub struct PgOrderStore {
    url: String,
    pool_size: u32,
    pool: tokio::sync::OnceCell<switchyard::db::PgPool>,
}

const ORDERS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS switchyard_orders (
    id          bigserial PRIMARY KEY,
    owner       text      NOT NULL,
    items       text      NOT NULL,
    total_cents bigint    NOT NULL,
    task_id     text,
    created_ms  bigint    NOT NULL
)";

fn pg(e: impl std::fmt::Display) -> OrderError {
    OrderError::Unavailable(e.to_string())
}

/// Runs one order operation (checkout and statement), failing it as unavailable after
/// [`QUERY_TIMEOUT`], as the framework's own Postgres calls are.
async fn bounded<T>(
    op: impl std::future::Future<Output = Result<T, OrderError>>,
) -> Result<T, OrderError> {
    tokio::time::timeout(QUERY_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            Err(OrderError::Unavailable(format!(
                "no answer from the database within {QUERY_TIMEOUT:?}"
            )))
        })
}

/// Inserts `order` through `client` (a connection or a transaction).
async fn insert_order(
    client: &impl tokio_postgres::GenericClient,
    order: NewOrder,
) -> Result<Order, OrderError> {
    let items = serde_json::to_string(&order.items).map_err(pg)?;
    let now = Utc::now();
    let row = client
        .query_one(
            "INSERT INTO switchyard_orders (owner, items, total_cents, task_id, created_ms) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[
                &order.owner,
                &items,
                &(order.total_cents as i64),
                &order.task_id,
                &now.timestamp_millis(),
            ],
        )
        .await
        .map_err(pg)?;
    let id: i64 = row.get(0);
    Ok(Order {
        id: id as u64,
        owner: order.owner,
        items: order.items,
        total_cents: order.total_cents,
        task_id: order.task_id,
        created_at: now,
    })
}

impl PgOrderStore {
    /// A store on `url` with a pool of `pool_size` connections (opened on first use).
    pub fn new(url: &str, pool_size: u32) -> Self {
        Self {
            url: url.to_owned(),
            pool_size,
            pool: tokio::sync::OnceCell::new(),
        }
    }

    async fn pool(&self) -> Result<&switchyard::db::PgPool, OrderError> {
        self.pool
            .get_or_try_init(|| async {
                let pool = switchyard::db::connect_pool(&self.url, self.pool_size)
                    .await
                    .map_err(pg)?;
                {
                    let conn = pool.get().await.map_err(pg)?;
                    conn.batch_execute(ORDERS_SCHEMA).await.map_err(pg)?;
                    switchyard::outbox::install(&**conn).await.map_err(pg)?;
                }
                Ok(pool)
            })
            .await
    }
}

#[async_trait]
impl OrderStore for PgOrderStore {
    async fn create(&self, order: NewOrder) -> Result<Order, OrderError> {
        let pool = self.pool().await?;
        bounded(async {
            let conn = pool.get().await.map_err(pg)?;
            insert_order(&**conn, order).await
        })
        .await
    }

    async fn create_with_task(
        &self,
        order: NewOrder,
        task: &(dyn Fn(u64) -> Result<Outgoing, ClientError> + Sync),
    ) -> Option<Result<Order, OrderError>> {
        let created = async {
            let pool = self.pool().await?;
            bounded(async {
                let mut conn = pool.get().await.map_err(pg)?;
                let tx = conn.transaction().await.map_err(pg)?;
                let order = insert_order(&tx, order).await?;
                let msg = task(order.id).map_err(pg)?;
                switchyard::outbox::insert(&tx, &msg).await.map_err(pg)?;
                switchyard::outbox::commit(tx).await.map_err(pg)?;
                Ok(order)
            })
            .await
        };
        Some(created.await)
    }

    async fn get(&self, id: u64) -> Result<Option<Order>, OrderError> {
        let Ok(key) = i64::try_from(id) else {
            return Ok(None);
        };
        let pool = self.pool().await?;
        bounded(async {
            let conn = pool.get().await.map_err(pg)?;
            let row = conn
                .query_opt(
                    "SELECT owner, items, total_cents, task_id, created_ms FROM switchyard_orders \
                 WHERE id = $1",
                    &[&key],
                )
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let items: String = row.get(1);
            let total: i64 = row.get(2);
            let created: i64 = row.get(4);
            Ok(Some(Order {
                id,
                owner: row.get(0),
                items: serde_json::from_str(&items).map_err(pg)?,
                total_cents: total.max(0) as u64,
                task_id: row.get(3),
                created_at: DateTime::from_timestamp_millis(created).unwrap_or_default(),
            }))
        })
        .await
    }

    async fn delete(&self, id: u64) -> Result<(), OrderError> {
        let Ok(key) = i64::try_from(id) else {
            return Ok(());
        };
        let pool = self.pool().await?;
        bounded(async {
            let conn = pool.get().await.map_err(pg)?;
            conn.execute("DELETE FROM switchyard_orders WHERE id = $1", &[&key])
                .await
                .map_err(pg)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ids_are_sequential_integers() {
        let store = MemoryOrderStore::new();
        let new = || NewOrder {
            owner: "alice".into(),
            items: vec![],
            total_cents: 0,
            task_id: None,
        };
        let a = store.create(new()).await.expect("create");
        let b = store.create(new()).await.expect("create");
        assert_eq!((a.id, b.id), (1, 2));
        store.delete(1).await.expect("delete");
        assert_eq!(store.get(1).await.expect("get"), None);
        assert_eq!(
            store.get(2).await.expect("get").map(|o| o.owner),
            Some("alice".into())
        );
    }
}
