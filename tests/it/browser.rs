//! The playground in a real browser: headless Chromium drives `/playground` against the
//! gateway and `mock-llm` as a person would (key, model, send, watch the answer stream
//! in, read what the page shows, run into the rate limit). Screenshots are kept in
//! `target/artefacts/`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::common::webdriver::Browser;
use crate::common::{MockLlm, TestApp};

const KEY: &str = "sk-browser-test";

fn artefact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/artefacts")
        .join(name)
}

/// The text of the conversation's last answer.
const LAST_ANSWER: &str =
    "const a = document.querySelectorAll('#messages li.assistant .content'); \
     return a.length ? a[a.length - 1].textContent : '';";

#[tokio::test]
async fn a_person_chats_through_the_playground_sees_the_answer_stream_and_runs_into_the_limit() {
    // Five chunks 200 ms apart: the answer takes a second to arrive, word by word.
    let mock = MockLlm::start(&["--chunks", "5", "--chunk-delay-ms", "200"]);
    let app = TestApp::builder()
        .keys(KEY)
        .set("OLLAMA_BASE_URL", &mock.url)
        .set("RATE_LIMITER_CAPACITY", "3")
        .set("RATE_LIMITER_REFILL_RATE", "0.01")
        .set("RATE_LIMITER_TOKENS_PER_MINUTE", "100000")
        .spawn()
        .await;
    let browser = Browser::start(1280, 900).await;
    browser.open(&format!("{}/playground", app.url)).await;

    // Every control has an accessible name (a label, or its own text).
    let unnamed = browser
        .run(
            "return [...document.querySelectorAll('input, select, textarea, button')] \
               .filter(e => !(e.labels && e.labels.length) && !e.textContent.trim() \
                 && !e.getAttribute('aria-label')) \
               .map(e => e.id)",
            json!([]),
        )
        .await;
    assert_eq!(unnamed, json!([]));

    // The key, then Tab: the page keeps it for the tab and lists the models.
    browser
        .type_into("#api-key", &format!("{KEY}\u{E004}"))
        .await;
    browser
        .wait_until(
            "return document.querySelectorAll('#model option').length > 0",
            Duration::from_secs(10),
        )
        .await;
    let stored = browser
        .run(
            "return [sessionStorage.getItem('llm-gateway.playground.key'), localStorage.length]",
            json!([]),
        )
        .await;
    assert_eq!(stored, json!([KEY, 0]));
    let models = browser
        .run(
            "return [...document.querySelectorAll('#model option')].map(o => o.value)",
            json!([]),
        )
        .await;
    assert!(
        models.as_array().unwrap().contains(&json!("llama3.1")),
        "{models}"
    );
    browser
        .run(
            "document.querySelector('#model').value = 'llama3.1'",
            json!([]),
        )
        .await;

    // Send with the keyboard (Ctrl+Enter) and watch the answer grow before it is done.
    let message = "hello from a real browser";
    browser
        .type_into("#prompt", &format!("{message}\u{E009}\u{E007}\u{E000}"))
        .await;
    let expected = format!("Echo: {message}");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = browser.run(LAST_ANSWER, json!([])).await;
        let text = text.as_str().unwrap_or_default().to_owned();
        if seen.last() != Some(&text) {
            seen.push(text.clone());
        }
        if text == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never finished: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let partial = seen
        .iter()
        .filter(|t| !t.is_empty() && **t != expected)
        .count();
    assert!(
        partial >= 2,
        "the answer appeared at once, not streamed: {seen:?}"
    );
    browser
        .wait_until(
            "return document.body.dataset.state === 'answered'",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(browser.text("#d-status").await, "200");
    assert_eq!(browser.text("#d-provider").await, "ollama");
    assert_eq!(browser.text("#d-model").await, "llama3.1");
    assert_eq!(browser.text("#d-cache").await, "MISS");
    assert_eq!(browser.text("#d-requests").await, "2");
    let tokens: u64 = browser.text("#d-tokens").await.parse().unwrap();
    assert!(tokens > 0 && tokens < 100_000, "{tokens}");
    let usage = browser.text("#d-usage").await;
    let parts: Vec<u64> = usage.split(" / ").map(|n| n.parse().unwrap()).collect();
    assert_eq!(parts.len(), 3, "{usage}");
    assert_eq!(parts[0] + parts[1], parts[2], "{usage}");
    assert!(browser.text("#d-latency").await.ends_with(" ms"));
    assert!(browser.text("#d-ttft").await.ends_with(" ms"));
    assert!(!browser.text("#d-request-id").await.is_empty());
    browser.screenshot(&artefact("playground.png")).await;

    // The same question in a new conversation comes from the cache.
    browser.click("#clear").await;
    browser.type_into("#prompt", message).await;
    browser.click("#send").await;
    browser
        .wait_until(
            "return document.body.dataset.state === 'answered' \
             && document.querySelector('#d-cache').textContent === 'HIT'",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(browser.run(LAST_ANSWER, json!([])).await, json!(expected));
    assert_eq!(browser.text("#d-requests").await, "1");

    // The third request spends the bucket; the fourth is refused, and the page says how
    // long to wait.
    for (i, state) in [(3, "answered"), (4, "failed")] {
        browser.type_into("#prompt", &format!("question {i}")).await;
        browser.click("#send").await;
        browser
            .wait_until(
                &format!("return document.body.dataset.state === '{state}'"),
                Duration::from_secs(10),
            )
            .await;
    }
    assert_eq!(browser.text("#d-status").await, "429");
    let error = browser.text("#error").await;
    assert!(error.starts_with("Rate limited (429)"), "{error}");
    assert!(
        error.contains("Wait ") && error.contains(" s before sending again"),
        "{error}"
    );
    let shown = browser
        .run("return !document.querySelector('#error').hidden", json!([]))
        .await;
    assert_eq!(shown, true);
    // The refused message is back in the box, ready to send again.
    assert_eq!(
        browser
            .run("return document.querySelector('#prompt').value", json!([]))
            .await,
        json!("question 4")
    );
    browser.screenshot(&artefact("playground-429.png")).await;

    // On a phone-sized screen everything fits the width: no sideways scrolling.
    browser.resize(390, 844).await;
    let fits = browser
        .run(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            json!([]),
        )
        .await;
    assert_eq!(fits, true);
    browser.screenshot(&artefact("playground-narrow.png")).await;
}

#[tokio::test]
async fn a_wrong_key_and_a_failing_upstream_are_explained_in_words() {
    let mock = MockLlm::start(&["--fail-status", "500"]);
    let app = TestApp::builder()
        .keys(KEY)
        .set("OLLAMA_BASE_URL", &mock.url)
        .set("PROVIDER_MAX_RETRIES", "0")
        .spawn()
        .await;
    let browser = Browser::start(1024, 768).await;
    browser.open(&format!("{}/playground", app.url)).await;

    browser.type_into("#api-key", "sk-wrong\u{E004}").await;
    browser
        .wait_until(
            "return !document.querySelector('#error').hidden",
            Duration::from_secs(10),
        )
        .await;
    let error = browser.text("#error").await;
    assert!(
        error.contains("did not accept this API key (401)"),
        "{error}"
    );

    // The right key; the upstream fails every call.
    browser
        .run(
            "const k = document.querySelector('#api-key'); k.value = ''; k.focus()",
            json!([]),
        )
        .await;
    browser
        .type_into("#api-key", &format!("{KEY}\u{E004}"))
        .await;
    browser
        .wait_until(
            "return document.querySelector('#error').hidden \
             && document.querySelectorAll('#model option').length > 0",
            Duration::from_secs(10),
        )
        .await;
    browser
        .run(
            "document.querySelector('#model').value = 'llama3.1'",
            json!([]),
        )
        .await;
    browser.type_into("#prompt", "anyone there?").await;
    browser.click("#send").await;
    browser
        .wait_until(
            "return document.body.dataset.state === 'failed'",
            Duration::from_secs(10),
        )
        .await;
    let error = browser.text("#error").await;
    assert!(
        error.contains("The upstream provider failed (502)"),
        "{error}"
    );
    assert_eq!(browser.text("#d-status").await, "502");
}
