//! Orders end to end on the real binary with the default config: checkout creates the order,
//! publishes `shop.order_created` to the in-process memory broker, its worker writes the
//! `.eml`, and the order page reaches SUCCESS. Also: who may see an order, the empty cart, and
//! the task CLI commands that need NATS.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use common::{client, marker, run_cli, spawn_node, Node, NodeOptions};
use reqwest::header::LOCATION;

/// The token of the first CSRF input on a page.
fn csrf_token(html: &str) -> String {
    let start = html
        .find("name=\"csrfmiddlewaretoken\" value=\"")
        .map(|i| i + "name=\"csrfmiddlewaretoken\" value=\"".len())
        .unwrap_or_else(|| panic!("no csrf input in:\n{html}"));
    let end = html[start..].find('"').expect("closing quote") + start;
    html[start..end].to_owned()
}

async fn page(c: &reqwest::Client, url: &str) -> (u16, String) {
    let res = c.get(url).send().await.expect("GET");
    let status = res.status().as_u16();
    (status, res.text().await.expect("body"))
}

/// GETs `page_path` for its token, then POSTs `form` (plus the token) to `path`.
async fn post(
    c: &reqwest::Client,
    node: &Node,
    page_path: &str,
    path: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let (_, html) = page(c, &node.url(page_path)).await;
    let token = csrf_token(&html);
    let mut form: Vec<(&str, &str)> = form.to_vec();
    form.push(("csrfmiddlewaretoken", &token));
    c.post(node.url(path))
        .form(&form)
        .send()
        .await
        .expect("POST")
}

fn location(res: &reqwest::Response) -> String {
    res.headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn login(c: &reqwest::Client, node: &Node, user: &str, password: &str) {
    let res = post(
        c,
        node,
        "/login",
        "/login",
        &[
            ("username", user),
            ("password", password),
            ("next", "/cart"),
        ],
    )
    .await;
    assert_eq!(res.status(), 303, "login as {user}");
}

/// `config/default.toml` plus a second user, bob / builder.
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

#[tokio::test]
async fn checkout_publishes_the_mail_task_and_the_page_reaches_success() {
    let outbox = tempfile::tempdir().expect("tempdir");
    let outbox_dir = outbox.path().join("outbox");
    let node = spawn_node(NodeOptions {
        config: Some(config_with_bob()),
        env: vec![(
            "SWITCHYARD_MAIL__DIR".into(),
            outbox_dir.display().to_string(),
        )],
        ..NodeOptions::default()
    });
    let c = client();

    // Anonymous checkout: to the login page, back to the cart afterwards.
    let res = post(&c, &node, "/", "/cart/add/1", &[]).await;
    assert_eq!(res.status(), 303);
    let res = post(&c, &node, "/", "/cart/add/3", &[]).await;
    assert_eq!(res.status(), 303);
    let res = post(&c, &node, "/cart", "/orders", &[]).await;
    assert_eq!(res.status(), 303);
    assert_eq!(location(&res), "/login?next=/cart");

    login(&c, &node, "alice", "wonderland").await;
    let res = post(&c, &node, "/cart", "/orders", &[]).await;
    assert_eq!(res.status(), 303, "{}", node.stderr());
    let order_url = location(&res);
    let order_id: u64 = order_url
        .strip_prefix("/orders/")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("not an order URL: {order_url:?}"));

    // The page follows the task to SUCCESS.
    let deadline = Instant::now() + Duration::from_secs(10);
    let html = loop {
        let (status, html) = page(&c, &node.url(&order_url)).await;
        assert_eq!(status, 200, "{html}");
        let state = marker(&html, "task-state").expect("#task-state");
        assert!(
            ["PENDING", "STARTED", "RETRY", "SUCCESS"].contains(&state.as_str()),
            "{state}"
        );
        if state == "SUCCESS" {
            break html;
        }
        assert!(
            Instant::now() < deadline,
            "still {state}; stderr:\n{}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        marker(&html, "cart-count").as_deref(),
        Some("0"),
        "cart emptied"
    );
    assert_eq!(marker(&html, "user").as_deref(), Some("alice"));
    assert!(html.contains(&format!("Order #{order_id}")), "{html}");

    // The mail is in the outbox under the task id.
    let task_id = html
        .split("<code id=\"task-id\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("#task-id")
        .to_owned();
    assert!(uuid::Uuid::parse_str(&task_id).is_ok(), "{task_id}");
    let eml = std::fs::read_to_string(outbox_dir.join(format!("{task_id}.eml")))
        .expect("the .eml is in the outbox");
    assert!(
        eml.contains(&format!("Subject: Order #{order_id} confirmed\r\n")),
        "{eml}"
    );
    let files = std::fs::read_dir(&outbox_dir).expect("outbox").count();
    assert_eq!(files, 1, "exactly one mail, no temp files left");

    // Metrics count the task's states.
    let (_, metrics) = page(&c, &node.url("/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchyard_tasks_total{")
                && l.contains("task=\"shop.order_created\"")
                && l.contains("state=\"SUCCESS\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );

    // Nobody else sees the order: anonymous, another user, an unknown id.
    let (status, html) = page(&client(), &node.url(&order_url)).await;
    assert_eq!(status, 404);
    assert!(marker(&html, "task-state").is_none());
    let bob = client();
    login(&bob, &node, "bob", "builder").await;
    assert_eq!(page(&bob, &node.url(&order_url)).await.0, 404);
    assert_eq!(page(&c, &node.url("/orders/999999")).await.0, 404);
    assert_eq!(page(&c, &node.url("/orders/nope")).await.0, 404);

    // Checking out an empty cart: back to the cart with a warning.
    let res = post(&c, &node, "/cart", "/orders", &[]).await;
    assert_eq!(res.status(), 303);
    assert_eq!(location(&res), "/cart");
    let (_, html) = page(&c, &node.url("/cart")).await;
    assert!(html.contains("<li class=\"warning\">"), "{html}");
}

#[tokio::test]
async fn console_mail_backend_prints_instead_of_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox_dir = dir.path().join("outbox");
    let node = spawn_node(NodeOptions {
        env: vec![
            ("SWITCHYARD_MAIL__BACKEND".into(), "console".into()),
            (
                "SWITCHYARD_MAIL__DIR".into(),
                outbox_dir.display().to_string(),
            ),
        ],
        ..NodeOptions::default()
    });
    let c = client();
    assert_eq!(post(&c, &node, "/", "/cart/add/2", &[]).await.status(), 303);
    login(&c, &node, "alice", "wonderland").await;
    let res = post(&c, &node, "/cart", "/orders", &[]).await;
    assert_eq!(res.status(), 303);
    let order_id = location(&res).trim_start_matches("/orders/").to_owned();
    let subject = format!("Subject: Order #{order_id} confirmed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.stderr().contains(&subject) {
        assert!(
            Instant::now() < deadline,
            "no mail on stderr:\n{}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !Path::new(&outbox_dir).exists(),
        "console mail wrote a file"
    );
}

#[test]
fn task_commands_need_nats_under_the_memory_broker() {
    for args in [
        &["publish", "demo.add", r#"{"x":2,"y":3}"#][..],
        &["result", "0192f7c4-7c1e-7a51-8f0e-3b7d2a9c4e11"],
        &["revoke", "0192f7c4-7c1e-7a51-8f0e-3b7d2a9c4e11"],
        &["purge", "default"],
        &["dead", "list"],
        &["worker"],
        &["cluster", "status", "--json"],
    ] {
        let (code, stdout, stderr) = run_cli(args, &[], None);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(
            stderr.contains("tasks.broker = \"nats\""),
            "{args:?}: {stderr}"
        );
    }
}
