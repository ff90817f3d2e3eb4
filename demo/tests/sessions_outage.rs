//! Outages of a session engine's service, on private servers this test starts and stops (a
//! temporary `initdb` Postgres cluster, a `nats-server` with its own store, a `redis-server`
//! with an append-only file, a `memcached` frozen with SIGSTOP): requests that need the
//! session get 503 and `/readyz` names the failing check; once the service is back the node
//! serves again without a restart, with every committed session intact.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, marker, spawn_node, wait_port, Node, NodeOptions, PrivateServer};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const REDIS_SERVER: &str = "/usr/bin/redis-server";
const MEMCACHED: &str = "/usr/bin/memcached";
/// How long a node may take to serve again after its service came back.
const RECOVERY: Duration = Duration::from_secs(20);

/// A private Postgres cluster in a temporary directory, run as the `postgres` user.
struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn as_postgres(program: &str, args: &[&str]) -> bool {
    let is_root = is_root();
    let mut cmd = if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl PrivatePostgres {
    /// `None` (skipped, or failed under SWITCHYARD_REQUIRE_SERVICES=1) without the binaries.
    fn start() -> Option<Self> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            if std::env::var("SWITCHYARD_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("{PG_BIN}/initdb not found (SWITCHYARD_REQUIRE_SERVICES=1)");
            }
            println!("SKIPPED: {PG_BIN}/initdb not found");
            return None;
        }
        let dir = std::env::temp_dir().join(common::unique_name("sy-pg-"));
        std::fs::create_dir_all(&dir).expect("pg dir");
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status();
        }
        let data = dir.join("data");
        let data_s = data.to_string_lossy().into_owned();
        assert!(
            as_postgres(
                &format!("{PG_BIN}/initdb"),
                &["-D", &data_s, "-A", "trust", "-U", "postgres", "--no-sync"],
            ),
            "initdb"
        );
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
        };
        pg.up();
        Some(pg)
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn up(&self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.to_string_lossy()
        );
        assert!(
            as_postgres(
                &format!("{PG_BIN}/pg_ctl"),
                &["-D", &data, "-o", &opts, "-w", "-t", "30", "start"],
            ),
            "pg_ctl start"
        );
        assert!(wait_port(self.port, true, Duration::from_secs(10)));
    }

    fn down(&self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &["-D", &data, "-m", "fast", "-w", "-t", "30", "stop"],
        );
        assert!(wait_port(self.port, false, Duration::from_secs(10)));
    }
}

impl PrivatePostgres {
    /// Every process of the cluster: the postmaster (from `postmaster.pid`) and its children.
    fn pids(&self) -> Vec<i32> {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let Some(postmaster) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Freezes the whole cluster (SIGSTOP), connections left open: the server stops
    /// answering, as a hung host would. Resumed (SIGCONT) when the guard drops.
    fn stall(&self) -> Stalled<'_> {
        use nix::sys::signal::{kill, Signal};
        let pids = self.pids();
        assert!(!pids.is_empty(), "no postmaster.pid");
        for pid in &pids {
            let _ = kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGSTOP);
        }
        Stalled { pg: self }
    }
}

/// A stalled [`PrivatePostgres`]; resumes it on drop (also when the test fails).
struct Stalled<'a> {
    pg: &'a PrivatePostgres,
}

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        for pid in self.pg.pids() {
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGCONT);
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &["-D", &data, "-m", "immediate", "-w", "-t", "10", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn node(env: &[(&str, String)]) -> Node {
    let mut all: Vec<(String, String)> = vec![
        (
            "SWITCHYARD_SERVER__SECRET_KEY".into(),
            "outage-test-secret-key-0123456789abcdef".into(),
        ),
        ("SWITCHYARD_POSTGRES__POOL_SIZE".into(), "4".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    spawn_node(NodeOptions {
        env: all,
        ..Default::default()
    })
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    match client.get(url).send().await {
        Ok(res) => {
            let status = res.status().as_u16();
            (status, res.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// A logged-in client with 2 items in its cart; returns the client.
async fn shopper(node: &Node) -> reqwest::Client {
    let client = common::client();
    common::login(&client, node, "alice", "wonderland").await;
    for _ in 0..2 {
        add_to_cart(&client, node).await;
    }
    client
}

/// `POST /cart/add/1` with the token of `/`; it must answer 303.
async fn add_to_cart(client: &reqwest::Client, node: &Node) {
    let res = common::post_form(client, node, "/", "/cart/add/1", &[]).await;
    assert_eq!(res.status().as_u16(), 303);
}

/// While the service is down: the cart page is a 503 and /readyz names the sessions check.
async fn assert_unavailable(client: &reqwest::Client, node: &Node) {
    let (status, page) = get(client, &node.url("/cart")).await;
    assert_eq!(status, 503, "{page}");
    assert!(
        page.to_lowercase().contains("unavailable"),
        "a clear page: {page}"
    );
    let (status, body) = get(client, &node.url("/readyz")).await;
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("readyz json");
    assert_eq!(v["checks"]["sessions"]["ok"], false, "{body}");
    let (status, _) = get(client, &node.url("/healthz")).await;
    assert_eq!(status, 200, "the process itself is fine");
}

/// Once the service is back: polls until the cart page answers, then checks it is intact.
async fn assert_recovers(client: &reqwest::Client, node: &Node) {
    let deadline = Instant::now() + RECOVERY;
    let page = loop {
        let (status, page) = get(client, &node.url("/cart")).await;
        if status == 200 {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "not serving {RECOVERY:?} after the service came back: {status} {page}\n{}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(marker(&page, "cart-count").as_deref(), Some("2"), "{page}");
    assert_eq!(marker(&page, "user").as_deref(), Some("alice"));
    let (status, body) = get(client, &node.url("/readyz")).await;
    assert_eq!(status, 200, "{body}");
}

#[actix_rt::test]
async fn postgres_outage_gives_503_and_recovers_with_sessions_intact() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let a = node(&[
        ("SWITCHYARD_SESSIONS__ENGINE", "postgres".into()),
        ("SWITCHYARD_POSTGRES__URL", pg.url("switchyard")),
    ]);
    let client = shopper(&a).await;
    pg.down();
    assert_unavailable(&client, &a).await;
    pg.up();
    assert_recovers(&client, &a).await;
}

/// A Postgres that stops answering with its connections open (every process SIGSTOPped):
/// without client-side timeouts a request would wait as long as TCP allows. A cart write
/// answers 503 within the engine's bound (1.5 s; the test allows 5 s for a loaded machine),
/// and once Postgres answers again the same session works, its data intact.
#[actix_rt::test]
async fn stalled_postgres_gives_503_quickly_and_recovers() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let a = node(&[
        ("SWITCHYARD_SESSIONS__ENGINE", "postgres".into()),
        ("SWITCHYARD_POSTGRES__URL", pg.url("switchyard")),
    ]);
    let client = shopper(&a).await;
    let (_, home) = get(&client, &a.url("/")).await;
    let token = common::csrf_token(&home).expect("a CSRF token on /");
    let stalled = pg.stall();
    let started = Instant::now();
    let res = client
        .post(a.url("/cart/add/1"))
        .form(&[("csrfmiddlewaretoken", token.as_str())])
        .send()
        .await
        .expect("an answer, not a client timeout");
    let elapsed = started.elapsed();
    let status = res.status().as_u16();
    let page = res.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{page}");
    assert!(
        elapsed < Duration::from_secs(5),
        "503 after {elapsed:?}: the query was not bounded"
    );
    let started = Instant::now();
    let (status, body) = get(&client, &a.url("/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "readyz bounded");
    drop(stalled);
    assert_recovers(&client, &a).await;
    add_to_cart(&client, &a).await;
    let (status, page) = get(&client, &a.url("/cart")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(marker(&page, "cart-count").as_deref(), Some("3"), "{page}");
}

#[actix_rt::test]
async fn nats_kv_outage_gives_503_and_recovers_with_sessions_intact() {
    let Some(mut nats) = PrivateServer::nats() else {
        return;
    };
    let a = node(&[
        ("SWITCHYARD_SESSIONS__ENGINE", "nats_kv".into()),
        ("SWITCHYARD_NATS__URL", nats.nats_url()),
    ]);
    let client = shopper(&a).await;
    nats.down();
    assert_unavailable(&client, &a).await;
    nats.up();
    assert_recovers(&client, &a).await;
}

#[actix_rt::test]
async fn redis_outage_gives_503_and_recovers_with_sessions_intact() {
    // Redis as it is run when sessions must survive its restart: an append-only file,
    // fsynced on every write.
    let Some(mut redis) = PrivateServer::start(
        &[REDIS_SERVER],
        &[
            "--port",
            "{port}",
            "--bind",
            "127.0.0.1",
            "--dir",
            "{dir}",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ],
    ) else {
        return;
    };
    let a = node(&[
        ("SWITCHYARD_SESSIONS__ENGINE", "redis".into()),
        (
            "SWITCHYARD_REDIS__URL",
            format!("redis://127.0.0.1:{}/", redis.port),
        ),
    ]);
    let client = shopper(&a).await;
    redis.down();
    assert_unavailable(&client, &a).await;
    redis.up();
    assert_recovers(&client, &a).await;
}

#[actix_rt::test]
async fn memcached_that_stops_answering_gives_503_and_recovers_with_sessions_intact() {
    // memcached keeps nothing across a restart, so its outage here is a server that stops
    // answering (SIGSTOP) with its connections open: every operation must time out into a
    // 503, not hang the request, and the sessions are there once it answers again.
    let mut args = vec!["-l", "127.0.0.1", "-p", "{port}", "-m", "16"];
    if is_root() {
        args.extend(["-u", "nobody"]);
    }
    let Some(memcached) = PrivateServer::start(&[MEMCACHED], &args) else {
        return;
    };
    let a = node(&[
        ("SWITCHYARD_SESSIONS__ENGINE", "memcached".into()),
        (
            "SWITCHYARD_MEMCACHED__SERVERS",
            format!("127.0.0.1:{}", memcached.port),
        ),
    ]);
    let client = shopper(&a).await;
    memcached.signal(nix::sys::signal::Signal::SIGSTOP);
    assert_unavailable(&client, &a).await;
    memcached.signal(nix::sys::signal::Signal::SIGCONT);
    assert_recovers(&client, &a).await;
}

/// `cached_db` without NATS keeps serving from Postgres (uncached) and caches again once
/// NATS is back.
#[actix_rt::test]
async fn cached_db_serves_without_nats() {
    if !common::service_available("postgres") {
        return;
    }
    let Some(mut nats) = PrivateServer::nats() else {
        return;
    };
    let url = common::fresh_postgres_url();
    let env = [
        ("SWITCHYARD_SESSIONS__ENGINE", "cached_db".to_owned()),
        ("SWITCHYARD_NATS__URL", nats.nats_url()),
        ("SWITCHYARD_POSTGRES__URL", url.clone()),
    ];
    let a = node(&env);
    let b = node(&env);
    // Past the warm-up (1.5 s), B caches what it reads.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let client = shopper(&a).await;
    // B caches the session.
    let (_, page) = get(&client, &b.url("/cart")).await;
    assert_eq!(marker(&page, "cart-count").as_deref(), Some("2"));
    nats.down();
    // Without NATS: a write on A, read on B (which must not serve its stale copy).
    add_to_cart(&client, &a).await;
    let (status, page) = get(&client, &b.url("/cart")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(marker(&page, "cart-count").as_deref(), Some("3"), "{page}");
    let (status, body) = get(&client, &b.url("/readyz")).await;
    assert_eq!(status, 200, "Postgres is what the engine needs: {body}");
    nats.up();
    let (status, page) = get(&client, &b.url("/cart")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(marker(&page, "cart-count").as_deref(), Some("3"), "{page}");
    drop((a, b));
    common::drop_database(&url).await;
}
