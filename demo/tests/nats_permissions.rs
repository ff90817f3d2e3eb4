//! docs/security.md's nats-server configuration, taken from the page (so the page cannot rot),
//! on a private server: the machine's nats-server and a current one. Nodes connected as `app`
//! serve and work; the real `switchyard` binary connected as `publisher` publishes (with
//! `--wait`, `--countdown`, `--unique`) and reads results; a plain NATS client connected as
//! `publisher` is refused the session bucket, result writes and deletes, events, other users'
//! replies, dead letters and scheduled tasks; `operator` runs the administrative commands
//! (`revoke`, `purge`, `dead list`, `scheduled list`, `sessions clear` on `nats_kv`).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NodeOptions, PrivateServer};
use serde_json::Value;

/// The first line of the configuration block in docs/security.md.
const TITLE: &str = "# nats-server.conf: Switchyard's NATS users";
/// The users, the server variables holding their passwords, and the passwords.
const USERS: [(&str, &str, &str); 3] = [
    (
        "app",
        "SWITCHYARD_APP_PASSWORD",
        "app-password-for-the-test",
    ),
    (
        "publisher",
        "SWITCHYARD_PUBLISHER_PASSWORD",
        "publisher-password-for-the-test",
    ),
    (
        "operator",
        "SWITCHYARD_OPERATOR_PASSWORD",
        "operator-password-for-the-test",
    ),
];
/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(20);

/// The fenced block of docs/security.md that starts with [`TITLE`].
fn server_config() -> String {
    let path = common::root().join("docs/security.md");
    let doc = std::fs::read_to_string(&path).expect("docs/security.md");
    let open = format!("```conf\n{TITLE}");
    let start = doc
        .find(&open)
        .expect("the configuration block in docs/security.md")
        + 8;
    let end = doc[start..].find("\n```").expect("the end of the block") + start;
    doc[start..end].to_owned()
}

/// The `SWITCHYARD_*` variables of a process connecting as `user`.
fn env_as(server: &PrivateServer, user: &str, dir: &std::path::Path) -> Vec<(String, String)> {
    let password = USERS.iter().find(|u| u.0 == user).map_or("", |u| u.2);
    [
        ("SWITCHYARD_NATS__URL", server.nats_url()),
        ("SWITCHYARD_NATS__USER", user.to_owned()),
        ("SWITCHYARD_NATS__PASSWORD", password.to_owned()),
        ("SWITCHYARD_TASKS__BROKER", "nats".to_owned()),
        ("SWITCHYARD_SESSIONS__ENGINE", "nats_kv".to_owned()),
        ("SWITCHYARD_MAIL__DIR", dir.display().to_string()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// `switchyard <args>` as `user`: (exit code, stdout, stderr).
fn cli_as(
    server: &PrivateServer,
    user: &str,
    dir: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let env = env_as(server, user, dir);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    common::run_cli(args, &env, None)
}

/// A `switchyard worker` process, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn record(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON {line:?}: {e}"))
}

/// The server's `-ERR` messages to one client.
struct Refusals(tokio::sync::mpsc::UnboundedReceiver<String>);

impl Refusals {
    /// Waits for a permissions violation naming `what` (e.g. `Publish to "x"`).
    async fn expect(&mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.0.recv()).await {
                Ok(Some(e)) if e.contains("Permissions Violation") && e.contains(what) => return,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!("the server did not refuse {what}"),
            }
        }
    }
}

/// A plain async-nats client connected as `user`, with the server's refusals.
async fn plain_client(server: &PrivateServer, user: &str) -> (async_nats::Client, Refusals) {
    let password = USERS.iter().find(|u| u.0 == user).map_or("", |u| u.2);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(user.to_owned(), password.to_owned())
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(server.nats_url())
        .await
        .expect("connect as a plain client");
    (client, Refusals(rx))
}

async fn permissions_hold(current: bool) {
    let config = server_config();
    let env: Vec<(&str, &str)> = USERS.iter().map(|(_, var, pw)| (*var, *pw)).collect();
    let Some(server) = PrivateServer::nats_configured(current, Some(&config), &env) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();

    // Nodes as `app`: a serve node (sessions in the nats_kv bucket) and a worker.
    let node = common::spawn_node(NodeOptions {
        env: env_as(&server, "app", dir),
        ..Default::default()
    });
    let mut cmd = Command::new(common::binary());
    cmd.args(["worker", "--node-id", "perm-worker"])
        .current_dir(common::root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .envs(env_as(&server, "app", dir));
    let _worker = Worker(cmd.spawn().expect("spawn worker"));
    let client = common::client();
    let res = common::post_form(&client, &node, "/", "/cart/add/1", &[]).await;
    assert_eq!(res.status(), 303, "cart write as app");
    let (status, page) = common::get_page(&client, &node.url("/cart")).await;
    assert_eq!(status, 200);
    assert_eq!(common::marker(&page, "cart-count").as_deref(), Some("1"));
    let (status, ready) = common::get_page(&client, &node.url("/readyz")).await;
    assert_eq!(status, 200, "{ready}");

    // The CLI as `publisher`: publish --wait, --countdown then result, --unique twice.
    let (code, out, err) = cli_as(
        &server,
        "publisher",
        dir,
        &["publish", "demo.add", r#"{"x":2,"y":3}"#, "--wait", "20"],
    );
    assert_eq!(code, 0, "publish --wait as publisher: {out}{err}");
    let rec = record(&out);
    assert_eq!(
        (rec["state"].as_str(), rec["result"].as_i64()),
        (Some("SUCCESS"), Some(5))
    );
    let finished = rec["id"].as_str().expect("id").to_owned();
    let (code, out, err) = cli_as(
        &server,
        "publisher",
        dir,
        &[
            "publish",
            "demo.add",
            r#"{"x":1,"y":1}"#,
            "--countdown",
            "1",
        ],
    );
    assert_eq!(code, 0, "publish --countdown as publisher: {err}");
    let id = out.trim().to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, out, err) = cli_as(&server, "publisher", dir, &["result", &id]);
        assert_eq!(code, 0, "result as publisher: {err}");
        if record(&out)["state"] == "SUCCESS" {
            assert_eq!(record(&out)["result"], 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the countdown task never ran: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unique = [
        "publish",
        "demo.add",
        r#"{"x":0,"y":0}"#,
        "--unique",
        "perm-key",
    ];
    let (code, first, err) = cli_as(&server, "publisher", dir, &unique);
    assert_eq!(code, 0, "publish --unique as publisher: {err}");
    let (code, second, err) = cli_as(&server, "publisher", dir, &unique);
    assert_eq!(code, 0, "publish --unique again: {err}");
    assert_eq!(
        first, second,
        "a duplicate answers with the first publish's id"
    );

    // A plain client as `publisher`: a task goes in; everything else is refused.
    let (nc, mut refused) = plain_client(&server, "publisher").await;
    let js = async_nats::jetstream::new(nc.clone());
    let ack = js
        .publish(
            "switchyard.tasks.default",
            r#"{"task":"demo.add","args":{"x":1,"y":2}}"#.into(),
        )
        .await
        .expect("publish a task")
        .await
        .expect("the task stream's acknowledgement");
    assert!(!ack.duplicate);
    let refuse_publish = [
        format!("$KV.switchyard_results.{finished}"),
        "switchyard.dead.default".to_owned(),
        "switchyard.scheduled.default".to_owned(),
        "$JS.API.STREAM.INFO.KV_switchyard_sessions".to_owned(),
        "$JS.API.DIRECT.GET.KV_switchyard_sessions.$KV.switchyard_sessions.k".to_owned(),
        "$JS.API.STREAM.MSG.GET.KV_switchyard_sessions".to_owned(),
        "$KV.switchyard_sessions.k".to_owned(),
        "$JS.API.STREAM.PURGE.SWITCHYARD_TASKS".to_owned(),
    ];
    for subject in &refuse_publish {
        nc.publish_with_reply(subject.clone(), nc.new_inbox(), "{}".into())
            .await
            .expect("publish");
        refused.expect(&format!("Publish to \"{subject}\"")).await;
    }
    // A delete of the result (a KV delete marker) is a write to the same subject.
    let mut delete = async_nats::HeaderMap::new();
    delete.insert("KV-Operation", "DEL");
    let subject = format!("$KV.switchyard_results.{finished}");
    nc.publish_with_headers(subject.clone(), delete, "".into())
        .await
        .expect("publish");
    refused.expect(&format!("Publish to \"{subject}\"")).await;
    for subject in [
        "switchyard.events.>",
        "switchyard.events.task-succeeded",
        "$KV.switchyard_sessions.>",
        "_INBOX_app.>",
        "_INBOX.>",
    ] {
        let _sub = nc.subscribe(subject).await.expect("subscribe");
        refused
            .expect(&format!("Subscription to \"{subject}\""))
            .await;
    }
    let (_, out, _) = cli_as(&server, "publisher", dir, &["result", &finished]);
    assert_eq!(record(&out)["state"], "SUCCESS", "the record is as it was");

    // `operator`: the administrative commands. A far countdown goes to the scheduled stream
    // (moved there by the worker), where `scheduled list` finds it and `purge` drops it.
    let (code, out, err) = cli_as(
        &server,
        "publisher",
        dir,
        &[
            "publish",
            "demo.add",
            r#"{"x":1,"y":1}"#,
            "--countdown",
            "600",
        ],
    );
    assert_eq!(code, 0, "publish --countdown 600 as publisher: {err}");
    let far = out.trim().to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, out, err) = cli_as(&server, "operator", dir, &["scheduled", "list"]);
        assert_eq!(code, 0, "scheduled list as operator: {err}");
        if out.contains(&far) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the far task never got scheduled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = cli_as(&server, "operator", dir, &["purge", "default"]);
    assert_eq!((code, out.trim()), (0, r#"{"purged":1}"#), "{err}");
    let stranger = uuid::Uuid::new_v4().to_string();
    for (args, expected) in [
        (vec!["revoke", stranger.as_str()], r#"{"revoked":1}"#),
        (vec!["purge", "emails"], r#"{"purged":0}"#),
        (vec!["dead", "list"], ""),
        (vec!["sessions", "clear"], r#"{"deleted":0}"#),
    ] {
        let (code, out, err) = cli_as(&server, "operator", dir, &args);
        assert_eq!(
            (code, out.trim()),
            (0, expected),
            "{args:?} as operator: {err}"
        );
    }
    let (_, out, _) = cli_as(&server, "publisher", dir, &["result", &stranger]);
    assert_eq!(record(&out)["state"], "REVOKED");
    drop(node);
}

#[actix_rt::test]
async fn publisher_publishes_and_reads_results_only_on_the_machine_server() {
    permissions_hold(false).await;
}

#[actix_rt::test]
async fn publisher_publishes_and_reads_results_only_on_a_current_server() {
    permissions_hold(true).await;
}
