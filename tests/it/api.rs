//! Every status code and body of CONTRACT §2, on both path forms.

use serde_json::{json, Value};

use crate::common::{chat_body, upstream_ok, RedisServer, TestApp};

const KEY: &str = "sk-test-api";

async fn app(
    redis: &RedisServer,
    upstream: &wiremock::MockServer,
    extra: &[(&str, &str)],
) -> TestApp {
    TestApp::builder()
        .store(&redis.url())
        .keys(&format!("{KEY}, sk-other ,"))
        .ollama(upstream)
        .gemini(upstream, "gm-key")
        .set("RATE_LIMITER_CAPACITY", "100")
        .settings(extra)
        .spawn()
        .await
}

#[tokio::test]
async fn chat_answers_with_the_original_response_shape_on_both_paths() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis, &upstream, &[("CACHE_TTL_SECONDS", "0")]).await;
    for path in ["/api/v1/chat", "/v1/chat"] {
        let response = app.chat_at(path, Some(KEY), &chat_body("hello")).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["x-cache"], "MISS");
        let body: Value = response.json().await.unwrap();
        let id = body["id"].as_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        assert_eq!(body["provider"], "ollama");
        assert_eq!(body["content"], "hi from ollama");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
        );
    }
    // The second configured key, trimmed, works too.
    assert_eq!(app.chat("sk-other", &chat_body("x")).await.status(), 200);
}

#[tokio::test]
async fn missing_or_wrong_keys_get_401_before_anything_else() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis, &upstream, &[("MAX_BODY_BYTES", "10")]).await;
    for key in [
        None,
        Some("sk-wrong"),
        Some(""),
        Some("sk-test-apiX"),
        Some("SK-TEST-API"),
    ] {
        for path in ["/api/v1/chat", "/v1/chat"] {
            // Even an oversized, invalid body is a 401 first.
            let response = app
                .chat_at(path, key, &json!({"junk": "x".repeat(100)}))
                .await;
            assert_eq!(response.status(), 401, "{key:?} {path}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body, json!({"detail": "Invalid or missing API Key"}));
        }
    }
    assert!(upstream.received_requests().await.unwrap().is_empty());
    assert!(
        redis.keys().is_empty(),
        "no limiter call for unauthenticated requests"
    );
}

#[tokio::test]
async fn rate_limit_comes_before_body_checks_and_answers_429() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(
        &redis,
        &upstream,
        &[
            ("RATE_LIMITER_CAPACITY", "2"),
            ("RATE_LIMITER_REFILL_RATE", "0.01"),
        ],
    )
    .await;
    assert_eq!(app.chat(KEY, &chat_body("a")).await.status(), 200);
    assert_eq!(app.chat(KEY, &json!({"not": "valid"})).await.status(), 422);
    let response = app.chat(KEY, &json!({"not": "valid"})).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"detail": "Too many requests. Please wait before trying again."})
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_and_never_reach_a_provider() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis, &upstream, &[]).await;
    let big = chat_body(&"x".repeat(1024 * 1024));
    let response = app.chat(KEY, &big).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("1048576"));

    // A chunked body (no Content-Length) is bounded the same way.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..300).map(|_| Ok(vec![b' '; 4096])).collect();
    let response = app
        .client
        .post(format!("{}/v1/chat", app.url))
        .header("X-API-Key", KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn invalid_bodies_get_fastapi_shaped_422() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis, &upstream, &[]).await;
    let cases = [
        (json!({}), json!(["body", "messages"]), "missing"),
        (
            json!({"messages": []}),
            json!(["body", "messages"]),
            "too_short",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            json!(["body", "messages", 0, "content"]),
            "missing",
        ),
        (
            json!({"messages": [{"role": "u", "content": "c"}], "max_tokens": 0}),
            json!(["body", "max_tokens"]),
            "greater_than_equal",
        ),
        (
            json!({"messages": [{"role": "u", "content": "c"}], "temperature": 3}),
            json!(["body", "temperature"]),
            "less_than_equal",
        ),
    ];
    for (body, loc, kind) in cases {
        let response = app.chat(KEY, &body).await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let detail: Value = response.json().await.unwrap();
        assert_eq!(detail["detail"][0]["loc"], loc, "{body}");
        assert_eq!(detail["detail"][0]["type"], kind, "{body}");
        assert!(detail["detail"][0]["msg"].is_string());
    }
    let response = app
        .client
        .post(format!("{}/api/v1/chat", app.url))
        .header("X-API-Key", KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let detail: Value = response.json().await.unwrap();
    assert_eq!(detail["detail"][0]["type"], "json_invalid");
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_404_and_405() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis, &upstream, &[]).await;
    let response = app.get("/api/v2/nothing").await;
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"detail": "Not Found"})
    );
    for path in ["/api/v1/chat", "/v1/chat"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 405);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            json!({"detail": "Method Not Allowed"})
        );
    }
    let response = app
        .client
        .post(format!("{}/health", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
}

#[tokio::test]
async fn health_ready_metrics_and_openapi_answer_on_both_paths() {
    let mut redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis, &upstream, &[("REDIS_TIMEOUT_MS", "200")]).await;
    for path in ["/api/v1/health", "/health"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            json!({"status": "ok"})
        );
    }
    for path in ["/api/v1/metrics", "/metrics"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert!(response
            .text()
            .await
            .unwrap()
            .contains("rate_limit_allowed_total"));
    }
    let openapi: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/chat",
        "/v1/chat",
        "/health",
        "/api/v1/ready",
        "/metrics",
    ] {
        assert!(
            openapi["paths"][path].is_object(),
            "{path} missing from openapi"
        );
    }
    for path in ["/api/v1/ready", "/ready"] {
        assert_eq!(app.get(path).await.status(), 200);
    }
    redis.stop();
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"]["redis"], "down");
    assert!(body["detail"].as_str().unwrap().contains("redis"));
    // Liveness does not depend on Redis.
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn a_byte_order_mark_and_pydantics_lax_values_are_accepted_as_documented() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis, &upstream, &[]).await;
    let send = |body: Vec<u8>| {
        app.client
            .post(format!("{}/api/v1/chat", app.url))
            .header("X-API-Key", KEY)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    let mut with_bom = b"\xEF\xBB\xBF".to_vec();
    with_bom.extend_from_slice(br#"{"messages":[{"role":"user","content":"bom"}]}"#);
    assert_eq!(send(with_bom).await.unwrap().status(), 200);
    // The lax forms the OpenAPI document states: digit strings, whole floats, plain
    // decimal strings, boolean words, and null for the default.
    for lax in [
        r#""max_tokens":"64""#,
        r#""max_tokens":" +0064 ""#,
        r#""max_tokens":64.0"#,
        r#""max_tokens":null"#,
        r#""temperature":"0.5""#,
        r#""temperature":".5""#,
        r#""temperature":null"#,
        r#""stream":"yes""#,
        r#""stream":1"#,
        r#""stream":null"#,
    ] {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"lax"}}],{lax}}}"#);
        assert_eq!(
            send(body.into_bytes()).await.unwrap().status(),
            200,
            "{lax}"
        );
    }
    // And nothing beyond them.
    for strict in [
        r#""max_tokens":"4294967296""#,
        r#""max_tokens":"6.4e1""#,
        r#""max_tokens":"""#,
        r#""temperature":"1e0""#,
        r#""temperature":"2.5""#,
        r#""temperature":"-0""#,
        r#""stream":"maybe""#,
        r#""stream":2"#,
    ] {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"lax"}}],{strict}}}"#);
        assert_eq!(
            send(body.into_bytes()).await.unwrap().status(),
            422,
            "{strict}"
        );
    }
}
