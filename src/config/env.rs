//! The environment layer: `SWITCHYARD_<SECTION>__<KEY>` variables, each typed like the key it
//! sets. figment's own `Env` provider is not used: it guesses types from the text, lower-cases
//! names, reads lists as `[a, b]` and ignores unknown names, where SPEC wants the key's type,
//! upper case only, comma-separated lists, and an error naming the variable.

use std::collections::HashMap;

use figment::providers::Serialized;
use figment::value::{Dict, Num, Value};
use figment::Figment;

use super::{Config, ConfigError, Origin};

/// The prefix of every configuration environment variable.
const PREFIX: &str = "SWITCHYARD_";

/// Keys holding arrays of tables, which only the file can set.
const ARRAYS_OF_TABLES: &[&str] = &["auth.users", "tasks.queues", "beat.schedule"];

/// Merges every `SWITCHYARD_<SECTION>__<KEY>` variable of `env` into `figment` (in name order;
/// for repeated names the last wins). Returns the figment and, per dotted key, the variable
/// that set it.
pub(super) fn overlay(
    mut figment: Figment,
    env: &[(String, String)],
) -> Result<(Figment, HashMap<String, String>), ConfigError> {
    let mut vars: Vec<(&String, &str, &str, &str)> = env
        .iter()
        .filter_map(|(name, value)| {
            let (section, key) = name.strip_prefix(PREFIX)?.split_once("__")?;
            Some((name, section, key, value.as_str()))
        })
        .collect();
    vars.sort_by_key(|&(name, ..)| name);
    let schema = Value::serialize(Config::default()).unwrap_or_else(|_| Dict::new().into());
    let upper = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    };
    let mut keys = HashMap::new();
    for (var, section, key, raw) in vars {
        let dotted = format!("{section}.{key}").to_ascii_lowercase();
        let origin = Origin::Env(var.clone());
        let current = schema
            .find_ref(&dotted)
            .filter(|value| upper(section) && upper(key) && !matches!(value, Value::Dict(..)));
        let Some(current) = current else {
            return Err(ConfigError::UnknownKey {
                origin,
                key: dotted,
            });
        };
        let value = match ARRAYS_OF_TABLES.contains(&dotted.as_str()) {
            true => Err(format!(
                "`{dotted}` is an array of tables and cannot be set from the environment; set it \
                 in the configuration file"
            )),
            false => typed(current, raw),
        };
        let value = value.map_err(|message| ConfigError::Invalid {
            origin,
            key: dotted.clone(),
            message,
        })?;
        figment = figment.merge(Serialized::default(&dotted, value));
        keys.insert(dotted, var.clone());
    }
    Ok((figment, keys))
}

/// Parses an environment value as the type of the value it replaces.
fn typed(current: &Value, raw: &str) -> Result<Value, String> {
    let trimmed = raw.trim();
    match current {
        Value::Bool(..) => match trimmed.to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true.into()),
            "false" | "0" => Ok(false.into()),
            _ => Err(format!("expected a boolean, got {raw:?}")),
        },
        Value::Num(_, Num::F32(_) | Num::F64(_)) => trimmed
            .parse::<f64>()
            .map(Value::from)
            .map_err(|_| format!("expected a number, got {raw:?}")),
        Value::Num(..) => trimmed
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("expected an integer, got {raw:?}")),
        Value::Array(..) => Ok(raw
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .collect::<Vec<_>>()
            .into()),
        _ => Ok(raw.into()),
    }
}
