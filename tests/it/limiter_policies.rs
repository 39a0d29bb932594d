//! Tiers, anonymous access with trusted proxies, and hot reload on SIGHUP.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{chat_body, upstream_ok, GatewayProcess, RedisServer, TestApp};

#[tokio::test]
async fn each_tier_gets_its_own_capacity_and_keys_stay_isolated() {
    let redis = RedisServer::start();
    let upstream = upstream_ok().await;
    let app = TestApp::builder()
        .store(&redis.url())
        .ollama(&upstream)
        .keys("sk-free,sk-gold,sk-free-2")
        .set("CACHE_TTL_SECONDS", "0")
        .set("RATE_LIMITER_CAPACITY", "2")
        .set("RATE_LIMITER_REFILL_RATE", "0.01")
        .set("RATE_LIMITER_TIERS", "gold:5:0.01")
        .set("API_KEY_TIERS", "sk-gold=gold")
        .spawn()
        .await;
    let statuses = |key: &'static str, n: usize| {
        let app = &app;
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(app.chat(key, &chat_body("t")).await.status().as_u16());
            }
            out
        }
    };
    assert_eq!(statuses("sk-free", 3).await, [200, 200, 429]);
    let gold = app.chat("sk-gold", &chat_body("t")).await;
    assert_eq!(gold.headers()["x-ratelimit-limit"], "5");
    assert_eq!(gold.headers()["ratelimit-policy"], "\"gold\";q=5;w=500");
    assert_eq!(statuses("sk-gold", 5).await, [200, 200, 200, 200, 429]);
    // Another default-tier key has its own bucket.
    assert_eq!(statuses("sk-free-2", 1).await, [200]);
}

#[tokio::test]
async fn anonymous_clients_are_limited_per_ip_and_forwarded_for_only_counts_from_trusted_proxies() {
    let upstream = upstream_ok().await;
    let uri = upstream.uri();
    let base = [
        ("REDIS_URL", "memory://"),
        ("OLLAMA_BASE_URL", uri.as_str()),
        ("CACHE_TTL_SECONDS", "0"),
        ("API_KEYS", "sk-real"),
        ("ALLOW_ANONYMOUS", "true"),
        ("RATE_LIMITER_TIERS", "anonymous:1:0.01"),
    ];
    let send = |app: &TestApp, xff: &str| {
        let request = app
            .client
            .post(format!("{}/v1/chat", app.url))
            .header("x-forwarded-for", xff.to_owned())
            .json(&chat_body("anon"));
        async move { request.send().await.unwrap() }
    };

    let mut trusted = base.to_vec();
    trusted.push(("TRUSTED_PROXIES", "127.0.0.1"));
    let app = TestApp::spawn(&trusted).await;
    let first = send(&app, "203.0.113.1").await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers()["ratelimit-policy"],
        "\"anonymous\";q=1;w=100"
    );
    assert_eq!(send(&app, "203.0.113.1").await.status(), 429);
    assert_eq!(
        send(&app, "203.0.113.2").await.status(),
        200,
        "another client behind the proxy"
    );
    assert_eq!(send(&app, "2001:db8::1").await.status(), 200);
    assert_eq!(
        send(&app, "2001:db8::2").await.status(),
        429,
        "same IPv6 /64"
    );
    // A wrong key is refused, never downgraded to anonymous.
    let wrong = app.chat_at("/v1/chat", Some("nope"), &chat_body("x")).await;
    assert_eq!(wrong.status(), 401);

    let untrusted = TestApp::spawn(&base).await;
    assert_eq!(send(&untrusted, "203.0.113.1").await.status(), 200);
    assert_eq!(
        send(&untrusted, "203.0.113.2").await.status(),
        429,
        "spoofed header ignored: both are 127.0.0.1"
    );

    let closed = TestApp::spawn(&[("REDIS_URL", "memory://"), ("API_KEYS", "sk-real")]).await;
    assert_eq!(
        send(&closed, "203.0.113.1").await.status(),
        401,
        "anonymous access is off by default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_and_tiers_under_load_without_dropping_requests() {
    let upstream = upstream_ok().await;
    let uri = upstream.uri();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "api_keys = \"sk-old\"\nrate_limiter_capacity = 1000000\nrate_limiter_refill_rate = 1000000\n",
    )
    .unwrap();
    let config_path = config.to_str().unwrap().to_owned();
    let gateway = GatewayProcess::start(&[
        ("REDIS_URL", "memory://"),
        ("OLLAMA_BASE_URL", uri.as_str()),
        ("CACHE_TTL_SECONDS", "0"),
        ("GATEWAY_CONFIG", config_path.as_str()),
    ]);
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat", gateway.url);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = client
                    .post(&url)
                    .header("X-API-Key", "sk-old")
                    .json(&chat_body("l"))
                    .send()
                    .await;
                statuses.push(
                    response
                        .expect("no connection is dropped")
                        .status()
                        .as_u16(),
                );
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client
            .post(&url)
            .header("X-API-Key", "sk-new")
            .json(&chat_body("n"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    std::fs::write(
        &config,
        "api_keys = \"sk-old,sk-new\"\nrate_limiter_capacity = 1000000\nrate_limiter_refill_rate = 1000000\nrate_limiter_tiers = \"gold:7:1\"\napi_key_tiers = \"sk-new=gold\"\n",
    )
    .unwrap();
    gateway.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let reloaded = loop {
        let response = client
            .post(&url)
            .header("X-API-Key", "sk-new")
            .json(&chat_body("n"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break response;
        }
        assert!(Instant::now() < deadline, "reload never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reloaded.headers()["x-ratelimit-limit"], "7");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let statuses = task.await.unwrap();
        total += statuses.len();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "a request failed across the reload: {statuses:?}"
        );
    }
    assert!(total > 10, "the load ran ({total} requests)");

    // A broken file is refused and the running configuration kept.
    std::fs::write(
        &config,
        "api_keys = \"sk-old\"\nrate_limiter_tiers = \"bad\"\n",
    )
    .unwrap();
    gateway.signal("-HUP");
    crate::common::wait_for_line(&gateway.log, "configuration reload failed")
        .expect("reload error logged");
    let still = client
        .post(&url)
        .header("X-API-Key", "sk-new")
        .json(&chat_body("n"))
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 200);
    let body: Value = still.json().await.unwrap();
    assert_eq!(body["provider"], "ollama");
    assert!(!gateway.output().contains("sk-new"), "keys never logged");
}
