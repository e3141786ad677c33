//! Normalises a request's destination: absolute-form (HTTP_PROXY), origin-form with
//! `Host` (sidecar), or authority-form (`CONNECT`). Routing and every check use the one
//! authority this returns.

use http::{header, Method, Request};

/// Where the client wants its request to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Lowercase host without brackets; empty when the request named none.
    pub host: String,
    pub port: Option<u16>,
    /// Path and query as sent (origin-form), `/` when absent.
    pub path_and_query: String,
    /// The request came in absolute-form (HTTP_PROXY mode).
    pub absolute: bool,
    pub connect: bool,
}

impl Target {
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }

    /// `host[:port]` for messages and unmatched passthrough.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the Host header ({host}) differs from the request target's authority ({authority})")]
    HostMismatch { host: String, authority: String },
    #[error("{0}")]
    Invalid(&'static str),
}

fn split_authority(auth: &str) -> Result<(String, Option<u16>), TargetError> {
    let parsed: http::uri::Authority = auth
        .parse()
        .map_err(|_| TargetError::Invalid("the authority is not a valid host[:port]"))?;
    if auth.contains('@') {
        return Err(TargetError::Invalid(
            "userinfo is not allowed in the authority",
        ));
    }
    // Brackets only enclose a whole IPv6 address; the http crate lets stray ones and other
    // bracketed text through (`;[:1]`, `[%%]`, found by fuzzing), which name no real host.
    let raw = parsed.host();
    let host = match raw.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .filter(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
            .ok_or(TargetError::Invalid("the authority's host is not valid"))?,
        None => raw,
    };
    if host.contains(['[', ']']) {
        return Err(TargetError::Invalid("the authority's host is not valid"));
    }
    let host = host.to_ascii_lowercase();
    if host.is_empty() {
        return Err(TargetError::Invalid("the authority has no host"));
    }
    Ok((host, parsed.port_u16()))
}

/// Reads the destination of `req`. An absolute-form target whose `Host` names another
/// authority is refused rather than silently rewritten (RFC 9112 §3.2.2 lets a proxy
/// ignore Host; refusing closes the bypass where routing and forwarding disagree).
pub fn normalise<B>(req: &Request<B>) -> Result<Target, TargetError> {
    let uri = req.uri();
    let host_header = match req.headers().get_all(header::HOST).iter().count() {
        0 => None,
        1 => Some(
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .ok_or(TargetError::Invalid("the Host header is not valid"))?,
        ),
        _ => return Err(TargetError::Invalid("more than one Host header")),
    };

    if req.method() == Method::CONNECT {
        let auth = uri
            .authority()
            .ok_or(TargetError::Invalid("CONNECT needs a host:port target"))?;
        let (host, port) = split_authority(auth.as_str())?;
        let port = port.ok_or(TargetError::Invalid("CONNECT needs a host:port target"))?;
        return Ok(Target {
            host,
            port: Some(port),
            path_and_query: String::new(),
            absolute: false,
            connect: true,
        });
    }

    let path_and_query = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    if !path_and_query.starts_with('/') {
        return Err(TargetError::Invalid(
            "the request target must be a path or an absolute URL",
        ));
    }

    if let Some(auth) = uri.authority() {
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(TargetError::Invalid(
                    "only http and https URLs can be proxied",
                ))
            }
        }
        let (host, port) = split_authority(auth.as_str())?;
        if let Some(h) = host_header {
            let (hh, hp) = split_authority(h)?;
            let default = if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            if hh != host || hp.unwrap_or(default) != port.unwrap_or(default) {
                return Err(TargetError::HostMismatch {
                    host: h.to_owned(),
                    authority: auth.as_str().to_owned(),
                });
            }
        }
        return Ok(Target {
            host,
            port,
            path_and_query,
            absolute: true,
            connect: false,
        });
    }

    let (host, port) = match host_header {
        Some(h) => split_authority(h)?,
        None => (String::new(), None),
    };
    Ok(Target {
        host,
        port,
        path_and_query,
        absolute: false,
        connect: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    // Fuzz findings (fuzz target `target`): the http crate parses these as authorities; their
    // hosts must be refused, not passed on as `;[:!!!!!!!!!!:1` or `%%...`.
    #[test]
    fn stray_brackets_in_host_are_refused() {
        let r = req("GET", "https://;[:!!!!!!!!!!:1]/x", None);
        assert!(matches!(normalise(&r), Err(TargetError::Invalid(_))));
        let r = req("GET", "/x", Some("a[b]"));
        assert!(matches!(normalise(&r), Err(TargetError::Invalid(_))));
        let r = req("T", "/", Some("[%%%%%%%%%%%%)%%%%%%%%%%()%%8o]:"));
        assert!(matches!(normalise(&r), Err(TargetError::Invalid(_))));
        let t = normalise(&req("GET", "http://[::1]:8080/", None)).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", Some(8080)));
    }

    #[test]
    fn origin_form_uses_host() {
        let t = normalise(&req("GET", "/v1/x?a=1", Some("API.Example:8080"))).unwrap();
        assert_eq!(t.host, "api.example");
        assert_eq!(t.port, Some(8080));
        assert_eq!(t.path(), "/v1/x");
        assert!(!t.absolute);
    }

    #[test]
    fn absolute_form_uses_uri_authority() {
        let t = normalise(&req(
            "POST",
            "http://hooks.example/v1/e",
            Some("hooks.example"),
        ))
        .unwrap();
        assert_eq!(t.host, "hooks.example");
        assert_eq!(t.port, None);
        assert!(t.absolute);
    }

    #[test]
    fn absolute_form_with_other_host_is_a_mismatch() {
        let e =
            normalise(&req("GET", "http://allowed.example/", Some("evil.example"))).unwrap_err();
        assert!(matches!(e, TargetError::HostMismatch { .. }));
    }

    #[test]
    fn explicit_default_port_is_not_a_mismatch() {
        assert!(normalise(&req("GET", "http://a.example/", Some("a.example:80"))).is_ok());
    }

    #[test]
    fn connect_needs_port() {
        let t = normalise(&req("CONNECT", "api.example:443", None)).unwrap();
        assert!(t.connect);
        assert_eq!(t.port, Some(443));
    }

    #[test]
    fn ipv6_hosts_lose_brackets() {
        let t = normalise(&req("GET", "http://[::1]:8080/", None)).unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.authority(), "[::1]:8080");
    }
}
