//! The operator dashboard over HTTP (SPEC "Operator dashboard and live progress"): staff only,
//! every page and action, the `events` stream, task progress and the order page's stream, on
//! the memory broker and on NATS (a `serve` node and a `switchyard worker` process, with the
//! CLI publishing). The browser test is `dashboard_browser.rs`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use common::{client, csrf_token, get_page, login, spawn_node, Node, NodeOptions};
use serde_json::Value;

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(20);
const DASH: &str = "/_switchyard/";

/// `config/default.toml` plus a user who is not staff, bob / builder.
fn config_with_bob() -> String {
    let default =
        std::fs::read_to_string(common::root().join("config/default.toml")).expect("default.toml");
    let salt = SaltString::from_b64("c3dpdGNoeWFyZHRlc3Q").expect("salt");
    let hash = argon2::Argon2::default()
        .hash_password(b"builder", &salt)
        .expect("hash")
        .to_string();
    format!(
        "{default}\n[[auth.users]]\nusername = \"bob\"\npassword_hash = \"{hash}\"\npermissions = []\n"
    )
}

/// An open `text/event-stream`, read line by line.
struct Sse {
    res: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(c: &reqwest::Client, url: &str) -> Sse {
        let res = c.get(url).send().await.expect("GET events");
        assert_eq!(res.status(), 200, "events stream of {url}");
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        Sse {
            res,
            buf: String::new(),
        }
    }

    /// The next `data:` event matching `want`, within `within`.
    async fn until(&mut self, within: Duration, want: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=end).collect();
                if let Some(data) = line.trim_end().strip_prefix("data: ") {
                    let v: Value = serde_json::from_str(data).expect("data is one JSON line");
                    if want(&v) {
                        return Some(v);
                    }
                }
            }
            match tokio::time::timeout_at(deadline, self.res.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }
}

fn is_event(v: &Value, id: &str, kind: &str) -> bool {
    v["task_id"] == id && v["kind"] == kind
}

/// `<code id="task-id">ID</code>` of the order page.
fn order_task_id(html: &str) -> String {
    let key = "<code id=\"task-id\">";
    let start = html.find(key).expect("task id on the order page") + key.len();
    let end = html[start..].find('<').expect("end") + start;
    html[start..end].to_owned()
}

/// Checks out one product as the logged-in client; the order's path and its task id.
async fn place_order(c: &reqwest::Client, node: &Node) -> (String, String) {
    let res = common::post_form(c, node, "/", "/cart/add/1", &[]).await;
    assert_eq!(res.status(), 303);
    let res = common::post_form(c, node, "/cart", "/orders", &[]).await;
    assert_eq!(res.status(), 303, "checkout");
    let order = res
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("location")
        .to_owned();
    let (_, html) = get_page(c, &node.url(&order)).await;
    (order.clone(), order_task_id(&html))
}

/// POSTs `fields` with the CSRF token of the dashboard page `token_page`; the response.
async fn dash_post(
    c: &reqwest::Client,
    node: &Node,
    token_page: &str,
    path: &str,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    common::post_form(c, node, token_page, path, fields).await
}

fn location(res: &reqwest::Response) -> String {
    res.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// GETs `url` until its body contains `needle`; the body.
async fn page_until(c: &reqwest::Client, url: &str, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, html) = get_page(c, url).await;
        if status == 200 && html.contains(needle) {
            return html;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never showed {needle:?} (status {status}):\n{html}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Who may see the dashboard, on the node `node`.
async fn access_rules(node: &Node) {
    let anon = client();
    let res = anon.get(node.url(DASH)).send().await.expect("GET");
    assert_eq!(res.status(), 303, "anonymous is sent to log in");
    assert_eq!(location(&res), "/login?next=/_switchyard/");
    let res = anon
        .get(node.url("/_switchyard/events"))
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), 303, "anonymous gets no event stream");
    let res = anon
        .get(node.url("/_switchyard/static/dashboard.js"))
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), 200);
    let csp = res
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");

    let bob = client();
    login(&bob, node, "bob", "builder").await;
    for path in [
        DASH,
        "/_switchyard/tasks",
        "/_switchyard/events",
        "/_switchyard/dead",
    ] {
        let res = bob.get(node.url(path)).send().await.expect("GET");
        assert_eq!(res.status(), 403, "bob (not staff) on {path}");
    }
}

#[tokio::test]
async fn the_dashboard_on_the_memory_broker() {
    let outbox = tempfile::tempdir().expect("tempdir");
    let node = spawn_node(NodeOptions {
        config: Some(config_with_bob()),
        env: vec![(
            "SWITCHYARD_MAIL__DIR".into(),
            outbox.path().display().to_string(),
        )],
        ..NodeOptions::default()
    });
    access_rules(&node).await;

    let alice = client();
    login(&alice, &node, "alice", "wonderland").await;
    let (status, html) = get_page(&alice, &node.url(DASH)).await;
    assert_eq!(status, 200);
    for q in ["default", "emails"] {
        assert!(
            html.contains(&format!("data-queue=\"{q}\"")),
            "queue {q}:\n{html}"
        );
    }
    assert!(!html.contains("<script>"), "no inline script");

    // A task published after the stream opened arrives within 2 s.
    let mut events = Sse::open(&alice, &node.url("/_switchyard/events")).await;
    let t0 = Instant::now();
    let (order, id) = place_order(&alice, &node).await;
    let first = events
        .until(Duration::from_secs(2), |v| v["task_id"] == id.as_str())
        .await;
    assert!(first.is_some(), "no event of {id} within 2 s");
    assert!(t0.elapsed() < Duration::from_secs(4));
    let done = events
        .until(WAIT, |v| is_event(v, &id, "task-succeeded"))
        .await
        .expect("task-succeeded");
    assert_eq!(done["state"], "SUCCESS");
    assert_eq!(done["queue"], "emails");

    // The task list, its filters and the task page.
    let list = page_until(&alice, &node.url("/_switchyard/tasks"), &id).await;
    assert!(list.contains("state-SUCCESS"), "{list}");
    let by_prefix = get_page(
        &alice,
        &node.url(&format!("/_switchyard/tasks?id={}", &id[..8])),
    )
    .await
    .1;
    assert!(by_prefix.contains(&id));
    let by_state = get_page(&alice, &node.url("/_switchyard/tasks?state=FAILURE"))
        .await
        .1;
    assert!(!by_state.contains(&id), "a SUCCESS task under FAILURE");
    let by_name = get_page(
        &alice,
        &node.url("/_switchyard/tasks?task=shop.order_created"),
    )
    .await
    .1;
    assert!(by_name.contains(&id));
    let (status, _) = get_page(&alice, &node.url("/_switchyard/tasks?state=BOGUS")).await;
    assert_eq!(status, 400, "an unknown state is a clear 400");
    let (status, page) = get_page(&alice, &node.url(&format!("/_switchyard/tasks/{id}"))).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("id=\"task-state\" class=\"state state-SUCCESS\""),
        "{page}"
    );
    assert!(page.contains("order_id"), "args shown: {page}");
    let received = page.find("task-received").expect("received event listed");
    let succeeded = page.find("task-succeeded").expect("succeeded event listed");
    assert!(received < succeeded, "events in order");
    let (status, _) = get_page(&alice, &node.url("/_switchyard/tasks/not%20an%20id")).await;
    assert_eq!(status, 404);

    // Retry: a copy with a new id whose record names the original.
    let tasks_page = format!("/_switchyard/tasks/{id}");
    let res = dash_post(
        &alice,
        &node,
        &tasks_page,
        &format!("{tasks_page}/retry"),
        &[],
    )
    .await;
    assert_eq!(res.status(), 303);
    let copy = location(&res);
    assert!(
        copy.starts_with("/_switchyard/tasks/") && !copy.ends_with(&id),
        "{copy}"
    );
    let (_, flashed) = get_page(&alice, &node.url(&copy)).await;
    assert!(
        flashed.contains(&format!("Task {id} retried as")),
        "flash message"
    );
    let copy_page = page_until(&alice, &node.url(&copy), "state-SUCCESS").await;
    assert!(copy_page.contains(&format!("id=\"retry-of\" href=\"/_switchyard/tasks/{id}\"")));

    // Revoke of a finished task: 303 and a warning; without a CSRF token: 403.
    let res = dash_post(
        &alice,
        &node,
        &tasks_page,
        &format!("{tasks_page}/revoke"),
        &[],
    )
    .await;
    assert_eq!(res.status(), 303);
    let (_, page) = get_page(&alice, &node.url(&tasks_page)).await;
    assert!(page.contains("was not revoked"), "{page}");
    let res = alice
        .post(node.url(&format!("{tasks_page}/revoke")))
        .form(&[("x", "1")])
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 403, "a POST without CSRF token");
    let res = dash_post(
        &alice,
        &node,
        "/_switchyard/dead",
        "/_switchyard/dead/replay",
        &[],
    )
    .await;
    assert_eq!(res.status(), 400, "a replay naming nothing");
    let (status, dead) = get_page(&alice, &node.url("/_switchyard/dead")).await;
    assert_eq!(status, 200);
    assert!(dead.contains("No dead letters."));
    let (status, sched) = get_page(&alice, &node.url("/_switchyard/schedules")).await;
    assert_eq!(status, 200);
    assert!(sched.contains("id=\"schedules\""));

    // The order page's stream: its owner only.
    let bob = client();
    login(&bob, &node, "bob", "builder").await;
    let stream = format!("{order}/events");
    for c in [&bob, &client()] {
        let res = c.get(node.url(&stream)).send().await.expect("GET");
        assert_eq!(res.status(), 404, "someone else's order stream");
    }
    let mut own = Sse::open(&alice, &node.url(&stream)).await;
    let seen = own
        .until(WAIT, |v| is_event(v, &id, "task-succeeded"))
        .await;
    assert!(
        seen.is_some(),
        "the owner's stream replays the task's events"
    );
    let (_, order_page) = get_page(&alice, &node.url(&order)).await;
    assert!(order_page.contains("<script src=\"/orders/live.js\""));
    assert!(order_page.contains("id=\"task-progress\""));
}

/// A NATS deployment: `serve` plus a `switchyard worker` under a fresh prefix.
struct Cluster {
    prefix: String,
    nats: String,
    node: Node,
    worker: Child,
}

impl Cluster {
    fn env(prefix: &str, nats: &str) -> Vec<(String, String)> {
        vec![
            ("SWITCHYARD_TASKS__BROKER".into(), "nats".into()),
            ("SWITCHYARD_NATS__PREFIX".into(), prefix.into()),
            ("SWITCHYARD_NATS__URL".into(), nats.into()),
            ("SWITCHYARD_CLUSTER__HEARTBEAT_INTERVAL".into(), "1".into()),
            (
                "SWITCHYARD_POSTGRES__URL".into(),
                common::service_url("postgres"),
            ),
        ]
    }

    fn start() -> Option<Cluster> {
        if !common::service_available("nats") {
            return None;
        }
        let nats = common::service_url("nats");
        let prefix = common::unique_name("sydash");
        let env = Self::env(&prefix, &nats);
        let mut cmd = Command::new(common::binary());
        cmd.args(["worker", "--node-id", "dash-worker"])
            .current_dir(common::root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let worker = cmd.spawn().expect("spawn worker");
        let node = spawn_node(NodeOptions {
            config: Some(config_with_bob()),
            env: env.clone(),
            ..NodeOptions::default()
        });
        Some(Cluster {
            prefix,
            nats,
            node,
            worker,
        })
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let env = Self::env(&self.prefix, &self.nats);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        common::run_cli(args, &env, None)
    }

    async fn cleanup(&self) {
        let up = self.prefix.to_uppercase();
        for stream in ["TASKS", "DEAD", "SCHEDULED"] {
            common::delete_stream(&self.nats, &format!("{up}_{stream}")).await;
        }
        for bucket in ["results", "unique", "beat", "scheduler", "login"] {
            common::delete_stream(&self.nats, &format!("KV_{}_{bucket}", self.prefix)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.worker.kill();
        let _ = self.worker.wait();
    }
}

fn published_id(stdout: &str) -> String {
    let v: Value = serde_json::from_str(stdout.lines().next().unwrap_or("{}")).unwrap_or_default();
    v["id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| stdout.trim().to_owned())
}

#[tokio::test]
async fn the_dashboard_on_nats_with_progress_and_dead_letters() {
    let Some(cl) = Cluster::start() else { return };
    let node = &cl.node;
    access_rules(node).await;
    let alice = client();
    login(&alice, node, "alice", "wonderland").await;
    let (status, html) = get_page(&alice, &node.url(DASH)).await;
    assert_eq!(status, 200);
    for q in ["default", "emails"] {
        assert!(html.contains(&format!("data-queue=\"{q}\"")), "queue {q}");
    }

    // Acceptance: a task published from the CLI after the stream opened, within 2 s.
    let mut events = Sse::open(&alice, &node.url("/_switchyard/events")).await;
    let t0 = Instant::now();
    let (code, out, err) = cl.cli(&["publish", "demo.add", r#"{"x": 2, "y": 3}"#]);
    assert_eq!(code, 0, "publish: {err}");
    let id = published_id(&out);
    let first = events
        .until(Duration::from_secs(2), |v| v["task_id"] == id.as_str())
        .await;
    assert!(first.is_some(), "no event of {id} within 2 s of publishing");
    eprintln!("first event {:?} after publish started", t0.elapsed());
    events
        .until(WAIT, |v| is_event(v, &id, "task-succeeded"))
        .await
        .expect("task-succeeded");

    // The worker's heartbeat shows on the overview.
    page_until(&alice, &node.url(DASH), "data-node=\"dash-worker\"").await;

    // Progress: demo.count reports it; the record and task-progress events carry it.
    let (code, out, err) = cl.cli(&["publish", "demo.count", r#"{"to": 5}"#]);
    assert_eq!(code, 0, "publish: {err}");
    let count = published_id(&out);
    let progress = events
        .until(WAIT, |v| is_event(v, &count, "task-progress"))
        .await
        .expect("a task-progress event");
    assert_eq!(progress["progress"]["total"], 5);
    events
        .until(WAIT, |v| is_event(v, &count, "task-succeeded"))
        .await
        .expect("demo.count finished");
    let (code, out, _) = cl.cli(&["result", &count]);
    assert_eq!(code, 0);
    let rec: Value = serde_json::from_str(out.trim()).expect("record");
    assert_eq!(rec["result"], 5);
    assert_eq!(rec["progress"]["done"], 5, "{rec}");
    assert_eq!(rec["progress"]["total"], 5);
    let (_, out, _) = cl.cli(&["result", &id]);
    let rec: Value = serde_json::from_str(out.trim()).expect("record");
    assert!(rec["progress"].is_null(), "never reported: null ({rec})");
    let page = page_until(
        &alice,
        &node.url(&format!("/_switchyard/tasks/{count}")),
        "5/5",
    )
    .await;
    assert!(page.contains("state-SUCCESS"));

    // An exact id is found in the results store (not only in the index).
    let (_, list) = get_page(&alice, &node.url(&format!("/_switchyard/tasks?id={id}"))).await;
    assert!(list.contains(&id));

    // A dead letter (a foreign message naming no registered task): listed, replayed, discarded.
    let nats = async_nats::connect(&cl.nats).await.expect("nats");
    let dead_id = format!("dead-{}", common::unique_name("x"));
    let payload = serde_json::json!({"id": dead_id, "task": "nope.missing", "args": {}});
    nats.publish(
        format!("{}.tasks.default", cl.prefix),
        serde_json::to_vec(&payload).expect("json").into(),
    )
    .await
    .expect("publish");
    nats.flush().await.expect("flush");
    let dead = page_until(&alice, &node.url("/_switchyard/dead"), &dead_id).await;
    assert!(dead.contains("unknown task"), "{dead}");
    assert!(
        dead.contains(&format!("{}.tasks.default", cl.prefix)),
        "original subject"
    );
    let seq = {
        let key = "<tr data-seq=\"";
        let start = dead.find(key).expect("a row") + key.len();
        dead[start..start + dead[start..].find('"').expect("end")].to_owned()
    };
    let res = dash_post(
        &alice,
        node,
        "/_switchyard/dead",
        "/_switchyard/dead/replay",
        &[("seq", &seq)],
    )
    .await;
    assert_eq!(res.status(), 303);
    assert_eq!(location(&res), "/_switchyard/dead");
    let (_, after) = get_page(&alice, &node.url("/_switchyard/dead")).await;
    assert!(after.contains("1 dead letter(s) replayed."), "{after}");
    assert!(
        !after.contains(&format!("<tr data-seq=\"{seq}\"")),
        "the replayed letter left"
    );
    // Replayed, it fails again (still no such task): a new letter, which "discard all" removes.
    page_until(&alice, &node.url("/_switchyard/dead"), &dead_id).await;
    let res = dash_post(
        &alice,
        node,
        "/_switchyard/dead",
        "/_switchyard/dead/discard",
        &[("all", "1")],
    )
    .await;
    assert_eq!(res.status(), 303);
    page_until(&alice, &node.url("/_switchyard/dead"), "No dead letters.").await;
    let _ = csrf_token;
    cl.cleanup().await;
}

/// `switchyard users create NAME` with the password on stdin and `extra` arguments.
fn create_user(env: &[(String, String)], name: &str, password: &str, extra: &[&str]) {
    let out = Command::new(common::binary())
        .args(["users", "create", name, "--password-stdin"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(common::root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(format!("{password}\n").as_bytes())?;
            }
            child.wait_with_output()
        })
        .expect("users create");
    assert!(
        out.status.success(),
        "users create {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Users stored in Postgres: `users create NAME --staff` may open the dashboard, others 403.
#[tokio::test]
async fn postgres_users_created_with_staff_open_the_dashboard() {
    if !common::service_available("postgres") {
        return;
    }
    let url = common::fresh_postgres_url();
    let env: Vec<(String, String)> = vec![
        ("SWITCHYARD_AUTH__STORE".into(), "postgres".into()),
        ("SWITCHYARD_POSTGRES__URL".into(), url.clone()),
    ];
    create_user(&env, "carol", "carol-pass", &["--staff"]);
    create_user(&env, "dave", "dave-pass", &[]);
    let node = spawn_node(NodeOptions {
        env: env.clone(),
        ..NodeOptions::default()
    });
    let carol = client();
    login(&carol, &node, "carol", "carol-pass").await;
    let (status, html) = get_page(&carol, &node.url(DASH)).await;
    assert_eq!(status, 200, "carol is staff");
    assert!(html.contains("data-queue=\"emails\""));
    let dave = client();
    login(&dave, &node, "dave", "dave-pass").await;
    let (status, _) = get_page(&dave, &node.url(DASH)).await;
    assert_eq!(status, 403, "dave is not");
    drop(node);
    common::drop_database(&url).await;
}

/// `server.dashboard_path = ""` disables the dashboard; another path moves it.
#[tokio::test]
async fn the_dashboard_path_moves_or_disables_it() {
    let off = spawn_node(NodeOptions {
        env: vec![("SWITCHYARD_SERVER__DASHBOARD_PATH".into(), String::new())],
        ..NodeOptions::default()
    });
    let alice = client();
    login(&alice, &off, "alice", "wonderland").await;
    for path in [
        DASH,
        "/_switchyard/events",
        "/_switchyard/static/dashboard.css",
    ] {
        let (status, _) = get_page(&alice, &off.url(path)).await;
        assert_eq!(status, 404, "{path} with the dashboard disabled");
    }
    let moved = spawn_node(NodeOptions {
        env: vec![("SWITCHYARD_SERVER__DASHBOARD_PATH".into(), "/ops/".into())],
        ..NodeOptions::default()
    });
    let alice = client();
    login(&alice, &moved, "alice", "wonderland").await;
    let (status, html) = get_page(&alice, &moved.url("/ops/")).await;
    assert_eq!(status, 200);
    assert!(html.contains("href=\"/ops/static/dashboard.css\""));
    let (status, _) = get_page(&alice, &moved.url(DASH)).await;
    assert_eq!(status, 404);
    let (code, _, err) = common::run_cli(
        &["config", "check"],
        &[("SWITCHYARD_SERVER__DASHBOARD_PATH", "no-slash")],
        None,
    );
    assert_ne!(code, 0, "a path without slashes is refused");
    assert!(err.contains("DASHBOARD_PATH"), "{err}");
}
