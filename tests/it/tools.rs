//! Tool calling over real HTTP, through both SDK doors to both upstreams (`mock-llm`
//! speaking Ollama and Gemini): the model's call in each dialect, whole and streamed, the
//! result sent back and answered, a streamed call replayed from the cache, a forced call
//! where the upstream can force it and a 400 naming `tool_choice` where it cannot.

use serde_json::{json, Value};

use crate::common::{MockLlm, TestApp};

const KEY: &str = "sk-tools";
/// Routed to Ollama and to Gemini.
const MODELS: [&str; 2] = ["llama3.1", "gemini-2.5-flash"];

async fn gateway(mock: &MockLlm) -> TestApp {
    TestApp::builder()
        .keys(KEY)
        .set("OLLAMA_BASE_URL", mock.url.as_str())
        .set("GEMINI_BASE_URL", mock.url.as_str())
        .set("GEMINI_API_KEY", "gm-key")
        .set("RATE_LIMITER_CAPACITY", "1000")
        .spawn()
        .await
}

async fn post(app: &TestApp, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}{path}", app.url))
        .header("x-api-key", KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn openai_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ])
}

fn anthropic_tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Weather in a city",
            "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}},
        {"name": "get_time", "input_schema": {"type": "object"}},
    ])
}

/// The JSON payloads of an SSE body's `data:` lines, `[DONE]` left out.
fn payloads(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test]
async fn openai_door_a_call_then_its_result_on_every_upstream() {
    let mock = MockLlm::start(&[]);
    let app = gateway(&mock).await;
    for model in MODELS {
        let question = json!({"role": "user", "content": "weather in Paris?"});
        let response = post(
            &app,
            "/v1/chat/completions",
            &json!({"model": model, "messages": [question], "tools": openai_tools()}),
        )
        .await;
        assert_eq!(response.status(), 200, "{model}");
        let body: Value = response.json().await.unwrap();
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{model}: {body}");
        assert_eq!(choice["message"]["content"], Value::Null, "{body}");
        let call = &choice["message"]["tool_calls"][0];
        assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"query": "weather in Paris?"}), "{model}");

        let follow_up = json!({"model": model, "tools": openai_tools(), "messages": [
            question, choice["message"].clone(),
            {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"},
        ]});
        let response = post(&app, "/v1/chat/completions", &follow_up).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            body["choices"][0]["message"]["content"], "Tool get_weather said: 18C and sunny",
            "{model}: the result reached the upstream named by its function"
        );
        assert!(body["choices"][0]["message"].get("tool_calls").is_none());
    }
}

#[tokio::test]
async fn openai_door_a_streamed_call_is_one_delta_and_its_replay_is_the_same() {
    let mock = MockLlm::start(&[]);
    let app = gateway(&mock).await;
    for model in MODELS {
        let request = json!({"model": model, "stream": true, "tools": openai_tools(),
            "messages": [{"role": "user", "content": format!("streamed call via {model}")}]});
        let mut bodies = Vec::new();
        for expected_cache in ["MISS", "HIT"] {
            let response = post(&app, "/v1/chat/completions", &request).await;
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["x-cache"], expected_cache, "{model}");
            bodies.push(response.text().await.unwrap());
        }
        for body in &bodies {
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
            let chunks = payloads(body);
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let calls: Vec<&Value> = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
                .collect();
            assert_eq!(calls.len(), 1, "{body}");
            let call = &calls[0][0];
            assert_eq!(call["index"], 0);
            assert_eq!(call["type"], "function");
            assert_eq!(call["function"]["name"], "get_weather");
            let arguments: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(arguments["query"], format!("streamed call via {model}"));
            let last = chunks.last().unwrap();
            assert_eq!(last["choices"][0]["finish_reason"], "tool_calls", "{body}");
        }
        let id = |body: &str| {
            payloads(body)
                .iter()
                .find_map(|c| {
                    c["choices"][0]["delta"]["tool_calls"][0]["id"]
                        .as_str()
                        .map(str::to_owned)
                })
                .unwrap()
        };
        assert_eq!(
            id(&bodies[0]),
            id(&bodies[1]),
            "the replay is the stored answer"
        );
    }
}

#[tokio::test]
async fn a_forced_call_is_forced_on_gemini_and_refused_by_name_on_ollama() {
    let mock = MockLlm::start(&[]);
    let app = gateway(&mock).await;
    let forced = |model: &str, choice: Value| {
        json!({"model": model, "tools": openai_tools(), "tool_choice": choice,
            "messages": [{"role": "user", "content": "what time is it?"}]})
    };
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let response = post(
        &app,
        "/v1/chat/completions",
        &forced("gemini-2.5-flash", named.clone()),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_time",
        "Gemini was told to call the named tool: {body}"
    );

    for choice in [named, json!("required")] {
        let response = post(&app, "/v1/chat/completions", &forced("llama3.1", choice)).await;
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()["x-should-retry"], "false");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["param"], "tool_choice", "{body}");
        assert_eq!(body["error"]["code"], "unsupported_parameter");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    // `none` is honoured on Ollama by not offering the tools: the model answers in text.
    let response = post(
        &app,
        "/v1/chat/completions",
        &forced("llama3.1", json!("none")),
    )
    .await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Echo: what time is it?"
    );
    // Strict tools cannot be held to their schema by Ollama; Gemini validates them.
    let mut strict = forced("llama3.1", json!("auto"));
    strict["tools"][0]["function"]["strict"] = json!(true);
    let response = post(&app, "/v1/chat/completions", &strict).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "tools");
    strict["model"] = json!("gemini-2.5-flash");
    assert_eq!(
        post(&app, "/v1/chat/completions", &strict).await.status(),
        200
    );
}

#[tokio::test]
async fn anthropic_door_tool_use_then_tool_result_on_every_upstream() {
    let mock = MockLlm::start(&[]);
    let app = gateway(&mock).await;
    for model in MODELS {
        let question = json!({"role": "user", "content": "weather in Oslo?"});
        let response = post(
            &app,
            "/v1/messages",
            &json!({"model": model, "max_tokens": 100, "tools": anthropic_tools(), "messages": [question]}),
        )
        .await;
        assert_eq!(response.status(), 200);
        let message: Value = response.json().await.unwrap();
        assert_eq!(message["stop_reason"], "tool_use", "{model}: {message}");
        let content = message["content"].as_array().unwrap();
        assert_eq!(
            content.len(),
            1,
            "a call only, no empty text block: {message}"
        );
        let block = &content[0];
        assert_eq!(block["type"], "tool_use");
        assert_eq!(block["name"], "get_weather");
        assert_eq!(block["input"], json!({"query": "weather in Oslo?"}));

        let follow_up = json!({"model": model, "max_tokens": 100, "tools": anthropic_tools(), "messages": [
            question,
            {"role": "assistant", "content": message["content"].clone()},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "-3C"}]},
        ]});
        let response = post(&app, "/v1/messages", &follow_up).await;
        assert_eq!(response.status(), 200);
        let message: Value = response.json().await.unwrap();
        assert_eq!(message["stop_reason"], "end_turn");
        assert_eq!(
            message["content"][0]["text"], "Tool get_weather said: -3C",
            "{model}"
        );
    }
}

#[tokio::test]
async fn anthropic_door_a_streamed_call_is_a_tool_use_block_with_its_input_json() {
    let mock = MockLlm::start(&[]);
    let app = gateway(&mock).await;
    for model in MODELS {
        let request = json!({"model": model, "max_tokens": 100, "stream": true, "tools": anthropic_tools(),
            "tool_choice": {"type": "auto"},
            "messages": [{"role": "user", "content": format!("stream via {model}")}]});
        for expected_cache in ["MISS", "HIT"] {
            let response = post(&app, "/v1/messages", &request).await;
            assert_eq!(response.headers()["x-cache"], expected_cache);
            let body = response.text().await.unwrap();
            let names: Vec<&str> = body
                .lines()
                .filter_map(|l| l.strip_prefix("event: "))
                .collect();
            assert_eq!(
                names,
                [
                    "message_start",
                    "content_block_start",
                    "ping",
                    "content_block_delta",
                    "content_block_stop",
                    "message_delta",
                    "message_stop"
                ],
                "{body}"
            );
            let events = payloads(&body);
            assert_eq!(events[1]["content_block"]["type"], "tool_use", "{body}");
            assert_eq!(events[1]["content_block"]["name"], "get_weather");
            assert_eq!(events[1]["content_block"]["input"], json!({}));
            let delta = &events[3]["delta"];
            assert_eq!(delta["type"], "input_json_delta");
            let input: Value =
                serde_json::from_str(delta["partial_json"].as_str().unwrap()).unwrap();
            assert_eq!(input, json!({"query": format!("stream via {model}")}));
            assert_eq!(events[5]["delta"]["stop_reason"], "tool_use");
        }
    }
    // Forcing a call cannot be done by Ollama: a 400 saying so, in Anthropic's envelope.
    let forced = json!({"model": "llama3.1", "max_tokens": 10, "tools": anthropic_tools(),
        "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]});
    let response = post(&app, "/v1/messages", &forced).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tool_choice"),
        "{body}"
    );
}
