//! One behaviour suite through the gateway on every Redis a user can configure: one node
//! and a three-master cluster, each with the cache on (the default) and off. Limiter,
//! cache, script reloads and readiness must hold in all four, and the limiter must never
//! fall back to its in-process bucket while Redis is healthy (on a cluster with the cache
//! on it once did, on every request, for a pipeline across slots).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{chat_body, command_calls, upstream_ok, RedisCluster, RedisServer, TestApp};

const KEY_A: &str = "sk-stores-a";
const KEY_B: &str = "sk-stores-b";

/// A Redis deployment of the test's own.
enum Store {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Store {
    fn url(&self) -> String {
        match self {
            Store::Single(redis) => redis.url(),
            Store::Cluster(cluster) => cluster.url(),
        }
    }

    fn nodes(&self) -> Vec<&RedisServer> {
        match self {
            Store::Single(redis) => vec![redis],
            Store::Cluster(cluster) => cluster.nodes.iter().collect(),
        }
    }

    fn keys(&self) -> Vec<String> {
        self.nodes().iter().flat_map(|n| n.keys()).collect()
    }

    fn flush_scripts(&self) {
        for node in self.nodes() {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query(&mut node.conn())
                .unwrap();
        }
    }

    fn evalsha_calls(&self) -> u64 {
        self.nodes()
            .iter()
            .map(|n| command_calls(&mut n.conn(), "evalsha"))
            .sum()
    }
}

async fn wait_for_cache_entry(store: &Store) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(key) = store.keys().into_iter().find(|k| k.starts_with("cache:")) {
            return key;
        }
        assert!(Instant::now() < deadline, "the answer was never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn behaviour_suite(store: Store, cache_on: bool) {
    let label = format!(
        "{} with the cache {}",
        match store {
            Store::Single(_) => "one node",
            Store::Cluster(_) => "a cluster",
        },
        if cache_on { "on" } else { "off" }
    );
    let upstream = upstream_ok().await;
    let app = TestApp::builder()
        .store(&store.url())
        .keys(&format!("{KEY_A},{KEY_B}"))
        .ollama(&upstream)
        .set("CACHE_TTL_SECONDS", if cache_on { "60" } else { "0" })
        .set("RATE_LIMITER_CAPACITY", "4")
        .set("RATE_LIMITER_REFILL_RATE", "0.01")
        .set("RATE_LIMITER_FAILURE_MODE", "closed")
        .set("REDIS_TIMEOUT_MS", "1000")
        .spawn()
        .await;
    assert_eq!(app.get("/ready").await.status(), 200, "{label}: ready");

    // A miss, then the same question again: a hit with the same bytes when the cache is
    // on, a second provider call when it is off.
    let first = app.chat(KEY_A, &chat_body("same question")).await;
    assert_eq!(first.status(), 200, "{label}");
    assert_eq!(first.headers()["x-cache"], "MISS", "{label}");
    assert_eq!(first.headers()["x-ratelimit-remaining"], "3", "{label}");
    let first = first.bytes().await.unwrap();
    if cache_on {
        wait_for_cache_entry(&store).await;
    }
    let again = app.chat(KEY_A, &chat_body("same question")).await;
    assert_eq!(again.status(), 200, "{label}");
    assert_eq!(
        again.headers()["x-cache"],
        if cache_on { "HIT" } else { "MISS" },
        "{label}"
    );
    assert_eq!(again.headers()["x-ratelimit-remaining"], "2", "{label}");
    let again = again.bytes().await.unwrap();
    assert_eq!(
        again == first,
        cache_on,
        "{label}: a hit is the stored answer"
    );
    let calls = upstream.received_requests().await.unwrap().len();
    assert_eq!(
        calls,
        if cache_on { 1 } else { 2 },
        "{label}: provider calls"
    );
    let cached: Vec<String> = store
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("cache:"))
        .collect();
    assert_eq!(cached.len(), usize::from(cache_on), "{label}: {cached:?}");

    // The bucket of four empties, then 429 with the wait (hits are charged too).
    for _ in 0..2 {
        let response = app.chat(KEY_A, &chat_body("another question")).await;
        assert_eq!(response.status(), 200, "{label}");
    }
    let denied = app.chat(KEY_A, &chat_body("one too many")).await;
    assert_eq!(denied.status(), 429, "{label}");
    assert_eq!(denied.headers()["x-ratelimit-remaining"], "0", "{label}");
    let retry: u64 = denied.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((99..=100).contains(&retry), "{label}: Retry-After {retry}");

    // The script is gone from every node: the next call reloads it, unnoticed.
    let evalsha_before = store.evalsha_calls();
    store.flush_scripts();
    let after_flush = app.chat(KEY_B, &chat_body("after the flush")).await;
    assert_eq!(after_flush.status(), 200, "{label}");
    assert_eq!(
        after_flush.headers()["x-ratelimit-remaining"],
        "3",
        "{label}"
    );
    assert!(app.metric("rate_limiter_script_reloads_total").await >= 1.0);
    assert!(
        store.evalsha_calls() > evalsha_before,
        "{label}: EVALSHA used"
    );

    // Every decision came from Redis: no error, no fallback, and readiness agrees.
    for series in [
        "rate_limiter_redis_errors_total{kind=\"error\"}",
        "rate_limiter_redis_errors_total{kind=\"timeout\"}",
        "rate_limiter_fallback_decisions_total{mode=\"closed\"}",
        "cache_errors_total",
    ] {
        assert_eq!(app.metric(series).await, 0.0, "{label}: {series}");
    }
    assert_eq!(app.metric("rate_limit_allowed_total").await, 5.0, "{label}");
    assert_eq!(app.metric("rate_limit_blocked_total").await, 1.0, "{label}");
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 200, "{label}");
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["redis"], "ok", "{label}");

    // Bucket keys hide the API keys.
    for key in store.keys() {
        assert!(
            !key.contains(KEY_A) && !key.contains(KEY_B),
            "{label}: {key}"
        );
    }
}

#[tokio::test]
async fn one_node_with_the_cache_on() {
    behaviour_suite(Store::Single(RedisServer::start()), true).await;
}

#[tokio::test]
async fn one_node_with_the_cache_off() {
    behaviour_suite(Store::Single(RedisServer::start()), false).await;
}

#[tokio::test]
async fn a_cluster_with_the_cache_on() {
    behaviour_suite(Store::Cluster(RedisCluster::start()), true).await;
}

#[tokio::test]
async fn a_cluster_with_the_cache_off() {
    behaviour_suite(Store::Cluster(RedisCluster::start()), false).await;
}
