//! The Postgres user store (`auth.store = "postgres"`): table `switchyard_users`, created when
//! missing, and a snapshot of it in memory for the per-request user lookup.
//!
//! Logins always read the password hash from the database, so a new user or a changed password
//! takes effect at once on every node; the snapshot (names and permissions, for requests of
//! users already logged in) is refreshed every [`REFRESH_EVERY`] and on each login.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHasher};
use switchyard_actors::session::{
    bounded, migrate, now_unix, pg_error, pool_error, PgPool, StoreError,
};

const ENGINE: &str = "auth";

/// How often the snapshot is reloaded.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS switchyard_users (
    username       text    PRIMARY KEY,
    password_hash  text    NOT NULL,
    permissions    text[]  NOT NULL DEFAULT '{}',
    created_at     bigint  NOT NULL,
    updated_at     bigint  NOT NULL
);
ALTER TABLE switchyard_users ADD COLUMN IF NOT EXISTS staff boolean NOT NULL DEFAULT false;
";

/// A user as the stores keep it (`[[auth.users]]` or the `switchyard_users` table).
#[derive(Clone)]
pub(crate) struct StoredUser {
    pub(crate) password_hash: String,
    pub(crate) permissions: Vec<String>,
    /// May open the operator dashboard.
    pub(crate) staff: bool,
}

/// Why a user command failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `create` of a name that exists.
    #[error("user {0:?} already exists")]
    Exists(String),
    /// A name that does not exist.
    #[error("no user {0:?}")]
    Unknown(String),
    /// An empty name or password, say.
    #[error("{0}")]
    Invalid(String),
}

/// Users in Postgres, with an in-memory snapshot.
pub struct PgUsers {
    pool: PgPool,
    snapshot: RwLock<Arc<HashMap<String, StoredUser>>>,
}

/// Hashes `password` with argon2id on the blocking pool: hashing takes tens of milliseconds of
/// CPU and must not hold an HTTP worker or an actor's thread.
pub async fn hash_password_off_thread(password: &str) -> Result<String, UserError> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| UserError::Invalid(format!("cannot hash the password: {e}")))?
}

/// Hashes `password` with argon2id (default parameters, random salt), on this thread.
pub fn hash_password(password: &str) -> Result<String, UserError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Invalid(format!("cannot hash the password: {e}")))
}

impl PgUsers {
    /// The store over `pool`, creating its table when missing and loading the snapshot.
    pub async fn open(pool: PgPool) -> Result<Arc<Self>, StoreError> {
        migrate(&pool, ENGINE, SCHEMA).await?;
        let users = Arc::new(Self {
            pool,
            snapshot: RwLock::new(Arc::new(HashMap::new())),
        });
        users.refresh().await?;
        Ok(users)
    }

    /// Reloads the snapshot.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let rows = bounded(ENGINE, async {
            let conn = self.pool.get().await.map_err(|e| pool_error(ENGINE, e))?;
            conn.query(
                "SELECT username, password_hash, permissions, staff FROM switchyard_users",
                &[],
            )
            .await
            .map_err(|e| pg_error(ENGINE, e))
        })
        .await?;
        let map = rows
            .iter()
            .filter_map(|r| {
                Some((
                    r.try_get::<_, String>(0).ok()?,
                    StoredUser {
                        password_hash: r.try_get(1).ok()?,
                        permissions: r.try_get(2).ok()?,
                        staff: r.try_get(3).ok()?,
                    },
                ))
            })
            .collect();
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        Ok(())
    }

    /// Reloads the snapshot every [`REFRESH_EVERY`] while `self` lives.
    pub fn keep_fresh(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        actix_rt::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH_EVERY).await;
                let Some(users) = weak.upgrade() else { break };
                if let Err(e) = users.refresh().await {
                    tracing::warn!("cannot refresh the user snapshot: {e}");
                }
            }
        });
    }

    /// A user from the snapshot.
    pub(crate) fn get(&self, username: &str) -> Option<StoredUser> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(username)
            .cloned()
    }

    /// A user read from the database now (and put in the snapshot).
    pub(crate) async fn fetch(&self, username: &str) -> Result<Option<StoredUser>, StoreError> {
        let row = bounded(ENGINE, async {
            let conn = self.pool.get().await.map_err(|e| pool_error(ENGINE, e))?;
            conn.query_opt(
                "SELECT password_hash, permissions, staff FROM switchyard_users \
                 WHERE username = $1",
                &[&username],
            )
            .await
            .map_err(|e| pg_error(ENGINE, e))
        })
        .await?;
        let user = row.and_then(|r| {
            Some(StoredUser {
                password_hash: r.try_get(0).ok()?,
                permissions: r.try_get(1).ok()?,
                staff: r.try_get(2).ok()?,
            })
        });
        let mut snap = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        let mut map = HashMap::clone(&snap);
        match &user {
            Some(u) => map.insert(username.to_owned(), u.clone()),
            None => map.remove(username),
        };
        *snap = Arc::new(map);
        Ok(user)
    }

    /// Creates a user (not staff).
    pub async fn create(
        &self,
        username: &str,
        password: &str,
        permissions: &[String],
    ) -> Result<(), UserError> {
        self.create_user(username, password, permissions, false)
            .await
    }

    /// Creates a user; `staff` users may open the operator dashboard.
    pub async fn create_user(
        &self,
        username: &str,
        password: &str,
        permissions: &[String],
        staff: bool,
    ) -> Result<(), UserError> {
        if username.is_empty() || password.is_empty() {
            return Err(UserError::Invalid(
                "the user name and the password must not be empty".into(),
            ));
        }
        let hash = hash_password_off_thread(password).await?;
        let now = now_unix();
        let n = bounded(ENGINE, async {
            let conn = self.pool.get().await.map_err(|e| pool_error(ENGINE, e))?;
            conn.execute(
                "INSERT INTO switchyard_users (username, password_hash, permissions, staff, \
                 created_at, updated_at) VALUES ($1, $2, $3, $5, $4, $4) \
                 ON CONFLICT (username) DO NOTHING",
                &[&username, &hash, &permissions, &now, &staff],
            )
            .await
            .map_err(|e| pg_error(ENGINE, e))
        })
        .await?;
        if n == 0 {
            return Err(UserError::Exists(username.to_owned()));
        }
        Ok(())
    }

    /// Replaces a user's password.
    pub async fn set_password(&self, username: &str, password: &str) -> Result<(), UserError> {
        if password.is_empty() {
            return Err(UserError::Invalid("the password must not be empty".into()));
        }
        let hash = hash_password_off_thread(password).await?;
        let n = bounded(ENGINE, async {
            let conn = self.pool.get().await.map_err(|e| pool_error(ENGINE, e))?;
            conn.execute(
                "UPDATE switchyard_users SET password_hash = $2, updated_at = $3 \
                 WHERE username = $1",
                &[&username, &hash, &now_unix()],
            )
            .await
            .map_err(|e| pg_error(ENGINE, e))
        })
        .await?;
        if n == 0 {
            return Err(UserError::Unknown(username.to_owned()));
        }
        Ok(())
    }
}
