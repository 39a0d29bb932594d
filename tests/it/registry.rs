//! The provider registry over real HTTP against several `mock-llm` instances (and
//! wiremock where a test must change an upstream's answer mid-test): failover order, no
//! failover on a 400 or after a stream's first byte, the weight split, the preference for
//! the target with fewest requests in flight, a breaker opening, probing and closing, an
//! upstream's Retry-After honoured and passed on, reloads under load, `/v1/models`, and
//! start-up refusing a bad registry with one line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::{ollama_reply, GatewayProcess, MockLlm, TestApp};

const KEY: &str = "sk-registry";

/// Writes `text` as the config file in `dir`.
fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn gateway(dir: &Path, config: &str, extra: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .keys(KEY)
        .set("RATE_LIMITER_CAPACITY", "100000")
        .set("RATE_LIMITER_REFILL_RATE", "100000")
        .set("CACHE_TTL_SECONDS", "0")
        .settings(extra)
        .config_file(&write_config(dir, config))
        .spawn()
        .await
}

fn provider(name: &str, kind: &str, url: &str) -> String {
    format!("[providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{url}\"\nmax_retries = 0\n")
}

async fn ask(app: &TestApp, model: &str, text: &str) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(KEY)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap()
}

/// The upstream model that answered (each test gives every target its own model name).
async fn answered_by(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["model"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_failing_target_fails_over_in_priority_order_but_a_400_does_not() {
    let down = MockLlm::start(&["--fail-status", "500"]);
    let refusing = MockLlm::start(&["--fail-status", "400"]);
    let good = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}{}
[routes.chain]
aliases = [\"chain-alias\"]
targets = [{{ provider = \"down\", model = \"m-down\" }}, {{ provider = \"good\", model = \"m-good\", priority = 1 }}]
[routes.refused]
targets = [{{ provider = \"refusing\", model = \"m-refusing\" }}, {{ provider = \"good\", model = \"m-good\", priority = 1 }}]
[routes.default]
targets = [{{ provider = \"good\", model = \"m-default\" }}]
",
        provider("down", "ollama", &down.url),
        provider("refusing", "ollama", &refusing.url),
        provider("good", "openai", &good.url),
    );
    let app = gateway(dir.path(), &config, &[]).await;

    assert_eq!(answered_by(ask(&app, "chain", "x").await).await, "m-good");
    assert_eq!(
        answered_by(ask(&app, "chain-alias", "y").await).await,
        "m-good"
    );
    assert_eq!(
        app.metric("provider_fallbacks_total{provider=\"down\"}")
            .await,
        2.0
    );
    assert_eq!(
        app.metric("provider_calls_total{provider=\"down\"}").await,
        2.0
    );

    let response = ask(&app, "refused", "z").await;
    assert_eq!(
        response.status(),
        502,
        "a 400 is the answer, not a reason to fail over"
    );
    assert_eq!(
        app.metric("provider_calls_total{provider=\"good\"}").await,
        2.0
    );
    assert_eq!(
        app.metric("provider_fallbacks_total{provider=\"refusing\"}")
            .await,
        0.0
    );

    // The SDK doors know only the routes; the original door falls back to `default`.
    let unknown = ask(&app, "gpt-nothing", "x").await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"]["code"],
        "model_not_found"
    );
    let original: Value = app
        .chat(
            KEY,
            &json!({"messages": [{"role": "user", "content": "hi"}], "model": "anything"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(original["provider"], "good");
    let models: Value = app
        .client
        .get(format!("{}/v1/models", app.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["chain", "chain-alias", "default", "refused"]);
}

#[tokio::test]
async fn traffic_splits_by_weight_within_five_percent_over_2000_requests() {
    let heavy = MockLlm::start(&[]);
    let light = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}[routes.split]\ntargets = [{{ provider = \"heavy\", model = \"a\", weight = 3 }}, {{ provider = \"light\", model = \"b\" }}]\n",
        provider("heavy", "ollama", &heavy.url),
        provider("light", "ollama", &light.url),
    );
    let app = gateway(dir.path(), &config, &[]).await;
    for i in 0..2000 {
        assert_eq!(ask(&app, "split", &format!("q{i}")).await.status(), 200);
    }
    let heavy = app.metric("provider_calls_total{provider=\"heavy\"}").await;
    let light = app.metric("provider_calls_total{provider=\"light\"}").await;
    assert_eq!(heavy + light, 2000.0);
    let share = heavy / 2000.0;
    assert!(
        (0.70..=0.80).contains(&share),
        "heavy got {share:.3} of the traffic, 0.75 expected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_target_gets_fewer_requests_than_its_weight_says() {
    let slow = MockLlm::start(&["--latency-ms", "300"]);
    let fast = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}[routes.even]\ntargets = [{{ provider = \"slow\", model = \"s\" }}, {{ provider = \"fast\", model = \"f\" }}]\n",
        provider("slow", "ollama", &slow.url),
        provider("fast", "ollama", &fast.url),
    );
    let app = Arc::new(gateway(dir.path(), &config, &[]).await);
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let app = app.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let response = ask(&app, "even", &format!("c{c} q{i}")).await;
                    assert_eq!(response.status(), 200);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let slow = app.metric("provider_calls_total{provider=\"slow\"}").await;
    let fast = app.metric("provider_calls_total{provider=\"fast\"}").await;
    assert_eq!(slow + fast, 80.0);
    assert!(
        fast >= 60.0,
        "equal weights, but the fast target should take most: fast {fast}, slow {slow}"
    );
}

async fn ollama_answering(status: u16) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(status).set_body_json(ollama_reply("from wiremock")))
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn a_breaker_opens_skips_its_target_probes_after_the_cool_down_and_closes() {
    let flaky = ollama_answering(500).await;
    let backup = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}[routes.r]\ntargets = [{{ provider = \"flaky\", model = \"m-flaky\" }}, {{ provider = \"backup\", model = \"m-backup\", priority = 1 }}]\n",
        provider("flaky", "ollama", &flaky.uri()),
        provider("backup", "ollama", &backup.url),
    );
    let app = gateway(
        dir.path(),
        &config,
        &[
            ("PROVIDER_BREAKER_THRESHOLD", "2"),
            ("PROVIDER_BREAKER_COOLDOWN_SECONDS", "1"),
        ],
    )
    .await;
    let state = "provider_breaker_state{provider=\"flaky\"}";
    for i in 0..2 {
        assert_eq!(
            answered_by(ask(&app, "r", &format!("a{i}")).await).await,
            "m-backup"
        );
    }
    assert_eq!(app.metric(state).await, 1.0, "two failures open it");
    assert_eq!(answered_by(ask(&app, "r", "skip").await).await, "m-backup");
    assert_eq!(
        flaky.received_requests().await.unwrap().len(),
        2,
        "open: skipped"
    );

    flaky.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ollama_reply("healed")))
        .mount(&flaky)
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        answered_by(ask(&app, "r", "probe").await).await,
        "m-flaky",
        "after the cool-down one probe goes through, and it answers"
    );
    assert_eq!(app.metric(state).await, 0.0, "the probe closed it");
    assert_eq!(answered_by(ask(&app, "r", "again").await).await, "m-flaky");
}

#[tokio::test]
async fn an_upstream_retry_after_holds_its_target_off_and_reaches_the_client() {
    let throttled = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "2"))
        .mount(&throttled)
        .await;
    let backup = MockLlm::start(&[]);
    let alone = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3"))
        .mount(&alone)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}{}[routes.r]\ntargets = [{{ provider = \"throttled\", model = \"m-t\" }}, {{ provider = \"backup\", model = \"m-backup\", priority = 1 }}]\n[routes.alone]\ntargets = [{{ provider = \"alone\", model = \"m-alone\" }}]\n",
        provider("throttled", "ollama", &throttled.uri()),
        provider("backup", "ollama", &backup.url),
        provider("alone", "ollama", &alone.uri()),
    );
    let app = gateway(dir.path(), &config, &[("PROVIDER_BREAKER_THRESHOLD", "10")]).await;
    for i in 0..5 {
        assert_eq!(
            answered_by(ask(&app, "r", &format!("q{i}")).await).await,
            "m-backup"
        );
    }
    assert_eq!(
        throttled.received_requests().await.unwrap().len(),
        1,
        "held off for its Retry-After although its breaker's threshold is 10"
    );

    let response = ask(&app, "alone", "x").await;
    assert_eq!(response.status(), 429, "the upstream's 429 is passed on");
    assert_eq!(response.headers()["retry-after"], "3");
    assert_eq!(response.headers()["retry-after-ms"], "3000");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn a_stream_that_fails_after_its_first_byte_does_not_fail_over() {
    let breaking = MockLlm::start(&[
        "--chunks",
        "4",
        "--fail-after",
        "2",
        "--chunk-delay-ms",
        "100",
    ]);
    let backup = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}[routes.r]\ntargets = [{{ provider = \"breaking\", model = \"m-b\" }}, {{ provider = \"backup\", model = \"m-backup\", priority = 1 }}]\n",
        provider("breaking", "ollama", &breaking.url),
        provider("backup", "openai", &backup.url),
    );
    let app = gateway(dir.path(), &config, &[]).await;
    let response = app
        .client
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(KEY)
        .json(&json!({"model": "r", "stream": true, "messages": [{"role": "user", "content": "one two three four"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.contains("data: {\"error\""), "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    assert_eq!(
        app.metric("provider_calls_total{provider=\"backup\"}")
            .await,
        0.0
    );

    // The OpenAI-compatible kind streams too, with its usage.
    let config = format!(
        "{}[routes.r]\ntargets = [{{ provider = \"backup\", model = \"m-backup\" }}]\n",
        provider("backup", "openai", &backup.url)
    );
    let dir = tempfile::tempdir().unwrap();
    let app = gateway(dir.path(), &config, &[]).await;
    let response = app
        .client
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(KEY)
        .json(
            &json!({"model": "r", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "via openai"}]}),
        )
        .send()
        .await
        .unwrap();
    let body = response.text().await.unwrap();
    assert!(body.contains("\"content\":\"Echo:"), "{body}");
    assert!(body.contains("\"completion_tokens\":3"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_fails_no_request_and_a_bad_file_is_refused() {
    let first = MockLlm::start(&[]);
    let second = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let to = |url: &str, model: &str| {
        format!(
            "{}[routes.r]\ntargets = [{{ provider = \"up\", model = \"{model}\" }}]\n",
            provider("up", "ollama", url)
        )
    };
    let app = Arc::new(gateway(dir.path(), &to(&first.url, "m-first"), &[]).await);
    let until = Instant::now() + Duration::from_secs(2);
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut answered = 0;
                while Instant::now() < until {
                    let response = ask(&app, "r", &format!("c{c}")).await;
                    assert_eq!(response.status(), 200, "no request fails across reloads");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let builder = |config: &str| {
        TestApp::builder()
            .keys(KEY)
            .set("RATE_LIMITER_CAPACITY", "100000")
            .set("RATE_LIMITER_REFILL_RATE", "100000")
            .set("CACHE_TTL_SECONDS", "0")
            .config_file(&write_config(dir.path(), config))
    };
    for round in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (url, model) = if round % 2 == 0 {
            (&second.url, "m-second")
        } else {
            (&first.url, "m-first")
        };
        let settings = builder(&to(url, model)).build_settings().unwrap();
        app.state.reload(&settings).unwrap();
    }
    let mut total = 0;
    for client in clients {
        total += client.await.unwrap();
    }
    assert!(total > 20, "{total} requests during the reloads");
    assert_eq!(answered_by(ask(&app, "r", "after").await).await, "m-first");

    let bad = builder(&to(&second.url, "m-second").replace("\"up\", model", "\"nope\", model"));
    let error = bad.build_settings().unwrap_err().to_string();
    assert!(error.contains("unknown provider 'nope'"), "{error}");
    assert_eq!(answered_by(ask(&app, "r", "kept").await).await, "m-first");
}

#[tokio::test]
async fn sighup_reloads_the_registry_and_a_bad_file_keeps_the_running_one() {
    let mock = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let route = |name: &str| {
        format!(
            "{}[routes.{name}]\ntargets = [{{ provider = \"up\", model = \"m\" }}]\n",
            provider("up", "ollama", &mock.url)
        )
    };
    let path = write_config(dir.path(), &route("before"));
    let gateway = GatewayProcess::start(&[
        ("API_KEYS", KEY),
        ("REDIS_URL", "memory://"),
        ("GATEWAY_CONFIG", path.to_str().unwrap()),
    ]);
    let models = |gateway: &GatewayProcess| {
        let url = format!("{}/v1/models", gateway.url);
        async move {
            let list: Value = reqwest::Client::new()
                .get(url)
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            list["data"][0]["id"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(models(&gateway).await, "before");
    std::fs::write(&path, route("after")).unwrap();
    gateway.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while models(&gateway).await != "after" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(models(&gateway).await, "after");

    std::fs::write(
        &path,
        route("broken").replace("kind = \"ollama\"", "kind = \"bard\""),
    )
    .unwrap();
    gateway.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        models(&gateway).await,
        "after",
        "the running registry is kept"
    );
    assert!(gateway.output().contains("configuration reload failed"));
}

#[test]
fn start_up_refuses_a_bad_registry_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (config, env, expected) in [
        (
            "[routes.r]\ntargets = [{ provider = \"ghost\", model = \"m\" }]\n[providers.real]\nkind = \"ollama\"\nbase_url = \"http://127.0.0.1:1\"\n",
            vec![],
            "unknown provider 'ghost'",
        ),
        (
            "[providers.real]\nkind = \"ollama\"\nbase_url = \"http://127.0.0.1:1\"\n[routes.r]\ntargets = []\n",
            vec![],
            "route 'r' has no targets",
        ),
        (
            "[providers.real]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"REAL_KEY\"\n[routes.r]\ntargets = [{ provider = \"real\", model = \"m\" }]\n",
            vec![],
            "REAL_KEY is not set",
        ),
    ] {
        let path = write_config(dir.path(), config);
        let output = Command::new(env!("CARGO_BIN_EXE_llm-gateway"))
            .current_dir(dir.path())
            .env_clear()
            .env("GATEWAY_CONFIG", &path)
            .env("PORT", "0")
            .envs(env.iter().map(|(k, v): &(&str, &str)| (*k, *v)))
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains(expected), "{stderr}");
    }
}

#[tokio::test]
async fn every_kind_answers_whole_streamed_and_with_tools() {
    let mock = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut config = String::new();
    for kind in ["ollama", "openai", "anthropic", "gemini"] {
        config.push_str(&provider(kind, kind, &mock.url));
        config.push_str(&format!(
            "[routes.via-{kind}]\ntargets = [{{ provider = \"{kind}\", model = \"m-{kind}\" }}]\n"
        ));
    }
    config = config.replace(
        "[providers.gemini]\n",
        "[providers.gemini]\napi_key_env = \"TEST_GEMINI_KEY\"\n",
    );
    let app = gateway(dir.path(), &config, &[("TEST_GEMINI_KEY", "gm-key")]).await;
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    for kind in ["ollama", "openai", "anthropic", "gemini"] {
        let model = format!("via-{kind}");
        let whole: Value = ask(&app, &model, "hello there").await.json().await.unwrap();
        assert_eq!(
            whole["choices"][0]["message"]["content"], "Echo: hello there",
            "{kind}"
        );
        assert!(
            whole["usage"]["completion_tokens"].as_u64().unwrap() > 0,
            "{kind}: {whole}"
        );

        let streamed = app
            .client
            .post(format!("{}/v1/chat/completions", app.url))
            .bearer_auth(KEY)
            .json(
                &json!({"model": model, "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "streamed words"}]}),
            )
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let text: String = streamed
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "Echo: streamed words", "{kind}: {streamed}");
        assert!(streamed.ends_with("data: [DONE]\n\n"), "{kind}");

        let question = json!({"role": "user", "content": "find it"});
        let called: Value = app
            .client
            .post(format!("{}/v1/chat/completions", app.url))
            .bearer_auth(KEY)
            .json(&json!({"model": model, "tools": tools, "messages": [question]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let message = &called["choices"][0]["message"];
        assert_eq!(
            called["choices"][0]["finish_reason"], "tool_calls",
            "{kind}: {called}"
        );
        assert_eq!(
            message["tool_calls"][0]["function"]["name"], "lookup",
            "{kind}"
        );
        let answered: Value = app
            .client
            .post(format!("{}/v1/chat/completions", app.url))
            .bearer_auth(KEY)
            .json(&json!({"model": model, "tools": tools, "messages": [question, message,
                {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "found"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let text = answered["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        assert!(
            text.starts_with("Tool ") && text.ends_with(" said: found"),
            "{kind}: {answered}"
        );
    }
}

#[tokio::test]
async fn fields_the_gateway_does_not_read_reach_an_openai_upstream_and_others_refuse_them() {
    let openai = MockServer::start().await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path("/v1/chat/completions"))
        .and(wiremock::matchers::header("authorization", "Bearer sk-upstream"))
        .and(wiremock::matchers::body_partial_json(
            json!({"model": "gpt-up", "logit_bias": {"50256": -100}, "service_tier": "flex"}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "gpt-up",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "passed"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        })))
        .mount(&openai)
        .await;
    let local = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}api_key_env = \"UPSTREAM_KEY\"\n{}[routes.remote]\ntargets = [{{ provider = \"remote\", model = \"gpt-up\" }}]\n[routes.local]\ntargets = [{{ provider = \"local\", model = \"llama\" }}]\n",
        provider("remote", "openai", &openai.uri()),
        provider("local", "ollama", &local.url),
    );
    let app = gateway(dir.path(), &config, &[("UPSTREAM_KEY", "sk-upstream")]).await;
    let body = |model: &str| {
        json!({"model": model, "messages": [{"role": "user", "content": "x"}],
            "logit_bias": {"50256": -100}, "service_tier": "flex"})
    };
    let send = |body: Value| {
        app.client
            .post(format!("{}/v1/chat/completions", app.url))
            .bearer_auth(KEY)
            .json(&body)
            .send()
    };
    let answer: Value = send(body("remote")).await.unwrap().json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"], "passed",
        "{answer}"
    );
    let refused = send(body("local")).await.unwrap();
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["param"], "logit_bias", "{error}");
    assert_eq!(error["error"]["code"], "unsupported_parameter");
}
