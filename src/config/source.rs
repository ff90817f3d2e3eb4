//! The file, with the line of each key from `toml_edit`'s spans, and the environment layer.

use std::collections::HashMap;
use std::path::Path;

use figment::providers::Serialized;
use figment::value::{Dict, Num, Value};
use figment::Figment;
use toml_edit::{ImDocument, Item, TableLike};

use super::{Config, ConfigError, Origin};

/// A parsed configuration file, which knows the line of each of its keys.
#[derive(Debug)]
pub(super) struct KeyLines(ImDocument<String>);

impl KeyLines {
    /// Parses `text` (the file at `path`); a syntax error names the file, line and column.
    pub(super) fn parse(path: &Path, text: &str) -> Result<KeyLines, ConfigError> {
        ImDocument::parse(text.to_owned())
            .map(KeyLines)
            .map_err(|e| {
                let (line, column) = line_col(text, e.span().map_or(0, |span| span.start));
                let message = e.message().lines().collect::<Vec<_>>().join("; ");
                ConfigError::Syntax(path.to_path_buf(), line, column, message)
            })
    }

    /// The 1-based line where `key` (such as `tasks.queues[1].name`) is set, if it is.
    pub(super) fn line_of(&self, key: &str) -> Option<usize> {
        let (mut table, mut span): (Option<&dyn TableLike>, _) = (Some(self.0.as_table()), None);
        for part in key.split('.') {
            let (name, index) = part.split_once('[').unwrap_or((part, ""));
            let (key, item) = table?.get_key_value(name)?;
            let (inner, inner_span) = match (item, index.strip_suffix(']')) {
                (Item::ArrayOfTables(array), Some(i)) => {
                    let inner = array.get(i.parse().ok()?)?;
                    (Some(inner as &dyn TableLike), inner.span())
                }
                (_, Some(_)) => return None,
                (item, None) => (item.as_table_like(), item.as_table().and_then(|t| t.span())),
            };
            (table, span) = (inner, inner_span.or(key.span()));
        }
        Some(line_col(self.0.raw(), span?.start).0)
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (before.matches('\n').count() + 1, column)
}

/// Keys holding arrays of tables, which only the file can set.
const ARRAYS_OF_TABLES: &[&str] = &["auth.users", "tasks.queues", "beat.schedule"];
const FILE_ONLY: &str = "an array of tables: set it in the configuration file, not the environment";

/// Merges `SWITCHYARD_<SECTION>__<KEY>` variables, typed like their key, into `figment`.
pub(super) fn overlay<'a>(
    mut figment: Figment,
    env: &'a [(String, String)],
) -> Result<(Figment, HashMap<String, String>), ConfigError> {
    let schema = Value::serialize(Config::default()).unwrap_or_else(|_| Dict::new().into());
    let split = |(var, raw): &'a (String, String)| {
        let (section, name) = var.strip_prefix("SWITCHYARD_")?.split_once("__")?;
        Some((var, format!("{section}.{name}").to_lowercase(), raw))
    };
    let mut vars: Vec<_> = env.iter().filter_map(split).collect();
    vars.sort_by_key(|&(var, ..)| var);
    let upper = |b: u8| matches!(b, b'A'..=b'Z' | b'0'..=b'9' | b'_');
    let mut keys = HashMap::new();
    for (var, key, raw) in vars {
        let origin = Origin::Env(var.clone());
        let current = schema.find_ref(&key).filter(|v| v.as_dict().is_none());
        let Some(current) = current.filter(|_| var.bytes().all(upper)) else {
            return Err(ConfigError::UnknownKey(origin, key));
        };
        let value = typed(&key, current, raw);
        let value = value.map_err(|message| ConfigError::Invalid(origin, key.clone(), message))?;
        figment = figment.merge(Serialized::default(&key, value));
        keys.insert(key, var.clone());
    }
    Ok((figment, keys))
}

/// Parses the environment value `raw` for `key` as the type of the value it replaces.
fn typed(key: &str, current: &Value, raw: &str) -> Result<Value, String> {
    let trimmed = raw.trim();
    let parsed = |value: Option<Value>, what| value.ok_or(format!("expected {what}, got {raw:?}"));
    match current {
        _ if ARRAYS_OF_TABLES.contains(&key) => Err(format!("`{key}` is {FILE_ONLY}")),
        Value::Bool(..) => match trimmed.to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true.into()),
            "false" | "0" => Ok(false.into()),
            _ => parsed(None, "a boolean"),
        },
        Value::Num(_, Num::F64(_)) => {
            parsed(trimmed.parse::<f64>().ok().map(Value::from), "a number")
        }
        Value::Num(..) => parsed(trimmed.parse::<i64>().ok().map(Value::from), "an integer"),
        Value::Array(..) => {
            let items = raw.split(',').map(str::trim).filter(|s| !s.is_empty());
            Ok(items.collect::<Vec<_>>().into())
        }
        _ => Ok(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_follow_the_document() -> Result<(), ConfigError> {
        let text = "top = 1\n[server]\nbind = \"\"\"\nmulti\nline\"\"\"\nlist = [\n  \"a\", # c\n  \"]\",\n]\n\
                    \"quoted\".x = 2\n[[tasks.queues]]\nname = 'a'\n[[tasks.queues]]\nname = 'b'\n\
                    [tasks.queues.extra]\nk = { a = 1 }\n";
        let lines = KeyLines::parse(Path::new("t.toml"), text)?;
        assert_eq!(lines.line_of("top"), Some(1));
        assert_eq!(lines.line_of("server"), Some(2));
        assert_eq!(lines.line_of("server.bind"), Some(3));
        assert_eq!(lines.line_of("server.list"), Some(6));
        assert_eq!(lines.line_of("server.quoted.x"), Some(10));
        assert_eq!(lines.line_of("tasks.queues[0].name"), Some(12));
        assert_eq!(lines.line_of("tasks.queues[1].name"), Some(14));
        assert_eq!(lines.line_of("tasks.queues[1].extra.k"), Some(16));
        assert_eq!(lines.line_of("tasks.queues[1].extra.k.a"), Some(16));
        Ok(())
    }
}
