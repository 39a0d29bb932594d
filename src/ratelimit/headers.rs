//! Rate-limit response headers, from the decision the script call returned (no second
//! round trip): the X-RateLimit-* trio, the IETF RateLimit pair and, on 429, Retry-After.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::{BucketPolicy, Decision};

static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

fn number(n: u64) -> HeaderValue {
    HeaderValue::from(n)
}

fn ceil_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// Adds the limit headers for `decision` under `policy` to `headers`.
pub fn apply(headers: &mut HeaderMap, policy: &BucketPolicy, decision: &Decision) {
    let reset = ceil_seconds(decision.reset_ms);
    headers.insert(X_LIMIT.clone(), number(policy.capacity));
    headers.insert(X_REMAINING.clone(), number(decision.remaining));
    headers.insert(X_RESET.clone(), number(reset));
    // Tier names are validated at load time to be header-safe tokens.
    let tier = &policy.tier;
    if let Ok(v) = HeaderValue::from_str(&format!(
        "\"{tier}\";q={};w={}",
        policy.capacity,
        policy.seconds_to_fill()
    )) {
        headers.insert(POLICY.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{tier}\";r={};t={reset}", decision.remaining))
    {
        headers.insert(RATELIMIT.clone(), v);
    }
    if !decision.allowed {
        headers.insert(
            axum::http::header::RETRY_AFTER,
            number(ceil_seconds(decision.retry_after_ms).max(1)),
        );
        headers.insert(
            RETRY_AFTER_MS.clone(),
            number(decision.retry_after_ms.max(1)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_decisions_carry_retry_after_of_at_least_one_second() {
        let policy = BucketPolicy {
            tier: "default".into(),
            capacity: 5,
            refill_rate: 2.0,
        };
        let mut headers = HeaderMap::new();
        apply(
            &mut headers,
            &policy,
            &Decision::from_millis(false, 400, 2300, 300),
        );
        assert_eq!(headers["x-ratelimit-limit"], "5");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        assert_eq!(headers["x-ratelimit-reset"], "3");
        assert_eq!(headers["ratelimit-policy"], "\"default\";q=5;w=3");
        assert_eq!(headers["ratelimit"], "\"default\";r=0;t=3");
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(headers["retry-after-ms"], "300");
    }

    #[test]
    fn allowed_decisions_have_no_retry_after() {
        let policy = BucketPolicy {
            tier: "gold".into(),
            capacity: 100,
            refill_rate: 10.0,
        };
        let mut headers = HeaderMap::new();
        apply(
            &mut headers,
            &policy,
            &Decision::from_millis(true, 99_000, 100, 0),
        );
        assert_eq!(headers["x-ratelimit-remaining"], "99");
        assert_eq!(headers["ratelimit"], "\"gold\";r=99;t=1");
        assert!(headers.get("retry-after").is_none());
    }
}
