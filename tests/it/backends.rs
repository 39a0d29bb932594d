//! One behaviour suite, run against every limiter backend (in-process, one Redis node and
//! a Redis Cluster), so `memory://`, `redis://` and `redis+cluster://` cannot drift apart.

use std::sync::Arc;
use std::time::Duration;

use llm_gateway::ratelimit::memory::MemoryLimiter;
use llm_gateway::ratelimit::redis::RedisLimiter;
use llm_gateway::ratelimit::{
    BucketPolicy, Decision, Limit, LimiterBackend, Prefetch, Reserve, SettleBatch, Settlement,
    TokenLimits,
};
use llm_gateway::serve::redis::RedisConn;
use llm_gateway::settings::BudgetPeriod;
use llm_gateway::settings::StoreUrl;
use llm_gateway::telemetry::metrics::Metrics;

use crate::common::{RedisCluster, RedisServer};

fn policy(capacity: u64, refill_rate: f64) -> BucketPolicy {
    BucketPolicy {
        tier: "default".into(),
        capacity,
        refill_rate,
        tokens: TokenLimits::default(),
    }
}

/// A request that reserves no LLM tokens.
const NO_TOKENS: Reserve = Reserve { tokens: 0 };

/// A roomy request bucket with a token bucket of `per_minute` and a daily `budget`.
fn token_policy(per_minute: u64, budget: u64) -> BucketPolicy {
    BucketPolicy {
        tokens: TokenLimits {
            per_minute,
            budget,
            period: BudgetPeriod::Day,
            default_max_tokens: 100,
        },
        ..policy(100, 100.0)
    }
}

/// One request's decision at `key` under `p`, reserving no LLM tokens.
async fn plain(b: &dyn LimiterBackend, key: &str, p: &BucketPolicy) -> Decision {
    b.check(key, p, NO_TOKENS, None).await.unwrap()
}

fn reserve(tokens: u64) -> Reserve {
    Reserve { tokens }
}

/// A batch numbered `seq` from instance `instance`, settling a reservation of `reserved`
/// tokens admitted as `admitted` to `used` tokens.
fn batch(instance: &str, seq: u64, admitted: &Decision, reserved: u64, used: u64) -> SettleBatch {
    let mut batch = SettleBatch {
        instance: Arc::from(instance),
        seq,
        ..SettleBatch::default()
    };
    batch.add(Settlement {
        surplus: reserved as i64 - used as i64,
        bucket: admitted.tokens.is_some(),
        period: admitted.budget_period,
    });
    batch
}

// Keys of the token scenarios carry a hash tag, as real bucket keys do: on a cluster a
// client's buckets, budget and reservations must share a slot.

async fn reservations_take_every_limit_or_none(b: &dyn LimiterBackend) {
    let key = "{suite:tok}";
    let p = token_policy(600, 1000);
    let first = b.check(key, &p, reserve(500), None).await.unwrap();
    assert!(first.allowed, "{}", b.name());
    assert_eq!(first.tokens.unwrap().remaining, 100, "{}", b.name());
    assert_eq!(first.budget.unwrap().remaining, 500, "{}", b.name());
    let refused = b.check(key, &p, reserve(200), None).await.unwrap();
    assert_eq!(refused.denied_by, Some(Limit::Tokens), "{}", b.name());
    // 100 tokens short at 10/s: ten seconds (a few ms of refill since may shave it).
    assert!(
        (9_900..=10_000).contains(&refused.retry_after_ms),
        "{}: {}",
        b.name(),
        refused.retry_after_ms
    );
    assert_eq!(refused.budget.unwrap().remaining, 500, "nothing charged");
    assert_eq!(
        refused.remaining,
        99,
        "{}: nor the request bucket",
        b.name()
    );
    let huge = b
        .check("{suite:huge}", &p, reserve(601), None)
        .await
        .unwrap();
    assert_eq!(huge.denied_by, Some(Limit::TooLarge), "{}", b.name());
}

async fn settling_refunds_charges_debt_and_applies_once(b: &dyn LimiterBackend) {
    let key = "{suite:settle}";
    let p = token_policy(600, 1000);
    let timeout = Duration::from_secs(1);
    let first = b.check(key, &p, reserve(500), None).await.unwrap();
    assert!(first.allowed);
    let refund = batch("gw-a", 7, &first, 500, 50);
    b.settle(key, &p, &refund, timeout).await.unwrap();
    b.settle(key, &p, &refund, timeout).await.unwrap();
    let next = b.check(key, &p, reserve(10), None).await.unwrap();
    let left = next.tokens.unwrap().remaining;
    assert!((540..=541).contains(&left), "{}: {left}", b.name());
    assert_eq!(next.budget.unwrap().remaining, 940, "{}", b.name());
    // A debt riding with the next request is applied before that request is decided;
    // the refund sent once more, or a batch numbered below it, changes nothing.
    let debt = batch("gw-a", 8, &next, 10, 310);
    let after = b.check(key, &p, reserve(1), Some(&debt)).await.unwrap();
    let left = after.tokens.unwrap().remaining;
    assert!((239..=241).contains(&left), "{}: {left}", b.name());
    assert_eq!(after.budget.unwrap().remaining, 639, "{}", b.name());
    for stale in [&refund, &debt, &batch("gw-a", 5, &next, 10, 0)] {
        let again = b.check(key, &p, reserve(0), Some(stale)).await.unwrap();
        assert_eq!(again.budget.unwrap().remaining, 639, "{}", b.name());
    }
    // Another instance's batches are its own, whatever their numbers.
    let other = batch("gw-b", 1, &after, 1, 0);
    b.settle(key, &p, &other, timeout).await.unwrap();
    let seen = b.check(key, &p, reserve(0), None).await.unwrap();
    assert_eq!(seen.budget.unwrap().remaining, 640, "{}", b.name());
    // A denied request still applies what rode with it.
    let refused = b
        .check(key, &p, reserve(900), Some(&batch("gw-a", 9, &after, 1, 0)))
        .await
        .unwrap();
    assert_eq!(refused.denied_by, Some(Limit::TooLarge), "{}", b.name());
    let last = b.check(key, &p, reserve(1), None).await.unwrap();
    assert_eq!(last.budget.unwrap().remaining, 640, "{}", b.name());
}

async fn a_spent_budget_refuses_until_the_period_ends(b: &dyn LimiterBackend) {
    let key = "{suite:budget}";
    let p = token_policy(0, 300);
    assert!(b.check(key, &p, reserve(200), None).await.unwrap().allowed);
    let spent = b.check(key, &p, reserve(200), None).await.unwrap();
    assert_eq!(spent.denied_by, Some(Limit::Budget), "{}", b.name());
    assert!(spent.tokens.is_none());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let left = (now / 86_400.0).floor() * 86_400.0 + 86_400.0 - now;
    let retry = spent.retry_after_ms as f64 / 1000.0;
    assert!(
        (retry - left).abs() < 2.0,
        "{}: {retry} vs {left}",
        b.name()
    );
    assert!(b.check(key, &p, reserve(100), None).await.unwrap().allowed);
}

async fn a_new_bucket_is_full_and_drains_one_token_per_request(b: &dyn LimiterBackend) {
    let p = policy(3, 0.01);
    for remaining in [2, 1, 0] {
        let d = plain(b, "suite:drain", &p).await;
        assert!(d.allowed, "{}", b.name());
        assert_eq!(d.remaining, remaining, "{}", b.name());
        assert_eq!(d.retry_after_ms, 0);
    }
    let denied = plain(b, "suite:drain", &p).await;
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
    assert!(plain(b, "suite:refill", &p).await.allowed);
    assert!(plain(b, "suite:refill", &p).await.allowed);
    assert!(!plain(b, "suite:refill", &p).await.allowed, "{}", b.name());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(
        plain(b, "suite:refill", &p).await.allowed,
        "{}: 2.4 tokens refilled",
        b.name()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = plain(b, "suite:refill", &p).await;
    assert_eq!(
        d.remaining,
        1,
        "{}: capped at capacity, minus this request",
        b.name()
    );
}

async fn fractional_rates_work(b: &dyn LimiterBackend) {
    let p = policy(1, 0.5);
    assert!(plain(b, "suite:fraction", &p).await.allowed);
    let denied = plain(b, "suite:fraction", &p).await;
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
    assert!(plain(b, "suite:a", &p).await.allowed);
    assert!(!plain(b, "suite:a", &p).await.allowed);
    assert!(plain(b, "suite:b", &p).await.allowed, "{}", b.name());
}

async fn a_lower_capacity_applies_at_once(b: &dyn LimiterBackend) {
    assert!(plain(b, "suite:shrink", &policy(10, 0.01)).await.allowed);
    let d = plain(b, "suite:shrink", &policy(2, 0.01)).await;
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
    reservations_take_every_limit_or_none(backend).await;
    settling_refunds_charges_debt_and_applies_once(backend).await;
    a_spent_budget_refuses_until_the_period_ends(backend).await;
}

#[tokio::test]
async fn the_memory_backend_passes_the_behaviour_suite() {
    run_suite(&MemoryLimiter::new()).await;
}

/// The Redis backend on its own connection to `redis`.
fn redis_backend(redis: &RedisServer) -> RedisLimiter {
    let conn = RedisConn::open(&StoreUrl::Redis(redis.url()), Duration::from_secs(1), 1)
        .unwrap()
        .unwrap();
    RedisLimiter::new(conn, Metrics::new())
}

#[tokio::test]
async fn the_redis_backend_passes_the_behaviour_suite() {
    let redis = RedisServer::start();
    let backend = redis_backend(&redis);
    run_suite(&backend).await;

    // Each instance keeps one watermark field in a client's hash; one silent for over an
    // hour (its instance stopped) goes when a new instance first settles there.
    let key = "{suite:watermarks}";
    let p = token_policy(600, 1000);
    let admitted = backend.check(key, &p, reserve(10), None).await.unwrap();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg("s:stopped")
        .arg(now_us - 7_200_000_000)
        .arg("s:quiet")
        .arg(now_us - 60_000_000)
        .query(&mut redis.conn())
        .unwrap();
    let fresh = batch("gw-new", now_us, &admitted, 10, 5);
    backend
        .settle(key, &p, &fresh, Duration::from_secs(1))
        .await
        .unwrap();
    let mut fields: Vec<String> = redis::cmd("HKEYS")
        .arg(key)
        .query(&mut redis.conn())
        .unwrap();
    fields.sort();
    assert_eq!(
        fields,
        ["last_refill", "s:gw-new", "s:quiet", "t", "tokens"],
        "the limits, and a watermark per instance heard of within the hour"
    );
}

/// The key's expiry, in ms since the epoch, and the one the script recorded in field `t`.
fn expiries(redis: &RedisServer, key: &str) -> (i64, i64) {
    let actual: i64 = redis::cmd("PEXPIRETIME")
        .arg(key)
        .query(&mut redis.conn())
        .unwrap();
    let recorded = redis.token_state(key).expect("field `t`")[3] as i64;
    (actual, recorded)
}

#[tokio::test]
async fn a_token_limited_key_outlives_its_budget_period_even_after_a_call_without_them() {
    let redis = RedisServer::start();
    let backend = redis_backend(&redis);
    let key = "{suite:expiry}";
    let tokens = token_policy(600, 1000);
    let admit = || async {
        backend
            .check(key, &tokens, reserve(10), None)
            .await
            .unwrap()
    };
    assert!(admit().await.allowed);
    let (first, recorded) = expiries(&redis, key);
    assert_eq!(first, recorded, "field `t` knows the key's expiry");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let day_ends_ms = (now_ms / 86_400_000 + 1) * 86_400_000;
    assert!(
        first >= day_ends_ms.max(now_ms + 3_600_000),
        "past the budget's day and at least an hour: {first} vs now {now_ms}"
    );

    // A later call finds the expiry far enough and leaves it.
    assert!(admit().await.allowed);
    assert_eq!(expiries(&redis, key), (first, first));

    // The same key used without token limits (a tier changed, or an instance not yet
    // reloaded) sets the expiry to its request bucket's time to full (a few tokens at
    // 0.01/s: minutes); the next call with token limits notices and lengthens it again,
    // even one it refuses (600 tokens asked, ~580 in the bucket).
    let long_enough = |expiry: i64| expiry >= day_ends_ms.max(now_ms + 3_600_000);
    let shorten = || async {
        assert!(plain(&backend, key, &policy(100, 0.01)).await.allowed);
        let (shortened, _) = expiries(&redis, key);
        assert!(!long_enough(shortened), "{shortened} vs now {now_ms}");
    };
    shorten().await;
    assert!(admit().await.allowed);
    let (restored, recorded) = expiries(&redis, key);
    assert_eq!(restored, recorded);
    assert!(long_enough(restored), "{restored}");
    shorten().await;
    let refused = backend
        .check(key, &tokens, reserve(600), None)
        .await
        .unwrap();
    assert_eq!(refused.denied_by, Some(Limit::Tokens));
    let (restored, _) = expiries(&redis, key);
    assert!(long_enough(restored), "{restored}");

    // A key the script did not write expires when its request bucket is full again.
    let fresh = "{suite:expiry-fresh}";
    assert!(plain(&backend, fresh, &policy(100, 100.0)).await.allowed);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(fresh)
        .query(&mut redis.conn())
        .unwrap();
    assert!((1..=10).contains(&ttl), "one token at 100/s: {ttl} ms");
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
            .check_and_prefetch(
                &format!("suite:prefetch:{n}"),
                &policy(5, 1.0),
                Default::default(),
                None,
                &cache_key,
            )
            .await
            .unwrap();
        assert!(decision.allowed);
        assert_eq!(
            prefetched,
            Prefetch::Found(bytes::Bytes::from_static(b"stored"))
        );
        let (_, missing) = backend
            .check_and_prefetch(
                "suite:prefetch",
                &policy(5, 1.0),
                Default::default(),
                None,
                "cache:absent",
            )
            .await
            .unwrap();
        assert_eq!(missing, Prefetch::Missing);
    }
}
