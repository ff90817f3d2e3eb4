//! `[server]`, `[log]` and `[actors]`: the node itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use super::error::Validator;
use super::{ConfigError, Origin, Secret};

/// Minimum length of `server.secret_key` when `server.debug = false`.
const MIN_SECRET_KEY_BYTES: usize = 32;

/// Bounds of the actor-count keys in `[actors]`.
const ACTORS_RANGE: (u32, u32) = (1, 1024);

/// `[server]`: the HTTP node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, `IP:PORT` (port 0: any free port).
    pub bind: String,
    /// Development mode: detailed error pages, template reloading, static files served.
    /// `false` requires a `secret_key` of at least 32 bytes.
    pub debug: bool,
    /// Secret that signs cookies and CSRF tokens and derives the encryption key (bytes of text).
    pub secret_key: Secret,
    /// Older secret keys still accepted when verifying signatures (key rotation).
    pub secret_key_fallbacks: Vec<Secret>,
    /// Directory of handlebars `*.hbs` templates, relative to the working directory.
    pub templates: PathBuf,
    /// URL prefix of static files.
    pub static_url: String,
    /// Directory of static files (served by switchyard when `debug = true`).
    pub static_dir: PathBuf,
    /// This node's id in the cluster; empty means `hostname-pid`
    /// (see [`ServerConfig::node_id_or_default`]).
    pub node_id: String,
    /// Seconds in-flight requests get to finish on SIGINT/SIGTERM.
    pub shutdown_timeout: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8000".into(),
            debug: true,
            secret_key: Secret::default(),
            secret_key_fallbacks: Vec::new(),
            templates: "templates".into(),
            static_url: "/static/".into(),
            static_dir: "static".into(),
            node_id: String::new(),
            shutdown_timeout: 5,
        }
    }
}

impl ServerConfig {
    /// `node_id`, or `hostname-pid` when it is empty (the `hostname` crate's host name, else
    /// `localhost`).
    pub fn node_id_or_default(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = hostname::get().ok().and_then(|h| h.into_string().ok());
        let host = host.filter(|h| !h.is_empty());
        format!(
            "{}-{}",
            host.as_deref().unwrap_or("localhost"),
            std::process::id()
        )
    }

    pub(super) fn validate(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        if self.bind.parse::<SocketAddr>().is_err() {
            let message = format!(
                "invalid socket address {:?} (expected IP:PORT such as \"127.0.0.1:8000\")",
                self.bind
            );
            return Err(v.fail("server.bind", message));
        }
        let key_bytes = self.secret_key.expose_secret().len();
        if !self.debug && key_bytes < MIN_SECRET_KEY_BYTES {
            let because = match v.origins.of("server.debug") {
                origin @ (Origin::File { .. } | Origin::Env(_)) => format!(" (set at {origin})"),
                Origin::Default | Origin::Unknown => String::new(),
            };
            let message = format!(
                "expected at least {MIN_SECRET_KEY_BYTES} bytes when server.debug = \
                 false{because}, got {key_bytes} bytes"
            );
            return Err(v.fail("server.secret_key", message));
        }
        Ok(())
    }
}

/// `[log]`: logging (to stderr).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing_subscriber::EnvFilter` directives: a level (`trace`, `debug`, `info`, `warn`,
    /// `error`, `off`) or a comma-separated list of levels and `target=level` entries.
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl LogConfig {
    pub(super) fn validate(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        check_log_filter(&self.level).map_err(|why| {
            let message = format!(
                "expected a level (trace, debug, info, warn, error, off) or a comma-separated \
                 list of levels and target=level directives, got {:?} ({why})",
                self.level
            );
            v.fail("log.level", message)
        })
    }
}

/// Parses `filter` with tracing-subscriber's own parser, and also requires a non-empty filter
/// whose every directive ends in a level: tracing reads `loud` as "target `loud`, every level"
/// and `app=` as "target `app`", which in `log.level` are surely mistakes.
fn check_log_filter(filter: &str) -> Result<(), String> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| e.to_string())?;
    let mut directives = filter
        .split(',')
        .filter(|d| !d.trim().is_empty())
        .peekable();
    if directives.peek().is_none() {
        return Err("no directive".into());
    }
    let no_level = |d: &&str| {
        let level = d.rsplit('=').next().unwrap_or_default();
        level.is_empty() || level.parse::<LevelFilter>().is_err()
    };
    match directives.find(no_level) {
        Some(directive) => Err(format!("{directive:?} does not end in a level")),
        None => Ok(()),
    }
}

string_enum! {
    /// Log output format.
    LogFormat default Text {
        /// Human-readable lines.
        Text => "text",
        /// One JSON object per line.
        Json => "json",
    }
}

/// `[actors]`: how many actors of each kind a node runs (each in 1..=1024).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorsConfig {
    /// Session actors, keyed by session id.
    pub session_shards: u32,
    /// Context-processor actors.
    pub context_workers: u32,
    /// actix-web worker threads.
    pub http_workers: u32,
}

impl Default for ActorsConfig {
    fn default() -> Self {
        Self {
            session_shards: 8,
            context_workers: 4,
            http_workers: 2,
        }
    }
}

impl ActorsConfig {
    pub(super) fn validate(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        v.between("actors.session_shards", self.session_shards, ACTORS_RANGE)?;
        v.between("actors.context_workers", self.context_workers, ACTORS_RANGE)?;
        v.between("actors.http_workers", self.http_workers, ACTORS_RANGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_filters() {
        for ok in [
            "info",
            "WARN",
            "info,switchyard=debug",
            "actix_web=warn,switchyard::http=trace",
        ] {
            assert_eq!(check_log_filter(ok), Ok(()), "{ok}");
        }
        // tracing-subscriber does not trim directives: with a space the whole filter is invalid
        // (and was silently replaced by "info" at run time before this check used its parser).
        let spaced = "actix_web=warn, switchyard::http=trace";
        for bad in [
            "",
            " , ",
            "loud",
            "switchyard=",
            "=info",
            "info,,=x",
            spaced,
        ] {
            assert!(check_log_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_id_defaults_to_host_and_pid() {
        let mut server = ServerConfig::default();
        let id = server.node_id_or_default();
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
        server.node_id = "web-1".into();
        assert_eq!(server.node_id_or_default(), "web-1");
    }
}
