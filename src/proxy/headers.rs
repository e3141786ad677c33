//! Hop-by-hop header stripping (RFC 9110 §7.6.1), request framing checks against
//! smuggling (RFC 9112 §6), and re-framing of what we forward.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Headers that describe one connection, never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why a request's framing is refused, or `None` when it is unambiguous. hyper already
/// refuses most bad framing (two different `Content-Length`s, obs-fold, bad chunk sizes,
/// control characters in a header, a last coding other than `chunked`, `Transfer-Encoding`
/// on HTTP/1.0); this refuses what it lets through: a coding before `chunked` that we
/// would silently drop (`gzip, chunked`), and `Transfer-Encoding` next to
/// `Content-Length` where it is still visible.
pub fn framing_error(version: Version, headers: &HeaderMap) -> Option<&'static str> {
    let mut codings = 0usize;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(text) = value.to_str() else {
            return Some("the Transfer-Encoding header is not valid text");
        };
        for coding in text.split(',').map(str::trim) {
            // Empty list elements are allowed by the list syntax; they mean nothing.
            if coding.is_empty() {
                continue;
            }
            if !coding.eq_ignore_ascii_case("chunked") {
                return Some("only the chunked transfer coding is supported");
            }
            codings += 1;
        }
    }
    let has_te = headers.contains_key(header::TRANSFER_ENCODING);
    if has_te && codings != 1 {
        return Some("Transfer-Encoding must name chunked exactly once");
    }
    if has_te && version < Version::HTTP_11 {
        return Some("Transfer-Encoding is not allowed before HTTP/1.1");
    }
    if has_te && headers.contains_key(header::CONTENT_LENGTH) {
        return Some("a request may not carry both Transfer-Encoding and Content-Length");
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        let parse = |v: &HeaderValue| -> Option<u64> {
            let mut n = None;
            for part in v.to_str().ok()?.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let v = part.parse::<u64>().ok()?;
                if n.is_some_and(|p| p != v) {
                    return None;
                }
                n = Some(v);
            }
            n
        };
        let Some(n) = parse(first) else {
            return Some("the Content-Length header is not a valid length");
        };
        if lengths.any(|v| parse(v) != Some(n)) {
            return Some("the request carries different Content-Length values");
        }
    }
    None
}

/// Sets the framing of a buffered body we forward: no `Transfer-Encoding`, and a
/// `Content-Length` equal to the bytes we hold (absent for an empty body the client sent
/// without one), so what the upstream reads is exactly what we read.
pub fn reframe(headers: &mut HeaderMap, body_len: usize) {
    headers.remove(header::TRANSFER_ENCODING);
    let had = headers.remove(header::CONTENT_LENGTH).is_some();
    if body_len > 0 || had {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    }
}

/// Removes hop-by-hop headers and every header that `Connection` names. When the
/// message was framed by `Transfer-Encoding`, any `Content-Length` next to it is stale
/// (RFC 9112 §6.3) and goes too: hyper frames what we send again.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names is cheaper than a lookup
    // per hop-by-hop name.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Total bytes of a request head's header section, as a client sent it.
pub fn header_bytes(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn framing_accepts_plain_requests() {
        let v = Version::HTTP_11;
        assert_eq!(framing_error(v, &h(&[])), None);
        assert_eq!(framing_error(v, &h(&[("content-length", "5")])), None);
        assert_eq!(
            framing_error(v, &h(&[("content-length", "5"), ("content-length", "5")])),
            None
        );
        assert_eq!(framing_error(v, &h(&[("content-length", "5, 5")])), None);
        assert_eq!(
            framing_error(v, &h(&[("transfer-encoding", "chunked")])),
            None
        );
        assert_eq!(
            framing_error(v, &h(&[("transfer-encoding", "Chunked")])),
            None
        );
    }

    #[test]
    fn framing_refuses_ambiguity() {
        let v = Version::HTTP_11;
        for bad in [
            vec![("transfer-encoding", "gzip, chunked")],
            vec![("transfer-encoding", "chunked, identity")],
            vec![("transfer-encoding", "identity")],
            vec![("transfer-encoding", "chunked, chunked")],
            vec![
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            vec![("transfer-encoding", "")],
            vec![("transfer-encoding", "chunked"), ("content-length", "3")],
            vec![("content-length", "5"), ("content-length", "6")],
            vec![("content-length", "5, 6")],
            vec![("content-length", "+5")],
            vec![("content-length", "0x5")],
        ] {
            assert!(framing_error(v, &h(&bad)).is_some(), "{bad:?}");
        }
        assert!(framing_error(Version::HTTP_10, &h(&[("transfer-encoding", "chunked")])).is_some());
    }

    #[test]
    fn reframe_sets_the_held_length() {
        let mut m = h(&[("transfer-encoding", "chunked")]);
        reframe(&mut m, 7);
        assert!(m.get("transfer-encoding").is_none());
        assert_eq!(m["content-length"], "7");
        let mut m = h(&[]);
        reframe(&mut m, 0);
        assert!(m.get("content-length").is_none());
        let mut m = h(&[("content-length", "0")]);
        reframe(&mut m, 0);
        assert_eq!(m["content-length"], "0");
    }

    #[test]
    fn a_response_framed_by_te_loses_its_content_length() {
        let mut m = h(&[("transfer-encoding", "chunked"), ("content-length", "10")]);
        strip_hop_by_hop(&mut m);
        assert!(m.get("transfer-encoding").is_none());
        assert!(m.get("content-length").is_none());
        let mut m = h(&[("content-length", "10")]);
        strip_hop_by_hop(&mut m);
        assert_eq!(m["content-length"], "10");
    }

    #[test]
    fn connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("X-Secret, close"),
        );
        h.insert("x-secret", HeaderValue::from_static("v"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("traceparent", HeaderValue::from_static("00-abc"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("proxy-authorization").is_none());
        assert_eq!(h.get("traceparent").unwrap(), "00-abc");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }
}
