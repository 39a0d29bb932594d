//! Operations: metrics that match what happened, secret-free logs, graceful shutdown,
//! and start-up errors, using the real binaries.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{
    chat_body, metric_value, upstream_ok, wait_for_line, GatewayProcess, MockLlm, RedisServer,
    TestApp,
};

#[tokio::test]
async fn metrics_count_what_the_test_did() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let uri = upstream.uri();
    let redis_url = redis.url();
    let app = TestApp::spawn(&[
        ("REDIS_URL", redis_url.as_str()),
        ("API_KEYS", "sk-m"),
        ("OLLAMA_BASE_URL", uri.as_str()),
        ("RATE_LIMITER_CAPACITY", "3"),
        ("RATE_LIMITER_REFILL_RATE", "0.01"),
    ])
    .await;
    app.chat("sk-m", &chat_body("one")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.chat("sk-m", &chat_body("one")).await; // hit
    app.chat(
        "sk-m",
        &json!({"messages": [{"role": "user", "content": "two"}], "model": "client-chosen-label"}),
    )
    .await;
    app.chat("sk-m", &chat_body("x")).await; // 429
    app.chat("sk-m", &chat_body("x")).await; // 429
    app.chat("sk-nope", &chat_body("x")).await; // 401

    let text = app.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric_value(&text, "rate_limit_allowed_total"), 3.0);
    assert_eq!(metric_value(&text, "rate_limit_blocked_total"), 2.0);
    assert_eq!(metric_value(&text, "cache_hits_total"), 1.0);
    assert_eq!(metric_value(&text, "cache_misses_total"), 2.0);
    assert_eq!(
        metric_value(&text, "provider_calls_total{provider=\"ollama\"}"),
        2.0
    );
    assert_eq!(
        metric_value(&text, "provider_failures_total{provider=\"ollama\"}"),
        0.0
    );
    assert_eq!(
        metric_value(&text, "chat_requests_total{status=\"2xx\"}"),
        3.0
    );
    assert_eq!(
        metric_value(&text, "chat_requests_total{status=\"4xx\"}"),
        3.0
    );
    assert_eq!(
        metric_value(&text, "request_latency_seconds_count{provider=\"ollama\"}"),
        3.0
    );
    assert_eq!(
        metric_value(&text, "provider_latency_seconds_count{provider=\"ollama\"}"),
        2.0
    );
    assert_eq!(
        metric_value(&text, "active_requests"),
        1.0,
        "only the /metrics request itself"
    );
    // 3 admissions and the first denial went to Redis; the second denial came from the
    // local deny cache.
    assert_eq!(
        metric_value(&text, "rate_limiter_call_duration_seconds_count"),
        4.0
    );
    assert_eq!(metric_value(&text, "rate_limiter_local_denials_total"), 1.0);
    assert!(
        !text.contains("client-chosen-label"),
        "clients cannot create series"
    );
    assert!(!text.contains("sk-m"));
}

#[tokio::test]
async fn logs_hold_request_lines_but_no_keys_or_message_text() {
    let upstream = upstream_ok().await;
    let uri = upstream.uri();
    let gateway = GatewayProcess::start(&[
        ("REDIS_URL", "memory://"),
        ("API_KEYS", "sk-live-SECRETKEY-1"),
        ("GEMINI_API_KEY", "AIza-PROVIDER-SECRET"),
        ("GEMINI_BASE_URL", "http://127.0.0.1:9"),
        ("OLLAMA_BASE_URL", uri.as_str()),
        ("PROVIDER_MAX_RETRIES", "1"),
        ("PROVIDER_RETRY_BASE_MS", "10"),
        ("LOG_LEVEL", "debug"),
    ]);
    let client = reqwest::Client::new();
    let send = |key: &'static str, body: Value| {
        client
            .post(format!("{}/api/v1/chat", gateway.url))
            .header("X-API-Key", key)
            .json(&body)
            .send()
    };
    let secret_text = "MESSAGE-TEXT-NEVER-LOGGED";
    let ok = send("sk-live-SECRETKEY-1", chat_body(secret_text))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let request_id = ok.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(
        send("sk-wrong-WRONGKEY-2", chat_body(secret_text))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        send(
            "sk-live-SECRETKEY-1",
            json!({"messages": [{"role": "user"}], "c": secret_text})
        )
        .await
        .unwrap()
        .status(),
        422
    );
    // Gemini is unreachable: the failure is logged, without the provider key.
    let failed = send(
        "sk-live-SECRETKEY-1",
        json!({"messages": [{"role": "user", "content": secret_text}], "model_hint": "fast"}),
    )
    .await
    .unwrap();
    assert_eq!(failed.status(), 502);
    assert!(!failed.text().await.unwrap().contains("AIza"));
    // A path no route matches is logged as `unmatched`, never as the client wrote it.
    let unmatched = client
        .get(format!("{}/no/CLIENT-PATH-{secret_text}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unmatched.status(), 404);

    wait_for_line(&gateway.log, "\"status\":404").expect("request lines are logged");
    let output = gateway.output();
    for secret in ["SECRETKEY", "WRONGKEY", "PROVIDER-SECRET", secret_text] {
        assert!(
            !output.contains(secret),
            "{secret} leaked into the logs:\n{output}"
        );
    }
    let line = output
        .lines()
        .find(|l| l.contains(&request_id))
        .expect("request id in the log");
    let record: Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(record["status"], 200);
    assert_eq!(record["route"], "/api/v1/chat", "the matched route");
    assert_eq!(record["method"], "POST");
    assert_eq!(record["provider"], "ollama");
    assert_eq!(record["cache"], "MISS");
    assert!(record["latency_ms"].is_number());
    assert!(output.contains("provider call failed"));
    let not_found = output
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["status"] == 404)
        .expect("the 404 is logged");
    assert_eq!(not_found["route"], "unmatched");
    assert!(!output.contains("CLIENT-PATH"));
}

#[tokio::test]
async fn the_shipped_default_key_triggers_a_startup_warning() {
    let gateway = GatewayProcess::start(&[("REDIS_URL", "memory://")]);
    let warning = wait_for_line(&gateway.log, "shipped default key").expect("warning");
    assert!(warning.contains("WARN"));
    assert!(
        !warning.contains("sk-gateway-123"),
        "the warning does not print the key"
    );
}

/// How many of the process's threads are runtime threads (named in /proc). Blocking-pool
/// threads share the name, but nothing here starts one: the upstream is an IP address,
/// so no DNS lookup runs.
fn worker_threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "gateway-worker")
        .count()
}

#[tokio::test]
async fn worker_threads_sets_how_many_threads_serve_requests() {
    let upstream = upstream_ok().await;
    for (setting, expected) in [("1", 1), ("3", 3)] {
        let gateway = GatewayProcess::start(&[
            ("REDIS_URL", "memory://"),
            ("OLLAMA_BASE_URL", upstream.uri().as_str()),
            ("API_KEYS", "sk-t"),
            ("WORKER_THREADS", setting),
        ]);
        let answer = gateway.chat("sk-t", &chat_body("hello")).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(worker_threads_of(gateway.child.id()), expected);
    }
}

#[test]
fn a_bad_setting_stops_startup_with_one_clear_line() {
    for (name, value, expected) in [
        ("RATE_LIMITER_CAPACITY", "many", "rate_limiter_capacity"),
        (
            "RATE_LIMITER_FAILURE_MODE",
            "sometimes",
            "rate_limiter_failure_mode",
        ),
        ("REDIS_URL", "ftp://x", "REDIS_URL"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_llm-gateway"))
            .env_clear()
            .env(name, value)
            .env("PORT", "0")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.to_lowercase().contains(&expected.to_lowercase()),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"));
    }
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_zero() {
    // The answer comes while the drain still lingers (SIGTERM at 400 ms, answer at 800 ms),
    // before idle connections are closed, so the close header is the drain's own doing.
    let mock = MockLlm::start(&["--latency-ms", "800"]);
    let mut gateway = GatewayProcess::start(&[
        ("REDIS_URL", "memory://"),
        ("API_KEYS", "sk-drain"),
        ("OLLAMA_BASE_URL", mock.url.as_str()),
    ]);
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/chat", gateway.url);
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .post(url)
                .header("X-API-Key", "sk-drain")
                .json(&chat_body("drain me"))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    gateway.terminate();
    let response = in_flight
        .await
        .unwrap()
        .expect("the request in flight got an answer");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["connection"],
        "close",
        "the client is told not to reuse the connection"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["content"], "Echo: drain me");
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.wait_exit(Duration::from_secs(10));
        (status, gateway)
    })
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        status.0.and_then(|s| s.code()),
        Some(0),
        "exit code after SIGTERM"
    );
    let refused = client
        .post(url)
        .header("X-API-Key", "sk-drain")
        .json(&chat_body("late"))
        .send()
        .await;
    assert!(refused.is_err(), "no new connections after shutdown");
}

/// Reads one HTTP/1.1 response (head and a `Content-Length` body) from `stream`.
async fn read_response(stream: &mut tokio::net::TcpStream) -> std::io::Result<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&data[end + 4..end + 4 + length]).into_owned();
                return Ok((head, body));
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        data.extend_from_slice(&chunk[..n]);
    }
}

/// A raw HTTP/1.1 chat request for `key` asking `text`.
fn raw_chat_request(addr: &str, key: &str, text: &str) -> String {
    let body = chat_body(text).to_string();
    format!(
        "POST /api/v1/chat HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The answer to `text` sent while draining: a 200 that tells the client to close.
fn assert_answered_while_draining(head: &str, body: &str, text: &str) {
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(body.contains(&format!("Echo: {text}")), "{body}");
}

/// A gateway in memory mode in front of `mock`, for the drain tests, and its host:port.
fn drain_gateway(mock: &MockLlm, key: &str) -> (GatewayProcess, String) {
    let gateway = GatewayProcess::start(&[
        ("REDIS_URL", "memory://"),
        ("API_KEYS", key),
        ("RATE_LIMITER_CAPACITY", "100"),
        ("OLLAMA_BASE_URL", mock.url.as_str()),
    ]);
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    (gateway, addr)
}

/// Waits (10 s at most) for the gateway to exit and checks it exited 0.
async fn assert_exits_zero(mut gateway: GatewayProcess) {
    let status = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[tokio::test]
async fn a_request_sent_on_an_idle_keep_alive_connection_while_draining_is_answered() {
    use tokio::io::AsyncWriteExt;
    let mock = MockLlm::start(&[]);
    let (gateway, addr) = drain_gateway(&mock, "sk-drain");
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = |text: &str| raw_chat_request(&addr, "sk-drain", text);
    stream.write_all(request("first").as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut stream).await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("connection: close"),
        "keep-alive before the drain"
    );

    // The connection is idle when the drain starts; a request sent on it now (as a
    // client that has not seen the shutdown would) is still answered, and the answer
    // tells the client to stop reusing the connection.
    gateway.terminate();
    wait_for_line(&gateway.log, "shutting down").expect("drain started");
    stream
        .write_all(request("second").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream)
        .await
        .expect("the request sent during the drain was answered");
    assert_answered_while_draining(&head, &body, "second");
    assert_exits_zero(gateway).await;
}

#[tokio::test]
async fn connections_waiting_to_be_accepted_at_sigterm_are_answered() {
    use tokio::io::AsyncWriteExt;
    let mock = MockLlm::start(&[]);
    let (gateway, addr) = drain_gateway(&mock, "sk-backlog");
    let request = raw_chat_request(&addr, "sk-backlog", "queued");
    // With the gateway frozen, the kernel completes these connections and holds them,
    // requests written, in the listener's queue: clients that connected just before the
    // stop signal. They must be answered, not reset with the listener.
    gateway.signal("-STOP");
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        streams.push(stream);
    }
    gateway.terminate();
    gateway.signal("-CONT");
    for (i, stream) in streams.iter_mut().enumerate() {
        let (head, body) = read_response(stream)
            .await
            .unwrap_or_else(|e| panic!("queued connection {i} was not answered: {e}"));
        assert_answered_while_draining(&head, &body, "queued");
    }
    assert_exits_zero(gateway).await;
}

#[tokio::test]
async fn mock_llm_speaks_all_three_wire_formats_and_injects_faults() {
    let mock = MockLlm::start(&[]);
    let url = mock.url.clone();
    let client = reqwest::Client::new();
    let ollama: Value = client
        .post(format!("{url}/api/chat"))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "ping"}], "stream": false}))
        .send().await.unwrap().json().await.unwrap();
    assert_eq!(ollama["message"]["content"], "Echo: ping");
    assert!(ollama["eval_count"].as_u64().unwrap() > 0);
    let gemini: Value = client
        .post(format!(
            "{url}/v1beta/models/gemini-2.5-flash:generateContent"
        ))
        .header("x-goog-api-key", "k")
        .json(&json!({"contents": [{"role": "user", "parts": [{"text": "ping"}]}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        gemini["candidates"][0]["content"]["parts"][0]["text"],
        "Echo: ping"
    );
    assert!(gemini["usageMetadata"]["totalTokenCount"].as_u64().unwrap() > 0);
    let openai: Value = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "ping"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(openai["choices"][0]["message"]["content"], "Echo: ping");
    let failed = client
        .post(format!("{url}/api/chat"))
        .header("x-mock-status", "503")
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 503);
    let hung = client
        .post(format!("{url}/api/chat"))
        .header("x-mock-hang", "1")
        .timeout(Duration::from_millis(300))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
}

#[test]
fn the_dashboard_queries_only_metrics_the_gateway_exports() {
    let metrics = llm_gateway::telemetry::metrics::Metrics::new();
    // A vector of gauges shows once it has a series: the registry sets one per provider.
    metrics
        .provider_breaker_state
        .with_label_values(&["local"])
        .set(0);
    let exported = metrics.render();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/grafana/dashboards/llm-gateway.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "requests",
        "allowed vs blocked",
        "hit ratio",
        "p50 / p99",
        "failures",
        "Active requests",
        "fallbacks",
        "breakers",
        "denials by reason",
        "Time to first token",
        "Tokens per second",
        "Gateway overhead",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel for {wanted}: {titles:?}"
        );
    }
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if token.ends_with("_total")
                    || token.ends_with("_bucket")
                    || token == "active_requests"
                    || token == "provider_breaker_state"
                {
                    assert!(
                        exported.contains(token),
                        "{token} in panel '{}' is not exported",
                        panel["title"]
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn a_dotenv_file_in_the_working_directory_is_read_and_the_environment_wins() {
    let gateway = GatewayProcess::start_with_dotenv(
        &[("RATE_LIMITER_CAPACITY", "2")],
        Some("REDIS_URL=memory://\nAPI_KEYS=sk-from-dotenv\nRATE_LIMITER_CAPACITY=50\n"),
    );
    let client = reqwest::Client::new();
    let send = |key: &'static str| {
        client
            .post(format!("{}/v1/chat", gateway.url))
            .header("X-API-Key", key)
            .json(&json!({"messages": []}))
            .send()
    };
    // The key from .env authenticates (422: past auth, the body is invalid).
    let response = send("sk-from-dotenv").await.unwrap();
    assert_eq!(response.status(), 422);
    // The process environment (capacity 2) wins over .env (50).
    assert_eq!(response.headers()["x-ratelimit-limit"], "2");
    assert_eq!(
        send("sk-gateway-123").await.unwrap().status(),
        401,
        ".env replaced the default key"
    );
}

#[tokio::test]
async fn gateway_overhead_is_the_latency_less_the_wait_for_the_upstream() {
    // Every upstream call takes 150 ms; the gateway's own share is far below that.
    let mock = MockLlm::start(&["--latency-ms", "150"]);
    let app = TestApp::builder()
        .keys("k")
        .set("OLLAMA_BASE_URL", &mock.url)
        .spawn()
        .await;
    for (i, stream) in [(0, false), (1, true), (2, false)] {
        let response = app
            .client
            .post(format!("{}/v1/chat/completions", app.url))
            .bearer_auth("k")
            .json(&json!({"model": "llama3.1", "stream": stream,
                "messages": [{"role": "user", "content": format!("overhead {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    // Two more from the cache: no upstream wait, all of it overhead.
    for i in [0, 2] {
        let hit = app
            .client
            .post(format!("{}/v1/chat/completions", app.url))
            .bearer_auth("k")
            .json(&json!({"model": "llama3.1",
                "messages": [{"role": "user", "content": format!("overhead {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(hit.headers()["x-cache"], "HIT");
    }
    let count = app.metric("gateway_overhead_seconds_count").await;
    let overhead = app.metric("gateway_overhead_seconds_sum").await;
    let latency = app
        .metric("request_latency_seconds_sum{provider=\"ollama\"}")
        .await;
    assert_eq!(count, 5.0);
    assert!(latency >= 0.45, "three upstream calls of 150 ms: {latency}");
    assert!(
        overhead < 0.1,
        "the upstream's 450 ms are not overhead: {overhead}"
    );
    assert!(overhead > 0.0);
}
