//! Configuration errors, where a value came from, and the helpers of the validation rules.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use figment::error::{Actual, Kind};

use super::source::KeyLines;

/// Where a configuration value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A line of a configuration file.
    File {
        /// The file, as given.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
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

/// An invalid or unreadable configuration. Every variant means exit code 2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("{}: cannot read the configuration file: {error}", path.display())]
    Read {
        /// The file, as given.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}:{column}: TOML syntax error: {message}", path.display())]
    Syntax {
        /// The file, as given.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A key (or section) that does not exist, in the file or named by an environment variable.
    #[error("{origin}: unknown key `{key}`")]
    UnknownKey {
        /// Where it was found.
        origin: Origin,
        /// Dotted key, e.g. `server.foo`.
        key: String,
    },
    /// A value of the wrong type, out of range or inconsistent with another key.
    #[error("{}", located(.origin, .key, .message))]
    Invalid {
        /// Where the value came from.
        origin: Origin,
        /// Dotted key, e.g. `server.bind` or `tasks.queues[1].name`.
        key: String,
        /// What was expected.
        message: String,
    },
}

impl ConfigError {
    /// The process exit code for this error: always 2 (invalid configuration).
    pub fn exit_code(&self) -> i32 {
        2
    }

    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
        }
    }
}

/// `file:line: key: message`, `VAR: message` (the variable names the key),
/// `built-in default: key: message` or `key: message`.
fn located(origin: &Origin, key: &str, message: &str) -> String {
    match origin {
        Origin::Env(var) => format!("{var}: {message}"),
        Origin::Unknown => format!("{key}: {message}"),
        Origin::Default | Origin::File { .. } => format!("{origin}: {key}: {message}"),
    }
}

/// Where each value of a loaded configuration came from.
#[derive(Debug, Default)]
pub(super) struct Origins {
    /// False for a configuration that was not loaded (origins unknown).
    pub(super) loaded: bool,
    /// The file and where its keys are set.
    pub(super) file: Option<(PathBuf, KeyLines)>,
    /// Dotted key → the environment variable that set it.
    pub(super) env: HashMap<String, String>,
}

impl Origins {
    /// Where `key` (or, failing that, its nearest parent) was set.
    pub(super) fn of(&self, key: &str) -> Origin {
        if !self.loaded {
            return Origin::Unknown;
        }
        for candidate in key_and_parents(key) {
            if let Some(var) = self.env.get(candidate) {
                return Origin::Env(var.clone());
            }
            if let Some((path, lines)) = &self.file {
                if let Some(line) = lines.line_of(candidate) {
                    let path = path.clone();
                    return Origin::File { path, line };
                }
            }
        }
        Origin::Default
    }

    /// A figment (serde) error, located and said in configuration terms.
    pub(super) fn deserialize_error(&self, error: figment::Error) -> ConfigError {
        let mut key = error.path.join(".");
        for part in error
            .path
            .iter()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        {
            key = key.replacen(&format!(".{part}"), &format!("[{part}]"), 1);
        }
        let origin = self.of(&key);
        if matches!(error.kind, Kind::UnknownField(..)) {
            return ConfigError::UnknownKey { origin, key };
        }
        if key.is_empty() {
            key = "(top level)".into();
        }
        let message = describe(&error.kind);
        ConfigError::Invalid {
            origin,
            key,
            message,
        }
    }
}

/// `tasks.queues[1].name`, `tasks.queues[1]`, `tasks.queues`: the key and its parents, down to
/// (excluding) the bare section.
fn key_and_parents(key: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(key), |k| {
        let parent = &k[..k.rfind(['.', '['])?];
        parent.contains('.').then_some(parent)
    })
}

/// What the user should write instead: `expected an integer, got a string ("two")`.
fn describe(kind: &Kind) -> String {
    match kind {
        Kind::InvalidType(got, expected) => {
            let expected = expected_as(expected, false);
            format!("expected {expected}, got {}", actual(got, true))
        }
        Kind::InvalidValue(got, expected) => {
            let expected = expected_as(expected, true);
            format!("expected {expected}, got {}", actual(got, false))
        }
        Kind::UnknownVariant(got, variants) => {
            let variants: Vec<String> = variants.iter().map(|v| format!("{v:?}")).collect();
            format!("expected one of {}, got {got:?}", variants.join(", "))
        }
        Kind::MissingField(name) => format!("missing key `{name}`"),
        other => other.to_string(),
    }
}

/// serde's name of what it expected, in configuration terms; integer ranges only with
/// `with_range` (for values of the right type but out of range).
fn expected_as(expected: &str, with_range: bool) -> String {
    match expected {
        "u32" | "u64" | "usize" | "i64" if !with_range => "an integer".into(),
        "u32" => format!("an integer from 0 to {}", u32::MAX),
        "u64" | "usize" => "a non-negative integer".into(),
        "f64" => "a number".into(),
        "a string" | "path string" => "a string".into(),
        "a sequence" => "an array".into(),
        "a map" => "a table".into(),
        other if other.starts_with("struct ") => "a table".into(),
        other => other.replace('`', "\""),
    }
}

/// The value serde got: `a string ("two")` (with its type) or `"two"`.
fn actual(got: &Actual, with_type: bool) -> String {
    let (kind, value) = match got {
        Actual::Bool(b) => ("a boolean", b.to_string()),
        Actual::Unsigned(n) => ("an integer", n.to_string()),
        Actual::Signed(n) => ("an integer", n.to_string()),
        Actual::Float(n) => ("a float", n.to_string()),
        Actual::Str(s) => ("a string", format!("{s:?}")),
        Actual::Seq => return "an array".into(),
        Actual::Map => return "a table".into(),
        other => return other.to_string(),
    };
    match with_type {
        true => format!("{kind} ({value})"),
        false => value,
    }
}

/// The validation rules' helpers: errors located at their key's origin.
impl Origins {
    /// An [`ConfigError::Invalid`] for `key`, at its origin.
    pub(super) fn fail(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let key = key.into();
        ConfigError::Invalid {
            origin: self.of(&key),
            key,
            message: message.into(),
        }
    }

    /// `min <= value` (and `value <= max`, when given).
    pub(super) fn range(
        &self,
        key: &str,
        value: u64,
        min: u64,
        max: Option<u64>,
    ) -> Result<(), ConfigError> {
        let expected = match max {
            _ if value >= min && max.is_none_or(|max| value <= max) => return Ok(()),
            Some(max) => format!("from {min} to {max}"),
            None => format!(">= {min}"),
        };
        Err(self.fail(key, format!("expected an integer {expected}, got {value}")))
    }

    /// No two of `names` (the `field` of the entries of the array `key`) are equal.
    pub(super) fn unique<'n>(
        &self,
        key: &str,
        field: &str,
        what: &str,
        names: impl Iterator<Item = &'n str>,
    ) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for (i, name) in names.enumerate() {
            if name.is_empty() {
                return Err(self.fail(
                    format!("{key}[{i}]{field}"),
                    format!("expected a non-empty {what} name"),
                ));
            }
            if !seen.insert(name) {
                let message = format!("{what} {name:?} is defined more than once");
                return Err(self.fail(format!("{key}[{i}]{field}"), message));
            }
        }
        Ok(())
    }
}
