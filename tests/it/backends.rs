//! One behaviour suite, run against every limiter backend (in-process, one Redis node and
//! a Redis Cluster), so `memory://`, `redis://` and `redis+cluster://` cannot drift apart.

use std::time::Duration;

use llm_gateway::ratelimit::memory::MemoryLimiter;
use llm_gateway::ratelimit::redis::RedisLimiter;
use llm_gateway::ratelimit::{BucketPolicy, LimiterBackend, Prefetch};
use llm_gateway::serve::redis::RedisConn;
use llm_gateway::settings::StoreUrl;
use llm_gateway::telemetry::metrics::Metrics;

use crate::common::{RedisCluster, RedisServer};

fn policy(capacity: u64, refill_rate: f64) -> BucketPolicy {
    BucketPolicy {
        tier: "default".into(),
        capacity,
        refill_rate,
    }
}

async fn a_new_bucket_is_full_and_drains_one_token_per_request(b: &dyn LimiterBackend) {
    let p = policy(3, 0.01);
    for remaining in [2, 1, 0] {
        let d = b.check("suite:drain", &p).await.unwrap();
        assert!(d.allowed, "{}", b.name());
        assert_eq!(d.remaining, remaining, "{}", b.name());
        assert_eq!(d.retry_after_ms, 0);
    }
    let denied = b.check("suite:drain", &p).await.unwrap();
    assert!(!denied.allowed, "{}", b.name());
    // One token at 0.01/s takes 100 s; the bucket is full in 300 s.
    assert!(
        (99_000..=100_000).contains(&denied.retry_after_ms),
        "{}: {}",
        b.name(),
        denied.retry_after_ms
    );
    assert!(
        (299_000..=300_000).contains(&denied.reset_ms),
        "{}: {}",
        b.name(),
        denied.reset_ms
    );
}

async fn tokens_refill_at_the_rate_and_never_beyond_capacity(b: &dyn LimiterBackend) {
    let p = policy(2, 20.0);
    assert!(b.check("suite:refill", &p).await.unwrap().allowed);
    assert!(b.check("suite:refill", &p).await.unwrap().allowed);
    assert!(
        !b.check("suite:refill", &p).await.unwrap().allowed,
        "{}",
        b.name()
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(
        b.check("suite:refill", &p).await.unwrap().allowed,
        "{}: 2.4 tokens refilled",
        b.name()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = b.check("suite:refill", &p).await.unwrap();
    assert_eq!(
        d.remaining,
        1,
        "{}: capped at capacity, minus this request",
        b.name()
    );
}

async fn fractional_rates_work(b: &dyn LimiterBackend) {
    let p = policy(1, 0.5);
    assert!(b.check("suite:fraction", &p).await.unwrap().allowed);
    let denied = b.check("suite:fraction", &p).await.unwrap();
    assert!(!denied.allowed);
    assert!(
        (1_900..=2_000).contains(&denied.retry_after_ms),
        "{}: {}",
        b.name(),
        denied.retry_after_ms
    );
}

async fn buckets_are_independent_per_key(b: &dyn LimiterBackend) {
    let p = policy(1, 0.01);
    assert!(b.check("suite:a", &p).await.unwrap().allowed);
    assert!(!b.check("suite:a", &p).await.unwrap().allowed);
    assert!(
        b.check("suite:b", &p).await.unwrap().allowed,
        "{}",
        b.name()
    );
}

async fn a_lower_capacity_applies_at_once(b: &dyn LimiterBackend) {
    assert!(
        b.check("suite:shrink", &policy(10, 0.01))
            .await
            .unwrap()
            .allowed
    );
    let d = b.check("suite:shrink", &policy(2, 0.01)).await.unwrap();
    assert!(d.allowed);
    assert_eq!(
        d.remaining,
        1,
        "{}: tokens clipped to the new capacity",
        b.name()
    );
}

async fn run_suite(backend: &dyn LimiterBackend) {
    a_new_bucket_is_full_and_drains_one_token_per_request(backend).await;
    tokens_refill_at_the_rate_and_never_beyond_capacity(backend).await;
    fractional_rates_work(backend).await;
    buckets_are_independent_per_key(backend).await;
    a_lower_capacity_applies_at_once(backend).await;
}

#[tokio::test]
async fn the_memory_backend_passes_the_behaviour_suite() {
    run_suite(&MemoryLimiter::new()).await;
}

#[tokio::test]
async fn the_redis_backend_passes_the_behaviour_suite() {
    let redis = RedisServer::start();
    let conn = RedisConn::open(&StoreUrl::Redis(redis.url()), Duration::from_secs(1), 1)
        .unwrap()
        .unwrap();
    run_suite(&RedisLimiter::new(conn, Metrics::new())).await;
}

#[tokio::test]
async fn the_redis_cluster_backend_passes_the_behaviour_suite_and_reads_the_cache_with_it() {
    let cluster = RedisCluster::start();
    let nodes = cluster
        .nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port))
        .collect();
    let conn = RedisConn::open(&StoreUrl::Cluster(nodes), Duration::from_secs(1), 1)
        .unwrap()
        .unwrap();
    let backend = RedisLimiter::new(conn.clone(), Metrics::new());
    run_suite(&backend).await;
    // Buckets and cache entries hash to different slots, on different nodes: the read
    // that comes with the script must still work (a pipeline across slots cannot).
    let mut writer = conn.connection();
    for n in 0..8 {
        let cache_key = format!("cache:{n}");
        let _: () = redis::cmd("SET")
            .arg(&cache_key)
            .arg("stored")
            .query_async(&mut writer)
            .await
            .unwrap();
        let (decision, prefetched) = backend
            .check_and_prefetch(&format!("suite:prefetch:{n}"), &policy(5, 1.0), &cache_key)
            .await
            .unwrap();
        assert!(decision.allowed);
        assert_eq!(
            prefetched,
            Prefetch::Found(bytes::Bytes::from_static(b"stored"))
        );
        let (_, missing) = backend
            .check_and_prefetch("suite:prefetch", &policy(5, 1.0), "cache:absent")
            .await
            .unwrap();
        assert_eq!(missing, Prefetch::Missing);
    }
}
