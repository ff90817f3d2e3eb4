//! Who a request comes from: its peer, or, when the peer is one of `server.trusted_proxies`,
//! what the proxy's `X-Forwarded-For`/`-Host`/`-Proto` say. From any other peer those headers
//! are ignored (anyone can send them). Login throttling, the CSRF origin check and "is this
//! request local" all read [`client`], never the headers or actix's `connection_info()` (which
//! believes `X-Forwarded-Host` from anyone).

use std::net::IpAddr;

use actix_web::http::header::{HeaderMap, HOST};
use actix_web::{web, HttpRequest};

/// `server.trusted_proxies`, shared by the HTTP app (`web::Data`); without it no peer is
/// trusted.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(pub Vec<IpAddr>);

/// A request's client as far as it can be believed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the peer's, or the right-most `X-Forwarded-For` address that is
    /// not itself a trusted proxy (when the peer is trusted).
    pub ip: Option<IpAddr>,
    /// The host the client asked for: `X-Forwarded-Host` from a trusted peer, else `Host`.
    pub host: String,
    /// `http` or `https`: `X-Forwarded-Proto` from a trusted peer, else the connection's.
    pub scheme: String,
    /// Whether the client is this machine: a loopback address, and no forwarding headers from
    /// an untrusted peer (a local proxy nobody listed would make every visitor look local).
    pub local: bool,
}

/// The client of `req` (see the module).
pub fn client(req: &HttpRequest) -> Client {
    let trusted = req
        .app_data::<web::Data<TrustedProxies>>()
        .map(|t| t.0.as_slice())
        .unwrap_or_default();
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let scheme = if req.app_config().secure() {
        "https"
    } else {
        "http"
    };
    resolve(
        req.peer_addr().map(|a| a.ip()),
        req.headers(),
        trusted,
        host,
        scheme,
    )
}

/// [`client`] from its parts: the peer, the headers, the trusted proxies, and the host and
/// scheme of the connection itself.
pub fn resolve(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: &[IpAddr],
    host: String,
    scheme: &str,
) -> Client {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h));
    if !peer.is_some_and(|p| trusted.contains(&p)) {
        return Client {
            ip: peer,
            host,
            scheme: scheme.to_owned(),
            local: !forwarded && peer.is_some_and(|p| p.is_loopback()),
        };
    }
    // From the right: each hop a trusted proxy appended, until the first that is not one.
    let mut ip = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        let Ok(addr) = hop.trim().parse::<IpAddr>() else {
            break;
        };
        ip = Some(addr);
        if !trusted.contains(&addr) {
            break;
        }
    }
    // The first value of a comma-separated list (a chain of proxies each appending).
    let first = |name: &str| {
        header(name)
            .and_then(|v| v.split(',').next())
            .map(str::trim)
    };
    Client {
        ip,
        host: first("x-forwarded-host").map_or(host, str::to_owned),
        scheme: first("x-forwarded-proto")
            .filter(|p| matches!(*p, "http" | "https"))
            .unwrap_or(scheme)
            .to_owned(),
        local: ip.is_some_and(|a| a.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
        ]);
        let c = resolve(
            Some(ip("127.0.0.1")),
            &h,
            &[],
            "shop.example".into(),
            "http",
        );
        assert_eq!(c.ip, Some(ip("127.0.0.1")));
        assert_eq!(c.host, "shop.example");
        assert_eq!(c.scheme, "http");
        assert!(
            !c.local,
            "a loopback peer forwarding for someone is not local"
        );
        let c = resolve(
            Some(ip("127.0.0.1")),
            &HeaderMap::new(),
            &[],
            "h".into(),
            "http",
        );
        assert!(c.local);
    }

    #[test]
    fn a_trusted_peer_is_believed_up_to_the_first_untrusted_hop() {
        let trusted = [ip("10.0.0.1"), ip("10.0.0.2")];
        let h = headers(&[
            ("x-forwarded-for", "9.9.9.9, 5.6.7.8"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-host", "shop.example, inner"),
            ("x-forwarded-proto", "https"),
        ]);
        let c = resolve(Some(ip("10.0.0.1")), &h, &trusted, "backend".into(), "http");
        // 9.9.9.9 is what 5.6.7.8 claims: not believed.
        assert_eq!(c.ip, Some(ip("5.6.7.8")));
        assert_eq!(c.host, "shop.example");
        assert_eq!(c.scheme, "https");
        assert!(!c.local);
        // Nothing forwarded: the peer itself.
        let c = resolve(
            Some(ip("10.0.0.1")),
            &HeaderMap::new(),
            &trusted,
            "b".into(),
            "http",
        );
        assert_eq!(c.ip, Some(ip("10.0.0.1")));
        // Garbage ends the walk at the last believed hop.
        let h = headers(&[("x-forwarded-for", "not-an-ip, 10.0.0.2")]);
        let c = resolve(Some(ip("10.0.0.1")), &h, &trusted, "b".into(), "http");
        assert_eq!(c.ip, Some(ip("10.0.0.2")));
    }
}
