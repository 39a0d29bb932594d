//! Keep-alive connections under a client that never re-sends a request: every request
//! gets an answer, and the gateway closes a connection only after an answer saying
//! `Connection: close` or after the keep-alive timeout.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::raw_http::{KeepAliveClient, RawRequest};
use crate::common::{upstream_ok, TestApp};

const KEY: &str = "sk-keepalive";

async fn app(upstream: &wiremock::MockServer, extra: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .keys(KEY)
        .ollama(upstream)
        .settings(extra)
        .spawn()
        .await
}

fn addr(app: &TestApp) -> String {
    app.url.trim_start_matches("http://").to_owned()
}

/// A 600-byte chat body, like the one of the reproduction in issue 12.
fn body() -> Vec<u8> {
    let text = "x".repeat(550);
    format!(r#"{{"messages":[{{"role":"user","content":"{text}"}}]}}"#).into_bytes()
}

#[tokio::test]
async fn answers_given_before_the_body_arrived_keep_the_connection_usable() {
    let upstream = upstream_ok().await;
    // A bucket of one token that never refills in the test: the second request on is a
    // 429 answered from the local deny cache, without reading Redis or the body.
    let app = app(
        &upstream,
        &[
            ("RATE_LIMITER_CAPACITY", "1"),
            ("RATE_LIMITER_REFILL_RATE", "0.001"),
        ],
    )
    .await;
    let body = body();
    let json = ("Content-Type", "application/json");
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16);
    let cases: [Case; 5] = [
        ("POST", "/no/such/path", &[("X-API-Key", KEY), json], 404),
        ("PUT", "/api/v1/chat", &[("X-API-Key", KEY), json], 405),
        (
            "POST",
            "/api/v1/chat",
            &[("X-API-Key", "sk-wrong"), json],
            401,
        ),
        ("POST", "/v1/chat", &[json], 401),
        ("POST", "/api/v1/chat", &[("X-API-Key", KEY), json], 429),
    ];
    let mut client = KeepAliveClient::new(&addr(&app), Duration::from_secs(10));
    let first = client
        .send(&RawRequest {
            method: "POST",
            path: "/api/v1/chat",
            headers: &[("X-API-Key", KEY), json],
            body: &body,
            body_after: None,
        })
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    for (method, path, headers, expected) in cases {
        for round in 0..40 {
            // The head goes out first and the body a moment later, so the answer is
            // ready before the body has arrived.
            let response = client
                .send(&RawRequest {
                    method,
                    path,
                    headers,
                    body: &body,
                    body_after: Some(Duration::from_millis(2)),
                })
                .await
                .unwrap_or_else(|e| panic!("{method} {path}, round {round}: {e}"));
            assert_eq!(response.status, expected, "{method} {path}");
            assert!(
                !response.closes(),
                "{method} {path}: {:?}",
                response.headers
            );
        }
    }
    assert_eq!(client.connections, 1, "every request on the one connection");
}

/// Sends a head declaring `length` body bytes, keeps sending the body in the background,
/// and reads the answer until the server closes.
async fn answer_to_oversized_body(app: &TestApp, head: String, length: usize) -> String {
    let stream = TcpStream::connect(addr(app)).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head.as_bytes()).await.unwrap();
    let sender = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < length {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        writer
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server closed the connection in time");
    if let Err(error) = read.unwrap() {
        // A reset is tolerable only after the whole answer arrived.
        assert!(!answer.is_empty(), "reset before any answer: {error}");
    }
    drop(sender.await);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_body_too_large_to_read_gets_its_answer_with_connection_close_not_a_reset() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[("MAX_BODY_BYTES", "65536")]).await;
    let length = 8 << 20;
    for (key, status, detail) in [
        ("sk-wrong", 401, "Invalid or missing API Key"),
        (KEY, 413, "Request body too large"),
    ] {
        let head = format!(
            "POST /api/v1/chat HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        );
        let answer = answer_to_oversized_body(&app, head, length).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer:.200}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer:.300}"
        );
        assert!(answer.contains(detail), "{answer:.300}");
    }
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_client_waiting_for_100_continue_gets_the_early_answer_and_connection_close() {
    let upstream = upstream_ok().await;
    let app = app(&upstream, &[]).await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(
            b"POST /api/v1/chat HTTP/1.1\r\nHost: x\r\nX-API-Key: sk-wrong\r\n\
Expect: 100-continue\r\nContent-Length: 600\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 401 "), "{answer}");
    assert!(!answer.contains("100 continue"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

#[tokio::test]
async fn an_idle_connection_outlives_the_header_timeout_until_the_keep_alive_timeout() {
    let upstream = upstream_ok().await;
    let app = app(
        &upstream,
        &[
            ("HEADER_READ_TIMEOUT_SECONDS", "0.5"),
            ("KEEP_ALIVE_TIMEOUT_SECONDS", "2"),
        ],
    )
    .await;
    let mut client = KeepAliveClient::new(&addr(&app), Duration::from_secs(5));
    let health = RawRequest {
        method: "GET",
        path: "/health",
        headers: &[],
        body: b"",
        body_after: None,
    };
    for _ in 0..3 {
        assert_eq!(client.send(&health).await.unwrap().status, 200);
        // Idle for three header timeouts, well within the keep-alive timeout.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(client.send(&health).await.unwrap().status, 200);
    assert_eq!(client.connections, 1, "the idle connection stayed open");

    // Left idle, the connection is closed once the keep-alive timeout has passed.
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(stream.read(&mut buf).await.unwrap() > 0, "answered");
    let idle_from = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(6), stream.read(&mut buf))
        .await
        .expect("closed within the keep-alive timeout and a margin");
    assert_eq!(closed.unwrap(), 0, "closed cleanly, without more data");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(1900),
        "closed after {idle:?}, before the keep-alive timeout"
    );
}

#[tokio::test]
async fn a_head_sent_slowly_after_an_idle_spell_is_cut_off_by_the_header_timeout() {
    let upstream = upstream_ok().await;
    let app = app(
        &upstream,
        &[
            ("HEADER_READ_TIMEOUT_SECONDS", "0.5"),
            ("KEEP_ALIVE_TIMEOUT_SECONDS", "30"),
        ],
    )
    .await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(stream.read(&mut buf).await.unwrap() > 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream.write_all(b"GET /health HT").await.unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the slow head was cut off");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
