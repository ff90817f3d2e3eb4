//! The target of the `switchyard` crate: the configuration file and environment (figment over
//! TOML, then validation). Any text is a configuration or an error that says what is wrong.
//!
//! This file is also `tests/hostile_config.rs`'s `targets` module: it may use only the crates
//! `switchyard` depends on (and its dev-dependencies).

use std::path::PathBuf;

use switchyard::config::Config;

/// Where the file under test is written: one private directory per thread, made once.
fn config_path() -> PathBuf {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::tempdir().expect("a temporary directory");
    }
    DIR.with(|d| d.path().join("switchyard.toml"))
}

/// Loads `text` as the configuration file, and (`env`) one `SWITCHYARD_*` environment value.
/// A configuration loaded must validate again and print as redacted TOML; an error must say
/// something (and, for a bad environment value, name the variable).
pub fn load(text: &[u8], env: Option<(String, String)>) {
    let path = config_path();
    std::fs::write(&path, text).expect("write the file");
    let env: Vec<(String, String)> = env.into_iter().collect();
    match Config::load_with_env(Some(&path), &env) {
        Ok(config) => {
            assert!(config.validate().is_ok(), "a loaded configuration is valid");
            assert!(!config.to_redacted_toml().is_empty());
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty(), "an error says something");
        }
    }
}

/// The input is the configuration file; when it has a line `\0NAME=VALUE` at the end, that is
/// also set as the environment variable `SWITCHYARD_NAME` (the prefix added if missing).
pub fn config_file(data: &[u8]) {
    let (text, env) = match data.iter().rposition(|&b| b == 0) {
        Some(at) => {
            let var = String::from_utf8_lossy(&data[at + 1..]);
            let (name, value) = var.split_once('=').unwrap_or((&var, ""));
            let name = if name.starts_with("SWITCHYARD_") {
                name.to_owned()
            } else {
                format!("SWITCHYARD_{name}")
            };
            (&data[..at], Some((name, value.to_owned())))
        }
        None => (data, None),
    };
    load(text, env);
}
