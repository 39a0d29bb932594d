//! Rate-limit response headers, from the decision the script call returned (no second
//! round trip): the X-RateLimit-* trio, the IETF RateLimit pair naming every policy that
//! applies (requests, and the token bucket and budget when the tier has them), each SDK
//! door's own request and token headers and, on 429, Retry-After.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::ratelimit::period::Span;
use crate::ratelimit::{BucketPolicy, Decision};
use crate::telemetry::log_format::rfc3339;

static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

fn number(n: u64) -> HeaderValue {
    HeaderValue::from(n)
}

/// `"<tier>";<a>=<x>;<b>=<y>`, built with one allocation and no formatting machinery
/// (two `format_args!` per response were ~2k instructions in callgrind).
fn tier_value(tier: &str, a: &str, x: u64, b: &str, y: u64) -> Option<HeaderValue> {
    let mut value = Vec::with_capacity(tier.len() + a.len() + b.len() + 46);
    value.push(b'"');
    value.extend_from_slice(tier.as_bytes());
    value.extend_from_slice(b"\";");
    value.extend_from_slice(a.as_bytes());
    value.push(b'=');
    push_decimal(&mut value, x);
    value.push(b';');
    value.extend_from_slice(b.as_bytes());
    value.push(b'=');
    push_decimal(&mut value, y);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn ceil_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

static OPENAI_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static OPENAI_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static OPENAI_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

/// Adds, beside [`apply`]'s, OpenAI's request-limit headers: `x-ratelimit-limit-requests`,
/// `-remaining-requests` and `-reset-requests` (a Go-style duration, as OpenAI writes it).
pub fn apply_openai(headers: &mut HeaderMap, policy: &BucketPolicy, decision: &Decision) {
    apply(headers, policy, decision);
    headers.insert(OPENAI_LIMIT.clone(), number(policy.capacity));
    headers.insert(OPENAI_REMAINING.clone(), number(decision.remaining));
    if let Ok(reset) = HeaderValue::from_str(&go_duration(decision.reset_ms)) {
        headers.insert(OPENAI_RESET.clone(), reset);
    }
    if let Some(tokens) = &decision.tokens {
        headers.insert(
            OPENAI_LIMIT_TOKENS.clone(),
            number(policy.tokens.per_minute),
        );
        headers.insert(OPENAI_REMAINING_TOKENS.clone(), number(tokens.remaining));
        if let Ok(reset) = HeaderValue::from_str(&go_duration(tokens.reset_ms)) {
            headers.insert(OPENAI_RESET_TOKENS.clone(), reset);
        }
    }
}

static OPENAI_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static OPENAI_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
static OPENAI_RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

static ANTHROPIC_LIMIT: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-limit");
static ANTHROPIC_REMAINING: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-requests-remaining");
static ANTHROPIC_RESET: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-reset");

/// Adds, beside [`apply`]'s, Anthropic's request-limit headers:
/// `anthropic-ratelimit-requests-limit`, `-remaining` and `-reset` (when the bucket is
/// full again, as an RFC 3339 time), and with a token bucket the same three of
/// `anthropic-ratelimit-tokens-*`.
pub fn apply_anthropic(headers: &mut HeaderMap, policy: &BucketPolicy, decision: &Decision) {
    apply(headers, policy, decision);
    headers.insert(ANTHROPIC_LIMIT.clone(), number(policy.capacity));
    headers.insert(ANTHROPIC_REMAINING.clone(), number(decision.remaining));
    let at = |ms: u64| {
        let time = std::time::SystemTime::now() + std::time::Duration::from_millis(ms);
        HeaderValue::from_str(&rfc3339(time)).ok()
    };
    if let Some(reset) = at(decision.reset_ms) {
        headers.insert(ANTHROPIC_RESET.clone(), reset);
    }
    if let Some(tokens) = &decision.tokens {
        headers.insert(
            ANTHROPIC_LIMIT_TOKENS.clone(),
            number(policy.tokens.per_minute),
        );
        headers.insert(ANTHROPIC_REMAINING_TOKENS.clone(), number(tokens.remaining));
        if let Some(reset) = at(tokens.reset_ms) {
            headers.insert(ANTHROPIC_RESET_TOKENS.clone(), reset);
        }
    }
}

static ANTHROPIC_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-limit");
static ANTHROPIC_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining");
static ANTHROPIC_RESET_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-reset");

/// A duration as Go's `time.Duration` prints it, to the millisecond: `0s`, `12ms`,
/// `1.5s`, `6m0s`, `1h2m3s`.
pub fn go_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let seconds = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        let text = format!("{}.{:03}", rest / 1000, rest % 1000);
        format!("{}s", text.trim_end_matches('0'))
    };
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

/// Adds the limit headers for `decision` under `policy` to `headers`.
pub fn apply(headers: &mut HeaderMap, policy: &BucketPolicy, decision: &Decision) {
    let reset = ceil_seconds(decision.reset_ms);
    headers.insert(X_LIMIT.clone(), number(policy.capacity));
    headers.insert(X_REMAINING.clone(), number(decision.remaining));
    headers.insert(X_RESET.clone(), number(reset));
    // Tier names are validated at load time to be header-safe tokens.
    let tier = &policy.tier;
    if decision.tokens.is_none() && decision.budget.is_none() {
        if let Some(v) = tier_value(tier, "q", policy.capacity, "w", policy.seconds_to_fill()) {
            headers.insert(POLICY.clone(), v);
        }
        if let Some(v) = tier_value(tier, "r", decision.remaining, "t", reset) {
            headers.insert(RATELIMIT.clone(), v);
        }
    } else {
        with_token_policies(headers, policy, decision, reset);
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

/// The IETF pair when token limits apply: one list member per policy, the requests'
/// under the tier's name, then `<tier>-tokens` (the bucket, over a minute) and
/// `<tier>-budget` (over its period). Written into two buffers without formatting
/// machinery, like [`tier_value`].
fn with_token_policies(
    headers: &mut HeaderMap,
    policy: &BucketPolicy,
    decision: &Decision,
    reset: u64,
) {
    let tier = policy.tier.as_bytes();
    let mut policies = Vec::with_capacity(3 * (tier.len() + 40));
    let mut states = Vec::with_capacity(3 * (tier.len() + 40));
    let mut add = |suffix: &[u8], quota: u64, window: u64, remaining: u64, reset: u64| {
        if !policies.is_empty() {
            policies.extend_from_slice(b", ");
            states.extend_from_slice(b", ");
        }
        for (out, a, x, b, y) in [
            (&mut policies, &b"q"[..], quota, &b"w"[..], window),
            (&mut states, &b"r"[..], remaining, &b"t"[..], reset),
        ] {
            out.push(b'"');
            out.extend_from_slice(tier);
            out.extend_from_slice(suffix);
            out.extend_from_slice(b"\";");
            out.extend_from_slice(a);
            out.push(b'=');
            push_decimal(out, x);
            out.push(b';');
            out.extend_from_slice(b);
            out.push(b'=');
            push_decimal(out, y);
        }
    };
    add(
        b"",
        policy.capacity,
        policy.seconds_to_fill(),
        decision.remaining,
        reset,
    );
    if let Some(tokens) = &decision.tokens {
        let reset = ceil_seconds(tokens.reset_ms);
        add(
            b"-tokens",
            policy.tokens.per_minute,
            60,
            tokens.remaining,
            reset,
        );
    }
    if let Some(budget) = &decision.budget {
        let window = Span::now(policy.tokens.period).seconds();
        let reset = ceil_seconds(budget.reset_ms);
        add(
            b"-budget",
            policy.tokens.budget,
            window,
            budget.remaining,
            reset,
        );
    }
    for (name, list) in [(&POLICY, policies), (&RATELIMIT, states)] {
        if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(list)) {
            headers.insert(name.clone(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_are_written_as_go_writes_them() {
        for (ms, text) in [
            (0, "0s"),
            (12, "12ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (1250, "1.25s"),
            (59_999, "59.999s"),
            (360_000, "6m0s"),
            (3_723_000, "1h2m3s"),
        ] {
            assert_eq!(super::go_duration(ms), text);
        }
    }

    use super::*;
    use crate::ratelimit::Left;

    fn policy(tier: &str, capacity: u64, refill_rate: f64) -> BucketPolicy {
        BucketPolicy {
            tier: tier.into(),
            capacity,
            refill_rate,
            tokens: crate::ratelimit::TokenLimits::default(),
        }
    }

    /// The headers `apply` writes for `decision` under `policy`.
    fn headers_for(policy: &BucketPolicy, decision: Decision) -> HeaderMap {
        let mut headers = HeaderMap::new();
        apply(&mut headers, policy, &decision);
        headers
    }

    #[test]
    fn denied_decisions_carry_retry_after_of_at_least_one_second() {
        let headers = headers_for(
            &policy("default", 5, 2.0),
            Decision::from_millis(false, 400, 2300, 300),
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
        let headers = headers_for(
            &policy("gold", 100, 10.0),
            Decision::from_millis(true, 99_000, 100, 0),
        );
        assert_eq!(headers["x-ratelimit-remaining"], "99");
        assert_eq!(headers["ratelimit"], "\"gold\";r=99;t=1");
        assert!(headers.get("retry-after").is_none());
    }

    #[test]
    fn long_tier_names_and_large_numbers_are_written_whole() {
        let tier = "t".repeat(300);
        let policy = policy(&tier, u64::MAX, 1.0);
        let headers = headers_for(
            &policy,
            Decision::from_millis(true, 6_000, 10_000_000_000, 0),
        );
        let fill = policy.seconds_to_fill();
        assert_eq!(
            headers["ratelimit-policy"],
            format!("\"{tier}\";q={};w={fill}", u64::MAX)
        );
        assert_eq!(headers["ratelimit"], format!("\"{tier}\";r=6;t=10000000"));
    }

    #[test]
    fn token_limits_add_their_headers_and_name_every_policy() {
        let mut policy = policy("gold", 10, 1.0);
        policy.tokens = crate::ratelimit::TokenLimits {
            per_minute: 6000,
            budget: 100_000,
            period: crate::settings::BudgetPeriod::Day,
            default_max_tokens: 1024,
        };
        let mut decision = Decision::from_millis(false, 9_000, 1_000, 0);
        decision.tokens = Some(Left {
            remaining: 0,
            reset_ms: 61_500,
        });
        decision.budget = Some(Left {
            remaining: 250,
            reset_ms: 3_600_001,
        });
        decision.retry_after_ms = 2_500;
        let mut headers = HeaderMap::new();
        apply_openai(&mut headers, &policy, &decision);
        assert_eq!(headers["x-ratelimit-limit-tokens"], "6000");
        assert_eq!(headers["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(headers["x-ratelimit-reset-tokens"], "1m1.5s");
        assert_eq!(
            headers["ratelimit-policy"],
            "\"gold\";q=10;w=10, \"gold-tokens\";q=6000;w=60, \"gold-budget\";q=100000;w=86400"
        );
        assert_eq!(
            headers["ratelimit"],
            "\"gold\";r=9;t=1, \"gold-tokens\";r=0;t=62, \"gold-budget\";r=250;t=3601"
        );
        assert_eq!(headers["retry-after"], "3");

        let mut headers = HeaderMap::new();
        apply_anthropic(&mut headers, &policy, &decision);
        assert_eq!(headers["anthropic-ratelimit-tokens-limit"], "6000");
        assert_eq!(headers["anthropic-ratelimit-tokens-remaining"], "0");
        let reset = headers["anthropic-ratelimit-tokens-reset"]
            .to_str()
            .unwrap();
        assert!(reset.ends_with('Z') && reset.len() >= 20, "{reset}");

        // A budget alone: the pair names it, and no token-bucket headers are invented.
        policy.tokens.per_minute = 0;
        decision.tokens = None;
        let mut headers = HeaderMap::new();
        apply_openai(&mut headers, &policy, &decision);
        assert!(headers.get("x-ratelimit-limit-tokens").is_none());
        assert_eq!(
            headers["ratelimit-policy"],
            "\"gold\";q=10;w=10, \"gold-budget\";q=100000;w=86400"
        );
    }
}
