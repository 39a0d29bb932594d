//! The official SDKs against the gateway, unchanged: each script in `tests/sdk/` runs in
//! the pinned virtual environment that `scripts/test.sh` creates (`target/sdk-venv`), the
//! gateway and `mock-llm` started here. A missing environment fails with the command that
//! makes it; it is never skipped.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::{output_of, sdk_venv_program, MockLlm, TestApp};

const KEY: &str = "sk-sdk-ample";
const SLOW_KEY: &str = "sk-sdk-slow";
/// A key with a tokens-per-minute bucket (contract §13), read through the SDK's raw headers.
const METERED_KEY: &str = "sk-sdk-metered";
/// A key whose daily token budget one request spends.
const SPENT_KEY: &str = "sk-sdk-spent";
/// The metered tier's tokens per minute, passed to the scripts as METERED_TOKENS.
const METERED_TOKENS: u64 = 5000;

async fn gateway(mock: &MockLlm) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[tiers.metered]\ncapacity = 100\nrefill_rate = 10\ntokens_per_minute = {METERED_TOKENS}\n\
             [tiers.spent]\ncapacity = 100\nrefill_rate = 10\ntoken_budget = 200\n"
        ),
    )
    .unwrap();
    let app = TestApp::builder()
        .keys(&format!("{KEY},{SLOW_KEY},{METERED_KEY},{SPENT_KEY}"))
        .set("OLLAMA_BASE_URL", mock.url.as_str())
        .set("RATE_LIMITER_CAPACITY", "1000")
        .set("RATE_LIMITER_TIERS", "slow:1:2")
        .set(
            "API_KEY_TIERS",
            format!("{SLOW_KEY}=slow,{METERED_KEY}=metered,{SPENT_KEY}=spent"),
        )
        .config_file(&file)
        .spawn()
        .await;
    // The settings were read at spawn; the file is no longer needed.
    drop(dir);
    app
}

/// Runs `script` with the gateway's address; fails the test with its output unless it
/// exits 0.
async fn run(script: &str, app: &TestApp) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let mut command = Command::new(sdk_venv_program("python"));
    command
        .arg(&path)
        .env("GATEWAY_URL", &app.url)
        .env("GATEWAY_KEY", KEY)
        .env("SLOW_KEY", SLOW_KEY)
        .env("METERED_KEY", METERED_KEY)
        .env("SPENT_KEY", SPENT_KEY)
        .env("METERED_TOKENS", METERED_TOKENS.to_string())
        .env("GEMINI_MODEL_WITHOUT_KEY", "gemini-not-configured")
        .env("PYTHONUNBUFFERED", "1");
    let output = output_of(command, Duration::from_secs(120)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_unchanged() {
    let mock = MockLlm::start(&["--chunks", "3"]);
    let app = gateway(&mock).await;
    run("openai_sdk.py", &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_unchanged() {
    let mock = MockLlm::start(&["--chunks", "3"]);
    let app = gateway(&mock).await;
    run("anthropic_sdk.py", &app).await;
}
