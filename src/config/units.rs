//! Humane durations and sizes.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A YAML scalar kept as written, so a bare `5` for a duration can be told apart from
/// `"5s"` and reported with a useful message instead of a serde type error.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Str(String),
    Int(i128),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Str(s) => write!(f, "{s:?}"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar (string or number)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Scalar, E> {
                i128::try_from(v)
                    .map(Scalar::Int)
                    .map_err(|_| E::custom("number too large"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `250ms`, `10m`, `24h`, `1h 30m`. A bare number is refused: `timeout: 5` is
/// ambiguous (seconds? milliseconds?) and a wrong guess is a silent outage.
pub(super) fn parse_duration(v: &Scalar) -> Result<Duration, String> {
    match v {
        Scalar::Str(s) => {
            let t = s.trim();
            if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return Err(format!(
                    "expected a duration with a unit such as \"{t}s\" or \"{t}ms\", found {v}"
                ));
            }
            humantime::parse_duration(t).map_err(|e| {
                format!("expected a duration such as \"250ms\", \"10s\" or \"24h\", found {v} ({e})")
            })
        }
        Scalar::Int(_) | Scalar::Float(_) => Err(format!(
            "expected a duration with a unit such as \"{v}s\" or \"{v}ms\", found the bare number {v}"
        )),
        Scalar::Bool(_) => Err(format!(
            "expected a duration such as \"250ms\", \"10s\" or \"24h\", found {v}"
        )),
    }
}

/// Parses `64KiB`, `1MiB`, `1 MB` or a plain integer meaning bytes.
pub(super) fn parse_size(v: &Scalar) -> Result<u64, String> {
    match v {
        Scalar::Int(i) => {
            u64::try_from(*i).map_err(|_| format!("expected a size in bytes (>= 0), found {i}"))
        }
        Scalar::Str(s) => {
            let t = s.trim();
            if let Ok(n) = t.parse::<u64>() {
                return Ok(n);
            }
            t.parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|_| format!("expected a size such as \"64KiB\" or \"1MiB\", found {v}"))
        }
        Scalar::Float(_) | Scalar::Bool(_) => Err(format!(
            "expected a size such as \"64KiB\", \"1MiB\" or a whole number of bytes, found {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration(&Scalar::Str("250ms".into())),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            parse_duration(&Scalar::Str("24h".into())),
            Ok(Duration::from_secs(86400))
        );
        let e = parse_duration(&Scalar::Int(5)).err().unwrap_or_default();
        assert!(e.contains("unit"), "{e}");
        let e = parse_duration(&Scalar::Str("5".into()))
            .err()
            .unwrap_or_default();
        assert!(e.contains("unit"), "{e}");
        assert!(parse_duration(&Scalar::Str("soon".into())).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(&Scalar::Str("64KiB".into())), Ok(65536));
        assert_eq!(parse_size(&Scalar::Str("1MiB".into())), Ok(1 << 20));
        assert_eq!(parse_size(&Scalar::Int(4096)), Ok(4096));
        assert!(parse_size(&Scalar::Int(-1)).is_err());
        assert!(parse_size(&Scalar::Str("lots".into())).is_err());
    }
}
