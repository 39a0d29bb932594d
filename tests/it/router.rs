//! The router alone, through `tower::ServiceExt::oneshot` (no sockets, no server loop):
//! the order of checks of CONTRACT §2, 401 before 429 before 413/422, and the JSON 404
//! and 405.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::Value;
use tower::ServiceExt;

use llm_gateway::app::build_router;
use llm_gateway::settings::Settings;
use llm_gateway::state::AppState;

const KEY: &str = "sk-router";
const OTHER: &str = "sk-router-other";

/// The router on the embedded store: buckets of one token that never refill in a test,
/// and bodies of at most 200 bytes.
fn router() -> Router {
    let settings = Settings::from_pairs(&[
        ("REDIS_URL", "memory://"),
        ("API_KEYS", &format!("{KEY},{OTHER}")),
        ("RATE_LIMITER_CAPACITY", "1"),
        ("RATE_LIMITER_REFILL_RATE", "0.001"),
        ("MAX_BODY_BYTES", "200"),
        // Nothing listens here: no test of this file reaches a provider.
        ("OLLAMA_BASE_URL", "http://127.0.0.1:9"),
    ])
    .unwrap();
    build_router(AppState::new(settings).unwrap())
}

async fn send(
    router: &Router,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = router
        .clone()
        .oneshot(request.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).expect("a JSON body"))
}

const INVALID: &str = r#"{"messages": []}"#;

fn oversized() -> String {
    format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(300)
    )
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_401_whatever_else_is_wrong() {
    let router = router();
    for key in [None, Some("sk-wrong")] {
        for body in [oversized(), INVALID.to_owned(), "not json".to_owned()] {
            let (status, body) = send(&router, "POST", "/api/v1/chat", key, body).await;
            assert_eq!(status, 401);
            assert_eq!(body["detail"], "Invalid or missing API Key");
        }
    }
}

#[tokio::test]
async fn an_empty_bucket_is_429_before_the_body_is_judged() {
    let router = router();
    // The one token goes to a request whose body fails validation: still charged.
    let (status, _) = send(&router, "POST", "/api/v1/chat", Some(KEY), INVALID).await;
    assert_eq!(status, 422);
    for body in [oversized(), INVALID.to_owned(), "not json".to_owned()] {
        let (status, body) = send(&router, "POST", "/v1/chat", Some(KEY), body).await;
        assert_eq!(status, 429);
        assert_eq!(
            body["detail"],
            "Too many requests. Please wait before trying again."
        );
    }
}

#[tokio::test]
async fn with_a_token_an_oversized_body_is_413_and_an_invalid_one_422() {
    let router = router();
    let (status, body) = send(&router, "POST", "/api/v1/chat", Some(KEY), oversized()).await;
    assert_eq!(status, 413);
    assert_eq!(
        body["detail"],
        "Request body too large: the limit is 200 bytes"
    );
    let (status, body) = send(&router, "POST", "/api/v1/chat", Some(OTHER), INVALID).await;
    assert_eq!(status, 422);
    assert_eq!(
        body["detail"][0]["loc"],
        serde_json::json!(["body", "messages"])
    );
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_json_404_and_405_without_auth() {
    let router = router();
    let (status, body) = send(&router, "POST", "/nope", None, "").await;
    assert_eq!(
        (status, &body["detail"]),
        (StatusCode::NOT_FOUND, &"Not Found".into())
    );
    let (status, body) = send(&router, "GET", "/api/v1/chat", None, "").await;
    assert_eq!(
        (status, &body["detail"]),
        (StatusCode::METHOD_NOT_ALLOWED, &"Method Not Allowed".into())
    );
}
