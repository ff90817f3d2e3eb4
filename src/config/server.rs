//! `[server]`, `[log]` and `[actors]`: the node itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use super::error::Origins;
use super::{ConfigError, Origin, Secret};

/// Minimum length of `server.secret_key` when `server.debug = false`.
const MIN_SECRET_KEY_BYTES: usize = 32;

section! {
    /// `[server]`: the HTTP node.
    pub struct ServerConfig {
        /// Address to listen on, `IP:PORT` (port 0: any free port).
        pub bind: String = "127.0.0.1:8000".into(),
        /// Development mode: detailed error pages, template reloading, static files served.
        /// `false` requires a `secret_key` of at least 32 bytes.
        pub debug: bool = true,
        /// Signs cookies and CSRF tokens and derives the encryption key (bytes of text).
        pub secret_key: Secret = Secret::default(),
        /// Older secret keys still accepted when verifying signatures (key rotation).
        pub secret_key_fallbacks: Vec<Secret> = Vec::new(),
        /// Directory of handlebars `*.hbs` templates, relative to the working directory.
        pub templates: PathBuf = "templates".into(),
        /// URL prefix of static files.
        pub static_url: String = "/static/".into(),
        /// Directory of static files (served by switchyard when `debug = true`).
        pub static_dir: PathBuf = "static".into(),
        /// This node's id in the cluster; empty: `hostname-pid` ([`ServerConfig::node_id_or_default`]).
        pub node_id: String = String::new(),
        /// Seconds in-flight requests get to finish on SIGINT/SIGTERM.
        pub shutdown_timeout: u64 = 5,
    }
}

impl ServerConfig {
    /// `node_id`, or `hostname-pid` when it is empty (the host name, else `localhost`).
    pub fn node_id_or_default(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = hostname::get().ok().and_then(|h| h.into_string().ok());
        let host = host.filter(|h| !h.is_empty());
        let host = host.as_deref().unwrap_or("localhost");
        format!("{host}-{}", std::process::id())
    }

    pub(super) fn validate(&self, v: &Origins) -> Result<(), ConfigError> {
        if self.bind.parse::<SocketAddr>().is_err() {
            let message = format!(
                "invalid socket address {:?} (expected IP:PORT such as \"127.0.0.1:8000\")",
                self.bind
            );
            return Err(v.fail("server.bind", message));
        }
        let key_bytes = self.secret_key.expose_secret().len();
        if !self.debug && key_bytes < MIN_SECRET_KEY_BYTES {
            let because = match v.of("server.debug") {
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

section! {
    /// `[log]`: logging (to stderr).
    pub struct LogConfig {
        /// `tracing_subscriber::EnvFilter` directives: a level (`trace`, `debug`, `info`, `warn`,
        /// `error`, `off`) or a comma-separated list of levels and `target=level` entries.
        /// `RUST_LOG` overrides it.
        pub level: String = "info".into(),
        /// Output format.
        pub format: LogFormat = LogFormat::Text,
    }
}

impl LogConfig {
    /// Parses `level` with tracing-subscriber's own parser, and also requires a non-empty filter
    /// whose every directive ends in a level: tracing reads `loud` as "target `loud`, every
    /// level" and `app=` as "target `app`", which in `log.level` are surely mistakes.
    pub(super) fn validate(&self, v: &Origins) -> Result<(), ConfigError> {
        let no_level = |d: &&str| {
            let level = d.rsplit('=').next().unwrap_or_default();
            level.is_empty() || level.parse::<LevelFilter>().is_err()
        };
        let mut directives = self.level.split(',').filter(|d| !d.trim().is_empty());
        let why = match EnvFilter::builder().parse(&self.level) {
            Err(e) => e.to_string(),
            Ok(_) if self.level.trim().is_empty() => "no directive".into(),
            Ok(_) => match directives.find(no_level) {
                Some(directive) => format!("{directive:?} does not end in a level"),
                None => return Ok(()),
            },
        };
        let message = format!(
            "expected a level (trace, debug, info, warn, error, off) or a comma-separated list of \
             levels and target=level directives, got {:?} ({why})",
            self.level
        );
        Err(v.fail("log.level", message))
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

section! {
    /// `[actors]`: how many actors of each kind a node runs (each in 1..=1024).
    pub struct ActorsConfig {
        /// Session actors, keyed by session id.
        pub session_shards: u32 = 8,
        /// Context-processor actors.
        pub context_workers: u32 = 4,
        /// actix-web worker threads.
        pub http_workers: u32 = 2,
    }
}

impl ActorsConfig {
    pub(super) fn validate(&self, v: &Origins) -> Result<(), ConfigError> {
        for (key, value) in [
            ("actors.session_shards", self.session_shards),
            ("actors.context_workers", self.context_workers),
            ("actors.http_workers", self.http_workers),
        ] {
            v.range(key, value.into(), 1, Some(1024))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_filters() {
        let check = |level: &str| {
            let log = LogConfig {
                level: level.into(),
                ..LogConfig::default()
            };
            log.validate(&Origins::default())
        };
        for ok in [
            "info",
            "WARN",
            "info,switchyard=debug",
            "actix_web=warn,switchyard::http=trace",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
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
            assert!(check(bad).is_err(), "{bad}");
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
