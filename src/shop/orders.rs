//! Orders: what checkout creates, behind the [`OrderStore`] trait (in memory now; a Postgres
//! store lets a worker on another node read them).

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
