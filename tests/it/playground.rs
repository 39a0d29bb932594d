//! The playground page (CONTRACT §14) as served over HTTP, and demo mode: the binary with
//! `--demo` answers every door with nothing else running. The page driven in a real
//! browser is in `browser.rs`.

use serde_json::{json, Value};

use crate::common::{GatewayProcess, TestApp};

/// POSTs `body` to the OpenAI door at `base` with `key`, as the playground does.
async fn completions(base: &str, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_playground_and_its_files_are_served_under_a_strict_content_security_policy() {
    let app = TestApp::spawn(&[]).await;
    for (path, kind, marker) in [
        (
            "/playground",
            "text/html",
            "<title>llm-gateway playground</title>",
        ),
        (
            "/playground/app.js",
            "text/javascript",
            "/v1/chat/completions",
        ),
        ("/playground/app.css", "text/css", "grid-template-columns"),
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert!(headers["content-type"].to_str().unwrap().starts_with(kind));
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let policy = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe"), "{policy}");
        assert!(response.text().await.unwrap().contains(marker), "{path}");
    }
    // The page needs no key; chat still does.
    let chat = app
        .chat_at("/v1/chat/completions", None, &json!({"model": "x"}))
        .await;
    assert_eq!(chat.status(), 401);
}

#[tokio::test]
async fn every_answer_names_its_provider_for_the_playground() {
    let mock = crate::common::MockLlm::start(&[]);
    let app = TestApp::builder()
        .keys("k")
        .set("OLLAMA_BASE_URL", &mock.url)
        .spawn()
        .await;
    let body = json!({"model": "llama3.1", "messages": [{"role": "user", "content": "hi"}]});
    let response = completions(&app.url, "k", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-provider"], "ollama");
    assert_eq!(response.headers()["x-cache"], "MISS");
}

/// The binary in demo mode with no Redis URL, no provider and no key configured (the
/// bucket larger than the default five, as the test sends more than five at once).
fn demo() -> GatewayProcess {
    GatewayProcess::start_with_args(&["--demo"], &[("RATE_LIMITER_CAPACITY", "100")], None)
}

#[tokio::test]
async fn demo_mode_prints_the_playground_address_and_answers_every_door() {
    let gateway = demo();
    let printed =
        crate::common::wait_for_line(&gateway.log, "Open the playground").expect("the banner");
    assert!(
        printed.contains(&format!(
            "{}/playground and use the key sk-gateway-123",
            gateway.url
        )),
        "{printed}"
    );
    let client = reqwest::Client::new();
    let key = "sk-gateway-123";

    let original = gateway
        .chat(
            key,
            &json!({"messages": [{"role": "user", "content": "Hello!"}], "model_hint": "local"}),
        )
        .await;
    assert_eq!(original.status(), 200);
    let body: Value = original.json().await.unwrap();
    assert_eq!(body["content"], "Echo: Hello!");

    // Every model the playground can pick answers, Gemini's included, whole and streamed.
    let models: Value = client
        .get(format!("{}/v1/models", gateway.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let models: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(models.len() >= 2, "{models:?}");
    for (i, model) in models.iter().enumerate() {
        let content = format!("question {i}");
        let body = json!({"model": model, "messages": [{"role": "user", "content": content}]});
        let whole = completions(&gateway.url, key, &body).await;
        assert_eq!(whole.status(), 200, "{model}");
        let whole: Value = whole.json().await.unwrap();
        assert_eq!(
            whole["choices"][0]["message"]["content"],
            format!("Echo: {content}")
        );
        let body = json!({"model": model, "stream": true,
            "messages": [{"role": "user", "content": format!("streamed {i}")}]});
        let streamed = completions(&gateway.url, key, &body).await;
        assert_eq!(streamed.status(), 200, "{model}");
        let text = streamed.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let anthropic = client
        .post(format!("{}/v1/messages", gateway.url))
        .header("x-api-key", key)
        .json(&json!({"model": models[0], "max_tokens": 64,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.status(), 200);
}

#[tokio::test]
async fn demo_mode_stays_demo_mode_after_a_reload() {
    let gateway = demo();
    gateway.signal("-HUP");
    crate::common::wait_for_line(&gateway.log, "configuration reloaded").expect("reloaded");
    let answer = gateway
        .chat(
            "sk-gateway-123",
            &json!({"messages": [{"role": "user", "content": "still here?"}]}),
        )
        .await;
    assert_eq!(answer.status(), 200, "{}", gateway.output());
}

#[test]
fn the_binary_refuses_an_unknown_argument() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"))
        .arg("--dmeo")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("unknown argument '--dmeo'"), "{said}");
    assert!(said.contains("--demo"), "{said}");
}
