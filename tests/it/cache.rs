//! The response cache on real Redis: identical hits, the key's fields, single flight,
//! TTL, fail-open when Redis is gone, and cache writes riding with limiter calls.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use llm_gateway::cache::redis::RedisCache;
use llm_gateway::cache::Cache;
use llm_gateway::ratelimit::redis::RedisLimiter;
use llm_gateway::ratelimit::{BucketPolicy, LimiterBackend, Prefetch};
use llm_gateway::serve::deferred::RIDE_ALONG_MAX_BYTES;
use llm_gateway::serve::redis::RedisConn;
use llm_gateway::settings::StoreUrl;
use llm_gateway::telemetry::metrics::Metrics;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::{chat_body, ollama_reply, upstream_ok, RedisServer, TestApp};

const KEY: &str = "sk-cache-test";

async fn app(redis_url: &str, upstream: &MockServer, extra: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .store(redis_url)
        .keys(KEY)
        .ollama(upstream)
        .set("RATE_LIMITER_CAPACITY", "1000")
        .settings(extra)
        .spawn()
        .await
}

fn assert_stored_for_30_seconds(redis: &RedisServer, key: &str) {
    let ttl: i64 = redis::cmd("TTL").arg(key).query(&mut redis.conn()).unwrap();
    assert!((1..=30).contains(&ttl), "{key}: TTL {ttl}");
}

#[tokio::test]
async fn a_hit_returns_the_identical_body() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis.url(), &upstream, &[("CACHE_TTL_SECONDS", "30")]).await;
    let first = app.chat(KEY, &chat_body("same")).await;
    assert_eq!(first.headers()["x-cache"], "MISS");
    let first = first.bytes().await.unwrap();
    // Let the background store land.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = app.chat_at("/v1/chat", Some(KEY), &chat_body("same")).await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-cache"], "HIT");
    assert_eq!(second.bytes().await.unwrap(), first, "same bytes, same id");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 1);
    assert_eq!(app.metric("cache_hits_total").await, 1.0);
    assert_eq!(app.metric("cache_misses_total").await, 1.0);

    let cache_key = redis
        .keys()
        .into_iter()
        .find(|k| k.starts_with("cache:"))
        .unwrap();
    assert_eq!(cache_key.len(), "cache:".len() + 64);
    assert_stored_for_30_seconds(&redis, &cache_key);
}

#[tokio::test]
async fn model_temperature_and_tokens_are_part_of_the_key() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis.url(), &upstream, &[]).await;
    let base = json!({"messages": [{"role": "user", "content": "q"}]});
    let variants = [
        base.clone(),
        json!({"messages": [{"role": "user", "content": "q"}], "model": "mistral"}),
        json!({"messages": [{"role": "user", "content": "q"}], "temperature": 0.1}),
        json!({"messages": [{"role": "user", "content": "q"}], "max_tokens": 5}),
        json!({"messages": [{"role": "user", "content": "q"}], "model_hint": "secure"}),
    ];
    for body in &variants {
        let response = app.chat(KEY, body).await;
        assert_eq!(response.headers()["x-cache"], "MISS", "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        upstream.received_requests().await.unwrap().len(),
        variants.len()
    );
    // Unknown fields and `stream` do not change the answer, so they share the entry.
    let same = json!({"messages": [{"role": "user", "content": "q"}], "stream": true, "x": 1});
    assert_eq!(app.chat(KEY, &same).await.headers()["x-cache"], "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_make_one_provider_call() {
    let redis = RedisServer::start();
    let upstream = MockServer::start().await;
    Mock::given(path("/api/chat"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(ollama_reply("shared"))
                .set_delay(Duration::from_millis(400)),
        )
        .mount(&upstream)
        .await;
    let app = std::sync::Arc::new(app(&redis.url(), &upstream, &[]).await);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let response = app.chat(KEY, &chat_body("stampede")).await;
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 1);
    assert_eq!(ids.len(), 1, "everyone got the one answer");
}

#[tokio::test]
async fn ttl_zero_disables_the_cache() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis.url(), &upstream, &[("CACHE_TTL_SECONDS", "0")]).await;
    for _ in 0..2 {
        let response = app.chat(KEY, &chat_body("nocache")).await;
        assert_eq!(response.headers()["x-cache"], "MISS");
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
    assert!(!redis.keys().iter().any(|k| k.starts_with("cache:")));
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis.url(), &upstream, &[("CACHE_TTL_SECONDS", "1")]).await;
    app.chat(KEY, &chat_body("ttl")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        app.chat(KEY, &chat_body("ttl")).await.headers()["x-cache"],
        "HIT"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        app.chat(KEY, &chat_body("ttl")).await.headers()["x-cache"],
        "MISS"
    );
}

#[tokio::test]
async fn a_dead_redis_makes_the_cache_a_miss_not_a_failure() {
    let mut redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis.url(), &upstream, &[("REDIS_TIMEOUT_MS", "100")]).await;
    redis.stop();
    for _ in 0..2 {
        let response = app.chat(KEY, &chat_body("down")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-cache"], "MISS");
    }
    assert!(app.metric("cache_errors_total").await >= 2.0);
}

#[tokio::test]
async fn memory_mode_caches_in_process() {
    let upstream = upstream_ok().await;
    let app = app("memory://", &upstream, &[]).await;
    let first = app
        .chat(KEY, &chat_body("mem"))
        .await
        .bytes()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = app.chat(KEY, &chat_body("mem")).await;
    assert_eq!(second.headers()["x-cache"], "HIT");
    assert_eq!(second.bytes().await.unwrap(), first);
}

#[tokio::test]
async fn limit_and_cache_lookup_share_one_redis_round_trip() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(&redis.url(), &upstream, &[]).await;
    app.chat(KEY, &chat_body("one trip")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gets = redis.command_calls("get");
    let evalshas = redis.command_calls("evalsha");
    let response = app.chat(KEY, &chat_body("one trip")).await;
    assert_eq!(response.headers()["x-cache"], "HIT");
    assert_eq!(redis.command_calls("evalsha") - evalshas, 1);
    assert_eq!(
        redis.command_calls("get") - gets,
        1,
        "the GET rode with the EVALSHA, once"
    );
}

#[tokio::test]
async fn the_order_of_checks_holds_when_the_limiter_fails_closed() {
    let mut redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = app(
        &redis.url(),
        &upstream,
        &[
            ("RATE_LIMITER_FAILURE_MODE", "closed"),
            ("REDIS_TIMEOUT_MS", "100"),
        ],
    )
    .await;
    redis.stop();
    // A bad body is a 422 before the limiter's 503 (CONTRACT §2 order).
    assert_eq!(app.chat(KEY, &json!({"messages": []})).await.status(), 422);
    assert_eq!(app.chat(KEY, &chat_body("fine")).await.status(), 503);
}

/// The Redis limiter and cache wired as the app wires them on one node: both on one
/// connection, whose deferred writes (the cache's) wait for its next round trip (the
/// limiter's). The test runs on no worker thread, so all share the non-worker queue.
fn limiter_and_cache(redis: &RedisServer) -> (RedisLimiter, Arc<RedisCache>, RedisConn) {
    let conn = RedisConn::open(&StoreUrl::Redis(redis.url()), Duration::from_secs(1), 1)
        .unwrap()
        .unwrap();
    (
        RedisLimiter::new(conn.clone(), Metrics::new()),
        Arc::new(RedisCache::new(conn.clone(), Duration::from_secs(1))),
        conn,
    )
}

fn roomy_bucket() -> BucketPolicy {
    BucketPolicy {
        tokens: Default::default(),
        tier: "default".into(),
        capacity: 100,
        refill_rate: 1.0,
    }
}

/// Starts `cache.set` and runs it until its store is queued (the test runtime has one
/// thread, so the spawned task runs at the yield).
async fn queue_store(
    cache: &Arc<RedisCache>,
    key: &'static str,
    body: impl Into<Bytes>,
) -> JoinHandle<()> {
    let (cache, body) = (cache.clone(), body.into());
    let task = tokio::spawn(async move {
        cache
            .set(key, body, Duration::from_secs(30))
            .await
            .expect("stored");
    });
    tokio::task::yield_now().await;
    task
}

#[tokio::test]
async fn a_waiting_cache_write_rides_with_the_next_limiter_call_which_already_reads_it() {
    let redis = RedisServer::start();
    let (limiter, cache, conn) = limiter_and_cache(&redis);
    let store = queue_store(&cache, "cache:ride", &b"answer"[..]).await;
    assert_eq!(conn.writes_waiting(), 1, "waiting for a ride");
    let (decision, prefetched) = limiter
        .check_and_prefetch(
            "ratelimit:ride",
            &roomy_bucket(),
            Default::default(),
            None,
            "cache:ride",
        )
        .await
        .unwrap();
    assert!(decision.allowed);
    assert_eq!(prefetched, Prefetch::Found(Bytes::from_static(b"answer")));
    store.await.unwrap();
    // Well past the wait: the store did not write itself a second time.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(redis.command_calls("setex"), 1);
    assert_stored_for_30_seconds(&redis, "cache:ride");
}

#[tokio::test]
async fn a_cache_write_no_limiter_call_takes_writes_itself() {
    let redis = RedisServer::start();
    let (_limiter, cache, _) = limiter_and_cache(&redis);
    let store = queue_store(&cache, "cache:alone", &b"solo"[..]).await;
    tokio::time::timeout(Duration::from_secs(2), store)
        .await
        .expect("written within the wait and one round trip")
        .unwrap();
    assert_eq!(
        cache.get("cache:alone").await.unwrap(),
        Some(Bytes::from_static(b"solo"))
    );
    assert_eq!(redis.command_calls("setex"), 1);
}

#[tokio::test]
async fn a_riding_write_survives_a_script_reload_and_a_broken_cache_read_fails_only_the_read() {
    let redis = RedisServer::start();
    let (limiter, cache, _) = limiter_and_cache(&redis);
    // A value of the wrong type under the cache key: its GET fails with WRONGTYPE.
    redis::cmd("HSET")
        .arg("cache:hash")
        .arg("field")
        .arg("value")
        .exec(&mut redis.conn())
        .unwrap();
    let store = queue_store(&cache, "cache:reload", &b"kept"[..]).await;
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .exec(&mut redis.conn())
        .unwrap();
    let (decision, prefetched) = limiter
        .check_and_prefetch(
            "ratelimit:reload",
            &roomy_bucket(),
            Default::default(),
            None,
            "cache:hash",
        )
        .await
        .unwrap();
    assert!(decision.allowed, "decided by EVAL after NOSCRIPT");
    assert_eq!(prefetched, Prefetch::Failed);
    store.await.unwrap();
    assert_eq!(
        redis.command_calls("setex"),
        1,
        "sent once, not again with EVAL"
    );
    assert_eq!(
        cache.get("cache:reload").await.unwrap(),
        Some(Bytes::from_static(b"kept"))
    );
}

#[tokio::test]
async fn a_large_answer_is_written_at_once_instead_of_waiting_for_a_ride() {
    let redis = RedisServer::start();
    let (_limiter, cache, conn) = limiter_and_cache(&redis);
    let answer = vec![b'a'; RIDE_ALONG_MAX_BYTES + 1];
    let store = queue_store(&cache, "cache:large", answer.clone()).await;
    assert_eq!(conn.writes_waiting(), 0, "not queued");
    store.await.unwrap();
    assert_eq!(
        cache.get("cache:large").await.unwrap(),
        Some(Bytes::from(answer))
    );
}
