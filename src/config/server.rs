//! `[server]`, `[log]`, `[actors]`: the node; `[postgres]`, `[nats]`, `[redis]`, `[memcached]`,
//! `[file]`: the services it uses (passwords in their URLs are redacted when shown).

use std::path::PathBuf;

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use super::{LogFormat, Secret};

section! {
    /// `[server]`: the HTTP node.
    pub struct ServerConfig {
        /// Address to listen on, `IP:PORT` (port 0: any free port).
        pub bind: String = "127.0.0.1:8000".into(),
        /// Development mode; `false` requires a `secret_key` of at least 32 bytes.
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
        /// This node's id in the cluster; empty: [`ServerConfig::node_id_or_default`].
        pub node_id: String = String::new(),
        /// Seconds in-flight requests get to finish on SIGINT/SIGTERM.
        pub shutdown_timeout: u64 = 5,
    }

    /// `[log]`: logging (to stderr).
    pub struct LogConfig {
        /// `EnvFilter` directives: a level, or levels and `target=level`; `RUST_LOG` overrides it.
        pub level: String = "info".into(),
        /// Output format.
        pub format: LogFormat = LogFormat::Text,
    }

    /// `[actors]`: how many actors of each kind a node runs (each in 1..=1024).
    pub struct ActorsConfig {
        /// Session actors, keyed by session id.
        pub session_shards: u32 = 8,
        /// Context-processor actors.
        pub context_workers: u32 = 4,
        /// actix-web worker threads.
        pub http_workers: u32 = 2,
    }

    /// `[postgres]`: the database.
    pub struct PostgresConfig {
        /// `postgres://user[:password]@host:port/database` or `key=value` conninfo.
        #[serde(serialize_with = "super::secret::url")]
        pub url: Secret = "postgres://postgres@127.0.0.1:5432/switchyard".into(),
        /// Connections in the pool (>= 1).
        pub pool_size: u32 = 16,
    }

    /// `[nats]`: the NATS connection.
    pub struct NatsConfig {
        /// Server URL (several comma-separated), with an optional user and password or token.
        #[serde(serialize_with = "super::secret::url")]
        pub url: Secret = "nats://127.0.0.1:4222".into(),
        /// Prefix of every subject, stream (upper-cased) and KV bucket.
        pub prefix: String = "switchyard".into(),
        /// Path of a `.creds` file (JWT + NKey); empty: none.
        pub creds_file: String = String::new(),
        /// Authentication token; empty: none.
        pub token: Secret = Secret::default(),
        /// Path of an NKey seed file; empty: none.
        pub nkey_seed_file: String = String::new(),
        /// Path of a CA certificate for TLS; empty: system roots / no TLS.
        pub tls_ca_file: String = String::new(),
        /// Path of a client certificate for TLS; empty: none.
        pub tls_cert_file: String = String::new(),
        /// Path of the client certificate's key; empty: none.
        pub tls_key_file: String = String::new(),
    }

    /// `[redis]`: the `redis` session engine.
    pub struct RedisConfig {
        /// `redis://[:password@]host:port[/db]`.
        #[serde(serialize_with = "super::secret::url")]
        pub url: Secret = "redis://127.0.0.1:6379".into(),
    }

    /// `[memcached]`: the `memcached` session engine.
    pub struct MemcachedConfig {
        /// Servers as `host:port`.
        pub servers: Vec<String> = vec!["127.0.0.1:11211".into()],
    }

    /// `[file]`: the `file` session engine.
    pub struct FileConfig {
        /// Directory holding one file per session, relative to the working directory.
        pub dir: PathBuf = "sessions".into(),
    }
}

impl ServerConfig {
    /// `node_id`, or `hostname-pid` when it is empty (the host name, else `localhost`).
    pub fn node_id_or_default(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = hostname::get().ok().and_then(|h| h.into_string().ok());
        let host = host
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("{host}-{}", std::process::id())
    }
}

/// Why `level` is no filter: tracing refuses it, or a directive (`loud`, `app=`) has no level.
pub(super) fn level_error(level: &str) -> Option<String> {
    let is_level = |l: &str| !l.is_empty() && l.parse::<LevelFilter>().is_ok();
    let mut directives = level.split(',').filter(|d| !d.trim().is_empty());
    let no_level = directives.find(|d| d.rsplit('=').next().is_none_or(|l| !is_level(l)));
    match EnvFilter::builder().parse(level) {
        Err(e) => Some(e.to_string()),
        Ok(_) if level.trim().is_empty() => Some("no directive".into()),
        Ok(_) => no_level.map(|d| format!("{d:?} does not end in a level")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_filters() {
        let check = |level: &str| {
            let mut config = super::super::Config::default();
            config.log.level = level.into();
            config.validate()
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
