//! SPEC "HTTP hardening": login throttling per username and per client address, shared by the
//! nodes of a cluster through NATS, with `Retry-After`; `X-Forwarded-*` believed only from
//! `server.trusted_proxies`.

mod common;

use common::{
    client, csrf_token, post_form, service_available, service_url, set_cookie_value, spawn_node,
    Node, NodeOptions,
};

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

fn node_with(env: &[(&str, &str)]) -> Node {
    spawn_node(NodeOptions {
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    })
}

/// A failed login as `user` claiming, through `X-Forwarded-For`, to come from `forwarded_for`.
async fn attempt_from(c: &reqwest::Client, node: &Node, user: &str, forwarded_for: &str) -> u16 {
    let html = c
        .get(node.url("/login"))
        .send()
        .await
        .expect("GET /login")
        .text()
        .await
        .expect("body");
    let token = csrf_token(&html).expect("a CSRF token on /login");
    c.post(node.url("/login"))
        .header("x-forwarded-for", forwarded_for)
        .form(&[
            ("username", user),
            ("password", "wrong"),
            ("csrfmiddlewaretoken", &token),
        ])
        .send()
        .await
        .expect("POST /login")
        .status()
        .as_u16()
}

#[tokio::test]
async fn forged_forwarded_for_from_an_untrusted_peer_does_not_change_the_address() {
    let node = node_with(&[("SWITCHYARD_AUTH__MAX_FAILURES", "2")]);
    let c = client();
    // Three usernames (no username reaches 2 failures), three claimed addresses: the peer,
    // 127.0.0.1, is what counts, and it has failed twice by the third attempt.
    assert_eq!(attempt_from(&c, &node, "u1", "203.0.113.1").await, 200);
    assert_eq!(attempt_from(&c, &node, "u2", "203.0.113.2").await, 200);
    assert_eq!(attempt_from(&c, &node, "u3", "203.0.113.3").await, 429);
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_is_the_throttled_address() {
    let node = node_with(&[
        ("SWITCHYARD_AUTH__MAX_FAILURES", "2"),
        ("SWITCHYARD_SERVER__TRUSTED_PROXIES", "127.0.0.1"),
    ]);
    let c = client();
    // The right-most address that is no trusted proxy: 203.0.113.7 (127.0.0.1 is a hop).
    assert_eq!(attempt_from(&c, &node, "u1", "203.0.113.7").await, 200);
    assert_eq!(
        attempt_from(&c, &node, "u2", "198.51.100.9, 203.0.113.7, 127.0.0.1").await,
        200
    );
    // Another client behind the proxy is not throttled by 203.0.113.7's failures...
    assert_eq!(attempt_from(&c, &node, "u3", "203.0.113.8").await, 200);
    // ... 203.0.113.7 is, whatever it claims to the left.
    assert_eq!(
        attempt_from(&c, &node, "u4", "192.0.2.1, 203.0.113.7").await,
        429
    );
}

/// A login POST with `Origin` and `X-Forwarded-Host` set, cookies driven by hand (the
/// `Secure` cookies of `sessions.cookie_secure` are not sent back over plain HTTP).
async fn login_post_with(node: &Node, origin: &str, forwarded_host: &str) -> u16 {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let res = http.get(node.url("/login")).send().await.expect("GET");
    let cookie = set_cookie_value(&res, "csrftoken").expect("csrftoken cookie");
    let token = csrf_token(&res.text().await.expect("body")).expect("token");
    http.post(node.url("/login"))
        .header("cookie", format!("csrftoken={cookie}"))
        .header("origin", origin)
        .header("x-forwarded-host", forwarded_host)
        .form(&[
            ("username", "alice"),
            ("password", "wrong"),
            ("csrfmiddlewaretoken", token.as_str()),
        ])
        .send()
        .await
        .expect("POST")
        .status()
        .as_u16()
}

#[tokio::test]
async fn forged_forwarded_host_does_not_pass_the_origin_check() {
    let untrusted = node_with(&[("SWITCHYARD_SESSIONS__COOKIE_SECURE", "true")]);
    let host = untrusted.base.trim_start_matches("http://").to_owned();
    assert_eq!(
        login_post_with(&untrusted, "https://evil.example", "evil.example").await,
        403,
        "X-Forwarded-Host from an untrusted peer is ignored"
    );
    // The Host header is what counts: the real origin passes (a wrong password: 200).
    assert_eq!(
        login_post_with(&untrusted, &format!("https://{host}"), "evil.example").await,
        200
    );
    // From a trusted proxy the forwarded host is the host.
    let trusted = node_with(&[
        ("SWITCHYARD_SESSIONS__COOKIE_SECURE", "true"),
        ("SWITCHYARD_SERVER__TRUSTED_PROXIES", "127.0.0.1"),
    ]);
    assert_eq!(
        login_post_with(&trusted, "https://shop.example", "shop.example").await,
        200
    );
}
