//! The OpenAI door over real HTTP, against `mock-llm` (and wiremock where a test needs
//! to script the upstream): shapes, SSE framing, cache replay, disconnects, failures
//! mid-stream, keep-alive comments, retries only before the first byte, and errors.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{MockLlm, TestApp};

const KEY: &str = "sk-openai-door";

async fn gateway(mock: &MockLlm, extra: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .keys(KEY)
        .set("OLLAMA_BASE_URL", mock.url.as_str())
        .set("GEMINI_BASE_URL", mock.url.as_str())
        .set("GEMINI_API_KEY", "gm-key")
        .set("RATE_LIMITER_CAPACITY", "1000")
        .settings(extra)
        .spawn()
        .await
}

fn request(content: &str, stream: bool) -> Value {
    let mut body = json!({"model": "llama3.1", "messages": [{"role": "user", "content": content}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn post(app: &TestApp, body: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body, in order (comments left out).
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The text of a stream's deltas, joined.
fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn a_completion_has_openais_shape_and_a_repeat_is_a_hit_with_the_same_bytes() {
    let mock = MockLlm::start(&[]);
    let app = gateway(&mock, &[]).await;
    let first = post(&app, &request("what is rust", false)).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache"], "MISS");
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "1000");
    assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "999");
    let first = first.bytes().await.unwrap();
    let body: Value = serde_json::from_slice(&first).unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "llama3.1");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Echo: what is rust"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 3 + 4);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = post(&app, &request("what is rust", false)).await;
    assert_eq!(again.headers()["x-cache"], "HIT");
    assert_eq!(
        again.bytes().await.unwrap(),
        first,
        "the stored bytes, same id"
    );
    // The original door keeps its own entries: the same question there is a miss.
    let original = app
        .chat(KEY, &json!({"messages": [{"role": "user", "content": "what is rust"}], "model": "llama3.1"}))
        .await;
    assert_eq!(original.headers()["x-cache"], "MISS");
}

#[tokio::test]
async fn a_stream_is_framed_as_openai_frames_it_and_a_repeat_is_replayed_from_the_cache() {
    let mock = MockLlm::start(&["--chunks", "3"]);
    let app = gateway(&mock, &[]).await;
    let response = post(&app, &request("stream me please", true)).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(headers["x-cache"], "MISS");
    assert_eq!(headers["x-ratelimit-remaining"], "999");
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let events = events(&body);
    assert_eq!(
        events.len(),
        3 + 3,
        "three deltas, the finish, the usage, [DONE]: {body}"
    );
    let parsed: Vec<Value> = events[..5]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = parsed[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &parsed {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id, "one id for the whole stream");
    }
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(parsed[1]["choices"][0]["delta"].get("role").is_none());
    assert_eq!(streamed_text(&events), "Echo: stream me please");
    assert_eq!(parsed[3]["choices"][0]["finish_reason"], "stop");
    for chunk in &parsed[..4] {
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
    }
    assert_eq!(parsed[4]["choices"], json!([]));
    assert_eq!(parsed[4]["usage"]["completion_tokens"], 4);

    // The finished stream was stored: the same request, streamed or not, is a hit.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let replayed = post(&app, &request("stream me please", true)).await;
    assert_eq!(replayed.headers()["x-cache"], "HIT");
    let replayed = replayed.text().await.unwrap();
    assert!(replayed.ends_with("data: [DONE]\n\n"));
    let replayed_events = self::events(&replayed);
    assert_eq!(streamed_text(&replayed_events), "Echo: stream me please");
    let first: Value = serde_json::from_str(&replayed_events[0]).unwrap();
    assert_eq!(first["id"], id, "the stored answer keeps its id");
    let whole = post(&app, &request("stream me please", false)).await;
    assert_eq!(whole.headers()["x-cache"], "HIT");
    let whole: Value = whole.json().await.unwrap();
    assert_eq!(
        whole["choices"][0]["message"]["content"],
        "Echo: stream me please"
    );
    assert_eq!(
        mock_streams(&mock).await["started"],
        1,
        "one upstream stream for all three"
    );
}

async fn mock_streams(mock: &MockLlm) -> Value {
    reqwest::get(format!("{}/_mock/streams", mock.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_call_and_its_tokens_are_counted() {
    let mock = MockLlm::start(&["--chunk-delay-ms", "200"]);
    let app = gateway(&mock, &[("CACHE_TTL_SECONDS", "0")]).await;
    let long = "word ".repeat(100);
    let body = serde_json::to_string(&request(&long, true)).unwrap();
    let mut stream = TcpStream::connect(app.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"word ") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    let dropped = Instant::now();
    loop {
        let counts = mock_streams(&mock).await;
        if counts["cancelled"] == 1 {
            break;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(1),
            "the upstream still streams 1 s after the client left: {counts}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mock_streams(&mock).await["completed"], 0);
    // Counted as estimated: the upstream's own count never came.
    let deadline = Instant::now() + Duration::from_secs(2);
    while app
        .metric("tokens_total{kind=\"completion\",provider=\"ollama\"}")
        .await
        == 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the cut stream's tokens were never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        app.metric("tokens_total{kind=\"prompt\",provider=\"ollama\"}")
            .await
            >= 100.0
    );
}

#[tokio::test]
async fn an_upstream_failure_after_the_first_byte_is_an_error_event_and_no_done() {
    let mock = MockLlm::start(&["--fail-after", "2", "--chunk-delay-ms", "50"]);
    let app = gateway(&mock, &[("PROVIDER_MAX_RETRIES", "3")]).await;
    let response = post(&app, &request("break this stream now", true)).await;
    assert_eq!(
        response.status(),
        200,
        "the head went out with the first byte"
    );
    let body = response.text().await.unwrap();
    let events = events(&body);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{body}");
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ollama"));
    assert!(!body.contains("[DONE]"), "{body}");
    assert!(streamed_text(&events).starts_with("Echo: "));
    assert_eq!(
        app.metric("provider_calls_total{provider=\"ollama\"}")
            .await,
        1.0,
        "no retry after the first byte"
    );
}

#[tokio::test]
async fn a_stream_that_goes_silent_is_ended_by_the_attempt_timeout() {
    let mock = MockLlm::start(&["--hang-after", "1"]);
    let app = gateway(&mock, &[("PROVIDER_TIMEOUT_SECONDS", "0.5")]).await;
    let started = Instant::now();
    let body = post(&app, &request("hang after one", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        body.contains("\"error\"") && body.contains("sent nothing"),
        "{body}"
    );
    assert!(!body.contains("[DONE]"));
}

#[tokio::test]
async fn silence_before_the_next_token_is_filled_with_keep_alive_comments() {
    let mock = MockLlm::start(&["--chunk-delay-ms", "700"]);
    let app = gateway(&mock, &[("STREAM_KEEP_ALIVE_SECONDS", "0.2")]).await;
    let body = post(&app, &request("slow model", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(body.contains("\n\n: keep-alive\n\n"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert_eq!(streamed_text(&events(&body)), "Echo: slow model");
}

#[tokio::test]
async fn a_failed_start_is_retried_before_the_first_byte() {
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let upstream = MockServer::start().await;
    Mock::given(path("/api/chat"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    let ndjson = "{\"message\":{\"content\":\"after \"},\"done\":false}\n\
                  {\"message\":{\"content\":\"a retry\"},\"done\":false}\n\
                  {\"message\":{\"content\":\"\"},\"done\":true,\"prompt_eval_count\":2,\"eval_count\":3}\n";
    Mock::given(path("/api/chat"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(ndjson, "application/x-ndjson"))
        .mount(&upstream)
        .await;
    let app = TestApp::builder().keys(KEY).ollama(&upstream).spawn().await;
    let body = post(&app, &request("retry me", true))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(streamed_text(&events(&body)), "after a retry");
    assert!(body.ends_with("data: [DONE]\n\n"));
    let sent: Vec<Value> = upstream
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1]["stream"], true);
}

#[tokio::test]
async fn gemini_streams_through_the_same_door() {
    let mock = MockLlm::start(&["--chunks", "2"]);
    let app = gateway(&mock, &[]).await;
    let mut body = request("hello gemini", true);
    body["model"] = json!("gemini-2.5-flash");
    let text = post(&app, &body).await.text().await.unwrap();
    let events = events(&text);
    assert_eq!(streamed_text(&events), "Echo: hello gemini");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 2, "from usageMetadata");
    assert_eq!(usage["model"], "gemini-2.5-flash");
}

#[tokio::test]
async fn errors_use_openais_envelope_with_the_right_status() {
    let mock = MockLlm::start(&["--fail-status", "500"]);
    let app = gateway(
        &mock,
        &[
            ("MAX_BODY_BYTES", "2000"),
            ("PROVIDER_MAX_RETRIES", "1"),
            ("RATE_LIMITER_CAPACITY", "1000"),
        ],
    )
    .await;
    let url = format!("{}/v1/chat/completions", app.url);
    let unauthorized = app
        .client
        .post(&url)
        .bearer_auth("sk-wrong")
        .json(&request("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(unauthorized.headers()["x-should-retry"], "false");
    let error: Value = unauthorized.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key");
    // X-API-Key works as well as a bearer token.
    let with_header = app
        .client
        .post(&url)
        .header("x-api-key", KEY)
        .json(&json!({"model": "llama3.1", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(with_header.status(), 400);
    let error: Value = with_header.json().await.unwrap();
    assert_eq!(error["error"]["param"], "messages");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let too_large = post(&app, &request(&"x".repeat(3000), false)).await;
    assert_eq!(too_large.status(), 413);
    let error: Value = too_large.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let failed = post(&app, &request("fails upstream", false)).await;
    assert_eq!(failed.status(), 502);
    assert_eq!(
        failed.headers()["x-should-retry"],
        "false",
        "our retries are spent"
    );
    let error: Value = failed.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    let failed_stream = post(&app, &request("fails upstream", true)).await;
    assert_eq!(
        failed_stream.status(),
        502,
        "a stream that never started is a plain error"
    );
    let unknown = app
        .client
        .get(format!("{}/v1/models/no-such-model", app.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let error: Value = unknown.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn an_empty_bucket_is_a_429_the_sdks_can_wait_out() {
    let mock = MockLlm::start(&[]);
    let app = gateway(
        &mock,
        &[
            ("RATE_LIMITER_CAPACITY", "1"),
            ("RATE_LIMITER_REFILL_RATE", "0.5"),
        ],
    )
    .await;
    assert_eq!(post(&app, &request("one", false)).await.status(), 200);
    let limited = post(&app, &request("two", false)).await;
    assert_eq!(limited.status(), 429);
    let headers = limited.headers().clone();
    assert!(headers.get("x-should-retry").is_none());
    let wait: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((1..=2000).contains(&wait), "{wait}");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let error: Value = limited.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
}
