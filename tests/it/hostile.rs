//! Hostile HTTP: slow clients, oversized and malformed heads and bodies, floods of
//! connections and requests. Each gets a clear 4xx/503, never a panic, a hang or a 500,
//! and none reaches a provider.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{chat_body, upstream_ok, TestApp};

const KEY: &str = "sk-hostile";

async fn app(upstream: &wiremock::MockServer, extra: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .keys(KEY)
        .ollama(upstream)
        .set("RATE_LIMITER_CAPACITY", "100000")
        .set("HEADER_READ_TIMEOUT_SECONDS", "1")
        .set("BODY_READ_TIMEOUT_SECONDS", "1")
        .settings(extra)
        .spawn()
        .await
}

/// Sends raw bytes and reads the whole answer (until the server closes or 5 s pass).
async fn raw(app: &TestApp, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(app.url.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_slowloris_head_is_cut_off_by_the_header_timeout() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[]).await;
    let mut stream = TcpStream::connect(app.url.trim_start_matches("http://"))
        .await
        .unwrap();
    stream
        .write_all(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..40 {
        if stream.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {} // hyper may answer 408 before closing
            Err(_) => {}
        }
    }
    assert!(
        closed,
        "the connection was still open after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn a_body_sent_too_slowly_gets_408() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[]).await;
    let mut stream = TcpStream::connect(app.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/chat HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains(r#"{"detail":"Request body was not received in time"}"#));
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn malformed_heads_get_a_4xx_and_the_gateway_stays_up() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[]).await;
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    // hyper answers heads it cannot parse before our code runs: 431 for oversized
    // heads, 400 for broken ones (bare, without a JSON body).
    let cases: Vec<(&str, u16, Vec<u8>)> = vec![
        ("too many headers", 431, format!("GET /health HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes()),
        ("huge header", 431, format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20)).into_bytes()),
        ("control character in the key", 400, b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nX-API-Key: sk\x01hostile\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ("garbage", 400, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 not http at all\r\n\r\n".to_vec()),
        ("bad content-length", 400, format!("POST /v1/chat HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Length: -5\r\n\r\n").into_bytes()),
    ];
    for (name, expected, request) in cases {
        let answer = raw(&app, &request).await;
        assert_eq!(
            status_of(&answer),
            expected,
            "{name}: {}",
            answer.lines().next().unwrap_or("")
        );
    }
    assert!(upstream.received_requests().await.unwrap().is_empty());
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn hostile_keys_bodies_and_methods_get_clear_json_errors() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[]).await;
    let url = format!("{}/v1/chat", app.url);
    let post = |key: String, body: Vec<u8>, content_type: &'static str| {
        app.client
            .post(&url)
            .header("X-API-Key", key)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let expect = |response: reqwest::Response, status: u16| async move {
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.expect("a JSON error body");
        assert!(body["detail"].is_string() || body["detail"].is_array());
    };
    // A 100 KB key, and a key of only non-ASCII bytes.
    expect(
        post(
            "k".repeat(100 * 1024),
            chat_body("x").to_string().into_bytes(),
            "application/json",
        )
        .await
        .unwrap(),
        401,
    )
    .await;
    // Invalid UTF-8, deep nesting, a huge array, absurd numbers, wrong types.
    let cases: Vec<(Vec<u8>, &'static str)> = vec![
        (
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(),
            "application/json",
        ),
        (
            format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)).into_bytes(),
            "application/json",
        ),
        (
            json!({"messages": vec![json!(1); 100_000]})
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            json!({"messages": [{"role": "u", "content": "c"}], "max_tokens": 1e308})
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            json!({"messages": [{"role": "u", "content": "c"}], "temperature": -1e308})
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            json!({"messages": [{"role": "u", "content": "c"}], "max_tokens": "NaN"})
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            json!({"messages": {"role": "u"}}).to_string().into_bytes(),
            "application/json",
        ),
        (b"messages=hi".to_vec(), "application/x-www-form-urlencoded"),
        (b"<xml/>".to_vec(), "text/xml"),
        (Vec::new(), "application/json"),
    ];
    for (body, content_type) in cases {
        expect(post(KEY.into(), body, content_type).await.unwrap(), 422).await;
    }
    let brew = app
        .client
        .request(reqwest::Method::from_bytes(b"BREW").unwrap(), &url)
        .send()
        .await
        .unwrap();
    expect(brew, 405).await;
    expect(app.get("/v1/chat/../../etc/passwd").await, 404).await;
    expect(app.get("/%00%ff").await, 404).await;
    assert!(
        upstream.received_requests().await.unwrap().is_empty(),
        "nothing hostile reached a provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_cap_get_503_at_once() {
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let upstream = MockServer::start().await;
    Mock::given(path("/api/chat"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(crate::common::ollama_reply("slow"))
                .set_delay(Duration::from_millis(800)),
        )
        .mount(&upstream)
        .await;
    let app = std::sync::Arc::new(
        app(
            &upstream,
            &[("MAX_CONCURRENT_REQUESTS", "2"), ("CACHE_TTL_SECONDS", "0")],
        )
        .await,
    );
    let mut tasks = Vec::new();
    for i in 0..5 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(if i < 2 { 0 } else { 200 })).await;
            let started = Instant::now();
            let response = app.chat(KEY, &chat_body(&format!("c{i}"))).await;
            (
                response.status().as_u16(),
                started.elapsed(),
                response.text().await.unwrap(),
            )
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        let (status, elapsed, body) = task.await.unwrap();
        if status == 503 {
            assert!(
                elapsed < Duration::from_millis(500),
                "refused at once, not queued"
            );
            assert!(body.contains("overloaded"), "{body}");
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503, 503, 503]);
    // Health stays available while chat is saturated.
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_are_closed() {
    let upstream = upstream_ok().await;
    let app = app(
        &upstream,
        &[
            ("MAX_CONNECTIONS", "2"),
            ("HEADER_READ_TIMEOUT_SECONDS", "30"),
        ],
    )
    .await;
    let addr = app.url.trim_start_matches("http://").to_owned();
    let _held: Vec<TcpStream> = vec![
        TcpStream::connect(&addr).await.unwrap(),
        TcpStream::connect(&addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(&addr).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), third.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(
        answer.ends_with(r#"{"detail":"Too many open connections; try again shortly"}"#),
        "{answer}"
    );
    drop(_held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.get("/health").await.status(), 200, "slots are released");
}

#[tokio::test]
async fn hostile_bodies_on_the_sdk_doors_get_each_doors_clear_400s() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[("MAX_BODY_BYTES", "65536")]).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(
        r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":{}"x"{}}}]}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    let many_tools = format!(
        r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":"x"}}],"tools":[{}]}}"#,
        vec![r#"{"type":"function","function":{"name":"f"},"name":"f","input_schema":{}}"#; 129]
            .join(",")
    );
    let bodies: Vec<(&str, Vec<u8>, u16)> = vec![
        ("empty", Vec::new(), 400),
        ("too many tools", many_tools.into_bytes(), 400),
        (
            "tools of the wrong type",
            br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":5}"#
                .to_vec(),
            400,
        ),
        (
            "a tool name that no upstream takes",
            br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a b"},"name":"a b","input_schema":{}}]}"#
                .to_vec(),
            400,
        ),
        (
            "a tool result answering no call",
            br#"{"model":"m","max_tokens":5,"messages":[{"role":"tool","tool_call_id":"c","content":"x"},{"role":"user","content":[{"type":"tool_result","tool_use_id":"c"}]}]}"#
                .to_vec(),
            400,
        ),
        (
            "random bytes",
            (0..400u32).map(|i| (i * 7919 % 251) as u8).collect(),
            400,
        ),
        ("deep arrays", deep.into_bytes(), 413),
        ("deep content", deep_object.into_bytes(), 400),
        ("too large", vec![b' '; 70_000], 413),
        (
            "wrong types",
            br#"{"model":5,"max_tokens":"x","messages":"no"}"#.to_vec(),
            400,
        ),
        (
            "unknown role",
            br#"{"model":"m","max_tokens":5,"messages":[{"role":"wizard","content":"x"}]}"#
                .to_vec(),
            400,
        ),
        (
            "empty messages",
            br#"{"model":"m","max_tokens":5,"messages":[]}"#.to_vec(),
            400,
        ),
        (
            "truncated",
            br#"{"model":"m","max_tokens":5,"mess"#.to_vec(),
            400,
        ),
    ];
    for (path, envelope) in [("/v1/chat/completions", "error"), ("/v1/messages", "type")] {
        for (name, body, status) in &bodies {
            let response = app
                .client
                .post(format!("{}{path}", app.url))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), *status, "{path} {name}");
            let error: Value = response
                .json()
                .await
                .unwrap_or_else(|e| panic!("{path} {name}: not JSON: {e}"));
            assert!(error.get(envelope).is_some(), "{path} {name}: {error}");
        }
    }
    let n = app
        .client
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(KEY)
        .json(&json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(n.status(), 400);
    assert_eq!(n.json::<Value>().await.unwrap()["error"]["param"], "n");
    assert!(upstream.received_requests().await.unwrap().is_empty());
    assert_eq!(app.get("/health").await.status(), 200);
}
