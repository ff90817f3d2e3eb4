//! The session shard actors and the router that picks one by session id.
//!
//! Each [`SessionShard`] owns the writes to the sessions whose id hashes to it: at most
//! [`MAX_IN_FLIGHT`] group writes are in flight and never two writes to one id, so two writes to
//! one id on one node never interleave, and the engine's version check settles writes from other nodes.
//! Loads are answered concurrently. Handlers never block: engine I/O is awaited in futures.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use actix::prelude::*;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::handle::serialized_size;
use super::{
    now_unix, Change, Record, SaveItem, SaveOutcome, SessionError, SessionId, SessionKey,
    SessionStore, StoreError,
};

/// How many times a write is re-applied after losing a race before giving up.
const MAX_SAVE_ATTEMPTS: u32 = 32;

/// Most saves one group write carries.
pub const MAX_BATCH: usize = 64;

/// Group writes one shard has in flight at once. Two let a shard hand its next batch to the
/// engine while the previous one is written: the `postgres` engine gathers batches from every
/// shard into one statement, and measured (64 savers, 8 shards) one in flight per shard left
/// its statements half full (16 rows against 20, 29,400 saves/s against 36,600). Two writes
/// to one id are still never in flight together.
pub const MAX_IN_FLIGHT: usize = 2;

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

/// Delete a session, in order with the writes to it.
#[derive(Message)]
#[rtype(result = "Result<(), SessionError>")]
pub struct DeleteSession {
    pub key: SessionKey,
}

/// One shard: a mailbox in front of the engine for the sessions that hash to it.
///
/// Saves and deletes queue up while writes are in flight; the next write takes every queued
/// save (distinct keys, at most [`MAX_BATCH`]) to the engine at once with
/// [`SessionStore::save_batch`] — a group commit on engines that support it — and the queued
/// deletes of other keys beside it. Operations on one key run one at a time in arrival order,
/// so a delete (a revoke, a logout) never overtakes or interleaves with a write of the same
/// session. Each request is answered only after its own data is stored; a save that lost its
/// version check is re-applied to the fresh data and queued again.
pub struct SessionShard {
    store: Arc<dyn SessionStore>,
    queue: VecDeque<Pending>,
    /// Group writes in flight (at most [`MAX_IN_FLIGHT`]).
    in_flight: usize,
    /// The keys those writes carry: an operation on one of them waits for the next write.
    busy: HashSet<SessionKey>,
}

/// A queued operation.
enum Pending {
    Save(PendingSave),
    Delete(PendingDelete),
}

impl Pending {
    fn key(&self) -> &SessionKey {
        match self {
            Pending::Save(p) => &p.key,
            Pending::Delete(d) => &d.key,
        }
    }
}

/// A delete waiting for its turn.
struct PendingDelete {
    key: SessionKey,
    reply: oneshot::Sender<Result<(), SessionError>>,
}

/// A save waiting for (or in) a group write.
struct PendingSave {
    id: SessionId,
    key: SessionKey,
    expected: Option<u64>,
    data: Map<String, Value>,
    changes: Vec<Change>,
    expires_at: i64,
    max_size: usize,
    delete_after: Option<SessionId>,
    attempts: u32,
    reply: oneshot::Sender<Result<Saved, SessionError>>,
}

impl SessionShard {
    /// A shard writing to `store`.
    pub fn new(store: Arc<dyn SessionStore>) -> Self {
        Self {
            store,
            queue: VecDeque::new(),
            in_flight: 0,
            busy: HashSet::new(),
        }
    }

    /// Takes the next batch from the queue: distinct keys, in arrival order, at most
    /// [`MAX_BATCH`] saves, and the deletes of other keys; sessions over `max_size` are
    /// answered at once.
    fn next_batch(&mut self) -> Batch {
        let mut batch = Vec::new();
        let mut deletes = Vec::new();
        let mut keys = HashSet::new();
        let mut rest = VecDeque::with_capacity(self.queue.len());
        let now = now_unix();
        while let Some(p) = self.queue.pop_front() {
            if batch.len() >= MAX_BATCH || keys.contains(p.key()) || self.busy.contains(p.key()) {
                // Whatever follows on this key waits too: it is in `keys` or `busy`.
                keys.insert(p.key().clone());
                rest.push_back(p);
                continue;
            }
            let p = match p {
                Pending::Delete(d) => {
                    keys.insert(d.key.clone());
                    deletes.push(d);
                    continue;
                }
                Pending::Save(p) => p,
            };
            if let Err(e) = check_size(&p.data, p.max_size) {
                let _ = p.reply.send(Err(e));
                continue;
            }
            keys.insert(p.key.clone());
            let item = SaveItem {
                id: p.id.clone(),
                record: next_record(p.data.clone(), p.expires_at, p.expected, now),
                expected: p.expected,
            };
            batch.push((p, item));
        }
        self.queue = rest;
        Batch {
            saves: batch,
            deletes,
        }
    }

    /// Starts group writes while fewer than [`MAX_IN_FLIGHT`] are in flight and saves wait.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < MAX_IN_FLIGHT {
            let batch = self.next_batch();
            if batch.saves.is_empty() && batch.deletes.is_empty() {
                return;
            }
            let ids: Vec<SessionKey> = batch
                .saves
                .iter()
                .map(|(p, _)| p.key.clone())
                .chain(batch.deletes.iter().map(|d| d.key.clone()))
                .collect();
            self.busy.extend(ids.iter().cloned());
            self.in_flight += 1;
            let store = self.store.clone();
            ctx.spawn(
                write_batch(store, batch)
                    .into_actor(self)
                    .map(move |retry, act, ctx| {
                        act.in_flight -= 1;
                        for id in &ids {
                            act.busy.remove(id);
                        }
                        for p in retry.into_iter().rev() {
                            act.queue.push_front(Pending::Save(p));
                        }
                        act.flush(ctx);
                    }),
            );
        }
    }
}

impl Actor for SessionShard {
    type Context = Context<Self>;
}

impl Supervised for SessionShard {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(engine = self.store.engine(), "session shard restarting");
        self.queue.clear();
        self.in_flight = 0;
        self.busy.clear();
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
    type Result = ResponseFuture<Result<Saved, SessionError>>;

    fn handle(&mut self, msg: SaveSession, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        let (id, expected) = match msg.id {
            Some(id) => (id, msg.base_version),
            None => (SessionId::generate(), None),
        };
        let key = self.store.key(&id);
        self.queue.push_back(Pending::Save(PendingSave {
            id,
            key,
            expected,
            data: msg.data,
            changes: msg.changes,
            expires_at: msg.expires_at,
            max_size: msg.max_size,
            delete_after: msg.delete_after,
            attempts: 0,
            reply,
        }));
        self.flush(ctx);
        Box::pin(async move {
            answer.await.map_err(|_| {
                SessionError::Mailbox("the session shard stopped before the write finished".into())
            })?
        })
    }
}

impl Handler<DeleteSession> for SessionShard {
    type Result = ResponseFuture<Result<(), SessionError>>;

    fn handle(&mut self, msg: DeleteSession, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.queue.push_back(Pending::Delete(PendingDelete {
            key: msg.key,
            reply,
        }));
        self.flush(ctx);
        Box::pin(async move {
            answer.await.map_err(|_| {
                SessionError::Mailbox("the session shard stopped before the delete finished".into())
            })?
        })
    }
}

/// The record a write stores: the version after `expected` (1 for a new session).
fn next_record(
    data: Map<String, Value>,
    expires_at: i64,
    expected: Option<u64>,
    now: i64,
) -> Record {
    Record {
        data,
        expires_at,
        version: expected.map_or(1, |v| v + 1),
        updated_at: now,
    }
}

fn check_size(data: &Map<String, Value>, max: usize) -> Result<(), SessionError> {
    let size = serialized_size(data).map_err(|e| SessionError::Value {
        key: "*".into(),
        message: e.to_string(),
    })?;
    if size > max {
        return Err(SessionError::TooLarge { size, max });
    }
    Ok(())
}

/// What one group write carries.
struct Batch {
    saves: Vec<(PendingSave, SaveItem)>,
    deletes: Vec<PendingDelete>,
}

/// One group write: the deletes, and every save in one `save_batch`; then each saved request
/// is answered (after deleting the id it cycled away from), and each that lost its version
/// check gets the fresh data with its changes re-applied and comes back to be queued again.
async fn write_batch(store: Arc<dyn SessionStore>, batch: Batch) -> Vec<PendingSave> {
    let Batch {
        saves: batch,
        deletes,
    } = batch;
    let items: Vec<SaveItem> = batch.iter().map(|(_, item)| item.clone()).collect();
    let deleting = futures_util::future::join_all(deletes.into_iter().map(|d| {
        let store = store.clone();
        async move {
            let result = store.delete(&d.key).await.map_err(SessionError::from);
            let _ = d.reply.send(result);
        }
    }));
    let saving = async {
        if items.is_empty() {
            Vec::new()
        } else {
            store.save_batch(&items).await
        }
    };
    let (outcomes, _) = futures_util::future::join(saving, deleting).await;
    let mut saved = Vec::new();
    let mut conflicts = Vec::new();
    let mut outcomes = outcomes.into_iter();
    for (p, item) in batch {
        match outcomes.next() {
            Some(Ok(SaveOutcome::Saved)) => saved.push((p, item.record.version)),
            Some(Ok(SaveOutcome::Conflict)) => conflicts.push(p),
            Some(Err(e)) => {
                let _ = p.reply.send(Err(e.into()));
            }
            None => {
                let _ = p.reply.send(Err(SessionError::Store(StoreError::Other {
                    engine: store.engine(),
                    message: "the engine answered fewer writes than it was given".into(),
                })));
            }
        }
    }
    let finish = saved.into_iter().map(|(p, version)| {
        let store = store.clone();
        async move {
            let result = match p.delete_after.as_ref().filter(|old| **old != p.id) {
                Some(old) => store
                    .delete(&store.key(old))
                    .await
                    .map_err(SessionError::from),
                None => Ok(()),
            };
            let _ = p.reply.send(result.map(|()| Saved { id: p.id, version }));
        }
    });
    let reapply = conflicts.into_iter().map(|p| {
        let store = store.clone();
        async move { reapply(store.as_ref(), p).await }
    });
    let (_, retry) = futures_util::future::join(
        futures_util::future::join_all(finish),
        futures_util::future::join_all(reapply),
    )
    .await;
    retry.into_iter().flatten().collect()
}

/// A save that lost a race: re-applies its changes to the fresh data (or answers it when it
/// cannot go on).
async fn reapply(store: &dyn SessionStore, mut p: PendingSave) -> Option<PendingSave> {
    p.attempts += 1;
    if p.attempts >= MAX_SAVE_ATTEMPTS {
        let _ = p.reply.send(Err(SessionError::Contention {
            id: p.id.to_string(),
            attempts: p.attempts,
        }));
        return None;
    }
    // Never a whole session id in a log: its first 8 characters tell sessions apart.
    let session = p.id.as_str().get(..8).unwrap_or_default();
    tracing::debug!(%session, attempt = p.attempts, "session write conflict, re-applying");
    let fresh = match store.load(&p.id).await {
        Ok(fresh) => fresh,
        Err(e) => {
            let _ = p.reply.send(Err(e.into()));
            return None;
        }
    };
    let (mut data, version) = match fresh {
        Some(r) => (r.data, Some(r.version)),
        // The session ended meanwhile (logout elsewhere, expiry): start it anew from the
        // request's changes alone rather than resurrecting old data.
        None => (Map::new(), None),
    };
    if let Err(message) = Change::apply_all(&p.changes, &mut data) {
        let _ = p.reply.send(Err(SessionError::Value {
            key: "*".into(),
            message,
        }));
        return None;
    }
    p.data = data;
    p.expected = version;
    Some(p)
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

    fn shard(&self, key: &SessionKey) -> &Addr<SessionShard> {
        &self.shards[(key.shard_hash() % self.shards.len() as u64) as usize]
    }

    /// The key the engine stores session `id` under.
    pub fn key(&self, id: &SessionId) -> SessionKey {
        self.store.key(id)
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
        self.shard(&self.store.key(id))
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
        if self.store.saves_now() {
            if let Some(saved) = self.save_now(&id, &mut msg).await? {
                return Ok(saved);
            }
        }
        self.shard(&self.store.key(&id))
            .send(msg)
            .await
            .map_err(mailbox)?
    }

    /// In-process engines: the write at once, without the shard's mailbox, when its version
    /// check passes (the engine's compare-and-swap is atomic in memory). `None`: it lost the
    /// check, and the shard re-applies the request's changes to the fresh data.
    async fn save_now(
        &self,
        id: &SessionId,
        msg: &mut SaveSession,
    ) -> Result<Option<Saved>, SessionError> {
        check_size(&msg.data, msg.max_size)?;
        let mut record = next_record(
            std::mem::take(&mut msg.data),
            msg.expires_at,
            msg.base_version,
            now_unix(),
        );
        let version = record.version;
        match self.store.save_now(id, &mut record, msg.base_version) {
            Some(Ok(SaveOutcome::Saved)) => {
                if let Some(old) = msg.delete_after.as_ref().filter(|old| *old != id) {
                    self.delete(old).await?;
                }
                Ok(Some(Saved {
                    id: id.clone(),
                    version,
                }))
            }
            Some(Err(e)) => Err(e.into()),
            Some(Ok(SaveOutcome::Conflict)) | None => {
                msg.data = record.data;
                Ok(None)
            }
        }
    }

    /// Deletes a session, through the shard that owns it.
    pub async fn delete(&self, id: &SessionId) -> Result<(), SessionError> {
        self.delete_key(self.store.key(id)).await
    }

    /// Deletes the session stored under `key` (as the user index gives it), through the
    /// shard that owns it.
    pub async fn delete_key(&self, key: SessionKey) -> Result<(), SessionError> {
        self.shard(&key)
            .send(DeleteSession { key })
            .await
            .map_err(mailbox)?
    }

    /// Loads the session stored under `key` (as the user index gives it).
    pub async fn load_key(&self, key: &SessionKey) -> Result<Option<Record>, SessionError> {
        Ok(self.store.load_key(key).await?)
    }

    /// The keys of the live sessions of `user`.
    pub async fn sessions_of(&self, user: &str) -> Result<Vec<SessionKey>, SessionError> {
        Ok(self.store.sessions_of(user).await?)
    }

    /// Ends every session of `user` except `keep`; returns how many ended.
    pub async fn revoke_user(
        &self,
        user: &str,
        keep: Option<&SessionId>,
    ) -> Result<u64, SessionError> {
        let keep = keep.map(|id| self.store.key(id));
        let mut n = 0;
        for key in self.store.sessions_of(user).await? {
            if Some(&key) != keep.as_ref() {
                self.delete_key(key).await?;
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

    /// A revoke racing a save of the same session, many times: whichever goes first, the
    /// revoked user's data never comes back (the delete is ordered with the write by the
    /// shard; a save after it writes only its own changes).
    async fn revoke_races_save(store: Arc<dyn SessionStore>) {
        let arbiter = Arbiter::new();
        let shards = SessionShards::start(2, store, &arbiter.handle());
        let owned = |n: i64| {
            json!({"_auth_user": "bob", "n": n})
                .as_object()
                .cloned()
                .expect("obj")
        };
        for round in 0..200 {
            let first = shards
                .save(SaveSession {
                    changes: vec![],
                    ..save_msg(None, None, owned(1))
                })
                .await
                .expect("create");
            let save = shards.save(SaveSession {
                changes: vec![Change::Set("n".into(), json!(2))],
                ..save_msg(Some(first.id.clone()), Some(first.version), owned(2))
            });
            let revoke = shards.revoke_user("bob", None);
            let (saved, revoked) = futures_util::future::join(save, revoke).await;
            saved.expect("save");
            revoked.expect("revoke");
            let after = shards.load(&first.id).await.expect("load");
            assert!(
                after.as_ref().is_none_or(|r| r.user().is_none()),
                "round {round}: the revoked session came back: {after:?}"
            );
        }
        arbiter.stop();
    }

    #[actix_rt::test]
    async fn revoke_racing_save_never_resurrects_memory() {
        revoke_races_save(Arc::new(MemoryStore::new())).await;
    }

    #[actix_rt::test]
    async fn revoke_racing_save_never_resurrects_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::session::FileStore::open(dir.path()).expect("file store");
        revoke_races_save(Arc::new(store)).await;
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
