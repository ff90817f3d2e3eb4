//! The dashboard and the order page in a real browser: headless Chromium (Debian's `chromium`
//! and `chromium-driver`) driven over WebDriver by `fantoccini`, against a NATS deployment
//! (`serve` + `switchyard worker` processes, the CLI publishing) and a memory-broker node.
//! Skipped (`SKIPPED: …`) when chromium, chromedriver or NATS are missing, failed instead under
//! `SWITCHYARD_REQUIRE_SERVICES=1`. With `SWITCHYARD_SCREENSHOTS=1` the screenshots of
//! `docs/dashboard.md` are written to `docs/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether the browser is installed; like `common::service_available` for services.
fn browser_available() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("SWITCHYARD_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("{missing:?} missing (SWITCHYARD_REQUIRE_SERVICES=1; apt-get install chromium chromium-driver)");
    }
    println!("SKIPPED: {missing:?} missing (apt-get install chromium chromium-driver)");
    false
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// chromedriver on a private port and a headless Chromium session.
async fn browser() -> (Proc, Client, tempfile::TempDir) {
    let port = common::free_port();
    let driver = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromedriver");
    let driver = Proc(driver);
    assert!(
        common::wait_port(port, true, WAIT),
        "chromedriver did not listen on {port}"
    );
    let profile = tempfile::tempdir().expect("tempdir");
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display())],
        }
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session");
    (driver, client, profile)
}

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

async fn text_of(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the text of `css` is `want`; panics with the page after `within`.
async fn until_text(c: &Client, css: &str, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if text_of(c, css).await == want {
            return;
        }
        if Instant::now() >= deadline {
            let src = c.source().await.unwrap_or_default();
            panic!("{css} never became {want:?} within {within:?}:\n{src}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Marks the page; [`same_page`] tells whether it was reloaded since.
async fn mark(c: &Client) {
    c.execute("window.__switchyard_mark = 42; return 1;", vec![])
        .await
        .expect("mark");
}

async fn same_page(c: &Client) -> bool {
    c.execute("return window.__switchyard_mark === 42;", vec![])
        .await
        .ok()
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

async fn login(c: &Client, base: &str, user: &str, password: &str, next: &str) {
    c.goto(&format!("{base}/login?next={next}"))
        .await
        .expect("login page");
    let form = c
        .form(Locator::Css("form[action='/login']"))
        .await
        .expect("login form");
    form.set_by_name("username", user).await.expect("username");
    form.set_by_name("password", password)
        .await
        .expect("password");
    form.submit().await.expect("submit");
    until_text(c, "#user", user, WAIT).await;
}

async fn logout(c: &Client, base: &str) {
    c.delete_all_cookies().await.expect("cookies");
    c.goto(&format!("{base}/")).await.expect("home");
}

fn screenshot_path(name: &str, tmp: &Path) -> PathBuf {
    match std::env::var("SWITCHYARD_SCREENSHOTS").as_deref() {
        Ok("1") => common::root().join("docs").join(name),
        _ => tmp.join(name),
    }
}

async fn screenshot(c: &Client, name: &str, tmp: &Path) {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(screenshot_path(name, tmp), png).expect("write screenshot");
}

/// POSTs from the page with fetch and no CSRF token; the status.
async fn post_without_csrf(c: &Client, url: &str) -> u64 {
    c.execute(
        "return fetch(arguments[0], {method: 'POST', credentials: 'same-origin', \
         body: new URLSearchParams({x: '1'})}).then(r => r.status);",
        vec![Value::from(url)],
    )
    .await
    .expect("fetch")
    .as_u64()
    .unwrap_or(0)
}

/// Checks out one product; the order page's path.
async fn place_order(c: &Client, base: &str) -> String {
    c.goto(&format!("{base}/")).await.expect("home");
    c.find(Locator::Css("form[action='/cart/add/1'] button"))
        .await
        .expect("add button")
        .click()
        .await
        .expect("add");
    // The cart page, once the add's redirect has loaded (a click does not wait for it).
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("form[action='/orders'] button"))
        .await
        .expect("checkout button")
        .click()
        .await
        .expect("checkout");
    let deadline = Instant::now() + WAIT;
    loop {
        let url = c.current_url().await.expect("url");
        if url.path().starts_with("/orders/") {
            return url.path().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "checkout never reached an order page: {url}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Nats {
    prefix: String,
    url: String,
}

impl Nats {
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SWITCHYARD_TASKS__BROKER".into(), "nats".into()),
            ("SWITCHYARD_NATS__PREFIX".into(), self.prefix.clone()),
            ("SWITCHYARD_NATS__URL".into(), self.url.clone()),
            ("SWITCHYARD_CLUSTER__HEARTBEAT_INTERVAL".into(), "1".into()),
            (
                "SWITCHYARD_POSTGRES__URL".into(),
                common::service_url("postgres"),
            ),
        ]
    }

    fn worker(&self, node: &str, queues: &str, mail: &Path) -> Proc {
        let mut cmd = Command::new(common::binary());
        cmd.args(["worker", "--node-id", node, "--queues", queues])
            .current_dir(common::root())
            .env("SWITCHYARD_MAIL__DIR", mail)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        Proc(cmd.spawn().expect("spawn worker"))
    }

    fn cli(&self, args: &[&str]) -> String {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, out, err) = common::run_cli(args, &env, None);
        assert_eq!(code, 0, "switchyard {args:?}: {err}");
        let v: Value = serde_json::from_str(out.lines().next().unwrap_or("{}")).unwrap_or_default();
        v["id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| out.trim().to_owned())
    }

    async fn cleanup(&self) {
        let up = self.prefix.to_uppercase();
        for stream in ["TASKS", "DEAD", "SCHEDULED"] {
            common::delete_stream(&self.url, &format!("{up}_{stream}")).await;
        }
        for bucket in ["results", "unique", "beat", "scheduler", "login"] {
            common::delete_stream(&self.url, &format!("KV_{}_{bucket}", self.prefix)).await;
        }
    }
}

#[tokio::test]
async fn the_dashboard_and_the_order_page_in_a_browser() {
    if !browser_available()
        || !common::service_available("nats")
        || !common::service_available("postgres")
    {
        return;
    }
    let shots = tempfile::tempdir().expect("tempdir");
    let mail = tempfile::tempdir().expect("tempdir");
    let nats = Nats {
        prefix: common::unique_name("sybrowser"),
        url: common::service_url("nats"),
    };
    // Only the default queue is served at first: the order's e-mail waits until a worker for
    // `emails` starts, so that the order page sees it change.
    let _default_worker = nats.worker("browser-default", "default", mail.path());
    let mut env = nats.env();
    env.push((
        "SWITCHYARD_MAIL__DIR".into(),
        mail.path().display().to_string(),
    ));
    let node = common::spawn_node(common::NodeOptions {
        config: Some(config_with_bob()),
        env,
        ..Default::default()
    });
    let base = node.url("");
    let base = base.trim_end_matches('/').to_owned();
    let (_driver, c, _profile) = browser().await;

    // A user who is not staff: 403.
    login(&c, &base, "bob", "builder", "/").await;
    c.goto(&format!("{base}/_switchyard/"))
        .await
        .expect("dashboard");
    let page = c.source().await.expect("source");
    assert!(
        page.contains("staff users only"),
        "bob sees the 403 page:\n{page}"
    );
    logout(&c, &base).await;

    // Staff: the overview goes live; a task published from the CLI appears without a reload
    // within 2 s and flips to SUCCESS.
    login(&c, &base, "alice", "wonderland", "/_switchyard/").await;
    until_text(&c, "#live-status", "live", WAIT).await;
    let page = c.source().await.expect("source");
    assert!(page.contains("data-queue=\"default\"") && page.contains("data-queue=\"emails\""));
    mark(&c).await;
    let id = nats.cli(&["publish", "demo.sleep", r#"{"seconds": 1}"#]);
    let row = format!("tr[data-task-id='{id}'] td.state");
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(2);
    while c.find(Locator::Css(&row)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the row of {id} did not appear within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!(
        "row of {id} appeared {:?} after the CLI returned",
        t0.elapsed()
    );
    until_text(&c, &row, "SUCCESS", WAIT).await;
    assert!(same_page(&c).await, "no reload");

    // A task page follows progress live.
    let count = nats.cli(&["publish", "demo.count", r#"{"to": 20}"#]);
    c.goto(&format!("{base}/_switchyard/tasks/{count}"))
        .await
        .expect("task page");
    until_text(&c, "#live-status", "live", WAIT).await;
    mark(&c).await;
    until_text(&c, "#task-state", "SUCCESS", WAIT).await;
    until_text(&c, "#task-progress-text", "20/20", WAIT).await;
    assert!(same_page(&c).await, "no reload");
    // Reloaded, the page shows the final record (result, finish time).
    c.refresh().await.expect("reload");
    until_text(&c, "#task-result", "20", WAIT).await;
    screenshot(&c, "dashboard-task.png", shots.path()).await;

    // A POST without a CSRF token: 403.
    let status = post_without_csrf(&c, &format!("{base}/_switchyard/tasks/{count}/revoke")).await;
    assert_eq!(status, 403);

    // A dead letter (a message naming no task), replayed from the browser.
    let client = async_nats::connect(&nats.url).await.expect("nats");
    let dead_id = common::unique_name("deadletter");
    let payload = json!({"id": dead_id, "task": "nope.missing", "args": {}});
    client
        .publish(
            format!("{}.tasks.default", nats.prefix),
            serde_json::to_vec(&payload).expect("json").into(),
        )
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    let deadline = Instant::now() + WAIT;
    loop {
        c.goto(&format!("{base}/_switchyard/dead"))
            .await
            .expect("dead page");
        if c.source().await.expect("source").contains(&dead_id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dead_id} was never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.find(Locator::Css("#dead-letters button.replay"))
        .await
        .expect("replay button")
        .click()
        .await
        .expect("replay");
    until_text(
        &c,
        "#messages li.success",
        "1 dead letter(s) replayed.",
        WAIT,
    )
    .await;

    // The order page: #task-state changes live when the e-mail is sent.
    let order = place_order(&c, &base).await;
    until_text(&c, "#task-state", "PENDING", WAIT).await;
    mark(&c).await;
    let _emails_worker = nats.worker("browser-emails", "emails", mail.path());
    until_text(&c, "#task-state", "SUCCESS", WAIT).await;
    assert!(same_page(&c).await, "the order page was not reloaded");
    screenshot(&c, "dashboard-order.png", shots.path()).await;
    println!("order {order} went live to SUCCESS");

    // The overview with all of it.
    c.goto(&format!("{base}/_switchyard/"))
        .await
        .expect("overview");
    until_text(&c, "#live-status", "live", WAIT).await;
    screenshot(&c, "dashboard-overview.png", shots.path()).await;

    c.close().await.expect("close the browser");
    nats.cleanup().await;
}

#[tokio::test]
async fn the_dashboard_in_a_browser_on_the_memory_broker() {
    if !browser_available() {
        return;
    }
    let mail = tempfile::tempdir().expect("tempdir");
    let node = common::spawn_node(common::NodeOptions {
        config: Some(config_with_bob()),
        env: vec![(
            "SWITCHYARD_MAIL__DIR".into(),
            mail.path().display().to_string(),
        )],
        ..Default::default()
    });
    let base = node.url("");
    let base = base.trim_end_matches('/').to_owned();
    let (_driver, c, _profile) = browser().await;
    login(&c, &base, "alice", "wonderland", "/_switchyard/").await;
    until_text(&c, "#live-status", "live", WAIT).await;
    // The order's e-mail task runs in-process: with the overview open, the order is placed
    // with fetch (same session) and its row appears and reaches SUCCESS live.
    mark(&c).await;
    let order: String = c
        .execute(
            "const token = () => fetch('/cart').then(r => r.text())\
               .then(h => h.match(/name=\"csrfmiddlewaretoken\" value=\"([^\"]+)\"/)[1]);\
             const post = (url) => token().then(t => fetch(url, {method: 'POST',\
               body: new URLSearchParams({csrfmiddlewaretoken: t})}));\
             return post('/cart/add/2').then(() => post('/orders')).then(r => r.url);",
            vec![],
        )
        .await
        .expect("checkout")
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(order.contains("/orders/"), "checkout ended at {order}");
    let row = "#task-table tbody tr td.state";
    until_text(&c, row, "SUCCESS", WAIT).await;
    assert!(same_page(&c).await, "no reload");
    c.goto(&order).await.expect("order page");
    until_text(&c, "#task-state", "SUCCESS", WAIT).await;
    c.close().await.expect("close the browser");
}
