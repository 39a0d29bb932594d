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

/// A header value formatted on the stack and copied once into the value: no
/// intermediate `String` per header per response.
fn formatted(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    use std::io::Write;
    let mut buf = [0u8; 256];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    match cursor.write_fmt(args) {
        Ok(()) => {
            let len = cursor.position() as usize;
            HeaderValue::from_bytes(&buf[..len]).ok()
        }
        // Longer than the buffer (an unusually long tier name): take the slow path.
        Err(_) => HeaderValue::from_str(&args.to_string()).ok(),
    }
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
    if let Some(v) = formatted(format_args!(
        "\"{tier}\";q={};w={}",
        policy.capacity,
        policy.seconds_to_fill()
    )) {
        headers.insert(POLICY.clone(), v);
    }
    if let Some(v) = formatted(format_args!(
        "\"{tier}\";r={};t={reset}",
        decision.remaining
    )) {
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

    #[test]
    fn a_tier_name_longer_than_the_stack_buffer_still_gets_its_headers() {
        let tier = "t".repeat(300);
        let policy = BucketPolicy {
            tier: tier.as_str().into(),
            capacity: 7,
            refill_rate: 1.0,
        };
        let mut headers = HeaderMap::new();
        apply(
            &mut headers,
            &policy,
            &Decision::from_millis(true, 6_000, 1000, 0),
        );
        assert_eq!(headers["ratelimit-policy"], format!("\"{tier}\";q=7;w=7"));
        assert_eq!(headers["ratelimit"], format!("\"{tier}\";r=6;t=1"));
    }
}
