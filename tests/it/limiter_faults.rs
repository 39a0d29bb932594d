//! The limiter when Redis is frozen, stopped or restarted: bounded latency, the breaker,
//! each failure mode, and the deny cache sparing Redis.

use std::time::{Duration, Instant};

use crate::common::{chat_body, upstream_ok, RedisServer, TestApp};
use crate::limiter::{app_with, KEY};

const FAULT_SETTINGS: [(&str, &str); 4] = [
    ("REDIS_TIMEOUT_MS", "100"),
    ("RATE_LIMITER_BREAKER_THRESHOLD", "3"),
    ("RATE_LIMITER_BREAKER_COOLDOWN_MS", "500"),
    ("RATE_LIMITER_REFILL_RATE", "0.01"),
];

async fn fault_app(
    redis: &RedisServer,
    upstream: &wiremock::MockServer,
    mode: &str,
    capacity: &str,
) -> TestApp {
    let mut settings = FAULT_SETTINGS.to_vec();
    settings.push(("RATE_LIMITER_FAILURE_MODE", mode));
    settings.push(("RATE_LIMITER_CAPACITY", capacity));
    app_with(&redis.url(), upstream, &settings).await
}

/// Sends `n` requests one after another; returns statuses and the slowest latency.
async fn timed(app: &TestApp, n: usize) -> (Vec<u16>, Duration) {
    let mut statuses = Vec::new();
    let mut worst = Duration::ZERO;
    for _ in 0..n {
        let started = Instant::now();
        statuses.push(app.chat(KEY, &chat_body("f")).await.status().as_u16());
        worst = worst.max(started.elapsed());
    }
    (statuses, worst)
}

#[tokio::test]
async fn a_frozen_redis_never_stalls_requests_and_the_breaker_recovers_when_it_returns() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = fault_app(&redis, &upstream, "local", "3").await;
    assert_eq!(
        timed(&app, 1).await.0,
        [200],
        "warm: script loaded, connection up"
    );
    redis.freeze();
    let (statuses, worst) = timed(&app, 12).await;
    println!("frozen redis, mode local: worst latency {worst:?}, statuses {statuses:?}");
    assert!(
        worst < Duration::from_secs(1),
        "a request waited {worst:?} on a frozen Redis"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "the local bucket kept limiting: {statuses:?}"
    );
    let timeouts = app
        .metric("rate_limiter_redis_errors_total{kind=\"timeout\"}")
        .await;
    assert!(
        (3.0..12.0).contains(&timeouts),
        "the breaker stopped paying the timeout: {timeouts}"
    );
    assert_eq!(app.metric("rate_limiter_breaker_state").await, 1.0, "open");

    redis.thaw();
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metric("rate_limiter_breaker_state").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the breaker never closed after Redis returned"
        );
        let _ = app.chat(KEY, &chat_body("probe")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.metric("rate_limiter_backend_up{backend=\"redis\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn every_failure_mode_holds_with_redis_frozen_and_nothing_answers_500() {
    for (mode, expected) in [("open", 200u16), ("closed", 503)] {
        let redis = RedisServer::start();
        let upstream = upstream_ok().await;
        let app = fault_app(&redis, &upstream, mode, "1").await;
        redis.freeze();
        let (statuses, worst) = timed(&app, 6).await;
        println!("frozen redis, mode {mode}: worst latency {worst:?}");
        assert!(worst < Duration::from_secs(1), "{mode}: waited {worst:?}");
        assert!(
            statuses.iter().all(|s| *s == expected),
            "{mode}: {statuses:?}"
        );
        redis.thaw();
    }
}

#[tokio::test]
async fn the_limiter_comes_back_to_redis_after_a_restart_in_every_mode() {
    for mode in ["local", "open", "closed"] {
        let mut redis = RedisServer::start();
        let upstream = upstream_ok().await;
        let app = fault_app(&redis, &upstream, mode, "1000").await;
        assert_eq!(timed(&app, 1).await.0, [200]);
        redis.stop();
        let (statuses, _) = timed(&app, 3).await;
        assert!(
            statuses.iter().all(|s| [200, 503].contains(s)),
            "{mode}: {statuses:?}"
        );
        redis.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = app.chat(KEY, &chat_body("back")).await.status();
            if status == 200 && redis.keys().iter().any(|k| k.starts_with("ratelimit:")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: never used the restarted Redis"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn denied_keys_are_answered_without_a_redis_round_trip() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = fault_app(&redis, &upstream, "local", "1").await;
    assert_eq!(timed(&app, 2).await.0, [200, 429]);
    let before = redis.command_calls("evalsha");
    let (statuses, _) = timed(&app, 20).await;
    assert!(statuses.iter().all(|s| *s == 429));
    assert_eq!(
        redis.command_calls("evalsha"),
        before,
        "no Redis call while the denial holds"
    );
    assert_eq!(app.metric("rate_limiter_local_denials_total").await, 20.0);
    assert_eq!(app.metric("rate_limit_blocked_total").await, 21.0);
    let response = app.chat(KEY, &chat_body("f")).await;
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (90..=100).contains(&retry),
        "the deny cache reports the real wait: {retry}"
    );
}

fn acl(redis: &RedisServer, rules: &[&str]) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(rules)
        .query(&mut redis.conn())
        .unwrap();
}

#[tokio::test]
async fn readiness_is_503_while_every_limiter_call_fails_even_though_redis_answers_ping() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let mut settings = FAULT_SETTINGS.to_vec();
    settings.extend([
        ("RATE_LIMITER_CAPACITY", "1000"),
        ("CACHE_TTL_SECONDS", "60"),
    ]);
    let app = app_with(&redis.url(), &upstream, &settings).await;
    assert_eq!(app.get("/ready").await.status(), 200);

    // Scripts refused, everything else allowed: PING works, no limiter call does.
    acl(&redis, &["-@scripting"]);
    let pong: String = redis::cmd("PING").query(&mut redis.conn()).unwrap();
    assert_eq!(pong, "PONG");
    let (statuses, _) = timed(&app, 4).await;
    assert_eq!(statuses, [200; 4], "the local bucket keeps limiting");
    assert!(
        app.metric("rate_limiter_fallback_decisions_total{mode=\"local\"}")
            .await
            >= 3.0
    );
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["redis"], "down");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("Rate limiter backend (redis)"), "{detail}");
    assert!(detail.contains("circuit breaker open"), "{detail}");
    // Past the cool-down, readiness probes with a real limiter call, which still fails.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("limiter calls fail"));

    // Scripts allowed again: ready once the breaker's cool-down lets a probe through,
    // and requests are decided by Redis again.
    acl(&redis, &["+@all"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.get("/ready").await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready after the scripts came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fallbacks = app
        .metric("rate_limiter_fallback_decisions_total{mode=\"local\"}")
        .await;
    let (statuses, _) = timed(&app, 3).await;
    assert_eq!(statuses, [200; 3]);
    assert_eq!(
        app.metric("rate_limiter_fallback_decisions_total{mode=\"local\"}")
            .await,
        fallbacks,
        "decided by Redis again"
    );
    assert_eq!(app.metric("rate_limiter_breaker_state").await, 0.0);
}
