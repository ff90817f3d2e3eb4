//! The foundation end to end: the real binary on port 0, its pages, probes, metrics, errors
//! and signals.

mod common;

use std::time::{Duration, Instant};

use common::{client, marker, spawn_node, NodeOptions};
use nix::sys::signal::Signal;

fn assert_markers(html: &str) {
    assert_eq!(marker(html, "cart-count").as_deref(), Some("0"), "{html}");
    assert_eq!(marker(html, "user").as_deref(), Some("anonymous"), "{html}");
    assert!(html.contains("<ul id=\"messages\">"), "{html}");
}

#[tokio::test]
async fn index_lists_products_with_markers() {
    let node = spawn_node(NodeOptions::default());
    let res = client().get(node.url("/")).send().await.expect("GET /");
    assert_eq!(res.status(), 200);
    assert!(res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html")));
    let html = res.text().await.expect("body");
    let forms = html.matches("action=\"/cart/add/").count();
    assert!(forms >= 3, "expected >= 3 product forms, got {forms}");
    for id in 1..=3 {
        assert!(
            html.contains(&format!("action=\"/cart/add/{id}\"")),
            "{html}"
        );
    }
    assert_markers(&html);
}

#[tokio::test]
async fn probes_and_metrics() {
    let node = spawn_node(NodeOptions::default());
    let c = client();
    let res = c.get(node.url("/healthz")).send().await.expect("healthz");
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.expect("body"), "ok");

    let res = c.get(node.url("/readyz")).send().await.expect("readyz");
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.expect("json");
    assert_eq!(body["status"], "ok");
    for check in ["sessions", "broker"] {
        assert_eq!(body["checks"][check]["ok"], true, "{body}");
    }

    let res = c.get(node.url("/")).send().await.expect("GET /");
    assert_eq!(res.status(), 200);
    let _ = c.get(node.url("/no/such/page")).send().await.expect("404");
    let text = common::metrics(&c, &node).await;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("switchyard_http_requests_total{")
                && l.contains("route=\"/\"")
                && l.contains("method=\"GET\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no request counter for GET / in:\n{text}"));
    assert!(line.ends_with(" 1"), "{line}");
    assert!(text.contains("status=\"404\""), "{text}");
    assert!(
        text.contains("switchyard_http_request_duration_seconds_bucket{"),
        "{text}"
    );
    // GET / renders forms, but their CSRF secret lives in the csrftoken cookie: an anonymous
    // visitor who stores nothing costs no session write.
    let saved = common::sample(&text, r#"switchyard_sessions_saved_total{engine="memory"}"#);
    assert_eq!(saved, "0", "{text}");
}

#[tokio::test]
async fn unknown_page_is_a_404_page_with_markers() {
    let node = spawn_node(NodeOptions::default());
    let res = client()
        .get(node.url("/no/such/page"))
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), 404);
    let html = res.text().await.expect("body");
    assert!(html.contains("Page not found"), "{html}");
    assert_markers(&html);
}

/// A copy of the shipped templates with `shop/index.hbs` calling a helper that does not exist.
fn broken_templates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = common::root().join("templates");
    let mut pending = vec![src.clone()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).expect("read templates") {
            let path = entry.expect("entry").path();
            let rel = path.strip_prefix(&src).expect("prefix");
            if path.is_dir() {
                std::fs::create_dir_all(dir.path().join(rel)).expect("mkdir");
                pending.push(path);
            } else {
                std::fs::copy(&path, dir.path().join(rel)).expect("copy");
            }
        }
    }
    std::fs::write(
        dir.path().join("shop/index.hbs"),
        "{{#> layouts/base}}{{#*inline \"content\"}}{{no_such_helper products}}{{/inline}}{{/layouts/base}}",
    )
    .expect("write broken template");
    dir
}

#[tokio::test]
async fn template_error_is_a_500_with_detail_only_in_debug() {
    let templates = broken_templates();
    let dir = templates.path().display().to_string();

    let debug = spawn_node(NodeOptions {
        env: vec![("SWITCHYARD_SERVER__TEMPLATES".into(), dir.clone())],
        ..Default::default()
    });
    let res = client().get(debug.url("/")).send().await.expect("GET /");
    assert_eq!(res.status(), 500);
    let html = res.text().await.expect("body");
    assert!(
        html.contains("no_such_helper"),
        "debug page shows the detail: {html}"
    );
    assert_markers(&html);
    // A client behind a proxy is not local: even in debug it sees no internals.
    let res = client()
        .get(debug.url("/"))
        .header("X-Forwarded-For", "203.0.113.9")
        .send()
        .await
        .expect("GET /");
    assert_eq!(res.status(), 500);
    let html = res.text().await.expect("body");
    assert!(
        !html.contains("no_such_helper"),
        "not to a remote client: {html}"
    );

    let prod = spawn_node(NodeOptions {
        env: vec![
            ("SWITCHYARD_SERVER__TEMPLATES".into(), dir),
            ("SWITCHYARD_SERVER__DEBUG".into(), "false".into()),
            (
                "SWITCHYARD_SERVER__SECRET_KEY".into(),
                "0123456789abcdef0123456789abcdef-test".into(),
            ),
        ],
        ..Default::default()
    });
    let res = client().get(prod.url("/")).send().await.expect("GET /");
    assert_eq!(res.status(), 500);
    let html = res.text().await.expect("body");
    assert!(html.contains("Server error"), "{html}");
    assert!(
        !html.contains("no_such_helper"),
        "no internals without debug: {html}"
    );
    assert!(
        prod.stderr().contains("no_such_helper"),
        "the log has the detail"
    );
}

#[tokio::test]
async fn debug_templates_reload_without_restart() {
    let templates = broken_templates();
    let node = spawn_node(NodeOptions {
        env: vec![(
            "SWITCHYARD_SERVER__TEMPLATES".into(),
            templates.path().display().to_string(),
        )],
        ..Default::default()
    });
    let c = client();
    assert_eq!(
        c.get(node.url("/")).send().await.expect("GET").status(),
        500
    );
    std::fs::copy(
        common::root().join("templates/shop/index.hbs"),
        templates.path().join("shop/index.hbs"),
    )
    .expect("restore template");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = c.get(node.url("/")).send().await.expect("GET").status();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "edited template not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn sigterm_and_sigint_exit_zero_promptly() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut node = spawn_node(NodeOptions::default());
        // A keep-alive connection left open must not hold the shutdown up.
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let c = client();
        rt.block_on(async {
            assert_eq!(
                c.get(node.url("/")).send().await.expect("GET").status(),
                200
            );
        });
        let started = Instant::now();
        let status = node
            .signal_and_wait(signal, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no exit within 5 s of {signal}"));
        assert!(status.success(), "{signal}: {status:?}\n{}", node.stderr());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{signal} took {:?}",
            started.elapsed()
        );
    }
}

/// SPEC "HTTP hardening": the security headers on every page (404 included), bounded metric
/// labels for made-up methods, and debug details only for a local client.
#[tokio::test]
async fn hardening_headers_and_bounded_method_labels() {
    let node = spawn_node(NodeOptions::default());
    let c = client();
    for path in ["/", "/cart", "/no/such/page", "/login"] {
        let res = c.get(node.url(path)).send().await.expect("GET");
        let h = res.headers();
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "same-origin", "{path}");
        let csp = h["content-security-policy"].to_str().expect("ascii");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
    }
    for i in 0..25 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).expect("method");
        let res = c
            .request(method, node.url("/"))
            .send()
            .await
            .expect("request");
        assert!(res.status().is_client_error(), "{}", res.status());
    }
    let text = common::metrics(&c, &node).await;
    assert!(!text.contains("MADEUP"), "{text}");
    let other: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("switchyard_http_requests_total{") && l.contains("OTHER"))
        .collect();
    assert_eq!(
        other.len(),
        1,
        "one series for every made-up method: {other:?}"
    );
    assert!(other[0].ends_with(" 25"), "{other:?}");
}
