//! The network session engines with real `switchyard serve` processes: two nodes sharing one
//! engine, restarts, revoke-all through the CLI, encryption at rest as stored on the service,
//! `sessions clear`, and Postgres-backed users.

mod common;

use std::time::{Duration, Instant};

use common::{marker, spawn_node, Node, NodeOptions};

/// The secret every node of a test shares (cookies, CSRF tokens, the encryption key).
const SECRET: &str = "cluster-test-secret-key-0123456789abcdef";

/// One network engine and where its test namespace lives.
struct Ns {
    engine: &'static str,
    pg_url: String,
    prefix: String,
}

impl Ns {
    /// A fresh namespace for `engine`, or `None` (skipped) when a service is missing.
    fn new(engine: &'static str) -> Option<Ns> {
        let services: &[&str] = match engine {
            "postgres" => &["postgres"],
            "cached_db" => &["postgres", "nats"],
            "nats_kv" => &["nats"],
            "redis" => &["redis"],
            "memcached" => &["memcached"],
            _ => &[],
        };
        for s in services {
            if !common::service_available(s) {
                return None;
            }
        }
        Some(Ns {
            engine,
            pg_url: common::fresh_postgres_url(),
            prefix: common::unique_name("t"),
        })
    }

    fn env(&self) -> Vec<(String, String)> {
        let env = vec![
            ("SWITCHYARD_SESSIONS__ENGINE", self.engine.to_owned()),
            ("SWITCHYARD_SERVER__SECRET_KEY", SECRET.to_owned()),
            ("SWITCHYARD_POSTGRES__URL", self.pg_url.clone()),
            ("SWITCHYARD_POSTGRES__POOL_SIZE", "4".to_owned()),
            ("SWITCHYARD_NATS__URL", common::service_url("nats")),
            ("SWITCHYARD_NATS__PREFIX", self.prefix.clone()),
            ("SWITCHYARD_REDIS__URL", common::service_url("redis")),
            (
                "SWITCHYARD_MEMCACHED__SERVERS",
                common::service_url("memcached"),
            ),
            ("SWITCHYARD_FILE__DIR", format!("/tmp/{}", self.prefix)),
            // Leftovers on the shared services expire within the hour.
            ("SWITCHYARD_SESSIONS__COOKIE_AGE", "3600".to_owned()),
            ("SWITCHYARD_ACTORS__HTTP_WORKERS", "2".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    fn env_with(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = self.env();
        for (k, v) in extra {
            env.retain(|(name, _)| name != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        env
    }

    fn node(&self, extra: &[(&str, &str)]) -> Node {
        spawn_node(NodeOptions {
            env: self.env_with(extra),
            ..Default::default()
        })
    }

    fn cli(&self, args: &[&str], extra: &[(&str, &str)]) -> (i32, String, String) {
        let env = self.env_with(extra);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        common::run_cli(args, &env, None)
    }

    async fn cleanup(self) {
        common::drop_database(&self.pg_url).await;
        common::delete_stream(
            &common::service_url("nats"),
            &format!("KV_{}_sessions", self.prefix),
        )
        .await;
        let _ = std::fs::remove_dir_all(format!("/tmp/{}", self.prefix));
    }
}

/// The CSRF token of a page's first form, if the page has one.
fn csrf_token(html: &str) -> Option<String> {
    let key = "name=\"csrfmiddlewaretoken\" value=\"";
    let start = html.find(key)? + key.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_owned())
}

fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let res = client.get(url).send().await.expect("GET");
    let status = res.status().as_u16();
    (status, res.text().await.expect("body"))
}

/// POSTs a form with the CSRF token of `page` (when the page has one).
async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    fields: &[(&str, &str)],
) -> u16 {
    let mut all: Vec<(&str, &str)> = fields.to_vec();
    if let Some(t) = token {
        all.push(("csrfmiddlewaretoken", t));
    }
    client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&all))
        .send()
        .await
        .expect("POST")
        .status()
        .as_u16()
}

/// Logs `client` in as `user` on `node`; returns a fresh CSRF token (if the site uses them).
async fn login(
    client: &reqwest::Client,
    node: &Node,
    user: &str,
    password: &str,
) -> Option<String> {
    let (_, page) = get(client, &node.url("/login")).await;
    let token = csrf_token(&page);
    let status = post(
        client,
        &node.url("/login"),
        token.as_deref(),
        &[("username", user), ("password", password)],
    )
    .await;
    assert_eq!(status, 303, "login as {user} on {}", node.base);
    let (_, page) = get(client, &node.url("/")).await;
    assert_eq!(marker(&page, "user").as_deref(), Some(user));
    csrf_token(&page)
}

async fn cart_count(client: &reqwest::Client, node: &Node) -> Option<String> {
    let (status, page) = get(client, &node.url("/cart")).await;
    assert_eq!(status, 200, "{page}");
    marker(&page, "cart-count")
}

/// The session id in `client`'s cookie jar for `node`.
fn session_id(jar: &reqwest::cookie::Jar, node: &Node) -> Option<String> {
    use reqwest::cookie::CookieStore;
    let url = node.url("/").parse().ok()?;
    let header = jar.cookies(&url)?;
    let header = header.to_str().ok()?;
    header
        .split("; ")
        .find_map(|c| c.strip_prefix("sessionid="))
        .map(str::to_owned)
}

fn client_with_jar() -> (reqwest::Client, std::sync::Arc<reqwest::cookie::Jar>) {
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let client = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    (client, jar)
}

mod checks {
    use super::*;

    /// 20 concurrent adds spread over two processes sharing the engine: none lost.
    pub async fn two_nodes_one_cart(engine: &'static str) {
        let Some(ns) = Ns::new(engine) else { return };
        let a = ns.node(&[]);
        let b = ns.node(&[]);
        let client = common::client();
        let token = login(&client, &a, "alice", "wonderland").await;
        let adds = (0..20).map(|i| {
            let node = if i % 2 == 0 { &a } else { &b };
            let client = client.clone();
            let url = node.url("/cart/add/1");
            let token = token.clone();
            async move { post(&client, &url, token.as_deref(), &[]).await }
        });
        for status in futures_util::future::join_all(adds).await {
            assert_eq!(status, 303, "every add succeeds");
        }
        assert_eq!(cart_count(&client, &a).await.as_deref(), Some("20"));
        assert_eq!(cart_count(&client, &b).await.as_deref(), Some("20"));
        drop((a, b));
        ns.cleanup().await;
    }

    /// A restart of the binary loses no session.
    pub async fn restart_loses_nothing(engine: &'static str) {
        let Some(ns) = Ns::new(engine) else { return };
        let mut a = ns.node(&[]);
        let client = common::client();
        let token = login(&client, &a, "alice", "wonderland").await;
        for _ in 0..3 {
            assert_eq!(
                post(&client, &a.url("/cart/add/2"), token.as_deref(), &[]).await,
                303
            );
        }
        let status = a.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
        assert!(status.is_some(), "node stops on SIGTERM");
        let a2 = ns.node(&[]);
        let (_, page) = get(&client, &a2.url("/cart")).await;
        assert_eq!(marker(&page, "cart-count").as_deref(), Some("3"), "{page}");
        assert_eq!(marker(&page, "user").as_deref(), Some("alice"));
        drop(a2);
        ns.cleanup().await;
    }

    /// `sessions revoke --user` ends every session of the user, on every node.
    pub async fn revoke_all_sessions_of_a_user(engine: &'static str) {
        let Some(ns) = Ns::new(engine) else { return };
        let a = ns.node(&[]);
        let b = ns.node(&[]);
        let laptop = common::client();
        let phone = common::client();
        let other = common::client();
        login(&laptop, &a, "alice", "wonderland").await;
        login(&phone, &b, "alice", "wonderland").await;
        // Someone else's anonymous session with a cart survives.
        let (_, page) = get(&other, &a.url("/")).await;
        let token = csrf_token(&page);
        assert_eq!(
            post(&other, &a.url("/cart/add/1"), token.as_deref(), &[]).await,
            303
        );
        let (code, out, err) = ns.cli(&["sessions", "revoke", "--user", "alice"], &[]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim(), r#"{"revoked":2}"#, "{err}");
        for (client, node) in [(&laptop, &a), (&phone, &b), (&laptop, &b), (&phone, &a)] {
            let (_, page) = get(client, &node.url("/")).await;
            assert_eq!(marker(&page, "user").as_deref(), Some("anonymous"));
        }
        assert_eq!(cart_count(&other, &b).await.as_deref(), Some("1"));
        let (code, out, _) = ns.cli(&["sessions", "revoke", "--user", "alice"], &[]);
        assert_eq!((code, out.trim()), (0, r#"{"revoked":0}"#));
        drop((a, b));
        ns.cleanup().await;
    }

    /// With `sessions.encrypt = true` the bytes on the service do not show the data, and the
    /// node still reads it (also after a key rotation with the old key as a fallback).
    pub async fn stored_bytes_are_encrypted(engine: &'static str) {
        let Some(ns) = Ns::new(engine) else { return };
        let encrypt = [("SWITCHYARD_SESSIONS__ENCRYPT", "true")];
        let a = ns.node(&encrypt);
        let (client, jar) = client_with_jar();
        let token = login(&client, &a, "alice", "wonderland").await;
        assert_eq!(
            post(&client, &a.url("/cart/add/3"), token.as_deref(), &[]).await,
            303
        );
        assert_eq!(cart_count(&client, &a).await.as_deref(), Some("1"));
        let id = session_id(&jar, &a).expect("session cookie");
        let raw = raw_bytes(&ns, &id).await.expect("the session is stored");
        assert!(!raw.is_empty());
        for plain in [&b"cart"[..], b"alice", b"_auth_user", id.as_bytes()] {
            assert!(
                !raw.windows(plain.len()).any(|w| w == plain),
                "{} visible in stored bytes: {:?}",
                String::from_utf8_lossy(plain),
                String::from_utf8_lossy(&raw)
            );
        }
        drop(a);
        // Key rotation: the old key as a fallback still opens the session.
        let rotated = ns.node(&[
            ("SWITCHYARD_SESSIONS__ENCRYPT", "true"),
            (
                "SWITCHYARD_SERVER__SECRET_KEY",
                "a-rotated-secret-key-0123456789abcdefgh",
            ),
            ("SWITCHYARD_SERVER__SECRET_KEY_FALLBACKS", SECRET),
        ]);
        assert_eq!(cart_count(&client, &rotated).await.as_deref(), Some("1"));
        drop(rotated);
        ns.cleanup().await;
    }

    /// The stored bytes of session `id`, read straight from the engine's service under its
    /// storage key (the keyed hash of the id under [`SECRET`]).
    async fn raw_bytes(ns: &Ns, id: &str) -> Option<Vec<u8>> {
        let sid = switchyard_actors::session::SessionId::parse(id)?;
        let key = switchyard_actors::session::RecordCodec::new(false, SECRET.as_bytes(), &[])
            .session_key(&sid, 0)?;
        let id = key.as_str();
        match ns.engine {
            "postgres" | "cached_db" => {
                let (client, conn) = tokio_postgres::connect(&ns.pg_url, tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(conn);
                let row = client
                    .query_opt("SELECT data FROM switchyard_sessions WHERE id = $1", &[&id])
                    .await
                    .expect("query")?;
                Some(row.get::<_, Vec<u8>>(0))
            }
            "redis" => {
                let client = ::redis::Client::open(common::service_url("redis")).expect("url");
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect");
                ::redis::cmd("HGET")
                    .arg(format!("{}:s:{id}", ns.prefix))
                    .arg("d")
                    .query_async(&mut conn)
                    .await
                    .expect("HGET")
            }
            "memcached" => memcached_get(&format!("{}:s:{id}", ns.prefix)).await,
            "nats_kv" => {
                let client = async_nats::connect(common::service_url("nats"))
                    .await
                    .expect("connect");
                let js = async_nats::jetstream::new(client);
                let kv = js
                    .get_key_value(format!("{}_sessions", ns.prefix))
                    .await
                    .expect("bucket");
                kv.get(id).await.expect("get").map(|b| b.to_vec())
            }
            other => panic!("no raw access for {other}"),
        }
    }

    async fn memcached_get(key: &str) -> Option<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = common::service_url("memcached");
        let addr = addr
            .split(',')
            .next()
            .unwrap_or("127.0.0.1:11211")
            .trim()
            .to_owned();
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("get {key}\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !buf.ends_with(b"END\r\n") && Instant::now() < deadline {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut chunk))
                .await
                .expect("reply in time")
                .expect("read");
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let header_end = buf.windows(2).position(|w| w == b"\r\n")?;
        let header = String::from_utf8_lossy(&buf[..header_end]).into_owned();
        let len: usize = header.split(' ').nth(3)?.parse().ok()?;
        Some(buf.get(header_end + 2..header_end + 2 + len)?.to_vec())
    }
}

macro_rules! cluster_suite {
    ($name:ident, $engine:expr) => {
        mod $name {
            use super::*;
            #[actix_rt::test]
            async fn two_nodes_one_cart() {
                checks::two_nodes_one_cart($engine).await
            }
            #[actix_rt::test]
            async fn restart_loses_nothing() {
                checks::restart_loses_nothing($engine).await
            }
            #[actix_rt::test]
            async fn revoke_all_sessions_of_a_user() {
                checks::revoke_all_sessions_of_a_user($engine).await
            }
            #[actix_rt::test]
            async fn stored_bytes_are_encrypted() {
                checks::stored_bytes_are_encrypted($engine).await
            }
        }
    };
}

cluster_suite!(postgres, "postgres");
cluster_suite!(cached_db, "cached_db");
cluster_suite!(nats_kv, "nats_kv");
cluster_suite!(redis, "redis");
cluster_suite!(memcached, "memcached");

/// Two nodes of `config/cluster.toml` without a secret key (debug) share sessions: both use
/// the fixed development key to name and authenticate stored sessions.
#[actix_rt::test]
async fn cluster_toml_nodes_without_a_secret_key_share_sessions() {
    let Some(ns) = Ns::new("postgres") else {
        return;
    };
    let config =
        std::fs::read_to_string(common::root().join("config/cluster.toml")).expect("cluster.toml");
    assert!(
        config.contains("secret_key = \"\""),
        "cluster.toml has no secret key"
    );
    let env: Vec<(String, String)> = ns
        .env()
        .into_iter()
        .filter(|(k, _)| k != "SWITCHYARD_SERVER__SECRET_KEY" && k != "SWITCHYARD_SESSIONS__ENGINE")
        .collect();
    let spawn = || {
        spawn_node(NodeOptions {
            config: Some(config.clone()),
            env: env.clone(),
            ..Default::default()
        })
    };
    let a = spawn();
    let b = spawn();
    let client = common::client();
    let token = login(&client, &a, "alice", "wonderland").await;
    assert_eq!(
        post(&client, &a.url("/cart/add/1"), token.as_deref(), &[]).await,
        303
    );
    let (_, page) = get(&client, &b.url("/cart")).await;
    assert_eq!(marker(&page, "cart-count").as_deref(), Some("1"), "{page}");
    assert_eq!(marker(&page, "user").as_deref(), Some("alice"));
    drop((a, b));
    ns.cleanup().await;
}

/// With `cached_db`, once node A has answered a write, node B (which cached the session)
/// returns the new data.
#[actix_rt::test]
async fn cached_db_read_your_writes_across_nodes() {
    let Some(ns) = Ns::new("cached_db") else {
        return;
    };
    let a = ns.node(&[]);
    let b = ns.node(&[]);
    // A node caches only once every writer knows it (the warm-up, 1.5 s).
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let client = common::client();
    let token = login(&client, &a, "alice", "wonderland").await;
    for i in 1..=10 {
        assert_eq!(
            post(&client, &a.url("/cart/add/1"), token.as_deref(), &[]).await,
            303
        );
        // B reads (and caches) after every write.
        assert_eq!(
            cart_count(&client, &b).await,
            Some(i.to_string()),
            "write {i} seen on the other node"
        );
        assert_eq!(cart_count(&client, &b).await, Some(i.to_string()));
    }
    // The reads above were served from B's cache: with the row gone from Postgres behind the
    // engine's back, B still has the session (an uncached read would find nothing).
    let (pg, conn) = tokio_postgres::connect(&ns.pg_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let deleted = pg
        // Session rows only (a user index's key starts with `u`, a session's is hex).
        .execute(
            "DELETE FROM switchyard_sessions WHERE id NOT LIKE 'u%'",
            &[],
        )
        .await
        .expect("delete");
    assert_eq!(deleted, 1);
    assert_eq!(
        cart_count(&client, &b).await.as_deref(),
        Some("10"),
        "served from the cache"
    );
    drop(pg);
    drop((a, b));
    ns.cleanup().await;
}

/// `sessions clear` deletes expired sessions and prints how many; the file engine too.
#[actix_rt::test]
async fn sessions_clear_counts_expired_sessions() {
    for engine in ["postgres", "nats_kv", "file", "redis"] {
        let Some(ns) = Ns::new(engine) else { continue };
        let short = [("SWITCHYARD_SESSIONS__COOKIE_AGE", "1")];
        let a = ns.node(&short);
        let client = common::client();
        let (_, page) = get(&client, &a.url("/")).await;
        let token = csrf_token(&page);
        assert_eq!(
            post(&client, &a.url("/cart/add/1"), token.as_deref(), &[]).await,
            303
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let (code, out, err) = ns.cli(&["sessions", "clear"], &short);
        assert_eq!(code, 0, "{engine}: {err}");
        // Redis expires sessions itself: nothing is left for the command.
        let expected = if engine == "redis" { 0 } else { 1 };
        assert_eq!(
            out.trim(),
            format!("{{\"deleted\":{expected}}}"),
            "{engine}: {err}"
        );
        let (code, out, _) = ns.cli(&["sessions", "clear"], &short);
        assert_eq!((code, out.trim()), (0, r#"{"deleted":0}"#), "{engine}");
        drop(a);
        ns.cleanup().await;
    }
}

/// `auth.store = "postgres"`: `users create` makes a user that can log in on a running node;
/// `users set-password` ends the user's sessions and the old password stops working.
#[actix_rt::test]
async fn postgres_users_create_login_and_password_change() {
    let Some(ns) = Ns::new("postgres") else {
        return;
    };
    let pg = [("SWITCHYARD_AUTH__STORE", "postgres")];
    let a = ns.node(&pg);
    let (code, _, err) = ns.cli(&["users", "create", "bob"], &pg);
    assert_eq!(code, 2, "the password comes from stdin only: {err}");
    let create = std::process::Command::new(common::binary())
        .args([
            "users",
            "create",
            "bob",
            "--password-stdin",
            "--permission",
            "shop.view_order",
        ])
        .envs(ns.env_with(&pg))
        .current_dir(common::root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(b"builder-pass\n")?;
            }
            child.wait_with_output()
        })
        .expect("users create");
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&create.stdout).trim(),
        r#"{"created":"bob"}"#
    );

    let client = common::client();
    login(&client, &a, "bob", "builder-pass").await;
    // The config's alice does not exist in this store.
    let other = common::client();
    let (_, page) = get(&other, &a.url("/login")).await;
    let token = csrf_token(&page);
    let status = post(
        &other,
        &a.url("/login"),
        token.as_deref(),
        &[("username", "alice"), ("password", "wonderland")],
    )
    .await;
    assert_eq!(status, 200, "unknown user: the form again");

    let change = std::process::Command::new(common::binary())
        .args(["users", "set-password", "bob", "--password-stdin"])
        .envs(ns.env_with(&pg))
        .current_dir(common::root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(b"new-pass\n")?;
            }
            child.wait_with_output()
        })
        .expect("users set-password");
    assert!(
        change.status.success(),
        "{}",
        String::from_utf8_lossy(&change.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&change.stdout).trim(),
        r#"{"revoked":1,"updated":"bob"}"#
    );
    let (_, page) = get(&client, &a.url("/")).await;
    assert_eq!(marker(&page, "user").as_deref(), Some("anonymous"));
    let fresh = common::client();
    let (_, page) = get(&fresh, &a.url("/login")).await;
    let token = csrf_token(&page);
    let status = post(
        &fresh,
        &a.url("/login"),
        token.as_deref(),
        &[("username", "bob"), ("password", "builder-pass")],
    )
    .await;
    assert_eq!(status, 200, "the old password no longer works");
    login(&fresh, &a, "bob", "new-pass").await;
    drop(a);
    ns.cleanup().await;
}

/// The `cached_db` messages between nodes are authenticated with a key derived from
/// `secret_key` (SPEC "Trust boundaries"). A plain NATS client on the right subjects, without
/// the key: its heartbeats add no node that writers wait for, its invalidation does not drop a
/// node's cached copy, and its acknowledgement for a frozen node does not count as that node's
/// (the writer waits for the real one and gives up on it, as for a node that died: with the
/// forged one taken, a logged-out session could stay cached on that node). Each is
/// counted in `switchyard_sessions_invalidations_rejected_total{kind}`.
#[actix_rt::test]
async fn cached_db_ignores_forged_invalidations_acks_and_heartbeats() {
    use futures_util::StreamExt;
    let Some(ns) = Ns::new("cached_db") else {
        return;
    };
    let a = ns.node(&[]);
    let mut b = ns.node(&[]);
    let nats = async_nats::connect(common::service_url("nats"))
        .await
        .expect("connect to NATS");
    let nodes_subject = format!("{}.sessions.nodes", ns.prefix);
    let invalidate_subject = format!("{}.sessions.invalidate", ns.prefix);
    let bad_tag = |tag: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Switchyard-Auth", tag);
        h
    };
    // The node names, as anyone subscribed to the heartbeats learns them.
    let names = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut heartbeats = nats.subscribe(nodes_subject.clone()).await.expect("sub");
    let seen = names.clone();
    let listener = tokio::spawn(async move {
        while let Some(m) = heartbeats.next().await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if let Some(n) = v["node"].as_str().filter(|n| *n != "fake-node") {
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(n.to_owned());
            }
        }
    });
    // A fake node announces itself all along: no tag, then a made-up one.
    let forger = nats.clone();
    let subject = nodes_subject.clone();
    let fake = tokio::spawn(async move {
        for n in 1..=150u64 {
            let at = chrono::Utc::now().timestamp_millis();
            let payload = format!(r#"{{"node":"fake-node","n":{n},"at":{at}}}"#);
            let _ = match n % 2 {
                0 => forger.publish(subject.clone(), payload.into()).await,
                _ => {
                    let headers = bad_tag(&"ab".repeat(32));
                    let body = payload.into();
                    forger
                        .publish_with_headers(subject.clone(), headers, body)
                        .await
                }
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Every node caches once the warm-up (1.5 s) is over.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let client = common::client();
    let token = login(&client, &a, "alice", "wonderland").await;
    assert_eq!(
        post(&client, &a.url("/cart/add/1"), token.as_deref(), &[]).await,
        303
    );
    assert_eq!(cart_count(&client, &b).await.as_deref(), Some("1"));
    assert_eq!(cart_count(&client, &b).await.as_deref(), Some("1"));

    // Forged invalidations of the cached session: the row is first deleted behind the engines'
    // back, so B answers from its cache only, and would show an empty cart had it dropped it.
    let (pg, conn) = tokio_postgres::connect(&ns.pg_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let row = pg
        .query_one(
            "DELETE FROM switchyard_sessions WHERE id NOT LIKE 'u%' RETURNING id",
            &[],
        )
        .await
        .expect("the session's row");
    let key: String = row.get(0);
    let forged = format!(r#"{{"key":"{key}","version":null}}"#);
    nats.publish(invalidate_subject.clone(), forged.clone().into())
        .await
        .expect("publish");
    let headers = bad_tag(&"00".repeat(32));
    nats.publish_with_headers(invalidate_subject.clone(), headers, forged.into())
        .await
        .expect("publish");
    nats.flush().await.expect("flush");
    let series =
        |kind: &str| format!("switchyard_sessions_invalidations_rejected_total{{kind=\"{kind}\"}}");
    let metrics_client = common::client();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = common::metrics(&metrics_client, &b).await;
        if common::sample(&text, &series("invalidation")) == "2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B counted no forged invalidation:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cart_count(&client, &b).await.as_deref(),
        Some("1"),
        "a forged invalidation made B drop its cached copy"
    );
    let text = common::metrics(&metrics_client, &a).await;
    assert_ne!(common::sample(&text, &series("heartbeat")), "0", "{text}");
    assert!(
        !a.stderr().contains("fake-node"),
        "the fake node was waited for:\n{}",
        a.stderr()
    );

    // Forged acknowledgements, in the name of every node, for every invalidation, while B is
    // frozen: A's logout must still wait for B's own and give up on it.
    let mut invalidations = nats.subscribe(invalidate_subject).await.expect("sub");
    let forger = nats.clone();
    let forged_names = names.clone();
    let acks = tokio::spawn(async move {
        while let Some(m) = invalidations.next().await {
            let Some(reply) = m.reply else { continue };
            let all: Vec<String> = forged_names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect();
            for name in all {
                let payload = format!(r#"{{"node":"{name}"}}"#);
                let _ = forger.publish(reply.clone(), payload.clone().into()).await;
                let headers = bad_tag(&"11".repeat(32));
                let _ = forger
                    .publish_with_headers(reply.clone(), headers, payload.into())
                    .await;
            }
        }
    });
    assert!(names.lock().unwrap_or_else(|e| e.into_inner()).len() >= 2);
    b.signal_and_wait(nix::sys::signal::Signal::SIGSTOP, Duration::ZERO);
    // A write on A (another visitor's first cart item); the forged acks answer its
    // invalidation at once, in B's name too.
    let visitor = common::client();
    let res = common::post_form(&visitor, &a, "/", "/cart/add/2", &[]).await;
    assert_eq!(res.status(), 303);
    let stderr = a.stderr();
    assert!(
        stderr.contains("no acknowledgement within"),
        "A took a forged acknowledgement for B's:\n{stderr}"
    );
    let text = common::metrics(&metrics_client, &a).await;
    assert_ne!(common::sample(&text, &series("ack")), "0", "{text}");
    b.signal_and_wait(nix::sys::signal::Signal::SIGCONT, Duration::ZERO);
    // B, thawed, serves the write.
    assert_eq!(cart_count(&visitor, &b).await.as_deref(), Some("1"));
    for task in [listener, fake, acks] {
        task.abort();
    }
    drop(pg);
    drop((a, b));
    ns.cleanup().await;
}
