//! Header redaction for admin API answers: `Authorization`, `Proxy-Authorization`,
//! `Cookie`, `Set-Cookie` and every header named in `redact_headers` are masked.

use std::collections::HashSet;

use http::header::{self, HeaderName};
use serde_json::{json, Value};

/// What a masked value reads as.
pub const REDACTED: &str = "[redacted]";

/// Which header names to mask; names compare case-insensitively.
#[derive(Clone, Debug)]
pub struct Redactor {
    names: HashSet<HeaderName>,
}

impl Redactor {
    pub fn new(extra: &[HeaderName]) -> Self {
        let mut names: HashSet<HeaderName> = [
            header::AUTHORIZATION,
            header::PROXY_AUTHORIZATION,
            header::COOKIE,
            header::SET_COOKIE,
        ]
        .into_iter()
        .collect();
        names.extend(extra.iter().cloned());
        Redactor { names }
    }

    pub fn is_secret(&self, name: &str) -> bool {
        HeaderName::from_bytes(name.as_bytes()).is_ok_and(|n| self.names.contains(&n))
    }

    /// Headers as `[{"name": .., "value": ..}]`, in stored order, secrets masked. Values
    /// that are not UTF-8 are shown lossily.
    pub fn headers(&self, headers: &[(String, Vec<u8>)]) -> Value {
        Value::Array(
            headers
                .iter()
                .map(|(name, value)| {
                    let value = if self.is_secret(name) {
                        REDACTED.to_owned()
                    } else {
                        String::from_utf8_lossy(value).into_owned()
                    };
                    json!({ "name": name, "value": value })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_others_kept() {
        let r = Redactor::new(&[HeaderName::from_static("x-api-key")]);
        let h = vec![
            ("authorization".to_owned(), b"Bearer abc".to_vec()),
            ("Cookie".to_owned(), b"s=1".to_vec()),
            ("set-cookie".to_owned(), b"s=2".to_vec()),
            ("proxy-authorization".to_owned(), b"Basic x".to_vec()),
            ("X-API-Key".to_owned(), b"k".to_vec()),
            ("x-other".to_owned(), b"visible".to_vec()),
        ];
        let v = r.headers(&h);
        let values: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["value"].as_str().unwrap())
            .collect();
        assert_eq!(
            values,
            [REDACTED, REDACTED, REDACTED, REDACTED, REDACTED, "visible"]
        );
    }
}
