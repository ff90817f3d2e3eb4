//! The session shard actors and the router that picks one by session id.
//!
//! Each [`SessionShard`] owns the writes to the sessions whose id hashes to it: it handles one
//! [`SaveSession`] at a time (an atomic response), so two writes to one id on one node never
//! interleave, and the engine's version check settles writes from other nodes. Loads are
//! answered concurrently. Handlers never block: engine I/O is awaited in the response future.

use std::sync::Arc;

use actix::prelude::*;
use serde_json::{Map, Value};

use super::{now_unix, Change, Record, SaveOutcome, SessionError, SessionId, SessionStore};

/// How many times a write is re-applied after losing a race before giving up.
const MAX_SAVE_ATTEMPTS: u32 = 32;

/// Load the live record of a session.
#[derive(Message)]
#[rtype(result = "Result<Option<Record>, SessionError>")]
pub struct LoadSession {
    pub id: SessionId,
}

/// Write a session: the handler's final data, and the changes that produced it from
/// `base_version` so they can be re-applied if another write got there first.
#[derive(Message)]
#[rtype(result = "Result<Saved, SessionError>")]
pub struct SaveSession {
    /// The session's id; `None` for a session never stored, which gets a fresh id.
    pub id: Option<SessionId>,
    /// The version the request loaded (`None`: it loaded nothing).
    pub base_version: Option<u64>,
    /// The data as the request left it.
    pub data: Map<String, Value>,
    /// The changes the request made, in order.
    pub changes: Vec<Change>,
    /// UNIX seconds the session expires at.
    pub expires_at: i64,
    /// `sessions.max_size`: larger serialized data is refused.
    pub max_size: usize,
    /// An old id to delete once the data is stored under the new one (`cycle_key`).
    pub delete_after: Option<SessionId>,
}

/// A session written.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub id: SessionId,
    pub version: u64,
}

/// Delete a session.
#[derive(Message)]
#[rtype(result = "Result<(), SessionError>")]
pub struct DeleteSession {
    pub id: SessionId,
}

/// One shard: a mailbox in front of the engine for the sessions that hash to it.
pub struct SessionShard {
    store: Arc<dyn SessionStore>,
}

impl SessionShard {
    /// A shard writing to `store`.
    pub fn new(store: Arc<dyn SessionStore>) -> Self {
        Self { store }
    }
}

impl Actor for SessionShard {
    type Context = Context<Self>;
}

impl Supervised for SessionShard {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(engine = self.store.engine(), "session shard restarting");
    }
}

impl Handler<LoadSession> for SessionShard {
    type Result = ResponseFuture<Result<Option<Record>, SessionError>>;

    fn handle(&mut self, msg: LoadSession, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move { Ok(store.load(&msg.id).await?) })
    }
}

impl Handler<SaveSession> for SessionShard {
    type Result = AtomicResponse<Self, Result<Saved, SessionError>>;

    fn handle(&mut self, msg: SaveSession, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        AtomicResponse::new(Box::pin(save(store, msg).into_actor(self)))
    }
}

impl Handler<DeleteSession> for SessionShard {
    type Result = ResponseFuture<Result<(), SessionError>>;

    fn handle(&mut self, msg: DeleteSession, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move { Ok(store.delete(&msg.id).await?) })
    }
}

fn check_size(data: &Map<String, Value>, max: usize) -> Result<(), SessionError> {
    let size = serde_json::to_vec(data)
        .map_err(|e| SessionError::Value {
            key: "*".into(),
            message: e.to_string(),
        })?
        .len();
    if size > max {
        return Err(SessionError::TooLarge { size, max });
    }
    Ok(())
}

/// The compare-and-swap loop: write the request's data if nothing changed since it loaded;
/// otherwise re-apply its changes to the fresh data and try again.
async fn save(store: Arc<dyn SessionStore>, msg: SaveSession) -> Result<Saved, SessionError> {
    let SaveSession {
        id,
        base_version,
        mut data,
        changes,
        expires_at,
        max_size,
        delete_after,
    } = msg;
    let (id, mut expected) = match id {
        Some(id) => (id, base_version),
        None => (SessionId::generate(), None),
    };
    for attempt in 1..=MAX_SAVE_ATTEMPTS {
        check_size(&data, max_size)?;
        let record = Record {
            data,
            expires_at,
            version: expected.map_or(1, |v| v + 1),
            updated_at: now_unix(),
        };
        match store.save(&id, &record, expected).await? {
            SaveOutcome::Saved => {
                if let Some(old) = delete_after.filter(|old| *old != id) {
                    store.delete(&old).await?;
                }
                return Ok(Saved {
                    id,
                    version: record.version,
                });
            }
            SaveOutcome::Conflict => {
                let fresh = store.load(&id).await?;
                tracing::debug!(session = %id, attempt, "session write conflict, re-applying");
                let (base, version) = match fresh {
                    Some(r) => (r.data, Some(r.version)),
                    // The session ended meanwhile (logout elsewhere, expiry): start it anew
                    // from the request's changes alone rather than resurrecting old data.
                    None => (Map::new(), None),
                };
                data = base;
                Change::apply_all(&changes, &mut data).map_err(|message| SessionError::Value {
                    key: "*".into(),
                    message,
                })?;
                expected = version;
            }
        }
    }
    Err(SessionError::Contention {
        id: id.to_string(),
        attempts: MAX_SAVE_ATTEMPTS,
    })
}

/// The shards of one node and the store behind them.
#[derive(Clone)]
pub struct SessionShards {
    shards: Arc<[Addr<SessionShard>]>,
    store: Arc<dyn SessionStore>,
}

fn mailbox(e: MailboxError) -> SessionError {
    SessionError::Mailbox(e.to_string())
}

impl SessionShards {
    /// Starts `count` supervised shards on `arbiter`, all writing to `store`.
    pub fn start(count: usize, store: Arc<dyn SessionStore>, arbiter: &ArbiterHandle) -> Self {
        let shards: Vec<_> = (0..count.max(1))
            .map(|_| {
                let store = store.clone();
                Supervisor::start_in_arbiter(arbiter, move |_| SessionShard::new(store))
            })
            .collect();
        Self {
            shards: shards.into(),
            store,
        }
    }

    fn shard(&self, id: &SessionId) -> &Addr<SessionShard> {
        &self.shards[(id.shard_hash() % self.shards.len() as u64) as usize]
    }

    /// The engine's name.
    pub fn engine(&self) -> &'static str {
        self.store.engine()
    }

    /// The store behind the shards (maintenance commands use it directly).
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// Loads a session.
    pub async fn load(&self, id: &SessionId) -> Result<Option<Record>, SessionError> {
        // In-process engines answer reads at once: no mailbox round trip (a DashMap read is
        // atomic, and writes still go through the shard).
        if let Some(r) = self.store.load_now(id) {
            return Ok(r?);
        }
        self.shard(id)
            .send(LoadSession { id: id.clone() })
            .await
            .map_err(mailbox)?
    }

    /// Saves a session through the shard owning its id (a new id when `msg.id` is `None`).
    pub async fn save(&self, mut msg: SaveSession) -> Result<Saved, SessionError> {
        let id = match msg.id.take() {
            Some(id) => id,
            None => {
                // A session never stored: a fresh id, created only if it does not exist.
                msg.base_version = None;
                SessionId::generate()
            }
        };
        msg.id = Some(id.clone());
        self.shard(&id).send(msg).await.map_err(mailbox)?
    }

    /// Deletes a session.
    pub async fn delete(&self, id: &SessionId) -> Result<(), SessionError> {
        self.shard(id)
            .send(DeleteSession { id: id.clone() })
            .await
            .map_err(mailbox)?
    }

    /// The live sessions of `user`.
    pub async fn sessions_of(&self, user: &str) -> Result<Vec<SessionId>, SessionError> {
        Ok(self.store.sessions_of(user).await?)
    }

    /// Ends every session of `user` except `keep`; returns how many ended.
    pub async fn revoke_user(
        &self,
        user: &str,
        keep: Option<&SessionId>,
    ) -> Result<u64, SessionError> {
        let mut n = 0;
        for id in self.store.sessions_of(user).await? {
            if Some(&id) != keep {
                self.delete(&id).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes every expired session; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, SessionError> {
        Ok(self.store.purge_expired().await?)
    }

    /// Whether the engine answers.
    pub async fn ping(&self) -> Result<(), SessionError> {
        Ok(self.store.ping().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{MemoryStore, UpdateFn};
    use serde_json::json;

    fn counter_change() -> Change {
        let f: UpdateFn = Arc::new(|v| Ok(json!(v.and_then(Value::as_i64).unwrap_or(0) + 1)));
        Change::Update("n".into(), f)
    }

    fn save_msg(id: Option<SessionId>, base: Option<u64>, data: Map<String, Value>) -> SaveSession {
        SaveSession {
            id,
            base_version: base,
            data,
            changes: vec![counter_change()],
            expires_at: now_unix() + 60,
            max_size: 1024,
            delete_after: None,
        }
    }

    #[actix_rt::test]
    async fn concurrent_updates_from_one_base_are_all_applied() {
        let arbiter = Arbiter::new();
        let shards = SessionShards::start(4, Arc::new(MemoryStore::new()), &arbiter.handle());
        let first = shards
            .save(save_msg(
                None,
                None,
                json!({"n": 1}).as_object().cloned().expect("obj"),
            ))
            .await
            .expect("create");
        // 20 writers all read version 1 (n = 1) and each wants n + 1.
        let writes = (0..20).map(|_| {
            shards.save(save_msg(
                Some(first.id.clone()),
                Some(first.version),
                json!({"n": 2}).as_object().cloned().expect("obj"),
            ))
        });
        for r in futures_util::future::join_all(writes).await {
            r.expect("save");
        }
        let rec = shards.load(&first.id).await.expect("load").expect("exists");
        assert_eq!(rec.data["n"], json!(21));
        arbiter.stop();
    }

    #[actix_rt::test]
    async fn oversized_data_is_refused_and_old_data_kept() {
        let arbiter = Arbiter::new();
        let shards = SessionShards::start(1, Arc::new(MemoryStore::new()), &arbiter.handle());
        let saved = shards
            .save(save_msg(
                None,
                None,
                json!({"n": 1}).as_object().cloned().expect("obj"),
            ))
            .await
            .expect("create");
        let mut big = save_msg(
            Some(saved.id.clone()),
            Some(saved.version),
            json!({"blob": "x".repeat(2000)})
                .as_object()
                .cloned()
                .expect("obj"),
        );
        big.changes = vec![Change::Set("blob".into(), json!("x".repeat(2000)))];
        assert!(matches!(
            shards.save(big).await,
            Err(SessionError::TooLarge { .. })
        ));
        let rec = shards.load(&saved.id).await.expect("load").expect("exists");
        assert_eq!(rec.data["n"], json!(1));
        arbiter.stop();
    }

    #[actix_rt::test]
    async fn a_stopped_shard_gives_an_error_not_a_hang() {
        let arbiter = Arbiter::new();
        let shards = SessionShards::start(2, Arc::new(MemoryStore::new()), &arbiter.handle());
        arbiter.stop();
        let _ = arbiter.join();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            shards.delete(&SessionId::generate()),
        )
        .await
        .expect("answered, not hung");
        assert!(matches!(r, Err(SessionError::Mailbox(_))));
    }
}
