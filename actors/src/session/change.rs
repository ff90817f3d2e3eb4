//! What a request did to its session, so a write that lost a race can be re-applied to the
//! fresh data: `Set`/`Remove` are last-writer-wins per key, `Update` re-runs its closure.

use std::sync::Arc;

use serde_json::{Map, Value};

/// A closure from a key's current value to its new value (`Err` aborts the write).
pub type UpdateFn = Arc<dyn Fn(Option<&Value>) -> Result<Value, String> + Send + Sync>;

/// One change a request made to its session, in order.
#[derive(Clone)]
pub enum Change {
    /// `insert(key, value)`.
    Set(String, Value),
    /// `remove(key)` / `pop(key)`.
    Remove(String),
    /// `update(key, f)`: re-run on the fresh value when another write got there first.
    Update(String, UpdateFn),
    /// `clear()`: every key removed.
    Clear,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Set(k, v) => write!(f, "Set({k:?}, {v})"),
            Change::Remove(k) => write!(f, "Remove({k:?})"),
            Change::Update(k, _) => write!(f, "Update({k:?}, <fn>)"),
            Change::Clear => write!(f, "Clear"),
        }
    }
}

impl Change {
    /// Applies the change to `data`.
    pub fn apply(&self, data: &mut Map<String, Value>) -> Result<(), String> {
        match self {
            Change::Set(k, v) => {
                data.insert(k.clone(), v.clone());
            }
            Change::Remove(k) => {
                data.remove(k);
            }
            Change::Update(k, f) => {
                let new = f(data.get(k))?;
                data.insert(k.clone(), new);
            }
            Change::Clear => data.clear(),
        }
        Ok(())
    }

    /// Applies every change in order.
    pub fn apply_all(changes: &[Change], data: &mut Map<String, Value>) -> Result<(), String> {
        changes.iter().try_for_each(|c| c.apply(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replays_in_order() {
        let mut data = Map::new();
        data.insert("n".into(), json!(5));
        data.insert("gone".into(), json!(1));
        let inc: UpdateFn = Arc::new(|v| Ok(json!(v.and_then(Value::as_i64).unwrap_or(0) + 1)));
        let changes = vec![
            Change::Update("n".into(), inc.clone()),
            Change::Remove("gone".into()),
            Change::Set("s".into(), json!("x")),
            Change::Update("n".into(), inc),
        ];
        Change::apply_all(&changes, &mut data).expect("apply");
        assert_eq!(Value::Object(data), json!({"n": 7, "s": "x"}));
    }
}
