//! Entry points for the cargo-fuzz targets in `fuzz/`: each takes raw bytes, drives one
//! parser the way untrusted input reaches it, and asserts what must hold of its output. Not
//! a product API (hidden from docs); kept here so the fuzz crate needs no private access.

use std::path::Path;
use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderValue, Request};
use zeroize::Zeroizing;

use crate::queue::crypt::{Sealer, KEY_LEN, NONCE_LEN, TAG_LEN};
use crate::queue::redb::schema;
use crate::queue::{Job, JobId, JobState};

/// The YAML config loader and validation, from file bytes.
pub fn config(data: &[u8]) {
    // The loader reads files as UTF-8 (`read_to_string`); other bytes never reach the parser.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::from_str(text, Path::new("fuzz.yaml"));
    }
}

fn sealer() -> Option<Sealer> {
    Sealer::from_keys(
        vec![("fuzz".to_owned(), Zeroizing::new([7u8; KEY_LEN]))],
        "fuzz",
    )
    .ok()
}

/// A job whose sealed fields are all empty: its sealed record is the head, a 5-byte
/// ciphertext (five zero lengths) and the tag, so arbitrary plaintext can be sealed behind
/// its head.
fn template() -> Job {
    Job {
        id: JobId::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        route: "r".into(),
        method: "POST".into(),
        uri: String::new(),
        headers: Vec::new(),
        body: bytes::Bytes::new(),
        traceparent: None,
        idempotency_key: "k".into(),
        fingerprint: [0; 32],
        created_at_ms: 1,
        ordering_key: None,
        state: JobState::Queued,
        attempts: 0,
        next_attempt_at_ms: 1,
        updated_at_ms: 1,
        last: None,
        dead_reason: None,
    }
}

/// The stored job record decoders (v1 and sealed v2). Input starting with `0xFE` is taken as
/// the plaintext of a sealed record instead, sealed with the fuzz key behind a valid head, so
/// the fuzzer reaches the sealed part's decoding past authentication.
pub fn job_record(data: &[u8]) {
    let Some(sealer) = sealer() else { return };
    if let Some((&0xFE, plaintext)) = data.split_first() {
        let job = template();
        let Ok(rec) = schema::encode_job_with(&job, Some(&sealer)) else {
            return;
        };
        let head_end = rec.len() - TAG_LEN - 5;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&rec[head_end - NONCE_LEN..head_end]);
        let mut buf = plaintext.to_vec();
        let Ok(tag) = sealer.seal_in_place(&nonce, &job.id.as_u128().to_be_bytes(), &mut buf)
        else {
            return;
        };
        let mut forged = rec[..head_end].to_vec();
        forged.extend_from_slice(&buf);
        forged.extend_from_slice(&tag);
        record(&forged, &sealer);
    } else {
        record(data, &sealer);
    }
}

fn record(bytes: &[u8], sealer: &Sealer) {
    let _ = schema::decode_job_with(bytes, None);
    let _ = schema::decode_job_head(bytes);
    if let Ok(job) = schema::decode_job_with(bytes, Some(sealer)) {
        // What decodes must re-encode, in both versions, to a record that decodes the same.
        let v1 = schema::encode_job(&job);
        let again = schema::decode_job(&v1).map(|j| schema::encode_job(&j));
        assert_eq!(again.ok().as_deref(), Some(&v1[..]), "v1 round trip");
        if let Ok(v2) = schema::encode_job_with(&job, Some(sealer)) {
            let back = schema::decode_job_with(&v2, Some(sealer)).map(|j| schema::encode_job(&j));
            assert_eq!(back.ok().as_deref(), Some(&v1[..]), "v2 round trip");
        }
    }
    if let Ok((job, Some(_))) = schema::decode_job_head(bytes) {
        let _ = schema::rewrite_sealed_head(bytes, &job);
    }
}

/// `Retry-After` parsing. Input: the header value, optionally `\n` and a `Date` value.
pub fn retry_after(data: &[u8]) {
    let (value, date) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let mut headers = HeaderMap::new();
    let Ok(v) = HeaderValue::from_bytes(value) else {
        return;
    };
    headers.insert(header::RETRY_AFTER, v);
    if let Some(Ok(d)) = date.map(HeaderValue::from_bytes) {
        headers.insert(header::DATE, d);
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let got = crate::backoff::retry_after(&headers, now);
    let trimmed = value.trim_ascii();
    if !trimmed.is_empty() && trimmed.iter().all(u8::is_ascii_digit) {
        assert!(got.is_some(), "delay-seconds must be read");
    }
}

/// The request target normaliser. Input lines: method, request target, then any number of
/// `Host` values.
pub fn target(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else {
        return;
    };
    let mut b = Request::builder().method(method).uri(uri);
    for h in lines {
        b = b.header(header::HOST, h);
    }
    let Ok(req) = b.body(()) else { return };
    let Ok(t) = crate::proxy::target::normalise(&req) else {
        return;
    };
    assert_eq!(t.host, t.host.to_ascii_lowercase(), "host is lowercase");
    let _ = t.path();
    if t.connect {
        assert!(
            t.port.is_some() && !t.host.is_empty(),
            "CONNECT has host:port"
        );
    } else {
        assert!(t.path_and_query.starts_with('/'), "path is origin-form");
    }
    if !t.host.is_empty() {
        // The authority it reports names the same destination when parsed again.
        let auth: Result<http::uri::Authority, _> = t.authority().parse();
        let auth = auth.ok();
        assert!(auth.is_some(), "authority() re-parses: {:?}", t.authority());
        if let Some(a) = auth {
            assert_eq!(
                a.host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase(),
                t.host
            );
            assert_eq!(a.port_u16(), t.port);
        }
    }
}
