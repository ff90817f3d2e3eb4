//! Secrets, kept in [`secrecy::SecretString`]; code reads them with `expose_secret()`.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// The placeholder that replaces secrets in [`super::Config::to_redacted_toml`] and in `Debug`.
pub const REDACTED: &str = "<redacted>";

/// A secret: `Debug` and `Serialize` give `"<redacted>"`, or `""` when unset; URLs use [`url`].
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    /// The secret itself.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether it is unset (empty).
    pub fn is_empty(&self) -> bool {
        self.expose_secret().is_empty()
    }
}

impl<T: Into<SecretString>> From<T> for Secret {
    fn from(secret: T) -> Self {
        Secret(secret.into())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose_secret() == other.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(redact(self.expose_secret()), f)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(redact(self.expose_secret()))
    }
}

/// [`REDACTED`], or `""` for an empty secret.
pub(super) fn redact(secret: &str) -> &'static str {
    [REDACTED, ""][usize::from(secret.is_empty())]
}

/// Serializes URLs and conninfo with passwords, tokens and `password=` values redacted.
pub(super) fn url<S: Serializer>(url: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url.expose_secret()))
}

fn redact_url(url: &str) -> String {
    static RULES: LazyLock<Vec<Regex>> = LazyLock::new(|| {
        let userinfo = r"(://[^:@/?#,]*:)[^/?#,]+(@)";
        let token = r"(\b(?:nats|tls|ws)[a-z]*://)[^:@/?#,]+(@)";
        let param = r"((?:^|[\s?&])password=)(?:'[^']*'?|[^\s&#,']+)()";
        let rules = [userinfo, token, param].map(|re| Regex::new(re).expect("a valid regex"));
        rules.into()
    });
    let redact = |url: String, re: &Regex| re.replace_all(&url, "${1}<redacted>${2}").into();
    RULES.iter().fold(url.to_owned(), redact)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        for (url, shown) in [
            ("nats://tok@h:4222", "nats://<redacted>@h:4222"),
            (
                "nats://u:p@a:1,nats://b:2",
                "nats://u:<redacted>@a:1,nats://b:2",
            ),
            ("postgres://user@h/db", "postgres://user@h/db"),
            (
                "postgres://app:pg@db/x?sslmode=off&password=pg2",
                "postgres://app:<redacted>@db/x?sslmode=off&password=<redacted>",
            ),
            (
                "host=db password=pg user=app",
                "host=db password=<redacted> user=app",
            ),
            (
                "host=db password='p g' user=app",
                "host=db password=<redacted> user=app",
            ),
            ("host=db mypassword=x", "host=db mypassword=x"),
            (
                "redis://:pw@cache:6379/0",
                "redis://:<redacted>@cache:6379/0",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let secret = Secret::from("hunter2");
        assert_eq!(format!("{secret:?}"), "\"<redacted>\"");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
        assert_eq!(secret.expose_secret(), "hunter2");
    }
}
