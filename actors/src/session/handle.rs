//! The session handle a request works with: typed get/insert/update over the loaded data,
//! tracking what was read and changed so the middleware saves only what it must.
//!
//! A handle is cheap to clone and `Send`, so context processors running in other actors can
//! read the session (and consume flash messages) of the request they render.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Change, SessionError, SessionId, UpdateFn, AUTH_USER_KEY};

/// The data key holding a per-session expiry (seconds; 0 = at browser close), as Django does.
pub const EXPIRY_KEY: &str = "_session_expiry";

/// When a session expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// `sessions.cookie_age` (or at browser close with `expire_at_browser_close`).
    Default,
    /// This many seconds after the last write.
    Seconds(u64),
    /// When the browser closes (the cookie has no Max-Age; the server keeps `cookie_age`).
    BrowserClose,
}

/// What a request loaded and did.
#[derive(Debug, Default)]
pub struct SessionState {
    /// The stored id, `None` while the session was never stored (or was flushed/cycled).
    pub id: Option<SessionId>,
    /// The version loaded (`None`: nothing loaded).
    pub base_version: Option<u64>,
    /// The data as it stands.
    pub data: Map<String, Value>,
    /// The changes made since loading, in order.
    pub changes: Vec<Change>,
    /// Whether the data changed.
    pub modified: bool,
    /// Whether anything read the session.
    pub accessed: bool,
    /// Whether the request came with a session cookie.
    pub had_cookie: bool,
    /// Ids to delete when the request ends (`flush`).
    pub to_delete: Vec<SessionId>,
    /// The old id to delete once the data is stored under a new one (`cycle_key`).
    pub cycled_from: Option<SessionId>,
    /// `sessions.max_size`.
    pub max_size: usize,
}

/// A request's session.
#[derive(Clone, Debug)]
pub struct Session {
    state: Arc<Mutex<SessionState>>,
}

fn value_error(key: &str, e: impl std::fmt::Display) -> SessionError {
    SessionError::Value {
        key: key.to_owned(),
        message: e.to_string(),
    }
}

impl Session {
    /// A handle over `state`.
    pub fn new(state: SessionState) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> MutexGuard<'_, SessionState> {
        let mut s = self.lock();
        s.accessed = true;
        s
    }

    /// Runs `f` on the state (the middleware's view).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut SessionState) -> R) -> R {
        f(&mut self.lock())
    }

    /// The value under `key`, deserialized as `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let s = self.read();
        s.data
            .get(key)
            .map(|v| T::deserialize(v).map_err(|e| value_error(key, e)))
            .transpose()
    }

    /// The raw JSON value under `key`.
    pub fn get_value(&self, key: &str) -> Option<Value> {
        self.read().data.get(key).cloned()
    }

    /// Whether `key` is set.
    pub fn contains(&self, key: &str) -> bool {
        self.read().data.contains_key(key)
    }

    /// Every key.
    pub fn keys(&self) -> Vec<String> {
        self.read().data.keys().cloned().collect()
    }

    /// Whether the session holds no data.
    pub fn is_empty(&self) -> bool {
        self.read().data.is_empty()
    }

    /// Applies `change` unless the result would exceed `max_size` (then nothing changes).
    ///
    /// Applied in place: only the value the change replaces is kept aside (the whole data
    /// for `Clear`) and put back when the change fails or the data grows too large.
    fn change(&self, change: Change) -> Result<(), SessionError> {
        let mut s = self.read();
        let key = change_key(&change);
        let undo = match &change {
            Change::Clear => Undo::All(std::mem::take(&mut s.data)),
            _ => Undo::Key(s.data.get(key).cloned()),
        };
        let result = change
            .apply(&mut s.data)
            .map_err(|m| value_error(key, m))
            .and_then(|()| serialized_size(&s.data).map_err(|e| value_error(key, e)));
        let error = match result {
            Ok(size) if size <= s.max_size => None,
            Ok(size) => Some(SessionError::TooLarge {
                size,
                max: s.max_size,
            }),
            Err(e) => Some(e),
        };
        if let Some(e) = error {
            match undo {
                Undo::All(data) => s.data = data,
                Undo::Key(Some(old)) => {
                    s.data.insert(key.to_owned(), old);
                }
                Undo::Key(None) => {
                    s.data.remove(key);
                }
            }
            return Err(e);
        }
        s.changes.push(change);
        s.modified = true;
        Ok(())
    }

    /// Sets `key` to `value` (last writer wins for this key).
    pub fn insert(&self, key: &str, value: impl Serialize) -> Result<(), SessionError> {
        let value = serde_json::to_value(value).map_err(|e| value_error(key, e))?;
        self.change(Change::Set(key.to_owned(), value))
    }

    /// Removes `key`, returning its raw value.
    pub fn remove(&self, key: &str) -> Option<Value> {
        let old = self.read().data.get(key).cloned()?;
        // Removing never grows the data, so this cannot fail the size check.
        let _ = self.change(Change::Remove(key.to_owned()));
        Some(old)
    }

    /// Removes `key`, returning its value as `T`.
    pub fn pop<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        self.remove(key)
            .map(|v| serde_json::from_value(v).map_err(|e| value_error(key, e)))
            .transpose()
    }

    /// Sets `key` to `f(current)`. If another request writes the session concurrently, `f` is
    /// applied again to the value that request stored, so no update is lost.
    pub fn update<T, F>(&self, key: &str, f: F) -> Result<T, SessionError>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(Option<T>) -> T + Send + Sync + 'static,
    {
        let owned_key = key.to_owned();
        let f: UpdateFn = Arc::new(move |old: Option<&Value>| {
            let old = old
                .map(|v| serde_json::from_value::<T>(v.clone()))
                .transpose()
                .map_err(|e| format!("`{owned_key}`: {e}"))?;
            serde_json::to_value(f(old)).map_err(|e| format!("`{owned_key}`: {e}"))
        });
        self.change(Change::Update(key.to_owned(), f))?;
        self.get(key)?
            .ok_or_else(|| value_error(key, "value vanished during update"))
    }

    /// Removes every key (the session id stays).
    pub fn clear(&self) {
        let _ = self.change(Change::Clear);
    }

    /// Deletes the session: the data is gone and the next write gets a new id.
    pub fn flush(&self) {
        let mut s = self.read();
        if let Some(id) = s.id.take() {
            s.to_delete.push(id);
        }
        if let Some(id) = s.cycled_from.take() {
            s.to_delete.push(id);
        }
        s.base_version = None;
        s.data.clear();
        s.changes.clear();
        s.modified = true;
    }

    /// Keeps the data under a new id (against session fixation); the old id stops working.
    pub fn cycle_key(&self) {
        let mut s = self.read();
        if let Some(id) = s.id.take() {
            s.cycled_from = Some(id);
        }
        s.base_version = None;
        let data = s.data.clone();
        s.changes = data.into_iter().map(|(k, v)| Change::Set(k, v)).collect();
        s.modified = true;
    }

    /// Sets when this session expires.
    pub fn set_expiry(&self, expiry: Expiry) {
        let _ = match expiry {
            Expiry::Default => self.change(Change::Remove(EXPIRY_KEY.into())),
            Expiry::Seconds(n) => self.change(Change::Set(EXPIRY_KEY.into(), Value::from(n))),
            Expiry::BrowserClose => self.change(Change::Set(EXPIRY_KEY.into(), Value::from(0))),
        };
    }

    /// This session's expiry setting.
    pub fn expiry(&self) -> Expiry {
        match self.lock().data.get(EXPIRY_KEY).and_then(Value::as_u64) {
            None => Expiry::Default,
            Some(0) => Expiry::BrowserClose,
            Some(n) => Expiry::Seconds(n),
        }
    }

    /// The logged-in user's name, if any.
    pub fn user(&self) -> Option<String> {
        self.read()
            .data
            .get(AUTH_USER_KEY)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// The stored id (for tests and logging), if the session has been stored.
    pub fn id(&self) -> Option<SessionId> {
        self.lock().id.clone()
    }

    /// Whether the data changed during this request.
    pub fn is_modified(&self) -> bool {
        self.lock().modified
    }

    /// Whether anything read the session during this request.
    pub fn is_accessed(&self) -> bool {
        self.lock().accessed
    }

    /// A copy of the data.
    pub fn data(&self) -> Map<String, Value> {
        self.read().data.clone()
    }
}

/// What [`Session::change`] puts back when a change is refused.
enum Undo {
    /// The whole data (`Clear`).
    All(Map<String, Value>),
    /// The changed key's previous value (`None`: it was not set).
    Key(Option<Value>),
}

/// Counts the bytes written to it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of `data` serialized as JSON (as `serde_json::to_vec` would give it), without
/// building the bytes.
pub fn serialized_size(data: &Map<String, Value>) -> Result<usize, serde_json::Error> {
    let mut count = ByteCount(0);
    serde_json::to_writer(&mut count, data)?;
    Ok(count.0)
}

fn change_key(change: &Change) -> &str {
    match change {
        Change::Set(k, _) | Change::Remove(k) | Change::Update(k, _) => k,
        Change::Clear => "*",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session() -> Session {
        Session::new(SessionState {
            max_size: 256,
            ..Default::default()
        })
    }

    #[test]
    fn typed_values_and_tracking() {
        let s = session();
        assert!(!s.is_accessed());
        assert_eq!(s.get::<u32>("n").expect("get"), None);
        assert!(s.is_accessed() && !s.is_modified());
        s.insert("n", 3u32).expect("insert");
        assert!(s.is_modified());
        assert_eq!(s.get::<u32>("n").expect("get"), Some(3));
        assert!(s.get::<String>("n").is_err(), "wrong type is an error");
        assert_eq!(
            s.update("n", |v: Option<u32>| v.unwrap_or(0) + 1)
                .expect("update"),
            4
        );
        assert_eq!(s.pop::<u32>("n").expect("pop"), Some(4));
        assert!(!s.contains("n"));
    }

    #[test]
    fn over_max_size_is_refused_and_data_kept() {
        let s = session();
        s.insert("a", "small").expect("insert");
        let err = s.insert("b", "x".repeat(300)).expect_err("too large");
        assert!(matches!(err, SessionError::TooLarge { .. }), "{err}");
        assert_eq!(
            s.data(),
            json!({"a": "small"}).as_object().cloned().expect("obj")
        );
    }

    #[test]
    fn a_refused_change_leaves_the_data_as_it_was() {
        let s = session();
        s.insert("a", "small").expect("insert");
        s.insert("n", 1).expect("insert");
        let before = s.data();
        let grow = |_: Option<String>| "x".repeat(300);
        assert!(s.update("a", grow).is_err(), "too large");
        assert!(s.insert("n", "y".repeat(300)).is_err(), "too large");
        assert!(s.insert("new", "z".repeat(300)).is_err(), "too large");
        assert!(
            s.update("n", |v: Option<String>| v.unwrap_or_default())
                .is_err(),
            "wrong type"
        );
        assert_eq!(s.data(), before);
        s.with_state(|st| assert_eq!(st.changes.len(), 2, "refused changes are not recorded"));
        s.clear();
        assert!(s.is_empty());
        let data = json!({"k": [1, "two", {"3": null}], "é": 1.5});
        let data = data.as_object().cloned().expect("obj");
        assert_eq!(
            serialized_size(&data).expect("size"),
            serde_json::to_vec(&data).expect("json").len()
        );
    }

    #[test]
    fn flush_and_cycle() {
        let id = SessionId::generate();
        let s = Session::new(SessionState {
            id: Some(id.clone()),
            base_version: Some(3),
            max_size: 256,
            ..Default::default()
        });
        s.insert("k", 1).expect("insert");
        s.cycle_key();
        s.with_state(|st| {
            assert_eq!(st.id, None);
            assert_eq!(st.cycled_from.as_ref(), Some(&id));
        });
        assert_eq!(s.get::<i32>("k").expect("get"), Some(1));
        s.flush();
        assert!(s.is_empty());
        s.with_state(|st| assert_eq!(st.to_delete, vec![id.clone()]));
    }
}
