//! The typed configuration: built-in defaults < the TOML file < `SWITCHYARD_<SECTION>__<KEY>`
//! environment variables (command-line flags are applied on top by the CLI).
//!
//! [`Config::load`] is the one entry point. Every error it returns names where the offending
//! value came from: the file and line (and the dotted key), the environment variable, or the
//! built-in default. [`Config::to_redacted_toml`] renders the effective configuration with its
//! secrets replaced by `"<redacted>"`, which is what `switchyard config check` prints.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The placeholder that replaces secrets in [`Config::to_redacted_toml`] and in `Debug` output.
pub const REDACTED: &str = "<redacted>";

/// The prefix of every configuration environment variable.
const ENV_PREFIX: &str = "SWITCHYARD_";

/// Keys holding arrays of tables, which only the file can set.
const ARRAYS_OF_TABLES: &[&str] = &["auth.users", "tasks.queues", "beat.schedule"];

/// Where `Config::default_path` looks, relative to the working directory.
const DEFAULT_PATH: &str = "config/default.toml";

/// Log levels accepted in `log.level` directives.
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Bounds of the actor-count keys in `[actors]`.
const ACTORS_MAX: u32 = 1024;

/// Minimum length of `server.secret_key` when `server.debug = false`.
const MIN_SECRET_KEY_BYTES: usize = 32;

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

/// The whole configuration, one field per TOML section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: the HTTP node.
    pub server: ServerConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
    /// `[sessions]`: the session engine and the session cookie.
    pub sessions: SessionsConfig,
    /// `[auth]`: users and login.
    pub auth: AuthConfig,
    /// `[postgres]`: the database used by the `postgres`/`cached_db` engines and `auth.store`.
    pub postgres: PostgresConfig,
    /// `[nats]`: the NATS connection (task broker, `nats_kv` engine, events).
    pub nats: NatsConfig,
    /// `[redis]`: the `redis` session engine.
    pub redis: RedisConfig,
    /// `[memcached]`: the `memcached` session engine.
    pub memcached: MemcachedConfig,
    /// `[file]`: the `file` session engine.
    pub file: FileConfig,
    /// `[context]`: template context processors.
    pub context: ContextConfig,
    /// `[actors]`: how many actors of each kind a node runs.
    pub actors: ActorsConfig,
    /// `[tasks]`: the task system (broker, retries, queues).
    pub tasks: TasksConfig,
    /// `[mail]`: outgoing mail.
    pub mail: MailConfig,
    /// `[beat]`: periodic schedules.
    pub beat: BeatConfig,
}

impl Config {
    /// Loads the configuration: built-in defaults, then the file at `path` (when given), then
    /// the process environment; validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(name, value)| {
                let name = name.into_string().ok()?;
                let value = value
                    .into_string()
                    .unwrap_or_else(|v| v.to_string_lossy().into_owned());
                Some((name, value))
            })
            .collect();
        Self::load_with_env(path, &env)
    }

    /// Like [`Config::load`], with the environment given explicitly (for tests and embedding).
    /// Only variables named `SWITCHYARD_<SECTION>__<KEY>` are considered.
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut origins = Origins {
            loaded: true,
            ..Origins::default()
        };
        let config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.to_path_buf(),
                    error,
                })?;
                let (config, lines) = parse_file(path, &text)?;
                origins.file = Some((path.to_path_buf(), lines));
                config
            }
            None => Config::default(),
        };
        let config = apply_env(config, env, &mut origins)?;
        config.validate_with(&origins)?;
        Ok(config)
    }

    /// `config/default.toml` when it exists in the working directory, else `None` (built-in
    /// defaults alone).
    pub fn default_path() -> Option<PathBuf> {
        let path = PathBuf::from(DEFAULT_PATH);
        path.is_file().then_some(path)
    }

    /// Checks every validation rule (ranges, formats and cross-field rules). [`Config::load`]
    /// calls it; call it again after changing fields by hand (command-line flags, say). Errors
    /// from this direct call cannot know where a value came from and name only the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(&Origins::default())
    }

    /// The effective configuration as TOML, every section written out, with secrets (the secret
    /// keys, the NATS token, password hashes and passwords inside URLs) replaced by
    /// `"<redacted>"` when they are set.
    pub fn to_redacted_toml(&self) -> String {
        match toml::to_string(&self.redacted()) {
            Ok(text) => text,
            Err(e) => format!("# the configuration cannot be shown as TOML: {e}\n"),
        }
    }

    /// A copy with every secret replaced by [`REDACTED`] (empty values stay empty).
    fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.server.secret_key = redact(&c.server.secret_key);
        for key in &mut c.server.secret_key_fallbacks {
            *key = redact(key);
        }
        c.nats.token = redact(&c.nats.token);
        c.nats.url = redact_url(&c.nats.url, true);
        c.postgres.url = redact_url(&c.postgres.url, false);
        c.redis.url = redact_url(&c.redis.url, false);
        for user in &mut c.auth.users {
            user.password_hash = redact(&user.password_hash);
        }
        c
    }

    fn validate_with(&self, origins: &Origins) -> Result<(), ConfigError> {
        let v = Validator { origins };
        self.validate_server(&v)?;
        self.validate_log(&v)?;
        self.validate_sessions(&v)?;
        self.validate_auth(&v)?;
        v.at_least("postgres.pool_size", self.postgres.pool_size, 1)?;
        self.validate_nats(&v)?;
        self.validate_context(&v)?;
        v.between(
            "actors.session_shards",
            self.actors.session_shards,
            1,
            ACTORS_MAX,
        )?;
        v.between(
            "actors.context_workers",
            self.actors.context_workers,
            1,
            ACTORS_MAX,
        )?;
        v.between(
            "actors.http_workers",
            self.actors.http_workers,
            1,
            ACTORS_MAX,
        )?;
        self.validate_tasks(&v)?;
        if !self.mail.from.contains('@') {
            return Err(v.fail(
                "mail.from",
                format!("expected an e-mail address, got {:?}", self.mail.from),
            ));
        }
        self.validate_beat(&v)
    }

    fn validate_server(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.bind.parse::<SocketAddr>().is_err() {
            return Err(v.fail(
                "server.bind",
                format!(
                    "invalid socket address {:?} (expected IP:PORT such as \"127.0.0.1:8000\")",
                    s.bind
                ),
            ));
        }
        if !s.debug && s.secret_key.len() < MIN_SECRET_KEY_BYTES {
            let because = match v.origins.of("server.debug") {
                origin @ (Origin::File { .. } | Origin::Env(_)) => format!(" (set at {origin})"),
                Origin::Default | Origin::Unknown => String::new(),
            };
            return Err(v.fail(
                "server.secret_key",
                format!(
                    "expected at least {MIN_SECRET_KEY_BYTES} bytes when server.debug = \
                     false{because}, got {} bytes",
                    s.secret_key.len()
                ),
            ));
        }
        Ok(())
    }

    fn validate_log(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        if !is_log_filter(&self.log.level) {
            return Err(v.fail(
                "log.level",
                format!(
                    "expected a level (trace, debug, info, warn, error, off) or a comma-separated \
                     list of levels and target=level directives, got {:?}",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }

    fn validate_sessions(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        let s = &self.sessions;
        if s.cookie_name.is_empty()
            || !s
                .cookie_name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
        {
            return Err(v.fail(
                "sessions.cookie_name",
                format!(
                    "expected a non-empty cookie name token, got {:?}",
                    s.cookie_name
                ),
            ));
        }
        v.at_least("sessions.cookie_age", s.cookie_age, 1)?;
        if !s.cookie_path.starts_with('/') {
            return Err(v.fail(
                "sessions.cookie_path",
                format!(
                    "expected a path starting with \"/\", got {:?}",
                    s.cookie_path
                ),
            ));
        }
        if s.cookie_same_site == SameSite::None && !s.cookie_secure {
            return Err(v.fail(
                "sessions.cookie_same_site",
                "\"none\" requires sessions.cookie_secure = true",
            ));
        }
        if s.encrypt && self.server.secret_key.is_empty() {
            return Err(v.fail(
                "sessions.encrypt",
                "true requires server.secret_key (the encryption key is derived from it)",
            ));
        }
        v.at_least("sessions.max_size", s.max_size, 1)
    }

    fn validate_auth(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        if self.auth.login_url.is_empty() {
            return Err(v.fail("auth.login_url", "expected a non-empty URL"));
        }
        let mut seen = HashSet::new();
        for (i, user) in self.auth.users.iter().enumerate() {
            let key = format!("auth.users[{i}]");
            if user.username.is_empty() {
                return Err(v.fail(format!("{key}.username"), "expected a non-empty user name"));
            }
            if !seen.insert(user.username.as_str()) {
                return Err(v.fail(
                    format!("{key}.username"),
                    format!("user {:?} is defined more than once", user.username),
                ));
            }
            if argon2::PasswordHash::new(&user.password_hash).is_err() {
                return Err(v.fail(
                    format!("{key}.password_hash"),
                    "expected a PHC password hash such as \"$argon2id$v=19$m=19456,t=2,p=1$...\"",
                ));
            }
        }
        Ok(())
    }

    fn validate_nats(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        if !is_name(&self.nats.prefix) {
            return Err(v.fail(
                "nats.prefix",
                format!(
                    "expected a non-empty name of letters, digits, '_' and '-', got {:?}",
                    self.nats.prefix
                ),
            ));
        }
        Ok(())
    }

    fn validate_context(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (i, name) in self.context.processors.iter().enumerate() {
            let key = format!("context.processors[{i}]");
            if name.is_empty() {
                return Err(v.fail(key, "expected a non-empty processor name"));
            }
            if !seen.insert(name.as_str()) {
                return Err(v.fail(key, format!("processor {name:?} is listed more than once")));
            }
        }
        v.at_least("context.timeout_ms", self.context.timeout_ms, 1)
    }

    fn validate_tasks(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        let t = &self.tasks;
        for (key, value) in [
            ("tasks.retry_backoff_base", t.retry_backoff_base),
            ("tasks.retry_backoff_max", t.retry_backoff_max),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(v.fail(
                    key,
                    format!("expected a non-negative number of seconds, got {value}"),
                ));
            }
        }
        v.at_least("tasks.max_deliver", t.max_deliver, 1)?;
        if t.queues.is_empty() {
            return Err(v.fail("tasks.queues", "expected at least one queue"));
        }
        let mut seen = HashSet::new();
        for (i, queue) in t.queues.iter().enumerate() {
            let key = format!("tasks.queues[{i}]");
            if !is_name(&queue.name) {
                return Err(v.fail(
                    format!("{key}.name"),
                    format!(
                        "expected a non-empty name of letters, digits, '_' and '-', got {:?}",
                        queue.name
                    ),
                ));
            }
            if !seen.insert(queue.name.as_str()) {
                return Err(v.fail(
                    format!("{key}.name"),
                    format!("queue {:?} is defined more than once", queue.name),
                ));
            }
            v.at_least(&format!("{key}.concurrency"), queue.concurrency, 1)?;
            if parse_rate_limit(&queue.rate_limit).is_none() {
                return Err(v.fail(
                    format!("{key}.rate_limit"),
                    format!(
                        "expected \"N/s\", \"N/m\", \"N/h\" (N >= 1) or \"\", got {:?}",
                        queue.rate_limit
                    ),
                ));
            }
        }
        if !seen.contains(t.default_queue.as_str()) {
            return Err(v.fail(
                "tasks.default_queue",
                format!(
                    "expected one of the queues in tasks.queues ({}), got {:?}",
                    quoted_list(t.queues.iter().map(|q| q.name.as_str())),
                    t.default_queue
                ),
            ));
        }
        Ok(())
    }

    fn validate_beat(&self, v: &Validator<'_>) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (i, entry) in self.beat.schedule.iter().enumerate() {
            let key = format!("beat.schedule[{i}]");
            if entry.name.is_empty() {
                return Err(v.fail(format!("{key}.name"), "expected a non-empty schedule name"));
            }
            if !seen.insert(entry.name.as_str()) {
                return Err(v.fail(
                    format!("{key}.name"),
                    format!("schedule {:?} is defined more than once", entry.name),
                ));
            }
            if entry.task.is_empty() {
                return Err(v.fail(format!("{key}.task"), "expected a non-empty task name"));
            }
            match (&entry.every, &entry.cron) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(v.fail(key, "expected exactly one of `every` and `cron`"));
                }
                (Some(every), None) => {
                    if parse_every(every).is_none() {
                        return Err(v.fail(
                            format!("{key}.every"),
                            format!(
                                "expected a positive interval such as \"30s\", \"5m\", \"1h\", \
                                 \"1d\" or \"1h30m\", got {every:?}"
                            ),
                        ));
                    }
                }
                (None, Some(cron)) => {
                    let fields = cron.split_whitespace().count();
                    if fields != 6 {
                        return Err(v.fail(
                            format!("{key}.cron"),
                            format!(
                                "expected 6 fields (sec min hour day month weekday), got {fields} \
                                 in {cron:?}"
                            ),
                        ));
                    }
                }
            }
            if let Some(queue) = &entry.queue {
                if !self.tasks.queues.iter().any(|q| &q.name == queue) {
                    return Err(v.fail(
                        format!("{key}.queue"),
                        format!("expected one of the queues in tasks.queues, got {queue:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

/// `[server]`: the HTTP node.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, `IP:PORT` (port 0: any free port).
    pub bind: String,
    /// Development mode: detailed error pages, template reloading, static files served.
    /// `false` requires a `secret_key` of at least 32 bytes.
    pub debug: bool,
    /// Secret that signs cookies and CSRF tokens and derives the encryption key (bytes of text).
    pub secret_key: String,
    /// Older secret keys still accepted when verifying signatures (key rotation).
    pub secret_key_fallbacks: Vec<String>,
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
            secret_key: String::new(),
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
    /// `node_id`, or `hostname-pid` when it is empty (the host name from `/etc/hostname`, else
    /// the `HOSTNAME` environment variable, else `localhost`).
    pub fn node_id_or_default(&self) -> String {
        if self.node_id.is_empty() {
            format!("{}-{}", hostname(), std::process::id())
        } else {
            self.node_id.clone()
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fallbacks: Vec<String> = self
            .secret_key_fallbacks
            .iter()
            .map(|k| redact(k))
            .collect();
        f.debug_struct("ServerConfig")
            .field("bind", &self.bind)
            .field("debug", &self.debug)
            .field("secret_key", &redact(&self.secret_key))
            .field("secret_key_fallbacks", &fallbacks)
            .field("templates", &self.templates)
            .field("static_url", &self.static_url)
            .field("static_dir", &self.static_dir)
            .field("node_id", &self.node_id)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish()
    }
}

/// `[log]`: logging (to stderr).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Filter directives: a level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or a
    /// comma-separated list of levels and `target=level` entries. `RUST_LOG` overrides it.
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

/// `[sessions]`: the session engine and the session cookie.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Where session data lives.
    pub engine: SessionEngine,
    /// Name of the session cookie.
    pub cookie_name: String,
    /// Lifetime of a session and its cookie, in seconds (>= 1; default two weeks).
    pub cookie_age: u64,
    /// Make the cookie a browser-session cookie (no `Max-Age`).
    pub expire_at_browser_close: bool,
    /// Save the session (and refresh its expiry) on every request, not only when modified.
    pub save_every_request: bool,
    /// Set the cookie's `Secure` attribute.
    pub cookie_secure: bool,
    /// Set the cookie's `HttpOnly` attribute.
    pub cookie_http_only: bool,
    /// The cookie's `SameSite` attribute; `none` requires `cookie_secure = true`.
    pub cookie_same_site: SameSite,
    /// The cookie's `Domain` attribute; empty: host-only cookie.
    pub cookie_domain: String,
    /// The cookie's `Path` attribute.
    pub cookie_path: String,
    /// What happens to the anonymous session's data at login.
    pub on_login: OnLogin,
    /// Largest serialized session, in bytes (>= 1); larger writes are refused.
    pub max_size: usize,
    /// Encrypt session data at rest in server-side engines (key derived from `secret_key`).
    pub encrypt: bool,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            engine: SessionEngine::Memory,
            cookie_name: "sessionid".into(),
            cookie_age: 1_209_600,
            expire_at_browser_close: false,
            save_every_request: false,
            cookie_secure: false,
            cookie_http_only: true,
            cookie_same_site: SameSite::Lax,
            cookie_domain: String::new(),
            cookie_path: "/".into(),
            on_login: OnLogin::Preserve,
            max_size: 65_536,
            encrypt: false,
        }
    }
}

/// `[auth]`: users and login.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Where users are looked up.
    pub store: AuthStore,
    /// Path anonymous visitors are redirected to when a page requires login.
    pub login_url: String,
    /// `[[auth.users]]`: the users of `store = "config"` (none built in).
    pub users: Vec<UserEntry>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            store: AuthStore::Config,
            login_url: "/login".into(),
            users: Vec::new(),
        }
    }
}

/// One `[[auth.users]]` entry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// The login name (unique).
    pub username: String,
    /// PHC-format password hash, e.g. `$argon2id$v=19$m=19456,t=2,p=1$...`.
    pub password_hash: String,
    /// Permission names such as `shop.view_order`.
    #[serde(default)]
    pub permissions: Vec<String>,
}

impl fmt::Debug for UserEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserEntry")
            .field("username", &self.username)
            .field("password_hash", &redact(&self.password_hash))
            .field("permissions", &self.permissions)
            .finish()
    }
}

/// `[postgres]`: the database.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user[:password]@host:port/database`.
    pub url: String,
    /// Connections in the pool (>= 1).
    pub pool_size: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/switchyard".into(),
            pool_size: 16,
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url, false))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// `[nats]`: the NATS connection.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL (several may be given comma-separated).
    pub url: String,
    /// Prefix of every subject, stream (upper-cased) and KV bucket.
    pub prefix: String,
    /// Path of a `.creds` file (JWT + NKey); empty: none.
    pub creds_file: String,
    /// Authentication token; empty: none.
    pub token: String,
    /// Path of an NKey seed file; empty: none.
    pub nkey_seed_file: String,
    /// Path of a CA certificate for TLS; empty: system roots / no TLS.
    pub tls_ca_file: String,
    /// Path of a client certificate for TLS; empty: none.
    pub tls_cert_file: String,
    /// Path of the client certificate's key; empty: none.
    pub tls_key_file: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "switchyard".into(),
            creds_file: String::new(),
            token: String::new(),
            nkey_seed_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url, true))
            .field("prefix", &self.prefix)
            .field("creds_file", &self.creds_file)
            .field("token", &redact(&self.token))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

/// `[redis]`: the `redis` session engine.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Connection URL, `redis://[:password@]host:port[/db]`.
    pub url: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url, false))
            .finish()
    }
}

/// `[memcached]`: the `memcached` session engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemcachedConfig {
    /// Servers as `host:port`.
    pub servers: Vec<String>,
}

impl Default for MemcachedConfig {
    fn default() -> Self {
        Self {
            servers: vec!["127.0.0.1:11211".into()],
        }
    }
}

/// `[file]`: the `file` session engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Directory holding one file per session, relative to the working directory.
    pub dir: PathBuf,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            dir: "sessions".into(),
        }
    }
}

/// `[context]`: template context processors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContextConfig {
    /// Registered processor names, in merge order (later ones win on equal variable names).
    pub processors: Vec<String>,
    /// Run only the processors whose variables the template uses.
    pub lazy: bool,
    /// Time budget of each processor, in milliseconds (>= 1).
    pub timeout_ms: u64,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            processors: ["debug", "request", "auth", "messages", "csrf", "static"]
                .map(String::from)
                .to_vec(),
            lazy: true,
            timeout_ms: 200,
        }
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

/// `[tasks]`: the task system.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Where the queues live.
    pub broker: Broker,
    /// Run tasks inline on publish (for tests).
    pub always_eager: bool,
    /// Queue of tasks published without one; must be in `queues`.
    pub default_queue: String,
    /// Seconds result records are kept.
    pub result_ttl: u64,
    /// Retries a task gets unless it says otherwise.
    pub default_max_retries: u32,
    /// Retry backoff base, in seconds: attempt n waits a random time in [d/2, d],
    /// d = min(base * 2^n, max).
    pub retry_backoff_base: f64,
    /// Retry backoff ceiling, in seconds.
    pub retry_backoff_max: f64,
    /// Seconds after which a running task's cancellation token fires; 0 = none.
    pub soft_time_limit: u64,
    /// Seconds after which a running task is aborted and the attempt fails; 0 = none.
    pub time_limit: u64,
    /// Seconds before an unacknowledged task is redelivered.
    pub ack_wait: u64,
    /// Deliveries (crashes included) before a task is dead-lettered (>= 1).
    pub max_deliver: u32,
    /// Seconds of the stream's duplicate-detection window.
    pub dedupe_window: u64,
    /// Seconds a stopping worker gives its in-flight tasks.
    pub drain_timeout: u64,
    /// `[[tasks.queues]]`: the queues (built in: `default` alone).
    pub queues: Vec<QueueConfig>,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            broker: Broker::Memory,
            always_eager: false,
            default_queue: "default".into(),
            result_ttl: 86_400,
            default_max_retries: 3,
            retry_backoff_base: 1.0,
            retry_backoff_max: 600.0,
            soft_time_limit: 0,
            time_limit: 0,
            ack_wait: 30,
            max_deliver: 10,
            dedupe_window: 120,
            drain_timeout: 30,
            queues: vec![QueueConfig::default()],
        }
    }
}

impl TasksConfig {
    /// The queue called `name`, if configured.
    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }
}

/// One `[[tasks.queues]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue name: letters, digits, `_` and `-` (unique).
    pub name: String,
    /// Tasks of this queue a worker runs at once (>= 1; default 8).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Most task starts per time unit on each worker: `"N/s"`, `"N/m"`, `"N/h"`; empty = none.
    #[serde(default)]
    pub rate_limit: String,
}

fn default_concurrency() -> u32 {
    8
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            concurrency: default_concurrency(),
            rate_limit: String::new(),
        }
    }
}

impl QueueConfig {
    /// The rate limit in tasks per second; `None` when there is none (or it is malformed,
    /// which validation rejects).
    pub fn rate_limit_per_sec(&self) -> Option<f64> {
        parse_rate_limit(&self.rate_limit).flatten()
    }
}

/// `[mail]`: outgoing mail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// How mail is "sent".
    pub backend: MailBackend,
    /// Directory of the `file` backend (`<dir>/<task id>.eml`), relative to the working
    /// directory.
    pub dir: PathBuf,
    /// Sender address.
    pub from: String,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            backend: MailBackend::File,
            dir: "outbox".into(),
            from: "shop@example.com".into(),
        }
    }
}

/// `[beat]`: periodic schedules.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BeatConfig {
    /// `[[beat.schedule]]`: the schedules (none built in).
    pub schedule: Vec<ScheduleEntry>,
}

/// One `[[beat.schedule]]` entry: exactly one of `every` and `cron`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Schedule name (unique); identifies its ticks across beat nodes.
    pub name: String,
    /// Task to publish, e.g. `switchyard.clear_sessions`.
    pub task: String,
    /// Interval such as `"30s"`, `"5m"`, `"1h"`, `"1d"` or `"1h30m"`.
    #[serde(default)]
    pub every: Option<String>,
    /// Cron expression with seconds, 6 fields: `sec min hour day month weekday`.
    #[serde(default)]
    pub cron: Option<String>,
    /// Queue to publish to; default: the task's own queue or `tasks.default_queue`.
    #[serde(default)]
    pub queue: Option<String>,
    /// Task arguments (a TOML table, a JSON object on the wire).
    #[serde(default)]
    pub args: serde_json::Map<String, serde_json::Value>,
}

impl ScheduleEntry {
    /// The `every` interval, when set and well-formed.
    pub fn every_duration(&self) -> Option<Duration> {
        self.every.as_deref().and_then(parse_every)
    }
}

// ---------------------------------------------------------------------------------------------
// Enumerations
// ---------------------------------------------------------------------------------------------

macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        $name:ident default $default:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The configuration spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// The session cookie's `SameSite` attribute.
    SameSite default Lax {
        /// `lax`: sent on top-level navigations.
        Lax => "lax",
        /// `strict`: same-site requests only.
        Strict => "strict",
        /// `none`: always sent (requires `Secure`).
        None => "none",
    }
}

string_enum! {
    /// What happens to the anonymous session's data at login.
    OnLogin default Preserve {
        /// Keep it, under a new session key.
        Preserve => "preserve",
        /// Merge it into the user's previous session.
        Merge => "merge",
        /// Drop it.
        Discard => "discard",
    }
}

string_enum! {
    /// Where session data lives.
    SessionEngine default Memory {
        /// In the node's memory (single node only).
        Memory => "memory",
        /// One file per session under `file.dir`.
        File => "file",
        /// A Postgres table.
        Postgres => "postgres",
        /// Postgres, cached in memory with NATS invalidations.
        CachedDb => "cached_db",
        /// A NATS key-value bucket.
        NatsKv => "nats_kv",
        /// Redis.
        Redis => "redis",
        /// Memcached.
        Memcached => "memcached",
        /// In the (signed) cookie itself.
        SignedCookies => "signed_cookies",
    }
}

string_enum! {
    /// Where task queues live.
    Broker default Memory {
        /// Inside `switchyard serve` (single node).
        Memory => "memory",
        /// NATS JetStream.
        Nats => "nats",
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

string_enum! {
    /// How mail is delivered.
    MailBackend default File {
        /// Written to `mail.dir`.
        File => "file",
        /// Printed to stderr.
        Console => "console",
    }
}

string_enum! {
    /// Where users are looked up.
    AuthStore default Config {
        /// `[[auth.users]]` in the configuration.
        Config => "config",
        /// The Postgres database.
        Postgres => "postgres",
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

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
    /// Not known (a value set in code, checked by [`Config::validate`]).
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
    /// An environment variable naming an array of tables, which only the file can set.
    #[error(
        "{var}: `{key}` is an array of tables and cannot be set from the environment; \
         set it in the configuration file"
    )]
    NotSettableFromEnv {
        /// The variable.
        var: String,
        /// Dotted key.
        key: String,
    },
    /// The configuration could not be converted for environment overrides (a bug).
    #[error("internal configuration error: {0}")]
    Internal(String),
}

impl ConfigError {
    /// The process exit code for this error: always 2 (invalid configuration).
    pub fn exit_code(&self) -> i32 {
        2
    }

    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. }
            | ConfigError::Invalid { key, .. }
            | ConfigError::NotSettableFromEnv { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } | ConfigError::Internal(_) => {
                None
            }
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

// ---------------------------------------------------------------------------------------------
// Origins and validation helpers
// ---------------------------------------------------------------------------------------------

/// Where each value of a loaded configuration came from.
#[derive(Debug, Default)]
struct Origins {
    /// False for a configuration that was not loaded (origins unknown).
    loaded: bool,
    /// The file and where its keys are set.
    file: Option<(PathBuf, KeyLines)>,
    /// Dotted key → the environment variable that set it.
    env: HashMap<String, String>,
}

impl Origins {
    fn of(&self, key: &str) -> Origin {
        if !self.loaded {
            return Origin::Unknown;
        }
        for candidate in key_and_parents(key) {
            if let Some(var) = self.env.get(candidate) {
                return Origin::Env(var.clone());
            }
            if let Some((path, lines)) = &self.file {
                if let Some(line) = lines.line_of(candidate) {
                    return Origin::File {
                        path: path.clone(),
                        line,
                    };
                }
            }
        }
        Origin::Default
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

struct Validator<'a> {
    origins: &'a Origins,
}

impl Validator<'_> {
    fn fail(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let key = key.into();
        ConfigError::Invalid {
            origin: self.origins.of(&key),
            key,
            message: message.into(),
        }
    }

    fn at_least<T: PartialOrd + fmt::Display>(
        &self,
        key: &str,
        value: T,
        min: T,
    ) -> Result<(), ConfigError> {
        if value < min {
            return Err(self.fail(key, format!("expected an integer >= {min}, got {value}")));
        }
        Ok(())
    }

    fn between<T: PartialOrd + fmt::Display>(
        &self,
        key: &str,
        value: T,
        min: T,
        max: T,
    ) -> Result<(), ConfigError> {
        if value < min || value > max {
            return Err(self.fail(
                key,
                format!("expected an integer from {min} to {max}, got {value}"),
            ));
        }
        Ok(())
    }
}

/// Letters, digits, `_` and `-`, at least one.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A simple `EnvFilter`-like check: comma-separated `level` or `target=level` directives.
fn is_log_filter(s: &str) -> bool {
    let is_level = |l: &str| LOG_LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let mut directives = 0;
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        directives += 1;
        let ok = match directive.split_once('=') {
            Some((target, level)) => {
                !target.is_empty()
                    && target
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b))
                    && is_level(level)
            }
            None => is_level(directive),
        };
        if !ok {
            return false;
        }
    }
    directives > 0
}

/// `""` → `Some(None)`; `"N/s"`, `"N/m"`, `"N/h"` with N >= 1 → `Some(Some(per second))`;
/// anything else → `None`.
fn parse_rate_limit(s: &str) -> Option<Option<f64>> {
    if s.is_empty() {
        return Some(None);
    }
    let (count, unit) = s.split_once('/')?;
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let count: u64 = count.parse().ok().filter(|&n| n >= 1)?;
    let seconds = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(Some(count as f64 / seconds))
}

/// `"30s"`, `"5m"`, `"1h"`, `"1d"` and combinations in descending unit order (`"1h30m"`);
/// the total must be positive.
fn parse_every(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total: u64 = 0;
    let mut previous_rank = u8::MAX;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let count: u64 = rest[..digits].parse().ok()?;
        let (rank, unit_secs) = match rest.as_bytes().get(digits)? {
            b'd' => (3, 86_400),
            b'h' => (2, 3_600),
            b'm' => (1, 60),
            b's' => (0, 1),
            _ => return None,
        };
        if rank >= previous_rank {
            return None;
        }
        previous_rank = rank;
        total = total.checked_add(count.checked_mul(unit_secs)?)?;
        rest = &rest[digits + 1..];
    }
    (total > 0).then(|| Duration::from_secs(total))
}

fn hostname() -> String {
    let clean = |s: String| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(clean)
        .or_else(|| std::env::var("HOSTNAME").ok().and_then(clean))
        .unwrap_or_else(|| "localhost".to_owned())
}

fn quoted_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------------------------

fn redact(secret: &str) -> String {
    if secret.is_empty() {
        String::new()
    } else {
        REDACTED.to_owned()
    }
}

/// Replaces the password of `scheme://user:password@host/...` (and a `password=` query
/// parameter) by [`REDACTED`]. With `bare_user_is_secret`, a user without password (a NATS
/// token, `nats://TOKEN@host`) is redacted too. Comma-separated URL lists are handled.
fn redact_url(url: &str, bare_user_is_secret: bool) -> String {
    if url.contains(',') {
        return url
            .split(',')
            .map(|u| redact_url(u, bare_user_is_secret))
            .collect::<Vec<_>>()
            .join(",");
    }
    let mut out = url.to_owned();
    if let Some(scheme_end) = url.find("://") {
        let start = scheme_end + 3;
        let end = url[start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| start + i);
        if let Some(at) = url[start..end].rfind('@') {
            let userinfo = &url[start..start + at];
            let redacted = match userinfo.split_once(':') {
                Some((user, password)) if !password.is_empty() => {
                    Some(format!("{user}:{REDACTED}"))
                }
                None if bare_user_is_secret && !userinfo.is_empty() => Some(REDACTED.to_owned()),
                _ => None,
            };
            if let Some(userinfo) = redacted {
                out = format!("{}{userinfo}{}", &url[..start], &url[start + at..]);
            }
        }
    }
    redact_query_password(&out)
}

fn redact_query_password(url: &str) -> String {
    let Some((base, rest)) = url.split_once('?') else {
        return url.to_owned();
    };
    let (query, fragment) = match rest.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (rest, None),
    };
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if name.eq_ignore_ascii_case("password") && !value.is_empty() => {
                format!("{name}={REDACTED}")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    match fragment {
        Some(fragment) => format!("{base}?{query}#{fragment}"),
        None => format!("{base}?{query}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

/// Parses the file's text over the built-in defaults, mapping errors to file:line and key.
fn parse_file(path: &Path, text: &str) -> Result<(Config, KeyLines), ConfigError> {
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        let (line, column) = e.span().map_or((1, 1), |span| line_col(text, span.start));
        return Err(ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: one_line(e.message()),
        });
    }
    let lines = KeyLines::scan(text);
    match toml::from_str::<Config>(text) {
        Ok(config) => Ok((config, lines)),
        Err(e) => {
            let line = e.span().map_or(1, |span| line_col(text, span.start).0);
            let origin = Origin::File {
                path: path.to_path_buf(),
                line,
            };
            let near = lines.path_at(line).unwrap_or_default();
            let message = e.message();
            if let Some(field) = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next())
            {
                let key = if near == field || near.ends_with(&format!(".{field}")) {
                    near.to_owned()
                } else if near.is_empty() {
                    field.to_owned()
                } else {
                    format!("{near}.{field}")
                };
                return Err(ConfigError::UnknownKey { origin, key });
            }
            let key = if near.is_empty() { "(top level)" } else { near };
            Err(ConfigError::Invalid {
                origin,
                key: key.to_owned(),
                message: humanize(message),
            })
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Turns serde's messages into what the user should write:
/// `invalid type: string "x", expected u32` → `expected an integer from 0 to 4294967295, got a
/// string ("x")`.
fn humanize(message: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!(
                "expected {}, got {}",
                describe_expected(expected, false),
                describe_unexpected(got, true)
            );
        }
    }
    if let Some(rest) = message.strip_prefix("invalid value: ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!(
                "expected {}, got {}",
                describe_expected(expected, true),
                describe_unexpected(got, false)
            );
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!(
                "expected {}, got {}",
                ticks_to_quotes(expected),
                ticks_to_quotes(got)
            );
        }
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("missing key {rest}");
    }
    one_line(message)
}

/// What serde expected, in configuration terms; integer ranges only with `with_range` (for
/// values of the right type but out of range).
fn describe_expected(expected: &str, with_range: bool) -> String {
    match expected.trim() {
        "u8" | "u16" | "u32" | "u64" | "usize" | "u128" if !with_range => "an integer".into(),
        "u8" => "an integer from 0 to 255".into(),
        "u16" => "an integer from 0 to 65535".into(),
        "u32" => format!("an integer from 0 to {}", u32::MAX),
        "u64" | "usize" | "u128" => "a non-negative integer".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" | "i128" => "an integer".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "a boolean".into(),
        "a string" | "path string" | "a borrowed string" | "variant identifier" | "a character" => {
            "a string".into()
        }
        "a sequence" => "an array".into(),
        "a map" => "a table".into(),
        other if other.starts_with("struct ") => "a table".into(),
        other if other.starts_with("enum ") => "a string".into(),
        other => ticks_to_quotes(other),
    }
}

/// `integer `5`` → `an integer (5)` (or `5` without `with_type`).
fn describe_unexpected(got: &str, with_type: bool) -> String {
    let got = got.trim();
    let kinds = [
        ("integer ", "an integer"),
        ("floating point ", "a float"),
        ("boolean ", "a boolean"),
        ("string ", "a string"),
        ("character ", "a string"),
    ];
    for (prefix, kind) in kinds {
        if let Some(value) = got.strip_prefix(prefix) {
            let value = value.trim_matches('`');
            return if with_type {
                format!("{kind} ({value})")
            } else {
                value.to_owned()
            };
        }
    }
    match got {
        "sequence" => "an array".into(),
        "map" => "a table".into(),
        other => ticks_to_quotes(other),
    }
}

fn ticks_to_quotes(s: &str) -> String {
    s.replace('`', "\"")
}

/// Where each key of a TOML document is set, in document order: dotted paths with array
/// indices (`tasks.queues[1].name`; the `[[tasks.queues]]` header itself is
/// `tasks.queues[1]`) and 1-based line numbers. Keys inside inline tables are not listed (their
/// parent key is).
#[derive(Debug, Default)]
struct KeyLines {
    entries: Vec<(String, usize)>,
}

impl KeyLines {
    /// Scans a document that is already known to be valid TOML.
    fn scan(text: &str) -> Self {
        Scanner {
            bytes: text.as_bytes(),
            pos: 0,
            line: 1,
        }
        .run()
    }

    fn line_of(&self, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|(p, _)| p == path)
            .map(|&(_, line)| line)
    }

    /// The last key or header set at or before `line`.
    fn path_at(&self, line: usize) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|&&(_, l)| l <= line)
            .map(|(p, _)| p.as_str())
    }
}

struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
    line: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn at(&self, s: &[u8]) -> bool {
        self.bytes
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(s))
    }

    /// Advances one byte, counting lines.
    fn bump(&mut self) {
        if self.peek() == Some(b'\n') {
            self.line += 1;
        }
        self.pos += 1;
    }

    fn skip_blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Skips to (not past) the end of the line.
    fn skip_to_eol(&mut self) {
        while !matches!(self.peek(), None | Some(b'\n')) {
            self.pos += 1;
        }
    }

    fn run(mut self) -> KeyLines {
        let mut entries = Vec::new();
        let mut table = String::new();
        let mut arrays: HashMap<String, usize> = HashMap::new();
        loop {
            self.skip_blank();
            let Some(c) = self.peek() else { break };
            match c {
                b'\n' | b'\r' => self.bump(),
                b'#' => self.skip_to_eol(),
                b'[' => {
                    let line = self.line;
                    let is_array = self.at(b"[[");
                    self.pos += if is_array { 2 } else { 1 };
                    let keys = self.key();
                    self.skip_blank();
                    while self.peek() == Some(b']') {
                        self.pos += 1;
                    }
                    table = resolve_header(&keys, is_array, &mut arrays);
                    entries.push((table.clone(), line));
                }
                _ => {
                    let line = self.line;
                    let keys = self.key();
                    if keys.is_empty() {
                        self.skip_to_eol();
                        continue;
                    }
                    let key = keys.join(".");
                    let path = if table.is_empty() {
                        key
                    } else {
                        format!("{table}.{key}")
                    };
                    entries.push((path, line));
                    self.skip_blank();
                    if self.peek() == Some(b'=') {
                        self.pos += 1;
                    }
                    self.value();
                }
            }
        }
        KeyLines { entries }
    }

    /// A dotted key: bare, "basic" or 'literal' parts separated by dots.
    fn key(&mut self) -> Vec<String> {
        let mut parts = Vec::new();
        loop {
            self.skip_blank();
            let part = match self.peek() {
                Some(b'"') => self.single_line_string(b'"'),
                Some(b'\'') => self.single_line_string(b'\''),
                _ => {
                    let start = self.pos;
                    while matches!(self.peek(), Some(b) if b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    {
                        self.pos += 1;
                    }
                    if start == self.pos {
                        break;
                    }
                    String::from_utf8_lossy(&self.bytes[start..self.pos]).into_owned()
                }
            };
            parts.push(part);
            self.skip_blank();
            if self.peek() == Some(b'.') {
                self.pos += 1;
            } else {
                break;
            }
        }
        parts
    }

    /// A one-line string starting at the current quote; returns its raw content.
    fn single_line_string(&mut self, quote: u8) -> String {
        self.pos += 1;
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b == quote || b == b'\n' {
                break;
            }
            if b == b'\\' && quote == b'"' {
                self.pos += 1;
            }
            self.pos += 1;
        }
        let end = self.pos.min(self.bytes.len());
        let content = String::from_utf8_lossy(&self.bytes[start.min(end)..end]).into_owned();
        if self.peek() == Some(quote) {
            self.pos += 1;
        }
        content
    }

    /// A multi-line string starting at the current triple quote.
    fn multi_line_string(&mut self, quote: u8) {
        let delimiter = [quote; 3];
        self.pos += 3;
        while let Some(b) = self.peek() {
            if b == b'\\' && quote == b'"' {
                self.bump();
                self.bump();
                continue;
            }
            if self.at(&delimiter) {
                self.pos += 3;
                // Up to two more quotes belong to the content.
                for _ in 0..2 {
                    if self.peek() == Some(quote) {
                        self.pos += 1;
                    }
                }
                return;
            }
            self.bump();
        }
    }

    /// Skips a value, up to and including the newline that ends it (arrays and inline tables
    /// may span lines).
    fn value(&mut self) {
        let mut depth = 0usize;
        while let Some(b) = self.peek() {
            match b {
                b'\n' => {
                    self.bump();
                    if depth == 0 {
                        return;
                    }
                }
                b'#' => self.skip_to_eol(),
                b'"' | b'\'' if self.at(&[b; 3]) => self.multi_line_string(b),
                b'"' | b'\'' => {
                    self.single_line_string(b);
                }
                b'[' | b'{' => {
                    depth += 1;
                    self.pos += 1;
                }
                b']' | b'}' => {
                    depth = depth.saturating_sub(1);
                    self.pos += 1;
                }
                _ => self.pos += 1,
            }
        }
    }
}

/// The path of a `[table]` or `[[array.of.tables]]` header, with the indices of the arrays of
/// tables it goes through.
fn resolve_header(keys: &[String], is_array: bool, arrays: &mut HashMap<String, usize>) -> String {
    let mut path = String::new();
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            path.push('.');
        }
        path.push_str(key);
        if is_array && i + 1 == keys.len() {
            let count = arrays.entry(path.clone()).or_insert(0);
            let index = *count;
            *count += 1;
            let _ = write!(path, "[{index}]");
        } else if let Some(count) = arrays.get(&path) {
            let _ = write!(path, "[{}]", count.saturating_sub(1));
        }
    }
    path
}

// ---------------------------------------------------------------------------------------------
// The environment
// ---------------------------------------------------------------------------------------------

/// Applies every `SWITCHYARD_<SECTION>__<KEY>` variable (in name order; for repeated names the
/// last wins), recording which key each one set.
fn apply_env(
    config: Config,
    env: &[(String, String)],
    origins: &mut Origins,
) -> Result<Config, ConfigError> {
    let mut vars: Vec<(&str, &str, &str, &str)> = env
        .iter()
        .filter_map(|(name, value)| {
            let (section, key) = name.strip_prefix(ENV_PREFIX)?.split_once("__")?;
            Some((name.as_str(), section, key, value.as_str()))
        })
        .collect();
    if vars.is_empty() {
        return Ok(config);
    }
    vars.sort_by_key(|&(name, ..)| name);

    let mut root = match toml::Value::try_from(&config) {
        Ok(toml::Value::Table(table)) => table,
        Ok(_) => {
            return Err(ConfigError::Internal(
                "the configuration is not a table".into(),
            ))
        }
        Err(e) => return Err(ConfigError::Internal(e.to_string())),
    };
    for (var, section, key, raw) in vars {
        let dotted = format!(
            "{}.{}",
            section.to_ascii_lowercase(),
            key.to_ascii_lowercase()
        );
        let canonical = section == section.to_ascii_uppercase() && key == key.to_ascii_uppercase();
        let slot = root
            .get_mut(&section.to_ascii_lowercase())
            .and_then(toml::Value::as_table_mut)
            .and_then(|table| table.get_mut(&key.to_ascii_lowercase()))
            .filter(|_| canonical);
        let Some(slot) = slot else {
            return Err(ConfigError::UnknownKey {
                origin: Origin::Env(var.to_owned()),
                key: dotted,
            });
        };
        if ARRAYS_OF_TABLES.contains(&dotted.as_str()) {
            return Err(ConfigError::NotSettableFromEnv {
                var: var.to_owned(),
                key: dotted,
            });
        }
        let invalid = |message: String| ConfigError::Invalid {
            origin: Origin::Env(var.to_owned()),
            key: dotted.clone(),
            message,
        };
        *slot = env_value(slot, raw).map_err(invalid)?;
        // Check the type-level rules (unsigned ranges, enum spellings) now, while the variable
        // that set the value is known.
        Config::deserialize(toml::Value::Table(root.clone()))
            .map_err(|e| invalid(humanize(e.message())))?;
        origins.env.insert(dotted, var.to_owned());
    }
    Config::deserialize(toml::Value::Table(root)).map_err(|e| ConfigError::Internal(e.to_string()))
}

/// Parses an environment value as the type of the value it replaces.
fn env_value(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    match current {
        Value::Boolean(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            _ => Err(format!("expected a boolean, got {raw:?}")),
        },
        Value::Integer(_) => raw
            .trim()
            .parse()
            .map(Value::Integer)
            .map_err(|_| format!("expected an integer, got {raw:?}")),
        Value::Float(_) => raw
            .trim()
            .parse()
            .map(Value::Float)
            .map_err(|_| format!("expected a number, got {raw:?}")),
        Value::Array(_) => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| Value::String(item.to_owned()))
                .collect(),
        )),
        Value::String(_) | Value::Datetime(_) | Value::Table(_) => {
            Ok(Value::String(raw.to_owned()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const STRONG_KEY: &str = "0123456789abcdef0123456789abcdef-strong";

    /// Writes `text` to `<tmp>/<name>` and loads it with `env`.
    fn load(name: &str, text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        Config::load_with_env(Some(&path), &owned(env))
    }

    fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
        env.iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn load_env(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_with_env(None, &owned(env))
    }

    fn message(result: Result<Config, ConfigError>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(e) => {
                assert_eq!(e.exit_code(), 2);
                e.to_string()
            }
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::default();
        assert_eq!(config.validate().ok(), Some(()));
        assert_eq!(load_env(&[]).ok(), Some(config.clone()));
        assert_eq!(config.tasks.queues, vec![QueueConfig::default()]);
        assert_eq!(config.server.bind, "127.0.0.1:8000");
        assert!(config.beat.schedule.is_empty() && config.auth.users.is_empty());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(load("empty.toml", "", &[]).ok(), Some(Config::default()));
    }

    #[test]
    fn default_toml_round_trips() {
        let text = toml::to_string(&Config::default()).expect("serialize");
        assert_eq!(load("round.toml", &text, &[]).ok(), Some(Config::default()));
    }

    #[test]
    fn missing_file_names_the_file() {
        let msg = message(Config::load_with_env(
            Some(Path::new("/nonexistent/switchyard.toml")),
            &[],
        ));
        assert!(
            msg.starts_with("/nonexistent/switchyard.toml: cannot read"),
            "{msg}"
        );
    }

    #[test]
    fn toml_syntax_error_names_file_line_and_column() {
        let msg = message(load("bad.toml", "[server]\ndebug = true\n\nbind = \n", &[]));
        assert!(msg.contains("bad.toml:4:"), "{msg}");
        assert!(msg.contains("TOML syntax error"), "{msg}");
    }

    #[test]
    fn unknown_key_names_file_line_and_dotted_key() {
        let msg = message(load("bad.toml", "[server]\ndebug = true\nfoo = 1\n", &[]));
        assert!(
            msg.ends_with("bad.toml:3: unknown key `server.foo`"),
            "{msg}"
        );
        let msg = message(load("bad.toml", "# hi\n[serverr]\nbind = \"x\"\n", &[]));
        assert!(msg.ends_with("bad.toml:2: unknown key `serverr`"), "{msg}");
        let text = "[[tasks.queues]]\nname = \"a\"\n[[tasks.queues]]\nname = \"b\"\nspeed = 2\n";
        let msg = message(load("bad.toml", text, &[]));
        assert!(
            msg.ends_with("bad.toml:5: unknown key `tasks.queues[1].speed`"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_file_line_and_key() {
        let text = "[server]\nbind = \"127.0.0.1:1\"\n\n[actors]\nhttp_workers = \"two\"\n";
        let msg = message(load("bad.toml", text, &[]));
        assert!(
            msg.contains("bad.toml:5: actors.http_workers: expected an integer"),
            "{msg}"
        );
        assert!(msg.contains("got a string"), "{msg}");
        let msg = message(load("bad.toml", "[sessions]\nengine = \"mongo\"\n", &[]));
        assert!(
            msg.contains("bad.toml:2: sessions.engine: expected one of"),
            "{msg}"
        );
        assert!(msg.contains("\"signed_cookies\""), "{msg}");
        let msg = message(load("bad.toml", "[tasks]\nmax_deliver = -1\n", &[]));
        assert!(
            msg.contains("bad.toml:2: tasks.max_deliver: expected an integer from 0"),
            "{msg}"
        );
    }

    #[test]
    fn missing_required_key_in_array_of_tables() {
        let msg = message(load("bad.toml", "[[tasks.queues]]\nconcurrency = 2\n", &[]));
        assert!(
            msg.contains("bad.toml:1: tasks.queues[0]: missing key `name`"),
            "{msg}"
        );
    }

    #[test]
    fn out_of_range_says_what_was_expected() {
        let msg = message(load("bad.toml", "[actors]\n\nsession_shards = 0\n", &[]));
        assert_eq!(msg, format!("{}", msg)); // Display is stable
        assert!(
            msg.contains(
                "bad.toml:3: actors.session_shards: expected an integer from 1 to 1024, got 0"
            ),
            "{msg}"
        );
        let msg = message(load("bad.toml", "[server]\nbind = \"nope\"\n", &[]));
        assert!(
            msg.contains("bad.toml:2: server.bind: invalid socket address \"nope\""),
            "{msg}"
        );
        let msg = message(load_env(&[("SWITCHYARD_POSTGRES__POOL_SIZE", "0")]));
        assert!(
            msg.contains("SWITCHYARD_POSTGRES__POOL_SIZE: expected an integer >= 1, got 0"),
            "{msg}"
        );
    }

    #[test]
    fn weak_secret_with_debug_false() {
        let text = "[server]\ndebug = false\nsecret_key = \"short\"\n";
        let msg = message(load("prod.toml", text, &[]));
        assert!(
            msg.contains("prod.toml:3: server.secret_key: expected at least 32 bytes"),
            "{msg}"
        );
        // Not set anywhere: the built-in default is blamed, and where debug = false came from.
        let msg = message(load("prod.toml", "[server]\ndebug = false\n", &[]));
        assert!(
            msg.starts_with("built-in default: server.secret_key:"),
            "{msg}"
        );
        assert!(msg.contains("prod.toml:2"), "{msg}");
        // From the environment.
        let msg = message(load(
            "prod.toml",
            "[server]\ndebug = false\nsecret_key = \"short\"\n",
            &[("SWITCHYARD_SERVER__SECRET_KEY", "still-short")],
        ));
        assert!(
            msg.starts_with("SWITCHYARD_SERVER__SECRET_KEY: expected at least 32"),
            "{msg}"
        );
        // A strong key passes.
        let text = format!("[server]\ndebug = false\nsecret_key = \"{STRONG_KEY}\"\n");
        assert!(load("prod.toml", &text, &[]).is_ok());
    }

    #[test]
    fn same_site_none_requires_secure() {
        let msg = message(load(
            "s.toml",
            "[sessions]\ncookie_same_site = \"none\"\n",
            &[],
        ));
        assert!(
            msg.contains("s.toml:2: sessions.cookie_same_site:"),
            "{msg}"
        );
        assert!(msg.contains("cookie_secure = true"), "{msg}");
        let text = "[sessions]\ncookie_same_site = \"none\"\ncookie_secure = true\n";
        assert!(load("s.toml", text, &[]).is_ok());
    }

    #[test]
    fn unknown_env_var_names_the_variable() {
        let msg = message(load_env(&[("SWITCHYARD_SERVER__BINDX", "x")]));
        assert_eq!(msg, "SWITCHYARD_SERVER__BINDX: unknown key `server.bindx`");
        let msg = message(load_env(&[("SWITCHYARD_NOPE__BIND", "x")]));
        assert!(msg.starts_with("SWITCHYARD_NOPE__BIND:"), "{msg}");
        let msg = message(load_env(&[("SWITCHYARD_server__bind", "x")]));
        assert!(msg.starts_with("SWITCHYARD_server__bind:"), "{msg}");
        // Not configuration at all.
        assert!(load_env(&[("SWITCHYARD_REQUIRE_SERVICES", "1"), ("HOME", "/")]).is_ok());
    }

    #[test]
    fn arrays_of_tables_cannot_come_from_env() {
        for var in [
            "SWITCHYARD_TASKS__QUEUES",
            "SWITCHYARD_BEAT__SCHEDULE",
            "SWITCHYARD_AUTH__USERS",
        ] {
            let msg = message(load_env(&[(var, "x")]));
            assert!(
                msg.starts_with(var) && msg.contains("array of tables"),
                "{msg}"
            );
        }
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let msg = message(load_env(&[("SWITCHYARD_SERVER__DEBUG", "maybe")]));
        assert_eq!(
            msg,
            "SWITCHYARD_SERVER__DEBUG: expected a boolean, got \"maybe\""
        );
        let msg = message(load_env(&[("SWITCHYARD_ACTORS__HTTP_WORKERS", "many")]));
        assert!(
            msg.starts_with("SWITCHYARD_ACTORS__HTTP_WORKERS: expected an integer"),
            "{msg}"
        );
        let msg = message(load_env(&[(
            "SWITCHYARD_SESSIONS__COOKIE_SAME_SITE",
            "sometimes",
        )]));
        assert!(
            msg.starts_with("SWITCHYARD_SESSIONS__COOKIE_SAME_SITE: expected one of"),
            "{msg}"
        );
        let msg = message(load_env(&[("SWITCHYARD_TASKS__RESULT_TTL", "-5")]));
        assert!(msg.contains("non-negative integer, got -5"), "{msg}");
        let msg = message(load_env(&[("SWITCHYARD_TASKS__RETRY_BACKOFF_MAX", "soon")]));
        assert!(msg.contains("expected a number"), "{msg}");
    }

    #[test]
    fn env_values_are_typed() -> Result<(), ConfigError> {
        let config = load_env(&[
            ("SWITCHYARD_SERVER__DEBUG", "0"),
            ("SWITCHYARD_SERVER__SECRET_KEY", STRONG_KEY),
            ("SWITCHYARD_SERVER__BIND", "0.0.0.0:9000"),
            ("SWITCHYARD_SESSIONS__ENGINE", "cached_db"),
            ("SWITCHYARD_TASKS__RETRY_BACKOFF_BASE", "2"),
            ("SWITCHYARD_ACTORS__HTTP_WORKERS", "16"),
            ("SWITCHYARD_MAIL__DIR", "/tmp/outbox"),
        ])?;
        assert!(!config.server.debug);
        assert_eq!(config.server.bind, "0.0.0.0:9000");
        assert_eq!(config.sessions.engine, SessionEngine::CachedDb);
        assert_eq!(config.tasks.retry_backoff_base, 2.0);
        assert_eq!(config.actors.http_workers, 16);
        assert_eq!(config.mail.dir, PathBuf::from("/tmp/outbox"));
        Ok(())
    }

    #[test]
    fn env_lists_are_comma_separated() -> Result<(), ConfigError> {
        let config = load_env(&[
            ("SWITCHYARD_MEMCACHED__SERVERS", "a:1, b:2,c:3"),
            ("SWITCHYARD_SERVER__SECRET_KEY_FALLBACKS", ""),
        ])?;
        assert_eq!(config.memcached.servers, ["a:1", "b:2", "c:3"]);
        assert!(config.server.secret_key_fallbacks.is_empty());
        let config = load_env(&[("SWITCHYARD_CONTEXT__PROCESSORS", "")])?;
        assert!(config.context.processors.is_empty());
        Ok(())
    }

    #[test]
    fn env_overrides_file() -> Result<(), ConfigError> {
        let text = "[server]\nbind = \"127.0.0.1:7000\"\n[tasks]\nbroker = \"memory\"\n";
        let config = load(
            "f.toml",
            text,
            &[
                ("SWITCHYARD_SERVER__BIND", "127.0.0.1:7001"),
                ("SWITCHYARD_TASKS__BROKER", "nats"),
            ],
        )?;
        assert_eq!(config.server.bind, "127.0.0.1:7001");
        assert_eq!(config.tasks.broker, Broker::Nats);
        // A validation error on an env-set key names the variable, not the file.
        let msg = message(load("f.toml", text, &[("SWITCHYARD_SERVER__BIND", "nope")]));
        assert!(
            msg.starts_with("SWITCHYARD_SERVER__BIND: invalid socket address"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn queues_and_schedules_are_checked() {
        let dup = "[[tasks.queues]]\nname = \"default\"\n[[tasks.queues]]\nname = \"default\"\n";
        let msg = message(load("q.toml", dup, &[]));
        assert!(msg.contains("q.toml:4: tasks.queues[1].name:"), "{msg}");
        let msg = message(load("q.toml", "[[tasks.queues]]\nname = \"a b\"\n", &[]));
        assert!(msg.contains("q.toml:2: tasks.queues[0].name:"), "{msg}");
        let msg = message(load("q.toml", "[[tasks.queues]]\nname = \"other\"\n", &[]));
        assert!(
            msg.contains("built-in default: tasks.default_queue:"),
            "{msg}"
        );
        let text = "[[tasks.queues]]\nname = \"default\"\nrate_limit = \"10/x\"\n";
        let msg = message(load("q.toml", text, &[]));
        assert!(
            msg.contains("q.toml:3: tasks.queues[0].rate_limit:"),
            "{msg}"
        );

        let both = "[[beat.schedule]]\nname = \"a\"\ntask = \"t\"\nevery = \"1h\"\ncron = \"0 * * * * *\"\n";
        let msg = message(load("b.toml", both, &[]));
        assert!(
            msg.contains("b.toml:1: beat.schedule[0]: expected exactly one"),
            "{msg}"
        );
        let cron = "[[beat.schedule]]\nname = \"a\"\ntask = \"t\"\ncron = \"* * * * *\"\n";
        let msg = message(load("b.toml", cron, &[]));
        assert!(
            msg.contains("b.toml:4: beat.schedule[0].cron: expected 6 fields"),
            "{msg}"
        );
        let every = "[[beat.schedule]]\nname = \"a\"\ntask = \"t\"\nevery = \"30m1h\"\n";
        let msg = message(load("b.toml", every, &[]));
        assert!(msg.contains("b.toml:4: beat.schedule[0].every:"), "{msg}");
    }

    #[test]
    fn schedule_parses() -> Result<(), ConfigError> {
        let text =
            "[[beat.schedule]]\nname = \"clear-sessions\"\ntask = \"switchyard.clear_sessions\"\n\
                    args = { limit = 10 }\nevery = \"1h30m\"\n\n[[beat.schedule]]\nname = \"c\"\n\
                    task = \"t\"\ncron = \"0 */5 * * * *\"\nqueue = \"default\"\n";
        let config = load("b.toml", text, &[])?;
        let first = &config.beat.schedule[0];
        assert_eq!(first.every_duration(), Some(Duration::from_secs(5400)));
        assert_eq!(first.args.get("limit"), Some(&serde_json::json!(10)));
        assert_eq!(config.beat.schedule[1].every_duration(), None);
        Ok(())
    }

    #[test]
    fn intervals_and_rate_limits() {
        assert_eq!(parse_every("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_every("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_every("1h30m"), Some(Duration::from_secs(5_400)));
        for bad in ["", "0s", "1x", "h", "1h1h", "30m1h", "1h 30m", "-1s"] {
            assert_eq!(parse_every(bad), None, "{bad}");
        }
        let queue = |rate: &str| QueueConfig {
            rate_limit: rate.into(),
            ..QueueConfig::default()
        };
        assert_eq!(queue("").rate_limit_per_sec(), None);
        assert_eq!(queue("100/s").rate_limit_per_sec(), Some(100.0));
        assert_eq!(queue("120/m").rate_limit_per_sec(), Some(2.0));
        assert_eq!(queue("3600/h").rate_limit_per_sec(), Some(1.0));
        for bad in ["0/s", "1/d", "x/s", "10", "/s", "+1/s"] {
            assert_eq!(parse_rate_limit(bad), None, "{bad}");
        }
    }

    #[test]
    fn log_level_filters() {
        for ok in [
            "info",
            "WARN",
            "info,switchyard=debug",
            "actix_web=warn, switchyard::http=trace",
        ] {
            assert!(is_log_filter(ok), "{ok}");
        }
        for bad in ["", "loud", "switchyard=", "=info", "info,,=x"] {
            assert!(!is_log_filter(bad), "{bad}");
        }
        let msg = message(load("l.toml", "[log]\nlevel = \"loud\"\n", &[]));
        assert!(msg.contains("l.toml:2: log.level:"), "{msg}");
    }

    #[test]
    fn users_are_checked() {
        let text = "[[auth.users]]\nusername = \"bob\"\npassword_hash = \"plain\"\n";
        let msg = message(load("u.toml", text, &[]));
        assert!(
            msg.contains("u.toml:3: auth.users[0].password_hash:"),
            "{msg}"
        );
    }

    #[test]
    fn key_lines_follow_the_document() {
        let text = "top = 1\n[server]\nbind = \"\"\"\nmulti\nline\"\"\"\nlist = [\n  \"a\", # c\n  \"]\",\n]\n\
                    \"quoted\".x = 2\n[[tasks.queues]]\nname = 'a'\n[[tasks.queues]]\nname = 'b'\n\
                    [tasks.queues.extra]\nk = { a = 1 }\n";
        let lines = KeyLines::scan(text);
        assert_eq!(lines.line_of("top"), Some(1));
        assert_eq!(lines.line_of("server"), Some(2));
        assert_eq!(lines.line_of("server.bind"), Some(3));
        assert_eq!(lines.line_of("server.list"), Some(6));
        assert_eq!(lines.line_of("server.quoted.x"), Some(10));
        assert_eq!(lines.line_of("tasks.queues[0].name"), Some(12));
        assert_eq!(lines.line_of("tasks.queues[1].name"), Some(14));
        assert_eq!(lines.line_of("tasks.queues[1].extra.k"), Some(16));
        assert_eq!(lines.path_at(8), Some("server.list"));
    }

    #[test]
    fn redacted_toml_hides_secrets_and_parses_back() -> Result<(), Box<dyn std::error::Error>> {
        let mut config = Config::default();
        config.server.secret_key = "super-secret-key".into();
        config.server.secret_key_fallbacks = vec!["old-secret".into(), "older-secret".into()];
        config.nats.token = "nats-token".into();
        config.postgres.url = "postgres://app:pg-pass@db:5432/switchyard?password=pg-pass2".into();
        config.redis.url = "redis://:redis-pass@cache:6379/0".into();
        config.auth.users.push(UserEntry {
            username: "alice".into(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".into(),
            permissions: vec!["shop.view_order".into()],
        });
        config.beat.schedule.push(ScheduleEntry {
            name: "clear".into(),
            task: "switchyard.clear_sessions".into(),
            every: Some("1h".into()),
            cron: None,
            queue: None,
            args: serde_json::Map::new(),
        });
        let text = config.to_redacted_toml();
        for secret in [
            "super-secret",
            "old-secret",
            "older-secret",
            "nats-token",
            "pg-pass",
            "redis-pass",
            "aGFzaGhhc2g",
        ] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        let value: toml::Value = toml::from_str(&text)?;
        assert_eq!(value["server"]["secret_key"].as_str(), Some(REDACTED));
        assert_eq!(
            value["auth"]["users"][0]["password_hash"].as_str(),
            Some(REDACTED)
        );
        assert_eq!(
            value["auth"]["users"][0]["username"].as_str(),
            Some("alice")
        );
        assert_eq!(
            value["postgres"]["url"].as_str(),
            Some("postgres://app:<redacted>@db:5432/switchyard?password=<redacted>")
        );
        assert_eq!(
            value["redis"]["url"].as_str(),
            Some("redis://:<redacted>@cache:6379/0")
        );
        assert_eq!(
            value["tasks"]["queues"][0]["name"].as_str(),
            Some("default")
        );
        assert_eq!(value["beat"]["schedule"][0]["every"].as_str(), Some("1h"));
        for section in [
            "server",
            "log",
            "sessions",
            "auth",
            "postgres",
            "nats",
            "redis",
            "memcached",
            "file",
            "context",
            "actors",
            "tasks",
            "mail",
            "beat",
        ] {
            assert!(value.get(section).is_some(), "missing [{section}]");
        }

        let debug = format!("{config:?}");
        for secret in [
            "super-secret",
            "old-secret",
            "nats-token",
            "pg-pass",
            "redis-pass",
            "aGFzaGhhc2g",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked in Debug: {debug}");
        }
        Ok(())
    }

    #[test]
    fn empty_secrets_stay_empty_when_redacted() -> Result<(), Box<dyn std::error::Error>> {
        let value: toml::Value = toml::from_str(&Config::default().to_redacted_toml())?;
        assert_eq!(value["server"]["secret_key"].as_str(), Some(""));
        assert_eq!(value["nats"]["token"].as_str(), Some(""));
        assert_eq!(
            value["postgres"]["url"].as_str(),
            Some("postgres://postgres@127.0.0.1:5432/switchyard")
        );
        Ok(())
    }

    #[test]
    fn nats_url_tokens_are_redacted() {
        assert_eq!(
            redact_url("nats://tok@h:4222", true),
            "nats://<redacted>@h:4222"
        );
        assert_eq!(
            redact_url("nats://u:p@a:1,nats://b:2", true),
            "nats://u:<redacted>@a:1,nats://b:2"
        );
        assert_eq!(
            redact_url("postgres://user@h/db", false),
            "postgres://user@h/db"
        );
    }

    #[test]
    fn enums_spell_as_configured() {
        assert_eq!(SessionEngine::CachedDb.as_str(), "cached_db");
        assert_eq!(SessionEngine::SignedCookies.to_string(), "signed_cookies");
        assert_eq!(SessionEngine::ALL.len(), 8);
        assert_eq!(SameSite::None.as_str(), "none");
        assert_eq!(AuthStore::default(), AuthStore::Config);
    }

    #[test]
    fn node_id_defaults_to_host_and_pid() {
        let mut server = ServerConfig::default();
        let id = server.node_id_or_default();
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
        server.node_id = "web-1".into();
        assert_eq!(server.node_id_or_default(), "web-1");
    }

    #[test]
    fn direct_validate_names_the_key() {
        let mut config = Config::default();
        config.actors.http_workers = 0;
        let msg = config
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            msg,
            "actors.http_workers: expected an integer from 1 to 1024, got 0"
        );
    }
}
