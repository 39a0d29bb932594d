//! Property-based fuzzing of the request path: body parsing and validation, cache-key
//! canonicalisation, settings parsing, auth and forwarding headers, limit headers.
//!
//! CI runs proptest's default 256 cases per property; a longer campaign:
//! `PROPTEST_CASES=20000 cargo test --test it properties`. Failures found are saved in
//! `proptest-regressions/` and replayed first on every run.

use axum::http::{HeaderMap, HeaderValue};
use llm_gateway::api::auth::{bearer_or_api_key, client_ip, AuthConfig};
use llm_gateway::api::limit_headers as headers;
use llm_gateway::api::original::schema::parse_chat_request;
use llm_gateway::api::original::ApiError;
use llm_gateway::cache::cache_key;
use llm_gateway::domain::{ChatRequest, Message};
use llm_gateway::ratelimit::{BucketPolicy, Decision};
use llm_gateway::settings::Settings;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Arbitrary JSON values, nested a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    Just("messages".to_string()),
                    Just("role".to_string()),
                    Just("content".to_string()),
                    Just("model".to_string()),
                    Just("max_tokens".to_string()),
                    Just("temperature".to_string()),
                    Just("stream".to_string()),
                    ".{0,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn any_message() -> impl Strategy<Value = Message> {
    (
        prop_oneof![
            Just("user".to_string()),
            Just("assistant".to_string()),
            Just("system".to_string()),
            ".{0,6}"
        ],
        ".{0,40}",
    )
        .prop_map(|(role, content)| Message::text(role, content))
}

fn any_request() -> impl Strategy<Value = ChatRequest> {
    (
        prop::collection::vec(any_message(), 1..4),
        prop::option::of(".{0,10}"),
        prop::option::of(".{0,10}"),
        1u64..100_000,
        (0u32..=200).prop_map(|t| f64::from(t) / 100.0),
        any::<bool>(),
    )
        .prop_map(
            |(messages, model, model_hint, max_tokens, temperature, stream)| ChatRequest {
                messages,
                model,
                model_hint,
                max_tokens: Some(max_tokens),
                temperature,
                stream,
                sampling: Default::default(),
                tools: Vec::new(),
                tool_choice: Default::default(),
                strict_model: false,
                passthrough: Default::default(),
            },
        )
}

fn to_body(r: &ChatRequest) -> Vec<u8> {
    json!({
        "messages": r.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(), "model": r.model, "model_hint": r.model_hint,
        "max_tokens": r.max_tokens.unwrap_or(0), "temperature": r.temperature, "stream": r.stream,
    })
    .to_string()
    .into_bytes()
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_fail_only_as_422(
        body in prop::collection::vec(any::<u8>(), 0..512),
        content_type in prop::option::of(prop_oneof![
            Just("application/json".to_string()),
            Just("text/plain".to_string()),
            Just("application/x+json; charset=x".to_string()),
            ".{0,20}"
        ]),
    ) {
        match parse_chat_request(&body, content_type.as_deref()) {
            Ok(_) | Err(ApiError::Validation(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }

    #[test]
    fn arbitrary_json_is_accepted_or_rejected_with_located_errors(value in any_json()) {
        let body = value.to_string();
        if let Err(error) = parse_chat_request(body.as_bytes(), None) {
            let ApiError::Validation(errors) = error else {
                return Err(TestCaseError::fail("not a validation error"));
            };
            prop_assert!(!errors.is_empty());
            for e in errors {
                prop_assert_eq!(&e.loc[0], &json!("body"));
                prop_assert!(!e.msg.is_empty());
            }
        }
    }

    #[test]
    fn valid_requests_round_trip_through_the_parser(request in any_request()) {
        let parsed = parse_chat_request(&to_body(&request), Some("application/json")).unwrap();
        prop_assert_eq!(parsed, request);
    }

    #[test]
    fn cache_keys_are_equal_exactly_when_the_answer_shaping_fields_are(a in any_request(), b in any_request()) {
        let same_fields = a.messages == b.messages && a.model == b.model && a.model_hint == b.model_hint
            && a.max_tokens == b.max_tokens && a.temperature == b.temperature;
        prop_assert_eq!(cache_key(&a) == cache_key(&b), same_fields);
        let streamed = ChatRequest { stream: !a.stream, ..a.clone() };
        prop_assert_eq!(cache_key(&a), cache_key(&streamed));
    }

    #[test]
    fn settings_never_panic_and_errors_are_one_line(
        name in prop_oneof![
            Just("PORT"), Just("RATE_LIMITER_CAPACITY"), Just("RATE_LIMITER_REFILL_RATE"),
            Just("REDIS_URL"), Just("RATE_LIMITER_TIERS"), Just("API_KEY_TIERS"), Just("TRUSTED_PROXIES"),
            Just("PROVIDER_TIMEOUT_SECONDS"), Just("RATE_LIMITER_FAILURE_MODE"), Just("LOG_LEVEL"),
            Just("OLLAMA_BASE_URL"), Just("MAX_BODY_BYTES"), Just("ALLOW_ANONYMOUS"), Just("API_KEYS")
        ],
        value in "[ -~]{0,30}",
    ) {
        if let Err(error) = Settings::from_pairs(&[(name, value.as_str())]) {
            let text = error.to_string();
            prop_assert!(!text.contains('\n'), "{}", text);
            prop_assert!(text.starts_with("invalid configuration"));
        }
    }

    #[test]
    fn identity_headers_never_panic(
        key in prop::collection::vec(any::<u8>(), 0..64),
        forwarded in prop::collection::vec(any::<u8>(), 0..64),
        peer in any::<[u8; 16]>(),
    ) {
        let settings = Settings::from_pairs(&[
            ("API_KEYS", "sk-a"), ("ALLOW_ANONYMOUS", "true"), ("TRUSTED_PROXIES", "::/0, 0.0.0.0/0"),
        ]).unwrap();
        let auth = AuthConfig::from_settings(&settings).unwrap();
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&key) { h.insert("x-api-key", v.clone()); h.insert("authorization", v); }
        if let Ok(v) = HeaderValue::from_bytes(&forwarded) { h.insert("x-forwarded-for", v); }
        let peer = std::net::IpAddr::from(peer);
        let presented = bearer_or_api_key(&h).and_then(Result::ok);
        let _ = auth.identify(presented, &h, Some(peer));
        let _ = client_ip(&h, peer, &["::/0".parse().unwrap()]);
    }

    #[test]
    fn limit_headers_are_always_valid(
        capacity in 1u64..u64::MAX / 2,
        rate in 1e-6f64..1e9,
        allowed in any::<bool>(),
        milli in any::<u32>(), reset in any::<u32>(), retry in any::<u32>(),
        tier in "[a-z0-9_-]{1,12}",
    ) {
        let policy = BucketPolicy { tier: tier.into(), capacity, refill_rate: rate, tokens: Default::default() };
        let mut h = HeaderMap::new();
        headers::apply(&mut h, &policy, &Decision::from_millis(allowed, u64::from(milli), u64::from(reset), u64::from(retry)));
        prop_assert!(h.contains_key("ratelimit") && h.contains_key("ratelimit-policy"));
        if !allowed {
            let after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            prop_assert!(after >= 1);
        }
    }
}
