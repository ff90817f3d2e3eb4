//! The typed configuration: built-in defaults < the TOML file < `SWITCHYARD_<SECTION>__<KEY>`
//! environment variables (command-line flags are applied on top by the CLI).
//!
//! [`Config::load`] is the one entry point; every error names where the value came from
//! ([`Origin`]) and exits 2. docs/configuration.md describes the layout and every key.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use croner::Cron;
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;

/// Sections: `#[serde(default, deny_unknown_fields)]` structs, each default beside its field.
macro_rules! section {
    ($($(#[$meta:meta])* pub struct $name:ident {
        $($(#[$fmeta:meta])* pub $field:ident: $ty:ty = $default:expr,)*
    })+) => {$(
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty,)* }
        impl Default for $name {
            fn default() -> Self { Self { $($field: $default,)* } }
        }
    )+};
}

/// Closed sets of strings, (de)serialized as their configuration spelling.
macro_rules! string_enum {
    ($($(#[$meta:meta])* $name:ident {
        $($(#[$default:meta])? $variant:ident => $text:literal,)+
    })+) => {$(
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name { $($(#[$default])? #[doc = concat!("`\"", $text, "\"`")] #[serde(rename = $text)] $variant,)+ }
        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The configuration spelling.
            pub fn as_str(self) -> &'static str { match self { $($name::$variant => $text,)+ } }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )+};
}

/// Rules `key => range(value, min, max)`, `name(text)`, `unique(names, field, what)` or `ok,
/// "message", args`: the first broken one is the error, at the key's origin.
macro_rules! rules {
    ($v:ident;) => {};
    ($v:ident; $key:expr => range($value:expr, $min:expr, $max:expr); $($rest:tt)*) => {
        let (value, min, max): (u64, u64, Option<u64>) = ($value.into(), $min, $max);
        let expected = max.map_or(format!(">= {min}"), |max| format!("from {min} to {max}"));
        rules!($v; $key => value >= min && max.is_none_or(|max| value <= max),
            "expected an integer {expected}, got {value}"; $($rest)*);
    };
    ($v:ident; $key:expr => name($name:expr); $($rest:tt)*) => {
        let name: &str = $name;
        let ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
        rules!($v; $key => ok && !name.is_empty(),
            "expected a non-empty name of letters, digits, '_' and '-', got {name:?}"; $($rest)*);
    };
    ($v:ident; $key:expr => unique($names:expr, $field:expr, $what:expr); $($rest:tt)*) => {
        let (mut seen, what) = (std::collections::HashSet::new(), $what);
        for (i, name) in $names.enumerate() {
            let key = format!("{}[{i}]{}", $key, $field);
            rules!($v; key.clone() => !name.is_empty(), "expected a non-empty {what} name";
                key => seen.insert(name), "{what} {name:?} is defined more than once";);
        }
        rules!($v; $($rest)*);
    };
    ($v:ident; $key:expr => $ok:expr, $($message:expr),+; $($rest:tt)*) => {
        if !$ok {
            return Err($v.fail($key, format!($($message),+)));
        }
        rules!($v; $($rest)*);
    };
}

mod error;
mod secret;
mod sections;
mod source;

pub use error::{ConfigError, Origin};
pub use secret::{Secret, REDACTED};
pub use sections::*;

use error::Origins;

string_enum! {
    /// Log output format: human-readable lines or one JSON object per line.
    LogFormat { #[default] Text => "text", Json => "json", }

    /// The session cookie's `SameSite` attribute (`none` requires `Secure`).
    SameSite { #[default] Lax => "lax", Strict => "strict", None => "none", }

    /// What happens to the anonymous session's data at login (kept, merged or dropped).
    OnLogin { #[default] Preserve => "preserve", Merge => "merge", Discard => "discard", }

    /// Where session data lives (docs/configuration.md describes each engine).
    SessionEngine {
        #[default] Memory => "memory", File => "file", Postgres => "postgres",
        CachedDb => "cached_db", NatsKv => "nats_kv", Redis => "redis", Memcached => "memcached",
        SignedCookies => "signed_cookies",
    }

    /// Transactional enqueue: none, or an outbox table in Postgres.
    Outbox { #[default] Off => "", Postgres => "postgres", }

    /// What a beat does with ticks missed while none ran.
    Misfire { #[default] Skip => "skip", CatchUp => "catch_up", }

    /// Whether a schedule fires while its previous tick's task is unfinished.
    Overlap { #[default] Allow => "allow", Skip => "skip", }

    /// Where users are looked up: `[[auth.users]]` in the configuration, or Postgres.
    AuthStore { #[default] Config => "config", Postgres => "postgres", }

    /// Where task queues live: inside `switchyard serve` (single node) or NATS JetStream.
    Broker { #[default] Memory => "memory", Nats => "nats", }

    /// How mail is delivered: written to `mail.dir` or printed to stderr.
    MailBackend { #[default] File => "file", Console => "console", }
}

section! {
    /// The whole configuration, one field per TOML section.
    pub struct Config {
        /// `[server]`: the HTTP node.
        pub server: ServerConfig = ServerConfig::default(),
        /// `[log]`: logging.
        pub log: LogConfig = LogConfig::default(),
        /// `[sessions]`: the session engine and the session cookie.
        pub sessions: SessionsConfig = SessionsConfig::default(),
        /// `[auth]`: users and login.
        pub auth: AuthConfig = AuthConfig::default(),
        /// `[postgres]`: the database used by the `postgres`/`cached_db` engines and `auth.store`.
        pub postgres: PostgresConfig = PostgresConfig::default(),
        /// `[nats]`: the NATS connection (task broker, `nats_kv` engine, events).
        pub nats: NatsConfig = NatsConfig::default(),
        /// `[redis]`: the `redis` session engine.
        pub redis: RedisConfig = RedisConfig::default(),
        /// `[memcached]`: the `memcached` session engine.
        pub memcached: MemcachedConfig = MemcachedConfig::default(),
        /// `[file]`: the `file` session engine.
        pub file: FileConfig = FileConfig::default(),
        /// `[context]`: template context processors.
        pub context: ContextConfig = ContextConfig::default(),
        /// `[actors]`: how many actors of each kind a node runs.
        pub actors: ActorsConfig = ActorsConfig::default(),
        /// `[tasks]`: the task system (broker, retries, queues).
        pub tasks: TasksConfig = TasksConfig::default(),
        /// `[mail]`: outgoing mail.
        pub mail: MailConfig = MailConfig::default(),
        /// `[cluster]`: heartbeats and the worker and beat nodes' metrics.
        pub cluster: ClusterConfig = ClusterConfig::default(),
        /// `[beat]`: periodic schedules.
        pub beat: BeatConfig = BeatConfig::default(),
    }
}

impl Config {
    /// The warning `serve` logs when the configuration looks like a cluster (the NATS
    /// broker: several nodes share the tasks) but sessions live in one node's memory, which
    /// another node, or this one after a restart, does not see (docs/cluster.md).
    pub fn cluster_session_warning(&self) -> Option<String> {
        (self.tasks.broker == Broker::Nats && self.sessions.engine == SessionEngine::Memory).then(|| {
            "sessions.engine = \"memory\" with tasks.broker = \"nats\": this looks like a cluster, \
             but memory sessions live in one serve process (lost on restart, unseen by the others); \
             use postgres, cached_db, nats_kv, redis, memcached or signed_cookies (docs/cluster.md)"
                .to_owned()
        })
    }

    /// Loads and validates defaults < the file at `path` (when given) < the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let var = |(name, value): (OsString, OsString)| {
            Some((name.into_string().ok()?, value.to_string_lossy().into()))
        };
        let env: Vec<_> = std::env::vars_os().filter_map(var).collect();
        Self::load_with_env(path, &env)
    }

    /// Like [`Config::load`], with the environment given explicitly (for tests and embedding).
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut origins = Origins::default();
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            let read = std::fs::read_to_string(path);
            let text = read.map_err(|error| ConfigError::Read(path.to_path_buf(), error))?;
            figment = figment.merge(Toml::string(&text));
            origins.file = Some((path.to_path_buf(), source::KeyLines::parse(path, &text)?));
            // The file alone first, so that its errors are blamed on it.
            origins.extract(&figment)?;
        }
        let (figment, env) = source::overlay(figment, env)?;
        origins.env = Some(env);
        let config = origins.extract(&figment)?;
        config.validate_with(&origins)?;
        Ok(config)
    }

    /// `config/default.toml` when it exists in the working directory, else `None` (defaults).
    pub fn default_path() -> Option<PathBuf> {
        Some(PathBuf::from("config/default.toml")).filter(|path| path.is_file())
    }

    /// Checks every rule again after fields were changed by hand; its errors name only the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(&Origins::default())
    }

    /// The effective configuration as TOML, every secret and password hash `"<redacted>"`.
    pub fn to_redacted_toml(&self) -> String {
        let mut config = self.clone();
        for user in &mut config.auth.users {
            user.password_hash = secret::redact(&user.password_hash).into();
        }
        let error = |e| format!("# the configuration cannot be shown as TOML: {e}\n");
        toml::to_string(&config).unwrap_or_else(error)
    }

    /// Every rule of docs/configuration.md ("Validation"), in the order of the sections.
    fn validate_with(&self, v: &Origins) -> Result<(), ConfigError> {
        let (server, sessions, actors) = (&self.server, &self.sessions, &self.actors);
        let (key_bytes, min_key_bytes) = (server.secret_key.expose_secret().len(), 32);
        let debug_at = match v.of("server.debug") {
            origin @ (Origin::File { .. } | Origin::Env(_)) => format!(" (set at {origin})"),
            Origin::Default | Origin::Unknown => String::new(),
        };
        let level_error = sections::level_error(&self.log.level);
        let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
        let not_phc = |u: &UserEntry| argon2::PasswordHash::new(&u.password_hash).is_err();
        let bad_hash = self.auth.users.iter().position(not_phc);
        let (tasks, beat, from) = (&self.tasks, &self.beat.schedule, &self.mail.from);
        let bind = &self.cluster.metrics_bind;
        let (base, max) = (tasks.retry_backoff_base, tasks.retry_backoff_max);
        rules! {v;
            "server.bind" => server.bind.parse::<SocketAddr>().is_ok(),
                "invalid socket address {:?} (expected IP:PORT such as \"127.0.0.1:8000\")",
                server.bind;
            "server.secret_key" => server.debug || key_bytes >= min_key_bytes,
                "expected at least {min_key_bytes} bytes when server.debug = false{debug_at}, got \
                 {key_bytes} bytes";
            "server.secret_key_fallbacks" => server.secret_key_fallbacks.iter().all(|k| !k.is_empty()
                && (server.debug || k.expose_secret().len() >= min_key_bytes)),
                "expected keys of at least {min_key_bytes} bytes (any non-empty key with debug)";
            "server.dashboard_path" => server.dashboard_path.is_empty()
                || (server.dashboard_path.starts_with('/') && server.dashboard_path.ends_with('/')
                    && server.dashboard_path.len() > 1
                    && !server.dashboard_path.contains(['?', '#', '{', '}', ' '])),
                "expected a path starting and ending with `/` (such as \"/_switchyard/\"), or \"\" \
                 to disable the dashboard, got {:?}", server.dashboard_path;
            "log.level" => level_error.is_none(),
                "expected a level (trace, debug, info, warn, error, off) or a comma-separated \
                 list of levels and target=level directives, got {:?} ({})",
                self.log.level, level_error.unwrap_or_default();
            "sessions.cookie_name" =>
                !sessions.cookie_name.is_empty() && sessions.cookie_name.bytes().all(token),
                "expected a non-empty cookie name token, got {:?}", sessions.cookie_name;
            "sessions.cookie_age" => range(sessions.cookie_age, 1, None);
            "sessions.cookie_path" => sessions.cookie_path.starts_with('/'),
                "expected a path starting with \"/\", got {:?}", sessions.cookie_path;
            "sessions.cookie_same_site" =>
                sessions.cookie_same_site != SameSite::None || sessions.cookie_secure,
                "\"none\" requires sessions.cookie_secure = true";
            "sessions.encrypt" => !sessions.encrypt || !server.secret_key.is_empty(),
                "true requires server.secret_key (the encryption key is derived from it)";
            "sessions.max_size" => range(sessions.max_size as u64, 1, None);
            "sessions.memory_max_sessions" => range(sessions.memory_max_sessions as u64, 1, None);
            "auth.login_url" => !self.auth.login_url.is_empty(), "expected a non-empty URL";
            "auth.max_failures" => range(u64::from(self.auth.max_failures), 1, None);
            "auth.failure_window" => range(self.auth.failure_window, 1, None);
            "auth.users" =>
                unique(self.auth.users.iter().map(|u| &u.username), ".username", "user");
            format!("auth.users[{}].password_hash", bad_hash.unwrap_or_default()) =>
                bad_hash.is_none(),
                "expected a PHC password hash such as \"$argon2id$v=19$m=19456,t=2,p=1$...\"";
            "postgres.pool_size" => range(self.postgres.pool_size, 1, None);
            "nats.prefix" => name(&self.nats.prefix);
            "nats.replicas" => range(self.nats.replicas, 1, Some(5));
            "context.processors" => unique(self.context.processors.iter(), "", "processor");
            "context.timeout_ms" => range(self.context.timeout_ms, 1, None);
            "actors.session_shards" => range(actors.session_shards, 1, Some(1024));
            "actors.context_workers" => range(actors.context_workers, 1, Some(1024));
            "actors.http_workers" => range(actors.http_workers, 1, Some(1024));
            "tasks.retry_backoff_base" => base.is_finite() && base >= 0.0,
                "expected a non-negative number of seconds, got {base}";
            "tasks.retry_backoff_max" => max.is_finite() && max >= 0.0,
                "expected a non-negative number of seconds, got {max}";
            "tasks.max_deliver" => range(tasks.max_deliver, 1, None);
            "tasks.queues" => !tasks.queues.is_empty(), "expected at least one queue";
        }
        for (i, queue) in tasks.queues.iter().enumerate() {
            let (key, rate) = (format!("tasks.queues[{i}]"), &queue.rate_limit);
            rules! {v;
                format!("{key}.name") => name(&queue.name);
                format!("{key}.concurrency") => range(queue.concurrency, 1, None);
                format!("{key}.rate_limit") => sections::parse_rate_limit(rate).is_some(),
                    "expected \"N/s\", \"N/m\", \"N/h\" (N >= 1) or \"\", got {rate:?}";
                format!("{key}.rate_key") => queue.rate_key.is_empty()
                    || (queue.rate_key.len() <= 128 && !queue.rate_key.chars().any(char::is_control)),
                    "expected an args field name (1-128 characters, no control characters) or \"\", got {:?}", queue.rate_key;
                format!("{key}.rate_key") => queue.rate_key.is_empty() || !rate.is_empty(),
                    "rate_key {:?} needs a rate_limit on the queue", queue.rate_key;
            }
        }
        rules! {v;
            "tasks.queues" => unique(tasks.queues.iter().map(|q| &q.name), ".name", "queue");
            "tasks.default_queue" => tasks.queues.iter().any(|q| q.name == tasks.default_queue),
                "expected one of the queues in tasks.queues ({}), got {:?}",
                tasks.queues.iter().map(|q| format!("{:?}", q.name)).collect::<Vec<_>>().join(", "),
                tasks.default_queue;
            "mail.from" => from.contains('@'), "expected an e-mail address, got {from:?}";
            "cluster.heartbeat_interval" => range(self.cluster.heartbeat_interval, 1, Some(3600));
            "cluster.metrics_bind" => bind.is_empty() || bind.parse::<SocketAddr>().is_ok(),
                "expected \"\" or IP:PORT such as \"127.0.0.1:9100\", got {bind:?}";
            "beat.schedule" => unique(beat.iter().map(|s| &s.name), ".name", "schedule");
        }
        for (i, entry) in beat.iter().enumerate() {
            let (key, cron) = (format!("beat.schedule[{i}]"), entry.cron.as_deref());
            let cron_error = cron.and_then(|c| Cron::new(c).with_seconds_required().parse().err());
            let queue = entry.queue.as_deref().unwrap_or(&tasks.default_queue);
            rules! {v;
                format!("{key}.name") => name(&entry.name);
                format!("{key}.task") => !entry.task.is_empty(), "expected a non-empty task name";
                format!("{key}.timezone") => entry.timezone.parse::<chrono_tz::Tz>().is_ok(),
                    "expected an IANA time zone such as \"Europe/Lisbon\", got {:?}", entry.timezone;
                key.clone() => entry.every.is_some() != cron.is_some(),
                    "expected exactly one of `every` and `cron`";
                format!("{key}.every") => entry.every != Some(Duration::ZERO),
                    "expected a positive interval such as \"30s\" or \"1h 30m\"";
                format!("{key}.cron") => cron_error.is_none(),
                    "expected 6 fields `sec min hour day month weekday`, got {:?} ({})",
                    cron.unwrap_or_default(), cron_error.map(|e| e.to_string()).unwrap_or_default();
                format!("{key}.queue") => tasks.queues.iter().any(|q| q.name == *queue),
                    "expected one of the queues in tasks.queues, got {queue:?}";
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_cluster_with_memory_sessions_is_warned_about() {
        let mut c = Config::default();
        assert_eq!(c.cluster_session_warning(), None);
        c.tasks.broker = Broker::Nats;
        let warning = c.cluster_session_warning().expect("warning");
        assert!(
            warning.contains("sessions.engine = \"memory\""),
            "{warning}"
        );
        c.sessions.engine = SessionEngine::NatsKv;
        assert_eq!(c.cluster_session_warning(), None);
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
    fn trusted_proxies_are_ip_addresses() {
        let env = [("SWITCHYARD_SERVER__TRUSTED_PROXIES", "10.0.0.1, ::1")];
        let config = load_env(&env).expect("valid");
        let expected: Vec<std::net::IpAddr> =
            vec!["10.0.0.1".parse().expect("ip"), "::1".parse().expect("ip")];
        assert_eq!(config.server.trusted_proxies, expected);
        let msg = message(load(
            "p.toml",
            "[server]\ntrusted_proxies = [\"proxy\"]\n",
            &[],
        ));
        assert!(msg.contains("p.toml:2: server.trusted_proxies"), "{msg}");
        assert!(msg.contains("invalid IP address"), "{msg}");
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
    fn choices_and_schedule_names_are_checked() {
        let msg = message(load("bad.toml", "[sessions]\nengine = 3\n", &[]));
        assert!(
            msg.contains("bad.toml:2: sessions.engine: expected"),
            "{msg}"
        );
        let text = "[[beat.schedule]]\ntask = \"t\"\nevery = \"1h\"\n";
        let msg = message(load("b.toml", text, &[]));
        assert!(
            msg.contains("b.toml:1: beat.schedule[0].name: expected a non-empty"),
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
        let text = "[[tasks.queues]]\nname = \"default\"\nrate_key = \"user\"\n";
        let msg = message(load("q.toml", text, &[]));
        assert!(msg.contains("tasks.queues[0].rate_key:"), "{msg}");
        assert!(msg.contains("needs a rate_limit"), "{msg}");
        let text =
            "[[tasks.queues]]\nname = \"default\"\nrate_limit = \"1/s\"\nrate_key = \"a\\u0001\"\n";
        let msg = message(load("q.toml", text, &[]));
        assert!(msg.contains("tasks.queues[0].rate_key:"), "{msg}");
        let text =
            "[[tasks.queues]]\nname = \"default\"\nrate_limit = \"1/s\"\nrate_key = \"user\"\n";
        let config = load("q.toml", text, &[]).expect("a rate_key with a rate_limit");
        assert_eq!(config.tasks.queues[0].rate_key(), Some("user".to_owned()));

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
        let every = "[[beat.schedule]]\nname = \"a\"\ntask = \"t\"\nevery = \"30x\"\n";
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
        assert_eq!(first.every, Some(Duration::from_secs(5400)));
        assert_eq!(first.args.get("limit"), Some(&serde_json::json!(10)));
        assert_eq!(config.beat.schedule[1].every, None);
        Ok(())
    }

    #[test]
    fn log_level_is_checked() {
        let msg = message(load("l.toml", "[log]\nlevel = \"loud\"\n", &[]));
        assert!(msg.contains("l.toml:2: log.level:"), "{msg}");
        assert!(load("l.toml", "[log]\nlevel = \"info,switchyard=debug\"\n", &[]).is_ok());
    }

    #[test]
    fn every_is_humantime_and_cron_is_checked() {
        let entry = |line: &str| format!("[[beat.schedule]]\nname = \"a\"\ntask = \"t\"\n{line}\n");
        for (every, secs) in [
            ("30s", 30),
            ("1d", 86_400),
            ("1h30m", 5_400),
            ("1h 30m", 5_400),
        ] {
            let config = load("b.toml", &entry(&format!("every = \"{every}\"")), &[]);
            let every_secs = config.ok().and_then(|c| c.beat.schedule[0].every);
            assert_eq!(every_secs, Some(Duration::from_secs(secs)), "{every}");
        }
        for bad in ["", "0s", "1x", "h", "-1s"] {
            let msg = message(load("b.toml", &entry(&format!("every = \"{bad}\"")), &[]));
            assert!(
                msg.contains("b.toml:4: beat.schedule[0].every:"),
                "{bad}: {msg}"
            );
        }
        for bad in [
            "61 * * * * *",
            "0 0 * * * * 2030",
            "0 0 25 * * *",
            "x * * * * *",
        ] {
            let msg = message(load("b.toml", &entry(&format!("cron = \"{bad}\"")), &[]));
            assert!(
                msg.contains("b.toml:4: beat.schedule[0].cron:"),
                "{bad}: {msg}"
            );
        }
        assert!(load("b.toml", &entry("cron = \"0 0 9 * * MON-FRI\""), &[]).is_ok());
    }

    #[test]
    fn conninfo_passwords_are_redacted() -> Result<(), Box<dyn std::error::Error>> {
        let config = load_env(&[
            (
                "SWITCHYARD_POSTGRES__URL",
                "host=db user=app password=pg-pass",
            ),
            ("SWITCHYARD_NATS__TOKEN", "nats-token"),
        ])?;
        assert_eq!(
            config.postgres.url.expose_secret(),
            "host=db user=app password=pg-pass"
        );
        assert_eq!(config.nats.token.expose_secret(), "nats-token");
        let text = config.to_redacted_toml();
        let debug = format!("{config:?}");
        for shown in [&text, &debug] {
            assert!(
                !shown.contains("pg-pass") && !shown.contains("nats-token"),
                "{shown}"
            );
        }
        let value: toml::Value = toml::from_str(&text)?;
        assert_eq!(
            value["postgres"]["url"].as_str(),
            Some("host=db user=app password=<redacted>")
        );
        Ok(())
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
    fn redacted_toml_hides_secrets_and_parses_back() -> Result<(), Box<dyn std::error::Error>> {
        let mut config = Config::default();
        config.server.secret_key = "super-secret-key".into();
        config.server.secret_key_fallbacks = vec!["old-secret".into(), "older-secret".into()];
        config.nats.token = "nats-token".into();
        config.nats.user = "app".into();
        config.nats.password = "nats-pass".into();
        config.postgres.url = "postgres://app:pg-pass@db:5432/switchyard?password=pg-pass2".into();
        config.redis.url = "redis://:redis-pass@cache:6379/0".into();
        config.auth.users.push(UserEntry {
            username: "alice".into(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".into(),
            permissions: vec!["shop.view_order".into()],
            staff: true,
        });
        config.beat.schedule.push(ScheduleEntry {
            name: "clear".into(),
            task: "switchyard.clear_sessions".into(),
            every: Some(Duration::from_secs(3600)),
            cron: None,
            queue: None,
            args: serde_json::Map::new(),
            ..Default::default()
        });
        let text = config.to_redacted_toml();
        for secret in [
            "super-secret",
            "old-secret",
            "older-secret",
            "nats-token",
            "nats-pass",
            "pg-pass",
            "redis-pass",
            "aGFzaGhhc2g",
        ] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        let value: toml::Value = toml::from_str(&text)?;
        assert_eq!(value["server"]["secret_key"].as_str(), Some(REDACTED));
        assert_eq!(value["nats"]["password"].as_str(), Some(REDACTED));
        assert_eq!(value["nats"]["user"].as_str(), Some("app"));
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
            "nats-pass",
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
    fn enums_spell_as_configured() {
        assert_eq!(SessionEngine::CachedDb.as_str(), "cached_db");
        assert_eq!(SessionEngine::SignedCookies.to_string(), "signed_cookies");
        assert_eq!(SessionEngine::ALL.len(), 8);
        assert_eq!(SameSite::None.as_str(), "none");
        assert_eq!(AuthStore::default(), AuthStore::Config);
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

    #[test]
    fn fallback_keys_are_validated_like_the_key() {
        let mut config = Config::default();
        config.server.secret_key_fallbacks = vec!["".into()];
        let e = config.validate().expect_err("an empty fallback");
        assert!(e.to_string().contains("server.secret_key_fallbacks"), "{e}");
        config.server.debug = false;
        config.server.secret_key = "k".repeat(32).into();
        config.server.secret_key_fallbacks = vec!["short".into()];
        assert!(config.validate().is_err(), "a short fallback in production");
        config.server.secret_key_fallbacks = vec!["f".repeat(32).into()];
        config.validate().expect("a real fallback");
    }
}
