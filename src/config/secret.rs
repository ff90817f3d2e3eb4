//! Secrets in the configuration: kept in [`secrecy::SecretString`], shown as `"<redacted>"` by
//! `Debug` and by serialization (so by `config check`); code reads them with `expose_secret()`.

use std::fmt;

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// The placeholder that replaces secrets in [`super::Config::to_redacted_toml`] and in `Debug`.
pub const REDACTED: &str = "<redacted>";

/// A secret string such as `server.secret_key`: `Debug` and `Serialize` give `"<redacted>"`
/// (an empty secret stays `""`, so that "not set" remains visible).
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

    /// `"<redacted>"`, or `""` when unset.
    pub fn shown(&self) -> String {
        redact(self.expose_secret())
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

/// A connection URL (or Postgres `key=value` conninfo) that may hold a password: `Debug` and
/// `Serialize` show it with the password, and a NATS URL's bare token, replaced by
/// `<redacted>`: `postgres://app:<redacted>@db/switchyard`.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(Secret);

impl SecretUrl {
    /// The URL itself, password included.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// The URL with its password redacted.
    pub fn shown(&self) -> String {
        redact_url(self.expose_secret())
    }
}

impl<T: Into<Secret>> From<T> for SecretUrl {
    fn from(url: T) -> Self {
        SecretUrl(url.into())
    }
}

/// `Debug` and `Serialize` of the secret types show their `shown()` form only.
macro_rules! shown_redacted {
    ($($name:ident),+) => {$(
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.shown(), f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.shown())
            }
        }
    )+};
}

shown_redacted!(Secret, SecretUrl);

/// [`REDACTED`], or `""` for an empty secret.
pub(super) fn redact(secret: &str) -> String {
    if secret.is_empty() { "" } else { REDACTED }.to_owned()
}

/// Replaces the password of `scheme://user:password@host/...` and `password=` parameters (of
/// the query, or of a `key=value` conninfo) by [`REDACTED`]; a `nats://TOKEN@host` token too.
/// Comma-separated URL lists are handled.
fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    let Some(scheme_end) = url.find("://") else {
        return redact_params(url, |c| c.is_whitespace());
    };
    let start = scheme_end + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let mut out = url.to_owned();
    if let Some(at) = url[start..end].rfind('@') {
        let token_scheme = ["nats", "tls", "ws"].iter().any(|s| url.starts_with(s));
        let userinfo = match url[start..start + at].split_once(':') {
            Some((user, password)) if !password.is_empty() => Some(format!("{user}:{REDACTED}")),
            None if token_scheme && at > 0 => Some(REDACTED.to_owned()),
            _ => None,
        };
        if let Some(userinfo) = userinfo {
            out = format!("{}{userinfo}{}", &url[..start], &url[start + at..]);
        }
    }
    match out.split_once('?') {
        Some((base, query)) => format!("{base}?{}", redact_params(query, |c| "&#".contains(c))),
        None => out,
    }
}

/// Replaces the value of every `password=` parameter in `params` (parameters end at a character
/// `is_end`; a value may be `'quoted'`, as in conninfo).
fn redact_params(params: &str, is_end: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(params.len());
    let mut rest = params;
    while let Some(i) = rest.find("password=") {
        let starts_param = rest[..i].chars().next_back().is_none_or(&is_end);
        let value_start = i + "password=".len();
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if !starts_param {
            continue;
        }
        let value_end = match rest.strip_prefix('\'') {
            Some(quoted) => quoted.find('\'').map_or(rest.len(), |j| j + 2),
            None => rest.find(&is_end).unwrap_or(rest.len()),
        };
        if value_end > 0 {
            out.push_str(REDACTED);
        }
        rest = &rest[value_end..];
    }
    out.push_str(rest);
    out
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
