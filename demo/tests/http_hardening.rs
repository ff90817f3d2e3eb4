//! SPEC "HTTP hardening": login throttling per username and per client address, shared by the
//! nodes of a cluster through NATS, with `Retry-After`.

mod common;

use common::{client, post_form, service_available, service_url, spawn_node, Node, NodeOptions};

/// One login attempt through the form; returns the response.
async fn attempt(
    c: &reqwest::Client,
    node: &Node,
    user: &str,
    password: &str,
) -> reqwest::Response {
    post_form(
        c,
        node,
        "/login",
        "/login",
        &[("username", user), ("password", password)],
    )
    .await
}

#[tokio::test]
async fn five_wrong_passwords_then_429_with_retry_after() {
    let node = spawn_node(NodeOptions::default());
    let c = client();
    for i in 0..5 {
        let res = attempt(&c, &node, "alice", "wrong").await;
        assert_eq!(res.status(), 200, "attempt {i} is an ordinary failure");
        let html = res.text().await.expect("body");
        assert!(html.contains("Wrong username or password."), "{html}");
    }
    // The sixth, even with the right password, is refused until the window passes.
    let res = attempt(&c, &node, "alice", "wonderland").await;
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=300).contains(&retry), "Retry-After {retry}");
    // The same address is throttled for other usernames too (five failures from it).
    let res = attempt(&c, &node, "nobody", "x").await;
    assert_eq!(res.status(), 429);
}

#[tokio::test]
async fn cluster_nodes_count_failed_logins_together() {
    if !service_available("nats") {
        return;
    }
    let prefix = common::unique_name("throttle");
    let env = vec![
        ("SWITCHYARD_TASKS__BROKER".to_owned(), "nats".to_owned()),
        ("SWITCHYARD_NATS__URL".to_owned(), service_url("nats")),
        ("SWITCHYARD_NATS__PREFIX".to_owned(), prefix),
        ("SWITCHYARD_AUTH__MAX_FAILURES".to_owned(), "4".to_owned()),
    ];
    let a = spawn_node(NodeOptions {
        env: env.clone(),
        ..Default::default()
    });
    let b = spawn_node(NodeOptions {
        env,
        ..Default::default()
    });
    let c = client();
    for node in [&a, &b, &a, &b] {
        let res = attempt(&c, node, "alice", "wrong").await;
        assert_eq!(res.status(), 200);
    }
    for node in [&a, &b] {
        let res = attempt(&c, node, "alice", "wonderland").await;
        assert_eq!(
            res.status(),
            429,
            "four failures over two nodes fill the window"
        );
        assert!(res.headers().contains_key("retry-after"));
    }
}
