//! Token limits and budgets (CONTRACT §13) over real HTTP against `mock-llm`: admission in
//! the limiter's script call, reconciliation to the real usage (once, also after a failed
//! attempt, also for a stream its client cut), exactness across instances on one Redis
//! and on a cluster, each door's headers and 429s, and the failure modes.
//!
//! `mock-llm` counts a prompt's words as its prompt tokens and answers `Echo: <last user
//! message>`, so a request of `n` words uses `2n + 1` tokens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{MockLlm, RedisCluster, RedisServer, TestApp, TestAppBuilder};

const KEY: &str = "sk-tokens";

/// A gateway in front of `mock` for `KEY`, with a roomy request bucket, on `store`.
fn gateway(mock: &MockLlm, store: &str) -> TestAppBuilder {
    TestApp::builder()
        .store(store)
        .keys(KEY)
        .set("OLLAMA_BASE_URL", mock.url.as_str())
        .set("RATE_LIMITER_CAPACITY", "100000")
        .set("RATE_LIMITER_REFILL_RATE", "100000")
        .set("REDIS_TIMEOUT_MS", "1000")
}

/// An OpenAI chat body of `content` asking for at most `max_tokens`.
fn body(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": "llama3.1",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    })
}

/// What `body(content, max_tokens)` reserves: ceil(prompt bytes / 4) + max_tokens.
fn reservation(content: &str, max_tokens: u64) -> u64 {
    content.len().div_ceil(4) as u64 + max_tokens
}

async fn openai(app: &TestApp, body: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .expect("request")
}

/// Sends `body` to the OpenAI door of `app` without waiting for the answer.
fn in_background(app: &TestApp, body: Value) -> tokio::task::JoinHandle<reqwest::Response> {
    let (client, url) = (app.client.clone(), app.url.clone());
    tokio::spawn(async move {
        client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    })
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

fn number(response: &reqwest::Response, name: &str) -> u64 {
    header(response, name).parse().unwrap()
}

/// The real tokens of an OpenAI answer.
async fn used(response: reqwest::Response) -> u64 {
    let answer: Value = response.json().await.unwrap();
    answer["usage"]["total_tokens"].as_u64().unwrap()
}

/// The Redis key of `KEY`'s limits: one hash holds its buckets, budget and reservations.
fn bucket() -> String {
    llm_gateway::ratelimit::bucket_key(&format!("key:{KEY}"))
}

/// The budget spent so far, as Redis holds it.
fn budget_used(redis: &RedisServer) -> u64 {
    redis.token_state(&bucket()).map_or(0, |t| t[2] as u64)
}

/// Reservations `app` made and has not yet settled in Redis.
async fn unsettled(app: &TestApp) -> f64 {
    app.metric("rate_limiter_reservations_unsettled").await
}

/// Waits until every reservation `app` made is settled in Redis (5 s at most), so the
/// counts are final.
async fn settled(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while unsettled(app).await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(unsettled(app).await, 0.0, "every reservation was settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_door_shows_its_token_headers_and_a_reservation_is_settled_to_real_usage() {
    let mock = MockLlm::start(&[]);
    let redis = RedisServer::start();
    let app = gateway(&mock, &redis.url())
        .set("RATE_LIMITER_TOKENS_PER_MINUTE", "6000")
        .set("RATE_LIMITER_TOKEN_BUDGET", "1000000")
        .spawn()
        .await;
    let content = "how many tokens is this";
    let first = openai(&app, &body(content, 100)).await;
    assert_eq!(first.status(), 200);
    assert_eq!(number(&first, "x-ratelimit-limit-tokens"), 6000);
    let reserved = reservation(content, 100);
    assert_eq!(
        number(&first, "x-ratelimit-remaining-tokens"),
        6000 - reserved,
        "a new bucket is full, less this request's reservation"
    );
    let reset = header(&first, "x-ratelimit-reset-tokens");
    assert!(reset.ends_with('s') && reset.len() >= 2, "{reset}");
    assert_eq!(
        header(&first, "ratelimit-policy"),
        "\"default\";q=100000;w=1, \"default-tokens\";q=6000;w=60, \"default-budget\";q=1000000;w=86400"
    );
    let state = header(&first, "ratelimit").to_owned();
    assert!(
        state.contains(&format!("\"default-budget\";r={}", 1_000_000 - reserved)),
        "{state}"
    );
    let real = used(first).await;
    assert_eq!(real, 5 + 6, "five words asked, six answered");
    settled(&app).await;
    assert_eq!(
        budget_used(&redis),
        real,
        "the surplus was refunded to the budget"
    );

    // The same question again: a hit, which costs no tokens.
    let hit = openai(&app, &body(content, 100)).await;
    assert_eq!(hit.headers()["x-cache"], "HIT");
    settled(&app).await;
    assert_eq!(budget_used(&redis), real, "a hit costs nothing");

    let anthropic = app
        .client
        .post(format!("{}/v1/messages", app.url))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": "llama3.1",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "anthropic tokens"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.status(), 200);
    assert_eq!(number(&anthropic, "anthropic-ratelimit-tokens-limit"), 6000);
    // The bucket refills 100 a second, so it is about full again, less this request's
    // 4 + 50 tokens.
    let remaining = number(&anthropic, "anthropic-ratelimit-tokens-remaining");
    assert!(
        remaining <= 6000 - 54 && remaining >= 6000 - 54 - reserved,
        "{remaining}"
    );
    let reset = header(&anthropic, "anthropic-ratelimit-tokens-reset");
    assert!(reset.ends_with('Z') && reset.contains('T'), "{reset}");
    let answer: Value = anthropic.json().await.unwrap();
    let anthropic_used = answer["usage"]["input_tokens"].as_u64().unwrap()
        + answer["usage"]["output_tokens"].as_u64().unwrap();
    settled(&app).await;
    assert_eq!(budget_used(&redis), real + anthropic_used);

    // The original door counts too, and its 200 keeps the original's headers.
    let original = app
        .chat(
            KEY,
            &json!({"messages": [{"role": "user", "content": "original door"}]}),
        )
        .await;
    assert_eq!(original.status(), 200);
    assert!(original.headers().get("x-ratelimit-limit").is_some());
    let answer: Value = original.json().await.unwrap();
    let original_used = answer["usage"]["total_tokens"].as_u64().unwrap();
    settled(&app).await;
    assert_eq!(budget_used(&redis), real + anthropic_used + original_used);
    assert!(
        app.metric("tokens_total{kind=\"prompt\",provider=\"ollama\"}")
            .await
            > 0.0
    );
}

#[tokio::test]
async fn a_request_larger_than_the_bucket_and_a_spent_budget_are_429s_not_to_retry() {
    let mock = MockLlm::start(&[]);
    let app = gateway(&mock, "memory://")
        .set("RATE_LIMITER_TOKENS_PER_MINUTE", "150")
        .spawn()
        .await;
    let too_large = openai(&app, &body("hello", 200)).await;
    assert_eq!(too_large.status(), 429);
    assert_eq!(too_large.headers()["x-should-retry"], "false");
    let error: Value = too_large.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("too large"));
    let fits = openai(&app, &body("hello", 100)).await;
    assert_eq!(fits.status(), 200, "the refusal charged nothing");
    // That used 3 of its 102, so the bucket holds 147 and a bit (48 until the refund
    // lands): 148 must wait, and may retry.
    let wait = openai(&app, &body("hello again", 145)).await;
    assert_eq!(wait.status(), 429);
    assert!(wait.headers().get("x-should-retry").is_none());
    assert!(number(&wait, "retry-after") >= 1);
    let error: Value = wait.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");

    let spender = gateway(&mock, "memory://")
        .set("RATE_LIMITER_TOKEN_BUDGET", "200")
        .spawn()
        .await;
    // Forty words: 80 bytes reserve 20 + 50, and use 40 + 41 = 81 (a debt of 11).
    let words = |tag: &str| format!("{tag} {}", "w ".repeat(39).trim_end());
    for tag in ["a", "b"] {
        let response = openai(&spender, &body(&words(tag), 50)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(used(response).await, 81);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 162 spent: 70 more would pass 200.
    let spent = openai(&spender, &body(&words("c"), 50)).await;
    assert_eq!(spent.status(), 429);
    assert_eq!(spent.headers()["x-should-retry"], "false");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let retry_after = number(&spent, "retry-after");
    assert!(
        retry_after.abs_diff(to_midnight) <= 2,
        "Retry-After {retry_after} is the time to the next UTC day ({to_midnight})"
    );
    let error: Value = spent.json().await.unwrap();
    assert_eq!(error["error"]["type"], "insufficient_quota");
    assert_eq!(error["error"]["code"], "insufficient_quota");
    // A small request still fits what is left.
    assert_eq!(openai(&spender, &body("small", 20)).await.status(), 200);

    let anthropic = spender
        .client
        .post(format!("{}/v1/messages", spender.url))
        .header("x-api-key", KEY)
        .json(&json!({"model": "llama3.1", "max_tokens": 100,
            "messages": [{"role": "user", "content": "over budget"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.status(), 429);
    assert_eq!(anthropic.headers()["x-should-retry"], "false");
    let error: Value = anthropic.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("budget"));

    assert_eq!(
        app.metric("rate_limit_denials_total{reason=\"too_large\"}")
            .await,
        1.0
    );
    assert_eq!(
        app.metric("rate_limit_denials_total{reason=\"tokens\"}")
            .await,
        1.0
    );
    assert_eq!(
        spender
            .metric("rate_limit_denials_total{reason=\"budget\"}")
            .await,
        2.0
    );
    assert_eq!(spender.metric("rate_limit_blocked_total").await, 2.0);
}

/// Hammers `KEY` on `apps` from twelve clients for three seconds with questions that
/// all miss, and checks that the real tokens admitted stay within capacity + refill·T
/// plus one reservation, and come close to it (demand exceeds supply).
async fn admitted_tokens_are_exact(apps: Vec<Arc<TestApp>>, label: &str) {
    let (capacity, per_second) = (1200.0, 20.0);
    let real = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..12 {
        let app = apps[worker % apps.len()].clone();
        let (real, statuses) = (real.clone(), statuses.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while start.elapsed() < Duration::from_secs(3) {
                n += 1;
                let content = format!("exact {worker} {n} alpha beta");
                let response = openai(&app, &body(&content, 20)).await;
                let status = response.status().as_u16();
                if status == 200 {
                    assert_eq!(response.headers()["x-cache"], "MISS");
                    real.fetch_add(used(response).await, Ordering::Relaxed);
                }
                statuses.lock().unwrap().push(status);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let statuses = statuses.lock().unwrap().clone();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let denied = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        admitted + denied,
        statuses.len(),
        "{label}: only 200s and 429s"
    );
    let real = real.load(Ordering::Relaxed) as f64;
    let bound = capacity + per_second * elapsed + reservation("exact 11 999 alpha beta", 20) as f64;
    println!("{label}: {admitted} admitted, {denied} denied, {real} real tokens, bound {bound:.0}");
    assert!(
        real <= bound,
        "{label}: {real} tokens admitted, more than {bound:.0}"
    );
    assert!(
        real >= capacity * 0.9,
        "{label}: {real} tokens admitted, far below the bucket's {capacity}"
    );
    assert!(denied > 0, "{label}: demand exceeded supply");
}

fn exact_gateway(mock: &MockLlm, store: &str) -> TestAppBuilder {
    gateway(mock, store).set("RATE_LIMITER_TOKENS_PER_MINUTE", "1200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_redis_admit_no_more_tokens_than_the_bucket() {
    let mock = MockLlm::start(&[]);
    let redis = RedisServer::start();
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(Arc::new(exact_gateway(&mock, &redis.url()).spawn().await));
    }
    admitted_tokens_are_exact(apps.clone(), "one Redis").await;
    for app in &apps {
        settled(app).await;
        assert_eq!(
            app.metric("rate_limiter_reconcile_failures_total").await,
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_a_cluster_with_the_cache_on_admit_no_more_tokens_than_the_bucket() {
    let mock = MockLlm::start(&[]);
    let cluster = RedisCluster::start();
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(Arc::new(exact_gateway(&mock, &cluster.url()).spawn().await));
    }
    admitted_tokens_are_exact(apps.clone(), "3-master cluster").await;
    for app in &apps {
        settled(app).await;
    }
    // One key holds the client's limits and each instance's settlement watermark, on the
    // node owning its slot (the others answer MOVED).
    let fields: Vec<Vec<String>> = cluster
        .nodes
        .iter()
        .filter_map(|n| {
            redis::cmd("HKEYS")
                .arg(bucket())
                .query::<Vec<String>>(&mut n.conn())
                .ok()
                .filter(|fields| !fields.is_empty())
        })
        .collect();
    assert_eq!(
        fields.len(),
        1,
        "one node holds the client's hash: {fields:?}"
    );
    let watermarks = fields[0].iter().filter(|f| f.starts_with("s:")).count();
    assert!(
        (1..=3).contains(&watermarks),
        "a watermark per instance that settled there, no field per reservation: {:?}",
        fields[0]
    );
    let mut limits: Vec<&str> = fields[0]
        .iter()
        .map(String::as_str)
        .filter(|f| !f.starts_with("s:"))
        .collect();
    limits.sort();
    assert_eq!(limits, ["last_refill", "t", "tokens"]);
    for app in &apps {
        assert_eq!(
            app.metric("rate_limiter_fallback_decisions_total{mode=\"local\"}")
                .await,
            0.0
        );
        assert_eq!(
            app.metric("rate_limiter_reconcile_failures_total").await,
            0.0
        );
    }
}

/// A gateway with a budget in front of `mock` (which must answer after 150 ms or more)
/// and `redis`, Redis calls bounded by `timeout_ms`, and a request of `content` sent to
/// it: returned once its reservation is charged and while the upstream still answers.
async fn reserved_in_flight(
    mock: &MockLlm,
    redis: &RedisServer,
    timeout_ms: &str,
    content: &str,
) -> (TestApp, tokio::task::JoinHandle<reqwest::Response>) {
    let app = gateway(mock, &redis.url())
        .set("RATE_LIMITER_TOKEN_BUDGET", "100000")
        .set("REDIS_TIMEOUT_MS", timeout_ms)
        .spawn()
        .await;
    let request = in_background(&app, body(content, 100));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(budget_used(redis), reservation(content, 100), "reserved");
    (app, request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_whose_first_attempts_time_out_is_applied_once() {
    let mock = MockLlm::start(&["--latency-ms", "400"]);
    let redis = RedisServer::start();
    let content = "settle me once please";
    let (app, request) = reserved_in_flight(&mock, &redis, "100", content).await;
    let evalsha_before = redis.command_calls("evalsha");
    // Redis answers nobody for 900 ms: the reconciliation sent when the answer comes
    // (at ~400 ms) times out, and so does its first retry; they run when the pause ends.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(900)
        .arg("ALL")
        .query(&mut redis.conn())
        .unwrap();
    let response = request.await.unwrap();
    assert_eq!(response.status(), 200);
    let real = used(response).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    settled(&app).await;
    assert_eq!(
        budget_used(&redis),
        real,
        "settled to the real usage once, though several attempts ran"
    );
    assert!(
        redis.command_calls("evalsha") - evalsha_before >= 2,
        "the reconciliation was tried again"
    );
    assert_eq!(
        app.metric("rate_limiter_reconcile_failures_total").await,
        0.0
    );

    // A reconciliation that meets NOSCRIPT loads its script again.
    let reloads = app.metric("rate_limiter_script_reloads_total").await;
    let content = "after a script flush";
    let request = in_background(&app, body(content, 100));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.conn())
        .unwrap();
    let second = used(request.await.unwrap()).await;
    settled(&app).await;
    assert_eq!(budget_used(&redis), real + second);
    assert!(app.metric("rate_limiter_script_reloads_total").await > reloads);
}

/// The limiter's script calls and cache reads sent to `redis` so far (cache writes are
/// left out: they wait to ride with a later call, so they fall where they may).
fn decisions_and_reads(redis: &RedisServer) -> u64 {
    ["evalsha", "eval", "get"]
        .iter()
        .map(|command| redis.command_calls(command))
        .sum()
}

/// What Redis was sent before the upstream answered a miss (the request still at the
/// upstream), and after it: `(before, after)`.
async fn commands_around_a_miss(mock: &MockLlm, token_limits: bool, content: &str) -> (u64, u64) {
    let redis = RedisServer::start();
    let mut builder = gateway(mock, &redis.url());
    if token_limits {
        builder = builder
            .set("RATE_LIMITER_TOKENS_PER_MINUTE", "1000000")
            .set("RATE_LIMITER_TOKEN_BUDGET", "100000000");
    }
    let app = builder.spawn().await;
    // The first request loads the scripts and opens the connections.
    assert_eq!(openai(&app, &body("warm up", 10)).await.status(), 200);
    settled(&app).await;
    let start = decisions_and_reads(&redis);
    let request = in_background(&app, body(content, 10));
    // mock-llm holds the request 600 ms; at 300 ms it is at the upstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = decisions_and_reads(&redis) - start;
    assert_eq!(request.await.unwrap().status(), 200);
    settled(&app).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // the cache write, also after it
    (before, decisions_and_reads(&redis) - start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits_add_no_redis_command_before_the_upstream_and_one_after_the_answer() {
    let mock = MockLlm::start(&["--latency-ms", "600"]);
    let (plain_before, plain_after) = commands_around_a_miss(&mock, false, "no tokens").await;
    let (tokens_before, tokens_after) = commands_around_a_miss(&mock, true, "tokens").await;
    assert!(plain_before >= 1, "the admission went first");
    assert_eq!(
        tokens_before, plain_before,
        "admission and reservation are one script call"
    );
    assert_eq!(
        tokens_after,
        plain_after + 1,
        "one reconciliation, after the answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_rides_with_the_same_clients_next_request() {
    let mock = MockLlm::start(&[]);
    let redis = RedisServer::start();
    let app = gateway(&mock, &redis.url())
        .set("RATE_LIMITER_TOKEN_BUDGET", "1000000")
        .set("CACHE_TTL_SECONDS", "0")
        .spawn()
        .await;
    assert_eq!(openai(&app, &body("warm up", 10)).await.status(), 200);
    settled(&app).await;
    let (evalsha_before, spent_before) = (redis.command_calls("evalsha"), budget_used(&redis));
    let mut real = 0;
    for n in 0..10 {
        let content = format!("one request after another {n}");
        let response = openai(&app, &body(&content, 50)).await;
        assert_eq!(response.status(), 200);
        let budget_left: u64 = header(&response, "ratelimit")
            .rsplit("r=")
            .next()
            .and_then(|rest| rest.split(';').next())
            .unwrap()
            .parse()
            .unwrap();
        // The budget this request saw had every earlier request settled to its real
        // usage: a settlement is applied before the next decision.
        assert_eq!(
            budget_left,
            1_000_000 - spent_before - real - reservation(&content, 50),
            "request {n} saw the earlier ones settled"
        );
        real += used(response).await;
    }
    settled(&app).await;
    assert_eq!(budget_used(&redis), spent_before + real);
    // Ten requests, one script call each; a settlement sent on its own only when the next
    // request came later than the wait (the last one, and any delayed by a busy machine).
    let calls = redis.command_calls("evalsha") - evalsha_before;
    assert!(
        (10..=13).contains(&calls),
        "{calls} script calls for 10 requests and their settlements"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_does_not_wait_for_its_reconciliation() {
    let mock = MockLlm::start(&["--latency-ms", "300"]);
    let redis = RedisServer::start();
    let content = "answer me first";
    let (app, request) = reserved_in_flight(&mock, &redis, "5000", content).await;
    // Writes wait 2 s: an answer that waited for its reconciliation (a write) would come
    // after the pause, with the budget already settled.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("WRITE")
        .query(&mut redis.conn())
        .unwrap();
    let response = request.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        budget_used(&redis),
        reservation(content, 100),
        "the answer came while its reconciliation still waited"
    );
    let real = used(response).await;
    settled(&app).await;
    assert_eq!(budget_used(&redis), real, "then it was settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_charged_at_its_end_and_also_when_its_client_cuts_it() {
    let mock = MockLlm::start(&["--chunk-delay-ms", "200"]);
    let redis = RedisServer::start();
    let app = gateway(&mock, &redis.url())
        .set("RATE_LIMITER_TOKEN_BUDGET", "100000")
        .set("CACHE_TTL_SECONDS", "0")
        .spawn()
        .await;
    let content = "one two three four five six seven eight";
    let stream_body = |content: &str| {
        json!({
            "model": "llama3.1",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 100,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    };
    let whole = openai(&app, &stream_body(content)).await;
    assert_eq!(whole.status(), 200);
    let text = whole.text().await.unwrap();
    let usage: Value = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find_map(|chunk| chunk.get("usage").filter(|u| !u.is_null()).cloned())
        .expect("a usage chunk");
    let real = usage["total_tokens"].as_u64().unwrap();
    assert_eq!(real, 8 + 9);
    settled(&app).await;
    assert_eq!(
        budget_used(&redis),
        real,
        "a finished stream is settled to its usage"
    );

    // A client that reads the first chunk and hangs up.
    let mut cut = openai(&app, &stream_body("cut me off early please")).await;
    assert_eq!(cut.status(), 200);
    let first = cut.chunk().await.unwrap().expect("a first chunk");
    assert!(!first.is_empty());
    drop(cut);
    settled(&app).await;
    let charged = budget_used(&redis) - real;
    let reserved = reservation("cut me off early please", 100);
    assert!(
        charged > 0 && charged < reserved,
        "a cut stream is charged what it used so far ({charged}), not nothing, not all it reserved ({reserved})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits_keep_their_failure_mode_when_redis_is_down() {
    let mock = MockLlm::start(&[]);
    let mut redis = RedisServer::start();
    let spawn = |mode: &'static str| {
        gateway(&mock, &redis.url())
            .set("RATE_LIMITER_TOKENS_PER_MINUTE", "100")
            .set("RATE_LIMITER_FAILURE_MODE", mode)
            .set("REDIS_TIMEOUT_MS", "200")
            .set("CACHE_TTL_SECONDS", "0")
            .spawn()
    };
    let (local, open, closed) = (
        spawn("local").await,
        spawn("open").await,
        spawn("closed").await,
    );
    redis.stop();
    // 8 bytes and `max_tokens`.
    let ask_for = |app: &TestApp, n: u32, max_tokens: u64| {
        let body = body(&format!("hi you {n}"), max_tokens);
        let (client, url) = (app.client.clone(), app.url.clone());
        async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    // A reservation of 80 of the bucket's 100.
    let ask = |app: &TestApp, n: u32| ask_for(app, n, 78);
    let first = ask(&local, 1).await;
    assert_eq!(first.status(), 200, "local: the in-process bucket admits");
    assert_eq!(number(&first, "x-ratelimit-limit-tokens"), 100);
    // It used 7 of its 80: 93 and a bit are left, and 95 do not fit.
    let second = ask_for(&local, 2, 93).await;
    assert_eq!(second.status(), 429, "local: and keeps limiting tokens");
    assert_eq!(ask(&open, 1).await.status(), 200);
    assert_eq!(ask(&open, 2).await.status(), 200, "open: admits");
    let refused = ask(&closed, 1).await;
    assert_eq!(refused.status(), 503, "closed: refuses");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    // Redis back: the store decides again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = ask(&closed, 3).await;
        if response.status() == 200 {
            assert_eq!(number(&response, "x-ratelimit-remaining-tokens"), 20);
            break;
        }
        assert!(Instant::now() < deadline, "closed mode recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_tiers_token_limits_come_from_the_file_and_reload() {
    let mock = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let tier = |per_minute: u64| {
        format!(
            "[tiers.metered]\ncapacity = 50\nrefill_rate = 5\ntokens_per_minute = {per_minute}\n\
             token_budget = 90000\nbudget_period = \"month\"\n"
        )
    };
    std::fs::write(&file, tier(3000)).unwrap();
    let builder = gateway(&mock, "memory://")
        .set("API_KEY_TIERS", format!("{KEY}=metered"))
        .config_file(&file);
    let app = builder.clone().spawn().await;
    let response = openai(&app, &body("tiered", 10)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(number(&response, "x-ratelimit-limit-tokens"), 3000);
    assert_eq!(number(&response, "x-ratelimit-limit-requests"), 50);
    let policy = header(&response, "ratelimit-policy");
    assert!(
        policy.starts_with(
            "\"metered\";q=50;w=10, \"metered-tokens\";q=3000;w=60, \"metered-budget\";q=90000;w="
        ),
        "{policy}"
    );
    let month: u64 = policy.rsplit("w=").next().unwrap().parse().unwrap();
    assert!([28, 29, 30, 31].contains(&(month / 86_400)), "{policy}");

    std::fs::write(&file, tier(4000)).unwrap();
    app.state
        .reload(&builder.build_settings().unwrap())
        .unwrap();
    let response = openai(&app, &body("tiered again", 10)).await;
    assert_eq!(
        number(&response, "x-ratelimit-limit-tokens"),
        4000,
        "reloaded"
    );
}
