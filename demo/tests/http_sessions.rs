//! Sessions and login through the demo, as a browser would use them.

mod common;

use common::{
    client, get_page, login, marker, post_form, set_cookie_value, spawn_node, NodeOptions,
};

#[tokio::test]
async fn anonymous_cart_survives_login_and_the_key_rotates() {
    let node = spawn_node(NodeOptions::default());
    let c = client();
    let res = post_form(&c, &node, "/", "/cart/add/1", &[]).await;
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/cart");
    let anon_id = set_cookie_value(&res, "sessionid").expect("cookie");
    post_form(&c, &node, "/", "/cart/add/2", &[]).await;
    let (_, cart) = get_page(&c, &node.url("/cart")).await;
    assert_eq!(marker(&cart, "cart-count").as_deref(), Some("2"));
    assert_eq!(marker(&cart, "user").as_deref(), Some("anonymous"));

    let res = post_form(
        &c,
        &node,
        "/login",
        "/login",
        &[
            ("username", "alice"),
            ("password", "wonderland"),
            ("next", "/cart"),
        ],
    )
    .await;
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/cart");
    let user_id = set_cookie_value(&res, "sessionid").expect("login sets a new cookie");
    assert_ne!(user_id, anon_id, "the session key changes at login");

    let (_, cart) = get_page(&c, &node.url("/cart")).await;
    assert_eq!(
        marker(&cart, "cart-count").as_deref(),
        Some("2"),
        "cart survived"
    );
    assert_eq!(marker(&cart, "user").as_deref(), Some("alice"));

    // The anonymous id loads nothing any more.
    let fresh = reqwest::Client::new();
    let html = fresh
        .get(node.url("/cart"))
        .header("cookie", format!("sessionid={anon_id}"))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert_eq!(marker(&html, "cart-count").as_deref(), Some("0"));
    assert_eq!(marker(&html, "user").as_deref(), Some("anonymous"));
}

#[tokio::test]
async fn wrong_password_does_not_log_in() {
    let node = spawn_node(NodeOptions::default());
    let c = client();
    let res = post_form(
        &c,
        &node,
        "/login",
        "/login",
        &[("username", "alice"), ("password", "nope")],
    )
    .await;
    assert_eq!(res.status(), 200);
    let html = res.text().await.expect("body");
    assert!(html.contains("<li class=\"error\">"), "{html}");
    assert_eq!(marker(&html, "user").as_deref(), Some("anonymous"));
    let (_, html) = get_page(&c, &node.url("/")).await;
    assert_eq!(marker(&html, "user").as_deref(), Some("anonymous"));
    // Unknown users fail the same way.
    let res = post_form(
        &c,
        &node,
        "/login",
        "/login",
        &[("username", "mallory"), ("password", "x")],
    )
    .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn next_to_another_host_is_refused() {
    let node = spawn_node(NodeOptions::default());
    for next in [
        "https://evil.example/",
        "//evil.example/x",
        "/\\evil.example",
    ] {
        let c = client();
        let res = post_form(
            &c,
            &node,
            "/login",
            "/login",
            &[
                ("username", "alice"),
                ("password", "wonderland"),
                ("next", next),
            ],
        )
        .await;
        assert_eq!(res.status(), 303);
        assert_eq!(
            res.headers()["location"],
            "/",
            "next {next:?} must not be followed"
        );
    }
}

#[tokio::test]
async fn logout_flushes_and_unknown_product_is_404() {
    let node = spawn_node(NodeOptions::default());
    let c = client();
    post_form(&c, &node, "/", "/cart/add/3", &[]).await;
    login(&c, &node, "alice", "wonderland").await;
    let res = post_form(&c, &node, "/", "/logout", &[]).await;
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/");
    let (_, html) = get_page(&c, &node.url("/")).await;
    assert_eq!(marker(&html, "user").as_deref(), Some("anonymous"));
    assert_eq!(marker(&html, "cart-count").as_deref(), Some("0"));
    let res = post_form(&c, &node, "/", "/cart/add/999", &[]).await;
    assert_eq!(res.status(), 404);
    let res = post_form(&c, &node, "/", "/cart/add/abc", &[]).await;
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn file_engine_keeps_sessions_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = vec![
        ("SWITCHYARD_SESSIONS__ENGINE".to_owned(), "file".to_owned()),
        (
            "SWITCHYARD_FILE__DIR".to_owned(),
            dir.path().join("sessions").display().to_string(),
        ),
    ];
    let c = client();
    {
        let node = spawn_node(NodeOptions {
            env: env.clone(),
            ..Default::default()
        });
        post_form(&c, &node, "/", "/cart/add/1", &[]).await;
        post_form(&c, &node, "/", "/cart/add/1", &[]).await;
        login(&c, &node, "alice", "wonderland").await;
    }
    let node = spawn_node(NodeOptions {
        env,
        ..Default::default()
    });
    // The cookie jar holds 127.0.0.1 cookies regardless of port.
    let (_, html) = get_page(&c, &node.url("/cart")).await;
    assert_eq!(marker(&html, "cart-count").as_deref(), Some("2"), "{html}");
    assert_eq!(marker(&html, "user").as_deref(), Some("alice"));
}

/// SPEC's CSRF paragraph: the secret lives in the `csrftoken` cookie, forms carry it masked
/// afresh, and an anonymous visitor who stores nothing gets no session.
#[tokio::test]
async fn csrf_lives_in_its_cookie_and_anonymous_views_store_nothing() {
    let node = spawn_node(NodeOptions::default());
    let c = client();
    let res = c.get(node.url("/")).send().await.expect("GET /");
    assert_eq!(res.status(), 200);
    assert_eq!(
        set_cookie_value(&res, "sessionid"),
        None,
        "no session for a visitor"
    );
    let secret = set_cookie_value(&res, "csrftoken").expect("a csrftoken cookie");
    assert_eq!(secret.len(), 32);
    let set_cookie: Vec<String> = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let csrf_cookie = set_cookie
        .iter()
        .find(|v| v.starts_with("csrftoken="))
        .expect("cookie");
    assert!(
        !csrf_cookie.contains("HttpOnly"),
        "readable by scripts: {csrf_cookie}"
    );
    assert!(csrf_cookie.contains("SameSite=Lax"), "{csrf_cookie}");
    let first = common::csrf_token(&res.text().await.expect("body")).expect("a form token");
    let (_, page) = get_page(&c, &node.url("/cart")).await;
    let second = common::csrf_token(&page).expect("a form token");
    assert_ne!(first, second, "masked afresh on every page");
    for _ in 0..20 {
        let (status, _) = get_page(&c, &node.url("/")).await;
        assert_eq!(status, 200);
    }

    // Both values are accepted; a forged one is 403.
    for token in [&first, &second] {
        let res = c
            .post(node.url("/cart/add/1"))
            .form(&[("csrfmiddlewaretoken", token.as_str())])
            .send()
            .await
            .expect("POST");
        assert_eq!(res.status(), 303, "token {token}");
    }
    let forged = format!("{}{}", &first[..32], &second[32..]);
    let res = c
        .post(node.url("/cart/add/1"))
        .form(&[("csrfmiddlewaretoken", forged.as_str())])
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 403);
    let (_, cart) = get_page(&c, &node.url("/cart")).await;
    assert_eq!(marker(&cart, "cart-count").as_deref(), Some("2"));

    // Three writes: the two cart additions and the cart page that showed (and so consumed)
    // their flash messages. The 22 anonymous page views before them wrote nothing.
    let metrics = common::metrics(&c, &node).await;
    let saved = common::sample(
        &metrics,
        r#"switchyard_sessions_saved_total{engine="memory"}"#,
    );
    assert_eq!(saved, "3", "{metrics}");

    // Login rotates the secret.
    let res = post_form(
        &c,
        &node,
        "/login",
        "/login",
        &[("username", "alice"), ("password", "wonderland")],
    )
    .await;
    assert_eq!(res.status(), 303);
    let rotated = set_cookie_value(&res, "csrftoken").expect("a new secret at login");
    assert_ne!(rotated, secret);
}
