//! One struct per TOML section, each field's default beside it (docs/configuration.md: the keys).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use super::SameSite;
use super::REDACTED;
use super::{AuthStore, Broker, LogFormat, MailBackend, Misfire, OnLogin, Outbox, Overlap};
use super::{Secret, SessionEngine};

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
        /// Peers whose `X-Forwarded-For`/`-Host`/`-Proto` are believed (`src/http/client.rs`).
        pub trusted_proxies: Vec<std::net::IpAddr> = Vec::new(),
        /// Where the operator dashboard is mounted (`/…/`, staff only); empty disables it.
        pub dashboard_path: String = "/_switchyard/".into(),
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
        /// Replicas of every stream and bucket Switchyard creates (1..=5; a NATS cluster's).
        pub replicas: u32 = 1,
        /// User name to authenticate with (with `password`); empty: none.
        pub user: String = String::new(),
        /// Password of `user`.
        pub password: Secret = Secret::default(),
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

    /// `[sessions]`: the session engine and the session cookie.
    pub struct SessionsConfig {
        /// Where session data lives.
        pub engine: SessionEngine = SessionEngine::Memory,
        /// Name of the session cookie.
        pub cookie_name: String = "sessionid".into(),
        /// Lifetime of a session and its cookie, in seconds (>= 1; default two weeks).
        pub cookie_age: u64 = 1_209_600,
        /// Make the cookie a browser-session cookie (no `Max-Age`).
        pub expire_at_browser_close: bool = false,
        /// Save the session (and refresh its expiry) on every request, not only when modified.
        pub save_every_request: bool = false,
        /// Set the cookie's `Secure` attribute.
        pub cookie_secure: bool = false,
        /// Set the cookie's `HttpOnly` attribute.
        pub cookie_http_only: bool = true,
        /// The cookie's `SameSite` attribute; `none` requires `cookie_secure = true`.
        pub cookie_same_site: SameSite = SameSite::Lax,
        /// The cookie's `Domain` attribute; empty: host-only cookie.
        pub cookie_domain: String = String::new(),
        /// The cookie's `Path` attribute.
        pub cookie_path: String = "/".into(),
        /// What happens to the anonymous session's data at login.
        pub on_login: OnLogin = OnLogin::Preserve,
        /// Largest serialized session, in bytes (>= 1); larger writes are refused.
        pub max_size: usize = 65_536,
        /// The memory engine's cap; the soonest-expiring sessions are evicted first.
        pub memory_max_sessions: usize = 1_000_000,
        /// Encrypt session data at rest in server-side engines (key derived from `secret_key`).
        pub encrypt: bool = false,
    }

    /// `[auth]`: users and login.
    pub struct AuthConfig {
        /// Where users are looked up.
        pub store: AuthStore = AuthStore::Config,
        /// Path anonymous visitors are redirected to when a page requires login.
        pub login_url: String = "/login".into(),
        /// Failed logins per username or per client address within `failure_window`, then 429.
        pub max_failures: u32 = 5,
        /// Seconds of the failed-login window.
        pub failure_window: u64 = 300,
        /// Password hashes at once per node; 0 = the number of cores.
        pub max_concurrent_hashes: u32 = 0,
        /// `[[auth.users]]`: the users of `store = "config"` (none built in).
        pub users: Vec<UserEntry> = Vec::new(),
    }

    /// `[context]`: template context processors.
    pub struct ContextConfig {
        /// Registered processor names, in merge order (later ones win on equal variable names).
        pub processors: Vec<String> =
            ["debug", "request", "auth", "messages", "csrf", "static"].map(String::from).to_vec(),
        /// Run only the processors whose variables the template uses.
        pub lazy: bool = true,
        /// Time budget of each processor, in milliseconds (>= 1).
        pub timeout_ms: u64 = 200,
    }

    /// `[tasks]`: the task system.
    pub struct TasksConfig {
        /// Where the queues live.
        pub broker: Broker = Broker::Memory,
        /// Run tasks inline on publish (for tests).
        pub always_eager: bool = false,
        /// Queue of tasks published without one; must be in `queues`.
        pub default_queue: String = "default".into(),
        /// Seconds result records are kept.
        pub result_ttl: u64 = 86_400,
        /// Retries a task gets unless it says otherwise.
        pub default_max_retries: u32 = 3,
        /// Retry backoff base d, in seconds: attempt n waits in [d/2, d], d = min(base * 2^n, max).
        pub retry_backoff_base: f64 = 1.0,
        /// Retry backoff ceiling, in seconds.
        pub retry_backoff_max: f64 = 600.0,
        /// Seconds after which a running task's cancellation token fires; 0 = none.
        pub soft_time_limit: u64 = 0,
        /// Seconds after which a running task is aborted and the attempt fails; 0 = none.
        pub time_limit: u64 = 0,
        /// Seconds before an unacknowledged task is redelivered.
        pub ack_wait: u64 = 30,
        /// Deliveries (crashes included) before a task is dead-lettered (>= 1).
        pub max_deliver: u32 = 10,
        /// Seconds of the stream's duplicate-detection window.
        pub dedupe_window: u64 = 120,
        /// Seconds a stopping worker gives its in-flight tasks.
        pub drain_timeout: u64 = 30,
        /// Seconds ahead a task's eta or countdown may be (further: refused or dead-lettered).
        pub max_eta: u64 = 2_592_000,
        /// Seconds the `<PREFIX>_DEAD` stream keeps a dead letter; 0 = no limit.
        pub dead_max_age: u64 = 1_209_600,
        /// Bytes the `<PREFIX>_DEAD` stream keeps (the oldest letters go first); 0 = no limit.
        pub dead_max_bytes: u64 = 1_073_741_824,
        /// `"postgres"`: tasks enqueued in an application's transaction go through an outbox.
        pub outbox: Outbox = Outbox::Off,
        /// `[[tasks.queues]]`: the queues (built in: `default` alone).
        pub queues: Vec<QueueConfig> = vec![QueueConfig::default()],
    }

    /// `[mail]`: outgoing mail.
    pub struct MailConfig {
        /// How mail is "sent".
        pub backend: MailBackend = MailBackend::File,
        /// Directory of the `file` backend (`<dir>/<task id>.eml`), relative to the working dir.
        pub dir: PathBuf = "outbox".into(),
        /// Sender address.
        pub from: String = "shop@example.com".into(),
    }

    /// `[cluster]`: heartbeats (`cluster status`) and the worker and beat nodes' `/metrics`.
    pub struct ClusterConfig {
        /// Seconds between heartbeats (1..=3600); a node unseen for three is gone.
        pub heartbeat_interval: u64 = 2,
        /// `IP:PORT` of the worker and beat nodes' `/metrics` (port 0: any); "" disables it.
        pub metrics_bind: String = "127.0.0.1:0".into(),
    }

    /// `[beat]`: periodic schedules.
    pub struct BeatConfig {
        /// `serve` runs the schedule itself (always so on the memory broker).
        pub embedded: bool = false,
        /// `[[beat.schedule]]`: the schedules (none built in).
        pub schedule: Vec<ScheduleEntry> = Vec::new(),
    }
}

impl ServerConfig {
    /// `node_id`, or `hostname-pid` when it is empty (the host name, else `localhost`).
    pub fn node_id_or_default(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = hostname::get().ok().and_then(|h| h.into_string().ok());
        let host = host.filter(|h| !h.is_empty()).unwrap_or("localhost".into());
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

/// One `[[auth.users]]` entry. `Debug` and [`super::Config::to_redacted_toml`] hide the hash.
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
    /// Whether the user may open the operator dashboard (`server.dashboard_path`).
    #[serde(default)]
    pub staff: bool,
}

impl fmt::Debug for UserEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, permissions, staff) = (&self.username, &self.permissions, self.staff);
        write!(
            f,
            "UserEntry({name:?}, {REDACTED}, {permissions:?}, staff: {staff})"
        )
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
    /// Most task starts per time unit over all the queue's workers in the cluster: `"N/s"`,
    /// `"N/m"`, `"N/h"`; empty = none.
    #[serde(default)]
    pub rate_limit: String,
    /// An `args` field: the rate limit holds per distinct value of it; empty = one limit.
    #[serde(default)]
    pub rate_key: String,
}

fn default_concurrency() -> u32 {
    8
}

impl Default for QueueConfig {
    fn default() -> Self {
        let (name, concurrency) = ("default".into(), default_concurrency());
        Self {
            name,
            concurrency,
            rate_limit: String::new(),
            rate_key: String::new(),
        }
    }
}

impl QueueConfig {
    /// The rate limit in tasks per second, if there is one.
    pub fn rate_limit_per_sec(&self) -> Option<f64> {
        parse_rate_limit(&self.rate_limit).flatten()
    }

    /// The `rate_key` field, if there is one.
    pub fn rate_key(&self) -> Option<String> {
        (!self.rate_key.is_empty()).then(|| self.rate_key.clone())
    }
}

/// `""` → `Some(None)`; `"N/s"`, `"N/m"`, `"N/h"` (N >= 1) → `Some(Some(per second))`; else `None`.
pub(super) fn parse_rate_limit(s: &str) -> Option<Option<f64>> {
    let Some((count, unit)) = s.split_once('/') else {
        return s.is_empty().then_some(None);
    };
    let signed = count.starts_with('+');
    let count: u64 = count.parse().ok().filter(|&n| n >= 1 && !signed)?;
    let units = [("s", 1.0), ("m", 60.0), ("h", 3600.0)];
    let (_, seconds) = units.into_iter().find(|&(u, _)| u == unit)?;
    Some(Some(count as f64 / seconds))
}

/// One `[[beat.schedule]]` entry: exactly one of `every` and `cron`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Schedule name (unique); identifies its ticks across beat nodes.
    pub name: String,
    /// Task to publish, e.g. `switchyard.clear_sessions`.
    pub task: String,
    /// Interval in humantime syntax, such as `"30s"`, `"5m"`, `"1h"`, `"1d"` or `"1h 30m"`.
    #[serde(with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Cron expression with seconds, 6 fields: `sec min hour day month weekday`.
    pub cron: Option<String>,
    /// Queue to publish to; default: the task's own queue or `tasks.default_queue`.
    pub queue: Option<String>,
    /// Task arguments (a TOML table, a JSON object on the wire).
    pub args: serde_json::Map<String, serde_json::Value>,
    /// IANA time zone of `cron` (`"Europe/Lisbon"`); `every` ticks are zone-free.
    pub timezone: String,
    /// Ticks missed while no beat ran: dropped, or fired (at most `catch_up_window` back).
    pub misfire: Misfire,
    /// Seconds back that `misfire = "catch_up"` reaches.
    pub catch_up_window: u64,
    /// Whether a tick fires while the previous tick's task is unfinished.
    pub overlap: Overlap,
}

impl Default for ScheduleEntry {
    fn default() -> Self {
        let (name, task, every, cron, queue) = Default::default();
        let (args, misfire, overlap) = Default::default();
        let (timezone, catch_up_window) = ("UTC".into(), 3600);
        Self {
            name,
            task,
            every,
            cron,
            queue,
            args,
            timezone,
            misfire,
            catch_up_window,
            overlap,
        }
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

    #[test]
    fn rate_limits() {
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
}
