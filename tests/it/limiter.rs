//! The distributed limiter on real Redis: exactness across instances, NOSCRIPT recovery,
//! key hygiene, headers, failure modes, and the in-process mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{chat_body, hammer, upstream_ok, RedisServer, TestApp};

pub const KEY: &str = "sk-limiter-secret-key";

pub async fn app_with(
    redis_url: &str,
    upstream: &wiremock::MockServer,
    extra: &[(&str, &str)],
) -> TestApp {
    TestApp::builder()
        .store(redis_url)
        .keys(KEY)
        .ollama(upstream)
        .set("CACHE_TTL_SECONDS", "0")
        .settings(extra)
        .spawn()
        .await
}

#[tokio::test]
async fn redis_keys_never_contain_the_raw_api_key() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app_with(&redis.url(), &upstream, &[("CACHE_TTL_SECONDS", "60")]).await;
    assert_eq!(app.chat(KEY, &chat_body("hello")).await.status(), 200);
    let keys = redis.keys();
    assert!(keys.iter().any(|k| k.starts_with("ratelimit:")), "{keys:?}");
    let mut conn = redis.conn();
    for key in &keys {
        assert!(!key.contains(KEY), "{key}");
        let kind: String = redis::cmd("TYPE").arg(key).query(&mut conn).unwrap();
        let dump: Vec<u8> = if kind == "hash" {
            let fields: Vec<Vec<u8>> = redis::cmd("HGETALL").arg(key).query(&mut conn).unwrap();
            fields.concat()
        } else {
            redis::cmd("GET").arg(key).query(&mut conn).unwrap()
        };
        assert!(
            !String::from_utf8_lossy(&dump).contains(KEY),
            "{key} holds the key"
        );
    }
    let bucket = keys.iter().find(|k| k.starts_with("ratelimit:")).unwrap();
    assert!(
        bucket.contains('{') && bucket.ends_with('}'),
        "hash tag in {bucket}"
    );
    let fields: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(bucket).query(&mut conn).unwrap();
    assert_eq!(fields["tokens"].parse::<f64>().unwrap().round(), 4.0);
    assert!(
        fields["last_refill"].parse::<f64>().unwrap() > 1.0e9,
        "seconds from Redis TIME"
    );
    let ttl_ms: i64 = redis::cmd("PTTL").arg(bucket).query(&mut conn).unwrap();
    assert!(
        ttl_ms > 0 && ttl_ms <= 1000,
        "idle key expires when full again (1 token at 1/s): {ttl_ms}"
    );
}

#[tokio::test]
async fn script_flush_is_recovered_without_the_client_noticing() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app_with(&redis.url(), &upstream, &[("RATE_LIMITER_CAPACITY", "100")]).await;
    assert_eq!(app.chat(KEY, &chat_body("a")).await.status(), 200);
    let reloads_before = app.metric("rate_limiter_script_reloads_total").await;
    for remaining in [98, 97, 96] {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut redis.conn())
            .unwrap();
        let response = app.chat(KEY, &chat_body("a")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["x-ratelimit-remaining"],
            remaining.to_string().as_str()
        );
        // The decision was Redis's (not the local fallback's): the stored bucket agrees.
        let bucket = redis
            .keys()
            .into_iter()
            .find(|k| k.starts_with("ratelimit:"))
            .unwrap();
        let tokens: String = redis::cmd("HGET")
            .arg(&bucket)
            .arg("tokens")
            .query(&mut redis.conn())
            .unwrap();
        assert_eq!(tokens.parse::<f64>().unwrap().floor() as u64, remaining);
    }
    assert_eq!(
        app.metric("rate_limiter_script_reloads_total").await - reloads_before,
        3.0
    );
    assert_eq!(
        app.metric("rate_limiter_redis_errors_total{kind=\"error\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_redis_restart_is_recovered_and_the_script_reloaded() {
    let mut redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app_with(
        &redis.url(),
        &upstream,
        &[("RATE_LIMITER_CAPACITY", "1000")],
    )
    .await;
    assert_eq!(app.chat(KEY, &chat_body("a")).await.status(), 200);
    redis.restart();
    assert!(redis.keys().is_empty(), "restart lost all state");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Never an error for the client: during reconnection the local bucket decides.
        let response = app.chat(KEY, &chat_body("a")).await;
        assert_eq!(response.status(), 200);
        if redis.keys().iter().any(|k| k.starts_with("ratelimit:")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the limiter never used the restarted Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app.metric("rate_limiter_script_reloads_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_redis_admit_exactly_capacity_plus_refill() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let settings = [
        ("RATE_LIMITER_CAPACITY", "10"),
        ("RATE_LIMITER_REFILL_RATE", "5"),
    ];
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(Arc::new(app_with(&redis.url(), &upstream, &settings).await));
    }
    let result = hammer(&apps, KEY, 24, Duration::from_secs(3), || {}).await;
    result.assert_exact("3 instances, 1 redis", 10.0, 5.0);
    let upstream_calls = upstream.received_requests().await.unwrap().len() as f64;
    assert_eq!(
        upstream_calls, result.admitted,
        "every admitted request reached the provider"
    );
}

#[tokio::test]
async fn headers_follow_the_real_bucket_including_partial_refill() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app_with(
        &redis.url(),
        &upstream,
        &[
            ("RATE_LIMITER_CAPACITY", "3"),
            ("RATE_LIMITER_REFILL_RATE", "2"),
        ],
    )
    .await;
    for remaining in ["2", "1", "0"] {
        let response = app.chat(KEY, &chat_body("h")).await;
        assert_eq!(response.status(), 200);
        let h = response.headers();
        assert_eq!(h["x-ratelimit-limit"], "3");
        assert_eq!(h["x-ratelimit-remaining"], remaining);
        assert_eq!(h["ratelimit-policy"], "\"default\";q=3;w=2");
        assert!(h.get("retry-after").is_none());
    }
    let response = app.chat(KEY, &chat_body("h")).await;
    assert_eq!(response.status(), 429);
    let h = response.headers();
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(h["retry-after"], "1");
    let retry_ms: u64 = h["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(
        (1..=500).contains(&retry_ms),
        "one token takes 500 ms at 2/s: {retry_ms}"
    );
    assert_eq!(h["x-ratelimit-reset"], "2");
    assert_eq!(h["ratelimit"], "\"default\";r=0;t=2");

    // After 1.1 s, 2.2 tokens have refilled: one request leaves 1 whole token.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = app.chat(KEY, &chat_body("h")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ratelimit-remaining"], "1");
    // Missing 1.8 tokens at 2/s: full in 0.9 s, shown as 1 whole second.
    assert_eq!(response.headers()["x-ratelimit-reset"], "1");
}

#[tokio::test]
async fn memory_mode_limits_with_the_same_semantics() {
    let upstream = upstream_ok().await;
    let app = app_with(
        "memory://",
        &upstream,
        &[
            ("RATE_LIMITER_CAPACITY", "2"),
            ("RATE_LIMITER_REFILL_RATE", "0.5"),
        ],
    )
    .await;
    let statuses: Vec<u16> = {
        let mut s = Vec::new();
        for _ in 0..3 {
            s.push(app.chat(KEY, &chat_body("m")).await.status().as_u16());
        }
        s
    };
    assert_eq!(statuses, [200, 200, 429]);
    let response = app.chat(KEY, &chat_body("m")).await;
    assert_eq!(response.headers()["retry-after"], "2");
    assert_eq!(
        app.get("/ready").await.json::<Value>().await.unwrap()["checks"]["memory"],
        "ok"
    );
}

async fn stopped_redis_app(mode: &str, upstream: &wiremock::MockServer) -> (RedisServer, TestApp) {
    let mut redis = RedisServer::start();
    let app = app_with(
        &redis.url(),
        upstream,
        &[
            ("RATE_LIMITER_CAPACITY", "2"),
            ("RATE_LIMITER_REFILL_RATE", "0.01"),
            ("RATE_LIMITER_FAILURE_MODE", mode),
            ("REDIS_TIMEOUT_MS", "100"),
        ],
    )
    .await;
    redis.stop();
    (redis, app)
}

#[tokio::test]
async fn local_failure_mode_keeps_limiting_while_redis_is_down() {
    let upstream = upstream_ok().await;
    let (_redis, app) = stopped_redis_app("local", &upstream).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let started = Instant::now();
        statuses.push(app.chat(KEY, &chat_body("x")).await.status().as_u16());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a request waited on Redis"
        );
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    assert_eq!(
        app.metric("rate_limiter_fallback_decisions_total{mode=\"local\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn open_failure_mode_admits_while_redis_is_down() {
    let upstream = upstream_ok().await;
    let (_redis, app) = stopped_redis_app("open", &upstream).await;
    for _ in 0..4 {
        assert_eq!(app.chat(KEY, &chat_body("x")).await.status(), 200);
    }
    assert_eq!(
        app.metric("rate_limiter_fallback_decisions_total{mode=\"open\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn closed_failure_mode_answers_503_naming_the_limiter() {
    let upstream = upstream_ok().await;
    let (_redis, app) = stopped_redis_app("closed", &upstream).await;
    let response = app.chat(KEY, &chat_body("x")).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("Rate limiter") && detail.contains("redis"),
        "{detail}"
    );
    assert!(!detail.contains(KEY));
    assert!(upstream.received_requests().await.unwrap().is_empty());
}
