//! Routing and the two providers over real HTTP: exact upstream bodies, retries counted,
//! timeouts, and the 502/504 mapping.

use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::{chat_body, gemini_reply, ollama_reply, upstream_ok, GatewayProcess, TestApp};

const KEY: &str = "sk-provider-test";

async fn app(upstream: &MockServer, extra: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .keys(KEY)
        .ollama(upstream)
        .gemini(upstream, "gm-secret")
        .set("CACHE_TTL_SECONDS", "0")
        .set("RATE_LIMITER_CAPACITY", "1000")
        .settings(extra)
        .spawn()
        .await
}

/// An Ollama upstream that answers `first` for its first `times` calls, then `then`.
async fn ollama_answering(
    first: ResponseTemplate,
    times: u64,
    then: ResponseTemplate,
) -> MockServer {
    let upstream = MockServer::start().await;
    Mock::given(path("/api/chat"))
        .respond_with(first)
        .up_to_n_times(times)
        .with_priority(1)
        .mount(&upstream)
        .await;
    Mock::given(path("/api/chat"))
        .respond_with(then)
        .with_priority(2)
        .mount(&upstream)
        .await;
    upstream
}

async fn bodies(upstream: &MockServer) -> Vec<(String, Value)> {
    upstream
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.url.path().to_owned(),
                serde_json::from_slice(&r.body).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_routing_table_sends_each_request_to_the_right_upstream() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[]).await;
    let cases = [
        (json!({}), "ollama", "/api/chat"),
        (
            json!({"model_hint": "online"}),
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
        ),
        (
            json!({"model_hint": "gemini"}),
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
        ),
        (
            json!({"model_hint": "fast"}),
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
        ),
        (json!({"model_hint": "ollama"}), "ollama", "/api/chat"),
        (json!({"model_hint": "local"}), "ollama", "/api/chat"),
        (json!({"model_hint": "secure"}), "ollama", "/api/chat"),
        (json!({"model_hint": "anything"}), "ollama", "/api/chat"),
        (
            json!({"model": "local", "model_hint": "fast"}),
            "ollama",
            "/api/chat",
        ),
        (
            json!({"model": "fast", "model_hint": "local"}),
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
        ),
        (
            json!({"model": "gemini-1.5-pro"}),
            "gemini",
            "/v1beta/models/gemini-1.5-pro:generateContent",
        ),
    ];
    for (i, (extra, provider, upstream_path)) in cases.iter().enumerate() {
        let mut body = json!({"messages": [{"role": "user", "content": format!("case {i}")}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let response = app.chat(KEY, &body).await;
        assert_eq!(response.status(), 200, "{extra}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["provider"], *provider, "{extra}");
        let seen = bodies(&upstream).await;
        assert_eq!(seen.len(), i + 1);
        assert_eq!(seen[i].0, *upstream_path, "{extra}");
    }
}

#[tokio::test]
async fn ollama_receives_its_documented_chat_body() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[("OLLAMA_MODEL", "qwen2:7b")]).await;
    let request = json!({
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 64, "temperature": 0.2, "stream": true, "unknown": "ignored",
    });
    assert_eq!(app.chat(KEY, &request).await.status(), 200);
    let with_model =
        json!({"messages": [{"role": "user", "content": "hi"}], "model": "mistral:7b"});
    assert_eq!(app.chat(KEY, &with_model).await.status(), 200);
    let seen = bodies(&upstream).await;
    assert_eq!(
        seen[0].1,
        json!({
            "model": "qwen2:7b",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "stream": false,
            "options": {"temperature": 0.2, "num_predict": 64},
        })
    );
    assert_eq!(seen[1].1["model"], "mistral:7b");
}

#[tokio::test]
async fn gemini_receives_its_documented_body_and_key_header() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1beta/models/gemini-2.5-flash:generateContent"))
        .and(header("x-goog-api-key", "gm-secret"))
        .respond_with(ResponseTemplate::new(200).set_body_json(gemini_reply("g")))
        .expect(1)
        .mount(&upstream)
        .await;
    let app = app(&upstream, &[]).await;
    let request = json!({
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ],
        "model_hint": "fast", "max_tokens": 100, "temperature": 1.0,
    });
    let response = app.chat(KEY, &request).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["content"], "g");
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15})
    );
    let seen = bodies(&upstream).await;
    assert_eq!(
        seen[0].1,
        json!({
            "contents": [
                {"role": "user", "parts": [{"text": "hi"}]},
                {"role": "model", "parts": [{"text": "hello"}]},
                {"role": "user", "parts": [{"text": "again"}]},
            ],
            "systemInstruction": {"parts": [{"text": "be brief"}]},
            "generationConfig": {"temperature": 1.0, "maxOutputTokens": 100},
        })
    );
}

#[tokio::test]
async fn transient_failures_are_retried_until_success() {
    let upstream = ollama_answering(
        ResponseTemplate::new(500),
        2,
        ResponseTemplate::new(200).set_body_json(ollama_reply("third time")),
    )
    .await;
    let app = app(&upstream, &[]).await;
    let response = app.chat(KEY, &chat_body("x")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["content"],
        "third time"
    );
    assert_eq!(upstream.received_requests().await.unwrap().len(), 3);
    assert_eq!(
        app.metric("provider_calls_total{provider=\"ollama\"}")
            .await,
        3.0
    );
    assert_eq!(
        app.metric("provider_failures_total{provider=\"ollama\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn upstream_429_is_retried_but_other_4xx_are_not() {
    let upstream = ollama_answering(
        ResponseTemplate::new(429),
        1,
        ResponseTemplate::new(400).set_body_string("bad model secret-detail"),
    )
    .await;
    let app = app(&upstream, &[]).await;
    let response = app.chat(KEY, &chat_body("x")).await;
    assert_eq!(response.status(), 502);
    let detail = response.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("ollama") && detail.contains("400"),
        "{detail}"
    );
    assert!(
        !detail.contains("secret-detail"),
        "upstream bodies are not echoed"
    );
    assert_eq!(
        upstream.received_requests().await.unwrap().len(),
        2,
        "429 retried once, 400 not retried"
    );
}

#[tokio::test]
async fn exhausted_retries_give_502_naming_the_provider() {
    let upstream = MockServer::start().await;
    Mock::given(path("/api/chat"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&upstream)
        .await;
    let app = app(&upstream, &[("PROVIDER_MAX_RETRIES", "2")]).await;
    let response = app.chat(KEY, &chat_body("x")).await;
    assert_eq!(response.status(), 502);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_slow_provider_times_out_with_504() {
    let upstream = MockServer::start().await;
    Mock::given(path("/api/chat"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(ollama_reply("late"))
                .set_delay(std::time::Duration::from_secs(5)),
        )
        .mount(&upstream)
        .await;
    let app = app(
        &upstream,
        &[
            ("PROVIDER_TIMEOUT_SECONDS", "0.3"),
            ("PROVIDER_MAX_RETRIES", "1"),
        ],
    )
    .await;
    let started = std::time::Instant::now();
    let response = app.chat(KEY, &chat_body("x")).await;
    assert_eq!(response.status(), 504);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "attempts are bounded by the timeout"
    );
    let detail = response.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("ollama") && detail.contains("timed out"),
        "{detail}"
    );
    assert_eq!(
        upstream.received_requests().await.unwrap().len(),
        2,
        "timeouts are retried"
    );
}

#[tokio::test]
async fn an_unreachable_provider_gives_502() {
    let port = crate::common::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let app = TestApp::spawn(&[
        ("REDIS_URL", "memory://"),
        ("API_KEYS", KEY),
        ("OLLAMA_BASE_URL", url.as_str()),
        ("PROVIDER_MAX_RETRIES", "1"),
    ])
    .await;
    let response = app.chat(KEY, &chat_body("x")).await;
    assert_eq!(response.status(), 502);
    assert_eq!(
        app.metric("provider_calls_total{provider=\"ollama\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn gemini_without_a_key_is_a_clear_502() {
    let upstream = upstream_ok().await;
    let uri = upstream.uri();
    let app = TestApp::spawn(&[
        ("REDIS_URL", "memory://"),
        ("API_KEYS", KEY),
        ("GEMINI_BASE_URL", uri.as_str()),
    ])
    .await;
    let response = app
        .chat(
            KEY,
            &json!({"messages": [{"role": "user", "content": "x"}], "model_hint": "fast"}),
        )
        .await;
    assert_eq!(response.status(), 502);
    let detail = response.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("GEMINI_API_KEY"), "{detail}");
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_outbound_proxy_from_the_environment_carries_provider_calls() {
    // The "proxy" is a mock that answers Ollama's path; the configured upstream does not
    // resolve, so a 200 can only have come through the proxy.
    let proxy = upstream_ok().await;
    let gateway = GatewayProcess::start(&[
        ("REDIS_URL", "memory://"),
        ("API_KEYS", KEY),
        ("OLLAMA_BASE_URL", "http://upstream.invalid:9"),
        ("HTTP_PROXY", proxy.uri().as_str()),
        ("PROVIDER_MAX_RETRIES", "0"),
    ]);
    let response = gateway.chat(KEY, &chat_body("via proxy")).await;
    assert_eq!(response.status(), 200);
    let received = proxy.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].url.host_str(), Some("upstream.invalid"));
}
