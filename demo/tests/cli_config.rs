//! The CLI against bad configuration: exit 2 with a message naming the file, line and key, or
//! the environment variable; `config check` output; commands that need NATS under `memory`.

mod common;

use common::{run_cli, write_config};

/// Runs `switchyard serve` on a config file; returns (exit code, stderr).
fn serve_with(contents: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let (_dir, path) = write_config(contents);
    let path = path.display().to_string();
    let (code, _out, err) = run_cli(
        &["serve", "--config", &path, "--bind", "127.0.0.1:0"],
        env,
        None,
    );
    (code, err, path)
}

fn assert_usage_error(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 2, "exit code; stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr should mention {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn toml_syntax_error_names_file_and_line() {
    let (code, err, path) = serve_with("[server]\nbind = \"127.0.0.1:0\"\ndebug = tru e\n", &[]);
    assert_usage_error(code, &err, &[&path, ":3"]);
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let (code, err, path) = serve_with(
        "[server]\ndebug = true\n\n[sessions]\nengin = \"memory\"\n",
        &[],
    );
    assert_usage_error(code, &err, &[&path, ":5", "sessions.engin"]);
}

#[test]
fn wrong_type_names_file_line_and_key() {
    let (code, err, path) = serve_with("[actors]\nhttp_workers = \"two\"\n", &[]);
    assert_usage_error(code, &err, &[&path, ":2", "actors.http_workers"]);
}

#[test]
fn out_of_range_names_file_line_and_key() {
    let (code, err, path) = serve_with("[actors]\n\nsession_shards = 0\n", &[]);
    assert_usage_error(code, &err, &[&path, ":3", "actors.session_shards"]);
}

#[test]
fn weak_secret_without_debug_is_refused() {
    let (code, err, path) = serve_with("[server]\ndebug = false\nsecret_key = \"short\"\n", &[]);
    assert_usage_error(code, &err, &[&path, ":3", "server.secret_key"]);
}

#[test]
fn same_site_none_requires_secure() {
    let (code, err, path) = serve_with("[sessions]\ncookie_same_site = \"none\"\n", &[]);
    assert_usage_error(code, &err, &[&path, ":2", "sessions.cookie_same_site"]);
}

#[test]
fn encryption_without_a_secret_is_refused() {
    let (code, err, path) = serve_with("[sessions]\nengine = \"file\"\nencrypt = true\n", &[]);
    assert_usage_error(code, &err, &[&path, ":3", "sessions.encrypt"]);
}

#[test]
fn unknown_environment_variable_is_named() {
    let (code, err, _) = serve_with("", &[("SWITCHYARD_SERVER__NO_SUCH_KEY", "1")]);
    assert_usage_error(code, &err, &["SWITCHYARD_SERVER__NO_SUCH_KEY"]);
    let (code, err, _) = serve_with("", &[("SWITCHYARD_NOSECTION__X", "1")]);
    assert_usage_error(code, &err, &["SWITCHYARD_NOSECTION__X"]);
}

#[test]
fn bad_environment_value_is_named() {
    let (code, err, _) = serve_with("", &[("SWITCHYARD_SERVER__DEBUG", "maybe")]);
    assert_usage_error(code, &err, &["SWITCHYARD_SERVER__DEBUG"]);
}

#[test]
fn bad_bind_flag_is_a_usage_error() {
    let (code, _out, err) = run_cli(&["serve", "--bind", "nope"], &[], None);
    assert_usage_error(code, &err, &["--bind"]);
}

#[test]
fn missing_config_file_is_named() {
    let (code, _out, err) = run_cli(&["config", "check", "/no/such/switchyard.toml"], &[], None);
    assert_usage_error(code, &err, &["/no/such/switchyard.toml"]);
}

#[test]
fn config_check_prints_effective_toml_with_secrets_redacted() {
    let (_dir, path) = write_config(
        "[server]\ndebug = false\nsecret_key = \"0123456789abcdef0123456789abcdef-s3cret\"\n",
    );
    let path = path.display().to_string();
    let (code, out, err) = run_cli(
        &["config", "check", &path],
        &[("SWITCHYARD_SERVER__BIND", "127.0.0.1:9999")],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let parsed: toml::Value = toml::from_str(&out).expect("stdout is TOML");
    assert_eq!(parsed["server"]["bind"].as_str(), Some("127.0.0.1:9999"));
    assert_eq!(parsed["server"]["debug"].as_bool(), Some(false));
    assert_eq!(parsed["server"]["secret_key"].as_str(), Some("<redacted>"));
    assert!(!out.contains("s3cret"), "{out}");
    assert!(err.is_empty() || !err.contains("error"), "{err}");
}

#[test]
fn nats_only_commands_exit_2_under_the_memory_broker() {
    for args in [
        &["publish", "demo.add", "{\"x\":2,\"y\":3}"][..],
        &["result", "0192f7c4-7c1e-7a51-8f0e-3b7d2a9c4e11"],
        &["revoke", "0192f7c4-7c1e-7a51-8f0e-3b7d2a9c4e11"],
        &["purge", "default"],
        &["dead", "list"],
        &["worker"],
    ] {
        let (code, out, err) = run_cli(args, &[], None);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: stdout must stay empty: {out}");
        assert!(err.contains("tasks.broker = \"nats\""), "{args:?}: {err}");
    }
}

#[test]
fn session_commands_exit_2_naming_the_engine() {
    for engine in ["memory", "signed_cookies"] {
        let (code, _out, err) = run_cli(
            &["sessions", "clear"],
            &[("SWITCHYARD_SESSIONS__ENGINE", engine)],
            None,
        );
        assert_eq!(code, 2, "{engine}: {err}");
        assert!(err.contains("sessions.engine"), "{err}");
    }
}
