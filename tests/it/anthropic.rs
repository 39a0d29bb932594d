//! The Anthropic door over real HTTP against `mock-llm`: the message shape, the named
//! events of a stream, an upstream failure mid-stream, the cache across stream and whole
//! answers, and its error envelope.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{MockLlm, TestApp};

const KEY: &str = "sk-anthropic-door";

async fn gateway(mock: &MockLlm) -> TestApp {
    TestApp::builder()
        .keys(KEY)
        .set("OLLAMA_BASE_URL", mock.url.as_str())
        .set("RATE_LIMITER_CAPACITY", "1000")
        .spawn()
        .await
}

async fn post(app: &TestApp, body: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/messages", app.url))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

fn body(text: &str, stream: bool) -> Value {
    json!({"model": "llama3.1", "max_tokens": 100, "stream": stream,
           "messages": [{"role": "user", "content": text}]})
}

/// `(event name, data)` of each event of an SSE body.
fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .map(|e| {
            let mut lines = e.lines();
            let name = lines
                .next()
                .unwrap()
                .trim_start_matches("event: ")
                .to_owned();
            let data = lines.next().unwrap().trim_start_matches("data: ");
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn a_stream_is_anthropics_named_events_and_its_answer_is_cached_for_both_forms() {
    let mock = MockLlm::start(&["--chunks", "3"]);
    let app = gateway(&mock).await;
    let response = post(&app, &body("name the events", true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response
        .headers()
        .contains_key("anthropic-ratelimit-requests-remaining"));
    let events = named_events(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "each event names its type");
    }
    let text: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "Echo: name the events");
    let id = events[0].1["message"]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("msg_"));
    assert_eq!(events[7].1["delta"]["stop_reason"], "end_turn");
    assert_eq!(events[7].1["usage"]["output_tokens"], 4);

    tokio::time::sleep(Duration::from_millis(100)).await;
    let whole = post(&app, &body("name the events", false)).await;
    assert_eq!(whole.headers()["x-cache"], "HIT");
    let whole: Value = whole.json().await.unwrap();
    assert_eq!(whole["id"], id.as_str());
    assert_eq!(whole["content"][0]["text"], "Echo: name the events");
    assert_eq!(whole["usage"]["input_tokens"], 3);
}

#[tokio::test]
async fn an_upstream_failure_mid_stream_is_an_error_event_that_ends_the_stream() {
    let mock = MockLlm::start(&["--fail-after", "1", "--chunk-delay-ms", "50"]);
    let app = gateway(&mock).await;
    let text = post(&app, &body("break it", true))
        .await
        .text()
        .await
        .unwrap();
    let events = named_events(&text);
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert!(!text.contains("message_stop"), "{text}");
}

#[tokio::test]
async fn errors_use_anthropics_envelope() {
    let mock = MockLlm::start(&[]);
    let app = gateway(&mock).await;
    let url = format!("{}/v1/messages", app.url);
    let unauthorized = app
        .client
        .post(&url)
        .header("x-api-key", "sk-wrong")
        .json(&body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let error: Value = unauthorized.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "authentication_error");
    // A bearer token works as well as x-api-key.
    let missing = app
        .client
        .post(&url)
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let garbage = app
        .client
        .post(&url)
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
}
