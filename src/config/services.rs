//! `[postgres]`, `[nats]`, `[redis]`, `[memcached]` and `[file]`: the services Switchyard
//! connects to. Their checks are in `mod.rs` (a pool size, the NATS prefix).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Secret, SecretUrl};

/// `[postgres]`: the database.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user[:password]@host:port/database` (or `key=value`
    /// conninfo); its password is redacted when shown.
    pub url: SecretUrl,
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

/// `[nats]`: the NATS connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL (several may be given comma-separated); a password or token in it is
    /// redacted when shown.
    pub url: SecretUrl,
    /// Prefix of every subject, stream (upper-cased) and KV bucket.
    pub prefix: String,
    /// Path of a `.creds` file (JWT + NKey); empty: none.
    pub creds_file: String,
    /// Authentication token; empty: none.
    pub token: Secret,
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
            token: Secret::default(),
            nkey_seed_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// `[redis]`: the `redis` session engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Connection URL, `redis://[:password@]host:port[/db]`; the password is redacted when
    /// shown.
    pub url: SecretUrl,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
        }
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
