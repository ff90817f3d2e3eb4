//! `[postgres]`, `[nats]`, `[redis]`, `[memcached]` and `[file]`: the services Switchyard
//! connects to. Their two checks (a pool size, the NATS prefix) are in `mod.rs`.

use std::path::PathBuf;

use super::{Secret, SecretUrl};

section! {
    /// `[postgres]`: the database.
    pub struct PostgresConfig {
        /// `postgres://user[:password]@host:port/database` or `key=value` conninfo; the password
        /// is redacted when shown.
        pub url: SecretUrl = "postgres://postgres@127.0.0.1:5432/switchyard".into(),
        /// Connections in the pool (>= 1).
        pub pool_size: u32 = 16,
    }
}

section! {
    /// `[nats]`: the NATS connection.
    pub struct NatsConfig {
        /// Server URL (several comma-separated); a password or token in it is redacted when shown.
        pub url: SecretUrl = "nats://127.0.0.1:4222".into(),
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
}

section! {
    /// `[redis]`: the `redis` session engine.
    pub struct RedisConfig {
        /// `redis://[:password@]host:port[/db]`; the password is redacted when shown.
        pub url: SecretUrl = "redis://127.0.0.1:6379".into(),
    }
}

section! {
    /// `[memcached]`: the `memcached` session engine.
    pub struct MemcachedConfig {
        /// Servers as `host:port`.
        pub servers: Vec<String> = vec!["127.0.0.1:11211".into()],
    }
}

section! {
    /// `[file]`: the `file` session engine.
    pub struct FileConfig {
        /// Directory holding one file per session, relative to the working directory.
        pub dir: PathBuf = "sessions".into(),
    }
}
