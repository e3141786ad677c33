//! Pure retry timing: exponential backoff with jitter and `Retry-After` parsing
//! (RFC 9110 §10.2.3: delay-seconds or an HTTP-date). Shared by passthrough retries and
//! delivery.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use rand::Rng;

use crate::config::{Backoff, Jitter};

/// The un-jittered delay before attempt `attempt + 1`: `min(max, initial * multiplier^(attempt-1))`.
pub fn ceiling(b: &Backoff, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(64) as i32;
    let secs = b.initial().as_secs_f64() * b.multiplier().powi(exp);
    if !secs.is_finite() || secs >= b.max().as_secs_f64() {
        b.max()
    } else {
        Duration::from_secs_f64(secs)
    }
}

/// The jittered delay after failed attempt number `attempt` (1-based).
pub fn delay(b: &Backoff, attempt: u32) -> Duration {
    let cap = ceiling(b, attempt);
    let mut rng = rand::rng();
    match b.jitter() {
        Jitter::None => cap,
        Jitter::Full => cap.mul_f64(rng.random::<f64>()),
        Jitter::Equal => cap / 2 + (cap / 2).mul_f64(rng.random::<f64>()),
    }
}

/// The delay a response's `Retry-After` asks for, if it holds a valid one. Garbage,
/// negative and fractional values are ignored (the caller's own backoff applies). A date
/// is read against the response's own `Date` when present, which cancels clock skew.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Checked: a huge value saturates instead of overflowing a timer.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let base = headers
        .get(header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or(now);
    Some(at.duration_since(base).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn b() -> Backoff {
        Backoff::try_new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            2.0,
            Jitter::Full,
        )
        .unwrap()
    }

    #[test]
    fn ceiling_grows_then_caps() {
        assert_eq!(ceiling(&b(), 1), Duration::from_millis(100));
        assert_eq!(ceiling(&b(), 2), Duration::from_millis(200));
        assert_eq!(ceiling(&b(), 4), Duration::from_millis(800));
        assert_eq!(ceiling(&b(), 5), Duration::from_secs(1));
        assert_eq!(ceiling(&b(), u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_stays_within_zero_and_ceiling() {
        for attempt in 1..50 {
            assert!(delay(&b(), attempt) <= ceiling(&b(), attempt));
        }
    }

    fn ra(v: &str) -> Option<Duration> {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        retry_after(
            &h,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(ra("2"), Some(Duration::from_secs(2)));
        assert_eq!(ra("-5"), None);
        assert_eq!(ra("1.5"), None);
        assert_eq!(ra("soon"), None);
        assert_eq!(
            ra("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        let later =
            httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_120));
        assert_eq!(ra(&later), Some(Duration::from_secs(120)));
    }

    #[test]
    fn retry_after_date_is_read_against_the_response_date() {
        let mut h = HeaderMap::new();
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        h.insert(
            header::DATE,
            HeaderValue::from_str(&httpdate::fmt_http_date(date)).unwrap(),
        );
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(date + Duration::from_secs(30)))
                .unwrap(),
        );
        // Our clock is far off; the answer still says 30s.
        assert_eq!(
            retry_after(&h, SystemTime::now()),
            Some(Duration::from_secs(30))
        );
    }
}
