//! The limiter and cache on a real three-master Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{chat_body, command_calls, hammer, upstream_ok, RedisCluster, TestApp};

const HOT_KEY: &str = "sk-cluster-hot";

/// A gateway on `cluster` with the default cache (on).
async fn cluster_app(
    cluster: &RedisCluster,
    upstream: &wiremock::MockServer,
    keys: &str,
) -> TestApp {
    TestApp::builder()
        .store(&cluster.url())
        .ollama(upstream)
        .keys(keys)
        .set("RATE_LIMITER_CAPACITY", "10")
        .set("RATE_LIMITER_REFILL_RATE", "5")
        .set("REDIS_TIMEOUT_MS", "1000")
        .spawn()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_a_cluster_with_the_cache_on_are_exact_and_survive_script_flush() {
    let cluster = RedisCluster::start();
    let upstream = upstream_ok().await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(Arc::new(cluster_app(&cluster, &upstream, HOT_KEY).await));
    }
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let result = hammer(&apps, HOT_KEY, 24, Duration::from_secs(3), move || {
        for port in ports {
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_connection()
                .unwrap();
            let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
        }
    })
    .await;
    result.assert_exact(
        "3 instances, 3-node cluster, cache on, SCRIPT FLUSH mid-load",
        10.0,
        5.0,
    );
    let mut reloads = 0.0;
    let mut fallbacks = 0.0;
    for app in &apps {
        reloads += app.metric("rate_limiter_script_reloads_total").await;
        fallbacks += app
            .metric("rate_limiter_fallback_decisions_total{mode=\"local\"}")
            .await;
    }
    assert!(reloads >= 1.0, "the flushed script was reloaded");
    assert_eq!(
        fallbacks, 0.0,
        "neither NOSCRIPT nor the cache read with the script fell back to the local bucket"
    );
    let mut hits = 0.0;
    for app in &apps {
        hits += app.metric("cache_hits_total").await;
        assert_eq!(app.metric("cache_errors_total").await, 0.0);
    }
    assert!(hits > 0.0, "the cache answered while limiting");
    let evals: u64 = cluster
        .nodes
        .iter()
        .map(|n| command_calls(&mut n.conn(), "eval"))
        .sum();
    assert!(evals >= 1, "recovered with EVAL on the owning node");
}

#[tokio::test]
async fn identities_spread_over_nodes_and_each_keeps_one_slot() {
    let cluster = RedisCluster::start();
    let upstream = upstream_ok().await;
    let keys: Vec<String> = (0..30).map(|i| format!("sk-spread-{i}")).collect();
    // Buckets that refill slowly: a bucket key expires once its bucket is full again, and
    // every one must still be there when they are counted, however slow the machine.
    let app = TestApp::builder()
        .store(&cluster.url())
        .ollama(&upstream)
        .keys(&keys.join(","))
        .set("RATE_LIMITER_CAPACITY", "10")
        .set("RATE_LIMITER_REFILL_RATE", "0.01")
        .set("REDIS_TIMEOUT_MS", "1000")
        .spawn()
        .await;
    for key in &keys {
        let response = app
            .chat_at("/v1/chat", Some(key), &chat_body("spread"))
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-ratelimit-remaining"], "9");
    }
    let buckets = |node: &crate::common::RedisServer| -> Vec<String> {
        let keys = node.keys();
        keys.into_iter()
            .filter(|k| !k.starts_with("cache:"))
            .collect()
    };
    let per_node: Vec<usize> = cluster.nodes.iter().map(|n| buckets(n).len()).collect();
    println!("bucket keys per cluster node: {per_node:?}");
    assert_eq!(per_node.iter().sum::<usize>(), 30);
    assert!(
        per_node.iter().filter(|n| **n > 0).count() >= 2,
        "keys on more than one node: {per_node:?}"
    );
    for node in &cluster.nodes {
        for key in buckets(node) {
            assert!(key.starts_with("ratelimit:v1:{") && key.ends_with('}'));
            assert!(!keys.iter().any(|k| key.contains(k.as_str())));
        }
    }
}
