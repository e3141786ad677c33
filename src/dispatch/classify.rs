//! Pure: what one delivery attempt's outcome means for its job.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::backoff;
use crate::config::{FailureClass, RetryPolicy};

/// Prefix of the reason of a job dead because it ran out of attempts.
pub const MAX_ATTEMPTS: &str = "max_attempts";
/// Prefix of the reason of a job dead because it grew older than `max_age`.
pub const MAX_AGE: &str = "max_age";

/// What an attempt produced.
pub enum Outcome<'a> {
    Response { status: u16, headers: &'a HeaderMap },
    Failed(FailureClass),
}

/// The decision, with a reason that becomes a log field, a metric label and the
/// dead-letter record's `reason`.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Delivered,
    Retry {
        after: Duration,
        reason: String,
        /// The upstream asked the whole route to back off until then.
        pause_route: Option<Duration>,
    },
    Dead {
        reason: String,
    },
}

/// `attempts` counts the attempt just made; `age` is the job's age now.
pub fn classify(
    outcome: &Outcome<'_>,
    policy: &RetryPolicy,
    attempts: u32,
    age: Duration,
    now: SystemTime,
) -> Verdict {
    let (retryable, reason, retry_after) = match outcome {
        Outcome::Response { status, .. } if (200..300).contains(status) => {
            return Verdict::Delivered
        }
        Outcome::Response { status, headers } => {
            let after = if policy.honor_retry_after && matches!(status, 429 | 503) {
                backoff::retry_after(headers, now)
            } else {
                None
            };
            (
                policy.retry_on.status(*status),
                format!("status {status}"),
                after,
            )
        }
        Outcome::Failed(class) => (
            policy.retry_on.failure(*class),
            class.as_str().to_owned(),
            None,
        ),
    };
    if !retryable {
        return Verdict::Dead { reason };
    }
    if attempts >= policy.max_attempts.get() {
        return Verdict::Dead {
            reason: format!("{MAX_ATTEMPTS} ({reason})"),
        };
    }
    let mut after = backoff::delay(&policy.backoff, attempts);
    let mut pause_route = None;
    if let Some(asked) = retry_after {
        let asked = asked.min(policy.backoff.max());
        after = after.max(asked);
        pause_route = Some(asked);
    }
    if let Some(max_age) = policy.max_age {
        if age + after > max_age {
            return Verdict::Dead {
                reason: format!("{MAX_AGE} ({reason})"),
            };
        }
    }
    Verdict::Retry {
        after,
        reason,
        pause_route,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn policy() -> RetryPolicy {
        crate::config::from_str(
            "routes:\n  - name: a\n    upstream: http://127.0.0.1:9\n    deferrable: true\n    retry: { max_attempts: 5, max_age: 1h, backoff: { initial: 1s, max: 60s } }\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap()
        .routes[0]
            .retry
            .clone()
    }

    fn status(s: u16, h: &HeaderMap) -> Outcome<'_> {
        Outcome::Response {
            status: s,
            headers: h,
        }
    }

    #[test]
    fn two_hundreds_are_delivered_and_400_is_dead_at_once() {
        let h = HeaderMap::new();
        let p = policy();
        let now = SystemTime::now();
        assert_eq!(
            classify(&status(204, &h), &p, 1, Duration::ZERO, now),
            Verdict::Delivered
        );
        assert!(
            matches!(classify(&status(400, &h), &p, 1, Duration::ZERO, now), Verdict::Dead { reason } if reason == "status 400")
        );
    }

    #[test]
    fn retryable_until_max_attempts() {
        let h = HeaderMap::new();
        let p = policy();
        let now = SystemTime::now();
        assert!(matches!(
            classify(&status(503, &h), &p, 4, Duration::ZERO, now),
            Verdict::Retry { .. }
        ));
        assert!(
            matches!(classify(&status(503, &h), &p, 5, Duration::ZERO, now), Verdict::Dead { reason } if reason.starts_with("max_attempts"))
        );
        assert!(matches!(
            classify(
                &Outcome::Failed(FailureClass::Timeout),
                &p,
                1,
                Duration::ZERO,
                now
            ),
            Verdict::Retry { .. }
        ));
    }

    #[test]
    fn retry_after_wins_when_longer_capped_by_max_and_pauses_the_route() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("30"));
        let v = classify(
            &status(429, &h),
            &policy(),
            1,
            Duration::ZERO,
            SystemTime::now(),
        );
        assert_eq!(
            v,
            Verdict::Retry {
                after: Duration::from_secs(30),
                reason: "status 429".into(),
                pause_route: Some(Duration::from_secs(30))
            }
        );
        h.insert("retry-after", HeaderValue::from_static("100000"));
        let v = classify(
            &status(503, &h),
            &policy(),
            1,
            Duration::ZERO,
            SystemTime::now(),
        );
        assert!(matches!(v, Verdict::Retry { after, .. } if after == Duration::from_secs(60)));
    }

    #[test]
    fn a_retry_past_max_age_is_dead() {
        let h = HeaderMap::new();
        let v = classify(
            &status(503, &h),
            &policy(),
            1,
            Duration::from_secs(3600),
            SystemTime::now(),
        );
        assert!(matches!(v, Verdict::Dead { reason } if reason.starts_with("max_age")));
    }
}
