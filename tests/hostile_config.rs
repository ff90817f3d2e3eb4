//! A configuration file is input too: any text, and any `SWITCHYARD_*` environment value, is a
//! configuration or an error naming where the problem is, never a panic. Bounded property tests
//! of the `config_file` fuzz target's own function (`fuzz/src/config.rs`, docs/fuzzing.md),
//! also run over its committed seeds and the inputs fuzzing found.

#[path = "../fuzz/src/config.rs"]
mod targets;

use proptest::prelude::*;
use switchyard::config::Config;

/// Lines built from real sections and keys with arbitrary values, so that the cases reach the
/// typed layer and the validation rules, not only the TOML parser.
fn config_text() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "[server]",
        "[sessions]",
        "[tasks]",
        "[[tasks.queues]]",
        "[auth]",
        "[[auth.users]]",
        "[nats]",
        "[beat]",
        "[[beat.schedule]]",
        "[log]",
        "[context]",
        "[bogus]",
    ]);
    let key = prop::sample::select(vec![
        "bind",
        "debug",
        "secret_key",
        "engine",
        "cookie_age",
        "max_size",
        "name",
        "concurrency",
        "rate_limit",
        "every",
        "cron",
        "level",
        "url",
        "processors",
        "result_ttl",
        "username",
        "password_hash",
        "max_failures",
        "retry_backoff_max",
        "memory_max_sessions",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "\\PC{0,12}".prop_map(|s| format!("{s:?}")),
        Just("true".to_owned()),
        Just("[1, \"a\"]".to_owned()),
        Just("{ x = 1 }".to_owned()),
        "\\PC{0,12}",
    ];
    let line = prop_oneof![
        section.prop_map(str::to_owned),
        (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        "\\PC{0,30}",
    ];
    proptest::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_file_is_a_config_or_an_error(text in config_text()) {
        targets::config_file(text.as_bytes());
    }

    #[test]
    fn any_environment_value_is_a_config_or_an_error(
        var in prop::sample::select(vec![
            "SWITCHYARD_SERVER__BIND", "SWITCHYARD_TASKS__RESULT_TTL",
            "SWITCHYARD_TASKS__RETRY_BACKOFF_MAX", "SWITCHYARD_SESSIONS__COOKIE_AGE",
            "SWITCHYARD_CONTEXT__PROCESSORS", "SWITCHYARD_AUTH__MAX_FAILURES",
            "SWITCHYARD_NOPE__KEY", "SWITCHYARD_TASKS__QUEUES",
        ]),
        value in "\\PC{0,24}",
    ) {
        let env = [(var.to_owned(), value.clone())];
        if let Err(e) = Config::load_with_env(None, &env) {
            prop_assert!(e.to_string().contains(var), "{e} names {var}");
        }
        targets::load(b"", Some((var.to_owned(), value)));
    }
}

/// The committed seeds and the inputs fuzzing found (fuzz/seeds/config_file/,
/// fuzz/regressions/config_file/) run through the target.
#[test]
fn config_seeds_and_regressions_run_clean() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join("config_file")) else {
            continue;
        };
        for file in dir {
            let path = file.expect("a directory entry").path();
            eprintln!("config_file: {}", path.display());
            targets::config_file(&std::fs::read(&path).expect("read an input"));
            ran += 1;
        }
    }
    assert!(ran >= 2, "the seeds are there ({ran} inputs)");
}
