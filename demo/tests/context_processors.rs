//! Context processors end to end: merge order, built-ins, failures, memoisation, laziness,
//! flash messages and CSRF, on an in-process node with its own templates.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};
use switchyard::config::Config;
use switchyard::context::{ProcessError, ProcessResult, Request as RequestSnapshot};
use switchyard::messages::{self, Level};
use switchyard::{App, ContextProcessor, Render, Session};

/// A processor that counts its calls and provides fixed variables, optionally failing or slow.
struct Probe {
    name: &'static str,
    provides: &'static [&'static str],
    vars: Value,
    calls: Arc<AtomicUsize>,
    fail: bool,
    delay: Duration,
}

impl Probe {
    fn new(name: &'static str, provides: &'static [&'static str], vars: Value) -> Self {
        Self {
            name,
            provides,
            vars,
            calls: Arc::new(AtomicUsize::new(0)),
            fail: false,
            delay: Duration::ZERO,
        }
    }
}

impl ContextProcessor for Probe {
    fn name(&self) -> &str {
        self.name
    }
    fn provides(&self) -> &[&'static str] {
        self.provides
    }
    fn process(&self, _req: Arc<RequestSnapshot>) -> BoxFuture<'static, ProcessResult> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (vars, fail, delay) = (self.vars.clone(), self.fail, self.delay);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if fail {
                return Err(ProcessError::msg("probe failed on purpose"));
            }
            Ok(vars.as_object().cloned().unwrap_or_default())
        })
    }
}

struct Node {
    running: Option<switchyard::Running>,
    base: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn url(&self, p: &str) -> String {
        format!("{}{p}", self.base)
    }
    async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

/// Templates: `vars` prints named variables; `layout` and friends exercise the AST.
fn templates(dir: &std::path::Path, extra: &[(&str, &str)]) {
    let mut files = vec![
        ("show.hbs", "a={{a}} b={{b}} own={{own}}"),
        ("nothing.hbs", "static text only"),
        ("uses_counted.hbs", "counted={{counted}}"),
        ("broken_uses_counted.hbs", "{{counted}} {{no_such_helper counted}}"),
        ("error.hbs", "error page {{message}} counted={{counted}} {{#each context_errors}}[{{this}}]{{/each}}"),
        ("messages.hbs", "<ul id=\"messages\">{{#each messages}}<li class=\"{{level}}\">{{text}}</li>{{/each}}</ul>"),
        ("builtins.hbs", "{{static_url}}|{{user.username}}|{{user.is_authenticated}}|{{csrf_token}}|{{request.method}} {{request.path}} {{request.query.x}}|cookie={{request.headers.cookie}}|ua={{request.headers.user-agent}}|debug={{debug}}|{{#each sql_queries}}q{{/each}}"),
        ("form.hbs", "<form>{{csrf_input}}</form>"),
        ("errors.hbs", "ok={{ok}} bad={{bad}} slow={{slow}} {{#each context_errors}}[{{this}}]{{/each}}"),
    ];
    files.extend_from_slice(extra);
    for (name, body) in files {
        std::fs::write(dir.join(name), body).expect("write template");
    }
}

async fn start(
    configure: impl FnOnce(&mut Config),
    processors: Vec<Probe>,
    routes: fn(&mut web::ServiceConfig),
) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    templates(dir.path(), &[]);
    let mut c = Config::default();
    c.server.bind = "127.0.0.1:0".into();
    c.server.templates = dir.path().to_path_buf();
    c.actors.http_workers = 1;
    c.context.processors = vec![
        "debug".into(),
        "request".into(),
        "auth".into(),
        "messages".into(),
        "csrf".into(),
        "static".into(),
    ];
    c.context
        .processors
        .extend(processors.iter().map(|p| p.name.to_owned()));
    configure(&mut c);
    let mut app = App::new(c).routes(routes);
    for p in processors {
        app = app.context_processor(p);
    }
    let running = app.start().await.expect("start");
    Node {
        base: format!("http://{}", running.addr()),
        running: Some(running),
        _dir: dir,
    }
}

fn page_routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/show",
        web::get()
            .to(|| async { Render::new("show", json!({"own": "handler", "b": "handler-b"})) }),
    )
    .route(
        "/nothing",
        web::get().to(|| async { Render::new("nothing", json!({})) }),
    )
    .route(
        "/counted",
        web::get().to(|| async { Render::new("uses_counted", json!({})) }),
    )
    .route(
        "/broken",
        web::get().to(|| async { Render::new("broken_uses_counted", json!({})) }),
    )
    .route(
        "/builtins",
        web::get().to(|| async { Render::new("builtins", json!({})) }),
    )
    .route(
        "/form",
        web::get().to(|| async { Render::new("form", json!({})) }),
    )
    .route(
        "/errors",
        web::get().to(|| async { Render::new("errors", json!({})) }),
    )
    .route(
        "/flash",
        web::get().to(|s: Session| async move {
            messages::add(&s, Level::Success, "saved!").expect("add");
            messages::add(&s, Level::Warning, "careful").expect("add");
            HttpResponse::Ok().body("queued")
        }),
    )
    .route(
        "/messages",
        web::get().to(|| async { Render::new("messages", json!({})) }),
    )
    .route(
        "/submit",
        web::post().to(|| async {
            HttpResponse::SeeOther()
                .insert_header(("location", "/"))
                .finish()
        }),
    )
    .route(
        "/hook",
        web::post().to(|_req: HttpRequest| async { HttpResponse::Ok().body("hooked") }),
    );
}

fn client() -> reqwest::Client {
    common::client()
}

async fn body(c: &reqwest::Client, url: String) -> (u16, String) {
    let r = c.get(url).send().await.expect("GET");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[actix_rt::test]
async fn merge_order_later_wins_and_the_handler_wins_over_all() {
    let first = Probe::new(
        "first",
        &["a", "b"],
        json!({"a": "first-a", "b": "first-b"}),
    );
    let second = Probe::new("second", &["a"], json!({"a": "second-a"}));
    let node = start(|_| {}, vec![first, second], page_routes).await;
    let (s, html) = body(&client(), node.url("/show")).await;
    assert_eq!(s, 200);
    assert_eq!(html, "a=second-a b=handler-b own=handler");
    node.stop().await;
}

#[actix_rt::test]
async fn builtins_provide_their_variables_and_hide_cookies() {
    let node = start(|_| {}, vec![], page_routes).await;
    let c = client();
    // Log in through a route would need the shop; the anonymous user is enough here.
    let r = c
        .get(node.url("/builtins?x=42"))
        .header("cookie", "tracking=secret-cookie-value")
        .header("user-agent", "probe-agent")
        .send()
        .await
        .expect("GET");
    let html = r.text().await.expect("body");
    let parts: Vec<&str> = html.split('|').collect();
    assert_eq!(parts[0], "/static/");
    assert_eq!(parts[1], "", "anonymous has no username");
    assert_eq!(parts[2], "false");
    assert_eq!(parts[3].len(), 64, "a masked CSRF token: {html}");
    assert_eq!(parts[4], "GET /builtins 42");
    assert_eq!(parts[5], "cookie=", "the Cookie header is hidden: {html}");
    assert!(!html.contains("secret-cookie-value"));
    assert_eq!(parts[6], "ua=probe-agent");
    assert_eq!(
        parts[7], "debug=true",
        "debug for a local client in debug mode"
    );
    node.stop().await;

    let node = start(
        |c| {
            c.server.debug = false;
            c.server.secret_key = "0123456789abcdef0123456789abcdef-ctx".into();
        },
        vec![],
        page_routes,
    )
    .await;
    let (_, html) = body(&client(), node.url("/builtins")).await;
    assert!(
        html.contains("|debug=|"),
        "no debug variables without debug: {html}"
    );
    node.stop().await;
}

#[actix_rt::test]
async fn failing_and_slow_processors_do_not_break_the_page() {
    let ok = Probe::new("ok", &["ok"], json!({"ok": "yes"}));
    let mut bad = Probe::new("bad", &["bad"], json!({"bad": "never"}));
    bad.fail = true;
    let mut slow = Probe::new("slow", &["slow"], json!({"slow": "never"}));
    slow.delay = Duration::from_secs(3);
    let node = start(
        |c| c.context.timeout_ms = 100,
        vec![ok, bad, slow],
        page_routes,
    )
    .await;
    let started = std::time::Instant::now();
    let (s, html) = body(&client(), node.url("/errors")).await;
    assert_eq!(s, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the slow one was cut off"
    );
    assert!(html.starts_with("ok=yes bad= slow= "), "{html}");
    assert!(
        html.contains("probe failed on purpose"),
        "debug shows failures: {html}"
    );
    assert!(html.contains("timed out"), "{html}");
    node.stop().await;
}

#[actix_rt::test]
async fn a_processor_runs_at_most_once_per_request() {
    let counted = Probe::new("counted", &["counted"], json!({"counted": "c"}));
    let calls = counted.calls.clone();
    let node = start(|_| {}, vec![counted], page_routes).await;
    // The broken page renders twice (the page, then the error page); both use `counted`.
    let (s, html) = body(&client(), node.url("/broken")).await;
    assert_eq!(s, 500);
    assert!(html.contains("counted=c"), "{html}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let _ = body(&client(), node.url("/counted")).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "once more for one more request"
    );
    node.stop().await;
}

#[actix_rt::test]
async fn lazy_rendering_skips_unused_processors_and_eager_runs_all() {
    let counted = Probe::new("counted", &["counted"], json!({"counted": "c"}));
    let calls = counted.calls.clone();
    let node = start(|_| {}, vec![counted], page_routes).await;
    for _ in 0..3 {
        let (s, html) = body(&client(), node.url("/nothing")).await;
        assert_eq!((s, html.as_str()), (200, "static text only"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "never called for a page not using it"
    );
    let (_, html) = body(&client(), node.url("/counted")).await;
    assert_eq!(html, "counted=c");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    node.stop().await;

    let counted = Probe::new("counted", &["counted"], json!({"counted": "c"}));
    let calls = counted.calls.clone();
    let node = start(|c| c.context.lazy = false, vec![counted], page_routes).await;
    let _ = body(&client(), node.url("/nothing")).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "lazy = false runs every processor"
    );
    node.stop().await;
}

#[actix_rt::test]
async fn messages_are_shown_once_then_gone() {
    let node = start(|_| {}, vec![], page_routes).await;
    let c = client();
    let _ = body(&c, node.url("/flash")).await;
    let (_, html) = body(&c, node.url("/messages")).await;
    assert_eq!(
        html,
        "<ul id=\"messages\"><li class=\"success\">saved!</li><li class=\"warning\">careful</li></ul>"
    );
    let (_, html) = body(&c, node.url("/messages")).await;
    assert_eq!(html, "<ul id=\"messages\"></ul>");
    node.stop().await;
}

fn token_of(html: &str) -> String {
    common::csrf_token(html).expect("a csrf_input in the form")
}

#[actix_rt::test]
async fn csrf_rejects_missing_and_wrong_tokens_and_accepts_field_and_header() {
    let node = start(|_| {}, vec![], page_routes).await;
    let c = client();
    let (_, form) = body(&c, node.url("/form")).await;
    let token = token_of(&form);

    let r = c
        .post(node.url("/submit"))
        .form(&[("x", "1")])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403, "no token");
    assert!(r.text().await.expect("body").contains("CSRF"));
    let r = c
        .post(node.url("/submit"))
        .form(&[("csrfmiddlewaretoken", "wrong")])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403, "wrong token");
    let r = c
        .post(node.url("/submit"))
        .form(&[("csrfmiddlewaretoken", token.as_str())])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 303, "valid field");
    let r = c
        .post(node.url("/submit"))
        .header("X-CSRFToken", &token)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 303, "valid header");
    // Another session's token is no good here.
    let other = client();
    let r = other
        .post(node.url("/submit"))
        .form(&[("csrfmiddlewaretoken", token.as_str())])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403);
    node.stop().await;
}

fn exempt_routes(cfg: &mut web::ServiceConfig) {
    page_routes(cfg);
}

#[actix_rt::test]
async fn an_exempt_route_needs_no_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    templates(dir.path(), &[]);
    let mut c = Config::default();
    c.server.bind = "127.0.0.1:0".into();
    c.server.templates = dir.path().to_path_buf();
    let running = App::new(c)
        .routes(exempt_routes)
        .csrf_exempt("/hook")
        .start()
        .await
        .expect("start");
    let base = format!("http://{}", running.addr());
    let http = client();
    let r = http
        .post(format!("{base}/hook"))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{base}/submit"))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403, "others still need one");
    running.stop().await;
}

#[actix_rt::test]
async fn secure_cookies_check_origin_and_referer() {
    let node = start(|c| c.sessions.cookie_secure = true, vec![], page_routes).await;
    // Cookies marked Secure are not sent back over plain HTTP by a browser, so drive the
    // cookie by hand as a TLS-terminating proxy would pass it.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = http.get(node.url("/form")).send().await.expect("GET");
    let cookie = common::set_cookie_value(&r, "csrftoken").expect("cookie");
    let token = token_of(&r.text().await.expect("body"));
    let host = node.base.trim_start_matches("http://").to_owned();
    let post = |origin: Option<String>, referer: Option<String>| {
        let mut b = http
            .post(node.url("/submit"))
            .header("cookie", format!("csrftoken={cookie}"))
            .header("X-CSRFToken", &token);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        if let Some(r) = referer {
            b = b.header("referer", r);
        }
        b.send()
    };
    let r = post(Some("https://evil.example".into()), None)
        .await
        .expect("POST");
    assert_eq!(r.status(), 403);
    let r = post(None, None).await.expect("POST");
    assert_eq!(r.status(), 403, "no Origin and no Referer over HTTPS");
    let r = post(None, Some(format!("https://{host}/form")))
        .await
        .expect("POST");
    assert_eq!(r.status(), 303);
    let r = post(Some(format!("https://{host}")), None)
        .await
        .expect("POST");
    assert_eq!(r.status(), 303);
    node.stop().await;
}

/// A processor that asks Postgres, through the project's counted pool.
struct Orders {
    db: Arc<switchyard::db::Db>,
    calls: Arc<AtomicUsize>,
}

impl ContextProcessor for Orders {
    fn name(&self) -> &str {
        "orders"
    }
    fn provides(&self) -> &[&'static str] {
        &["order_total"]
    }
    fn process(&self, _req: Arc<RequestSnapshot>) -> BoxFuture<'static, ProcessResult> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let db = self.db.clone();
        Box::pin(async move {
            let rows = db
                .query(None, "SELECT 41 + 1 AS total", &[])
                .await
                .map_err(|e| ProcessError::with_source("orders query", e))?;
            let total: i32 = rows.first().map(|r| r.get("total")).unwrap_or(0);
            Ok(Map::from_iter([("order_total".to_owned(), json!(total))]))
        })
    }
}

fn db_routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/nothing",
        web::get().to(|| async { Render::new("nothing", json!({})) }),
    )
    .route(
        "/orders",
        web::get().to(|| async { Render::new("orders", json!({})) }),
    )
    .route(
        "/handler-query",
        web::get().to(
            |req: HttpRequest, db: web::Data<Arc<switchyard::db::Db>>| async move {
                let log = switchyard::db::QueryLog::of(&req);
                db.query(Some(&log), "SELECT 'from the handler' AS x", &[])
                    .await
                    .map_err(|e| switchyard::Error::Internal(e.to_string()))?;
                Ok::<_, switchyard::Error>(Render::new("queries", json!({})))
            },
        ),
    );
}

#[actix_rt::test]
async fn lazy_rendering_costs_an_unused_processor_no_query() {
    if !common::service_available("postgres") {
        return;
    }
    let mut pg = Config::default().postgres;
    pg.url = common::service_url("postgres").into();
    pg.pool_size = 2;
    let db = switchyard::db::Db::connect(&pg).await.expect("postgres");
    let calls = Arc::new(AtomicUsize::new(0));
    let dir = tempfile::tempdir().expect("tempdir");
    templates(
        dir.path(),
        &[
            ("orders.hbs", "total={{order_total}}"),
            ("queries.hbs", "{{#each sql_queries}}[{{sql}}]{{/each}}"),
        ],
    );
    let mut c = Config::default();
    c.server.bind = "127.0.0.1:0".into();
    c.server.templates = dir.path().to_path_buf();
    c.context.processors = vec!["debug".into(), "orders".into()];
    let data = web::Data::new(db.clone());
    let running = App::new(c)
        .routes(move |cfg| {
            cfg.app_data(data.clone());
            db_routes(cfg);
        })
        .context_processor(Orders {
            db: db.clone(),
            calls: calls.clone(),
        })
        .start()
        .await
        .expect("start");
    let base = format!("http://{}", running.addr());
    let http = client();
    for _ in 0..3 {
        let (s, html) = body(&http, format!("{base}/nothing")).await;
        assert_eq!((s, html.as_str()), (200, "static text only"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the processor never ran");
    assert_eq!(db.queries_total(), 0, "and Postgres saw no query");

    let (_, html) = body(&http, format!("{base}/orders")).await;
    assert_eq!(html, "total=42");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(db.queries_total(), 1);

    // The debug processor lists what the request ran through the pool.
    let (_, html) = body(&http, format!("{base}/handler-query")).await;
    assert_eq!(html, "[SELECT &#x27;from the handler&#x27; AS x]");
    running.stop().await;
}
