//! The shipped configuration files differ from the built-in defaults by exactly what SPEC says:
//! `config/default.toml` adds the `cart` processor, the demo user alice and the `emails` queue;
//! `config/cluster.toml` is the same with `sessions.engine = "postgres"` and
//! `tasks.broker = "nats"`.

use std::path::PathBuf;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use serde_json::{json, Value};
use switchyard::config::Config;

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(name)
}

fn load(name: &str) -> Config {
    let path = shipped(name);
    match Config::load_with_env(Some(&path), &[]) {
        Ok(config) => config,
        Err(e) => panic!("{} does not load: {e}", path.display()),
    }
}

fn to_json(config: &Config) -> Value {
    serde_json::to_value(config).expect("the configuration serializes to JSON")
}

/// The built-in defaults plus the differences every shipped file has.
fn expected_default_toml(alice_hash: &str) -> Value {
    let mut expected = to_json(&Config::default());
    expected["context"]["processors"]
        .as_array_mut()
        .expect("processors is an array")
        .push(json!("cart"));
    expected["auth"]["users"] = json!([{
        "username": "alice",
        "password_hash": alice_hash,
        "permissions": ["shop.view_order"],
        "staff": true,
    }]);
    expected["tasks"]["queues"]
        .as_array_mut()
        .expect("queues is an array")
        .push(json!({ "name": "emails", "concurrency": 4, "rate_limit": "", "rate_key": "" }));
    expected
}

fn alice_hash(config: &Config) -> String {
    config
        .auth
        .users
        .iter()
        .find(|u| u.username == "alice")
        .map(|u| u.password_hash.clone())
        .expect("alice is defined")
}

#[test]
fn default_toml_is_the_defaults_plus_the_demo() {
    let config = load("default.toml");
    let hash = alice_hash(&config);
    assert_eq!(to_json(&config), expected_default_toml(&hash));
}

#[test]
fn cluster_toml_is_default_toml_on_postgres_and_nats_with_the_outbox() {
    let config = load("cluster.toml");
    let hash = alice_hash(&config);
    let mut expected = expected_default_toml(&hash);
    expected["sessions"]["engine"] = json!("postgres");
    expected["tasks"]["broker"] = json!("nats");
    expected["tasks"]["outbox"] = json!("postgres");
    assert_eq!(to_json(&config), expected);
    assert_eq!(hash, alice_hash(&load("default.toml")));
}

#[test]
fn alice_password_is_wonderland() {
    let hash = alice_hash(&load("default.toml"));
    let parsed = PasswordHash::new(&hash).expect("a PHC hash");
    assert_eq!(parsed.algorithm.as_str(), "argon2id");
    assert!(Argon2::default()
        .verify_password(b"wonderland", &parsed)
        .is_ok());
    assert!(Argon2::default()
        .verify_password(b"looking-glass", &parsed)
        .is_err());
}

#[test]
fn shipped_files_print_as_redacted_toml_that_parses_back() {
    for name in ["default.toml", "cluster.toml"] {
        let text = load(name).to_redacted_toml();
        let value: toml::Value = toml::from_str(&text).expect("redacted TOML parses");
        assert_eq!(
            value["auth"]["users"][0]["password_hash"].as_str(),
            Some("<redacted>"),
            "{name}"
        );
        assert_eq!(value["tasks"]["queues"][1]["name"].as_str(), Some("emails"));
    }
}
