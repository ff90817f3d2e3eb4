//! Configuration errors, where a value came from, and the helpers of the validation rules.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use figment::error::{Actual, Kind};

use super::source::KeyLines;
use super::Config;

/// Where a configuration value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A line (1-based) of a configuration file.
    File { path: PathBuf, line: usize },
    /// An environment variable (its name).
    Env(String),
    /// Not known (a value set in code, checked by [`super::Config::validate`]).
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Env(var) => f.write_str(var),
            Origin::Unknown => f.write_str("configuration"),
        }
    }
}

/// An invalid or unreadable configuration (exit code 2); keys are dotted: `tasks.queues[1].name`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file (its path) could not be read.
    #[error("{path}: cannot read the configuration file: {1}", path = .0.display())]
    Read(PathBuf, std::io::Error),
    /// The file (path, line, column in characters, parser message) is not valid TOML.
    #[error("{path}:{1}:{2}: TOML syntax error: {3}", path = .0.display())]
    Syntax(PathBuf, usize, usize, String),
    /// A key (or section) that does not exist, in the file or named by an environment variable.
    #[error("{0}: unknown key `{1}`")]
    UnknownKey(Origin, String),
    /// A value (origin, key, what was expected) of the wrong type, out of range or inconsistent.
    #[error("{text}", text = located(.0, .1, .2))]
    Invalid(Origin, String, String),
}

/// `file:line: key: message`, `VAR: message`, `built-in default: key: message` or `key: message`.
fn located(origin: &Origin, key: &str, message: &str) -> String {
    match origin {
        Origin::Env(var) => format!("{var}: {message}"),
        Origin::Unknown => format!("{key}: {message}"),
        Origin::Default | Origin::File { .. } => format!("{origin}: {key}: {message}"),
    }
}

/// Where each value of a loaded configuration came from (neither file nor environment: a
/// configuration set in code, whose origins are unknown).
#[derive(Debug, Default)]
pub(super) struct Origins {
    /// The file and the line of each of its keys.
    pub(super) file: Option<(PathBuf, KeyLines)>,
    /// Dotted key → the environment variable that set it.
    pub(super) env: Option<HashMap<String, String>>,
}

impl Origins {
    /// Where `key` (or, failing that, its nearest parent below the section) was set.
    pub(super) fn of(&self, key: &str) -> Origin {
        if self.file.is_none() && self.env.is_none() {
            return Origin::Unknown;
        }
        for key in std::iter::successors(Some(key), |key| parent(key)) {
            if let Some(var) = self.env.as_ref().and_then(|env| env.get(key)) {
                return Origin::Env(var.clone());
            }
            if let Some((path, lines)) = &self.file {
                if let Some(line) = lines.line_of(key) {
                    let path = path.clone();
                    return Origin::File { path, line };
                }
            }
        }
        Origin::Default
    }

    /// The configuration `figment` holds, or its first (serde) error in configuration terms.
    pub(super) fn extract(&self, figment: &figment::Figment) -> Result<Config, ConfigError> {
        let error = match figment.extract() {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        let part = |p: &String| match p.parse::<usize>() {
            Ok(_) => format!("[{p}]"),
            Err(_) => format!(".{p}"),
        };
        let key: String = error.path.iter().map(part).collect();
        let mut key = key.get(1..).unwrap_or_default().to_owned();
        let origin = self.of(&key);
        let message = match error.kind {
            Kind::UnknownField(..) => return Err(ConfigError::UnknownKey(origin, key)),
            Kind::InvalidType(got, expected) => describe(&expected, &got, false),
            Kind::InvalidValue(got, expected) => describe(&expected, &got, true),
            Kind::UnknownVariant(got, variants) => {
                let variants: Vec<String> = variants.iter().map(|v| format!("{v:?}")).collect();
                format!("expected one of {}, got {got:?}", variants.join(", "))
            }
            Kind::MissingField(name) => format!("missing key `{name}`"),
            other => other.to_string(),
        };
        if key.is_empty() {
            key = "(top level)".into();
        }
        Err(ConfigError::Invalid(origin, key, message))
    }

    /// A [`ConfigError::Invalid`] for `key`, at its origin.
    pub(super) fn fail(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let key = key.into();
        ConfigError::Invalid(self.of(&key), key, message.into())
    }
}

/// `tasks.queues[1].name` → `tasks.queues[1]` → `tasks.queues`; not the bare section.
fn parent(key: &str) -> Option<&str> {
    Some(&key[..key.rfind(['.', '['])?]).filter(|p| p.contains('.'))
}

/// `expected an integer, got a string ("two")`, or for a value of the right type but out of
/// range, `expected an integer from 0 to 4294967295, got -1`.
fn describe(expected: &str, got: &Actual, out_of_range: bool) -> String {
    let expected = match expected {
        "u32" | "u64" | "usize" | "i64" if !out_of_range => "an integer".into(),
        "u32" => format!("an integer from 0 to {}", u32::MAX),
        "u64" | "usize" => "a non-negative integer".into(),
        "f64" => "a number".into(),
        "a string" | "path string" => "a string".into(),
        "a sequence" => "an array".into(),
        "a map" => "a table".into(),
        other if other.starts_with("struct ") => "a table".into(),
        other => other.replace('`', "\""),
    };
    let (kind, value) = match got {
        Actual::Bool(b) => ("a boolean", b.to_string()),
        Actual::Unsigned(n) => ("an integer", n.to_string()),
        Actual::Signed(n) => ("an integer", n.to_string()),
        Actual::Float(n) => ("a float", n.to_string()),
        Actual::Str(s) => ("a string", format!("{s:?}")),
        Actual::Seq => ("an array", String::new()),
        Actual::Map => ("a table", String::new()),
        other => ("", other.to_string()),
    };
    let got = match (kind, value.as_str()) {
        (kind, "") => kind.to_owned(),
        ("", _) => value,
        _ if out_of_range => value,
        _ => format!("{kind} ({value})"),
    };
    format!("expected {expected}, got {got}")
}
