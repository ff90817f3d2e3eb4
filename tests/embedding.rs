//! `docs/embedding.md` is a tested application: its titled fenced blocks are extracted into an
//! empty folder (the `switchyard` dependency pointed at this checkout), built offline with the
//! workspace's `Cargo.lock` and target directory, and run as SPEC.md says: `serve` answers
//! `/hello/Ada`; on NATS, `worker` + `publish hello.greet '{"name":"Ada"}' --wait` succeeds with
//! `"Hello, Ada!"`, and the demo's `demo.*` tasks are unknown to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The workspace root (this package's directory).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `(path, contents)` of every fenced block whose info string has `title=PATH`.
fn titled_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let title = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("title="));
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        if let Some(t) = title {
            out.push((t.to_owned(), body));
        }
    }
    out
}

/// Writes the doc's application into `dir`, its `switchyard` dependency pointed at this
/// checkout and the workspace's lock file beside it.
fn write_app(dir: &Path) {
    let doc = std::fs::read_to_string(root().join("docs/embedding.md")).expect("read the doc");
    let blocks = titled_blocks(&doc);
    let names: Vec<&str> = blocks.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        ["Cargo.toml", "src/main.rs", "templates/hello.hbs"],
        "the doc's titled blocks"
    );
    for (path, body) in blocks {
        let body = if path == "Cargo.toml" {
            let dep = "switchyard = { path = \"../switchyard\" }";
            assert!(body.contains(dep), "Cargo.toml names the checkout: {body}");
            body.replace(
                dep,
                &format!("switchyard = {{ path = {:?} }}", root().display()),
            )
        } else {
            body
        };
        let file = dir.join(&path);
        std::fs::create_dir_all(file.parent().expect("a parent")).expect("mkdir");
        std::fs::write(file, body).expect("write a block");
    }
    std::fs::copy(root().join("Cargo.lock"), dir.join("Cargo.lock")).expect("copy Cargo.lock");
}

/// Builds the application offline into the workspace's target directory; returns its binary.
fn build(dir: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--offline", "--quiet"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "the doc's application does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("debug").join("hello")
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hello` with `args` in `dir`, with a clean configuration environment plus `env`.
fn command(bin: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHYARD_") && k.contains("__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// `serve` on port 0; returns the process and its address.
fn serve(bin: &Path, dir: &Path) -> (Proc, String) {
    let mut child = command(bin, dir, &["serve", "--bind", "127.0.0.1:0"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on http://") {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("serve prints its address");
    (proc, addr)
}

/// A plain HTTP/1.0 GET; returns the whole response.
fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Whether NATS answers; with `SWITCHYARD_REQUIRE_SERVICES=1` its absence fails the test.
fn nats_url() -> Option<String> {
    let url = std::env::var("SWITCHYARD_NATS__URL").unwrap_or("nats://127.0.0.1:4222".into());
    let hostport = url.trim_start_matches("nats://").to_owned();
    if TcpStream::connect(&hostport).is_ok() {
        return Some(url);
    }
    assert!(
        std::env::var("SWITCHYARD_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "NATS not reachable at {url}"
    );
    println!("SKIPPED: nats not reachable at {url}");
    None
}

fn stdout_json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "not one JSON line ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn the_embedding_doc_builds_and_runs_as_spec_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_app(dir.path());
    let bin = build(dir.path());

    // serve on the embedded defaults answers /hello/Ada.
    let (node, addr) = serve(&bin, dir.path());
    let page = get(&addr, "/hello/Ada");
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    assert!(page.contains("Hello, Ada!"), "{page}");
    assert!(get(&addr, "/").starts_with("HTTP/1.0 404"));
    drop(node);

    let Some(nats) = nats_url() else {
        return;
    };
    // A worker on NATS under a prefix of its own; publish --wait prints the SUCCESS record.
    let prefix = format!("embed{}", std::process::id());
    let env = [
        ("SWITCHYARD_TASKS__BROKER", "nats"),
        ("SWITCHYARD_NATS__URL", nats.as_str()),
        ("SWITCHYARD_NATS__PREFIX", prefix.as_str()),
    ];
    let _worker = Proc(
        command(&bin, dir.path(), &["worker"], &env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn worker"),
    );
    let publish = |task: &str, args: &str| {
        command(
            &bin,
            dir.path(),
            &["publish", task, args, "--wait", "30"],
            &env,
        )
        .output()
        .expect("run publish")
    };
    let out = publish("hello.greet", r#"{"name":"Ada"}"#);
    let rec = stdout_json(&out);
    assert!(out.status.success(), "{rec}");
    assert_eq!(rec["state"], "SUCCESS", "{rec}");
    assert_eq!(rec["result"], "Hello, Ada!", "{rec}");

    // The demo's tasks are not part of the library.
    let out = publish("demo.add", r#"{"x":1,"y":2}"#);
    let rec = stdout_json(&out);
    assert_eq!(out.status.code(), Some(1), "{rec}");
    assert_eq!(rec["state"], "FAILURE", "{rec}");
    assert!(
        rec["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("unknown_task")),
        "{rec}"
    );
}
